"""What one node of the ring has and does, as it tells the others (an exo peer message).

Every field is what the placement needs: the models whose file is on this board (it can run them),
those it only routes (tokenizer files, no .rkllm file), the model on its NPU, the request running
and those waiting, and the conversations its KV cache and saved states hold (as prefix hashes,
placement/prefixes.py). A node of another exo-rkllm version may send more or fewer fields: unknown
ones are ignored, missing ones take their empty value, wrong types are refused."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

from exo_rkllm.placement.prefixes import advertised

MAX_HASHES_PER_MODEL = 256  # a bound on one message: about 4 KB of hashes per model


@dataclass(frozen=True, kw_only=True)
class _Doing:
    """What a node has and does, in its own report and in what it tells the ring alike."""

    serves: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    loaded: str | None = None
    running: str | None = None
    waiting: tuple[str, ...] = ()
    backend: str = ""
    version: str = ""


@dataclass(frozen=True, kw_only=True)
class NodeActivity(_Doing):
    """A node's own report, as its engine gives it (exo_rkllm/engine/inference_engine.py `activity`)."""

    # per model, the token sequences whose KV state this node holds (live cache first, then saved
    # states, most recently used first)
    held: Mapping[str, Sequence[Sequence[int]]] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class NodeState(_Doing):
    """What a node tells the ring: its report with the held sequences as prefix hashes."""

    node_id: str
    prefixes: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, node_id: str, activity: NodeActivity) -> "NodeState":
        doing = {f.name: getattr(activity, f.name) for f in fields(_Doing)}
        return cls(node_id=node_id, **doing,
                   prefixes={m: frozenset(advertised(seqs, MAX_HASHES_PER_MODEL)) for m, seqs in activity.held.items()})

    @property
    def requests(self) -> frozenset[str]:
        """The requests this node runs or queues."""
        return frozenset((self.running,) if self.running else ()) | frozenset(self.waiting)

    def to_json(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "serves": list(self.serves), "routes": list(self.routes),
                "loaded": self.loaded, "running": self.running, "waiting": list(self.waiting),
                "backend": self.backend, "version": self.version,
                "prefixes": {m: sorted(h) for m, h in self.prefixes.items()}}

    @classmethod
    def from_json(cls, data: Any) -> "NodeState":
        """Raises ValueError for a message that is not a node state."""
        if not isinstance(data, dict) or not isinstance(data.get("node_id"), str) or not data["node_id"]:
            raise ValueError("a node state needs a node_id")
        prefixes = data.get("prefixes") or {}
        if not isinstance(prefixes, dict) or not all(_strings(v) for v in prefixes.values()):
            raise ValueError("prefixes must map model ids to lists of hashes")
        for key in ("serves", "routes", "waiting"):
            if not _strings(data.get(key) or []):
                raise ValueError(f"{key} must be a list of strings")
        for key in ("loaded", "running"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ValueError(f"{key} must be a string or null")
        return cls(node_id=data["node_id"], serves=tuple(data.get("serves") or ()),
                   routes=tuple(data.get("routes") or ()), loaded=data.get("loaded"), running=data.get("running"),
                   waiting=tuple(data.get("waiting") or ()), backend=str(data.get("backend") or ""),
                   version=str(data.get("version") or ""),
                   prefixes={str(m): frozenset(h) for m, h in prefixes.items()})


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, str) for x in value)
