"""The VM record: what the user asked for, where it is in its lifecycle, and how it ended."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import contract
from ..devices.base import DeviceSet
from ..devices.console import Console, MemoryConsole
from ..engine.hostop import HostOp
from .machine import Machine
from .restart import RestartPolicy
from .state import Control, VmState


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
        d = asdict(self)
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


@dataclass
class ExitRecord:
    code: int | None
    reason: str  # "exit" or why the host stopped it
    fuel_consumed: int = 0
    peak_memory: int = 0
    wall_time_s: float = 0.0

    @property
    def host_stopped(self) -> bool:
        return self.reason != "exit"


class Vm:
    def __init__(self, vm_id: str, spec: VmSpec, image_digest: str, image_name: str, directory: Path,
                 log_cap: int, memory_limit: int) -> None:
        self.id = vm_id
        self.name = spec.name or vm_id[:12]
        self.spec = spec
        self.digest = image_digest
        self.image_name = image_name
        self.dir = directory
        self.console: Console | MemoryConsole = MemoryConsole(log_cap) if spec.ephemeral else \
            Console(directory, log_cap)
        self.memory_limit = memory_limit
        self.state = VmState.CREATED
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.exit: ExitRecord | None = None
        self.fuel_consumed = 0
        self.fuel_budget: int | None = spec.fuel
        self.memory_bytes = 0
        self.peak_memory = 0
        self.snapshot_kind = "stopped_only"
        self.policy = RestartPolicy.parse(spec.restart)
        self.restart_count = 0     # restarts by the policy since the user last started it
        self.user_stopped = False  # the user stopped or killed it: its policy does not restart it
        self.suspended_to: str | None = None  # snapshot taken at a clean daemon stop, to resume it from
        self.checkpoint: str | None = None    # its last checkpoint, to resume it from after a crash
        # a function's instances come and go by the thousand: their lines are debug-level (microvmd.vm.fn)
        self.log = logging.LoggerAdapter(logging.getLogger("microvmd.vm.fn" if spec.owner else "microvmd.vm"),
                                         {"vm": vm_id[:12]})
        # runtime (not persisted)
        self.machine: Machine | None = None
        self.devices = DeviceSet()
        self.on_cpu = False
        self.control: Control | None = None  # request seen by the worker at its next yield
        self.waiting: HostOp | None = None
        self.spin = 0.0                   # this slice's spin window (set by Machine.run_slice) ...
        self.slice_end = 0.0              # ... and when the slice ends (time.monotonic)
        self.lock = asyncio.Lock()
        self.changed = asyncio.Event()    # set and replaced at every state change
        self.deadline_handle: asyncio.TimerHandle | None = None
        self.run_since: float | None = None
        self.run_seconds = 0.0
        self._spec_api: dict[str, Any] | None = None
        self.snapshot_wanted = False      # unwind at the next suspension point
        self.frozen = False               # being captured: do not run it
        self.unwound_waiters: list[asyncio.Future[None]] = []
        self._off_cpu_waiters: list[asyncio.Future[None]] = []
        self.restart_handle: asyncio.TimerHandle | None = None  # a policy restart waiting for its back-off
        self.backoff_streak = 0           # restarts in a row after short runs (restart.delay)
        self.machine_closed: asyncio.Future[None] | None = None  # the old store's close, before a re-run

    # ---------------------------------------------------------------- on and off a vCPU (event loop only)
    def enter_cpu(self) -> None:
        self.on_cpu = True

    def leave_cpu(self) -> None:
        """The slice has returned to the event loop: whoever waits for the machine to be free may go on."""
        self.on_cpu = False
        waiters, self._off_cpu_waiters = self._off_cpu_waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    async def off_cpu(self) -> None:
        """Until no slice of this VM runs. A slice ends within one quantum (epoch interruption), so this
        needs no timeout; the store is never closed under a running slice."""
        if self.on_cpu:
            fut = asyncio.get_running_loop().create_future()
            self._off_cpu_waiters.append(fut)
            await fut

    # ---------------------------------------------------------------- bookkeeping
    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def sync_from_machine(self) -> None:
        m = self.machine
        if m is not None:
            self.fuel_consumed = m.fuel_consumed
            self.memory_bytes = m.memory_bytes
            self.peak_memory = max(self.peak_memory, m.peak_memory)

    def block_on(self, op: HostOp) -> None:
        """A device call suspends the guest on ``op`` (on the vCPU worker, inside the call): the scheduler
        parks the VM until ``op`` is ready. The one way devices say that a VM waits."""
        self.waiting = op

    def blocked_in(self) -> str | None:
        w = self.waiting
        return w.name if w is not None and not w.ready() else None

    def to_api(self) -> dict[str, Any]:
        spec = self._spec_api
        if spec is None:  # the spec does not change after creation: convert it once
            spec = self._spec_api = self.spec.to_dict()
        budget = self.fuel_budget
        return {
            "id": self.id,
            "name": self.name,
            "image": self.image_name,
            "digest": self.digest,
            "state": self.state.value,
            "blocked_in": self.blocked_in(),
            "args": self.spec.args,
            "env": self.spec.env,
            "limits": {"fuel": budget, "memory": self.memory_limit, "timeout": self.spec.timeout},
            "fuel_consumed": self.fuel_consumed,
            "fuel_remaining": None if budget is None else max(0, budget - self.fuel_consumed),
            "memory_bytes": self.memory_bytes,
            "peak_memory": self.peak_memory,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "exit": asdict(self.exit) if self.exit else None,
            "devices": self.devices.to_api(),
            "snapshot_kind": self.snapshot_kind,
            "spec": spec,
            "restart_policy": str(self.policy),
            "restart_count": self.restart_count,
            "restarting": self.restart_handle is not None,
            "checkpoint": self.checkpoint,
        }

    def record(self) -> dict[str, Any]:
        """What survives a daemon restart."""
        return {
            "id": self.id, "spec": self.spec.to_dict(), "digest": self.digest, "image_name": self.image_name,
            "state": self.state.value, "created": self.created, "started": self.started,
            "finished": self.finished, "exit": asdict(self.exit) if self.exit else None,
            "fuel_consumed": self.fuel_consumed, "fuel_budget": self.fuel_budget,
            "peak_memory": self.peak_memory, "memory_limit": self.memory_limit,
            "snapshot_kind": self.snapshot_kind,
            "restart_count": self.restart_count, "user_stopped": self.user_stopped,
            "suspended_to": self.suspended_to, "checkpoint": self.checkpoint,
        }
