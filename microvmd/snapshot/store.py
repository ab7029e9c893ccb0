"""Snapshot storage: content-addressed 64 KiB chunks in pack files, plus one small manifest per snapshot.

Layout under ``<state>/snapshots``::

    packs/<id>.pack          the chunks a snapshot added, each at a 64 KiB-aligned offset (so a restore
                             reads runs of chunks straight into guest memory with one preadv)
    manifests/<name>.snap    MAGIC, format version, length, MessagePack manifest, SHA-256 of it

A chunk is identified by its SHA-256; all-zero chunks are never stored; a chunk already stored (by any
snapshot of any VM) is referenced, not written again. Each reference carries the chunk's CRC-32, checked
when the chunk is read back. Packs and manifests are written to temporary names and renamed, the manifest
last: a crash or kill -9 at any moment leaves every earlier snapshot intact and no half snapshot visible.
Packs no manifest references are collected at start-up and when snapshots are removed.

Everything here is synchronous and meant for I/O threads; hashing runs in parallel on a small pool of
its own (hashlib and zlib release the GIL).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from .. import contract
from ..durable import start_writeback, sync_dir, sync_fd, sync_file, write_atomic
from ..errors import BadRequest, Conflict, InsufficientStorage, NotFound, Unprocessable

log = logging.getLogger("microvmd.snapshot")

CHUNK = 64 * 1024
FORMAT_VERSION = 2
MANIFEST_MAGIC = b"MVSNAPM\x00"
MAX_MANIFEST = 64 << 20
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # whole names only (fullmatch: no final newline)
ZERO = bytes(CHUNK)
ZERO_CRC = zlib.crc32(ZERO)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.memcmp.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in with one call instead of one fault per page
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_PROT_RW = 0x1 | 0x2
_MAP_PRIVATE_FIXED = 0x02 | 0x10
_MAP_ANONYMOUS = 0x20
_MAP_FAILED = ctypes.c_void_p(-1).value


def populate(address: int, size: int) -> None:
    """Pre-fault a page-aligned region we are about to fill (best effort; older kernels say EINVAL)."""
    if size and address % 4096 == 0:
        _libc.madvise(address, size, MADV_POPULATE_WRITE)


def fresh_buffer(size: int) -> bytearray:
    """A zeroed buffer whose pages are already faulted in, so a copy into it runs at memcpy speed."""
    buf = bytearray(size)
    if size:
        addr = ctypes.addressof((ctypes.c_char * size).from_buffer(buf))
        start = (addr + 4095) & ~4095
        populate(start, max(0, (addr + size - start) & ~4095))
    return buf


class SnapshotError(Unprocessable):
    code = "invalid_snapshot"


def _enospc(exc: OSError) -> None:
    if exc.errno == 28:
        raise InsufficientStorage("no space left on the state disk while writing the snapshot",
                                  code="disk_full") from None


# A chunk reference in a stored manifest: [sha256 (32 bytes), crc32, pack index, offset, length]; None for
# an all-zero chunk. Export streams carry [sha256, crc32] only; the receiver stores its own locations.
Ref = list[Any]


@dataclass(frozen=True)
class Loc:
    pack: str
    offset: int
    length: int
    crc: int


def encode_manifest(manifest: dict[str, Any]) -> bytes:
    body = msgpack.packb(manifest, use_bin_type=True)
    return MANIFEST_MAGIC + struct.pack("<HI", FORMAT_VERSION, len(body)) + body + hashlib.sha256(body).digest()


def decode_manifest(raw: bytes, where: str, stored: bool = True, checked: bool = False) -> dict[str, Any]:
    """A manifest file's body, its framing, checksum and contents checked; with ``checked``, bytes that were
    checked before (byte for byte: SnapshotStore.load_manifest), only decoded."""
    if checked:
        return msgpack.unpackb(raw[14:len(raw) - 32], raw=False, strict_map_key=False)  # type: ignore[no-any-return]
    if len(raw) < 14 or not raw.startswith(MANIFEST_MAGIC):
        raise SnapshotError(f"{where}: not a microvmd snapshot manifest (bad magic)")
    version, length = struct.unpack_from("<HI", raw, 8)
    if version != FORMAT_VERSION:
        raise SnapshotError(f"{where}: snapshot format version {version} is not supported "
                            f"(this daemon reads version {FORMAT_VERSION})", code="incompatible_snapshot")
    if length > MAX_MANIFEST or 14 + length + 32 != len(raw):
        raise SnapshotError(f"{where}: manifest length {length} does not match the data (truncated?)")
    body = raw[14:14 + length]
    if hashlib.sha256(body).digest() != raw[14 + length:]:
        raise SnapshotError(f"{where}: manifest checksum mismatch (corrupted or tampered)")
    try:
        manifest = msgpack.unpackb(body, raw=False, strict_map_key=False, max_bin_len=MAX_MANIFEST,
                                   max_str_len=1 << 20, max_array_len=1 << 24, max_map_len=1 << 20)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise SnapshotError(f"{where}: manifest is not valid MessagePack: {exc}") from None
    validate_manifest(manifest, where, stored)
    return manifest  # type: ignore[no-any-return]


def _refs_ok(refs: list[Any], size: int, where: str, what: str, npacks: int | None) -> None:
    """What the types cannot say of a chunk list (contract.Manifest typed it): one reference per chunk of
    ``size``, each [sha256, crc32] and, once stored, a location in one of the ``npacks`` packs."""
    if len(refs) != (size + CHUNK - 1) // CHUNK:
        raise SnapshotError(f"{where}: {what} chunk list does not match its size")
    for i, r in enumerate(refs):
        if r is None:
            continue
        expect = min(CHUNK, size - i * CHUNK)
        if not (len(r) >= 2 and isinstance(r[0], bytes) and len(r[0]) == 32
                and isinstance(r[1], int) and 0 <= r[1] < 1 << 32):
            raise SnapshotError(f"{where}: {what} has a malformed chunk reference")
        if npacks is not None:
            if not (len(r) == 5 and all(isinstance(x, int) for x in r[2:]) and 0 <= r[2] < npacks  # type: ignore[operator]
                    and r[3] >= 0 and r[3] % CHUNK == 0 and r[4] == expect):  # type: ignore[operator]
                raise SnapshotError(f"{where}: {what} has a malformed chunk location")


def validate_manifest(m: Any, where: str, stored: bool = True) -> None:
    """Snapshots are untrusted input: the whole manifest is typed by ``contract.Manifest`` (a field of the
    wrong shape names itself), then the rules across fields are checked here, with bounds."""
    if not isinstance(m, dict):
        raise SnapshotError(f"{where}: manifest is not a map")
    try:
        t = contract.check_manifest(m)
    except contract.ContractError as exc:
        raise SnapshotError(f"{where}: {exc.message.replace('invalid Manifest: ', 'manifest: ', 1)}") from None
    if not NAME_RE.fullmatch(t.name):
        raise SnapshotError(f"{where}: invalid snapshot name")
    npacks = len(t.packs) if stored else None
    if t.memory.size % 65536 or t.memory.size > (1 << 32):
        raise SnapshotError(f"{where}: memory size {t.memory.size} is not a whole number of Wasm pages ≤ 4 GiB")
    _refs_ok(t.memory.chunks, t.memory.size, where, "memory", npacks)
    bounds = {"i32": 1 << 32, "i64": 1 << 64}
    for name, (ty, value) in t.globals.items():
        if ty in bounds and not (isinstance(value, int) and -bounds[ty] // 2 <= value < bounds[ty] // 2):
            raise SnapshotError(f"{where}: global {name!r} is out of range for {ty}")
    for name, table in t.tables.items():
        if len(table.elems) != table.size:
            raise SnapshotError(f"{where}: malformed table {name!r}")
    for d in t.disks:
        _refs_ok(d.chunks, d.size, where, f"disk {d.name}", npacks)


def portable(m: dict[str, Any]) -> dict[str, Any]:
    """The manifest as it travels: chunk references without this host's pack locations."""
    out = dict(m)
    out["packs"] = []
    out["memory"] = {**m["memory"], "chunks": [r[:2] if r else None for r in m["memory"]["chunks"]]}
    out["disks"] = [{**d, "chunks": [r[:2] if r else None for r in d["chunks"]]} for d in m["disks"]]
    return out


def all_refs(m: dict[str, Any]) -> list[Ref]:
    refs = [r for r in m["memory"]["chunks"] if r]
    for d in m["disks"]:
        refs.extend(r for r in d["chunks"] if r)
    return refs


@dataclass
class Stored:
    refs: list[Ref | None]
    new_chunks: int
    new_bytes: int


class PackWriter:
    """Appends chunks to a new pack at 64 KiB-aligned offsets; ``publish`` renames it into place."""

    def __init__(self, store: SnapshotStore, durable: bool = True) -> None:
        self.store = store
        # a pack that will be fsynced goes to the disk as it is written (start_writeback), not all at publish
        self.durable = durable
        spare = store.take_spare()  # an empty file made in advance: creating one is ~1 ms on ext4
        self.tmp = spare or store.root / "tmp" / f"{uuid.uuid4().hex}.pack"
        self.id = self.tmp.stem
        try:
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CLOEXEC | (0 if spare else os.O_CREAT | os.O_EXCL), 0o600)
        except OSError as exc:  # no inodes or no space: a clear 507
            _enospc(exc)
            raise
        self.next = 0
        self.used = False

    def reserve(self) -> int:
        off = self.next
        self.next += CHUNK
        self.used = True
        return off

    def write_runs(self, runs: list[tuple[int, list[memoryview]]]) -> None:
        for off, views in runs:
            try:
                done = os.pwritev(self.fd, views, off)
            except OSError as exc:
                _enospc(exc)
                raise
            total = sum(len(v) for v in views)
            if done != total:  # rare short write: finish it piecewise
                data = b"".join(bytes(v) for v in views)
                while done < total:
                    done += os.pwrite(self.fd, data[done:], off + done)
            if self.durable:
                start_writeback(self.fd, off, total)

    def publish(self, durable: bool = True) -> str | None:
        if durable and self.used:
            sync_fd(self.fd)
        os.close(self.fd)
        if not self.used:
            self.tmp.unlink(missing_ok=True)
            return None
        os.chmod(self.tmp, 0o400)  # packs are immutable: restores map them copy-on-write
        os.replace(self.tmp, self.store.pack_path(self.id))
        if durable:
            sync_dir(self.store.packs)
        else:  # a durable snapshot that shares its chunks later syncs it first (SnapshotStore.save)
            with self.store._lock:
                self.store.unsynced.add(self.id)
        self.store.verified.add(self.id)  # every chunk in it was hashed as it was written
        return self.id

    def abort(self) -> None:
        """Drop the unpublished pack, and the index entries that pointed into it."""
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)
        self.store.forget_pack(self.id)


VALIDATED_BYTES = 16 << 20  # validated manifests kept, in bytes (the least recently used go first)
INLINE_MANIFEST = 64 << 10  # a validated manifest up to this size is decoded on the event loop
RACY_NS = 1_000_000_000  # a manifest file changed this recently is not taken unread (manifest_if_unchanged)


def _file_identity(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class SnapshotStore:
    def __init__(self, root: Path, hash_threads: int = 2) -> None:
        self.root = root
        self.packs = root / "packs"
        self._packs_prefix = f"{self.packs}{os.sep}"  # (a pathlib join costs more than the open: every restore)
        self.manifests = root / "manifests"
        self.damaged_dir = root / "damaged"  # manifests that could not be read at start-up, set aside
        for d in (self.packs, self.manifests, self.damaged_dir, root / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.index: dict[bytes, Loc] = {}
        self._pool = ThreadPoolExecutor(hash_threads, thread_name_prefix="hash")
        self.verified: set[str] = set()  # packs whose chunks were checked (or written) in this daemon's life
        # manifests as last read and validated, by name: a restore that reads the same bytes again skips the
        # checksum and the validation (~0.9 ms for an 11 MiB CPython's); other bytes are checked in full. With
        # the bytes, the file they were read from (device, inode, size, mtime, ctime), when it had not changed
        # for RACY_NS: that same file need not be read again (manifest_if_unchanged)
        self._validated: dict[str, tuple[bytes, tuple[int, ...] | None]] = {}
        self._validated_bytes = 0
        self._validated_lock = threading.Lock()
        self._spares: list[Path] = []  # empty files in tmp/, made in advance for packs and manifests
        # packs no readable manifest references, kept while a damaged manifest (which may use them) exists
        self.held: set[str] = set()
        # packs published without their fsyncs (?durable=false, a migration's import until sync_later)
        self.unsynced: set[str] = set()
        # packs an import in progress needs before its manifest is saved (not collected meanwhile): a count
        # per pack, since two imports may share one
        self.pinned: dict[str, int] = {}

    # ------------------------------------------------------------------ start-up
    def load(self) -> int:
        """Rebuild the chunk index from the manifests; remove unreferenced packs and temp files.

        A manifest that cannot be read is moved aside to ``damaged/`` (listed, removable, never read as a
        snapshot), and while any damaged manifest exists no pack is deleted as unreferenced: which packs it
        uses cannot be known, and deleting them would lose what a repair could still recover."""
        live: set[str] = set()
        for name in self.names():
            try:
                m = self.load_manifest(name)
            except (SnapshotError, OSError) as exc:
                self._set_aside(name, exc)
                continue
            except NotFound:
                continue
            packs = m.get("packs", [])
            live.update(packs)
            for r in all_refs(m):
                self.index.setdefault(r[0], Loc(packs[r[2]], r[3], r[4], r[1]))
        removed = 0
        unreferenced = [f for f in self.packs.glob("*.pack") if f.stem not in live]
        if unreferenced and self.damaged():
            self.held = {f.stem for f in unreferenced}
            log.warning("keeping %d snapshot pack(s) that no readable manifest uses: a damaged manifest may "
                        "use them (snapshot ls shows it; snapshot rm removes it)", len(self.held))
        else:
            for f in unreferenced:
                f.unlink(missing_ok=True)
                removed += 1
        for f in (self.root / "tmp").iterdir():
            f.unlink(missing_ok=True)
        return removed

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            spares, self._spares = self._spares, []
        for f in spares:
            f.unlink(missing_ok=True)

    # ------------------------------------------------------------------ spare files
    SPARES = 2  # a snapshot takes two: its pack and its manifest

    def take_spare(self) -> Path | None:
        """An empty file in tmp/ made in advance (None if there is none left): a snapshot's pack and its
        manifest are written into such files and renamed into place, so that making a file (about 1 ms
        each on ext4, most of a diff snapshot's cost) is not on the snapshot's path."""
        with self._lock:
            return self._spares.pop() if self._spares else None

    def refill_spares(self) -> None:
        """Make spare files up to SPARES (an I/O thread, after start-up and after each use). A failure
        (no space, no inodes) leaves fewer: the next snapshot makes its files itself and reports it."""
        while True:
            with self._lock:
                if len(self._spares) >= self.SPARES:
                    return
            path = self.root / "tmp" / f"{uuid.uuid4().hex}.pack"
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            except OSError:
                return
            with self._lock:
                self._spares.append(path)

    # ------------------------------------------------------------------ chunks
    def pack_path(self, pack: str) -> Path:
        return self.packs / f"{pack}.pack"

    def has_chunk(self, h: bytes) -> bool:
        with self._lock:
            return h in self.index

    def store_bytes(self, data: bytes | bytearray | memoryview, writer: PackWriter,
                    changed: Sequence[int] | None = None, parent_refs: list[Ref | None] | None = None) -> Stored:
        """Chunk ``data`` into the store. With ``changed`` (chunk indices) and ``parent_refs``, only those
        chunks are looked at; the others keep the parent's references (a diff snapshot).

        The work is split into slices run in parallel: each hashes its chunks, takes the index lock only
        to decide which chunks are new and where they go in the pack, then writes them — so hashing one
        slice overlaps writing another.
        """
        view = memoryview(data)
        nchunks = (len(view) + CHUNK - 1) // CHUNK
        if changed is None or parent_refs is None:
            which: Sequence[int] = range(nchunks)
            refs: list[Ref | None] = [None] * nchunks
        else:
            which = changed
            refs = list(parent_refs)

        def work(part: Sequence[int]) -> tuple[int, int]:
            digests: list[tuple[int, bytes, int] | None] = []
            for i in part:
                piece = view[i * CHUNK:(i + 1) * CHUNK]
                crc = zlib.crc32(piece)
                if crc == ZERO_CRC and len(piece) == CHUNK and piece == ZERO:
                    refs[i] = None
                else:
                    digests.append((i, hashlib.sha256(piece).digest(), crc))
            runs: list[tuple[int, list[memoryview]]] = []
            new = new_bytes = 0
            with self._lock:
                for d in digests:
                    assert d is not None
                    i, h, crc = d
                    loc = self.index.get(h)
                    if loc is None:
                        piece = view[i * CHUNK:(i + 1) * CHUNK]
                        off = writer.reserve()
                        loc = Loc(writer.id, off, len(piece), crc)
                        self.index[h] = loc
                        if runs and runs[-1][0] + len(runs[-1][1]) * CHUNK == off and len(runs[-1][1]) < 512:
                            runs[-1][1].append(piece)
                        else:
                            runs.append((off, [piece]))
                        new += 1
                        new_bytes += len(piece)
                    refs[i] = [h, crc, loc.pack, loc.offset, loc.length]
            writer.write_runs(runs)
            return new, new_bytes

        n = len(which)
        parts = max(1, min(16, n // 32))
        step = (n + parts - 1) // parts if n else 1
        try:
            results = list(self._pool.map(work, [which[k:k + step] for k in range(0, n, step)]))
        except BaseException:
            self.forget_pack(writer.id)
            raise
        return Stored(refs, sum(r[0] for r in results), sum(r[1] for r in results))

    def digest_refs(self, data: bytes | bytearray | memoryview) -> list[Ref | None]:
        """Portable references ([sha256, crc32] or None) of every chunk, computed in parallel, storing nothing
        (migration streams memory straight from the captured copy)."""
        view = memoryview(data)
        n = (len(view) + CHUNK - 1) // CHUNK
        refs: list[Ref | None] = [None] * n

        def work(part: range) -> None:
            for i in part:
                piece = view[i * CHUNK:(i + 1) * CHUNK]
                crc = zlib.crc32(piece)
                if not (crc == ZERO_CRC and len(piece) == CHUNK and piece == ZERO):
                    refs[i] = [hashlib.sha256(piece).digest(), crc]

        step = max(1, (n + 7) // 8)
        list(self._pool.map(work, [range(k, min(n, k + step)) for k in range(0, n, step)]))
        return refs

    def changed_chunks(self, current: int, parent: int, size: int) -> list[int]:
        """``changed_chunks`` in parallel halves (memcmp runs without the GIL)."""
        n = (size + CHUNK - 1) // CHUNK
        if n < 64:
            return changed_chunks(current, parent, size)
        half = (n // 2) * CHUNK

        def part(lo: int, hi: int) -> list[int]:
            base = lo // CHUNK
            return [base + i for i in changed_chunks(current + lo, parent + lo, hi - lo)]

        a = self._pool.submit(part, 0, half)
        b = part(half, size)
        return a.result() + b

    def collect(self, packs: set[str]) -> None:
        """Remove these packs if no manifest references them (e.g. a migration's temporary pack)."""
        self._collect(set(packs))

    def add_to_index(self, h: bytes, loc: Loc) -> None:
        """A chunk written into a pack that is not published yet (forget_pack undoes it if it never is)."""
        with self._lock:
            self.index[h] = loc

    def forget_pack(self, pack: str) -> None:
        with self._lock:
            self.unsynced.discard(pack)
            self.verified.discard(pack)  # (one id per snapshot ever taken, kept for the daemon's life)
            for h in [h for h, loc in self.index.items() if loc.pack == pack]:
                del self.index[h]

    class _Packs:
        """Read-only descriptors of the packs one operation touches, opened once each, closed together."""

        def __init__(self, store: SnapshotStore) -> None:
            self.store = store
            self.fds: dict[str, int] = {}

        def __enter__(self) -> SnapshotStore._Packs:
            return self

        def __exit__(self, *exc: object) -> None:
            for fd in self.fds.values():
                os.close(fd)

        def fd(self, pack: str) -> int:
            fd = self.fds.get(pack)
            if fd is None:
                try:
                    fd = self.fds[pack] = os.open(f"{self.store._packs_prefix}{pack}.pack", os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise SnapshotError(f"snapshot pack {pack[:12]} is missing from the store") from None
            return fd

    def map_into(self, refs: Sequence[Ref | None], size: int, address: int, packs: Sequence[str]) -> None:
        """Map the chunks copy-on-write over guest memory at ``address`` (MAP_PRIVATE | MAP_FIXED): no
        copy and no page zeroing, pages are read from the page cache when the guest touches them and
        privately copied when it writes. Packs not yet checked in this daemon's life are verified first
        (CRC-32 of every chunk); packs are immutable, so once is enough."""
        named = [(i, r, packs[r[2]] if isinstance(r[2], int) else r[2]) for i, r in enumerate(refs) if r is not None]
        unverified = {p for _, _, p in named if p not in self.verified}
        if unverified:
            self._verify_packs(unverified, [(r, p) for _, r, p in named if p in unverified])
        runs: list[list[Any]] = []  # pack, pack offset, memory offset, length
        for i, r, pack in named:
            if r[4] != CHUNK:
                raise SnapshotError("snapshot memory chunk of an odd size")
            last = runs[-1] if runs else None
            if last and last[0] == pack and last[1] + last[3] == r[3] and last[2] + last[3] == i * CHUNK:
                last[3] += CHUNK
            else:
                runs.append([pack, r[3], i * CHUNK, CHUNK])
        with self._Packs(self) as opened:
            for pack, po, mo, ln in runs:
                if mo + ln > size:
                    raise SnapshotError("snapshot chunk beyond the memory size")
                fd = opened.fd(pack)
                if os.fstat(fd).st_size < po + ln:  # a short pack would SIGBUS the guest later
                    raise SnapshotError(f"snapshot pack {pack[:12]} is truncated")
                got = _libc.mmap(address + mo, ln, _PROT_RW, _MAP_PRIVATE_FIXED, fd, po)
                if got == _MAP_FAILED or got != address + mo:
                    raise OSError(ctypes.get_errno(), "mmap of a snapshot pack failed")

    @staticmethod
    def map_zeros(refs: Sequence[Ref | None], below: int, address: int) -> None:
        """Fresh zero pages over the chunks ``refs`` has as zeros below offset ``below`` of guest memory at
        ``address`` (the instance's initial memory, which instantiation may have filled with data segments):
        one anonymous MAP_FIXED mapping per run of them. Nothing is touched, where memset would fault every
        page in (and copy those of the module's data image) only to write zeros; like map_into's, these
        mappings replace part of wasmtime's, which it unmaps whole when the store goes."""
        runs: list[list[int]] = []  # memory offset, length
        for i, r in enumerate(refs):
            if i * CHUNK >= below:
                break
            if r is None:
                if runs and runs[-1][0] + runs[-1][1] == i * CHUNK:
                    runs[-1][1] += CHUNK
                else:
                    runs.append([i * CHUNK, CHUNK])
        for mo, ln in runs:
            ln = min(ln, below - mo)
            got = _libc.mmap(address + mo, ln, _PROT_RW, _MAP_PRIVATE_FIXED | _MAP_ANONYMOUS, -1, 0)
            if got == _MAP_FAILED or got != address + mo:
                raise OSError(ctypes.get_errno(), "mmap of zero pages over guest memory failed")

    def verify_manifest(self, m: dict[str, Any]) -> None:
        """Check every chunk of the packs this manifest uses that were not checked in this daemon's life."""
        packs = m["packs"]
        named = [(r, packs[r[2]]) for r in all_refs(m)]
        unverified = {p for _, p in named if p not in self.verified}
        if unverified:
            self._verify_packs(unverified, [(r, p) for r, p in named if p in unverified])

    def _verify_packs(self, packs: set[str], refs: list[tuple[Ref, str]]) -> None:
        def check(part: list[tuple[Ref, str]]) -> None:
            with self._Packs(self) as opened:
                for r, pack in part:
                    data = os.pread(opened.fd(pack), r[4], r[3])
                    if len(data) != r[4] or zlib.crc32(data) != r[1]:
                        raise SnapshotError(f"snapshot chunk {r[0].hex()[:16]} is corrupted (checksum mismatch)")

        step = max(1, (len(refs) + 3) // 4)
        list(self._pool.map(check, [refs[k:k + step] for k in range(0, len(refs), step)]))
        self.verified |= packs

    def read_chunk(self, ref: Ref, packs: Sequence[str]) -> bytes:
        pack = packs[ref[2]] if isinstance(ref[2], int) else ref[2]
        with self._Packs(self) as opened:
            data = os.pread(opened.fd(pack), ref[4], ref[3])
        if len(data) != ref[4] or zlib.crc32(data) != ref[1]:
            raise SnapshotError(f"snapshot chunk {ref[0].hex()[:16]} is corrupted (checksum mismatch)")
        return data

    # ------------------------------------------------------------------ manifests
    def manifest_path(self, name: str) -> Path:
        return self.manifests / f"{name}.snap"

    def check_name(self, name: str) -> None:
        if not NAME_RE.fullmatch(name):
            raise BadRequest(f"invalid snapshot name {name!r}: use letters, digits, '.', '_', '-'",
                             code="invalid_name")

    def exists(self, name: str) -> bool:
        return self.manifest_path(name).exists()

    @staticmethod
    def finish(manifest: dict[str, Any]) -> dict[str, Any]:
        """A copy whose references name packs by index into a ``packs`` list (the stored form).
        In memory, references name their pack directly."""
        packs: list[str] = []
        where: dict[str, int] = {}

        def fix(refs: list[Ref | None]) -> list[Ref | None]:
            out: list[Ref | None] = []
            for r in refs:
                if r is None:
                    out.append(None)
                    continue
                if r[2] not in where:
                    where[r[2]] = len(packs)
                    packs.append(r[2])
                out.append([r[0], r[1], where[r[2]], r[3], r[4]])
            return out

        out = dict(manifest)
        out["memory"] = {**manifest["memory"], "chunks": fix(manifest["memory"]["chunks"])}
        out["disks"] = [{**d, "chunks": fix(d["chunks"])} for d in manifest["disks"]]
        out["packs"] = packs
        return out

    @staticmethod
    def named(manifest: dict[str, Any]) -> list[Ref | None]:
        """A stored manifest's memory references with pack names instead of indices."""
        packs = manifest["packs"]
        return [None if r is None else [r[0], r[1], packs[r[2]], r[3], r[4]] for r in manifest["memory"]["chunks"]]

    def store_reader(self, read_at: Callable[[int, int], bytes], size: int, writer: PackWriter) -> Stored:
        """Chunk a device read piece by piece (a disk), never holding more than one chunk."""
        refs: list[Ref | None] = []
        new = new_bytes = 0
        for off in range(0, size, CHUNK):
            piece = read_at(off, min(CHUNK, size - off))
            if piece == ZERO[:len(piece)]:
                refs.append(None)
                continue
            h, crc = hashlib.sha256(piece).digest(), zlib.crc32(piece)
            with self._lock:
                loc = self.index.get(h)
                if loc is None:
                    loc = Loc(writer.id, writer.reserve(), len(piece), crc)
                    self.index[h] = loc
                    fresh = True
                else:
                    fresh = False
            if fresh:
                writer.write_runs([(loc.offset, [memoryview(piece)])])
                new += 1
                new_bytes += len(piece)
            refs.append([h, crc, loc.pack, loc.offset, loc.length])
        return Stored(refs, new, new_bytes)

    def write_refs(self, refs: Sequence[Ref | None], size: int, fd: int, packs: Sequence[str]) -> None:
        """Write the non-zero chunks to ``fd`` at their offsets (holes stay sparse)."""
        for i, r in enumerate(refs):
            if r is not None:
                data = self.read_chunk(r, packs)
                view = memoryview(data)
                off = i * CHUNK
                while view:
                    n = os.pwrite(fd, view, off)
                    view = view[n:]
                    off += n

    def save(self, manifest: dict[str, Any], overwrite: bool = False, durable: bool = True) -> None:
        """The manifest, last of a snapshot's files: once it is in place (and, ``durable``, on stable storage
        with the packs it names) the snapshot exists."""
        name = manifest["name"]
        self.check_name(name)
        path = self.manifest_path(name)
        if path.exists() and not overwrite:
            raise Conflict(f"a snapshot named {name!r} already exists", code="snapshot_exists")
        data = encode_manifest(manifest)
        if durable:
            self._sync_packs(set(manifest.get("packs", [])))
        tmp = self.take_spare() or self.root / "tmp" / f"{name}.{uuid.uuid4().hex[:8]}.snap"
        try:
            write_atomic(path, data, tmp, durable)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            _enospc(exc)
            raise

    def _sync_packs(self, packs: set[str]) -> None:
        """Before a durable manifest: the packs it names that were published without fsync (a chunk it
        shares with a ``durable=false`` snapshot lives there) reach stable storage first."""
        with self._lock:
            pending = packs & self.unsynced
        if not pending:
            return
        for pack in pending:
            try:
                sync_file(self.pack_path(pack))
            except FileNotFoundError:  # (collected meanwhile: the manifest cannot name it then)
                pass
        sync_dir(self.packs)
        with self._lock:
            self.unsynced -= pending

    def sync_later(self, pack: str | None, name: str) -> None:
        """The fsyncs a snapshot written without ``durable`` skipped (its pack, its manifest, their
        directories); a file removed meanwhile needs none."""
        try:
            if pack is not None:
                self._sync_packs({pack})
            sync_file(self.manifest_path(name))
            sync_dir(self.manifests)
        except FileNotFoundError:
            pass

    def load_manifest(self, name: str) -> dict[str, Any]:
        self.check_name(name)
        try:
            with open(self.manifest_path(name), "rb") as f:
                st = os.fstat(f.fileno())
                raw = f.read()
        except FileNotFoundError:
            raise NotFound(f"no such snapshot: {name}", code="snapshot_not_found") from None
        # (a file changed within RACY_NS of this read could change again within the same timestamp tick
        # without its identity showing it: it is read again next time, like git's "racily clean" entries)
        ident = _file_identity(st) if time.time_ns() - st.st_ctime_ns > RACY_NS else None
        with self._validated_lock:
            kept = self._validated.pop(name, None)
            same = kept is not None and kept[0] == raw
            if same:  # (put back last: the most recently used last, the oldest go first)
                self._validated[name] = (raw, ident)
            elif kept is not None:  # the file is no longer those bytes: not kept, whatever these turn out to be
                self._validated_bytes -= len(kept[0])
        m = decode_manifest(raw, f"snapshot {name}", checked=same)  # (decoded anew: the caller's to change)
        if same:
            return m
        if len(raw) <= VALIDATED_BYTES // 8:  # (a huge one is checked each time rather than crowd out the rest)
            with self._validated_lock:
                old = self._validated.pop(name, None)
                self._validated_bytes -= len(old[0]) if old is not None else 0
                while self._validated and self._validated_bytes + len(raw) > VALIDATED_BYTES:
                    self._validated_bytes -= len(self._validated.pop(next(iter(self._validated)))[0])
                self._validated[name] = (raw, ident)
                self._validated_bytes += len(raw)
        return m

    def manifest_if_unchanged(self, name: str) -> dict[str, Any] | None:
        """The manifest ``name`` without reading its file, when this store validated it and the file is the
        one it read then (one ``stat``, so the event loop may call it); None otherwise (load_manifest reads
        and checks it). Only small manifests: decoding a big one is not for the event loop."""
        self.check_name(name)
        with self._validated_lock:
            kept = self._validated.get(name)
        if kept is None or kept[1] is None or len(kept[0]) > INLINE_MANIFEST:
            return None
        try:
            if _file_identity(os.stat(self.manifest_path(name))) != kept[1]:
                return None
        except OSError:
            return None
        with self._validated_lock:  # (a hit is a use: the most recently used last)
            if self._validated.get(name) is kept:
                self._validated[name] = self._validated.pop(name)
        return decode_manifest(kept[0], f"snapshot {name}", checked=True)  # (decoded anew: the caller's to change)

    def remove(self, name: str) -> None:
        """Remove a snapshot, or a damaged manifest set aside under that name; then collect the packs no
        manifest uses any more."""
        self.check_name(name)
        try:
            m = self.load_manifest(name)
        except SnapshotError:
            m = None
        except NotFound:
            self._remove_damaged(name)
            return
        with self._validated_lock:
            gone = self._validated.pop(name, None)
            self._validated_bytes -= len(gone[0]) if gone is not None else 0
        try:
            self.manifest_path(name).unlink()
        except FileNotFoundError:
            raise NotFound(f"no such snapshot: {name}", code="snapshot_not_found") from None
        if m is not None:
            # the removal is durable before its packs go: after a power loss, a manifest that came back
            # would name packs that are gone, a listed snapshot that cannot be restored
            sync_dir(self.manifests)
            self._collect(set(m.get("packs", [])))

    # ------------------------------------------------------------------ damaged manifests
    def _set_aside(self, name: str, exc: Exception) -> None:
        """Move an unreadable manifest to ``damaged/`` (a later one of the same name gets ``.1``, ``.2``...)."""
        target = self.damaged_dir / f"{name}.snap"
        n = 0
        while target.exists():
            n += 1
            target = self.damaged_dir / f"{name}.{n}.snap"
        try:
            os.replace(self.manifest_path(name), target)
        except OSError as move_exc:
            log.error("snapshot %s cannot be read (%s) nor set aside (%s)", name, exc, move_exc)
            return
        log.error("snapshot %s cannot be read (%s): set aside as %s; its packs are kept", name, exc, target)

    def damaged(self) -> list[dict[str, str]]:
        """The manifests set aside: name (what ``snapshot rm`` takes), why it cannot be read, where it is."""
        out = []
        for p in sorted(self.damaged_dir.glob("*.snap")):
            try:
                decode_manifest(p.read_bytes(), f"snapshot {p.stem}")
                why = "set aside at an earlier start-up"
            except (SnapshotError, OSError) as exc:
                why = exc.message if isinstance(exc, SnapshotError) else str(exc)
            out.append({"name": p.stem, "reason": why, "path": str(p)})
        return out

    def _remove_damaged(self, name: str) -> None:
        path = self.damaged_dir / f"{name}.snap"
        try:
            path.unlink()
        except FileNotFoundError:
            raise NotFound(f"no such snapshot: {name}", code="snapshot_not_found") from None
        log.info("removed damaged snapshot manifest %s", name)
        if not self.damaged() and self.held:
            held, self.held = self.held, set()
            self._collect(held)

    def pin(self, packs: set[str]) -> None:
        """Keep these packs (a manifest to be saved will use them) until ``unpin``."""
        with self._lock:
            for p in packs:
                self.pinned[p] = self.pinned.get(p, 0) + 1

    def unpin(self, packs: set[str]) -> None:
        with self._lock:
            for p in packs:
                n = self.pinned.pop(p, 0) - 1
                if n > 0:
                    self.pinned[p] = n

    def packs_of(self, refs: list[Ref]) -> set[str]:
        """The packs that hold these chunks now (every one must be in the index)."""
        with self._lock:
            return {self.index[r[0]].pack for r in refs}

    def _collect(self, candidates: set[str]) -> None:
        """Delete the candidate packs that no remaining manifest references (nor a damaged one may, nor an
        import in progress)."""
        candidates -= self.held
        candidates -= set(self.pinned)
        if not candidates:
            return
        for other in self.iter_manifests():
            candidates -= set(other.get("packs", []))
            if not candidates:
                return
        for pack in candidates:
            self.forget_pack(pack)
            self.pack_path(pack).unlink(missing_ok=True)

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.manifests.glob("*.snap"))

    def iter_manifests(self) -> list[dict[str, Any]]:
        return self.scan()[0]

    def scan(self) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        """Every readable manifest, and the ones that cannot be read (name, reason, path: as ``damaged``
        lists those set aside at start-up; a manifest rewritten since, e.g. tampered with, is one)."""
        out, bad = [], []
        for n in self.names():
            try:
                out.append(self.load_manifest(n))
            except NotFound:
                continue  # (removed meanwhile)
            except (SnapshotError, OSError) as exc:
                log.warning("skipping unreadable snapshot %s: %s", n, exc)
                bad.append({"name": n, "reason": exc.message if isinstance(exc, SnapshotError) else str(exc),
                            "path": str(self.manifest_path(n))})
        return out, bad


def memcmp(a: int, b: int, n: int) -> int:
    return int(_libc.memcmp(a, b, n))


def changed_chunks(current: int, parent: int, size: int) -> list[int]:
    """Indices of the 64 KiB chunks that differ between two buffers (by address), without copying."""
    return [i for i, off in enumerate(range(0, size, CHUNK))
            if memcmp(current + off, parent + off, min(CHUNK, size - off))]

