"""The in-process runtime target and the command end to end, on the simulator with no pacing.

No timing is asserted: these check the bookkeeping (what was prefilled, what the
KV cache holds, what the files contain) and that a missing exo is reported, not fatal.
"""
from __future__ import annotations

import json

import pytest

from exo_rkllm.bench import cli
from exo_rkllm.bench.runner import BenchSettings, run_target
from exo_rkllm.bench.targets import RuntimeTarget, TargetError, TokenCounter, resolve_local_model
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
    assert data["schema"] == "exo-rkllm-bench/2"  # the All row's meaning changed (paired), integrity added
    assert data["pacing"].startswith("SIMULATED") and data["pacing_by_target"]["exo"] == "not measured"
    assert data["targets"]["runtime"]["integrity"]["answers"] > 0
    assert data["integrity"]["runtime"].startswith("Integrity: ")
    assert "Integrity: " in captured.out
    assert next(out.glob("bench-*.md")).read_text().startswith("# exo-rkllm benchmark")


def test_cli_rejects_bad_arguments(capsys):
    assert cli.main(["--reps", "0", "--quiet"]) == 2
    assert "--reps" in capsys.readouterr().err


def test_pacing_is_known_only_for_what_the_bench_started(sim_config):
    native = Config.from_env({}, backend="native", models_dir=sim_config.models_dir)
    board = {"soc": "RK3588"}
    remote = {"status": "measured", "meta": {"url": "http://10.0.0.2:52415"}}
    assert cli._pacing({"exo": remote}, native, {})[0] == "unknown (remote exo)"
    assert cli._pacing({"exo": remote}, native, board)[0] == "unknown (remote exo)"  # not this board's NPU
    seen = {"status": "measured", "meta": {"backend": "sim"}}
    assert cli._pacing({"exo": seen}, native, {})[0] == "unknown (remote exo; its engine reports the sim backend)"
    started = {"status": "measured", "meta": {"started_by_bench": True}}
    line, by_target = cli._pacing({"runtime": {"status": "measured"}, "exo": started}, native, board)
    assert by_target == {"runtime": "RK3588 (native backend)", "exo": "RK3588 (native backend)"}
    assert line == ("RK3588 (native backend) — for the in-process runtime, exo started by the bench with the same "
                    "settings")
    line, _ = cli._pacing({"runtime": {"status": "measured"}, "exo": remote}, native, board)
    assert line == "RK3588 (native backend) — for the in-process runtime; unknown (remote exo) — for exo"
    assert cli._pacing({"exo": started}, sim_config, {})[0].startswith("SIMULATED runtime paced like an RK3588")
    assert cli._pacing({"rkllama": {"status": "measured"}}, native, board)[0].startswith("unknown (the rkllama")
    # an exo the bench started on the rkllama backend is paced by that server, which the bench cannot see
    on_rkllama = Config.from_env({}, backend="rkllama", models_dir=sim_config.models_dir)
    assert cli._pacing({"exo": started}, on_rkllama, board)[0].startswith("unknown (the rkllama")
    auto = Config.from_env({}, backend="auto", models_dir=sim_config.models_dir)
    resolved = {"status": "measured", "meta": {"started_by_bench": True, "backend": "sim"}}
    assert cli._pacing({"exo": resolved}, auto, board)[0].startswith("SIMULATED")
    line, by_target = cli._pacing({"runtime": {"status": "measured"}, "exo": {"status": "not measured"}},
                                  sim_config, {})
    assert line.startswith("SIMULATED") and by_target["exo"] == "not measured"


def test_local_model_comes_from_the_catalog(tmp_path):
    """The bench serves what the catalog serves: a model the catalog refuses is refused with its reason
    (the bench's own folder scan used to benchmark it anyway), and the context length is the catalog's."""
    from exo_rkllm.models.demo import write_demo_model

    models = tmp_path / "models"
    folder = write_demo_model(models)
    (folder / "Modelfile").write_text('FROM="%s"\nNUM_CTX="2048"\n' % next(folder.glob("*.rkllm")).name)
    config = Config.from_env({}, backend="sim", models_dir=models)
    local = resolve_local_model(config, None)
    assert (local.source, local.spec.max_context_len, local.model_id) == ("catalog", 2048, "qwen2.5-1.5b-instruct-demo")
    assert resolve_local_model(config, folder.name).model_id == local.model_id  # the folder name is an alias
    (folder / "Modelfile").write_text('TOP_K="many"\n')
    with pytest.raises(TargetError, match="broken Modelfile"):
        resolve_local_model(config, folder.name)
    with pytest.raises(TargetError, match="no servable model"):
        resolve_local_model(config, None)
