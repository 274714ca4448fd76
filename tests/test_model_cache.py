"""Bounded memory: the engine keeps the models in use plus RKLLM_MODEL_CACHE others, no more.

Before, every model folder a client named kept its entry and its tokenizer (~50 MB of RSS for
the demo's 151k vocabulary) for the life of the process. Each test cycles through copies of the
demo model in separate folders (so each has its own tokenizer object) and proves with weak
references which tokenizers are really freed.
"""
from __future__ import annotations

import asyncio
import gc
import shutil
import types
import weakref
from pathlib import Path
from typing import Any

import pytest

from exo_rkllm.exo_glue import plugin
from exo_rkllm.config import Config
from exo_rkllm.errors import ConfigError
from exo_rkllm.runtime.sim import SimTiming
from exo_driver import ExoRing
from support import DEMO_LAYERS, make_engine, user

N_MODELS = 5


@pytest.fixture(scope="module")
def many_models_dir(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Path:
    """N_MODELS copies of the demo model, each in its own folder (its own tokenizer)."""
    root = tmp_path_factory.mktemp("many-models")
    for i in range(N_MODELS):
        shutil.copytree(demo_model_dir, root / f"Demo-Copy-{i}")
    return root


def model_ids(engine: Any) -> list[str]:
    ids = sorted(e.model_id for e in engine.catalog.servable())
    assert len(ids) == N_MODELS
    return ids


def alive(refs: dict[str, "weakref.ref[Any]"]) -> set[str]:
    gc.collect()
    return {mid for mid, ref in refs.items() if ref() is not None}


async def test_cycling_through_more_models_than_the_bound_keeps_only_the_bound_and_the_loaded(many_models_dir):
    engine, runtime = make_engine(many_models_dir, model_cache=2)
    ring = ExoRing([engine])
    refs: dict[str, weakref.ref[Any]] = {}
    ids = model_ids(engine)
    for mid in ids:
        answer = await ring.complete(mid, user("hello"), DEMO_LAYERS)
        assert answer.finish_reason == "stop" and answer.streamed_text
        refs[mid] = weakref.ref(engine._models[mid].tokenizer)
    assert len({id(r()) for r in refs.values() if r() is not None}) == len(alive(refs))  # one object each
    assert runtime.loaded.model_id == ids[-1]
    # the loaded model and the two used last; the others' tokenizers are gone from memory
    assert alive(refs) == set(ids[-3:]) == set(engine._models.ids())
    await engine.shutdown()


async def test_the_loaded_model_is_never_dropped(many_models_dir):
    engine, runtime = make_engine(many_models_dir, model_cache=0)
    ids = model_ids(engine)
    await ExoRing([engine]).complete(ids[0], user("hello"), DEMO_LAYERS)
    kept = engine._models[ids[0]]
    for mid in ids[1:]:  # what exo's API does for each request before the engine sees it
        engine.model_for(mid)
        assert ids[0] in engine._models and engine._models[ids[0]] is kept
    assert runtime.loaded.model_id == ids[0] and runtime.inner._tok is kept.tokenizer
    assert engine._models.ids() == [ids[0], ids[-1]]  # the loaded one, the one looked up last
    await engine.shutdown()


async def test_a_dropped_model_is_built_again_and_gives_the_same_answer(many_models_dir):
    engine, _ = make_engine(many_models_dir, model_cache=0)
    ring = ExoRing([engine])
    ids = model_ids(engine)
    prompt = user("Tell me about caches [[sim:tokens=24]]")
    first = await ring.complete(ids[0], prompt, DEMO_LAYERS)
    old = weakref.ref(engine._models[ids[0]].tokenizer)
    for mid in ids[1:3]:
        await ring.complete(mid, user("something else"), DEMO_LAYERS)
    assert ids[0] not in engine._models
    assert alive({"old": old}) == set(), "a dropped model's tokenizer is still held"
    again = await ring.complete(ids[0], prompt, DEMO_LAYERS)
    assert again.finish_reason == first.finish_reason == "stop"
    assert again.tokens == first.tokens and again.streamed_text == first.streamed_text
    await engine.shutdown()


async def test_a_request_running_or_waiting_keeps_its_model(many_models_dir):
    timing = SimTiming(load_ms=0, prefill_base_ms=0, prefill_ms_per_token=0, decode_ms_per_token=20)
    engine, runtime = make_engine(many_models_dir, timing, model_cache=0)
    ring = ExoRing([engine])
    ids = model_ids(engine)
    running = asyncio.ensure_future(ring.complete(ids[0], user("long [[sim:tokens=40]]"), DEMO_LAYERS))
    while not engine.active_requests():
        await asyncio.sleep(0.01)
    waiting = asyncio.ensure_future(ring.complete(ids[1], user("next [[sim:tokens=8]]"), DEMO_LAYERS))
    while len(engine.active_requests()) < 2:
        await asyncio.sleep(0.01)
    refs = {mid: weakref.ref(engine._models[mid].tokenizer) for mid in ids[:2]}
    for mid in ids[2:]:  # other clients name other models meanwhile
        engine.model_for(mid)
    assert {ids[0], ids[1]} <= set(engine._models.ids())
    assert alive(refs) == {ids[0], ids[1]}
    first, second = await asyncio.gather(running, waiting)
    assert first.finish_reason == second.finish_reason == "stop" and first.tokens and second.tokens
    assert runtime.loaded.model_id == ids[1]
    await engine.shutdown()


async def test_a_dropped_tokenizer_still_held_is_shared_not_loaded_twice(many_models_dir):
    """exo's API holds the tokenizer for the length of a request: a model dropped meanwhile and
    built again must get that same object (one per folder), not a second copy."""
    engine, _ = make_engine(many_models_dir, model_cache=0)
    ids = model_ids(engine)
    held = engine.model_for(ids[0]).tokenizer
    for mid in ids[1:3]:
        engine.model_for(mid)
    assert ids[0] not in engine._models
    assert engine.model_for(ids[0]).tokenizer is held


async def test_exo_resolving_our_tokenizers_keeps_nothing_per_model(many_models_dir, monkeypatch):
    """exo's resolve_tokenizer gets the engine's own tokenizer for our models, and the plugin holds
    no reference of its own: the model cache alone decides what stays in memory."""
    engine, _ = make_engine(many_models_dir, model_cache=0)
    ids = model_ids(engine)
    fake = types.ModuleType("exo.inference.tokenizers")

    async def original(repo_id):
        raise AssertionError("exo's own resolve_tokenizer must not load our models")

    fake.resolve_tokenizer = original
    plugin._patch_tokenizers(fake)
    monkeypatch.setattr(plugin, "_engine", engine)
    for entry in engine.catalog.servable():
        monkeypatch.setitem(plugin._repo_to_model, str(entry.folder), entry.model_id)
    freed = []
    for entry in sorted(engine.catalog.servable(), key=lambda e: e.model_id):
        tok = await fake.resolve_tokenizer(str(entry.folder))
        assert tok is engine.model_for(entry.model_id).tokenizer
        freed.append(weakref.ref(tok))
        del tok
    gc.collect()
    assert sum(ref() is not None for ref in freed) == 1  # the last model's: the others were freed
    assert len(engine._models) == 1 and engine._models.ids() == [ids[-1]]


def test_the_bound_is_a_setting_and_cannot_be_negative():
    assert Config.from_env({"RKLLM_MODEL_CACHE": "5"}).model_cache == 5
    with pytest.raises(ConfigError):
        Config.from_env({"RKLLM_MODEL_CACHE": "-1"})


async def test_a_model_dropped_right_after_its_shard_was_made_current_still_serves(many_models_dir, monkeypatch):
    """Lookups run in worker threads: one for another model may drop this one between the
    engine's ensure_shard and its use (with RKLLM_MODEL_CACHE=0, or a request exo still steps
    after it ended and the NPU moved on). The engine builds it again instead of failing."""
    engine, _ = make_engine(many_models_dir, model_cache=0)
    ids = model_ids(engine)
    original = engine.ensure_shard

    async def ensure_then_dropped(shard: Any) -> None:
        await original(shard)
        engine._models._items.pop(shard.model_id, None)  # what a concurrent trim does at that instant

    monkeypatch.setattr(engine, "ensure_shard", ensure_then_dropped)
    answer = await ExoRing([engine]).complete(ids[0], user("hello [[sim:tokens=6]]"), DEMO_LAYERS)
    assert answer.finish_reason == "stop" and answer.tokens
    await engine.shutdown()
