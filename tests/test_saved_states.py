"""Saved KV states through the whole API: interleaved conversations and shared system prompts.

The simulator saves and restores real files (exo_rkllm/runtime/sim.py); these tests check what the
scheduler does with them, through the OpenAI handlers: which state a prompt continues (exact ids),
that answers are the same as with every cache off, and that nothing wrong is ever reused.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os

import pytest

from exo_rkllm.runtime.sim import SimTiming
from api_harness import start_api, stop_api
from support import until

pytestmark = pytest.mark.asyncio

LONG_SYSTEM = " ".join(f"Rule {i}: answer briefly, politely and precisely about topic number {i}." for i in range(40))
QUESTIONS = ["Tell me about the RK3588 NPU in some detail, please. [[sim:tokens=40]]",
             "And how does its memory bandwidth compare with a laptop? [[sim:tokens=36]]",
             "Which models run best on it, and at what speed? [[sim:tokens=44]]",
             "Thanks. One more: what about power draw under load? [[sim:tokens=30]]"]


def conversation(tag: str, turns: int, answers: list[str]) -> list[dict[str, str]]:
    """Turn `turns` of a conversation whose earlier answers are `answers` (as the client got them)."""
    messages = [{"role": "system", "content": f"You are assistant {tag}. " + LONG_SYSTEM[:600]}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"[{tag}] {QUESTIONS[i]}"})
        if i < turns - 1:
            messages.append({"role": "assistant", "content": answers[i]})
    return messages


async def ask(api, messages) -> str:
    status, body, _ = await api.post("/v1/chat/completions", api.chat(messages, temperature=0))
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


async def status(api) -> dict:
    """What the status route shows of the saved states (exo's route itself: tests/test_real_exo_saved_states.py)."""
    return {"prompt_cache": api.engine._scheduler.saved.describe()}


def runs(api) -> dict[str, object]:
    """The scheduler's record of every request, by id, in order."""
    return {r.request_id: r for r in api.engine._scheduler.history}


async def interleave(api, turns: int = 4) -> tuple[dict[str, list[str]], list]:
    """Two conversations, A and B, one turn each in turn; returns their answers and the run records."""
    answers: dict[str, list[str]] = {"A": [], "B": []}
    for turn in range(1, turns + 1):
        for tag in ("A", "B"):
            answers[tag].append(await ask(api, conversation(tag, turn, answers[tag])))
    return answers, list(api.engine._scheduler.history)


async def test_interleaved_conversations_restore_their_saved_states(demo_models_dir, tmp_path):
    api = await start_api(demo_models_dir, cache_dir=tmp_path / "states", cache_min_tokens=64)
    try:
        answers, history = await interleave(api)
        # Turn 1 of each prefills all; from turn 2 on, each turn restores its own conversation as it left
        # the NPU and prefills only the new user turn.
        assert [r.restored > 0 for r in history] == [False, False] + [True] * 6
        later = history[2:]
        assert all(r.prefilled < 40 for r in later), [r.prefilled for r in later]
        assert all(r.restored + r.prefilled == r.prompt_tokens for r in later)
        body = await status(api)
        cache = body["prompt_cache"]
        assert cache["enabled"] and cache["restores"] == 6 and cache["refused"] == 0
        assert cache["models"]["qwen2.5-1.5b-instruct-demo"]["conversations"] == 2  # older turns were replaced
    finally:
        await stop_api(api)
    # The same conversations with every cache off give byte-identical answers (greedy).
    plain = await start_api(demo_models_dir, prompt_cache=False, kv_reuse=False)
    try:
        same, history = await interleave(plain)
        assert same == answers
        assert all(r.restored == 0 and r.reused == 0 and r.prefilled == r.prompt_tokens for r in history)
        assert (await status(plain))["prompt_cache"] == {"enabled": False, "why": "RKLLM_PROMPT_CACHE=0"}
    finally:
        await stop_api(plain)


async def test_a_shared_system_prompt_is_saved_once_and_restored_for_new_conversations(demo_models_dir, tmp_path):
    api = await start_api(demo_models_dir, cache_dir=tmp_path / "states", cache_min_tokens=64)
    try:
        system = {"role": "system", "content": LONG_SYSTEM}
        first = await ask(api, [system, {"role": "user", "content": "first user [[sim:tokens=8]]"}])
        second = await ask(api, [system, {"role": "user", "content": "someone else [[sim:tokens=8]]"}])
        one, two = list(api.engine._scheduler.history)
        assert one.restored == 0 and two.restored > 300  # the system block, restored
        assert two.prefilled < 30
        saves = [i for i in api.runtime.inputs if i.save_prompt_cache]
        # the system block, saved once by a run of its own; then the first conversation, as it left the NPU
        assert [len(i.token_ids) for i in saves] == [two.restored, 1]
        # the answers are those of a server without caches
        plain = await start_api(demo_models_dir, prompt_cache=False)
        try:
            assert await ask(plain, [system, {"role": "user", "content": "first user [[sim:tokens=8]]"}]) == first
            assert await ask(plain, [system, {"role": "user", "content": "someone else [[sim:tokens=8]]"}]) == second
        finally:
            await stop_api(plain)
    finally:
        await stop_api(api)


async def test_no_room_for_saved_states_means_none_are_saved(demo_models_dir, tmp_path):
    api = await start_api(demo_models_dir, cache_dir=tmp_path / "states", cache_min_tokens=64, cache_max_mb=0)
    try:
        for tag in ("A", "B", "A"):
            await ask(api, conversation(tag, 1, []))
        assert not [i for i in api.runtime.inputs if i.save_prompt_cache]  # no NPU time spent on saves
        assert api.engine._scheduler.saved.describe() == {"enabled": False, "why": "RKLLM_CACHE_MAX_MB=0"}
    finally:
        await stop_api(api)


async def test_a_short_conversation_is_not_worth_a_file(demo_models_dir, tmp_path):
    api = await start_api(demo_models_dir, cache_dir=tmp_path / "states")  # RKLLM_CACHE_MIN_TOKENS=128
    try:
        await ask(api, [{"role": "user", "content": "hi [[sim:tokens=5]]"}])
        await ask(api, [{"role": "user", "content": "other [[sim:tokens=5]]"}])
        assert not [i for i in api.runtime.inputs if i.save_prompt_cache]
        assert not list((tmp_path / "states").rglob("*.kv"))
    finally:
        await stop_api(api)


async def test_states_survive_a_restart_and_are_tied_to_the_model_file(demo_models_dir, tmp_path):
    states = tmp_path / "states"
    api = await start_api(demo_models_dir, cache_dir=states, cache_min_tokens=64)
    try:
        answers, _ = await interleave(api, turns=1)
        await ask(api, conversation("A", 2, answers["A"]))  # B leaves the NPU: saved
    finally:
        await stop_api(api)
    assert len(list(states.rglob("*.kv"))) >= 1
    again = await start_api(demo_models_dir, cache_dir=states, cache_min_tokens=64)
    try:
        await ask(again, conversation("B", 2, answers["B"]))
        (run,) = list(again.engine._scheduler.history)
        assert run.restored > 0  # a fresh process restored what the last one saved
    finally:
        await stop_api(again)


async def test_a_corrupt_or_truncated_state_is_never_used(demo_models_dir, tmp_path, caplog):
    states = tmp_path / "states"
    api = await start_api(demo_models_dir, cache_dir=states, cache_min_tokens=64)
    try:
        answers, _ = await interleave(api, turns=1)
        # A's state was saved when B took the NPU; damage it in place, keeping its size and time
        (kv,) = [p for p in states.rglob("*.kv") if json.loads(p.with_suffix(".json").read_text())["kind"] == "conversation"]
        meta = json.loads(kv.with_suffix(".json").read_text())
        data = kv.read_bytes()
        stat = kv.stat()
        assert b'"ids": [151644,' in data
        kv.write_bytes(data.replace(b'"ids": [151644,', b'"ids": [151643,', 1))  # one id changed
        os.utime(kv, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert kv.stat().st_size == meta["size"]
        caplog.set_level(logging.WARNING)
        expected = await ask(api, conversation("A", 2, answers["A"]))
        run = list(api.engine._scheduler.history)[-1]
        # refused by the runtime: the next best state (the system prompt's) was restored, the rest prefilled
        assert 0 < run.restored < meta["n"] and run.restored + run.prefilled == run.prompt_tokens
        assert "ignoring the saved KV state" in caplog.text and "checksum" in caplog.text
        assert not kv.exists()  # deleted with its sidecar
        assert (await status(api))["prompt_cache"]["refused"] == 1
    finally:
        await stop_api(api)
    plain = await start_api(demo_models_dir, prompt_cache=False)
    try:
        assert await ask(plain, conversation("A", 2, answers["A"])) == expected
    finally:
        await stop_api(plain)


async def test_every_follow_up_turn_continues_the_live_cache(demo_models_dir):
    """One conversation alone, nothing saved: each turn continues the KV cache even when earlier answers
    come back tokenized otherwise than the model generated them (in several turns at once)."""
    api = await start_api(demo_models_dir, prompt_cache=False)
    try:
        answers: list[str] = []
        for turn in range(1, 5):
            answers.append(await ask(api, conversation("A", turn, answers)))
        history = list(api.engine._scheduler.history)
        assert [r.reused > 0 for r in history] == [False, True, True, True]
        assert all(r.prefilled < 40 for r in history[1:]), [r.prefilled for r in history]
    finally:
        await stop_api(api)


async def answers_without_caches(demo_models_dir, conversations) -> list[str]:
    plain = await start_api(demo_models_dir, prompt_cache=False, kv_reuse=False)
    try:
        return [await ask(plain, messages) for messages in conversations]
    finally:
        await stop_api(plain)


async def test_a_save_that_fails_loses_nothing_but_the_file(demo_models_dir, tmp_path, caplog):
    """The runtime fails (or its worker dies) during the run that saves a leaving conversation: the
    arriving request is served as usual, nothing is saved, and the conversation is prefilled when it
    comes back."""
    caplog.set_level(logging.WARNING)
    api = await start_api(demo_models_dir, cache_dir=tmp_path / "states", cache_min_tokens=64)
    api.runtime.inner.fail_on = lambda inp, index: inp.request_id.startswith("kv-save")
    try:
        a1 = await ask(api, conversation("A", 1, []))
        b1 = await ask(api, conversation("B", 1, []))  # A leaves: its save fails
        a2 = await ask(api, conversation("A", 2, [a1]))
        history = list(api.engine._scheduler.history)
        assert "saving a" in caplog.text and "KV state failed" in caplog.text
        assert [r.restored for r in history] == [0, 0, 0]  # every save failed, the system prompts' too
        assert history[2].prefilled == history[2].prompt_tokens
        assert not [p for p in (tmp_path / "states").rglob("*") if p.name.startswith("saving-")]
        assert api.engine._scheduler.saved.describe()["saves"] == 0
    finally:
        await stop_api(api)
    assert [a1, b1, a2] == await answers_without_caches(
        demo_models_dir, [conversation("A", 1, []), conversation("B", 1, []), conversation("A", 2, [a1])])


async def test_shutting_down_during_a_save_leaves_no_usable_file(demo_models_dir, tmp_path):
    states = tmp_path / "states"
    slow = SimTiming(0, 0, 0, 0, cache_io_ms_per_token=20.0)  # saving 200 tokens takes 4 s
    api = await start_api(demo_models_dir, slow, cache_dir=states, cache_min_tokens=64, prompt_cache=True)
    try:
        a1 = await ask(api, conversation("A", 1, []))
        task = asyncio.ensure_future(ask(api, conversation("B", 1, [])))
        for _ in range(200):
            if any(i.request_id.startswith("kv-save") and i.token_ids == (api.engine.model_for(
                    "qwen2.5-1.5b-instruct-demo").tokenizer.eos_token_id,) for i in api.runtime.inputs):
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the leaving conversation was never saved")
    finally:
        await stop_api(api)  # shuts the engine down while the save runs
    with pytest.raises(Exception):
        await task
    again = await start_api(demo_models_dir, cache_dir=states, cache_min_tokens=64)
    try:
        a2 = await ask(again, conversation("A", 2, [a1]))
        (run,) = list(again.engine._scheduler.history)
        entries = [e for _, e in again.engine._scheduler.saved.store.entries()]
        assert run.restored == 0 or run.restored in [e.tokens for e in entries if e.kind.value == "prefix"]
        assert not [p for p in states.rglob("*") if p.name.startswith("saving-")]  # the cut save was deleted
    finally:
        await stop_api(again)
    assert [a2] == await answers_without_caches(demo_models_dir, [conversation("A", 2, [a1])])


async def test_an_embedding_or_an_unload_saves_the_conversation_first(demo_models_dir, tmp_path):
    api = await start_api(demo_models_dir, cache_dir=tmp_path / "states", cache_min_tokens=64)
    try:
        a1 = await ask(api, conversation("A", 1, []))
        scheduler = api.engine._scheduler
        status, body, _ = await api.post("/v1/embeddings", {"model": "qwen2.5-1.5b-instruct-demo", "input": "x"})
        assert status == 200, body
        a2 = await ask(api, conversation("A", 2, [a1]))
        assert list(scheduler.history)[-1].restored > 0  # the embedding took the cache; the state came back
        assert await scheduler.unload()  # as RKLLM_KEEP_ALIVE does when the model is idle
        await ask(api, conversation("A", 3, [a1, a2]))
        assert scheduler.runtime.loads == 2 and list(scheduler.history)[-1].restored > 0
    finally:
        await stop_api(api)


async def test_a_paused_background_answer_resumes_exactly(demo_models_dir, tmp_path):
    """An interactive request pauses a background one. Its state is not saved as it leaves (its resume
    would have to prefill nothing of it, which no run can do); it resumes on its restored system prompt
    and gives the answer it would have given uninterrupted."""
    paced = SimTiming(0, 0, 0, decode_ms_per_token=10.0)
    api = await start_api(demo_models_dir, paced, cache_dir=tmp_path / "states", cache_min_tokens=64)
    background = conversation("A", 1, [])
    background[-1]["content"] = background[-1]["content"].replace("tokens=40", "tokens=120")
    try:
        scheduler = await api.engine._get_scheduler()
        task = asyncio.ensure_future(ask(api, background))  # not streamed: background
        for _ in range(300):
            if scheduler.running_request is not None and api.runtime.tokens:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        status, chunks, _ = await api.stream("/v1/chat/completions", api.chat(conversation("B", 1, []), stream=True))
        assert status == 200
        answer = await task
        runs = {r.priority: r for r in scheduler.history}
        assert runs["background"].preemptions == 1
        eos = api.engine.model_for("qwen2.5-1.5b-instruct-demo").tokenizer.eos_token_id
        leaving = [i for i in api.runtime.inputs if i.request_id.startswith("kv-save") and len(i.token_ids) == 1]
        assert [i.token_ids for i in leaving] == [(eos,)]  # B's finished answer, as A resumed; never A's paused one
        first, resumed = [i for i in api.runtime.inputs if i.request_id == runs["background"].request_id]
        prefix = api.runtime.inner.cache_loads[-1][1]
        assert resumed.keep_history and prefix + len(resumed.token_ids) > runs["background"].prompt_tokens
        assert prefix < runs["background"].prompt_tokens  # A's system prompt, restored for the resume
    finally:
        await stop_api(api)
    assert [answer] == await answers_without_caches(demo_models_dir, [background])


async def test_while_conversations_take_turns_the_one_on_the_npu_is_saved_when_it_goes_idle(demo_models_dir,
                                                                                             tmp_path):
    """Once a conversation has been saved because another took the NPU, the one on the NPU is saved as soon
    as the NPU is idle, so the next turn of another conversation starts without waiting for that save.
    One conversation on its own is never saved that way."""
    api = await start_api(demo_models_dir, cache_dir=tmp_path / "states", cache_min_tokens=64)
    try:
        def leaving_saves() -> list[str]:
            return [i.request_id for i in api.runtime.inputs if i.request_id.startswith("kv-save")
                    and len(i.token_ids) == 1]

        alone: list[str] = []
        for turn in range(1, 4):
            alone.append(await ask(api, conversation("C", turn, alone)))
            await asyncio.sleep(0.6)
        assert leaving_saves() == []  # nobody else wanted the NPU: nothing saved
        a1 = await ask(api, conversation("A", 1, []))  # C leaves: saved as A arrives
        assert len(leaving_saves()) == 1
        await until(lambda: len(leaving_saves()) == 2)  # turn-taking has begun: A is saved while the NPU idles
        await ask(api, conversation("C", 4, alone))
        assert len(leaving_saves()) == 2  # C's turn restored at once: A was saved already, no save first
        assert list(api.engine._scheduler.history)[-1].restored > 0
        await ask(api, conversation("A", 2, [a1]))
        assert list(api.engine._scheduler.history)[-1].restored > 0
    finally:
        await stop_api(api)


async def test_a_disk_that_fails_costs_the_saved_states_not_the_answers(demo_models_dir, tmp_path, caplog):
    """The store's folder fails (full, gone, read-only) while states are saved and restored: every request
    is still answered, as without caches, with a warning that says where."""
    from exo_rkllm.scheduler.prompt_caches import CacheScope

    caplog.set_level(logging.WARNING)
    api = await start_api(demo_models_dir, cache_dir=tmp_path / "states", cache_min_tokens=64)
    original = CacheScope.commit_blocking

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")
    try:
        CacheScope.commit_blocking = full_disk
        a1 = await ask(api, conversation("A", 1, []))
        b1 = await ask(api, conversation("B", 1, []))
        assert "could not keep a saved" in caplog.text and "No space left on device" in caplog.text
        CacheScope.commit_blocking = original
        b2 = await ask(api, conversation("B", 2, [b1]))  # nothing of B was kept: prefilled
        assert list(api.engine._scheduler.history)[-1].restored == 0
    finally:
        CacheScope.commit_blocking = original
        await stop_api(api)
    assert [a1, b1, b2] == await answers_without_caches(
        demo_models_dir, [conversation("A", 1, []), conversation("B", 1, []), conversation("B", 2, [b1])])


async def test_a_runtime_whose_files_hold_something_else_is_never_trusted(demo_models_dir, tmp_path, caplog):
    """rkllm.h does not say whether a saved prompt cache holds the answer too. A runtime that reads its files
    otherwise than the scheduler saved them (here: its cache reports one token more after each load) gets
    every restore refused, deleted and prefilled: never a wrong reuse."""
    caplog.set_level(logging.WARNING)
    api = await start_api(demo_models_dir, cache_dir=tmp_path / "states", cache_min_tokens=64)
    sim = api.runtime.inner
    loaded = {"n": None}
    real_load, real_len = sim.load_prompt_cache, sim.kv_cache_len

    async def load_prompt_cache(path):
        await real_load(path)
        loaded["n"] = real_len() + 1

    def kv_cache_len():
        return loaded["n"] if loaded["n"] is not None else real_len()

    async def clear_kv_cache():
        loaded["n"] = None
        await type(sim).clear_kv_cache(sim)

    sim.load_prompt_cache, sim.kv_cache_len, sim.clear_kv_cache = load_prompt_cache, kv_cache_len, clear_kv_cache
    api.runtime.kv_cache_len = kv_cache_len
    try:
        answers, history = await interleave(api, turns=2)
        assert [r.restored for r in history] == [0, 0, 0, 0]
        assert "after loading it, not" in caplog.text
        assert api.engine._scheduler.saved.describe()["refused"] >= 2
    finally:
        await stop_api(api)
    plain = await start_api(demo_models_dir, prompt_cache=False, kv_reuse=False)
    try:
        assert (await interleave(plain, turns=2))[0] == answers
    finally:
        await stop_api(plain)
