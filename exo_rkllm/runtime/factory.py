"""Pick and build the runtime backend the config asks for.

`auto` never falls back to the simulator: a user without an NPU runtime and
without an rkllama server gets an error that says what to install or set.
Backends are imported lazily so a board without aiohttp-only or ctypes-only
pieces pays nothing for the ones it does not use.

`choose_backend` is the one decision: `create_runtime` builds what it picks, and
exo's start-up (plugin.make_engine, through `check_backend`) runs the same probe,
so a start-up that passes is one whose requests find their runtime.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from exo_rkllm.config import Config
from exo_rkllm.errors import RKLLMError, RuntimeUnavailable
from exo_rkllm.runtime.base import Runtime

log = logging.getLogger("exo_rkllm.runtime")

NO_RUNTIME_HELP = (
    "no RKLLM runtime found: install librkllmrt.so (from airockchip/rknn-llm, rkllm-runtime/Linux/librkllm_api/"
    "aarch64) into /usr/lib or set RKLLM_LIB_PATH; or start an rkllama server and set RKLLM_BACKEND=rkllama "
    "(RKLLM_SERVER_URL, default http://localhost:8080); or, on a machine without an NPU, choose the simulator "
    "with RKLLM_BACKEND=sim"
)


def build_sim(config: Config) -> Runtime:
    from exo_rkllm.runtime.sim import SimRuntime, SimTiming

    timing = SimTiming(load_ms=config.sim_load_ms, prefill_base_ms=config.sim_prefill_base_ms,
                       prefill_ms_per_token=config.sim_prefill_ms, decode_ms_per_token=config.sim_decode_ms,
                       cache_io_ms_per_token=config.sim_cache_io_ms)
    return SimRuntime(timing)


def build_native(config: Config) -> Runtime:
    try:
        from exo_rkllm.runtime.native import create as create_native
    except ImportError as exc:
        raise RuntimeUnavailable(f"the native backend is not available in this build: {exc}") from exc
    return create_native(config)


async def build_rkllama(config: Config) -> Runtime:
    try:
        from exo_rkllm.runtime.rkllama import create as create_rkllama
    except ImportError as exc:
        raise RuntimeUnavailable(f"the rkllama backend is not available in this build: {exc}") from exc
    return await create_rkllama(config)


async def probe_rkllama(config: Config) -> str | None:
    """None when the configured URL is an rkllama server (either API generation), else why not:
    nothing answers, or what answers is not rkllama (any other HTTP server on the port). The
    same detection the rkllama backend runs, bounded to a few seconds."""
    try:
        from exo_rkllm.runtime.rkllama import RkllamaClient
        from exo_rkllm.runtime.rkllama.client import PROBE_TIMEOUT_S
    except ImportError as exc:
        return f"rkllama backend not built ({exc})"
    client = RkllamaClient.from_config(config, quick=True)
    try:
        await asyncio.wait_for(client.info(), PROBE_TIMEOUT_S * 2)
        return None
    except RKLLMError as exc:
        return str(exc)
    except (asyncio.TimeoutError, OSError) as exc:
        return f"no rkllama server answered at {config.rkllama_url} ({exc.__class__.__name__})"
    finally:
        await client.close()


async def choose_backend(config: Config) -> str:
    """The backend `create_runtime` builds for `config`: the one it names, or for `auto` the
    native runtime if librkllmrt.so is found, else an rkllama server if one really answers.
    Raises RuntimeUnavailable, with what to install or set and each reason, when `auto` finds
    neither."""
    if config.backend != "auto":
        return config.backend
    reasons: list[str] = []
    try:
        from exo_rkllm.runtime.native import find_library

        if find_library(config) is not None:
            return "native"
        reasons.append("librkllmrt.so not found")
    except ImportError:
        reasons.append("native backend not built")
    why_not = await probe_rkllama(config)
    if why_not is None:
        return "rkllama"
    reasons.append(why_not)
    raise RuntimeUnavailable(f"{NO_RUNTIME_HELP} ({'; '.join(reasons)})")


def check_backend(config: Config) -> str:
    """`choose_backend` from synchronous code (exo builds its engine before its event loop runs,
    and a caller may already be inside one): run on a thread of its own, with a loop of its own,
    so the caller's loop and event-loop policy are left as they were."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["backend"] = asyncio.run(choose_backend(config))
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="exo-rkllm-backend-check", daemon=True)
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return str(outcome["backend"])


async def create_runtime(config: Config) -> Runtime:
    backend = await choose_backend(config)
    if backend == "sim":
        log.warning("using the SIMULATED RKLLM runtime (RKLLM_BACKEND=sim): answers are synthetic, no NPU is used")
        return build_sim(config)
    if backend == "native":
        return build_native(config)
    return await build_rkllama(config)
