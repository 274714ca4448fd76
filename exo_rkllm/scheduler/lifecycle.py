"""Model lifecycle: preload at start-up, keep-alive unload, explicit load/unload, the loading state.

The NPU holds one model. Loading one costs seconds (≈3.2 s for a 1.5B model on an RK3588,
tokenizer included), so `RKLLM_PRELOAD` pays it at start-up instead of the first person;
holding one costs gigabytes, so `RKLLM_KEEP_ALIVE` (Ollama's name and meaning: a duration;
0 = unload as soon as idle; negative = never, the default) gives the memory back after a
while with no request. The next request loads it again (the scheduler does, as for any
request). Switching models unloads the previous one before the next one loads (the scheduler).

Everything here goes through the scheduler's public methods (`preload`, `unload`, `busy`,
`used_at`, `load_state`), so it is testable without exo. What the runtime lets us know of a
load is reported as it is: the simulator reports fractions as it goes; the native library and
rkllama report only the start and the end, so `progress_known` stays false until the end.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from exo_rkllm.config import Config
from exo_rkllm.errors import NPUBusy, RKLLMError
from exo_rkllm.runtime.base import ModelSpec

if TYPE_CHECKING:
    from exo_rkllm.scheduler.scheduler import Scheduler

log = logging.getLogger("exo_rkllm.scheduler.lifecycle")

PRELOAD_FIRST = "first"


class LoadStatus(enum.Enum):
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"
    UNLOADING = "unloading"
    UNLOADED = "unloaded"


class ModelStatus(enum.Enum):
    """A listed model's state, as `/v1/models` shows it."""

    LOADED = "loaded"  # on the NPU, a request starts at once
    LOADING = "loading"  # being loaded (progress in /v1/rkllm/status)
    UNLOADING = "unloading"
    AVAILABLE = "available"  # on disk: its first request loads it

    @property
    def ready(self) -> bool:
        """exo's `ready` (the model can be asked for now): never while it is being loaded or unloaded."""
        return self in (ModelStatus.LOADED, ModelStatus.AVAILABLE)


@dataclass
class LoadState:
    """The last load (or unload) the scheduler started, with what the runtime told us of it."""

    model_id: str
    status: LoadStatus = LoadStatus.LOADING
    started_at: float = field(default_factory=time.monotonic)
    progress: float = 0.0
    progress_known: bool = False  # the runtime reported a fraction between 0 and 1 (or the load ended)
    step: str = ""
    finished_at: float | None = None
    error: str | None = None

    def report(self, step: str, fraction: float) -> None:
        """The runtime's progress callback."""
        self.step, self.progress = step, min(1.0, max(0.0, fraction))
        if 0.0 < fraction < 1.0:
            self.progress_known = True

    def finish(self, status: LoadStatus, error: str | None = None) -> None:
        self.status, self.error, self.finished_at = status, error, time.monotonic()
        if status is LoadStatus.LOADED:
            self.progress, self.progress_known = 1.0, True

    @property
    def in_progress(self) -> bool:
        return self.status in (LoadStatus.LOADING, LoadStatus.UNLOADING)

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        end = self.finished_at if self.finished_at is not None else (now or time.monotonic())
        return {"model": self.model_id, "status": self.status.value, "progress": round(self.progress, 3),
                "progress_known": self.progress_known, "step": self.step,
                "elapsed_s": round(end - self.started_at, 3), "error": self.error}


def preload_ids(setting: str, servable_ids: list[str]) -> list[str]:
    """RKLLM_PRELOAD's model names in order, `first` replaced by the first servable model, no repeats."""
    out: list[str] = []
    for name in (part.strip() for part in setting.split(",")):
        if name.lower() == PRELOAD_FIRST:
            if not servable_ids:
                log.warning("RKLLM_PRELOAD=first: there is no servable model to preload")
                continue
            name = servable_ids[0]
        if name and name not in out:
            out.append(name)
    return out


def model_status(scheduler: "Scheduler | None", model_id: str) -> ModelStatus:
    if scheduler is None:
        return ModelStatus.AVAILABLE
    state = scheduler.load_state
    if state is not None and state.in_progress and state.model_id == model_id:
        return ModelStatus.LOADING if state.status is LoadStatus.LOADING else ModelStatus.UNLOADING
    loaded = scheduler.runtime.loaded
    return ModelStatus.LOADED if loaded is not None and loaded.model_id == model_id else ModelStatus.AVAILABLE


# (name) -> the canonical model id and its spec, its tokenizer built (raises ModelNotFound, ModelUnavailable)
Prepare = Callable[[str], Awaitable[ModelSpec]]


class Lifecycle:
    """One per scheduler: the preload and keep-alive task, and the explicit load/unload operations."""

    def __init__(self, scheduler: "Scheduler", config: Config, prepare: Prepare,
                 servable_ids: Callable[[], list[str]]) -> None:
        self.scheduler = scheduler
        self.config = config
        self._prepare = prepare
        self._servable_ids = servable_ids
        self._task: asyncio.Task[None] | None = None
        self._busy_seen_at = 0.0  # last time the keep-alive timer saw the NPU with work
        self.unloads = 0  # by the keep-alive timer

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._main(), name="rkllm-lifecycle")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _main(self) -> None:
        await self.preload()
        if self.config.keep_alive >= 0:
            await self._keep_alive()

    # -- preload ----------------------------------------------------------------------------------
    async def preload(self) -> None:
        """RKLLM_PRELOAD: load the first model that resolves onto the NPU, get the others' tokenizers ready.
        A model that cannot be prepared is logged and skipped: exo still starts, its request reports why."""
        ids = preload_ids(self.config.preload, self._servable_ids()) if self.config.preload.strip() else []
        on_npu = False
        for name in ids:
            try:
                spec = await self._prepare(name)
                if not on_npu:
                    on_npu = True
                    # a request that came first has the NPU and its own model: do not take it away
                    if self.scheduler.runtime.loaded is None and not self.scheduler.busy:
                        log.info("preloading %s (RKLLM_PRELOAD)", spec.model_id)
                        await self.scheduler.preload(spec)
            except RKLLMError as exc:
                log.error("RKLLM_PRELOAD: cannot preload %s: %s", name, exc)
            except Exception:
                log.exception("RKLLM_PRELOAD: preloading %s failed", name)

    # -- keep-alive -------------------------------------------------------------------------------
    @property
    def period(self) -> float:
        return max(0.05, min(1.0, self.config.keep_alive / 4))

    async def _keep_alive(self) -> None:
        """Unload the model once the NPU has had no request for RKLLM_KEEP_ALIVE seconds (measured
        from the last time work was seen, so within one period of the request's end)."""
        while not self.scheduler.closed:
            await asyncio.sleep(self.period)
            try:
                await self.tick()
            except Exception:
                log.exception("keep-alive: unloading failed")

    async def tick(self, now: float | None = None) -> bool:
        """One look at the NPU; True if it unloaded the model."""
        scheduler, now = self.scheduler, now if now is not None else time.monotonic()
        loaded = scheduler.runtime.loaded
        state = scheduler.load_state
        if loaded is None or scheduler.closed:
            return False
        if scheduler.busy or (state is not None and state.in_progress):
            self._busy_seen_at = now
            return False
        since = max(self._busy_seen_at, scheduler.used_at)
        if now - since < self.config.keep_alive:
            return False
        if not await scheduler.unload(idle_since=since):
            return False  # a request came meanwhile: it keeps the model
        self.unloads += 1
        log.info("%s unloaded after %.1f s with no request (RKLLM_KEEP_ALIVE=%g s); the next request loads it "
                 "again", loaded.model_id, now - since, self.config.keep_alive)
        return True

    # -- explicit load / unload -------------------------------------------------------------------
    async def load(self, name: str) -> dict[str, Any]:
        """POST /v1/rkllm/load: put `name` on the NPU now (returns once loaded). Refused (NPUBusy)
        while requests for another model run or wait: they would pay the switch back."""
        spec = await self._prepare(name)
        scheduler = self.scheduler
        loaded = scheduler.runtime.loaded
        if not (loaded is not None and loaded.model_id == spec.model_id) and scheduler.busy:
            raise NPUBusy(f"cannot load {spec.model_id} now: requests are running or waiting on the NPU "
                          f"({scheduler.queued} waiting); retry when they are done")
        await scheduler.preload(spec)  # raises ModelLoadError with the runtime's reason
        return self.describe(spec.model_id)

    async def unload(self, name: str | None) -> dict[str, Any]:
        """POST /v1/rkllm/unload: give the NPU's memory back now. `name` (optional) must be the loaded
        model for anything to happen; refused (NPUBusy) while requests run or wait."""
        scheduler = self.scheduler
        model_id = (await self._prepare(name)).model_id if name else None
        loaded = scheduler.runtime.loaded
        if loaded is None or (model_id is not None and loaded.model_id != model_id):
            return self.describe(model_id)
        if scheduler.busy:
            raise NPUBusy(f"cannot unload {loaded.model_id}: requests are running or waiting on it "
                          f"({scheduler.queued} waiting); retry when they are done")
        if not await scheduler.unload():
            raise NPUBusy(f"cannot unload {loaded.model_id}: a request arrived meanwhile")
        return self.describe(loaded.model_id)

    def describe(self, model_id: str | None) -> dict[str, Any]:
        """What the load/unload routes answer: the model's status, the NPU's model, the last load."""
        loaded = self.scheduler.runtime.loaded
        body: dict[str, Any] = {"loaded_model": loaded.model_id if loaded else None, **self.status()}
        if model_id is not None:
            body.update(model=model_id, status=model_status(self.scheduler, model_id).value)
        return body

    def status(self) -> dict[str, Any]:
        """The lifecycle part of /v1/rkllm/status."""
        state = self.scheduler.load_state
        return {"load": state.as_dict() if state is not None else None,
                "keep_alive_s": self.config.keep_alive if self.config.keep_alive >= 0 else None,
                "keep_alive_unloads": self.unloads}
