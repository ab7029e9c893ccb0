"""Fuzzing set-up (issue 13 item 9): a real daemon of the fuzz tests' own, reachable over TCP for clients
that cannot speak HTTP on a Unix socket, and the number of examples each property runs.

The default run is short (``FUZZ_EXAMPLES``, a few seconds per test); ``pytest -m slow tests/fuzz`` or
``MICROVMD_FUZZ_EXAMPLES=2000`` runs long.
"""
from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest
from mvapi import IMAGES, Daemon

FUZZ_EXAMPLES = int(os.environ.get("MICROVMD_FUZZ_EXAMPLES", "25"))
SLOW_EXAMPLES = int(os.environ.get("MICROVMD_FUZZ_SLOW_EXAMPLES", "1000"))


class UnixForwarder:
    """127.0.0.1:<port> to a Unix socket, one thread pair per connection: for HTTP clients (Schemathesis's
    requests) that only dial TCP."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True, name="fuzz-forwarder").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            try:
                upstream.connect(self.path)
            except OSError:
                client.close()
                upstream.close()
                continue
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):  # wakes the other direction's pump, which then closes its own source
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            src.close()

    def close(self) -> None:
        self.closed = True
        self.server.close()


@pytest.fixture(scope="session")
def fuzz_daemon() -> Iterator[Daemon]:
    """A daemon only the fuzz tests use: they create, remove and break things at random."""
    cfg_root = IMAGES.parent / "tests" / "fuzz"
    with Daemon.fresh("mvd-fz-", "--config", str(cfg_root / "fuzz.toml")) as d:
        for name in ("hello", "counter"):
            d.mv("image", "import", str(IMAGES / name / f"{name}.wasm"), "--name", name)
        yield d


@pytest.fixture(scope="session")
def forwarder(fuzz_daemon: Daemon) -> Iterator[UnixForwarder]:
    fwd = UnixForwarder(str(fuzz_daemon.socket))
    try:
        yield fwd
    finally:
        fwd.close()
