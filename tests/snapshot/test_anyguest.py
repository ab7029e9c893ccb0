"""Plain WASI guests (no SDK) snapshotted while they run: the Asyncify rewrite at import (issue 11).

Real daemons, real wasm-opt, real wasmtime: images/plaincount (nanosleep in a loop, heap checksum) and
images/allocstress (heavy allocation, every block checked) are rewritten at import, snapshotted mid-run,
restored on another daemon. A second import is a cache hit; --no-asyncify keeps a module as it is; a module
Binaryen 108 cannot read (exception handling) is imported as it is, stopped_only, and still runs.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import time
from pathlib import Path

import pytest
from mvapi import IMAGES
from snaphelp import Daemon

pytestmark = pytest.mark.skipif(shutil.which("wasm-opt") is None, reason="Binaryen's wasm-opt is not installed")

PLAINCOUNT = IMAGES / "plaincount" / "plaincount.wasm"
ALLOCSTRESS = IMAGES / "allocstress" / "allocstress.wasm"


def _pairs(text: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in re.findall(r"^(\d+) (\d+)$", text, re.M)]


def _expected_sum(i: int) -> int:
    return sum(k & 255 for k in range(1, i + 1))


def _wait_lines(d: Daemon, ref: str, pattern: str, above: int, timeout: float = 30.0) -> int:
    """Until the VM printed a line matching ``pattern`` (first group a number) with a number > above."""
    end = time.monotonic() + timeout
    while True:
        text = d.logs(ref)
        assert "CORRUPT" not in text, text[-500:]
        got = [int(x) for x in re.findall(pattern, text, re.M)]
        if got and got[-1] > above:
            return got[-1]
        if time.monotonic() > end:
            raise AssertionError(f"{ref}: no line past {above} in {timeout} s: {text[-300:]}")
        time.sleep(0.05)


def _snapshot(d: Daemon, vm: str, name: str) -> dict:
    status, doc = d.call("POST", f"/v1/vms/{vm}/snapshots", {"name": name})
    assert status == 201, doc
    return doc  # type: ignore[no-any-return]


def test_plain_wasi_program_snapshotted_mid_run_continues_on_another_daemon(make_daemon, tmp_path: Path) -> None:
    a = make_daemon("a", images=())
    b = make_daemon("b", images=())
    img = a.mv("--json", "image", "import", str(PLAINCOUNT), "--name", "plaincount")
    assert '"snapshot_kind": "asyncify"' in img
    a.mv("run", "-d", "--name", "pc1", "--env", "INTERVAL_MS=30", "plaincount")
    _wait_lines(a, "pc1", r"^(\d+) \d+$", 5)
    a.mv("snapshot", "create", "pc1", "--name", "pcs")
    at = _pairs(a.logs("pc1"))[-1][0]
    a.mv("snapshot", "export", "pcs", "-o", str(tmp_path / "pcs.snap"))
    b.mv("snapshot", "import", str(tmp_path / "pcs.snap"))
    b.mv("restore", "pcs", "--name", "pc2", "--start")
    _wait_lines(b, "pc2", r"^(\d+) \d+$", at + 10)
    pairs = _pairs(b.logs("pc2"))
    assert pairs[0][0] >= at - 1 and pairs[0][0] <= at + 2, (at, pairs[:3])  # counts on from the snapshot
    for i, s in pairs:
        assert s == _expected_sum(i), (i, s)  # the heap checksum survived the trip
    # the source runs on too (it rewound into its nanosleep)
    _wait_lines(a, "pc1", r"^(\d+) \d+$", at + 10)
    # the target got the module that ran, without rewriting it, and knows what it was made from
    imgs = b.ok("GET", "/v1/images")["images"]
    assert len(imgs) == 1 and imgs[0]["snapshot_kind"] == "asyncify"
    assert imgs[0]["original_digest"] == "sha256:" + hashlib.sha256(PLAINCOUNT.read_bytes()).hexdigest()
    assert imgs[0]["digest"] == imgs[0]["rewritten_digest"] != imgs[0]["original_digest"]


def test_heavy_allocation_before_and_after_snapshots(make_daemon) -> None:
    """The unwind buffer is memory the daemon grows: the guest's allocator never hands it out. allocstress
    sleeps before its first malloc (the first snapshot places the buffer before wasi-libc's allocator
    claims memory), then allocates ~24 MiB while being snapshotted again and again, checking every block."""
    a = make_daemon("a", images=())
    b = make_daemon("b", images=())
    for d in (a, b):
        d.import_image(ALLOCSTRESS, "allocstress")
    a.mv("run", "-d", "--name", "al", "--env", "PAUSE_MS=1500", "--env", "INTERVAL_MS=10",
         "--env", "MAX_MB=16", "allocstress")
    time.sleep(0.3)
    _snapshot(a, "al", "al-0")  # in the pause, before any malloc
    seen = 0
    for i in range(1, 5):
        seen = _wait_lines(a, "al", r"^(\d+) \d+ \d+ ok$", seen + 5)
        _snapshot(a, "al", f"al-{i}")
    vm = a.get("al")
    assert vm["state"] == "running", vm
    seen = _wait_lines(a, "al", r"^(\d+) \d+ \d+ ok$", seen + 20)  # and after the last one
    # a restore elsewhere carries on allocating and checking
    blob = a.api("GET", "/v1/snapshots/al-4/export").body
    r = b.api("POST", "/v1/snapshots/import", raw=blob, headers={"Content-Type": "application/octet-stream"})
    assert r.status in (200, 201), r.text
    b.mv("restore", "al-4", "--name", "al2", "--start")
    _wait_lines(b, "al2", r"^(\d+) \d+ \d+ ok$", 30)
    _snapshot(b, "al2", "al2-0")
    _wait_lines(b, "al2", r"^(\d+) \d+ \d+ ok$", 60)
    # and so does the snapshot taken before the guest's first malloc
    blob = a.api("GET", "/v1/snapshots/al-0/export").body
    assert b.api("POST", "/v1/snapshots/import", raw=blob,
                 headers={"Content-Type": "application/octet-stream"}).status in (200, 201)
    b.mv("restore", "al-0", "--name", "al3", "--start")
    _wait_lines(b, "al3", r"^(\d+) \d+ \d+ ok$", 20)


def test_a_rewind_leaves_the_unwind_buffer_zero_so_the_next_snapshot_reuses_it(make_daemon) -> None:
    """After a rewind the daemon clears only what the saved stack filled; the rest of the buffer must still be
    zero, or an unsettled buffer (placed before the guest's first malloc) would look claimed by the guest and
    every snapshot would grow memory by another MiB. Snapshots in a row, and of a restored VM, keep one buffer."""
    d = make_daemon("a", images=())
    d.import_image(ALLOCSTRESS, "allocstress")
    d.mv("run", "-d", "--name", "al", "--env", "PAUSE_MS=60000", "allocstress")
    time.sleep(0.3)
    sizes = []
    for i in range(3):  # all in the pause, before any malloc: the buffer is unsettled
        _snapshot(d, "al", f"al-{i}")
        sizes.append(d.get("al")["memory_bytes"])
    assert sizes[0] == sizes[1] == sizes[2], sizes
    d.mv("restore", "al-2", "--name", "al2", "--start")
    time.sleep(0.2)
    _snapshot(d, "al2", "al2-0")
    _snapshot(d, "al2", "al2-1")
    assert d.get("al2")["memory_bytes"] == sizes[0]


def test_second_import_is_a_cache_hit_and_no_asyncify_keeps_the_module(make_daemon) -> None:
    a = make_daemon("a", images=())
    digest = "sha256:" + hashlib.sha256(PLAINCOUNT.read_bytes()).hexdigest()
    first = a.api.import_image(PLAINCOUNT.read_bytes(), "pc").json()
    assert first["snapshot_kind"] == "asyncify" and first["original_digest"] == digest
    assert first["digest"] == first["rewritten_digest"] != digest
    t0 = time.monotonic()
    again = a.api.import_image(PLAINCOUNT.read_bytes(), "pc-again").json()
    assert time.monotonic() - t0 <= 1.0
    assert again["digest"] == first["digest"]
    # removed, then imported again: the rewrite comes from the cache under the state dir (no wasm-opt)
    a.mv("image", "rm", "pc", "pc-again")
    t0 = time.monotonic()
    third = a.api.import_image(PLAINCOUNT.read_bytes(), "pc").json()
    assert third["digest"] == first["digest"]
    assert len(list((a.state_dir / "images" / "rewrites").glob("*.wasm"))) == 1
    # --no-asyncify: the module as it is, its own digest, snapshots only before it starts
    out = a.mv("image", "import", str(PLAINCOUNT), "--name", "pc-plain", "--no-asyncify")
    assert out.split() == ["pc-plain", digest]
    plain = a.ok("GET", "/v1/images/pc-plain")
    assert plain["snapshot_kind"] == "stopped_only" and plain["rewritten_digest"] is None
    assert "no-asyncify" in plain["snapshot_note"]
    a.mv("run", "-d", "--name", "pp", "--env", "INTERVAL_MS=20", "pc-plain")
    _wait_lines(a, "pp", r"^(\d+) \d+$", 3)
    status, doc = a.call("POST", "/v1/vms/pp/snapshots", {"name": "pp-s"})
    assert status == 409 and doc["error"]["code"] == "not_snapshottable", doc


EH_WAT = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "caught 7\\n")
  (tag $boom (param i32))
  (func (export "_start")
    (local $v i32)
    (block $h (result i32)
      (try_table (catch $boom $h) (throw $boom (i32.const 7)))
      (i32.const 0))
    local.set $v
    (if (i32.eq (local.get $v) (i32.const 7))
      (then
        (i32.store (i32.const 0) (i32.const 16))
        (i32.store (i32.const 4) (i32.const 9))
        (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))))
"""


def test_module_binaryen_cannot_read_is_imported_stopped_only_and_runs(make_daemon, tmp_path: Path) -> None:
    a = make_daemon("a", images=())
    src = tmp_path / "eh.wat"
    src.write_text(EH_WAT)
    a.mv("image", "import", str(src), "--name", "eh")
    img = a.ok("GET", "/v1/images/eh")
    assert img["snapshot_kind"] == "stopped_only", img
    # (not even handed to wasm-opt: a module with exception tags is one Asyncify cannot rewrite)
    assert "exception handling" in img["snapshot_note"], img["snapshot_note"]
    assert img["rewritten_digest"] is None
    r = a.cli("run", "eh")
    assert r.returncode == 0 and r.stdout == "caught 7\n", (r.returncode, r.stdout, r.stderr)


def test_a_module_wasm_opt_fails_on_gets_binaryens_reason(tmp_path: Path) -> None:
    """The path a module takes when wasm-opt itself fails (Binaryen 108 cannot read exception handling)."""
    import asyncio

    import wasmtime

    from microvmd.images import rewrite

    async def inline(fn, *args):  # type: ignore[no-untyped-def]
        return fn(*args)

    if rewrite.wasm_opt_path() is None:
        pytest.skip("Binaryen's wasm-opt is not installed")
    result = asyncio.run(rewrite.run_wasm_opt(wasmtime.wat2wasm(EH_WAT), tmp_path, inline))
    assert result.module is None
    assert result.reason is not None and result.reason.startswith("Binaryen cannot rewrite this module"), result


WASITEST = IMAGES / "wasitest" / "wasitest.wasm"
WASITEST_OUT = """argc 3
arg 7
arg a b
env x
stdin 0 eof 1
nanosleep ok
clock_nanosleep abs rc 0 ok
realtime ok
poll timeout rc 0 ok
file hello file
readv 3 hel|dir entries 2
"""  # (wasmtime's fd_read fills the first iovec only: a short read, as POSIX allows)


@pytest.mark.parametrize("asyncify", [True, False], ids=["rewritten", "as-is"])
def test_wasi_behaviour_is_the_same_with_and_without_the_rewrite(make_daemon, tmp_path: Path,
                                                                  asyncify: bool) -> None:
    """images/wasitest (stdin, file reads through a preopen, sleeps, absolute clock waits, poll, clocks)
    prints the same and exits the same whether the daemon serves its blocking calls (rewritten) or
    wasmtime does (--no-asyncify)."""
    a = make_daemon("a", images=())
    a.mv("image", "import", str(WASITEST), "--name", "wt", *([] if asyncify else ["--no-asyncify"]))
    img = a.ok("GET", "/v1/images/wt")
    assert img["snapshot_kind"] == ("asyncify" if asyncify else "stopped_only"), img
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("hello file\n")
    r = a.cli("run", "--dir", f"{data}::/data", "--env", "WT=x", "wt", "7", "a b")
    assert (r.returncode, r.stdout) == (7, WASITEST_OUT), r.stderr
    assert (data / "out.txt").read_text() == "written by wasitest\n"


def test_file_calls_of_a_guest_restored_while_it_waits_for_stdin(make_daemon, tmp_path: Path) -> None:
    """wasmtime's own WASI calls (files through a preopen) go through a helper instance made by the first call
    that needs it: in a restored VM that is after the restore, inside the rewound guest's first path_open.
    wasitest, snapshotted while it waits for stdin, restored, then given EOF, prints what a fresh run does."""
    a = make_daemon("a", images=())
    a.mv("image", "import", str(WASITEST), "--name", "wt")
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("hello file\n")
    vm = a.ok("POST", "/v1/vms", {"image": "wt", "name": "w", "args": ["7", "a b"], "env": {"WT": "x"},
                                  "dirs": [{"host": str(data), "guest": "/data"}], "stdin": True, "start": True})
    a.wait_blocked("w", "fd_read")
    _snapshot(a, "w", "w-0")
    assert a.call("DELETE", f"/v1/vms/{vm['id']}?force=true")[0] == 204
    r = a.ok("POST", "/v1/snapshots/w-0/restore", {"name": "w2", "start": True})
    status, _ = a.call("POST", f"/v1/vms/{r['id']}/stdin", raw=b"",  # EOF: the guest goes on to its files
                       headers={"Content-Type": "application/octet-stream"})
    assert status == 200
    done = a.wait(r["id"])
    assert done["code"] == 7, done
    after = WASITEST_OUT[WASITEST_OUT.index("stdin 0 eof 1"):]  # (what it printed before is the first VM's)
    assert a.logs("w2").endswith(after), a.logs("w2")
    assert (data / "out.txt").read_text() == "written by wasitest\n"


def test_import_images_at_start_up_rewrites_in_the_background(make_daemon, tmp_path: Path) -> None:
    """`microvmd --import-images DIR` (make run) does not wait for rewrites: the module is usable at once as it
    is, and its name moves to the rewritten image when that is ready."""
    src = tmp_path / "imgs" / "plaincount"
    src.mkdir(parents=True)
    shutil.copy(PLAINCOUNT, src / "plaincount.wasm")
    a = make_daemon("a", "--import-images", str(tmp_path / "imgs"), images=())
    end = time.monotonic() + 60
    while (img := a.ok("GET", "/v1/images/plaincount"))["snapshot_kind"] != "asyncify":
        assert time.monotonic() < end, img
        time.sleep(0.1)
    assert img["original_digest"] == "sha256:" + hashlib.sha256(PLAINCOUNT.read_bytes()).hexdigest()
    # the module as it was gets its note right after the name moved (one step later on the compile pool)
    while img["digest"] not in (old := a.ok("GET", f"/v1/images/{img['original_digest']}"))["snapshot_note"]:
        assert time.monotonic() < end, old
        time.sleep(0.05)
    assert old["snapshot_kind"] == "stopped_only"


PYTHON_WASM = IMAGES / "python" / "python.wasm"  # scripts/fetch-interpreters


@pytest.mark.slow
@pytest.mark.skipif(not PYTHON_WASM.is_file(), reason="run scripts/fetch-interpreters first")
def test_cpython_snapshotted_in_time_sleep_continues_on_another_daemon(make_daemon, tmp_path: Path) -> None:
    """The 26 MB CPython build: rewritten at import (~4 min on 2 cores), snapshotted while it sleeps in
    time.sleep (an absolute monotonic deadline), restored on another daemon with its variables intact."""
    a = make_daemon("a", images=())
    b = make_daemon("b", images=())
    r = a.cli("image", "import", str(PYTHON_WASM), "--name", "python", timeout=1200)
    assert r.returncode == 0, r.stderr
    assert a.ok("GET", "/v1/images/python")["snapshot_kind"] == "asyncify"
    prog = ("import time\nx = 40\ndata = [i * i for i in range(100000)]\nn = 0\nwhile True:\n    n += 1\n"
            "    print(n, x + 2, sum(data) % 1000, flush=True)\n    time.sleep(0.1)")
    a.mv("run", "-d", "--name", "py1", "python", "-c", prog)
    seen = _wait_lines(a, "py1", r"^(\d+) 42 0$", 5, timeout=120)
    _snapshot(a, "py1", "pys")
    a.mv("snapshot", "export", "pys", "-o", str(tmp_path / "pys.snap"))
    b.mv("snapshot", "import", str(tmp_path / "pys.snap"), timeout=600)
    b.mv("restore", "pys", "--name", "py2", "--start")
    _wait_lines(b, "py2", r"^(\d+) 42 0$", seen + 10, timeout=120)
    first = int(re.findall(r"^(\d+) 42 0$", b.logs("py2"), re.M)[0])
    assert seen - 1 <= first <= seen + 3, (seen, first)  # it went on from the snapshot
