"""The exo and rkllama targets over real HTTP: exo against a tiny stand-in replaying its wire format,
rkllama against the project's fake rkllama server (every API generation).

This checks the client side (requests, stream reading, status lookup, model
loading, whose token counts are shown); timing is not asserted.
"""
from __future__ import annotations

import json

import pytest
from aiohttp import web

from exo_rkllm.bench.targets import ExoApiTarget, RkllamaTarget, TargetError, TokenCounter, stream_chat
from fake_rkllama.fixtures import *  # noqa: F401,F403
from fake_rkllama.fixtures import DEMO_FOLDER_NAME


async def serve(app: web.Application):
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def exo_app(pieces: list[str], *, with_status: bool,
            backend: str = "sim") -> tuple[web.Application, dict[str, object]]:
    seen: dict[str, object] = {}

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "demo"}, {"id": "llama-3.2-1b"}]})

    async def chat(request):
        body = await request.json()
        seen["body"] = body
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, p in enumerate(pieces + [""]):
            finish = "stop" if i == len(pieces) else None
            chunk = {"id": "chatcmpl-req-1", "object": "chat.completion", "system_fingerprint": "exo_0.0.1",
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": p}, "finish_reason": finish}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write_eof()
        return resp

    async def status(request):
        return web.json_response({"backend": backend, "runtime": {"backend": backend, "version": "sim-1.2.3"},
                                  "recent": [{"request_id": "req-1", "prompt_tokens": 20, "prefilled": 7, "restored": 11,
                                              "generated": len(pieces)}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    if with_status:
        app.router.add_get("/v1/rkllm/status", status)
    return app, seen


@pytest.mark.parametrize("with_status", [True, False])
async def test_exo_target_streams_and_reads_engine_stats(demo_model_dir, with_status):
    counter = TokenCounter.from_dir(demo_model_dir)
    app, seen = exo_app(["The", " NPU", " is", " fast", "."], with_status=with_status)
    runner, url = await serve(app)
    try:
        target = ExoApiTarget(url, "demo", counter)
        await target.open()
        res = await target.chat([{"role": "user", "content": "What is 145 + 278?"}])
        meta = target.describe()
        await target.close()
    finally:
        await runner.cleanup()
    assert seen["body"]["stream"] is True and seen["body"]["model"] == "demo"
    assert res.text == "The NPU is fast."
    assert len(res.token_times) == 5 and res.finish_reason == "stop"
    assert res.completion_tokens == counter.count_text("The NPU is fast.") and res.completion_source == "tokenizer"
    assert res.prompt_tokens == counter.count_prompt([{"role": "user", "content": "What is 145 + 278?"}])
    if with_status:
        assert res.prefill_tokens == 7 and res.restored_tokens == 11 and meta["runtime_version"] == "sim-1.2.3"
        assert meta["engine_stats_visible"] is True
    else:
        assert res.prefill_tokens is None and meta["engine_stats_visible"] is False


async def test_exo_target_refuses_a_model_exo_does_not_list(demo_model_dir):
    runner, url = await serve(exo_app(["x"], with_status=False)[0])
    try:
        target = ExoApiTarget(url, "no-such-model", None)
        with pytest.raises(TargetError, match="does not list the model"):
            await target.open()
    finally:
        await runner.cleanup()


async def test_exo_target_unreachable():
    target = ExoApiTarget("http://127.0.0.1:9", "demo", None)
    with pytest.raises(TargetError, match="not reachable"):
        await target.open()


async def test_exo_target_on_the_rkllama_backend_marks_counts_as_estimates(demo_model_dir):
    """exo's engine on an rkllama server: the server templates the messages itself (the early API adds its
    own system prompt), so exo's prefilled count and the bench's prompt count are estimates."""
    counter = TokenCounter.from_dir(demo_model_dir)
    runner, url = await serve(exo_app(["4", "2", "3"], with_status=True, backend="rkllama")[0])
    try:
        target = ExoApiTarget(url, "demo", counter)
        await target.open()
        res = await target.chat([{"role": "user", "content": "What is 145 + 278?"}])
        await target.close()
    finally:
        await runner.cleanup()
    assert res.prefill_tokens == 7 and res.prefill_tokens_estimated is True
    assert res.prompt_tokens_estimated is True and res.prompt_tokens_source == "tokenizer"


MATH = [{"role": "user", "content": "What is 145 + 278?"}]


async def one_answer(server, counter=None):
    """Open the target on `server`, ask MATH once, close; the result and what the server prefilled."""
    target = RkllamaTarget(server.url, DEMO_FOLDER_NAME, counter)
    await target.open()
    res = await target.chat(MATH)
    await target.close()
    return res, len(server.generations()[-1].prompt_ids)


@pytest.mark.parametrize("api", ["early", "ollama-single", "ollama"])
async def test_rkllama_target_does_not_reload_the_loaded_model(make_server, api):
    """A second run against a server that already holds the model must not load it again
    (the early API answers /current_model with {"model_name"})."""
    server = await make_server(api)
    for _ in range(2):
        res, _ = await one_answer(server)
        assert res.text and res.finish_reason == "stop"
    assert server.state.loads == [DEMO_FOLDER_NAME]


async def test_rkllama_target_finds_the_server_name(make_server):
    server = await make_server("ollama")
    target = RkllamaTarget(server.url, "qwen2.5-1.5b-instruct-demo", None)  # exo's id of the same folder
    await target.open()
    await target.close()
    assert target.model == DEMO_FOLDER_NAME
    with pytest.raises(TargetError, match="has no model 'nope'"):
        await RkllamaTarget(server.url, "nope", None).open()


async def test_rkllama_target_reports_the_servers_prompt_count(make_server, demo_model_dir):
    """Ollama-style API: prompt tokens and prefilled are the server's prompt_eval_count."""
    counter = TokenCounter.from_dir(demo_model_dir)
    res, prefilled_by_server = await one_answer(await make_server("ollama"), counter)
    assert res.prompt_tokens == res.prefill_tokens == prefilled_by_server
    assert res.prompt_tokens_source == "server" and res.prompt_tokens_estimated is False
    assert res.completion_tokens == counter.count_text(res.text) and res.server["eval_count"] >= 1


async def test_rkllama_early_api_prompt_count_is_an_estimate(make_server, demo_model_dir):
    """The early API prefills its own system prompt too and reports no count: the bench's count is shown
    marked as an estimate, never as what the server prefilled."""
    counter = TokenCounter.from_dir(demo_model_dir)
    res, prefilled_by_server = await one_answer(await make_server("early"), counter)
    assert res.prompt_tokens == counter.count_prompt(MATH) < prefilled_by_server  # its system prompt
    assert res.prompt_tokens_estimated is True and res.prefill_tokens is None
    assert res.finish_reason == "stop" and res.text


async def test_rkllama_early_api_with_a_closing_object_gives_the_servers_count(make_server, demo_model_dir):
    counter = TokenCounter.from_dir(demo_model_dir)
    res, prefilled_by_server = await one_answer(await make_server("early", early_final_object=True), counter)
    assert res.prompt_tokens == prefilled_by_server > counter.count_prompt(MATH)
    assert res.prompt_tokens_source == "server" and not res.prompt_tokens_estimated


async def test_the_benchmark_scripts_client_times_the_first_text_and_keeps_it_all():
    """benchmarks/*.py time a streamed chat with stream_chat: the first chunk with text, not the role chunk."""
    import aiohttp

    app, seen = exo_app(["", "Hello", " world"], with_status=False)
    runner, url = await serve(app)
    try:
        async with aiohttp.ClientSession() as session:
            ttft, text = await stream_chat(session, url, {"model": "demo", "messages": [{"role": "user", "content": "x"}]})
        assert text == "Hello world" and ttft >= 0 and seen["body"]["stream"] is True
    finally:
        await runner.cleanup()
