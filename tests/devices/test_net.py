"""The socket device ``microvm_net`` end to end: a real ``microvmd`` subprocess, the real client and raw
HTTP over its Unix socket, real TCP on 127.0.0.1, the sample guests (echo, fetch) and hand-written WAT
guests that call the ABI (guest-sdk/ABI.md) directly, hostile arguments included.

Every guest result is checked from the outside: WAT guests print one decimal per line on stdout (and
exit with proc_exit), sample guests answer on real sockets.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mvapi
import pytest
from mvapi import IMAGES, WAT_PRINT, free_port, line_rpc, wait_port
from mvapi import wat_repeat as repeat
from prometheus_client.parser import text_string_to_metric_families

# WASI errno numbers (ABI.md)
EAGAIN, EBADF, ECONNREFUSED, EFAULT, EINVAL, EMFILE = 6, 8, 14, 21, 28, 33
POLLIN, POLLOUT, POLLERR, POLLHUP = 1, 4, 8, 16


# ================================================================================================ harness
class Daemon(mvapi.Daemon):
    """A real ``microvmd`` child process (mvapi.Daemon) with the socket tests' helpers."""

    def vm(self, image: str, **spec: Any) -> dict[str, Any]:
        status, doc = self.call("POST", "/v1/vms", {"image": image, "start": True, **spec})
        assert status == 201, doc
        return doc  # type: ignore[no-any-return]

    def rm(self, ref: str) -> None:
        self.ok("DELETE", f"/v1/vms/{ref}?force=true")

    def wait_stdout_lines(self, ref: str, n: int, timeout: float = 20.0) -> list[str]:
        end = time.monotonic() + timeout
        while True:
            lines = self.logs(ref).splitlines()
            if len(lines) >= n:
                return lines
            assert time.monotonic() < end, (lines, self.get(ref)["state"], self.logs(ref, "stderr"))
            time.sleep(0.02)

    def net(self, ref: str) -> dict[str, Any]:
        return self.get(ref)["devices"]["net"]  # type: ignore[no-any-return]

    def metric(self, vm_id: str, counter: str) -> int | None:
        text = self.ok("GET", "/metrics")
        assert isinstance(text, str)
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "microvmd_net_total" and s.labels == {"vm": vm_id[:12], "counter": counter}:
                    return int(s.value)
        return None


@pytest.fixture(scope="module")
def mvd() -> Iterator[Daemon]:
    with Daemon.fresh("mvnet-", "--import-images", str(IMAGES)) as d:
        yield d


def host_port(d: Daemon, ref: str, guest_port: int | None = None) -> int:
    pub = d.net(ref)["published"]
    for p in pub:
        if guest_port is None or p["guest_port"] == guest_port:
            return int(p["host_port"])
    raise AssertionError(pub)


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        d = s.recv(n - len(buf))
        if not d:
            raise AssertionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += d
    return bytes(buf)


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (as far as we can tell)."""
    return free_port()


class CountingServer:
    """A real TCP listener on 127.0.0.1 that counts accepted connections and answers ``pong``."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.count = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.count += 1
            with c:
                c.settimeout(2)
                try:
                    c.recv(100)
                    c.sendall(b"pong\n")
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._t.join(5)
        self.sock.close()


@pytest.fixture
def counting() -> Iterator[CountingServer]:
    srv = CountingServer()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def echo_vm(mvd: Daemon) -> Iterator[tuple[str, int]]:
    """One echo VM on a published port chosen by the daemon (host port 0)."""
    r = mvd.cli("run", "-d", "--name", "net-echo", "--publish", "127.0.0.1:0:8000", "echo")
    assert r.returncode == 0, r.stderr
    vm_id = r.stdout.strip()
    mvd.wait_blocked(vm_id, "net_poll")
    port = host_port(mvd, vm_id, 8000)
    wait_port(port)
    yield vm_id, port
    mvd.rm(vm_id)


# ------------------------------------------------------------------------------------ WAT guest builder
# Imports every microvm_net call plus WASI fd_write/proc_exit/clock_time_get and microvm.sleep_ms.
# Helpers: ($n32 v) prints v as a decimal line on stdout; ($now_ms) is the monotonic clock in ms;
# ($hold) sleeps forever (a suspended guest holds no thread). Memory: 2 pages (131072 bytes);
# 0..63 scratch for the helpers, 1024.. strings (data), 2048.. poll entries, 4096.. buffers.
MEM = 131072


def wat_guest(body: str, data: str = "", locals_: str = "") -> str:
    return f"""
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "microvm" "sleep_ms" (func $sleep (param i32) (result i32)))
  (import "microvm_net" "net_listen" (func $listen (param i32 i32) (result i32)))
  (import "microvm_net" "net_accept" (func $accept (param i32 i32) (result i32)))
  (import "microvm_net" "net_connect" (func $connect (param i32 i32 i32 i32) (result i32)))
  (import "microvm_net" "net_send" (func $send (param i32 i32 i32 i32) (result i32)))
  (import "microvm_net" "net_recv" (func $recv (param i32 i32 i32 i32) (result i32)))
  (import "microvm_net" "net_close" (func $close (param i32) (result i32)))
  (import "microvm_net" "net_poll" (func $poll (param i32 i32 i32) (result i32)))
  (import "microvm_net" "net_poll_recv" (func $pollrx (param i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "microvm_abi_version") (result i32) (i32.const 1))
{WAT_PRINT}
  (func $now_ms (result i32)
    (drop (call $clock (i32.const 1) (i64.const 1000) (i32.const 56)))
    (i32.wrap_i64 (i64.div_u (i64.load (i32.const 56)) (i64.const 1000000))))
  (func $hold (loop $forever (drop (call $sleep (i32.const 600000))) (br $forever)))
  (func (export "_start") (local $i i32) (local $n i32) (local $r i32) (local $sd i32) (local $c i32)
    (local $t i32) (local $first i32) {locals_}
{body})
  {data})
"""


def p(expr: str) -> str:
    """Print the value of an i32 expression on its own line."""
    return f"(call $n32 {expr})"


def run_wat(d: Daemon, name: str, wat: str, timeout: float = 60.0, **spec: Any) -> tuple[dict[str, Any], list[int]]:
    """Run a WAT guest to its end; its exit record and the numbers it printed."""
    vm = d.vm(d.image(name, wat), **spec)
    ex = d.wait(vm["id"], timeout)
    out = d.logs(vm["id"])
    assert ex["reason"] == "exit", (ex, out, d.logs(vm["id"], "stderr"))
    nums = [int(x) for x in out.split()]
    d.rm(vm["id"])
    return ex, nums


# ================================================================================================ inbound
def test_echo_published_port_50_concurrent_clients(mvd: Daemon, echo_vm: tuple[str, int]) -> None:
    vm_id, port = echo_vm
    before = mvd.net(vm_id)["stats"]["connections_in"]
    rounds = 10

    def client(k: int) -> int:
        rng = random.Random(k)
        with socket.create_connection(("127.0.0.1", port), 10) as s:
            s.settimeout(20)
            for j in range(rounds):
                msg = f"client {k} round {j} {rng.randbytes(rng.randint(1, 200)).hex()}\n".encode()
                s.sendall(msg)
                got = recv_exact(s, len(msg))
                assert got == msg, (k, j)
        return rounds

    with ThreadPoolExecutor(50) as pool:
        done = list(pool.map(client, range(50)))
    assert done == [rounds] * 50
    stats = mvd.net(vm_id)["stats"]
    assert stats["connections_in"] - before >= 50
    assert stats["bytes_in"] > 0 and stats["bytes_out"] > 0


def test_host_port_zero_is_chosen_shown_in_inspect_and_answers(mvd: Daemon, echo_vm: tuple[str, int]) -> None:
    vm_id, port = echo_vm
    doc = mvd.inspect("net-echo")  # the real client, by name
    pub = doc["devices"]["net"]["published"]
    assert pub == [{"host_ip": "127.0.0.1", "host_port": port, "guest_port": 8000}]
    assert 0 < port < 65536
    assert line_rpc(port, "hello through port zero") == "hello through port zero"
    assert doc["blocked_in"] == "net_poll"


def test_echo_streams_megabytes_in_order_with_backpressure(mvd: Daemon, echo_vm: tuple[str, int]) -> None:
    """4 MiB streamed while reading concurrently comes back byte for byte; a client that never reads
    is throttled (the daemon does not buffer without bound) and still gets every byte later."""
    _, port = echo_vm
    payload = random.Random(7).randbytes(4 << 20)
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        s.settimeout(30)
        t = threading.Thread(target=s.sendall, args=(payload,))
        t.start()
        got = recv_exact(s, len(payload))
        t.join(30)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()

    # a writer that does not read: the echo guest stops reading it, the daemon pauses the transport
    chunk = bytes(range(256)) * 256  # 64 KiB
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        s.setblocking(False)
        sent = 0
        end = time.monotonic() + 3.0
        stalled_since = None
        while time.monotonic() < end:
            try:
                sent += s.send(chunk[sent % len(chunk):] if sent % len(chunk) else chunk)
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 0.5:
                    break
                time.sleep(0.01)
        # kernel buffers both ways plus the daemon's bounded per-socket buffers, far below this
        print(f"client that never reads: {sent} bytes accepted before the sender stalled")
        assert sent < 48 << 20, f"{sent} bytes accepted from a client that never reads"
        s.setblocking(True)
        s.settimeout(30)
        back = recv_exact(s, sent)
    expect = (chunk * (sent // len(chunk) + 1))[:sent]
    assert back == expect


def test_half_closed_client_still_gets_its_echo(mvd: Daemon, echo_vm: tuple[str, int]) -> None:
    _, port = echo_vm
    for i in range(5):
        with socket.create_connection(("127.0.0.1", port), 10) as s:
            s.settimeout(10)
            s.sendall(b"half %d\n" % i)
            s.shutdown(socket.SHUT_WR)
            buf = b""
            while True:
                d = s.recv(4096)
                if not d:
                    break
                buf += d
        assert buf == b"half %d\n" % i


def test_publish_conflict_and_port_released_after_stop(mvd: Daemon) -> None:
    port = free_port()
    a = mvd.cli("run", "-d", "--publish", f"127.0.0.1:{port}:8000", "echo")
    assert a.returncode == 0, a.stderr
    a_id = a.stdout.strip()
    wait_port(port)
    # the same host port twice: the API refuses it, nothing half-created is left
    b = mvd.cli("run", "-d", "--publish", f"127.0.0.1:{port}:8000", "echo")
    assert b.returncode == 125 and "port" in b.stderr.lower(), (b.returncode, b.stderr)
    assert line_rpc(port, "still the first") == "still the first"
    t0 = time.monotonic()
    assert mvd.cli("stop", a_id).returncode == 0
    assert time.monotonic() - t0 < 5
    end = time.monotonic() + 5
    while True:  # unbound: nothing answers there any more
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
        except OSError:
            break
        assert time.monotonic() < end, "published port still open after stop"
        time.sleep(0.05)
    c = mvd.cli("run", "-d", "--publish", f"127.0.0.1:{port}:8000", "echo")
    assert c.returncode == 0, c.stderr
    wait_port(port)
    assert line_rpc(port, "second tenant") == "second tenant"
    mvd.rm(a_id)
    mvd.rm(c.stdout.strip())


def test_listener_backlog_is_bounded_and_overflow_is_dropped(mvd: Daemon) -> None:
    """A guest that listens but never accepts: connections queue up to the backlog, the rest are closed
    by the daemon and counted as dropped; queued ones are served once the guest accepts."""
    body = f"""
    (local.set $sd (call $listen (i32.const 9000) (i32.const 4)))
    {p("(local.get $sd)")}
    (drop (call $sleep (i32.const 1500)))
    ;; now accept and echo one message on every queued connection, then exit
    (block $empty (loop $more
      (local.set $c (call $accept (local.get $sd) (i32.const 1)))
      (br_if $empty (i32.lt_s (local.get $c) (i32.const 0)))
      (local.set $r (call $recv (local.get $c) (i32.const 4096) (i32.const 100) (i32.const 0)))
      (if (i32.gt_s (local.get $r) (i32.const 0))
        (then (drop (call $send (local.get $c) (i32.const 4096) (local.get $r) (i32.const 0)))))
      (drop (call $close (local.get $c)))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br $more)))
    {p("(local.get $n)")}
    (call $exit (i32.const 0))"""
    vm = mvd.vm(mvd.image("net-backlog", wat_guest(body)), publish=[{"guest_port": 9000, "host_port": 0}])
    mvd.wait_blocked(vm["id"], "sleep_ms")
    port = host_port(mvd, vm["id"])
    total = 160
    socks = [socket.create_connection(("127.0.0.1", port), 5) for _ in range(total)]
    try:
        for i, s in enumerate(socks):
            s.sendall(b"c%03d" % i)
        end = time.monotonic() + 10
        while mvd.net(vm["id"])["stats"]["connections_in"] < total:
            assert time.monotonic() < end, mvd.net(vm["id"])
            time.sleep(0.02)
        stats = mvd.net(vm["id"])["stats"]
        backlog = total - stats["dropped"]
        assert 0 < stats["dropped"] < total and 1 <= backlog <= 128, stats
        answered, closed = 0, 0
        for i, s in enumerate(socks):
            s.settimeout(15)
            try:
                got = s.recv(100)
            except ConnectionResetError:
                got = b""
            if got:
                assert got == b"c%03d" % i
                answered += 1
            else:
                closed += 1
        assert answered == backlog and closed == stats["dropped"], (answered, closed, stats)
    finally:
        for s in socks:
            s.close()
    ex = mvd.wait(vm["id"])
    assert ex["code"] == 0 and mvd.logs(vm["id"]).split()[-1] == str(backlog)
    mvd.rm(vm["id"])


def test_connections_before_the_guest_listens_are_kept(mvd: Daemon) -> None:
    body = f"""
    (drop (call $sleep (i32.const 400)))
    (local.set $sd (call $listen (i32.const 9000) (i32.const 4)))
    (local.set $c (call $accept (local.get $sd) (i32.const 0)))
    (local.set $r (call $recv (local.get $c) (i32.const 4096) (i32.const 100) (i32.const 0)))
    {p("(call $send (local.get $c) (i32.const 4096) (local.get $r) (i32.const 0))")}
    (call $hold)"""
    vm = mvd.vm(mvd.image("net-early", wat_guest(body)), publish=[{"guest_port": 9000, "host_port": 0}])
    port = host_port(mvd, vm["id"])
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.settimeout(10)
        s.sendall(b"early bird")
        assert mvd.get(vm["id"])["blocked_in"] in ("sleep_ms", None)
        assert recv_exact(s, 10) == b"early bird"
    assert mvd.wait_stdout_lines(vm["id"], 1) == ["10"]
    mvd.rm(vm["id"])


# ================================================================================================ egress
def test_egress_denied_by_default_never_reaches_target(mvd: Daemon, counting: CountingServer) -> None:
    target = f"127.0.0.1:{counting.port}"
    time.sleep(0.1)
    before = counting.count
    r = mvd.cli("run", "-d", "--env", f"TARGET={target}", "fetch")
    assert r.returncode == 0, r.stderr
    vm_id = r.stdout.strip()
    ex = mvd.wait(vm_id)
    assert ex["code"] == 1, ex
    assert "Connection refused" in mvd.logs(vm_id, "stderr")
    time.sleep(0.3)
    assert counting.count == before, "a denied connection reached the target"
    stats = mvd.inspect(vm_id)["devices"]["net"]["stats"]
    assert stats["refused"] == 1 and stats["bytes_out"] == 0, stats
    mvd.rm(vm_id)
    # the same through the attached client: non-zero exit
    r = mvd.cli("run", "--rm", "--env", f"TARGET={target}", "fetch")
    assert r.returncode != 0 and "Connection refused" in r.stderr, (r.returncode, r.stdout, r.stderr)
    time.sleep(0.2)
    assert counting.count == before


@pytest.mark.parametrize("rule", ["127.0.0.1:{port}", "127.0.0.0/8:{port}", "127.0.0.1:*"])
def test_egress_allowed_by_rule(mvd: Daemon, counting: CountingServer, rule: str) -> None:
    before = counting.count
    r = mvd.cli("run", "--rm", "--env", f"TARGET=127.0.0.1:{counting.port}",
                "--allow-egress", rule.format(port=counting.port), "fetch")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "pong" in r.stdout
    assert counting.count == before + 1


@pytest.mark.parametrize("rule", ["127.0.0.1:{other}", "127.0.0.0/8:{other}", "10.0.0.0/8:{port}",
                                  "127.0.0.2:{port}"])
def test_egress_rule_for_something_else_denies(mvd: Daemon, counting: CountingServer, rule: str) -> None:
    other = counting.port + 1 if counting.port < 65535 else counting.port - 1
    before = counting.count
    r = mvd.cli("run", "--rm", "--env", f"TARGET=127.0.0.1:{counting.port}",
                "--allow-egress", rule.format(port=counting.port, other=other), "fetch")
    assert r.returncode != 0 and "Connection refused" in r.stderr, (r.returncode, r.stdout, r.stderr)
    time.sleep(0.2)
    assert counting.count == before


def test_bad_egress_rule_is_a_usage_error(mvd: Daemon) -> None:
    for rule in ("127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "not a host!:80"):
        r = mvd.cli("create", "--allow-egress", rule, "fetch")
        assert r.returncode in (2, 125) and r.stderr.strip(), (rule, r.returncode, r.stderr)
    vms = mvd.ok("GET", "/v1/vms?all=true")["vms"]
    assert not [v for v in vms if v.get("image") == "fetch" and v["state"] == "created"]


def test_daemon_own_published_ports_are_never_reachable(mvd: Daemon, echo_vm: tuple[str, int]) -> None:
    echo_id, port = echo_vm
    before = mvd.net(echo_id)["stats"]["connections_in"]
    for rule in (f"127.0.0.1:{port}", f"127.0.0.0/8:{port}", "127.0.0.1:*", "0.0.0.0/0:*"):
        r = mvd.cli("run", "-d", "--env", f"TARGET=127.0.0.1:{port}", "--allow-egress", rule, "fetch")
        assert r.returncode == 0, r.stderr
        vm_id = r.stdout.strip()
        ex = mvd.wait(vm_id)
        assert ex["code"] == 1, (rule, ex, mvd.logs(vm_id))
        assert "Connection refused" in mvd.logs(vm_id, "stderr")
        assert mvd.net(vm_id)["stats"]["refused"] == 1
        mvd.rm(vm_id)
    assert mvd.net(echo_id)["stats"]["connections_in"] == before


def test_own_ports_not_reachable_through_unspecified_address(mvd: Daemon, echo_vm: tuple[str, int]) -> None:
    echo_id, port = echo_vm
    before = mvd.net(echo_id)["stats"]["connections_in"]
    r = mvd.cli("run", "--rm", "--env", f"TARGET=0.0.0.0:{port}", "--allow-egress", f"0.0.0.0/0:{port}", "fetch")
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert mvd.net(echo_id)["stats"]["connections_in"] == before


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 on this host")
def test_own_ports_not_reachable_through_ipv4_mapped_ipv6(mvd: Daemon, echo_vm: tuple[str, int]) -> None:
    echo_id, port = echo_vm
    before = mvd.net(echo_id)["stats"]["connections_in"]
    r = mvd.cli("run", "--rm", "--env", f"TARGET=[::ffff:127.0.0.1]:{port}", "--allow-egress", f"::/0:{port}",
                "fetch")
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert mvd.net(echo_id)["stats"]["connections_in"] == before


def test_wildcard_remote_api_port_is_refused_by_policy(tmp_path: Path) -> None:
    """The daemon's own TLS API, bound to 0.0.0.0, is not reachable from a guest at 127.0.0.1."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed: cannot make a self-signed certificate")
    cert, key, token = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "token"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    token.write_text("0123456789abcdef0123456789abcdef")
    gw = free_port()
    with Daemon.fresh("mvnet-", "--listen", f"0.0.0.0:{gw}", "--tls-cert", str(cert), "--tls-key", str(key),
                      "--token-file", str(token)) as d:
        d.ok("POST", "/v1/images?name=fetch", raw=(IMAGES / "fetch" / "fetch.wasm").read_bytes())
        vm = d.vm("fetch", env={"TARGET": f"127.0.0.1:{gw}"}, allow_egress=[f"127.0.0.1:{gw}"])
        ex = d.wait(vm["id"])
        assert ex["code"] != 0, d.logs(vm["id"])
        # refused by policy (counted), not merely by the OS because nothing listens there
        assert d.net(vm["id"])["stats"]["refused"] == 1


# ================================================================================================ hostile guests
def call(fn: str, *args: int | str) -> str:
    """``(call $fn ...)``: ints become i32 constants, strings are WAT expressions."""
    return f"(call ${fn} " + " ".join(f"(i32.const {a})" if isinstance(a, int) else a for a in args) + ")"


C = "(local.get $c)"  # the accepted connection in the hostile guest
HOSTILE_EXPECT: list[tuple[str, str, int]] = [
    # (what, call, expected result)
    ("send ptr past memory", call("send", C, 0x7fff0000, 10, 0), -EFAULT),
    ("send straddles the end", call("send", C, MEM - 4, 10, 0), -EFAULT),
    ("send negative ptr", call("send", C, -16, 4, 0), -EFAULT),
    ("send huge len", call("send", C, 4096, 0x7fffffff, 0), -EFAULT),
    ("send negative len", call("send", C, 4096, -1, 0), -EINVAL),
    ("recv ptr past memory", call("recv", C, 0x7fff0000, 10, 0), -EFAULT),
    ("recv straddles the end", call("recv", C, MEM - 4, 10, 0), -EFAULT),
    ("recv negative ptr", call("recv", C, -16, 4, 0), -EFAULT),
    ("recv huge len", call("recv", C, 4096, 0x7fffffff, 0), -EFAULT),
    ("recv negative len", call("recv", C, 4096, -5, 0), -EINVAL),
    ("poll fds past memory", call("poll", 0x7fff0000, 1, 0), -EFAULT),
    ("poll fds straddle the end", call("poll", MEM - 4, 1, 0), -EFAULT),
    ("poll negative fds ptr", call("poll", -8, 1, 0), -EFAULT),
    ("poll negative nfds", call("poll", 2048, -1, 0), -EINVAL),
    ("poll huge nfds", call("poll", 2048, 0x7fffffff, 0), -EINVAL),
    ("connect host past memory", call("connect", 0x7fff0000, 9, 80, 0), -EFAULT),
    ("connect host straddles", call("connect", MEM - 4, 9, 80, 0), -EFAULT),
    ("connect huge host len", call("connect", 1024, 0x7fffffff, 80, 0), -EINVAL),
    ("connect negative host len", call("connect", 1024, -1, 80, 0), -EINVAL),
    ("connect port 0", call("connect", 1024, 9, 0, 0), -EINVAL),
    ("connect port 70000", call("connect", 1024, 9, 70000, 0), -EINVAL),
    ("listen port 0", call("listen", 0, 1), -EINVAL),
    ("listen port 70000", call("listen", 70000, 1), -EINVAL),
    ("listen negative port", call("listen", -1, 1), -EINVAL),
    ("listen twice", call("listen", 9000, 1), -3),  # EADDRINUSE
    ("send bad sd", call("send", 999, 4096, 1, 0), -EBADF),
    ("send negative sd", call("send", -1, 4096, 1, 0), -EBADF),
    ("recv bad sd", call("recv", 999, 4096, 1, 0), -EBADF),
    ("accept bad sd", call("accept", 999, 0), -EBADF),
    ("accept on a connection", call("accept", C, 1), -EBADF),
    ("close bad sd", call("close", 999), -EBADF),
    ("close sd 0", call("close", 0), -EBADF),
    ("connect forbidden", call("connect", 1024, 9, 9, 0), -ECONNREFUSED),
]


def test_hostile_arguments_get_errnos_never_traps(mvd: Daemon) -> None:
    checks = "\n".join(f"    {p(call)}  ;; {what}" for what, call, _ in HOSTILE_EXPECT)
    body = f"""
    (local.set $sd (call $listen (i32.const 9000) (i32.const 4)))
    {p("(local.get $sd)")}
    (local.set $c (call $accept (local.get $sd) (i32.const 0)))
    {p("(local.get $c)")}
{checks}
    ;; a bad descriptor in poll: POLLERR, counted; a negative one is ignored
    (i32.store (i32.const 2048) (i32.const 999))
    (i32.store16 (i32.const 2052) (i32.const 1))
    (i32.store16 (i32.const 2054) (i32.const 0))
    (i32.store (i32.const 2056) (i32.const -1))
    (i32.store16 (i32.const 2060) (i32.const 1))
    (i32.store16 (i32.const 2062) (i32.const 0))
    {p("(call $poll (i32.const 2048) (i32.const 2) (i32.const 0))")}
    {p("(i32.load16_s (i32.const 2054))")}
    {p("(i32.load16_s (i32.const 2062))")}
    ;; after all that, the connection still works: echo one line back
    (local.set $n (call $recv (local.get $c) (i32.const 4096) (i32.const 100) (i32.const 0)))
    {p("(local.get $n)")}
    {p("(call $send (local.get $c) (i32.const 4096) (local.get $n) (i32.const 0))")}
    {p("(call $close (local.get $c))")}
    {p("(call $close (local.get $c))")}
    {p("(call $send (local.get $c) (i32.const 4096) (i32.const 1) (i32.const 0))")}
    (call $exit (i32.const 7))"""
    wat = wat_guest(body, data='(data (i32.const 1024) "127.0.0.1")')
    vm = mvd.vm(mvd.image("net-hostile", wat), publish=[{"guest_port": 9000, "host_port": 0}])
    mvd.wait_blocked(vm["id"], "net_accept")
    port = host_port(mvd, vm["id"])
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        s.settimeout(20)
        mvd.wait_stdout_lines(vm["id"], 2 + len(HOSTILE_EXPECT))
        s.sendall(b"still alive\n")
        assert recv_exact(s, 12) == b"still alive\n"
    ex = mvd.wait(vm["id"])
    assert ex["reason"] == "exit" and ex["code"] == 7, (ex, mvd.logs(vm["id"], "stderr"))
    nums = [int(x) for x in mvd.logs(vm["id"]).split()]
    assert nums[0] >= 0 and nums[1] >= 0 and nums[0] != nums[1]
    got = dict(zip([w for w, _, _ in HOSTILE_EXPECT], nums[2:], strict=False))
    want = {w: e for w, _, e in HOSTILE_EXPECT}
    assert got == want
    tail = nums[2 + len(HOSTILE_EXPECT):]
    assert tail == [1, POLLERR, 0, 12, 12, 0, -EBADF, -EBADF], tail
    mvd.rm(vm["id"])


def test_emfile_after_the_per_vm_limit_others_keep_working(mvd: Daemon, echo_vm: tuple[str, int]) -> None:
    """Thousands of listeners: -EMFILE after the per-VM limit; closing one frees a slot; the daemon, the
    API and another VM's echo keep working meanwhile."""
    body = f"""
    (local.set $first (i32.const 0))
    {repeat(3000, '''
      (local.set $r (call $listen (i32.add (i32.const 10000) (local.get $i)) (i32.const 8)))
      (if (i32.ge_s (local.get $r) (i32.const 0))
        (then (local.set $n (i32.add (local.get $n) (i32.const 1))) (local.set $sd (local.get $r)))
        (else (if (i32.eqz (local.get $first)) (then (local.set $first (local.get $r))))))''')}
    {p("(local.get $n)")}
    {p("(local.get $first)")}
    {p("(call $close (local.get $sd))")}
    {p("(i32.ge_s (call $listen (i32.const 9999) (i32.const 8)) (i32.const 0))")}
    {p("(call $listen (i32.const 9998) (i32.const 8))")}
    (call $hold)"""
    vm = mvd.vm(mvd.image("net-emfile", wat_guest(body)))
    nums = [int(x) for x in mvd.wait_stdout_lines(vm["id"], 5)]
    n, first, closed, again, over = nums
    assert 0 < n < 3000 and first == -EMFILE, nums
    assert closed == 0 and again == 1 and over == -EMFILE, nums
    assert mvd.net(vm["id"])["sockets"] == n
    mvd.wait_blocked(vm["id"], "sleep_ms")
    _, port = echo_vm
    assert line_rpc(port, "unaffected") == "unaffected"
    assert mvd.cli("ps").returncode == 0
    t0 = time.monotonic()
    mvd.rm(vm["id"])
    assert time.monotonic() - t0 < 10


CONNECT_STORM = 300


def test_forbidden_connects_repeatedly_are_refused_and_counted(mvd: Daemon, counting: CountingServer) -> None:
    """A guest hammering forbidden addresses: every call is -ECONNREFUSED, nothing reaches the target, each
    refusal is counted in inspect and /metrics while the VM lives."""
    port = counting.port
    body = f"""
    {repeat(CONNECT_STORM, f'''
      (local.set $r (call $connect (i32.const 1024) (i32.const 9) (i32.const {port}) (i32.const 0)))
      (if (i32.eq (local.get $r) (i32.const -14)) (then (local.set $n (i32.add (local.get $n) (i32.const 1)))))
      (local.set $r (call $connect (i32.const 1040) (i32.const 15) (i32.const 80) (i32.const 0)))
      (if (i32.eq (local.get $r) (i32.const -14)) (then (local.set $c (i32.add (local.get $c) (i32.const 1)))))''')}
    {p("(local.get $n)")}
    {p("(local.get $c)")}
    (call $hold)"""
    wat = wat_guest(body, data='(data (i32.const 1024) "127.0.0.1") (data (i32.const 1040) "169.254.169.254")')
    before = counting.count
    vm = mvd.vm(mvd.image(f"net-storm-{port}", wat))
    nums = [int(x) for x in mvd.wait_stdout_lines(vm["id"], 2, timeout=60)]
    assert nums == [CONNECT_STORM, CONNECT_STORM]
    stats = mvd.net(vm["id"])["stats"]
    assert stats["refused"] == 2 * CONNECT_STORM, stats
    assert mvd.net(vm["id"])["sockets"] == 0  # refused descriptors are not left behind
    assert mvd.metric(vm["id"], "refused") == 2 * CONNECT_STORM
    time.sleep(0.2)
    assert counting.count == before
    mvd.rm(vm["id"])


def test_refused_connects_can_neither_forge_nor_flood_the_daemon_log(mvd: Daemon) -> None:
    """Issue 13 row 4: a guest-chosen host name with a newline started a line of its own in the daemon's
    log, and a guest refused in a loop logged megabytes. The host is escaped; a few refusals per VM and
    window are logged, the rest counted (microvmd_log_suppressed_total; each refusal in `refused`)."""
    body = f"""
    {repeat(CONNECT_STORM, '(drop (call $connect (i32.const 1024) (i32.const 22) (i32.const 80) (i32.const 0)))')}
    {p("(i32.const 1)")}
    (call $hold)"""
    wat = wat_guest(body, data='(data (i32.const 1024) "10.0.0.1\\0aFORGED-LINE x")')
    vm = mvd.vm(mvd.image("net-forge", wat))
    try:
        mvd.wait_stdout_lines(vm["id"], 1, timeout=60)
        assert mvd.net(vm["id"])["stats"]["refused"] == CONNECT_STORM
        log = mvd.log()
        assert not [line for line in log.splitlines() if line.startswith("FORGED")]
        mine = [line for line in log.splitlines() if f"vm={vm['id'][:12]}" in line and "refused" in line]
        assert 1 <= len(mine) <= 10, mine[:12]
        assert "\\nFORGED-LINE" in mine[0]
        text = mvd.ok("GET", "/metrics")
        suppressed = [s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                      if s.name == "microvmd_log_suppressed_total"]
        assert suppressed and suppressed[0] >= CONNECT_STORM - 10
    finally:
        mvd.rm(vm["id"])


def test_refusals_by_host_name_are_counted(mvd: Daemon) -> None:
    body = f"""
    {repeat(20, '(drop (call $connect (i32.const 1024) (i32.const 9) (i32.const 80) (i32.const 0)))')}
    {p("(i32.const 1)")}
    (call $hold)"""
    vm = mvd.vm(mvd.image("net-name-refused", wat_guest(body, data='(data (i32.const 1024) "localhost")')))
    try:
        mvd.wait_stdout_lines(vm["id"], 1)
        assert mvd.net(vm["id"])["stats"]["refused"] == 20
    finally:
        mvd.rm(vm["id"])


def test_named_egress_rule_does_not_grow_per_connect(mvd: Daemon, counting: CountingServer) -> None:
    port = counting.port
    body = f"""
    {repeat(30, f'''
      (local.set $r (call $connect (i32.const 1024) (i32.const 9) (i32.const {port}) (i32.const 0)))
      (if (i32.ge_s (local.get $r) (i32.const 0))
        (then (local.set $n (i32.add (local.get $n) (i32.const 1))) (drop (call $close (local.get $r)))))''')}
    {p("(local.get $n)")}
    (call $hold)"""
    vm = mvd.vm(mvd.image(f"net-named-{port}", wat_guest(body, data='(data (i32.const 1024) "localhost")')),
                allow_egress=[f"localhost:{port}"])
    try:
        assert mvd.wait_stdout_lines(vm["id"], 1) == ["30"]
        assert len(mvd.net(vm["id"])["egress"]) <= 3, mvd.net(vm["id"])["egress"]
    finally:
        mvd.rm(vm["id"])


# ================================================================================================ blocking
def test_nonblocking_accept_and_recv_return_eagain(mvd: Daemon) -> None:
    body = f"""
    (local.set $sd (call $listen (i32.const 9000) (i32.const 4)))
    {p("(call $accept (local.get $sd) (i32.const 1))")}
    (local.set $c (call $accept (local.get $sd) (i32.const 0)))
    {p("(i32.ge_s (local.get $c) (i32.const 0))")}
    {p("(call $recv (local.get $c) (i32.const 4096) (i32.const 100) (i32.const 1))")}
    {p("(call $recv (local.get $c) (i32.const 4096) (i32.const 100) (i32.const 0))")}
    {p("(call $recv (local.get $c) (i32.const 4096) (i32.const 100) (i32.const 1))")}
    {p("(call $accept (local.get $sd) (i32.const 1))")}
    {p("(call $send (local.get $c) (i32.const 4096) (i32.const 3) (i32.const 1))")}
    {p("(call $recv (local.get $c) (i32.const 4096) (i32.const 100) (i32.const 0))")}
    (call $exit (i32.const 0))"""
    vm = mvd.vm(mvd.image("net-nonblock", wat_guest(body)), publish=[{"guest_port": 9000, "host_port": 0}])
    mvd.wait_blocked(vm["id"], "net_accept")
    assert mvd.logs(vm["id"]).split() == [str(-EAGAIN)]
    port = host_port(mvd, vm["id"])
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        s.settimeout(10)
        mvd.wait_blocked(vm["id"], "net_recv")
        assert mvd.logs(vm["id"]).split() == [str(-EAGAIN), "1", str(-EAGAIN)]
        s.sendall(b"abc")
        assert recv_exact(s, 3) == b"abc"
        s.shutdown(socket.SHUT_WR)
        ex = mvd.wait(vm["id"])
    assert ex["code"] == 0, ex
    assert [int(x) for x in mvd.logs(vm["id"]).split()] == [-EAGAIN, 1, -EAGAIN, 3, -EAGAIN, -EAGAIN, 3, 0]
    mvd.rm(vm["id"])


def test_zero_length_recv_returns_zero_at_once(mvd: Daemon) -> None:
    body = f"""
    (local.set $sd (call $listen (i32.const 9000) (i32.const 4)))
    (local.set $c (call $accept (local.get $sd) (i32.const 0)))
    {p("(call $recv (local.get $c) (i32.const 4096) (i32.const 0) (i32.const 1))")}
    {p("(call $recv (local.get $c) (i32.const 4096) (i32.const 0) (i32.const 0))")}
    (call $exit (i32.const 0))"""
    vm = mvd.vm(mvd.image("net-recv0", wat_guest(body)), publish=[{"guest_port": 9000, "host_port": 0}])
    mvd.wait_blocked(vm["id"], "net_accept")
    try:
        with socket.create_connection(("127.0.0.1", host_port(mvd, vm["id"])), 5):
            ex = mvd.wait(vm["id"], timeout=3)  # no data is ever sent
            assert ex["code"] == 0 and mvd.logs(vm["id"]).split() == ["0", "0"]
    finally:
        mvd.rm(vm["id"])


def test_poll_timeout_returns_zero_after_the_timeout(mvd: Daemon) -> None:
    body = f"""
    (local.set $sd (call $listen (i32.const 9000) (i32.const 4)))
    (i32.store (i32.const 2048) (local.get $sd))
    (i32.store16 (i32.const 2052) (i32.const 1))
    (i32.store16 (i32.const 2054) (i32.const 0))
    ;; nothing ready, 200 ms
    (local.set $t (call $now_ms))
    {p("(call $poll (i32.const 2048) (i32.const 1) (i32.const 200))")}
    {p("(i32.sub (call $now_ms) (local.get $t))")}
    {p("(i32.load16_s (i32.const 2054))")}
    ;; timeout 0: answers at once
    (local.set $t (call $now_ms))
    {p("(call $poll (i32.const 2048) (i32.const 1) (i32.const 0))")}
    {p("(i32.sub (call $now_ms) (local.get $t))")}
    ;; no entries at all: a pure 200 ms wait
    (local.set $t (call $now_ms))
    {p("(call $poll (i32.const 2048) (i32.const 0) (i32.const 200))")}
    {p("(i32.sub (call $now_ms) (local.get $t))")}
    (call $exit (i32.const 0))"""
    _, nums = run_wat(mvd, "net-polltimeout", wat_guest(body))
    r1, t1, rev, r2, t2, r3, t3 = nums
    assert r1 == 0 and rev == 0 and r2 == 0 and r3 == 0, nums
    assert 150 <= t1 <= 3000, nums
    assert t2 <= 100, nums
    assert 150 <= t3 <= 3000, nums


def test_poll_wakes_on_data_and_reports_events(mvd: Daemon) -> None:
    """POLLIN on a listener with a pending connection, POLLIN|POLLOUT on a connection, POLLHUP at EOF."""
    body = f"""
    (local.set $sd (call $listen (i32.const 9000) (i32.const 4)))
    (i32.store (i32.const 2048) (local.get $sd))
    (i32.store16 (i32.const 2052) (i32.const 1))
    {p("(call $poll (i32.const 2048) (i32.const 1) (i32.const -1))")}
    {p("(i32.load16_s (i32.const 2054))")}
    (local.set $c (call $accept (local.get $sd) (i32.const 1)))
    (i32.store (i32.const 2048) (local.get $c))
    (i32.store16 (i32.const 2052) (i32.const 1))
    {p("(call $poll (i32.const 2048) (i32.const 1) (i32.const 10000))")}
    {p("(i32.load16_s (i32.const 2054))")}
    {p("(call $recv (local.get $c) (i32.const 4096) (i32.const 100) (i32.const 0))")}
    (i32.store16 (i32.const 2052) (i32.const 5))
    {p("(call $poll (i32.const 2048) (i32.const 1) (i32.const 0))")}
    {p("(i32.load16_s (i32.const 2054))")}
    (i32.store16 (i32.const 2052) (i32.const 1))
    {p("(call $poll (i32.const 2048) (i32.const 1) (i32.const 10000))")}
    {p("(i32.and (i32.load16_s (i32.const 2054)) (i32.const 16))")}
    {p("(call $recv (local.get $c) (i32.const 4096) (i32.const 100) (i32.const 0))")}
    (call $exit (i32.const 0))"""
    vm = mvd.vm(mvd.image("net-pollev", wat_guest(body)), publish=[{"guest_port": 9000, "host_port": 0}])
    mvd.wait_blocked(vm["id"], "net_poll")
    port = host_port(mvd, vm["id"])
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        mvd.wait_stdout_lines(vm["id"], 2)
        mvd.wait_blocked(vm["id"], "net_poll")
        s.sendall(b"hello")
        mvd.wait_stdout_lines(vm["id"], 7)
        s.shutdown(socket.SHUT_WR)
        ex = mvd.wait(vm["id"])
    assert ex["code"] == 0, ex
    nums = [int(x) for x in mvd.logs(vm["id"]).split()]
    assert nums == [1, POLLIN, 1, POLLIN, 5, 1, POLLOUT, 1, POLLHUP, 0], nums
    mvd.rm(vm["id"])


def test_poll_recv_receives_from_the_first_readable_connection(mvd: Daemon) -> None:
    """net_poll_recv: poll(2) semantics, plus, in the same call, a net_recv from the first connection it
    reports readable into the buffer, with {index, result} in ``out``; bad arguments are errnos."""
    def pollrx(timeout: int, buf: int = 4096, length: int = 100, out: int = 3000) -> str:
        return f"(call $pollrx (i32.const 2048) (i32.const 2) (i32.const {timeout}) (i32.const {buf}) " \
               f"(i32.const {length}) (i32.const {out}))"
    body = f"""
    (local.set $sd (call $listen (i32.const 9000) (i32.const 4)))
    (local.set $c (call $accept (local.get $sd) (i32.const 0)))
    (i32.store (i32.const 2048) (local.get $sd))
    (i32.store (i32.const 2052) (i32.const 1))
    (i32.store (i32.const 2056) (local.get $c))
    (i32.store (i32.const 2060) (i32.const 1))
    {p(pollrx(10000))}
    {p("(i32.load16_s (i32.const 2054))")}
    {p("(i32.load16_s (i32.const 2062))")}
    {p("(i32.load (i32.const 3000))")}
    {p("(i32.load (i32.const 3004))")}
    {p("(i32.load (i32.const 4096))")}
    {p("(i32.load8_u (i32.const 4100))")}
    {p(pollrx(0))}
    {p("(i32.load (i32.const 3000))")}
    {p(pollrx(0, buf=0x7FFFFF00))}
    {p(pollrx(0, out=0x7FFFFFF0))}
    {p(pollrx(0, length=-1))}
    {p(pollrx(0, length=0))}
    {p("(call $send (local.get $c) (i32.const 4096) (i32.const 5) (i32.const 0))")}
    {p(pollrx(10000))}
    {p("(i32.load16_s (i32.const 2062))")}
    {p("(i32.load (i32.const 3000))")}
    {p("(i32.load (i32.const 3004))")}
    (call $exit (i32.const 0))"""
    vm = mvd.vm(mvd.image("net-pollrx", wat_guest(body)), publish=[{"guest_port": 9000, "host_port": 0}])
    port = host_port(mvd, vm["id"])
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        s.settimeout(10)
        mvd.wait_blocked(vm["id"], "net_poll")
        s.sendall(b"hello")
        assert recv_exact(s, 5) == b"hello"  # sent back from the buffer net_poll_recv filled
        s.shutdown(socket.SHUT_WR)
        ex = mvd.wait(vm["id"])
    assert ex["code"] == 0, ex
    nums = [int(x) for x in mvd.logs(vm["id"]).split()]
    assert nums == [1, 0, POLLIN, 1, 5, int.from_bytes(b"hell", "little"), ord("o"),
                    0, -1,
                    -EFAULT, -EFAULT, -EINVAL, 0,
                    5,
                    1, POLLIN | POLLHUP, 1, 0], nums
    mvd.rm(vm["id"])


@pytest.mark.parametrize("end", ["eof", "reset"])
def test_poll_recv_woken_inside_the_call_reads_first(tmp_path: Path, end: str) -> None:
    """With a spin window of 20 ms the worker waits inside net_poll_recv, and a socket that wakes it is
    read before the scan (the read says it is readable): data, then the end of the stream or a reset,
    each with the same revents and {index, result} as the other paths give."""
    cfg = tmp_path / "spin.toml"
    cfg.write_text('[engine]\nspin_wait = "20ms"\n')
    pollrx = "(call $pollrx (i32.const 2048) (i32.const 1) (i32.const 10000) (i32.const 4096) (i32.const 100) " \
             "(i32.const 3000))"
    body = f"""
    (local.set $sd (call $listen (i32.const 9000) (i32.const 4)))
    (local.set $c (call $accept (local.get $sd) (i32.const 0)))
    (i32.store (i32.const 2048) (local.get $c))
    (i32.store (i32.const 2052) (i32.const 1))
    (i32.store8 (i32.const 5000) (i32.const 114))
    (drop (call $send (local.get $c) (i32.const 5000) (i32.const 1) (i32.const 0)))
    {p(pollrx)}
    {p("(i32.load16_s (i32.const 2054))")}
    {p("(i32.load (i32.const 3000))")}
    {p("(i32.load (i32.const 3004))")}
    {p("(i32.load (i32.const 4096))")}
    (drop (call $send (local.get $c) (i32.const 5000) (i32.const 1) (i32.const 0)))
    {p(pollrx)}
    {p("(i32.load16_s (i32.const 2054))")}
    {p("(i32.load (i32.const 3000))")}
    {p("(i32.load (i32.const 3004))")}
    (call $exit (i32.const 0))"""
    with Daemon.fresh("mvnet-spin-", "--config", str(cfg)) as d:
        vm = d.vm(d.image("net-pollrx-spin", wat_guest(body)), publish=[{"guest_port": 9000, "host_port": 0}])
        with socket.create_connection(("127.0.0.1", host_port(d, vm["id"])), 10) as s:
            s.settimeout(10)
            assert s.recv(1) == b"r"  # the guest goes on into net_poll_recv: it waits there, in the call
            time.sleep(0.003)
            s.sendall(b"ping")
            assert s.recv(1) == b"r"
            time.sleep(0.003)
            if end == "reset":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            else:
                s.shutdown(socket.SHUT_WR)
            ex = d.wait(vm["id"])
        assert ex["code"] == 0, ex
        nums = [int(x) for x in d.logs(vm["id"]).split()]
    assert nums[:5] == [1, POLLIN, 0, 4, int.from_bytes(b"ping", "little")], nums
    # the end: POLLIN with POLLHUP (end of stream) or POLLERR (reset), and the receive's 0 or -ECONNRESET
    # (the same whichever path saw it: this read, the scan's poll(2), or the loop if the guest had parked)
    flag, result = (POLLERR, -15) if end == "reset" else (POLLHUP, 0)
    assert nums[5] == 1 and nums[6] & (POLLIN | flag) == POLLIN | flag and nums[7:] == [0, result], nums


SDK_POLLRX_C = r"""
#include <errno.h>
#include <microvm.h>
#include <stdio.h>

static void show(long v) { printf("%ld\n", v); fflush(stdout); }

int main(void) {
    char b[16];
    int l = mv_listen(9000, 4);
    int c = mv_accept(l);
    struct mv_pollfd p[2] = {{l, MV_POLLIN, 0}, {c, MV_POLLIN, 0}};
    show(mv_poll(p, 2, 10000));                   /* "hello" arrives: held by the SDK */
    show(p[1].revents);
    show(mv_recv(c, b, 2, 0));                    /* part of what is held */
    show(b[0] * 256 + b[1]);
    p[1].revents = 0;
    show(mv_poll(p, 2, -1));                      /* the rest is still held: ready at once */
    show(p[1].revents);
    show(mv_recv(c, b, sizeof b, 0));             /* "llo": only what is held, one short read */
    show(mv_recv(c, b, sizeof b, MV_NONBLOCK) == -1 && errno == EAGAIN);
    mv_send(c, "ok\n", 3, 0);
    /* "world", then the end of the stream (the listener may be ready too: the second client connects) */
    show(mv_poll(p, 2, -1) >= 1 && (p[1].revents & MV_POLLIN));
    show(mv_recv(c, b, sizeof b, 0));
    show(mv_recv(c, b, sizeof b, 0));
    mv_close(c);
    int c2 = mv_accept(l);                        /* close with bytes still held */
    struct mv_pollfd q = {c2, MV_POLLIN, 0};
    show(mv_poll(&q, 1, 10000));
    show(mv_close(c2));
    show(mv_recv(c2, b, sizeof b, MV_NONBLOCK) == -1 && errno == EBADF);
    return 0;
}
"""


def test_sdk_poll_holds_what_it_received_until_recv_takes_it(mvd: Daemon, tmp_path: Path) -> None:
    """The SDK side of net_poll_recv (mv_poll/mv_recv/mv_close in guest-sdk/src/microvm.c): what mv_poll
    received is handed out by mv_recv in order, keeps the socket readable until taken, carries the end
    of the stream, and is dropped by mv_close."""
    mvcc = Path(__file__).resolve().parents[2] / "guest-sdk" / "mvcc"
    if shutil.which("clang") is None or shutil.which("wasm-opt") is None:
        pytest.skip("clang and wasm-opt are needed to build an SDK guest")
    (tmp_path / "pollrx.c").write_text(SDK_POLLRX_C)
    r = subprocess.run([str(mvcc), "-o", str(tmp_path / "pollrx.wasm"), str(tmp_path / "pollrx.c")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    mvd.ok("POST", "/v1/images?name=sdk-pollrx", raw=(tmp_path / "pollrx.wasm").read_bytes())
    vm = mvd.vm("sdk-pollrx", publish=[{"guest_port": 9000, "host_port": 0}])
    port = host_port(mvd, vm["id"])
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        s.settimeout(10)
        mvd.wait_blocked(vm["id"], "net_poll")
        s.sendall(b"hello")
        assert recv_exact(s, 3) == b"ok\n"
        s.sendall(b"world")
        s.shutdown(socket.SHUT_WR)
        with socket.create_connection(("127.0.0.1", port), 10) as s2:
            s2.sendall(b"zzz")
            ex = mvd.wait(vm["id"])
    assert ex["code"] == 0, (ex, mvd.logs(vm["id"], "stderr"))
    nums = [int(x) for x in mvd.logs(vm["id"]).split()]
    assert nums == [1, POLLIN, 2, ord("h") * 256 + ord("e"), 1, POLLIN, 3, 1,
                    1, 5, 0,
                    1, 0, 1], nums
    mvd.rm(vm["id"])


@pytest.mark.parametrize("where,late", [("net_recv", False), ("net_poll", False), ("net_recv", True),
                                        ("net_poll", True)])
def test_a_reset_from_the_peer_is_econnreset(mvd: Daemon, where: str, late: bool) -> None:
    """The guest reads its connections itself: a peer that resets (RST) must still come back as
    ECONNRESET (15) from recv, and as POLLERR from poll, whether the reset arrives while the guest waits
    (the loop watches the socket) or before it looks (it finds the reset on the socket itself)."""
    wait = (f"{p('(call $poll (i32.const 2048) (i32.const 1) (i32.const 10000))')}"
            f"{p('(i32.and (i32.load16_s (i32.const 2054)) (i32.const 8))')}" if where == "net_poll" else "")
    body = f"""
    (local.set $sd (call $listen (i32.const 9000) (i32.const 4)))
    (local.set $c (call $accept (local.get $sd) (i32.const 0)))
    {p("(call $recv (local.get $c) (i32.const 4096) (i32.const 100) (i32.const 0))")}
    {"(drop (call $sleep (i32.const 300)))" if late else ""}
    (i32.store (i32.const 2048) (local.get $c))
    (i32.store16 (i32.const 2052) (i32.const 1))
    {wait}
    {p("(call $recv (local.get $c) (i32.const 4096) (i32.const 100) (i32.const 0))")}
    (call $exit (i32.const 0))"""
    vm = mvd.vm(mvd.image(f"net-rst-{where}-{late}", wat_guest(body)),
                publish=[{"guest_port": 9000, "host_port": 0}])
    mvd.wait_blocked(vm["id"], "net_accept")
    s = socket.create_connection(("127.0.0.1", host_port(mvd, vm["id"])), 10)
    s.sendall(b"x")  # the first delivery: after it the guest reads the socket itself
    mvd.wait_blocked(vm["id"], "sleep_ms" if late else where)
    if not late:
        time.sleep(0.05)  # past the worker's spin: the guest is parked, the loop is watching the socket
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # RST
    ex = mvd.wait(vm["id"])
    assert ex["code"] == 0, ex
    nums = [int(x) for x in mvd.logs(vm["id"]).split()]
    assert nums == ([1, 1, POLLERR, -15] if where == "net_poll" else [1, -15]), nums
    mvd.rm(vm["id"])


def test_blocked_vm_pause_resume_stop_promptly(mvd: Daemon) -> None:
    r = mvd.cli("run", "-d", "--publish", "127.0.0.1:0:8000", "echo")
    assert r.returncode == 0, r.stderr
    vm_id = r.stdout.strip()
    vm = mvd.wait_blocked(vm_id, "net_poll")
    assert vm["state"] == "running" and vm["blocked_in"] == "net_poll"
    port = host_port(mvd, vm_id)
    wait_port(port)

    t0 = time.monotonic()
    assert mvd.cli("pause", vm_id).returncode == 0
    assert time.monotonic() - t0 < 3
    assert mvd.get(vm_id)["state"] == "paused"
    # while paused, connections queue (the daemon owns the listener) but nothing is echoed
    socks = [socket.create_connection(("127.0.0.1", port), 5) for _ in range(5)]
    try:
        for i, s in enumerate(socks):
            s.settimeout(0.3)
            s.sendall(b"queued %d\n" % i)
        with pytest.raises(TimeoutError):
            socks[0].recv(100)
        assert mvd.get(vm_id)["state"] == "paused"
        assert mvd.cli("resume", vm_id).returncode == 0
        for i, s in enumerate(socks):
            s.settimeout(10)
            assert recv_exact(s, len(b"queued %d\n" % i)) == b"queued %d\n" % i
    finally:
        for s in socks:
            s.close()
    mvd.wait_blocked(vm_id, "net_poll")

    t0 = time.monotonic()
    r = mvd.cli("stop", vm_id)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 3
    vm = mvd.get(vm_id)
    assert vm["state"] == "stopped" and vm["exit"]["reason"] == "stopped" and vm["blocked_in"] is None
    assert mvd.cli("rm", vm_id).returncode == 0


def test_blocked_in_shows_the_call(mvd: Daemon) -> None:
    body = """
    (local.set $sd (call $listen (i32.const 9000) (i32.const 4)))
    (local.set $c (call $accept (local.get $sd) (i32.const 0)))
    (drop (call $recv (local.get $c) (i32.const 4096) (i32.const 100) (i32.const 0)))
    (call $hold)"""
    vm = mvd.vm(mvd.image("net-blocked", wat_guest(body)), publish=[{"guest_port": 9000, "host_port": 0}])
    assert mvd.wait_blocked(vm["id"])["blocked_in"] == "net_accept"
    with socket.create_connection(("127.0.0.1", host_port(mvd, vm["id"])), 10) as s:
        assert mvd.wait_blocked(vm["id"], "net_recv")["blocked_in"] == "net_recv"
        assert mvd.inspect(vm["id"])["blocked_in"] == "net_recv"
        s.sendall(b"x")
        assert mvd.wait_blocked(vm["id"], "sleep_ms")["blocked_in"] == "sleep_ms"
    t0 = time.monotonic()
    mvd.rm(vm["id"])
    assert time.monotonic() - t0 < 5


# vCPU workers are one per CPU, so allow for them on big machines; 40 on anything up to 16 CPUs
THREAD_LIMIT = max(40, (os.cpu_count() or 2) + 24)


def test_200_blocked_echo_vms_hold_no_threads(mvd: Daemon, echo_vm: tuple[str, int]) -> None:
    n = 200
    base = mvd.threads()
    ids: list[str] = []

    def create(_: int) -> str:
        return str(mvd.vm("echo")["id"])

    try:
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(create, range(n)))
        end = time.monotonic() + 60
        while True:
            vms = {v["id"]: v for v in mvd.ok("GET", "/v1/vms")["vms"]}
            blocked = [i for i in ids if vms.get(i, {}).get("blocked_in") == "net_poll"]
            if len(blocked) == n:
                break
            assert time.monotonic() < end, f"only {len(blocked)} of {n} blocked"
            time.sleep(0.2)
        threads = mvd.threads()
        print(f"daemon threads: {base} before, {threads} with {n} more VMs blocked in net_poll")
        assert threads < THREAD_LIMIT, f"{threads} threads with {n} blocked VMs (was {base} before)"
        # the daemon still serves: the API and another VM's echo
        _, port = echo_vm
        assert line_rpc(port, "with 200 neighbours") == "with 200 neighbours"
    finally:
        def stop_rm(vm_id: str) -> str:
            state = mvd.ok("POST", f"/v1/vms/{vm_id}/stop")["state"]
            mvd.ok("DELETE", f"/v1/vms/{vm_id}")
            return str(state)

        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            states = list(pool.map(stop_rm, ids))
        assert time.monotonic() - t0 < 60
    assert states == ["stopped"] * n
    left = {v["id"] for v in mvd.ok("GET", "/v1/vms?all=true")["vms"]}
    assert not left & set(ids)
    assert mvd.threads() < THREAD_LIMIT
