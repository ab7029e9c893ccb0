"""Direct instances: a WAGI request run as one plain wasmtime instance, start to end, in one vCPU job.

A WAGI function's request needs none of what makes a VM a VM: no id, no record, no console file, no API
object, no snapshot. For the common case, a program that reads its request, writes its answer and ends
within one scheduler quantum, the gateway runs it here: a store, its WASI context (the CGI environment,
the body as stdin, stdout and stderr captured in memory) and an instance made from the image's
pre-linked module, then the entry called to its end, all in one job on a vCPU worker (tens of
microseconds of setup instead of a VM's milliseconds: docs/functions.md, "Direct instances").

The run is bounded as one slice of a VM is: at most one scheduler quantum of wall time (an epoch deadline)
and one fuel slice, under the function's memory limit and the daemon's memory budget. A request that needs
more, or a guest that would have to wait (a ``poll_oneoff`` on a clock), is not failed: the run is dropped
and the request runs again from the start as an ephemeral VM, which time-slices, suspends and honours the
function's own timeout and fuel. That is safe because nothing of a direct run leaves it (no file system, no
network, output only in memory) and a fresh instance is deterministic up to clocks and random numbers.

Only modules whose imports are all WASI preview 1 qualify (with, for a module rewritten with Asyncify at
import, the three calls the rewrite renames to ``microvm_wasi``, served here without suspending); anything
else (devices of the guest SDK) takes the VM path.
"""
from __future__ import annotations

import logging
import math
import os
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import wasmtime

from ..devices import fnio
from ..devices import wasip1 as p1
from ..engine import wt
from ..images import wasmbin
from ..images.asyncify import STATE_NORMAL, STATE_REWINDING
from ..images.rewrite import HOST_MODULE, RENAMED, WASI
from ..vmm.budget import MemoryBudget
from ..vmm.scheduler import VCPU_NICE
from . import native

log = logging.getLogger("microvmd.functions")
DEFAULT_RESERVATION = 4 << 30  # wasmtime's memory reservation on a 64-bit host when none is configured
I32 = wasmtime.ValType.i32()
I64 = wasmtime.ValType.i64()
STDERR_KEEP = 4096  # bytes of stderr kept for the function's log (its last ones)
BIG_OUTPUT = 1 << 20  # a run's output files above this are emptied when it ends
# bytes at the start of a pooled slot's memory (and its stack and table) reset in place when an instance ends,
# instead of being unmapped and faulted in again by the next: each such page-table change costs a TLB
# shoot-down across the daemon's threads, which made two native workers slower than one (bench_functions)
KEEP_RESIDENT = 2 << 20
_RENAMED = frozenset(f"{HOST_MODULE}.{name}" for name in RENAMED)
_FN = frozenset(f"{fnio.HOST_MODULE}.{name}" for name in ("fn_request", "fn_respond"))


@dataclass(slots=True)
class Limits:
    fuel: int | None  # the function's own fuel budget (None: unlimited)
    memory: int  # bytes of linear memory
    timeout: float  # the function's own timeout, in seconds
    table_elements: int
    instances: int
    tables: int
    memories: int


@dataclass(slots=True)
class Ended:
    """How a direct run ended: ``reason`` is ``exit`` (with ``code``), ``out_of_fuel``, ``timeout``,
    ``stack_overflow`` or ``trap`` (``message``)."""
    reason: str
    code: int | None
    message: str
    stdout: bytes
    stdout_truncated: bool
    stderr: bytes
    instance_s: float  # from the store's creation to the instance, ready to run


class _Outputs:
    """A vCPU worker's stdout and stderr for direct runs: two memory files (``memfd``), which wasmtime opens by
    their ``/proc/self/fd`` path, truncating them, at every run. (wasmtime-py's in-process output callback
    costs a runtime-thread hop and a GIL round trip per write: 150 us of a hello-world run.) What a run
    writes is held until the next run truncates them; past ``cap`` it is not read."""

    def __init__(self) -> None:
        self.out = os.memfd_create("microvmd-direct-stdout", os.MFD_CLOEXEC)
        try:
            self.err = os.memfd_create("microvmd-direct-stderr", os.MFD_CLOEXEC)
        except OSError:
            os.close(self.out)
            raise
        self.out_path = f"/proc/self/fd/{self.out}".encode()
        self.err_path = f"/proc/self/fd/{self.err}".encode()
        self._sizes: tuple[int, int] | None = None  # what ``read`` found, for ``release``

    def read(self, cap: int) -> tuple[bytes, bool, bytes]:
        """(stdout up to ``cap``, whether it went beyond, the last STDERR_KEEP bytes of stderr)."""
        size = os.fstat(self.out).st_size
        out = os.pread(self.out, min(size, cap), 0) if size else b""
        esize = os.fstat(self.err).st_size
        err = os.pread(self.err, min(esize, STDERR_KEEP), max(0, esize - STDERR_KEEP)) if esize else b""
        self._sizes = (size, esize)
        return out, size > cap, err

    def release(self) -> None:
        """After every run, read or dropped: a big output is not kept until the next run truncates it."""
        sizes, self._sizes = self._sizes, None
        if sizes is None:  # (a run that went on as a VM: not read)
            sizes = (os.fstat(self.out).st_size, os.fstat(self.err).st_size)
        if max(sizes) > BIG_OUTPUT:
            os.ftruncate(self.out, 0)
            os.ftruncate(self.err, 0)


def _outputs() -> _Outputs:
    outs: _Outputs | None = getattr(_current, "outputs", None)
    if outs is None:
        outs = _current.outputs = _Outputs()
    return outs


class _Run:
    """What the host functions of one run see (one run per vCPU worker at a time: a thread-local)."""

    __slots__ = ("stdin", "pos", "mono0", "needs_vm", "part", "rewinding")

    def __init__(self, stdin: bytes, part: fnio.FnPart | None) -> None:
        self.stdin = stdin
        self.pos = 0
        self.mono0 = time.monotonic_ns()
        self.needs_vm = False  # the guest asked for what only a VM gives: the request goes to one
        self.part = part  # an SDK function's request and response
        self.rewinding: str | None = None  # a resumed guest's Asyncify state global, until it is back


_current = threading.local()


def qualifies(imports: list[str], kind: str) -> bool:
    """Whether a module with these imports can run as a direct instance: WASI preview 1 only (a WAGI
    program), or that and the request calls of ``microvm_fn`` (an SDK function)."""
    return kind in ("wasi", "sdk") and all(i.startswith(f"{WASI}.") or i in _RENAMED or i in _FN for i in imports)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A module loaded into a runner's engine and pre-linked against its linker (``DirectRunner.load``)."""
    module: wasmtime.Module
    pre: wasmtime.InstancePre
    results: dict[str, int]  # result count of each exported function (a call must make room for them)
    memory: int  # bytes of linear memory an instance starts with (charged to the budget while it runs)
    # native jobs made ready but for the request, by (entry, boot, argv, rewind, mono_ns) (DirectRunner._job)
    templates: dict[tuple[Any, ...], native.Job] = field(default_factory=dict, compare=False)


class DirectRunner:
    """Direct instances for the daemon's engine: a linker with wasmtime's WASI and the three renamed calls,
    a pre-linked module per image, and the run itself (``run``, on a vCPU worker)."""

    def __init__(self, engine: wasmtime.Engine, epoch_interval: float, quantum: float, fuel_slice: int,
                 budget: MemoryBudget | None, modules_from: wasmtime.Engine | None = None,
                 native_workers: int | None = None) -> None:
        """``native_workers``: run instances on that many native workers (native.py) when the native build is
        there; None runs them in Python, on the caller's thread."""
        self.engine = engine  # (see ``for_daemon``: an engine of its own, with the pooling allocator)
        self._engine_of_modules = modules_from or engine  # the engine the modules given to ``load`` are for
        self.max_memory: int | None = None  # a pooled slot's memory at most: a larger limit is the VM path's
        self.epoch_interval = epoch_interval
        self.quantum = quantum
        self.fuel_slice = fuel_slice
        self.budget = budget
        self.linker = wasmtime.Linker(engine)
        self.linker.allow_shadowing = True
        self.linker.define_wasi()
        self.runs = 0
        self.fallbacks = 0
        self.pool: native.Pool | None = None
        self._engine = wt.engine_address(engine)
        if native_workers is not None:
            why = native.unavailable()
            if why is None:
                self.pool = native.Pool(native_workers, VCPU_NICE)
                self._define_native()
                return
            log.warning("direct instances run in Python, not natively: %s", why)
        wt.define_host_func(self.linker, HOST_MODULE, "fd_read", ["i32"] * 4, ["i32"], _fd_read)
        # waits are served here under both names: a module not rewritten at import (--no-asyncify) imports
        # wasmtime's own poll_oneoff, whose sleep would hold the worker (its fd_read stays wasmtime's, as in a
        # VM: no body reaches such a module either way)
        wt.define_host_func(self.linker, HOST_MODULE, "poll_oneoff", ["i32"] * 4, ["i32"], _poll_oneoff)
        wt.define_host_func(self.linker, WASI, "poll_oneoff", ["i32"] * 4, ["i32"], _poll_oneoff_no_stdin)
        wt.define_host_func(self.linker, HOST_MODULE, "clock_time_get", ["i32", "i64", "i32"], ["i32"], _clock)
        wt.define_host_func(self.linker, fnio.HOST_MODULE, "fn_request", ["i32", "i32"], ["i32"], _fn_request)
        wt.define_host_func(self.linker, fnio.HOST_MODULE, "fn_respond", ["i32"] * 5, ["i32"], _fn_respond)

    def _define_native(self) -> None:
        """The same host calls, as native.py's C functions."""
        for module, name, params, host in (
                (HOST_MODULE, "fd_read", ["i32"] * 4, native.FD_READ),
                (HOST_MODULE, "poll_oneoff", ["i32"] * 4, native.POLL_ONEOFF),
                (WASI, "poll_oneoff", ["i32"] * 4, native.POLL_ONEOFF_NO_STDIN),
                (HOST_MODULE, "clock_time_get", ["i32", "i64", "i32"], native.CLOCK_TIME_GET),
                (fnio.HOST_MODULE, "fn_request", ["i32", "i32"], native.FN_REQUEST),
                (fnio.HOST_MODULE, "fn_respond", ["i32"] * 5, native.FN_RESPOND),
                (WASI, "fd_write", ["i32"] * 4, native.FD_WRITE)):
            wt.define_native_host_func(self.linker, module, name, params, ["i32"], native.host(host))

    def close(self) -> None:
        """Stop the native workers (after what is queued has run); for callers without a loop (tests)."""
        if self.pool is not None:
            self.pool.close()

    async def aclose(self) -> None:
        """Stop the native workers (after what is queued has run), from the loop that submitted."""
        if self.pool is not None:
            await self.pool.aclose()

    @classmethod
    def for_daemon(cls, engine: wasmtime.Engine, opts: wt.EngineOptions, limits: Any, workers: int,
                   epoch_interval: float, quantum: float, fuel_slice: int, budget: MemoryBudget | None) -> DirectRunner:
        """The daemon's runner: an engine of its own, the daemon's in all that changes compiled code (so the
        daemon's compiled modules load into it), with wasmtime's pooling allocator: a direct instance takes a
        slot whose memory stays mapped instead of mapping a new one (about 15 us of each instance here). One
        run at a time per worker: two slots per vCPU worker leave room. Native workers are one fewer than the
        vCPU workers (at least one): a gateway request needs the event loop as much as its instance, and with
        as many workers as cores the loop lost its core to them (bench_functions, p99 at half rate)."""
        # a slot cannot outgrow the engine's memory reservation (wasmtime aborts the process on such a
        # configuration, it does not return an error): wasmtime's default is 4 GiB on a 64-bit host
        reservation = DEFAULT_RESERVATION if opts.memory_reservation is None else opts.memory_reservation
        max_memory = min(limits.max_memory, reservation)
        pool = wt.PoolOptions(slots=2 * workers, max_memory=max_memory, table_elements=limits.table_elements,
                              keep_resident=KEEP_RESIDENT)
        runner = cls(wt.make_engine(opts, pool), epoch_interval, quantum, fuel_slice, budget, modules_from=engine,
                     native_workers=max(1, workers - 1))
        runner.max_memory = max_memory
        return runner

    def load(self, module: wasmtime.Module) -> Prepared:
        """``module`` (compiled for ``modules_from``, an engine of the same options) loaded into this runner's
        engine and pre-linked (off the loop: loading a module is not loop work). What holds the result holds
        the module: there is no cache to forget."""
        if self.engine is not self._engine_of_modules:
            module = wasmtime.Module.deserialize(self.engine, module.serialize())
        results = {e.name: len(e.type.results) for e in module.exports if isinstance(e.type, wasmtime.FuncType)}
        types: list[Any] = [e.type for e in module.imports] + [e.type for e in module.exports]
        # (the first memory's: one exported under two names is one memory, and direct instances allow one)
        memory = next((int(t.limits.min) for t in types if isinstance(t, wasmtime.MemoryType)), 0) * 65536
        return Prepared(module, self.linker.instantiate_pre(module), results, memory)

    # ------------------------------------------------------------------ the run (a vCPU worker)
    def run(self, prepared: Prepared, entry: str, boot: list[str], argv: list[str], env: dict[str, str],
            stdin: bytes, lim: Limits, stdout_cap: int, rewind: str | None = None, part: fnio.FnPart | None = None,
            mono_ns: int = 0) -> Ended | None:
        """Run the instance to its end; None when the request must run as a VM instead (module docstring).
        ``rewind``: the module is a snapshot baked into a module (``bake``), whose Asyncify state global of this
        name starts as "rewinding": the entry rewinds into the call the snapshot was taken in. ``part``: an
        SDK function's request, which gets its response. ``mono_ns``: where the monotonic clock stands at the
        start (a snapshot's, which goes on from there)."""
        if self.pool is not None:
            made = self._job(prepared, entry, boot, argv, env, stdin, lim, stdout_cap, rewind, part, mono_ns)
            if made is None:
                return None
            job, tpl = made
            return self.pool.run(job, lambda j: self._finished(j, prepared, lim, part, tpl))  # type: ignore[no-any-return]
        ended: Ended | None = None
        try:
            ended = self._run(prepared, entry, boot, argv, env, stdin, lim, stdout_cap, rewind, part, mono_ns)
            return ended
        except (OSError, UnicodeError) as exc:  # (no descriptor for the outputs...): the VM path answers
            log.warning("direct instance not run (%s: %s): the request runs as a VM", type(exc).__name__, exc)
            return None
        finally:
            if ended is None:
                self.fallbacks += 1
            else:
                self.runs += 1
            outs: _Outputs | None = getattr(_current, "outputs", None)
            if outs is not None:
                try:
                    outs.release()
                except OSError as exc:
                    log.warning("direct instance outputs not emptied: %s", exc)

    async def run_async(self, offload: Any, prepared: Prepared, entry: str, boot: list[str], argv: list[str],
                        env: dict[str, str], stdin: bytes, lim: Limits, stdout_cap: int, rewind: str | None = None,
                        part: fnio.FnPart | None = None, mono_ns: int = 0) -> Ended | None:
        """``run`` from the event loop: on the native workers, or else ``await offload(self.run, ...)`` (a vCPU
        worker of the scheduler)."""
        if self.pool is None:
            return await offload(self.run, prepared, entry, boot, argv, env, stdin, lim, stdout_cap, rewind, part,
                                 mono_ns)  # type: ignore[no-any-return]
        if self.pool.closed:  # (the daemon is stopping: the VM path answers, or refuses)
            return None
        made = self._job(prepared, entry, boot, argv, env, stdin, lim, stdout_cap, rewind, part, mono_ns)
        if made is None:
            return None
        job, tpl = made
        # the finish runs when the job is done, even if this request is cancelled meanwhile: it gives back the
        # budget and the run's buffers; it holds ``prepared`` (the pre-linked module the worker instantiates)
        # and the template (whose strings the job points to) until then
        return await self.pool.submit(job, lambda j: self._finished(j, prepared, lim, part, tpl))  # type: ignore[no-any-return]

    def _job(self, prepared: Prepared, entry: str, boot: list[str], argv: list[str], env: dict[str, str],
             stdin: bytes, lim: Limits, stdout_cap: int, rewind: str | None, part: fnio.FnPart | None,
             mono_ns: int) -> tuple[native.Job, native.Job] | None:
        """The native job of a run and its template (whose strings it points to: keep it alive with the job),
        its memory charged to the budget (``_finished`` gives it back); None when
        the run cannot be expressed (a NUL or a lone surrogate in an argument or the environment: the VM path
        answers, as it does for the Python run's OSError)."""
        key = (entry, tuple(boot), tuple(argv), rewind, mono_ns)
        tpl = prepared.templates.get(key)
        if tpl is None:
            tpl = self._template(prepared, entry, boot, argv, rewind, mono_ns)
            if tpl is None:
                self.fallbacks += 1
                return None
            if len(prepared.templates) < 16:  # (one per version's start in practice; beyond, made per run)
                prepared.templates[key] = tpl
        try:
            env_blob = "".join([f"{k}\0{v}\0" for k, v in env.items()]).encode()
        except UnicodeError:
            self.fallbacks += 1
            return None
        if env_blob.count(b"\0") != 2 * len(env):
            self.fallbacks += 1
            return None
        j = native.Job.from_buffer_copy(tpl)  # (its strings are the template's, which ``prepared`` holds)
        j.env, j.envc = env_blob, len(env)
        j.stdin_data, j.stdin_len = stdin, len(stdin)
        if part is not None:
            request = part.request or b""
            j.has_request, j.request, j.request_len = 1, request, len(request)
        j.fuel, _, j.deadline_ticks = self._slice(lim)
        budget = self.budget
        j.memory = lim.memory if budget is None else min(lim.memory, budget.headroom())
        j.table_elements, j.instances, j.tables, j.memories = lim.table_elements, lim.instances, lim.tables, \
            lim.memories
        j.stdout_cap = stdout_cap
        if budget is not None:
            budget.change(prepared.memory)
        return j, tpl

    def _template(self, prepared: Prepared, entry: str, boot: list[str], argv: list[str], rewind: str | None,
                  mono_ns: int) -> native.Job | None:
        """A job with what every run of this start shares; None when it cannot be expressed (a NUL or a lone
        surrogate in an argument)."""
        names = [*boot, entry]
        try:
            argv_blob = "".join([a + "\0" for a in argv]).encode()
            names_blob = "".join([n + "\0" for n in names]).encode()
        except UnicodeError:
            return None
        if argv_blob.count(b"\0") != len(argv) or names_blob.count(b"\0") != len(names):
            return None
        j = native.Job()
        j.engine = self._engine
        j.pre = wt.instance_pre_address(prepared.pre)
        j.names, j.nnames = names_blob, len(names)
        j.nresults = bytes(min(prepared.results.get(n, 0), 255) for n in names)
        j.argv, j.argc = argv_blob, len(argv)
        if rewind is not None:
            j.rewind = rewind.encode()
        j.mono_ns = mono_ns
        j.stderr_keep = STDERR_KEEP
        return j

    def _finished(self, j: native.Job, prepared: Prepared, lim: Limits, part: fnio.FnPart | None,
                  template: native.Job) -> Ended | None:
        """The end of a native run as ``_run`` would say it (on the loop, when the job is done); the job's
        outputs are freed and its memory given back to the budget."""
        if self.budget is not None:
            self.budget.change(-prepared.memory)
        try:
            outcome = j.outcome
            message = wt.trap_text(j.message.decode(errors="replace")) if j.message else ""
            slice_fuel, own_timeout, _ = self._slice(lim)
            ended: tuple[str, int | None, str] | None
            if outcome == native.EXIT:
                ended = ("exit", j.code, "")
            elif outcome == native.FAILED:
                ended = ("trap", None, message)
            elif outcome in (native.TRAP, native.INST_TRAP):
                try:
                    code = wasmtime.TrapCode(j.code) if j.code >= 0 else None
                except ValueError:
                    code = None
                ended = self._trapped(code, message, own_timeout, lim, slice_fuel)
            else:
                if outcome == native.SETUP:
                    log.warning("direct instance not run (%s): the request runs as a VM", message)
                ended = None
            if ended is None:
                self.fallbacks += 1
                return None
            self.runs += 1
            if part is not None and j.resp_status:
                part.status = j.resp_status
                part.headers = native.output(j.resp_headers, j.resp_headers_len)
                part.body = native.output(j.resp_body, j.resp_body_len)
            return Ended(ended[0], ended[1], ended[2], native.output(j.out, j.out_len), bool(j.out_truncated),
                         native.output(j.err, j.err_len), j.instance_ns / 1e9)
        finally:
            native.release(j)

    def _run(self, prepared: Prepared, entry: str, boot: list[str], argv: list[str], env: dict[str, str],
             stdin: bytes, lim: Limits, stdout_cap: int, rewind: str | None, part: fnio.FnPart | None,
             mono_ns: int) -> Ended | None:
        t0 = time.perf_counter()
        store = wt.LeanStore(self.engine)
        run = _current.run = _Run(stdin, part)
        run.rewinding = rewind
        run.mono0 -= mono_ns
        held = 0
        t_inst = 0.0
        budget = self.budget
        slice_fuel, own_timeout, deadline_ticks = self._slice(lim)
        ended: tuple[str, int | None, str] = ("exit", 0, "")
        try:
            store.limit(slice_fuel, deadline_ticks,
                        lim.memory if budget is None else min(lim.memory, budget.headroom()),
                        lim.table_elements, lim.instances, lim.tables, lim.memories)
            outs = _outputs()
            store.set_wasi(argv, env, outs.out_path, outs.err_path)
            try:
                store.instantiate(prepared.pre)
                t_inst = time.perf_counter() - t0
                if budget is not None:
                    held = store.memory_size()
                    budget.change(held)
                for name in [*boot, entry]:
                    outcome = store.call(name, prepared.results.get(name, 0))
                    if run.needs_vm:
                        return None
                    match outcome:
                        case wt.Returned():
                            continue
                        case wt.Exited(code):
                            ended = ("exit", code, "")
                        case wt.Trapped(message, code):
                            why = self._trapped(code, message, own_timeout, lim, slice_fuel)
                            if why is None:
                                return None
                            ended = why
                        case wt.Failed(message):
                            ended = ("trap", None, message)
                    break
            except wt.InstantiationError as exc:
                # a trap while instantiating (a data segment out of bounds) is the guest's; anything else (its
                # memory above the limit or the budget, no free slot) goes to the VM path, whose answer it is
                why = self._trapped(exc.trap_code, str(exc), own_timeout, lim, slice_fuel) \
                    if exc.trap_code is not None else None
                if why is None:
                    return None
                ended = why
        finally:
            _current.run = None
            if held and budget is not None:
                budget.change(-held)
            store.close()
        out, truncated, errs = outs.read(stdout_cap)
        return Ended(ended[0], ended[1], ended[2], out, truncated, errs, t_inst)

    def _slice(self, lim: Limits) -> tuple[int, bool, int]:
        """(the run's fuel, whether its wall-clock bound is the function's own timeout, that bound in epoch
        ticks). The bound is the function's timeout when it is shorter than a quantum, else a quantum (past it
        the request goes to a VM, which time-slices). An epoch deadline of n ticks traps at the n-th tick from
        now, the first of which may come at once: one more tick makes it at least the bound."""
        own_timeout = lim.timeout <= self.quantum
        bound = lim.timeout if own_timeout else self.quantum
        fuel = self.fuel_slice if lim.fuel is None else min(self.fuel_slice, lim.fuel)
        return fuel, own_timeout, math.ceil(bound / self.epoch_interval) + 1

    def _trapped(self, code: wasmtime.TrapCode | None, message: str, own_timeout: bool, lim: Limits,
                 slice_fuel: int) -> tuple[str, int | None, str] | None:
        """(reason, None, message) of a trap; None when it only ended the direct run's slice."""
        if code == wasmtime.TrapCode.INTERRUPT:
            return ("timeout", None, "") if own_timeout else None  # (a quantum passed: the rest runs as a VM)
        if code == wasmtime.TrapCode.OUT_OF_FUEL:
            if lim.fuel is None or slice_fuel < lim.fuel:
                return None  # a fuel slice used up, not the function's budget
            return ("out_of_fuel", None, "")
        if code == wasmtime.TrapCode.STACK_OVERFLOW:
            return ("stack_overflow", None, "")
        return ("trap", None, message)


# ---------------------------------------------------------------------- microvm_wasi, without suspending
def _needs_vm(why: str) -> wt.HostTrap:
    """The guest asked for what only a VM gives (to wait): the run ends here and the request goes to a VM."""
    run: _Run = _current.run
    run.needs_vm = True
    return wt.HostTrap(f"direct instance: {why}")


def _fd_read(mem: wt.GuestMemory, args: Sequence[int]) -> list[int]:
    run: _Run = _current.run
    fd, iovs, iovs_len, nread_ptr = args
    if fd != 0:
        return [p1.EBADF]  # no file can be open: a WAGI instance has no preopened directory
    try:
        if iovs_len < 0 or not mem.check(nread_ptr, 4):
            return [p1.EFAULT]
        n = min(iovs_len, 1024)  # (as the VM path's fd_read: a guest cannot make the host loop for long)
        raw = mem.read(iovs, 8 * n)
        done = 0
        for i in range(n):
            ptr, length = struct.unpack_from("<II", raw, 8 * i)
            if not mem.check(ptr, length):
                return [p1.EFAULT]
            chunk = run.stdin[run.pos:run.pos + length]
            if chunk:
                mem.write(ptr, chunk)
                run.pos += len(chunk)
                done += len(chunk)
            if len(chunk) < length:
                break
        mem.write(nread_ptr, struct.pack("<I", done))
    except wt.MemoryFault:
        return [p1.EFAULT]
    return [p1.ESUCCESS]


def _fn_request(mem: wt.GuestMemory, args: Sequence[int]) -> list[int]:
    """The request, at once: a direct instance has it before it runs. The first call of a resumed guest is
    where its rewind ends (the call it was suspended in at deploy)."""
    run: _Run = _current.run
    if run.rewinding is not None:
        mem.set_export_global_i32(run.rewinding, STATE_NORMAL)
        run.rewinding = None
    buf, cap = args
    if cap < 0:
        return [-p1.EINVAL]
    if run.part is None:
        return [-fnio.ENOSYS]
    return [fnio.write_request(run.part, mem, buf, cap)]


def _fn_respond(mem: wt.GuestMemory, args: Sequence[int]) -> list[int]:
    run: _Run = _current.run
    if run.part is None:
        return [-fnio.ENOSYS]
    return [fnio.take_response(run.part, mem, args)]


def _poll_oneoff(mem: wt.GuestMemory, args: Sequence[int]) -> list[int]:
    """Whatever is ready now (stdin always is: the whole body is there); a clock that has not fired means a
    wait, which only a VM can do without holding a worker."""
    return _poll(mem, args, True)


def _poll_oneoff_no_stdin(mem: wt.GuestMemory, args: Sequence[int]) -> list[int]:
    """The same for a module not rewritten at import, whose stdin is wasmtime's own (empty, as in a VM)."""
    return _poll(mem, args, False)


def _poll(mem: wt.GuestMemory, args: Sequence[int], body: bool) -> list[int]:
    run: _Run = _current.run
    in_ptr, out_ptr, nsubs, nevents_ptr = args
    if nsubs <= 0 or nsubs > p1.MAX_SUBSCRIPTIONS:
        return [p1.EINVAL]
    try:
        raw = mem.read(in_ptr, nsubs * p1.SUB_SIZE)
        if not (mem.check(out_ptr, nsubs * p1.EVENT_SIZE) and mem.check(nevents_ptr, 4)):
            return [p1.EFAULT]
    except wt.MemoryFault:
        return [p1.EFAULT]
    now = time.monotonic_ns()
    events = []
    for i in range(nsubs):
        userdata, tag, which, timeout, _precision, flags = p1._SUB.unpack_from(raw, i * p1.SUB_SIZE)
        if tag == p1.TAG_CLOCK:
            if not flags & p1.ABSTIME:
                left = timeout
            elif which == p1.CLOCK_REALTIME:
                left = timeout - time.time_ns()
            else:
                left = timeout - (now - run.mono0)
            if left <= 0:
                events.append(p1._EVENT.pack(userdata, 0, p1.TAG_CLOCK, 0, 0))
        elif tag == p1.TAG_FD_READ and which == 0:
            n = len(run.stdin) - run.pos if body else 0
            events.append(p1._EVENT.pack(userdata, 0, tag, n, 0 if n else p1.HANGUP))
        elif tag in (p1.TAG_FD_READ, p1.TAG_FD_WRITE):
            events.append(p1._EVENT.pack(userdata, 0 if which in (1, 2) else p1.EBADF, tag, 0, 0))
        else:
            return [p1.EINVAL]
    if not events:
        raise _needs_vm("poll_oneoff waits")
    mem.write(out_ptr, b"".join(events))
    mem.write(nevents_ptr, struct.pack("<I", len(events)))
    return [p1.ESUCCESS]


def _clock(mem: wt.GuestMemory, args: Sequence[int]) -> list[int]:
    """Realtime is the host's; the monotonic (and CPU-time) clocks count from the instance's start, as a
    VM's do from its creation."""
    run: _Run = _current.run
    clock, _precision, out = args
    if clock < 0 or clock > 3:
        return [p1.EINVAL]
    now = time.time_ns() if clock == p1.CLOCK_REALTIME else time.monotonic_ns() - run.mono0
    try:
        mem.write(out, struct.pack("<Q", now))
    except wt.MemoryFault:
        return [p1.EFAULT]
    return [p1.ESUCCESS]


def baked(module: bytes, pages: int, segments: list[tuple[int, bytes]], globals_: dict[str, tuple[str, int | float]],
          state: int) -> bytes:
    """A snapshot of ``module`` (its memory, and its globals by export name) baked into a copy of the module
    (``wasmbin.bake``), whose Asyncify state global (index ``state``) starts as "rewinding": calling its entry
    rewinds into the call the snapshot was taken in. ValueError when it cannot be expressed."""
    exported = {e.name: e.index for e in wasmbin.parse(module).exports if e.kind == "global"}
    values: dict[int, tuple[str, int | float]] = {}
    for name, value in globals_.items():
        if name not in exported:
            raise ValueError(f"the snapshot's global {name!r} is not exported by the module")
        values[exported[name]] = value
    values[state] = ("i32", STATE_REWINDING)
    return wasmbin.bake(module, pages, segments, values)


def limits_for(fuel: int | None, memory: int, timeout: float, lim: Any) -> Limits:
    return Limits(fuel=fuel, memory=memory, timeout=timeout, table_elements=lim.table_elements,
                  instances=lim.instances, tables=lim.tables, memories=lim.memories)
