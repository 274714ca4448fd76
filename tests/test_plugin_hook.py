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

from exo_rkllm import plugin
from exo_driver import ExoRing
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
