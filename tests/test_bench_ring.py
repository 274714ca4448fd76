"""`exo-rkllm bench --ring N`: the private ring the bench starts, the run against it, and its report.

The launcher (ExoRing) is exercised with a tiny stand-in for exo's interpreter that behaves like it where
it matters here: it answers the bench's probe, binds its --chatgpt-api-port itself, logs the settings it
was started with, and answers /v1/models and /v1/rkllm/status with the ring rows of every node listed in
the discovery file it was given (all up once FAKE_RING_AFTER_S has passed). No real exo is needed.
"""
from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from exo_rkllm.bench import cli, exo_process, report, results
from exo_rkllm.bench.exo_process import ExoProbe, ExoRing, ExoUnavailable, discovery_config
from exo_rkllm.bench.prompts import BenchPrompt
from exo_rkllm.bench.runner import BenchSettings, run_ring
from exo_rkllm.bench.targets import ChatResult, ExoApiTarget
from test_bench_exo_process import _listener, _ports_then_free
from test_bench_http_targets import serve

FAKE_RING_NODE = textwrap.dedent('''\
    #!{python}
    import http.server, json, os, sys, time
    if sys.argv[1] == "-c" and sys.argv[-1].endswith("exo_env.py"):  # the bench's probe
        print(json.dumps({{"exo": True, "hooked": True, "python": "3"}}))
        sys.exit(0)
    arg = lambda name: sys.argv[sys.argv.index(name) + 1]
    port, me, config = int(arg("--chatgpt-api-port")), arg("--node-id"), arg("--discovery-config-path")
    print("started " + json.dumps({{"node_id": me, "node_port": int(arg("--node-port")), "config": config,
                                    "cwd": os.getcwd(), "env": {{k: v for k, v in os.environ.items()
                                                                 if k.startswith(("RKLLM_", "EXO_HOME"))}}}}),
          flush=True)
    if os.environ.get("FAKE_FAIL_NODE") == me:
        time.sleep(0.3)
        print("boom: this node cannot start", flush=True)
        sys.exit(3)
    t0 = time.monotonic()
    peers = list(json.load(open(config))["peers"])

    class Node(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/v1/models":
                body = {{"object": "list", "data": [{{"id": "demo"}}]}}
            elif self.path == "/v1/rkllm/status":
                up = time.monotonic() - t0 >= float(os.environ.get("FAKE_RING_AFTER_S", "0"))
                rows = [{{"node_id": p, "this_node": p == me, "up": up or p == me, "loaded": "demo", "running": None,
                          "waiting": [], "load": 0}} for p in peers]
                body = {{"ring": {{"node_id": me, "nodes": rows, "placed_here": 0}}, "recent": []}}
            else:
                self.send_response(404)
                self.end_headers()
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    try:
        server = http.server.HTTPServer(("127.0.0.1", port), Node)
    except OSError as exc:
        print(f"OSError: {{exc}}", flush=True)  # [Errno 98] Address already in use; legacy exo stays up
        time.sleep(3600)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    ''')

SETTINGS = {"RKLLM_BACKEND": "sim", "RKLLM_MODELS_DIR": "/models", "RKLLM_SIM_DECODE_MS": "125"}


@pytest.fixture
def fake_exo(tmp_path) -> str:
    path = tmp_path / "python-with-exo"
    path.write_text(FAKE_RING_NODE.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def _started(node: exo_process.ExoProcess) -> list[dict[str, Any]]:
    """What the fake node logged about how it was started, one entry per start."""
    return [json.loads(line[len("started "):]) for line in node.log_path.read_text().splitlines()
            if line.startswith("started ")]


def _ended(ring: ExoRing) -> list[bool]:
    return [node.proc is not None and node.proc.poll() is not None for node in ring.nodes]


# -- the launcher ----------------------------------------------------------------------------------------
def test_the_plan_lists_every_node_once_and_gives_each_its_own_folders(tmp_path):
    ring = ExoRing("/some/python", {**SETTINGS, "RKLLM_CACHE_DIR": "/shared"}, tmp_path / "logs", 3,
                   default_model="demo")
    nodes = ring.plan(tmp_path / "work")
    config = json.loads(ring.config_path.read_text())
    assert config == discovery_config([(n.node_id, n.node_port) for n in nodes])
    assert list(config["peers"]) == [n.node_id for n in nodes] and len({n.node_id for n in nodes}) == 3
    assert all(p["address"] == "127.0.0.1" for p in config["peers"].values())
    memory = [p["device_capabilities"]["memory"] for p in config["peers"].values()]
    assert memory == sorted(memory, reverse=True) and len(set(memory)) == 3  # one order on every node
    ports = [p for n in nodes for p in (n.api_port, n.node_port)]
    assert len(set(ports)) == 6 and all(ports)
    for node in nodes:
        assert node.config_path == ring.config_path and node.default_model == "demo"
        assert {k: v for k, v in node.env.items() if k != "RKLLM_CACHE_DIR"} == SETTINGS
        command = node.command(ring.config_path, has_plugin=True)
        assert command[command.index("--discovery-config-path") + 1] == str(ring.config_path)
        assert command[command.index("--node-id") + 1] == node.node_id
        assert command[command.index("--node-port") + 1] == str(node.node_port)
    caches = {n.env["RKLLM_CACHE_DIR"] for n in nodes}
    homes = {n.environment(ExoProbe("/some/python", True, True), n.work_dir)["EXO_HOME"] for n in nodes}
    assert len(caches) == len(homes) == len({n.work_dir for n in nodes}) == len({n.log_path for n in nodes}) == 3
    assert "/shared" not in caches  # saved KV states belong to one board
    assert all(Path(c).is_relative_to(tmp_path / "work") for c in caches | homes)


def test_one_node_is_the_single_nodes_config():
    """A one-node discovery file is what --start-exo has always written for its single node."""
    assert discovery_config([("exo-rkllm-bench", 5678)]) == {"peers": {"exo-rkllm-bench": {
        "address": "127.0.0.1", "port": 5678, "device_capabilities": {
            "model": "bench", "chip": "bench", "memory": 16000, "flops": {"fp32": 0, "fp16": 0, "int8": 0}}}}}


async def test_a_ring_starts_with_one_config_and_its_own_env_per_node_and_stops(fake_exo, tmp_path):
    ring = ExoRing(fake_exo, dict(SETTINGS), tmp_path / "logs", 3)
    try:
        url = await ring.start(timeout_s=30)
        assert url == ring.urls[0] and len(set(ring.urls)) == 3 and ring.attempts == 1
        starts = [_started(node)[-1] for node in ring.nodes]
        assert {s["config"] for s in starts} == {str(ring.config_path)}
        assert [s["node_id"] for s in starts] == list(json.loads(ring.config_path.read_text())["peers"])
        for node, s in zip(ring.nodes, starts):
            assert {k: v for k, v in s["env"].items() if k.startswith("RKLLM_") and k != "RKLLM_CACHE_DIR"} == SETTINGS
            assert s["env"]["RKLLM_CACHE_DIR"] == node.env["RKLLM_CACHE_DIR"] and s["cwd"] == str(node.work_dir)
        assert len({s["env"]["RKLLM_CACHE_DIR"] for s in starts}) == len({s["env"]["EXO_HOME"] for s in starts}) == 3
        assert await ring.wait_idle("demo", timeout_s=5) is not None
        assert await ring.wait_idle("another-model", timeout_s=0.3) is None  # the nodes hold "demo"
        work = ring.work_dir
        assert work is not None and all(Path(s["env"]["RKLLM_CACHE_DIR"]).is_relative_to(work) for s in starts)
    finally:
        await ring.stop()
    assert all(_ended(ring))
    assert not work.exists() and all(node.log_path.is_file() for node in ring.nodes)  # states gone, logs kept


async def test_one_node_failing_to_start_stops_every_node(fake_exo, tmp_path):
    ring = ExoRing(fake_exo, {**SETTINGS, "FAKE_FAIL_NODE": "exo-rkllm-bench-1"}, tmp_path / "logs", 3)
    with pytest.raises(ExoUnavailable, match="exited with code 3") as err:
        await ring.start(timeout_s=30)
    assert "boom" in str(err.value)  # the failing node's log tail
    assert len(ring.nodes) == 3 and all(_ended(ring))
    assert all(_started(node) for node in ring.nodes)  # the others had started: they were stopped too


async def test_the_start_returns_once_every_node_sees_the_whole_ring(fake_exo, tmp_path):
    ring = ExoRing(fake_exo, {**SETTINGS, "FAKE_RING_AFTER_S": "1.5"}, tmp_path / "logs", 2)
    try:
        await ring.start(timeout_s=30)
        async with aiohttp.ClientSession() as session:
            seen = [await ExoRing._nodes_seen(session, node) for node in ring.nodes]
        assert seen == [2, 2]
    finally:
        await ring.stop()


async def test_a_ring_that_does_not_form_is_unavailable_and_stopped(fake_exo, tmp_path):
    ring = ExoRing(fake_exo, {**SETTINGS, "FAKE_RING_AFTER_S": "999"}, tmp_path / "logs", 2)
    t0 = time.monotonic()
    with pytest.raises(ExoUnavailable, match=r"did not form: the nodes see \[1, 1\] nodes up"):
        await ring.start(timeout_s=3)
    assert time.monotonic() - t0 < 30 and all(_ended(ring))


async def test_a_port_taken_on_one_node_restarts_the_whole_ring_on_fresh_ports(fake_exo, tmp_path, monkeypatch):
    with _listener() as taken:
        port = taken.getsockname()[1]
        _ports_then_free(monkeypatch, [port])  # node 0's API port, taken before it binds it
        ring = ExoRing(fake_exo, dict(SETTINGS), tmp_path / "logs", 2)
        try:
            await ring.start(timeout_s=30)
            assert ring.attempts == 2 and port not in [p for n in ring.nodes for p in (n.api_port, n.node_port)]
            config = json.loads(ring.config_path.read_text())
            assert [p["port"] for p in config["peers"].values()] == [n.node_port for n in ring.nodes]
            for node in ring.nodes:
                assert "start 2" in node.log_path.read_text() and len(_started(node)) == 2
        finally:
            await ring.stop()
    assert all(_ended(ring))


# -- where a request ran ---------------------------------------------------------------------------------
def _node_app(node_id: str, recent: list[dict[str, Any]], pieces: list[str] = ()) -> web.Application:
    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "demo"}]})

    async def status(request):
        return web.json_response({"backend": "sim", "runtime": {"backend": "sim", "version": "sim-1.3.0"},
                                  "recent": recent, "ring": {"node_id": node_id, "nodes": [], "placed_here": 0}})

    async def chat(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, p in enumerate([*pieces, ""]):
            chunk = {"id": "chatcmpl-req-1", "choices": [{"index": 0, "delta": {"content": p},
                                                          "finish_reason": "stop" if i == len(pieces) else None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/rkllm/status", status)
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def test_the_exo_target_finds_a_request_on_the_node_that_ran_it():
    api_runner, api = await serve(_node_app("node-a", [], ["Hi", " there"]))
    other_runner, other = await serve(_node_app("node-b", [{"request_id": "req-1", "prefilled": 9, "generated": 2}]))
    try:
        target = ExoApiTarget(api, "demo", None, status_urls=[api, other])
        await target.open()
        res = await target.chat([{"role": "user", "content": "hello"}])
        meta = target.describe()
        await target.close()
    finally:
        await api_runner.cleanup()
        await other_runner.cleanup()
    assert res.text == "Hi there" and res.prefill_tokens == 9
    assert res.server["engine"]["node_id"] == "node-b" and meta["status_urls"] == [api, other]


# -- the run against the ring ----------------------------------------------------------------------------
PROMPTS = (BenchPrompt("Math", "What is 145 + 278?"), BenchPrompt("Creative", "Write a haiku about AI."))
ANSWERS = {p.prompt: f"answer to {p.category}" for p in PROMPTS}


class FakeNode:
    """A target whose answers are the prompt's own and say which node ran them, as ExoApiTarget's do."""

    kind = "exo"

    def __init__(self, label: str, runs_on: list[str], log: list[str]) -> None:
        self.label, self.runs_on, self.log, self.n = label, runs_on, log, 0

    async def open(self) -> None:
        self.log.append(f"open {self.label}")

    async def chat(self, messages) -> ChatResult:
        node = self.runs_on[self.n % len(self.runs_on)]
        self.n += 1
        self.log.append(f"chat {self.label}")
        t = time.monotonic()
        text = ANSWERS[messages[-1]["content"]]
        res = ChatResult(t_start=t, t_end=t + 0.5, t_first=t + 0.1, token_times=[t + 0.1, t + 0.2], text=text,
                         finish_reason="stop", completion_tokens=2, completion_source="test")
        res.server["engine"] = {"node_id": node, "generated": 2}
        return res

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "url": self.label}

    async def close(self) -> None:
        self.log.append(f"close {self.label}")


def _references() -> list[dict[str, Any]]:
    return results.standard_section([(p.category, p.prompt) for p in PROMPTS],
                                    [{"category": p.category, "text": ANSWERS[p.prompt]} for p in PROMPTS])


async def test_run_ring_warms_every_node_settles_then_runs_the_clients():
    log: list[str] = []

    async def settle() -> float:
        log.append("settle")
        return 0.25

    api = FakeNode("node 0 API", ["n0", "n1", "n2", "n0"], log)
    nodes = [FakeNode(f"node {k}", [f"n{k}"], log) for k in range(3)]
    settings = BenchSettings(prompts=PROMPTS, clients=4, max_new_tokens=10)
    section = await run_ring(api, nodes, settings, None, _references(), settle=settle)
    assert section["status"] == "measured" and section["nodes"] == 3 and section["settle_s"] == 0.25
    assert [w["node_id"] for w in section["warmup"]] == ["n0", "n1", "n2"]
    assert log.index("settle") > max(log.index(f"chat node {k}") for k in range(3))
    assert log.index("settle") < log.index("chat node 0 API")
    assert section["served_by"] == {"n0": 2, "n1": 1, "n2": 1}
    conc = section["concurrency"]
    assert conc["clients"] == 4 and conc["own_answers"] == 4 and conc["passed"]
    assert [r["node_id"] for r in conc["results"]] == ["n0", "n1", "n2", "n0"]
    assert section["integrity"]["by_part"] == {"warm-up": 3, "standard": 0, "multi-turn": 0, "concurrent": 4}
    assert {f"close node {k}" for k in range(3)} | {"close node 0 API"} <= set(log)


async def test_run_ring_says_when_the_ring_did_not_settle():
    async def never() -> None:
        return None

    log: list[str] = []
    section = await run_ring(FakeNode("api", ["n0"], log), [FakeNode("n", ["n0"], log)],
                             BenchSettings(prompts=PROMPTS, clients=2), None, _references(), settle=never)
    assert section["status"] == "measured" and section["settle_s"] is None
    assert any("did not all report each other idle" in e for e in section["errors"])


# -- the comparison and its report -----------------------------------------------------------------------
def _concurrency(wall: float, node_ids: list[str]) -> dict[str, Any]:
    clients = [{"category": "Math", "text": "t", "finish_reason": "stop", "completion_tokens": 10,
                "response_s": wall, "ttft_s": 0.2 * (i + 1), "node_id": n} for i, n in enumerate(node_ids)]
    return results.concurrency_section(clients, wall, {"Math": {"t"}}, deterministic=True)


def test_served_by_counts_each_node_and_the_unknown():
    rows = [{"node_id": "b"}, {"node_id": "a"}, {"node_id": "b"}, {}, {"node_id": "a", "error": "boom"}]
    assert results.served_by(rows) == {"a": 1, "b": 2, "unknown": 1}


def test_ring_comparison_divides_the_ring_by_one_node():
    one, ring = _concurrency(8.0, ["x"] * 4), _concurrency(2.0, ["a", "b", "a", "b"])
    comp = results.ring_comparison(one, ring, 2, {"a": 2, "b": 2})
    assert comp["throughput_ratio"] == pytest.approx(4.0) and comp["wall_ratio"] == pytest.approx(0.25)
    assert comp["best_speedup"] == 2 and comp["clients"] == 4 and comp["served_by"] == {"a": 2, "b": 2}
    assert comp["one_node"]["throughput_tps"] == pytest.approx(5.0) and comp["ring"]["wall_s"] == 2.0
    assert results.ring_comparison(None, ring, 2) is None


def _report_with_ring(ring: dict[str, Any]) -> dict[str, Any]:
    one = _concurrency(8.0, ["x"] * 4)
    rep = {"targets": {"exo": {"label": "exo API", "kind": "exo", "status": "measured", "standard": [],
                               "concurrency": one}}, "ring": ring}
    if ring.get("concurrency"):
        rep["ring_comparison"] = results.ring_comparison(one, ring["concurrency"], ring["nodes"], ring["served_by"])
    return rep


def test_the_report_puts_the_ring_next_to_one_node():
    conc = _concurrency(4.0, ["n0", "n1", "n0", "n1"])
    ring = {"nodes": 2, "status": "measured", "concurrency": conc, "served_by": {"n0": 2, "n1": 2}, "errors": [],
            "warmup": [{"node_id": "n0"}, {"node_id": "n1"}], "settle_s": 0.21, "meta": {"start_s": 5.6},
            "integrity": {"answers": 6, "clean": 6, "by_part": {"warm-up": 2, "concurrent": 4}, "problems": {}}}
    md = report.render_markdown(_report_with_ring(ring))
    assert "## Ring of 2 exo nodes vs one node" in md
    assert "| one node | 1 | 4 | 8.00 s | 5.00 | 500 ms | 770 ms |" in md
    assert "| ring of 2 | 2 | 4 | 4.00 s | 10.00 | 500 ms | 770 ms |" in md
    assert "aggregate tokens/s **2.00×**, wall time **0.50×**" in md and "at best 2×" in md
    assert "n0 2, n1 2" in md and "run by: n0, n1; then 0.21 s" in md
    assert "Integrity: 6/6 answers clean" in md
    assert md.index("## Concurrent clients") < md.index("## Ring of 2") < md.index("## How these numbers")


def test_a_ring_not_measured_says_why_and_no_ring_no_section():
    md = report.render_markdown(_report_with_ring({"nodes": 3, "status": "not measured",
                                                   "reason": "the ring of 3 did not form"}))
    assert "## Ring of 3 exo nodes vs one node" in md and "**not measured**: the ring of 3 did not form" in md
    assert "## Ring of" not in report.render_markdown({"targets": {}})


@pytest.mark.parametrize("argv, message", [
    (["--sim", "--ring", "1"], "at least 2"),
    (["--sim", "--target", "runtime", "--ring", "2"], "add --start-exo"),
    (["--url", "http://127.0.0.1:9", "--ring", "2"], "add --start-exo"),
    (["--sim", "--ring", "2", "--clients", "0"], "--clients must be at least 1"),
])
def test_the_cli_refuses_a_ring_it_cannot_compare(argv, message, capsys, tmp_path):
    assert cli.main([*argv, "--models-dir", str(tmp_path), "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_ring_is_off_by_default():
    assert cli.build_parser().parse_args([]).ring == 0

