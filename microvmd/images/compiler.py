"""Compilation that cannot stall or bloat the daemon (issue 13 item 4, row 5).

A module with 100,000 functions takes seconds of every core to compile and about a gigabyte that the
allocator keeps after it. So:

- **Admission.** An import holds one of ``compile_jobs + compile_queue`` slots from its first byte of work
  to its answer; one more is ``503 compile_busy`` (retry later), never a queue that grows without bound.
  One client (a process on the Unix socket, an address on TCP) holds at most half of the slots, so it
  cannot fill the pool and keep others out.
- **Its own pool.** Imports run on a pool of ``compile_jobs`` threads of their own, never on the I/O pool
  that snapshots, ``ps`` and ``logs`` use, and a compile holds no lock they need.
- **A child process for big modules.** A module of ``INLINE_BYTES`` or more is compiled by
  ``python -m microvmd.images.compile_child`` at a low priority, under ``compile_memory`` of address space
  and ``compile_timeout`` of wall clock, killed with the daemon. It writes the compiled code (wasmtime's
  serialized module) to the image's cache file, which the daemon maps: the compile's memory goes back to
  the system when the child exits. Small modules compile in the daemon's own thread (a child costs about
  0.2 s to start).
- **A ceiling.** A module with more than ``max_functions`` functions is refused before any compile (422).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import wasmtime

from ..engine import wt
from ..errors import MicrovmError, Unprocessable

log = logging.getLogger("microvmd.images")

T = TypeVar("T")
INLINE_BYTES = 256 * 1024  # smaller modules compile in-process: a few ms, a few MB


class CompileBusy(MicrovmError):
    status = 503
    code = "compile_busy"


@dataclass(frozen=True)
class CompileLimits:
    jobs: int = 1                   # imports compiled at once (threads of the compile pool)
    queue: int = 8                  # imports waiting beyond those; one more is 503 compile_busy
    timeout: float = 300.0          # wall clock of one compile in its child process
    memory: int = 4 << 30           # address space of that child
    max_functions: int = 1_000_000  # functions (imported and defined) one module may have
    inline_bytes: int = INLINE_BYTES


class Compiler:
    """The compile pool, its admission, and ``compile`` (sync, on a compile or I/O thread)."""

    def __init__(self, opts: wt.EngineOptions, engine: wasmtime.Engine, limits: CompileLimits) -> None:
        self.opts = opts
        self.engine = engine
        self.limits = limits
        self.pool = ThreadPoolExecutor(max(1, limits.jobs), thread_name_prefix="compile")
        self.admitted = 0
        self.by_client: dict[str, int] = {}  # slots each client holds now
        self.refused = 0
        self.children = 0  # compiles done in a child process (for tests and metrics)
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def places(self) -> int:
        return max(1, self.limits.jobs) + self.limits.queue

    @property
    def share(self) -> int:
        """The places one client may hold at once: half of them (at least one)."""
        return max(1, self.places // 2)

    @contextlib.asynccontextmanager
    async def slot(self, wait: bool = False, client: str | None = None) -> AsyncIterator[None]:
        """One import's place (on the event loop). When every place is taken, or ``client`` holds its
        share already: CompileBusy, or with ``wait`` (the daemon's own imports at start-up) the next place
        that frees."""
        if client is not None and self.by_client.get(client, 0) >= self.share:
            self.refused += 1
            raise CompileBusy(f"this client ({client}) has {self.by_client[client]} imports being compiled or "
                              f"waiting, its share of the compile pool (half of limits.compile_jobs + "
                              f"limits.compile_queue); retry when one is answered")
        while self.admitted >= self.places:
            if not wait:
                self.refused += 1
                raise CompileBusy(f"{self.admitted} imports are being compiled or waiting for it "
                                  f"(limits.compile_jobs + limits.compile_queue); retry later")
            freed = asyncio.get_running_loop().create_future()
            self._waiters.append(freed)
            await freed
        self.admitted += 1
        if client is not None:
            self.by_client[client] = self.by_client.get(client, 0) + 1
        try:
            yield
        finally:
            self.admitted -= 1
            if client is not None:
                n = self.by_client.pop(client) - 1
                if n:
                    self.by_client[client] = n
            while self._waiters:
                waiter = self._waiters.pop(0)
                if not waiter.done():
                    waiter.set_result(None)
                    break

    async def on_pool(self, fn: Callable[..., T], *args: Any) -> T:
        """Run an import's blocking step on the compile pool (not the daemon's I/O pool)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def check_size(self, functions: int) -> None:
        if functions > self.limits.max_functions:
            raise Unprocessable(f"the module has {functions} functions, more than limits.max_functions "
                                f"({self.limits.max_functions})", code="too_many_functions")

    def compile(self, data: bytes, cache: Path) -> wasmtime.Module:
        """``data`` compiled; a big module in a child process that writes ``cache`` (then mapped from it),
        a small one here (the caller writes the cache). Unprocessable when wasmtime refuses it or the child
        passes its limits."""
        if len(data) < self.limits.inline_bytes:
            try:
                return wasmtime.Module(self.engine, data)
            except wasmtime.WasmtimeError as exc:
                raise Unprocessable(f"invalid module: {first_line(exc)}", code="invalid_module") from None
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.{id(data):x}.tmp")
        argv = [*_wrapper(self.limits.memory), sys.executable, "-m", "microvmd.images.compile_child",
                json.dumps(asdict(self.opts)), str(tmp)]
        try:
            try:
                proc = subprocess.run(argv, input=data, capture_output=True, timeout=self.limits.timeout,
                                      check=False)
            except subprocess.TimeoutExpired:
                raise Unprocessable(f"compiling the module took more than limits.compile_timeout "
                                    f"({self.limits.timeout:g} s)", code="compile_timeout") from None
            if proc.returncode != 0:
                err = proc.stderr.decode("utf-8", "replace").strip()
                if proc.returncode == 2 and err.startswith("invalid module:"):
                    raise Unprocessable(err.splitlines()[0][:500], code="invalid_module")
                log.warning("compile child exited with %s: %s", proc.returncode, err[-500:])
                raise Unprocessable(f"compiling the module failed (status {proc.returncode}; "
                                    f"limits.compile_memory is {self.limits.memory >> 20} MiB)",
                                    code="compile_failed")
            os.replace(tmp, cache)
            self.children += 1
            return wasmtime.Module.deserialize_file(self.engine, str(cache))
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _wrapper(memory: int) -> list[str]:
    """Low priority, killed with the daemon, limited address space: through ``nice``, ``setpriv`` and
    ``prlimit`` rather than a preexec_fn (which would make Python fork() the whole daemon)."""
    out = []
    if (nice := shutil.which("nice")) is not None:
        out += [nice, "-n", "10"]
    if (setpriv := shutil.which("setpriv")) is not None:
        out += [setpriv, "--pdeathsig", "KILL"]
    if memory and (prlimit := shutil.which("prlimit")) is not None:
        out += [prlimit, f"--as={memory}", "--"]
    return out


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
