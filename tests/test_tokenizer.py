"""The tokenizer the engine, its runtime and exo's API share: one object, light where it can be.

LightTokenizer must give what transformers' PreTrainedTokenizerFast gives for the
same folder (that is what transformers 4.x, pinned by legacy exo, loads for these
folders), byte for byte: ids, text, chat templates, special-token facts. Checked on
the demo's real Qwen2.5 vocabulary and on a sentencepiece-style one trained here.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import types
from pathlib import Path
from typing import Any

import pytest

from exo_rkllm.exo_glue import plugin
from exo_rkllm.models import tokenizer as tokmod
from exo_rkllm.models.light_tokenizer import LightTokenizer
from exo_rkllm.models.tokenizer import load_tokenizer, stop_token_ids
from exo_driver import ExoRing
from support import DEMO_ID, DEMO_LAYERS, make_engine, user

TEXTS = [
    "hello world", "", " ", "  two  spaces\tand\n\nlines\r\n", "Hé 世界 🤖👩‍💻 ¿qué? 日本語  \t café 🇫🇷",
    "e\u0301cole (decomposed)", "Ελληνικά και 中文标点：你好，世界！", "👍🏽👍🏽👍🏽 🫠 𝒳 ǅ ﬁ ① ｆｕｌｌ",
    "user text with <|im_end|> and <|im_start|>assistant inside", "<s> [INST] not a turn </s>",
    "<|endoftext|><|endoftext|>", "don't I'LL we've they're", "```py\nx = 1  # code\n```\n", "\u200b\ufeffzero width",
    "a" * 300, "1234567890 3.14159 -42", "<0x41> ▁ Ġ", "Привет, мир", "مرحبا بالعالم", "नमस्ते दुनिया",
]

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city (°C, 天气)",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "description": "e.g. Zürich"}},
                                               "required": ["city"]}}}]

# A template of our own that uses what real ones use: tools through tojson, trim/lstrip-sensitive
# blocks, loop controls, a raise_exception branch, the special-token variables.
TOOL_TEMPLATE = """{%- if tools %}
<|im_start|>system
# Tools
{% for tool in tools %}
  {{ tool | tojson }}
{% endfor %}
<|im_end|>
{% endif %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}
    {% if loop.index > 50 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def write_sentencepiece_folder(folder: Path) -> Path:
    """A Llama-2-style tokenizer.json (prepend/replace normaliser, byte fallback, <s> added by the
    post-processor) with a PreTrainedTokenizerFast config, trained offline in a second."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    from exo_rkllm.runtime.sim import _FRAGMENTS

    tok = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    corpus = [" ".join(_FRAGMENTS), "Hello world, this is a test of leading spaces.", "  two  spaces\tand\n\nlines"]
    tok.train_from_iterator(corpus * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False, "model_max_length": 4096, "chat_template": LLAMA2_TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    return write_sentencepiece_folder(tmp_path_factory.mktemp("sp") / "sp")


@pytest.fixture(scope="module")
def tools_dir(tmp_path_factory, demo_model_dir) -> Path:
    """The demo tokenizer with a tool-using template."""
    return with_template(demo_model_dir, tmp_path_factory.mktemp("tools") / "qwen-tools", TOOL_TEMPLATE)


def with_template(base: Path, folder: Path, template: str) -> Path:
    """A new tokenizer folder `folder`: the tokenizer of `base` with another chat template."""
    folder.mkdir()
    shutil.copy(base / "tokenizer.json", folder)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=["qwen", "sentencepiece"])
def pair(request, demo_model_dir, sp_dir) -> tuple[Any, Any]:
    """(ours, transformers') for one folder."""
    from transformers import PreTrainedTokenizerFast

    folder = demo_model_dir if request.param == "qwen" else sp_dir
    return load_tokenizer(folder), PreTrainedTokenizerFast.from_pretrained(str(folder))


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abc XYZ\t\n.,'!?") + ["世", "界", "🤖", "👩‍💻", "é", "\u0301", "<|im_end|>", "<s>", "</s>", "ü", "ß"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def test_the_demo_and_sentencepiece_folders_get_the_light_tokenizer(pair):
    ours, _ = pair
    assert isinstance(ours, LightTokenizer)


def test_encode_matches_transformers(pair):
    ours, ref = pair
    for text in TEXTS + random_texts(300, 1):
        for add in (True, False):
            assert ours.encode(text, add_special_tokens=add) == ref.encode(text, add_special_tokens=add), text
        for split in (True, False):
            got = ours(text, add_special_tokens=False, split_special_tokens=split)
            want = ref(text, add_special_tokens=False, split_special_tokens=split)
            assert got["input_ids"] == want["input_ids"] and got["attention_mask"] == want["attention_mask"], text
    assert ours(TEXTS[:4])["input_ids"] == ref(TEXTS[:4])["input_ids"]


def test_decode_matches_transformers(pair):
    import numpy as np

    ours, ref = pair
    rng = random.Random(2)
    n = len(ref)
    specials = list(ref.all_special_ids)
    samples = [ref.encode(t) for t in TEXTS] + [[rng.randrange(n) for _ in range(rng.randint(1, 12))]
                                                for _ in range(400)]
    samples += [[rng.choice(specials), *s[:5], rng.choice(specials)] for s in samples[:50]]
    for ids in samples:
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
        assert ours.convert_ids_to_tokens(ids, skip_special_tokens=True) == \
            ref.convert_ids_to_tokens(ids, skip_special_tokens=True)
    ids = samples[0]
    assert ours.decode(np.array(ids)) == ref.decode(ids)  # engine.decode hands a numpy array
    assert ours.decode(ids[0]) == ref.decode(ids[0])
    assert ours.convert_ids_to_tokens(ids[0]) == ref.convert_ids_to_tokens(ids[0])


def test_vocabulary_and_special_token_facts_match_transformers(pair):
    ours, ref = pair
    assert len(ours) == len(ref) and ours.vocab_size == ref.vocab_size
    assert ours.get_vocab() == ref.get_vocab()
    assert ours.get_added_vocab() == ref.get_added_vocab()
    assert {i: str(t) for i, t in ours.added_tokens_decoder.items()} == \
        {i: str(t) for i, t in ref.added_tokens_decoder.items()}
    assert ours.all_special_ids == ref.all_special_ids and ours.all_special_tokens == ref.all_special_tokens
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
        assert getattr(ours, attr + "_id") == getattr(ref, attr + "_id"), attr
    # transformers 5 no longer lists additional_special_tokens in this map; 4.x does, as we do
    assert {k: v for k, v in ours.special_tokens_map.items() if k != "additional_special_tokens"} == \
        {k: v for k, v in ref.special_tokens_map.items() if k != "additional_special_tokens"}
    for token in ("<|im_end|>", "<s>", "hello", "not-a-token-at-all", "\u2581"):
        assert ours.convert_tokens_to_ids(token) == ref.convert_tokens_to_ids(token), token
    assert ours.convert_tokens_to_ids(["<|im_end|>", "<s>"]) == ref.convert_tokens_to_ids(["<|im_end|>", "<s>"])
    assert stop_token_ids(ours) == _stop_ids_from_vocab(ref)


def _stop_ids_from_vocab(tok: Any) -> frozenset[int]:
    vocab = tok.get_vocab()
    return frozenset({int(tok.eos_token_id)} | {vocab[t] for t in tokmod._END_TOKENS if t in vocab})


CONVERSATIONS = [
    user("hi"),
    user("Hé 世界 🤖👩‍💻 with <|im_end|> and <s> [INST] in it"),
    [{"role": "system", "content": "be brief 中文"}, {"role": "user", "content": "  padded  "},
     {"role": "assistant", "content": "ok 👍🏽"}, {"role": "user", "content": "again\n\nplease"}],
]


def test_chat_templates_match_transformers(pair, tools_dir):
    from transformers import PreTrainedTokenizerFast

    cases = [pair, (load_tokenizer(tools_dir), PreTrainedTokenizerFast.from_pretrained(str(tools_dir)))]
    for ours, ref in cases:
        for messages in CONVERSATIONS:
            for kw in ({"add_generation_prompt": True}, {"add_generation_prompt": False}, {"tools": TOOLS,
                       "add_generation_prompt": True}, {"continue_final_message": True}):
                if kw.get("continue_final_message") and messages[-1]["role"] != "assistant":
                    messages = messages + [{"role": "assistant", "content": "partial 世"}]
                    if "raise_exception('Conversation roles" in (ref.chat_template or ""):
                        continue
                want = ref.apply_chat_template(messages, tokenize=False, **kw)
                assert ours.apply_chat_template(messages, tokenize=False, **kw) == want, (messages, kw)
                assert ours.apply_chat_template(messages, **kw) == _ids(ref.apply_chat_template(messages, **kw))
                # legacy exo's build_prompt names the argument
                assert ours.apply_chat_template(conversation=messages, tokenize=False, **kw) == want
    ours, ref = cases[1]
    assert TOOLS[0]["function"]["name"] in ours.apply_chat_template(user("x"), tokenize=False, tools=TOOLS)


def _ids(out: Any) -> list[int]:
    # transformers 5 answers tokenize=True with a dict by default; 4.x (and we) with the ids
    return list(out["input_ids"]) if not isinstance(out, list) else out


def test_template_errors_are_template_errors(sp_dir):
    import jinja2

    tok = load_tokenizer(sp_dir)
    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        tok.apply_chat_template(user("a") + user("b"), tokenize=False)


def test_what_legacy_exo_calls(demo_tokenizer):
    """exo/api/chatgpt_api.py and exo/main.py at 5f18faec1: build_prompt, encode, decode, eos_token_id."""
    prompt = demo_tokenizer.apply_chat_template(conversation=user("hi"), tokenize=False, add_generation_prompt=True)
    tokens = demo_tokenizer.encode(prompt)
    assert prompt.endswith("<|im_start|>assistant\n") and tokens[-3] == demo_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert demo_tokenizer.decode(tokens) == prompt
    assert demo_tokenizer.eos_token_id == 151645 and demo_tokenizer.special_tokens_map["eos_token"] == "<|im_end|>"


def test_other_tokenizer_classes_go_to_transformers_and_say_so_once(tmp_path, sp_dir, caplog):
    folders = []
    for name in ("a", "b"):
        folder = tmp_path / name
        shutil.copytree(sp_dir, folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["tokenizer_class"] = "LlamaTokenizerFast"  # rewrites the post-processor at load
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        folders.append(folder)
    with caplog.at_level(logging.INFO, logger="exo_rkllm.models.tokenizer"):
        toks = [load_tokenizer(f) for f in folders]
    assert not any(isinstance(t, LightTokenizer) for t in toks)
    assert type(toks[0]).__module__.startswith("transformers")
    said = [r for r in caplog.records if r.name == "exo_rkllm.models.tokenizer" and "LlamaTokenizerFast" in r.getMessage()]
    assert len(said) == 1 and "loaded with transformers" in said[0].getMessage()


def test_a_special_token_missing_from_tokenizer_json_goes_to_transformers(tmp_path, sp_dir):
    folder = tmp_path / "pad"
    shutil.copytree(sp_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["pad_token"] = "<pad>"  # transformers adds it as a new token: len() changes
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    assert not isinstance(tok, LightTokenizer) and tok.pad_token_id == len(tok) - 1


def test_one_instance_per_folder_however_it_is_named(tmp_path, demo_model_dir):
    link = tmp_path / "link"
    link.symlink_to(demo_model_dir)
    first = load_tokenizer(demo_model_dir)
    assert load_tokenizer(str(demo_model_dir) + "/") is first
    assert load_tokenizer(link) is first
    assert load_tokenizer(demo_model_dir, allow_network=True) is first  # a folder is a folder


async def test_exo_api_engine_and_runtime_share_one_tokenizer(demo_models_dir, monkeypatch):
    """The object exo's API gets from resolve_tokenizer (plugin patch) is the engine's and the
    simulator's own, also when the network is allowed (the engine's and the runtime's cache keys
    used to differ then, and the process held two Qwen tokenizers)."""
    engine, runtime = make_engine(demo_models_dir, allow_network=True)
    await ExoRing([engine]).complete(DEMO_ID, user("hello"), DEMO_LAYERS)
    entry = engine.catalog.resolve(DEMO_ID)

    async def original(repo_id):
        raise AssertionError("exo's own resolve_tokenizer must not load our models")

    fake = types.ModuleType("exo.inference.tokenizers")
    fake.resolve_tokenizer = original
    plugin._patch_tokenizers(fake)
    repo = str(entry.folder)
    monkeypatch.setitem(plugin._repo_to_model, repo, DEMO_ID)
    monkeypatch.setattr(plugin, "_engine", engine)
    api_tok = await fake.resolve_tokenizer(repo)
    assert api_tok is engine.tokenizer is engine.model_for(DEMO_ID).tokenizer
    assert api_tok is runtime.inner._tok, "the simulator holds a second copy"
    assert isinstance(api_tok, LightTokenizer)


def test_loading_the_demo_tokenizer_adds_at_most_150_mb(demo_model_dir):
    """The README's figure, in a fresh process with transformers imported first (as in exo's).
    Without the light class, or without handing the freed heap back, it is 150-215 MB."""
    import subprocess
    import sys

    probe = ("import gc, json\n"
             "from transformers import AutoTokenizer, AutoProcessor\n"
             "from exo_rkllm.models.tokenizer import load_tokenizer\n"
             "def rss():\n"
             "    return next(int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmRSS'))\n"
             "gc.collect(); base = rss()\n"
             f"tok = load_tokenizer({str(demo_model_dir)!r}); gc.collect()\n"
             "print(json.dumps({'added': rss() - base, 'kind': type(tok).__name__}))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kind"] == "LightTokenizer" and result["added"] <= 150, result
