"""The WASI console: a VM's stdout and stderr, appended to per-VM files and kept under a cap.

Two ways in (``engine.console``; ``auto``, the default, picks ``file`` while the VMs' log descriptors stay
within half of RLIMIT_NOFILE and ``hook`` for VMs beyond that):

- ``file`` (default): wasmtime opens the two log files when the VM is built and writes them itself; a guest
  write is one ``write(2)`` on the vCPU thread. A live VM holds its two descriptors (the shipped unit sets
  LimitNOFILE=1048576); a finished one closes them with its store.
- ``hook``: guest writes reach ``write`` through wasmtime's custom-output hook, which wasmtime calls on one
  of its own runtime threads: the file is opened, appended to and kept open for the rest of the slice, so
  an idle VM holds no descriptor. Each write then costs two thread hand-offs inside wasmtime plus the GIL
  (33-41 µs in bench/bench_console.py), which is why it is not the default.

Once a stream exceeds twice its cap, the oldest bytes are released with FALLOC_FL_PUNCH_HOLE: the file
keeps its logical size (offsets stay valid for followers) but only the last ``cap`` bytes use disk, and
readers start at ``size - cap``. In file mode the daemon cannot see writes as they happen, so the cap is
checked after a VM's slices at most every ``CHECK_EVERY`` seconds, and when it finishes.

A VM's output rate is bounded too (``limits.log_rate`` bytes a second, ``limits.log_burst`` at once; see
``LogRate``): nothing is dropped for it, a VM that writes faster is held off its vCPU until its budget has
refilled, as a pipe that nobody reads fast enough holds its writer.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

log = logging.getLogger("microvmd.console")

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

STREAMS = ("stdout", "stderr")


CHECK_EVERY = 0.25  # file mode: seconds between cap checks of a VM that keeps running


class LogRate:
    """A VM's console output budget: a token bucket of ``burst`` bytes refilled at ``rate`` bytes a second,
    charged (on the event loop, at the end of a slice that wrote) with what the guest wrote since the last look.

    When the bucket is overdrawn, ``hold_for`` says how long the VM must stay off its vCPU for the bucket to
    be back at zero: the guest's average output rate stays at ``rate`` whatever it writes, and no byte is
    lost for it. In file mode the daemon sees the files' sizes only at its checks (every ``CHECK_EVERY``
    seconds, then after every slice while the VM writes, see ``Console.ran``), so a guest can pass its
    budget by what it writes before its first check, then by one slice's output; the hold pays for all of
    it. (A first check at once would cost every short VM two ``stat`` calls on the event loop.)"""

    __slots__ = ("rate", "burst", "tokens", "stamp", "seen", "holds", "held_s")

    def __init__(self, rate: int, burst: int) -> None:
        self.rate = rate
        self.burst = max(burst, 1)
        self.tokens = float(self.burst)
        self.stamp = time.monotonic()
        # the console's byte count at the last look; None: not looked yet, in this daemon (a VM from its record)
        self.seen: int | None = 0
        self.holds = 0  # times the VM was held
        self.held_s = 0.0  # seconds it was held, in all

    def hold_for(self, written: int) -> float:
        """``written``: every byte the console has taken so far. Seconds the VM must wait (0: none)."""
        seen, self.seen = self.seen, written
        new = written - seen if seen is not None else 0  # (the first look, after a daemon restart: a baseline)
        if new <= 0:
            return 0.0
        now = time.monotonic()
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate) - new
        self.stamp = now
        if self.tokens >= 0:
            return 0.0
        wait = -self.tokens / self.rate
        self.holds += 1
        self.held_s += wait
        return wait


class Console:
    def __init__(self, directory: Path, cap: int, rate: LogRate | None = None) -> None:
        self.dir = directory
        self.cap = cap
        self.rate = rate
        self.written = 0  # bytes in both logs at the last cap check (what the guest has written, in all)
        self.hot = False  # file mode: its last check found new output, under a rate: check after every slice
        self.released = {s: 0 for s in STREAMS}  # bytes punched out at the start of each stream
        self._trimming = False  # a hole punch is on its way on an I/O thread (enforce_cap)
        self._trim_lock = threading.Lock()
        self.dirty = False  # written since the last cap check
        self._fds: dict[str, int] = {}
        self.write_errors = 0
        self._next_check = time.monotonic() + CHECK_EVERY
        self.premade = False  # the directory and both (empty) logs exist already
        self.use_files = False  # file mode for this VM (decided at create, see Builder.console_mode)

    @property
    def trimming(self) -> bool:
        """A hole punch is on its way on an I/O thread (readers of the file should not wait on it here)."""
        return self._trimming

    def files(self) -> tuple[str, str]:
        """File mode: make the VM's directory (wasmtime creates the files in it) and name the two logs."""
        if not self.premade:
            self.dir.mkdir(parents=True, exist_ok=True)
        return str(self.path("stdout")), str(self.path("stderr"))

    def ran(self) -> None:
        """File mode, after a slice: the guest may have written; mark a cap check if one is due. Under an
        output rate, a VM whose last check found new output is checked after every slice (two ``stat``),
        so what it writes past its budget is at most one slice's worth."""
        if self.hot:
            self.dirty = True
            return
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + CHECK_EVERY
            self.dirty = True

    def path(self, stream: str) -> Path:
        return self.dir / f"{stream}.log"

    def writer(self, stream: str) -> Callable[[bytes], None]:
        """The custom-output callback for one stream. It must never raise (wasmtime would see 0 bytes
        written) and returns None, which wasmtime-py reports as "all bytes consumed"."""
        path = str(self.path(stream))
        open_fds = self._fds

        def write(data: bytes) -> None:
            self.dirty = True
            try:
                fd = open_fds.get(stream)
                if fd is None:  # kept open for the rest of the slice (see release)
                    try:
                        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
                    except FileNotFoundError:  # the VM's directory is made on first use
                        self.dir.mkdir(parents=True, exist_ok=True)
                        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
                    open_fds[stream] = fd
                os.write(fd, data)
            except OSError as exc:  # a full disk loses console output, never the guest
                self.write_errors += 1
                if self.write_errors == 1:
                    log.warning("console %s: %s (further errors are counted, not logged)", path, exc)
        return write

    def release(self) -> None:
        """Close the descriptors opened during a slice (called by the vCPU worker at slice end): a VM
        holds console descriptors only while it runs."""
        fds = list(self._fds.values())
        self._fds.clear()  # in place: the writers hold this dict
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def size(self, stream: str) -> int:
        try:
            return os.stat(self.path(stream)).st_size
        except FileNotFoundError:
            return 0

    def enforce_cap(self, trim_on: Executor | None = None) -> None:
        """Cheap when under the cap: one stat per stream. Called after slices that wrote output (on the loop,
        with ``trim_on`` its I/O pool) and when the VM's store goes (on an I/O thread, without). A stream
        past twice the cap has its head released with a hole punch, which can take a while on a big file:
        with ``trim_on`` that runs there, one trim at a time per console, and ``released`` moves when it
        is done (a reader meanwhile starts at the last ``cap`` bytes anyway, see start_offset)."""
        self.dirty = False
        written = 0
        cuts: list[tuple[str, int]] = []
        for s in STREAMS:
            size = self.size(s)
            written += size
            if size <= 2 * self.cap:
                continue
            cut = (size - self.cap) & ~0xFFF
            if cut > self.released[s]:
                cuts.append((s, cut))
        self.hot = self.rate is not None and written != self.written
        self.written = written
        if not cuts:
            return
        if trim_on is None:
            self._trim(cuts)
        elif not self._trimming:
            self._trimming = True
            try:
                trim_on.submit(self._trim_then_done, cuts)
            except RuntimeError:  # the pool is shut down (the daemon is stopping): here, then
                self._trim_then_done(cuts)

    def _trim_then_done(self, cuts: list[tuple[str, int]]) -> None:
        try:
            self._trim(cuts)
        finally:
            self._trimming = False

    def _trim(self, cuts: list[tuple[str, int]]) -> None:
        with self._trim_lock:  # (the store's last check, on another I/O thread, may trim at the same time)
            for s, cut in cuts:
                if cut <= self.released[s]:
                    continue
                try:
                    fd = os.open(self.path(s), os.O_WRONLY)
                except FileNotFoundError:  # (the VM was removed meanwhile)
                    continue
                try:
                    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, cut) != 0:
                        err = ctypes.get_errno()
                        if err != errno.EOPNOTSUPP:
                            log.warning("cannot trim %s: %s", self.path(s), os.strerror(err))
                        continue
                finally:
                    os.close(fd)
                self.released[s] = cut

    def start_offset(self, stream: str) -> int:
        return max(self.released[stream], self.size(stream) - self.cap)

    def read(self, stream: str, offset: int, limit: int = 1 << 20) -> tuple[bytes, int]:
        """Read from ``offset`` (clamped to what is kept); returns the data and the next offset."""
        offset = max(offset, self.start_offset(stream))
        try:
            with open(self.path(stream), "rb") as f:
                f.seek(offset)
                data = f.read(limit)
        except FileNotFoundError:
            return b"", offset
        return data, offset + len(data)


class MemoryConsole:
    """The console of an ephemeral VM: stdout and stderr kept in memory, the last ``cap`` bytes of each.

    Nothing touches the disk: an ephemeral VM (a function invocation, ``microvm run --rm``) writes no file
    at all. The interface is the file console's, so followers read it the same way: offsets count every
    byte the guest wrote, and bytes dropped from the front under the cap are skipped over.

    Guest writes arrive on wasmtime's runtime threads (the custom-output hook); readers are on I/O threads.
    """

    use_files = False
    premade = False

    trimming = False  # (nothing to punch: the interface is the file console's)

    def __init__(self, cap: int, rate: LogRate | None = None) -> None:
        self.cap = cap
        self.rate = rate
        self.dirty = False  # written since the last look (enforce_cap)
        self.written = 0  # what the guest has written, in all, at the last look
        self._buf = {s: bytearray() for s in STREAMS}
        self.released = {s: 0 for s in STREAMS}  # bytes dropped from the front of each stream
        self.write_errors = 0
        self._lock = threading.Lock()

    def writer(self, stream: str) -> Callable[[bytes], None]:
        buf = self._buf[stream]
        cap = self.cap
        slack = min(cap, 64 << 10)

        def write(data: bytes) -> None:  # never raises: wasmtime would see 0 bytes written
            self.dirty = True
            with self._lock:
                buf.extend(data)
                if len(buf) > cap + slack:  # trimmed back to the cap in steps of ``slack``
                    cut = len(buf) - cap
                    del buf[:cut]
                    self.released[stream] += cut
        return write

    def ran(self) -> None:
        pass

    def release(self) -> None:
        pass

    def enforce_cap(self, trim_on: Executor | None = None) -> None:
        """The cap is kept by the writers; this counts what was written, for the output rate."""
        self.dirty = False
        with self._lock:
            self.written = sum(self.released[s] + len(self._buf[s]) for s in STREAMS)

    def size(self, stream: str) -> int:
        with self._lock:
            return self.released[stream] + len(self._buf[stream])

    def read(self, stream: str, offset: int, limit: int = 1 << 20) -> tuple[bytes, int]:
        with self._lock:
            base = self.released[stream]
            buf = self._buf[stream]
            start = max(offset, base, base + len(buf) - self.cap)
            data = bytes(buf[start - base:start - base + limit])
        return data, start + len(data)

    def output(self, stream: str) -> bytes:
        """What is kept of one stream (at most ``cap`` bytes, the most recent)."""
        with self._lock:
            return bytes(self._buf[stream][-self.cap:])
