"""Many VMs at once, hostile guests next to well-behaved ones, and an event loop that keeps answering
while guests burn CPU and modules are imported."""
from __future__ import annotations

import os
import secrets
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from mvapi import (
    WAT_BIG_INITIAL_MEMORY,
    WAT_LOOP,
    WAT_MEMORY_BOMB,
    WAT_MEMORY_BOMB_FOREVER,
    WAT_MISSING_IMPORT,
    WAT_RECURSE,
    WAT_TRAP,
    Api,
    Daemon,
    checksum,
    metric_value,
    request,
    wasm,
    with_custom_section,
)

MAX_THREADS = 40
HUGE = "900000000000"


class ThreadSampler:
    """Samples the daemon's thread count (/proc/PID/status) in the background."""

    def __init__(self, pid: int, every: float = 0.01) -> None:
        self.pid, self.every = pid, every
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                text = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            self.samples.append(int(text.split("Threads:")[1].split()[0]))
            self._stop.wait(self.every)

    def __enter__(self) -> ThreadSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(5)

    @property
    def max(self) -> int:
        return max(self.samples)


# ------------------------------------------------------------------------------------------ 100 VMs
def test_100_concurrent_vms_all_finish_with_bounded_threads(daemon: Daemon, spin_ref: Callable[[int], str]) -> None:
    n = 15_000_000  # ~50 ms of CPU each
    want = spin_ref(n)
    api = daemon.api

    def one(i: int) -> tuple[str, dict[str, Any]]:
        vm = api.create("spin", str(n), name=f"many-{secrets.token_hex(3)}-{i}", start=True)
        return vm["id"], api.wait(vm["id"], timeout=300)

    with ThreadSampler(daemon.pid) as sampler, ThreadPoolExecutor(100) as pool:
        results = list(pool.map(one, range(100)))
    print(f"daemon threads during 100 concurrent VMs: max {sampler.max}, "
          f"median {statistics.median(sampler.samples)}")
    assert len(results) == 100
    for vm_id, ex in results:
        assert ex["code"] == 0 and ex["reason"] == "exit", (vm_id, ex)
    sums = {checksum(api.logs(vm_id)) for vm_id, _ in results}
    assert sums == {want}
    assert sampler.max < MAX_THREADS, f"daemon used {sampler.max} threads for 100 VMs"
    for vm_id, _ in results:
        api.ok("DELETE", f"/v1/vms/{vm_id}")


def test_idle_vms_hold_no_thread(daemon: Daemon) -> None:
    api = daemon.api
    with ThreadPoolExecutor(10) as pool:  # warm the daemon's pools up first
        warm = list(pool.map(lambda _: api.create("hello")["id"], range(10)))
    time.sleep(0.2)
    before = daemon.threads()
    with ThreadSampler(daemon.pid) as sampler, ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(lambda _: api.create("spin", HUGE)["id"], range(100)))
    time.sleep(0.2)
    after = daemon.threads()
    print(f"daemon threads: {before} before, {after} with 100 more created VMs (max {sampler.max})")
    assert all(api.vm(i)["state"] == "created" for i in ids[:5])
    assert after <= before + 2, (before, after)
    assert sampler.max < MAX_THREADS
    # paused VMs hold none either
    started = ids[:20]
    for i in started:
        api.ok("POST", f"/v1/vms/{i}/start")
    for i in started:
        api.ok("POST", f"/v1/vms/{i}/pause")
    time.sleep(0.2)
    assert daemon.threads() <= before + 2
    assert all(api.vm(i)["state"] == "paused" for i in started)
    for i in ids + warm:
        api.ok("DELETE", f"/v1/vms/{i}?force=true")


# ------------------------------------------------------------------------------------------ hostile guests
@pytest.fixture(scope="module")
def hostile() -> Iterator[Daemon]:
    d = Daemon.fresh("mvd-h-")
    try:
        for name in ("spin", "counter", "hello"):
            assert d.api.import_image(wasm(name), name).status == 201
        yield d
    finally:
        d.close(signal.SIGKILL)


# case -> (file contents, extra `run` flags, expected client exit status, words expected on stderr)
HOSTILE: dict[str, tuple[Callable[[], bytes], list[str], Callable[[int], bool], list[str]]] = {
    "infinite_loop_timeout": (lambda: WAT_LOOP.encode(), ["--timeout", "400ms"], lambda rc: rc == 137, ["timeout"]),
    "infinite_loop_fuel": (lambda: WAT_LOOP.encode(), ["--fuel", "5000000"], lambda rc: rc == 137, ["out_of_fuel"]),
    "memory_bomb": (lambda: WAT_MEMORY_BOMB.encode(), ["--memory", "16MiB"], lambda rc: 1 <= rc <= 16, []),
    "memory_bomb_forever": (lambda: WAT_MEMORY_BOMB_FOREVER.encode(), ["--memory", "4MiB", "--timeout", "400ms"],
                            lambda rc: rc == 137, ["timeout"]),
    "grow_malloc": (lambda: wasm("grow"), ["--memory", "8MiB"], lambda rc: rc == 0, []),
    "recursion": (lambda: WAT_RECURSE.encode(), [], lambda rc: rc == 137, ["stack_overflow"]),
    "trap": (lambda: WAT_TRAP.encode(), [], lambda rc: rc == 137, ["trap:"]),
    "initial_memory_above_limit": (lambda: WAT_BIG_INITIAL_MEMORY.encode(), ["--memory", "4MiB"],
                                   lambda rc: rc == 125, ["memory"]),
    "invalid_module": (lambda: b"\0asm\x01\0\0\0" + os.urandom(64), [], lambda rc: rc == 125, []),
    "truncated_module": (lambda: wasm("spin")[:-100], [], lambda rc: rc == 125, []),
    "missing_import": (lambda: WAT_MISSING_IMPORT.encode(), [], lambda rc: rc == 125, ["nope"]),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_guest_leaves_the_others_running(hostile: Daemon, case: str, tmp_path: Path) -> None:
    api = hostile.api
    make, flags, rc_ok, words = HOSTILE[case]
    # well-behaved neighbours: a sleeper (SDK counter) and a CPU-bound spin with a known answer
    counter = api.create("counter", env={"COUNT": "6", "INTERVAL_MS": "60"}, start=True)
    neighbour = api.create("spin", "40000000", start=True)
    ext = ".wat" if make()[:4] != b"\0asm" else ".wasm"
    f = tmp_path / f"{case}{ext}"
    f.write_bytes(make())
    r = hostile.cli("run", "--rm", *flags, str(f))
    assert rc_ok(r.returncode), (case, r.returncode, r.stdout, r.stderr)
    for w in words:
        assert w in r.stderr, (case, r.stderr)
    if r.returncode == 125:
        assert r.stderr.strip()

    assert hostile.proc is not None and hostile.proc.poll() is None, hostile.log()
    assert api.wait(counter["id"])["code"] == 0
    assert api.logs(counter["id"]).split() == ["1", "2", "3", "4", "5", "6"]
    assert api.wait(neighbour["id"])["code"] == 0
    ref = api.create("spin", "40000000", start=True)
    assert api.wait(ref["id"])["code"] == 0
    assert checksum(api.logs(neighbour["id"])) == checksum(api.logs(ref["id"]))
    assert hostile.cli("run", "--rm", "hello", "9").returncode == 9
    for vm in (counter, neighbour, ref):
        api.ok("DELETE", f"/v1/vms/{vm['id']}")


# ------------------------------------------------------------------------------------------ event loop
def test_event_loop_keeps_answering_under_load(make_daemon: Callable[..., Daemon],
                                               record_property: Callable[[str, object], None]) -> None:
    """Liveness check, measured from outside: while 4 guests burn CPU and modules are imported and
    compiled, GET /v1/info keeps answering promptly. When the daemon exports its own event-loop lag
    (microvmd_event_loop_lag_seconds_max), that is checked too."""
    d = make_daemon(env={"MICROVMD_LOOP_WATCHDOG_MS": "100"})
    api: Api = d.api
    for name in ("spin", "hello"):
        assert api.import_image(wasm(name), name).status == 201
    busy = [api.create("spin", HUGE, start=True)["id"] for _ in range(4)]
    for vm_id in busy:
        api.wait_state(vm_id, "running")

    latencies: list[float] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                r = request(d.socket, "GET", "/v1/info", timeout=30)
                assert r.status == 200
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return
            latencies.append(time.monotonic() - t0)
            stop.wait(0.02)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        t_end = time.monotonic() + 2.0
        imported = 0
        sources = [wasm("hello"), wasm("spin"), wasm("counter"), wasm("grow")]
        while time.monotonic() < t_end or imported < 4:
            data = with_custom_section(sources[imported % len(sources)], secrets.token_bytes(8))
            assert api.import_image(data, f"load-{imported}").status == 201
            imported += 1
            vm = api.create("hello", start=True)
            assert api.wait(vm["id"])["code"] == 0
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    assert len(latencies) > 20
    worst = max(latencies)
    record_property("info_latency_max_ms", round(worst * 1000, 1))
    print(f"GET /v1/info under load: {len(latencies)} calls, median "
          f"{statistics.median(latencies) * 1000:.1f} ms, max {worst * 1000:.1f} ms; {imported} imports")
    assert worst < 0.5, f"the API stalled for {worst:.3f} s"
    metrics = api.metrics()
    if "microvmd_event_loop_lag_seconds_max" in metrics:
        lag = metric_value(metrics, "microvmd_event_loop_lag_seconds_max")
        record_property("daemon_loop_lag_max_ms", round(lag * 1000, 1))
        print(f"in-daemon event loop lag max {lag * 1000:.1f} ms")
        assert lag < 0.5, f"the daemon saw its event loop blocked for {lag:.3f} s"
    for vm_id in busy:
        assert api.vm(vm_id)["state"] == "running"
        api.ok("POST", f"/v1/vms/{vm_id}/kill")


# ------------------------------------------------------------------------------------------ soak (slow)
@pytest.mark.slow
def test_1000_sleeping_vms_progress_on_a_handful_of_threads(make_daemon: Callable[..., Daemon]) -> None:
    """1000 SDK guests that sleep between lines: all make progress, the thread count stays flat, and
    SIGTERM still ends the daemon promptly."""
    d = make_daemon()
    api = d.api
    assert api.import_image(wasm("counter"), "counter").status == 201
    with ThreadSampler(d.pid, every=0.05) as sampler, ThreadPoolExecutor(32) as pool:
        ids = list(pool.map(lambda _: api.create("counter", env={"COUNT": "0", "INTERVAL_MS": "100"},
                                                 start=True)["id"], range(1000)))
        time.sleep(2.0)
        counts = api.ok("GET", "/v1/info")["vms"]
    assert counts["running"] == 1000, counts
    assert sampler.max < MAX_THREADS, sampler.max
    for vm_id in ids[::100]:
        assert len(api.logs(vm_id).split()) >= 3, vm_id
    t0 = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 20
