"""The benchmark's prompts: the five standard categories, user prompt files, the multi-turn script.

The five standard prompts are fixed word for word, because users compare
engines and boards by them: changing one changes every published figure.
They are short on purpose, so that on an RK3588 the run measures decode and
first-token latency rather than long-prompt prefill.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchPrompt:
    category: str
    prompt: str


STANDARD_PROMPTS: tuple[BenchPrompt, ...] = (
    BenchPrompt("Math", "What is 145 + 278?"),
    BenchPrompt("Explanation", "What is Python in one sentence?"),
    BenchPrompt("Code Generation", "Write a Python function to check if a number is prime."),
    BenchPrompt("Reasoning", "Is 17 a prime number? Explain."),
    BenchPrompt("Creative", "Write a haiku about AI."),
)

# Ten user turns of one conversation. Each follows from the previous answers, so a
# server that keeps the KV cache only has to prefill the new turn; one that does
# not re-prefills the whole, growing, history and its TTFT climbs turn by turn.
MULTI_TURN_SCRIPT: tuple[str, ...] = (
    "I am setting up an Orange Pi 5 with an RK3588. What is an NPU?",
    "How many NPU cores does the RK3588 have?",
    "Which model sizes fit in 8 GB of RAM?",
    "What does w8a8 quantization mean?",
    "Why is the first token slower than the others?",
    "How does a KV cache help in a conversation like this one?",
    "What limits the decode speed on this board?",
    "Should I cool the board actively?",
    "Summarise our conversation in one sentence.",
    "Thank you. Any last tip?",
)


class PromptFileError(ValueError):
    """A prompt file the user gave cannot be read; the message says what is expected."""


def load_prompt_file(path: Path) -> tuple[BenchPrompt, ...]:
    """Read the user's own prompts.

    Accepted, so a user can write whichever is handiest:
    - JSON: a list of {"category": ..., "prompt": ...} objects, a list of strings,
      or an object mapping category to prompt;
    - text: one prompt per line, optionally `Category: prompt` (blank lines and
      lines starting with `#` are skipped).
    Prompts without a category are named `Prompt 1`, `Prompt 2`, ...
    """
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PromptFileError(f"cannot read the prompt file {path}: {exc}") from None
    prompts: list[BenchPrompt] = []
    if path.suffix.lower() == ".json" or raw.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise PromptFileError(f"{path} is not valid JSON: {exc}") from None
        items: list[tuple[str | None, object]]
        if isinstance(data, dict):
            items = [(str(k), v) for k, v in data.items()]
        elif isinstance(data, list):
            items = []
            for entry in data:
                if isinstance(entry, dict):
                    items.append((entry.get("category") or entry.get("name"), entry.get("prompt")))
                else:
                    items.append((None, entry))
        else:
            raise PromptFileError(f"{path}: expected a JSON list or object of prompts")
        for category, prompt in items:
            if not isinstance(prompt, str) or not prompt.strip():
                raise PromptFileError(f"{path}: every prompt must be a non-empty string (got {prompt!r})")
            prompts.append(BenchPrompt(str(category) if category else f"Prompt {len(prompts) + 1}", prompt.strip()))
    else:
        for line in raw.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            category, sep, rest = line.partition(":")
            if sep and rest.strip() and 0 < len(category) <= 40 and "?" not in category:
                prompts.append(BenchPrompt(category.strip(), rest.strip()))
            else:
                prompts.append(BenchPrompt(f"Prompt {len(prompts) + 1}", line))
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts")
    names = [p.category for p in prompts]
    if len(set(names)) != len(names):
        raise PromptFileError(f"{path}: category names must be unique (they label the table rows)")
    return tuple(prompts)
