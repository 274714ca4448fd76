"""What the client sees of an answer: token ids in, content, reasoning and tool calls out.

One pipeline per request, in the order the meaning requires: the ids are decoded
exactly (a character split over two tokens is held until it is whole), stop
sequences are matched on that text (OpenAI's stop applies to what the model
wrote), the reasoning part is split off, and what remains of the content is
searched for tool calls. Each stage holds back only what may still turn out to
be the start of something it looks for, so streamed pieces concatenate to the
non-streamed answer exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Sequence

from exo_rkllm.models.detok import REPLACEMENT, IncrementalDetokenizer
from exo_rkllm.api.reasoning import ReasoningFormat, ReasoningSplitter
from exo_rkllm.api.stops import StopMatcher
from exo_rkllm.api.tools import ToolCall, ToolCallParser, ToolDelta, ToolFamily


@dataclass
class Delta:
    """The part of the answer that became certain with one update."""

    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolDelta, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)

    def __iadd__(self, other: "Delta") -> "Delta":
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls += other.tool_calls
        return self


@dataclass
class AnswerText:
    tokenizer: Any
    stops: Sequence[str] = ()
    reasoning: ReasoningFormat = ReasoningFormat.NONE
    starts_in_reasoning: bool = False
    tool_family: ToolFamily = ToolFamily.NONE
    tool_names: Collection[str] | None = None
    content: str = field(default="", init=False)
    reasoning_text: str = field(default="", init=False)
    finished: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self._detok = IncrementalDetokenizer(self.tokenizer)
        self._stops = StopMatcher(self.stops)
        self._split = (ReasoningSplitter(self.reasoning, starts_in_reasoning=self.starts_in_reasoning)
                       if self.reasoning is not ReasoningFormat.NONE else None)
        self._tools = ToolCallParser(self.tool_family, self.tool_names) if self.tool_family is not ToolFamily.NONE else None

    @property
    def stopped(self) -> bool:
        """A stop sequence matched: the answer is complete and the generation must be stopped."""
        return self._stops.done

    @property
    def tool_calls(self) -> list[ToolCall]:
        return list(self._tools.calls) if self._tools is not None else []

    def push(self, ids: Sequence[int]) -> Delta:
        if self.finished:
            return Delta()
        text = self._stops.push(self._detok.push_many(ids))
        delta = self._after_stops(text)
        if self._stops.done:
            delta += self._close()
        return delta

    def finish(self) -> Delta:
        """The answer ended (whatever the reason): everything still held back."""
        if self.finished:
            return Delta()
        # An answer cut inside a character (a token limit) leaves its first bytes: the runtime itself
        # never emits half a character (it holds it back, WAITING), so neither does the answer.
        tail = self._detok.flush().rstrip(REPLACEMENT)
        delta = self._after_stops(self._stops.push(tail))
        if not self._stops.done:
            delta += self._after_stops(self._stops.flush())
        delta += self._close()
        return delta

    def _close(self) -> Delta:
        self.finished = True
        delta = Delta()
        if self._split is not None:
            part = self._split.flush()
            delta.reasoning += part.reasoning
            delta += self._content(part.content)
        if self._tools is not None:
            parsed = self._tools.finish()
            delta.content += parsed.content
            delta.tool_calls += parsed.tool_calls
        self.content += delta.content
        self.reasoning_text += delta.reasoning
        return delta

    def _after_stops(self, text: str) -> Delta:
        if not text:
            return Delta()
        if self._split is None:
            delta = self._content(text)
        else:
            part = self._split.push(text)
            delta = self._content(part.content)
            delta.reasoning = part.reasoning
        self.content += delta.content
        self.reasoning_text += delta.reasoning
        return delta

    def _content(self, text: str) -> Delta:
        if not text or self._tools is None:
            return Delta(content=text)
        parsed = self._tools.push(text)
        return Delta(content=parsed.content, tool_calls=parsed.tool_calls)
