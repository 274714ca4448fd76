"""The exo path on the native backend and the fake runtime library: the engine driven as exo's
node drives it (tests/exo_driver.py), with the runtime in its worker process; and, where legacy
exo is installed, a real `python -m exo.main --inference-engine rkllm` on the fake library."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from exo_rkllm.models.catalog import Catalog
from exo_rkllm.config import Config
from exo_rkllm.engine.inference_engine import RKLLMInferenceEngine
from exo_rkllm.errors import GenerationError
from exo_rkllm.runtime.native import create
from exo_driver import ExoRing
from fake_rkllm import write_fake_model_folder
from fake_rkllm.fixtures import *  # noqa: F401,F403
from native_support import MULTIBYTE, trace
from support import RecordingRuntime, user
from real_exo import requires_exo

SECOND = "Second answer: 二つ目の答え ✨ ok."
LAYERS = 28  # the demo folder's config.json


def models_with_fake(root: Path, demo_model_dir: Path, tok: Any, answers=(MULTIBYTE,), copy: bool = False,
                     **settings: Any) -> Path:
    models = root / "models"
    crash_id = tok.encode(" CRASH")[0]
    settings = {"toolkit_version": "1.2.3", "trace": str(root / "trace.txt"), "crash_at": 5,
                "crash_if_input_has": crash_id, **settings}
    write_fake_model_folder(models, "Qwen2.5-Fake-Native", demo_model_dir, tok, answers, copy_tokenizer=copy,
                            **settings)
    return models


def native_engine(models: Path, lib: Path, tokenizer_dir: Path,
                  **config: Any) -> tuple[RKLLMInferenceEngine, RecordingRuntime, str]:
    # The tokenizer comes from the demo folder through RKLLM_TOKENIZER_DIR: loaded once per session.
    cfg = Config(backend="native", models_dir=models, lib_path=lib, tokenizer_dir=tokenizer_dir, **config)
    runtime = RecordingRuntime(create(cfg))
    model_id = Catalog(cfg).servable()[0].model_id
    return RKLLMInferenceEngine(config=cfg, runtime=runtime), runtime, model_id


@pytest.mark.parametrize("isolation", [True, False])
async def test_exo_driver_streams_the_runtime_text_byte_exact(fake_lib, tmp_path, demo_model_dir, demo_tokenizer,
                                                              isolation) -> None:
    models = models_with_fake(tmp_path, demo_model_dir, demo_tokenizer, decode_ms=2)
    engine, runtime, model_id = native_engine(models, fake_lib("1.2.3"), demo_model_dir, native_isolation=isolation)
    ring = ExoRing([engine])
    try:
        answer = await ring.complete(model_id, user("Tell me something"), LAYERS)
        rid = answer.request_id
        assert runtime.texts[rid] == MULTIBYTE
        assert answer.streamed_text == MULTIBYTE
        assert demo_tokenizer.decode(answer.tokens, skip_special_tokens=True) == MULTIBYTE
        assert answer.tokens[:-1] == runtime.tokens[rid] == demo_tokenizer.encode(MULTIBYTE)
        assert answer.finish_reason == "stop" and answer.tokens[-1] == demo_tokenizer.eos_token_id
        assert "\ufffd" not in "".join(answer.chunks)
        assert not ring.errors
    finally:
        await engine.shutdown()
    assert trace(tmp_path)[-1] == "destroy"


async def test_follow_up_turn_reuses_the_npu_kv_cache(fake_lib, tmp_path, demo_model_dir, demo_tokenizer) -> None:
    models = models_with_fake(tmp_path, demo_model_dir, demo_tokenizer, answers=(MULTIBYTE, SECOND))
    engine, runtime, model_id = native_engine(models, fake_lib("1.2.3"), demo_model_dir)
    ring = ExoRing([engine])
    try:
        first = await ring.complete(model_id, user("first turn"), LAYERS)
        convo = user("first turn") + [{"role": "assistant", "content": first.streamed_text},
                                      {"role": "user", "content": "second turn"}]
        second = await ring.complete(model_id, convo, LAYERS)
        assert second.streamed_text in (MULTIBYTE, SECOND)
        assert second.streamed_text == runtime.texts[second.request_id]
        full = demo_tokenizer.encode(demo_tokenizer.apply_chat_template(convo, tokenize=False,
                                                                        add_generation_prompt=True))
        inp = runtime.inputs[-1]
        assert inp.keep_history and 0 < len(inp.token_ids) < 20 < len(full)
        runs = [line for line in trace(tmp_path) if line.startswith("run")]
        assert runs[-1] == f"run keep=1 n={len(inp.token_ids)} kv_before={len(full) - len(inp.token_ids)}"
    finally:
        await engine.shutdown()


async def test_crash_on_the_fifth_token_through_exo(fake_lib, tmp_path, demo_model_dir, demo_tokenizer) -> None:
    models = models_with_fake(tmp_path, demo_model_dir, demo_tokenizer, decode_ms=2)
    engine, runtime, model_id = native_engine(models, fake_lib("1.2.3"), demo_model_dir)
    failures: list[tuple[str, BaseException]] = []
    engine.add_end_listener(lambda rid, ending: failures.append((rid, ending.error)))
    ring = ExoRing([engine])
    try:
        crashed = await ring.complete(model_id, user("please CRASH now"), LAYERS)
        assert len(crashed.tokens) == 5 and crashed.tokens[-1] == demo_tokenizer.eos_token_id  # 4 + end
        assert failures and isinstance(failures[0][1], GenerationError)
        assert "SIGSEGV" in str(failures[0][1]) and "restarted" in str(failures[0][1])
        ok = await ring.complete(model_id, user("a normal question"), LAYERS)
        assert ok.finish_reason == "stop" and ok.streamed_text == MULTIBYTE
        assert runtime.inner.restarts == 1
        assert [line.split()[0] for line in trace(tmp_path)].count("init") == 2  # reloaded once, not twice
    finally:
        await engine.shutdown()


async def test_exo_ending_or_abandoning_a_request_stops_the_npu(fake_lib, tmp_path, demo_model_dir,
                                                                demo_tokenizer) -> None:
    models = models_with_fake(tmp_path, demo_model_dir, demo_tokenizer, answers=(MULTIBYTE * 6,), decode_ms=100)
    engine, runtime, model_id = native_engine(models, fake_lib("1.2.3"), demo_model_dir)
    ring = ExoRing([engine], max_generate_tokens=3)
    try:
        short = await ring.complete(model_id, user("long please"), LAYERS)
        assert short.finish_reason == "length" and len(short.tokens) == 3
        first = await ring.chat(model_id, user("to abandon"), LAYERS)
        await asyncio.sleep(0.15)
        left = time.monotonic()
        ring.abandon(first.request_id)
        for _ in range(100):
            if not runtime.inner.is_running():
                break
            await asyncio.sleep(0.01)
        assert time.monotonic() - left < 1.0 and not runtime.inner.is_running()
        ends = [line for line in trace(tmp_path) if line.startswith("end")]
        assert len(ends) == 2 and all("aborted=1" in line for line in ends)
        await ring.drain()
        assert engine.active_requests() == []
    finally:
        await engine.shutdown()


# -- a real exo on the fake library ------------------------------------------------------------------------
@pytest.mark.real_exo
@requires_exo
async def test_real_exo_on_the_fake_library(fake_lib, tmp_path, demo_model_dir, demo_tokenizer) -> None:
    from real_exo import EXO_PYTHON as python, start_exo, stream_chat

    aiohttp = pytest.importorskip("aiohttp")
    models = models_with_fake(tmp_path, demo_model_dir, demo_tokenizer, copy=True, decode_ms=5)
    model_id = Catalog(Config(models_dir=models)).servable()[0].model_id
    exo = start_exo(python, tmp_path, models, {"RKLLM_BACKEND": "native", "RKLLM_LIB_PATH": str(fake_lib("1.2.3"))})

    try:
        async with aiohttp.ClientSession() as s:
            ok = await stream_chat(s, exo.api, user("hello"), model=model_id)
            assert (ok.text, ok.finish) == (MULTIBYTE, "stop")
            crashed = await stream_chat(s, exo.api, user("please CRASH now"), model=model_id)
            # the text so far, then the error chunk and [DONE] (checked by the reader), no finish_reason
            assert crashed.text and crashed.finish is None and "SIGSEGV" in crashed.error["message"]
            ok = await stream_chat(s, exo.api, user("and now?"), model=model_id)
            assert (ok.text, ok.finish) == (MULTIBYTE, "stop")
        assert exo.proc.poll() is None, "exo must survive a crash of the runtime"
    finally:
        exo.stop()
    log = exo.log_text()
    assert "running in worker process" in log and "killed by SIGSEGV" in log
