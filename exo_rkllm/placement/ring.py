"""This node's view of the ring: the last state each peer sent, when it was heard, which nodes are
down, and where this node's API sent each of its requests.

A node is down when a message to it failed, or when nothing came from it for `fault_s` seconds
(every node sends at least a heartbeat each HEARTBEAT_S). A down node gets no new request, and the
requests this API node placed on it are reported lost, once, so that their clients get an error
within seconds instead of a stream that stops. A node that is heard from again is up again."""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Sequence

from exo_rkllm.errors import NodeLost
from exo_rkllm.placement.node_state import NodeState
from exo_rkllm.placement.placement import Candidate, Placement, place
from exo_rkllm.placement.prefixes import block_hashes

HEARTBEAT_S = 1.0
MAX_ENDED = 256


@dataclass
class _Peer:
    state: NodeState
    heard_at: float
    down: str = ""  # why it is down; "" while it is up


@dataclass(frozen=True)
class Lost:
    """A node went down with requests of this API node on it."""

    node_id: str
    why: str
    requests: tuple[str, ...]

    def error(self) -> NodeLost:
        """What the client of each lost request reads."""
        return NodeLost(f"the node running this request ({self.node_id}) left the ring before the answer ended: "
                        f"{self.why}; the other nodes still serve, send it again")


@dataclass
class RingView:
    node_id: str
    fault_s: float
    affinity_slack: int
    clock: Callable[[], float] = time.monotonic
    peers: dict[str, _Peer] = field(default_factory=dict)
    placed: dict[str, str] = field(default_factory=dict)  # request id -> node id (this API node's requests)
    # this API node's requests that ended, which a node's last report may still list (it reports 4 times a
    # second): not counted as load, or a node just finishing one would look busier than it is
    ended: "collections.OrderedDict[str, None]" = field(default_factory=collections.OrderedDict)
    # requests whose prompt is still on its way to the chosen node: if that node goes down now, the
    # submission picks the next node itself, so they are not reported lost (the client would get
    # node_lost for a request no node ever took)
    handing: set[str] = field(default_factory=set)

    # -- what the peers say ----------------------------------------------------------------------------
    def heard(self, state: NodeState) -> None:
        peer = self.peers.get(state.node_id)
        if peer is None:
            self.peers[state.node_id] = _Peer(state, self.clock())
        else:
            peer.state, peer.heard_at, peer.down = state, self.clock(), ""

    def heartbeat(self, node_id: str) -> None:
        peer = self.peers.get(node_id)
        if peer is not None:
            peer.heard_at, peer.down = self.clock(), ""

    def unreachable(self, node_id: str, why: str) -> None:
        peer = self.peers.get(node_id)
        if peer is not None and not peer.down:
            peer.down = why

    def lost(self, members: Collection[str] | None = None) -> list[Lost]:
        """Nodes that are down now (silent too long, unreachable, or gone from exo's peers when
        `members` is given), each with the requests of this API node still placed on it; those are
        forgotten here (reported once)."""
        now = self.clock()
        out: list[Lost] = []
        for node_id, peer in self.peers.items():
            if not peer.down and now - peer.heard_at > self.fault_s:
                peer.down = f"no word from it for {now - peer.heard_at:.1f} s"
            if not peer.down and members is not None and node_id not in members:
                peer.down = "it left the ring"
            if peer.down:
                rids = tuple(r for r, n in self.placed.items() if n == node_id and r not in self.handing)
                for rid in rids:
                    del self.placed[rid]
                if rids:
                    out.append(Lost(node_id, peer.down, rids))
        return out

    def up(self, members: Collection[str] | None = None) -> list[NodeState]:
        return [p.state for n, p in self.peers.items() if not p.down and (members is None or n in members)]

    # -- this API node's requests ----------------------------------------------------------------------
    def choose(self, model_id: str, prompt_ids: Sequence[int], local: NodeState,
               members: Collection[str] | None = None) -> Placement:
        candidates = [Candidate(s, self._load(s), local=s.node_id == local.node_id)
                      for s in [local, *self.up(members)]]
        return place(model_id, block_hashes(prompt_ids), candidates, affinity_slack=self.affinity_slack)

    def place(self, request_id: str, node_id: str, *, handing: bool = False) -> None:
        """`handing`: the prompt still has to reach that node; `handed` says when it has."""
        self.placed[request_id] = node_id
        if handing:
            self.handing.add(request_id)

    def handed(self, request_id: str) -> None:
        """The chosen node took the prompt: from now on, if it goes down, the request is lost."""
        self.handing.discard(request_id)

    def release(self, request_id: str) -> str | None:
        node_id = self.placed.pop(request_id, None)
        self.handing.discard(request_id)
        if node_id is not None:
            self.ended[request_id] = None
            while len(self.ended) > MAX_ENDED:
                self.ended.popitem(last=False)
        return node_id

    def _load(self, state: NodeState) -> int:
        mine = {r for r, n in self.placed.items() if n == state.node_id}
        return len((state.requests - self.ended.keys()) | mine)

    # -- the status route ------------------------------------------------------------------------------
    def describe(self, local: NodeState, members: Collection[str] | None = None) -> dict[str, Any]:
        now = self.clock()
        rows = [_row(local, self._load(local), up=True, age=0.0, here=True)]
        for node_id, peer in sorted(self.peers.items()):
            down = peer.down or ("" if members is None or node_id in members else "it left the ring")
            rows.append(_row(peer.state, self._load(peer.state), up=not down, age=now - peer.heard_at, why=down))
        return {"node_id": self.node_id, "nodes": rows, "placed_here": len(self.placed)}


def _row(state: NodeState, load: int, *, up: bool, age: float, here: bool = False, why: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {"node_id": state.node_id, "this_node": here, "up": up, "heard_s_ago": round(age, 2),
                           "serves": list(state.serves), "routes": list(state.routes), "loaded": state.loaded,
                           "running": state.running, "waiting": list(state.waiting), "load": load,
                           "runtime": " ".join(p for p in (state.backend, state.version) if p),
                           "held_prefix_hashes": {m: len(h) for m, h in state.prefixes.items()}}
    if why:
        row["down_because"] = why
    return row
