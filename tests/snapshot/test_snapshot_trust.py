"""A snapshot file is data, never authority (issue 13, row 2): a VM restored from an imported snapshot gets
none of the file's network grants and no limits above the importing daemon's; the restore call grants them."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mvapi import free_port
from snaphelp import Daemon

MiB = 1 << 20


def _exported(a: Daemon, root: Path, name: str, port: int) -> Path:
    """An echo VM created on `a` with a published port, an egress rule and a 512 MiB memory limit,
    snapshotted and exported."""
    a.mv("create", "--name", name, "--publish", f"127.0.0.1:{port}:8000", "--allow-egress", "127.0.0.1:9",
         "--memory", "512MiB", "echo")
    a.mv("snapshot", "create", name, "--name", f"{name}-s")
    a.mv("rm", "-f", name)  # frees the port: a grant on the importer must not collide with the source
    out = root / f"{name}.mvsnap"
    a.mv("snapshot", "export", f"{name}-s", "-o", str(out))
    return out


def _net(vm: dict[str, Any]) -> dict[str, Any]:
    return vm["devices"].get("net") or {"published": [], "egress": []}


def test_imported_snapshot_gets_no_grants_and_no_limits_above_the_daemon(make_daemon: Callable[..., Daemon]) -> None:
    root: Path = make_daemon.root  # type: ignore[attr-defined]
    (root / "b.toml").write_text('[limits]\nmax_memory = "256MiB"\nmemory = "64MiB"\n')
    a = make_daemon("a")
    b = make_daemon("b", "--config", str(root / "b.toml"))
    port = free_port()
    file = _exported(a, root, "tr1", port)
    b.mv("snapshot", "import", str(file))

    # inspect shows what the file asked for, and that it came from a file
    snap = json.loads(b.mv("snapshot", "inspect", "tr1-s"))
    snap = snap[0] if isinstance(snap, list) else snap
    assert snap["origin"] == "import"
    assert snap["asks"]["allow_egress"] == ["127.0.0.1:9"]
    assert snap["asks"]["publish"] == [{"host_ip": "127.0.0.1", "host_port": port, "guest_port": 8000}]
    assert snap["asks"]["memory"] == 512 * MiB

    # restored without grants: no egress, nothing published, memory capped at b's max_memory
    vm = json.loads(b.mv("--json", "restore", "tr1-s", "--name", "r1"))
    assert vm["spec"]["allow_egress"] == [] and vm["spec"]["publish"] == []
    assert _net(vm)["published"] == [] and _net(vm)["egress"] == []
    assert vm["limits"]["memory"] == 256 * MiB

    # the restore call grants them explicitly
    port2 = free_port()
    vm = json.loads(b.mv("--json", "restore", "tr1-s", "--name", "r2", "--allow-egress", "127.0.0.1:9",
                         "--publish", f"127.0.0.1:{port2}:8000"))
    assert vm["spec"]["allow_egress"] == ["127.0.0.1:9"]
    assert [(p["host_port"], p["guest_port"]) for p in _net(vm)["published"]] == [(port2, 8000)]

    # a local snapshot keeps its VM's grants (the daemon accepted them itself)
    a_snap = json.loads(a.mv("snapshot", "inspect", "tr1-s"))
    a_snap = a_snap[0] if isinstance(a_snap, list) else a_snap
    assert a_snap["origin"] == "local"
    vm = json.loads(a.mv("--json", "restore", "tr1-s", "--name", "r3"))
    assert vm["spec"]["allow_egress"] == ["127.0.0.1:9"]
    assert [p["host_port"] for p in _net(vm)["published"]] == [port]


def test_restore_grants_are_checked_like_a_create(make_daemon: Callable[..., Daemon]) -> None:
    a = make_daemon("a")
    a.mv("create", "--name", "tr2", "echo")
    a.mv("snapshot", "create", "tr2", "--name", "tr2-s")
    status, body = a.call("POST", "/v1/snapshots/tr2-s/restore",
                          {"publish": [{"guest_port": 8000, "host_ip": "not-an-ip"}]})
    assert status == 400, body
    status, body = a.call("POST", "/v1/snapshots/tr2-s/restore", {"name": "x\n"})
    assert status == 400 and body["error"]["code"] == "invalid_name", body


def test_an_image_a_snapshot_needs_cannot_be_removed(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """Issue 13 row 6: `image rm` used to succeed, and the snapshot could no longer be restored or exported."""
    from mvapi import IMAGES
    d = make_daemon("a", images=())
    d.import_image(IMAGES / "hello" / "hello.wasm", "hi")
    d.mv("create", "--name", "h1", "hi")
    d.mv("snapshot", "create", "h1", "--name", "h1-s")
    d.mv("rm", "h1")
    status, body = d.call("DELETE", "/v1/images/hi")
    assert status == 409 and body["error"]["code"] == "image_in_use", body
    assert "h1-s" in body["error"]["message"]
    d.import_image(IMAGES / "hello" / "hello.wasm", "hi2")  # a second name of the same image
    assert d.call("DELETE", "/v1/images/hi2")[0] == 204  # only untags: the bytes stay
    d.mv("snapshot", "export", "h1-s", "-o", str(tmp_path / "h.snap"))
    d.mv("restore", "h1-s", "--name", "h2")
    d.mv("rm", "h2")
    d.mv("snapshot", "rm", "h1-s")
    assert d.call("DELETE", "/v1/images/hi")[0] == 204  # nothing needs it any more


def test_import_refuses_bytes_after_the_end_record(make_daemon: Callable[..., Daemon], sample: dict[str, bytes],
                                                   tmp_path: Path) -> None:
    """Issue 13 row 10, through the real API: the import is refused and nothing is stored."""
    d = make_daemon("a", images=())
    (tmp_path / "tail.snap").write_bytes(sample["export"] + b"trailing garbage")
    r = d.cli("snapshot", "import", str(tmp_path / "tail.snap"))
    assert r.returncode == 125 and "after its end record" in r.stderr, r.stderr
    assert d.snapshots() == []
    (tmp_path / "whole.snap").write_bytes(sample["export"])
    d.mv("snapshot", "import", str(tmp_path / "whole.snap"))
    assert d.snapshots() == ["sample-run"]
