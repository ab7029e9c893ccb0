"""Durable by default: snapshots, images, disks and VM records are fsynced before the API acknowledges them;
``?durable=false`` opts out per request (docs/operations.md, "Durability")."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mvapi import IMAGES, Daemon


def test_snapshot_is_fsynced_unless_the_request_opts_out(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon("--import-images", str(IMAGES))
    vm = d.ok("POST", "/v1/vms", {"image": "counter", "name": "c", "start": True, "env": {"INTERVAL_MS": "20"}})
    time.sleep(0.2)
    snap = d.ok("POST", f"/v1/vms/{vm['id']}/snapshots", {"name": "s-durable"})
    assert snap["stats"]["durable"] == 1 and snap["stats"]["sync_ms"] > 0
    fast = d.ok("POST", f"/v1/vms/{vm['id']}/snapshots?durable=false", {"name": "s-fast"})
    assert fast["stats"]["durable"] == 0
    img = d.api("POST", "/v1/images?name=h2&durable=false", raw=(IMAGES / "hello/hello.wasm").read_bytes())
    assert img.status in (200, 201)
    created = d.ok("POST", "/v1/vms?durable=false", {"image": "hello", "name": "fast"})
    # what was acknowledged is there after a kill -9 of the daemon
    d.stop(signal.SIGKILL)
    d.start()
    names = {s["name"] for s in d.ok("GET", "/v1/snapshots")["snapshots"]}
    assert {"s-durable", "s-fast"} <= names
    assert d.get("c")["state"] in ("stopped", "running")
    assert d.get(created["id"])["name"] == "fast"
    restored = d.ok("POST", "/v1/snapshots/s-durable/restore", {"name": "r", "start": True})
    assert restored["state"] == "running"


def _strace_usable() -> bool:
    if shutil.which("strace") is None:
        return False
    return subprocess.run(["strace", "-qq", "-f", "-e", "trace=fsync", "true"], capture_output=True).returncode == 0


@contextmanager
def under_strace(d: Daemon, trace: Path, calls: str) -> Iterator[None]:
    """Run ``d`` under ``strace -f -y -e trace=CALLS -o TRACE``; at the end its daemon (strace's child) gets
    SIGTERM, so strace ends with it, its output complete, and no daemon outlives a failed test."""
    d.start(popen_argv=["strace", "-f", "-qq", "-y", "-e", f"trace={calls}", "-o", str(trace), *d.argv()])
    try:
        yield
    finally:
        children = Path(f"/proc/{d.pid}/task/{d.pid}/children").read_text().split()
        for child in children:
            os.kill(int(child), signal.SIGTERM)
        if d.stop(signal.SIGCONT, timeout=30.0) != 0:  # (SIGCONT changes nothing: it reaps strace)
            for child in children:
                try:
                    os.kill(int(child), signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.mark.skipif(not _strace_usable(), reason="needs strace (and ptrace allowed): scripts/setup-deps installs it")
def test_a_new_disk_is_on_stable_storage_before_the_answer(make_daemon: Callable[..., Daemon]) -> None:
    """The image file, its index entry (written under a temporary name, fsynced, then renamed) and the
    directory naming them are fsynced before `POST /v1/disks` answers; `?durable=false` skips the fsyncs.
    The daemon runs under strace, which shows each fsync with the path of its descriptor (-y)."""
    d = make_daemon(start=False)
    trace = d.root / "fsync.trace"
    with under_strace(d, trace, "fsync,fdatasync"):
        d.ok("POST", "/v1/disks", {"name": "safe", "size": 1 << 20})
        d.ok("POST", "/v1/disks?durable=false", {"name": "fast", "size": 1 << 20})
        d.ok("PUT", "/v1/disks/safe/content", raw=b"x" * 4096)
    synced = re.findall(r"f(?:data)?sync\(\d+<([^>]*)>\)\s*=\s*0", trace.read_text())
    disks = str((d.state_dir / "disks").resolve())
    assert f"{disks}/safe.img" in synced, synced
    assert f"{disks}/.safe.json.tmp" in synced, synced  # the index entry, before its rename
    assert f"{disks}/.safe.upload" in synced, synced  # the new content, before its rename
    assert synced.count(disks) >= 2, synced  # the directory: after the entry's rename and the upload's
    assert not [p for p in synced if "fast" in p], synced
    d.start()  # and what was acknowledged is there at the next start
    assert {x["name"] for x in d.ok("GET", "/v1/disks")["disks"]} == {"safe", "fast"}
    assert d.ok("GET", "/v1/disks/safe")["size"] == 1 << 20


@pytest.mark.skipif(not _strace_usable(), reason="needs strace (and ptrace allowed): scripts/setup-deps installs it")
def test_snapshot_files_reach_stable_storage_in_order(make_daemon: Callable[..., Daemon]) -> None:
    """A durable snapshot that shares chunks with a `durable=false` one fsyncs that one's pack before its own
    manifest is renamed into place; a removal fsyncs manifests/ before it deletes packs (else a power loss
    could bring back a manifest whose packs are gone: a listed snapshot that cannot be restored)."""
    d = make_daemon("--import-images", str(IMAGES), start=False)
    trace = d.root / "order.trace"
    packs = d.state_dir / "snapshots" / "packs"
    with under_strace(d, trace, "fsync,rename,renameat,renameat2,unlink,unlinkat"):
        vm = d.ok("POST", "/v1/vms", {"image": "counter", "name": "c", "start": True,
                                      "env": {"INTERVAL_MS": "5000"}})
        # asleep in its first interval before the first snapshot: one taken before its first slice (under
        # load) holds the initial memory, shares no chunk with the second, and nothing is fsynced for it
        deadline = time.monotonic() + 60
        while not d.get("c")["blocked_in"]:
            assert time.monotonic() < deadline, d.get("c")
            time.sleep(0.01)
        d.ok("POST", f"/v1/vms/{vm['id']}/snapshots?durable=false", {"name": "s-fast"})
        (fast_pack,) = [p.name for p in packs.glob("*.pack")]
        d.ok("POST", f"/v1/vms/{vm['id']}/snapshots", {"name": "s-safe"})
        d.ok("DELETE", "/v1/snapshots/s-fast")
        d.ok("DELETE", "/v1/snapshots/s-safe")
    calls = trace.read_text().splitlines()

    def first(pattern: str, after: int = -1) -> int:
        return next(i for i, c in enumerate(calls) if i > after and re.search(pattern, c))

    manifests = str((d.state_dir / "snapshots" / "manifests").resolve())
    safe_in_place = first(r"rename.*s-safe\.snap")
    assert first(rf"fsync\(\d+<[^>]*/{fast_pack}>\)") < safe_in_place, calls  # the shared pack, first
    gone = first(r"unlink.*s-safe\.snap")
    assert first(rf"fsync\(\d+<{manifests}>\)", gone) < first(r"unlink.*\.pack", gone), calls[gone:]
