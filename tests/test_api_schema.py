"""Request parsing: every wrong type or value is a 400 naming its field, never a 500; what comes
out is normalised for the handlers and the chat templates."""
from __future__ import annotations

import json
import math

import pytest

from exo_rkllm.api.errors import APIError
from exo_rkllm.api.schema import (
    MAX_EMBEDDING_INPUTS, MAX_STOP, ChatRequest, CompletionRequest, EmbeddingRequest, Sampling, parse_chat,
    parse_completion, parse_embedding,
)

USER = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


def chat(**fields) -> dict:
    return {"model": "qwen", "messages": USER, **fields}


def refused(parse, data, param, code=None) -> APIError:
    with pytest.raises(APIError) as info:
        parse(data)
    err = info.value
    assert err.status == 400 and err.type == "invalid_request_error", err
    assert err.param == param, err
    if code is not None:
        assert err.code == code, err
    if param:
        assert param in err.message, err  # the message names the field
    return err


# -- chat: the happy path -------------------------------------------------------------------------
def test_a_minimal_chat_request():
    req = parse_chat({"messages": USER})
    assert req == ChatRequest(model=None, messages=({"role": "user", "content": "hi"},))
    assert req.sampling == Sampling() and not req.sampling.given()
    assert req.chat_template_kwargs == {} and req.stop == () and req.tools is None


def test_every_chat_field_is_read():
    req = parse_chat(chat(
        stream=True, stream_options={"include_usage": True}, max_tokens=50, max_completion_tokens=20,
        stop=["END", "", "END", "\n\n"], temperature=0.2, top_p=0.9, top_k=40, frequency_penalty=0.5,
        presence_penalty=-0.5, repetition_penalty=1.1, seed=42, tools=[WEATHER], tool_choice="auto",
        reasoning_format="deepseek", chat_template_kwargs={"enable_thinking": False, "style": "x"},
        priority="background", user="u1", n=1, logprobs=False, metadata={"x": 1}, parallel_tool_calls=True,
    ))
    assert req.model == "qwen" and req.stream and req.include_usage
    assert req.max_tokens == 20  # max_completion_tokens wins
    assert req.stop == ("END", "\n\n")
    assert req.sampling == Sampling(0.2, 0.9, 40, 0.5, -0.5, 1.1, 42) and req.sampling.given()
    assert req.tools == (WEATHER,) and req.tool_choice == "auto"
    assert req.reasoning_format == "deepseek" and req.enable_thinking is False
    assert dict(req.chat_template_kwargs) == {"enable_thinking": False, "style": "x"}
    assert req.priority == "background" and req.user == "u1"


def test_include_usage_only_counts_for_a_stream():
    assert parse_chat(chat(stream_options={"include_usage": True})).include_usage is False
    assert parse_chat(chat(stop="x", stream=False)).stop == ("x",)
    assert parse_chat(chat(stop="")).stop == ()


def test_messages_are_normalised_for_templates():
    req = parse_chat({"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "be"}, {"type": "text", "text": "brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "what is"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}],
         "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
            {"type": "function", "function": {"name": "now", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "20"}]},
        {"role": "assistant", "content": None},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}], "reasoning_content": "hmm"},
    ]})
    system, user, calls, tool, empty, refusal = req.messages
    assert system == {"role": "system", "content": "be\nbrief"}  # developer is a system message; text joined
    assert user == {"role": "user", "name": "ann", "content": [
        {"type": "text", "text": "what is"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}
    assert calls["content"] is None
    assert [c["function"]["arguments"] for c in calls["tool_calls"]] == [{"city": "Paris"}, {"city": "Rome"}, {}]
    assert [c.get("id") for c in calls["tool_calls"]] == ["c1", "c2", None]
    assert tool == {"role": "tool", "tool_call_id": "c1", "content": "20"}
    assert empty == {"role": "assistant", "content": ""}
    assert refusal == {"role": "assistant", "content": "no", "reasoning_content": "hmm"}
    json.dumps(req.messages)  # what templates and logs receive is plain JSON


def test_named_tool_choice_and_top_k_minus_one():
    req = parse_chat(chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                          top_k=-1))
    assert req.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert req.sampling.top_k == 0  # no limit
    assert parse_chat(chat(tools=[])).tools is None
    assert parse_chat(chat(enable_thinking=True)).enable_thinking is True  # top-level form
    assert parse_chat(chat(model="  ")).model is None


# -- chat: hostile input --------------------------------------------------------------------------
@pytest.mark.parametrize("data,param,code", [
    ([USER], None, "invalid_request"),
    ("text", None, "invalid_request"),
    (chat(model=123), "model", "invalid_type"),
    ({"model": "q"}, "messages", "missing_field"),
    (chat(messages=[]), "messages", "invalid_value"),
    (chat(messages="hi"), "messages", "invalid_type"),
    (chat(messages=["hi"]), "messages[0]", "invalid_type"),
    (chat(messages=[{"role": "user", "content": None}]), "messages[0].content", "missing_field"),
    (chat(messages=[{"role": "user"}]), "messages[0].content", "missing_field"),
    (chat(messages=[{"role": 5, "content": "x"}]), "messages[0].role", "invalid_type"),
    (chat(messages=[{"content": "x"}]), "messages[0].role", "invalid_type"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role", "invalid_role"),
    (chat(messages=[{"role": "function", "content": "x"}]), "messages[0].role", "invalid_role"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content", "invalid_type"),
    (chat(messages=[{"role": "user", "content": {"text": "x"}}]), "messages[0].content", "invalid_type"),
    (chat(messages=[{"role": "user", "content": ["x"]}]), "messages[0].content[0]", "invalid_type"),
    (chat(messages=[{"role": "user", "content": [{"text": "x"}]}]), "messages[0].content[0].type", "invalid_type"),
    (chat(messages=[{"role": "user", "content": [{"type": "text", "text": None}]}]),
     "messages[0].content[0].text", "invalid_type"),
    (chat(messages=[{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]),
     "messages[0].content[0].type", "unsupported_content"),
    (chat(messages=[{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]),
     "messages[0].content[0].type", "unsupported_content"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages[0].content[0].image_url.url", "invalid_type"),
    (chat(messages=[{"role": "tool", "content": None}]), "messages[0].content", "missing_field"),
    (chat(messages=[{"role": "tool", "content": "x", "tool_call_id": 3}]), "messages[0].tool_call_id",
     "invalid_type"),
    (chat(messages=[{"role": "user", "content": "x", "name": ["n"]}]), "messages[0].name", "invalid_type"),
    (chat(messages=[{"role": "assistant", "tool_calls": "x"}]), "messages[0].tool_calls", "invalid_type"),
    (chat(messages=[{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{nope"}}]}]),
     "messages[0].tool_calls[0].function.arguments", "invalid_value"),
    (chat(messages=[{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]),
     "messages[0].tool_calls[0].function.arguments", "invalid_type"),
    (chat(messages=[{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]),
     "messages[0].tool_calls[0].function.name", "invalid_type"),
    (chat(messages=[{"role": "assistant", "tool_calls": [{"type": "code", "function": {"name": "f"}}]}]),
     "messages[0].tool_calls[0].type", "unsupported_value"),
    (chat(stream="yes"), "stream", "invalid_type"),
    (chat(stream=1), "stream", "invalid_type"),
    (chat(stream_options=[]), "stream_options", "invalid_type"),
    (chat(stream_options={"include_usage": "true"}), "stream_options.include_usage", "invalid_type"),
    (chat(max_tokens=0), "max_tokens", "invalid_value"),
    (chat(max_tokens=-5), "max_tokens", "invalid_value"),
    (chat(max_tokens="100"), "max_tokens", "invalid_type"),
    (chat(max_tokens=1.5), "max_tokens", "invalid_type"),
    (chat(max_tokens=True), "max_tokens", "invalid_type"),
    (chat(max_tokens=10 ** 40), "max_tokens", "invalid_value"),
    (chat(max_completion_tokens=0, max_tokens=5), "max_completion_tokens", "invalid_value"),
    (chat(temperature=True), "temperature", "invalid_type"),
    (chat(temperature="0.5"), "temperature", "invalid_type"),
    (chat(temperature=math.nan), "temperature", "invalid_value"),
    (chat(temperature=math.inf), "temperature", "invalid_value"),
    (chat(temperature=-0.1), "temperature", "invalid_value"),
    (chat(temperature=2.5), "temperature", "invalid_value"),
    (chat(temperature=10 ** 400), "temperature", "invalid_value"),
    (chat(top_p=1.5), "top_p", "invalid_value"),
    (chat(top_k=2.5), "top_k", "invalid_type"),
    (chat(top_k=-2), "top_k", "invalid_value"),
    (chat(top_k=False), "top_k", "invalid_type"),
    (chat(frequency_penalty=3), "frequency_penalty", "invalid_value"),
    (chat(presence_penalty=-3), "presence_penalty", "invalid_value"),
    (chat(repetition_penalty=0), "repetition_penalty", "invalid_value"),
    (chat(repetition_penalty=1e9), "repetition_penalty", "invalid_value"),
    (chat(seed=True), "seed", "invalid_type"),
    (chat(seed=1.5), "seed", "invalid_type"),
    (chat(seed=2 ** 70), "seed", "invalid_value"),
    (chat(n=2), "n", "unsupported_value"),
    (chat(n=0), "n", "unsupported_value"),
    (chat(n="1"), "n", "invalid_type"),
    (chat(logprobs=True), "logprobs", "unsupported_value"),
    (chat(logprobs="yes"), "logprobs", "invalid_type"),
    (chat(top_logprobs=3), "top_logprobs", "unsupported_value"),
    (chat(stop=5), "stop", "invalid_type"),
    (chat(stop=["a", 5]), "stop[1]", "invalid_type"),
    (chat(stop=[str(i) for i in range(MAX_STOP + 1)]), "stop", "invalid_value"),
    (chat(tools="x"), "tools", "invalid_type"),
    (chat(tools=["x"]), "tools[0]", "invalid_type"),
    (chat(tools=[{"type": "function"}]), "tools[0].function", "invalid_type"),
    (chat(tools=[{"type": "retrieval", "function": {"name": "f"}}]), "tools[0].type", "unsupported_value"),
    (chat(tools=[{"type": "function", "function": {"name": ""}}]), "tools[0].function.name", "invalid_type"),
    (chat(tools=[{"type": "function", "function": {"name": 3}}]), "tools[0].function.name", "invalid_type"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "description": 1}}]),
     "tools[0].function.description", "invalid_type"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "{}"}}]),
     "tools[0].function.parameters", "invalid_type"),
    (chat(tools=[WEATHER, WEATHER]), "tools[1].function.name", "invalid_value"),
    (chat(tool_choice="always"), "tool_choice", "invalid_value"),
    (chat(tool_choice="required"), "tool_choice", "invalid_value"),
    (chat(tool_choice=3), "tool_choice", "invalid_type"),
    (chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "other"}}),
     "tool_choice.function.name", "invalid_value"),
    (chat(tool_choice={"type": "function", "function": {"name": "get_weather"}}), "tool_choice.function.name",
     "invalid_value"),
    (chat(tools=[WEATHER], tool_choice={"type": "function"}), "tool_choice.function", "invalid_type"),
    (chat(reasoning_format="verbose"), "reasoning_format", "invalid_value"),
    (chat(reasoning_format=1), "reasoning_format", "invalid_type"),
    (chat(chat_template_kwargs=[]), "chat_template_kwargs", "invalid_type"),
    (chat(chat_template_kwargs={"enable_thinking": "no"}), "chat_template_kwargs.enable_thinking", "invalid_type"),
    (chat(chat_template_kwargs={"messages": []}), "chat_template_kwargs.messages", "reserved_field"),
    (chat(chat_template_kwargs={"bos_token": "<|im_start|>"}), "chat_template_kwargs.bos_token",
     "reserved_field"),
    (chat(chat_template_kwargs={"not a name": 1}), "chat_template_kwargs", "invalid_value"),
    (chat(enable_thinking="yes"), "enable_thinking", "invalid_type"),
    (chat(priority="urgent"), "priority", "invalid_value"),
    (chat(user=5), "user", "invalid_type"),
])
def test_bad_chat_requests_are_400s_naming_the_field(data, param, code):
    refused(parse_chat, data, param, code)


def nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


def test_deep_nesting_is_refused_without_recursion():
    deep = nested(100_000)  # json.dumps / a template's tojson would blow the stack on this
    refused(parse_chat, chat(messages=[{"role": "user", "content": deep}]), "messages[0].content[0]",
            "invalid_type")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "x": deep}}}
    refused(parse_chat, chat(tools=[tool]), "tools[0].function.parameters", "too_deep")
    call = {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"a": deep}}}]}
    refused(parse_chat, chat(messages=[call]), "messages[0].tool_calls[0].function.arguments", "too_deep")
    text = "[" * 100_000 + "]" * 100_000  # the same, sent as a JSON string
    call = {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": text}}]}
    refused(parse_chat, chat(messages=[call]), "messages[0].tool_calls[0].function.arguments")
    refused(parse_chat, chat(chat_template_kwargs={"x": deep}), "chat_template_kwargs.x", "too_deep")
    ok = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "x": nested(30)}}}
    assert parse_chat(chat(tools=[ok])).tools[0]["function"]["parameters"]["x"] == nested(30)


def test_unknown_fields_are_ignored():
    req = parse_chat(chat(foo=1, response_format={"type": "text"}, session_id="s", chat_id="c",
                          messages=[{"role": "user", "content": "x", "extra": {"a": 1}}]))
    assert req.messages == ({"role": "user", "content": "x"},)


def test_fuzzed_chat_bodies_never_raise_anything_but_a_400():
    """Random values in every field: a parse either succeeds or raises APIError(400)."""
    import random

    rng = random.Random(9)
    values = [None, True, False, 0, 1, -1, 2.5, math.nan, math.inf, 10 ** 30, "", "x", [], [1], ["x"], {},
              {"x": 1}, [{}], [[]], {"type": "text"}, [{"type": "text", "text": 1}], {"name": "f"}]
    fields = ["model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "stop",
              "temperature", "top_p", "top_k", "frequency_penalty", "presence_penalty", "repetition_penalty", "seed",
              "tools", "tool_choice", "reasoning_format", "chat_template_kwargs", "priority", "user", "n",
              "logprobs", "enable_thinking"]
    message_fields = ["role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content"]
    for _ in range(3000):
        data = {f: rng.choice(values) for f in rng.sample(fields, rng.randint(0, 6))}
        if rng.random() < 0.7:
            data["messages"] = [{f: rng.choice(values + ["user", "assistant", "tool"])
                                 for f in rng.sample(message_fields, rng.randint(0, 4))}
                                for _ in range(rng.randint(1, 3))]
        try:
            parse_chat(data)
        except APIError as err:
            assert err.status == 400 and err.body()["error"]["message"]


# -- completions ---------------------------------------------------------------------------------
def test_completion_requests():
    assert parse_completion({"prompt": "Once"}) == CompletionRequest(model=None, prompt="Once")
    assert parse_completion({"prompt": ["Once"]}).prompt == "Once"
    assert parse_completion({"prompt": [1, 2, 3]}).prompt == (1, 2, 3)
    assert parse_completion({"prompt": [[4, 5]]}).prompt == (4, 5)
    req = parse_completion({"model": "m", "prompt": "x", "max_tokens": 5, "echo": True, "stream": True,
                            "stream_options": {"include_usage": True}, "stop": "\n", "temperature": 0,
                            "suffix": "", "n": 1, "best_of": 1, "priority": "interactive", "logprobs": None})
    assert (req.model, req.max_tokens, req.echo, req.stream, req.include_usage, req.stop) == \
        ("m", 5, True, True, True, ("\n",))
    assert req.sampling.temperature == 0.0 and req.priority == "interactive"
    assert parse_completion({"prompt": "x"}).max_tokens == 16  # OpenAI's default


@pytest.mark.parametrize("data,param,code", [
    ({}, "prompt", "missing_field"),
    ({"prompt": 5}, "prompt", "invalid_type"),
    ({"prompt": ""}, "prompt", "invalid_value"),
    ({"prompt": []}, "prompt", "invalid_value"),
    ({"prompt": ["a", "b"]}, "prompt", "unsupported_value"),
    ({"prompt": [[1], [2]]}, "prompt", "unsupported_value"),
    ({"prompt": [1, "a"]}, "prompt[1]", "invalid_type"),
    ({"prompt": [1, True]}, "prompt[1]", "invalid_type"),
    ({"prompt": [1, -1]}, "prompt[1]", "invalid_value"),
    ({"prompt": [1, 2 ** 40]}, "prompt[1]", "invalid_value"),
    ({"prompt": [[]]}, "prompt[0]", "invalid_value"),
    ({"prompt": "x", "suffix": "end"}, "suffix", "unsupported_value"),
    ({"prompt": "x", "suffix": 1}, "suffix", "invalid_type"),
    ({"prompt": "x", "n": 3}, "n", "unsupported_value"),
    ({"prompt": "x", "best_of": 2}, "best_of", "unsupported_value"),
    ({"prompt": "x", "logprobs": 2}, "logprobs", "unsupported_value"),
    ({"prompt": "x", "echo": "yes"}, "echo", "invalid_type"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"prompt": "x", "top_p": -1}, "top_p", "invalid_value"),
    ({"prompt": "x", "model": []}, "model", "invalid_type"),
])
def test_bad_completion_requests_are_400s(data, param, code):
    refused(parse_completion, data, param, code)


# -- embeddings ----------------------------------------------------------------------------------
def test_embedding_requests():
    assert parse_embedding({"input": "hello"}) == EmbeddingRequest(model=None, inputs=("hello",))
    assert parse_embedding({"input": ["a", "b"]}).inputs == ("a", "b")
    assert parse_embedding({"input": [1, 2]}).inputs == ((1, 2),)
    assert parse_embedding({"input": [[1, 2], [3]]}).inputs == ((1, 2), (3,))
    assert parse_embedding({"input": ["a", [3]]}).inputs == ("a", (3,))
    req = parse_embedding({"model": "e", "input": "x", "encoding_format": "base64", "dimensions": 64})
    assert (req.model, req.encoding_format, req.dimensions) == ("e", "base64", 64)
    assert parse_embedding({"input": ["x"] * MAX_EMBEDDING_INPUTS}).inputs == ("x",) * MAX_EMBEDDING_INPUTS


@pytest.mark.parametrize("data,param,code", [
    ({}, "input", "missing_field"),
    ({"input": ""}, "input", "invalid_value"),
    ({"input": ["a", ""]}, "input[1]", "invalid_value"),
    ({"input": []}, "input", "invalid_value"),
    ({"input": [[]]}, "input[0]", "invalid_value"),
    ({"input": 5}, "input", "invalid_type"),
    ({"input": [True]}, "input[0]", "invalid_type"),
    ({"input": [{"text": "x"}]}, "input[0]", "invalid_type"),
    ({"input": [[1, "a"]]}, "input[0][1]", "invalid_type"),
    ({"input": ["x"] * (MAX_EMBEDDING_INPUTS + 1)}, "input", "invalid_value"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_value"),
    ({"input": "x", "dimensions": 0}, "dimensions", "invalid_value"),
    ({"input": "x", "dimensions": "64"}, "dimensions", "invalid_type"),
])
def test_bad_embedding_requests_are_400s(data, param, code):
    refused(parse_embedding, data, param, code)
