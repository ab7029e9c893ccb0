"""The device model: what a device sees of the daemon and of a VM.

Devices are a lower layer than ``vmm``: they never import it. What they may use of the hypervisor and of
a VM is declared here as protocols (``DeviceHost``, ``GuestVm``), which ``vmm.manager.Hypervisor`` and
``vmm.vm.Vm`` satisfy; mypy checks that where the manager hands itself and a VM to ``attach``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..config import Config
from ..engine.hostop import HostOp


class DiskRequest(Protocol):
    """One disk a VM asked for (``vmm.vm.DiskSpec``)."""

    @property
    def name(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def rate_limiter(self) -> dict[str, Any] | None: ...


class PortRequest(Protocol):
    """One published port a VM asked for (``vmm.vm.PublishSpec``)."""

    @property
    def host_ip(self) -> str: ...
    @property
    def host_port(self) -> int: ...
    @property
    def guest_port(self) -> int: ...


class GuestSpec(Protocol):
    """The parts of a VM's spec that devices read (``vmm.vm.VmSpec``)."""

    @property
    def disks(self) -> Sequence[DiskRequest]: ...
    @property
    def publish(self) -> Sequence[PortRequest]: ...
    @property
    def allow_egress(self) -> Sequence[str]: ...
    @property
    def net_rate_limiter(self) -> dict[str, Any] | None: ...


class Phase(Protocol):
    """Where a VM is in its lifecycle (``vmm.state.VmState``), as far as a device cares."""

    @property
    def value(self) -> str: ...
    @property
    def terminal(self) -> bool: ...


class GuestVm(Protocol):
    """A VM as its devices see it (``vmm.vm.Vm``)."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def spec(self) -> GuestSpec: ...
    @property
    def dir(self) -> Path: ...
    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]: ...
    @property
    def state(self) -> Phase: ...
    @property
    def devices(self) -> DeviceSet: ...

    def block_on(self, op: HostOp) -> None:
        """On the VM's vCPU worker, inside a device call that returns ``op``: the guest is suspended on
        it, and the scheduler parks the VM until ``op`` is ready."""


class IoRunner(Protocol):
    async def on_io(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking work (file I/O) on an I/O thread."""


class DeviceHost(Protocol):
    """The hypervisor as devices see it (``vmm.manager.Hypervisor``)."""

    @property
    def cfg(self) -> Config: ...
    @property
    def sched(self) -> IoRunner: ...
    @property
    def vms(self) -> Mapping[str, GuestVm]: ...


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
