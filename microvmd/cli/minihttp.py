"""A minimal HTTP/1.1 client connection for the daemon's Unix socket.

``http.client`` pulls in the ``email`` package and costs ~20 ms of start-up, a third of a ``microvm ps``.
The daemon speaks plain HTTP/1.1 to us, so this small connection (the subset of ``http.client``'s
interface the client uses: connect, request, getresponse; read, read1, getheader) is enough. The HTTPS
transport still uses ``http.client``.
"""
from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Any, BinaryIO

MAX_HEADER = 64 * 1024


class HTTPError(Exception):
    """A malformed or truncated answer."""


class RemoteDisconnected(HTTPError, ConnectionResetError):
    pass


class Headers:
    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items

    def get(self, name: str, default: str | None = None) -> str | None:
        n = name.lower()
        for k, v in self._items:
            if k.lower() == n:
                return v
        return default

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __getitem__(self, name: str) -> str | None:
        return self.get(name)


class Response:
    def __init__(self, sock: socket.socket, blocksize: int) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._blocksize = blocksize
        self._eof = False
        line = self._readline()
        if not line:
            raise RemoteDisconnected("the daemon closed the connection without answering")
        parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise HTTPError(f"malformed status line {line[:80]!r}")
        self.status = int(parts[1])
        self.reason = parts[2] if len(parts) > 2 else ""
        items: list[tuple[str, str]] = []
        size = 0
        while True:
            h = self._readline()
            size += len(h)
            if size > MAX_HEADER:
                raise HTTPError("response headers too large")
            if h in (b"\r\n", b"\n", b""):
                break
            k, _, v = h.decode("latin-1").partition(":")
            items.append((k.strip(), v.strip()))
        self.headers = Headers(items)
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        self._chunked = "chunked" in te
        cl = self.headers.get("Content-Length")
        self._left: int | None = int(cl) if cl and cl.isdigit() and not self._chunked else None
        self._chunk_left = 0
        self._done = self.status in (204, 304) or (self._left == 0)

    # ---- low level
    def _fill(self) -> bool:
        if self._eof:
            return False
        data = self._sock.recv(self._blocksize)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def _readline(self) -> bytes:
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i + 1])
                del self._buf[:i + 1]
                return line
            if len(self._buf) > MAX_HEADER:
                raise HTTPError("line too long in response")
            if not self._fill():
                line = bytes(self._buf)
                self._buf.clear()
                return line

    def _take(self, n: int) -> bytes:
        """Up to n bytes from the buffer, reading once from the socket if it is empty."""
        if not self._buf and not self._fill():
            return b""
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    # ---- body
    def read1(self, n: int = 65536) -> bytes:
        """Whatever is available, at most n bytes; b"" at the end of the body."""
        if self._done:
            return b""
        if self._chunked:
            if self._chunk_left == 0:
                size_line = self._readline()
                if not size_line:
                    raise HTTPError("the answer was cut short")
                try:
                    self._chunk_left = int(size_line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise HTTPError(f"malformed chunk size {size_line[:40]!r}") from None
                if self._chunk_left == 0:
                    while self._readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    self._done = True
                    return b""
            data = self._take(min(n, self._chunk_left))
            if not data:
                raise HTTPError("the answer was cut short")
            self._chunk_left -= len(data)
            if self._chunk_left == 0:
                self._readline()  # CRLF after the chunk
            return data
        if self._left is not None:
            data = self._take(min(n, self._left))
            if not data:
                raise HTTPError("the answer was cut short")
            self._left -= len(data)
            if self._left == 0:
                self._done = True
            return data
        data = self._take(n)  # no length: until the connection closes
        if not data:
            self._done = True
        return data

    def read(self) -> bytes:
        parts: list[bytes] = []
        while True:
            d = self.read1(1 << 20)
            if not d:
                return b"".join(parts)
            parts.append(d)

    def getheader(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name, default)

    def close(self) -> None:
        self._done = True


class UnixConnection:
    """One request per connection (the client never pipelines)."""

    def __init__(self, connect: Any, timeout: float | None, connect_timeout: float, blocksize: int) -> None:
        self._connect = connect
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.blocksize = blocksize
        self.sock: socket.socket | None = None

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout)
            self._connect(sock)
            sock.settimeout(self.timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def request(self, method: str, path: str, body: bytes | BinaryIO | None = None,
                headers: dict[str, str] | None = None) -> None:
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        hdrs = {"Host": "localhost", "Connection": "close", **(headers or {})}
        chunked = False
        if isinstance(body, (bytes, bytearray)):
            hdrs["Content-Length"] = str(len(body))
        elif body is not None and "Content-Length" not in hdrs:
            hdrs["Transfer-Encoding"] = "chunked"
            chunked = True
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
        if isinstance(body, (bytes, bytearray)):
            self.sock.sendall(head.encode("latin-1") + bytes(body))
            return
        self.sock.sendall(head.encode("latin-1"))
        if body is not None:
            for block in _blocks(body, self.blocksize):
                self.sock.sendall(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            if chunked:
                self.sock.sendall(b"0\r\n\r\n")

    def getresponse(self) -> Response:
        assert self.sock is not None
        return Response(self.sock, self.blocksize)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _blocks(f: BinaryIO, size: int) -> Iterable[bytes]:
    while True:
        b = f.read(size)
        if not b:
            return
        yield b
