"""Saved KV states through a real, unmodified legacy exo on the simulator: interleaved conversations
restore their own states, the answers are those of an exo without caches, and a restarted exo
restores what the last process saved.

Three exo processes for the module (each boot costs seconds): `first` (RKLLM_PROMPT_CACHE on, its
states in a folder of the module) runs the interleaved conversations and stops; `plain`
(RKLLM_PROMPT_CACHE=0) replays them one turn further, as the reference; the restart test starts a
third exo on `first`'s folder. What the scheduler did is read from exo's own status route
(GET /v1/rkllm/status: `recent` and `prompt_cache`). Skipped with the reason when legacy exo is not
importable (see tests/real_exo.py). The in-process twin: tests/test_saved_states.py.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from real_exo import EXO_PYTHON, REAL_EXO, ExoProcess, post_json, run_record, start_exo, stream_chat
from support import DEMO_ID
from test_saved_states import conversation

pytestmark = REAL_EXO

SIM = {"RKLLM_SIM_DECODE_MS": "2", "RKLLM_SIM_PREFILL_MS": "0", "RKLLM_SIM_PREFILL_BASE_MS": "0",
       "RKLLM_SIM_LOAD_MS": "50"}
CACHED = {**SIM, "RKLLM_CACHE_MIN_TOKENS": "64"}
TAGS = ("A", "B")
STREAMED = "A"  # A's turns are streamed, B's are whole answers
TURNS = 3


@dataclass
class Run:
    """What one exo process answered and recorded."""

    answers: dict[str, list[str]]  # per conversation, turn by turn
    records: list[tuple[str, int, dict[str, Any]]]  # (conversation, turn, its status-route record), in order
    status: dict[str, Any]  # the status route after the last request
    log: str = ""


async def ask(session: aiohttp.ClientSession, exo: ExoProcess, tag: str, turn: int,
              answers: list[str]) -> tuple[str, dict[str, Any]]:
    """Turn `turn` of conversation `tag` through exo's /v1/chat/completions (greedy): the answer and the
    scheduler's record of that request."""
    messages = conversation(tag, turn, answers)
    if tag == STREAMED:
        stream = await stream_chat(session, exo.api, messages, temperature=0)  # checked by the shared reader
        assert stream.finish == "stop" and stream.error is None, stream.raw[-500:]
        text, rid = stream.text, stream.chunks[0]["id"]
    else:
        status, body, _ = await post_json(session, f"{exo.api}/v1/chat/completions",
                                          {"model": DEMO_ID, "messages": messages, "temperature": 0})
        assert status == 200, body
        assert body["choices"][0]["finish_reason"] == "stop", body
        text, rid = body["choices"][0]["message"]["content"], body["id"]
    assert text
    record = await run_record(session, exo, rid)
    assert record["outcome"] == "done", record
    return text, record


async def status_of(session: aiohttp.ClientSession, exo: ExoProcess) -> dict[str, Any]:
    async with session.get(f"{exo.api}/v1/rkllm/status", headers=exo.headers) as r:
        assert r.status == 200
        return await r.json()


async def interleave(exo: ExoProcess, turns: range, answers: dict[str, list[str]] | None = None) -> Run:
    """A and B, one turn each in turn, for `turns` (continuing `answers`, the earlier turns' answers)."""
    answers = {tag: list((answers or {}).get(tag, [])) for tag in TAGS}
    records: list[tuple[str, int, dict[str, Any]]] = []
    async with aiohttp.ClientSession() as session:
        for turn in turns:
            for tag in TAGS:
                assert len(answers[tag]) == turn - 1
                text, record = await ask(session, exo, tag, turn, answers[tag])
                answers[tag].append(text)
                records.append((tag, turn, record))
        return Run(answers, records, await status_of(session, exo))


def interleaved_on_exo(workdir: Path, models_dir: Path, env: dict[str, str], turns: range,
                       answers: dict[str, list[str]] | None = None) -> Run:
    """`interleave` on an exo of its own, started with `env` and stopped after; its log kept in the Run."""
    exo = start_exo(EXO_PYTHON, workdir, models_dir, env)
    try:
        run = asyncio.run(interleave(exo, turns, answers))
    finally:
        exo.stop()
    run.log = exo.log_text()
    return run


def saved_states(folder: Path) -> list[dict[str, Any]]:
    """The sidecars of every saved state under `folder` (what a restarted exo may restore)."""
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("*.json")) if p.name != "scope.json"]


@pytest.fixture(scope="module")
def states(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kv-states") / "states"


@pytest.fixture(scope="module")
def first(tmp_path_factory, demo_models_dir, states) -> Run:
    """An exo with saved KV states on: the two conversations interleaved for TURNS turns; then stopped."""
    return interleaved_on_exo(tmp_path_factory.mktemp("exo-saved-states"), demo_models_dir,
                              {**CACHED, "RKLLM_CACHE_DIR": str(states)}, range(1, TURNS + 1))


@pytest.fixture(scope="module")
def plain(tmp_path_factory, demo_models_dir) -> Run:
    """The same conversations, one turn further, on an exo with RKLLM_PROMPT_CACHE=0: the reference."""
    return interleaved_on_exo(tmp_path_factory.mktemp("exo-plain"), demo_models_dir,
                              {**SIM, "RKLLM_PROMPT_CACHE": "0"}, range(1, TURNS + 2))


def test_interleaved_conversations_restore_their_states_through_exo(first):
    records = first.records
    assert [(tag, turn) for tag, turn, _ in records] == [(t, n) for n in range(1, TURNS + 1) for t in TAGS]
    # turn 1 of each prefills it (its system prompt saved first by a run of its own, then continued)
    for tag, turn, r in records[:2]:
        assert r["restored"] == 0 and r["prefilled"] + r["reused"] == r["prompt_tokens"], (tag, turn, r)
    # from turn 2 on, each turn restores its own conversation as it left the NPU: only the new user turn is
    # prefilled (the simulator's answers are 30-44 tokens, a user turn with its template about 25)
    for tag, turn, r in records[2:]:
        assert r["restored"] > 0 and r["reused"] == 0, (tag, turn, r)
        assert r["prefilled"] < 40, (tag, turn, r)
        assert r["restored"] + r["prefilled"] == r["prompt_tokens"], (tag, turn, r)
        earlier = [x for t, n, x in records if t == tag and n == turn - 1][0]
        assert r["restored"] > earlier["prompt_tokens"], "the state holds the earlier turn and its answer"
    cache = first.status["prompt_cache"]
    assert cache["enabled"] is True and cache["min_tokens"] == 64, cache
    assert cache["restores"] >= 4 and cache["refused"] == 0, cache
    assert cache["restores"] == len(records) - 2, cache
    # each conversation's latest state (the older turns were replaced) and each system prompt
    assert cache["models"][DEMO_ID]["conversations"] == 2 and cache["models"][DEMO_ID]["prefixes"] == 2, cache
    assert "saved KV states are off" not in first.log


def test_the_answers_are_those_of_an_exo_without_caches(first, plain):
    for tag in TAGS:
        got, want = first.answers[tag], plain.answers[tag][:TURNS]
        assert [a.encode() for a in got] == [a.encode() for a in want], tag  # byte for byte
    assert plain.status["prompt_cache"] == {"enabled": False, "why": "RKLLM_PROMPT_CACHE=0"}
    assert all(r["restored"] == 0 and r["prefilled"] + r["reused"] == r["prompt_tokens"] for _, _, r in plain.records)
    assert "saved KV states are off" not in plain.log  # turned off on purpose: no warning


def test_a_restarted_exo_restores_what_the_last_one_saved(first, plain, states, tmp_path, demo_models_dir,
                                                          demo_tokenizer):
    before = {}
    for meta in saved_states(states):
        if meta["kind"] == "conversation":
            text = demo_tokenizer.decode(meta["ids"])
            (tag,) = [t for t in TAGS if f"You are assistant {t}." in text]
            assert tag not in before, "one state per conversation (a later turn replaces the earlier ones)"
            before[tag] = meta["n"]
    assert set(before) == set(TAGS), saved_states(states)
    again = interleaved_on_exo(tmp_path, demo_models_dir, {**CACHED, "RKLLM_CACHE_DIR": str(states)},
                               range(TURNS + 1, TURNS + 2), first.answers)
    (a_tag, _, a), (b_tag, _, b) = again.records
    assert (a_tag, b_tag) == TAGS
    # A left the NPU (to B's last turn) after its last turn: exactly that state, restored by a fresh process
    assert a["restored"] == before["A"] and a["prefilled"] < 40, a
    assert a["restored"] + a["prefilled"] == a["prompt_tokens"], a
    # B's last turn was still on the NPU when the first exo stopped: its state from the turn before
    assert b["restored"] == before["B"] and b["restored"] + b["prefilled"] == b["prompt_tokens"], b
    cache = again.status["prompt_cache"]
    assert cache["restores"] == 2 and cache["refused"] == 0, cache
    assert "saved KV state(s) on disk" in again.log and "can be restored" in again.log
    # and the answers are still those of an exo without caches
    for tag in TAGS:
        assert again.answers[tag] == plain.answers[tag], tag
