"""The OpenAI handlers on a plain aiohttp app over the exo-contract driver, as CI can run them.

`plugin.mount` puts the handlers, the security middlewares and the OpenAI-shaped errors on the
app exactly as it does on exo's; the driver's port is the node. Clients talk real HTTP to it.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import aiohttp
from aiohttp import web
from yarl import URL

from exo_rkllm.exo_glue import plugin
from exo_rkllm.api.handlers import OpenAIServer
from exo_rkllm.engine.inference_engine import RKLLMInferenceEngine
from exo_rkllm.runtime.sim import SimRuntime, SimTiming

from exo_driver import DriverPort, ExoRing
from support import DEMO_ID, RecordingRuntime, make_engine


def sim_text(text: str) -> str:
    """A user message the simulator answers with exactly `text`."""
    return f"Answer with [[sim:text={text}]]"


class ExoLikeServer:
    """The app served as exo serves it: `web.AppRunner` with its defaults, so a handler is NOT cancelled
    when its client leaves (aiohttp's TestServer would cancel it, hiding what the handlers must notice)."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.runner = web.AppRunner(app)
        self.port = 0

    async def start_server(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def make_url(self, path: str) -> URL:
        return URL(f"http://127.0.0.1:{self.port}{path}")

    async def close(self) -> None:
        await self.runner.cleanup()


@dataclass
class Api:
    engine: RKLLMInferenceEngine
    runtime: RecordingRuntime
    ring: ExoRing
    port: DriverPort
    server: OpenAIServer
    http: ExoLikeServer
    session: aiohttp.ClientSession
    headers: dict[str, str] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return str(self.http.make_url(path))

    async def post(self, path: str, body: Any, **kw: Any) -> tuple[int, Any, Any]:
        """(status, parsed JSON body, headers)."""
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        headers = {"Content-Type": "application/json", **self.headers, **kw.pop("headers", {})}
        async with self.session.post(self.url(path), data=data, headers=headers, **kw) as resp:
            raw = await resp.read()
            return resp.status, _parse(raw, resp.content_type), resp.headers

    async def get(self, path: str, **kw: Any) -> tuple[int, Any, Any]:
        headers = {**self.headers, **kw.pop("headers", {})}
        async with self.session.get(self.url(path), headers=headers, **kw) as resp:
            raw = await resp.read()
            return resp.status, _parse(raw, resp.content_type), resp.headers

    async def stream(self, path: str, body: Any, **kw: Any) -> tuple[int, list[Any], bytes]:
        """A streamed request: (status, the parsed SSE data items with "[DONE]" kept as a string,
        the raw body). Fails on anything that is not strict SSE."""
        headers = {"Content-Type": "application/json", **self.headers, **kw.pop("headers", {})}
        async with self.session.post(self.url(path), data=json.dumps(body), headers=headers, **kw) as resp:
            raw = await asyncio.wait_for(resp.read(), 60)
            if resp.status != 200:
                return resp.status, [_parse(raw, resp.content_type)], raw
            assert resp.content_type == "text/event-stream", resp.content_type
        return resp.status, parse_sse(raw), raw

    def chat(self, messages: Any, **extra: Any) -> dict[str, Any]:
        return {"model": DEMO_ID, "messages": messages, **extra}


def parse_sse(raw: bytes) -> list[Any]:
    text = raw.decode("utf-8")
    assert text.endswith("\n\n"), "an SSE stream ends with a blank line"
    items: list[Any] = []
    for event in text[:-2].split("\n\n"):
        assert event.startswith("data: ") and "\n" not in event, f"not a single-line data event: {event!r}"
        payload = event[len("data: "):]
        items.append(payload if payload == "[DONE]" else json.loads(payload))
    return items


def _parse(raw: bytes, content_type: str) -> Any:
    if content_type == "application/json":
        return json.loads(raw)
    return raw.decode("utf-8", "replace")


async def start_api(models_dir: Path, timing: SimTiming | None = None, *, release: str | None = None,
                    response_timeout: float | None = None, system_prompt: str | None = None, nodes: int = 1,
                    api_node: int = 0, models_dirs: Sequence[Path] | None = None, **config: Any) -> Api:
    """The handlers over a ring of `nodes` engines, serving HTTP on `api_node`; placement picks the
    node that runs each request (exo_rkllm/placement). `runtime` is node 0's. `models_dirs`: a models
    folder per node (a ring whose boards hold different models; `nodes` is then its length), else
    every node has `models_dir`."""
    folders = list(models_dirs) if models_dirs is not None else [models_dir] * nodes
    built = [make_engine(folder, timing, **config) for folder in folders]
    engines = [engine for engine, _ in built]
    engine, runtime = engines[api_node], built[0][1]
    if release is not None:
        runtime.inner = SimRuntime(timing or SimTiming.instant(), release=release)
        runtime.capabilities = runtime.inner.capabilities
    ring = ExoRing(engines)
    port = ring.port(api_node)
    server = OpenAIServer(engine, port, engine.config, response_timeout=response_timeout, system_prompt=system_prompt)
    app = web.Application()
    plugin.mount(app, server, engine.config)
    http = ExoLikeServer(app)
    await http.start_server()
    return Api(engine, runtime, ring, port, server, http, aiohttp.ClientSession())


async def stop_api(api: Api) -> None:
    await api.session.close()
    await api.http.close()
    await api.ring.drain()
    for engine in api.ring.engines:
        await engine.shutdown()
