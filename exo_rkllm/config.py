"""Every setting of exo-rkllm, read from the environment in one place.

The table below is the single source of truth: `Config.from_env` reads it, and a
test checks that the README documents each row. The `exo-rkllm` command has
flags for two of them only (`--models-dir`, `--backend`), passed to `from_env`
as overrides; every other setting is an environment variable.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from exo_rkllm.errors import ConfigError


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def parse_bool(text: str, empty: bool | None = None) -> bool:
    """A boolean written the way people write them in environment variables and Modelfiles
    (1/0, true/false, yes/no, on/off, any case). Every place that reads one uses this, so they
    all accept the same words. `empty` is what a blank value means; None: blank is an error.

    Raises ValueError for anything else."""
    value = str(text).strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    if not value and empty is not None:
        return empty
    raise ValueError(f"expected a boolean (1/0, true/false, yes/no, on/off), got {text!r}")


def _bool(text: str) -> bool:
    """A setting's boolean: blank means off, as it always has."""
    return parse_bool(text, empty=False)


def _path(text: str) -> Path:
    return Path(os.path.expanduser(text))


def _opt_path(text: str) -> Path | None:
    return _path(text) if text.strip() else None


def _backend(text: str) -> str:
    value = text.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"expected one of {', '.join(BACKENDS)}, got {text!r}")
    return value


BACKENDS = ("auto", "native", "rkllama", "sim")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(text: str) -> float:
    """Seconds, from plain seconds (`300`, `-1`) or an Ollama/Go duration (`5m`, `30s`, `1h30m`, `-1m`)."""
    value = text.strip().lower()
    try:
        return float(value)
    except ValueError:
        pass
    sign, body = (-1.0, value[1:]) if value.startswith("-") else (1.0, value.lstrip("+"))
    parts = _DURATION_PART.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise ValueError(f"expected seconds or a duration such as 5m, 30s, 1h, got {text!r}") from None
    return sign * sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


@dataclass(frozen=True)
class Setting:
    attr: str
    env: str
    parse: Callable[[str], Any]
    help: str  # defaults live in Config's fields: one place


SETTINGS: tuple[Setting, ...] = (
    Setting("backend", "RKLLM_BACKEND", _backend,
            "Runtime backend: `native` (librkllmrt.so), `rkllama` (HTTP server), `sim` (built-in simulator), "
            "`auto` (native if the library is found, else a reachable rkllama server; never the simulator)."),
    Setting("models_dir", "RKLLM_MODELS_DIR", _path,
            "Folder of models: `<dir>/<Name>/*.rkllm` (+ Modelfile, tokenizer files) and loose `<dir>/*.rkllm`."),
    Setting("tokenizer_dir", "RKLLM_TOKENIZER_DIR", _opt_path,
            "Tokenizer folder used for models whose folder has no tokenizer files."),
    Setting("allow_network", "RKLLM_ALLOW_NETWORK", _bool,
            "Allow downloading a tokenizer from the Hugging Face hub (Modelfile HUGGINGFACE_PATH) when none is on disk."),
    Setting("max_queue", "RKLLM_MAX_QUEUE", int,
            "Requests that may wait for the NPU at once; one more is refused with HTTP 429."),
    Setting("idle_timeout", "RKLLM_IDLE_TIMEOUT", float,
            "Seconds a started generation may go unread by exo before it is aborted and its NPU time given back."),
    Setting("background_max_wait", "RKLLM_BACKGROUND_MAX_WAIT", float,
            "Seconds after its arrival that a background request (non-streamed, `X-Priority: background`, a "
            "chat client's title/tags/follow-up task) stops yielding to interactive ones: it then runs by arrival "
            "order and is no longer paused, so it is never starved. 0 turns priorities off."),
    Setting("max_context", "RKLLM_MAX_CONTEXT", int,
            "Context length in tokens; 0 takes it from the Modelfile or the file name (`-16k`), else 4096."),
    Setting("max_new_tokens", "RKLLM_MAX_NEW_TOKENS", int,
            "Runtime cap on generated tokens per request; 0 means up to the context length (exo's "
            "`--max-generate-tokens` still applies)."),
    Setting("preload", "RKLLM_PRELOAD", str,
            "Models to load at start-up, so the first request does not pay the load: `first` (the first model "
            "listed, exo's default) or model ids separated by commas. The NPU holds one model: the first id that "
            "resolves is loaded on it, the others only get their tokenizer ready (within "
            "`RKLLM_MODEL_CACHE`). Empty: the first request loads its model."),
    Setting("keep_alive", "RKLLM_KEEP_ALIVE", _duration,
            "How long a model stays on the NPU with no request running or waiting before it is unloaded to give "
            "its memory back (Ollama's meaning): seconds or a duration (`30s`, `5m`, `1h`); 0 unloads it as soon "
            "as it is idle; negative keeps it loaded (never unloaded). The next request loads it again."),
    Setting("kv_reuse", "RKLLM_KV_REUSE", _bool,
            "Reuse the NPU's KV cache when a prompt extends the previous one (follow-up chat turns)."),
    Setting("prompt_cache", "RKLLM_PROMPT_CACHE", _bool,
            "Save a conversation's KV state to disk when another takes the NPU, and a long system prompt's once "
            "per model, so a later prompt that extends a saved state restores it and prefills only its new part "
            "(native runtime 1.2.1 and later, and the simulator; elsewhere every prompt is prefilled)."),
    Setting("cache_dir", "RKLLM_CACHE_DIR", _opt_path,
            "Folder of the saved KV states; default `<RKLLM_MODELS_DIR>/.rkllm-cache`."),
    Setting("cache_max_mb", "RKLLM_CACHE_MAX_MB", int,
            "Most megabytes the saved KV states may take; beyond it the least recently used are deleted. 0: "
            "none are saved (as RKLLM_PROMPT_CACHE=0)."),
    Setting("cache_max_age", "RKLLM_CACHE_MAX_AGE", _duration,
            "Saved KV states not used for this long are deleted: seconds or a duration (`30m`, `48h`); "
            "negative: never by age."),
    Setting("cache_min_tokens", "RKLLM_CACHE_MIN_TOKENS", int,
            "Smallest state worth a file, in tokens: a shorter conversation, or a shorter system prompt, is "
            "prefilled again instead."),
    Setting("model_cache", "RKLLM_MODEL_CACHE", int,
            "Models not on the NPU whose tokenizer and entry stay in memory for their next request; beyond "
            "this the least recently used are dropped (the loaded model and models with a request running "
            "or waiting are always kept). 0 keeps only those."),
    Setting("lib_path", "RKLLM_LIB_PATH", _opt_path,
            "Path of librkllmrt.so, or a folder holding it (native backend); default: searched in the folders of "
            "LD_LIBRARY_PATH, then /usr/lib, /usr/local/lib, /usr/lib/aarch64-linux-gnu, /usr/lib64, /lib, "
            "~/RKLLAMA/lib and ~/RKLLAMA/src/rkllama/lib."),
    Setting("runtime_version", "RKLLM_RUNTIME_VERSION", str,
            "Force the runtime ABI version (1.1.4, 1.2.0 ... 1.3.0) instead of reading it from the library."),
    Setting("native_isolation", "RKLLM_NATIVE_ISOLATION", _bool,
            "Native backend: run librkllmrt.so in a child worker process so a crash in it cannot take exo down "
            "(0 runs it inside exo's process, for debugging)."),
    Setting("cpu_mask", "RKLLM_CPU_MASK", str,
            "Native backend: CPU cores the runtime may use, e.g. `4-7` or `0xf0`; default: the big cores of the SoC."),
    Setting("server_url", "RKLLM_SERVER_URL", str,
            "rkllama server URL; default built from RKLLM_SERVER_HOST and RKLLM_SERVER_PORT."),
    Setting("server_host", "RKLLM_SERVER_HOST", str, "rkllama server host."),
    Setting("server_port", "RKLLM_SERVER_PORT", int, "rkllama server port."),
    Setting("server_connect_timeout", "RKLLM_SERVER_CONNECT_TIMEOUT", float,
            "rkllama backend: seconds to connect before the server is declared down."),
    Setting("server_first_token_timeout", "RKLLM_SERVER_FIRST_TOKEN_TIMEOUT", float,
            "rkllama backend: seconds to wait for the first streamed chunk (includes model load and prefill)."),
    Setting("server_chunk_timeout", "RKLLM_SERVER_CHUNK_TIMEOUT", float,
            "rkllama backend: longest gap in seconds between two streamed chunks."),
    Setting("server_load_timeout", "RKLLM_SERVER_LOAD_TIMEOUT", float,
            "rkllama backend: seconds to wait for the server to load or unload a model (`/load_model`, "
            "`/unload_model`; an unload waits for a running generation, up to 30 s in rkllama)."),
    Setting("sim_decode_ms", "RKLLM_SIM_DECODE_MS", float,
            "Simulator: milliseconds per generated token (125 = 8 tokens/s, an RK3588 running a 1.5B w8a8 model)."),
    Setting("sim_prefill_ms", "RKLLM_SIM_PREFILL_MS", float,
            "Simulator: milliseconds per prompt token prefilled."),
    Setting("sim_prefill_base_ms", "RKLLM_SIM_PREFILL_BASE_MS", float,
            "Simulator: fixed milliseconds per prefill (NPU launch cost)."),
    Setting("sim_load_ms", "RKLLM_SIM_LOAD_MS", float, "Simulator: milliseconds to load a model."),
    Setting("sim_cache_io_ms", "RKLLM_SIM_CACHE_IO_MS", float,
            "Simulator: milliseconds per token to save or restore a KV state (0.08: about 30 KiB per token at "
            "400 MB/s)."),
    Setting("ring_fault_s", "RKLLM_RING_FAULT_S", float,
            "Several boards: seconds without a word from a node (each sends one every second) before it counts as "
            "down: its requests end with an error on the node that took them, new ones go elsewhere."),
    Setting("ring_affinity", "RKLLM_RING_AFFINITY", int,
            "Several boards: a conversation goes back to the node holding its history unless that node has more "
            "than this many requests above the least loaded node (then its new turn is prefilled elsewhere)."),
    Setting("log_level", "RKLLM_LOG_LEVEL", str, "Log level of exo-rkllm (DEBUG, INFO, WARNING)."),
    Setting("api_key", "RKLLM_API_KEY", str,
            "If set, every `/v1/` route and exo's control routes need `Authorization: Bearer <key>` (as vLLM's and "
            "llama-server's `--api-key`); the web chat's static pages stay open. Empty: no key (anyone who can "
            "reach port 52415 can use it)."),
    Setting("cors_origins", "RKLLM_CORS_ORIGINS", str,
            "Web origins allowed to call the API from a browser, separated by commas (`*`: any, exo's own "
            "behaviour). Empty: only the page exo serves itself; a request from any other origin gets 403."),
    Setting("admin_routes", "RKLLM_ADMIN_ROUTES", _bool,
            "Keep exo's `POST /quit`, `POST /download` and `DELETE /models/{name}` routes on. Off by default: "
            "any web page a user opens could otherwise stop the node."),
    Setting("reasoning_format", "RKLLM_REASONING_FORMAT", str,
            "Where a reasoning model's `<think>` part goes by default: `deepseek` (into `reasoning_content`) or "
            "`none` (left in `content`); a request's `reasoning_format` wins."),
)


@dataclass(frozen=True)
class Config:
    backend: str = "auto"
    models_dir: Path = field(default_factory=lambda: Path("~/RKLLAMA/models").expanduser())
    tokenizer_dir: Path | None = None
    allow_network: bool = False
    max_queue: int = 32
    idle_timeout: float = 60.0
    background_max_wait: float = 30.0
    max_context: int = 0
    max_new_tokens: int = 0
    preload: str = ""
    keep_alive: float = -1.0
    kv_reuse: bool = True
    prompt_cache: bool = True
    cache_dir: Path | None = None
    cache_max_mb: int = 2048
    cache_max_age: float = 7 * 24 * 3600.0
    cache_min_tokens: int = 128
    model_cache: int = 2
    lib_path: Path | None = None
    runtime_version: str = ""
    native_isolation: bool = True
    cpu_mask: str = ""
    server_url: str = ""
    server_host: str = "localhost"
    server_port: int = 8080
    server_connect_timeout: float = 2.0
    server_first_token_timeout: float = 120.0
    server_chunk_timeout: float = 30.0
    server_load_timeout: float = 120.0
    sim_decode_ms: float = 125.0
    sim_prefill_ms: float = 8.0
    sim_prefill_base_ms: float = 40.0
    sim_load_ms: float = 1500.0
    sim_cache_io_ms: float = 0.08
    ring_fault_s: float = 3.0
    ring_affinity: int = 2
    log_level: str = "INFO"
    api_key: str = ""
    cors_origins: str = ""
    admin_routes: bool = False
    reasoning_format: str = "deepseek"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "Config":
        """Read every setting from `env` (default os.environ); keyword overrides win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for s in SETTINGS:
            raw = env.get(s.env)
            if raw is None:
                continue
            try:
                values[s.attr] = s.parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{s.env}={raw!r} is not valid: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        if self.max_queue < 1:
            raise ConfigError("RKLLM_MAX_QUEUE must be at least 1")
        if self.model_cache < 0:
            raise ConfigError("RKLLM_MODEL_CACHE must not be negative")
        if self.idle_timeout <= 0:
            raise ConfigError("RKLLM_IDLE_TIMEOUT must be positive")
        if self.keep_alive != self.keep_alive:
            raise ConfigError("RKLLM_KEEP_ALIVE must be a number of seconds or a duration such as 5m")
        if self.background_max_wait < 0:
            raise ConfigError("RKLLM_BACKGROUND_MAX_WAIT must not be negative")
        if self.reasoning_format not in ("deepseek", "none"):
            raise ConfigError("RKLLM_REASONING_FORMAT must be `deepseek` or `none`")
        if self.cache_max_mb < 0:
            raise ConfigError("RKLLM_CACHE_MAX_MB must not be negative")
        if self.cache_min_tokens < 1:
            raise ConfigError("RKLLM_CACHE_MIN_TOKENS must be at least 1")
        if self.cache_max_age != self.cache_max_age:
            raise ConfigError("RKLLM_CACHE_MAX_AGE must be a number of seconds or a duration such as 48h")
        if not self.ring_fault_s > 0:
            raise ConfigError("RKLLM_RING_FAULT_S must be positive")
        if self.ring_affinity < 0:
            raise ConfigError("RKLLM_RING_AFFINITY must not be negative")
        for name in ("sim_decode_ms", "sim_prefill_ms", "sim_prefill_base_ms", "sim_load_ms", "sim_cache_io_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"RKLLM_{name.upper()} must not be negative")

    @property
    def prompt_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.models_dir / ".rkllm-cache"

    @property
    def rkllama_url(self) -> str:
        if self.server_url:
            return self.server_url.rstrip("/")
        return f"http://{self.server_host}:{self.server_port}"

    def with_(self, **changes: Any) -> "Config":
        return replace(self, **changes)


assert {s.attr for s in SETTINGS} == {f.name for f in fields(Config)}, "SETTINGS and Config disagree"
