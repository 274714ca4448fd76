"""Streamed text to token ids, exactly and as early as possible.

An rkllama server streams text pieces, never token ids, yet exo moves token ids
and decodes them back into text. This converter tokenizes each piece with the
model's own tokenizer as soon as it arrives and checks the result by decoding
it in context, so that decoding all the ids (the way exo's API does, special
tokens skipped) gives the server's text byte for byte: multi-byte characters,
leading spaces, runs of whitespace, even text that looks like a special token.

Why per piece and at once: rkllama sends one piece per generated token (joined
only when a character spans two tokens), so encoding a piece on its own nearly
always gives back the model's token, and nothing later in the answer can change
how an already complete piece decodes. Waiting for more text would only add
latency to every token.

Why the checks and fallbacks: byte-level BPE vocabularies (Qwen, Llama 3,
DeepSeek) concatenate cleanly, but sentencepiece-style ones (Llama 2, Gemma,
MiniCPM, Phi-3) add or strip a leading space depending on where a token
stands. A candidate that does not decode back to the piece is replaced by one
tokenized after an anchor, then by a character-by-character or byte-by-byte
spelling; only if every spelling fails is the closest one used (and counted in
`inexact`, which the tests hold at zero).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from exo_rkllm.models.tokenizer import _byte_decoder, special_ids
from exo_rkllm.runtime.base import CallState

log = logging.getLogger("exo_rkllm.rkllama")

_ANCHORS = ("\n", "a", ".", "0")


@dataclass(frozen=True)
class TokenPiece:
    """One converted token: its id, the text it completes (may be '' inside a character), its state."""

    token_id: int
    text: str
    state: CallState = CallState.NORMAL


@dataclass(frozen=True)
class VocabFacts:
    """What the converter needs to know about a tokenizer besides encode and decode.

    Read once per tokenizer (`VocabFacts.of`, at model load), never per answer: with the
    transformers release legacy exo pins, `len(tokenizer)` alone takes ~20-40 ms and
    `get_vocab()` ~100 ms on Qwen's 150k-entry vocabulary. rkllama (Flask) sends its headers
    together with the first piece, so anything built after the response opens delays the
    first token by that much."""

    special: frozenset[int]
    size: int
    byte_ids: Mapping[int, int]  # byte value -> id of a single-byte token
    spacers: tuple[tuple[int, ...], ...]  # tokens that spell one leading space

    @classmethod
    def of(cls, tokenizer: Any) -> "VocabFacts":
        vocab = tokenizer.get_vocab()
        table: dict[int, int] = {}
        for b in range(256):  # sentencepiece byte fallback (<0xNN>) ...
            tid = vocab.get(f"<0x{b:02X}>")
            if tid is not None:
                table[b] = tid
        if len(table) < 256:  # ... or the GPT-2 byte alphabet of byte-level BPE
            for ch, b in _byte_decoder().items():
                if b not in table and ch in vocab:
                    table[b] = vocab[ch]
        spacers = [(vocab[p],) for p in ("\u2581", "\u0120") if p in vocab]
        plain = tuple(_encode(tokenizer, " "))
        if plain and plain not in spacers:
            spacers.append(plain)
        return cls(special_ids(tokenizer), len(tokenizer), table, tuple(spacers))


def _encode(tokenizer: Any, text: str) -> list[int]:
    try:
        out = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    except TypeError:  # a tokenizer without split_special_tokens
        out = tokenizer.encode(text, add_special_tokens=False)
    return [int(i) for i in out]


def _is_high_surrogate(ch: str) -> bool:
    return "\ud800" <= ch <= "\udbff"


def _join_surrogates(text: str) -> str:
    """A JSON stream may (in theory) carry an emoji as two escaped halves in two objects."""
    if any("\ud800" <= c <= "\udfff" for c in text):
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


class TextToTokens:
    """Converts one answer's streamed text into token ids of `tokenizer`.

    `push(piece)` returns the tokens that piece makes certain (all of them, as a
    rule: a piece is always complete text); `flush()` ends the answer. The
    invariant, checked on every piece: decoding every id returned so far with
    skip_special_tokens=True gives exactly the text pushed so far.

    Pass the tokenizer's `VocabFacts` (read once, at load): building a converter is
    then free, which matters because it is built once the server's answer opens.
    """

    def __init__(self, tokenizer: Any, facts: VocabFacts | None = None) -> None:
        self._tok = tokenizer
        self._facts = facts if facts is not None else VocabFacts.of(tokenizer)
        self.ids: list[int] = []
        self.text = ""  # the text covered by self.ids
        self._safe: list[int] = [0]  # indices of self.ids where the decoded text sits on a piece boundary
        self._held = ""  # a trailing high surrogate waiting for its other half
        self.inexact = 0  # pieces no spelling could reproduce exactly (should stay 0)

    # -- public -------------------------------------------------------------------------------
    def push(self, piece: str) -> list[TokenPiece]:
        if not piece:
            return []
        piece, self._held = self._held + piece, ""
        if _is_high_surrogate(piece[-1]):
            piece, self._held = piece[:-1], piece[-1]
        piece = _join_surrogates(piece)
        if not piece:
            return []
        return self._commit(piece)

    def flush(self) -> list[TokenPiece]:
        """End of the answer: whatever was held back (only a lone surrogate can be)."""
        held, self._held = self._held, ""
        return self._commit("\ufffd") if held else []

    def push_many(self, pieces: Iterable[str]) -> list[TokenPiece]:
        out: list[TokenPiece] = []
        for p in pieces:
            out += self.push(p)
        return out + self.flush()

    # -- internals ----------------------------------------------------------------------------
    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _encode(self, text: str) -> list[int]:
        return _encode(self._tok, text)

    def _window(self) -> list[int]:
        """The committed ids of the last piece (or a few more): new ids are checked decoded after
        them, never as the very first ids (sentencepiece strips a first token's leading space),
        and the window starts where a piece started, never inside a character."""
        n = len(self.ids)
        start = 0
        for s in reversed(self._safe):
            if s < n:
                start = s
                if n - s >= 2 or s == 0:
                    break
        return self.ids[start:]

    def _texts_for(self, window: list[int], cand: list[int]) -> list[str] | None:
        """Per-token texts of `cand` decoded after `window`, or None if they do not spell it cleanly."""
        base = self._decode(window)
        texts: list[str] = []
        done = base
        for k in range(1, len(cand) + 1):
            full = self._decode(window + cand[:k])
            if full.endswith("\ufffd") and k < len(cand):
                texts.append("")  # inside a character: the text comes with a later token
                continue
            if not full.startswith(done):
                return None
            texts.append(full[len(done):])
            done = full
        return texts

    def _check(self, window: list[int], cand: list[int], piece: str) -> list[str] | None:
        special, size = self._facts.special, self._facts.size
        if not cand or any(i in special or i < 0 or i >= size for i in cand):
            return None
        base = self._decode(window)
        full = self._decode(window + cand)
        if not full.startswith(base) or full[len(base):] != piece:
            return None
        texts = self._texts_for(window, cand)
        if texts is None or "".join(texts) != piece:
            return None
        return texts

    def _candidates(self, piece: str, first: bool) -> Iterable[list[int]]:
        found = [self._encode(piece)]
        yield found[0]
        for anchor in _ANCHORS:
            head = self._encode(anchor)
            both = self._encode(anchor + piece)
            if head and both[: len(head)] == head:
                found.append(both[len(head):])
                yield found[-1]
        if first and piece[:1].isspace():
            # Decoders of sentencepiece vocabularies drop the first token's leading space: an
            # answer that starts with one needs an extra space token in front.
            for spacer in self._facts.spacers:
                for cand in found:
                    yield list(spacer) + cand

    def _spell(self, window: list[int], piece: str) -> tuple[list[int], list[str]] | None:
        for cand in self._candidates(piece, first=not window):
            texts = self._check(window, cand, piece)
            if texts is not None:
                return cand, texts
        return None

    def _commit(self, piece: str) -> list[TokenPiece]:
        window = self._window()
        found = self._spell(window, piece)
        if found is None and len(piece) > 1:
            found = self._spell_by_parts(window, piece)
        if found is None:
            found = self._spell_bytes(window, piece)
        if found is None:
            self.inexact += 1
            cand = self._encode(piece) or self._encode(" ")
            cand = [i for i in cand if i not in self._facts.special] or cand
            log.warning("the model's tokenizer cannot reproduce the server's text %r exactly; "
                        "the answer may differ slightly from what rkllama sent", piece[:40])
            texts = [""] * (len(cand) - 1) + [piece]
            found = (cand, texts)
        cand, texts = found
        out = [TokenPiece(i, t, CallState.NORMAL if t else CallState.WAITING) for i, t in zip(cand, texts)]
        self.ids.extend(cand)
        self.text += piece
        self._safe.append(len(self.ids))
        if len(self._safe) > 64:
            del self._safe[1:-32]
        return out

    def _spell_by_parts(self, window: list[int], piece: str) -> tuple[list[int], list[str]] | None:
        """Character by character, each checked after what precedes it."""
        ids: list[int] = []
        texts: list[str] = []
        for ch in piece:
            ctx = window + ids
            got = self._spell(ctx, ch) or self._spell_bytes(ctx, ch)
            if got is None:
                return None
            ids += got[0]
            texts += got[1]
        if self._check(window, ids, piece) is None:
            return None
        return ids, texts

    def _spell_bytes(self, window: list[int], piece: str) -> tuple[list[int], list[str]] | None:
        table = self._facts.byte_ids
        data = piece.encode("utf-8")
        if any(b not in table for b in data):
            return None
        cand = [table[b] for b in data]
        texts = self._check(window, cand, piece)
        return (cand, texts) if texts is not None else None
