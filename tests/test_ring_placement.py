"""Placement across a ring, through the OpenAI handlers over the exo-contract driver (tests/exo_driver.py
models what the plugin patches into exo's Node: the chosen node runs the whole model, its tokens go to
the API node). The same scenarios run against real exo nodes in test_real_exo_ring.py."""
from __future__ import annotations

import asyncio
import collections
import json

from api_harness import sim_text, start_api, stop_api
from exo_rkllm.api.port import Feeds
from exo_rkllm.engine.inference_engine import RequestEnding
from exo_rkllm.errors import ContextOverflow, NodeLost, RKLLMError, error_named
from exo_rkllm.exo_glue import plugin
from exo_rkllm.placement.placement import Reason
from exo_rkllm.runtime.sim import SimTiming
from support import DEMO_ID, user
from test_api_chat import content_of

PACED = SimTiming(load_ms=0, prefill_base_ms=1, prefill_ms_per_token=0.05, decode_ms_per_token=4,
                  cache_io_ms_per_token=0)


def finish_of(items) -> str | None:
    return next((c["choices"][0]["finish_reason"] for c in items if isinstance(c, dict) and c.get("choices")
                 and c["choices"][0].get("finish_reason")), None)


async def test_six_concurrent_clients_run_two_per_node_each_with_its_own_text(demo_models_dir):
    api = await start_api(demo_models_dir, PACED, nodes=3)
    try:
        texts = [f"client {i}: Grüße 世界 🤖 " + "word " * (20 + i) for i in range(6)]
        results = await asyncio.gather(*(api.stream("/v1/chat/completions", api.chat(
            user(f"[{i}] " + sim_text(t)), stream=True)) for i, t in enumerate(texts)))
        for (status, items, _), text in zip(results, texts):
            assert status == 200 and content_of(items) == text and finish_of(items) == "stop"
        ran = collections.Counter(api.ring.ran_on[s.request_id] for s in api.port.submitted)
        assert ran == {0: 2, 1: 2, 2: 2}, ran
        status, body, headers = await api.post("/v1/chat/completions", api.chat(user(sim_text("which node?"))))
        assert status == 200 and body["choices"][0]["message"]["content"] == "which node?"
        assert headers["X-RKLLM-Node"] == f"node{api.ring.ran_on[api.port.submitted[-1].request_id]}"
        assert not api.port.view.placed, "every placement is released with its request"
    finally:
        await stop_api(api)


async def test_a_ten_turn_conversation_stays_on_its_node_in_a_busy_ring(demo_models_dir):
    api = await start_api(demo_models_dir, PACED, nodes=3)
    try:
        system = {"role": "system", "content": "You are a careful assistant. " * 40}
        convo = [system]
        homes = []
        background: list[asyncio.Task] = []
        for turn in range(10):
            # other clients keep the ring busy, each with a conversation of its own
            background += [asyncio.ensure_future(api.stream("/v1/chat/completions", api.chat(
                user(f"other {turn}.{k} [[sim:tokens=30]]"), stream=True))) for k in range(2)]
            convo = convo + [{"role": "user", "content": f"turn {turn}: tell me more [[sim:tokens=12]]"}]
            status, items, _ = await api.stream("/v1/chat/completions", api.chat(convo, stream=True))
            assert status == 200 and finish_of(items) == "stop"
            convo = convo + [{"role": "assistant", "content": content_of(items)}]
            rid = next(s.request_id for s in reversed(api.port.submitted) if s.context.messages
                       and s.context.messages[-1].content.startswith(f"turn {turn}:"))
            homes.append((api.ring.ran_on[rid], api.port.placements[rid].reason))
            node = api.ring.engines[api.ring.ran_on[rid]]
            summary = next(r for r in node._scheduler.history if r.request_id == rid)
            if turn:
                assert summary.prefilled < 60, (turn, summary)  # only the new turn, not the history
        await asyncio.gather(*background)
        assert len({home for home, _ in homes}) == 1, homes
        assert all(reason is Reason.CONVERSATION for _, reason in homes[1:]), homes
    finally:
        await stop_api(api)


async def test_a_node_lost_mid_answer_ends_it_with_a_clear_error_and_the_others_serve(demo_models_dir):
    api = await start_api(demo_models_dir, PACED, nodes=3)
    try:
        for i in (1, 2):  # nodes 1 and 2 loaded, node 0 busy: the next request goes to a remote node
            await (await api.ring.engines[i].lifecycle()).load(DEMO_ID)
        busy = asyncio.ensure_future(api.stream("/v1/chat/completions", api.chat(
            user("busy [[sim:tokens=200]]"), stream=True)))
        while not api.port.submitted:
            await asyncio.sleep(0.005)
        doomed = asyncio.ensure_future(api.stream("/v1/chat/completions", api.chat(
            user("doomed [[sim:tokens=400]]"), stream=True)))
        while len(api.port.submitted) < 2 or api.port.submitted[1].request_id not in api.ring.ran_on:
            await asyncio.sleep(0.005)
        rid = api.port.submitted[1].request_id
        victim = api.ring.ran_on[rid]
        assert victim != api.ring.ran_on[api.port.submitted[0].request_id]
        await asyncio.sleep(0.1)  # some tokens streamed
        api.ring.kill(victim)
        api.port.watch()
        status, items, _ = await doomed
        assert status == 200 and content_of(items), "the text so far, then the error"
        assert finish_of(items) is None and items[-1] == "[DONE]"
        error = items[-2]["error"]
        assert error["code"] == "node_lost" and f"node{victim}" in error["message"], error
        status, items, _ = await api.stream("/v1/chat/completions", api.chat(user(sim_text("after")), stream=True))
        assert status == 200 and content_of(items) == "after"
        after = api.port.submitted[-1].request_id
        assert api.ring.ran_on[after] != victim
        await busy
    finally:
        await stop_api(api)


def test_a_peers_error_keeps_its_kind_on_the_api_node():
    """The node that ran a request reports its failure by class name; the API node answers with that
    error's status and code, not a generic 500 for exo's gRPC error that follows."""
    feeds = Feeds()
    feed = feeds.open("r1", frozenset())
    error = error_named("ContextOverflow", "the prompt has 5000 tokens, the context 4096")
    assert isinstance(error, ContextOverflow) and error.http_status == 400
    assert type(error_named("NoSuchError", "x")) is RKLLMError and type(error_named(None, "x")) is RKLLMError
    feed.hint(RequestEnding("error", error))
    feed.fail(RKLLMError("exo failed the request: AioRpcError(...)"))
    update = feed.poll()
    assert update.ending.error is error


def test_an_ended_status_from_a_peer_rebuilds_the_error(demo_models_dir):
    feed = plugin._feeds.open("r-ended", frozenset())
    try:
        plugin.on_opaque_status(None, "r-ended", json.dumps({
            "type": plugin.ENDED_STATUS, "request_id": "r-ended", "finish_reason": "error",
            "message": "node x left", "error_type": "NodeLost"}))
        feed.fail(RKLLMError("grpc"))
        assert isinstance(feed.poll().ending.error, NodeLost)
    finally:
        plugin._feeds.close("r-ended")


async def test_boards_with_different_runtime_releases_serve_the_same_requests(demo_models_dir):
    """Node 1 runs an older runtime (1.2.1: no per-run token cap, the binding stops it): requests placed
    on either board get their own text and honour max_tokens."""
    from exo_rkllm.runtime.sim import SimRuntime

    api = await start_api(demo_models_dir, PACED, nodes=2)
    try:
        older = api.ring.engines[1]._runtime
        older.inner = SimRuntime(PACED, release="1.2.1")
        older.capabilities = older.inner.capabilities
        texts = [f"release test {i} " + "word " * 30 for i in range(4)]
        results = await asyncio.gather(*(api.stream("/v1/chat/completions", api.chat(
            user(f"[{i}] " + sim_text(t)), stream=True, max_tokens=5 if i % 2 else None))
            for i, t in enumerate(texts)))
        ran = [api.ring.ran_on[s.request_id] for s in api.port.submitted]
        assert sorted(ran) == [0, 0, 1, 1], ran
        tok = api.engine.model_for(DEMO_ID).tokenizer
        for i, ((status, items, _), text) in enumerate(zip(results, texts)):
            assert status == 200
            if i % 2:
                assert finish_of(items) == "length" and len(tok.encode(content_of(items))) <= 5
                assert text.startswith(content_of(items))
            else:
                assert finish_of(items) == "stop" and content_of(items) == text
        assert len(older.inputs) == 2  # the older board ran its share
    finally:
        await stop_api(api)
