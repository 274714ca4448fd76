"""A tokenizer over `tokenizers.Tokenizer` + jinja2, for folders where transformers adds nothing.

transformers' tokenizer object costs memory the engine does not need: 4.x keeps
the Rust tokenizer and little else, but 5.x rebuilds Qwen's tokenizer from a
Python copy of its vocabulary and merges that it keeps (~95 MB for 151k tokens)
and replaces the folder's pre-tokenizer with its own class's (adding NFC
normalisation the folder's tokenizer.json does not have). This class loads the
folder's tokenizer.json as it is, exactly what transformers 4.x
(`PreTrainedTokenizerFast`) does, and offers the part of transformers' API that
legacy exo's ChatGPT API and this project call, with the same results.

It is used only when `light_support` finds nothing transformers would change at
load time; every other folder is loaded by transformers (tokenizer.py).
"""
from __future__ import annotations

import json
import threading
from datetime import datetime
from functools import lru_cache
from inspect import isfunction
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

# Classes whose transformers 4.x fast tokenizer is tokenizer.json plus the config's special
# tokens, nothing more. Class defaults for special tokens the config leaves out are listed
# (Qwen2TokenizerFast's signature); Llama/Gemma classes rewrite the post-processor, so they
# are not here and go to transformers.
_CLASS_DEFAULTS: dict[str, dict[str, str]] = {
    "PreTrainedTokenizerFast": {},
    "Qwen2Tokenizer": {"eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    "Qwen2TokenizerFast": {"eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
}
SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Config keys that make transformers change the tokenizer at load time or per call.
_CHANGING_KEYS = ("add_bos_token", "add_eos_token", "add_prefix_space", "legacy", "auto_map", "from_slow")


def _token_text(value: Any) -> str | None:
    """A special token as the config writes it: a string or an AddedToken-like dict."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def light_support(config: Mapping[str, Any], added: Mapping[str, int] | None) -> str | None:
    """None if this class reproduces transformers for a folder with this config; else the reason it does not.

    `added` is tokenizer.json's added vocabulary (content -> id); None checks the config alone."""
    cls = config.get("tokenizer_class")
    if cls not in _CLASS_DEFAULTS:
        return f"tokenizer_class {cls!r}"
    for key in _CHANGING_KEYS:
        if key in config:
            return f"tokenizer_config.json sets {key!r}"
    if config.get("split_special_tokens"):
        return "tokenizer_config.json sets split_special_tokens"
    if added is None:
        return None
    for name in _special_names(config, _CLASS_DEFAULTS[cls]):
        if name not in added:
            return f"special token {name!r} is not an added token of tokenizer.json (transformers would add it)"
    for index, token in (config.get("added_tokens_decoder") or {}).items():
        text = _token_text(token)
        if text is None or added.get(text) != int(index):
            return f"added_tokens_decoder entry {index} differs from tokenizer.json"
    return None


def _special_values(config: Mapping[str, Any], defaults: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for attr in SPECIAL_ATTRS:
        values[attr] = _token_text(config[attr]) if attr in config else defaults.get(attr)
    values["additional_special_tokens"] = [t for t in (_token_text(v) for v in
                                                       config.get("additional_special_tokens") or []) if t]
    return values


def _special_names(config: Mapping[str, Any], defaults: Mapping[str, str]) -> list[str]:
    values = _special_values(config, defaults)
    names = [v for k, v in values.items() if k != "additional_special_tokens" and v]
    return names + values["additional_special_tokens"]


class _Encoding(dict):
    """The dict-like BatchEncoding callers read ("input_ids", "attention_mask")."""

    @property
    def input_ids(self) -> Any:
        return self["input_ids"]


class LightTokenizer:
    """The subset of transformers' PreTrainedTokenizerFast API that exo and exo-rkllm use."""

    def __init__(self, backend: Any, config: Mapping[str, Any], name_or_path: str,
                 chat_template: Any = None) -> None:
        self._tokenizer = backend
        backend.no_truncation()
        backend.no_padding()
        self.name_or_path = name_or_path
        self.init_kwargs = dict(config)
        self.chat_template = chat_template
        self.model_max_length = int(config.get("model_max_length") or 10 ** 30)
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.split_special_tokens = False
        values = _special_values(config, _CLASS_DEFAULTS.get(config.get("tokenizer_class") or "", {}))
        for attr in SPECIAL_ATTRS:
            setattr(self, attr, values[attr])
        self.additional_special_tokens: list[str] = values["additional_special_tokens"]
        self._len = int(backend.get_vocab_size(with_added_tokens=True))  # Rust builds the whole vocab for it
        self._encode_lock = threading.Lock()  # encode_special_tokens is a flag of the shared backend
        backend.encode_special_tokens = False

    # -- what transformers exposes as attributes ------------------------------------------------
    @property
    def backend_tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def is_fast(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        # bos_token_id, eos_token_id, ... : ids of the special tokens, as transformers computes them.
        if name.endswith("_token_id") and name[:-3] in SPECIAL_ATTRS:
            text = self.__dict__.get(name[:-3])
            return None if text is None else self.convert_tokens_to_ids(text)
        raise AttributeError(name)

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.additional_special_tokens)

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {a: getattr(self, a) for a in SPECIAL_ATTRS if getattr(self, a)}
        if self.additional_special_tokens:
            out["additional_special_tokens"] = list(self.additional_special_tokens)
        return out

    @property
    def all_special_tokens(self) -> list[str]:
        seen: list[str] = []
        for value in self.special_tokens_map.values():
            for text in value if isinstance(value, list) else [value]:
                if text not in seen:
                    seen.append(text)
        return seen

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    @property
    def added_tokens_decoder(self) -> dict[int, Any]:
        return dict(sorted(self._tokenizer.get_added_tokens_decoder().items()))

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        return {t.content: i for i, t in self.added_tokens_decoder.items()}

    def get_added_vocab(self) -> dict[str, int]:
        return self.added_tokens_encoder

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=False))

    def __len__(self) -> int:
        return self._len

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self.get_vocab()

    def __repr__(self) -> str:
        return (f"LightTokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"special_tokens={self.special_tokens_map})")

    # -- ids and tokens ----------------------------------------------------------------------------
    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> Any:
        if tokens is None:
            return None
        if isinstance(tokens, str):
            index = self._tokenizer.token_to_id(tokens)
            if index is None and self.unk_token is not None:
                index = self._tokenizer.token_to_id(self.unk_token)
            return index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: Any, skip_special_tokens: bool = False) -> Any:
        if isinstance(ids, int) or (hasattr(ids, "ndim") and ids.ndim == 0):
            return self._tokenizer.id_to_token(int(ids))
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in _id_list(ids) if int(i) not in special]

    # -- encode / decode -------------------------------------------------------------------------
    def _encode_batch(self, texts: list[str], add_special_tokens: bool, split_special_tokens: bool) -> list[Any]:
        with self._encode_lock:
            if split_special_tokens:
                self._tokenizer.encode_special_tokens = True
            try:
                return self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
            finally:
                self._tokenizer.encode_special_tokens = False

    def __call__(self, text: str | Sequence[str], text_pair: Any = None, add_special_tokens: bool = True,
                 split_special_tokens: bool | None = None, return_attention_mask: bool | None = None,
                 return_tensors: Any = None, **kwargs: Any) -> _Encoding:
        _refuse(text_pair=text_pair, return_tensors=return_tensors, **kwargs)
        split = self.split_special_tokens if split_special_tokens is None else split_special_tokens
        batched = not isinstance(text, str)
        texts = list(text) if batched else [text]
        encodings = self._encode_batch(texts, add_special_tokens, split)
        ids = [list(e.ids) for e in encodings]
        out = _Encoding(input_ids=ids if batched else ids[0])
        if return_attention_mask is not False:
            masks = [list(e.attention_mask) for e in encodings]
            out["attention_mask"] = masks if batched else masks[0]
        return out

    def encode(self, text: str, text_pair: Any = None, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        return self(text, text_pair=text_pair, add_special_tokens=add_special_tokens,
                    return_attention_mask=False, **kwargs)["input_ids"]

    def decode(self, token_ids: Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None, **kwargs: Any) -> str:
        text = self._tokenizer.decode(_id_list(token_ids), skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None \
            else clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean else text

    def batch_decode(self, sequences: Iterable[Any], **kwargs: Any) -> list[str]:
        return [self.decode(s, **kwargs) for s in sequences]

    # -- chat templates -------------------------------------------------------------------------
    def get_chat_template(self, chat_template: str | None = None, tools: Any = None) -> str:
        """transformers' choice: an explicit template (or its name), 'tool_use' with tools, else 'default'."""
        templates = self.chat_template
        if isinstance(templates, dict):
            if chat_template is not None and chat_template in templates:
                return templates[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in templates:
                    return templates["tool_use"]
                if "default" in templates:
                    return templates["default"]
                raise ValueError(f"this model has several chat templates and no default: {sorted(templates)}")
            return chat_template
        if chat_template is not None:
            return chat_template
        if templates is None:
            raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set")
        return templates

    def apply_chat_template(self, conversation: Any, tools: Sequence[Any] | None = None,
                            documents: Sequence[Mapping[str, str]] | None = None, chat_template: str | None = None,
                            add_generation_prompt: bool = False, continue_final_message: bool = False,
                            tokenize: bool = True, return_dict: bool = False,
                            tokenizer_kwargs: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        for unsupported in ("padding", "truncation", "max_length", "return_tensors", "return_assistant_tokens_mask"):
            if kwargs.pop(unsupported, None):
                raise ValueError(f"apply_chat_template({unsupported}=...) is not supported by this tokenizer")
        if return_dict and not tokenize:
            raise ValueError("`return_dict=True` is incompatible with `tokenize=False`")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible")
        template = compile_chat_template(self.get_chat_template(chat_template, tools))
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and (
            isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages"))
        conversations = list(conversation) if batched else [conversation]
        tool_schemas = None if tools is None else [_tool_schema(t) for t in tools]
        if documents is not None and not all(isinstance(d, dict) for d in documents):
            raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
        template_kwargs = {**self.special_tokens_map, **kwargs}
        rendered: list[str] = []
        for chat in conversations:
            chat = getattr(chat, "messages", chat)
            text = template.render(messages=chat, tools=tool_schemas, documents=documents,
                                   add_generation_prompt=add_generation_prompt, **template_kwargs)
            if continue_final_message:
                final = chat[-1]["content"]
                if isinstance(final, (list, tuple)):
                    final = final[-1]["text"]
                final = final.strip()
                text = text[: text.rindex(final) + len(final)].rstrip()
            rendered.append(text)
        if not tokenize:
            return rendered if batched else rendered[0]
        out = self(rendered if batched else rendered[0], add_special_tokens=False, **dict(tokenizer_kwargs or {}))
        return out if return_dict else out["input_ids"]


def _refuse(**kwargs: Any) -> None:
    for key, value in kwargs.items():
        if value not in (None, False):
            raise ValueError(f"{key}=... is not supported by this tokenizer")


def _id_list(token_ids: Any) -> list[int]:
    if hasattr(token_ids, "tolist"):
        token_ids = token_ids.tolist()
    if isinstance(token_ids, int):
        return [token_ids]
    return [int(i) for i in token_ids]


def clean_up_tokenization(text: str) -> str:
    """transformers' clean-up of English tokenisation spaces (only when the config asks for it)."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


def _tool_schema(tool: Any) -> Any:
    if isinstance(tool, dict):
        return tool
    if isfunction(tool):
        from transformers.utils import get_json_schema

        return get_json_schema(tool)
    raise ValueError("Tools should either be a JSON schema, or a callable function with type hints and a docstring")


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> Any:
    """The template compiled in the environment transformers renders chat templates in."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # `{% generation %}` marks assistant text for transformers' assistant masks; it renders its body.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
