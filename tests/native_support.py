"""Helpers shared by the native backend tests: fake model files, specs, runs, the fake's trace."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from exo_rkllm.runtime.base import FinishEvent, GenerationInput, ModelSpec, SamplingParams, TokenEvent
from fake_rkllm import write_fake_model

# Splits characters across tokens in Qwen's vocabulary (so the WAITING state is exercised).
MULTIBYTE = "Hé 世界 🤖👩‍💻 ¿qué? 日本語  \t café 🇫🇷"
VERSIONS = ["1.1.4", "1.2.0", "1.2.3", "1.3.0"]


def fake_model(folder: Path, tok: Any, version: str, answers: Sequence[Any] = (MULTIBYTE,), name: str = "m.rkllm",
               **settings: Any) -> Path:
    settings.setdefault("trace", str(folder / "trace.txt"))
    return write_fake_model(folder / name, tok, answers, toolkit_version=version, **settings)


def spec_for(path: Path, tokenizer_dir: Path, max_context_len: int = 4096, max_new_tokens: int = 0,
             **options: str) -> ModelSpec:
    return ModelSpec(model_id="fake-model", path=path, max_context_len=max_context_len,
                     max_new_tokens=max_new_tokens, sampling=SamplingParams(top_k=7, top_p=0.5, temperature=0.3),
                     tokenizer_dir=tokenizer_dir, options=options)


async def run(rt: Any, ids: Sequence[int], **kw: Any) -> tuple[list[TokenEvent], FinishEvent]:
    events = [e async for e in rt.generate(GenerationInput("r", tuple(ids), **kw))]
    assert isinstance(events[-1], FinishEvent)
    return [e for e in events if isinstance(e, TokenEvent)], events[-1]


def prompt_ids(tok: Any, text: str) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                              add_generation_prompt=True))


def trace(folder: Path) -> list[str]:
    """The fake runtime's log of API calls: 'pid op details...' per line."""
    path = folder / "trace.txt"
    return [line.split(" ", 1)[1] for line in path.read_text().splitlines()] if path.exists() else []


def text_of(tokens: Sequence[TokenEvent]) -> str:
    return "".join(t.text for t in tokens)
