"""Fuzzing set-up (issue 13 item 9): a real daemon of the fuzz tests' own, and the forwarder to it.

The default run is short (``fuzzhelp.FUZZ_EXAMPLES``, a few seconds per test); ``pytest -m slow tests/fuzz``
with ``MICROVMD_FUZZ_SLOW_EXAMPLES=N`` runs long.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fuzzhelp, for the test modules too

from fuzzhelp import UnixForwarder  # noqa: E402
from mvapi import IMAGES, Daemon  # noqa: E402


@pytest.fixture(scope="session")
def fuzz_daemon() -> Iterator[Daemon]:
    """A daemon only the fuzz tests use: they create, remove and break things at random."""
    cfg_root = IMAGES.parent / "tests" / "fuzz"
    with Daemon.fresh("mvd-fz-", "--config", str(cfg_root / "fuzz.toml")) as d:
        for name in ("hello", "counter"):
            d.mv("image", "import", str(IMAGES / name / f"{name}.wasm"), "--name", name)
        # Where the interpreters are fetched, a random Python or JavaScript deploy would import and rewrite one
        # (QuickJS about 20-95 s, CPython minutes), past a request's timeout. Images of those names that
        # cannot be an interpreter's make such deploys a prompt 422 instead.
        for name in ("python", "js"):
            d.mv("image", "import", str(IMAGES / "hello" / "hello.wasm"), "--name", name, "--no-asyncify")
        yield d


@pytest.fixture(scope="session")
def forwarder(fuzz_daemon: Daemon) -> Iterator[UnixForwarder]:
    fwd = UnixForwarder(str(fuzz_daemon.socket))
    try:
        yield fwd
    finally:
        fwd.close()
