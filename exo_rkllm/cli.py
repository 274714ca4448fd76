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
from typing import Any

from exo_rkllm import ENGINE_NAME, __version__
from exo_rkllm.config import BACKENDS, Config
from exo_rkllm.errors import RKLLMError
from exo_rkllm.exo_glue.exo_env import hook_active, legacy_exo_location


# What a route-only folder is (the catalog's ModelEntry.routable): not a broken model.
ROUTES_ONLY = ("routes only (no .rkllm file here: another board of the ring must have it; this node needs only "
               "the tokenizer files and Modelfile)")


def _config(args: argparse.Namespace) -> Config:
    return Config.from_env(models_dir=Path(args.models_dir).expanduser() if args.models_dir else None,
                           backend=args.backend)


def cmd_demo(args: argparse.Namespace) -> int:
    from exo_rkllm.models.demo import write_demo_model

    config = _config(args)
    print(f"writing the demo model into {config.models_dir} (Qwen2.5 tokenizer, simulator model file)...",
          flush=True)
    folder = write_demo_model(config.models_dir, force=args.force)
    print(f"ready: {folder}\nserve it with:  RKLLM_BACKEND=sim python -m exo.main --inference-engine rkllm "
          "--disable-tui")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from exo_rkllm.models.catalog import Catalog

    config = _config(args)
    entries = Catalog(config).refresh()
    if not entries:
        print(f"no models in {config.models_dir} (set RKLLM_MODELS_DIR, or run `exo-rkllm demo`)")
        return 1
    width = max(len(e.model_id) for e in entries)
    for e in entries:
        state = "ok" if e.ok else ROUTES_ONLY if e.routable else f"BROKEN: {e.problem}"
        file = e.model_file.name if e.model_file else "-"
        print(f"{e.model_id:<{width}}  ctx {e.context_len:>6}  layers {e.n_layers:>3}  {file}  {state}")
        if e.aliases:
            print(f"{'':<{width}}  aliases: {', '.join(e.aliases)}")
    return 0 if any(e.ok or e.routable for e in entries) else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    import asyncio

    from exo_rkllm.models.catalog import Catalog
    from exo_rkllm.runtime.factory import create_runtime

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
        detail = "" if e.ok else f": {ROUTES_ONLY}" if e.routable else f": {e.problem}"
        print(f"[{'ok' if e.ok or e.routable else '!!'}] model {e.model_id}{detail}")
    if not servable and any(e.routable for e in entries):
        print("[ok] no model runs on this board: it routes requests to the boards of the ring that have the "
              ".rkllm files")
    elif not servable:
        problems += 1
        print(f"[!!] no servable model in {config.models_dir}: see README 'Model layout' or run `exo-rkllm demo`")
    legacy = legacy_exo_location()
    if legacy:
        hooked = hook_active()  # by exo_rkllm.pth at start-up: this command never installs it itself
        print(f"[{'ok' if hooked else '!!'}] legacy exo found at {legacy}" +
              ("" if hooked else "; the exo_rkllm.pth hook is not active: reinstall exo-rkllm with pip"))
        problems += 0 if hooked else 1
    else:
        problems += 1
        print("[!!] legacy exo is not installed in this Python: see README 'Install' (it is not the PyPI 'exo')")
    print("all good" if not problems else f"{problems} problem(s) found")
    return 0 if not problems else 1


SERVE_USAGE = f"""\
usage: exo-rkllm [--models-dir DIR] [--backend {{{','.join(BACKENDS)}}}] serve [exo's arguments]

Start legacy exo in this process with the {ENGINE_NAME} inference engine: the same as
`python -m exo.main --inference-engine {ENGINE_NAME}` (`--inference-engine {ENGINE_NAME}` is added
unless given). Every argument after `serve` goes to exo. The engine's settings are environment
variables (README, Configuration); --models-dir and --backend before `serve` set two of them.
"""
# exo's own help lists only the engines exo ships; `serve --help` shows this one instead.
ENGINE_HELP = (f"Inference engine to use (mlx, tinygrad, dummy, or {ENGINE_NAME}; `exo-rkllm serve` uses "
               f"{ENGINE_NAME} unless told otherwise)")
HELP_FLAGS = ("-h", "--help")


def cmd_serve(args: argparse.Namespace) -> int:
    """Run exo's own main module with our engine selected, in this process."""
    from exo_rkllm.exo_glue import plugin

    if args.backend:
        os.environ["RKLLM_BACKEND"] = args.backend
    if args.models_dir:
        os.environ["RKLLM_MODELS_DIR"] = str(Path(args.models_dir).expanduser())
    exo_args = list(args.exo_args)
    if exo_args[:1] == ["--"]:
        exo_args = exo_args[1:]
    wants_help = any(a in HELP_FLAGS for a in exo_args)
    if wants_help:
        print(SERVE_USAGE, flush=True)
    if legacy_exo_location() is None:
        print("exo-rkllm: legacy exo is not installed in this Python (the PyPI package named 'exo' is another "
              "project): see the README's 'Install and run'", file=sys.stderr)
        return 2
    plugin.install()
    if wants_help:
        print("exo's options:", flush=True)
        return _print_exo_help()
    if "--inference-engine" not in exo_args:
        exo_args = ["--inference-engine", ENGINE_NAME, *exo_args]
    sys.argv = ["exo", *exo_args]
    runpy.run_module("exo.main", run_name="__main__")
    return 0


def _print_exo_help() -> int:
    """exo's --help, with its --inference-engine line naming this engine too.

    exo builds its argument parser when exo.main is imported, and prints the help while parsing,
    so the help text of that one option is replaced as the parser is built (a rewrite of the
    printed text would depend on how argparse wraps it)."""
    original = argparse.ArgumentParser.add_argument

    def add_argument(self: argparse.ArgumentParser, *names: Any, **kwargs: Any) -> Any:
        if "--inference-engine" in names:
            kwargs["help"] = ENGINE_HELP
        return original(self, *names, **kwargs)

    argparse.ArgumentParser.add_argument = add_argument  # type: ignore[method-assign]
    sys.argv = ["exo-rkllm serve", "--help"]
    try:
        runpy.run_module("exo.main", run_name="__main__")
    except SystemExit as exc:  # argparse exits once the help is printed
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    finally:
        argparse.ArgumentParser.add_argument = original  # type: ignore[method-assign]
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from exo_rkllm.bench.cli import main as bench_main
    except ImportError as exc:
        print(f"exo-rkllm: the benchmark suite is not available: {exc}", file=sys.stderr)
        return 2
    return int(bench_main(list(args.bench_args)) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exo-rkllm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"exo-rkllm {__version__}")
    parser.add_argument("--models-dir", help="models folder (RKLLM_MODELS_DIR)")
    parser.add_argument("--backend", choices=BACKENDS, help="runtime (RKLLM_BACKEND)")
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
