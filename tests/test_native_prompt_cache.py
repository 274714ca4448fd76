"""Prompt-cache files in the native backend, in-process (NativeRuntime) and in the crash-isolation worker
(IsolatedRuntime), against the fake runtime: which releases offer them, what a saved file holds (the state
after the run's prefill, never the answer), a restore the next run continues from, files the runtime
refuses (with its reason), the release of a loaded cache on clear and unload, a worker that dies while
saving, and an abort before the prefill is done."""
from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from exo_rkllm.errors import GenerationError, PromptCacheError
from exo_rkllm.runtime.base import FinishKind, GenerationInput, Runtime, TokenEvent
from fake_rkllm.fixtures import *  # noqa: F401,F403
from native_support import MULTIBYTE, VERSIONS, fake_model, prompt_ids, run, spec_for, text_of, trace
from test_native_backend import native
from test_native_isolation import isolated

KINDS = ["native", "isolated"]
CACHING = ["1.2.3", "1.3.0"]  # the 1.2.1 layout (1.2.1-1.2.3) and 1.3.0: rkllm_get_kv_cache_size


def runtime(fake_lib, kind: str, version: str):
    rt = native(fake_lib, version) if kind == "native" else isolated(fake_lib, version)
    assert isinstance(rt, Runtime)
    return rt


def next_turn(tok, text: str) -> list[int]:
    """A follow-up user turn after an answer that ended on EOS (which the runtime never feeds)."""
    return tok.encode(f"<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")


def saved_ids(path: Path) -> list[int]:
    """The token ids a fake prompt-cache file holds (its `ids=` line)."""
    line = next(ln for ln in path.read_text().splitlines() if ln.startswith("ids="))
    return [int(i) for i in line[4:].split(",")]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("version", VERSIONS)
async def test_only_releases_that_report_the_kv_cache_size_offer_prompt_caches(
        fake_lib, tmp_path, demo_tokenizer, demo_model_dir, kind, version) -> None:
    rt = runtime(fake_lib, kind, version)
    offered = version in CACHING
    assert rt.capabilities.prompt_cache is offered
    if offered:
        await rt.close()
        return
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, version), demo_model_dir))
    path = tmp_path / "state.cache"
    tokens, _ = await run(rt, prompt_ids(demo_tokenizer, "hi"), keep_history=True, save_prompt_cache=str(path))
    assert text_of(tokens) == MULTIBYTE
    assert not path.exists() and not any(line.startswith("prompt_cache") for line in trace(tmp_path))  # ignored
    with pytest.raises(PromptCacheError, match=f"runtime {version} cannot report what a loaded prompt cache holds"):
        await rt.load_prompt_cache(str(path))
    await rt.close()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("version", CACHING)
async def test_a_saved_state_is_restored_and_the_next_run_prefills_only_its_suffix(
        fake_lib, tmp_path, demo_tokenizer, demo_model_dir, kind, version) -> None:
    rt = runtime(fake_lib, kind, version)
    spec = spec_for(fake_model(tmp_path, demo_tokenizer, version, ["one two three four five"]), demo_model_dir)
    await rt.load(spec)
    ids = prompt_ids(demo_tokenizer, "count")
    first, _ = await run(rt, ids, keep_history=True)
    more = next_turn(demo_tokenizer, "more")
    path = tmp_path / "state.cache"
    second, finish = await run(rt, more, keep_history=True, save_prompt_cache=str(path))
    assert finish.kind is FinishKind.STOP and text_of(second) == "one two three four five"
    # the history and this run's input, never its answer (which the KV cache itself does hold)
    held = ids + [t.token_id for t in first] + more
    assert saved_ids(path) == held and f"prompt_cache save n={len(held)}" in trace(tmp_path)
    assert rt.kv_cache_len() == len(held) + len(second)

    await rt.clear_kv_cache()
    assert rt.kv_cache_len() == 0
    await rt.load_prompt_cache(str(path))
    assert rt.kv_cache_len() == len(held)
    suffix = next_turn(demo_tokenizer, "again")
    await run(rt, suffix, keep_history=True)
    lines = trace(tmp_path)
    at = lines.index(f"prompt_cache load n={len(held)}")
    runs = [line for line in lines[at:] if line.startswith("run ")]
    assert runs == [f"run keep=1 n={len(suffix)} kv_before={len(held)}"]  # only the suffix is prefilled

    # the loaded cache is released once, before the clear that follows it; not again by the unload
    await rt.clear_kv_cache()
    await rt.clear_kv_cache()
    await rt.unload()
    tail = trace(tmp_path)[at:]
    assert tail.count("prompt_cache release") == 1
    assert tail[tail.index("prompt_cache release") + 1] == "clear keep_system_prompt=0 kv=0"
    # a cache still loaded at unload is released before rkllm_destroy
    await rt.load(spec)
    await rt.load_prompt_cache(str(path))
    assert rt.kv_cache_len() == len(held)
    await rt.unload()
    assert trace(tmp_path)[-2:] == ["prompt_cache release", "destroy"]
    await rt.close()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("version", CACHING)
async def test_files_the_runtime_refuses_raise_with_its_reason_and_the_runtime_carries_on(
        fake_lib, tmp_path, demo_tokenizer, demo_model_dir, kind, version) -> None:
    rt = runtime(fake_lib, kind, version)
    with pytest.raises(PromptCacheError, match="no model is loaded"):
        await rt.load_prompt_cache(str(tmp_path / "any.cache"))
    ids = prompt_ids(demo_tokenizer, "remember this")
    other = fake_model(tmp_path / "other", demo_tokenizer, version, ["another model's answer"])
    await rt.load(spec_for(other, demo_model_dir))
    foreign = tmp_path / "foreign.cache"
    await run(rt, ids, keep_history=True, save_prompt_cache=str(foreign))
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, version), demo_model_dir))
    good = tmp_path / "good.cache"
    await run(rt, ids, keep_history=True, save_prompt_cache=str(good))
    text = good.read_text()

    corrupt = tmp_path / "corrupt.cache"
    numbers = saved_ids(good)
    numbers[1] ^= 0x5  # another id, the same count: only the checksum can tell
    corrupt.write_text(text.replace("ids=" + ",".join(map(str, saved_ids(good))),
                                    "ids=" + ",".join(map(str, numbers))))
    truncated = tmp_path / "truncated.cache"
    truncated.write_bytes(good.read_bytes()[: len(text) // 2])
    missing = tmp_path / "missing.cache"
    for path, why in ((corrupt, "checksum mismatch"), (truncated, "truncated or corrupt"),
                      (missing, "failed to open prompt cache .*No such file"), (foreign, "saved with another model")):
        with pytest.raises(PromptCacheError) as err:
            await rt.load_prompt_cache(str(path))
        message = str(err.value)
        assert message.startswith(f"the runtime refused the prompt cache {path}: "), message
        assert re.search(why, message), message
        tokens, finish = await run(rt, ids)  # the runtime keeps working
        assert text_of(tokens) == MULTIBYTE and finish.kind is FinishKind.STOP
    await rt.clear_kv_cache()
    await rt.load_prompt_cache(str(good))  # the good file still loads
    assert rt.kv_cache_len() == len(ids)
    await rt.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_load_while_a_generation_runs_is_refused_and_the_run_goes_on(
        fake_lib, tmp_path, demo_tokenizer, demo_model_dir, kind) -> None:
    rt = runtime(fake_lib, kind, "1.2.3")
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.3", [MULTIBYTE * 2], decode_ms=10),
                           demo_model_dir))
    ids = prompt_ids(demo_tokenizer, "save me")
    path = tmp_path / "state.cache"
    await run(rt, ids, keep_history=True, save_prompt_cache=str(path))
    assert path.is_file()
    tokens: list[TokenEvent] = []
    finish = None
    async for event in rt.generate(GenerationInput("r", tuple(ids))):
        if isinstance(event, TokenEvent):
            tokens.append(event)
            if len(tokens) == 2:
                with pytest.raises(PromptCacheError, match="while a run is in progress"):
                    await rt.load_prompt_cache(str(path))
        else:
            finish = event
    assert text_of(tokens) == MULTIBYTE * 2 and finish is not None and finish.kind is FinishKind.STOP
    assert not any(line.startswith("prompt_cache load") for line in trace(tmp_path))
    await rt.close()


async def test_a_worker_dying_while_saving_leaves_no_file_that_loads(fake_lib, tmp_path, demo_tokenizer,
                                                                     demo_model_dir) -> None:
    rt = isolated(fake_lib, "1.2.3")
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.3", crash_in_save=1), demo_model_dir))
    first_pid = rt.worker_pid
    ids = prompt_ids(demo_tokenizer, "save and die")
    path = tmp_path / "state.cache"
    with pytest.raises(GenerationError, match="crashed.*SIGKILL.*restarted"):
        await run(rt, ids, keep_history=True, save_prompt_cache=str(path))
    assert any(line.startswith("prompt_cache save crash") for line in trace(tmp_path))
    leftovers = sorted(tmp_path.glob("state.cache.tmp*"))
    assert path.is_file() and leftovers  # half a file at the path (written in place) and under the temporary name
    tokens, finish = await run(rt, ids)  # the worker is back, the model reloaded
    assert text_of(tokens) == MULTIBYTE and finish.kind is FinishKind.STOP
    assert rt.worker_pid != first_pid and rt.restarts == 1
    for half in (path, *leftovers):
        with pytest.raises(PromptCacheError, match="invalid prompt cache .*truncated or corrupt"):
            await rt.load_prompt_cache(str(half))
    tokens, _ = await run(rt, ids)
    assert text_of(tokens) == MULTIBYTE
    await rt.close()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("version", CACHING)
async def test_an_abort_before_the_prefill_is_done_saves_nothing(fake_lib, tmp_path, demo_tokenizer, demo_model_dir,
                                                                 kind, version) -> None:
    rt = runtime(fake_lib, kind, version)
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, version, prefill_base_ms=3000), demo_model_dir))
    path = tmp_path / "state.cache"

    async def stop_soon() -> None:
        await asyncio.sleep(0.2)
        await rt.abort()

    started = time.monotonic()
    task = asyncio.create_task(stop_soon())
    tokens, finish = await run(rt, prompt_ids(demo_tokenizer, "go"), keep_history=True, save_prompt_cache=str(path))
    await task
    assert finish.aborted and tokens == [] and time.monotonic() - started < 1.5  # well before the prefill's end
    lines = trace(tmp_path)
    assert any(line.startswith("run keep=1") for line in lines)  # the abort came during the prefill
    assert not path.exists() and not list(tmp_path.glob("state.cache*"))
    assert not any(line.startswith("prompt_cache save") for line in lines)
    await rt.close()
