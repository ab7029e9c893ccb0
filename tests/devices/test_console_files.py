"""The file console's cap: a log past twice its cap has its head punched out; from the event loop (with an
executor) the punch runs on that executor's thread, never on the caller's."""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from microvmd.devices.console import Console

CAP = 64 * 1024


class Recording(ThreadPoolExecutor):
    """A real one-thread pool that remembers the thread each submitted call ran on."""

    def __init__(self) -> None:
        super().__init__(1)
        self.threads: list[str] = []
        self.futures: list[Future[Any]] = []

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        def run() -> Any:
            self.threads.append(threading.current_thread().name)
            return fn(*args, **kwargs)
        fut = super().submit(run)
        self.futures.append(fut)
        return fut


def _fill(console: Console, n: int) -> None:
    out = console.writer("stdout")
    for i in range(n // 4096):
        out(b"%4095d\n" % i)
    console.release()


def test_the_trim_runs_on_the_executor_and_releases_the_head(tmp_path: Path) -> None:
    c = Console(tmp_path, CAP)
    _fill(c, 4 * CAP)
    pool = Recording()
    try:
        c.enforce_cap(pool)
        c.enforce_cap(pool)  # one trim at a time: the second finds it on its way (or done) and adds none
        for f in list(pool.futures):
            f.result(10)
        assert len(pool.threads) == 1 and pool.threads[0] != threading.current_thread().name
        assert c.released["stdout"] == 3 * CAP  # all but the last cap bytes
        data, _ = c.read("stdout", 0)
        assert len(data) == CAP and data.endswith(b"%4095d\n" % (4 * CAP // 4096 - 1))
        assert c.written == 4 * CAP
    finally:
        pool.shutdown()


def test_without_an_executor_the_trim_runs_here(tmp_path: Path) -> None:
    c = Console(tmp_path, CAP)
    _fill(c, 3 * CAP)
    c.enforce_cap()
    assert c.released["stdout"] == 2 * CAP
    c.enforce_cap()  # under twice the cap again since: nothing more
    assert c.released["stdout"] == 2 * CAP
