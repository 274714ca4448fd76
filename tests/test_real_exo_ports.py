"""The real-exo harness picks free ports, and exo binds them later: a port taken in between must
cost a restart on other ports, not a three-minute wait for an API that never comes."""
from __future__ import annotations

import socket
import urllib.request

import real_exo
from real_exo import EXO_PYTHON, REAL_EXO, start_exo

pytestmark = REAL_EXO


def test_a_port_taken_before_exo_binds_it_is_retried_on_fresh_ports(tmp_path, demo_models_dir, monkeypatch):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        picks: list[int] = []
        original = real_exo.free_port

        def pick() -> int:
            port = taken if len(picks) == 1 else original()  # the first API port is the taken one
            picks.append(port)
            return port

        monkeypatch.setattr(real_exo, "free_port", pick)
        exo = start_exo(EXO_PYTHON, tmp_path, demo_models_dir, {}, timeout=120)
        try:
            with urllib.request.urlopen(f"{exo.api}/v1/models", timeout=10) as r:
                assert r.status == 200
            assert picks[1] == taken and f":{taken}" not in exo.api and len(picks) >= 4
        finally:
            exo.stop()
    first_log = next(p for p in tmp_path.glob("exo-*.log") if p != exo.log).read_text().lower()
    assert any(marker in first_log for marker in real_exo.BIND_ERRORS)
