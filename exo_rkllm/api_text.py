"""The text exo's API sends for our models: exact, and free of special tokens.

exo decodes each streamed token on its own with `tokenizer.decode([t])`, which
turns a character split over two tokens into two U+FFFD and writes the eos
token's text into the answer. The plugin routes the content of every chunk of
our models through here instead, keeping one incremental decoder per request.
"""
from __future__ import annotations

from typing import Any, Sequence

from .detok import IncrementalDetokenizer


class CompletionText:
    def __init__(self) -> None:
        self._streams: dict[str, IncrementalDetokenizer] = {}

    def chunk(self, request_id: str, tokenizer: Any, tokens: Sequence[int], finished: bool) -> str:
        """Content of one streamed chunk; the concatenation of all chunks equals `full`."""
        detok = self._streams.get(request_id)
        if detok is None:
            detok = self._streams[request_id] = IncrementalDetokenizer(tokenizer)
        text = detok.push_many(int(t) for t in tokens)
        if finished:
            text += detok.flush()
            del self._streams[request_id]
        return text

    @staticmethod
    def full(tokenizer: Any, tokens: Sequence[int]) -> str:
        return tokenizer.decode([int(t) for t in tokens], skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._streams)
