"""The integrity check every bench run makes of its answers, on recorded and deliberately corrupt answers."""
from __future__ import annotations

from exo_rkllm.bench import report, results
from exo_rkllm.bench.runner import BenchSettings, run_target
from exo_rkllm.bench.targets import ChatResult, TokenCounter

from test_bench_report import make_report


def ans(category: str, text: str, rep: int = 1, **kw) -> dict:
    return {"category": category, "rep": rep, "text": text, "finish_reason": "stop", "completion_tokens": 10, **kw}


def test_clean_answers_pass():
    check = results.integrity({"standard": [ans("Math", "423"), ans("Math", "423", 2), ans("Creative", "A haiku")]})
    assert (check["answers"], check["clean"], check["problems"], check["passed"]) == (3, 3, {}, True)
    assert results.integrity_line(check) == "Integrity: 3/3 answers clean (3 standard)"


def test_each_problem_is_named():
    specials = {"<|im_end|>", "<|endoftext|>", "<|im_start|>"}
    parts = {"standard": [
        ans("Math", "4\ufffd3"),                                 # corrupt bytes mid-answer
        ans("Code", "def f(): pass<|im_end|>"),                  # end-of-turn marker as text
        ans("Reasoning", "Yes", stripped=["<|im_end|>"]),        # marker a target removed from the text
        ans("Creative", "same words"), ans("Explanation", "same words"),  # two prompts, one answer
        ans("Empty", ""),
        ans("Capped", "Gr\u00f6\ufffd", finish_reason="length"),  # the cap cut a character in half
    ]}
    check = results.integrity(parts, specials, max_new_tokens=10)
    by_prompt = {f["prompt"]: f["problems"] for f in check["failures"]}
    assert by_prompt["Math"] == [results.PROBLEM_FFFD]
    assert by_prompt["Code"] == [results.PROBLEM_SPECIAL]
    assert by_prompt["Reasoning"] == [results.PROBLEM_SPECIAL]
    assert by_prompt["Creative"] == by_prompt["Explanation"] == [results.PROBLEM_IDENTICAL]
    assert by_prompt["Empty"] == [results.PROBLEM_EMPTY]
    assert by_prompt["Capped"] == [results.PROBLEM_FFFD_CUT]
    assert check["clean"] == 0 and check["answers"] == 7 and check["passed"] is False
    assert check["special_texts_found"] == ["<|im_end|>"]
    line = results.integrity_line(check)
    assert line.startswith("Integrity: 0/7 answers clean (7 standard) — FAILED: ")
    assert "U+FFFD in 1" in line and "special-token text in 2 (`<|im_end|>`)" in line
    assert "identical to another prompt's answer in 2" in line


def test_a_character_cut_by_the_cap_is_flagged_without_failing():
    check = results.integrity({"standard": [ans("Math", "423"), ans("Capped", "Gr\u00f6\ufffd", completion_tokens=10)]},
                              max_new_tokens=10)
    assert check["passed"] is True and check["clean"] == 1
    assert results.integrity_line(check) == ("Integrity: 1/2 answers clean (2 standard) — no corruption; flagged: U+FFFD at a "
                                             "length cut in 1 (the cap cut a character in half)")
    # the same character mid-answer, or in an answer the cap did not end, is corruption
    for text, n in (("Gr\ufffd\u00f6", 10), ("Gr\u00f6\ufffd", 4)):
        check = results.integrity({"standard": [ans("Capped", text, completion_tokens=n)]}, max_new_tokens=10)
        assert check["passed"] is False and check["problems"] == {results.PROBLEM_FFFD: 1}


def test_identical_answers_from_the_simulator_are_flagged_not_failed():
    parts = {"standard": [ans("Math", "Größe, Straße und Übermaß."), ans("Creative", "Größe, Straße und Übermaß.")]}
    real = results.integrity(parts)
    assert real["passed"] is False
    assert results.integrity_line(real).endswith("FAILED: identical to another prompt's answer in 2")
    sim = results.integrity(parts, simulated=True)
    assert sim["passed"] is True and sim["clean"] == 0
    assert results.integrity_line(sim) == (
        "Integrity: 0/2 answers clean (2 standard) — no corruption; flagged: identical to another prompt's answer in 2 "
        f"({results.SIMULATOR_ANSWERS})")
    # the simulator does not excuse corruption
    parts["standard"].append(ans("Code", "x\ufffdy"))
    assert results.integrity(parts, simulated=True)["passed"] is False


def test_the_same_prompt_may_give_the_same_answer_across_parts():
    parts = {"standard": [ans("Math", "423")], "concurrent": [ans("Math", "423")],
             "multi-turn": [ans("turn 1", "An NPU is"), ans("turn 2", "An NPU is")]}  # history dropped?
    check = results.integrity(parts)
    assert [(f["part"], f["prompt"]) for f in check["failures"]] == [("multi-turn", "turn 1"), ("multi-turn", "turn 2")]
    assert check["by_part"] == {"standard": 1, "concurrent": 1, "multi-turn": 2}


def test_without_a_tokenizer_the_common_markers_are_checked():
    check = results.integrity({"standard": [ans("Math", "423<|endoftext|>"), ans("Code", "x </s>")]})
    assert check["clean"] == 0 and check["problems"] == {results.PROBLEM_SPECIAL: 2}


def test_tokenizer_special_tokens_are_known(demo_model_dir):
    counter = TokenCounter.from_dir(demo_model_dir)
    assert {"<|im_end|>", "<|endoftext|>", "<|im_start|>"} <= counter.special_texts
    assert counter.tok.convert_tokens_to_ids("<|im_start|>") in counter.special_ids


class CorruptTarget:
    """Answers like seed 004's engine did: the history dropped, every answer ending in <|im_end|>,
    most with U+FFFD."""

    kind = "exo"
    label = "corrupt"

    async def open(self) -> None: ...

    async def chat(self, messages) -> ChatResult:
        res = ChatResult(t_start=0.0, t_end=0.5, t_first=0.1, token_times=[0.1, 0.2], finish_reason="stop")
        res.text = "Hello \ufffd<|im_end|>"
        res.prompt_tokens = 10
        return res

    def describe(self) -> dict:
        return {}

    async def close(self) -> None: ...


async def test_every_run_checks_its_answers(demo_model_dir):
    counter = TokenCounter.from_dir(demo_model_dir)
    settings = BenchSettings(reps=3, warmup=0, max_new_tokens=10, turns=2, clients=0)
    section = await run_target(CorruptTarget(), settings, counter)
    check = section["integrity"]
    assert check["answers"] == 17 and check["clean"] == 0  # 15 standard + 2 turns
    assert set(check["problems"]) == {results.PROBLEM_FFFD, results.PROBLEM_SPECIAL, results.PROBLEM_IDENTICAL}
    # flat TTFT with the history dropped: the note must not call it KV reuse
    note = section["multi_turn"]["note"]
    assert "sign of KV-cache reuse" not in note and "history being dropped: a hint, not proof" in note
    rep = make_report()
    rep["targets"]["exo"] = {**rep["targets"]["exo"], "integrity": check}
    md = report.render_markdown(rep)
    assert "Integrity: 0/17 answers clean (15 standard, 2 multi-turn) — FAILED: U+FFFD in 17" in md


async def test_a_clean_simulator_run_says_so(demo_models_dir, demo_model_dir):
    from exo_rkllm.bench.targets import RuntimeTarget, resolve_local_model
    from exo_rkllm.config import Config
    from exo_rkllm.runtime.sim import SimRuntime, SimTiming

    config = Config.from_env({}, backend="sim", models_dir=demo_models_dir)
    local = resolve_local_model(config, None, max_new_tokens=6)
    counter = TokenCounter.from_dir(demo_model_dir)
    target = RuntimeTarget(config, local, counter, max_new_tokens=6, runtime=SimRuntime(SimTiming.instant()))
    section = await run_target(target, BenchSettings(reps=2, warmup=1, max_new_tokens=6, turns=2, clients=2), counter)
    check = section["integrity"]
    assert check["answers"] == 1 + 10 + 2 + 2
    # a clean run; a character the 6-token cap cut in half, or two prompts drawing the same of the
    # simulator's fragments, is flagged and does not fail it
    assert section["meta"]["backend"] == "sim" and check["passed"] is True
    assert all(set(f["problems"]) <= {results.PROBLEM_FFFD_CUT, results.PROBLEM_IDENTICAL} for f in check["failures"])
    assert check["clean"] == check["answers"] - len(check["failures"])
