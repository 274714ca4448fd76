"""Packaging lives in setup.cfg; this file only ships exo_rkllm.pth.

The .pth file is what lets an unmodified `python -m exo.main` find the `rkllm`
engine: Python executes its one import line at start-up, which installs a
lazy import hook (see exo_rkllm/_autoload.py). setuptools has no declarative
way to place a file at the root of site-packages, so the build copies it there.
"""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "exo_rkllm.pth"


class build_py_with_pth(build_py):
    def run(self) -> None:
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        os.makedirs(self.build_lib, exist_ok=True)
        shutil.copy(os.path.join(here, PTH), os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode: bool = True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]

    def get_output_mapping(self):
        mapping = dict(super().get_output_mapping())
        here = os.path.dirname(os.path.abspath(__file__))
        mapping[os.path.join(self.build_lib, PTH)] = os.path.join(here, PTH)
        return mapping


setup(cmdclass={"build_py": build_py_with_pth})
