"""exo_glue/ring.py with stand-ins for exo's Node and peer handles: what a node running a request for
another node sends it, and what a node learns from its peers. The same code runs inside real exo in
test_real_exo_ring.py."""
from __future__ import annotations

import asyncio
import json
import random

from exo_rkllm.config import Config
from exo_rkllm.exo_glue.ring import BEAT_STATUS, STATE_STATUS, Ring
from exo_rkllm.placement.node_state import NodeActivity


class Peer:
    """exo's GRPCPeerHandle as the ring uses it; each call takes a random time, as gRPC calls may."""

    def __init__(self, node_id: str, delay: float = 0.004) -> None:
        self._id, self.delay = node_id, delay
        self.results: list[tuple[str, list[int], bool]] = []
        self.statuses: list[str] = []

    def id(self) -> str:
        return self._id

    async def send_result(self, request_id, result, is_finished):
        await asyncio.sleep(random.random() * self.delay)
        self.results.append((request_id, list(result), is_finished))

    async def send_opaque_status(self, request_id, status):
        await asyncio.sleep(random.random() * self.delay)
        self.statuses.append(status)


class Node:
    def __init__(self, node_id: str, peers: list[Peer]) -> None:
        self.id, self.peers, self.buffered_token_output = node_id, peers, {}


class Engine:
    def __init__(self) -> None:
        self.cancelled: list[str] = []

    def activity(self) -> NodeActivity:
        return NodeActivity(serves=("m",), loaded="m")

    def cancel_request(self, request_id: str, reason: str) -> None:
        self.cancelled.append(request_id)


def make_ring(peers: list[Peer]) -> Ring:
    return Ring(Node("here", peers), Engine(), Config(backend="sim"), on_lost=lambda rid, err: None)


async def test_tokens_reach_the_asking_node_in_order_even_when_exo_sends_each_in_its_own_task():
    random.seed(7)
    origin = Peer("api")
    ring = make_ring([origin, Peer("other")])
    ring.run_for("r1", "api")
    n = 300
    # exo: asyncio.create_task(broadcast_result(...)) for every token, the last one finished
    tasks = [asyncio.ensure_future(ring.send_result("r1", [i], i == n - 1)) for i in range(n)]
    await asyncio.gather(*tasks)
    got = [t for _, toks, _ in origin.results for t in toks]
    assert got == list(range(n))
    assert [fin for _, _, fin in origin.results].count(True) == 1 and origin.results[-1][2]
    assert len(origin.results) < n, "tokens that came during a call went together in the next"
    assert not ring._outbox and not ring.runs_for("r1")


async def test_a_request_this_node_asked_for_sends_nothing_and_others_are_untouched():
    origin = Peer("api")
    ring = make_ring([origin])
    ring.run_for("mine", "here")
    await ring.send_result("mine", [1], False)
    await ring.send_result("unknown", [1], False)
    assert origin.results == []


async def test_an_asking_node_that_cannot_be_reached_stops_the_request():
    class Dead(Peer):
        async def send_result(self, request_id, result, is_finished):
            raise ConnectionError("gone")

    dead = Dead("api")
    ring = make_ring([dead])
    ring.run_for("r1", "api")
    await ring.send_result("r1", [1], False)
    assert ring.engine.cancelled == ["r1"]
    # the asking node is told, when a status still gets through, that no more token will come
    told = json.loads(dead.statuses[-1])
    assert told["type"] == "exo_rkllm_ended" and told["final"] and told["error_type"] == "NodeLost"


def test_a_final_ended_status_ends_the_feed_at_once():
    from exo_rkllm.exo_glue import plugin
    from exo_rkllm.exo_glue.ring import ended_message
    from exo_rkllm.errors import NodeLost

    feed = plugin._feeds.open("r-final", frozenset())
    try:
        plugin.on_opaque_status(None, "r-final", ended_message("r-final", "error", NodeLost("x"), final=True))
        update = feed.poll()
        assert update is not None and isinstance(update.ending.error, NodeLost) and feed.ended
    finally:
        plugin._feeds.close("r-final")


async def test_states_and_heartbeats_from_peers_fill_the_view():
    ring = make_ring([Peer("b")])
    ring.receive({"type": STATE_STATUS, "node": {"node_id": "b", "serves": ["m"], "loaded": "m"}})
    ring.receive({"type": STATE_STATUS, "node": {"node_id": "b", "serves": "m"}})  # malformed: ignored
    ring.receive({"type": BEAT_STATUS, "node_id": "b"})
    assert ring.served_elsewhere() == {"m"}
    rows = ring.describe()["nodes"]
    assert [r["node_id"] for r in rows] == ["here", "b"] and rows[1]["up"]


async def test_the_state_goes_to_every_peer_and_a_refused_peer_is_down():
    class Refusing(Peer):
        async def send_opaque_status(self, request_id, status):
            raise ConnectionRefusedError("nothing listens")

    good, bad = Peer("b"), Refusing("c")
    ring = make_ring([good, bad])
    ring.receive({"type": STATE_STATUS, "node": {"node_id": "c", "serves": ["m"]}})
    ring.view.place("r9", "c")
    lost: list[str] = []
    ring._on_lost = lambda rid, err: lost.append((rid, err.code))
    ring.start()
    try:
        for _ in range(100):
            if good.statuses and lost:
                break
            await asyncio.sleep(0.02)
    finally:
        await ring.stop()
    assert json.loads(good.statuses[0])["node"]["node_id"] == "here"
    assert lost == [("r9", "node_lost")]
