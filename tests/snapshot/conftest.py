"""Fixtures: real daemons on temporary sockets and state dirs, guests built with guest-sdk/mvcc, TLS material."""
from __future__ import annotations

import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mvapi import IMAGES, short_root  # noqa: E402
from snaphelp import Daemon, build_guests, make_tls  # noqa: E402

DEFAULT_IMAGES = ("counter", "echo", "spin")


def spawn(root: Path, name: str, *args: str, images: tuple[str, ...] = DEFAULT_IMAGES,
          env: dict[str, str] | None = None, prefix: list[str] | None = None,
          state_dir: Path | None = None) -> Daemon:
    d = Daemon(root, state_dir or root / f"{name}-state", root / f"{name}.sock", list(args), dict(env or {}),
               list(prefix or []))
    d.start()
    for img in images:
        d.import_image(IMAGES / img / f"{img}.wasm", img)
    return d


DaemonFactory = Callable[..., Daemon]


@pytest.fixture
def make_daemon() -> Iterator[DaemonFactory]:
    """make_daemon(name, *args, images=..., env=..., prefix=..., state_dir=...) -> a started Daemon."""
    made: list[Daemon] = []
    root = short_root("mvsnap-")

    def make(name: str, *args: str, **kw: object) -> Daemon:
        d = spawn(root, name, *args, **kw)  # type: ignore[arg-type]
        made.append(d)
        return d

    make.root = root  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        for d in made:
            d.stop(signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Daemon, Daemon]]:
    """Two daemons shared by a module's tests (use unique VM and snapshot names)."""
    root = short_root("mvsnap-m-")
    made: list[Daemon] = []
    try:
        made.append(spawn(root, "a"))
        made.append(spawn(root, "b"))
        yield made[0], made[1]
    finally:
        for d in made:
            d.stop(signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def _guests() -> Iterator[dict[str, Path] | str]:
    out = short_root("mvsnap-guests-")
    try:
        yield build_guests(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def guests(_guests: dict[str, Path] | str) -> dict[str, Path]:
    if isinstance(_guests, str):
        pytest.skip(_guests)
    return _guests


@pytest.fixture(scope="session")
def tls() -> Iterator[tuple[Path, Path]]:
    out = short_root("mvsnap-tls-")
    try:
        got = make_tls(out)
        if isinstance(got, str):
            pytest.skip(got)
        yield got
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="session")
def sample() -> Iterator[dict[str, bytes]]:
    """Real snapshot data from a real daemon: the export of a running counter ('export') and of a created
    one ('export_created'), and the stored manifest file of the running one ('stored')."""
    root = short_root("mvsnap-sample-")
    d = spawn(root, "s", images=("counter",))
    try:
        d.mv("run", "-d", "--name", "c", "--env", "INTERVAL_MS=20", "counter")
        d.wait_count("c", 3)
        d.mv("snapshot", "create", "c", "--name", "sample-run")
        d.mv("create", "--name", "c0", "counter")
        d.mv("snapshot", "create", "c0", "--name", "sample-created")
        out = {}
        for snap, key in (("sample-run", "export"), ("sample-created", "export_created")):
            d.mv("snapshot", "export", snap, "-o", str(root / f"{snap}.mvsnap"))
            out[key] = (root / f"{snap}.mvsnap").read_bytes()
        out["stored"] = (d.state_dir / "snapshots" / "manifests" / "sample-run.snap").read_bytes()
        yield out
    finally:
        d.stop(signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
