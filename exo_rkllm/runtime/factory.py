"""Pick and build the runtime backend the config asks for.

`auto` never falls back to the simulator: a user without an NPU runtime and
without an rkllama server gets an error that says what to install or set.
Backends are imported lazily so a board without aiohttp-only or ctypes-only
pieces pays nothing for the ones it does not use.
"""
from __future__ import annotations

import logging

from ..config import Config
from ..errors import RuntimeUnavailable
from .base import Runtime

log = logging.getLogger("exo_rkllm.runtime")

NO_RUNTIME_HELP = (
    "no RKLLM runtime found: install librkllmrt.so (from airockchip/rknn-llm, rkllm-runtime/Linux/librkllm_api/"
    "aarch64) into /usr/lib or set RKLLM_LIB_PATH; or start an rkllama server and set RKLLM_BACKEND=rkllama "
    "(RKLLM_SERVER_URL, default http://localhost:8080); or, on a machine without an NPU, choose the simulator "
    "with RKLLM_BACKEND=sim"
)


def build_sim(config: Config) -> Runtime:
    from .sim import SimRuntime, SimTiming

    timing = SimTiming(load_ms=config.sim_load_ms, prefill_base_ms=config.sim_prefill_base_ms,
                       prefill_ms_per_token=config.sim_prefill_ms, decode_ms_per_token=config.sim_decode_ms)
    return SimRuntime(timing)


def build_native(config: Config) -> Runtime:
    try:
        from .native import create as create_native
    except ImportError as exc:
        raise RuntimeUnavailable(f"the native backend is not available in this build: {exc}") from exc
    return create_native(config)


async def build_rkllama(config: Config) -> Runtime:
    try:
        from .rkllama import create as create_rkllama
    except ImportError as exc:
        raise RuntimeUnavailable(f"the rkllama backend is not available in this build: {exc}") from exc
    return await create_rkllama(config)


async def create_runtime(config: Config) -> Runtime:
    if config.backend == "sim":
        log.warning("using the SIMULATED RKLLM runtime (RKLLM_BACKEND=sim): answers are synthetic, no NPU is used")
        return build_sim(config)
    if config.backend == "native":
        return build_native(config)
    if config.backend == "rkllama":
        return await build_rkllama(config)
    # auto: the real device first, then a local server.
    reasons: list[str] = []
    try:
        from .native import find_library

        if find_library(config) is not None:
            return build_native(config)
        reasons.append("librkllmrt.so not found")
    except ImportError:
        reasons.append("native backend not built")
    try:
        from .rkllama import probe

        if await probe(config):
            return await build_rkllama(config)
        reasons.append(f"no rkllama server at {config.rkllama_url}")
    except ImportError:
        reasons.append("rkllama backend not built")
    raise RuntimeUnavailable(f"{NO_RUNTIME_HELP} ({'; '.join(reasons)})")
