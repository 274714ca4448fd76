"""The report writers: Markdown (also printed), JSON (everything, raw samples included), PNG.

They read only the report dict (the JSON's content), so a published JSON can be
re-rendered and the tests render recorded inputs. Every table says what was
not measured instead of leaving a blank a reader could take for zero.
matplotlib is an optional extra (`pip install 'exo-rkllm[bench]'`): without it
the PNG is skipped with a message, the rest is written.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from exo_rkllm.bench.results import integrity_line

NOT_MEASURED = "not measured"

DEFINITIONS = {
    "tokens_per_s": "decode rate: (tokens - 1) / (time of last token - time of first token), as the client receives "
                    "them; the first token's cost is in TTFT",
    "ttft": "time to first token: request sent (messages in hand, before templating) to the first text received",
    "response_time": "request sent to stream closed",
    "prompt_tokens": "the model's tokenizer on the chat-templated prompt (add_generation_prompt=True); against "
                     "an rkllama server, the server's own prompt_eval_count when it reports one. ~ marks an "
                     "estimate: the server templates the messages itself and may add its own system prompt, so "
                     "it prefills more than the bench (or exo) counted",
    "completion_tokens": "runtime target: the token ids generated; exo / rkllama: the model's tokenizer re-counting "
                         "the streamed text (the streamed chunk count is kept in the JSON)",
    "spread": "median over the repetitions, [min-max] in brackets",
    "overhead": "exo / runtime of the medians: below 1x for tokens/s, above 1x for times, is what the path through "
                "exo costs; the All row is the median of the per-category ratios and differences, "
                "[min to max] over the categories",
    "integrity": "every answer is checked for U+FFFD replacement characters, special-token text (the tokenizer's "
                 "special tokens, e.g. <|im_end|>, in the text or removed from it by the bench), empty answers, and "
                 "the same answer given to different prompts",
}


# -- formatting ----------------------------------------------------------------------------------
def _num(x: float | None, fmt: str) -> str:
    return NOT_MEASURED if x is None else format(x, fmt)


def fmt_metric(summary: Mapping[str, Any] | None, key: str) -> str:
    """A table cell: median [min-max] in the metric's unit."""
    if not summary:
        return NOT_MEASURED
    med, lo, hi, n = summary["median"], summary["min"], summary["max"], summary["n"]
    if key == "decode_tps":
        cell, rng = f"{med:.2f}", f"{lo:.2f}–{hi:.2f}"
    elif key == "ttft_s":
        cell, rng = f"{med * 1000:.0f} ms", f"{lo * 1000:.0f}–{hi * 1000:.0f}"
    elif key == "response_s":
        cell, rng = f"{med:.2f} s", f"{lo:.2f}–{hi:.2f}"
    else:  # token counts
        cell = f"{med:g}"
        return cell if lo == hi else f"{cell} [{lo:g}–{hi:g}]"
    return cell if n < 2 else f"{cell} [{rng}]"


def _signed(x: float, digits: int) -> str:
    x = round(x, digits)
    return f"{x + 0.0 if x else 0.0:+.{digits}f}"  # no "-0.00" for a difference that rounds to nothing


def _delta(d: float, metric: str | None) -> tuple[str, str]:
    """A signed difference in the metric's unit: (number, unit)."""
    if metric == "ttft_s":
        return _signed(d * 1000, 0), "ms"
    if metric == "response_s":
        return _signed(d, 2), "s"
    return _signed(d, 2), "tok/s"


def fmt_ratio(ov: Mapping[str, Any]) -> str:
    """`1.24× (+48 ms)`; for the All row (paired, with a range) `1.22× (+43 ms) [+38 to +48 ms]`."""
    r, d, metric = ov.get("ratio"), ov.get("delta"), ov.get("metric")
    if r is None or d is None:
        return NOT_MEASURED
    cell = f"{r:.2f}× ({' '.join(_delta(d, metric))})"
    lo, hi = ov.get("delta_min"), ov.get("delta_max")
    if lo is not None and hi is not None and _delta(lo, metric) != _delta(hi, metric):
        (a, unit), (b, _) = _delta(lo, metric), _delta(hi, metric)
        cell += f" [{a} to {b} {unit}]"
    return cell


def fmt_percent_change(value: float, baseline: float) -> str:
    """`+0.4 %` / `-0.4 %`: how much `value` exceeds `baseline`, signed once (never `+-0.4 %`)."""
    return f"{(value / baseline - 1) * 100:+.1f} %"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _ms(x: float | None) -> str:
    return NOT_MEASURED if x is None else f"{x * 1000:.0f} ms"


def _s(x: float | None) -> str:
    return NOT_MEASURED if x is None else f"{x:.2f} s"


def _estimated(samples: Sequence[Mapping[str, Any]], key: str = "prompt_tokens_estimated") -> bool:
    return any(s.get(key) for s in samples)


def _count_cell(value: Any, estimated: bool) -> str:
    if value is None:
        return NOT_MEASURED
    return f"~{value}" if estimated else str(value)


def _own_check(c: Mapping[str, Any]) -> str:
    """The own-answer check of a concurrency run, as a cell: `4/4 own ✅`."""
    check = (f"{c['own_answers']}/{c['clients']} own" + (f", {c['cross_talk']} CROSSED" if c["cross_talk"] else "")
             + (f", {c['incomplete']} incomplete" if c["incomplete"] else "")
             + (f", {c['unverified']} unverified" if c["unverified"] else ""))
    return check + (" ✅" if c.get("passed") else " ❌")


def _served(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{node} {n}" for node, n in counts.items()) or NOT_MEASURED


def ring_lines(report: Mapping[str, Any]) -> list[str]:
    """`--ring N`: the concurrency run through a ring of N exo nodes next to the same run on one node."""
    ring: Mapping[str, Any] = report.get("ring") or {}
    n = ring.get("nodes", "?")
    lines = [f"## Ring of {n} exo nodes vs one node", ""]
    if ring.get("status") != "measured":
        reason = ring.get("reason") or "; ".join(ring.get("errors", [])) or "no data"
        return lines + [f"**{NOT_MEASURED}**: {reason}", ""]
    one = ((report.get("targets") or {}).get("exo") or {}).get("concurrency")
    rows = []
    for label, nodes, c in (("one node", "1", one), (f"ring of {n}", str(n), ring.get("concurrency"))):
        if not c:
            rows.append([label, nodes] + [NOT_MEASURED] * 8)
            continue
        rows.append([label, nodes, str(c["clients"]), _s(c.get("wall_s")), _num(c.get("throughput_tps"), ".2f"),
                     _ms(c.get("ttft_p50_s")), _ms(c.get("ttft_p95_s")), _s(c.get("latency_p50_s")),
                     _s(c.get("latency_p95_s")), _own_check(c)])
    lines += _table(["Where", "Nodes", "Clients", "Wall time", "Aggregate tok/s", "p50 TTFT", "p95 TTFT",
                     "p50 latency", "p95 latency", "Own answer check"], rows)
    lines.append("")
    comp = report.get("ring_comparison")
    if comp and comp.get("throughput_ratio") is not None and comp.get("wall_ratio") is not None:
        lines.append(f"- Ring of {n} ÷ one node, the same {comp['clients']} clients: aggregate tokens/s "
                     f"**{comp['throughput_ratio']:.2f}×**, wall time **{comp['wall_ratio']:.2f}×** "
                     f"(each request runs whole on one board: at best {comp['best_speedup']}× the tokens/s).")
    elif one is None:
        lines.append("- one node: not measured (the one-node exo run has no concurrency figures), so no ratio.")
    lines.append(f"- Requests run per node (each node's `/v1/rkllm/status`): {_served(ring.get('served_by') or {})}; "
                 f"all sent to node 0's API.")
    warm = ring.get("warmup") or []
    if warm:
        settled = ring.get("settle_s")
        wait = (f"; then {settled:.2f} s until every node had heard that the others were idle" if settled is not None
                else "")
        lines.append(f"- Before the clock: one warm-up request through each node's own API (it loads the model "
                     f"there), run by: {', '.join(str(w.get('node_id') or 'unknown') for w in warm)}{wait}.")
    meta = ring.get("meta") or {}
    if meta.get("start_s") is not None:
        lines.append(f"- The bench started the {n} nodes on loopback in {meta['start_s']:.1f} s (same settings, "
                     "one discovery file listing all of them, a saved-states folder each).")
    lines.append(f"- {integrity_line(ring.get('integrity'))}.")
    for err in ring.get("errors", []):
        lines.append(f"- error: {err}")
    lines.append("")
    return lines


def standard_table(section: Mapping[str, Any]) -> list[str]:
    rows = []
    for row in section.get("standard", []):
        s = row.get("summary") or {}
        prompt = fmt_metric(s.get("prompt_tokens"), "prompt_tokens")
        if prompt != NOT_MEASURED and _estimated(row.get("samples", [])):
            prompt = "~" + prompt
        rows.append([row["category"], fmt_metric(s.get("decode_tps"), "decode_tps"), fmt_metric(s.get("ttft_s"), "ttft_s"),
                     prompt,
                     fmt_metric(s.get("completion_tokens"), "completion_tokens"),
                     fmt_metric(s.get("response_s"), "response_s")])
    return _table(["Test", "Tokens/sec", "TTFT", "Prompt tokens", "Completion tokens", "Response time"], rows)


def _target_title(section: Mapping[str, Any]) -> str:
    meta = section.get("meta") or {}
    bits = [section.get("label", section.get("kind", "?"))]
    if meta.get("url"):
        bits.append(meta["url"])
    if meta.get("runtime_version"):
        bits.append(f"runtime {meta['runtime_version']}")
    return " — ".join(bits)


# -- Markdown ------------------------------------------------------------------------------------
def render_markdown(report: Mapping[str, Any]) -> str:
    lines: list[str] = ["# exo-rkllm benchmark", ""]
    model = report.get("model") or {}
    env = report.get("environment") or {}
    settings = report.get("settings") or {}
    lines.append(f"- Date: {report.get('date', '?')} (run took {report.get('duration_s', 0):.0f} s)")
    lines.append(f"- Model: `{model.get('model_id', '?')}` ({model.get('file', '?')})")
    lines.append(f"- Pacing: {report.get('pacing', 'unknown')}")
    host = f"{env.get('platform', '?')}, {env.get('cpus', '?')} CPUs"
    if env.get("board_model"):
        host = f"{env['board_model']} ({env.get('soc') or 'unknown SoC'}), " + host
    if env.get("loadavg_at_start"):
        host += f", load average at start {env['loadavg_at_start'][0]}"
    lines.append(f"- Host: {host}")
    cap = settings.get("max_new_tokens")
    lines.append(f"- Method: {settings.get('warmup', 0)} warm-up, {settings.get('reps', '?')} repetitions per prompt, "
                 f"answers capped at {cap} tokens" if cap else
                 f"- Method: {settings.get('warmup', 0)} warm-up, {settings.get('reps', '?')} repetitions per prompt, "
                 "answers not capped")
    for note in report.get("notes", []):
        lines.append(f"- Note: {note}")
    lines.append("")
    targets: Mapping[str, Any] = report.get("targets") or {}
    for section in targets.values():
        lines.append(f"## {_target_title(section)}")
        lines.append("")
        if section.get("status") != "measured":
            lines.append(f"**{NOT_MEASURED}**: {section.get('reason') or '; '.join(section.get('errors', [])) or 'no data'}")
            lines.append("")
            continue
        lines += standard_table(section)
        samples = [s for row in section.get("standard", []) for s in row.get("samples", [])]
        if _estimated(samples):
            lines.append("")
            lines.append("~ estimated prompt tokens: the bench's count of the chat template; the server templates "
                         "the messages itself and may add its own system prompt, so it prefilled more.")
        lines.append("")
        lines.append(integrity_line(section.get("integrity")) + ".")
        fails = (section.get("integrity") or {}).get("failures", [])
        for fail in fails[:5]:
            same = f", same answer as {', '.join(fail['same_answer_as'])}" if fail.get("same_answer_as") else ""
            lines.append(f"- {fail['part']} {fail['prompt']} (rep {fail.get('rep')}): {', '.join(fail['problems'])}"
                         f"{same}: {fail['text'][:80]!r}")
        if len(fails) > 5:
            lines.append(f"- ... and {len(fails) - 5} more in the JSON (targets.*.integrity.failures)")
        warm = section.get("warmup") or []
        meta = section.get("meta") or {}
        if warm and warm[0].get("ttft_s") is not None:
            lines.append("")
            load = (f"the model was loaded before it, in {meta['load_s']:.1f} s" if meta.get("load_s") is not None
                    else "it includes loading the model if the server had not loaded it yet")
            lines.append(f"Warm-up request (not in the table): TTFT {_ms(warm[0]['ttft_s'])}, "
                         f"response {_s(warm[0].get('response_s'))}; {load}.")
        for err in section.get("errors", []):
            lines.append(f"- error: {err}")
        lines.append("")

    comp = report.get("comparison")
    lines.append("## exo overhead against the raw runtime")
    lines.append("")
    if comp:
        rows = []
        for row in comp.get("per_category", []):
            rows.append([row["category"]] + [fmt_ratio(o) for o in row["overheads"]])
        rows.append(["**All**"] + [fmt_ratio(o) for o in comp.get("all", [])])
        lines += _table(["Test", "Tokens/sec (exo ÷ runtime)", "TTFT (exo ÷ runtime)", "Response time (exo ÷ runtime)"],
                        rows)
        lines.append("")
        lines.append("Below 1× for tokens/s, above 1× for times: what the path through exo costs. "
                     "Differences smaller than the spread in the tables above are noise.")
    else:
        lines.append(f"{NOT_MEASURED}: {report.get('comparison_reason', 'run with --compare to measure it')}")
    lines.append("")

    mt = {k: s["multi_turn"] for k, s in targets.items() if s.get("multi_turn")}
    lines.append("## Multi-turn conversation")
    lines.append("")
    if mt:
        n = max(len(m["turns"]) for m in mt.values())
        # restored: prompt tokens a target restored from a saved KV state (exo-rkllm), where it says so
        restores = {k: any(t.get("restored_tokens") for t in m["turns"]) for k, m in mt.items()}
        header = ["Turn"]
        for k in mt:
            header += [f"{k} prompt tokens", f"{k} prefilled"] + ([f"{k} restored"] if restores[k] else []) + \
                [f"{k} TTFT"]
        rows = []
        for i in range(n):
            row = [str(i + 1)]
            for k, m in mt.items():
                t = m["turns"][i] if i < len(m["turns"]) else {}
                row += [_count_cell(t.get("prompt_tokens"), bool(t.get("prompt_tokens_estimated"))),
                        _count_cell(t.get("prefill_tokens"), bool(t.get("prefill_tokens_estimated")))]
                if restores[k]:
                    row.append(_count_cell(t.get("restored_tokens"), False))
                row.append(_ms(t.get("ttft_s")))
            rows.append(row)
        lines += _table(header, rows)
        lines.append("")
        for k, m in mt.items():
            saved = m.get("prefill_saved_fraction")
            extra = ""
            if saved is not None:
                extra = f"; the KV cache saved {'an estimated ' if m.get('estimated') else ''}{saved * 100:.0f}% " \
                        "of prompt prefill"
            lines.append(f"- {k}: {m.get('note', '')}{extra}.")
    else:
        lines.append(NOT_MEASURED)
    lines.append("")

    cc = {k: s["concurrency"] for k, s in targets.items() if s.get("concurrency")}
    lines.append("## Concurrent clients")
    lines.append("")
    if cc:
        rows = []
        for k, c in cc.items():
            rows.append([k, str(c["clients"]), _num(c.get("throughput_tps"), ".2f"), _s(c.get("latency_p50_s")),
                         _s(c.get("latency_p95_s")), _ms(c.get("ttft_p50_s")), _ms(c.get("ttft_p95_s")),
                         _own_check(c)])
        lines += _table(["Target", "Clients", "Throughput (tok/s)", "p50 latency", "p95 latency", "p50 TTFT",
                         "p95 TTFT", "Own answer check"], rows)
        lines.append("")
        base = (report.get("comparison") or {}).get("concurrency")
        if base and base.get("ratio") is not None:
            lines.append(f"- exo served the {cc.get('exo', {}).get('clients', '?')} clients in {base['exo_wall_s']:.2f} s; "
                         f"the same requests back to back on the raw runtime take {base['runtime_serial_s']:.2f} s "
                         f"(sum of its median response times): {base['ratio']:.2f}× ({base['delta_s']:+.2f} s). "
                         "One NPU runs one generation at a time, so 1.00× is the best possible.")
        for k, c in cc.items():
            if c.get("note"):
                lines.append(f"- {k}: {c['note']}.")
            if not c.get("deterministic_references"):
                lines.append(f"- {k}: answers varied between repetitions (sampling), so a mismatch is "
                             "`unverified`, not a failure; only cross-talk fails the check.")
    else:
        clients = (report.get("settings") or {}).get("clients")
        why = "skipped (--clients 0)" if clients == 0 else \
            "no target that serves concurrent clients was measured (in --compare, only exo runs this part)"
        lines.append(f"{NOT_MEASURED}: {why}")
    lines.append("")
    if report.get("ring") is not None:
        lines += ring_lines(report)
    lines.append("## How these numbers were measured")
    lines.append("")
    for key, text in DEFINITIONS.items():
        lines.append(f"- **{key}**: {text}.")
    lines.append("")
    return "\n".join(lines)


# -- JSON ----------------------------------------------------------------------------------------
def write_json(report: Mapping[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def write_markdown(report: Mapping[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(report), encoding="utf-8")
    return path


# -- PNG -----------------------------------------------------------------------------------------
def chart_data(report: Mapping[str, Any]) -> dict[str, Any]:
    """What the chart draws, separated from drawing so it can be checked without matplotlib."""
    targets = {k: s for k, s in (report.get("targets") or {}).items() if s.get("status") == "measured"}
    cats: list[str] = []
    for s in targets.values():
        for row in s.get("standard", []):
            if row["category"] not in cats:
                cats.append(row["category"])
    bars: dict[str, dict[str, list[float | None]]] = {}
    for k, s in targets.items():
        by = {row["category"]: row.get("summary") or {} for row in s.get("standard", [])}
        bars[k] = {}
        for key in ("decode_tps", "ttft_s"):
            med, lo, hi = [], [], []
            for c in cats:
                m = by.get(c, {}).get(key)
                med.append(m["median"] if m else None)
                lo.append(m["min"] if m else None)
                hi.append(m["max"] if m else None)
            bars[k][key] = med
            bars[k][key + "_min"] = lo
            bars[k][key + "_max"] = hi
    curves = {}
    for k, s in targets.items():
        mt = s.get("multi_turn")
        if mt:
            curves[k] = {"turn": [t["turn"] for t in mt["turns"]], "ttft_s": [t.get("ttft_s") for t in mt["turns"]],
                         "prompt_tokens": [t.get("prompt_tokens") for t in mt["turns"]],
                         "prefill_tokens": [t.get("prefill_tokens") for t in mt["turns"]]}
    return {"categories": cats, "bars": bars, "curves": curves}


def write_png(report: Mapping[str, Any], path: Path) -> str | None:
    """Draw the chart; returns None on success, else why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'exo-rkllm[bench]'): PNG chart skipped"
    data = chart_data(report)
    if not data["bars"]:
        return "nothing was measured: PNG chart skipped"
    cats, bars, curves = data["categories"], data["bars"], data["curves"]
    colors = {k: f"C{i}" for i, k in enumerate(dict.fromkeys([*bars, *curves]))}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.4))
    width = 0.8 / max(1, len(bars))
    for ax, key, title, scale, unit in ((axes[0], "decode_tps", "Decode tokens/s (higher is better)", 1.0, "tokens/s"),
                                        (axes[1], "ttft_s", "Time to first token (lower is better)", 1000.0, "ms")):
        top = 0.0
        for i, (k, b) in enumerate(bars.items()):
            xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(cats))]
            med = [(v or 0) * scale for v in b[key]]
            err = [[max(0.0, (m or 0) * scale - (lo or m or 0) * scale) for m, lo in zip(b[key], b[key + "_min"])],
                   [max(0.0, (hi or m or 0) * scale - (m or 0) * scale) for m, hi in zip(b[key], b[key + "_max"])]]
            ax.bar(xs, med, width, yerr=err, capsize=3, label=k, color=colors[k])
            top = max([top, *[(hi or 0) * scale for hi in b[key + "_max"]]])
        ax.set_ylim(0, top * 1.25 or 1)  # room for the legend above the bars
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(cats, rotation=20, ha="right")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(loc="upper right", ncol=max(1, len(bars)), fontsize=9)
    ax = axes[2]
    if curves:
        ax2 = ax.twinx()
        for k, c in curves.items():
            ax.plot(c["turn"], [(v or 0) * 1000 for v in c["ttft_s"]], marker="o", color=colors[k], label=f"{k} TTFT")
            ax2.plot(c["turn"], c["prompt_tokens"], linestyle=":", color=colors[k], alpha=0.7,
                     label=f"{k} prompt tokens")
            if all(v is not None for v in c["prefill_tokens"]):
                ax2.plot(c["turn"], c["prefill_tokens"], linestyle="--", color=colors[k], alpha=0.7,
                         label=f"{k} prefilled tokens")
        ax.set_xlabel("turn")
        ax.set_ylabel("TTFT (ms)")
        ax2.set_ylabel("tokens (dotted: prompt, dashed: prefilled)")
        ax.set_title("Multi-turn TTFT (flat while the prompt grows: KV reuse, or history dropped)", fontsize=9)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    else:
        ax.text(0.5, 0.5, "multi-turn: not measured", ha="center", va="center")
        ax.set_axis_off()
    model = (report.get("model") or {}).get("model_id", "?")
    sim = "SIMULATED, RK3588-like pacing" if "SIMULATED" in str(report.get("pacing", "")) else report.get("pacing", "")
    fig.suptitle(f"exo-rkllm benchmark — {model} — {sim} — {report.get('date', '')}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
