"""Several boards: a ring of real legacy exo nodes on loopback, each request run whole on one node.

The nodes are started by the bench's ring launcher (exo_rkllm/bench/exo_process.py `ExoRing`: the same
RKLLM_* settings on every node, a saved-states folder and EXO_HOME each, one manual-discovery file listing
all of them) on the simulator; every request goes to node 0's API, streamed, and the node that ran it is
read from the nodes' GET /v1/rkllm/status (`recent`, matched by exo's request id, the chunk id). Before
each measurement the script waits until every node has heard that the others are idle (ExoRing.wait_idle):
a node places requests on what it last heard of the others, a moment after it changed.

  1. concurrency: on N nodes, 2N streamed clients at once through node 0's API, each asking for its own
     exact answer (`[[sim:text=...]]`, every answer the same number of tokens), against two generations
     of that length back to back through the same API in the same round: N boards should serve 2N clients
     in the time one serves two (target <= 1.15x, ideal 1.00x). Checked: every client got exactly its
     text; which node ran each request. For 3 nodes / 6 clients and 2 nodes / 4 clients, --rounds rounds.
  2. CPU per generated token, at a fast pace (--cpu-decode-ms, 5 ms per token: 200 tokens/s, so little
     idle time is in each token's figure, and still one token at a time: at zero pacing the serving node
     sends the tokens that come during one call to the API node together in the next, which measures
     batches, not the token-by-token path of a board at 8-30 tokens/s): utime+stime from
     /proc/<pid>/stat over each exo process tree (benchmarks/api_overhead.py `tree_cpu_s`), before and
     after --cpu-requests streamed answers of --cpu-tokens tokens sent one after another with a pause
     between them, divided by the tokens the engine generated (its records). For a single node, and for
     a 2-node ring running beside it (the samples of the two in turns, so the machine's noise hits both
     alike) in which node 0's NPU holds another model (a copy of the demo model in its own folder) and
     node 1's the measured one, so node 0's API places every request on node 1, the idle node with the
     model loaded: the CPU of the serving node and of the API node. Target: the serving node at most
     1.5x the single node's. Each node's idle CPU (serving nothing, per second) is printed too: it is
     part of every sample (the pauses), and the ring's nodes send each other their state every second.
  3. TTFT (request sent -> first chunk with text) of a request run by the remote node against one run
     by the API node itself and by a single node: --ttft-runs requests each, the same prompts in the same
     order. On the 2-node ring, one node is kept busy with a long generation (sent to its own API): the
     requests to node 0's API then run on the other, idle node. Remote: node 0 busy, the requests run on
     node 1; local: node 1 busy, they run on node 0. Target: remote at most 10 ms over the single node's
     (medians). The engine's own time (request arrived at the node that ran it -> first token:
     queued_s + ttft_s of its record) is printed beside it: the difference is the path to and from it.
  4. aggregate tokens/s: the 6 clients of part 1 on the 3-node ring against the same 6 clients on a
     single node (generated tokens / wall time).

Pacing: the simulator's defaults, an RK3588 running a 1.5B w8a8 model (125 ms per generated token, 40 ms
+ 8 ms per prompt token of prefill) with RKLLM_SIM_LOAD_MS lowered to --load-ms; part 2 at --cpu-decode-ms.

Run:  python benchmarks/ring.py --exo-python "$(.venv/bin/python -m tests.legacy_exo where)"
It takes about 10 minutes (single nodes and rings of 2 and 3, one after another); run it alone on a small
machine. It prints medians with min-max; a part whose nodes could not start or whose request got no
answer within --request-timeout is reported not measured (exit code 2); a client that got a wrong answer
makes the exit code 1. Timing figures depend on the machine; nothing here is asserted by the tests.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import aiohttp  # noqa: E402

from api_overhead import tree_cpu_s  # noqa: E402  (the benchmarks' reading of /proc/<pid>/stat)
from exo_rkllm.bench.exo_process import ExoProcess, ExoRing, ExoUnavailable  # noqa: E402
from exo_rkllm.bench.metrics import fmt_median_range  # noqa: E402
from exo_rkllm.bench.targets import stream_chat  # noqa: E402
from exo_rkllm.config import Config  # noqa: E402
from exo_rkllm.models.catalog import Catalog  # noqa: E402
from exo_rkllm.models.demo import write_demo_model  # noqa: E402
from exo_rkllm.models.tokenizer import load_tokenizer  # noqa: E402

MODEL = "qwen2.5-1.5b-instruct-demo"
OTHER = "ring-other-demo"  # a copy of the demo model in its own folder: another model id (part 2)
WALL_TARGET = 1.15  # part 1: 2N clients on N nodes, over two generations back to back
CPU_TARGET = 1.5  # part 2: serving node's CPU per token over a single node's
TTFT_TARGET_MS = 10.0  # part 3: remote over single, medians
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu").split()


# -- requests ----------------------------------------------------------------------------------------
@dataclass
class Reply:
    ttft_s: float
    text: str
    request_id: str
    finish: str | None  # the finish_reason; None: the stream ended without one (an error chunk instead)


async def ask(session: aiohttp.ClientSession, url: str, content: str, model: str = MODEL) -> Reply:
    """One streamed chat request (exo_rkllm.bench.targets.stream_chat), with exo's request id and finish_reason."""
    ids: list[str] = []
    finish: list[str] = []

    def seen(chunk: Mapping[str, Any]) -> None:
        if not ids and isinstance(chunk.get("id"), str):
            ids.append(chunk["id"].removeprefix("chatcmpl-"))
        for choice in chunk.get("choices") or []:
            if choice.get("finish_reason"):
                finish.append(choice["finish_reason"])

    ttft, text = await stream_chat(session, url, {"model": model, "messages": [{"role": "user", "content": content}]},
                                   on_chunk=seen)
    return Reply(ttft, text, ids[0] if ids else "", finish[-1] if finish else None)


def exact_text(tok: Any, tag: str, tokens: int) -> str:
    """An answer of exactly `tokens` tokens (the demo tokenizer's count), starting with `tag`: each client's own."""
    def count(t: str) -> int:
        return len(tok.encode(t, add_special_tokens=False))

    text, i = f" {tag}", 0
    while count(text) < tokens:
        word = next((w for w in (WORDS[(i + k) % len(WORDS)] for k in range(len(WORDS)))
                     if count(f"{text} {w}") <= tokens), None)
        if word is None:
            raise ValueError(f"cannot build an answer of exactly {tokens} tokens for {tag!r}")
        text += " " + word
        i += 1
    if count(text) != tokens:
        raise ValueError(f"cannot build an answer of exactly {tokens} tokens for {tag!r}")
    return text


def sim_prompt(text: str) -> str:
    return f"Say your line, exactly. [[sim:text={text}]]"


async def records(session: aiohttp.ClientSession, urls: Sequence[str], rids: Sequence[str],
                  ceiling_s: float = 10.0) -> dict[str, tuple[int, dict[str, Any]]]:
    """Each request's run record and the index of the node that ran it (its status route's `recent`);
    polled: a record is written once the runtime has stopped, which may follow the end of the answer."""
    found: dict[str, tuple[int, dict[str, Any]]] = {}
    deadline = time.monotonic() + ceiling_s
    while True:
        for k, url in enumerate(urls):
            async with session.get(f"{url}/v1/rkllm/status") as resp:
                status = await resp.json()
            for run in status.get("recent") or []:
                if run.get("request_id") in rids:
                    found[run["request_id"]] = (k, run)
        if len(found) == len(set(rids)) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.1)


def served(found: Mapping[str, tuple[int, dict[str, Any]]], rids: Sequence[str]) -> str:
    """`node0 node1 node1 ...` in the order of `rids` (`?` where no node had the record)."""
    return " ".join(f"node{found[r][0]}" if r in found else "?" for r in rids)


# -- nodes -------------------------------------------------------------------------------------------
def sim_env(models: Path, config: Config, load_ms: float, decode_ms: float | None = None) -> dict[str, str]:
    """The engine's settings, the same on every node: the simulator's RK3588 pacing, or (`decode_ms`)
    that decode pace and no prefill time."""
    fast = decode_ms is not None
    return {"RKLLM_BACKEND": "sim", "RKLLM_MODELS_DIR": str(models), "RKLLM_SIM_LOAD_MS": f"{load_ms:g}",
            "RKLLM_SIM_DECODE_MS": f"{decode_ms:g}" if fast else f"{config.sim_decode_ms:g}",
            "RKLLM_SIM_PREFILL_MS": "0" if fast else f"{config.sim_prefill_ms:g}",
            "RKLLM_SIM_PREFILL_BASE_MS": "0" if fast else f"{config.sim_prefill_base_ms:g}",
            "DEBUG": "0"}  # exo's own debug printing off, whatever this shell has


async def start(python: str, env: dict[str, str], logs: Path, size: int, name: str) -> ExoRing:
    ring = ExoRing(python, env, logs, size, log_prefix=f"exo-{name}")
    await ring.start()
    print(f"  [{name}: {size} node(s) up after {ring.started_s:.1f} s; logs {logs}/exo-{name}-node*.log]", flush=True)
    return ring


async def warm(session: aiohttp.ClientSession, ring: ExoRing) -> None:
    """One request through each node's own API at once (an idle ring runs it where it arrives: every node
    loads the model), then until every node has heard the others are idle."""
    replies = await asyncio.gather(*(ask(session, url, f"warm-up {k} [[sim:tokens=2]]")
                                     for k, url in enumerate(ring.urls)))
    found = await records(session, ring.urls, [r.request_id for r in replies])
    if ring.size > 1 and sorted(found[r.request_id][0] for r in replies if r.request_id in found) != \
            list(range(ring.size)):
        print(f"  note: the warm-ups ran on {served(found, [r.request_id for r in replies])}, not one per node")
    await settle(ring)


async def settle(ring: ExoRing) -> None:
    if ring.size > 1 and await ring.wait_idle(MODEL, timeout_s=20) is None:
        print("  note: the nodes did not all report each other idle within 20 s")


def log_problems(ring: ExoRing) -> list[str]:
    """Lines of the nodes' logs that report an error (a Traceback of exo's own shutdown is not one)."""
    out = []
    for node in ring.nodes:
        for line in node.log_path.read_text(errors="replace").splitlines():
            low = line.lower()
            if ("error" in low or "exception" in low or " warning " in low) and "simulated" not in low \
                    and "cancellederror" not in low:
                out.append(f"{node.node_id}: {line.strip()[:200]}")
    return out


# -- 1 and 4: concurrency ----------------------------------------------------------------------------
@dataclass
class Concurrency:
    nodes: int
    clients: int
    tokens: int
    two_s: list[float] = field(default_factory=list)  # two generations back to back
    wall_s: list[float] = field(default_factory=list)  # the clients at once
    tps: list[float] = field(default_factory=list)  # the clients' tokens / wall
    own: list[int] = field(default_factory=list)
    where: list[str] = field(default_factory=list)  # per round: the clients' nodes
    where_two: list[str] = field(default_factory=list)  # per round: the back-to-back pair's nodes
    ttft_s: list[float] = field(default_factory=list)


async def concurrency(session: aiohttp.ClientSession, ring: ExoRing, tok: Any, clients: int, tokens: int,
                      rounds: int, back_to_back: bool = True) -> Concurrency:
    out = Concurrency(ring.size, clients, tokens)
    for r in range(rounds):
        if back_to_back:
            texts = [exact_text(tok, f"p{i}r{r}n{ring.size}", tokens) for i in range(2)]
            t0 = time.monotonic()
            pair = [await ask(session, ring.url, sim_prompt(t)) for t in texts]
            out.two_s.append(time.monotonic() - t0)
            out.where_two.append(served(await records(session, ring.urls, [p.request_id for p in pair]),
                                        [p.request_id for p in pair]))
            if [(p.text, p.finish) for p in pair] != [(t, "stop") for t in texts]:
                print(f"  WRONG back-to-back answer in round {r}")
            await settle(ring)
        texts = [exact_text(tok, f"c{i}r{r}n{ring.size}", tokens) for i in range(clients)]
        t0 = time.monotonic()
        replies = await asyncio.gather(*(ask(session, ring.url, sim_prompt(t)) for t in texts))
        wall = time.monotonic() - t0
        out.wall_s.append(wall)
        out.tps.append(clients * tokens / wall)
        out.own.append(sum(rep.text == t and rep.finish == "stop" for rep, t in zip(replies, texts)))
        out.ttft_s += [rep.ttft_s for rep in replies]
        out.where.append(served(await records(session, ring.urls, [rep.request_id for rep in replies]),
                                [rep.request_id for rep in replies]))
        await settle(ring)
    return out


# -- 2: CPU per token --------------------------------------------------------------------------------
@dataclass
class Cpu:
    per_token_us: dict[str, list[float]] = field(default_factory=dict)  # process label -> per sample
    idle_us_per_s: dict[str, float] = field(default_factory=dict)
    window_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    own: int = 0  # answers that were exactly their text, with finish_reason "stop"
    answers: int = 0


async def idle_cpu(pids: Mapping[str, int], seconds: float = 10.0) -> dict[str, float]:
    before = {k: tree_cpu_s(p) for k, p in pids.items()}
    await asyncio.sleep(seconds)
    return {k: (tree_cpu_s(p) - before[k]) * 1e6 / seconds for k, p in pids.items()}


async def cpu_sample(session: aiohttp.ClientSession, api: str, urls: Sequence[str], pids: Mapping[str, int],
                     texts: Sequence[str], pause_s: float, out: Cpu) -> None:
    """One sample into `out`: the CPU of each process in `pids` per generated token over the requests
    for `texts` (exact answers, checked) sent one after another through `api`."""
    before = {k: tree_cpu_s(p) for k, p in pids.items()}
    t0 = time.monotonic()
    rids = []
    for text in texts:
        reply = await ask(session, api, sim_prompt(text))
        rids.append(reply.request_id)
        out.answers += 1
        out.own += reply.text == text and reply.finish == "stop"
        await asyncio.sleep(pause_s)  # the node ends its bookkeeping; the ring hears it is idle
    after = {k: tree_cpu_s(p) for k, p in pids.items()}
    out.window_s.append(time.monotonic() - t0)
    found = await records(session, urls, rids)  # outside the window: reading statuses costs CPU too
    generated = sum(found[r][1]["generated"] for r in rids if r in found)
    out.tokens.append(generated)
    out.where.append(served(found, rids))
    for k in pids:
        out.per_token_us.setdefault(k, []).append((after[k] - before[k]) * 1e6 / max(1, generated))


def pid(node: ExoProcess) -> int:
    assert node.proc is not None
    return node.proc.pid


# -- 3: TTFT -----------------------------------------------------------------------------------------
TTFT_PROMPTS = [f"Question {i + 10}: what does the NPU of an RK3588 do? [[sim:tokens=2]]" for i in range(40)]


@dataclass
class Ttft:
    client_s: list[float] = field(default_factory=list)
    engine_s: list[float] = field(default_factory=list)  # arrival at the running node -> first token
    prefilled: list[int] = field(default_factory=list)
    where: list[str] = field(default_factory=list)


async def ttft_runs(session: aiohttp.ClientSession, api: str, urls: Sequence[str], runs: int,
                    idle_node: str | None = None) -> Ttft:
    """`runs` requests one after another; on a ring, each once the API node has heard that `idle_node`
    (the node that ran the previous one) is idle again."""
    out = Ttft()
    for prompt in TTFT_PROMPTS[:runs]:
        if idle_node is not None:
            await heard_idle(session, api, idle_node)
        reply = await ask(session, api, prompt)
        found = await records(session, urls, [reply.request_id])
        out.client_s.append(reply.ttft_s)
        out.where.append(served(found, [reply.request_id]))
        if reply.request_id in found:
            run = found[reply.request_id][1]
            out.engine_s.append(run["queued_s"] + run["ttft_s"])
            out.prefilled.append(run["prefilled"])
    return out


async def ring_row(session: aiohttp.ClientSession, api: str, node_id: str) -> dict[str, Any]:
    """What the node at `api` has heard of `node_id` (its status route's ring row)."""
    async with session.get(f"{api}/v1/rkllm/status") as resp:
        rows = (await resp.json())["ring"]["nodes"]
    return next((row for row in rows if row["node_id"] == node_id), {})


async def heard_idle(session: aiohttp.ClientSession, api: str, node_id: str, ceiling_s: float = 10.0) -> None:
    deadline = time.monotonic() + ceiling_s
    while time.monotonic() < deadline:
        row = await ring_row(session, api, node_id)
        if row.get("up") and not row.get("load") and not row.get("running") and row.get("loaded") == MODEL:
            return
        await asyncio.sleep(0.05)


async def while_busy(session: aiohttp.ClientSession, ring: ExoRing, busy: int, runs: int) -> Ttft:
    """TTFT through node 0's API while node `busy` runs a long generation sent to its own API."""
    long = asyncio.ensure_future(ask(session, ring.urls[busy], f"keep node {busy} busy [[sim:tokens=2000]]"))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # until node 0 knows that node `busy` is running it
        if (await ring_row(session, ring.url, ring.nodes[busy].node_id)).get("running"):
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    try:
        return await ttft_runs(session, ring.url, ring.urls, runs, idle_node=ring.nodes[1 - busy].node_id)
    finally:
        long.cancel()  # the client leaves: exo cancels the generation
        await asyncio.gather(long, return_exceptions=True)
        await settle(ring)


# -- the run -----------------------------------------------------------------------------------------
def fig(values: Sequence[float], scale: float = 1.0, spec: str = ".2f", unit: str = "") -> str:
    return fmt_median_range([v * scale for v in values], spec, unit) if values else "not measured"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


FAILURES = (ExoUnavailable, aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError)


class Run:
    """The measurements so far, what failed, and the node logs' error lines."""

    def __init__(self, args: argparse.Namespace, logs: Path) -> None:
        self.args, self.logs = args, logs
        self.problems: list[str] = []
        self.failed: dict[str, str] = {}
        self.wrong = 0

    async def phase(self, name: str, env: dict[str, str], size: int, body: Any) -> Any:
        """Start `size` node(s), run `body(ring)`, stop them; None (and the reason kept) if anything failed."""
        ring: ExoRing | None = None
        try:
            ring = await start(self.args.exo_python, env, self.logs, size, name)
            return await body(ring)
        except FAILURES as exc:
            self.failed[name] = f"{type(exc).__name__}: {exc}"[:600]
            print(f"  [{name}: FAILED: {self.failed[name]}]", flush=True)
            return None
        finally:
            if ring is not None:
                await ring.stop()
                self.problems += log_problems(ring)


def print_concurrency(c: Concurrency) -> None:
    ratio = [w / t for w, t in zip(c.wall_s, c.two_s)]
    print(f"   {c.nodes} nodes, {c.clients} clients: wall {fig(c.wall_s, unit=' s')}, two back to back "
          f"{fig(c.two_s, unit=' s')}, ratio {fig(ratio, spec='.3f', unit='x')} (target <= {WALL_TARGET}x: "
          f"{verdict(statistics.median(ratio) <= WALL_TARGET)}); own text {sum(c.own)}/{c.clients * len(c.own)}")
    for r, (where, two) in enumerate(zip(c.where, c.where_two)):
        print(f"     round {r}: clients ran on {where}; the pair on {two}")


def print_cpu(single: Cpu | None, ring: Cpu | None) -> None:
    for label, res in (("single node", single), ("ring of 2", ring)):
        if res is None:
            print(f"   {label}: not measured")
            continue
        for who, values in res.per_token_us.items():
            idle = res.idle_us_per_s[who]
            net = [v - idle * w / max(1, t) for v, w, t in zip(values, res.window_s, res.tokens)]
            print(f"   {label:11} {who:22} {fig(values, spec='.0f', unit=' µs')}  (idle {idle:.0f} µs/s; "
                  f"less the idle share: {fig(net, spec='.0f', unit=' µs')})")
        print(f"     requests ran on: {' | '.join(res.where)}; exactly their text, finish stop: "
              f"{res.own}/{res.answers}")
    if single is None or ring is None:
        return
    base = single.per_token_us["single node"]
    serving = [s / b for s, b in zip(ring.per_token_us["serving node (node 1)"], base)]
    api = [a / b for a, b in zip(ring.per_token_us["API node (node 0)"], base)]
    print(f"   per sample pair, over the single node's: serving node {fig(serving, unit='x')} (target <= "
          f"{CPU_TARGET}x: {verdict(statistics.median(serving) <= CPU_TARGET)}); API node {fig(api, unit='x')}; "
          f"both ring nodes {fig([s + a for s, a in zip(serving, api)], unit='x')}")


def print_ttft(single: Ttft | None, local: Ttft | None, remote: Ttft | None) -> None:
    for label, t in (("single node", single), ("ring, run by the API node (node 1 busy)", local),
                     ("ring, run by the remote node (node 0 busy)", remote)):
        if t is None:
            print(f"   {label}: not measured")
            continue
        hop = [c - e for c, e in zip(t.client_s, t.engine_s)]
        print(f"   {label:43} {fig(t.client_s, 1000, '.1f', ' ms')}; engine (arrival at the node that ran it -> "
              f"first token) {fig(t.engine_s, 1000, '.1f', ' ms')}; the rest {fig(hop, 1000, '.1f', ' ms')}; "
              f"prefilled {fig(t.prefilled, spec='.0f')} tokens; ran on {' '.join(sorted(set(t.where)))}")
    if single is None or remote is None:
        return
    over = (statistics.median(remote.client_s) - statistics.median(single.client_s)) * 1000
    line = f"   remote - single: {over:+.1f} ms (target <= +{TTFT_TARGET_MS:g} ms: {verdict(over <= TTFT_TARGET_MS)})"
    if local is not None:
        local_over = (statistics.median(remote.client_s) - statistics.median(local.client_s)) * 1000
        line += f"; remote - API node: {local_over:+.1f} ms"
    print(line)


async def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exo-python", default=sys.executable, help="Python with legacy exo")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of part 1 per ring size")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per answer in parts 1 and 4")
    ap.add_argument("--load-ms", type=float, default=300.0, help="RKLLM_SIM_LOAD_MS (the warm-up pays it)")
    ap.add_argument("--ttft-runs", type=int, default=10)
    ap.add_argument("--cpu-samples", type=int, default=7, help="sample pairs (single node, ring) in part 2")
    ap.add_argument("--cpu-requests", type=int, default=4, help="requests per CPU sample (at most 5: `recent`)")
    ap.add_argument("--cpu-tokens", type=int, default=500, help="tokens per answer in part 2")
    ap.add_argument("--cpu-pause", type=float, default=0.6, help="seconds between the requests of a CPU sample")
    ap.add_argument("--cpu-decode-ms", type=float, default=5.0,
                    help="part 2's decode pace (0: as fast as the simulator goes; see the module docstring)")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request counts as lost")
    ap.add_argument("--only", choices=("paced", "cpu"), help="only parts 1, 3 and 4 (paced), or only part 2 (cpu)")
    args = ap.parse_args(argv)

    config = Config.from_env()
    work = Path(tempfile.mkdtemp(prefix="exo-rkllm-ring-bench-"))
    models = work / "models"
    write_demo_model(models)
    demo = next(p for p in models.iterdir() if p.is_dir())
    shutil.copytree(demo, models / "Ring-Other-Demo", copy_function=os.link)  # files hard-linked
    tok = load_tokenizer(Catalog(config.with_(models_dir=models)).resolve(MODEL).spec(config).tokenizer_dir)
    paced, fast = sim_env(models, config, args.load_ms), sim_env(models, config, args.load_ms, args.cpu_decode_ms)
    run = Run(args, work / "logs")
    print(f"simulated RK3588: decode {config.sim_decode_ms:g} ms/token, prefill {config.sim_prefill_base_ms:g} ms + "
          f"{config.sim_prefill_ms:g} ms/token, model load {args.load_ms:g} ms; answers of {args.tokens} tokens; "
          f"nodes on loopback started by ExoRing under {args.exo_python}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} at the start", flush=True)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=args.request_timeout)) as session:
        async def single_paced(ring: ExoRing) -> tuple[Concurrency, Ttft]:
            await warm(session, ring)
            one6 = await concurrency(session, ring, tok, 6, args.tokens, args.rounds, back_to_back=False)
            return one6, await ttft_runs(session, ring.url, ring.urls, args.ttft_runs)

        async def ring3_paced(ring: ExoRing) -> Concurrency:
            await warm(session, ring)
            return await concurrency(session, ring, tok, 6, args.tokens, args.rounds)

        async def ring2_paced(ring: ExoRing) -> tuple[Concurrency, Ttft, Ttft]:
            await warm(session, ring)
            c2 = await concurrency(session, ring, tok, 4, args.tokens, args.rounds)
            remote = await while_busy(session, ring, 0, args.ttft_runs)
            return c2, await while_busy(session, ring, 1, args.ttft_runs), remote

        async def cpu_both(single: ExoRing, ring: ExoRing) -> tuple[Cpu, Cpu]:
            """The single node and the ring side by side, sample by sample (which goes first alternates):
            the machine's noise then hits both alike."""
            await warm(session, single)
            # node 0's NPU holds the other model, node 1's this one: node 0's API places this model's requests
            # on node 1, the idle node that has it loaded. (A node with nothing loaded loads the model another
            # node starts a prompt of: exo's preemptively_load_shard; hence the other model first.)
            await ask(session, ring.urls[0], "hold the other model on node 0 [[sim:tokens=2]]", model=OTHER)
            await asyncio.sleep(1.0)
            await ask(session, ring.urls[1], "load the model on node 1 [[sim:tokens=2]]")
            await asyncio.sleep(1.0)
            first = await ask(session, ring.url, "warm node 0's API (placed on node 1) [[sim:tokens=2]]")
            print(f"  [cpu-ring2: the warm-up through node 0's API ran on "
                  f"{served(await records(session, ring.urls, [first.request_id]), [first.request_id])}]")
            await asyncio.sleep(1.0)
            one, two = Cpu(), Cpu()
            pids = {"single node": pid(single.nodes[0])}
            ring_pids = {"API node (node 0)": pid(ring.nodes[0]), "serving node (node 1)": pid(ring.nodes[1])}
            idle = await idle_cpu({**pids, **ring_pids})
            one.idle_us_per_s = {k: idle[k] for k in pids}
            two.idle_us_per_s = {k: idle[k] for k in ring_pids}
            for n in range(args.cpu_samples):
                texts = [exact_text(tok, f"s{n}q{i}", args.cpu_tokens) for i in range(args.cpu_requests)]
                turns = [(single, pids, one), (ring, ring_pids, two)]
                for node, who, out in (turns if n % 2 == 0 else turns[::-1]):
                    await cpu_sample(session, node.url, node.urls, who, texts, args.cpu_pause, out)
            return one, two

        if args.only in (None, "paced"):
            one = await run.phase("single", paced, 1, single_paced)
            c3 = await run.phase("ring3", paced, 3, ring3_paced)
            print("\n1. 2N streamed clients at once through node 0's API vs two generations back to back (same API, "
                  f"same round), {args.tokens}-token answers, {args.rounds} rounds; median (min-max)")
            if c3 is not None:
                print_concurrency(c3)
                run.wrong += sum(c3.clients - o for o in c3.own)
            if one is not None and c3 is not None:
                one6 = one[0]
                run.wrong += sum(6 - o for o in one6.own)
                ratio = statistics.median(c3.tps) / statistics.median(one6.tps)
                print(f"\n4. aggregate tokens/s, 6 clients at once ({args.tokens}-token answers), {args.rounds} "
                      f"rounds: ring of 3 {fig(c3.tps)} tok/s (wall {fig(c3.wall_s, unit=' s')}), one node "
                      f"{fig(one6.tps)} tok/s (wall {fig(one6.wall_s, unit=' s')}): {ratio:.2f}x (best possible 3x); "
                      f"TTFT p50 ring {statistics.median(c3.ttft_s) * 1000:.0f} ms, one node "
                      f"{statistics.median(one6.ttft_s) * 1000:.0f} ms; one node's clients got their own text "
                      f"{sum(one6.own)}/{6 * len(one6.own)}", flush=True)
            r2 = await run.phase("ring2", paced, 2, ring2_paced)
            if r2 is not None:
                print("\n1. (continued)")
                print_concurrency(r2[0])
                run.wrong += sum(r2[0].clients - o for o in r2[0].own)
            print(f"\n3. TTFT, request sent -> first chunk with text, {args.ttft_runs} runs each (the same prompts, "
                  "2-token answers); on the 2-node ring one node runs a long generation sent to its own API, so node "
                  "0's API places the requests on the other; median (min-max)")
            print_ttft(one[1] if one else None, r2[1] if r2 else None, r2[2] if r2 else None)
            sys.stdout.flush()
        if args.only in (None, "cpu"):
            both = await run.phase("cpu-single", fast, 1, lambda single: run.phase(
                "cpu-ring2", fast, 2, lambda ring: cpu_both(single, ring)))
            cpu1, cpu2 = both if both is not None else (None, None)
            print(f"\n2. CPU per generated token (utime+stime of the exo process tree), decode {args.cpu_decode_ms:g} "
                  f"ms/token and no prefill time, {args.cpu_samples} samples of {args.cpu_requests} streamed "
                  f"{args.cpu_tokens}-token answers, {args.cpu_pause:g} s apart, the single node's and the "
                  "ring's samples in turns; median (min-max)")
            print_cpu(cpu1, cpu2)
            run.wrong += sum(c.answers - c.own for c in (cpu1, cpu2) if c is not None)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} (1 min)")
    for name, why in run.failed.items():
        print(f"NOT MEASURED ({name}): {why}")
    print("node logs: " + ("no error lines" if not run.problems else f"{len(run.problems)} error line(s):"))
    for line in run.problems[:20]:
        print(f"   {line}")
    return 2 if run.failed else 1 if run.wrong else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
