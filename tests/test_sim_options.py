"""The simulator per imitated RKLLM release: per-run sampling and token limits, and embeddings."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil

import numpy as np
import pytest

from exo_rkllm.config import Config
from exo_rkllm.errors import ContextOverflow, EmbeddingUnsupported, GenerationError
from exo_rkllm.runtime.base import (EmbeddingInput, FinishEvent, FinishKind, GenerationInput, Runtime, SamplingParams,
                                    TokenEvent)
from exo_rkllm.runtime.sim import DEFAULT_HIDDEN_SIZE, SIM_RELEASES, SimRuntime, SimTiming
from exo_rkllm.scheduler.scheduler import Scheduler
from exo_rkllm.scheduler.streams import FinishReason

WARM = SamplingParams(top_k=40, top_p=0.95, temperature=0.9, repeat_penalty=1.05, frequency_penalty=0.2,
                      presence_penalty=0.1)


def prompt_ids(tok, text):
    return tuple(tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                    add_generation_prompt=True)))


async def run(rt, ids, **kw):
    events = [e async for e in rt.generate(GenerationInput("r", tuple(ids), **kw))]
    return [e for e in events if isinstance(e, TokenEvent)], events[-1]


async def loaded(spec, release="1.3.0", **kw) -> SimRuntime:
    rt = SimRuntime(SimTiming.instant(), release=release, **kw)
    await rt.load(spec)
    return rt


# -- releases and their capabilities ------------------------------------------------------------------
@pytest.mark.parametrize("release", sorted(SIM_RELEASES))
def test_capabilities_say_what_the_release_can_do(release):
    caps = SimRuntime(release=release).capabilities
    newest = release == "1.3.0"
    assert caps.version == f"sim-{release}"
    assert caps.per_run_sampling is newest and caps.per_run_max_new_tokens is newest
    assert caps.embeddings and caps.keep_history and caps.token_input
    assert isinstance(SimRuntime(release=release), Runtime)


def test_default_release_is_the_newest_and_unknown_ones_are_refused():
    caps = SimRuntime().capabilities
    assert caps.version == "sim-1.3.0" and caps.per_run_sampling and caps.per_run_max_new_tokens
    with pytest.raises(ValueError, match="1.3.0"):
        SimRuntime(release="0.9")


# -- sampling --------------------------------------------------------------------------------------------
async def test_a_per_run_release_applies_the_requests_sampling(demo_spec, demo_tokenizer):
    spec = dataclasses.replace(demo_spec, sampling=SamplingParams(top_k=1, temperature=0.2))
    rt = await loaded(spec, "1.3.0")
    ids = prompt_ids(demo_tokenizer, "warm")
    await run(rt, ids, sampling=WARM, seed=1234)
    record = rt.runs[-1]
    assert record.sampling == WARM and record.requested_sampling == WARM and record.seed == 1234
    await run(rt, ids)  # the request named none: the model's
    assert rt.runs[-1].sampling == spec.sampling and rt.runs[-1].requested_sampling is None
    assert rt.runs[-1].seed is None


@pytest.mark.parametrize("release", ["1.2.1", "1.2.3"])
async def test_an_older_release_keeps_the_load_time_sampling(demo_spec, demo_tokenizer, release):
    spec = dataclasses.replace(demo_spec, sampling=SamplingParams(top_k=1, temperature=0.2))
    rt = await loaded(spec, release)
    await run(rt, prompt_ids(demo_tokenizer, "warm"), sampling=WARM, seed=7)
    record = rt.runs[-1]
    assert record.sampling == spec.sampling  # fixed by rkllm_init
    assert record.requested_sampling == WARM and record.seed == 7  # what was asked, for the tests


async def test_answers_stay_greedy_whatever_the_sampling(demo_spec, demo_tokenizer):
    """Directives, determinism and resumed answers must not depend on a request's temperature."""
    rt = await loaded(demo_spec)
    ids = prompt_ids(demo_tokenizer, "same question")
    greedy, _ = await run(rt, ids, sampling=SamplingParams(top_k=1, temperature=0.0))
    warm, _ = await run(rt, ids, sampling=WARM, seed=1)
    other_seed, _ = await run(rt, ids, sampling=WARM, seed=2)
    assert [t.token_id for t in warm] == [t.token_id for t in greedy] == [t.token_id for t in other_seed]
    old = await loaded(demo_spec, "1.2.1")
    same, _ = await run(old, ids, sampling=WARM)
    assert [t.token_id for t in same] == [t.token_id for t in greedy]
    texted, _ = await run(rt, prompt_ids(demo_tokenizer, "[[sim:text=exactly this]]"), sampling=WARM, seed=3)
    assert "".join(t.text for t in texted) == "exactly this"


# -- max_new_tokens ----------------------------------------------------------------------------------------
async def test_130_stops_itself_cleanly_at_the_runs_limit(demo_spec, demo_tokenizer):
    rt = await loaded(demo_spec, "1.3.0")
    ids = prompt_ids(demo_tokenizer, "[[sim:tokens=10]]")
    tokens, finish = await run(rt, ids, keep_history=True, max_new_tokens=4)
    assert len(tokens) == 4 and isinstance(finish, FinishEvent) and finish.kind is FinishKind.LENGTH
    assert not rt.runs[-1].stopped_at_limit and rt.runs[-1].max_new_tokens == 4
    assert rt.kv_cache_len() == len(ids) + 3  # the last token was sampled, never fed


async def test_121_is_stopped_at_the_runs_limit_like_the_native_backend_does(demo_spec, demo_tokenizer):
    rt = await loaded(demo_spec, "1.2.1")
    ids = prompt_ids(demo_tokenizer, "[[sim:tokens=10]]")
    full, _ = await run(rt, ids)
    await rt.clear_kv_cache()
    tokens, finish = await run(rt, ids, keep_history=True, max_new_tokens=4)
    assert [t.token_id for t in tokens] == [t.token_id for t in full][:4]
    assert isinstance(finish, FinishEvent) and finish.kind is FinishKind.LENGTH and finish.stats.decode_tokens == 4
    assert rt.runs[-1].stopped_at_limit and not rt.runs[-1].aborted
    assert rt.kv_tokens == ids + tuple(t.token_id for t in tokens[:3])
    assert rt.kv_cache_len() == len(ids) + 3
    # a limit the answer never reaches changes nothing: it ends on its EOS, cleanly
    whole, finish = await run(rt, ids, max_new_tokens=50)
    assert [t.token_id for t in whole] == [t.token_id for t in full] and finish.kind is FinishKind.STOP


async def test_121_keeps_the_load_time_limit(demo_spec, demo_tokenizer):
    rt = await loaded(dataclasses.replace(demo_spec, max_new_tokens=5), "1.2.1")
    tokens, finish = await run(rt, prompt_ids(demo_tokenizer, "[[sim:tokens=10]]"))
    assert len(tokens) == 5 and finish.kind is FinishKind.LENGTH  # the runtime's own stop at its limit
    tokens, finish = await run(rt, prompt_ids(demo_tokenizer, "[[sim:tokens=10]]"), max_new_tokens=8)
    assert len(tokens) == 5 and finish.kind is FinishKind.LENGTH  # rkllm_init's limit comes first


@pytest.mark.parametrize("release", ["1.2.1", "1.3.0"])
async def test_the_scheduler_ends_a_limited_answer_as_length_on_every_release(demo_spec, demo_tokenizer, release):
    rt = await loaded(demo_spec, release)
    scheduler = Scheduler(rt, Config(backend="sim"))
    try:
        stream = scheduler.submit("lim", demo_spec, prompt_ids(demo_tokenizer, "[[sim:tokens=12]]"),
                                  stop_ids=frozenset({demo_tokenizer.eos_token_id}), max_new_tokens=5)
        got = []
        while (token := await asyncio.wait_for(stream.next_token(), 30)) is not None:
            got.append(token)
        assert len(got) == 5 and stream.finish_reason is FinishReason.LENGTH
        assert rt.runs[-1].stopped_at_limit is (release == "1.2.1")
    finally:
        await scheduler.close()


# -- embeddings ----------------------------------------------------------------------------------------------
def text_ids(tok, text):
    return tuple(tok.encode(text, add_special_tokens=False))


async def test_embeddings_are_one_float32_row_per_token_and_a_function_of_the_tokens(demo_spec, demo_tokenizer):
    rt = await loaded(demo_spec)
    ids = text_ids(demo_tokenizer, "The NPU has three cores.")
    out = await rt.embed(EmbeddingInput("e1", ids, "The NPU has three cores."))
    hidden = out.hidden
    assert isinstance(hidden, np.ndarray) and hidden.dtype == np.float32 and not out.pooled
    assert hidden.shape == (len(ids), DEFAULT_HIDDEN_SIZE)  # the demo's config.json names no width
    assert np.isfinite(hidden).all() and np.abs(hidden).sum() > 0
    again = await rt.embed(EmbeddingInput("e2", ids))
    assert np.array_equal(again.hidden, hidden)
    other_ids = text_ids(demo_tokenizer, "The NPU has two cores.")
    other = (await rt.embed(EmbeddingInput("e3", other_ids))).hidden
    assert not np.array_equal(other[-1], hidden[-1])
    # causal: rows of a shared prefix agree, and differ from the first differing token on
    shared = next(i for i, (a, b) in enumerate(zip(ids, other_ids)) if a != b)
    assert np.array_equal(other[:shared], hidden[:shared]) and not np.array_equal(other[shared], hidden[shared])
    assert [e.request_id for e in rt.embeds] == ["e1", "e2", "e3"]


async def test_embedding_width_comes_from_config_json_then_the_modelfile(demo_spec, demo_model_dir, tmp_path):
    rt = await loaded(dataclasses.replace(demo_spec, options={"HIDDEN_SIZE": "96"}))
    assert (await rt.embed(EmbeddingInput("e", (9707, 11)))).hidden.shape == (2, 96)
    folder = tmp_path / "model"
    shutil.copytree(demo_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    spec = dataclasses.replace(demo_spec, path=folder / demo_spec.path.name, tokenizer_dir=folder,
                               options={"HIDDEN_SIZE": "96"})
    rt = await loaded(spec)
    assert (await rt.embed(EmbeddingInput("e", (9707, 11, 13)))).hidden.shape == (3, 64)


async def test_embedding_leaves_its_input_in_the_cache_and_runs_like_a_prefill(demo_spec, demo_tokenizer):
    rt = SimRuntime(SimTiming(0, prefill_base_ms=0, prefill_ms_per_token=200, decode_ms_per_token=0))
    await rt.load(demo_spec)
    await run(rt, prompt_ids(demo_tokenizer, "[[sim:tokens=3]]"), keep_history=True)
    ids = text_ids(demo_tokenizer, "embed me")
    task = asyncio.ensure_future(rt.embed(EmbeddingInput("e", ids)))
    while not rt.is_running():  # the runtime is busy for the prefill of the input
        await asyncio.sleep(0.005)
    with pytest.raises(GenerationError, match="busy"):
        await run(rt, ids)
    with pytest.raises(GenerationError):
        await rt.clear_kv_cache()
    await task
    assert not rt.is_running() and rt.kv_tokens == ids


async def test_embedding_errors(demo_spec):
    rt = SimRuntime(SimTiming.instant())
    with pytest.raises(GenerationError, match="no model"):
        await rt.embed(EmbeddingInput("e", (1, 2)))
    await rt.load(demo_spec)
    with pytest.raises(GenerationError, match="no tokens"):
        await rt.embed(EmbeddingInput("e", ()))
    with pytest.raises(ContextOverflow):
        await rt.embed(EmbeddingInput("e", (11,) * (demo_spec.max_context_len + 1)))
    off = await loaded(demo_spec, embeddings=False)
    assert not off.capabilities.embeddings
    with pytest.raises(EmbeddingUnsupported):
        await off.embed(EmbeddingInput("e", (1, 2)))
