"""Module ``microvm``: ``sleep_ms`` and ``yield``, the SDK's suspension points.

Both suspend the guest through a HostOp, so a sleeping guest holds no thread and can be paused, stopped
or snapshotted while it sleeps.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import wasmtime

from ..engine import wt
from ..engine.hostop import HostOp
from .base import Device, DeviceHost, GuestVm
from .wasi import EINVAL, guarded

log = logging.getLogger("microvmd.clock")

MAX_SLEEP_MS = 24 * 3600 * 1000


class SleepOp(HostOp):
    name = "sleep_ms"

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        super().__init__()
        self._handle: asyncio.TimerHandle | None = None
        loop.call_soon_threadsafe(self._arm, loop, seconds)

    def _arm(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        if not self.cancelled:
            self._handle = loop.call_later(seconds, self.set_result, 0)

    def cancel(self) -> None:
        super().cancel()
        if self._handle is not None:
            self._handle.cancel()


class ClockDevice(Device):
    """No per-VM part: a snapshot unwinds a sleeping guest from its SleepOp, and the guest repeats the
    call when it runs again."""

    name = "clock"

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None

    def define(self, linker: wasmtime.Linker) -> None:
        wt.define_host_func(linker, "microvm", "sleep_ms", ["i32"], ["i32"],
                            guarded(self._sleep, log, "microvm.sleep_ms"), suspends=True)
        wt.define_host_func(linker, "microvm", "yield", [], ["i32"], guarded(self._yield, log, "microvm.yield"),
                            suspends=True)

    def _sleep(self, mem: wt.GuestMemory, args: Sequence[int]) -> Any:
        ms = args[0]
        if ms < 0:
            return [-EINVAL]
        return self._suspend(min(ms, MAX_SLEEP_MS) / 1000.0)

    def _yield(self, mem: wt.GuestMemory, args: Sequence[int]) -> Any:
        return self._suspend(0.0)

    def _suspend(self, seconds: float) -> Any:
        vm: GuestVm = wt.current_vm()
        assert self.loop is not None
        op = SleepOp(self.loop, seconds)
        vm.block_on(op)
        return op

    async def attach(self, hv: DeviceHost, vm: GuestVm) -> None:
        self.loop = asyncio.get_running_loop()
