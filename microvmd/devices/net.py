"""Module ``microvm_net``: TCP sockets for guests (our virtio-net/vsock).

Inbound: ``--publish HOSTIP:HOSTPORT:GUESTPORT`` binds a host port on the event loop and queues each
connection for the guest's listener on GUESTPORT. Outbound: only to ``--allow-egress`` rules; the daemon's
own ports are never reachable. All socket I/O happens on the event loop (asyncio protocols with bounded
buffers); the guest's calls run on its vCPU worker and only touch those buffers, under the VM's net lock.
A call that would block suspends the guest as a ``HostOp`` — it holds no thread while it waits.
"""
from __future__ import annotations

import asyncio
import collections
import ctypes
import errno as _errno
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import wasmtime
from prometheus_client.core import CounterMetricFamily, Metric

from ..engine import wt
from ..engine.hostop import HostOp, wait_in_call
from ..errors import BadRequest, Conflict
from ..logsafe import Throttle
from .base import Device, DeviceHost, DevicePart, GuestVm
from .files import OpenFiles
from .ratelimit import LimiterConfig, RateLimiter
from .wasi import (
    EADDRINUSE,
    EAGAIN,
    EBADF,
    ECONNREFUSED,
    ECONNRESET,
    EFAULT,
    EHOSTUNREACH,
    EINVAL,
    EMFILE,
    ENOTCONN,
    ENOTSUP,
    EPIPE,
    ETIMEDOUT,
    GuestError,
    errno_of,
)

log = logging.getLogger("microvmd.net")

NONBLOCK = 1
POLLIN, POLLOUT, POLLERR, POLLHUP = 1, 4, 8, 16

_HOST_ERRNO = {
    _errno.ECONNREFUSED: ECONNREFUSED, _errno.ECONNRESET: ECONNRESET, _errno.ETIMEDOUT: ETIMEDOUT,
    _errno.EHOSTUNREACH: EHOSTUNREACH, _errno.ENETUNREACH: EHOSTUNREACH, _errno.EPIPE: EPIPE,
}

MAX_IO = 1 << 20          # bytes moved by one send/recv call
MAX_POLL_FDS = 1024
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class NetLimits:
    max_sockets: int = 1024
    buffer_bytes: int = 256 * 1024   # per socket and direction
    backlog: int = 128


# ------------------------------------------------------------------ egress rules
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def normalize_ip(addr: str) -> IPAddress | None:
    """The address a connection really goes to: IPv4-mapped IPv6 is IPv4 (``::ffff:127.0.0.1`` is loopback)."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_local(ip: IPAddress) -> bool:
    """Addresses that reach this host itself (0.0.0.0 and :: do, on Linux)."""
    return ip.is_loopback or ip.is_unspecified or ip in _host_addresses()


_HOST_ADDRS: set[IPAddress] | None = None


def _host_addresses() -> set[IPAddress]:
    global _HOST_ADDRS
    if _HOST_ADDRS is None:
        found: set[IPAddress] = set()
        try:
            for info in socket.getaddrinfo(socket.gethostname(), None):
                ip = normalize_ip(str(info[4][0]))
                if ip is not None:
                    found.add(ip)
        except OSError:
            pass
        _HOST_ADDRS = found
    return _HOST_ADDRS


@dataclass(frozen=True)
class EgressRule:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    host: str | None
    port: int | None  # None = any port

    def matches(self, ip: IPAddress, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is None or ip.version != self.network.version:
            return False
        return ip in self.network


def parse_egress(rule: str) -> EgressRule:
    """``HOST:PORT``, ``CIDR:PORT``, ``[v6]:PORT``; PORT may be ``*``."""
    text = rule.strip()
    host, sep, port_s = text.rpartition(":")
    if not sep or not host:
        raise BadRequest(f"egress rule {rule!r} must be HOST:PORT or CIDR:PORT", code="invalid_egress")
    host = host.strip("[]")
    if port_s == "*":
        port = None
    elif port_s.isdigit() and 0 < int(port_s) < 65536:
        port = int(port_s)
    else:
        raise BadRequest(f"egress rule {rule!r}: port must be 1-65535 or *", code="invalid_egress")
    try:
        return EgressRule(ipaddress.ip_network(host, strict=False), None, port)
    except ValueError:
        pass
    if not host.replace("-", "").replace(".", "").isalnum():
        raise BadRequest(f"egress rule {rule!r}: {host!r} is neither an address, a CIDR nor a host name",
                         code="invalid_egress")
    return EgressRule(None, host.lower(), port)


# ------------------------------------------------------------------ sockets
class RecvBuffer:
    """Bytes received for the guest: the chunks as the transport delivered them, not yet read.

    Appending keeps the chunk (no copy on the event loop); ``take_into`` copies straight into guest memory
    and drops what it consumed (no shifting of the rest).
    """

    __slots__ = ("chunks", "off", "size")

    def __init__(self) -> None:
        self.chunks: collections.deque[bytes] = collections.deque()
        self.off = 0   # bytes of chunks[0] already taken
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return self.size > 0

    def append(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            if type(data) is not bytes:
                data = bytes(data)
            self.chunks.append(data)
            self.size += len(data)

    def take_into(self, view: memoryview) -> int:
        """Move up to ``len(view)`` bytes into ``view``; returns how many."""
        n = min(len(view), self.size)
        done, chunks, off = 0, self.chunks, self.off
        while done < n:
            c = chunks[0]
            k = min(len(c) - off, n - done)
            view[done:done + k] = c if off == 0 and k == len(c) else memoryview(c)[off:off + k]
            done += k
            off += k
            if off == len(c):
                chunks.popleft()
                off = 0
        self.off = off
        self.size -= n
        return n


class GSock:
    """A guest socket descriptor: a listener on a guest port, or a TCP connection."""

    def __init__(self, sd: int, kind: str) -> None:
        self.sd = sd
        self.kind = kind  # "listener" | "conn" | "connecting"
        self.port = 0
        self.backlog: collections.deque[GSock] = collections.deque()
        self.rbuf = RecvBuffer()
        self.eof = False
        self.error = 0
        self.transport: asyncio.Transport | None = None
        self.reading_paused = False
        self.write_blocked = False
        self.out_pending = 0
        self.closed = False
        self.waiters: list[NetOp] = []
        self.peer = ""
        self.outq: list[bytes] = []     # sent by the guest, not yet handed to the transport (loop)
        self.flush_scheduled = False    # a flush of outq is queued on the loop
        self.fd = -1                    # the connection's OS socket, read and written straight from the vCPU
        self.armed = False              # the event loop reads it (a parked guest waits); else only the vCPU


class NetOp(HostOp):
    """Waits until ``cond()`` holds (checked on the loop under the VM's net lock), then runs ``act``."""

    def __init__(self, name: str, state: NetState, socks: Sequence[GSock], cond: Callable[[], bool],
                 act: Callable[[wt.GuestMemory], Sequence[int]]) -> None:
        super().__init__()
        self.name = name
        self.state = state
        self.socks = list(socks)
        self.cond = cond
        self.act = act
        self.timer: asyncio.TimerHandle | None = None
        # answer_in_call's first try once a socket woke it (lock held): an answer, or None to check ``cond``
        self.fast: Callable[[wt.GuestMemory], Sequence[int] | None] | None = None
        for s in self.socks:
            s.waiters.append(self)

    def detach(self) -> None:
        for s in self.socks:
            if self in s.waiters:
                s.waiters.remove(self)
        if self.timer is not None:
            self.timer.cancel()

    def finish(self, mem: wt.GuestMemory) -> Sequence[int]:
        with self.state.lock:
            self.detach()
            return self.act(mem)

    def _sleep(self, timeout: float) -> bool:
        """Block until one of the op's connections has something in the kernel, or ``timeout`` passed (GIL
        released). False if there is no such socket to watch (the loop reads them all, or none is a
        connection): the caller then waits for the loop's wake-up instead."""
        fds = [s.fd for s in self.socks if s.kind == "conn" and s.fd >= 0 and not s.armed] \
            if self.name in ("net_recv", "net_poll") else []
        if not fds:
            return False
        try:
            if max(fds) < _FD_SETSIZE:  # select(2) takes the spin window in microseconds
                select.select(fds, [], fds, max(0.0, timeout))
            else:  # poll(2) only in milliseconds: the window is rounded up to 1 ms
                poller = select.poll()
                for fd in fds:
                    poller.register(fd, select.POLLIN | select.POLLPRI)
                poller.poll(max(1, round(timeout * 1000)))
        except (OSError, ValueError):
            pass
        return True

    def wait(self, timeout: float) -> bool:
        """A vCPU worker's short wait (ping-pong traffic): poll the connections' sockets itself, so an answer
        that arrives in the kernel resumes the guest on this thread with no hand-off through the loop."""
        if self.ready() or not self._sleep(timeout):
            return super().wait(timeout)
        with self.state.lock:
            if self.ready():
                return True
            if not self.cond():
                return False
            self.detach()
        self.set_result(None)
        return True

    def answer_in_call(self, deadline: float, mem: wt.GuestMemory) -> Sequence[int] | None:
        """The same wait inside the call: once a socket has something, check the condition and answer at
        once, under one hold of the lock. A socket with something that does not meet the condition (a
        receive held back by the rate limiter) ends the wait: the guest parks on the op."""
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        if not self._sleep(left):
            return super().answer_in_call(deadline, mem)
        with self.state.lock:
            if not self.ready():  # (else completed by the loop meanwhile: a timer, a wake-up)
                answer = self.fast(mem) if self.fast is not None else None
                if answer is None:
                    if not self.cond():
                        return None
                    answer = self.act(mem)  # (wrapped in _errno_guard by its maker)
                self.detach()
                self._consumed = True
                return answer
        return self.complete(mem)

    def on_ready(self, waker: Callable[[], None]) -> bool:
        """The guest parks on this op (event loop): let the loop read its connections until one delivers."""
        st = self.state
        with st.lock:
            if self.ready():
                # completed before the guest parked (a socket woke it on the loop first): the answer may come
                # from a socket's kernel buffer, which the loop must not start reading now
                return super().on_ready(waker)
            for s in self.socks:
                st.arm(s)
        return super().on_ready(waker)

    def cancel(self) -> None:
        super().cancel()
        with self.state.lock:
            self.detach()


class _Conn(asyncio.Protocol):
    """Host side of one guest connection, on the event loop."""

    def __init__(self, state: NetState, sock: GSock, guest_port: int | None = None) -> None:
        self.state, self.sock, self.guest_port = state, sock, guest_port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        with self.state.lock:
            self.sock.transport = transport  # type: ignore[assignment]
            raw = transport.get_extra_info("socket")
            self.sock.fd = raw.fileno() if raw is not None else -1
            # uvloop starts reading once this returns: the loop reads the first delivery, then pauses
            # (data_received); from then on the guest reads the socket itself, the loop only while it is parked
            self.sock.armed = True
            peer = transport.get_extra_info("peername")
            self.sock.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        if self.guest_port is not None:
            self.state.enqueue(self.guest_port, self.sock)
        self.state.wake(self.sock)

    def data_received(self, data: bytes) -> None:
        st = self.state
        s = self.sock
        with st.lock:
            s.rbuf.append(data)
            st.stats["bytes_in"] += len(data)
            if s.armed:  # one delivery wakes the parked guest; then the vCPU reads the socket again
                s.armed = False
                if s.transport is not None:
                    s.transport.pause_reading()
            elif len(s.rbuf) >= st.limits.buffer_bytes and not s.reading_paused:
                s.reading_paused = True
                if s.transport is not None:
                    s.transport.pause_reading()
        st.wake(s)

    def eof_received(self) -> bool:
        with self.state.lock:
            self.sock.eof = True
        self.state.wake(self.sock)
        return True  # half-close: the guest may still answer; its net_close closes the connection

    def connection_lost(self, exc: Exception | None) -> None:
        with self.state.lock:
            self.sock.eof = True
            if exc is not None and not self.sock.error:
                self.sock.error = ECONNRESET
            self.sock.transport = None
            self.sock.fd = -1
            self.sock.armed = False
        self.state.wake(self.sock)

    def pause_writing(self) -> None:
        self.sock.write_blocked = True

    def resume_writing(self) -> None:
        with self.state.lock:
            self.sock.write_blocked = False
        self.state.wake(self.sock)


SOCKET_KINDS = ("listener", "conn", "connecting", "failed")


@dataclass(frozen=True)
class SavedSocket:
    sd: int
    kind: str  # one of SOCKET_KINDS
    port: int = 0  # a listener's guest port


@dataclass(frozen=True)
class NetSaved:
    """A VM's sockets in a snapshot: listeners come back, open connections come back reset (as
    Firecracker's vsock). Published ports and egress rules are the VM's spec, not saved state."""

    next_sd: int
    sockets: tuple[SavedSocket, ...]

    def encode(self) -> dict[str, Any]:
        return {"next_sd": self.next_sd,
                "sockets": [{"sd": s.sd, "kind": s.kind, "port": s.port} for s in self.sockets]}

    @classmethod
    def decode(cls, raw: object) -> NetSaved:
        nxt = raw.get("next_sd", 3) if isinstance(raw, dict) else None
        socks = raw.get("sockets", []) if isinstance(raw, dict) else None
        if not isinstance(nxt, int) or not isinstance(socks, list):
            raise ValueError("malformed socket state in snapshot")
        out = []
        for rec in socks:
            sd, kind, port = (rec.get("sd"), rec.get("kind"), rec.get("port", 0)) if isinstance(rec, dict) \
                else (None, None, None)
            if not isinstance(sd, int) or not isinstance(port, int) or kind not in SOCKET_KINDS:
                raise ValueError("malformed socket record in snapshot")
            out.append(SavedSocket(sd, kind, port))
        return cls(nxt, tuple(out))


class NetState(DevicePart[NetSaved]):
    """One VM's sockets, published ports and egress rules."""

    name = "net"

    def __init__(self, vm: GuestVm, device: NetDevice, loop: asyncio.AbstractEventLoop, limits: NetLimits,
                 rules: list[EgressRule]) -> None:
        self.vm = vm
        self.device = device
        self.loop = loop
        self.limits = limits
        self.rules = rules
        self.lock = threading.RLock()
        self.socks: dict[int, GSock] = {}
        self.next_sd = 3
        self.listeners: dict[int, GSock] = {}       # guest port -> listener
        self.unclaimed: dict[int, collections.deque[GSock]] = {}  # connections before the guest listens
        self.servers: list[tuple[PublishInfo, Any]] = []
        self.stats = collections.Counter({"connections_in": 0, "connections_out": 0, "bytes_in": 0,
                                          "bytes_out": 0, "refused": 0, "dropped": 0})
        self.limiter = RateLimiter(LimiterConfig.from_dict(vm.spec.net_rate_limiter))
        self.refusals = Throttle()  # a guest dialling in a loop logs a few lines, not megabytes
        self.throttle_until = 0.0  # send/recv wait until then (the limiter's debt)
        self.throttled_s = 0.0
        self.closed = False

    def log_refused(self, host: str, port: int, why: str) -> None:
        """A refused connect, logged within the VM's throttle (each one is counted in ``stats`` anyway);
        the host is the guest's text, escaped by the daemon's formatter and quoted here."""
        ok, left_out = self.refusals.allow()
        if ok:
            more = f"; {left_out} more refusals not logged" if left_out else ""
            log.info("vm=%s egress to %r port %d refused by policy%s%s", self.vm.id[:12], host, port, why, more)

    # ---- loop side
    def wake(self, sock: GSock) -> None:
        """Complete every op waiting on ``sock`` whose condition now holds (event-loop thread).

        No waiter, no work: a guest adds its op under the lock after finding the condition false, and the
        loop changes the socket's state under the lock before calling this, so an op added before that change
        is seen here, and one added after it saw the change and did not wait.
        """
        if not sock.waiters:
            return
        with self.lock:
            ready = [op for op in sock.waiters if not op.ready() and op.cond()]
            for op in ready:
                op.detach()
        for op in ready:
            op.set_result(None)

    def arm(self, s: GSock) -> None:
        """Event loop, lock held: read ``s`` on the loop until it delivers (a guest is parked on it)."""
        if s.kind == "conn" and s.fd >= 0 and not s.armed and not s.closed and not s.reading_paused \
                and s.transport is not None:
            s.armed = True
            s.transport.resume_reading()  # type: ignore[attr-defined]

    def flush(self, s: GSock, t: asyncio.Transport) -> None:
        """Hand what the guest sent to the transport (event loop). Every send since the last flush goes out
        in one call: a streaming guest costs the loop one callback per burst, not one per send."""
        with self.lock:  # held while writing: a direct send (see NetDevice._send_now) cannot overtake
            chunks, s.outq = s.outq, []
            s.flush_scheduled = False
            s.out_pending -= sum(map(len, chunks))
            if chunks and not t.is_closing():
                if len(chunks) == 1:
                    t.write(chunks[0])
                else:
                    t.writelines(chunks)
        self.wake(s)

    def inbound(self, guest_port: int) -> asyncio.Protocol:
        """Protocol factory of a published port (event loop)."""
        with self.lock:
            sock = GSock(self._alloc_sd(check=False), "conn")
            self.stats["connections_in"] += 1
        return _Conn(self, sock, guest_port)

    def enqueue(self, guest_port: int, sock: GSock) -> None:
        """A published connection is up: queue it for the guest's listener (or until it listens)."""
        with self.lock:
            lst = self.listeners.get(guest_port)
            queue = lst.backlog if lst is not None else self.unclaimed.setdefault(guest_port, collections.deque())
            if len(queue) >= self.limits.backlog or self.closed:
                self.stats["dropped"] += 1
                sock.closed = True
                self._close_transport(sock)
                return
            queue.append(sock)
        if lst is not None:
            self.wake(lst)

    # ---- guest side (vCPU worker)
    def _alloc_sd(self, check: bool = True, host: bool = True) -> int:
        """A new socket number; with ``check`` the socket is charged to the VM's descriptors first (the caller
        puts it in ``socks`` at once). Published connections are charged when the guest accepts them.
        ``host`` False: no host descriptor stands behind it (a guest listener: a published port's host socket
        is the daemon's, made with the VM), so it counts against the VM's own limit only."""
        if check:
            self.charge(host=host)
        sd = self.next_sd
        self.next_sd += 1
        return sd

    def charge(self, force: bool = False, host: bool = True) -> None:
        """Count one socket more against the VM's ``limits.open_files`` (files and sockets together) and, when
        a host descriptor stands behind it, the daemon's descriptor budget; GuestError(EMFILE or ENFILE) when
        either is spent."""
        files = self.vm.devices.get(OpenFiles)
        if files is None:
            if not force and len(self.socks) >= self.limits.max_sockets:
                raise GuestError(EMFILE)
            return
        files.take(force, host=host)
        files.socket_opened(host=host)

    def get(self, sd: int, kind: str | None = None) -> GSock:
        s = self.socks.get(sd)
        if s is None or s.closed or (kind is not None and s.kind != kind):
            raise GuestError(EBADF)
        return s

    def close_sock(self, s: GSock) -> None:
        s.closed = True
        if self.socks.pop(s.sd, None) is not None and (files := self.vm.devices.get(OpenFiles)) is not None:
            files.socket_closed(host=s.kind != "listener")
        if s.kind == "listener":
            self.listeners.pop(s.port, None)
            pending = list(s.backlog)
            s.backlog.clear()
            for c in pending:
                self._close_transport(c)
        else:
            self._close_transport(s)
        for op in list(s.waiters):
            op.detach()
            op.set_result(None)

    def _close_transport(self, s: GSock) -> None:
        t = s.transport
        s.transport = None
        if t is not None:
            self.loop.call_soon_threadsafe(t.close)

    def allowed(self, addr: str, port: int, by_name: bool = False) -> bool:
        """May the guest connect to ``addr:port``? ``by_name``: a rule naming the host already allowed it.

        The daemon's own listening ports are never reachable at any local address, whatever the rules.
        """
        ip = normalize_ip(addr)
        if ip is None or ip.is_unspecified or ip.is_multicast:
            return False
        if (is_local(ip) or ip in self.device.bind_addresses()) and port in self.device.own_ports():
            return False
        return by_name or any(r.matches(ip, port) for r in self.rules)

    def to_api(self) -> dict[str, Any]:
        with self.lock:
            return {
                "published": [p.__dict__ for p, _ in self.servers],
                "egress": [f"{r.network or r.host}:{r.port or '*'}" for r in self.rules],
                "sockets": len(self.socks),
                "stats": {**self.stats, "throttled_s": round(self.throttled_s, 6)},
                "rate_limiter": self.limiter.cfg.to_api(),
            }

    # ---- snapshot (see NetSaved)
    def save(self) -> NetSaved:
        with self.lock:
            return NetSaved(self.next_sd, tuple(SavedSocket(s.sd, s.kind, s.port) for s in self.socks.values()))

    @classmethod
    def load(cls, raw: object) -> NetSaved:
        return NetSaved.decode(raw)

    def restore(self, state: NetSaved) -> None:
        with self.lock:
            if len(state.sockets) > self.limits.max_sockets:
                raise ValueError("malformed socket state in snapshot")
            self.next_sd = max(self.next_sd, state.next_sd)
            for rec in state.sockets:
                s = GSock(rec.sd, "listener" if rec.kind == "listener" else "conn")
                if rec.kind == "listener":
                    s.port = rec.port
                    self.listeners[rec.port] = s
                    for c in self.unclaimed.pop(rec.port, collections.deque()):
                        s.backlog.append(c)
                else:
                    s.eof, s.error = True, ECONNRESET  # the peer is gone: reset
                self.charge(force=True, host=rec.kind != "listener")
                self.socks[rec.sd] = s

    async def release_published(self) -> None:
        """Unbind the published ports (the VM is moving); ``rebind_published`` undoes it."""
        for _, srv in self.servers:
            srv.close()
        for _, srv in self.servers:
            try:
                await asyncio.wait_for(srv.wait_closed(), 1.0)
            except TimeoutError:
                pass

    async def rebind_published(self) -> None:
        fresh = []
        for info, _ in self.servers:
            srv = await self.loop.create_server(lambda gp=info.guest_port: self.inbound(gp),  # type: ignore[misc]
                                                info.host_ip, info.host_port, reuse_address=True)
            fresh.append((info, srv))
        self.servers = fresh

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            for s in list(self.socks.values()):
                self.close_sock(s)
            for q in self.unclaimed.values():
                for c in q:
                    self._close_transport(c)
            self.unclaimed.clear()
            servers = [srv for _, srv in self.servers]
        for srv in servers:
            self.loop.call_soon_threadsafe(srv.close)
        self.device.forget(self)


@dataclass
class PublishInfo:
    host_ip: str
    host_port: int
    guest_port: int


# ------------------------------------------------------------------ the device
class NetDevice(Device):
    name = "net"

    def __init__(self, hv: DeviceHost, limits: NetLimits | None = None) -> None:
        self.hv = hv
        self.limits = limits or NetLimits()
        self.states: set[NetState] = set()
        self.loop: asyncio.AbstractEventLoop | None = None

    def own_ports(self) -> set[int]:
        """Every TCP port the daemon listens on: published ports, the remote API, the gateway."""
        ports = {p.host_port for st in list(self.states) for p, _ in st.servers}
        cfg = self.hv.cfg
        for hp in (cfg.listen, cfg.gateway):
            if hp is not None:
                ports.add(hp[1])
        return ports

    def bind_addresses(self) -> set[IPAddress]:
        """Addresses the daemon binds explicitly (a published port on a non-local address counts too)."""
        out: set[IPAddress] = set()
        for st in list(self.states):
            for p, _ in st.servers:
                ip = normalize_ip(p.host_ip)
                if ip is not None:
                    out.add(ip)
        cfg = self.hv.cfg
        for hp in (cfg.listen, cfg.gateway):
            ip = normalize_ip(hp[0]) if hp is not None else None
            if ip is not None:
                out.add(ip)
        return out

    def forget(self, st: NetState) -> None:
        self.states.discard(st)

    # ---- linker
    def define(self, linker: wasmtime.Linker) -> None:
        i32 = "i32"
        calls = [  # name, params, handler, is a suspension point (may block)
            ("net_listen", [i32, i32], self._listen, False),
            ("net_accept", [i32, i32], self._accept, True),
            ("net_connect", [i32, i32, i32, i32], self._connect, True),
            ("net_send", [i32, i32, i32, i32], self._send, True),
            ("net_recv", [i32, i32, i32, i32], self._recv, True),
            ("net_close", [i32], self._close, False),
            ("net_poll", [i32, i32, i32], self._poll, True),
            ("net_poll_recv", [i32, i32, i32, i32, i32, i32], self._poll_recv, True),
        ]
        for name, params, fn, suspends in calls:
            wt.define_host_func(linker, "microvm_net", name, params, [i32], self._guarded(fn), suspends=suspends)

    def _guarded(self, fn: Callable[[NetState, wt.GuestMemory, Sequence[int]], Any]) -> wt.HostFn:
        def host(mem: wt.GuestMemory, args: Sequence[int]) -> Any:
            vm: GuestVm | None = wt.current_vm()
            st: NetState | None = vm.devices.get(NetState) if vm is not None else None
            if vm is None or st is None:
                return [-ENOTSUP]
            try:
                with st.lock:
                    res = fn(st, mem, args)
                if type(res) is not list and isinstance(res, HostOp):
                    answer = wait_in_call(vm, res, mem)
                    if answer is not None:  # answered within the spin window: no suspension
                        return answer
                    vm.block_on(res)
                return res
            except wt.HostTrap:
                raise
            except Exception as exc:  # the guest's mistake keeps its errno; a device bug is -EIO, logged
                return [-errno_of(exc, log, "microvm_net call")]
        return host

    @staticmethod
    def _suspend(st: NetState, mem: wt.GuestMemory, name: str, socks: Sequence[GSock], cond: Callable[[], bool],
                 act: Callable[[wt.GuestMemory], Sequence[int]], throttled: bool = False) -> Any:
        """Act now if the condition holds, else suspend the guest until it does. A ``throttled`` call
        also waits out the rate limiter's debt first (on an event-loop timer, holding no thread)."""
        wait = st.throttle_until - time.monotonic() if throttled and st.throttle_until else 0.0
        if wait <= 0:  # the common case: act now (data buffered, space free), no op, no closure kept
            if cond():
                return _errno_guard(act, mem)
            return NetOp(name, st, socks, cond, lambda m: _errno_guard(act, m))
        gate = [False]
        op = NetOp(name, st, socks, lambda: gate[0] and cond(), lambda m: _errno_guard(act, m))

        def open_gate() -> None:
            with st.lock:
                gate[0] = True
            for s in socks:
                st.wake(s)

        def arm() -> None:
            if not op.cancelled and not op.ready():
                op.timer = st.loop.call_later(wait, open_gate)
        st.loop.call_soon_threadsafe(arm)
        return op

    @staticmethod
    def _charge(st: NetState, nbytes: int) -> None:
        """Account a transfer; if it overdraws the buckets, the next send/recv waits."""
        if not st.limiter.enabled:
            return
        delay = st.limiter.reserve(nbytes)
        if delay > 0:
            st.throttle_until = time.monotonic() + delay
            st.throttled_s += delay

    # ---- calls (all run with st.lock held)
    def _listen(self, st: NetState, mem: wt.GuestMemory, a: Sequence[int]) -> Any:
        port, _backlog = a[0], a[1]
        if not 0 < port < 65536:
            return [-EINVAL]
        if port in st.listeners:
            return [-EADDRINUSE]
        s = GSock(st._alloc_sd(host=False), "listener")
        s.port = port
        st.socks[s.sd] = s
        st.listeners[port] = s
        for c in st.unclaimed.pop(port, collections.deque()):
            s.backlog.append(c)
        return [s.sd]

    def _accept(self, st: NetState, mem: wt.GuestMemory, a: Sequence[int]) -> Any:
        lst = st.get(a[0], "listener")

        def act(mem: wt.GuestMemory) -> Sequence[int]:
            if lst.closed:
                return [-EBADF]
            try:
                st.charge()
            except GuestError as exc:
                return [-exc.code]
            c = lst.backlog.popleft()
            st.socks[c.sd] = c
            return [c.sd]

        if not lst.backlog and a[1] & NONBLOCK:
            return [-EAGAIN]
        return self._suspend(st, mem, "net_accept", [lst], lambda: bool(lst.backlog) or lst.closed, act)

    def _connect(self, st: NetState, mem: wt.GuestMemory, a: Sequence[int]) -> Any:
        host_ptr, host_len, port, flags = a
        if not 0 < host_len <= 255 or not 0 < port < 65536:
            return [-EINVAL]
        host = mem.read(host_ptr, host_len).decode("utf-8", "replace").strip().strip("[]")
        s = GSock(st._alloc_sd(), "connecting")
        st.socks[s.sd] = s

        def refuse() -> GuestError:
            with st.lock:
                st.stats["refused"] += 1
            st.log_refused(host, port, "")
            return GuestError(ECONNREFUSED)

        async def dial() -> None:
            err = ECONNREFUSED
            try:
                addrs, by_name = await self._resolve(st, host, port)
                allowed = [ad for ad in addrs if st.allowed(ad, port, by_name)]
                if not allowed:
                    raise refuse()
                for ad in allowed:  # a name may resolve to several addresses: try each in turn
                    try:
                        await asyncio.wait_for(st.loop.create_connection(lambda: _Conn(st, s), ad, port),
                                               CONNECT_TIMEOUT)
                    except TimeoutError:
                        err = ETIMEDOUT
                    except OSError as e:
                        err = _HOST_ERRNO.get(e.errno or 0, ECONNREFUSED)
                    else:
                        err = 0
                        with st.lock:
                            st.stats["connections_out"] += 1
                        break
            except GuestError as e:
                err = e.code
            with st.lock:
                s.error = err
                s.kind = "conn" if not err else "failed"
                if s.closed and s.transport is not None:
                    s.transport.close()
            st.wake(s)

        st.loop.call_soon_threadsafe(lambda: st.loop.create_task(dial()))

        def act(mem: wt.GuestMemory) -> Sequence[int]:
            if s.error:
                st.close_sock(s)
                return [-s.error]
            return [s.sd]

        # connect always waits for the outcome; with NONBLOCK the guest would get EINPROGRESS, which
        # the ABI does not define, so connect is blocking by design (documented in ABI.md).
        return NetOp("net_connect", st, [s], lambda: s.kind in ("conn", "failed") or s.closed, act)

    async def _resolve(self, st: NetState, host: str, port: int) -> tuple[list[str], bool]:
        """The addresses to try, and whether a rule naming the host allowed them (names need a rule)."""
        if normalize_ip(host) is not None:
            return [host], False
        named = [r for r in st.rules if r.host == host.lower() and (r.port is None or r.port == port)]
        if not named:
            with st.lock:
                st.stats["refused"] += 1
            st.log_refused(host, port, " (no rule names this host)")
            raise GuestError(ECONNREFUSED)
        try:
            infos = await st.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            raise GuestError(EHOSTUNREACH) from None
        return list(dict.fromkeys(str(i[4][0]) for i in infos)), True

    def _send(self, st: NetState, mem: wt.GuestMemory, a: Sequence[int]) -> Any:
        s = st.get(a[0])
        ptr, length, flags = a[1], a[2], a[3]
        if length < 0:
            return [-EINVAL]
        if s.kind != "conn":
            return [-ENOTCONN] if s.kind != "failed" else [-s.error or -ENOTCONN]
        if length and not mem.check(ptr, length):
            return [-EFAULT]
        if not st.throttle_until and not s.write_blocked and s.out_pending < st.limits.buffer_bytes:
            return self._send_now(st, s, mem, ptr, length)  # the common case: room now, no op, no closures

        def space() -> bool:
            return s.closed or s.transport is None or s.error != 0 or (
                not s.write_blocked and s.out_pending < st.limits.buffer_bytes)

        def act(mem: wt.GuestMemory) -> Sequence[int]:
            return self._send_now(st, s, mem, ptr, length)

        if not space() and flags & NONBLOCK:
            return [-EAGAIN]
        return self._suspend(st, mem, "net_send", [s], space, act, throttled=True)

    def _send_now(self, st: NetState, s: GSock, mem: wt.GuestMemory, ptr: int, length: int) -> Sequence[int]:
        if s.closed:
            return [-EBADF]
        t = s.transport
        if t is None or s.error:
            return [-(s.error or EPIPE)]
        n = min(length, MAX_IO, st.limits.buffer_bytes - s.out_pending) if length else 0
        if n <= 0:
            return [0]
        if st.limiter.enabled:
            self._charge(st, n)
        st.stats["bytes_out"] += n
        done = 0
        if s.fd >= 0 and not s.outq and not s.flush_scheduled and not t.is_closing() \
                and t.get_write_buffer_size() == 0:
            # Nothing is queued anywhere before these bytes (we hold the lock flush() writes under, and the
            # transport's buffer is empty, so libuv is not writing this socket): send them from this vCPU
            # thread, without a hand-off to the event loop. What the kernel does not take goes the usual way.
            try:
                done = os.write(s.fd, mem.view(ptr, n))
            except OSError:  # would block, or the connection failed: the transport finds out and reports it
                done = 0
            if done == n:
                return [n]
        data = mem.read(ptr + done, n - done)
        s.out_pending += n - done
        s.outq.append(data)
        if not s.flush_scheduled:  # else the flush already queued takes this chunk too, in order
            s.flush_scheduled = True
            st.loop.call_soon_threadsafe(st.flush, s, t)
        return [n]

    def _recv(self, st: NetState, mem: wt.GuestMemory, a: Sequence[int]) -> Any:
        s = st.get(a[0])
        ptr, length, flags = a[1], a[2], a[3]
        if length < 0:
            return [-EINVAL]
        if s.kind != "conn":
            return [-ENOTCONN] if s.kind != "failed" else [-s.error or -ENOTCONN]
        if length == 0:
            return [0]
        if not mem.check(ptr, min(length, MAX_IO)):
            return [-EFAULT]
        if not s.rbuf.size and not st.throttle_until and s.fd >= 0 and not s.armed and not s.eof and not s.error:
            res = self._recv_direct(st, s, mem, ptr, length)  # the common case: one read(2), no op, no closures
            if res is not None:
                return res

        def readable() -> bool:
            return s.rbuf.size > 0 or s.eof or s.closed or bool(s.error) or _kernel_readable(s)

        def act(mem: wt.GuestMemory) -> Sequence[int]:
            return self._recv_now(st, s, mem, ptr, length)

        if not readable() and flags & NONBLOCK:
            return [-EAGAIN]
        return self._suspend(st, mem, "net_recv", [s], readable, act, throttled=True)

    def _recv_direct(self, st: NetState, s: GSock, mem: wt.GuestMemory, ptr: int, length: int) -> list[int] | None:
        """Read the connection straight into guest memory (lock held; the loop is not reading it). None:
        nothing there yet."""
        try:
            n = os.readv(s.fd, [mem.view(ptr, min(length, MAX_IO))])
        except BlockingIOError:
            return None
        except OSError as e:
            s.error = _HOST_ERRNO.get(e.errno or 0, ECONNRESET)
            return [-s.error]
        if n == 0:
            s.eof = True
            return [0]
        st.stats["bytes_in"] += n
        if st.limiter.enabled:
            self._charge(st, n)
        return [n]

    def _recv_now(self, st: NetState, s: GSock, mem: wt.GuestMemory, ptr: int, length: int) -> Sequence[int]:
        if s.closed:
            return [-EBADF]
        rbuf = s.rbuf
        if not rbuf:
            if s.fd >= 0 and not s.armed and not s.eof and not s.error:
                res = self._recv_direct(st, s, mem, ptr, length)
                # None: the socket looked readable and was not (a spurious wake-up); never report EOF for it
                return res if res is not None else [-EAGAIN]
            if s.error:
                return [-s.error]
            if s.eof or s.fd < 0:
                return [0]
            return [-EAGAIN]  # the loop reads it and has delivered nothing yet: not the end of the stream
        n = rbuf.take_into(mem.view(ptr, min(length, len(rbuf), MAX_IO)))
        self._charge(st, n)
        if s.reading_paused and len(rbuf) < st.limits.buffer_bytes // 2 and s.transport is not None and s.fd < 0:
            s.reading_paused = False
            st.loop.call_soon_threadsafe(s.transport.resume_reading)
        return [n]

    def _close(self, st: NetState, mem: wt.GuestMemory, a: Sequence[int]) -> Any:
        s = st.get(a[0])
        st.close_sock(s)
        return [0]

    def _poll(self, st: NetState, mem: wt.GuestMemory, a: Sequence[int]) -> Any:
        return self._poll_common(st, mem, a[0], a[1], a[2], None)

    def _poll_recv(self, st: NetState, mem: wt.GuestMemory, a: Sequence[int]) -> Any:
        """net_poll, and in the same call a receive from the first connection it reports readable into
        ``buf``: the guest then reads that message without a call of its own (one exit per message
        instead of two). ``out`` gets {i32 index of that entry or -1; i32 what net_recv would have
        returned: bytes, 0 at the end of the stream, or -errno}."""
        fds_ptr, nfds, timeout_ms, buf, buf_len, out = a
        if buf_len < 0:
            return [-EINVAL]
        if buf_len and not mem.check(buf, min(buf_len, MAX_IO)) or not mem.check(out, _RX.size):
            return [-EFAULT]
        return self._poll_common(st, mem, fds_ptr, nfds, timeout_ms, (buf, buf_len, out))

    def _poll_common(self, st: NetState, mem: wt.GuestMemory, fds_ptr: int, nfds: int, timeout_ms: int,
                     rx: tuple[int, int, int] | None) -> Any:
        if not 0 <= nfds <= MAX_POLL_FDS:
            return [-EINVAL]
        raw = bytearray(mem.view(fds_ptr, nfds * 8)) if nfds else bytearray()  # (no fds: any pointer, as poll(2))
        get = st.socks.get
        entries = [(sd, events, get(sd)) for sd, events, _ in _POLLFD.iter_unpack(raw)]
        limit = st.limits.buffer_bytes

        def answer(mem: wt.GuestMemory, n: int) -> Sequence[int]:
            if rx is not None:
                self._receive_first(st, mem, entries, raw, rx)
            mem.write(fds_ptr, raw)
            return [n]

        n = _scan(entries, raw, limit)
        if n or timeout_ms == 0:  # the common case: answer now with what one scan found
            return answer(mem, n)

        timed_out = [False]
        found = [0]  # what the last check found (its revents are in ``raw``), for act to answer with

        def check() -> bool:
            if timed_out[0]:
                return True
            found[0] = _scan(entries, raw, limit)
            return found[0] > 0

        def act(mem: wt.GuestMemory) -> Sequence[int]:
            # the check that let the op complete just scanned; what it found still holds (only the guest
            # consumes data, accepts or closes), so it is the answer, without a second scan
            n, found[0] = (found[0] or _scan(entries, raw, limit)), 0
            return answer(mem, n)

        op = NetOp("net_poll", st, [s for _, _, s in entries if s is not None], check,
                   lambda m: _errno_guard(act, m))
        if rx is not None and rx[1] > 0:
            def read_first(mem: wt.GuestMemory) -> Sequence[int] | None:
                # a socket just woke the waiting worker: the first connection asking for POLLIN most likely
                # has the message. Read it first; that read says it is readable, so the scan need not ask
                # the kernel about it (no poll(2) at all for a server with one busy connection)
                got = self._read_first(st, mem, entries, rx) if not st.throttle_until else None
                if got is None:
                    return None
                i, result, s = got
                n = _scan(entries, raw, limit, s)  # (readable: data, the end, or an error)
                mem.write(rx[2], _RX.pack(i, result))
                mem.write(fds_ptr, raw)
                return [n]
            op.fast = lambda m: _errno_guard(read_first, m)
        if timeout_ms > 0:
            def fire() -> None:
                with st.lock:
                    timed_out[0] = True
                    op.detach()
                op.set_result(None)

            def arm() -> None:
                if not op.cancelled and not op.ready():
                    op.timer = st.loop.call_later(timeout_ms / 1000.0, fire)
            st.loop.call_soon_threadsafe(arm)
        return op

    def _read_first(self, st: NetState, mem: wt.GuestMemory, entries: Sequence[tuple[int, int, GSock | None]],
                    rx: tuple[int, int, int]) -> tuple[int, int, GSock] | None:
        """net_poll_recv woken by a socket (lock held): if the first entry asking for POLLIN is a connection
        only the vCPU reads, with nothing buffered or ended, read it now. (index, net_recv's result, the
        socket) when that read got something (data, the end of the stream or an error), else None."""
        for i, (_, events, s) in enumerate(entries):
            if s is not None and events & POLLIN:
                if s.kind != "conn" or s.fd < 0 or s.armed or s.rbuf.size or s.eof or s.error or s.closed:
                    return None
                res = self._recv_direct(st, s, mem, rx[0], rx[1])
                return (i, res[0], s) if res is not None else None
        return None

    def _receive_first(self, st: NetState, mem: wt.GuestMemory, entries: Sequence[tuple[int, int, GSock | None]],
                       raw: bytearray, rx: tuple[int, int, int]) -> None:
        """net_poll_recv's receive (lock held): from the first connection whose entry asked for and got
        POLLIN, as a non-blocking net_recv would. Not once the rate limiter has held transfers back (the
        guest's own net_recv then waits it out)."""
        buf, buf_len, out = rx
        index, result = -1, 0
        if buf_len > 0 and not st.throttle_until:
            for i, (_, events, s) in enumerate(entries):
                if s is not None and s.kind == "conn" and events & POLLIN and raw[i * 8 + 6] & POLLIN:
                    r = self._recv_now(st, s, mem, buf, buf_len)[0]
                    if r != -EAGAIN:  # (a readable socket that was not: nothing received)
                        index, result = i, r
                    break
        mem.write(out, _RX.pack(index, result))

    # ---- per VM
    async def attach(self, hv: DeviceHost, vm: GuestVm) -> None:
        self.loop = asyncio.get_running_loop()
        spec = vm.spec
        rules = [parse_egress(r) for r in spec.allow_egress]
        st = NetState(vm, self, self.loop, self.limits, rules)
        try:
            for p in spec.publish:
                info = PublishInfo(p.host_ip, p.host_port, p.guest_port)
                try:
                    srv = await self.loop.create_server(lambda gp=p.guest_port: st.inbound(gp),  # type: ignore[misc]
                                                        p.host_ip, p.host_port, reuse_address=True)
                except OSError as exc:
                    raise Conflict(f"cannot publish {p.host_ip}:{p.host_port}: {exc.strerror}",
                                   code="port_unavailable") from None
                info.host_port = srv.sockets[0].getsockname()[1]
                st.servers.append((info, srv))
        except BaseException:
            st.close()
            raise
        self.states.add(st)
        vm.devices.add(st)

    def metrics(self, hv: DeviceHost) -> list[Metric]:
        fam = CounterMetricFamily("microvmd_net_total", "Socket device counters per VM", labels=["vm", "counter"])
        for st in list(self.states):
            for k, v in st.stats.items():
                fam.add_metric([st.vm.id[:12], k], v)
        return [fam]

    async def shutdown(self) -> None:
        for st in list(self.states):
            st.close()


_POLLFD = struct.Struct("<ihh")
_RX = struct.Struct("<ii")  # net_poll_recv's out: entry index, receive result
_REVENTS = struct.Struct("<h")


def _revents(sd: int, events: int, s: GSock | None, limit: int, kernel: dict[int, int]) -> int:
    """poll(2) semantics for one guest descriptor (``limit``: the per-socket send buffer; ``kernel``: the
    poll(2) events of the connections the loop is not reading, by OS descriptor, from ``_poll_kernel``)."""
    if sd < 0:
        return 0
    if s is None or s.closed:
        return POLLERR
    kind = s.kind
    if kind == "listener":
        return POLLIN if s.backlog and events & POLLIN else 0
    if kind == "failed":
        return POLLERR
    if kind == "connecting":
        return 0
    r = 0
    # the kernel's side of a socket the loop is not reading; what it finds may be only the end of the
    # stream, which _kernel_event records as eof or error (reported below, not as data)
    data = False
    if not s.rbuf.size and not s.eof and not s.error:
        mask = kernel.get(s.fd, 0) if s.fd >= 0 else 0
        data = bool(mask) and _kernel_event(s, mask)
    if s.rbuf.size or (data and not s.eof and not s.error):
        if events & POLLIN:
            r = POLLIN
    elif s.eof:
        r = (POLLIN if events & POLLIN else 0) | POLLHUP
    if s.error:  # (with POLLIN, as Linux reports a reset: a read returns the error)
        r |= POLLERR | (POLLIN if events & POLLIN else 0)
    if events & POLLOUT and s.transport is not None and not s.write_blocked and s.out_pending < limit:
        r |= POLLOUT
    return r


_FD_SETSIZE = 1024
_POLL_RD = select.POLLIN | select.POLLPRI | getattr(select, "POLLRDHUP", 0x2000)
_POLL_END = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0x2000)
_MSG_PEEK_DONTWAIT = socket.MSG_PEEK | socket.MSG_DONTWAIT
_libc = ctypes.CDLL(None, use_errno=True)
_libc.recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.recv.restype = ctypes.c_ssize_t
_peek_byte = ctypes.create_string_buffer(1)


def _scan(entries: Sequence[tuple[int, int, GSock | None]], raw: bytearray, limit: int,
          read: GSock | None = None) -> int:
    """net_poll's look at its (sd, events, socket) entries: every revents written into ``raw`` (the guest's
    array of mv_pollfd, copied), and the number of entries with any (lock held). ``read``: a connection
    whose data this call has just received (net_poll_recv): readable, without asking the kernel."""
    n = 0
    kernel = _poll_kernel(entries, read)  # one poll(2) for the sockets the loop is not reading
    pack = _REVENTS.pack_into
    for i, (sd, events, s) in enumerate(entries):
        r = _revents(sd, events, s, limit, kernel)
        if s is read and read is not None and events & POLLIN:
            r |= POLLIN
        pack(raw, i * 8 + 6, r)
        if r:
            n += 1
    return n


_NO_EVENTS: dict[int, int] = {}


def _poll_kernel(entries: Sequence[tuple[int, int, GSock | None]], skip: GSock | None = None) -> dict[int, int]:
    """One poll(2) over the connections among ``entries`` (but ``skip``) that only the vCPU reads now,
    with nothing buffered or ended yet: their events by OS descriptor (lock held). Sockets the loop reads
    are not polled (what it read is in ``rbuf``)."""
    p = None
    for _, _, s in entries:
        if s is not None and s is not skip and s.fd >= 0 and not s.armed and s.kind == "conn" \
                and not s.rbuf.size and not s.eof and not s.error and not s.closed:
            if p is None:
                p = select.poll()
            p.register(s.fd, _POLL_RD)
    if p is None:
        return _NO_EVENTS
    try:
        return dict(p.poll(0))
    except OSError:
        return _NO_EVENTS


def _kernel_readable(s: GSock) -> bool:
    """Has the connection's socket data, EOF or an error the vCPU may read? Only while the loop is not
    reading it (then what the loop read is in ``rbuf``). One poll(2) of its own; see ``_kernel_event``."""
    if s.fd < 0 or s.armed or s.kind != "conn":
        return False
    p = select.poll()
    p.register(s.fd, _POLL_RD)
    try:
        ev = p.poll(0)
    except OSError:
        return False
    return bool(ev) and _kernel_event(s, ev[0][1])


def _kernel_event(s: GSock, mask: int) -> bool:
    """``mask`` (non-zero) is what poll(2) says of the connection's socket: is there something for the
    guest to read? At the end of the stream it records ``eof`` or ``error`` as the loop's callbacks would
    have (lock held)."""
    if mask & _POLL_END and not s.eof and not s.error:
        # the peer finished or failed: EOF only once no data is left (a peek, which consumes nothing)
        n = _libc.recv(s.fd, _peek_byte, 1, _MSG_PEEK_DONTWAIT)
        if n == 0:
            s.eof = True
        elif n < 0:
            err = ctypes.get_errno()
            if err not in (_errno.EAGAIN, _errno.EWOULDBLOCK, _errno.EINTR):
                s.error = _HOST_ERRNO.get(err, ECONNRESET)
            else:
                return False
    return True


_Answer = TypeVar("_Answer", Sequence[int], Sequence[int] | None)


def _errno_guard(act: Callable[[wt.GuestMemory], _Answer], mem: wt.GuestMemory) -> _Answer | list[int]:
    """``act(mem)``, with the device's errors as the guest's answer (a negative errno), never a trap."""
    try:
        return act(mem)
    except wt.HostTrap:
        raise
    except Exception as exc:
        return [-errno_of(exc, log, "microvm_net call")]

