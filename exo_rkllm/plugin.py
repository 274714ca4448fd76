"""Everything that touches legacy exo's internals, in one place.

exo has no plugin API, so this module patches a few of its functions when
they are imported (exo_rkllm/_autoload.py arranges that for a plain
`python -m exo.main`; `exo-rkllm serve` calls `install()` first):

- engine selection: `--inference-engine rkllm` builds our engine;
- model cards: every servable model of the catalog becomes an exo model
  (its repo is the local model folder, so no hub access is ever needed);
- peers joining never swap our engine for tinygrad;
- exo's ChatGPT API: `/v1/models` lists only what this engine serves; unknown
  or broken models get a clear 4xx; the text of every chunk is decoded exactly
  (no U+FFFD from split characters, no eos text); a client that disconnects,
  or an API timeout, aborts the request on the NPU (exo would not tell the
  engine); a failure after the first token reaches the client as an error, and
  an answer cut short says `length`, never `stop`.
- cluster: cancellations and failures travel to the other nodes as exo
  opaque-status messages, since the node running the model may not be the
  node serving the HTTP request.
"""
from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import sys
import types
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from . import ENGINE_CLASSNAME, ENGINE_NAME
from .api_text import CompletionText
from .catalog import ModelEntry
from .config import Config
from .engine import RKLLMInferenceEngine, RequestContext, RequestEnding, messages_from_openai
from .errors import RKLLMError
from .scheduler import Priority

log = logging.getLogger("exo_rkllm.plugin")

CANCEL_STATUS = "exo_rkllm_cancel"
CONTEXT_STATUS = "exo_rkllm_context"
ENDED_STATUS = "exo_rkllm_ended"
DISCONNECT_POLL_S = 0.1
SHUTDOWN_DRAIN_S = 3.0  # how long a stopping exo waits for open HTTP requests to write how they ended

_engine: RKLLMInferenceEngine | None = None
# One row per model folder the catalog ever listed (a path and an id): what exo's resolve_tokenizer
# needs to find our models; bounded by the folders on disk, like exo's own model_cards.
_repo_to_model: dict[str, str] = {}
# The tokenizers this plugin handed to exo's API, by object and only while they live: an id kept
# after its tokenizer was dropped (RKLLM_MODEL_CACHE) could name another object later.
_our_tokenizers: "weakref.WeakSet[Any]" = weakref.WeakSet()
_texts = CompletionText()
# How requests of this node's API ended, when exo cannot tell it from the tokens (see RequestEnding).
_endings: dict[str, RequestEnding] = {}
_current: contextvars.ContextVar["_HttpRequest | None"] = contextvars.ContextVar("exo_rkllm_http", default=None)
_active: dict[str, "_HttpRequest"] = {}


@dataclass
class _HttpRequest:
    """One chat-completion HTTP request and the exo request ids it produced."""

    request_ids: list[str] = field(default_factory=list)
    finished: set[str] = field(default_factory=set)
    disconnected: bool = False
    priority: Priority = Priority.INTERACTIVE


# -- entry points --------------------------------------------------------------------------------
def install() -> None:
    """Hook into exo: patch the exo modules already imported, and the rest when they are."""
    from . import _autoload

    _autoload.install(force=True)
    for name in _autoload._TARGETS:
        module = sys.modules.get(name)
        if module is not None:
            patch_module(module)


def patch_module(module: types.ModuleType) -> None:
    patcher = _PATCHERS.get(module.__name__)
    if patcher is not None and not getattr(module, "_exo_rkllm_patched", False):
        patcher(module)
        module._exo_rkllm_patched = True  # type: ignore[attr-defined]


def current_engine() -> RKLLMInferenceEngine | None:
    return _engine


# -- the pure pieces the tests' exo driver shares with the patches --------------------------------
def on_token(engine: RKLLMInferenceEngine, request_id: str, tokens: Any, is_finished: bool) -> None:
    """exo's node.on_token: the only signal that exo has ended a request (EOS or max tokens)."""
    if is_finished:
        engine.finish_request(request_id)
        http = _active.get(request_id)
        if http is not None:
            http.finished.add(request_id)


def on_opaque_status(engine: RKLLMInferenceEngine, request_id: str, status: str) -> None:
    """Cancellations, failures and request messages sent by the nodes of the ring (this one included)."""
    if "exo_rkllm_" not in status:
        return
    try:
        data = json.loads(status)
    except ValueError:
        return
    kind = data.get("type")
    rid = data.get("request_id") or request_id
    if kind == CANCEL_STATUS:
        engine.cancel_request(rid, data.get("reason", "cancelled by a peer"))
    elif kind == CONTEXT_STATUS and isinstance(data.get("messages"), list):
        tools = data.get("tools")
        engine.set_request_context(rid, RequestContext(messages_from_openai(data["messages"]),
                                                       tuple(tools) if tools else None,
                                                       _priority_named(data.get("priority"))
                                                       or Priority.INTERACTIVE))
    elif kind == ENDED_STATUS and rid in _active and rid not in _endings:
        reason = data.get("finish_reason")
        error = RKLLMError(data.get("message") or "the request failed") if reason == "error" else None
        _endings[rid] = RequestEnding("length" if reason == "length" else "error", error)


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
    """Fail at start-up, not at the first request, when no runtime can possibly be reached."""
    if config.backend == "sim":
        log.warning("RKLLM_BACKEND=sim: serving with the SIMULATED runtime (synthetic answers, no NPU)")
        return
    if config.backend != "auto":
        return
    from .runtime.factory import NO_RUNTIME_HELP

    try:
        from .runtime.native import find_library

        if find_library(config) is not None:
            return
    except ImportError:
        pass
    import socket
    from urllib.parse import urlparse

    url = urlparse(config.rkllama_url)
    try:
        with socket.create_connection((url.hostname or "localhost", url.port or 80),
                                      timeout=config.server_connect_timeout):
            return
    except OSError:
        pass
    raise SystemExit(f"exo-rkllm: {NO_RUNTIME_HELP}")


def register_model_cards(entries: list[ModelEntry]) -> None:
    try:
        from exo import models as exo_models
    except ImportError:
        return
    for entry in entries:
        if not entry.ok:
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


def on_engine_end(request_id: str, ending: RequestEnding) -> None:
    """The engine ended a request otherwise than by the model's end of answer: keep it for this
    node's API, and tell the other nodes (the HTTP request may be on another one)."""
    if request_id in _active:
        _endings.setdefault(request_id, ending)
    _broadcast(request_id, {"type": ENDED_STATUS, "request_id": request_id, "finish_reason": ending.finish_reason,
                            "message": str(ending.error) if ending.error else None})


def track(request_id: str, http: "_HttpRequest | None" = None) -> "_HttpRequest":
    """This node's API serves `request_id`: its ending is kept until `forget`."""
    http = http or _HttpRequest()
    if request_id not in http.request_ids:
        http.request_ids.append(request_id)
    _active[request_id] = http
    return http


def forget(request_id: str) -> None:
    """Drop every per-request entry the plugin holds for `request_id`."""
    _texts.forget(request_id)
    _endings.pop(request_id, None)
    _active.pop(request_id, None)


def finish_for(request_id: str, exo_finish_reason: str | None) -> tuple[str | None, dict[str, Any] | None]:
    """The finish_reason (and error object) the client must see, given what exo concluded.

    exo says `stop` whenever the last token is the eos, which the engine hands it after every
    end; the engine's RequestEnding says what really happened."""
    ending = _endings.get(request_id)
    if exo_finish_reason is None or ending is None:
        return exo_finish_reason, None
    if ending.finish_reason == "length":
        return "length", None
    error = failure(request_id)
    return "error", {"message": str(error), "type": "server_error", "code": error.code if error else None}


def failure(request_id: str) -> RKLLMError | None:
    """The error a request of this node's API ended with, if it failed."""
    ending = _endings.get(request_id)
    if ending is None or ending.finish_reason != "error":
        return None
    return ending.error or RKLLMError("the request failed")


def _broadcast(request_id: str, payload: dict[str, Any]) -> None:
    node = _node
    if node is None:
        return
    try:
        asyncio.get_running_loop().create_task(node.broadcast_opaque_status(request_id, json.dumps(payload)))
    except RuntimeError:
        pass


_node: Any = None


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
        while _active and loop.time() < deadline:
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
        _our_tokenizers.add(tokenizer)
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

    node_cls.get_supported_inference_engines = get_supported_inference_engines
    node_cls.select_best_inference_engine = select_best_inference_engine


# -- patches: exo.api.chatgpt_api -------------------------------------------------------------------
PRIORITY_HEADER = "X-Priority"
# Open WebUI's task prompts (title, tags, follow-ups, queries, autocomplete, emoji) all open so.
TASK_PROMPT_OPENING = "### Task:"


def _priority_named(value: Any) -> Priority | None:
    text = str(value).strip().lower() if isinstance(value, str) else ""
    return next((p for p in Priority if p.value == text), None)


def _text_of(content: Any) -> str:
    """A message's text: a string, or the text parts of an OpenAI content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def classify_request(data: dict[str, Any], headers: Any) -> Priority:
    """Who waits for a chat request, from the first rule that says:

    1. the `X-Priority` header, `background` or `interactive`;
    2. the request's own `"priority"` field, same values;
    3. a chat client's background task: the last user message opens with Open WebUI's task
       heading (`### Task:`, as its title, tags and follow-up prompts do);
    4. otherwise a streamed request is a person reading as it comes (interactive), and a
       non-streamed one (exo's default) is background: whoever sent it waits for all of it anyway."""
    named = _priority_named(headers.get(PRIORITY_HEADER)) or _priority_named(data.get("priority"))
    if named is not None:
        return named
    users = [m for m in data.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    if users and _text_of(users[-1].get("content")).lstrip().startswith(TASK_PROMPT_OPENING):
        return Priority.BACKGROUND
    return Priority.INTERACTIVE if data.get("stream") else Priority.BACKGROUND


def _error(status: int, message: str, code: str) -> Any:
    from aiohttp import web

    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": code},
                              "detail": message},
                             status=status)


def _patch_chatgpt_api(module: types.ModuleType) -> None:
    api_cls = module.ChatGPTAPI
    original_init = api_cls.__init__
    original_chat = api_cls.handle_post_chat_completions
    original_models = api_cls.handle_get_models
    original_initial = api_cls.handle_get_initial_models
    original_modelpool = api_cls.handle_model_support
    original_generate_completion = module.generate_completion
    if hasattr(sys.modules.get("exo.inference.tokenizers"), "resolve_tokenizer"):
        module.resolve_tokenizer = sys.modules["exo.inference.tokenizers"].resolve_tokenizer

    def __init__(self, node, inference_engine_classname, *args, **kwargs):
        original_init(self, node, inference_engine_classname, *args, **kwargs)
        engine = node.inference_engine
        if not _is_ours(engine):
            return
        global _node
        _node = node
        if self.default_model not in _servable_ids(engine):
            ids = _servable_ids(engine)
            if ids:
                self.default_model = ids[0]
        node.on_token.register("exo-rkllm").on_next(
            lambda rid, tokens, is_finished: on_token(node.inference_engine, rid, tokens, is_finished))
        node.on_opaque_status.register("exo-rkllm").on_next(
            lambda rid, status: on_opaque_status(node.inference_engine, rid, status))
        upstream = self.on_chat_completion_request

        def on_chat_completion_request(request_id, chat_request, prompt):
            http = _current.get()
            if http is not None:
                track(request_id, http)
            context = RequestContext(messages_from_openai(chat_request.messages),
                                     tuple(chat_request.tools) if chat_request.tools else None,
                                     http.priority if http is not None else Priority.INTERACTIVE)
            engine.set_request_context(request_id, context)
            if node.peers:  # the node running the model may be another one (and exo's gRPC cannot
                # carry a non-tensor inference_state on Linux), so send the messages as a status
                _broadcast(request_id, {"type": CONTEXT_STATUS, "request_id": request_id,
                                        "messages": [{"role": m.role, "content": m.content} for m in context.messages],
                                        "tools": list(context.tools) if context.tools else None,
                                        "priority": context.priority.value})
            if upstream:
                upstream(request_id, chat_request, prompt)

        self.on_chat_completion_request = on_chat_completion_request
        self.app.router.add_get("/v1/rkllm/status", lambda request: _status(engine))
        self.app.router.add_post("/v1/rkllm/load", lambda request: _load_route(engine, request))
        self.app.router.add_post("/v1/rkllm/unload", lambda request: _unload_route(engine, request))
        self.app.on_startup.append(lambda app: _on_api_startup(engine))

    async def handle_post_chat_completions(self, request):
        engine = self.node.inference_engine
        if not _is_ours(engine):
            return await original_chat(self, request)
        try:
            data = await request.json()
        except ValueError:
            return _error(400, "the request body is not valid JSON", "invalid_json")
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list) or not data["messages"]:
            return _error(400, "'messages' must be a non-empty list", "invalid_messages")
        for m in data["messages"]:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                return _error(400, "every message needs 'role' and 'content'", "invalid_messages")
        name = data.get("model") or self.default_model
        if name.startswith("gpt-"):
            name = self.default_model
        entry, refused = await asyncio.to_thread(_check_model, engine, name)  # may scan disk, load a tokenizer
        if refused is not None:
            return refused
        register_model_cards([entry])  # a model added while exo runs becomes an exo model now
        http = _HttpRequest(priority=classify_request(data, request.headers))
        token = _current.set(http)
        watcher = asyncio.ensure_future(_watch_disconnect(request, http, engine))
        try:
            response = await original_chat(self, request)
        except BaseException:
            # Client gone (aiohttp may cancel us), the API's own timeout, or a bug in exo's handler:
            # whatever exo did not finish must not keep the NPU.
            _release(self, engine, http, "the API timed out or the handler failed")
            raise
        finally:
            watcher.cancel()
            _current.reset(token)
        failed = next((e for e in map(failure, http.request_ids) if e is not None), None)
        _release(self, engine, http, "client disconnected" if http.disconnected else "the API handler ended")
        if failed is not None and not getattr(response, "prepared", False):
            # Nothing was sent yet (a non-streamed answer, or a failure before the first token):
            # answer with the engine's own status and message instead of exo's generic 500.
            return _error(failed.http_status, str(failed), failed.code)
        return response

    async def handle_get_models(self, request):
        engine = self.node.inference_engine
        if not _is_ours(engine):
            return await original_models(self, request)
        from aiohttp import web

        entries = await asyncio.to_thread(engine.catalog.refresh)
        register_model_cards(entries)
        data = [{"id": e.model_id, "object": "model", "created": int(e.model_file.stat().st_mtime) if e.model_file
                 and e.model_file.exists() else 0, "owned_by": "exo-rkllm", "ready": status.ready,
                 "status": status.value, "context_length": e.context_len, "aliases": list(e.aliases)}
                for e in entries if e.ok for status in [engine.model_status(e.model_id)]]
        return web.json_response({"object": "list", "data": data})

    async def handle_get_initial_models(self, request):
        engine = self.node.inference_engine
        if not _is_ours(engine):
            return await original_initial(self, request)
        from aiohttp import web

        return web.json_response({e.model_id: {"name": f"{e.name} (RKLLM)", "downloaded": True,
                                               "download_percentage": 100, "total_size": _size(e),
                                               "total_downloaded": _size(e), "loading": False}
                                  for e in engine.catalog.servable()})

    async def handle_model_support(self, request):
        engine = self.node.inference_engine
        if not _is_ours(engine):
            return await original_modelpool(self, request)
        from aiohttp import web

        response = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream",
                                                           "Cache-Control": "no-cache"})
        await response.prepare(request)
        for e in engine.catalog.servable():
            payload = {e.model_id: {"downloaded": True, "download_percentage": 100, "total_size": _size(e),
                                    "total_downloaded": _size(e)}}
            await response.write(f"data: {json.dumps(payload)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    def generate_completion(chat_request, tokenizer, prompt, request_id, tokens, stream, finish_reason,
                            object_type):
        completion = original_generate_completion(chat_request, tokenizer, prompt, request_id, tokens, stream,
                                                  finish_reason, object_type)
        if tokenizer not in _our_tokenizers:
            return completion
        if stream:
            text = _texts.chunk(request_id, tokenizer, tokens, finish_reason is not None)
        else:
            text = CompletionText.full(tokenizer, tokens)
        choice = completion["choices"][0]
        for key in ("message", "delta"):
            if key in choice:
                choice[key]["content"] = text
        if "text" in choice:
            choice["text"] = text
        choice["finish_reason"], error = finish_for(request_id, finish_reason)
        if error is not None:
            completion["error"] = error
        return completion

    api_cls.__init__ = __init__
    api_cls.handle_post_chat_completions = handle_post_chat_completions
    api_cls.handle_get_models = handle_get_models
    api_cls.handle_get_initial_models = handle_get_initial_models
    api_cls.handle_model_support = handle_model_support
    module.generate_completion = generate_completion


def _servable_ids(engine: RKLLMInferenceEngine) -> list[str]:
    return [e.model_id for e in engine.catalog.servable()]


def _size(entry: ModelEntry) -> int:
    try:
        return entry.model_file.stat().st_size if entry.model_file else 0
    except OSError:
        return 0


def _check_model(engine: RKLLMInferenceEngine, name: str) -> tuple[ModelEntry | None, Any]:
    """(entry, None) if `name` can be served; else (None, the error response that says why)."""
    try:
        entry = engine.catalog.resolve(name)
        engine.model_for(entry.model_id)  # tokenizer problems surface here, before exo's 500
    except RKLLMError as exc:
        code = "model_not_found" if exc.http_status == 404 else "model_unavailable"
        return None, _error(exc.http_status, str(exc), code)
    return entry, None


async def _watch_disconnect(request: Any, http: _HttpRequest, engine: RKLLMInferenceEngine) -> None:
    """exo never notices a client that went away; poll the connection and abort its work."""
    while True:
        await asyncio.sleep(DISCONNECT_POLL_S)
        transport = request.transport
        if transport is None or transport.is_closing():
            http.disconnected = True
            for rid in http.request_ids:
                if rid not in http.finished:
                    log.info("request %s: client disconnected, aborting its generation", rid)
                    _cancel_everywhere(engine, rid, "client disconnected")
            return


def _cancel_everywhere(engine: RKLLMInferenceEngine, request_id: str, reason: str) -> None:
    engine.cancel_request(request_id, reason)
    _broadcast(request_id, {"type": CANCEL_STATUS, "request_id": request_id, "reason": reason})


def _release(api: Any, engine: RKLLMInferenceEngine, http: _HttpRequest, reason: str) -> None:
    """The HTTP request is over: whatever exo did not finish is cancelled, and nothing is kept."""
    for rid in http.request_ids:
        if rid not in http.finished:
            _cancel_everywhere(engine, rid, reason)
        else:
            api.token_queues.pop(rid, None)  # exo keeps these for non-streamed answers
            buffered = getattr(api.node, "buffered_token_output", None)
            if isinstance(buffered, dict):
                buffered.pop(rid, None)
        engine._contexts.pop(rid, None)
        forget(rid)


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
                    recent=[asdict(r) for r in list(scheduler.history)[-5:]])
        if engine._lifecycle is not None:
            body.update(engine._lifecycle.status())
    return web.json_response(body)


async def _on_api_startup(engine: RKLLMInferenceEngine) -> None:
    engine.start_lifecycle()


async def _model_request(request: Any, required: bool) -> tuple[str | None, Any]:
    """The `model` of a load/unload body: (name, None), or (None, the 400 answer)."""
    try:
        data = await request.json() if request.can_read_body else {}
    except ValueError:
        return None, _error(400, "the request body is not valid JSON", "invalid_json")
    name = data.get("model") if isinstance(data, dict) else None
    if (required or name is not None) and (not isinstance(name, str) or not name):
        return None, _error(400, "'model' must name a model (see GET /v1/models)", "invalid_model")
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
        return _error(exc.http_status, str(exc), exc.code)
    return web.json_response(body)


async def _load_route(engine: RKLLMInferenceEngine, request: Any) -> Any:
    """POST /v1/rkllm/load {"model"}: load it on the NPU now; answers once it is loaded."""
    return await _lifecycle_route(engine, request, load=True)


async def _unload_route(engine: RKLLMInferenceEngine, request: Any) -> Any:
    """POST /v1/rkllm/unload {"model"?}: unload the NPU's model (only if it is `model`, when given)."""
    return await _lifecycle_route(engine, request, load=False)


def plugin_state_sizes() -> dict[str, int]:
    """Per-request state the plugin holds (a test checks it drains to zero)."""
    return {"active": len(_active), "endings": len(_endings), "texts": len(_texts)}


_PATCHERS: dict[str, Callable[[types.ModuleType], None]] = {
    "exo.helpers": _patch_helpers,
    "exo.inference.inference_engine": _patch_inference_engine,
    "exo.inference.tokenizers": _patch_tokenizers,
    "exo.orchestration.node": _patch_node,
    "exo.api.chatgpt_api": _patch_chatgpt_api,
}
