"""SIGTERM on a real legacy exo with requests running and waiting: none may look finished.

Before, a stream cut by shutdown ended with `finish_reason: "stop"`, a queued stream was an
empty 200, a non-streamed answer came back as a 200 holding a fraction of its tokens, and exo
printed "Task was destroyed but it is pending!" on the way out.
"""
from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiohttp

from real_exo import EXO_PYTHON, REAL_EXO, SSEStream, check_stream, post_json, start_exo, stream_chat
from support import user

pytestmark = REAL_EXO


async def _stream(session: aiohttp.ClientSession, url: str, text: str, seen: list[SSEStream],
                  progress: list[Any] | None = None) -> SSEStream:
    """A streamed request, read to its end (checked below: a dropped connection is an honest end
    too, since it never looks finished)."""
    res = await stream_chat(session, url, user(text), check=False,
                            on_event=progress.append if progress is not None else None)
    seen.append(res)
    return res


async def _full(session: aiohttp.ClientSession, url: str, text: str) -> tuple[int, Any]:
    try:
        status, body, _ = await post_json(session, f"{url}/v1/chat/completions", {"messages": user(text)})
        return status, body
    except aiohttp.ClientError as exc:
        return 0, repr(exc)


async def test_sigterm_ends_every_open_request_as_an_error(tmp_path, demo_models_dir):
    exo = start_exo(EXO_PYTHON, tmp_path, demo_models_dir,
                    {"RKLLM_SIM_DECODE_MS": "20", "RKLLM_SIM_PREFILL_MS": "1", "RKLLM_SIM_PREFILL_BASE_MS": "5",
                     "RKLLM_SIM_LOAD_MS": "100"})
    try:
        running: list[SSEStream] = []
        queued: list[SSEStream] = []
        async with aiohttp.ClientSession() as s:
            progress: list[Any] = []
            first = asyncio.create_task(_stream(s, exo.api, "long [[sim:tokens=400]]", running, progress))
            while len(progress) < 10:
                await asyncio.sleep(0.02)
                assert not first.done(), progress
            second = asyncio.create_task(_stream(s, exo.api, "waiting [[sim:tokens=50]]", queued))
            third = asyncio.create_task(_full(s, exo.api, "waiting too [[sim:tokens=50]]"))
            await asyncio.sleep(0.5)
            assert not first.done()
            exo.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(first, second, third, return_exceptions=True), 30)
        exo.proc.wait(30)
    finally:
        exo.stop()
    log = exo.log_text()
    # The running stream: its text so far, then the error chunk and [DONE] (or a dropped connection),
    # never a finish_reason.
    (res,) = running
    assert 10 <= len(res.chunks) < 400 and res.text
    assert res.finish is None, res.events[-2:]
    if not res.dropped:
        check_stream(res)
        assert "shutting down" in res.error["message"], res.events[-2:]
    # The waiting stream: an HTTP 503 before its first token (or a dropped connection), never a 200 answer.
    (waiting,) = queued
    assert waiting.finish is None, waiting.events
    if not waiting.dropped:
        if waiting.status == 200:  # it had started after all: then it ends like the running one
            check_stream(waiting)
            assert "shutting down" in waiting.error["message"]
        else:
            assert waiting.status == 503 and "shutting down" in waiting.error["message"], waiting.body
            assert set(waiting.error) == {"message", "type", "param", "code"}
    # The waiting non-streamed request: an error, never a finished answer.
    status, body = third.result()
    assert status != 200, body
    if status:
        assert status == 503 and "shutting down" in body["error"]["message"], body
    assert "Task was destroyed but it is pending" not in log, log[-3000:]
    assert "rkllm engine stopped" in log
