"""RkllamaRuntime: the Runtime protocol on top of an rkllama server.

The server templates every conversation itself and has no raw-prompt mode, so
this backend never sends exo's templated prompt: it sends the request's
original messages (system prompt and tools included) to `/api/chat`, or to
`/generate` on the early API, and the server's template is the only one
applied. The streamed text is turned into the model's token ids as each piece
arrives (text_tokens.py), so exo gets tokens as fast as the server sends text
and decodes them back into exactly the server's text.

A request exo abandons ends at once on exo's side. No rkllama version stops a
generation because its client went away, so the backend frees the server for
the next request itself. An older one-model server cannot stop a generation at
all and shares one token list between requests: the client reads the rest of
the abandoned answer in the background and discards it, or that text would
leak into the next answer. A server with model workers can unload the model,
but its unload only takes effect when the running generation ends (or kills
the worker after 30 s), and the next request then loads the model again: so
the client reads the rest for a few seconds (`abandon_drain_s`), which is
enough for most answers, and only then unloads. A request given up on before
the server answered at all (rkllama sends its headers only with the first
piece) is not waited for past its own first-token deadline on such a server:
the model is unloaded at once. The next generation waits for any clean-up to
finish.

Nothing is added to the conversation: no rkllama version applies a Modelfile's
SYSTEM to `/api/chat` or `/generate`, and neither does this backend.

A request's sampling, token limit and seed go to the server as `/api/chat` options
(`temperature`, `top_k`, `top_p`, `repeat_penalty`, `frequency_penalty`,
`presence_penalty`, `num_predict`, `seed`) only where rkllama applies them to that run
(0.0.73 on; capabilities `per_run_sampling` / `per_run_max_new_tokens` say so): on an
older server the options of whichever request loaded the model would silently become
everyone's, and the early API takes none. rkllama reads no seed; it is sent as Ollama
clients send it. A token limit is kept on every server: where the server cannot be told
(or counts its tokens differently from the text's re-tokenization), the backend passes on
no more than `max_new_tokens` tokens. On a server that was told, it drops the rest until
the server's own end; on one that was not, it stops there (a FinishEvent of kind LENGTH, as
the native backend stops an older runtime) and frees the server as for an abandoned answer.
An answer the server ends itself is LENGTH when it reached the run's limit (or the model's
max_new_tokens) or the server says `done_reason: "length"`, STOP otherwise.

Embeddings (`embed`): through the server's `/api/embed` (0.0.43 on), one row, `pooled`:
rkllama returns the last token's hidden state. Older servers raise EmbeddingUnsupported.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, AsyncIterator, Mapping, Sequence

from exo_rkllm.config import Config
from exo_rkllm.errors import EmbeddingUnsupported, GenerationError, ModelLoadError, ModelNotFound, RKLLMError
from exo_rkllm.models.tokenizer import load_tokenizer
from exo_rkllm.runtime.base import (Capabilities, ChatMessage, EmbeddingInput, EmbeddingOutput, FinishEvent, FinishKind,
                    GenerationInput, GenerationStats, ModelSpec, ProgressFn, RuntimeBase, RuntimeEvent, TokenEvent)
from exo_rkllm.runtime.rkllama.client import (API_EARLY, EMBEDDINGS_HINT, ChatStream, RkllamaClient, ServerChanged, ServerInfo,
                     ServerNotLoaded, StreamBroken, match_remote_name, parse_chunk, render_tool_calls)
from exo_rkllm.runtime.rkllama.text_tokens import TextToTokens, VocabFacts

log = logging.getLogger("exo_rkllm.rkllama")

MESSAGES_REQUIRED = (
    "the rkllama backend needs the request's chat messages (rkllama applies the chat template itself and has "
    "no raw-prompt mode, so exo's templated prompt cannot be sent); this request reached the backend without "
    "them: it did not come through exo's ChatGPT API on a node running the exo-rkllm plugin"
)


class _Aborted(Exception):
    """Internal: abort() was called while a generation waited on the server."""


def _text_of(content: object) -> str:
    """OpenAI clients may send content as a list of parts; rkllama's templates expect a string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = []
        for part in content:
            if isinstance(part, Mapping):
                if part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                    parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
            else:
                text = getattr(part, "text", None)
                if isinstance(text, str):
                    parts.append(text)
        return "".join(parts)
    return str(content)


def jsonable(obj: Any) -> Any:
    """Tools as plain JSON: exo may hand them over as pydantic models."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    for method in ("model_dump", "dict"):
        fn = getattr(obj, method, None)
        if callable(fn):
            return jsonable(fn())
    return str(obj)


def wire_messages(messages: Sequence[ChatMessage], early: bool) -> list[dict[str, Any]]:
    """The conversation as rkllama takes it.

    The early API prepends its own system prompt and refuses two messages of one role in a
    row (its template check), so there a system message is folded into the first user
    message and consecutive messages of one role are joined. Newer servers move a system
    message to the front themselves and take the conversation as it is."""
    out = [{"role": str(m.role), "content": _text_of(m.content)} for m in messages]
    if not early:
        return out
    system = "\n\n".join(m["content"] for m in out if m["role"] == "system" and m["content"])
    rest = [m for m in out if m["role"] != "system"]
    if system:
        for m in rest:
            if m["role"] == "user":
                m["content"] = f"{system}\n\n{m['content']}"
                break
        else:
            rest.insert(0, {"role": "user", "content": system})
    merged: list[dict[str, Any]] = []
    for m in rest:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1]["content"] += "\n\n" + m["content"]
        else:
            merged.append(dict(m))
    return merged


def capabilities_for(info: ServerInfo | None) -> Capabilities:
    """What this backend can do with the server `info` describes (None: not detected yet)."""
    if info is None:
        return Capabilities(backend="rkllama", version="", token_input=False, keep_history=False,
                            clear_kv_cache=False)
    return Capabilities(backend="rkllama", version=info.label, token_input=False, keep_history=False,
                        clear_kv_cache=False, per_run_sampling=info.per_run_options,
                        per_run_max_new_tokens=info.per_run_options, embeddings=info.embeddings)


def wire_options(inp: GenerationInput, info: ServerInfo) -> dict[str, Any] | None:
    """The request's sampling, token limit and seed as `/api/chat` options, where the server
    applies them to this run; None otherwise (or when the request names none)."""
    if not info.per_run_options:
        return None
    options: dict[str, Any] = {}
    s = inp.sampling
    if s is not None:
        # rkllama reads top_k with int() of the value's text: it must go as an integer
        options.update(temperature=float(s.temperature), top_k=int(s.top_k), top_p=float(s.top_p),
                       repeat_penalty=float(s.repeat_penalty), frequency_penalty=float(s.frequency_penalty),
                       presence_penalty=float(s.presence_penalty))
    if inp.max_new_tokens > 0:
        options["num_predict"] = int(inp.max_new_tokens)
    if inp.seed is not None:
        options["seed"] = int(inp.seed)
    return options or None


class RkllamaRuntime(RuntimeBase):
    """The `rkllama` backend: one rkllama server, one model of it at a time."""

    abandon_drain_s = 3.0  # worker servers: how long to let an abandoned answer finish before unloading

    def __init__(self, config: Config, client: RkllamaClient | None = None) -> None:
        self.config = config
        self.client = client or RkllamaClient.from_config(config)
        self.capabilities = capabilities_for(None)
        self._model: ModelSpec | None = None
        self._tok: Any = None
        self._facts: VocabFacts | None = None
        self._remote: str | None = None
        self._names: dict[str, str] = {}  # model_id -> server name
        self._abort_fut: asyncio.Future[None] | None = None
        self._running = False
        self._cleanup: asyncio.Task[None] | None = None
        self.closed = False
        # Figures for tests and benchmarks: the last generation's timings (monotonic seconds).
        self.last_request_at: float | None = None
        self.last_first_piece_at: float | None = None
        self.cleanups = 0
        self.unloads_for_abort = 0

    # -- protocol -------------------------------------------------------------------------------
    @property
    def loaded(self) -> ModelSpec | None:
        return self._model

    @property
    def remote_name(self) -> str | None:
        """The server's name of the loaded model."""
        return self._remote

    async def load(self, model: ModelSpec, progress: ProgressFn | None = None) -> None:
        self._check_open()
        await self._settle()
        if model.tokenizer_dir is None:
            raise ModelLoadError(f"the rkllama backend needs the tokenizer of {model.model_id} to turn the server's "
                                 "text into tokens: put tokenizer.json and tokenizer_config.json in the model "
                                 "folder, or set RKLLM_TOKENIZER_DIR")
        if progress:
            progress(f"asking rkllama at {self.client.url} for {model.model_id}", 0.0)
        tok, facts = await asyncio.to_thread(self._tokenizer, model.tokenizer_dir)
        info = await self.client.info()
        name = await self.resolve_name(model)
        try:
            await self.client.load(name)
        except ModelLoadError:
            self._names.pop(model.model_id, None)
            raise
        self._model, self._tok, self._facts, self._remote = model, tok, facts, name
        self.note_server(info)
        if progress:
            progress(f"{name} ready on rkllama ({info.label})", 1.0)

    async def unload(self) -> None:
        await self.abort()
        await self._settle()
        if self._remote is not None:
            await self.client.unload(self._remote)
        self._model, self._tok, self._facts, self._remote = None, None, None, None

    async def abort(self) -> None:
        fut = self._abort_fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def clear_kv_cache(self) -> None:
        """Nothing to do: rkllama manages its own cache and this backend never keeps history."""

    def kv_cache_len(self) -> int | None:
        """Unknown: rkllama does not say what its cache holds (and no run here continues it)."""
        return None

    async def close(self) -> None:
        """Stop our generation and let go of the server. The model stays loaded there: the
        server may serve other clients, and it is theirs to unload."""
        if self.closed:
            return
        await self.abort()
        task = self._cleanup
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), 2.0)
            except (asyncio.TimeoutError, Exception):
                task.cancel()
        self.closed = True
        await self.client.close()

    async def generate(self, inp: GenerationInput) -> AsyncIterator[RuntimeEvent]:
        self._check_open()
        if inp.messages is None:
            raise GenerationError(MESSAGES_REQUIRED)
        if self._model is None or self._tok is None:
            raise GenerationError("no model is loaded")
        if self._running:
            raise GenerationError("the rkllama backend is busy: one generation at a time")
        model_cap = max(0, self._model.max_new_tokens)
        self._running = True
        loop = asyncio.get_running_loop()
        abort_fut: asyncio.Future[None] = loop.create_future()
        self._abort_fut = abort_fut
        stream: ChatStream | None = None
        info: ServerInfo | None = None
        finished = False
        why = "aborted"
        try:
            try:
                await self._race(self._settle(), abort_fut, None, "")
                started = time.monotonic()
                self.last_request_at, self.last_first_piece_at = started, None
                deadline = started + self.client.first_token_timeout
                opening = asyncio.ensure_future(self._open(inp))
                try:
                    stream, info = await self._race(opening, abort_fut, self.client.first_token_timeout,
                                                    self._first_token_error(), cancel=False)
                except (_Aborted, GenerationError):
                    # The request may have reached the server, which would then generate unseen:
                    # free it (_free_after_open says how, per kind of server).
                    if not opening.done():
                        self._cleanup = asyncio.ensure_future(self._free_after_open(opening, deadline))
                    raise
            except _Aborted:
                finished = True
                yield FinishEvent(GenerationStats(), FinishKind.ABORTED)
                return
            conv = TextToTokens(self._tok, self._facts)  # nothing heavy here: the first piece is on its way
            first_at: float | None = None
            last_at = started
            emitted = 0
            prompt_tokens = 0
            limit = max(0, inp.max_new_tokens)
            told = info is not None and info.per_run_options  # it got num_predict and ends the answer itself
            capped = False  # `limit` tokens passed on: the rest is dropped
            done_reason: str | None = None  # the server's, on its last line
            # The run's limit, or the model's (its Modelfile's), which a server ending the answer there reached.
            ceiling = limit or model_cap
            while True:
                if first_at is None:
                    timeout, error = max(0.0, deadline - time.monotonic()), self._first_token_error()
                else:
                    timeout = self.client.chunk_timeout
                    error = (f"the rkllama server at {self.client.url} sent nothing for {timeout:g} s in the middle "
                             "of an answer (RKLLM_SERVER_CHUNK_TIMEOUT)")
                try:
                    data = await self._race(stream.read(), abort_fut, timeout, error)
                except _Aborted:
                    finished = True
                    yield FinishEvent(self._stats(prompt_tokens, started, first_at, last_at, emitted),
                                      FinishKind.ABORTED)
                    return
                done = False
                for line in stream.parser.lines(data):
                    chunk = parse_chunk(stream.api, stream.parser.parse(line))
                    text = chunk.text
                    if chunk.tool_calls:
                        text += render_tool_calls(chunk.tool_calls)
                    pieces = conv.push(text) if text else []
                    if chunk.done:
                        pieces += conv.flush()
                        prompt_tokens = int(chunk.counters.get("prompt_eval_count") or 0)
                        done, done_reason = True, chunk.done_reason
                    now = time.monotonic()
                    for piece in pieces:
                        if capped:
                            continue
                        if first_at is None:
                            first_at = self.last_first_piece_at = now
                        last_at = now
                        emitted += 1
                        yield TokenEvent(piece.token_id, piece.text, piece.state)
                        capped = 0 < limit <= emitted
                    if done:
                        break
                if capped and not told and not done:
                    # The server was not told the limit: stop here, as the native backend stops an
                    # older runtime; the answer is freed at the server like an abandoned one.
                    finished = True
                    why = f"stopped at its {limit}-token limit"
                    yield FinishEvent(self._stats(prompt_tokens, started, first_at, last_at, emitted),
                                      FinishKind.LENGTH)
                    return
                if not done and stream.eof:
                    if stream.api != API_EARLY:
                        raise StreamBroken(f"the rkllama server at {self.client.url} ended the answer without its "
                                           "final line (done: true); did it crash?")
                    done = True  # the early API just ends the stream after the last token
                    for piece in conv.flush():
                        if capped:
                            break
                        emitted += 1
                        yield TokenEvent(piece.token_id, piece.text, piece.state)
                        capped = 0 < limit <= emitted
                if done:
                    finished = True
                    stream.release()
                    stream = None
                    cut = capped or done_reason == "length" or (ceiling > 0 and emitted >= ceiling)
                    yield FinishEvent(self._stats(prompt_tokens, started, first_at, last_at, emitted),
                                      FinishKind.LENGTH if cut else FinishKind.STOP)
                    return
        finally:
            self._running = False
            if self._abort_fut is abort_fut:
                self._abort_fut = None
            if stream is not None:
                # Aborted, failed or abandoned mid-answer: the server may still be generating.
                self._stop_at_server(stream, info, why if finished else "ended early")

    async def embed(self, inp: EmbeddingInput) -> EmbeddingOutput:
        """The server's embedding of `inp.text` (or of its tokens decoded): one pooled row."""
        import numpy as np

        self._check_open()
        if self._model is None or self._tok is None:
            raise GenerationError("no model is loaded")
        if self._running:
            raise GenerationError("the rkllama backend is busy: one generation at a time")
        await self._settle()
        info = await self.client.info()
        self.note_server(info)
        if not info.embeddings:
            raise EmbeddingUnsupported(f"the rkllama server at {self.client.url} ({info.label}) gives no "
                                       f"embeddings: {EMBEDDINGS_HINT}")
        text = inp.text or (self._tok.decode(list(inp.token_ids), skip_special_tokens=False,
                                             clean_up_tokenization_spaces=False) if inp.token_ids else "")
        if not text:
            raise GenerationError("nothing to embed: the input is empty")
        name = await self.resolve_name(self._model)
        try:
            vector = await self.client.embed(name, text)
        except EmbeddingUnsupported:
            self.capabilities = dataclasses.replace(self.capabilities, embeddings=False)
            raise
        return EmbeddingOutput(hidden=np.asarray([vector], dtype=np.float32), pooled=True)

    def note_server(self, info: ServerInfo) -> None:
        """Capabilities follow the server detected last (it may have restarted as another version)."""
        self.capabilities = capabilities_for(info)

    # -- helpers ----------------------------------------------------------------------------------
    def _tokenizer(self, folder: Any) -> tuple[Any, VocabFacts]:
        """The model's tokenizer and what the text-to-token converter needs of it, read now so
        that no answer pays for it (blocking: run in a thread)."""
        tok = load_tokenizer(folder, self.config.allow_network)
        return tok, VocabFacts.of(tok)

    def _check_open(self) -> None:
        if self.closed:
            raise GenerationError("the rkllama runtime was closed")

    def _first_token_error(self) -> str:
        return (f"the rkllama server at {self.client.url} sent no answer within "
                f"{self.client.first_token_timeout:g} s (RKLLM_SERVER_FIRST_TOKEN_TIMEOUT; it includes loading the "
                "model and the prompt)")

    @staticmethod
    def _stats(prompt_tokens: int, started: float, first_at: float | None, last_at: float, emitted: int) -> GenerationStats:
        first = first_at if first_at is not None else last_at
        return GenerationStats(prefill_tokens=prompt_tokens, prefill_ms=(first - started) * 1000,
                               decode_tokens=emitted, decode_ms=max(0.0, last_at - first) * 1000)

    async def _race(self, aw: Any, abort_fut: asyncio.Future[None], timeout: float | None, error: str, *,
                    cancel: bool = True) -> Any:
        """Await `aw` unless abort() or the timeout comes first (then `aw` is cancelled, if `cancel`)."""
        task = asyncio.ensure_future(aw)
        try:
            done, _ = await asyncio.wait((task, abort_fut), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        if task in done:
            return task.result()
        if cancel:
            task.cancel()
        task.add_done_callback(_consume)
        if abort_fut.done():
            raise _Aborted()
        raise GenerationError(error)

    async def _open(self, inp: GenerationInput) -> tuple[ChatStream, ServerInfo]:
        """Send the conversation. A server that lost its model (it restarted) gets it loaded again,
        once; one that restarted with another API generation is detected afresh."""
        assert self._model is not None
        for attempt in (1, 2, 3):
            info = await self.client.info()
            self.note_server(info)
            name = await self.resolve_name(self._model)
            messages = wire_messages(inp.messages or (), early=info.api == API_EARLY)
            tools = jsonable(list(inp.tools)) if inp.tools and info.api != API_EARLY else None
            if inp.tools and info.api == API_EARLY:
                log.warning("the early rkllama API takes no tools: the request's tools are not sent")
            try:
                return await self.client.open_chat(name, messages, tools, wire_options(inp, info)), info
            except ServerChanged as exc:
                log.warning("%s: detecting its API again", exc)
                self._names.clear()
                if attempt == 3:
                    raise
            except ServerNotLoaded:
                if attempt == 3:
                    raise
                # It restarted (perhaps upgraded): look at it afresh; the Ollama-style API loads on demand.
                self.client.forget()
                if (await self.client.info()).api == API_EARLY:
                    log.warning("rkllama at %s lost its model (restarted?): loading %s again", self.client.url, name)
                    await self.client.load(name)
                else:
                    self._names.clear()
            except ModelNotFound:
                self._names.pop(self._model.model_id, None)
                if attempt == 3:
                    raise
        raise AssertionError("unreachable")

    async def resolve_name(self, model: ModelSpec) -> str:
        """The server's name for `model`: the catalog's remote_name if the server has it, else the
        model id or folder name matched against the server's list."""
        cached = self._names.get(model.model_id)
        if cached is not None:
            return cached
        names = await self.client.list_models()
        name = match_remote_name(names, model.remote_name, model.model_id, model.path.parent.name, model.path.stem)
        if name is None:
            shown = ", ".join(names) if names else "none"
            raise ModelNotFound(f"the rkllama server at {self.client.url} has no model {model.remote_name or model.model_id!r} "
                                f"(it has: {shown}); name the server's model in the Modelfile with "
                                f"RKLLAMA_NAME=\"...\" or copy the model folder into rkllama's models folder")
        self._names[model.model_id] = name
        return name

    def _stop_at_server(self, stream: ChatStream, info: ServerInfo | None, why: str) -> None:
        """An answer we stopped reading: free the server for the next request (which waits for it)."""
        self.cleanups += 1
        if stream.eof:
            stream.release()
            return
        log.info("rkllama: answer %s; freeing the server for the next request", why)
        self._cleanup = asyncio.ensure_future(self._free_server(stream, info))

    async def _free_server(self, stream: ChatStream, info: ServerInfo | None) -> None:
        if info is not None and info.workers:
            await self._drain_then_unload(stream, self._remote)
        else:  # this server cannot stop a generation: read the rest of it
            await self._drain(stream)

    async def _free_after_open(self, opening: asyncio.Future[Any], deadline: float) -> None:
        """A request given up on before the server answered: rkllama sends its headers only with
        the first piece, so it has most likely reached the server, which generates it unseen.

        A worker server can stop it: the open is awaited only until the request's own first-token
        deadline, never longer (an open that timed out is not waited for at all), and then the
        model is unloaded at once, which ends the generation (rkllama lets it run for at most
        30 s more). A one-model server cannot stop it, and its text would leak into the next
        answer: there the answer is awaited for up to one more first-token timeout and read to
        its end."""
        try:
            info = await self.client.info()
        except RKLLMError as exc:  # the server went away: nothing left to free
            opening.cancel()
            log.debug("rkllama: an abandoned request's server is gone: %r", exc)
            return
        wait = max(0.0, deadline - time.monotonic()) if info.workers else self.client.first_token_timeout
        try:
            stream, info = await asyncio.wait_for(asyncio.shield(opening), wait)
        except asyncio.TimeoutError:
            opening.cancel()
            if info.workers:
                await self._unload_to_stop(self._remote)
            else:
                log.warning("rkllama: an abandoned request never got an answer; the server may still be "
                            "generating it and mix it into the next answer")
            return
        except Exception as exc:
            log.debug("rkllama: an abandoned request never got an answer: %r", exc)
            return
        self.cleanups += 1
        await self._free_server(stream, info)

    async def _unload_to_stop(self, name: str | None) -> None:
        """Worker servers: unloading the model is the only way to end a generation."""
        self.unloads_for_abort += 1
        log.info("rkllama: unloading %s at the server to stop an abandoned generation", name)
        await self.client.unload(name)

    async def _read_to_end(self, stream: ChatStream, within: float | None = None) -> bool:
        """Read `stream` to its end; False if `within` seconds passed first. Each read is bounded
        by one deadline rather than by a wait_for around this loop: on Python < 3.12 an outer
        wait_for whose cancel lands as an inner read completes is swallowed, and the loop would
        read a long abandoned answer to its end instead of stopping it."""
        wait = max(self.client.first_token_timeout, self.client.chunk_timeout)
        deadline = None if within is None else time.monotonic() + within
        while not stream.eof:
            left = wait if deadline is None else min(wait, deadline - time.monotonic())
            if deadline is not None and left <= 0:
                return False
            try:
                await asyncio.wait_for(stream.read(), left)
            except asyncio.TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                raise
        return True

    async def _drain(self, stream: ChatStream) -> None:
        """Read an abandoned answer to its end, so the server is idle for the next one. A read may
        wait as long as a first piece may take: the answer may have been given up on for being slow."""
        try:
            await self._read_to_end(stream)
        except (asyncio.TimeoutError, Exception) as exc:
            log.warning("rkllama: could not read an abandoned answer to its end (%r); the server may still be "
                        "generating it and mix it into the next answer", exc)
        finally:
            stream.close()

    async def _drain_then_unload(self, stream: ChatStream, name: str | None) -> None:
        try:
            if await self._read_to_end(stream, within=self.abandon_drain_s):
                return
        except Exception as exc:  # the stream broke: the worker may still be generating
            log.debug("rkllama: abandoned answer: %r", exc)
        finally:
            stream.close()
        await self._unload_to_stop(name)

    async def _settle(self) -> None:
        task = self._cleanup
        if task is None:
            return
        try:
            await asyncio.shield(task)
        except Exception as exc:
            log.debug("rkllama clean-up failed: %r", exc)
        finally:
            if self._cleanup is task:
                self._cleanup = None


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
