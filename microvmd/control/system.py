"""``/v1/system``: check (and repair) the state directory, the space it uses, and pruning what nothing needs.

Like ``git fsck``: every image (its digest is its content's sha256), every snapshot manifest, every pack and
chunk a manifest names (CRC of each), every disk (index entry and image file) and every VM record (it parses,
and its image and disks exist) is checked. ``--repair`` moves what is damaged aside, under
``<state>/lost+found/<time>/``, never deletes it, and says what it did. The scan runs on an I/O thread.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import contract
from ..devices.blk import BlockDevice
from ..snapshot.controller import Snapshots
from ..snapshot.store import SnapshotError, all_refs, decode_manifest, validate_manifest
from ..vmm.manager import Hypervisor
from ..vmm.registry import unused


@dataclass
class Report:
    checked: dict[str, int] = field(default_factory=dict)
    problems: list[dict[str, Any]] = field(default_factory=list)
    repaired: list[dict[str, Any]] = field(default_factory=list)

    def problem(self, kind: str, ref: str, path: Path, what: str, severity: str = "error") -> None:
        self.problems.append({"kind": kind, "ref": ref, "path": str(path), "problem": what, "severity": severity})

    def to_api(self) -> dict[str, Any]:
        errors = sum(1 for p in self.problems if p["severity"] == "error")
        return {"clean": errors == 0, "errors": errors, "checked": self.checked, "problems": self.problems,
                "repaired": self.repaired}


def _size(path: Path) -> int:
    """Bytes allocated under ``path`` (a file or a tree)."""
    try:
        if path.is_file():
            return path.stat().st_blocks * 512
        return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    except OSError:
        return 0


class System:
    def __init__(self, hv: Hypervisor, snapshots: Snapshots) -> None:
        self.hv = hv
        self.snapshots = snapshots
        self.root = hv.cfg.state_dir

    # ------------------------------------------------------------------ check
    async def check(self, repair: bool) -> dict[str, Any]:
        async with self.snapshots.write_lock:  # no snapshot is half written while we look
            report: Report = await self.hv.sched.on_io(self._scan, repair)
        if repair:  # records of VMs still in memory are written again from what the daemon knows
            for p in report.problems:
                vm = self.hv.vms.get(p["ref"]) if p["kind"] == "vm" else None
                if vm is not None:
                    await self.hv.registry.save_now(vm)
                    report.repaired.append({"ref": p["ref"], "action": "rewrote the record from the daemon's "
                                                                     "memory"})
        return report.to_api()

    def _aside(self, report: Report, kind: str, ref: str, paths: list[Path]) -> None:
        where = self.root / "lost+found" / time.strftime("%Y%m%d-%H%M%S") / kind
        where.mkdir(parents=True, exist_ok=True)
        moved = []
        for p in paths:
            if p.exists() or p.is_symlink():
                dest = where / p.name
                os.replace(p, dest) if not dest.exists() else shutil.move(str(p), str(dest) + f".{time.time_ns()}")
                moved.append(str(dest))
        report.repaired.append({"kind": kind, "ref": ref, "action": f"moved aside to {where}", "paths": moved})

    def _scan(self, repair: bool) -> Report:
        r = Report()
        digests = self._check_images(r, repair)
        packs_used = self._check_snapshots(r, repair, digests)
        disks = self._check_disks(r, repair)
        self._check_vms(r, repair, digests, disks)
        st = self.snapshots.store
        r.checked["packs_unreferenced"] = len([p for p in st.packs.glob("*.pack")
                                                if p.stem not in packs_used and p.stem not in st.pinned])
        return r

    def _check_images(self, r: Report, repair: bool) -> set[str]:
        store = self.hv.images
        ok: set[str] = set()
        n = 0
        for d in sorted((store.root / "blobs").iterdir()):
            n += 1
            what = None
            try:
                meta = json.loads((d / "manifest.json").read_text())
                if meta.get("digest") != f"sha256:{d.name}":
                    what = "its manifest names another digest"
                elif hashlib.sha256((d / "original.wasm").read_bytes()).hexdigest() != d.name:
                    what = "original.wasm does not match its digest"
                elif not (d / "module.wasm").is_file():
                    what = "module.wasm is missing"
            except (OSError, ValueError) as exc:
                what = f"unreadable: {exc}"
            if what is None:
                ok.add(d.name)
                continue
            r.problem("image", f"sha256:{d.name}", d, what)
            if repair:
                with store._lock:
                    store.images.pop(d.name, None)
                    for name in [k for k, v in store.names.items() if v == d.name]:
                        del store.names[name]
                        (store.root / "names" / name).unlink(missing_ok=True)
                self._aside(r, "images", f"sha256:{d.name}", [d])
        for f in sorted((store.root / "names").iterdir()):
            try:
                target = f.read_text().strip()
            except OSError as exc:
                target, why = "", str(exc)
            else:
                why = f"names image sha256:{target[:12]}, which does not exist"
            if target not in ok:
                r.problem("image_name", f.name, f, why)
                if repair:
                    with store._lock:
                        store.names.pop(f.name, None)
                    self._aside(r, "image-names", f.name, [f])
        r.checked["images"] = n
        return {f"sha256:{h}" for h in ok}

    def _check_snapshots(self, r: Report, repair: bool, digests: set[str]) -> set[str]:
        st = self.snapshots.store
        used: set[str] = set()
        n = chunks = 0
        for path in sorted(st.manifests.glob("*.snap")):
            n += 1
            name = path.stem
            what = None
            try:
                m = decode_manifest(path.read_bytes(), f"snapshot {name}")
                validate_manifest(m, f"snapshot {name}")
                packs = m.get("packs", [])
                refs = all_refs(m)
                fds: dict[str, int] = {}
                try:
                    for ref in refs:
                        pack = packs[ref[2]]
                        fd = fds.get(pack)
                        if fd is None:
                            fd = fds[pack] = os.open(st.pack_path(pack), os.O_RDONLY | os.O_CLOEXEC)
                        data = os.pread(fd, ref[4], ref[3])
                        chunks += 1
                        if len(data) != ref[4] or zlib.crc32(data) != ref[1]:
                            what = f"chunk {ref[0].hex()[:16]} in pack {pack[:12]} is corrupted"
                            break
                finally:
                    for fd in fds.values():
                        os.close(fd)
            except FileNotFoundError as exc:
                what = f"a pack it needs is missing ({Path(str(exc.filename)).name})"
            except (OSError, ValueError, SnapshotError, KeyError, IndexError, TypeError) as exc:
                what = f"damaged: {exc}"
            if what is None:
                used.update(packs)
                digest = (m.get("vm") or {}).get("digest")
                if digest and digest not in digests:
                    r.problem("snapshot", name, path, f"its image {digest[:19]} is gone (cannot be restored "
                                                      f"until it is imported again)", "warning")
                continue
            r.problem("snapshot", name, path, what)
            if repair:
                self._aside(r, "snapshots", name, [path])
        r.checked["snapshots"] = n
        r.checked["chunks"] = chunks
        r.checked["packs"] = len(used)
        return used

    def _check_disks(self, r: Report, repair: bool) -> set[str]:
        dev = self.hv.devices.get(BlockDevice)
        if dev is None:
            return set()
        store = dev.store
        ok: set[str] = set()
        for meta in sorted(store.root.glob("*.json")):
            img = store.root / f"{meta.stem}.img"
            what = None
            try:
                json.loads(meta.read_text())
                if not img.is_file():
                    what = "its image file is missing"
            except (OSError, ValueError) as exc:
                what = f"unreadable index entry: {exc}"
            if what is None:
                ok.add(meta.stem)
                continue
            r.problem("disk", meta.stem, meta, what)
            if repair and not (meta.stem in store.disks and store.disks[meta.stem].claims):
                store.disks.pop(meta.stem, None)
                self._aside(r, "disks", meta.stem, [meta, img])
        for img in sorted(store.root.glob("*.img")):
            if not (store.root / f"{img.stem}.json").exists() and img.stem not in ok:
                r.problem("disk", img.stem, img, "an image file without an index entry", "warning")
        r.checked["disks"] = len(ok)
        return ok

    def _check_vms(self, r: Report, repair: bool, digests: set[str], disks: set[str]) -> None:
        root = self.root / "vms"
        n = 0
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            rec_path = d / "vm.json"
            if unused(d):
                continue  # a directory made in advance for the next create, or a create's before its record
            n += 1
            try:
                rec = contract.convert(json.loads(rec_path.read_text()), contract.VmRecord)
            except (OSError, ValueError) as exc:
                r.problem("vm", d.name, rec_path, f"damaged record: {exc}")
                if repair and d.name not in self.hv.vms:
                    self._aside(r, "vms", d.name, [d])
                continue
            if rec.digest not in digests:
                r.problem("vm", d.name, rec_path, f"its image {rec.digest[:19]} is gone", "warning")
            for disk in rec.spec.disks:
                if disk.name not in disks:
                    r.problem("vm", d.name, rec_path, f"its disk {disk.name!r} is gone", "warning")
        r.checked["vms"] = n

    # ------------------------------------------------------------------ df
    async def df(self) -> dict[str, Any]:
        return await self.hv.sched.on_io(self._df)  # type: ignore[no-any-return]

    def _df(self) -> dict[str, Any]:
        st = self.snapshots.store
        images = self.hv.images
        manifests = []
        for path in st.manifests.glob("*.snap"):
            try:
                manifests.append(decode_manifest(path.read_bytes(), path.stem))
            except (OSError, SnapshotError, ValueError):
                continue
        uses: dict[bytes, int] = {}
        sizes: dict[bytes, int] = {}
        for m in manifests:
            for ref in {bytes(r[0]): r for r in all_refs(m)}.values():
                uses[ref[0]] = uses.get(ref[0], 0) + 1
                sizes[ref[0]] = ref[4]
        shared = [h for h, k in uses.items() if k > 1]
        dev = self.hv.devices.get(BlockDevice)
        used_digests = {vm.digest for vm in self.hv.vms.values()} | {
            (m.get("vm") or {}).get("digest") for m in manifests}
        unused_images = [i for i in images.list() if i.digest not in used_digests]
        ended = [vm for vm in self.hv.vms.values() if vm.state.terminal and vm.rt.restart is None]
        return {
            "images": {"count": len(images.images), "bytes": _size(images.root),
                       "reclaimable": sum(_size(images.root / "blobs" / i.hex) for i in unused_images)},
            "snapshots": {"count": len(manifests), "bytes": _size(st.root),
                          "packs": len(list(st.packs.glob("*.pack"))), "chunks": len(uses),
                          "chunk_bytes": sum(sizes.values())},
            "shared_chunks": {"count": len(shared), "bytes": sum(sizes[h] for h in shared),
                              "saved": sum(sizes[h] * (uses[h] - 1) for h in shared)},
            "disks": {"count": len(dev.store.disks) if dev is not None else 0,
                      "bytes": _size(dev.store.root) if dev is not None else 0},
            "vms": {"count": len(self.hv.vms), "bytes": _size(self.root / "vms"),
                    "reclaimable": sum(_size(vm.dir) for vm in ended)},
            "total": _size(self.root),
        }

    # ------------------------------------------------------------------ prune
    async def prune(self, dry_run: bool) -> dict[str, Any]:
        """Ended VMs (not one waiting for its policy's restart), then images no VM and no snapshot uses,
        then packs no manifest names."""
        hv = self.hv
        vms = [vm for vm in hv.list(True) if vm.state.terminal and vm.rt.restart is None]
        freed = 0
        removed_vms = []
        for vm in vms:
            size = await hv.sched.on_io(_size, vm.dir)
            if not dry_run:
                await hv.remove(vm, force=False)
            freed += size
            removed_vms.append(vm.name)
        manifests = await hv.sched.on_io(self.snapshots.store.iter_manifests)
        left = {vm.digest for vm in hv.vms.values() if not (dry_run and vm in vms)}
        used = left | {(m.get("vm") or {}).get("digest") for m in manifests}
        removed_images = []
        for img in [i for i in hv.images.list() if i.digest not in used]:
            freed += await hv.sched.on_io(_size, hv.images.root / "blobs" / img.hex)
            removed_images.append(img.names[0] if img.names else img.digest)
            if not dry_run:
                await hv.remove_image(img.digest)
        st = self.snapshots.store
        live = {p for m in manifests for p in m.get("packs", [])}
        async with self.snapshots.write_lock:
            orphans = [p for p in st.packs.glob("*.pack") if p.stem not in live and p.stem not in st.pinned]
            for p in orphans:
                freed += p.stat().st_size
                if not dry_run:
                    await hv.sched.on_io(st.collect, {p.stem})
        return {"dry_run": dry_run, "vms": removed_vms, "images": removed_images,
                "packs": [p.stem for p in orphans], "freed_bytes": freed}
