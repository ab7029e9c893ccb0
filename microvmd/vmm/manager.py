"""The hypervisor: the lifecycle of every VM, and the image actions. It never sees HTTP.

Its parts: the registry (``registry.py``: the table of VMs and their records), the builder (``builder.py``:
boot and restore paths), the scheduler (``scheduler.py``: vCPU workers and I/O threads). State changes happen
on the event loop, through ``_transition`` and ``_finish``; guest code runs on vCPU workers, which only report
the end of a slice (``_on_slice_end``), and blocking work (instantiation, file I/O) on I/O workers.
"""
from __future__ import annotations

import asyncio
import builtins
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import wasmtime

from .. import contract
from ..config import Config
from ..devices import files
from ..devices.base import Device, DeviceSet, DeviceStateError, DeviceTable
from ..engine import wt
from ..engine.hostop import loop_waker
from ..errors import BadRequest, Conflict, InvalidState, MicrovmError, RequestTimeout, ShuttingDown, Unprocessable
from ..images.compiler import CompileLimits, Compiler
from ..images.importer import import_module
from ..images.store import Image, ImageStore
from ..looplag import LoopLagMonitor
from . import restart
from .builder import Builder, RestoreData
from .machine import Machine, SliceEnd
from .registry import DirRecords, VmRegistry
from .scheduler import Scheduler
from .state import Control, ExitReason, VmState, check_transition
from .vm import ExitRecord, Vm, VmSpec

log = logging.getLogger("microvmd.vmm")
T = TypeVar("T")

_TRAP_REASONS = {wasmtime.TrapCode.STACK_OVERFLOW: ExitReason.STACK_OVERFLOW,
                 wasmtime.TrapCode.OUT_OF_FUEL: ExitReason.OUT_OF_FUEL,
                 wasmtime.TrapCode.INTERRUPT: ExitReason.TIMEOUT}


class Hypervisor:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.opts = wt.EngineOptions(max_wasm_stack=cfg.limits.max_wasm_stack,
                                     memory_reservation=cfg.engine.memory_reservation,
                                     memory_guard_size=cfg.engine.memory_guard_size)
        self.engine = wt.make_engine(self.opts)
        self.linker = wasmtime.Linker(self.engine)
        self.linker.allow_shadowing = True
        self.linker.define_wasi()
        # the same without the shadowed WASI calls that count open files (devices/files.py): for modules that
        # cannot open a file (no path_open), which then need no helper instance per VM
        self.plain_linker = wasmtime.Linker(self.engine)
        self.plain_linker.allow_shadowing = True
        self.plain_linker.define_wasi()
        self.devices = DeviceTable()  # define their imports on the linker, attach per VM
        total, reserve = files.plan(files.process_limit(), cfg.limits.total_open_files, cfg.limits.reserved_files)
        self.files = files.DescriptorBudget(total, reserve, cfg.limits.open_files)  # guests' files and sockets
        lim = cfg.limits
        self.compiler = Compiler(self.opts, self.engine, CompileLimits(
            jobs=lim.compile_jobs, queue=lim.compile_queue, timeout=lim.compile_timeout, memory=lim.compile_memory,
            max_functions=lim.max_functions))
        self.images = ImageStore(cfg.state_dir / "images", self.engine, self.linker, self.opts.fingerprint(),
                                 cfg.upload_limit, self.compiler, self.plain_linker)
        self.sched = Scheduler(self.engine, cfg.workers, cfg.engine.epoch_interval, cfg.engine.fuel_slice,
                               spin_wait=cfg.engine.spin_wait)
        self.registry = VmRegistry(DirRecords(cfg.state_dir / "vms"))
        self.vms = self.registry.vms  # (read-only use elsewhere: the registry adds and removes)
        self.builder = Builder(cfg, self.engine, self.linker, self.images)
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.fuel_total_finished = 0
        self.closing = False
        self._removals: set[asyncio.Task[None]] = set()  # auto-removals under way (close() waits for them)
        self.on_remove: list[Callable[[Vm], None]] = []
        self.loop_lag = LoopLagMonitor()
        wt.suspension_hook = self._suspension_hook

    @staticmethod
    def _suspension_hook(mem: wt.GuestMemory) -> list[int] | None:
        vm = wt.current_vm()
        m = vm.machine if vm is not None else None
        if m is None or m.asyncify is None or not (m.asyncify.rewinding or vm.snapshot_wanted):
            return None  # the common case, on every blocking device call: nothing to finish or start
        return m.at_suspension_point(mem, vm.snapshot_wanted)

    def add_device(self, device: Device) -> None:
        self.devices.add(device)
        device.define(self.linker)
        if not device.shadows_wasi:
            device.define(self.plain_linker)

    # ------------------------------------------------------------------ start-up and shutdown
    def load(self) -> None:
        """On an I/O thread at start-up: images, then VM records (a VM that was live is now stopped)."""
        self.images.load()
        self.registry.load(self._vm_from_record)

    def _vm_from_record(self, raw: Any, d: Path) -> Vm:
        rec = contract.convert(raw, contract.VmRecord)  # a record is checked like a request
        vm = Vm(rec.id, VmSpec.from_contract(rec.spec), rec.digest, rec.image_name, d, self.cfg.limits.log_bytes,
                self.cfg.limits.memory if rec.memory_limit is None else rec.memory_limit)
        vm.state = VmState(rec.state)
        vm.created, vm.started, vm.finished = rec.created, rec.started, rec.finished
        e = rec.exit
        vm.exit = None if e is None else ExitRecord(e.code, e.reason, e.fuel_consumed, e.peak_memory, e.wall_time_s)
        vm.fuel_consumed = rec.fuel_consumed
        vm.fuel_budget = rec.fuel_budget
        vm.peak_memory = rec.peak_memory
        vm.snapshot_kind = rec.snapshot_kind
        vm.restart_count, vm.user_stopped = rec.restart_count, rec.user_stopped
        vm.suspended_to, vm.checkpoint = rec.suspended_to, rec.checkpoint
        return vm

    async def shutdown(self) -> None:
        """Stop the guests, then close everything this object owns (for embedders such as the benchmarks; the
        daemon runs the same steps with its HTTP server and devices in between, see daemon.shutdown)."""
        await self.stop_guests()
        await self.close()
        self.compiler.close()
        self.sched.close()

    async def stop_guests(self, suspend: Callable[[builtins.list[Vm]], Awaitable[None]] | None = None) -> None:
        """From now on create() refuses (503 shutting_down); every live VM is stopped (reason stopped, not
        daemon_restart at the next start), which also answers the requests waiting for one. Restarts waiting
        for their back-off are dropped (the next daemon applies the policies again)."""
        self.closing = True
        for vm in self.vms.values():
            self._cancel_restart(vm)
        if suspend is not None:  # first, those whose policy keeps them running: snapshotted, then ended
            await suspend([vm for vm in self.vms.values()
                           if vm.state in (VmState.RUNNING, VmState.PAUSED) and vm.policy.keeps_running])
        live = [vm for vm in self.vms.values() if vm.state.live]
        await asyncio.gather(*(self._end(vm, Control.STOP) for vm in live), return_exceptions=True)

    async def close(self) -> None:
        """Once no request is in flight: ephemeral and auto-removed VMs that ended go, every record is
        written, the directories made in advance are removed and the persist thread ends. The pools stay
        (sched.close(), last of all)."""
        self.closing = True
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)
        for vm in [v for v in self.vms.values() if (v.spec.auto_remove or v.spec.ephemeral) and v.state.terminal]:
            await self.remove(vm, force=True)
        await self.registry.close()

    # ------------------------------------------------------------------ lookup
    def get(self, ref: str) -> Vm:
        return self.registry.get(ref)

    def list(self, all_: bool) -> list[Vm]:
        return self.registry.list(all_)

    # ------------------------------------------------------------------ images
    async def import_image(self, data: bytes, name: str | None, entry: str | None = None, *,
                           asyncify: bool = True, background: bool = False, durable: bool = True,
                           wait: bool = False) -> Image:
        """``asyncify``: rewrite a plain WASI module for snapshots (images/importer.py); ``background``: import
        it as it is at once and move the name to the rewrite when that is done; ``durable``: its files are on
        stable storage before it is answered; ``wait``: wait for a compile slot instead of 503 compile_busy."""
        async with self.compiler.slot(wait):  # 503 compile_busy when too many imports are under way
            # on the compile pool, not the I/O pool that snapshots, ps and logs use
            return await import_module(self.images, data, name, entry, on_io=self.compiler.on_pool,
                                       asyncify=asyncify, background=background, durable=durable)

    async def remove_image(self, ref: str, snapshots: Sequence[str] = ()) -> Image:
        """Remove an image (or only one of its names). ``snapshots``: the snapshots that need its bytes to be
        restored or exported (the snapshot controller knows them); like VMs, they keep the image."""
        img = self.images.resolve(ref)
        users = [v for v in self.vms.values() if v.digest == img.digest]
        only_untag = ref in self.images.names and len(img.names) > 1
        if users and not only_untag:
            raise Conflict(f"image {ref} is used by VM(s) {', '.join(v.name for v in users[:5])}; remove them first",
                           code="image_in_use")
        if snapshots and not only_untag:
            more = f" and {len(snapshots) - 5} more" if len(snapshots) > 5 else ""
            raise Conflict(f"image {ref} is needed by snapshot(s) {', '.join(snapshots[:5])}{more} to restore or "
                           f"export them; remove them first", code="image_in_use")
        return await self.sched.on_io(self.images.remove, ref)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ create
    def _validate(self, spec: VmSpec) -> int:
        lim = self.cfg.limits
        if spec.name is not None:
            if not contract.valid_vm_name(spec.name):
                raise BadRequest(f"invalid VM name {spec.name!r}: {contract.VM_NAME_RULE}", code="invalid_name")
            if self.registry.name_taken(spec.name):
                raise Conflict(f"a VM named {spec.name!r} already exists", code="name_in_use")
            other = self.registry.id_prefixed_by(spec.name)
            if other is not None:
                raise BadRequest(f"VM name {spec.name!r} reads as a prefix of VM {other.id[:12]}'s id; choose "
                                 f"another name", code="invalid_name")
        if spec.fuel is not None and (not isinstance(spec.fuel, int) or spec.fuel <= 0):
            raise BadRequest("fuel must be a positive integer", code="invalid_limit")
        if spec.timeout is not None and (not isinstance(spec.timeout, (int, float)) or spec.timeout <= 0):
            raise BadRequest("timeout must be a positive number of seconds", code="invalid_limit")
        memory = spec.memory if spec.memory is not None else lim.memory
        if not isinstance(memory, int) or memory < 65536:
            raise BadRequest("memory must be at least 64KiB", code="invalid_limit")
        if memory > lim.max_memory:
            raise BadRequest(f"memory {memory} is above the daemon's maximum of {lim.max_memory}",
                             code="invalid_limit")
        if spec.checkpoint_interval is not None and spec.ephemeral:
            raise BadRequest("an ephemeral VM keeps nothing on disk: it cannot have checkpoints",
                             code="invalid_checkpoint_interval")
        if spec.restart != "no" and (spec.ephemeral or spec.auto_remove):
            raise BadRequest("a VM removed when it ends (--rm) cannot have a restart policy",
                             code="invalid_restart_policy")
        if spec.ephemeral and any(d.mode == "cow" for d in spec.disks):
            raise BadRequest("an ephemeral VM keeps nothing on disk: it cannot have a cow disk (use ro, or a "
                             "VM that is not ephemeral)", code="invalid_disk")
        for d in spec.dirs:
            if not os.path.isabs(d.host) or not os.path.isdir(d.host):
                raise BadRequest(f"--dir {d.host}: not an existing absolute directory", code="invalid_dir")
            if not d.guest.startswith("/") and d.guest != ".":
                raise BadRequest(f"--dir guest path {d.guest!r} must be absolute", code="invalid_dir")
        for k in spec.env:
            if not k or "=" in k or "\0" in k:
                raise BadRequest(f"invalid environment variable name {k!r}", code="invalid_env")
        return memory

    async def create(self, spec: VmSpec, start: bool = False, durable: bool = True) -> Vm:
        """Create a VM from its image (the boot path), and with ``start`` start it. A started VM is built and
        runs its first slice in one task on a vCPU worker: a short guest finishes without another thread
        hand-off."""
        vm, img = self._admit(spec)
        if not start:
            await self._assemble(vm, lambda: self.sched.on_io(self.builder.boot, vm, img), durable=durable)
            return vm
        # The record is durable before the API says "created" (a crash then brings the VM back as stopped).
        # A VM started at once writes it after its first slice, and only if it is still alive then: a short
        # run (hello) then has no file system work competing with it for the GIL, and its final record is
        # written with the next batch.
        first, t_wall, t_mono = await self._assemble(vm, lambda: self._boot_and_run(vm, img), record=False)
        if vm.state.terminal:  # killed while it was being built
            self._release(vm)
            return vm
        vm.started = t_wall
        self._transition(vm, VmState.RUNNING, "start", since=t_mono)
        self._on_slice_end(vm, first)
        if not vm.state.terminal:  # it lives on: durable before the API answers
            await self.registry.save_now(vm, durable)
        return vm

    async def restore(self, spec: VmSpec, data: RestoreData) -> Vm:
        """Create a VM from a snapshot (the restore path): its memory, globals, tables, fuel and device
        states are the snapshot's. It is not started."""
        vm, img = self._admit(spec)
        await self._assemble(vm, lambda: self.sched.on_io(self.builder.restore, vm, img, data),
                             devices=data.devices)
        return vm

    def _admit(self, spec: VmSpec) -> tuple[Vm, Image]:
        """The VM a spec asks for, in the table (its name reserved), nothing built yet."""
        if self.closing:  # stop_guests() has run or is running: a VM made now would never be stopped
            raise ShuttingDown("microvmd is shutting down and creates no more VMs")
        img = self.images.resolve(spec.image)
        # limits: the VM's own, else the image manifest's, else the daemon's defaults
        if spec.fuel is None:
            spec.fuel = img.limits.get("fuel", self.cfg.limits.fuel)
        if spec.memory is None:
            spec.memory = img.limits.get("memory")
        if spec.timeout is None:
            spec.timeout = img.limits.get("timeout", self.cfg.limits.timeout)
        memory = self._validate(spec)
        if spec.checkpoint_interval is not None and not img.asyncify:
            raise BadRequest(f"image {spec.image} has no Asyncify support: its VMs cannot be snapshotted while "
                             f"they run, so they cannot have checkpoints (rebuild it with guest-sdk/mvcc)",
                             code="not_snapshottable")
        vm_id, d, premade = self.registry.new_id(spec.ephemeral)  # (ephemeral: nothing on disk)
        vm = Vm(vm_id, spec, img.digest, img.names[0] if img.names else img.digest, d,
                self.cfg.limits.log_bytes, memory)
        vm.console.premade = premade
        self.builder.console_mode(vm)
        vm.snapshot_kind = "asyncify" if img.asyncify else "stopped_only"
        self.registry.add(vm)
        return vm, img

    async def _assemble(self, vm: Vm, build: Callable[[], Awaitable[T]], *, record: bool = True,
                        devices: Mapping[str, object] | None = None, durable: bool = True) -> T:
        """Devices attached, the machine built by ``build`` (device states restored from ``devices``); with
        ``record``, the VM's record written meanwhile on the persist thread. On any failure the VM is gone
        again, its devices closed and its store freed."""
        pending = self.registry.save_soon(vm, durable) if record else None
        try:
            if any(d.mode == "cow" for d in vm.spec.disks):  # overlays live in the VM's directory
                await self.sched.on_io(partial(vm.dir.mkdir, parents=True, exist_ok=True))
            for dev in self.devices:
                await dev.attach(self, vm)
            result = await build()
            if devices is not None:
                try:
                    vm.devices.restore(devices)
                except DeviceStateError as exc:
                    raise Unprocessable(f"snapshot device state for {exc.part} is invalid: {exc.reason}",
                                        code="invalid_snapshot") from None
            if pending is not None:  # a 201 is durable: a VM whose record could not be written is undone
                written, pending = pending, None
                await self.registry.written(vm, written)
        except BaseException:
            self.registry.discard(vm)
            vm.devices.close()
            await self._teardown(vm)
            raise
        finally:
            if pending is not None:
                await pending
        self._save(vm)
        vm.log.info("created from image %s (%s)", vm.image_name, vm.digest[:19])
        return result

    async def _boot_and_run(self, vm: Vm, img: Image) -> tuple[SliceEnd | BaseException, float, float]:
        """Boot and the first slice on one vCPU worker; (how the slice ended, when it began: wall, monotonic).
        The VM leaves the CPU when the worker's job has really ended, even if the create is cancelled."""
        vm.enter_cpu()
        t_wall, t_mono = time.time(), time.monotonic()  # the first slice runs before the transition
        job = self.sched.submit_cpu(self.builder.boot_and_run, vm, img, self.sched.run_slice)
        try:
            first = await asyncio.shield(job)  # (a plain future: no task, no extra loop turn)
        except asyncio.CancelledError:
            # the create was cancelled (its client went away, or shutdown): the worker still runs the slice;
            # the machine is torn down only once it is back
            await asyncio.wait([job])
            raise
        finally:
            vm.leave_cpu()
        return first, t_wall, t_mono

    def console_fds(self) -> int:
        return self.builder.console_fds()

    async def _teardown(self, vm: Vm) -> None:
        """Free the VM's store (I/O thread), then delete its directory after any record write still queued."""
        m, vm.machine = vm.machine, None
        if m is not None:
            await self.sched.on_io(m.close)
        self.builder.free_console(vm)
        await self.registry.delete(vm)

    # ------------------------------------------------------------------ lifecycle
    def _transition(self, vm: Vm, target: VmState, action: str, since: float | None = None) -> None:
        """``since``: when the VM really began running (its first slice may run before the transition)."""
        check_transition(vm.id, vm.state, target, action)
        now = time.monotonic()
        if vm.state == VmState.RUNNING and vm.run_since is not None:
            vm.run_seconds += now - vm.run_since
            vm.run_since = None
        if target == VmState.RUNNING:
            vm.run_since = since if since is not None else now
        vm.log.debug("%s -> %s (%s)", vm.state.value, target.value, action)
        vm.state = target
        self._arm_timeout(vm)
        if target != VmState.RUNNING or action == "start":
            self._save(vm)
        vm.notify()

    def _arm_timeout(self, vm: Vm) -> None:
        """The wall-clock limit counts time in state running (blocked included, paused excluded)."""
        if vm.deadline_handle is not None:
            vm.deadline_handle.cancel()
            vm.deadline_handle = None
        if vm.spec.timeout is None or vm.state != VmState.RUNNING:
            return
        running = time.monotonic() - vm.run_since if vm.run_since is not None else 0.0
        left = vm.spec.timeout - vm.run_seconds - running
        vm.deadline_handle = asyncio.get_running_loop().call_later(max(0.0, left), self._on_timeout, vm)

    def _on_timeout(self, vm: Vm) -> None:
        vm.deadline_handle = None
        if vm.state == VmState.RUNNING:
            self._request(vm, Control.TIMEOUT)

    async def start(self, vm: Vm) -> Vm:
        """Start a created VM; an exited or stopped one runs again from its image with the same spec (as
        ``docker start``): its console keeps the earlier output, its policy's restart count starts again."""
        async with vm.lock:
            if vm.state.terminal:
                self._cancel_restart(vm)
                await self.rerun(vm, "start")
                vm.restart_count, vm.backoff_streak, vm.user_stopped = 0, 0, False
                await self.registry.save_now(vm)
                return vm
            if vm.machine is None:
                raise InvalidState(f"cannot start VM {vm.id}: it is {vm.state.value}")
            self._transition(vm, VmState.RUNNING, "start")
            vm.started = time.time()
            self._dispatch(vm)
        return vm

    async def rerun(self, vm: Vm, action: str, restore: RestoreData | None = None) -> None:
        """Under the VM's lock: a VM that ended gets a new machine from its image (or ``restore``, a snapshot
        of it) and runs again, in the same record, directory and console."""
        if self.closing:
            raise ShuttingDown("microvmd is shutting down and starts no more VMs")
        if vm.spec.ephemeral or vm.spec.auto_remove:
            raise InvalidState(f"cannot start VM {vm.id}: it is {vm.state.value} and removed when it ends")
        img = self.images.resolve(vm.digest)
        await vm.off_cpu()
        if vm.machine is not None:
            self._release(vm)
        if vm.machine_closed is not None:  # the old store and its console descriptors are gone first
            await asyncio.shield(vm.machine_closed)
        vm.devices = DeviceSet()
        vm.control, vm.waiting, vm.frozen, vm.snapshot_wanted = None, None, False, False
        vm.fuel_consumed, vm.fuel_budget, vm.run_seconds = 0, vm.spec.fuel, 0.0
        # the console appends to the earlier output (hook mode); file mode would truncate the logs
        try:
            for dev in self.devices:
                await dev.attach(self, vm)
            if restore is None:
                await self.sched.on_io(self.builder.boot, vm, img)
            else:
                await self.sched.on_io(self.builder.restore, vm, img, restore)
                try:
                    vm.devices.restore(restore.devices)
                except DeviceStateError as exc:
                    raise Unprocessable(f"snapshot device state for {exc.part} is invalid: {exc.reason}",
                                        code="invalid_snapshot") from None
        except BaseException:
            vm.devices.close()
            if vm.machine is not None:
                self._release(vm)
            raise
        check_transition(vm.id, vm.state, VmState.RUNNING, action)
        vm.log.info("%s -> running (%s, image %s)", vm.state.value, action, vm.image_name)
        vm.state = VmState.RUNNING
        vm.exit, vm.finished, vm.started = None, None, time.time()
        vm.suspended_to = None  # (a resume used it; any other run makes it stale)
        if restore is None:
            vm.checkpoint = None  # a run from the image: the last run's checkpoints are stale
        vm.run_since = time.monotonic()
        self._arm_timeout(vm)
        self._save(vm)
        vm.notify()
        if vm.waiting is None or vm.waiting.ready():
            self._dispatch(vm)

    # ------------------------------------------------------------------ restart policies
    def _cancel_restart(self, vm: Vm) -> None:
        if vm.restart_handle is not None:
            vm.restart_handle.cancel()
            vm.restart_handle = None

    def _maybe_restart(self, vm: Vm, code: int | None, why: ExitReason) -> None:
        """After ``_finish``: the VM's policy may want it running again, after its back-off."""
        if self.closing or why == ExitReason.MIGRATED or vm.spec.ephemeral or vm.spec.auto_remove:
            return
        failed = why != ExitReason.EXIT or (code or 0) != 0
        if not vm.policy.after_exit(failed, vm.user_stopped, vm.restart_count):
            return
        ran = vm.exit.wall_time_s if vm.exit is not None else 0.0
        if ran >= restart.RESET_AFTER:
            vm.backoff_streak = 0
        wait = restart.delay(vm.backoff_streak)
        vm.backoff_streak += 1
        vm.log.info("restarting in %.1f s (policy %s, restart %d)", wait, vm.policy, vm.restart_count + 1)
        loop = asyncio.get_running_loop()
        vm.restart_handle = loop.call_later(wait, lambda: loop.create_task(self._policy_restart(vm)))

    async def _policy_restart(self, vm: Vm) -> None:
        async with vm.lock:
            if vm.restart_handle is None or vm not in self.registry or not vm.state.terminal:
                return  # cancelled (start, stop, rm, shutdown) while it waited
            vm.restart_handle = None
            vm.restart_count += 1
            try:
                await self.rerun(vm, "restart")
            except MicrovmError as exc:
                vm.log.warning("restart by policy %s failed: %s", vm.policy, exc.message)
                self._save(vm)

    def restart_at_start(self, only: builtins.list[Vm] | None = None) -> builtins.list[Vm]:
        """At daemon start-up, once the API serves: the VMs whose policy wants them running again (docker's
        rules for a daemon restart, restart.RestartPolicy.at_daemon_start) are started, in the background."""
        chosen = []
        for vm in self.registry.list(True) if only is None else only:
            if not vm.state.terminal or vm.spec.ephemeral or vm.spec.auto_remove or vm.suspended_to:
                continue  # (a suspended VM is resumed from its snapshot by the snapshot controller)
            was_live = self.ended_by_crash(vm)
            if was_live and vm.checkpoint and only is None:
                continue  # (resumed from its last checkpoint by the snapshot controller, if its policy says so)
            if vm.policy.at_daemon_start(was_live, vm.user_stopped, vm.restart_count):
                chosen.append(vm)
        loop = asyncio.get_running_loop()
        for vm in chosen:
            vm.restart_handle = loop.call_later(0, lambda v=vm: loop.create_task(self._start_again(v)))  # type: ignore[misc]
        return chosen

    @staticmethod
    def ended_by_crash(vm: Vm) -> bool:
        """It was live when the previous daemon went away without a clean stop (kill -9, power loss)."""
        return vm.exit is not None and vm.exit.reason == ExitReason.DAEMON_RESTART.wire()

    async def _start_again(self, vm: Vm) -> None:
        async with vm.lock:
            if vm.restart_handle is None or vm not in self.registry or not vm.state.terminal:
                return
            vm.restart_handle = None
            try:
                await self.rerun(vm, "daemon start")
            except MicrovmError as exc:
                vm.log.warning("cannot start again at daemon start (policy %s): %s", vm.policy, exc.message)

    def _dispatch(self, vm: Vm) -> None:
        if vm.on_cpu or vm.machine is None or vm.frozen:
            return
        self.sched.dispatch(vm, self._on_slice_end)

    def _wake(self, vm: Vm) -> None:
        if vm.state == VmState.RUNNING and not vm.on_cpu and vm.control is None:
            self._dispatch(vm)

    def _on_slice_end(self, vm: Vm, end: SliceEnd | BaseException) -> None:
        vm.sync_from_machine()
        if vm.console.use_files:
            vm.console.ran()
        if vm.console.dirty:
            vm.console.enforce_cap()
        if vm.state.terminal:  # finished while this slice ran: the machine is ours to release now
            self._release(vm)
            return
        if isinstance(end, BaseException):
            vm.log.error("vCPU error: %r", end)
            self._finish(vm, None, ExitReason.TRAP, f"host error: {end}")
            return
        if end is SliceEnd.UNWOUND:
            vm.snapshot_wanted = False
            vm.frozen = True  # parked with its stack in memory until the snapshot is taken
            self._resolve_unwound(vm, None)
            if vm.control is not None:
                self._apply_control(vm)
        elif end is SliceEnd.DONE:
            self._finish_outcome(vm)
        elif vm.control is not None or end is SliceEnd.CONTROL:
            self._apply_control(vm)
        elif end is SliceEnd.YIELDED:
            if vm.state == VmState.RUNNING or vm.snapshot_wanted:  # (a paused VM runs only to a snapshot)
                self._dispatch(vm)
        elif end is SliceEnd.BLOCKED:
            op = vm.waiting
            if vm.snapshot_wanted and op is not None and not op.consumed and not op.ready() \
                    and vm.machine is not None:
                # a snapshot was asked for while the guest was entering this call (after the suspension
                # hook, before the op was published): unwind from it now, as snapshot() does for a parked VM
                op.interrupt(vm.machine.start_unwind)
            loop = asyncio.get_running_loop()
            if op is None or op.on_ready(loop_waker(loop, self._wake, vm)):
                if vm.state == VmState.RUNNING or vm.snapshot_wanted:
                    self._dispatch(vm)
            else:
                vm.notify()  # blocked_in changed
        elif end is SliceEnd.OUT_OF_FUEL:
            self._transition(vm, VmState.OUT_OF_FUEL, "fuel budget used")

    def _request(self, vm: Vm, what: Control) -> None:
        """Ask for pause/stop/kill/timeout; applied now if the VM is off-CPU, else at its next yield."""
        if vm.control is None or what > vm.control:
            vm.control = what
        if not vm.on_cpu:
            self._apply_control(vm)

    def _apply_control(self, vm: Vm) -> None:
        if vm.frozen:
            return  # being captured; thaw() applies it
        what, vm.control = vm.control, None
        if what is None or vm.state.terminal:
            return
        if what == Control.PAUSE:
            if vm.state == VmState.RUNNING:
                self._transition(vm, VmState.PAUSED, "pause")
        else:
            self._finish(vm, None, what.reason)

    def _finish_outcome(self, vm: Vm) -> None:
        m = vm.machine
        out = m.outcome if m is not None else None
        match out:
            case None:
                self._finish(vm, None, ExitReason.TRAP, "no outcome")
            case wt.Exited(code):
                self._finish(vm, code, ExitReason.EXIT)
            case wt.Trapped(message, code) if code in _TRAP_REASONS:
                self._finish(vm, None, _TRAP_REASONS[code])
            case wt.Trapped(message) | wt.Failed(message):
                self._finish(vm, None, ExitReason.TRAP, message)
            case wt.Returned():
                self._finish(vm, 0, ExitReason.EXIT)

    def _resolve_unwound(self, vm: Vm, exc: BaseException | None) -> None:
        waiters, vm.unwound_waiters = vm.unwound_waiters, []
        for f in waiters:
            if not f.done():
                f.set_exception(exc) if exc is not None else f.set_result(None)

    # ------------------------------------------------------------------ snapshot support
    async def quiesce(self, vm: Vm, timeout: float = 5.0) -> str:
        """Bring the VM to a state that memory + globals fully describe; it stays frozen until ``thaw``.

        Returns "created" (never ran), "unwound" (an Asyncify guest unwound at a suspension point).
        """
        if vm.state.terminal or vm.machine is None:
            raise InvalidState(f"cannot snapshot VM {vm.id}: it is {vm.state.value}")
        m = vm.machine
        if vm.state == VmState.CREATED:
            vm.frozen = True
            return "created"
        if m.asyncify is None:
            raise Conflict(f"VM {vm.id} is {vm.state.value} and its guest has no Asyncify support: it can only "
                           f"be snapshotted before it starts (rebuild it with guest-sdk/mvcc)",
                           code="not_snapshottable")
        if m.asyncify.unwound:
            vm.frozen = True
            return "unwound"
        # at a suspension point: in a device call whose answer the guest has not taken yet (it may be
        # ready already, e.g. a sleep that ended while the VM was paused; the guest repeats the call)
        blocked = vm.waiting is not None and not vm.waiting.consumed
        if vm.state == VmState.OUT_OF_FUEL and not blocked:
            raise Conflict(f"VM {vm.id} ran out of fuel in the middle of computing, not at a suspension point; "
                           f"add fuel (microvm fuel add) and snapshot it while it runs",
                           code="not_at_suspension_point")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        vm.unwound_waiters.append(fut)
        vm.snapshot_wanted = True
        if blocked:
            assert vm.waiting is not None
            vm.waiting.interrupt(m.start_unwind)
        if vm.state != VmState.RUNNING:
            # a paused VM runs on, unseen, to its next suspension point (at once if it is blocked in one),
            # unwinds there and stays paused; it is parked again if it does not get there in time
            self._dispatch(vm)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            vm.snapshot_wanted = False
            if fut in vm.unwound_waiters:
                vm.unwound_waiters.remove(fut)
            raise Conflict(f"VM {vm.id} did not reach a suspension point within {timeout:g} s "
                           f"(it is computing without calling sleep, yield or a blocking device call)",
                           code="no_suspension_point") from None
        if vm.state.terminal or vm.machine is None:
            raise InvalidState(f"VM {vm.id} ended while being snapshotted")
        return "unwound"

    def thaw(self, vm: Vm) -> None:
        """Let a quiesced VM run on: it rewinds into the call it was suspended in."""
        vm.frozen = False
        if vm.control is not None:
            self._apply_control(vm)
        if vm.state == VmState.RUNNING:
            self._dispatch(vm)

    def end_suspended(self, vm: Vm, snapshot: str) -> None:
        """Snapshotted at a clean daemon stop: it ends here (reason ``suspended``); the next daemon resumes it
        from ``snapshot`` in the same record."""
        vm.frozen = False
        vm.suspended_to = snapshot
        self._finish(vm, None, ExitReason.SUSPENDED)

    def end_migrated(self, vm: Vm) -> None:
        """The VM runs on another daemon now: it ends here (reason ``migrated``) without running again."""
        vm.frozen = False
        self._finish(vm, None, ExitReason.MIGRATED)

    def _finish(self, vm: Vm, code: int | None, why: ExitReason, detail: str | None = None) -> None:
        if vm.state.terminal:
            return
        reason = why.wire(detail)
        self._resolve_unwound(vm, InvalidState(f"VM {vm.id} ended ({reason})"))
        if vm.waiting is not None:
            vm.waiting.cancel()
            vm.waiting = None
        target = VmState.EXITED if why == ExitReason.EXIT else VmState.STOPPED
        if vm.run_since is not None:
            vm.run_seconds += time.monotonic() - vm.run_since
            vm.run_since = None
        vm.finished = time.time()
        vm.exit = ExitRecord(code, reason, vm.fuel_consumed, vm.peak_memory,
                             round(vm.finished - (vm.started or vm.finished), 6))
        self.fuel_total_finished += vm.fuel_consumed
        check_transition(vm.id, vm.state, target, reason)
        vm.log.info("%s -> %s (code=%s reason=%s fuel=%d)", vm.state.value, target.value, code, reason,
                    vm.fuel_consumed)
        vm.state = target
        self._arm_timeout(vm)
        self._save(vm)
        vm.notify()
        if not vm.on_cpu:
            self._release(vm)
        vm.devices.close()
        if (vm.spec.auto_remove or vm.spec.ephemeral) and not self.closing:
            task = asyncio.get_running_loop().create_task(self._auto_remove(vm))
            self._removals.add(task)
            task.add_done_callback(self._removals.discard)
        self._maybe_restart(vm, code, why)

    def _release(self, vm: Vm) -> None:
        """Free the store (and its linear memory) on an I/O thread."""
        machine, vm.machine = vm.machine, None
        if machine is not None:
            vm.machine_closed = asyncio.get_running_loop().run_in_executor(self.sched.io, self._close_machine,
                                                                           vm, machine)

    def _close_machine(self, vm: Vm, machine: Machine) -> None:
        """On an I/O thread: drop the store (closing the console files in file mode), check the log cap."""
        machine.close()
        if self.builder.free_console(vm):
            vm.console.enforce_cap()

    async def _auto_remove(self, vm: Vm) -> None:
        await asyncio.sleep(0)
        if vm in self.registry:
            await self.remove(vm, force=True)

    async def pause(self, vm: Vm) -> Vm:
        async with vm.lock:
            check_transition(vm.id, vm.state, VmState.PAUSED, "pause")
            self._request(vm, Control.PAUSE)
            await self._settle(vm, lambda: vm.state != VmState.RUNNING or vm.control is None)
        return vm

    async def resume(self, vm: Vm) -> Vm:
        async with vm.lock:
            if vm.state != VmState.PAUSED:
                raise InvalidState(f"cannot resume VM {vm.id}: it is {vm.state.value}")
            self._transition(vm, VmState.RUNNING, "resume")
            if vm.waiting is None or vm.waiting.ready():
                self._dispatch(vm)
        return vm

    async def stop(self, vm: Vm) -> Vm:
        return await self._user_end(vm, Control.STOP)

    async def kill(self, vm: Vm) -> Vm:
        return await self._user_end(vm, Control.KILL)

    async def _user_end(self, vm: Vm, how: Control) -> Vm:
        """A user's stop or kill: its policy does not restart it (a restart waiting for its back-off is
        dropped, and answered like a stop of a running VM)."""
        if vm.state.terminal and vm.restart_handle is not None:
            self._cancel_restart(vm)
            vm.user_stopped = True
            await self.registry.save_now(vm)
            return vm
        if vm.state.live:
            vm.user_stopped = True
        return await self._end(vm, how)

    async def _end(self, vm: Vm, how: Control) -> Vm:
        async with vm.lock:
            if vm.state.terminal:
                raise InvalidState(f"cannot {'stop' if how == Control.STOP else 'kill'} VM {vm.id}: "
                                   f"it is {vm.state.value}")
            if vm.state == VmState.CREATED:
                self._finish(vm, None, how.reason)
            else:
                self._request(vm, how)
                await self._settle(vm, lambda: vm.state.terminal)
                if vm.state.live:  # the slice did not come back in time: finish without it
                    self._finish(vm, None, how.reason)
        return vm

    async def _settle(self, vm: Vm, cond: Callable[[], bool], timeout: float = 5.0) -> None:
        end = time.monotonic() + timeout
        while not cond() and time.monotonic() < end:
            ev = vm.changed
            try:
                await asyncio.wait_for(ev.wait(), timeout=max(0.01, end - time.monotonic()))
            except TimeoutError:
                break

    async def add_fuel(self, vm: Vm, amount: int) -> Vm:
        if not isinstance(amount, int) or amount <= 0:
            raise BadRequest("fuel amount must be a positive integer", code="invalid_fuel")
        async with vm.lock:
            if vm.state.terminal:
                raise InvalidState(f"cannot add fuel to VM {vm.id}: it is {vm.state.value}")
            if vm.fuel_budget is None:
                raise InvalidState(f"VM {vm.id} has no fuel limit; there is nothing to add to",
                                   code="no_fuel_limit")
            vm.fuel_budget = max(vm.fuel_budget, vm.fuel_consumed) + amount
            if vm.state == VmState.OUT_OF_FUEL:
                self._transition(vm, VmState.RUNNING, "fuel added")
                self._dispatch(vm)
            else:
                self._save(vm)
        return vm

    async def wait(self, vm: Vm, timeout: float | None = None) -> dict[str, Any]:
        """Until the VM has exited or is parked out of fuel (the client reports both)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not (vm.state.terminal or vm.state == VmState.OUT_OF_FUEL):
            ev = vm.changed
            remaining = None if end is None else end - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise RequestTimeout(f"VM {vm.id} still {vm.state.value} after {timeout} s", code="wait_timeout")
            try:
                await asyncio.wait_for(ev.wait(), remaining)
            except TimeoutError:
                continue
        if vm.state == VmState.OUT_OF_FUEL:
            return {"code": None, "reason": ExitReason.OUT_OF_FUEL.wire(), "state": vm.state.value,
                    "fuel_consumed": vm.fuel_consumed, "peak_memory": vm.peak_memory, "wall_time_s": None}
        assert vm.exit is not None
        return {"state": vm.state.value, **vm.exit.__dict__}

    async def remove(self, vm: Vm, force: bool) -> None:
        if vm.state.live:
            # a VM that never started runs nothing and holds nothing but its store: like docker rm of a
            # created container, removing it needs no force
            if not force and vm.state != VmState.CREATED:
                raise Conflict(f"VM {vm.id} is {vm.state.value}; stop it first or use force",
                               code="vm_running")
            vm.user_stopped = True
            try:
                await self._end(vm, Control.KILL)
            except InvalidState:
                pass
        if vm not in self.registry:
            return  # removed already (an auto-removal and a user's rm -f can race here)
        self._cancel_restart(vm)
        self.registry.discard(vm)
        await vm.off_cpu()  # a slice still running ends within a quantum; only then is the store closed
        vm.devices.close()
        await self._teardown(vm)
        for hook in self.on_remove:
            hook(vm)
        vm.log.debug("removed")

    # ------------------------------------------------------------------ records and info
    def _save(self, vm: Vm) -> None:
        self.registry.save(vm)

    def counts(self) -> dict[str, int]:
        return self.registry.counts()

    def fuel_total(self) -> int:
        return self.fuel_total_finished + sum(v.fuel_consumed for v in self.vms.values() if v.state.live)
