"""Stdlib helpers for the snapshot suite: real `microvmd` subprocesses on temporary sockets and state dirs,
the real `microvm` client, raw HTTP (Unix socket and TLS), the export stream format, and guests built on
the fly with guest-sdk/mvcc.

Nothing here fakes the daemon: every VM call goes to a `python -m microvmd.daemon` child process.
"""
from __future__ import annotations

import hashlib
import http.client
import inspect
import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
READY_TIMEOUT = 60.0
HTTP_TIMEOUT = 60.0


# ------------------------------------------------------------------------------------------------ HTTP
class _UnixConn(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
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
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def code(self) -> str | None:
        try:
            return self.json()["error"]["code"]  # type: ignore[no-any-return]
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def message(self) -> str:
        try:
            return str(self.json()["error"]["message"])
        except (ValueError, KeyError, TypeError):
            return self.body.decode(errors="replace")

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def _do(conn: http.client.HTTPConnection, method: str, path: str, body: Any, raw: bytes | None,
        headers: dict[str, str] | None) -> Resp:
    hdrs = dict(headers or {})
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=data, headers=hdrs)
        r = conn.getresponse()
        return Resp(r.status, r.read())
    finally:
        conn.close()


def request(sock: str | Path, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = HTTP_TIMEOUT) -> Resp:
    return _do(_UnixConn(str(sock), timeout), method, path, body, raw, headers)


def https_request(host: str, port: int, method: str, path: str, *, cafile: str, token: str | None = None,
                  body: Any = None, timeout: float = HTTP_TIMEOUT) -> Resp:
    ctx = ssl.create_default_context(cafile=cafile)
    hdrs = {"Authorization": f"Bearer {token}"} if token else {}
    return _do(http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout), method, path, body,
               None, hdrs)


# ------------------------------------------------------------------------------------------------ client
def cli(sock: str | Path | None, *args: str, timeout: float = 120.0, env: dict[str, str] | None = None,
        prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real client: `python -m microvmd.cli.main --socket SOCK ARGS...`."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("MICROVM_")}
    e.update(env or {})
    argv = [*(prefix or []), sys.executable, "-m", "microvmd.cli.main"]
    if sock is not None:
        argv += ["--socket", str(sock)]
    return subprocess.run(argv + list(args), capture_output=True, text=True, timeout=timeout, env=e, cwd=REPO)


def numbers(text: str) -> list[int]:
    """The counter lines (`1`, `2`, ...) of a console."""
    return [int(x) for x in re.findall(r"^(\d+)$", text, re.M)]


# ------------------------------------------------------------------------------------------------ daemon
@dataclass
class Daemon:
    """A real `microvmd` child process on its own socket and state dir."""

    root: Path
    state_dir: Path
    socket: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    prefix: list[str] = field(default_factory=list)  # e.g. ["ip", "netns", "exec", "B"]
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    log_path: Path | None = None

    def start(self, wait: bool = True) -> Daemon:
        assert self.proc is None or self.proc.poll() is not None
        self.starts += 1
        self.log_path = self.root / f"daemon-{self.socket.stem}-{self.starts}.log"
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_USEC")}
        env.update(self.env)
        argv = [*self.prefix, sys.executable, "-m", "microvmd.daemon", "--socket", str(self.socket),
                "--state-dir", str(self.state_dir), *self.args]
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        if wait:
            self.wait_ready()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        end = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"microvmd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if request(self.socket, "GET", "/v1/info", timeout=5).status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > end:
                raise AssertionError(f"microvmd not ready after {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(30)
        return p.returncode

    # -- conveniences
    def api(self, method: str, path: str, body: Any = None, **kw: Any) -> Resp:
        return request(self.socket, method, path, body, **kw)

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        r = self.api(method, path, body, **kw)
        assert 200 <= r.status < 300, (method, path, r.status, r.text)
        return r.json()

    def cli(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return cli(self.socket, *args, **kw)

    def mv(self, *args: str, **kw: Any) -> str:
        """The client, asserting success; returns stdout."""
        r = self.cli(*args, **kw)
        assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
        return r.stdout

    def import_image(self, path: Path, name: str | None = None) -> str:
        q = f"?name={name}" if name else ""
        r = self.api("POST", f"/v1/images{q}", raw=path.read_bytes(), headers={"Content-Type": "application/wasm"})
        assert r.status in (200, 201), r.text
        return r.json()["digest"]  # type: ignore[no-any-return]

    def vm(self, ref: str) -> dict[str, Any]:
        return self.ok("GET", f"/v1/vms/{ref}")  # type: ignore[no-any-return]

    def logs(self, ref: str) -> str:
        r = self.api("GET", f"/v1/vms/{ref}/logs?stream=stdout")
        assert r.status == 200, r.text
        return r.text

    def snapshots(self) -> list[str]:
        return sorted(s["name"] for s in self.ok("GET", "/v1/snapshots")["snapshots"])

    def wait_count(self, ref: str, above: int, timeout: float = 20.0) -> int:
        """Until the counter VM `ref` has printed a number > above; returns the last one."""
        end = time.monotonic() + timeout
        while True:
            n = numbers(self.logs(ref))
            if n and n[-1] > above:
                return n[-1]
            if time.monotonic() > end:
                raise AssertionError(f"{ref} did not count past {above} in {timeout} s: {n[-5:]}")
            time.sleep(0.05)

    def wait_state(self, ref: str, *states: str, timeout: float = 20.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            vm = self.vm(ref)
            if vm["state"] in states:
                return vm
            if time.monotonic() > end:
                raise AssertionError(f"VM {ref} is {vm['state']}, not {states}: {vm}")
            time.sleep(0.05)


def short_root(prefix: str) -> Path:
    # AF_UNIX paths are limited to 108 bytes: keep sockets out of pytest's long tmp paths
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# ------------------------------------------------------------------------------------------------ network
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
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
    """Send one line, return the first reply line. With ``retry``, a refused connection (nothing listening
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


# ------------------------------------------------------------------------------------------------ export stream
def record(kind: int, payload: bytes) -> bytes:
    """One stream record: u8 type, u32 length, payload, u32 CRC-32 of (type, length, payload)."""
    head = struct.pack("<BI", kind, len(payload))
    return head + payload + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head)))


# What the end record's SHA-256 covers; detected from what the daemon wrote (the format has had both).
DIGEST_SCHEMES = {
    "every byte": lambda raw: raw,                       # each record whole
    "record framing": lambda raw: raw[:5] + raw[-4:],    # each record's type, length and CRC-32
}


@dataclass
class Export:
    """A parsed `snapshot export` stream: header bytes, records (type, payload) without the end record."""

    head: bytes
    records: list[tuple[int, bytes]]
    offsets: list[int]  # byte offset of each record (and of the end record, last)
    scheme: str = "every byte"

    @classmethod
    def parse(cls, data: bytes) -> Export:
        (wlen,) = struct.unpack_from("<H", data, 10)
        pos = 12 + wlen
        (flen,) = struct.unpack_from("<H", data, pos)
        pos += 2 + flen
        head = data[:pos]
        records, offsets = [], []
        while True:
            offsets.append(pos)
            kind, length = struct.unpack_from("<BI", data, pos)
            payload = data[pos + 5:pos + 5 + length]
            pos += 5 + length + 4
            if kind == 255:
                end = payload
                break
            records.append((kind, payload))
        assert pos == len(data), "trailing bytes after the end record"
        ex = cls(head, records, offsets)
        for name in DIGEST_SCHEMES:
            ex.scheme = name
            if ex.end_digest() == end:
                return ex
        raise AssertionError("the export's end digest matches no known scheme: update tests/snapshot/snaphelp.py")

    def end_digest(self) -> bytes:
        cover = DIGEST_SCHEMES[self.scheme]
        d = hashlib.sha256(self.head)
        for kind, payload in self.records:
            d.update(cover(record(kind, payload)))
        return d.digest()

    def build(self) -> bytes:
        """Re-encode with valid CRCs and end digest (so only what the test changed is wrong)."""
        return self.head + b"".join(record(k, p) for k, p in self.records) + record(255, self.end_digest())

    def manifest(self) -> dict[str, Any]:
        from microvmd.snapshot import store

        kw = {"stored": False} if "stored" in inspect.signature(store.decode_manifest).parameters else {}
        return store.decode_manifest(self.records[0][1], "test", **kw)

    def with_manifest(self, m: dict[str, Any]) -> Export:
        from microvmd.snapshot import store

        recs = list(self.records)
        recs[0] = (1, store.encode_manifest(m))
        return Export(self.head, recs, [], self.scheme)


# ------------------------------------------------------------------------------------------------ guests
BUSY_C = r"""
/* busy: an Asyncify (SDK) guest that computes forever without ever reaching a suspension point. */
#include <microvm.h>
#include <stdio.h>
int main(void) {
    printf("busy start\n");
    fflush(stdout);
    volatile unsigned long long x = 1;
    for (;;) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    return 0;
}
"""

BIG_C = r"""
/* bigcounter: fills MEM_MB MiB with pseudo-random bytes (no two chunks alike), then counts like
 * images/counter, dirtying one 4 KiB page per tick; CHURN=1 refills the whole buffer every tick, so
 * every snapshot has MEM_MB MiB of new chunks. */
#include <microvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static unsigned long long s;
static void fill(unsigned char *buf, size_t n) {
    for (size_t i = 0; i < n; i += 8) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        memcpy(buf + i, &s, 8);
    }
}
int main(void) {
    long mb = mv_env_int("MEM_MB", 4);
    long interval = mv_env_int("INTERVAL_MS", 20);
    long churn = mv_env_int("CHURN", 0);
    size_t n = (size_t)mb << 20;
    unsigned char *buf = malloc(n);
    if (!buf) { printf("alloc failed\n"); return 1; }
    s = 88172645463325252ULL ^ (unsigned long long)mv_env_int("SEED", 1);
    fill(buf, n);
    printf("filled %ld MiB\n", mb);
    fflush(stdout);
    for (unsigned long long i = 1;; i++) {
        if (churn) fill(buf, n); else buf[(i * 4096) % n] ^= 1;
        printf("%llu\n", i);
        fflush(stdout);
        mv_sleep_ms((int)interval);
    }
    return 0;
}
"""

# Serves one client at a time, blocking in mv_accept (a suspension point) between clients.
GREET_C = r"""
#include <errno.h>
#include <microvm.h>
#include <stdio.h>
#include <string.h>
int main(void) {
    int port = (int)mv_env_int("PORT", 8000);
    int lsd = mv_listen(port, 16);
    if (lsd < 0) { mv_log("listen: %s", strerror(errno)); return 1; }
    mv_log("listening on port %d", port);
    for (int n = 1;; n++) {
        int sd = mv_accept(lsd);
        printf("accepted %d\n", n);
        fflush(stdout);
        if (sd < 0) continue;
        char line[256];
        while (mv_recv_line(sd, line, sizeof line) > 0) {
            char out[300];
            snprintf(out, sizeof out, "hello %d, %s\n", n, line);
            mv_send_all(sd, out, strlen(out));
        }
        mv_close(sd);
    }
}
"""


def build_guests(out: Path) -> dict[str, Path] | str:
    """Build the test guests with guest-sdk/mvcc; a string says why they could not be built."""
    mvcc = REPO / "guest-sdk" / "mvcc"
    for tool in ("clang", "wasm-opt"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: cannot build test guests with guest-sdk/mvcc"
    built = {}
    for name, src in (("busy", BUSY_C), ("bigcounter", BIG_C), ("greet", GREET_C)):
        c = out / f"{name}.c"
        c.write_text(src)
        wasm = out / f"{name}.wasm"
        r = subprocess.run([str(mvcc), "-o", str(wasm), str(c)], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            return f"guest-sdk/mvcc cannot build {name}: {r.stderr[-500:]}"
        built[name] = wasm
    return built


def make_tls(out: Path) -> tuple[Path, Path] | str:
    """A self-signed certificate for 127.0.0.1 (and any extra IPs); a string says why not."""
    if shutil.which("openssl") is None:
        return "the openssl CLI is not installed: cannot make a self-signed certificate"
    return make_cert(out, ["127.0.0.1"])


def make_cert(out: Path, ips: list[str]) -> tuple[Path, Path] | str:
    cert, key = out / "cert.pem", out / "key.pem"
    san = ",".join([f"IP:{ip}" for ip in ips] + ["DNS:localhost"])
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "2", "-subj", f"/CN={ips[0]}", "-addext",
                        f"subjectAltName={san}"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return f"openssl could not make a certificate: {r.stderr[-300:]}"
    return cert, key
