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
    cfg.write_text("[limits]\ncompile_jobs = 1\ncompile_queue = 1\n")
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
    # both places are taken: a third import is told to come back, at once
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
