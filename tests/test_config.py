"""Settings come from one table; bad values are refused with the variable's name."""
from __future__ import annotations

import re

from pathlib import Path

import pytest

from exo_rkllm.models.catalog import ModelfileError, parse_modelfile
from exo_rkllm.config import FALSE_WORDS, SETTINGS, TRUE_WORDS, Config, parse_bool
from exo_rkllm.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_and_env():
    cfg = Config.from_env({"RKLLM_BACKEND": "SIM", "RKLLM_MAX_QUEUE": "4", "RKLLM_KV_REUSE": "off",
                           "RKLLM_MODELS_DIR": "~/m", "RKLLM_SERVER_PORT": "9000"})
    assert cfg.backend == "sim" and cfg.max_queue == 4 and cfg.kv_reuse is False
    assert cfg.models_dir == Path("~/m").expanduser()
    assert cfg.rkllama_url == "http://localhost:9000"
    assert Config.from_env({"RKLLM_SERVER_URL": "http://board:8080/"}).rkllama_url == "http://board:8080"


@pytest.mark.parametrize("env,msg", [({"RKLLM_BACKEND": "gpu"}, "RKLLM_BACKEND"),
                                     ({"RKLLM_MAX_QUEUE": "many"}, "RKLLM_MAX_QUEUE"),
                                     ({"RKLLM_MAX_QUEUE": "0"}, "at least 1"),
                                     ({"RKLLM_KV_REUSE": "maybe"}, "boolean")])
def test_bad_values_name_the_variable(env, msg):
    with pytest.raises(ConfigError, match=msg):
        Config.from_env(env)


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [s.env for s in SETTINGS if f"`{s.env}`" not in readme]
    assert not missing, f"README configuration table lacks {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line).strip()
    assert command in readme


def test_readme_defaults_match_the_code():
    readme = (ROOT / "README.md").read_text()
    defaults = Config()
    for s in SETTINGS:
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{s.env}` |"))
        shown = row.split("|")[2].strip().strip("`")
        value = getattr(defaults, s.attr)
        if isinstance(value, bool):
            expected = "1" if value else "0"
        elif value is None or value == "":
            expected = "—"
        elif isinstance(value, Path):
            expected = "~/" + str(value.relative_to(Path.home())) if value.is_relative_to(Path.home()) else str(value)
        elif isinstance(value, float) and value.is_integer():
            expected = str(int(value))
        else:
            expected = str(value)
        assert shown == expected, f"README says {s.env} defaults to {shown!r}, the code to {expected!r}"


# -- booleans: one parser for settings, Modelfiles and EXO_RKLLM_AUTOLOAD ----------------------------------------
@pytest.mark.parametrize("word", [*TRUE_WORDS, *FALSE_WORDS])
def test_every_boolean_reader_accepts_the_same_words(word):
    """A setting, a Modelfile value and EXO_RKLLM_AUTOLOAD read the same words the same way."""
    from exo_rkllm.exo_glue import autoload as _autoload

    value = word in TRUE_WORDS
    for written in (word, word.upper(), f" {word.title()} "):
        assert parse_bool(written) is value
        assert Config.from_env({"RKLLM_KV_REUSE": written}).kv_reuse is value
        assert parse_modelfile(f"ENABLE_THINKING={written}\n")["ENABLE_THINKING"] == written.strip()
        assert _autoload.enabled({"EXO_RKLLM_AUTOLOAD": written}) is value


@pytest.mark.parametrize("word", ["maybe", "2", "enabled", "nope"])
def test_every_boolean_reader_refuses_the_same_words(word, capsys):
    from exo_rkllm.exo_glue import autoload as _autoload

    with pytest.raises(ValueError, match="expected a boolean"):
        parse_bool(word)
    with pytest.raises(ConfigError, match="RKLLM_KV_REUSE"):
        Config.from_env({"RKLLM_KV_REUSE": word})
    with pytest.raises(ModelfileError, match="ENABLE_THINKING"):
        parse_modelfile(f"ENABLE_THINKING={word}\n")
    # The start-up hook never fails an interpreter: it stays on, and says the value was ignored.
    assert _autoload.enabled({"EXO_RKLLM_AUTOLOAD": word}) is True
    assert "EXO_RKLLM_AUTOLOAD is ignored" in capsys.readouterr().err


def test_a_blank_boolean_means_what_each_reader_always_took_it_to_mean():
    from exo_rkllm.exo_glue import autoload as _autoload

    with pytest.raises(ValueError):
        parse_bool("  ")
    assert parse_bool("", empty=True) is True and parse_bool(" ", empty=False) is False
    assert Config.from_env({"RKLLM_KV_REUSE": ""}).kv_reuse is False  # a blank setting is off
    assert _autoload.enabled({"EXO_RKLLM_AUTOLOAD": ""}) is True  # a blank switch leaves the hook on
    assert _autoload.enabled({}) is True


def test_lib_path_help_names_every_folder_the_native_backend_searches(monkeypatch):
    from exo_rkllm.runtime.native.library import default_search_dirs

    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    text = next(s.help for s in SETTINGS if s.env == "RKLLM_LIB_PATH")
    home = Path.home()
    for folder in default_search_dirs():
        shown = f"~/{folder.relative_to(home)}" if folder.is_relative_to(home) else str(folder)
        assert shown in text, f"RKLLM_LIB_PATH's help does not name {shown}"
    assert "LD_LIBRARY_PATH" in text


def test_the_readme_table_lists_no_setting_the_code_lacks():
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `(RKLLM_[A-Z_]+)` \|", readme, flags=re.M))
    assert listed <= {s.env for s in SETTINGS}, f"README lists settings that do not exist: {listed - {s.env for s in SETTINGS}}"
