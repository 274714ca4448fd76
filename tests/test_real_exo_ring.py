"""Several real exo nodes on loopback: each request runs whole on one node, chosen per request
(exo_rkllm/placement, exo_rkllm/exo_glue/ring.py); every node's API gives the same text as one node,
concurrent clients are spread over the NPUs, a conversation stays on its node, and a node lost
mid-answer ends its request with a clear error. Skipped without legacy exo.

One ring per size for the module (a module-scoped fixture): starting nodes costs seconds each. The
lost-node test starts a ring of its own."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from real_exo import EXO_PYTHON, REAL_EXO, ExoProcess, post_json, start_ring, stream_chat, user, wait_ready
from support import DEMO_ID

pytestmark = REAL_EXO
TEXT = " Hé 世界 🤖👩‍💻 ring of nodes 🇫🇷"
NODE = "X-RKLLM-Node"
PACING = {"RKLLM_SIM_DECODE_MS": "10", "RKLLM_SIM_LOAD_MS": "100"}


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}-nodes")
def ring(request, tmp_path_factory, demo_models_dir) -> list[ExoProcess]:
    n_nodes = request.param
    nodes = start_ring(EXO_PYTHON, tmp_path_factory.mktemp(f"ring{n_nodes}"), demo_models_dir, n_nodes, PACING)
    try:
        asyncio.run(_until_topology(nodes))
        asyncio.run(_load_everywhere(nodes))
        yield nodes
    finally:
        for node in nodes:
            node.stop()


async def _load_everywhere(nodes: list[ExoProcess]) -> None:
    """One request per node at once: placement spreads them, so every NPU has the model loaded (then
    an idle node with the model loaded is preferred, and who runs what is predictable)."""
    async with aiohttp.ClientSession() as s:
        runs = await asyncio.gather(*(stream_chat(s, nodes[0].api, user(f"warm {i} [[sim:tokens=20]]"))
                                      for i in range(len(nodes))))
        assert sorted(r.headers.get(NODE, f"{r.status}: {r.body}") for r in runs) == sorted(n.node_id for n in nodes)


class Busy:
    """A long answer running on `node`'s own NPU (asked through its API while every NPU is idle and
    loaded, placement keeps it there): requests sent to that API meanwhile run on another node."""

    def __init__(self, session: aiohttp.ClientSession, node: ExoProcess) -> None:
        self.session, self.node = session, node
        self.started = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> "Busy":
        def first(event: Any) -> None:
            if not self.started.done():
                self.started.set_result(None)

        self.task = asyncio.ensure_future(stream_chat(self.session, self.node.api, user("busy [[sim:tokens=5000]]"),
                                                      stop_after=None, check=False, on_event=first))
        await asyncio.wait_for(self.started, 30)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.task.cancel()  # the client leaves: the node frees its NPU
        await asyncio.gather(self.task, return_exceptions=True)
        await asyncio.sleep(0.3)


async def _until_topology(nodes: list[ExoProcess]) -> None:
    """exo needs a moment after start-up to collect the ring's topology, and every node to hear every
    other node's state (its status route's `ring`)."""
    async with aiohttp.ClientSession() as s:
        deadline = time.monotonic() + 60
        while True:
            async with s.get(f"{nodes[0].api}/v1/topology") as r:
                topo = await r.json()
            rings = [st["ring"] for st in await statuses(s, nodes)]
            if len(topo.get("nodes", {})) == len(nodes) and all(
                    sum(row["up"] for row in ring["nodes"]) == len(nodes) for ring in rings):
                break
            assert time.monotonic() < deadline, (topo, rings)
            await asyncio.sleep(0.5)


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
    assert all(st["plugin"]["feeds"] == 0 and st["engine"]["contexts"] == 0 for st in states)


def test_every_node_honours_the_requests_max_tokens(ring):
    """The request's own fields (its context: prompt ids, RunOptions) reach the node that runs the
    model, whichever node's API took the request."""
    async def run():
        async with aiohttp.ClientSession() as s:
            for node in ring:
                async with Busy(s, node):  # so that the request runs on another node
                    capped = await stream_chat(s, node.api, user("capped [[sim:tokens=50]]"), max_tokens=7,
                                               stream_options={"include_usage": True})
                    assert capped.usage["completion_tokens"] == 7, (node.api, capped.usage)
                    assert capped.headers[NODE] != node.node_id
                    status, whole, headers = await post_json(s, f"{node.api}/v1/chat/completions",
                                                             {"model": DEMO_ID, "max_tokens": 7,
                                                              "messages": user("capped [[sim:tokens=50]]")})
                    assert status == 200 and whole["usage"]["completion_tokens"] == 7, (node.api, whole)
                    assert headers[NODE] != node.node_id
                    # a stop sequence: the text before it, `stop`, and the remote NPU stopped at once
                    stopped = await stream_chat(s, node.api, user("[[sim:text=alpha beta gamma delta]]"),
                                                stop=[" gamma"])
                    assert (stopped.text, stopped.finish) == ("alpha beta", "stop"), stopped.events[-3:]
                    assert stopped.headers[NODE] != node.node_id

    asyncio.run(run())


def test_every_node_says_length_and_reports_a_failure_mid_answer(ring):
    """How the answer ended reaches the node that serves it: `length` for a cut answer, the error
    chunk (never a finish_reason) for one that failed, from every node's API."""
    async def run():
        async with aiohttp.ClientSession() as s:
            for node in ring:
                async with Busy(s, node):  # so that the requests run on another node
                    capped = await stream_chat(s, node.api, user("capped [[sim:tokens=50]]"), max_tokens=7)
                    assert capped.finish == "length", (node.api, capped.events[-2:])
                    status, whole, _ = await post_json(s, f"{node.api}/v1/chat/completions",
                                                       {"model": DEMO_ID, "max_tokens": 7,
                                                        "messages": user("capped [[sim:tokens=50]]")})
                    assert whole["choices"][0]["finish_reason"] == "length", (node.api, whole)
                    failed = await stream_chat(s, node.api, user("fail [[sim:tokens=20]] [[sim:error_at=5]]"))
                    assert failed.text and failed.finish is None, (node.api, failed.events[-2:])
                    assert "token 5" in failed.error["message"], (node.api, failed.events[-2:])
                    assert failed.headers[NODE] != node.node_id
                    # a failure before the first token keeps its status and code on the API node
                    status, body, _ = await post_json(s, f"{node.api}/v1/chat/completions",
                                                      {"model": DEMO_ID, "messages": user("x [[sim:error_at=1]]")})
                    assert status == 500 and body["error"]["code"] == "GenerationError", body

    asyncio.run(run())


def test_concurrent_clients_are_spread_over_the_npus_each_with_its_own_text(ring):
    """2 clients per node at once through one node's API: each node runs two of them, and each client
    gets exactly its own text (the wall time against two generations back to back: benchmarks/ring.py)."""
    async def run():
        async with aiohttp.ClientSession() as s:
            texts = [f"client {i}: Grüße 世界 🤖 " + "word " * (30 + i) for i in range(2 * len(ring))]
            runs = await asyncio.gather(*(stream_chat(s, ring[0].api, user(f"[{i}] [[sim:text={t}]]"))
                                          for i, t in enumerate(texts)))
            for run_, text in zip(runs, texts):
                assert run_.text == text and run_.finish == "stop"
            per_node = {n.node_id: sum(r.headers[NODE] == n.node_id for r in runs) for n in ring}
            assert set(per_node.values()) == {2}, per_node
            rings = [st["ring"] for st in await statuses(s, ring)]
            assert all(row["up"] and row["serves"] == [DEMO_ID] for r in rings for row in r["nodes"]), rings
            assert all(r["placed_here"] == 0 for r in rings), "every placement released"

    asyncio.run(run())


def test_a_ten_turn_conversation_in_a_busy_ring_stays_on_its_node(ring):
    """Other clients keep every NPU busy; the conversation's turns go back to the node holding its
    history, which prefills only the new part of each turn."""
    async def run():
        async with aiohttp.ClientSession() as s:
            convo = [{"role": "system", "content": "You are a careful assistant. " * 40}]
            homes, prefilled = [], []
            others: list[asyncio.Task] = []
            for turn in range(10):
                others += [asyncio.ensure_future(stream_chat(s, ring[0].api, user(f"other {turn}.{k} [[sim:tokens=25]]")))
                           for k in range(len(ring) - 1)]
                convo.append({"role": "user", "content": f"turn {turn}: and then? [[sim:tokens=12]]"})
                res = await stream_chat(s, ring[0].api, convo, stream_options={"include_usage": True})
                assert res.finish == "stop"
                convo.append({"role": "assistant", "content": res.text})
                home = next(n for n in ring if n.node_id == res.headers[NODE])
                homes.append(home.node_id)
                async with s.get(f"{home.api}/v1/rkllm/status") as r:
                    recent = (await r.json())["recent"]
                rid = res.chunks[0]["id"].removeprefix("chatcmpl-")  # the request id, on every node
                mine = [x for x in recent if x["request_id"] == rid]
                assert mine, (recent, res.usage)
                prefilled.append(mine[-1]["prefilled"])
            await asyncio.gather(*others)
            assert len(set(homes)) == 1, homes
            assert max(prefilled[1:]) < 60, prefilled  # the new turn only (a cold node would prefill 300+)

    asyncio.run(run())


def test_a_node_lost_mid_answer_is_a_clear_error_and_the_ring_goes_on(tmp_path, demo_models_dir):
    """SIGKILL the node running a request: the client gets an error chunk (never a finish) within
    seconds; the next requests are served by the other nodes; the node, started again, is used again."""
    nodes = start_ring(EXO_PYTHON, tmp_path, demo_models_dir, 3, {**PACING, "RKLLM_RING_FAULT_S": "3"})

    async def run():
        async with aiohttp.ClientSession() as s:
            await _until_topology(nodes)
            await _load_everywhere(nodes)
            async with Busy(s, nodes[0]):
                killed_at: list[float] = []
                first = asyncio.get_running_loop().create_future()

                def on_event(event: Any) -> None:
                    if not first.done() and isinstance(event, dict) and event.get("choices"):
                        first.set_result(None)

                doomed = asyncio.ensure_future(stream_chat(s, nodes[0].api, user("doomed [[sim:tokens=3000]]"),
                                                           check=False, on_event=on_event))
                await asyncio.wait_for(first, 30)
                await asyncio.sleep(0.3)
                async with s.get(f"{nodes[0].api}/v1/rkllm/status") as r:
                    ring_rows = (await r.json())["ring"]["nodes"]
                running = [row["node_id"] for row in ring_rows if row["running"] and not row["this_node"]]
                assert len(running) == 1, ring_rows
                victim = next(n for n in nodes if n.node_id == running[0])
                victim.proc.kill()
                killed_at.append(time.monotonic())
                res = await asyncio.wait_for(doomed, 60)
                took = time.monotonic() - killed_at[0]
                assert res.finish is None and res.text and res.error, res.events[-3:]
                assert res.error["code"] == "node_lost" and victim.node_id in res.error["message"], res.error
                print(f"error {took:.2f} s after the node was killed")
                after = await asyncio.gather(*(stream_chat(s, nodes[0].api, user(f"[[sim:text=after {i}]]"))
                                               for i in range(3)))
                assert [r.text for r in after] == [f"after {i}" for i in range(3)]
                assert all(r.headers[NODE] != victim.node_id for r in after)
            # started again: heard from, then used again
            back = victim.relaunch()
            nodes[nodes.index(victim)] = back
            await asyncio.to_thread(wait_ready, [back], 120)
            await _until_topology(nodes)
            again = await asyncio.gather(*(stream_chat(s, nodes[0].api, user(f"again {i} [[sim:tokens=30]]"))
                                           for i in range(3)))
            assert back.node_id in {r.headers[NODE] for r in again}
            return took

    try:
        asyncio.run(run())
    finally:
        for node in nodes:
            node.stop()


def test_a_model_on_one_board_only_is_served_through_the_other_boards_api(tmp_path, demo_models_dir):
    """Node 0 has the model folder without its .rkllm file (tokenizer files and Modelfile): it lists the
    model while node 1, which has the file, is up, and its requests run there."""
    import shutil

    routing = tmp_path / "routing-models"
    for folder in demo_models_dir.iterdir():
        if folder.is_dir() and not folder.name.startswith("."):
            shutil.copytree(folder, routing / folder.name, ignore=shutil.ignore_patterns("*.rkllm"))
    nodes = start_ring(EXO_PYTHON, tmp_path, [routing, demo_models_dir], 2, PACING)

    async def run():
        async with aiohttp.ClientSession() as s:
            await _until_topology(nodes)
            async with s.get(f"{nodes[0].api}/v1/models") as r:
                listed = {m["id"]: m for m in (await r.json())["data"]}
            assert listed[DEMO_ID]["runs_on"] == "ring", listed
            for stream in (True, False):
                text, finish = await ask(s, nodes[0].api, f"routed [[sim:text={TEXT}]]", stream)
                assert (text, finish) == (TEXT, "stop")
            res = await stream_chat(s, nodes[0].api, user("[[sim:tokens=5]]"))
            assert res.headers[NODE] == nodes[1].node_id
            rings = (await statuses(s, nodes[:1]))[0]["ring"]["nodes"]
            assert rings[0]["serves"] == [] and rings[0]["routes"] == [DEMO_ID], rings
            nodes[1].stop()  # the only board with the file leaves: a clear error, not a hang
            deadline = time.monotonic() + 30
            while True:
                status, body, _ = await post_json(s, f"{nodes[0].api}/v1/chat/completions",
                                                  {"model": DEMO_ID, "messages": user("hi")})
                if status != 200 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            assert status == 503 and body["error"]["code"] == "model_not_on_this_node", body

    try:
        asyncio.run(run())
    finally:
        for node in nodes:
            node.stop()


def test_a_client_leaving_frees_the_remote_npu_it_was_placed_on(ring):
    """The HTTP client of a request running on another node goes away: that node's NPU is freed."""
    async def run():
        async with aiohttp.ClientSession() as s:
            async with Busy(s, ring[0]):
                left = await stream_chat(s, ring[0].api, user("leaving [[sim:tokens=3000]]"), stop_after=3)
                remote = next(n for n in ring if n.node_id == left.headers[NODE])
                assert remote is not ring[0]
                deadline = time.monotonic() + 30
                while True:
                    async with s.get(f"{remote.api}/v1/rkllm/status") as r:
                        st = await r.json()
                    if st["running"] is None and not st["queued"]:
                        break
                    assert time.monotonic() < deadline, st
                    await asyncio.sleep(0.1)
                rid = left.chunks[0]["id"].removeprefix("chatcmpl-")
                ended = [x for x in st["recent"] if x["request_id"] == rid]
                assert ended and ended[0]["outcome"] == "cancelled" and ended[0]["generated"] < 3000, ended

    asyncio.run(run())
