"""The exo-rkllm command: demo model, models listing, doctor, argument hand-off to exo."""
from __future__ import annotations

import subprocess
import sys

from exo_rkllm import cli
from exo_rkllm.runtime.sim import write_sim_model


def test_demo_then_models_lists_it(tmp_path, capsys):
    models = tmp_path / "models"
    assert cli.main(["--models-dir", str(models), "demo"]) == 0
    assert cli.main(["--models-dir", str(models), "models"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-1.5b-instruct-demo" in out and "ok" in out and "ctx   4096" in out


def test_models_reports_broken_entries_and_fails_when_nothing_is_servable(tmp_path, capsys):
    (tmp_path / "Broken").mkdir()
    write_sim_model(tmp_path / "Broken" / "x.rkllm", "x")
    assert cli.main(["--models-dir", str(tmp_path), "models"]) == 1
    assert "BROKEN: missing tokenizer" in capsys.readouterr().out


def test_doctor_names_each_problem(tmp_path, capsys):
    code = cli.main(["--models-dir", str(tmp_path / "none"), "--backend", "sim", "doctor"])
    out = capsys.readouterr().out
    assert code == 1 and "[ok] runtime: sim" in out and "no servable model" in out


def test_serve_hands_every_argument_to_exo(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "cmd_serve", lambda args: seen.setdefault("args", args.exo_args) and 0)
    cli.main(["--backend", "sim", "serve", "--disable-tui", "--node-port", "5", "--models-dir", "x"])
    assert seen["args"] == ["--disable-tui", "--node-port", "5", "--models-dir", "x"]


def test_serve_without_exo_says_how_to_install_it(tmp_path):
    probe = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('exo'))"],
                           capture_output=True, text=True)
    if probe.stdout.strip() != "None":
        return  # exo is installed here: the real-exo tests cover serve's happy path
    out = subprocess.run([sys.executable, "-m", "exo_rkllm", "serve", "--disable-tui"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "legacy exo is not installed" in out.stderr
