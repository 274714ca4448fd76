"""Finding librkllmrt.so, reading its version, refusing versions we do not know before any call."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from exo_rkllm.config import Config
from exo_rkllm.errors import RuntimeUnavailable, RuntimeVersionError
from exo_rkllm.runtime.factory import create_runtime
from exo_rkllm.runtime.native import create, detect_version, find_library, identify
from exo_rkllm.runtime.native.backend import NativeRuntime, parse_cpu_mask
from exo_rkllm.runtime.native.isolated import IsolatedRuntime
from exo_rkllm.runtime.native.library import SUPPORTED
from fake_rkllm.fixtures import *  # noqa: F401,F403


@pytest.mark.parametrize("version", ["1.1.2", "1.1.4", "1.2.0", "1.2.1", "1.2.2", "1.2.3", "1.3.0"])
def test_version_is_read_from_the_library_bytes(fake_lib, version: str) -> None:
    lib = fake_lib(version)
    assert detect_version(lib) == version
    identity = identify(Config(lib_path=lib))
    assert identity.version == version and identity.layout_name == SUPPORTED[version]


def test_version_from_a_format_string_banner_and_a_separate_constant(tmp_path: Path) -> None:
    blob = tmp_path / "librkllmrt.so"
    blob.write_bytes(b"\x7fELF\x00junk\x00I rkllm: rkllm-runtime version: %s, rknpu driver version: %s\x00"
                     b"0.9.7\x001.2.2 (8d2a1b3@2025-06-01T10:00:00)\x00other\x00")
    assert detect_version(blob) == "1.2.2"
    blob.write_bytes(b"\x00rkllm-runtime version: %s\x001.2.2\x001.2.3\x00")
    assert detect_version(blob) is None  # two candidates: ambiguous, refuse to guess
    blob.write_bytes(b"\x00nothing that names a version\x001.2.3\x00")
    assert detect_version(blob) is None


def test_unsupported_version_is_refused_before_the_library_is_even_loaded(fake_lib, tmp_path, monkeypatch) -> None:
    marker = tmp_path / "loaded.txt"
    monkeypatch.setenv("FAKE_RKLLM_LOAD_MARKER", str(marker))
    beta = fake_lib("1.2.1b1", layout="1.2.0")  # a real beta release with a layout of its own
    for isolation in (True, False):
        with pytest.raises(RuntimeVersionError) as err:
            create(Config(lib_path=beta, native_isolation=isolation))
        message = str(err.value)
        assert "1.2.1b1" in message and "1.1.0 to 1.1.4, 1.2.0, 1.2.1, 1.2.2, 1.2.3 and 1.3.0" in message
    future = fake_lib("2.0.0", layout="1.3.0")
    with pytest.raises(RuntimeVersionError, match="2.0.0"):
        create(Config(lib_path=future))
    assert not marker.exists(), "a refused library must never be loaded"
    # Control: the marker does appear when a supported library is loaded in-process.
    runtime = create(Config(lib_path=fake_lib("1.2.3"), native_isolation=False))
    assert isinstance(runtime, NativeRuntime) and marker.exists()


def test_unreadable_version_asks_for_rkllm_runtime_version(fake_lib, tmp_path: Path) -> None:
    data = fake_lib("1.2.3").read_bytes().replace(b"rkllm-runtime version: 1.2.3", b"rkllm-runtime build:   1.2.3")
    anonymous = tmp_path / "librkllmrt.so"
    anonymous.write_bytes(data)
    with pytest.raises(RuntimeVersionError, match="RKLLM_RUNTIME_VERSION"):
        identify(Config(lib_path=anonymous))
    identity = identify(Config(lib_path=anonymous, runtime_version="1.2.3"))
    assert identity.version == "1.2.3" and identity.detected is None


def test_rkllm_runtime_version_setting(fake_lib) -> None:
    lib = fake_lib("1.2.3")
    with pytest.raises(RuntimeVersionError, match="RKLLM_RUNTIME_VERSION=9.9.9"):
        identify(Config(lib_path=lib, runtime_version="9.9.9"))
    forced = identify(Config(lib_path=lib, runtime_version="1.2.2"))  # same layout line: user's word wins
    assert forced.version == "1.2.2" and forced.detected == "1.2.3"


def test_a_library_missing_functions_of_its_claimed_release_is_refused(fake_lib) -> None:
    # Says 1.2.3 but was built with the 1.1.4 header: it lacks rkllm_clear_kv_cache & co.
    liar = fake_lib("1.2.3", layout="1.1.4")
    with pytest.raises(RuntimeVersionError, match="lacks a function"):
        create(Config(lib_path=liar, native_isolation=False))


def test_find_library(fake_lib, tmp_path: Path) -> None:
    lib = fake_lib("1.2.3")
    assert find_library(Config(lib_path=lib)) == lib
    assert find_library(Config(lib_path=lib.parent)) == lib.parent / "librkllmrt.so"
    assert find_library(Config(lib_path=tmp_path / "nowhere.so")) is None
    from exo_rkllm.runtime.native.library import find_library as search

    assert search(Config(), search_dirs=[tmp_path, lib.parent]) == lib.parent / "librkllmrt.so"
    assert search(Config(), search_dirs=[tmp_path]) is None
    with pytest.raises(RuntimeUnavailable, match="RKLLM_LIB_PATH"):
        create(Config(lib_path=tmp_path / "nowhere.so"))


def test_factory_builds_the_isolated_backend_by_default(fake_lib) -> None:
    lib = fake_lib("1.2.3")

    async def build(**kw):
        runtime = await create_runtime(Config(lib_path=lib, **kw))
        await runtime.close()
        return runtime

    assert isinstance(asyncio.run(build(backend="native")), IsolatedRuntime)
    assert isinstance(asyncio.run(build(backend="auto")), IsolatedRuntime)
    assert isinstance(asyncio.run(build(backend="native", native_isolation=False)), NativeRuntime)


def test_cpu_mask_parsing() -> None:
    assert parse_cpu_mask("4-7") == 0xF0
    assert parse_cpu_mask("4,5,6,7") == 0xF0
    assert parse_cpu_mask("0xf0") == 0xF0
    assert parse_cpu_mask("0,2-3") == 0b1101
    assert parse_cpu_mask("") is None
    from exo_rkllm.errors import ConfigError

    for bad in ("8", "big", "0x100"):
        with pytest.raises(ConfigError):
            parse_cpu_mask(bad)


# -- the typed library --------------------------------------------------------------------------------------
def _declarations_in_abi() -> dict[str, dict[str, str]]:
    """layout -> C function -> the declaration quoted above its PROTOTYPES entry in abi.py."""
    import inspect
    import re

    from exo_rkllm.runtime.native import abi

    found: dict[str, dict[str, str]] = {}
    for name, layout in abi.LAYOUTS.items():
        lines = inspect.getsource(layout).splitlines()
        quoted: dict[str, str] = {}
        for above, line in zip(lines, lines[1:]):
            m = re.match(r'\s*\("(rkllm_\w+)"', line)
            if m:
                c = re.match(r"\s*# ((?:int|RKLLMParam) (rkllm_\w+)\(.*\);)$", above)
                assert c and c.group(2) == m.group(1), f"{name}: {m.group(1)} has no C declaration above it"
                quoted[m.group(1)] = c.group(1)
        assert set(quoted) == {p[0] for p in layout.PROTOTYPES}
        found[name] = quoted
    return found


def test_every_prototype_quotes_its_c_declaration_and_has_a_typed_method() -> None:
    import inspect

    from exo_rkllm.runtime.native.library import RKLLMLibrary

    for layout, quoted in _declarations_in_abi().items():
        for function, declaration in quoted.items():
            method = getattr(RKLLMLibrary, function, None)
            assert callable(method), f"RKLLMLibrary has no method for {function}"
            doc = " ".join((inspect.getdoc(method) or "").split())
            assert " ".join(declaration.split()) in doc, f"{function}'s docstring lacks {layout}'s {declaration}"
            returns = inspect.signature(method).return_annotation  # a string: the module has postponed annotations
            assert returns == ("Any" if function == "rkllm_createDefaultParam" else "int"), (function, returns)


@pytest.mark.parametrize("version", ["1.1.4", "1.2.0", "1.2.3", "1.3.0"])
def test_the_typed_methods_call_the_release_prototypes(fake_lib, version: str) -> None:
    import ctypes

    from exo_rkllm.runtime.native.library import RKLLMLibrary

    lib = RKLLMLibrary(identify(Config(lib_path=fake_lib(version))))
    assert not hasattr(lib, "fn")  # no string-keyed table to call through
    param = lib.rkllm_createDefaultParam()
    assert isinstance(param, lib.layout.RKLLMParam)  # the release's struct, by value
    assert lib.rkllm_is_running(None) in (0, 1, -1)
    for function, present in (("rkllm_clear_kv_cache", version != "1.1.4"),
                              ("rkllm_get_kv_cache_size", version in ("1.2.3", "1.3.0"))):
        assert lib.has(function) == present
        if not present:  # never called without this release's prototype
            with pytest.raises(RuntimeVersionError, match=function):
                getattr(lib, function)(None, *((0,) if function == "rkllm_clear_kv_cache" else
                                               ((ctypes.c_int * 8)(),)))
    if version == "1.2.0":  # its rkllm_clear_kv_cache takes no range
        with pytest.raises(RuntimeVersionError, match="no range"):
            lib.rkllm_clear_kv_cache(None, 0, (ctypes.c_int * 1)(), (ctypes.c_int * 1)())
