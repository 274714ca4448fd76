"""HTTP client for an rkllama server (NotPunchnox/rkllama), whichever API generation it speaks.

rkllama exists in the field in three shapes, all of which this client drives:

* early (to Feb 2025): `GET /` says "Welcome to RKLLama", no `/api/*`. One model at a
  time: `GET /models`, `GET /current_model` (`{"model_name"}` or 404), `POST /load_model
  {"model_name"}` (400 while another is loaded), `POST /unload_model`, and `POST /generate
  {"messages", "stream": true}` streaming one JSON object per token, each followed by a blank
  line, as text/plain; the stream simply ends after the last token.
* Ollama-style, one model (Mar-Aug 2025): `/api/version`, `/api/tags`, `/api/chat` (NDJSON,
  `done: true` on the last line) next to the early routes, which still hold one model.
* Ollama-style with worker processes (Aug 2025 on): the same plus `/api/ps`; `/unload_model`
  takes `{"model_name"}` and stops that model's worker, which is the only way to stop a
  generation the server is running.

The generation is detected once per server instance and cached; any connection failure
forgets it, so a server that restarted (or was upgraded) is detected afresh. Every error
names the server's URL and says what to do.

Within the worker generation, two later features matter (rkllama's server code, by the
version its `/api/version` reports):

* 0.0.43 (Aug 2025, the first with workers): `POST /api/embed` (also `/api/embeddings`, same
  shapes) `{"model", "input"}` -> `{"model", "embeddings": [[...]], "total_duration",
  "load_duration", "prompt_eval_count"}`, one vector per input: the last token's hidden state
  (RKLLM's last-hidden-layer mode on the text). `/v1/embeddings` gives the OpenAI shape. The
  one-model Ollama-style server ("0.5.1") answers `/api/embeddings` with 501.
* 0.0.73 (Jun 2026, runtime 1.3.0): `/api/chat`'s `options` apply per run: `temperature`,
  `top_k` (read with int()), `top_p`, `repeat_penalty`, `frequency_penalty`,
  `presence_penalty`, the mirostat keys, and `num_predict` (renamed to its `max_new_tokens`).
  Before, the options of the request that happened to load the model became that model's
  settings for everyone, and `num_predict` was ignored; so they are sent only from 0.0.73 on.
  No version reads `seed`; it is sent anyway (Ollama's key, ignored).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from exo_rkllm.config import Config
from exo_rkllm.errors import (EmbeddingUnsupported, GenerationError, ModelLoadError, ModelNotFound, RKLLMError,
                       RuntimeUnavailable)

log = logging.getLogger("exo_rkllm.rkllama")

API_EARLY = "early"
API_OLLAMA = "ollama"

START_HINT = ("start rkllama on the board (`rkllama_server --models <models folder>`; `rkllama serve` for early "
              "versions) or point RKLLM_SERVER_URL (or RKLLM_SERVER_HOST / RKLLM_SERVER_PORT) at it")
LOAD_SETTING = "RKLLM_SERVER_LOAD_TIMEOUT"
PROBE_TIMEOUT_S = 2.0  # a quick reachability check (RKLLM_BACKEND=auto) gives up after this
PER_RUN_OPTIONS_SINCE = (0, 0, 73)  # /api/chat options apply to that run (runtime 1.3.0)
EMBEDDINGS_SINCE = (0, 0, 43)  # /api/embed answers (the first version with model workers)
EMBEDDINGS_HINT = ("rkllama 0.0.43 or newer (the version with model workers, `rkllama_server`) serves "
                   "embeddings at /api/embed; upgrade the server")


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """`"0.0.74"` -> (0, 0, 74); None for anything else."""
    if not text or not re.fullmatch(r"\d+(\.\d+)*", text.strip()):
        return None
    return tuple(int(p) for p in text.strip().split("."))


class ServerNotLoaded(GenerationError):
    """The early API answered "No models are currently loaded" (typically: the server restarted)."""


class StreamBroken(GenerationError):
    """The connection failed mid-answer (server crashed, restarted, or the network went away)."""


class ServerChanged(GenerationError):
    """The server restarted as another API generation: the request must be built again."""


@dataclass(frozen=True)
class ServerInfo:
    """What detection found out about the server; cached until a connection fails."""

    url: str
    api: str  # API_EARLY | API_OLLAMA
    version: str | None = None
    workers: bool = False  # models run in worker processes: /api/ps, /unload_model {"model_name"}

    @property
    def release(self) -> tuple[int, ...] | None:
        """rkllama's own version, where the server reports it. The one-model Ollama-style servers
        (Mar-Aug 2025) answer a fixed "0.5.1" meant for Ollama clients: no rkllama version."""
        if self.api != API_OLLAMA or not self.workers:
            return None
        return parse_version(self.version)

    @property
    def per_run_options(self) -> bool:
        """/api/chat applies the request's `options` (sampling, num_predict) to that run."""
        release = self.release
        return release is not None and release >= PER_RUN_OPTIONS_SINCE

    @property
    def embeddings(self) -> bool:
        """/api/embed answers. Every worker server has it; an unparsable version of one is trusted too
        (the route is tried, and a 404 says EmbeddingUnsupported)."""
        if self.api != API_OLLAMA or not self.workers:
            return False
        release = self.release
        return release is None or release >= EMBEDDINGS_SINCE

    @property
    def label(self) -> str:
        if self.api == API_EARLY:
            return "early API"
        return f"{self.version or '?'}, Ollama-style API{' with model workers' if self.workers else ''}"


@dataclass
class Chunk:
    """One parsed stream object, whichever API generation sent it."""

    text: str = ""
    done: bool = False
    done_reason: str | None = None
    tool_calls: list[Any] | None = None
    counters: dict[str, Any] = field(default_factory=dict)


def render_tool_calls(calls: Sequence[Any]) -> str:
    """rkllama parses a model's tool calls out of its text and sends them as structured data with
    empty content; exo deals in text, so they are written back the way Qwen/Hermes models write
    them (`<tool_call>{"name", "arguments"}</tool_call>`), which is also what rkllama parses."""
    parts = []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, Mapping) else {}
        body = {"name": fn.get("name"), "arguments": fn.get("arguments", fn.get("parameters", {}))}
        parts.append("<tool_call>\n" + json.dumps(body, ensure_ascii=False) + "\n</tool_call>")
    return "\n".join(parts)


class LineParser:
    """Splits a streamed body into JSON objects, one per line; blank lines are separators.

    Lines are parsed one by one, in order, so the pieces before a malformed line still count.

    Bytes are split on newlines before decoding, so a multi-byte character cut across two
    network reads is whole again by the time its line is parsed. Anything on a line that is not
    one JSON object is a malformed chunk: the caller fails the request with it."""

    MAX_LINE = 4 * 1024 * 1024

    def __init__(self) -> None:
        self._buf = b""

    def lines(self, data: bytes) -> list[bytes]:
        """The complete, non-blank lines `data` completes (pass b"" at the end of the body)."""
        self._buf += data
        out: list[bytes] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            line, self._buf = self._buf[:nl].strip(), self._buf[nl + 1:]
            if line:
                out.append(line)
        if not data:
            line, self._buf = self._buf.strip(), b""
            if line:
                out.append(line)
        elif len(self._buf) > self.MAX_LINE:
            raise GenerationError("the rkllama server sent a stream line longer than 4 MiB")
        return out

    def feed(self, data: bytes) -> list[Any]:
        """All objects at once (a malformed line raises before any is returned)."""
        return [self.parse(line) for line in self.lines(data)]

    @staticmethod
    def parse(line: bytes) -> Any:
        if line.startswith(b"data:"):  # tolerate SSE framing (OpenAI-style proxies)
            line = line[5:].strip()
        try:
            obj = json.loads(line)
        except ValueError as exc:
            shown = line[:120].decode("utf-8", "replace")
            raise GenerationError(f"the rkllama server sent a malformed stream chunk ({exc}): {shown!r}") from None
        if not isinstance(obj, dict):
            raise GenerationError(f"the rkllama server sent a stream chunk that is not a JSON object: {obj!r:.120}")
        return obj


def parse_chunk(api: str, obj: Mapping[str, Any]) -> Chunk:
    """One stream object of either API generation as a Chunk; an `error` object raises."""
    if "error" in obj:
        raise GenerationError(f"the rkllama server reported an error mid-answer: {obj['error']}")
    if api == API_OLLAMA or "done" in obj or "message" in obj or "response" in obj:
        msg = obj.get("message")
        if isinstance(msg, Mapping):
            text = msg.get("content") or ""
            calls = msg.get("tool_calls") or None
        elif "response" in obj:
            text, calls = obj.get("response") or "", None
        elif "done" in obj:
            text, calls = "", None
        else:
            raise GenerationError(f"the rkllama server sent a stream chunk without message or response: {dict(obj)!r:.160}")
        if not isinstance(text, str):
            raise GenerationError(f"the rkllama server sent non-text content: {text!r:.80}")
        done = bool(obj.get("done"))
        counters = {k: obj[k] for k in ("prompt_eval_count", "eval_count", "prompt_eval_duration", "eval_duration",
                                        "total_duration", "load_duration") if k in obj} if done else {}
        return Chunk(text, done, obj.get("done_reason") if done else None, calls, counters)
    choices = obj.get("choices")
    if not isinstance(choices, list):
        raise GenerationError(f"the rkllama server sent a stream chunk without choices: {dict(obj)!r:.160}")
    choice = choices[0] if choices and isinstance(choices[0], Mapping) else {}
    text = choice.get("content")
    if text is None and isinstance(choice.get("message"), Mapping):
        text = choice["message"].get("content")
    if text is None and isinstance(choice.get("delta"), Mapping):
        text = choice["delta"].get("content")
    if text is not None and not isinstance(text, str):
        raise GenerationError(f"the rkllama server sent non-text content: {text!r:.80}")
    reason = choice.get("finish_reason")
    usage = obj.get("usage") if isinstance(obj.get("usage"), Mapping) else {}
    counters = {}
    if reason and usage:
        counters = {"prompt_eval_count": usage.get("prompt_tokens"), "eval_count": usage.get("completion_tokens")}
    return Chunk(text or "", bool(reason), reason, None, counters)


class ChatStream:
    """An open streamed answer: raw reads, parsed by the caller with `parser`."""

    def __init__(self, client: "RkllamaClient", resp: Any, api: str, path: str) -> None:
        self.client = client
        self.resp = resp
        self.api = api
        self.path = path
        self.parser = LineParser()
        self.eof = False

    async def read(self) -> bytes:
        """The next bytes of the body (b"" at a clean end). Raises StreamBroken if the connection fails."""
        import aiohttp

        try:
            data = await self.resp.content.readany()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, ConnectionError) as exc:
            self.client.forget()
            raise StreamBroken(f"the rkllama server at {self.client.url} broke off the answer "
                               f"({exc.__class__.__name__}: {exc}); did it crash or restart?") from None
        if not data:
            self.eof = True
        return data

    def close(self) -> None:
        """Drop the connection: the server sees the client go away."""
        try:
            self.resp.close()
        except Exception:  # already closed
            pass

    def release(self) -> None:
        try:
            self.resp.release()
        except Exception:
            pass


class RkllamaClient:
    """One aiohttp session to one rkllama server.

    Three waits, each bounded on its own: the first piece of an answer (`first_token_timeout`;
    rkllama sends its headers only with that piece, so this covers the open too), a gap between
    two pieces and any plain request (`chunk_timeout`), and loading or unloading a model
    (`load_timeout`). Loading is kept apart from the first piece so that a short first-token
    limit never cuts a model load short, and a slow load never stretches the first-token limit."""

    def __init__(self, url: str, *, connect_timeout: float = 2.0, first_token_timeout: float = 120.0,
                 chunk_timeout: float = 30.0, load_timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.first_token_timeout = first_token_timeout
        self.chunk_timeout = chunk_timeout
        self.load_timeout = load_timeout
        self._session: Any = None
        self._info: ServerInfo | None = None
        self._detect_lock: asyncio.Lock | None = None

    @classmethod
    def from_config(cls, config: Config, *, quick: bool = False) -> "RkllamaClient":
        """The client the settings describe; `quick` for a reachability probe (short waits)."""
        connect = min(config.server_connect_timeout, PROBE_TIMEOUT_S) if quick else config.server_connect_timeout
        return cls(config.rkllama_url, connect_timeout=connect, first_token_timeout=config.server_first_token_timeout,
                   chunk_timeout=PROBE_TIMEOUT_S if quick else config.server_chunk_timeout,
                   load_timeout=config.server_load_timeout)

    # -- session ---------------------------------------------------------------------------------
    def _get_session(self) -> Any:
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._session is not None and (self._session.closed or getattr(self._session, "_loop", loop) is not loop):
            self._session = None
        if self._session is None:
            # No total timeout: streamed answers are bounded by the first-token and chunk timeouts.
            timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=self.connect_timeout)
            self._session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=16))
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> "RkllamaClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """`async with RkllamaClient(url) as client:` closes its HTTP session on the way out."""
        await self.close()

    def forget(self) -> None:
        """Forget what detection found (the server went away; it may come back different)."""
        self._info = None

    def unreachable(self, exc: BaseException) -> RuntimeUnavailable:
        reason = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
        if isinstance(exc, asyncio.TimeoutError):
            reason = f"no answer within {self.connect_timeout:g} s (RKLLM_SERVER_CONNECT_TIMEOUT)"
        elif "refused" in str(exc).lower():
            reason = "connection refused"
        return RuntimeUnavailable(f"the rkllama server at {self.url} is not reachable ({reason}): {START_HINT}")

    # -- plain requests ---------------------------------------------------------------------------
    async def request(self, method: str, path: str, *, json_body: Any = None, timeout: float | None = None,
                      retry: bool = True, setting: str = "") -> tuple[int, Any]:
        """(status, parsed JSON or text). Connection failures raise RuntimeUnavailable; a stale
        pooled connection (server restarted) is retried once on a fresh one."""
        import aiohttp

        session = self._get_session()
        limit = self.chunk_timeout if timeout is None else timeout
        try:
            async with session.request(method, self.url + path, json=json_body,
                                       timeout=aiohttp.ClientTimeout(total=limit, sock_connect=self.connect_timeout)) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            self.forget()
            if retry and not isinstance(exc, aiohttp.ClientConnectorError):
                return await self.request(method, path, json_body=json_body, timeout=timeout, retry=False,
                                          setting=setting)
            raise self.unreachable(exc) from None
        except asyncio.TimeoutError as exc:  # before ClientConnectionError: aiohttp's timeouts are both
            self.forget()
            if "connect" in f"{type(exc).__name__} {exc}".lower():
                raise self.unreachable(exc) from None
            named = f" ({setting})" if setting else ""
            raise RuntimeUnavailable(f"the rkllama server at {self.url} did not answer {method} {path} within "
                                     f"{limit:g} s{named}") from None
        except (aiohttp.ClientConnectionError, ConnectionError, OSError) as exc:
            self.forget()
            raise self.unreachable(exc) from None
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        return status, body

    # -- detection --------------------------------------------------------------------------------
    async def info(self) -> ServerInfo:
        if self._info is not None:
            return self._info
        if self._detect_lock is None:
            self._detect_lock = asyncio.Lock()
        async with self._detect_lock:
            if self._info is None:
                self._info = await self._detect()
                log.info("rkllama server at %s: %s", self.url, self._info.label)
        return self._info

    async def _detect(self) -> ServerInfo:
        quick = max(self.connect_timeout, 1.0) + 3.0
        status, body = await self.request("GET", "/api/version", timeout=quick)
        if status == 200 and isinstance(body, dict) and "version" in body:
            ps_status, _ = await self.request("GET", "/api/ps", timeout=quick)
            return ServerInfo(self.url, API_OLLAMA, str(body.get("version")), workers=ps_status == 200)
        root_status, root = await self.request("GET", "/", timeout=quick)
        if root_status == 200 and isinstance(root, dict):
            return ServerInfo(self.url, API_EARLY, None)
        raise RuntimeUnavailable(f"{self.url} answers HTTP but does not look like an rkllama server "
                                 f"(GET /api/version: {status}, GET /: {root_status}): check RKLLM_SERVER_URL")

    # -- models -------------------------------------------------------------------------------------
    async def list_models(self) -> list[str]:
        """The server's model names, as /api/chat or /load_model accept them."""
        info = await self.info()
        names: list[str] = []
        if info.api == API_OLLAMA:
            status, body = await self.request("GET", "/api/tags")
            if status == 200 and isinstance(body, dict):
                for m in body.get("models") or []:
                    if isinstance(m, dict):
                        names += [str(m[k]) for k in ("name", "model") if m.get(k)]
        status, body = await self.request("GET", "/models")
        if status == 200 and isinstance(body, dict):
            names += [str(m) for m in body.get("models") or [] if isinstance(m, str)]
        elif info.api == API_EARLY:
            raise RuntimeUnavailable(f"the rkllama server at {self.url} could not list its models "
                                     f"(GET /models: HTTP {status} {_error_text(body)})")
        return list(dict.fromkeys(names))

    async def current_model(self) -> str | None:
        """The model a one-model server holds (early routes), or None."""
        status, body = await self.request("GET", "/current_model")
        if status == 200 and isinstance(body, dict):
            name = body.get("model_name") or body.get("model")
            return str(name) if name else None
        return None

    async def _model_request(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """POST a load or unload: bounded by the load timeout, never by the first-token one."""
        return await self.request("POST", path, json_body=body, timeout=self.load_timeout, setting=LOAD_SETTING)

    async def load(self, name: str) -> None:
        info = await self.info()
        if info.workers:
            status, body = await self._model_request("/load_model", {"model_name": name})
            # 200 "A model is already loaded. Nothing to do." carries an "error" key: still fine.
            if status == 404:  # no explicit load route (an Ollama server): models load on demand
                return
            if status != 200:
                raise ModelLoadError(f"rkllama at {self.url} could not load {name!r}: {_error_text(body)}")
            return
        current = await self.current_model()
        if current == name:
            return
        if current is not None:
            await self._model_request("/unload_model", {})
        status, body = await self._model_request("/load_model", {"model_name": name})
        if status != 200:
            raise ModelLoadError(f"rkllama at {self.url} could not load {name!r}: HTTP {status} {_error_text(body)}")

    async def unload(self, name: str | None) -> None:
        """Unload `name` (worker servers) or the one loaded model. Best effort: errors are logged."""
        try:
            info = await self.info()
            body = {"model_name": name} if info.workers and name else {}
            status, answer = await self._model_request("/unload_model", body)
            if status != 200:
                log.debug("rkllama unload of %s: HTTP %s %s", name, status, _error_text(answer))
        except RKLLMError as exc:
            log.debug("rkllama unload of %s failed: %s", name, exc)

    # -- generation --------------------------------------------------------------------------------
    async def embed(self, name: str, text: str) -> list[float]:
        """The server's embedding of `text` with model `name` (rkllama: the last token's hidden
        state). Bounded by the first-token timeout: it may load the model and prefills the text.
        Raises EmbeddingUnsupported where the server has no such route."""
        status, body = await self.request("POST", "/api/embed", json_body={"model": name, "input": text},
                                          timeout=self.first_token_timeout,
                                          setting="RKLLM_SERVER_FIRST_TOKEN_TIMEOUT")
        if status in (404, 405, 501):
            self.forget()  # perhaps another server now: detect it afresh next time
            raise EmbeddingUnsupported(f"the rkllama server at {self.url} gives no embeddings (POST /api/embed: "
                                       f"HTTP {status} {_error_text(body)}): {EMBEDDINGS_HINT}")
        if status != 200:
            reason = _error_text(body)
            if "failed to load model" in reason.lower():
                raise ModelLoadError(f"rkllama at {self.url} could not load {name!r} to embed: {reason}")
            raise GenerationError(f"rkllama at {self.url} could not embed with {name!r}: HTTP {status} {reason}")
        rows = body.get("embeddings") if isinstance(body, dict) else None
        if rows is None and isinstance(body, dict) and isinstance(body.get("embedding"), list):
            rows = [body["embedding"]]  # Ollama's older /api/embeddings shape
        if (not isinstance(rows, list) or len(rows) != 1 or not isinstance(rows[0], list) or not rows[0]
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in rows[0])):
            shown = json.dumps(body) if isinstance(body, (dict, list)) else str(body)
            raise GenerationError(f"rkllama at {self.url} sent an embedding answer this client cannot read: "
                                  f"{shown[:200]!r}")
        return [float(x) for x in rows[0]]

    async def open_chat(self, name: str, messages: list[dict[str, Any]], tools: Sequence[Any] | None,
                        options: Mapping[str, Any] | None = None) -> ChatStream:
        """POST the conversation; returns once the server has answered with its headers.

        rkllama (Flask) sends its headers together with the first piece, so this waits through
        the model load and the prefill: the caller bounds it with the first-token timeout (the
        session has no read timeout of its own).

        The server templates the messages itself (once). `options` (Ollama's names) go with an
        Ollama-style request only; the caller decides whether the server applies them per run
        (`ServerInfo.per_run_options`). Raises ServerNotLoaded when an early server has no model,
        RuntimeUnavailable when it cannot be reached, GenerationError on any other refusal."""
        import aiohttp

        info = await self.info()
        if info.api == API_OLLAMA:
            path = "/api/chat"
            body: dict[str, Any] = {"model": name, "messages": messages, "stream": True}
            if tools:
                body["tools"] = list(tools)
            if options:
                body["options"] = dict(options)
        else:
            path, body = "/generate", {"messages": messages, "stream": True}
        session = self._get_session()
        for attempt in (1, 2):
            try:
                resp = await session.post(self.url + path, json=body)
                break
            except aiohttp.ClientConnectorError as exc:
                self.forget()
                raise self.unreachable(exc) from None
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                self.forget()  # a pooled connection the server closed (it restarted): once more, afresh
                if attempt == 2:
                    raise self.unreachable(exc) from None
                fresh = await self.info()
                if fresh != info:
                    raise ServerChanged(f"rkllama at {self.url} restarted as {fresh.label}") from None
            except (aiohttp.ClientConnectionError, ConnectionError, OSError) as exc:
                self.forget()
                raise self.unreachable(exc) from None
        if resp.status != 200:
            try:
                raw = await resp.read()
            finally:
                resp.release()
            try:
                answer: Any = json.loads(raw)
            except ValueError:
                answer = raw.decode("utf-8", "replace")
            text = _error_text(answer)
            if resp.status in (404, 405) and info.api == API_OLLAMA:  # /api/chat gone: an older server now?
                self.forget()
                fresh = await self.info()
                if fresh != info:
                    raise ServerChanged(f"rkllama at {self.url} restarted as {fresh.label}")
            if info.api == API_EARLY and resp.status == 400 and "no model" in text.lower():
                raise ServerNotLoaded(f"rkllama at {self.url} has no model loaded")
            if resp.status == 404 and info.api == API_OLLAMA:
                raise ModelNotFound(f"rkllama at {self.url} does not know the model {name!r}: {text}")
            raise GenerationError(f"rkllama at {self.url} refused the request: HTTP {resp.status} {text}")
        return ChatStream(self, resp, info.api, path)


def _error_text(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("error", "message"):
            if body.get(key):
                return str(body[key])
        return json.dumps(body)[:300]
    if body is None:
        return ""
    text = re.sub(r"<[^>]+>", " ", str(body))  # Flask's HTML error pages
    return " ".join(text.split())[:300]


_NORMALIZE = re.compile(r"[^a-z0-9.]+")


def _norm(name: str) -> str:
    name = name.strip().lower()
    if name.endswith(":latest"):
        name = name[: -len(":latest")]
    return _NORMALIZE.sub("-", name).strip("-.")


def match_remote_name(names: Sequence[str], *candidates: str | None) -> str | None:
    """The server name among `names` that the first matching candidate means: exactly, then
    ignoring case, an Ollama `:latest` tag and punctuation (`Qwen2.5-3B_Instruct` ~
    `qwen2.5-3b-instruct`), then as a namespaced name (`library/qwen2.5:3b`)."""
    wanted = [c for c in candidates if c]
    for c in wanted:
        if c in names:
            return c
    table: dict[str, str] = {}
    for n in names:
        table.setdefault(_norm(n), n)
    for c in wanted:
        for variant in (c, c.rsplit("/", 1)[-1]):
            hit = table.get(_norm(variant))
            if hit is not None:
                return hit
    return None
