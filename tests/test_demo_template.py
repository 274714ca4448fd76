"""The demo model's chat template: plain ChatML exactly as before without tools, Qwen2.5's tool
rendering with them, the same text from transformers and from LightTokenizer."""
from __future__ import annotations

import json
import random

import pytest

from exo_rkllm.models.demo import CHATML_TEMPLATE
from exo_rkllm.models.light_tokenizer import compile_chat_template

# The template as it was before it rendered tools: the reference the new one must reproduce
# byte for byte whenever a request has no tools and no tool messages.
PREVIOUS_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city (°C, 天气)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time", "parameters": {}}}
CALL_FORMAT = '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'


def random_text(rng: random.Random) -> str:
    alphabet = list("ab XY\n\t.,{}'\"\\") + ["世", "🤖", "é", "<|im_end|>", "  ", "<tool_call>", "{%", "}}"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))


def random_conversation(rng: random.Random) -> list[dict]:
    messages: list[dict] = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": random_text(rng)})
    for turn in range(rng.randint(1, 5)):
        role = "user" if turn % 2 == 0 else "assistant"
        if rng.random() < 0.3:
            content: object = [{"type": "text", "text": random_text(rng)} for _ in range(rng.randint(1, 3))]
            if role == "user" and rng.random() < 0.5:
                content.insert(0, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}})
        else:
            content = random_text(rng)
        messages.append({"role": role, "content": content})
    return messages


@pytest.fixture(scope="module")
def renderers(demo_model_dir):
    """(name, render) for LightTokenizer and transformers on the demo folder."""
    from transformers import PreTrainedTokenizerFast

    from exo_rkllm.models.tokenizer import load_tokenizer

    light = load_tokenizer(demo_model_dir)
    ref = PreTrainedTokenizerFast.from_pretrained(str(demo_model_dir))
    return [(name, lambda messages, tok=tok, **kw: tok.apply_chat_template(messages, tokenize=False, **kw))
            for name, tok in (("light", light), ("transformers", ref))]


def test_the_demo_folder_carries_this_template(demo_model_dir, demo_tokenizer):
    config = json.loads((demo_model_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML_TEMPLATE == demo_tokenizer.chat_template


def test_without_tools_the_rendering_is_byte_identical_to_the_previous_template(renderers):
    previous = compile_chat_template(PREVIOUS_TEMPLATE)
    rng = random.Random(7)
    conversations = [random_conversation(rng) for _ in range(300)]
    conversations += [[{"role": "user", "content": ""}], [{"role": "system", "content": "s"}],
                      [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]]
    for messages in conversations:
        for add in (True, False):
            want = previous.render(messages=messages, add_generation_prompt=add)
            for name, render in renderers:
                assert render(messages, add_generation_prompt=add) == want, (name, messages, add)
                assert render(messages, add_generation_prompt=add, tools=None) == want, name
                assert render(messages, add_generation_prompt=add, tools=[]) == want, name
    assert "system" not in renderers[0][1]([{"role": "user", "content": "hi"}])  # no default system prompt


def tool_conversation(arguments: object) -> list[dict]:
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "20 °C"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "25 °C"}]},
        {"role": "user", "content": "Thanks"},
    ]


def test_tools_are_listed_in_a_system_turn_with_the_call_format(renderers):
    messages = tool_conversation({"city": "Paris"})
    for name, render in renderers:
        text = render(messages, tools=[WEATHER, CLOCK], add_generation_prompt=True)
        system, rest = text.split("<|im_end|>\n", 1)
        assert system.startswith("<|im_start|>system\nBe brief.\n\n"), name  # merged with the system message
        listed = system[system.index("<tools>\n") + len("<tools>\n"):system.index("\n</tools>")]
        assert [json.loads(line) for line in listed.split("\n")] == [WEATHER, CLOCK], name
        assert system.endswith(CALL_FORMAT), name
        assert "Be brief." not in rest, name  # rendered once, inside the tools turn
        assert rest.startswith("<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"), name
        assert text.endswith("<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n"), name


def test_without_a_system_message_the_tools_turn_comes_first(renderers):
    for name, render in renderers:
        text = render([{"role": "user", "content": "hi"}], tools=[CLOCK], add_generation_prompt=True)
        assert text.startswith("<|im_start|>system\n# Tools"), name
        assert text.endswith("<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"), name


def test_tool_calls_and_results_are_rendered_as_qwen_blocks(renderers):
    for name, render in renderers:
        text = render(tool_conversation({"city": "Paris"}), tools=[WEATHER])
        calls = ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                 '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
                 '<|im_end|>\n')
        results = ("<|im_start|>user\n<tool_response>\n20 °C\n</tool_response>\n<tool_response>\n25 °C\n"
                   "</tool_response><|im_end|>\n")
        assert calls + results + "<|im_start|>user\nThanks<|im_end|>\n" in text, name
        # arguments a client sent as a JSON string render the same
        assert render(tool_conversation('{"city": "Paris"}'), tools=[WEATHER]) == text, name


def test_an_assistant_text_before_its_calls_is_kept(renderers):
    messages = [{"role": "user", "content": "time?"},
                {"role": "assistant", "content": "Let me check.",
                 "tool_calls": [{"type": "function", "function": {"name": "now", "arguments": {}}}]}]
    for name, render in renderers:
        text = render(messages, tools=[CLOCK])
        assert text.endswith('<|im_start|>assistant\nLet me check.\n<tool_call>\n{"name": "now", "arguments": {}}\n'
                             '</tool_call><|im_end|>\n'), name


def test_a_tool_result_without_tools_in_the_request_is_still_a_tool_response(renderers):
    messages = [{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}]
    for name, render in renderers:
        assert render(messages) == ("<|im_start|>user\nx<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n"
                                    "</tool_response><|im_end|>\n"), name


def test_light_and_transformers_render_tool_conversations_alike(renderers):
    rng = random.Random(3)
    (_, light), (_, ref) = renderers
    for _ in range(60):
        messages = random_conversation(rng)
        at = rng.randrange(len(messages) + 1)
        messages[at:at] = tool_conversation({"city": random_text(rng)})[1:5]
        tools = [WEATHER] if rng.random() < 0.7 else None
        for add in (True, False):
            assert light(messages, tools=tools, add_generation_prompt=add) == \
                ref(messages, tools=tools, add_generation_prompt=add), messages
