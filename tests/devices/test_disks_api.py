"""`microvm disk create/ls/rm` and the /v1/disks routes, through a real daemon and the real client."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mvapi import IMAGES, free_port, line_rpc
from test_blk import HOLD, Daemon, guest, mvd  # noqa: F401  (mvd is a fixture)


def test_create_ls_rm_through_the_client(mvd: Daemon) -> None:  # noqa: F811
    r = mvd.cli("disk", "create", "data", "--size", "64MiB")
    assert r.returncode == 0 and r.stdout.strip() == "data", r
    r = mvd.cli("disk", "ls")
    assert r.returncode == 0 and "data" in r.stdout and "64MiB" in r.stdout, r
    disks = json.loads(mvd.cli("--json", "disk", "ls").stdout)["disks"]
    d = next(x for x in disks if x["name"] == "data")
    assert d["size"] == 64 << 20 and d["allocated"] < 1 << 20 and d["used_by"] == []
    img = mvd.state_dir / "disks" / "data.img"
    assert img.stat().st_size == 64 << 20 and img.stat().st_blocks * 512 < 1 << 20  # sparse
    r = mvd.cli("disk", "create", "data", "--size", "1MiB")
    assert r.returncode == 125 and "already exists" in r.stderr, r
    r = mvd.cli("disk", "create", "../evil", "--size", "1MiB")
    assert r.returncode == 125 and "invalid disk name" in r.stderr, r
    r = mvd.cli("disk", "rm", "data")
    assert r.returncode == 0, r
    assert not img.exists() and "data" not in mvd.cli("disk", "ls").stdout
    r = mvd.cli("disk", "rm", "data")
    assert r.returncode == 125 and "no such disk" in r.stderr, r


def test_create_from_a_file_uploads_its_content(mvd: Daemon, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "seed.img"
    content = os.urandom(3 << 20) + b"tail"
    src.write_bytes(content)
    r = mvd.cli("disk", "create", "seed", "--from", str(src))
    assert r.returncode == 0 and r.stdout.strip() == "seed", r
    disk = mvd.ok("GET", "/v1/disks/seed")
    assert disk["size"] == len(content)
    assert (mvd.state_dir / "disks" / "seed.img").read_bytes() == content
    # --size above the file's: the rest reads as zeros (and takes no space); below it: the file's size wins
    r = mvd.cli("disk", "create", "seed-big", "--size", "16MiB", "--from", str(src))
    assert r.returncode == 0, r
    data = (mvd.state_dir / "disks" / "seed-big.img").read_bytes()
    assert len(data) == 16 << 20 and data[:len(content)] == content and not any(data[len(content):])
    r = mvd.cli("disk", "create", "seed-small", "--size", "4KiB", "--from", str(src))
    assert r.returncode == 0, r
    assert mvd.ok("GET", "/v1/disks/seed-small")["size"] == len(content)
    # a guest reads what was uploaded
    img = mvd.image("tailreader", guest(f"""
    (call $n32 (call $read (i32.const 0) (i64.const {len(content) - 4}) (i32.const 8192) (i32.const 100)))
    (call $out (i32.const 8192) (i32.const 4))"""))
    assert mvd.run(img, [{"name": "seed", "mode": "ro"}])[1] == ["4", "tail"]
    r = mvd.cli("disk", "create", "nope", "--from", str(tmp_path / "missing.img"))
    assert r.returncode != 0 and "missing.img" in r.stderr, r
    assert "nope" not in mvd.cli("disk", "ls").stdout


def test_disk_in_use_is_refused(mvd: Daemon, tmp_path: Path) -> None:  # noqa: F811
    mvd.disk("busy", 1 << 20)
    hold = tmp_path / "hold.wat"
    hold.write_text(guest(HOLD))
    r = mvd.cli("image", "import", str(hold), "--name", "holder")
    assert r.returncode == 0, r
    r = mvd.cli("run", "-d", "--name", "keeper", "--disk", "busy", "holder")
    assert r.returncode == 0, r
    r = mvd.cli("disk", "rm", "busy")
    assert r.returncode == 125 and "keeper" in r.stderr, r
    assert mvd.err(409, "DELETE", "/v1/disks/busy") == "disk_in_use"
    assert mvd.err(409, "PUT", "/v1/disks/busy/content", raw=b"x") == "disk_in_use"
    r = mvd.cli("run", "--disk", "busy:ro", "holder")
    assert r.returncode == 125 and "read-write" in r.stderr, r
    assert mvd.ok("GET", "/v1/disks/busy")["attachments"] == [
        {"vm": mvd.ok("GET", "/v1/vms/keeper")["id"], "vm_name": "keeper", "index": 0, "mode": "rw"}]
    assert mvd.cli("stop", "keeper").returncode == 0
    r = mvd.cli("disk", "rm", "busy")
    assert r.returncode == 0, r


def test_api_validation(mvd: Daemon) -> None:  # noqa: F811
    assert mvd.err(400, "POST", "/v1/disks", {"name": "x", "size": 1, "from": "/etc/passwd"}) == "invalid_field"
    assert mvd.err(400, "POST", "/v1/disks", {"name": "x"}) == "invalid_size"
    assert mvd.err(400, "POST", "/v1/disks", {"name": "x", "size": -1}) == "invalid_size"
    assert mvd.err(400, "POST", "/v1/disks", {"name": "x", "size": "1MiB"}) == "invalid_size"
    assert mvd.err(400, "POST", "/v1/disks", {"name": "x", "size": 1 << 50}) == "invalid_size"
    assert mvd.err(400, "POST", "/v1/disks", {"name": "x", "size": 1, "color": "red"}) == "invalid_field"
    assert mvd.err(400, "POST", "/v1/disks", {"name": None, "size": 1}) == "invalid_name"
    assert mvd.err(404, "GET", "/v1/disks/ghost") == "disk_not_found"
    assert mvd.err(404, "PUT", "/v1/disks/ghost/content", raw=b"x") == "disk_not_found"
    assert mvd.err(404, "DELETE", "/v1/disks/ghost") == "disk_not_found"
    status, created = mvd.call("POST", "/v1/disks", {"name": "zero", "size": 0, "from": None})
    assert status == 201 and created["size"] == 0
    assert mvd.ok("PUT", "/v1/disks/zero/content", raw=b"abc")["size"] == 3
    paths = mvd.ok("GET", "/v1/openapi.json")["paths"]
    assert {"post", "get"} <= set(paths["/v1/disks"]) and "put" in paths["/v1/disks/{name}/content"]
    assert "patch" in paths["/v1/vms/{ref}/disks/{index}"]
    assert "microvmd_disks " in str(mvd.ok("GET", "/metrics"))


def test_disks_survive_a_daemon_restart() -> None:
    with Daemon.fresh("mvblk-") as d:
        d.disk("keep", 8192, content=b"kept")
        d.stop()
        d.start()  # the same state dir
        assert d.ok("GET", "/v1/disks/keep")["size"] == 8192
        img = d.image("keepreader", guest("""
    (call $n32 (call $read (i32.const 0) (i64.const 0) (i32.const 8192) (i32.const 4)))
    (call $out (i32.const 8192) (i32.const 4))"""))
        assert d.run(img, [{"name": "keep", "mode": "cow"}])[1] == ["4", "kept"]


def _rpc(port: int, line: str, timeout: float = 20.0) -> str:
    """Send one line to the guest's published port; its first reply line (retries until it listens and answers)."""
    end = time.monotonic() + timeout
    while True:
        try:
            reply = line_rpc(port, line, timeout=10)
            if reply:
                return reply.strip()
        except OSError:
            pass
        assert time.monotonic() < end, f"no answer on port {port}"
        time.sleep(0.1)


def _kv(mvd: Daemon, name: str, disk: str) -> int:  # noqa: F811
    port = free_port()
    r = mvd.cli("run", "-d", "--name", name, "--disk", disk, "--publish", f"127.0.0.1:{port}:8000",
                str(IMAGES / "kv" / "kv.wasm"))
    assert r.returncode == 0, r
    return port


def test_kv_guest_keeps_data_on_its_disk(mvd: Daemon) -> None:  # noqa: F811
    assert mvd.cli("disk", "create", "kvdata", "--size", "1MiB").returncode == 0
    port = _kv(mvd, "kv-rw", "kvdata")
    assert _rpc(port, "SET probe 4242") == "OK"
    assert mvd.cli("stop", "kv-rw").returncode == 0
    # a private copy-on-write view: sees the data, its own writes stay its own
    port = _kv(mvd, "kv-cow", "kvdata:cow")
    assert _rpc(port, "GET probe") == "4242"
    assert _rpc(port, "SET probe cow-only") == "OK"
    assert _rpc(port, "GET probe") == "cow-only"
    # at the same time, a read-only VM shares the base and does not see the cow VM's write
    port_ro = _kv(mvd, "kv-ro", "kvdata:ro")
    assert _rpc(port_ro, "GET probe") == "4242"
    assert _rpc(port_ro, "SET probe 1") == "ERR read-only disk"
    blk = mvd.ok("GET", "/v1/vms/kv-cow")["devices"]["blk"][0]
    assert blk["write_ops"] >= 2 and blk["flushes"] >= 2 and blk["private_bytes"] > 0
    for vm in ("kv-rw", "kv-cow", "kv-ro"):
        assert mvd.cli("rm", "-f", vm).returncode == 0
    assert mvd.cli("disk", "rm", "kvdata").returncode == 0
