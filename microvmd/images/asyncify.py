"""Asyncify: how a running guest becomes a snapshot-able one.

Guests built with the SDK are transformed by Binaryen's Asyncify pass for the ABI's suspension points.
At such a point the host can make the guest *unwind*: every frame saves its locals into a buffer in the
guest's own linear memory and returns, so the entry export returns with the whole call stack captured in
memory + globals. *Rewinding* calls the entry again in rewind mode; the frames restore themselves and the
guest re-enters the very import it was suspended in, which then runs for real.

The pass keeps its two control globals (``__asyncify_state``, ``__asyncify_data``) unexported; the image
normaliser exports every mutable global, and we find which two by reading the body of the pass's own
``asyncify_start_unwind`` export (``global.set $state (i32.const 1)`` then ``global.set $data (local.get 0)``).
The host sets them directly, because a host function cannot call back into Wasm in an async store.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import wasmtime

from ..images import wasmbin
from ..images.store import RESERVED_PREFIX

STATE_NORMAL, STATE_UNWINDING, STATE_REWINDING = 0, 1, 2
# The unwind buffer of a guest rewritten at import: memory the daemon grows at its first snapshot
# (docs/snapshot-format.md). Asyncify traps if a call stack does not fit.
GROWN_BUFFER_PAGES = 16  # 1 MiB


def find_control_globals(module_bytes: bytes) -> tuple[int, int] | None:
    """Global indices of (__asyncify_state, __asyncify_data), or None if this is no Asyncify module."""
    info = wasmbin.parse(module_bytes)
    exp = next((e for e in info.exports if e.name == "asyncify_start_unwind" and e.kind == "func"), None)
    if exp is None:
        return None
    defined = exp.index - info.imported_count("func")
    code = next((s for s in info.sections if s.id == 10), None)
    if code is None or defined < 0:
        return None
    pos = code.payload_offset
    count, pos = wasmbin.read_u32(module_bytes, pos)
    if defined >= count:
        return None
    for _ in range(defined):
        size, pos = wasmbin.read_u32(module_bytes, pos)
        pos += size
    size, pos = wasmbin.read_u32(module_bytes, pos)
    end = pos + size
    ndecl, pos = wasmbin.read_u32(module_bytes, pos)
    for _ in range(ndecl):
        _, pos = wasmbin.read_u32(module_bytes, pos)
        pos += 1
    sets: list[int] = []
    while pos < end and len(sets) < 2:
        op = module_bytes[pos]
        pos += 1
        if op == 0x41:      # i32.const
            _, pos = wasmbin.read_s32(module_bytes, pos)
        elif op in (0x20, 0x23):  # local.get / global.get
            _, pos = wasmbin.read_u32(module_bytes, pos)
        elif op == 0x24:    # global.set
            idx, pos = wasmbin.read_u32(module_bytes, pos)
            sets.append(idx)
        else:
            break
    return (sets[0], sets[1]) if len(sets) == 2 else None


@dataclass
class AsyncifyCtl:
    """A machine's handle on its guest's Asyncify machinery (touched only on the machine's thread)."""

    state: wasmtime.Global
    data: wasmtime.Global
    data_ptr: int
    data_end: int
    unwinding: bool = False   # the guest is unwinding right now
    unwound: bool = False     # the call stack lives in memory; the entry must be re-entered to rewind
    rewinding: bool = False   # re-entered; the first suspension point reached stops the rewind
    grown: bool = False       # the buffer is memory the daemon grew (a module rewritten at import)
    settled: bool = False     # ... and the guest's allocator cannot have claimed it (Machine.ensure_unwind_buffer)
    saved_end: int = 0        # where the saved stack of the rewind under way ends (its header's pointer)

    @classmethod
    def setup(cls, exports: object, store: wasmtime.Store, globals_: tuple[int, int], data_ptr: int,
              memory: wasmtime.Memory) -> AsyncifyCtl:
        get = exports.get  # type: ignore[attr-defined]
        state = get(f"{RESERVED_PREFIX}global_{globals_[0]}")
        data = get(f"{RESERVED_PREFIX}global_{globals_[1]}")
        if not isinstance(state, wasmtime.Global) or not isinstance(data, wasmtime.Global):
            raise ValueError("the Asyncify control globals are not exported (image not normalised?)")
        raw = memory.read(store, data_ptr, data_ptr + 8)
        _cur, end = struct.unpack("<II", raw)
        if end <= data_ptr + 8 or end > memory.data_len(store):
            raise ValueError(f"bad Asyncify buffer header at {data_ptr}: end={end}")
        return cls(state, data, data_ptr, end)

    @classmethod
    def lazy(cls, exports: object, store: wasmtime.Store, globals_: tuple[int, int]) -> AsyncifyCtl:
        """For a module rewritten at import (no ``microvm_asyncify_data``): the buffer is memory the daemon
        grows at the first snapshot (``place_buffer``), see docs/snapshot-format.md."""
        get = exports.get  # type: ignore[attr-defined]
        state = get(f"{RESERVED_PREFIX}global_{globals_[0]}")
        data = get(f"{RESERVED_PREFIX}global_{globals_[1]}")
        if not isinstance(state, wasmtime.Global) or not isinstance(data, wasmtime.Global):
            raise ValueError("the Asyncify control globals are not exported (image not normalised?)")
        return cls(state, data, 0, 0, grown=True)

    @property
    def has_buffer(self) -> bool:
        return self.data_ptr != 0

    def place_buffer(self, address: int, size: int, settled: bool) -> None:
        self.data_ptr, self.data_end, self.settled = address, address + size, settled

    def adopt_buffer(self, store: wasmtime.Store, memory: wasmtime.Memory) -> None:
        """After a restore of an unwound guest: the buffer is where ``__asyncify_data`` points (the unwind
        left it there), its end in the header the unwind wrote."""
        ptr = self.data.value(store)
        if not isinstance(ptr, int) or ptr <= 0 or ptr + 8 > memory.data_len(store):
            raise ValueError(f"the snapshot's Asyncify data pointer ({ptr}) is outside memory")
        _cur, end = struct.unpack("<II", memory.read(store, ptr, ptr + 8))
        if end <= ptr + 8 or end > memory.data_len(store):
            raise ValueError(f"bad Asyncify buffer header at {ptr}: end={end}")
        self.data_ptr, self.data_end = ptr, end

    def header(self) -> bytes:
        return struct.pack("<II", self.data_ptr + 8, self.data_end)
