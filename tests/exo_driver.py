"""An exo-contract driver: runs engines the way legacy exo's Node does, without exo.

It follows legacy exo's Node (exo/orchestration/node.py at 5f18faec1) step by step: the node holding layer 0 calls
`infer_prompt`; `process_inference_result` on the node holding the last layer
calls `sample(result, temp=...)`, appends `token.item()`, decides
`is_finished` (eos of `engine.tokenizer`, or max_generate_tokens), fires
on_token on every node, and unless finished forwards the token (shape (1, 1))
to the next partition, whose `infer_tensor` gets it. Layers are split over a
ring of nodes; each node has its own engine. The on_token hook the real plugin
installs (exo_rkllm.exo_glue.plugin.on_token) is installed here too, so this driver
exercises the very code that tells the engine a request is over.

The API side comes in two forms. `chat()` mirrors exo's own request flow (the
prompt as templated text, which the engine encodes) and reads the answer through
the same TokenFeed the project's handlers read. `port()` is the handlers' node
port (exo_rkllm/api/port.py) on this driver, so the OpenAI handlers run over it
in CI exactly as they run over exo's Node in the plugin.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from exo_rkllm.exo_glue import plugin
from exo_rkllm.api.port import Ending, Submission, TokenFeed
from exo_rkllm.errors import RequestCancelled
from exo_rkllm.models.detok import IncrementalDetokenizer


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

    def end(self, ending: Ending) -> None:
        """The answer is over: how it ended, with the error object a client would read."""
        error = ending.error
        self.finish_reason = ending.finish_reason
        self.error = {"message": str(error), "type": "server_error", "code": error.code} if error is not None else None
        self.finished_at = time.monotonic()
        self.finished.set()


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
        self._texts: dict[str, IncrementalDetokenizer] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.lost: set[str] = set()  # requests exo "forgets" (a peer died): never stepped again
        self.feeds: dict[str, TokenFeed] = {}  # requests of the handlers' port (port())
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
        self.feeds[request_id] = plugin._feeds.open(request_id, engine.model_for(model_id).stop_ids)
        self._texts[request_id] = IncrementalDetokenizer(tokenizer)
        self._share_messages(api_node, request_id, messages)
        base = Shard(model_id, 0, 0, n_layers)
        try:
            await self.process_prompt(api_node, base, prompt, request_id)
        except BaseException:
            self._release(request_id)  # the handler answers with the error and releases it
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
        """The API node's on_token: the tokens as exo sees them, and the feed the handlers read."""
        feed = self.feeds.get(request_id)
        if feed is not None:
            feed.push(tokens, is_finished)
        answer = self.answers.get(request_id)
        if answer is None:
            return
        answer.tokens.extend(tokens)
        detok = self._texts.get(request_id)
        for update in feed.ready() if feed is not None else ():
            chunk = detok.push_many(update.ids) if detok is not None else ""
            if update.ending is not None and detok is not None:
                chunk += detok.flush()
            if answer.first_chunk_at is None and chunk:
                answer.first_chunk_at = time.monotonic()
            answer.chunks.append(chunk)
            if update.ending is not None:
                answer.end(update.ending)
                self._release(request_id)

    def _release(self, request_id: str) -> None:
        self._texts.pop(request_id, None)
        self.feeds.pop(request_id, None)
        plugin._feeds.close(request_id)

    # -- the handlers' port ----------------------------------------------------------------------------
    def port(self, api_node: int = 0) -> "DriverPort":
        return DriverPort(self, api_node)

    def _share_messages(self, api_node: int, request_id: str, messages: list[dict[str, Any]]) -> None:
        """What the plugin does with a request's context: keep it on the API node, and send it to
        the other nodes as an exo status message, which arrives a little after the prompt."""
        from exo_rkllm.engine.inference_engine import RequestContext, messages_from_openai

        context = RequestContext(messages_from_openai(messages))
        self.engines[api_node].set_request_context(request_id, context)
        status = json.dumps({"type": plugin.CONTEXT_STATUS, "request_id": request_id, "context": context.to_json()})
        self._later(0.05, lambda: [plugin.on_opaque_status(e, request_id, status)
                                   for i, e in enumerate(self.engines) if i != api_node])

    def _spawn(self, coro: Any) -> "asyncio.Task[Any]":
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _later(self, delay: float, fn: Callable[[], Any]) -> None:
        async def run() -> None:
            await asyncio.sleep(delay)
            fn()

        self._spawn(run())

    def abandon(self, request_id: str, reason: str = "client disconnected") -> None:
        """What the handlers do when the HTTP client goes away: cancel on every node and release the
        request (its handler is gone); whoever awaited the answer sees it end unfinished."""
        for engine in self.engines:
            engine.cancel_request(request_id, reason)
        answer = self.answers.get(request_id)
        if answer is not None and not answer.finished.is_set():
            answer.end(Ending("error", RequestCancelled(reason)))
        self._release(request_id)

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class DriverPort:
    """The OpenAI handlers' node port (exo_rkllm/api/port.py) on this driver: what ExoNodePort does
    on exo's Node, step for step: the context to the engine and to the other nodes (a status
    message, awaited), then the prompt to process_prompt, the tokens back through on_token,
    cancel on every node."""

    def __init__(self, ring: ExoRing, api_node: int = 0) -> None:
        self.ring = ring
        self.api_node = api_node
        self.submitted: list[Submission] = []

    async def submit(self, submission: Submission, stop_ids: frozenset[int]) -> TokenFeed:
        ring = self.ring
        rid = submission.request_id
        self.submitted.append(submission)
        feed = ring.feeds[rid] = plugin._feeds.open(rid, stop_ids)
        ring.engines[self.api_node].set_request_context(rid, submission.context)
        status = json.dumps({"type": plugin.CONTEXT_STATUS, "request_id": rid, "context": submission.context.to_json()})
        await asyncio.sleep(0.01)  # the plugin awaits this broadcast before it sends the prompt
        for i, engine in enumerate(ring.engines):
            if i != self.api_node:
                plugin.on_opaque_status(engine, rid, status)
        base = Shard(submission.model_id, 0, 0, submission.n_layers)

        async def run() -> None:
            try:
                await ring.process_prompt(self.api_node, base, submission.prompt_text, rid)
            except Exception as exc:  # exo's handler would answer with it
                plugin._feeds.fail(rid, exc if isinstance(exc, plugin.RKLLMError) else plugin.RKLLMError(repr(exc)))

        ring._spawn(run())
        return feed

    def cancel(self, request_id: str, reason: str) -> None:
        for engine in self.ring.engines:
            engine.cancel_request(request_id, reason)

    def release(self, request_id: str) -> None:
        self.ring.feeds.pop(request_id, None)
        plugin._feeds.close(request_id)
        for engine in self.ring.engines:
            engine.drop_request_context(request_id)
