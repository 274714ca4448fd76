"""The simulated runtime behaves like RKLLM: callback states, KV cache, abort, errors, pacing."""
from __future__ import annotations

import asyncio
import time

import pytest

from exo_rkllm.errors import GenerationError, ModelLoadError
from exo_rkllm.runtime.base import CallState, FinishEvent, GenerationInput, TokenEvent
from exo_rkllm.runtime.sim import SIM_MAGIC, SimRuntime, SimTiming


async def run(rt, ids, **kw):
    events = [e async for e in rt.generate(GenerationInput("r", tuple(ids), **kw))]
    return [e for e in events if isinstance(e, TokenEvent)], events[-1]


def prompt_ids(tok, text):
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                              add_generation_prompt=True))


async def test_deterministic_multibyte_answers_with_waiting_state(demo_spec, demo_tokenizer):
    rt = SimRuntime(SimTiming.instant())
    await rt.load(demo_spec)
    ids = prompt_ids(demo_tokenizer, "hello [[sim:text=a 🤖 b 世界]]")
    tokens, finish = await run(rt, ids)
    assert isinstance(finish, FinishEvent) and not finish.aborted
    assert "".join(t.text for t in tokens) == "a 🤖 b 世界"
    assert CallState.WAITING in [t.state for t in tokens]
    again, _ = await run(rt, ids)
    assert [t.token_id for t in again] == [t.token_id for t in tokens]
    other, _ = await run(rt, prompt_ids(demo_tokenizer, "something else"))
    assert [t.token_id for t in other] != [t.token_id for t in tokens]


async def test_kv_cache_holds_exactly_what_was_fed(demo_spec, demo_tokenizer):
    rt = SimRuntime(SimTiming.instant())
    await rt.load(demo_spec)
    ids = prompt_ids(demo_tokenizer, "[[sim:tokens=6]]")
    tokens, _ = await run(rt, ids, keep_history=True)
    assert rt.kv_tokens == tuple(ids) + tuple(t.token_id for t in tokens)  # EOS stop: all fed
    more = demo_tokenizer.encode("<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n")
    before = len(rt.kv_tokens)
    await run(rt, more, keep_history=True)
    assert rt.runs[-1].kv_before == before and rt.runs[-1].prefilled == tuple(more)
    fresh, _ = await run(rt, ids, keep_history=False)  # starts from an empty cache
    assert rt.kv_tokens == tuple(ids) + tuple(t.token_id for t in fresh)
    await rt.clear_kv_cache()
    limited, _ = await run(rt, ids, keep_history=True, max_new_tokens=3)
    assert len(limited) == 3 and len(rt.kv_tokens) == len(ids) + 2  # length stop: last token not fed
    await rt.clear_kv_cache()
    assert rt.kv_tokens == ()


async def test_context_limit_is_an_error(demo_spec, demo_tokenizer):
    rt = SimRuntime(SimTiming.instant())
    await rt.load(demo_spec)
    with pytest.raises(GenerationError, match="exceeds the model's context"):
        await run(rt, [1] * (demo_spec.max_context_len + 1))


async def test_abort_stops_between_tokens(demo_spec, demo_tokenizer):
    rt = SimRuntime(SimTiming(0, 0, 0, decode_ms_per_token=50))
    await rt.load(demo_spec)
    gen = rt.generate(GenerationInput("r", tuple(prompt_ids(demo_tokenizer, "[[sim:tokens=100]]"))))
    first = await gen.__anext__()
    assert isinstance(first, TokenEvent) and rt.is_running()
    t0 = time.monotonic()
    await rt.abort()
    rest = [e async for e in gen]
    assert isinstance(rest[-1], FinishEvent) and rest[-1].aborted
    assert time.monotonic() - t0 < 0.5 and not rt.is_running()


async def test_pacing_follows_the_timing_model(demo_spec, demo_tokenizer):
    rt = SimRuntime(SimTiming(0, prefill_base_ms=30, prefill_ms_per_token=1, decode_ms_per_token=10))
    await rt.load(demo_spec)
    ids = prompt_ids(demo_tokenizer, "[[sim:tokens=10]]")
    _, finish = await run(rt, ids)
    assert finish.stats.prefill_ms >= 30 + len(ids) * 1 - 1
    assert finish.stats.decode_ms >= 9 * 10 - 1  # the first token comes with the prefill


async def test_error_injection_and_recovery(demo_spec, demo_tokenizer):
    rt = SimRuntime(SimTiming.instant(), fail_on=lambda inp, i: inp.request_id == "bad" and i == 2)
    await rt.load(demo_spec)
    ids = prompt_ids(demo_tokenizer, "[[sim:tokens=5]]")
    got = []
    with pytest.raises(GenerationError, match="token 3"):
        async for e in rt.generate(GenerationInput("bad", tuple(ids))):
            got.append(e)
    assert len(got) == 2
    tokens, _ = await run(rt, ids)
    assert len(tokens) == 5


async def test_model_file_validation(tmp_path, demo_spec):
    rt = SimRuntime(SimTiming.instant())
    with pytest.raises(ModelLoadError, match="not found"):
        await rt.load(demo_spec.__class__(**{**demo_spec.__dict__, "path": tmp_path / "missing.rkllm"}))
    empty = tmp_path / "empty.rkllm"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        await rt.load(demo_spec.__class__(**{**demo_spec.__dict__, "path": empty}))
    corrupt = tmp_path / "corrupt.rkllm"
    corrupt.write_bytes(SIM_MAGIC + b"{not json")
    with pytest.raises(ModelLoadError, match="corrupt"):
        await rt.load(demo_spec.__class__(**{**demo_spec.__dict__, "path": corrupt}))
    await rt.load(demo_spec)  # still usable


async def test_one_generation_at_a_time(demo_spec, demo_tokenizer):
    rt = SimRuntime(SimTiming(0, 0, 0, decode_ms_per_token=20))
    await rt.load(demo_spec)
    gen = rt.generate(GenerationInput("a", tuple(prompt_ids(demo_tokenizer, "[[sim:tokens=20]]"))))
    await gen.__anext__()
    with pytest.raises(GenerationError, match="busy"):
        await run(rt, [1, 2, 3])
    await gen.aclose()
    await asyncio.sleep(0)
    assert not rt.is_running()
