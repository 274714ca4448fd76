"""An in-process emulator of the RKLLM runtime, for machines without an NPU and for tests.

It follows the runtime's model rather than shortcutting it: a generation runs on
its own thread (as `rkllm_run` does), results come back through the same
callback states (NORMAL, WAITING for a split UTF-8 character, FINISH, ERROR),
prefill and decode take time like an RK3588 does, the KV cache holds exactly
the tokens that were fed through the model, `keep_history` and the context
limit behave as on the device, and an abort stops the run between tokens.

Answers are deterministic for a given context and deliberately awkward: CJK,
emoji (ZWJ sequences and flags), accents, tabs, runs of spaces and newlines,
because that is where streaming code breaks. Like greedy decoding, an answer
continues itself: the context "prompt + its first k answer tokens" goes on with
token k+1 (preemption and resume are tested on that). A prompt can steer the
simulator with directives, for tests that only reach it through exo's HTTP API:
`[[sim:tokens=N]]` (answer length), `[[sim:error_at=N]]` (report ERROR at the
Nth token of the run), `[[sim:text=...]]` (answer exactly this text). They are
read once per run from the whole context; the last of each kind wins.

At zero pacing the simulator's own work per token must stay far below the software
path it stands in front of (benchmarks/sim_cost.py measures it): nothing in the
decode loop may grow with the context or the answer.

Runtime releases. `SimRuntime(release=...)` imitates one RKLLM release line
(`SIM_RELEASES`; default "1.3.0") and its capabilities say what that release can do:

* 1.3.0: sampling and `max_new_tokens` per run (RKLLMInferParam.sampling_params and
  .max_new_tokens): a run applies `GenerationInput.sampling` (None: the model's) and stops
  itself, cleanly, at `max_new_tokens`.
* 1.2.1, 1.2.2, 1.2.3: sampling and `max_new_tokens` are fixed by rkllm_init: a run applies the
  model's sampling whatever the request asks, and the runtime stops only at the model's
  limit. A request's smaller `max_new_tokens` is enforced the way the native backend enforces
  it on these releases: it stops the runtime itself after that many tokens, so the run ends
  with a FinishEvent of kind LENGTH and `kv_cache_len()` tells exactly what the cache holds (the
  last token was not fed back).

Every run ends with the FinishKind the runtime would give: STOP when the answer ended on its
end-of-answer token, LENGTH when a token limit or the context cut it, ABORTED after abort().

Every run records the sampling it applied (`runs[i].sampling`), what the request asked
(`runs[i].requested_sampling`) and its seed (`runs[i].seed`), so tests can check that a
request's values reached the runtime. The answer itself stays greedy and deterministic
whatever the sampling: no RKLLM release takes a seed, so a seeded "random" answer would
imitate nothing, and directives and resumed answers keep working at any temperature.

Embeddings (`embed`, RKLLM's last-hidden-layer mode, in every imitated release): one float32
row per input token, of the model's width (`hidden_size` of the config.json beside the
tokenizer or the model file, else the Modelfile's `HIDDEN_SIZE`, else 1536). Row i is a
function of tokens 0..i, as a causal model's hidden state is: the same tokens give the same
rows, different ones different rows. It is paced like a prefill of its tokens and, like a run
without keep_history, leaves exactly those tokens in the KV cache.

Prompt caches (every imitated release: RKLLMPromptCacheParam and rkllm_load_prompt_cache, with
rkllm_get_kv_cache_size to say what a loaded file holds). They follow the narrowest reading of
rkllm.h, as the fake librkllmrt.so does: a run given `save_prompt_cache` writes, once it ends, the
KV state after its prefill (what the cache held with keep_history, plus its input; never the
answer), and nothing if it was aborted before its prefill was done. The file is real: the token
ids, their count and checksum, the release line and the model file's identity, written to a
temporary name and renamed. `load_prompt_cache` checks all of them (a corrupt, truncated or foreign
file is refused with the reason) and makes the KV cache hold exactly those ids. Saving and loading
are paced at `SimTiming.cache_io_ms_per_token` per token: the time to move a KV state of a 1.5B-3B
model (about 28-36 KiB per token in fp16) at about 400 MB/s, one hundredth of prefilling it.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np

from exo_rkllm.errors import ContextOverflow, EmbeddingUnsupported, GenerationError, ModelLoadError, PromptCacheError
from exo_rkllm.models.tokenizer import load_tokenizer, special_ids, stop_token_ids, token_bytes
from exo_rkllm.runtime.base import (CallState, Capabilities, EmbeddingInput, EmbeddingOutput, EventBridge, FinishEvent, FinishKind,
                   GenerationInput, GenerationStats, ModelSpec, ProgressFn, RuntimeBase, RuntimeEvent, SamplingParams,
                   TokenEvent, stream_from_thread, utf8_complete_prefix)

log = logging.getLogger("exo_rkllm.sim")

SIM_MAGIC = b"RKLLM-SIM\n"

_FRAGMENTS = (
    "The NPU on the RK3588 has three cores.", "Rockchip 芯片上的神经网络处理器很快。", "日本語のテキストも大丈夫です。",
    "한국어 문장도 있습니다.", "Ça marche très bien, même à Noël.", "Größe, Straße und Übermaß.", "¿Qué tal, señor Muñoz?",
    "🤖 robots 🚀 rockets ✨", "👩‍💻 writes code; 👨‍👩‍👧 reads it.", "Flags: 🇫🇷 🇯🇵 🇧🇷.", "Math: ∑ xᵢ² ≤ ∞, π ≈ 3.14159.",
    "Tabs\tand  double  spaces.", "\n\n", "\n- item one\n- item two\n", "```python\ndef add(a, b):\n    return a + b\n```",
    " Leading spaces matter.", "Emoji with skin tone: 👍🏽.", "Ελληνικά γράμματα: αβγ.", "Кириллица тоже работает.",
    "हिन्दी पाठ भी।", "שלום עולם", "مرحبا بالعالم", "Numbers: 145 + 278 = 423.", "Quotes “curly” and ‘single’ — dash.",
    "中文标点：你好，世界！", "Mixed 混合 text ✅ done.",
)
_DIRECTIVE = re.compile(r"\[\[sim:(tokens|error_at|text)=(.*?)\]\]", re.S)
DEFAULT_HIDDEN_SIZE = 1536  # Qwen2.5-1.5B's width: the demo model's
_EMBED_SEED = 0x5E_4B_ED  # mixed into every token's vector, so they differ from any other use of its id


@dataclass(frozen=True)
class SimRelease:
    """What one RKLLM runtime release line lets its caller do per run (rkllm.h of that release)."""

    version: str
    per_run_sampling: bool  # RKLLMInferParam.sampling_params (1.3.0 on)
    per_run_max_new_tokens: bool  # RKLLMInferParam.max_new_tokens (1.3.0 on)


SIM_RELEASES: dict[str, SimRelease] = {
    "1.2.1": SimRelease("1.2.1", per_run_sampling=False, per_run_max_new_tokens=False),
    "1.2.2": SimRelease("1.2.2", per_run_sampling=False, per_run_max_new_tokens=False),
    "1.2.3": SimRelease("1.2.3", per_run_sampling=False, per_run_max_new_tokens=False),
    "1.3.0": SimRelease("1.3.0", per_run_sampling=True, per_run_max_new_tokens=True),
}
DEFAULT_SIM_RELEASE = "1.3.0"


@dataclass
class SimTiming:
    """Milliseconds; all zero makes the simulator as fast as the host allows."""

    load_ms: float = 1500.0
    prefill_base_ms: float = 40.0
    prefill_ms_per_token: float = 8.0
    decode_ms_per_token: float = 125.0
    cache_io_ms_per_token: float = 0.08  # saving or loading a prompt cache (see the module doc)

    @classmethod
    def instant(cls) -> "SimTiming":
        return cls(0.0, 0.0, 0.0, 0.0, 0.0)


@dataclass
class SimRunRecord:
    """What one run did, for tests and benchmarks to inspect."""

    request_id: str
    keep_history: bool
    kv_before: int
    prefilled: tuple[int, ...]
    generated: list[int] = field(default_factory=list)  # grows as the run emits tokens
    aborted: bool = False
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished: float | None = None
    # The sampling this run applied: the request's on a release with per-run sampling, else the
    # model's (fixed at load time); `requested_sampling` is what the request asked (None: nothing).
    sampling: SamplingParams | None = None
    requested_sampling: SamplingParams | None = None
    seed: int | None = None  # the request's seed (recorded only: no RKLLM release takes one)
    max_new_tokens: int = 0  # the request's limit as the run got it (0: the model's)
    stopped_at_limit: bool = False  # the binding stopped the runtime at that limit (releases before 1.3.0)
    saved: int | None = None  # tokens of the prompt cache this run wrote (None: it wrote none)


@dataclass
class SimEmbedRecord:
    """What one embed() call did, for tests to inspect."""

    request_id: str
    token_ids: tuple[int, ...]
    width: int
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None


def hidden_size(model: ModelSpec) -> int:
    """The model's width: `hidden_size` of a config.json beside its tokenizer or its model file,
    else the Modelfile's HIDDEN_SIZE, else DEFAULT_HIDDEN_SIZE (blocking: reads files)."""
    folders = [f for f in (model.tokenizer_dir, model.path.parent) if f is not None]
    for folder in dict.fromkeys(folders):
        try:
            config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
            width = int(config.get("hidden_size") or 0) if isinstance(config, dict) else 0
        except (OSError, ValueError, TypeError):
            continue
        if width > 0:
            return width
    try:
        width = int(str(model.options.get("HIDDEN_SIZE", "")).strip() or 0)
    except ValueError:
        width = 0
    return width if width > 0 else DEFAULT_HIDDEN_SIZE


def embedding_rows(token_ids: tuple[int, ...], width: int) -> np.ndarray:
    """Deterministic stand-in hidden states, shape (len(token_ids), width), float32.

    Each token id has a fixed random vector; row i carries token i's vector plus a decaying sum of
    the earlier ones, so it depends on the whole prefix (as a causal model's does) and two inputs
    differing anywhere differ from there on."""
    rows = np.empty((len(token_ids), width), dtype=np.float32)
    state = np.zeros(width, dtype=np.float32)
    for i, token_id in enumerate(token_ids):
        rng = np.random.default_rng((_EMBED_SEED, int(token_id) & 0xFFFFFFFF))
        vector = rng.standard_normal(width, dtype=np.float32)
        state = np.float32(0.5) * state + vector
        rows[i] = state
    return rows


PROMPT_CACHE_FORMAT = "rkllm-sim-prompt-cache"


def model_identity(path: Path) -> str:
    """What ties a prompt cache to one model file: its resolved path, size and modification time
    (blocking: stats the file). A rewritten or replaced model file has another identity."""
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _ids_checksum(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def write_prompt_cache(path: Path, ids: list[int], release_line: str, model: str) -> None:
    """A prompt-cache file as the simulated runtime writes it: to a temporary name, then renamed."""
    body = json.dumps({"format": PROMPT_CACHE_FORMAT, "version": 1, "runtime": release_line, "model": model,
                       "n": len(ids), "ids": ids, "checksum": _ids_checksum(ids)})
    tmp = path.with_name(f"{path.name}.sim-tmp")
    tmp.write_text(body + "\n", encoding="utf-8")
    tmp.replace(path)


def read_prompt_cache(path: Path, release_line: str, model: str, max_context_len: int) -> list[int]:
    """The ids a prompt-cache file holds, checked as the runtime checks it; PromptCacheError says why not."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptCacheError(f"prompt cache {path} does not exist") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise PromptCacheError(f"invalid prompt cache {path}: truncated or corrupt ({exc})") from None
    why = None
    if not isinstance(data, dict) or data.get("format") != PROMPT_CACHE_FORMAT:
        why = "not a prompt cache file"
    elif data.get("runtime") != release_line:
        why = f"saved by runtime {data.get('runtime')}, this is {release_line}"
    elif data.get("model") != model:
        why = "saved with another model"
    else:
        ids = data.get("ids")
        if (not isinstance(ids, list) or not all(isinstance(i, int) for i in ids) or data.get("n") != len(ids)):
            why = "truncated or corrupt"
        elif data.get("checksum") != _ids_checksum(ids):
            why = "checksum mismatch (corrupt)"
        elif len(ids) > max_context_len:
            why = "longer than the model's context"
        else:
            return ids
    raise PromptCacheError(f"invalid prompt cache {path}: {why}")


def write_sim_model(path: Path, name: str, **meta: Any) -> Path:
    """Write a model file the simulator accepts (the demo model and tests use this)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"name": name, "format": 1, **meta}, ensure_ascii=False)
    path.write_bytes(SIM_MAGIC + body.encode("utf-8") + b"\n")
    return path


def read_sim_model(path: Path) -> dict[str, Any]:
    """Validate a model file as the runtime would, with the reason when it is unusable."""
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"model path is not a file: {path}")
    data = path.read_bytes()
    if not data:
        raise ModelLoadError(f"model file is empty (corrupt or still downloading?): {path}")
    if not data.startswith(SIM_MAGIC):
        # A real converted model: the simulator emulates it by name only.
        return {"name": path.stem, "format": 0, "emulated": True}
    try:
        meta = json.loads(data[len(SIM_MAGIC):].decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("header is not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"invalid model magic / corrupt header in {path}: {exc}") from None
    return meta


class SimRuntime(RuntimeBase):
    """The `sim` backend. One instance is one model context, like one RKLLM handle."""

    def __init__(self, timing: SimTiming | None = None, *, emit_eos: bool = False,
                 fail_on: Callable[[GenerationInput, int], bool] | None = None,
                 release: str = DEFAULT_SIM_RELEASE, embeddings: bool = True) -> None:
        """`release` is the RKLLM release line to imitate (a key of SIM_RELEASES); `embeddings`
        False plays a runtime or model without last-hidden-layer output (embed() refuses)."""
        if release not in SIM_RELEASES:
            raise ValueError(f"the simulator imitates RKLLM {', '.join(SIM_RELEASES)}, not {release!r}")
        self.timing = timing or SimTiming()
        self.emit_eos = emit_eos  # some runtimes report the eos token before FINISH
        self.fail_on = fail_on  # (input, token index) -> True to report ERROR there
        self.release = SIM_RELEASES[release]
        self.capabilities = Capabilities(backend="sim", version=f"sim-{self.release.version}", token_input=True,
                                         keep_history=True, clear_kv_cache=True,
                                         per_run_sampling=self.release.per_run_sampling,
                                         per_run_max_new_tokens=self.release.per_run_max_new_tokens,
                                         embeddings=embeddings, prompt_cache=True)
        self._width = DEFAULT_HIDDEN_SIZE
        self._model: ModelSpec | None = None
        self._tok: Any = None
        self._stops: frozenset[int] = frozenset()
        self._specials: frozenset[int] = frozenset()
        self._kv: list[int] = []
        self._running = threading.Event()
        self._abort = threading.Event()
        self._lock = threading.Lock()
        self.runs: list[SimRunRecord] = []
        self.embeds: list[SimEmbedRecord] = []
        self.cache_loads: list[tuple[str, int]] = []  # (path, tokens) of every prompt cache loaded
        self._identity = ""  # the loaded model file's (model_identity)
        self._to_save: tuple[str, list[int]] | None = None  # (path, state) the running run must save
        self.loads = 0
        self.closed = False

    # -- protocol -------------------------------------------------------------------------
    @property
    def loaded(self) -> ModelSpec | None:
        return self._model

    @property
    def kv_tokens(self) -> tuple[int, ...]:
        """Exactly the tokens the simulated KV cache holds."""
        return tuple(self._kv)

    def kv_cache_len(self) -> int | None:
        return len(self._kv) if self._model else None

    def is_running(self) -> bool:
        return self._running.is_set()

    async def load(self, model: ModelSpec, progress: ProgressFn | None = None) -> None:
        self._check_open()
        meta = await asyncio.to_thread(read_sim_model, model.path)
        if model.tokenizer_dir is None:
            raise ModelLoadError(f"the simulator needs the tokenizer of {model.model_id}: none was found")
        tok = await asyncio.to_thread(load_tokenizer, model.tokenizer_dir)
        width = await asyncio.to_thread(hidden_size, model)
        identity = await asyncio.to_thread(model_identity, model.path)
        steps = 10
        for i in range(steps):
            if progress:
                progress(f"loading {model.path.name}", i / steps)
            await asyncio.sleep(self.timing.load_ms / 1000 / steps)
        if progress:
            progress(f"loaded {model.path.name}", 1.0)
        self._model, self._tok, self._kv, self._width, self._identity = model, tok, [], width, identity
        self._stops = stop_token_ids(tok)
        self._specials = special_ids(tok)
        self.loads += 1
        log.debug("sim loaded %s (%s)", model.model_id, meta.get("name"))

    async def unload(self) -> None:
        await self.abort()
        self._model, self._tok, self._kv = None, None, []

    async def abort(self) -> None:
        if self._running.is_set():
            self._abort.set()

    async def clear_kv_cache(self) -> None:
        if self._running.is_set():
            raise GenerationError("clear_kv_cache while a generation is running")
        self._kv = []

    async def load_prompt_cache(self, path: str) -> None:
        """rkllm_load_prompt_cache: the KV cache holds the file's ids afterwards (see the module doc)."""
        self._check_open()
        model = self._model
        if model is None:
            raise PromptCacheError("no model is loaded")
        if not self._lock.acquire(blocking=False):
            raise PromptCacheError("rkllm_load_prompt_cache while a run is in progress")
        try:
            self._kv = []  # whatever happens next, the old state is gone
            ids = await asyncio.to_thread(read_prompt_cache, Path(path), self._release_line, self._identity,
                                          model.max_context_len)
            await asyncio.sleep(self.timing.cache_io_ms_per_token * len(ids) / 1000)
            self._kv = list(ids)
            self.cache_loads.append((str(path), len(ids)))
        finally:
            self._lock.release()

    @property
    def _release_line(self) -> str:
        return ".".join(self.release.version.split(".")[:2])

    async def close(self) -> None:
        await self.unload()
        self.closed = True

    async def generate(self, inp: GenerationInput) -> AsyncIterator[RuntimeEvent]:
        self._check_open()
        if self._model is None:
            raise GenerationError("no model is loaded")
        if not self._lock.acquire(blocking=False):
            raise GenerationError("the runtime is busy: one generation at a time per context")
        self._abort.clear()
        self._running.set()
        applied = (inp.sampling or self._model.sampling) if self.release.per_run_sampling else self._model.sampling
        record = SimRunRecord(inp.request_id, inp.keep_history, len(self._kv), tuple(inp.token_ids),
                              sampling=applied, requested_sampling=inp.sampling, seed=inp.seed,
                              max_new_tokens=inp.max_new_tokens)
        self.runs.append(record)
        # a consumer that leaves early stops the run like rkllm_abort would
        events = stream_from_thread(lambda bridge: self._run(inp, bridge, record), self._abort.set, "rkllm-sim-run")
        async with contextlib.aclosing(events):
            async for item in events:
                yield item

    async def embed(self, inp: EmbeddingInput) -> EmbeddingOutput:
        """The last hidden layer for `inp.token_ids`: one row per token (see the module doc)."""
        self._check_open()
        if not self.capabilities.embeddings:
            raise EmbeddingUnsupported(f"the simulated runtime ({self.capabilities.version}) was started without "
                                       "last-hidden-layer output: it gives no embeddings")
        model = self._model
        if model is None:
            raise GenerationError("no model is loaded")
        ids = tuple(int(i) for i in inp.token_ids)
        if not ids:
            raise GenerationError("nothing to embed: the input has no tokens")
        if len(ids) > model.max_context_len:
            raise ContextOverflow(f"the input is {len(ids)} tokens but {model.model_id} has a context of "
                                  f"{model.max_context_len} tokens")
        if not self._lock.acquire(blocking=False):
            raise GenerationError("the runtime is busy: one generation at a time per context")
        record = SimEmbedRecord(inp.request_id, ids, self._width)
        self.embeds.append(record)
        self._running.set()
        try:
            hidden = await asyncio.to_thread(self._embed_on_thread, ids, self._width)
            self._kv = list(ids)  # a run without keep_history: the cache holds its input now
        finally:
            record.finished = time.monotonic()
            self._running.clear()
            self._lock.release()
        return EmbeddingOutput(hidden=hidden, pooled=False)

    # -- the runtime thread ----------------------------------------------------------------
    def _embed_on_thread(self, ids: tuple[int, ...], width: int) -> np.ndarray:
        """A last-hidden-layer run: paced like the prefill of its tokens (the vectors' own cost
        counts towards it), blocking like rkllm_run."""
        t = self.timing
        started = time.monotonic()
        hidden = embedding_rows(ids, width)
        left = (t.prefill_base_ms + t.prefill_ms_per_token * len(ids)) / 1000 - (time.monotonic() - started)
        if left > 0:
            time.sleep(left)
        return hidden

    def _check_open(self) -> None:
        if self.closed:
            raise GenerationError("the runtime was closed")

    def _sleep(self, ms: float) -> bool:
        """Pace like the NPU; returns False if aborted meanwhile."""
        if ms <= 0:
            return not self._abort.is_set()
        return not self._abort.wait(ms / 1000)

    def _run(self, inp: GenerationInput, bridge: EventBridge, record: SimRunRecord) -> None:
        self._to_save = None
        try:
            self._generate_on_thread(inp, _SavingBridge(bridge, lambda: self._save(record)), record)
        except Exception as exc:  # the C callback never raises; report as ERROR
            record.error = repr(exc)
            bridge.push(GenerationError(f"simulated runtime failed: {exc!r}"))
        finally:
            record.finished = time.monotonic()
            self._running.clear()
            self._lock.release()

    def _generate_on_thread(self, inp: GenerationInput, bridge: "_SavingBridge", record: SimRunRecord) -> None:
        model, tok, t = self._model, self._tok, self.timing
        assert model is not None and tok is not None
        if not inp.keep_history:
            self._kv = []  # rkllm_run without keep_history starts from an empty cache
        context = self._kv + list(inp.token_ids)
        if len(context) > model.max_context_len:
            record.error = "context overflow"
            bridge.push(GenerationError(
                f"prompt of {len(context)} tokens exceeds the model's context of {model.max_context_len}"))
            return
        started = time.monotonic()
        if not self._sleep(t.prefill_base_ms + t.prefill_ms_per_token * len(inp.token_ids)):
            return self._finish_aborted(bridge, record, [], started, started)
        self._kv = context  # prefill done: the input is in the cache
        prefill_done = time.monotonic()
        if inp.save_prompt_cache:  # the state to save is this one; the runtime writes it when the run ends
            self._to_save = (inp.save_prompt_cache, list(context))

        # Read once per run, from the whole context: the decode loop below must cost next to
        # nothing, or at zero pacing the simulator hides the software path it exists to measure.
        plan = self._plan(context)
        directives, answer = plan.directives, plan.ids
        # The runtime's own limit: the run's on 1.3.0, the one rkllm_init got before. An older
        # release is stopped by its binding at the run's limit instead (`stop_at`, below).
        per_run = self.release.per_run_max_new_tokens
        limit = (inp.max_new_tokens if per_run else 0) or model.max_new_tokens or len(answer)
        stop_at = inp.max_new_tokens if not per_run and inp.max_new_tokens > 0 else 0
        room = model.max_context_len - len(context)
        answer = answer[: max(0, min(limit, room))]
        generated = record.generated  # appended in place: copying it per token would be quadratic
        pending = plan.carried
        for index, token_id in enumerate(answer):
            if index > 0 and not self._sleep(t.decode_ms_per_token):
                return self._finish_aborted(bridge, record, generated, started, prefill_done)
            if self._abort.is_set():
                return self._finish_aborted(bridge, record, generated, started, prefill_done)
            if self._should_fail(inp, index, directives):
                record.error = f"injected error at token {index + 1}"
                bridge.push(GenerationError(f"runtime reported an error at token {index + 1} (simulated fault)"))
                return
            if generated:  # the previous token is fed through the model before this one is sampled
                self._kv.append(generated[-1])
            if record.first_token_at is None:
                record.first_token_at = time.monotonic()
            if token_id in self._stops:  # sampled the end of the answer: it is never fed back
                if self.emit_eos:
                    bridge.push(TokenEvent(token_id, token_bytes(tok, token_id).decode("utf-8"), CallState.NORMAL))
                ended = FinishKind.STOP
                break
            generated.append(token_id)
            pending += token_bytes(tok, token_id)
            cut = utf8_complete_prefix(pending)
            text, pending = pending[:cut].decode("utf-8"), pending[cut:]
            state = CallState.NORMAL if text or not pending else CallState.WAITING
            bridge.push(TokenEvent(token_id, text, state))
            if stop_at and len(generated) >= stop_at:
                # The native backend on a release without a per-run limit: it aborts the runtime
                # once the run has its tokens; the last one was sampled, never fed back.
                record.stopped_at_limit = True
                end = time.monotonic()
                bridge.push(FinishEvent(GenerationStats(len(inp.token_ids), (prefill_done - started) * 1000,
                                                        len(generated), (end - prefill_done) * 1000,
                                                        1.0 + len(self._kv) / 1024), FinishKind.LENGTH))
                return
        else:  # the answer was cut (token limit or context) before its end-of-answer token
            ended = FinishKind.LENGTH
        # Ended on EOS: every emitted token was fed. Ended on the length limit: the last
        # emitted token was sampled but never fed, so the cache is one shorter.
        end = time.monotonic()
        bridge.push(FinishEvent(GenerationStats(len(inp.token_ids), (prefill_done - started) * 1000,
                                                len(generated), (end - prefill_done) * 1000, 1.0 + len(self._kv) / 1024),
                                ended))

    def _save(self, record: SimRunRecord) -> None:
        """Write the prompt cache a run was asked for, as rkllm_run does before its FINISH callback.
        A path that cannot be written costs a log line, not the run (as on the runtime)."""
        if self._to_save is None:
            return
        path, ids = self._to_save
        self._to_save = None
        time.sleep(self.timing.cache_io_ms_per_token * len(ids) / 1000)
        try:
            write_prompt_cache(Path(path), ids, self._release_line, self._identity)
        except OSError as exc:
            log.error("sim: failed to save the prompt cache to %s: %s", path, exc)
            return
        record.saved = len(ids)

    def _finish_aborted(self, bridge: "_SavingBridge", record: SimRunRecord, generated: list[int],
                        started: float, prefill_done: float) -> None:
        record.aborted = True
        end = time.monotonic()
        bridge.push(FinishEvent(GenerationStats(len(record.prefilled), (prefill_done - started) * 1000,
                                                len(generated), (end - prefill_done) * 1000), FinishKind.ABORTED))

    def _should_fail(self, inp: GenerationInput, index: int, directives: SimDirectives) -> bool:
        if self.fail_on is not None and self.fail_on(inp, index):
            return True
        return directives.error_at is not None and index + 1 == directives.error_at

    # -- deterministic answers ---------------------------------------------------------------
    def _plan(self, context: list[int]) -> "SimPlan":
        """What this context generates, from one decode of it (two when it may be a resumed answer).

        Greedy decoding continues itself: a context made of a prompt and the first k tokens
        of its answer goes on with token k+1 of that answer, as a preempted and resumed run
        does on a real model. So when the context goes on after its last turn header, the
        part after the header is checked against the answer the part up to it generates."""
        tok = self._tok
        start = self._answer_start(context)
        if start < len(context):
            head = tok.decode(context[:start], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            directives = SimDirectives.parse(head)
            planned, done = answer_ids(tok, head, directives), context[start:]
            if len(done) < len(planned) and planned[:len(done)] == done:
                # the character the resumed part ends inside is completed by the next token
                tail = b"".join(token_bytes(tok, i) for i in done[-4:])
                return SimPlan(directives, planned[len(done):], tail[utf8_complete_prefix(tail):])
        text = tok.decode(context, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        directives = SimDirectives.parse(text)
        return SimPlan(directives, answer_ids(tok, text, directives))

    def _answer_start(self, context: list[int]) -> int:
        """Where an answer starts: after the line that follows the last special token (a turn
        header, `<|im_start|>assistant\n`, `<|end_header_id|>\n\n`); the end if none is found."""
        last = next((i for i in range(len(context) - 1, -1, -1) if context[i] in self._specials), None)
        if last is None:
            return len(context)
        for i in range(last + 1, len(context)):
            if b"\n" in token_bytes(self._tok, context[i]):
                return i + 1
        return len(context)


class _SavingBridge:
    """The run's bridge, but the prompt cache a run was asked for is written before its FinishEvent
    goes out (rkllm_run saves before its FINISH callback), on whichever path the run ends."""

    def __init__(self, bridge: EventBridge, save: Callable[[], None]) -> None:
        self._bridge, self._save = bridge, save

    def push(self, item: RuntimeEvent | BaseException) -> None:
        if isinstance(item, FinishEvent):
            self._save()
        self._bridge.push(item)


@dataclass(frozen=True)
class SimDirectives:
    """What a prompt asks of the simulator; the last occurrence of each directive wins."""

    tokens: int | None = None
    error_at: int | None = None
    text: str | None = None

    @classmethod
    def parse(cls, text: str) -> "SimDirectives":
        found = dict(_DIRECTIVE.findall(text))  # later matches overwrite earlier ones
        return cls(tokens=int(found["tokens"]) if "tokens" in found else None,
                   error_at=int(found["error_at"]) if "error_at" in found else None,
                   text=found.get("text"))


@dataclass(frozen=True)
class SimPlan:
    """One run's answer: the directives it obeys, the ids it emits, and the bytes of a character
    the context ends inside (a resumed answer), which the first emitted token completes."""

    directives: SimDirectives
    ids: list[int]
    carried: bytes = b""


def answer_ids(tok: Any, context_text: str, directives: SimDirectives) -> list[int]:
    """The token ids a context generates: same conversation, same answer, on every run."""
    eos = [int(tok.eos_token_id)]
    if directives.text is not None:
        return tok.encode(directives.text, add_special_tokens=False) + eos
    # Seeded by the context's text, not its ids: the same conversation gives the same answer
    # however its tokens were split (as with a real model at temperature 0, nearly).
    rng = random.Random(hashlib.sha256(context_text.encode("utf-8")).digest())
    want = directives.tokens if directives.tokens is not None else rng.randint(24, 64)
    ids = _joined_fragments(tok, rng, want)[:want]
    # A model ends its answer after a whole character: replace a split one at the end by
    # full stops, so `tokens=N` still gives exactly N tokens.
    while ids:
        data = b"".join(token_bytes(tok, i) for i in ids[-4:])
        if utf8_complete_prefix(data) == len(data):
            break
        ids.pop()
    stop = tok.encode(".", add_special_tokens=False)
    while len(ids) < want:
        ids += stop
    return ids + eos


def _joined_fragments(tok: Any, rng: random.Random, want: int) -> list[int]:
    """The ids of `" ".join(fragments)` for the fewest random fragments that give `want` ids.

    Encoding the whole join after each fragment (the obvious way) is quadratic: a second
    of CPU before the first of 4000 tokens. Byte-level BPE pre-tokenizers (GPT-2, Qwen,
    Llama 3) never let a piece run from a non-space character across a following space,
    so the join encodes as the encodings of its stretches cut there: only the stretch
    since the last such cut is re-encoded. The result is checked against one encoding of
    the whole join; a tokenizer for which the cut is not clean gets the quadratic way,
    so the answer is the same either way.
    """
    drawn: list[str] = []  # the fragments in the order the seed picks them, drawn once

    def join_ids(cut_at_spaces: bool) -> tuple[list[int], int]:
        done: list[int] = []  # ids of the join up to the last cut
        stretch, stretch_ids = "", []  # the join after the last cut, and its ids
        used = 0
        while len(done) + len(stretch_ids) < want:
            if used == len(drawn):
                drawn.append(rng.choice(_FRAGMENTS))
            if cut_at_spaces and stretch and not stretch[-1].isspace():
                done.extend(stretch_ids)
                stretch = ""
            stretch += (" " if used else "") + drawn[used]
            used += 1
            stretch_ids = tok.encode(stretch, add_special_tokens=False)
        return done + stretch_ids, used

    ids, used = join_ids(cut_at_spaces=True)
    if ids == tok.encode(" ".join(drawn[:used]), add_special_tokens=False):
        return ids
    log.debug("sim: this tokenizer does not cut the answer cleanly at spaces; encoding it whole")
    return join_ids(cut_at_spaces=False)[0]
