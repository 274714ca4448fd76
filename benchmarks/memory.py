"""Resident memory the engine adds: the tokenizer, the old way and the new way, and a loaded model.

Every figure comes from a fresh Python process (median of --runs, min-max), reading VmRSS
from /proc/self/status. transformers is imported before the first reading, as exo's own
process imports it (exo.inference.tokenizers), so the figures are what a model load adds,
not what an import costs.

Rows:
  baseline         python + transformers (+ exo_rkllm) imported, nothing loaded
  tokenizer, old   transformers' AutoTokenizer on the demo folder (what load_tokenizer did)
  tokenizer, new   exo_rkllm.models.tokenizer.load_tokenizer (LightTokenizer, freed heap returned)
  engine, old      the engine loading the demo model on the simulator (engine + scheduler +
                   tokenizer), with the old tokenizer path
  engine, new      the same with the new path
  + one answer     engine, new, after one answer through the engine (exo's node path)
  exo (--exo)      a real legacy exo process (`python -m exo.main --inference-engine rkllm`, simulator):
                   RSS once it answers /v1/models, then after two chat completions through its API

    python benchmarks/memory.py [--runs 3] [--python /path/to/exo/python] [--models-dir DIR] [--exo]

--python runs the children with another interpreter (legacy exo's environment, which
pins transformers 4.46.3); the repository is put on its PYTHONPATH.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES = ("baseline", "tokenizer-old", "tokenizer-new", "engine-old", "engine-new", "engine-answer")
LABELS = {"baseline": "baseline (transformers imported)", "tokenizer-old": "tokenizer, old (AutoTokenizer)",
          "tokenizer-new": "tokenizer, new (load_tokenizer)", "engine-old": "engine + model, old tokenizer path",
          "engine-new": "engine + model, new", "engine-answer": "engine + model, new, after one answer",
          "exo": "exo process, after two answers (vs ready)"}


def rss_mb(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


# -- child --------------------------------------------------------------------------------------
def child(mode: str, models_dir: Path) -> dict[str, float | str]:
    import gc

    from transformers import AutoProcessor, AutoTokenizer  # noqa: F401  (what exo imports)

    from exo_rkllm.models import tokenizer as tokmod

    if mode.startswith("engine"):
        sys.path.insert(0, str(ROOT / "tests"))
        # imported before the baseline: their import is not what a model load adds
        import exo_driver  # noqa: F401

        import exo_rkllm.engine.inference_engine  # noqa: F401
        import exo_rkllm.runtime.sim  # noqa: F401
    if mode.endswith("-old"):  # the path before: transformers for every folder, heap left as it is
        tokmod._load_light = lambda folder: None  # type: ignore[assignment]
        tokmod.release_freed_memory = lambda: None  # type: ignore[assignment]
    folder = next(p for p in models_dir.iterdir() if (p / "tokenizer.json").is_file())
    gc.collect()
    base = rss_mb()
    held: object = None  # what is measured stays alive until it is measured
    if mode == "tokenizer-old":
        held = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    elif mode == "tokenizer-new":
        held = tokmod.load_tokenizer(folder)
    elif mode.startswith("engine"):
        return asyncio.run(_engine(models_dir, base, answer=mode == "engine-answer"))
    gc.collect()
    return {"base": base, "after": rss_mb(), "kind": type(held).__name__ if held is not None else ""}


async def _engine(models_dir: Path, base: float, answer: bool) -> dict[str, float | str]:
    import gc

    from exo_driver import ExoRing, Shard

    from exo_rkllm.config import Config
    from exo_rkllm.engine.inference_engine import RKLLMInferenceEngine
    from exo_rkllm.runtime.sim import SimRuntime, SimTiming

    engine = RKLLMInferenceEngine(config=Config(backend="sim", models_dir=models_dir),
                                  runtime=SimRuntime(SimTiming.instant()))
    model_id = engine.catalog.servable()[0].model_id
    layers = engine.catalog.servable()[0].n_layers
    await engine.ensure_shard(Shard(model_id, 0, layers - 1, layers))
    scheduler = await engine._get_scheduler()
    for _ in range(600):
        if scheduler.runtime.loaded is not None:
            break
        await asyncio.sleep(0.05)
    else:
        raise RuntimeError("the simulator did not load the model")
    if answer:
        await ExoRing([engine]).complete(model_id, [{"role": "user", "content": "Hello, 世界 [[sim:tokens=64]]"}],
                                         layers)
    gc.collect()
    result = {"base": base, "after": rss_mb(), "kind": type(engine.tokenizer).__name__}
    await engine.shutdown()
    return result


# -- parent -------------------------------------------------------------------------------------
def run_child(python: str, mode: str, models_dir: Path) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run([python, __file__, "--child", mode, "--models-dir", str(models_dir)], env=env,
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def exo_process(models_dir: Path) -> dict[str, float]:
    """One real exo: RSS when ready, and after two answers (the model and its tokenizer loaded)."""
    import urllib.request

    sys.path.insert(0, str(ROOT / "tests"))
    from legacy_exo import find_exo_python
    from real_exo import start_exo

    python, why = find_exo_python()
    if python is None:
        raise SystemExit(f"--exo needs legacy exo: {why}")
    with tempfile.TemporaryDirectory() as tmp:
        exo = start_exo(python, Path(tmp), models_dir, {"TRANSFORMERS_VERBOSITY": "error"})
        try:
            time_ready = rss_mb(exo.proc.pid)
            model = json.load(urllib.request.urlopen(f"{exo.api}/v1/models", timeout=30))["data"][0]["id"]
            for i in range(2):
                body = json.dumps({"model": model, "messages": [{"role": "user", "content": f"hi {i}"}]}).encode()
                request = urllib.request.Request(f"{exo.api}/v1/chat/completions", body,
                                                 {"Content-Type": "application/json"})
                urllib.request.urlopen(request, timeout=180).read()
            return {"base": time_ready, "after": rss_mb(exo.proc.pid), "kind": ""}
        finally:
            exo.stop()


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):6.0f} MB ({min(values):.0f}-{max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--python", default=sys.executable, help="interpreter for the measured processes")
    parser.add_argument("--models-dir", type=Path, help="a models folder with the demo model (default: written)")
    parser.add_argument("--exo", action="store_true", help="also measure a real legacy exo process (tests/legacy_exo.py "
                        "finds it: EXO_PYTHON or the environment `python -m tests.legacy_exo build` made)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.models_dir)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = args.models_dir
        if models_dir is None:
            from exo_rkllm.models.demo import write_demo_model

            models_dir = Path(tmp)
            write_demo_model(models_dir)
        version = subprocess.run([args.python, "-c", "import transformers, tokenizers, sys; print("
                                  "sys.version.split()[0], transformers.__version__, tokenizers.__version__)"],
                                 capture_output=True, text=True).stdout.split()
        print(f"python {version[0]}, transformers {version[1]}, tokenizers {version[2]} ({args.python})")
        print(f"VmRSS of fresh processes, median of {args.runs} (min-max); 'added' is after minus the same "
              "process's baseline\n")
        print(f"{'':40} {'RSS':>22} {'added':>22}  tokenizer class")
        for mode in MODES + (("exo",) if args.exo else ()):
            if mode == "exo":
                results = [exo_process(models_dir) for _ in range(args.runs)]
            else:
                results = [run_child(args.python, mode, models_dir) for _ in range(args.runs)]
            after = [r["after"] for r in results]
            added = [r["after"] - r["base"] for r in results]
            print(f"{LABELS[mode]:40} {fmt(after):>22} {fmt(added) if mode != 'baseline' else '':>22}  "
                  f"{results[0]['kind']}")


if __name__ == "__main__":
    main()
