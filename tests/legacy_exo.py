"""A legacy exo for the real-exo tests: build it once per machine, find it, layer this checkout on it.

exo cannot come from a package registry (the PyPI 'exo' is another project), so CI
cannot install it. Instead this module

- builds a virtual environment with legacy exo (git, commit 5f18faec1) and exo's
  pinned run-time dependencies (the `exo-deps` extra of setup.cfg), once per
  machine, in a place every clone of this repository finds
  (`python -m tests.legacy_exo build`, see `--help`);
- finds a Python that imports legacy exo: `EXO_PYTHON`, else this interpreter,
  else that managed environment;
- runs exo with *this checkout's* exo-rkllm, whatever that Python has installed:
  a throw-away overlay environment (no pip, a few files) whose site-packages
  holds exo-rkllm's own `exo_rkllm.pth` start-up hook, this checkout's path, and
  the exo Python's site-packages. exo itself runs unmodified
  (`python -m exo.main --inference-engine rkllm`), exactly as after
  `pip install exo-rkllm` next to it; the exo environment is never changed.
"""
from __future__ import annotations

import argparse
import configparser
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

EXO_COMMIT = "5f18faec1758ffa79d6db1d463b4b8bca211a0a8"
EXO_GIT_URL = "https://github.com/exo-explore/exo.git"
CHECKOUT = Path(__file__).resolve().parent.parent
HOOK_FILE = "exo_rkllm.pth"

# What a candidate interpreter reports: legacy exo importable, exo-rkllm's hook active, where exo_rkllm comes from.
PROBE = ("import importlib.util, pathlib, sys\n"
         "s = importlib.util.find_spec('exo')\n"
         "legacy = bool(s and s.origin and (pathlib.Path(s.origin).parent / 'orchestration' / 'node.py').exists())\n"
         "a = sys.modules.get('exo_rkllm.exo_glue.autoload')\n"  # imported at start-up only by the .pth hook
         "r = importlib.util.find_spec('exo_rkllm')\n"
         "print(int(legacy), int(bool(a and a.active())), r.origin if r else '-')\n")


def managed_env() -> Path:
    """Where `build` puts the environment: EXO_RKLLM_LEGACY_EXO_ENV, else the user's cache folder."""
    explicit = os.environ.get("EXO_RKLLM_LEGACY_EXO_ENV")
    if explicit:
        return Path(explicit).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "exo-rkllm" / "legacy-exo"


def _python_of(env: Path) -> Path:
    return env / "bin" / "python"


@dataclass(frozen=True)
class Probe:
    legacy_exo: bool
    hooked: bool
    exo_rkllm_origin: str

    @property
    def runs_this_checkout(self) -> bool:
        return self.hooked and self.exo_rkllm_origin.startswith(str(CHECKOUT / "exo_rkllm"))


def probe(python: str | Path) -> Probe | str:
    """What `python` offers, or why it cannot be run."""
    try:
        out = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {python}: {exc}"
    fields = out.stdout.split()
    if len(fields) != 3:
        return f"{python} failed to report on exo: {out.stderr.strip()[-500:]}"
    return Probe(fields[0] == "1", fields[1] == "1", fields[2])


@functools.lru_cache(maxsize=1)
def find_exo_python() -> tuple[str | None, str]:
    """(a Python that runs legacy exo with this checkout's exo-rkllm, '') or (None, why not); once per process."""
    explicit = os.environ.get("EXO_PYTHON")
    candidates = [explicit] if explicit else [sys.executable, str(_python_of(managed_env()))]
    reasons = []
    for candidate in candidates:
        if not Path(candidate).exists():
            reasons.append(f"{candidate} does not exist")
            continue
        found = probe(candidate)
        if isinstance(found, str):
            reasons.append(found)
            continue
        if not found.legacy_exo:
            reasons.append(f"{candidate} cannot import legacy exo")
            continue
        if found.runs_this_checkout:
            return candidate, ""
        try:
            return str(overlay(candidate)), ""
        except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
            reasons.append(f"cannot layer this checkout on {candidate}: {exc}")
    return None, ("; ".join(reasons) + ". Build one with `python -m tests.legacy_exo build` (from a clone of "
                  "exo-explore/exo with --exo PATH when offline), or point EXO_PYTHON at a Python with legacy exo")


def overlay(exo_python: str | Path) -> Path:
    """A Python whose site-packages layers this checkout's exo-rkllm (and its hook) over `exo_python`'s.

    Kept in the temp folder, keyed by both paths and the hook's text, and rebuilt when missing; it holds only a
    venv skeleton and three lines of .pth, so it is cheap and nothing of exo is copied."""
    site = subprocess.run([str(exo_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    # the hook's text is part of the key: a checkout whose hook line changed gets a fresh overlay
    hook = (CHECKOUT / HOOK_FILE).read_text()
    key = hashlib.sha256(f"{Path(exo_python).resolve()}|{CHECKOUT}|{hook}".encode()).hexdigest()[:12]
    root = Path(tempfile.gettempdir()) / f"exo-rkllm-overlay-{key}"
    python = _python_of(root)
    if not python.exists():
        tmp = root.with_name(root.name + f".{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([str(exo_python), "-m", "venv", "--without-pip", str(tmp)], check=True, timeout=120,
                       capture_output=True)
        own_site = subprocess.run([str(_python_of(tmp)), "-c",
                                   "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True, timeout=60).stdout.strip()
        # .pth files run in name order: '_' sorts before 'e', so the checkout is on sys.path
        # (ahead of anything exo's environment has) before exo-rkllm's own hook line runs.
        Path(own_site, "_exo_rkllm_checkout.pth").write_text(
            f"{CHECKOUT}\nimport site; site.addsitedir({site!r})\n")
        shutil.copy(CHECKOUT / HOOK_FILE, Path(own_site, HOOK_FILE))
        try:
            tmp.rename(root)
        except OSError:  # another test process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    found = probe(python)
    if isinstance(found, str) or not (found.legacy_exo and found.runs_this_checkout):
        raise RuntimeError(f"the overlay {root} does not run this checkout with legacy exo: {found}")
    return python


def exo_deps() -> list[str]:
    """The `exo-deps` extra of setup.cfg: exo's run-time dependencies, pinned (the one list of them)."""
    parser = configparser.ConfigParser()
    parser.read(CHECKOUT / "setup.cfg")
    lines = parser["options.extras_require"]["exo-deps"].splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def exo_requirement(source: str) -> str:
    """pip's name for legacy exo at EXO_COMMIT from a git URL or a local clone (bare or not)."""
    if Path(source).expanduser().exists():
        source = "file://" + str(Path(source).expanduser().resolve())
    return f"git+{source}@{EXO_COMMIT}"


def build(env: Path, source: str) -> Path:
    """Create `env` with legacy exo and its dependencies; exo-rkllm is layered on at test time."""
    if not shutil.which("git"):
        raise SystemExit("git is needed to install exo from its repository")
    print(f"building a legacy exo environment in {env} (exo {EXO_COMMIT[:9]} from {source})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    pip = [str(_python_of(env)), "-m", "pip", "install", "-q"]
    print("installing exo's dependencies (the exo-deps extra; a few minutes the first time)", flush=True)
    subprocess.run([*pip, *exo_deps()], check=True)
    print("installing legacy exo itself, without dependencies", flush=True)
    subprocess.run([*pip, "--no-deps", exo_requirement(source)], check=True, cwd=tempfile.gettempdir())
    found = probe(_python_of(env))
    if isinstance(found, str) or not found.legacy_exo:
        raise SystemExit(f"the environment was built but cannot import legacy exo: {found}")
    print(f"done: the real-exo tests now run with {_python_of(env)} (layered with the checkout under test)")
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.legacy_exo",
                                     description="Build or locate the legacy exo the real-exo tests run.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the managed legacy exo environment")
    b.add_argument("--exo", default=EXO_GIT_URL,
                   help=f"exo's git URL or a local clone holding commit {EXO_COMMIT[:9]} (default: {EXO_GIT_URL})")
    b.add_argument("--env", type=Path, default=None, help=f"where to build it (default: {managed_env()})")
    sub.add_parser("where", help="print the Python the real-exo tests would use, or why there is none")
    args = parser.parse_args(argv)
    if args.command == "build":
        build((args.env or managed_env()).expanduser(), args.exo)
        return 0
    python, why = find_exo_python()
    print(python or f"none: {why}")
    return 0 if python else 1


if __name__ == "__main__":
    sys.exit(main())
