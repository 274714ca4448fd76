"""What the benchmark talks to: exo's ChatGPT API, an rkllama server, or the runtime in-process.

All three sit behind one small protocol (`Target.chat(messages) -> ChatResult`)
so the runner measures them the same way and their figures can be divided by
one another. A target only records what it saw and when (arrival times,
text, what the server reported); the arithmetic lives in metrics.py and the
token counting in `TokenCounter`, so both are identical for every target.

The stream accumulators (`ExoStreamAccumulator`, `RkllamaStreamAccumulator`)
are plain classes fed (time, chunk), so the tests replay recorded streams
through them without a network or a clock. Talking to rkllama (detection,
loading, the wire formats of both API generations) is the project's own
`RkllamaClient`, and models come from the project's `Catalog`: the bench
measures what exo-rkllm would serve, not a re-implementation of it.
"""
from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from exo_rkllm.models.catalog import Catalog
from exo_rkllm.config import Config
from exo_rkllm.errors import RKLLMError
from exo_rkllm.runtime.base import FinishEvent, GenerationInput, ModelSpec, TokenEvent, split_prompt
from exo_rkllm.runtime.rkllama.client import (API_EARLY, API_OLLAMA, Chunk, RkllamaClient, match_remote_name,
                                      parse_chunk)
from exo_rkllm.models.tokenizer import load_tokenizer, stop_token_ids

Messages = Sequence[Mapping[str, Any]]


class TargetError(RuntimeError):
    """A target could not be reached or answered with an error; the message is shown to the user."""


# -- results -----------------------------------------------------------------------------------
@dataclass
class ChatResult:
    """One request as the client saw it. Times are time.monotonic() seconds."""

    t_start: float
    t_end: float = 0.0
    t_first: float | None = None  # first event carrying text
    token_times: list[float] = field(default_factory=list)  # arrival of each token-bearing event
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None  # tokens of the templated prompt (see prompt_tokens_source)
    prompt_tokens_source: str | None = None  # "tokenizer" (the bench's template count) or "server"
    completion_tokens: int | None = None  # exact count when the target sees token ids
    completion_source: str | None = None  # where completion_tokens came from
    chunks: int = 0  # stream chunks / runtime events received
    content_chunks: int = 0  # of those, the ones with non-empty text
    prefill_tokens: int | None = None  # tokens actually prefilled; None: not visible to this target
    restored_tokens: int | None = None  # prompt tokens restored from a saved KV state (exo-rkllm's status route)
    # The counts are the bench's (or exo's) template count while the server that prefilled
    # templates the messages itself and may add its own system prompt: an estimate.
    prompt_tokens_estimated: bool = False
    prefill_tokens_estimated: bool = False
    stripped: list[str] = field(default_factory=list)  # special-token text removed from the answer's text
    server: dict[str, Any] = field(default_factory=dict)  # counters the server itself reported
    notes: list[str] = field(default_factory=list)

    def add_text(self, t: float, text: str) -> None:
        """Record a piece of answer text that arrived at time `t` (empty pieces count for nothing)."""
        if not text:
            return
        self.content_chunks += 1
        self.text += text
        if self.t_first is None:
            self.t_first = t


# -- token counting ----------------------------------------------------------------------------
class TokenCounter:
    """Counts tokens with the model's own tokenizer: word counts would flatter or punish a
    model depending on language and code, and users compare models by these numbers."""

    def __init__(self, tokenizer: Any, source: str) -> None:
        self.tok = tokenizer
        self.source = source
        self.stop_ids = stop_token_ids(tokenizer)
        self.stop_texts = frozenset(t for t in (tokenizer.convert_ids_to_tokens(i) for i in self.stop_ids) if t)
        # Every special token's text: none of it belongs in an answer a client reads.
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special_ids = frozenset({int(i) for i in tokenizer.all_special_ids}
                                     | {int(i) for i, t in added.items() if getattr(t, "special", False)})
        self.special_texts = frozenset({str(t) for t in tokenizer.all_special_tokens}
                                       | {str(t.content) for t in added.values() if getattr(t, "special", False)}
                                       | self.stop_texts)

    @classmethod
    def from_dir(cls, folder: Path | str) -> "TokenCounter":
        return cls(load_tokenizer(folder), str(folder))

    def template(self, messages: Messages) -> str:
        return self.tok.apply_chat_template([dict(m) for m in messages], tokenize=False, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def count_prompt(self, messages: Messages) -> int:
        return len(self.encode(self.template(messages)))

    def count_text(self, text: str) -> int:
        return len(self.encode(text)) if text else 0

    def strip_stop(self, text: str) -> tuple[str, bool]:
        """Remove an end-of-turn marker a server echoed as text at the end (exo decodes the EOS token)."""
        for marker in self.stop_texts:
            if marker and text.endswith(marker):
                return text[: -len(marker)], True
        return text, False


# -- the protocol ------------------------------------------------------------------------------
class Target(Protocol):
    kind: str  # "runtime" | "exo" | "rkllama"
    label: str

    async def open(self) -> None:
        """Connect / load; raises TargetError with a reason the user can act on."""

    async def chat(self, messages: Messages) -> ChatResult:
        """Send one conversation, stream the answer, return what was seen."""

    def describe(self) -> dict[str, Any]:
        """Facts for the report: backend, runtime version, URL, pacing..."""

    async def close(self) -> None: ...


# -- local model resolution --------------------------------------------------------------------
@dataclass(frozen=True)
class LocalModel:
    """A model on this machine: what the in-process runtime loads and whose tokenizer counts tokens."""

    model_id: str  # the id exo's API knows it by
    spec: ModelSpec
    folder: Path
    tokenizer_dir: Path | None
    source: str  # where it was resolved: "catalog"


def resolve_local_model(config: Config, name: str | None, max_new_tokens: int = 0) -> LocalModel:
    """Find `name` (or the only servable model) in the project's catalog of config.models_dir.

    The catalog decides the model ids exo's API uses, the context length and the
    tokenizer, so the bench reads them from it rather than scanning on its own:
    the figures are then for the model exactly as exo would serve it.
    """
    catalog = Catalog(config)
    try:
        if name is None:
            servable = catalog.servable()
            if len(servable) == 1:
                entry = servable[0]
            elif not servable:
                broken = "; ".join(f"{e.model_id}: {e.problem}" for e in catalog.entries() if e.problem)
                raise TargetError(f"no servable model in {config.models_dir} (set RKLLM_MODELS_DIR or --models-dir, "
                                  "or use --sim for the demo model)" + (f"; {broken}" if broken else ""))
            else:
                raise TargetError(f"several models in {config.models_dir}: choose one with --model "
                                  f"({', '.join(e.model_id for e in servable)})")
        else:
            entry = catalog.resolve(name)
        spec = entry.spec(config)
    except RKLLMError as exc:
        raise TargetError(str(exc)) from None
    if max_new_tokens:
        spec = replace(spec, max_new_tokens=max_new_tokens)
    return LocalModel(entry.model_id, spec, entry.folder, entry.tokenizer_dir, "catalog")


# -- in-process runtime ------------------------------------------------------------------------
class RuntimeTarget:
    """The RKLLM runtime in this process (native or simulated): the baseline exo is compared with.

    It does what the engine must do and nothing more: apply the chat template,
    tokenize, feed token ids. With KV reuse on it keeps the cache across
    requests and prefills only the new suffix when the previous context is a
    prefix of the new prompt, as the scheduler does, so multi-turn prefill
    counts are real. Requests are serialised: one NPU context runs one
    generation at a time.
    """

    kind = "runtime"

    def __init__(self, config: Config, model: LocalModel, counter: TokenCounter, *, max_new_tokens: int = 0,
                 kv_reuse: bool | None = None, runtime: Any = None) -> None:
        self.config = config
        self.model = model
        self.counter = counter
        self.max_new_tokens = max_new_tokens
        self.kv_reuse = config.kv_reuse if kv_reuse is None else kv_reuse
        self.runtime = runtime
        self.label = f"runtime ({config.backend})"
        self._cached: list[int] = []
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self.load_s: float | None = None

    async def open(self) -> None:
        from exo_rkllm.runtime.factory import create_runtime

        if self.runtime is None:
            try:
                self.runtime = await create_runtime(self.config)
            except Exception as exc:
                raise TargetError(f"cannot create the {self.config.backend} runtime: {exc}") from exc
        t0 = time.monotonic()
        try:
            await self.runtime.load(self.model.spec)
        except Exception as exc:
            raise TargetError(f"cannot load {self.model.spec.path}: {exc}") from exc
        self.load_s = time.monotonic() - t0
        self.label = f"runtime ({self.runtime.capabilities.backend})"

    def describe(self) -> dict[str, Any]:
        caps = getattr(self.runtime, "capabilities", None)
        out: dict[str, Any] = {
            "kind": self.kind, "backend": getattr(caps, "backend", self.config.backend),
            "runtime_version": getattr(caps, "version", None), "model_id": self.model.model_id,
            "model_file": self.model.spec.path.name, "kv_reuse": self.kv_reuse,
            "max_new_tokens": self.max_new_tokens or None, "load_s": self.load_s,
        }
        timing = getattr(self.runtime, "timing", None)
        if timing is not None:
            out["sim_pacing_ms"] = {"load": timing.load_ms, "prefill_base": timing.prefill_base_ms,
                                    "prefill_per_token": timing.prefill_ms_per_token,
                                    "decode_per_token": timing.decode_ms_per_token}
        return out

    async def chat(self, messages: Messages) -> ChatResult:
        t_start = time.monotonic()  # before queueing: a waiting client's latency includes the wait
        async with self._lock:  # one NPU context: concurrent clients queue here, as behind the scheduler
            return await self._chat(messages, t_start)

    async def _chat(self, messages: Messages, t_start: float) -> ChatResult:
        rt = self.runtime
        res = ChatResult(t_start=t_start)
        ids = self.counter.encode(self.counter.template(messages))
        res.prompt_tokens = len(ids)
        reuse = self.kv_reuse and getattr(rt.capabilities, "keep_history", False)
        keep = split_prompt(ids, self._cached) if reuse and self._cached else -1
        if keep <= 0 or keep >= len(ids):  # nothing reusable (or nothing new to feed): start clean
            keep = 0
            if reuse and getattr(rt.capabilities, "clear_kv_cache", False):
                await rt.clear_kv_cache()  # also after a failed run, whose cache content is unknown
        feed = tuple(ids[keep:])
        if keep:
            res.notes.append(f"kv reuse: {keep} cached tokens")
        inp = GenerationInput(request_id=f"bench-{next(self._ids)}", token_ids=feed, keep_history=bool(reuse),
                              max_new_tokens=self.max_new_tokens)
        generated: list[int] = []
        stats = None
        self._cached = []  # unknown until the run finishes cleanly
        async for ev in rt.generate(inp):
            now = time.monotonic()
            res.chunks += 1
            if isinstance(ev, TokenEvent):
                if ev.token_id in self.counter.stop_ids:  # some runtimes report the EOS token itself
                    continue
                generated.append(ev.token_id)
                if ev.token_id in self.counter.special_ids:  # hidden by the decode below: say so
                    res.stripped.append(str(self.counter.tok.convert_ids_to_tokens(ev.token_id)))
                res.token_times.append(now)
                res.add_text(now, ev.text)
            elif isinstance(ev, FinishEvent):
                stats = ev.stats
                if ev.aborted:
                    res.notes.append("aborted")
        res.t_end = time.monotonic()
        # The answer's text is the decode of every generated id, as a server returns it; the
        # callback's text holds back the bytes of a character the cap cut in half.
        full = self.counter.tok.decode(generated, skip_special_tokens=True)
        if full != res.text:
            res.notes.append(f"streamed text ({len(res.text)} chars) differs from the decode of the ids "
                             f"({len(full)} chars): a character cut by the length cap")
            res.text = full
        res.completion_tokens = len(generated)
        res.completion_source = "token ids"
        res.prompt_tokens_source = "tokenizer"
        capped = bool(self.max_new_tokens) and len(generated) >= self.max_new_tokens
        res.finish_reason = "length" if capped else "stop"
        if stats is not None:
            res.prefill_tokens = stats.prefill_tokens
            res.server = {"prefill_ms": stats.prefill_ms, "decode_ms": stats.decode_ms,
                          "decode_tokens": stats.decode_tokens, "memory_mb": stats.memory_mb}
        else:
            res.prefill_tokens = len(feed)
        if reuse:
            # What the KV cache now holds: the prompt, and every generated token that was fed
            # back; a run cut at the length limit never fed its last sampled token.
            self._cached = ids + (generated[:-1] if capped and generated else generated)
        return res

    async def close(self) -> None:
        if self.runtime is not None:
            try:
                await self.runtime.close()
            finally:
                self.runtime = None


# -- exo's ChatGPT API -------------------------------------------------------------------------
def parse_sse_line(line: bytes | str) -> dict[str, Any] | str | None:
    """One line of an SSE stream: the JSON of a `data:` line, "[DONE]", or None for anything else."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    line = line.strip()
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return "[DONE]"
    if not payload:
        return None
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


async def stream_chat(session: Any, url: str, body: Mapping[str, Any],
                      on_chunk: Callable[[Mapping[str, Any]], None] | None = None) -> tuple[float, str]:
    """One streamed chat request, as the benchmark scripts time it: (seconds from sending it to the first
    chunk with text, NaN if none came; the whole text). `session` is an aiohttp.ClientSession;
    `on_chunk` sees every JSON chunk (its `id` is `chatcmpl-` + exo's request id, which the engine's
    status route records the run under)."""
    t0 = time.monotonic()
    first, text = None, ""
    async with session.post(f"{url}/v1/chat/completions", json={**body, "stream": True}) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            chunk = parse_sse_line(raw)
            if not isinstance(chunk, dict):
                continue
            if on_chunk is not None:
                on_chunk(chunk)
            piece = ((chunk.get("choices") or [{}])[0].get("delta") or {}).get("content") or ""
            if piece and first is None:
                first = time.monotonic() - t0
            text += piece
    return (first if first is not None else float("nan")), text


class ExoStreamAccumulator:
    """Turns exo's streamed chunks into a ChatResult.

    exo writes one chunk per token it receives from the engine (its `on_token`
    callback). With finish_reason "stop" the last chunk is the EOS token: not an
    answer token, so it is not counted or timed as one; its text, if any, is
    kept unless it is the EOS marker itself (plain exo decodes EOS into the
    content as `<|im_end|>`), which is dropped and noted. With "length" (exo's
    --max-generate-tokens) the last chunk is a real token.
    """

    def __init__(self, t_start: float, stop_texts: frozenset[str] = frozenset()) -> None:
        self.res = ChatResult(t_start=t_start)
        self.stop_texts = stop_texts
        self.eos_echoed = False
        self.request_id: str | None = None

    def feed(self, t: float, chunk: Mapping[str, Any]) -> None:
        res = self.res
        res.chunks += 1
        cid = chunk.get("id")
        if self.request_id is None and isinstance(cid, str):
            self.request_id = cid[len("chatcmpl-"):] if cid.startswith("chatcmpl-") else cid
        if "system_fingerprint" in chunk:
            res.server.setdefault("system_fingerprint", chunk["system_fingerprint"])
        choices = chunk.get("choices") or [{}]
        choice = choices[0] if isinstance(choices[0], dict) else {}
        delta = choice.get("delta") or choice.get("message") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        finish = choice.get("finish_reason")
        if finish:
            res.finish_reason = finish
        if isinstance(chunk.get("usage"), dict):
            res.server["usage"] = chunk["usage"]
        if finish == "stop" or (finish and not content):
            # finish_reason "stop" means exo's last token was EOS: this chunk is that token, not
            # an answer token. Plain exo decodes EOS into the text (`<|im_end|>`); exo-rkllm sends
            # the text it still held back (a character cut by the cap decodes to U+FFFD), or "".
            if isinstance(content, str) and content in self.stop_texts:
                self.eos_echoed = True
                res.stripped.append(content)
            elif isinstance(content, str):
                res.add_text(t, content)
            return
        res.token_times.append(t)  # exo's contract: each chunk is one token
        if isinstance(content, str):
            res.add_text(t, content)

    def finish(self, t_end: float) -> ChatResult:
        self.res.t_end = t_end
        self.res.server["token_chunks"] = len(self.res.token_times)
        if self.eos_echoed:
            self.res.server["eos_text_echoed"] = True
        bad = self.res.text.count("\ufffd")
        if bad:
            self.res.notes.append(f"{bad} U+FFFD replacement characters in the streamed text")
        return self.res


class ExoApiTarget:
    """exo's ChatGPT-compatible API, streaming, so TTFT is what a chat client feels."""

    kind = "exo"

    def __init__(self, url: str, model_id: str, counter: TokenCounter | None, *, timeout_s: float = 600.0,
                 label: str | None = None, status_urls: Sequence[str] = ()) -> None:
        self.url = url.rstrip("/")
        # A ring's nodes (this API's node included): a request may run on any of them, and only the
        # node that ran it has its record (GET /v1/rkllm/status, `recent`).
        self.status_urls = [u.rstrip("/") for u in status_urls]
        self.model_id = model_id
        self.counter = counter
        self.timeout_s = timeout_s
        self.label = label or "exo API"
        self._session: Any = None
        self.fingerprint: str | None = None
        self.listed: bool | None = None
        self.extra: dict[str, Any] = {}
        self.engine_status: dict[str, Any] | None = None  # exo-rkllm's /v1/rkllm/status, when exo runs our engine

    async def open(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=5))
        try:
            async with self._session.get(f"{self.url}/v1/models") as resp:
                if resp.status != 200:
                    raise TargetError(f"{self.url}/v1/models answered HTTP {resp.status}")
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            await self.close()
            raise TargetError(f"exo is not reachable at {self.url} ({exc.__class__.__name__}: {exc}); start it, "
                              "or pass --start-exo") from None
        ids = {m.get("id") for m in data.get("data", []) if isinstance(m, dict)}
        self.listed = self.model_id in ids
        if not self.listed:
            await self.close()
            raise TargetError(f"exo at {self.url} does not list the model {self.model_id!r} "
                              f"({len(ids)} models listed); pass the id it uses with --model")
        self.engine_status = await self._status()

    async def _status(self, url: str | None = None) -> dict[str, Any] | None:
        """exo-rkllm's status route (of this API's node, or of `url`): with it, per-request engine stats
        (tokens actually prefilled) become visible through exo; plain exo has no such route and that is fine."""
        try:
            async with self._session.get(f"{url or self.url}/v1/rkllm/status") as resp:
                if resp.status == 200:
                    data = await resp.json(content_type=None)
                    return data if isinstance(data, dict) else None
        except Exception:
            pass
        return None

    async def _engine_run(self, request_id: str) -> dict[str, Any] | None:
        """The engine's summary of one finished request (matched by exo's request id). On a ring it
        is looked for on every node, and says which ran it (`node_id`, the node's own ring id)."""
        for attempt in range(3):
            status = await self._status()
            if status is not None:
                self.engine_status = status  # the latest: runtime and version are known once a model ran
            for url in [self.url, *(u for u in self.status_urls if u != self.url)]:
                node_status = status if url == self.url else await self._status(url)
                for run in (node_status or {}).get("recent") or []:
                    if isinstance(run, dict) and run.get("request_id") == request_id:
                        if self.status_urls:
                            ring = (node_status or {}).get("ring") or {}
                            run = {**run, "node_id": ring.get("node_id") or url}
                        return run
            if status is None:
                return None
            await asyncio.sleep(0.05 * (attempt + 1))
        return None

    def describe(self) -> dict[str, Any]:
        out = {"kind": self.kind, "url": self.url, "model_id": self.model_id,
               "system_fingerprint": self.fingerprint, "engine_stats_visible": self.engine_status is not None,
               **({"status_urls": list(self.status_urls)} if self.status_urls else {}), **self.extra}
        if self.engine_status:
            rt = self.engine_status.get("runtime") or {}
            out.update(backend=rt.get("backend") or self.engine_status.get("backend"),
                       runtime_version=rt.get("version"))
        return out

    async def _prompt_tokens(self, messages: Messages) -> tuple[int | None, str | None]:
        if self.counter is not None:
            return self.counter.count_prompt(messages), "tokenizer"
        try:  # exo's own count, with exo's tokenizer and template
            async with self._session.post(f"{self.url}/v1/chat/token/encode",
                                          json={"model": self.model_id, "messages": list(messages)}) as resp:
                if resp.status == 200:
                    return int((await resp.json(content_type=None))["num_tokens"]), "exo"
        except Exception:
            pass
        return None, None

    @property
    def server_templates(self) -> bool:
        """exo's engine runs on an rkllama server, which templates the messages itself (and may add
        its own system prompt): exo's and the bench's token counts are then estimates."""
        rt = (self.engine_status or {}).get("runtime") or {}
        return (rt.get("backend") or (self.engine_status or {}).get("backend")) == "rkllama"

    async def chat(self, messages: Messages) -> ChatResult:
        import aiohttp

        prompt_tokens, prompt_source = await self._prompt_tokens(messages)  # before the clock: not exo's work
        body = {"model": self.model_id, "messages": [dict(m) for m in messages], "stream": True}
        acc = ExoStreamAccumulator(time.monotonic(), self.counter.stop_texts if self.counter else frozenset())
        try:
            async with self._session.post(f"{self.url}/v1/chat/completions", json=body) as resp:
                if resp.status != 200:
                    detail = (await resp.text())[:300]
                    raise TargetError(f"exo answered HTTP {resp.status}: {detail}")
                async for line in resp.content:
                    now = time.monotonic()
                    chunk = parse_sse_line(line)
                    if isinstance(chunk, dict):
                        if "detail" in chunk and "choices" not in chunk:
                            raise TargetError(f"exo reported: {chunk['detail']}")
                        acc.feed(now, chunk)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise TargetError(f"request to exo failed: {exc.__class__.__name__}: {exc}") from None
        res = acc.finish(time.monotonic())
        self.fingerprint = self.fingerprint or res.server.get("system_fingerprint")
        res.prompt_tokens, res.prompt_tokens_source = prompt_tokens, prompt_source
        if self.engine_status is not None and acc.request_id:
            run = await self._engine_run(acc.request_id)  # after the clock stopped
            if run is not None:
                res.server["engine"] = run
                if run.get("prefilled") is not None:
                    res.prefill_tokens = int(run["prefilled"])
                if run.get("restored") is not None:
                    res.restored_tokens = int(run["restored"])
        if self.server_templates:
            res.prompt_tokens_estimated = res.prompt_tokens is not None
            res.prefill_tokens_estimated = res.prefill_tokens is not None
        if res.finish_reason is None:
            res.notes.append("stream ended without finish_reason")
        if self.counter is not None:
            text, echoed = self.counter.strip_stop(res.text)
            if echoed:
                res.stripped.append(res.text[len(text):])
                res.text = text
                res.server["eos_text_echoed"] = True
            res.completion_tokens = self.counter.count_text(res.text)
            res.completion_source = "tokenizer"
        return res

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# -- rkllama server ----------------------------------------------------------------------------
class RkllamaStreamAccumulator:
    """Turns the client's parsed chunks (`parse_chunk`, either API generation) into a ChatResult."""

    def __init__(self, t_start: float) -> None:
        self.res = ChatResult(t_start=t_start)

    def feed(self, t: float, chunk: Chunk) -> None:
        res = self.res
        res.chunks += 1
        if chunk.text:
            res.token_times.append(t)
            res.add_text(t, chunk.text)
        if chunk.done:
            res.finish_reason = chunk.done_reason or "stop"
            res.server.update({k: v for k, v in chunk.counters.items() if v is not None})

    def finish(self, t_end: float, *, ended_cleanly: bool = False) -> ChatResult:
        """`ended_cleanly`: the early API has no closing object, its stream just ends after the last token."""
        res = self.res
        res.t_end = t_end
        if res.finish_reason is None and ended_cleanly:
            res.finish_reason = "stop"
            res.notes.append("the early API ends the stream without a finish_reason")
        s = res.server
        if s.get("eval_count") and s.get("eval_duration"):
            s["server_tokens_per_s"] = s["eval_count"] / (s["eval_duration"] / 1e9)
        if s.get("prompt_eval_count") is not None:
            res.prefill_tokens = int(s["prompt_eval_count"])
        return res


# Whether the client can pass Ollama options (num_predict caps the answer); without it the
# answers through rkllama are not capped, and the report says so.
_CLIENT_TAKES_OPTIONS = "options" in inspect.signature(RkllamaClient.open_chat).parameters


class RkllamaTarget:
    """An rkllama server, spoken to through exo-rkllm's own RkllamaClient (either API generation).

    It templates prompts itself, so we send messages. Prompt tokens are the server's
    own count (`prompt_eval_count`) when it reports one; otherwise our tokenizer's
    count of the template, marked as an estimate (the early API adds its own system
    prompt, so it prefills more than that).
    """

    kind = "rkllama"

    def __init__(self, url: str, model: str, counter: TokenCounter | None, *, max_new_tokens: int = 0,
                 timeout_s: float = 600.0, client: RkllamaClient | None = None) -> None:
        self.client = client or RkllamaClient(url, first_token_timeout=timeout_s, chunk_timeout=timeout_s)
        self.url = self.client.url
        self.model = model
        self.counter = counter
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s
        self.api: str | None = None  # API_OLLAMA | API_EARLY
        self.version: str | None = None
        self.label = "rkllama"
        self.load_s: float | None = None

    async def open(self) -> None:
        try:
            info = await self.client.info()
            names = await self.client.list_models()
            name = match_remote_name(names, self.model)
            if name is None:
                raise TargetError(f"the rkllama server at {self.url} has no model {self.model!r} "
                                  f"(it has: {', '.join(names) or 'none'}); pass one of those with --model")
            self.model = name
            t0 = time.monotonic()
            await self.client.load(name)  # the early API holds one model: load it unless it is the current one
            self.load_s = time.monotonic() - t0
        except RKLLMError as exc:
            await self.close()
            raise TargetError(str(exc)) from None
        except TargetError:
            await self.close()
            raise
        self.api, self.version = info.api, info.version
        self.label = f"rkllama ({info.label})"

    @property
    def caps_answers(self) -> bool:
        return bool(self.max_new_tokens) and self.api == API_OLLAMA and _CLIENT_TAKES_OPTIONS

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "url": self.url, "api": self.api, "server_version": self.version,
                "model": self.model, "max_new_tokens": self.max_new_tokens if self.caps_answers else None,
                "load_s": self.load_s}

    async def chat(self, messages: Messages) -> ChatResult:
        estimate = self.counter.count_prompt(messages) if self.counter else None
        msgs = [dict(m) for m in messages]
        options = {"options": {"num_predict": self.max_new_tokens}} if self.caps_answers else {}
        acc = RkllamaStreamAccumulator(time.monotonic())
        stream = None
        try:
            stream = await self.client.open_chat(self.model, msgs, None, **options)
            while True:
                data = await asyncio.wait_for(stream.read(), self.timeout_s)
                now = time.monotonic()
                for line in stream.parser.lines(data):
                    acc.feed(now, parse_chunk(stream.api, stream.parser.parse(line)))
                if acc.res.finish_reason is not None or stream.eof:
                    break
        except RKLLMError as exc:
            raise TargetError(f"rkllama: {exc}") from None
        except asyncio.TimeoutError:
            raise TargetError(f"rkllama at {self.url} sent nothing for {self.timeout_s:g} s") from None
        finally:
            if stream is not None:
                stream.release()
        res = acc.finish(time.monotonic(), ended_cleanly=stream.api == API_EARLY and stream.eof)
        if res.prefill_tokens is not None:  # the server's own count of what it prefilled
            res.prompt_tokens, res.prompt_tokens_source = res.prefill_tokens, "server"
        elif estimate is not None:
            res.prompt_tokens, res.prompt_tokens_source = estimate, "tokenizer"
            res.prompt_tokens_estimated = True
        if self.counter is not None:
            res.completion_tokens = self.counter.count_text(res.text)
            res.completion_source = "tokenizer"
        elif res.server.get("eval_count"):
            res.completion_tokens = int(res.server["eval_count"])
            res.completion_source = "server"
        return res

    async def close(self) -> None:
        await self.client.close()
