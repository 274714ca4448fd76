"""The exo-rkllm command: demo model, models listing, doctor, argument hand-off to exo, and
`exo-rkllm serve` itself starting a real legacy exo (when one is found, see tests/legacy_exo.py)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from exo_rkllm import cli
from exo_rkllm.bench.exo_process import ExoProcess
from exo_rkllm.config import BACKENDS
from exo_rkllm.exo_glue.exo_env import legacy_exo_location
from exo_rkllm.runtime.sim import write_sim_model
from real_exo import EXO_PYTHON, requires_exo
from support import DEMO_ID


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


without_exo = pytest.mark.skipif(legacy_exo_location() is not None,
                                 reason="legacy exo is installed in this Python: test_serve_starts_exo_with_"
                                        "the_rkllm_engine covers serve with exo")


@without_exo
def test_serve_without_exo_says_how_to_install_it(tmp_path):
    out = subprocess.run([sys.executable, "-m", "exo_rkllm", "serve", "--disable-tui"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "legacy exo is not installed" in out.stderr


def test_the_backend_flag_offers_the_configs_backends():
    backend = next(a for a in cli.build_parser()._actions if a.dest == "backend")
    assert list(backend.choices) == list(BACKENDS)
    for name in BACKENDS:
        assert cli.build_parser().parse_args(["--backend", name, "models"]).backend == name


@without_exo
def test_serve_help_says_what_serve_does_even_without_exo():
    out = subprocess.run([sys.executable, "-m", "exo_rkllm", "serve", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.startswith("usage: exo-rkllm") and "serve [exo's arguments]" in out.stdout
    assert "--inference-engine rkllm" in out.stdout and "{" + ",".join(BACKENDS) + "}" in out.stdout
    assert out.returncode == 2 and "legacy exo is not installed" in out.stderr


# -- with a real legacy exo ----------------------------------------------------------------------------------
@pytest.mark.real_exo
@requires_exo
def test_serve_help_lists_rkllm_among_exos_engines(tmp_path):
    out = subprocess.run([EXO_PYTHON, "-m", "exo_rkllm", "serve", "--help"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())  # however argparse wraps it
    assert text.startswith("usage: exo-rkllm") and "exo's options:" in text
    assert "--chatgpt-api-port" in text  # exo's own options follow ours
    assert "--inference-engine INFERENCE_ENGINE Inference engine to use (mlx, tinygrad, dummy, or rkllm;" in text
    assert "(mlx, tinygrad, or dummy)" not in text


@dataclass
class ServedExo(ExoProcess):
    """The bench's private exo node, started the way a user starts it: `exo-rkllm serve`, with the
    engine's settings given as exo-rkllm's flags and no --inference-engine (serve adds it)."""

    cli_flags: list[str] = field(default_factory=list)  # exo-rkllm's own flags, before `serve`

    def command(self, config_path: Path, has_plugin: bool) -> list[str]:
        exo_command = super().command(config_path, has_plugin)
        exo_args = exo_command[exo_command.index("--inference-engine") + 2:]
        return [self.python, "-m", "exo_rkllm", *self.cli_flags, "serve", *exo_args]


@pytest.mark.real_exo
@requires_exo
async def test_serve_starts_exo_with_the_rkllm_engine(tmp_path, demo_model_dir):
    models = tmp_path / "models"
    shutil.copytree(demo_model_dir, models / demo_model_dir.name)
    (tmp_path / "empty").mkdir()
    # The environment says otherwise: only serve's own flags can make this start.
    proc = ServedExo(EXO_PYTHON, {"RKLLM_BACKEND": "auto", "RKLLM_MODELS_DIR": str(tmp_path / "empty"),
                                  "RKLLM_LIB_PATH": "/nonexistent/librkllmrt.so", "RKLLM_SERVER_PORT": "9"},
                     tmp_path / "exo.log", cli_flags=["--backend", "sim", "--models-dir", str(models)])
    try:
        await proc.start(timeout_s=240)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{proc.url}/v1/models") as resp:
                ids = [m["id"] for m in (await resp.json())["data"]]
            body = {"model": DEMO_ID, "messages": [{"role": "user", "content": "[[sim:text=served]]"}],
                    "max_tokens": 8}
            async with session.post(f"{proc.url}/v1/chat/completions", json=body) as resp:
                answer = await resp.json()
    finally:
        await proc.stop()
    assert ids == [DEMO_ID]
    assert answer["choices"][0]["message"]["content"] == "served", answer
    assert "RKLLM_BACKEND=sim: serving with the SIMULATED runtime" in proc.log_path.read_text(errors="replace")
