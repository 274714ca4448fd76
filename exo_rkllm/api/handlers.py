"""The OpenAI-compatible handlers for rkllm models: chat, completions, embeddings, models.

They take the request, validate it (schema.py), build the prompt's token ids
themselves so that only the chat template makes control tokens (prompt.py),
hand the request to the node through the port (port.py), and turn the token
ids the node reports into what OpenAI clients expect (answer.py, sse.py):
`chat.completion.chunk` deltas with the role first, `[DONE]` last, a usage
chunk when asked, `finish_reason` saying what happened, and an error chunk a
web UI shows when an answer fails half-way. Nothing here knows exo: the plugin
mounts these handlers on exo's app and implements the port on exo's Node; the
tests mount them on a plain aiohttp app over the exo-contract driver.

A model whose .rkllm file is on another board of the ring only (this node has its
tokenizer files and Modelfile: the catalog's route-only entry) is listed and served
here while a live node runs it: its prompt is templated and tokenized here and the
placement sends it there. Embeddings run on this node's NPU only.

A request ends in one way whatever ends it (the model, a limit, a stop
sequence, the client leaving, a timeout, a failure): the port's cancel frees the
NPU, and `release` drops every per-request entry.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from aiohttp import web

from exo_rkllm.config import Config
from exo_rkllm.engine.inference_engine import RequestContext, RKLLMInferenceEngine, RunOptions, messages_from_openai
from exo_rkllm.errors import RKLLMError
from exo_rkllm.models.catalog import ModelEntry
from exo_rkllm.scheduler.scheduler import Priority
from exo_rkllm.api.answer import AnswerText, Delta
from exo_rkllm.api.errors import APIError, error_chunk, error_response
from exo_rkllm.api.port import Ending, NodePort, Submission, TokenFeed, Update
from exo_rkllm.api.priority import classify_request, priority_named
from exo_rkllm.api.prompt import Prompt, build_chat_prompt, defang_messages, encode_plain, shared_prefix_len
from exo_rkllm.api.reasoning import ReasoningFormat, prompt_opens_reasoning
from exo_rkllm.api.schema import ChatRequest, CompletionRequest, Sampling, parse_chat, parse_completion, parse_embedding
from exo_rkllm.api.sse import EventStream
from exo_rkllm.api.tools import ToolFamily, family_for

log = logging.getLogger("exo_rkllm.api")

DISCONNECT_POLL_S = 0.1
SAMPLING_HEADER = "X-RKLLM-Sampling"
# OpenAI field -> the name the runtime's SamplingParams uses
_SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                    "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
                    "repetition_penalty": "repeat_penalty"}


@dataclass
class _Job:
    """One request on its way through the node, and what shaping its answer needs."""

    request_id: str
    model_name: str  # as the client named it: echoed in every response
    model_id: str
    prompt: Prompt
    context: RequestContext
    stop_ids: frozenset[int]
    answer: AnswerText
    stream: bool
    include_usage: bool
    chat: bool  # chat.completion(.chunk) shapes, else text_completion
    n_layers: int
    headers: dict[str, str] = field(default_factory=dict)
    echo: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object_id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.request_id


class OpenAIServer:
    """The handlers, over one engine (models, tokenizers, embeddings) and one node port (generations)."""

    def __init__(self, engine: RKLLMInferenceEngine, port: NodePort, config: Config | None = None, *,
                 default_model: Callable[[], str | None] | None = None,
                 response_timeout: float | None = None, system_prompt: str | None = None,
                 on_models_listed: Callable[[list[Any]], None] | None = None) -> None:
        self.engine = engine
        self.port = port
        self.config = config or engine.config
        self._default_model = default_model or (lambda: None)
        self.response_timeout = response_timeout
        self.system_prompt = system_prompt  # exo's --system-prompt: for conversations that have none
        self._on_models_listed = on_models_listed

    # -- routes ------------------------------------------------------------------------------------
    def routes(self) -> list[web.RouteDef]:
        """Every route, for an app of its own (the tests); the plugin maps exo's routes onto these."""
        return [
            web.post("/v1/chat/completions", self.chat), web.post("/chat/completions", self.chat),
            web.post("/v1/completions", self.completions), web.post("/v1/embeddings", self.embeddings),
            web.get("/v1/models", self.models), web.get("/models", self.models),
            web.get("/v1/models/{model_id:.+}", self.model),
            web.post("/v1/chat/token/encode", self.token_encode), web.post("/chat/token/encode", self.token_encode),
        ]

    # -- chat --------------------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            data = await _json_body(request)
            req = parse_chat(data)
            job = await self._chat_job(req, classify_request(data, request.headers))
        except APIError as err:
            return error_response(err)
        return await self._serve(request, job)

    async def _chat_job(self, req: ChatRequest, priority: Priority) -> _Job:
        name, model, n_layers = await self._model(req.model)
        tokenizer = model.tokenizer
        messages, tools = self._template_inputs(req)
        prompt = self._render(tokenizer, messages, tools, req)
        token_input = (await self.engine.capabilities()).token_input
        prefix_len = self._prefix_len(tokenizer, messages, tools, prompt, req) if token_input else 0
        if not token_input:  # the server templates and tokenizes: make special-token text inert there
            messages = defang_messages(messages, tokenizer)
        fmt = ReasoningFormat.parse(req.reasoning_format or self.config.reasoning_format)
        family = family_for(getattr(tokenizer, "chat_template", None)) if tools else ToolFamily.NONE
        names = _tool_names(req.tools or (), req.tool_choice)
        answer = AnswerText(tokenizer, stops=req.stop, reasoning=fmt,
                            starts_in_reasoning=fmt is not ReasoningFormat.NONE and prompt_opens_reasoning(prompt.text),
                            tool_family=family, tool_names=names)
        context = RequestContext(messages_from_openai(messages), tuple(tools) if tools else None, priority,
                                 prompt_ids=prompt.ids, options=self._options(req.max_tokens, req.sampling),
                                 prefix_len=prefix_len)
        job = _Job(str(uuid.uuid4()), name, model.entry.model_id, prompt, context, model.stop_ids, answer,
                   req.stream, req.include_usage, True, n_layers)
        self._note_sampling(job, req.sampling)
        return job

    # -- completions -------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            data = await _json_body(request)
            req = parse_completion(data)
            job = await self._completion_job(req, priority_named(request.headers.get("X-Priority"))
                                             or priority_named(req.priority)
                                             or (Priority.INTERACTIVE if req.stream else Priority.BACKGROUND))
        except APIError as err:
            return error_response(err)
        return await self._serve(request, job)

    async def _completion_job(self, req: CompletionRequest, priority: Priority) -> _Job:
        name, model, n_layers = await self._model(req.model)
        if not (await self.engine.capabilities()).token_input:
            raise APIError(400, "/v1/completions needs a runtime that takes token ids (native or sim); the rkllm "
                                "backend here is an rkllama server, which only takes chat messages: use "
                                "/v1/chat/completions", param="prompt", code="unsupported_backend")
        tokenizer = model.tokenizer
        if isinstance(req.prompt, str):
            text = req.prompt
            ids = tuple(encode_plain(tokenizer, text))
        else:
            ids = _checked_ids(req.prompt, tokenizer, "prompt")
            text = tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        answer = AnswerText(tokenizer, stops=req.stop)
        context = RequestContext((), None, priority, prompt_ids=ids, options=self._options(req.max_tokens, req.sampling))
        job = _Job(str(uuid.uuid4()), name, model.entry.model_id, Prompt(ids, text), context, model.stop_ids, answer,
                   req.stream, req.include_usage, False, n_layers, echo=text if req.echo else "")
        self._note_sampling(job, req.sampling)
        return job

    # -- serving a generation ------------------------------------------------------------------------
    async def _serve(self, request: web.Request, job: _Job) -> web.StreamResponse:
        submission = Submission(job.request_id, job.model_id, job.n_layers, job.prompt.text, job.context)
        feed = await self.port.submit(submission, job.stop_ids)
        if feed.node:  # which board runs it: for a client or an operator following the ring's placement
            job.headers[NODE_HEADER] = feed.node
        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        watcher = asyncio.ensure_future(_watch_disconnect(request, gone))
        try:
            if job.stream:
                return await self._stream(request, job, feed, gone)
            return await self._whole(job, feed, gone)
        finally:
            watcher.cancel()
            if not feed.ended:
                self.port.cancel(job.request_id, "client disconnected" if gone.done() else "the request ended")
            self.port.release(job.request_id)

    async def _next(self, job: _Job, feed: TokenFeed, gone: "asyncio.Future[None]", deadline: float | None, *,
                    until_settled: bool = False) -> Update | None:
        """The next update (with `until_settled`, only once the request has ended: a reader that
        needs no text before the end wakes once, not per token); None if the client went away. A
        timeout raises APIError 408."""
        if gone.done():
            self.port.cancel(job.request_id, "client disconnected")
            return None
        if not until_settled or feed.ended:
            ready = feed.poll()
            if ready is not None and (deadline is None or time.monotonic() < deadline):
                return ready  # the common case while tokens flow: nothing to wait for
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        signal = feed.settled() if until_settled else feed.changed()
        done, _ = await asyncio.wait((signal, gone), timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        if signal in done:
            return feed.poll()
        if gone in done:
            log.info("request %s: client disconnected, stopping its generation", job.request_id)
            self.port.cancel(job.request_id, "client disconnected")
            return None
        self.port.cancel(job.request_id, "timed out")
        raise APIError(408, f"the answer took longer than the API's response timeout ({self.response_timeout:g} s, "
                            "exo's --chatgpt-api-response-timeout, counted from its first token)",
                       code="timeout", type="server_error")

    def _stop_if_stopped(self, job: _Job, feed: TokenFeed) -> bool:
        if job.answer.stopped and not feed.ended:
            self.port.cancel(job.request_id, "stop sequence")
            return True
        return job.answer.stopped

    async def _stream(self, request: web.Request, job: _Job, feed: TokenFeed,
                      gone: "asyncio.Future[None]") -> web.StreamResponse:
        # The response starts with the first token: a failure before it gets its own HTTP status.
        first = await self._next(job, feed, gone, None)
        if first is None:
            return web.Response(status=499)
        if first.ending is not None and first.ending.error is not None and not first.ids:
            return error_response(self._api_error(first.ending.error))
        deadline = time.monotonic() + self.response_timeout if self.response_timeout else None
        out = EventStream(request, headers=job.headers)
        await out.start()
        if not await out.send(self._chunk(job, Delta(), role=True)):
            return out.response
        update: Update | None = first
        try:
            while update is not None:
                ids, ending = list(update.ids), update.ending
                while ending is None:  # tokens that came while the last chunk was written: one chunk
                    more = feed.poll()
                    if more is None:
                        break
                    ids += more.ids
                    ending = more.ending
                delta = job.answer.push(ids)
                if self._stop_if_stopped(job, feed):
                    ending = Ending("stop")
                if ending is not None:
                    delta += job.answer.finish()
                if delta and not await out.send(self._chunk(job, delta)):
                    return out.response
                if ending is not None:
                    await self._stream_end(out, job, feed, ending)
                    return out.response
                update = await self._next(job, feed, gone, deadline)
        except APIError as err:  # the timeout: the text so far, then the error, then the end
            delta = job.answer.finish()
            if delta:
                await out.send(self._chunk(job, delta))
            await self._end_with_error(out, job, err)
        return out.response

    async def _end_with_error(self, out: EventStream, job: _Job, err: APIError) -> None:
        """An answer that cannot be complete: the error chunk a web UI shows, [DONE], and the
        connection closed, so no client waits on a half-finished body."""
        await out.send(error_chunk(err, id=job.object_id, created=job.created, model=job.model_name,
                                   object=self._chunk_object(job)))
        await out.done()
        await out.close()

    async def _stream_end(self, out: EventStream, job: _Job, feed: TokenFeed, ending: Ending) -> None:
        if ending.error is not None:
            log.error("request %s failed mid-answer: %s", job.request_id, ending.error)
            await self._end_with_error(out, job, self._api_error(ending.error))
            return
        await out.send(self._chunk(job, Delta(), finish_reason=self._finish_reason(job, ending)))
        if job.include_usage:
            await out.send(self._usage_chunk(job, feed))
        await out.done()

    async def _whole(self, job: _Job, feed: TokenFeed, gone: "asyncio.Future[None]") -> web.StreamResponse:
        """A non-streamed answer. Without stop sequences nothing needs the text before the end,
        so the ids are decoded once, at the end, as exo did (streaming decodes as it goes)."""
        deadline: float | None = None
        watch_text = bool(job.answer.stops)
        ids: list[int] = []
        while True:
            try:
                # the first token starts the timeout; after it, without stops, wake only at the end
                update = await self._next(job, feed, gone, deadline, until_settled=deadline is not None and not watch_text)
            except APIError as err:
                return error_response(err)
            if update is None:
                return web.Response(status=499)
            if deadline is None and self.response_timeout:
                deadline = time.monotonic() + self.response_timeout
            ending = update.ending
            if watch_text:
                job.answer.push(update.ids)
                if self._stop_if_stopped(job, feed):
                    ending = Ending("stop")
            else:
                ids.extend(update.ids)
            if ending is None:
                continue
            if ids:
                job.answer.push(ids)
            job.answer.finish()
            if ending.error is not None:  # no partial answer that looks complete
                return error_response(self._api_error(ending.error))
            return web.json_response(self._whole_body(job, feed, ending), headers=job.headers,
                                     dumps=_dumps)

    # -- shapes ---------------------------------------------------------------------------------------
    def _finish_reason(self, job: _Job, ending: Ending) -> str:
        if ending.finish_reason == "stop" and job.answer.tool_calls:
            return "tool_calls"
        return ending.finish_reason

    @staticmethod
    def _chunk_object(job: _Job) -> str:
        return "chat.completion.chunk" if job.chat else "text_completion"

    def _chunk(self, job: _Job, delta: Delta, *, role: bool = False, finish_reason: str | None = None) -> dict:
        if job.chat:
            body: dict[str, Any] = {}
            if role:
                body = {"role": "assistant", "content": ""}
            if delta.reasoning:
                body["reasoning_content"] = delta.reasoning
            if delta.content:
                body["content"] = delta.content
            if delta.tool_calls:
                body["tool_calls"] = [d.to_openai() for d in delta.tool_calls]
            choice: dict[str, Any] = {"index": 0, "delta": body, "logprobs": None, "finish_reason": finish_reason}
        else:
            text = (job.echo if role else "") + delta.content
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        chunk = {"id": job.object_id, "object": self._chunk_object(job), "created": job.created,
                 "model": job.model_name, "system_fingerprint": _FINGERPRINT, "choices": [choice]}
        if job.include_usage:
            chunk["usage"] = None
        return chunk

    def _usage(self, job: _Job, feed: TokenFeed) -> dict[str, int]:
        prompt = len(job.prompt.ids)
        return {"prompt_tokens": prompt, "completion_tokens": feed.generated, "total_tokens": prompt + feed.generated}

    def _usage_chunk(self, job: _Job, feed: TokenFeed) -> dict:
        return {"id": job.object_id, "object": self._chunk_object(job), "created": job.created,
                "model": job.model_name, "system_fingerprint": _FINGERPRINT, "choices": [],
                "usage": self._usage(job, feed)}

    def _whole_body(self, job: _Job, feed: TokenFeed, ending: Ending) -> dict:
        answer = job.answer
        finish = self._finish_reason(job, ending)
        if job.chat:
            calls = answer.tool_calls
            message: dict[str, Any] = {"role": "assistant", "content": answer.content if answer.content or not calls
                                       else None}
            if answer.reasoning_text:
                message["reasoning_content"] = answer.reasoning_text
            if calls:
                message["tool_calls"] = [c.to_openai() for c in calls]
            choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": job.echo + answer.content, "logprobs": None, "finish_reason": finish}
            kind = "text_completion"
        return {"id": job.object_id, "object": kind, "created": job.created, "model": job.model_name,
                "system_fingerprint": _FINGERPRINT, "choices": [choice], "usage": self._usage(job, feed)}

    # -- embeddings --------------------------------------------------------------------------------
    async def embeddings(self, request: web.Request) -> web.Response:
        try:
            data = await _json_body(request)
            req = parse_embedding(data)
            name, model, _ = await self._model(req.model)
            if not model.entry.ok:  # route-only: the ring places generations, not embeddings
                raise APIError(409, f"{name} runs on another board of the ring (this node has its tokenizer but not "
                                    "its .rkllm file), and embeddings run on the NPU of the node that takes the "
                                    "request only: send this request to a node that has the model file",
                               param="model", code=ROUTE_ONLY_CODE)
            inputs = [x if isinstance(x, str) else list(x) for x in req.inputs]
            try:  # the engine checks token ids against the vocabulary (a ValueError: 400)
                result = await self.engine.embed(model.entry.model_id, inputs,
                                                 priority=priority_named(request.headers.get("X-Priority"))
                                                 or Priority.INTERACTIVE)
            except ValueError as exc:
                raise APIError(400, str(exc), param="input", code="invalid_value") from None
            except RKLLMError as exc:
                raise self._api_error(exc) from None
            if req.dimensions is not None and req.dimensions != result.width:
                raise APIError(400, f"{name} gives vectors of {result.width} dimensions; it cannot give "
                                    f"{req.dimensions}", param="dimensions", code="invalid_value")
        except APIError as err:
            return error_response(err)
        rows = []
        for i, vector in enumerate(result.vectors):
            value: Any = vector
            if req.encoding_format == "base64":
                import numpy as np

                value = base64.b64encode(np.asarray(vector, dtype=np.float32).tobytes()).decode("ascii")
            rows.append({"object": "embedding", "index": i, "embedding": value})
        return web.json_response({"object": "list", "data": rows, "model": name,
                                  "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}},
                                 dumps=_dumps)

    # -- models ------------------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        """This node's servable models, and those it routes that a live node of the ring runs."""
        entries = await asyncio.to_thread(self.engine.catalog.refresh)
        if self._on_models_listed is not None:
            self._on_models_listed(entries)
        return web.json_response({"object": "list", "data": [self._model_card(e) for e in self.listed(entries)]})

    def listed(self, entries: list[ModelEntry] | None = None) -> list[ModelEntry]:
        """The models this API lists, of `entries` (default: the catalog's last scan): the servable ones,
        and the route-only ones a live node of the ring runs (the only list: the plugin's tinychat routes
        read it too)."""
        entries = self.engine.catalog.entries() if entries is None else entries
        elsewhere = self.port.served_elsewhere() if any(e.routable for e in entries) else frozenset()
        return [e for e in entries if e.ok or (e.routable and e.model_id in elsewhere)]

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model_id"]
        try:
            entry = await asyncio.to_thread(self.engine.catalog.resolve, name, allow_route_only=True)
            self._check_routed(entry)
        except RKLLMError as exc:
            return error_response(self._api_error(exc, param="model"))
        except APIError as err:
            return error_response(err)
        return web.json_response(self._model_card(entry))

    def _check_routed(self, entry: ModelEntry) -> None:
        """A route-only entry is served while another live node of the ring runs it; else a clear 503."""
        if entry.ok or entry.model_id in self.port.served_elsewhere():
            return
        raise APIError(503, f"{entry.model_id}: its .rkllm file is on no live node of the ring, and this node only has "
                            f"its tokenizer and Modelfile (model folder {entry.name}): start the board that has the "
                            "file, or copy the .rkllm file into that folder here", param="model",
                       code=ROUTE_ONLY_CODE)

    def _model_card(self, entry: ModelEntry) -> dict[str, Any]:
        """`runs_on`: "this_node" (its file is here; the ring may still run a request elsewhere) or "ring"
        (a route-only model: another board runs it). `status`, `loaded`, `ready` are this node's NPU's."""
        status = self.engine.model_status(entry.model_id)
        try:
            created = int(entry.model_file.stat().st_mtime) if entry.model_file else 0
        except OSError:
            created = 0
        return {"id": entry.model_id, "object": "model", "created": created, "owned_by": "exo-rkllm",
                "context_length": entry.context_len, "status": status.value, "loaded": status.value == "loaded",
                "ready": status.ready, "aliases": list(entry.aliases), "runs_on": "this_node" if entry.ok else "ring"}

    async def token_encode(self, request: web.Request) -> web.Response:
        """exo's /v1/chat/token/encode: what the engine will really prefill for this chat."""
        try:
            req = parse_chat(await _json_body(request))
            _, model, _ = await self._model(req.model)
            prompt = self._render(model.tokenizer, *self._template_inputs(req), req)
        except APIError as err:
            return error_response(err)
        return web.json_response({"length": len(prompt.text), "num_tokens": len(prompt.ids),
                                  "encoded_tokens": list(prompt.ids), "encoded_prompt": prompt.text})

    # -- helpers -----------------------------------------------------------------------------------
    def _template_inputs(self, req: ChatRequest) -> tuple[list[dict], list | None]:
        """(messages, tools) as the chat template gets them, the same for a chat and for its token
        count: exo's `--system-prompt` first when the conversation has no system message (what exo's
        own handler did), and no tools when `tool_choice` is `none`."""
        messages = [dict(m) for m in req.messages]
        if self.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        tools = list(req.tools) if req.tools and req.tool_choice != "none" else None
        return messages, tools

    async def _model(self, name: str | None) -> tuple[str, Any, int]:
        """(the name to echo, the engine's model, its layer count) for the request's `model`. A route-only
        model (its file on another board) comes with its tokenizer and no NPU spec, while a live node
        of the ring runs it."""
        if not name or name.startswith("gpt-"):  # OpenAI clients' defaults: the server's default model
            name = self._default_model() or next((e.model_id for e in self.engine.catalog.servable()), None)
            if name is None:  # a board that only routes: a model another node runs
                name = next((e.model_id for e in self.listed(self.engine.catalog.routable())), None)
            if name is None:
                raise APIError(404, "no model to serve: put .rkllm models in the models folder (RKLLM_MODELS_DIR), or run "
                                    "`exo-rkllm demo` to write a model for the simulator (see GET /v1/models)",
                               param="model", code="model_not_found")
        try:
            model = await asyncio.to_thread(lambda: self.engine.model_for(
                self.engine.catalog.resolve(name, allow_route_only=True).model_id))
        except RKLLMError as exc:
            raise self._api_error(exc, param="model") from None
        self._check_routed(model.entry)
        if self._on_models_listed is not None:
            self._on_models_listed([model.entry])
        return name, model, int(getattr(model.entry, "n_layers", 1) or 1)

    def _prefix_len(self, tokenizer: Any, messages: list[dict], tools: list | None, prompt: Prompt,
                    req: ChatRequest) -> int:
        """The prompt's shared system part, for the engine to save once and restore (docs/saved-states.md).
        Not rendered where it cannot be worth a file: saved states off, or system text shorter in characters
        than RKLLM_CACHE_MIN_TOKENS is in tokens (a token is rarely shorter than a character)."""
        if not self.config.prompt_cache:
            return 0
        system = sum(len(m.get("content") or "") if isinstance(m.get("content"), str) else self.config.cache_min_tokens
                     for m in messages if m.get("role") in ("system", "developer"))
        if system + (len(json.dumps(tools)) if tools else 0) < self.config.cache_min_tokens:
            return 0
        return shared_prefix_len(tokenizer, messages, prompt, tools=tools, template_kwargs=self._kwargs(req))

    @staticmethod
    def _kwargs(req: ChatRequest) -> dict[str, Any]:
        """What the chat template gets besides messages and tools."""
        kwargs: dict[str, Any] = dict(req.chat_template_kwargs)
        if req.enable_thinking is not None:
            kwargs["enable_thinking"] = req.enable_thinking
        return kwargs

    def _render(self, tokenizer: Any, messages: list[dict], tools: list | None, req: ChatRequest) -> Prompt:
        try:
            return build_chat_prompt(tokenizer, messages, tools=tools, template_kwargs=self._kwargs(req))
        except APIError:
            raise
        except Exception as exc:  # the model's template refused this conversation (jinja raise_exception)
            raise APIError(400, f"the model's chat template cannot render this conversation: {exc}",
                           param="messages", code="template_error") from None

    def _options(self, max_tokens: int | None, sampling: Sampling) -> RunOptions:
        given = {ours: getattr(sampling, theirs) for theirs, ours in _SAMPLING_FIELDS.items()
                 if getattr(sampling, theirs) is not None}
        return RunOptions(max_new_tokens=max_tokens or 0, sampling=given or None, seed=sampling.seed)

    def _note_sampling(self, job: _Job, sampling: Sampling) -> None:
        """Say in the response whether the request's own sampling could be applied."""
        if not sampling.given():
            return
        job.headers[SAMPLING_HEADER] = "request" if self.engine.request_sampling_applies() else "modelfile"

    def _api_error(self, exc: RKLLMError, param: str | None = None) -> APIError:
        err = APIError.from_rkllm(exc, redact=[self.config.models_dir])
        if param is not None and err.param is None and err.status in (404, 409):
            err.param = param
        return err


_FINGERPRINT = "exo-rkllm"
ROUTE_ONLY_CODE = "model_not_on_this_node"  # a route-only model no live node runs, or its embeddings
NODE_HEADER = "X-RKLLM-Node"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise APIError(400, "the request body is not valid JSON (or nested too deeply)", code="invalid_json") from None


async def _watch_disconnect(request: web.Request, gone: "asyncio.Future[None]") -> None:
    """aiohttp does not cancel a handler whose client left: poll its connection."""
    while True:
        await asyncio.sleep(DISCONNECT_POLL_S)
        transport = request.transport
        if transport is None or transport.is_closing():
            if not gone.done():
                gone.set_result(None)
            return


def _tool_names(tools: Any, tool_choice: Any) -> set[str] | None:
    names = {t["function"]["name"] for t in tools if isinstance(t, Mapping) and isinstance(t.get("function"), Mapping)}
    if isinstance(tool_choice, Mapping):
        named = (tool_choice.get("function") or {}).get("name")
        if named:
            return {named}
    return names or None


def _checked_ids(ids: Any, tokenizer: Any, param: str) -> tuple[int, ...]:
    size = len(tokenizer)
    out = tuple(int(t) for t in ids)
    bad = next((t for t in out if t < 0 or t >= size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the model's vocabulary (0..{size - 1})", param=param,
                       code="invalid_value")
    return out
