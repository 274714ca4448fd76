"""The engine driven the way exo's node drives it (tests/exo_driver.py), on the simulated runtime."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from exo_rkllm.errors import ContextOverflow, GenerationError, ModelNotFound, QueueFull
from exo_rkllm.runtime.base import CallState
from exo_rkllm.runtime.sim import SimTiming
from exo_driver import ExoRing, Shard
from support import DEMO_ID, DEMO_LAYERS, make_engine, user

MULTIBYTE = "Hé 世界 🤖👩‍💻 ¿qué? 日本語  \t café 🇫🇷"


async def test_streamed_and_full_text_equal_runtime_text(demo_models_dir):
    engine, runtime = make_engine(demo_models_dir)
    ring = ExoRing([engine])
    answer = await ring.complete(DEMO_ID, user("Tell me something [[sim:text=" + MULTIBYTE + "]]"), DEMO_LAYERS)
    rid = answer.request_id
    assert runtime.texts[rid] == MULTIBYTE
    assert answer.streamed_text == MULTIBYTE
    tok = engine.model_for(DEMO_ID).tokenizer
    assert tok.decode(answer.tokens, skip_special_tokens=True) == MULTIBYTE
    assert answer.finish_reason == "stop" and answer.tokens[-1] == tok.eos_token_id
    assert answer.tokens[:-1] == runtime.tokens[rid], "exo must get the runtime's own token ids"
    assert CallState.WAITING in runtime.states[rid], "the text must split a character across tokens"
    assert "\ufffd" not in "".join(answer.chunks)
    assert "<|im_end|>" not in answer.streamed_text


async def test_generated_answers_with_multibyte_text_are_exact(demo_models_dir):
    engine, runtime = make_engine(demo_models_dir)
    ring = ExoRing([engine])
    for i in range(6):
        answer = await ring.complete(DEMO_ID, user(f"question {i}"), DEMO_LAYERS)
        expected = runtime.texts[answer.request_id]
        assert answer.streamed_text == expected
        assert any(ord(c) > 0x2E80 for c in expected) or i < 5  # the sim writes CJK / emoji


async def test_first_token_reaches_exo_before_the_generation_ends(demo_models_dir):
    engine, runtime = make_engine(demo_models_dir, SimTiming(0, 0, 0, decode_ms_per_token=20))
    ring = ExoRing([engine])
    answer = await ring.chat(DEMO_ID, user("stream me [[sim:tokens=30]]"), DEMO_LAYERS)
    # chat() returns once infer_prompt produced the first token: 29 decode steps (~0.6 s) remain.
    assert answer.tokens and not answer.finished.is_set()
    assert answer.request_id not in runtime.finishes
    await answer.finished.wait()
    assert len(answer.tokens) == 31  # 30 + eos


@pytest.mark.parametrize("n_nodes", [2, 3])
async def test_ring_gives_the_same_text_as_one_node(demo_models_dir, n_nodes):
    single, _ = make_engine(demo_models_dir)
    one = await ExoRing([single]).complete(DEMO_ID, user("ring test"), DEMO_LAYERS)
    engines = [make_engine(demo_models_dir)[0] for _ in range(n_nodes)]
    runtimes = [e._runtime for e in engines]
    ring = ExoRing(engines)
    for api_node in range(n_nodes):
        answer = await ring.complete(DEMO_ID, user("ring test"), DEMO_LAYERS, api_node=api_node)
        assert answer.streamed_text == one.streamed_text
        assert answer.tokens == one.tokens and answer.finish_reason == "stop"
    assert not ring.errors
    # exo's own request flow (process_prompt on the API node): that node runs the whole model
    assert [len(r.inputs) for r in runtimes] == [1] * n_nodes


async def test_sample_passes_the_runtime_token_through(demo_models_dir):
    engine, _ = make_engine(demo_models_dir)
    out = await engine.sample(np.array([[1234]]), temp=0.7)
    assert out.item() == 1234 and out.reshape(1, -1).shape == (1, 1)


async def test_max_generate_tokens_ends_cleanly_and_aborts_the_runtime(demo_models_dir):
    engine, runtime = make_engine(demo_models_dir, SimTiming(0, 0, 0, decode_ms_per_token=10))
    ring = ExoRing([engine], max_generate_tokens=5)
    answer = await ring.complete(DEMO_ID, user("long one [[sim:tokens=200]]"), DEMO_LAYERS)
    assert answer.finish_reason == "length" and len(answer.tokens) == 5
    sim = runtime.inner
    for _ in range(100):
        if not sim.is_running():
            break
        await asyncio.sleep(0.01)
    assert not sim.is_running()
    assert sim.runs[-1].aborted and len(sim.runs[-1].generated) < 200
    assert engine.active_requests() == []


async def test_concurrent_requests_each_get_their_own_text_in_order(demo_models_dir):
    engine, runtime = make_engine(demo_models_dir, SimTiming(0, 0, 0, decode_ms_per_token=2))
    ring = ExoRing([engine])
    prompts = [f"concurrent {i}" for i in range(8)]
    answers = await asyncio.gather(*(ring.complete(DEMO_ID, user(p), DEMO_LAYERS) for p in prompts))
    texts = [runtime.texts[a.request_id] for a in answers]
    assert len(set(texts)) == 8
    for a in answers:
        assert a.streamed_text == runtime.texts[a.request_id]
        assert a.tokens[:-1] == runtime.tokens[a.request_id]
    # One generation at a time, in arrival order.
    runs = runtime.inner.runs
    assert [r.request_id for r in runs] == [a.request_id for a in answers]
    for earlier, later in zip(runs, runs[1:]):
        assert earlier.finished <= later.started
    # Each alone gives the same answer: no token crossed over.
    solo, solo_rt = make_engine(demo_models_dir)
    for p, a in zip(prompts, answers):
        alone = await ExoRing([solo]).complete(DEMO_ID, user(p), DEMO_LAYERS)
        assert alone.streamed_text == a.streamed_text


async def test_abandoned_request_frees_the_npu_for_the_next_one(demo_models_dir):
    engine, runtime = make_engine(demo_models_dir, SimTiming(0, 0, 0, decode_ms_per_token=50))
    ring = ExoRing([engine])
    first = await ring.chat(DEMO_ID, user("to abandon [[sim:tokens=400]]"), DEMO_LAYERS)
    second_task = asyncio.create_task(ring.complete(DEMO_ID, user("next [[sim:tokens=3]]"), DEMO_LAYERS))
    await asyncio.sleep(0.2)
    abandoned_at = time.monotonic()
    ring.abandon(first.request_id)
    second = await asyncio.wait_for(second_task, 5)
    sim_runs = runtime.inner.runs
    assert sim_runs[0].aborted
    assert sim_runs[1].started - abandoned_at < 1.0
    assert second.finish_reason == "stop" and len(second.tokens) == 4
    await ring.drain()
    assert engine.active_requests() == []


async def test_no_per_request_state_after_200_requests(demo_models_dir):
    engine, runtime = make_engine(demo_models_dir)
    ring = ExoRing([engine], max_generate_tokens=4)
    for i in range(200):
        if i % 2:
            await ring.complete(DEMO_ID, user(f"req {i} [[sim:tokens=3]]"), DEMO_LAYERS)
        else:
            await ring.complete(DEMO_ID, user(f"req {i}"), DEMO_LAYERS)  # ends on max tokens
    await ring.drain()
    assert engine.active_requests() == []
    assert engine._contexts == {}
    assert engine._scheduler.streams == {}
    assert engine._scheduler.queued == 0 and engine._scheduler.running_request is None
    from exo_rkllm.scheduler.scheduler import ENDED_SIZE, HISTORY_SIZE

    assert len(engine._scheduler.ended) <= ENDED_SIZE and len(engine._scheduler.history) <= HISTORY_SIZE


async def test_error_mid_answer_ends_the_request_and_reports_it(demo_models_dir):
    engine, runtime = make_engine(demo_models_dir)
    failures = []
    engine.add_end_listener(lambda rid, ending: failures.append((rid, ending.error)))
    ring = ExoRing([engine])
    answer = await ring.complete(DEMO_ID, user("fail please [[sim:error_at=5]]"), DEMO_LAYERS)
    assert len(answer.tokens) == 5 and answer.tokens[-1] == engine.tokenizer.eos_token_id
    assert failures and failures[0][0] == answer.request_id
    assert isinstance(failures[0][1], GenerationError) and "token 5" in str(failures[0][1])
    ok = await ring.complete(DEMO_ID, user("and now fine [[sim:tokens=4]]"), DEMO_LAYERS)
    assert ok.finish_reason == "stop" and len(ok.tokens) == 5


async def test_error_on_first_token_raises_to_exo(demo_models_dir):
    engine, _ = make_engine(demo_models_dir)
    ring = ExoRing([engine])
    with pytest.raises(GenerationError, match="token 1"):
        await ring.chat(DEMO_ID, user("[[sim:error_at=1]]"), DEMO_LAYERS)
    ok = await ring.complete(DEMO_ID, user("next [[sim:tokens=2]]"), DEMO_LAYERS)
    assert ok.finish_reason == "stop"


async def test_unknown_model_is_a_clear_error(demo_models_dir):
    engine, _ = make_engine(demo_models_dir)
    with pytest.raises(ModelNotFound, match="unknown model 'nope'.*qwen2.5-1.5b-instruct-demo"):
        await engine.ensure_shard(Shard("nope", 0, 27, 28))


async def test_prompt_longer_than_context_is_refused_before_the_npu(demo_models_dir):
    engine, runtime = make_engine(demo_models_dir, max_context=64)
    ring = ExoRing([engine])
    with pytest.raises(ContextOverflow, match="context of 64 tokens"):
        await ring.chat(DEMO_ID, user("word " * 100), DEMO_LAYERS)
    assert not runtime.inputs
    ok = await ring.complete(DEMO_ID, user("hi [[sim:tokens=2]]"), DEMO_LAYERS)
    assert ok.finish_reason == "stop"


async def test_full_queue_is_refused_with_a_clear_error(demo_models_dir):
    engine, runtime = make_engine(demo_models_dir, SimTiming(0, 0, 0, decode_ms_per_token=20), max_queue=2)
    ring = ExoRing([engine])
    running = await ring.chat(DEMO_ID, user("busy [[sim:tokens=50]]"), DEMO_LAYERS)
    waiting = [asyncio.create_task(ring.chat(DEMO_ID, user(f"wait {i} [[sim:tokens=2]]"), DEMO_LAYERS))
               for i in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(QueueFull, match="RKLLM_MAX_QUEUE=2"):
        await ring.chat(DEMO_ID, user("one too many"), DEMO_LAYERS)
    await running.finished.wait()
    for t in waiting:
        (await t)
    await asyncio.gather(*(ring.answers[a].finished.wait() for a in list(ring.answers) if a in ring.answers
                           and ring.answers[a].tokens))


async def test_follow_up_turn_prefills_only_the_new_suffix(demo_models_dir):
    engine, runtime = make_engine(demo_models_dir)
    ring = ExoRing([engine])
    first = await ring.complete(DEMO_ID, user("first turn"), DEMO_LAYERS)
    convo = user("first turn") + [{"role": "assistant", "content": first.streamed_text},
                                  {"role": "user", "content": "second turn"}]
    second = await ring.complete(DEMO_ID, convo, DEMO_LAYERS)
    tok = engine.model_for(DEMO_ID).tokenizer
    full = tok.encode(tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True))
    inp = runtime.inputs[-1]
    assert inp.keep_history and 0 < len(inp.token_ids) < len(full) // 2
    assert list(runtime.inner.kv_tokens[: len(full)]) == full
    # Reusing the cache changes nothing in the answer: a cold run gives the same text.
    cold, _ = make_engine(demo_models_dir, kv_reuse=False)
    again = await ExoRing([cold]).complete(DEMO_ID, convo, DEMO_LAYERS)
    assert again.streamed_text == second.streamed_text
    assert len(cold._runtime.inputs[-1].token_ids) == len(full)


async def test_unrelated_prompt_clears_the_cache(demo_models_dir):
    engine, runtime = make_engine(demo_models_dir)
    ring = ExoRing([engine])
    await ring.complete(DEMO_ID, user("alpha"), DEMO_LAYERS)
    await ring.complete(DEMO_ID, user("beta, unrelated"), DEMO_LAYERS)
    sim = runtime.inner
    assert sim.runs[-1].kv_before == 0 and len(runtime.inputs[-1].token_ids) > 5


async def test_unread_generation_is_aborted_after_the_idle_timeout(demo_models_dir):
    engine, runtime = make_engine(demo_models_dir, SimTiming(0, 0, 0, decode_ms_per_token=20), idle_timeout=0.3)
    ring = ExoRing([engine], on_token_hook=None)
    answer = await ring.chat(DEMO_ID, user("nobody reads me [[sim:tokens=500]]"), DEMO_LAYERS)
    ring.lost.add(answer.request_id)  # exo "loses" the request: nobody calls infer_tensor again
    await asyncio.sleep(1.2)
    assert runtime.inner.runs[-1].aborted
    assert engine.active_requests() == []
    assert answer.request_id in engine._scheduler.ended
    ring.abandon(answer.request_id, "the API timed out")  # what exo's handler then does: nothing is kept


async def test_follow_up_turn_reuses_the_cache_when_the_answer_retokenizes_differently(demo_models_dir):
    engine, runtime = make_engine(demo_models_dir)
    ring = ExoRing([engine])
    first = await ring.complete(DEMO_ID, user("turn one [[sim:text=\n\nNew lines first, then text.]]"), DEMO_LAYERS)
    convo = user("turn one [[sim:text=\n\nNew lines first, then text.]]") + [
        {"role": "assistant", "content": first.streamed_text}, {"role": "user", "content": "turn two"}]
    tok = engine.model_for(DEMO_ID).tokenizer
    full = tok.encode(tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True))
    cached = runtime.inner.kv_tokens
    assert list(full[: len(cached)]) != list(cached), "the retokenized history must differ from the cache"
    second = await ring.complete(DEMO_ID, convo, DEMO_LAYERS)
    inp = runtime.inputs[-1]
    assert inp.keep_history and len(inp.token_ids) < 20, "only the new turn may be prefilled"
    cold, _ = make_engine(demo_models_dir, kv_reuse=False)
    again = await ExoRing([cold]).complete(DEMO_ID, convo, DEMO_LAYERS)
    assert again.streamed_text == second.streamed_text


@pytest.mark.parametrize("n_nodes,api_node", [(1, 0), (2, 1), (3, 2)])
async def test_messages_backend_gets_the_original_messages_from_any_api_node(demo_models_dir, demo_tokenizer,
                                                                             n_nodes, api_node):
    from exo_rkllm.runtime.sim import SimRuntime
    from support import MessagesRuntime
    from exo_rkllm.config import Config
    from exo_rkllm.engine.inference_engine import RKLLMInferenceEngine

    cfg = Config(backend="sim", models_dir=demo_models_dir)
    runtime = MessagesRuntime(SimRuntime(SimTiming.instant()), demo_tokenizer)
    engines = [make_engine(demo_models_dir)[0] for _ in range(n_nodes)]
    engines[api_node] = RKLLMInferenceEngine(config=cfg, runtime=runtime)  # exo's own flow runs it there
    ring = ExoRing(engines)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "[[sim:text=Só 一次 ✅]]"}]
    answer = await ring.complete(DEMO_ID, messages, DEMO_LAYERS, api_node=api_node)
    assert answer.streamed_text == "Só 一次 ✅"
    got = runtime.received[answer.request_id]
    assert [(m.role, m.content) for m in got] == [(m["role"], m["content"]) for m in messages]
    await ring.drain()
    assert all(e._contexts == {} for e in engines), "no node may keep the messages after the request"


# -- an answer cut short never looks finished ----------------------------------------------------------
async def test_full_context_ends_with_length_not_stop(demo_models_dir, demo_tokenizer):
    """The context runs out before the model ends its answer: exo sees the eos the engine hands
    it and would say `stop`; the client must read `length`."""
    engine, runtime = make_engine(demo_models_dir, max_context=64)
    ring = ExoRing([engine])
    messages = user("fill it [[sim:tokens=500]]")
    prompt = demo_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    room = 64 - len(demo_tokenizer.encode(prompt))
    answer = await ring.complete(DEMO_ID, messages, DEMO_LAYERS)
    assert len(runtime.tokens[answer.request_id]) == room  # the runtime filled the context
    assert answer.finish_reason == "length" and answer.error is None
    ok = await ring.complete(DEMO_ID, user("short [[sim:tokens=3]]"), DEMO_LAYERS)
    assert ok.finish_reason == "stop"


async def test_token_cap_of_the_runtime_ends_with_length(demo_models_dir):
    engine, runtime = make_engine(demo_models_dir, max_new_tokens=7)
    ring = ExoRing([engine])
    answer = await ring.complete(DEMO_ID, user("long [[sim:tokens=50]]"), DEMO_LAYERS)
    assert len(runtime.tokens[answer.request_id]) == 7 and answer.finish_reason == "length"
    exact = await ring.complete(DEMO_ID, user("fits [[sim:tokens=5]]"), DEMO_LAYERS)
    assert exact.finish_reason == "stop"


async def test_shutdown_ends_running_and_queued_requests_as_errors(demo_models_dir):
    engine, runtime = make_engine(demo_models_dir, SimTiming(0, 0, 0, decode_ms_per_token=10))
    ring = ExoRing([engine])
    running = await ring.chat(DEMO_ID, user("long [[sim:tokens=400]]"), DEMO_LAYERS)
    queued = asyncio.create_task(ring.chat(DEMO_ID, user("waiting [[sim:tokens=5]]"), DEMO_LAYERS))
    while len(running.tokens) < 5:
        await asyncio.sleep(0.01)
    await engine.shutdown()
    await asyncio.wait_for(running.finished.wait(), 5)
    assert running.finish_reason == "error" and "shutting down" in running.error["message"]
    assert running.error["code"] == "ShuttingDown" and len(running.tokens) < 400
    from exo_rkllm.errors import ShuttingDown

    with pytest.raises(ShuttingDown):  # nothing was sent yet: exo's API answers with the error (503)
        await queued
    await ring.drain()


async def test_request_cancelled_by_a_peer_or_the_idle_sweep_is_not_an_answer(demo_models_dir):
    engine, _ = make_engine(demo_models_dir, SimTiming(0, 0, 0, decode_ms_per_token=10))
    ring = ExoRing([engine])
    answer = await ring.chat(DEMO_ID, user("long [[sim:tokens=300]]"), DEMO_LAYERS)
    while len(answer.tokens) < 3:
        await asyncio.sleep(0.01)
    engine.cancel_request(answer.request_id, "idle timeout")
    await asyncio.wait_for(answer.finished.wait(), 5)
    assert answer.finish_reason == "error" and "idle timeout" in answer.error["message"]
    await ring.drain()


async def test_an_abort_that_lands_after_its_run_ended_does_not_stop_the_next_run(demo_models_dir):
    """A disconnect schedules the abort; if the run ends by itself first, the abort must not hit
    whatever runs next (that request would end with no answer)."""
    engine, runtime = make_engine(demo_models_dir)
    scheduler = await engine._get_scheduler()
    ended, running = object(), object()
    scheduler._running = running
    try:
        await scheduler._abort(ended)
        assert runtime.aborts == 0
        await scheduler._abort(running)
        assert runtime.aborts == 1
    finally:
        scheduler._running = None
        await engine.shutdown()


async def test_a_changed_modelfile_loads_the_model_again_with_its_new_settings(tmp_path, demo_model_dir):
    """The runtime takes the context length (and sampling) at load: a Modelfile edited while exo
    runs must not keep serving the old settings from the loaded model."""
    import shutil

    models = tmp_path / "models"
    shutil.copytree(demo_model_dir, models / demo_model_dir.name)
    engine, runtime = make_engine(models)
    ring = ExoRing([engine])
    await ring.complete(DEMO_ID, user("first [[sim:tokens=2]]"), DEMO_LAYERS)
    assert runtime.loaded.max_context_len == 4096
    modelfile = models / demo_model_dir.name / "Modelfile"
    modelfile.write_text(modelfile.read_text() + 'NUM_CTX="2048"\n')
    answer = await ring.complete(DEMO_ID, user("second [[sim:tokens=2]]"), DEMO_LAYERS)
    assert answer.finish_reason == "stop"
    assert runtime.loaded.max_context_len == 2048
    await engine.shutdown()
