"""Crash safety and a full disk: kill -9 while snapshots are written, and a state dir on a tiny tmpfs."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from snaphelp import Daemon, numbers

from microvmd.snapshot import store as st

SNAPSHOT_TIMEOUT = 30.0


def snapshot_loop(d: Daemon, vm: str, prefix: str, done: list[str], stop: threading.Event) -> None:
    i = 0
    while not stop.is_set():
        try:
            r = d.api("POST", f"/v1/vms/{vm}/snapshots", {"name": f"{prefix}{i}"}, timeout=SNAPSHOT_TIMEOUT)
        except Exception:  # the daemon died under us
            return
        if r.status == 201:
            done.append(f"{prefix}{i}")
        elif r.status >= 500:
            return
        i += 1


def plant_orphans(state: Path) -> list[Path]:
    """What a crash can leave behind: unreferenced chunk data and half-written temporary files."""
    snaps = state / "snapshots"
    data = os.urandom(5000)
    out = []
    if (snaps / "packs").is_dir():  # store v2: chunks live in pack files
        pack = snaps / "packs" / f"{uuid.uuid4().hex}.pack"
        pack.write_bytes(data)
        out.append(pack)
    else:  # store v1: a file per chunk
        h = hashlib.sha256(data).hexdigest()
        chunk = snaps / "chunks" / h[:2] / h
        chunk.parent.mkdir(parents=True, exist_ok=True)
        chunk.write_bytes(data)
        out += [chunk, chunk.with_name(f".{h}.4242.tmp")]
        out[-1].write_bytes(data[:100])
    for name in (f"{uuid.uuid4().hex}.pack", "k-half.abcdef.snap"):
        (snaps / "tmp" / name).write_bytes(b"MVSNAPM\x00 half written")
        out.append(snaps / "tmp" / name)
    return out


def stray_temp_files(tmp: Path) -> list[Path]:
    """What tmp/ holds beyond the store's spare files (empty, at most SnapshotStore.SPARES, made in advance
    for the next snapshot's pack and manifest): half-written or forgotten files."""
    files = sorted(tmp.iterdir())
    empty = [f for f in files if f.stat().st_size == 0]
    return [f for f in files if f.stat().st_size] + empty[st.SnapshotStore.SPARES:]


def check_store_consistent(d: Daemon) -> list[str]:
    """Every listed snapshot loads from disk; the stored chunk data is exactly what the manifests reference;
    nothing temporary is left. Returns the names."""
    snaps = d.state_dir / "snapshots"
    names = sorted(p.stem for p in (snaps / "manifests").glob("*.snap"))
    assert sorted(p.name for p in (snaps / "manifests").iterdir()) == [f"{n}.snap" for n in names], \
        "stray files next to the manifests"
    manifests = [st.decode_manifest((snaps / "manifests" / f"{n}.snap").read_bytes(), n) for n in names]
    if (snaps / "packs").is_dir():
        live = {p for m in manifests for p in m.get("packs", [])}
        files = {p.stem for p in (snaps / "packs").iterdir()}
        what = "packs"
    else:
        live = set()
        for m in manifests:
            live |= {c for c in m["memory"]["chunks"] if c}
            for disk in m["disks"]:
                live |= {c for c in disk["chunks"] if c}
        files = {p.name for p in (snaps / "chunks").rglob("*") if p.is_file()}
        what = "chunks"
    assert live <= files, f"{len(live - files)} referenced {what} are missing"
    assert files == live, f"{len(files - live)} unreferenced {what} survived start-up"
    assert stray_temp_files(snaps / "tmp") == []
    assert d.snapshots() == names
    return names


def kill_while_snapshotting(d: Daemon, rng: random.Random, prefix: str) -> list[str]:
    done: list[str] = []
    stop = threading.Event()
    t = threading.Thread(target=snapshot_loop, args=(d, "big", prefix, done, stop), daemon=True)
    t.start()
    end = time.monotonic() + 20
    while len(done) < 3 and time.monotonic() < end and t.is_alive():
        time.sleep(0.01)
    assert len(done) >= 3, f"snapshots do not succeed: {d.log()[-2000:]}"
    time.sleep(rng.uniform(0.0, 0.4))
    d.stop(signal.SIGKILL)
    stop.set()
    t.join(SNAPSHOT_TIMEOUT + 5)
    return done


def start_churning_vm(d: Daemon, guests: dict[str, Path]) -> None:
    d.import_image(guests["bigcounter"], "bigcounter")
    d.mv("run", "-d", "--name", "big", "--memory", "64MiB", "--env", "MEM_MB=6", "--env", "CHURN=1",
         "--env", "INTERVAL_MS=2", "bigcounter")
    d.wait_count("big", 1)


def restore_all(d: Daemon, names: list[str]) -> None:
    r = d.cli("snapshot", "inspect", *names)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert [s["name"] for s in (got if isinstance(got, list) else [got])] == names
    for i, n in enumerate(names):
        start = i == len(names) - 1
        r = d.api("POST", f"/v1/snapshots/{n}/restore", {"name": f"r-{n}", "start": start})
        assert r.status == 201, (n, r.text)
        if start:
            d.wait_count(f"r-{n}", 0)
        d.ok("DELETE", f"/v1/vms/r-{n}?force=true")


def test_kill_9_while_snapshotting_leaves_only_whole_snapshots(make_daemon, guests: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon("k", images=())
    start_churning_vm(d, guests)
    done = kill_while_snapshotting(d, random.Random(1), "k-")
    planted = plant_orphans(d.state_dir)
    d.start()
    assert "unreferenced snapshot" in d.log(), d.log()[-3000:]
    assert [p for p in planted if p.exists()] == []
    names = check_store_consistent(d)
    # every snapshot the daemon confirmed (201) survived the crash; at most the one in flight is lost
    assert set(done) <= set(names), (done, names)
    assert len(names) <= len(done) + 1
    restore_all(d, names)


@pytest.mark.slow
def test_kill_9_repeatedly_while_snapshotting(make_daemon, guests: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon("kk", images=())
    rng = random.Random(7)
    confirmed: set[str] = set()
    d.import_image(guests["bigcounter"], "bigcounter")
    for round_ in range(6):
        d.mv("run", "-d", "--name", "big", "--memory", "64MiB", "--env", "MEM_MB=6", "--env", "CHURN=1",
             "--env", f"SEED={round_}", "--env", "INTERVAL_MS=2", "bigcounter")
        d.wait_count("big", 1)
        confirmed |= set(kill_while_snapshotting(d, rng, f"k{round_}-"))
        d.start()
        names = check_store_consistent(d)
        assert confirmed <= set(names)
        d.mv("rm", "-f", "big")
    restore_all(d, check_store_consistent(d))


# ---------------------------------------------------------------------------------------------- disk full
def _mount_tmpfs(where: Path, opts: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): the disk-full test needs it")


def _umount(where: Path) -> None:
    if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(where: Path) -> Path:
    filler = where / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(os.urandom(1 << 16))
                f.flush()
        except OSError as exc:
            assert exc.errno == 28, exc
    return filler


def test_disk_full_during_snapshot(make_daemon, guests: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    mnt = make_daemon.root / "small"
    _mount_tmpfs(mnt, "size=24m")
    d = None
    try:
        d = make_daemon("full", images=(), state_dir=mnt / "state")
        d.import_image(guests["bigcounter"], "bigcounter")
        d.mv("run", "-d", "--name", "big", "--memory", "64MiB", "--env", "MEM_MB=2", "--env", "INTERVAL_MS=20",
             "bigcounter")
        d.wait_count("big", 2)
        first = json.loads(d.mv("--json", "snapshot", "create", "big", "--name", "df-1"))
        assert first["stats"]["new_chunks"] >= 32
        d.mv("snapshot", "export", "df-1", "-o", str(make_daemon.root / "df-1.snap"))
        filler = _fill(mnt)
        r = d.api("POST", "/v1/vms/big/snapshots", {"name": "df-2"})
        assert r.status == 507 and r.code == "disk_full", (r.status, r.text)
        assert "space" in r.message
        r = d.cli("snapshot", "create", "big", "--name", "df-2")
        assert r.returncode == 125 and "disk_full" in r.stderr
        # earlier snapshots intact, no half snapshot, the VM runs on
        assert d.snapshots() == ["df-1"]
        assert stray_temp_files(mnt / "state" / "snapshots" / "tmp") == []
        assert d.vm("big")["state"] == "running"
        assert json.loads(d.mv("snapshot", "inspect", "df-1"))["name"] == "df-1"
        # an import needs space too (here: only its manifest is new); the one it would replace stays
        r = d.cli("snapshot", "import", str(make_daemon.root / "df-1.snap"))
        assert r.returncode == 125 and "disk_full" in r.stderr, r.stderr
        assert json.loads(d.mv("snapshot", "inspect", "df-1"))["created"] == first["created"]
        filler.unlink()
        n = numbers(d.logs("big"))[-1]
        d.wait_count("big", n + 2)
        d.mv("snapshot", "create", "big", "--name", "df-3")
        d.mv("restore", "df-1", "--name", "big-r", "--start")
        d.wait_count("big-r", 0)
        assert sorted(d.snapshots()) == ["df-1", "df-3"]
    finally:
        if d is not None:
            d.stop(signal.SIGKILL)
        _umount(mnt)


@pytest.mark.parametrize("what", ["new-chunk-dir", "manifest-tmp"])
def test_inodes_exhausted_during_snapshot(make_daemon, guests: dict[str, Path], what: str) -> None:  # type: ignore[no-untyped-def]
    """No free inode: creating a chunk's directory, or the manifest's temporary file, fails with ENOSPC."""
    mnt = make_daemon.root / "fewinodes"
    _mount_tmpfs(mnt, "size=64m,nr_inodes=400")
    d = None
    try:
        d = make_daemon("inodes", images=(), state_dir=mnt / "state")
        d.import_image(guests["bigcounter"], "bigcounter")
        if what == "new-chunk-dir":  # running: every snapshot has new chunks, most in new directories
            d.mv("run", "-d", "--name", "big", "--memory", "64MiB", "--env", "MEM_MB=1", "--env",
                 "INTERVAL_MS=20", "bigcounter")
            d.wait_count("big", 2)
        else:  # created: a second snapshot has no new chunk, only a manifest to write
            d.mv("create", "--name", "big", "--memory", "64MiB", "--env", "MEM_MB=1", "bigcounter")
        d.mv("snapshot", "create", "big", "--name", "in-1")
        i = 0
        try:
            while True:
                (mnt / f"f{i}").touch()
                i += 1
        except OSError as exc:
            assert exc.errno == 28, exc
        # the store keeps two empty files made in advance (a pack's and a manifest's): a snapshot or two may
        # still be written into them (a snapshot with no new chunk frees its unused pack file's inode for
        # its manifest); then one that needs a file of its own is refused cleanly
        made = ["in-1"]
        for k in range(2, 6):
            r = d.api("POST", "/v1/vms/big/snapshots", {"name": f"in-{k}"})
            if r.status != 201:
                break
            made.append(f"in-{k}")
        assert r.status == 507 and r.code == "disk_full", (r.status, r.text)
        assert len(made) <= 3 and d.snapshots() == made and d.vm("big")["state"] in ("running", "created")
        assert stray_temp_files(mnt / "state" / "snapshots" / "tmp") == []
    finally:
        if d is not None:
            d.stop(signal.SIGKILL)
        _umount(mnt)


# ---------------------------------------------------------------------------------------------- bad data at rest
def _data_files(state: Path) -> list[Path]:
    snaps = state / "snapshots"
    return sorted((p for p in snaps.rglob("*")
                   if p.is_file() and p.relative_to(snaps).parts[0] not in ("manifests", "tmp")),
                  key=lambda p: p.stat().st_size)


def _rotten(make_daemon, guests: dict[str, Path]) -> Daemon:  # type: ignore[no-untyped-def]
    """A daemon with snapshot rot-1 whose chunk data was corrupted on disk while the daemon was down."""
    d = make_daemon("rot", images=())
    d.import_image(guests["bigcounter"], "bigcounter")
    d.mv("run", "-d", "--name", "big", "--memory", "64MiB", "--env", "MEM_MB=2", "bigcounter")
    d.wait_count("big", 1)
    d.mv("snapshot", "create", "big", "--name", "rot-1")
    d.stop(signal.SIGTERM)
    files = _data_files(d.state_dir)
    assert files, sorted(str(p) for p in d.state_dir.rglob("*"))
    victim = files[-1]  # the biggest: chunk data of the 2 MiB of random memory
    os.chmod(victim, 0o600)
    with open(victim, "r+b") as f:
        f.seek(victim.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))
    d.start()
    assert d.snapshots() == ["rot-1"]  # the manifest is fine
    return d


def test_snapshot_data_corrupted_at_rest_is_refused_at_restore(make_daemon, guests: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    d = _rotten(make_daemon, guests)
    r = d.api("POST", "/v1/snapshots/rot-1/restore", {"name": "rot-r", "start": True})
    assert r.status == 422 and r.code == "invalid_snapshot", (r.status, r.text)
    assert "corrupt" in r.message or "checksum" in r.message
    assert d.api("GET", "/v1/vms/rot-r").status == 404
    # an export must not ship the bad chunk as good: the client fails and leaves no file
    out = make_daemon.root / "rot.snap"
    r = d.cli("snapshot", "export", "rot-1", "-o", str(out))
    assert r.returncode == 125, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and not list(make_daemon.root.glob("rot.snap*"))


def test_export_of_corrupted_snapshot_is_a_clean_error(make_daemon, guests: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    d = _rotten(make_daemon, guests)
    r = d.cli("snapshot", "export", "rot-1", "-o", str(make_daemon.root / "rot.snap"))
    assert "corrupted" in r.stderr and "invalid_snapshot" in r.stderr, r.stderr
    r2 = d.api("GET", "/v1/snapshots/rot-1/export")
    assert r2.status == 422 and r2.code == "invalid_snapshot"


def test_refused_import_stores_nothing(make_daemon, guests: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    """A stream refused at its very end (wrong end digest) leaves no chunk data behind, even past the first
    batches of 64 chunks."""
    from snaphelp import Export, record

    src = make_daemon("src", images=())
    src.import_image(guests["bigcounter"], "bigcounter")
    src.mv("run", "-d", "--name", "big2", "--memory", "64MiB", "--env", "MEM_MB=8", "--env", "SEED=9", "bigcounter")
    src.wait_count("big2", 1)
    src.mv("snapshot", "create", "big2", "--name", "big-x")
    f = make_daemon.root / "big.snap"
    src.mv("snapshot", "export", "big-x", "-o", str(f))
    data = f.read_bytes()
    ex = Export.parse(data)
    assert sum(1 for r in ex.records if r[0] == 3) > 128
    bad = data[:ex.offsets[-1]] + record(255, bytes(32))
    (make_daemon.root / "bad.snap").write_bytes(bad)
    dst = make_daemon("dst", images=())
    def stored() -> list[Path]:  # the snapshot store's files, but its empty spares (their names change)
        snaps = dst.state_dir / "snapshots"
        return sorted(p.relative_to(snaps) for p in snaps.rglob("*")
                      if p.is_file() and not (p.parent.name == "tmp" and p.stat().st_size == 0))
    before = stored()
    r = dst.cli("snapshot", "import", str(make_daemon.root / "bad.snap"))
    assert r.returncode == 125 and "digest" in r.stderr, r.stderr
    assert stored() == before
    assert dst.snapshots() == []
    dst.mv("snapshot", "import", str(f))  # and the good one imports and restores
    dst.mv("restore", "big-x", "--name", "bx", "--start")
    dst.wait_count("bx", 0)
