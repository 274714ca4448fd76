"""Placement across a ring (exo_rkllm/placement): prefix hashes, node states as peers send them, the
choice of the node, and the view that tells a down node from a live one. Pure code: no exo."""
from __future__ import annotations

import pytest

from exo_rkllm.errors import NoNodeHasModel
from exo_rkllm.placement.node_state import NodeActivity, NodeState
from exo_rkllm.placement.placement import Candidate, Reason, place
from exo_rkllm.placement.prefixes import BLOCK, advertised, block_hashes, matched_tokens
from exo_rkllm.placement.ring import RingView

M = "model-a"


def conversation(n: int, seed: int = 0) -> tuple[int, ...]:
    return tuple((seed * 7919 + i * 31) % 50_000 for i in range(n))


# -- prefixes ---------------------------------------------------------------------------------------
def test_block_hashes_are_chained_prefix_hashes():
    ids = conversation(5 * BLOCK + 10)
    hashes = block_hashes(ids)
    assert len(hashes) == 5  # full blocks only
    assert block_hashes(ids[:3 * BLOCK]) == hashes[:3]  # a prefix has the same first hashes
    other = list(ids)
    other[BLOCK + 1] += 1  # a change in block 1 changes every hash from block 1 on
    changed = block_hashes(other)
    assert changed[0] == hashes[0] and all(a != b for a, b in zip(changed[1:], hashes[1:]))


def test_a_follow_up_turn_matches_the_whole_held_history():
    history = conversation(10 * BLOCK + 17)
    held = set(advertised([history], limit=100))
    follow_up = history + conversation(200, seed=3)
    assert matched_tokens(block_hashes(follow_up), held) == 10 * BLOCK
    assert matched_tokens(block_hashes(conversation(20 * BLOCK, seed=9)), held) == 0


def test_a_prompt_departing_inside_the_history_matches_a_power_of_two_block_before():
    history = conversation(12 * BLOCK)
    held = set(advertised([history], limit=100))
    departs = history[:9 * BLOCK + 5] + conversation(300, seed=4)  # shares 9 blocks
    assert matched_tokens(block_hashes(departs), held) == 8 * BLOCK  # the power of two below 9
    assert len(held) == len({11, 0, 1, 3, 7})  # last block + blocks 1, 2, 4, 8: not every block


def test_advertised_hashes_are_bounded():
    many = [conversation(40 * BLOCK, seed=s) for s in range(50)]
    assert len(advertised(many, limit=64)) == 64


# -- node states ---------------------------------------------------------------------------------------
def test_a_node_state_travels_as_json_and_refuses_wrong_types():
    held = {M: [conversation(3 * BLOCK)]}
    state = NodeState.of("n1", NodeActivity(serves=(M,), routes=("b",), loaded=M, running="r1", waiting=("r2",),
                                            backend="sim", version="1.3.0", held=held))
    again = NodeState.from_json(state.to_json())
    assert again == state and again.requests == {"r1", "r2"}
    assert NodeState.from_json({"node_id": "n2", "unknown": 1}).serves == ()  # newer peers: extra fields ignored
    for bad in ({"serves": [M]}, {"node_id": "n", "serves": M}, {"node_id": "n", "running": 3},
                {"node_id": "n", "prefixes": {M: "abc"}}, "n"):
        with pytest.raises(ValueError):
            NodeState.from_json(bad)


# -- the choice -----------------------------------------------------------------------------------------
def node(node_id: str, *, serves=(M,), loaded=None, held=(), running=None, waiting=()) -> NodeState:
    return NodeState.of(node_id, NodeActivity(serves=serves, loaded=loaded, running=running, waiting=tuple(waiting),
                                              held={M: list(held)} if held else {}))


def cand(state: NodeState, load: int | None = None, local: bool = False) -> Candidate:
    return Candidate(state, len(state.requests) if load is None else load, local)


def test_only_nodes_with_the_model_file_are_chosen():
    a, b = node("a", serves=()), node("b")
    chosen = place(M, [], [cand(a, local=True), cand(b)], affinity_slack=2)
    assert chosen.node_id == "b" and chosen.reason is Reason.ONLY
    with pytest.raises(NoNodeHasModel, match="no live node of the ring"):
        place(M, [], [cand(a)], affinity_slack=2)


def test_a_conversation_goes_back_to_the_node_holding_it():
    history = conversation(6 * BLOCK)
    prompt = block_hashes(history + conversation(50, seed=2))
    holder = node("c", loaded=M, held=[history], running="other")
    idle = node("a", loaded=M)
    chosen = place(M, prompt, [cand(idle, local=True), cand(holder)], affinity_slack=2)
    assert (chosen.node_id, chosen.reason, chosen.cached_tokens) == ("c", Reason.CONVERSATION, 6 * BLOCK)


def test_a_holder_far_busier_than_the_others_loses_its_conversation():
    history = conversation(6 * BLOCK)
    prompt = block_hashes(history)
    holder = node("c", loaded=M, held=[history], running="r0", waiting=("r1", "r2"))
    chosen = place(M, prompt, [cand(node("a", loaded=M)), cand(holder)], affinity_slack=2)
    assert chosen.node_id == "a" and chosen.reason is Reason.IDLE_LOADED


def test_an_idle_npu_with_the_model_loaded_comes_before_an_idle_empty_one():
    chosen = place(M, [], [cand(node("a"), local=True), cand(node("b", loaded=M))], affinity_slack=2)
    assert (chosen.node_id, chosen.reason) == ("b", Reason.IDLE_LOADED)


def test_concurrent_arrivals_spread_over_the_shortest_queues():
    a, b, c = node("a", loaded=M), node("b"), node("c")
    loads = {"a": 0, "b": 0, "c": 0}
    picks = []
    for _ in range(6):  # each pick counts as load on its node, as the ring view counts this node's placements
        chosen = place(M, [], [cand(a, loads["a"], local=True), cand(b, loads["b"]), cand(c, loads["c"])],
                       affinity_slack=2)
        loads[chosen.node_id] += 1
        picks.append(chosen.node_id)
    assert loads == {"a": 2, "b": 2, "c": 2}, picks
    assert picks[0] == "a"  # idle and loaded first


# -- the view ---------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_view_counts_placements_not_yet_reported_and_forgets_them_on_release():
    clock = Clock()
    view = RingView("a", fault_s=3.0, affinity_slack=2, clock=clock)
    view.heard(node("b", loaded=M))
    local = node("a", loaded=M)
    first = view.choose(M, (), local)
    view.place("r1", first.node_id)
    second = view.choose(M, (), local)
    view.place("r2", second.node_id)
    assert {first.node_id, second.node_id} == {"a", "b"}
    view.heard(node("b", loaded=M, running="r2"))  # the report now lists it: counted once, not twice
    assert [r["load"] for r in view.describe(local)["nodes"]] == [1, 1]
    assert view.release("r2") == "b" and view.release("r2") is None
    # b's next report may still list r2, which this node knows has ended: b counts as idle
    assert [r["load"] for r in view.describe(local)["nodes"]] == [1, 0]


def test_a_silent_or_unreachable_node_is_down_with_its_requests_lost_once():
    clock = Clock()
    view = RingView("a", fault_s=3.0, affinity_slack=2, clock=clock)
    view.heard(node("b", loaded=M))
    view.heard(node("c", loaded=M))
    view.place("r1", "b")
    view.place("r2", "c")
    clock.now += 2.0
    view.heartbeat("c")
    assert view.lost() == []
    clock.now += 1.5  # b: silent for 3.5 s
    lost = view.lost()
    assert [(x.node_id, x.requests) for x in lost] == [("b", ("r1",))] and "no word" in lost[0].why
    assert view.lost() == []  # reported once
    assert [s.node_id for s in view.up()] == ["c"]
    assert view.choose(M, (), node("a", serves=())).node_id == "c"  # new requests avoid b
    view.unreachable("c", "a message to it failed")
    assert [(x.node_id, x.requests) for x in view.lost()] == [("c", ("r2",))]
    with pytest.raises(NoNodeHasModel):
        view.choose(M, (), node("a", serves=()))
    view.heard(node("b", loaded=M))  # b is back: used again
    assert view.choose(M, (), node("a", serves=())).node_id == "b"


def test_a_request_still_on_its_way_to_a_node_that_goes_down_is_not_reported_lost():
    """The submission is still sending the prompt when the state exchange finds the node down: the
    submission picks the next node itself, so the request must not also end as node_lost."""
    view = RingView("a", fault_s=3.0, affinity_slack=2, clock=Clock())
    view.heard(node("b", loaded=M))
    view.place("r1", "b", handing=True)
    view.place("r2", "b", handing=True)
    view.handed("r2")  # b took r2's prompt: r2 runs there
    view.unreachable("b", "its connection is refused")
    assert [(x.node_id, x.requests) for x in view.lost()] == [("b", ("r2",))]
    assert view.release("r1") == "b" and "r1" not in view.handing  # the submission moves on
    view.place("r1", "c")
    assert view.placed == {"r1": "c"}


def test_a_node_gone_from_exos_peers_is_down():
    view = RingView("a", fault_s=3.0, affinity_slack=2, clock=Clock())
    view.heard(node("b"))
    view.place("r1", "b")
    assert [x.requests for x in view.lost(members=["c"])] == [("r1",)]
    rows = view.describe(node("a"), members=["c"])["nodes"]
    assert rows[1]["up"] is False and rows[1]["down_because"]
