"""Model lifecycle: RKLLM_PRELOAD, RKLLM_KEEP_ALIVE, model switches, explicit load/unload, loading state.

Driven the way exo drives the engine (tests/exo_driver.py), on the simulator. What the runtime did
is read from a recording wrapper (every load and unload, in order), never from timing; waits for a
state change are bounded by generous ceilings only.
"""
from __future__ import annotations

import asyncio
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from exo_rkllm.exo_glue import plugin
from exo_rkllm.config import Config
from exo_rkllm.errors import ConfigError, ModelLoadError
from exo_rkllm.scheduler.lifecycle import LoadStatus, ModelStatus, preload_ids
from exo_rkllm.runtime.sim import SimTiming
from exo_driver import ExoRing
from support import DEMO_LAYERS, RecordingRuntime, make_engine, user

CEILING_S = 30.0  # bounds a hang; never a speed claim


class LifecycleRuntime(RecordingRuntime):
    """Records every load and unload in order; can refuse loads, or hold an unload until released."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.events: list[tuple[str, str]] = []
        self.refuse: set[str] = set()  # model ids whose load fails as a runtime refusing the file would
        self.unload_gate: asyncio.Event | None = None  # set: unloads wait for it

    async def load(self, spec: Any, progress: Any = None) -> None:
        self.events.append(("load", spec.model_id))
        if spec.model_id in self.refuse:
            raise ModelLoadError(f"the runtime could not load {spec.path}: invalid model magic")
        await self.inner.load(spec, progress)

    async def unload(self) -> None:
        loaded = self.inner.loaded
        self.events.append(("unload", loaded.model_id if loaded else "-"))
        if self.unload_gate is not None:
            await self.unload_gate.wait()
        await self.inner.unload()


def engine_with(models_dir: Path, timing: SimTiming | None = None, **config: Any):
    engine, recording = make_engine(models_dir, timing, **config)
    runtime = LifecycleRuntime(recording.inner)
    engine._runtime = runtime
    return engine, runtime


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + CEILING_S
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        await asyncio.sleep(0.01)


def ids_of(engine: Any) -> list[str]:
    return sorted(e.model_id for e in engine.catalog.servable())


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("two-models")
    for name in ("Alpha", "Beta"):
        shutil.copytree(demo_model_dir, root / name)
    return root


async def answer_text(ring: ExoRing, model_id: str, text: str) -> str:
    answer = await ring.complete(model_id, user(text), DEMO_LAYERS)
    assert answer.finish_reason == "stop" and answer.error is None, answer.error
    return answer.streamed_text


# -- settings -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,seconds", [("300", 300.0), ("5m", 300.0), ("30s", 30.0), ("1h", 3600.0),
                                         ("1h30m", 5400.0), ("500ms", 0.5), ("0", 0.0), ("-1", -1.0),
                                         ("-1m", -60.0), (" 2.5m ", 150.0)])
def test_keep_alive_takes_seconds_or_ollama_durations(raw, seconds):
    assert Config.from_env({"RKLLM_KEEP_ALIVE": raw}).keep_alive == seconds


@pytest.mark.parametrize("raw", ["", "soon", "5x", "m", "5m3", "nan"])
def test_a_bad_keep_alive_names_the_variable(raw):
    with pytest.raises(ConfigError, match="RKLLM_KEEP_ALIVE"):
        Config.from_env({"RKLLM_KEEP_ALIVE": raw})


def test_default_keeps_the_model_loaded_and_preloads_nothing():
    assert Config().keep_alive < 0 and Config().preload == ""


def test_preload_names_first_and_ids_in_order_without_repeats():
    assert preload_ids("first", ["a", "b"]) == ["a"]
    assert preload_ids(" b , first, b ,, c", ["a", "b"]) == ["b", "a", "c"]
    assert preload_ids("first", []) == []


# -- preload --------------------------------------------------------------------------------------------
async def test_preload_first_loads_at_start_up_so_the_first_request_pays_no_load(two_models):
    engine, runtime = engine_with(two_models, preload="first")
    first = ids_of(engine)[0]
    engine.start_lifecycle()
    await until(lambda: runtime.loaded is not None, "the preload")
    assert runtime.events == [("load", first)] and engine.model_status(first) is ModelStatus.LOADED
    assert await answer_text(ExoRing([engine]), first, "hello")
    assert runtime.events == [("load", first)]  # the request found its model on the NPU
    assert engine._scheduler.history[-1].outcome == "done"
    await engine.shutdown()


async def test_without_preload_the_first_request_loads_its_model(two_models):
    engine, runtime = engine_with(two_models)
    engine.start_lifecycle()
    await until(lambda: engine._scheduler is not None, "the runtime")
    await asyncio.sleep(0.05)
    assert runtime.events == []
    first = ids_of(engine)[0]
    assert await answer_text(ExoRing([engine]), first, "hello")
    assert runtime.events == [("load", first)]
    await engine.shutdown()


async def test_preload_ids_load_the_first_that_resolves_and_prepare_the_others(two_models):
    alpha, beta = ids_of(engine_with(two_models)[0])
    engine, runtime = engine_with(two_models, preload=f"no-such-model, {beta}, {alpha}")
    engine.start_lifecycle()
    await until(lambda: alpha in engine._models.ids(), "the preload")
    assert runtime.events == [("load", beta)]  # the unknown id is logged and skipped
    assert set(engine._models.ids()) == {alpha, beta}  # alpha's tokenizer is ready for its first request
    await engine.shutdown()


# -- keep-alive -------------------------------------------------------------------------------------------
async def test_an_idle_model_is_unloaded_after_keep_alive_and_the_next_request_loads_it_again(two_models):
    engine, runtime = engine_with(two_models, keep_alive=0.2)
    ring = ExoRing([engine])
    model = ids_of(engine)[0]
    text = await answer_text(ring, model, "hello")
    await until(lambda: runtime.loaded is None, "the keep-alive unload")
    assert runtime.events == [("load", model), ("unload", model)]
    assert engine.model_status(model) is ModelStatus.AVAILABLE and engine._lifecycle.unloads == 1
    assert engine._scheduler.load_state.status is LoadStatus.UNLOADED
    assert await answer_text(ring, model, "hello") == text
    assert runtime.events[2] == ("load", model)
    await engine.shutdown()


async def test_negative_keep_alive_runs_no_timer(two_models):
    engine, runtime = engine_with(two_models, keep_alive=-1)
    model = ids_of(engine)[0]
    await answer_text(ExoRing([engine]), model, "hello")
    lifecycle = await engine.lifecycle()
    await asyncio.wait_for(asyncio.shield(lifecycle._task), CEILING_S)  # preload done, and no keep-alive loop
    assert runtime.loaded is not None and runtime.events == [("load", model)]
    await engine.shutdown()


async def test_a_request_arriving_while_the_keep_alive_unload_runs_gets_its_whole_answer(two_models):
    engine, runtime = engine_with(two_models, keep_alive=0.05)
    ring = ExoRing([engine])
    model = ids_of(engine)[0]
    text = await answer_text(ring, model, "hello")
    runtime.unload_gate = asyncio.Event()
    await until(lambda: ("unload", model) in runtime.events, "the keep-alive unload to start")
    answer = await_in_background(ring.complete(model, user("hello"), DEMO_LAYERS))
    await asyncio.sleep(0.05)
    runtime.unload_gate.set()  # the unload finishes; the request then loads the model again
    done = await asyncio.wait_for(answer, CEILING_S)
    assert done.finish_reason == "stop" and done.error is None and done.streamed_text == text
    assert runtime.events == [("load", model), ("unload", model), ("load", model)]
    assert not ring.errors
    await engine.shutdown()


def await_in_background(coro: Awaitable[Any]) -> "asyncio.Future[Any]":
    return asyncio.ensure_future(coro)


async def test_the_keep_alive_unload_skips_a_model_a_request_asked_for_meanwhile(two_models):
    paced = SimTiming(load_ms=0, prefill_base_ms=0, prefill_ms_per_token=0, decode_ms_per_token=5)
    engine, runtime = engine_with(two_models, paced, keep_alive=3600)
    ring = ExoRing([engine])
    model = ids_of(engine)[0]
    await answer_text(ring, model, "[[sim:tokens=3]] hello")
    scheduler = engine._scheduler
    idle_since = scheduler.used_at
    await answer_text(ring, model, "[[sim:tokens=3]] again")  # asked for the NPU after the timer's idle mark
    assert not await scheduler.unload(idle_since=idle_since)
    long_run = await_in_background(ring.complete(model, user("[[sim:tokens=2000]] long"), DEMO_LAYERS))
    await until(lambda: scheduler.running_request is not None, "the long run to start")
    running = scheduler.running_request
    assert not await (await engine.lifecycle()).tick(now=time.monotonic() + 10**6)  # busy: not even tried
    unload = await_in_background(scheduler.unload())  # waits for the NPU...
    await asyncio.sleep(0.05)
    follow_up = await_in_background(ring.complete(model, user("[[sim:tokens=3]] next"), DEMO_LAYERS))
    await until(lambda: len(scheduler.streams) == 2, "the follow-up to be queued")
    ring.abandon(running)
    assert await asyncio.wait_for(unload, CEILING_S) is False  # ...and finds a request waiting for the model
    done = await asyncio.wait_for(follow_up, CEILING_S)
    assert done.finish_reason == "stop" and done.streamed_text
    await asyncio.wait_for(long_run, CEILING_S)
    assert ("unload", model) not in runtime.events
    await engine.shutdown()


# -- switching, failures ---------------------------------------------------------------------------------
async def test_switching_models_unloads_the_previous_one_before_loading_the_next(two_models):
    engine, runtime = engine_with(two_models)
    ring = ExoRing([engine])
    alpha, beta = ids_of(engine)
    await answer_text(ring, alpha, "hello")
    await answer_text(ring, beta, "hello")
    assert runtime.events == [("load", alpha), ("unload", alpha), ("load", beta)]
    await engine.shutdown()


async def test_a_load_that_fails_for_a_request_gives_it_a_clear_error_and_shows_in_the_state(two_models):
    engine, runtime = engine_with(two_models, keep_alive=0.05)
    ring = ExoRing([engine])
    model = ids_of(engine)[0]
    await answer_text(ring, model, "hello")
    await until(lambda: runtime.loaded is None, "the keep-alive unload")
    runtime.refuse.add(model)  # the reload for the next request fails
    with pytest.raises(ModelLoadError, match="invalid model magic") as err:
        await ring.chat(model, user("hello again"), DEMO_LAYERS, request_id="refused-reload")
    assert err.value.http_status == 409
    state = engine._scheduler.load_state
    assert state.status is LoadStatus.FAILED and "invalid model magic" in state.error
    assert engine.model_status(model) is ModelStatus.AVAILABLE
    assert not engine._scheduler.busy and not engine._scheduler.streams
    await engine.shutdown()


# -- explicit routes and the visible state ------------------------------------------------------------------
async def routes_client(engine: Any) -> TestClient:
    app = web.Application()
    app.router.add_post("/v1/rkllm/load", lambda request: plugin._load_route(engine, request))
    app.router.add_post("/v1/rkllm/unload", lambda request: plugin._unload_route(engine, request))
    app.router.add_get("/v1/rkllm/status", lambda request: plugin._status(engine))
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_the_load_and_unload_routes(two_models):
    engine, runtime = engine_with(two_models)
    alpha, beta = ids_of(engine)
    client = await routes_client(engine)
    try:
        r = await client.post("/v1/rkllm/load", json={"model": alpha})
        body = await r.json()
        assert r.status == 200 and body["model"] == alpha and body["status"] == "loaded"
        assert body["loaded_model"] == alpha and body["load"]["status"] == "loaded"
        r = await client.post("/v1/rkllm/load", json={"model": beta})
        assert (await r.json())["loaded_model"] == beta
        assert runtime.events == [("load", alpha), ("unload", alpha), ("load", beta)]
        r = await client.post("/v1/rkllm/unload", json={"model": alpha})  # not the loaded one: nothing to do
        assert r.status == 200 and (await r.json())["status"] == "available" and runtime.loaded.model_id == beta
        r = await client.post("/v1/rkllm/unload")
        body = await r.json()
        assert r.status == 200 and body["loaded_model"] is None and body["load"]["status"] == "unloaded"
        assert runtime.events[-1] == ("unload", beta) and runtime.loaded is None
        for path, payload, status, code in [("/v1/rkllm/load", {"model": "no-such-model"}, 404, "model_not_found"),
                                            ("/v1/rkllm/load", {}, 400, "invalid_model"),
                                            ("/v1/rkllm/unload", {"model": 3}, 400, "invalid_model")]:
            r = await client.post(path, json=payload)
            error = (await r.json())["error"]
            assert r.status == status and error["code"] == code, error
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
        r = await client.post("/v1/rkllm/load", data=b"{not json")
        assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"
        runtime.refuse.add(alpha)
        r = await client.post("/v1/rkllm/load", json={"model": alpha})
        error = (await r.json())["error"]
        assert r.status == 409 and "invalid model magic" in error["message"]
    finally:
        await client.close()
        await engine.shutdown()


async def test_load_and_unload_are_refused_while_requests_hold_the_npu(two_models):
    # paced: the run must last through the two refused calls (instant, 2000 tokens took under a second)
    engine, runtime = engine_with(two_models, SimTiming(0, 0, 0, 1.0, 0))
    ring = ExoRing([engine])
    alpha, beta = ids_of(engine)
    client = await routes_client(engine)
    try:
        slow = await_in_background(ring.complete(alpha, user("[[sim:tokens=2000]] long"), DEMO_LAYERS))
        await until(lambda: engine._scheduler is not None and engine._scheduler.running_request, "the run")
        for path, payload in [("/v1/rkllm/load", {"model": beta}), ("/v1/rkllm/unload", {})]:
            r = await client.post(path, json=payload)
            error = (await r.json())["error"]
            assert r.status == 409 and error["code"] == "npu_busy" and "retry" in error["message"]
        r = await client.post("/v1/rkllm/load", json={"model": alpha})  # already there: fine
        assert r.status == 200 and (await r.json())["status"] == "loaded"
        for rid in list(engine._scheduler.streams):
            ring.abandon(rid)
        await asyncio.wait_for(slow, CEILING_S)
        assert runtime.events == [("load", alpha)]
    finally:
        await client.close()
        await engine.shutdown()


async def test_a_slow_load_shows_as_loading_with_its_progress(two_models):
    engine, runtime = engine_with(two_models, SimTiming(load_ms=3000, prefill_base_ms=0, prefill_ms_per_token=0,
                                                        decode_ms_per_token=0))
    alpha = ids_of(engine)[0]
    client = await routes_client(engine)
    try:
        load = await_in_background(client.post("/v1/rkllm/load", json={"model": alpha}))
        scheduler = None

        def loading_with_progress() -> bool:
            state = engine._scheduler.load_state if engine._scheduler else None
            return state is not None and state.progress > 0

        await until(loading_with_progress, "the load to report progress")
        scheduler = engine._scheduler
        assert engine.model_status(alpha) is ModelStatus.LOADING and not ModelStatus.LOADING.ready
        status = await (await client.get("/v1/rkllm/status")).json()
        assert status["load"]["status"] == "loading" and status["load"]["model"] == alpha
        assert 0 < status["load"]["progress"] < 1 and status["load"]["progress_known"] is True
        assert status["loaded_model"] is None
        r = await load
        assert r.status == 200 and (await r.json())["load"]["progress"] == 1.0
        assert engine.model_status(alpha) is ModelStatus.LOADED and ModelStatus.LOADED.ready
        assert scheduler.load_state.status is LoadStatus.LOADED
    finally:
        await client.close()
        await engine.shutdown()


def test_a_runtime_that_reports_only_start_and_end_is_not_claimed_to_know_its_progress():
    from exo_rkllm.scheduler.lifecycle import LoadState

    state = LoadState("m")
    state.report("loading m.rkllm", 0.0)  # what the native backend and rkllama report, then nothing until 1.0
    assert state.as_dict()["progress_known"] is False and state.as_dict()["status"] == "loading"
    state.report("loaded m.rkllm", 1.0)
    state.finish(LoadStatus.LOADED)
    assert state.as_dict()["progress_known"] is True and state.as_dict()["progress"] == 1.0


# -- no state left -----------------------------------------------------------------------------------------------
async def test_no_state_is_left_after_many_mixed_requests(two_models):
    paced = SimTiming(load_ms=0, prefill_base_ms=0, prefill_ms_per_token=0, decode_ms_per_token=1)
    engine, runtime = engine_with(two_models, paced, keep_alive=0)
    ring = ExoRing([engine])
    alpha, beta = ids_of(engine)
    lifecycle = await engine.lifecycle()
    rng = random.Random(10)
    pending: list[asyncio.Future[Any]] = []
    for i in range(200):
        kind = rng.choice(["alpha", "beta", "abandon", "load", "unload"])
        if kind in ("alpha", "beta"):
            model = alpha if kind == "alpha" else beta
            pending.append(await_in_background(ring.complete(model, user(f"[[sim:tokens=3]] q{i}"), DEMO_LAYERS)))
        elif kind == "abandon":
            # paced and long, so it is still running when abandoned (an abort that lands after its run
            # ended would hit the next request's run: a scheduler race, reported, not this test's subject)
            answer = await ring.chat(alpha, user(f"[[sim:tokens=1000]] q{i}"), DEMO_LAYERS)
            ring.abandon(answer.request_id)
        elif kind == "load":
            pending.append(await_in_background(ignore_busy(lifecycle.load(rng.choice([alpha, beta])))))
        else:
            pending.append(await_in_background(ignore_busy(lifecycle.unload(None))))
        if i % 10 == 9:
            await asyncio.wait_for(asyncio.gather(*pending), CEILING_S)
            pending.clear()
    await asyncio.wait_for(asyncio.gather(*pending), CEILING_S)
    await ring.drain()
    await until(lambda: runtime.loaded is None, "the keep-alive unload (RKLLM_KEEP_ALIVE=0)")
    scheduler = engine._scheduler
    assert not scheduler.streams and not scheduler.busy and scheduler.queued == 0
    assert not engine._contexts and plugin.plugin_state_sizes() == {"feeds": 0}
    assert not scheduler.load_state.in_progress and lifecycle._task is not None and not lifecycle._task.done()
    loads = [e for e in runtime.events if e[0] == "load"]
    unloads = [e for e in runtime.events if e[0] == "unload"]
    assert len(loads) == len(unloads)  # every load was given back
    assert all(a[0] != b[0] for a, b in zip(runtime.events, runtime.events[1:]))  # load, unload, load...
    assert not ring.errors
    await engine.shutdown()


async def ignore_busy(coro: Awaitable[Any]) -> Any:
    from exo_rkllm.errors import NPUBusy

    try:
        return await coro
    except NPUBusy:
        return None
