"""The store of saved KV states: matching on ids, integrity, scopes, bounds (no runtime involved:
the "runtime's files" here are bytes these tests write, as opaque to the store as the real ones)."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from exo_rkllm.runtime.base import Capabilities, ModelSpec
from exo_rkllm.scheduler.prompt_caches import EntryKind, PromptCacheStore

CAPS = Capabilities(backend="native", version="1.2.3", prompt_cache=True)


@pytest.fixture
def model(tmp_path: Path) -> ModelSpec:
    path = tmp_path / "models" / "m.rkllm"
    path.parent.mkdir()
    path.write_bytes(b"model weights v1")
    return ModelSpec("m", path, max_context_len=4096, max_new_tokens=0)


def store_at(root: Path, max_bytes: int = 1 << 30, max_age_s: float = 3600.0) -> PromptCacheStore:
    return PromptCacheStore(root, max_bytes, max_age_s)


def save(scope, ids, kind=EntryKind.CONVERSATION, payload: bytes | None = None):
    """What the scheduler does: the runtime writes a file at a temporary name, the store commits it."""
    path = scope.temp_path()
    path.write_bytes(payload if payload is not None else b"KV" + bytes(len(ids)))
    return scope.commit_blocking(path, ids, kind)


def test_the_longest_saved_prefix_wins_and_only_an_exact_one(tmp_path, model):
    scope = store_at(tmp_path / "c").scope_blocking(model, CAPS)
    save(scope, (1, 2, 3), EntryKind.PREFIX)
    save(scope, (1, 2, 3, 4, 5, 6))
    save(scope, (1, 2, 9, 9, 9, 9, 9, 9))
    assert scope.best((1, 2, 3, 4, 5, 6, 7)).entry.ids == (1, 2, 3, 4, 5, 6)
    assert scope.best((1, 2, 3, 4, 8)).entry.ids == (1, 2, 3)  # the conversation differs at 5
    assert scope.best((1, 2, 3, 4, 5, 6)) is None or scope.best((1, 2, 3, 4, 5, 6)).entry.ids == (1, 2, 3)
    assert scope.best((1, 2, 3)) is None  # at least one token must be left to prefill
    assert scope.best((7, 1, 2, 3, 4)) is None
    assert scope.best((1, 2, 3, 4, 5, 6, 7), longer_than=6) is None  # the live cache already spares as much


def test_a_realigned_prompt_can_continue_a_conversation(tmp_path, model):
    scope = store_at(tmp_path / "c").scope_blocking(model, CAPS)
    save(scope, (1, 2, 3, 4, 5, 6))
    prompt = (1, 2, 3, 40, 50, 6, 7, 8)  # the answer 4, 5 came back as 40, 50 (same text)
    seen = []

    def realign(cached):
        seen.append(tuple(cached))
        return tuple(cached) + (7, 8) if tuple(cached) == (1, 2, 3, 4, 5, 6) else None

    match = scope.best(prompt, realign)
    assert match.entry.ids == (1, 2, 3, 4, 5, 6) and match.prompt == (1, 2, 3, 4, 5, 6, 7, 8)
    assert scope.best((9, 9, 9, 9, 9, 9, 9, 9), realign) is None  # shares nothing: not worth a realign
    assert seen == [(1, 2, 3, 4, 5, 6)]


def test_a_longer_state_of_the_same_conversation_replaces_the_shorter(tmp_path, model):
    scope = store_at(tmp_path / "c").scope_blocking(model, CAPS)
    save(scope, (1, 2, 3), EntryKind.PREFIX)
    old = save(scope, (1, 2, 3, 4))
    new = save(scope, (1, 2, 3, 4, 5, 6))
    assert sorted(e.ids for e in scope.entries.values()) == [(1, 2, 3), (1, 2, 3, 4, 5, 6)]
    assert not old.path.exists() and not old.meta_path.exists() and new.path.exists()


def test_states_are_read_back_by_a_new_process(tmp_path, model):
    first = store_at(tmp_path / "c").scope_blocking(model, CAPS)
    entry = save(first, (5, 6, 7, 8))
    again = store_at(tmp_path / "c").scope_blocking(model, CAPS)
    assert [e.ids for e in again.entries.values()] == [(5, 6, 7, 8)]
    assert again.check_blocking(next(iter(again.entries.values())))
    assert next(iter(again.entries.values())).sha256 == entry.sha256


def test_a_damaged_file_is_ignored_and_deleted_with_a_log_line(tmp_path, model, caplog):
    caplog.set_level(logging.WARNING)
    scope = store_at(tmp_path / "c").scope_blocking(model, CAPS)
    truncated = save(scope, (1, 2, 3, 4))
    corrupt = save(scope, (7, 8, 9, 10))
    changed = save(scope, (11, 12, 13, 14))
    with truncated.path.open("r+b") as f:
        f.truncate(3)
    stat = corrupt.path.stat()
    corrupt.path.write_bytes(b"XX" + corrupt.path.read_bytes()[2:])  # same size
    os.utime(corrupt.path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same time: only the hash tells
    # in this process, a changed size or time is caught before the runtime sees the file
    assert not scope.check_blocking(truncated)
    assert "truncated or overwritten" in caplog.text and not truncated.path.exists()
    changed.meta_path.write_text("{not json")
    # a new process hashes every file: the corrupt one goes too, and so does a broken sidecar's
    again = store_at(tmp_path / "c").scope_blocking(model, CAPS)
    assert list(again.entries) == []
    assert "checksum mismatch" in caplog.text and "unreadable sidecar" in caplog.text
    assert sorted(p.name for p in again.folder.iterdir()) == ["scope.json"]


def test_a_save_cut_short_leaves_nothing_usable(tmp_path, model, caplog):
    """A runtime that dies while writing (or before) leaves a temporary file and no sidecar; a file the
    runtime wrote but never committed is never used, and is deleted when the store next opens."""
    caplog.set_level(logging.INFO)
    scope = store_at(tmp_path / "c").scope_blocking(model, CAPS)
    half = scope.temp_path()
    half.write_bytes(b"KV half")
    (scope.folder / "0123abcd.kv").write_bytes(b"an orphan")  # a state whose sidecar was never written
    assert scope.commit_blocking(scope.temp_path(), (1, 2, 3), EntryKind.CONVERSATION) is None  # nothing written
    again = store_at(tmp_path / "c").scope_blocking(model, CAPS)
    assert again.entries == {} and sorted(p.name for p in again.folder.iterdir()) == ["scope.json"]
    assert "incomplete save" in caplog.text


def test_a_changed_model_file_or_runtime_never_sees_old_states(tmp_path, model, caplog):
    caplog.set_level(logging.INFO)
    store = store_at(tmp_path / "c")
    old = store.scope_blocking(model, CAPS)
    save(old, (1, 2, 3, 4))
    # the same runtime, another release
    newer = store_at(tmp_path / "c").scope_blocking(model, Capabilities(backend="native", version="1.3.0",
                                                                         prompt_cache=True))
    assert newer.entries == {} and not old.folder.exists()
    save(newer, (1, 2, 3, 4))
    # the model file rewritten (new weights, same name)
    time.sleep(0.01)
    model.path.write_bytes(b"model weights v2!")
    fresh = store_at(tmp_path / "c").scope_blocking(model, Capabilities(backend="native", version="1.3.0",
                                                                        prompt_cache=True))
    assert fresh.entries == {} and not newer.folder.exists()
    assert "model file or runtime changed" in caplog.text
    # another context length is another KV layout
    other = store_at(tmp_path / "c").scope_blocking(
        ModelSpec("m", model.path, max_context_len=8192, max_new_tokens=0), CAPS)
    assert other.folder != fresh.folder


def test_states_of_other_models_are_left_alone(tmp_path, model):
    other_path = model.path.with_name("o.rkllm")
    other_path.write_bytes(b"other")
    store = store_at(tmp_path / "c")
    mine = store.scope_blocking(model, CAPS)
    theirs = store.scope_blocking(ModelSpec("o", other_path, max_context_len=4096, max_new_tokens=0), CAPS)
    save(mine, (1, 2, 3))
    save(theirs, (1, 2, 3))
    assert store.scope_blocking(model, CAPS) is mine
    assert len(store.entries()) == 2
    assert json.loads((theirs.folder / "scope.json").read_text())["model_id"] == "o"


def test_least_recently_used_states_go_first_beyond_the_size_bound(tmp_path, model):
    store = store_at(tmp_path / "c", max_bytes=250)
    scope = store.scope_blocking(model, CAPS)
    a = save(scope, (1, 1, 1), payload=b"a" * 100)
    b = save(scope, (2, 2, 2), payload=b"b" * 100)
    scope.used_blocking(a)  # a restored after b was saved: b is now the least recently used
    a.last_used = b.last_used + 1
    save(scope, (3, 3, 3), payload=b"c" * 100)
    assert sorted(e.ids for e in scope.entries.values()) == [(1, 1, 1), (3, 3, 3)]
    assert store.bytes <= 250 and store.stats.evicted == 1 and not b.path.exists()


def test_states_unused_for_too_long_are_deleted(tmp_path, model):
    store = store_at(tmp_path / "c", max_age_s=60)
    scope = store.scope_blocking(model, CAPS)
    old = save(scope, (1, 1, 1))
    past = time.time() - 3600
    os.utime(old.meta_path, (past, past))  # last used an hour ago (as a new process reads it)
    again = store_at(tmp_path / "c", max_age_s=60).scope_blocking(model, CAPS)
    assert again.entries == {} and not old.path.exists()
    forever = store_at(tmp_path / "d", max_age_s=-1)
    keep = save(forever.scope_blocking(model, CAPS), (1, 1, 1))
    os.utime(keep.meta_path, (past, past))
    assert len(store_at(tmp_path / "d", max_age_s=-1).scope_blocking(model, CAPS).entries) == 1


def test_a_long_conversation_that_parted_early_from_its_prompt_is_still_realigned(tmp_path, model):
    """The prompt and the saved state of one conversation part at its first answer the client sent back
    tokenized otherwise (here at id 100), however long the conversation has grown since (1000 ids)."""
    scope = store_at(tmp_path / "c").scope_blocking(model, CAPS)
    state = tuple(range(1000))
    save(scope, state)
    prompt = state[:100] + (5000, 5001) + state[102:] + (7, 8)

    def realign(cached):
        return tuple(cached) + (7, 8) if tuple(cached) == state else None

    assert scope.best(prompt, realign).prompt == state + (7, 8)
