"""Crash isolation: the native runtime in a child process owned by this backend.

exo's process never loads librkllmrt.so. A worker process (worker.py) does,
and this class speaks to it over a socket pair. If the worker dies (segfault
or abort inside the vendor library, the kernel's OOM killer), the request in
flight fails with an error that says so, a new worker is started at once and
the model reloaded, and the next request runs normally. exo itself never sees
the signal.

The event loop reads the worker's socket itself (add_reader): a token costs
one wake-up of exo's loop, with no thread in between, and the worker's death
shows up as the end of that socket. Everything on this side runs on the loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator
from multiprocessing.connection import Connection

from exo_rkllm.errors import (EmbeddingUnsupported, GenerationError, ModelLoadError, PromptCacheError, RKLLMError,
                              RuntimeUnavailable)
from exo_rkllm.runtime.base import (EmbeddingInput, EmbeddingOutput, FinishEvent, GenerationInput, ModelSpec, ProgressFn, RuntimeBase,
                    RuntimeEvent)
from exo_rkllm.runtime.native.backend import NativeSettings, capabilities_for
from exo_rkllm.runtime.native.ipc import Abort, Call, Configure, Failed, Finished, Generate, Hello, Reply, Token
from exo_rkllm.runtime.native.library import RuntimeIdentity

log = logging.getLogger("exo_rkllm.native")

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])  # the folder holding exo_rkllm/

# Seconds to wait for a worker that has been killed (or has exited) to be reaped, and for the last
# events of a generation whose worker was killed: SIGKILL takes effect within milliseconds, so this only
# bounds a pathological kernel delay; it keeps exo's shutdown and the next request from hanging on it.
REAP_TIMEOUT_S = 5.0

_SIGNAL_MEANING = {
    signal.SIGSEGV: "segmentation fault",
    signal.SIGABRT: "abort",
    signal.SIGBUS: "bus error",
    signal.SIGILL: "illegal instruction",
    signal.SIGFPE: "arithmetic error",
    signal.SIGKILL: "killed, e.g. by the kernel's out-of-memory killer",
    signal.SIGTERM: "terminated",
}


def describe_exit(rc: int | None) -> str:
    """A worker's exit status in words."""
    if rc is None:
        return "stopped responding"
    if rc < 0:
        try:
            sig = signal.Signals(-rc)
        except ValueError:
            return f"was killed by signal {-rc}"
        meaning = _SIGNAL_MEANING.get(sig)
        return f"was killed by {sig.name}" + (f" ({meaning})" if meaning else "")
    return f"exited with status {rc}"


class _Worker:
    """One worker process and its socket, read by the event loop it is attached to."""

    def __init__(self, proc: subprocess.Popen[bytes], conn: Connection) -> None:
        self.proc = proc
        self.conn = conn
        self.fd = conn.fileno()
        self.pid = proc.pid
        self.alive = True
        self.stopping = False
        self.exit_code: int | None = None
        self.killed_because: str | None = None  # set when we kill it (a runtime that ignores abort)
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._send_lock = threading.Lock()

    def send(self, msg: Any) -> None:
        """Raises GenerationError if the worker is gone."""
        try:
            with self._send_lock:
                self.conn.send(msg)
        except (OSError, ValueError) as exc:
            raise GenerationError(f"the RKLLM runtime worker (pid {self.pid}) is gone: {exc}") from exc

    def kill(self, because: str | None = None) -> None:
        if because and self.killed_because is None:
            self.killed_because = because
        with contextlib.suppress(OSError):
            self.proc.kill()

    def wait(self, timeout: float) -> int:
        """The exit status, killing the process if it has not exited within `timeout`."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the RKLLM runtime worker (pid %d) did not exit: killing it", self.pid)
            self.kill()
            return self.proc.wait()

    def detach(self) -> None:
        """Stop reading the socket (on the loop thread, or once that loop has stopped)."""
        loop, self.loop = self.loop, None
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                loop.remove_reader(self.fd)

    def close(self) -> None:
        self.detach()
        with contextlib.suppress(OSError):
            self.conn.close()


@dataclass
class _Generation:
    seq: int
    queue: asyncio.Queue[Any]
    worker: _Worker
    started: float = field(default_factory=time.monotonic)
    watchdog: asyncio.TimerHandle | None = None  # kills a worker whose runtime ignores an abort


def _settle(fut: asyncio.Future[Any], msg: Reply) -> None:
    if fut.done():
        return
    if msg.error is not None:
        fut.set_exception(msg.error.exception())
    else:
        fut.set_result(msg.value)


class IsolatedRuntime(RuntimeBase):
    """The `native` backend with librkllmrt.so in a worker process (RKLLM_NATIVE_ISOLATION=1, the default)."""

    START_TIMEOUT = 60.0  # seconds for a worker to load the library and say hello
    ABORT_GRACE = 10.0  # seconds a worker may take to stop after an abort before it is killed
    CLOSE_TIMEOUT = 15.0

    def __init__(self, identity: RuntimeIdentity, settings: NativeSettings, *, python: str | None = None) -> None:
        self.identity = identity
        self.settings = settings
        self.python = python or sys.executable
        self.capabilities = capabilities_for(identity)
        self.restarts = 0
        self.last_death: str | None = None
        self._worker: _Worker | None = None
        self._spec: ModelSpec | None = None
        self._kv_len: int | None = None
        self._gen: _Generation | None = None
        self._seq = itertools.count(1)
        self._restart: asyncio.Future[None] | None = None
        self._closed = False

    # -- protocol ------------------------------------------------------------------------------------------
    @property
    def loaded(self) -> ModelSpec | None:
        return self._spec

    @property
    def worker_pid(self) -> int | None:
        worker = self._worker
        return worker.pid if worker is not None and worker.alive else None

    def is_running(self) -> bool:
        return self._gen is not None

    def kv_cache_len(self) -> int | None:
        """What the worker last reported (after each run and clear); None when it cannot tell."""
        return self._kv_len if self._spec is not None else None

    async def load(self, model: ModelSpec, progress: ProgressFn | None = None) -> None:
        worker = await self._ensure_worker()
        self._spec, self._kv_len = None, None  # a crash during the load must not reload the old model
        if progress:
            progress(f"loading {Path(model.path).name}", 0.0)
        try:
            kv_len = await self._call(worker, "load", model)
        except ModelLoadError:
            raise
        except RKLLMError as exc:
            if not worker.alive:
                raise ModelLoadError(f"the RKLLM runtime crashed while loading {model.path}: {exc}") from exc
            raise
        self._spec, self._kv_len = model, kv_len
        if progress:
            progress(f"loaded {Path(model.path).name}", 1.0)

    async def unload(self) -> None:
        worker = self._worker
        self._spec, self._kv_len = None, None
        if worker is not None and worker.alive:
            await self._call(worker, "unload")

    async def abort(self) -> None:
        """Ask the runtime to stop. If it has not stopped ABORT_GRACE seconds later (a hung vendor
        library), its worker is killed: the generation then ends with an error and the worker restarts."""
        gen = self._gen
        if gen is not None and gen.worker.alive:
            with contextlib.suppress(GenerationError):
                gen.worker.send(Abort(gen.seq))
            if gen.watchdog is None:
                gen.watchdog = asyncio.get_running_loop().call_later(self.ABORT_GRACE, self._abort_overdue, gen)

    def _abort_overdue(self, gen: _Generation) -> None:
        if self._gen is gen and gen.worker.alive:
            log.error("the RKLLM runtime did not stop within %g s of an abort: killing its worker (pid %d)",
                      self.ABORT_GRACE, gen.worker.pid)
            gen.worker.kill(f"did not stop within {self.ABORT_GRACE:g} s of an abort and was killed")

    async def clear_kv_cache(self) -> None:
        worker = await self._ensure_worker()
        self._kv_len = None
        self._kv_len = await self._call(worker, "clear_kv_cache")

    async def load_prompt_cache(self, path: str) -> None:
        """rkllm_load_prompt_cache in the worker (see NativeSession.load_prompt_cache), whose session also
        releases it on the next clear or unload. A worker that dies meanwhile (the file crashed the
        runtime) is restarted as after a generation, and this load is refused like a bad file."""
        if not self.capabilities.prompt_cache:
            raise PromptCacheError(f"the RKLLM runtime {self.identity.version} cannot report what a loaded prompt "
                                   "cache holds (no rkllm_get_kv_cache_size before 1.2.1): prompt caches are off")
        worker = await self._ensure_worker()
        if self._spec is None:
            raise PromptCacheError("no model is loaded")
        if self._gen is not None:
            raise PromptCacheError("rkllm_load_prompt_cache while a run is in progress")
        self._kv_len = None
        try:
            self._kv_len = await self._call(worker, "load_prompt_cache", path)
        except PromptCacheError:
            raise
        except RKLLMError as exc:
            if not worker.alive:
                raise PromptCacheError(f"the RKLLM runtime crashed while loading the prompt cache {path}: "
                                       f"{exc}") from exc
            raise

    async def embed(self, inp: EmbeddingInput) -> EmbeddingOutput:
        """The last hidden layer, computed in the worker (see NativeSession.embed). A worker that dies
        meanwhile fails this call and is restarted, as for a generation."""
        if not self.capabilities.embeddings:
            raise EmbeddingUnsupported(f"the RKLLM runtime {self.identity.version} has no last-hidden-layer mode")
        worker = await self._ensure_worker()
        if self._spec is None:
            raise GenerationError("no model is loaded")
        if self._gen is not None:
            raise GenerationError("the runtime is busy: one run at a time per context")
        self._kv_len = None
        result = await self._call(worker, "embed", inp)
        self._kv_len = result.kv_len
        return EmbeddingOutput(hidden=result.hidden, pooled=False)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._restart is not None and not self._restart.done():
            self._restart.cancel()
            with contextlib.suppress(BaseException):
                await self._restart
        worker, self._worker = self._worker, None
        self._spec = None
        if worker is None:
            return
        worker.stopping = True
        if worker.alive:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._call(worker, "close"), self.CLOSE_TIMEOUT)
        worker.close()
        worker.exit_code = await asyncio.to_thread(worker.wait, self.CLOSE_TIMEOUT)
        worker.alive = False

    async def generate(self, inp: GenerationInput) -> AsyncIterator[RuntimeEvent]:
        worker = await self._ensure_worker()
        if self._spec is None:
            raise GenerationError("no model is loaded")
        if self._gen is not None:
            raise GenerationError("the runtime is busy: one generation at a time per context")
        gen = _Generation(next(self._seq), asyncio.Queue(), worker)
        self._gen, self._kv_len = gen, None
        ended = False
        try:
            worker.send(Generate(gen.seq, inp))
            while True:
                item = await gen.queue.get()
                if isinstance(item, BaseException):
                    ended = True
                    raise item
                if isinstance(item, FinishEvent):
                    ended = True
                    yield item
                    return
                yield item
        finally:
            if not ended and worker.alive:
                await self._stop_generation(gen)
            if gen.watchdog is not None:
                gen.watchdog.cancel()
            if self._gen is gen:
                self._gen = None

    async def _stop_generation(self, gen: _Generation) -> None:
        """The consumer left early: abort, and wait until the worker is idle again (or kill it)."""
        with contextlib.suppress(GenerationError):
            gen.worker.send(Abort(gen.seq))

        async def drain() -> None:
            while True:
                item = await gen.queue.get()
                if isinstance(item, (BaseException, FinishEvent)):
                    return

        try:
            await asyncio.wait_for(drain(), self.ABORT_GRACE)
        except asyncio.TimeoutError:
            self._abort_overdue(gen)
            with contextlib.suppress(asyncio.TimeoutError):  # until its death is handled and a restart under way
                await asyncio.wait_for(drain(), REAP_TIMEOUT_S)

    # -- the worker ----------------------------------------------------------------------------------------
    async def _ensure_worker(self) -> _Worker:
        if self._closed:
            raise GenerationError("the runtime was closed")
        worker = self._worker
        if worker is not None and worker.alive and worker.proc.poll() is not None:
            self._lost(worker)  # exited, and its socket's end not read yet: handle it now
        restart = self._restart
        if restart is not None and not restart.done():
            with contextlib.suppress(RKLLMError):
                await asyncio.shield(restart)
        worker = self._worker
        if worker is not None and worker.alive:
            self._attach(worker)
            return worker
        # No live worker and no restart under way (first use, or a restart that failed).
        spec, self._spec = self._spec, None
        worker = await self._spawn()
        if spec is not None:
            self._kv_len = await self._call(worker, "load", spec)
            self._spec = spec
        return worker

    async def _spawn(self) -> _Worker:
        worker = await asyncio.to_thread(self._spawn_blocking)
        self._worker = worker
        self._attach(worker)
        return worker

    def _attach(self, worker: _Worker) -> None:
        """Read the worker's socket on the running loop (again, if a previous loop has ended)."""
        loop = asyncio.get_running_loop()
        if worker.loop is loop:
            return
        worker.detach()
        worker.loop = loop
        loop.add_reader(worker.fd, self._on_readable, worker)

    def _spawn_blocking(self) -> _Worker:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        cmd = [self.python, "-m", "exo_rkllm.runtime.native.worker", "--fd", str(child_sock.fileno())]
        try:
            proc = subprocess.Popen(cmd, pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL, env=env)
        except OSError as exc:
            parent_sock.close()
            child_sock.close()
            raise RuntimeUnavailable(f"cannot start the RKLLM runtime worker ({self.python}): {exc}") from exc
        child_sock.close()
        conn = Connection(parent_sock.detach())
        worker = _Worker(proc, conn)
        try:
            conn.send(Configure(self.identity, self.settings))
            if not conn.poll(self.START_TIMEOUT):
                raise RuntimeUnavailable(f"the RKLLM runtime worker did not start within {self.START_TIMEOUT:.0f} s")
            hello = conn.recv()
        except (EOFError, OSError) as exc:
            worker.kill()
            rc = proc.wait()
            worker.close()
            raise RuntimeUnavailable(f"the RKLLM runtime worker {describe_exit(rc)} while loading "
                                     f"{self.identity.path}") from exc
        except RuntimeUnavailable:
            worker.kill()
            proc.wait()
            worker.close()
            raise
        if not isinstance(hello, Hello) or hello.error is not None:
            worker.close()
            worker.wait(REAP_TIMEOUT_S)
            if isinstance(hello, Hello) and hello.error is not None:
                raise hello.error.exception()
            raise RuntimeUnavailable(f"the RKLLM runtime worker answered {hello!r}")
        log.info("RKLLM runtime %s (%s) running in worker process %d", self.identity.version, self.identity.path,
                 proc.pid)
        return worker

    def _on_readable(self, worker: _Worker) -> None:
        """The worker's socket is readable (on the loop): every message waiting, or its end."""
        try:
            while worker.alive and worker.conn.poll(0):
                msg = worker.conn.recv()
                try:
                    self._on_message(worker, msg)
                except Exception:  # noqa: BLE001 - one bad message must not stop the reading
                    log.exception("handling a message from the RKLLM runtime worker failed")
        except (EOFError, OSError):
            self._lost(worker)
        except Exception:  # noqa: BLE001 - undecodable: the stream is unusable, treat as lost
            log.exception("bad message from the RKLLM runtime worker (pid %d)", worker.pid)
            worker.kill()
            self._lost(worker)

    def _on_message(self, worker: _Worker, msg: Any) -> None:
        gen = self._gen
        if isinstance(msg, Token):
            if gen is not None and gen.seq == msg.seq:
                gen.queue.put_nowait(msg.event())
        elif isinstance(msg, Finished):
            if gen is not None and gen.seq == msg.seq:
                self._kv_len = msg.kv_len
                gen.queue.put_nowait(msg.event)
        elif isinstance(msg, Failed):
            if gen is not None and gen.seq == msg.seq:
                self._kv_len = msg.kv_len
                gen.queue.put_nowait(msg.error.exception())
        elif isinstance(msg, Reply):
            fut = worker.pending.pop(msg.seq, None)
            if fut is not None:
                _settle(fut, msg)

    def _lost(self, worker: _Worker) -> None:
        """The socket ended: the worker exited or died. Reap it, then tell whoever waits."""
        if not worker.alive:
            return
        worker.alive = False
        worker.detach()
        if worker.stopping:  # close() asked for this and reaps the process itself
            return
        code = worker.proc.poll()
        if code is not None:  # already gone: handle it at once
            worker.exit_code = code
            with contextlib.suppress(OSError):
                worker.conn.close()
            self._on_exit(worker)
            return
        task = asyncio.ensure_future(self._reap(worker))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # logged inside

    async def _reap(self, worker: _Worker) -> None:
        try:
            worker.exit_code = await asyncio.to_thread(worker.wait, REAP_TIMEOUT_S)
        finally:
            with contextlib.suppress(OSError):
                worker.conn.close()
            self._on_exit(worker)

    def _on_exit(self, worker: _Worker) -> None:
        expected = worker.stopping or self._closed
        how = worker.killed_because or describe_exit(worker.exit_code)
        spec = self._spec
        if expected:
            err: RKLLMError = GenerationError(f"the RKLLM runtime worker (pid {worker.pid}) was stopped")
        else:
            self.last_death = how
            self._kv_len = None
            log.error("the RKLLM runtime worker (pid %d) %s%s", worker.pid, how,
                      "; restarting it" + (f" and reloading {spec.model_id}" if spec else ""))
            what = "stopped responding" if worker.killed_because else "crashed"
            err = GenerationError(
                f"the RKLLM runtime {what}: its worker process (pid {worker.pid}) {how}. exo is unaffected; the "
                "worker is being restarted" + (f" with {spec.model_id} reloaded" if spec else "") +
                ", so the next request can run")
        for fut in list(worker.pending.values()):
            if not fut.done():
                fut.set_exception(err)
        worker.pending.clear()
        gen = self._gen
        if gen is not None and gen.worker is worker:
            gen.queue.put_nowait(err)
        if not expected:
            self._schedule_restart(worker)

    def _schedule_restart(self, dead: _Worker) -> None:
        if self._closed or self._worker is not dead:
            return
        self._worker = None
        if self._restart is None or self._restart.done():
            self._restart = asyncio.ensure_future(self._restart_worker())
            self._restart.add_done_callback(self._restart_done)

    async def _restart_worker(self) -> None:
        """A new worker, with the model reloaded. `loaded` keeps naming the model meanwhile, so the
        scheduler does not load it a second time: its next call simply waits for this."""
        self.restarts += 1
        spec = self._spec
        try:
            worker = await self._spawn()
            if spec is not None:
                self._kv_len = await self._call(worker, "load", spec)
                log.info("RKLLM runtime worker restarted (pid %d) with %s reloaded", worker.pid, spec.model_id)
        except BaseException:
            if self._spec is spec:
                self._spec = None  # the scheduler will load it again (and see why it fails)
            raise

    def _restart_done(self, task: asyncio.Future[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("restarting the RKLLM runtime worker failed: %s (the next request tries again)", exc)

    async def _call(self, worker: _Worker, op: str, arg: Any = None) -> Any:
        if not worker.alive:
            raise GenerationError(f"the RKLLM runtime worker (pid {worker.pid}) {describe_exit(worker.exit_code)}")
        self._attach(worker)
        seq = next(self._seq)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        worker.pending[seq] = fut
        try:
            worker.send(Call(seq, op, arg))
        except GenerationError:
            worker.pending.pop(seq, None)
            raise
        return await fut
