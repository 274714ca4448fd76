"""How a run ended, as the scheduler learns it and records it.

The backend says how its run ended (FinishEvent.kind: STOP, LENGTH or ABORTED) and the scheduler
acts on that rather than guessing from token counts; how a request left the scheduler (Scheduler.ended)
and how its time there ended (RunSummary.outcome) are typed values, not free strings. Driven the way
exo's node drives one node, on the simulator; nothing depends on the machine's speed.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any, AsyncIterator

import numpy as np

from exo_rkllm.config import Config
from exo_rkllm.engine.inference_engine import RKLLMInferenceEngine, RequestEnding
from exo_rkllm.runtime.base import FinishEvent, FinishKind, GenerationInput, RuntimeEvent
from exo_rkllm.runtime.sim import SimRuntime, SimTiming
from exo_rkllm.scheduler.scheduler import ENDED_SIZE, HISTORY_SIZE, EndKind, RequestEnd, RunOutcome, _Plan
from support import DEMO_ID, RecordingRuntime, user
from test_engine_options import SHARD, HANG_S, endings_of, run, templated


class Reports(RecordingRuntime):
    """The simulator's runs, with the FinishKind replaced by `kind`: a backend that knows something
    the token counts do not show (a server that stopped at a limit of its own, say)."""

    def __init__(self, inner: Any, kind: FinishKind) -> None:
        super().__init__(inner)
        self.kind = kind

    async def generate(self, inp: GenerationInput) -> AsyncIterator[RuntimeEvent]:
        async for event in super().generate(inp):
            yield dataclasses.replace(event, kind=self.kind) if isinstance(event, FinishEvent) else event


def engine_with(models_dir: Any, runtime: Any, **config: Any) -> RKLLMInferenceEngine:
    return RKLLMInferenceEngine(config=Config(backend="sim", models_dir=models_dir, **config), runtime=runtime)


async def test_a_length_stop_the_runtime_reports_is_a_length_stop(demo_models_dir):
    """Five tokens, far below every limit the scheduler knows: only the backend can tell it was cut."""
    runtime = Reports(SimRuntime(SimTiming.instant()), FinishKind.LENGTH)
    engine = engine_with(demo_models_dir, runtime)
    endings = endings_of(engine)
    tok = engine.model_for(DEMO_ID).tokenizer
    tokens = await run(engine, "cut", templated(tok, user("short [[sim:tokens=5]]")))
    assert len(tokens) == 6 and endings["cut"] == RequestEnding("length")
    # a length stop leaves the last token sampled but never fed: the simulator's cache says otherwise
    # (it ended on its EOS), so the scheduler must not believe its own arithmetic over the reported length
    assert engine._scheduler.kv_tokens is None
    await engine.shutdown()


async def test_a_stop_the_runtime_reports_at_the_cap_is_the_models_end(demo_models_dir):
    """Seven tokens at a cap of seven: the count alone would say `length`; the runtime says it ended."""
    runtime = Reports(SimRuntime(SimTiming.instant()), FinishKind.STOP)
    engine = engine_with(demo_models_dir, runtime, max_new_tokens=7)
    endings = endings_of(engine)
    tok = engine.model_for(DEMO_ID).tokenizer
    tokens = await run(engine, "whole", templated(tok, user("long [[sim:tokens=50]]")))
    assert len(tokens) == 8 and "whole" not in endings  # ended by the model: nothing to correct
    await engine.shutdown()


async def test_the_runtimes_own_length_stop_keeps_the_cache_exact(demo_models_dir):
    runtime = RecordingRuntime(SimRuntime(SimTiming.instant()))
    engine = engine_with(demo_models_dir, runtime, max_new_tokens=7)
    endings = endings_of(engine)
    tok = engine.model_for(DEMO_ID).tokenizer
    await run(engine, "capped", templated(tok, user("long [[sim:tokens=50]]")))
    assert runtime.finishes["capped"].kind is FinishKind.LENGTH and endings["capped"] == RequestEnding("length")
    kv = engine._scheduler.kv_tokens
    assert kv is not None and kv == runtime.inner.kv_tokens  # prompt + all but the last token
    await engine.shutdown()


async def test_a_cancellation_is_never_taken_for_a_whole_answer(demo_models_dir):
    """Whatever words its reason uses: a request cut short by a cancel is not an answer."""
    runtime = RecordingRuntime(SimRuntime(SimTiming(0, 0, 0, decode_ms_per_token=5)))
    engine = engine_with(demo_models_dir, runtime)
    endings = endings_of(engine)
    tok = engine.model_for(DEMO_ID).tokenizer
    out, _ = await engine.infer_prompt("rid", SHARD, templated(tok, user("long [[sim:tokens=300]]")))
    engine.cancel_request("rid", "answer complete")  # a reason that reads like a whole answer
    end = engine._scheduler.ended["rid"]
    assert end == RequestEnd(EndKind.CANCELLED, "answer complete") and not end.whole
    out, _ = await asyncio.wait_for(engine.infer_tensor("rid", SHARD, np.asarray(out).reshape(1, -1)), HANG_S)
    assert int(np.asarray(out).reshape(-1)[-1]) == tok.eos_token_id  # exo's loop ends...
    assert endings["rid"].finish_reason == "error"  # ...and the client is told it was cut short
    assert "answer complete" in str(endings["rid"].error)
    await engine.shutdown()


async def test_outcomes_are_typed_and_keep_their_json_shape(demo_models_dir):
    runtime = RecordingRuntime(SimRuntime(SimTiming(0, 0, 0, decode_ms_per_token=5)))
    engine = engine_with(demo_models_dir, runtime)
    tok = engine.model_for(DEMO_ID).tokenizer
    await run(engine, "done", templated(tok, user("short [[sim:tokens=3]]")))
    await engine.infer_prompt("gone", SHARD, templated(tok, user("long [[sim:tokens=300]]")))
    engine.cancel_request("gone", "client gone")
    scheduler = engine._scheduler
    for _ in range(200):
        if len(scheduler.history) == 2:
            break
        await asyncio.sleep(0.01)
    done, gone = scheduler.history
    assert done.outcome is RunOutcome.DONE and done.detail == "" and done.described == "done"
    assert gone.outcome is RunOutcome.CANCELLED and gone.detail == "client gone"
    assert gone.described == "cancelled (client gone)"
    assert scheduler.ended["done"].kind is EndKind.ANSWER_COMPLETE and scheduler.ended["done"].whole
    assert scheduler.ended["gone"].kind is EndKind.CANCELLED
    # GET /v1/rkllm/status serialises the summaries with dataclasses.asdict: plain strings stay plain
    shown = json.loads(json.dumps(dataclasses.asdict(gone)))
    assert shown["outcome"] == "cancelled" and shown["detail"] == "client gone"
    assert scheduler.history.maxlen == HISTORY_SIZE
    await engine.shutdown()


async def test_finished_by_exo_is_whole(demo_models_dir):
    runtime = RecordingRuntime(SimRuntime(SimTiming(0, 0, 0, decode_ms_per_token=5)))
    engine = engine_with(demo_models_dir, runtime)
    tok = engine.model_for(DEMO_ID).tokenizer
    await engine.infer_prompt("exo", SHARD, templated(tok, user("long [[sim:tokens=300]]")))
    engine.finish_request("exo")  # exo's own token limit
    assert engine._scheduler.ended["exo"] == RequestEnd(EndKind.FINISHED_BY_EXO) and engine._scheduler.ended["exo"].whole
    await engine.shutdown()


async def test_the_ended_requests_are_bounded(demo_models_dir):
    runtime = RecordingRuntime(SimRuntime(SimTiming.instant()))
    engine = engine_with(demo_models_dir, runtime)
    scheduler = await engine._get_scheduler()
    spec = engine.model_for(DEMO_ID).spec
    for i in range(ENDED_SIZE + 5):
        scheduler.submit(f"r{i}", spec, (1, 2, 3))
        scheduler.cancel(f"r{i}", RequestEnd.cancelled("test"))
    assert len(scheduler.ended) == ENDED_SIZE and "r0" not in scheduler.ended and f"r{ENDED_SIZE + 4}" in scheduler.ended
    await engine.shutdown()


async def test_each_run_has_a_named_plan(demo_models_dir):
    """A follow-up turn prefills only its new suffix on top of the cache; an unrelated prompt clears it."""
    runtime = RecordingRuntime(SimRuntime(SimTiming.instant()))
    engine = engine_with(demo_models_dir, runtime)
    scheduler = await engine._get_scheduler()
    plans: list[_Plan] = []
    prepare = scheduler._prepare

    async def recorded(job: Any) -> _Plan:  # the plan each run carries out
        plans.append(await prepare(job))
        return plans[-1]
    scheduler._prepare = recorded  # type: ignore[method-assign]
    tok = engine.model_for(DEMO_ID).tokenizer
    first = user("hello [[sim:tokens=4]]")
    answer = await run(engine, "t1", templated(tok, first))
    follow = first + [{"role": "assistant", "content": tok.decode(answer[:-1])}, {"role": "user", "content": "more"}]
    await run(engine, "t2", templated(tok, follow))
    await run(engine, "t3", templated(tok, user("something else entirely [[sim:tokens=2]]")))
    one, two, three = plans
    assert isinstance(one, _Plan) and one.feed == one.prompt and one.keep_history and not one.clear_first
    assert two.keep_history and not two.clear_first and 0 < len(two.feed) < len(two.prompt)
    assert two.prompt[-len(two.feed):] == two.feed
    assert three.clear_first and three.feed == three.prompt
    await engine.shutdown()
