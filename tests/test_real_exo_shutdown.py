"""SIGTERM on a real legacy exo with requests running and waiting: none may look finished.

Before, a stream cut by shutdown ended with `finish_reason: "stop"`, a queued stream was an
empty 200, a non-streamed answer came back as a 200 holding a fraction of its tokens, and exo
printed "Task was destroyed but it is pending!" on the way out.
"""
from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import aiohttp

from real_exo import EXO_PYTHON, REAL_EXO, start_exo
from support import DEMO_ID, user

pytestmark = REAL_EXO


async def _stream(session: aiohttp.ClientSession, url: str, text: str, chunks: list[dict[str, Any]]) -> int:
    async with session.post(f"{url}/v1/chat/completions",
                            json={"model": DEMO_ID, "messages": user(text), "stream": True}) as resp:
        if resp.status != 200:
            chunks.append({"status": resp.status, "body": await resp.text()})
            return resp.status
        try:
            async for raw in resp.content:
                line = raw.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        except aiohttp.ClientError:
            pass  # a dropped connection is an honest end too: it never looks finished
        return resp.status


async def _full(session: aiohttp.ClientSession, url: str, text: str) -> tuple[int, Any]:
    try:
        async with session.post(f"{url}/v1/chat/completions",
                                json={"model": DEMO_ID, "messages": user(text)}) as resp:
            return resp.status, await resp.json(content_type=None)
    except aiohttp.ClientError as exc:
        return 0, repr(exc)


def _finish(chunks: list[dict[str, Any]]) -> str | None:
    reasons = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
    return next((r for r in reversed(reasons) if r is not None), None)


async def test_sigterm_ends_every_open_request_as_an_error(tmp_path, demo_models_dir):
    exo = start_exo(EXO_PYTHON, tmp_path, demo_models_dir,
                    {"RKLLM_SIM_DECODE_MS": "20", "RKLLM_SIM_PREFILL_MS": "1", "RKLLM_SIM_PREFILL_BASE_MS": "5",
                     "RKLLM_SIM_LOAD_MS": "100"})
    try:
        running: list[dict[str, Any]] = []
        queued: list[dict[str, Any]] = []
        async with aiohttp.ClientSession() as s:
            first = asyncio.create_task(_stream(s, exo.api, "long [[sim:tokens=400]]", running))
            while len(running) < 10:
                await asyncio.sleep(0.02)
                assert not first.done(), running
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
    # The running stream: its text so far, then an error chunk (or a dropped connection) -- never stop/length.
    assert 10 <= len(running) < 400
    assert _finish(running) in ("error", None), running[-2:]
    if _finish(running) == "error":
        assert "shutting down" in json.dumps(running[-1])
    # The waiting stream and the waiting non-streamed request: an error, never a finished answer.
    assert _finish(queued) in ("error", None) and not any(c.get("status") == 200 for c in queued), queued
    if queued and "status" in queued[0]:
        assert queued[0]["status"] == 503 and "shutting down" in queued[0]["body"]
    status, body = third.result()
    assert status != 200 or body["choices"][0]["finish_reason"] == "error", body
    if status:
        assert status == 503 and "shutting down" in json.dumps(body)
    assert "Task was destroyed but it is pending" not in log, log[-3000:]
    assert "rkllm engine stopped" in log
