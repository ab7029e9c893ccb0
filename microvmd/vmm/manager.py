"""The hypervisor: the lifecycle of every VM, and the image actions. It never sees HTTP.

Its parts: the registry (``registry.py``: the table of VMs and their records), the builder (``builder.py``:
boot and restore paths), the scheduler (``scheduler.py``: vCPU workers and I/O threads). State changes happen
on the event loop, each VM's in its ``VmRuntime`` (``vm.rt``, runtime.py) through ``rt.apply``, called from here
(``_transition``, ``_finish``, ``_request``/``_apply_control``, quiesce/thaw); guest code runs on vCPU workers,
which only report the end of a slice (``_on_slice_end``), and blocking work (instantiation, file I/O) on I/O
workers.
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
from typing import Any, TypeVar, Unpack

import wasmtime

from .. import contract
from ..config import Config
from ..devices import files
from ..devices.base import Device, DeviceSet, DeviceStateError, DeviceTable
from ..engine import wt
from ..engine.hostop import loop_waker
from ..errors import BadRequest, Conflict, InvalidState, MicrovmError, RequestTimeout, ShuttingDown, Unprocessable
from ..heaptrim import HeapTrimmer
from ..images.compiler import CompileLimits, Compiler
from ..images.importer import analyse_tables_later, import_module
from ..images.store import Image, ImageStore
from ..looplag import LoopLagMonitor
from . import restart
from .builder import Builder, RestoreData
from .machine import Machine, SliceEnd
from .registry import DirRecords, VmRegistry
from .runtime import Changes, ExitRecord, VmRuntime
from .scheduler import Scheduler
from .state import Control, ExitReason, VmState, check_transition
from .vm import Vm, VmSpec

log = logging.getLogger("microvmd.vmm")
T = TypeVar("T")

def _vm_log(vm_id: str) -> logging.LoggerAdapter[logging.Logger]:
    return logging.LoggerAdapter(logging.getLogger("microvmd.vm"), {"vm": vm_id[:12]})


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
        self.console_holds = 0  # VMs held for their console output rate (limits.log_rate), and for how long
        self.console_held_s = 0.0
        self.closing = False
        self._removals: set[asyncio.Task[None]] = set()  # auto-removals under way (close() waits for them)
        self.on_remove: list[Callable[[Vm], None]] = []
        self.loop_lag = LoopLagMonitor()
        self.heap_trim = HeapTrimmer()  # freed machines' memory back to the system (started by the daemon)
        wt.suspension_hook = self._suspension_hook

    @staticmethod
    def _suspension_hook(mem: wt.GuestMemory) -> list[int] | None:
        vm = wt.current_vm()
        m = vm.machine if vm is not None else None
        if m is None or m.asyncify is None or not (m.asyncify.rewinding or vm.rt.snapshot_wanted):
            return None  # the common case, on every blocking device call: nothing to finish or start
        return m.at_suspension_point(mem, vm.rt.snapshot_wanted)

    def add_device(self, device: Device) -> None:
        self.devices.add(device)
        device.define(self.linker)
        if not device.shadows_wasi:
            device.define(self.plain_linker)

    # ------------------------------------------------------------------ start-up and shutdown
    async def load(self) -> None:
        """At start-up: images and VM records are read on an I/O thread; then, on the loop, every VM joins the
        table and one that was live when the previous daemon died is stopped (reason daemon_restart: its
        native state died with that daemon), its record rewritten before the API serves."""
        vms = await self.sched.on_io(self._read)
        lost = []
        now = time.time()
        for vm in vms:
            self.registry.add(vm)
            if vm.state.live:
                vm.paused_at_crash = vm.state == VmState.PAUSED
                vm.rt.apply(ExitReason.DAEMON_RESTART.value, state=VmState.STOPPED, finished=now,
                            exit=ExitRecord(None, ExitReason.DAEMON_RESTART.wire(), vm.fuel_consumed,
                                            vm.peak_memory, 0.0 if vm.started is None else now - vm.started))
                lost.append(vm)
        if lost:
            await self.registry.save_all_now(lost)
        log.info("loaded %d VM records", len(vms))

    def _read(self) -> builtins.list[Vm]:
        self.images.load()
        return self.registry.read(self._vm_from_record)

    def _log_rate(self, spec: VmSpec) -> tuple[int, int]:
        """A VM's console output rate (limits.log_rate); none for a function's instances, whose standard output
        is their response (bounded by log_bytes), not a log."""
        return (0, 0) if spec.owner else self.cfg.limits.log_rate_budget()

    def _vm_from_record(self, raw: Any, d: Path) -> Vm:
        """On an I/O thread: a VM as its record left it (not in the table yet)."""
        rec = contract.convert(raw, contract.VmRecord)  # a record is checked like a request
        e = rec.exit
        spec = VmSpec.from_contract(rec.spec)
        vm = Vm(rec.id, spec, rec.digest, rec.image_name, d, self.cfg.limits.log_bytes,
                self.cfg.limits.memory if rec.memory_limit is None else rec.memory_limit,
                log_rate=self._log_rate(spec),
                recorded=VmRuntime(rec.id, _vm_log(rec.id), VmState(rec.state),
                                   None if e is None else ExitRecord(e.code, e.reason, e.fuel_consumed,
                                                                     e.peak_memory, e.wall_time_s),
                                   rec.started, rec.finished))
        vm.created = rec.created
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
    def analyse_images_later(self) -> None:
        """On the loop after ``load``: image facts an older daemon did not record, worked out in the background."""
        analyse_tables_later(self.images, self.sched.on_io)

    async def import_image(self, data: bytes, name: str | None, entry: str | None = None, *,
                           asyncify: bool = True, background: bool = False, durable: bool = True,
                           wait: bool = False, client: str | None = None) -> Image:
        """``asyncify``: rewrite a plain WASI module for snapshots (images/importer.py); ``background``: import
        it as it is at once and move the name to the rewrite when that is done; ``durable``: its files are on
        stable storage before it is answered; ``wait``: wait for a compile slot instead of 503 compile_busy;
        ``client``: who asked (one client holds at most its share of the compile pool)."""
        async with self.compiler.slot(wait, client):  # 503 compile_busy when too many imports are under way
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
        """What only this daemon can check of a spec the contract accepted (contract.check_vm_spec: every
        request, record and snapshot spec passes there): names in use, the memory limit against its
        configuration, host directories. Returns the VM's memory limit."""
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
        memory = spec.memory if spec.memory is not None else lim.memory
        if not isinstance(memory, int) or memory < 65536:
            raise BadRequest("memory must be at least 64KiB", code="invalid_limit")
        if memory > lim.max_memory:
            raise BadRequest(f"memory {memory} is above the daemon's maximum of {lim.max_memory}",
                             code="invalid_limit")
        for d in spec.dirs:  # (the spec's own rules, and the guest path's, are the contract's: check_vm_spec)
            if not os.path.isabs(d.host) or not os.path.isdir(d.host):
                raise BadRequest(f"--dir {d.host}: not an existing absolute directory", code="invalid_dir")
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
        self._transition(vm, VmState.RUNNING, "start", since=t_mono, started=t_wall)
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
                self.cfg.limits.log_bytes, memory, log_rate=self._log_rate(spec))
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
            result = await _outlived(build())
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
        vm.rt.enter_cpu()
        t_wall, t_mono = time.time(), time.monotonic()  # the first slice runs before the transition
        job, ended = self.sched.submit_cpu(self.builder.boot_and_run, vm, img, self.sched.run_slice)
        try:
            first = await job  # (a plain future: no task, no shield, no extra loop turn)
        except asyncio.CancelledError:
            # the create was cancelled (its client went away, or shutdown): the worker still runs the slice;
            # the machine is torn down only once it is back
            await asyncio.wait([ended])
            raise
        finally:
            vm.rt.leave_cpu()
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
    def _transition(self, vm: Vm, target: VmState, action: str, since: float | None = None,
                    **more: Unpack[Changes]) -> None:
        """A live VM's change of state (``_finish`` ends one, ``rerun`` runs an ended one again), with the
        wall-clock limit's accounting and timer; ``more``: other fields changed with it. ``since``: when the VM
        really began running (its first slice may run before the transition)."""
        rt = vm.rt
        now = time.monotonic()
        run_seconds, run_since = rt.run_seconds, rt.run_since
        if rt.state == VmState.RUNNING and run_since is not None:
            run_seconds += now - run_since
            run_since = None
        if target == VmState.RUNNING:
            run_since = since if since is not None else now
        changes: Changes = {"state": target, "run_seconds": run_seconds, "run_since": run_since,
                            "deadline": self._deadline(vm, target, run_seconds, run_since)}
        changes.update(more)
        rt.apply(action, **changes)
        if target != VmState.RUNNING or action == "start":
            self._save(vm)

    def _deadline(self, vm: Vm, state: VmState, run_seconds: float,
                  run_since: float | None) -> asyncio.TimerHandle | None:
        """The wall-clock limit's timer for a VM entering ``state`` (the old one cancelled): it counts time in
        state running (blocked included, paused excluded)."""
        old = vm.rt.deadline
        if old is not None:
            old.cancel()
        if vm.spec.timeout is None or state != VmState.RUNNING:
            return None
        running = time.monotonic() - run_since if run_since is not None else 0.0
        left = vm.spec.timeout - run_seconds - running
        return asyncio.get_running_loop().call_later(max(0.0, left), self._on_timeout, vm)

    def _on_timeout(self, vm: Vm) -> None:
        vm.rt.apply("timer", deadline=None)
        if vm.state == VmState.RUNNING:
            self._request(vm, Control.TIMEOUT)

    async def start(self, vm: Vm) -> Vm:
        """Start a created VM; an exited or stopped one runs again from its image with the same spec (as
        ``docker start``): its console keeps the earlier output, its policy's restart count starts again."""
        async with vm.lock:
            if vm.state.terminal:
                self._cancel_restart(vm)
                await self.rerun(vm, "start")
                vm.restart_count, vm.user_stopped = 0, False
                vm.rt.apply("start", backoff_streak=0)
                await self.registry.save_now(vm)
                return vm
            if vm.machine is None:
                raise InvalidState(f"cannot start VM {vm.id}: it is {vm.state.value}")
            self._transition(vm, VmState.RUNNING, "start", started=time.time())
            self._dispatch(vm)
        return vm

    async def rerun(self, vm: Vm, action: str, restore: RestoreData | None = None, paused: bool = False) -> None:
        """Under the VM's lock: a VM that ended gets a new machine from its image (or ``restore``, a snapshot
        of it) and runs again, in the same record, directory and console. ``paused``: it comes back paused
        (a VM suspended while paused), ready to run at the user's ``resume``."""
        if self.closing:
            raise ShuttingDown("microvmd is shutting down and starts no more VMs")
        if vm.spec.ephemeral or vm.spec.auto_remove:
            raise InvalidState(f"cannot start VM {vm.id}: it is {vm.state.value} and removed when it ends")
        img = self.images.resolve(vm.digest)
        await vm.rt.off_cpu()
        if vm.machine is not None:
            self._release(vm)
        if vm.rt.machine_closed is not None:  # the old store and its console descriptors are gone first
            await asyncio.shield(vm.rt.machine_closed)
        vm.devices = DeviceSet()
        vm.rt.apply(action, control=None, waiting=None, frozen=False, snapshot_wanted=False, run_seconds=0.0)
        vm.fuel_consumed, vm.fuel_budget = 0, vm.spec.fuel
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
        vm.suspended_to = None  # (a resume used it; any other run makes it stale)
        if restore is None:
            vm.checkpoint = None  # a run from the image: the last run's checkpoints are stale
        self._transition(vm, VmState.RUNNING, action, exit=None, finished=None, started=time.time())
        self._save(vm)
        if paused:  # (resume() dispatches it)
            self._transition(vm, VmState.PAUSED, action + ", paused as it was")
            return
        self._dispatch(vm)

    # ------------------------------------------------------------------ restart policies
    def _cancel_restart(self, vm: Vm) -> None:
        if vm.rt.restart is not None:
            vm.rt.restart.cancel()
            vm.rt.apply("restart cancelled", restart=None)

    def _maybe_restart(self, vm: Vm, code: int | None, why: ExitReason) -> None:
        """After ``_finish``: the VM's policy may want it running again, after its back-off."""
        if self.closing or why == ExitReason.MIGRATED or vm.spec.ephemeral or vm.spec.auto_remove:
            return
        failed = why != ExitReason.EXIT or (code or 0) != 0
        if not vm.policy.after_exit(failed, vm.user_stopped, vm.restart_count):
            return
        ran = vm.exit.wall_time_s if vm.exit is not None else 0.0
        streak = 0 if ran >= restart.RESET_AFTER else vm.rt.backoff_streak
        wait = restart.delay(streak)
        vm.log.info("restarting in %.1f s (policy %s, restart %d)", wait, vm.policy, vm.restart_count + 1)
        loop = asyncio.get_running_loop()
        vm.rt.apply("restart policy", backoff_streak=streak + 1,
                    restart=loop.call_later(wait, lambda: loop.create_task(self._policy_restart(vm))))

    async def _policy_restart(self, vm: Vm) -> None:
        async with vm.lock:
            if vm.rt.restart is None or vm not in self.registry or not vm.state.terminal:
                return  # cancelled (start, stop, rm, shutdown) while it waited
            vm.rt.apply("restart", restart=None)
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
            vm.rt.apply("daemon start", restart=loop.call_later(
                0, lambda v=vm: loop.create_task(self._start_again(v))))  # type: ignore[misc]
        return chosen

    @staticmethod
    def ended_by_crash(vm: Vm) -> bool:
        """It was live when the previous daemon went away without a clean stop (kill -9, power loss)."""
        return vm.exit is not None and vm.exit.reason == ExitReason.DAEMON_RESTART.wire()

    async def _start_again(self, vm: Vm) -> None:
        async with vm.lock:
            if vm.rt.restart is None or vm not in self.registry or not vm.state.terminal:
                return
            vm.rt.apply("daemon start", restart=None)
            try:
                await self.rerun(vm, "daemon start")
            except MicrovmError as exc:
                vm.log.warning("cannot start again at daemon start (policy %s): %s", vm.policy, exc.message)

    def _dispatch(self, vm: Vm) -> None:
        rt = vm.rt
        if rt.on_cpu or vm.machine is None or rt.frozen or rt.waiting is not None and not rt.waiting.ready():
            return  # (blocked: the op's waker dispatches it when the op is ready)
        if rt.log_hold is not None and not rt.snapshot_wanted:
            return  # held for its console output rate: the hold's timer wakes it
        self.sched.dispatch(vm, self._on_slice_end)

    def _hold_for_output(self, vm: Vm, seconds: float) -> None:
        """Over its console output rate (limits.log_rate): off its vCPU for ``seconds``, then woken."""
        def release() -> None:
            vm.rt.apply("log rate", log_hold=None)
            self._wake(vm)
        old = vm.rt.log_hold
        if old is not None:
            old.cancel()
        self.console_holds += 1
        self.console_held_s += seconds
        vm.rt.apply("log rate", log_hold=asyncio.get_running_loop().call_later(seconds, release))

    def _wake(self, vm: Vm) -> None:
        rt = vm.rt
        if rt.state == VmState.RUNNING and not rt.on_cpu and rt.control is None:
            self._dispatch(vm)

    def _on_slice_end(self, vm: Vm, end: SliceEnd | BaseException) -> None:
        rt = vm.rt
        m = vm.machine
        vm.sync_from_machine()
        con = vm.console
        if con.use_files:
            con.ran()
        if con.dirty:
            con.enforce_cap(self.sched.io)  # (stats here; a trim of a big log on an I/O thread)
            if con.rate is not None and not vm.state.terminal:
                hold = con.rate.hold_for(con.written)
                if hold > 0:
                    self._hold_for_output(vm, hold)
        if vm.state.terminal:  # finished while this slice ran: the machine is ours to release now
            self._release(vm)
            return
        if m is not None and m.blocked_on is not rt.waiting:  # the machine's mailbox, read now it is off-CPU
            rt.apply("blocked", waiting=m.blocked_on)
        if isinstance(end, BaseException):
            vm.log.error("vCPU error: %r", end)
            self._finish(vm, None, ExitReason.TRAP, f"host error: {end}")
            return
        if end is SliceEnd.UNWOUND:
            # parked with its stack in memory until the snapshot is taken
            self._resolve_unwound(vm, None, snapshot_wanted=False, frozen=True)
            if rt.control is not None:
                self._apply_control(vm)
        elif end is SliceEnd.DONE:
            self._finish_outcome(vm)
        elif rt.control is not None or end is SliceEnd.CONTROL:
            self._apply_control(vm)
        elif end is SliceEnd.YIELDED:
            if rt.state == VmState.RUNNING or rt.snapshot_wanted:  # (a paused VM runs only to a snapshot)
                self._dispatch(vm)
        elif end is SliceEnd.BLOCKED:
            op = rt.waiting
            if rt.snapshot_wanted and op is not None and not op.consumed and not op.ready() and m is not None:
                # a snapshot was asked for while the guest was entering this call (after the suspension
                # hook, before quiesce could see the op): unwind from it now, as quiesce does for a parked VM
                op.interrupt(m.start_unwind)
            loop = asyncio.get_running_loop()
            if op is None or op.on_ready(loop_waker(loop, self._wake, vm)):
                if rt.state == VmState.RUNNING or rt.snapshot_wanted:
                    self._dispatch(vm)
        elif end is SliceEnd.OUT_OF_FUEL:
            self._transition(vm, VmState.OUT_OF_FUEL, "fuel budget used")

    def _request(self, vm: Vm, what: Control) -> None:
        """Ask for pause/stop/kill/timeout; applied now if the VM is off-CPU, else at its next yield."""
        rt = vm.rt
        if rt.control is None or what > rt.control:
            rt.apply(what.name.lower(), control=what)
        if not rt.on_cpu:
            self._apply_control(vm)

    def _apply_control(self, vm: Vm) -> None:
        rt = vm.rt
        if rt.frozen:
            return  # being captured; thaw() applies it
        what = rt.control
        if what is not None:
            rt.apply("control applied", control=None)
        if what is None or rt.state.terminal:
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

    def _resolve_unwound(self, vm: Vm, exc: BaseException | None, **more: Unpack[Changes]) -> None:
        """Answer the quiesce() calls waiting for the unwind; ``more``: fields changed with it."""
        waiters = vm.rt.unwound_waiters
        changes: Changes = {"unwound_waiters": ()}
        changes.update(more)
        vm.rt.apply("unwound" if exc is None else "unwind failed", **changes)
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
        m, rt = vm.machine, vm.rt
        if vm.state == VmState.CREATED:
            rt.apply("quiesce", frozen=True)
            return "created"
        if m.asyncify is None:
            raise Conflict(f"VM {vm.id} is {vm.state.value} and its guest has no Asyncify support: it can only "
                           f"be snapshotted before it starts (rebuild it with guest-sdk/mvcc)",
                           code="not_snapshottable")
        if m.asyncify.unwound:
            rt.apply("quiesce", frozen=True)
            return "unwound"
        # at a suspension point: in a device call whose answer the guest has not taken yet (it may be
        # ready already, e.g. a sleep that ended while the VM was paused; the guest repeats the call). The
        # machine's own mailbox, not rt.waiting: a guest on a CPU may have entered the call since its last
        # slice ended (the op's lock makes interrupting it safe); one entering it only now is unwound at
        # the end of its slice (_on_slice_end)
        op = m.blocked_on
        blocked = op is not None and not op.consumed
        if vm.state == VmState.OUT_OF_FUEL and not blocked:
            raise Conflict(f"VM {vm.id} ran out of fuel in the middle of computing, not at a suspension point; "
                           f"add fuel (microvm fuel add) and snapshot it while it runs",
                           code="not_at_suspension_point")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        rt.apply("quiesce", unwound_waiters=(*rt.unwound_waiters, fut), snapshot_wanted=True)
        if blocked:
            assert op is not None
            op.interrupt(m.start_unwind)
        if vm.state != VmState.RUNNING or rt.log_hold is not None:
            # a paused VM (or one held for its output rate) runs on, unseen, to its next suspension point (at
            # once if it is blocked in one), unwinds there and stays paused; it is parked again if it does not
            # get there in time
            self._dispatch(vm)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            rt.apply("quiesce timed out", snapshot_wanted=False,
                     unwound_waiters=tuple(f for f in rt.unwound_waiters if f is not fut))
            raise Conflict(f"VM {vm.id} did not reach a suspension point within {timeout:g} s "
                           f"(it is computing without calling sleep, yield or a blocking device call)",
                           code="no_suspension_point") from None
        if vm.state.terminal or vm.machine is None:
            raise InvalidState(f"VM {vm.id} ended while being snapshotted")
        return "unwound"

    def thaw(self, vm: Vm) -> None:
        """Let a quiesced VM run on: it rewinds into the call it was suspended in."""
        vm.rt.apply("thaw", frozen=False)
        if vm.rt.control is not None:
            self._apply_control(vm)
        if vm.state == VmState.RUNNING:
            self._dispatch(vm)

    def end_suspended(self, vm: Vm, snapshot: str) -> None:
        """Snapshotted at a clean daemon stop: it ends here (reason ``suspended``); the next daemon resumes it
        from ``snapshot`` in the same record."""
        vm.rt.apply("suspended", frozen=False)
        vm.suspended_to = snapshot
        self._finish(vm, None, ExitReason.SUSPENDED)

    def end_migrated(self, vm: Vm) -> None:
        """The VM runs on another daemon now: it ends here (reason ``migrated``) without running again."""
        vm.rt.apply("migrated", frozen=False)
        self._finish(vm, None, ExitReason.MIGRATED)

    def _finish(self, vm: Vm, code: int | None, why: ExitReason, detail: str | None = None) -> None:
        if vm.state.terminal:
            return
        reason = why.wire(detail)
        rt = vm.rt
        if rt.unwound_waiters:
            self._resolve_unwound(vm, InvalidState(f"VM {vm.id} ended ({reason})"))
        if rt.waiting is not None:
            rt.waiting.cancel()
        if rt.log_hold is not None:
            rt.log_hold.cancel()
            rt.apply("end", log_hold=None)
        target = VmState.EXITED if why == ExitReason.EXIT else VmState.STOPPED
        finished = time.time()
        check_transition(vm.id, rt.state, target, reason)
        vm.log.info("%s -> %s (code=%s reason=%s fuel=%d)", rt.state.value, target.value, code, reason,
                    vm.fuel_consumed)
        self.fuel_total_finished += vm.fuel_consumed
        self._transition(vm, target, reason, waiting=None, finished=finished, exit=ExitRecord(
            code, reason, vm.fuel_consumed, vm.peak_memory, round(finished - (rt.started or finished), 6)))
        if not rt.on_cpu:
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
            self.heap_trim.note_freed()
            vm.rt.apply("release", machine_closed=asyncio.get_running_loop().run_in_executor(
                self.sched.io, self._close_machine, vm, machine))

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
            await self._settle(vm, lambda: vm.state != VmState.RUNNING or vm.rt.control is None)
            if vm.state == VmState.PAUSED:
                await self.registry.save_now(vm)  # acknowledged, so a crash from now on brings it back paused
        return vm

    async def resume(self, vm: Vm) -> Vm:
        async with vm.lock:
            if vm.state != VmState.PAUSED:
                raise InvalidState(f"cannot resume VM {vm.id}: it is {vm.state.value}")
            self._transition(vm, VmState.RUNNING, "resume")
            self._dispatch(vm)  # (unless it is blocked in a call: then when that is ready)
            await self.registry.save_now(vm)  # (as for pause: what was acknowledged survives a crash)
        return vm

    async def stop(self, vm: Vm) -> Vm:
        return await self._user_end(vm, Control.STOP)

    async def kill(self, vm: Vm) -> Vm:
        return await self._user_end(vm, Control.KILL)

    async def _user_end(self, vm: Vm, how: Control) -> Vm:
        """A user's stop or kill: its policy does not restart it (a restart waiting for its back-off is
        dropped, and answered like a stop of a running VM)."""
        if vm.state.terminal and vm.rt.restart is not None:
            self._cancel_restart(vm)
            vm.user_stopped = True
            await self.registry.save_now(vm)
            return vm
        if vm.state.live:
            vm.user_stopped = True
        await self._end(vm, how)
        # answered once the record says so: a daemon killed right after must not restart it by its policy
        # (unless-stopped) as a VM that was running when the daemon died
        if vm in self.registry and not vm.spec.auto_remove:  # (one being removed keeps no record)
            await self.registry.save_now(vm)
        return vm

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
            ev = vm.rt.changed
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
            ev = vm.rt.changed
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
        await vm.rt.off_cpu()  # a slice still running ends within a quantum; only then is the store closed
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


async def _outlived(work: Awaitable[T]) -> T:
    """Await ``work`` (a machine being built or restored on a worker thread); if the caller is cancelled
    meanwhile, wait until the thread is done before the cancellation goes on. The caller's clean-up frees
    the VM's store: freed under a restore that is still writing its memory, it crashed the daemon (a
    function removed while a spare instance was restored: SIGSEGV in Machine.restore)."""
    fut = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            try:
                await asyncio.wait([fut])
            except asyncio.CancelledError:
                continue  # cancelled again: the thread still has to finish first
        if not fut.cancelled():
            fut.exception()  # (retrieved: the cancellation is what the caller sees)
        raise
