"""Turn a stream of token ids into text exactly, one token at a time.

exo's API decodes every streamed token on its own, which breaks characters
whose bytes span two tokens (CJK, emoji) into U+FFFD and drops the leading
space of sentencepiece tokens. This decoder keeps a small window of ids and
emits text only once it is certain, so the concatenation of its outputs equals
decoding all ids at once, byte for byte (the method of TGI and vLLM).
"""
from __future__ import annotations

from typing import Any, Iterable

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window re-decoded for context
        self._read = 0  # ids before this have been emitted
        self.text = ""  # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it makes certain (often '', when a character is split)."""
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            delta = after[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
            self.text += delta
            return delta
        return ""

    def push_many(self, ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        """At the end of the stream: whatever is still held back (a truly broken tail decodes to U+FFFD)."""
        full = self._decode(self._ids)
        emitted_ctx = self._decode(self._ids[: self._read])
        delta = full[len(emitted_ctx):] if full.startswith(emitted_ctx) else ""
        self._prefix = self._read = len(self._ids)
        self.text += delta
        return delta
