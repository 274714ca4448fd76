"""The think block goes to reasoning_content as llama.cpp's `--reasoning-format deepseek` puts it, for any split."""
from __future__ import annotations

import random

import pytest

from exo_rkllm.api.reasoning import ReasoningFormat, ReasoningSplitter, Split, prompt_opens_reasoning
from support import text_splits

WS = " \t\n\r\f\v"


def run(pieces, fmt=ReasoningFormat.DEEPSEEK, **kwargs) -> tuple[str, str]:
    splitter = ReasoningSplitter(fmt, **kwargs)
    parts = [splitter.push(p) for p in pieces] + [splitter.flush()]
    assert all(isinstance(p, Split) for p in parts)
    return "".join(p.reasoning for p in parts), "".join(p.content for p in parts)


def reference(text: str, starts_in_reasoning: bool = False) -> tuple[str, str]:
    """The rules applied to the whole answer at once (the think block at the start, stripped)."""
    if starts_in_reasoning:
        body = text
    else:
        rest = text.lstrip(WS)
        if not rest.startswith("<think>"):
            return "", text
        body = rest[len("<think>"):]
    end = body.find("</think>")
    if end < 0:
        return body.strip(WS), ""
    return body[:end].strip(WS), body[end + len("</think>"):].lstrip(WS)


CASES = [
    # DeepSeek-R1 distill / Qwen3 with thinking on
    ("<think>\nThe user asks 2+2. That is 4.\n</think>\n\nThe answer is **4**.", False,
     "The user asks 2+2. That is 4.", "The answer is **4**."),
    # leading whitespace before the block is allowed (and dropped)
    ("\n  <think>plan</think>done", False, "plan", "done"),
    # `<think>` not at the start is content, tags and all
    ("Answer: <think>x</think> y", False, "", "Answer: <think>x</think> y"),
    # only the first block is reasoning; a later one is content
    ("<think>a</think>b <think>c</think>", False, "a", "b <think>c</think>"),
    # the prompt ended with `<think>\n`: only the closing tag appears
    ("Okay, 2+2 is 4.\n</think>\n\n4", True, "Okay, 2+2 is 4.", "4"),
    # cut short inside the reasoning: it stays reasoning
    ("<think>\nHmm, let me count: 1, 2, ", False, "Hmm, let me count: 1, 2,", ""),
    ("Still thinking when max_tokens hit", True, "Still thinking when max_tokens hit", ""),
    ("<think>abc</thi", False, "abc</thi", ""),  # a partial close tag at the end is reasoning text
    # an empty block (Qwen3 with thinking off) gives no reasoning at all
    ("<think>\n\n</think>\n\nHi there", False, "", "Hi there"),
    # whitespace inside the reasoning and at the end of the content is kept
    ("<think>a\n\n b  </think>c \n", False, "a\n\n b", "c \n"),
    # not a think block: the answer is untouched, leading whitespace too
    ("  hello <thin", False, "", "  hello <thin"),
    ("<thi", False, "", "<thi"),
    ("\n\n", False, "", "\n\n"),
    ("", False, "", ""),
    # unicode on both sides
    ("<think>東京は晴れ 🌞</think>\n今日は晴れです。", False, "東京は晴れ 🌞", "今日は晴れです。"),
    # a `<think>` written after the prompt already opened one is reasoning text
    ("<think>x</think>y", True, "<think>x", "y"),
]


@pytest.mark.parametrize("text,starts,reasoning,content", CASES)
def test_every_split_gives_the_same_reasoning_and_content(text, starts, reasoning, content):
    assert reference(text, starts) == (reasoning, content)  # the table agrees with the rules
    for pieces in text_splits(text):
        assert run(pieces, starts_in_reasoning=starts) == (reasoning, content), pieces


def test_random_answers_match_the_reference_for_every_split():
    rng = random.Random(11)
    atoms = ["<think>", "</think>", "<th", "ink>", "</", "a", "é", " ", "\n", ">"]
    for _ in range(400):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 8)))
        starts = rng.random() < 0.3
        expected = reference(text, starts)
        for pieces in text_splits(text, seed=rng.random()):
            assert run(pieces, starts_in_reasoning=starts) == expected, (text, starts, pieces)


def test_none_leaves_everything_in_content_exactly():
    text = "<think>\nreasoning\n</think>\n\nanswer"
    for pieces in text_splits(text):
        assert run(pieces, ReasoningFormat.NONE) == ("", text)
        assert run(pieces, ReasoningFormat.NONE, starts_in_reasoning=True) == ("", text)


def test_streaming_holds_back_only_a_possible_tag_and_whitespace():
    splitter = ReasoningSplitter(ReasoningFormat.DEEPSEEK)
    assert not splitter.in_reasoning
    assert splitter.push("<thi") == Split()
    assert splitter.push("nk>\nFirst") == Split(reasoning="First")
    assert splitter.in_reasoning
    assert splitter.push(" idea.") == Split(reasoning=" idea.")
    assert splitter.push("\n</th") == Split()  # "\n" may be the whitespace before `</think>`
    assert splitter.push("ing") == Split(reasoning="\n</thing")  # it was not the close tag
    assert splitter.push("\n</think>") == Split()
    assert not splitter.in_reasoning
    assert splitter.push("\n\n") == Split()  # whitespace after the block is dropped
    assert splitter.push("Yes") == Split(content="Yes")
    assert splitter.push("\n\n") == Split(content="\n\n")  # ...but only right after it
    assert splitter.flush() == Split()


def test_plain_content_streams_without_delay():
    splitter = ReasoningSplitter(ReasoningFormat.DEEPSEEK)
    assert splitter.push("Hello") == Split(content="Hello")
    assert splitter.push(" <think>") == Split(content=" <think>")
    assert splitter.flush() == Split()


def test_cut_short_reasoning_stays_reasoning_at_flush():
    splitter = ReasoningSplitter("deepseek", starts_in_reasoning=True)
    assert splitter.in_reasoning
    assert splitter.push("Let me see </thi") == Split(reasoning="Let me see")
    assert splitter.flush() == Split(reasoning=" </thi")
    assert splitter.in_reasoning


def test_custom_tags():
    splitter = ReasoningSplitter("deepseek", open_tag="<seed:think>", close_tag="</seed:think>")
    parts = [splitter.push(c) for c in "<seed:think>hm</seed:think>ok"] + [splitter.flush()]
    assert ("".join(p.reasoning for p in parts), "".join(p.content for p in parts)) == ("hm", "ok")


@pytest.mark.parametrize("value,expected", [
    ("none", ReasoningFormat.NONE), ("deepseek", ReasoningFormat.DEEPSEEK),
    ("deepseek-legacy", ReasoningFormat.DEEPSEEK), ("auto", ReasoningFormat.DEEPSEEK),
    (" DeepSeek ", ReasoningFormat.DEEPSEEK), (ReasoningFormat.NONE, ReasoningFormat.NONE),
])
def test_parse_accepts_llama_cpp_names(value, expected):
    assert ReasoningFormat.parse(value) is expected


@pytest.mark.parametrize("value", ["think", "", None, 1, "deepseek_r1"])
def test_parse_rejects_anything_else(value):
    with pytest.raises(ValueError):
        ReasoningFormat.parse(value)
    with pytest.raises(ValueError):
        ReasoningSplitter(value)


@pytest.mark.parametrize("prompt,opens", [
    ("<｜User｜>What is 2+2?<｜Assistant｜><think>\n", True),  # DeepSeek-R1's generation prompt
    ("<|im_start|>assistant\n<think>\n\n", True),
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),  # Qwen3 with enable_thinking=False
    ("<|im_start|>assistant\n", False),
    ("<|im_start|>user\nWhat does <think> do?<|im_end|>\n<|im_start|>assistant\n", False),
    ("<think>\nalready started", False),
    ("", False),
])
def test_prompt_opens_reasoning(prompt, opens):
    assert prompt_opens_reasoning(prompt) is opens


def test_prompt_opens_reasoning_with_custom_tags():
    assert prompt_opens_reasoning("x<seed:think>\n", "<seed:think>", "</seed:think>")
    assert not prompt_opens_reasoning("x<think>\n", "<seed:think>", "</seed:think>")
