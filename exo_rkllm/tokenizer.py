"""Tokenizer loading (offline first) and the token facts the engine needs.

exo's API resolves the tokenizer from the model card's repo with transformers;
we point that repo at a local folder so no hub access is ever needed, and load
the very same folder here so engine and API agree on every id.
"""
from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Any, Iterable

from .errors import ModelUnavailable

# End-of-turn markers of the model families people convert to .rkllm. A runtime
# may report one of these as a token before FINISH; it ends the answer.
_END_TOKENS = (
    "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<end_of_turn>",
    "<｜end▁of▁sentence｜>", "<|end|>", "<|eom_id|>",
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

_lock = threading.Lock()
_cache: dict[tuple[str, bool], Any] = {}


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(source: str | Path, allow_network: bool = False) -> Any:
    """Load (once per process) a transformers tokenizer from a folder, or a hub id if allowed."""
    key = (str(source), allow_network)
    with _lock:
        if key in _cache:
            return _cache[key]
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is needed

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        tok = AutoTokenizer.from_pretrained(str(source), local_files_only=not allow_network, trust_remote_code=False)
    except Exception as exc:
        hint = ("put tokenizer.json and tokenizer_config.json in the model folder, or set RKLLM_TOKENIZER_DIR"
                if not allow_network else "check the network and the repository name")
        raise ModelUnavailable(f"cannot load the tokenizer from {source}: {exc.__class__.__name__}: {exc}; {hint}") from exc
    if tok.eos_token_id is None:
        raise ModelUnavailable(f"the tokenizer in {source} defines no eos_token: exo needs one to end answers")
    with _lock:
        _cache.setdefault(key, tok)
        return _cache[key]


def stop_token_ids(tok: Any) -> frozenset[int]:
    """Ids that end an answer: the eos token plus the end-of-turn markers the vocabulary has."""
    ids = {int(tok.eos_token_id)}
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
    return frozenset(int(i) for i in tok.all_special_ids)


def ids_list(values: Iterable[Any]) -> list[int]:
    return [int(v) for v in values]
