"""The portable snapshot stream used by ``snapshot export``/``import`` and by migration.

    header   MAGIC "MVSNAPX\\0", u16 format version, u16 n + wasmtime version, u16 n + engine fingerprint
    records  u8 type, u32 length, payload, u32 CRC-32 of (type, length, payload)
               1 manifest  (the portable manifest: chunk references without pack locations)
               2 image     (the original module bytes, so a host without the image can restore)
               3 chunk     (32-byte SHA-256, then the chunk)
             255 end       (SHA-256 over the header and every record's type, length and CRC-32)

A stream may carry only the chunks the receiver lacks (migration). Reading is bounded everywhere: the
manifest, the image and each chunk have a maximum size, the record count is bounded by the manifest, each
chunk must hash to its name, and the manifest is stored only when the end record's digest matches. The
end digest covers each record's CRC (not its payload again): a changed byte fails its record's CRC, and a
dropped, added or reordered record fails the digest.
"""
from __future__ import annotations

import asyncio
import hashlib
import struct
import zlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from .store import (
    CHUNK,
    FORMAT_VERSION,
    MAX_MANIFEST,
    Loc,
    PackWriter,
    Ref,
    SnapshotError,
    SnapshotStore,
    all_refs,
    decode_manifest,
)

MAGIC = b"MVSNAPX\x00"
T_MANIFEST, T_IMAGE, T_CHUNK, T_END = 1, 2, 3, 255


def _record(kind: int, payload: bytes, digest: Any = None) -> bytes:
    head = struct.pack("<BI", kind, len(payload))
    tail = struct.pack("<I", zlib.crc32(payload, zlib.crc32(head)))
    if digest is not None:
        digest.update(head + tail)
    return head + payload + tail


def header(wasmtime_version: str, fingerprint: str) -> bytes:
    w, f = wasmtime_version.encode(), fingerprint.encode()
    return MAGIC + struct.pack("<HH", FORMAT_VERSION, len(w)) + w + struct.pack("<H", len(f)) + f


ChunkSource = tuple[bytes, Callable[[], bytes | memoryview]]  # (sha256, function returning the bytes)


def from_store(store: SnapshotStore, refs: Sequence[Ref], packs: Sequence[str]) -> list[ChunkSource]:
    return [(r[0], lambda r=r: store.read_chunk(r, packs)) for r in refs]  # type: ignore[misc]


def export_blocks(store: SnapshotStore, manifest_bytes: bytes, chunks: Sequence[ChunkSource],
                  image: bytes | None, wasmtime_version: str, fingerprint: str, batch: int = 64) -> Iterator[bytes]:
    """Yield the stream in blocks of up to ``batch`` chunks; runs on an I/O thread, one block at a time."""
    head = header(wasmtime_version, fingerprint)
    digest = hashlib.sha256(head)
    parts = [head, _record(T_MANIFEST, manifest_bytes, digest)]
    if image is not None:
        parts.append(_record(T_IMAGE, image, digest))
    yield b"".join(parts)
    for i in range(0, len(chunks), batch):
        yield b"".join(_record(T_CHUNK, h + bytes(get()), digest) for h, get in chunks[i:i + batch])
    yield _record(T_END, digest.digest())


ReadExactly = Callable[[int], Awaitable[bytes]]
RunIO = Callable[..., Awaitable[Any]]


async def read_stream(readexactly: ReadExactly, run_io: RunIO, store: SnapshotStore, writer: PackWriter,
                      image_limit: int) -> tuple[dict[str, Any], bytes | None]:
    """Read and verify a stream. Chunks are verified (SHA-256) and written to ``writer``'s pack in batches
    on I/O threads; the (portable) manifest is returned, not saved: the caller saves it once everything
    checked out. Returns (manifest, image or None)."""
    digest = hashlib.sha256()

    async def take(n: int, what: str) -> bytes:
        try:
            return await readexactly(n)
        except Exception as exc:  # IncompleteReadError and friends: the stream ended early
            raise SnapshotError(f"snapshot stream is truncated (while reading {what})") from exc

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
    image: bytes | None = None
    pending: list[tuple[bytes, bytes]] = []
    expected: dict[bytes, int] = {}  # hash -> crc32
    received: set[bytes] = set()

    inflight: list[Any] = []  # verifying and writing overlaps receiving (at most two batches at a time)

    async def flush(final: bool = False) -> None:
        batch = list(pending)
        pending.clear()
        if batch:
            inflight.append(asyncio.ensure_future(run_io(_store_batch, store, writer, batch, expected)))
        while inflight and (final or len(inflight) > 2):
            await inflight.pop(0)

    try:
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
                await _at_end(readexactly)
                break
            digest.update(rh + struct.pack("<I", crc))
            if kind == T_MANIFEST:
                if manifest is not None:
                    raise SnapshotError("snapshot stream has two manifests")
                manifest = decode_manifest(payload, "imported snapshot", stored=False)
                expected = {r[0]: r[1] for r in all_refs(manifest)}
            elif kind == T_IMAGE:
                if image is not None or manifest is None:
                    raise SnapshotError("unexpected image record in snapshot stream")
                image = payload
            else:
                if manifest is None:
                    raise SnapshotError("chunk before the manifest in snapshot stream")
                h = payload[:32]
                if h not in expected:
                    raise SnapshotError("snapshot stream carries a chunk its manifest does not use")
                if h in received:
                    raise SnapshotError("snapshot stream carries a chunk twice")
                received.add(h)
                pending.append((h, payload[32:]))
                if len(pending) >= 64:
                    await flush()
        if manifest is None:
            raise SnapshotError("snapshot stream has no manifest")
        await flush(final=True)
    except BaseException:
        await asyncio.gather(*inflight, return_exceptions=True)  # let running writes finish first
        raise
    missing = [h for h in expected if not store.has_chunk(h)]
    if missing:
        raise SnapshotError(f"snapshot stream lacks {len(missing)} chunk(s) this daemon does not have")
    return manifest, image


async def _at_end(readexactly: ReadExactly) -> None:
    """After the end record the stream must end: bytes after it are not covered by its digest, and a
    stream is accepted whole or not at all."""
    try:
        extra = await readexactly(1)
    except Exception:  # IncompleteReadError at the end of the body: what a whole stream does
        return
    if extra:
        raise SnapshotError("snapshot stream has bytes after its end record: refused")


def _store_batch(store: SnapshotStore, writer: PackWriter, batch: list[tuple[bytes, bytes]],
                 expected: dict[bytes, int]) -> None:
    runs: list[tuple[int, list[memoryview]]] = []
    for h, data in batch:
        if hashlib.sha256(data).digest() != h or zlib.crc32(data) != expected[h]:
            raise SnapshotError(f"chunk {h.hex()[:16]} does not match its checksum: corrupted or tampered")
        if store.has_chunk(h):
            continue
        off = writer.reserve()
        runs.append((off, [memoryview(data)]))
        store.add_to_index(h, Loc(writer.id, off, len(data), expected[h]))
    try:
        writer.write_runs(runs)
    except BaseException:
        store.forget_pack(writer.id)
        raise
