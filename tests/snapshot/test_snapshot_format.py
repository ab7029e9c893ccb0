"""The snapshot formats as untrusted input: the manifest file (store.py) and the export stream (transfer.py).

The samples are real: a daemon snapshots a counter and exports it (the `sample` fixture). The parsers are
then driven directly; the stream is fed from memory through a fake `readexactly` that behaves like
asyncio.StreamReader.readexactly (IncompleteReadError at the end). Only the framing the formats document
is assumed (docs/snapshot-format.md), not the store's internal layout.
"""
from __future__ import annotations

import asyncio
import copy
import hashlib
import inspect
import io
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from snaphelp import Export

from microvmd.snapshot import store as st
from microvmd.snapshot import transfer as tr
from microvmd.snapshot.store import CHUNK, SnapshotError


def _kw(fn: Any, portable: bool) -> dict[str, Any]:
    return {"stored": False} if portable and "stored" in inspect.signature(fn).parameters else {}


def decode(raw: bytes, portable: bool = False) -> dict[str, Any]:
    return st.decode_manifest(raw, "t", **_kw(st.decode_manifest, portable))


def validate(m: Any, portable: bool = False) -> None:
    st.validate_manifest(m, "t", **_kw(st.validate_manifest, portable))


@pytest.fixture(params=["stored", "portable"])
def raw_manifest(request: pytest.FixtureRequest, sample: dict[str, bytes]) -> tuple[bytes, bool]:
    """A manifest file as the daemon stored it, and the one an export carries."""
    if request.param == "stored":
        return sample["stored"], False
    return Export.parse(sample["export"]).records[0][1], True


# ---------------------------------------------------------------------------------------------- manifest file
def test_manifest_round_trip(raw_manifest: tuple[bytes, bool]) -> None:
    raw, portable = raw_manifest
    assert raw.startswith(st.MANIFEST_MAGIC)
    m = decode(raw, portable)
    assert m["name"] == "sample-run" and m["kind"] == "unwound"
    assert st.encode_manifest(m) == raw  # stable: what was decoded encodes to the same bytes
    assert decode(st.encode_manifest(copy.deepcopy(m)), portable) == m


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_every_single_byte_flip_of_a_manifest_is_rejected(raw_manifest: tuple[bytes, bool], mask: int) -> None:
    raw, portable = raw_manifest
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= mask
        with pytest.raises(SnapshotError):
            decode(bytes(bad), portable)


def test_manifest_truncated_at_every_length_or_extended_is_rejected(raw_manifest: tuple[bytes, bool]) -> None:
    raw, portable = raw_manifest
    for n in range(len(raw)):
        with pytest.raises(SnapshotError):
            decode(raw[:n], portable)
    for extra in (b"\x00", b"junk" * 10):
        with pytest.raises(SnapshotError, match="length|truncated"):
            decode(raw + extra, portable)


def test_manifest_body_tamper_names_the_checksum(sample: dict[str, bytes]) -> None:
    raw = bytearray(sample["stored"])
    raw[14 + 5] ^= 0x20
    with pytest.raises(SnapshotError, match="checksum"):
        decode(bytes(raw))


def test_manifest_wrong_format_version_names_the_version(sample: dict[str, bytes]) -> None:
    raw = bytearray(sample["stored"])
    other = st.FORMAT_VERSION + 5
    struct.pack_into("<H", raw, 8, other)
    with pytest.raises(SnapshotError) as info:
        decode(bytes(raw))
    assert f"version {other}" in info.value.message and f"version {st.FORMAT_VERSION}" in info.value.message
    assert info.value.code == "incompatible_snapshot" and info.value.status == 422


def test_manifest_bad_magic_and_not_msgpack() -> None:
    with pytest.raises(SnapshotError, match="magic"):
        decode(b"PK\x03\x04" + bytes(60))
    body = b"\xc1\xc1\xc1"  # 0xc1 is never valid MessagePack
    raw = st.MANIFEST_MAGIC + struct.pack("<HI", st.FORMAT_VERSION, len(body)) + body + hashlib.sha256(body).digest()
    with pytest.raises(SnapshotError, match="MessagePack"):
        decode(raw)


# ---------------------------------------------------------------------------------------------- validation
_DEL = object()


def _set(m: dict[str, Any], path: list[Any], value: Any) -> None:
    cur: Any = m
    for k in path[:-1]:
        cur = cur[k]
    if value is _DEL:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value


def _first_ref(m: dict[str, Any]) -> int:
    return next(i for i, r in enumerate(m["memory"]["chunks"]) if r is not None)


def _with_disk(m: dict[str, Any], portable: bool) -> dict[str, Any] | None:
    """The manifest with a disk whose content is the memory's (so its references are valid), if it validates."""
    m = copy.deepcopy(m)
    m["disks"] = [{"index": 0, "name": "d0", "mode": "rw", "size": m["memory"]["size"],
                   "chunks": copy.deepcopy(m["memory"]["chunks"])}]
    try:
        validate(m, portable)
    except SnapshotError:
        return None
    return m


BAD_REFS = ["0F" * 32, "zz" * 32, 5, True, "../../../etc/passwd", b"\x0f" * 31, [], {"a": 1}, 1.5]

BAD_FIELDS: list[tuple[str, Any]] = [
    ("memory.size", -65536),
    ("memory.size", 1 << 41),
    ("memory.size", "131072"),
    ("memory.size", 1.5),
    ("memory.size", "+1"),
    ("memory.chunks", "drop-last"),
    ("memory.chunks", "add-one"),
    ("memory.chunks", "a string"),
    *[("memory.ref", v) for v in BAD_REFS],
    ("global", ["i16", 1]),
    ("global", ["i32"]),
    ("global", ["i32", "1"]),
    ("global", 1),
    ("kind", "running"),
    ("name", "../evil"),
    ("name", ""),
    ("name", "x" * 200),
    ("vm.digest", "sha256:" + "ab" * 31),
    ("vm.digest", "md5:" + "ab" * 32),
    ("vm.spec", _DEL),
    ("vm", "c1"),
    ("memory", []),
    ("created", "yesterday"),
    ("globals", []),
    ("disks", "d0"),
    ("disks", "too-many"),
    ("tables", []),
    ("tables", {"t": {"size": 2, "elems": [None]}}),
    ("tables", {"t": {"size": -1, "elems": []}}),
    ("tables", {"t": {"size": 1 << 30, "elems": []}}),
    ("tables", {"t": {"size": 1, "elems": [["t", -1]]}}),
    ("tables", {"t": {"size": 1, "elems": [["t"]]}}),
    ("tables", {"t": {"size": 1, "elems": [[0, 0]]}}),
    ("tables", {"t": {"size": 1, "elems": ["t"]}}),
    ("tables", {f"t{i}": {"size": 0, "elems": []} for i in range(65)}),
    ("disk.size", -1),
    ("disk.size", 1 << 41),
    ("disk.chunks", "drop-last"),
    *[("disk.ref", v) for v in BAD_REFS[:4]],
    ("disk.name", None),
    ("disk", "d0"),
]


def _mutate(m: dict[str, Any], what: str, value: Any) -> None:
    i0 = _first_ref(m)
    if what == "memory.size":
        m["memory"]["size"] = m["memory"]["size"] + 1 if value == "+1" else value
    elif what == "memory.chunks":
        ch = m["memory"]["chunks"]
        m["memory"]["chunks"] = ch[:-1] if value == "drop-last" else ch + [None] if value == "add-one" else value
    elif what == "memory.ref":
        m["memory"]["chunks"][i0] = value
    elif what == "global":
        m["globals"][next(iter(m["globals"]))] = value
    elif what == "disks" and value == "too-many":
        m["disks"] = [dict(m["disks"][0], index=i, name=f"d{i}") for i in range(65)]
    elif what.startswith("disk."):
        key = what.split(".", 1)[1]
        d = m["disks"][0]
        if key == "chunks":
            d["chunks"] = d["chunks"][:-1]
        elif key == "ref":
            d["chunks"][i0] = value
        else:
            d[key] = value
    elif what == "disk":
        m["disks"][0] = value
    else:
        _set(m, what.split("."), value)


@pytest.mark.parametrize("what,value", BAD_FIELDS, ids=[f"{w}={v!r}"[:50] for w, v in BAD_FIELDS])
def test_validate_manifest_rejects_malformed_fields(raw_manifest: tuple[bytes, bool], what: str, value: Any) -> None:
    raw, portable = raw_manifest
    base = decode(raw, portable)
    validate(base, portable)
    if what.startswith("disk") and what != "disks" or value == "too-many":
        m = _with_disk(base, portable)
        if m is None:
            pytest.skip("cannot make a valid disk entry for this manifest format")
    else:
        m = copy.deepcopy(base)
    _mutate(m, what, value)
    with pytest.raises(SnapshotError):
        validate(m, portable)
    # and through the file format, where a crafted manifest carries a valid checksum
    with pytest.raises(SnapshotError):
        decode(st.encode_manifest(m), portable)


STORED_REF_CASES = [("pack index out of range", 2, "npacks"), ("unaligned offset", 3, 1),
                    ("negative offset", 3, -CHUNK), ("wrong length", 4, CHUNK - 1), ("crc out of range", 1, 1 << 32),
                    ("short hash", 0, b"\x01" * 31), ("hex hash", 0, "ab" * 32)]


@pytest.mark.parametrize("why,pos,value", STORED_REF_CASES, ids=[c[0] for c in STORED_REF_CASES])
def test_validate_stored_chunk_locations(sample: dict[str, bytes], why: str, pos: int, value: Any) -> None:
    m = decode(sample["stored"])
    ref = m["memory"]["chunks"][_first_ref(m)]
    if not (isinstance(ref, list) and len(ref) == 5 and "packs" in m):
        pytest.skip("this store format has no chunk locations in its manifests")
    ref[pos] = len(m["packs"]) if value == "npacks" else value
    with pytest.raises(SnapshotError):
        validate(m)


def test_validate_manifest_memory_above_4gib_rejected(sample: dict[str, bytes]) -> None:
    m = decode(sample["stored"])
    size = (1 << 32) + 65536
    m["memory"]["size"] = size
    m["memory"]["chunks"] = m["memory"]["chunks"] + [None] * ((size + CHUNK - 1) // CHUNK - len(m["memory"]["chunks"]))
    with pytest.raises(SnapshotError, match="4 GiB"):
        validate(m)


@pytest.mark.parametrize("path,value", [
    (["vm", "spec"], "abc"),
    (["vm", "spec", "dirs"], "x"),
    (["vm", "fuel_consumed"], "abc"),
    (["vm", "fuel_consumed"], -1),
    (["vm", "fuel_budget"], "abc"),
    (["globals", "__stack_pointer"], ["i32", 1 << 40]),
], ids=lambda v: repr(v)[:40])
def test_validate_manifest_checks_every_field_restore_uses(sample: dict[str, bytes], path: list[str],
                                                           value: Any) -> None:
    m = decode(sample["stored"])
    assert "__stack_pointer" in m["globals"]
    _set(m, path, value)
    with pytest.raises(SnapshotError):
        validate(m)


# ---------------------------------------------------------------------------------------------- export stream
class FakeReader:
    """asyncio.StreamReader.readexactly over bytes; records every size asked for."""

    def __init__(self, data: bytes) -> None:
        self.f = io.BytesIO(data)
        self.asked: list[int] = []

    async def readexactly(self, n: int) -> bytes:
        self.asked.append(n)
        got = self.f.read(n)
        if len(got) < n:
            raise asyncio.IncompleteReadError(got, n)
        return got


async def _run_io(fn: Any, *args: Any) -> Any:
    return fn(*args)


def read(data: bytes | FakeReader, dest: Path, image_limit: int = 1 << 20) -> tuple[dict[str, Any], bytes | None]:
    """transfer.read_stream into a fresh store at ``dest``; returns (manifest, image)."""
    reader = data if isinstance(data, FakeReader) else FakeReader(data)
    store = st.SnapshotStore(dest)
    writer = None
    try:
        if "writer" in inspect.signature(tr.read_stream).parameters:
            writer = st.PackWriter(store)  # type: ignore[attr-defined]
            got = asyncio.run(tr.read_stream(reader.readexactly, _run_io, store, writer, image_limit))
        else:
            got = asyncio.run(tr.read_stream(reader.readexactly, _run_io, store, image_limit))
        return got[0], got[-1]
    finally:
        if writer is not None:
            writer.abort()
        if hasattr(store, "close"):
            store.close()


def chunk_records(ex: Export) -> list[int]:
    return [i for i, r in enumerate(ex.records) if r[0] == tr.T_CHUNK]


def test_stream_round_trip(sample: dict[str, bytes], tmp_path: Path) -> None:
    data = sample["export"]
    ex = Export.parse(data)
    assert ex.records[0][0] == tr.T_MANIFEST and ex.records[1][0] == tr.T_IMAGE and len(chunk_records(ex)) >= 2
    m, image = read(data, tmp_path / "dst")
    assert m == decode(ex.records[0][1], portable=True)
    assert image == ex.records[1][1] and image.startswith(b"\x00asm")
    assert ex.build() == data  # the test helper re-encodes faithfully


@pytest.mark.parametrize("tail", [b"x", b"trailing garbage", b"\x00" * 70000])
def test_stream_with_bytes_after_its_end_record_is_refused(sample: dict[str, bytes], tmp_path: Path,
                                                            tail: bytes) -> None:
    """Issue 13 row 10: such a stream used to be accepted."""
    with pytest.raises(SnapshotError, match="after its end record"):
        read(sample["export"] + tail, tmp_path / "dst")


def test_stream_truncated_at_many_offsets_is_refused_as_truncated(sample: dict[str, bytes], tmp_path: Path) -> None:
    data = sample["export"]
    ex = Export.parse(data)
    cuts = set(range(0, len(ex.head) + 40))
    for off in ex.offsets:
        cuts.update(range(max(0, off - 6), min(len(data), off + 40)))
    cuts.update(range(0, len(data), 997))
    cuts.add(len(data) - 1)
    for n in sorted(c for c in cuts if c < len(data)):
        with pytest.raises(SnapshotError, match="truncated"):
            read(data[:n], tmp_path / "dst")


def test_stream_flipped_payload_bytes_fail_the_record_checksum(sample: dict[str, bytes], tmp_path: Path) -> None:
    data = sample["export"]
    ex = Export.parse(data)
    positions: list[int] = []
    for off in ex.offsets:  # payload bytes and the CRC of every record, the end record included
        (length,) = struct.unpack_from("<I", data, off + 1)
        span = list(range(off + 5, off + 5 + length + 4))
        positions += span[:48] + span[-40:] + span[::4099]
    for i in sorted(set(positions)):
        bad = bytearray(data)
        bad[i] ^= 0x5A
        with pytest.raises(SnapshotError, match="checksum"):
            read(bytes(bad), tmp_path / "dst")


def test_stream_any_flipped_byte_is_refused(sample: dict[str, bytes], tmp_path: Path) -> None:
    data = sample["export_created"]
    ex = Export.parse(data)
    # every byte of the header, of the manifest record and of every record's framing; a sample of the rest
    picks = set(range(ex.offsets[1]))
    for off in ex.offsets:
        (length,) = struct.unpack_from("<I", data, off + 1)
        picks.update(range(off, off + 5 + 40))
        picks.update(range(off + 5 + length - 40, min(len(data), off + 5 + length + 4)))
    picks.update(range(0, len(data), 509))
    for i in sorted(p for p in picks if p < len(data)):
        bad = bytearray(data)
        bad[i] ^= 0xFF
        with pytest.raises(SnapshotError):
            read(bytes(bad), tmp_path / "dst")


def test_stream_header_tamper_fails_the_end_digest(sample: dict[str, bytes], tmp_path: Path) -> None:
    bad = bytearray(sample["export"])
    bad[12 + 2] ^= 0x01  # inside the wasmtime version string: only the end digest covers it
    with pytest.raises(SnapshotError, match="digest"):
        read(bytes(bad), tmp_path / "dst")


def test_stream_wrong_format_version_names_it(sample: dict[str, bytes], tmp_path: Path) -> None:
    bad = bytearray(sample["export"])
    struct.pack_into("<H", bad, 8, 9)
    with pytest.raises(SnapshotError) as info:
        read(bytes(bad), tmp_path / "dst")
    assert "version 9" in info.value.message and info.value.code == "incompatible_snapshot"


def test_stream_bad_magic(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="magic"):
        read(b"GIF89a" + bytes(100), tmp_path / "dst")


def test_stream_chunk_not_used_by_the_manifest_is_refused(sample: dict[str, bytes], tmp_path: Path) -> None:
    ex = Export.parse(sample["export"])
    extra = os.urandom(CHUNK)
    ex.records.append((tr.T_CHUNK, hashlib.sha256(extra).digest() + extra))
    with pytest.raises(SnapshotError, match="does not use"):
        read(ex.build(), tmp_path / "dst")


def test_stream_missing_chunks_are_refused(sample: dict[str, bytes], tmp_path: Path) -> None:
    ex = Export.parse(sample["export"])
    del ex.records[chunk_records(ex)[0]]
    with pytest.raises(SnapshotError, match="lacks 1 chunk"):
        read(ex.build(), tmp_path / "dst")


def test_stream_duplicate_chunks_are_refused(sample: dict[str, bytes], tmp_path: Path) -> None:
    ex = Export.parse(sample["export"])
    ex.records.append(ex.records[chunk_records(ex)[0]])
    with pytest.raises(SnapshotError, match="too many chunks|twice"):
        read(ex.build(), tmp_path / "dst")


def test_stream_chunk_content_must_match_its_hash(sample: dict[str, bytes], tmp_path: Path) -> None:
    ex = Export.parse(sample["export"])
    i = chunk_records(ex)[0]
    payload = bytearray(ex.records[i][1])
    payload[100] ^= 1
    ex.records[i] = (tr.T_CHUNK, bytes(payload))  # valid CRC and end digest: only the hash tells
    with pytest.raises(SnapshotError, match="checksum"):
        read(ex.build(), tmp_path / "dst")


def test_stream_short_chunk_record_is_refused(sample: dict[str, bytes], tmp_path: Path) -> None:
    ex = Export.parse(sample["export"])
    i = chunk_records(ex)[0]
    ex.records[i] = (tr.T_CHUNK, ex.records[i][1][:20])  # not even a whole hash
    with pytest.raises(SnapshotError):
        read(ex.build(), tmp_path / "dst")


@pytest.mark.parametrize("case", ["chunk-first", "two-manifests", "image-first", "two-images", "unknown-type",
                                  "no-manifest", "manifest-with-other-version"])
def test_stream_structure_is_checked(sample: dict[str, bytes], tmp_path: Path, case: str) -> None:
    ex = Export.parse(sample["export"])
    man, img = ex.records[0], ex.records[1]
    chunks = [ex.records[i] for i in chunk_records(ex)]
    other = bytearray(man[1])
    struct.pack_into("<H", other, 8, st.FORMAT_VERSION + 1)
    ex.records = {
        "chunk-first": [chunks[0], man, img, *chunks[1:]],
        "two-manifests": [man, man, img, *chunks],
        "image-first": [img, man, *chunks],
        "two-images": [man, img, img, *chunks],
        "unknown-type": [man, (7, b"x"), *chunks],
        "no-manifest": [],
        "manifest-with-other-version": [(tr.T_MANIFEST, bytes(other)), img, *chunks],
    }[case]
    with pytest.raises(SnapshotError):
        read(ex.build(), tmp_path / "dst")


@pytest.mark.parametrize("kind,length", [
    (tr.T_CHUNK, 32 + CHUNK + 1),
    (tr.T_MANIFEST, st.MAX_MANIFEST + 1),
    (tr.T_IMAGE, 4097),
    (tr.T_END, 33),
    (tr.T_CHUNK, 0xFFFFFFFF),
])
def test_stream_oversize_records_are_refused_before_reading_them(sample: dict[str, bytes], tmp_path: Path,
                                                                 kind: int, length: int) -> None:
    data = sample["export"]
    ex = Export.parse(data)
    prefix = data[:ex.offsets[1]] if kind in (tr.T_CHUNK, tr.T_IMAGE) else ex.head  # after a valid manifest
    reader = FakeReader(prefix + struct.pack("<BI", kind, length))  # and nothing else: no payload is sent
    with pytest.raises(SnapshotError, match="above its limit"):
        read(reader, tmp_path / "dst", image_limit=4096)
    assert length not in reader.asked
    assert max(reader.asked) <= max(len(ex.records[0][1]), 64)


def test_spare_files_carry_the_next_pack_and_manifest(sample: dict[str, bytes], tmp_path: Path) -> None:
    """The store keeps SPARES empty files in tmp/ made in advance: a pack and a manifest are written into
    them and renamed into place (no file is made on the snapshot's path), and close() removes what is
    left. Without spares the store makes its files itself."""
    store = st.SnapshotStore(tmp_path / "s")
    tmp = tmp_path / "s" / "tmp"
    try:
        store.refill_spares()
        spares = sorted(tmp.iterdir())
        assert len(spares) == st.SnapshotStore.SPARES and all(f.stat().st_size == 0 for f in spares)
        store.refill_spares()  # already full: nothing more
        assert sorted(tmp.iterdir()) == spares
        writer = st.PackWriter(store)
        assert writer.tmp in spares
        writer.write_runs([(writer.reserve(), [memoryview(b"x" * 100)])])
        pack = writer.publish()
        assert pack is not None and (tmp_path / "s" / "packs" / f"{pack}.pack").read_bytes()[:100] == b"x" * 100
        m = st.decode_manifest(sample["stored"], "sample")
        store.save(m)
        assert store.load_manifest(m["name"])["name"] == m["name"]
        assert list(tmp.iterdir()) == []  # both spares used, renamed into place
        writer = st.PackWriter(store)  # none left: it makes its own file
        assert writer.tmp.parent == tmp and writer.tmp.exists()
        writer.abort()
        store.refill_spares()
    finally:
        store.close()
    assert list(tmp.iterdir()) == []


def test_a_manifest_is_taken_unread_only_from_the_file_the_store_validated(sample: dict[str, bytes],
                                                                           tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """manifest_if_unchanged (a restore on the event loop) answers only for a manifest load_manifest read and
    validated, and only while the file is that same file, settled for RACY_NS before that read: rewritten,
    replaced by a rename or merely touched, it is read and checked again; bytes that fail are not kept."""
    store = st.SnapshotStore(tmp_path / "s")
    try:
        m = st.decode_manifest(sample["stored"], "sample")
        name = m["name"]
        store.save(m)
        assert store.manifest_if_unchanged(name) is None  # never read (and validated) by this store
        assert store.load_manifest(name)["name"] == name
        assert store.manifest_if_unchanged(name) is None  # written just now: racy, read again next time
        monkeypatch.setattr(st, "RACY_NS", -1)  # (as if the file had been settled for long)
        store.load_manifest(name)
        got = store.manifest_if_unchanged(name)
        assert got is not None and got == store.load_manifest(name)
        got["name"] = "changed by its caller"  # each answer is a fresh copy
        assert store.manifest_if_unchanged(name)["name"] == name  # type: ignore[index]
        path = store.manifest_path(name)
        raw = path.read_bytes()
        st_ = path.stat()
        os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))  # the same bytes, touched
        assert store.manifest_if_unchanged(name) is None
        store.load_manifest(name)
        assert store.manifest_if_unchanged(name) is not None
        with open(path, "r+b") as f:  # one byte flipped in place, the size kept
            f.seek(len(raw) - 1)
            f.write(bytes([raw[-1] ^ 1]))
        with pytest.raises(SnapshotError):
            store.load_manifest(name)
        assert store.manifest_if_unchanged(name) is None  # the bytes the file no longer holds are not kept
        other = path.with_name("other")
        other.write_bytes(raw)
        other.rename(path)  # the valid bytes again, in a new file
        assert store.manifest_if_unchanged(name) is None
        store.load_manifest(name)
        assert store.manifest_if_unchanged(name) is not None
        store.remove(name)
        assert store.manifest_if_unchanged(name) is None
    finally:
        store.close()
