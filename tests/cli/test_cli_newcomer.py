"""What a newcomer met (issue 14, item 8): help that names images that exist, an absolute socket path in
`info`, and no `ssl:default` when a daemon is down."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from microvmd.config import load
from microvmd.daemon import parse_args

REPO = Path(__file__).resolve().parents[2]


def test_help_names_only_images_that_exist() -> None:
    out = subprocess.run([sys.executable, "-m", "microvmd.cli.main", "--help"], capture_output=True, text=True,
                         cwd=REPO).stdout
    for word in ("server",):
        assert f" {word}\n" not in out, out
    for line in out.splitlines():
        if line.strip().startswith("microvm run"):
            image = line.split()[-1]
            assert image.endswith(".wasm") or (REPO / "images" / image).is_dir(), line


def test_a_relative_socket_is_made_absolute(tmp_path: Path) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        cfg = load(parse_args(["--socket", "rel.sock", "--state-dir", str(tmp_path / "st")]))
    finally:
        os.chdir(cwd)
    assert cfg.socket == tmp_path / "rel.sock"


def test_a_daemon_that_is_down_is_named_with_how_to_start_it(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "microvmd.cli.main", "--socket", str(tmp_path / "none.sock"), "ps"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 125
    assert str(tmp_path / "none.sock") in r.stderr and "microvmd" in r.stderr and "ssl:default" not in r.stderr
