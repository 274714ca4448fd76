"""The native backend: one RKLLM handle driven through ctypes, in this process.

Two layers:
- `NativeSession` is synchronous and owns the handle: load (createDefaultParam,
  settings, rkllm_init), run (token input, rkllm_run blocking on the calling
  thread, callback -> events), abort, clear_kv_cache, destroy. The crash-
  isolation worker drives it directly, so tokens leave the worker from the
  callback thread with no extra hop.
- `NativeRuntime` is the async Runtime protocol on top of it: each generation
  runs rkllm_run on a dedicated thread and the callback hands events to the
  event loop through EventBridge. This is the in-process mode
  (RKLLM_NATIVE_ISOLATION=0), meant for debugging.

Everything the C side may still use is kept referenced for as long as it may
use it: the callback for the life of the handle (until rkllm_destroy returns),
the parameter struct and model path likewise, the input arrays, infer
parameters and per-run sampling struct until rkllm_run returns. The callback
never raises into C.

Per-run options, by release (see abi.py's HAS_* flags):
- sampling (`GenerationInput.sampling`): 1.3.0 takes it per run (RKLLMInferParam.sampling_params,
  which replaces every sampling value of the load for that run, so the load's mirostat settings are
  restated in it); older releases only have the load-time values of RKLLMParam, and the request's
  sampling is ignored there (`capabilities.per_run_sampling` says so).
- seed (`GenerationInput.seed`): no release of rkllm.h has a seed anywhere, so it is never applied.
- max_new_tokens: 1.3.0 takes it per run; older releases are stopped by us after that many tokens.
  Either way the run ends with FinishKind.LENGTH, as it does when the load's limit or the context
  cuts it; STOP means the runtime ended it before any limit, ABORTED that abort() came first.
- embeddings (`embed`): every release has RKLLM_INFER_GET_LAST_HIDDEN_LAYER. The run prefills the
  tokens with no history and reports the last layer's hidden states through the callback (1.1.x in
  its own state 4, RKLLM_RUN_GET_LAST_HIDDEN_LAYER; later releases in NORMAL; a FINISH carrying them
  is accepted too). The KV cache then holds the embedded text, so it is cleared right after where the
  release can clear it (1.1.x keeps no history between runs anyway).
- prompt caches (`GenerationInput.save_prompt_cache`, `load_prompt_cache`): every release has
  RKLLMPromptCacheParam and rkllm_load_prompt_cache, but only from 1.2.1 on can rkllm_get_kv_cache_size
  say what a loaded file holds, so only there are they offered (`capabilities.prompt_cache`) and used;
  elsewhere the save path is ignored. A loaded cache is released (rkllm_release_prompt_cache) before the
  next clear_kv_cache or unload, which gives the runtime its memory back.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Mapping, Sequence

from exo_rkllm.config import Config, parse_bool
from exo_rkllm.errors import (ConfigError, EmbeddingUnsupported, GenerationError, ModelLoadError, PromptCacheError,
                              RKLLMError)
from exo_rkllm.runtime.base import (CallState, Capabilities, EmbeddingInput, EmbeddingOutput, EventBridge, FinishEvent, FinishKind,
                    GenerationInput, GenerationStats, ModelSpec, ProgressFn, RuntimeBase, RuntimeEvent, SamplingParams,
                    TokenEvent, stream_from_thread, utf8_complete_prefix)
from exo_rkllm.runtime.native import abi
from exo_rkllm.runtime.native.library import RKLLMLibrary, RuntimeIdentity

log = logging.getLogger("exo_rkllm.native")

EmitFn = Callable[[TokenEvent], None]


# -- settings ------------------------------------------------------------------------------------------
def parse_cpu_mask(text: str) -> int | None:
    """RKLLM_CPU_MASK: `4-7`, `4,5,6,7`, `0xf0`; empty: None (the caller picks a default)."""
    value = text.strip().lower()
    if not value:
        return None
    try:
        if value.startswith("0x"):
            mask = int(value, 16)
        else:
            mask = 0
            for part in value.split(","):
                lo, _, hi = part.strip().partition("-")
                for cpu in range(int(lo), int(hi or lo) + 1):
                    mask |= 1 << cpu
    except ValueError:
        raise ConfigError(f"RKLLM_CPU_MASK={text!r} is not a CPU list (e.g. 4-7, 4,5,6,7 or 0xf0)") from None
    if not 0 < mask <= 0xFF:
        raise ConfigError(f"RKLLM_CPU_MASK={text!r}: the runtime takes CPUs 0 to 7")
    return mask


def soc_name() -> str | None:
    """rk3588 / rk3576 / ... from the device tree, None elsewhere (a PC running the fake runtime)."""
    try:
        compatible = Path("/proc/device-tree/compatible").read_bytes()
    except OSError:
        return None
    for soc in (b"rk3588", b"rk3576", b"rk3568", b"rk3562"):
        if soc in compatible:
            return soc.decode()
    return None


def default_cpu_mask(soc: str | None) -> int | None:
    """The big cores: CPUs 4-7 are the Cortex-A76 of the RK3588 and the Cortex-A72 of the RK3576."""
    return abi.CPU4 | abi.CPU5 | abi.CPU6 | abi.CPU7 if soc in ("rk3588", "rk3576") else None


@dataclass(frozen=True)
class NativeSettings:
    """The config rows the native backend uses, resolved once (they travel to the worker process)."""

    cpu_mask: int | None = None  # None: leave the runtime's default
    pin_process: bool = False  # restrict the whole process to cpu_mask where the release has no mask field

    @classmethod
    def from_config(cls, config: Config, *, pin_process: bool = False) -> "NativeSettings":
        mask = parse_cpu_mask(config.cpu_mask)
        if mask is None:
            mask = default_cpu_mask(soc_name())
        return cls(cpu_mask=mask, pin_process=pin_process)


def capabilities_for(identity: RuntimeIdentity) -> Capabilities:
    """What the scheduler may ask of this release."""
    layout = identity.layout
    return Capabilities(backend="native", version=identity.version, token_input=True,
                        keep_history=layout.HAS_KEEP_HISTORY, clear_kv_cache=layout.HAS_CLEAR_KV_CACHE,
                        per_run_sampling=layout.HAS_PER_RUN_SAMPLING,
                        per_run_max_new_tokens=layout.HAS_PER_RUN_MAX_NEW_TOKENS,
                        embeddings=layout.HAS_LAST_HIDDEN_LAYER,
                        # save/load exist everywhere, but only a release that reports the KV cache size
                        # lets the scheduler check what a loaded file holds (1.2.0 cannot)
                        prompt_cache=layout.HAS_KV_CACHE_SIZE)


def _option_bool(options: Mapping[str, str], key: str, default: bool) -> bool:
    try:
        return parse_bool(options.get(key, ""), empty=default)
    except ValueError:
        raise ModelLoadError(f"Modelfile {key}={options[key]!r} is not a boolean") from None


def _option_number(options: Mapping[str, str], key: str, kind: type) -> Any:
    raw = str(options.get(key, "")).strip()
    if not raw:
        return None
    try:
        return kind(raw)
    except ValueError:
        raise ModelLoadError(f"Modelfile {key}={raw!r} is not a number") from None


# -- UTF-8 ------------------------------------------------------------------------------------------------
class Utf8Joiner:
    """Turns the bytes of each callback into text that never ends inside a character.

    Runtimes differ in what a WAITING callback carries: nothing (the character comes whole
    with the next token), the partial bytes (the rest comes with the next token), or the
    partial bytes again and again until the character is whole. Whatever the runtime
    does, the concatenated output equals the bytes of the emitted tokens, once each:
    bytes that continue a held-back character are appended; text that restates the held
    bytes replaces them.
    """

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, data: bytes) -> str:
        if self.pending and data and data[0] & 0xC0 != 0x80:
            if data.startswith(self.pending):
                self.pending = b""  # the runtime restated what it held back
            else:  # an orphaned partial character: keep its bytes visible rather than lose them
                orphan, self.pending = self.pending, b""
                return orphan.decode("utf-8", "replace") + self.feed(data)
        buf = self.pending + data
        cut = utf8_complete_prefix(buf)
        self.pending = buf[cut:]
        return buf[:cut].decode("utf-8", "replace")

    def flush(self) -> str:
        rest, self.pending = self.pending, b""
        return rest.decode("utf-8", "replace")


# -- capturing what the runtime prints ------------------------------------------------------------------
@dataclass
class CapturedOutput:
    text: str = ""


@contextlib.contextmanager
def capture_native_output(echo: bool = True) -> Iterator[CapturedOutput]:
    """Collect what C code writes to stdout/stderr meanwhile (the runtime explains its failures
    there, e.g. "invalid model magic"), then write it on to our stderr so the user still sees it.
    A temporary file, not a pipe: a chatty library can never block on it."""
    result = CapturedOutput()
    libc = ctypes.CDLL(None)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield result
        finally:
            with contextlib.suppress(Exception):
                libc.fflush(None)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            raw = sink.read()
            result.text = raw.decode("utf-8", "replace")
            if echo and raw:
                with contextlib.suppress(OSError):
                    os.write(2, raw)


_MAGIC = re.compile(r"invalid[^\n]*magic|magic[^\n]*(?:mismatch|invalid|wrong)", re.I)
_TOOLKIT = re.compile(r"rkllm-toolkit version:? *v?([0-9][\w.]*?)(?:[,\s]|$)", re.I)
_MODEL_VERSION = re.compile(rb"toolkit[ _-]?version[\"']?\s*[:=]\s*[\"']?v?(\d+\.\d+\.\d+\w*)", re.I)
_LOG_PREFIX = re.compile(r"^[EWID] rkllm:\s*", re.I)  # the runtime's "E rkllm: " before each message


def runtime_complaints(output: str) -> list[str]:
    """The runtime's own reason for a refusal, from what it printed meanwhile: its last error lines (else
    its last lines), up to three, for our error message to quote."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E ") or "error" in ln.lower() or "fail" in ln.lower()]
    return errors[-3:] or lines[-3:]


def sniff_model_version(path: Path) -> str | None:
    """The rkllm-toolkit version a model file names in its first 64 KiB, if it names one."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(65536)
    except OSError:
        return None
    m = _MODEL_VERSION.search(head)
    return m.group(1).decode() if m else None


# -- the synchronous core ------------------------------------------------------------------------------------
@dataclass
class _Run:
    """One rkllm_run in flight: what its callback has seen so far."""

    emit: EmitFn
    limit: int  # tokens to pass on before stopping the runtime ourselves (0: no limit)
    cap: int = 0  # the limit the runtime applies itself (the run's on 1.3.0, else the load's; 0: none)
    room: int | None = None  # tokens the context has left for this run (None: unknown)
    joiner: Utf8Joiner = field(default_factory=Utf8Joiner)
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    tokens: int = 0
    aborted: bool = False
    abort_sent: bool = False
    limit_reached: bool = False
    error: bool = False
    finished: bool = False
    perf: GenerationStats | None = None
    emit_failed: BaseException | None = None
    hidden_mode: bool = False  # RKLLM_INFER_GET_LAST_HIDDEN_LAYER: collect the hidden layer, emit nothing
    hidden: _HiddenLayer | None = None  # the last hidden layer a callback delivered (hidden_mode)


@dataclass(frozen=True)
class _HiddenLayer:
    """The last hidden layer as a callback delivered it, copied out while its pointer was valid."""

    data: bytes  # num_tokens * embd_size float32, row-major
    num_tokens: int
    embd_size: int


# Far beyond any model on these NPUs: a layer larger than this is a garbled struct, not data.
_MAX_EMBD_SIZE = 1 << 16
_MAX_HIDDEN_TOKENS = 1 << 20


class NativeSession:
    """One RKLLM handle. Thread-safe where it must be: `abort` may come from any thread while
    `run` blocks in rkllm_run; everything else is called by one owner at a time."""

    def __init__(self, library: RKLLMLibrary, settings: NativeSettings | None = None) -> None:
        self.library = library
        self.layout = library.layout
        self.settings = settings or NativeSettings()
        self.capabilities = capabilities_for(library.identity)
        self._handle = abi.LLMHandle()
        self._keepalive: list[Any] = []  # what the C side holds for the life of the handle
        self._callback = self._make_callback()  # one callback object for the whole session
        self._run: _Run | None = None
        self._run_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self.spec: ModelSpec | None = None
        self._mirostat: tuple[int, float, float] = (0, 5.0, 0.1)  # the load's values, restated per run
        self._max_new_tokens = 0  # the load's RKLLMParam.max_new_tokens: the runtime's own limit per run
        self._prompt_cache_loaded = False  # rkllm_load_prompt_cache succeeded and nothing has released it since
        self.closed = False

    # -- model -----------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._run is not None

    def load(self, spec: ModelSpec) -> None:
        """rkllm_createDefaultParam, our settings, rkllm_init. Raises ModelLoadError with the reason."""
        if self.closed:
            raise ModelLoadError("the native runtime was closed")
        self.unload()
        path = Path(spec.path)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        if path.stat().st_size == 0:
            raise ModelLoadError(f"model file is empty (corrupt or still downloading?): {path}")
        layout, options = self.layout, spec.options
        param = self.library.rkllm_createDefaultParam()
        model_path = os.fsencode(str(path))
        param.model_path = model_path
        param.max_context_len = int(spec.max_context_len)
        param.max_new_tokens = int(spec.max_new_tokens) if spec.max_new_tokens > 0 else int(spec.max_context_len)
        s = spec.sampling
        param.top_k = int(s.top_k)
        param.top_p = float(s.top_p)
        param.temperature = float(s.temperature)
        param.repeat_penalty = float(s.repeat_penalty)
        param.frequency_penalty = float(s.frequency_penalty)
        param.presence_penalty = float(s.presence_penalty)
        for key, attr, kind in (("MIROSTAT", "mirostat", int), ("MIROSTAT_TAU", "mirostat_tau", float),
                                ("MIROSTAT_ETA", "mirostat_eta", float)):
            value = _option_number(options, key, kind)
            if value is not None:
                setattr(param, attr, value)
        # Token ids in, token ids out: exo decodes the ids itself, and the runtime's own text (ours to
        # compare with) should not carry end-of-turn markers.
        param.skip_special_token = _option_bool(options, "SKIP_SPECIAL_TOKEN", True)
        param.is_async = False
        if layout.HAS_N_KEEP:
            n_keep = _option_number(options, "N_KEEP", int)
            if n_keep is not None:
                param.n_keep = n_keep
        ext = param.extend_param
        domain = _option_number(options, "BASE_DOMAIN_ID", int)
        if domain is not None:
            ext.base_domain_id = domain
        mask = self.settings.cpu_mask
        if layout.HAS_CPU_MASK:
            embed_flash = options.get("EMBED_FLASH")
            if embed_flash not in (None, ""):
                ext.embed_flash = 1 if _option_bool(options, "EMBED_FLASH", False) else 0
            if mask:
                ext.enabled_cpus_mask = mask
                ext.enabled_cpus_num = bin(mask).count("1")
        elif mask and self.settings.pin_process and hasattr(os, "sched_setaffinity"):
            cpus = {i for i in range(8) if mask >> i & 1}
            try:
                os.sched_setaffinity(0, cpus)
            except OSError as exc:
                log.warning("cannot pin the runtime worker to CPUs %s: %s", sorted(cpus), exc)
        handle = abi.LLMHandle()
        keep: list[Any] = [param, model_path, self._callback]
        with capture_native_output() as captured:
            if layout.INIT_TAKES_CALLBACK_STRUCT:
                callbacks = layout.RKLLMCallback()
                callbacks.result_callback = self._callback
                keep.append(callbacks)
                rc = self.library.rkllm_init(ctypes.byref(handle), ctypes.byref(param), ctypes.byref(callbacks))
            else:
                rc = self.library.rkllm_init(ctypes.byref(handle), ctypes.byref(param), self._callback)
        if rc != 0 or not handle.value:
            raise self._load_error(path, rc, captured.text)
        with self._state_lock:
            self._handle = handle
            self._keepalive = keep
            self.spec = spec
            self._mirostat = (int(param.mirostat), float(param.mirostat_tau), float(param.mirostat_eta))
            self._max_new_tokens = int(param.max_new_tokens)
        log.debug("rkllm_init ok: %s (runtime %s)", path, self.library.version)

    def _load_error(self, path: Path, rc: int, output: str) -> ModelLoadError:
        runtime = self.library.version
        if _MAGIC.search(output):
            m = _TOOLKIT.search(output)
            toolkit = m.group(1) if m else sniff_model_version(path)
            made_with = (f"it was converted with rkllm-toolkit {toolkit}" if toolkit
                         else "the toolkit version it was converted with is unknown")
            return ModelLoadError(
                f"{path.name} does not match the installed RKLLM runtime {runtime} (the runtime reports an invalid "
                f"model magic; {made_with}). A .rkllm file only runs on the runtime release line it was converted "
                f"for: convert the model again with rkllm-toolkit {runtime}, or install the runtime that matches it")
        detail = "; ".join(runtime_complaints(output)) or "no message from the runtime"
        return ModelLoadError(f"the RKLLM runtime {runtime} could not load {path} (rkllm_init returned {rc}): {detail}")

    def unload(self) -> None:
        """Stop any run, then rkllm_destroy; only then let go of what the runtime held."""
        if not self._handle.value:
            return
        self.abort()
        with self._run_lock:  # wait for rkllm_run to return
            self._release_prompt_cache_now()
            with self._state_lock:
                handle, self._handle = self._handle, abi.LLMHandle()
                self.spec = None
            rc = self.library.rkllm_destroy(handle)
            if rc != 0:
                log.warning("rkllm_destroy returned %d", rc)
            self._keepalive = []

    def close(self) -> None:
        self.unload()
        self.closed = True

    # -- generation -----------------------------------------------------------------------------------
    def _run_inputs(self, token_ids: Sequence[int], mode: int, keep_history: bool, *,
                    empty: str) -> tuple[Any, Any, Any]:
        """(ids, RKLLMInput, RKLLMInferParam) of one rkllm_run in `mode`, after the checks every run makes
        (a model loaded, some tokens: `empty` says what is missing). The caller holds the run lock and
        keeps all three alive until rkllm_run returns."""
        if not self._handle.value or self.spec is None:
            raise GenerationError("no model is loaded")
        if not token_ids:
            raise GenerationError(empty)
        thinking = mode == abi.RKLLM_INFER_GENERATE and _option_bool(self.spec.options, "ENABLE_THINKING", False)
        ids, rin = self._token_input(token_ids, thinking)
        infer = self.layout.RKLLMInferParam()
        infer.mode = mode
        if self.layout.HAS_KEEP_HISTORY:
            infer.keep_history = 1 if keep_history else 0
        return ids, rin, infer

    def _token_input(self, token_ids: Sequence[int], enable_thinking: bool) -> tuple[Any, Any]:
        """(the id array, the RKLLMInput pointing at it): token input, so no chat template is applied
        a second time. The caller keeps both alive until rkllm_run returns."""
        ids = (ctypes.c_int32 * len(token_ids))(*token_ids)
        rin = self.layout.RKLLMInput()
        if self.layout.HAS_INPUT_ROLE:
            rin.role = b"user"
            rin.enable_thinking = enable_thinking
        rin.input_type = abi.RKLLM_INPUT_TOKEN
        rin.token_input.input_ids = ids
        rin.token_input.n_tokens = len(token_ids)
        return ids, rin

    def run(self, inp: GenerationInput, emit: EmitFn, cancelled: threading.Event | None = None) -> FinishEvent:
        """One generation, blocking until rkllm_run returns. `emit` gets every token event, on the
        runtime's callback thread; it must be quick and must not block. `cancelled` covers an abort
        asked for before this thread got here (`abort` alone finds nothing running yet)."""
        if not self._run_lock.acquire(blocking=False):
            raise GenerationError("the runtime is busy: one generation at a time per context")
        try:
            ids, rin, infer = self._run_inputs(inp.token_ids, abi.RKLLM_INFER_GENERATE, inp.keep_history,
                                               empty="empty prompt")
            layout = self.layout
            limit, cap = 0, max(0, self._max_new_tokens)
            if inp.max_new_tokens > 0:
                if layout.HAS_PER_RUN_MAX_NEW_TOKENS:
                    infer.max_new_tokens = cap = int(inp.max_new_tokens)
                else:
                    limit = int(inp.max_new_tokens)  # this release cannot be told: stop it ourselves
            # What the context holds before this run, to tell a run the context cut short (LENGTH) from
            # one the model ended: nothing without history, else what the runtime reports (if it can).
            held = self.kv_cache_len() if layout.HAS_KEEP_HISTORY and inp.keep_history else 0
            sampling = None  # older releases: the load's values apply, whatever the request asked for
            if inp.sampling is not None and layout.HAS_PER_RUN_SAMPLING:
                sampling = self._sampling_param(inp.sampling)
                infer.sampling_params = ctypes.pointer(sampling)
            # The state after this run's prefill, saved by the runtime when the run ends; only where the
            # release can say what a loaded file holds (elsewhere the path is ignored, never passed).
            cache_path = cache_param = None
            if inp.save_prompt_cache and self.capabilities.prompt_cache:
                cache_path = os.fsencode(inp.save_prompt_cache)
                cache_param = layout.RKLLMPromptCacheParam(save_prompt_cache=1, prompt_cache_path=cache_path)
                infer.prompt_cache_params = ctypes.pointer(cache_param)
            room = self.spec.max_context_len - held - len(inp.token_ids) if held is not None else None
            run = _Run(emit, limit, cap, room)
            with self._state_lock:
                self._run = run
                if cancelled is not None and cancelled.is_set():
                    run.aborted = True
            try:
                if run.aborted:  # aborted before the runtime even started
                    return self._finish(run, 0, len(inp.token_ids))
                rc = self.library.rkllm_run(self._handle, ctypes.byref(rin), ctypes.byref(infer), None)
            finally:
                with self._state_lock:
                    self._run = None
                del ids, rin, infer, sampling, cache_param, cache_path  # only now may what the runtime read go
            return self._finish(run, rc, len(inp.token_ids))
        finally:
            self._run_lock.release()

    def _sampling_param(self, s: SamplingParams) -> Any:
        """The 1.3.0 RKLLMSamplingParam for one run. It replaces all of the load's sampling values, so
        the mirostat settings the model was loaded with are restated (a request cannot name them)."""
        param = self.layout.RKLLMSamplingParam()
        param.top_k = int(s.top_k)
        param.top_p = float(s.top_p)
        param.temperature = float(s.temperature)
        param.repeat_penalty = float(s.repeat_penalty)
        param.frequency_penalty = float(s.frequency_penalty)
        param.presence_penalty = float(s.presence_penalty)
        param.mirostat, param.mirostat_tau, param.mirostat_eta = self._mirostat
        return param

    # -- embeddings -------------------------------------------------------------------------------------
    def embed(self, inp: EmbeddingInput) -> Any:
        """The last hidden layer for `inp.token_ids`: a float32 numpy array (num_tokens, embd_size),
        a copy the runtime no longer owns. Blocks until rkllm_run returns. Raises EmbeddingUnsupported
        where the release has no last-hidden-layer mode or the runtime delivered no hidden layer, and
        GenerationError when the runtime fails. Leaves the KV cache empty where it can be cleared."""
        import numpy as np

        if not self.capabilities.embeddings:
            raise EmbeddingUnsupported(f"the RKLLM runtime {self.library.version} has no last-hidden-layer mode")
        if not self._run_lock.acquire(blocking=False):
            raise GenerationError("the runtime is busy: one run at a time per context")
        try:
            # keep_history off: the text alone, whatever the cache held
            ids, rin, infer = self._run_inputs(inp.token_ids, abi.RKLLM_INFER_GET_LAST_HIDDEN_LAYER, False,
                                               empty="nothing to embed: no tokens")
            run = _Run(lambda event: None, 0, hidden_mode=True)
            with self._state_lock:
                self._run = run
            try:
                rc = self.library.rkllm_run(self._handle, ctypes.byref(rin), ctypes.byref(infer), None)
            finally:
                with self._state_lock:
                    self._run = None
                del ids, rin, infer
            # The cache now holds the embedded text: no generation may continue from it.
            try:
                self._clear_kv_cache_now()
            except GenerationError as exc:  # the scheduler forgets the cache after an embedding anyway
                log.warning("clearing the KV cache after an embedding failed: %s", exc)
            if run.error:
                raise GenerationError(f"the RKLLM runtime {self.library.version} reported an error while embedding "
                                      f"(rkllm_run returned {rc}; see the runtime's log above)")
            if rc != 0:
                raise GenerationError(f"rkllm_run (last hidden layer) failed with code {rc} "
                                      "(see the runtime's log above)")
            if run.aborted:
                raise GenerationError("the embedding run was aborted")
            hidden = run.hidden
            if hidden is None:
                raise EmbeddingUnsupported(f"the RKLLM runtime {self.library.version} returned no last hidden layer "
                                           f"for {Path(self.spec.path).name}")
            if hidden.num_tokens != len(inp.token_ids):
                log.debug("the runtime returned hidden states for %d of %d tokens", hidden.num_tokens,
                          len(inp.token_ids))
            array = np.frombuffer(hidden.data, dtype=np.float32).reshape(hidden.num_tokens, hidden.embd_size)
            return array.copy()  # writable, and owned by nobody else
        finally:
            self._run_lock.release()

    def _take_hidden(self, run: _Run, result: Any) -> None:
        """Copy the callback's last hidden layer (valid only during the callback) into `run`. A later
        delivery replaces an earlier one only if it covers more tokens, so a runtime that restates the
        layer with FINISH does not count twice."""
        if not result:
            return
        layer = result.contents.last_hidden_layer
        n, embd = int(layer.num_tokens), int(layer.embd_size)
        if not layer.hidden_states or n <= 0 or embd <= 0:
            return
        if n > _MAX_HIDDEN_TOKENS or embd > _MAX_EMBD_SIZE:
            log.warning("ignoring a last hidden layer of %d x %d floats: not a plausible size", n, embd)
            return
        if run.hidden is not None and run.hidden.num_tokens >= n:
            return
        data = ctypes.string_at(layer.hidden_states, n * embd * ctypes.sizeof(ctypes.c_float))
        run.hidden = _HiddenLayer(data, n, embd)

    def _finish(self, run: _Run, rc: int, prefilled: int) -> FinishEvent:
        tail = run.joiner.flush()
        if tail:
            log.warning("the runtime ended inside a UTF-8 character; %d byte(s) dropped", len(tail.encode()))
        if run.error:
            at = f" after {run.tokens} token(s)" if run.tokens else " before the first token"
            raise GenerationError(f"the RKLLM runtime {self.library.version} reported an error{at} "
                                  f"(rkllm_run returned {rc}; see the runtime's log above)")
        if run.emit_failed is not None and not run.aborted:
            raise GenerationError(f"the native backend could not deliver a token: {run.emit_failed!r}")
        if rc != 0 and not (run.aborted or run.limit_reached):
            raise GenerationError(f"rkllm_run failed with code {rc} (see the runtime's log above)")
        end = time.monotonic()
        if run.perf is not None:
            stats = run.perf
        else:
            first = run.first_token_at or end
            stats = GenerationStats(prefilled, (first - run.started) * 1000, run.tokens, (end - first) * 1000)
        return FinishEvent(stats, self._finish_kind(run))

    @staticmethod
    def _finish_kind(run: _Run) -> FinishKind:
        """LENGTH when a token limit (ours or the runtime's) or the context ended the run, ABORTED when
        abort() did first, STOP when the runtime ended it by itself before any limit: the model's end."""
        if run.limit_reached:
            return FinishKind.LENGTH
        if run.aborted:
            return FinishKind.ABORTED
        if (run.cap and run.tokens >= run.cap) or (run.room is not None and run.tokens >= run.room):
            return FinishKind.LENGTH
        return FinishKind.STOP

    def abort(self) -> None:
        """Stop the running generation (any thread). No-op when idle."""
        with self._state_lock:
            run, handle = self._run, self._handle
            if run is None or not handle.value:
                return
            run.aborted = True
            run.abort_sent = True
        self.library.rkllm_abort(handle)
        # An abort that lands just before rkllm_run has marked itself running is lost by the runtime:
        # say it once more shortly after (harmless if the run has ended by then).
        timer = threading.Timer(0.05, self._abort_again, args=(run,))
        timer.daemon = True
        timer.start()

    def _abort_again(self, run: _Run) -> None:
        with self._state_lock:
            if self._run is not run or not self._handle.value:
                return
            handle = self._handle
        self.library.rkllm_abort(handle)

    def runtime_is_running(self) -> bool | None:
        """rkllm_is_running, read the way this release documents it (the meaning flipped in 1.3.0);
        for diagnostics only: the backend knows a run has ended when rkllm_run returns."""
        handle = self._handle
        if not handle.value:
            return None
        return self.library.rkllm_is_running(handle) == self.layout.IS_RUNNING_MEANS_RUNNING

    def _abort_from_callback(self, run: _Run) -> None:
        """rkllm_abort from inside the callback could wait on the very thread it runs on: ask from
        another thread, once."""
        if run.abort_sent:
            return
        run.abort_sent = True
        handle = self._handle
        threading.Thread(target=lambda: self.library.rkllm_abort(handle), name="rkllm-abort", daemon=True).start()

    def _make_callback(self) -> Any:
        layout = self.layout
        on_result = self._on_result
        if layout.CALLBACK_RETURNS_INT:
            def callback(result: Any, userdata: Any, state: int) -> int:
                on_result(result, state)
                return 0
        else:
            def callback(result: Any, userdata: Any, state: int) -> None:  # type: ignore[misc]
                on_result(result, state)
        return layout.LLMResultCallback(callback)

    def _on_result(self, result: Any, state: int) -> None:
        """The RKLLM callback, on the runtime's thread. Never raises into C."""
        try:
            run = self._run
            if run is None:
                return
            if run.hidden_mode:
                if state == abi.RKLLM_RUN_ERROR:
                    run.error = True
                    return
                if state == abi.RKLLM_RUN_FINISH:
                    run.finished = True
                self._take_hidden(run, result)  # NORMAL, FINISH, or 1.1.x's GET_LAST_HIDDEN_LAYER state
                return
            if state == abi.RKLLM_RUN_NORMAL or state == abi.RKLLM_RUN_WAITING:
                if run.aborted or run.limit_reached:
                    if not run.abort_sent:
                        self._abort_from_callback(run)
                    return
                contents = result.contents if result else None
                data = contents.text if contents is not None else None
                token_id = int(contents.token_id) if contents is not None else -1
                text = run.joiner.feed(data or b"")
                now = time.monotonic()
                if run.first_token_at is None:
                    run.first_token_at = now
                run.tokens += 1
                # Text held back, by the runtime (it said WAITING) or by us (partial bytes): WAITING.
                held = not text and (state == abi.RKLLM_RUN_WAITING or bool(run.joiner.pending))
                event = TokenEvent(token_id, text, CallState.WAITING if held else CallState.NORMAL, now)
                try:
                    run.emit(event)
                except BaseException as exc:  # nobody to hand tokens to: stop the NPU
                    run.emit_failed = exc
                    run.aborted = True
                    self._abort_from_callback(run)
                    return
                if run.limit and run.tokens >= run.limit:
                    run.limit_reached = True
                    self._abort_from_callback(run)
            elif state == abi.RKLLM_RUN_FINISH:
                run.finished = True
                if self.layout.HAS_PERF and result:
                    perf = result.contents.perf
                    run.perf = GenerationStats(int(perf.prefill_tokens), float(perf.prefill_time_ms),
                                               int(perf.generate_tokens), float(perf.generate_time_ms),
                                               float(perf.memory_usage_mb))
            elif state == abi.RKLLM_RUN_ERROR:
                run.error = True
        except BaseException:  # noqa: BLE001 - an exception must never unwind into C
            with contextlib.suppress(BaseException):
                log.exception("error in the RKLLM callback (ignored)")

    # -- KV cache ------------------------------------------------------------------------------------------
    def clear_kv_cache(self) -> None:
        if not self.layout.HAS_CLEAR_KV_CACHE:
            return  # 1.1.x keeps no history across runs: nothing to clear
        if self.running:
            raise GenerationError("clear_kv_cache while a generation is running")
        self._release_prompt_cache_now()
        self._clear_kv_cache_now()

    def _clear_kv_cache_now(self) -> None:
        """rkllm_clear_kv_cache, all of it; the caller knows no run is in flight."""
        if not self.layout.HAS_CLEAR_KV_CACHE or not self._handle.value:
            return
        rc = self.library.rkllm_clear_kv_cache(self._handle, 0)  # no range, no system prompt kept: all of it
        if rc != 0:
            raise GenerationError(f"rkllm_clear_kv_cache failed with code {rc}")

    def kv_cache_len(self) -> int | None:
        """Tokens in the KV cache as the runtime reports them (1.2.1+), None where it cannot tell."""
        if not self.layout.HAS_KV_CACHE_SIZE or not self._handle.value or self.running:
            return None
        sizes = (ctypes.c_int * 8)()  # one int per batch slot; we run one batch
        if self.library.rkllm_get_kv_cache_size(self._handle, sizes) != 0:
            return None
        return int(sizes[0])

    # -- prompt caches -------------------------------------------------------------------------------------
    def load_prompt_cache(self, path: str) -> None:
        """rkllm_load_prompt_cache: afterwards the KV cache holds the state a run saved to `path`. Blocks
        while the runtime reads it. Raises PromptCacheError with the runtime's own reason (what it printed)
        if it refuses the file; and without asking it where the release cannot report what a loaded file
        holds, with no model, or while a run is in progress (the runtime would refuse, or worse)."""
        if not self.capabilities.prompt_cache:
            raise PromptCacheError(f"the RKLLM runtime {self.library.version} cannot report what a loaded prompt "
                                   "cache holds (no rkllm_get_kv_cache_size before 1.2.1): prompt caches are off")
        if self.closed:
            raise PromptCacheError("the native runtime was closed")
        if not self._run_lock.acquire(blocking=False):
            raise PromptCacheError("rkllm_load_prompt_cache while a run is in progress")
        try:
            if not self._handle.value or self.spec is None:
                raise PromptCacheError("no model is loaded")
            with capture_native_output() as captured:
                rc = self.library.rkllm_load_prompt_cache(self._handle, os.fsencode(path))
            if rc != 0:
                reason = "; ".join(_LOG_PREFIX.sub("", line) for line in runtime_complaints(captured.text))
                raise PromptCacheError(f"the runtime refused the prompt cache {path}: "
                                       f"{reason or 'no message from the runtime'} "
                                       f"(rkllm_load_prompt_cache returned {rc})")
            self._prompt_cache_loaded = True
        finally:
            self._run_lock.release()

    def _release_prompt_cache_now(self) -> None:
        """rkllm_release_prompt_cache, once per successful load: the runtime keeps the file's state in
        memory until told. The caller knows no run is in flight. A failure only costs that memory."""
        if not self._prompt_cache_loaded:
            return
        self._prompt_cache_loaded = False
        if not self._handle.value:
            return
        rc = self.library.rkllm_release_prompt_cache(self._handle)
        if rc != 0:
            log.warning("rkllm_release_prompt_cache returned %d", rc)


# -- the async, in-process Runtime ---------------------------------------------------------------------------
class NativeRuntime(RuntimeBase):
    """The `native` backend inside exo's process (RKLLM_NATIVE_ISOLATION=0)."""

    def __init__(self, library: RKLLMLibrary, settings: NativeSettings | None = None) -> None:
        self.session = NativeSession(library, settings)
        self.capabilities = self.session.capabilities
        self._cancel: threading.Event | None = None  # the running generation's

    @property
    def loaded(self) -> ModelSpec | None:
        return self.session.spec

    def is_running(self) -> bool:
        return self.session.running

    def kv_cache_len(self) -> int | None:
        return self.session.kv_cache_len()

    async def load(self, model: ModelSpec, progress: ProgressFn | None = None) -> None:
        if progress:
            progress(f"loading {Path(model.path).name}", 0.0)
        await asyncio.to_thread(self.session.load, model)
        if progress:
            progress(f"loaded {Path(model.path).name}", 1.0)

    async def unload(self) -> None:
        await asyncio.to_thread(self.session.unload)

    async def abort(self) -> None:
        cancel = self._cancel
        if cancel is not None:
            cancel.set()
        self.session.abort()

    async def clear_kv_cache(self) -> None:
        await asyncio.to_thread(self.session.clear_kv_cache)

    async def load_prompt_cache(self, path: str) -> None:
        """See NativeSession.load_prompt_cache; on a thread, as the runtime reads the whole file. A
        generation counts as running from its first step, before its thread has reached rkllm_run."""
        if self._cancel is not None or self.session.running:
            raise PromptCacheError("rkllm_load_prompt_cache while a run is in progress")
        await asyncio.to_thread(self.session.load_prompt_cache, path)

    async def embed(self, inp: EmbeddingInput) -> EmbeddingOutput:
        """The last hidden layer for `inp.token_ids`, one float32 row per token (see NativeSession.embed)."""
        if not self.capabilities.embeddings:
            raise EmbeddingUnsupported(f"the RKLLM runtime {self.capabilities.version} has no last-hidden-layer mode")
        if self.session.closed:
            raise GenerationError("the runtime was closed")
        hidden = await asyncio.to_thread(self.session.embed, inp)
        return EmbeddingOutput(hidden=hidden, pooled=False)

    async def close(self) -> None:
        await asyncio.to_thread(self.session.close)

    async def generate(self, inp: GenerationInput) -> AsyncIterator[RuntimeEvent]:
        if self.session.closed:
            raise GenerationError("the runtime was closed")
        if self.session.running:
            raise GenerationError("the runtime is busy: one generation at a time per context")
        session = self.session
        cancel = self._cancel = threading.Event()

        def run_on_thread(bridge: EventBridge) -> None:
            try:
                bridge.push(session.run(inp, bridge.push, cancel))
            except RKLLMError as exc:
                bridge.push(exc)
            except BaseException as exc:  # noqa: BLE001 - reported to the consumer, not lost on a thread
                bridge.push(GenerationError(f"the native runtime failed: {exc!r}"))

        def stop() -> None:  # the consumer left early: stop the NPU now
            cancel.set()
            session.abort()

        try:
            async with contextlib.aclosing(stream_from_thread(run_on_thread, stop)) as events:
                async for item in events:
                    yield item
        finally:
            if self._cancel is cancel:
                self._cancel = None
