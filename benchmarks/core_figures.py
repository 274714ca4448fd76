"""Figures of the core engine through a real exo, on the simulator paced like an RK3588.

  1. time to first token: through exo's API vs the runtime's own (same prompt, same pacing)
  2. 8 concurrent streaming requests: wall time vs the sum of their generations
  3. a client that disconnects mid-stream: how long until the next queued request starts
  4. per-request state left after many requests (GET /v1/rkllm/status)

Run:  python benchmarks/core_figures.py --exo-python /path/to/venv-with-exo/bin/python
It prints the figures and exits non-zero only if exo could not be started. Timing
figures depend on the machine; nothing here is asserted by the test suite.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from exo_rkllm.bench.exo_process import ExoProcess, ExoUnavailable
from exo_rkllm.bench.report import fmt_percent_change
from exo_rkllm.config import Config
from exo_rkllm.models.demo import write_demo_model
from exo_rkllm.runtime.base import GenerationInput, ModelSpec, TokenEvent
from exo_rkllm.runtime.sim import SimRuntime, SimTiming
from exo_rkllm.models.catalog import Catalog
from exo_rkllm.models.tokenizer import load_tokenizer

MODEL = "qwen2.5-1.5b-instruct-demo"


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


class RawRuntime:
    """The runtime alone, in this process, with the same pacing exo's engine uses."""

    def __init__(self, spec: ModelSpec, timing: SimTiming) -> None:
        self.spec, self.rt = spec, SimRuntime(timing)
        self.tok = load_tokenizer(spec.tokenizer_dir)

    async def start(self) -> None:
        await self.rt.load(self.spec)

    async def run(self, messages) -> tuple[float, float, str]:
        """(ttft s, total s, text) of one generation from a cold cache."""
        prompt = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tuple(self.tok.encode(prompt))
        t0 = time.monotonic()
        first, text = None, ""
        async for ev in self.rt.generate(GenerationInput("raw", ids)):
            if isinstance(ev, TokenEvent):
                first = first or time.monotonic() - t0
                text += ev.text
        return first or 0.0, time.monotonic() - t0, text


async def stream(session: aiohttp.ClientSession, url: str, messages, stop_after: int | None = None) -> dict:
    t0 = time.monotonic()
    first, text, chunks = None, "", 0
    async with session.post(f"{url}/v1/chat/completions",
                            json={"model": MODEL, "messages": messages, "stream": True}) as resp:
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            chunks += 1
            first = first or time.monotonic() - t0
            text += chunk["choices"][0]["delta"].get("content") or ""
            if stop_after and chunks >= stop_after:
                break
            if chunk["choices"][0]["finish_reason"]:
                break
    return {"ttft": first or 0.0, "total": time.monotonic() - t0, "text": text, "end": time.monotonic()}


async def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exo-python", default=sys.executable, help="Python with legacy exo and exo-rkllm")
    ap.add_argument("--repeat", type=int, default=5, help="TTFT samples")
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--requests", type=int, default=200, help="requests for the leftover-state check")
    args = ap.parse_args(argv)

    base = Config.from_env()
    timing = SimTiming(load_ms=base.sim_load_ms, prefill_base_ms=base.sim_prefill_base_ms,
                       prefill_ms_per_token=base.sim_prefill_ms, decode_ms_per_token=base.sim_decode_ms)
    models = Path(tempfile.mkdtemp(prefix="exo-rkllm-core-")) / "models"
    write_demo_model(models)
    spec = Catalog(base.with_(models_dir=models)).resolve(MODEL).spec(base)
    raw = RawRuntime(spec, timing)
    await raw.start()
    env = {"RKLLM_BACKEND": "sim", "RKLLM_MODELS_DIR": str(models)}
    exo = ExoProcess(args.exo_python, env, models.parent / "exo.log")
    try:
        await exo.start()
    except ExoUnavailable as exc:
        print(f"exo could not be started: {exc}")
        return 2
    print(f"simulated RK3588 pacing: decode {timing.decode_ms_per_token:.0f} ms/token, prefill "
          f"{timing.prefill_ms_per_token:.0f} ms/token + {timing.prefill_base_ms:.0f} ms")
    n = args.answer_tokens
    try:
        async with aiohttp.ClientSession() as s:
            await stream(s, exo.url, user("warm-up [[sim:tokens=2]]"))  # model load
            # 1. TTFT
            exo_ttft, raw_ttft = [], []
            for i in range(args.repeat):
                m = user(f"Question number {i}: what is an NPU? [[sim:tokens={n}]]")
                r = await raw.run(m)
                e = await stream(s, exo.url, m)
                assert e["text"] == r[2], "exo's text differs from the runtime's"
                raw_ttft.append(r[0])
                exo_ttft.append(e["ttft"])
            d = [e - r for e, r in zip(exo_ttft, raw_ttft)]
            print(f"\n1. time to first token, median of {args.repeat} (prompt ~30 tokens)")
            print(f"   runtime alone {statistics.median(raw_ttft)*1000:7.1f} ms")
            print(f"   through exo   {statistics.median(exo_ttft)*1000:7.1f} ms   "
                  f"(difference: median {statistics.median(d)*1000:.1f} ms, max {max(d)*1000:.1f} ms)")
            # 2. concurrency
            prompts = [user(f"Client {i} asks something different [[sim:tokens={n}]]") for i in range(8)]
            solo = [await raw.run(m) for m in prompts]
            t0 = time.monotonic()
            results = await asyncio.gather(*(stream(s, exo.url, m) for m in prompts))
            wall = max(r["end"] for r in results) - t0
            own = sum(1 for r, o in zip(results, solo) if r["text"] == o[2])
            total_gen = sum(o[1] for o in solo)
            print(f"\n2. 8 concurrent streaming requests of {n} tokens")
            print(f"   sum of their generations (runtime alone) {total_gen:6.2f} s")
            print(f"   wall time through exo                    {wall:6.2f} s   "
                  f"({fmt_percent_change(wall, total_gen)})")
            print(f"   clients that got exactly their own text: {own}/8")
            # 3. disconnect
            queued_ttft = (await raw.run(user("queued behind [[sim:tokens=4]]")))[0]
            gone = asyncio.create_task(stream(s, exo.url, user("abandon me [[sim:tokens=400]]"), stop_after=3))
            await asyncio.sleep(0.05)
            nxt = asyncio.create_task(stream(s, exo.url, user("queued behind [[sim:tokens=4]]")))
            left = (await gone)["end"]
            res = await nxt
            started = res["end"] - res["total"] + res["ttft"]  # when its first token arrived
            print("\n3. client disconnects after 3 tokens of a 400-token answer; another request waits")
            print(f"   first token of the waiting request {started - left:5.2f} s after the disconnect "
                  f"(its own prefill: {queued_ttft:.2f} s; so the NPU was free after "
                  f"{max(0.0, started - left - queued_ttft):.2f} s)")
            # 4. leftover state
            for i in range(args.requests):
                await stream(s, exo.url, user(f"r{i} [[sim:tokens=1]]"))
            async with s.get(f"{exo.url}/v1/rkllm/status") as r:
                status = await r.json()
            print(f"\n4. after {args.requests} more requests: streams={status['streams']} queued={status['queued']} "
                  f"running={status['running']} plugin={status['plugin']} engine={status['engine']}")
    finally:
        await exo.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
