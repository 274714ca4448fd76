"""The narrow port between the OpenAI handlers and the node that runs a request.

The handlers know exo only through this: submit a prompt for a request id, read
the token ids the node reports for it and how it ended, cancel it, and which
models other nodes of the ring can run (for those this node only routes). exo's real
Node implements it in the plugin (exo_rkllm/exo_glue/plugin.py); the tests' exo-contract
driver implements it too, so every handler behaviour is tested where CI can see
it, without exo.

How a request ended is not always in its tokens: exo concludes `stop` from the
eos the engine hands it after every end. The engine (or, in a ring, the node
that ran the model, by a status message) tells the feed what really happened
before that last token arrives; `TokenFeed` combines the two.
"""
from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Protocol, Sequence

from exo_rkllm.engine.inference_engine import RequestContext, RequestEnding
from exo_rkllm.errors import RKLLMError


@dataclass(frozen=True)
class Submission:
    """One request for the node: exo's node takes the prompt text; the engine takes the context
    (the prompt's token ids as the API built them, the messages, priority and options)."""

    request_id: str
    model_id: str
    n_layers: int
    prompt_text: str
    context: RequestContext


@dataclass(frozen=True)
class Ending:
    """How a request ended, as the client must see it."""

    finish_reason: str  # "stop" (the model ended its answer), "length" (a limit cut it), "error"
    error: RKLLMError | None = None


@dataclass(frozen=True)
class Update:
    """What the node reported since the last read: token ids (the model's end-of-turn token left
    out), and the ending once the request is over."""

    ids: tuple[int, ...]
    ending: Ending | None = None


class TokenFeed:
    """One request's tokens as the node reports them, read by its handler.

    `push`, `hint` and `fail` are called from node callbacks (synchronously, on the loop); the
    handler reads with `poll()` and, when nothing is there, awaits `changed()` (a future, not a
    task: waiting costs one future per wake-up on the per-token path). Nothing grows without
    bound: the handler reads as updates come."""

    def __init__(self, request_id: str, stop_ids: frozenset[int]) -> None:
        self.request_id = request_id
        self._stop_ids = stop_ids
        self._updates: collections.deque[Update] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._settled: asyncio.Future[None] | None = None
        self._hint: RequestEnding | None = None
        self.ended = False
        self.generated = 0  # tokens of the answer (end-of-turn tokens not counted)
        self.node: str | None = None  # the node of the ring running it, once placed (the X-RKLLM-Node header)

    def push(self, tokens: Sequence[int], finished: bool) -> None:
        """exo's on_token: `tokens` are the new ids; `finished` once exo considers the request over."""
        if self.ended:
            return
        ids = tuple(int(t) for t in tokens)
        ending: Ending | None = None
        if finished:
            last_is_stop = bool(ids) and ids[-1] in self._stop_ids
            if last_is_stop:
                ids = ids[:-1]
            ending = self._ending(last_is_stop)
        self.generated += len(ids)
        if ids or ending is not None:
            self._add(Update(ids, ending))

    def hint(self, ending: RequestEnding) -> None:
        """The engine's word on how the request ended (it precedes exo's last token)."""
        if self._hint is None:
            self._hint = ending

    def fail(self, error: RKLLMError) -> None:
        """The request cannot go on: the node could not run it (it raised), or the node running it was
        lost. The engine's own word, when it came first, is the more precise error (in a ring exo
        reports the runner's failure only as a gRPC error)."""
        if not self.ended:
            hinted = self._hint.error if self._hint is not None else None
            self._add(Update((), Ending("error", hinted or error)))

    def _add(self, update: Update) -> None:
        self._updates.append(update)
        if update.ending is not None:
            self.ended = True
            _resolve(self._settled)
        _resolve(self._waiter)

    def _ending(self, last_is_stop: bool) -> Ending:
        hint = self._hint
        if hint is not None and hint.finish_reason == "length":
            return Ending("length")
        if hint is not None:
            return Ending("error", hint.error or RKLLMError("the request failed"))
        # No word from the engine: the model's own end, or exo's --max-generate-tokens.
        return Ending("stop" if last_is_stop else "length")

    def poll(self) -> Update | None:
        """The next update if one is already there, else None (no waiting)."""
        return self._updates.popleft() if self._updates else None

    def ready(self) -> list[Update]:
        """The updates delivered so far and not yet read, without waiting."""
        out = list(self._updates)
        self._updates.clear()
        return out

    def changed(self) -> "asyncio.Future[None]":
        """Resolves once an update is there to poll (at once if one already is)."""
        if self._waiter is None or self._waiter.done():
            self._waiter = asyncio.get_running_loop().create_future()
        if self._updates:
            _resolve(self._waiter)
        return self._waiter

    def settled(self) -> "asyncio.Future[None]":
        """Resolves once the request has ended (its last update delivered)."""
        if self._settled is None:
            self._settled = asyncio.get_running_loop().create_future()
            if self.ended:
                _resolve(self._settled)
        return self._settled

    async def next(self) -> Update:
        """Wait for the next update."""
        while not self._updates:
            await self.changed()
        return self._updates.popleft()


def _resolve(future: "asyncio.Future[None] | None") -> None:
    if future is not None and not future.done():
        future.set_result(None)


class NodePort(Protocol):
    """What the handlers need of the node: nothing else of exo."""

    async def submit(self, submission: Submission, stop_ids: frozenset[int]) -> TokenFeed:
        """Start the request; returns its feed at once (the node works in the background). A
        failure of the node to run it arrives through the feed."""

    def cancel(self, request_id: str, reason: str) -> None:
        """Stop the request on every node and free the NPU (client gone, stop sequence, timeout)."""

    def release(self, request_id: str) -> None:
        """The handler is done with the request: drop every per-request entry held for it."""

    def served_elsewhere(self) -> frozenset[str]:
        """The ids of the models some other live node of the ring can run (their .rkllm file is there),
        as the peers last reported them (NodeActivity.serves); empty on a node alone. A model this
        node only routes (tokenizer and Modelfile here, no .rkllm file) is listed and accepted only
        while it is in this set. Reads memory only: the handlers call it when this node has route-only
        models, on each model listing and each request for one."""


class Feeds:
    """The open feeds of this process, by request id: where the node's callbacks deliver.

    One registry per process, because the engine's end listener and exo's status messages
    are process-wide; a request the API of this node does not serve has no feed and is ignored."""

    def __init__(self) -> None:
        self._feeds: dict[str, TokenFeed] = {}

    def open(self, request_id: str, stop_ids: frozenset[int]) -> TokenFeed:
        feed = self._feeds[request_id] = TokenFeed(request_id, stop_ids)
        return feed

    def push(self, request_id: str, tokens: Sequence[int], finished: bool) -> None:
        feed = self._feeds.get(request_id)
        if feed is not None:
            feed.push(tokens, finished)

    def hint(self, request_id: str, ending: RequestEnding) -> None:
        feed = self._feeds.get(request_id)
        if feed is not None:
            feed.hint(ending)

    def fail(self, request_id: str, error: RKLLMError) -> None:
        feed = self._feeds.get(request_id)
        if feed is not None:
            feed.fail(error)

    def close(self, request_id: str) -> None:
        self._feeds.pop(request_id, None)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._feeds

    def __len__(self) -> int:
        return len(self._feeds)
