"""Crash isolation: the runtime in a worker process. A crash fails the request in flight with a
clear error, the worker comes back with the model reloaded, the next request completes, and the
test process (standing in for exo) never notices more than an exception."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from exo_rkllm.config import Config
from exo_rkllm.errors import GenerationError, ModelLoadError
from exo_rkllm.runtime.base import CallState, GenerationInput, TokenEvent
from exo_rkllm.runtime.native import create
from exo_rkllm.runtime.native.isolated import IsolatedRuntime, describe_exit
from fake_rkllm.fixtures import *  # noqa: F401,F403
from native_support import MULTIBYTE, fake_model, prompt_ids, run, spec_for, text_of, trace


def isolated(fake_lib, version: str = "1.2.3", **config) -> IsolatedRuntime:
    runtime = create(Config(lib_path=fake_lib(version), **config))
    assert isinstance(runtime, IsolatedRuntime)
    return runtime


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("version", ["1.1.4", "1.3.0"])
async def test_generation_through_the_worker_is_byte_exact(fake_lib, tmp_path, demo_tokenizer, demo_model_dir,
                                                           version) -> None:
    rt = isolated(fake_lib, version)
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, version), demo_model_dir))
    pid = rt.worker_pid
    assert pid and pid != os.getpid()
    ids = prompt_ids(demo_tokenizer, "hello")
    tokens, finish = await run(rt, ids, keep_history=True)
    assert text_of(tokens) == MULTIBYTE and not finish.aborted
    assert [t.token_id for t in tokens] == demo_tokenizer.encode(MULTIBYTE)
    assert CallState.WAITING in [t.state for t in tokens]
    assert rt.kv_cache_len() == (len(ids) + len(tokens) if version == "1.3.0" else None)
    await rt.clear_kv_cache()
    assert rt.kv_cache_len() == (0 if version == "1.3.0" else None)
    await rt.close()
    await wait_for(lambda: not alive(pid))
    assert trace(tmp_path)[-1] == "destroy"  # the worker released the runtime on the way out


@pytest.mark.parametrize("mode,signame", [("segv", "SIGSEGV"), ("abort", "SIGABRT"), ("kill", "SIGKILL")])
async def test_crash_on_the_fifth_token_fails_that_request_and_the_next_one_completes(
        fake_lib, tmp_path, demo_tokenizer, demo_model_dir, mode, signame) -> None:
    trigger = demo_tokenizer.encode(" CRASH")[0]
    rt = isolated(fake_lib)
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.3", crash_at=5, crash_if_input_has=trigger,
                                      crash_mode=mode, decode_ms=1), demo_model_dir))
    first_pid = rt.worker_pid
    seen: list[TokenEvent] = []
    with pytest.raises(GenerationError) as err:
        async for event in rt.generate(GenerationInput("boom", tuple(prompt_ids(demo_tokenizer, "please CRASH")))):
            seen.append(event)
    message = str(err.value)
    assert "crashed" in message and signame in message and "restarted" in message
    assert len(seen) == 4  # the tokens before the crash reached us
    assert not rt.is_running()
    tokens, finish = await run(rt, prompt_ids(demo_tokenizer, "a normal question"))
    assert text_of(tokens) == MULTIBYTE and not finish.aborted
    assert rt.worker_pid != first_pid and rt.restarts == 1 and rt.loaded is not None
    assert [line.split()[0] for line in trace(tmp_path)].count("init") == 2  # model reloaded
    await rt.close()


async def test_worker_killed_while_idle_is_replaced_before_the_next_request(fake_lib, tmp_path, demo_tokenizer,
                                                                            demo_model_dir) -> None:
    rt = isolated(fake_lib)
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.3"), demo_model_dir))
    pid = rt.worker_pid
    os.kill(pid, signal.SIGKILL)  # as the OOM killer would
    await wait_for(lambda: rt.worker_pid not in (None, pid))  # restarted at once, not at the next request
    tokens, _ = await run(rt, prompt_ids(demo_tokenizer, "still there?"))
    assert text_of(tokens) == MULTIBYTE
    assert "SIGKILL" in (rt.last_death or "")
    await rt.close()


async def test_cancel_returns_control_quickly_at_board_pacing(fake_lib, tmp_path, demo_tokenizer,
                                                              demo_model_dir) -> None:
    rt = isolated(fake_lib)
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.3", [MULTIBYTE * 4], prefill_ms=8,
                                      decode_ms=125), demo_model_dir))
    gen = rt.generate(GenerationInput("r", tuple(prompt_ids(demo_tokenizer, "long answer please"))))
    await gen.__anext__()
    await gen.__anext__()
    started = time.monotonic()
    await gen.aclose()  # the consumer (exo's request) is gone
    assert time.monotonic() - started < 1.0
    assert not rt.is_running()
    await rt.abort()  # idle abort is harmless
    tokens, _ = await run(rt, prompt_ids(demo_tokenizer, "next"), max_new_tokens=2)
    assert len(tokens) == 2
    await rt.close()


async def test_abort_while_waiting_for_tokens(fake_lib, tmp_path, demo_tokenizer, demo_model_dir) -> None:
    rt = isolated(fake_lib)
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.3", [MULTIBYTE * 4], decode_ms=100),
                           demo_model_dir))
    stopped_at: list[float] = []

    async def cancel_soon() -> None:
        await asyncio.sleep(0.3)
        stopped_at.append(time.monotonic())
        await rt.abort()

    task = asyncio.create_task(cancel_soon())
    tokens, finish = await run(rt, prompt_ids(demo_tokenizer, "go"))
    await task
    assert finish.aborted and 0 < len(tokens) < 10
    assert time.monotonic() - stopped_at[0] < 1.0
    await rt.close()


async def test_crash_while_loading_is_a_load_error_and_the_worker_recovers(fake_lib, tmp_path, demo_tokenizer,
                                                                           demo_model_dir) -> None:
    rt = isolated(fake_lib)
    bad = fake_model(tmp_path, demo_tokenizer, "1.2.3", name="bad.rkllm", crash_on_load=1)
    with pytest.raises(ModelLoadError, match="crashed while loading"):
        await rt.load(spec_for(bad, demo_model_dir))
    assert rt.loaded is None
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.3"), demo_model_dir))
    tokens, _ = await run(rt, prompt_ids(demo_tokenizer, "ok"))
    assert text_of(tokens) == MULTIBYTE
    await rt.close()


async def test_load_errors_travel_back_with_their_type(fake_lib, tmp_path, demo_tokenizer, demo_model_dir) -> None:
    rt = isolated(fake_lib)
    with pytest.raises(ModelLoadError, match="invalid model magic.*1.1.4"):
        await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.1.4"), demo_model_dir))
    with pytest.raises(GenerationError, match="no model"):
        await run(rt, [1])
    await rt.close()


@pytest.mark.parametrize("how", ["abort", "consumer leaves"])
async def test_a_runtime_that_ignores_abort_is_killed_and_replaced(fake_lib, tmp_path, demo_tokenizer,
                                                                   demo_model_dir, how) -> None:
    rt = isolated(fake_lib)
    rt.ABORT_GRACE = 0.5
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.3", [MULTIBYTE * 6], decode_ms=50,
                                      ignore_abort=True), demo_model_dir))
    hung_pid = rt.worker_pid
    gen = rt.generate(GenerationInput("r", tuple(prompt_ids(demo_tokenizer, "go"))))
    await gen.__anext__()
    started = time.monotonic()
    if how == "abort":
        await rt.abort()
        with pytest.raises(GenerationError, match="stopped responding.*did not stop within 0.5 s of an abort"):
            async for _ in gen:
                pass
    else:
        await gen.aclose()
    assert 0.4 < time.monotonic() - started < 3.0
    assert rt.worker_pid != hung_pid
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.3", name="sane.rkllm"), demo_model_dir))
    tokens, _ = await run(rt, prompt_ids(demo_tokenizer, "next"))
    assert text_of(tokens) == MULTIBYTE
    await rt.close()


def test_exit_descriptions() -> None:
    assert describe_exit(-11) == "was killed by SIGSEGV (segmentation fault)"
    assert "out-of-memory" in describe_exit(-9)
    assert describe_exit(3) == "exited with status 3"


@pytest.mark.parametrize("version", ["1.2.0", "1.3.0"])
async def test_the_finish_kind_crosses_the_worker_and_async_with_closes_it(fake_lib, tmp_path, demo_tokenizer,
                                                                           demo_model_dir, version) -> None:
    from exo_rkllm.runtime.base import FinishKind

    async with isolated(fake_lib, version) as rt:
        await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, version), demo_model_dir))
        pid = rt.worker_pid
        ids = prompt_ids(demo_tokenizer, "hello")
        _, whole = await run(rt, ids)
        _, cut = await run(rt, ids, max_new_tokens=3)  # 1.3.0 stops itself there; 1.2.0 is stopped by the worker
        assert whole.kind is FinishKind.STOP and cut.kind is FinishKind.LENGTH and not cut.aborted
    await wait_for(lambda: not alive(pid))
    assert trace(tmp_path)[-1] == "destroy"
