"""Checkpoints (``--checkpoint-interval D``): a running VM is snapshotted every D, so that after a crash of
the daemon (kill -9, power loss) its restart policy resumes it from the last checkpoint instead of from its
image.

Each checkpoint is a diff snapshot against the one before (about 9% of a full one), every ``FULL_EVERY``-th
a full one; each manifest names all its chunks, so any checkpoint restores on its own, and once a new one is
durable (and the VM's record names it) the older ones are removed: their packs go when nothing references
them. Checkpoints are named ``ckpt-<vm id>-<n>``. One ticker task looks at the VMs every ``TICK`` seconds; a
checkpoint is skipped while the VM is not running or the previous one is still being written.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from ..errors import MicrovmError
from ..vmm.state import VmState
from ..vmm.vm import Vm

if TYPE_CHECKING:
    from .controller import Snapshots

log = logging.getLogger("microvmd.snapshot")

FULL_EVERY = 20
TICK = 0.05
PREFIX = "ckpt-"


def prefix(vm: Vm) -> str:
    return f"{PREFIX}{vm.id[:12]}-"


class Checkpointer:
    def __init__(self, snaps: Snapshots) -> None:
        self.snaps = snaps
        self.hv = snaps.hv
        self._due: dict[str, float] = {}          # vm id -> when its next checkpoint is due (monotonic)
        self._count: dict[str, int] = {}
        self._busy: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self.taken = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Before the guests are suspended or stopped: no new checkpoint starts; one being written ends."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._busy:
            await asyncio.sleep(0.01)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            for vm in list(self.hv.vms.values()):
                every = vm.spec.checkpoint_interval
                if every is None or vm.state != VmState.RUNNING or vm.id in self._busy \
                        or vm.snapshot_kind != "asyncify":
                    if every is not None and vm.state != VmState.RUNNING:
                        self._due.pop(vm.id, None)  # counted again from its next start
                    continue
                due = self._due.setdefault(vm.id, now + every)
                if now >= due:
                    self._due[vm.id] = now + every
                    self._busy.add(vm.id)
                    asyncio.get_running_loop().create_task(self._take(vm))

    async def _take(self, vm: Vm) -> None:
        try:
            n = self._count.get(vm.id, 0)
            name = f"{prefix(vm)}{time.time_ns()}"
            diff = n % FULL_EVERY != 0 and vm.id in self.snaps._parents
            try:
                await self.snaps.create(vm, name, diff)
            except MicrovmError as exc:
                if vm.state == VmState.RUNNING:
                    log.warning("vm=%s checkpoint failed: %s", vm.id[:12], exc.message)
                return
            self._count[vm.id] = n + 1
            self.taken += 1
            old = vm.checkpoint
            vm.checkpoint = name
            await self.hv.registry.save_now(vm)  # durable: a crash from now on resumes from this one
            await self._remove_older(vm, keep=name, also=old)
        finally:
            self._busy.discard(vm.id)

    async def _remove_older(self, vm: Vm, keep: str, also: str | None) -> None:
        names = await self.hv.sched.on_io(self.snaps.store.names)
        for n in names:
            if n.startswith(prefix(vm)) and n != keep:
                try:
                    await self.snaps.remove(n)
                except MicrovmError:
                    pass

    def removed(self, vm: Vm) -> None:
        """``Hypervisor.on_remove``: a removed VM's checkpoints go with it."""
        if vm.spec.checkpoint_interval is not None or vm.checkpoint:
            asyncio.get_running_loop().create_task(self._forget(vm))

    async def _forget(self, vm: Vm) -> None:
        self._due.pop(vm.id, None)
        self._count.pop(vm.id, None)
        names = await self.hv.sched.on_io(self.snaps.store.names)
        for n in names:
            if n.startswith(prefix(vm)):
                try:
                    await self.snaps.remove(n)
                except MicrovmError:
                    pass
