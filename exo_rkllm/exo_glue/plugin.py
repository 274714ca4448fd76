"""Everything that touches legacy exo's internals, in one place.

exo has no plugin API, so this module patches a few of its functions when
they are imported (exo_rkllm/exo_glue/autoload.py arranges that for a plain
`python -m exo.main`; `exo-rkllm serve` calls `install()` first):

- engine selection: `--inference-engine rkllm` builds our engine;
- model cards: every servable model of the catalog becomes an exo model
  (its repo is the local model folder, so no hub access is ever needed);
- peers joining never swap our engine for tinygrad;
- exo's ChatGPT API: for our engine its chat, models and token-encode routes,
  plus the routes it lacks (completions, embeddings, one model), are served by
  exo_rkllm.api's OpenAI handlers through `ExoNodePort`, the handlers' port on
  exo's Node; exo's timeout, open CORS and admin routes are replaced by the
  API's own settings (RKLLM_API_KEY, RKLLM_CORS_ORIGINS, RKLLM_ADMIN_ROUTES);
  tinychat starts on a model this engine serves.
- cluster: each request runs whole on one board, chosen per request
  (exo_glue/ring.py: the node patches, the peer messages, the faults);
  cancellations and failures travel between nodes as exo opaque-status
  messages, since the node running the model may not be the node serving the
  HTTP request.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import types
from dataclasses import asdict
from typing import Any, Callable

from exo_rkllm import ENGINE_CLASSNAME, ENGINE_NAME
from exo_rkllm.api.errors import APIError, error_response
from exo_rkllm.api.handlers import OpenAIServer
from exo_rkllm.api.port import Feeds, Submission, TokenFeed
from exo_rkllm.api.security import openai_json_errors, security_middlewares, strip_foreign_cors
from exo_rkllm.models.catalog import ModelEntry
from exo_rkllm.config import Config
from exo_rkllm.engine.inference_engine import RKLLMInferenceEngine, RequestContext, RequestEnding
from exo_rkllm.errors import ModelNotFound, RequestCancelled, RKLLMError, error_named
from exo_rkllm.exo_glue.ring import BEAT_STATUS, ENDED_STATUS, STATE_STATUS, Ring, ended_message

log = logging.getLogger("exo_rkllm.exo_glue.plugin")

CANCEL_STATUS = "exo_rkllm_cancel"
CONTEXT_STATUS = "exo_rkllm_context"
SHUTDOWN_DRAIN_S = 3.0  # how long a stopping exo waits for open HTTP requests to write how they ended

_engine: RKLLMInferenceEngine | None = None
# One row per model folder the catalog ever listed (a path and an id): what exo's resolve_tokenizer
# needs to find our models; bounded by the folders on disk, like exo's own model_cards.
_repo_to_model: dict[str, str] = {}
# The requests this node's API serves, each with the feed its handler reads (api/port.py).
_feeds = Feeds()


# -- entry points --------------------------------------------------------------------------------
def install() -> None:
    """Hook into exo: patch the exo modules already imported, and the rest when they are."""
    from exo_rkllm.exo_glue import autoload as _autoload

    _autoload.install(force=True)
    for name in _autoload.TARGETS:
        module = sys.modules.get(name)
        if module is not None:
            patch_module(module)


def patch_module(module: types.ModuleType) -> None:
    patcher = _PATCHERS.get(module.__name__)
    if patcher is not None and not getattr(module, "_exo_rkllm_patched", False):
        patcher(module)
        module._exo_rkllm_patched = True  # type: ignore[attr-defined]


# -- the pure pieces the tests' exo driver shares with the patches --------------------------------
def on_token(engine: RKLLMInferenceEngine, request_id: str, tokens: Any, is_finished: bool) -> None:
    """exo's node.on_token: the only signal that exo has ended a request (EOS or max tokens)."""
    if is_finished:
        engine.finish_request(request_id)


def on_opaque_status(engine: RKLLMInferenceEngine, request_id: str, status: str) -> None:
    """Cancellations, failures and request messages sent by the nodes of the ring (this one included)."""
    if "exo_rkllm_" not in status:
        return
    try:
        data = json.loads(status)
    except ValueError:
        return
    if not isinstance(data, dict):
        return
    kind = data.get("type")
    rid = data.get("request_id") or request_id
    if _ring is not None and kind in (STATE_STATUS, BEAT_STATUS):
        _ring.receive(data)
    elif kind == CANCEL_STATUS:
        engine.cancel_request(rid, data.get("reason", "cancelled by a peer"))
    elif kind == CONTEXT_STATUS and isinstance(data.get("context"), dict):
        try:
            engine.set_request_context(rid, RequestContext.from_json(data["context"]))
        except ValueError as exc:
            log.warning("request %s: a peer sent a context this node cannot read (%s)", rid, exc)
            return
        if _ring is not None and isinstance(data.get("origin"), str):
            _ring.run_for(rid, data["origin"])
    elif kind == ENDED_STATUS and rid in _feeds:
        reason = data.get("finish_reason")
        error = (error_named(data.get("error_type"), data.get("message") or "the request failed")
                 if reason == "error" else None)
        _feeds.hint(rid, RequestEnding("length" if reason == "length" else "error", error))
        if data.get("final") and error is not None:  # no more token will come: end it now
            _feeds.fail(rid, error)


# -- engine selection -------------------------------------------------------------------------------
def make_engine(shard_downloader: Any = None, config: Config | None = None) -> RKLLMInferenceEngine:
    """Build the engine as exo's InferenceEngine subclass, register its models as exo model cards."""
    global _engine
    config = config or Config.from_env()
    _setup_logging(config)
    _check_runtime_available(config)
    cls: type = RKLLMInferenceEngine
    try:
        from exo.inference.inference_engine import InferenceEngine

        cls = type(ENGINE_CLASSNAME, (RKLLMInferenceEngine, InferenceEngine), {"__module__": __name__})
    except ImportError:
        pass
    engine = cls(shard_downloader, config=config)
    entries = engine.catalog.refresh()
    register_model_cards(entries)
    servable = [e for e in entries if e.ok]
    if not servable:
        log.warning("no servable .rkllm model in %s: put models there (see README, 'Model layout'), set "
                    "RKLLM_MODELS_DIR, or run `exo-rkllm demo` to write a model for the simulator",
                    config.models_dir)
    else:
        log.info("rkllm models: %s", ", ".join(e.model_id for e in servable))
    engine.add_end_listener(on_engine_end)
    _engine = engine
    _start_lifecycle(engine)
    return engine


def _start_lifecycle(engine: RKLLMInferenceEngine) -> None:
    """RKLLM_PRELOAD and the keep-alive timer start with the event loop: now if it runs, else (exo
    builds its engine before its loop) when exo's API server starts."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    engine.start_lifecycle()


def _check_runtime_available(config: Config) -> None:
    """Fail at start-up, not at the first request, when `auto` finds no runtime: the same probe
    the runtime factory decides with (an HTTP server on the rkllama port that is not rkllama
    fails here too, with the reason)."""
    if config.backend == "sim":
        log.warning("RKLLM_BACKEND=sim: serving with the SIMULATED runtime (synthetic answers, no NPU)")
        return
    if config.backend != "auto":
        return
    from exo_rkllm.runtime.factory import check_backend

    try:
        check_backend(config)
    except RKLLMError as exc:
        raise SystemExit(f"exo-rkllm: {exc}") from None


def register_model_cards(entries: list[ModelEntry]) -> None:
    try:
        from exo import models as exo_models
    except ImportError:
        return
    for entry in entries:
        if not (entry.ok or entry.routable):  # a route-only model is submitted through exo's node too
            continue
        # exo passes this "repo" to resolve_tokenizer; a local path keeps everything offline.
        repo = str(entry.model_file if entry.loose else entry.folder)
        _repo_to_model[repo] = entry.model_id
        for name in (entry.model_id, *entry.aliases):
            card = exo_models.model_cards.setdefault(name, {"layers": entry.n_layers, "repo": {}})
            card.setdefault("repo", {})[ENGINE_CLASSNAME] = repo
            card.setdefault("layers", entry.n_layers)
        exo_models.pretty_name.setdefault(entry.model_id, f"{entry.name} (RKLLM)")


def _setup_logging(config: Config) -> None:
    logger = logging.getLogger("exo_rkllm")
    logger.setLevel(config.log_level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s exo-rkllm %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False


def on_engine_end(request_id: str, ending: RequestEnding) -> "asyncio.Future[Any] | None":
    """The engine ended a request otherwise than by the model's end of answer: tell its feed on this
    node, and the other nodes (the HTTP request may be on another one). The engine awaits the
    message before it hands exo the last token, so it reaches the API node first."""
    _feeds.hint(request_id, ending)
    message = ended_message(request_id, ending.finish_reason, ending.error)
    if _ring is not None and _ring.runs_for(request_id):
        return asyncio.ensure_future(_ring.tell_origin(request_id, message))
    return _broadcast(request_id, message)


def _broadcast(request_id: str, message: str) -> "asyncio.Future[Any] | None":
    """Send an exo status message to every node (this one included); the task, to await if needed."""
    node = _node
    if node is None or not getattr(node, "peers", None):
        return None
    try:
        return asyncio.get_running_loop().create_task(node.broadcast_opaque_status(request_id, message))
    except RuntimeError:
        return None


_node: Any = None
_ring: Ring | None = None  # this node's part in the ring (exo_glue/ring.py), once exo's API is built


# -- patches: exo.helpers ----------------------------------------------------------------------------
def _patch_helpers(module: types.ModuleType) -> None:
    original = module.shutdown

    async def shutdown(signal: Any, loop: Any, server: Any) -> None:
        """exo's shutdown, in an order that lets every client hear how its request ended.

        exo's own cancels every task at once, the one running main() included, then awaits
        server.stop(): main() ends first, the loop stops, and this task is destroyed while
        pending. Here the NPU stops first (each running or waiting request ends with an error
        its client receives), the HTTP requests get a moment to write it, the gRPC server stops,
        and main() is cancelled last, with nothing awaited after it."""
        engine = _engine
        if engine is None:
            return await original(signal, loop, server)
        print(f"Received exit signal {getattr(signal, 'name', signal)}...")
        try:
            await asyncio.wait_for(engine.shutdown(), timeout=10)
        except Exception as exc:
            log.error("rkllm engine did not shut down cleanly: %r", exc)
        deadline = loop.time() + SHUTDOWN_DRAIN_S
        while len(_feeds) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        me = asyncio.current_task()
        main = [t for t in asyncio.all_tasks() if _runs_exo_main(t)]
        others = [t for t in asyncio.all_tasks() if t is not me and t not in main]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        try:
            await server.stop()
        except Exception as exc:
            log.debug("exo's server did not stop cleanly: %r", exc)
        for task in main:
            task.cancel()

    shutdown.__wrapped__ = original  # type: ignore[attr-defined]
    module.shutdown = shutdown


def _runs_exo_main(task: "asyncio.Task[Any]") -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and code.co_name == "main" and code.co_filename.replace("\\", "/").endswith("exo/main.py")


# -- patches: exo.inference.inference_engine ------------------------------------------------------
def _patch_inference_engine(module: types.ModuleType) -> None:
    original: Callable[..., Any] = module.get_inference_engine

    def get_inference_engine(inference_engine_name: str, shard_downloader: Any):
        if inference_engine_name == ENGINE_NAME:
            return make_engine(shard_downloader)
        return original(inference_engine_name, shard_downloader)

    get_inference_engine.__wrapped__ = original  # type: ignore[attr-defined]
    module.get_inference_engine = get_inference_engine
    module.inference_engine_classes[ENGINE_NAME] = ENGINE_CLASSNAME


# -- patches: exo.inference.tokenizers -------------------------------------------------------------
def _patch_tokenizers(module: types.ModuleType) -> None:
    original = module.resolve_tokenizer

    async def resolve_tokenizer(repo_id: Any):
        model_id = _repo_to_model.get(str(repo_id))
        if model_id is None:
            return await original(repo_id)
        engine = _engine
        if engine is None:
            raise RKLLMError(f"model {model_id} belongs to the rkllm engine, which is not running")
        tokenizer = (await asyncio.to_thread(engine.model_for, model_id)).tokenizer
        return tokenizer

    resolve_tokenizer.__wrapped__ = original  # type: ignore[attr-defined]
    module.resolve_tokenizer = resolve_tokenizer


# -- patches: exo.orchestration.node ----------------------------------------------------------------
def _is_ours(engine: Any) -> bool:
    return isinstance(engine, RKLLMInferenceEngine)


def _patch_node(module: types.ModuleType) -> None:
    node_cls = module.Node
    original_supported = node_cls.get_supported_inference_engines
    original_select = node_cls.select_best_inference_engine

    def get_supported_inference_engines(self):
        if _is_ours(self.inference_engine):
            return [ENGINE_NAME]
        return original_supported(self)

    async def select_best_inference_engine(self):
        # exo would replace any engine but MLX with a fresh tinygrad one when peers join.
        if _is_ours(self.inference_engine):
            await self.broadcast_supported_engines([ENGINE_NAME])
            return
        return await original_select(self)

    original_shard = node_cls.get_current_shard
    original_forward = node_cls.forward_tensor
    original_broadcast = node_cls.broadcast_result

    def get_current_shard(self, base_shard, index=None):
        # RKLLM runs whole models: whichever node is asked to run a request runs every layer of it.
        if _is_ours(self.inference_engine):
            from exo.inference.shard import Shard

            return Shard(base_shard.model_id, 0, base_shard.n_layers - 1, base_shard.n_layers)
        return original_shard(self, base_shard, index)

    async def forward_tensor(self, base_shard, tensor, request_id, target_index, inference_state=None):
        # The next token of a request stays on the node running it: no hop per token.
        if _is_ours(self.inference_engine):
            return await self.process_tensor(base_shard, tensor, request_id, inference_state)
        return await original_forward(self, base_shard, tensor, request_id, target_index, inference_state)

    async def broadcast_result(self, request_id, result, is_finished):
        # A token goes to the node whose API serves the request, not to every peer.
        if _is_ours(self.inference_engine) and _ring is not None and _ring.runs_for(request_id):
            return await _ring.send_result(request_id, [int(t) for t in result], is_finished)
        return await original_broadcast(self, request_id, result, is_finished)

    for name, patched, original in (("get_current_shard", get_current_shard, original_shard),
                                    ("forward_tensor", forward_tensor, original_forward),
                                    ("broadcast_result", broadcast_result, original_broadcast)):
        patched.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(node_cls, name, patched)
    node_cls.get_supported_inference_engines = get_supported_inference_engines
    node_cls.select_best_inference_engine = select_best_inference_engine


# -- the node port on exo's Node ----------------------------------------------------------------------
class ExoNodePort:
    """The handlers' port (exo_rkllm/api/port.py) on exo's real Node. A request runs whole on the node
    the ring's placement picks (exo_glue/ring.py): this node, with `node.process_prompt`, as exo's own
    handler would send it; or a peer, with exo's `send_prompt`, after the request's context (a status
    message: exo's gRPC cannot carry a non-tensor inference_state on Linux). Its tokens come back
    through `node.on_token`, whichever node sampled them."""

    def __init__(self, node: Any, ring: Ring) -> None:
        self.node = node
        self.ring = ring
        self._tasks: set[asyncio.Task[Any]] = set()
        node.on_token.register("exo-rkllm-api").on_next(self._on_token)

    async def submit(self, submission: Submission, stop_ids: frozenset[int]) -> TokenFeed:
        from exo.models import build_base_shard

        rid = submission.request_id
        feed = _feeds.open(rid, stop_ids)
        base = build_base_shard(submission.model_id, ENGINE_CLASSNAME)
        if base is None:
            feed.fail(ModelNotFound(f"exo has no model card for {submission.model_id!r}"))
            return feed
        shard = self.node.get_current_shard(base)  # the whole model (patched above)
        tried: set[str] = set()
        while True:
            try:
                placement = self.ring.choose(submission.model_id, submission.context.prompt_ids, exclude=tried)
            except RKLLMError as exc:
                feed.fail(exc)
                return feed
            target = placement.node_id
            self.ring.view.place(rid, target, handing=target != self.node.id)
            feed.node = target
            if target == self.node.id:
                log.debug("request %s runs here: %s", rid, placement.describe())
                self.node.inference_engine.set_request_context(rid, submission.context)
                self.ring.run_for(rid, self.node.id)
                work = self.node.process_prompt(shard, submission.prompt_text, rid)
                break
            log.info("request %s goes to node %s", rid, placement.describe())
            peer = self.ring.peer(target)
            status = json.dumps({"type": CONTEXT_STATUS, "request_id": rid, "origin": self.node.id,
                                 "context": submission.context.to_json()})
            if peer is not None and await self.ring.send(peer, status, rid):
                self.ring.view.handed(rid)
                work = peer.send_prompt(shard, submission.prompt_text, request_id=rid)
                break
            tried.add(target)  # unreachable now: the next best node
            self.ring.view.release(rid)
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._prompt_done(rid, t))
        return feed

    def _prompt_done(self, request_id: str, task: "asyncio.Task[Any]") -> None:
        self._tasks.discard(task)
        if task.cancelled():
            _feeds.fail(request_id, RequestCancelled("the request was cancelled"))
            return
        exc = task.exception()
        if exc is not None:
            _feeds.fail(request_id, exc if isinstance(exc, RKLLMError) else RKLLMError(f"exo failed the request: {exc!r}"))

    def _on_token(self, request_id: str, tokens: Any, is_finished: bool) -> None:
        _feeds.push(request_id, tokens, is_finished)  # the feed turns exo's numpy ints into ints
        self.ring.token_from(request_id)
        if is_finished and request_id in _feeds:
            # exo keeps every request's tokens in buffered_token_output; it writes the entry once more
            # after this callback, so drop it right after.
            asyncio.get_running_loop().call_soon(self._drop_buffers, request_id)

    def _drop_buffers(self, request_id: str) -> None:
        buffered = getattr(self.node, "buffered_token_output", None)
        if isinstance(buffered, dict):
            buffered.pop(request_id, None)

    def served_elsewhere(self) -> frozenset[str]:
        return self.ring.served_elsewhere()

    def cancel(self, request_id: str, reason: str) -> None:
        _cancel_everywhere(self.node.inference_engine, request_id, reason)

    def release(self, request_id: str) -> None:
        _feeds.close(request_id)
        self.ring.view.release(request_id)
        self.node.inference_engine.drop_request_context(request_id)


# -- patches: exo.api.chatgpt_api -------------------------------------------------------------------
def _patch_chatgpt_api(module: types.ModuleType) -> None:
    """For our engine, exo's API serves through exo_rkllm.api's handlers: exo's chat handler, its
    timeout (which writes a 408 inside a started stream) and its open CORS stay out of the path."""
    api_cls = module.ChatGPTAPI
    original_init = api_cls.__init__
    originals = {name: getattr(api_cls, name) for name in (
        "handle_post_chat_completions", "handle_get_models", "handle_post_chat_token_encode",
        "handle_get_initial_models", "handle_model_support")}
    if hasattr(sys.modules.get("exo.inference.tokenizers"), "resolve_tokenizer"):
        module.resolve_tokenizer = sys.modules["exo.inference.tokenizers"].resolve_tokenizer

    def __init__(self, node, inference_engine_classname, *args, **kwargs):
        original_init(self, node, inference_engine_classname, *args, **kwargs)
        engine = node.inference_engine
        if not _is_ours(engine):
            return
        global _node, _ring
        _node = node
        if _ring is None or _ring.node is not node:
            _ring = Ring(node, engine, engine.config, on_lost=_lost)
        ids = _servable_ids(engine)
        if ids and self.default_model not in ids:
            self.default_model = ids[0]
        node.on_token.register("exo-rkllm").on_next(
            lambda rid, tokens, is_finished: on_token(node.inference_engine, rid, tokens, is_finished))
        node.on_opaque_status.register("exo-rkllm").on_next(
            lambda rid, status: on_opaque_status(node.inference_engine, rid, status))
        self.token_callback.on_next(lambda *args: None)  # exo's own token queues: unused for our models
        server = OpenAIServer(engine, ExoNodePort(node, _ring), engine.config, default_model=lambda: self.default_model,
                              response_timeout=self.response_timeout,
                              system_prompt=getattr(self, "system_prompt", None), on_models_listed=register_model_cards)
        self._exo_rkllm_server = server
        mount(self.app, server, engine.config, exo_timeout=self.timeout_middleware,
              response_timeout=lambda: self.response_timeout, tinychat_dir=getattr(self, "static_dir", None),
              default_model=lambda: self.default_model)
        self.app.router.add_get("/v1/rkllm/status", lambda request: _status(engine))
        self.app.router.add_post("/v1/rkllm/load", lambda request: _load_route(engine, request))
        self.app.router.add_post("/v1/rkllm/unload", lambda request: _unload_route(engine, request))
        self.app.on_startup.append(lambda app: _on_api_startup(engine))

    def ours(name: str, method: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        async def handler(self, request):
            server = getattr(self, "_exo_rkllm_server", None)
            if server is None:
                return await originals[name](self, request)
            return await method(self, server, request)

        handler.__name__ = name
        handler.__wrapped__ = originals[name]  # type: ignore[attr-defined]
        return handler

    async def get_initial_models(self, server, request):
        from aiohttp import web

        entries = server.listed()
        return web.json_response({e.model_id: {"name": f"{e.name} (RKLLM)",
                                               **_downloaded(e),
                                               "loading": server.engine.model_status(e.model_id).value == "loading"}
                                  for e in entries})

    async def model_support(self, server, request):
        from aiohttp import web

        response = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream",
                                                           "Cache-Control": "no-cache"})
        await response.prepare(request)
        for e in server.listed():
            payload = {e.model_id: _downloaded(e)}
            await response.write(f"data: {json.dumps(payload)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    api_cls.__init__ = __init__
    api_cls.handle_post_chat_completions = ours("handle_post_chat_completions", lambda self, s, r: s.chat(r))
    api_cls.handle_get_models = ours("handle_get_models", lambda self, s, r: s.models(r))
    api_cls.handle_post_chat_token_encode = ours("handle_post_chat_token_encode", lambda self, s, r: s.token_encode(r))
    api_cls.handle_get_initial_models = ours("handle_get_initial_models", get_initial_models)
    api_cls.handle_model_support = ours("handle_model_support", model_support)


def mount(app: Any, server: OpenAIServer, config: Config, *, exo_timeout: Any = None,
          response_timeout: Callable[[], float] | None = None, tinychat_dir: Any = None,
          default_model: Callable[[], str] | None = None) -> None:
    """Our routes and middlewares on exo's app (exo's own chat/models/encode routes already call
    the server, through the patched methods): the routes exo lacks, OpenAI-shaped errors under
    /v1/, the API key, origin checks and admin-route gate, exo's timeout kept for exo's other
    routes only, and tinychat's default model set to one this engine serves."""
    from aiohttp import web

    routes = server.routes()
    for route in routes:
        if not any(getattr(res, "canonical", None) == route.path and route.method in _methods(res)
                   for res in app.router.resources()):
            app.router.add_route(route.method, route.path, route.handler)
    ours = {route.path for route in routes}

    def is_ours(request: Any) -> bool:
        return request.path in ours or request.path.startswith("/v1/models/")

    middlewares = list(app.middlewares)
    if exo_timeout is not None and exo_timeout in middlewares:
        @web.middleware
        async def exo_timeout_elsewhere(request, handler):
            if is_ours(request) or response_timeout is None:
                return await handler(request)
            try:
                return await asyncio.wait_for(handler(request), timeout=response_timeout())
            except asyncio.TimeoutError:
                return web.json_response({"detail": "Request timed out"}, status=408)

        middlewares[middlewares.index(exo_timeout)] = exo_timeout_elsewhere
    front = [*security_middlewares(config), openai_json_errors()]
    if tinychat_dir is not None and default_model is not None:
        front.append(_tinychat_default(tinychat_dir, default_model))
    app.middlewares[:] = front + middlewares
    app.on_response_prepare.append(strip_foreign_cors(config))


def _methods(resource: Any) -> set[str]:
    return {getattr(r, "method", "") for r in resource}


TINYCHAT_DEFAULT = "llama-3.2-1b"
# How exo's web chat reads a stream, and how it must read ours: it indexes choices[0] of every chunk
# (an error chunk has none: it crashed and showed "Cannot read properties of undefined", then, 30 s
# later, a shorter answer that looked finished), and stops only at finish_reason "stop" (after a
# "length" end it parsed "[DONE]" as JSON and failed a good answer). Each fix applies only where
# exo's script reads exactly so; anything else is served as it is.
TINYCHAT_FIXES: tuple[tuple[str, str], ...] = (
    ("const json = JSON.parse(value.data);",
     'if (value.data === "[DONE]") break; const json = JSON.parse(value.data); '
     'if (json.error) throw new Error(json.error.message || "the answer failed");'),
    ("if (json.choices) {", "if (json.choices && json.choices.length) {"),
    ('if (choice.finish_reason === "stop") break;', "if (choice.finish_reason) break;"),
)


def tinychat_script(text: str, default_model: str | None) -> str:
    """exo's web chat script as this engine serves it: its default model one this engine serves,
    and its stream reader able to show an error chunk's message."""
    if default_model:
        text = text.replace(f"'{TINYCHAT_DEFAULT}'", json.dumps(default_model))
    for old, new in TINYCHAT_FIXES:
        text = text.replace(old, new)
    return text


def _tinychat_default(static_dir: Any, default_model: Callable[[], str]) -> Any:
    """exo's web chat starts on `llama-3.2-1b`, which this engine does not serve, so its first
    message failed; and it could not show an error in the middle of an answer. Its script is
    served through `tinychat_script`."""
    from pathlib import Path

    from aiohttp import web

    script = Path(static_dir) / "index.js"

    @web.middleware
    async def tinychat(request, handler):
        if request.method != "GET" or request.path != "/index.js" or not script.is_file():
            return await handler(request)
        text = await asyncio.to_thread(script.read_text, encoding="utf-8")
        return web.Response(text=tinychat_script(text, default_model()), content_type="application/javascript",
                            headers={"Cache-Control": "no-cache"})

    return tinychat


def _servable_ids(engine: RKLLMInferenceEngine) -> list[str]:
    return [e.model_id for e in engine.catalog.servable()]


def _downloaded(entry: ModelEntry) -> dict[str, Any]:
    """What tinychat's model list wants of a model that is on disk (it is, whole)."""
    try:
        size = entry.model_file.stat().st_size if entry.model_file else 0
    except OSError:
        size = 0
    return {"downloaded": True, "download_percentage": 100, "total_size": size, "total_downloaded": size}


def _cancel_everywhere(engine: RKLLMInferenceEngine, request_id: str, reason: str) -> None:
    engine.cancel_request(request_id, reason)
    _broadcast(request_id, json.dumps({"type": CANCEL_STATUS, "request_id": request_id, "reason": reason}))


async def _status(engine: RKLLMInferenceEngine) -> Any:
    """GET /v1/rkllm/status: what the NPU is doing, and how much per-request state is held."""
    from aiohttp import web

    scheduler = engine._scheduler
    body: dict[str, Any] = {"backend": engine.config.backend, "plugin": plugin_state_sizes(),
                            "engine": {"contexts": len(engine._contexts)}}
    if scheduler is not None:
        caps = scheduler.runtime.capabilities
        loaded = scheduler.runtime.loaded
        body.update(runtime={"backend": caps.backend, "version": caps.version},
                    loaded_model=loaded.model_id if loaded else None, running=scheduler.running_request,
                    queued=scheduler.queued, streams=len(scheduler.streams),
                    kv_cache_tokens=len(scheduler.kv_tokens) if scheduler.kv_tokens is not None else None,
                    prompt_cache=scheduler.saved.describe(),
                    recent=[asdict(r) for r in list(scheduler.history)[-5:]])
        if engine._lifecycle is not None:
            body.update(engine._lifecycle.status())
    if _ring is not None:
        body["ring"] = _ring.describe()
    return web.json_response(body)


async def _on_api_startup(engine: RKLLMInferenceEngine) -> None:
    engine.start_lifecycle()
    if _ring is not None:
        _ring.start()


def _lost(request_id: str, error: RKLLMError) -> None:
    """The node running one of this node's API requests is down: its client gets `error` now."""
    _feeds.fail(request_id, error)
    if _engine is not None:  # in case it only looks down (a partition): stop it there too
        _cancel_everywhere(_engine, request_id, str(error))


async def _model_request(request: Any, required: bool) -> tuple[str | None, Any]:
    """The `model` of a load/unload body: (name, None), or (None, the 400 answer)."""
    try:
        data = await request.json() if request.can_read_body else {}
    except (ValueError, RecursionError):
        return None, error_response(APIError(400, "the request body is not valid JSON", code="invalid_json"))
    name = data.get("model") if isinstance(data, dict) else None
    if (required or name is not None) and (not isinstance(name, str) or not name):
        return None, error_response(APIError(400, "'model' must name a model (see GET /v1/models)", param="model",
                                             code="invalid_model"))
    return name, None


async def _lifecycle_route(engine: RKLLMInferenceEngine, request: Any, load: bool) -> Any:
    from aiohttp import web

    name, refused = await _model_request(request, required=load)
    if refused is not None:
        return refused
    lifecycle = await engine.lifecycle()
    try:
        body = await (lifecycle.load(name) if load else lifecycle.unload(name))  # type: ignore[arg-type]
    except RKLLMError as exc:
        return error_response(APIError.from_rkllm(exc, redact=[engine.config.models_dir]))
    return web.json_response(body)


async def _load_route(engine: RKLLMInferenceEngine, request: Any) -> Any:
    """POST /v1/rkllm/load {"model"}: load it on the NPU now; answers once it is loaded."""
    return await _lifecycle_route(engine, request, load=True)


async def _unload_route(engine: RKLLMInferenceEngine, request: Any) -> Any:
    """POST /v1/rkllm/unload {"model"?}: unload the NPU's model (only if it is `model`, when given)."""
    return await _lifecycle_route(engine, request, load=False)


def plugin_state_sizes() -> dict[str, int]:
    """Per-request state the plugin holds (a test checks it drains to zero)."""
    return {"feeds": len(_feeds)}


_PATCHERS: dict[str, Callable[[types.ModuleType], None]] = {
    "exo.helpers": _patch_helpers,
    "exo.inference.inference_engine": _patch_inference_engine,
    "exo.inference.tokenizers": _patch_tokenizers,
    "exo.orchestration.node": _patch_node,
    "exo.api.chatgpt_api": _patch_chatgpt_api,
}
