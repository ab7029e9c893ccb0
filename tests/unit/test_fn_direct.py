"""Direct instances (functions/direct.py) with the real wasmtime: output, stdin, exits, traps, limits, and
the runs that must go on as VMs."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
import wasmtime

from microvmd.engine import wt
from microvmd.functions import direct, native
from microvmd.vmm.budget import MemoryBudget

WRITE = '(import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))'


def module(engine: wasmtime.Engine, body: str, imports: str = WRITE, pages: int = 1) -> wasmtime.Module:
    return wasmtime.Module(engine, f'(module {imports} (memory (export "memory") {pages}) {body})')


def write(fd: int, ptr: int, length: int) -> str:
    """WAT that writes ``length`` bytes at ``ptr`` to ``fd`` (the iovec at 0)."""
    return (f"(i32.store (i32.const 0) (i32.const {ptr})) (i32.store (i32.const 4) (i32.const {length})) "
            f"(drop (call $w (i32.const {fd}) (i32.const 0) (i32.const 1) (i32.const 8)))")


@pytest.fixture(scope="module")
def engine() -> Iterator[wasmtime.Engine]:
    eng = wt.make_engine(wt.EngineOptions())
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.01):
            eng.increment_epoch()

    t = threading.Thread(target=tick, daemon=True)
    t.start()
    yield eng
    stop.set()
    t.join()


_made: list[direct.DirectRunner] = []
_mode = {"native": False}


@pytest.fixture(autouse=True, params=["python", "native"])
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs twice: direct instances in Python, and on the native workers (native.py)."""
    if request.param == "native" and native.unavailable() is not None:
        if os.environ.get("MICROVMD_REQUIRE_NATIVE"):  # (CI: the native part must have been built)
            pytest.fail(f"MICROVMD_REQUIRE_NATIVE is set, and the native build is not there: {native.unavailable()}")
        pytest.skip(f"the native build is not there: {native.unavailable()}")
    _mode["native"] = request.param == "native"
    yield request.param
    while _made:
        _made.pop().close()


def runner(engine: wasmtime.Engine, budget: MemoryBudget | None = None, fuel_slice: int = 10_000_000
           ) -> direct.DirectRunner:
    r = direct.DirectRunner(engine, 0.01, 0.02, fuel_slice, budget, native_workers=1 if _mode["native"] else None)
    _made.append(r)
    assert (r.pool is not None) == _mode["native"]
    return r


def run(r: direct.DirectRunner, mod: wasmtime.Module, stdin: bytes = b"", fuel: int | None = None,
        memory: int = 1 << 20, timeout: float = 30.0, cap: int = 1 << 20) -> direct.Ended | None:
    lim = direct.Limits(fuel, memory, timeout, 1000, 1, 1, 1)
    return r.run(r.load(mod), "_start", [], ["guest"], {"A": "1"}, stdin, lim, cap)


def test_output_exit_code_and_the_stdout_cap(engine: wasmtime.Engine) -> None:
    r = runner(engine)
    mod = module(engine, f'''(data (i32.const 64) "0123456789") (data (i32.const 128) "oops")
        (func (export "_start") {write(1, 64, 10)} {write(2, 128, 4)} (call $exit (i32.const 3)))''',
                 imports=WRITE + '(import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))')
    ended = run(r, mod)
    assert ended is not None
    assert (ended.reason, ended.code, ended.stdout, ended.stdout_truncated, ended.stderr) == \
        ("exit", 3, b"0123456789", False, b"oops")
    ended = run(r, mod, cap=4)
    assert ended is not None and (ended.stdout, ended.stdout_truncated) == (b"0123", True)
    assert ended.instance_s > 0


def test_stdin_reads_in_pieces_then_end_of_file(engine: wasmtime.Engine) -> None:
    """fd_read on fd 0 (as a module rewritten at import imports it) gives the body across iovecs and calls, then
    0 bytes; poll_oneoff says stdin is ready
    with what is left; other descriptors are EBADF."""
    r = runner(engine)
    imports = WRITE + '''
      (import "microvm_wasi" "fd_read" (func $r (param i32 i32 i32 i32) (result i32)))
      (import "microvm_wasi" "poll_oneoff" (func $p (param i32 i32 i32 i32) (result i32)))'''
    body = f'''
      (func (export "_start") (local $n i32) (local $at i32)
        (local.set $at (i32.const 1024))
        ;; poll: one fd_read subscription on fd 0 (tag 1 at 8, fd at 16); nbytes of the event at 512+16
        (i32.store8 (i32.const 200) (i32.const 1)) (i32.store (i32.const 208) (i32.const 0))
        (drop (call $p (i32.const 192) (i32.const 512) (i32.const 1) (i32.const 600)))
        (i64.store (i32.const 700) (i64.load (i32.const 528)))
        ;; fd 5 is no descriptor
        (i32.store (i32.const 708) (call $r (i32.const 5) (i32.const 16) (i32.const 1) (i32.const 24)))
        (loop $more
          ;; two iovecs of 3 bytes each
          (i32.store (i32.const 16) (local.get $at)) (i32.store (i32.const 20) (i32.const 3))
          (i32.store (i32.const 24) (i32.add (local.get $at) (i32.const 3))) (i32.store (i32.const 28) (i32.const 3))
          (drop (call $r (i32.const 0) (i32.const 16) (i32.const 2) (i32.const 32)))
          (local.set $n (i32.load (i32.const 32)))
          (local.set $at (i32.add (local.get $at) (local.get $n)))
          (br_if $more (local.get $n)))
        {write(1, 1024, 11)} {write(2, 700, 12)})'''
    ended = run(r, module(engine, body, imports), stdin=b"hello world")
    assert ended is not None and ended.reason == "exit"
    assert ended.stdout == b"hello world"
    assert int.from_bytes(ended.stderr[:8], "little") == 11  # poll's nbytes: the whole body is there
    assert int.from_bytes(ended.stderr[8:], "little") == 8  # EBADF


def test_traps_fuel_and_memory(engine: wasmtime.Engine) -> None:
    budget = MemoryBudget(64 << 20)
    r = runner(engine, budget)
    trap = module(engine, '(func (export "_start") unreachable)')
    ended = run(r, trap)
    assert ended is not None and ended.reason == "trap" and "unreachable" in ended.message
    spin = module(engine, '(func (export "_start") (loop $l (br $l)))')
    ended = run(r, spin, fuel=100_000)  # its own budget, below a fuel slice: the function's end
    assert ended is not None and ended.reason == "out_of_fuel"
    assert run(r, spin) is None  # a whole fuel slice or quantum: the request goes on as a VM
    big = module(engine, '(func (export "_start"))', pages=32)
    assert run(r, big, memory=1 << 20) is None  # 2 MiB asked, 1 MiB allowed: the VM path says so
    assert budget.used == 0  # every run gave back what it held
    assert r.fallbacks == 2


def test_the_wall_clock_bound_is_the_timeout_or_a_quantum(engine: wasmtime.Engine) -> None:
    """A timeout shorter than a quantum is the function's own end (504); past a quantum the request goes on
    as a VM (fuel slices large enough that only the clock can end this spin)."""
    r = runner(engine, fuel_slice=1 << 60)
    spin = module(engine, '(func (export "_start") (loop $l (br $l)))')
    t0 = time.monotonic()
    ended = run(r, spin, timeout=0.005)
    assert ended is not None and ended.reason == "timeout"
    assert time.monotonic() - t0 >= 0.005  # never before the timeout (the first tick may come at once)
    assert run(r, spin, timeout=30.0) is None
    assert (r.runs, r.fallbacks) == (1, 1)


def test_a_wait_for_a_clock_goes_on_as_a_vm(engine: wasmtime.Engine) -> None:
    r = runner(engine)
    imports = WRITE + '(import "microvm_wasi" "poll_oneoff" (func $p (param i32 i32 i32 i32) (result i32)))'
    sleep = module(engine, '''(func (export "_start")
        (i32.store (i32.const 16) (i32.const 1)) (i64.store (i32.const 24) (i64.const 1000000000))
        (drop (call $p (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 96))))''', imports)
    assert run(r, sleep) is None
    now = module(engine, '''(func (export "_start")
        (i32.store (i32.const 16) (i32.const 1)) (i64.store (i32.const 24) (i64.const 0))
        (drop (call $p (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 96))))''', imports)
    ended = run(r, now)  # a clock that has fired already is no wait
    assert ended is not None and ended.reason == "exit"


def test_which_modules_qualify() -> None:
    assert direct.qualifies(["wasi_snapshot_preview1.fd_write", "microvm_wasi.fd_read"], "wasi")
    assert not direct.qualifies(["wasi_snapshot_preview1.fd_write", "microvm.sleep_ms"], "wasi")
    assert direct.qualifies(["wasi_snapshot_preview1.fd_write", "microvm_fn.fn_request", "microvm_fn.fn_respond"],
                            "sdk")
    assert not direct.qualifies(["microvm_fn.fn_request", "microvm_net.net_send"], "sdk")
    assert not direct.qualifies(["wasi_snapshot_preview1.fd_write"], "reactor")


def test_the_daemons_runner_pools_instances_of_modules_compiled_elsewhere(engine: wasmtime.Engine) -> None:
    """for_daemon: an engine of its own with the pooling allocator; a module compiled by the daemon's engine
    is loaded into it, and runs (more runs at once than slots: one slot per run, given back at its end)."""
    from microvmd.config import Limits as DaemonLimits

    r = direct.DirectRunner.for_daemon(engine, wt.EngineOptions(), DaemonLimits(), 1, 0.01, 0.02, 10_000_000, None)
    _made.append(r)
    assert r.engine is not engine
    assert (r.pool is not None) == (native.unavailable() is None)  # (natively whenever it can)
    mod = module(engine, f'''(data (i32.const 64) "pooled") (func (export "_start") {write(1, 64, 6)})''')
    lim = direct.Limits(None, 1 << 20, 30.0, 1000, 1, 1, 1)
    prepared = r.load(mod)
    for _ in range(5):  # more than its 2 slots
        ended = r.run(prepared, "_start", [], ["guest"], {}, b"", lim, 1 << 20)
        assert ended is not None and (ended.reason, ended.stdout) == ("exit", b"pooled")


def test_an_entry_with_results_and_the_clock_of_a_snapshot(engine: wasmtime.Engine) -> None:
    """An entry that returns a value runs (its result is ignored, as a VM's is); the monotonic clock goes on
    from where a snapshot left it."""
    r = runner(engine)
    imports = WRITE + '(import "microvm_wasi" "clock_time_get" (func $c (param i32 i64 i32) (result i32)))'
    mod = module(engine, f'''(func (export "_start") (result i32)
        (drop (call $c (i32.const 1) (i64.const 0) (i32.const 32))) {write(1, 32, 8)} (i32.const 7))''', imports)
    lim = direct.Limits(None, 1 << 20, 30.0, 1000, 1, 1, 1)
    ended = r.run(r.load(mod), "_start", [], ["guest"], {}, b"", lim, 1 << 20, mono_ns=10**15)
    assert ended is not None and (ended.reason, ended.code) == ("exit", 0)
    assert 10**15 <= int.from_bytes(ended.stdout, "little") < 10**15 + 10**10


def test_a_module_not_rewritten_polls_an_empty_stdin_as_it_reads_one(engine: wasmtime.Engine) -> None:
    """wasmtime's own fd_read serves such a module (no body reaches it, as in a VM): its poll_oneoff says so."""
    r = runner(engine)
    imports = WRITE + '(import "wasi_snapshot_preview1" "poll_oneoff" (func $p (param i32 i32 i32 i32) (result i32)))'
    mod = module(engine, f'''(func (export "_start")
        (i32.store8 (i32.const 200) (i32.const 1)) (i32.store (i32.const 208) (i32.const 0))
        (drop (call $p (i32.const 192) (i32.const 512) (i32.const 1) (i32.const 600)))
        {write(1, 528, 10)})''', imports)
    ended = run(r, mod, stdin=b"a body")
    assert ended is not None and ended.stdout[:8] == bytes(8) and ended.stdout[8:] == b"\x01\x00"  # 0, HANGUP


def test_a_big_output_is_dropped_after_the_run_even_when_it_goes_on_as_a_vm(engine: wasmtime.Engine,
                                                                           mode: str) -> None:
    """In Python, the outputs are two memfds per worker, emptied after a big run; natively they are buffers of
    the run (stdout up to its cap, stderr's last bytes), freed with it."""
    r = runner(engine)
    mod = module(engine, f'''(func (export "_start") (local $i i32)
        (loop $l {write(1, 0, 65536)} (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $l (i32.lt_u (local.get $i) (i32.const 40))))
        (loop $spin (br $spin)))''', pages=2)
    assert run(r, mod) is None  # 2.5 MiB written, then a spin past its slice: a VM's request
    if mode == "native":
        return
    assert _outputs() and all(os.stat(f"/proc/self/fd/{fd}").st_size == 0 for fd in _outputs())


def _outputs() -> list[str]:
    """The descriptors of the runners' output memfds (a Python runner's, or the native workers')."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "microvmd-direct-std" in os.readlink(f"/proc/self/fd/{fd}"):
                found.append(fd)
        except OSError:
            pass  # (the listing's own descriptor)
    return found


def test_header_bytes_that_are_not_utf8_reach_the_cgi_environment_replaced() -> None:
    from microvmd.functions import wagi
    from microvmd.functions.http import FnRequest

    req = FnRequest("GET", "/x", "", {"x-name": "caf\udce9"}, b"", route="/x")
    assert wagi.environment(req, {})["HTTP_X_NAME"] == "caf\ufffd"


def test_stderr_keeps_its_last_bytes_and_a_bad_iovec_traps(engine: wasmtime.Engine) -> None:
    """10 KiB written to stderr in 10 writes of a different byte each: the last 4 KiB are kept, in order. A
    buffer beyond the memory traps the guest, as wasmtime's own fd_write does in a VM (natively: checked
    before it is read)."""
    r = runner(engine)
    writes = "".join(f"(memory.fill (i32.const 4096) (i32.const {65 + i}) (i32.const 1024)) {write(2, 4096, 1024)}"
                     for i in range(10))
    ended = run(r, module(engine, f'(func (export "_start") {writes})'))
    assert ended is not None and ended.reason == "exit"
    assert ended.stderr == b"G" * 1024 + b"H" * 1024 + b"I" * 1024 + b"J" * 1024
    for ptr, iovs in ((65530, 0), (0, 65532)):
        bad = module(engine, '(func (export "_start") '
                             f'(i32.store (i32.const 0) (i32.const {ptr})) (i32.store (i32.const 4) (i32.const 100)) '
                             f'(drop (call $w (i32.const 1) (i32.const {iovs}) (i32.const 1) (i32.const 8))))')
        ended = run(r, bad)
        assert ended is not None and ended.reason == "trap" and "out of bounds" in ended.message.lower(), ended


def test_many_runs_at_once_on_the_native_workers(engine: wasmtime.Engine, mode: str) -> None:
    """The loop's hand-over under load: 200 runs submitted at once on two workers all come back, each with
    its own environment and output."""
    if mode != "native":
        pytest.skip("native only")
    import asyncio

    r = direct.DirectRunner(engine, 0.01, 0.02, 10_000_000, None, native_workers=2)
    _made.append(r)
    imports = WRITE + '''
      (import "wasi_snapshot_preview1" "environ_get" (func $eg (param i32 i32) (result i32)))'''
    mod = module(engine, f'''(func (export "_start")
        (drop (call $eg (i32.const 0) (i32.const 64))) {write(1, 64, 8)})''', imports)
    lim = direct.Limits(None, 1 << 20, 30.0, 1000, 1, 1, 1)
    prepared = r.load(mod)

    async def main() -> list[direct.Ended | None]:
        return await asyncio.gather(*[r.run_async(None, prepared, "_start", [], ["g"], {"N": f"{i:06d}"}, b"",
                                                  lim, 1 << 20) for i in range(200)])

    ended = asyncio.run(main())
    assert [e.stdout if e else None for e in ended] == [f"N={i:06d}".encode() for i in range(200)]
    assert (r.runs, r.fallbacks) == (200, 0)
