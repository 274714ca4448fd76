"""The first person's wait with and without RKLLM_PRELOAD, through a real exo on the RK3588-paced simulator.

For each mode a fresh exo is started (RKLLM_PRELOAD unset, then `first`); once its API answers
(and, with preload, once /v1/rkllm/status says the model is loaded) one streamed chat request is
sent and its time to the first chunk with text is measured. Without preload that request pays the
model load (the simulator's RKLLM_SIM_LOAD_MS plus the tokenizer, as a board pays rkllm_init plus
the tokenizer); with preload exo's start-up paid it. It then prints what the lifecycle routes
answer (status, unload, load, /v1/models), for the README.

Run:  python benchmarks/preload_ttft.py [--exo-python PYTHON] [--runs N]
One run per mode by default; figures are medians with min-max over the runs. Nothing here is
asserted by the test suite.
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
from typing import Any

import aiohttp

from exo_rkllm.bench.exo_process import ExoProcess, ExoUnavailable, default_python
from exo_rkllm.config import Config
from exo_rkllm.models.demo import write_demo_model

MODEL = "qwen2.5-1.5b-instruct-demo"
MESSAGES = [{"role": "user", "content": "[[sim:tokens=16]] What does the NPU do?"}]


async def first_text_s(session: aiohttp.ClientSession, url: str) -> float:
    t0 = time.monotonic()
    async with session.post(f"{url}/v1/chat/completions",
                            json={"model": MODEL, "messages": MESSAGES, "stream": True}) as resp:
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                elapsed = time.monotonic() - t0
                async for _ in resp.content:  # read the rest: the request ends normally
                    pass
                return elapsed
    return float("nan")


async def wait_loaded(session: aiohttp.ClientSession, url: str, ceiling_s: float = 120.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < ceiling_s:
        async with session.get(f"{url}/v1/rkllm/status") as resp:
            if (await resp.json()).get("loaded_model") == MODEL:
                return time.monotonic() - t0
        await asyncio.sleep(0.05)
    raise TimeoutError("the preload did not finish")


async def show(session: aiohttp.ClientSession, method: str, url: str, path: str, body: Any = None) -> None:
    async with session.request(method, f"{url}{path}", json=body) as resp:
        answer = await resp.json()
    if path == "/v1/rkllm/status":
        answer = {k: answer.get(k) for k in ("loaded_model", "load", "keep_alive_s", "keep_alive_unloads")}
    elif path == "/v1/models":
        answer = {"data": [{k: m[k] for k in ("id", "ready", "status")} for m in answer["data"]]}
    print(f"  {method} {path}{' ' + json.dumps(body) if body is not None else ''} -> {resp.status} "
          f"{json.dumps(answer)}")


async def one_run(python: str, models: Path, preload: bool, routes: bool) -> tuple[float, float | None]:
    env = {"RKLLM_BACKEND": "sim", "RKLLM_MODELS_DIR": str(models)}
    if preload:
        env["RKLLM_PRELOAD"] = "first"
    exo = ExoProcess(python, env, models.parent / f"exo-{'preload' if preload else 'plain'}.log")
    await exo.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
            after_api = await wait_loaded(s, exo.url) if preload else None
            ttft = await first_text_s(s, exo.url)
            if routes:
                await show(s, "GET", exo.url, "/v1/rkllm/status")
                await show(s, "POST", exo.url, "/v1/rkllm/unload", {"model": MODEL})
                load = asyncio.ensure_future(show(s, "POST", exo.url, "/v1/rkllm/load", {"model": MODEL}))
                await asyncio.sleep(0.6)
                await show(s, "GET", exo.url, "/v1/models")
                await show(s, "GET", exo.url, "/v1/rkllm/status")
                await load
                await show(s, "POST", exo.url, "/v1/rkllm/load", {"model": "no-such-model"})
        return ttft, after_api
    finally:
        await exo.stop()


def fig(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f}, n={len(values)})"


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exo-python", default=default_python())
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    base = Config()
    models = Path(tempfile.mkdtemp(prefix="exo-rkllm-preload-")) / "models"
    write_demo_model(models)
    print(f"simulated RK3588 pacing: load {base.sim_load_ms:.0f} ms (+ the tokenizer), prefill "
          f"{base.sim_prefill_ms:.0f} ms/token + {base.sim_prefill_base_ms:.0f} ms, decode {base.sim_decode_ms:.0f} ms/token")
    plain: list[float] = []
    preloaded: list[float] = []
    ready_after: list[float] = []
    try:
        for run in range(args.runs):
            plain.append((await one_run(args.exo_python, models, False, False))[0])
            ttft, after = await one_run(args.exo_python, models, True, run == args.runs - 1)
            preloaded.append(ttft)
            ready_after.append(after or 0.0)
    except ExoUnavailable as exc:
        print(f"exo could not be started: {exc}")
        return 2
    print("first request's time to first text, exo freshly started:")
    print(f"  without RKLLM_PRELOAD:       {fig(plain)}")
    print(f"  with RKLLM_PRELOAD=first:    {fig(preloaded)}  (the preload finished {fig(ready_after)} after "
          "exo's API first answered)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
