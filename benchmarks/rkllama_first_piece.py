"""How long the rkllama backend takes from the server's first piece to exo's first token.

rkllama (Flask) sends its response headers together with the first piece, so whatever the
backend does between "the response opened" and "the first token is out" adds to every
request's time to first token. This script runs the backend against a server and prints that
gap, median [min-max] over the runs:

* against the fake server (tests/fake_rkllama, in this process, headers with the first piece
  as Flask sends them): gap = backend's first TokenEvent - the moment the fake wrote the piece;
* against a real rkllama (`--url`): no server-side clock, so the gap is the backend's first
  TokenEvent - the moment the answer opened (headers and first piece arrive together); the
  network and the HTTP client's parsing of the headers are not included.

Run:  python benchmarks/rkllama_first_piece.py [--runs 30] [--api ollama early] [--url URL --model NAME]
Run it with legacy exo's python to measure what exo's process pays (its transformers release
makes `len(tokenizer)` cost ~20-40 ms); PYTHONPATH=<an older checkout> measures older code.
The figures depend on the machine; nothing here is asserted by the test suite.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fake server of this checkout
sys.path.append(str(ROOT))  # exo_rkllm: this checkout unless PYTHONPATH names another

import exo_rkllm  # noqa: E402
from exo_rkllm.config import Config  # noqa: E402
from exo_rkllm.models.demo import DEMO_FILE, write_demo_model  # noqa: E402
from exo_rkllm.runtime.base import ChatMessage, GenerationInput, ModelSpec, TokenEvent  # noqa: E402
from exo_rkllm.runtime.rkllama import RkllamaRuntime  # noqa: E402
from exo_rkllm.runtime.rkllama import client as client_mod  # noqa: E402
from exo_rkllm.runtime.sim import SimTiming  # noqa: E402


def summary(values_ms: list[float]) -> str:
    return f"{statistics.median(values_ms):7.2f} ms [{min(values_ms):.2f}-{max(values_ms):.2f}]"


def ask(i: int, text: str) -> GenerationInput:
    return GenerationInput(f"bench-{i}", (), messages=(ChatMessage("user", text),))


async def first_token(runtime: RkllamaRuntime, inp: GenerationInput) -> float:
    """Monotonic time of the first TokenEvent; the rest of the answer is read to its end."""
    first: float | None = None
    async for event in runtime.generate(inp):
        if isinstance(event, TokenEvent) and first is None:
            first = event.at
    assert first is not None, "the answer had no token"
    return first


async def against_fake(api: str, runs: int) -> list[float]:
    from fake_rkllama import FakeRkllamaServer

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_demo_model(Path(tmp))
        spec = ModelSpec(model_id="qwen2.5-1.5b-instruct-demo", path=folder / DEMO_FILE, max_context_len=4096,
                         max_new_tokens=0, tokenizer_dir=folder, remote_name=folder.name)
        async with FakeRkllamaServer(Path(tmp), api, SimTiming(0, 0, 0, 1.0), unload_grace_s=0.2) as server:
            runtime = RkllamaRuntime(Config(backend="rkllama", server_url=server.url))
            try:
                await runtime.load(spec)
                gaps = []
                for i in range(runs + 1):
                    at = await first_token(runtime, ask(i, f"[[sim:text=Hello {i} 世界, fine.]]"))
                    rec = server.generations()[-1]
                    if i:  # the first run warms the tokenizer's caches
                        gaps.append((at - rec.first_piece_at) * 1000)
                return gaps
            finally:
                await runtime.close()


async def against_url(url: str, model: str, tokenizer_dir: Path, runs: int) -> list[float]:
    """First TokenEvent minus the moment the answer opened (rkllama's headers come with its first
    piece, so that is when the first piece reached the client)."""
    opened: list[float] = []
    real_open = client_mod.RkllamaClient.open_chat

    async def timed_open(self: Any, *args: Any, **kwargs: Any) -> Any:
        stream = await real_open(self, *args, **kwargs)
        opened.append(time.monotonic())
        return stream

    client_mod.RkllamaClient.open_chat = timed_open  # type: ignore[method-assign]
    spec = ModelSpec(model_id=model, path=tokenizer_dir / f"{model}.rkllm", max_context_len=4096, max_new_tokens=0,
                     tokenizer_dir=tokenizer_dir, remote_name=model)
    runtime = RkllamaRuntime(Config(backend="rkllama", server_url=url, server_first_token_timeout=600))
    try:
        await runtime.load(spec)
        gaps = []
        for i in range(runs + 1):
            opened.clear()
            at = await first_token(runtime, ask(i, f"Say hello {i}."))
            if i:
                gaps.append((at - opened[-1]) * 1000)
        return gaps
    finally:
        client_mod.RkllamaClient.open_chat = real_open  # type: ignore[method-assign]
        await runtime.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--api", nargs="+", default=["ollama", "early"], help="fake server API generations")
    parser.add_argument("--url", help="a running rkllama server instead of the fake")
    parser.add_argument("--model", help="with --url: the server's model name")
    parser.add_argument("--tokenizer-dir", type=Path, help="with --url: the model's tokenizer folder")
    args = parser.parse_args(argv)
    import transformers

    print(f"exo_rkllm from {Path(exo_rkllm.__file__).parent}, transformers {transformers.__version__}, "
          f"python {sys.version.split()[0]}")
    print(f"first piece -> first token, {args.runs} runs each:")
    if args.url:
        if not (args.model and args.tokenizer_dir):
            parser.error("--url needs --model and --tokenizer-dir")
        gaps = asyncio.run(against_url(args.url, args.model, args.tokenizer_dir, args.runs))
        print(f"  rkllama at {args.url} (answer opened -> token): {summary(gaps)}")
        return 0
    for api in args.api:
        gaps = asyncio.run(against_fake(api, args.runs))
        print(f"  fake server, {api:13s} (piece written -> token): {summary(gaps)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
