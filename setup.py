"""Packaging lives in setup.cfg; this file only ships exo_rkllm.pth.

The .pth file is what lets an unmodified `python -m exo.main` find the `rkllm`
engine: Python executes its one import line at start-up, which installs a
lazy import hook (see exo_rkllm/exo_glue/autoload.py). setuptools has no declarative
way to place a file at the root of site-packages, so the regular build copies
it next to the package, and an editable build (pip install -e, PEP 660) gets
it added to its wheel. The name sorts after setuptools' `__editable__*.pth`,
so in an editable install the package is importable when our line runs.
"""
import base64
import hashlib
import os
import shutil
import zipfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HERE = Path(__file__).resolve().parent
PTH = "exo_rkllm.pth"


class build_py_with_pth(build_py):
    def run(self) -> None:
        super().run()
        os.makedirs(self.build_lib, exist_ok=True)
        shutil.copy(HERE / PTH, Path(self.build_lib) / PTH)

    def get_outputs(self, include_bytecode: bool = True):
        return super().get_outputs(include_bytecode) + [str(Path(self.build_lib) / PTH)]


class editable_wheel_with_pth(editable_wheel):
    def run(self) -> None:
        super().run()
        wheels = sorted(Path(self.dist_dir).glob("*.whl"), key=lambda p: p.stat().st_mtime)
        if not wheels:
            raise RuntimeError(f"no editable wheel was built in {self.dist_dir}")
        _add_to_wheel(wheels[-1], PTH, (HERE / PTH).read_bytes())


def _add_to_wheel(wheel: Path, name: str, data: bytes) -> None:
    """Rewrite `wheel` with one more top-level file, listed in RECORD so uninstall removes it."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            payload = src.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                payload += f"{name},sha256={digest},{len(data)}\n".encode()
            dst.writestr(item, payload)
        dst.writestr(name, data)
    os.replace(tmp, wheel)


setup(cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})
