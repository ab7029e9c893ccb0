"""The ordered shutdown (docs/architecture.md, "Shutdown"): SIGTERM under API load answers no request with a
5xx and exits 0; a create that reaches the controller after the guests were stopped is refused with 503
`shutting_down`; a request waiting for a guest is answered when the guest is stopped."""
from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from mvapi import IMAGES, WAT_LOOP, Daemon

from microvmd.daemon import DRAIN_GRACE

CLIENTS = 64
# What /work/shared/checks/py/sigterm_load.py does: reads, and runs of "hello" to their end, on keep-alive
# connections.
REQUESTS = [("GET", "/v1/vms?all=true"), ("POST", "/v1/vms?wait=true"), ("GET", "/v1/info"), ("GET", "/v1/images")]
CREATE = b'{"image": "hello", "start": true, "auto_remove": true}'


def _hello_only(root: Path) -> Path:
    """An --import-images directory with only hello in it (the daemon is ready sooner)."""
    d = root / "images"
    (d / "hello").mkdir(parents=True)
    shutil.copy(IMAGES / "hello" / "hello.wasm", d / "hello" / "hello.wasm")
    return d


async def _client(sock: str, stop: asyncio.Event, codes: dict[str, int]) -> None:
    def count(what: str) -> None:
        codes[what] = codes.get(what, 0) + 1

    while not stop.is_set():
        try:
            r, w = await asyncio.open_unix_connection(sock)
        except OSError:
            count("refused")
            await asyncio.sleep(0.01)
            continue
        try:
            for method, path in REQUESTS:
                body = CREATE if method == "POST" else b""
                w.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await w.drain()
                line = await asyncio.wait_for(r.readline(), 10)
                if not line:
                    count("closed")
                    break
                count(line.split()[1].decode())
                length, chunked = 0, False
                while True:
                    h = await asyncio.wait_for(r.readline(), 10)
                    if h in (b"\r\n", b""):
                        break
                    k, _, v = h.decode().partition(":")
                    if k.lower() == "content-length":
                        length = int(v)
                    elif k.lower() == "transfer-encoding" and "chunked" in v:
                        chunked = True
                if chunked:
                    while True:
                        n = int((await r.readline()).strip() or b"0", 16)
                        await r.readexactly(n + 2)
                        if n == 0:
                            break
                else:
                    await r.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError):
            count("reset")
        finally:
            w.close()


async def _load_then_sigterm(d: Daemon) -> dict[str, int]:
    codes: dict[str, int] = {}
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_client(str(d.socket), stop, codes)) for _ in range(CLIENTS)]
    await asyncio.sleep(1.5)
    d.send_signal(signal.SIGTERM)
    await asyncio.sleep(2.0)
    stop.set()
    await asyncio.gather(*tasks)
    return codes


def test_sigterm_under_64_api_clients_answers_no_5xx_and_exits_0(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(start=False)
    d.args = ["--import-images", str(_hello_only(d.root))]
    d.start()
    codes = asyncio.run(_load_then_sigterm(d))
    assert d.stop(timeout=60) == 0, d.log()
    fives = {k: n for k, n in codes.items() if k.startswith("5")}
    assert not fives, (codes, d.log())
    assert codes.get("200", 0) > 0 and codes.get("201", 0) > 0, codes
    assert not d.socket.exists()
    assert "Traceback" not in d.log() and "Exception in callback" not in d.log(), d.log()
    # the ephemeral runs leave no record behind: nothing comes back at the next start
    d.args = []
    d.start()
    assert d.api.ok("GET", "/v1/vms?all=true")["vms"] == []


def _send_head(sock: Path, method: str, path: str, length: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    try:
        s.connect(str(sock))
    except OSError:
        s.close()
        raise
    s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {length}\r\n\r\n".encode())
    return s


def _read_answer(s: socket.socket) -> tuple[int, dict[str, object]]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(v) for k, _, v in (ln.partition(":") for ln in lines[1:]) if k.lower() == "content-length")
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk
        body += chunk
    return int(lines[0].split()[1]), json.loads(body)


def test_create_racing_the_shutdown_is_refused_503_and_waits_are_answered(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon()
    d.image("loop", WAT_LOOP)
    looping = d.api.create("loop", start=True)
    # in flight when SIGTERM comes: a wait for a guest that never ends by itself, and a create whose body
    # has not all arrived yet (its handler is running, it has not reached the controller)
    waiter = _send_head(d.socket, "POST", f"/v1/vms/{looping['id']}/wait", 0)
    body = json.dumps({"image": "loop", "start": True}).encode()
    creator = _send_head(d.socket, "POST", "/v1/vms", len(body))
    creator.sendall(body[:5])
    time.sleep(0.3)
    t0 = time.monotonic()
    d.send_signal(signal.SIGTERM)

    # the wait holds its connection through the drain, then the guest is stopped and the wait answered
    status, doc = _read_answer(waiter)
    assert status == 200 and doc["state"] == "stopped" and doc["reason"] == "stopped", (status, doc)
    assert time.monotonic() - t0 >= DRAIN_GRACE - 0.2
    # the create's body arrives after the guests were stopped: refused, never a 500
    creator.sendall(body[5:])
    status, doc = _read_answer(creator)
    assert status == 503 and doc["error"]["code"] == "shutting_down", (status, doc)  # type: ignore[index]
    # and nobody can connect any more
    try:
        _send_head(d.socket, "GET", "/v1/info", 0).close()
    except OSError:
        pass
    else:
        raise AssertionError("the daemon still accepts connections while shutting down")
    waiter.close()
    creator.close()
    assert d.stop(timeout=60) == 0, d.log()
    assert "Traceback" not in d.log(), d.log()
    assert not d.socket.exists()
