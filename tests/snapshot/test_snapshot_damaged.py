"""A manifest that cannot be read at start-up loses nothing else (issue 13 row 7): it is set aside with the
packs kept (it used to have its intact pack deleted as unreferenced), `snapshot ls` shows it as damaged,
and `snapshot rm` removes it and then the packs nothing uses."""
from __future__ import annotations

import json
import signal
from collections.abc import Callable

from snaphelp import Daemon


def test_unreadable_manifest_is_set_aside_and_its_packs_kept(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon("d", images=("counter",))
    d.mv("run", "-d", "--name", "c2", "--env", "INTERVAL_MS=20", "counter")
    d.mv("run", "-d", "--name", "c3", "--env", "INTERVAL_MS=30", "counter")
    d.wait_count("c2", 2)
    d.wait_count("c3", 2)
    d.mv("snapshot", "create", "c2", "--name", "good")
    d.mv("snapshot", "create", "c3", "--name", "hurt")
    packs = d.state_dir / "snapshots" / "packs"
    before = sorted(p.name for p in packs.iterdir())
    assert len(before) >= 2
    d.stop(signal.SIGKILL)
    hurt = d.state_dir / "snapshots" / "manifests" / "hurt.snap"
    hurt.write_bytes(hurt.read_bytes()[:7])
    d.start()

    assert sorted(p.name for p in packs.iterdir()) == before  # nothing deleted
    listing = json.loads(d.mv("--json", "snapshot", "ls"))
    assert [s["name"] for s in listing["snapshots"]] == ["good"]
    assert [s["name"] for s in listing["damaged"]] == ["hurt"]
    assert "bad magic" in listing["damaged"][0]["reason"]
    r = d.cli("snapshot", "ls")
    assert r.returncode == 0 and "DAMAGED" in r.stdout and "hurt" in r.stderr
    d.mv("restore", "good", "--name", "g1")  # the intact snapshot still restores
    assert d.call("GET", "/v1/snapshots/hurt")[0] in (404, 422)

    d.stop(signal.SIGKILL)
    d.start()  # still damaged at the next start: still nothing deleted
    assert sorted(p.name for p in packs.iterdir()) == before

    d.mv("snapshot", "rm", "hurt")  # removing the damaged manifest lets the store collect its pack
    listing = json.loads(d.mv("--json", "snapshot", "ls"))
    assert listing["damaged"] == [] and [s["name"] for s in listing["snapshots"]] == ["good"]
    after = sorted(p.name for p in packs.iterdir())
    assert len(after) < len(before) and set(after) <= set(before)
    d.mv("restore", "good", "--name", "g2")


def test_a_tampered_manifest_with_a_fresh_checksum_is_reported_damaged_not_a_500(
        make_daemon: Callable[..., Daemon]) -> None:
    """The checksum only proves that nobody changed the file by accident: one rewritten on purpose (its
    `stats` a list, its `vm.id` a number) is typed field by field (contract.Manifest) and shown as damaged
    with the field it breaks, while the daemon runs and after a restart; `GET` of it is a 422, never a 500."""
    from microvmd.snapshot.store import decode_manifest, encode_manifest

    d = make_daemon("t", images=("counter",))
    d.mv("run", "-d", "--name", "c1", "--env", "INTERVAL_MS=20", "counter")
    d.wait_count("c1", 2)
    d.mv("snapshot", "create", "c1", "--name", "good")
    d.mv("snapshot", "create", "c1", "--name", "stats")
    d.mv("snapshot", "create", "c1", "--name", "vmid")
    manifests = d.state_dir / "snapshots" / "manifests"
    for name, tamper in (("stats", lambda m: m.update(stats=[1, 2])),
                         ("vmid", lambda m: m["vm"].update(id=7))):
        path = manifests / f"{name}.snap"
        m = decode_manifest(path.read_bytes(), name)
        tamper(m)
        path.write_bytes(encode_manifest(m))  # a valid header and checksum over the tampered body

    for restart in (False, True):
        if restart:
            d.stop(signal.SIGKILL)
            d.start()
        status, listing = d.call("GET", "/v1/snapshots")
        assert status == 200, listing
        assert [s["name"] for s in listing["snapshots"]] == ["good"]
        reasons = {x["name"]: x["reason"] for x in listing["damaged"]}
        assert set(reasons) == {"stats", "vmid"}
        assert "$.stats" in reasons["stats"] and "$.vm.id" in reasons["vmid"]
        for name in ("stats", "vmid"):
            status, body = d.call("GET", f"/v1/snapshots/{name}")
            assert status in (404, 422), body  # (422 while in place; 404 once set aside at a start-up)
    r = d.cli("snapshot", "ls")
    assert r.returncode == 0 and "DAMAGED" in r.stdout
    d.mv("snapshot", "rm", "stats")
    d.mv("snapshot", "rm", "vmid")
    assert d.call("GET", "/v1/snapshots")[1]["damaged"] == []
    d.mv("restore", "good", "--name", "g1")
