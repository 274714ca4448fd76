"""The whole path through a real, unmodified legacy exo: `python -m exo.main --inference-engine rkllm`.

Skipped with the reason when legacy exo is not importable (see tests/real_exo.py).
The expected text of each answer is computed independently, by running the
simulated runtime in this process on the same templated prompt.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import time
from typing import Any

import aiohttp
import pytest

from exo_rkllm.runtime.base import GenerationInput, TokenEvent
from exo_rkllm.runtime.sim import SimRuntime, SimTiming
from real_exo import EXO_PYTHON, REAL_EXO, start_exo
from support import DEMO_ID

pytestmark = REAL_EXO
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def exo(tmp_path_factory, demo_model_dir):
    workdir = tmp_path_factory.mktemp("exo")
    models = workdir / "models"
    shutil.copytree(demo_model_dir, models / demo_model_dir.name)
    broken = models / "BrokenModelfile"
    shutil.copytree(demo_model_dir, broken)
    (broken / "Modelfile").write_text('FROM="missing-file.rkllm"\n')
    system = models / "WithSystem"
    shutil.copytree(demo_model_dir, system)
    modelfile = (system / "Modelfile").read_text().replace('SYSTEM=""', 'SYSTEM="[[sim:text=the Modelfile system prompt was applied]]"')
    (system / "Modelfile").write_text(modelfile)
    short = models / "ShortContext"
    shutil.copytree(demo_model_dir, short)
    (short / "Modelfile").write_text((short / "Modelfile").read_text() + 'NUM_CTX="48"\n')
    notok = models / "NoTokenizer"
    notok.mkdir()
    shutil.copy(next(demo_model_dir.glob("*.rkllm")), notok / "m.rkllm")
    proc = start_exo(EXO_PYTHON, workdir, models,
                     {"RKLLM_SIM_DECODE_MS": "20", "RKLLM_SIM_PREFILL_MS": "1", "RKLLM_SIM_PREFILL_BASE_MS": "10",
                      "RKLLM_SIM_LOAD_MS": "200"},
                     ["--max-generate-tokens", str(MAX_TOKENS)])
    yield proc
    proc.stop()


async def expected_text(demo_spec, tokenizer, messages) -> str:
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    rt = SimRuntime(SimTiming.instant())
    await rt.load(demo_spec)
    text = ""
    async for ev in rt.generate(GenerationInput("expected", tuple(tokenizer.encode(prompt)))):
        if isinstance(ev, TokenEvent):
            text += ev.text
    return text


async def stream_chat(session: aiohttp.ClientSession, url: str, messages, model: str = DEMO_ID,
                      stop_after: int | None = None) -> dict[str, Any]:
    started = time.monotonic()
    chunks: list[dict[str, Any]] = []
    first_at = None
    async with session.post(f"{url}/v1/chat/completions",
                            json={"model": model, "messages": messages, "stream": True}) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            chunks.append(chunk)
            if first_at is None and chunk["choices"][0]["delta"].get("content"):
                first_at = time.monotonic()
            if stop_after is not None and len(chunks) >= stop_after:
                break  # leave mid-stream: the connection is closed
            if chunk["choices"][0]["finish_reason"] is not None:
                break
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    return {"text": text, "chunks": chunks, "finish": chunks[-1]["choices"][0]["finish_reason"] if chunks else None,
            "ttft": (first_at or time.monotonic()) - started, "total": time.monotonic() - started}


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def test_models_lists_only_this_engines_models(exo):
    async with aiohttp.ClientSession() as s, s.get(f"{exo.api}/v1/models") as r:
        ids = [m["id"] for m in (await r.json())["data"]]
    assert ids == [DEMO_ID, "shortcontext", "withsystem"]  # the broken models are not offered


async def test_modelfile_system_prompt_is_not_added(exo, demo_spec, demo_tokenizer):
    """No rkllama version applies the Modelfile SYSTEM to chat requests; exo-rkllm sends what the
    user sent (exo's own --system-prompt is the documented way to add a default one)."""
    async with aiohttp.ClientSession() as s:
        res = await stream_chat(s, exo.api, user("hello"), model="withsystem")
    assert res["text"] == await expected_text(demo_spec, demo_tokenizer, user("hello"))
    assert res["text"] != "the Modelfile system prompt was applied"


async def test_an_answer_that_fills_the_context_says_length(exo, demo_tokenizer):
    """exo sees the eos the engine hands it and would say `stop`: a cut-short answer says `length`."""
    messages = user("fill the context [[sim:tokens=300]]")
    prompt = demo_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    room = 48 - len(demo_tokenizer.encode(prompt))
    assert 0 < room < MAX_TOKENS  # the context, not exo's --max-generate-tokens, ends it
    async with aiohttp.ClientSession() as s:
        streamed = await stream_chat(s, exo.api, messages, model="shortcontext")
        async with s.post(f"{exo.api}/v1/chat/completions", json={"model": "shortcontext", "messages": messages}) as r:
            full = await r.json()
    assert streamed["finish"] == "length" and full["choices"][0]["finish_reason"] == "length"
    assert len(demo_tokenizer.encode(full["choices"][0]["message"]["content"])) in range(room - 2, room + 1)


@pytest.mark.parametrize("prompt", ["Say something [[sim:tokens=38]]", "Autre chose, s'il te plaît [[sim:tokens=39]]",
                                    "hi [[sim:text= Hé 世界 🤖👩‍💻 ¿qué?  \t日本語 🇫🇷]]"])
async def test_streamed_and_full_answers_are_the_runtime_text(exo, demo_spec, demo_tokenizer, prompt):
    messages = user(prompt)
    want = await expected_text(demo_spec, demo_tokenizer, messages)
    assert any(ord(c) > 0x2000 for c in want)
    async with aiohttp.ClientSession() as s:
        streamed = await stream_chat(s, exo.api, messages)
        async with s.post(f"{exo.api}/v1/chat/completions", json={"model": DEMO_ID, "messages": messages}) as r:
            full = await r.json()
    assert streamed["text"].encode() == want.encode()
    assert streamed["finish"] == "stop"
    assert full["choices"][0]["message"]["content"].encode() == want.encode()
    assert full["choices"][0]["finish_reason"] == "stop"
    for text in (streamed["text"], full["choices"][0]["message"]["content"]):
        assert "\ufffd" not in text and "<|im_end|>" not in text


async def test_openai_client_streams(exo, demo_spec, demo_tokenizer):
    openai = pytest.importorskip("openai")
    messages = user("OpenAI client [[sim:tokens=20]]")
    want = await expected_text(demo_spec, demo_tokenizer, messages)
    client = openai.AsyncOpenAI(base_url=f"{exo.api}/v1", api_key="none")
    text = ""
    async for chunk in await client.chat.completions.create(model=DEMO_ID, messages=messages, stream=True):
        text += chunk.choices[0].delta.content or ""
    assert text == want
    await client.close()


async def test_max_generate_tokens_ends_with_length(exo):
    async with aiohttp.ClientSession() as s:
        res = await stream_chat(s, exo.api, user("long [[sim:tokens=300]]"))
        assert res["finish"] == "length" and len(res["chunks"]) == MAX_TOKENS
        after = await stream_chat(s, exo.api, user("short [[sim:tokens=3]]"))
        assert after["finish"] == "stop"
        assert after["ttft"] < 2.0, "the runtime must have been aborted, not left generating 260 more tokens"


async def test_concurrent_streams_each_get_their_own_text(exo, demo_spec, demo_tokenizer):
    prompts = [user(f"client {i} [[sim:tokens={10 + i}]]") for i in range(4)]
    wants = [await expected_text(demo_spec, demo_tokenizer, m) for m in prompts]
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(stream_chat(s, exo.api, m) for m in prompts))
    assert [r["text"] for r in results] == wants


async def test_disconnect_mid_stream_frees_the_npu(exo):
    async with aiohttp.ClientSession() as s:
        gone = asyncio.create_task(stream_chat(s, exo.api, user("abandon me [[sim:tokens=300]]"), stop_after=3))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(stream_chat(s, exo.api, user("queued behind [[sim:tokens=5]]")))
        await gone
        left_at = time.monotonic()
        res = await asyncio.wait_for(queued, 30)
    # 300 tokens at 20 ms would hold the NPU for 6 s; the abort must let the next one start at once.
    assert res["finish"] == "stop"
    assert time.monotonic() - left_at < 1.0 + 5 * 0.02 + 0.5


async def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(exo):
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{exo.api}/v1/chat/completions", json={"model": "no-such-model", "messages": user("x")}) as r:
            body = await r.json()
            assert r.status == 404 and "unknown model 'no-such-model'" in body["error"]["message"]
            assert DEMO_ID in body["error"]["message"]
        async with s.post(f"{exo.api}/v1/chat/completions", json={"model": DEMO_ID}) as r:
            assert r.status == 400 and "messages" in (await r.json())["error"]["message"]
        async with s.post(f"{exo.api}/v1/chat/completions", json={"model": DEMO_ID, "messages": user("word " * 5000)}) as r:
            body = await r.json()
            assert r.status == 400 and "context of 4096 tokens" in body["error"]["message"], body
        for model, reason in (("BrokenModelfile", "no such file"), ("NoTokenizer", "missing tokenizer")):
            async with s.post(f"{exo.api}/v1/chat/completions", json={"model": model, "messages": user("x")}) as r:
                body = await r.json()
                assert r.status == 409 and reason in body["error"]["message"], body
        res = await stream_chat(s, exo.api, user("error please [[sim:error_at=4]]"))
        assert res["finish"] == "error" and "token 4" in res["chunks"][-1]["error"]["message"]
        async with s.post(f"{exo.api}/v1/chat/completions",
                          json={"model": DEMO_ID, "messages": user("error please [[sim:error_at=2]]")}) as r:
            assert r.status == 500 and "token 2" in (await r.json())["error"]["message"]
        ok = await stream_chat(s, exo.api, user("still alive [[sim:tokens=3]]"))
        assert ok["finish"] == "stop"


async def test_no_request_state_is_left_behind_after_200_requests(exo):
    async with aiohttp.ClientSession() as s:
        for i in range(200):
            if i % 20 == 0:  # ends on exo's --max-generate-tokens, runtime aborted
                res = await stream_chat(s, exo.api, user(f"n{i} [[sim:tokens=100]]"))
                assert res["finish"] == "length"
            elif i % 3 == 0:
                async with s.post(f"{exo.api}/v1/chat/completions",
                                  json={"model": DEMO_ID, "messages": user(f"n{i} [[sim:tokens=2]]")}) as r:
                    assert r.status == 200
            else:
                await stream_chat(s, exo.api, user(f"n{i} [[sim:tokens=2]]"))
        await asyncio.sleep(0.3)
        async with s.get(f"{exo.api}/v1/rkllm/status") as r:
            status = await r.json()
    assert status["streams"] == 0 and status["queued"] == 0 and status["running"] is None
    assert status["plugin"] == {"active": 0, "endings": 0, "texts": 0}
    assert status["engine"] == {"contexts": 0}


async def test_zz_shutdown_stops_the_npu_and_releases_the_runtime(exo):
    """Runs last in this module: it stops the shared exo, with a generation in flight."""
    async with aiohttp.ClientSession() as s:
        task = asyncio.create_task(stream_chat(s, exo.api, user("[[sim:tokens=400]]")))
        for _ in range(200):
            async with s.get(f"{exo.api}/v1/rkllm/status") as r:
                if (await r.json()).get("running"):
                    break
            await asyncio.sleep(0.05)
        await asyncio.to_thread(exo.stop)  # SIGTERM: exo's own shutdown path
        task.cancel()
    log = exo.log_text()
    assert "rkllm engine stopped: 1 unfinished request(s) cancelled, runtime released" in log, log[-2000:]


def test_empty_models_folder_starts_and_says_what_to_do(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = start_exo(EXO_PYTHON, tmp_path, tmp_path / "empty", {})
    try:
        async def check():
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{proc.api}/v1/models") as r:
                    assert (await r.json())["data"] == []
                async with s.post(f"{proc.api}/v1/chat/completions", json={"messages": user("hi")}) as r:
                    body = await r.json()
                    assert r.status == 404 and "exo-rkllm demo" in body["error"]["message"]
        asyncio.run(check())
        assert "no servable .rkllm model" in proc.log_text()
    finally:
        proc.stop()
