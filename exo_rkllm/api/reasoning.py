"""Split a reasoning model's answer into `reasoning_content` and `content`, piece by piece.

DeepSeek-R1 distills and Qwen3 write `<think>…</think>` and then the answer.
Clients of llama.cpp's `--reasoning-format deepseek` (Open WebUI, the openai
SDK's `reasoning_content`) expect the think block in its own field, so this
follows llama.cpp's rules:

- Only a think block at the very start of the answer is reasoning (whitespace
  before `<think>` is allowed and dropped). A `<think>` later in the answer, or
  after the block closed, is ordinary content.
- Some chat templates (DeepSeek-R1's) end the generation prompt with
  `<think>\\n`, so the model starts inside the reasoning and writes only
  `</think>`: `starts_in_reasoning=True` (see `prompt_opens_reasoning`).
- The reasoning is stripped of whitespace at both ends, as llama.cpp strips it:
  its leading whitespace is dropped, and a run of whitespace inside the
  reasoning is held back until text follows it (dropped if `</think>` follows).
  An empty think block (Qwen3 with thinking switched off) therefore gives no
  reasoning at all rather than a "\\n\\n".
- Whitespace and newlines right after `</think>` are dropped, so the content
  starts with the answer's first character (llama.cpp's `consume_spaces`).
- An answer that ends inside the reasoning (cut short by max_tokens) keeps
  what it wrote as reasoning.

Everything else is passed through exactly: for any split of the answer into
pieces the reasoning and content come out the same, and only a possible
partial tag (and the whitespace described above) is ever held back.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

# The characters C's isspace() accepts: what llama.cpp's string_strip and consume_spaces remove.
_WS = " \t\n\r\f\v"


class ReasoningFormat(str, enum.Enum):
    """Where the think block goes (llama.cpp's `reasoning_format` names)."""

    NONE = "none"  # leave everything in content (the think tags stay as text)
    DEEPSEEK = "deepseek"  # <think>…</think> goes to reasoning_content, the rest to content

    @classmethod
    def parse(cls, value: object) -> "ReasoningFormat":
        """A request's or a setting's `reasoning_format`; `ValueError` for anything unknown.

        llama.cpp also knows `deepseek-legacy` (reasoning in both fields while
        streaming) and `auto`; for a think-tag model both mean the same split here.
        """
        if isinstance(value, ReasoningFormat):
            return value
        if isinstance(value, str):
            found = _ALIASES.get(value.strip().lower())
            if found is not None:
                return found
        raise ValueError(f"unknown reasoning_format {value!r}: use one of none, deepseek, deepseek-legacy, auto")


_ALIASES = {"none": ReasoningFormat.NONE, "deepseek": ReasoningFormat.DEEPSEEK,
            "deepseek-legacy": ReasoningFormat.DEEPSEEK, "auto": ReasoningFormat.DEEPSEEK}


@dataclass(frozen=True)
class Split:
    """What one piece of the answer adds to each field."""

    reasoning: str = ""
    content: str = ""


class _State(enum.Enum):
    START = "start"  # nothing decided yet: leading whitespace and maybe part of the open tag held
    REASONING = "reasoning"  # inside the think block
    AFTER_CLOSE = "after_close"  # the block closed; whitespace is still being dropped
    CONTENT = "content"  # plain content to the end


def _partial_suffix(s: str, tag: str) -> int:
    """Length of the longest suffix of `s` that is a proper prefix of `tag` (0 when none)."""
    for n in range(min(len(s), len(tag) - 1), 0, -1):
        if tag.startswith(s[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Feed the answer's text pieces in order; each push returns its reasoning and content parts."""

    def __init__(self, fmt: ReasoningFormat | str, *, starts_in_reasoning: bool = False,
                 open_tag: str = "<think>", close_tag: str = "</think>") -> None:
        if not open_tag or not close_tag:
            raise ValueError("the think tags must not be empty")
        self.fmt = ReasoningFormat.parse(fmt)
        self.open_tag = open_tag
        self.close_tag = close_tag
        self._held = ""
        self._reasoning_started = False  # leading whitespace of the reasoning is dropped until then
        if self.fmt is ReasoningFormat.NONE:
            self._state = _State.CONTENT
        else:
            self._state = _State.REASONING if starts_in_reasoning else _State.START

    @property
    def in_reasoning(self) -> bool:
        """True while the answer is inside its think block."""
        return self._state is _State.REASONING

    def push(self, text: str) -> Split:
        if self._state is _State.CONTENT and not self._held:
            return Split(content=text)
        s, self._held = self._held + text, ""
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            if self._state is _State.START:
                rest = s.lstrip(_WS)
                if rest.startswith(self.open_tag):
                    self._state = _State.REASONING
                    s = rest[len(self.open_tag):]
                    continue
                if not rest or self.open_tag.startswith(rest):
                    self._held = s  # still could be `  <thi…`
                    break
                self._state = _State.CONTENT
                content.append(s)  # not a think block: the whitespace stays, exactly as written
                break
            if self._state is _State.REASONING:
                i = s.find(self.close_tag)
                if i >= 0:
                    reasoning.append(self._reasoning_text(s[:i].rstrip(_WS)))
                    self._state = _State.AFTER_CLOSE
                    s = s[i + len(self.close_tag):]
                    continue
                body = s[:len(s) - _partial_suffix(s, self.close_tag)]
                kept = body.rstrip(_WS)
                self._held = s[len(kept):]  # trailing whitespace and a possible `</thi…`
                reasoning.append(self._reasoning_text(kept))
                break
            if self._state is _State.AFTER_CLOSE:
                rest = s.lstrip(_WS)
                if rest:
                    self._state = _State.CONTENT
                    content.append(rest)
                break
            content.append(s)  # _State.CONTENT
            break
        return Split(reasoning="".join(reasoning), content="".join(content))

    def flush(self) -> Split:
        """End of the answer: what was held back, in the part it belongs to."""
        s, self._held = self._held, ""
        if self._state is _State.START:
            self._state = _State.CONTENT
            return Split(content=s)  # `  <thi` at the very end was never a think block
        if self._state is _State.REASONING:
            # Cut short inside the reasoning: a partial `</thi` is reasoning text; trailing whitespace goes.
            return Split(reasoning=self._reasoning_text(s.rstrip(_WS)))
        return Split(content=s)

    def _reasoning_text(self, text: str) -> str:
        if not self._reasoning_started:
            text = text.lstrip(_WS)
            self._reasoning_started = bool(text)
        return text


def prompt_opens_reasoning(prompt_text: str, open_tag: str = "<think>", close_tag: str = "</think>") -> bool:
    """True when the rendered prompt leaves a think block open for the model to continue.

    DeepSeek-R1's template (and Qwen3-style templates told to think) ends the
    generation prompt with `<think>\\n`; the answer then starts inside the
    reasoning and only `</think>` appears in it. A prompt ending with a closed
    block (`<think>\\n\\n</think>\\n\\n`, Qwen3 with thinking off) does not.
    """
    tail = prompt_text.rstrip(_WS)
    if close_tag and tail.endswith(close_tag):  # a closed block (and tags where one ends the other)
        return False
    # Nothing follows a tag the prompt ends with, so ending with it means it is still open.
    return bool(open_tag) and tail.endswith(open_tag)
