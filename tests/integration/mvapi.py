"""Stdlib helpers for the integration suite: raw HTTP over the daemon's Unix socket, a real `microvmd`
subprocess, the real `microvm` client, and the hand-written guests (WAT) the tests feed the daemon.

Nothing here fakes a component: every call goes to a `python -m microvmd.daemon` child process.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"

# Generous upper bounds that only stop a hung test; never performance assertions.
READY_TIMEOUT = 60.0
HTTP_TIMEOUT = 60.0


# ---------------------------------------------------------------------------------------------- HTTP
class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = HTTP_TIMEOUT) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.unix_path)
        except BaseException:
            s.close()
            raise
        self.sock = s


@dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def json(self) -> Any:
        if "msgpack" in self.content_type:
            return msgpack.unpackb(self.body, raw=False)
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, str]:
        """The `{"error": {...}}` object of an error answer (asserting its documented shape)."""
        doc = self.json()
        assert isinstance(doc, dict) and isinstance(doc.get("error"), dict), doc
        err = doc["error"]
        assert isinstance(err.get("code"), str) and err["code"], doc
        assert isinstance(err.get("message"), str) and err["message"], doc
        return err

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def request(sock: str | Path, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None,
            raw: bytes | None = None, timeout: float = HTTP_TIMEOUT) -> Resp:
    """One request on a fresh connection. `body` is sent as JSON; `raw` is sent as is."""
    hdrs = dict(headers or {})
    data: bytes | None = raw
    if body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    conn = UnixHTTPConnection(str(sock), timeout)
    try:
        conn.request(method, path, body=data, headers=hdrs)
        r = conn.getresponse()
        payload = r.read()
        return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, payload)
    finally:
        conn.close()


class Api:
    """Raw API access to one daemon, with the few calls the tests repeat."""

    def __init__(self, sock: str | Path) -> None:
        self.sock = str(sock)

    def __call__(self, method: str, path: str, body: Any = None, **kw: Any) -> Resp:
        return request(self.sock, method, path, body, **kw)

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        r = self(method, path, body, **kw)
        assert 200 <= r.status < 300, (method, path, r.status, r.text)
        return r.json() if r.body else None

    def vm(self, ref: str) -> dict[str, Any]:
        return self.ok("GET", f"/v1/vms/{ref}")  # type: ignore[no-any-return]

    def create(self, image: str, *args: str, **spec: Any) -> dict[str, Any]:
        body = {"image": image, "args": list(args), **spec}
        r = self("POST", "/v1/vms", body)
        assert r.status == 201, (r.status, r.text)
        return r.json()  # type: ignore[no-any-return]

    def wait(self, ref: str, timeout: float = 120.0) -> dict[str, Any]:
        return self.ok("POST", f"/v1/vms/{ref}/wait?timeout={timeout}",  # type: ignore[no-any-return]
                       timeout=timeout + 30)

    def logs(self, ref: str, stream: str = "all") -> str:
        r = self("GET", f"/v1/vms/{ref}/logs?stream={stream}")
        assert r.status == 200, r.text
        return r.text

    def wait_state(self, ref: str, *states: str, timeout: float = 30.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            vm = self.vm(ref)
            if vm["state"] in states:
                return vm
            if time.monotonic() > end:
                raise AssertionError(f"VM {ref} is {vm['state']}, not {states} after {timeout} s: {vm}")
            time.sleep(0.02)

    def wait_fuel(self, ref: str, above: int = 0, timeout: float = 30.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            vm = self.vm(ref)
            if vm["fuel_consumed"] > above:
                return vm
            if time.monotonic() > end:
                raise AssertionError(f"VM {ref} fuel_consumed stays {vm['fuel_consumed']}: {vm}")
            time.sleep(0.02)

    def metrics(self) -> str:
        r = self("GET", "/metrics")
        assert r.status == 200, r.text
        return r.text

    def metric(self, name: str) -> float:
        return metric_value(self.metrics(), name)

    def import_image(self, data: bytes, name: str | None = None) -> Resp:
        path = "/v1/images" + (f"?name={name}" if name else "")
        return self("POST", path, raw=data, headers={"Content-Type": "application/wasm"})


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    raise AssertionError(f"metric {name} not in:\n{text}")


# ---------------------------------------------------------------------------------------------- client
def cli(sock: str | Path | None, *args: str, timeout: float = 120.0, env: dict[str, str] | None = None,
        input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """The real client: `python -m microvmd.cli.main --socket SOCK ARGS...`."""
    e = {k: v for k, v in os.environ.items() if k != "MICROVM_SOCKET"}
    if env:
        e.update(env)
    argv = [sys.executable, "-m", "microvmd.cli.main"]
    if sock is not None:
        argv += ["--socket", str(sock)]
    return subprocess.run(argv + list(args), capture_output=True, text=True, timeout=timeout, env=e,
                          cwd=REPO, input=None if input is None else input.decode())


# ---------------------------------------------------------------------------------------------- daemon
def _thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


@dataclass
class Daemon:
    """A real `microvmd` child process on its own socket and state dir."""

    root: Path
    state_dir: Path
    socket: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    starts: int = 0

    @property
    def api(self) -> Api:
        return Api(self.socket)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def threads(self) -> int:
        return _thread_count(self.pid)

    def cli(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return cli(self.socket, *args, **kw)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "microvmd.daemon", "--socket", str(self.socket),
                "--state-dir", str(self.state_dir), *self.args]

    def start(self, *, wait: bool = True, popen_argv: list[str] | None = None, **popen_kw: Any) -> Daemon:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        self.log_path = self.root / f"daemon-{self.starts}.log"
        env = {**os.environ, **self.env}
        for k in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID"):
            if k not in self.env:
                env.pop(k, None)
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(popen_argv or self.argv(), stdout=logf, stderr=subprocess.STDOUT,
                                         env=env, cwd=REPO, **popen_kw)
        if wait:
            self.wait_ready()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def wait_ready(self, sock: str | Path | None = None, timeout: float = READY_TIMEOUT) -> None:
        sock = sock or self.socket
        end = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"microvmd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if request(sock, "GET", "/v1/info", timeout=5).status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > end:
                raise AssertionError(f"microvmd not ready after {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the daemon and reap it; SIGKILL after `timeout`. Returns its exit status."""
        p = self.proc
        if p is None:
            return 0
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(30)
        return p.returncode


# ---------------------------------------------------------------------------------------------- guests
def checksum(text: str) -> str:
    """The last `checksum N` line of spin's console."""
    found = re.findall(r"^checksum (\d+)$", text, re.M)
    assert found, f"no checksum line in {text!r}"
    return found[-1]


def wasm(name: str) -> bytes:
    return (IMAGES / name / f"{name}.wasm").read_bytes()


def with_custom_section(module: bytes, payload: bytes, name: bytes = b"microvmd-test") -> bytes:
    """The same module with one more custom section: a new digest, so a full import (parse + compile)."""
    def leb(n: int) -> bytes:
        out = bytearray()
        while True:
            b = n & 0x7F
            n >>= 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)
    content = leb(len(name)) + name + payload
    return module + b"\x00" + leb(len(content)) + content


# `start` adds 1 to $g; `_start` exits with g*40 + 2: 42 when the start function ran exactly once before
# the entry (2 if never, 82 if twice).
WAT_START_ONCE = """
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (global $g (mut i32) (i32.const 0))
  (func $init (global.set $g (i32.add (global.get $g) (i32.const 1))))
  (start $init)
  (func (export "_start")
    (call $exit (i32.add (i32.mul (global.get $g) (i32.const 40)) (i32.const 2)))))
"""

WAT_EXIT_7 = """;; a comment first, then the module
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (call $exit (i32.const 7))))
"""

WAT_TRAP = """
(module
  (memory (export "memory") 1)
  (func (export "_start") unreachable))
"""

WAT_RECURSE = """
(module
  (memory (export "memory") 1)
  (func $f (param i32) (result i32)
    (i32.add (call $f (i32.add (local.get 0) (i32.const 1))) (i32.const 1)))
  (func (export "_start") (drop (call $f (i32.const 0)))))
"""

WAT_LOOP = """
(module
  (memory (export "memory") 1)
  (func (export "_start") (loop $l (br $l))))
"""

# Grows memory one MiB (16 pages) at a time until the host refuses, then exits with the size in MiB.
WAT_MEMORY_BOMB = """
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (block $done
      (loop $l
        (br_if $done (i32.eq (memory.grow (i32.const 16)) (i32.const -1)))
        (br $l)))
    (call $exit (i32.shr_u (memory.size) (i32.const 4)))))
"""

# Keeps calling memory.grow forever, ignoring failures (needs a timeout to end).
WAT_MEMORY_BOMB_FOREVER = """
(module
  (memory (export "memory") 1)
  (func (export "_start") (loop $l (drop (memory.grow (i32.const 16))) (br $l))))
"""

WAT_MISSING_IMPORT = """
(module
  (import "env" "nope" (func $nope))
  (memory (export "memory") 1)
  (func (export "_start") (call $nope)))
"""

# Asks for 200 pages (12.5 MiB) of initial memory.
WAT_BIG_INITIAL_MEMORY = """
(module
  (memory (export "memory") 200)
  (func (export "_start")))
"""
