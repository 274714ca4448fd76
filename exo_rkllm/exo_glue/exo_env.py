"""Is legacy exo installed, and is exo-rkllm's import hook active: one answer for every caller.

`exo-rkllm doctor` and `exo-rkllm serve` ask about their own interpreter
(`legacy_exo_location`, `hook_active`). The benchmark asks another interpreter,
which may have exo but not exo-rkllm, by running this very file there
(`probe_command`: it prints `describe()` as JSON). So this module imports only
the standard library, and never imports exo itself (exo.main starts a node when
imported).

Legacy exo (exo-explore/exo, the Python project this plugin patches) is told
from the unrelated PyPI package also named `exo` by its orchestration/node.py.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

LEGACY_EXO_MARKER = ("orchestration", "node.py")  # inside the exo package: only legacy exo has it
HOOK_MODULE = "exo_rkllm.exo_glue.autoload"  # owns the import hook; imported at start-up by exo_rkllm.pth


def legacy_exo_location() -> Path | None:
    """The folder of the legacy exo package this interpreter would import, or None when there is
    none (exo not installed, or the PyPI project of the same name)."""
    try:
        spec = importlib.util.find_spec("exo")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for folder in spec.submodule_search_locations or ():
        if Path(folder, *LEGACY_EXO_MARKER).is_file():
            return Path(folder)
    return None


def hook_active() -> bool:
    """Whether exo-rkllm's import hook is registered in this interpreter (by exo_rkllm.pth at
    start-up, or by plugin.install()). Asked of the module that owns the hook, which is loaded
    whenever the hook is, so no caller needs to know how the hook is implemented."""
    autoload = sys.modules.get(HOOK_MODULE)
    return bool(autoload is not None and autoload.active())


def exo_rkllm_origin() -> str | None:
    """Where this interpreter imports exo_rkllm from (its __init__.py), or None."""
    try:
        spec = importlib.util.find_spec("exo_rkllm")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def describe() -> dict[str, Any]:
    """This interpreter, as the benchmark (or a test) running another one needs to know it."""
    exo = legacy_exo_location()
    return {"python": sys.version.split()[0], "exo": str(exo) if exo else None, "hooked": hook_active(),
            "exo_rkllm": exo_rkllm_origin()}


def probe_command(python: str) -> list[str]:
    """The command that makes `python` print `describe()` of itself as one JSON line. This file is
    run by path, so `python` needs neither exo_rkllm nor anything but the standard library."""
    return [python, "-c", "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')", str(Path(__file__))]


if __name__ == "__main__":
    print(json.dumps(describe()))
