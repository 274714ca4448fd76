"""Start a private exo node for the benchmark, and stop it afterwards.

`--start-exo` exists so the whole path can be measured with one command, on a
board or on a laptop with the simulator, without touching a user's running
exo: the node gets free ports, a one-peer manual discovery config naming
itself (so it never waits for or joins other nodes), no TUI, and no hub
access. It runs under a chosen interpreter because exo's pins are old and it
often lives in its own virtualenv. If that interpreter cannot import exo, the
benchmark says so and goes on without the exo column instead of crashing.

Free ports are found by binding port 0 and closing the socket, and exo binds
them itself later: in between, another process can take one. So a start that
fails on a taken port is retried on fresh ports, a few times. A failed bind
shows as "address already in use" in exo's log (legacy exo then stays up
without its API: the error is in a task nobody awaits), or as the port
answering from a process that is not the exo we started.

`ExoRing` starts N such nodes that know each other (`--ring N`): one discovery file lists them
all, each keeps its own folder (EXO_HOME) and saved KV states (RKLLM_CACHE_DIR, per board as on
real boards), and a port taken on any node restarts the whole ring on fresh ports, since every
node's discovery file names every port.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import exo_rkllm
from exo_rkllm.exo_glue.exo_env import probe_command

# Used when the chosen interpreter has exo but not exo-rkllm installed (a development
# checkout): put the source tree on the path and run the line its own .pth file runs at
# start-up (the import hook; a tree of another revision may name another module), then run
# exo exactly as `python -m exo.main` would.
HOOK_FILE = "exo_rkllm.pth"


def boot_line(source_root: Path) -> str:
    hook = (Path(source_root) / HOOK_FILE).read_text().strip()
    return f"import runpy, sys; {hook}; runpy.run_module('exo.main', run_name='__main__', alter_sys=True)"


class ExoUnavailable(RuntimeError):
    """exo cannot be started here; the message says why and what to do."""


class PortTaken(ExoUnavailable):
    """A port picked for exo was taken before exo could bind it: worth another try on other ports."""


# What a failed bind looks like in exo's log (aiohttp's OSError, grpc's "Failed to bind").
BIND_ERRORS = ("address already in use", "errno 98", "errno 48", "eaddrinuse", "failed to bind")
START_ATTEMPTS = 3


@dataclass(frozen=True)
class ExoProbe:
    python: str
    has_exo: bool
    has_plugin: bool  # exo-rkllm installed there with its .pth hook active
    python_version: str = ""


def probe_python(python: str, timeout_s: float = 60.0) -> ExoProbe:
    """Ask `python` whether it can import exo (and exo-rkllm), without importing exo.main (which would run it)."""
    try:
        out = subprocess.run(probe_command(python), capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ExoUnavailable(f"cannot run {python}: {exc}") from None
    if out.returncode != 0:
        raise ExoUnavailable(f"{python} failed: {out.stderr.strip()[-300:]}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return ExoProbe(python, bool(data["exo"]), bool(data["hooked"]), data.get("python", ""))


def discovery_config(peers: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """exo's manual-discovery file for nodes on loopback: each (node id, node port). Memory falls by
    1000 MB per node from 16000, so exo orders the nodes the same way on every node (the listing's)."""
    return {"peers": {node_id: {"address": "127.0.0.1", "port": port,
                                "device_capabilities": {"model": "bench", "chip": "bench", "memory": 16000 - 1000 * k,
                                                        "flops": {"fp32": 0, "fp16": 0, "int8": 0}}}
                      for k, (node_id, port) in enumerate(peers)}}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening_inodes(port: int) -> set[str] | None:
    """Socket inodes listening on TCP `port` (Linux /proc), or None where /proc cannot tell."""
    inodes: set[str] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f[9])
    return inodes if readable else None


def process_tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc/<pid>/task/<tid>/children."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except (OSError, ValueError):
            pass
    return pids


def owns_port(pid: int, port: int) -> bool | None:
    """Does process `pid` (or a child of it) listen on `port`? None when this system cannot tell."""
    inodes = _listening_inodes(port)
    if inodes is None or not Path(f"/proc/{pid}/fd").is_dir():
        return None
    for p in process_tree(pid):
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{p}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


@dataclass
class ExoProcess:
    """One exo node running our engine as a child process."""

    python: str
    env: dict[str, str]  # RKLLM_* settings for the engine (backend, models dir, pacing, caps)
    log_path: Path
    default_model: str | None = None
    api_port: int = 0
    node_port: int = 0
    node_id: str = "exo-rkllm-bench"
    # The exo-rkllm source tree to run instead of this checkout (another revision, e.g. a
    # `git worktree` of a baseline, to benchmark two builds side by side). It goes first on
    # PYTHONPATH, so it only works with a python that has exo but not exo-rkllm installed:
    # an installed exo-rkllm's start-up hook would load that one instead.
    source_root: Path | None = None
    # A discovery file listing other nodes too (a ring); None: a one-peer file naming this node.
    config_path: Path | None = None
    # This node's own folder (its cwd; EXO_HOME in it); None: a new temporary folder per start.
    work_dir: Path | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)
    started_s: float | None = None
    probe: ExoProbe | None = None
    attempts: int = 0  # starts tried by the last start() (more than 1: a picked port was taken)
    _log_start: int = field(default=0, repr=False)  # where this start's part of the log begins

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def command(self, config_path: Path, has_plugin: bool) -> list[str]:
        root = Path(self.source_root) if self.source_root is not None else Path(exo_rkllm.__file__).parent.parent
        head = [self.python, "-m", "exo.main"] if has_plugin else [self.python, "-c", boot_line(root)]
        args = ["--inference-engine", "rkllm", "--disable-tui", "--discovery-module", "manual",
                "--discovery-config-path", str(config_path), "--node-id", self.node_id,
                "--node-port", str(self.node_port), "--chatgpt-api-port", str(self.api_port)]
        if self.default_model:
            args += ["--default-model", self.default_model]
        return head + args

    def environment(self, probe: ExoProbe, work: Path) -> dict[str, str]:
        """The environment exo runs with: ours on top of this process's, and, when `probe.python`
        does not have exo-rkllm installed, the source tree to import it from first on PYTHONPATH
        (`source_root`, else this checkout).

        Raises ExoUnavailable for a `source_root` with a python that has exo-rkllm installed: its
        start-up hook would run the installed exo-rkllm, and the benchmark would quietly measure
        the wrong build."""
        env = {**os.environ, "EXO_HOME": str(work / "exo-home"), **self.env, "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        if self.source_root is not None and probe.has_plugin:
            raise ExoUnavailable(f"{probe.python} has exo-rkllm installed, so it cannot run the exo-rkllm source "
                                 f"tree {self.source_root}: use a python with legacy exo only")
        if not probe.has_plugin:
            root = Path(self.source_root) if self.source_root is not None else Path(exo_rkllm.__file__).parent.parent
            if not (root.resolve() / "exo_rkllm" / "__init__.py").is_file():
                raise ExoUnavailable(f"{root} is not an exo-rkllm source tree (no exo_rkllm/__init__.py)")
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root.resolve()), env.get("PYTHONPATH", "")) if p)
        return env

    async def start(self, timeout_s: float = 240.0, attempts: int = START_ATTEMPTS) -> str:
        """Start exo and wait until its API answers; returns its URL.

        Ports the caller did not choose are picked here, and picked again when exo could not
        bind them (another process took one in between): up to `attempts` starts."""
        probe = self.probe = await asyncio.to_thread(probe_python, self.python)
        if not probe.has_exo:
            raise ExoUnavailable(f"{self.python} cannot import exo (legacy exo-explore/exo): install it there, or "
                                 "point --exo-python at the interpreter of the virtualenv that has it")
        pick_api, pick_node = not self.api_port, not self.node_port
        self.attempts = 0
        while True:
            self.attempts += 1
            if pick_api:
                self.api_port = free_port()
            if pick_node:
                self.node_port = free_port()
            try:
                return await self._start_once(probe, timeout_s)
            except PortTaken as exc:
                if self.attempts >= attempts or not (pick_api or pick_node):
                    raise ExoUnavailable(f"{exc} (after {self.attempts} start(s))") from None

    async def _start_once(self, probe: ExoProbe, timeout_s: float) -> str:
        if self.work_dir is not None:
            work = Path(self.work_dir)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(tempfile.mkdtemp(prefix="exo-rkllm-bench-"))
        config_path = self.config_path
        if config_path is None:
            config_path = work / "peers.json"
            config_path.write_text(json.dumps(discovery_config([(self.node_id, self.node_port)])))
        env = self.environment(probe, work)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb" if self.attempts <= 1 else "ab")
        self._log_start = log.tell()
        if self.attempts > 1:
            log.write(f"\n--- exo-rkllm bench: start {self.attempts}, on ports {self.api_port}/{self.node_port} "
                      "(the previous ones were taken) ---\n".encode())
            log.flush()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.command(config_path, probe.has_plugin), env=env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(work),
                                     start_new_session=True)
        log.close()
        try:
            await self._wait_ready(timeout_s)
        except BaseException:
            await self.stop()
            raise
        self.started_s = time.monotonic() - t0
        return self.url

    async def _wait_ready(self, timeout_s: float) -> None:
        import aiohttp

        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    kind = PortTaken if self._bind_failed() else ExoUnavailable
                    raise kind(f"exo exited with code {self.proc.returncode} while starting; "
                               f"last log lines ({self.log_path}):\n{self.log_tail()}")
                bind_error = self._bind_failed()
                if bind_error:
                    raise PortTaken(f"exo could not bind one of its ports {self.api_port}/{self.node_port}: "
                                    f"{bind_error[-200:]} (log: {self.log_path})")
                try:
                    async with session.get(f"{self.url}/v1/models") as resp:
                        answered = resp.status == 200
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    answered = False
                if answered and self.proc is not None:
                    if await asyncio.to_thread(owns_port, self.proc.pid, self.api_port) is False:
                        raise PortTaken(f"port {self.api_port} answers, but not from the exo the bench started: "
                                        "another process took it")
                    return
                if time.monotonic() > deadline:
                    raise ExoUnavailable(f"exo did not answer on {self.url}/v1/models within {timeout_s:.0f} s; "
                                         f"last log lines ({self.log_path}):\n{self.log_tail()}")
                await asyncio.sleep(0.5)

    def _bind_failed(self) -> str | None:
        """The line of this start's part of the log that reports a port already in use, if any."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return None
        return next((ln.strip() for ln in text.splitlines() if any(e in ln.lower() for e in BIND_ERRORS)), None)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self, grace_s: float = 15.0) -> None:
        """SIGINT first (exo shuts its node down cleanly on it), then SIGTERM, then SIGKILL."""
        await stop_process_group(self.proc, grace_s)


RING_NODE_ID = "exo-rkllm-bench-{k}"


@dataclass
class ExoRing:
    """N exo nodes on loopback that know each other, running our engine with the same settings.

    Each node gets the same `env` (RKLLM_* settings) plus its own RKLLM_CACHE_DIR (saved KV states
    belong to a board: shared, a node could restore another's states and placement would measure
    nothing real), its own folder and EXO_HOME, free ports, and the one discovery file that lists
    all N nodes. They start together; the ring is up once every node's API answers and every node
    sees the N nodes up (the `ring` of /v1/rkllm/status, or /v1/topology for an engine without
    one). If any node fails, every node is stopped; a port taken on any node restarts the whole
    ring on fresh ports. Requests go to node 0's API (`url`)."""

    python: str
    env: dict[str, str]
    log_dir: Path
    size: int
    default_model: str | None = None
    source_root: Path | None = None  # as ExoProcess.source_root, for every node
    log_prefix: str = "exo-ring"
    nodes: list[ExoProcess] = field(default_factory=list)
    config_path: Path | None = None
    started_s: float | None = None
    probe: ExoProbe | None = None
    attempts: int = 0
    work_dir: Path | None = None  # this start's folder (the nodes' folders, saved states, discovery file)

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def plan(self, work: Path) -> list[ExoProcess]:
        """The nodes of one start: fresh distinct ports, a folder each, and the discovery file in `work`."""
        ports: list[int] = []
        while len(ports) < 2 * self.size:
            port = free_port()
            if port not in ports:
                ports.append(port)
        ids = [RING_NODE_ID.format(k=k) for k in range(self.size)]
        work.mkdir(parents=True, exist_ok=True)
        self.config_path = work / "peers.json"
        self.config_path.write_text(json.dumps(discovery_config(
            [(node_id, ports[2 * k + 1]) for k, node_id in enumerate(ids)])))
        return [ExoProcess(self.python, {**self.env, "RKLLM_CACHE_DIR": str(work / f"node{k}" / "kv-states")},
                           self.log_dir / f"{self.log_prefix}-node{k}.log", default_model=self.default_model,
                           api_port=ports[2 * k], node_port=ports[2 * k + 1], node_id=node_id,
                           source_root=self.source_root, config_path=self.config_path, work_dir=work / f"node{k}")
                for k, node_id in enumerate(ids)]

    async def start(self, timeout_s: float = 240.0, attempts: int = START_ATTEMPTS) -> str:
        """Start the N nodes and wait until they form the ring; returns node 0's URL.

        Raises ExoUnavailable (every node stopped) when a node cannot start, or the ring does not
        form within `timeout_s`."""
        if self.size < 1:
            raise ValueError("a ring has at least one node")
        probe = self.probe = await asyncio.to_thread(probe_python, self.python)
        if not probe.has_exo:
            raise ExoUnavailable(f"{self.python} cannot import exo (legacy exo-explore/exo): install it there, or "
                                 "point --exo-python at the interpreter of the virtualenv that has it")
        t0 = time.monotonic()
        self.attempts = 0
        while True:
            self.attempts += 1
            self.work_dir = Path(tempfile.mkdtemp(prefix="exo-rkllm-ring-"))
            self.nodes = self.plan(self.work_dir)
            for node in self.nodes:
                node.probe, node.attempts = probe, self.attempts  # a retry appends to each node's log
            try:
                await self._start_nodes(probe, timeout_s)
                await self._wait_ring(time.monotonic() + timeout_s)
            except PortTaken as exc:
                await self.stop()
                if self.attempts >= attempts:
                    raise ExoUnavailable(f"{exc} (after {self.attempts} start(s) of the ring)") from None
                continue
            except BaseException:
                await self.stop()
                raise
            self.started_s = time.monotonic() - t0
            return self.url

    async def _start_nodes(self, probe: ExoProbe, timeout_s: float) -> None:
        """Start every node at once; the first failure stops waiting for the others (the caller stops them)."""
        tasks = [asyncio.ensure_future(node._start_once(probe, timeout_s)) for node in self.nodes]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # a cancelled node stops itself
        failed = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
        if failed:
            taken = [e for e in failed if isinstance(e, PortTaken)]
            raise (taken or failed)[0]  # type: ignore[misc]

    async def _wait_ring(self, deadline: float) -> None:
        """Until every node sees the N nodes up: exo connects its peers a moment after its API is up."""
        import aiohttp

        if self.size == 1:
            return
        seen: list[int] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while True:
                seen = [await self._nodes_seen(session, node) for node in self.nodes]
                if all(n >= self.size for n in seen):
                    return
                for node in self.nodes:
                    if node.proc is not None and node.proc.poll() is not None:
                        raise ExoUnavailable(f"exo node {node.node_id} exited with code {node.proc.returncode} "
                                             f"while the ring formed; last log lines ({node.log_path}):\n"
                                             f"{node.log_tail()}")
                if time.monotonic() > deadline:
                    raise ExoUnavailable(f"the ring of {self.size} did not form: the nodes see {seen} nodes up; "
                                         f"last log lines of node 0 ({self.nodes[0].log_path}):\n"
                                         f"{self.nodes[0].log_tail()}")
                await asyncio.sleep(0.5)

    @staticmethod
    async def _nodes_seen(session: Any, node: ExoProcess) -> int:
        """How many nodes `node` sees up: its engine's ring rows, else exo's topology; 0 if it does not say."""
        import aiohttp

        try:
            async with session.get(f"{node.url}/v1/rkllm/status") as resp:
                status = await resp.json(content_type=None) if resp.status == 200 else {}
            ring = status.get("ring") if isinstance(status, dict) else None
            if isinstance(ring, dict):
                return sum(1 for row in ring.get("nodes") or [] if isinstance(row, dict) and row.get("up"))
            async with session.get(f"{node.url}/v1/topology") as resp:
                topology = await resp.json(content_type=None) if resp.status == 200 else {}
            return len((topology or {}).get("nodes") or {}) if isinstance(topology, dict) else 0
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            return 0

    async def wait_idle(self, model_id: str | None = None, timeout_s: float = 15.0) -> float | None:
        """Until every node sees every node idle (nothing running or waiting) with `model_id` loaded:
        the seconds it took, or None if it did not within `timeout_s`.

        A node hears of the others' states a moment after they change (exo_rkllm/exo_glue/ring.py), and
        places requests on what it has heard: right after requests end it still counts them, and would
        stack new ones where it knows best (itself). A measurement of an idle ring waits for this first."""
        import aiohttp

        t0 = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while True:
                views = [await self._ring_rows(session, node) for node in self.nodes]
                if all(len(rows) >= self.size and all(_idle(row, model_id) for row in rows) for rows in views):
                    return time.monotonic() - t0
                if time.monotonic() - t0 > timeout_s:
                    return None
                await asyncio.sleep(0.1)

    @staticmethod
    async def _ring_rows(session: Any, node: ExoProcess) -> list[dict[str, Any]]:
        import aiohttp

        try:
            async with session.get(f"{node.url}/v1/rkllm/status") as resp:
                status = await resp.json(content_type=None) if resp.status == 200 else {}
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            return []
        ring = status.get("ring") if isinstance(status, dict) else None
        return [row for row in (ring or {}).get("nodes") or [] if isinstance(row, dict)]

    async def stop(self, grace_s: float = 15.0) -> None:
        """Stop every node (at once), started or not, then remove the start's folder: the saved KV states
        of a real model are large, and each start has its own (the logs are kept, in `log_dir`)."""
        await asyncio.gather(*(node.stop(grace_s) for node in self.nodes))
        if self.work_dir is not None:
            await asyncio.to_thread(shutil.rmtree, self.work_dir, True)

    def log_tails(self, lines: int = 15) -> dict[str, str]:
        return {node.node_id: node.log_tail(lines) for node in self.nodes}


def _idle(row: dict[str, Any], model_id: str | None) -> bool:
    """A ring row (GET /v1/rkllm/status, `ring.nodes`) of a node that is up, idle, and holds `model_id`."""
    return bool(row.get("up")) and not row.get("load") and not row.get("running") and not row.get("waiting") \
        and (model_id is None or row.get("loaded") == model_id)


async def stop_process_group(proc: subprocess.Popen | None, grace_s: float = 15.0) -> None:
    """Stop the session a child was started in (it and anything it spawned): SIGINT, then SIGTERM,
    then SIGKILL, each given its time."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            await asyncio.to_thread(proc.wait, wait)
            return
        except subprocess.TimeoutExpired:
            continue


def default_python() -> str:
    return sys.executable
