"""The device model: what a device is, what it keeps per VM, and what it sees of the daemon and of a VM.

As in Firecracker, every device is one module with one ``Device`` type, and what it keeps for one VM is a
``DevicePart`` with a typed ``save``/``restore`` pair (Firecracker's ``Persist``). The manager, the
snapshot controller and the daemon use devices only through these types.

Devices are a lower layer than ``vmm``: they never import it. What they may use of the hypervisor and of
a VM is declared here as protocols (``DeviceHost``, ``GuestVm``), which ``vmm.manager.Hypervisor`` and
``vmm.vm.Vm`` satisfy; mypy checks that where the manager hands itself and a VM to ``attach``.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import wasmtime
from prometheus_client.core import Metric

from ..config import Config
from ..engine.hostop import HostOp

if TYPE_CHECKING:
    from aiohttp import web


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
        it, and the scheduler parks the VM until ``op`` is ready (the op goes to the machine's mailbox; the
        event loop takes it from there when the slice ends)."""


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



# ------------------------------------------------------------------ per VM: the part and its saved state
class SavedState(Protocol):
    """What a part saves: a frozen dataclass that encodes itself as the snapshot manifest stores it."""

    def encode(self) -> dict[str, Any]:
        """JSON for the manifest's ``"devices": {part name: state}`` (docs/snapshot-format.md)."""
        ...


S = TypeVar("S", bound=SavedState)


@dataclass(frozen=True)
class NoState:
    """The saved state of a part that keeps nothing in the manifest (see ``DevicePart.save``)."""

    def encode(self) -> dict[str, Any]:
        return {}


class DevicePart(ABC, Generic[S]):
    """What one device keeps for one VM, in ``vm.devices`` under ``name``: shown in the API, closed when
    the VM ends, saved into a snapshot while the VM is frozen and restored into the new VM's fresh part."""

    name: ClassVar[str]  # its key in vm.devices, in the API's "devices" and in the manifest's "devices"

    @abstractmethod
    def to_api(self) -> Any:
        """The part in ``GET /v1/vms/{id}``'s ``devices``."""

    @abstractmethod
    def close(self) -> None:
        """On the event loop when the VM ends; may be called more than once."""

    @abstractmethod
    def save(self) -> S | None:
        """The part's state for a snapshot (event loop, the VM frozen). None: nothing for the manifest's
        device states (what it has is captured another way, as the disks' contents are)."""

    @classmethod
    @abstractmethod
    def load(cls, raw: object) -> S:
        """Decode what ``save(...).encode()`` wrote into a snapshot; ValueError if it is malformed."""

    @abstractmethod
    def restore(self, state: S) -> None:
        """Bring a VM's freshly attached part to ``state`` (event loop, before the VM runs); ValueError if
        the state cannot apply here."""


class DeviceStateError(ValueError):
    """A snapshot's state for one part is malformed or does not apply."""

    def __init__(self, part: str, reason: str) -> None:
        super().__init__(f"{part}: {reason}")
        self.part, self.reason = part, reason


P = TypeVar("P", bound=DevicePart[Any])


class DeviceSet:
    """The devices of one VM (``vm.devices``), closed together when it stops."""

    def __init__(self) -> None:
        self.parts: dict[str, DevicePart[Any]] = {}

    def add(self, part: DevicePart[Any]) -> None:
        self.parts[part.name] = part

    def get(self, kind: type[P]) -> P | None:
        """The VM's part of type ``kind``, if its device attached one."""
        part = self.parts.get(kind.name)
        return part if isinstance(part, kind) else None

    def to_api(self) -> dict[str, Any]:
        return {name: part.to_api() for name, part in self.parts.items()}

    def close(self) -> None:
        for part in self.parts.values():
            part.close()

    def save(self) -> dict[str, dict[str, Any]]:
        """Every part's state, as the manifest's ``"devices"`` stores it."""
        out = {}
        for name, part in self.parts.items():
            state = part.save()
            if state is not None:
                out[name] = state.encode()
        return out

    def restore(self, states: Mapping[str, object]) -> None:
        """Restore each part a snapshot has a state for. A state for a part this VM does not have is left
        alone (a device the saving daemon had and this one has not); DeviceStateError names a bad one."""
        for name, raw in states.items():
            part = self.parts.get(name)
            if part is None:
                continue
            try:
                part.restore(part.load(raw))
            except (ValueError, TypeError) as exc:
                raise DeviceStateError(name, str(exc)) from None


# ------------------------------------------------------------------ the device type
class Device(ABC):
    """One device module: its guest imports, defined once on the shared linker, and its per-VM parts."""

    name: ClassVar[str]
    # defines WASI's own functions over wasmtime's: only on the linker for modules that need it (the
    # hypervisor keeps a second linker without them, see devices/files.py)
    shadows_wasi: ClassVar[bool] = False

    @abstractmethod
    def define(self, linker: wasmtime.Linker) -> None:
        """Define the device's guest imports (once, at start-up)."""

    @abstractmethod
    async def attach(self, hv: DeviceHost, vm: GuestVm) -> None:
        """At create (event loop): add this device's part to ``vm.devices``, if the VM needs one."""

    def metrics(self, hv: DeviceHost) -> list[Metric]:
        """Metric families for ``GET /metrics`` (prometheus-client's, read at scrape time)."""
        return []

    def sites(self, runner: web.AppRunner) -> list[web.BaseSite]:
        """Listening sites the device serves through the daemon's HTTP runner (started with the API)."""
        return []

    async def shutdown(self) -> None:
        """At daemon stop, after the guests stopped: release what the device holds."""
        return None


D = TypeVar("D", bound=Device)


class DeviceTable:
    """The daemon's devices, in the order they were added (``hv.devices``)."""

    def __init__(self) -> None:
        self._devices: list[Device] = []

    def add(self, device: Device) -> None:
        if any(d.name == device.name for d in self._devices):
            raise ValueError(f"a device named {device.name!r} is already installed")
        self._devices.append(device)

    def get(self, kind: type[D]) -> D | None:
        """The installed device of type ``kind``: how one part of the daemon finds another's device."""
        for d in self._devices:
            if isinstance(d, kind):
                return d
        return None

    def __iter__(self) -> Iterator[Device]:
        return iter(list(self._devices))
