"""The simulated runtime behaves like RKLLM: callback states, KV cache, abort, errors, pacing."""
from __future__ import annotations

import asyncio
import hashlib
import random
import re
import time

import pytest

from exo_rkllm.errors import GenerationError, ModelLoadError
from exo_rkllm.runtime.base import CallState, FinishEvent, GenerationInput, TokenEvent, utf8_complete_prefix
from exo_rkllm.runtime.sim import _FRAGMENTS, SIM_MAGIC, SimRuntime, SimTiming
from exo_rkllm.models.tokenizer import token_bytes


async def run(rt, ids, **kw):
    events = [e async for e in rt.generate(GenerationInput("r", tuple(ids), **kw))]
    return [e for e in events if isinstance(e, TokenEvent)], events[-1]


def prompt_ids(tok, text):
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                              add_generation_prompt=True))


async def test_deterministic_multibyte_answers_with_waiting_state(demo_spec, demo_tokenizer):
    rt = SimRuntime(SimTiming.instant())
    await rt.load(demo_spec)
    ids = prompt_ids(demo_tokenizer, "hello [[sim:text=a 🤖 b 世界]]")
    tokens, finish = await run(rt, ids)
    assert isinstance(finish, FinishEvent) and not finish.aborted
    assert "".join(t.text for t in tokens) == "a 🤖 b 世界"
    assert CallState.WAITING in [t.state for t in tokens]
    again, _ = await run(rt, ids)
    assert [t.token_id for t in again] == [t.token_id for t in tokens]
    other, _ = await run(rt, prompt_ids(demo_tokenizer, "something else"))
    assert [t.token_id for t in other] != [t.token_id for t in tokens]


async def test_kv_cache_holds_exactly_what_was_fed(demo_spec, demo_tokenizer):
    rt = SimRuntime(SimTiming.instant())
    await rt.load(demo_spec)
    ids = prompt_ids(demo_tokenizer, "[[sim:tokens=6]]")
    tokens, _ = await run(rt, ids, keep_history=True)
    assert rt.kv_tokens == tuple(ids) + tuple(t.token_id for t in tokens)  # EOS stop: all fed
    more = demo_tokenizer.encode("<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n")
    before = len(rt.kv_tokens)
    await run(rt, more, keep_history=True)
    assert rt.runs[-1].kv_before == before and rt.runs[-1].prefilled == tuple(more)
    fresh, _ = await run(rt, ids, keep_history=False)  # starts from an empty cache
    assert rt.kv_tokens == tuple(ids) + tuple(t.token_id for t in fresh)
    await rt.clear_kv_cache()
    limited, _ = await run(rt, ids, keep_history=True, max_new_tokens=3)
    assert len(limited) == 3 and len(rt.kv_tokens) == len(ids) + 2  # length stop: last token not fed
    await rt.clear_kv_cache()
    assert rt.kv_tokens == ()


async def test_context_limit_is_an_error(demo_spec, demo_tokenizer):
    rt = SimRuntime(SimTiming.instant())
    await rt.load(demo_spec)
    with pytest.raises(GenerationError, match="exceeds the model's context"):
        await run(rt, [1] * (demo_spec.max_context_len + 1))


async def test_abort_stops_between_tokens(demo_spec, demo_tokenizer):
    rt = SimRuntime(SimTiming(0, 0, 0, decode_ms_per_token=50))
    await rt.load(demo_spec)
    gen = rt.generate(GenerationInput("r", tuple(prompt_ids(demo_tokenizer, "[[sim:tokens=100]]"))))
    first = await gen.__anext__()
    assert isinstance(first, TokenEvent) and rt.is_running()
    t0 = time.monotonic()
    await rt.abort()
    rest = [e async for e in gen]
    assert isinstance(rest[-1], FinishEvent) and rest[-1].aborted
    assert time.monotonic() - t0 < 0.5 and not rt.is_running()


async def test_pacing_follows_the_timing_model(demo_spec, demo_tokenizer):
    rt = SimRuntime(SimTiming(0, prefill_base_ms=30, prefill_ms_per_token=1, decode_ms_per_token=10))
    await rt.load(demo_spec)
    ids = prompt_ids(demo_tokenizer, "[[sim:tokens=10]]")
    _, finish = await run(rt, ids)
    assert finish.stats.prefill_ms >= 30 + len(ids) * 1 - 1
    assert finish.stats.decode_ms >= 9 * 10 - 1  # the first token comes with the prefill


async def test_error_injection_and_recovery(demo_spec, demo_tokenizer):
    rt = SimRuntime(SimTiming.instant(), fail_on=lambda inp, i: inp.request_id == "bad" and i == 2)
    await rt.load(demo_spec)
    ids = prompt_ids(demo_tokenizer, "[[sim:tokens=5]]")
    got = []
    with pytest.raises(GenerationError, match="token 3"):
        async for e in rt.generate(GenerationInput("bad", tuple(ids))):
            got.append(e)
    assert len(got) == 2
    tokens, _ = await run(rt, ids)
    assert len(tokens) == 5


async def test_model_file_validation(tmp_path, demo_spec):
    rt = SimRuntime(SimTiming.instant())
    with pytest.raises(ModelLoadError, match="not found"):
        await rt.load(demo_spec.__class__(**{**demo_spec.__dict__, "path": tmp_path / "missing.rkllm"}))
    empty = tmp_path / "empty.rkllm"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        await rt.load(demo_spec.__class__(**{**demo_spec.__dict__, "path": empty}))
    corrupt = tmp_path / "corrupt.rkllm"
    corrupt.write_bytes(SIM_MAGIC + b"{not json")
    with pytest.raises(ModelLoadError, match="corrupt"):
        await rt.load(demo_spec.__class__(**{**demo_spec.__dict__, "path": corrupt}))
    await rt.load(demo_spec)  # still usable


async def test_one_generation_at_a_time(demo_spec, demo_tokenizer):
    rt = SimRuntime(SimTiming(0, 0, 0, decode_ms_per_token=20))
    await rt.load(demo_spec)
    gen = rt.generate(GenerationInput("a", tuple(prompt_ids(demo_tokenizer, "[[sim:tokens=20]]"))))
    await gen.__anext__()
    with pytest.raises(GenerationError, match="busy"):
        await run(rt, [1, 2, 3])
    await gen.aclose()
    await asyncio.sleep(0)
    assert not rt.is_running()


class CountingTokenizer:
    """Delegates to the real tokenizer and counts the work the simulator asks of it."""

    def __init__(self, tok):
        self._tok = tok
        self.decodes = 0
        self.encoded_chars = 0

    def decode(self, *args, **kwargs):
        self.decodes += 1
        return self._tok.decode(*args, **kwargs)

    def encode(self, text, *args, **kwargs):
        self.encoded_chars += len(text)
        return self._tok.encode(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


LONG_FILLER = "Rockchip boards run small language models on their NPU. " * 60  # about 600 tokens


@pytest.mark.parametrize("directive, check", [
    ("[[sim:tokens=4]]", lambda tokens, error: len(tokens) == 4 and error is None),
    ("[[sim:text=早い answer]]", lambda tokens, error: "".join(t.text for t in tokens) == "早い answer"),
    ("[[sim:error_at=3]]", lambda tokens, error: len(tokens) == 2 and "token 3" in str(error)),
])
async def test_directives_are_read_from_the_whole_prompt(demo_spec, demo_tokenizer, directive, check):
    # A directive at the start of a long prompt was once silently ignored (only the last 512
    # tokens were read).
    rt = SimRuntime(SimTiming.instant())
    await rt.load(demo_spec)
    ids = prompt_ids(demo_tokenizer, directive + " " + LONG_FILLER)
    assert len(ids) > 600
    tokens, error = [], None
    try:
        async for e in rt.generate(GenerationInput("r", tuple(ids))):
            if isinstance(e, TokenEvent):
                tokens.append(e)
    except GenerationError as exc:
        error = exc
    assert check(tokens, error)


async def test_decoding_a_token_does_not_decode_the_context(demo_spec, demo_tokenizer):
    # Reading the directives again for every token cost more CPU per token than the
    # software path the simulator stands in front of.
    rt = SimRuntime(SimTiming.instant())
    await rt.load(demo_spec)
    counting = rt._tok = CountingTokenizer(demo_tokenizer)
    tokens, finish = await run(rt, prompt_ids(demo_tokenizer, LONG_FILLER + " [[sim:tokens=300]]"))
    assert len(tokens) == 300 and not finish.aborted
    assert counting.decodes <= 2  # once per run, whatever the answer's length


async def test_planning_a_long_answer_encodes_its_text_a_bounded_number_of_times(demo_spec, demo_tokenizer):
    # Re-encoding the growing answer after each fragment was quadratic: a second of CPU
    # before the first of 4000 tokens.
    rt = SimRuntime(SimTiming.instant())
    demo_spec = demo_spec.__class__(**{**demo_spec.__dict__, "max_context_len": 8192})
    await rt.load(demo_spec)
    counting = rt._tok = CountingTokenizer(demo_tokenizer)
    tokens, _ = await run(rt, prompt_ids(demo_tokenizer, "[[sim:tokens=3000]]"))
    answer_chars = len("".join(t.text for t in tokens))
    assert len(tokens) == 3000
    assert counting.encoded_chars < 4 * answer_chars  # quadratic planning encoded ~100x the answer


def reference_answer(tok, ids):
    """The simulator's answer rule written the obvious (quadratic) way: the fast one must match it."""
    text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    rng = random.Random(hashlib.sha256(text.encode("utf-8")).digest())
    asked = re.findall(r"\[\[sim:tokens=(\d+)\]\]", text)
    want = int(asked[-1]) if asked else rng.randint(24, 64)
    parts, out = [], []
    while len(out) < want:
        parts.append(rng.choice(_FRAGMENTS))
        out = tok.encode(" ".join(parts), add_special_tokens=False)
    out = out[:want]
    while out and utf8_complete_prefix(tail := b"".join(token_bytes(tok, i) for i in out[-4:])) != len(tail):
        out.pop()
    while len(out) < want:
        out += tok.encode(".", add_special_tokens=False)
    return out + [tok.eos_token_id]


async def test_answers_are_those_of_the_obvious_rule(demo_spec, demo_tokenizer):
    rt = SimRuntime(SimTiming.instant())
    await rt.load(demo_spec)
    for i in range(40):
        directive = f" [[sim:tokens={1 + 13 * i}]]" if i % 2 else ""
        ids = prompt_ids(demo_tokenizer, f"question {i}{directive}")
        tokens, _ = await run(rt, ids)
        assert [t.token_id for t in tokens] == reference_answer(demo_tokenizer, ids)[:-1]


async def test_a_greedy_answer_continues_itself_from_a_longer_context(demo_spec, demo_tokenizer):
    # DESIGN §11: preemption and resume are tested on this. The context "prompt + the first k
    # tokens of its answer" must go on with token k+1 of that answer, even when the first k
    # tokens end inside a character.
    rt = SimRuntime(SimTiming.instant())
    await rt.load(demo_spec)
    prompt = prompt_ids(demo_tokenizer, "resume me [[sim:text=Hé 世界 🤖👩‍💻 done.]]")
    full, _ = await run(rt, prompt)
    answer = [t.token_id for t in full]
    split_inside = [k for k, t in enumerate(full, 1) if t.state is CallState.WAITING]
    assert split_inside, "the answer must split a character across tokens"
    for k in [1, 5, split_inside[0], len(answer) - 1]:
        rest, _ = await run(rt, prompt + answer[:k])
        assert [t.token_id for t in rest] == answer[k:]
        shown = "".join(t.text for t in full[:k]) + "".join(t.text for t in rest)
        assert shown == "Hé 世界 🤖👩‍💻 done."
    # what a runtime does when it is paused after k tokens and resumed with the last one
    await rt.clear_kv_cache()
    await run(rt, prompt, keep_history=True, max_new_tokens=4)
    assert rt.kv_tokens == tuple(prompt + answer[:3])  # the 4th was sampled, not fed
    rest, _ = await run(rt, answer[3:4], keep_history=True)
    assert [t.token_id for t in rest] == answer[4:]


async def test_a_generated_answer_continues_itself_too(demo_spec, demo_tokenizer):
    rt = SimRuntime(SimTiming.instant())
    await rt.load(demo_spec)
    prompt = prompt_ids(demo_tokenizer, "tell me more")
    answer = [t.token_id for t in (await run(rt, prompt))[0]]
    rest, _ = await run(rt, prompt + answer[:10])
    assert [t.token_id for t in rest] == answer[10:]
    # text after the header that is not the answer's start is a prompt like any other
    other, _ = await run(rt, prompt + demo_tokenizer.encode("Sure"))
    assert [t.token_id for t in other] != answer[4:]
    assert [t.token_id for t in other] == reference_answer(demo_tokenizer, prompt + demo_tokenizer.encode("Sure"))[:-1]


# -- the Runtime protocol is the whole contract ------------------------------------------------------------
def test_the_protocol_names_every_method_the_scheduler_calls():
    """kv_cache_len and `async with` are part of the protocol: a backend without them is no Runtime."""
    import dataclasses

    from exo_rkllm.runtime.base import Capabilities, Runtime

    rt = SimRuntime(SimTiming.instant())
    assert isinstance(rt, Runtime)

    class NoCacheLength:  # every other method of the protocol
        capabilities = rt.capabilities
        loaded = None
        load = unload = generate = abort = embed = clear_kv_cache = load_prompt_cache = close = staticmethod(
            lambda *a: None)
        __aenter__ = __aexit__ = staticmethod(lambda *a: None)

    assert not isinstance(NoCacheLength(), Runtime)
    NoCacheLength.kv_cache_len = staticmethod(lambda: None)
    assert isinstance(NoCacheLength(), Runtime)
    # a flag nothing read is gone; the per-run ones are read by the scheduler
    assert "reports_perf" not in {f.name for f in dataclasses.fields(Capabilities)}


async def test_async_with_closes_the_runtime(demo_spec, demo_tokenizer):
    async with SimRuntime(SimTiming.instant()) as rt:
        await rt.load(demo_spec)
        tokens, _ = await run(rt, prompt_ids(demo_tokenizer, "hi [[sim:tokens=2]]"))
        assert len(tokens) == 2 and not rt.closed
    assert rt.closed and rt.loaded is None and rt.kv_cache_len() is None


async def test_every_run_says_how_it_ended(demo_spec, demo_tokenizer):
    """STOP on the model's end of answer, LENGTH when the context (or a limit) cut it, ABORTED after abort()."""
    import dataclasses

    from exo_rkllm.runtime.base import FinishKind

    rt = SimRuntime(SimTiming.instant())
    await rt.load(demo_spec)
    _, finish = await run(rt, prompt_ids(demo_tokenizer, "short [[sim:tokens=3]]"))
    assert finish.kind is FinishKind.STOP and not finish.aborted
    ids = prompt_ids(demo_tokenizer, "fill it [[sim:tokens=500]]")
    await rt.load(dataclasses.replace(demo_spec, max_context_len=len(ids) + 5))
    tokens, finish = await run(rt, ids)
    assert len(tokens) == 5 and finish.kind is FinishKind.LENGTH and not finish.aborted
    await rt.load(demo_spec)
    paced = SimRuntime(SimTiming(0, 0, 0, decode_ms_per_token=20))
    await paced.load(demo_spec)
    kinds = []
    async for event in paced.generate(GenerationInput("r", tuple(prompt_ids(demo_tokenizer, "x [[sim:tokens=300]]")))):
        if isinstance(event, TokenEvent):
            await paced.abort()
        else:
            kinds.append(event.kind)
    assert kinds == [FinishKind.ABORTED]


# -- prompt caches ---------------------------------------------------------------------------------------
async def test_a_saved_prompt_cache_holds_the_prefill_and_restores_exactly_that(demo_spec, demo_tokenizer, tmp_path):
    import json

    rt = SimRuntime(SimTiming.instant())
    await rt.load(demo_spec)
    assert rt.capabilities.prompt_cache
    ids = prompt_ids(demo_tokenizer, "remember this [[sim:tokens=6]]")
    path = tmp_path / "state.kv"
    tokens, finish = await run(rt, ids, keep_history=True, save_prompt_cache=str(path))
    assert len(tokens) == 6 and rt.runs[-1].saved == len(ids)
    saved = json.loads(path.read_text())
    assert saved["ids"] == list(ids) and saved["runtime"] == "1.3"  # the prefill, never the answer
    assert len(rt.kv_tokens) == len(ids) + 6
    await rt.clear_kv_cache()
    await rt.load_prompt_cache(str(path))
    assert rt.kv_tokens == tuple(ids) and rt.kv_cache_len() == len(ids)
    more = prompt_ids(demo_tokenizer, "and more")[-4:]
    await run(rt, more, keep_history=True)
    assert rt.runs[-1].kv_before == len(ids) and rt.runs[-1].prefilled == tuple(more)  # only the suffix


async def test_a_prompt_cache_that_is_not_exactly_this_model_and_release_is_refused(demo_spec, demo_tokenizer,
                                                                                    tmp_path):
    import dataclasses
    import json

    from exo_rkllm.errors import PromptCacheError

    rt = SimRuntime(SimTiming.instant())
    await rt.load(demo_spec)
    ids = prompt_ids(demo_tokenizer, "x [[sim:tokens=2]]")
    good = tmp_path / "good.kv"
    await run(rt, ids, keep_history=True, save_prompt_cache=str(good))
    data = json.loads(good.read_text())

    def variant(name, **changes):
        path = tmp_path / name
        path.write_text(json.dumps({**data, **changes}))
        return path

    cases = {
        variant("corrupt.kv", ids=[7] + data["ids"][1:]): "checksum mismatch",
        variant("short.kv", n=data["n"] + 1): "truncated or corrupt",
        variant("release.kv", runtime="1.2"): "saved by runtime 1.2",
        variant("model.kv", model="0" * 16): "another model",
        tmp_path / "missing.kv": "does not exist",
    }
    (tmp_path / "cut.kv").write_text(good.read_text()[:40])
    cases[tmp_path / "cut.kv"] = "truncated or corrupt"
    for path, why in cases.items():
        with pytest.raises(PromptCacheError, match=why):
            await rt.load_prompt_cache(str(path))
        assert rt.kv_cache_len() == 0  # a refused load leaves nothing known behind
    await rt.load_prompt_cache(str(good))
    assert rt.kv_cache_len() == len(ids)
    # a 1.2.x runtime will not take a 1.3 file, nor another model file (rewritten in place) its old ones
    older = SimRuntime(SimTiming.instant(), release="1.2.3")
    await older.load(demo_spec)
    with pytest.raises(PromptCacheError, match="saved by runtime 1.3"):
        await older.load_prompt_cache(str(good))
    copy = tmp_path / "copy.rkllm"
    copy.write_bytes(demo_spec.path.read_bytes())
    other = SimRuntime(SimTiming.instant())
    await other.load(dataclasses.replace(demo_spec, path=copy))
    with pytest.raises(PromptCacheError, match="another model"):
        await other.load_prompt_cache(str(good))


async def test_a_run_aborted_before_its_prefill_saves_nothing(demo_spec, demo_tokenizer, tmp_path):
    rt = SimRuntime(SimTiming(0, prefill_base_ms=0, prefill_ms_per_token=20, decode_ms_per_token=0))
    await rt.load(demo_spec)
    ids = prompt_ids(demo_tokenizer, "slow prefill")
    path = tmp_path / "state.kv"
    events = rt.generate(GenerationInput("r", tuple(ids), keep_history=True, save_prompt_cache=str(path)))
    task = asyncio.ensure_future(anext_all(events))
    await asyncio.sleep(0.05)
    await rt.abort()
    finish = await task
    assert finish.aborted and not path.exists() and rt.runs[-1].saved is None
    assert not list(tmp_path.iterdir())  # no temporary file either


async def test_saving_and_loading_are_paced_by_the_size_and_far_below_a_prefill(demo_spec, demo_tokenizer, tmp_path):
    timing = SimTiming(0, prefill_base_ms=0, prefill_ms_per_token=4, decode_ms_per_token=0, cache_io_ms_per_token=0.4)
    rt = SimRuntime(timing)
    await rt.load(demo_spec)
    ids = prompt_ids(demo_tokenizer, "y " * 200)
    path = tmp_path / "state.kv"
    started = time.monotonic()
    await run(rt, ids, keep_history=True, save_prompt_cache=str(path))
    saving = time.monotonic() - started
    started = time.monotonic()
    await rt.load_prompt_cache(str(path))
    loading = time.monotonic() - started
    expected = 0.4 * len(ids) / 1000
    assert loading >= expected * 0.9 and saving >= 4 * len(ids) / 1000 + expected * 0.9


async def anext_all(events):
    last = None
    async for event in events:
        last = event
    return last
