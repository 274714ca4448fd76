"""Embeddings: pooling and normalisation (exo_rkllm/engine/embeddings.py), the engine's encoding and checks,
and the scheduler's embedding jobs (same queue and ranks as generations, KV bookkeeping forgotten).

The simulator's hidden rows are a deterministic function of the token prefix (sim.embedding_rows), so
expected vectors are computed independently from the ids. Order on the NPU is read from a journal of
what the runtime was asked, in order; never from timing.
"""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
import pytest

from exo_rkllm.config import Config
from exo_rkllm.engine.embeddings import (EmbeddingResult, Pooling, embedding_vector, normalize, pool, pooling_method,
                                  text_ids, tokenizer_framing)
from exo_rkllm.engine.inference_engine import RKLLMInferenceEngine
from exo_rkllm.errors import (ContextOverflow, EmbeddingUnsupported, GenerationError, ModelUnavailable, QueueFull,
                              ShuttingDown)
from exo_rkllm.runtime.base import EmbeddingInput, EmbeddingOutput, GenerationInput, RuntimeEvent
from exo_rkllm.runtime.sim import SimRuntime, SimTiming, embedding_rows, hidden_size
from exo_rkllm.scheduler.scheduler import Priority, Scheduler
from exo_rkllm.models.tokenizer import stop_token_ids
from support import DEMO_ID, RecordingRuntime, read_all, until, user

HANG_S = 30.0
PACED = SimTiming(0.0, 0.0, 0.0, decode_ms_per_token=10.0)
BG, FG = Priority.BACKGROUND, Priority.INTERACTIVE


# -- pooling and normalisation ---------------------------------------------------------------------------
HIDDEN = np.array([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 2.0]], dtype=np.float32)


@pytest.mark.parametrize("method,row", [("last", HIDDEN[-1]), ("cls", HIDDEN[0]), ("mean", HIDDEN.mean(axis=0))])
def test_pooling_methods_pick_their_rows(method, row):
    assert np.allclose(pool(HIDDEN, method), row)
    vector = embedding_vector(EmbeddingOutput(HIDDEN), method)
    assert vector.dtype == np.float32
    assert np.isclose(np.linalg.norm(vector), 1.0)
    assert np.allclose(vector, row / np.linalg.norm(row), atol=1e-6)


def test_a_server_pooled_row_is_only_normalised():
    vector = embedding_vector(EmbeddingOutput(np.array([[0.0, 3.0, 4.0]]), pooled=True), "cls")
    assert np.allclose(vector, [0.0, 0.6, 0.8])
    with pytest.raises(GenerationError):
        embedding_vector(EmbeddingOutput(HIDDEN, pooled=True), "last")  # "pooled" but one row per token


def test_normalisation_edge_cases():
    assert np.array_equal(normalize(np.zeros(4)), np.zeros(4, dtype=np.float32)), "no NaN from a zero vector"
    big = np.full(4096, 1e20, dtype=np.float32)  # squares overflow float32
    assert np.isclose(np.linalg.norm(normalize(big)), 1.0)
    for bad in (np.array([1.0, np.nan]), np.array([np.inf, 0.0])):
        with pytest.raises(GenerationError):
            normalize(bad)
    for shape in ((0, 3), (2, 0), (2, 2, 2)):
        with pytest.raises(GenerationError):
            pool(np.zeros(shape), "mean")


def test_the_pooling_comes_from_the_modelfile():
    assert pooling_method({}) is Pooling.LAST, "decoder LLMs (Qwen3-Embedding...) pool their last token"
    assert pooling_method({"EMBEDDING_POOLING": " Mean "}) is Pooling.MEAN
    assert pooling_method({"EMBEDDING_POOLING": "cls"}) is Pooling.CLS
    with pytest.raises(ModelUnavailable, match="EMBEDDING_POOLING"):
        pooling_method({"EMBEDDING_POOLING": "max"})


# -- encoding --------------------------------------------------------------------------------------------
def test_text_is_encoded_as_plain_text(demo_tokenizer):
    tok = demo_tokenizer
    assert tokenizer_framing(tok) == ((), ()), "this tokenizer adds nothing around text"
    ids = text_ids(tok, "a <|im_end|> b <|endoftext|>")
    assert not set(ids) & set(tok.all_special_ids)
    assert tok.decode(ids) == "a <|im_end|> b <|endoftext|>"


class FramingTokenizer:
    """A tokenizer whose post-processor appends its end-of-text token (as Qwen3-Embedding's does)."""

    EOT = 99
    all_special_ids = [EOT]

    def __call__(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> dict:
        ids = [ord(c) % 90 for c in text]
        if "<eot>" in text and not split_special_tokens:
            raise AssertionError("the text must never be read for special tokens")
        return {"input_ids": ids + ([self.EOT] if add_special_tokens else [])}


def test_the_tokenizers_own_framing_is_kept():
    tok = FramingTokenizer()
    assert tokenizer_framing(tok) == ((), (FramingTokenizer.EOT,))
    assert text_ids(tok, "hi <eot>") == [ord(c) % 90 for c in "hi <eot>"] + [FramingTokenizer.EOT]


# -- the engine ------------------------------------------------------------------------------------------
def engine_on(models_dir: Path, runtime: Any = None, **config: Any) -> tuple[RKLLMInferenceEngine, Any]:
    runtime = runtime or RecordingRuntime(SimRuntime(SimTiming.instant()))
    return RKLLMInferenceEngine(config=Config(backend="sim", models_dir=models_dir, **config), runtime=runtime), runtime


def expected(ids: list[int], width: int, method: str = "last") -> np.ndarray:
    rows = embedding_rows(tuple(ids), width)
    return normalize(pool(rows, method))


async def test_engine_embeds_texts_and_token_lists(demo_models_dir, demo_tokenizer):
    engine, runtime = engine_on(demo_models_dir)
    spec = engine.model_for(DEMO_ID).spec
    width = hidden_size(spec)
    texts = ["Hello NPU", "日本語 <|im_end|> 🤖"]
    given = [151644, 9707, 198]
    result = await engine.embed(DEMO_ID, [*texts, given])
    assert isinstance(result, EmbeddingResult) and result.width == width and len(result.vectors) == 3
    ids = [text_ids(demo_tokenizer, t) for t in texts] + [given]
    assert [e.token_ids for e in runtime.inner.embeds] == [tuple(i) for i in ids]
    assert result.prompt_tokens == sum(len(i) for i in ids)
    for vector, i in zip(result.vectors, ids):
        assert np.allclose(vector, expected(i, width), atol=1e-6)
        assert np.isclose(np.linalg.norm(vector), 1.0)
    assert not np.allclose(result.vectors[0], result.vectors[1])
    await engine.shutdown()


async def test_the_modelfile_chooses_mean_pooling(tmp_path, demo_model_dir, demo_tokenizer):
    folder = tmp_path / demo_model_dir.name
    shutil.copytree(demo_model_dir, folder)
    with (folder / "Modelfile").open("a") as f:
        f.write('EMBEDDING_POOLING="mean"\n')
    engine, runtime = engine_on(tmp_path)
    model_id = engine.catalog.servable()[0].model_id
    result = await engine.embed(model_id, ["mean of the rows"])
    ids = text_ids(demo_tokenizer, "mean of the rows")
    width = hidden_size(engine.model_for(model_id).spec)
    assert np.allclose(result.vectors[0], expected(ids, width, "mean"), atol=1e-6)
    assert not np.allclose(result.vectors[0], expected(ids, width, "last"), atol=1e-3)
    await engine.shutdown()


@pytest.mark.parametrize("inputs", [[], "one string", [""], [[]], [[1, True]], [[1, 2.5]], [[-1]], [[151643 + 10_000]],
                                    [b"bytes"], [None], [{"text": "x"}]])
async def test_malformed_inputs_are_value_errors(demo_models_dir, inputs):
    engine, runtime = engine_on(demo_models_dir)
    with pytest.raises(ValueError):
        await engine.embed(DEMO_ID, inputs)
    assert runtime.inner.embeds == [], "nothing reaches the NPU"
    await engine.shutdown()


async def test_an_unsupported_runtime_and_a_too_long_input_are_reported(demo_models_dir):
    engine, runtime = engine_on(demo_models_dir, RecordingRuntime(SimRuntime(SimTiming.instant(), embeddings=False)))
    with pytest.raises(EmbeddingUnsupported) as err:
        await engine.embed(DEMO_ID, ["x"])
    assert err.value.http_status == 400
    await engine.shutdown()
    engine, runtime = engine_on(demo_models_dir, max_context=32)
    with pytest.raises(ContextOverflow):
        await engine.embed(DEMO_ID, ["short", "long " * 40])
    assert runtime.inner.embeds == []
    ok = await engine.embed(DEMO_ID, ["short"])
    assert len(ok.vectors) == 1
    await engine.shutdown()


# -- the scheduler: one queue, one NPU -------------------------------------------------------------------
class Journal(RecordingRuntime):
    """Writes down, in order, every generation start and end and every embedding the NPU is asked for;
    an embedding whose request id is in `fail` raises as the runtime would."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.log: list[tuple[str, str]] = []
        self.fail: set[str] = set()

    async def generate(self, inp: GenerationInput) -> AsyncIterator[RuntimeEvent]:
        self.log.append(("run", inp.request_id))
        try:
            async for event in super().generate(inp):
                yield event
        finally:
            self.log.append(("end", inp.request_id))

    async def embed(self, inp: EmbeddingInput) -> EmbeddingOutput:
        self.log.append(("embed", inp.request_id))
        if inp.request_id in self.fail:
            raise GenerationError("the runtime reported an error in last-hidden-layer mode")
        return await self.inner.embed(inp)


@pytest.fixture
def npu(demo_models_dir: Path, demo_spec: Any, demo_tokenizer: Any):
    class NPU:
        runtime = Journal(SimRuntime(PACED))
        scheduler = Scheduler(runtime, Config(backend="sim", models_dir=demo_models_dir))
        spec = demo_spec
        stops = stop_token_ids(demo_tokenizer)

        def prompt(self, text: str) -> list[int]:
            templated = demo_tokenizer.apply_chat_template(user(text), tokenize=False, add_generation_prompt=True)
            return demo_tokenizer.encode(templated)

        def submit(self, rid: str, text: str, priority: Priority = FG) -> asyncio.Task[list[int]]:
            stream = self.scheduler.submit(rid, self.spec, self.prompt(text), stop_ids=self.stops, priority=priority)
            return asyncio.create_task(read_all(stream))

        def embed(self, rid: str, texts: list[str], priority: Priority = FG) -> asyncio.Task[Any]:
            inputs = [EmbeddingInput(f"{rid}-{i}", tuple(text_ids(demo_tokenizer, t))) for i, t in enumerate(texts)]
            return asyncio.create_task(self.scheduler.embed(self.spec, inputs, priority))

        def ran(self) -> list[str]:
            return [what + ":" + rid for what, rid in self.runtime.log]

    yield NPU()


async def test_an_embedding_waits_for_the_running_generation(npu):
    chat = npu.submit("chat", "hold the NPU [[sim:tokens=30]]")
    await until(lambda: len(npu.runtime.tokens["chat"]) >= 3)
    emb = npu.embed("emb", ["one", "two"])
    tokens = await asyncio.wait_for(chat, HANG_S)
    outputs = await asyncio.wait_for(emb, HANG_S)
    assert len(tokens) == 30 and len(outputs) == 2
    assert npu.ran() == ["run:chat", "end:chat", "embed:emb-0", "embed:emb-1"], "never beside a generation"
    assert npu.runtime.aborts == 0, "an interactive embedding does not pause an interactive answer"
    await npu.scheduler.close()


async def test_an_interactive_embedding_runs_before_queued_background_work(npu):
    blocker = npu.submit("blocker", "hold the NPU [[sim:tokens=20]]")
    await until(lambda: len(npu.runtime.tokens["blocker"]) >= 2)
    bg = npu.submit("bg", "a title [[sim:tokens=5]]", BG)
    bg_emb = npu.embed("bgemb", ["index me"], BG)
    emb = npu.embed("emb", ["search query"])
    await asyncio.wait_for(asyncio.gather(blocker, bg, bg_emb, emb), HANG_S)
    assert npu.ran() == ["run:blocker", "end:blocker", "embed:emb-0", "run:bg", "end:bg", "embed:bgemb-0"]
    await npu.scheduler.close()


async def test_an_interactive_embedding_pauses_a_background_answer_which_then_resumes(npu, demo_models_dir):
    alone = Journal(SimRuntime(SimTiming.instant()))
    solo = Scheduler(alone, Config(backend="sim", models_dir=demo_models_dir))
    stream = solo.submit("bg", npu.spec, npu.prompt("a summary [[sim:tokens=40]]"), stop_ids=npu.stops)
    uninterrupted = await asyncio.wait_for(read_all(stream), HANG_S)
    await solo.close()
    bg = npu.submit("bg", "a summary [[sim:tokens=40]]", BG)
    await until(lambda: len(npu.runtime.tokens["bg"]) >= 5)
    outputs = await asyncio.wait_for(npu.embed("emb", ["urgent"]), HANG_S)
    assert await asyncio.wait_for(bg, HANG_S) == uninterrupted
    assert len(outputs) == 1
    assert npu.ran() == ["run:bg", "end:bg", "embed:emb-0", "run:bg", "end:bg"]
    await npu.scheduler.close()


async def test_a_background_batch_gives_way_between_inputs(npu, demo_tokenizer):
    slow = SimTiming(0.0, prefill_base_ms=20.0, prefill_ms_per_token=0.0, decode_ms_per_token=1.0)
    npu.runtime.inner.timing = slow
    texts = [f"document {i}" for i in range(6)]
    batch = npu.embed("batch", texts, BG)
    await until(lambda: len(npu.runtime.inner.embeds) >= 2)
    chat = npu.submit("chat", "question [[sim:tokens=3]]")
    outputs = await asyncio.wait_for(batch, HANG_S)
    await asyncio.wait_for(chat, HANG_S)
    order = npu.ran()
    assert order.index("run:chat") < order.index("embed:batch-5"), "the interactive chat did not wait for the batch"
    assert [o for o in order if o.startswith("embed")] == [f"embed:batch-{i}" for i in range(6)]
    width = hidden_size(npu.spec)
    for output, text in zip(outputs, texts):  # in order, none lost or repeated across the pause
        assert np.allclose(output.hidden, embedding_rows(tuple(text_ids(demo_tokenizer, text)), width))
    await npu.scheduler.close()


async def test_after_an_embedding_the_next_chat_prefills_its_whole_prompt(npu, demo_tokenizer):
    first = await asyncio.wait_for(npu.submit("t1", "turn one [[sim:tokens=6]]"), HANG_S)
    assert npu.scheduler.kv_tokens, "the cache is known after a clean run"
    await asyncio.wait_for(npu.embed("emb", ["something else entirely"]), HANG_S)
    assert npu.scheduler.kv_tokens is None, "an embedding leaves the cache unknown"
    convo = user("turn one [[sim:tokens=6]]") + [{"role": "assistant", "content": demo_tokenizer.decode(first)},
                                                 {"role": "user", "content": "turn two [[sim:tokens=3]]"}]
    full = demo_tokenizer.encode(demo_tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True))
    stream = npu.scheduler.submit("t2", npu.spec, full, stop_ids=npu.stops)
    await asyncio.wait_for(read_all(stream), HANG_S)
    run = npu.runtime.inner.runs[-1]
    assert run.kv_before == 0 and run.prefilled == tuple(full), "the whole prompt, on a cleared cache"
    await npu.scheduler.close()


async def test_an_embedding_error_reaches_its_caller_only(npu):
    npu.runtime.fail.add("bad-1")
    chat = npu.submit("chat", "hold the NPU [[sim:tokens=10]]")
    await until(lambda: len(npu.runtime.tokens["chat"]) >= 1)
    bad = npu.embed("bad", ["fine", "fails", "never run"])
    after = npu.submit("after", "next [[sim:tokens=4]]")
    good = npu.embed("good", ["fine too"])
    with pytest.raises(GenerationError, match="last-hidden-layer"):
        await asyncio.wait_for(bad, HANG_S)
    assert len(await asyncio.wait_for(chat, HANG_S)) == 10
    assert len(await asyncio.wait_for(after, HANG_S)) == 4
    assert len(await asyncio.wait_for(good, HANG_S)) == 1
    assert "embed:bad-2" not in npu.ran()
    await npu.scheduler.close()


async def test_a_cancelled_embedding_is_dropped_and_shutdown_fails_waiting_ones(npu):
    chat = npu.submit("chat", "hold the NPU [[sim:tokens=20]]")
    await until(lambda: len(npu.runtime.tokens["chat"]) >= 1)
    gone = npu.embed("gone", ["nobody waits"])
    waiting = npu.embed("waiting", ["still waiting"])
    await until(lambda: npu.scheduler.queued == 2)
    gone.cancel()
    await asyncio.wait_for(chat, HANG_S)
    await asyncio.wait_for(waiting, HANG_S)
    assert "embed:gone-0" not in npu.ran() and "embed:waiting-0" in npu.ran()
    blocker = npu.submit("blocker", "hold it again [[sim:tokens=200]]")
    await until(lambda: len(npu.runtime.tokens["blocker"]) >= 1)
    last = npu.embed("last", ["too late"])
    await until(lambda: npu.scheduler.queued == 1)
    assert npu.scheduler.busy
    await npu.scheduler.close()
    with pytest.raises(ShuttingDown):
        await asyncio.wait_for(last, HANG_S)
    blocker.cancel()


async def test_embeddings_count_against_the_queue_bound(demo_models_dir, demo_spec, demo_tokenizer):
    runtime = Journal(SimRuntime(PACED))
    scheduler = Scheduler(runtime, Config(backend="sim", models_dir=demo_models_dir, max_queue=1))
    prompt = demo_tokenizer.encode("hold [[sim:tokens=50]]")
    reader = asyncio.create_task(read_all(scheduler.submit("chat", demo_spec, prompt)))
    await until(lambda: len(runtime.tokens["chat"]) >= 1)
    waiting = asyncio.create_task(scheduler.embed(demo_spec, [EmbeddingInput("e-0", (1, 2, 3))]))
    await until(lambda: scheduler.queued == 1)
    with pytest.raises(QueueFull):
        await scheduler.embed(demo_spec, [EmbeddingInput("f-0", (1, 2, 3))])
    await asyncio.wait_for(asyncio.gather(reader, waiting), HANG_S)
    await scheduler.close()
