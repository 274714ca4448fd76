"""From raw requests to the numbers in the report: pure functions over JSON-able dicts.

Everything after the network lives here and works on plain dicts, the same
dicts the JSON report stores. So a published JSON can be re-summarised, and
the tests check the arithmetic on recorded samples without any timing.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

from . import metrics

Sample = dict[str, Any]

# (key in a sample, column title, higher is better)
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("decode_tps", "Tokens/sec", True),
    ("ttft_s", "TTFT", False),
    ("prompt_tokens", "Prompt tokens", False),
    ("completion_tokens", "Completion tokens", False),
    ("response_s", "Response time", False),
)
# The metrics an overhead ratio means something for (token counts are the same prompt).
OVERHEAD_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("decode_tps", "Tokens/sec", True),
    ("ttft_s", "TTFT", False),
    ("response_s", "Response time", False),
)


def sample_from_result(res: Any, *, category: str, rep: int,
                       count_text: Callable[[str], int] | None = None) -> Sample:
    """One request (a targets.ChatResult) as a JSON-able sample with its derived metrics.

    Completion tokens, best source first: token ids the runtime reported; the
    model's tokenizer re-counting the streamed text; the server's own count;
    the number of streamed token chunks.
    """
    if res.completion_tokens is not None:
        completion, source = res.completion_tokens, res.completion_source or "target"
    elif count_text is not None:
        completion, source = count_text(res.text), "tokenizer"
    else:
        completion, source = len(res.token_times), "stream chunks"
    return {
        "category": category,
        "rep": rep,
        "ttft_s": metrics.elapsed(res.t_start, res.t_first),
        "decode_tps": metrics.decode_rate(res.token_times),
        "response_s": res.t_end - res.t_start,
        "prompt_tokens": res.prompt_tokens,
        "completion_tokens": completion,
        "completion_tokens_source": source,
        "token_events": len(res.token_times),
        "chunks": res.chunks,
        "content_chunks": res.content_chunks,
        "prefill_tokens": res.prefill_tokens,
        "finish_reason": res.finish_reason,
        "server": dict(res.server),
        "notes": list(res.notes),
        "text": res.text,
    }


def summarize_samples(samples: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """Median / min / max / stdev of every metric over the samples given."""
    rows = list(samples)
    out: dict[str, dict[str, Any] | None] = {}
    for key, _title, _hib in METRICS:
        s = metrics.summarize(r.get(key) for r in rows)
        out[key] = s.to_dict() if s else None
    return out


def standard_section(categories: Sequence[tuple[str, str]], samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per category (in the prompts' order), each with its samples and their summary."""
    rows = []
    for category, prompt in categories:
        mine = [dict(s) for s in samples if s["category"] == category]
        rows.append({"category": category, "prompt": prompt, "n": len(mine), "summary": summarize_samples(mine),
                     "samples": mine})
    return rows


def _median_of(section: Sequence[Mapping[str, Any]], key: str, category: str | None = None) -> float | None:
    values = [s.get(key) for row in section if category is None or row["category"] == category
              for s in row.get("samples", [])]
    return metrics.median(values)


def compare_sections(runtime: Sequence[Mapping[str, Any]], exo: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """exo's overhead against the raw runtime, per category and over all samples pooled.

    Ratios are exo / runtime of the medians, for each metric: below 1 for
    tokens/s and above 1 for times is what exo costs.
    """
    cats = [row["category"] for row in runtime if any(r["category"] == row["category"] for r in exo)]
    per_category = []
    for cat in cats:
        per_category.append({"category": cat, "overheads": [
            metrics.overhead(key, _median_of(runtime, key, cat), _median_of(exo, key, cat),
                             higher_is_better=hib).to_dict() for key, _t, hib in OVERHEAD_METRICS]})
    pooled_rt = [r for r in runtime if r["category"] in cats]
    pooled_exo = [r for r in exo if r["category"] in cats]
    overall = [metrics.overhead(key, _median_of(pooled_rt, key), _median_of(pooled_exo, key),
                                higher_is_better=hib).to_dict() for key, _t, hib in OVERHEAD_METRICS]
    return {"per_category": per_category, "all": overall}


def concurrency_baseline(runtime: Sequence[Mapping[str, Any]], concurrency: Mapping[str, Any]) -> dict[str, Any] | None:
    """What N parallel clients through exo cost against the same requests run back to back on the raw runtime.

    One NPU runs one generation at a time, so the best exo can do is the sum of
    the runtime's median response times for the clients' prompts; the ratio of
    exo's wall time to that sum is the concurrency overhead.
    """
    medians = {row["category"]: ((row.get("summary") or {}).get("response_s") or {}).get("median") for row in runtime}
    needed = [medians.get(c.get("category")) for c in concurrency.get("results", [])]
    if not needed or any(m is None for m in needed):
        return None
    serial = float(sum(needed))  # type: ignore[arg-type]
    wall = concurrency.get("wall_s")
    return {"exo_wall_s": wall, "runtime_serial_s": serial, "ratio": metrics.ratio(wall, serial),
            "delta_s": None if wall is None else wall - serial}


def multi_turn_section(turns: Sequence[Mapping[str, Any]], *, prefill_visible: bool, note: str = "") -> dict[str, Any]:
    """Per turn: the context the prompt had, what was actually prefilled, TTFT; plus how much the cache saved."""
    rows = [dict(t) for t in turns]
    for i, row in enumerate(rows, 1):
        row.setdefault("turn", i)
    prompt = sum(r.get("prompt_tokens") or 0 for r in rows)
    prefilled = sum(r.get("prefill_tokens") or 0 for r in rows) if prefill_visible else None
    return {
        "turns": rows,
        "prefill_visible": prefill_visible,
        "prompt_tokens_total": prompt,
        "prefilled_tokens_total": prefilled,
        "prefill_saved_fraction": (1 - prefilled / prompt) if prefilled is not None and prompt else None,
        "ttft_first_s": rows[0].get("ttft_s") if rows else None,
        "ttft_last_s": rows[-1].get("ttft_s") if rows else None,
        "note": note,
    }


def check_answers(clients: Sequence[Mapping[str, Any]], references: Mapping[str, Iterable[str]]) -> list[str]:
    """Did every concurrent client get exactly its own answer?

    `references` maps a category to the answers its prompt got when run alone.
    Verdicts: `own` (identical to one of its own reference answers),
    `other:<category>` (identical to another prompt's answer: cross-talk, a
    failure), `incomplete` (no finish_reason: the stream was cut),
    `unverified` (matches nobody: sampling is not deterministic, or the text
    was corrupted; the report says which is plausible).
    """
    refs = {cat: set(texts) for cat, texts in references.items()}
    verdicts = []
    for c in clients:
        text, cat = c.get("text", ""), c["category"]
        if not c.get("finish_reason"):
            verdicts.append("incomplete")
        elif text in refs.get(cat, set()):
            verdicts.append("own")
        else:
            other = next((o for o, texts in refs.items() if o != cat and text in texts), None)
            verdicts.append(f"other:{other}" if other else "unverified")
    return verdicts


def concurrency_section(clients: Sequence[Mapping[str, Any]], wall_s: float,
                        references: Mapping[str, Iterable[str]], *, deterministic: bool) -> dict[str, Any]:
    """Throughput, latency percentiles and the own-answer check of N parallel clients."""
    rows = [dict(c) for c in clients]
    verdicts = check_answers(rows, references)
    for row, v in zip(rows, verdicts):
        row["verdict"] = v
    tokens = sum(r.get("completion_tokens") or 0 for r in rows)
    lat = [r.get("response_s") for r in rows]
    ttft = [r.get("ttft_s") for r in rows]
    crossed = [v for v in verdicts if v.startswith("other:")]
    return {
        "clients": len(rows),
        "wall_s": wall_s,
        "completion_tokens": tokens,
        "throughput_tps": metrics.throughput(tokens, wall_s),
        "requests_per_s": len(rows) / wall_s if wall_s > 0 else None,
        "latency_p50_s": metrics.percentile(lat, 50),
        "latency_p95_s": metrics.percentile(lat, 95),
        "ttft_p50_s": metrics.percentile(ttft, 50),
        "ttft_p95_s": metrics.percentile(ttft, 95),
        "own_answers": verdicts.count("own"),
        "cross_talk": len(crossed),
        "incomplete": verdicts.count("incomplete"),
        "unverified": verdicts.count("unverified"),
        "deterministic_references": deterministic,
        "passed": (not crossed and verdicts.count("incomplete") == 0
                   and (verdicts.count("own") == len(rows) or not deterministic)),
        "results": rows,
    }


def is_deterministic(section: Sequence[Mapping[str, Any]]) -> bool:
    """True when every category gave the same text on every repetition: only then can the
    concurrency check demand identical answers."""
    return all(len({s.get("text") for s in row.get("samples", [])}) <= 1 for row in section)


def references_from(section: Sequence[Mapping[str, Any]]) -> dict[str, set[str]]:
    return {row["category"]: {s.get("text", "") for s in row.get("samples", [])} for row in section}
