"""Packaging hook: ship ``csrc/`` inside the wheel as ``tcod_fast/_csrc`` so an installed copy
can build the native kernel on first use (editable installs read ``csrc/`` directly)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithKernelSources(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "tcod_fast" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for pattern in ("*.cpp", "*.h", "*.cu", "*.cuh"):
            for source in Path(__file__).parent.joinpath("csrc").glob(pattern):
                shutil.copy2(source, target / source.name)


setup(cmdclass={"build_py": BuildPyWithKernelSources})
