"""The disk store and the disk backends: raw, sparse, file-backed images and copy-on-write overlays.

Layout: ``<state_dir>/disks/<name>.img`` (the raw image, created sparse) and ``<name>.json`` (metadata).
An upload is written to ``.<name>.upload`` and renamed over the image when complete, so a failed upload
leaves the old content.

Who may use a disk is decided here too (``claim``): a ``rw`` attachment is exclusive; ``ro`` and ``cow``
attachments share the image with each other. A ``cow`` attachment never writes the image: it writes a
sparse overlay file in the VM's directory and remembers, per 4 KiB block, which blocks it has written.

Everything that touches files is synchronous and meant for an I/O thread (store operations) or the VM's
vCPU worker (backend reads and writes); the claim table is only touched on the event loop.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..durable import sync_dir, sync_fd, write_atomic
from ..errors import BadRequest, Conflict, NotFound

log = logging.getLogger("microvmd.disks")

MODES = ("rw", "ro", "cow")
MAX_DISK_SIZE = 1 << 40  # 1 TiB: images are sparse, but a cow bitmap is size / 32 KiB bytes per VM
COW_BLOCK = 4096
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # whole names only: fullmatch (no final newline)


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BadRequest(f"invalid disk name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit", code="invalid_name")
    return name


def check_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise BadRequest("field 'size' must be a non-negative integer (bytes)", code="invalid_size")
    if size > MAX_DISK_SIZE:
        raise BadRequest(f"disk size {size} is above the maximum of {MAX_DISK_SIZE} bytes", code="invalid_size")
    return size


@dataclass
class Claim:
    vm_id: str
    vm_name: str
    index: int
    mode: str


@dataclass
class Disk:
    name: str
    size: int
    created: float
    path: Path
    claims: list[Claim] = field(default_factory=list)
    uploading: bool = False

    def writers(self) -> list[Claim]:
        return [c for c in self.claims if c.mode == "rw"]

    def to_api(self) -> dict[str, Any]:
        try:
            allocated = os.stat(self.path).st_blocks * 512
        except OSError:
            allocated = 0
        return {
            "name": self.name, "size": self.size, "allocated": allocated, "created": self.created,
            "used_by": sorted({c.vm_name for c in self.claims}),
            "attachments": [{"vm": c.vm_id, "vm_name": c.vm_name, "index": c.index, "mode": c.mode}
                            for c in self.claims],
        }


class DiskStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.disks: dict[str, Disk] = {}
        self._reserved: set[str] = set()  # names being created

    # ------------------------------------------------------------------ index (event loop)
    def load(self) -> None:
        """Read the index; drop what an interrupted upload or create left behind."""
        self.root.mkdir(parents=True, exist_ok=True)
        for p in self.root.iterdir():
            if p.name.startswith(".") and p.name.endswith(".upload"):
                p.unlink(missing_ok=True)
        for meta in sorted(self.root.glob("*.json")):
            name = meta.stem
            img = self.root / f"{name}.img"
            try:
                rec = json.loads(meta.read_text())
                size = os.stat(img).st_size
            except (OSError, ValueError) as exc:
                log.warning("skipping damaged disk %s: %s", name, exc)
                continue
            self.disks[name] = Disk(name, size, float(rec.get("created", 0.0)), img)
        log.info("loaded %d disks", len(self.disks))

    def get(self, name: str) -> Disk:
        d = self.disks.get(name)
        if d is None:
            raise NotFound(f"no such disk: {name}", code="disk_not_found")
        return d

    def all(self) -> list[Disk]:
        return sorted(self.disks.values(), key=lambda d: d.name)

    def reserve(self, name: str) -> None:
        check_name(name)
        if name in self.disks or name in self._reserved:
            raise Conflict(f"a disk named {name!r} already exists", code="disk_exists")
        self._reserved.add(name)

    def reserved(self, name: str) -> bool:
        return name in self._reserved

    def unreserve(self, name: str) -> None:
        self._reserved.discard(name)

    def added(self, disk: Disk) -> None:
        self._reserved.discard(disk.name)
        self.disks[disk.name] = disk

    def check_removable(self, name: str) -> Disk:
        d = self.get(name)
        if d.claims:
            users = ", ".join(sorted({c.vm_name for c in d.claims}))
            raise Conflict(f"disk {name} is attached to running VM(s) {users}; stop them first",
                           code="disk_in_use")
        if d.uploading:
            raise Conflict(f"disk {name} is receiving content", code="disk_busy")
        return d

    # ------------------------------------------------------------------ claims (event loop)
    def claim(self, vm_id: str, vm_name: str, wants: list[tuple[str, str]]) -> list[Disk]:
        """Claim every ``(name, mode)`` of one VM, all or nothing; device index = list position."""
        disks = [self.get(name) for name, _ in wants]
        for i, ((name, mode), disk) in enumerate(zip(wants, disks, strict=True)):
            if mode not in MODES:
                raise BadRequest(f"disk mode must be rw, ro or cow, got {mode!r}", code="invalid_field")
            if disk.uploading:
                raise Conflict(f"disk {name} is receiving content", code="disk_busy")
            writers = disk.writers()
            if writers:
                raise Conflict(f"disk {name} is attached read-write to VM {writers[0].vm_name}",
                               code="disk_busy")
            if mode == "rw" and disk.claims:
                raise Conflict(f"disk {name} is attached to VM(s) "
                               f"{', '.join(sorted({c.vm_name for c in disk.claims}))}; a read-write "
                               "attachment must be the only one (use :ro or :cow to share it)", code="disk_busy")
            same_vm = [m for j, (n, m) in enumerate(wants) if n == name and j != i]
            if same_vm and (mode == "rw" or "rw" in same_vm):
                raise Conflict(f"disk {name} is given twice to this VM, once read-write", code="disk_busy")
        for i, ((_, mode), disk) in enumerate(zip(wants, disks, strict=True)):
            disk.claims.append(Claim(vm_id, vm_name, i, mode))
        return disks

    def release(self, vm_id: str) -> None:
        for d in self.disks.values():
            d.claims = [c for c in d.claims if c.vm_id != vm_id]

    # ------------------------------------------------------------------ files (I/O thread)
    def create_files(self, name: str, size: int, durable: bool = True) -> Disk:
        """The image file, then its index entry (``<name>.json``, which is what makes it a disk at the next
        start); when ``durable``, both and the directory naming them are on stable storage on return."""
        self.root.mkdir(parents=True, exist_ok=True)
        img = self.root / f"{name}.img"
        fd = os.open(img, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)  # sparse: takes no space until written
            if durable:
                sync_fd(fd)  # (its size: an index entry must never name a shorter file after a power loss)
        except OSError:
            os.close(fd)
            img.unlink(missing_ok=True)
            raise
        os.close(fd)
        created = time.time()
        try:
            write_atomic(self.root / f"{name}.json",
                         json.dumps({"name": name, "created": created, "format": "raw"}).encode(),
                         durable=durable)  # (its directory fsync also makes the image's name durable)
        except OSError:
            img.unlink(missing_ok=True)
            raise
        return Disk(name, size, created, img)

    def remove_files(self, disk: Disk) -> None:
        (self.root / f"{disk.name}.json").unlink(missing_ok=True)
        disk.path.unlink(missing_ok=True)

    def upload_path(self, name: str) -> Path:
        return self.root / f".{name}.upload"

    def open_upload(self, name: str) -> int:
        return os.open(self.upload_path(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def finish_upload(self, disk: Disk, fd: int, length: int, durable: bool = True) -> int:
        """Pad to the disk's size (sparse), swap it in (durably: content, then the rename); returns the new
        size."""
        size = max(disk.size, length)
        try:
            os.ftruncate(fd, size)
            if durable:
                sync_fd(fd)
        finally:
            os.close(fd)
        os.replace(self.upload_path(disk.name), disk.path)
        if durable:
            sync_dir(self.root)
        return size

    def abort_upload(self, name: str, fd: int) -> None:
        try:
            os.close(fd)
        finally:
            self.upload_path(name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- backends
def _pread_full(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``offset``; a file shorter than expected reads as zeros."""
    done, n = 0, len(view)
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            view[done:] = bytes(n - done)
            return
        done += got


def _pwrite_full(fd: int, view: memoryview, offset: int) -> None:
    done, n = 0, len(view)
    while done < n:
        done += os.pwritev(fd, [view[done:]], offset + done)


class RawBackend:
    """The image itself, opened read-write (``rw``) or read-only (``ro``)."""

    def __init__(self, path: Path, size: int, writable: bool) -> None:
        self.size = size
        self.fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)

    def read_into(self, view: memoryview, offset: int) -> None:
        _pread_full(self.fd, view, offset)

    def write_from(self, view: memoryview, offset: int) -> None:
        _pwrite_full(self.fd, view, offset)

    def flush(self) -> None:
        os.fsync(self.fd)

    def private_bytes(self) -> int:
        return 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class CowBackend:
    """A private copy-on-write view of a shared image.

    Writes go to a sparse overlay file of the image's size; a bitmap marks the ``COW_BLOCK``-sized blocks
    the VM has written. A read takes each run of blocks from the overlay or from the image. A write that
    covers a block only partly first copies that block up from the image. The image is opened read-only.
    """

    def __init__(self, base: Path, overlay: Path, size: int, block: int = COW_BLOCK) -> None:
        self.size = size
        self.block = block
        nblocks = (size + block - 1) // block
        self.bitmap = bytearray((nblocks + 7) // 8)
        self.written_blocks = 0
        self.base_fd = os.open(base, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.fd = os.open(overlay, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError:
            os.close(self.base_fd)
            raise
        self.overlay = overlay
        os.ftruncate(self.fd, size)

    def _bit(self, b: int) -> bool:
        return bool(self.bitmap[b >> 3] >> (b & 7) & 1)

    def _mark(self, first: int, last: int) -> None:
        for b in range(first, last + 1):
            byte, mask = b >> 3, 1 << (b & 7)
            if not self.bitmap[byte] & mask:
                self.bitmap[byte] |= mask
                self.written_blocks += 1

    def read_into(self, view: memoryview, offset: int) -> None:
        bs, end, pos = self.block, offset + len(view), offset
        while pos < end:
            written = self._bit(pos // bs)
            run_end = min(end, (pos // bs + 1) * bs)
            while run_end < end and self._bit(run_end // bs) == written:
                run_end = min(end, run_end + bs)
            _pread_full(self.fd if written else self.base_fd, view[pos - offset:run_end - offset], pos)
            pos = run_end

    def write_from(self, view: memoryview, offset: int) -> None:
        n = len(view)
        if n == 0:
            return
        bs = self.block
        first, last = offset // bs, (offset + n - 1) // bs
        for b in {first, last}:
            start, stop = b * bs, min((b + 1) * bs, self.size)
            if not self._bit(b) and (offset > start or offset + n < stop):
                data = os.pread(self.base_fd, stop - start, start)
                os.pwrite(self.fd, data.ljust(stop - start, b"\0"), start)
        _pwrite_full(self.fd, view, offset)
        self._mark(first, last)

    def flush(self) -> None:
        os.fsync(self.fd)

    def private_bytes(self) -> int:
        return self.written_blocks * self.block

    def close(self) -> None:
        for name in ("fd", "base_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


Backend = RawBackend | CowBackend


def open_backends(disks: Iterable[Disk], modes: Iterable[str], vm_dir: Path) -> list[Backend]:
    """On an I/O thread: open one backend per attachment (all or none)."""
    out: list[Backend] = []
    try:
        for i, (disk, mode) in enumerate(zip(disks, modes, strict=True)):
            if mode == "cow":
                out.append(CowBackend(disk.path, vm_dir / f"disk{i}-{disk.name}.cow", disk.size))
            else:
                out.append(RawBackend(disk.path, disk.size, writable=(mode == "rw")))
    except BaseException:
        for b in out:
            b.close()
        raise
    return out


class Busy:
    """Closes a backend only once no vCPU call is using it (the VM may be stopped mid-call)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self.closed = False

    def enter(self) -> bool:
        with self._lock:
            if self.closed:
                return False
            self._users += 1
            return True

    def leave(self) -> bool:
        """True when the caller must now close (it was the last user of a closed set)."""
        with self._lock:
            self._users -= 1
            return self.closed and self._users == 0

    def close(self) -> bool:
        """True when nobody uses it and the caller must close now; else the last user will."""
        with self._lock:
            if self.closed:
                return False
            self.closed = True
            return self._users == 0
