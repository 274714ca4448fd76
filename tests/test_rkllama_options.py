"""RkllamaRuntime: a request's sampling, token limit and seed as rkllama reads them, and embeddings.

rkllama applies `/api/chat` options per run from 0.0.73 (runtime 1.3.0) and serves `/api/embed`
from 0.0.43 (its worker generation); the fake server follows its code and records what each
request carried, what it merged them into, and what the simulated run applied.
"""
from __future__ import annotations

import dataclasses

import json

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from exo_rkllm.errors import EmbeddingUnsupported, GenerationError, RuntimeUnavailable
from exo_rkllm.runtime.base import EmbeddingInput, FinishKind, SamplingParams
from exo_rkllm.runtime.rkllama import RkllamaClient, create
from exo_rkllm.runtime.sim import DEFAULT_HIDDEN_SIZE, embedding_rows
from fake_rkllama.fixtures import *  # noqa: F401,F403
from fake_rkllama.fixtures import DEMO_FOLDER_NAME, chat, collect, rkllama_config

WARM = SamplingParams(top_k=40, top_p=0.95, temperature=0.9, repeat_penalty=1.05, frequency_penalty=0.25,
                      presence_penalty=0.5)
WARM_OPTIONS = {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "repeat_penalty": 1.05, "frequency_penalty": 0.25,
                "presence_penalty": 0.5}
# (api, version) for every kind of server: early, one-model Ollama-style, workers before and after 0.0.73
SERVERS = [("early", None), ("ollama-single", None), ("ollama", "0.0.72"), ("ollama", "0.0.74")]


async def loaded(make_runtime, server, spec):
    runtime = make_runtime(server.url)
    await runtime.load(spec)
    return runtime


async def make(make_server, api, version, timing=None):
    return await make_server(api, timing, **({"version": version} if version else {}))


# -- capabilities ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("api, version", SERVERS)
async def test_capabilities_follow_the_server(make_server, make_runtime, rk_spec, api, version):
    server = await make(make_server, api, version)
    created = await create(rkllama_config(server.url))  # known before the first load
    try:
        per_run = version == "0.0.74"
        assert created.capabilities.per_run_sampling is per_run
        assert created.capabilities.per_run_max_new_tokens is per_run
        assert created.capabilities.embeddings is (api == "ollama")
    finally:
        await created.close()
    runtime = await loaded(make_runtime, server, rk_spec)
    assert runtime.capabilities.per_run_sampling is per_run
    assert runtime.capabilities.embeddings is (api == "ollama")
    assert runtime.capabilities.version == (await runtime.client.info()).label


# -- options on /api/chat ------------------------------------------------------------------------------------
async def test_the_requests_options_reach_the_run_on_0074(make_server, make_runtime, rk_spec, demo_tokenizer):
    server = await make_server("ollama")
    runtime = await loaded(make_runtime, server, rk_spec)
    out = await collect(runtime, chat("[[sim:tokens=20]] hi", sampling=WARM, max_new_tokens=6, seed=42))
    sent = server.generations()[-1]
    assert sent.options == {**WARM_OPTIONS, "num_predict": 6, "seed": 42}
    assert isinstance(sent.options["top_k"], int)  # rkllama reads it with int() of its text
    applied = sent.applied_options
    assert applied["max_new_tokens"] == "6" and applied["top_k"] == "40" and applied["temperature"] == "0.9"
    run = server.state.sim.runs[-1]
    assert run.sampling == WARM and run.max_new_tokens == 6
    # the server stopped after 6 of its tokens; the text passed on is exactly its text
    assert len(sent.pieces) == 6 and out.text == sent.text and len(out.ids) <= 6
    assert out.finish is not None and not out.finish.aborted


async def test_no_options_when_the_request_names_none(make_server, make_runtime, rk_spec):
    server = await make_server("ollama")
    runtime = await loaded(make_runtime, server, rk_spec)
    await collect(runtime, chat("plain"))
    sent = server.generations()[-1]
    assert "options" not in sent.body and sent.options is None
    # the server's merged values apply: its defaults under the Modelfile's TEMPERATURE=0.8
    assert server.state.sim.runs[-1].sampling == SamplingParams(top_k=7, top_p=0.5, temperature=0.8,
                                                                 repeat_penalty=1.1)


@pytest.mark.parametrize("api, version", SERVERS[:3])
async def test_no_options_where_the_server_would_not_apply_them_per_run(make_server, make_runtime, rk_spec, api,
                                                                       version):
    server = await make(make_server, api, version)
    runtime = await loaded(make_runtime, server, rk_spec)
    await collect(runtime, chat("[[sim:tokens=4]] hi", sampling=WARM, max_new_tokens=50, seed=3))
    sent = server.generations()[-1]
    assert "options" not in sent.body
    assert server.state.sim.runs[-1].sampling != WARM


async def test_an_old_worker_server_takes_options_only_when_loading(make_server, rk_spec):
    """Why nothing is sent before 0.0.73: the request that loads the model fixes it for everyone."""
    server = await make_server("ollama", version="0.0.72")
    async with aiohttp.ClientSession() as session:
        for options in ({"temperature": 0.1, "top_k": 3}, {"temperature": 1.5, "top_k": 50}):
            body = {"model": DEMO_FOLDER_NAME, "messages": [{"role": "user", "content": "hi"}], "stream": False,
                    "options": options}
            async with session.post(server.url + "/api/chat", json=body) as resp:
                assert resp.status == 200
    first, second = server.state.sim.runs[-2:]
    assert first.sampling.temperature == 0.1 and first.sampling.top_k == 3
    assert second.sampling == first.sampling  # the second request's options were ignored


async def test_rkllama_refuses_a_fractional_top_k(make_server):
    """rkllama 0.0.74 reads top_k per run with int(): a client must send an integer."""
    server = await make_server("ollama")
    async with aiohttp.ClientSession() as session:
        body = {"model": DEMO_FOLDER_NAME, "messages": [{"role": "user", "content": "hi"}], "stream": False,
                "options": {"top_k": 40.0}}
        async with session.post(server.url + "/api/chat", json=body) as resp:
            assert resp.status == 500 and "invalid literal" in (await resp.json())["error"]


# -- token limits ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("api, version", SERVERS[:3])
async def test_a_server_that_cannot_be_told_is_stopped_at_the_limit(make_server, make_runtime, rk_spec, api,
                                                                   version):
    server = await make(make_server, api, version)
    runtime = await loaded(make_runtime, server, rk_spec)
    runtime.abandon_drain_s = 30.0  # the rest is read to its end, however busy the machine
    full = await collect(runtime, chat("[[sim:tokens=12]] count"))
    limited = await collect(runtime, chat("[[sim:tokens=12]] count", max_new_tokens=3))
    assert limited.ids == full.ids[:3] and limited.text == "".join(full.texts[:3])
    # a length stop, as the native backend stops an old runtime: cut short, not aborted
    assert limited.finish is not None and limited.finish.kind is FinishKind.LENGTH
    # the rest of the answer is the server's business: the next answer is exactly its own
    again = await collect(runtime, chat("[[sim:text=next one]]"))
    assert again.text == "next one" and server.generations()[-1].text == "next one"
    assert server.state.unloads == []


async def test_a_server_that_was_told_still_gets_no_more_than_the_limit_through(make_server, make_runtime, rk_spec,
                                                                               monkeypatch):
    """The server counts its own tokens; should it send more than the limit, the rest is dropped
    and the answer still ends cleanly at the server's end (nothing to free there)."""
    from exo_rkllm.runtime.rkllama import backend

    real = backend.wire_options
    monkeypatch.setattr(backend, "wire_options",
                        lambda inp, info: {k: v for k, v in (real(inp, info) or {}).items() if k != "num_predict"})
    server = await make_server("ollama")
    runtime = await loaded(make_runtime, server, rk_spec)
    full = await collect(runtime, chat("[[sim:tokens=12]] count"))
    limited = await collect(runtime, chat("[[sim:tokens=12]] count", max_new_tokens=3))
    assert server.generations()[-1].text == full.text  # the server sent it all
    assert limited.ids == full.ids[:3] and limited.finish is not None and limited.finish.kind is FinishKind.LENGTH
    assert full.finish is not None and full.finish.kind is FinishKind.STOP
    assert runtime.cleanups == 0


async def test_a_limit_far_off_changes_nothing(make_server, make_runtime, rk_spec):
    server = await make_server("early")
    runtime = await loaded(make_runtime, server, rk_spec)
    out = await collect(runtime, chat("[[sim:text=short answer]]", max_new_tokens=100))
    assert out.text == "short answer" and out.finish is not None and out.finish.kind is FinishKind.STOP


@pytest.mark.parametrize("api", ["early", "ollama"])
async def test_an_answer_the_server_ends_at_the_models_limit_is_a_length_stop(make_server, make_runtime, rk_spec,
                                                                             api):
    """The server stops at the model's max_new_tokens (its own setting) with no sign of it but the count."""
    server = await make_server(api)
    full = await collect(await loaded(make_runtime, server, rk_spec), chat("[[sim:tokens=12]] count"))
    runtime = await loaded(make_runtime, server, dataclasses.replace(rk_spec, max_new_tokens=len(full.ids)))
    out = await collect(runtime, chat("[[sim:tokens=12]] count"))
    assert out.ids == full.ids and out.finish is not None and out.finish.kind is FinishKind.LENGTH
    roomy = await loaded(make_runtime, server, dataclasses.replace(rk_spec, max_new_tokens=len(full.ids) + 1))
    again = await collect(roomy, chat("[[sim:tokens=12]] count"))
    assert again.ids == full.ids and again.finish is not None and again.finish.kind is FinishKind.STOP


async def test_the_runtime_reports_no_cache_length_and_closes_with_async_with(make_server, rk_spec):
    from exo_rkllm.runtime.rkllama import RkllamaRuntime

    server = await make_server("ollama")
    async with RkllamaRuntime(rkllama_config(server.url)) as runtime:
        await runtime.load(rk_spec)
        assert runtime.kv_cache_len() is None  # rkllama does not say what its cache holds
        out = await collect(runtime, chat("[[sim:text=hi]]"))
        assert out.text == "hi" and not runtime.closed
    assert runtime.closed and runtime.client._session is None


# -- embeddings --------------------------------------------------------------------------------------------------
async def test_embeddings_through_the_server(make_server, make_runtime, rk_spec, demo_tokenizer):
    server = await make_server("ollama")
    runtime = await loaded(make_runtime, server, rk_spec)
    text = "The NPU on the RK3588 has three cores."
    out = await runtime.embed(EmbeddingInput("e1", (), text))
    assert out.pooled and isinstance(out.hidden, np.ndarray) and out.hidden.dtype == np.float32
    assert out.hidden.shape == (1, DEFAULT_HIDDEN_SIZE)
    sent = server.embeddings()[-1]
    assert sent.path == "/api/embed" and sent.body == {"model": DEMO_FOLDER_NAME, "input": text}
    # rkllama keeps the last token's hidden state: the simulator's last row for the text's tokens
    ids = tuple(demo_tokenizer.encode(text, add_special_tokens=False))
    assert sent.embedded == [list(ids)]
    assert np.array_equal(out.hidden[0], embedding_rows(ids, DEFAULT_HIDDEN_SIZE)[-1])
    same = await runtime.embed(EmbeddingInput("e2", ids))  # tokens only: decoded to the same text
    assert server.embeddings()[-1].body["input"] == text and np.array_equal(same.hidden, out.hidden)
    other = await runtime.embed(EmbeddingInput("e3", (), "Something else entirely."))
    assert not np.array_equal(other.hidden, out.hidden)
    # and a chat afterwards is unaffected
    chat_out = await collect(runtime, chat("[[sim:text=still fine]]"))
    assert chat_out.text == "still fine"


async def test_the_fake_servers_embedding_routes_have_rkllamas_shapes(make_server):
    server = await make_server("ollama")
    async with aiohttp.ClientSession() as session:
        async def post(path, body):
            async with session.post(server.url + path, json=body) as resp:
                return resp.status, await resp.json()

        status, body = await post("/api/embed", {"model": DEMO_FOLDER_NAME, "input": ["one", "two words"]})
        assert status == 200 and body["model"] == DEMO_FOLDER_NAME
        assert set(body) == {"model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"}
        assert len(body["embeddings"]) == 2 and all(len(v) == DEFAULT_HIDDEN_SIZE for v in body["embeddings"])
        assert body["embeddings"][0] != body["embeddings"][1]
        assert body["prompt_eval_count"] == sum(len(ids) for ids in server.embeddings()[-1].embedded)
        status, legacy = await post("/api/embeddings", {"model": DEMO_FOLDER_NAME, "prompt": "one"})
        assert status == 200 and legacy["embeddings"] == body["embeddings"][:1]  # rkllama: same shape there
        status, openai = await post("/v1/embeddings", {"model": DEMO_FOLDER_NAME, "input": "one"})
        assert status == 200 and openai["object"] == "list" and openai["model"] == DEMO_FOLDER_NAME
        assert openai["data"] == [{"object": "embedding", "embedding": body["embeddings"][0], "index": 0}]
        assert openai["usage"]["prompt_tokens"] == openai["usage"]["total_tokens"] > 0
        status, err = await post("/api/embed", {"model": DEMO_FOLDER_NAME})
        assert status == 400 and err == {"error": "Missing input"}
        status, err = await post("/api/embed", {"model": "no-such-model", "input": "x"})
        assert status == 500 and err["error"].startswith("Failed to load model 'no-such-model'")


@pytest.mark.parametrize("api", ["early", "ollama-single"])
async def test_no_embeddings_before_the_worker_generation(make_server, make_runtime, rk_spec, api):
    server = await make_server(api)
    runtime = await loaded(make_runtime, server, rk_spec)
    with pytest.raises(EmbeddingUnsupported, match="0.0.43"):
        await runtime.embed(EmbeddingInput("e", (), "hello"))
    assert server.embeddings() == []
    # the route itself, asked directly: 404 on the early API, 501 on the one-model Ollama-style one
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/api/embeddings", json={"model": DEMO_FOLDER_NAME,
                                                                       "prompt": "hi"}) as resp:
            assert resp.status == (404 if api == "early" else 501)


async def test_a_server_without_the_route_is_embedding_unsupported(unused_tcp_port):
    """A server that says it has workers but answers /api/embed with 404 (a fork, a proxy)."""
    app = web.Application()

    async def not_found(request: web.Request) -> web.Response:
        return web.json_response({"error": "not here"}, status=404)

    app.router.add_post("/api/embed", not_found)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    client = RkllamaClient(f"http://127.0.0.1:{unused_tcp_port}")
    try:
        with pytest.raises(EmbeddingUnsupported, match="HTTP 404 not here.*0.0.43"):
            await client.embed("m", "text")
    finally:
        await client.close()
        await runner.cleanup()


async def test_embedding_errors(make_server, make_runtime, rk_spec):
    server = await make_server("ollama")
    runtime = make_runtime(server.url)
    with pytest.raises(GenerationError, match="no model"):
        await runtime.embed(EmbeddingInput("e", (), "hello"))
    await runtime.load(rk_spec)
    with pytest.raises(GenerationError, match="empty"):
        await runtime.embed(EmbeddingInput("e", (), ""))
    await server.down()
    with pytest.raises(RuntimeUnavailable, match="not reachable"):
        await runtime.embed(EmbeddingInput("e", (), "hello"))
    await server.up()
    out = await runtime.embed(EmbeddingInput("e", (), "hello"))  # a fresh server: it loads on demand
    assert out.hidden.shape == (1, DEFAULT_HIDDEN_SIZE)


async def test_a_malformed_embedding_answer_is_an_error(unused_tcp_port):
    app = web.Application()

    async def odd(request: web.Request) -> web.Response:
        return web.Response(text=json.dumps({"model": "m", "embeddings": []}), content_type="application/json")

    app.router.add_post("/api/embed", odd)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    client = RkllamaClient(f"http://127.0.0.1:{unused_tcp_port}")
    try:
        with pytest.raises(GenerationError, match="cannot read"):
            await client.embed("m", "text")
    finally:
        await client.close()
        await runner.cleanup()
