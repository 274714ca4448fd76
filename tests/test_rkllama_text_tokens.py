"""Streamed text -> token ids: decoding the ids gives the server's text byte for byte, at once.

Checked on the demo model's real Qwen2.5 byte-level BPE and on two sentencepiece-style
vocabularies (Llama-2 "legacy" normalizer, and Metaspace) trained at test time, with byte
fallback: the families whose leading-space rules break naive streaming code.
"""
from __future__ import annotations

import json
import random

import pytest

from exo_rkllm.models.detok import IncrementalDetokenizer
from exo_rkllm.runtime.base import CallState
from exo_rkllm.runtime.rkllama.text_tokens import TextToTokens
from exo_rkllm.runtime.sim import _FRAGMENTS

AWKWARD = [
    "  Leading", " spaces", " 世", "界", "🤖", "👩‍💻", " <|im_end|>", "<|endoftext|>", "\t\t", "\n\n", "é", "🇫🇷",
    " ", " ", "x", "👍🏽", "  ", "\n", " 日本語", "。", " ok",
]


def sentencepiece_tokenizer(kind: str):
    """A small sentencepiece-style BPE with byte fallback, built offline in a second."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True))
    if kind == "legacy":  # Llama 2's tokenizer.json
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:  # transformers' newer Llama conversion
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    corpus = [" ".join(_FRAGMENTS[:6]), "Hello world, this is a test of leading spaces.", "  two  spaces\tand\n\nlines"]
    tok.train_from_iterator(corpus * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module", params=["qwen", "legacy", "metaspace"])
def tokenizer(request, demo_tokenizer):
    return demo_tokenizer if request.param == "qwen" else sentencepiece_tokenizer(request.param)


def check(tok, pieces: list[str]) -> list:
    conv = TextToTokens(tok)
    out = []
    for piece in pieces:
        got = conv.push(piece)
        # Certain at once: every piece is whole text, so all of its tokens come out with it.
        assert "".join(p.text for p in got) == piece
        out += got
    out += conv.flush()
    text = "".join(pieces)
    ids = [p.token_id for p in out]
    assert conv.inexact == 0
    assert tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) == text
    detok = IncrementalDetokenizer(tok)  # what exo's API (with the plugin) streams
    assert detok.push_many(ids) + detok.flush() == text
    assert not set(ids) & set(tok.all_special_ids)
    return out


def test_awkward_pieces_decode_exactly(tokenizer):
    check(tokenizer, AWKWARD)


@pytest.mark.parametrize("first", [" lead", "  two", "\n", " 世界", "🤖", "\t"])
def test_answer_starting_with_whitespace_or_multibyte(tokenizer, first):
    check(tokenizer, [first, "ing", " end"])


def test_random_splits_of_simulator_text(tokenizer):
    rng = random.Random(7)
    for _ in range(25):
        text = " ".join(rng.choice(_FRAGMENTS) for _ in range(4))
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 30))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        check(tokenizer, pieces)


def test_qwen_pieces_that_are_one_token_stay_one_token(demo_tokenizer):
    """rkllama sends one piece per generated token: each comes back as that very token."""
    ids = demo_tokenizer.encode(" The NPU on the RK3588 has three cores. 中文", add_special_tokens=False)
    pieces = [demo_tokenizer.decode([i]) for i in ids]
    out = check(demo_tokenizer, pieces)
    assert [p.token_id for p in out] == ids


def test_special_token_text_is_text(demo_tokenizer):
    out = check(demo_tokenizer, ["<|im_end|>", "<|im_start|>assistant"])
    assert demo_tokenizer.eos_token_id not in [p.token_id for p in out], "never end exo's answer early"


def test_emoji_halves_in_two_pieces_are_joined(demo_tokenizer):
    conv = TextToTokens(demo_tokenizer)
    assert conv.push("a\ud83e") and conv.push("\udd16b")
    assert conv.text == "a🤖b"
    assert demo_tokenizer.decode(conv.ids) == "a🤖b"


def test_tokens_inside_a_character_wait(demo_tokenizer):
    """A character the vocabulary splits (a rare CJK one) comes out on its last token,
    the earlier ones carry no text (the runtime's WAITING state)."""
    char = "𠜎"
    ids = demo_tokenizer.encode(char, add_special_tokens=False)
    assert len(ids) > 1
    out = TextToTokens(demo_tokenizer).push(char)
    assert [p.state for p in out[:-1]] == [CallState.WAITING] * (len(out) - 1)
    assert out[-1].text == char and out[-1].state is CallState.NORMAL
