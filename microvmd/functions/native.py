"""Direct instances run natively (``microvmd/native/direct.c``): the loader, the job and a pool of workers.

A direct instance in Python (direct.py, ``DirectRunner._run``) holds the GIL for most of its ~140 us, so the
event loop and the instance take turns on one core. The native build runs the same instance, host calls
included, on worker threads that never take the GIL: the loop fills a job, hands it over (``submit``) and is
woken through an eventfd when it is done. The loop's share of a request is then the HTTP and the answer.

The build is optional. ``scripts/build-native`` (run by the package build and ``make native``) compiles it
with any C compiler; without it, or when it is a build of another source, direct instances run in Python and
the daemon says why at start-up (``unavailable``).
"""
from __future__ import annotations

import asyncio
import ctypes
import hashlib
import itertools
import logging
import select
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..engine import wt

log = logging.getLogger("microvmd.functions")
ABI = 2  # direct.c's MVD_ABI
SOURCE = Path(__file__).resolve().parents[1] / "native" / "direct.c"
LIBRARY = SOURCE.with_name("_direct.so")

# outcomes (direct.c: enum outcome)
EXIT, TRAP, FAILED, NEEDS_VM, INST_TRAP, INST_ERROR, SETUP = range(7)
# the host calls direct.c defines (mvd_host)
FD_READ, POLL_ONEOFF, POLL_ONEOFF_NO_STDIN, CLOCK_TIME_GET, FN_REQUEST, FN_RESPOND, FD_WRITE = range(7)

_U64, _I64, _I32, _P, _C = ctypes.c_uint64, ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.c_char_p


class Job(ctypes.Structure):
    """direct.c's ``struct job``: one run's inputs (kept alive by the structure's references to them) and
    outputs (``out``, ``err`` and the response are the C side's, freed by ``release``)."""
    _fields_ = [
        ("next", _P), ("id", _U64),
        ("engine", _P), ("pre", _P),
        ("names", _C), ("nresults", _C), ("nnames", _I32),
        ("argv", _C), ("argc", _I32),
        ("env", _C), ("envc", _I32),
        ("stdin_data", _C), ("stdin_len", _U64),
        ("has_request", _I32), ("request", _C), ("request_len", _U64),
        ("rewind", _C),
        ("mono_ns", _I64),
        ("fuel", _U64), ("deadline_ticks", _U64),
        ("memory", _I64), ("table_elements", _I64), ("instances", _I64), ("tables", _I64), ("memories", _I64),
        ("stdout_cap", _U64), ("stderr_keep", _U64),
        ("outcome", _I32), ("code", _I32),
        ("message", ctypes.c_char * 1024),
        ("out", _P), ("out_len", _U64), ("out_truncated", _I32),
        ("err", _P), ("err_len", _U64),
        ("instance_ns", _I64),
        ("resp_status", _I32), ("resp_headers", _P), ("resp_headers_len", _U64), ("resp_body", _P),
        ("resp_body_len", _U64),
        ("stdin_pos", _U64), ("mono0", _I64), ("needs_vm", _I32),
        ("out_room", _U64), ("err_total", _U64),
    ]


def _load() -> tuple[ctypes.CDLL | None, ctypes.CDLL | None, str | None]:
    """(the library through PyDLL, through CDLL, None) or (None, None, why not)."""
    if not LIBRARY.exists():
        return None, None, f"{LIBRARY.name} is not built (scripts/build-native, or make native)"
    try:
        fast = ctypes.PyDLL(str(LIBRARY))  # short calls keep the GIL: submit, drain, release
        slow = ctypes.CDLL(str(LIBRARY))  # the one that waits (stopping a pool) gives it up
    except OSError as exc:
        return None, None, f"{LIBRARY.name} does not load: {exc}"
    if fast.mvd_abi() != ABI:
        return None, None, f"{LIBRARY.name} is a build of another version (scripts/build-native)"
    fast.mvd_source.restype = ctypes.c_char_p
    if SOURCE.exists() and fast.mvd_source().decode() != hashlib.sha256(SOURCE.read_bytes()).hexdigest():
        return None, None, f"{LIBRARY.name} is a build of another {SOURCE.name} (scripts/build-native, or make native)"
    fast.mvd_job_size.restype = ctypes.c_size_t
    if fast.mvd_job_size() != ctypes.sizeof(Job):
        return None, None, f"{LIBRARY.name}'s job is not the one native.py declares"
    fast.mvd_init.restype = ctypes.c_bool
    fast.mvd_init.argtypes = [_C, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t,
                              ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
    why = ctypes.create_string_buffer(256)
    if not fast.mvd_init(wt.library_path().encode(), *wt.layouts(), why, len(why)):
        return None, None, f"{LIBRARY.name} cannot use this wasmtime: {why.value.decode(errors='replace')}"
    fast.mvd_host.restype = _P
    fast.mvd_host.argtypes = [ctypes.c_int]
    fast.mvd_pool_new.restype = _P
    fast.mvd_pool_new.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    fast.mvd_pool_fd.argtypes = [_P]
    fast.mvd_submit.argtypes = [_P, _P]
    fast.mvd_submit.restype = None
    fast.mvd_drain.argtypes = [_P, _P, ctypes.c_int]
    fast.mvd_release.argtypes = [_P]
    fast.mvd_release.restype = None
    slow.mvd_pool_stop.argtypes = [_P]
    slow.mvd_pool_stop.restype = None
    return fast, slow, None


_lib: ctypes.CDLL | None = None
_slow: ctypes.CDLL | None = None
_why: str | None = None
_loaded = False


def unavailable() -> str | None:
    """Why the native build cannot be used here, or None when it can."""
    global _lib, _slow, _why, _loaded
    if not _loaded:
        _lib, _slow, _why = _load()
        _loaded = True
    return _why


def host(which: int) -> int:
    """The address of one of direct.c's host calls (FD_READ...)."""
    assert _lib is not None
    return int(_lib.mvd_host(which))


def output(address: int | None, length: int) -> bytes:
    return ctypes.string_at(address, length) if address and length else b""


def release(job: Job) -> None:
    assert _lib is not None
    _lib.mvd_release(ctypes.byref(job))


_ids = itertools.count(1)


class Pool:
    """Native workers that run jobs; the event loop that submits them is woken through the pool's eventfd
    when some are done, and calls each job's ``finish`` there. ``run`` (blocking) is for callers without a
    loop (tests)."""

    def __init__(self, workers: int, nice: int = 0) -> None:
        assert _lib is not None, "unavailable() first"
        why = ctypes.create_string_buffer(256)
        self._ptr = _lib.mvd_pool_new(workers, nice, why, len(why))  # (nice: the workers', as vCPU workers')
        if not self._ptr:
            raise OSError(f"no native workers: {why.value.decode(errors='replace')}")
        self.fd: int = _lib.mvd_pool_fd(self._ptr)
        self.workers = workers
        self.closed = False
        # job id -> (the future or None, the job, its finish): what the run uses stays alive until it is done
        self._pending: dict[int, tuple[asyncio.Future[Any] | None, Job, Callable[[Job], Any]]] = {}
        self._ids = (ctypes.c_uint64 * 256)()
        self._loop: asyncio.AbstractEventLoop | None = None

    def submit(self, job: Job, finish: Callable[[Job], Any]) -> asyncio.Future[Any]:
        """Run ``job``. Once it has run, ``finish(job)`` is called on the loop, whether or not the future is
        still awaited (it gives back what the run held), and its value settles the future."""
        assert not self.closed, "Pool.submit after close"
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self.fd)
            loop.add_reader(self.fd, self._collect)
            self._loop = loop
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue(job, fut, finish)
        return fut

    def run(self, job: Job, finish: Callable[[Job], Any]) -> Any:
        """Run ``job`` and wait for it: ``finish(job)`` (no event loop may be using the pool)."""
        assert self._loop is None or self._loop.is_closed(), "Pool.run with a loop attached"
        assert not self.closed, "Pool.run after close"
        fut: asyncio.Future[Any] | None = None
        box: list[Any] = []
        self._queue(job, fut, lambda j: box.append(finish(j)))
        while job.id in self._pending:
            select.select([self.fd], [], [])
            self._collect()
        return box[0]

    def _queue(self, job: Job, fut: asyncio.Future[Any] | None, finish: Callable[[Job], Any]) -> None:
        job.id = next(_ids)
        self._pending[job.id] = (fut, job, finish)
        assert _lib is not None
        _lib.mvd_submit(self._ptr, ctypes.byref(job))

    def _collect(self) -> None:
        assert _lib is not None
        if self._ptr is None:
            return
        while True:
            n = _lib.mvd_drain(self._ptr, self._ids, len(self._ids))
            for i in range(n):
                self._settle(*self._pending.pop(self._ids[i]))
            if n < len(self._ids):
                return

    @staticmethod
    def _settle(fut: asyncio.Future[Any] | None, job: Job, finish: Callable[[Job], Any]) -> None:
        try:
            value = finish(job)
        except BaseException as exc:  # noqa: BLE001 - the awaiting request's failure, not the loop's
            if fut is not None and not fut.done():
                fut.set_exception(exc)
            else:
                log.exception("direct instance: finishing a run failed")
            return
        if fut is not None and not fut.done():
            fut.set_result(value)

    async def aclose(self) -> None:
        """Stop the workers once what is queued has run (each run is bounded by a quantum), and finish what
        ran. On the loop that submitted; the wait for the workers is on a thread."""
        ptr = self._closing()
        if ptr is None:
            return
        assert _slow is not None
        stop = asyncio.get_running_loop().run_in_executor(None, _slow.mvd_pool_stop, ptr)
        try:
            await asyncio.shield(stop)
        finally:  # (cancelled meanwhile: what ran is finished once the workers have ended)
            if stop.done():
                self._finish_all()
            else:
                stop.add_done_callback(lambda _: self._finish_all())

    def close(self) -> None:
        """``aclose`` for callers without a loop (tests): blocks until the workers end."""
        ptr = self._closing()
        if ptr is None:
            return
        assert _slow is not None
        _slow.mvd_pool_stop(ptr)
        self._finish_all()

    def _closing(self) -> int | None:
        """The pool's pointer, taken for its stop (None when it is closed already): no job is taken any more."""
        if self.closed:
            return None
        self.closed = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.fd)
        ptr, self._ptr = self._ptr, None
        return ptr  # type: ignore[no-any-return]

    def _finish_all(self) -> None:
        pending, self._pending = self._pending, {}
        for fut, job, finish in pending.values():  # (all have run: the workers ended after the queue)
            self._settle(fut, job, finish)
