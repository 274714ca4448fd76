"""AnswerText: token ids in, what the client sees out, exact for any grouping of the ids."""
from __future__ import annotations

import random

from exo_rkllm.api.answer import AnswerText
from exo_rkllm.api.reasoning import ReasoningFormat
from exo_rkllm.api.tools import ToolFamily

THINK = "<think>\nWeigh 世界 and 🤖.\n</think>\n\nSo: 👩‍💻 here"
CALL = '<tool_call>\n{"name": "f", "arguments": {"x": "é"}}\n</tool_call>'


def run(tok, text, groups, **kw):
    answer = AnswerText(tok, **kw)
    ids = tok.encode(text, add_special_tokens=False)
    parts, i = [], 0
    while i < len(ids):
        n = groups(i)
        parts.append(answer.push(ids[i:i + n]))
        i += n
    parts.append(answer.finish())
    return answer, parts


def test_any_grouping_of_ids_gives_the_same_answer(demo_tokenizer):
    rng = random.Random(7)
    for kw in ({}, {"reasoning": ReasoningFormat.DEEPSEEK}, {"stops": ["🤖"]},
               {"tool_family": ToolFamily.HERMES, "tool_names": {"f"}}):
        text = THINK + " " + CALL
        results = set()
        for groups in (lambda i: 1, lambda i: 3, lambda i: rng.randint(1, 5), lambda i: 10_000):
            answer, parts = run(demo_tokenizer, text, groups, **kw)
            streamed = ("".join(p.content for p in parts), "".join(p.reasoning for p in parts),
                        tuple((d.call.name, d.call.arguments) for p in parts for d in p.tool_calls))
            whole = (answer.content, answer.reasoning_text, tuple((c.name, c.arguments) for c in answer.tool_calls))
            assert streamed == whole
            results.add(whole)
        assert len(results) == 1, kw


def test_the_stages_run_in_order(demo_tokenizer):
    answer, _ = run(demo_tokenizer, THINK + " " + CALL, lambda i: 2, stops=["🤖"], reasoning=ReasoningFormat.DEEPSEEK,
                    tool_family=ToolFamily.HERMES)
    assert answer.stopped and answer.reasoning_text == "Weigh 世界 and" and answer.content == ""
    answer, _ = run(demo_tokenizer, THINK + " " + CALL, lambda i: 2, reasoning=ReasoningFormat.DEEPSEEK,
                    tool_family=ToolFamily.HERMES)
    assert answer.content == "So: 👩‍💻 here" and [c.name for c in answer.tool_calls] == ["f"]


def test_an_answer_cut_inside_a_character_drops_its_first_bytes(demo_tokenizer):
    ids = demo_tokenizer.encode("ok 🤖", add_special_tokens=False)
    assert demo_tokenizer.decode(ids[:-1]).endswith("\ufffd"), "the premise: the cut is inside the emoji"
    answer = AnswerText(demo_tokenizer)
    text = answer.push(ids[:-1]).content + answer.finish().content
    assert text == "ok " and "\ufffd" not in text
