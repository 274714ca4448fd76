"""pytest fixtures for the native backend tests (import them into a test module with `from ... import *`)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from . import build_fake_library, compiler

__all__ = ["fake_lib", "fake_lib_dir"]


@pytest.fixture(scope="session")
def fake_lib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fake-rkllm-lib")


@pytest.fixture(scope="session")
def fake_lib(fake_lib_dir: Path) -> Callable[..., Path]:
    """fake_lib(version="1.2.3", layout=None) -> path of a built fake librkllmrt.so (built once)."""
    if compiler() is None:
        pytest.skip("no C compiler (cc, gcc or clang) on this machine: the fake RKLLM runtime library cannot be "
                    "built, so the native backend tests cannot run")

    def get(version: str = "1.2.3", layout: str | None = None) -> Path:
        return build_fake_library(version, fake_lib_dir, layout=layout)

    return get
