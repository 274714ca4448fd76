"""Find librkllmrt.so, tell which runtime release it is, and load it with that release's ABI.

The struct layouts changed between releases and nothing in the C API reports
the version, so calling a library with the wrong layout corrupts memory
silently. Everything here therefore happens before the first call into the
library: the version is read from the file's bytes (the runtime carries its
`rkllm-runtime version: X.Y.Z` banner, printed at rkllm_init) or taken from
RKLLM_RUNTIME_VERSION, and an unknown version is refused with the list of the
ones we support.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from exo_rkllm.config import Config
from exo_rkllm.errors import RuntimeUnavailable, RuntimeVersionError
from exo_rkllm.runtime.native import abi

log = logging.getLogger("exo_rkllm.native")

LIBRARY_NAME = "librkllmrt.so"

# Release -> layout (see abi.py). 1.1.0-1.1.4 shipped one identical rkllm.h. 1.2.1b1 (a beta)
# has a layout of its own and is deliberately absent: refusing it is safer than guessing.
SUPPORTED: dict[str, str] = {
    "1.1.0": "1.1.4", "1.1.1": "1.1.4", "1.1.2": "1.1.4", "1.1.3": "1.1.4", "1.1.4": "1.1.4",
    "1.2.0": "1.2.0",
    "1.2.1": "1.2.1", "1.2.2": "1.2.1", "1.2.3": "1.2.1",
    "1.3.0": "1.3.0",
}

_VERSION = rb"(\d+\.\d+\.\d+(?:[ab]\d+)?)"
# The banner with the version spelled into it ("rkllm-runtime version: 1.2.3, rknpu driver ...").
_BANNER = re.compile(rb"rkllm-runtime version:? *v?" + _VERSION)
# The banner as a format string; the version is then a string constant of its own.
_BANNER_FORMAT = re.compile(rb"rkllm-runtime version:? *%s")
# A NUL-delimited constant that is a version, possibly with a build suffix ("1.2.3 (abc@2025-...)").
_CONSTANT = re.compile(rb"(?<=\x00)v?" + _VERSION + rb"(?: ?\([^\x00)]{0,80}\))?(?=\x00)")


def supported_versions_text() -> str:
    return "1.1.0 to 1.1.4, 1.2.0, 1.2.1, 1.2.2, 1.2.3 and 1.3.0"


def default_search_dirs() -> list[Path]:
    """Where a board usually has the runtime: the system library folders, rkllama's, LD_LIBRARY_PATH."""
    dirs = [Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    dirs += [Path("/usr/lib"), Path("/usr/local/lib"), Path("/usr/lib/aarch64-linux-gnu"), Path("/usr/lib64"),
             Path("/lib"), Path("~/RKLLAMA/lib").expanduser(), Path("~/RKLLAMA/src/rkllama/lib").expanduser()]
    return dirs


def find_library(config: Config, search_dirs: Iterable[Path] | None = None) -> Path | None:
    """The library to use: RKLLM_LIB_PATH (a file, or a folder holding it) if set, else the first
    librkllmrt.so in the usual places. None when there is none (RKLLM_LIB_PATH set to a missing
    path also gives None: `create` then says what is wrong)."""
    if config.lib_path is not None:
        path = Path(config.lib_path).expanduser()
        if path.is_dir():
            path = path / LIBRARY_NAME
        return path if path.is_file() else None
    for folder in (search_dirs if search_dirs is not None else default_search_dirs()):
        candidate = folder / LIBRARY_NAME
        if candidate.is_file():
            return candidate
    return None


def detect_version(path: Path) -> str | None:
    """The runtime release `path` carries, read from its bytes; None if it cannot be told.

    First the banner with the version in it; else, when the banner is a format string, the one
    version-like string constant of the file (two different ones: ambiguous, None)."""
    with open(path, "rb") as fh:
        try:
            data: Any = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty file
            return None
        try:
            found = {m.group(1).decode() for m in _BANNER.finditer(data)}
            if len(found) == 1:
                return found.pop()
            if len(found) > 1:
                log.warning("%s names several runtime versions (%s)", path, ", ".join(sorted(found)))
                return None
            if _BANNER_FORMAT.search(data) is None:
                return None
            constants = {m.group(1).decode() for m in _CONSTANT.finditer(data)}
            # A runtime release is 1.x; driver and toolkit requirements quoted in messages are not
            # NUL-delimited constants, but stay strict anyway.
            candidates = {v for v in constants if v.split(".")[0] == "1"}
            return candidates.pop() if len(candidates) == 1 else None
        finally:
            data.close()


@dataclass(frozen=True)
class RuntimeIdentity:
    """Which library, which release, which ABI layout; settled before any call into the library."""

    path: Path
    version: str
    layout_name: str
    detected: str | None

    @property
    def layout(self) -> abi.Layout:
        return abi.LAYOUTS[self.layout_name]


def identify(config: Config, path: Path | None = None) -> RuntimeIdentity:
    """Locate the library and settle its version, or raise with what to do. Never loads it."""
    lib = path or find_library(config)
    if lib is None:
        if config.lib_path is not None:
            raise RuntimeUnavailable(f"RKLLM_LIB_PATH={config.lib_path} does not exist or holds no {LIBRARY_NAME}")
        places = ", ".join(str(d) for d in default_search_dirs())
        raise RuntimeUnavailable(f"{LIBRARY_NAME} not found (looked in {places}); install it from "
                                 "airockchip/rknn-llm (rkllm-runtime/Linux/librkllm_api/aarch64) or set RKLLM_LIB_PATH")
    try:
        detected = detect_version(lib)
    except OSError as exc:
        raise RuntimeUnavailable(f"cannot read {lib}: {exc}") from exc
    wanted = config.runtime_version.strip().lstrip("v")
    if wanted:
        if wanted not in SUPPORTED:
            raise RuntimeVersionError(f"RKLLM_RUNTIME_VERSION={config.runtime_version} is not a runtime version "
                                      f"exo-rkllm supports; supported: {supported_versions_text()}")
        if detected and detected != wanted:
            log.warning("RKLLM_RUNTIME_VERSION=%s overrides the version %s read from %s: if the library really is "
                        "%s, its struct layouts differ and it will misbehave", wanted, detected, lib, detected)
        version = wanted
    elif detected is None:
        raise RuntimeVersionError(f"cannot tell which RKLLM runtime release {lib} is (no version string found "
                                  f"in it); set RKLLM_RUNTIME_VERSION to its version (supported: "
                                  f"{supported_versions_text()})")
    elif detected not in SUPPORTED:
        raise RuntimeVersionError(f"{lib} is RKLLM runtime {detected}, which exo-rkllm does not support; "
                                  f"supported: {supported_versions_text()}. Install one of those "
                                  "(airockchip/rknn-llm releases) and convert models with the matching rkllm-toolkit")
    else:
        version = detected
    return RuntimeIdentity(lib, version, SUPPORTED[version], detected)


# What the typed methods below take where rkllm.h has a pointer: ctypes.byref(...), ctypes.pointer(...),
# an array, or None for NULL. The struct types themselves are per release (abi.LAYOUTS).
CPointer = Any
Handle = Any  # LLMHandle (c_void_p) or, for rkllm_init, a pointer to one


class RKLLMLibrary:
    """The loaded library, one typed method per function of rkllm.h.

    Each method quotes the C declaration it calls (every release's, where they differ) and calls the
    foreign function whose argtypes and restype were set from this release's PROTOTYPES table (abi.py),
    so ctypes checks every call against the header of the release in hand. A function the release
    does not have raises RuntimeVersionError rather than being called without a prototype."""

    def __init__(self, identity: RuntimeIdentity) -> None:
        self.identity = identity
        self.layout = identity.layout
        try:
            self.cdll = ctypes.CDLL(str(identity.path))
        except OSError as exc:
            hint = (" (this library is for another CPU architecture: the RKLLM runtime runs on aarch64 boards)"
                    if "ELF" in str(exc) or "wrong" in str(exc) else "")
            raise RuntimeUnavailable(f"cannot load {identity.path}: {exc}{hint}") from exc
        try:
            self._bound = abi.bind(self.cdll, self.layout)
        except AttributeError as exc:
            raise RuntimeVersionError(
                f"{identity.path} lacks a function that runtime {identity.version} has ({exc}); it is probably "
                f"another release: set RKLLM_RUNTIME_VERSION to its real version") from exc

    @property
    def version(self) -> str:
        return self.identity.version

    def has(self, name: str) -> bool:
        """Whether this release's rkllm.h declares the C function `name`."""
        return name in self._bound

    def _c(self, name: str) -> Any:
        try:
            return self._bound[name]
        except KeyError:
            raise RuntimeVersionError(f"{name} is not in the rkllm.h of runtime {self.version}") from None

    # -- every release ----------------------------------------------------------------------------------
    def rkllm_createDefaultParam(self) -> Any:
        """`RKLLMParam rkllm_createDefaultParam();`: the release's RKLLMParam struct, by value."""
        return self._c("rkllm_createDefaultParam")()

    def rkllm_init(self, handle: CPointer, param: CPointer, callback: Any) -> int:
        """1.1.x-1.2.x: `int rkllm_init(LLMHandle* handle, RKLLMParam* param, LLMResultCallback callback);`
        1.3.0: `int rkllm_init(LLMHandle* handle, RKLLMParam* param, RKLLMCallback* callback);`

        `callback` is the LLMResultCallback itself, or a pointer to an RKLLMCallback on 1.3.0
        (layout.INIT_TAKES_CALLBACK_STRUCT)."""
        return self._c("rkllm_init")(handle, param, callback)

    def rkllm_load_lora(self, handle: Handle, lora_adapter: CPointer) -> int:
        """`int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter* lora_adapter);`"""
        return self._c("rkllm_load_lora")(handle, lora_adapter)

    def rkllm_load_prompt_cache(self, handle: Handle, prompt_cache_path: bytes) -> int:
        """`int rkllm_load_prompt_cache(LLMHandle handle, const char* prompt_cache_path);`"""
        return self._c("rkllm_load_prompt_cache")(handle, prompt_cache_path)

    def rkllm_release_prompt_cache(self, handle: Handle) -> int:
        """`int rkllm_release_prompt_cache(LLMHandle handle);`"""
        return self._c("rkllm_release_prompt_cache")(handle)

    def rkllm_destroy(self, handle: Handle) -> int:
        """`int rkllm_destroy(LLMHandle handle);`"""
        return self._c("rkllm_destroy")(handle)

    def rkllm_run(self, handle: Handle, rkllm_input: CPointer, rkllm_infer_params: CPointer,
                  userdata: CPointer = None) -> int:
        """`int rkllm_run(LLMHandle handle, RKLLMInput* rkllm_input, RKLLMInferParam* rkllm_infer_params,
        void* userdata);`: blocks until the run ends; the callback reports its results meanwhile."""
        return self._c("rkllm_run")(handle, rkllm_input, rkllm_infer_params, userdata)

    def rkllm_run_async(self, handle: Handle, rkllm_input: CPointer, rkllm_infer_params: CPointer,
                        userdata: CPointer = None) -> int:
        """`int rkllm_run_async(LLMHandle handle, RKLLMInput* rkllm_input, RKLLMInferParam* rkllm_infer_params,
        void* userdata);`: returns at once."""
        return self._c("rkllm_run_async")(handle, rkllm_input, rkllm_infer_params, userdata)

    def rkllm_abort(self, handle: Handle) -> int:
        """`int rkllm_abort(LLMHandle handle);`"""
        return self._c("rkllm_abort")(handle)

    def rkllm_is_running(self, handle: Handle) -> int:
        """`int rkllm_is_running(LLMHandle handle);`: documented "0 if a task is running" up to 1.2.3 and
        "1 if a task is running" in 1.3.0 (layout.IS_RUNNING_MEANS_RUNNING); the raw value is returned."""
        return self._c("rkllm_is_running")(handle)

    # -- 1.2.0 on -------------------------------------------------------------------------------------------
    def rkllm_clear_kv_cache(self, handle: Handle, keep_system_prompt: int, start_pos: CPointer = None,
                             end_pos: CPointer = None) -> int:
        """1.2.0: `int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt);`
        1.2.1 on: `int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int* start_pos,
        int* end_pos);` (both NULL: the whole cache).

        On 1.2.0 a range cannot be given: `start_pos` and `end_pos` must stay None."""
        fn = self._c("rkllm_clear_kv_cache")
        if self.layout.CLEAR_KV_CACHE_TAKES_RANGE:
            return fn(handle, keep_system_prompt, start_pos, end_pos)
        if start_pos is not None or end_pos is not None:
            raise RuntimeVersionError(f"rkllm_clear_kv_cache of runtime {self.version} clears no range")
        return fn(handle, keep_system_prompt)

    def rkllm_set_chat_template(self, handle: Handle, system_prompt: bytes, prompt_prefix: bytes,
                                prompt_postfix: bytes) -> int:
        """`int rkllm_set_chat_template(LLMHandle handle, const char* system_prompt, const char* prompt_prefix,
        const char* prompt_postfix);`"""
        return self._c("rkllm_set_chat_template")(handle, system_prompt, prompt_prefix, prompt_postfix)

    # -- 1.2.1 on -------------------------------------------------------------------------------------------
    def rkllm_get_kv_cache_size(self, handle: Handle, cache_sizes: CPointer) -> int:
        """`int rkllm_get_kv_cache_size(LLMHandle handle, int* cache_sizes);`: one int per batch slot."""
        return self._c("rkllm_get_kv_cache_size")(handle, cache_sizes)

    def rkllm_set_function_tools(self, handle: Handle, system_prompt: bytes, tools: bytes,
                                 tool_response_str: bytes) -> int:
        """`int rkllm_set_function_tools(LLMHandle handle, const char* system_prompt, const char* tools,
        const char* tool_response_str);`"""
        return self._c("rkllm_set_function_tools")(handle, system_prompt, tools, tool_response_str)

    def rkllm_set_cross_attn_params(self, handle: Handle, cross_attn_params: CPointer) -> int:
        """`int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam* cross_attn_params);`"""
        return self._c("rkllm_set_cross_attn_params")(handle, cross_attn_params)
