"""exo's resident memory while a client cycles through many model folders, one request each.

Any client of exo's API may name any model folder; before RKLLM_MODEL_CACHE every folder named
kept its entry and its tokenizer for the life of the process. This starts a real legacy exo
(`python -m exo.main --inference-engine rkllm`, simulator backend, fast timing) on a models
folder holding --models copies of the demo model (separate folders, so separate tokenizers;
big files hard-linked), sends one non-streamed chat completion to each model in turn, and
reads exo's VmRSS from /proc after each answer.

Each variant is a copy of the code at a git revision (git archive into a temporary folder,
put first on exo's PYTHONPATH, so work in progress in the checkout is not measured), plus
extra environment:

    python benchmarks/model_cycling.py [--models 20] [--old REV] [--new REV] [--bound-off]

  old        --old REV (default: none), the code before the bound
  new        --new REV (default HEAD), RKLLM_MODEL_CACHE at its default
  bound off  --bound-off: the new code with RKLLM_MODEL_CACHE=100000 (nothing dropped)

Legacy exo comes from tests/legacy_exo.py (EXO_PYTHON, or the environment that
`python -m tests.legacy_exo build` made).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(1, str(Path(__file__).resolve().parent))

from memory import rss_mb  # noqa: E402

FAST_SIM = {"RKLLM_SIM_LOAD_MS": "50", "RKLLM_SIM_DECODE_MS": "5", "RKLLM_SIM_PREFILL_MS": "0.5",
            "RKLLM_SIM_PREFILL_BASE_MS": "5", "TRANSFORMERS_VERBOSITY": "error"}


def write_models(root: Path, n: int) -> list[str]:
    """`n` copies of the demo model, each in its own folder (files hard-linked: same bytes, own folder)."""
    from exo_rkllm.models.demo import write_demo_model

    source = root / "_demo"
    write_demo_model(source)
    demo = next(p for p in source.iterdir() if p.is_dir())
    models = root / "models"
    for i in range(n):
        shutil.copytree(demo, models / f"Cycle-Model-{i:02d}", copy_function=os.link)
    return [f"cycle-model-{i:02d}" for i in range(n)]


def export(rev: str, dest: Path) -> Path:
    """The tree of `rev` (exo_rkllm/ only is needed) in `dest`."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "exo_rkllm"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def chat(api: str, model: str, text: str) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}]}).encode()
    request = urllib.request.Request(f"{api}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=180) as r:
        answer = json.load(r)
    return answer["choices"][0]["message"]["content"]


def run_variant(python: str, code: Path, env: dict[str, str], models_root: Path, ids: list[str]) -> dict:
    from real_exo import start_exo

    full_env = {**FAST_SIM, **env, "PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))}
    where = subprocess.run([python, "-c", "import exo_rkllm; print(exo_rkllm.__file__)"],
                           env={**os.environ, **full_env}, capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(code)):
        raise SystemExit(f"exo would import exo_rkllm from {where!r}, not from {code}")
    with tempfile.TemporaryDirectory() as work:
        exo = start_exo(python, Path(work), models_root / "models", full_env)
        try:
            listed = {m["id"] for m in json.load(urllib.request.urlopen(f"{exo.api}/v1/models", timeout=30))["data"]}
            missing = set(ids) - listed
            if missing:
                raise SystemExit(f"exo does not list {sorted(missing)[:3]}...")
            ready = rss_mb(exo.proc.pid)
            after = []
            started = time.monotonic()
            for i, model in enumerate(ids):
                if not chat(exo.api, model, f"hello {i} [[sim:tokens=8]]"):
                    raise SystemExit(f"{model} gave an empty answer")
                after.append(rss_mb(exo.proc.pid))
            # the first model again: dropped by the bound, it must be built again and answer
            chat(exo.api, ids[0], "hello again [[sim:tokens=8]]")
            return {"ready": ready, "after": after, "again": rss_mb(exo.proc.pid),
                    "seconds": time.monotonic() - started}
        finally:
            exo.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--old", help="git revision of the code before the bound (a row 'old')")
    parser.add_argument("--new", default="HEAD", help="git revision of the code measured as 'new' (default HEAD)")
    parser.add_argument("--bound-off", action="store_true", help="also the new code with RKLLM_MODEL_CACHE=100000")
    args = parser.parse_args()
    from legacy_exo import find_exo_python

    python, why = find_exo_python()
    if python is None:
        raise SystemExit(f"needs legacy exo: {why}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ids = write_models(root, args.models)
        variants = []
        if args.old:
            variants.append((f"old ({args.old})", export(args.old, root / "old"), {}))
        new = export(args.new, root / "new")
        variants.append((f"new ({args.new}, default bound)", new, {}))
        if args.bound_off:
            variants.append((f"new ({args.new}), bound off", new, {"RKLLM_MODEL_CACHE": "100000"}))
        results = {label: run_variant(python, code, env, root, ids) for label, code, env in variants}
    print(f"exo VmRSS (MB), simulator, {args.models} model folders, one chat completion each ({python})\n")
    labels = list(results)
    print(f"{'after':>12} " + " ".join(f"{label:>32}" for label in labels))
    print(f"{'ready':>12} " + " ".join(f"{results[k]['ready']:32.0f}" for k in labels))
    for i in range(args.models):
        if i < 3 or (i + 1) % 5 == 0 or i == args.models - 1:
            print(f"{'model ' + str(i + 1):>12} " + " ".join(f"{results[k]['after'][i]:32.0f}" for k in labels))
    print(f"{'1st again':>12} " + " ".join(f"{results[k]['again']:32.0f}" for k in labels))
    print(f"{'growth':>12} " + " ".join(f"{results[k]['again'] - results[k]['ready']:+32.0f}" for k in labels))
    print(f"{'run (s)':>12} " + " ".join(f"{results[k]['seconds']:32.1f}" for k in labels))


if __name__ == "__main__":
    main()
