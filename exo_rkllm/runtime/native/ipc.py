"""The messages between exo's process and the runtime worker process.

One socket pair, pickled dataclasses, one message per event. Commands carry a
sequence number; replies and generation events carry the number of the command
they answer, so a late event of an aborted generation can never be taken for
one of the next. Token messages are flat (no nested objects) because they are
the only per-token traffic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from exo_rkllm import errors
from exo_rkllm.runtime.base import CallState, FinishEvent, GenerationInput, TokenEvent
from exo_rkllm.runtime.native.backend import NativeSettings
from exo_rkllm.runtime.native.library import RuntimeIdentity


@dataclass
class RemoteError:
    """An exception raised in the worker, by class name (one of exo_rkllm.errors) and message."""

    kind: str
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> "RemoteError":
        if isinstance(exc, errors.RKLLMError):
            return cls(type(exc).__name__, str(exc))
        return cls("GenerationError", f"the runtime worker failed: {exc!r}")

    def exception(self) -> errors.RKLLMError:
        kind = getattr(errors, self.kind, None)
        if not (isinstance(kind, type) and issubclass(kind, errors.RKLLMError)):
            kind = errors.GenerationError
        return kind(self.message)


# -- parent -> worker ---------------------------------------------------------------------------------------
@dataclass
class Configure:
    """First message: which library, which layout, which settings."""

    identity: RuntimeIdentity
    settings: NativeSettings


@dataclass
class Call:
    """A control operation answered by one Reply: load, unload, clear_kv_cache, load_prompt_cache (arg: the
    file's path; value: the KV cache length afterwards), kv_cache_len, embed (arg: an EmbeddingInput; value:
    an EmbedResult), close. A failure comes back as a RemoteError naming its class (PromptCacheError...)."""

    seq: int
    op: str
    arg: Any = None


@dataclass
class Generate:
    """One generation; `inp` travels whole, its per-run sampling, seed, max_new_tokens and
    save_prompt_cache included."""

    seq: int
    inp: GenerationInput


@dataclass
class Abort:
    seq: int  # of the Generate to stop


# -- worker -> parent ---------------------------------------------------------------------------------------
@dataclass
class Hello:
    pid: int
    error: RemoteError | None = None


@dataclass
class Reply:
    seq: int
    value: Any = None
    error: RemoteError | None = None


@dataclass
class EmbedResult:
    """The value of an `embed` Reply: the hidden states (float32 numpy array, tokens x width) and the
    KV cache length after the run (0 once cleared; None where the release cannot tell)."""

    hidden: Any
    kv_len: int | None


@dataclass
class Token:
    seq: int
    token_id: int
    text: str
    state: int
    at: float

    def event(self) -> TokenEvent:
        return TokenEvent(self.token_id, self.text, CallState(self.state), self.at)


@dataclass
class Finished:
    seq: int
    event: FinishEvent
    kv_len: int | None


@dataclass
class Failed:
    seq: int
    error: RemoteError
    kv_len: int | None
