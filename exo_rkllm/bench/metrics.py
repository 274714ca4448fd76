"""The benchmark's arithmetic, kept pure (numbers in, numbers out) so it can be tested exactly.

Definitions, the same for every target so the figures compare:
- TTFT: seconds from sending the request (messages in hand, before templating)
  to the first event that carries text.
- decode tokens/s: (tokens - 1) / (time of last token - time of first token):
  the first token's cost belongs to TTFT, so it is excluded from the rate; this
  is the runtime's steady decode speed as a client sees it.
- response time: request sent to stream closed.
- medians across repetitions, with min/max and the sample standard deviation as
  the spread; percentiles by linear interpolation between closest ranks.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence


def _clean(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def median(values: Iterable[float | None]) -> float | None:
    """Median of the known values; None when there are none (a metric that was not measured)."""
    xs = _clean(values)
    return statistics.median(xs) if xs else None


def percentile(values: Iterable[float | None], p: float) -> float | None:
    """The p-th percentile (0..100), linear interpolation between closest ranks.

    This is numpy's default ('linear') and spreadsheets' PERCENTILE.INC, so a user
    can check our p50/p95 by hand: p95 of 1..20 is 19.05.
    """
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be within 0..100, got {p}")
    xs = sorted(_clean(values))
    if not xs:
        return None
    rank = (len(xs) - 1) * p / 100
    lo = math.floor(rank)
    hi = math.ceil(rank)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


@dataclass(frozen=True)
class Summary:
    """One metric over the repetitions of one test."""

    n: int
    median: float
    min: float
    max: float
    stdev: float  # sample standard deviation; 0.0 for a single value

    @property
    def spread(self) -> float:
        return self.max - self.min

    @property
    def rel_spread(self) -> float | None:
        """(max - min) / median: how much to trust the median (noisy host: large)."""
        return self.spread / self.median if self.median else None

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def fmt_median_range(values: Iterable[float], spec: str = ".2f", unit: str = "") -> str:
    """'median unit (min-max)': how the benchmark scripts print a figure over repeated runs."""
    xs = list(values)
    return f"{statistics.median(xs):{spec}}{unit} ({min(xs):{spec}}-{max(xs):{spec}})"


def summarize(values: Iterable[float | None]) -> Summary | None:
    xs = _clean(values)
    if not xs:
        return None
    return Summary(n=len(xs), median=statistics.median(xs), min=min(xs), max=max(xs),
                   stdev=statistics.stdev(xs) if len(xs) > 1 else 0.0)


def decode_rate(token_times: Sequence[float]) -> float | None:
    """Tokens per second between the first and the last token (see the module docstring).

    None when fewer than two tokens arrived or they arrived at the same instant:
    no rate can be measured then, and reporting 0 or infinity would be a lie.
    """
    if len(token_times) < 2:
        return None
    span = token_times[-1] - token_times[0]
    if span <= 0:
        return None
    return (len(token_times) - 1) / span


def elapsed(start: float, end: float | None) -> float | None:
    return None if end is None else end - start


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline, or None if either is unknown or the baseline is zero."""
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


class _Comparison:
    """`worse` and the JSON form, shared by the per-category and the paired overheads."""

    ratio: float | None
    higher_is_better: bool

    @property
    def worse(self) -> bool | None:
        if self.ratio is None:
            return None
        return self.ratio < 1 if self.higher_is_better else self.ratio > 1

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)  # type: ignore[call-overload]
        d["worse"] = self.worse
        return d


@dataclass(frozen=True)
class Overhead(_Comparison):
    """How one metric through exo compares with the raw runtime.

    `ratio` is exo / runtime for every metric; `worse` says which way hurts
    (for tokens/s a ratio below 1 is the overhead, for times above 1).
    """

    metric: str
    runtime: float | None
    exo: float | None
    ratio: float | None
    delta: float | None  # exo - runtime, in the metric's unit
    higher_is_better: bool


def overhead(metric: str, runtime: float | None, exo: float | None, *, higher_is_better: bool) -> Overhead:
    delta = None if runtime is None or exo is None else exo - runtime
    return Overhead(metric, runtime, exo, ratio(exo, runtime), delta, higher_is_better)


@dataclass(frozen=True)
class PairedOverhead(_Comparison):
    """exo against the runtime over several categories, each compared with itself.

    `ratio` and `delta` are the medians of the per-category ratios and
    differences, `*_min`/`*_max` their range: the same prompt is the pair, so
    categories of different lengths do not mix.
    """

    metric: str
    ratio: float | None
    ratio_min: float | None
    ratio_max: float | None
    delta: float | None
    delta_min: float | None
    delta_max: float | None
    pairs: int
    higher_is_better: bool
    method: str = "median of the per-category ratios and differences [min-max]"


def paired_overhead(metric: str, pairs: Iterable[tuple[float | None, float | None]], *,
                    higher_is_better: bool) -> PairedOverhead:
    """Median [min-max] of exo/runtime and exo-runtime over (runtime, exo) pairs; pairs with a
    missing side are left out."""
    both = [(r, e) for r, e in pairs if r is not None and e is not None]
    ratios = _clean(ratio(e, r) for r, e in both)
    deltas = [e - r for r, e in both]
    return PairedOverhead(metric, median(ratios), min(ratios, default=None), max(ratios, default=None),
                          median(deltas), min(deltas, default=None), max(deltas, default=None), len(both),
                          higher_is_better)


def throughput(total_tokens: int, wall_seconds: float) -> float | None:
    """Aggregate tokens per second of a concurrent run (all clients' tokens over the wall time)."""
    if wall_seconds <= 0:
        return None
    return total_tokens / wall_seconds
