"""A real, unmodified legacy exo (`python -m exo.main --inference-engine rkllm`, RKLLM_BACKEND=rkllama)
serving the fake rkllama server's model, in every API generation.

One exo process for the module; the fake server runs in this process (on its own thread) and is
restarted on the same port with another API generation for each parameter, so exo's client has
to notice the restart and detect the server afresh. Skipped when legacy exo is not importable.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import threading
import time
from typing import Any

import aiohttp
import pytest

from exo_rkllm.runtime.sim import SimTiming
from fake_rkllama import APIS, FakeRkllamaServer
from real_exo import EXO_PYTHON, REAL_EXO, free_port, post_json, start_exo, stream_chat, user
from support import DEMO_ID

pytestmark = REAL_EXO

FAST = SimTiming(0, 0, 0, 2.0)
BOARD = SimTiming(0, 40, 8, 125)  # RK3588-like: prefill 40 ms + 8 ms/token, 8 tokens/s


class ThreadedFake:
    """The fake server on its own event loop, so it keeps serving while tests block on exo."""

    def __init__(self, models_dir, port: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = FakeRkllamaServer(models_dir, "ollama", FAST, port=port, unload_grace_s=0.2)

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def switch(self, api: str, timing: SimTiming = FAST) -> None:
        """A restart of the server, possibly as another rkllama version."""
        async def go() -> None:
            await self.server.down()
            self.server.state.api = api
            self.server.state.timing = timing
            await self.server.up()
        self.call(go())

    def close(self) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def rig(tmp_path_factory, demo_model_dir):
    workdir = tmp_path_factory.mktemp("exo-rkllama")
    models = workdir / "models"
    shutil.copytree(demo_model_dir, models / demo_model_dir.name)
    fake = ThreadedFake(models, free_port())
    fake.call(fake.server.start())
    exo = start_exo(EXO_PYTHON, workdir, models, {"RKLLM_BACKEND": "rkllama", "RKLLM_SERVER_URL": fake.server.url,
                                                  "RKLLM_SERVER_FIRST_TOKEN_TIMEOUT": "1.5"})
    yield exo, fake
    exo.stop()
    fake.close()


@pytest.mark.parametrize("api", APIS)
async def test_exact_text_and_one_template_in_every_api_generation(rig, api):
    exo, fake = rig
    fake.switch(api)
    async with aiohttp.ClientSession() as s:
        for prompt in ["[[sim:text=  Leading spaces 世界 🤖👩‍💻 ¿qué?\t日本語 🇫🇷 👍🏽]]", "tell me something",
                       "[[sim:text= café：你好，世界！]]"]:
            streamed = await stream_chat(s, exo.api, user(prompt))
            rec = fake.server.generations()[-1]
            status, full, _ = await post_json(s, f"{exo.api}/v1/chat/completions",
                                              {"model": DEMO_ID, "messages": user(prompt)})
            assert status == 200, full
            rec_full = fake.server.generations()[-1]
            assert rec.text and any(ord(c) > 0x2000 for c in rec.text + rec_full.text + "世")
            assert streamed.text.encode() == rec.text.encode()
            assert streamed.finish == "stop"
            assert full["choices"][0]["message"]["content"].encode() == rec_full.text.encode()
            for r in (rec, rec_full):
                assert r.path == ("/generate" if api == "early" else "/api/chat")
                assert "<|im_start|>" not in json.dumps(r.body), "exo's templated prompt must not be sent"
                assert r.prompt.count("<|im_start|>assistant\n") == 1 and r.prompt.endswith("<|im_start|>assistant\n")


async def test_time_to_first_token_through_exo(rig):
    exo, fake = rig
    fake.switch("ollama", BOARD)
    gaps = []
    async with aiohttp.ClientSession() as s:
        await stream_chat(s, exo.api, user("warm up [[sim:tokens=2]]"))
        for i in range(4):
            res = await stream_chat(s, exo.api, user(f"question {i} [[sim:tokens=3]]"))
            rec = fake.server.generations()[-1]
            gaps.append(res.first_content_at - rec.first_piece_at)
            assert res.text == rec.text
    print(f"\nreal exo: first token at the client {statistics.median(gaps) * 1000:.1f} ms (median), "
          f"{max(gaps) * 1000:.1f} ms (max) after the server's first chunk")
    assert max(gaps) < 0.25  # generous; the figures are reported


async def test_failures_are_clear_and_the_next_request_works(rig):
    exo, fake = rig
    fake.switch("ollama")
    async with aiohttp.ClientSession() as s:
        fake.server.faults.http_error = (500, {"error": "worker exploded"})
        status, body, _ = await post_json(s, f"{exo.api}/v1/chat/completions", {"model": DEMO_ID, "messages": user("x")})
        assert status == 500 and "worker exploded" in body["error"]["message"], body
        fake.server.faults.http_error = (500, {"error": "worker exploded"})  # faults are taken by one request
        res = await stream_chat(s, exo.api, user("x"))  # the same failure before the first token of a stream
        assert res.status == 500 and "worker exploded" in res.error["message"] and not res.events, res.body
        fake.server.faults.malformed_after = 3
        res = await stream_chat(s, exo.api, user("[[sim:text=one two three four five six seven]]"))
        assert res.finish is None and "malformed stream chunk" in res.error["message"], res.events[-2:]
        ok = await stream_chat(s, exo.api, user("[[sim:text=fine 世界]]"))
        assert ok.text == "fine 世界" and ok.finish == "stop"
        fake.server.faults.fail_after = 2  # the server dies mid-answer
        res = await stream_chat(s, exo.api, user("[[sim:text=one two three four five six seven]]"))
        assert res.finish is None and "broke off the answer" in res.error["message"], res.events[-2:]
        assert res.text == "one two"
        ok = await stream_chat(s, exo.api, user("[[sim:text=alive 🤖]]"))
        assert ok.text == "alive 🤖"
        fake.server.faults.first_token_delay_s = 2.5  # longer than RKLLM_SERVER_FIRST_TOKEN_TIMEOUT=1.5
        status, body, _ = await post_json(s, f"{exo.api}/v1/chat/completions", {"model": DEMO_ID, "messages": user("x")})
        assert status >= 500 and "RKLLM_SERVER_FIRST_TOKEN_TIMEOUT" in body["error"]["message"], body
        ok = await stream_chat(s, exo.api, user("[[sim:text=patient 🇯🇵]]"))
        assert ok.text == "patient 🇯🇵"
        fake.call(fake.server.down())
        started = time.monotonic()
        status, body, _ = await post_json(s, f"{exo.api}/v1/chat/completions", {"model": DEMO_ID, "messages": user("x")})
        assert status >= 500 and fake.server.url in body["error"]["message"], body
        assert time.monotonic() - started < 3.0
        fake.call(fake.server.up())
        ok = await stream_chat(s, exo.api, user("[[sim:text=back 🇫🇷]]"))
        assert ok.text == "back 🇫🇷"
