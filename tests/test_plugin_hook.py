"""The import hook installed by exo_rkllm.pth, on a stand-in exo package, and the plugin's pure hooks.

The stand-in has exactly the names legacy exo's modules define that the plugin
patches; the real thing is exercised by tests/test_real_exo.py when exo is present.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from exo_rkllm.exo_glue import plugin
from exo_driver import ExoRing
from fake_rkllama.fixtures import make_server  # noqa: F401  (a fixture)
from support import DEMO_ID, DEMO_LAYERS, make_engine, user
from exo_rkllm.runtime.sim import SimTiming

STAND_IN = {
    "exo/__init__.py": "",
    "exo/inference/__init__.py": "",
    "exo/inference/inference_engine.py": """
        from abc import ABC, abstractmethod
        class InferenceEngine(ABC):
            session = {}
            @abstractmethod
            async def encode(self, shard, prompt): ...
            @abstractmethod
            async def infer_tensor(self, request_id, shard, input_data, inference_state=None): ...
        inference_engine_classes = {"mlx": "MLXDynamicShardInferenceEngine"}
        def get_inference_engine(inference_engine_name, shard_downloader):
            raise ValueError(f"Unsupported inference engine: {inference_engine_name}")
    """,
    "exo/models.py": """
        model_cards = {"llama-3.2-1b": {"layers": 16, "repo": {"MLXDynamicShardInferenceEngine": "x"}}}
        pretty_name = {}
    """,
}

PROBE = textwrap.dedent("""
    import json, exo.inference.inference_engine as m, exo.models as models
    engine = m.get_inference_engine("rkllm", None)
    print(json.dumps({"cls": type(engine).__name__, "exo_subclass": isinstance(engine, m.InferenceEngine),
                      "registered": m.inference_engine_classes.get("rkllm"),
                      "cards": {k: v for k, v in models.model_cards.items()}}))
""")


@pytest.fixture
def stand_in(tmp_path) -> Path:
    for rel, body in STAND_IN.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(body))
    return tmp_path / "pkg"


def run_probe(stand_in: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_")}
    env.update(PYTHONPATH=str(stand_in), **env_extra)
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)


def test_plain_import_of_exo_gets_the_rkllm_engine(stand_in, demo_models_dir):
    out = run_probe(stand_in, {"RKLLM_BACKEND": "sim", "RKLLM_MODELS_DIR": str(demo_models_dir)})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["cls"] == "RKLLMInferenceEngine" and data["exo_subclass"]
    assert data["registered"] == "RKLLMInferenceEngine"
    card = data["cards"][DEMO_ID]
    assert card["layers"] == 28 and Path(card["repo"]["RKLLMInferenceEngine"]).is_dir()
    assert "Qwen2.5-1.5B-Instruct-Demo" in data["cards"]  # an alias exo accepts as a model name
    assert data["cards"]["llama-3.2-1b"]["repo"] == {"MLXDynamicShardInferenceEngine": "x"}


def test_no_runtime_and_no_simulator_choice_fails_with_what_to_do(stand_in, demo_models_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    out = run_probe(stand_in, {"RKLLM_MODELS_DIR": str(demo_models_dir), "RKLLM_SERVER_PORT": str(port),
                               "RKLLM_LIB_PATH": "/nonexistent/librkllmrt.so"})
    assert out.returncode != 0
    assert "librkllmrt.so" in out.stderr and "RKLLM_BACKEND=sim" in out.stderr and "rkllama" in out.stderr


def test_autoload_can_be_turned_off(stand_in, demo_models_dir):
    out = run_probe(stand_in, {"RKLLM_BACKEND": "sim", "RKLLM_MODELS_DIR": str(demo_models_dir),
                               "EXO_RKLLM_AUTOLOAD": "0"})
    assert out.returncode != 0 and "Unsupported inference engine: rkllm" in out.stderr


async def test_cancel_from_a_peer_aborts_the_generation(demo_models_dir):
    engine, runtime = make_engine(demo_models_dir, SimTiming(0, 0, 0, decode_ms_per_token=20))
    ring = ExoRing([engine])
    answer = await ring.chat(DEMO_ID, user("[[sim:tokens=300]]"), DEMO_LAYERS)
    status = json.dumps({"type": plugin.CANCEL_STATUS, "request_id": answer.request_id, "reason": "peer said so"})
    plugin.on_opaque_status(engine, answer.request_id, status)
    plugin.on_opaque_status(engine, "x", '{"type": "node_status"}')  # exo's own statuses are ignored
    await asyncio.wait_for(answer.finished.wait(), 5)
    for _ in range(100):
        if runtime.inner.runs[-1].finished is not None:
            break
        await asyncio.sleep(0.01)
    assert runtime.inner.runs[-1].aborted and answer.finish_reason == "error"  # cut short, never "stop"
    assert engine.active_requests() == []


# -- start-up asks the runtime factory's own question --------------------------------------------------------------
@pytest.fixture
async def foreign_http_server():
    """Some other web server on the port the rkllama backend would use (a dev server, a dashboard)."""
    from aiohttp import web

    app = web.Application()
    app.router.add_get("/", lambda request: web.Response(text="<html>not rkllama</html>", content_type="text/html"))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        await runner.cleanup()


async def test_start_up_with_an_http_server_that_is_not_rkllama_fails_and_says_so(stand_in, demo_models_dir,
                                                                                   foreign_http_server):
    out = await asyncio.to_thread(run_probe, stand_in, {
        "RKLLM_MODELS_DIR": str(demo_models_dir), "RKLLM_SERVER_PORT": str(foreign_http_server),
        "RKLLM_LIB_PATH": "/nonexistent/librkllmrt.so"})
    assert out.returncode != 0
    assert "does not look like an rkllama server" in out.stderr and f":{foreign_http_server}" in out.stderr
    assert "librkllmrt.so" in out.stderr and "RKLLM_BACKEND=sim" in out.stderr  # and what to do instead


async def test_start_up_and_the_factory_agree(demo_models_dir, foreign_http_server, make_server):
    """The start-up check and create_runtime give one verdict for a URL: refused for a server
    that is not rkllama, accepted (and built) for one that is."""
    from exo_rkllm.config import Config
    from exo_rkllm.errors import RuntimeUnavailable
    from exo_rkllm.runtime.factory import check_backend, create_runtime

    base = dict(backend="auto", lib_path=Path("/nonexistent/librkllmrt.so"), models_dir=demo_models_dir)
    foreign = Config(server_url=f"http://127.0.0.1:{foreign_http_server}", **base)
    with pytest.raises(RuntimeUnavailable, match="does not look like an rkllama server"):
        await asyncio.to_thread(check_backend, foreign)
    with pytest.raises(RuntimeUnavailable, match="does not look like an rkllama server"):
        await create_runtime(foreign)
    server = await make_server("ollama")
    real = Config(server_url=server.url, **base)
    assert await asyncio.to_thread(check_backend, real) == "rkllama"
    runtime = await create_runtime(real)
    try:
        assert runtime.capabilities.backend == "rkllama"
    finally:
        await runtime.close()


async def test_the_start_up_check_works_inside_a_running_event_loop():
    """make_engine may be called where a loop already runs (exo builds its engine before its loop, a
    test or an embedding program may not): the check still answers, with the factory's reason."""
    from exo_rkllm.config import Config
    from exo_rkllm.errors import RuntimeUnavailable
    from exo_rkllm.runtime.factory import check_backend

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = Config(backend="auto", lib_path=Path("/nonexistent/librkllmrt.so"), server_url=f"http://127.0.0.1:{port}")
    with pytest.raises(RuntimeUnavailable, match="not reachable"):
        check_backend(config)  # called on the loop's own thread
    with pytest.raises(SystemExit, match="not reachable"):
        plugin._check_runtime_available(config)


# -- the hook's module list and the plugin's patchers --------------------------------------------------------------
def test_the_hook_watches_exactly_the_modules_the_plugin_patches():
    from exo_rkllm.exo_glue import autoload as _autoload

    assert list(plugin._PATCHERS) == list(_autoload.TARGETS)


def test_autoload_reads_its_switch_as_every_boolean_is_read(stand_in, demo_models_dir):
    base = {"RKLLM_BACKEND": "sim", "RKLLM_MODELS_DIR": str(demo_models_dir)}
    off = run_probe(stand_in, {**base, "EXO_RKLLM_AUTOLOAD": " Off "})
    assert off.returncode != 0 and "Unsupported inference engine: rkllm" in off.stderr
    bogus = run_probe(stand_in, {**base, "EXO_RKLLM_AUTOLOAD": "sometimes"})
    assert bogus.returncode == 0, bogus.stderr  # the hook stays on...
    assert "EXO_RKLLM_AUTOLOAD is ignored" in bogus.stderr  # ...and says why the value did nothing


def test_our_start_up_imports_neither_transformers_nor_protobuf(demo_models_dir):
    """exo imports transformers itself (and prints its warnings); the plugin and its engine must not
    import it, or protobuf, a second time at start-up: transformers loads only for a tokenizer that
    needs it (a model folder without tokenizer.json)."""
    code = textwrap.dedent("""
        import sys
        import exo_rkllm.exo_glue.autoload, exo_rkllm.cli
        from exo_rkllm.exo_glue import plugin
        from exo_rkllm.config import Config
        engine = plugin.make_engine(None, Config.from_env())
        assert engine.catalog.servable(), "the demo model is listed"
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "google", "torch")))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_")}
    env.update(RKLLM_BACKEND="sim", RKLLM_MODELS_DIR=str(demo_models_dir))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
