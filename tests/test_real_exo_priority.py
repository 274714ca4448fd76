"""Priorities through a real legacy exo: a person's streamed chat pauses a background request.

Skipped with the reason when legacy exo is not importable (see tests/real_exo.py). No timed
assertion: the background answer is long (120 tokens at 20 ms) and the checks are about order
(the chat ends while the background request is paused) and text (the resumed answer equals the
uninterrupted one, computed by the simulator in this process).
"""
from __future__ import annotations

import asyncio
import shutil

import aiohttp
import pytest

from real_exo import EXO_PYTHON, REAL_EXO, SSEStream, expected_text, post_json, start_exo, stream_chat, user
from support import DEMO_ID

pytestmark = REAL_EXO
TITLE = ("### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat history.\n"
         "### Chat History:\n<chat_history>\nUSER: {}\n</chat_history>")


@pytest.fixture(scope="module")
def exo(tmp_path_factory, demo_model_dir):
    workdir = tmp_path_factory.mktemp("exo-priority")
    models = workdir / "models"
    shutil.copytree(demo_model_dir, models / demo_model_dir.name)
    proc = start_exo(EXO_PYTHON, workdir, models,
                     {"RKLLM_SIM_DECODE_MS": "20", "RKLLM_SIM_PREFILL_MS": "1", "RKLLM_SIM_PREFILL_BASE_MS": "10",
                      "RKLLM_SIM_LOAD_MS": "200"})
    yield proc
    proc.stop()


async def background(session: aiohttp.ClientSession, url: str, shape: str, text: str) -> str:
    """A background request of the given shape; returns its whole answer text."""
    if shape == "not streamed":
        status, body, _ = await post_json(session, f"{url}/v1/chat/completions", {"model": DEMO_ID, "messages": user(text)})
        assert status == 200, body
        return body["choices"][0]["message"]["content"]
    headers = {"X-Priority": "background"} if shape == "header" else {}
    res = await stream_chat(session, url, user(text), headers=headers)
    assert res.finish == "stop", res.events[-3:]
    return res.text


async def until_running(session: aiohttp.ClientSession, url: str) -> None:
    async def poll() -> None:
        while True:
            async with session.get(f"{url}/v1/rkllm/status") as r:
                if (await r.json()).get("running"):
                    return
            await asyncio.sleep(0.02)
    await asyncio.wait_for(poll(), 60)


@pytest.mark.parametrize("shape", ["not streamed", "header", "open webui task"])
async def test_a_streamed_chat_pauses_a_background_request(exo, demo_spec, demo_tokenizer, shape):
    text = f"background {shape} [[sim:tokens=120]]"
    if shape == "open webui task":
        text = TITLE.format(text)
    want = await expected_text(demo_spec, demo_tokenizer, user(text))
    paused_before = paused_lines(exo)
    ended: list[str] = []
    async with aiohttp.ClientSession() as s:
        async def bg() -> str:
            out = await background(s, exo.api, shape, text)
            ended.append("background")
            return out

        async def chat() -> SSEStream:
            out = await stream_chat(s, exo.api, user(f"the person, {shape} [[sim:tokens=5]]"))
            ended.append("chat")
            return out

        bg_task = asyncio.create_task(bg())
        await until_running(s, exo.api)
        res = await chat()
        bg_text = await asyncio.wait_for(bg_task, 60)
    assert ended == ["chat", "background"], "the chat must not wait for the background answer"
    assert res.finish == "stop"
    assert bg_text == want, "the paused and resumed answer must equal the uninterrupted one"
    assert paused_lines(exo) == paused_before + 1, "exactly one request was paused, and logged once"


def paused_lines(exo) -> int:
    """INFO lines of finished requests that were paused (one per request, at its real end)."""
    return sum(1 for line in exo.log_text().splitlines() if " generated, queued " in line and ", paused " in line)
