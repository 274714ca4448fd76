"""Runs the benchmark against one target: warm-up, repetitions, multi-turn, concurrency.

The order is fixed so runs compare: warm-up first (it absorbs model loading and
cold caches, and is reported apart), then the prompts round-robin per
repetition (so a burst of host noise spreads over every category instead of
hitting one), then the 10-turn conversation, then the parallel clients. A
failure in one part is recorded in the report and the next part still runs:
a partial, honest result beats a traceback.
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Sequence, TextIO

from exo_rkllm.bench import results
from exo_rkllm.bench.prompts import MULTI_TURN_SCRIPT, STANDARD_PROMPTS, BenchPrompt
from exo_rkllm.bench.targets import ChatResult, Target, TargetError, TokenCounter


@dataclass
class BenchSettings:
    prompts: tuple[BenchPrompt, ...] = STANDARD_PROMPTS
    prompts_source: str = "standard"
    reps: int = 3
    warmup: int = 1
    max_new_tokens: int = 16
    turns: int = 10
    clients: int = 4
    # The raw runtime is one NPU context: its "concurrency" run is only a serial baseline.
    # A comparison skips it to stay within the time budget.
    runtime_concurrency: bool = True

    def concurrency_for(self, kind: str) -> bool:
        return bool(self.clients) and (kind != "runtime" or self.runtime_concurrency)

    def requests_per_target(self, kind: str = "exo") -> int:
        return self.warmup + self.reps * len(self.prompts) + self.turns + (1 if self.concurrency_for(kind) else 0)

    def to_dict(self) -> dict[str, Any]:
        return {"reps": self.reps, "warmup": self.warmup, "max_new_tokens": self.max_new_tokens or None,
                "turns": self.turns, "clients": self.clients, "prompts_source": self.prompts_source,
                "prompts": [{"category": p.category, "prompt": p.prompt} for p in self.prompts]}


class Progress:
    """One status line on a terminal (rewritten in place), one line per request otherwise (CI logs)."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total = 0
        self.done = 0
        self.label = ""
        self.t0 = time.monotonic()

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self.t0 = label, total, 0, time.monotonic()

    def step(self, what: str, sample: dict[str, Any] | None = None) -> None:
        self.done += 1
        if not self.enabled:
            return
        tail = ""
        if sample:
            tps, ttft = sample.get("decode_tps"), sample.get("ttft_s")
            tail = (f"  ttft {ttft * 1000:.0f} ms" if ttft is not None else "  ttft -") + \
                   (f"  {tps:.2f} tok/s" if tps is not None else "") + f"  {sample.get('completion_tokens')} tok"
        line = f"[{self.label}] {self.done}/{self.total} {what}{tail}  ({time.monotonic() - self.t0:.0f} s)"
        if self.tty:
            self.stream.write("\r\033[K" + line)
            if self.done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def say(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty and 0 < self.done < self.total:
            self.stream.write("\n")
        self.stream.write(text + "\n")
        self.stream.flush()


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def _new_section(target: Target, **extra: Any) -> dict[str, Any]:
    """A target's section of the report before anything is measured."""
    return {"label": target.label, "kind": target.kind, "status": "not measured", "errors": [], "standard": [],
            "warmup": [], "multi_turn": None, "concurrency": None, **extra}


async def _opened(target: Target, section: dict[str, Any]) -> bool:
    """Open the target; False (the reason and what it is in `section`) if it cannot be opened."""
    try:
        await target.open()
    except TargetError as exc:
        section["reason"] = str(exc)
        section["meta"] = target.describe()
        return False
    return True


async def run_target(target: Target, settings: BenchSettings, counter: TokenCounter | None,
                     progress: Progress | None = None) -> dict[str, Any]:
    """Everything measured on one target, as a JSON-able section of the report."""
    progress = progress or Progress(enabled=False)
    count_text = counter.count_text if counter else None
    section = _new_section(target)
    t_open = time.monotonic()
    if not await _opened(target, section):
        return section
    section["open_s"] = time.monotonic() - t_open
    section["label"] = target.label
    progress.start(target.label, settings.requests_per_target(target.kind))
    t_run = time.monotonic()
    try:
        # warm-up
        for i in range(settings.warmup):
            p = settings.prompts[i % len(settings.prompts)]
            res = await target.chat(_messages(p.prompt))
            s = results.sample_from_result(res, category=p.category, rep=0, count_text=count_text)
            section["warmup"].append(s)
            progress.step(f"warm-up {p.category}", s)
        # standard prompts, round-robin per repetition
        samples: list[dict[str, Any]] = []
        for rep in range(1, settings.reps + 1):
            for p in settings.prompts:
                try:
                    res = await target.chat(_messages(p.prompt))
                except TargetError as exc:
                    section["errors"].append(f"{p.category} rep {rep}: {exc}")
                    progress.step(f"{p.category} rep {rep}/{settings.reps} FAILED")
                    continue
                s = results.sample_from_result(res, category=p.category, rep=rep, count_text=count_text)
                samples.append(s)
                progress.step(f"{p.category} rep {rep}/{settings.reps}", s)
        section["standard"] = results.standard_section([(p.category, p.prompt) for p in settings.prompts], samples)
        section["status"] = "measured" if samples else "not measured"
        if settings.turns:
            section["multi_turn"] = await _multi_turn(target, settings, count_text, progress, section)
        if settings.concurrency_for(target.kind):
            section["concurrency"] = await _concurrency(target, settings, count_text, progress, section)
    except TargetError as exc:
        section["errors"].append(str(exc))
        progress.say(f"[{target.label}] stopped: {exc}")
    finally:
        section["run_s"] = time.monotonic() - t_run
        section["meta"] = target.describe()
        await target.close()
    section["integrity"] = check_section(section, counter, settings.max_new_tokens)
    return section


def check_section(section: dict[str, Any], counter: TokenCounter | None, max_new_tokens: int | None) -> dict[str, Any]:
    """The integrity check of every answer a target gave (see results.integrity)."""
    parts = {"warm-up": section.get("warmup") or [],
             "standard": [s for row in section.get("standard") or [] for s in row.get("samples", [])],
             "multi-turn": (section.get("multi_turn") or {}).get("turns") or [],
             "concurrent": (section.get("concurrency") or {}).get("results") or []}
    simulated = (section.get("meta") or {}).get("backend") == "sim"
    return results.integrity(parts, counter.special_texts if counter else None, max_new_tokens, simulated=simulated)


async def _multi_turn(target: Target, settings: BenchSettings, count_text: Callable[[str], int] | None,
                      progress: Progress, section: dict[str, Any]) -> dict[str, Any] | None:
    """A 10-turn conversation; per turn the prompt's size, the tokens actually prefilled and TTFT.

    A target that keeps the KV cache prefills only the new turn (plus the
    template's glue), so its TTFT stays flat; one that re-prefills climbs. One that
    drops the history is flat too: only the prefilled counts (and the answers) tell.
    """
    script = [MULTI_TURN_SCRIPT[i % len(MULTI_TURN_SCRIPT)] for i in range(settings.turns)]
    history: list[dict[str, str]] = []
    turns: list[dict[str, Any]] = []
    try:
        for i, user in enumerate(script, 1):
            history.append({"role": "user", "content": user})
            res: ChatResult = await target.chat(history)
            s = results.sample_from_result(res, category=f"turn {i}", rep=i, count_text=count_text)
            s["turn"] = i
            turns.append(s)
            history.append({"role": "assistant", "content": res.text})
            progress.step(f"multi-turn {i}/{len(script)}", s)
    except TargetError as exc:
        section["errors"].append(f"multi-turn: {exc}")
        progress.say(f"[{target.label}] multi-turn stopped: {exc}")
    if not turns:
        return None
    visible = all(t.get("prefill_tokens") is not None for t in turns)
    estimated = any(t.get("prefill_tokens_estimated") or t.get("prompt_tokens_estimated") for t in turns)
    if target.kind == "runtime":
        note = "prefilled = tokens fed to the runtime after KV-cache reuse, from the runtime's own stats"
    elif target.kind == "rkllama" and visible:
        note = "prefilled and prompt tokens = the server's own prompt_eval_count"
    elif target.kind == "rkllama":
        note = ("the server does not say what it prefilled (early API); prompt tokens are the bench's count of "
                "the template, an estimate (~): the server templates the messages itself and adds its own "
                "system prompt")
    elif visible:
        note = ("prefilled = what the engine fed the runtime, read from exo-rkllm's /v1/rkllm/status after each "
                "turn (matched by exo's request id)")
        if estimated:
            note += ("; exo's engine runs on an rkllama server, which templates the messages itself (and may add "
                     "its own system prompt): these counts are exo's template, estimates (~) of what it prefilled")
    else:
        note = ("prefilled tokens are not visible through exo's HTTP API: only the prompt size and TTFT are "
                "measured; a TTFT that stays flat while the prompt grows is consistent with KV-cache reuse, "
                "but also with the history being dropped: a hint, not proof (compare the answers with the "
                "history, and the prompt tokens)")
    out = results.multi_turn_section(turns, prefill_visible=visible, note=note)
    out["estimated"] = estimated
    return out


async def _concurrency(target: Target, settings: BenchSettings, count_text: Callable[[str], int] | None,
                       progress: Progress, section: dict[str, Any]) -> dict[str, Any] | None:
    """N clients at once, each with a different prompt; each answer is checked against what that
    prompt got when it ran alone in the standard run (the references)."""
    prompts = [settings.prompts[i % len(settings.prompts)] for i in range(settings.clients)]
    t0 = time.monotonic()
    outcomes = await asyncio.gather(*(target.chat(_messages(p.prompt)) for p in prompts), return_exceptions=True)
    wall = time.monotonic() - t0
    clients = []
    for i, (p, out) in enumerate(zip(prompts, outcomes)):
        if isinstance(out, BaseException):
            section["errors"].append(f"concurrency client {i}: {out}")
            clients.append({"client": i, "category": p.category, "text": "", "finish_reason": None,
                            "error": str(out)})
            continue
        s = results.sample_from_result(out, category=p.category, rep=i, count_text=count_text)
        s["client"] = i
        clients.append(s)
    out = results.concurrency_section(clients, wall, results.references_from(section["standard"]),
                                      deterministic=results.is_deterministic(section["standard"]))
    if settings.clients > len(settings.prompts):
        out["note"] = "more clients than prompts: clients sharing a prompt cannot be told apart by the check"
    if target.kind == "runtime":
        out["note"] = ("the raw runtime is one NPU context: these clients queue and run one after another; "
                       "this is the serial baseline")
    progress.step(f"concurrency x{settings.clients}", None)
    return out


async def run_ring(target: Target, node_targets: Sequence[Target], settings: BenchSettings,
                   counter: TokenCounter | None, references: Sequence[Mapping[str, Any]],
                   progress: Progress | None = None,
                   settle: Callable[[], Awaitable[float | None]] | None = None) -> dict[str, Any]:
    """The concurrency run against a ring of exo nodes, through one node's API (`target`), as a section of the
    report (`ring`): what `--ring N` compares with the same run on one node.

    Each node first gets one warm-up request through its own API (`node_targets`, one per node): an idle ring
    runs a request where it arrives, so every node loads the model before the clock runs, as the one node's
    warm-up did. Then `settle` (ExoRing.wait_idle) waits until every node has heard that the others are idle:
    the clients start on an idle ring, as the one node's did. The clients' answers are checked against
    `references`, the one node's standard section (the same prompts, run alone there). Each client's record says
    which node ran it (`node_id`, from that node's status route), and `served_by` counts them."""
    progress = progress or Progress(enabled=False)
    count_text = counter.count_text if counter else None
    section = _new_section(target, nodes=len(node_targets), served_by={})
    if not await _opened(target, section):
        return section
    progress.start(target.label, len(node_targets) + 1)
    t_run = time.monotonic()
    opened: list[Target] = []
    try:
        for node in node_targets:
            await node.open()
            opened.append(node)
        prompts = [settings.prompts[i % len(settings.prompts)] for i in range(len(node_targets))]
        outcomes = await asyncio.gather(*(node.chat(_messages(p.prompt)) for node, p in zip(node_targets, prompts)),
                                        return_exceptions=True)
        for k, (p, out) in enumerate(zip(prompts, outcomes)):
            if isinstance(out, BaseException):
                section["errors"].append(f"warm-up through node {k}'s API: {out}")
                continue
            s = results.sample_from_result(out, category=p.category, rep=0, count_text=count_text)
            s["node_id"] = _served_by(s)
            section["warmup"].append(s)
            progress.step(f"warm-up node {k}", s)
        if settle is not None:
            section["settle_s"] = waited = await settle()
            if waited is None:
                section["errors"].append("the nodes did not all report each other idle with the model loaded "
                                         "after the warm-ups: the clients started anyway")
        refs = {"standard": list(references), "errors": section["errors"]}  # _concurrency's errors go to ours
        conc = await _concurrency(target, settings, count_text, progress, refs)
        if conc is not None:
            for row in conc["results"]:
                row["node_id"] = _served_by(row)
            section["served_by"] = results.served_by(conc["results"])
            section["concurrency"] = conc
            section["status"] = "measured" if any(r.get("finish_reason") for r in conc["results"]) else "not measured"
    except TargetError as exc:
        section["errors"].append(str(exc))
        progress.say(f"[{target.label}] stopped: {exc}")
    finally:
        section["run_s"] = time.monotonic() - t_run
        section["meta"] = target.describe()
        for node in opened:
            await node.close()
        await target.close()
    if section["status"] != "measured":
        section.setdefault("reason", "; ".join(section["errors"]) or "no client got an answer")
    section["integrity"] = check_section(section, counter, settings.max_new_tokens)
    return section


def _served_by(sample: Mapping[str, Any]) -> str | None:
    """The node that ran a request, as ExoApiTarget found its record (None: not found)."""
    return ((sample.get("server") or {}).get("engine") or {}).get("node_id")


def describe_host() -> dict[str, Any]:
    """Where the figures were measured: the board if it is one, and how loaded the host was."""
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    for key, path in (("board_model", "/proc/device-tree/model"), ("compatible", "/proc/device-tree/compatible")):
        try:
            raw = Path(path).read_bytes()
            info[key] = [x for x in raw.decode("utf-8", "replace").split("\x00") if x] if key == "compatible" \
                else raw.decode("utf-8", "replace").strip("\x00 \n")
        except OSError:
            pass
    soc = next((c.split(",", 1)[1].upper() for c in info.get("compatible", []) if c.startswith("rockchip,rk")), None)
    info["soc"] = soc
    return info


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
