"""A stand-in rkllama server (NotPunchnox/rkllama) on aiohttp, generating with the simulated runtime.

It follows what rkllama's own code does, generation by generation (written from reading
its tags 0.0.1/0.0.4 and its main branch, in our own words):

`api="early"` (to Feb 2025): `GET /` welcome JSON, `/models`, `/current_model`
    (`{"model_name"}` / 404), `/load_model` (400 while one is loaded), `/unload_model`,
    `/generate`. The server prepends its own system prompt ("Tu es un assistant
    artificiel.") and refuses two messages of one role in a row with an uncaught
    exception (HTTP 500, an HTML page). `/generate` streams only with `"stream": true`
    (its non-stream branch crashes: 500), as text/plain: one whole `rkllm_chat` object per
    token followed by a blank line, `finish_reason` null throughout, and no closing object:
    the stream just ends. `/api/*` is 404.
`api="ollama-single"` (Mar-Aug 2025): the early routes plus `/api/version` ("0.5.1"),
    `/api/tags`, `/api/show`, `/api/chat`, `/api/generate`; still one model, switched on demand.
`api="ollama"` (Aug 2025 on, with model workers): `/api/version` ("0.0.74"), `/api/ps`,
    `/v1/models`, `/current_models`, `/load_model` and `/unload_model` taking
    `{"model_name"}`; early `/generate` answers 400 (its global model is never set).
    `version=` plays another release of this generation (0.0.43 on, when workers came).

Options and sampling (the worker generation): every generation and embedding request's
`options` are merged as rkllama's `get_model_full_options` does (its defaults, then the
Modelfile's keys lower-cased, then the request's non-empty values as text, `num_predict`
renamed `max_new_tokens`). The request that loads a model gives it its load-time settings
(sampling and max_new_tokens, as rkllm_init takes them). From 0.0.73 (runtime 1.3.0) each
run also gets the merged sampling and max_new_tokens of its own request (top_k and
max_new_tokens read with int(), the rest with float(), as rkllama does); before, nothing per
run. No version reads `seed`. `Received.options` is what a request carried,
`Received.applied_options` the merged result; the simulator's run records
(`state.sim.runs`) show what the run applied. The simulator imitates the runtime rkllama
ships: 1.3.0 from 0.0.73, 1.2.3 before.

Embeddings (0.0.43 on): `POST /api/embed` and `/api/embeddings` take `{"model", "input"}`
(`"prompt"` too; a string or a list) and answer `{"model", "embeddings": [[...], ...],
"total_duration", "load_duration", "prompt_eval_count"}`, one vector per input: the last
token's row of the simulator's last hidden layer, as rkllama's callback keeps it (not
normalised). `/v1/embeddings` answers OpenAI's shape with every vector concatenated into
one `data[0].embedding`, as rkllama's converter does. One simplification: the text is
tokenized plainly, where rkllama passes it to the runtime as a prompt. The one-model
Ollama-style generation answers `/api/embeddings` with 501; the early one has no route.

`/api/chat` and `/api/generate` stream NDJSON (`stream` defaults to true): one line per
piece, `{"model", "created_at", "message": {"role": "assistant", "content"}, "done": false}`
(`"response"` for generate), then a last line with `"done": true`, `"done_reason"` and the
counters. System messages are moved to the front, tools go to the chat template, and with
tools the first pieces are held back while a `<tool_call>` may be coming; a tool call is
sent as `message.tool_calls` with `done_reason: "tool_calls"`.

Streamed answers go out as rkllama's Flask server sends them, in every generation: no status
line and no headers until the first piece (or error line) is written, so a client waiting for a
slow prefill has no response at all yet (`Received.headers_at`).

Only what the request carries is templated: rkllama reads a Modelfile's `SYSTEM` for `/api/show`
(and writes it when pulling a model), but no version applies it to `/api/chat`, `/api/generate`
or `/generate`; this fake does not either. The early generation's own system prompt is a constant
of its code, not the Modelfile's.

The server templates every request with the model's tokenizer (add_generation_prompt) and
feeds the token ids to the simulator; each callback text becomes one piece (a character
split over two tokens arrives whole, as rkllama's callback joins it). Every request is
recorded (path, body, templated prompt, pieces sent, timings) for tests to inspect.

What a client cannot stop: a client that goes away does not stop the generation. The
one-model generations share one token list between requests, so an abandoned answer's
remaining text is read by the next request (and a request started meanwhile finds the
runtime busy and returns what happens to be in the list); the worker generation runs
generations one after another, so the next request waits. `/unload_model` on the worker
generation waits for the running generation (up to `unload_grace_s`, 30 s in rkllama)
and then stops it.

One simplification: the worker generation also holds one model at a time (loading another
unloads the first); rkllama can keep several in memory.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from exo_rkllm.errors import RKLLMError
from exo_rkllm.runtime.base import EmbeddingInput, FinishEvent, GenerationInput, ModelSpec, SamplingParams, TokenEvent
from exo_rkllm.runtime.sim import SimRuntime, SimTiming
from exo_rkllm.models.tokenizer import has_tokenizer_files, load_tokenizer

log = logging.getLogger("fake_rkllama")

APIS = ("early", "ollama-single", "ollama")
EARLY_SYSTEM = "Tu es un assistant artificiel."
VERSIONS = {"ollama-single": "0.5.1", "ollama": "0.0.74"}
WORKERS_SINCE = (0, 0, 43)  # model workers and embeddings
PER_RUN_OPTIONS_SINCE = (0, 0, 73)  # options applied per run (runtime 1.3.0)
# rkllama's [model] defaults (config_schema.py), as get_model_full_options starts from them
DEFAULT_OPTIONS = {"temperature": "0.5", "num_ctx": "4096", "max_new_tokens": "1024", "top_k": "7", "top_p": "0.5",
                   "repeat_penalty": "1.1", "frequency_penalty": "0.0", "presence_penalty": "0.0", "mirostat": "0",
                   "mirostat_tau": "3", "mirostat_eta": "0.1"}
TOOL_WAIT_PIECES = 100  # rkllama holds back this many pieces while a tool call may be coming


@dataclass
class Faults:
    """One-shot faults: each applies to the next generation request, then clears itself."""

    fail_after: int | None = None  # drop the connection after N pieces (a crash mid-answer)
    malformed_after: int | None = None  # send one broken line after N pieces, then go on
    error_after: int | None = None  # send {"error": ...} after N pieces and end the answer
    first_token_delay_s: float = 0.0  # a slow prefill before the first piece
    http_error: tuple[int, Any] | None = None  # answer the request with this status and body
    stall_after: int | None = None  # go silent for stall_s after N pieces
    stall_s: float = 0.0

    def take(self) -> "Faults":
        taken = dataclasses.replace(self)
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.default)
        return taken


@dataclass
class Received:
    """One request as the server saw it, and what it sent back."""

    path: str
    body: Any
    model: str | None = None
    prompt: str | None = None  # the templated prompt the server built (None: not a generation)
    prompt_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    status: int = 200
    received_at: float = field(default_factory=time.monotonic)
    first_piece_at: float | None = None
    headers_at: float | None = None  # when the response headers went out (with the first content)
    finished_at: float | None = None
    disconnected: bool = False
    tool_calls: list[Any] | None = None
    options: Any = None  # the request's own `options`, as sent (None: it had none)
    applied_options: dict[str, str] | None = None  # merged as rkllama merges them (worker generation)
    embedded: list[list[int]] = field(default_factory=list)  # an embedding request: each input's token ids

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass
class _Model:
    name: str
    folder: Path
    file: Path
    modelfile: dict[str, str]


class _Body:
    """A streamed answer sent the way rkllama's Flask (werkzeug) server sends it: the status line
    and headers go out only with the first chunk of content, so a client that opened the request
    sees nothing at all until the first piece (or an error line, or the end of an empty answer).

    A client that went away is noticed at the next write, as with werkzeug."""

    def __init__(self, request: web.Request, rec: Received, content_type: str) -> None:
        self.request = request
        self.rec = rec
        self.resp = web.StreamResponse(headers={"Content-Type": content_type})

    async def _headers(self) -> None:
        if not self.resp.prepared:
            await self.resp.prepare(self.request)
            self.rec.headers_at = time.monotonic()

    async def write(self, data: bytes) -> bool:
        if self.rec.disconnected:
            return False
        try:
            await self._headers()
            await self.resp.write(data)
            return True
        except (ConnectionError, RuntimeError):
            self.rec.disconnected = True
            return False

    async def end(self) -> web.StreamResponse:
        self.rec.finished_at = time.monotonic()
        if not self.rec.disconnected:
            try:
                await self._headers()
                await self.resp.write_eof()
            except (ConnectionError, RuntimeError):
                self.rec.disconnected = True
        return self.resp


class _Run:
    """One generation on the simulated NPU: a task that turns callback events into pieces."""

    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.pieces: asyncio.Queue[str | None] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.error: str | None = None
        self.prompt_tokens = 0
        self.count = 0

    @property
    def done(self) -> bool:
        return self.task is not None and self.task.done()


class FakeRkllama:
    """The server's state: models folder, the one loaded model, the simulated runtime, records."""

    def __init__(self, models_dir: Path, api: str = "ollama", timing: SimTiming | None = None, *,
                 early_final_object: bool = False, unload_grace_s: float = 30.0,
                 early_system: str | None = EARLY_SYSTEM, version: str | None = None) -> None:
        if api not in APIS:
            raise ValueError(f"api must be one of {APIS}")
        if version is not None and api != "ollama":
            raise ValueError("only the worker generation (api='ollama') plays other versions")
        self.models_dir = Path(models_dir)
        self.api = api
        self.version = version or VERSIONS.get(api)
        release = _version_tuple(self.version) if api == "ollama" else None
        if api == "ollama" and (release is None or release < WORKERS_SINCE):
            raise ValueError(f"the worker generation is rkllama 0.0.43 or newer, not {self.version!r}")
        self.per_run_options = release is not None and release >= PER_RUN_OPTIONS_SINCE
        self.embeddings = api == "ollama"
        self.timing = timing or SimTiming.instant()
        self.early_final_object = early_final_object
        self.unload_grace_s = unload_grace_s
        self.early_system = early_system
        self.faults = Faults()
        self.received: list[Received] = []
        self.requested: list[tuple[str, str]] = []  # (method, path) of every request, bodies or not
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.transports: set[Any] = set()  # connections of requests in progress (a crash drops them)
        self.reset()

    def reset(self) -> None:
        """A fresh process: nothing loaded, nothing running."""
        self.sim = SimRuntime(self.timing, release="1.3.0" if self.per_run_options else "1.2.3")
        self.current: _Model | None = None
        self.global_text: collections.deque[str] = collections.deque()  # one-model generations
        self.text_added = asyncio.Event()
        self.worker_lock = asyncio.Lock()  # worker generation: one generation after another
        self.active: _Run | None = None
        self._seq = 0

    # -- models ----------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        if not self.models_dir.is_dir():
            return []
        return sorted(p.name for p in self.models_dir.iterdir() if p.is_dir() and any(p.glob("*.rkllm")))

    def find(self, name: str) -> _Model | None:
        name = name.split("/", 1)[1] if "/" in name else name  # Ollama namespaces
        folder = self.models_dir / name
        files = sorted(folder.glob("*.rkllm")) if folder.is_dir() else []
        if not files:
            return None
        modelfile: dict[str, str] = {}
        mf = folder / "Modelfile"
        if mf.is_file():
            for line in mf.read_text(encoding="utf-8").splitlines():
                if "=" in line and not line.lstrip().startswith("#"):
                    key, value = line.split("=", 1)
                    modelfile[key.strip().upper()] = value.strip().strip('"')
        wanted = modelfile.get("FROM")
        file = folder / wanted if wanted and (folder / wanted).is_file() else files[0]
        return _Model(name, folder, file, modelfile)

    def tokenizer(self, model: _Model) -> Any:
        sub = model.folder / "tokenizer"  # where rkllama's newer versions keep the tokenizer
        return load_tokenizer(sub if has_tokenizer_files(sub) else model.folder)

    def full_options(self, model: _Model | None, request_options: Any) -> dict[str, str]:
        """rkllama's get_model_full_options: its defaults, the Modelfile's keys, the request's."""
        merged = dict(DEFAULT_OPTIONS)
        for key, value in (model.modelfile.items() if model is not None else ()):
            if str(value).strip():
                merged[key.lower().strip()] = str(value).strip()
        if isinstance(request_options, dict):
            for key, value in request_options.items():
                if value is None or str(value).strip() == "":
                    continue
                key = key.lower().strip()
                merged["max_new_tokens" if key == "num_predict" else key] = str(value).strip()
        return merged

    async def load(self, name: str, options: dict[str, str] | None = None) -> str | None:
        """Load `name`, replacing the current model; returns an error text or None. The worker
        generation loads with the merged `options` of the request that asked (rkllm_init's
        sampling and max_new_tokens); the older ones with the runtime's defaults."""
        model = self.find(name)
        if model is None:
            return f"Model directory '{name}' not found."
        if self.current is not None:
            await self.unload()
        ctx = int(model.modelfile.get("MAX_CONTEXT_LEN") or 4096)
        sampling, max_new = SamplingParams(), 0
        if self.api == "ollama":
            try:
                sampling, max_new = _load_settings(options or self.full_options(model, None))
            except (KeyError, ValueError) as exc:
                return f"invalid model options: {exc}"
        spec = ModelSpec(model_id=name, path=model.file, max_context_len=ctx, max_new_tokens=max_new,
                         sampling=sampling, tokenizer_dir=model.folder)
        try:
            await self.sim.load(spec)
        except RKLLMError as exc:
            return str(exc)
        self.current = model
        self.loads.append(name)
        return None

    async def unload(self) -> None:
        run = self.active
        if run is not None and not run.done and run.task is not None:
            if self.api == "ollama":  # stop_worker: the worker finishes its task first, or is killed
                try:
                    await asyncio.wait_for(asyncio.shield(run.task), self.unload_grace_s)
                except asyncio.TimeoutError:
                    pass
            if not run.task.done():  # killed (or its runtime destroyed under it): the run ends now
                await self.sim.abort()
                run.task.cancel()
                try:
                    await run.task
                except (asyncio.CancelledError, Exception):
                    pass
        if self.current is not None:
            self.unloads.append(self.current.name)
        await self.sim.unload()
        self.current = None

    # -- generation --------------------------------------------------------------------------------
    def template(self, model: _Model, messages: list[dict[str, Any]], tools: Any = None,
                 system: str = "") -> tuple[str, list[int]]:
        """The prompt exactly as rkllama builds it: the model's chat template, once."""
        tok = self.tokenizer(model)
        msgs = [dict(m) for m in messages]
        supports_system = "raise_exception('System role not supported')" not in (tok.chat_template or "")
        if system and supports_system:
            msgs = [{"role": "system", "content": system}] + msgs
        if self.api == "early":
            for i in range(1, len(msgs)):
                if msgs[i]["role"] == msgs[i - 1]["role"]:
                    raise ValueError("Les rôles doivent alterner entre 'user' et 'assistant'.")
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
        if tools:
            kwargs["tools"] = tools
        prompt = tok.apply_chat_template(msgs, **kwargs)
        ids = [int(i) for i in tok(prompt, add_special_tokens=False)["input_ids"]]
        return prompt, ids

    def start_run(self, prompt_ids: list[int], delay_s: float, sampling: SamplingParams | None = None,
                  max_new_tokens: int = 0) -> _Run:
        self._seq += 1
        run = _Run(f"fake-{self._seq}")
        run.prompt_tokens = len(prompt_ids)
        shared = self.api != "ollama"

        async def body() -> None:
            if self.api == "ollama":
                await self.worker_lock.acquire()
            if self.api == "ollama" or self.active is None or self.active.done:
                self.active = run
            events = self.sim.generate(GenerationInput(run.rid, tuple(prompt_ids), sampling=sampling,
                                                       max_new_tokens=max_new_tokens))
            try:
                if delay_s:
                    await asyncio.sleep(delay_s)
                async for event in events:
                    if isinstance(event, TokenEvent) and event.text:
                        run.count += 1
                        if shared:
                            self.global_text.append(event.text)
                            self.text_added.set()
                        else:
                            run.pieces.put_nowait(event.text)
                    elif isinstance(event, FinishEvent):
                        break
            except RKLLMError as exc:  # busy, or the runtime reported ERROR: the answer just ends
                run.error = str(exc)
            finally:
                await events.aclose()  # the runtime thread has returned: the next run finds it idle
                if self.api == "ollama":
                    self.worker_lock.release()
                run.pieces.put_nowait(None)
                self.text_added.set()

        run.task = asyncio.ensure_future(body())
        return run

    async def pieces(self, run: _Run):
        """The pieces a request's handler sends, as rkllama's handlers read them."""
        if self.api == "ollama":  # the worker answers this request through its own pipe
            while True:
                piece = await run.pieces.get()
                if piece is None:
                    return
                yield piece
        else:  # the shared global_text list, read while this request's model thread is alive
            while True:
                while self.global_text:
                    yield self.global_text.popleft()
                if run.done:
                    return
                self.text_added.clear()
                if self.global_text:
                    continue
                await self.text_added.wait()


def _version_tuple(text: str | None) -> tuple[int, ...] | None:
    if not text or not re.fullmatch(r"\d+(\.\d+)*", text):
        return None
    return tuple(int(p) for p in text.split("."))


def _load_settings(options: dict[str, str]) -> tuple[SamplingParams, int]:
    """What rkllm_init gets from the merged options (rkllama's RKLLM.__init__: top_k via float())."""
    return (SamplingParams(top_k=int(float(options["top_k"])), top_p=float(options["top_p"]),
                           temperature=float(options["temperature"]), repeat_penalty=float(options["repeat_penalty"]),
                           frequency_penalty=float(options["frequency_penalty"]),
                           presence_penalty=float(options["presence_penalty"])),
            int(options["max_new_tokens"]))


def _run_settings(options: dict[str, str]) -> tuple[SamplingParams, int]:
    """What one run gets from them from 0.0.73 on (get_sampling_parameters: int() for top_k and
    max_new_tokens, so "40.0" fails there as it does in rkllama)."""
    return (SamplingParams(top_k=int(options["top_k"]), top_p=float(options["top_p"]),
                           temperature=float(options["temperature"]), repeat_penalty=float(options["repeat_penalty"]),
                           frequency_penalty=float(options["frequency_penalty"]),
                           presence_penalty=float(options["presence_penalty"])),
            int(options["max_new_tokens"]))


def _now() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _tool_calls(text: str) -> list[dict[str, Any]]:
    calls = []
    for body in re.findall(r"<tool_call>(.*?)</tool_call>", text, re.S):
        try:
            obj = json.loads(body.strip())
        except ValueError:
            continue
        if isinstance(obj, dict) and "name" in obj:
            calls.append({"function": {"name": obj["name"], "arguments": obj.get("arguments", obj.get("parameters", {}))}})
    return calls


def create_app(state: FakeRkllama) -> web.Application:
    """The aiohttp application speaking `state.api`."""
    api = state.api
    app = web.Application()
    routes = web.RouteTableDef()

    def record(request: web.Request, body: Any) -> Received:
        rec = Received(request.path, body)
        state.received.append(rec)
        return rec

    async def read_json(request: web.Request) -> Any:
        try:
            return await request.json(loads=json.loads)
        except ValueError:
            return None

    async def switch_to(rec: Received, name: str, options: dict[str, str] | None) -> web.Response | None:
        """Load `name` unless it is the current model, as the server does before a run; the 500 it answers
        when the load fails, else None."""
        if state.current is not None and state.current.name == name:
            return None
        error = await state.load(name, options)
        if not error:
            return None
        rec.status = 500
        return web.json_response({"error": f"Failed to load model '{name}': {error}"}, status=500)

    def html_500() -> web.Response:
        return web.Response(status=500, content_type="text/html",
                            text="<!doctype html>\n<html lang=en>\n<title>500 Internal Server Error</title>\n"
                                 "<h1>Internal Server Error</h1>\n<p>The server encountered an internal error and "
                                 "was unable to complete your request.</p>\n")

    # -- common routes --------------------------------------------------------------------------
    @routes.get("/")
    async def root(request: web.Request) -> web.Response:
        if api == "early":
            return web.json_response({"message": "Welcome to RKLLama !", "github": "https://github.com/notpunhnox/rk-llama"})
        return web.json_response({"message": "Welcome to RKLLama with Ollama API compatibility!",
                                  "github": "https://github.com/notpunhnox/rkllama"})

    @routes.get("/models")
    async def models(request: web.Request) -> web.Response:
        if not state.models_dir.exists():
            return web.json_response({"error": f"The models directory {state.models_dir} is not found."}, status=500)
        return web.json_response({"models": state.model_names()})

    @routes.post("/load_model")
    async def load_model(request: web.Request) -> web.Response:
        data = await read_json(request) or {}
        record(request, data)
        name = data.get("model_name")
        if api == "ollama":
            if name is None:
                return web.json_response({"error": "Please enter the name of the model to be loaded."}, status=400)
            if state.current is not None and state.current.name == name:
                return web.json_response({"error": "A model is already loaded. Nothing to do."})
        else:
            if state.current is not None:
                return web.json_response({"error": "A model is already loaded. Please unload it first."}, status=400)
            if name is None:
                return web.json_response({"error": "Please enter the name of the model to be loaded."}, status=400)
        error = await state.load(name)
        if error:
            return web.json_response({"error": error}, status=400)
        return web.json_response({"message": f"Model {name} loaded successfully."})

    @routes.post("/unload_model")
    async def unload_model(request: web.Request) -> web.Response:
        data = await read_json(request) or {}
        record(request, data)
        if api == "ollama":
            name = data.get("model_name")
            if name is None:
                return web.json_response({"error": "Please enter the name of the model to be unloaded."}, status=400)
            if state.current is None or state.current.name != name:
                return web.json_response({"error": f"No model {name} are currently loaded."}, status=400)
            await state.unload()
            return web.json_response({"message": f"Model {name} successfully unloaded!"})
        if state.current is None:
            return web.json_response({"error": "No models are currently loaded."}, status=400)
        await state.unload()
        return web.json_response({"message": "Model successfully unloaded!"})

    @routes.post("/generate")
    async def generate(request: web.Request) -> web.StreamResponse:
        data = await read_json(request)
        rec = record(request, data)
        if api == "ollama" or state.current is None:  # newer servers never set the early global model
            rec.status = 400
            return web.json_response({"error": "No models are currently loaded."}, status=400)
        if not data or "messages" not in data:
            rec.status = 400
            return web.json_response({"status": "error", "message": "Données JSON invalides !"}, status=400)
        faults = state.faults.take()
        if faults.http_error:
            rec.status = faults.http_error[0]
            return web.json_response(faults.http_error[1], status=faults.http_error[0])
        try:
            system = (state.early_system or "") if api == "early" else ""
            rec.prompt, rec.prompt_ids = state.template(state.current, data["messages"], system=system)
        except Exception:
            rec.status = 500
            return html_500()
        if data.get("stream") is not True:  # the early non-stream branch dies on a NameError
            rec.status = 500
            return html_500()
        rec.model = state.current.name
        run = state.start_run(rec.prompt_ids, faults.first_token_delay_s)
        body = _Body(request, rec, "text/plain; charset=utf-8")
        obj = {"id": "rkllm_chat", "object": "rkllm_chat", "created": int(time.time()), "choices": [],
               "usage": {"prompt_tokens": len(rec.prompt_ids), "completion_tokens": 0, "tokens_per_second": 0,
                         "total_tokens": len(rec.prompt_ids)}}
        started = time.monotonic()

        def frame(piece: str, finish: str | None) -> bytes:
            obj["choices"] = [{"role": "assistant", "content": piece, "logprobs": None, "finish_reason": finish}]
            obj["usage"]["completion_tokens"] = len(rec.pieces)
            obj["usage"]["tokens_per_second"] = len(rec.pieces) / max(1e-6, time.monotonic() - started)
            return f"{json.dumps(obj)}\n\n".encode()

        ok = await stream_pieces(request, body, rec, run, faults, lambda p: frame(p, None),
                                 lambda msg: json.dumps({"error": msg}).encode() + b"\n\n")
        if ok and state.early_final_object:
            await body.write(frame("", "stop"))
        return await body.end()

    # -- shared streaming ----------------------------------------------------------------------------
    async def stream_pieces(request: web.Request, body: _Body, rec: Received, run: _Run,
                            faults: Faults, frame, error_frame, *, hold: int = 0) -> bool:
        """Send the run's pieces; False if the answer did not end normally (fault, client gone).

        A client that goes away is noticed at the next write, as with rkllama's Flask server,
        and this handler stops reading; the generation itself goes on (see the module doc)."""
        sent = 0

        async def end_run() -> None:
            """A simulated failure ends the generation at the server, as a runtime error or a crash
            does, before the client can notice it: none of its text is left in the shared token
            list to leak into the next answer, and the runtime is idle for the next request
            (otherwise the outcome would depend on how fast the simulator stops)."""
            await state.sim.abort()
            if run.task is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(run.task), 5.0)
                except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
                    pass
            if state.api != "ollama":
                state.global_text.clear()

        async def die() -> None:
            await end_run()  # first: the client must not see the crash while the run still goes on
            transport = request.transport
            if transport is not None:
                transport.abort()  # the server failed: no terminating chunk
            rec.disconnected = True

        async def send(piece: str) -> bool:
            nonlocal sent
            if faults.fail_after is not None and sent >= faults.fail_after:
                await die()
                return False
            if faults.error_after is not None and sent >= faults.error_after:
                await end_run()  # the runtime failed: its generation is over when the error line goes out
                await body.write(error_frame("simulated server failure"))
                return False
            if faults.stall_after is not None and sent == faults.stall_after:
                faults.stall_after = None
                await asyncio.sleep(faults.stall_s)
            if faults.malformed_after is not None and sent == faults.malformed_after:
                faults.malformed_after = None
                await body.write(b'{"model": "broken", "message": {"role": "assis\n')
            if rec.first_piece_at is None:
                rec.first_piece_at = time.monotonic()
            rec.pieces.append(piece)
            sent += 1
            return await body.write(frame(piece))

        held: list[str] = []
        holding = hold > 0
        async for piece in state.pieces(run):
            if holding:  # rkllama waits for the first pieces of an answer that may be a tool call
                held.append(piece)
                if len(held) < hold or any("<tool_call>" in p for p in held):
                    continue
                holding = False
                for p in held:
                    if not await send(p):
                        return False
                held = []
                continue
            if not await send(piece):
                return False
        if held:
            text = "".join(held)
            calls = _tool_calls(text) if "<tool_call>" in text else []
            if calls:  # sent as message.tool_calls; `pieces` keeps the model's text for the tests
                rec.tool_calls = calls
                rec.pieces = list(held)
                rec.first_piece_at = time.monotonic()
                return True
            for p in held:
                if not await send(p):
                    return False
        if faults.fail_after is not None and sent >= faults.fail_after:
            await die()
            return False
        return not rec.disconnected

    # -- Ollama-style routes -----------------------------------------------------------------------------
    async def ollama_generation(request: web.Request, chat: bool) -> web.StreamResponse:
        data = await read_json(request) or {}
        rec = record(request, data)
        name = data.get("model")
        if not name:
            rec.status = 400
            return web.json_response({"error": "Missing model name"}, status=400)
        name = name.split("/", 1)[1] if "/" in name else name
        stream = data.get("stream", True)
        system = data.get("system", "") or ""
        tools = data.get("tools") if chat else None
        if chat:
            messages = []
            for m in data.get("messages") or []:
                if m.get("role") == "system":
                    system = m.get("content", "")
                else:
                    messages.append(m)
        else:
            prompt = data.get("prompt")
            if not prompt:
                if api == "ollama":  # Ollama's unload convention
                    if state.current is not None and state.current.name == name:
                        await state.unload()
                    return web.json_response({"unload": True, "model": name})
                rec.status = 400
                return web.json_response({"error": "Missing prompt"}, status=400)
            messages = [{"role": "user", "content": prompt}]
        rec.options = data.get("options")
        merged: dict[str, str] | None = None
        if api == "ollama":  # the older generations read no options at all
            merged = rec.applied_options = state.full_options(state.find(name), rec.options)
        refused = await switch_to(rec, name, merged)
        if refused is not None:
            return refused
        faults = state.faults.take()
        if faults.http_error:
            rec.status = faults.http_error[0]
            return web.json_response(faults.http_error[1], status=faults.http_error[0])
        try:
            rec.prompt, rec.prompt_ids = state.template(state.current, messages, tools, system)
        except Exception as exc:
            rec.status = 500
            return web.json_response({"error": str(exc)}, status=500)
        sampling, max_new = None, 0
        if merged is not None and state.per_run_options:
            try:
                sampling, max_new = _run_settings(merged)
            except (KeyError, ValueError) as exc:
                rec.status = 500
                return web.json_response({"error": str(exc)}, status=500)
        rec.model = name
        run = state.start_run(rec.prompt_ids, faults.first_token_delay_s, sampling, max_new)
        started = time.monotonic()

        def piece_obj(piece: str) -> dict[str, Any]:
            obj: dict[str, Any] = {"model": name, "created_at": _now()}
            if chat:
                obj["message"] = {"role": "assistant", "content": piece}
            else:
                obj["response"] = piece
            obj["done"] = False
            return obj

        def final_obj(content: str, reason: str) -> dict[str, Any]:
            obj = piece_obj(content)
            first = rec.first_piece_at or time.monotonic()
            obj.update(done=True, done_reason=reason, total_duration=int((time.monotonic() - started) * 1e9),
                       load_duration=int(0.1 * 1e9), prompt_eval_count=run.prompt_tokens,
                       prompt_eval_duration=int((first - started) * 1e9), eval_count=run.count,
                       eval_duration=int((time.monotonic() - first) * 1e9))
            return obj

        if not stream:
            async for piece in state.pieces(run):
                if rec.first_piece_at is None:
                    rec.first_piece_at = time.monotonic()
                rec.pieces.append(piece)
            rec.finished_at = time.monotonic()
            return web.json_response(final_obj(rec.text, "stop"))
        body = _Body(request, rec, "application/x-ndjson")
        ok = await stream_pieces(request, body, rec, run, faults,
                                 lambda p: (json.dumps(piece_obj(p)) + "\n").encode(),
                                 lambda msg: (json.dumps({"error": msg}) + "\n").encode(),
                                 hold=TOOL_WAIT_PIECES if tools else 0)
        if ok:
            if rec.tool_calls:
                call = piece_obj("")
                call["message"]["tool_calls"] = rec.tool_calls
                await body.write((json.dumps(call) + "\n").encode())
                await body.write((json.dumps(final_obj("", "tool_calls")) + "\n").encode())
            else:
                await body.write((json.dumps(final_obj("", "stop")) + "\n").encode())
        return await body.end()

    if api != "early":
        @routes.post("/api/chat")
        async def api_chat(request: web.Request) -> web.StreamResponse:
            return await ollama_generation(request, chat=True)

        @routes.post("/api/generate")
        async def api_generate(request: web.Request) -> web.StreamResponse:
            return await ollama_generation(request, chat=False)

        @routes.get("/api/version")
        async def version(request: web.Request) -> web.Response:
            return web.json_response({"version": state.version})

        @routes.get("/api/tags")
        async def tags(request: web.Request) -> web.Response:
            out = []
            for name in state.model_names():
                model = state.find(name)
                assert model is not None
                st = model.file.stat()
                out.append({"name": name, "model": name,
                            "modified_at": datetime.datetime.fromtimestamp(st.st_mtime).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                            "size": st.st_size, "digest": "",
                            "details": {"format": "rkllm", "family": "llama", "parameter_size": "Unknown",
                                        "quantization_level": "Unknown"}})
            return web.json_response({"models": out})

        @routes.post("/api/show")
        async def show(request: web.Request) -> web.Response:
            data = await read_json(request) or {}
            name = data.get("name") or data.get("model")
            if not name:
                return web.json_response({"error": "Missing model name"}, status=400)
            model = state.find(name)
            if model is None:
                return web.json_response({"error": f"Model '{name}' not found"}, status=404)
            text = "\n".join(f'{k}="{v}"' for k, v in model.modelfile.items())
            return web.json_response({"modelfile": text, "parameters": "", "template": "",
                                      "details": {"format": "rkllm", "family": "llama"}, "model_info": {}})

    async def embed(request: web.Request) -> web.Response:
        """rkllama's embeddings_ollama: one vector per input, the last token's hidden state."""
        openai = request.path.startswith("/v1/")
        data = await read_json(request)
        rec = record(request, data)
        if not isinstance(data, dict):
            rec.status = 500
            return web.json_response({"error": "400 Bad Request: Failed to decode JSON object"}, status=500)
        name, text = data.get("model"), data.get("input", data.get("prompt"))
        if not isinstance(name, str):  # rkllama strips a namespace with re.search before checking
            rec.status = 500
            return web.json_response({"error": f"expected string or bytes-like object, got "
                                               f"'{type(name).__name__}'"}, status=500)
        name = name.split("/", 1)[1] if "/" in name else name
        if not name:
            rec.status = 400
            return web.json_response({"error": "Missing model name"}, status=400)
        if not text:
            rec.status = 400
            return web.json_response({"error": "Missing input"}, status=400)
        rec.options = data.get("options")
        merged = rec.applied_options = state.full_options(state.find(name), rec.options)
        refused = await switch_to(rec, name, merged)
        if refused is not None:
            return refused
        started = time.monotonic()
        model = state.current
        assert model is not None
        tok = state.tokenizer(model)
        vectors: list[list[float]] = []
        async with state.worker_lock:  # the worker runs one task at a time
            for i, one in enumerate(text if isinstance(text, list) else [text]):
                ids = [int(t) for t in tok(str(one), add_special_tokens=False)["input_ids"]]
                rec.embedded.append(ids)
                try:
                    rid = f"embed-{len(state.received)}-{i}"
                    out = await state.sim.embed(EmbeddingInput(rid, tuple(ids), str(one)))
                except RKLLMError as exc:
                    rec.status = 500
                    return web.json_response({"error": str(exc)}, status=500)
                vectors.append([float(x) for x in out.hidden[-1]])
        rec.model = name
        rec.finished_at = time.monotonic()
        total = sum(len(ids) for ids in rec.embedded)
        if openai:
            return web.json_response({"object": "list", "data": [
                {"object": "embedding", "embedding": [x for v in vectors for x in v], "index": 0}],
                "model": name, "usage": {"prompt_tokens": total, "total_tokens": total}})
        return web.json_response({"model": name, "embeddings": vectors,
                                  "total_duration": int((time.monotonic() - started) * 1e9),
                                  "load_duration": int(0.1 * 1e9), "prompt_eval_count": total})

    if api == "ollama":
        for path in ("/api/embed", "/api/embeddings", "/v1/embeddings"):
            routes.post(path)(embed)
    elif api == "ollama-single":
        @routes.post("/api/embeddings")
        async def no_embeddings(request: web.Request) -> web.Response:
            record(request, await read_json(request))
            return web.json_response({"error": "Embeddings not supported in RKLLAMA"}, status=501)

    if api == "ollama":
        @routes.get("/api/ps")
        @routes.get("/current_models")
        async def ps(request: web.Request) -> web.Response:
            running = []
            if state.current is not None:
                running.append({"name": state.current.name, "model": state.current.name,
                                "size": state.current.file.stat().st_size, "digest": None,
                                "details": {"format": "rkllm", "family": "llama"}})
            return web.json_response({"models": running})

        @routes.get("/v1/models")
        async def v1_models(request: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "rkllama"} for n in state.model_names()]})
    else:
        @routes.get("/current_model")
        async def current_model(request: web.Request) -> web.Response:
            if state.current is not None:
                return web.json_response({"model_name": state.current.name})
            return web.json_response({"error": "No models are currently loaded."}, status=404)

    app.add_routes(routes)

    @web.middleware
    async def track(request: web.Request, handler: Any) -> web.StreamResponse:
        state.requested.append((request.method, request.path))
        transport = request.transport
        if transport is not None:
            state.transports.add(transport)
        try:
            return await handler(request)
        finally:
            if transport is not None:
                state.transports.discard(transport)

    app.middlewares.append(track)
    return app


class FakeRkllamaServer:
    """Runs the fake on a TCP port; usable in-process (tests) and from the command line.

    `down()` is a crash (connections dropped, then refused), `up()` a fresh start on the same
    port (nothing loaded), `restart()` both."""

    def __init__(self, models_dir: Path, api: str = "ollama", timing: SimTiming | None = None, *,
                 host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        self.state = FakeRkllama(Path(models_dir), api, timing, **options)
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def received(self) -> list[Received]:
        return self.state.received

    @property
    def faults(self) -> Faults:
        return self.state.faults

    def generations(self) -> list[Received]:
        return [r for r in self.state.received if r.prompt is not None]

    def embeddings(self) -> list[Received]:
        """The embedding requests the server answered with vectors."""
        return [r for r in self.state.received if r.embedded and r.status == 200]

    async def start(self) -> "FakeRkllamaServer":
        await self.up()
        return self

    async def up(self) -> None:
        if self._runner is not None:
            return
        self.state.reset()
        try:
            runner = web.AppRunner(create_app(self.state), access_log=None, shutdown_timeout=0.2)
        except TypeError:
            runner = web.AppRunner(create_app(self.state), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, shutdown_timeout=0.2)
        await site.start()
        if self.port == 0:
            server = getattr(site, "_server", None)
            self.port = server.sockets[0].getsockname()[1]
        self._runner = runner

    async def down(self) -> None:
        """Crash: every connection dropped at once, the port refuses connections until up()."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for transport in list(self.state.transports):
            transport.abort()
        run = self.state.active
        await self.state.sim.abort()
        await runner.cleanup()
        if run is not None and run.task is not None:
            run.task.cancel()

    async def restart(self) -> None:
        await self.down()
        await self.up()

    async def stop(self) -> None:
        await self.down()

    async def __aenter__(self) -> "FakeRkllamaServer":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()
