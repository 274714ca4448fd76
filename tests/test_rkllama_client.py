"""The rkllama HTTP client: API-generation detection, models, wire parsing, name mapping."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from aiohttp import web

from exo_rkllm.errors import GenerationError, ModelLoadError, RuntimeUnavailable
from exo_rkllm.runtime.base import ChatMessage
from exo_rkllm.runtime.rkllama import API_EARLY, API_OLLAMA, RkllamaClient, match_remote_name, probe, wire_messages
from exo_rkllm.runtime.rkllama.client import LineParser, parse_chunk, render_tool_calls
from fake_rkllama.fixtures import *  # noqa: F401,F403
from fake_rkllama.fixtures import DEMO_FOLDER_NAME, rkllama_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_detects_each_api_generation(server, api):
    client = RkllamaClient(server.url)
    try:
        info = await client.info()
        assert info.api == (API_EARLY if api == "early" else API_OLLAMA)
        assert info.workers == (api == "ollama")
        assert info.version == {"early": None, "ollama-single": "0.5.1", "ollama": "0.0.74"}[api]
        paths = [r.path for r in server.received]
        asked = [path for _, path in server.state.requested]
        assert asked and "/v1/models" not in asked  # detection asks only what it uses
        await client.info()  # cached: asked once per server
        assert [r.path for r in server.received] == paths
        assert await client.list_models() == [DEMO_FOLDER_NAME]
    finally:
        await client.close()


async def test_load_and_unload_follow_each_generation(server, api):
    client = RkllamaClient(server.url)
    try:
        await client.load(DEMO_FOLDER_NAME)
        await client.load(DEMO_FOLDER_NAME)  # already loaded: nothing to do, no error
        assert server.state.loads == [DEMO_FOLDER_NAME]
        with pytest.raises(ModelLoadError, match="not found"):
            await client.load("no-such-model")
        await client.unload(DEMO_FOLDER_NAME)
        assert server.state.current is None
        unload = [r for r in server.received if r.path == "/unload_model"][-1]
        assert unload.body == ({"model_name": DEMO_FOLDER_NAME} if api == "ollama" else {})
    finally:
        await client.close()


async def test_server_down_is_a_clear_error_within_two_seconds():
    url = f"http://127.0.0.1:{free_port()}"
    client = RkllamaClient(url)
    started = time.monotonic()
    with pytest.raises(RuntimeUnavailable) as err:
        await client.info()
    assert time.monotonic() - started < 2.0
    assert url in str(err.value) and "RKLLM_SERVER_URL" in str(err.value)
    await client.close()
    assert not await probe(rkllama_config(url))


async def test_probe_and_listing(server):
    cfg = rkllama_config(server.url)
    assert await probe(cfg)
    async with RkllamaClient(server.url) as client:
        names = await client.list_models()
        assert names == [DEMO_FOLDER_NAME]
        assert match_remote_name(names, "qwen2.5-1.5b-instruct-demo") == DEMO_FOLDER_NAME
        assert match_remote_name(names, "llama-3") is None
        session = client._session
        assert session is not None and not session.closed
    assert session.closed and client._session is None  # `async with` closed the HTTP session


async def test_probe_refuses_an_http_server_that_is_not_rkllama(unused_tcp_port):
    app = web.Application()
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    try:
        url = f"http://127.0.0.1:{unused_tcp_port}"
        assert not await probe(rkllama_config(url))
        with pytest.raises(RuntimeUnavailable, match="does not look like an rkllama server"):
            await RkllamaClient(url).info()
    finally:
        await runner.cleanup()


def test_line_parser_joins_characters_split_across_reads():
    line = (json.dumps({"message": {"role": "assistant", "content": "世界🤖"}, "done": False}, ensure_ascii=False)
            + "\n").encode()
    parser = LineParser()
    got = []
    for i in range(len(line)):  # one byte per network read
        got += parser.feed(line[i:i + 1])
    assert got == [{"message": {"role": "assistant", "content": "世界🤖"}, "done": False}]


def test_line_parser_reads_early_frames_and_rejects_garbage():
    frame = {"id": "rkllm_chat", "object": "rkllm_chat", "created": 1, "usage": {},
             "choices": [{"role": "assistant", "content": " héllo", "logprobs": None, "finish_reason": None}]}
    objs = LineParser().feed((json.dumps(frame) + "\n\n" + json.dumps(frame) + "\n\n").encode())
    assert [parse_chunk(API_EARLY, o).text for o in objs] == [" héllo", " héllo"]
    with pytest.raises(GenerationError, match="malformed stream chunk"):
        LineParser().feed(b'{"message": {"role": "assis\n')


def test_chunk_shapes_of_both_generations():
    last = parse_chunk(API_OLLAMA, {"model": "m", "message": {"role": "assistant", "content": ""}, "done": True,
                                    "done_reason": "stop", "prompt_eval_count": 12, "eval_count": 3})
    assert last.done and last.done_reason == "stop" and last.counters["prompt_eval_count"] == 12
    assert parse_chunk(API_OLLAMA, {"response": " x", "done": False}).text == " x"
    early_end = parse_chunk(API_EARLY, {"choices": [{"role": "assistant", "content": "", "finish_reason": "stop"}]})
    assert early_end.done and early_end.text == ""
    with pytest.raises(GenerationError, match="reported an error mid-answer: boom"):
        parse_chunk(API_OLLAMA, {"error": "boom"})
    with pytest.raises(GenerationError, match="without message"):
        parse_chunk(API_OLLAMA, {"model": "m"})


def test_tool_calls_are_written_back_as_text():
    calls = [{"function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]
    assert render_tool_calls(calls) == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'


def test_model_name_matching():
    names = ["Qwen2.5-3B-Instruct", "deepseek-r1:1.5b", "TinyLlama_1.1B"]
    assert match_remote_name(names, "Qwen2.5-3B-Instruct") == "Qwen2.5-3B-Instruct"
    assert match_remote_name(names, None, "qwen2.5-3b-instruct") == "Qwen2.5-3B-Instruct"
    assert match_remote_name(names, "deepseek-r1:1.5b:latest".replace(":latest", ""), None) == "deepseek-r1:1.5b"
    assert match_remote_name(names, "library/tinyllama-1.1b") == "TinyLlama_1.1B"
    assert match_remote_name(names, "llama-3") is None


def test_wire_messages_early_folds_system_and_alternates():
    msgs = (ChatMessage("system", "Be brief."), ChatMessage("user", [{"type": "text", "text": "Hi "},
                                                                      {"type": "text", "text": "there"}]),
            ChatMessage("user", "again"), ChatMessage("assistant", "Yes?"))
    assert wire_messages(msgs, early=False) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "user", "content": "again"}, {"role": "assistant", "content": "Yes?"}]
    assert wire_messages(msgs, early=True) == [
        {"role": "user", "content": "Be brief.\n\nHi there\n\nagain"}, {"role": "assistant", "content": "Yes?"}]


async def test_restarted_server_is_detected_afresh(make_server):
    server = await make_server("ollama")
    client = RkllamaClient(server.url)
    try:
        assert (await client.info()).api == API_OLLAMA
        await server.down()
        with pytest.raises(RuntimeUnavailable):
            await client.list_models()
        # It comes back as an older rkllama on the same port: detected again, not assumed.
        server.state.api = "early"
        await server.up()
        await asyncio.sleep(0)
        assert (await client.info()).api == API_EARLY
    finally:
        await client.close()


async def test_the_fake_sends_its_headers_with_the_first_piece_as_flask_does(make_server, api):
    """rkllama's Flask server answers nothing before the first piece: the fake does the same in
    every API generation, so a client's open waits for the first piece, not only for the request
    to arrive."""
    from exo_rkllm.runtime.sim import SimTiming

    server = await make_server(api, SimTiming(0, 0, 0, 1.0))
    client = RkllamaClient(server.url)
    try:
        await client.load(DEMO_FOLDER_NAME)
        server.faults.first_token_delay_s = 0.3
        opening = asyncio.ensure_future(
            client.open_chat(DEMO_FOLDER_NAME, [{"role": "user", "content": "[[sim:text=late]]"}], None))
        stream = await asyncio.wait_for(opening, 30.0)
        rec = server.generations()[-1]
        assert rec.first_piece_at is not None and rec.headers_at is not None
        assert rec.headers_at >= rec.first_piece_at, "no headers before the first piece"
        body = b""
        while not stream.eof:
            body += await stream.read()
        assert b"late" in body
    finally:
        await client.close()
