"""Stdlib helpers shared by every test directory (tests/conftest.py puts this directory on sys.path, so any
test can `from mvapi import ...`): raw HTTP over the daemon's Unix socket (and HTTPS), a real `microvmd`
subprocess, the real `microvm` client, free ports and line protocols on 127.0.0.1, and the hand-written
guests (WAT) the tests feed the daemon.

Nothing here fakes a component: every call goes to a `python -m microvmd.daemon` child process.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import msgpack

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"

# Generous upper bounds that only stop a hung test; never performance assertions.
READY_TIMEOUT = 60.0
HTTP_TIMEOUT = 60.0


def short_root(prefix: str) -> Path:
    """A new directory under /tmp: AF_UNIX paths are limited to 108 bytes, so sockets stay out of pytest's long
    per-test directories."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


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
        """The decoded body (JSON, or msgpack when the answer says so); None when there is none."""
        if not self.body:
            return None
        if "msgpack" in self.content_type:
            return msgpack.unpackb(self.body, raw=False)
        return json.loads(self.body)

    @property
    def doc(self) -> Any:
        """A JSON answer decoded, any other answer as text (latin-1: byte for byte; "" when empty)."""
        if self.body and "json" in self.content_type:
            return json.loads(self.body)
        return self.body.decode("latin-1")

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
    def code(self) -> str | None:
        """The error code of an error answer, or None (no error object)."""
        try:
            return self.json()["error"]["code"]  # type: ignore[no-any-return]
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def message(self) -> str:
        """The error message of an error answer, else the body as text."""
        try:
            return str(self.json()["error"]["message"])
        except (ValueError, KeyError, TypeError):
            return self.text

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def _exchange(conn: http.client.HTTPConnection, method: str, path: str, body: Any, raw: bytes | None,
              headers: dict[str, str] | None) -> Resp:
    """One request on `conn` (closed after). `body` is sent as JSON; `raw` is sent as is."""
    hdrs = dict(headers or {})
    data: bytes | None = raw
    if body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=data, headers=hdrs)
        r = conn.getresponse()
        payload = r.read()
        return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, payload)
    finally:
        conn.close()


def request(sock: str | Path, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None,
            raw: bytes | None = None, timeout: float = HTTP_TIMEOUT) -> Resp:
    """One request on a fresh Unix-socket connection. `body` is sent as JSON; `raw` is sent as is."""
    return _exchange(UnixHTTPConnection(str(sock), timeout), method, path, body, raw, headers)


def https_request(host: str, port: int, method: str, path: str, *, cafile: str, token: str | None = None,
                  body: Any = None, timeout: float = HTTP_TIMEOUT) -> Resp:
    """One request to a TCP+TLS listener, trusting `cafile`, with a bearer `token` if given."""
    ctx = ssl.create_default_context(cafile=cafile)
    hdrs = {"Authorization": f"Bearer {token}"} if token else {}
    return _exchange(http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout), method, path, body,
                     None, hdrs)


class Api:
    """Raw API access to one daemon, with the few calls the tests repeat."""

    def __init__(self, sock: str | Path) -> None:
        self.sock = str(sock)

    def __call__(self, method: str, path: str, body: Any = None, **kw: Any) -> Resp:
        return request(self.sock, method, path, body, **kw)

    def call(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        """The status and `Resp.doc` (JSON decoded, anything else as text)."""
        r = self(method, path, body, **kw)
        return r.status, r.doc

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
        input: bytes | None = None, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real client: `[PREFIX...] python -m microvmd.cli.main --socket SOCK ARGS...`, with no MICROVM_*
    variable from the outside (only those in `env`)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("MICROVM_")}
    if env:
        e.update(env)
    argv = [*(prefix or []), sys.executable, "-m", "microvmd.cli.main"]
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
    """A real `microvmd` child process on its own socket and state dir.

    Several may share `root` (their logs are named after their sockets). `fresh()` makes one in a new
    directory of its own, which `close()` removes.
    """

    root: Path
    state_dir: Path
    socket: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    prefix: list[str] = field(default_factory=list)  # run the daemon under this, e.g. ["ip", "netns", "exec", "B"]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    starts: int = 0
    imported: set[str] = field(default_factory=set)  # names imported by image()

    @classmethod
    def fresh(cls, prefix: str, *args: str, env: dict[str, str] | None = None) -> Self:
        """A started daemon in a new short directory under /tmp: socket `s.sock`, state dir `state`."""
        root = short_root(prefix)
        d = cls(root, root / "state", root / "s.sock", list(args), dict(env or {}))
        try:
            return d.start()
        except BaseException:
            d.close(signal.SIGKILL)
            raise

    @property
    def api(self) -> Api:
        return Api(self.socket)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def threads(self) -> int:
        return _thread_count(self.pid)

    def argv(self) -> list[str]:
        # the function gateway only where a test asks for it (its default port is one for the whole host)
        gateway = [] if any(a.startswith("--gateway") for a in self.args) else ["--gateway", "off"]
        return [*self.prefix, sys.executable, "-m", "microvmd.daemon", "--socket", str(self.socket),
                "--state-dir", str(self.state_dir), *gateway, *self.args]

    def start(self, *, wait: bool = True, popen_argv: list[str] | None = None, **popen_kw: Any) -> Self:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        self.log_path = self.root / f"daemon-{self.socket.stem}-{self.starts}.log"
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

    def close(self, sig: int = signal.SIGTERM) -> None:
        """stop(), then remove `root` (for daemons made by fresh()). A daemon that broke the VM runtime rule
        (microvmd/vmm/runtime.py; the guard is on in tests) fails the test that used it, whatever it answered."""
        self.stop(sig)
        logs = sorted(self.root.glob("daemon-*.log"))
        broken = [p.name for p in logs if b"RuntimeRuleBroken" in p.read_bytes()]
        shutil.rmtree(self.root, ignore_errors=True)
        assert not broken, f"a VM runtime field was set outside VmRuntime.apply on the loop: see {broken}"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- conveniences: raw API and the client
    def call(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        """The status and the answer: JSON decoded, anything else as text (see Resp.doc)."""
        return self.api.call(method, path, body, **kw)

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        """Like call(), asserting a 2xx status; returns the answer."""
        status, doc = self.call(method, path, body, **kw)
        assert 200 <= status < 300, (method, path, status, doc)
        return doc

    def get(self, ref: str) -> dict[str, Any]:
        return self.ok("GET", f"/v1/vms/{ref}")  # type: ignore[no-any-return]

    def wait(self, ref: str, timeout: float = 120.0) -> dict[str, Any]:
        return self.api.wait(ref, timeout)

    def logs(self, ref: str, stream: str = "stdout") -> str:
        """The VM's console (stdout only by default, unlike Api.logs)."""
        return str(self.ok("GET", f"/v1/vms/{ref}/logs?stream={stream}"))

    def wait_blocked(self, ref: str, op: str | None = None, timeout: float = 20.0) -> dict[str, Any]:
        """Until the running VM `ref` is blocked in a host call (in `op`, if given)."""
        end = time.monotonic() + timeout
        while True:
            vm = self.get(ref)
            if vm["blocked_in"] is not None and (op is None or vm["blocked_in"] == op):
                return vm
            assert vm["state"] == "running", (vm, self.logs(ref, "all"))
            assert time.monotonic() < end, vm
            time.sleep(0.02)

    def image(self, name: str, wat: str) -> str:
        """Import the WAT text `wat` as image `name` (once per daemon); returns `name`."""
        if name not in self.imported:
            self.ok("POST", f"/v1/images?name={name}", raw=wat.encode())
            self.imported.add(name)
        return name

    def cli(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return cli(self.socket, *args, **kw)

    def mv(self, *args: str, **kw: Any) -> str:
        """The client, asserting success; returns its stdout."""
        r = self.cli(*args, **kw)
        assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
        return r.stdout

    def inspect(self, ref: str) -> dict[str, Any]:
        """`microvm --json inspect REF`."""
        return json.loads(self.mv("--json", "inspect", ref))  # type: ignore[no-any-return]


# What systemd does before exec'ing a socket-activated service: `python -c SOCKET_ACTIVATE FD NAME ARGS...` puts
# the listening socket FD at fd 3, describes it in the environment (LISTEN_FDNAMES=NAME) with LISTEN_PID naming
# the very process that will read it (exec keeps the pid), then execs `python ARGS...`.
SOCKET_ACTIVATE = r"""
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.set_inheritable(3, True)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_FDNAMES"] = sys.argv[2]
os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
"""


# ---------------------------------------------------------------------------------------------- network
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on (as far as we can tell)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
    """Until something accepts connections on host:port."""
    end = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), 0.3).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise AssertionError(f"nothing listens on {host}:{port} after {timeout} s") from None
            time.sleep(0.05)


def line_rpc(port: int, text: str, host: str = "127.0.0.1", timeout: float = 5.0, retry: float = 0.0) -> str:
    """Send one line, return the first reply line. With `retry`, a refused connection (nothing listening
    yet: no client is seen by the guest) is retried for that many seconds."""
    end = time.monotonic() + retry
    while True:
        try:
            s = socket.create_connection((host, port), timeout)
            break
        except ConnectionRefusedError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)
    with s:
        s.settimeout(timeout)
        s.sendall(text.encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            d = s.recv(4096)
            if not d:
                break
            buf += d
    return buf.split(b"\n")[0].decode(errors="replace")


# ---------------------------------------------------------------------------------------------- guests
def until(cond: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    end = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


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


# Functions for WAT guests that print on stdout (they need the WASI fd_write import as $fd_write): ($out ptr len)
# writes raw bytes, ($num i64) and ($n32 i32) print a decimal line. They use memory 0..47 as scratch.
WAT_PRINT = """\
  (func $out (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func $num (param $v i64)
    (local $p i32) (local $neg i32)
    (i32.store8 (i32.const 47) (i32.const 10))
    (local.set $p (i32.const 47))
    (if (i64.lt_s (local.get $v) (i64.const 0))
      (then (local.set $neg (i32.const 1)) (local.set $v (i64.sub (i64.const 0) (local.get $v)))))
    (loop $l
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p)
        (i32.add (i32.const 48) (i32.wrap_i64 (i64.rem_u (local.get $v) (i64.const 10)))))
      (local.set $v (i64.div_u (local.get $v) (i64.const 10)))
      (br_if $l (i64.ne (local.get $v) (i64.const 0))))
    (if (local.get $neg)
      (then (local.set $p (i32.sub (local.get $p) (i32.const 1))) (i32.store8 (local.get $p) (i32.const 45))))
    (call $out (local.get $p) (i32.sub (i32.const 48) (local.get $p))))
  (func $n32 (param i32) (call $num (i64.extend_i32_s (local.get 0))))"""


def wat_repeat(n: int | str, body: str) -> str:
    """WAT that runs `body` n times (in a function with an i32 local $i)."""
    return f"""
    (local.set $i (i32.const 0))
    (block $done (loop $again
      (br_if $done (i32.ge_u (local.get $i) (i32.const {n})))
      {body}
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $again)))"""

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
