"""Rings whose boards hold different models: a model folder without its .rkllm file is route-only.

Such a node has the tokenizer files and Modelfile: it lists the model while another live node of the
ring runs it, templates and tokenizes its requests, and the placement sends them to that node. Nothing
runs the model on this node's NPU, and a model no live node has is a clear error, not a hang.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from exo_rkllm import cli
from exo_rkllm.config import Config
from exo_rkllm.errors import ModelUnavailable
from exo_rkllm.models.catalog import Catalog
from exo_rkllm.models.demo import DEMO_FILE, DEMO_FOLDER
from exo_rkllm.runtime.sim import write_sim_model

from api_harness import sim_text, start_api, stop_api
from exo_driver import ExoRing, Shard
from support import DEMO_ID, DEMO_LAYERS, make_engine, user
from test_api_chat import content_of

ROUTES_ONLY = "routes only (no .rkllm file here"


def route_copy(root: Path, demo_model_dir: Path, name: str = DEMO_FOLDER, *, modelfile: bool = True) -> Path:
    """The demo model folder as a routing board has it: tokenizer files and Modelfile (whose FROM names the
    absent file, as a copy of the folder keeps it), no .rkllm file."""
    folder = root / name
    shutil.copytree(demo_model_dir, folder, ignore=shutil.ignore_patterns("*.rkllm"))
    if not modelfile:
        (folder / "Modelfile").unlink()
    return folder


def catalog(root: Path, **kw) -> Catalog:
    return Catalog(Config(models_dir=root, **kw))


# -- the catalog --------------------------------------------------------------------------------------
def test_a_folder_without_its_model_file_is_route_only_and_never_servable(tmp_path, demo_model_dir):
    route_copy(tmp_path, demo_model_dir)
    cat = catalog(tmp_path)
    entry = cat.find(DEMO_ID)
    assert entry is not None and not entry.ok and entry.routable
    assert entry.problem == f"Modelfile FROM={DEMO_FILE!r}: no such file in {tmp_path / DEMO_FOLDER}"
    assert cat.servable() == [] and [e.model_id for e in cat.routable()] == [DEMO_ID]
    with pytest.raises(ModelUnavailable, match="no such file.*this node only routes it"):
        cat.resolve(DEMO_ID)
    with pytest.raises(ModelUnavailable, match="this node only routes it"):
        entry.spec(cat.config)
    assert cat.resolve(DEMO_ID, allow_route_only=True) == entry
    assert entry.context_len == 4096 and entry.n_layers == DEMO_LAYERS  # what the API and placement need


def test_tokenizer_files_without_a_modelfile_route_too(tmp_path, demo_model_dir):
    route_copy(tmp_path, demo_model_dir, "Qwen-Tok", modelfile=False)
    sub = tmp_path / "Sub-Tok" / "tokenizer"  # rkllama 0.0.74's tokenizer/ subfolder
    shutil.copytree(tmp_path / "Qwen-Tok", sub)
    by_id = {e.model_id: e for e in catalog(tmp_path).entries()}
    assert by_id["qwen-tok"].routable and by_id["qwen-tok"].problem.startswith("no .rkllm file in")
    assert by_id["sub-tok"].routable and by_id["sub-tok"].tokenizer_source == str(sub)


def test_what_is_broken_is_never_routable(tmp_path, demo_model_dir):
    bad_mf = route_copy(tmp_path, demo_model_dir, "BadModelfile")
    (bad_mf / "Modelfile").write_text('FROM="x.rkllm"\nTEMPERATURE=hot\n')
    no_tok = tmp_path / "NoTokenizer"
    no_tok.mkdir()
    (no_tok / "Modelfile").write_text('FROM="x.rkllm"\n')
    other_file = route_copy(tmp_path, demo_model_dir, "OtherFile")  # FROM names a file, another one is there
    write_sim_model(other_file / "other.rkllm", "other")
    dangling = route_copy(tmp_path, demo_model_dir, "Dangling")
    os.symlink(tmp_path / "nowhere.rkllm", dangling / DEMO_FILE)
    write_sim_model(tmp_path / "loose.rkllm", "loose")  # no tokenizer: broken, and a loose file never routes
    (tmp_path / "empty").mkdir()
    cat = catalog(tmp_path)
    by_id = {e.model_id: e for e in cat.entries()}
    assert set(by_id) == {"badmodelfile", "notokenizer", "otherfile", "dangling", "loose"}
    assert not any(e.routable or e.ok for e in by_id.values()), {k: e.problem for k, e in by_id.items()}
    assert "broken Modelfile" in by_id["badmodelfile"].problem
    assert "missing tokenizer" in by_id["notokenizer"].problem
    assert cat.routable() == []
    for name in by_id:
        with pytest.raises(ModelUnavailable):
            cat.resolve(name, allow_route_only=True)


def test_a_route_only_folder_that_lost_its_id_to_another_is_not_routable(tmp_path, demo_model_dir):
    served = tmp_path / DEMO_FOLDER
    shutil.copytree(demo_model_dir, served)
    os.utime(served / DEMO_FILE, ns=(1, 1))  # the older: it keeps the id
    route_copy(tmp_path, demo_model_dir, "QWEN2.5-1.5B-Instruct Demo")  # the same id once slugified
    cat = catalog(tmp_path)
    loser = next(e for e in cat.entries() if e.name == "QWEN2.5-1.5B-Instruct Demo")
    assert "collides with" in loser.problem and not loser.routable
    assert cat.routable() == [] and [e.name for e in cat.servable()] == [DEMO_FOLDER]


def test_the_shared_tokenizer_folder_is_not_a_model(tmp_path, demo_model_dir):
    shared = route_copy(tmp_path, demo_model_dir, "shared-tokenizer", modelfile=False)
    write_sim_model(tmp_path / "loose-4k.rkllm", "loose")
    cat = catalog(tmp_path, tokenizer_dir=shared)
    assert [e.model_id for e in cat.entries()] == ["loose-4k"] and cat.servable()[0].tokenizer_source == str(shared)


def test_the_model_file_copied_in_makes_it_servable(tmp_path, demo_model_dir):
    folder = route_copy(tmp_path, demo_model_dir)
    cat = catalog(tmp_path)
    assert cat.resolve(DEMO_ID, allow_route_only=True).routable
    shutil.copy(demo_model_dir / DEMO_FILE, folder / DEMO_FILE)
    entry = cat.resolve(DEMO_ID)
    assert entry.ok and not entry.routable and cat.routable() == []


def test_a_route_only_tokenizer_that_will_not_load_is_no_longer_routable(tmp_path, demo_model_dir):
    folder = route_copy(tmp_path, demo_model_dir)
    (folder / "tokenizer.json").write_text("{not json")
    engine, _ = make_engine(tmp_path)
    with pytest.raises(ModelUnavailable, match="cannot load the tokenizer"):
        engine.model_for(DEMO_ID)
    entry = engine.catalog.find(DEMO_ID)
    assert not entry.routable and "no such file" in entry.problem and "cannot load the tokenizer" in entry.problem
    assert engine.activity().routes == ()
    with pytest.raises(ModelUnavailable, match="cannot load the tokenizer"):
        engine.model_for(DEMO_ID)


# -- the engine ----------------------------------------------------------------------------------------
async def test_model_for_gives_the_tokenizer_of_a_route_only_model_and_activity_lists_it(tmp_path, demo_model_dir,
                                                                                        demo_tokenizer):
    route_copy(tmp_path / "a", demo_model_dir)
    engine, _ = make_engine(tmp_path / "a")
    assert engine.activity().routes == (DEMO_ID,) and engine.activity().serves == ()
    model = engine.model_for(DEMO_ID)
    assert model.entry.routable and model.npu_spec is None
    assert model.tokenizer.encode("héllo 世界") == demo_tokenizer.encode("héllo 世界")
    assert model.stop_ids and model.tokenizer.eos_token_id in model.stop_ids
    with pytest.raises(ModelUnavailable, match="no such file.*this node only routes it"):
        model.spec
    await engine.capabilities()  # the scheduler exists now: activity's other branch
    activity = engine.activity()
    assert activity.routes == (DEMO_ID,) and activity.serves == () and activity.backend == "sim"
    await engine.shutdown()


async def test_a_route_only_model_never_runs_on_this_npu(tmp_path, demo_model_dir):
    route_copy(tmp_path, demo_model_dir)
    engine, runtime = make_engine(tmp_path)
    ring = ExoRing([engine])
    with pytest.raises(ModelUnavailable, match="no such file.*this node only routes it"):
        await ring.chat(DEMO_ID, user("hello"), DEMO_LAYERS)
    shard = Shard(DEMO_ID, 0, DEMO_LAYERS - 1, DEMO_LAYERS)
    with pytest.raises(ModelUnavailable, match="this node only routes it"):  # exo's next step, had it gone on
        await engine.infer_tensor("another", shard, np.array([[1]]))
    await ring.drain()
    assert runtime.inputs == [] and runtime.loaded is None  # no load, no generation
    assert engine._scheduler is not None and not engine._scheduler.streams
    await engine.shutdown()


# -- the API of a routing node ---------------------------------------------------------------------------
@pytest.fixture
async def ring_api(tmp_path, demo_model_dir, demo_models_dir):
    """Node 0 (its API takes the requests) only routes the demo model; node 1 has its file."""
    route_copy(tmp_path / "router", demo_model_dir)
    api = await start_api(demo_models_dir, models_dirs=[tmp_path / "router", demo_models_dir])
    yield api
    await stop_api(api)


async def test_the_routing_node_lists_the_model_another_node_runs(ring_api):
    status, body, _ = await ring_api.get("/v1/models")
    assert status == 200
    cards = {c["id"]: c for c in body["data"]}
    assert set(cards) == {DEMO_ID} and cards[DEMO_ID]["runs_on"] == "ring"
    assert cards[DEMO_ID]["context_length"] == 4096 and cards[DEMO_ID]["ready"] is True
    status, card, _ = await ring_api.get(f"/v1/models/{DEMO_ID}")
    assert status == 200 and card["runs_on"] == "ring"


async def test_a_chat_for_a_routed_model_is_tokenized_here_and_runs_on_the_node_with_the_file(ring_api,
                                                                                           demo_tokenizer):
    text = "Grüße aus dem Ring 🤖"
    status, items, _ = await ring_api.stream("/v1/chat/completions", ring_api.chat(user(sim_text(text)), stream=True))
    assert status == 200 and content_of(items) == text and items[-1] == "[DONE]"
    submission = ring_api.port.submitted[-1]
    assert ring_api.ring.ran_on[submission.request_id] == 1
    ids = submission.context.prompt_ids  # templated and tokenized on the routing node, run as they are
    assert demo_tokenizer.decode(list(ids)) == f"<|im_start|>user\n{sim_text(text)}<|im_end|>\n<|im_start|>assistant\n"
    assert ring_api.ring.engines[1]._scheduler.runtime.inputs[-1].token_ids == ids
    status, body, headers = await ring_api.post("/v1/chat/completions", ring_api.chat(user(sim_text("whole"))))
    assert status == 200 and body["choices"][0]["message"]["content"] == "whole" and headers["X-RKLLM-Node"] == "node1"
    assert ring_api.runtime.inputs == [] and ring_api.runtime.loaded is None  # node 0's NPU never ran it


async def test_completions_and_token_encode_of_a_routed_model(ring_api, demo_tokenizer):
    status, body, _ = await ring_api.post("/v1/completions", {"model": DEMO_ID, "prompt": sim_text("raw text")})
    assert status == 200 and body["choices"][0]["text"] == "raw text"
    assert ring_api.ring.ran_on[ring_api.port.submitted[-1].request_id] == 1
    status, body, _ = await ring_api.post("/v1/chat/token/encode", ring_api.chat(user("count me")))
    assert status == 200 and body["num_tokens"] == len(body["encoded_tokens"])
    assert demo_tokenizer.decode(body["encoded_tokens"]) == body["encoded_prompt"] == \
        "<|im_start|>user\ncount me<|im_end|>\n<|im_start|>assistant\n"


async def test_an_openai_default_name_on_a_routing_board_goes_to_the_routed_model(ring_api):
    status, body, _ = await ring_api.post("/v1/chat/completions", {"model": "gpt-4o",
                                                                    "messages": user(sim_text("default"))})
    assert status == 200 and body["choices"][0]["message"]["content"] == "default"
    assert ring_api.port.submitted[-1].model_id == DEMO_ID


async def test_embeddings_of_a_routed_model_are_a_clear_error(ring_api):
    status, body, _ = await ring_api.post("/v1/embeddings", {"model": DEMO_ID, "input": "hello"})
    assert status == 409 and body["error"]["code"] == "model_not_on_this_node"
    assert "embeddings run on the NPU of the node that takes the request" in body["error"]["message"]
    assert ring_api.runtime.inputs == [] and ring_api.runtime.loaded is None


async def test_a_routed_model_no_live_node_has_is_a_clear_503(ring_api):
    ring_api.ring.kill(1)
    status, body, _ = await ring_api.get("/v1/models")
    assert status == 200 and body["data"] == []
    for path, request in (("/v1/chat/completions", ring_api.chat(user("hi"))),
                          ("/v1/chat/completions", ring_api.chat(user("hi"), stream=True)),
                          ("/v1/completions", {"model": DEMO_ID, "prompt": "hi"}),
                          ("/v1/chat/token/encode", ring_api.chat(user("hi"))),
                          ("/v1/embeddings", {"model": DEMO_ID, "input": "hi"})):
        status, body, _ = await ring_api.post(path, request)
        assert status == 503, (path, body)
        error = body["error"]
        assert error["code"] == "model_not_on_this_node" and error["param"] == "model"
        assert "is on no live node of the ring" in error["message"] and "only has its tokenizer" in error["message"]
        assert str(ring_api.engine.config.models_dir) not in error["message"]
    status, body, _ = await ring_api.get(f"/v1/models/{DEMO_ID}")
    assert status == 503 and body["error"]["code"] == "model_not_on_this_node"
    assert ring_api.port.submitted == [] and ring_api.runtime.inputs == []


async def test_a_routing_node_alone_says_no_node_has_the_file(tmp_path, demo_model_dir):
    route_copy(tmp_path, demo_model_dir)
    api = await start_api(tmp_path)
    try:
        status, body, _ = await api.post("/v1/chat/completions", api.chat(user("hi")))
        assert status == 503 and body["error"]["code"] == "model_not_on_this_node"
        status, body, _ = await api.get("/v1/models")
        assert status == 200 and body["data"] == []
    finally:
        await stop_api(api)


# -- the command line ------------------------------------------------------------------------------------
def test_doctor_and_models_report_a_route_only_folder_as_routing_not_broken(tmp_path, demo_model_dir, capsys):
    route_copy(tmp_path, demo_model_dir)
    (tmp_path / "Broken").mkdir()
    write_sim_model(tmp_path / "Broken" / "x.rkllm", "x")  # no tokenizer: still broken
    cli.main(["--models-dir", str(tmp_path), "--backend", "sim", "doctor"])
    out = capsys.readouterr().out
    assert f"[ok] model {DEMO_ID}: {cli.ROUTES_ONLY}" in out
    assert cli.ROUTES_ONLY.startswith(ROUTES_ONLY) and "this node needs only the tokenizer files and Modelfile" in out
    assert "[!!] model broken: missing tokenizer" in out
    assert "no servable model" not in out and "it routes requests to the boards of the ring" in out
    assert cli.main(["--models-dir", str(tmp_path), "models"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith(DEMO_ID))
    assert line.endswith(cli.ROUTES_ONLY) and "BROKEN" not in line
    assert "BROKEN: missing tokenizer" in out
