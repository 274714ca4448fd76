"""An exo-contract driver: runs engines the way legacy exo's Node does, without exo.

It follows legacy exo's Node (exo/orchestration/node.py at 5f18faec1) step by step, as the plugin
patches it for this engine (exo_rkllm/exo_glue/ring.py): the node asked to run a request holds
every layer (get_current_shard), calls `infer_prompt`; `process_inference_result` calls
`sample(result, temp=...)`, appends `token.item()`, decides `is_finished` (eos of
`engine.tokenizer`, or max_generate_tokens), fires on_token on that node and on the node
whose API took the request (broadcast_result to that one peer), and unless finished feeds the
token (shape (1, 1)) to its own `infer_tensor` (forward_tensor stays local). Each node has its
own engine. The on_token hook the real plugin installs (exo_rkllm.exo_glue.plugin.on_token) is
installed here too, so this driver exercises the very code that tells the engine a request is over.

Placement is modelled with the project's own code (exo_rkllm/placement): the handlers' port asks a
RingView fed with every live node's `engine.activity()`, as the peers' state messages would feed
it, and sends the request to the chosen node. `kill(node)` stops a node: it is never stepped again,
and the next `watch()` reports its requests lost, as the plugin's heartbeat check does.

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
from exo_rkllm.placement.node_state import NodeState
from exo_rkllm.placement.placement import Placement
from exo_rkllm.placement.ring import RingView


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
        self.origin: dict[str, int] = {}  # request id -> the node whose API took it
        self.ran_on: dict[str, int] = {}  # request id -> the node that ran it
        self.dead: set[int] = set()  # nodes stopped by kill()
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
        self.origin[request_id] = api_node
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
        """The plugin's get_current_shard: whichever node runs a request holds all its layers."""
        return Shard(base.model_id, 0, base.n_layers - 1, base.n_layers)

    async def process_prompt(self, node: int, base: Shard, prompt: str, request_id: str) -> None:
        shard = self.shard_of(node, base)
        self.ran_on[request_id] = node
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
            origin = self.origin.get(request_id, node)
            # trigger_on_token_callbacks here, and broadcast_result to the node that asked (patched)
            for other in {node, origin}:
                if self._hook is not None and other not in self.dead:
                    self._hook(self.engines[other], request_id, intermediate, is_finished)
            if origin not in self.dead:
                self._api_on_token(request_id, intermediate, is_finished, engine.tokenizer, eos)
        if is_finished:
            self.outstanding.pop(request_id, None)
            self.buffered.pop(request_id, None)  # (exo keeps it; we do not need to)
        elif request_id not in self.lost and node not in self.dead:
            self.outstanding[request_id] = "waiting"
            base = Shard(shard.model_id, 0, 0, shard.n_layers)
            task = asyncio.create_task(self.process_tensor(node, base, forward, request_id, state))
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
        """What exo's own flow leaves the engine: the request's messages, on the API node, which runs it."""
        from exo_rkllm.engine.inference_engine import RequestContext, messages_from_openai

        self.engines[api_node].set_request_context(request_id, RequestContext(messages_from_openai(messages)))

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

    def kill(self, node: int) -> None:
        """The node stops (its process dies): it steps no request again and sends nothing more."""
        self.dead.add(node)

    def node_id(self, node: int) -> str:
        return f"node{node}"

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
    on exo's Node, step for step: the ring's placement picks the node, the context goes to that
    node (a status message naming this node as the one that asked, awaited), then the prompt to
    its process_prompt; the tokens come back through on_token, cancel goes to every node."""

    def __init__(self, ring: ExoRing, api_node: int = 0, *, fault_s: float = 3.0, affinity_slack: int = 2) -> None:
        self.ring = ring
        self.api_node = api_node
        self.submitted: list[Submission] = []
        self.placements: dict[str, Placement] = {}
        self.view = RingView(ring.node_id(api_node), fault_s, affinity_slack)

    def _heard(self) -> None:
        """Every live peer's state, as its last message gave it (here: always up to date)."""
        for i, engine in enumerate(self.ring.engines):
            if i != self.api_node and i not in self.ring.dead:
                self.view.heard(NodeState.of(self.ring.node_id(i), engine.activity()))

    def _members(self) -> list[str]:
        return [self.ring.node_id(i) for i in range(len(self.ring.engines))
                if i != self.api_node and i not in self.ring.dead]

    def served_elsewhere(self) -> frozenset[str]:
        self._heard()
        return frozenset(m for s in self.view.up(self._members()) for m in s.serves)

    async def submit(self, submission: Submission, stop_ids: frozenset[int]) -> TokenFeed:
        ring = self.ring
        rid = submission.request_id
        self.submitted.append(submission)
        feed = ring.feeds[rid] = plugin._feeds.open(rid, stop_ids)
        self._heard()
        local = NodeState.of(ring.node_id(self.api_node), ring.engines[self.api_node].activity())
        try:
            placement = self.view.choose(submission.model_id, submission.context.prompt_ids or (), local,
                                         self._members())
        except plugin.RKLLMError as exc:
            feed.fail(exc)
            return feed
        self.placements[rid] = placement
        self.view.place(rid, placement.node_id)
        feed.node = placement.node_id
        target = int(placement.node_id.removeprefix("node"))
        ring.origin[rid] = self.api_node
        if target == self.api_node:
            ring.engines[target].set_request_context(rid, submission.context)
        else:
            status = json.dumps({"type": plugin.CONTEXT_STATUS, "request_id": rid, "context": submission.context.to_json()})
            await asyncio.sleep(0.01)  # the plugin awaits this message before it sends the prompt
            plugin.on_opaque_status(ring.engines[target], rid, status)
        base = Shard(submission.model_id, 0, 0, submission.n_layers)

        async def run() -> None:
            try:
                await ring.process_prompt(target, base, submission.prompt_text, rid)
            except Exception as exc:  # exo's handler would answer with it
                plugin._feeds.fail(rid, exc if isinstance(exc, plugin.RKLLMError) else plugin.RKLLMError(repr(exc)))

        ring._spawn(run())
        return feed

    def watch(self) -> None:
        """The plugin's heartbeat check: a node that stopped is down, its requests end with NodeLost."""
        for lost in self.view.lost(self._members()):
            for rid in lost.requests:
                plugin._feeds.fail(rid, lost.error())

    def cancel(self, request_id: str, reason: str) -> None:
        for engine in self.ring.engines:
            engine.cancel_request(request_id, reason)

    def release(self, request_id: str) -> None:
        self.ring.feeds.pop(request_id, None)
        self.view.release(request_id)
        plugin._feeds.close(request_id)
        for engine in self.ring.engines:
            engine.drop_request_context(request_id)
