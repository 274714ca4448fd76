"""The direct NPU backend: librkllmrt.so through ctypes, crash-isolated in a worker process.

    abi.py       rkllm.h transcribed, one complete definition per runtime layout
    library.py   find the library, read its version, refuse unknown ones, load and bind it
    backend.py   NativeSession (sync, owns the handle) and NativeRuntime (async, in-process)
    worker.py    the child process that owns the library
    isolated.py  IsolatedRuntime: the Runtime exo talks to, restarting the worker if it dies
    ipc.py       the messages between the two

`create(config)` settles the library and its version before anything calls into
it: a missing library raises RuntimeUnavailable, an unsupported version
RuntimeVersionError, both with what to do.
"""
from __future__ import annotations

from pathlib import Path

from exo_rkllm.config import Config
from exo_rkllm.runtime.base import Runtime
from exo_rkllm.runtime.native.library import SUPPORTED, RKLLMLibrary, RuntimeIdentity, detect_version, identify
from exo_rkllm.runtime.native.library import find_library as _find_library

__all__ = ["SUPPORTED", "RuntimeIdentity", "create", "detect_version", "find_library", "identify"]


def find_library(config: Config) -> Path | None:
    """Where librkllmrt.so is (RKLLM_LIB_PATH, else the usual places), or None."""
    return _find_library(config)


def create(config: Config) -> Runtime:
    """The native backend for `config`: isolated in a worker process unless RKLLM_NATIVE_ISOLATION=0."""
    from exo_rkllm.runtime.native.backend import NativeRuntime, NativeSettings

    identity = identify(config)  # raises before any call into the library
    if config.native_isolation:
        from exo_rkllm.runtime.native.isolated import IsolatedRuntime

        return IsolatedRuntime(identity, NativeSettings.from_config(config, pin_process=True))
    return NativeRuntime(RKLLMLibrary(identity), NativeSettings.from_config(config))
