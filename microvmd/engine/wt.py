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
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import wasmtime
from wasmtime import _ffi as ffi
from wasmtime._extern import wrap_extern

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


@dataclass(frozen=True)
class PoolOptions:
    """wasmtime's pooling instance allocator: ``slots`` instances (each with one memory, one table and one
    async stack) kept mapped and reused, for stores that come and go by the thousand (direct instances).
    A module compiled by the daemon's engine loads into such an engine: code generation is the same."""
    slots: int
    max_memory: int  # bytes a slot's memory may grow to
    table_elements: int
    keep_resident: int = 0  # bytes of a slot's memory (and stack, table) reset in place, not unmapped, at its end


def make_engine(opts: EngineOptions, pool: PoolOptions | None = None) -> wasmtime.Engine:
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
    if pool is not None:
        pc = ffi.wasmtime_pooling_allocation_config_new()
        for setter, value in ((ffi.wasmtime_pooling_allocation_config_total_core_instances_set, pool.slots),
                              (ffi.wasmtime_pooling_allocation_config_total_memories_set, pool.slots),
                              (ffi.wasmtime_pooling_allocation_config_total_tables_set, pool.slots),
                              (ffi.wasmtime_pooling_allocation_config_total_stacks_set, pool.slots),
                              (ffi.wasmtime_pooling_allocation_config_max_unused_warm_slots_set, pool.slots),
                              (ffi.wasmtime_pooling_allocation_config_max_memory_size_set, pool.max_memory),
                              (ffi.wasmtime_pooling_allocation_config_table_elements_set, pool.table_elements),
                              (ffi.wasmtime_pooling_allocation_config_linear_memory_keep_resident_set,
                               pool.keep_resident),
                              (ffi.wasmtime_pooling_allocation_config_table_keep_resident_set, pool.keep_resident),
                              (ffi.wasmtime_pooling_allocation_config_async_stack_keep_resident_set,
                               pool.keep_resident)):
            setter(pc, value)
        ffi.wasmtime_pooling_allocation_strategy_set(cfg.ptr(), pc)  # (copies the configuration)
        ffi.wasmtime_pooling_allocation_config_delete(pc)
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
@dataclass(frozen=True, slots=True)
class Returned:
    """The call returned (its results)."""
    results: list[int]


@dataclass(frozen=True, slots=True)
class Exited:
    """The guest called ``proc_exit``."""
    code: int


@dataclass(frozen=True, slots=True)
class Trapped:
    """A Wasm trap: its cause, and wasmtime's code when it has one (stack overflow, out of fuel, interrupt)."""
    message: str
    code: wasmtime.TrapCode | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    """A host error that is not a trap (an import's failure, a missing entry)."""
    message: str


Outcome = Returned | Exited | Trapped | Failed  # how a finished call ended


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

    def _ended(self) -> Exited | Trapped | Failed | None:
        """How the call ended when it did not return (None when it returned)."""
        if self._trap:
            trap = wasmtime.Trap._from_ptr(self._trap)
            self._trap = ctypes.POINTER(ffi.wasm_trap_t)()
            return Trapped(trap_text(trap.message), trap.trap_code)
        if self._error:
            err = wasmtime.WasmtimeError._from_ptr(self._error)
            self._error = ctypes.POINTER(ffi.wasmtime_error_t)()
            if isinstance(err, wasmtime.ExitTrap):
                return Exited(err.code)
            return Failed(trap_text(str(err)) if str(err) else "error")
        return None


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
        ended = self._ended()
        if ended is not None:
            return ended
        return Returned([self._results[i].of.i64 if self._results[i].kind == I64 else self._results[i].of.i32
                         for i in range(self._nresults)])


class Instantiation(_Future):
    """Instantiation through the async path (required once a store has async host functions)."""

    def __init__(self, store: wasmtime.Store, linker: wasmtime.Linker, module: wasmtime.Module,
                 pre: wasmtime.InstancePre | None = None) -> None:
        super().__init__()
        self._inst = ffi.wasmtime_instance_t()
        self._linker, self._module, self._pre = linker, module, pre
        if pre is not None:  # imports already resolved once for the image: skips the linker lookups
            self._ptr = ffi.wasmtime_instance_pre_instantiate_async(
                pre.ptr(), store._context(), ctypes.byref(self._inst), ctypes.byref(self._trap),
                ctypes.byref(self._error))
        else:
            self._ptr = ffi.wasmtime_linker_instantiate_async(
                linker.ptr(), store._context(), module.ptr(), ctypes.byref(self._inst),
                ctypes.byref(self._trap), ctypes.byref(self._error))

    def result(self) -> wasmtime.Instance:
        ended = self._ended()
        if isinstance(ended, Trapped):
            raise InstantiationError(ended.message, trap_code=ended.code)
        if ended is not None:
            raise InstantiationError(ended.message if isinstance(ended, Failed) else f"exit {ended.code}")
        return wasmtime.Instance._from_raw(self._inst)


def table_refs(store: wasmtime.Store, table: wasmtime.Table) -> list[int]:
    """Each slot of a table as wasmtime's raw funcref pointer (0 for null). The pointer of a function is
    the same every time within one instance, so two reads compare slot by slot, and a slot's function can
    be found again in the table as instantiated. Raises ValueError for a non-null reference that is not a
    function (externref and the like: not snapshottable)."""
    ctx = store._context()
    ref = ctypes.byref(table._table)
    raw = ffi.wasmtime_val_t()
    out: list[int] = []
    for i in range(table.size(store)):
        if not ffi.wasmtime_table_get(ctx, ref, i, ctypes.byref(raw)):
            break
        if raw.kind == ffi.WASMTIME_FUNCREF.value:
            f = raw.of.funcref
            ptr: Any = 0 if f.store_id == 0 else ffi.wasmtime_func_to_raw(ctx, ctypes.byref(f))
            out.append(int(ptr or 0))
            continue
        null = raw.of.externref.store_id == 0  # externref and anyref both begin with their store id
        ffi.wasmtime_val_unroot(ctypes.byref(raw))
        if not null:
            raise ValueError(f"slot {i} holds a non-function reference")
        out.append(0)
    return out


_VAL_KINDS = {"i32": (ffi.WASMTIME_I32.value, "i32"), "i64": (ffi.WASMTIME_I64.value, "i64"),
              "f32": (ffi.WASMTIME_F32.value, "f32"), "f64": (ffi.WASMTIME_F64.value, "f64")}


def set_global(store: wasmtime.Store, glob: wasmtime.Global, ty: str, value: int | float) -> None:
    """``glob.set_value(store, Val.<ty>(value))`` without its type round trips: wasmtime-py reads the global's
    type and makes and frees four ``wasm_valtype`` objects per set (~8 µs, and each C call gives up the GIL,
    which under load means waiting to get it back); this is one call (~1.5 µs). wasmtime still refuses a
    value of the wrong type and an immutable global (WasmtimeError)."""
    kind, name = _VAL_KINDS[ty]
    raw = ffi.wasmtime_val_t(kind=kind)
    setattr(raw.of, name, value)
    error = ffi.wasmtime_global_set(store._context(), ctypes.byref(glob._global), ctypes.byref(raw))
    if error:
        raise wasmtime.WasmtimeError._from_ptr(error)


class Exports:
    """An instance's exports, looked up by name when asked for.

    wasmtime-py's ``Instance.exports()`` walks every export with ``wasmtime_instance_export_nth``, which
    costs time quadratic in their number: 60,000 exported functions took 150 s, a whole vCPU worker, per
    VM made. A machine needs a handful of them by name."""

    def __init__(self, store: wasmtime.Store, instance: wasmtime.Instance) -> None:
        self._store = store
        self._instance = instance
        self._found: dict[str, Any] = {}

    def get(self, name: str, default: Any = None) -> Any:
        if name in self._found:
            return self._found[name]
        item = ffi.wasmtime_extern_t()
        raw = name.encode()
        if not ffi.wasmtime_instance_export_get(self._store._context(), ctypes.byref(self._instance._instance),
                                                ctypes.create_string_buffer(raw, len(raw)), len(raw),
                                                ctypes.byref(item)):
            return default
        extern = self._found[name] = wrap_extern(item)
        return extern

    def __getitem__(self, name: str) -> Any:
        found = self.get(name, _MISSING)
        if found is _MISSING:
            raise KeyError(name)
        return found

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name, _MISSING) is not _MISSING


_MISSING = object()


class InstantiationError(Exception):
    def __init__(self, message: str, trap_code: wasmtime.TrapCode | None = None) -> None:
        super().__init__(message)
        self.trap_code = trap_code


def instantiate(store: wasmtime.Store, linker: wasmtime.Linker, module: wasmtime.Module,
                pre: wasmtime.InstancePre | None = None) -> wasmtime.Instance:
    """Instantiate to completion on the calling thread (start functions were rewritten away at import)."""
    inst = Instantiation(store, linker, module, pre)
    try:
        while not inst.poll():
            pass
        return inst.result()
    finally:
        inst.close()


# --------------------------------------------------------------------------------------------------------
# Host functions that may suspend the guest
# --------------------------------------------------------------------------------------------------------
# The host-call path is hot (a socket echo makes four calls per message), so it avoids what costs most in
# ctypes: objects per argument or access, and foreign calls that release the GIL.
#
# * The few C functions used per call are bound a second time through ``PyDLL`` (same library, already
#   loaded): they are tiny (a pointer or a length), and a ``CDLL`` call releases and re-takes the GIL around
#   each of them, which on a busy daemon means waiting for the event loop thread every time. Only
#   ``wasmtime_call_future_poll`` (which runs the guest) releases the GIL.
# * Raw memory (wasmtime's argument/result arrays, the continuation, guest memory) is read and written
#   through ``_RAW``, one memoryview over the whole address space: ``struct.unpack_from(_RAW, addr - 1)``
#   and slice assignment cost no foreign call and no ctypes object. Every address used with it comes from
#   wasmtime or is a guest range checked against the memory's current size, exactly as with ctypes; it is
#   private to this module.
def _pyfunc(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> Any:
    fn = lib[name]  # a fresh function object: wasmtime-py's own bindings stay as they are
    fn.restype = restype
    fn.argtypes = argtypes
    return fn


_P, _SZ = ctypes.c_void_p, ctypes.c_size_t
_wt_lib = ctypes.PyDLL(ffi.dll._name)
_caller_context = _pyfunc(_wt_lib, "wasmtime_caller_context", _P, _P)
_caller_export_get = _pyfunc(_wt_lib, "wasmtime_caller_export_get", ctypes.c_bool, _P, ctypes.c_char_p, _SZ, _P)
_memory_data = _pyfunc(_wt_lib, "wasmtime_memory_data", _P, _P, _P)
_memory_data_size = _pyfunc(_wt_lib, "wasmtime_memory_data_size", _SZ, _P, _P)
_global_set = _pyfunc(_wt_lib, "wasmtime_global_set", _P, _P, _P, _P)
_trap_new = _pyfunc(_wt_lib, "wasmtime_trap_new", _P, ctypes.c_char_p, _SZ)
_memview = _pyfunc(ctypes.pythonapi, "PyMemoryView_FromMemory", ctypes.py_object, _P, ctypes.c_ssize_t, ctypes.c_int)
_PyBUF_WRITE = 0x200
_RAW: memoryview = _memview(1, sys.maxsize - 1, _PyBUF_WRITE)  # _RAW[a - 1] is the byte at address a

_VAL_SIZE = ctypes.sizeof(ffi.wasmtime_val_t)
_VAL_OF = ffi.wasmtime_val_t.of.offset
_EXTERN_OF = ffi.wasmtime_extern_t.of.offset
_EXTERN_MEMORY = ffi.WASMTIME_EXTERN_MEMORY.value
_EXTERN_FUNC, _EXTERN_GLOBAL = ffi.WASMTIME_EXTERN_FUNC.value, ffi.WASMTIME_EXTERN_GLOBAL.value
_MEMORY_NAME = b"memory"
_MASK = {I32: 0xFFFFFFFF, I64: 0xFFFFFFFFFFFFFFFF}


class _MemoryRef:
    """The caller's ``memory`` as last seen on this thread: the extern and its address and size."""

    __slots__ = ("ctx", "mem", "ext", "size", "addr")

    def __init__(self, ctx: int, caller: int) -> None:
        self.ctx = ctx
        self.ext = ffi.wasmtime_extern_t()  # owns the wasmtime_memory_t that ``mem`` points at
        ok = _caller_export_get(caller, _MEMORY_NAME, len(_MEMORY_NAME), ctypes.addressof(self.ext))
        self.mem = ctypes.addressof(self.ext) + _EXTERN_OF if ok and self.ext.kind == _EXTERN_MEMORY else 0
        self.size = -1
        self.addr = 0


class _CallerStore:
    """A store as wasmtime-py's functions take it (they only ask for ``_context()``): the caller's, from a
    host call."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx

    def _context(self) -> Any:
        return self._ctx


class GuestMemory:
    """Bounds-checked access to the caller's exported ``memory``, valid for one host call.

    Nothing is looked up until the first access. The memory's size is then read once and kept for the rest
    of the call (linear memory only grows while Wasm runs, never inside a host call); its address is read
    again only when the size changed (a grown memory may have moved; one that did not grow did not).
    """

    __slots__ = ("_caller", "_ctx", "_size", "_off", "_none")

    def __init__(self, caller: int) -> None:
        self._caller = caller  # address of the wasmtime_caller_t
        self._ctx = 0          # wasmtime_context_t *, resolved lazily
        self._size = -1        # -1: not read yet
        self._off = 0          # index in _RAW of the memory's first byte
        self._none = False     # the guest exports no memory

    def _context(self) -> int:
        ctx = self._ctx
        if not ctx:
            ctx = self._ctx = _caller_context(self._caller)
        return ctx  # type: ignore[no-any-return]

    def store_context(self) -> Any:
        """The caller's store, for wasmtime-py calls that take one (``Linker.define``, instantiation, exports)
        from inside this host call."""
        return _CallerStore(ctypes.cast(self._context(), ctypes.POINTER(ffi.wasmtime_context_t)))

    def _load(self) -> int:
        ctx = self._context()
        cur = _current
        ref = getattr(cur, "mem", None)
        if ref is None or ref.ctx != ctx:
            ref = _MemoryRef(ctx, self._caller)
            # A memory never changes identity, so within one slice (between two ``set_current_vm`` calls
            # on this thread, while the store cannot be freed) it is looked up once. Outside a slice
            # nothing is kept: a store may be freed and another allocated at the same address.
            if getattr(cur, "vm", None) is not None:
                cur.mem = ref
        if not ref.mem:
            self._none = True
            self._size = 0
            return 0
        size = _memory_data_size(ctx, ref.mem)
        if size != ref.size:
            ref.addr = _memory_data(ctx, ref.mem) or 0
            ref.size = size
        self._off = ref.addr - 1
        self._size = size
        return size  # type: ignore[no-any-return]

    def check(self, ptr: int, length: int) -> bool:
        """Whether ``[ptr, ptr+length)`` lies inside guest memory."""
        size = self._size
        if size < 0:
            size = self._load()
        return 0 <= ptr and 0 <= length and ptr + length <= size

    def _start(self, ptr: int, length: int) -> int:
        """The index in ``_RAW`` of guest address ``ptr``, once ``[ptr, ptr+length)`` is checked."""
        size = self._size
        if size < 0:
            size = self._load()
        if ptr < 0 or length < 0 or ptr + length > size:
            if self._none:
                raise MemoryFault("guest exports no memory")
            raise MemoryFault(f"range {ptr}+{length} outside guest memory of {size} bytes")
        return self._off + ptr

    def size(self) -> int:
        size = self._size
        return self._load() if size < 0 else size

    def read(self, ptr: int, length: int) -> bytes:
        if not length:
            return b""
        i = self._start(ptr, length)
        return _RAW[i:i + length].tobytes()

    def write(self, ptr: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if n:
            i = self._start(ptr, n)
            try:
                _RAW[i:i + n] = data
            except (TypeError, ValueError):  # a view of another format or shape: copy it flat
                _RAW[i:i + n] = bytes(data)

    def view(self, ptr: int, length: int) -> memoryview:
        """A zero-copy writable view; do not keep it beyond the host call."""
        i = self._start(ptr, length)
        return _RAW[i:i + length]

    def grow(self, pages: int) -> int:
        """``memory.grow`` on the caller's memory from inside a host call: the old size in pages, or -1 when
        the store's limits (or the memory's maximum) refuse it. The next access re-reads size and address."""
        ctx = self._context()
        ref = _MemoryRef(ctx, self._caller)
        if not ref.mem:
            return -1
        prev = ctypes.c_uint64()
        err = ffi.wasmtime_memory_grow(ctypes.cast(ctx, ctypes.POINTER(ffi.wasmtime_context_t)),
                                       ctypes.cast(ref.mem, ctypes.POINTER(ffi.wasmtime_memory_t)), pages,
                                       ctypes.byref(prev))
        if err:
            ffi.wasmtime_error_delete(err)
            return -1
        self._size = -1
        return int(prev.value)

    def call(self, func: wasmtime.Func, args: Sequence[int], nresults: int = 1) -> list[int]:
        """Call ``func`` (of the caller's store, all-i32 signature) from inside a host call and run it to
        completion on this thread; its yields (epoch, fuel) are polled through. Raises HostTrap when it
        traps or fails."""
        ctx = ctypes.cast(self._context(), ctypes.POINTER(ffi.wasmtime_context_t))
        argv = (ffi.wasmtime_val_t * max(1, len(args)))()
        for i, v in enumerate(args):
            argv[i].kind = I32  # type: ignore[assignment]
            argv[i].of.i32 = v
        res = (ffi.wasmtime_val_t * max(1, nresults))()
        trap = ctypes.POINTER(ffi.wasm_trap_t)()
        error = ctypes.POINTER(ffi.wasmtime_error_t)()
        raw = func._func
        fut = ffi.wasmtime_func_call_async(ctx, ctypes.byref(raw), argv, len(args), res, nresults,
                                           ctypes.byref(trap), ctypes.byref(error))
        try:
            while not ffi.wasmtime_call_future_poll(fut):
                pass
        finally:
            ffi.wasmtime_call_future_delete(fut)
        self._size = -1  # the callee may have grown memory
        if trap:
            raise HostTrap(trap_text(wasmtime.Trap._from_ptr(trap).message))
        if error:
            raise HostTrap(trap_text(str(wasmtime.WasmtimeError._from_ptr(error))))
        return [res[i].of.i32 for i in range(nresults)]

    def set_global_i32(self, glob: wasmtime.Global, value: int) -> None:
        """Set a global of the calling instance from inside a host call (no Wasm runs)."""
        val = ffi.wasmtime_val_t()
        val.kind = I32  # type: ignore[assignment]
        val.of.i32 = value
        err = _global_set(self._context(), ctypes.addressof(glob._global), ctypes.addressof(val))
        if err:
            raise wasmtime.WasmtimeError._from_ptr(ctypes.cast(err, ctypes.POINTER(ffi.wasmtime_error_t)))

    def set_export_global_i32(self, name: str, value: int) -> None:
        """Set the calling instance's exported i32 global ``name`` from inside a host call (KeyError when it
        exports no such global)."""
        ext = ffi.wasmtime_extern_t()
        raw = name.encode()
        if not _caller_export_get(self._caller, raw, len(raw), ctypes.addressof(ext)) or ext.kind != _EXTERN_GLOBAL:
            raise KeyError(name)
        val = ffi.wasmtime_val_t()
        val.kind = I32  # type: ignore[assignment]
        val.of.i32 = value
        err = _global_set(self._context(), ctypes.addressof(ext) + _EXTERN_OF, ctypes.addressof(val))
        if err:
            raise wasmtime.WasmtimeError._from_ptr(ctypes.cast(err, ctypes.POINTER(ffi.wasmtime_error_t)))


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
    """Called by the scheduler at the start and the end of every slice on its worker thread."""
    _current.vm = vm
    _current.mem = None


def current_vm() -> Any:
    return getattr(_current, "vm", None)


class _Host:
    """One defined import: the function and how to unpack its arguments and pack its results."""

    __slots__ = ("fn", "unpack", "nres", "kinds", "pack", "kind", "mask", "suspends")

    def __init__(self, fn: HostFn, params: Sequence[int], results: Sequence[int], suspends: bool = False) -> None:
        self.fn = fn
        self.suspends = suspends  # a suspension point: ``suspension_hook`` sees the call first
        # wasmtime_val_t: kind (1 byte), padding, the value at _VAL_OF; an array of _VAL_SIZE strides
        fmt = "".join(f"{_VAL_OF}x{'q' if k == I64 else 'i'}{_VAL_SIZE - _VAL_OF - (8 if k == I64 else 4)}x"
                      for k in params)
        self.unpack = struct.Struct("<" + fmt).unpack_from
        self.nres = len(results)
        self.kinds = list(results)
        one = f"B{_VAL_OF - 1}xQ"  # kind, then the value as 64 bits (an i32 is its low half)
        self.pack = struct.Struct("<" + f"{_VAL_SIZE - _VAL_OF - 8}x".join([one] * len(results))).pack_into
        self.kind = results[0] if results else I32
        self.mask = _MASK[self.kind]


@dataclass
class _Suspended:
    pending: Pending
    caller: int
    results: int
    host: _Host
    trap_ret: int


_suspended: dict[int, _Suspended] = {}
_ids = itertools.count(1)
_hosts: dict[int, _Host] = {}


def _write_results(results: int, host: _Host, values: Sequence[int]) -> None:
    n = host.nres
    if n == 1 and len(values) == 1:
        host.pack(_RAW, results - 1, host.kind, int(values[0]) & host.mask)
    elif n:
        vals = [*values[:n], *([0] * (n - len(values)))]
        flat: list[int] = []
        for k, v in zip(host.kinds, vals, strict=True):
            flat += (k, int(v) & _MASK[k])
        host.pack(_RAW, results - 1, *flat)


def _set_trap(trap_ret: int, message: str) -> None:
    msg = message.encode()
    _PTR.pack_into(_RAW, trap_ret - 1, _trap_new(msg, len(msg)) or 0)


@ffi.wasmtime_func_async_continuation_callback_t
def _always_ready(env: Any) -> bool:
    return True


# The continuation of a call answered at once must still be a function that says "ready". A Python one
# costs a second trip into Python (and another GIL acquisition) per host call; libc's strlen on a
# one-character string returns 1 (true) without either.
_PTR = struct.Struct("P")
_CONT = struct.Struct("PPP")  # wasmtime_async_continuation_t: callback, env, finalizer
try:
    _strlen = ctypes.CDLL(None).strlen
    _strlen.restype, _strlen.argtypes = ctypes.c_size_t, [ctypes.c_char_p]
    _ONE_CHAR = ctypes.create_string_buffer(b"x")
    if _strlen(_ONE_CHAR) != 1:
        raise OSError("strlen misbehaves")
    _READY = (ctypes.cast(_strlen, ctypes.c_void_p).value, ctypes.addressof(_ONE_CHAR), 0)
except (OSError, AttributeError, TypeError):  # pragma: no cover - no libc symbols: a Python continuation
    _READY = (ctypes.cast(_always_ready, ctypes.c_void_p).value, 0, 0)
assert ctypes.sizeof(ffi.wasmtime_async_continuation_t) == _CONT.size


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
        _write_results(s.results, s.host, values)
    except HostTrap as exc:
        _set_trap(s.trap_ret, str(exc))
    except Exception as exc:  # a bug in a device must not unwind through C
        _set_trap(s.trap_ret, f"host error: {type(exc).__name__}: {exc}")
    return True


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _continuation_done(env: Any) -> None:
    _suspended.pop(int(env or 0), None)


_CONTINUATION = ctypes.cast(_continuation, ctypes.c_void_p).value
_CONTINUATION_DONE = ctypes.cast(_continuation_done, ctypes.c_void_p).value


# Every argument is a plain address or integer: ctypes builds no pointer objects per call.
@ctypes.CFUNCTYPE(None, _P, _P, _P, _SZ, _P, _SZ, _P, _P)
def _trampoline(env: int, caller: int, args: int, nargs: int, results: int, nresults: int,
                trap_ret: int, cont: int) -> None:
    host = _hosts[env]
    try:
        mem = GuestMemory(caller)
        hook = suspension_hook if host.suspends else None
        res: HostResult | None = hook(mem) if hook is not None else None
        if res is None:
            res = host.fn(mem, host.unpack(_RAW, args - 1) if nargs else ())
        if type(res) is list or type(res) is tuple:
            if host.nres == 1 and len(res) == 1:
                host.pack(_RAW, results - 1, host.kind, int(res[0]) & host.mask)
            else:
                _write_results(results, host, res)
            _CONT.pack_into(_RAW, cont - 1, *_READY)
            return
        key = next(_ids)
        _suspended[key] = _Suspended(res, caller, results, host, trap_ret)  # type: ignore[arg-type]
        _CONT.pack_into(_RAW, cont - 1, _CONTINUATION, key, _CONTINUATION_DONE)
        return
    except HostTrap as exc:
        _set_trap(trap_ret, str(exc))
    except Exception as exc:
        _set_trap(trap_ret, f"host error: {type(exc).__name__}: {exc}")
    _CONT.pack_into(_RAW, cont - 1, *_READY)


_TRAMPOLINE = ctypes.cast(_trampoline, ffi.wasmtime_func_async_callback_t)


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
    key = next(_ids)
    _hosts[key] = _Host(fn, [_VALTYPES[p] for p in params], [_VALTYPES[r] for r in results], suspends)
    _define_async(linker, module, name, params, results, _TRAMPOLINE, key)


def define_native_host_func(linker: wasmtime.Linker, module: str, name: str, params: Sequence[str],
                            results: Sequence[str], callback: int) -> None:
    """Define ``module.name`` as the C function at address ``callback`` (a ``wasmtime_func_async_callback_t``
    that completes at once: functions/native.py's host calls), which runs without Python."""
    _define_async(linker, module, name, params, results, ctypes.cast(callback, ffi.wasmtime_func_async_callback_t),
                  None)


def _define_async(linker: wasmtime.Linker, module: str, name: str, params: Sequence[str], results: Sequence[str],
                  callback: Any, env: int | None) -> None:
    for t in (*params, *results):
        if t not in _VALTYPES:
            raise ValueError(f"unsupported value type {t!r}")
    ptypes = _valtypes(params)
    rtypes = _valtypes(results)
    functype = ffi.wasm_functype_new(ctypes.byref(ptypes), ctypes.byref(rtypes))
    m, n = module.encode(), name.encode()
    err = ffi.wasmtime_linker_define_async_func(
        linker.ptr(), m, len(m), n, len(n), functype, callback, env,
        ctypes.cast(0, ctypes.CFUNCTYPE(None, ctypes.c_void_p)))
    ffi.wasm_functype_delete(functype)
    if err:
        raise wasmtime.WasmtimeError._from_ptr(err)


def layouts() -> tuple[int, int, int, int, int]:
    """Sizes and union offsets of the C API's value, extern and instance types, as wasmtime-py declares them
    (functions/native.py checks its build against them)."""
    return (ctypes.sizeof(ffi.wasmtime_val_t), ffi.wasmtime_val_t.of.offset, ctypes.sizeof(ffi.wasmtime_extern_t),
            _EXTERN_OF, ctypes.sizeof(ffi.wasmtime_instance_t))


def library_path() -> str:
    """The path of the wasmtime library wasmtime-py loaded."""
    return str(ffi.dll._name)


def engine_address(engine: wasmtime.Engine) -> int:
    return ctypes.addressof(engine.ptr().contents)


def instance_pre_address(pre: wasmtime.InstancePre) -> int:
    return ctypes.addressof(pre.ptr().contents)


# --------------------------------------------------------------------------------------------------------
# A store for short-lived instances, driven with the GIL held
# --------------------------------------------------------------------------------------------------------
# A function's direct instance (functions/direct.py) is made, run and dropped in one job on a vCPU worker,
# while the event loop and the other workers want the GIL too. wasmtime-py's bindings release the GIL at every
# C call, and getting it back is a hand-off that costs a thread wake-up (tens of microseconds in a VM) when
# another thread holds it: two dozen of those made a 100 us instance take a millisecond under load. Here every
# short call keeps the GIL (PyDLL); only the futures that run Wasm (instantiation, the entry) release it while
# they are polled, and the store's deletion (its memory is unmapped).
_c_lib = ctypes.CDLL(ffi.dll._name)
_I64, _U64 = ctypes.c_int64, ctypes.c_uint64
_store_new = _pyfunc(_wt_lib, "wasmtime_store_new", _P, _P, _P, _P)
_store_context = _pyfunc(_wt_lib, "wasmtime_store_context", _P, _P)
_store_delete = _pyfunc(_c_lib, "wasmtime_store_delete", None, _P)
_set_fuel = _pyfunc(_wt_lib, "wasmtime_context_set_fuel", _P, _P, _U64)
_set_deadline = _pyfunc(_wt_lib, "wasmtime_context_set_epoch_deadline", None, _P, _U64)
_limiter = _pyfunc(_wt_lib, "wasmtime_store_limiter", None, _P, _I64, _I64, _I64, _I64, _I64)
_wasi_new = _pyfunc(_wt_lib, "wasi_config_new", _P)
_wasi_argv = _pyfunc(_wt_lib, "wasi_config_set_argv", ctypes.c_bool, _P, _SZ, _P)
_wasi_env = _pyfunc(_wt_lib, "wasi_config_set_env", ctypes.c_bool, _P, _SZ, _P, _P)
_wasi_stdout = _pyfunc(_wt_lib, "wasi_config_set_stdout_file", ctypes.c_bool, _P, ctypes.c_char_p)
_wasi_stderr = _pyfunc(_wt_lib, "wasi_config_set_stderr_file", ctypes.c_bool, _P, ctypes.c_char_p)
_wasi_delete = _pyfunc(_wt_lib, "wasi_config_delete", None, _P)
_set_wasi = _pyfunc(_wt_lib, "wasmtime_context_set_wasi", _P, _P, _P)
_export_get = _pyfunc(_wt_lib, "wasmtime_instance_export_get", ctypes.c_bool, _P, _P, ctypes.c_char_p, _SZ, _P)
_pre_instantiate = _pyfunc(_wt_lib, "wasmtime_instance_pre_instantiate_async", _P, _P, _P, _P, _P, _P)
_func_call = _pyfunc(_wt_lib, "wasmtime_func_call_async", _P, _P, _P, _P, _SZ, _P, _SZ, _P, _P)
_future_poll = _pyfunc(_c_lib, "wasmtime_call_future_poll", ctypes.c_bool, _P)  # (runs Wasm: releases the GIL)
_future_delete = _pyfunc(_wt_lib, "wasmtime_call_future_delete", None, _P)


def _cstrings(items: Sequence[bytes]) -> Any:
    return (ctypes.c_char_p * max(1, len(items)))(*items)


class LeanStore:
    """A store, its WASI context and one instance, for an instance that lives for one short run (a function's
    direct instance). Use on one thread; ``close`` frees everything."""

    __slots__ = ("_ptr", "ctx", "_instance", "_externs", "memory")

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._ptr = _store_new(ctypes.addressof(engine.ptr().contents), None, None)
        self.ctx: int = _store_context(self._ptr)
        self._instance = ffi.wasmtime_instance_t()
        self._externs: list[Any] = []  # (they own the handles the addresses below point into)
        self.memory = 0  # the instance's exported memory (a wasmtime_memory_t address), 0 for none

    def limit(self, fuel: int, deadline_ticks: int, memory: int, table_elements: int, instances: int,
              tables: int, memories: int) -> None:
        err = _set_fuel(self.ctx, fuel)
        if err:
            raise wasmtime.WasmtimeError._from_ptr(ctypes.cast(err, ctypes.POINTER(ffi.wasmtime_error_t)))
        _set_deadline(self.ctx, deadline_ticks)  # (no yield is configured: the deadline traps)
        _limiter(self._ptr, memory, table_elements, instances, tables, memories)

    def set_wasi(self, argv: Sequence[str], env: dict[str, str], stdout: bytes, stderr: bytes) -> None:
        """WASI with these arguments and environment, stdout and stderr written to the files at these paths
        (opened and truncated now), no stdin (a direct instance's own ``fd_read`` serves it) and no files."""
        args = [a.encode() for a in argv]
        names = [k.encode() for k in env]
        values = [v.encode() for v in env.values()]
        cfg = _wasi_new()
        if not (_wasi_argv(cfg, len(args), _cstrings(args)) and _wasi_env(cfg, len(names), _cstrings(names),
                                                                          _cstrings(values))
                and _wasi_stdout(cfg, stdout) and _wasi_stderr(cfg, stderr)):
            _wasi_delete(cfg)
            raise OSError("cannot set up the WASI context (an argument with a NUL byte, or the output files)")
        err = _set_wasi(self.ctx, cfg)  # (takes the configuration)
        if err:
            raise wasmtime.WasmtimeError._from_ptr(ctypes.cast(err, ctypes.POINTER(ffi.wasmtime_error_t)))

    def instantiate(self, pre: wasmtime.InstancePre) -> None:
        """Instantiate (raises InstantiationError); the instance's ``memory`` export is looked up."""
        trap, error = ctypes.POINTER(ffi.wasm_trap_t)(), ctypes.POINTER(ffi.wasmtime_error_t)()
        fut = _pre_instantiate(ctypes.addressof(pre.ptr().contents), self.ctx, ctypes.addressof(self._instance),
                               ctypes.addressof(trap), ctypes.addressof(error))
        try:
            while not _future_poll(fut):
                pass
        finally:
            _future_delete(fut)
        ended = _failure(trap, error)
        if isinstance(ended, Trapped):
            raise InstantiationError(ended.message, trap_code=ended.code)
        if ended is not None:
            raise InstantiationError(ended.message if isinstance(ended, Failed) else f"exit {ended.code}")
        ext = self._export(b"memory")
        self.memory = ctypes.addressof(ext) + _EXTERN_OF if ext is not None and ext.kind == _EXTERN_MEMORY else 0

    def _export(self, name: bytes) -> Any:
        ext = ffi.wasmtime_extern_t()
        if not _export_get(self.ctx, ctypes.addressof(self._instance), name, len(name), ctypes.addressof(ext)):
            return None
        self._externs.append(ext)
        return ext

    def memory_size(self) -> int:
        return _memory_data_size(self.ctx, self.memory) if self.memory else 0  # type: ignore[no-any-return]

    def call(self, name: str, nresults: int = 0) -> Outcome:
        """Call the exported function ``name`` (no parameters, ``nresults`` results, ignored) to its end."""
        ext = self._export(name.encode())
        if ext is None or ext.kind != _EXTERN_FUNC:
            return Failed(f"the module exports no function {name!r}")
        results = (ffi.wasmtime_val_t * max(1, nresults))()
        trap, error = ctypes.POINTER(ffi.wasm_trap_t)(), ctypes.POINTER(ffi.wasmtime_error_t)()
        fut = _func_call(self.ctx, ctypes.addressof(ext) + _EXTERN_OF, None, 0, ctypes.addressof(results),
                         nresults, ctypes.addressof(trap), ctypes.addressof(error))
        try:
            while not _future_poll(fut):
                pass
        finally:
            _future_delete(fut)
        return _failure(trap, error) or Returned([])

    def close(self) -> None:
        ptr, self._ptr = self._ptr, None
        self._externs.clear()
        self.memory = 0
        if ptr:
            _store_delete(ptr)


def _failure(trap: Any, error: Any) -> Exited | Trapped | Failed | None:
    if trap:
        t = wasmtime.Trap._from_ptr(trap)
        return Trapped(trap_text(t.message), t.trap_code)
    if error:
        err = wasmtime.WasmtimeError._from_ptr(error)
        if isinstance(err, wasmtime.ExitTrap):
            return Exited(err.code)
        return Failed(trap_text(str(err)) if str(err) else "error")
    return None
