"""Server-Sent Events the way OpenAI's clients read them: `data: <json>\\n\\n` ... `data: [DONE]\\n\\n`.

Why a class of its own: a streamed answer has three ways to end and each must leave the client
with a finished body. `done()` ends a complete answer; `close()` ends a failed or timed-out one
*now* (after an error chunk), so a client never waits forever on a half-finished chunked body;
and a client that went away must not raise into the generation loop: `send()` answers False
and the caller stops (and gives the NPU back). Each event is one `write` of bytes encoded by a
shared JSON encoder; the headers are built once, in `start()`.

The framing is strict: every event is a single `data:` line (compact JSON has no raw newline:
json escapes control characters, and U+2028/U+2029 are not SSE line breaks) followed by one
blank line, as the OpenAI SDKs' and Open WebUI's line-based readers expect.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Mapping

from aiohttp import web

log = logging.getLogger("exo_rkllm.api.sse")

SSE_HEADERS: Mapping[str, str] = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass each event on at once instead of buffering the body
}
DONE_EVENT = b"data: [DONE]\n\n"
EOF_TIMEOUT = 5.0  # seconds close() waits for the end of the body before dropping the connection

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode_event(obj: Any) -> bytes:
    """One SSE event carrying `obj` as compact JSON, UTF-8."""
    return b"data: " + _encode(obj).encode("utf-8") + b"\n\n"


class EventStream:
    """One streamed answer. `start()` sends the headers (send() does it when needed); `send()`
    one event per call; `done()` or `close()` end it. Nothing here raises because the client
    went away: `send()` returns False and `client_gone` turns True."""

    def __init__(self, request: web.Request, *, headers: Mapping[str, str] | None = None,
                 eof_timeout: float = EOF_TIMEOUT, keep_alive: bool = False) -> None:
        self.request = request
        self.response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **(headers or {})})
        if not keep_alive:
            # `Connection: close`: a stream ended by close() drops its connection, and a pooling
            # client (aiohttp's, httpx's) that already put it back in its pool would send its next
            # request into a closing socket and get "server disconnected". Saying it up front costs
            # one TCP connect per streamed answer (negligible next to a generation) and rules out
            # that race; keep_alive=True keeps HTTP keep-alive for callers that never close().
            self.response.force_close()
        self.eof_timeout = eof_timeout
        self._gone = False
        self._started = False
        self._ended = False  # done() or close() ran: no more events

    # -- state ----------------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        """True once the headers went out: from then on the status is 200 whatever happens."""
        return self._started

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def client_gone(self) -> bool:
        """True once a write failed or the connection is closing (the client disconnected)."""
        if self._gone:
            return True
        transport = self.request.transport
        if transport is None or transport.is_closing():
            self._gone = True
        return self._gone

    # -- writing --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Send the status and headers (once). A client already gone only marks the stream."""
        if self._started:
            return
        self._started = True
        if self.client_gone:
            return
        try:
            await self.response.prepare(self.request)
        except OSError as exc:  # ConnectionResetError & co.: the client left before the headers
            self._lost(exc)

    async def _write(self, data: bytes) -> bool:
        if self._ended:
            return False
        if not self._started:
            await self.start()
        if self.client_gone:
            return False
        try:
            await self.response.write(data)
        except OSError as exc:
            self._lost(exc)
            return False
        return True

    async def send(self, obj: dict) -> bool:
        """Write one `data: <json>` event; False if the client has gone or the stream ended."""
        return await self._write(encode_event(obj))

    async def comment(self, text: str = "") -> bool:
        """Write an SSE comment (`: text`), which every client ignores: a keep-alive during a
        long prefill, so proxies with a read timeout keep the connection."""
        line = text.replace("\r", " ").replace("\n", " ")
        return await self._write(b": " + line.encode("utf-8") + b"\n\n")

    async def done(self) -> None:
        """`data: [DONE]`, then the end of the body. Idempotent; quiet if the client is gone."""
        if self._ended:
            return
        if not self._started:
            await self.start()
        self._ended = True
        if self.client_gone:
            return
        try:
            await self.response.write_eof(DONE_EVENT)
        except OSError as exc:
            self._lost(exc)

    async def close(self) -> None:
        """End the stream now, without [DONE]: finish the chunked body if that can be done
        within `eof_timeout`, then close the connection; if the end cannot be written (a client
        that stopped reading holds the socket's buffer full), drop the connection at once. Either
        way the client's read ends. Also ends a stream that was never started (empty body)."""
        if not self._started:
            await self.start()
        already = self._ended
        self._ended = True
        self.response.force_close()  # no keep-alive: aiohttp closes the connection after the handler
        transport = self.request.transport
        if transport is None or transport.is_closing():
            self._gone = True
            return
        ended = already
        if not already and not self._gone:
            try:
                await asyncio.wait_for(self.response.write_eof(), self.eof_timeout)
                ended = True
            except (OSError, asyncio.TimeoutError) as exc:
                self._lost(exc)
        if ended:
            transport.close()  # flushes what is buffered (the end of the body), then closes
        else:
            transport.abort()  # nothing more can be sent: drop it so the client's read fails now
        self._gone = True

    def _lost(self, exc: BaseException) -> None:
        if not self._gone:
            log.debug("SSE client of %s %s went away: %r", self.request.method, self.request.path, exc)
        self._gone = True
