"""Compile bombs (issue 13 row 5): a module with 100,000 functions took 7-15 s to compile on the I/O pool;
four imports at once made a snapshot wait 44 s and the daemon's RSS grow by gigabytes for good. Imports now
compile on a pool of their own, big modules in a child process, with admission and a function ceiling."""
from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from mvapi import IMAGES, Daemon, Resp
from wasmtime import wat2wasm


def bomb(functions: int, salt: int = 0) -> bytes:
    """A valid module with ``functions`` small exported functions (WAT text)."""
    body = "".join(f'(func (export "f{i}") (param i32) (result i32) local.get 0 i32.const {i * 4 + salt} i32.add)\n'
                   for i in range(functions))
    return f'(module (func (export "_start"))\n{body})\n'.encode()


def _import(d: Daemon, name: str, data: bytes, out: dict[str, Resp]) -> None:
    out[name] = d.api("POST", f"/v1/images?name={name}", raw=data, timeout=600)


def test_compile_bombs_wait_their_turn_and_never_block_snapshots(make_daemon: Callable[..., Daemon],
                                                                 tmp_path: Path) -> None:
    cfg = tmp_path / "compile.toml"
    cfg.write_text("[limits]\ncompile_jobs = 1\ncompile_queue = 3\n")  # four places, two per client
    d = make_daemon("--config", str(cfg))
    d.mv("image", "import", str(IMAGES / "counter" / "counter.wasm"), "--name", "counter")
    counter = d.api.create("counter", start=True, env={"INTERVAL_MS": "20"})
    d.api.wait_state(counter["id"], "running")
    results: dict[str, Resp] = {}
    first = threading.Thread(target=_import, args=(d, "bomb0", bomb(40_000, 0), results))
    first.start()
    while d.api.ok("GET", "/v1/info")["limits"]["compile_admitted"] < 1:
        pass
    second = threading.Thread(target=_import, args=(d, "bomb1", bomb(40_000, 1), results))
    second.start()
    while d.api.ok("GET", "/v1/info")["limits"]["compile_admitted"] < 2:
        pass
    # this client's places are taken: its third import is told to come back, at once
    r = d.api("POST", "/v1/images?name=bomb2", raw=bomb(10, 2))
    assert r.status == 503 and r.code == "compile_busy", r.text
    # the snapshot and the listing do not queue behind the compiles (they use the I/O pool)
    snap = d.api("POST", f"/v1/vms/{counter['id']}/snapshots", {"name": "during"})
    assert snap.status == 201, snap.text
    assert d.api.ok("GET", "/v1/vms")["vms"]
    assert first.is_alive() or second.is_alive()  # (a 40,000-function compile takes seconds)
    first.join()
    second.join()
    assert results["bomb0"].status == 201 and results["bomb1"].status == 201, results
    metrics = d.api.metrics()
    assert "microvmd_compile_refused_total 1.0" in metrics
    assert "microvmd_compile_children_total 2.0" in metrics  # compiled in a child process each
    # an image compiled by a child runs like any other
    vm = d.api.create("bomb0", start=True)
    assert d.api.wait(vm["id"])["code"] == 0


def test_a_module_with_too_many_functions_is_refused(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    cfg = tmp_path / "compile.toml"
    cfg.write_text("[limits]\nmax_functions = 100\n")
    d = make_daemon("--config", str(cfg))
    r = d.api("POST", "/v1/images?name=big", raw=bomb(200))
    assert r.status == 422 and r.code == "too_many_functions", r.text
    r = d.api("POST", "/v1/images?name=small", raw=bomb(50))
    assert r.status == 201, r.text


def test_an_invalid_big_module_is_a_422_from_the_compile_child(daemon: Daemon) -> None:
    """Readable to the daemon's own parser, refused by wasmtime's validator (an i64 where an i32 result is
    due): the child's refusal is the client's 422 invalid_module, not a 500."""
    body = "".join(f'(func (export "f{i}") (result i32) i32.const {i})\n' for i in range(30_000))
    data = bytes(wat2wasm(f'(module {body}(func (export "bad") (result i32) i64.const 1))'))
    assert len(data) > 256 * 1024  # big enough for the child
    r = daemon.api("POST", "/v1/images?name=badbig", raw=data, headers={"Content-Type": "application/wasm"})
    assert r.status == 422 and r.code == "invalid_module", r.text


def test_a_snapshot_import_compiles_its_image_without_holding_up_snapshots(make_daemon: Callable[..., Daemon]) -> None:
    """The image inside an exported snapshot is compiled after the stream's chunks are stored and the
    store's write lock is let go: a snapshot of another VM is taken meanwhile (it used to wait for the
    whole compile)."""
    a = make_daemon()
    r = a.api("POST", "/v1/images?name=bombimg&no_asyncify=true", raw=bomb(40_000, 7), timeout=600)
    assert r.status == 201, r.text
    vm = a.api.create("bombimg")  # created, not started: any module can be snapshotted then
    assert a.api("POST", f"/v1/vms/{vm['id']}/snapshots", {"name": "bs"}).status == 201
    blob = a.api("GET", "/v1/snapshots/bs/export", timeout=600).body

    b = make_daemon()
    b.mv("image", "import", str(IMAGES / "counter" / "counter.wasm"), "--name", "counter")
    counter = b.api.create("counter", start=True, env={"INTERVAL_MS": "20"})
    b.api.wait_state(counter["id"], "running")
    results: dict[str, Resp] = {}

    def import_it() -> None:
        results["import"] = b.api("POST", "/v1/snapshots/import", raw=blob, timeout=600,
                                  headers={"Content-Type": "application/octet-stream"})
    t = threading.Thread(target=import_it)
    t.start()
    while b.api.ok("GET", "/v1/info")["limits"]["compile_admitted"] < 1:
        assert t.is_alive(), results  # (the image is compiled after the stream is stored: seconds)
    snap = b.api("POST", f"/v1/vms/{counter['id']}/snapshots", {"name": "during-import"})
    assert snap.status == 201, snap.text
    # answered while the image still compiles (seconds for 40,000 functions): the snapshot did not wait
    assert b.api.ok("GET", "/v1/info")["limits"]["compile_admitted"] >= 1 and t.is_alive()
    t.join()
    assert results["import"].status == 201, results["import"].text
    assert {s["name"] for s in b.api.ok("GET", "/v1/snapshots")["snapshots"]} >= {"bs", "during-import"}
    restored = b.api("POST", "/v1/snapshots/bs/restore", {"name": "bomb-again"})
    assert restored.status == 201, restored.text


def test_one_client_cannot_fill_the_compile_pool(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """A client (a process on the Unix socket) holds at most half of the compile places: its next import is
    503 compile_busy at once, while another process's import is admitted."""
    cfg = tmp_path / "compile.toml"
    cfg.write_text("[limits]\ncompile_jobs = 1\ncompile_queue = 3\n")  # four places: two per client
    d = make_daemon("--config", str(cfg))
    results: dict[str, Resp] = {}
    threads = [threading.Thread(target=_import, args=(d, f"mine{i}", bomb(40_000, 10 + i), results))
               for i in range(2)]
    for t in threads:
        t.start()
    while d.api.ok("GET", "/v1/info")["limits"]["compile_admitted"] < 2:
        pass
    r = d.api("POST", "/v1/images?name=mine2", raw=bomb(10, 12))  # this process, a third time
    assert r.status == 503 and r.code == "compile_busy" and "this client" in r.text, r.text
    assert any(t.is_alive() for t in threads)  # (40,000-function compiles take seconds)
    small = tmp_path / "small.wasm"
    small.write_bytes(wat2wasm(bomb(10, 13).decode()))
    d.mv("image", "import", str(small), "--name", "theirs")  # another process: its own share
    assert d.api.ok("GET", "/v1/images/theirs")["names"] == ["theirs"]
    for t in threads:
        t.join()
    assert results["mine0"].status == 201 and results["mine1"].status == 201, results
