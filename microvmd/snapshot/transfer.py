"""The portable snapshot stream used by ``snapshot export``/``import`` and by migration.

    header   MAGIC "MVSNAPX\\0", u16 format version, u16 n + wasmtime version, u16 n + engine fingerprint
    records  u8 type, u32 length, payload, u32 CRC-32 of (type, length, payload)
               1 manifest  (the manifest file: its own magic, version, SHA-256)
               2 image     (the original module bytes, so a host without the image can restore)
               3 chunk     (32-byte SHA-256, then the chunk)
             255 end       (SHA-256 of every byte before this record)

A stream may carry only the chunks the receiver lacks (migration). Reading is bounded everywhere: the
manifest, the image and each chunk have a maximum size, the record count is bounded by the manifest, and
nothing is stored until the end record's digest matches.
"""
from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from .store import CHUNK, FORMAT_VERSION, MAX_MANIFEST, SnapshotError, SnapshotStore, decode_manifest

MAGIC = b"MVSNAPX\x00"
T_MANIFEST, T_IMAGE, T_CHUNK, T_END = 1, 2, 3, 255


def _record(kind: int, payload: bytes) -> bytes:
    head = struct.pack("<BI", kind, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + payload + struct.pack("<I", crc)


def header(wasmtime_version: str, fingerprint: str) -> bytes:
    w, f = wasmtime_version.encode(), fingerprint.encode()
    return MAGIC + struct.pack("<HH", FORMAT_VERSION, len(w)) + w + struct.pack("<H", len(f)) + f


def export_blocks(store: SnapshotStore, manifest_bytes: bytes, chunks: list[str], image: bytes | None,
                  wasmtime_version: str, fingerprint: str, batch: int = 64) -> Iterator[bytes]:
    """Yield the stream in blocks of up to ``batch`` chunks; runs on an I/O thread, one block at a time."""
    digest = hashlib.sha256()

    def out(b: bytes) -> bytes:
        digest.update(b)
        return b

    parts = [out(header(wasmtime_version, fingerprint)), out(_record(T_MANIFEST, manifest_bytes))]
    if image is not None:
        parts.append(out(_record(T_IMAGE, image)))
    yield b"".join(parts)
    for i in range(0, len(chunks), batch):
        yield b"".join(out(_record(T_CHUNK, bytes.fromhex(h) + store.get_chunk(h))) for h in chunks[i:i + batch])
    yield _record(T_END, digest.digest())


ReadExactly = Callable[[int], Awaitable[bytes]]
RunIO = Callable[..., Awaitable[Any]]


async def read_stream(readexactly: ReadExactly, run_io: RunIO, store: SnapshotStore,
                      image_limit: int) -> tuple[dict[str, Any], bytes, bytes | None]:
    """Read and verify a stream; chunks are verified and stored (content-addressed) in batches on I/O
    threads, the manifest is returned but NOT saved: the caller saves it only when everything checked out.
    Returns (manifest, manifest_bytes, image_or_None)."""
    digest = hashlib.sha256()

    async def take(n: int, what: str) -> bytes:
        try:
            data = await readexactly(n)
        except Exception as exc:  # IncompleteReadError and friends: the stream ended early
            raise SnapshotError(f"snapshot stream is truncated (while reading {what})") from exc
        return data

    head = await take(12, "the header")
    if not head.startswith(MAGIC):
        raise SnapshotError("not a microvmd snapshot export (bad magic)")
    version, wlen = struct.unpack_from("<HH", head, 8)
    if version != FORMAT_VERSION:
        raise SnapshotError(f"snapshot export format version {version} is not supported (this daemon reads "
                            f"version {FORMAT_VERSION})", code="incompatible_snapshot")
    if wlen > 64:
        raise SnapshotError("malformed snapshot header")
    wv = await take(wlen + 2, "the header")
    (flen,) = struct.unpack_from("<H", wv, wlen)
    if flen > 512:
        raise SnapshotError("malformed snapshot header")
    fp = await take(flen, "the header")
    digest.update(head + wv + fp)

    manifest: dict[str, Any] | None = None
    manifest_bytes = b""
    image: bytes | None = None
    pending: list[tuple[str, bytes]] = []
    expected: set[str] = set()
    received = 0

    async def flush() -> None:
        batch = list(pending)
        pending.clear()
        if batch:
            await run_io(_store_batch, store, batch)

    while True:
        rh = await take(5, "a record header")
        kind, length = struct.unpack("<BI", rh)
        limit = {T_MANIFEST: MAX_MANIFEST, T_IMAGE: image_limit, T_CHUNK: 32 + CHUNK, T_END: 32}.get(kind)
        if limit is None:
            raise SnapshotError(f"unknown record type {kind} in snapshot stream")
        if length > limit:
            raise SnapshotError(f"record of type {kind} is {length} bytes, above its limit of {limit}")
        payload = await take(length, "a record")
        crc = struct.unpack("<I", await take(4, "a record checksum"))[0]
        if zlib.crc32(payload, zlib.crc32(rh)) != crc:
            raise SnapshotError(f"record checksum mismatch in snapshot stream (type {kind}): corrupted or tampered")
        if kind == T_END:
            if payload != digest.digest():
                raise SnapshotError("snapshot stream digest mismatch: corrupted or tampered")
            break
        digest.update(rh + payload + struct.pack("<I", crc))
        if kind == T_MANIFEST:
            if manifest is not None:
                raise SnapshotError("snapshot stream has two manifests")
            manifest = decode_manifest(payload, "imported snapshot")
            manifest_bytes = payload
            expected = store.referenced(manifest)
        elif kind == T_IMAGE:
            if image is not None or manifest is None:
                raise SnapshotError("unexpected image record in snapshot stream")
            image = payload
        else:
            if manifest is None:
                raise SnapshotError("chunk before the manifest in snapshot stream")
            h = payload[:32].hex()
            if h not in expected:
                raise SnapshotError("snapshot stream carries a chunk its manifest does not use")
            received += 1
            if received > len(expected):
                raise SnapshotError("snapshot stream carries too many chunks")
            pending.append((h, payload[32:]))
            if len(pending) >= 64:
                await flush()
    if manifest is None:
        raise SnapshotError("snapshot stream has no manifest")
    await flush()
    missing = [h for h in expected if not store.has_chunk(h)]
    if missing:
        raise SnapshotError(f"snapshot stream lacks {len(missing)} chunk(s) this daemon does not have")
    return manifest, manifest_bytes, image


def _store_batch(store: SnapshotStore, batch: list[tuple[str, bytes]]) -> None:
    for h, data in batch:
        if hashlib.sha256(data).hexdigest() != h:
            raise SnapshotError(f"chunk {h[:16]} does not match its checksum: corrupted or tampered")
        store.put_chunk(h, data)
