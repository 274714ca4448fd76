"""Request-level placement on exo's ring: each request runs whole on one board.

RKLLM cannot run a slice of a model's layers, so the unit of distribution is the request. For the
rkllm engine:

- every node treats a request it is asked to run as the whole model (exo's `get_current_shard`
  answers layers 0..n-1), samples it and loops its tokens locally (`forward_tensor` does not hop);
- the node whose API takes a request picks the node to run it (exo_rkllm/placement) and hands it the
  prompt with exo's own `send_prompt`, after the request's context (a status message saying which
  node asked); that node sends each token back to the asking node only (`broadcast_result` to one
  peer), or to nobody when it is the asking node;
- every node tells the others what it has and does (`NodeState`) as exo opaque-status messages, sent
  peer by peer: the full state when it changes, a heartbeat every second otherwise. A node that does
  not answer, or stays silent for RKLLM_RING_FAULT_S, is down: the requests it ran for this node end
  with an error, new ones go elsewhere, and it is used again once it is heard from.

Only exo's peer handles and status messages are used: no extra port."""
from __future__ import annotations

import asyncio
import collections
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Collection

from exo_rkllm.config import Config
from exo_rkllm.errors import NodeLost, RKLLMError
from exo_rkllm.placement.node_state import NodeState
from exo_rkllm.placement.placement import Placement
from exo_rkllm.placement.ring import HEARTBEAT_S, Lost, RingView

log = logging.getLogger("exo_rkllm.exo_glue.ring")

ENDED_STATUS = "exo_rkllm_ended"  # how a request ended, from the node that ran it to the node that asked
STATE_STATUS = "exo_rkllm_node"
BEAT_STATUS = "exo_rkllm_beat"
TICK_S = 0.25  # how often this node looks for a change of its state (and for lost nodes)
SEND_TIMEOUT_S = 1.0  # a peer that takes longer to take a message counts as unreachable
FULL_EVERY_S = 5.0  # the whole state, even unchanged, this often (a peer that missed one catches up)
MAX_ORIGINS = 1024  # requests run here remembered with the node that asked (a request that never ran stays)


def ended_message(request_id: str, finish_reason: str, error: BaseException | None, *, final: bool = False) -> str:
    """The ENDED status: `finish_reason` ("length" or "error"), the error's message and class name (the
    asking node rebuilds it, so its HTTP status and code survive), and `final` when no more token of the
    request will come (its tokens could not be delivered): the asking node then ends it at once."""
    return json.dumps({"type": ENDED_STATUS, "request_id": request_id, "finish_reason": finish_reason,
                       "message": str(error) if error else None,
                       "error_type": type(error).__name__ if error else None, "final": final})


@dataclass
class _Outbox:
    """The tokens of one request run here that are waiting for the call in flight to the asking node."""

    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    sending: bool = False


class Ring:
    """This node's part in the ring: its state sent to the peers, theirs received, the placement of this
    node's API requests, and the requests this node runs for other nodes (by the node that asked)."""

    def __init__(self, node: Any, engine: Any, config: Config,
                 on_lost: Callable[[str, RKLLMError], None]) -> None:
        self.node = node
        self.engine = engine
        self.view = RingView(node.id, config.ring_fault_s, config.ring_affinity)
        # request id -> the node whose API took it, for the requests this node runs
        self.origins: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._on_lost = on_lost
        self._sent = ""  # the last state sent, as JSON
        self._sent_to: frozenset[str] = frozenset()  # the peers it was sent to
        self._full_at = 0.0  # when the state was last sent whole
        self._sent_at = 0.0  # when the state or a heartbeat was last sent
        self._outbox: dict[str, _Outbox] = {}  # request id -> its tokens not yet sent to the asking node
        self._contacted: dict[str, float] = {}  # peer id -> when a token last reached it (it heard from us)
        self._task: asyncio.Task[None] | None = None
        self._failing: set[str] = set()  # peers whose last message failed (logged once until they answer)

    # -- what this node is ---------------------------------------------------------------------------
    def local_state(self) -> NodeState:
        return NodeState.of(self.node.id, self.engine.activity())

    def members(self) -> list[str]:
        return [p.id() for p in self._peers()]

    def _peers(self) -> list[Any]:
        return list(getattr(self.node, "peers", None) or ())

    def peer(self, node_id: str) -> Any:
        return next((p for p in self._peers() if p.id() == node_id), None)

    # -- placement of this node's API requests ------------------------------------------------------------
    def choose(self, model_id: str, prompt_ids: Any, exclude: Collection[str] = ()) -> Placement:
        members = [m for m in self.members() if m not in exclude]
        return self.view.choose(model_id, tuple(prompt_ids or ()), self.local_state(), members)

    # -- requests run here ------------------------------------------------------------------------------------
    def run_for(self, request_id: str, origin: str) -> None:
        """This node runs `request_id` for the node `origin` (itself, when its own API took it)."""
        self.origins[request_id] = origin
        while len(self.origins) > MAX_ORIGINS:
            self.origins.popitem(last=False)

    def runs_for(self, request_id: str) -> bool:
        return request_id in self.origins

    def served_elsewhere(self) -> frozenset[str]:
        """The models some other live node can run (its .rkllm file is there)."""
        return frozenset(m for state in self.view.up(self.members()) for m in state.serves)

    # -- the messages ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        log.debug("ring: telling the peers this node's state every %g s", HEARTBEAT_S)
        while True:
            try:
                if not self._peers():  # alone: nothing to tell, nobody to lose
                    await asyncio.sleep(TICK_S)
                    continue
                state = json.dumps({"type": STATE_STATUS, "node": self.local_state().to_json()})
                now = loop.time()
                peers = self._peers()
                members = frozenset(p.id() for p in peers)
                if state != self._sent or members != self._sent_to or now - self._full_at >= FULL_EVERY_S:
                    await self._send_all(state, peers)
                    self._sent, self._sent_to, self._full_at, self._sent_at = state, members, now, now
                elif now - self._sent_at >= HEARTBEAT_S:
                    # a peer this node streams tokens to hears from it anyway: no heartbeat on that path
                    quiet = [p for p in peers if now - self._contacted.get(p.id(), -HEARTBEAT_S) >= HEARTBEAT_S]
                    await self._send_all(json.dumps({"type": BEAT_STATUS, "node_id": self.node.id}), quiet)
                    self._sent_at = now
                for lost in self.view.lost(members):
                    self._lose(lost)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the ring's state exchange failed; trying again")
            await asyncio.sleep(TICK_S)

    async def _send_all(self, message: str, peers: list[Any]) -> None:
        await asyncio.gather(*(self.send(p, message) for p in peers))

    async def send(self, peer: Any, message: str, request_id: str = "") -> bool:
        """One status message to one peer; False if it did not arrive. The peer counts as down at once
        only when its connection is refused (gRPC's TRANSIENT_FAILURE: nothing listens there); a slow
        answer alone only means it was not heard from, and silence decides (RKLLM_RING_FAULT_S), so
        a board slowed by a long prefill is not taken for a dead one."""
        try:
            await asyncio.wait_for(peer.send_opaque_status(request_id, message), SEND_TIMEOUT_S)
        except Exception as exc:
            refused = not isinstance(exc, asyncio.TimeoutError) or _refused(peer)
            why = (f"its connection is refused ({type(exc).__name__})" if refused
                   else f"it did not take a message within {SEND_TIMEOUT_S:g} s")
            if peer.id() not in self._failing:
                self._failing.add(peer.id())
                log.warning("ring: node %s does not answer: %s", peer.id(), why)
            if refused:
                self.view.unreachable(peer.id(), why)
            return False
        if peer.id() in self._failing:
            self._failing.discard(peer.id())
            log.info("ring: node %s answers again", peer.id())
        self.view.heartbeat(peer.id())
        return True

    def token_from(self, request_id: str) -> None:
        """A token of a request this node placed elsewhere arrived: its node is alive (it sends no
        heartbeat to this node while it streams to it)."""
        node_id = self.view.placed.get(request_id)
        if node_id is not None and node_id != self.node.id:
            self.view.heartbeat(node_id)

    def receive(self, data: dict[str, Any]) -> None:
        """A ring message from a peer (plugin.on_opaque_status routes them here)."""
        kind = data.get("type")
        if kind == STATE_STATUS:
            try:
                state = NodeState.from_json(data.get("node"))
            except ValueError as exc:
                log.debug("ring: a node sent a state this node cannot read (%s)", exc)
                return
            if state.node_id != self.node.id:
                self.view.heard(state)
        elif kind == BEAT_STATUS and isinstance(data.get("node_id"), str) and data["node_id"] != self.node.id:
            self.view.heartbeat(data["node_id"])

    def _lose(self, lost: Lost) -> None:
        log.warning("ring: node %s is down (%s); %d request(s) it was running for this node end with an error, "
                    "new requests go to the other nodes", lost.node_id, lost.why, len(lost.requests))
        for rid in lost.requests:
            self._on_lost(rid, lost.error())

    # -- tokens of requests run here ------------------------------------------------------------------------
    async def send_result(self, request_id: str, tokens: list[int], is_finished: bool) -> None:
        """exo's broadcast_result for a request run here: to the node that asked only, in order.

        exo calls it as one task per token, and each task would make its own gRPC call: concurrent
        calls may arrive in any order, and a fast answer's last one (`is_finished`) before tokens still
        on their way, which the asking node would then drop. So one sender per request: the tokens that
        come while a call is in flight go together in the next call (exo's SendResult takes a list)."""
        origin = self.origins.get(request_id)
        if is_finished:
            self.origins.pop(request_id, None)
            buffered = getattr(self.node, "buffered_token_output", None)
            if isinstance(buffered, dict) and origin != self.node.id:
                buffered.pop(request_id, None)  # exo keeps every request's tokens otherwise
        if origin is None or origin == self.node.id:
            return
        box = self._outbox.get(request_id)
        if box is None:
            box = self._outbox[request_id] = _Outbox()
        box.tokens.extend(tokens)
        box.finished = box.finished or is_finished
        if box.sending:
            return  # the sender in flight takes them next
        box.sending = True
        try:
            while box.tokens or box.finished:
                batch, box.tokens = box.tokens, []
                finished = box.finished
                if not await self._deliver(request_id, origin, batch, finished) or finished:
                    break
        finally:
            box.sending = False
            if box.finished or request_id not in self.origins:
                self._outbox.pop(request_id, None)

    async def _deliver(self, request_id: str, origin: str, tokens: list[int], finished: bool) -> bool:
        peer = self.peer(origin)
        if peer is None:
            log.warning("request %s: the node that asked for it (%s) is gone; stopping it", request_id, origin)
            self.engine.cancel_request(request_id, f"the node that asked for it ({origin}) left the ring")
            return False
        try:
            await asyncio.wait_for(peer.send_result(request_id, tokens, finished), 15.0)
        except Exception as exc:
            log.warning("request %s: its tokens could not reach node %s (%r); stopping it", request_id, origin, exc)
            self.engine.cancel_request(request_id, f"its tokens could not reach the node that asked for it ({origin})")
            # the asking node would wait for tokens that will not come: tell it, if it can still be told
            error = NodeLost(f"the node running this request ({self.node.id}) could not send its answer here "
                             f"({type(exc).__name__}) and stopped it; send it again")
            await self.send(peer, ended_message(request_id, "error", error, final=True), request_id)
            return False
        self._contacted[origin] = asyncio.get_running_loop().time()
        return True

    async def tell_origin(self, request_id: str, message: str) -> None:
        """A status message about a request run here (`runs_for`), to the node that asked for it only."""
        origin = self.origins.get(request_id)
        if origin == self.node.id:
            self.node.on_opaque_status.trigger_all(request_id, message)
            return
        peer = self.peer(origin) if origin is not None else None
        if peer is not None:
            await self.send(peer, message, request_id)

    def describe(self) -> dict[str, Any]:
        return self.view.describe(self.local_state(), self.members())


def _refused(peer: Any) -> bool:
    """exo's gRPC peer handle: is its channel failing to connect (nothing listens at the address)?"""
    channel = getattr(peer, "channel", None)
    try:
        import grpc

        return channel is not None and channel.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE
    except Exception:
        return False
