"""What the fuzz tests share: how many examples they run, a TCP forwarder to the daemon's Unix socket, and
the mutation strategy for real files."""
from __future__ import annotations

import os
import socket
import threading

from hypothesis import strategies as st
from mvapi import IMAGES

FUZZ_EXAMPLES = int(os.environ.get("MICROVMD_FUZZ_EXAMPLES", "15"))
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


SEEDS = [(IMAGES / name / f"{name}.wasm").read_bytes() for name in ("hello", "counter")]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed with a few bytes changed, cut, repeated or inserted: deep into the parser, unlike noise."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at:at] = data[at:at + draw(st.integers(1, 32))]
    return bytes(data)
