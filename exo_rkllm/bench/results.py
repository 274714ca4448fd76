"""From raw requests to the numbers in the report: pure functions over JSON-able dicts.

Everything after the network lives here and works on plain dicts, the same
dicts the JSON report stores. So a published JSON can be re-summarised, and
the tests check the arithmetic on recorded samples without any timing.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

from exo_rkllm.bench import metrics

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
        "prompt_tokens_source": res.prompt_tokens_source,
        "prompt_tokens_estimated": res.prompt_tokens_estimated,
        "completion_tokens": completion,
        "completion_tokens_source": source,
        "token_events": len(res.token_times),
        "chunks": res.chunks,
        "content_chunks": res.content_chunks,
        "prefill_tokens": res.prefill_tokens,
        "prefill_tokens_estimated": res.prefill_tokens_estimated,
        "restored_tokens": res.restored_tokens,
        "stripped": list(res.stripped),
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
    """exo's overhead against the raw runtime, per category, and over all categories paired.

    Per category: exo / runtime of the medians, for each metric (below 1 for
    tokens/s and above 1 for times is what exo costs). "All" pairs each
    category with itself: the median of the per-category ratios and
    differences, with their min and max. Pooling every sample first would
    compare medians of mixtures of prompts of different lengths, and tell
    more about which category the pooled median lands in than about exo.
    """
    cats = [row["category"] for row in runtime if any(r["category"] == row["category"] for r in exo)]
    per_category = []
    for cat in cats:
        per_category.append({"category": cat, "overheads": [
            metrics.overhead(key, _median_of(runtime, key, cat), _median_of(exo, key, cat),
                             higher_is_better=hib).to_dict() for key, _t, hib in OVERHEAD_METRICS]})
    overall = []
    for i, (key, _t, hib) in enumerate(OVERHEAD_METRICS):
        pairs = [(row["overheads"][i]["runtime"], row["overheads"][i]["exo"]) for row in per_category]
        overall.append(metrics.paired_overhead(key, pairs, higher_is_better=hib).to_dict())
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


RING_FIGURES = ("clients", "wall_s", "completion_tokens", "throughput_tps", "ttft_p50_s", "ttft_p95_s",
                "latency_p50_s", "latency_p95_s", "own_answers", "passed")


def served_by(clients: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How many of the clients each node ran (`node_id` of each row; "unknown" where no node had its record)."""
    counts: dict[str, int] = {}
    for c in clients:
        if c.get("error"):
            continue
        node = c.get("node_id") or "unknown"
        counts[node] = counts.get(node, 0) + 1
    return dict(sorted(counts.items()))


def ring_comparison(one_node: Mapping[str, Any] | None, ring: Mapping[str, Any] | None, nodes: int,
                    served: Mapping[str, int] | None = None) -> dict[str, Any] | None:
    """The same concurrency run on one node and through a ring of `nodes` nodes, side by side.

    Each request runs whole on one board, so N boards run up to N generations at once: with at
    least N clients of equal answers, the ring's aggregate tokens/s can reach N times one node's
    (`best_speedup`, min(nodes, clients)), its wall time 1/N of it. The ratios are ring / one node."""
    if not one_node or not ring:
        return None
    clients = int(ring.get("clients") or 0)
    return {
        "nodes": nodes,
        "clients": clients,
        "one_node": {k: one_node.get(k) for k in RING_FIGURES},
        "ring": {k: ring.get(k) for k in RING_FIGURES},
        "throughput_ratio": metrics.ratio(ring.get("throughput_tps"), one_node.get("throughput_tps")),
        "wall_ratio": metrics.ratio(ring.get("wall_s"), one_node.get("wall_s")),
        "best_speedup": min(nodes, clients) if clients else None,
        "served_by": dict(served or {}),
    }


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


# -- integrity of the answers ------------------------------------------------------------------
# Used when no tokenizer is known: the end-of-turn and role markers of the common chat templates.
COMMON_SPECIAL_TEXTS: frozenset[str] = frozenset({
    "<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|begin_of_text|>",
    "<|start_header_id|>", "<|end_header_id|>", "<end_of_turn>", "<start_of_turn>", "<|end|>", "</s>"})

FFFD = "\ufffd"
PROBLEM_FFFD = "U+FFFD"
PROBLEM_FFFD_CUT = "U+FFFD at a length cut"
PROBLEM_SPECIAL = "special-token text"
PROBLEM_IDENTICAL = "identical to another prompt's answer"
PROBLEM_EMPTY = "empty"
PROBLEMS = (PROBLEM_FFFD, PROBLEM_FFFD_CUT, PROBLEM_SPECIAL, PROBLEM_IDENTICAL, PROBLEM_EMPTY)


def _cut_by_cap(sample: Mapping[str, Any], max_new_tokens: int | None) -> bool:
    if sample.get("finish_reason") == "length":
        return True
    n = sample.get("completion_tokens")
    return bool(max_new_tokens) and n is not None and n >= max_new_tokens  # type: ignore[operator]


def answer_problems(sample: Mapping[str, Any], special_texts: Iterable[str],
                    max_new_tokens: int | None = None) -> list[str]:
    """What is wrong with one answer's text, by itself (not compared with others).

    A replacement character means bytes that did not decode: corrupt output, or a
    character whose second half the length cap cut off (only then is it the last
    thing in the text, and it is named apart). Special-token text (`<|im_end|>`...)
    never belongs in an answer, whether it is in the text or a target removed it
    (a server that echoed its end-of-turn marker).
    """
    text = sample.get("text") or ""
    out: list[str] = []
    if FFFD in text:
        trailing_only = FFFD not in text.rstrip(FFFD)
        out.append(PROBLEM_FFFD_CUT if trailing_only and _cut_by_cap(sample, max_new_tokens) else PROBLEM_FFFD)
    if sample.get("stripped") or any(t and t in text for t in special_texts):
        out.append(PROBLEM_SPECIAL)
    if not text and not sample.get("error"):
        out.append(PROBLEM_EMPTY)
    return out


SIMULATOR_ANSWERS = "expected on the simulator: its answers are drawn from a few fixed fragments"


def integrity(parts: Mapping[str, Sequence[Mapping[str, Any]]], special_texts: Iterable[str] | None = None,
              max_new_tokens: int | None = None, *, simulated: bool = False) -> dict[str, Any]:
    """Checks every answer of one target: `parts` maps a part of the run ("standard",
    "multi-turn", ...) to its samples, each keyed to its prompt by `category`.

    Besides each answer's own problems, the same non-empty text given to two
    different prompts is flagged: a server that drops the prompt or the history
    answers different questions alike. Flagged but not failed: a character the
    length cap cut in half, and (`simulated`) identical answers from the
    simulator, whose answers come from a small pool of fragments.
    """
    specials = frozenset(special_texts) if special_texts else COMMON_SPECIAL_TEXTS
    rows = [(part, s) for part, samples in parts.items() for s in samples if not s.get("error")]
    prompts_by_text: dict[str, set[str]] = {}
    for _part, s in rows:
        if s.get("text"):
            prompts_by_text.setdefault(s["text"], set()).add(str(s.get("category")))
    failures: list[dict[str, Any]] = []
    counts = {p: 0 for p in PROBLEMS}
    tolerated = {PROBLEM_FFFD_CUT} | ({PROBLEM_IDENTICAL} if simulated else set())
    found: set[str] = set()
    for part, s in rows:
        problems = answer_problems(s, specials, max_new_tokens)
        text = s.get("text") or ""
        others = sorted(prompts_by_text.get(text, set()) - {str(s.get("category"))}) if text else []
        if others:
            problems.append(PROBLEM_IDENTICAL)
        if not problems:
            continue
        for p in problems:
            counts[p] += 1
        found.update(t for t in specials if t and t in text)
        found.update(s.get("stripped") or [])
        failures.append({"part": part, "prompt": s.get("category"), "rep": s.get("rep"), "problems": problems,
                         **({"same_answer_as": others} if others else {}), "text": text[:200]})
    return {"answers": len(rows), "clean": len(rows) - len(failures),
            # Passed: nothing but what is expected (flagged, not corruption).
            "passed": all(set(f["problems"]) <= tolerated for f in failures), "tolerated": sorted(tolerated),
            "by_part": {part: len([s for s in samples if not s.get("error")]) for part, samples in parts.items()},
            "problems": {p: n for p, n in counts.items() if n}, "special_texts_found": sorted(found),
            "failures": failures,
            "checks": "U+FFFD in the text; special-token text in it or removed from it; the same answer to "
                      "different prompts; empty answers"}


def integrity_line(check: Mapping[str, Any] | None) -> str:
    """`Integrity: 15/15 answers clean`, or the counts of each problem found."""
    if not check:
        return "Integrity: not checked"
    parts = ", ".join(f"{n} {part}" for part, n in (check.get("by_part") or {}).items() if n)
    head = f"Integrity: {check['clean']}/{check['answers']} answers clean" + (f" ({parts})" if parts else "")
    problems = check.get("problems") or {}
    if not problems:
        return head
    tolerated = set(check.get("tolerated") or [PROBLEM_FFFD_CUT])
    failed, flagged = [], []
    for p, n in problems.items():
        extra = ""
        if p == PROBLEM_SPECIAL and check.get("special_texts_found"):
            extra = " (" + ", ".join(f"`{t}`" for t in check["special_texts_found"]) + ")"
        elif p == PROBLEM_FFFD_CUT:
            extra = " (the cap cut a character in half)"
        elif p == PROBLEM_IDENTICAL and p in tolerated:
            extra = f" ({SIMULATOR_ANSWERS})"
        (flagged if p in tolerated else failed).append(f"{p} in {n}{extra}")
    out = head + (" — FAILED: " + "; ".join(failed) if failed else " — no corruption")
    return out + ("; flagged: " + "; ".join(flagged) if flagged else "")
