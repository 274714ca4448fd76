"""pytest fixtures for the rkllama backend tests: `from fake_rkllama.fixtures import *`."""
from __future__ import annotations

import dataclasses
from typing import Any, AsyncIterator, Callable

import pytest

from exo_rkllm.config import Config
from exo_rkllm.runtime.base import ChatMessage, FinishEvent, GenerationInput, ModelSpec, TokenEvent
from exo_rkllm.runtime.rkllama import RkllamaRuntime
from exo_rkllm.runtime.sim import SimTiming

from .server import APIS, FakeRkllamaServer

DEMO_FOLDER_NAME = "Qwen2.5-1.5B-Instruct-Demo"


@pytest.fixture(params=APIS)
def api(request: pytest.FixtureRequest) -> str:
    """Every API generation rkllama has shipped: early, Ollama-style one-model, with workers."""
    return request.param


@pytest.fixture
async def make_server(demo_models_dir) -> AsyncIterator[Callable[..., Any]]:
    servers: list[FakeRkllamaServer] = []

    async def make(api: str = "ollama", timing: SimTiming | None = None, **options: Any) -> FakeRkllamaServer:
        options.setdefault("unload_grace_s", 0.2)
        server = FakeRkllamaServer(demo_models_dir, api, timing or SimTiming(0, 0, 0, 1.0), **options)
        servers.append(server)
        return await server.start()

    yield make
    for server in servers:
        await server.stop()


@pytest.fixture
async def server(make_server, api) -> FakeRkllamaServer:
    return await make_server(api)


def rkllama_config(url: str, **overrides: Any) -> Config:
    return Config(backend="rkllama", server_url=url, **overrides)


@pytest.fixture
async def make_runtime() -> AsyncIterator[Callable[..., Any]]:
    runtimes: list[RkllamaRuntime] = []

    def make(url: str, **overrides: Any) -> RkllamaRuntime:
        runtime = RkllamaRuntime(rkllama_config(url, **overrides))
        runtimes.append(runtime)
        return runtime

    yield make
    for runtime in runtimes:
        await runtime.close()


@pytest.fixture
def rk_spec(demo_spec: ModelSpec) -> ModelSpec:
    """The demo model as the catalog describes it for this backend."""
    return dataclasses.replace(demo_spec, remote_name=DEMO_FOLDER_NAME)


def chat(text: str, system: str | None = None, rid: str = "r", **kw: Any) -> GenerationInput:
    messages = ((ChatMessage("system", system),) if system else ()) + (ChatMessage("user", text),)
    return GenerationInput(rid, (), messages=messages, **kw)


@dataclasses.dataclass
class Collected:
    ids: list[int]
    texts: list[str]
    finish: FinishEvent | None

    @property
    def text(self) -> str:
        return "".join(self.texts)


async def collect(runtime: Any, inp: GenerationInput, stop_after: int | None = None) -> Collected:
    """Run one generation; with `stop_after`, abort after that many tokens (as the scheduler does)."""
    out = Collected([], [], None)
    async for event in runtime.generate(inp):
        if isinstance(event, TokenEvent):
            out.ids.append(event.token_id)
            out.texts.append(event.text)
            if stop_after is not None and len(out.ids) == stop_after:
                await runtime.abort()
        else:
            out.finish = event
    return out
