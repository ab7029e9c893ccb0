"""Fixtures: one shared real daemon for the session (sample images imported) and fresh daemons for tests
that restart, kill or reconfigure one."""
from __future__ import annotations

import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mvapi import IMAGES, Api, Daemon, checksum, short_root


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    with Daemon.fresh("mvd-it-", "--import-images", str(IMAGES)) as d:
        yield d


@pytest.fixture(scope="session")
def api(daemon: Daemon) -> Api:
    return daemon.api


@pytest.fixture(scope="session")
def spin_ref(api: Api) -> Callable[[int], str]:
    """`spin N`'s checksum from an unlimited, undisturbed run (cached per N)."""
    cache: dict[int, str] = {}

    def ref(n: int) -> str:
        if n not in cache:
            vm = api.create("spin", str(n), start=True)
            ex = api.wait(vm["id"])
            assert ex["code"] == 0 and ex["reason"] == "exit", ex
            cache[n] = checksum(api.logs(vm["id"]))
            api.ok("DELETE", f"/v1/vms/{vm['id']}")
        return cache[n]

    return ref


@pytest.fixture
def make_daemon() -> Iterator[Callable[..., Daemon]]:
    """Factory for private daemons: make_daemon(*extra_args, start=True, env=..., state_dir=...)."""
    made: list[Daemon] = []
    roots: list[Path] = []

    def make(*args: str, start: bool = True, env: dict[str, str] | None = None,
             state_dir: Path | None = None) -> Daemon:
        root = short_root("mvd-t-")
        roots.append(root)
        d = Daemon(root, state_dir or root / "state", root / "s.sock", list(args), dict(env or {}))
        made.append(d)
        if start:
            d.start()
        return d

    try:
        yield make
    finally:
        for d in made:
            d.stop(signal.SIGKILL)
        for r in roots:
            shutil.rmtree(r, ignore_errors=True)
