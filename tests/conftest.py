"""Shared fixtures: a demo model folder (real Qwen2.5 vocabulary, offline) and its pieces."""
from __future__ import annotations

from pathlib import Path

import pytest

from exo_rkllm.models.demo import DEMO_FILE, write_demo_model
from exo_rkllm.runtime.base import ModelSpec
from exo_rkllm.models.tokenizer import load_tokenizer


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


# -- the closing line about the real-exo tests --------------------------------------------------------
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say plainly how many tests ran against a real legacy exo, or why none did.

    CI cannot install exo from a registry, so these tests run only where a legacy exo is found
    (tests/legacy_exo.py); a green run that skipped them all must not look like one that ran them."""
    outcomes: dict[str, int] = {}
    reasons: set[str] = set()
    for kind in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"):
        for report in terminalreporter.stats.get(kind, []):
            if "real_exo" not in getattr(report, "keywords", {}):
                continue
            if kind == "error" or report.when == "call" or (kind == "skipped" and report.when == "setup"):
                outcomes[kind] = outcomes.get(kind, 0) + 1
                if kind == "skipped" and isinstance(report.longrepr, tuple):
                    reasons.add(str(report.longrepr[2]).removeprefix("Skipped: "))
    ran = sum(outcomes.get(k, 0) for k in ("passed", "failed", "error", "xfailed", "xpassed"))
    from legacy_exo import find_exo_python

    python, why = find_exo_python()
    if ran:
        expected = outcomes.get("xfailed", 0) + outcomes.get("xpassed", 0)
        marked = f", {expected} marked xfail" if expected else ""
        line = (f"REAL-EXO TESTS: {ran} ran against legacy exo ({outcomes.get('passed', 0)} passed, "
                f"{outcomes.get('failed', 0) + outcomes.get('error', 0)} failed, {outcomes.get('skipped', 0)} skipped"
                f"{marked}) with {python}")
    elif outcomes.get("skipped"):
        line = f"REAL-EXO TESTS: NONE RAN ({outcomes['skipped']} skipped): {'; '.join(sorted(reasons)) or why}"
    else:
        line = "REAL-EXO TESTS: none selected in this run"
    terminalreporter.write_sep("=", line, bold=True, yellow=not ran, green=bool(ran) and not outcomes.get("failed"))
