"""Priorities and preemption, driven the way exo drives the engine (tests/exo_driver.py), on the simulator.

The simulator is greedy and continues an answer from "prompt + its first k tokens" exactly as from the
prompt alone (the simulator's greedy-determinism guarantee), so a preempted and resumed answer can be compared with an uninterrupted
one byte for byte. No assertion depends on how fast the machine is: the only waits are for events
(a token count reached, an answer finished), bounded by generous ceilings against hangs.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Callable

import pytest

from exo_rkllm.engine.inference_engine import RequestContext
from exo_rkllm.api.priority import classify_request
from exo_rkllm.runtime.sim import SimTiming
from exo_rkllm.scheduler.scheduler import Priority, RequestEnd, RunOutcome
from exo_driver import Answer, ExoRing
from support import DEMO_ID, DEMO_LAYERS, RecordingRuntime, make_engine, user

BG, FG = Priority.BACKGROUND, Priority.INTERACTIVE
PACED = SimTiming(0.0, 0.0, 0.0, decode_ms_per_token=10.0)
HANG_S = 30.0


class PriorityRing(ExoRing):
    """exo's API as the plugin runs it: each request's context carries the priority it was classified as."""

    def __init__(self, engines: list[Any], **kw: Any) -> None:
        super().__init__(engines, **kw)
        self.priorities: dict[str, Priority] = {}

    def _share_messages(self, api_node: int, request_id: str, messages: list[dict[str, Any]]) -> None:
        super()._share_messages(api_node, request_id, messages)
        engine = self.engines[api_node]
        context = engine._contexts[request_id]
        engine.set_request_context(request_id, dataclasses.replace(
            context, priority=self.priorities.get(request_id, FG)))

    async def start(self, rid: str, text: str, priority: Priority) -> "asyncio.Task[Answer]":
        """Send a request without waiting for its first token; returns once the scheduler holds it."""
        self.priorities[rid] = priority
        task = asyncio.create_task(self.chat(DEMO_ID, user(text), DEMO_LAYERS, request_id=rid))
        await until(lambda: self.engines[0]._scheduler is not None and rid in self.engines[0]._scheduler.streams
                    or task.done())
        return task


async def until(condition: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.002)
    await asyncio.wait_for(poll(), HANG_S)


async def finished(ring: ExoRing, *rids: str) -> list[Answer]:
    for rid in rids:
        await until(lambda: rid in ring.answers)
        await asyncio.wait_for(ring.answers[rid].finished.wait(), HANG_S)
    return [ring.answers[rid] for rid in rids]


def service_order(runtime: RecordingRuntime) -> list[str]:
    """Request ids in the order the runtime ran them (a resumed request appears again)."""
    return [inp.request_id for inp in runtime.inputs]


async def alone(demo_models_dir: Any, text: str) -> tuple[str, list[int]]:
    """The uninterrupted answer to `text`, on a fresh engine."""
    engine, runtime = make_engine(demo_models_dir)
    answer = await ExoRing([engine]).complete(DEMO_ID, user(text), DEMO_LAYERS)
    await engine.shutdown()
    return answer.streamed_text, answer.tokens


# -- order of service -------------------------------------------------------------------------------
async def test_interactive_requests_run_before_background_ones_and_arrival_order_among_equals(demo_models_dir):
    engine, runtime = make_engine(demo_models_dir, PACED)
    ring = PriorityRing([engine])
    await ring.start("blocker", "hold the NPU [[sim:tokens=40]]", FG)
    for rid, prio in (("bg1", BG), ("fg1", FG), ("bg2", BG), ("fg2", FG)):
        await ring.start(rid, f"request {rid} [[sim:tokens=5]]", prio)
    await finished(ring, "blocker", "bg1", "fg1", "bg2", "fg2")
    assert service_order(runtime) == ["blocker", "fg1", "fg2", "bg1", "bg2"]
    assert runtime.aborts == 0  # an interactive request never preempts another
    await engine.shutdown()


async def test_an_interactive_request_never_preempts_an_interactive_one(demo_models_dir):
    engine, runtime = make_engine(demo_models_dir, PACED)
    ring = PriorityRing([engine])
    await ring.start("first", "a long answer [[sim:tokens=40]]", FG)
    await until(lambda: len(runtime.tokens["first"]) >= 5)
    await ring.start("second", "another one [[sim:tokens=5]]", FG)
    first, second = await finished(ring, "first", "second")
    assert service_order(runtime) == ["first", "second"]
    assert len(first.tokens) == 41 and engine._scheduler.history[0].preemptions == 0
    await engine.shutdown()


# -- preemption ---------------------------------------------------------------------------------------
async def test_a_preempted_background_answer_equals_the_uninterrupted_one(demo_models_dir):
    text = "Generate a title for this chat [[sim:tokens=48]]"
    expected_text, expected_tokens = await alone(demo_models_dir, text)

    engine, runtime = make_engine(demo_models_dir, PACED)
    ring = PriorityRing([engine])
    await ring.start("bg", text, BG)
    await until(lambda: len(runtime.tokens["bg"]) >= 7)
    await ring.start("fg", "the person's question [[sim:tokens=12]]", FG)
    bg, fg = await finished(ring, "bg", "fg")

    assert service_order(runtime) == ["bg", "fg", "bg"], "the background run must be paused, then resumed"
    assert bg.finished_at > fg.first_chunk_at  # it was still running when the person's request came
    assert bg.streamed_text == expected_text and bg.tokens == expected_tokens
    assert bg.finish_reason == "stop" and bg.error is None
    # exo got each token once: the resumed run went on from where the first one stopped
    assert runtime.tokens["bg"] == expected_tokens[:-1]
    assert len(fg.tokens) == 13 and fg.finish_reason == "stop"
    summary = {s.request_id: s for s in engine._scheduler.history}
    assert [s.request_id for s in engine._scheduler.history] == ["fg", "bg"], "a paused request ends once"
    assert summary["bg"].preemptions == 1 and summary["bg"].generated == 48
    assert summary["bg"].outcome is RunOutcome.DONE
    await engine.shutdown()


def cancel_on_arrival(engine: Any, rid: str) -> None:
    """The client of `rid` goes away the moment its request is queued (its preemption already under
    way): nothing else runs between the pause and the resume."""
    scheduler = engine._scheduler
    submit = scheduler.submit

    def submit_then_cancel(request_id: str, *args: Any, **kw: Any) -> Any:
        stream = submit(request_id, *args, **kw)
        if request_id == rid:
            scheduler.cancel(request_id, RequestEnd.cancelled("client disconnected"))
        return stream
    scheduler.submit = submit_then_cancel


def watch_beliefs(engine: Any, runtime: RecordingRuntime) -> list[tuple[Any, tuple[int, ...]]]:
    """(what the scheduler concluded the cache holds after each aborted run, what it really holds)."""
    scheduler, seen = engine._scheduler, []
    after_abort = scheduler._kv_after_abort

    def recorded(*args: Any) -> Any:
        belief = after_abort(*args)
        seen.append((belief, runtime.inner.kv_tokens))  # the run has ended: the cache is final
        return belief
    scheduler._kv_after_abort = recorded
    return seen


async def test_kv_knowledge_stays_exact_across_preemption(demo_models_dir):
    """The simulator reports its cache length: after each abort the scheduler knows the cache
    exactly (the prompt and every token fed back, not the last one sampled), and it never reuses
    more than that. The interactive prompt does not extend the background one, so its run and the
    resume clear the cache first."""
    engine, runtime = make_engine(demo_models_dir, PACED)
    sim, ring = runtime.inner, PriorityRing([engine])
    await ring.start("bg", "summarise [[sim:tokens=40]]", BG)
    beliefs = watch_beliefs(engine, runtime)
    await until(lambda: len(runtime.tokens["bg"]) >= 6)
    await ring.start("fg", "hello [[sim:tokens=30]]", FG)
    await finished(ring, "bg", "fg")
    first, resume = [r for r in sim.runs if r.request_id == "bg"]
    done = len(first.generated)
    assert len(beliefs) == 1
    belief, truth = beliefs[0]
    assert belief is not None and tuple(belief) == truth
    assert len(truth) == len(first.prefilled) + done - 1  # the last token was sampled, never fed
    assert engine._scheduler.kv_tokens == sim.kv_tokens
    assert resume.kv_before == 0 and len(resume.prefilled) == len(first.prefilled) + done
    await engine.shutdown()


async def test_resume_right_after_the_pause_prefills_one_token(demo_models_dir):
    """Nothing ran between the pause and the resume: the cache still holds prompt + all but the
    last generated token, known exactly, so the resumed run prefills that one token."""
    text = "tags please [[sim:tokens=40]]"
    expected_text, expected_tokens = await alone(demo_models_dir, text)
    engine, runtime = make_engine(demo_models_dir, PACED)
    ring = PriorityRing([engine])
    await ring.start("bg", text, BG)
    await until(lambda: len(runtime.tokens["bg"]) >= 6)
    cancel_on_arrival(engine, "fg")
    await ring.start("fg", "a question abandoned at once [[sim:tokens=30]]", FG)
    (bg,) = await finished(ring, "bg")
    first, resume = [r for r in runtime.inner.runs if r.request_id == "bg"]
    assert service_order(runtime) == ["bg", "bg"]
    assert bg.streamed_text == expected_text and bg.tokens == expected_tokens
    assert resume.keep_history and resume.prefilled == (first.generated[-1],)
    assert resume.kv_before == len(first.prefilled) + len(first.generated) - 1
    await engine.shutdown()


class UnreportedCache(RecordingRuntime):
    """A runtime release that cannot say what its KV cache holds after an abort."""

    def kv_cache_len(self) -> None:
        return None


async def test_without_a_reported_cache_length_the_resume_prefills_everything(demo_models_dir):
    from exo_rkllm.config import Config
    from exo_rkllm.engine.inference_engine import RKLLMInferenceEngine
    from exo_rkllm.runtime.sim import SimRuntime

    text = "follow-ups [[sim:tokens=40]]"
    expected_text, _ = await alone(demo_models_dir, text)
    runtime = UnreportedCache(SimRuntime(PACED))
    engine = RKLLMInferenceEngine(config=Config(backend="sim", models_dir=demo_models_dir), runtime=runtime)
    ring = PriorityRing([engine])
    await ring.start("bg", text, BG)
    await until(lambda: len(runtime.tokens["bg"]) >= 6)
    cancel_on_arrival(engine, "fg")
    await ring.start("fg", "x [[sim:tokens=3]]", FG)
    (bg,) = await finished(ring, "bg")
    first, resume = [r for r in runtime.inner.runs if r.request_id == "bg"]
    assert bg.streamed_text == expected_text
    assert resume.kv_before == 0, "a cache whose content is not known exactly must be cleared"
    assert len(resume.prefilled) == len(first.prefilled) + len(first.generated)
    await engine.shutdown()


# -- starvation ---------------------------------------------------------------------------------------
async def test_a_background_request_past_the_bound_runs_before_later_interactive_ones(demo_models_dir):
    """The blocker runs 40 x 10 ms after the background request arrived, far past a 0.1 s bound (a
    lower bound on time, never an upper one): the background request then ranks by its arrival."""
    engine, runtime = make_engine(demo_models_dir, PACED, background_max_wait=0.1)
    ring = PriorityRing([engine])
    await ring.start("blocker", "hold the NPU [[sim:tokens=40]]", FG)
    await ring.start("bg", "an old background task [[sim:tokens=30]]", BG)
    await ring.start("fg1", "later question [[sim:tokens=3]]", FG)
    await until(lambda: len(runtime.tokens["bg"]) >= 3)
    await ring.start("fg2", "another question [[sim:tokens=3]]", FG)  # must not preempt it now
    await finished(ring, "blocker", "bg", "fg1", "fg2")
    assert service_order(runtime) == ["blocker", "bg", "fg1", "fg2"]
    await engine.shutdown()


async def test_with_a_long_bound_the_same_background_request_waits(demo_models_dir):
    engine, runtime = make_engine(demo_models_dir, PACED, background_max_wait=600.0)
    ring = PriorityRing([engine])
    await ring.start("blocker", "hold the NPU [[sim:tokens=40]]", FG)
    await ring.start("bg", "an old background task [[sim:tokens=30]]", BG)
    await ring.start("fg1", "later question [[sim:tokens=3]]", FG)
    await finished(ring, "blocker", "bg", "fg1")
    assert service_order(runtime) == ["blocker", "fg1", "bg"]
    await engine.shutdown()


# -- cancelling a paused request ----------------------------------------------------------------------
async def test_cancelling_a_paused_request_frees_everything(demo_models_dir, caplog):
    engine, runtime = make_engine(demo_models_dir, PACED)
    ring = PriorityRing([engine])
    await ring.start("bg", "a title [[sim:tokens=40]]", BG)
    await until(lambda: len(runtime.tokens["bg"]) >= 5)
    await ring.start("fg", "the question [[sim:tokens=30]]", FG)
    scheduler = engine._scheduler
    await until(lambda: scheduler.get("bg") is not None and scheduler.get("bg").state.value == "paused")
    with caplog.at_level(logging.INFO, logger="exo_rkllm.scheduler.scheduler"):
        ring.abandon("bg")
        (fg,) = await finished(ring, "fg")
    await ring.drain()
    assert service_order(runtime) == ["bg", "fg"], "a cancelled paused request never runs again"
    assert fg.finish_reason == "stop"
    assert scheduler.streams == {} and scheduler._queue == [] and scheduler.running_request is None
    assert engine.active_requests() == [] and not engine._contexts
    assert scheduler.kv_tokens == runtime.inner.kv_tokens
    bg_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request bg ")]
    assert len(bg_lines) == 1 and "cancelled" in bg_lines[0] and "paused 1x" in bg_lines[0]
    await engine.shutdown()


# -- the log line -------------------------------------------------------------------------------------
async def test_one_info_line_per_finished_request(demo_models_dir, caplog):
    engine, runtime = make_engine(demo_models_dir, PACED)
    ring = PriorityRing([engine])
    with caplog.at_level(logging.INFO, logger="exo_rkllm.scheduler.scheduler"):
        await ring.start("bg", "tags [[sim:tokens=30]]", BG)
        await until(lambda: len(runtime.tokens["bg"]) >= 5)
        await ring.start("fg", "hi [[sim:tokens=10]]", FG)
        await finished(ring, "bg", "fg")
    lines = {rid: [r.getMessage() for r in caplog.records if r.levelno == logging.INFO
                   and r.getMessage().startswith(f"request {rid} ")] for rid in ("bg", "fg")}
    assert len(lines["bg"]) == 1 and len(lines["fg"]) == 1
    bg, fg = lines["bg"][0], lines["fg"][0]
    assert f"model {DEMO_ID}" in fg and "interactive" in fg and "10 generated" in fg and "done" in fg
    assert "queued" in fg and "first token" in fg and "tokens/s" in fg and "prefilled" in fg
    assert "background" in bg and "30 generated" in bg and "paused 1x" in bg
    await engine.shutdown()


# -- classification -----------------------------------------------------------------------------------
TITLE = ("### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat history.\n"
         "### Chat History:\n<chat_history>\nUSER: hi\n</chat_history>")


@pytest.mark.parametrize("data, headers, expected", [
    ({"stream": True, "messages": [{"role": "user", "content": "hi"}]}, {}, FG),
    ({"messages": [{"role": "user", "content": "hi"}]}, {}, BG),  # exo's default: not streamed
    ({"stream": False, "messages": [{"role": "user", "content": "hi"}]}, {}, BG),
    ({"stream": True, "messages": [{"role": "user", "content": TITLE}]}, {}, BG),
    ({"stream": True, "messages": [{"role": "user", "content": [{"type": "text", "text": TITLE}]}]}, {}, BG),
    ({"stream": True, "priority": "background", "messages": [{"role": "user", "content": "hi"}]}, {}, BG),
    ({"stream": False, "priority": "interactive", "messages": [{"role": "user", "content": "hi"}]}, {}, FG),
    ({"stream": True, "messages": [{"role": "user", "content": "hi"}]}, {"X-Priority": "background"}, BG),
    ({"stream": False, "priority": "background", "messages": [{"role": "user", "content": TITLE}]},
     {"X-Priority": "Interactive"}, FG),
    ({"stream": True, "priority": "urgent", "messages": [{"role": "user", "content": "hi"}]}, {}, FG),
])
def test_request_classification(data, headers, expected):
    assert classify_request(data, headers) is expected


def test_a_context_without_a_priority_is_interactive():
    assert RequestContext(()).priority is FG


async def test_a_request_cancelled_before_it_ran_is_logged_once(demo_models_dir, caplog):
    engine, runtime = make_engine(demo_models_dir, PACED)
    ring = PriorityRing([engine])
    await ring.start("blocker", "hold the NPU [[sim:tokens=30]]", FG)
    with caplog.at_level(logging.INFO, logger="exo_rkllm.scheduler.scheduler"):
        await ring.start("waiting", "never runs [[sim:tokens=5]]", BG)
        ring.abandon("waiting")
        await finished(ring, "blocker")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request waiting ")]
    assert len(lines) == 1 and "cancelled (client disconnected)" in lines[0] and "0 generated" in lines[0]
    assert service_order(runtime) == ["blocker"] and engine._scheduler._queue == []
    await engine.shutdown()


async def test_an_interactive_request_arriving_while_the_model_loads_runs_first(demo_models_dir):
    """The background request took the worker first, but the model was still loading (1 s, a lower
    bound) when the interactive one came: once loaded, the interactive request runs first."""
    engine, runtime = make_engine(demo_models_dir, SimTiming(1000.0, 0.0, 0.0, 10.0))
    ring = PriorityRing([engine])
    await ring.start("bg", "a title [[sim:tokens=10]]", BG)
    assert runtime.loaded is None, "the model must still be loading"
    await ring.start("fg", "the question [[sim:tokens=10]]", FG)
    await finished(ring, "bg", "fg")
    assert service_order(runtime) == ["fg", "bg"] and runtime.aborts == 0
    await engine.shutdown()


async def test_a_resumed_answer_keeps_the_token_limit_of_the_whole_answer(demo_models_dir):
    """RKLLM_MAX_NEW_TOKENS caps the whole answer: the resumed run may only make what is left."""
    text = "a long task [[sim:tokens=40]]"
    engine, _ = make_engine(demo_models_dir, max_new_tokens=20)
    expected = await ExoRing([engine]).complete(DEMO_ID, user(text), DEMO_LAYERS)
    await engine.shutdown()
    engine, runtime = make_engine(demo_models_dir, PACED, max_new_tokens=20)
    ring = PriorityRing([engine])
    await ring.start("bg", text, BG)
    await until(lambda: len(runtime.tokens["bg"]) >= 6)
    await ring.start("fg", "hi [[sim:tokens=3]]", FG)
    bg, _ = await finished(ring, "bg", "fg")
    assert service_order(runtime) == ["bg", "fg", "bg"]
    assert expected.finish_reason == "length" and bg.finish_reason == "length"
    assert bg.tokens == expected.tokens and bg.streamed_text == expected.streamed_text
    assert len(runtime.tokens["bg"]) == 20
    await engine.shutdown()
