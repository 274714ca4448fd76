"""Tool-call syntax becomes OpenAI tool_calls; look-alikes stay text; streaming equals the one-shot parse."""
from __future__ import annotations

import json
import random
import re

import pytest

from exo_rkllm.api.reasoning import ReasoningSplitter
from exo_rkllm.api.tools import (Parsed, ToolCall, ToolCallParser, ToolDelta, ToolFamily, family_for, new_call_id,
                                 parse_all)
from support import text_splits

H, L, M = ToolFamily.HERMES, ToolFamily.LLAMA3, ToolFamily.MISTRAL


def stream(family, pieces, tool_names=None) -> tuple[str, list[tuple[int, str, str]]]:
    """Content and (index, name, arguments) of the calls, as a streaming handler would collect them."""
    parser = ToolCallParser(family, tool_names)
    parts = [parser.push(p) for p in pieces] + [parser.finish()]
    assert all(isinstance(p, Parsed) for p in parts)
    deltas = [d for p in parts for d in p.tool_calls]
    assert [d.call for d in deltas] == parser.calls
    return "".join(p.content for p in parts), [(d.index, d.call.name, d.call.arguments) for d in deltas]


def one_shot(family, text, tool_names=None) -> tuple[str, list[tuple[int, str, str]]]:
    content, calls = parse_all(family, text, tool_names)
    return content, [(i, c.name, c.arguments) for i, c in enumerate(calls)]


def args(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


# -- recorded-looking answers ------------------------------------------------------------------------------
QWEN25_SINGLE = ('<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, '
                 'USA", "unit": "celsius"}}\n</tool_call>')
QWEN25_PARALLEL = ('Let me check both cities for you.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
                   '"Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "London"}}\n'
                   '</tool_call>')
QWEN3_UNICODE = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京", "note": "naïve 🌧 \\u00b0C"}}\n'
                 '</tool_call>')
LLAMA32_JSON = '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}'
LLAMA_PYTHON_TAG = ('<|python_tag|>{"name": "get_weather", "arguments": {"city": "Paris"}}; '
                    '{"name": "get_time", "parameters": {"tz": "Europe/Paris"}}')

CALLS = [
    (H, QWEN25_SINGLE, None, "",
     [(0, "get_current_temperature", args({"location": "San Francisco, CA, USA", "unit": "celsius"}))]),
    (H, QWEN25_PARALLEL, None, "Let me check both cities for you.",
     [(0, "get_weather", args({"city": "Paris"})), (1, "get_weather", args({"city": "London"}))]),
    (H, QWEN3_UNICODE, None, "", [(0, "get_weather", '{"city": "東京", "note": "naïve 🌧 °C"}')]),
    # arguments written as a JSON string are passed through as that string
    (H, '<tool_call>\n{"name": "f", "arguments": "{\\"x\\":[1,2]}"}\n</tool_call>', None, "",
     [(0, "f", '{"x":[1,2]}')]),
    (H, '<tool_call>{"name": "now"}</tool_call>', None, "", [(0, "now", "{}")]),  # no arguments: {}
    # text between and after calls stays content; the whitespace around the calls goes
    (H, 'A\n\n<tool_call>{"name": "f", "arguments": {}}</tool_call>\nthen\n<tool_call>{"name": "g", "arguments": '
        '{}}</tool_call>\n\nDone.  ', None, "A" "then" "Done.  ", [(0, "f", "{}"), (1, "g", "{}")]),
    # a `<tool_call>` mentioned in prose before a real call stays text
    (H, 'I will use a <tool_call> now.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', None,
     "I will use a <tool_call> now.", [(0, "f", args({"a": 1}))]),
    (H, QWEN25_PARALLEL, {"get_weather"}, "Let me check both cities for you.",
     [(0, "get_weather", args({"city": "Paris"})), (1, "get_weather", args({"city": "London"}))]),
    (L, LLAMA32_JSON, None, "", [(0, "get_weather", args({"city": "Paris", "days": 3}))]),
    (L, "\n " + LLAMA32_JSON + "\n", None, "", [(0, "get_weather", args({"city": "Paris", "days": 3}))]),
    (L, LLAMA_PYTHON_TAG, None, "",
     [(0, "get_weather", args({"city": "Paris"})), (1, "get_time", args({"tz": "Europe/Paris"}))]),
    (L, LLAMA32_JSON + ";", {"get_weather"}, "", [(0, "get_weather", args({"city": "Paris", "days": 3}))]),
    (M, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", '
        '"arguments": {}}]', None, "", [(0, "get_weather", args({"city": "Paris"})), (1, "get_time", "{}")]),
    (M, 'Let me look.\n[TOOL_CALLS] [{"name": "f", "arguments": {"q": "é"}}]', None, "Let me look.",
     [(0, "f", args({"q": "é"}))]),
    # the detokenizer skipped the [TOOL_CALLS] control token: the bare array is still calls
    (M, '[{"name": "f", "arguments": {"q": 1}}]', None, "", [(0, "f", args({"q": 1}))]),
]


@pytest.mark.parametrize("family,text,names,content,calls", CALLS)
def test_calls_are_found_for_every_split(family, text, names, content, calls):
    assert one_shot(family, text, names) == (content, calls)
    for pieces in text_splits(text):
        assert stream(family, pieces, names) == (content, calls), pieces


LOOK_ALIKES = [
    (H, "You can wrap calls in <tool_call> tags, like <tool_call>\n{\"name\": \"f\"", None),  # never closes
    (H, 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": ', None),  # cut short
    (H, '<tool_call>\n{"foo": 1}\n</tool_call>', None),  # no name
    (H, '<tool_call>\n[1, 2]\n</tool_call>\n', None),  # JSON that is not an object
    (H, '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>', None),  # bad JSON
    (H, '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>', None),  # arguments not an object
    (H, '<tool_call>\n{"name": "f", "arguments": "not json"}\n</tool_call>', None),
    (H, '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', {"get_weather"}),  # not a request tool
    (H, "The answer is 4.\n\n", None),
    (L, '{"foo": 1}', None),
    (L, '{"name": "Alice", "age": 30}', None),  # a JSON answer about a person, not a call
    (L, 'Sure: {"name": "get_weather", "parameters": {}}', None),  # does not start with `{`
    (L, '[1, 2, 3]', None),
    (L, '"just a string"', None),
    (L, '{"name": "get_weather", "parameters": {"city": "Paris"}} is what I would call.', None),
    (L, '{"name": "get_weather", "parameters": {}}; {"foo": 1}', None),  # one bad call: all text
    (L, '<|python_tag|>print("hello")', None),  # the code interpreter, not a JSON call
    (L, '<|python', None),
    (L, LLAMA32_JSON, {"other_tool"}),
    (L, "  \n", None),
    (M, "[link](http://example.com) is a link.", None),
    (M, "[TOOL_CALLS]not json", None),
    (M, 'Text [TOOL_CALLS][{"foo": 1}]', None),
    (M, '[{"name": "Alice", "age": 30}]', None),  # bare arrays need arguments to count
    (M, "[", None),
    (M, "[TOOL_CALLS]", None),
]


@pytest.mark.parametrize("family,text,names", LOOK_ALIKES)
def test_look_alikes_stay_text_exactly(family, text, names):
    assert one_shot(family, text, names) == (text, [])
    for pieces in text_splits(text):
        assert stream(family, pieces, names) == (text, []), pieces


def test_random_hermes_answers_stream_like_the_one_shot_parse():
    rng = random.Random(5)
    atoms = ["<tool_call>", "</tool_call>", '{"name": "f", "arguments": {"a": "é"}}', '{"name": "g"}', "{", "}",
             "<tool", "_call>", "</", "\n", " ", "text", "[1]"]
    for _ in range(300):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 8)))
        expected = one_shot(H, text)
        for pieces in text_splits(text, seed=rng.random()):
            assert stream(H, pieces) == expected, (text, pieces)


@pytest.mark.parametrize("family", [L, M])
def test_random_json_answers_stream_like_the_one_shot_parse(family):
    rng = random.Random(6)
    atoms = ['{"name": "f", "arguments": {}}', '{"name": "g", "parameters": {"x": 1}}', ";", " ", "\n", "[", "]",
             ",", "[TOOL_CALLS]", "<|python_tag|>", "hi"]
    for _ in range(300):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 6)))
        expected = one_shot(family, text)
        for pieces in text_splits(text, seed=rng.random()):
            assert stream(family, pieces) == expected, (text, pieces)


def test_content_before_a_call_streams_and_the_call_comes_whole_when_it_closes():
    parser = ToolCallParser(H)
    assert parser.push("Let me check.") == Parsed(content="Let me check.")
    assert parser.push("\n<tool_call>\n{\"name\": \"get_weather\", ") == Parsed()  # held: it may be a call
    assert parser.push('"arguments": {"city": "Paris"}}\n</tool_') == Parsed()
    done = parser.push("call>")
    assert done.content == ""
    assert [(d.index, d.call.name, d.call.arguments) for d in done.tool_calls] == [
        (0, "get_weather", '{"city": "Paris"}')]
    assert parser.calls == [done.tool_calls[0].call]
    assert parser.finish() == Parsed()


def test_only_a_possible_call_start_is_held_back():
    parser = ToolCallParser(H)
    assert parser.push("The answer is 4") == Parsed(content="The answer is 4")
    assert parser.push(" <tool") == Parsed()
    assert parser.push("box>") == Parsed(content=" <toolbox>")
    assert parser.push(", ok") == Parsed(content=", ok")
    assert parser.finish() == Parsed()


def test_plain_text_streams_at_once_for_llama3_and_mistral():
    for family in (L, M):
        parser = ToolCallParser(family)
        assert parser.push("Paris is") == Parsed(content="Paris is")
        assert parser.push(" {sunny}") == Parsed(content=" {sunny}")
        assert parser.finish() == Parsed()


def test_a_llama3_call_is_held_until_the_answer_ends():
    parser = ToolCallParser(L)
    assert parser.push(LLAMA32_JSON) == Parsed()  # more text could still make it prose
    last = parser.finish()
    assert last.content == "" and [d.call.name for d in last.tool_calls] == ["get_weather"]


def test_none_family_passes_everything_through():
    parser = ToolCallParser(ToolFamily.NONE)
    assert parser.push(QWEN25_SINGLE) == Parsed(content=QWEN25_SINGLE)
    assert parser.finish() == Parsed()
    assert parse_all("none", LLAMA32_JSON) == (LLAMA32_JSON, [])


def test_qwen3_reasoning_then_call_through_both_processors():
    answer = '<think>\nThe user wants the weather in 東京.\n</think>\n\n' + QWEN3_UNICODE
    splitter, parser = ReasoningSplitter("deepseek"), ToolCallParser(H, {"get_weather"})
    reasoning, content, deltas = [], [], []
    for ch in answer:
        split = splitter.push(ch)
        reasoning.append(split.reasoning)
        parsed = parser.push(split.content)
        content.append(parsed.content)
        deltas += parsed.tool_calls
    tail = splitter.flush()
    reasoning.append(tail.reasoning)
    for parsed in (parser.push(tail.content), parser.finish()):
        content.append(parsed.content)
        deltas += parsed.tool_calls
    assert "".join(reasoning) == "The user wants the weather in 東京."
    assert "".join(content) == ""
    assert [(d.call.name, json.loads(d.call.arguments)["city"]) for d in deltas] == [("get_weather", "東京")]


def test_ids_are_unique_and_shaped_like_openai():
    calls = parse_all(H, QWEN25_PARALLEL)[1] + parse_all(H, QWEN25_PARALLEL)[1]
    assert all(re.fullmatch(r"call_[A-Za-z0-9_-]{24}", c.id) for c in calls)
    assert len({c.id for c in calls}) == len(calls)
    assert new_call_id() != new_call_id()


def test_openai_shapes():
    call = ToolCall(id="call_x", name="get_weather", arguments='{"city": "Paris"}')
    assert call.to_openai() == {"id": "call_x", "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert ToolDelta(2, call).to_openai() == {"index": 2, "id": "call_x", "type": "function",
                                              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


QWEN25_TEMPLATE = ("{%- if tools %}{{- '<|im_start|>system\\n' }}# Tools\\n<tools>{%- for tool in tools %}"
                   "{{- tool | tojson }}{%- endfor %}</tools>\\n<tool_call>\\n{\"name\": <function-name>}"
                   "\\n</tool_call><|im_end|>\\n{%- endif %}")
LLAMA31_TEMPLATE = ("{%- if message.role == \"ipython\" or message.role == \"tool\" %}"
                    "{{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}{%- endif %}")
LLAMA_PYTHON_TEMPLATE = "{{- '<|python_tag|>' + tool_call.arguments.code + '<|eom_id|>' }}"
MISTRAL_TEMPLATE = "{{- \"[TOOL_CALLS] [\" }}{%- for tool_call in message.tool_calls %}"
PLAIN_CHATML_TEMPLATE = ("{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' + "
                         "message['content'] + '<|im_end|>\\n' -}}{%- endfor -%}")  # no tools: no syntax


@pytest.mark.parametrize("template,family", [
    (QWEN25_TEMPLATE, H), (LLAMA31_TEMPLATE, L), (LLAMA_PYTHON_TEMPLATE, L), (MISTRAL_TEMPLATE, M),
    (PLAIN_CHATML_TEMPLATE, ToolFamily.NONE), ("", ToolFamily.NONE), (None, ToolFamily.NONE),
])
def test_family_from_the_chat_template(template, family):
    assert family_for(template) is family
