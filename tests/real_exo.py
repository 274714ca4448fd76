"""Start a real legacy exo (`python -m exo.main --inference-engine rkllm`) for integration tests.

exo is not a dependency of this project (the PyPI 'exo' is another project);
tests/legacy_exo.py finds a Python with legacy exo (EXO_PYTHON, this one, or the
environment `python -m tests.legacy_exo build` made) and layers this checkout on
it; without one, these tests are skipped with the reason, and the test run's
summary line says so.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from exo_rkllm.bench.exo_process import BIND_ERRORS, START_ATTEMPTS, free_port
from legacy_exo import find_exo_python


EXO_PYTHON, WHY = find_exo_python()
requires_exo = pytest.mark.skipif(EXO_PYTHON is None, reason=WHY)
# A module's `pytestmark` for tests that start a real exo: counted by the run's closing line, skipped with the reason.
REAL_EXO = [pytest.mark.real_exo, requires_exo]


class PortTaken(RuntimeError):
    """A port picked for exo was taken before exo bound it (free ports are only free when picked)."""


@dataclass
class ExoProcess:
    proc: subprocess.Popen
    api: str
    log: Path

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _capabilities(memory: int) -> dict:
    return {"model": "test", "chip": "test", "memory": memory, "flops": {"fp32": 0, "fp16": 0, "int8": 0}}


def _launch(python: str, workdir: Path, models_dir: Path, env_extra: dict[str, str], node_id: str, node_port: int,
            peers: Path, extra_args: list[str]) -> ExoProcess:
    api_port = free_port()
    env = {**os.environ, "RKLLM_BACKEND": "sim", "RKLLM_MODELS_DIR": str(models_dir), "HF_HUB_OFFLINE": "1",
           "EXO_HOME": str(workdir / f"exo-home-{node_id}"), "PYTHONUNBUFFERED": "1", **env_extra}
    log = workdir / f"exo-{node_id}.log"
    proc = subprocess.Popen(
        [python, "-m", "exo.main", "--inference-engine", "rkllm", "--disable-tui", "--discovery-module", "manual",
         "--discovery-config-path", str(peers), "--node-id", node_id, "--node-port", str(node_port),
         "--chatgpt-api-port", str(api_port), *extra_args],
        cwd=workdir, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    return ExoProcess(proc, f"http://127.0.0.1:{api_port}", log)


def _wait_ready(nodes: list[ExoProcess], timeout: float, path: str = "/v1/models") -> None:
    deadline = time.monotonic() + timeout
    pending = list(nodes)
    while pending and time.monotonic() < deadline:
        for exo in list(pending):
            log = exo.log_text()
            if any(marker in log.lower() for marker in BIND_ERRORS):  # exo stays up without its API
                for node in nodes:
                    node.stop()
                raise PortTaken(f"a port was taken before exo bound it:\n{log[-1500:]}")
            if exo.proc.poll() is not None:
                raise RuntimeError(f"exo exited with {exo.proc.returncode}:\n{log[-3000:]}")
            try:
                with urllib.request.urlopen(f"{exo.api}{path}", timeout=2) as r:
                    if r.status == 200:
                        pending.remove(exo)
            except OSError:
                pass
        time.sleep(0.5)
    if pending:
        for exo in nodes:
            exo.stop()
        raise RuntimeError(f"exo did not answer within {timeout} s:\n{pending[0].log_text()[-3000:]}")


def start_ring(python: str, workdir: Path, models_dir: Path, n: int, env_extra: dict[str, str],
               extra_args: list[str] = (), timeout: float = 180.0) -> list[ExoProcess]:
    """n exo nodes on loopback that know each other (manual discovery), started in parallel; started
    again on other ports if one was taken in between (a few times)."""
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return _start_ring_once(python, workdir, models_dir, n, env_extra, extra_args, timeout)
        except PortTaken:
            if attempt == START_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _start_ring_once(python: str, workdir: Path, models_dir: Path, n: int, env_extra: dict[str, str],
                     extra_args: list[str], timeout: float) -> list[ExoProcess]:
    ports = [free_port() for _ in range(n)]
    ids = [f"rkllm-test-{p}" for p in ports]
    peers = workdir / "peers.json"
    peers.write_text(json.dumps({"peers": {i: {"address": "127.0.0.1", "port": p,
                                               "device_capabilities": _capabilities(16000 - 1000 * k)}
                                           for k, (i, p) in enumerate(zip(ids, ports))}}))
    nodes = [_launch(python, workdir, models_dir, env_extra, i, p, peers, list(extra_args)) for i, p in zip(ids, ports)]
    _wait_ready(nodes, timeout)
    return nodes


def start_exo(python: str, workdir: Path, models_dir: Path, env_extra: dict[str, str],
              extra_args: list[str] = (), timeout: float = 120.0) -> ExoProcess:
    return start_ring(python, workdir, models_dir, 1, env_extra, extra_args, timeout)[0]
