"""An exo-contract driver: runs engines the way legacy exo's Node does, without exo.

It follows DESIGN.md §2 step by step: the node holding layer 0 calls
`infer_prompt`; `process_inference_result` on the node holding the last layer
calls `sample(result, temp=...)`, appends `token.item()`, decides
`is_finished` (eos of `engine.tokenizer`, or max_generate_tokens), fires
on_token on every node, and unless finished forwards the token (shape (1, 1))
to the next partition, whose `infer_tensor` gets it. Layers are split over a
ring of nodes; each node has its own engine. The on_token hook the real plugin
installs (exo_rkllm.plugin.on_token) is installed here too, so this driver
exercises the very code that tells the engine a request is over.

The API side mirrors exo's ChatGPT API: it templates messages with the
tokenizer, collects each request's tokens from on_token, and turns them into
streamed chunks through the same CompletionText the plugin patches into exo.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from exo_rkllm import plugin
from exo_rkllm.api_text import CompletionText


@dataclass(frozen=True)
class Shard:
    """exo.inference.shard.Shard, as exo defines it."""

    model_id: str
    start_layer: int
    end_layer: int
    n_layers: int

    def is_first_layer(self) -> bool:
        return self.start_layer == 0

    def is_last_layer(self) -> bool:
        return self.end_layer == self.n_layers - 1


def split_layers(n_layers: int, n_nodes: int, model_id: str) -> list[Shard]:
    """Contiguous layer ranges, like exo's partitioning (equal memory weights)."""
    bounds = [round(i * n_layers / n_nodes) for i in range(n_nodes + 1)]
    return [Shard(model_id, bounds[i], bounds[i + 1] - 1, n_layers) for i in range(n_nodes)]


@dataclass
class Answer:
    request_id: str
    tokens: list[int] = field(default_factory=list)
    chunks: list[str] = field(default_factory=list)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    finish_reason: str | None = None
    error: dict[str, Any] | None = None  # the error object of the last chunk, as the plugin writes it
    first_chunk_at: float | None = None
    started_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None

    @property
    def streamed_text(self) -> str:
        return "".join(self.chunks)


class ExoRing:
    """N nodes in a ring, each with its own engine; node 0's API receives the requests."""

    def __init__(self, engines: list[Any], max_generate_tokens: int = 10_000, default_temp: float = 0.0,
                 on_token_hook: Callable[..., None] | None = plugin.on_token) -> None:
        self.engines = engines
        self.max_generate_tokens = max_generate_tokens
        self.default_temp = default_temp
        self.buffered: dict[str, list[int]] = {}
        self.outstanding: dict[str, str] = {}
        self.answers: dict[str, Answer] = {}
        self.errors: list[tuple[str, BaseException]] = []
        self._hook = on_token_hook
        self._texts = CompletionText()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.lost: set[str] = set()  # requests exo "forgets" (a peer died): never stepped again
        for engine in engines:  # what the plugin's make_engine does
            engine.add_end_listener(plugin.on_engine_end)

    # -- the API ---------------------------------------------------------------------------------
    async def chat(self, model_id: str, messages: list[dict[str, Any]], n_layers: int,
                   request_id: str | None = None, api_node: int = 0) -> Answer:
        """Start a chat completion like exo's API does; returns once the prompt is processed."""
        request_id = request_id or str(uuid.uuid4())
        engine = self.engines[api_node]
        tokenizer = engine.model_for(model_id).tokenizer
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        answer = self.answers[request_id] = Answer(request_id)
        plugin.track(request_id)  # the plugin's API handler serves it on this node
        self._share_messages(api_node, request_id, messages)
        base = Shard(model_id, 0, 0, n_layers)
        try:
            await self.process_prompt(api_node, base, prompt, request_id)
        except BaseException:
            plugin.forget(request_id)  # exo's API answers with the error; the plugin's handler releases it
            raise
        return answer

    async def complete(self, model_id: str, messages: list[dict[str, Any]], n_layers: int, **kw: Any) -> Answer:
        answer = await self.chat(model_id, messages, n_layers, **kw)
        await answer.finished.wait()
        return answer

    # -- the node ----------------------------------------------------------------------------------
    def shard_of(self, node: int, base: Shard) -> Shard:
        return split_layers(base.n_layers, len(self.engines), base.model_id)[node]

    async def process_prompt(self, node: int, base: Shard, prompt: str, request_id: str) -> None:
        shard = self.shard_of(node, base)
        if not shard.is_first_layer():
            self.outstanding[request_id] = "waiting"
            await self.process_prompt(0, base, prompt, request_id)  # forward_prompt to partition 0
            return
        self.outstanding[request_id] = "processing"
        result, state = await self.engines[node].infer_prompt(request_id, shard, prompt, None)
        await self.process_inference_result(node, shard, result, request_id, state)

    async def process_tensor(self, node: int, base: Shard, tensor: np.ndarray, request_id: str,
                             state: Any) -> None:
        shard = self.shard_of(node, base)
        try:
            self.outstanding[request_id] = "processing"
            result, state = await self.engines[node].infer_tensor(request_id, shard, tensor, state)
            await self.process_inference_result(node, shard, result, request_id, state)
        except Exception as exc:  # exo prints and drops the request
            self.outstanding.pop(request_id, None)
            self.errors.append((request_id, exc))

    async def process_inference_result(self, node: int, shard: Shard, result: np.ndarray, request_id: str,
                                       state: Any) -> None:
        engine = self.engines[node]
        buffered = self.buffered.setdefault(request_id, [])
        is_finished = len(buffered) >= self.max_generate_tokens
        intermediate: list[int] = []
        if shard.is_last_layer() and not is_finished:
            token = await engine.sample(result, temp=self.default_temp)
            await engine.ensure_shard(shard)
            buffered.append(token.item())
            is_finished = (token.item() == engine.tokenizer.eos_token_id or is_finished
                           or len(buffered) >= self.max_generate_tokens)
            forward = token.reshape(1, -1)
            intermediate = [buffered[-1]]
        else:
            forward = result
        if shard.is_last_layer():
            eos = engine.tokenizer.eos_token_id
            for other in self.engines:  # trigger_on_token_callbacks + broadcast_result
                if self._hook is not None:
                    self._hook(other, request_id, intermediate, is_finished)
            self._api_on_token(request_id, intermediate, is_finished, engine.tokenizer, eos)
        if is_finished:
            self.outstanding.pop(request_id, None)
            self.buffered.pop(request_id, None)  # (exo keeps it; we do not need to)
        elif request_id not in self.lost:
            self.outstanding[request_id] = "waiting"
            nxt = (node + 1) % len(self.engines)
            base = Shard(shard.model_id, 0, 0, shard.n_layers)
            task = asyncio.create_task(self.process_tensor(nxt, base, forward, request_id, state))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _api_on_token(self, request_id: str, tokens: list[int], is_finished: bool, tokenizer: Any,
                      eos: int) -> None:
        answer = self.answers.get(request_id)
        if answer is None:
            return
        answer.tokens.extend(tokens)
        finish = ("stop" if tokens and tokens[-1] == eos else "length") if is_finished else None
        finish, answer.error = plugin.finish_for(request_id, finish)  # the plugin's generate_completion
        chunk = self._texts.chunk(request_id, tokenizer, tokens, finish is not None)
        if answer.first_chunk_at is None and chunk:
            answer.first_chunk_at = time.monotonic()
        answer.chunks.append(chunk)
        if is_finished:
            answer.finish_reason = finish
            answer.finished_at = time.monotonic()
            answer.finished.set()
            plugin.forget(request_id)

    def _share_messages(self, api_node: int, request_id: str, messages: list[dict[str, Any]]) -> None:
        """What the plugin does with a request's messages: keep them on the API node, and send them
        to the other nodes as an exo status message, which arrives a little after the prompt."""
        from exo_rkllm.engine import RequestContext, messages_from_openai

        self.engines[api_node].set_request_context(request_id, RequestContext(messages_from_openai(messages)))
        status = json.dumps({"type": plugin.CONTEXT_STATUS, "request_id": request_id, "messages": messages})

        async def deliver() -> None:
            await asyncio.sleep(0.05)
            for i, engine in enumerate(self.engines):
                if i != api_node:
                    plugin.on_opaque_status(engine, request_id, status)

        task = asyncio.create_task(deliver())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def abandon(self, request_id: str, reason: str = "client disconnected") -> None:
        """What the plugin does when the HTTP client goes away: cancel on every node."""
        for engine in self.engines:
            engine.cancel_request(request_id, reason)
        self._texts.forget(request_id)
        plugin.forget(request_id)

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
