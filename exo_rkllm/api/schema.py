"""Parse and check the JSON of OpenAI requests: every bad input is a 400 that names its field.

A handler that reads a request's fields itself ends in a 500 (or worse, a template that
renders garbage) the day a client sends `"content": null` or `"max_tokens": "100"`. Here
each field is checked once, with OpenAI's meaning: a wrong type or value raises
APIError(400) whose `param` is the field's path (`messages[2].content`), and what the
handlers get back is typed and normalised (developer messages as system ones, text parts
joined, tool call arguments as mappings the chat templates can `tojson`).

Fields we do not know are ignored: clients send many (`user`, `metadata`, Open WebUI's
own). Fields we know but cannot honour (`n` > 1, `logprobs`, `suffix`) are refused, not
silently dropped, so a client never takes an answer for what it did not ask.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from exo_rkllm.api.errors import APIError

MAX_STOP = 16
MAX_EMBEDDING_INPUTS = 256
MAX_TOKENS_LIMIT = 2 ** 31 - 1  # no model has more context than this: a bigger count is a client bug
MAX_TOKEN_ID = 2 ** 31 - 1
MAX_DEPTH = 64  # nesting of tool schemas, arguments and template kwargs (JSON has no limit of its own)
ROLES = ("system", "user", "assistant", "tool")
REASONING_FORMATS = ("none", "deepseek", "deepseek-legacy", "auto")
PRIORITIES = ("interactive", "background")
TOOL_CHOICES = ("none", "auto", "required")
# Variables a chat template receives from the tokenizer itself; a client's chat_template_kwargs
# may not replace them (messages, tools) nor the special tokens (they are template structure:
# a client's bos_token would become control tokens).
RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "tokenize",
    "return_dict", "chat_template", "tokenizer_kwargs", "conversation", "padding", "truncation",
    "max_length", "return_tensors", "return_assistant_tokens_mask", "bos_token", "eos_token", "unk_token",
    "sep_token", "pad_token", "cls_token", "mask_token", "additional_special_tokens", "raise_exception",
    "strftime_now",
})
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Sampling:
    """The request's sampling settings; None: the request did not give it (the model's value applies)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # 0: no limit (OpenAI-style clients send -1 for that; normalised to 0)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def given(self) -> bool:
        """Whether the request set anything (else the model's own sampling is used unchanged)."""
        return any(getattr(self, name) is not None for name in self.__dataclass_fields__)



@dataclass(frozen=True)
class ChatRequest:
    """/v1/chat/completions, checked.

    Each message is a dict: `role` (system, user, assistant, tool; developer becomes system),
    `content` (a string; a list of parts only when it holds images: `{"type": "text", "text"}`
    and the image parts as sent; None for an assistant message that only calls tools), plus
    `tool_calls` (assistant: `{"id"?, "type": "function", "function": {"name", "arguments": dict}}`,
    the client's JSON arguments parsed, since templates render them with `tojson`),
    `tool_call_id` (tool), `name`, `reasoning_content` (assistant) when given."""

    model: str | None
    messages: tuple[dict, ...]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    sampling: Sampling = Sampling()
    tools: tuple[dict, ...] | None = None
    tool_choice: str | dict | None = None
    reasoning_format: str | None = None
    enable_thinking: bool | None = None
    chat_template_kwargs: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))
    priority: str | None = None
    user: str | None = None


@dataclass(frozen=True)
class CompletionRequest:
    """/v1/completions, checked: one prompt (text or token ids) per request."""

    model: str | None
    prompt: str | tuple[int, ...]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int = 16  # OpenAI's default for completions
    stop: tuple[str, ...] = ()
    sampling: Sampling = Sampling()
    echo: bool = False
    priority: str | None = None


@dataclass(frozen=True)
class EmbeddingRequest:
    """/v1/embeddings, checked: each input a non-empty text or a non-empty list of token ids."""

    model: str | None
    inputs: tuple[str | tuple[int, ...], ...]
    encoding_format: str = "float"
    dimensions: int | None = None


# -- small checkers ------------------------------------------------------------------------------
def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _kind(value: object) -> str:
    """The JSON name of a value's type, for messages ("got a number")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _wrong_type(param: str, expected: str, value: object) -> APIError:
    return _bad(param, f"'{param}' must be {expected}, got {_kind(value)}", "invalid_type")


def _object(data: object, param: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        if param:
            raise _wrong_type(param, "an object", data)
        raise APIError(400, f"the request body must be a JSON object, got {_kind(data)}", code="invalid_request")
    return data


def _opt_str(data: Mapping[str, Any], key: str, param: str | None = None) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _wrong_type(param or key, "a string", value)
    return value


def _opt_bool(data: Mapping[str, Any], key: str, param: str | None = None) -> bool | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _wrong_type(param or key, "true or false", value)
    return value


def _number(value: object, param: str, low: float, high: float, *, low_open: bool = False) -> float:
    """A finite JSON number in [low, high] (or (low, high]); booleans are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(param, "a number", value)
    number = float(value) if not isinstance(value, int) or abs(value) < 2 ** 63 else math.inf
    if not math.isfinite(number):
        raise _bad(param, f"'{param}' must be a finite number")
    if number < low or number > high or (low_open and number == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise _bad(param, f"'{param}' must be in {interval}, got {value!r}")
    return number


def _integer(value: object, param: str, low: int, high: int) -> int:
    """A JSON integer in [low, high] (2.0 counts as 2; 2.5, true and "2" do not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(param, "an integer", value)
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise _wrong_type(param, "an integer", value)
        value = int(value)
    if value < low or value > high:
        raise _bad(param, f"'{param}' must be between {low} and {high}, got {value}")
    return value


def _opt_number(data: Mapping[str, Any], key: str, low: float, high: float, **kw: Any) -> float | None:
    return None if data.get(key) is None else _number(data[key], key, low, high, **kw)


def _opt_integer(data: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    return None if data.get(key) is None else _integer(data[key], key, low, high)


def _check_depth(value: object, param: str, limit: int = MAX_DEPTH) -> None:
    """Refuse JSON nested deeper than `limit` without recursing (a template's tojson would)."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth >= limit:
            raise _bad(param, f"'{param}' is nested more than {limit} levels deep", "too_deep")
        stack.extend((child, depth + 1) for child in children)


def _model(data: Mapping[str, Any]) -> str | None:
    model = _opt_str(data, "model")
    return model if model and model.strip() else None


def _refuse_unsupported(data: Mapping[str, Any]) -> None:
    """Fields we cannot honour: a 400 that says so, never a silently different answer."""
    n = data.get("n")
    if n is not None and _integer(n, "n", 0, MAX_TOKENS_LIMIT) != 1:
        raise _bad("n", "only one choice per request is supported: 'n' must be 1", "unsupported_value")
    logprobs = data.get("logprobs")
    if logprobs is not None and logprobs is not False:
        if isinstance(logprobs, bool) or isinstance(logprobs, (int, float)):
            raise _bad("logprobs", "'logprobs' is not supported by this server", "unsupported_value")
        raise _wrong_type("logprobs", "a boolean", logprobs)
    top = data.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, (int, float)) or top != 0):
        raise _bad("top_logprobs", "'top_logprobs' is not supported by this server", "unsupported_value")


def _stop(data: Mapping[str, Any]) -> tuple[str, ...]:
    value = data.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if not isinstance(value, list):
        raise _wrong_type("stop", "a string or an array of strings", value)
    if len(value) > MAX_STOP:
        raise _bad("stop", f"'stop' may hold at most {MAX_STOP} strings, got {len(value)}")
    out: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _wrong_type(f"stop[{i}]", "a string", item)
        if item and item not in out:
            out.append(item)
    return tuple(out)


def _stream(data: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = bool(_opt_bool(data, "stream"))
    options = data.get("stream_options")
    include = False
    if options is not None:
        options = _object(options, "stream_options")
        include = bool(_opt_bool(options, "include_usage", "stream_options.include_usage"))
    return stream, include and stream


def _max_tokens(data: Mapping[str, Any]) -> int | None:
    """max_completion_tokens (the newer name) wins over max_tokens."""
    for key in ("max_completion_tokens", "max_tokens"):
        if data.get(key) is not None:
            return _integer(data[key], key, 1, MAX_TOKENS_LIMIT)
    return None


def _sampling(data: Mapping[str, Any]) -> Sampling:
    top_k = _opt_integer(data, "top_k", -1, 1_000_000)
    return Sampling(
        temperature=_opt_number(data, "temperature", 0.0, 2.0),
        top_p=_opt_number(data, "top_p", 0.0, 1.0),
        top_k=None if top_k is None else max(top_k, 0),
        frequency_penalty=_opt_number(data, "frequency_penalty", -2.0, 2.0),
        presence_penalty=_opt_number(data, "presence_penalty", -2.0, 2.0),
        repetition_penalty=_opt_number(data, "repetition_penalty", 0.0, 10.0, low_open=True),
        seed=_opt_integer(data, "seed", -(2 ** 63), 2 ** 64 - 1),
    )


def _priority(data: Mapping[str, Any]) -> str | None:
    value = _opt_str(data, "priority")
    if value is not None and value not in PRIORITIES:
        raise _bad("priority", f"'priority' must be one of {', '.join(PRIORITIES)}, got {value!r}")
    return value


# -- messages ----------------------------------------------------------------------------------
_TEXT_PART_TYPES = ("text", "input_text")
_IMAGE_PART_TYPES = ("image_url", "input_image")


def _parts(value: list, param: str, role: str) -> str | list[dict]:
    """A list of content parts: a string when they are all text (joined as vLLM does, with
    newlines), else the list with text parts normalised and image parts kept as sent."""
    parts: list[dict] = []
    has_image = False
    for i, part in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(part, Mapping):
            raise _wrong_type(where, "a content part object ({\"type\": \"text\", \"text\": ...})", part)
        kind = part.get("type")
        if not isinstance(kind, str):
            raise _wrong_type(f"{where}.type", "a string", kind)
        if kind in _TEXT_PART_TYPES or (kind == "refusal" and role == "assistant"):
            key = "refusal" if kind == "refusal" else "text"
            text = part.get(key)
            if not isinstance(text, str):
                raise _wrong_type(f"{where}.{key}", "a string", text)
            parts.append({"type": "text", "text": text})
        elif kind in _IMAGE_PART_TYPES and role == "user":
            image = part.get("image_url")  # Chat: {"url": ...}; Responses-style input_image: the URL
            url = image.get("url") if isinstance(image, Mapping) else image
            if not isinstance(url, str) or not url:
                raise _wrong_type(f"{where}.image_url" + (".url" if isinstance(image, Mapping) else ""),
                                  "a non-empty string (the image's URL)", url)
            has_image = True
            parts.append(dict(part))
        else:
            allowed = "text" if role != "user" else "text or image_url"
            raise _bad(f"{where}.type", f"'{where}.type' {kind!r} is not supported in a {role} message "
                       f"(expected {allowed})", "unsupported_content")
    if has_image:
        return parts
    return "\n".join(p["text"] for p in parts)


def _content(message: Mapping[str, Any], param: str, role: str, optional: bool) -> str | list[dict] | None:
    where = f"{param}.content"
    value = message.get("content")
    if value is None:
        if optional:
            return None
        raise _bad(where, f"'{where}' is required in a {role} message (a string or an array of parts)",
                   "missing_field")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _parts(value, where, role)
    raise _wrong_type(where, "a string or an array of content parts", value)


def _arguments(value: object, param: str) -> dict:
    """Tool call arguments as a mapping: OpenAI sends a JSON string, some clients an object."""
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise _bad(param, f"'{param}' must be a JSON object (as a string), and is not valid JSON") from None
    if not isinstance(value, dict):
        raise _wrong_type(param, "a JSON object", value)
    _check_depth(value, param)
    return value


def _tool_calls(value: object, param: str) -> list[dict]:
    if not isinstance(value, list):
        raise _wrong_type(param, "an array", value)
    calls = []
    for i, call in enumerate(value):
        where = f"{param}[{i}]"
        call = _object(call, where)
        kind = call.get("type", "function")
        if kind != "function":
            raise _bad(f"{where}.type", f"'{where}.type' must be \"function\", got {kind!r}", "unsupported_value")
        function = _object(call.get("function"), f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise _wrong_type(f"{where}.function.name", "a non-empty string", name)
        out = {"type": "function",
               "function": {"name": name, "arguments": _arguments(function.get("arguments"),
                                                                  f"{where}.function.arguments")}}
        call_id = _opt_str(call, "id", f"{where}.id")
        if call_id is not None:
            out["id"] = call_id
        calls.append(out)
    return calls


def _message(message: object, index: int) -> dict:
    param = f"messages[{index}]"
    message = _object(message, param)
    role = message.get("role")
    if not isinstance(role, str):
        raise _wrong_type(f"{param}.role", "a string", role)
    if role == "developer":
        role = "system"
    if role not in ROLES:
        raise _bad(f"{param}.role", f"'{param}.role' must be one of system, developer, user, assistant, tool; "
                   f"got {role!r}", "invalid_role")
    out: dict[str, Any] = {"role": role}
    if role == "assistant":
        calls = message.get("tool_calls")
        calls = _tool_calls(calls, f"{param}.tool_calls") if calls is not None else []
        content = _content(message, param, role, optional=True)
        out["content"] = "" if content is None and not calls else content
        if calls:
            out["tool_calls"] = calls
        reasoning = _opt_str(message, "reasoning_content", f"{param}.reasoning_content")
        if reasoning is not None:
            out["reasoning_content"] = reasoning
    else:
        out["content"] = _content(message, param, role, optional=False)
    if role == "tool":
        call_id = _opt_str(message, "tool_call_id", f"{param}.tool_call_id")
        if call_id is not None:
            out["tool_call_id"] = call_id
    name = _opt_str(message, "name", f"{param}.name")
    if name is not None:
        out["name"] = name
    return out


def _messages(data: Mapping[str, Any]) -> tuple[dict, ...]:
    value = data.get("messages")
    if value is None:
        raise _bad("messages", "'messages' is required: a non-empty array of messages", "missing_field")
    if not isinstance(value, list):
        raise _wrong_type("messages", "an array of messages", value)
    if not value:
        raise _bad("messages", "'messages' must not be empty")
    return tuple(_message(m, i) for i, m in enumerate(value))


# -- tools ------------------------------------------------------------------------------------
def _tools(data: Mapping[str, Any]) -> tuple[dict, ...] | None:
    value = data.get("tools")
    if value is None:
        return None
    if not isinstance(value, list):
        raise _wrong_type("tools", "an array of tools", value)
    tools: list[dict] = []
    names: set[str] = set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        tool = _object(tool, where)
        if tool.get("type", "function") != "function":
            raise _bad(f"{where}.type", f"'{where}.type' must be \"function\", got {tool.get('type')!r}",
                       "unsupported_value")
        function = _object(tool.get("function"), f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _wrong_type(f"{where}.function.name", "a non-empty string", name)
        if len(name) > 256:
            raise _bad(f"{where}.function.name", f"'{where}.function.name' is longer than 256 characters")
        if name in names:
            raise _bad(f"{where}.function.name", f"'{where}.function.name': two tools are named {name!r}")
        names.add(name)
        out: dict[str, Any] = {"name": name}
        description = _opt_str(function, "description", f"{where}.function.description")
        if description is not None:
            out["description"] = description
        parameters = function.get("parameters")
        if parameters is not None:
            parameters = _object(parameters, f"{where}.function.parameters")
            _check_depth(parameters, f"{where}.function.parameters")
            out["parameters"] = dict(parameters)
        strict = _opt_bool(function, "strict", f"{where}.function.strict")
        if strict is not None:
            out["strict"] = strict
        tools.append({"type": "function", "function": out})
    return tuple(tools) or None


def _tool_choice(data: Mapping[str, Any], tools: tuple[dict, ...] | None) -> str | dict | None:
    value = data.get("tool_choice")
    if value is None:
        return None
    if isinstance(value, str):
        if value not in TOOL_CHOICES:
            raise _bad("tool_choice", f"'tool_choice' must be none, auto, required or a function, got {value!r}")
        if value == "required" and not tools:
            raise _bad("tool_choice", "'tool_choice' is \"required\" but the request gives no tools")
        return value
    choice = _object(value, "tool_choice")
    if choice.get("type", "function") != "function":
        raise _bad("tool_choice.type", "'tool_choice.type' must be \"function\"", "unsupported_value")
    function = _object(choice.get("function"), "tool_choice.function")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise _wrong_type("tool_choice.function.name", "a non-empty string", name)
    if not tools or name not in {t["function"]["name"] for t in tools}:
        raise _bad("tool_choice.function.name", f"'tool_choice.function.name' is {name!r}, which is not "
                   "one of the request's tools")
    return {"type": "function", "function": {"name": name}}


def _template_kwargs(data: Mapping[str, Any]) -> tuple[Mapping[str, object], bool | None]:
    value = data.get("chat_template_kwargs")
    kwargs: dict[str, object] = {}
    if value is not None:
        value = _object(value, "chat_template_kwargs")
        for key, item in value.items():
            where = f"chat_template_kwargs.{key}"
            if not isinstance(key, str) or not _IDENTIFIER.match(key):
                raise _bad("chat_template_kwargs", f"'chat_template_kwargs' key {key!r} is not a template "
                           "variable name")
            if key in RESERVED_TEMPLATE_KWARGS:
                raise _bad(where, f"'{where}' is set by the server and cannot be given", "reserved_field")
            _check_depth(item, where)
            kwargs[key] = item
    thinking = kwargs.get("enable_thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise _wrong_type("chat_template_kwargs.enable_thinking", "true or false", thinking)
    if thinking is None:  # some clients (Qwen's own API) send it at the top level
        thinking = _opt_bool(data, "enable_thinking")
        if thinking is not None:
            kwargs["enable_thinking"] = thinking
    return MappingProxyType(kwargs), thinking


# -- the three requests --------------------------------------------------------------------------
def parse_chat(data: object) -> ChatRequest:
    """A /v1/chat/completions body, checked and normalised (APIError 400 on any bad field)."""
    data = _object(data, "")
    _refuse_unsupported(data)
    messages = _messages(data)
    stream, include_usage = _stream(data)
    tools = _tools(data)
    tool_choice = _tool_choice(data, tools)
    reasoning_format = _opt_str(data, "reasoning_format")
    if reasoning_format is not None and reasoning_format not in REASONING_FORMATS:
        raise _bad("reasoning_format", f"'reasoning_format' must be one of {', '.join(REASONING_FORMATS)}, "
                   f"got {reasoning_format!r}")
    kwargs, thinking = _template_kwargs(data)
    return ChatRequest(
        model=_model(data), messages=messages, stream=stream, include_usage=include_usage,
        max_tokens=_max_tokens(data), stop=_stop(data), sampling=_sampling(data), tools=tools,
        tool_choice=tool_choice, reasoning_format=reasoning_format, enable_thinking=thinking,
        chat_template_kwargs=kwargs, priority=_priority(data), user=_opt_str(data, "user"),
    )


def _token_ids(value: list, param: str) -> tuple[int, ...]:
    if not value:
        raise _bad(param, f"'{param}' must not be an empty list of tokens")
    return tuple(_integer(t, f"{param}[{i}]", 0, MAX_TOKEN_ID) for i, t in enumerate(value))


def _is_token_list(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, (int, float)) and not isinstance(t, bool) for t in value)


def parse_completion(data: object) -> CompletionRequest:
    """A /v1/completions body: one prompt, a string or token ids (APIError 400 on any bad field)."""
    data = _object(data, "")
    _refuse_unsupported(data)
    best_of = data.get("best_of")
    if best_of is not None and _integer(best_of, "best_of", 0, MAX_TOKENS_LIMIT) != 1:
        raise _bad("best_of", "'best_of' must be 1: one completion per request", "unsupported_value")
    suffix = data.get("suffix")
    if suffix is not None:
        if not isinstance(suffix, str):
            raise _wrong_type("suffix", "a string", suffix)
        if suffix:
            raise _bad("suffix", "'suffix' (fill in the middle) is not supported", "unsupported_value")
    value = data.get("prompt")
    prompt: str | tuple[int, ...]
    if value is None:
        raise _bad("prompt", "'prompt' is required", "missing_field")
    if isinstance(value, str):
        prompt = value
    elif isinstance(value, list):
        if not value:
            raise _bad("prompt", "'prompt' must not be empty")
        if len(value) == 1 and isinstance(value[0], (str, list)):
            inner = value[0]
            if isinstance(inner, str):
                prompt = inner
            else:
                prompt = _token_ids(inner, "prompt[0]")
        elif all(isinstance(v, (str, list)) for v in value):
            raise _bad("prompt", f"'prompt' holds {len(value)} prompts: send one prompt per request",
                       "unsupported_value")
        else:
            prompt = _token_ids(value, "prompt")
    else:
        raise _wrong_type("prompt", "a string or an array of token ids", value)
    if prompt == "":
        raise _bad("prompt", "'prompt' must not be empty")
    stream, include_usage = _stream(data)
    max_tokens = _max_tokens(data)
    echo = _opt_bool(data, "echo")
    return CompletionRequest(
        model=_model(data), prompt=prompt, stream=stream, include_usage=include_usage,
        max_tokens=16 if max_tokens is None else max_tokens, stop=_stop(data), sampling=_sampling(data),
        echo=bool(echo), priority=_priority(data),
    )


def parse_embedding(data: object) -> EmbeddingRequest:
    """A /v1/embeddings body (APIError 400 on any bad field)."""
    data = _object(data, "")
    value = data.get("input")
    if value is None:
        raise _bad("input", "'input' is required: a string, an array of strings or of token ids",
                   "missing_field")
    inputs: list[str | tuple[int, ...]]
    if isinstance(value, str):
        inputs = [value]
    elif isinstance(value, list):
        if not value:
            raise _bad("input", "'input' must not be empty")
        if _is_token_list(value):
            inputs = [_token_ids(value, "input")]
        else:
            inputs = []
            for i, item in enumerate(value):
                if isinstance(item, str):
                    inputs.append(item)
                elif isinstance(item, list):
                    inputs.append(_token_ids(item, f"input[{i}]"))
                else:
                    raise _wrong_type(f"input[{i}]", "a string or an array of token ids", item)
    else:
        raise _wrong_type("input", "a string or an array", value)
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise _bad("input", f"'input' may hold at most {MAX_EMBEDDING_INPUTS} inputs, got {len(inputs)}")
    for i, item in enumerate(inputs):
        if isinstance(item, str) and not item:
            where = "input" if isinstance(value, str) else f"input[{i}]"
            raise _bad(where, f"'{where}' must not be an empty string")
    encoding = _opt_str(data, "encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise _bad("encoding_format", f"'encoding_format' must be float or base64, got {encoding!r}")
    dimensions = _opt_integer(data, "dimensions", 1, 1_000_000)
    return EmbeddingRequest(model=_model(data), inputs=tuple(inputs), encoding_format=encoding,
                            dimensions=dimensions)
