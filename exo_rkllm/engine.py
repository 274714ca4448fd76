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

Only the shard holding layer 0 runs the model (RKLLM cannot run a slice of
layers); any other shard passes tokens through and still knows the tokenizer.
The engine knows no transport and no exo internals; exo-specific glue is in
plugin.py, which tells the engine when exo has finished or abandoned a request.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .catalog import Catalog, ModelEntry
from .config import Config
from .errors import ModelLoadError, ModelUnavailable, RequestCancelled, RKLLMError
from .lifecycle import Lifecycle, ModelStatus, model_status
from .model_cache import ModelCache
from .runtime.base import ChatMessage, ModelSpec, Runtime
from .runtime.factory import create_runtime
from .scheduler import Priority, Scheduler
from .streams import FinishReason, RequestStream
from .tokenizer import load_tokenizer, release_freed_memory, release_tokenizer, stop_token_ids

log = logging.getLogger("exo_rkllm.engine")

EndListener = Callable[[str, "RequestEnding"], None]
MAX_CONTEXTS = 256
# Reasons a request ends whole: the engine handed exo its last token, or exo ended it itself.
ANSWER_COMPLETE = "answer complete"
FINISHED_BY_EXO = "finished by exo"
CONTEXT_WAIT_S = 2.0  # how long a messages-only backend waits for a request's messages from the API node


@dataclass(frozen=True)
class RequestContext:
    """What the API knew about a request before templating it (for backends that template themselves),
    and who waits for it (the plugin classifies it; a request with no context is interactive)."""

    messages: tuple[ChatMessage, ...]
    tools: tuple[Any, ...] | None = None
    priority: Priority = Priority.INTERACTIVE


@dataclass(frozen=True)
class RequestEnding:
    """A request's end that exo cannot tell from its tokens (exo sees an eos and says `stop`)."""

    finish_reason: str  # "length": cut short by a token limit or the context; "error": no complete answer
    error: RKLLMError | None = None


@dataclass
class _Model:
    entry: ModelEntry
    spec: ModelSpec
    tokenizer: Any
    stop_ids: frozenset[int]


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
                reason = scheduler.ended[request_id]
                if reason not in (ANSWER_COMPLETE, FINISHED_BY_EXO):  # cut short: not an answer
                    error = (scheduler.shutdown_error() if scheduler.closed
                             else RequestCancelled(f"request {request_id} was cancelled: {reason}"))
                    self._notify_end(request_id, RequestEnding("error", error))
                return self._eos(model), inference_state
            if not scheduler.runtime.capabilities.token_input and request_id not in self._contexts:
                await self._wait_for_context(request_id)
            try:
                stream = self._start(scheduler, request_id, model, input_data, prompt_text)
            except RKLLMError as exc:  # queue full, prompt longer than the context...
                self._notify_end(request_id, RequestEnding("error", exc))
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
        if shard.is_first_layer():
            scheduler = await self._get_scheduler()
            if scheduler.runtime.loaded is None:
                asyncio.ensure_future(self._preload(scheduler, model.spec))

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

    def finish_request(self, request_id: str, reason: str = FINISHED_BY_EXO) -> None:
        """exo has ended the request (EOS, max tokens): stop the NPU work if any is left. A model
        that has no request left may now be one too many to keep (RKLLM_MODEL_CACHE)."""
        self._contexts.pop(request_id, None)
        if self._scheduler is not None:
            self._scheduler.cancel(request_id, reason)
        dropped = self._models.trim()
        if dropped:
            self._forget(dropped, in_background=True)

    def cancel_request(self, request_id: str, reason: str) -> None:
        """The request was abandoned (client gone, timeout): abort it, free the NPU at once."""
        self.finish_request(request_id, reason)

    def add_end_listener(self, listener: EndListener) -> None:
        """Called with (request_id, RequestEnding) when a request ends otherwise than by the model's
        own end of answer. exo reports a failure before the first token only as a generic 500, one
        after it not at all, and a cut-short answer as `stop`: the plugin corrects all three."""
        self._end_listeners.append(listener)

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
        """Build the model from the catalog's entry. A tokenizer that will not load makes the entry
        broken (listed with the reason) until its files change: every request would fail the same way."""
        entry = self.catalog.resolve(model_id)
        spec = entry.spec(self.config)
        source = entry.tokenizer_source
        if source is None:
            raise ModelUnavailable(f"model {model_id!r} has no tokenizer")
        try:
            tokenizer = load_tokenizer(source, allow_network=self.config.allow_network)
        except ModelUnavailable as exc:
            self.catalog.refuse(entry, str(exc))
            raise
        return _Model(entry, spec, tokenizer, stop_token_ids(tokenizer))

    def model_for(self, model_id: str) -> _Model:
        """The model `model_id` names now. The cache holds what was built from a catalog entry; if
        the catalog's entry for that name changed (another folder took the id, a new model file or
        Modelfile, a refusal), it is built again: a stale entry is never served."""
        cached = self._models.get(model_id)
        if cached is not None and self.catalog.resolve(model_id).fingerprint == cached.entry.fingerprint:
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

    # -- model lifecycle (exo_rkllm/lifecycle.py) ---------------------------------------------------
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
        prompt = [int(t) for t in np.asarray(input_data).reshape(-1)]
        context = self._contexts.pop(request_id, None)
        realign = None
        if prompt_text is not None:
            realign = functools.partial(self._realign, model.tokenizer, prompt_text)
        return scheduler.submit(request_id, model.spec, prompt, stop_ids=model.stop_ids,
                                messages=context.messages if context else None,
                                tools=context.tools if context else None, realign=realign,
                                priority=context.priority if context else Priority.INTERACTIVE)

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

    async def _next(self, scheduler: Scheduler, stream: RequestStream, model: _Model, first: bool) -> np.ndarray:
        request_id = stream.request_id
        try:
            token = await stream.next_token()
        except RequestCancelled as exc:
            # exo may still step a request that was abandoned: end its loop cleanly. Whoever may
            # still read the answer (a peer's cancel, the idle sweep) must not take it as complete.
            self._end(scheduler, request_id)
            self._notify_end(request_id, RequestEnding("error", exc))
            return self._eos(model)
        except RKLLMError as exc:
            self._end(scheduler, request_id)
            self._note_refusal(model, exc)
            self._notify_end(request_id, RequestEnding("error", exc))
            if first:
                raise  # exo's API answers the request with this error
            log.error("request %s failed mid-answer: %s", request_id, exc)
            return self._eos(model)  # end exo's loop cleanly; the plugin reports the error
        if token is None or token in model.stop_ids:
            if token is None and stream.finish_reason is FinishReason.LENGTH:
                self._notify_end(request_id, RequestEnding("length"))
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

    def _notify_end(self, request_id: str, ending: RequestEnding) -> None:
        for listener in self._end_listeners:
            try:
                listener(request_id, ending)
            except Exception:
                log.exception("failure listener raised")

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
