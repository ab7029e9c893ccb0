"""The controller: every VM and image action goes through here. It never sees HTTP.

All state changes happen on the event loop, under the VM's lock, through ``_transition``; guest code runs
on vCPU workers (see scheduler.py) and blocking work (instantiation, file I/O) on I/O workers.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import wasmtime

from ..config import Config
from ..devices.console import Console
from ..engine import wt
from ..engine.hostop import loop_waker
from ..errors import BadRequest, Conflict, InvalidState, NotFound, RequestTimeout, Unprocessable
from ..images.importer import import_module
from ..images.store import Image, ImageStore
from ..looplag import LoopLagMonitor
from .machine import Machine, MachineSpec, SliceEnd
from .scheduler import Scheduler
from .state import Control, ExitReason, VmState, check_transition
from .vm import ExitRecord, Vm, VmSpec

log = logging.getLogger("microvmd.vmm")

ABI_VERSION = 1


READY_DIRS = 8  # VM directories kept made in advance (with their empty console logs)


def _make_ready_dirs(parent: Path, n: int) -> list[str]:
    """On the persist thread: ``n`` VM directories, each with its two empty console logs, named by the ids
    the next VMs will get. Making one costs up to a millisecond on ext4 (bench/bench_console.py), off the
    path of the create that uses it."""
    ids = []
    for _ in range(n):
        vm_id = uuid.uuid4().hex
        d = parent / vm_id
        try:
            d.mkdir()
            for stream in ("stdout", "stderr"):
                os.close(os.open(d / f"{stream}.log", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640))
        except OSError as exc:
            log.warning("cannot prepare a VM directory: %s", exc)
            shutil.rmtree(d, ignore_errors=True)
            break
        ids.append(vm_id)
    return ids


def _is_ready_dir(d: Path) -> bool:
    """A directory made in advance and never used: nothing in it but empty console logs."""
    try:
        return all(f.name in ("stdout.log", "stderr.log") and f.stat().st_size == 0 for f in d.iterdir())
    except OSError:
        return False


def _write_records(batch: list[tuple[Path, dict[str, Any]]]) -> None:
    for d, rec in batch:
        tmp = d / "vm.json.tmp"
        try:
            d.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(rec))
            os.replace(tmp, d / "vm.json")
        except OSError as exc:
            log.error("vm=%s cannot save its record: %s", rec.get("id", "?")[:12], exc)



@dataclass
class RestoreData:
    memory_size: int
    load: Callable[[int, int], None]            # fills guest memory at (address, size)
    zero_chunks: Callable[[int], list[int]]     # chunks the snapshot has as zeros below an offset
    globals: dict[str, tuple[str, int | float]]
    unwound: bool
    fuel_consumed: int
    fuel_budget: int | None
    devices: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)  # only the tables the guest changed


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
        self.device_hooks: list[Any] = []  # device modules: define imports, attach per VM
        self.images = ImageStore(cfg.state_dir / "images", self.engine, self.linker, self.opts.fingerprint(),
                                 cfg.upload_limit)
        self.sched = Scheduler(self.engine, cfg.workers, cfg.engine.epoch_interval, cfg.engine.fuel_slice,
                               spin_wait=cfg.engine.spin_wait)
        # VM records are written off the event loop, coalesced, in order (one thread: a record is never
        # overwritten by an older one, and a removed VM's directory is deleted after its last write)
        self._persist = ThreadPoolExecutor(1, thread_name_prefix="persist")
        self._ready: list[str] = []  # ids whose directories exist already (see _make_ready_dirs)
        # file-mode consoles hold two descriptors per live VM: "auto" keeps them within half the limit
        self._console_fds = 0
        self._console_lock = threading.Lock()
        self._refilling = False
        self._dirty: dict[str, Vm] = {}
        self._flush_handle: asyncio.Handle | None = None
        self.vms: dict[str, Vm] = {}
        self.vm_dir = cfg.state_dir / "vms"
        self.vm_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self.fuel_total_finished = 0
        self.closing = False
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

    def add_device(self, device: Any) -> None:
        device.define(self.linker)
        self.device_hooks.append(device)

    # ------------------------------------------------------------------ start-up and shutdown
    def load(self) -> None:
        """On an I/O thread at start-up: images, then VM records (a VM that was live is now stopped)."""
        self.images.load()
        rewritten = []
        for d in sorted(self.vm_dir.iterdir()):
            if not (d / "vm.json").exists():
                # made in advance and never used, or created moments before a crash with its record never
                # written: nothing can be restored
                if not _is_ready_dir(d):
                    log.info("removing %s: a VM directory without a record", d.name)
                shutil.rmtree(d, ignore_errors=True)
                continue
            try:
                rec = json.loads((d / "vm.json").read_text())
                vm = self._vm_from_record(rec, d)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("skipping damaged VM record %s: %s", d.name, exc)
                continue
            if vm.state.live:
                # its native state died with the previous daemon
                vm.state = VmState.STOPPED
                vm.exit = ExitRecord(None, ExitReason.DAEMON_RESTART.wire(), vm.fuel_consumed, vm.peak_memory,
                                     0.0 if vm.started is None else time.time() - vm.started)
                vm.finished = time.time()
                rewritten.append((vm.dir, vm.record()))
            self.vms[vm.id] = vm
        _write_records(rewritten)
        self._ready = _make_ready_dirs(self.vm_dir, READY_DIRS)
        log.info("loaded %d VM records", len(self.vms))

    def _vm_from_record(self, rec: dict[str, Any], d: Path) -> Vm:
        spec = VmSpec.from_dict(rec["spec"])
        vm = Vm(rec["id"], spec, rec["digest"], rec["image_name"], d, self.cfg.limits.log_bytes,
                rec.get("memory_limit", self.cfg.limits.memory))
        vm.state = VmState(rec["state"])
        vm.created, vm.started, vm.finished = rec["created"], rec.get("started"), rec.get("finished")
        vm.exit = ExitRecord(**rec["exit"]) if rec.get("exit") else None
        vm.fuel_consumed = rec.get("fuel_consumed", 0)
        vm.fuel_budget = rec.get("fuel_budget")
        vm.peak_memory = rec.get("peak_memory", 0)
        vm.snapshot_kind = rec.get("snapshot_kind", "stopped_only")
        return vm

    async def shutdown(self) -> None:
        """Stop every live VM (reason daemon_restart on next load is avoided: they are stopped now)."""
        self.closing = True
        live = [vm for vm in self.vms.values() if vm.state.live]
        await asyncio.gather(*(self._end(vm, Control.STOP) for vm in live), return_exceptions=True)
        await self.flush_records()
        ready, self._ready = self._ready, []
        for vm_id in ready:
            self._persist.submit(shutil.rmtree, self.vm_dir / vm_id, True)
        self._persist.shutdown(wait=True)
        self.sched.close()

    # ------------------------------------------------------------------ lookup
    def get(self, ref: str) -> Vm:
        vm = self.vms.get(ref)
        if vm is not None:
            return vm
        by_name = [v for v in self.vms.values() if v.name == ref]
        if len(by_name) == 1:
            return by_name[0]
        if len(ref) >= 4:
            hits = [v for v in self.vms.values() if v.id.startswith(ref)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise Conflict(f"VM reference {ref!r} is ambiguous", code="ambiguous_ref")
        raise NotFound(f"no such VM: {ref}", code="vm_not_found")

    def list(self, all_: bool) -> list[Vm]:
        vms = sorted(self.vms.values(), key=lambda v: v.created)
        return vms if all_ else [v for v in vms if v.state.live]

    # ------------------------------------------------------------------ images
    async def import_image(self, data: bytes, name: str | None, entry: str | None = None, *,
                           asyncify: bool = True, background: bool = False) -> Image:
        """``asyncify``: rewrite a plain WASI module for snapshots (images/importer.py); ``background``: import
        it as it is at once and move the name to the rewrite when that is done."""
        return await import_module(self.images, data, name, entry, on_io=self.sched.on_io, asyncify=asyncify,
                                   background=background)

    async def remove_image(self, ref: str) -> Image:
        img = self.images.resolve(ref)
        users = [v for v in self.vms.values() if v.digest == img.digest]
        only_untag = ref in self.images.names and len(img.names) > 1
        if users and not only_untag:
            raise Conflict(f"image {ref} is used by VM(s) {', '.join(v.name for v in users[:5])}; remove them first",
                           code="image_in_use")
        return await self.sched.on_io(self.images.remove, ref)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ create
    def _validate(self, spec: VmSpec) -> int:
        lim = self.cfg.limits
        if spec.name is not None:
            if not spec.name or len(spec.name) > 128 or "/" in spec.name:
                raise BadRequest(f"invalid VM name {spec.name!r}", code="invalid_name")
            if any(v.name == spec.name for v in self.vms.values()):
                raise Conflict(f"a VM named {spec.name!r} already exists", code="name_in_use")
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

    async def create(self, spec: VmSpec, restore: RestoreData | None = None, start: bool = False) -> Vm:
        """Create (and with ``start``, start) a VM. A started VM is built and runs its first slice in one
        task on a vCPU worker: a short guest finishes without another thread hand-off."""
        img = self.images.resolve(spec.image)
        # limits: the VM's own, else the image manifest's, else the daemon's defaults
        if spec.fuel is None:
            spec.fuel = img.limits.get("fuel", self.cfg.limits.fuel)
        if spec.memory is None:
            spec.memory = img.limits.get("memory")
        if spec.timeout is None:
            spec.timeout = img.limits.get("timeout", self.cfg.limits.timeout)
        memory = self._validate(spec)
        if spec.ephemeral:  # nothing on disk: no directory, no record, the console in memory
            vm_id = uuid.uuid4().hex
            premade = False
        else:
            premade = bool(self._ready)
            vm_id = self._ready.pop() if premade else uuid.uuid4().hex
            self._refill_ready()
        d = self.vm_dir / vm_id
        vm = Vm(vm_id, spec, img.digest, img.names[0] if img.names else img.digest, d,
                self.cfg.limits.log_bytes, memory)
        if not spec.ephemeral:
            vm.console.premade = premade
            vm.console.use_files = self._console_mode()
        vm.snapshot_kind = "asyncify" if img.asyncify else "stopped_only"
        self.vms[vm_id] = vm  # reserve the name while we build
        # The record is durable before the API says "created" (a crash then brings the VM back as stopped).
        # It is written on the persist thread while the VM is built; a VM started at once writes it after
        # its first slice instead, and only if it is still alive then: a short run (hello) then has no file
        # system work competing with it for the GIL, and its final record is written with the next batch.
        fused = start and restore is None
        record = None if fused or spec.ephemeral else asyncio.get_running_loop().run_in_executor(
            self._persist, _write_records, [(vm.dir, vm.record())])
        first: SliceEnd | BaseException | None = None
        try:
            if any(d.mode == "cow" for d in vm.spec.disks):  # overlays live in the VM's directory
                await self.sched.on_io(partial(vm.dir.mkdir, parents=True, exist_ok=True))
            for dev in self.device_hooks:
                await dev.attach(self, vm)
            if fused:
                vm.enter_cpu()
                t_wall, t_mono = time.time(), time.monotonic()  # the first slice runs before the transition
                try:
                    first = await self.sched.on_cpu_pool(self._build_and_run, vm, img)
                finally:
                    vm.leave_cpu()
            else:
                await self.sched.on_io(self._build, vm, img, restore)
            if restore is not None and vm.devices is not None:
                for name, state in restore.devices.items():
                    part = vm.devices.get(name)
                    if part is not None and hasattr(part, "restore"):
                        try:
                            part.restore(state)
                        except (ValueError, TypeError, AttributeError) as exc:
                            raise Unprocessable(f"snapshot device state for {name} is invalid: {exc}",
                                                code="invalid_snapshot") from None
        except BaseException:
            self.vms.pop(vm_id, None)
            if vm.devices is not None:
                vm.devices.close()
            await self._teardown(vm)
            raise
        finally:
            if record is not None:
                await record
        self._save(vm)
        vm.log.info("created from image %s (%s)", vm.image_name, img.digest[:19])
        if first is not None:
            if vm.state.terminal:  # killed while it was being built
                self._release(vm)
                return vm
            vm.started = t_wall
            self._transition(vm, VmState.RUNNING, "start", since=t_mono)
            self._on_slice_end(vm, first)
            if not vm.state.terminal and not spec.ephemeral:  # it lives on: durable before the API answers
                await asyncio.get_running_loop().run_in_executor(self._persist, _write_records,
                                                                 [(vm.dir, vm.record())])
        elif start:
            await self.start(vm)
        return vm

    def _console_mode(self) -> bool:
        """True (and two descriptors reserved) if this VM's console is written by wasmtime to its files."""
        mode = self.cfg.engine.console
        if mode == "hook":
            return False
        with self._console_lock:
            if mode == "auto" and self._console_fds + 2 > resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2:
                return False
            self._console_fds += 2
        return True

    def console_fds(self) -> int:
        return self._console_fds

    def _refill_ready(self) -> None:
        """Keep a few VM directories made in advance; refilled a moment later, after the current create."""
        if self._refilling or len(self._ready) > READY_DIRS // 2 or self.closing:
            return
        self._refilling = True
        loop = asyncio.get_running_loop()

        def done(fut: asyncio.Future[list[str]]) -> None:
            self._refilling = False
            if not fut.cancelled() and fut.exception() is None:
                self._ready.extend(fut.result())

        def start() -> None:
            if self.closing:
                self._refilling = False
                return
            fut = loop.run_in_executor(self._persist, _make_ready_dirs, self.vm_dir, READY_DIRS - len(self._ready))
            fut.add_done_callback(done)

        loop.call_later(0.02, start)

    def _build_and_run(self, vm: Vm, img: Image) -> SliceEnd | BaseException:
        """On a vCPU worker: build, then the first slice (build errors raise; slice errors are returned)."""
        self._build(vm, img)
        try:
            return self.sched.run_slice(vm)
        except Exception as exc:
            return exc

    def _build(self, vm: Vm, img: Image, restore: RestoreData | None = None) -> None:
        """On an I/O thread: directory, console files, instantiation, ABI check."""
        lim = self.cfg.limits
        argv0 = vm.image_name if not vm.image_name.startswith("sha256:") else "guest"
        mspec = MachineSpec(
            args=[argv0, *(vm.spec.args or img.args)], env={**img.env, **vm.spec.env},
            dirs=[(x.host, x.guest, x.readonly) for x in vm.spec.dirs], memory_limit=vm.memory_limit,
            table_elements=lim.table_elements, instances=lim.instances, tables=lim.tables,
            memories=lim.memories, stdout=vm.console.writer("stdout"), stderr=vm.console.writer("stderr"),
            entry=img.entry or "", boot=list(img.boot),
            asyncify_globals=tuple(img.asyncify_globals) if img.asyncify_globals else None,  # type: ignore[arg-type]
        )
        if isinstance(vm.console, Console) and vm.console.use_files:
            mspec.stdout_file, mspec.stderr_file = vm.console.files()
        if img.entry is None:
            mspec.entry = mspec.boot.pop() if mspec.boot else ""
        module, pre = self.images.instance_pre(img)
        wt.set_current_vm(vm)
        try:
            vm.machine = Machine(self.engine, self.linker, module, mspec, pre)
        except wt.InstantiationError as exc:
            msg = str(exc)
            if "memory" in msg and ("limit" in msg or "minimum" in msg or "exceeds" in msg or "resource" in msg):
                raise Unprocessable(f"memory_limit: the module needs more memory than the VM's limit of "
                                    f"{vm.memory_limit} bytes ({msg})", code="memory_limit") from None
            raise Unprocessable(f"instantiation failed: {msg}", code="instantiation_failed") from None
        except wasmtime.WasmtimeError as exc:
            raise Unprocessable(f"cannot set up the VM: {str(exc).splitlines()[0]}", code="vm_setup_failed") from None
        finally:
            wt.set_current_vm(None)
        if img.kind == "sdk" and vm.machine.export("microvm_abi_version") is not None:
            try:
                want = vm.machine.call_sync("microvm_abi_version")[0]
            except (RuntimeError, TimeoutError, KeyError) as exc:
                raise Unprocessable(f"the guest's microvm_abi_version failed: {exc}", code="abi_check_failed") from None
            if want > ABI_VERSION:
                raise Unprocessable(f"the guest was built for microvm ABI version {want}; this daemon serves "
                                    f"version {ABI_VERSION}: rebuild it with this SDK or upgrade microvmd",
                                    code="abi_version_unsupported")
        if restore is not None:
            try:
                vm.machine.restore(restore.memory_size, restore.load, restore.globals, restore.unwound,
                                   restore.fuel_consumed, restore.zero_chunks, restore.tables)
            except (ValueError, wasmtime.WasmtimeError) as exc:
                raise Unprocessable(f"the snapshot does not fit its image: {str(exc).splitlines()[0]}",
                                    code="invalid_snapshot") from None
            vm.fuel_budget = restore.fuel_budget
            vm.snapshot_kind = "asyncify" if vm.machine.asyncify is not None else "stopped_only"
        vm.sync_from_machine()

    async def _teardown(self, vm: Vm) -> None:
        """Free the VM's store (I/O thread), then delete its directory after any record write still queued."""
        m, vm.machine = vm.machine, None
        if m is not None:
            await self.sched.on_io(m.close)
        self._free_console(vm)
        self._dirty.pop(vm.id, None)
        if not vm.spec.ephemeral:  # (an ephemeral VM has no directory)
            await asyncio.get_running_loop().run_in_executor(self._persist, shutil.rmtree, vm.dir, True)

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
        async with vm.lock:
            if vm.machine is None:
                raise InvalidState(f"cannot start VM {vm.id}: it is {vm.state.value}")
            self._transition(vm, VmState.RUNNING, "start")
            vm.started = time.time()
            self._dispatch(vm)
        return vm

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
        if out is None:
            self._finish(vm, None, ExitReason.TRAP, "no outcome")
        elif out.exit_code is not None:
            self._finish(vm, out.exit_code, ExitReason.EXIT)
        elif out.trap is not None:
            reason = _TRAP_REASONS.get(out.trap_code)  # type: ignore[arg-type]
            if reason is None:
                self._finish(vm, None, ExitReason.TRAP, str(out.trap))
            else:
                self._finish(vm, None, reason)
        elif out.error is not None:
            self._finish(vm, None, ExitReason.TRAP, str(out.error))
        else:
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
        if vm.devices is not None:
            vm.devices.close()
        if (vm.spec.auto_remove or vm.spec.ephemeral) and not self.closing:
            asyncio.get_running_loop().create_task(self._auto_remove(vm))

    def _release(self, vm: Vm) -> None:
        """Free the store (and its linear memory) on an I/O thread."""
        machine, vm.machine = vm.machine, None
        if machine is not None:
            asyncio.get_running_loop().run_in_executor(self.sched.io, self._close_machine, vm, machine)

    def _close_machine(self, vm: Vm, machine: Machine) -> None:
        """On an I/O thread: drop the store (closing the console files in file mode), check the log cap."""
        machine.close()
        if self._free_console(vm):
            vm.console.enforce_cap()

    def _free_console(self, vm: Vm) -> bool:
        """After the store is closed: give back a file-mode console's two descriptors (once)."""
        with self._console_lock:
            if not vm.console.use_files:
                return False
            vm.console.use_files = False
            self._console_fds -= 2
        return True

    async def _auto_remove(self, vm: Vm) -> None:
        await asyncio.sleep(0)
        if vm.id in self.vms:
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
        return await self._end(vm, Control.STOP)

    async def kill(self, vm: Vm) -> Vm:
        return await self._end(vm, Control.KILL)

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
            if not force:
                raise Conflict(f"VM {vm.id} is {vm.state.value}; stop it first or use force",
                               code="vm_running")
            try:
                await self._end(vm, Control.KILL)
            except InvalidState:
                pass
        self.vms.pop(vm.id, None)
        await vm.off_cpu()  # a slice still running ends within a quantum; only then is the store closed
        if vm.devices is not None:
            vm.devices.close()
        await self._teardown(vm)
        for hook in self.on_remove:
            hook(vm)
        vm.log.debug("removed")

    # ------------------------------------------------------------------ persistence
    def _save(self, vm: Vm) -> None:
        """Mark the VM's record for writing; records are flushed together within 50 ms, off the loop."""
        if vm.spec.ephemeral:
            return
        self._dirty[vm.id] = vm
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(0.05, self._flush)

    def _flush(self) -> asyncio.Future[None]:
        self._flush_handle = None
        batch = [(vm.dir, vm.record()) for vm in self._dirty.values() if vm.id in self.vms]
        self._dirty.clear()
        return asyncio.get_running_loop().run_in_executor(self._persist, _write_records, batch)

    async def flush_records(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        await self._flush()

    # ------------------------------------------------------------------ info
    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in VmState}
        for vm in self.vms.values():
            out[vm.state.value] += 1
        return out

    def fuel_total(self) -> int:
        return self.fuel_total_finished + sum(v.fuel_consumed for v in self.vms.values() if v.state.live)
