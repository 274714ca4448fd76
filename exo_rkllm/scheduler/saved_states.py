"""How the scheduler saves and restores KV states through the runtime (prompt-cache files).

The scheduler decides when (a conversation leaves the NPU, a long system prompt is seen for the first
time, a saved state is worth restoring); this does it, with the runtime and the store
(exo_rkllm/scheduler/prompt_caches.py), and says what the KV cache holds afterwards. Nothing is trusted
that the runtime does not confirm: a state is saved by a run of its own whose prefill ends exactly at
that state (the runtime saves what it has prefilled, never an answer), and a restore counts only if
the runtime then reports exactly the saved number of tokens; a refused or disagreeing file is deleted
and the prompt is prefilled instead.

Off, visibly, where the runtime cannot (rkllama, RKLLM before 1.2.1) or RKLLM_PROMPT_CACHE=0.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Sequence

from exo_rkllm.config import Config
from exo_rkllm.errors import PromptCacheError, RKLLMError
from exo_rkllm.runtime.base import FinishEvent, GenerationInput, ModelSpec, Runtime
from exo_rkllm.scheduler.prompt_caches import CacheEntry, CacheScope, EntryKind, Match, PromptCacheStore, Realign

log = logging.getLogger("exo_rkllm.scheduler.saved_states")

# Restoring costs a file load (about 1/100 of prefilling the same tokens) and, when the cache holds
# another conversation, a short run to save that one first: a restore must spare at least this many
# prefilled tokens over what the live cache already spares.
RESTORE_MIN_GAIN = 32


@dataclass(frozen=True)
class SaveResult:
    """What a save run left: the entry (None: nothing usable was written) and what the KV cache holds
    now (None: unknown)."""

    entry: CacheEntry | None
    kv: list[int] | None


class SavedStates:
    """The saved KV states of the model on the NPU, and the runtime calls that make and use them."""

    def __init__(self, runtime: Runtime, config: Config) -> None:
        self.runtime = runtime
        self.config = config
        self.min_tokens = config.cache_min_tokens
        self.scope: CacheScope | None = None
        self._seq = itertools.count(1)
        caps = runtime.capabilities
        runtime_name = " ".join(p for p in (caps.backend, caps.version) if p)
        self.store: PromptCacheStore | None = None
        if not config.prompt_cache:
            self.off_because = "RKLLM_PROMPT_CACHE=0"
        elif config.cache_max_mb == 0:
            self.off_because = "RKLLM_CACHE_MAX_MB=0"
        elif not (caps.prompt_cache and caps.token_input and caps.keep_history):
            self.off_because = (f"the {runtime_name} runtime cannot restore a saved KV state exactly (RKLLM "
                                "1.2.1 or later is needed)")
        else:
            self.off_because = ""
            self.store = PromptCacheStore(config.prompt_cache_dir, config.cache_max_mb * 1024 * 1024,
                                          config.cache_max_age)
        if self.off_because and config.prompt_cache and config.cache_max_mb:
            log.warning("saved KV states are off: %s; a conversation that leaves the NPU is prefilled in full when "
                        "it comes back", self.off_because)

    @property
    def enabled(self) -> bool:
        return self.scope is not None

    # -- the model on the NPU ------------------------------------------------------------------------
    async def open(self, spec: ModelSpec) -> None:
        """After a load: the states saved for this model on this runtime (read from disk once)."""
        self.scope = None
        if self.store is None:
            return
        try:
            self.scope = await asyncio.to_thread(self.store.scope_blocking, spec, self.runtime.capabilities)
        except OSError as exc:
            log.warning("%s: saved KV states are off for this model: cannot use %s (%s); set RKLLM_CACHE_DIR to a "
                        "writable folder", spec.model_id, self.store.root, exc)

    def close(self) -> None:
        """The model leaves the NPU: its states stay on disk, none is used until it is loaded again."""
        self.scope = None

    # -- choosing ------------------------------------------------------------------------------------
    def match(self, prompt: Sequence[int], realign: Realign | None, live_reused: int) -> Match | None:
        """The saved state worth restoring for `prompt`: the longest one it extends, if that spares
        RESTORE_MIN_GAIN more prefilled tokens than the live cache (`live_reused`) does."""
        if self.scope is None:
            return None
        return self.scope.best(prompt, realign, longer_than=live_reused + RESTORE_MIN_GAIN - 1)

    def wants_prefix(self, prompt: Sequence[int], prefix_len: int, live_reused: int) -> bool:
        """A shared prefix (a system prompt) of this prompt should be saved before the prompt runs: long
        enough, not already saved, not already in the live cache, and followed by something."""
        return (self.scope is not None and prefix_len >= self.min_tokens and prefix_len < len(prompt)
                and live_reused < prefix_len and not self.scope.has(prompt[:prefix_len]))

    def worth_saving(self, ids: Sequence[int]) -> bool:
        return self.scope is not None and len(ids) >= self.min_tokens and not self.scope.has(ids)

    # -- doing ---------------------------------------------------------------------------------------
    async def save(self, feed: Sequence[int], keep_history: bool, ids: Sequence[int], kind: EntryKind) -> SaveResult:
        """One run that prefills `feed` (onto the cache with `keep_history`) so that the cache holds
        exactly `ids`, and has the runtime save that state; its one generated token is nobody's. The
        file becomes an entry only once the run has ended."""
        scope = self.scope
        assert scope is not None
        ids = tuple(ids)
        path = scope.temp_path()
        label = f"kv-save-{next(self._seq)}"
        inp = GenerationInput(label, tuple(feed), keep_history=keep_history, max_new_tokens=1,
                              save_prompt_cache=str(path))
        started = time.monotonic()
        finish: FinishEvent | None = None
        try:
            async with contextlib.aclosing(self.runtime.generate(inp)) as events:
                async for event in events:
                    if isinstance(event, FinishEvent):
                        finish = event
        except RKLLMError as exc:
            log.warning("%s: saving a %d-token KV state failed (%s); it will be prefilled when needed",
                        scope.model_id, len(ids), exc)
            await asyncio.to_thread(scope.discard_temp_blocking, path)
            return SaveResult(None, None)
        n = self.runtime.kv_cache_len()
        kv = list(ids) if n == len(ids) else None  # the token it generated may or may not have been fed
        if finish is None:
            await asyncio.to_thread(scope.discard_temp_blocking, path)
            return SaveResult(None, kv)
        try:
            entry = await asyncio.to_thread(scope.commit_blocking, path, ids, kind)
        except OSError as exc:  # a full disk, a folder gone or read-only: the request goes on without it
            log.warning("%s: could not keep a saved %d-token KV state in %s: %s", scope.model_id, len(ids),
                        scope.folder, exc)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(scope.discard_temp_blocking, path)
            return SaveResult(None, kv)
        if entry is not None:
            log.info("%s: saved a KV state of %d tokens (%s, %.1f MB) in %.2f s", scope.model_id, len(ids),
                     kind.value, entry.size / 1e6, time.monotonic() - started)
        return SaveResult(entry, kv)

    async def restore(self, entry: CacheEntry) -> bool:
        """Load `entry` into the KV cache; True only if the runtime then holds exactly its tokens. A file
        that fails is deleted (with the reason in the log): the caller prefills instead."""
        scope = self.scope
        assert scope is not None
        try:
            usable = await asyncio.to_thread(scope.check_blocking, entry)
        except OSError as exc:
            log.warning("%s: cannot read the saved KV state %s: %s", scope.model_id, entry.path, exc)
            usable = False
        if not usable:
            self._refused()
            return False
        started = time.monotonic()
        try:
            await self.runtime.load_prompt_cache(str(entry.path))
        except PromptCacheError as exc:
            await self._drop(entry, f"the runtime refused it: {exc}")
            return False
        n = self.runtime.kv_cache_len()
        if n != entry.tokens:
            await self._drop(entry, f"the runtime holds {n} tokens after loading it, not {entry.tokens}")
            return False
        await asyncio.to_thread(scope.used_blocking, entry)
        log.debug("%s: restored a KV state of %d tokens (%s) in %.3f s", scope.model_id, entry.tokens,
                  entry.kind.value, time.monotonic() - started)
        return True

    async def _drop(self, entry: CacheEntry, why: str) -> None:
        assert self.scope is not None
        try:
            await asyncio.to_thread(self.scope.discard_blocking, entry, why)
        except OSError as exc:  # it cannot be deleted: at least never offer it again
            log.warning("%s: could not delete the saved KV state %s: %s", self.scope.model_id, entry.path, exc)
            self.scope.entries = {k: e for k, e in self.scope.entries.items() if e is not entry}
        self._refused()

    def _refused(self) -> None:
        if self.store is not None:
            self.store.stats.refused += 1

    def held(self) -> dict[str, list[tuple[int, ...]]]:
        """Per model, the token ids of every saved state, most recently used first: what this node tells
        the ring it holds (exo_rkllm/placement)."""
        out: dict[str, list[tuple[int, ...]]] = {}
        if self.store is not None:
            for scope, entry in sorted(self.store.entries(), key=lambda se: -se[1].last_used):
                out.setdefault(scope.model_id, []).append(entry.ids)
        return out

    def describe(self) -> dict[str, object]:
        """The status route's `prompt_cache` object."""
        if self.store is None:
            return {"enabled": False, "why": self.off_because}
        return {"enabled": True, "min_tokens": self.min_tokens, **self.store.describe()}
