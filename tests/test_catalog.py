"""The models folder as exo sees it: layouts, Modelfiles, aliases, context, broken entries."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exo_rkllm.models.catalog import (FAKE_MODEL_MAGIC, MIN_MODEL_BYTES, Catalog, ModelfileError, context_from_name,
                               parse_modelfile, slugify)
from exo_rkllm.config import Config
from exo_rkllm.errors import ModelLoadError, ModelNotFound, ModelUnavailable
from exo_rkllm.runtime.sim import SIM_MAGIC, SimRuntime, SimTiming, write_sim_model
from fake_rkllm.fixtures import *  # noqa: F401,F403  (fake_lib)
from real_exo import requires_exo


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


# -- Modelfile values that cannot work ------------------------------------------------------------
def demo_copy(root: Path, demo_model_dir: Path, name: str, extra: str = "") -> Path:
    """A copy of the demo model folder (sim model file, tokenizer, Modelfile) under another name."""
    folder = root / name
    shutil.copytree(demo_model_dir, folder)
    if extra:
        (folder / "Modelfile").write_text((folder / "Modelfile").read_text() + "\n" + extra + "\n")
    return folder


def model_file(folder: Path) -> Path:
    return next(folder.glob("*.rkllm"))


@pytest.mark.parametrize("line,reason", [
    ('NUM_CTX="-5"', "NUM_CTX='-5' must be at least 1"), ("NUM_CTX=0", "NUM_CTX='0' must be at least 1"),
    ("NUM_CTX=lots", "NUM_CTX='lots' is not a whole number"), ("MAX_CONTEXT_LEN=-1", "MAX_CONTEXT_LEN='-1' must be"),
    ("MAX_NEW_TOKENS=-7", "MAX_NEW_TOKENS='-7' must be at least -2"), ("NUM_PREDICT=1.5", "not a whole number"),
    ("TEMPERATURE=hot", "TEMPERATURE='hot' is not a number"), ("TEMPERATURE=nan", "not a finite number"),
    ("TEMPERATURE=-0.5", "TEMPERATURE='-0.5' must be at least 0"), ("TOP_P=1.5", "TOP_P='1.5' must be between 0 and 1"),
    ("TOP_K=-1", "TOP_K='-1' must be at least 0"), ("REPEAT_PENALTY=0", "REPEAT_PENALTY='0' must be above 0"),
    ("FREQUENCY_PENALTY=inf", "not a finite number"), ("N_LAYERS=0", "N_LAYERS='0' must be at least 1"),
    ("MIROSTAT=3", "MIROSTAT='3' must be between 0 and 2"), ("ENABLE_THINKING=maybe", "is not a boolean"),
])
def test_modelfile_values_that_cannot_work_make_the_entry_broken(tmp_path, demo_model_dir, line, reason):
    root = tmp_path / "models"
    demo_copy(root, demo_model_dir, "Bad", line)
    cat = catalog(root)
    (entry,) = cat.entries()
    assert not entry.ok and reason in entry.problem and "broken Modelfile" in entry.problem
    assert cat.servable() == []
    with pytest.raises(ModelUnavailable, match=re.escape(reason)) as err:
        cat.resolve("bad")
    assert err.value.http_status == 409 and err.value.code == "model_unavailable"


def test_every_bad_modelfile_value_is_named_at_once():
    with pytest.raises(ModelfileError) as err:
        parse_modelfile('NUM_CTX="-5"\nTEMPERATURE=hot\nTOP_P=2\n')
    assert all(key in str(err.value) for key in ("NUM_CTX", "TEMPERATURE", "TOP_P"))


def test_modelfile_values_rkllama_writes_are_accepted(tmp_path, demo_model_dir):
    """rkllama reads NUM_CTX with int(float()) and writes Python booleans; Ollama's -1 means no limit."""
    root = tmp_path / "models"
    demo_copy(root, demo_model_dir, "Fine", 'NUM_CTX="2048.0"\nMAX_NEW_TOKENS=-1\nTOP_K=20.0\nENABLE_THINKING=False\n'
                                            "TEMPERATURE=0\nFREQUENCY_PENALTY=-0.5\nN_KEEP=-1")
    entry = catalog(root).resolve("fine")
    spec = entry.spec(Config(models_dir=root))
    assert entry.context_len == 2048 and spec.max_new_tokens == 2048 and spec.sampling.top_k == 20
    assert spec.options["NUM_CTX"] == "2048" and spec.options["TOP_K"] == "20"


# -- model files that cannot be loaded, found at scan time --------------------------------------------
def _replace_model_file(folder: Path, make) -> Path:
    path = model_file(folder)
    path.unlink()
    make(path)
    return path


@pytest.mark.parametrize("make,reason", [
    (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    (lambda p: p.mkdir(), "is a directory, not a model file"),
    (lambda p: os.symlink("/dev/zero", p), "(a link to /dev/zero) is a character device, not a model file"),
    (lambda p: os.symlink(p.parent / "gone.rkllm", p), "does not exist"),
    (lambda p: p.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 123\n"),
     "is a Git LFS pointer"),
    (lambda p: p.write_bytes(b"\x00\x01 some 40 bytes of something"), "far too small for a converted .rkllm"),
    (lambda p: p.write_bytes(b"<!DOCTYPE html><html>Not found</html>"), "looks like a web page"),
    (lambda p: p.write_bytes(SIM_MAGIC + b"{not json"), "corrupt header"),
])
def test_model_files_that_cannot_load_are_broken_at_scan_time(tmp_path, demo_model_dir, make, reason):
    root = tmp_path / "models"
    _replace_model_file(demo_copy(root, demo_model_dir, "M"), make)
    cat = catalog(root)
    assert reason in cat.find("m").problem
    with pytest.raises(ModelUnavailable, match=re.escape(reason)):
        cat.resolve("m")


def test_plausible_model_files_are_not_judged_by_a_guessed_header(tmp_path, demo_model_dir):
    """The header of real .rkllm files is not documented: a file of model size is left to the runtime,
    and the fake runtime's own small model files are recognised by the header it checks."""
    root = tmp_path / "models"
    with open(_replace_model_file(demo_copy(root, demo_model_dir, "Real"), lambda p: p.touch()), "r+b") as fh:
        fh.truncate(MIN_MODEL_BYTES)  # sparse: no disk used
    _replace_model_file(demo_copy(root, demo_model_dir, "Fake"),
                        lambda p: p.write_bytes(FAKE_MODEL_MAGIC + b"\ntoolkit_version=1.2.3\n"))
    cat = catalog(root)
    assert cat.resolve("real").ok and cat.resolve("fake").ok


def test_unreadable_model_file_is_broken(tmp_path, demo_model_dir, monkeypatch):
    import exo_rkllm.models.catalog as catalog_module

    root = tmp_path / "models"
    demo_copy(root, demo_model_dir, "Locked")

    def refuse(path, *args, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(catalog_module, "open", refuse, raising=False)  # root may read anything
    assert "cannot be read: Permission denied" in catalog(root).find("locked").problem


def test_from_and_loose_files_are_checked_the_same_way(tmp_path, demo_model_dir):
    root = tmp_path / "models"
    folder = demo_copy(root, demo_model_dir, "Pointed", 'FROM="zero.rkllm"')
    os.symlink("/dev/zero", folder / "zero.rkllm")
    os.symlink("/dev/zero", root / "loose-zero.rkllm")  # used to be skipped without a word
    cat = catalog(root, tokenizer_dir=demo_model_dir)
    assert "zero.rkllm (a link to /dev/zero) is a character device" in cat.find("pointed").problem
    assert "is a character device" in cat.find("loose-zero").problem


# -- what the runtime refuses at load -----------------------------------------------------------------
class RefusingRuntime:
    """The simulator, except that loading fails as a runtime refusing the file does."""

    def __init__(self, backend: str = "sim") -> None:
        import dataclasses

        self.inner = SimRuntime(SimTiming.instant())
        self.capabilities = dataclasses.replace(self.inner.capabilities, backend=backend)
        self.loads = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def load(self, spec, progress=None):
        self.loads += 1
        raise ModelLoadError(f"invalid model magic: {spec.path.name} is not an rkllm model for this runtime")


def _engine(root: Path, runtime) -> "RKLLMInferenceEngine":
    from exo_rkllm.engine.inference_engine import RKLLMInferenceEngine

    return RKLLMInferenceEngine(config=Config(backend="sim", models_dir=root), runtime=runtime)


async def test_a_model_the_runtime_refuses_is_409_and_listed_broken_until_its_file_changes(tmp_path, demo_model_dir):
    from exo_driver import ExoRing

    root = tmp_path / "models"
    folder = demo_copy(root, demo_model_dir, "Refused")
    runtime = RefusingRuntime()
    engine = _engine(root, runtime)
    ring = ExoRing([engine])
    with pytest.raises(ModelLoadError, match="invalid model magic") as err:
        await ring.chat("refused", [{"role": "user", "content": "hi"}], 28)
    assert err.value.http_status == 409 and err.value.code == "model_unavailable"
    entry = engine.catalog.find("refused")
    assert "the runtime refused to load it: invalid model magic" in entry.problem
    assert engine.catalog.servable() == []
    assert "refused" in [e.model_id for e in engine.catalog.refresh() if not e.ok]  # a rescan keeps it
    with pytest.raises(ModelUnavailable, match="invalid model magic"):
        engine.model_for("refused")  # what exo-rkllm's API checks before each request
    loads = runtime.loads
    path = model_file(folder)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a new file
    assert engine.catalog.resolve("refused").ok and engine.model_for("refused").entry.ok
    with pytest.raises(ModelLoadError):
        await ring.chat("refused", [{"role": "user", "content": "again"}], 28)
    assert runtime.loads > loads  # asked again once the file changed
    await engine.shutdown()


async def test_an_rkllama_server_refusing_a_model_is_asked_again_next_time(tmp_path, demo_model_dir):
    from exo_driver import ExoRing

    root = tmp_path / "models"
    demo_copy(root, demo_model_dir, "Remote")
    engine = _engine(root, RefusingRuntime(backend="rkllama"))
    with pytest.raises(ModelLoadError):
        await ExoRing([engine]).chat("remote", [{"role": "user", "content": "hi"}], 28)
    assert engine.catalog.resolve("remote").ok  # the server's state may change, the file did not
    await engine.shutdown()


def test_a_tokenizer_that_will_not_load_makes_the_entry_broken_until_it_changes(tmp_path, demo_model_dir):
    from exo_rkllm.engine.inference_engine import RKLLMInferenceEngine

    root = tmp_path / "models"
    folder = demo_copy(root, demo_model_dir, "BadTok")
    good = (folder / "tokenizer.json").read_bytes()
    (folder / "tokenizer.json").write_text("{not json")
    engine = RKLLMInferenceEngine(config=Config(backend="sim", models_dir=root), runtime=SimRuntime())
    with pytest.raises(ModelUnavailable, match="cannot load the tokenizer"):
        engine.model_for("badtok")
    assert "cannot load the tokenizer" in engine.catalog.find("badtok").problem
    assert engine.catalog.servable() == []
    (folder / "tokenizer.json").write_bytes(good)  # fixed in place: the folder itself does not change
    os.utime(folder / "tokenizer.json", ns=(1, (folder / "tokenizer.json").stat().st_mtime_ns + 10**9))
    assert engine.model_for("badtok").entry.ok


# -- ids that collide ---------------------------------------------------------------------------------
def _age(folder: Path, seconds_ago: int) -> None:
    t = time.time_ns() - seconds_ago * 10**9
    os.utime(model_file(folder), ns=(t, t))


def test_colliding_ids_keep_the_older_model_and_list_the_other_with_the_reason(tmp_path, demo_model_dir):
    root = tmp_path / "models"
    older = demo_copy(root, demo_model_dir, "Qwen2.5-1.5B-Instruct-Demo")
    newer = demo_copy(root, demo_model_dir, "Qwen2.5-1.5B-INSTRUCT-DEMO")  # first in name order
    _age(older, 100)
    _age(newer, 10)
    cat = catalog(root)
    winner = cat.resolve("qwen2.5-1.5b-instruct-demo")
    assert winner.folder == older
    (loser,) = [e for e in cat.entries() if not e.ok]
    assert loser.folder == newer and loser.model_id == winner.model_id
    assert f"collides with {older}" in loser.problem and "rename Qwen2.5-1.5B-INSTRUCT-DEMO" in loser.problem
    with pytest.raises(ModelUnavailable, match="collides with"):
        cat.resolve("Qwen2.5-1.5B-INSTRUCT-DEMO")  # its own exact name is not silently the other model
    assert cat.resolve("Qwen2.5-1.5B-Instruct-Demo").folder == older
    assert len(cat.servable()) == 1


def test_the_id_stays_with_the_folder_this_process_already_serves(tmp_path, demo_model_dir):
    root = tmp_path / "models"
    first = demo_copy(root, demo_model_dir, "Qwen2.5-1.5B-Instruct-Demo")
    _age(first, 10)
    cat = catalog(root)
    assert cat.resolve("qwen2.5-1.5b-instruct-demo").folder == first
    late = demo_copy(root, demo_model_dir, "Qwen2.5-1.5B-INSTRUCT-DEMO")  # older file, first by name
    _age(late, 1000)
    cat.refresh()
    assert cat.resolve("qwen2.5-1.5b-instruct-demo").folder == first
    assert catalog(root).resolve("qwen2.5-1.5b-instruct-demo").folder == late  # a new process: the older one
    shutil.rmtree(first)
    cat.refresh()
    assert cat.resolve("qwen2.5-1.5b-instruct-demo").folder == late


def test_colliding_ids_with_equal_ages_go_by_name_order(tmp_path, demo_model_dir):
    root = tmp_path / "models"
    a, b = demo_copy(root, demo_model_dir, "Model-X"), demo_copy(root, demo_model_dir, "model_x")
    t = time.time_ns()
    for folder in (a, b):
        os.utime(model_file(folder), ns=(t, t))
    assert catalog(root).resolve("model-x").folder == a  # "M" sorts before "m"


def test_every_listed_alias_resolves_to_its_entry(tmp_path, demo_model_dir):
    root = tmp_path / "models"
    for name in ("Alpha", "Beta", "Qwen2.5-1.5B-Instruct-Demo", "Qwen2.5-1.5B-INSTRUCT-DEMO"):
        demo_copy(root, demo_model_dir, name)  # all hold the same .rkllm file name
    write_sim_model(root / "Gamma.rkllm", "gamma")
    cat = catalog(root, tokenizer_dir=demo_model_dir)
    entries = cat.entries()
    stem = model_file(demo_model_dir).stem
    assert all(stem not in e.aliases for e in entries), "a file name two folders share names neither"
    for e in entries:
        for alias in e.aliases:
            assert cat.find(alias) is e, alias
    assert cat.resolve("Alpha").model_id == "alpha" and cat.resolve("Gamma").model_id == "gamma"


def test_aliases_are_listed_in_the_same_order_in_every_run(tmp_path, demo_model_dir):
    """`exo-rkllm models` and /v1/models list an entry's aliases sorted: the same in every process,
    whatever order a set of names happens to take (string hashes change between runs)."""
    root = tmp_path / "models"
    folder = root / "Zeta_Model.v2"
    tokenizer_files(demo_model_dir, folder)
    names = ("b-one", "A-two", "c_three", "Delta.Four", "e five")
    for name in names:
        write_sim_model(folder / f"{name}.rkllm", name)
    (folder / "Modelfile").write_text('FROM="A-two.rkllm"\n')
    expected = sorted({folder.name, *names})
    (entry,) = catalog(root).entries()
    assert list(entry.aliases) == expected
    listed = set()
    for seed in ("0", "1", "2", "3", "4", "5"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-m", "exo_rkllm", "--models-dir", str(root), "models"],
                             capture_output=True, text=True, env=env, timeout=120)
        line = next(ln for ln in out.stdout.splitlines() if "aliases:" in ln)
        listed.add(line.split("aliases:", 1)[1].strip())
    assert listed == {", ".join(expected)}


def test_the_engine_never_serves_a_stale_cache_entry(tmp_path, demo_model_dir):
    from exo_rkllm.engine.inference_engine import RKLLMInferenceEngine

    root = tmp_path / "models"
    first = demo_copy(root, demo_model_dir, "Qwen2.5-1.5B-Instruct-Demo")
    engine = RKLLMInferenceEngine(config=Config(backend="sim", models_dir=root), runtime=SimRuntime())
    model_id = "qwen2.5-1.5b-instruct-demo"
    assert engine.model_for(model_id).entry.folder == first
    assert engine.model_for(model_id).spec.max_context_len == 4096
    (first / "Modelfile").write_text((first / "Modelfile").read_text() + '\nNUM_CTX="2048"\n')
    assert engine.model_for(model_id).spec.max_context_len == 2048  # the Modelfile changed
    second = demo_copy(root, demo_model_dir, "Qwen2.5-1.5B-INSTRUCT-DEMO")
    shutil.rmtree(first)  # the id now belongs to the other folder
    assert engine.model_for(model_id).entry.folder == second
    (second / "Modelfile").write_text('NUM_CTX="-5"\n')
    with pytest.raises(ModelUnavailable, match="NUM_CTX"):
        engine.model_for(model_id)


async def test_ensure_shard_picks_up_a_changed_entry_for_a_new_shard(tmp_path, demo_model_dir):
    from exo_driver import Shard

    root = tmp_path / "models"
    folder = demo_copy(root, demo_model_dir, "Changing")
    engine = _engine(root, SimRuntime(SimTiming.instant()))
    await engine.ensure_shard(Shard("changing", 0, 27, 28))
    (folder / "Modelfile").write_text((folder / "Modelfile").read_text() + '\nNUM_CTX="1024"\n')
    await engine.ensure_shard(Shard("changing", 0, 13, 28))
    assert engine._models["changing"].spec.max_context_len == 1024
    await engine.shutdown()


# -- rkllama 0.0.74's tokenizer folder -----------------------------------------------------------------
def test_tokenizer_in_the_tokenizer_subfolder_is_found_after_the_folder_itself(tmp_path, demo_model_dir):
    root = tmp_path / "models"
    sub = demo_copy(root, demo_model_dir, "Sub")
    (sub / "tokenizer").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.move(str(sub / name), sub / "tokenizer" / name)
    both = demo_copy(root, demo_model_dir, "Both")
    tokenizer_files(demo_model_dir, both / "tokenizer")
    explicit = demo_copy(root, demo_model_dir, "Explicit", f'TOKENIZER="{demo_model_dir}"')
    tokenizer_files(demo_model_dir, explicit / "tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (explicit / name).unlink()
    cat = catalog(root)
    assert cat.resolve("sub").tokenizer_dir == sub / "tokenizer"
    assert cat.resolve("both").tokenizer_dir == both
    assert cat.resolve("explicit").tokenizer_dir == explicit / "tokenizer"  # the subfolder before TOKENIZER
    from exo_rkllm.engine.inference_engine import RKLLMInferenceEngine

    engine = RKLLMInferenceEngine(config=Config(backend="sim", models_dir=root), runtime=SimRuntime())
    assert engine.model_for("sub").tokenizer.eos_token_id is not None
    assert cat.resolve("sub").n_layers == 28  # config.json still read from the model folder


# -- through a real legacy exo, on the fake runtime library ---------------------------------------------
@pytest.mark.real_exo
@requires_exo
async def test_through_real_exo_what_cannot_work_is_a_409_with_the_reason_and_not_listed(
        fake_lib, tmp_path, demo_model_dir, demo_tokenizer):
    from fake_rkllm import write_fake_model_folder
    from real_exo import EXO_PYTHON as python, start_exo

    aiohttp = pytest.importorskip("aiohttp")
    models = tmp_path / "models"
    answers = ("fine",)
    write_fake_model_folder(models, "Good-Model", demo_model_dir, demo_tokenizer, answers, decode_ms=1)
    write_fake_model_folder(models, "Old-Toolkit", demo_model_dir, demo_tokenizer, answers, toolkit_version="1.1.4")
    write_fake_model_folder(models, "Bad-Ctx", demo_model_dir, demo_tokenizer, answers, modelfile={"NUM_CTX": "-5"})
    empty = write_fake_model_folder(models, "Empty-File", demo_model_dir, demo_tokenizer, answers)
    model_file(empty).write_bytes(b"")
    write_fake_model_folder(models, "GOOD-MODEL", demo_model_dir, demo_tokenizer, answers)  # same id as Good-Model
    t = time.time_ns()
    os.utime(model_file(models / "Good-Model"), ns=(t - 10**11, t - 10**11))  # the older one keeps the id
    exo = start_exo(python, tmp_path, models, {"RKLLM_BACKEND": "native", "RKLLM_LIB_PATH": str(fake_lib("1.2.3"))})

    async def post(session, model: str, stream: bool = False) -> tuple[int, dict]:
        async with session.post(f"{exo.api}/v1/chat/completions", json={
                "model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}) as resp:
            return resp.status, (await resp.json() if resp.status != 200 or not stream else {})

    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{exo.api}/v1/models") as resp:
                listed = (await resp.json())["data"]
            assert [m["id"] for m in listed] == ["good-model", "old-toolkit"]
            (good,) = [m for m in listed if m["id"] == "good-model"]
            assert good["aliases"]
            for alias in good["aliases"]:  # every alias listed leads to the model
                assert (await post(s, alias))[0] == 200, alias
            status, body = await post(s, "old-toolkit")
            assert status == 409 and body["error"]["code"] == "model_unavailable", body
            assert "invalid model magic" in body["error"]["message"] and "1.1.4" in body["error"]["message"]
            status, body = await post(s, "old-toolkit", stream=True)  # refused before exo's handler now
            assert status == 409 and "tried again once its files change" in body["error"]["message"]
            async with s.get(f"{exo.api}/v1/models") as resp:
                assert [m["id"] for m in (await resp.json())["data"]] == ["good-model"]
            for name, reason in (("bad-ctx", "NUM_CTX='-5' must be at least 1"), ("empty-file", "is empty"),
                                 ("GOOD-MODEL", "collides with")):
                status, body = await post(s, name)
                assert status == 409 and reason in body["error"]["message"], (name, body)
                assert body["error"]["code"] == "model_unavailable"
    finally:
        exo.stop()
