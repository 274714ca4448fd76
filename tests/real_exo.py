"""Start a real legacy exo (`python -m exo.main --inference-engine rkllm`) for integration tests.

exo is not a dependency of this project (the PyPI 'exo' is another project);
tests/legacy_exo.py finds a Python with legacy exo (EXO_PYTHON, this one, or the
environment `python -m tests.legacy_exo build` made) and layers this checkout on
it; without one, these tests are skipped with the reason, and the test run's
summary line says so.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from exo_rkllm.bench.exo_process import BIND_ERRORS, START_ATTEMPTS, free_port
from legacy_exo import find_exo_python
from support import DEMO_ID


EXO_PYTHON, WHY = find_exo_python()
requires_exo = pytest.mark.skipif(EXO_PYTHON is None, reason=WHY)
# A module's `pytestmark` for tests that start a real exo: counted by the run's closing line, skipped with the reason.
REAL_EXO = [pytest.mark.real_exo, requires_exo]


class PortTaken(RuntimeError):
    """A port picked for exo was taken before exo bound it (free ports are only free when picked)."""


@dataclass
class ExoProcess:
    proc: subprocess.Popen
    api: str
    log: Path
    # What every request must carry: the API key (RKLLM_API_KEY) when exo was started with one.
    headers: dict[str, str] = field(default_factory=dict)
    node_id: str = ""
    # starts this node again (same node id and node port, a new API port), once it was stopped
    relaunch: Callable[[], "ExoProcess"] | None = field(default=None, repr=False)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _capabilities(memory: int) -> dict:
    return {"model": "test", "chip": "test", "memory": memory, "flops": {"fp32": 0, "fp16": 0, "int8": 0}}


def _launch(python: str, workdir: Path, models_dir: Path, env_extra: dict[str, str], node_id: str, node_port: int,
            peers: Path, extra_args: list[str], log_suffix: str = "") -> ExoProcess:
    api_port = free_port()
    env = {**os.environ, "RKLLM_BACKEND": "sim", "RKLLM_MODELS_DIR": str(models_dir), "HF_HUB_OFFLINE": "1",
           "EXO_HOME": str(workdir / f"exo-home-{node_id}"), "PYTHONUNBUFFERED": "1",
           # saved KV states in this exo's own folder: the models folder may be shared by the whole session
           "RKLLM_CACHE_DIR": str(workdir / f"kv-states-{node_id}"), **env_extra}
    log = workdir / f"exo-{node_id}{log_suffix}.log"
    proc = subprocess.Popen(
        [python, "-m", "exo.main", "--inference-engine", "rkllm", "--disable-tui", "--discovery-module", "manual",
         "--discovery-config-path", str(peers), "--node-id", node_id, "--node-port", str(node_port),
         "--chatgpt-api-port", str(api_port), *extra_args],
        cwd=workdir, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    key = env.get("RKLLM_API_KEY")
    return ExoProcess(proc, f"http://127.0.0.1:{api_port}", log, {"Authorization": f"Bearer {key}"} if key else {},
                      node_id, lambda: _launch(python, workdir, models_dir, env_extra, node_id, node_port, peers,
                                               extra_args, log_suffix=".again"))


def wait_ready(nodes: list[ExoProcess], timeout: float, path: str = "/v1/models") -> None:
    deadline = time.monotonic() + timeout
    pending = list(nodes)
    while pending and time.monotonic() < deadline:
        for exo in list(pending):
            log = exo.log_text()
            if any(marker in log.lower() for marker in BIND_ERRORS):  # exo stays up without its API
                for node in nodes:
                    node.stop()
                raise PortTaken(f"a port was taken before exo bound it:\n{log[-1500:]}")
            if exo.proc.poll() is not None:
                raise RuntimeError(f"exo exited with {exo.proc.returncode}:\n{log[-3000:]}")
            try:
                with urllib.request.urlopen(urllib.request.Request(f"{exo.api}{path}", headers=exo.headers),
                                            timeout=2) as r:
                    if r.status == 200:
                        pending.remove(exo)
            except OSError:
                pass
        time.sleep(0.5)
    if pending:
        for exo in nodes:
            exo.stop()
        raise RuntimeError(f"exo did not answer within {timeout} s:\n{pending[0].log_text()[-3000:]}")


def start_ring(python: str, workdir: Path, models_dir: "Path | list[Path]", n: int, env_extra: dict[str, str],
               extra_args: list[str] = (), timeout: float = 180.0) -> list[ExoProcess]:
    """n exo nodes on loopback that know each other (manual discovery), started in parallel; started
    again on other ports if one was taken in between (a few times). `models_dir`: one folder for every
    node, or one per node."""
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return _start_ring_once(python, workdir, models_dir, n, env_extra, extra_args, timeout)
        except PortTaken:
            if attempt == START_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _start_ring_once(python: str, workdir: Path, models_dir: "Path | list[Path]", n: int, env_extra: dict[str, str],
                     extra_args: list[str], timeout: float) -> list[ExoProcess]:
    dirs = list(models_dir) if isinstance(models_dir, (list, tuple)) else [models_dir] * n
    ports = [free_port() for _ in range(n)]
    ids = [f"rkllm-test-{p}" for p in ports]
    peers = workdir / "peers.json"
    peers.write_text(json.dumps({"peers": {i: {"address": "127.0.0.1", "port": p,
                                               "device_capabilities": _capabilities(16000 - 1000 * k)}
                                           for k, (i, p) in enumerate(zip(ids, ports))}}))
    nodes = [_launch(python, workdir, d, env_extra, i, p, peers, list(extra_args)) for d, i, p in zip(dirs, ids, ports)]
    wait_ready(nodes, timeout)
    return nodes


def start_exo(python: str, workdir: Path, models_dir: Path, env_extra: dict[str, str],
              extra_args: list[str] = (), timeout: float = 120.0) -> ExoProcess:
    return start_ring(python, workdir, models_dir, 1, env_extra, extra_args, timeout)[0]


# -- reading exo's answers as OpenAI clients do -------------------------------------------------------------
# Every real-exo test reads streamed answers through `read_sse`/`stream_chat` and checks them with
# `check_stream`, so one place knows what a correct stream of this API looks like:
#   the role chunk (`delta: {"role": "assistant", "content": ""}`), content deltas, one chunk with the
#   finish_reason and an empty delta, the usage chunk (`choices: []`) when asked, `data: [DONE]`;
#   or, for an answer that fails after its first token: the text so far, one error chunk
#   (`choices: []`, OpenAI's error object) and `data: [DONE]`, never a finish_reason;
#   every chunk with the same id and created.
CHAT_CHUNK = "chat.completion.chunk"
COMPLETION_CHUNK = "text_completion"
ERROR_KEYS = {"message", "type", "param", "code"}
DONE = "[DONE]"


@dataclass
class SSEStream:
    """One streamed answer as the client received it (or the error answer that came instead)."""

    status: int
    headers: Any
    events: list[Any]  # each `data:` payload in order: a dict, or "[DONE]"
    raw: bytes  # the body as received
    framing: list[str]  # what broke the SSE framing (events that are not one `data:` line), if anything
    eof: bool  # the body was read to its end
    dropped: bool  # the connection broke before the end of the body
    body: Any = None  # the JSON body when the status is not 200
    first_content_at: float | None = None  # time.monotonic() of the first content

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [e for e in self.events if isinstance(e, dict)]

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == DONE

    def _choices(self) -> list[dict[str, Any]]:
        return [c["choices"][0] for c in self.chunks if c.get("choices")]

    @property
    def text(self) -> str:
        """The answer's content: the chat deltas' `content`, or a completion's `text`."""
        out = []
        for choice in self._choices():
            out.append((choice.get("delta") or {}).get("content") or "" if "delta" in choice
                       else choice.get("text") or "")
        return "".join(out)

    @property
    def reasoning(self) -> str:
        return "".join((c.get("delta") or {}).get("reasoning_content") or "" for c in self._choices())

    @property
    def finishes(self) -> list[str]:
        return [c["finish_reason"] for c in self._choices() if c.get("finish_reason") is not None]

    @property
    def finish(self) -> str | None:
        """The finish_reason, or None when no chunk had one (a failed answer has none)."""
        return self.finishes[-1] if self.finishes else None

    @property
    def error(self) -> dict[str, Any] | None:
        """The error object: of the stream's error chunk, or of the error answer (status != 200)."""
        if self.status != 200:
            return (self.body or {}).get("error") if isinstance(self.body, dict) else None
        found = [c["error"] for c in self.chunks if "error" in c]
        return found[-1] if found else None

    @property
    def usage(self) -> dict[str, int] | None:
        found = [c["usage"] for c in self.chunks if c.get("usage")]
        return found[-1] if found else None

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The streamed tool-call deltas merged by index, as OpenAI's SDKs merge them."""
        calls: dict[int, dict[str, Any]] = {}
        for choice in self._choices():
            for delta in (choice.get("delta") or {}).get("tool_calls") or []:
                call = calls.setdefault(delta["index"], {"id": None, "type": None,
                                                         "function": {"name": "", "arguments": ""}})
                call["id"] = delta.get("id") or call["id"]
                call["type"] = delta.get("type") or call["type"]
                fn = delta.get("function") or {}
                call["function"]["name"] += fn.get("name") or ""
                call["function"]["arguments"] += fn.get("arguments") or ""
        return [calls[i] for i in sorted(calls)]


def _parse_event(event: bytes, stream: SSEStream) -> None:
    text = event.decode("utf-8", errors="strict")
    if text.startswith(":"):
        return  # an SSE comment (keep-alive): every client skips it
    if not text.startswith("data: ") or "\n" in text or "\r" in text:
        stream.framing.append(f"not a single-line `data:` event: {text[:200]!r}")
        return
    payload = text[len("data: "):]
    if stream.done:
        stream.framing.append(f"an event after [DONE]: {payload[:200]!r}")
    stream.events.append(DONE if payload == DONE else json.loads(payload))


async def read_sse(resp: Any, stop_after: int | None = None,
                   on_event: Callable[[Any], None] | None = None) -> SSEStream:
    """Read an aiohttp response as an SSE stream, to the end of its body (never stopping at the
    finish_reason: what comes after it is part of the contract). `stop_after`: leave after that many
    events (the caller then closes the connection mid-answer); `on_event` sees each event as it comes."""
    import aiohttp

    stream = SSEStream(resp.status, resp.headers, [], b"", [], False, False)
    if resp.status != 200:
        stream.raw = await resp.read()
        stream.eof = True
        try:
            stream.body = json.loads(stream.raw)
        except ValueError:
            stream.body = stream.raw.decode("utf-8", "replace")
        return stream
    buffer = b""
    try:
        async for piece in resp.content.iter_any():
            stream.raw += piece
            buffer += piece
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                _parse_event(event, stream)
                if on_event is not None and stream.events:
                    on_event(stream.events[-1])
                last = stream.chunks[-1] if stream.chunks else None
                if stream.first_content_at is None and last is not None and any(
                        (c.get("delta") or {}).get("content") or c.get("text") for c in last.get("choices") or []):
                    stream.first_content_at = time.monotonic()
                if stop_after is not None and len(stream.events) >= stop_after:
                    return stream
        stream.eof = True
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, ConnectionError):
        stream.dropped = True
    if buffer:
        stream.framing.append(f"the body ends inside an event: {buffer[:200]!r}")
    return stream


async def stream_chat(session: Any, api: str, messages: list[dict[str, Any]] | None = None, *,
                      model: str | None = None, stop_after: int | None = None, path: str = "/v1/chat/completions",
                      headers: dict[str, str] | None = None, check: bool = True,
                      on_event: Callable[[Any], None] | None = None, **fields: Any) -> SSEStream:
    """POST a streamed request and read its answer; checked with `check_stream` when it was read to
    its end with status 200 (`check=False` to look at a broken stream yourself)."""
    body: dict[str, Any] = {"model": model or DEMO_ID, "stream": True, **fields}
    if messages is not None:
        body["messages"] = messages
    async with session.post(f"{api}{path}", json=body, headers=headers or {}) as resp:
        stream = await read_sse(resp, stop_after, on_event)
    if check and stop_after is None and stream.status == 200:
        check_stream(stream, usage=bool((fields.get("stream_options") or {}).get("include_usage")),
                     obj=CHAT_CHUNK if "chat" in path else COMPLETION_CHUNK)
    return stream


async def post_json(session: Any, url: str, body: Any, headers: dict[str, str] | None = None,
                    method: str = "POST") -> tuple[int, Any, Any]:
    """(status, the parsed JSON body or the text, headers) of a request that is not streamed."""
    async with session.request(method, url, json=body, headers=headers or {}) as resp:
        raw = await resp.read()
        try:
            parsed: Any = json.loads(raw)
        except ValueError:
            parsed = raw.decode("utf-8", "replace")
        return resp.status, parsed, resp.headers


def check_stream(stream: SSEStream, *, usage: bool = False, obj: str = CHAT_CHUNK) -> None:
    """Assert that `stream` is exactly what OpenAI's clients expect (see the comment above)."""
    assert stream.status == 200 and stream.headers.get("Content-Type", "").startswith("text/event-stream")
    assert not stream.framing, stream.framing
    assert stream.eof and not stream.dropped, "the body must end properly"
    assert stream.raw.endswith(b"data: [DONE]\n\n") and stream.events.count(DONE) == 1, stream.raw[-300:]
    chunks = stream.chunks
    assert chunks, "a stream has at least its first chunk"
    assert {c["object"] for c in chunks} == {obj}, {c["object"] for c in chunks}
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert len({c["model"] for c in chunks}) == 1
    prefix = "chatcmpl-" if obj == CHAT_CHUNK else "cmpl-"
    assert chunks[0]["id"].startswith(prefix), chunks[0]["id"]
    choices = [c for c in chunks if c["choices"]]
    for c in choices:
        assert len(c["choices"]) == 1 and c["choices"][0]["index"] == 0, c
        if obj == CHAT_CHUNK:
            assert "message" not in c["choices"][0] and isinstance(c["choices"][0]["delta"], dict), c
    if obj == CHAT_CHUNK:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}, chunks[0]
        assert all("role" not in c["choices"][0]["delta"] for c in choices[1:]), "the role comes once, first"
    finishing = [c for c in choices if c["choices"][0]["finish_reason"] is not None]
    errors = [c for c in chunks if "error" in c]
    if errors:  # a failure after the first token
        (error,) = errors
        assert chunks[-1] is error, "the error chunk is the last one before [DONE]"
        assert error["choices"] == [] and set(error["error"]) == ERROR_KEYS and error["error"]["message"], error
        assert not finishing, "an answer cut short by a failure never has a finish_reason"
        return
    assert len(finishing) == 1, f"exactly one chunk has a finish_reason: {[c['choices'] for c in finishing]}"
    end = finishing[0]
    if obj == CHAT_CHUNK:
        assert end["choices"][0]["delta"] == {}, end
    after = chunks[chunks.index(end) + 1:]
    if usage:
        assert len(after) == 1 and after[0]["choices"] == [], after
        counts = after[0]["usage"]
        assert counts["total_tokens"] == counts["prompt_tokens"] + counts["completion_tokens"] and \
            counts["prompt_tokens"] > 0, counts
        assert all(c.get("usage", "absent") is None for c in chunks[:-1]), "usage is null until the usage chunk"
    else:
        assert after == [], after
        assert all("usage" not in c or c["usage"] is None for c in chunks)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# -- one TCP connection, several requests: does the server keep it or close it? --------------------------------
@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes  # de-chunked


async def _read_answer(reader: Any) -> RawAnswer | None:
    """One HTTP/1.1 response from `reader`, or None when the server closed the connection first."""
    head = b""
    while b"\r\n\r\n" not in head:
        piece = await reader.read(1)
        if not piece:
            if head:
                raise AssertionError(f"the connection closed inside the response head: {head!r}")
            return None
        head += piece
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        return RawAnswer(status, headers, await reader.readexactly(int(headers["content-length"])))
    assert headers.get("transfer-encoding") == "chunked", headers
    body = b""
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readline()  # the blank line that ends a chunked body
            return RawAnswer(status, headers, body)
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"


async def over_one_connection(api: str, requests: list[tuple[str, str, Any]], headers: dict[str, str] | None = None,
                              ceiling: float = 60.0) -> list[RawAnswer | None]:
    """Send `requests` ((method, path, JSON body or None)) one after another on ONE keep-alive
    connection; each answer, or None once the server has closed the connection. `ceiling` only
    turns a hang into a failure."""
    import asyncio
    from urllib.parse import urlparse

    url = urlparse(api)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    answers: list[RawAnswer | None] = []
    try:
        for method, path, body in requests:
            data = b"" if body is None else json.dumps(body).encode()
            head = [f"{method} {path} HTTP/1.1", f"Host: {url.netloc}", "Connection: keep-alive",
                    f"Content-Length: {len(data)}", "Content-Type: application/json",
                    *(f"{k}: {v}" for k, v in (headers or {}).items())]
            try:
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
                await writer.drain()
            except ConnectionError:
                answers.append(None)
                continue
            try:
                answers.append(await asyncio.wait_for(_read_answer(reader), ceiling))
            except (ConnectionError, asyncio.IncompleteReadError):
                answers.append(None)
    finally:
        writer.close()
    return answers


def sse_events(body: bytes) -> list[Any]:
    """The `data:` payloads of a complete SSE body, strictly framed (the raw-socket tests' reader)."""
    text = body.decode("utf-8")
    assert text.endswith("\n\n"), text[-200:]
    out: list[Any] = []
    for event in text[:-2].split("\n\n"):
        assert event.startswith("data: ") and "\n" not in event, event[:200]
        payload = event[len("data: "):]
        out.append(DONE if payload == DONE else json.loads(payload))
    return out


# -- what the simulator answers, computed in this process ---------------------------------------------------
@dataclass(frozen=True)
class Expected:
    text: str
    tokens: int  # the answer's tokens (the end-of-turn token not counted, as usage counts them)


async def expected_answer(demo_spec: Any, tokenizer: Any, messages: list[dict[str, Any]] | None = None, *,
                          prompt: str | None = None) -> Expected:
    """The simulated runtime's answer to `messages` (templated as the demo template does) or to the
    raw `prompt`, generated here: the independent reference for what exo must deliver."""
    from exo_rkllm.runtime.base import GenerationInput, TokenEvent
    from exo_rkllm.runtime.sim import SimRuntime, SimTiming

    if prompt is None:
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    else:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
    rt = SimRuntime(SimTiming.instant())
    await rt.load(demo_spec)
    text, n = "", 0
    async for ev in rt.generate(GenerationInput("expected", tuple(ids))):
        if isinstance(ev, TokenEvent):
            text += ev.text
            n += 1
    return Expected(text, n)


async def expected_text(demo_spec: Any, tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    return (await expected_answer(demo_spec, tokenizer, messages)).text


async def run_record(session: Any, exo: "ExoProcess", stream_or_id: "SSEStream | str") -> dict[str, Any]:
    """The scheduler's record of one request (GET /v1/rkllm/status, `recent`): how many tokens the
    runtime really generated and how its run ended (`done`, `cancelled (...)`, `failed`...). Polled:
    the record is written once the runtime has stopped, which may follow the end of the HTTP answer."""
    import asyncio

    if isinstance(stream_or_id, SSEStream):
        rid = stream_or_id.chunks[0]["id"]
    else:
        rid = stream_or_id
    rid = rid.removeprefix("chatcmpl-").removeprefix("cmpl-")
    status: dict[str, Any] = {}
    for _ in range(600):
        async with session.get(f"{exo.api}/v1/rkllm/status", headers=exo.headers) as r:
            status = await r.json()
        found = [run for run in status.get("recent") or [] if run["request_id"] == rid]
        if found:
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no record of request {rid}: {status}")
