"""Saved KV states against a real exo on the simulator paced like an RK3588: interleaved conversations
and a shared system prompt, with the saved states on and off (RKLLM_PROMPT_CACHE), in one run.

Three exo processes, one after the other, on the same machine:
  on    RKLLM_PROMPT_CACHE=1 (the default)
  off   RKLLM_PROMPT_CACHE=0: the live KV cache only (what exo-rkllm did before)
Each measures, streamed, the time from sending a request to its first chunk with text (TTFT):
  alone        one conversation of N turns, each sent when the previous answer is complete: a plain
               follow-up turn, continuing the live KV cache (the reference curve)
  interleaved  two conversations of N turns each, A1 B1 A2 B2 ..., each sent when the previous answer is
               complete (`--think S` waits S seconds first, as a person reading the answer would)
  system       `--system-tokens` of system prompt, then new conversations that start with it: the first
               turn of each (the first conversation of the "on" run saves it; the others restore it)
and checks that the interleaved answers are byte-identical with the caches on and off (greedy).
Prompt sizes come from the demo model's tokenizer; the engine's own counts (prefilled, reused,
restored) come from GET /v1/rkllm/status.

Run:  python benchmarks/saved_states.py --exo-python "$(.venv/bin/python -m tests.legacy_exo where)"
It prints every turn's TTFT twice, as the client sees it (request sent -> first chunk with text) and as
the engine records it (request arrived -> first token: an answer whose first token is half a character
shows its text one decode step later), the ratio of each interleaved turn to the same turn alone, medians
with min-max, and exits non-zero only if exo could not be started or an answer differed. Timing figures
depend on the machine; nothing here is asserted by the test suite.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

import aiohttp

from exo_rkllm.bench.exo_process import ExoProcess, ExoUnavailable
from exo_rkllm.bench.metrics import fmt_median_range
from exo_rkllm.bench.targets import stream_chat
from exo_rkllm.config import Config
from exo_rkllm.models.catalog import Catalog
from exo_rkllm.models.demo import write_demo_model
from exo_rkllm.models.tokenizer import load_tokenizer

MODEL = "qwen2.5-1.5b-instruct-demo"
TOPICS = ("the NPU's three cores", "memory bandwidth", "quantisation to w8a8", "the KV cache", "prefill speed",
          "decode speed", "power draw", "thermal throttling", "running two models", "context length")
SENTENCE = "Please explain {topic} on the RK3588 in practical terms, with an example a hobbyist can try at home. "


def user_turn(tok, tag: str, turn: int, tokens: int, answer_tokens: int) -> str:
    """A user message of `tokens` tokens (the directive that sets the answer's length included), different
    per conversation and turn."""
    words = (SENTENCE.format(topic=TOPICS[(turn + ord(tag[0])) % len(TOPICS)]) * (tokens // 8 + 2)).split(" ")
    directive = f" [[sim:tokens={answer_tokens}]]"
    text = f"[{tag}{turn}]"
    for word in words:
        if len(tok.encode(text + " " + word + directive)) > tokens:
            break
        text += " " + word
    return text + directive


def system_prompt(tok, tokens: int, tag: str) -> str:
    base = f"You are assistant {tag}, a careful expert on single-board computers. "
    rules = [f"Rule {i}: keep answer {i} short, exact and polite, and mention the board model." for i in range(400)]
    text, i = base, 0
    while len(tok.encode(text)) < tokens:
        text += " " + rules[i]
        i += 1
    return text


async def streamed(session: aiohttp.ClientSession, url: str, messages) -> tuple[float, str]:
    """(seconds to the first chunk with text, the whole text), greedy."""
    return await stream_chat(session, url, {"model": MODEL, "messages": messages, "temperature": 0})


class Conversation:
    def __init__(self, tok, tag: str, system: str) -> None:
        self.tok, self.tag = tok, tag
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}]
        self.ttfts: list[float] = []  # the client's: request sent -> first chunk with text
        self.first_tokens: list[float] = []  # the engine's: request arrived -> first token (status route)
        self.records: list[dict] = []
        self.answers: list[str] = []

    async def turn(self, session, url: str, user_tokens: int, answer_tokens: int) -> None:
        n = len(self.answers) + 1
        self.messages.append({"role": "user", "content": user_turn(self.tok, self.tag, n, user_tokens,
                                                                   answer_tokens)})
        ttft, text = await streamed(session, url, self.messages)
        self.messages.append({"role": "assistant", "content": text})
        self.ttfts.append(ttft)
        self.answers.append(text)
        (record,), _ = await recent(session, url, 1)
        self.records.append(record)
        self.first_tokens.append(record["queued_s"] + record["ttft_s"])


async def recent(session, url: str, n: int) -> tuple[list[dict], dict]:
    """The engine's last `n` run records and its saved-state summary (GET /v1/rkllm/status)."""
    async with session.get(f"{url}/v1/rkllm/status") as resp:
        body = await resp.json()
    return body.get("recent", [])[-n:], body.get("prompt_cache", {})


async def run_exo(args, name: str, env: dict[str, str], models: Path, tok) -> dict:
    exo = ExoProcess(args.exo_python, env, models.parent / f"exo-{name}.log")
    await exo.start()
    out: dict = {"name": name}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as s:
            await streamed(s, exo.url, [{"role": "user", "content": "warm-up [[sim:tokens=2]]"}])  # load
            short = system_prompt(tok, 40, "X")
            if name == "on":
                alone = Conversation(tok, "C", short)
                for _ in range(args.turns):
                    await alone.turn(s, exo.url, args.user_tokens, args.answer_tokens)
                    await asyncio.sleep(args.think)
                out["alone"] = {"client": alone.ttfts, "engine": alone.first_tokens}
            a = Conversation(tok, "A", system_prompt(tok, 40, "A"))
            b = Conversation(tok, "B", system_prompt(tok, 40, "B"))
            for _ in range(args.turns):
                for conv in (a, b):
                    await conv.turn(s, exo.url, args.user_tokens, args.answer_tokens)
                    await asyncio.sleep(args.think)
            out["interleaved"] = {"client": {"A": a.ttfts, "B": b.ttfts},
                                  "engine": {"A": a.first_tokens, "B": b.first_tokens}}
            out["answers"] = {"A": a.answers, "B": b.answers}
            out["records"] = [r for pair in zip(a.records, b.records) for r in pair]
            long = system_prompt(tok, args.system_tokens, "S")
            firsts, sys_records = [], []
            for i in range(args.system_conversations + (1 if name == "on" else 0)):
                conv = Conversation(tok, f"S{i}", long)
                await conv.turn(s, exo.url, args.user_tokens, 4)
                sys_records += conv.records
                firsts.append(conv.ttfts[0])
            out["system"] = firsts[1:] if name == "on" else firsts  # the "on" run's first one saves the prompt
            out["system_saving"] = firsts[0] if name == "on" else None
            out["system_records"] = sys_records
            out["cache"] = (await recent(s, exo.url, 1))[1]
    finally:
        await exo.stop()
    return out


def row(values) -> str:
    return " ".join(f"{v:6.2f}" for v in values)


async def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exo-python", default=sys.executable)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--user-tokens", type=int, default=40, help="tokens per user message")
    ap.add_argument("--answer-tokens", type=int, default=24)
    ap.add_argument("--think", type=float, default=0.0, help="seconds between an answer and the next request")
    ap.add_argument("--system-tokens", type=int, default=500)
    ap.add_argument("--system-conversations", type=int, default=3)
    args = ap.parse_args(argv)

    base = Config.from_env()
    work = Path(tempfile.mkdtemp(prefix="exo-rkllm-states-"))
    models = work / "models"
    write_demo_model(models)
    tok = load_tokenizer(Catalog(base.with_(models_dir=models)).resolve(MODEL).spec(base).tokenizer_dir)
    common = {"RKLLM_BACKEND": "sim", "RKLLM_MODELS_DIR": str(models)}
    print(f"simulated RK3588: prefill {base.sim_prefill_base_ms:.0f} ms + {base.sim_prefill_ms:.0f} ms/token, decode "
          f"{base.sim_decode_ms:.0f} ms/token, KV state save/restore {base.sim_cache_io_ms} ms/token; "
          f"{args.turns} turns, user messages ~{args.user_tokens} tokens, answers {args.answer_tokens} tokens, "
          f"think time {args.think} s")
    try:
        on = await run_exo(args, "on", {**common, "RKLLM_CACHE_DIR": str(work / "states")}, models, tok)
        off = await run_exo(args, "off", {**common, "RKLLM_PROMPT_CACHE": "0"}, models, tok)
    except ExoUnavailable as exc:
        print(f"exo could not be started: {exc}")
        return 2
    for clock, what in (("client", "request sent -> first chunk with text (client)"),
                        ("engine", "request arrived -> first token (engine, from the status route)")):
        alone = on["alone"][clock]
        print(f"\nTTFT per turn, seconds (turn 1 .. {args.turns}): {what}")
        print(f"  one conversation alone (live KV):      {row(alone)}")
        for label, res in (("interleaved, saved states on ", on), ("interleaved, saved states off", off)):
            for tag in ("A", "B"):
                print(f"  {label} {tag}:     {row(res['interleaved'][clock][tag])}")
        print(f"  ratio of each interleaved turn (2..{args.turns}) to the same turn alone:")
        for label, res in (("on", on), ("off", off)):
            r = [t / alone[i] for tag in ("A", "B") for i, t in enumerate(res["interleaved"][clock][tag]) if i > 0]
            print(f"    saved states {label:3}: {fmt_median_range(r, unit='x')}  (max {max(r):.2f}x)")
    later = on["records"][2:]
    print(f"\nengine counts, interleaved turns 2..N with states on: prefilled "
          f"{fmt_median_range([r['prefilled'] for r in later], spec='.0f')}, restored "
          f"{fmt_median_range([r['restored'] for r in later], spec='.0f')} tokens; off: prefilled "
          f"{fmt_median_range([r['prefilled'] for r in off['records'][2:]], spec='.0f')}")
    prompt_tokens = on["system_records"][-1]["prompt_tokens"]
    print(f"\nnew conversation with a {args.system_tokens}-token system prompt ({prompt_tokens} prompt tokens), "
          "first-turn TTFT")
    print(f"  saved states off: {fmt_median_range(off['system'], unit=' s')}")
    print(f"  saved states on:  {fmt_median_range(on['system'], unit=' s')}  (the first conversation, which saved "
          f"it: {on['system_saving']:.2f} s)")
    print(f"  {statistics.median(off['system']) / statistics.median(on['system']):.1f}x lower with the saved state; "
          f"restored {[r['restored'] for r in on['system_records'][1:]]} tokens")
    same = on["answers"] == off["answers"]
    print(f"\ninterleaved answers byte-identical with saved states on and off: {same}")
    print(f"store after the 'on' run: {json.dumps(on['cache'])}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
