"""`exo-rkllm bench` / `benchmarks/bench.py`: one command from nothing to table, JSON and chart.

    exo-rkllm bench --sim                      # no board: simulator, runtime vs exo, overhead ratios
    exo-rkllm bench                            # a running exo at http://localhost:52415
    exo-rkllm bench --compare --start-exo      # on a board: raw runtime, then exo started for the run
    exo-rkllm bench --target rkllama --url http://localhost:8080 --model qwen2.5:3b
    exo-rkllm bench --sim --ring 3 --clients 6  # also a private ring of 3 nodes: concurrency, ring vs one node

Defaults: 1 warm-up then 3 repetitions of each prompt, a 10-turn conversation,
4 parallel clients. Answers are capped at 10 tokens with --sim (so the whole
comparison, exo included, finishes in under two minutes) and at 64 tokens
otherwise; `--max-tokens 0` measures full answers.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import os
import sys
import time
from pathlib import Path
from typing import Any

from exo_rkllm import __version__
from exo_rkllm.config import Config
from exo_rkllm.errors import RKLLMError
from exo_rkllm.bench import report as report_mod
from exo_rkllm.bench import results
from exo_rkllm.bench.exo_process import ExoProcess, ExoRing, ExoUnavailable, default_python
from exo_rkllm.bench.prompts import STANDARD_PROMPTS, PromptFileError, load_prompt_file
from exo_rkllm.bench.runner import BenchSettings, Progress, describe_host, now_iso, run_ring, run_target
from exo_rkllm.bench.targets import (ExoApiTarget, LocalModel, RkllamaTarget, RuntimeTarget, TargetError, TokenCounter,
                      resolve_local_model)

DEFAULT_EXO_URL = "http://localhost:52415"
SIM_MAX_TOKENS = 10
BOARD_MAX_TOKENS = 64


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="exo-rkllm bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--target", choices=("exo", "runtime", "rkllama"), default=None,
                   help="what to measure (default: exo; with --sim: runtime and exo, as --compare)")
    p.add_argument("--compare", action="store_true",
                   help="run the same prompts against the in-process runtime and through exo; print exo's overhead")
    p.add_argument("--sim", action="store_true",
                   help="use the simulated runtime (RKLLM_BACKEND=sim) with RK3588-like pacing; without --model, "
                        "the demo model; implies --compare --start-exo unless --target or --url is given")
    p.add_argument("--url", help=f"exo API URL (default {DEFAULT_EXO_URL}) or rkllama URL (default RKLLM_SERVER_URL)")
    p.add_argument("--start-exo", action="store_true",
                   help="start a private exo node with the rkllm engine for the run, and stop it afterwards")
    p.add_argument("--ring", type=int, default=0, metavar="N",
                   help="with --start-exo: also start a private ring of N exo nodes on loopback (same settings, "
                        "one discovery file listing all of them) and run the concurrency part through node 0's "
                        "API, reported next to the one node (aggregate tokens/s, wall time, TTFT). Off by default")
    p.add_argument("--exo-python", default=None,
                   help="interpreter that has exo installed, for --start-exo (default: this one)")
    p.add_argument("--model", help="model name in the models folder (or exo's model id for a remote exo)")
    p.add_argument("--models-dir", type=Path, help="models folder (default RKLLM_MODELS_DIR)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder for counting tokens (default: the model's)")
    p.add_argument("--prompts", type=Path, help="your own prompt file (JSON or `Category: prompt` lines)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per prompt (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up requests before measuring (default 1)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help=f"cap answers at N tokens (0 = no cap; default {SIM_MAX_TOKENS} with --sim, so the run ends in "
                        f"under two minutes, else {BOARD_MAX_TOKENS}). Reaches exo only when the bench starts it "
                        "(RKLLM_MAX_NEW_TOKENS): exo ignores max_tokens in requests; an rkllama server gets it as "
                        "num_predict only where the rkllama client can send options (the report says when not)")
    p.add_argument("--turns", type=int, default=10, help="multi-turn conversation length (0 to skip; default 10)")
    p.add_argument("--clients", type=int, default=4, help="parallel clients for the concurrency run (0 to skip)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder (default ./bench-results)")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--exo-start-timeout", type=float, default=240.0, help="seconds to wait for a started exo")
    return p


def _demo_models_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "exo-rkllm" / "bench-models"


def _sim_pacing(config: Config) -> str:
    tps = 1000 / config.sim_decode_ms if config.sim_decode_ms else float("inf")
    return (f"SIMULATED runtime paced like an RK3588 ({config.sim_decode_ms:g} ms/token decode = {tps:.1f} tok/s, "
            f"prefill {config.sim_prefill_base_ms:g} ms + {config.sim_prefill_ms:g} ms/token); not a board "
            "measurement")


def target_pacing(kind: str, section: dict[str, Any], config: Config, env: dict[str, Any]) -> str:
    """What paced one target's figures, as far as the bench knows it.

    Known only for what the bench ran itself with known settings: the in-process
    runtime, and an exo it started (with the same RKLLM_* settings). An exo or an
    rkllama server running elsewhere keeps its own settings, which the bench cannot see.
    """
    server = "unknown (the rkllama server's own hardware and settings)"
    meta = section.get("meta") or {}
    if kind == "rkllama" or (kind == "exo" and not meta.get("started_by_bench")):
        if kind == "rkllama":
            return server
        seen = f"; its engine reports the {meta['backend']} backend" if meta.get("backend") else ""
        return f"unknown (remote exo{seen})"
    backend = meta.get("backend") or config.backend  # what `auto` resolved to, when the target says
    if backend == "sim":
        return _sim_pacing(config)
    if backend == "rkllama":  # the engine runs on a server whose NPU and settings the bench cannot see
        return server
    return f"{env.get('soc') or 'this host'} ({backend} backend)"


_WHO = {"runtime": "the in-process runtime", "exo": "exo", "rkllama": "the rkllama server"}


def _pacing(sections: dict[str, Any], config: Config, env: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """The header's pacing line and the per-target facts behind it."""
    by_target = {k: target_pacing(k, s, config, env) if s.get("status") == "measured" else "not measured"
                 for k, s in sections.items()}
    groups: dict[str, list[str]] = {}
    for k, v in by_target.items():
        if v != "not measured":
            who = "exo started by the bench with the same settings" if k == "exo" and \
                (sections[k].get("meta") or {}).get("started_by_bench") else _WHO.get(k, k)
            groups.setdefault(v, []).append(who)
    if not groups:
        return "nothing measured", by_target
    if len(by_target) == 1:
        return next(iter(groups)), by_target
    return "; ".join(f"{v} — for {', '.join(who)}" for v, who in groups.items()), by_target


async def _run(args: argparse.Namespace, config: Config, local: LocalModel | None, counter: TokenCounter | None,
               kinds: list[str], settings: BenchSettings, out_dir: Path, stamp: str,
               progress: Progress) -> dict[str, Any]:
    sections: dict[str, Any] = {}
    for kind in kinds:
        if kind == "runtime":
            if local is None:
                sections["runtime"] = {"label": "runtime", "kind": "runtime", "status": "not measured",
                                       "reason": "no local model to load"}
                continue
            target: Any = RuntimeTarget(config, local, counter, max_new_tokens=settings.max_new_tokens)
            sections["runtime"] = await run_target(target, settings, counter, progress)
        elif kind == "rkllama":
            url = args.url or config.rkllama_url
            name = args.model or (local.spec.remote_name or local.model_id if local else None)
            if not name:
                sections["rkllama"] = {"label": "rkllama", "kind": "rkllama", "status": "not measured",
                                       "reason": "pass the server's model name with --model"}
                continue
            target = RkllamaTarget(url, name, counter, max_new_tokens=settings.max_new_tokens)
            sections["rkllama"] = await run_target(target, settings, counter, progress)
        else:  # exo
            model_id = local.model_id if local else args.model
            if not model_id:
                sections["exo"] = {"label": "exo API", "kind": "exo", "status": "not measured",
                                   "reason": "pass exo's model id with --model"}
                continue
            proc: ExoProcess | None = None
            url = args.url or DEFAULT_EXO_URL
            label = "exo API"
            if args.start_exo:
                proc = ExoProcess(args.exo_python or default_python(), _engine_env(config, settings),
                                  out_dir / f"exo-{stamp}.log", default_model=model_id)
                progress.say(f"starting exo with the rkllm engine ({config.backend} backend) under {proc.python} ...")
                try:
                    url = await proc.start(args.exo_start_timeout)
                except ExoUnavailable as exc:
                    sections["exo"] = {"label": "exo API", "kind": "exo", "status": "not measured", "reason": str(exc),
                                       "meta": {"python": proc.python, "log": str(proc.log_path)}}
                    progress.say(f"exo NOT measured: {exc}")
                    continue
                label = "exo API (started by the bench)"
                progress.say(f"exo is up at {url} after {proc.started_s:.1f} s (log: {proc.log_path})")
            target = ExoApiTarget(url, model_id, counter, label=label)
            if proc is not None:
                target.extra = {"started_by_bench": True, "python": proc.python, "start_s": proc.started_s,
                                "plugin_installed": proc.probe.has_plugin if proc.probe else None,
                                "log": str(proc.log_path), "engine_env": proc.env}
            try:
                sections["exo"] = await run_target(target, settings, counter, progress)
            finally:
                if proc is not None:
                    code = proc.proc.poll() if proc.proc is not None else None
                    await proc.stop()
            if proc is not None and code is not None:
                sections["exo"].setdefault("errors", []).append(
                    f"the exo process ended during the run (exit code {code}; a negative code is the signal that "
                    f"ended it, e.g. -15 = SIGTERM from outside the bench); see {proc.log_path}")
            if sections["exo"].get("status") != "measured" and proc is not None:
                sections["exo"].setdefault("reason", "")
                sections["exo"]["exo_log_tail"] = proc.log_tail(30)
    return sections


def _engine_env(config: Config, settings: BenchSettings) -> dict[str, str]:
    """The engine's settings for an exo the bench starts (one node or every node of a ring): this run's."""
    env = {"RKLLM_BACKEND": config.backend, "RKLLM_MODELS_DIR": str(config.models_dir),
           "RKLLM_MAX_NEW_TOKENS": str(settings.max_new_tokens or 0),
           "RKLLM_SIM_DECODE_MS": str(config.sim_decode_ms), "RKLLM_SIM_PREFILL_MS": str(config.sim_prefill_ms),
           "RKLLM_SIM_PREFILL_BASE_MS": str(config.sim_prefill_base_ms),
           "RKLLM_SIM_LOAD_MS": str(config.sim_load_ms)}
    if config.tokenizer_dir:
        env["RKLLM_TOKENIZER_DIR"] = str(config.tokenizer_dir)
    return env


async def _run_ring(args: argparse.Namespace, config: Config, model_id: str, counter: TokenCounter | None,
                    settings: BenchSettings, one_node: dict[str, Any], out_dir: Path, stamp: str,
                    progress: Progress) -> dict[str, Any]:
    """`--ring N`: start N nodes, run the concurrency part through node 0's API, stop them all.

    Run after the one node has been stopped, so the ring does not share the host with it, and with the
    one node's standard answers as the references of the own-answer check (the same prompts)."""
    n = args.ring
    label = f"ring of {n} exo nodes (started by the bench)"
    ring = ExoRing(args.exo_python or default_python(), _engine_env(config, settings), out_dir, n,
                   default_model=model_id, log_prefix=f"exo-{stamp}-ring")
    if one_node.get("status") != "measured":
        return {"label": label, "kind": "exo", "nodes": n, "status": "not measured",
                "reason": "the one-node exo run was not measured, so there is nothing to compare the ring with"}
    progress.say(f"starting a ring of {n} exo nodes ({config.backend} backend) under {ring.python} ...")
    try:
        url = await ring.start(args.exo_start_timeout)
    except ExoUnavailable as exc:
        progress.say(f"ring NOT measured: {exc}")
        return {"label": label, "kind": "exo", "nodes": n, "status": "not measured", "reason": str(exc),
                "meta": {"python": ring.python, "logs": [str(node.log_path) for node in ring.nodes]}}
    progress.say(f"the ring is up after {ring.started_s:.1f} s: node 0 at {url} (logs: "
                 f"{', '.join(str(node.log_path) for node in ring.nodes)})")
    target = ExoApiTarget(url, model_id, counter, label=label, status_urls=ring.urls)
    target.extra = {"started_by_bench": True, "python": ring.python, "start_s": ring.started_s,
                    "start_attempts": ring.attempts, "plugin_installed": ring.probe.has_plugin if ring.probe else None,
                    "engine_env": ring.env, "nodes": [{"node_id": node.node_id, "url": node.url,
                                                      "log": str(node.log_path)} for node in ring.nodes]}
    node_targets = [ExoApiTarget(node.url, model_id, counter, label=f"{label}, node {k}", status_urls=ring.urls)
                    for k, node in enumerate(ring.nodes)]
    try:
        section = await run_ring(target, node_targets, settings, counter, one_node.get("standard") or [], progress,
                                 settle=lambda: ring.wait_idle(model_id))
    finally:
        ended = {node.node_id: node.proc.poll() for node in ring.nodes if node.proc is not None}
        await ring.stop()
    for node_id, code in ended.items():
        if code is not None:
            section["errors"].append(f"exo node {node_id} ended during the run (exit code {code}); see its log")
    if section.get("status") != "measured" or any(c is not None for c in ended.values()):
        section["exo_log_tails"] = ring.log_tails(30)
    return section


def _notes(report: dict[str, Any], config: Config, settings: BenchSettings) -> list[str]:
    notes = []
    env = report["environment"]
    if config.backend == "sim":
        notes.append("simulated runtime: the figures show the simulator's RK3588-like pacing plus the real software "
                     "path (templating and tokenizing; through exo also its API, the engine and the scheduler), "
                     "not NPU speed")
    load = (env.get("loadavg_at_start") or [None])[0]
    if load is not None and env.get("cpus") and load > 0.5 * env["cpus"]:
        notes.append(f"the host was busy (load average {load} on {env['cpus']} CPUs): timings are noisy, trust "
                     "medians over single runs and ignore differences smaller than the spread")
    ring = report.get("ring") or {}
    if ring.get("nodes") and settings.clients < ring["nodes"]:
        notes.append(f"--clients {settings.clients} is fewer than the ring's {ring['nodes']} nodes: at most "
                     f"{settings.clients} of them work at once, so the ring cannot show its full throughput")
    t = report["targets"]
    rk = t.get("rkllama") or {}
    if rk.get("status") == "measured" and settings.max_new_tokens and not (rk.get("meta") or {}).get("max_new_tokens"):
        notes.append("rkllama: answers were not capped (the early API takes no limit, and the rkllama client sends "
                     "none): its response times are for full answers")
    if "runtime" in t and "exo" in t and t["exo"].get("status") == "measured" and t["runtime"].get("status") == "measured":
        for rt_row, exo_row in zip(t["runtime"]["standard"], t["exo"]["standard"]):
            a = (rt_row["summary"].get("completion_tokens") or {}).get("median")
            b = (exo_row["summary"].get("completion_tokens") or {}).get("median")
            if a is not None and b is not None and a != b:
                notes.append(f"{rt_row['category']}: exo answered {b:g} tokens, the runtime {a:g}: response times of "
                             "different lengths do not compare, tokens/s and TTFT still do")
                break
    return notes


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    t0 = time.monotonic()
    try:
        return _main(args, t0)
    except (RKLLMError, TargetError, PromptFileError) as exc:
        print(f"exo-rkllm bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("exo-rkllm bench: interrupted", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace, t0: float) -> int:
    if args.max_tokens is None:
        args.max_tokens = SIM_MAX_TOKENS if args.sim else BOARD_MAX_TOKENS
    for name in ("reps", "warmup", "max_tokens", "turns", "clients"):
        if getattr(args, name) < 0:
            raise TargetError(f"--{name.replace('_', '-')} must not be negative")
    if args.reps < 1:
        raise TargetError("--reps must be at least 1")
    overrides: dict[str, Any] = {}
    if args.sim:
        overrides["backend"] = "sim"
    if args.models_dir:
        overrides["models_dir"] = args.models_dir
    if args.sim and not args.model and not args.models_dir:
        from exo_rkllm.models.demo import write_demo_model

        overrides["models_dir"] = _demo_models_dir()
        write_demo_model(overrides["models_dir"])
    config = Config.from_env(**overrides)

    if args.compare:
        kinds = ["runtime", "exo"]
    elif args.target:
        kinds = [args.target]
    elif args.sim and not args.url:
        kinds = ["runtime", "exo"]
    else:
        kinds = ["exo"]
    if args.sim and "exo" in kinds and not args.url:
        args.start_exo = True
    if args.start_exo and args.url:
        raise TargetError("--start-exo picks its own URL: drop --url")
    if args.ring:
        if args.ring < 2:
            raise TargetError("--ring N starts N exo nodes to compare with one: N must be at least 2")
        if "exo" not in kinds or not args.start_exo:
            raise TargetError("--ring compares a ring the bench starts with one exo node it starts: "
                              "add --start-exo (or --sim), and measure exo (not --target runtime or rkllama)")
        if not args.clients:
            raise TargetError("--ring measures the concurrency run: --clients must be at least 1")

    prompts = load_prompt_file(args.prompts) if args.prompts else STANDARD_PROMPTS
    settings = BenchSettings(prompts=prompts, prompts_source=str(args.prompts) if args.prompts else "standard",
                             reps=args.reps, warmup=args.warmup, max_new_tokens=args.max_tokens, turns=args.turns,
                             clients=args.clients, runtime_concurrency=kinds != ["runtime", "exo"])

    local: LocalModel | None = None
    try:
        local = resolve_local_model(config, args.model, settings.max_new_tokens)
    except TargetError as exc:
        if "runtime" in kinds:
            raise
        print(f"note: no local model ({exc}); counting tokens with "
              f"{'--tokenizer' if args.tokenizer else 'the server instead'}", file=sys.stderr)
    tok_dir = args.tokenizer or (local.tokenizer_dir if local else None)
    counter = TokenCounter.from_dir(tok_dir) if tok_dir else None

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir: Path = args.out
    progress = Progress(enabled=not args.quiet)
    env = describe_host()
    sections = asyncio.run(_run(args, config, local, counter, kinds, settings, out_dir, stamp, progress))
    ring_section = None
    if args.ring:
        ring_section = asyncio.run(_run_ring(args, config, local.model_id if local else args.model, counter, settings,
                                             sections.get("exo") or {}, out_dir, stamp, progress))

    pacing, pacing_by_target = _pacing(sections, config, env)
    report: dict[str, Any] = {
        "schema": "exo-rkllm-bench/2",  # 2: paired All row, integrity, prompt-count sources
        "exo_rkllm_version": __version__,
        "date": now_iso(),
        "duration_s": 0.0,
        "argv": list(args.argv),
        "settings": settings.to_dict(),
        "model": {"model_id": local.model_id if local else args.model, "file": local.spec.path.name if local else None,
                  "resolved_by": local.source if local else None, "tokenizer": counter.source if counter else None,
                  "max_context_len": local.spec.max_context_len if local else None},
        "backend": config.backend,
        "pacing": pacing,
        "pacing_by_target": pacing_by_target,
        "environment": env,
        "targets": sections,
        "definitions": report_mod.DEFINITIONS,
    }
    rt, exo = sections.get("runtime"), sections.get("exo")
    if rt and exo:
        if rt.get("status") == "measured" and exo.get("status") == "measured":
            report["comparison"] = results.compare_sections(rt["standard"], exo["standard"])
            if exo.get("concurrency"):
                report["comparison"]["concurrency"] = results.concurrency_baseline(rt["standard"], exo["concurrency"])
        else:
            missing = [k for k, s in (("runtime", rt), ("exo", exo)) if s.get("status") != "measured"]
            report["comparison_reason"] = f"{' and '.join(missing)} not measured: " + "; ".join(
                str(s.get("reason") or "; ".join(s.get("errors", []))) for k, s in (("runtime", rt), ("exo", exo))
                if k in missing)
    if ring_section is not None:
        report["ring"] = ring_section
        report["ring_comparison"] = results.ring_comparison(
            (sections.get("exo") or {}).get("concurrency"), ring_section.get("concurrency"), args.ring,
            ring_section.get("served_by"))
    report["integrity"] = {k: report_mod.integrity_line(s.get("integrity")) for k, s in sections.items()
                           if s.get("status") == "measured"}
    if ring_section is not None and ring_section.get("integrity"):
        report["integrity"]["ring"] = report_mod.integrity_line(ring_section["integrity"])
    report["notes"] = _notes(report, config, settings)
    report["duration_s"] = time.monotonic() - t0

    base = out_dir / f"bench-{stamp}"
    md_path = report_mod.write_markdown(report, base.with_suffix(".md"))
    json_path = report_mod.write_json(report, base.with_suffix(".json"))
    png_msg = "skipped (--no-chart)" if args.no_chart else report_mod.write_png(report, base.with_suffix(".png"))
    print(report_mod.render_markdown(report))
    print(f"wrote {md_path}\nwrote {json_path}")
    print(f"PNG: {png_msg}" if png_msg else f"wrote {base.with_suffix('.png')}")
    measured = [k for k, s in sections.items() if s.get("status") == "measured"]
    for k, s in [*sections.items(), *([("ring", ring_section)] if ring_section is not None else [])]:
        if s.get("status") != "measured":
            print(f"{k}: NOT MEASURED: {s.get('reason') or '; '.join(s.get('errors', []))}", file=sys.stderr)
    return 0 if measured else 1


if __name__ == "__main__":
    raise SystemExit(main())
