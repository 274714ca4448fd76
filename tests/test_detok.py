"""Incremental detokenisation equals decoding everything at once, byte for byte."""
from __future__ import annotations

import random

from exo_rkllm.models.detok import IncrementalDetokenizer
from exo_rkllm.runtime.base import split_prompt, utf8_complete_prefix

TEXTS = ["Hé 世界 🤖👩‍💻 ¿qué? 日本語  \t café 🇫🇷", " leading space and  two", "\n\n```py\nx = 1\n```\n",
         "👍🏽👍🏽👍🏽", "Ελληνικά και 中文标点：你好，世界！"]


def test_stream_equals_full_decode(demo_tokenizer):
    for text in TEXTS:
        ids = demo_tokenizer.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(demo_tokenizer)
        pieces = [detok.push(i) for i in ids] + [detok.flush()]
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)
        assert detok.text == text


def test_special_tokens_are_skipped_and_chunks_join_exactly(demo_tokenizer):
    eos = demo_tokenizer.eos_token_id
    detok = IncrementalDetokenizer(demo_tokenizer)
    ids = demo_tokenizer.encode(TEXTS[0], add_special_tokens=False) + [eos]
    chunks = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(chunks) == TEXTS[0]
    assert chunks[-2:] == ["", ""], "the eos adds no text"


def test_truncated_character_flushes_as_replacement(demo_tokenizer):
    ids = next(i for i in (demo_tokenizer.encode(c, add_special_tokens=False) for c in "🤖🫠𝒳🦾ǅ") if len(i) > 1)
    detok = IncrementalDetokenizer(demo_tokenizer)
    assert detok.push(ids[0]) == ""
    assert detok.flush() == "\ufffd"


def test_utf8_complete_prefix_random():
    rng = random.Random(1)
    data = "".join(TEXTS).encode()
    for _ in range(500):
        cut = rng.randint(0, len(data))
        n = utf8_complete_prefix(data[:cut])
        data[:n].decode("utf-8")  # must not raise
        assert cut - n <= 3


def test_split_prompt():
    assert split_prompt([1, 2, 3, 4], [1, 2]) == 2
    assert split_prompt([1, 2, 3], [1, 3]) == -1
    assert split_prompt([1], [1, 2]) == -1
    assert split_prompt([1, 2], []) == 0
