"""Run the fake rkllama server on a port, for trying exo's rkllama backend without a board.

    python -m tests.fake_rkllama --models-dir /tmp/rkllama-models --demo --port 8080 --api ollama

`--demo` writes the offline demo model (Qwen2.5 vocabulary, simulated answers) into the
folder first. The command prints the environment that points exo at it.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from exo_rkllm.runtime.sim import SimTiming

from .server import APIS, FakeRkllamaServer


async def serve(args: argparse.Namespace) -> None:
    timing = SimTiming(load_ms=args.load_ms, prefill_base_ms=args.prefill_base_ms,
                       prefill_ms_per_token=args.prefill_ms, decode_ms_per_token=args.decode_ms)
    server = FakeRkllamaServer(Path(args.models_dir), args.api, timing, host=args.host, port=args.port,
                               early_final_object=args.early_final_object, unload_grace_s=args.unload_grace_s,
                               version=args.version)
    await server.start()
    models = server.state.model_names()
    print(f"fake rkllama ({args.api} API) on {server.url}, models: {', '.join(models) or 'none'}", flush=True)
    print("run exo on it with:", flush=True)
    print(f"  RKLLM_BACKEND=rkllama RKLLM_SERVER_URL={server.url} RKLLM_MODELS_DIR={Path(args.models_dir).resolve()} "
          "exo-rkllm serve --disable-tui", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fake_rkllama", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", required=True, help="rkllama models folder (<dir>/<Name>/*.rkllm)")
    parser.add_argument("--demo", action="store_true", help="write the demo model into the folder first")
    parser.add_argument("--api", choices=APIS, default="ollama", help="API generation to speak")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--decode-ms", type=float, default=125.0, help="per generated token (board-like: 125)")
    parser.add_argument("--prefill-ms", type=float, default=8.0, help="per prompt token")
    parser.add_argument("--prefill-base-ms", type=float, default=40.0)
    parser.add_argument("--load-ms", type=float, default=1500.0)
    parser.add_argument("--unload-grace-s", type=float, default=30.0,
                        help="ollama API: how long /unload_model waits for a running generation before stopping it")
    parser.add_argument("--version", default=None,
                        help="ollama API: the rkllama release to play (0.0.43 on; default 0.0.74; per-run options "
                             "from 0.0.73)")
    parser.add_argument("--early-final-object", action="store_true",
                        help="early API: end the stream with an empty finish_reason=stop object")
    args = parser.parse_args(argv)
    if args.demo:
        from exo_rkllm.models.demo import write_demo_model

        print(f"demo model: {write_demo_model(Path(args.models_dir))}", flush=True)
    logging.basicConfig(level=logging.INFO)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
