"""Descriptor budgets (issue 13 row 1): a guest that opens files in a loop gets EMFILE at its own limit
(``limits.open_files``) or ENFILE at the daemon's (``limits.total_open_files``), closing gives them back,
and the daemon keeps serving while guests hold all they can get."""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from mvapi import IMAGES, Daemon


def _opened(text: str) -> tuple[int, str, int]:
    m = re.search(r"opened (\d+) \(([^)]*)\)\s+reopened (\d+)", text)
    assert m is not None, text
    return int(m.group(1)), m.group(2), int(m.group(3))


def _fdbomb(d: Daemon, tmp_path: Path, name: str, hold_ms: int = 0) -> dict[str, object]:
    host = tmp_path / name
    host.mkdir()
    return d.api.create("fdbomb", name=name, start=True, dirs=[{"host": str(host), "guest": "/d"}],
                        env={"HOLD_MS": str(hold_ms)})


def test_guest_files_are_budgeted_per_vm_and_for_the_daemon(make_daemon: Callable[..., Daemon],
                                                             tmp_path: Path) -> None:
    """Issue 13 row 1: a guest opened 19,953 files and every API call was reset until it ended."""
    cfg = tmp_path / "files.toml"
    cfg.write_text("[limits]\nopen_files = 50\ntotal_open_files = 80\n")
    d = make_daemon("--config", str(cfg))
    d.mv("image", "import", str(IMAGES / "fdbomb" / "fdbomb.wasm"), "--name", "fdbomb")
    info = d.api.ok("GET", "/v1/info")["limits"]
    assert (info["open_files"], info["total_open_files"], info["total_open_files_used"]) == (50, 80, 0)
    assert info["reserved_files"] > 0 and info["process_open_files"] >= 80 + info["reserved_files"]

    # alone: its own limit, EMFILE; everything it closed can be opened again
    one = _fdbomb(d, tmp_path, "one")
    assert d.api.wait("one")["code"] == 0
    assert _opened(d.api.logs("one")) == (50, "No file descriptors available", 50)  # EMFILE

    # a holder keeps 50; the next guest gets the 30 the daemon's budget has left, then ENFILE
    _fdbomb(d, tmp_path, "holder", hold_ms=60_000)
    d.api.wait_state("holder", "running")
    while "reopened" not in d.api.logs("holder"):
        time.sleep(0.05)
    holder = d.api.vm("holder")
    assert holder["devices"]["files"]["open"] == 50 and holder["devices"]["files"]["limit"] == 50
    assert d.api.ok("GET", "/v1/info")["limits"]["total_open_files_used"] == 50
    _fdbomb(d, tmp_path, "second")
    assert d.api.wait("second")["code"] == 0
    assert _opened(d.api.logs("second")) == (30, "Too many open files in system", 30)  # ENFILE
    metrics = d.api.metrics()
    assert 'microvmd_open_files{kind="used"} 50.0' in metrics
    assert "microvmd_open_files_refused_total" in metrics

    # the budget comes back when a VM ends
    d.api.ok("DELETE", "/v1/vms/holder?force=true")
    assert d.api.ok("GET", "/v1/info")["limits"]["total_open_files_used"] == 0
    assert one["id"]


def test_the_api_and_new_vms_work_while_guests_hold_all_they_can(make_daemon: Callable[..., Daemon],
                                                                 tmp_path: Path) -> None:
    """Four guests at the default per-VM limit (1024) under a small process limit: the daemon's reserve keeps
    its API answering and a new VM running to its end."""
    d = make_daemon(start=False)
    d.prefix = ["prlimit", "--nofile=8192:8192", "--"]
    d.start()
    d.mv("image", "import", str(IMAGES / "fdbomb" / "fdbomb.wasm"), "--name", "fdbomb")
    limits = d.api.ok("GET", "/v1/info")["limits"]
    assert limits["process_open_files"] == 8192 and limits["total_open_files"] == 4096 - 1024
    for k in range(4):
        _fdbomb(d, tmp_path, f"fd{k}", hold_ms=60_000)
    got = []
    for k in range(4):
        while "reopened" not in d.api.logs(f"fd{k}"):
            time.sleep(0.05)
        got.append(_opened(d.api.logs(f"fd{k}")))
    # (they race for the budget: who gets how many depends on the order of their opens and closes)
    assert max(opened for opened, _, _ in got) == 1024, got
    held = sum(reopened for _, _, reopened in got)
    assert 1024 <= held <= 3072 and d.api.ok("GET", "/v1/info")["limits"]["total_open_files_used"] == held, got
    d.mv("image", "import", str(IMAGES / "hello" / "hello.wasm"), "--name", "hello")
    hello = d.api.create("hello", start=True)  # a VM that needs its own descriptors (console, store)
    assert d.api.wait(hello["id"])["code"] == 0
    for k in range(4):
        d.api.ok("DELETE", f"/v1/vms/fd{k}?force=true")
    assert d.api.ok("GET", "/v1/info")["limits"]["total_open_files_used"] == 0
