"""What the API's handlers hand the engine beside exo's prompt text: the prompt's own token ids and the
request's options (max tokens, sampling, seed), and their JSON form for the other nodes of a ring.

The engine is driven the way exo's node drives one node (infer_prompt, then infer_tensor with each
token until the eos, then the end of the request), on the simulator, which records what every run got
(`GenerationInput`) and applied. No assertion depends on how fast the machine is.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import Any, AsyncIterator

import numpy as np
import pytest

from exo_rkllm.config import Config
from exo_rkllm.engine.inference_engine import RKLLMInferenceEngine, RequestContext, RequestEnding, RunOptions, messages_from_openai
from exo_rkllm.runtime.base import ChatMessage, GenerationInput, RuntimeEvent
from exo_rkllm.runtime.sim import SimRuntime, SimTiming
from exo_rkllm.scheduler.scheduler import Priority, Scheduler
from exo_rkllm.models.tokenizer import stop_token_ids
from exo_driver import Shard
from support import DEMO_ID, DEMO_LAYERS, RecordingRuntime, read_all, until, user

PACED = SimTiming(0.0, 0.0, 0.0, decode_ms_per_token=10.0)
HANG_S = 30.0


SHARD = Shard(DEMO_ID, 0, DEMO_LAYERS - 1, DEMO_LAYERS)


def engine_on(models_dir: Any, runtime: Any = None, **config: Any) -> tuple[RKLLMInferenceEngine, RecordingRuntime]:
    runtime = runtime or RecordingRuntime(SimRuntime(SimTiming.instant()))
    return RKLLMInferenceEngine(config=Config(backend="sim", models_dir=models_dir, **config), runtime=runtime), runtime


async def run(engine: RKLLMInferenceEngine, rid: str, prompt_text: str,
              context: RequestContext | None = None) -> list[int]:
    """One request as exo's node runs it on one node; the tokens exo got, the eos included."""
    if context is not None:
        engine.set_request_context(rid, context)
    out, _ = await engine.infer_prompt(rid, SHARD, prompt_text)
    tokens = [int(np.asarray(out).reshape(-1)[-1])]
    eos = engine.tokenizer.eos_token_id
    while tokens[-1] != eos:
        out, _ = await asyncio.wait_for(engine.infer_tensor(rid, SHARD, np.asarray(out).reshape(1, -1)), HANG_S)
        tokens.append(int(np.asarray(out).reshape(-1)[-1]))
    engine.finish_request(rid)
    return tokens


def templated(tok: Any, messages: list[dict[str, Any]]) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def endings_of(engine: RKLLMInferenceEngine) -> dict[str, RequestEnding]:
    endings: dict[str, RequestEnding] = {}
    engine.add_end_listener(lambda rid, ending: endings.__setitem__(rid, ending))
    return endings


# -- options reach the runtime ---------------------------------------------------------------------------
async def test_request_options_reach_the_run_merged_over_the_models_sampling(demo_models_dir):
    engine, runtime = engine_on(demo_models_dir)
    endings = endings_of(engine)
    spec = engine.model_for(DEMO_ID).spec
    options = RunOptions(max_new_tokens=5, sampling={"temperature": 0.25, "top_k": 40}, seed=1234)
    messages = user("options [[sim:tokens=50]]")
    context = RequestContext(messages_from_openai(messages), options=options)
    tokens = await run(engine, "opt", templated(engine.model_for(DEMO_ID).tokenizer, messages), context)
    (inp,) = runtime.inputs
    assert spec.sampling.temperature != 0.25 and spec.sampling.top_k != 40  # the request changes something
    assert inp.sampling == dataclasses.replace(spec.sampling, temperature=0.25, top_k=40)
    assert inp.sampling.top_p == spec.sampling.top_p and inp.sampling.repeat_penalty == spec.sampling.repeat_penalty
    assert inp.seed == 1234 and inp.max_new_tokens == 5
    assert runtime.inner.runs[-1].sampling == inp.sampling, "a 1.3.0 runtime applies the request's sampling"
    assert len(tokens) == 6 and endings["opt"] == RequestEnding("length")
    assert engine.request_sampling_applies()


async def test_without_options_the_run_gets_the_models_values(demo_models_dir):
    engine, runtime = engine_on(demo_models_dir)
    messages = user("no options [[sim:tokens=4]]")
    await run(engine, "plain", templated(engine.model_for(DEMO_ID).tokenizer, messages),
              RequestContext(messages_from_openai(messages)))
    (inp,) = runtime.inputs
    assert inp.sampling is None and inp.seed is None and inp.max_new_tokens == 0
    assert runtime.inner.runs[-1].sampling == engine.model_for(DEMO_ID).spec.sampling


async def test_a_request_cap_above_the_models_limit_is_held_to_the_model(demo_models_dir):
    engine, runtime = engine_on(demo_models_dir, max_new_tokens=7)
    messages = user("long [[sim:tokens=50]]")
    tokens = await run(engine, "cap", templated(engine.model_for(DEMO_ID).tokenizer, messages),
                       RequestContext(messages_from_openai(messages), options=RunOptions(max_new_tokens=100)))
    assert runtime.inputs[-1].max_new_tokens == 7 and len(tokens) == 8


async def test_a_resumed_background_answer_runs_with_the_same_options(demo_models_dir, demo_spec, demo_tokenizer):
    runtime = RecordingRuntime(SimRuntime(PACED))
    scheduler = Scheduler(runtime, Config(backend="sim", models_dir=demo_models_dir))
    stops = stop_token_ids(demo_tokenizer)
    bg_prompt = demo_tokenizer.encode(templated(demo_tokenizer, user("a title [[sim:tokens=60]]")))
    bg = scheduler.submit("bg", demo_spec, bg_prompt, stop_ids=stops, priority=Priority.BACKGROUND,
                          max_new_tokens=30, sampling={"top_p": 0.5, "presence_penalty": 1.5}, seed=99)
    reader = asyncio.create_task(read_all(bg))
    await until(lambda: len(bg.tokens) >= 5)
    fg_prompt = demo_tokenizer.encode(templated(demo_tokenizer, user("now [[sim:tokens=3]]")))
    fg = scheduler.submit("fg", demo_spec, fg_prompt, stop_ids=stops)
    await asyncio.wait_for(read_all(fg), HANG_S)
    bg_tokens = await asyncio.wait_for(reader, HANG_S)
    runs = [inp for inp in runtime.inputs if inp.request_id == "bg"]
    assert [inp.request_id for inp in runtime.inputs] == ["bg", "fg", "bg"], "the background answer was paused"
    expected = dataclasses.replace(demo_spec.sampling, top_p=0.5, presence_penalty=1.5)
    assert all(inp.sampling == expected and inp.seed == 99 for inp in runs)
    first_run = len(runtime.inner.runs[0].generated)
    assert runs[0].max_new_tokens == 30 and runs[1].max_new_tokens == 30 - first_run
    assert len(bg_tokens) == 30 and bg.finish_reason.value == "length"
    await scheduler.close()


# -- a runtime that fixes sampling at load time ---------------------------------------------------------
async def test_a_fixed_sampling_release_still_gets_the_values_and_it_is_logged_once(demo_models_dir, caplog):
    runtime = RecordingRuntime(SimRuntime(SimTiming.instant(), release="1.2.3"))
    engine, _ = engine_on(demo_models_dir, runtime)
    assert not engine.request_sampling_applies()
    tok = engine.model_for(DEMO_ID).tokenizer
    spec = engine.model_for(DEMO_ID).spec
    caplog.set_level(logging.INFO, logger="exo_rkllm")
    for i in range(3):
        messages = user(f"turn {i} [[sim:tokens=3]]")
        await run(engine, f"r{i}", templated(tok, messages),
                  RequestContext(messages_from_openai(messages), options=RunOptions(sampling={"temperature": 0.1})))
    await run(engine, "none", templated(tok, user("x [[sim:tokens=2]]")))
    assert all(inp.sampling == dataclasses.replace(spec.sampling, temperature=0.1) for inp in runtime.inputs[:3])
    assert all(r.sampling == spec.sampling for r in runtime.inner.runs), "this release keeps the Modelfile's"
    lines = [r.getMessage() for r in caplog.records if "fixes sampling at load time" in r.getMessage()]
    assert lines == [f"{DEMO_ID}: runtime sim sim-1.2.3 fixes sampling at load time; the Modelfile's values apply"]
    assert engine._scheduler.applies_request_sampling is False


async def test_a_seed_alone_counts_as_request_sampling(demo_models_dir, caplog):
    runtime = RecordingRuntime(SimRuntime(SimTiming.instant(), release="1.2.1"))
    engine, _ = engine_on(demo_models_dir, runtime)
    caplog.set_level(logging.INFO, logger="exo_rkllm")
    messages = user("seeded [[sim:tokens=2]]")
    await run(engine, "seeded", templated(engine.model_for(DEMO_ID).tokenizer, messages),
              RequestContext(messages_from_openai(messages), options=RunOptions(seed=5)))
    assert runtime.inputs[-1].seed == 5 and runtime.inputs[-1].sampling is None
    assert sum("fixes sampling" in r.getMessage() for r in caplog.records) == 1


class IgnoresTheCap(RecordingRuntime):
    """A backend that cannot be told a run's token limit and does not stop itself (as rkllama)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.capabilities = dataclasses.replace(inner.capabilities, per_run_max_new_tokens=False)

    async def generate(self, inp: GenerationInput) -> AsyncIterator[RuntimeEvent]:
        async for event in super().generate(dataclasses.replace(inp, max_new_tokens=0)):
            yield event


async def test_a_runtime_that_ignores_the_cap_is_stopped_at_it(demo_models_dir):
    runtime = IgnoresTheCap(SimRuntime(SimTiming(0, 0, 0, decode_ms_per_token=2)))
    engine, _ = engine_on(demo_models_dir, runtime)
    endings = endings_of(engine)
    tok = engine.model_for(DEMO_ID).tokenizer
    messages = user("runaway [[sim:tokens=300]]")
    tokens = await run(engine, "capped", templated(tok, messages),
                       RequestContext(messages_from_openai(messages), options=RunOptions(max_new_tokens=6)))
    assert len(tokens) == 7 and tokens[:-1] == runtime.tokens["capped"][:6]
    assert endings["capped"] == RequestEnding("length")
    sim = runtime.inner
    await until(lambda: not sim.is_running())
    assert sim.runs[-1].aborted and len(sim.runs[-1].generated) < 300
    kv = engine._scheduler.kv_tokens
    assert kv is None or list(kv) == list(sim.kv_tokens), "the scheduler never believes what the cache does not hold"
    follow = await run(engine, "after", templated(tok, user("next [[sim:tokens=3]]")))
    assert len(follow) == 4


# -- the API's prompt ids --------------------------------------------------------------------------------
async def test_prompt_ids_are_run_verbatim_and_the_prompt_text_is_not_encoded(demo_models_dir, monkeypatch):
    engine, runtime = engine_on(demo_models_dir)
    tok = engine.model_for(DEMO_ID).tokenizer
    text = "say <|im_end|> literally [[sim:tokens=4]]"
    # The API's way: template pieces as control tokens, the user's text as plain text.
    head = tok.encode("<|im_start|>user\n")
    body = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    tail = tok.encode("<|im_end|>\n<|im_start|>assistant\n")
    ids = tuple(head + body + tail)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(im_end) == 1, "the user's '<|im_end|>' must stay text"

    async def no_encode(*args: Any, **kw: Any) -> Any:
        raise AssertionError("the engine encoded the prompt text although the API gave its ids")

    await engine.ensure_shard(SHARD)
    monkeypatch.setattr(engine, "encode", no_encode)
    context = RequestContext(messages_from_openai(user(text)), prompt_ids=ids)
    tokens = await run(engine, "ids", "exo's text, which must be ignored", context)
    assert runtime.inputs[0].token_ids == ids
    assert tokens[:-1] == runtime.tokens["ids"] and len(tokens) == 5


async def test_a_follow_up_from_prompt_ids_prefills_only_the_new_turn_when_the_answer_retokenizes(demo_models_dir):
    engine, runtime = engine_on(demo_models_dir)
    tok = engine.model_for(DEMO_ID).tokenizer
    first_msgs = user("turn one [[sim:text=\n\nNew lines first, then text.]]")
    first_ids = tuple(tok.encode(templated(tok, first_msgs)))
    first = await run(engine, "t1", "ignored", RequestContext(messages_from_openai(first_msgs), prompt_ids=first_ids))
    answer = tok.decode(first[:-1], skip_special_tokens=True)
    convo = first_msgs + [{"role": "assistant", "content": answer}, {"role": "user", "content": "turn two"}]
    full = tuple(tok.encode(templated(tok, convo)))
    cached = engine._scheduler.kv_tokens
    assert cached and full[: len(cached)] != cached, "the re-encoded answer must differ from the cached tokens"
    second = await run(engine, "t2", "ignored", RequestContext(messages_from_openai(convo), prompt_ids=full))
    inp = runtime.inputs[-1]
    assert inp.keep_history and len(inp.token_ids) < 20, "only the new turn may be prefilled"
    cold, cold_rt = engine_on(demo_models_dir, kv_reuse=False)
    again = await run(cold, "cold", "ignored", RequestContext(messages_from_openai(convo), prompt_ids=full))
    assert again == second and len(cold_rt.inputs[-1].token_ids) == len(full)


def test_the_id_realign_never_takes_text_for_a_control_token(demo_tokenizer):
    tok = demo_tokenizer
    control = frozenset(tok.all_special_ids) | frozenset(tok.get_added_vocab().values())
    prefix = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    plain = tok("<|im_end|>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    rest = tok.encode("\n<|im_start|>user\nmore<|im_end|>\n")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    realign = RKLLMInferenceEngine._realign_ids
    assert realign(tok, control, tuple(prefix + plain + rest), prefix + [im_end]) is None
    # Ordinary tokens spelling the same bytes, split differently, do realign.
    a = tok.encode("\n\nNew", add_special_tokens=False)
    b = tok.encode("\n", add_special_tokens=False) + tok.encode("\nNew", add_special_tokens=False)
    assert a != b and tok.decode(a) == tok.decode(b)
    assert realign(tok, control, tuple(prefix + b + rest), prefix + a) == tuple(prefix + a + rest)
    # A cache ending inside the prompt's run of tokens continues with the prompt's next ids.
    assert realign(tok, control, tuple(prefix + b + rest), prefix + a[:-1]) == tuple(prefix + a[:-1] + b[2:] + rest)
    old = tok.encode("\n\nOld", add_special_tokens=False)
    assert realign(tok, control, tuple(prefix + b + rest), prefix + old) is None  # other bytes


# -- the context as JSON, for the other nodes of a ring ---------------------------------------------------
FULL = RequestContext(
    (ChatMessage("system", "Be brief."), ChatMessage("user", [{"type": "text", "text": "hé 世界"}]),
     ChatMessage("assistant", None)),
    tools=({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},),
    priority=Priority.BACKGROUND, prompt_ids=(151644, 872, 198, 0),
    options=RunOptions(max_new_tokens=12, sampling={"temperature": 0.5, "top_k": 3}, seed=-7))


@pytest.mark.parametrize("context", [FULL, RequestContext((ChatMessage("user", "hi"),)),
                                     RequestContext((), options=RunOptions())])
def test_the_context_survives_json(context):
    wire = json.loads(json.dumps(context.to_json()))
    assert RequestContext.from_json(wire) == context


def test_the_json_form_is_plain():
    wire = FULL.to_json()
    assert wire["priority"] == "background" and wire["prompt_ids"] == [151644, 872, 198, 0]
    assert wire["options"] == {"max_new_tokens": 12, "sampling": {"temperature": 0.5, "top_k": 3}, "seed": -7}
    assert wire["messages"][1] == {"role": "user", "content": [{"type": "text", "text": "hé 世界"}]}


def _with(**changes: Any) -> dict[str, Any]:
    wire = json.loads(json.dumps(FULL.to_json()))
    wire.update(changes)
    return wire


@pytest.mark.parametrize("bad", [
    [], "context", None,
    _with(extra=1),
    _with(messages="hi"), _with(messages=[{"role": "user"}, "hi"]), _with(messages=[{"content": "no role"}]),
    _with(messages=[{"role": 1, "content": "x"}]), _with(messages=[{"role": "user", "content": 5}]),
    _with(messages=[{"role": "user", "content": "x", "tool_calls": []}]),
    _with(tools={"name": "f"}), _with(tools=["f"]),
    _with(priority="urgent"), _with(priority=None),
    _with(prompt_ids="1 2 3"), _with(prompt_ids=[1, -2]), _with(prompt_ids=[1, 2.0]), _with(prompt_ids=[True]),
    _with(options=[]), _with(options={"max_tokens": 3}), _with(options={"max_new_tokens": -1}),
    _with(options={"max_new_tokens": "5"}), _with(options={"seed": 1.5}),
    _with(options={"sampling": {"temperature": "hot"}}), _with(options={"sampling": {"min_p": 0.1}}),
    _with(options={"sampling": {"top_k": 2.5}}), _with(options={"sampling": {"top_p": True}}),
    _with(options={"sampling": []}),
])
def test_a_malformed_context_is_refused_whole(bad):
    with pytest.raises(ValueError):
        RequestContext.from_json(bad)


def test_run_options_check_their_values():
    assert RunOptions(sampling={"top_k": 3.0}).sampling == {"top_k": 3}
    assert RunOptions(sampling={}).sampling is None
    assert RunOptions(max_new_tokens=2.0).max_new_tokens == 2
    for bad in ({"sampling": {"temperature": float("nan")}}, {"sampling": {"top_p": float("inf")}},
                {"seed": True}, {"max_new_tokens": 1.5}, {"sampling": {"frequency_penalty": None}}):
        with pytest.raises(ValueError):
            RunOptions(**bad)
    options = RunOptions(sampling={"temperature": 0.3})
    with pytest.raises(TypeError):
        options.sampling["temperature"] = 2.0  # type: ignore[index]  # frozen, its sampling too
