"""Who waits for a request: the person in front of a chat, or background work.

The scheduler serves interactive requests first; this is where an HTTP request
is classified, from what clients actually send.
"""
from __future__ import annotations

from typing import Any, Mapping

from exo_rkllm.scheduler.scheduler import Priority

PRIORITY_HEADER = "X-Priority"
# Open WebUI's task prompts (title, tags, follow-ups, queries, autocomplete, emoji) all open so.
TASK_PROMPT_OPENING = "### Task:"


def priority_named(value: Any) -> Priority | None:
    text = str(value).strip().lower() if isinstance(value, str) else ""
    return next((p for p in Priority if p.value == text), None)


def text_of(content: Any) -> str:
    """A message's text: a string, or the text parts of an OpenAI content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def classify_request(data: Mapping[str, Any], headers: Mapping[str, str]) -> Priority:
    """Who waits for a request, from the first rule that says:

    1. the `X-Priority` header, `background` or `interactive`;
    2. the request's own `"priority"` field, same values;
    3. a chat client's background task: the last user message opens with Open WebUI's task
       heading (`### Task:`, as its title, tags and follow-up prompts do);
    4. otherwise a streamed request is a person reading as it comes (interactive), and a
       non-streamed one is background: whoever sent it waits for all of it anyway."""
    named = priority_named(headers.get(PRIORITY_HEADER)) or priority_named(data.get("priority"))
    if named is not None:
        return named
    messages = data.get("messages")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"] if isinstance(messages, list) else []
    if users and text_of(users[-1].get("content")).lstrip().startswith(TASK_PROMPT_OPENING):
        return Priority.BACKGROUND
    return Priority.INTERACTIVE if data.get("stream") is True else Priority.BACKGROUND
