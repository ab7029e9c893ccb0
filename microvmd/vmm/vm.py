"""The VM record: what the user asked for, where it is in its lifecycle, and how it ended."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import contract
from ..devices.base import DeviceSet
from ..devices.console import Console, LogRate, MemoryConsole
from ..engine.hostop import HostOp
from .machine import Machine
from .restart import RestartPolicy
from .runtime import ExitRecord, VmRuntime
from .state import Control, VmState

__all__ = ["DirSpec", "DiskSpec", "ExitRecord", "PublishSpec", "Vm", "VmSpec"]


@dataclass
class DirSpec:
    host: str
    guest: str
    readonly: bool = False


@dataclass
class DiskSpec:
    name: str
    mode: str = "rw"  # rw | ro | cow
    rate_limiter: dict[str, Any] | None = None  # {"bandwidth": bucket|null, "ops": bucket|null}


@dataclass
class PublishSpec:
    guest_port: int
    host_port: int = 0
    host_ip: str = "127.0.0.1"


@dataclass
class VmSpec:
    image: str
    name: str | None = None
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    fuel: int | None = None
    memory: int | None = None
    timeout: float | None = None
    dirs: list[DirSpec] = field(default_factory=list)
    disks: list[DiskSpec] = field(default_factory=list)
    publish: list[PublishSpec] = field(default_factory=list)
    allow_egress: list[str] = field(default_factory=list)
    auto_remove: bool = False
    ephemeral: bool = False  # no record, no console files (output kept in memory); gone when it ends
    stdin: bool = False  # standard input kept open for POST /v1/vms/{ref}/stdin (run -i, attach)
    net_rate_limiter: dict[str, Any] | None = None  # Firecracker-style buckets for socket bytes and calls
    restart: str = "no"  # restart policy (vmm/restart.py)
    checkpoint_interval: float | None = None  # seconds between checkpoints (snapshot/checkpoints.py)
    # set by the daemon, never by a request (not in the contract, not recorded):
    stdin_data: bytes | None = None  # the whole standard input, given at creation (a function's request body)
    owner: str | None = None  # "fn:NAME" for a function's instances: listed only with all=true

    @classmethod
    def from_contract(cls, c: contract.VmSpec) -> VmSpec:
        """The spec as the contract decoded it (a request, a record, a snapshot's manifest)."""
        return cls(
            image=c.image, name=c.name, args=list(c.args), env=dict(c.env), fuel=c.fuel, memory=c.memory,
            timeout=c.timeout, dirs=[DirSpec(x.host, x.guest or x.host, x.readonly) for x in c.dirs],
            disks=[DiskSpec(x.name, x.mode, _limiter(x.rate_limiter)) for x in c.disks],
            publish=[PublishSpec(x.guest_port, x.host_port, x.host_ip or "127.0.0.1") for x in c.publish],
            allow_egress=list(c.allow_egress), auto_remove=c.auto_remove, ephemeral=c.ephemeral, stdin=c.stdin,
            net_rate_limiter=_limiter(c.net_rate_limiter), restart=c.restart,
            checkpoint_interval=c.checkpoint_interval,
        )

    def to_dict(self) -> dict[str, Any]:
        """As a request would give it (a record, a snapshot's manifest, an answer): the daemon's own fields left out."""
        d: dict[str, Any] = contract.to_builtins(self)
        del d["stdin_data"], d["owner"]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> VmSpec:
        """A stored spec (untrusted: decoded and checked like a request); ContractError when it does not fit."""
        return cls.from_contract(contract.convert(d, contract.VmSpec))


def _limiter(c: contract.RateLimiter | None) -> dict[str, Any] | None:
    """As the devices keep it: None when no bucket is set, else both keys (a bucket with all three fields)."""
    if c is None or (c.bandwidth is None and c.ops is None):
        return None
    return contract.to_builtins(c)  # type: ignore[no-any-return]


class Vm:
    """One VM: what was asked for (spec, limits), its record's bookkeeping, its devices and machine, and its
    lifecycle in ``rt`` (a ``VmRuntime``: changed only by ``rt.apply`` on the event loop). ``state``, ``exit``,
    ``started`` and ``finished`` read through to ``rt`` and cannot be assigned here."""

    def __init__(self, vm_id: str, spec: VmSpec, image_digest: str, image_name: str, directory: Path,
                 log_cap: int, memory_limit: int, recorded: VmRuntime | None = None,
                 log_rate: tuple[int, int] = (0, 0)) -> None:
        self.id = vm_id
        self.name = spec.name or vm_id[:12]
        self.spec = spec
        self.digest = image_digest
        self.image_name = image_name
        self.dir = directory
        rate = LogRate(*log_rate) if log_rate[0] > 0 else None  # (bytes a second, burst): limits.log_rate
        if rate is not None and recorded is not None:
            rate.seen = None  # its logs hold what an earlier daemon saw: the first look is a baseline
        self.console: Console | MemoryConsole = MemoryConsole(log_cap, rate) if spec.ephemeral else \
            Console(directory, log_cap, rate)
        self.memory_limit = memory_limit
        # a function's instances come and go by the thousand: their lines are debug-level (microvmd.vm.fn)
        self.log = logging.LoggerAdapter(logging.getLogger("microvmd.vm.fn" if spec.owner else "microvmd.vm"),
                                         {"vm": vm_id[:12]})
        # ``recorded``: the lifecycle as a record left it (registry.read); the Hypervisor settles it on the loop
        self.rt = recorded if recorded is not None else VmRuntime(vm_id, self.log)
        self.created = time.time()
        self.fuel_consumed = 0
        self.fuel_budget: int | None = spec.fuel
        self.memory_bytes = 0
        self.peak_memory = 0
        self.snapshot_kind = "stopped_only"
        self.policy = RestartPolicy.parse(spec.restart)
        self.restart_count = 0     # restarts by the policy since the user last started it
        self.user_stopped = False  # the user stopped or killed it: its policy does not restart it
        self.suspended_to: str | None = None  # snapshot taken at a clean daemon stop, to resume it from
        # paused when the previous daemon died (its record said so): resumed from its checkpoint, it stays so
        self.paused_at_crash = False
        self.checkpoint: str | None = None    # its last checkpoint, to resume it from after a crash
        # the native side (built off the loop by the builder; owned by whichever thread runs or builds it)
        self.machine: Machine | None = None
        self.devices = DeviceSet()
        self.lock = asyncio.Lock()
        self._spec_api: dict[str, Any] | None = None
        # log followers (GET logs?follow=true) and their loop: poked when the guest blocks (see block_on), one
        # poke on its way at a time (set on the vCPU worker, cleared by the poke on the loop)
        self.followers = 0
        self.follow_loop: asyncio.AbstractEventLoop | None = None
        self._poking = False

    # ---------------------------------------------------------------- the lifecycle, read-only here
    @property
    def state(self) -> VmState:
        return self.rt.state

    @property
    def exit(self) -> ExitRecord | None:
        return self.rt.exit

    @property
    def started(self) -> float | None:
        return self.rt.started

    @property
    def finished(self) -> float | None:
        return self.rt.finished

    @property
    def changed(self) -> asyncio.Event:
        """Set (and replaced) at every change of state or of the call the guest waits in."""
        return self.rt.changed

    # what a device call that waits inside itself reads (engine.hostop.wait_in_call), on the vCPU worker
    @property
    def control(self) -> Control | None:
        return self.rt.control

    @property
    def snapshot_wanted(self) -> bool:
        return self.rt.snapshot_wanted

    @property
    def spin(self) -> float:
        m = self.machine
        return m.spin if m is not None else 0.0

    @property
    def slice_end(self) -> float:
        m = self.machine
        return m.slice_end if m is not None else 0.0

    # ---------------------------------------------------------------- bookkeeping
    def sync_from_machine(self) -> None:
        m = self.machine
        if m is not None:
            self.fuel_consumed = m.fuel_consumed
            self.memory_bytes = m.memory_bytes
            self.peak_memory = max(self.peak_memory, m.peak_memory)

    def block_on(self, op: HostOp) -> None:
        """A device call suspends the guest on ``op`` (on the vCPU worker, inside the call). It goes to the
        machine's mailbox, not to ``rt``: the loop copies it in when the slice ends and parks the VM until
        ``op`` is ready. The one way devices say that a VM waits."""
        m = self.machine
        if m is not None:
            m.blocked_on = op
        # what the guest wrote before it waits is in its console now: followers read it at once, not when the
        # slice ends (after the worker's spin window, and a hop through the loop)
        loop = self.follow_loop
        if self.followers and loop is not None and not self._poking and not op.ready():
            self._poking = True  # (a guest that blocks again before the loop got to it adds nothing)
            try:
                loop.call_soon_threadsafe(self._poke)
            except RuntimeError:  # the loop is closed (the daemon is stopping)
                self._poking = False

    def _poke(self) -> None:
        self._poking = False
        self.rt.poke()

    def blocked_in(self) -> str | None:
        w = self.rt.waiting
        return w.name if w is not None and not w.ready() else None

    def to_api(self) -> dict[str, Any]:
        rt = self.rt
        spec = self._spec_api
        if spec is None:  # the spec does not change after creation: convert it once
            spec = self._spec_api = self.spec.to_dict()
        budget = self.fuel_budget
        return {
            "id": self.id,
            "name": self.name,
            "image": self.image_name,
            "digest": self.digest,
            "state": rt.state.value,
            "blocked_in": self.blocked_in(),
            "args": self.spec.args,
            "env": self.spec.env,
            "limits": {"fuel": budget, "memory": self.memory_limit, "timeout": self.spec.timeout},
            "fuel_consumed": self.fuel_consumed,
            "fuel_remaining": None if budget is None else max(0, budget - self.fuel_consumed),
            "memory_bytes": self.memory_bytes,
            "peak_memory": self.peak_memory,
            "created": self.created,
            "started": rt.started,
            "finished": rt.finished,
            "exit": contract.to_builtins(rt.exit) if rt.exit else None,
            "devices": self.devices.to_api(),
            "snapshot_kind": self.snapshot_kind,
            "spec": spec,
            "restart_policy": str(self.policy),
            "restart_count": self.restart_count,
            "restarting": self.rt.restart is not None,
            "checkpoint": self.checkpoint,
            "console": self.console_api(),
        }

    def console_api(self) -> dict[str, Any]:
        con = self.console
        rate = con.rate
        return {"written": con.written, "write_errors": con.write_errors,
                **({"rate": rate.rate, "burst": rate.burst, "holds": rate.holds, "held_s": round(rate.held_s, 3)}
                   if rate is not None else {"rate": 0, "burst": 0, "holds": 0, "held_s": 0.0})}

    def record(self) -> dict[str, Any]:
        """What survives a daemon restart."""
        rt = self.rt
        return {
            "id": self.id, "spec": self.spec.to_dict(), "digest": self.digest,
            "image_name": self.image_name,
            "state": rt.state.value, "created": self.created, "started": rt.started,
            "finished": rt.finished, "exit": contract.to_builtins(rt.exit) if rt.exit else None,
            "fuel_consumed": self.fuel_consumed, "fuel_budget": self.fuel_budget,
            "peak_memory": self.peak_memory, "memory_limit": self.memory_limit,
            "snapshot_kind": self.snapshot_kind,
            "restart_count": self.restart_count, "user_stopped": self.user_stopped,
            "suspended_to": self.suspended_to, "checkpoint": self.checkpoint,
        }
