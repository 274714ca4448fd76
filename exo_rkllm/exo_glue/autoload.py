"""Installed by exo_rkllm.pth: wires the rkllm engine into exo when exo is imported.

Python runs the .pth line at every start-up of this environment, so this
module does nothing but register a tiny import hook; the real work
(exo_rkllm.exo_glue.plugin) runs only in a process that actually imports exo's modules.
Set EXO_RKLLM_AUTOLOAD=0 to turn it off. Failures are reported, never raised:
a broken plugin must not break unrelated Python programs.
"""
import os
import sys

# The exo modules exo_rkllm.exo_glue.plugin patches: one patcher each in plugin._PATCHERS (a test checks
# that both name the same modules). Kept here, not derived from the plugin, because this module
# must not import the plugin (it runs at every interpreter start-up).
TARGETS = (
    "exo.helpers",
    "exo.inference.inference_engine",
    "exo.inference.tokenizers",
    "exo.orchestration.node",
    "exo.api.chatgpt_api",
)


class ExoHook:
    """A meta-path finder that runs exo_rkllm.exo_glue.plugin's patch after a target module executes.

    Ask `active()` (or exo_rkllm.exo_glue.exo_env.hook_active()) whether it is registered; nothing else
    should look for it by name."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _PatchingLoader(spec.loader)
                return spec
            if spec is not None:
                return spec
        return None


class _PatchingLoader:
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            from exo_rkllm.exo_glue import plugin

            plugin.patch_module(module)
        except Exception as exc:  # never break exo's import
            sys.stderr.write(f"exo-rkllm: could not hook into {module.__name__}: {exc!r}\n")

    def __getattr__(self, name):
        return getattr(self._loader, name)


def active() -> bool:
    """Whether the hook is registered in this interpreter (what `exo-rkllm doctor` and the tests check)."""
    return any(isinstance(f, ExoHook) for f in sys.meta_path)


def enabled(environ=None) -> bool:
    """EXO_RKLLM_AUTOLOAD, read as every exo-rkllm boolean is (config.parse_bool); unset or blank
    means on. A value that is not a boolean leaves the hook on, and says so."""
    raw = (os.environ if environ is None else environ).get("EXO_RKLLM_AUTOLOAD")
    if raw is None:
        return True
    from exo_rkllm.config import parse_bool  # only when the variable is set: start-up stays import-free

    try:
        return parse_bool(raw, empty=True)
    except ValueError as exc:
        sys.stderr.write(f"exo-rkllm: EXO_RKLLM_AUTOLOAD is ignored: {exc}\n")
        return True


def install(force: bool = False) -> None:
    """Register the hook (at start-up, unless EXO_RKLLM_AUTOLOAD=0; always when `force`)."""
    if not force and not enabled():
        return
    if active():
        return
    sys.meta_path.insert(0, ExoHook())


try:
    install()
except Exception as _exc:  # pragma: no cover - defensive
    sys.stderr.write(f"exo-rkllm: autoload disabled: {_exc!r}\n")
