"""Open WebUI's request pattern against a real exo on the simulator paced like an RK3588.

Open WebUI (0.12.x, default settings) sends, for a chat message, a non-streamed title request
0.2 s before the streamed chat request, and once the answer is complete a tags request and a
follow-up-suggestions request (non-streamed too). Their prompts are its "### Task:" templates
around the chat history (215-397 tokens here), their answers 30-54 tokens. Before priorities,
the person's first word waited for all of them.

Each round measures the chat request's time to first text (request sent -> first chunk with
text) three ways, in the same exo:
  alone   the chat request on an idle NPU (no background requests)
  first   a first message: title request sent 0.2 s before it (it holds the NPU when the chat arrives)
  next    a second message, sent 1 s after the first answer ended, while the tags and follow-up
          requests of the first one run
and checks that every background answer came back complete and equal to the same request run
alone on an idle NPU (greedy simulator: a paused and resumed answer must be identical).

Run:  python benchmarks/openwebui_pattern.py --exo-python "$(.venv/bin/python -m tests.legacy_exo where)"
      (add --no-priorities for arrival order, as before priorities existed)
It prints medians with min-max and exits non-zero only if exo could not be started or an answer
was wrong. Timing figures depend on the machine; nothing here is asserted by the test suite.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

import aiohttp

from exo_rkllm.bench.exo_process import ExoProcess, ExoUnavailable
from exo_rkllm.bench.metrics import fmt_median_range
from exo_rkllm.bench.targets import stream_chat
from exo_rkllm.models.catalog import Catalog
from exo_rkllm.config import Config
from exo_rkllm.models.demo import write_demo_model
from exo_rkllm.models.tokenizer import load_tokenizer

MODEL = "qwen2.5-1.5b-instruct-demo"
CHAT_TOKENS = 24
# (task, prompt tokens, answer tokens): Open WebUI's three default background tasks
TASKS = (("title", 215, 30), ("tags", 306, 42), ("follow_ups", 397, 54))
HEADINGS = {
    "title": "Generate a concise, 3-5 word title with an emoji summarizing the chat history.",
    "tags": "Generate 1-3 broad tags categorizing the main themes of the chat history, along with 1-3 more "
            "specific subtopic tags.",
    "follow_ups": "Suggest 3-5 relevant follow-up questions or prompts that the user might naturally ask next in "
                  "this conversation as a **user**, based on the chat history, to help continue or deepen the "
                  "discussion.",
}
FILLER = ("The user asked how the NPU of the RK3588 runs a language model, and the assistant explained "
          "prefill, decode, the KV cache and why the first token takes longer than the next ones. ")


def task_prompt(tok, task: str, prompt_tokens: int, answer_tokens: int, round_no: int) -> str:
    """An Open WebUI task prompt whose chat template comes to about `prompt_tokens` tokens."""
    head = (f"### Task:\n{HEADINGS[task]}\n### Guidelines:\n- Keep it short.\n### Output:\nJSON format\n"
            f"### Chat History:\n<chat_history>\nUSER: question {round_no} [[sim:tokens={answer_tokens}]]\n"
            "ASSISTANT: ")
    tail = "\n</chat_history>"
    history = ""
    while True:
        text = head + history + tail
        n = len(tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                   add_generation_prompt=True)))
        if n >= prompt_tokens:
            return text
        history += FILLER if prompt_tokens - n > 40 else "ok "


def chat_message(round_no: int, which: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Round {round_no} ({which}): how fast is the NPU? "
                                        f"[[sim:tokens={CHAT_TOKENS}]]"}]


async def streamed_chat(session: aiohttp.ClientSession, url: str, messages) -> tuple[float, str]:
    """(seconds to the first chunk with text, whole text) of a streamed chat request."""
    return await stream_chat(session, url, {"model": MODEL, "messages": messages})


async def task_request(session: aiohttp.ClientSession, url: str, prompt: str) -> str:
    """A non-streamed task request as Open WebUI sends it; returns the answer's text."""
    async with session.post(f"{url}/v1/chat/completions",
                            json={"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                                  "stream": False}) as resp:
        body = await resp.json(content_type=None)
        if resp.status != 200:
            raise RuntimeError(f"task request failed with HTTP {resp.status}: {body}")
        return body["choices"][0]["message"]["content"]


async def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exo-python", default=sys.executable, help="Python with legacy exo (and exo-rkllm, or the "
                    "checkout is layered on it)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-priorities", action="store_true", help="serve in arrival order (RKLLM_BACKGROUND_MAX_WAIT"
                    "=0), to see what the priorities save")
    args = ap.parse_args(argv)

    base = Config.from_env()
    models = Path(tempfile.mkdtemp(prefix="exo-rkllm-owui-")) / "models"
    write_demo_model(models)
    spec = Catalog(base.with_(models_dir=models)).resolve(MODEL).spec(base)
    tok = load_tokenizer(spec.tokenizer_dir)
    env = {"RKLLM_BACKEND": "sim", "RKLLM_MODELS_DIR": str(models)}
    if args.no_priorities:
        env["RKLLM_BACKGROUND_MAX_WAIT"] = "0"
    exo = ExoProcess(args.exo_python, env, models.parent / "exo.log")
    try:
        await exo.start()
    except ExoUnavailable as exc:
        print(f"exo could not be started: {exc}")
        return 2
    print(f"simulated RK3588 pacing: decode {base.sim_decode_ms:.0f} ms/token, prefill {base.sim_prefill_ms:.0f} "
          f"ms/token + {base.sim_prefill_base_ms:.0f} ms; chat answers {CHAT_TOKENS} tokens; background tasks "
          + ", ".join(f"{t} {p}->{a} tokens" for t, p, a in TASKS))
    alone, first, nxt = [], [], []
    answers: dict[str, str] = {}
    failures = 0
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
            await streamed_chat(s, exo.url, chat_message(0, "warm-up"))  # the model load is not measured
            for r in range(1, args.rounds + 1):
                prompts = {t: task_prompt(tok, t, p, a, r) for t, p, a in TASKS}
                alone.append((await streamed_chat(s, exo.url, chat_message(r, "alone")))[0])

                title = asyncio.create_task(task_request(s, exo.url, prompts["title"]))
                await asyncio.sleep(0.2)
                ttft, _ = await streamed_chat(s, exo.url, chat_message(r, "first"))
                first.append(ttft)
                later = [asyncio.create_task(task_request(s, exo.url, prompts[t])) for t in ("tags", "follow_ups")]
                await asyncio.sleep(1.0)
                nxt.append((await streamed_chat(s, exo.url, chat_message(r, "next")))[0])
                got = await asyncio.gather(title, *later)
                for task, text in zip(("title", "tags", "follow_ups"), got):
                    answers[f"{r}:{task}"] = text
                print(f"round {r}: alone {alone[-1]:.2f} s, first message {first[-1]:.2f} s, "
                      f"next message {nxt[-1]:.2f} s")
            # every background answer, preempted or not, must equal the same request on an idle NPU
            for key, text in answers.items():
                r, task = key.split(":")
                t, p, a = next(x for x in TASKS if x[0] == task)
                again = await task_request(s, exo.url, task_prompt(tok, task, p, a, int(r)))
                if again != text or not text:
                    failures += 1
                    print(f"  {key}: the answer differs from the same request run alone "
                          f"({len(text)} vs {len(again)} characters)")
            async with s.get(f"{exo.url}/v1/rkllm/status") as resp:
                status = await resp.json()
    finally:
        await exo.stop()
    base_ttft = statistics.median(alone)
    print(f"\nchat request, time to first text over {args.rounds} rounds (median, min-max):")
    print(f"  without background requests:              {fmt_median_range(alone, unit=' s')}")
    print(f"  with a title request 0.2 s before it:      {fmt_median_range(first, unit=' s')}  "
          f"({statistics.median(first) / base_ttft:.2f}x)")
    print(f"  while tags and follow-up requests run:     {fmt_median_range(nxt, unit=' s')}  "
          f"({statistics.median(nxt) / base_ttft:.2f}x)")
    lines = [line for line in exo.log_path.read_text(errors="replace").splitlines() if " generated, queued " in line]
    paused = [line for line in lines if ", paused " in line]
    print(f"background answers complete and equal to an uninterrupted run: {len(answers) - failures}/{len(answers)}; "
          f"requests paused and resumed: {len(paused)} of {len(lines)} logged; left after the run: "
          f"streams={status.get('streams')} queued={status.get('queued')} running={status.get('running')}")
    for line in paused[:3]:
        print("  " + line.strip()[-220:])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
