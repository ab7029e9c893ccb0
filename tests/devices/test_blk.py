"""The virtual disk device: store, claims and copy-on-write overlays on real files, then the guest ABI
``microvm_blk`` end to end: hand-written WAT guests run by a real ``microvmd`` through the real client.

The harness at the top (a daemon with disk helpers on the shared mvapi.Daemon, a WAT guest builder) is
shared with test_disks_api.py.
"""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mvapi
import pytest
from mvapi import WAT_PRINT
from mvapi import wat_repeat as loop
from prometheus_client.parser import text_string_to_metric_families

from microvmd.devices.disks import COW_BLOCK, CowBackend, DiskStore, RawBackend
from microvmd.errors import BadRequest, Conflict, NotFound


# ================================================================================================ harness
class Daemon(mvapi.Daemon):
    """A real ``microvmd`` child process (mvapi.Daemon) with the disk tests' helpers."""

    def err(self, status: int, method: str, path: str, body: Any = None, **kw: Any) -> str:
        got, doc = self.call(method, path, body, **kw)
        assert got == status, (method, path, got, doc)
        assert set(doc["error"]) == {"code", "message"} and doc["error"]["message"], doc
        return str(doc["error"]["code"])

    def vm(self, image: str, disks: list[dict[str, Any]], start: bool = True, **spec: Any) -> dict[str, Any]:
        status, doc = self.call("POST", "/v1/vms", {"image": image, "disks": disks, "start": start, **spec})
        assert status == 201, doc
        return doc  # type: ignore[no-any-return]

    def run(self, image: str, disks: list[dict[str, Any]], **spec: Any) -> tuple[dict[str, Any], list[str]]:
        """Create, start and wait for a VM; its exit (with its "id") and its stdout lines."""
        vm = self.vm(image, disks, **spec)
        ex = self.wait(vm["id"])
        assert ex["reason"] == "exit", (ex, self.logs(vm["id"]))
        return {**ex, "id": vm["id"]}, self.logs(vm["id"]).splitlines()

    def disk(self, name: str, size: int, content: bytes | None = None) -> None:
        self.ok("POST", "/v1/disks", {"name": name, "size": size, "from": None})
        if content is not None:
            self.ok("PUT", f"/v1/disks/{name}/content", raw=content)


@pytest.fixture(scope="module")
def mvd() -> Iterator[Daemon]:
    with Daemon.fresh("mvblk-") as d:
        yield d


# A WAT guest: blk imports, `microvm.sleep_ms`, and helpers that print to stdout: ($num i64) and ($n32 i32)
# print a decimal line, ($out ptr len) raw bytes. Memory is 2 pages; 4096.. is free for test data.
def guest(body: str, data: str = "", locals_: str = "") -> str:
    return f"""
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "microvm" "sleep_ms" (func $sleep (param i32) (result i32)))
  (import "microvm_blk" "blk_count" (func $count (result i32)))
  (import "microvm_blk" "blk_size" (func $size (param i32) (result i64)))
  (import "microvm_blk" "blk_read" (func $read (param i32 i64 i32 i32) (result i32)))
  (import "microvm_blk" "blk_write" (func $write (param i32 i64 i32 i32) (result i32)))
  (import "microvm_blk" "blk_flush" (func $flush (param i32) (result i32)))
  (import "microvm_blk" "blk_flags" (func $flags (param i32) (result i32)))
  (memory (export "memory") 2)
{WAT_PRINT}
  (func (export "_start") {locals_}
{body})
  {data})
"""


HOLD = "(drop (call $sleep (i32.const 600000)))"  # keeps a VM alive (holding its disks) until stopped


# ================================================================================================ units
def test_store_create_sparse_list_and_reload(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "disks")
    store.load()
    store.reserve("big")
    disk = store.create_files("big", 1 << 30)
    store.added(disk)
    st = os.stat(disk.path)
    assert st.st_size == 1 << 30 and st.st_blocks * 512 < 1 << 20  # sparse
    with pytest.raises(Conflict) as exc:
        store.reserve("big")
    assert exc.value.code == "disk_exists"
    for bad in ("", "../x", "a/b", ".hidden", "x" * 200, 7):
        with pytest.raises(BadRequest):
            store.reserve(bad)  # type: ignore[arg-type]
    (tmp_path / "disks" / ".big.upload").write_bytes(b"half")  # a crash during an upload
    again = DiskStore(tmp_path / "disks")
    again.load()
    assert [d.name for d in again.all()] == ["big"] and again.get("big").size == 1 << 30
    assert not (tmp_path / "disks" / ".big.upload").exists()
    with pytest.raises(NotFound):
        again.get("nope")


def test_store_upload_replaces_content_and_grows(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    disk = store.create_files("d", 8192)
    store.added(disk)
    fd = store.open_upload("d")
    os.write(fd, b"x" * 10000)
    disk.size = store.finish_upload(disk, fd, 10000)
    assert disk.size == 10000  # max(size, length)
    assert disk.path.read_bytes() == b"x" * 10000
    fd = store.open_upload("d")
    os.write(fd, b"abc")
    assert store.finish_upload(disk, fd, 3) == 10000  # never shrinks; the rest reads as zeros
    assert disk.path.read_bytes() == b"abc" + bytes(9997)


def test_claims_rw_is_exclusive_ro_and_cow_share(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    for name in ("a", "b"):
        store.added(store.create_files(name, 4096))
    store.claim("vm1", "one", [("a", "ro"), ("b", "rw")])
    store.claim("vm2", "two", [("a", "cow"), ("a", "ro")])  # ro and cow share, even twice in one VM
    for wants in ([("a", "rw")], [("b", "ro")], [("b", "cow")], [("b", "rw")]):
        with pytest.raises(Conflict) as exc:
            store.claim("vm3", "three", wants)
        assert exc.value.code == "disk_busy"
    with pytest.raises(Conflict):
        store.check_removable("a")
    # all or nothing: a failing claim leaves nothing behind
    with pytest.raises(Conflict):
        store.claim("vm3", "three", [("a", "ro"), ("b", "ro")])
    assert {c.vm_id for c in store.get("a").claims} == {"vm1", "vm2"}
    store.release("vm1")
    store.claim("vm3", "three", [("b", "rw")])
    with pytest.raises(Conflict):  # the same disk twice in one VM, once rw
        store.claim("vm4", "four", [("a", "ro"), ("a", "rw")])
    store.release("vm2")
    store.release("vm3")
    assert store.check_removable("a") and store.check_removable("b")


def _view(data: bytes | bytearray) -> memoryview:
    return memoryview(bytearray(data))


def test_raw_backend_reads_and_writes_in_place(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    p.write_bytes(bytes(range(256)) * 64)
    rw = RawBackend(p, p.stat().st_size, writable=True)
    buf = _view(bytes(10))
    rw.read_into(buf, 250)
    assert bytes(buf) == bytes([250, 251, 252, 253, 254, 255, 0, 1, 2, 3])
    rw.write_from(_view(b"hello"), 1000)
    rw.flush()
    rw.close()
    assert p.read_bytes()[1000:1005] == b"hello"
    ro = RawBackend(p, p.stat().st_size, writable=False)
    with pytest.raises(OSError):
        ro.write_from(_view(b"x"), 0)
    ro.close()


def test_cow_overlay_is_private_and_the_base_never_changes(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    size = 10 * COW_BLOCK + 123  # a partial last block
    original = bytes((i * 7) % 251 for i in range(size))
    base.write_bytes(original)
    base.chmod(0o444)  # the overlay never needs to write it
    a = CowBackend(base, tmp_path / "a.cow", size)
    b = CowBackend(base, tmp_path / "b.cow", size)
    # a: a write straddling blocks 1 and 2, partly covering both
    a.write_from(_view(b"A" * 100), 2 * COW_BLOCK - 50)
    # b: the partial last block, and one whole block
    b.write_from(_view(b"B" * 20), size - 20)
    b.write_from(_view(b"b" * COW_BLOCK), 5 * COW_BLOCK)

    def read(backend: CowBackend, off: int, n: int) -> bytes:
        v = _view(bytes(n))
        backend.read_into(v, off)
        return bytes(v)

    expect_a = bytearray(original)
    expect_a[2 * COW_BLOCK - 50:2 * COW_BLOCK + 50] = b"A" * 100
    expect_b = bytearray(original)
    expect_b[size - 20:] = b"B" * 20
    expect_b[5 * COW_BLOCK:6 * COW_BLOCK] = b"b" * COW_BLOCK
    assert read(a, 0, size) == expect_a
    assert read(b, 0, size) == expect_b
    # reads that start and end inside mixed runs
    assert read(a, COW_BLOCK - 3, 2 * COW_BLOCK) == bytes(expect_a[COW_BLOCK - 3:3 * COW_BLOCK - 3])
    assert read(b, 5 * COW_BLOCK - 1, 2) == bytes(expect_b[5 * COW_BLOCK - 1:5 * COW_BLOCK + 1])
    assert base.read_bytes() == original
    assert a.private_bytes() == 2 * COW_BLOCK and b.private_bytes() == 2 * COW_BLOCK
    # the overlay stores only what was written
    assert os.stat(tmp_path / "a.cow").st_blocks * 512 <= 4 * COW_BLOCK
    a.flush()
    a.close()
    b.close()


def test_a_thousand_overlays_share_one_base(tmp_path: Path) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = 1000
    if hard != resource.RLIM_INFINITY and hard < 2 * n + 100:
        pytest.skip(f"needs {2 * n + 100} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2 * n + 100), hard))
    size = 64 << 20
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.truncate(size)
        f.write(b"BASE")
    overlays = []
    try:
        for i in range(n):
            c = CowBackend(base, tmp_path / f"{i}.cow", size)
            c.write_from(_view(i.to_bytes(4, "little")), 4 + (i % 16) * COW_BLOCK)
            overlays.append(c)
        for i, c in enumerate(overlays):
            v = _view(bytes(8))
            c.read_into(v, (i % 16) * COW_BLOCK)
            assert bytes(v) == (b"BASE" if i % 16 == 0 else bytes(4)) + i.to_bytes(4, "little")
        used = sum(os.stat(tmp_path / f"{i}.cow").st_blocks * 512 for i in range(n))
        assert used <= n * 2 * COW_BLOCK  # a block each, not 64 MiB each
        assert base.read_bytes()[:8] == b"BASE" + bytes(4)
    finally:
        for c in overlays:
            c.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class _Sched:
    async def on_io(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _fake_vm(hv: Any, vm_id: str, tmp: Path, disks: list[Any]) -> Any:
    from microvmd.devices import DeviceSet
    from microvmd.vmm.state import VmState
    from microvmd.vmm.vm import DiskSpec

    d = tmp / vm_id
    d.mkdir()
    vm = SimpleNamespace(id=vm_id, name=vm_id, dir=d, devices=DeviceSet(), state=VmState.RUNNING,
                         spec=SimpleNamespace(disks=[DiskSpec(**x) for x in disks]),
                         log=SimpleNamespace(info=lambda *a: None))
    hv.vms[vm_id] = vm
    return vm


async def test_controller_attach_release_and_failed_create(tmp_path: Path) -> None:
    from microvmd.devices.blk import BlkState, BlockDevice
    from microvmd.vmm.state import VmState

    hv = SimpleNamespace(cfg=SimpleNamespace(state_dir=tmp_path), sched=_Sched(), vms={})
    dev = BlockDevice(hv)
    await dev.create_disk("d", 1 << 20)
    vm1 = _fake_vm(hv, "vm1", tmp_path, [{"name": "d", "mode": "rw", "rate_limiter": None}])
    await dev.attach(hv, vm1)
    assert vm1.devices.get(BlkState).to_api()[0]["mode"] == "rw"
    vm2 = _fake_vm(hv, "vm2", tmp_path, [{"name": "d", "mode": "ro"}])
    with pytest.raises(Conflict):
        await dev.attach(hv, vm2)
    with pytest.raises(Conflict) as exc:
        await dev.remove_disk("d")
    assert exc.value.code == "disk_in_use"
    # a VM whose create failed after its disks attached (its devices never closed) does not hold them
    del hv.vms["vm1"]
    await dev.attach(hv, vm2)
    vm2.state = VmState.STOPPED
    vm2.devices.close()
    vm2.devices.close()  # idempotent: the manager closes on finish and again on remove
    await dev.remove_disk("d")
    assert dev.list_disks() == []


async def test_controller_never_blocks_the_event_loop(tmp_path: Path) -> None:
    """Creating a big sparse disk and uploading 64 MiB leave the loop free (I/O runs on threads)."""
    from microvmd.devices.blk import BlockDevice

    hv = SimpleNamespace(cfg=SimpleNamespace(state_dir=tmp_path), sched=_Sched(), vms={})
    dev = BlockDevice(hv)
    worst = 0.0
    stop = False

    async def heartbeat() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last)
            last = now

    async def chunks() -> Any:
        block = os.urandom(1 << 20)
        for _ in range(64):
            await asyncio.sleep(0)
            yield block

    beat = asyncio.create_task(heartbeat())
    await dev.create_disk("big", 1 << 40)
    await dev.create_disk("up", 1 << 20)
    disk = await dev.upload("up", chunks(), 1 << 40)
    stop = True
    await beat
    assert disk.size == 64 << 20
    assert worst < 0.1, f"the event loop stalled for {worst * 1000:.0f} ms"


# ================================================================================================ guest ABI
def test_guest_reads_writes_flushes_and_sees_its_disks(mvd: Daemon) -> None:
    mvd.disk("abi0", 1 << 20)
    mvd.disk("abi1", 10000, content=b"seed-content")
    img = mvd.image("abi", guest("""
    (call $n32 (call $count))
    (call $num (call $size (i32.const 0)))
    (call $num (call $size (i32.const 1)))
    (call $n32 (call $flags (i32.const 0)))
    (call $n32 (call $flags (i32.const 1)))
    (call $n32 (call $write (i32.const 0) (i64.const 100000) (i32.const 4096) (i32.const 11)))
    (call $n32 (call $flush (i32.const 0)))
    (call $n32 (call $read (i32.const 0) (i64.const 100000) (i32.const 8192) (i32.const 11)))
    (call $out (i32.const 8192) (i32.const 11)) (call $out (i32.const 4200) (i32.const 1))
    (call $n32 (call $read (i32.const 1) (i64.const 0) (i32.const 8192) (i32.const 12)))
    (call $out (i32.const 8192) (i32.const 12)) (call $out (i32.const 4200) (i32.const 1))
    (call $n32 (call $read (i32.const 1) (i64.const 9990) (i32.const 8192) (i32.const 100)))
    (call $n32 (call $read (i32.const 1) (i64.const 10000) (i32.const 8192) (i32.const 100)))
    (call $n32 (call $read (i32.const 1) (i64.const 99999999) (i32.const 8192) (i32.const 100)))
    (call $n32 (call $write (i32.const 1) (i64.const 0) (i32.const 4096) (i32.const 5)))
    (call $n32 (call $flush (i32.const 1)))
    (call $n32 (call $read (i32.const 0) (i64.const 0) (i32.const 8192) (i32.const 0)))
""", data='(data (i32.const 4096) "hello world") (data (i32.const 4200) "\\n")'))
    ex, out = mvd.run(img, [{"name": "abi0", "mode": "rw"}, {"name": "abi1", "mode": "ro"}])
    assert ex["code"] == 0
    assert out == ["2", str(1 << 20), "10000", "0", "1", "11", "0", "11", "hello world", "12", "seed-content",
                   "10", "0", "0", "-69", "0", "0"]
    # the write reached the disk file; a later VM sees it
    assert (mvd.state_dir / "disks" / "abi0.img").read_bytes()[100000:100011] == b"hello world"
    img2 = mvd.image("abi-reread", guest("""
    (call $n32 (call $read (i32.const 0) (i64.const 100000) (i32.const 8192) (i32.const 11)))
    (call $out (i32.const 8192) (i32.const 11))"""))
    assert mvd.run(img2, [{"name": "abi0", "mode": "ro"}])[1] == ["11", "hello world"]


def test_guest_without_disks_has_none(mvd: Daemon) -> None:
    img = mvd.image("nodisk", guest("""
    (call $n32 (call $count))
    (call $num (call $size (i32.const 0)))
    (call $n32 (call $read (i32.const 0) (i64.const 0) (i32.const 8192) (i32.const 1)))
    (call $n32 (call $flags (i32.const 0)))
    (call $n32 (call $flush (i32.const 0)))"""))
    assert mvd.run(img, [])[1] == ["0", "-8", "-8", "-8", "-8"]


HOSTILE = guest("""
    ;; bad device indexes
    (call $num (call $size (i32.const -1)))
    (call $num (call $size (i32.const 99)))
    (call $n32 (call $flags (i32.const 2)))
    (call $n32 (call $flush (i32.const -2147483648)))
    (call $n32 (call $read (i32.const 7) (i64.const 0) (i32.const 8192) (i32.const 1)))
    ;; pointers outside memory (128 KiB), also wrapping around 4 GiB
    (call $n32 (call $read (i32.const 0) (i64.const 0) (i32.const 131070) (i32.const 3)))
    (call $n32 (call $read (i32.const 0) (i64.const 0) (i32.const -16) (i32.const 32)))
    (call $n32 (call $write (i32.const 0) (i64.const 0) (i32.const 200000) (i32.const 1)))
    (call $n32 (call $read (i32.const 0) (i64.const 0) (i32.const 131073) (i32.const 0)))
    ;; huge lengths: capped at 16 MiB, still far beyond memory
    (call $n32 (call $read (i32.const 0) (i64.const 0) (i32.const 0) (i32.const 2147483647)))
    (call $n32 (call $write (i32.const 0) (i64.const 0) (i32.const 4096) (i32.const 2147483647)))
    ;; negative offsets and lengths
    (call $n32 (call $read (i32.const 0) (i64.const -1) (i32.const 8192) (i32.const 1)))
    (call $n32 (call $write (i32.const 0) (i64.const -9223372036854775808) (i32.const 8192) (i32.const 1)))
    (call $n32 (call $read (i32.const 0) (i64.const 0) (i32.const 8192) (i32.const -1)))
    ;; past the end: ENOSPC on write, 0 on read; straddling: short
    (call $n32 (call $write (i32.const 0) (i64.const 65536) (i32.const 4096) (i32.const 1)))
    (call $n32 (call $write (i32.const 0) (i64.const 9223372036854775807) (i32.const 4096) (i32.const 1)))
    (call $n32 (call $read (i32.const 0) (i64.const 9223372036854775807) (i32.const 8192) (i32.const 1)))
    (call $n32 (call $write (i32.const 0) (i64.const 65530) (i32.const 4096) (i32.const 10)))
    (call $n32 (call $read (i32.const 0) (i64.const 65530) (i32.const 8192) (i32.const 10)))
    ;; a read-only disk
    (call $n32 (call $write (i32.const 1) (i64.const 0) (i32.const 4096) (i32.const 1)))
    (call $n32 (call $write (i32.const 1) (i64.const 0) (i32.const -1) (i32.const -1)))
    ;; a large, legal read into most of memory
    (call $n32 (call $read (i32.const 0) (i64.const 0) (i32.const 65536) (i32.const 65536)))
""", data='(data (i32.const 4096) "0123456789")')


def test_hostile_calls_get_errnos_and_nobody_else_notices(mvd: Daemon) -> None:
    mvd.disk("hostile", 65536)
    mvd.disk("hostile-ro", 4096)
    other = mvd.vm(mvd.image("bystander", guest(HOLD)), [{"name": "hostile-ro", "mode": "ro"}])
    img = mvd.image("hostile", HOSTILE)
    ex, out = mvd.run(img, [{"name": "hostile", "mode": "rw"}, {"name": "hostile-ro", "mode": "ro"}])
    assert ex["code"] == 0
    assert out == ["-8", "-8", "-8", "-8", "-8",
                   "-21", "-21", "-21", "-21",
                   "-21", "-21",
                   "-28", "-28", "-28",
                   "-51", "-51", "0", "6", "6",
                   "-69", "-28",
                   "65536"]
    blk = mvd.ok("GET", f"/v1/vms/{ex['id']}")["devices"]["blk"]
    assert blk[0]["errors"] == 11 and blk[1]["errors"] == 2
    # the daemon and the other VM carry on
    assert mvd.ok("GET", f"/v1/vms/{other['id']}")["state"] == "running"
    assert mvd.run(mvd.image("abi-count", guest("(call $n32 (call $count))")), [])[1] == ["0"]
    mvd.ok("POST", f"/v1/vms/{other['id']}/kill")


def test_ro_disk_is_shared_and_rw_is_exclusive(mvd: Daemon) -> None:
    mvd.disk("shared", 4096, content=b"shared!")
    hold = mvd.image("hold", guest(HOLD))
    reader = mvd.image("reader", guest("""
    (call $n32 (call $read (i32.const 0) (i64.const 0) (i32.const 8192) (i32.const 7)))
    (call $out (i32.const 8192) (i32.const 7))"""))
    holder = mvd.vm(hold, [{"name": "shared", "mode": "ro"}])
    # another ro user runs alongside; rw users are refused while it holds the disk
    assert mvd.run(reader, [{"name": "shared", "mode": "ro"}])[1] == ["7", "shared!"]
    assert mvd.run(reader, [{"name": "shared", "mode": "cow"}])[1] == ["7", "shared!"]
    assert mvd.err(409, "POST", "/v1/vms", {"image": reader, "disks": [{"name": "shared"}]}) == "disk_busy"
    assert mvd.err(409, "DELETE", "/v1/disks/shared") == "disk_in_use"
    listed = {d["name"]: d for d in mvd.ok("GET", "/v1/disks")["disks"]}
    assert listed["shared"]["used_by"] == [holder["name"]]
    mvd.ok("POST", f"/v1/vms/{holder['id']}/stop")
    # rw now; while it holds the disk, neither ro nor cow nor another rw may attach
    writer = mvd.vm(hold, [{"name": "shared", "mode": "rw"}])
    for mode in ("ro", "cow", "rw"):
        assert mvd.err(409, "POST", "/v1/vms", {"image": reader, "disks": [{"name": "shared", "mode": mode}]}) \
            == "disk_busy"
    mvd.ok("POST", f"/v1/vms/{writer['id']}/kill")
    assert mvd.run(reader, [{"name": "shared", "mode": "rw"}])[1] == ["7", "shared!"]


def test_cow_overlays_are_isolated_and_the_base_is_untouched(mvd: Daemon) -> None:
    base = bytes(range(256)) * 64  # 16 KiB
    mvd.disk("cowbase", len(base), content=base)
    vms = []
    for i in range(12):  # each writes its own letter at 5000, waits for the others, reads 4998..5002 back
        img = mvd.image(f"cow{i}", guest(f"""
    (i32.store8 (i32.const 4096) (i32.const {65 + i}))
    (call $n32 (call $write (i32.const 0) (i64.const 5000) (i32.const 4096) (i32.const 1)))
    (drop (call $sleep (i32.const 300)))
    (call $n32 (call $read (i32.const 0) (i64.const 4998) (i32.const 8192) (i32.const 5)))
    (call $out (i32.const 8192) (i32.const 5))"""))
        vms.append(mvd.vm(img, [{"name": "cowbase", "mode": "cow"}]))
    for i, vm in enumerate(vms):
        assert mvd.wait(vm["id"])["code"] == 0
        got = mvd.ok("GET", f"/v1/vms/{vm['id']}/logs?stream=stdout").encode("latin-1")
        assert got == b"1\n5\n" + base[4998:5000] + bytes([65 + i]) + base[5001:5003], (i, got)
        info = mvd.ok("GET", f"/v1/vms/{vm['id']}")["devices"]["blk"][0]
        assert info["mode"] == "cow" and info["private_bytes"] == COW_BLOCK and info["write_bytes"] == 1
        overlay = next((mvd.state_dir / "vms" / vm["id"]).glob("*.cow"))
        assert os.stat(overlay).st_size == len(base) and os.stat(overlay).st_blocks * 512 <= 2 * COW_BLOCK
    assert (mvd.state_dir / "disks" / "cowbase.img").read_bytes() == base
    for vm in vms:
        mvd.ok("DELETE", f"/v1/vms/{vm['id']}")
        assert not (mvd.state_dir / "vms" / vm["id"]).exists()  # the overlay went away with the VM
    mvd.ok("DELETE", "/v1/disks/cowbase")


def test_cow_reads_see_own_writes_over_the_base(mvd: Daemon) -> None:
    base = b"".join(bytes([65 + i]) * 4096 for i in range(4))  # AAAA.. BBBB.. CCCC.. DDDD..
    mvd.disk("cowview", len(base), content=base)
    img = mvd.image("cowview", guest("""
    (call $n32 (call $write (i32.const 0) (i64.const 4094) (i32.const 4096) (i32.const 4)))
    (call $n32 (call $read (i32.const 0) (i64.const 4090) (i32.const 8192) (i32.const 12)))
    (call $out (i32.const 8192) (i32.const 12))""", data='(data (i32.const 4096) "wxyz")'))
    assert mvd.run(img, [{"name": "cowview", "mode": "cow"}])[1] == ["4", "12", "AAAAwxyzBBBB"]
    assert mvd.run(img, [{"name": "cowview", "mode": "cow"}])[1] == ["4", "12", "AAAAwxyzBBBB"]  # not the last one's
    assert (mvd.state_dir / "disks" / "cowview.img").read_bytes() == base


WRITER = guest(loop(32, """
      (drop (call $write (i32.const 0) (i64.mul (i64.extend_i32_u (local.get $i)) (i64.const 32768))
                         (i32.const 4096) (i32.const 32768)))"""), locals_="(local $i i32)")


def test_rate_limit_slows_the_guest(mvd: Daemon) -> None:
    mvd.disk("slow", 1 << 20)
    img = mvd.image("writer", WRITER)
    t0 = time.monotonic()
    ex_free, _ = mvd.run(img, [{"name": "slow"}])
    free = time.monotonic() - t0
    # 64 KiB per 100 ms: 1 MiB written, 64 KiB of it from the full bucket, takes about 1.5 s
    limit = {"bandwidth": {"size": 65536, "refill_time": 100}}
    t0 = time.monotonic()
    vm = mvd.vm(img, [{"name": "slow", "rate_limiter": limit}])
    mvd.wait(vm["id"])
    limited = time.monotonic() - t0
    info = mvd.ok("GET", f"/v1/vms/{vm['id']}")
    blk = info["devices"]["blk"][0]
    assert blk["write_bytes"] == 1 << 20 and blk["write_ops"] == 32
    assert blk["rate_limiter"]["bandwidth"] == {"size": 65536, "refill_time": 100, "one_time_burst": 0}
    assert limited > 1.0, limited
    assert limited > free + 0.5, (free, limited)
    assert blk["throttled_s"] > 1.0
    # ops: 8 per 100 ms, 32 writes (8 of them from the full bucket) take about 0.3 s
    vm = mvd.vm(img, [{"name": "slow", "rate_limiter": {"ops": {"size": 8, "refill_time": 100}}}])
    ex = mvd.wait(vm["id"])
    assert ex["wall_time_s"] > 0.25 and ex_free["wall_time_s"] < ex["wall_time_s"]
    labels = {"vm": vm["id"][:12], "disk": "slow", "index": "0"}
    samples = {s.name: s.value for fam in text_string_to_metric_families(str(mvd.ok("GET", "/metrics")))
               for s in fam.samples if s.labels == labels}
    assert samples["microvmd_blk_write_bytes_total"] == 1 << 20
    assert samples["microvmd_blk_write_ops_total"] == 32


def test_throttled_guest_holds_no_thread_and_can_be_changed_or_killed(mvd: Daemon) -> None:
    mvd.disk("crawl", 4096)
    img = mvd.image("crawler", guest(loop(100, """
      (drop (call $read (i32.const 0) (i64.const 0) (i32.const 8192) (i32.const 1)))""") + """
    (call $n32 (i32.const 100))""", locals_="(local $i i32)"))
    one_per_10s = {"ops": {"size": 1, "refill_time": 10000}}
    vm = mvd.vm(img, [{"name": "crawl", "mode": "ro", "rate_limiter": one_per_10s}])
    assert mvd.wait_blocked(vm["id"])["blocked_in"] == "blk_throttle"
    # the daemon answers at once, other guests run while it waits
    t0 = time.monotonic()
    assert mvd.run(mvd.image("abi-count", guest("(call $n32 (call $count))")), [])[1] == ["0"]
    assert time.monotonic() - t0 < 5
    # bad PATCHes
    path = f"/v1/vms/{vm['id']}/disks/0"
    assert mvd.err(400, "PATCH", path, {"rate_limiter": {"ops": {"size": -1, "refill_time": 1}}}) == "invalid_field"
    assert mvd.err(400, "PATCH", path, {"bandwidth": {}}) == "invalid_field"
    assert mvd.err(404, "PATCH", f"/v1/vms/{vm['id']}/disks/3", {"rate_limiter": None}) == "disk_not_attached"
    assert mvd.err(400, "PATCH", f"/v1/vms/{vm['id']}/disks/x", {"rate_limiter": None}) == "invalid_field"
    # lifting the limit wakes the waiting call; the guest finishes its 100 reads
    got = mvd.ok("PATCH", path, {"rate_limiter": None})
    assert got["rate_limiter"] is None and got["index"] == 0
    ex = mvd.wait(vm["id"], timeout=30)
    assert ex["reason"] == "exit" and mvd.logs(vm["id"]).split() == ["100"]
    assert mvd.err(409, "PATCH", path, {"rate_limiter": None}) == "invalid_state"
    # killed while throttled: it stops at once and lets go of the disk
    vm = mvd.vm(img, [{"name": "crawl", "mode": "rw", "rate_limiter": one_per_10s}])
    mvd.wait_blocked(vm["id"])
    t0 = time.monotonic()
    mvd.ok("POST", f"/v1/vms/{vm['id']}/kill")
    assert mvd.wait(vm["id"])["reason"] == "killed" and time.monotonic() - t0 < 5
    mvd.ok("DELETE", f"/v1/vms/{vm['id']}")
    mvd.ok("DELETE", "/v1/disks/crawl")


def test_rate_limiter_is_validated_at_create(mvd: Daemon) -> None:
    mvd.disk("rlbad", 4096)
    body = {"image": mvd.image("abi-count", guest("(call $n32 (call $count))")),
            "disks": [{"name": "rlbad", "rate_limiter": {"ops": {"size": "many", "refill_time": 1}}}]}
    assert mvd.err(400, "POST", "/v1/vms", body) == "invalid_field"
    body["disks"] = [{"name": "nosuchdisk"}]
    assert mvd.err(404, "POST", "/v1/vms", body) == "disk_not_found"
    assert mvd.ok("GET", "/v1/disks/rlbad")["used_by"] == []


async def test_snapshot_views_and_materialize(tmp_path: Path) -> None:
    """What the snapshot controller uses: a cow disk's merged content read piece by piece, and a new disk
    written from a copy."""
    from microvmd.devices.blk import BlkState, BlockDevice

    hv = SimpleNamespace(cfg=SimpleNamespace(state_dir=tmp_path), sched=_Sched(), vms={})
    dev = BlockDevice(hv)
    await dev.create_disk("base", 3 * COW_BLOCK)
    (tmp_path / "disks" / "base.img").write_bytes(b"b" * 3 * COW_BLOCK)
    vm = _fake_vm(hv, "vm1", tmp_path, [{"name": "base", "mode": "cow"}])
    await dev.attach(hv, vm)
    st = vm.devices.get(BlkState)
    st.disks[0].backend.write_from(_view(b"new"), COW_BLOCK + 1)
    (view,) = st.snapshot_views()
    data = b"".join(view.read_at(off, min(COW_BLOCK, view.size() - off)) for off in range(0, view.size(), COW_BLOCK))
    assert (view.index, view.name, view.mode) == (0, "base", "cow")
    assert data == b"b" * (COW_BLOCK + 1) + b"new" + b"b" * (2 * COW_BLOCK - 4)
    name = await dev.materialize_with("base", len(data), lambda fd: os.pwrite(fd, data, 0))
    assert name.startswith("base.restored-") and dev.get_disk(name).size == len(data)
    assert (tmp_path / "disks" / f"{name}.img").read_bytes() == data
    assert (tmp_path / "disks" / "base.img").read_bytes() == b"b" * 3 * COW_BLOCK
    vm.devices.close()
