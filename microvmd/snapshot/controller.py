"""Snapshot, restore and migrate: orchestration over the hypervisor, the snapshot store and a peer daemon.

A snapshot freezes the VM only while it is brought to a describable state (created, or an Asyncify guest
unwound at a suspension point) and its memory is copied — for a ``--diff``, only the chunks that changed
since the parent; hashing and writing happen on I/O threads afterwards, while the VM runs on.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .. import contract
from ..devices.blk import BlkState, BlockDevice
from ..engine import wt
from ..errors import BadRequest, Conflict, MicrovmError, NotFound, Unprocessable
from ..vmm.builder import RestoreData
from ..vmm.machine import NotSnapshottable
from ..vmm.manager import Hypervisor
from ..vmm.vm import PublishSpec, Vm, VmSpec
from . import dirty, transfer
from .store import (
    CHUNK,
    PackWriter,
    Ref,
    SnapshotStore,
    all_refs,
    encode_manifest,
    fresh_buffer,
    memcmp,
    portable,
)

log = logging.getLogger("microvmd.snapshot")


class _Parent:
    """The last snapshot of a VM, kept to make the next ``--diff`` cheap: its memory and references."""

    def __init__(self, memory: bytearray, refs: list[Ref | None], name: str,
                 tracked: tuple[int, int] | None = None) -> None:
        self.memory, self.refs, self.name = memory, refs, name
        # (address, size) of guest memory write-protected at this snapshot: pages written since then are
        # the ones PAGEMAP_SCAN reports (see dirty.py)
        self.tracked = tracked

    def address(self) -> int:
        return ctypes.addressof((ctypes.c_char * len(self.memory)).from_buffer(self.memory)) if self.memory else 0


class _SparePool:
    """Copy buffers whose pages are already faulted in, left by removed VMs (bounded in total size)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buffers: list[bytearray] = []

    def put(self, buf: bytearray) -> None:
        if len(buf) and sum(map(len, self.buffers)) + len(buf) <= self.limit:
            self.buffers.append(buf)

    def take(self, size: int) -> bytearray | None:
        for i, buf in enumerate(self.buffers):
            if len(buf) == size:
                return self.buffers.pop(i)
        return None


@dataclass(frozen=True)
class Grants:
    """The network a restore grants its new VM; None: what the snapshot's spec says (a local snapshot) or
    nothing (an imported one)."""

    allow_egress: list[str] | None = None
    publish: list[PublishSpec] | None = None


@dataclass(frozen=True)
class SnapshotImage:
    """A snapshot as a module's starting point (``Snapshots.image_of``)."""

    digest: str
    spec: VmSpec
    memory_size: int
    segments: list[tuple[int, bytes]]  # (offset, bytes) of the stored memory; zeros elsewhere
    globals: dict[str, tuple[str, int | float]]
    unwound: bool
    tables_changed: bool
    mono_ns: int  # a rewritten guest's monotonic clock at the snapshot (its WASI part), else 0


class Snapshots:
    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self.store = SnapshotStore(hv.cfg.state_dir / "snapshots")
        self._parents: dict[str, _Parent] = {}
        self._armed: dict[str, tuple[int, int]] = {}  # set while frozen, moved into _Parent when persisted
        self._tracker: dirty.DirtyTracker | None = None
        self._spares = _SparePool(256 << 20)
        self._vm_locks: dict[str, asyncio.Lock] = {}
        self.write_lock = asyncio.Lock()  # one writer of packs + manifests at a time
        self._seq = 0
        self._background: set[asyncio.Future[None]] = set()
        self._kept: dict[str, tuple[dict[str, Any], contract.VmSpec]] = {}  # instance(): manifests read once
        self.protected: list[Callable[[str], str | None]] = []  # who needs a snapshot (a function): rm is refused
        from .checkpoints import Checkpointer  # (it uses this class)
        self.checkpoints = Checkpointer(self)

    async def startup(self) -> None:
        if self.hv.cfg.engine.dirty_tracking:
            self._tracker = await self.hv.sched.on_io(dirty.tracker)
        log.info("diff snapshots: dirty pages by %s", dirty.describe(self.hv.cfg.engine.dirty_tracking))
        removed = await self.hv.sched.on_io(self.store.load)
        if removed:
            log.info("removed %d unreferenced snapshot packs", removed)
        await self.hv.sched.on_io(self.store.refill_spares)

    def refill_spares_later(self) -> None:
        """Make the spare files a snapshot used up (store.take_spare), on an I/O thread, not awaited: after
        the snapshot's answer, not before it."""
        fut = asyncio.get_running_loop().run_in_executor(self.hv.sched.io, self.store.refill_spares)
        self._background.add(fut)
        fut.add_done_callback(self._background.discard)

    def forget(self, vm_id: str) -> None:
        self._armed.pop(vm_id, None)
        parent = self._parents.pop(vm_id, None)
        if parent is not None:
            self._spares.put(parent.memory)  # its pages are faulted in: the next first snapshot reuses them
        self._vm_locks.pop(vm_id, None)

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------------ create
    def _auto_name(self, vm: Vm) -> str:
        """<vm>-<time>-<n>, from the VM's name made safe (a VM name may hold characters a snapshot's may not)."""
        self._seq += 1
        base = re.sub(r"[^A-Za-z0-9_.-]", "-", vm.name).lstrip("._-")[:80] or vm.id[:12]
        return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}-{self._seq}"

    async def create(self, vm: Vm, name: str | None, diff: bool, durable: bool = True) -> dict[str, Any]:
        name = name or self._auto_name(vm)
        self.store.check_name(name)
        if self.store.exists(name):
            raise Conflict(f"a snapshot named {name!r} already exists", code="snapshot_exists")
        if diff and vm.id not in self._parents:
            raise BadRequest(f"--diff needs an earlier snapshot of VM {vm.name} taken by this daemon",
                             code="no_parent_snapshot")
        lock = self._vm_locks.setdefault(vm.id, asyncio.Lock())
        async with lock, self.write_lock:
            writer = await self.hv.sched.on_io(PackWriter, self.store, durable)
            try:
                async with vm.lock:
                    manifest, memory, changed = await self.capture(vm, name, writer, diff)
                return await self._persist(vm, manifest, memory, changed, writer, durable)
            except BaseException:
                self._parents.pop(vm.id, None)  # a diff may have updated its copy: start afresh
                self._armed.pop(vm.id, None)
                await self.hv.sched.on_io(writer.abort)
                raise
            finally:
                self.refill_spares_later()

    async def capture(self, vm: Vm, name: str, writer: PackWriter, diff: bool,
                       thaw: bool = True, copy_memory: bool = True) -> tuple[dict[str, Any], Any, list[int] | None]:
        """With the VM's lock held: quiesce, copy memory (only changed chunks for a diff) and disks, thaw
        (unless the caller will). Returns the manifest skeleton, the memory copy and the changed chunks.
        Without ``copy_memory`` (the caller keeps the VM frozen) the memory is a view of guest memory."""
        hv = self.hv
        # a warm buffer for the copy, made before the VM is frozen (re-used from the last snapshot)
        last = self._parents.get(vm.id)
        machine0 = vm.machine
        size0 = machine0.memory_bytes if machine0 is not None else 0
        spare = last.memory if last is not None and len(last.memory) == size0 and not diff else None
        if spare is None and not diff and copy_memory:
            spare = self._spares.take(size0) or await hv.sched.on_io(fresh_buffer, size0)
        t0 = time.perf_counter()
        kind = await hv.quiesce(vm)
        try:
            machine = vm.machine
            assert machine is not None
            parent = self._parents.get(vm.id) if diff else None

            how: dict[str, Any] = {}

            def copy() -> tuple[Any, list[int] | None, dict[str, Any], dict[str, Any]]:
                address, size = machine.memory_region()
                globals_ = machine.capture_globals()
                try:
                    tables = machine.capture_tables()
                except NotSnapshottable as exc:
                    raise Conflict(f"VM {vm.name} cannot be snapshotted: {exc}", code="not_snapshottable") from None
                if not copy_memory:
                    raw = (ctypes.c_char * size).from_address(address) if size else b""
                    return memoryview(raw).cast("B") if size else memoryview(b""), None, globals_, tables
                written = self._written_chunks(vm, last, address, size)  # re-arms tracking too
                if parent is not None and len(parent.memory) == size:
                    base = parent.address()
                    if written is None:
                        how["dirty"] = "memcmp"
                        changed = self.store.changed_chunks(address, base, size)
                    else:  # the pages written since the parent: a superset of the changed ones
                        how["dirty"] = "pagemap"
                        how["written_chunks"] = len(written)
                        changed = [i for i in written
                                   if memcmp(address + i * CHUNK, base + i * CHUNK, min(CHUNK, size - i * CHUNK))]
                    for i in changed:
                        off = i * CHUNK
                        ctypes.memmove(base + off, address + off, min(CHUNK, size - off))
                    return parent.memory, changed, globals_, tables
                mem = spare if spare is not None and len(spare) == size else fresh_buffer(size)
                if size:
                    ctypes.memmove((ctypes.c_char * size).from_buffer(mem), address, size)
                return mem, None, globals_, tables

            memory, changed, globals_, tables = await hv.sched.on_io(copy)
            disks = await self._capture_disks(vm, writer)
            vm.sync_from_machine()
            frozen_ms = (time.perf_counter() - t0) * 1000
            manifest = {
                "name": name, "created": time.time(), "kind": kind,
                "wasmtime": wt.WASMTIME_VERSION, "engine": hv.opts.fingerprint(),
                "vm": {"id": vm.id, "name": vm.name, "spec": vm.spec.to_dict(), "image_name": vm.image_name,
                       "digest": vm.digest, "memory_limit": vm.memory_limit, "fuel_budget": vm.fuel_budget,
                       "fuel_consumed": vm.fuel_consumed, "state": vm.state.value,
                       "original_digest": _original_digest(hv, vm.digest)},
                "memory": {"size": len(memory), "chunks": []},
                "globals": {k: [t, v] for k, (t, v) in globals_.items()},
                **({"tables": tables} if tables else {}),
                "disks": disks,
                "devices": vm.devices.save(),
                "console": {s: vm.console.size(s) for s in ("stdout", "stderr")},
                "parent": parent.name if parent is not None and changed is not None else None,
                "stats": {"frozen_ms": round(frozen_ms, 3), **how},
            }
        except BaseException:
            if not vm.state.terminal:
                hv.thaw(vm)
            raise
        if thaw and not vm.state.terminal:
            hv.thaw(vm)
        return manifest, memory, changed

    def _written_chunks(self, vm: Vm, last: _Parent | None, address: int, size: int) -> list[int] | None:
        """While the VM is frozen (on an I/O thread): the chunks written since ``last`` was taken, or None
        when that is not known (no tracker, no tracked parent, memory moved or grew). Either way guest memory
        is armed again, so the next snapshot can ask the same question about this one."""
        tr = self._tracker
        self._armed.pop(vm.id, None)
        if tr is None or not size:
            return None
        written = None
        try:
            if last is not None and last.tracked == (address, size):
                written = tr.collect_chunks(address, size, CHUNK)  # re-protects the pages it reports
            else:
                tr.arm(address, size)
        except dirty.TrackingError as e:
            log.warning("vm=%s: dirty-page tracking failed (%s); comparing memory instead", vm.id[:12], e)
            written = None
            try:
                tr.arm(address, size)
            except dirty.TrackingError:
                return None
        self._armed[vm.id] = (address, size)
        return written

    async def _capture_disks(self, vm: Vm, writer: PackWriter) -> list[dict[str, Any]]:
        """Each attached disk, chunk by chunk straight into the pack (point-in-time: the VM is frozen)."""
        blk = vm.devices.get(BlkState)
        if blk is None:
            return []
        out = []
        for view in blk.snapshot_views():
            size = view.size()
            res = await self.hv.sched.on_io(self.store.store_reader, view.read_at, size, writer)
            out.append({"index": view.index, "name": view.name, "mode": view.mode, "size": size,
                        "chunks": res.refs, "new_chunks": res.new_chunks, "new_bytes": res.new_bytes})
        return out

    async def _persist(self, vm: Vm | None, manifest: dict[str, Any], memory: bytearray,
                       changed: list[int] | None, writer: PackWriter, durable: bool = True) -> dict[str, Any]:
        """Hash, deduplicate and write memory chunks, then publish the pack and the manifest (last); with
        ``durable`` both are fsynced (with their directories) before the snapshot is acknowledged."""
        t0 = time.perf_counter()
        parent = self._parents.get(vm.id) if vm is not None and changed is not None else None
        st = self.store

        def work() -> dict[str, Any]:
            res = st.store_bytes(memory, writer, changed, parent.refs if parent is not None else None)
            manifest["memory"]["chunks"] = res.refs
            new_chunks, new_bytes = res.new_chunks, res.new_bytes
            for d in manifest["disks"]:
                new_chunks += d.pop("new_chunks", 0)
                new_bytes += d.pop("new_bytes", 0)
            manifest["stats"].update({"new_chunks": new_chunks, "new_bytes": new_bytes,
                                      "changed_chunks": len(changed) if changed is not None else None})
            t_sync = time.perf_counter()
            writer.publish(durable)
            manifest["stats"]["write_ms"] = round((time.perf_counter() - t0) * 1000, 3)
            manifest["stats"]["durable"] = int(durable)
            st.save(st.finish(manifest), durable=durable)
            # pack and manifest fsyncs with their directories (0 without durable): bench/bench_durable.py
            manifest["stats"]["sync_ms"] = round((time.perf_counter() - t_sync) * 1000, 3)
            return manifest

        await self.hv.sched.on_io(work)
        if vm is not None:
            self._parents[vm.id] = _Parent(memory, manifest["memory"]["chunks"], manifest["name"],
                                           self._armed.pop(vm.id, None))
        log.info("snapshot %s of vm=%s: %s, %d bytes of memory, %d new chunks (%d bytes), frozen %.1f ms, "
                 "written in %.1f ms", manifest["name"], manifest["vm"]["id"][:12], manifest["kind"], len(memory),
                 manifest["stats"]["new_chunks"], manifest["stats"]["new_bytes"], manifest["stats"]["frozen_ms"],
                 manifest["stats"]["write_ms"])
        return summary(st.finish(manifest))

    # ------------------------------------------------------------------ queries
    async def list_all(self) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        """Every snapshot's summary, and the damaged ones: set aside at start-up, or unreadable now."""
        def scan() -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
            found, unreadable = self.store.scan()
            return [summary(m) for m in found], self.store.damaged() + unreadable
        return await self.hv.sched.on_io(scan)  # type: ignore[no-any-return]

    async def needing_image(self, digest: str) -> list[str]:
        """The snapshots that need the image ``digest`` to be restored or exported."""
        return [m["name"] for m in await self.hv.sched.on_io(self.store.iter_manifests)
                if m["vm"]["digest"] == digest]

    async def get(self, name: str) -> dict[str, Any]:
        return summary(await self.hv.sched.on_io(self.store.load_manifest, name))

    async def remove(self, name: str, owner: str | None = None) -> None:
        """Remove a snapshot; one that a function restores from is refused (409) unless ``owner`` is that
        function (its own redeploy or removal)."""
        for needs in self.protected:
            who = needs(name)
            if who is not None and who != owner:
                raise Conflict(f"snapshot {name} is the pre-initialised state of function {who}: remove or "
                               f"redeploy the function instead", code="snapshot_in_use")
        self._kept.pop(name, None)
        async with self.write_lock:
            await self.hv.sched.on_io(self.store.remove, name)
        for vm_id, p in list(self._parents.items()):
            if p.name == name:
                del self._parents[vm_id]

    # ------------------------------------------------------------------ restore
    async def restore(self, name: str, new_name: str | None, start: bool, grants: Grants | None = None,
                      keep_disk_names: bool = False) -> Vm:
        hv = self.hv
        st = self.store
        grants = grants or Grants()
        m = st.manifest_if_unchanged(name) or await hv.sched.on_io(st.load_manifest, name)
        try:
            hv.images.resolve(m["vm"]["digest"])
        except NotFound:
            raise Unprocessable(f"snapshot {name} needs image {m['vm']['digest'][:19]}, which this daemon does "
                                f"not have: import the image, or import an export of the snapshot",
                                code="image_missing") from None
        try:
            spec = VmSpec.from_dict(m["vm"]["spec"])
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise Unprocessable(f"snapshot {name} has an invalid VM spec: {exc}", code="invalid_snapshot") from None
        fuel_budget = m["vm"].get("fuel_budget")
        if m.get("origin") == "import":
            fuel_budget = self._distrust(name, spec, m, fuel_budget)
        if grants.allow_egress is not None:
            spec.allow_egress = list(grants.allow_egress)
        if grants.publish is not None:
            spec.publish = list(grants.publish)
        spec.image = m["vm"]["digest"]
        spec.name = new_name
        spec.auto_remove = spec.ephemeral = False
        made = await self._restore_disks(m, spec, keep_disk_names)
        data = self._restore_data(m, fuel_budget)
        try:
            vm = await hv.restore(spec, data)
        except BaseException:
            await self._remove_disks(made)
            raise
        image_name = m["vm"].get("image_name")
        vm.image_name = image_name if isinstance(image_name, str) and 0 < len(image_name) <= 256 \
            and image_name.isprintable() else vm.digest  # a file's word, kept only if it is a plain name
        log.info("restored snapshot %s as vm=%s (%s)", name, vm.id[:12], m["kind"])
        if start:
            await hv.start(vm)
        return vm

    async def instance(self, name: str, adjust: Callable[[VmSpec], None], fuel: int | None = None) -> Vm:
        """A new ephemeral VM restored from snapshot ``name``, not started: a function's fresh instance for one
        request. The manifest is read once and kept (the snapshot is the daemon's own: nothing to distrust);
        the memory comes from the packs through the page cache. ``adjust`` sets the instance's limits and
        input; ``fuel`` is its budget beyond what the snapshot had consumed."""
        m, stored = await self._kept_manifest(name)
        spec = VmSpec.from_contract(stored)
        spec.image = m["vm"]["digest"]
        spec.name = None
        spec.auto_remove = spec.stdin = False
        spec.ephemeral = True
        adjust(spec)
        consumed = int(m["vm"].get("fuel_consumed") or 0)
        return await self.hv.restore(spec, self._restore_data(m, None if fuel is None else consumed + fuel))

    async def _kept_manifest(self, name: str) -> tuple[dict[str, Any], contract.VmSpec]:
        kept = self._kept.get(name)
        if kept is None:
            m = await self.hv.sched.on_io(self.store.load_manifest, name)
            kept = self._kept[name] = (m, contract.convert(m["vm"]["spec"], contract.VmSpec))
        return kept

    async def image_of(self, name: str) -> SnapshotImage:
        """Snapshot ``name`` as a function's direct instances start from it (functions/direct.py): the VM's
        spec and image, its memory as runs of stored bytes (chunks read and checked off the loop), its globals,
        and whether it was taken inside a call (unwound) and with changed tables."""
        m, stored = await self._kept_manifest(name)
        refs, size, packs = m["memory"]["chunks"], int(m["memory"]["size"]), m["packs"]

        def read() -> list[tuple[int, bytes]]:
            runs: list[tuple[int, bytearray]] = []
            for i, r in enumerate(refs):
                if r is None:
                    continue
                chunk = self.store.read_chunk(r, packs)
                at = i * CHUNK
                if runs and runs[-1][0] + len(runs[-1][1]) == at:
                    runs[-1][1].extend(chunk)
                else:
                    runs.append((at, bytearray(chunk)))
            return [(at, bytes(b)) for at, b in runs]

        segments = await self.hv.sched.on_io(read)
        devices = m.get("devices")
        wasi = devices.get("wasi") if isinstance(devices, dict) else None
        mono = wasi.get("monotonic_ns") if isinstance(wasi, dict) else None
        return SnapshotImage(m["vm"]["digest"], VmSpec.from_contract(stored), size, segments,
                             {k: (v[0], v[1]) for k, v in m["globals"].items()}, m["kind"] == "unwound",
                             bool(m.get("tables")), mono if isinstance(mono, int) and mono >= 0 else 0)

    def _distrust(self, name: str, spec: VmSpec, m: dict[str, Any], fuel_budget: int | None) -> int | None:
        """An imported snapshot's spec is what a file asked for, and anyone can write a file whose checksums
        hold: it gets no host directories, no network grants (the restore call grants them) and no limits
        above this daemon's. Narrows ``spec`` in place; returns the fuel budget to restore with."""
        lim = self.hv.cfg.limits
        dropped = []
        if spec.dirs:  # host directories are this host's: an imported snapshot does not get to name them
            dropped.append(f"{len(spec.dirs)} host director(ies)")
            spec.dirs = []
        if spec.allow_egress:
            dropped.append(f"{len(spec.allow_egress)} egress rule(s)")
            spec.allow_egress = []
        if spec.publish:
            dropped.append(f"{len(spec.publish)} published port(s)")
            spec.publish = []
        if dropped:
            log.info("restore of imported snapshot %s: not granting its file's %s (grant them with the "
                     "restore call: --allow-egress, --publish)", name, ", ".join(dropped))
        size = int(m["memory"]["size"])
        if size > lim.max_memory:
            raise Unprocessable(f"snapshot {name} holds {size} bytes of memory, above this daemon's maximum of "
                                f"{lim.max_memory} (limits.max_memory)", code="memory_limit")
        if spec.memory is not None and spec.memory > lim.max_memory:
            spec.memory = lim.max_memory
        if lim.timeout is not None and (spec.timeout is None or spec.timeout > lim.timeout):
            spec.timeout = lim.timeout
        if lim.fuel is not None:
            consumed = int(m["vm"].get("fuel_consumed") or 0)
            if spec.fuel is None or spec.fuel > lim.fuel:
                spec.fuel = lim.fuel
            if fuel_budget is None or fuel_budget - consumed > lim.fuel:
                fuel_budget = consumed + lim.fuel
        return fuel_budget

    def _restore_data(self, m: dict[str, Any], fuel_budget: int | None = None) -> RestoreData:
        """What the builder's restore path needs of a manifest (``fuel_budget``: the budget to restore
        with, when the caller narrowed the snapshot's own; else the snapshot's)."""
        st = self.store
        refs, size, packs = m["memory"]["chunks"], m["memory"]["size"], m["packs"]
        devices = m.get("devices")

        return RestoreData(memory_size=size, load=lambda addr, n: st.map_into(refs, n, addr, packs),
                           clear=lambda addr, below: st.map_zeros(refs, below, addr),
                           globals={k: (v[0], v[1]) for k, v in m["globals"].items()},
                           unwound=m["kind"] == "unwound", fuel_consumed=int(m["vm"].get("fuel_consumed") or 0),
                           fuel_budget=m["vm"].get("fuel_budget") if fuel_budget is None else fuel_budget,
                           devices=devices if isinstance(devices, dict) else {},
                           tables=m.get("tables") or {})

    # ------------------------------------------------------------------ suspend on a clean stop, resume
    async def suspend_all(self, vms: list[Vm]) -> None:
        await self.checkpoints.stop()  # (no checkpoint of a VM being suspended)
        """At a clean daemon stop (Hypervisor.stop_guests): each VM is snapshotted (durably) and ended with
        reason ``suspended``, its record naming the snapshot. One that cannot be snapshotted (no Asyncify, no
        suspension point in time) is left running: stop_guests stops it, and its policy starts it again from
        its image at the next start."""
        t0 = time.monotonic()
        done = 0
        for vm in vms:
            try:
                await self.suspend(vm)
                done += 1
            except MicrovmError as exc:
                log.info("vm=%s not suspended (%s): it starts again from its image", vm.id[:12], exc.message)
        if vms:
            log.info("suspended %d of %d VMs in %.1f ms", done, len(vms), (time.monotonic() - t0) * 1000)

    async def suspend(self, vm: Vm) -> str:
        hv = self.hv
        if vm.snapshot_kind != "asyncify":
            raise Conflict(f"VM {vm.id} has no Asyncify support", code="not_snapshottable")
        name = f"suspend-{vm.id[:12]}-{time.strftime('%Y%m%d-%H%M%S')}"
        lock = self._vm_locks.setdefault(vm.id, asyncio.Lock())
        async with lock, self.write_lock:
            writer = await hv.sched.on_io(PackWriter, self.store)
            try:
                async with vm.lock:  # stays frozen from the capture to its end: nothing runs after the image
                    manifest, memory, _ = await self.capture(vm, name, writer, diff=False, thaw=False,
                                                              copy_memory=False)
                    try:
                        await self._persist(vm, manifest, memory, None, writer, True)
                    finally:
                        self._parents.pop(vm.id, None)  # (a view of guest memory, not a copy to keep)
                    hv.end_suspended(vm, name)
            except BaseException:
                await hv.sched.on_io(writer.abort)
                if vm.rt.frozen and not vm.state.terminal:
                    hv.thaw(vm)
                raise
        return name

    async def resume_suspended(self) -> None:
        """At start-up, once the API serves: every VM suspended by the last clean stop runs again from its
        snapshot, in its own record and console (published ports bound again as it is attached); the
        snapshot is removed once it has. One that cannot be resumed starts again from its image."""
        hv = self.hv
        # suspended by a clean stop; or, after a crash, checkpointed and kept running by its policy
        vms = [vm for vm in hv.list(True) if vm.state.terminal and (vm.suspended_to or (
            vm.checkpoint and hv.ended_by_crash(vm)
            and vm.policy.at_daemon_start(True, vm.user_stopped, vm.restart_count)))]
        resumed = 0
        for vm in vms:
            name = vm.suspended_to or vm.checkpoint
            assert name is not None
            suspended = vm.suspended_to is not None
            try:
                m = await hv.sched.on_io(self.store.load_manifest, name)
                async with vm.lock:
                    if vm.state.terminal and name in (vm.suspended_to, vm.checkpoint):
                        # in the state it had: suspended, as it was captured; after a crash, as its record
                        # last said (a VM paused since its last checkpoint comes back paused)
                        paused = m["vm"].get("state") == "paused" if suspended else vm.paused_at_crash
                        await hv.rerun(vm, "resume" if suspended else "resume from checkpoint",
                                       restore=self._restore_data(m), paused=paused)
                        resumed += 1
            except MicrovmError as exc:
                log.warning("vm=%s cannot be resumed from %s (%s): starting it from its image", vm.id[:12],
                            name, exc.message)
                vm.suspended_to = vm.checkpoint = None
                hv.restart_at_start([vm])
                continue
            if suspended:
                try:
                    await self.remove(name)
                except MicrovmError:
                    pass
        if vms:
            log.info("resumed %d of %d suspended or checkpointed VMs, the last %.1f ms after start-up began",
                     resumed, len(vms),
                     (time.monotonic() - hv.started_mono) * 1000)

    async def _restore_disks(self, m: dict[str, Any], spec: VmSpec, keep_names: bool = False) -> list[str]:
        """Give the new VM the snapshot's point-in-time disk contents, as new (sparse) disks: named
        ``NAME.restored-HEX``, or ``NAME`` itself when ``keep_names`` and no disk here has it."""
        if not m["disks"]:
            return []
        disks = self.hv.devices.get(BlockDevice)
        if disks is None:
            raise Unprocessable("this snapshot has disks but the daemon has no disk device", code="no_disk_device")
        made: list[str] = []
        packs = m["packs"]

        def filler(refs: list[Ref | None], size: int) -> Any:
            return lambda fd: self.store.write_refs(refs, size, fd, packs)

        try:
            for d in m["disks"]:
                if not 0 <= d["index"] < len(spec.disks):
                    raise Unprocessable("snapshot disk index does not match its VM spec", code="invalid_snapshot")
                new_name = await disks.materialize_with(d["name"], d["size"], filler(d["chunks"], d["size"]),
                                                        keep_name=keep_names)
                made.append(new_name)
                ds = spec.disks[d["index"]]
                ds.name = new_name
                if ds.mode == "cow":
                    ds.mode = "rw"
        except BaseException:
            await self._remove_disks(made)
            raise
        return made

    async def _remove_disks(self, made: list[str]) -> None:
        """Remove the disks a failed restore made (there are some only if the block device is in)."""
        disks = self.hv.devices.get(BlockDevice)
        if disks is None:
            return
        for name in made:
            try:
                await disks.remove_disk(name)
            except Exception as exc:  # leave it for the operator, but say so
                log.warning("could not remove disk %s of a failed restore: %s", name, exc)

    # ------------------------------------------------------------------ export / import
    async def export_blocks(self, name: str, only: set[bytes] | None = None,
                            with_image: bool = True) -> tuple[dict[str, Any], Any]:
        m = await self.hv.sched.on_io(self.store.load_manifest, name)
        # check the packs before the answer starts: a bad chunk found mid-stream could only cut it off
        await self.hv.sched.on_io(self.store.verify_manifest, m)
        seen: set[bytes] = set()
        refs = []
        for r in all_refs(m):
            if r[0] not in seen and (only is None or r[0] in only):
                seen.add(r[0])
                refs.append(r)
        image = None
        if with_image:
            img = self.hv.images.resolve(m["vm"]["digest"])
            image = await self.hv.sched.on_io(self.hv.images.module_bytes, img)
        gen = transfer.export_blocks(self.store, encode_manifest(portable(m)),
                                     transfer.from_store(self.store, refs, m["packs"]), image,
                                     wt.WASMTIME_VERSION, self.hv.opts.fingerprint())
        return m, gen

    async def import_stream(self, readexactly: Any, durable: bool = True, client: str | None = None
                            ) -> dict[str, Any]:
        """Import an exported snapshot. Without ``durable`` (a migration: the VM is frozen at its source
        until this answers) the fsyncs run right after the answer instead of before it.

        The stream is read into a new pack under the write lock (its chunks go into the index as they
        arrive). The pack is then published, and it and the packs whose chunks the import reuses are
        pinned, so the lock is released while the image in the stream is imported: compiling it never
        holds up other snapshots. The manifest is saved under the lock again; an import that fails after
        the pack was published leaves it to be collected, unless a snapshot taken meanwhile uses it."""
        hv = self.hv
        async with self.write_lock:
            writer = await hv.sched.on_io(PackWriter, self.store, durable)
            try:
                m, image = await transfer.read_stream(readexactly, hv.sched.on_io, self.store, writer,
                                                      hv.cfg.upload_limit)
                await self._check_import_name(m)
                pinned = self.store.packs_of(all_refs(m)) - {writer.id}

                def publish() -> str | None:
                    pack = writer.publish(durable)
                    self.store.pin(pinned | ({pack} if pack else set()))
                    return pack
                pack = await hv.sched.on_io(publish)
            except BaseException:
                await hv.sched.on_io(writer.abort)
                raise
            finally:
                self.refill_spares_later()
        if pack is not None:
            pinned.add(pack)
        saved = False
        try:
            if image is not None:
                # outside the write lock: a compile (seconds for a big module) must not stall snapshots
                img = await hv.import_image(image, None, client=client)
                if img.digest != m["vm"]["digest"]:
                    raise Unprocessable("the image in the snapshot export does not match its manifest",
                                        code="invalid_snapshot")
                # the module that ran (rewritten with Asyncify at its first import, if it was): no rewrite
                # here; the digest of the module it was made from is kept
                await hv.sched.on_io(hv.images.adopt_origin, img.digest, m["vm"].get("original_digest"))
            async with self.write_lock:
                await self._check_import_name(m)
                stored = self._locate(m)
                stored["origin"] = "import"
                await hv.sched.on_io(self.store.save, self.store.finish(stored), True, durable)
                saved = True
        finally:
            def release() -> None:
                self.store.unpin(pinned)
                if not saved and pack is not None:
                    self.store.collect({pack})  # (kept if a snapshot taken meanwhile shares its chunks)
            await hv.sched.on_io(release)
        if not durable:
            fut = asyncio.get_running_loop().run_in_executor(hv.sched.io, self.store.sync_later, pack, m["name"])
            self._background.add(fut)
            fut.add_done_callback(self._background.discard)
        return summary(self.store.finish(stored))

    async def _check_import_name(self, m: dict[str, Any]) -> None:
        """The same snapshot (its name, time and VM) may be imported again; another of that name may not."""
        if self.store.exists(m["name"]):
            old = await self.hv.sched.on_io(self.store.load_manifest, m["name"])
            if old["created"] != m["created"] or old["vm"]["id"] != m["vm"]["id"]:
                raise Conflict(f"a different snapshot named {m['name']!r} already exists here",
                               code="snapshot_exists")

    def _locate(self, m: dict[str, Any]) -> dict[str, Any]:
        """Give a portable manifest this store's chunk locations (every chunk is here by now)."""
        def fix(refs: list[Ref | None]) -> list[Ref | None]:
            out: list[Ref | None] = []
            for r in refs:
                if r is None:
                    out.append(None)
                    continue
                loc = self.store.index.get(r[0])
                if loc is None:
                    raise Unprocessable(f"snapshot chunk {r[0].hex()[:16]} is missing", code="invalid_snapshot")
                if loc.crc != r[1]:
                    raise Unprocessable(f"snapshot chunk {r[0].hex()[:16]} has a wrong checksum",
                                        code="invalid_snapshot")
                out.append([r[0], r[1], loc.pack, loc.offset, loc.length])
            return out
        return {**m, "memory": {**m["memory"], "chunks": fix(m["memory"]["chunks"])},
                "disks": [{**d, "chunks": fix(d["chunks"])} for d in m["disks"]]}

    def missing(self, hashes: list[bytes]) -> list[bytes]:
        return [h for h in hashes if not self.store.has_chunk(h)]


def _original_digest(hv: Any, digest: str) -> str | None:
    """The digest of the module the user imported, when the image is a rewrite of it (images/importer.py)."""
    try:
        return hv.images.resolve(digest).original_digest  # type: ignore[no-any-return]
    except NotFound:
        return None


def summary(m: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": m["name"], "created": m["created"], "kind": m["kind"], "parent": m.get("parent"),
        "vm": {"id": m["vm"]["id"], "name": m["vm"].get("name"), "image": m["vm"].get("image_name"),
               "digest": m["vm"]["digest"], "state": m["vm"].get("state")},
        "memory_bytes": m["memory"]["size"],
        "chunks": sum(1 for c in m["memory"]["chunks"] if c),
        "disks": [{"name": d["name"], "size": d["size"], "mode": d.get("mode")} for d in m["disks"]],
        "stats": m.get("stats", {}),
        "wasmtime": m.get("wasmtime"), "engine": m.get("engine"),
        "origin": "import" if m.get("origin") == "import" else "local",
        "asks": _asks(m["vm"].get("spec")),
    }


def _asks(raw: Any) -> dict[str, Any] | None:
    """What a snapshot's spec asks for (None when it does not decode: restore refuses it then)."""
    try:
        spec = VmSpec.from_dict(raw)
    except (TypeError, ValueError, KeyError, AttributeError):
        return None
    return {"allow_egress": spec.allow_egress, "publish": [asdict(p) for p in spec.publish],
            "memory": spec.memory, "fuel": spec.fuel, "timeout": spec.timeout,
            "dirs": [d.host for d in spec.dirs]}


async def drain(gen: Any, run_io: Any, write: Any) -> None:
    """Pull blocks from a blocking generator on I/O threads and hand them to an async writer."""
    sentinel = object()
    while True:
        block = await run_io(next, gen, sentinel)
        if block is sentinel:
            return
        await write(block)

