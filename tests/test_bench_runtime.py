"""The in-process runtime target and the command end to end, on the simulator with no pacing.

No timing is asserted: these check the bookkeeping (what was prefilled, what the
KV cache holds, what the files contain) and that a missing exo is reported, not fatal.
"""
from __future__ import annotations

import json

import pytest

from exo_rkllm.bench import cli
from exo_rkllm.bench.runner import BenchSettings, run_target
from exo_rkllm.bench.targets import RuntimeTarget, TokenCounter, resolve_local_model
from exo_rkllm.config import Config
from exo_rkllm.runtime.sim import SimRuntime, SimTiming

INSTANT = {"RKLLM_SIM_DECODE_MS": "0", "RKLLM_SIM_PREFILL_MS": "0", "RKLLM_SIM_PREFILL_BASE_MS": "0",
           "RKLLM_SIM_LOAD_MS": "0"}


@pytest.fixture
def sim_config(demo_models_dir):
    return Config.from_env({}, backend="sim", models_dir=demo_models_dir)


def test_resolve_local_model_finds_the_demo(sim_config, demo_model_dir):
    local = resolve_local_model(sim_config, None, max_new_tokens=12)
    assert local.spec.path.parent == demo_model_dir
    assert local.spec.max_new_tokens == 12
    assert local.tokenizer_dir is not None


async def test_runtime_target_prefills_only_the_new_turn(sim_config, demo_model_dir):
    local = resolve_local_model(sim_config, None, max_new_tokens=8)
    counter = TokenCounter.from_dir(demo_model_dir)
    sim = SimRuntime(SimTiming.instant())
    target = RuntimeTarget(sim_config, local, counter, max_new_tokens=8, runtime=sim)
    await target.open()
    history = [{"role": "user", "content": "What is an NPU?"}]
    first = await target.chat(history)
    assert first.prefill_tokens == first.prompt_tokens == len(sim.runs[-1].prefilled)
    assert first.completion_tokens == 8
    assert list(sim.kv_tokens) == target._cached  # our belief about the cache is the cache
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Say more."}]
    second = await target.chat(history)
    full = counter.encode(counter.template(history))
    assert second.prompt_tokens == len(full)
    if second.notes and any("kv reuse" in n for n in second.notes):
        assert second.prefill_tokens < second.prompt_tokens
        assert sim.runs[-1].kv_before + second.prefill_tokens == len(full)
    else:  # the answer's re-tokenisation broke the prefix: then everything is prefilled again
        assert second.prefill_tokens == second.prompt_tokens
    # an unrelated prompt clears the cache and prefills everything
    third = await target.chat([{"role": "user", "content": "Unrelated."}])
    assert third.prefill_tokens == third.prompt_tokens and sim.runs[-1].kv_before == 0
    await target.close()


async def test_run_target_sections(sim_config, demo_model_dir):
    local = resolve_local_model(sim_config, None, max_new_tokens=6)
    counter = TokenCounter.from_dir(demo_model_dir)
    target = RuntimeTarget(sim_config, local, counter, max_new_tokens=6, runtime=SimRuntime(SimTiming.instant()))
    settings = BenchSettings(reps=2, warmup=1, max_new_tokens=6, turns=3, clients=3)
    section = await run_target(target, settings, counter)
    assert section["status"] == "measured" and not section["errors"]
    assert [r["n"] for r in section["standard"]] == [2] * 5
    assert all(s["completion_tokens"] == 6 for r in section["standard"] for s in r["samples"])
    assert len(section["multi_turn"]["turns"]) == 3 and section["multi_turn"]["prefill_visible"]
    cc = section["concurrency"]
    assert cc["clients"] == 3 and cc["own_answers"] == 3 and cc["passed"]  # the simulator is deterministic
    assert section["meta"]["backend"] == "sim"


def test_cli_runtime_only_with_exo_unavailable(tmp_path, monkeypatch, demo_models_dir, capsys):
    for k, v in INSTANT.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    code = cli.main(["--sim", "--compare", "--start-exo", "--exo-python", str(tmp_path / "no-such-python"),
                     "--models-dir", str(demo_models_dir), "--reps", "1", "--turns", "2", "--clients", "2",
                     "--max-tokens", "4", "--out", str(out), "--no-chart", "--quiet"])
    assert code == 0
    captured = capsys.readouterr()
    assert "| Test | Tokens/sec | TTFT | Prompt tokens | Completion tokens | Response time |" in captured.out
    assert "exo: NOT MEASURED" in captured.err
    data = json.loads(next(out.glob("bench-*.json")).read_text())
    assert data["targets"]["runtime"]["status"] == "measured"
    assert data["targets"]["exo"]["status"] == "not measured"
    assert "cannot run" in data["targets"]["exo"]["reason"]
    assert "comparison" not in data and "exo not measured" in data["comparison_reason"]
    assert data["settings"]["max_new_tokens"] == 4 and data["backend"] == "sim"
    assert next(out.glob("bench-*.md")).read_text().startswith("# exo-rkllm benchmark")


def test_cli_rejects_bad_arguments(capsys):
    assert cli.main(["--reps", "0", "--quiet"]) == 2
    assert "--reps" in capsys.readouterr().err
