"""Several real exo nodes on loopback: the node holding layer 0 runs the model, the others pass tokens
through; every node's API gives the same text as one node. Skipped without legacy exo.

One ring per size for the module (a module-scoped fixture): starting nodes costs seconds each."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from real_exo import EXO_PYTHON, REAL_EXO, ExoProcess, post_json, start_ring, stream_chat, user
from support import DEMO_ID

pytestmark = REAL_EXO
TEXT = " Hé 世界 🤖👩‍💻 ring of nodes 🇫🇷"
# Found with these tests (reported to the lead; exo_rkllm/ is not this module's to change): on a node
# that serves the HTTP request but does not run the model, the runner's word on how the request ended
# (an exo_rkllm_ended status) races its last token back; when the token wins, an answer cut by
# max_tokens ends "stop" instead of "length", and one that failed mid-answer ends "stop" instead of with
# the error chunk. A race: seen on every 2-node run, not on every 3-node run, hence not strict.
@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}-nodes")
def ring(request, tmp_path_factory, demo_models_dir) -> list[ExoProcess]:
    n_nodes = request.param
    nodes = start_ring(EXO_PYTHON, tmp_path_factory.mktemp(f"ring{n_nodes}"), demo_models_dir, n_nodes,
                       {"RKLLM_SIM_DECODE_MS": "10", "RKLLM_SIM_LOAD_MS": "100"})
    try:
        asyncio.run(_until_topology(nodes))
        yield nodes
    finally:
        for node in nodes:
            node.stop()


async def _until_topology(nodes: list[ExoProcess]) -> None:
    """exo needs a moment after start-up to collect the ring's topology."""
    async with aiohttp.ClientSession() as s:
        deadline = time.monotonic() + 60
        while True:
            async with s.get(f"{nodes[0].api}/v1/topology") as r:
                topo = await r.json()
            if len(topo.get("nodes", {})) == len(nodes) or time.monotonic() > deadline:
                break
            await asyncio.sleep(1)
    assert len(topo["nodes"]) == len(nodes), topo


async def ask(session, api: str, content: str, stream: bool) -> tuple[str, str]:
    messages = [{"role": "user", "content": content}]
    if stream:  # the shared reader checks the whole stream: role first, one finish, [DONE]
        res = await stream_chat(session, api, messages, stream_options={"include_usage": True})
        return res.text, res.finish
    status, data, _ = await post_json(session, f"{api}/v1/chat/completions", {"model": DEMO_ID, "messages": messages})
    assert status == 200, data
    return data["choices"][0]["message"]["content"], data["choices"][0]["finish_reason"]


async def statuses(session, nodes: list[ExoProcess]) -> list[dict[str, Any]]:
    out = []
    for node in nodes:
        async with session.get(f"{node.api}/v1/rkllm/status") as r:
            out.append(await r.json())
    return out


def test_ring_answers_like_one_node_from_every_api(ring):
    async def run():
        async with aiohttp.ClientSession() as s:
            for node in ring:
                for stream in (True, False):
                    text, finish = await ask(s, node.api, f"ring [[sim:text={TEXT}]]", stream)
                    assert text == TEXT and finish == "stop"
            generated = await ask(s, ring[-1].api, "a generated answer", True)
            again = await ask(s, ring[0].api, "a generated answer", False)
            assert generated == again
            return await statuses(s, ring)

    states = asyncio.run(run())
    runners = [st for st in states if st.get("loaded_model")]
    assert len(runners) == 1, "exactly one node (the one holding layer 0) runs the model"
    assert all(st["plugin"]["feeds"] == 0 and st["engine"]["contexts"] == 0 for st in states)


def test_every_node_honours_the_requests_max_tokens(ring):
    """The request's own fields (its context: prompt ids, RunOptions) reach the node that runs the
    model, whichever node's API took the request."""
    async def run():
        async with aiohttp.ClientSession() as s:
            for node in ring:
                capped = await stream_chat(s, node.api, user("capped [[sim:tokens=50]]"), max_tokens=7,
                                           stream_options={"include_usage": True})
                assert capped.usage["completion_tokens"] == 7, (node.api, capped.usage)
                status, whole, _ = await post_json(s, f"{node.api}/v1/chat/completions",
                                                   {"model": DEMO_ID, "messages": user("capped [[sim:tokens=50]]"),
                                                    "max_tokens": 7})
                assert status == 200 and whole["usage"]["completion_tokens"] == 7, (node.api, whole)

    asyncio.run(run())


def test_every_node_says_length_and_reports_a_failure_mid_answer(ring):
    """How the answer ended reaches the node that serves it: `length` for a cut answer, the error
    chunk (never a finish_reason) for one that failed, from every node's API."""
    async def run():
        async with aiohttp.ClientSession() as s:
            for node in ring:
                capped = await stream_chat(s, node.api, user("capped [[sim:tokens=50]]"), max_tokens=7)
                assert capped.finish == "length", (node.api, capped.events[-2:])
                status, whole, _ = await post_json(s, f"{node.api}/v1/chat/completions",
                                                   {"model": DEMO_ID, "messages": user("capped [[sim:tokens=50]]"),
                                                    "max_tokens": 7})
                assert whole["choices"][0]["finish_reason"] == "length", (node.api, whole)
                failed = await stream_chat(s, node.api, user("fail [[sim:tokens=20]] [[sim:error_at=5]]"))
                assert failed.text and failed.finish is None, (node.api, failed.events[-2:])
                assert "token 5" in failed.error["message"], (node.api, failed.events[-2:])

    asyncio.run(run())
