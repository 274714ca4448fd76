"""EventStream: strict SSE framing, [DONE] last, unicode intact, a client that leaves, close() that ends the body.

The server is a web.AppRunner on a free port, as exo runs its API (pytest-aiohttp is not used). Waits are
bounded (a few seconds) only so that a regression fails instead of hanging; nothing is timed.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from exo_rkllm.api.sse import EventStream, encode_event
from real_exo import EXO_PYTHON, requires_exo

BOUND = 10.0  # seconds: only a guard against hanging, never an assertion on speed

TRICKY = ["héllo wörld", "世界 🙂", "line\nbreak and\r\nCRLF", "tab\tquote\"back\\slash", "sep\u2028\u2029",
          "data: not an event\n\ndata: [DONE]", "\x00\x1f control"]


class Served:
    """An app served the way exo serves its API (`web.AppRunner` with its defaults: a handler is
    not cancelled when its client disconnects; aiohttp's TestServer would cancel it), on a free
    port, with a client session."""

    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self.runner, self.port = runner, port
        self.session = aiohttp.ClientSession()

    async def post(self, path: str) -> aiohttp.ClientResponse:
        return await self.session.post(f"http://127.0.0.1:{self.port}{path}")

    async def close(self) -> None:
        await self.session.close()
        await self.runner.cleanup()


async def _serve(handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                 more: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] | None = None) -> Served:
    app = web.Application()
    app.router.add_post("/stream", handler)
    for path, other in (more or {}).items():
        app.router.add_post(path, other)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return Served(runner, runner.addresses[0][1])


def _events(body: bytes) -> list[str]:
    """The data payloads of a body, checked strictly: only `data: ...` lines, each followed by one
    blank line, nothing else (no comments, no trailing bytes)."""
    text = body.decode("utf-8")
    assert text.endswith("\n\n"), repr(text[-20:])
    events = text[:-2].split("\n\n")
    out = []
    for event in events:
        assert "\n" not in event and "\r" not in event, f"an event spans lines: {event!r}"
        assert event.startswith("data: "), repr(event)
        out.append(event[len("data: "):])
    return out


async def test_events_are_framed_strictly_and_done_comes_last_once() -> None:
    chunks = [{"i": i, "text": t, "nested": {"list": [1, None, True]}} for i, t in enumerate(TRICKY)]
    results: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        stream = EventStream(request, headers={"X-Request-Id": "abc"})
        await stream.start()
        sent = [await stream.send(c) for c in chunks]
        await stream.done()
        await stream.done()  # idempotent: one [DONE] only
        results["sent"] = sent
        results["after_done"] = await stream.send({"late": True})
        return stream.response

    client = await _serve(handler)
    try:
        resp = await client.post("/stream")
        body = await asyncio.wait_for(resp.read(), BOUND)
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Accel-Buffering"] == "no"
        assert resp.headers["X-Request-Id"] == "abc"
    finally:
        await client.close()
    payloads = _events(body)
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    assert [json.loads(p) for p in payloads[:-1]] == chunks  # unicode and escapes survive the round trip
    assert results["sent"] == [True] * len(chunks)
    assert results["after_done"] is False
    # ensure_ascii=False: the text travels as UTF-8, not as \\u escapes; compact separators.
    assert "世界 🙂".encode() in body and b"\\u4e16" not in body
    assert b'"nested":{"list":[1,null,true]}' in body


def test_encode_event_is_one_compact_line() -> None:
    data = encode_event({"a": "é\n", "b": [1, 2]})
    assert data == 'data: {"a":"é\\n","b":[1,2]}\n\n'.encode()


async def test_send_starts_the_stream_and_an_empty_done_still_ends_with_done() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        stream = EventStream(request)
        await stream.done()  # never started explicitly
        return stream.response

    client = await _serve(handler)
    try:
        resp = await client.post("/stream")
        body = await asyncio.wait_for(resp.read(), BOUND)
    finally:
        await client.close()
    assert body == b"data: [DONE]\n\n"
    assert resp.headers["Content-Type"].startswith("text/event-stream")


async def test_client_disconnect_mid_stream_makes_send_return_false() -> None:
    outcome: asyncio.Future = asyncio.get_running_loop().create_future()

    async def handler(request: web.Request) -> web.StreamResponse:
        stream = EventStream(request)
        await stream.start()
        sent = 0
        try:
            while sent < 100_000:
                if not await stream.send({"n": sent, "pad": "x" * 100}):
                    break
                sent += 1
                await asyncio.sleep(0.005)
            gone = stream.client_gone
            await stream.done()  # must not raise either
            await stream.close()
            outcome.set_result((sent, gone, None))
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            outcome.set_result((sent, stream.client_gone, exc))
            raise
        return stream.response

    client = await _serve(handler)
    try:
        resp = await client.post("/stream")
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), BOUND)
        assert json.loads(first[len(b"data: "):]) == {"n": 0, "pad": "x" * 100}
        resp.close()  # the client goes away mid-stream
        sent, gone, error = await asyncio.wait_for(outcome, BOUND)
    finally:
        await client.close()
    assert error is None, f"EventStream raised into the handler: {error!r}"
    assert gone is True
    assert 1 <= sent < 100_000  # the loop stopped because send() said False, not because it ran out


async def test_a_failing_write_is_reported_as_gone_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    outcome: dict[str, Any] = {}

    async def broken_write(self: web.StreamResponse, data: bytes) -> None:
        raise ConnectionResetError("Cannot write to closing transport")

    async def handler(request: web.Request) -> web.StreamResponse:
        stream = EventStream(request)
        assert await stream.send({"ok": 1})
        monkeypatch.setattr(web.StreamResponse, "write", broken_write)
        outcome["sent"] = await stream.send({"ok": 2})
        outcome["gone"] = stream.client_gone
        outcome["again"] = await stream.send({"ok": 3})
        await stream.close()
        return stream.response

    client = await _serve(handler)
    try:
        resp = await client.post("/stream")
        try:
            await asyncio.wait_for(resp.read(), BOUND)
        except aiohttp.ClientPayloadError:
            pass  # the connection was dropped mid-body: that is an ended read too
    finally:
        await client.close()
    assert outcome == {"sent": False, "gone": True, "again": False}


async def _raw_post(port: int, path: str) -> bytes:
    """Everything the server sends for one request on a raw socket, up to its EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\r\n".encode())
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(-1), BOUND)  # read(-1) returns at EOF only
    finally:
        writer.close()


async def test_close_after_a_partial_stream_ends_the_body_and_the_connection() -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        stream = EventStream(request)
        await stream.send({"choices": [{"delta": {"content": "par"}}]})
        await stream.send({"error": {"message": "engine failed", "type": "server_error"}, "choices": []})
        await stream.close()
        assert stream.client_gone and await stream.send({"late": 1}) is False
        await release.wait()  # the handler keeps running: only close() can have ended the body
        return stream.response

    client = await _serve(handler)
    try:
        resp = await client.post("/stream")
        body = await asyncio.wait_for(resp.read(), BOUND)  # ends: no TimeoutError
        payloads = _events(body)
        assert [json.loads(p) for p in payloads] == [
            {"choices": [{"delta": {"content": "par"}}]},
            {"error": {"message": "engine failed", "type": "server_error"}, "choices": []}]
        assert "[DONE]" not in payloads

        raw = await _raw_post(client.port, "/stream")  # the connection itself is closed (EOF)
        head, _, chunked = raw.partition(b"\r\n\r\n")
        assert b"Transfer-Encoding: chunked" in head
        assert chunked.endswith(b"0\r\n\r\n"), "the chunked body was not terminated"
    finally:
        release.set()
        await client.close()


async def test_close_drops_the_connection_when_the_end_cannot_be_written(monkeypatch: pytest.MonkeyPatch) -> None:
    release = asyncio.Event()

    async def stuck_write_eof(self: web.StreamResponse, data: bytes = b"") -> None:
        await asyncio.Event().wait()  # a client that stopped reading: the end never gets out

    async def handler(request: web.Request) -> web.StreamResponse:
        stream = EventStream(request, eof_timeout=0.2)
        await stream.send({"n": 1})
        monkeypatch.setattr(web.StreamResponse, "write_eof", stuck_write_eof)
        await stream.close()
        await release.wait()
        return stream.response

    client = await _serve(handler)
    try:
        resp = await client.post("/stream")
        with pytest.raises(aiohttp.ClientPayloadError):  # the read ends, as an incomplete body
            await asyncio.wait_for(resp.read(), BOUND)
    finally:
        release.set()
        monkeypatch.undo()
        await client.close()


async def test_close_before_start_sends_an_empty_finished_stream() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        stream = EventStream(request)
        await stream.close()
        assert stream.started and await stream.send({"x": 1}) is False
        return stream.response

    client = await _serve(handler)
    try:
        resp = await client.post("/stream")
        assert await asyncio.wait_for(resp.read(), BOUND) == b""
        assert resp.status == 200
    finally:
        await client.close()


async def test_a_pooling_client_reuses_nothing_after_close() -> None:
    """After close(), the same client session's next request must work: the stream said
    `Connection: close` up front, so the client never pooled the connection close() drops."""
    async def partial(request: web.Request) -> web.StreamResponse:
        stream = EventStream(request)
        await stream.send({"n": 1})
        await stream.close()
        return stream.response

    async def full(request: web.Request) -> web.StreamResponse:
        stream = EventStream(request)
        await stream.send({"n": 2})
        await stream.done()
        return stream.response

    served = await _serve(partial, {"/full": full})
    try:
        for _ in range(3):  # one session, so one connection pool: a closed stream, then a full one
            resp = await served.post("/stream")
            assert resp.headers.get("Connection", "").lower() == "close"
            assert _events(await asyncio.wait_for(resp.read(), BOUND)) == ['{"n":1}']
            resp = await served.post("/full")
            assert _events(await asyncio.wait_for(resp.read(), BOUND)) == ['{"n":2}', "[DONE]"]
    finally:
        await served.close()


async def test_keep_alive_streams_keep_the_connection() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        stream = EventStream(request, keep_alive=True)
        await stream.send({"n": 1})
        await stream.done()
        return stream.response

    served = await _serve(handler)
    try:
        for _ in range(2):
            resp = await served.post("/stream")
            assert "Connection" not in resp.headers
            assert _events(await asyncio.wait_for(resp.read(), BOUND)) == ['{"n":1}', "[DONE]"]
    finally:
        await served.close()


# exo serves with its own pinned aiohttp (3.10): the same behaviours there, in legacy exo's Python.
SSE_ON_EXO_AIOHTTP = r"""
import asyncio, json, aiohttp
from aiohttp import web
from exo_rkllm.api.sse import EventStream


async def main():
    results = {"aiohttp": aiohttp.__version__}
    outcome = asyncio.get_running_loop().create_future()
    release = asyncio.Event()

    async def disconnect(request):
        stream = EventStream(request)
        n = 0
        try:
            while n < 100000 and await stream.send({"n": n}):
                n += 1
                await asyncio.sleep(0.005)
            await stream.done()
            await stream.close()
            outcome.set_result({"stopped": n < 100000, "gone": stream.client_gone, "error": None})
        except BaseException as exc:
            outcome.set_result({"stopped": False, "gone": stream.client_gone, "error": repr(exc)})
            raise
        return stream.response

    async def partial(request):
        stream = EventStream(request)
        await stream.send({"a": "\u00e9\u4e16"})
        await stream.close()
        await release.wait()
        return stream.response

    async def full(request):
        stream = EventStream(request)
        await stream.send({"a": "\u00e9\u4e16"})
        await stream.done()
        return stream.response

    app = web.Application()
    app.router.add_post("/disconnect", disconnect)
    app.router.add_post("/partial", partial)
    app.router.add_post("/full", full)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = "http://127.0.0.1:%d" % runner.addresses[0][1]
    async with aiohttp.ClientSession() as session:
        resp = await session.post(url + "/disconnect")
        await resp.content.readuntil(b"\n\n")
        resp.close()
        results["disconnect"] = await asyncio.wait_for(outcome, 10)
        async with session.post(url + "/partial") as resp:
            results["partial"] = (await asyncio.wait_for(resp.read(), 10)).decode()
        async with session.post(url + "/full") as resp:
            results["full"] = (await asyncio.wait_for(resp.read(), 10)).decode()
    release.set()
    await runner.cleanup()
    print("RESULT " + json.dumps(results))


asyncio.run(main())
"""


@pytest.mark.real_exo
@requires_exo
def test_the_stream_behaves_the_same_on_exos_aiohttp(tmp_path: Path) -> None:
    script = tmp_path / "sse_on_exo_aiohttp.py"
    script.write_text(SSE_ON_EXO_AIOHTTP)
    env = {**os.environ, "EXO_RKLLM_AUTOLOAD": "0"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([str(EXO_PYTHON), str(script)], capture_output=True, text=True, timeout=120, env=env,
                         cwd=tmp_path)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["disconnect"] == {"stopped": True, "gone": True, "error": None}
    assert result["partial"] == 'data: {"a":"\u00e9\u4e16"}\n\n'  # ended, without [DONE]
    assert result["full"] == 'data: {"a":"\u00e9\u4e16"}\n\ndata: [DONE]\n\n'  # the next request on the pool works
