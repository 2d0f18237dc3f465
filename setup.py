"""Ships retrodb-cxx-runtime.pth (see docs/reliability.md, "One C++ runtime").

The .pth file runs at interpreter start-up and loads the system libstdc++ with RTLD_GLOBAL,
so that USearch's bundled libstdc++ binds to it whatever the user imports first. Everything
else is configured in pyproject.toml."""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "retrodb-cxx-runtime.pth"


class BuildPyWithPth(build_py):
    """build_py that also puts the .pth file at the top of the wheel (editable or not)."""

    def run(self) -> None:
        super().run()
        self.copy_file(PTH, str(self._pth_target()), preserve_mode=False)

    def _pth_target(self) -> Path:
        if getattr(self, "editable_mode", False):
            # An editable wheel is made from install_lib, not from build_lib.
            return Path(self.get_finalized_command("install").install_lib) / PTH
        return Path(self.build_lib) / PTH

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
