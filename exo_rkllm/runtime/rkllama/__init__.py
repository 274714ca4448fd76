"""The `rkllama` backend: exo's requests served by a local rkllama server over HTTP.

`create(config)` builds the runtime (it does not fail when the server is down: the
server may come up later, and each request then reports a clear error);
`probe(config)` is the quick reachability check `RKLLM_BACKEND=auto` uses.
"""
from __future__ import annotations

import asyncio
import logging

from exo_rkllm.config import Config
from exo_rkllm.errors import RKLLMError
from exo_rkllm.runtime.rkllama.backend import RkllamaRuntime, capabilities_for, wire_messages, wire_options
from exo_rkllm.runtime.rkllama.client import API_EARLY, API_OLLAMA, PROBE_TIMEOUT_S, RkllamaClient, ServerInfo, match_remote_name
from exo_rkllm.runtime.rkllama.text_tokens import TextToTokens

log = logging.getLogger("exo_rkllm.rkllama")

__all__ = ["API_EARLY", "API_OLLAMA", "RkllamaClient", "RkllamaRuntime", "ServerInfo", "TextToTokens",
           "capabilities_for", "create", "match_remote_name", "probe", "wire_messages", "wire_options"]


def _client(config: Config, *, quick: bool = False) -> RkllamaClient:
    return RkllamaClient.from_config(config, quick=quick)


async def create(config: Config) -> RkllamaRuntime:
    runtime = RkllamaRuntime(config)
    try:
        info = await asyncio.wait_for(runtime.client.info(), config.server_connect_timeout + PROBE_TIMEOUT_S)
        runtime.note_server(info)  # capabilities (per-run options, embeddings) before the first load
        log.info("rkllama backend: server at %s (%s)", info.url, info.label)
    except (RKLLMError, asyncio.TimeoutError) as exc:
        log.warning("rkllama backend: %s; requests will fail until the server is up", exc)
    return runtime


async def probe(config: Config) -> bool:
    """True if an rkllama server (either API generation) answers at the configured URL, within ~2 s."""
    async with _client(config, quick=True) as client:
        try:
            await asyncio.wait_for(client.info(), PROBE_TIMEOUT_S * 2)
            return True
        except (RKLLMError, asyncio.TimeoutError, OSError):
            return False

