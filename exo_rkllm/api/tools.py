"""Turn a model's tool-call syntax into OpenAI `tool_calls`, piece by piece.

RKLLM users run three families of tool-calling models, each with its own
syntax (the chat template tells which, see `family_for`):

- HERMES (Qwen2.5, Qwen3, any template mentioning `<tool_call>`): blocks of
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, possibly
  after some text. The text outside valid blocks is content, except the
  whitespace that separates it from a call: whitespace right before a call and
  right after one is dropped (it is how the template lays calls out, and the
  template puts it back when the history is rendered again), so an answer that
  is only calls has empty content.
- LLAMA3 (Llama 3.1/3.2/3.3): the whole answer is `{"name": ..., "parameters":
  {...}}` (or `"arguments"`), optionally after `<|python_tag|>`, several calls
  separated by `;`. Only an answer that starts (after whitespace) with `{` or
  `<|python_tag|>` is a candidate, and every object must be a call (with a
  `parameters` or `arguments` key, so a JSON answer about a person named Alice
  is not taken for a call); otherwise the answer is text.
- MISTRAL: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` after optional
  text. `[TOOL_CALLS]` is a control token that the detokenizer may skip, so an
  answer that is only such a JSON array (starting `[{`) counts too.

Anything that only looks like a call, or does not parse (bad JSON, no name, a
name not among the request's tools, a `<tool_call>` never closed), stays text
exactly as the model wrote it. Streaming holds back only text that could still
be the start of a call; a call is emitted whole, as one `ToolDelta`, once it is
complete (for LLAMA3, and MISTRAL after `[TOOL_CALLS]`, that is the end of the
answer, since only the whole answer decides). Whatever the split of the answer
into pieces, the result is the one `parse_all` gives for the whole answer.
"""
from __future__ import annotations

import enum
import json
import secrets
from dataclasses import dataclass
from typing import Any, Collection, Iterable

_WS = " \t\n\r\f\v"

HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_TAG = "[TOOL_CALLS]"


class ToolFamily(str, enum.Enum):
    NONE = "none"
    HERMES = "hermes"
    LLAMA3 = "llama3"
    MISTRAL = "mistral"


def family_for(chat_template: str | None) -> ToolFamily:
    """The tool-call syntax a model writes, from its chat template's source text."""
    if not chat_template:
        return ToolFamily.NONE
    if HERMES_OPEN in chat_template:
        return ToolFamily.HERMES
    if PYTHON_TAG in chat_template or "ipython" in chat_template:
        return ToolFamily.LLAMA3
    if MISTRAL_TAG in chat_template:
        return ToolFamily.MISTRAL
    return ToolFamily.NONE


def new_call_id() -> str:
    """`call_` and 24 random url-safe characters (18 random bytes), unique per call."""
    return "call_" + secrets.token_urlsafe(18)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of the arguments object

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolDelta:
    """One entry of a streamed `delta.tool_calls` list: a whole call at its index in the answer."""

    index: int
    call: ToolCall

    def to_openai(self) -> dict[str, Any]:
        return {"index": self.index, **self.call.to_openai()}


@dataclass(frozen=True)
class Parsed:
    """What one piece of the answer adds: content to show and calls completed."""

    content: str = ""
    tool_calls: tuple[ToolDelta, ...] = ()


def _skip_ws(s: str, i: int) -> int:
    n = len(s)
    while i < n and s[i] in _WS:
        i += 1
    return i


def _rstrip_end(s: str, start: int, end: int) -> int:
    """The end of s[start:end] without its trailing whitespace."""
    while end > start and s[end - 1] in _WS:
        end -= 1
    return end


def _partial_suffix(s: str, start: int, tag: str) -> int:
    """Length of the longest suffix of s[start:] that is a proper prefix of `tag`."""
    for n in range(min(len(s) - start, len(tag) - 1), 0, -1):
        if tag.startswith(s[len(s) - n:]):
            return n
    return 0


class _Mode(enum.Enum):
    UNDECIDED = "undecided"  # the start of the answer does not tell yet
    TEXT = "text"  # content, watching for a call
    HOLD = "hold"  # a candidate call: everything held until the answer ends


class ToolCallParser:
    """Feed the answer's content pieces in order; `finish()` at the end.

    `tool_names`, when given, are the names of the request's tools: a call to
    any other name stays text (a model inventing a tool is not a tool call).
    """

    def __init__(self, family: ToolFamily | str, tool_names: Collection[str] | None = None) -> None:
        self.family = ToolFamily(family)
        self._names = frozenset(tool_names) if tool_names is not None else None
        self._buf = ""
        self._after_call = False  # HERMES: whitespace after a call is dropped
        self._mode = _Mode.TEXT if self.family is ToolFamily.HERMES else _Mode.UNDECIDED
        self.calls: list[ToolCall] = []

    def push(self, text: str) -> Parsed:
        if self.family is ToolFamily.NONE:
            return Parsed(content=text)
        self._buf += text
        return self._scan(final=False)

    def finish(self) -> Parsed:
        """End of the answer: decide what was held back (calls, or text as written)."""
        if self.family is ToolFamily.NONE:
            return Parsed()
        return self._scan(final=True)

    # -- scanning ---------------------------------------------------------------------------------------
    def _scan(self, final: bool) -> Parsed:
        content: list[str] = []
        deltas: list[ToolDelta] = []
        if self.family is ToolFamily.HERMES:
            pos = self._scan_hermes(final, content, deltas)
        elif self.family is ToolFamily.LLAMA3:
            pos = self._scan_llama3(final, content, deltas)
        else:
            pos = self._scan_mistral(final, content, deltas)
        self._buf = self._buf[pos:]
        return Parsed(content="".join(content), tool_calls=tuple(deltas))

    def _add_calls(self, calls: Iterable[ToolCall], deltas: list[ToolDelta]) -> None:
        for call in calls:
            deltas.append(ToolDelta(len(self.calls), call))
            self.calls.append(call)

    def _scan_hermes(self, final: bool, content: list[str], deltas: list[ToolDelta]) -> int:
        """Consume what is certain in the buffer; return how far it got.

        Each step is decided by the buffer alone (never by where a piece ended),
        which is what makes every split of the answer give the same result.
        """
        buf = self._buf
        pos = 0
        while True:
            if self._after_call:
                pos = _skip_ws(buf, pos)  # the separator after a call, whatever follows, is dropped
                if pos == len(buf):
                    return pos
            p = buf.find(HERMES_OPEN, pos)
            if p < 0:
                end = len(buf)
                if not final:  # hold a possible `<tool_c` and the whitespace that could precede a call
                    end = _rstrip_end(buf, pos, end - _partial_suffix(buf, pos, HERMES_OPEN))
                self._text(buf[pos:end], content)
                return end
            body = p + len(HERMES_OPEN)
            q = buf.find(HERMES_CLOSE, body)
            p2 = buf.find(HERMES_OPEN, body)
            if p2 >= 0 and (q < 0 or p2 < q):
                # Another `<tool_call>` before any close: the first one was prose (it can never
                # become a valid block), the later one may still start a call.
                end = _rstrip_end(buf, pos, p2)
                self._text(buf[pos:end], content)
                pos = end
                continue
            if q < 0:
                if final:  # never closed: text, exactly as written
                    self._text(buf[pos:], content)
                    return len(buf)
                end = _rstrip_end(buf, pos, p)
                self._text(buf[pos:end], content)
                return end
            end = q + len(HERMES_CLOSE)
            call = self._hermes_call(buf[body:q])
            if call is None:  # a block that does not parse stays text, tags and all
                self._text(buf[pos:end], content)
            else:
                self._text(buf[pos:_rstrip_end(buf, pos, p)], content)
                self._add_calls([call], deltas)
                self._after_call = True
            pos = end

    def _text(self, text: str, content: list[str]) -> None:
        if text:
            content.append(text)
            self._after_call = False

    def _scan_llama3(self, final: bool, content: list[str], deltas: list[ToolDelta]) -> int:
        buf = self._buf
        if self._mode is _Mode.UNDECIDED:
            rest = buf[_skip_ws(buf, 0):]
            if rest.startswith("{") or rest.startswith(PYTHON_TAG):
                self._mode = _Mode.HOLD
            elif (not rest or PYTHON_TAG.startswith(rest)) and not final:
                return 0
            else:
                self._mode = _Mode.TEXT
        if self._mode is _Mode.TEXT:
            self._text(buf, content)
            return len(buf)
        if not final:
            return 0
        calls = self._llama3_calls(buf)
        if calls is None:
            self._text(buf, content)
        else:
            self._add_calls(calls, deltas)
        return len(buf)

    def _scan_mistral(self, final: bool, content: list[str], deltas: list[ToolDelta]) -> int:
        buf = self._buf
        pos = 0
        if self._mode is _Mode.UNDECIDED:
            rest = buf[_skip_ws(buf, 0):]
            after_bracket = rest[_skip_ws(rest, 1):] if rest.startswith("[") else ""
            if after_bracket.startswith("{"):
                self._mode = _Mode.HOLD  # a bare call array: [TOOL_CALLS] was skipped as a special token
            elif not final and (not rest or MISTRAL_TAG.startswith(rest)
                                or (rest.startswith("[") and not after_bracket)):
                return 0
            else:
                self._mode = _Mode.TEXT
        if self._mode is _Mode.TEXT:
            i = buf.find(MISTRAL_TAG)
            if i < 0:
                end = len(buf)
                if not final:
                    end = _rstrip_end(buf, 0, end - _partial_suffix(buf, 0, MISTRAL_TAG))
                self._text(buf[:end], content)
                return end
            pos = _rstrip_end(buf, 0, i)
            self._text(buf[:pos], content)
            self._mode = _Mode.HOLD
        if not final:
            return pos
        held = buf[pos:]
        calls = self._mistral_calls(held)
        if calls is None:
            self._text(held, content)
        else:
            self._add_calls(calls, deltas)
        return len(buf)

    # -- the calls themselves ---------------------------------------------------------------------------
    def _hermes_call(self, inner: str) -> ToolCall | None:
        try:
            obj = json.loads(inner)
        except (ValueError, RecursionError):  # a model may write anything
            return None
        return self._make_call(obj, ("arguments", "parameters"), require_arguments=False)

    def _llama3_calls(self, text: str) -> list[ToolCall] | None:
        body = text[_skip_ws(text, 0):]
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG):]
        objs = _json_sequence(body, ";")
        if not objs:
            return None
        return self._make_calls(objs, ("parameters", "arguments"), require_arguments=True)

    def _mistral_calls(self, text: str) -> list[ToolCall] | None:
        i = text.find(MISTRAL_TAG)
        tagged = i >= 0
        body = text[i + len(MISTRAL_TAG):] if tagged else text
        try:
            value = json.loads(body)
        except (ValueError, RecursionError):  # a model may write anything
            return None
        if tagged and isinstance(value, dict):
            value = [value]
        if not isinstance(value, list) or not value:
            return None
        # Without the tag only the JSON tells, so it must look like calls through and through.
        return self._make_calls(value, ("arguments", "parameters"), require_arguments=not tagged)

    def _make_calls(self, objs: list[Any], keys: tuple[str, ...], require_arguments: bool) -> list[ToolCall] | None:
        calls = [self._make_call(obj, keys, require_arguments) for obj in objs]
        if any(c is None for c in calls):
            return None  # one bad call makes the whole answer text: it is not what a call-only answer looks like
        return [c for c in calls if c is not None]

    def _make_call(self, obj: Any, keys: tuple[str, ...], require_arguments: bool) -> ToolCall | None:
        if not isinstance(obj, dict):
            return None
        name = obj.get("name")
        if not isinstance(name, str) or not name.strip():
            return None
        if self._names is not None and name not in self._names:
            return None
        key = next((k for k in keys if k in obj), None)
        if key is None and require_arguments:
            return None
        args = obj[key] if key is not None else None
        if args is None:
            arguments = "{}"
        elif isinstance(args, dict):
            arguments = json.dumps(args, ensure_ascii=False)
        elif isinstance(args, str):
            # Arguments written as JSON text are passed through as that text, if it is an object.
            try:
                decoded = json.loads(args)
            except (ValueError, RecursionError):  # a model may write anything
                return None
            if not isinstance(decoded, dict):
                return None
            arguments = args
        else:
            return None
        return ToolCall(id=new_call_id(), name=name, arguments=arguments)


def _json_sequence(text: str, separator: str) -> list[Any] | None:
    """JSON values separated by `separator` (a trailing one allowed) and whitespace; None if anything else."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    i = _skip_ws(text, 0)
    while i < len(text):
        if values:
            if not text.startswith(separator, i):
                return None
            i = _skip_ws(text, i + len(separator))
            if i == len(text):
                break
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)
        i = _skip_ws(text, i)
    return values


def parse_all(family: ToolFamily | str, text: str,
              tool_names: Collection[str] | None = None) -> tuple[str, list[ToolCall]]:
    """A whole answer's content and calls (the non-streamed path): the same rules as the streaming parser."""
    parser = ToolCallParser(family, tool_names)
    first = parser.push(text)
    last = parser.finish()
    return first.content + last.content, list(parser.calls)
