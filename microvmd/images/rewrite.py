"""Asyncify for any WASI module: the rewrite at import that makes a plain WASI program snapshottable.

A module with no Asyncify build of its own is run through Binaryen's Asyncify pass with the two WASI calls
that block as its suspension points (``fd_read``, ``poll_oneoff``). Those two imports are then renamed to
``microvm_wasi.*``: the daemon serves them itself (devices/wasip1.py) so that a call can suspend the guest
the way SDK device calls do. Renaming only rewrites the import section's strings, so no index moves, and
modules that were not rewritten keep wasmtime's own WASI functions.

The rewrite is a subprocess (``wasm-opt``, at a low priority, killed with the daemon), never run on the
event loop. Its result is cached under ``<state>/images/rewrites`` by (input digest, Binaryen version,
pass arguments), so a module is rewritten once per host; a failure is cached too, with its reason.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import wasmbin

log = logging.getLogger("microvmd.images")

WASI = "wasi_snapshot_preview1"
HOST_MODULE = "microvm_wasi"  # the daemon's suspending versions of the WASI calls below
SUSPENDING = ("fd_read", "poll_oneoff")
# also served by the daemon, not suspension points: the monotonic clock must go on across a snapshot
RENAMED = (*SUSPENDING, "clock_time_get")
# -O3 after the pass: CPython's pure-Python loop costs 1.235x the original's CPU time instead of 1.29x at -O1
# or -O2 (docs/benchmarks.md, section 11). QuickJS is the exception: -O3 takes 95 s instead of 13 s and runs
# 6% slower than -O1 (2.7x the original either way); the rewrite is once per host, CPython is the target.
PASS_ARGS = ("--asyncify", "--pass-arg=asyncify-imports@" + ",".join(f"{WASI}.{n}" for n in SUSPENDING), "-O3")
# Measured on 2 cores (-O3, a busy machine): CPython (26 MB) ~2.6 min, QuickJS (1.4 MB) ~95 s, a small C
# program ~2 s.
SECONDS_PER_MB = 10.0

_version_cache: dict[str, str | None] = {}


def wasm_opt_path() -> str | None:
    return os.environ.get("MICROVMD_WASM_OPT") or shutil.which("wasm-opt")


def binaryen_version(wasm_opt: str | None = None) -> str | None:
    """``wasm-opt --version`` (e.g. ``wasm-opt version 108``), or None without Binaryen. Asked once."""
    exe = wasm_opt or wasm_opt_path()
    if exe is None:
        return None
    if exe not in _version_cache:
        try:
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10, check=True)
            _version_cache[exe] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"
        except (OSError, subprocess.SubprocessError, IndexError):
            _version_cache[exe] = None
    return _version_cache[exe]


def expected_seconds(size: int) -> float:
    return max(1.0, size / 1e6 * SECONDS_PER_MB)


def skip_reason(info: wasmbin.ModuleInfo) -> str | None:
    """Why this module is not rewritten (None: it should be)."""
    names = {(i.module, i.name) for i in info.imports if i.kind == "func"}
    if is_rewritten(info):
        return "already rewritten"
    if any(e.name == "asyncify_start_unwind" for e in info.exports):
        return "has an Asyncify build of its own"
    if not any((WASI, n) in names for n in SUSPENDING):
        return "imports neither fd_read nor poll_oneoff: it never blocks, so it has no suspension point"
    if info.index_space_size("memory") == 0:
        return "has no linear memory to unwind into"
    if info.index_space_size("tag"):  # (MicroPython's WASI build: its nlr jumps are Wasm exceptions)
        return ("stopped_only: it uses Wasm exception handling (it has exception tags), which Binaryen's "
                "Asyncify cannot rewrite: it runs, but cannot be snapshotted while it runs")
    return None


def is_rewritten(info: wasmbin.ModuleInfo) -> bool:
    """A module this daemon (or another) rewrote: Asyncify exports and the renamed WASI imports."""
    return any(e.name == "asyncify_start_unwind" for e in info.exports) and \
        any(i.module == HOST_MODULE for i in info.imports)


def rename_imports(data: bytes, renames: dict[tuple[str, str], tuple[str, str]]) -> bytes:
    """The module with some imports' (module, name) replaced; only the import section changes."""
    info = wasmbin.parse(data)
    sec = next((s for s in info.sections if s.id == 2), None)
    if sec is None:
        return data
    count, pos = wasmbin.read_u32(data, sec.payload_offset)
    out = [wasmbin.encode_u32(count)]
    for _ in range(count):
        names = []
        for _ in range(2):
            n, pos = wasmbin.read_u32(data, pos)
            names.append(data[pos:pos + n].decode("utf-8"))
            pos += n
        desc_start = pos
        imp = next(i for i in info.imports if (i.module, i.name) == (names[0], names[1]))
        pos = _skip_import_desc(data, pos, imp)
        module, name = renames.get((names[0], names[1]), (names[0], names[1]))
        out.append(_name(module) + _name(name) + data[desc_start:pos])
    if pos != sec.end:
        raise wasmbin.WasmFormatError("import section not fully read while renaming", pos)
    payload = b"".join(out)
    new = bytes([2]) + wasmbin.encode_u32(len(payload)) + payload
    return data[:sec.offset] + new + data[sec.end:]


def _name(text: str) -> bytes:
    raw = text.encode("utf-8")
    return wasmbin.encode_u32(len(raw)) + raw


def _skip_import_desc(data: bytes, pos: int, imp: wasmbin.Import) -> int:
    """Past one import descriptor (kind byte included), using the parser's reader for the hard parts."""
    r = wasmbin._Reader(data, pos, len(data))
    kind = r.byte()
    if kind == 0:
        r.leb()
    elif kind == 1:
        r.tabletype()
    elif kind == 2:
        r.memtype()
    elif kind == 3:
        r.globaltype()
    else:
        r.byte()
        r.leb()
    return r.pos


def to_host_imports(data: bytes) -> bytes:
    """Applied to wasm-opt's output (cached as wasm-opt wrote it): the calls the daemon serves itself."""
    return rename_imports(data, {(WASI, n): (HOST_MODULE, n) for n in RENAMED})


# --------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    module: bytes | None  # the rewritten module (imports renamed), or None
    reason: str | None    # why there is none
    seconds: float = 0.0
    cached: bool = False


class RewriteCache:
    """``<dir>/<key>.wasm`` (the rewritten module) or ``<key>.json`` (a failure and its reason)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.work = root / "work"  # wasm-opt's input and output while it runs; cleared at start-up
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(input_hex: str, version: str) -> str:
        return hashlib.sha256("\0".join([input_hex, version, *PASS_ARGS]).encode()).hexdigest()

    def get(self, key: str) -> Result | None:
        try:
            return Result((self.root / f"{key}.wasm").read_bytes(), None, cached=True)
        except FileNotFoundError:
            pass
        try:
            meta = json.loads((self.root / f"{key}.json").read_text())
            return Result(None, str(meta.get("reason")), cached=True)
        except (FileNotFoundError, ValueError):
            return None

    def put(self, key: str, result: Result) -> None:
        if result.module is not None:
            path, blob = self.root / f"{key}.wasm", result.module
        else:
            path, blob = self.root / f"{key}.json", json.dumps({"reason": result.reason}).encode()
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)


def _wrapper() -> list[str]:
    """Low priority (guests and the API come first) and killed with the daemon (PDEATHSIG), through
    ``nice`` and ``setpriv`` rather than a preexec_fn: with one, Python must fork() the whole daemon (a slow
    copy of a big address space, on the event loop) instead of vfork/posix_spawn."""
    out = []
    if (nice := shutil.which("nice")) is not None:
        out += [nice, "-n", "10"]
    if (setpriv := shutil.which("setpriv")) is not None:
        out += [setpriv, "--pdeathsig", "KILL"]
    return out


async def run_wasm_opt(data: bytes, tmp_dir: Path, on_io: Callable[..., object],
                       progress: Callable[[float], None] | None = None) -> Result:
    """Rewrite ``data`` with Asyncify in a ``wasm-opt`` subprocess; file I/O on an I/O thread."""
    exe = wasm_opt_path()
    if exe is None:
        return Result(None, "Binaryen's wasm-opt is not installed (scripts/setup-deps installs it)")
    work = Path(tempfile.mkdtemp(dir=tmp_dir, prefix="asyncify-"))
    src, dst = work / "in.wasm", work / "out.wasm"
    t0 = time.monotonic()
    try:
        await on_io(src.write_bytes, data)  # type: ignore[misc]
        proc = await asyncio.create_subprocess_exec(
            *_wrapper(), exe, str(src), *PASS_ARGS, "-o", str(dst), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            assert proc.stderr is not None
            err_task = asyncio.ensure_future(proc.stderr.read())
            while True:
                try:
                    await asyncio.wait_for(asyncio.shield(proc.wait()), 1.0)
                    break
                except TimeoutError:
                    if progress is not None:
                        progress(time.monotonic() - t0)
            stderr = (await err_task).decode("utf-8", "replace")
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        seconds = time.monotonic() - t0
        if proc.returncode != 0:
            return Result(None, f"Binaryen cannot rewrite this module: {_first_error(stderr, proc.returncode)}",
                          seconds)
        out: bytes = await on_io(dst.read_bytes)  # type: ignore[misc]
        return Result(out, None, seconds)
    finally:
        await on_io(shutil.rmtree, work, True)  # type: ignore[misc]


# Binaryen's --metrics names of the instructions that only read a table; any other "Table*" writes one
_TABLE_READS = ("TableGet", "TableSize")


def tables_fixed(path: Path) -> bool | None:
    """Whether no instruction of the module at ``path`` can change a table (``table.set``, ``grow``, ``fill``,
    ``copy``, ``init``), from Binaryen's instruction counts: True, False, or None when that cannot be told
    (no Binaryen, a module it cannot read). A guest whose tables cannot change needs no record of them as
    instantiated, which costs two FFI calls per slot at every instantiation (CPython has 5,902 slots).
    Blocking (a subprocess of about 2 s for CPython): call it on an I/O thread."""
    exe = wasm_opt_path()
    if exe is None:
        return None
    try:  # -all: any feature the module uses parses; no validation: wasmtime validated it already
        out = subprocess.run([*_wrapper(), exe, "-all", "--no-validation", "--metrics", str(path)],
                             capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    counts = dict(re.findall(r"^ *(\w+) *: *(\d+)", out.stdout, re.M))
    if "total" not in out.stdout or not counts:
        return None
    return not any(k.startswith("Table") and k not in _TABLE_READS and int(v) > 0 for k, v in counts.items())


def _first_error(stderr: str, code: int | None) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower() or "fatal" in ln.lower() or "parse" in ln.lower():
            return ln[:300]
    return lines[0][:300] if lines else f"wasm-opt exited with status {code}"
