"""The native backend in-process (RKLLM_NATIVE_ISOLATION=0) against the fake runtime of every
supported layout: byte-exact streaming with WAITING, KV cache under the scheduler's control, abort,
errors, model checks, settings, perf figures."""
from __future__ import annotations

import asyncio
import time

import pytest

from exo_rkllm.config import Config
from exo_rkllm.errors import GenerationError, ModelLoadError
from exo_rkllm.runtime.base import CallState, FinishKind, GenerationInput, Runtime, TokenEvent
from exo_rkllm.runtime.native import create
from exo_rkllm.runtime.native.backend import NativeRuntime, Utf8Joiner
from fake_rkllm.fixtures import *  # noqa: F401,F403
from native_support import MULTIBYTE, VERSIONS, fake_model, prompt_ids, run, spec_for, text_of, trace


def native(fake_lib, version: str, **config) -> NativeRuntime:
    runtime = create(Config(lib_path=fake_lib(version), native_isolation=False, **config))
    assert isinstance(runtime, NativeRuntime) and isinstance(runtime, Runtime)
    return runtime


@pytest.mark.parametrize("version", VERSIONS)
async def test_capabilities_follow_the_release(fake_lib, version) -> None:
    caps = native(fake_lib, version).capabilities
    assert caps.backend == "native" and caps.version == version and caps.token_input
    assert caps.keep_history == caps.clear_kv_cache == (version != "1.1.4")
    assert caps.per_run_sampling == caps.per_run_max_new_tokens == (version == "1.3.0")


@pytest.mark.parametrize("version", VERSIONS)
async def test_streams_the_runtime_tokens_byte_exact_with_waiting(fake_lib, tmp_path, demo_tokenizer,
                                                                  demo_model_dir, version) -> None:
    rt = native(fake_lib, version)
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, version), demo_model_dir))
    ids = prompt_ids(demo_tokenizer, "say something")
    tokens, finish = await run(rt, ids, keep_history=True)
    assert text_of(tokens) == MULTIBYTE
    assert [t.token_id for t in tokens] == demo_tokenizer.encode(MULTIBYTE)
    assert demo_tokenizer.decode([t.token_id for t in tokens]) == MULTIBYTE
    assert CallState.WAITING in [t.state for t in tokens]
    assert all(t.text == "" for t in tokens if t.state is CallState.WAITING)
    assert finish.kind is FinishKind.STOP and finish.stats.decode_tokens == len(tokens)  # the model's own end
    assert finish.stats.prefill_tokens == len(ids)
    lines = trace(tmp_path)
    assert lines[0].startswith(f"init version={version}")
    assert lines[1].startswith("sampling from=init top_k=7 top_p=0.500 temp=0.300 ")  # the model's, as loaded
    assert lines[2] == f"run keep={0 if version == '1.1.4' else 1} n={len(ids)} kv_before=0"
    await rt.close()
    assert trace(tmp_path)[-1] == "destroy"


@pytest.mark.parametrize("style", ["empty", "partial", "restate"])
async def test_every_waiting_style_gives_the_same_bytes_once(fake_lib, tmp_path, demo_tokenizer, demo_model_dir,
                                                             style) -> None:
    text = MULTIBYTE + " 🦀🦜🧬 ꙮ 𓀀 鿰 龘靐齉"
    rt = native(fake_lib, "1.2.3")
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.3", [text], waiting_style=style),
                           demo_model_dir))
    tokens, _ = await run(rt, prompt_ids(demo_tokenizer, "hi"))
    assert text_of(tokens) == text
    assert [t.token_id for t in tokens] == demo_tokenizer.encode(text)
    assert "\ufffd" not in text_of(tokens)
    await rt.close()


def test_utf8_joiner_rules() -> None:
    emoji = "🤖".encode()
    j = Utf8Joiner()  # partial bytes, continued
    assert [j.feed(emoji[:1]), j.feed(emoji[1:3]), j.feed(emoji[3:] + b"a")] == ["", "", "🤖a"]
    j = Utf8Joiner()  # partial bytes restated until whole
    assert [j.feed(emoji[:2]), j.feed(emoji[:3]), j.feed(emoji + b"!")] == ["", "", "🤖!"]
    j = Utf8Joiner()  # nothing while waiting, the character whole afterwards
    assert [j.feed(b""), j.feed(emoji)] == ["", "🤖"]
    j = Utf8Joiner()
    assert j.feed(b"x" + emoji[:1]) == "x" and j.flush() == "\ufffd"


@pytest.mark.parametrize("version", ["1.2.3", "1.3.0"])
async def test_kv_cache_follows_the_runtime_rules(fake_lib, tmp_path, demo_tokenizer, demo_model_dir,
                                                  version) -> None:
    rt = native(fake_lib, version)
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, version, ["one two three four five"]),
                           demo_model_dir))
    assert rt.kv_cache_len() == 0
    ids = prompt_ids(demo_tokenizer, "count")
    tokens, _ = await run(rt, ids, keep_history=True)
    assert rt.kv_cache_len() == len(ids) + len(tokens)  # ended on EOS: every emitted token was fed
    more = demo_tokenizer.encode("<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n")
    again, _ = await run(rt, more, keep_history=True)
    assert rt.kv_cache_len() == len(ids) + len(tokens) + len(more) + len(again)
    assert trace(tmp_path)[-2] == f"run keep=1 n={len(more)} kv_before={len(ids) + len(tokens)}"
    await rt.clear_kv_cache()
    assert rt.kv_cache_len() == 0
    limited, finish = await run(rt, ids, keep_history=True, max_new_tokens=3)
    assert len(limited) == 3
    # a length stop either way, never an abort: on 1.3.0 the runtime's own (last token not fed), before
    # it the backend stopped the runtime itself at the limit
    assert finish.kind is FinishKind.LENGTH and not finish.aborted
    if version == "1.3.0":
        assert rt.kv_cache_len() == len(ids) + 2
    fresh, _ = await run(rt, ids, keep_history=False)
    assert rt.kv_cache_len() == len(ids) + len(fresh)
    await rt.close()


async def test_release_1_2_0_keeps_history_without_reporting_the_cache(fake_lib, tmp_path, demo_tokenizer,
                                                                       demo_model_dir) -> None:
    rt = native(fake_lib, "1.2.0")
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.0", ["short answer"]), demo_model_dir))
    ids = prompt_ids(demo_tokenizer, "a")
    tokens, finish = await run(rt, ids, keep_history=True)
    await run(rt, [13], keep_history=True)
    await rt.clear_kv_cache()
    await run(rt, ids, keep_history=True)
    lines = trace(tmp_path)
    assert f"run keep=1 n=1 kv_before={len(ids) + len(tokens)}" in lines
    assert "clear keep_system_prompt=0 kv=0" in lines
    assert lines[-2] == f"run keep=1 n={len(ids)} kv_before=0"
    assert rt.kv_cache_len() is None  # 1.2.0 has no rkllm_get_kv_cache_size
    assert finish.stats.memory_mb == 0.0  # no perf figures before 1.2.1: measured ones instead
    await rt.close()


async def test_release_1_1_4_runs_without_history(fake_lib, tmp_path, demo_tokenizer, demo_model_dir) -> None:
    rt = native(fake_lib, "1.1.4")
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.1.4"), demo_model_dir))
    ids = prompt_ids(demo_tokenizer, "a")
    await run(rt, ids, keep_history=True)
    await rt.clear_kv_cache()  # nothing to clear; must not call a function 1.1.4 lacks
    await run(rt, ids, keep_history=True)
    assert [line for line in trace(tmp_path) if line.startswith("run")] == [f"run keep=0 n={len(ids)} kv_before=0"] * 2
    assert rt.kv_cache_len() is None
    await rt.close()


async def test_perf_figures_come_from_the_runtime(fake_lib, tmp_path, demo_tokenizer, demo_model_dir) -> None:
    rt = native(fake_lib, "1.2.3")
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.3", prefill_ms=2, decode_ms=2),
                           demo_model_dir))
    ids = prompt_ids(demo_tokenizer, "a")
    tokens, finish = await run(rt, ids)
    stats = finish.stats
    assert stats.prefill_tokens == len(ids) and stats.decode_tokens == len(tokens)
    assert stats.prefill_ms >= 2 * len(ids) * 0.9 and stats.decode_ms > 0
    assert stats.memory_mb > 100  # the fake reports ~100 MB: a figure only the runtime could give
    await rt.close()


async def test_settings_and_modelfile_reach_rkllm_init(fake_lib, tmp_path, demo_tokenizer, demo_model_dir) -> None:
    rt = native(fake_lib, "1.2.3", cpu_mask="4-7")
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.3"), demo_model_dir, max_context_len=2048,
                           max_new_tokens=100, SKIP_SPECIAL_TOKEN="true"))
    assert trace(tmp_path)[0] == ("init version=1.2.3 ctx=2048 max_new=100 top_k=7 top_p=0.500 temp=0.300 "
                                  "skip_special=1 cpus=4 mask=0xf0")
    await rt.close()


@pytest.mark.parametrize("version", ["1.1.4", "1.2.3"])
async def test_abort_stops_the_npu_at_once(fake_lib, tmp_path, demo_tokenizer, demo_model_dir, version) -> None:
    rt = native(fake_lib, version)
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, version, [MULTIBYTE * 4], decode_ms=100,
                                      prefill_ms=5), demo_model_dir))
    seen = 0
    aborted_at = 0.0
    async for event in rt.generate(GenerationInput("r", tuple(prompt_ids(demo_tokenizer, "go")))):
        if isinstance(event, TokenEvent):
            seen += 1
            if seen == 2:
                aborted_at = time.monotonic()
                await rt.abort()
        else:
            assert event.aborted
            assert time.monotonic() - aborted_at < 1.0
    assert 2 <= seen <= 3 and not rt.is_running()
    assert "abort running=1" in trace(tmp_path)
    tokens, _ = await run(rt, prompt_ids(demo_tokenizer, "again"), max_new_tokens=2)  # usable afterwards
    assert text_of(tokens) == MULTIBYTE[:2]
    await rt.close()


@pytest.mark.parametrize("version", VERSIONS)
async def test_is_running_is_read_as_each_release_documents_it(fake_lib, tmp_path, demo_tokenizer, demo_model_dir,
                                                               version) -> None:
    rt = native(fake_lib, version)
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, version, decode_ms=20), demo_model_dir))
    assert rt.session.runtime_is_running() is False
    async for event in rt.generate(GenerationInput("r", tuple(prompt_ids(demo_tokenizer, "go")))):
        if isinstance(event, TokenEvent):
            raw = rt.session.library.rkllm_is_running(rt.session._handle)
            assert raw == (1 if version == "1.3.0" else 0)  # 1.3.0 flipped the documented meaning
            assert rt.session.runtime_is_running() is True
            await rt.abort()
    assert rt.session.runtime_is_running() is False
    await rt.close()


async def test_abort_during_prefill_or_before_the_run_starts(fake_lib, tmp_path, demo_tokenizer,
                                                             demo_model_dir) -> None:
    rt = native(fake_lib, "1.2.3")
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.3", prefill_base_ms=2000), demo_model_dir))
    for delay in (0.0, 0.05):
        async def stop() -> None:
            await asyncio.sleep(delay)
            await rt.abort()

        started = time.monotonic()
        task = asyncio.create_task(stop())
        tokens, finish = await run(rt, prompt_ids(demo_tokenizer, "go"))
        await task
        assert finish.aborted and tokens == [] and time.monotonic() - started < 1.0
    await rt.close()


async def test_consumer_leaving_early_aborts_the_run(fake_lib, tmp_path, demo_tokenizer, demo_model_dir) -> None:
    rt = native(fake_lib, "1.2.3")
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.3", [MULTIBYTE * 4], decode_ms=50),
                           demo_model_dir))
    gen = rt.generate(GenerationInput("r", tuple(prompt_ids(demo_tokenizer, "go"))))
    await gen.__anext__()
    started = time.monotonic()
    await gen.aclose()
    assert time.monotonic() - started < 1.0 and not rt.is_running()
    assert any(line.startswith("end") and "aborted=1" in line for line in trace(tmp_path))
    with pytest.raises(GenerationError, match="busy"):
        await asyncio.gather(run(rt, [1, 2]), run(rt, [1, 2]))
    await rt.close()


@pytest.mark.parametrize("finish_after_abort", [False, True])
async def test_abort_ends_the_same_way_whether_or_not_the_runtime_sends_finish(
        fake_lib, tmp_path, demo_tokenizer, demo_model_dir, finish_after_abort) -> None:
    rt = native(fake_lib, "1.2.3")
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.3", [MULTIBYTE * 4], decode_ms=20,
                                      finish_after_abort=finish_after_abort), demo_model_dir))

    async def stop_soon() -> None:
        await asyncio.sleep(0.05)
        await rt.abort()

    task = asyncio.create_task(stop_soon())
    tokens, finish = await run(rt, prompt_ids(demo_tokenizer, "go"))
    await task
    assert finish.aborted and 0 < len(tokens) < len(demo_tokenizer.encode(MULTIBYTE * 4))
    await rt.close()


async def test_runtime_error_state_fails_the_generation(fake_lib, tmp_path, demo_tokenizer, demo_model_dir) -> None:
    trigger = demo_tokenizer.encode(" FAIL")[0]
    rt = native(fake_lib, "1.2.3")
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.3", error_at=3, error_if_input_has=trigger),
                           demo_model_dir))
    seen: list[TokenEvent] = []
    with pytest.raises(GenerationError, match="reported an error after 2 token"):
        async for event in rt.generate(GenerationInput("r", tuple(prompt_ids(demo_tokenizer, "please FAIL")))):
            seen.append(event)
    assert len(seen) == 2
    tokens, _ = await run(rt, prompt_ids(demo_tokenizer, "fine"))
    assert text_of(tokens) == MULTIBYTE
    await rt.close()


async def test_context_overflow_is_an_error(fake_lib, tmp_path, demo_tokenizer, demo_model_dir) -> None:
    rt = native(fake_lib, "1.2.3")
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.3"), demo_model_dir, max_context_len=8))
    with pytest.raises(GenerationError, match="reported an error"):
        await run(rt, list(range(100, 120)))
    await rt.close()


async def test_eos_reported_by_the_runtime_passes_through(fake_lib, tmp_path, demo_tokenizer, demo_model_dir) -> None:
    rt = native(fake_lib, "1.2.3")
    await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, "1.2.3", emit_eos=True), demo_model_dir))
    tokens, _ = await run(rt, prompt_ids(demo_tokenizer, "a"), keep_history=True)
    assert tokens[-1].token_id == demo_tokenizer.eos_token_id and tokens[-1].text == ""  # skip_special_token
    assert text_of(tokens) == MULTIBYTE
    assert rt.kv_cache_len() == len(prompt_ids(demo_tokenizer, "a")) + len(tokens) - 1  # EOS is never fed
    await rt.close()


async def test_mismatched_model_file_is_reported_with_the_versions(fake_lib, tmp_path, demo_tokenizer,
                                                                   demo_model_dir) -> None:
    rt = native(fake_lib, "1.2.3")
    old = fake_model(tmp_path, demo_tokenizer, "1.1.4", name="old.rkllm")
    with pytest.raises(ModelLoadError) as err:
        await rt.load(spec_for(old, demo_model_dir))
    message = str(err.value)
    assert "invalid model magic" in message and "1.1.4" in message and "1.2.3" in message
    assert "rkllm-toolkit 1.2.3" in message  # what to do
    garbage = tmp_path / "garbage.rkllm"
    garbage.write_bytes(b"\x00\x01not a model at all")
    with pytest.raises(ModelLoadError, match="invalid model magic.*unknown"):
        await rt.load(spec_for(garbage, demo_model_dir))
    with pytest.raises(ModelLoadError, match="not found"):
        await rt.load(spec_for(tmp_path / "missing.rkllm", demo_model_dir))
    assert rt.loaded is None
    good = fake_model(tmp_path, demo_tokenizer, "1.2.0")  # same release line (1.2): accepted
    await rt.load(spec_for(good, demo_model_dir))
    assert rt.loaded is not None
    await rt.close()


async def test_unload_destroys_the_handle(fake_lib, tmp_path, demo_tokenizer, demo_model_dir) -> None:
    rt = native(fake_lib, "1.3.0")
    spec = spec_for(fake_model(tmp_path, demo_tokenizer, "1.3.0"), demo_model_dir)
    await rt.load(spec)
    await rt.load(spec)  # reloading destroys the previous handle first
    await rt.unload()
    assert rt.loaded is None
    assert [line.split()[0] for line in trace(tmp_path)] == ["init", "destroy", "init", "destroy"]
    with pytest.raises(GenerationError, match="no model"):
        await run(rt, [1])
    await rt.close()
    with pytest.raises(GenerationError, match="closed"):
        await run(rt, [1])


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_run_the_context_cuts_is_a_length_stop_and_async_with_closes(fake_lib, tmp_path, demo_tokenizer,
                                                                             demo_model_dir, version) -> None:
    from exo_rkllm.runtime.base import FinishKind

    ids = prompt_ids(demo_tokenizer, "fill it")
    room = 3
    assert len(demo_tokenizer.encode(MULTIBYTE)) > room
    async with native(fake_lib, version) as rt:
        await rt.load(spec_for(fake_model(tmp_path, demo_tokenizer, version), demo_model_dir,
                               max_context_len=len(ids) + room))
        tokens, finish = await run(rt, ids)
        assert len(tokens) == room and finish.kind is FinishKind.LENGTH  # the context ran out: cut short
        assert rt.kv_cache_len() == (len(ids) + room - 1 if version in ("1.2.3", "1.3.0") else None)
        session = rt.session
        assert not session.closed
    assert session.closed and rt.loaded is None
    assert any(line.startswith("destroy") for line in trace(tmp_path))
