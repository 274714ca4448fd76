"""Settings come from one table; bad values are refused with the variable's name."""
from __future__ import annotations

from pathlib import Path

import pytest

from exo_rkllm.config import SETTINGS, Config
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
