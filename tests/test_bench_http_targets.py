"""The exo and rkllama targets over real HTTP, against tiny stand-in servers that replay recorded wire formats.

This checks the client side (requests, stream reading, status lookup, model
loading on the early rkllama API); timing is not asserted.
"""
from __future__ import annotations

import json

import pytest
from aiohttp import web

from exo_rkllm.bench.targets import ExoApiTarget, RkllamaTarget, TargetError, TokenCounter


async def serve(app: web.Application):
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def exo_app(pieces: list[str], *, with_status: bool) -> tuple[web.Application, dict[str, object]]:
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
        return web.json_response({"backend": "sim", "runtime": {"backend": "sim", "version": "sim-1.2.3"},
                                  "recent": [{"request_id": "req-1", "prompt_tokens": 20, "prefilled": 7,
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
        assert res.prefill_tokens == 7 and meta["runtime_version"] == "sim-1.2.3"
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


def rkllama_app(early: bool) -> tuple[web.Application, dict[str, object]]:
    state: dict[str, object] = {"current": None, "loads": []}

    async def version(request):
        return web.json_response({"version": "0.0.42"})

    async def chat(request):
        body = await request.json()
        state["options"] = body.get("options")
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        for p in ["4", "2", "3"]:
            await resp.write((json.dumps({"model": body["model"], "message": {"role": "assistant", "content": p},
                                          "done": False}) + "\n").encode())
        await resp.write((json.dumps({"model": body["model"], "message": {"role": "assistant", "content": ""},
                                      "done": True, "done_reason": "stop", "prompt_eval_count": 20,
                                      "eval_count": 3, "eval_duration": 375_000_000}) + "\n").encode())
        await resp.write_eof()
        return resp

    async def root(request):
        return web.json_response({"message": "Welcome to RKLLama"})

    async def current(request):
        return web.json_response({"model": state["current"]} if state["current"] else {"error": "no model"})

    async def load(request):
        state["current"] = (await request.json())["model_name"]
        state["loads"].append(state["current"])  # type: ignore[union-attr]
        return web.json_response({"message": "loaded"})

    async def generate(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        for p, fin in [("4", None), ("2", None), ("3", None), ("", "stop")]:
            obj = {"id": "rkllm_chat", "object": "rkllm_chat", "created": 1,
                   "choices": [{"role": "assistant", "content": p, "logprobs": None, "finish_reason": fin}]}
            await resp.write(json.dumps(obj).encode() + b"\n\n")
        await resp.write_eof()
        return resp

    async def unload(request):
        state["current"] = None
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/", root)
    if early:
        app.router.add_get("/current_model", current)
        app.router.add_post("/load_model", load)
        app.router.add_post("/unload_model", unload)
        app.router.add_post("/generate", generate)
    else:
        app.router.add_get("/api/version", version)
        app.router.add_post("/api/chat", chat)
    return app, state


@pytest.mark.parametrize("early", [False, True])
async def test_rkllama_target_both_api_generations(early):
    app, state = rkllama_app(early)
    runner, url = await serve(app)
    try:
        target = RkllamaTarget(url, "qwen2.5:3b", None, max_new_tokens=16)
        await target.open()
        res = await target.chat([{"role": "user", "content": "What is 145 + 278?"}])
        meta = target.describe()
        await target.close()
    finally:
        await runner.cleanup()
    assert res.text == "423" and len(res.token_times) == 3 and res.finish_reason == "stop"
    if early:
        assert meta["api"] == "early" and state["loads"] == ["qwen2.5:3b"]
        assert res.completion_tokens is None  # no tokenizer, and the early API gives no count
    else:
        assert meta["api"] == "ollama" and meta["server_version"] == "0.0.42"
        assert state["options"] == {"num_predict": 16}
        assert (res.prompt_tokens, res.completion_tokens, res.completion_source) == (20, 3, "server")
        assert res.server["server_tokens_per_s"] == pytest.approx(8.0)
