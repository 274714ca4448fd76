"""The standard prompts are fixed word for word; user prompt files in the forms the README promises."""
from __future__ import annotations

import json

import pytest

from exo_rkllm.bench.prompts import MULTI_TURN_SCRIPT, STANDARD_PROMPTS, PromptFileError, load_prompt_file


def test_standard_prompts_exactly_as_published():
    assert [(p.category, p.prompt) for p in STANDARD_PROMPTS] == [
        ("Math", "What is 145 + 278?"),
        ("Explanation", "What is Python in one sentence?"),
        ("Code Generation", "Write a Python function to check if a number is prime."),
        ("Reasoning", "Is 17 a prime number? Explain."),
        ("Creative", "Write a haiku about AI."),
    ]
    assert len(MULTI_TURN_SCRIPT) == 10
    assert not any("[[sim:" in p.prompt for p in STANDARD_PROMPTS)


def test_json_list_of_objects_and_strings(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps([{"category": "Translate", "prompt": "Say hi in French."}, "Count to 3."]))
    got = load_prompt_file(f)
    assert [(p.category, p.prompt) for p in got] == [("Translate", "Say hi in French."), ("Prompt 2", "Count to 3.")]


def test_json_object_maps_category_to_prompt(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"A": "one?", "B": "two?"}))
    assert [(p.category, p.prompt) for p in load_prompt_file(f)] == [("A", "one?"), ("B", "two?")]


def test_text_lines_with_optional_category(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# my prompts\n\nSummary: Summarise the RK3588 in one line.\nWhat is 2+2?\n")
    got = load_prompt_file(f)
    assert [(p.category, p.prompt) for p in got] == [("Summary", "Summarise the RK3588 in one line."),
                                                     ("Prompt 2", "What is 2+2?")]


@pytest.mark.parametrize("content", ["", "# only a comment\n", "[1, 2]", "{not json", '["a", "a"]'])
def test_bad_prompt_files_are_refused_with_a_reason(tmp_path, content):
    f = tmp_path / "p.json"
    f.write_text(content)
    if content == '["a", "a"]':
        # two uncategorised prompts get distinct names, so this one is fine
        assert len(load_prompt_file(f)) == 2
        return
    with pytest.raises(PromptFileError):
        load_prompt_file(f)


def test_duplicate_categories_are_refused(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("Math: 1+1\nMath: 2+2\n")
    with pytest.raises(PromptFileError, match="unique"):
        load_prompt_file(f)
    with pytest.raises(PromptFileError, match="cannot read"):
        load_prompt_file(tmp_path / "missing.txt")
