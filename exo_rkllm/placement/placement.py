"""The choice of the node that runs a request, from what every node of the ring reported.

In this order (each step only among the nodes the one before left):
1. the nodes that have the model's file (a node with only the tokenizer can route, not run);
2. the node whose KV cache or saved states hold the longest part of this prompt, at least one block
   (a follow-up turn goes back to the board that holds its history), unless its load is more than
   `affinity_slack` requests above the least loaded node's: a prefill elsewhere then costs less than
   the wait;
3. an idle NPU that has the model loaded;
4. the shortest queue (ties: the model already loaded, then this node, then the node id, so that
   concurrent arrivals spread the same way on every API node).
A node's load counts the requests it reported running or waiting, and those this API node sent it
that its last report did not list yet (placed between two reports)."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence

from exo_rkllm.errors import NoNodeHasModel
from exo_rkllm.placement.node_state import NodeState
from exo_rkllm.placement.prefixes import matched_tokens


class Reason(str, enum.Enum):
    ONLY = "the only node that has the model"
    CONVERSATION = "it holds this conversation"
    IDLE_LOADED = "idle with the model loaded"
    SHORTEST_QUEUE = "the shortest queue"


@dataclass(frozen=True)
class Candidate:
    state: NodeState
    load: int  # requests running or waiting there (see the module docstring)
    local: bool = False  # this node (no hop)


@dataclass(frozen=True)
class Placement:
    node_id: str
    reason: Reason
    cached_tokens: int = 0  # the prompt's first tokens that node holds (a multiple of the hash block)
    load: int = 0

    def describe(self) -> str:
        held = f", holding {self.cached_tokens} tokens of the prompt" if self.cached_tokens else ""
        return f"{self.node_id} ({self.reason.value}{held}; load {self.load})"


def place(model_id: str, prompt_hashes: Sequence[str], candidates: Sequence[Candidate], *,
          affinity_slack: int) -> Placement:
    """The node to run the request on. Raises NoNodeHasModel when no live node of the ring has the model."""
    able = [c for c in candidates if model_id in c.state.serves]
    if not able:
        raise NoNodeHasModel(f"no live node of the ring has the .rkllm file of {model_id!r} now: start the board "
                             "that has it, or copy the file into this node's model folder")
    if len(able) == 1:
        only = able[0]
        return Placement(only.state.node_id, Reason.ONLY, _cached(only, model_id, prompt_hashes), only.load)
    least = min(c.load for c in able)
    held = [(c, _cached(c, model_id, prompt_hashes)) for c in able]
    holder, cached = min(held, key=lambda ct: (-ct[1], ct[0].load, not ct[0].local, ct[0].state.node_id))
    if cached and holder.load <= least + affinity_slack:
        return Placement(holder.state.node_id, Reason.CONVERSATION, cached, holder.load)
    idle = [c for c in able if c.load == 0 and c.state.loaded == model_id]
    if idle:
        pick = min(idle, key=lambda c: (not c.local, c.state.node_id))
        return Placement(pick.state.node_id, Reason.IDLE_LOADED, _cached(pick, model_id, prompt_hashes), 0)
    pick = min(able, key=lambda c: (c.load, c.state.loaded != model_id, not c.local, c.state.node_id))
    return Placement(pick.state.node_id, Reason.SHORTEST_QUEUE, _cached(pick, model_id, prompt_hashes), pick.load)


def _cached(c: Candidate, model_id: str, prompt_hashes: Sequence[str]) -> int:
    return matched_tokens(prompt_hashes, c.state.prefixes.get(model_id, frozenset()))
