"""The models the engine has built (entry, spec, tokenizer), bounded: least recently used go first.

Any client may name any model folder, and each model built holds its tokenizer (~50 MB of
RSS for a 151k vocabulary): kept forever, twenty folders cost exo 600 MB. So the engine keeps
the models in use (the one on the NPU, those with a request running or waiting, the one being
looked up or served now) plus at most `bound` others (RKLLM_MODEL_CACHE), and drops the least
recently used of the rest. A dropped model is built again, from the same files, when asked for.
Thread-safe: the engine looks models up in worker threads (building one reads files).
"""
from __future__ import annotations

import collections
import threading
from typing import Callable, Generic, Iterable, TypeVar

T = TypeVar("T")


class ModelCache(Generic[T]):
    def __init__(self, bound: int, in_use: Callable[[], Iterable[str]]) -> None:
        self.bound = bound
        self._in_use = in_use  # ids that must stay (read at each trim: the NPU's model, requests...)
        self._items: collections.OrderedDict[str, T] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, model_id: str) -> T | None:
        """The cached model, without counting it as used (the per-token path looks it up)."""
        return self._items.get(model_id)

    def __getitem__(self, model_id: str) -> T:
        return self._items[model_id]

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._items

    def __len__(self) -> int:
        return len(self._items)

    def ids(self) -> list[str]:
        """Least recently used first."""
        with self._lock:
            return list(self._items)

    def touch(self, model_id: str, model: T | None = None) -> list[T]:
        """`model_id` is used now (stored as `model` if given); returns the models dropped to keep the bound."""
        with self._lock:
            if model is not None:
                self._items[model_id] = model
            if model_id in self._items:
                self._items.move_to_end(model_id)
        return self.trim(keep=model_id)

    def trim(self, keep: str | None = None) -> list[T]:
        """Drop the least recently used models not in use until at most `bound` of those remain."""
        pinned = set(self._in_use())
        if keep is not None:
            pinned.add(keep)
        dropped: list[T] = []
        with self._lock:
            idle = [k for k in self._items if k not in pinned]
            for model_id in idle[:max(0, len(idle) - self.bound)]:
                dropped.append(self._items.pop(model_id))
        return dropped
