"""Starting a private exo for the bench: a port taken between picking it and exo binding it.

exo is replaced by a tiny stand-in interpreter that behaves like it where it matters here: it
answers the bench's probe, takes a moment to start, binds --chatgpt-api-port itself and
answers /v1/models. When the port is taken it logs "address already in use" and stays up
without its API, as legacy exo 5f18faec1 does (its API task dies unawaited), or exits.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from aiohttp import web

from exo_rkllm.bench import exo_process
from exo_rkllm.bench.exo_process import ExoProcess, ExoUnavailable, owns_port

FAKE_EXO = textwrap.dedent('''\
    #!{python}
    import http.server, json, sys, time
    if sys.argv[1] == "-c" and sys.argv[-1].endswith("exo_env.py"):  # the bench's probe
        print(json.dumps({{"exo": True, "hooked": True, "python": "3"}}))
        sys.exit(0)
    port = int(sys.argv[sys.argv.index("--chatgpt-api-port") + 1])
    time.sleep(0.8)  # exo takes a while before it binds its API port

    class Models(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({{"object": "list", "data": [{{"id": "demo"}}]}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    try:
        server = http.server.HTTPServer(("127.0.0.1", port), Models)
    except OSError as exc:
        print(f"OSError: {{exc}}", flush=True)  # [Errno 98] Address already in use
        if "--exit-on-bind-error" in sys.argv[0]:
            sys.exit(1)
        time.sleep(3600)  # legacy exo: the API task died, the node stays up without it
    print(f"serving on {{port}}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    ''')


@pytest.fixture(params=["stays-up", "--exit-on-bind-error"])
def fake_exo(tmp_path, request) -> str:
    path = tmp_path / f"python-with-exo{request.param}"
    path.write_text(FAKE_EXO.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def _ports_then_free(monkeypatch, first: list[int]) -> None:
    """free_port() hands out `first` (ports someone took after they were picked), then really free ones."""
    real = exo_process.free_port
    queue = list(first)
    monkeypatch.setattr(exo_process, "free_port", lambda: queue.pop(0) if queue else real())


async def test_a_taken_port_is_retried_on_fresh_ones(fake_exo, tmp_path, monkeypatch):
    with _listener() as taken:
        port = taken.getsockname()[1]
        _ports_then_free(monkeypatch, [port])
        proc = ExoProcess(fake_exo, {}, tmp_path / "exo.log")
        try:
            url = await proc.start(timeout_s=30)
            assert proc.attempts == 2 and proc.api_port != port and url.endswith(f":{proc.api_port}")
            assert owns_port(proc.proc.pid, proc.api_port) is True
        finally:
            await proc.stop()
    log = (tmp_path / "exo.log").read_text()
    assert "already in use" in log.lower() and "start 2" in log


async def test_another_server_on_the_port_is_not_taken_for_exo(fake_exo, tmp_path, monkeypatch):
    """Someone else answers /v1/models on the picked port before exo gives up on it: the bench must not
    measure that server as its exo."""
    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "demo"}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    _ports_then_free(monkeypatch, [port])
    proc = ExoProcess(fake_exo, {}, tmp_path / "exo.log")
    try:
        await proc.start(timeout_s=30)
        assert proc.api_port != port and proc.attempts == 2
        assert owns_port(proc.proc.pid, proc.api_port) is True
    finally:
        await proc.stop()
        await runner.cleanup()


async def test_ports_the_caller_chose_are_not_changed(fake_exo, tmp_path):
    with _listener() as taken:
        port = taken.getsockname()[1]
        proc = ExoProcess(fake_exo, {}, tmp_path / "exo.log", api_port=port, node_port=port + 1)
        with pytest.raises(ExoUnavailable, match="already in use"):
            await proc.start(timeout_s=30)
        assert proc.attempts == 1 and proc.api_port == port


def test_owns_port_reads_proc():
    import os

    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux /proc")
    with _listener() as s:
        port = s.getsockname()[1]
        assert owns_port(os.getpid(), port) is True
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # does not inherit it
        try:
            assert owns_port(other.pid, port) is False
        finally:
            other.kill()
            other.wait()


# -- source_root: run another exo-rkllm source tree (a baseline revision) under a python with exo only --------

FAKE_EXO_WITHOUT_PLUGIN = textwrap.dedent('''\
    #!{python}
    import http.server, json, os, sys
    if sys.argv[1] == "-c" and sys.argv[-1].endswith("exo_env.py"):  # the bench's probe: exo, but no exo-rkllm hook
        print(json.dumps({{"exo": True, "hooked": False, "python": "3"}}))
        sys.exit(0)
    import exo_rkllm  # what the boot line would import: from PYTHONPATH, since nothing is installed here
    print("PYTHONPATH=" + os.environ.get("PYTHONPATH", ""), flush=True)
    print("exo_rkllm=" + exo_rkllm.__file__, flush=True)
    print("boot=" + sys.argv[2], flush=True)
    port = int(sys.argv[sys.argv.index("--chatgpt-api-port") + 1])

    class Models(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'{{"object": "list", "data": []}}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    try:
        http.server.HTTPServer(("127.0.0.1", port), Models).serve_forever()
    except KeyboardInterrupt:
        pass
    ''')


def _source_tree(root: Path, marker: str) -> Path:
    """A minimal exo-rkllm source tree whose package says which tree it is."""
    (root / "exo_rkllm").mkdir(parents=True)
    (root / "exo_rkllm" / "__init__.py").write_text(f"TREE = {marker!r}\n")
    (root / "exo_rkllm.pth").write_text("import exo_rkllm\n")  # its start-up hook line
    return root


def test_the_boot_line_runs_the_trees_own_hook(tmp_path):
    """A baseline revision's hook may live in another module than this checkout's."""
    tree = _source_tree(tmp_path / "baseline", "baseline")
    (tree / "exo_rkllm.pth").write_text("import exo_rkllm._autoload\n")
    proc = ExoProcess("/some/python", {}, tmp_path / "exo.log", source_root=tree)
    command = proc.command(tmp_path / "peers.json", has_plugin=False)
    assert command[:2] == ["/some/python", "-c"] and "import exo_rkllm._autoload;" in command[2]
    ours = ExoProcess("/some/python", {}, tmp_path / "exo.log").command(tmp_path / "peers.json", has_plugin=False)
    assert "import exo_rkllm.exo_glue.autoload;" in ours[2]


def _probe(has_plugin: bool) -> exo_process.ExoProbe:
    return exo_process.ExoProbe("/some/python", has_exo=True, has_plugin=has_plugin)


def test_source_root_goes_first_on_pythonpath(tmp_path, monkeypatch):
    tree = _source_tree(tmp_path / "baseline", "baseline")
    monkeypatch.setenv("PYTHONPATH", "/already/there")
    proc = ExoProcess("/some/python", {"RKLLM_BACKEND": "sim"}, tmp_path / "exo.log", source_root=tree)
    env = proc.environment(_probe(has_plugin=False), tmp_path / "work")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tree.resolve()), "/already/there"]
    assert env["RKLLM_BACKEND"] == "sim" and env["EXO_HOME"] == str(tmp_path / "work" / "exo-home")


def test_without_source_root_the_running_checkout_is_used(tmp_path, monkeypatch):
    import exo_rkllm

    monkeypatch.delenv("PYTHONPATH", raising=False)
    proc = ExoProcess("/some/python", {}, tmp_path / "exo.log")
    env = proc.environment(_probe(has_plugin=False), tmp_path / "work")
    assert env["PYTHONPATH"] == str(Path(exo_rkllm.__file__).resolve().parent.parent)


def test_an_installed_plugin_keeps_pythonpath_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/already/there")
    env = ExoProcess("/some/python", {}, tmp_path / "exo.log").environment(_probe(has_plugin=True), tmp_path)
    assert env["PYTHONPATH"] == "/already/there"


def test_source_root_with_an_installed_plugin_is_refused(tmp_path):
    """The installed exo-rkllm's start-up hook would win: the bench would measure the wrong build."""
    tree = _source_tree(tmp_path / "baseline", "baseline")
    proc = ExoProcess("/some/python", {}, tmp_path / "exo.log", source_root=tree)
    with pytest.raises(ExoUnavailable, match="installed"):
        proc.environment(_probe(has_plugin=True), tmp_path / "work")


def test_source_root_must_be_a_source_tree(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = ExoProcess("/some/python", {}, tmp_path / "exo.log", source_root=tmp_path / "empty")
    with pytest.raises(ExoUnavailable, match="not an exo-rkllm source tree"):
        proc.environment(_probe(has_plugin=False), tmp_path / "work")


async def test_the_started_exo_imports_exo_rkllm_from_source_root(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    fake = tmp_path / "python-with-exo-only"
    fake.write_text(FAKE_EXO_WITHOUT_PLUGIN.format(python=sys.executable))
    fake.chmod(0o755)
    tree = _source_tree(tmp_path / "baseline", "baseline")
    proc = ExoProcess(str(fake), {}, tmp_path / "exo.log", source_root=tree)
    try:
        await proc.start(timeout_s=30)
    finally:
        await proc.stop()
    log = (tmp_path / "exo.log").read_text()
    assert f"exo_rkllm={tree.resolve() / 'exo_rkllm' / '__init__.py'}" in log
    assert f"PYTHONPATH={tree.resolve()}" in log
    assert "boot=" in log and "import exo_rkllm;" in log  # run through the tree's boot line, not `-m exo.main`
