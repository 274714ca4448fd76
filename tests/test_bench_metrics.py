"""The benchmark's arithmetic, on hand-made numbers whose answers are known exactly."""
from __future__ import annotations

import math

import pytest

from exo_rkllm.bench import metrics


def test_median_ignores_unknown_values():
    assert metrics.median([3.0, None, 1.0, 2.0]) == 2.0
    assert metrics.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert metrics.median([]) is None
    assert metrics.median([None, float("nan")]) is None


def test_percentile_linear_interpolation_like_numpy():
    xs = list(range(1, 21))  # 1..20
    assert metrics.percentile(xs, 95) == pytest.approx(19.05)
    assert metrics.percentile(xs, 50) == pytest.approx(10.5)
    assert metrics.percentile(xs, 0) == 1
    assert metrics.percentile(xs, 100) == 20
    assert metrics.percentile([2.0, 1.0, 4.0, 3.0], 50) == pytest.approx(2.5)
    assert metrics.percentile([5.0], 95) == 5.0
    assert metrics.percentile([], 50) is None
    with pytest.raises(ValueError):
        metrics.percentile(xs, 101)


def test_summary_median_range_and_sample_stdev():
    s = metrics.summarize([8.0, 7.5, None, 8.5])
    assert s is not None
    assert (s.n, s.median, s.min, s.max) == (3, 8.0, 7.5, 8.5)
    assert s.stdev == pytest.approx(0.5)  # sample stdev of 7.5, 8, 8.5
    assert s.spread == pytest.approx(1.0)
    assert s.rel_spread == pytest.approx(0.125)
    one = metrics.summarize([2.0])
    assert one is not None and one.stdev == 0.0
    assert metrics.summarize([None]) is None


def test_decode_rate_counts_intervals_between_first_and_last_token():
    # 10 tokens 125 ms apart: 9 intervals over 1.125 s = 8 tokens/s, whatever the first token cost.
    times = [5.0 + 0.125 * i for i in range(10)]
    assert metrics.decode_rate(times) == pytest.approx(8.0)
    assert metrics.decode_rate([1.0]) is None
    assert metrics.decode_rate([]) is None
    assert metrics.decode_rate([2.0, 2.0]) is None  # no measurable span: no rate, not infinity


def test_ratio_and_overhead_direction():
    assert metrics.ratio(3.0, 2.0) == 1.5
    assert metrics.ratio(1.0, 0.0) is None
    assert metrics.ratio(None, 2.0) is None
    slower = metrics.overhead("decode_tps", runtime=8.0, exo=7.2, higher_is_better=True)
    assert slower.ratio == pytest.approx(0.9)
    assert slower.delta == pytest.approx(-0.8)
    assert slower.worse is True
    later = metrics.overhead("ttft_s", runtime=0.200, exo=0.250, higher_is_better=False)
    assert later.ratio == pytest.approx(1.25) and later.worse is True
    assert metrics.overhead("ttft_s", runtime=0.2, exo=0.19, higher_is_better=False).worse is False
    unknown = metrics.overhead("ttft_s", runtime=None, exo=0.2, higher_is_better=False)
    assert unknown.ratio is None and unknown.delta is None and unknown.worse is None
    assert unknown.to_dict()["worse"] is None


def test_throughput():
    assert metrics.throughput(40, 5.0) == 8.0
    assert metrics.throughput(40, 0.0) is None
    assert metrics.elapsed(1.0, 1.25) == 0.25
    assert metrics.elapsed(1.0, None) is None
    assert not math.isnan(metrics.throughput(0, 1.0))
