"""The whole path through a real, unmodified legacy exo: `python -m exo.main --inference-engine rkllm`.

Skipped with the reason when legacy exo is not importable (see tests/real_exo.py).
The expected text of each answer is computed independently, by running the
simulated runtime in this process on the same templated prompt.
"""
from __future__ import annotations

import asyncio
import shutil

import aiohttp
import pytest

from real_exo import EXO_PYTHON, REAL_EXO, expected_answer, expected_text, post_json, run_record, start_exo, \
    stream_chat, user
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


async def test_models_lists_only_this_engines_models(exo):
    async with aiohttp.ClientSession() as s, s.get(f"{exo.api}/v1/models") as r:
        ids = [m["id"] for m in (await r.json())["data"]]
    assert ids == [DEMO_ID, "shortcontext", "withsystem"]  # the broken models are not offered


async def test_modelfile_system_prompt_is_not_added(exo, demo_spec, demo_tokenizer):
    """No rkllama version applies the Modelfile SYSTEM to chat requests; exo-rkllm sends what the
    user sent (exo's own --system-prompt is the documented way to add a default one)."""
    async with aiohttp.ClientSession() as s:
        res = await stream_chat(s, exo.api, user("hello"), model="withsystem")
    assert res.text == await expected_text(demo_spec, demo_tokenizer, user("hello"))
    assert res.text != "the Modelfile system prompt was applied"


async def test_an_answer_that_fills_the_context_says_length(exo, demo_tokenizer):
    """exo sees the eos the engine hands it and would say `stop`: a cut-short answer says `length`."""
    messages = user("fill the context [[sim:tokens=300]]")
    prompt = demo_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    room = 48 - len(demo_tokenizer.encode(prompt))
    assert 0 < room < MAX_TOKENS  # the context, not exo's --max-generate-tokens, ends it
    async with aiohttp.ClientSession() as s:
        streamed = await stream_chat(s, exo.api, messages, model="shortcontext")
        status, full, _ = await post_json(s, f"{exo.api}/v1/chat/completions",
                                          {"model": "shortcontext", "messages": messages})
    assert status == 200, full
    assert streamed.finish == "length" and full["choices"][0]["finish_reason"] == "length"
    assert len(demo_tokenizer.encode(full["choices"][0]["message"]["content"])) in range(room - 2, room + 1)


@pytest.mark.parametrize("prompt", ["Say something [[sim:tokens=38]]", "Autre chose, s'il te plaît [[sim:tokens=39]]",
                                    "hi [[sim:text= Hé 世界 🤖👩‍💻 ¿qué?  \t日本語 🇫🇷]]"])
async def test_streamed_and_full_answers_are_the_runtime_text(exo, demo_spec, demo_tokenizer, prompt):
    messages = user(prompt)
    want = await expected_answer(demo_spec, demo_tokenizer, messages)
    assert any(ord(c) > 0x2000 for c in want.text)
    async with aiohttp.ClientSession() as s:
        streamed = await stream_chat(s, exo.api, messages, stream_options={"include_usage": True})
        status, full, _ = await post_json(s, f"{exo.api}/v1/chat/completions", {"model": DEMO_ID, "messages": messages})
    assert status == 200, full
    assert streamed.text.encode() == want.text.encode()
    assert streamed.finish == "stop"
    assert full["choices"][0]["message"] == {"role": "assistant", "content": want.text}
    assert full["choices"][0]["finish_reason"] == "stop"
    assert streamed.usage["completion_tokens"] == full["usage"]["completion_tokens"] == want.tokens, \
        "usage counts the answer's tokens, not the end-of-turn token"
    for text in (streamed.text, full["choices"][0]["message"]["content"]):
        assert "\ufffd" not in text and "<|im_end|>" not in text


async def test_openai_client_streams(exo, demo_spec, demo_tokenizer):
    openai = pytest.importorskip("openai")
    messages = user("OpenAI client [[sim:tokens=20]]")
    want = await expected_text(demo_spec, demo_tokenizer, messages)
    client = openai.AsyncOpenAI(base_url=f"{exo.api}/v1", api_key="none", max_retries=0)
    text = ""
    async for chunk in await client.chat.completions.create(model=DEMO_ID, messages=messages, stream=True):
        text += chunk.choices[0].delta.content or ""
    assert text == want
    await client.close()


async def test_max_generate_tokens_ends_with_length(exo):
    async with aiohttp.ClientSession() as s:
        res = await stream_chat(s, exo.api, user("long [[sim:tokens=300]]"), stream_options={"include_usage": True})
        assert res.finish == "length" and res.usage["completion_tokens"] == MAX_TOKENS
        after = await stream_chat(s, exo.api, user("short [[sim:tokens=3]]"))
        assert after.finish == "stop"
        run = await run_record(s, exo, res)
    # the runtime was stopped at exo's limit, not left generating the 260 tokens nobody reads
    assert MAX_TOKENS <= run["generated"] <= MAX_TOKENS + 1 and run["outcome"].startswith("cancelled"), run


async def test_concurrent_streams_each_get_their_own_text(exo, demo_spec, demo_tokenizer):
    prompts = [user(f"client {i} [[sim:tokens={10 + i}]]") for i in range(4)]
    wants = [await expected_text(demo_spec, demo_tokenizer, m) for m in prompts]
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(stream_chat(s, exo.api, m) for m in prompts))
    assert [r.text for r in results] == wants
    assert len({r.chunks[0]["id"] for r in results}) == 4, "each stream has its own id"


async def test_disconnect_mid_stream_frees_the_npu(exo):
    async with aiohttp.ClientSession() as s:
        gone = asyncio.create_task(stream_chat(s, exo.api, user("abandon me [[sim:tokens=300]]"), stop_after=3))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(stream_chat(s, exo.api, user("queued behind [[sim:tokens=5]]")))
        left = await gone  # leaving the `async with` closed the connection mid-answer
        res = await asyncio.wait_for(queued, 60)
        abandoned = await run_record(s, exo, left)
        served = await run_record(s, exo, res)
    assert res.finish == "stop"
    # 300 tokens would hold the NPU for 6 s: the abandoned run was stopped, then the queued one ran
    assert abandoned["outcome"].startswith("cancelled") and abandoned["generated"] < 300, abandoned
    assert served["outcome"] == "done" and served["generated"] == 5


async def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(exo):
    url = f"{exo.api}/v1/chat/completions"
    async with aiohttp.ClientSession() as s:
        status, body, _ = await post_json(s, url, {"model": "no-such-model", "messages": user("x")})
        assert status == 404 and "no-such-model" in body["error"]["message"], body
        assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
        status, body, _ = await post_json(s, url, {"model": DEMO_ID})
        assert status == 400 and body["error"]["param"] == "messages", body
        status, body, _ = await post_json(s, url, {"model": DEMO_ID, "messages": user("word " * 5000)})
        assert status == 400 and "context of 4096 tokens" in body["error"]["message"], body
        for model, reason in (("BrokenModelfile", "no such file"), ("NoTokenizer", "missing tokenizer")):
            status, body, _ = await post_json(s, url, {"model": model, "messages": user("x")})
            assert status == 409 and reason in body["error"]["message"], body
        # a failure after the first token: the text so far, then the error chunk and [DONE], no finish_reason
        res = await stream_chat(s, exo.api, user("error please [[sim:error_at=4]]"))
        assert res.text and res.finish is None and "token 4" in res.error["message"], res.events[-3:]
        # before the first token of a stream: an HTTP error status with OpenAI's JSON, no stream
        res = await stream_chat(s, exo.api, user("error please [[sim:error_at=1]]"))
        assert res.status == 500 and "token 1" in res.error["message"] and not res.events, res.body
        status, body, _ = await post_json(s, url, {"model": DEMO_ID, "messages": user("error please [[sim:error_at=2]]")})
        assert status == 500 and "token 2" in body["error"]["message"], body
        ok = await stream_chat(s, exo.api, user("still alive [[sim:tokens=3]]"))
        assert ok.finish == "stop"


async def test_no_request_state_is_left_behind_after_200_requests(exo):
    async with aiohttp.ClientSession() as s:
        for i in range(200):
            if i % 20 == 0:  # ends on exo's --max-generate-tokens, runtime aborted
                res = await stream_chat(s, exo.api, user(f"n{i} [[sim:tokens=100]]"))
                assert res.finish == "length"
            elif i % 3 == 0:
                status, body, _ = await post_json(s, f"{exo.api}/v1/chat/completions",
                                                  {"model": DEMO_ID, "messages": user(f"n{i} [[sim:tokens=2]]")})
                assert status == 200, body
            elif i % 7 == 0:  # a failure mid-answer
                res = await stream_chat(s, exo.api, user(f"n{i} [[sim:tokens=5]] [[sim:error_at=3]]"))
                assert res.error is not None
            else:
                await stream_chat(s, exo.api, user(f"n{i} [[sim:tokens=2]]"))
        await asyncio.sleep(0.3)
        async with s.get(f"{exo.api}/v1/rkllm/status") as r:
            status = await r.json()
    assert status["streams"] == 0 and status["queued"] == 0 and status["running"] is None
    assert status["plugin"] == {"feeds": 0}
    assert status["engine"] == {"contexts": 0}


async def test_zz_shutdown_stops_the_npu_and_releases_the_runtime(exo):
    """Runs last in this module: it stops the shared exo, with a generation in flight."""
    async with aiohttp.ClientSession() as s:
        task = asyncio.create_task(stream_chat(s, exo.api, user("[[sim:tokens=400]]"), check=False))
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
                status, body, _ = await post_json(s, f"{proc.api}/v1/chat/completions", {"messages": user("hi")})
                assert status == 404 and body["error"]["code"] == "model_not_found", body
                assert "RKLLM_MODELS_DIR" in body["error"]["message"], body
                assert str(tmp_path) not in body["error"]["message"], "the server's paths stay private"
        asyncio.run(check())
        assert "no servable .rkllm model" in proc.log_text() and "exo-rkllm demo" in proc.log_text()
    finally:
        proc.stop()
