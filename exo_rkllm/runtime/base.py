"""The one protocol every runtime backend implements, and the messages it speaks.

A backend owns one model context on one device and knows nothing of exo: it
loads a model, runs one generation at a time from token ids (or, for servers
that only take chat messages, from messages), and reports what the RKLLM
runtime reports through its callback: one event per token, then a finish.
The scheduler above serialises generations and decides about the KV cache.
"""
from __future__ import annotations

import asyncio
import enum
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Mapping, Protocol, Sequence, TypeVar, Union, runtime_checkable

from exo_rkllm.errors import PromptCacheError


class CallState(enum.IntEnum):
    """LLMCallState of rkllm.h: the same numbers in every runtime release."""

    NORMAL = 0
    WAITING = 1  # the token ends inside a UTF-8 character; its text is held back
    FINISH = 2
    ERROR = 3


@dataclass(frozen=True)
class SamplingParams:
    top_k: int = 1
    top_p: float = 0.9
    temperature: float = 0.8
    repeat_penalty: float = 1.1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


@dataclass(frozen=True)
class ModelSpec:
    """What a backend needs to load one model; built by the catalog."""

    model_id: str
    path: Path
    max_context_len: int
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    tokenizer_dir: Path | None = None
    remote_name: str | None = None  # the model's name on an rkllama server
    options: Mapping[str, str] = field(default_factory=dict)  # remaining Modelfile keys


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: object  # str, or a list of content parts as OpenAI clients send them


@dataclass(frozen=True)
class GenerationInput:
    """One generation. `token_ids` is what must be prefilled now: with
    `keep_history` the runtime appends it to what its KV cache already holds."""

    request_id: str
    token_ids: tuple[int, ...]
    keep_history: bool = False
    max_new_tokens: int = 0  # 0: the model's limit
    messages: tuple[ChatMessage, ...] | None = None  # for backends that template themselves
    tools: tuple[Mapping[str, object], ...] | None = None
    # The request's own sampling, whole (the model's values where the request named none); None:
    # the model's. Only a runtime with `per_run_sampling` can apply it; the others ignore it.
    sampling: SamplingParams | None = None
    seed: int | None = None
    # Where to save the KV state once this run's prefill is done (RKLLMPromptCacheParam): what the
    # cache held before the run (with keep_history) plus `token_ids`, never the answer. Only where
    # `capabilities.prompt_cache`; the scheduler commits the file only after the run has ended.
    save_prompt_cache: str | None = None


@dataclass(frozen=True)
class EmbeddingInput:
    """One text to embed with RKLLM's last-hidden-layer inference mode: `token_ids` for backends
    that take tokens (encoded as plain text: no special token from the text), `text` for servers
    that tokenize themselves."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str = ""


@dataclass(frozen=True)
class EmbeddingOutput:
    """What the runtime gives back: the last hidden layer, one float32 row per input token
    (shape (n_tokens, width)); or, from a server that pools itself (`pooled`), one row."""

    hidden: object  # numpy.ndarray, float32, 2-D
    pooled: bool = False


@dataclass(frozen=True)
class TokenEvent:
    """A token as the runtime's callback reports it (state NORMAL or WAITING)."""

    token_id: int
    text: str
    state: CallState = CallState.NORMAL
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class GenerationStats:
    prefill_tokens: int = 0
    prefill_ms: float = 0.0
    decode_tokens: int = 0
    decode_ms: float = 0.0
    memory_mb: float = 0.0


class FinishKind(enum.Enum):
    """How a generation ended, as the backend that ran it knows it. The scheduler reads this rather
    than guessing from token counts: only the backend knows whether it stopped the runtime itself."""

    STOP = "stop"  # the runtime ended the answer on its own (the model's end-of-answer token)
    LENGTH = "length"  # a token limit (the run's or the model's) or the context ran out: cut short
    ABORTED = "aborted"  # abort() (or the consumer leaving) stopped it before either


@dataclass(frozen=True)
class FinishEvent:
    """The last event of every generation, including an aborted one."""

    stats: GenerationStats = GenerationStats()
    kind: FinishKind = FinishKind.STOP
    at: float = field(default_factory=time.monotonic)

    @property
    def aborted(self) -> bool:
        """Stopped before its end by an abort; a length stop is not an abort."""
        return self.kind is FinishKind.ABORTED


RuntimeEvent = Union[TokenEvent, FinishEvent]


@dataclass(frozen=True)
class Capabilities:
    """What a backend (and the runtime release behind it) can do; the scheduler adapts to it."""

    backend: str
    version: str = ""
    token_input: bool = True  # takes token ids (False: takes chat messages, templates itself)
    keep_history: bool = True
    clear_kv_cache: bool = True
    # GenerationInput.sampling (and seed) reach the runtime per run; otherwise the load's values apply
    per_run_sampling: bool = False
    # the runtime itself stops a run at GenerationInput.max_new_tokens; otherwise the backend aborts it
    # there, so what its KV cache holds afterwards is known only as far as kv_cache_len() reports it
    per_run_max_new_tokens: bool = False
    embeddings: bool = False  # embed() works (last-hidden-layer mode, or a server's embeddings route)
    # GenerationInput.save_prompt_cache and load_prompt_cache() work, and kv_cache_len() reports what a
    # loaded file holds, so every restore can be checked (RKLLM 1.2.1 on: 1.2.0 saves and loads files
    # but cannot say what they hold, and the scheduler reuses only what it knows exactly)
    prompt_cache: bool = False


ProgressFn = Callable[[str, float], None]  # (what is happening, fraction done 0..1)
_R = TypeVar("_R", bound="RuntimeBase")


@runtime_checkable
class Runtime(Protocol):
    """One NPU model context. Not re-entrant: the scheduler runs one generation at a time."""

    capabilities: Capabilities

    @property
    def loaded(self) -> ModelSpec | None: ...

    async def load(self, model: ModelSpec, progress: ProgressFn | None = None) -> None:
        """Load `model`, replacing any loaded one. Raises ModelLoadError with the reason."""

    async def unload(self) -> None: ...

    def generate(self, inp: GenerationInput) -> AsyncIterator[RuntimeEvent]:
        """Run one generation: yields TokenEvents as the runtime emits them, then one
        FinishEvent. Raises GenerationError if the runtime reports ERROR."""

    async def abort(self) -> None:
        """Stop the running generation at once; its iterator then ends with a FinishEvent of kind ABORTED."""

    async def embed(self, inp: EmbeddingInput) -> EmbeddingOutput:
        """The loaded model's last hidden layer for one input (not while a generation runs: the
        scheduler serialises). Raises EmbeddingUnsupported where `capabilities.embeddings` is False.
        It leaves the KV cache in an unknown state: the scheduler clears its bookkeeping."""

    async def clear_kv_cache(self) -> None: ...

    async def load_prompt_cache(self, path: str) -> None:
        """Replace what the KV cache holds by the state a run saved to `path` (rkllm_load_prompt_cache),
        taking time in proportion to its size. Raises PromptCacheError if the runtime refuses the file
        (missing, corrupt, another model or release); the cache then holds nothing known. Only where
        `capabilities.prompt_cache`: the scheduler checks kv_cache_len() against what it saved."""

    def kv_cache_len(self) -> int | None:
        """Tokens the KV cache holds now, as the runtime reports them; None where it cannot tell (no
        model, a release without rkllm_get_kv_cache_size, a server). The scheduler trusts its own
        bookkeeping only as far as this agrees with it."""

    async def close(self) -> None:
        """Release everything (rkllm_destroy); the runtime is unusable afterwards."""

    async def __aenter__(self) -> "Runtime": ...

    async def __aexit__(self, *exc_info: object) -> None:
        """`async with runtime:` closes it on the way out (RuntimeBase gives every backend this)."""


class RuntimeBase:
    """What every backend shares beyond the protocol's own methods: `async with` closes it."""

    async def close(self) -> None:  # pragma: no cover - every backend defines its own
        raise NotImplementedError

    async def load_prompt_cache(self, path: str) -> None:
        """Backends without `capabilities.prompt_cache` (rkllama, RKLLM before 1.2.1) refuse every file."""
        caps = getattr(self, "capabilities", None)
        runtime = " ".join(p for p in (caps.backend, caps.version) if p) if caps is not None else "this"
        raise PromptCacheError(f"the {runtime} runtime cannot restore a saved KV state")

    async def __aenter__(self: "_R") -> "_R":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class EventBridge:
    """Carries events from a runtime thread (the RKLLM callback) to the event loop.

    The callback must never block or raise into C, so it only enqueues through
    `loop.call_soon_threadsafe`; the async side awaits the queue. Sim and native
    backends share this so the simulator exercises the same hand-off.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[RuntimeEvent | BaseException] = asyncio.Queue()
        self._closed = threading.Event()

    def push(self, item: RuntimeEvent | BaseException) -> None:
        """Thread-safe; silently drops items once the consumer has gone."""
        if self._closed.is_set():
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # loop closed
            self._closed.set()

    async def get(self) -> RuntimeEvent | BaseException:
        return await self._queue.get()

    def close(self) -> None:
        self._closed.set()


async def stream_from_thread(target: Callable[[EventBridge], None], stop: Callable[[], None],
                             name: str = "rkllm-run") -> AsyncIterator[RuntimeEvent]:
    """Run `target(bridge)` on its own thread, as the blocking `rkllm_run` must be, and yield what
    it pushes until a FinishEvent (an exception pushed is raised). If the consumer leaves early,
    `stop()` is called (the runtime's abort) and the thread is waited for, so the context is idle
    again before the next generation. Callers that re-yield must close it with
    contextlib.aclosing, or an early exit would wait for garbage collection to stop the run."""
    bridge = EventBridge(asyncio.get_running_loop())
    thread = threading.Thread(target=target, args=(bridge,), name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = await bridge.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, FinishEvent):
                return
    finally:
        bridge.close()
        if thread.is_alive():
            stop()
            await asyncio.to_thread(thread.join)


def utf8_complete_prefix(data: bytes) -> int:
    """Length of the longest prefix of `data` that does not end inside a UTF-8 character.

    This is the rule the RKLLM runtime uses to hold text back (WAITING state).
    """
    n = len(data)
    # Look back at most 3 bytes for the start of the last character.
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b & 0b1100_0000 == 0b1000_0000:  # continuation byte
            continue
        if b < 0x80:
            return n
        need = 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
        return n if back >= need else n - back
    return n


def split_prompt(tokens: Sequence[int], cached: Sequence[int]) -> int:
    """Number of leading tokens of `tokens` already held by a KV cache containing `cached`,
    or -1 if the cache is not a prefix of `tokens` (it must then be cleared)."""
    if len(cached) > len(tokens) or list(tokens[: len(cached)]) != list(cached):
        return -1
    return len(cached)
