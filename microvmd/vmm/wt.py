"""The one place that touches wasmtime's raw C bindings (``wasmtime._bindings``).

wasmtime-py's high-level API runs guests synchronously. microvmd needs more: a guest call that can be
suspended and resumed (so a paused, out-of-fuel or blocked VM holds no thread), fuel and epoch yields, and
host functions that suspend the guest until the host has an answer. This module wraps exactly those pieces
of the C API, typed, and nothing else imports ``wasmtime._bindings`` or ``wasmtime._ffi``.

Threading rule: a store and everything in it is touched by one thread at a time. The scheduler guarantees
it; host functions run on the thread that polls the call, and find their VM through ``current_vm()``.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import wasmtime
from wasmtime import _ffi as ffi

WASMTIME_VERSION: str = importlib.metadata.version("wasmtime")

I32, I64 = 0, 1  # wasmtime_valkind_t
_VALTYPES = {"i32": I32, "i64": I64}


# --------------------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineOptions:
    max_wasm_stack: int = 1 << 20
    memory_reservation: int | None = None
    memory_guard_size: int | None = None

    def fingerprint(self) -> str:
        """Everything that changes generated code; compiled modules are only valid for the same value."""
        return (
            f"wasmtime-{WASMTIME_VERSION};fuel;epoch;stack={self.max_wasm_stack};"
            f"res={self.memory_reservation};guard={self.memory_guard_size}"
        )


def make_engine(opts: EngineOptions) -> wasmtime.Engine:
    cfg = wasmtime.Config()
    cfg.consume_fuel = True
    cfg.epoch_interruption = True
    cfg.max_wasm_stack = opts.max_wasm_stack
    cfg.cranelift_opt_level = "speed"
    cfg.wasm_exceptions = True  # e.g. MicroPython's WASI build needs it
    if opts.memory_reservation is not None:
        cfg.memory_reservation = opts.memory_reservation
    if opts.memory_guard_size is not None:
        cfg.memory_guard_size = opts.memory_guard_size
    return wasmtime.Engine(cfg)


def increment_epoch(engine: wasmtime.Engine) -> None:
    engine.increment_epoch()


# --------------------------------------------------------------------------------------------------------
# Store knobs the high-level API lacks
# --------------------------------------------------------------------------------------------------------
def set_fuel_yield_interval(store: wasmtime.Store, interval: int | None) -> None:
    """Yield to the poller every ``interval`` units of fuel (None: no fuel yields)."""
    err = ffi.wasmtime_context_fuel_async_yield_interval(store._context(), interval or 0)
    if err:
        raise wasmtime.WasmtimeError._from_ptr(err)


def yield_on_every_epoch(store: wasmtime.Store) -> None:
    """At each epoch tick the running guest yields to its poller (instead of trapping)."""
    store.set_epoch_deadline(1)
    ffi.wasmtime_context_epoch_deadline_async_yield_and_update(store._context(), 1)


# --------------------------------------------------------------------------------------------------------
# Suspendable calls
# --------------------------------------------------------------------------------------------------------
class Outcome:
    """How a finished call ended: ``results`` on return, else ``exit_code`` (proc_exit) or ``trap``."""

    __slots__ = ("results", "exit_code", "trap", "trap_code", "error")

    def __init__(self) -> None:
        self.results: list[int] = []
        self.exit_code: int | None = None
        self.trap: str | None = None
        self.trap_code: wasmtime.TrapCode | None = None
        self.error: str | None = None


class _Future:
    def __init__(self) -> None:
        self._ptr: Any = None
        self._trap = ctypes.POINTER(ffi.wasm_trap_t)()
        self._error = ctypes.POINTER(ffi.wasmtime_error_t)()
        self.done = False

    def poll(self) -> bool:
        """Run the guest until it finishes (True) or yields (False)."""
        if self.done:
            return True
        if ffi.wasmtime_call_future_poll(self._ptr):
            self.done = True
        return self.done

    def close(self) -> None:
        if self._ptr is not None:
            ffi.wasmtime_call_future_delete(self._ptr)
            self._ptr = None

    def _outcome(self, out: Outcome) -> Outcome:
        if self._trap:
            trap = wasmtime.Trap._from_ptr(self._trap)
            out.trap = trap_text(trap.message)
            out.trap_code = trap.trap_code
            self._trap = ctypes.POINTER(ffi.wasm_trap_t)()
        elif self._error:
            err = wasmtime.WasmtimeError._from_ptr(self._error)
            self._error = ctypes.POINTER(ffi.wasmtime_error_t)()
            if isinstance(err, wasmtime.ExitTrap):
                out.exit_code = err.code
            else:
                out.error = str(err).splitlines()[0] if str(err) else "error"
        return out


def trap_text(message: str | None) -> str:
    """The cause of a trap, without wasmtime's backtrace (``wasm unreachable instruction executed``)."""
    lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    if not lines:
        return "trap"
    for ln in lines:
        if ln.startswith("wasm trap:"):
            return ln[len("wasm trap:"):].strip()
    if "Caused by:" in lines:
        rest = lines[lines.index("Caused by:") + 1:]
        if rest:
            return rest[-1].lstrip("0123456789: ")
    return lines[-1] if lines[0].startswith("error while executing") else lines[0]


class GuestCall(_Future):
    """An exported function call that runs in slices: ``poll()`` until True, then ``outcome()``."""

    def __init__(self, store: wasmtime.Store, func: wasmtime.Func, args: Sequence[int] = (),
                 kinds: Sequence[int] | None = None, nresults: int = 0) -> None:
        super().__init__()
        kinds = kinds or [I32] * len(args)
        self._args = (ffi.wasmtime_val_t * max(1, len(args)))()
        for i, (v, k) in enumerate(zip(args, kinds, strict=True)):
            self._args[i].kind = k  # type: ignore[assignment]
            if k == I64:
                self._args[i].of.i64 = v
            else:
                self._args[i].of.i32 = v
        self._nresults = nresults
        self._results = (ffi.wasmtime_val_t * max(1, nresults))()
        self._func = func._func  # keep the raw handle alive with us
        self._ptr = ffi.wasmtime_func_call_async(
            store._context(), ctypes.byref(self._func), self._args, len(args),
            self._results, nresults, ctypes.byref(self._trap), ctypes.byref(self._error))

    def outcome(self) -> Outcome:
        out = self._outcome(Outcome())
        if out.trap is None and out.exit_code is None and out.error is None:
            out.results = [
                self._results[i].of.i64 if self._results[i].kind == I64 else self._results[i].of.i32
                for i in range(self._nresults)
            ]
        return out


class Instantiation(_Future):
    """Instantiation through the async path (required once a store has async host functions)."""

    def __init__(self, store: wasmtime.Store, linker: wasmtime.Linker, module: wasmtime.Module) -> None:
        super().__init__()
        self._inst = ffi.wasmtime_instance_t()
        self._linker, self._module = linker, module
        self._ptr = ffi.wasmtime_linker_instantiate_async(
            linker.ptr(), store._context(), module.ptr(), ctypes.byref(self._inst),
            ctypes.byref(self._trap), ctypes.byref(self._error))

    def result(self) -> wasmtime.Instance:
        out = self._outcome(Outcome())
        if out.trap is not None:
            raise InstantiationError(out.trap, trap_code=out.trap_code)
        if out.error is not None:
            raise InstantiationError(out.error)
        return wasmtime.Instance._from_raw(self._inst)


class InstantiationError(Exception):
    def __init__(self, message: str, trap_code: wasmtime.TrapCode | None = None) -> None:
        super().__init__(message)
        self.trap_code = trap_code


def instantiate(store: wasmtime.Store, linker: wasmtime.Linker, module: wasmtime.Module) -> wasmtime.Instance:
    """Instantiate to completion on the calling thread (start functions were rewritten away at import)."""
    inst = Instantiation(store, linker, module)
    try:
        while not inst.poll():
            pass
        return inst.result()
    finally:
        inst.close()


# --------------------------------------------------------------------------------------------------------
# Host functions that may suspend the guest
# --------------------------------------------------------------------------------------------------------
class GuestMemory:
    """Bounds-checked access to the caller's exported ``memory``, valid for one host call."""

    __slots__ = ("_ctx", "_mem", "_ok")

    def __init__(self, caller: Any) -> None:
        self._ctx = ffi.wasmtime_caller_context(caller)
        self._mem = ffi.wasmtime_extern_t()
        name = b"memory"
        self._ok = bool(ffi.wasmtime_caller_export_get(caller, name, len(name), ctypes.byref(self._mem))) \
            and self._mem.kind == ffi.WASMTIME_EXTERN_MEMORY.value

    def _base(self, ptr: int, length: int) -> int:
        if not self._ok:
            raise MemoryFault("guest exports no memory")
        size = ffi.wasmtime_memory_data_size(self._ctx, ctypes.byref(self._mem.of.memory))
        if ptr < 0 or length < 0 or ptr + length > size:
            raise MemoryFault(f"range {ptr}+{length} outside guest memory of {size} bytes")
        base = ffi.wasmtime_memory_data(self._ctx, ctypes.byref(self._mem.of.memory))
        return ctypes.cast(base, ctypes.c_void_p).value or 0

    def size(self) -> int:
        if not self._ok:
            return 0
        return int(ffi.wasmtime_memory_data_size(self._ctx, ctypes.byref(self._mem.of.memory)))

    def read(self, ptr: int, length: int) -> bytes:
        return ctypes.string_at(self._base(ptr, length) + ptr, length) if length else b""

    def write(self, ptr: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if n:
            base = self._base(ptr, n)
            ctypes.memmove(base + ptr, bytes(data) if not isinstance(data, bytes) else data, n)

    def set_global_i32(self, glob: wasmtime.Global, value: int) -> None:
        """Set a global of the calling instance from inside a host call (no Wasm runs)."""
        val = ffi.wasmtime_val_t()
        val.kind = I32  # type: ignore[assignment]
        val.of.i32 = value
        err = ffi.wasmtime_global_set(self._ctx, ctypes.byref(glob._global), ctypes.byref(val))
        if err:
            raise wasmtime.WasmtimeError._from_ptr(err)

    def view(self, ptr: int, length: int) -> memoryview:
        """A zero-copy writable view; do not keep it beyond the host call."""
        base = self._base(ptr, length)
        return memoryview((ctypes.c_char * length).from_address(base + ptr)).cast("B")


class MemoryFault(Exception):
    """A guest passed a pointer or length outside its memory: becomes -EFAULT, never a trap."""


class Pending(Protocol):
    """What a host function returns when it cannot answer yet; the guest is suspended until ``ready``."""

    def ready(self) -> bool: ...
    def complete(self, mem: GuestMemory) -> Sequence[int]: ...


HostResult = Sequence[int] | Pending
HostFn = Callable[[GuestMemory, Sequence[int]], HostResult]


class HostTrap(Exception):
    """Raised by a host function to trap the guest with a message."""


_current = threading.local()

# Called at the start of every host function defined with ``suspends=True`` (the ABI's suspension
# points). It may return results to answer the call itself, e.g. to unwind the guest for a snapshot.
SuspensionHook = Callable[[GuestMemory], Sequence[int] | None]
suspension_hook: SuspensionHook | None = None


def set_current_vm(vm: object | None) -> None:
    _current.vm = vm


def current_vm() -> Any:
    return getattr(_current, "vm", None)


@dataclass
class _Suspended:
    pending: Pending
    caller: Any
    results: Any
    nresults: int
    trap_ret: Any


_suspended: dict[int, _Suspended] = {}
_ids = itertools.count(1)
_hosts: dict[int, tuple[HostFn, list[int]]] = {}


def _write_results(results: Any, kinds: Sequence[int], values: Sequence[int]) -> None:
    for i, (k, v) in enumerate(zip(kinds, values, strict=False)):
        results[i].kind = k  # type: ignore[assignment]
        if k == I64:
            results[i].of.i64 = int(v)
        else:
            results[i].of.i32 = int(v) & 0xFFFFFFFF if v >= 0 else int(v)


def _set_trap(trap_ret: Any, message: str) -> None:
    msg = message.encode()
    trap_ret[0] = ffi.wasmtime_trap_new(msg, len(msg))


@ffi.wasmtime_func_async_continuation_callback_t
def _always_ready(env: Any) -> bool:
    return True


@ffi.wasmtime_func_async_continuation_callback_t
def _continuation(env: Any) -> bool:
    key = int(env or 0)
    s = _suspended.get(key)
    if s is None:
        return True
    try:
        if not s.pending.ready():
            return False
        values = s.pending.complete(GuestMemory(s.caller))
        _write_results(s.results, _result_kinds[key], values)
    except HostTrap as exc:
        _set_trap(s.trap_ret, str(exc))
    except Exception as exc:  # a bug in a device must not unwind through C
        _set_trap(s.trap_ret, f"host error: {type(exc).__name__}: {exc}")
    return True


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _continuation_done(env: Any) -> None:
    key = int(env or 0)
    _suspended.pop(key, None)
    _result_kinds.pop(key, None)


_result_kinds: dict[int, Sequence[int]] = {}


@ffi.wasmtime_func_async_callback_t
def _trampoline(env: Any, caller: Any, args: Any, nargs: int, results: Any, nresults: int,
                trap_ret: Any, cont: Any) -> None:
    fn, kinds = _hosts[int(env)]
    cont.contents.callback = _always_ready
    try:
        argv = [args[i].of.i64 if args[i].kind == I64 else args[i].of.i32 for i in range(nargs)]
        mem = GuestMemory(caller)
        res = fn(mem, argv)
        if isinstance(res, (list, tuple)):
            _write_results(results, kinds, res)
            return
        assert not isinstance(res, Sequence)
        key = next(_ids)
        _suspended[key] = _Suspended(res, caller, results, nresults, trap_ret)
        _result_kinds[key] = kinds
        cont.contents.callback = _continuation
        cont.contents.env = key
        cont.contents.finalizer = _continuation_done
    except HostTrap as exc:
        _set_trap(trap_ret, str(exc))
    except Exception as exc:
        _set_trap(trap_ret, f"host error: {type(exc).__name__}: {exc}")


def _valtypes(names: Sequence[str]) -> Any:
    vec = ffi.wasm_valtype_vec_t()
    items = [ffi.wasm_valtype_new(ffi.WASM_I32 if n == "i32" else ffi.WASM_I64) for n in names]
    arr = (ctypes.POINTER(ffi.wasm_valtype_t) * len(items))(*items)
    ffi.wasm_valtype_vec_new(ctypes.byref(vec), len(items), arr)
    return vec


def define_host_func(linker: wasmtime.Linker, module: str, name: str,
                     params: Sequence[str], results: Sequence[str], fn: HostFn, suspends: bool = False) -> None:
    """Define ``module.name`` for every store using ``linker``.

    ``fn(mem, args)`` returns the results (a list of ints) at once, or a ``Pending`` to suspend the guest
    until ``pending.ready()``; the guest then resumes with ``pending.complete(mem)``. It may raise
    ``HostTrap`` to trap the guest. Only i32/i64 signatures are supported, which is all the ABI uses.
    ``suspends`` marks a suspension point: ``suspension_hook`` sees the call first.
    """
    if suspends:
        inner = fn

        def fn(mem: GuestMemory, args: Sequence[int]) -> HostResult:
            hook = suspension_hook
            if hook is not None:
                answered = hook(mem)
                if answered is not None:
                    return answered
            return inner(mem, args)

    for t in (*params, *results):
        if t not in _VALTYPES:
            raise ValueError(f"unsupported value type {t!r}")
    ptypes = _valtypes(params)
    rtypes = _valtypes(results)
    functype = ffi.wasm_functype_new(ctypes.byref(ptypes), ctypes.byref(rtypes))
    key = next(_ids)
    _hosts[key] = (fn, [_VALTYPES[r] for r in results])
    m, n = module.encode(), name.encode()
    err = ffi.wasmtime_linker_define_async_func(
        linker.ptr(), m, len(m), n, len(n), functype, _trampoline, key,
        ctypes.cast(0, ctypes.CFUNCTYPE(None, ctypes.c_void_p)))
    ffi.wasm_functype_delete(functype)
    if err:
        raise wasmtime.WasmtimeError._from_ptr(err)
