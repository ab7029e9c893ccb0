"""Snapshot storage: content-addressed chunks plus one small manifest per snapshot.

Layout under ``<state>/snapshots``::

    chunks/<h[:2]>/<sha256>     64 KiB (or shorter, last) pieces of memory and disks; all-zero ones are
                                never stored; equal chunks are stored once across snapshots and VMs
    manifests/<name>.snap       MAGIC, format version, length, MessagePack manifest, SHA-256 of it

A chunk is written to a temporary name and renamed, the manifest last: a crash at any moment leaves every
earlier snapshot intact and no half snapshot visible (orphaned chunks are collected at start-up).
Everything here is synchronous, for I/O threads.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from ..errors import BadRequest, Conflict, InsufficientStorage, NotFound, Unprocessable

log = logging.getLogger("microvmd.snapshot")

CHUNK = 64 * 1024
FORMAT_VERSION = 1
MANIFEST_MAGIC = b"MVSNAPM\x00"
MAX_MANIFEST = 64 << 20
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
ZERO = bytes(CHUNK)
HEX64 = re.compile(r"^[0-9a-f]{64}$")


class SnapshotError(Unprocessable):
    code = "invalid_snapshot"


def chunk_hash(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_manifest(manifest: dict[str, Any]) -> bytes:
    body = msgpack.packb(manifest, use_bin_type=True)
    return MANIFEST_MAGIC + struct.pack("<HI", FORMAT_VERSION, len(body)) + body + hashlib.sha256(body).digest()


def decode_manifest(raw: bytes, where: str) -> dict[str, Any]:
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
    validate_manifest(manifest, where)
    return manifest  # type: ignore[no-any-return]


def _chunks_ok(chunks: Any, size: Any, where: str, what: str) -> None:
    if not isinstance(size, int) or size < 0 or size > (1 << 40):
        raise SnapshotError(f"{where}: {what} size {size!r} is out of range")
    if not isinstance(chunks, list) or len(chunks) != (size + CHUNK - 1) // CHUNK:
        raise SnapshotError(f"{where}: {what} chunk list does not match its size")
    for c in chunks:
        if c is not None and not (isinstance(c, str) and HEX64.match(c)):
            raise SnapshotError(f"{where}: {what} has a malformed chunk reference")


def validate_manifest(m: Any, where: str) -> None:
    """Snapshots are untrusted input: check every field we will use, with bounds."""
    if not isinstance(m, dict):
        raise SnapshotError(f"{where}: manifest is not a map")
    for key, typ in (("name", str), ("kind", str), ("vm", dict), ("memory", dict), ("globals", dict),
                     ("disks", list), ("created", (int, float))):
        if not isinstance(m.get(key), typ):
            raise SnapshotError(f"{where}: manifest field {key!r} is missing or of the wrong type")
    if m["kind"] not in ("created", "unwound"):
        raise SnapshotError(f"{where}: unknown snapshot kind {m['kind']!r}")
    if not NAME_RE.match(m["name"]):
        raise SnapshotError(f"{where}: invalid snapshot name")
    mem = m["memory"]
    _chunks_ok(mem.get("chunks"), mem.get("size"), where, "memory")
    if mem["size"] % 65536 or mem["size"] > (1 << 32):
        raise SnapshotError(f"{where}: memory size {mem['size']} is not a whole number of Wasm pages ≤ 4 GiB")
    for name, v in m["globals"].items():
        if not (isinstance(name, str) and isinstance(v, list) and len(v) == 2 and v[0] in ("i32", "i64", "f32", "f64")
                and isinstance(v[1], (int, float))):
            raise SnapshotError(f"{where}: malformed global {name!r}")
    if len(m["disks"]) > 64:
        raise SnapshotError(f"{where}: too many disks")
    for d in m["disks"]:
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise SnapshotError(f"{where}: malformed disk entry")
        _chunks_ok(d.get("chunks"), d.get("size"), where, f"disk {d.get('name')}")
    vm = m["vm"]
    for key in ("spec", "digest"):
        if key not in vm:
            raise SnapshotError(f"{where}: manifest has no vm.{key}")
    if not isinstance(vm["digest"], str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", vm["digest"]):
        raise SnapshotError(f"{where}: malformed image digest")


@dataclass
class ChunkingResult:
    chunks: list[str | None]
    new_chunks: int
    new_bytes: int


class SnapshotStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.chunks = root / "chunks"
        self.manifests = root / "manifests"
        for d in (self.chunks, self.manifests, root / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._known: set[str] = set()

    # ------------------------------------------------------------------ chunks
    def chunk_path(self, h: str) -> Path:
        return self.chunks / h[:2] / h

    def has_chunk(self, h: str) -> bool:
        if h in self._known:
            return True
        if self.chunk_path(h).exists():
            self._known.add(h)
            return True
        return False

    def put_chunk(self, h: str, data: bytes | memoryview) -> bool:
        """Store a chunk under its hash; False if it was already there."""
        if self.has_chunk(h):
            return False
        path = self.chunk_path(h)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{h}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == 28:
                raise InsufficientStorage("no space left on the state disk while writing the snapshot",
                                          code="disk_full") from None
            raise
        self._known.add(h)
        return True

    def get_chunk(self, h: str) -> bytes:
        try:
            data = self.chunk_path(h).read_bytes()
        except FileNotFoundError:
            raise SnapshotError(f"snapshot chunk {h[:16]} is missing from the store") from None
        if len(data) > CHUNK or chunk_hash(data) != h:
            raise SnapshotError(f"snapshot chunk {h[:16]} is corrupted (checksum mismatch)")
        return data

    def store_bytes(self, data: bytes | memoryview, previous: bytes | None = None,
                    previous_chunks: list[str | None] | None = None) -> ChunkingResult:
        """Split into chunks, skip zero chunks; with ``previous`` (same layout), unchanged chunks are not
        even hashed again, which is what makes a diff snapshot cheap."""
        view = memoryview(data)
        out: list[str | None] = []
        new = new_bytes = 0
        for i, off in enumerate(range(0, len(view), CHUNK)):
            piece = view[off:off + CHUNK]
            if previous is not None and previous_chunks is not None and i < len(previous_chunks) \
                    and previous[off:off + CHUNK] == piece:
                out.append(previous_chunks[i])
                continue
            if piece == ZERO[:len(piece)]:
                out.append(None)
                continue
            h = chunk_hash(piece)
            if self.put_chunk(h, piece):
                new += 1
                new_bytes += len(piece)
            out.append(h)
        return ChunkingResult(out, new, new_bytes)

    def assemble(self, chunks: list[str | None], size: int) -> bytearray:
        buf = bytearray(size)
        for i, h in enumerate(chunks):
            if h is not None:
                data = self.get_chunk(h)
                off = i * CHUNK
                expect = min(CHUNK, size - off)
                if len(data) != expect:
                    raise SnapshotError(f"snapshot chunk {h[:16]} has {len(data)} bytes, expected {expect}")
                buf[off:off + expect] = data
        return buf

    # ------------------------------------------------------------------ manifests
    def manifest_path(self, name: str) -> Path:
        return self.manifests / f"{name}.snap"

    def check_name(self, name: str) -> None:
        if not NAME_RE.match(name):
            raise BadRequest(f"invalid snapshot name {name!r}: use letters, digits, '.', '_', '-'",
                             code="invalid_name")

    def exists(self, name: str) -> bool:
        return self.manifest_path(name).exists()

    def save(self, manifest: dict[str, Any], overwrite: bool = False) -> None:
        name = manifest["name"]
        self.check_name(name)
        path = self.manifest_path(name)
        if path.exists() and not overwrite:
            raise Conflict(f"a snapshot named {name!r} already exists", code="snapshot_exists")
        data = encode_manifest(manifest)
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix=f"{name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dfd = os.open(self.manifests, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            if exc.errno == 28:
                raise InsufficientStorage("no space left on the state disk while writing the snapshot",
                                          code="disk_full") from None
            raise

    def load(self, name: str) -> dict[str, Any]:
        self.check_name(name)
        try:
            raw = self.manifest_path(name).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no such snapshot: {name}", code="snapshot_not_found") from None
        return decode_manifest(raw, f"snapshot {name}")

    def remove(self, name: str) -> None:
        self.check_name(name)
        try:
            self.manifest_path(name).unlink()
        except FileNotFoundError:
            raise NotFound(f"no such snapshot: {name}", code="snapshot_not_found") from None

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.manifests.glob("*.snap"))

    def iter_manifests(self) -> Iterator[dict[str, Any]]:
        for n in self.names():
            try:
                yield self.load(n)
            except (SnapshotError, NotFound) as exc:
                log.warning("skipping unreadable snapshot %s: %s", n, exc)

    def referenced(self, m: dict[str, Any]) -> set[str]:
        refs = {c for c in m["memory"]["chunks"] if c}
        for d in m["disks"]:
            refs.update(c for c in d["chunks"] if c)
        return refs

    def collect_garbage(self, min_age: float = 0.0) -> int:
        """Remove chunks no manifest references (left by a crash, or by removed snapshots).

        Run at start-up (nothing is being written then); ``min_age`` protects chunks of snapshots that are
        being written when run later.
        """
        live: set[str] = set()
        for m in self.iter_manifests():
            live |= self.referenced(m)
        removed = 0
        cutoff = time.time() - min_age
        for sub in self.chunks.iterdir():
            for f in sub.iterdir():
                if f.name in live or f.stat().st_mtime > cutoff:
                    continue
                f.unlink(missing_ok=True)
                self._known.discard(f.name)
                removed += 1
        for f in (self.root / "tmp").iterdir():
            f.unlink(missing_ok=True)
        return removed
