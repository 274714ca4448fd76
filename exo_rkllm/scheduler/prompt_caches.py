"""Saved KV states on disk: which conversation prefixes the runtime can restore instead of prefilling.

The NPU's KV cache holds one conversation. When another takes the NPU, the scheduler first has the
runtime save the leaving one's state to a file (RKLLMPromptCacheParam), and a later prompt that
extends a saved state restores it (rkllm_load_prompt_cache) and prefills only its new suffix. A
long system prompt is saved the same way, once per model, for every conversation that starts with it.

The runtime's files are opaque; what makes them safe to reuse is kept beside each one, in a sidecar
written only once the file is complete: the exact token ids the state holds (matching is on ids, the
longest saved prefix wins), its size, modification time and SHA-256, and the scope it belongs to. A
scope is one model file (resolved path, size, modification time), its context length and one runtime
(backend and release): a changed model file or runtime gets a new scope, so it never loads a stale
state, and the old scope's files are deleted when the new one opens. A file whose size or time no
longer match its sidecar, or (checked when a scope opens) whose bytes no longer hash to it, is
ignored and deleted with a log line; so are files without a sidecar (a save cut short by a crash).

The store is bounded by size and age: least recently used states go first. It is used from the
scheduler's one worker, with blocking file work on a thread (the `*_blocking` methods).
"""
from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from exo_rkllm.runtime.base import Capabilities, ModelSpec

log = logging.getLogger("exo_rkllm.scheduler.prompt_caches")

FORMAT = 1
SCOPE_FILE = "scope.json"
STATE_SUFFIX = ".kv"  # the runtime's own file
META_SUFFIX = ".json"  # ours, beside it
TEMP_PREFIX = "saving-"

Realign = Callable[[Sequence[int]], "tuple[int, ...] | None"]


class EntryKind(str, enum.Enum):
    """What a saved state is: a whole conversation as it left the NPU, or a shared prefix (a system prompt)."""

    CONVERSATION = "conversation"
    PREFIX = "prefix"


@dataclass
class CacheEntry:
    """One saved KV state: exactly `ids`, in the runtime's file `path`."""

    ids: tuple[int, ...]
    kind: EntryKind
    path: Path
    size: int
    mtime_ns: int
    sha256: str
    last_used: float  # wall-clock seconds (the sidecar's modification time on disk)

    @property
    def meta_path(self) -> Path:
        return self.path.with_suffix(META_SUFFIX)

    @property
    def tokens(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Match:
    """A saved state a prompt can continue: `prompt` (the prompt itself, or its realigned tokens)
    begins with every id of `entry`."""

    entry: CacheEntry
    prompt: tuple[int, ...]


def scope_identity(spec: ModelSpec, caps: Capabilities) -> dict[str, object]:
    """What a saved state belongs to (blocking: stats the model file)."""
    st = spec.path.stat()
    return {"format": FORMAT, "model_id": spec.model_id, "model_path": str(spec.path.resolve()),
            "model_size": st.st_size, "model_mtime_ns": st.st_mtime_ns, "max_context_len": spec.max_context_len,
            "backend": caps.backend, "runtime": caps.version}


def _scope_id(identity: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def _ids_key(ids: Sequence[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:32]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


@dataclass
class StoreStats:
    """What the status route and benchmarks show of the store."""

    saves: int = 0
    restores: int = 0
    refused: int = 0  # restores the runtime or the checks refused (the prompt was prefilled instead)
    evicted: int = 0


class CacheScope:
    """The saved states of one model on one runtime (a folder of the store)."""

    def __init__(self, store: "PromptCacheStore", folder: Path, identity: dict[str, object]) -> None:
        self.store = store
        self.folder = folder
        self.identity = identity
        self.model_id = str(identity["model_id"])
        self.entries: dict[str, CacheEntry] = {}

    # -- finding ---------------------------------------------------------------------------------
    def best(self, prompt: Sequence[int], realign: Realign | None = None, *, longer_than: int = 0) -> Match | None:
        """The longest saved state (of more than `longer_than` tokens) that `prompt` extends by at least
        one token, exactly or once realigned (the prompt's text tokenized so that it continues the
        saved ids: a follow-up turn spells the model's answer as text). Decided on ids only."""
        prompt = tuple(prompt)
        best: Match | None = None
        for entry in sorted(self.entries.values(), key=lambda e: -e.tokens):
            n = entry.tokens
            if n <= longer_than or (best is not None and n <= best.entry.tokens):
                break
            if n < len(prompt) and prompt[:n] == entry.ids:
                return Match(entry, prompt)
            if realign is not None and entry.kind is EntryKind.CONVERSATION and self._worth_realigning(prompt, entry):
                aligned = realign(entry.ids)
                if aligned and len(aligned) > n and tuple(aligned[:n]) == entry.ids:
                    best = Match(entry, tuple(aligned))
        return best

    @staticmethod
    def _worth_realigning(prompt: tuple[int, ...], entry: CacheEntry) -> bool:
        """Realigning reads the state's bytes: only for one that shares a real start with the prompt (64
        ids, or an eighth of a short state), not for every state on disk. The cut cannot scale with the
        state's length: two prompts of one conversation part at the first answer the client sent back
        tokenized otherwise, however long the conversation has grown since."""
        n, k = min(len(prompt), entry.tokens), 0
        while k < n and prompt[k] == entry.ids[k]:
            k += 1
        return k >= max(1, min(64, entry.tokens // 8))

    def has(self, ids: Sequence[int]) -> bool:
        return _ids_key(ids) in self.entries

    # -- saving ------------------------------------------------------------------------------------
    def temp_path(self) -> Path:
        """Where the runtime writes a state being saved: a name nothing reads until `commit_blocking`."""
        return self.folder / f"{TEMP_PREFIX}{uuid.uuid4().hex}{STATE_SUFFIX}"

    def commit_blocking(self, written: Path, ids: Sequence[int], kind: EntryKind) -> CacheEntry | None:
        """Take the file the runtime wrote at `written` as the state `ids`: hash it, move it to its name,
        then write its sidecar (the entry exists from that rename on). A conversation's state replaces the
        shorter states of the same conversation it extends. None if the runtime wrote nothing usable."""
        ids = tuple(int(i) for i in ids)
        try:
            st = written.stat()
        except FileNotFoundError:
            log.warning("%s: the runtime wrote no prompt cache for a %d-token state; it will be prefilled when "
                        "needed", self.model_id, len(ids))
            return None
        if st.st_size == 0:
            written.unlink(missing_ok=True)
            log.warning("%s: the runtime wrote an empty prompt cache; ignored", self.model_id)
            return None
        key = _ids_key(ids)
        old = self.entries.pop(key, None)
        if old is not None:
            self._delete(old)
        path = self.folder / f"{key}{STATE_SUFFIX}"
        sha = _file_sha256(written)
        written.replace(path)
        st = path.stat()
        now = time.time()
        entry = CacheEntry(ids, kind, path, st.st_size, st.st_mtime_ns, sha, now)
        _write_atomically(entry.meta_path, json.dumps({
            "format": FORMAT, "scope": _scope_id(self.identity), "kind": kind.value, "n": len(ids), "ids": list(ids),
            "size": entry.size, "mtime_ns": entry.mtime_ns, "sha256": sha}))
        self.entries[key] = entry
        if kind is EntryKind.CONVERSATION:
            for other in [e for e in self.entries.values()
                          if e.kind is EntryKind.CONVERSATION and e.tokens < entry.tokens and ids[:e.tokens] == e.ids]:
                self.discard_blocking(other, "")
        self.store.stats.saves += 1
        self.store.trim_blocking()
        return entry

    def discard_temp_blocking(self, written: Path) -> None:
        written.unlink(missing_ok=True)

    # -- restoring ---------------------------------------------------------------------------------
    def check_blocking(self, entry: CacheEntry) -> bool:
        """The file is still what was saved (size and modification time; the bytes are hashed when a scope
        opens). If not, it is deleted with a log line."""
        try:
            st = entry.path.stat()
        except FileNotFoundError:
            self.discard_blocking(entry, "its file is gone")
            return False
        if st.st_size != entry.size or st.st_mtime_ns != entry.mtime_ns:
            self.discard_blocking(entry, "its file changed since it was saved (truncated or overwritten)")
            return False
        return True

    def used_blocking(self, entry: CacheEntry) -> None:
        """Mark a restore: least recently used states are evicted first."""
        entry.last_used = time.time()
        self.store.stats.restores += 1
        try:
            os.utime(entry.meta_path, (entry.last_used, entry.last_used))
        except OSError:
            pass

    def discard_blocking(self, entry: CacheEntry, why: str) -> None:
        """Forget a state and delete its files; `why` (if any) is logged as a warning."""
        if why:
            log.warning("%s: ignoring the saved KV state of %d tokens (%s): %s; deleted it", self.model_id,
                        entry.tokens, entry.kind.value, why)
        self.entries.pop(_ids_key(entry.ids), None)
        self._delete(entry)

    @staticmethod
    def _delete(entry: CacheEntry) -> None:
        entry.meta_path.unlink(missing_ok=True)  # first: without its sidecar a file is never used
        entry.path.unlink(missing_ok=True)

    # -- opening -----------------------------------------------------------------------------------
    def scan_blocking(self) -> None:
        """Read the folder: every complete, unchanged state with a valid sidecar; delete everything else."""
        scope = _scope_id(self.identity)
        for meta in sorted(self.folder.glob(f"*{META_SUFFIX}")):
            if meta.name == SCOPE_FILE:
                continue
            entry, why = self._read_meta(meta, scope)
            if entry is None:
                log.warning("%s: ignoring the saved KV state %s: %s; deleted it", self.model_id, meta.stem, why)
                meta.unlink(missing_ok=True)
                meta.with_suffix(STATE_SUFFIX).unlink(missing_ok=True)
                continue
            self.entries[_ids_key(entry.ids)] = entry
        kept = {SCOPE_FILE} | {n for e in self.entries.values() for n in (e.path.name, e.meta_path.name)}
        for path in self.folder.iterdir():  # a save cut short (no sidecar), or a temporary name
            if path.name in kept:
                continue
            log.info("%s: deleting %s, an incomplete save", self.model_id, path.name)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def _read_meta(self, meta: Path, scope: str) -> tuple[CacheEntry | None, str]:
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
            ids = tuple(int(i) for i in data["ids"])
            kind = EntryKind(data["kind"])
            size, mtime_ns, sha = int(data["size"]), int(data["mtime_ns"]), str(data["sha256"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return None, f"unreadable sidecar ({exc})"
        if data.get("format") != FORMAT or data.get("scope") != scope:
            return None, "saved for another model file or runtime"
        if not ids or data.get("n") != len(ids) or meta.stem != _ids_key(ids):
            return None, "its sidecar is corrupt"
        path = meta.with_suffix(STATE_SUFFIX)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None, "its file is gone"
        if st.st_size != size or st.st_mtime_ns != mtime_ns:
            return None, "its file changed since it was saved (truncated or overwritten)"
        if _file_sha256(path) != sha:
            return None, "its file is corrupt (checksum mismatch)"
        return CacheEntry(ids, kind, path, size, mtime_ns, sha, meta.stat().st_mtime), ""


@dataclass
class PromptCacheStore:
    """Every saved KV state under one folder, bounded by `max_bytes` and `max_age_s`."""

    root: Path
    max_bytes: int
    max_age_s: float
    stats: StoreStats = field(default_factory=StoreStats)
    scopes: dict[str, CacheScope] = field(default_factory=dict)

    def scope_blocking(self, spec: ModelSpec, caps: Capabilities) -> CacheScope:
        """The states of `spec` on this runtime, read from disk the first time. A folder of the same model
        saved with another file or runtime is stale: it is deleted."""
        identity = scope_identity(spec, caps)
        sid = _scope_id(identity)
        scope = self.scopes.get(sid)
        if scope is not None:
            return scope
        self.root.mkdir(parents=True, exist_ok=True)
        for other in [s for s in self.scopes.values() if s.model_id == spec.model_id]:
            del self.scopes[_scope_id(other.identity)]
        self._delete_stale(spec.model_id, sid)
        folder = self.root / sid
        folder.mkdir(exist_ok=True)
        _write_atomically(folder / SCOPE_FILE, json.dumps(identity, sort_keys=True))
        scope = CacheScope(self, folder, identity)
        scope.scan_blocking()
        self.scopes[sid] = scope
        self.trim_blocking()
        if scope.entries:
            log.info("%s: %d saved KV state(s) on disk (%.1f MB) can be restored", spec.model_id,
                     len(scope.entries), sum(e.size for e in scope.entries.values()) / 1e6)
        return scope

    def _delete_stale(self, model_id: str, keep: str) -> None:
        for folder in self.root.iterdir():
            if not folder.is_dir() or folder.name == keep:
                continue
            try:
                identity = json.loads((folder / SCOPE_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(identity, dict) and identity.get("model_id") == model_id:
                log.info("%s: its model file or runtime changed; deleting the KV states saved before (%s)",
                         model_id, folder.name)
                shutil.rmtree(folder, ignore_errors=True)

    def entries(self) -> list[tuple[CacheScope, CacheEntry]]:
        return [(scope, e) for scope in self.scopes.values() for e in scope.entries.values()]

    @property
    def bytes(self) -> int:
        return sum(e.size for _, e in self.entries())

    def trim_blocking(self) -> None:
        """Evict states older than max_age_s, then the least recently used until under max_bytes."""
        now = time.time()
        items = sorted(self.entries(), key=lambda se: se[1].last_used)
        total = sum(e.size for _, e in items)
        for scope, entry in items:
            too_old = self.max_age_s >= 0 and now - entry.last_used > self.max_age_s
            if not too_old and total <= self.max_bytes:
                continue
            total -= entry.size
            scope.discard_blocking(entry, "")
            self.stats.evicted += 1
            log.debug("%s: evicted a saved KV state of %d tokens (%s)", scope.model_id, entry.tokens,
                      "too old" if too_old else "over the size limit")

    def describe(self) -> dict[str, object]:
        """For the status route: where, how much, and what each model has saved."""
        per_model: dict[str, dict[str, int]] = {}
        for scope, entry in self.entries():
            row = per_model.setdefault(scope.model_id, {"conversations": 0, "prefixes": 0, "tokens": 0, "bytes": 0})
            row["conversations" if entry.kind is EntryKind.CONVERSATION else "prefixes"] += 1
            row["tokens"] += entry.tokens
            row["bytes"] += entry.size
        return {"dir": str(self.root), "bytes": self.bytes, "max_bytes": self.max_bytes, "max_age_s": self.max_age_s,
                "saves": self.stats.saves, "restores": self.stats.restores, "refused": self.stats.refused,
                "evicted": self.stats.evicted, "models": per_model}
