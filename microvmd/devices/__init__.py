"""Devices: each module defines its guest imports once on the shared linker and attaches per-VM state.

A device object has ``define(linker)``, ``async attach(hv, vm)``, ``metrics(hv) -> list[str]`` and
``async shutdown()``; per-VM state lives in ``vm.devices`` (a ``DeviceSet``).
"""
from __future__ import annotations

from typing import Any

from .base import DeviceSet

__all__ = ["DeviceSet", "install_devices"]


def install_devices(hv: Any) -> None:
    from .clock import ClockDevice

    hv.add_device(ClockDevice())
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
