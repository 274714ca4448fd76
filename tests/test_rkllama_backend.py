"""RkllamaRuntime against the fake rkllama server, in every API generation.

Exact text, one chat template, and a clear error then a working next request for every
way a server can fail: down, dying mid-answer, a malformed line, an error line, an HTTP
error, a slow first token, a stall, a restart, and a request abandoned mid-answer.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import pytest

from exo_rkllm.errors import GenerationError, ModelNotFound, RuntimeUnavailable
from exo_rkllm.runtime.base import ChatMessage, GenerationInput, Runtime
from exo_rkllm.runtime.rkllama import create
from exo_rkllm.runtime.sim import SimTiming
from fake_rkllama.fixtures import *  # noqa: F401,F403
from fake_rkllama import FakeRkllamaServer
from fake_rkllama.fixtures import DEMO_FOLDER_NAME, chat, collect, rkllama_config

AWKWARD = "  Hé 世界 🤖👩‍💻 ¿qué? 日本語  \t café 🇫🇷 👍🏽 中文标点：你好，世界！"


def sim_text(text: str) -> str:
    return f"Answer with [[sim:text={text}]]"


async def loaded(make_runtime, server, spec, **cfg):
    runtime = make_runtime(server.url, **cfg)
    await runtime.load(spec)
    return runtime


async def test_protocol_and_capabilities(server, make_runtime, rk_spec, api):
    runtime = await loaded(make_runtime, server, rk_spec)
    assert isinstance(runtime, Runtime)
    caps = runtime.capabilities
    assert caps.backend == "rkllama" and not caps.token_input and not caps.keep_history and not caps.clear_kv_cache
    assert ("early" in caps.version) == (api == "early")
    assert runtime.loaded == rk_spec and runtime.remote_name == DEMO_FOLDER_NAME


@pytest.mark.parametrize("text", [AWKWARD, " leading space", "\n\nnewlines first", "🤖", "a"])
async def test_text_is_the_servers_byte_for_byte(server, make_runtime, rk_spec, demo_tokenizer, text):
    runtime = await loaded(make_runtime, server, rk_spec)
    out = await collect(runtime, chat(sim_text(text)))
    sent = server.generations()[-1]
    assert sent.text == text
    assert out.text == text
    assert demo_tokenizer.decode(out.ids, skip_special_tokens=True) == text
    assert out.finish is not None and not out.finish.aborted
    assert out.finish.stats.decode_tokens == len(out.ids)


async def test_early_stream_with_a_closing_stop_object(make_server, make_runtime, rk_spec):
    """rkllama 0.0.4's code meant to close the early stream with an empty finish_reason=stop object
    (the stream of 0.0.1 just ends): either way the answer ends there, exactly."""
    server = await make_server("early", early_final_object=True)
    runtime = await loaded(make_runtime, server, rk_spec)
    out = await collect(runtime, chat(sim_text(AWKWARD)))
    assert out.text == AWKWARD and not out.finish.aborted


async def test_generated_answers_are_exact(server, make_runtime, rk_spec, demo_tokenizer):
    runtime = await loaded(make_runtime, server, rk_spec)
    for i in range(5):
        out = await collect(runtime, chat(f"question {i}"))
        sent = server.generations()[-1].text
        assert out.text == sent and demo_tokenizer.decode(out.ids) == sent
        assert len(sent) > 20


async def test_one_chat_template_applied_by_the_server(server, make_runtime, rk_spec, api):
    runtime = await loaded(make_runtime, server, rk_spec)
    inp = GenerationInput("r", (), messages=(ChatMessage("system", "You are terse."), ChatMessage("user", "Hi"),
                                             ChatMessage("assistant", "Hello."), ChatMessage("user", "And now?")))
    await collect(runtime, inp)
    rec = server.generations()[-1]
    assert rec.path == ("/generate" if api == "early" else "/api/chat")
    body = rec.body
    assert "<|im_start|>" not in json.dumps(body), "the client never sends a templated prompt"
    assert rec.prompt.count("<|im_start|>assistant\n") == 2  # the earlier answer + the generation prompt
    assert rec.prompt.endswith("<|im_start|>assistant\n") and rec.prompt.count("<|im_start|>system") == 1
    if api == "early":  # its own system prompt; ours is folded into the first user message
        assert rec.prompt.startswith("<|im_start|>system\nTu es un assistant artificiel.<|im_end|>\n")
        assert "<|im_start|>user\nYou are terse.\n\nHi<|im_end|>" in rec.prompt
    else:
        assert rec.prompt.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>")
    assert not [r for r in server.received if r.path == "/api/generate"], "/api/generate would template twice"


async def test_nothing_heavy_between_the_first_piece_and_the_first_token(server, make_runtime, rk_spec, monkeypatch):
    """What the text-to-token converter needs of the tokenizer (its size, special ids, byte tokens:
    ~20-40 ms with the transformers exo pins) is read once at load, never once the answer has opened."""
    from exo_rkllm.runtime.rkllama import text_tokens

    reads: list[object] = []
    real = text_tokens.VocabFacts.of.__func__

    def counted(cls, tokenizer):
        reads.append(tokenizer)
        return real(cls, tokenizer)

    monkeypatch.setattr(text_tokens.VocabFacts, "of", classmethod(counted))
    runtime = await loaded(make_runtime, server, rk_spec)
    assert len(reads) == 1
    for text in ("one", " two 世界", "🤖"):
        await next_request_works(runtime, server, text)
    assert len(reads) == 1


@pytest.fixture
def system_models_dir(tmp_path, demo_model_dir):
    """The demo model with a Modelfile SYSTEM prompt, as rkllama's pull writes one."""
    folder = tmp_path / DEMO_FOLDER_NAME
    folder.mkdir()
    for f in demo_model_dir.iterdir():
        if f.name != "Modelfile":
            (folder / f.name).symlink_to(f)
    text = (demo_model_dir / "Modelfile").read_text().replace('SYSTEM=""', f'SYSTEM="{MODELFILE_SYSTEM}"')
    assert MODELFILE_SYSTEM in text
    (folder / "Modelfile").write_text(text)
    return tmp_path


MODELFILE_SYSTEM = "Always answer in Klingon."


@pytest.mark.parametrize("system", [None, "You are terse."])
async def test_exactly_the_users_conversation_is_sent(system_models_dir, make_runtime, rk_spec, api, system):
    """No rkllama version applies the Modelfile's SYSTEM to /api/chat or /generate (it only shows it
    in /api/show): the backend adds nothing either, not even with SYSTEM among the model's options,
    and the fake server does as rkllama does."""
    server = await FakeRkllamaServer(system_models_dir, api, SimTiming(0, 0, 0, 1.0), unload_grace_s=0.2).start()
    try:
        spec = dataclasses.replace(rk_spec, options={**rk_spec.options, "SYSTEM": MODELFILE_SYSTEM})
        runtime = await loaded(make_runtime, server, spec)
        await collect(runtime, chat("Hi", system=system))
        rec = server.generations()[-1]
        sent = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hi"}]
        if api == "early":  # its own constant system prompt: ours is folded into the first user message
            sent = [{"role": "user", "content": f"{system}\n\nHi" if system else "Hi"}]
        assert rec.body["messages"] == sent and set(rec.body) <= {"model", "messages", "stream"}
        assert MODELFILE_SYSTEM not in rec.prompt
    finally:
        await server.stop()


async def test_tools_are_sent_and_tool_calls_come_back_as_text(make_server, make_runtime, rk_spec):
    server = await make_server("ollama")
    runtime = await loaded(make_runtime, server, rk_spec)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
    tools = ({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},)
    out = await collect(runtime, chat(sim_text(call), tools=tools))
    rec = server.generations()[-1]
    assert rec.body["tools"] == list(tools)
    assert rec.tool_calls and rec.text == call  # the server sent structured tool_calls, no content
    assert out.text == call


async def test_messages_are_required(server, make_runtime, rk_spec):
    runtime = await loaded(make_runtime, server, rk_spec)
    with pytest.raises(GenerationError, match="needs the request's chat messages"):
        await collect(runtime, GenerationInput("r", (1, 2, 3)))


async def test_unknown_model_names_what_the_server_has(server, make_runtime, rk_spec):
    runtime = make_runtime(server.url)
    other = dataclasses.replace(rk_spec, model_id="llama-3-8b", remote_name="Llama-3-8B",
                                path=rk_spec.path.parent.parent / "Llama-3-8B" / "llama-3-8b.rkllm")
    with pytest.raises(ModelNotFound, match=f"no model 'Llama-3-8B'.*it has: {DEMO_FOLDER_NAME}"):
        await runtime.load(other)


async def test_model_found_by_listing_when_the_catalog_has_no_name(server, make_runtime, demo_spec):
    runtime = await loaded(make_runtime, server, demo_spec)
    assert runtime.remote_name == DEMO_FOLDER_NAME


# -- failures ------------------------------------------------------------------------------------
async def next_request_works(runtime, server, text: str = "next one 世界") -> None:
    out = await collect(runtime, chat(sim_text(text)))
    assert out.text == text and server.generations()[-1].text == text


async def test_server_down_then_up(server, make_runtime, rk_spec):
    runtime = await loaded(make_runtime, server, rk_spec)
    await server.down()
    started = time.monotonic()
    with pytest.raises(RuntimeUnavailable) as err:
        await collect(runtime, chat("hello"))
    assert time.monotonic() - started < 2.0
    assert server.url in str(err.value)
    await server.up()  # a fresh process: nothing loaded
    await next_request_works(runtime, server)


async def test_load_with_server_down_is_clear(make_runtime, rk_spec, unused_tcp_port):
    runtime = make_runtime(f"http://127.0.0.1:{unused_tcp_port}")
    started = time.monotonic()
    with pytest.raises(RuntimeUnavailable, match=f"127.0.0.1:{unused_tcp_port}.*not reachable"):
        await runtime.load(rk_spec)
    assert time.monotonic() - started < 2.0


async def test_create_does_not_fail_when_the_server_is_down(unused_tcp_port):
    runtime = await create(rkllama_config(f"http://127.0.0.1:{unused_tcp_port}"))
    assert runtime.loaded is None
    await runtime.close()


@pytest.mark.parametrize("fault, match", [
    ({"fail_after": 3}, "broke off the answer"),
    ({"malformed_after": 3}, "malformed stream chunk"),
    ({"error_after": 3}, "reported an error mid-answer: simulated server failure"),
    ({"http_error": (500, {"error": "worker exploded"})}, "HTTP 500 worker exploded"),
])
async def test_failure_mid_answer_is_clear_and_the_next_request_works(server, make_runtime, rk_spec, api, fault,
                                                                       match):
    if "error_after" in fault and api == "early":
        pytest.skip("the early API has no error lines")
    runtime = await loaded(make_runtime, server, rk_spec)
    for key, value in fault.items():
        setattr(server.faults, key, value)
    got: list[str] = []
    with pytest.raises(GenerationError, match=match):
        async for event in runtime.generate(chat(sim_text("one two three four five six seven eight nine ten"))):
            got.append(getattr(event, "text", ""))
    if "http_error" not in fault:
        assert "".join(got) == server.generations()[-1].text[: len("".join(got))] and got
    await next_request_works(runtime, server)


async def test_pieces_before_a_malformed_line_in_the_same_read_still_count(make_server, make_runtime, rk_spec):
    server = await make_server("ollama", SimTiming.instant())  # lines arrive together
    runtime = await loaded(make_runtime, server, rk_spec)
    server.faults.malformed_after = 3
    texts: list[str] = []
    with pytest.raises(GenerationError, match="malformed"):
        async for event in runtime.generate(chat(sim_text("one two three four five"))):
            texts.append(getattr(event, "text", ""))
    assert "".join(texts) == "one two three"


async def test_slow_first_token_times_out_then_the_next_works(server, make_runtime, rk_spec):
    """The limit applies to the first piece only: loading the model (its own, generous timeout) is
    not cut short by it. Like rkllama, the fake sends no headers before the first piece."""
    runtime = await loaded(make_runtime, server, rk_spec, server_first_token_timeout=0.25)
    server.faults.first_token_delay_s = 1.5
    with pytest.raises(GenerationError, match="no answer within 0.25 s.*RKLLM_SERVER_FIRST_TOKEN_TIMEOUT"):
        await collect(runtime, chat("slow"))
    slow = server.generations()[-1]
    assert slow.headers_at is None and slow.first_piece_at is None, "the limit fired before the server answered"
    runtime.client.first_token_timeout = 30.0  # only the first request is meant to time out
    await next_request_works(runtime, server)
    assert server.generations()[-1].received_at > (slow.finished_at or 0.0), "one answer at a time at the server"


async def test_load_has_its_own_timeout(make_server, make_runtime, rk_spec, api):
    """Loading is bounded by RKLLM_SERVER_LOAD_TIMEOUT, never by the first-token limit."""
    server = await make_server(api, SimTiming(load_ms=600, prefill_base_ms=0, prefill_ms_per_token=0,
                                              decode_ms_per_token=1))
    runtime = await loaded(make_runtime, server, rk_spec, server_first_token_timeout=0.05)
    assert server.state.loads == [DEMO_FOLDER_NAME]
    await server.restart()
    quick = make_runtime(server.url, server_load_timeout=0.1)
    with pytest.raises(RuntimeUnavailable, match="within 0.1 s.*RKLLM_SERVER_LOAD_TIMEOUT"):
        await quick.load(rk_spec)
    assert runtime.client.load_timeout == 120.0 and quick.client.first_token_timeout == 120.0


async def test_a_first_token_timeout_on_a_worker_server_unloads_at_once(make_server, make_runtime, rk_spec):
    """rkllama answers nothing before the first piece, so a timed-out request is still running
    there: the next request must not wait for that answer (nor up to one more timeout), and must
    not queue behind it in the model's worker: the model is unloaded at once, which stops it."""
    server = await make_server("ollama")
    runtime = await loaded(make_runtime, server, rk_spec, server_first_token_timeout=0.3)
    server.faults.first_token_delay_s = 20.0
    with pytest.raises(GenerationError, match="no answer within 0.3 s"):
        await collect(runtime, chat("slow"))
    runtime.client.first_token_timeout = 30.0  # the next request gets a generous limit of its own
    started = time.monotonic()
    await next_request_works(runtime, server)
    elapsed = time.monotonic() - started
    slow, unload, fresh = server.generations()[-2], server.received[-2], server.generations()[-1]
    assert slow.first_piece_at is None, "the timed-out answer was stopped before it sent anything"
    assert unload.path == "/unload_model" and unload.body == {"model_name": DEMO_FOLDER_NAME}
    assert slow.received_at < unload.received_at < fresh.received_at
    assert runtime.unloads_for_abort == 1 and server.state.loads == [DEMO_FOLDER_NAME] * 2
    assert elapsed < 15.0  # a ceiling against hangs; the timed-out answer had 20 s to go


async def test_silence_mid_answer_times_out(server, make_runtime, rk_spec):
    runtime = await loaded(make_runtime, server, rk_spec, server_chunk_timeout=0.15)
    server.faults.stall_after, server.faults.stall_s = 2, 0.5
    with pytest.raises(GenerationError, match="sent nothing for 0.15 s.*RKLLM_SERVER_CHUNK_TIMEOUT"):
        await collect(runtime, chat(sim_text("a b c d e f")))
    await next_request_works(runtime, server)


async def test_server_restart_between_requests(server, make_runtime, rk_spec, api):
    runtime = await loaded(make_runtime, server, rk_spec)
    await next_request_works(runtime, server, "before")
    await server.restart()
    assert server.state.current is None
    await next_request_works(runtime, server, "after 🤖")  # reconnects; the model is loaded again
    assert server.state.current is not None and server.state.loads == [DEMO_FOLDER_NAME] * 2


async def test_server_restart_mid_answer(server, make_runtime, rk_spec):
    server.state.timing.decode_ms_per_token = 20
    runtime = await loaded(make_runtime, server, rk_spec)
    task = asyncio.ensure_future(collect(runtime, chat(sim_text("x " * 40))))
    while not server.generations() or not server.generations()[-1].pieces:
        await asyncio.sleep(0.01)
    await server.restart()
    with pytest.raises(GenerationError, match="broke off the answer|ended the answer without"):
        await task
    server.state.timing.decode_ms_per_token = 1
    await next_request_works(runtime, server)


# -- abandoned requests ----------------------------------------------------------------------------
async def test_abort_ends_at_once_and_the_server_is_freed(make_server, make_runtime, rk_spec, api):
    server = await make_server(api, SimTiming(0, 0, 0, 20.0))  # ~2 s of answer
    runtime = await loaded(make_runtime, server, rk_spec)
    runtime.abandon_drain_s = 30.0  # long enough for this answer however busy the machine
    long = "word " * 50
    out = await collect(runtime, chat(sim_text(long)), stop_after=3)
    assert out.finish is not None and out.finish.aborted and len(out.ids) == 3
    assert server.generations()[-1].finished_at is None, "abort must not wait for the rest of the answer"
    # The next answer must be exactly its own: no text of the abandoned one leaks into it.
    await next_request_works(runtime, server, "fresh answer")
    # The rest of a short answer is read to its end: the server is idle, the model stays loaded.
    abandoned = server.generations()[-2]
    assert abandoned.text == long and not abandoned.disconnected
    assert server.state.unloads == [] and runtime.unloads_for_abort == 0


async def test_a_long_abandoned_answer_is_stopped_by_unloading(make_server, make_runtime, rk_spec):
    server = await make_server("ollama", SimTiming(0, 0, 0, 50.0))
    runtime = await loaded(make_runtime, server, rk_spec)
    runtime.abandon_drain_s = 0.05
    long = "word " * 200  # ~10 s of answer: it cannot end by itself before the unload
    out = await collect(runtime, chat(sim_text(long)), stop_after=3)
    assert out.finish.aborted
    await next_request_works(runtime, server, "fresh answer")
    assert runtime.unloads_for_abort == 1
    assert server.state.unloads == [DEMO_FOLDER_NAME]
    assert server.state.loads == [DEMO_FOLDER_NAME, DEMO_FOLDER_NAME]  # loaded again on demand
    assert len(server.generations()[-2].text) < len(long)


class _EndlessStream:
    """An abandoned answer whose pieces arrive back to back and never end: every read completes
    at once, so a time limit always lands on a read that has just finished."""

    eof = False

    def __init__(self) -> None:
        self.reads = 0
        self.closed = False

    async def read(self) -> bytes:
        await asyncio.sleep(0)
        self.reads += 1
        return b'{"message": {"content": "x"}, "done": false}\n'

    def close(self) -> None:
        self.closed = True


async def test_an_abandoned_answer_arriving_back_to_back_is_still_stopped_in_time(make_server, make_runtime, rk_spec):
    """On Python < 3.12 a wait_for around the read loop loses its timeout when the cancel lands
    as a read completes (CI caught this as a flaky test): the drain then read the whole answer."""
    server = await make_server("ollama", SimTiming(0, 0, 0, 1.0))
    runtime = await loaded(make_runtime, server, rk_spec)
    runtime.abandon_drain_s = 0.02
    for _ in range(20):
        stream = _EndlessStream()
        drain = asyncio.ensure_future(runtime._drain_then_unload(stream, DEMO_FOLDER_NAME))
        done, _ = await asyncio.wait({drain}, timeout=10.0)
        assert drain in done, "the drain ignored its time limit"
        drain.result()
        assert stream.closed
    assert runtime.unloads_for_abort == 20


@pytest.mark.parametrize("api", ["ollama-single", "ollama"])
async def test_abort_before_the_server_answered(make_server, make_runtime, rk_spec, api):
    """Aborted while the server still loads the model (no headers yet): the request has reached it
    and will be generated anyway; it is read (or stopped) before the next one."""
    server = await make_server(api, SimTiming(load_ms=300, prefill_base_ms=0, prefill_ms_per_token=0,
                                              decode_ms_per_token=2))
    runtime = await loaded(make_runtime, server, rk_spec)
    await server.restart()  # the model is gone: /api/chat loads it before answering
    agen = runtime.generate(chat(sim_text("old " * 30)))
    first = asyncio.ensure_future(agen.__anext__())
    await asyncio.sleep(0.1)
    await runtime.abort()
    event = await first
    assert event.aborted
    await agen.aclose()
    await next_request_works(runtime, server, "new 世界")
    assert server.generations()[-2].text == "old " * 30 or server.state.unloads


async def test_abandoned_iterator_is_cleaned_up(make_server, make_runtime, rk_spec, api):
    """The scheduler may simply stop iterating: the same clean-up happens."""
    server = await make_server(api, SimTiming(0, 0, 0, 5.0))
    runtime = await loaded(make_runtime, server, rk_spec)
    agen = runtime.generate(chat(sim_text("tok " * 40)))
    async for _ in agen:
        break
    await agen.aclose()
    await next_request_works(runtime, server, "after abandon")


async def test_a_one_model_server_leaks_an_abandoned_answer_into_the_next(make_server, rk_spec):
    """Why the client drains on those servers: the fake reproduces rkllama's shared token list."""
    from exo_rkllm.runtime.rkllama.client import RkllamaClient

    server = await make_server("ollama-single", SimTiming(0, 0, 0, 5.0))
    client = RkllamaClient(server.url)
    try:
        await client.load(DEMO_FOLDER_NAME)
        stream = await client.open_chat(DEMO_FOLDER_NAME, [{"role": "user", "content": sim_text("old " * 30)}], None)
        await stream.read()
        stream.close()  # go away mid-answer without draining
        await asyncio.sleep(0.05)
        stream = await client.open_chat(DEMO_FOLDER_NAME, [{"role": "user", "content": sim_text("new")}], None)
        body = b""
        while not stream.eof:
            body += await stream.read()
        assert b"old" in body  # the old answer's text, in the new request's stream
    finally:
        await client.close()


