"""The report writers on a recorded report: the cells a reader sees, the JSON, the chart's data and file."""
from __future__ import annotations

import json

import pytest

from exo_rkllm.bench import report, results
from test_bench_results import CATS, EXO, RUNTIME


def make_report(exo_measured: bool = True) -> dict:
    rt = {"label": "runtime (sim)", "kind": "runtime", "status": "measured", "errors": [],
          "standard": results.standard_section(CATS, RUNTIME),
          "warmup": [{"ttft_s": 0.208, "response_s": 1.34}],
          "meta": {"runtime_version": "sim-1.2.3", "load_s": 1.5},
          "multi_turn": results.multi_turn_section(
              [{"turn": 1, "prompt_tokens": 31, "prefill_tokens": 31, "ttft_s": 0.292},
               {"turn": 2, "prompt_tokens": 64, "prefill_tokens": 24, "ttft_s": 0.234}],
              prefill_visible=True, note="from the runtime's stats")}
    if exo_measured:
        exo = {"label": "exo API", "kind": "exo", "status": "measured", "errors": [],
               "standard": results.standard_section(CATS, EXO), "warmup": [], "meta": {"url": "http://127.0.0.1:1"},
               "multi_turn": results.multi_turn_section(
                   [{"turn": 1, "prompt_tokens": 31, "ttft_s": 0.30}, {"turn": 2, "prompt_tokens": 64, "ttft_s": 0.9}],
                   prefill_visible=False, note="not visible"),
               "concurrency": results.concurrency_section(
                   [{"category": "Math", "text": "t", "finish_reason": "stop", "completion_tokens": 10,
                     "response_s": 1.3, "ttft_s": 0.2},
                    {"category": "Creative", "text": "t", "finish_reason": "stop", "completion_tokens": 10,
                     "response_s": 2.6, "ttft_s": 1.5}], 2.6,
                   {"Math": {"t"}, "Creative": {"t"}}, deterministic=True)}
    else:
        exo = {"label": "exo API", "kind": "exo", "status": "not measured",
               "reason": "/usr/bin/python3 cannot import exo (legacy exo-explore/exo)"}
    rep = {"schema": "exo-rkllm-bench/2", "date": "2026-11-22T18:19:36+00:00", "duration_s": 88.0,
           "settings": {"reps": 3, "warmup": 1, "max_new_tokens": 10},
           "model": {"model_id": "qwen2.5-1.5b-instruct-demo", "file": "demo.rkllm"},
           "pacing": "SIMULATED runtime paced like an RK3588", "environment": {"platform": "Linux", "cpus": 2,
                                                                               "loadavg_at_start": [0.5]},
           "targets": {"runtime": rt, "exo": exo}, "notes": ["simulated runtime"]}
    if exo_measured:
        rep["comparison"] = results.compare_sections(rt["standard"], exo["standard"])
        rep["comparison"]["concurrency"] = results.concurrency_baseline(rt["standard"], exo["concurrency"])
    else:
        rep["comparison_reason"] = "exo not measured: cannot import exo"
    return rep


def _row(md: str, first_cell: str, after: str = "") -> list[str]:
    text = md[md.index(after):] if after else md
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_markdown_standard_table_cells():
    md = report.render_markdown(make_report())
    assert "| Test | Tokens/sec | TTFT | Prompt tokens | Completion tokens | Response time |" in md
    assert _row(md, "Math") == ["Math", "8.00 [7.90–8.10]", "202 ms [200–204]", "20", "10", "1.33 s [1.32–1.34]"]
    assert _row(md, "Creative", after="## exo API") == ["Creative", "7.20 [7.00–7.40]", "200 ms [190–210]", "15", "10",
                                                       "1.41 s [1.40–1.45]"]
    assert "SIMULATED runtime paced like an RK3588" in md
    assert "answers capped at 10 tokens" in md
    assert "the model was loaded before it, in 1.5 s" in md


def test_markdown_overhead_table():
    md = report.render_markdown(make_report())
    section = md[md.index("## exo overhead"):]
    assert _row(section, "Math") == ["Math", "0.90× (-0.80 tok/s)", "1.24× (+48 ms)", "1.13× (+0.17 s)"]
    # All: the median of the per-category figures, with their range (Math +48 ms, Creative +38 ms)
    assert _row(section, "**All**")[1:3] == ["0.90× (-0.80 tok/s)", "1.24× (+43 ms) [+38 to +48 ms]"]


def test_markdown_multi_turn_and_concurrency():
    md = report.render_markdown(make_report())
    mt = md[md.index("## Multi-turn"):]
    assert _row(mt, "2") == ["2", "64", "24", "234 ms", "64", "not measured", "900 ms"]
    assert "the KV cache saved 42% of prompt prefill" in mt  # 1 - (31+24)/(31+64)
    cc = md[md.index("## Concurrent clients"):]
    row = _row(cc, "exo")
    assert row[1:7] == ["2", "7.69", "1.95 s", "2.54 s", "850 ms", "1435 ms"]
    assert row[7] == "2/2 own ✅"
    # runtime medians Math 1.33 s + Creative 1.29 s = 2.62 s back to back; exo took 2.60 s
    assert "in 2.60 s; the same requests back to back on the raw runtime take 2.62 s" in cc
    assert "0.99× (-0.02 s)" in cc


def test_a_target_that_restored_saved_kv_states_gets_a_restored_column():
    rep = make_report()
    turns = rep["targets"]["exo"]["multi_turn"]["turns"]
    turns[0].update(prefill_tokens=31, restored_tokens=0)
    turns[1].update(prefill_tokens=30, restored_tokens=34)
    md = report.render_markdown(rep)
    mt = md[md.index("## Multi-turn"):]
    assert "exo restored" in mt and "runtime restored" not in mt
    assert _row(mt, "2") == ["2", "64", "24", "234 ms", "64", "30", "34", "900 ms"]


def test_exo_not_measured_is_said_not_blank():
    md = report.render_markdown(make_report(exo_measured=False))
    assert "**not measured**: /usr/bin/python3 cannot import exo" in md
    assert "not measured: exo not measured: cannot import exo" in md
    assert _row(md, "Math")[1] == "8.00 [7.90–8.10]"  # the runtime table is still there


def test_fmt_helpers():
    assert report.fmt_metric(None, "decode_tps") == "not measured"
    assert report.fmt_metric({"n": 1, "median": 8.0, "min": 8.0, "max": 8.0, "stdev": 0.0}, "decode_tps") == "8.00"
    assert report.fmt_metric({"n": 3, "median": 16, "min": 12, "max": 16, "stdev": 2.3}, "completion_tokens") == \
        "16 [12–16]"
    assert report.fmt_ratio({"metric": "ttft_s", "ratio": None, "delta": None}) == "not measured"


def test_json_round_trip_renders_the_same(tmp_path):
    rep = make_report()
    path = report.write_json(rep, tmp_path / "r.json")
    again = json.loads(path.read_text(encoding="utf-8"))
    assert report.render_markdown(again) == report.render_markdown(rep)
    md_path = report.write_markdown(rep, tmp_path / "r.md")
    assert md_path.read_text(encoding="utf-8") == report.render_markdown(rep)


def test_chart_data():
    data = report.chart_data(make_report())
    assert data["categories"] == ["Math", "Creative"]
    assert data["bars"]["runtime"]["decode_tps"] == [pytest.approx(8.0), pytest.approx(8.0)]
    assert data["bars"]["exo"]["ttft_s_max"] == [pytest.approx(0.26), pytest.approx(0.21)]
    assert data["curves"]["runtime"]["prefill_tokens"] == [31, 24]
    assert data["curves"]["exo"]["ttft_s"] == [0.30, 0.9]
    assert list(report.chart_data(make_report(exo_measured=False))["bars"]) == ["runtime"]


def test_png_written_or_skipped_with_reason(tmp_path):
    path = tmp_path / "chart.png"
    msg = report.write_png(make_report(), path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert msg is not None and "matplotlib" in msg
        return
    assert msg is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.write_png({"targets": {}}, tmp_path / "none.png") is not None


def test_a_difference_that_rounds_to_nothing_has_no_minus_sign():
    ov = {"metric": "response_s", "ratio": 1.0, "delta": 0.001, "delta_min": -0.001, "delta_max": 0.006}
    assert report.fmt_ratio(ov) == "1.00× (+0.00 s) [+0.00 to +0.01 s]"


def test_percent_change_is_signed_once():
    assert report.fmt_percent_change(0.996, 1.0) == "-0.4 %"
    assert report.fmt_percent_change(1.004, 1.0) == "+0.4 %"
    assert report.fmt_percent_change(1.0, 1.0) == "+0.0 %"


def test_core_figures_prints_the_wall_time_overhead_with_the_shared_formatter():
    """benchmarks/core_figures.py printed `(+-0.4 %)` when exo was faster than the sum."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "core_figures.py"
    spec = importlib.util.spec_from_file_location("core_figures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    assert module.fmt_percent_change is report.fmt_percent_change
    assert "+{(wall" not in path.read_text()
