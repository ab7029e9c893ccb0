"""The package build's one extra step: microvmd's native part (microvmd/native/direct.c, direct instances run
without the GIL), compiled by scripts/build-native. Without a C compiler the build goes on: the daemon then
runs direct instances in Python (slower) and says so at start-up."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class NativeBuildHook(BuildHookInterface):  # type: ignore[misc]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        if subprocess.run(["sh", str(root / "scripts" / "build-native")], cwd=root).returncode != 0:
            return
        if version != "editable":  # (an editable install uses the build in the source tree)
            so = "microvmd/native/_direct.so"
            build_data["force_include"][str(root / so)] = so
            build_data["pure_python"] = False
            build_data["infer_tag"] = True
