"""Tokenizer loading (offline first) and the token facts the engine needs.

exo's API resolves the tokenizer from the model card's repo; the plugin answers
with the engine's own object, loaded here once per folder, so the engine, its
runtime and exo's API agree on every id and the process holds one tokenizer.
Where transformers would load tokenizer.json unchanged, that object is a
LightTokenizer (light_tokenizer.py); a load gives the heap it freed back to the
system. Together: ~53 MB of RSS for Qwen's 151k vocabulary instead of ~215-240 MB
(benchmarks/memory.py).

The cache keeps a tokenizer until its owner (the engine, which bounds the models it keeps:
RKLLM_MODEL_CACHE) releases it; a released one stays shared for as long as anyone still
holds it (a request in flight, the runtime), so a folder never has two objects at once.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
import weakref
from pathlib import Path
from typing import Any

from exo_rkllm.errors import ModelUnavailable

log = logging.getLogger("exo_rkllm.models.tokenizer")

# End-of-turn markers of the model families people convert to .rkllm. A runtime
# may report one of these as a token before FINISH; it ends the answer.
_END_TOKENS = (
    "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<end_of_turn>",
    "<｜end▁of▁sentence｜>", "<|end|>", "<|eom_id|>",
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

_load_lock = threading.Lock()  # loads are rare and large: one at a time, never the same folder twice
_cache: dict[tuple[str, bool], Any] = {}  # kept until released
_alive: "weakref.WeakValueDictionary[tuple[str, bool], Any]" = weakref.WeakValueDictionary()  # kept or still held
_logged: set[str] = set()


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _cache_key(source: str | Path, allow_network: bool) -> tuple[str, bool]:
    """One key per tokenizer: a folder by its real path (whoever names it, however), a hub id
    with the network setting (it decides what may be fetched)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path.resolve()), False
    return str(source), allow_network


def load_tokenizer(source: str | Path, allow_network: bool = False) -> Any:
    """The tokenizer of a folder (or a hub id if allowed), loaded once per process.

    The engine, its runtime and exo's API all receive this one object. A folder with a
    tokenizer.json that transformers would load unchanged gets a LightTokenizer (the same
    results, a fraction of the memory under transformers 5); anything else is loaded
    by transformers' AutoTokenizer."""
    key = _cache_key(source, allow_network)
    with _load_lock:
        tok = _cache.get(key)
        if tok is None:
            tok = _alive.get(key)  # released but still held somewhere: the same object again
        if tok is not None:
            _cache[key] = tok
            return tok
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
        try:
            tok = _load_light(Path(key[0])) if not key[1] and Path(key[0]).is_dir() else None
            if tok is None:
                tok = _load_transformers(source, allow_network)
        except ModelUnavailable:
            raise
        except Exception as exc:
            hint = ("put tokenizer.json and tokenizer_config.json in the model folder, or set RKLLM_TOKENIZER_DIR"
                    if not allow_network else "check the network and the repository name")
            raise ModelUnavailable(f"cannot load the tokenizer from {source}: {exc.__class__.__name__}: {exc}; "
                                   f"{hint}") from exc
        finally:
            release_freed_memory()
        if tok.eos_token_id is None:
            raise ModelUnavailable(f"the tokenizer in {source} defines no eos_token: exo needs one to end answers")
        _cache[key] = _alive[key] = tok
        return tok


def release_tokenizer(source: str | Path, allow_network: bool = False) -> None:
    """The caller no longer needs the tokenizer of `source` kept: it is freed once nobody holds it.

    Until then load_tokenizer still returns that same object (one per folder). Call
    release_freed_memory() once the holders are gone to hand its memory back."""
    key = _cache_key(source, allow_network)
    with _load_lock:
        _cache.pop(key, None)


def _load_transformers(source: str | Path, allow_network: bool) -> Any:
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer needs it

    return AutoTokenizer.from_pretrained(str(source), local_files_only=not allow_network, trust_remote_code=False)


def _load_light(folder: Path) -> Any:
    """A LightTokenizer for `folder`, or None (logged once per reason) when transformers is needed."""
    from exo_rkllm.models.light_tokenizer import LightTokenizer, light_support, read_config

    reason = None
    if not (folder / "tokenizer.json").is_file():
        reason = "no tokenizer.json (transformers converts the slow tokenizer files)"
    config = read_config(folder) if reason is None else {}
    if reason is None:
        reason = light_support(config, None)
    if reason is None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        added = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
        reason = light_support(config, added)
        if reason is None:
            return LightTokenizer(backend, config, str(folder), _chat_template(folder, config))
        del backend
    if reason not in _logged:
        _logged.add(reason)
        log.info("tokenizer in %s loaded with transformers (more memory): %s", folder, reason)
    return None


def _chat_template(folder: Path, config: dict[str, Any]) -> Any:
    """The config's template (a string, or named templates as transformers reads a list of them);
    without one, chat_template.jinja, which newer transformers save instead."""
    template = config.get("chat_template")
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template}
    if template is None and (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template


def release_freed_memory() -> None:
    """Hand the C heap freed while loading back to the system.

    Parsing a large tokenizer.json frees ~100-160 MB that glibc keeps mapped (small blocks
    between live ones, and the arena of the loading thread): that is most of the RSS a load
    adds. malloc_trim(0) returns those pages; elsewhere (musl) this does nothing. The same holds
    for a tokenizer that was freed (released and no longer held): its vocabulary was many small
    blocks."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def stop_token_ids(tok: Any) -> frozenset[int]:
    """Ids that end an answer: the eos token plus the end-of-turn markers the vocabulary has."""
    ids = {int(tok.eos_token_id)}
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # a lookup per marker, not a 151k-entry copy of the vocabulary
        found = (backend.token_to_id(t) for t in _END_TOKENS)
        ids.update(int(i) for i in found if i is not None)
    else:
        vocab = tok.get_vocab()
        ids.update(vocab[t] for t in _END_TOKENS if t in vocab)
    return frozenset(ids)


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    # The GPT-2 byte-to-unicode table used by every byte-level BPE vocabulary.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tok: Any, token_id: int) -> bytes:
    """The raw bytes a byte-level BPE token stands for (special tokens: their UTF-8 text)."""
    piece = tok.convert_ids_to_tokens(int(token_id))
    if piece is None:
        raise ValueError(f"token id {token_id} is not in the vocabulary")
    if token_id in set(tok.all_special_ids) or piece in tok.get_added_vocab():
        return piece.encode("utf-8")
    table = _byte_decoder()
    try:
        return bytes(table[ch] for ch in piece)
    except KeyError:
        raise ValueError("token_bytes needs a byte-level BPE vocabulary") from None


def special_ids(tok: Any) -> frozenset[int]:
    """The ids of the tokenizer's special tokens (the simulator, the rkllama backend's text-to-ids
    mapping and the fake runtime keep them apart from ordinary text)."""
    return frozenset(int(i) for i in tok.all_special_ids)
