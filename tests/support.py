"""Test helpers: a spy around any runtime that records what the runtime itself reported."""
from __future__ import annotations

import asyncio
import random
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, AsyncIterator

from exo_rkllm.config import Config
from exo_rkllm.engine.inference_engine import RKLLMInferenceEngine
from exo_rkllm.runtime.base import CallState, FinishEvent, GenerationInput, RuntimeEvent, TokenEvent
from exo_rkllm.runtime.sim import SimRuntime, SimTiming

DEMO_ID = "qwen2.5-1.5b-instruct-demo"
DEMO_LAYERS = 28


class RecordingRuntime:
    """Delegates to a real backend and records its events per request: the ground truth
    ("the text the runtime generated") that the tests compare exo's output with."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.capabilities = inner.capabilities
        self.texts: dict[str, str] = defaultdict(str)
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.states: dict[str, list[CallState]] = defaultdict(list)
        self.finishes: dict[str, FinishEvent] = {}
        self.inputs: list[GenerationInput] = []
        self.aborts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def loaded(self) -> Any:
        return self.inner.loaded

    async def generate(self, inp: GenerationInput) -> AsyncIterator[RuntimeEvent]:
        self.inputs.append(inp)
        async for event in self.inner.generate(inp):
            if isinstance(event, TokenEvent):
                self.texts[inp.request_id] += event.text
                self.tokens[inp.request_id].append(event.token_id)
                self.states[inp.request_id].append(event.state)
            else:
                self.finishes[inp.request_id] = event
            yield event

    async def abort(self) -> None:
        self.aborts += 1
        await self.inner.abort()

    def kv_cache_len(self) -> int | None:
        return self.inner.kv_cache_len()


def make_engine(models_dir: Path, timing: SimTiming | None = None, **config: Any) -> tuple[RKLLMInferenceEngine, RecordingRuntime]:
    # saved KV states go to a folder of this engine's own: the demo models folder is shared by a whole session
    config.setdefault("cache_dir", Path(tempfile.mkdtemp(prefix="rkllm-kv-states-")))
    cfg = Config(backend="sim", models_dir=models_dir, **config)
    runtime = RecordingRuntime(SimRuntime(timing or SimTiming.instant()))
    return RKLLMInferenceEngine(config=cfg, runtime=runtime), runtime


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


class MessagesRuntime(RecordingRuntime):
    """A backend that takes chat messages and templates them itself, as an rkllama server does
    (capabilities.token_input is False); generation is the simulator's, on the templated prompt."""

    def __init__(self, inner: Any, tokenizer: Any) -> None:
        super().__init__(inner)
        import dataclasses

        self.capabilities = dataclasses.replace(inner.capabilities, backend="messages", token_input=False,
                                                keep_history=False, clear_kv_cache=False)
        self.tokenizer = tokenizer
        self.received: dict[str, Any] = {}

    async def generate(self, inp: GenerationInput) -> AsyncIterator[RuntimeEvent]:
        from exo_rkllm.errors import GenerationError

        if inp.messages is None:
            raise GenerationError("this backend needs the request's chat messages")
        self.received[inp.request_id] = inp.messages
        messages = [{"role": m.role, "content": m.content} for m in inp.messages]
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tuple(self.tokenizer.encode(prompt))
        async for event in super().generate(GenerationInput(inp.request_id, ids)):
            yield event


def text_splits(text: str, seed: float = 0):
    """The text as one piece, one character per piece, every two-piece split and some random splits:
    what a streaming text processor must give the same answer for."""
    yield [text]
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    rng = random.Random(seed)
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 6))))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


async def read_all(stream: Any) -> list[int]:
    """Every token of a RequestStream, to its end."""
    tokens = []
    while (token := await stream.next_token()) is not None:
        tokens.append(token)
    return tokens


async def until(condition: Any, ceiling_s: float = 30.0) -> None:
    """Wait for `condition()`; the ceiling bounds a hang, it is never a speed claim."""
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.002)
    await asyncio.wait_for(poll(), ceiling_s)
