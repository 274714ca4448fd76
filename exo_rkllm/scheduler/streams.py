"""One RequestStream per exo request: the queue between the NPU and exo's token-by-token calls.

The runtime produces tokens at its own pace; exo consumes them one
`infer_tensor` at a time. The stream decouples the two, records what happened
(for tests, logs and benchmarks), and is the single place a request is ended:
finished, failed, or closed by someone who no longer wants it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import enum
import math
import time
import types
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from exo_rkllm.errors import RequestCancelled
from exo_rkllm.runtime.base import GenerationStats, SamplingParams, TokenEvent

# The request fields that override the model's sampling (SamplingParams' own names); top_k is an integer.
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
_INT_FIELDS = frozenset({"top_k"})


def _number(name: str, value: Any, integer: bool) -> float | int:
    """A finite JSON number (bool is not one); `integer` fields accept only whole numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, not {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite")
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name} must be an integer")
        return int(value)
    return value


@dataclass(frozen=True)
class RunOptions:
    """What a request asked of its generation beyond the prompt; every field optional.

    `sampling` holds only the fields the request named (SAMPLING_FIELDS), so the scheduler can lay them
    over the model's Modelfile values; `max_new_tokens` 0 is the model's limit. Shapes are checked
    here (one place for the API's values and for those a peer sends as JSON): a bad one is a ValueError.
    Lives beside RequestStream rather than in engine.py because the scheduler reads it too."""

    max_new_tokens: int = 0
    sampling: Mapping[str, float | int] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        cap = _number("max_new_tokens", self.max_new_tokens, integer=True)
        if cap < 0:
            raise ValueError("max_new_tokens must be 0 (the model's limit) or more")
        object.__setattr__(self, "max_new_tokens", cap)
        if self.seed is not None:
            object.__setattr__(self, "seed", _number("seed", self.seed, integer=True))
        if self.sampling is not None:
            if not isinstance(self.sampling, Mapping):
                raise ValueError("sampling must be an object of sampling fields")
            unknown = sorted(str(k) for k in self.sampling if k not in SAMPLING_FIELDS)
            if unknown:
                raise ValueError(f"unknown sampling field(s) {', '.join(unknown)}; known: {', '.join(SAMPLING_FIELDS)}")
            fields = {k: _number(k, v, integer=k in _INT_FIELDS) for k, v in self.sampling.items()}
            object.__setattr__(self, "sampling", types.MappingProxyType(fields) if fields else None)

    def to_json(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens,
                "sampling": dict(self.sampling) if self.sampling else None, "seed": self.seed}

    @classmethod
    def from_json(cls, data: Any) -> "RunOptions":
        if not isinstance(data, Mapping):
            raise ValueError("options must be an object")
        unknown = sorted(str(k) for k in data if k not in ("max_new_tokens", "sampling", "seed"))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}")
        return cls(data.get("max_new_tokens", 0), data.get("sampling"), data.get("seed"))


class StreamState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"  # preempted: requeued with its tokens kept; its reader just waits longer
    DONE = "done"  # the runtime finished; unread tokens may remain
    FAILED = "failed"
    CLOSED = "closed"  # abandoned before the end


class FinishReason(enum.Enum):
    """Why a generation that ran to its end stopped (OpenAI's finish_reason values)."""

    STOP = "stop"  # the model ended its answer (an end-of-turn token)
    LENGTH = "length"  # the token limit or the context ran out: the answer is cut short


@dataclass(frozen=True)
class _End:
    pass


_END = _End()


class RequestStream:
    def __init__(self, request_id: str, prompt_tokens: tuple[int, ...], model_id: str,
                 on_close: Callable[["RequestStream"], None] | None = None) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.model_id = model_id
        self.state = StreamState.QUEUED
        self.tokens: list[int] = []  # every token the runtime emitted, in order
        self.text = ""  # the runtime's own text for them
        self.stats: GenerationStats | None = None
        self.finish_reason: FinishReason | None = None  # set when the runtime finished (state DONE)
        self.error: BaseException | None = None
        self.close_reason: str | None = None
        self.created_at = time.monotonic()
        self.started_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.last_read_at = self.created_at
        self.readers = 0
        self.delivered = 0  # tokens exo has taken
        self.prefilled = 0  # tokens the runtime actually had to prefill (after KV reuse), over all runs
        self.reused = 0  # prompt tokens the live KV cache already held (first run)
        self.restored = 0  # prompt tokens restored from a saved KV state (first run)
        self.pauses = 0  # times it was preempted
        self._queue: asyncio.Queue[int | _End | BaseException] = asyncio.Queue()
        self._on_close = on_close

    # -- producer side (the scheduler) ----------------------------------------------------------
    @property
    def open(self) -> bool:
        return self.state in (StreamState.QUEUED, StreamState.RUNNING, StreamState.PAUSED)

    def started(self, prefilled: int, reused: int = 0, restored: int = 0) -> None:
        self.state = StreamState.RUNNING
        self.started_at = time.monotonic()
        self.prefilled, self.reused, self.restored = prefilled, reused, restored

    def pause(self) -> None:
        """Preempted: no token comes until it resumes; what was delivered stays delivered."""
        if self.state is StreamState.RUNNING:
            self.state = StreamState.PAUSED
            self.pauses += 1

    def resumed(self, prefilled: int) -> None:
        """Back on the NPU, continuing the same answer (start and first-token times stay the first run's)."""
        if self.state is StreamState.PAUSED:
            self.state = StreamState.RUNNING
            self.prefilled += prefilled

    def put(self, event: TokenEvent) -> None:
        if self.state is not StreamState.RUNNING:
            return
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.tokens.append(event.token_id)
        self.text += event.text
        self._queue.put_nowait(event.token_id)

    def finish(self, stats: GenerationStats | None, reason: FinishReason = FinishReason.STOP) -> None:
        if not self.open:
            return
        self.stats = stats
        self.finish_reason = reason
        self.state = StreamState.DONE
        self.finished_at = time.monotonic()
        self._queue.put_nowait(_END)

    def fail(self, error: BaseException) -> None:
        if not self.open:
            return
        self.error = error
        self.state = StreamState.FAILED
        self.finished_at = time.monotonic()
        self._queue.put_nowait(error)

    # -- consumer side (the engine) -------------------------------------------------------------
    async def next_token(self) -> int | None:
        """The next token id, or None once the generation has ended. Raises the generation's
        error, or RequestCancelled if the stream was closed."""
        if self.state is StreamState.CLOSED and self._queue.empty():
            raise RequestCancelled(f"request {self.request_id} was cancelled: {self.close_reason}")
        self.readers += 1
        try:
            item = await self._queue.get()
        finally:
            self.readers -= 1
            self.last_read_at = time.monotonic()
        if isinstance(item, _End):
            self._queue.put_nowait(item)  # stay ended for any later reader
            return None
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)
            raise item
        self.delivered += 1
        return item

    def close(self, reason: str) -> None:
        """Abandon the request: wakes its reader, and lets the scheduler abort the NPU work."""
        if self.state in (StreamState.CLOSED,):
            return
        was_open = self.open
        self.close_reason = reason
        self.state = StreamState.CLOSED
        if self.finished_at is None:
            self.finished_at = time.monotonic()
        self._queue.put_nowait(RequestCancelled(f"request {self.request_id} was cancelled: {reason}"))
        if was_open and self._on_close is not None:
            self._on_close(self)

    def idle_for(self, now: float | None = None) -> float:
        """Seconds since exo last read from this stream, 0 while it is waiting on it."""
        if self.readers:
            return 0.0
        return (now or time.monotonic()) - self.last_read_at
