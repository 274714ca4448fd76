"""Saved KV states on the native backend: the OpenAI handlers over the engine, the runtime in its
isolated worker process (the default), the fake librkllmrt.so underneath.

On the releases that can say what a loaded prompt cache holds (1.2.3 and 1.3.0 here), interleaved
conversations are saved by the runtime when they leave the NPU and restored when they come back, and
the answers are those of an engine with saved states off. On 1.1.4 and 1.2.0 saved states are off,
with a warning, and nothing is saved. A runtime that dies while saving (`crash_in_save=1`) costs
that save only: the worker restarts, the request that displaced the conversation is answered, and
the half-written file is never restored. The in-process twin on the simulator:
tests/test_saved_states.py; the runtime calls themselves: tests/test_native_prompt_cache.py.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from api_harness import Api, ExoLikeServer, stop_api
from exo_driver import ExoRing
from exo_rkllm.api.handlers import OpenAIServer
from exo_rkllm.exo_glue import plugin
from exo_rkllm.runtime.native.isolated import IsolatedRuntime
from fake_rkllm.fixtures import *  # noqa: F401,F403
from native_support import trace
from test_native_exo import models_with_fake, native_engine
from test_saved_states import conversation

CACHING = ["1.2.3", "1.3.0"]  # the 1.2.1 layout (1.2.1-1.2.3) and 1.3.0: rkllm_get_kv_cache_size
NOT_CACHING = ["1.1.4", "1.2.0"]
# ASCII answers: a follow-up turn tokenizes them back to the ids the fake generated, so the fake (which
# picks an answer by a hash of its whole KV cache) sees the same context whether a turn was restored,
# realigned or prefilled in full.
ANSWERS = ("The NPU has three cores and runs small quantized models well enough for chat.",
           "Memory bandwidth is the limit there; the weights are read once for every token.",
           "Models of one to three billion parameters run best, at ten to twenty tokens a second.",
           "It draws a few watts under load, far less than a laptop's graphics card does.")
TAGS = ("A", "B")
QUESTION = ("Please explain, in a few sentences and without any lists or tables, how the neural processing unit "
            "of the RK3588 system on a chip compares with the graphics processors of ordinary laptops when it "
            "runs small quantized language models, what limits its speed, and which settings matter most.")


async def start_native_api(root: Path, fake_lib: Any, version: str, demo_model_dir: Path, tok: Any, *,
                           fake: dict[str, Any] | None = None, **config: Any) -> tuple[Api, str]:
    """What tests/api_harness.py `start_api` builds, over the native engine on the fake library of
    release `version` (in its worker process, with a model converted for it): the OpenAI handlers on a
    plain aiohttp app, the exo-contract driver as the node. Its trace is `root`/trace.txt."""
    models = models_with_fake(root, demo_model_dir, tok, answers=ANSWERS, toolkit_version=version, **(fake or {}))
    engine, runtime, model_id = native_engine(models, fake_lib(version), demo_model_dir, **config)
    assert isinstance(runtime.inner, IsolatedRuntime)  # the default: the runtime in its worker process
    ring = ExoRing([engine])
    port = ring.port(0)
    server = OpenAIServer(engine, port, engine.config)
    app = web.Application()
    plugin.mount(app, server, engine.config)
    http = ExoLikeServer(app)
    await http.start_server()
    return Api(engine, runtime, ring, port, server, http, aiohttp.ClientSession()), model_id


async def ask(api: Api, model_id: str, messages: list[dict[str, str]]) -> tuple[str, str]:
    """A whole answer (greedy): its text and its request id."""
    status, body, _ = await api.post("/v1/chat/completions",
                                     {"model": model_id, "messages": messages, "temperature": 0})
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] == "stop", body
    return body["choices"][0]["message"]["content"], body["id"].removeprefix("chatcmpl-")


def long_question(tag: str, turns: int, answers: list[str]) -> list[dict[str, str]]:
    """A conversation without a system prompt (nothing shared to save up front), each user turn long
    enough that the conversation is worth a file (RKLLM_CACHE_MIN_TOKENS=64) after its first answer."""
    messages: list[dict[str, str]] = []
    for i in range(turns):
        messages.append({"role": "user", "content": f"[{tag}, question {i + 1}] {QUESTION}"})
        if i < turns - 1:
            messages.append({"role": "assistant", "content": answers[i]})
    return messages


async def interleave(api: Api, model_id: str, turns: int, build=conversation) -> tuple[dict[str, list[str]], list[str]]:
    """A and B, one turn each in turn: their answers, and the request ids in order."""
    answers: dict[str, list[str]] = {tag: [] for tag in TAGS}
    ids: list[str] = []
    for turn in range(1, turns + 1):
        for tag in TAGS:
            text, rid = await ask(api, model_id, build(tag, turn, answers[tag]))
            answers[tag].append(text)
            ids.append(rid)
    return answers, ids


def check_fake_text(api: Api, answers: dict[str, list[str]], ids: list[str]) -> None:
    """Every answer is one of the fake's, exactly as the runtime generated it."""
    flat = [answers[tag][turn] for turn in range(len(ids) // 2) for tag in TAGS]
    for rid, text in zip(ids, flat):
        assert text in ANSWERS, text
        assert api.runtime.texts[rid] == text, (rid, text)


def history(api: Api) -> list[Any]:
    return list(api.engine._scheduler.history)


def prompt_cache_lines(folder: Path) -> list[str]:
    return [line for line in trace(folder) if line.startswith("prompt_cache")]


def check_the_runtime_held_what_each_run_claims(folder: Path, runs: list[Any]) -> list[int]:
    """The fake's trace against the scheduler's records: each request's run continued exactly the tokens its
    record says the KV cache held (reused or restored), in order; each restore is a "prompt_cache load" of
    exactly its tokens, right before its run. Returns the loads."""
    lines = [line for line in trace(folder) if not line.startswith("sampling")]
    loads = []
    for i, line in enumerate(lines):
        if m := re.fullmatch(r"prompt_cache load n=(\d+)", line):
            loads.append(int(m.group(1)))
            assert re.fullmatch(rf"run keep=1 n=\d+ kv_before={m.group(1)}", lines[i + 1]), lines[i:i + 2]
    assert loads == [r.restored for r in runs if r.restored], (loads, runs)
    at = 0
    for r in runs:
        held = r.prompt_tokens - r.prefilled
        assert r.reused + r.restored == held, r
        want = rf"run keep=\d n={r.prefilled} kv_before={held}"
        found = [k for k in range(at, len(lines)) if re.fullmatch(want, lines[k])]
        assert found, f"no run of {r.request_id} prefilling {r.prefilled} onto {held} tokens: {lines[at:]}"
        at = found[0] + 1
    return loads


async def interleaved_against_plain(fake_lib, root: Path, version: str, demo_model_dir: Path, tok: Any,
                                    fake: dict[str, Any]) -> tuple[dict[str, list[str]], list[Any], dict[str, Any],
                                                                   dict[str, list[str]]]:
    """A and B interleaved for two turns with saved states on (in `root`/cached), then the same on an engine
    with them off (in `root`/plain): (answers, run records, the store's description, the plain answers)."""
    api, model_id = await start_native_api(root / "cached", fake_lib, version, demo_model_dir, tok, fake=fake,
                                           cache_dir=root / "states", cache_min_tokens=64)
    try:
        assert api.runtime.inner.capabilities.prompt_cache is True
        answers, ids = await interleave(api, model_id, 2)
        check_fake_text(api, answers, ids)
        runs = history(api)
        assert [r.request_id for r in runs] == ids
        assert api.runtime.inner.restarts == 0
        cache = api.engine._scheduler.saved.describe()
        cache["model_row"] = cache["models"].get(model_id)
    finally:
        await stop_api(api)
    plain, _ = await start_native_api(root / "plain", fake_lib, version, demo_model_dir, tok, fake=fake,
                                      prompt_cache=False)
    try:
        same, plain_ids = await interleave(plain, model_id, 2)
        check_fake_text(plain, same, plain_ids)
        assert all(r.restored == 0 for r in history(plain))
        assert plain.engine._scheduler.saved.describe() == {"enabled": False, "why": "RKLLM_PROMPT_CACHE=0"}
    finally:
        await stop_api(plain)
    assert prompt_cache_lines(root / "plain") == []
    return answers, runs, cache, same


@pytest.mark.parametrize("version", CACHING)
async def test_interleaved_conversations_are_saved_and_restored_by_the_runtime(
        fake_lib, tmp_path, demo_model_dir, demo_tokenizer, version) -> None:
    # decode_ms: on 1.2.x the backend stops a save run (one token) with rkllm_abort from another thread; a
    # fake decoding instantly could finish its whole answer first (see the next test for that case)
    answers, runs, cache, plain = await interleaved_against_plain(fake_lib, tmp_path, version, demo_model_dir,
                                                                  demo_tokenizer, {"decode_ms": 10})
    assert answers == plain  # the fake's answer is a function of its whole KV cache: the same contexts
    assert [r.restored > 0 for r in runs] == [False, False, True, True], runs
    for r in runs[2:]:  # each second turn: its own conversation as it left the NPU, then the new user turn
        assert r.prefilled < 40 and r.reused == 0 and r.restored + r.prefilled == r.prompt_tokens, r
    assert cache["enabled"] and cache["restores"] == 2 and cache["refused"] == 0, cache
    assert cache["model_row"]["conversations"] == 2 and cache["model_row"]["prefixes"] == 2, cache
    loads = check_the_runtime_held_what_each_run_claims(tmp_path / "cached", runs)
    lines = prompt_cache_lines(tmp_path / "cached")
    saves = [int(m.group(1)) for line in lines if (m := re.fullmatch(r"prompt_cache save n=(\d+)", line))]
    # saved by the runtime: A's and B's system prompts (once each, by runs of their own), A as B took the NPU,
    # B as A came back, A as B came back; restored: A's and B's first turns, exactly as saved
    assert len(saves) == 5 and len(loads) == 2 and all(n in saves for n in loads), lines
    assert not any("crash" in line for line in lines)
    metas = [json.loads(p.read_text()) for p in (tmp_path / "states").rglob("*.json") if p.name != "scope.json"]
    assert sorted(m["kind"] for m in metas) == ["conversation", "conversation", "prefix", "prefix"], metas


# A save run the runtime does not stop after its one token (a 1.2.x run that rkllm_abort reaches late; here
# forced with ignore_abort=1) leaves the KV cache unknown: the prefix it saved must then be restored from its
# file before the request continues it, never assumed to be in the cache. (Found by this test: _prepare once
# returned the plan to restore it without loading it, and the answer was computed on a wrong context.)
async def test_a_save_run_that_leaves_the_cache_unknown_is_never_continued_as_if_restored(
        fake_lib, tmp_path, demo_model_dir, demo_tokenizer) -> None:
    answers, runs, cache, plain = await interleaved_against_plain(
        fake_lib, tmp_path, "1.2.3", demo_model_dir, demo_tokenizer, {"ignore_abort": 1})
    check_the_runtime_held_what_each_run_claims(tmp_path / "cached", runs)
    assert answers == plain


@pytest.mark.parametrize("version", NOT_CACHING)
async def test_releases_without_the_kv_cache_size_keep_saved_states_off_and_say_so(
        fake_lib, tmp_path, demo_model_dir, demo_tokenizer, version, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="exo_rkllm")
    states = tmp_path / "states"
    api, model_id = await start_native_api(tmp_path / "cached", fake_lib, version, demo_model_dir, demo_tokenizer,
                                           cache_dir=states, cache_min_tokens=64)
    try:
        assert api.runtime.inner.capabilities.prompt_cache is False
        answers, ids = await interleave(api, model_id, 2)
        check_fake_text(api, answers, ids)
        assert all(r.restored == 0 and r.outcome.value == "done" for r in history(api))
        check_the_runtime_held_what_each_run_claims(tmp_path / "cached", history(api))
        cache = api.engine._scheduler.saved.describe()
        assert cache["enabled"] is False and "1.2.1 or later" in cache["why"], cache
        assert not [i for i in api.runtime.inputs if i.save_prompt_cache]  # not even asked of the runtime
    finally:
        await stop_api(api)
    warnings = [r for r in caplog.records if "saved KV states are off" in r.getMessage()]
    assert warnings and all(r.levelno == logging.WARNING for r in warnings), caplog.text
    assert version in warnings[0].getMessage()
    assert not any(line.startswith("prompt_cache save") for line in trace(tmp_path / "cached"))
    assert not prompt_cache_lines(tmp_path / "cached")
    assert not list(states.rglob("*.kv"))


@pytest.mark.parametrize("version", CACHING)
async def test_a_runtime_killed_while_saving_costs_the_save_only(fake_lib, tmp_path, demo_model_dir, demo_tokenizer,
                                                                 version, caplog) -> None:
    caplog.set_level(logging.INFO, logger="exo_rkllm")
    states = tmp_path / "states"
    api, model_id = await start_native_api(tmp_path / "cached", fake_lib, version, demo_model_dir, demo_tokenizer,
                                           fake={"crash_in_save": 1}, cache_dir=states, cache_min_tokens=64)
    try:
        answers, ids = await interleave(api, model_id, 2, build=long_question)
        check_fake_text(api, answers, ids)
        runs = history(api)
        assert [r.outcome.value for r in runs] == ["done"] * 4, runs
        # nothing was ever saved, so nothing is restored: every turn after the first is prefilled in full
        assert all(r.restored == 0 for r in runs), runs
        assert all(r.prefilled == r.prompt_tokens for r in runs[1:]), runs
        check_the_runtime_held_what_each_run_claims(tmp_path / "cached", runs)
        cache = api.engine._scheduler.saved.describe()
        assert cache["saves"] == 0 and cache["restores"] == 0 and cache["refused"] == 0, cache
        assert cache["models"] == {}, cache
        # B displaced A, A displaced B, B displaced A: three saves tried, the worker killed in each
        crashes = [line for line in prompt_cache_lines(tmp_path / "cached")
                   if line.startswith("prompt_cache save crash")]
        assert len(crashes) == 3, trace(tmp_path / "cached")
        assert api.runtime.inner.restarts == 3
    finally:
        await stop_api(api)
    lines = prompt_cache_lines(tmp_path / "cached")
    assert not any(line.startswith("prompt_cache load") for line in lines), lines  # never a reuse of half a file
    assert not any(re.fullmatch(r"prompt_cache save n=\d+", line) for line in lines), lines
    failed = [r.getMessage() for r in caplog.records if "KV state failed" in r.getMessage()]
    assert len(failed) == 3 and all("SIGKILL" in m for m in failed), caplog.text
    # no sidecar, so nothing restorable: only the temporaries the dying runtime wrote (a later scope opening
    # deletes them as incomplete saves)
    assert not [p for p in states.rglob("*.json") if p.name != "scope.json"]
    assert all(p.name.startswith("saving-") for p in states.rglob("*") if p.is_file() and p.name != "scope.json")

    plain, _ = await start_native_api(tmp_path / "plain", fake_lib, version, demo_model_dir, demo_tokenizer,
                                      prompt_cache=False)
    try:
        same, _ = await interleave(plain, model_id, 2, build=long_question)
        assert same == answers
    finally:
        await stop_api(plain)
