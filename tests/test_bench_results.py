"""Samples -> summaries -> overheads, multi-turn totals and the concurrency check, on recorded samples."""
from __future__ import annotations

import pytest

from exo_rkllm.bench import results
from exo_rkllm.bench.targets import ChatResult


def sample(category, rep, ttft, tps, resp, prompt=20, completion=10, text="t", **kw):
    return {"category": category, "rep": rep, "ttft_s": ttft, "decode_tps": tps, "response_s": resp,
            "prompt_tokens": prompt, "completion_tokens": completion, "text": text, **kw}


RUNTIME = [sample("Math", r, t, v, x) for r, t, v, x in
           [(1, 0.200, 8.0, 1.33), (2, 0.202, 7.9, 1.34), (3, 0.204, 8.1, 1.32)]] + \
          [sample("Creative", r, t, v, x, prompt=15) for r, t, v, x in
           [(1, 0.160, 8.0, 1.29), (2, 0.162, 8.0, 1.29), (3, 0.170, 7.8, 1.31)]]
EXO = [sample("Math", r, t, v, x) for r, t, v, x in
       [(1, 0.250, 7.2, 1.50), (2, 0.260, 7.2, 1.48), (3, 0.240, 7.6, 1.52)]] + \
      [sample("Creative", r, t, v, x, prompt=15) for r, t, v, x in
       [(1, 0.200, 7.0, 1.40), (2, 0.210, 7.4, 1.45), (3, 0.190, 7.2, 1.41)]]
CATS = [("Math", "What is 145 + 278?"), ("Creative", "Write a haiku about AI.")]


def test_sample_from_result_derives_metrics():
    res = ChatResult(t_start=10.0, t_end=11.5, t_first=10.2, token_times=[10.2 + 0.125 * i for i in range(9)],
                     text="hello", finish_reason="stop", prompt_tokens=20, completion_tokens=9,
                     completion_source="token ids", chunks=10, content_chunks=8, prefill_tokens=20)
    s = results.sample_from_result(res, category="Math", rep=2)
    assert s["ttft_s"] == pytest.approx(0.2)
    assert s["decode_tps"] == pytest.approx(8.0)
    assert s["response_s"] == pytest.approx(1.5)
    assert (s["completion_tokens"], s["completion_tokens_source"], s["token_events"]) == (9, "token ids", 9)
    # a target that saw no ids: the tokenizer counts the text; without one, the streamed chunks
    res2 = ChatResult(t_start=0.0, t_end=1.0, t_first=None, token_times=[0.5], text="a b c")
    assert results.sample_from_result(res2, category="x", rep=1, count_text=lambda t: 3)["completion_tokens"] == 3
    s3 = results.sample_from_result(res2, category="x", rep=1)
    assert (s3["completion_tokens"], s3["completion_tokens_source"]) == (1, "stream chunks")
    assert s3["ttft_s"] is None and s3["decode_tps"] is None


def test_standard_section_summaries():
    rows = results.standard_section(CATS, RUNTIME)
    assert [r["category"] for r in rows] == ["Math", "Creative"]
    math = rows[0]["summary"]
    assert math["decode_tps"]["median"] == pytest.approx(8.0)
    assert (math["decode_tps"]["min"], math["decode_tps"]["max"]) == (7.9, 8.1)
    assert math["ttft_s"]["median"] == pytest.approx(0.202)
    assert math["prompt_tokens"]["median"] == 20
    assert rows[1]["summary"]["response_s"]["median"] == pytest.approx(1.29)
    assert rows[0]["n"] == 3


def test_compare_sections_ratios_per_category_and_paired_all():
    comp = results.compare_sections(results.standard_section(CATS, RUNTIME), results.standard_section(CATS, EXO))
    math = {o["metric"]: o for o in comp["per_category"][0]["overheads"]}
    assert math["decode_tps"]["ratio"] == pytest.approx(7.2 / 8.0)
    assert math["decode_tps"]["worse"] is True
    assert math["ttft_s"]["ratio"] == pytest.approx(0.250 / 0.202)
    assert math["ttft_s"]["delta"] == pytest.approx(0.048)
    assert math["response_s"]["ratio"] == pytest.approx(1.50 / 1.33)
    paired = {o["metric"]: o for o in comp["all"]}
    assert paired["decode_tps"]["ratio"] == pytest.approx(0.9) and paired["decode_tps"]["worse"] is True
    # per-category TTFT: Math .250/.202 (+48 ms), Creative .200/.162 (+38 ms): the median of the two
    assert paired["ttft_s"]["delta"] == pytest.approx(0.043)
    assert (paired["ttft_s"]["delta_min"], paired["ttft_s"]["delta_max"]) == (pytest.approx(0.038),
                                                                              pytest.approx(0.048))
    assert paired["ttft_s"]["ratio"] == pytest.approx((0.250 / 0.202 + 0.200 / 0.162) / 2)
    assert paired["ttft_s"]["pairs"] == 2


def test_all_row_pairs_categories_instead_of_pooling_them():
    """Three prompts of different lengths: pooling every sample compares the middle category only
    (+10 ms), while exo cost +30 ms on the median category. The All row is the paired figure."""
    cats = [("A", "a"), ("B", "b"), ("C", "c")]
    rt = [sample(c, r, t, 8.0, 1.0) for c, t in (("A", 0.10), ("B", 0.50), ("C", 0.90)) for r in (1, 2)]
    exo = [sample(c, r, t, 8.0, 1.0) for c, t in (("A", 0.13), ("B", 0.51), ("C", 0.95)) for r in (1, 2)]
    comp = results.compare_sections(results.standard_section(cats, rt), results.standard_section(cats, exo))
    ttft = {o["metric"]: o for o in comp["all"]}["ttft_s"]
    assert ttft["delta"] == pytest.approx(0.030)  # pooled medians would give .51 - .50 = +10 ms
    assert (ttft["delta_min"], ttft["delta_max"]) == (pytest.approx(0.010), pytest.approx(0.050))
    assert ttft["ratio"] == pytest.approx(0.95 / 0.90)  # median of 1.30, 1.02, 1.056
    assert ttft["ratio_min"] == pytest.approx(0.51 / 0.50) and ttft["ratio_max"] == pytest.approx(1.3)


def test_compare_skips_categories_missing_on_one_side():
    comp = results.compare_sections(results.standard_section(CATS, RUNTIME),
                                    results.standard_section(CATS[:1], EXO[:3]))
    assert [r["category"] for r in comp["per_category"]] == ["Math"]
    paired = {o["metric"]: o for o in comp["all"]}
    assert paired["decode_tps"]["ratio"] == pytest.approx(7.2 / 8.0) and paired["decode_tps"]["pairs"] == 1


def test_multi_turn_totals():
    turns = [{"turn": 1, "prompt_tokens": 31, "prefill_tokens": 31, "ttft_s": 0.29},
             {"turn": 2, "prompt_tokens": 64, "prefill_tokens": 24, "ttft_s": 0.23},
             {"turn": 3, "prompt_tokens": 95, "prefill_tokens": 22, "ttft_s": 0.22}]
    m = results.multi_turn_section(turns, prefill_visible=True, note="n")
    assert m["prompt_tokens_total"] == 190
    assert m["prefilled_tokens_total"] == 77
    assert m["prefill_saved_fraction"] == pytest.approx(1 - 77 / 190)
    assert (m["ttft_first_s"], m["ttft_last_s"]) == (0.29, 0.22)
    hidden = results.multi_turn_section([{k: v for k, v in t.items() if k != "prefill_tokens"} for t in turns],
                                        prefill_visible=False)
    assert hidden["prefilled_tokens_total"] is None and hidden["prefill_saved_fraction"] is None


def test_check_answers_verdicts():
    refs = {"Math": {"423"}, "Creative": {"haiku"}, "Reasoning": {"yes, prime"}}
    clients = [{"category": "Math", "text": "423", "finish_reason": "stop"},
               {"category": "Creative", "text": "423", "finish_reason": "stop"},  # got Math's answer
               {"category": "Reasoning", "text": "yes, pri", "finish_reason": None},
               {"category": "Reasoning", "text": "something else", "finish_reason": "stop"}]
    assert results.check_answers(clients, refs) == ["own", "other:Math", "incomplete", "unverified"]


def test_concurrency_section_numbers_and_pass_rule():
    refs = {"Math": {"a"}, "Creative": {"b"}}
    clients = [{"category": "Math", "text": "a", "finish_reason": "stop", "completion_tokens": 10,
                "response_s": r, "ttft_s": t} for r, t in [(1.3, 0.2), (2.6, 1.5)]] + \
              [{"category": "Creative", "text": "b", "finish_reason": "stop", "completion_tokens": 10,
                "response_s": r, "ttft_s": t} for r, t in [(3.9, 2.8), (5.2, 4.1)]]
    c = results.concurrency_section(clients, 5.2, refs, deterministic=True)
    assert c["throughput_tps"] == pytest.approx(40 / 5.2)
    assert c["latency_p50_s"] == pytest.approx(3.25)
    assert c["latency_p95_s"] == pytest.approx(3.9 + 0.85 * 1.3)
    assert c["ttft_p50_s"] == pytest.approx(2.15)
    assert c["own_answers"] == 4 and c["passed"] is True
    clients[3]["text"] = "a"  # cross-talk fails whatever the sampling
    assert results.concurrency_section(clients, 5.2, refs, deterministic=False)["passed"] is False
    clients[3]["text"] = "zzz"  # a mismatch is a failure only when answers are deterministic
    assert results.concurrency_section(clients, 5.2, refs, deterministic=True)["passed"] is False
    assert results.concurrency_section(clients, 5.2, refs, deterministic=False)["passed"] is True


def test_determinism_and_references():
    section = results.standard_section(CATS, RUNTIME)
    assert results.is_deterministic(section) is True
    assert results.references_from(section) == {"Math": {"t"}, "Creative": {"t"}}
    varied = results.standard_section(CATS, RUNTIME[:2] + [dict(RUNTIME[2], text="other")] + RUNTIME[3:])
    assert results.is_deterministic(varied) is False


def test_concurrency_baseline_sums_runtime_medians():
    section = results.standard_section(CATS, RUNTIME)  # medians: Math 1.33 s, Creative 1.29 s
    conc = {"wall_s": 5.5, "results": [{"category": "Math"}, {"category": "Creative"}, {"category": "Math"},
                                       {"category": "Creative"}]}
    base = results.concurrency_baseline(section, conc)
    assert base["runtime_serial_s"] == pytest.approx(2 * 1.33 + 2 * 1.29)
    assert base["ratio"] == pytest.approx(5.5 / 5.24)
    assert base["delta_s"] == pytest.approx(0.26)
    assert results.concurrency_baseline(section, {"wall_s": 1.0, "results": [{"category": "Unknown"}]}) is None
