"""The OpenAI chat handlers' overhead, old against new, through real exo nodes on the simulator.

The project replaced exo's own chat handler (patched by exo_rkllm/exo_glue/plugin.py up to the
baseline revision, 6a33347 by default) with its own handlers (exo_rkllm/api). This shows
whether that costs anything, on this machine, in one run:

  1. time to first token (TTFT): a streamed chat request, from sending it to the first
     chunk with non-empty `choices[0].delta.content` (the new handler sends a role-only
     chunk first: not counted), against the runtime's own first-token time (SimRuntime in
     this process, same pacing, same prompt token ids, cold cache). Simulator paced like an
     RK3588 (RKLLM_SIM_* below).
  2. exo-process CPU per generated token: a long answer (`[[sim:tokens=N]]`) at zero pacing,
     streamed and not, CPU from /proc/<pid>/stat (utime+stime, and cutime+cstime for reaped
     children) summed over the exo process tree, read before and after, divided by the
     tokens received. /proc counts in clock ticks (10 ms), so one sample is several requests.

Two nodes run side by side, the baseline source (a `git worktree` of --baseline-rev) and the
current source (this checkout's working tree, uncommitted changes included, or a worktree of
--current-rev), with the same environment, started by ExoProcess(source_root=...) under a
python that has legacy exo but not exo-rkllm; worktrees are removed at the end. The machine
is shared and noisy, so the nodes alternate round by round (and which goes first alternates
too); figures are median (min-max) over --rounds rounds. "role-only first chunk" shows which
handler answered (the new one opens with a role-only chunk, exo's does not); "answers =
runtime's" that each node ran the runtime's prompt; "idle exo CPU" what a node spends serving
nothing (part of every CPU sample, for both builds); the runtime's own CPU per token (in this
process) is part of exo's figure too, since the simulator runs inside the exo process.

Targets, for the current build: TTFT at most +10 ms over the runtime's own (median of the
per-round differences), CPU at most 300 µs per token (streamed and non-streamed medians).

Run:  python benchmarks/api_overhead.py [--exo-python PY] [--baseline-rev 6a33347] [--current-rev REV]
                                        [--rounds 5] [--tokens 200]
It exits non-zero only if an exo node could not be started. Nothing here is asserted by the tests.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import aiohttp  # noqa: E402

from exo_rkllm.bench.exo_process import ExoProcess, ExoUnavailable, process_tree  # noqa: E402
from exo_rkllm.bench.metrics import fmt_median_range  # noqa: E402
from exo_rkllm.models.catalog import Catalog  # noqa: E402
from exo_rkllm.config import Config  # noqa: E402
from exo_rkllm.models.demo import write_demo_model  # noqa: E402
from exo_rkllm.runtime.base import GenerationInput, ModelSpec, TokenEvent  # noqa: E402
from exo_rkllm.runtime.sim import SimRuntime, SimTiming  # noqa: E402
from exo_rkllm.models.tokenizer import load_tokenizer  # noqa: E402

MODEL = "qwen2.5-1.5b-instruct-demo"
TTFT_TARGET_MS = 10.0
CPU_TARGET_US = 300.0
TTFT_ANSWER_TOKENS = 4  # short answers: TTFT is what is measured, the rest only has to be read
CPU_TOKENS_PER_SAMPLE = 2000  # enough CPU per sample that /proc's 10 ms ticks are a few per cent

# RK3588-like pacing (the Config defaults, exo_rkllm/config.py: RKLLM_SIM_*); no load pacing,
# the model is loaded once by the warm-up and load time is not what is measured.
PACED = SimTiming(load_ms=0.0, prefill_base_ms=40.0, prefill_ms_per_token=8.0, decode_ms_per_token=125.0)
INSTANT = SimTiming.instant()


def sim_env(models: Path, timing: SimTiming) -> dict[str, str]:
    """The engine's settings, the same for both nodes of a pair."""
    return {"RKLLM_BACKEND": "sim", "RKLLM_MODELS_DIR": str(models),
            "RKLLM_SIM_LOAD_MS": f"{timing.load_ms:g}", "RKLLM_SIM_PREFILL_BASE_MS": f"{timing.prefill_base_ms:g}",
            "RKLLM_SIM_PREFILL_MS": f"{timing.prefill_ms_per_token:g}",
            "RKLLM_SIM_DECODE_MS": f"{timing.decode_ms_per_token:g}",
            "DEBUG": "0"}  # exo's own debug printing off, whatever this shell has


def default_exo_python() -> str:
    """The managed legacy-exo environment (tests/legacy_exo.py builds it): exo without exo-rkllm."""
    explicit = os.environ.get("EXO_RKLLM_LEGACY_EXO_ENV")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    env = Path(explicit).expanduser() if explicit else cache / "exo-rkllm" / "legacy-exo"
    return str(env / "bin" / "python")


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# -- the runtime alone ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawRun:
    ttft_s: float  # to the first token event with text
    text: str
    tokens: int
    cpu_s: float  # this process's CPU for the whole run


class RawRuntime:
    """SimRuntime in this process, fed the prompt ids exo's engine would feed it for the same messages."""

    def __init__(self, spec: ModelSpec, timing: SimTiming) -> None:
        self.spec, self.runtime = spec, SimRuntime(timing)
        self.tokenizer = load_tokenizer(spec.tokenizer_dir)
        self._runs = 0

    async def start(self) -> None:
        await self.runtime.load(self.spec)

    def prompt_ids(self, messages: list[dict[str, str]]) -> tuple[int, ...]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tuple(self.tokenizer.encode(text))

    async def run(self, messages: list[dict[str, str]]) -> RawRun:
        """One generation from a cold cache (keep_history off), as exo's first request of a prompt."""
        ids = self.prompt_ids(messages)
        self._runs += 1
        first, parts, count = None, [], 0
        cpu0, t0 = time.process_time(), time.perf_counter()
        async for event in self.runtime.generate(GenerationInput(f"raw-{self._runs}", ids)):
            if isinstance(event, TokenEvent):
                count += 1
                if event.text and first is None:
                    first = time.perf_counter() - t0
                parts.append(event.text)
        return RawRun(first if first is not None else float("nan"), "".join(parts), count,
                      time.process_time() - cpu0)


# -- exo's CPU from /proc ------------------------------------------------------------------------------

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of the process tree at `pid`: each process's utime+stime (all its threads, the
    exited ones too) plus cutime+cstime (its reaped children)."""
    ticks = 0
    for p in process_tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue  # gone in between
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on; comm may hold spaces
        ticks += sum(int(f) for f in fields[11:15])  # fields 14-17: utime stime cutime cstime
    return ticks * _TICK_S


# -- one node ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    ttft_s: float  # to the first non-empty content (nan: none came)
    text: str
    completion_tokens: int | None  # the answer's usage, where the handler gives it
    role_first: bool | None = None  # streamed: the first chunk is role-only (the new handler's way)


@dataclass
class Node:
    """One exo node running one source tree, and what was measured on it."""

    label: str
    source: Path
    exo: ExoProcess
    error: str | None = None
    ttft_s: list[float] = field(default_factory=list)
    ttft_over_raw_s: list[float] = field(default_factory=list)
    cpu_us: dict[str, list[float]] = field(default_factory=lambda: {"streamed": [], "non-streamed": []})
    idle_cpu_us_per_s: float | None = None
    mismatches: int = 0  # answers that differ from the runtime's for the same prompt
    answers: int = 0
    role_first: set[bool] = field(default_factory=set)  # which handler answered (see Reply.role_first)

    @property
    def up(self) -> bool:
        return self.error is None and self.exo.proc is not None and self.exo.proc.poll() is None


async def chat(session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]], stream: bool) -> Reply:
    t0 = time.perf_counter()
    async with session.post(f"{url}/v1/chat/completions",
                            json={"model": MODEL, "messages": messages, "stream": stream}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        if not stream:
            body = await resp.json()
            usage = body.get("usage") or {}
            return Reply(time.perf_counter() - t0, body["choices"][0]["message"].get("content") or "",
                         usage.get("completion_tokens"))
        first, parts, role_first = None, [], None
        async for raw in resp.content:  # to the end of the body: the old handler sends no [DONE]
            line = raw.decode("utf-8").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or []  # the new handler's usage chunk has none
            content = (choices[0].get("delta") or {}).get("content") if choices else None
            if role_first is None and choices:
                role_first = not content and (choices[0].get("delta") or {}).get("role") == "assistant"
            if content:
                if first is None:
                    first = time.perf_counter() - t0
                parts.append(content)
        return Reply(first if first is not None else float("nan"), "".join(parts), None, role_first)


async def start_nodes(nodes: list[Node]) -> None:
    """Start all nodes at once (exo takes a while to start); a node that fails keeps its reason."""
    async def one(node: Node) -> None:
        try:
            await node.exo.start()
        except ExoUnavailable as exc:
            node.error = str(exc)

    await asyncio.gather(*(one(n) for n in nodes))


async def warm_up(session: aiohttp.ClientSession, node: Node) -> None:
    """Load the model and run both code paths once, so no round pays a first-time cost."""
    try:
        for stream in (True, False):
            await chat(session, node.exo.url, user(f"warm-up {stream} [[sim:tokens=2]]"), stream)
    except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError, KeyError, ValueError) as exc:
        node.error = f"warm-up request failed: {exc!r} (log: {node.exo.log_path})"


def in_turns(nodes: list[Node], round_no: int) -> list[Node]:
    """The nodes that are up, the first one alternating with the round: neither always goes first."""
    live = [n for n in nodes if n.up]
    return live if round_no % 2 == 0 else live[::-1]


async def measure_ttft(session: aiohttp.ClientSession, nodes: list[Node], raw: RawRuntime, rounds: int) -> float:
    """Fills each node's TTFT figures; returns the runtime's median TTFT."""
    raw_ttft = []
    for i in range(rounds):
        messages = user(f"Round {i}: what does the NPU of an RK3588 do? [[sim:tokens={TTFT_ANSWER_TOKENS}]]")
        own = await raw.run(messages)  # a new prompt each round: every node runs it from a cold cache
        raw_ttft.append(own.ttft_s)
        for node in in_turns(nodes, i):
            try:
                reply = await chat(session, node.exo.url, messages, stream=True)
            except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as exc:
                node.error = f"TTFT request failed: {exc!r} (log: {node.exo.log_path})"
                continue
            node.ttft_s.append(reply.ttft_s)
            node.ttft_over_raw_s.append(reply.ttft_s - own.ttft_s)
            node.answers += 1
            node.mismatches += reply.text != own.text
            if reply.role_first is not None:
                node.role_first.add(reply.role_first)
    return statistics.median(raw_ttft)


async def measure_cpu(session: aiohttp.ClientSession, nodes: list[Node], raw: RawRuntime, rounds: int,
                      tokens: int) -> list[float]:
    """Fills each node's CPU per token, streamed and not; returns the runtime's own CPU per token
    (in this process) for the same answers, for scale."""
    per_sample = max(1, -(-CPU_TOKENS_PER_SAMPLE // tokens))
    raw_cpu_us = []
    for i in range(rounds):
        for mode in ("streamed", "non-streamed"):
            prompts = [user(f"Round {i}, {mode} request {k}: tell me a long story. [[sim:tokens={tokens}]]")
                       for k in range(per_sample)]
            own = [await raw.run(m) for m in prompts]
            raw_cpu_us.append(sum(o.cpu_s for o in own) * 1e6 / max(1, sum(o.tokens for o in own)))
            for node in in_turns(nodes, i):
                assert node.exo.proc is not None
                pid = node.exo.proc.pid
                got = 0
                try:
                    before = tree_cpu_s(pid)
                    for messages, mine in zip(prompts, own):
                        reply = await chat(session, node.exo.url, messages, stream=mode == "streamed")
                        # tokens received: the runtime's count for the same prompt when the text is the
                        # same (the answer is a function of the context), else the handler's usage
                        same = reply.text == mine.text
                        node.answers += 1
                        node.mismatches += not same
                        got += mine.tokens if same else (reply.completion_tokens or mine.tokens)
                    await asyncio.sleep(0.05)  # let the node finish its bookkeeping of the last request
                    after = tree_cpu_s(pid)
                except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as exc:
                    node.error = f"CPU request failed: {exc!r} (log: {node.exo.log_path})"
                    continue
                node.cpu_us[mode].append((after - before) * 1e6 / max(1, got))
    return raw_cpu_us


async def idle_cpu(nodes: list[Node], seconds: float = 3.0) -> None:
    """Each node's CPU while it serves nothing (exo's own periodic work), in µs per second: part of
    every CPU sample, the same for both builds."""
    live = [n for n in nodes if n.up]
    before = {n.label: tree_cpu_s(n.exo.proc.pid) for n in live}  # type: ignore[union-attr]
    await asyncio.sleep(seconds)
    for n in live:
        n.idle_cpu_us_per_s = (tree_cpu_s(n.exo.proc.pid) - before[n.label]) * 1e6 / seconds  # type: ignore[union-attr]


# -- the baseline's source tree ------------------------------------------------------------------------


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def add_worktree(rev: str, parent: Path, role: str) -> tuple[Path, str]:
    """A detached worktree of `rev` under `parent`; returns it and the commit's short id."""
    commit = git("rev-parse", "--short", f"{rev}^{{commit}}")
    path = parent / f"{role}-{commit}"
    git("worktree", "add", "--detach", str(path), commit)
    return path, commit


def remove_worktree(path: Path) -> None:
    try:
        git("worktree", "remove", "--force", str(path))
    except subprocess.CalledProcessError:
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)


def current_label() -> str:
    head = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "exo_rkllm")
    return f"current {head}" + ("+uncommitted" if dirty else "")


# -- report --------------------------------------------------------------------------------------------


def fig(values: list[float], scale: float, spec: str) -> str:
    xs = [v * scale for v in values if v == v]  # nan: no content came
    return fmt_median_range(xs, spec) if xs else "n/a"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def report(paced: list[Node], instant: list[Node], raw_ttft_s: float | None, raw_cpu_us: list[float],
           rounds: int, tokens: int) -> None:
    labels = [n.label for n in paced]
    width = max(24, *(len(lb) + 2 for lb in labels))
    rows: list[tuple[str, list[str]]] = [
        ("TTFT through exo, ms", [fig(n.ttft_s, 1e3, ".1f") for n in paced]),
        ("TTFT over the runtime, ms", [fig(n.ttft_over_raw_s, 1e3, ".1f") for n in paced]),
        ("CPU/token streamed, µs", [fig(n.cpu_us["streamed"], 1, ".0f") for n in instant]),
        ("CPU/token non-streamed, µs", [fig(n.cpu_us["non-streamed"], 1, ".0f") for n in instant]),
        ("idle exo CPU, µs/s", [f"{n.idle_cpu_us_per_s:.0f}" if n.idle_cpu_us_per_s is not None else "n/a"
                                for n in instant]),
        ("role-only first chunk", [{frozenset({True}): "yes", frozenset({False}): "no"}.get(
            frozenset(n.role_first), "mixed" if n.role_first else "n/a") for n in paced]),
        ("answers = runtime's", [f"{n.answers - n.mismatches}/{n.answers}" for n in paced]),
        ("answers = runtime's (CPU)", [f"{n.answers - n.mismatches}/{n.answers}" for n in instant]),
    ]
    print(f"\nmedian (min-max) over {rounds} rounds; TTFT: streamed, {TTFT_ANSWER_TOKENS}-token answers, "
          f"RK3588 pacing; CPU: {tokens}-token answers at zero pacing, exo process tree (/proc), "
          f"{max(1, -(-CPU_TOKENS_PER_SAMPLE // tokens))} requests per sample")
    if raw_ttft_s is not None:
        print(f"runtime's own TTFT (SimRuntime in-process, same prompts): {raw_ttft_s * 1e3:.1f} ms median")
    if raw_cpu_us:
        print(f"runtime's own CPU per token (SimRuntime in-process, zero pacing, included in exo's): "
              f"{fmt_median_range(raw_cpu_us, '.0f')} µs")
    print()
    print(f"{'':30}" + "".join(f"{lb:>{width}}" for lb in labels))
    for name, cells in rows:
        print(f"{name:30}" + "".join(f"{c:>{width}}" for c in cells))

    cur_paced, cur_instant = paced[-1], instant[-1]
    ttft = statistics.median(cur_paced.ttft_over_raw_s) * 1e3 if cur_paced.ttft_over_raw_s else None
    cpu = [statistics.median(v) for v in cur_instant.cpu_us.values() if v]
    cpu_ok = None if len(cpu) < 2 else max(cpu) <= CPU_TARGET_US
    print(f"\ntargets for the {cur_paced.label} build:")
    print(f"  TTFT <= +{TTFT_TARGET_MS:.0f} ms over the runtime: "
          f"{'n/a' if ttft is None else f'{ttft:+.1f} ms'}  "
          f"{verdict(None if ttft is None else ttft <= TTFT_TARGET_MS)}")
    print(f"  CPU <= {CPU_TARGET_US:.0f} µs/token: "
          f"{' / '.join(f'{c:.0f}' for c in cpu) or 'n/a'} µs (streamed / non-streamed)  {verdict(cpu_ok)}")
    for n in paced + instant:
        if n.error:
            print(f"\n{n.label} ({'paced' if n in paced else 'zero pacing'}): {n.error}")


# -- main ----------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, sources: list[tuple[str, Path]], work: Path) -> int:
    """Both pairs of nodes, one after the other; `sources` is [(label, tree)], baseline first."""
    base = Config.from_env()
    models = work / "models"
    write_demo_model(models)
    spec = Catalog(base.with_(models_dir=models)).resolve(MODEL).spec(base)

    def pair(timing: SimTiming, tag: str) -> list[Node]:
        return [Node(label, src, ExoProcess(args.exo_python, sim_env(models, timing), work / f"exo-{tag}-{k}.log",
                                            node_id=f"bench-{tag}-{k}", source_root=src))
                for k, (label, src) in enumerate(sources)]

    print(f"exo python: {args.exo_python}")
    print("  ".join(f"{label}: {tree}" for label, tree in sources))
    timeout = aiohttp.ClientTimeout(total=300)

    async def measure_pair(timing: SimTiming, tag: str, announce: str, measure: Any) -> tuple[list[Node], Any]:
        """Start a baseline node and a current node with `timing`, warm both, measure, stop them."""
        nodes = pair(timing, tag)
        result = None
        try:
            await start_nodes(nodes)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                for n in nodes:
                    if n.up:
                        await warm_up(session, n)
                raw = RawRuntime(spec, timing)
                await raw.start()
                if any(n.up for n in nodes):
                    print(announce, flush=True)
                    result = await measure(session, nodes, raw)
        finally:
            await asyncio.gather(*(n.exo.stop() for n in nodes))
        return nodes, result

    async def cpu(session: aiohttp.ClientSession, nodes: list[Node], raw: RawRuntime) -> list[float]:
        await idle_cpu(nodes)
        return await measure_cpu(session, nodes, raw, args.rounds, args.tokens)

    paced, raw_ttft_s = await measure_pair(
        PACED, "paced", f"TTFT, RK3588 pacing (prefill {PACED.prefill_base_ms:g} ms + {PACED.prefill_ms_per_token:g} "
                        f"ms/token, decode {PACED.decode_ms_per_token:g} ms/token): {args.rounds} rounds ...",
        lambda session, nodes, raw: measure_ttft(session, nodes, raw, args.rounds))
    instant, raw_cpu_us = await measure_pair(
        INSTANT, "instant", f"CPU per token, zero pacing, {args.tokens}-token answers: {args.rounds} rounds ...", cpu)
    raw_cpu_us = raw_cpu_us or []
    report(paced, instant, raw_ttft_s, raw_cpu_us, args.rounds, args.tokens)
    failed = [n for n in paced + instant if n.exo.started_s is None]
    return 2 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exo-python", default=default_exo_python(),
                    help="a python with legacy exo but NOT exo-rkllm (default: the managed legacy-exo env)")
    ap.add_argument("--baseline-rev", default="6a33347", help="the revision with exo's own chat handler")
    ap.add_argument("--current-rev", help="measure this revision (a worktree of it) instead of the working tree")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=200, help="answer length of the CPU-per-token requests")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="exo-rkllm-api-overhead-"))
    rc = 2
    trees: list[Path] = []
    try:
        try:
            baseline, commit = add_worktree(args.baseline_rev, work, "baseline")
            trees.append(baseline)
            sources = [(f"baseline {commit}", baseline)]
            if args.current_rev:
                current, commit = add_worktree(args.current_rev, work, "current")
                trees.append(current)
                sources.append((f"current {commit}", current))
            else:
                sources.append((current_label(), ROOT))
        except subprocess.CalledProcessError as exc:
            print(f"cannot make a worktree: {exc.stderr.strip()}")
        else:
            rc = asyncio.run(run(args, sources, work))
        finally:
            for tree in trees:
                remove_worktree(tree)
    finally:
        if rc == 0:
            shutil.rmtree(work, ignore_errors=True)
        else:  # the exo logs say why a node failed
            print(f"\nexo logs kept in {work}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
