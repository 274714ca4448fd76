"""Per-run options and embeddings of the native backend against the fake runtime of every layout.

- A request's sampling reaches the runtime on 1.3.0 (RKLLMInferParam.sampling_params) and is ignored
  on older releases, where the values the model was loaded with apply; the fake traces what each run
  applied ("sampling from=run|init ...").
- max_new_tokens per run: the runtime's own limit on 1.3.0, our stop on older releases.
- embed(): RKLLM_INFER_GET_LAST_HIDDEN_LAYER on token input, one float32 row of the model's width per
  token, in process and through the worker; EmbeddingUnsupported where it cannot be had; nothing of an
  embedding leaks into the next generation.
"""
from __future__ import annotations

import asyncio
import os
import signal

import numpy as np
import pytest

from exo_rkllm.config import Config
from exo_rkllm.errors import EmbeddingUnsupported, GenerationError
from exo_rkllm.runtime.base import EmbeddingInput, EmbeddingOutput, FinishKind, GenerationInput, SamplingParams, TokenEvent
from exo_rkllm.runtime.native import abi, create
from exo_rkllm.runtime.native.backend import NativeRuntime
from exo_rkllm.runtime.native.isolated import IsolatedRuntime
from fake_rkllm.fixtures import *  # noqa: F401,F403
from native_support import MULTIBYTE, VERSIONS, fake_model, prompt_ids, run, spec_for, text_of, trace

# What a request asks for: every value differs from the model's (spec_for: top_k=7, top_p=0.5, temperature=0.3,
# repeat_penalty 1.1, no frequency/presence penalty).
ASKED = SamplingParams(top_k=3, top_p=0.25, temperature=1.5, repeat_penalty=1.25, frequency_penalty=0.5,
                       presence_penalty=-0.75)
MODEL = SamplingParams(top_k=7, top_p=0.5, temperature=0.3)
WIDTH = 48  # the fake model's embd_size in these tests


def native(fake_lib, version: str) -> NativeRuntime:
    runtime = create(Config(lib_path=fake_lib(version), native_isolation=False))
    assert isinstance(runtime, NativeRuntime)
    return runtime


def isolated(fake_lib, version: str) -> IsolatedRuntime:
    runtime = create(Config(lib_path=fake_lib(version)))
    assert isinstance(runtime, IsolatedRuntime)
    return runtime


def sampling_lines(folder) -> list[dict[str, str]]:
    """The fake's 'sampling ...' trace lines, one per generating run, as key -> value."""
    return [dict(part.split("=", 1) for part in line.split()[1:]) for line in trace(folder)
            if line.startswith("sampling ")]


def assert_applied(line: dict[str, str], s: SamplingParams, source: str) -> None:
    assert line["from"] == source
    assert int(line["top_k"]) == s.top_k
    for key, value in (("top_p", s.top_p), ("temp", s.temperature), ("repeat", s.repeat_penalty),
                       ("freq", s.frequency_penalty), ("presence", s.presence_penalty)):
        assert float(line[key]) == pytest.approx(value, abs=1e-3), key


def text_ids(tok, text: str) -> tuple[int, ...]:
    return tuple(tok.encode(text, add_special_tokens=False))


async def embed(rt, tok, text: str) -> np.ndarray:
    out = await rt.embed(EmbeddingInput("e", text_ids(tok, text), text))
    assert isinstance(out, EmbeddingOutput) and out.pooled is False
    assert isinstance(out.hidden, np.ndarray) and out.hidden.dtype == np.float32 and out.hidden.ndim == 2
    return out.hidden


# -- capabilities ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_capabilities_per_release(fake_lib, version) -> None:
    """Every supported release has the last-hidden-layer mode; only 1.3.0 takes sampling and a limit per run.
    The worker-hosted runtime says the same without starting a worker."""
    assert native(fake_lib, version).session.layout.HAS_LAST_HIDDEN_LAYER
    for rt in (native(fake_lib, version), isolated(fake_lib, version)):
        caps = rt.capabilities
        assert caps.embeddings is True
        assert caps.per_run_sampling is caps.per_run_max_new_tokens is (version == "1.3.0")
    assert isolated(fake_lib, version).worker_pid is None


# -- sampling --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
async def test_request_sampling_reaches_the_runtime_only_where_it_can(fake_lib, tmp_path, demo_tokenizer,
                                                                     demo_model_dir, version) -> None:
    rt = native(fake_lib, version)
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, version), demo_model_dir))
    ids = prompt_ids(demo_tokenizer, "sample me")
    asked, _ = await run(rt, ids, sampling=ASKED, seed=1234)
    plain, _ = await run(rt, ids)
    assert text_of(asked) == text_of(plain) == MULTIBYTE  # the fake's answer does not depend on sampling
    first, second = sampling_lines(tmp_path)
    if version == "1.3.0":
        assert_applied(first, ASKED, "run")
    else:  # no per-run sampling in this release: the load-time values, whatever was asked
        assert_applied(first, MODEL, "init")
    assert_applied(second, MODEL, "init")  # nothing of a run's sampling stays for the next
    assert not any("seed" in line for line in trace(tmp_path))  # no release has a seed to give
    await rt.close()


async def test_per_run_sampling_keeps_the_models_mirostat(fake_lib, tmp_path, demo_tokenizer, demo_model_dir) -> None:
    """1.3.0's per-run struct replaces every sampling value of the load, mirostat included: the backend
    restates the model's mirostat rather than switching it off behind the model's back."""
    rt = native(fake_lib, "1.3.0")
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.3.0"), demo_model_dir, MIROSTAT="2"))
    await run(rt, prompt_ids(demo_tokenizer, "x"), sampling=ASKED)
    await run(rt, prompt_ids(demo_tokenizer, "x"))
    asked, plain = sampling_lines(tmp_path)
    assert asked["from"] == "run" and asked["mirostat"] == "2"
    assert plain["from"] == "init" and plain["mirostat"] == "2"
    await rt.close()


@pytest.mark.parametrize("version", ["1.2.3", "1.3.0"])
async def test_sampling_and_seed_travel_to_the_worker(fake_lib, tmp_path, demo_tokenizer, demo_model_dir,
                                                      version) -> None:
    rt = isolated(fake_lib, version)
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, version), demo_model_dir))
    tokens, finish = await run(rt, prompt_ids(demo_tokenizer, "via the worker"), sampling=ASKED, seed=7)
    assert text_of(tokens) == MULTIBYTE and not finish.aborted
    [line] = sampling_lines(tmp_path)
    assert_applied(line, ASKED if version == "1.3.0" else MODEL, "run" if version == "1.3.0" else "init")
    await rt.close()


async def test_sampling_the_runtime_refuses_fails_the_run_cleanly(fake_lib, tmp_path, demo_tokenizer,
                                                                  demo_model_dir) -> None:
    """A top_p outside [0, 1] reaches the 1.3.0 runtime, which refuses the run: a GenerationError, and the
    context serves the next run."""
    rt = native(fake_lib, "1.3.0")
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.3.0"), demo_model_dir))
    ids = prompt_ids(demo_tokenizer, "bad")
    with pytest.raises(GenerationError):
        await run(rt, ids, sampling=SamplingParams(top_p=1.5))
    tokens, _ = await run(rt, ids, sampling=ASKED)
    assert text_of(tokens) == MULTIBYTE
    await rt.close()


# -- max_new_tokens --------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
async def test_max_new_tokens_per_run(fake_lib, tmp_path, demo_tokenizer, demo_model_dir, version) -> None:
    rt = native(fake_lib, version)
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, version), demo_model_dir, max_new_tokens=100))
    ids = prompt_ids(demo_tokenizer, "limit")
    full = len(demo_tokenizer.encode(MULTIBYTE))
    assert full > 5
    short, finish = await run(rt, ids, max_new_tokens=4)
    assert [t.token_id for t in short] == demo_tokenizer.encode(MULTIBYTE)[:4]
    whole, _ = await run(rt, ids)
    assert text_of(whole) == MULTIBYTE  # the limit was that run's alone
    first, second = sampling_lines(tmp_path)
    assert finish.kind is FinishKind.LENGTH  # cut at the limit, whoever stopped it: not an abort
    if version == "1.3.0":  # the runtime was told, and stopped cleanly
        assert first["max_new"] == "4"
    else:  # the runtime ran under the load's limit; the backend stopped it
        assert first["max_new"] == "100"
    assert second["max_new"] == "100"
    await rt.close()


# -- embeddings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
async def test_embed_in_process_gives_a_row_per_token(fake_lib, tmp_path, demo_tokenizer, demo_model_dir,
                                                      version) -> None:
    rt = native(fake_lib, version)
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, version, embd_size=WIDTH), demo_model_dir))
    text = "The NPU embeds this sentence."
    n = len(text_ids(demo_tokenizer, text))
    a = await embed(rt, demo_tokenizer, text)
    assert a.shape == (n, WIDTH)
    assert np.all(np.isfinite(a)) and a.flags.writeable
    assert len({row.tobytes() for row in a}) == n  # each token its own row
    again = await embed(rt, demo_tokenizer, text)
    assert np.array_equal(a, again)  # the same text, the same vectors
    other = await embed(rt, demo_tokenizer, "Something else entirely.")
    assert not np.array_equal(a[-1], other[-1])
    longer = await embed(rt, demo_tokenizer, text + " And more.")
    assert np.array_equal(longer[:n], a)  # causal: a token's state depends on what precedes it only
    lines = trace(tmp_path)
    assert f"hidden n={n} embd={WIDTH}" in lines
    assert f"run keep=0 n={n} kv_before=0" in lines  # token input, no history
    assert not any(line.startswith("sampling ") for line in lines)  # no generating run happened
    await rt.close()


async def test_embed_default_width(fake_lib, tmp_path, demo_tokenizer, demo_model_dir) -> None:
    rt = native(fake_lib, "1.2.3")
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.3"), demo_model_dir))
    assert (await embed(rt, demo_tokenizer, "hi there")).shape == (len(text_ids(demo_tokenizer, "hi there")), 1536)
    await rt.close()


@pytest.mark.parametrize("version", ["1.1.4", "1.3.0"])
async def test_embed_through_the_worker_matches_in_process(fake_lib, tmp_path, demo_tokenizer, demo_model_dir,
                                                           version) -> None:
    model = fake_model(tmp_path, demo_tokenizer, version, embd_size=WIDTH)
    local = native(fake_lib, version)
    await local.load(spec_for(model, demo_model_dir))
    expected = await embed(local, demo_tokenizer, "same vectors in both processes")
    await local.close()
    rt = isolated(fake_lib, version)
    await rt.load(spec_for(model, demo_model_dir))
    pid = rt.worker_pid
    got = await embed(rt, demo_tokenizer, "same vectors in both processes")
    assert np.array_equal(got, expected) and got.shape[1] == WIDTH
    assert rt.worker_pid == pid  # the worker did it, and is still there
    assert rt.kv_cache_len() == (0 if version == "1.3.0" else None)  # cleared after the embedding
    tokens, _ = await run(rt, prompt_ids(demo_tokenizer, "then talk"))
    assert text_of(tokens) == MULTIBYTE
    await rt.close()


@pytest.mark.parametrize("version", VERSIONS)
async def test_generation_after_an_embedding_is_unaffected(fake_lib, tmp_path, demo_tokenizer, demo_model_dir,
                                                           version) -> None:
    """The fake picks its answer from the whole KV cache: a generation that continued from what an embedding
    left behind would answer differently. After embed() the cache is empty again."""
    rt = native(fake_lib, version)
    answers = ["first answer here", "second answer there", "third one", "fourth reply", "fifth reply"]
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, version, answers), demo_model_dir))
    ids = prompt_ids(demo_tokenizer, "what is it?")
    before, _ = await run(rt, ids, keep_history=True)
    await rt.clear_kv_cache()
    await embed(rt, demo_tokenizer, "an unrelated text to embed, long enough to matter")
    if version != "1.1.4":
        assert trace(tmp_path)[-1] == "clear keep_system_prompt=0 kv=0"  # cleared right after the embedding
    after, _ = await run(rt, ids, keep_history=True)
    assert text_of(after) == text_of(before)
    assert [t.token_id for t in after] == [t.token_id for t in before]
    runs = [line for line in trace(tmp_path) if line.startswith("run ")]
    assert runs[-1].endswith("kv_before=0")
    await rt.close()


@pytest.mark.parametrize("isolation", [False, True])
async def test_embed_where_the_release_has_no_hidden_layer_mode(fake_lib, tmp_path, demo_tokenizer, demo_model_dir,
                                                                monkeypatch, isolation) -> None:
    """A layout without the mode (none of the supported ones; a future one might drop it) answers
    EmbeddingUnsupported without calling the runtime, and generation is unaffected."""
    monkeypatch.setattr(abi.V1_2_1, "HAS_LAST_HIDDEN_LAYER", False)
    rt = isolated(fake_lib, "1.2.3") if isolation else native(fake_lib, "1.2.3")
    assert rt.capabilities.embeddings is False
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.3"), demo_model_dir))
    with pytest.raises(EmbeddingUnsupported):
        await embed(rt, demo_tokenizer, "no")
    assert not any(line.startswith("hidden") or line.startswith("run ") for line in trace(tmp_path))
    tokens, _ = await run(rt, prompt_ids(demo_tokenizer, "still talks"))
    assert text_of(tokens) == MULTIBYTE
    await rt.close()


@pytest.mark.parametrize("isolation", [False, True])
async def test_embed_of_a_model_without_a_hidden_layer(fake_lib, tmp_path, demo_tokenizer, demo_model_dir,
                                                       isolation) -> None:
    """The runtime ends the run without delivering a hidden layer: EmbeddingUnsupported (the model cannot),
    not an empty array; the context then generates as before."""
    rt = isolated(fake_lib, "1.3.0") if isolation else native(fake_lib, "1.3.0")
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.3.0", hidden_layer=0), demo_model_dir))
    with pytest.raises(EmbeddingUnsupported, match="no last hidden layer"):
        await embed(rt, demo_tokenizer, "nothing comes back")
    assert any(line.startswith("run keep=0") for line in trace(tmp_path))  # the runtime was asked
    tokens, _ = await run(rt, prompt_ids(demo_tokenizer, "but it talks"))
    assert text_of(tokens) == MULTIBYTE
    await rt.close()


async def test_embed_errors(fake_lib, tmp_path, demo_tokenizer, demo_model_dir) -> None:
    rt = native(fake_lib, "1.3.0")
    with pytest.raises(GenerationError, match="no model"):
        await embed(rt, demo_tokenizer, "nothing loaded")
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.3.0"), demo_model_dir, max_context_len=16))
    with pytest.raises(GenerationError):
        await rt.embed(EmbeddingInput("e", (), ""))
    too_long = " ".join(["word"] * 40)
    assert len(text_ids(demo_tokenizer, too_long)) > 16
    with pytest.raises(GenerationError, match="reported an error"):  # the runtime's ERROR: prompt beyond the context
        await embed(rt, demo_tokenizer, too_long)
    assert (await embed(rt, demo_tokenizer, "short")).shape[0] == len(text_ids(demo_tokenizer, "short"))
    await rt.close()


async def test_embed_while_a_generation_runs_is_refused(fake_lib, tmp_path, demo_tokenizer, demo_model_dir) -> None:
    """The scheduler never does this; the backend still refuses rather than enter rkllm_run twice."""
    rt = native(fake_lib, "1.2.3")
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.3", decode_ms=20), demo_model_dir))
    gen = rt.generate(GenerationInput("g", tuple(prompt_ids(demo_tokenizer, "long"))))
    first = await gen.__anext__()
    assert isinstance(first, TokenEvent)
    with pytest.raises(GenerationError, match="busy"):
        await embed(rt, demo_tokenizer, "not now")
    rest = [e async for e in gen]
    assert text_of([first] + [e for e in rest if isinstance(e, TokenEvent)]) == MULTIBYTE
    assert (await embed(rt, demo_tokenizer, "now")).shape[1] == 1536
    await rt.close()


async def test_a_worker_that_dies_during_an_embedding_comes_back(fake_lib, tmp_path, demo_tokenizer,
                                                                 demo_model_dir) -> None:
    """The worker is killed while it embeds (a slow prefill): the call fails with the crash, the worker is
    restarted with the model, and the next embedding works."""
    rt = isolated(fake_lib, "1.3.0")
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.3.0", prefill_ms=200, embd_size=WIDTH),
                           demo_model_dir))
    pid = rt.worker_pid
    task = asyncio.ensure_future(rt.embed(EmbeddingInput("e", text_ids(demo_tokenizer, "slow text to embed"))))
    while not any(line.startswith("run ") for line in trace(tmp_path)):
        await asyncio.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(GenerationError, match="crashed"):
        await task
    out = await rt.embed(EmbeddingInput("e", text_ids(demo_tokenizer, "hi")))
    assert out.hidden.shape == (len(text_ids(demo_tokenizer, "hi")), WIDTH)
    assert rt.worker_pid not in (None, pid) and rt.restarts == 1
    await rt.close()
