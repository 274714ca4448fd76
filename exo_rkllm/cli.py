"""`exo-rkllm`: set up, inspect and run the rkllm engine.

  exo-rkllm demo      write the simulator's demo model into the models folder
  exo-rkllm models    list the models folder as exo sees it (and why a model is broken)
  exo-rkllm doctor    check the runtime, the models and exo, and say what to fix
  exo-rkllm serve     start exo with the rkllm engine (same as python -m exo.main --inference-engine rkllm)
  exo-rkllm bench     run the benchmark suite (see README, Benchmarks)

Every setting is an environment variable (README, Configuration); the global
flags below override the most common ones for this command.
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

from . import __version__
from .config import Config
from .errors import RKLLMError


def legacy_exo_location() -> Path | None:
    """Where legacy exo is installed, or None (the unrelated PyPI 'exo' does not count)."""
    import importlib.util

    spec = importlib.util.find_spec("exo")
    if spec is None or not spec.origin:
        return None
    root = Path(spec.origin).parent
    return root if (root / "orchestration" / "node.py").exists() else None


def _config(args: argparse.Namespace) -> Config:
    return Config.from_env(models_dir=Path(args.models_dir).expanduser() if args.models_dir else None,
                           backend=args.backend)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import write_demo_model

    config = _config(args)
    print(f"writing the demo model into {config.models_dir} (Qwen2.5 tokenizer, simulator model file)...",
          flush=True)
    folder = write_demo_model(config.models_dir, force=args.force)
    print(f"ready: {folder}\nserve it with:  RKLLM_BACKEND=sim python -m exo.main --inference-engine rkllm "
          "--disable-tui")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .catalog import Catalog

    config = _config(args)
    entries = Catalog(config).refresh()
    if not entries:
        print(f"no models in {config.models_dir} (set RKLLM_MODELS_DIR, or run `exo-rkllm demo`)")
        return 1
    width = max(len(e.model_id) for e in entries)
    for e in entries:
        state = "ok" if e.ok else f"BROKEN: {e.problem}"
        file = e.model_file.name if e.model_file else "-"
        print(f"{e.model_id:<{width}}  ctx {e.context_len:>6}  layers {e.n_layers:>3}  {file}  {state}")
        if e.aliases:
            print(f"{'':<{width}}  aliases: {', '.join(e.aliases)}")
    return 0 if any(e.ok for e in entries) else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    import asyncio

    from .catalog import Catalog
    from .runtime.factory import create_runtime

    config = _config(args)
    problems = 0
    print(f"exo-rkllm {__version__}, Python {sys.version.split()[0]}")
    print(f"backend: {config.backend}   models: {config.models_dir}")
    try:
        runtime = asyncio.run(create_runtime(config))
        caps = runtime.capabilities
        print(f"[ok] runtime: {caps.backend} {caps.version}")
        asyncio.run(runtime.close())
    except RKLLMError as exc:
        problems += 1
        print(f"[!!] runtime: {exc}")
    entries = Catalog(config).refresh()
    servable = [e for e in entries if e.ok]
    for e in entries:
        print(f"[{'ok' if e.ok else '!!'}] model {e.model_id}" + ("" if e.ok else f": {e.problem}"))
    if not servable:
        problems += 1
        print(f"[!!] no servable model in {config.models_dir}: see README 'Model layout' or run `exo-rkllm demo`")
    legacy = legacy_exo_location()
    if legacy:
        hook = sys.modules.get("exo_rkllm._autoload")  # imported at start-up only by exo_rkllm.pth
        hooked = bool(hook and hook.active())
        print(f"[{'ok' if hooked else '!!'}] legacy exo found at {legacy}" +
              ("" if hooked else "; the exo_rkllm.pth hook is not active: reinstall exo-rkllm with pip"))
        problems += 0 if hooked else 1
    else:
        problems += 1
        print("[!!] legacy exo is not installed in this Python: see README 'Install' (it is not the PyPI 'exo')")
    print("all good" if not problems else f"{problems} problem(s) found")
    return 0 if not problems else 1


def cmd_serve(args: argparse.Namespace) -> int:
    """Run exo's own main module with our engine selected, in this process."""
    from . import plugin

    if args.backend:
        os.environ["RKLLM_BACKEND"] = args.backend
    if args.models_dir:
        os.environ["RKLLM_MODELS_DIR"] = str(Path(args.models_dir).expanduser())
    if legacy_exo_location() is None:
        print("exo-rkllm: legacy exo is not installed in this Python (the PyPI package named 'exo' is another "
              "project): see the README's 'Install and run'", file=sys.stderr)
        return 2
    plugin.install()
    exo_args = list(args.exo_args)
    if exo_args[:1] == ["--"]:
        exo_args = exo_args[1:]
    if "--inference-engine" not in exo_args:
        exo_args = ["--inference-engine", "rkllm", *exo_args]
    sys.argv = ["exo", *exo_args]
    runpy.run_module("exo.main", run_name="__main__")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from .bench.cli import main as bench_main
    except ImportError as exc:
        print(f"exo-rkllm: the benchmark suite is not available: {exc}", file=sys.stderr)
        return 2
    return int(bench_main(list(args.bench_args)) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exo-rkllm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"exo-rkllm {__version__}")
    parser.add_argument("--models-dir", help="models folder (RKLLM_MODELS_DIR)")
    parser.add_argument("--backend", choices=["auto", "native", "rkllama", "sim"], help="runtime (RKLLM_BACKEND)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="write the simulator's demo model")
    demo.add_argument("--force", action="store_true", help="rewrite it even if present")
    demo.set_defaults(func=cmd_demo)
    sub.add_parser("models", help="list models").set_defaults(func=cmd_models)
    sub.add_parser("doctor", help="check the setup").set_defaults(func=cmd_doctor)
    sub.add_parser("serve", help="start exo with the rkllm engine; the arguments after it go to exo",
                   add_help=False).set_defaults(func=cmd_serve)
    sub.add_parser("bench", help="run the benchmark suite; the arguments after it go to it",
                   add_help=False).set_defaults(func=cmd_bench)
    return parser


PASSTHROUGH = {"serve": "exo_args", "bench": "bench_args"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `serve` and `bench` hand everything after them, flags included, to exo / the benchmark.
    cut = next((i for i, a in enumerate(argv) if a in PASSTHROUGH), None)
    rest = argv[cut + 1:] if cut is not None else []
    args = build_parser().parse_args(argv[: cut + 1] if cut is not None else argv)
    if cut is not None:
        setattr(args, PASSTHROUGH[argv[cut]], rest)
    try:
        return int(args.func(args) or 0)
    except RKLLMError as exc:
        print(f"exo-rkllm: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
