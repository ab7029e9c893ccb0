"""Snapshot, restore and migrate: orchestration over the hypervisor, the snapshot store and a peer daemon.

A snapshot freezes the VM only for as long as it takes to bring it to a describable state (created, or an
Asyncify guest unwound at a suspension point) and copy its memory; chunking, hashing and writing happen on
I/O threads while the VM runs on.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

from ..errors import BadRequest, Conflict, NotFound, Unprocessable
from ..vmm import wt
from ..vmm.manager import Hypervisor, RestoreData
from ..vmm.vm import Vm, VmSpec
from . import transfer
from .store import SnapshotStore, encode_manifest

log = logging.getLogger("microvmd.snapshot")


class Snapshots:
    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self.store = SnapshotStore(hv.cfg.state_dir / "snapshots")
        # the most recent snapshot of each VM: its memory and chunk list, the parent of a --diff
        self._last: dict[str, tuple[bytes, list[str | None], str]] = {}
        self._seq = 0

    async def startup(self) -> None:
        removed = await self.hv.sched.on_io(self.store.collect_garbage)
        if removed:
            log.info("removed %d unreferenced snapshot chunks", removed)

    def forget(self, vm_id: str) -> None:
        self._last.pop(vm_id, None)

    # ------------------------------------------------------------------ create
    def _auto_name(self, vm: Vm) -> str:
        self._seq += 1
        return f"{vm.name}-{time.strftime('%Y%m%d-%H%M%S')}-{self._seq}"

    async def create(self, vm: Vm, name: str | None, diff: bool) -> dict[str, Any]:
        name = name or self._auto_name(vm)
        self.store.check_name(name)
        if self.store.exists(name):
            raise Conflict(f"a snapshot named {name!r} already exists", code="snapshot_exists")
        parent = self._last.get(vm.id) if diff else None
        if diff and parent is None:
            raise BadRequest(f"--diff needs an earlier snapshot of VM {vm.name} taken by this daemon",
                             code="no_parent_snapshot")
        async with vm.lock:
            manifest, memory = await self._capture(vm, name)
        return await self._persist(vm, manifest, memory, parent)

    async def _capture(self, vm: Vm, name: str, thaw: bool = True) -> tuple[dict[str, Any], bytes]:
        """With the VM's lock held: quiesce, copy, thaw (unless the caller will). Returns the manifest
        skeleton and the memory."""
        hv = self.hv
        t0 = time.perf_counter()
        kind = await hv.quiesce(vm)
        try:
            assert vm.machine is not None
            memory, globals_ = await hv.sched.on_io(vm.machine.capture)
            disks = await self._capture_disks(vm)
            vm.sync_from_machine()
            frozen_ms = (time.perf_counter() - t0) * 1000
            manifest = {
                "name": name, "created": time.time(), "kind": kind,
                "wasmtime": wt.WASMTIME_VERSION, "engine": hv.opts.fingerprint(),
                "vm": {"id": vm.id, "name": vm.name, "spec": asdict(vm.spec), "image_name": vm.image_name,
                       "digest": vm.digest, "memory_limit": vm.memory_limit, "fuel_budget": vm.fuel_budget,
                       "fuel_consumed": vm.fuel_consumed, "state": vm.state.value},
                "memory": {"size": len(memory), "chunks": []},
                "globals": {k: [t, v] for k, (t, v) in globals_.items()},
                "disks": disks,
                "devices": _device_states(vm),
                "console": {s: vm.console.size(s) for s in ("stdout", "stderr")},
                "stats": {"frozen_ms": round(frozen_ms, 3)},
            }
        except BaseException:
            if not vm.state.terminal:
                hv.thaw(vm)
            raise
        if thaw and not vm.state.terminal:
            hv.thaw(vm)
        return manifest, memory

    async def _capture_disks(self, vm: Vm) -> list[dict[str, Any]]:
        blk = vm.devices.get("blk") if vm.devices is not None else None
        if blk is None or not hasattr(blk, "snapshot_views"):
            return []
        out = []
        for view in blk.snapshot_views():
            data = await self.hv.sched.on_io(view.read_all)
            out.append({"index": view.index, "name": view.name, "mode": view.mode, "size": len(data),
                        "data": data})
        return out

    async def _persist(self, vm: Vm | None, manifest: dict[str, Any], memory: bytes,
                       parent: tuple[bytes, list[str | None], str] | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        st = self.store
        res = await self.hv.sched.on_io(st.store_bytes, memory, parent[0] if parent else None,
                                        parent[1] if parent else None)
        manifest["memory"]["chunks"] = res.chunks
        new_chunks, new_bytes = res.new_chunks, res.new_bytes
        for d in manifest["disks"]:
            dres = await self.hv.sched.on_io(st.store_bytes, d.pop("data"))
            d["chunks"] = dres.chunks
            new_chunks += dres.new_chunks
            new_bytes += dres.new_bytes
        manifest["parent"] = parent[2] if parent else None
        manifest["stats"].update({"new_chunks": new_chunks, "new_bytes": new_bytes,
                                  "write_ms": round((time.perf_counter() - t0) * 1000, 3)})
        await self.hv.sched.on_io(st.save, manifest)
        if vm is not None:
            self._last[vm.id] = (memory, res.chunks, manifest["name"])
        log.info("snapshot %s of vm=%s: %s, %d bytes of memory, %d new chunks (%d bytes), frozen %.1f ms",
                 manifest["name"], manifest["vm"]["id"][:12], manifest["kind"], len(memory), new_chunks,
                 new_bytes, manifest["stats"]["frozen_ms"])
        return summary(manifest)

    # ------------------------------------------------------------------ queries
    async def list_all(self) -> list[dict[str, Any]]:
        return [summary(m) for m in await self.hv.sched.on_io(lambda: list(self.store.iter_manifests()))]

    async def get(self, name: str) -> dict[str, Any]:
        return summary(await self.hv.sched.on_io(self.store.load, name))

    async def remove(self, name: str) -> None:
        await self.hv.sched.on_io(self.store.remove, name)
        for vm_id, (_, _, n) in list(self._last.items()):
            if n == name:
                del self._last[vm_id]

    # ------------------------------------------------------------------ restore
    async def restore(self, name: str, new_name: str | None, start: bool) -> Vm:
        hv = self.hv
        m = await hv.sched.on_io(self.store.load, name)
        try:
            hv.images.resolve(m["vm"]["digest"])
        except NotFound:
            raise Unprocessable(f"snapshot {name} needs image {m['vm']['digest'][:19]}, which this daemon does "
                                f"not have: import the image, or import an export of the snapshot",
                                code="image_missing") from None
        memory = bytes(await hv.sched.on_io(self.store.assemble, m["memory"]["chunks"], m["memory"]["size"]))
        spec = VmSpec.from_dict(m["vm"]["spec"])
        spec.image = m["vm"]["digest"]
        spec.name = new_name
        spec.auto_remove = False
        await self._restore_disks(m, spec)
        data = RestoreData(memory=memory, globals={k: (v[0], v[1]) for k, v in m["globals"].items()},
                           unwound=m["kind"] == "unwound", fuel_consumed=int(m["vm"].get("fuel_consumed") or 0),
                           fuel_budget=m["vm"].get("fuel_budget"),
                           devices=m.get("devices") if isinstance(m.get("devices"), dict) else {})
        vm = await hv.create(spec, restore=data)
        vm.image_name = m["vm"].get("image_name") or vm.image_name
        log.info("restored snapshot %s as vm=%s (%s)", name, vm.id[:12], m["kind"])
        if start:
            await hv.start(vm)
        return vm

    async def _restore_disks(self, m: dict[str, Any], spec: VmSpec) -> None:
        """Give the new VM the snapshot's point-in-time disk contents."""
        if not m["disks"]:
            return
        disks = getattr(self.hv, "disks", None)
        if disks is None:
            raise Unprocessable("this snapshot has disks but the daemon has no disk device", code="no_disk_device")
        for d in m["disks"]:
            content = await self.hv.sched.on_io(self.store.assemble, d["chunks"], d["size"])
            new_name = await disks.materialize(d["name"], bytes(content))
            for ds in spec.disks:
                if ds.name == d["name"]:
                    ds.name = new_name
                    if ds.mode == "cow":
                        ds.mode = "rw"

    # ------------------------------------------------------------------ export / import
    async def export_blocks(self, name: str, only: set[str] | None = None,
                            with_image: bool = True) -> tuple[dict[str, Any], Any]:
        m = await self.hv.sched.on_io(self.store.load, name)
        chunks = sorted(self.store.referenced(m) if only is None else only)
        image = None
        if with_image:
            img = self.hv.images.resolve(m["vm"]["digest"])
            image = await self.hv.sched.on_io(self.hv.images.module_bytes, img)
        gen = transfer.export_blocks(self.store, encode_manifest(m), chunks, image, wt.WASMTIME_VERSION,
                                     self.hv.opts.fingerprint())
        return m, gen

    async def import_stream(self, readexactly: Any) -> dict[str, Any]:
        hv = self.hv
        m, _, image = await transfer.read_stream(readexactly, hv.sched.on_io, self.store, hv.cfg.upload_limit)
        if image is not None:
            img = await hv.import_image(image, None)
            if img.digest != m["vm"]["digest"]:
                raise Unprocessable("the image in the snapshot export does not match its manifest",
                                    code="invalid_snapshot")
        if self.store.exists(m["name"]):
            old = await hv.sched.on_io(self.store.load, m["name"])
            if old["created"] != m["created"] or old["vm"]["id"] != m["vm"]["id"]:
                raise Conflict(f"a different snapshot named {m['name']!r} already exists here",
                               code="snapshot_exists")
        await hv.sched.on_io(self.store.save, m, True)
        return summary(m)

    def missing(self, hashes: list[str]) -> list[str]:
        return [h for h in hashes if not self.store.has_chunk(h)]


def _device_states(vm: Vm) -> dict[str, Any]:
    """Every device part with a save() contributes its state (restored by its restore())."""
    if vm.devices is None:
        return {}
    return {name: part.save() for name, part in vm.devices.parts.items() if hasattr(part, "save")}


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
    }


async def drain(gen: Any, run_io: Any, write: Any) -> None:
    """Pull blocks from a blocking generator on I/O threads and hand them to an async writer."""
    sentinel = object()
    while True:
        block = await run_io(next, gen, sentinel)
        if block is sentinel:
            return
        await write(block)

