"""Devices: each module defines its guest imports once on the shared linker and attaches per-VM state.

A device object has ``define(linker)``, ``async attach(hv, vm)``, ``metrics(hv) -> list[str]`` and
``async shutdown()``; per-VM state lives in ``vm.devices`` (a ``DeviceSet``).
"""
from __future__ import annotations

from typing import Any


class DeviceSet:
    """The devices of one VM, closed together when it stops."""

    def __init__(self) -> None:
        self.parts: dict[str, Any] = {}

    def add(self, name: str, part: Any) -> None:
        self.parts[name] = part

    def get(self, name: str) -> Any:
        return self.parts.get(name)

    def to_api(self) -> dict[str, Any]:
        return {name: part.to_api() for name, part in self.parts.items()}

    def close(self) -> None:
        for part in self.parts.values():
            part.close()


def install_devices(hv: Any) -> None:
    from .clock import ClockDevice

    hv.add_device(ClockDevice())
    from .wasi import WasiDevice

    hv.add_device(WasiDevice())  # WASI's blocking calls for modules rewritten with Asyncify at import
    try:
        from .blk import BlockDevice
    except ImportError:
        pass
    else:
        hv.add_device(BlockDevice(hv))
    try:
        from .net import NetDevice
    except ImportError:
        pass
    else:
        hv.add_device(NetDevice(hv))
