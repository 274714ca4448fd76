"""One answer to "is legacy exo here, is our hook active", whoever asks: the CLI in this
interpreter, the benchmark about another one (exo_rkllm/exo_glue/exo_env.py run there by path)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exo_rkllm.exo_glue import exo_env
from exo_rkllm import cli
from exo_rkllm.bench.exo_process import probe_python


def make_exo(root: Path, *, marker: bool, regular: bool = True) -> Path:
    """An importable package named `exo`: legacy exo's layout when `marker`, else the shape of the
    unrelated PyPI 'exo'; a namespace package (no __init__.py) unless `regular`."""
    pkg = root / "exo"
    pkg.mkdir(parents=True)
    if regular:
        (pkg / "__init__.py").write_text("")
    if marker:
        (pkg / "orchestration").mkdir()
        (pkg / "orchestration" / "node.py").write_text("raise RuntimeError('a probe must never import exo')\n")
    else:
        (pkg / "cli.py").write_text("")
    return pkg


def run_describe(pythonpath: list[Path], **env_extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EXO_RKLLM_AUTOLOAD")}
    env.update(PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath), **env_extra)
    out = subprocess.run(exo_env.probe_command(sys.executable), capture_output=True, text=True, env=env, timeout=60,
                         cwd=str(pythonpath[0]) if pythonpath else None)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


CASES = [("legacy", True, True), ("legacy-namespace", True, False), ("pypi-exo", False, True)]


@pytest.mark.parametrize("name,marker,regular", CASES)
def test_cli_and_benchmark_see_the_same_exo(tmp_path, monkeypatch, capsys, name, marker, regular):
    root = tmp_path / name
    pkg = make_exo(root, marker=marker, regular=regular)
    expected = pkg if marker else None
    # another interpreter, as the benchmark asks it
    described = run_describe([root])
    assert (described["exo"] and Path(described["exo"])) == expected
    monkeypatch.setenv("PYTHONPATH", str(root))
    assert probe_python(sys.executable).has_exo is bool(marker)
    # this interpreter, as `exo-rkllm doctor` asks it
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, "exo", raising=False)
    assert exo_env.legacy_exo_location() == expected
    cli.main(["--backend", "sim", "--models-dir", str(tmp_path / "no-models"), "doctor"])
    out = capsys.readouterr().out
    if marker:
        assert f"legacy exo found at {pkg}" in out
    else:
        assert "legacy exo is not installed in this Python" in out
    assert "exo" not in sys.modules  # looked for, never imported


def test_no_exo_at_all(tmp_path):
    assert run_describe([tmp_path])["exo"] is None


def test_the_hook_is_reported_by_the_module_that_owns_it(tmp_path):
    # A sitecustomize does what exo_rkllm.pth does at start-up: import the hook's module.
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "sitecustomize.py").write_text("import exo_rkllm.exo_glue.autoload\n")
    assert run_describe([boot])["hooked"] is True
    assert run_describe([boot], EXO_RKLLM_AUTOLOAD="off")["hooked"] is False
    assert run_describe([tmp_path], EXO_RKLLM_AUTOLOAD="0")["hooked"] is False


def test_the_probe_needs_nothing_but_the_standard_library(tmp_path):
    """The benchmark runs exo_env.py under exo's Python, which may not have exo_rkllm: the file
    must run where exo_rkllm cannot be imported at all (-S: no site-packages, no .pth hooks)."""
    make_exo(tmp_path, marker=True)
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(tmp_path)}
    command = exo_env.probe_command(sys.executable)
    out = subprocess.run([command[0], "-S", *command[1:]], capture_output=True, text=True, env=env, timeout=60,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["exo"] == str(tmp_path / "exo") and data["hooked"] is False and data["exo_rkllm"] is None
