"""Owns the one NPU context: generations run one at a time, the person's first.

exo may have many requests in flight on one node; the NPU runs one generation.
The scheduler queues them (bounded) and serves interactive requests before
background ones (a chat client's title, tag and follow-up tasks), arrival order
among equals. An interactive arrival preempts a running background generation:
the run is aborted at once, the tokens it produced are kept, and it is requeued
to resume later from its prompt plus those tokens; its stream stays open and
never repeats a token, so its client sees one answer. A background request
waiting longer than RKLLM_BACKGROUND_MAX_WAIT (since its arrival) is promoted:
it ranks as interactive by its arrival and is no longer preempted, so it is not
starved. Each run goes to its end or until whoever wanted it lets go (then the
runtime is aborted at once). The scheduler keeps track of what the KV cache
holds, exactly or not at all, so a follow-up turn or a resumed answer only
prefills its new suffix. It also owns every RequestStream, so per-request state
lives in one place and an idle sweep can reclaim what exo forgot.

Embeddings take the same queue: an embedding job waits its turn by the same
ranks, never shares the NPU with a generation, and leaves the KV cache unknown
(RKLLM's last-hidden-layer mode prefills its input), so the next chat clears it.
A background embedding batch gives way to an interactive arrival between two of
its inputs, as a background generation is paused between two tokens.

The KV cache holds one conversation, but conversations interleave (tabs, users, agents). Where the
runtime can (exo_rkllm/scheduler/saved_states.py), a conversation leaving the NPU is saved to disk
first, and a prompt that extends a saved state restores it rather than prefilling it; a long system
prompt is saved once per model for every conversation that starts with it. Which state a prompt
continues is decided on token ids, the longest exact prefix, never guessed from messages.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

from exo_rkllm.config import Config
from exo_rkllm.errors import (ContextOverflow, EmbeddingUnsupported, GenerationError, QueueFull, RequestCancelled, RKLLMError,
                     ShuttingDown)
from exo_rkllm.scheduler.lifecycle import LoadState, LoadStatus
from exo_rkllm.scheduler.prompt_caches import CacheEntry, EntryKind
from exo_rkllm.scheduler.saved_states import SavedStates
from exo_rkllm.runtime.base import (ChatMessage, EmbeddingInput, EmbeddingOutput, FinishEvent, FinishKind, GenerationInput,
                           ModelSpec, Runtime, SamplingParams, TokenEvent, split_prompt)
from exo_rkllm.scheduler.streams import FinishReason, RequestStream, RunOptions, StreamState

log = logging.getLogger("exo_rkllm.scheduler.scheduler")

# Finished runs kept for `GET /v1/rkllm/status` and benchmarks: a few minutes of a busy node, a few KiB.
HISTORY_SIZE = 256
# Ended request ids remembered: exo may step a request a few more times after it ended (its fed-back token
# must not be taken for a new prompt). Far more than the requests exo can have in flight, each a few bytes.
ENDED_SIZE = 1024
# Once conversations take turns on the NPU (one was saved as another took it, or restored), the one on the
# NPU is saved as soon as the NPU has been idle this long, rather than when the next one arrives; for
# this long after the last turn-taking. A single conversation on its own is never saved this way.
IDLE_SAVE_DELAY_S = 0.25
INTERLEAVE_WINDOW_S = 600.0


Realign = Callable[[Sequence[int]], "tuple[int, ...] | None"]


class EndKind(enum.Enum):
    """Why a request left the scheduler (Scheduler.ended): whole, or cut short."""

    ANSWER_COMPLETE = "answer complete"  # the engine handed exo the answer's last token
    FINISHED_BY_EXO = "finished by exo"  # exo ended it itself (its own end of answer or token limit)
    CANCELLED = "cancelled"  # abandoned: a client gone, a peer's cancel, the idle sweep, shutdown


@dataclass(frozen=True)
class RequestEnd:
    """How one request ended, as `Scheduler.cancel` was told; `reason` says why a cancellation happened."""

    kind: EndKind
    reason: str = ""

    @classmethod
    def cancelled(cls, reason: str) -> "RequestEnd":
        return cls(EndKind.CANCELLED, reason)

    @property
    def whole(self) -> bool:
        """Nothing cut the answer short: whoever reads it may take it as complete."""
        return self.kind is not EndKind.CANCELLED

    def __str__(self) -> str:
        """The stream's close reason, as logs and error messages show it."""
        return self.reason or self.kind.value


ANSWER_COMPLETE = RequestEnd(EndKind.ANSWER_COMPLETE)
FINISHED_BY_EXO = RequestEnd(EndKind.FINISHED_BY_EXO)
SHUTDOWN = RequestEnd.cancelled("shutdown")
IDLE_TIMEOUT = RequestEnd.cancelled("idle timeout")


class RunOutcome(str, enum.Enum):
    """How a request's (or an embedding batch's) time on the scheduler ended: RunSummary.outcome and the
    log line. A str enum, so the status route's JSON keeps the plain values ("done", "cancelled"...)."""

    DONE = "done"  # ran to its end (the model's, or a token limit)
    ABORTED = "aborted"  # the runtime stopped it before its end, not at our asking: no answer
    FAILED = "failed"  # the runtime (or loading the model) failed
    CANCELLED = "cancelled"  # whoever wanted it let go first
    PAUSED = "paused"  # an embedding batch gave way to a request that outranks it (it resumes later)


@dataclass(frozen=True)
class _Plan:
    """How the next run of a job uses the KV cache (Scheduler._plan)."""

    prompt: tuple[int, ...]  # the whole prompt as this run has it (a resumed job: with what it produced)
    feed: tuple[int, ...]  # what the runtime must prefill now
    keep_history: bool  # append to the cache rather than start from an empty one
    clear_first: bool  # clear the cache before the run (it holds something else)
    restore: CacheEntry | None = None  # load this saved state first: `prompt` begins with its ids
    save_prefix: int = 0  # first save the prompt's first this many tokens (a shared system prompt)

    @property
    def reused(self) -> int:
        """Prompt tokens the live cache already holds (0 when it is cleared or replaced)."""
        if not self.keep_history or self.clear_first or self.restore is not None:
            return 0
        return len(self.prompt) - len(self.feed)

    @property
    def restored(self) -> int:
        return self.restore.tokens if self.restore is not None else 0

    @property
    def displaces(self) -> bool:
        """What the cache holds now is lost by this plan."""
        return self.clear_first or self.restore is not None or self.save_prefix > 0 or not self.keep_history


class Priority(enum.Enum):
    """Who waits for a request: a person reading it as it streams, or a client's background task."""

    INTERACTIVE = "interactive"
    BACKGROUND = "background"


@dataclass
class _Job:
    stream: RequestStream
    spec: ModelSpec
    stop_ids: frozenset[int]
    messages: tuple[ChatMessage, ...] | None = None
    tools: tuple[Any, ...] | None = None
    max_new_tokens: int = 0
    realign: Realign | None = None  # same text as the prompt, but extending the cached tokens
    priority: Priority = Priority.INTERACTIVE
    seq: int = 0  # arrival order
    sampling: SamplingParams | None = None  # the request's fields over the model's; None: the model's
    seed: int | None = None
    prompt_run: tuple[int, ...] | None = None  # the prompt as its first run fed it (None: never ran)
    done: list[int] = field(default_factory=list)  # tokens produced by runs before a preemption
    preempt: bool = False  # set while the running generation is being aborted to make room
    preemptions: int = 0
    prefix_len: int = 0  # the prompt's first tokens shared by other conversations (its system prompt)
    end_of_turn: int | None = None  # the token a template writes after an answer (the model's eos)
    prefix_tried: bool = False  # saving the prefix was attempted (once per request)

    @property
    def open(self) -> bool:
        return self.stream.open

    @property
    def created_at(self) -> float:
        return self.stream.created_at

    @property
    def label(self) -> str:
        return self.stream.request_id


@dataclass
class _EmbedJob:
    """Inputs to embed with one model, in order; `result` gets every output or the first error."""

    spec: ModelSpec
    inputs: tuple[EmbeddingInput, ...]
    result: "asyncio.Future[list[EmbeddingOutput]]"
    priority: Priority = Priority.INTERACTIVE
    seq: int = 0
    created_at: float = field(default_factory=time.monotonic)
    outputs: list[EmbeddingOutput] = field(default_factory=list)  # done so far (a paused batch keeps them)
    pauses: int = 0

    @property
    def open(self) -> bool:
        """Nobody waits any more once the caller's await was cancelled (the future with it)."""
        return not self.result.done()

    @property
    def label(self) -> str:
        return self.inputs[0].request_id if self.inputs else "embedding"


_Work = Union[_Job, _EmbedJob]


def merge_sampling(model: SamplingParams, request: Mapping[str, float | int] | None) -> SamplingParams | None:
    """The request's sampling fields laid over the model's; None when the request named none."""
    if not request:
        return None
    return dataclasses.replace(model, **RunOptions(sampling=request).sampling or {})


@dataclass(frozen=True)
class RunSummary:
    """One finished generation, kept (bounded) for `exo-rkllm` stats and benchmarks."""

    request_id: str
    model_id: str
    prompt_tokens: int
    prefilled: int
    generated: int
    queued_s: float
    ttft_s: float | None
    total_s: float
    outcome: RunOutcome
    priority: str = Priority.INTERACTIVE.value
    preemptions: int = 0
    decode_s: float | None = None  # first token to the end of the last run
    detail: str = ""  # what was cancelled by (the close reason) or what failed ("model load")
    reused: int = 0  # prompt tokens the live KV cache held
    restored: int = 0  # prompt tokens restored from a saved KV state

    @property
    def described(self) -> str:
        """The outcome as the log line says it: `cancelled (idle timeout)`."""
        return f"{self.outcome.value} ({self.detail})" if self.detail else self.outcome.value


class Scheduler:
    def __init__(self, runtime: Runtime, config: Config) -> None:
        self.runtime = runtime
        self.config = config
        self.streams: dict[str, RequestStream] = {}
        self.history: collections.deque[RunSummary] = collections.deque(maxlen=HISTORY_SIZE)
        # Recently ended request ids (bounded): exo may still step a request after we ended it,
        # and its fed-back token must not be mistaken for a new prompt.
        self.ended: collections.OrderedDict[str, RequestEnd] = collections.OrderedDict()  # request id -> how
        self._queue: list[_Work] = []  # arrival order; `_pop_next` picks by priority
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._device = asyncio.Lock()
        self._running: _Job | None = None
        self._embedding: _EmbedJob | None = None  # the embedding batch on the NPU
        self._sampling_noted: set[str] = set()  # models whose fixed sampling was logged
        self._kv: list[int] | None = []  # what the KV cache holds; None when unknown
        # the token that follows `_kv` in its conversation's next prompt (an answer's unfed last token, or
        # the end of its turn): a state worth saving is `_kv` plus it, prefilled by a run of its own
        self._kv_next: int | None = None
        self.saved = SavedStates(runtime, config)
        self._interleaved_at = -INTERLEAVE_WINDOW_S  # the last time a conversation left the NPU or came back
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # -- requests --------------------------------------------------------------------------------
    def submit(self, request_id: str, spec: ModelSpec, prompt_tokens: Sequence[int], *,
               stop_ids: frozenset[int] = frozenset(), messages: tuple[ChatMessage, ...] | None = None,
               tools: tuple[Any, ...] | None = None, max_new_tokens: int = 0,
               realign: Realign | None = None, priority: Priority = Priority.INTERACTIVE,
               sampling: Mapping[str, float | int] | None = None, seed: int | None = None,
               prefix_len: int = 0, end_of_turn: int | None = None) -> RequestStream:
        """Queue a generation; returns its stream at once. Raises QueueFull / ContextOverflow
        (ValueError for a malformed `sampling`).

        `realign(cached_tokens)` may return the prompt's text tokenized so that it extends the
        cache: a follow-up turn re-tokenizes the previous answer, which does not always give
        back the tokens the model generated, and would otherwise cost a full prefill.
        `sampling` holds the fields the request named; they are laid over the model's values and
        every run of the request (a resume too) gets the same whole SamplingParams and `seed`. A
        runtime that fixes sampling at load time ignores them (`applies_request_sampling`).
        `prefix_len` counts the prompt's first tokens that other conversations share (its system
        prompt): saved once, restored for each of them. `end_of_turn` is the token the chat template
        writes after an answer, so a conversation leaving the NPU is saved as its next turn begins."""
        if self._closed:
            raise RequestCancelled("the engine is shutting down")
        if request_id in self.streams:
            raise GenerationError(f"request {request_id} already has a generation")
        merged = merge_sampling(spec.sampling, sampling)
        self._check_room()
        prompt = tuple(int(t) for t in prompt_tokens)
        if not prompt and self.runtime.capabilities.token_input:
            raise GenerationError("empty prompt")
        if len(prompt) >= spec.max_context_len:
            raise ContextOverflow(f"the prompt is {len(prompt)} tokens but {spec.model_id} has a context of "
                                  f"{spec.max_context_len} tokens (at least one must remain for the answer); "
                                  "shorten the conversation or use a model converted with a longer context")
        self._start()
        stream = RequestStream(request_id, prompt, spec.model_id, on_close=self._on_stream_closed)
        self.streams[request_id] = stream
        job = _Job(stream, spec, stop_ids, messages, tools, max_new_tokens, realign, priority, next(self._seq),
                   sampling=merged, seed=seed, prefix_len=max(0, min(int(prefix_len), len(prompt))),
                   end_of_turn=end_of_turn)
        if (merged is not None or seed is not None) and not self.applies_request_sampling:
            self._note_fixed_sampling(spec)
        self._queue.append(job)
        self._wakeup.set()
        position = len(self._queue) + (1 if self._running else 0)
        log.debug("request %s queued (%s, position %d, %d prompt tokens)", request_id, priority.value, position,
                  len(prompt))
        self._maybe_preempt(job)
        return stream

    def _check_room(self) -> None:
        waiting = sum(1 for j in self._queue if j.open)
        if waiting >= self.config.max_queue:
            raise QueueFull(f"{waiting} requests are already waiting for the NPU (RKLLM_MAX_QUEUE="
                            f"{self.config.max_queue}); retry later")

    @property
    def applies_request_sampling(self) -> bool:
        """The runtime takes sampling (and a seed) per run; otherwise the values it loaded the model with apply."""
        return self.runtime.capabilities.per_run_sampling

    def _note_fixed_sampling(self, spec: ModelSpec) -> None:
        """One line per model, not per request: the API tells each client itself."""
        if spec.model_id in self._sampling_noted:
            return
        self._sampling_noted.add(spec.model_id)
        caps = self.runtime.capabilities
        log.warning("%s: runtime %s %s fixes sampling at load time; the Modelfile's values apply", spec.model_id,
                    caps.backend, caps.version or "(version unknown)")

    def get(self, request_id: str) -> RequestStream | None:
        return self.streams.get(request_id)

    def cancel(self, request_id: str, end: RequestEnd) -> bool:
        """Let go of a request (abort it if it is on the NPU) and forget it, remembering how it ended.
        True if it was known."""
        stream = self.streams.pop(request_id, None)
        if stream is None:
            return False
        stream.close(str(end))
        self.ended[request_id] = end
        while len(self.ended) > ENDED_SIZE:
            self.ended.popitem(last=False)
        return True

    @property
    def queued(self) -> int:
        return sum(1 for j in self._queue if j.open)

    @property
    def running_request(self) -> str | None:
        return self._running.stream.request_id if self._running else None

    @property
    def kv_tokens(self) -> tuple[int, ...] | None:
        return tuple(self._kv) if self._kv is not None else None

    @property
    def on_npu(self) -> str | None:
        """What runs on the NPU now: a request's id or an embedding batch's label."""
        work = self._running or self._embedding
        return work.label if work is not None else None

    @property
    def waiting(self) -> tuple[str, ...]:
        """The requests (and embedding batches) waiting for the NPU, in arrival order."""
        return tuple(j.label for j in self._queue if j.open)

    def held(self) -> dict[str, list[tuple[int, ...]]]:
        """Per model, the token sequences whose KV state this node holds: the live cache, then the
        saved states (what a request extending one of them would not prefill again)."""
        out = self.saved.held()
        loaded = self.runtime.loaded
        if loaded is not None and self._kv:
            out[loaded.model_id] = [tuple(self._kv), *out.get(loaded.model_id, [])]
        return out

    # -- priorities ------------------------------------------------------------------------------
    def _interactive(self, job: _Work, now: float) -> bool:
        """Ranks as interactive: asked as such, or a background request past the starvation bound."""
        return (job.priority is Priority.INTERACTIVE
                or now - job.created_at >= self.config.background_max_wait)

    def _rank(self, job: _Work, now: float) -> tuple[int, int]:
        return (0 if self._interactive(job, now) else 1, job.seq)

    def _pop_next(self) -> _Work | None:
        """The open job to run next: interactive before background, then arrival order."""
        self._queue = [j for j in self._queue if j.open]
        if not self._queue:
            return None
        now = time.monotonic()
        job = min(self._queue, key=lambda j: self._rank(j, now))
        self._queue.remove(job)
        return job

    def _outranked(self, job: _Work) -> bool:
        """A queued job would run before `job` (it arrived while `job`'s model was loading)."""
        now = time.monotonic()
        return any(j.open and self._rank(j, now) < self._rank(job, now) for j in self._queue)

    def _maybe_preempt(self, arrival: _Work) -> None:
        """An interactive arrival pauses a background generation; never an interactive one, nor a
        background one past its starvation bound (it ranks as interactive then). Resuming feeds the
        generated tokens back, so a backend that takes only chat messages is never preempted."""
        running, now = self._running, time.monotonic()
        if (running is None or not self.runtime.capabilities.token_input or running.preempt or not running.stream.open
                or not self._interactive(arrival, now) or self._interactive(running, now)):
            return
        running.preempt = True
        log.debug("request %s (background) paused for interactive request %s", running.stream.request_id,
                  arrival.label)
        asyncio.ensure_future(self._abort(running))

    # -- embeddings ------------------------------------------------------------------------------
    async def embed(self, spec: ModelSpec, inputs: Sequence[EmbeddingInput],
                    priority: Priority = Priority.INTERACTIVE) -> list[EmbeddingOutput]:
        """The last hidden layer for each input, in order, as one job in the generations' queue.

        It waits its turn by the same ranks (an interactive one pauses a background generation),
        loads `spec` if needed, and runs the inputs one after another; a background batch gives
        way between two inputs to a request that outranks it. Raises EmbeddingUnsupported,
        ContextOverflow (an input longer than the context), QueueFull, or what the runtime raised;
        nothing else in the queue is disturbed. Cancelling the caller drops the job."""
        if self._closed:
            raise RequestCancelled("the engine is shutting down")
        caps = self.runtime.capabilities
        if not caps.embeddings:
            runtime = " ".join(p for p in (caps.backend, caps.version) if p)
            raise EmbeddingUnsupported(f"the {runtime} runtime cannot give embeddings (RKLLM's last-hidden-layer mode)")
        items = tuple(inputs)
        if not items:
            raise ValueError("there is nothing to embed")
        for inp in items:
            if not inp.token_ids and (caps.token_input or not inp.text):
                raise ValueError(f"embedding input {inp.request_id} is empty")
            if len(inp.token_ids) > spec.max_context_len:
                raise ContextOverflow(f"an input to embed is {len(inp.token_ids)} tokens but {spec.model_id} has a "
                                      f"context of {spec.max_context_len} tokens; shorten or split it")
        self._check_room()
        self._start()
        job = _EmbedJob(spec, items, asyncio.get_running_loop().create_future(), priority, next(self._seq))
        self._queue.append(job)
        self._wakeup.set()
        log.debug("embedding %s queued (%s, %d input(s))", job.label, priority.value, len(items))
        self._maybe_preempt(job)
        return await job.result

    async def _run_embed(self, job: _EmbedJob) -> None:
        """With the device held: run the job's remaining inputs. The runtime prefills each one into
        its KV cache, so what the cache holds is unknown from the first one on."""
        self._embedding, started = job, time.monotonic()
        await self._save_leaving()
        self._kv = None
        outcome, detail = RunOutcome.DONE, ""
        try:
            while len(job.outputs) < len(job.inputs):
                if not job.open:
                    outcome = RunOutcome.CANCELLED
                    return
                if job.outputs and self._outranked(job):
                    job.pauses += 1
                    self._queue.append(job)  # keeps its arrival rank and what it has done
                    outcome = RunOutcome.PAUSED
                    return
                job.outputs.append(await self.runtime.embed(job.inputs[len(job.outputs)]))
        except RKLLMError as exc:
            outcome, detail = RunOutcome.FAILED, str(exc)
            if not job.result.done():
                job.result.set_exception(exc)
        except Exception as exc:  # a backend bug fails this job, not the worker
            log.exception("runtime failure embedding %s", job.label)
            outcome = RunOutcome.FAILED
            if not job.result.done():
                job.result.set_exception(GenerationError(f"the runtime failed to embed: {exc!r}"))
        else:
            if not job.result.done():
                job.result.set_result(list(job.outputs))
        finally:
            self._embedding = None
            log.log(logging.DEBUG if outcome is RunOutcome.PAUSED else logging.INFO,
                    "embedding %s %s: model %s, %s, %d/%d input(s), %d tokens, queued %.2f s, ran %.2f s%s",
                     job.label, f"{outcome.value} ({detail})" if detail else outcome.value, job.spec.model_id, job.priority.value, len(job.outputs), len(job.inputs),
                     sum(len(i.token_ids) for i in job.inputs), started - job.created_at,
                     time.monotonic() - started, f", paused {job.pauses}x" if job.pauses else "")

    # -- models ----------------------------------------------------------------------------------
    async def preload(self, spec: ModelSpec) -> None:
        """Load a model ahead of its first request (exo announces prompts before running them;
        RKLLM_PRELOAD and POST /v1/rkllm/load come here too)."""
        async with self._device:
            await self._ensure_loaded(spec)

    async def _ensure_loaded(self, spec: ModelSpec) -> None:
        self._used_at = time.monotonic()
        current = self.runtime.loaded
        if current == spec:  # the same model with the same settings (a changed Modelfile loads it again)
            return
        if current is not None:  # one model at a time: give the NPU's memory back before the next one loads
            await self._unload_runtime(current)
        log.info("loading %s from %s (context %d) on the %s runtime...", spec.model_id, spec.path,
                 spec.max_context_len, self.runtime.capabilities.backend)
        state = self._load = LoadState(spec.model_id)
        last = [-1.0]

        def progress(what: str, fraction: float) -> None:
            state.report(what, fraction)
            if fraction - last[0] >= 0.25 or fraction >= 1.0:
                last[0] = fraction
                log.info("  %s: %3.0f%%", what, fraction * 100)

        self._kv = None
        try:
            await self.runtime.load(spec, progress)
        except BaseException as exc:
            state.finish(LoadStatus.FAILED, str(exc) or type(exc).__name__)
            raise
        self._kv, self._kv_next = [], None
        state.finish(LoadStatus.LOADED)
        log.info("%s ready in %.1f s", spec.model_id, state.as_dict()["elapsed_s"])
        await self.saved.open(spec)  # its saved states, before the request that loaded it runs (device held)

    # -- lifecycle (exo_rkllm/scheduler/lifecycle.py drives these) ---------------------------------------
    _load: LoadState | None = None  # the last load or unload started
    _used_at: float = 0.0  # when a request last asked for the NPU (monotonic)

    @property
    def load_state(self) -> LoadState | None:
        return self._load

    @property
    def used_at(self) -> float:
        return self._used_at

    @property
    def busy(self) -> bool:
        """A request is running, waiting, or paused (a finished one whose tokens exo still reads is not)."""
        return (self._running is not None or self._embedding is not None
                or any(s.open for s in list(self.streams.values())) or any(j.open for j in self._queue))

    async def unload(self, idle_since: float | None = None) -> bool:
        """Unload the model on the NPU; False if there is none, or a request has come (or, with
        `idle_since`, one asked for the NPU after that time): the request keeps its model."""
        async with self._device:
            current = self.runtime.loaded
            if current is None or self._closed or self.busy:
                return False
            if idle_since is not None and self._used_at > idle_since:
                return False
            await self._unload_runtime(current)
            return True

    async def _unload_runtime(self, current: ModelSpec) -> None:
        """With the device held: the runtime lets go of `current` (rkllm_destroy on the native backend)."""
        await self._save_leaving()  # a model switch or an idle unload: the conversation can come back
        self.saved.close()
        state = self._load = LoadState(current.model_id, LoadStatus.UNLOADING)
        self._kv, self._kv_next = None, None
        try:
            await self.runtime.unload()
        except BaseException as exc:
            state.finish(LoadStatus.FAILED, f"unload failed: {exc}")
            raise
        self._kv = []
        state.finish(LoadStatus.UNLOADED)
        log.info("unloaded %s from the %s runtime", current.model_id, self.runtime.capabilities.backend)

    # -- the worker ------------------------------------------------------------------------------
    def _start(self) -> None:
        if self._tasks:
            return
        self._tasks = [asyncio.create_task(self._worker(), name="rkllm-scheduler"),
                       asyncio.create_task(self._sweeper(), name="rkllm-idle-sweep")]

    async def _worker(self) -> None:
        while not self._closed:
            job = self._pop_next()
            if job is None:
                self._wakeup.clear()
                if self._idle_save_due():
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), IDLE_SAVE_DELAY_S)
                    except asyncio.TimeoutError:
                        await self._save_while_idle()
                    continue
                await self._wakeup.wait()
                continue
            async with self._device:
                try:
                    await self._ensure_loaded(job.spec)
                except RKLLMError as exc:
                    log.error("cannot load %s: %s", job.spec.model_id, exc)
                    self._fail_load(job, exc)
                    continue
                except Exception as exc:  # a backend bug must not kill the worker
                    log.exception("loading %s failed", job.spec.model_id)
                    self._fail_load(job, GenerationError(f"loading {job.spec.model_id} failed: {exc!r}"))
                    continue
                if not job.open:  # cancelled while its model loaded
                    if isinstance(job, _Job):
                        self._record(job, RunOutcome.CANCELLED, job.stream.close_reason or "")
                elif self._outranked(job):
                    self._queue.append(job)  # keeps its arrival rank
                elif isinstance(job, _EmbedJob):
                    await self._run_embed(job)
                else:
                    await self._run(job)

    def _fail_load(self, job: _Work, exc: RKLLMError) -> None:
        if isinstance(job, _EmbedJob):
            if not job.result.done():
                job.result.set_exception(exc)
            return
        job.stream.fail(exc)
        self._record(job, RunOutcome.FAILED, "model load")

    def _plan(self, job: _Job) -> _Plan:
        """What the job's next run prefills and how it uses the KV cache: continue what the cache holds,
        restore a saved state that spares more, or start from an empty cache (saving the prompt's shared
        prefix first, once per model).

        A resumed job runs its first prompt plus the tokens it already produced: greedy decoding
        continues from there as if it had never stopped."""
        resumed = job.prompt_run is not None
        prompt = job.prompt_run + tuple(job.done) if job.prompt_run is not None else job.stream.prompt_tokens
        caps = self.runtime.capabilities
        if not caps.token_input or not caps.keep_history:
            return _Plan(prompt, prompt, keep_history=False, clear_first=False)
        realign = job.realign if not resumed else None
        live = self._live_plan(job, prompt, realign)
        match = self.saved.match(prompt, realign, live.reused if live else 0)
        if match is not None and len(match.prompt) < job.spec.max_context_len:
            n = match.entry.tokens
            return _Plan(match.prompt, match.prompt[n:], keep_history=True, clear_first=False, restore=match.entry)
        if live is not None:
            return live
        if not caps.clear_kv_cache:
            return _Plan(prompt, prompt, keep_history=False, clear_first=False)
        save_prefix = (job.prefix_len if not resumed and not job.prefix_tried
                       and self.saved.wants_prefix(prompt, job.prefix_len, 0) else 0)
        return _Plan(prompt, prompt, keep_history=True, clear_first=self._kv != [], save_prefix=save_prefix)

    def _live_plan(self, job: _Job, prompt: tuple[int, ...], realign: Realign | None) -> _Plan | None:
        """Continue what the live KV cache holds, if the prompt (or its realigned tokens) extends it."""
        if not self.config.kv_reuse or not self._kv:
            return None
        reused = split_prompt(prompt, self._kv)
        if 0 < reused < len(prompt):
            return _Plan(prompt, prompt[reused:], keep_history=True, clear_first=False)
        aligned = realign(self._kv) if realign is not None else None
        if aligned and 0 < split_prompt(aligned, self._kv) < len(aligned) < job.spec.max_context_len:
            return _Plan(aligned, aligned[len(self._kv):], keep_history=True, clear_first=False)
        return None

    async def _prepare(self, job: _Job) -> _Plan:
        """With the device held, before the job's run: carry out its plan's KV steps, in this order. What
        the cache held is saved first if the plan loses it. A shared prefix is saved by a run of its own,
        which leaves exactly that prefix in the cache for the job to continue (or, if the runtime cannot
        say so, the prefix is restored from the file just written). A saved state is restored only if the
        runtime then holds exactly its tokens; a refused one is dropped and the job planned again. Each
        step plans again on what the cache holds after it."""
        plan = self._plan(job)
        if plan.displaces and await self._save_leaving(plan.restore):
            plan = self._plan(job)  # the save ran the runtime: plan on what the cache holds now
        if plan.save_prefix:
            job.prefix_tried = True
            if plan.clear_first:
                await self.runtime.clear_kv_cache()
                self._kv = []
            prefix = plan.prompt[:plan.save_prefix]
            result = await self.saved.save(prefix, True, prefix, EntryKind.PREFIX)
            self._kv, self._kv_next = result.kv, None
            plan = self._plan(job)
        for _ in range(3):  # each refused state is gone from the store: the next plan differs
            if plan.restore is None:
                return plan
            if await self.saved.restore(plan.restore):
                self._kv, self._kv_next = list(plan.restore.ids), None
                if plan.restore.kind is EntryKind.CONVERSATION:
                    self._interleaved_at = time.monotonic()
                return plan
            self._kv, self._kv_next = None, None
            plan = self._plan(job)
        if plan.restore is not None:  # refused again and again: prefill this one
            plan = _Plan(plan.prompt, plan.prompt, keep_history=True, clear_first=True)
        return plan

    def _idle_save_due(self) -> bool:
        """Conversations have been taking turns on the NPU lately, and the one it holds is not saved yet:
        save it while nobody waits, so the next conversation's turn does not wait for that."""
        return time.monotonic() - self._interleaved_at < INTERLEAVE_WINDOW_S and self._leaving_state() is not None

    async def _save_while_idle(self) -> None:
        async with self._device:
            if not self._closed and not any(j.open for j in self._queue) and self._running is None:
                await self._save_leaving(idle=True)

    def _leaving_state(self, restoring: CacheEntry | None = None) -> tuple[int, ...] | None:
        """The conversation the KV cache holds, as its next turn would begin (what the cache holds plus the
        token that follows: an answer's end of turn), if it is worth saving: known, long enough, not
        saved yet, and not continued by the state about to be restored."""
        if self._kv is None or self._kv_next is None:
            return None
        ids = tuple(self._kv) + (self._kv_next,)
        if not self.saved.worth_saving(ids) or (restoring is not None and restoring.ids[:len(ids)] == ids):
            return None
        return ids

    async def _save_leaving(self, restoring: CacheEntry | None = None, *, idle: bool = False) -> bool:
        """Save the conversation the KV cache holds before it is lost (`_leaving_state`); True if a save
        ran (the cache then holds that state, or nothing known)."""
        ids = self._leaving_state(restoring)
        if ids is None:
            return False
        if not idle:
            self._interleaved_at = time.monotonic()
        result = await self.saved.save(ids[-1:], True, ids, EntryKind.CONVERSATION)
        self._kv, self._kv_next = result.kv, None
        return True

    def _following(self, job: _Job, ran: Sequence[int], kind: FinishKind | None) -> int | None:
        """The token after what the cache holds in this conversation's next prompt: the first one the run
        produced that was never fed back (a reported end of answer, a length stop's last token), else,
        after an answer that ended on its own, the template's end of turn."""
        if self._kv is None:
            return None
        n = len(self._kv)
        if n < len(ran):
            return int(ran[n])
        return job.end_of_turn if kind is FinishKind.STOP else None

    async def _run(self, job: _Job) -> None:
        stream = job.stream
        try:
            plan = await self._prepare(job)
        except Exception:  # a bug in saving or restoring must cost this request its cache, never its answer
            log.exception("request %s: preparing the KV cache failed; prefilling the whole prompt", stream.request_id)
            self._kv, self._kv_next = None, None
            whole = job.prompt_run + tuple(job.done) if job.prompt_run is not None else stream.prompt_tokens
            plan = _Plan(whole, whole, keep_history=True, clear_first=True)
        if not stream.open:  # let go of while its KV state was being prepared
            self._record(job, RunOutcome.CANCELLED, stream.close_reason or "")
            return
        prompt, feed, keep = plan.prompt, plan.feed, plan.keep_history
        if plan.clear_first:
            await self.runtime.clear_kv_cache()
            self._kv = []
        resumed = job.prompt_run is not None
        if not resumed:
            job.prompt_run = prompt
        inp = GenerationInput(stream.request_id, feed, keep_history=keep, max_new_tokens=self._run_cap(job),
                              messages=job.messages, tools=job.tools, sampling=job.sampling, seed=job.seed)
        self._running = job
        if resumed:
            stream.resumed(prefilled=len(feed))
        else:
            stream.started(prefilled=len(feed), reused=plan.reused, restored=plan.restored)
        log.debug("request %s on the NPU: prefill %d tokens (%d reused from the KV cache, %d restored from disk)",
                  stream.request_id, len(feed), plan.reused, plan.restored)
        self._kv, self._kv_next = None, None  # unknown until the run ends cleanly
        emitted: list[int] = []
        finish: FinishEvent | None = None
        outcome = RunOutcome.DONE
        limit, over = self._limit(job, prompt), False
        try:
            async for event in self.runtime.generate(inp):
                if isinstance(event, TokenEvent):
                    if len(emitted) >= limit:  # a runtime that cannot be told this request's cap (rkllama,
                        if not over:  # older releases): its tokens past the cap are never shown; stop it
                            over = True
                            await self._abort(job)
                        continue
                    emitted.append(event.token_id)
                    stream.put(event)
                else:
                    finish = event
        except RKLLMError as exc:
            outcome = RunOutcome.FAILED
            stream.fail(exc)
        except Exception as exc:
            outcome = RunOutcome.FAILED
            log.exception("runtime failure in request %s", stream.request_id)
            stream.fail(GenerationError(f"the runtime failed: {exc!r}"))
        else:
            kind = self._finish_kind(job, finish, emitted, over)
            if kind is FinishKind.ABORTED:
                if job.preempt and stream.open:
                    self._pause(job, prompt, emitted, keep)
                    return
                outcome = RunOutcome.ABORTED
                if finish is not None and keep:
                    self._kv = self._kv_after_abort(prompt, emitted)
                    self._kv_next = self._following(job, prompt + tuple(emitted), None)
                # no-op when the stream was closed (the abort was ours); otherwise it is no answer
                stream.fail(GenerationError("the runtime stopped the generation before it finished "
                                            f"({len(emitted)} tokens generated)"))
            else:
                reason = FinishReason.LENGTH if kind is FinishKind.LENGTH else FinishReason.STOP
                stream.finish(finish.stats if finish is not None else None, reason)
                if keep and finish is not None:
                    self._kv = (self._kv_after_abort(prompt, emitted) if self._stopped_by_abort(inp, emitted, over)
                                else self._kv_after(job, prompt, emitted, kind))
                    self._kv_next = self._following(job, prompt + tuple(emitted), kind)
        finally:
            self._running = None
            job.preempt = False
        detail = ""
        if stream.state is StreamState.CLOSED:
            outcome, detail = RunOutcome.CANCELLED, stream.close_reason or ""
        job.done.extend(emitted)
        self._record(job, outcome, detail)

    @staticmethod
    def _finish_kind(job: _Job, finish: FinishEvent | None, emitted: list[int], over: bool) -> FinishKind:
        """How the run ended: as its backend reports it, but a length stop when the scheduler itself
        stopped it at the request's cap (the runtime then reports an abort), and the model's own end
        when its last token is an end-of-answer token (a runtime that reports that token may count
        it towards a limit it reached at the same moment). No FinishEvent at all is an abort."""
        if over:
            return FinishKind.LENGTH
        kind = finish.kind if finish is not None else FinishKind.ABORTED
        if kind is FinishKind.LENGTH and emitted and emitted[-1] in job.stop_ids:
            return FinishKind.STOP
        return kind

    def _stopped_by_abort(self, inp: GenerationInput, emitted: list[int], over: bool) -> bool:
        """A length stop that was an abort underneath: ours (`over`), or the backend's own on a runtime
        that cannot be told a run's token limit (`per_run_max_new_tokens` False), which it stops with
        rkllm_abort once the run has its tokens. The runtime may then have fed tokens nobody saw, so the
        cache is known only as far as it reports its length."""
        if over:
            return True
        caps = self.runtime.capabilities
        return (not caps.per_run_max_new_tokens and inp.max_new_tokens > 0
                and len(emitted) >= inp.max_new_tokens)

    def _run_cap(self, job: _Job) -> int:
        """max_new_tokens for this run: the request's own (0: the model's), less what earlier runs made."""
        if not job.done:
            return job.max_new_tokens
        cap = job.max_new_tokens or job.spec.max_new_tokens
        return max(1, cap - len(job.done)) if cap else 0

    def _pause(self, job: _Job, prompt: tuple[int, ...], emitted: list[int], keep: bool) -> None:
        """Requeue a preempted job with what it produced; its stream stays open and waits."""
        job.done.extend(emitted)
        job.preemptions += 1
        self._kv = self._kv_after_abort(prompt, emitted) if keep else None
        # Not worth saving when it leaves: its resume runs exactly the state a save would make (what the
        # cache holds + the last token produced), and a run must prefill at least one token.
        self._kv_next = None
        job.stream.pause()
        self._queue.append(job)  # keeps its arrival rank
        self._wakeup.set()
        log.debug("request %s paused after %d tokens (%d in all); the KV cache holds %s", job.stream.request_id,
                  len(emitted), len(job.done), "unknown tokens" if self._kv is None else f"{len(self._kv)} tokens")

    def _kv_after_abort(self, prompt_run: tuple[int, ...], emitted: list[int]) -> list[int] | None:
        """What the cache holds after an aborted run: unknown, unless the backend reports its length.

        The cache is filled in order (the prompt, then each token fed back), so a reported length
        n names its content exactly: the first n tokens of prompt + emitted. Anything else is unknown."""
        n = self.runtime.kv_cache_len()
        ran = list(prompt_run) + list(emitted)
        if n is None or not 0 <= n <= len(ran):
            return None
        return ran[:n]

    def _record(self, job: _Job, outcome: RunOutcome, detail: str = "") -> None:
        """One line per request at its real end (a preempted one counts once, over all its runs)."""
        stream, now = job.stream, time.monotonic()
        started, first = stream.started_at, stream.first_token_at
        prompt_tokens = len(job.prompt_run if job.prompt_run is not None else stream.prompt_tokens)
        decode_s = now - first if first is not None else None
        summary = RunSummary(
            stream.request_id, job.spec.model_id, prompt_tokens, stream.prefilled, len(job.done),
            (started or now) - stream.created_at, (first - started) if first and started else None,
            now - stream.created_at, outcome, job.priority.value, job.preemptions, decode_s, detail,
            stream.reused, stream.restored)
        self.history.append(summary)
        rate = f"{(len(job.done) - 1) / decode_s:.1f}" if decode_s and len(job.done) > 1 else "-"
        ttft = f"{first - stream.created_at:.2f} s" if first is not None else "-"
        log.info("request %s %s: model %s, %s, prompt %d tokens (%d prefilled%s), %d generated, queued %.2f s, "
                 "first token %s after arrival, %s tokens/s%s", stream.request_id, summary.described, job.spec.model_id,
                 job.priority.value, prompt_tokens, stream.prefilled,
                 f", {stream.restored} restored from disk" if stream.restored else "", len(job.done), summary.queued_s,
                 ttft, rate,
                 f", paused {job.preemptions}x" if job.preemptions else "")

    @staticmethod
    def _limit(job: _Job, prompt_run: Sequence[int]) -> int:
        """Most tokens this run may generate: the request's or the model's cap (less what earlier runs
        of a preempted job made), and the context's room."""
        cap = job.max_new_tokens or job.spec.max_new_tokens or 1 << 30
        return min(cap - len(job.done), job.spec.max_context_len - len(prompt_run))

    def _kv_after(self, job: _Job, prompt_run: tuple[int, ...], emitted: list[int],
                  kind: FinishKind) -> list[int] | None:
        """What the cache holds after a clean run: the prompt and every token fed back.

        A token ending the answer (EOS) is sampled but never fed; on a length stop the last
        emitted token was not fed either. If the backend can report the cache length, trust
        nothing that disagrees with it."""
        content = list(emitted)
        while content and content[-1] in job.stop_ids:
            content.pop()
        if kind is FinishKind.LENGTH and content:
            content.pop()
        belief = list(prompt_run) + content
        n = self.runtime.kv_cache_len()
        if n is not None and n != len(belief):
            log.debug("KV cache holds %s tokens, expected %d: will clear before the next run", n, len(belief))
            return None
        return belief

    def _on_stream_closed(self, stream: RequestStream) -> None:
        if self._running is not None and self._running.stream is stream:
            log.debug("aborting request %s on the NPU: %s", stream.request_id, stream.close_reason)
            asyncio.ensure_future(self._abort(self._running))
            return
        for job in [j for j in self._queue if isinstance(j, _Job) and j.stream is stream]:  # waiting or paused
            self._queue.remove(job)
            self._record(job, RunOutcome.CANCELLED, stream.close_reason or "")

    async def _abort(self, job: _Job | None = None) -> None:
        """Abort the run on the NPU; with `job`, only if that job's run still holds it. The abort
        is scheduled from a callback and may land after the run ended by itself: it must not then
        stop the next request's run."""
        if job is not None and self._running is not job:
            return
        try:
            await self.runtime.abort()
        except Exception:
            log.exception("runtime abort failed")

    async def _sweeper(self) -> None:
        """Abort generations nobody reads any more, and forget ended ones nobody collected."""
        period = max(0.05, min(1.0, self.config.idle_timeout / 4))
        while not self._closed:
            await asyncio.sleep(period)
            now = time.monotonic()
            for request_id, stream in list(self.streams.items()):
                if stream.idle_for(now) > self.config.idle_timeout:
                    if stream.open:
                        log.warning("request %s: nobody read it for %.1f s, aborting it (RKLLM_IDLE_TIMEOUT)",
                                    request_id, self.config.idle_timeout)
                    self.cancel(request_id, IDLE_TIMEOUT)

    @property
    def closed(self) -> bool:
        return self._closed

    @staticmethod
    def shutdown_error() -> ShuttingDown:
        return ShuttingDown("exo is shutting down: this request was stopped before its answer was complete; "
                            "send it again once the server is back")

    async def close(self) -> None:
        """Shut down: abandon every request, stop the NPU, release the runtime."""
        if self._closed:
            return
        self._closed = True
        for request_id, stream in list(self.streams.items()):
            # Whoever still waits for these must see an error, never an answer that looks complete.
            stream.fail(self.shutdown_error())
            self.cancel(request_id, SHUTDOWN)
        embedding = [j for j in self._queue if isinstance(j, _EmbedJob)] + [j for j in (self._embedding,) if j]
        for job in embedding:
            if not job.result.done():
                job.result.set_exception(self.shutdown_error())
        self._queue.clear()
        self._wakeup.set()
        if self._running is not None:
            await self._abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.runtime.close()
