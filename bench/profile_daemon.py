#!/usr/bin/env python3
"""Profile a private microvmd under one benchmark's workload with py-spy, and summarise where its threads spend
their samples (the "Why it misses" paragraphs of docs/benchmarks.md quote these summaries).

Workloads (each runs for --seconds while py-spy samples the daemon, all threads, native frames off):
  run-wait   POST /v1/vms?wait=true {"image": "hello", "start": true} + DELETE, in a loop (bench_run)
  run-two    POST /v1/vms {"start": true} + POST .../wait + DELETE, in a loop (bench_run)
  net-rtt    32-byte round trips to an echo VM's published port, one connection (bench_net)
  net-stream 8 connections streaming 4 MiB each through the echo VM, repeatedly (bench_net)
  snapshot   full snapshots of fresh memtouch MB=64 VMs (bench_snapshot; boots are sampled too, see the
             per-thread summary: the hashing and I/O threads are the snapshot's)
  py-answer  bench_python's "first answer": restore the idle CPython REPL, stream a line to its stdin, read the
             answer from logs?follow=true, delete (the daemon runs on bench_python's kept state dir, which must
             hold the rewritten python image: run bench/bench_python.py once first)

Output: samples per thread, then the top functions by own samples ("self") and by samples anywhere on the stack
("total"), each as a share of all samples of the process (py-spy --idle is off: a thread waiting in the
kernel is not sampled, so the shares are of busy time). --raw keeps py-spy's collapsed stacks.

  python bench/profile_daemon.py run-wait --seconds 10
"""
from __future__ import annotations

import argparse
import collections
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

WORKLOADS = ("run-wait", "run-two", "net-rtt", "net-stream", "snapshot", "py-answer")


def loop_run(d: c.Daemon, stop: threading.Event, wait_param: bool) -> int:
    cl = d.client()
    spec = b'{"image": "hello", "start": true}'
    n = 0
    while not stop.is_set():
        if wait_param:
            st, body = cl.raw("POST", "/v1/vms?wait=true", spec)
            vm_id = json.loads(body)["id"]  # (the daemon's JSON has no spaces)
        else:
            st, body = cl.raw("POST", "/v1/vms", spec)
            vm_id = json.loads(body)["id"]  # (the daemon's JSON has no spaces)
            cl.raw("POST", f"/v1/vms/{vm_id}/wait")
        cl.raw("DELETE", f"/v1/vms/{vm_id}?force=true")
        n += 1
    cl.close()
    return n


def echo_vm(d: c.Daemon) -> int:
    cl = d.client()
    vm = cl.call("POST", "/v1/vms", {"image": "echo", "start": True,
                                     "publish": [{"guest_port": 8000, "host_port": 0}]})
    port = int(vm["devices"]["net"]["published"][0]["host_port"])
    while cl.call("GET", f"/v1/vms/{vm['id']}")["blocked_in"] != "net_poll":
        time.sleep(0.02)
    cl.close()
    return port


def loop_rtt(port: int, stop: threading.Event) -> int:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = bytes(range(32))
    n = 0
    while not stop.is_set():
        s.sendall(msg)
        got = 0
        while got < 32:
            got += len(s.recv(32 - got))
        n += 1
    s.close()
    return n


def loop_stream(port: int, stop: threading.Event) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_net

    n = 0
    while not stop.is_set():
        bench_net.throughput(port, 8, 4 << 20)
        n += 1
    return n


def loop_snapshot(d: c.Daemon, stop: threading.Event) -> int:
    import bench_snapshot as b

    cl = b.Http(d.socket)
    n = 0
    while not stop.is_set():
        vm = b.memtouch(cl, f"prof-{n}", 64, 5000 + n)
        cl.call("POST", f"/v1/vms/{vm}/snapshots", {"name": f"prof-{n}"})
        b.rm_vm(cl, vm)
        b.rm_snap(cl, f"prof-{n}")
        n += 1
    cl.close()
    return n


def py_answer_setup(d: c.Daemon) -> None:
    import bench_python as bp

    cl = c.UnixHttp(d.socket, timeout=120)
    bp.cleanup(cl)
    vm = cl.call("POST", "/v1/vms", {"image": "python", "name": bp.PREFIX + "repl", "args": ["-u", "-c", bp.REPL],
                                     "stdin": True, "start": True})
    bp.wait_blocked(cl, vm["id"])
    cl.call("POST", f"/v1/vms/{vm['id']}/snapshots", {"name": f"{bp.PREFIX}idle-0"})
    cl.call("DELETE", f"/v1/vms/{vm['id']}?force=true")
    cl.close()


def loop_py_answer(d: c.Daemon, stop: threading.Event) -> int:
    import bench_python as bp

    cl = c.UnixHttp(d.socket, timeout=120)
    n = 0
    while not stop.is_set():
        bp.first_answer(d.socket, cl, lambda: cl.call("POST", f"/v1/snapshots/{bp.PREFIX}idle-0/restore",
                                                      {"start": True})["id"])
        n += 1
    cl.close()
    return n


def summarise(raw: Path, top: int) -> str:
    """py-spy's raw format: one line per distinct stack, 'thread;frame;frame;... count'."""
    per_thread: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    n = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]
        per_thread[thread] += k
        n += k
        if frames:
            own[frames[-1]] += k
            for f in set(frames):
                total[f] += k
    out = [f"{n} samples of busy threads"]
    out.append(c.table(["thread", "samples", "share"],
                       [[t, str(v), f"{v / n * 100:.1f}%"] for t, v in per_thread.most_common(12)]))
    out.append("")
    out.append(c.table(["function (self)", "samples", "share"],
                       [[f, str(v), f"{v / n * 100:.1f}%"] for f, v in own.most_common(top)]))
    out.append("")
    infra = ("threading.py", "runpy", "asyncio/runners.py", "uvloop/__init__.py", "concurrent/futures/thread.py",
             "microvmd/daemon.py", "aiohttp/web_middlewares.py")  # frames under everything: not listed
    out.append(c.table(["function (total: anywhere on the stack; thread and loop plumbing left out)", "samples",
                        "share"],
                       [[f, str(v), f"{v / n * 100:.1f}%"] for f, v in total.most_common()
                        if not any(x in f for x in infra)][:top]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=WORKLOADS)
    ap.add_argument("--seconds", type=float, default=10.0, help="how long py-spy samples (default 10)")
    ap.add_argument("--rate", type=int, default=500, help="samples per second (default 500)")
    ap.add_argument("--top", type=int, default=25, help="functions listed (default 25)")
    ap.add_argument("--gil", action="store_true", help="only sample the thread holding the GIL (py-spy --gil)")
    ap.add_argument("--raw", metavar="FILE", help="keep py-spy's collapsed stacks here")
    ap.add_argument("--ref", metavar="GIT-REV", help="profile a clean export of this revision's microvmd/")
    a = ap.parse_args(argv)
    c.set_ref(a.ref)
    spy = shutil.which("py-spy") or str(c.BIN_DIR / "py-spy")
    tmp = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    raw = Path(a.raw) if a.raw else tmp / "stacks.txt"
    stop = threading.Event()
    done: list[int] = []
    try:
        if a.workload == "py-answer":
            import bench_python as bp

            daemon = c.Daemon(state_dir=bp.state_dir(), import_images=False)
        else:
            daemon = c.Daemon()
        with daemon as d:
            if a.workload == "py-answer":
                py_answer_setup(d)

                def work() -> None:
                    done.append(loop_py_answer(d, stop))
            elif a.workload in ("run-wait", "run-two"):
                def work() -> None:
                    done.append(loop_run(d, stop, a.workload == "run-wait"))
            elif a.workload in ("net-rtt", "net-stream"):
                port = echo_vm(d)

                def work() -> None:
                    done.append((loop_rtt if a.workload == "net-rtt" else loop_stream)(port, stop))
            else:
                def work() -> None:
                    done.append(loop_snapshot(d, stop))
            t = threading.Thread(target=work)
            t.start()
            time.sleep(1.0)  # warm up
            cmd = [spy, "record", "-p", str(d.pid), "-d", str(int(a.seconds)), "-r", str(a.rate), "--threads",
                   "-f", "raw", "-o", str(raw), "--nonblocking"] + (["--gil"] if a.gil else [])
            p = subprocess.run(cmd, capture_output=True, text=True)
            stop.set()
            t.join()
            if p.returncode != 0:
                print(p.stderr, file=sys.stderr)
                return 1
        c.emit(f"## py-spy of microvmd under {a.workload} ({a.seconds:.0f} s at {a.rate} Hz"
               f"{', GIL holder only' if a.gil else ''}; {done[0] if done else '?'} iterations in all)\n")
        c.emit(summarise(raw, a.top))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # --raw writes elsewhere
    return 0


if __name__ == "__main__":
    sys.exit(main())
