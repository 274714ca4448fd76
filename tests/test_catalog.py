"""The models folder as exo sees it: layouts, Modelfiles, aliases, context, broken entries."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from exo_rkllm.catalog import Catalog, context_from_name, parse_modelfile, ModelfileError, slugify
from exo_rkllm.config import Config
from exo_rkllm.errors import ModelNotFound, ModelUnavailable
from exo_rkllm.runtime.sim import write_sim_model


def tokenizer_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)


@pytest.fixture
def models(tmp_path, demo_model_dir) -> Path:
    root = tmp_path / "models"
    good = root / "Qwen2.5-3B-Instruct"
    tokenizer_files(demo_model_dir, good)
    write_sim_model(good / "Qwen2.5-3B-Instruct-rk3588-w8a8-opt-16k.rkllm", "q3")
    (good / "Modelfile").write_text('# comment\nFROM="Qwen2.5-3B-Instruct-rk3588-w8a8-opt-16k.rkllm"\n'
                                    'HUGGINGFACE_PATH="Qwen/Qwen2.5-3B-Instruct"\nSYSTEM="You are helpful."\n'
                                    'TEMPERATURE=0.6\nTOP_K=20\n')
    broken = root / "BrokenModelfile"
    tokenizer_files(demo_model_dir, broken)
    write_sim_model(broken / "b.rkllm", "b")
    (broken / "Modelfile").write_text('FROM="b.rkllm"\nTEMPERATURE=hot\n')
    notok = root / "NoTokenizer"
    write_sim_model(notok / "n.rkllm", "n")
    escape = root / "Escape"
    tokenizer_files(demo_model_dir, escape)
    (escape / "Modelfile").write_text('FROM="../Qwen2.5-3B-Instruct/Qwen2.5-3B-Instruct-rk3588-w8a8-opt-16k.rkllm"\n')
    write_sim_model(root / "loose-model-4k.rkllm", "loose")
    (root / "not-a-model").mkdir()
    (root / "README.txt").write_text("hello")
    return root


def catalog(models: Path, **kw) -> Catalog:
    return Catalog(Config(models_dir=models, **kw))


def test_folder_model_with_modelfile(models):
    entry = catalog(models).resolve("qwen2.5-3b-instruct")
    assert entry.ok and entry.context_len == 16 * 1024
    assert entry.modelfile["SYSTEM"] == "You are helpful." and entry.system_prompt == "You are helpful."
    spec = entry.spec(Config(models_dir=models))
    assert spec.sampling.temperature == 0.6 and spec.sampling.top_k == 20
    assert spec.path.name.endswith("16k.rkllm") and spec.tokenizer_dir == entry.folder


def test_aliases_resolve_to_the_same_model(models):
    cat = catalog(models)
    for name in ("Qwen2.5-3B-Instruct", "qwen2.5-3b-instruct", "Qwen2.5-3B-Instruct-rk3588-w8a8-opt-16k"):
        assert cat.resolve(name).model_id == "qwen2.5-3b-instruct"


def test_broken_entries_are_listed_with_their_reason_and_do_not_stop_the_others(models):
    cat = catalog(models)
    by_id = {e.model_id: e for e in cat.entries()}
    assert "not a number" in by_id["brokenmodelfile"].problem
    assert "missing tokenizer" in by_id["notokenizer"].problem
    assert "must name a file inside" in by_id["escape"].problem
    assert by_id["qwen2.5-3b-instruct"].ok
    assert "not-a-model" not in by_id and "readme" not in by_id
    with pytest.raises(ModelUnavailable, match="broken Modelfile"):
        cat.resolve("BrokenModelfile")
    with pytest.raises(ModelUnavailable, match="missing tokenizer"):
        cat.resolve("notokenizer")


def test_loose_file_uses_the_configured_tokenizer(models, demo_model_dir):
    assert not catalog(models).find("loose-model-4k").ok
    entry = catalog(models, tokenizer_dir=demo_model_dir).resolve("loose-model-4k")
    assert entry.loose and entry.context_len == 4096 and entry.tokenizer_dir == demo_model_dir


def test_unknown_names_never_build_paths(models):
    cat = catalog(models)
    for name in ("../models/Qwen2.5-3B-Instruct", "/etc/passwd", "nope", "Qwen2.5-3B-Instruct/../NoTokenizer"):
        with pytest.raises(ModelNotFound, match="unknown model"):
            cat.resolve(name)


def test_missing_and_empty_models_folder(tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist.*exo-rkllm demo"):
        catalog(tmp_path / "absent").resolve("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="has no servable model.*exo-rkllm demo"):
        catalog(tmp_path / "empty").resolve("x")


def test_models_added_while_running_are_found(models, demo_model_dir):
    cat = catalog(models)
    cat.entries()
    late = models / "Late"
    tokenizer_files(demo_model_dir, late)
    write_sim_model(late / "late.rkllm", "late")
    assert cat.resolve("late").ok


def test_max_context_setting_wins(models):
    assert catalog(models, max_context=2048).resolve("qwen2.5-3b-instruct").context_len == 2048


def test_modelfile_parser():
    assert parse_modelfile('A="x y"\nb=3\n\n# c\n') == {"A": "x y", "B": "3"}
    with pytest.raises(ModelfileError, match="line 1"):
        parse_modelfile("FROM model.rkllm\n")
    with pytest.raises(ModelfileError, match="unterminated"):
        parse_modelfile('SYSTEM="oops\n')
    with pytest.raises(ModelfileError, match="whole number"):
        parse_modelfile("TOP_K=2.5\n")


@pytest.mark.parametrize("name,ctx", [("qwen-16k.rkllm", 16384), ("x_4k_w8a8", 4096), ("model-ctx8192", 8192),
                                      ("Qwen2.5-1.5B-Instruct-rk3588-w8a8", None), ("deepseek-1.5b", None)])
def test_context_from_name(name, ctx):
    assert context_from_name(name) == ctx


def test_slugify():
    assert slugify("Qwen2.5-3B Instruct!") == "qwen2.5-3b-instruct"
