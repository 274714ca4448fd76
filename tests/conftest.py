"""Shared fixtures: a demo model folder (real Qwen2.5 vocabulary, offline) and its pieces."""
from __future__ import annotations

from pathlib import Path

import pytest

from exo_rkllm.demo import DEMO_FILE, write_demo_model
from exo_rkllm.runtime.base import ModelSpec
from exo_rkllm.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def demo_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder (rkllama layout) holding the demo model; built once per test session."""
    root = tmp_path_factory.mktemp("models")
    write_demo_model(root)
    return root


@pytest.fixture(scope="session")
def demo_model_dir(demo_models_dir: Path) -> Path:
    return next(p for p in demo_models_dir.iterdir() if (p / DEMO_FILE).is_file())


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model_dir: Path):
    return load_tokenizer(demo_model_dir)


@pytest.fixture
def demo_spec(demo_model_dir: Path) -> ModelSpec:
    return ModelSpec(model_id="qwen2.5-1.5b-instruct-demo", path=demo_model_dir / DEMO_FILE, max_context_len=4096,
                     max_new_tokens=0, tokenizer_dir=demo_model_dir)
