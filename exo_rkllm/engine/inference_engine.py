"""RKLLMInferenceEngine: exo's inference-engine contract on top of the scheduler.

exo drives an engine one token at a time: `infer_prompt` (encode, then
`infer_tensor` on the prompt ids), `sample`, then `infer_tensor` with the
sampled token for every next step. RKLLM instead runs a whole generation and
reports tokens through a callback. This class bridges the two: the first call
for a request id starts a generation and returns its first token as soon as
the runtime emits it; each later call returns the next one; after the last it
returns the eos id so exo ends the request. exo concludes `stop` from that eos
whatever happened, so every other ending (an answer cut at its token limit, a
failure, a cancellation) is also told to the end listeners (the plugin), which
correct what the client sees.
`sample` passes the token through: the runtime has already sampled it.

RKLLM cannot run a slice of layers: in a ring the plugin gives whichever node runs
a request all of its layers (exo_glue/ring.py), so exo hands this engine whole-model
shards; a shard not holding layer 0, should one come, passes tokens through.
The engine knows no transport and no exo internals; exo-specific glue is in
exo_glue/plugin.py, which tells the engine when exo has finished or abandoned a request.

Our own API handlers build a request's prompt ids themselves (special tokens only from the
template) and hand them, with the request's options (max tokens, sampling, seed), in its
RequestContext: the engine then runs exactly those ids and never encodes exo's prompt text.
The same handlers reach `embed` for the embeddings route.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Optional, Sequence

import numpy as np

from exo_rkllm.models.catalog import Catalog, ModelEntry
from exo_rkllm.config import Config
from exo_rkllm.engine.embeddings import EmbeddingResult, embedding_vector, pooling_method, text_ids, tokenizer_framing
from exo_rkllm.placement.node_state import NodeActivity
from exo_rkllm.errors import GenerationError, ModelLoadError, ModelUnavailable, RequestCancelled, RKLLMError
from exo_rkllm.scheduler.lifecycle import Lifecycle, ModelStatus, model_status
from exo_rkllm.scheduler.model_cache import ModelCache
from exo_rkllm.runtime.base import Capabilities, ChatMessage, EmbeddingInput, ModelSpec, Runtime
from exo_rkllm.runtime.factory import create_runtime
from exo_rkllm.scheduler.scheduler import ANSWER_COMPLETE, FINISHED_BY_EXO, Priority, RequestEnd, Scheduler
from exo_rkllm.scheduler.streams import FinishReason, RequestStream, RunOptions
from exo_rkllm.models.tokenizer import load_tokenizer, release_freed_memory, release_tokenizer, stop_token_ids, token_bytes

__all__ = ["EmbeddingResult", "RKLLMInferenceEngine", "RequestContext", "RequestEnding", "RunOptions",
           "messages_from_openai"]

log = logging.getLogger("exo_rkllm.engine.inference_engine")

# Called with (request_id, RequestEnding); it may return an awaitable (a message to other nodes) that
# the engine awaits, up to END_NOTICE_WAIT_S, before it hands exo the request's last token.
EndListener = Callable[[str, "RequestEnding"], Optional[Awaitable[Any]]]
END_NOTICE_WAIT_S = 2.0
MAX_CONTEXTS = 256
CONTEXT_WAIT_S = 2.0  # how long a messages-only backend waits for a request's messages from the API node


_CONTEXT_KEYS = ("messages", "tools", "priority", "prompt_ids", "options", "prefix_len")


@dataclass(frozen=True)
class RequestContext:
    """What the API knew about a request before templating it (for backends that template themselves),
    and who waits for it (the plugin classifies it; a request with no context is interactive).

    `prompt_ids`: the prompt as the API built it; the engine runs exactly these ids and ignores
    the prompt text exo passes (which, encoded again, could turn a user's text into control tokens).
    `options`: what the request asked of the generation (RunOptions, in streams.py).
    `prefix_len`: how many of `prompt_ids` are the conversation's system part, which other
    conversations share (saved once per model as a KV state, restored for each of them)."""

    messages: tuple[ChatMessage, ...]
    tools: tuple[Any, ...] | None = None
    priority: Priority = Priority.INTERACTIVE
    prompt_ids: tuple[int, ...] | None = None
    options: RunOptions | None = None
    prefix_len: int = 0

    def to_json(self) -> dict[str, Any]:
        """The context as JSON values, for the other nodes of a ring (an exo status message)."""
        return {"messages": [{"role": m.role, "content": m.content} for m in self.messages],
                "tools": list(self.tools) if self.tools is not None else None,
                "priority": self.priority.value,
                "prompt_ids": [int(t) for t in self.prompt_ids] if self.prompt_ids is not None else None,
                "options": self.options.to_json() if self.options is not None else None,
                "prefix_len": self.prefix_len}

    @classmethod
    def from_json(cls, data: Any) -> "RequestContext":
        """The inverse of `to_json`. Strict: a key it does not know or a value of the wrong shape is a
        ValueError, so a peer's malformed context is refused whole rather than half-used."""
        if not isinstance(data, Mapping):
            raise ValueError("a request context must be an object")
        unknown = sorted(str(k) for k in data if k not in _CONTEXT_KEYS)
        if unknown:
            raise ValueError(f"unknown request context key(s) {', '.join(unknown)}")
        raw_messages = data.get("messages")
        if not isinstance(raw_messages, list):
            raise ValueError("messages must be a list")
        messages = []
        for i, m in enumerate(raw_messages):
            if not isinstance(m, Mapping) or set(m) - {"role", "content"} or not isinstance(m.get("role"), str):
                raise ValueError(f"message {i} must be an object with a string role and a content")
            content = m.get("content")
            if content is not None and not isinstance(content, (str, list)):
                raise ValueError(f"message {i}: content must be a string, a list of parts or null")
            messages.append(ChatMessage(m["role"], content))
        tools = data.get("tools")
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools)):
            raise ValueError("tools must be a list of objects or null")
        priority = data.get("priority", Priority.INTERACTIVE.value)
        try:
            priority = Priority(priority)
        except ValueError:
            raise ValueError(f"priority must be one of {', '.join(p.value for p in Priority)}") from None
        ids = data.get("prompt_ids")
        if ids is not None:
            if not isinstance(ids, list) or not all(type(t) is int and t >= 0 for t in ids):
                raise ValueError("prompt_ids must be a list of token ids (non-negative integers) or null")
            ids = tuple(ids)
        options = data.get("options")
        prefix_len = data.get("prefix_len", 0)
        if type(prefix_len) is not int or prefix_len < 0 or prefix_len > len(ids or ()):
            raise ValueError("prefix_len must be a count of prompt_ids (a non-negative integer)")
        return cls(tuple(messages), tuple(tools) if tools is not None else None, priority, ids,
                   RunOptions.from_json(options) if options is not None else None, prefix_len)


@dataclass(frozen=True)
class RequestEnding:
    """A request's end that exo cannot tell from its tokens (exo sees an eos and says `stop`)."""

    finish_reason: str  # "length": cut short by a token limit or the context; "error": no complete answer
    error: RKLLMError | None = None


@dataclass
class _Model:
    """A model as the engine uses it: its catalog entry, tokenizer and stop ids, and what the NPU loads.

    A route-only model (the catalog's `ModelEntry.routable`: tokenizer and Modelfile here, the .rkllm
    file on another board) has no NPU spec: the API templates and tokenizes its requests here, and
    anything that would run it on this NPU asks for `spec`, which raises the catalog's reason."""

    entry: ModelEntry
    npu_spec: ModelSpec | None  # None: route-only
    tokenizer: Any
    stop_ids: frozenset[int]
    control_ids: frozenset[int] = frozenset()  # special and added tokens: never text
    framing: tuple[tuple[int, ...], tuple[int, ...]] | None = field(default=None, compare=False)  # for embeddings

    @property
    def spec(self) -> ModelSpec:
        """What the NPU loads; ModelUnavailable (the catalog's reason) for a route-only model."""
        if self.npu_spec is None:
            raise self.entry.unavailable()
        return self.npu_spec


class RKLLMInferenceEngine:
    """Legacy exo's InferenceEngine contract; exo looks models up by this class's name."""

    def __init__(self, shard_downloader: Any = None, *, config: Config | None = None,
                 runtime: Runtime | None = None, catalog: Catalog | None = None) -> None:
        self.shard_downloader = shard_downloader  # unused: models are local files
        self.config = config or Config.from_env()
        self.catalog = catalog or Catalog(self.config)
        self.shard: Any = None
        self.tokenizer: Any = None
        self.session: dict[str, Any] = {}
        self._runtime = runtime
        self._scheduler: Scheduler | None = None
        self._scheduler_lock = asyncio.Lock()
        self._shard_lock = asyncio.Lock()
        self._models: ModelCache[_Model] = ModelCache(self.config.model_cache, self._models_in_use)
        self._contexts: collections.OrderedDict[str, RequestContext] = collections.OrderedDict()
        self._context_waiters: dict[str, asyncio.Event] = {}
        self._end_listeners: list[EndListener] = []
        self._lifecycle: Lifecycle | None = None  # built with the scheduler

    # -- exo's abstract methods ------------------------------------------------------------------
    async def encode(self, shard: Any, prompt: str) -> np.ndarray:
        await self.ensure_shard(shard)
        tok = self.tokenizer
        ids = list(tok.encode(prompt))
        # exo's prompt is already templated; a template that writes the BOS itself plus a
        # tokenizer that adds one would give two.
        if len(ids) >= 2 and tok.bos_token_id is not None and ids[0] == ids[1] == tok.bos_token_id:
            ids = ids[1:]
        return np.array(ids, dtype=np.int64)

    async def decode(self, shard: Any, tokens: Any) -> str:
        await self.ensure_shard(shard)
        return self.tokenizer.decode([int(t) for t in np.asarray(tokens).reshape(-1)], skip_special_tokens=True)

    async def sample(self, x: np.ndarray, temp: float = 0.0, top_p: float = 1.0) -> np.ndarray:
        """The runtime has already sampled: pass the token through (temperature is the Modelfile's)."""
        return np.asarray(x, dtype=np.int64).reshape(-1)[-1:]

    async def infer_prompt(self, request_id: str, shard: Any, prompt: str,
                           inference_state: Optional[dict] = None) -> tuple[np.ndarray, Optional[dict]]:
        context = self._contexts.get(request_id)
        if context is not None and context.prompt_ids is not None:  # the API built them: no encoding
            tokens = np.array(context.prompt_ids, dtype=np.int64)
            return await self._infer(request_id, shard, tokens.reshape(1, -1), inference_state, None)
        tokens = await self.encode(shard, prompt)
        return await self._infer(request_id, shard, tokens.reshape(1, -1), inference_state, prompt)

    async def infer_tensor(self, request_id: str, shard: Any, input_data: np.ndarray,
                           inference_state: Optional[dict] = None) -> tuple[np.ndarray, Optional[dict]]:
        return await self._infer(request_id, shard, input_data, inference_state, None)

    async def _infer(self, request_id: str, shard: Any, input_data: np.ndarray, inference_state: Optional[dict],
                     prompt_text: str | None) -> tuple[np.ndarray, Optional[dict]]:
        await self.ensure_shard(shard)
        if not shard.is_first_layer():
            return input_data, inference_state  # the model ran on the layer-0 node already
        # the cache may have dropped it since (RKLLM_MODEL_CACHE): a request that ended, a model switch
        model = self._models.get(shard.model_id) or await asyncio.to_thread(self.model_for, shard.model_id)
        scheduler = await self._get_scheduler()
        stream = scheduler.get(request_id)
        if stream is None:
            if request_id in scheduler.ended:  # exo is still stepping a request that has ended
                end = scheduler.ended[request_id]
                if not end.whole:  # cut short: not an answer
                    error = (scheduler.shutdown_error() if scheduler.closed
                             else RequestCancelled(f"request {request_id} was cancelled: {end}"))
                    await self._notify_end(request_id, RequestEnding("error", error))
                return self._eos(model), inference_state
            try:
                model.spec  # a route-only model (no .rkllm file on this board) raises the catalog's reason
                if not scheduler.runtime.capabilities.token_input and request_id not in self._contexts:
                    await self._wait_for_context(request_id)
                stream = self._start(scheduler, request_id, model, input_data, prompt_text)
            except RKLLMError as exc:  # not servable here, queue full, prompt longer than the context...
                await self._notify_end(request_id, RequestEnding("error", exc))
                raise
        return await self._next(scheduler, stream, model, first=stream.delivered == 0), inference_state

    async def load_checkpoint(self, shard: Any, path: str) -> None:
        await self.ensure_shard(shard)

    async def save_checkpoint(self, shard: Any, path: str) -> None:
        raise NotImplementedError("RKLLM models are converted offline; there is nothing to save")

    async def save_session(self, key: str, value: Any) -> None:
        self.session[key] = value

    async def clear_session(self) -> None:
        self.session.clear()

    async def ensure_shard(self, shard: Any) -> None:
        """Make `shard` current: resolve its model and tokenizer; on layer 0, get the NPU ready."""
        model = self._models.get(shard.model_id)
        if self.shard == shard and model is not None and model.tokenizer is self.tokenizer:
            return  # every token of a request comes through here: no disk access on this path
        async with self._shard_lock:  # a new shard: check the catalog still has the cached entry
            model = await asyncio.to_thread(self.model_for, shard.model_id)
        self.tokenizer = model.tokenizer
        self.shard = shard
        if shard.is_first_layer() and model.npu_spec is not None:  # a route-only model fails in _infer
            scheduler = await self._get_scheduler()
            if scheduler.runtime.loaded is None:
                asyncio.ensure_future(self._preload(scheduler, model.npu_spec))

    # -- what the plugin tells us ------------------------------------------------------------------
    def set_request_context(self, request_id: str, context: RequestContext) -> None:
        """Keep a request's original messages (for backends that template themselves). Bounded:
        a node that never runs the request (not layer 0) drops it when exo ends it, or when old."""
        self._contexts[request_id] = context
        while len(self._contexts) > MAX_CONTEXTS:
            self._contexts.popitem(last=False)
        waiter = self._context_waiters.get(request_id)
        if waiter is not None:
            waiter.set()


    def drop_request_context(self, request_id: str) -> None:
        """The API is done with the request: a context it set and no run took is not kept."""
        self._contexts.pop(request_id, None)
    def finish_request(self, request_id: str) -> None:
        """exo has ended the request (EOS, max tokens): stop the NPU work if any is left."""
        self._release(request_id, FINISHED_BY_EXO)

    def cancel_request(self, request_id: str, reason: str) -> None:
        """The request was abandoned (client gone, timeout): abort it, free the NPU at once. `reason`
        is what a later reader of the request is told."""
        self._release(request_id, RequestEnd.cancelled(reason))

    def _release(self, request_id: str, end: RequestEnd) -> None:
        """Forget the request and let the scheduler stop its NPU work. A model that has no request left
        may now be one too many to keep (RKLLM_MODEL_CACHE)."""
        self._contexts.pop(request_id, None)
        if self._scheduler is not None:
            self._scheduler.cancel(request_id, end)
        dropped = self._models.trim()
        if dropped:
            self._forget(dropped, in_background=True)

    def add_end_listener(self, listener: EndListener) -> None:
        """Called with (request_id, RequestEnding) when a request ends otherwise than by the model's
        own end of answer. exo reports a failure before the first token only as a generic 500, one
        after it not at all, and a cut-short answer as `stop`: the plugin corrects all three."""
        self._end_listeners.append(listener)

    async def capabilities(self) -> Capabilities:
        """What this node's runtime can do (it is built now if it was not yet): the API shapes
        requests by it (token ids or chat messages; raw completions need token input)."""
        return (await self._get_scheduler()).runtime.capabilities

    def request_sampling_applies(self) -> bool:
        """Whether a request's own sampling (temperature, top_p... and seed) reaches this node's runtime;
        otherwise the Modelfile's values apply, and the API says so. Before the runtime exists (it is
        built at exo's start-up) the answer is no: the safe thing to tell a client."""
        if self._scheduler is not None:
            return self._scheduler.applies_request_sampling
        return bool(self._runtime is not None and self._runtime.capabilities.per_run_sampling)

    async def embed(self, model_id: str, inputs: Sequence[str | Sequence[int]],
                    priority: Priority = Priority.INTERACTIVE, request_id: str | None = None) -> EmbeddingResult:
        """One unit vector per input, in order, from the model's last hidden layer on this node's NPU.

        A string is encoded as plain text (the tokenizer's own framing kept: see embeddings.py); a
        list of ids is taken as given, each id checked against the vocabulary. Raises ValueError for
        a malformed input (the API's 400), ModelNotFound, EmbeddingUnsupported, ContextOverflow,
        QueueFull, or the runtime's error. The job waits its turn on the NPU like a generation."""
        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
            raise ValueError("inputs must be a list of strings or of token id lists")
        if not inputs:
            raise ValueError("there is nothing to embed")
        model = await asyncio.to_thread(lambda: self.model_for(self.catalog.resolve(model_id).model_id))
        method = pooling_method(model.spec.options)  # a bad Modelfile fails before the NPU is asked
        scheduler = await self._get_scheduler()
        base = request_id or f"embd-{uuid.uuid4().hex[:16]}"
        items = await asyncio.to_thread(self._embedding_inputs, model, inputs, base,
                                        not scheduler.runtime.capabilities.token_input)
        outputs = await scheduler.embed(model.spec, items, priority)
        vectors = [embedding_vector(o, method) for o in outputs]
        widths = {int(v.shape[0]) for v in vectors}
        if len(vectors) != len(items) or len(widths) != 1:
            raise GenerationError(f"the runtime returned {len(vectors)} embeddings of widths {sorted(widths)} "
                                  f"for {len(items)} inputs")
        return EmbeddingResult([v.tolist() for v in vectors], sum(len(i.token_ids) for i in items), widths.pop())

    def _embedding_inputs(self, model: _Model, inputs: Sequence[Any], base: str,
                          needs_text: bool) -> list[EmbeddingInput]:
        """The runtime's inputs (on a thread: encoding a batch is real work). `needs_text`: the backend
        tokenizes itself (a server), so each input's text goes along."""
        tok, vocab = model.tokenizer, len(model.tokenizer)
        items = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                if not item:
                    raise ValueError(f"input {i} is an empty string")
                if model.framing is None:
                    model.framing = tokenizer_framing(tok)
                ids, text = text_ids(tok, item, model.framing), item
            elif isinstance(item, Sequence) and not isinstance(item, (bytes, bytearray)):
                ids = []
                for t in item:
                    if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
                        raise ValueError(f"input {i}: token ids must be integers")
                    if not 0 <= int(t) < vocab:
                        raise ValueError(f"input {i}: token id {int(t)} is outside the vocabulary (0..{vocab - 1})")
                    ids.append(int(t))
                if not ids:
                    raise ValueError(f"input {i} has no tokens")
                text = tok.decode(ids, skip_special_tokens=False) if needs_text else ""
            else:
                raise ValueError(f"input {i} must be a string or a list of token ids")
            items.append(EmbeddingInput(f"{base}-{i}", tuple(ids), text))
        return items

    def activity(self) -> NodeActivity:
        """What this node has and does, for the ring's placement (exo_rkllm/placement): the models it can
        run, those it can only route (tokenizer here, .rkllm file elsewhere), the one on its NPU, the work
        running and waiting, the conversations whose state it holds. Reads memory only (the catalog's last
        scan): it is called every heartbeat."""
        serves = tuple(e.model_id for e in self.catalog.servable())
        routes = tuple(e.model_id for e in self.catalog.routable())
        scheduler = self._scheduler
        if scheduler is None:
            return NodeActivity(serves=serves, routes=routes)
        caps = scheduler.runtime.capabilities
        loaded = scheduler.runtime.loaded
        return NodeActivity(serves=serves, routes=routes, loaded=loaded.model_id if loaded else None,
                            running=scheduler.on_npu,
                            waiting=scheduler.waiting, backend=caps.backend, version=caps.version or "",
                            held=scheduler.held())

    def active_requests(self) -> list[str]:
        return list(self._scheduler.streams) if self._scheduler else []

    async def shutdown(self) -> None:
        """Abandon every request, stop the NPU, release the runtime (rkllm_destroy)."""
        pending = 0
        if self._scheduler is not None:
            pending = len(self._scheduler.streams)
            await self._stop_lifecycle()
            await self._scheduler.close()
        self._contexts.clear()
        log.info("rkllm engine stopped: %d unfinished request(s) cancelled, runtime released", pending)

    # -- internals ---------------------------------------------------------------------------------
    def _resolve_model(self, model_id: str) -> _Model:
        """Build the model from the catalog's entry (a route-only one without an NPU spec). A tokenizer
        that will not load makes the entry broken (listed with the reason) until its files change:
        every request would fail the same way."""
        entry = self.catalog.resolve(model_id, allow_route_only=True)
        spec = entry.spec(self.config) if entry.ok else None
        source = entry.tokenizer_source
        if source is None:
            raise ModelUnavailable(f"model {model_id!r} has no tokenizer")
        try:
            tokenizer = load_tokenizer(source, allow_network=self.config.allow_network)
        except ModelUnavailable as exc:
            self.catalog.refuse(entry, str(exc))
            raise
        control = frozenset(int(i) for i in tokenizer.all_special_ids) | frozenset(
            int(i) for i in tokenizer.get_added_vocab().values())
        return _Model(entry, spec, tokenizer, stop_token_ids(tokenizer), control)

    def model_for(self, model_id: str) -> _Model:
        """The model `model_id` names now. The cache holds what was built from a catalog entry; if
        the catalog's entry for that name changed (another folder took the id, a new model file or
        Modelfile, a refusal), it is built again: a stale entry is never served.

        A route-only model is returned too (its tokenizer, stop ids and entry, for the API that hands
        its requests to another board); its `spec` raises, so it never runs on this NPU."""
        cached = self._models.get(model_id)
        if cached is not None and self.catalog.resolve(model_id, allow_route_only=True).fingerprint == \
                cached.entry.fingerprint:
            model = cached
        else:
            if cached is not None:  # rebuilt from changed files: the old build is not kept for it
                self._forget([cached])
            model = self._resolve_model(model_id)
        dropped = self._models.touch(model_id, model)
        if dropped:
            self._forget(dropped)
        return model

    def _models_in_use(self) -> set[str]:
        """Models the cache must keep: the one on the NPU, those with a request running or waiting,
        the current shard's (its request may be on its way to the scheduler)."""
        ids = {self.shard.model_id} if self.shard is not None else set()
        scheduler = self._scheduler
        if scheduler is not None:
            loaded = scheduler.runtime.loaded
            if loaded is not None:
                ids.add(loaded.model_id)
            ids.update(stream.model_id for stream in list(scheduler.streams.values()))
        return ids

    def _forget(self, dropped: list[_Model], in_background: bool = False) -> None:
        """Models dropped from the cache: release their tokenizers (freed once no request or runtime
        holds them) and hand the freed heap back to the system (~50 MB a Qwen vocabulary)."""
        log.debug("model cache: dropped %s", ", ".join(m.entry.model_id for m in dropped))
        for model in dropped:
            if model.entry.tokenizer_source is not None:
                release_tokenizer(model.entry.tokenizer_source, allow_network=self.config.allow_network)
        dropped.clear()
        if in_background:  # on the event loop: trimming a large heap is not free
            try:
                asyncio.get_running_loop().run_in_executor(None, release_freed_memory)
                return
            except RuntimeError:
                pass
        release_freed_memory()

    def _note_refusal(self, model: _Model, exc: RKLLMError) -> None:
        """A local runtime that refused the model file will refuse it again: list the entry as broken,
        with the runtime's reason, until its files change. (An rkllama server may refuse for reasons
        of its own, such as memory held by another model; it is asked again every time.)"""
        if not isinstance(exc, ModelLoadError) or self._scheduler is None:
            return
        if self._scheduler.runtime.capabilities.backend != "rkllama":
            self.catalog.refuse(model.entry, f"the runtime refused to load it: {exc}")

    async def _get_scheduler(self) -> Scheduler:
        if self._scheduler is None:
            async with self._scheduler_lock:
                if self._scheduler is None:
                    runtime = self._runtime or await create_runtime(self.config)
                    self._scheduler = Scheduler(runtime, self.config)
                    self._start_lifecycle(self._scheduler)
                    log.info("rkllm engine ready: %s runtime %s", runtime.capabilities.backend,
                             runtime.capabilities.version or "")
        return self._scheduler

    # -- model lifecycle (exo_rkllm/scheduler/lifecycle.py) ---------------------------------------------------
    def start_lifecycle(self) -> None:
        """exo's start-up (needs the running loop): build the runtime now rather than at the first
        request, so RKLLM_PRELOAD loads its model and the keep-alive timer runs."""
        asyncio.ensure_future(self._start_up())

    async def _start_up(self) -> None:
        try:
            await self._get_scheduler()
        except Exception as exc:  # the first request reports it to its client
            log.error("the rkllm runtime could not start: %s", exc)

    def _start_lifecycle(self, scheduler: Scheduler) -> None:
        self._lifecycle = Lifecycle(scheduler, self.config, self._prepare, self._servable_ids)
        self._lifecycle.start()

    async def _stop_lifecycle(self) -> None:
        if self._lifecycle is not None:
            await self._lifecycle.stop()

    async def lifecycle(self) -> Lifecycle:
        """The lifecycle of this engine's NPU (built with the runtime, which this creates if needed)."""
        await self._get_scheduler()
        assert self._lifecycle is not None
        return self._lifecycle

    def model_status(self, model_id: str) -> ModelStatus:
        return model_status(self._scheduler, model_id)

    async def _prepare(self, name: str) -> ModelSpec:
        """The model `name` (an id or alias) names, its tokenizer built: what loading it needs."""
        model = await asyncio.to_thread(lambda: self.model_for(self.catalog.resolve(name).model_id))
        return model.spec

    def _servable_ids(self) -> list[str]:
        return [e.model_id for e in self.catalog.servable()]

    async def _preload(self, scheduler: Scheduler, spec: ModelSpec) -> None:
        try:
            await scheduler.preload(spec)
        except Exception as exc:  # the request that needs it will report the error
            log.error("could not preload %s: %s", spec.model_id, exc)

    def _start(self, scheduler: Scheduler, request_id: str, model: _Model, input_data: np.ndarray,
               prompt_text: str | None) -> RequestStream:
        spec = model.spec  # raises for a route-only model, before the request's context is taken
        context = self._contexts.pop(request_id, None)
        realign = None
        if context is not None and context.prompt_ids is not None:  # the API's ids, verbatim
            prompt = tuple(int(t) for t in context.prompt_ids)
            realign = functools.partial(self._realign_ids, model.tokenizer, model.control_ids, prompt)
        else:
            prompt = tuple(int(t) for t in np.asarray(input_data).reshape(-1))
            if prompt_text is not None:
                realign = functools.partial(self._realign, model.tokenizer, prompt_text)
        options = context.options if context is not None and context.options is not None else RunOptions()
        cap = options.max_new_tokens
        if cap and spec.max_new_tokens:  # the model's limit (Modelfile, RKLLM_MAX_NEW_TOKENS) is the ceiling
            cap = min(cap, spec.max_new_tokens)
        eos = getattr(model.tokenizer, "eos_token_id", None)
        return scheduler.submit(request_id, spec, prompt, stop_ids=model.stop_ids,
                                messages=context.messages if context else None,
                                tools=context.tools if context else None, realign=realign,
                                priority=context.priority if context else Priority.INTERACTIVE,
                                max_new_tokens=cap, sampling=options.sampling, seed=options.seed,
                                prefix_len=context.prefix_len if context is not None and context.prompt_ids else 0,
                                end_of_turn=int(eos) if isinstance(eos, int) else None)

    @staticmethod
    def _realign(tokenizer: Any, prompt_text: str, cached: Sequence[int]) -> tuple[int, ...] | None:
        """The prompt as the cached tokens plus its remaining text, if the cache spells its beginning.

        The cache holds the previous prompt and the tokens the model generated; the new prompt
        holds that answer as text, which the tokenizer may split differently (a leading newline
        merging with the template's). Text is what the model saw, so continuing from the cached
        tokens and feeding only the new text keeps the conversation identical."""
        cached_text = tokenizer.decode(list(cached), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if not cached_text or not prompt_text.startswith(cached_text) or len(prompt_text) == len(cached_text):
            return None
        rest = tokenizer.encode(prompt_text[len(cached_text):], add_special_tokens=False)
        return tuple(int(t) for t in cached) + tuple(int(t) for t in rest)

    @staticmethod
    def _realign_ids(tokenizer: Any, control: frozenset[int], prompt: tuple[int, ...],
                     cached: Sequence[int]) -> tuple[int, ...] | None:
        """`_realign` for a prompt the API built as ids: the cached tokens plus the prompt's remaining ids,
        if the cache and the prompt's beginning spell the same bytes.

        They are walked together: equal ids match; where they differ (the model's own tokens of an
        earlier answer against the API's plain-text encoding of it, possibly in several answers), the
        two runs up to their next control token must spell the same bytes, and the control tokens that
        end them must be the same. No text is encoded again, so nothing can become a control token:
        only runs of ordinary tokens are compared, and every id after the cache is the API's own."""
        cached = [int(t) for t in cached]
        i = j = 0
        try:
            while i < len(cached):
                if j < len(prompt) and cached[i] == prompt[j]:
                    i, j = i + 1, j + 1
                    continue
                ci = next((k for k in range(i, len(cached)) if cached[k] in control), len(cached))
                want = b"".join(token_bytes(tokenizer, t) for t in cached[i:ci])
                if not want:
                    return None  # a control token of the cache against another id of the prompt
                pos = 0
                while pos < len(want):  # the prompt's run that spells the same bytes
                    if j >= len(prompt) - 1 or prompt[j] in control:  # at least one prompt id must remain
                        return None
                    piece = token_bytes(tokenizer, prompt[j])
                    if want[pos:pos + len(piece)] != piece:
                        return None
                    pos, j = pos + len(piece), j + 1
                i = ci
        except ValueError:  # not a byte-level vocabulary, or an id it does not know
            return None
        if j >= len(prompt):
            return None
        return tuple(cached) + prompt[j:]

    async def _next(self, scheduler: Scheduler, stream: RequestStream, model: _Model, first: bool) -> np.ndarray:
        request_id = stream.request_id
        try:
            token = await stream.next_token()
        except RequestCancelled as exc:
            # exo may still step a request that was abandoned: end its loop cleanly. Whoever may
            # still read the answer (a peer's cancel, the idle sweep) must not take it as complete.
            self._end(scheduler, request_id)
            await self._notify_end(request_id, RequestEnding("error", exc))
            return self._eos(model)
        except RKLLMError as exc:
            self._end(scheduler, request_id)
            self._note_refusal(model, exc)
            await self._notify_end(request_id, RequestEnding("error", exc))
            if first:
                raise  # exo's API answers the request with this error
            log.error("request %s failed mid-answer: %s", request_id, exc)
            return self._eos(model)  # end exo's loop cleanly; the plugin reports the error
        if token is None or token in model.stop_ids:
            if token is None and stream.finish_reason is FinishReason.LENGTH:
                await self._notify_end(request_id, RequestEnding("length"))
            self._end(scheduler, request_id)
            return self._eos(model)
        return np.array([[token]], dtype=np.int64)

    async def _wait_for_context(self, request_id: str) -> None:
        """In a ring the messages come from the node that took the HTTP request, as an exo
        status message that may arrive just after the prompt itself."""
        waiter = self._context_waiters.setdefault(request_id, asyncio.Event())
        try:
            await asyncio.wait_for(waiter.wait(), CONTEXT_WAIT_S)
        except asyncio.TimeoutError:
            log.warning("request %s: its chat messages never arrived; the %s backend needs them", request_id,
                        self._scheduler.runtime.capabilities.backend if self._scheduler else "runtime")
        finally:
            self._context_waiters.pop(request_id, None)

    async def _notify_end(self, request_id: str, ending: RequestEnding) -> None:
        """Tell the end listeners, and wait (briefly) for what they send on: in a ring the node
        serving the HTTP request learns the ending by a status message, which must reach it before
        the eos this engine is about to hand exo, or that node would take the eos for `stop`."""
        pending = []
        for listener in self._end_listeners:
            try:
                sent = listener(request_id, ending)
            except Exception:
                log.exception("an end listener raised")
                continue
            if inspect.isawaitable(sent):
                pending.append(asyncio.ensure_future(sent))
        if pending:
            done, late = await asyncio.wait(pending, timeout=END_NOTICE_WAIT_S)
            for task in late:
                log.warning("request %s: the other nodes were not told how it ended within %g s", request_id,
                            END_NOTICE_WAIT_S)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.warning("request %s: telling the other nodes how it ended failed: %r", request_id,
                                task.exception())

    def _end(self, scheduler: Scheduler, request_id: str) -> None:
        scheduler.cancel(request_id, ANSWER_COMPLETE)
        self._contexts.pop(request_id, None)

    @staticmethod
    def _eos(model: _Model) -> np.ndarray:
        return np.array([[int(model.tokenizer.eos_token_id)]], dtype=np.int64)


def messages_from_openai(messages: Sequence[Any]) -> tuple[ChatMessage, ...]:
    """exo's Message objects (or dicts) to our ChatMessage."""
    out = []
    for m in messages:
        role = getattr(m, "role", None) if not isinstance(m, dict) else m.get("role")
        content = getattr(m, "content", None) if not isinstance(m, dict) else m.get("content")
        out.append(ChatMessage(str(role), content))
    return tuple(out)
