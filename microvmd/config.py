"""The daemon's one configuration object: built from a TOML file, then flags, validated once at start-up."""
from __future__ import annotations

import argparse
import logging
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .units import default_socket_path, default_state_dir, parse_duration, parse_size

MiB = 1 << 20

log = logging.getLogger("microvmd.config")

# Keys that did something once (or never) and are now ignored with a warning instead of refused, so a
# config file written for an older microvmd still starts the daemon.
_RETIRED = {
    "engine": {"cache_compiled": "compiled modules are always cached (in memory and in <state>/images)"},
}


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Limits:
    """Per-VM limits; the daemon-wide defaults live here and each VM may narrow them."""

    fuel: int | None = None
    memory: int = 256 * MiB
    timeout: float | None = None
    max_memory: int = 4096 * MiB  # no VM may ask for more
    max_wasm_stack: int = 1 * MiB
    table_elements: int = 100_000
    instances: int = 1
    tables: int = 4
    memories: int = 1
    log_bytes: int = 8 * MiB  # cap per console stream; older output is dropped beyond it
    # console output one VM may write a second (both streams; 0: no limit), and at once: a VM that writes
    # faster is held off its vCPU until its budget refills (nothing is dropped); log_burst 0: log_bytes
    log_rate: int = 1 * MiB
    log_burst: int = 0
    # linear memory all guests together may hold; 0: three quarters of the host's physical memory
    total_memory: int = 0
    # descriptors (WASI files and sockets) one VM may hold; one more is EMFILE to the guest
    open_files: int = 1024
    # descriptors all guests together may hold (one more is ENFILE); 0: half of RLIMIT_NOFILE less the reserve
    total_open_files: int = 0
    # descriptors no guest may take: the daemon's API, stores and logs; 0: a quarter of RLIMIT_NOFILE, at most 1024
    reserved_files: int = 0
    # image imports: compiled at once, waiting beyond those (one more is 503 compile_busy), and the wall
    # clock and address space of one compile (big modules compile in a child process)
    compile_jobs: int = 1
    compile_queue: int = 8
    compile_timeout: float = 300.0
    compile_memory: int = 4096 * MiB
    max_functions: int = 1_000_000  # functions one module may have (422 too_many_functions beyond)

    def log_rate_budget(self) -> tuple[int, int]:
        """(bytes a second, burst) of one VM's console output; (0, 0): unlimited."""
        return (self.log_rate, self.log_burst or self.log_bytes) if self.log_rate else (0, 0)

    def total_memory_budget(self) -> int:
        if self.total_memory:
            return self.total_memory
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 3 // 4
        except (ValueError, OSError):
            return 1 << 62


@dataclass(frozen=True)
class EngineSettings:
    # Ticks of the one epoch clock; a running guest yields to the scheduler at every tick.
    epoch_interval: float = 0.010
    # Fuel between forced yields when a VM has a fuel budget (bounds the overshoot).
    fuel_slice: int = 10_000_000
    # Linear memory virtual reservation and guards; smaller values let more VMs fit the kernel's
    # vm.max_map_count at the price of explicit bounds checks.
    memory_reservation: int | None = None
    memory_guard_size: int | None = None
    workers: int = 0  # 0 = one per CPU
    # how long a vCPU worker waits for a blocked guest's device call before giving the thread back
    # (ping-pong traffic then skips two thread hand-offs; never while other VMs are queued)
    spin_wait: float = 0.0003
    # find a --diff snapshot's changed pages with userfaultfd write-protect + PAGEMAP_SCAN (Linux >= 6.7)
    # instead of comparing all of memory; the first write to each page after a snapshot costs a minor fault
    dirty_tracking: bool = True
    # How guest stdout/stderr reach the per-VM log files. "file": wasmtime writes them itself (fast: a
    # guest write is one write(2); a live VM holds its two log descriptors). "hook": through wasmtime's
    # custom-output hook into the daemon (an idle VM holds no descriptor; each guest write costs 33-41 µs of
    # thread hand-offs inside wasmtime). "auto": "file" while the VMs' log descriptors stay within half
    # of RLIMIT_NOFILE, "hook" for VMs beyond that (dense hosts whose descriptor limit cannot be raised).
    console: str = "auto"


@dataclass(frozen=True)
class Config:
    socket: Path
    state_dir: Path
    log_level: str = "info"
    listen: tuple[str, int] | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token_file: Path | None = None
    gateway: tuple[str, int] | None = ("127.0.0.1", 8080)  # the function gateway; None: off
    gateway_explicit: bool = False  # asked for (flag or file): a port that cannot be bound stops start-up
    # connections the gateway holds at once (one more is answered 503 and closed); 0: half of the descriptors
    # the daemon reserves for itself (limits.reserved_files)
    gateway_connections: int = 0
    # a gateway connection that has not sent a whole request head within it (or sits idle between
    # keep-alive requests that long) is closed
    gateway_idle_timeout: float = 15.0
    # a gateway request admitted by its function whose body has not all arrived within it is answered 408
    gateway_body_timeout: float = 30.0
    import_images: Path | None = None
    import_fetched: bool = False  # --import-images also imports DIR/<name> holding a SHA256SUMS (python, js)
    upload_limit: int = 256 * MiB
    json_limit: int = 4 * MiB
    shutdown_timeout: float = 20.0
    limits: Limits = field(default_factory=Limits)
    engine: EngineSettings = field(default_factory=EngineSettings)

    @property
    def workers(self) -> int:
        return self.engine.workers or (os.cpu_count() or 2)

    def validate(self) -> Config:
        if self.log_level.lower() not in {"debug", "info", "warning", "error", "critical"}:
            raise ConfigError(f"unknown log level {self.log_level!r}")
        if self.listen is not None:
            missing = [n for n in ("tls_cert", "tls_key", "token_file") if getattr(self, n) is None]
            if missing:
                raise ConfigError(
                    "--listen needs TLS and a token: missing " + ", ".join("--" + m.replace("_", "-") for m in missing)
                )
        if self.limits.memory > self.limits.max_memory:
            raise ConfigError("limits.memory is larger than limits.max_memory")
        if self.limits.memory < 65536:
            raise ConfigError("limits.memory must be at least one Wasm page (64KiB)")
        if not isinstance(self.limits.total_memory, int) or not 0 <= self.limits.total_memory < 1 << 62 \
                or 0 < self.limits.total_memory < 65536:
            raise ConfigError("limits.total_memory must be at least one Wasm page (64KiB), or 0 for 3/4 of "
                              "physical memory")
        for key in ("open_files", "total_open_files", "reserved_files"):
            value = getattr(self.limits, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 31:
                raise ConfigError(f"limits.{key} must be a count of descriptors")
        for key in ("log_rate", "log_burst"):
            value = getattr(self.limits, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 50:
                raise ConfigError(f"limits.{key} must be a size (bytes; a rate is per second), or 0")
        for key in ("compile_jobs", "compile_queue", "max_functions"):
            value = getattr(self.limits, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 31:
                raise ConfigError(f"limits.{key} must be a count")
        if self.limits.compile_jobs < 1:
            raise ConfigError("limits.compile_jobs must be at least 1")
        if not isinstance(self.limits.compile_timeout, (int, float)) or not 0 < self.limits.compile_timeout < 1e7:
            raise ConfigError("limits.compile_timeout must be a positive duration")
        if not isinstance(self.limits.compile_memory, int) or self.limits.compile_memory < 256 * MiB:
            raise ConfigError("limits.compile_memory must be at least 256MiB")
        if self.limits.open_files < 1:
            raise ConfigError("limits.open_files must be at least 1")
        if self.engine.epoch_interval <= 0 or self.engine.epoch_interval > 1:
            raise ConfigError("engine.epoch_interval must be in (0, 1] seconds")
        if self.engine.console not in ("auto", "file", "hook"):
            raise ConfigError(f"engine.console must be \"auto\", \"file\" or \"hook\", not {self.engine.console!r}")
        if self.upload_limit < 1024:
            raise ConfigError("upload_limit is too small")
        if isinstance(self.gateway_connections, bool) or not isinstance(self.gateway_connections, int) \
                or not 0 <= self.gateway_connections < 1 << 31:
            raise ConfigError("gateway_connections must be a count of connections (0: half of the reserved "
                              "descriptors)")
        for key in ("gateway_idle_timeout", "gateway_body_timeout"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
                raise ConfigError(f"{key} must be a duration above 0 and at most 1h")
        return self


def _hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} must be HOST:PORT, got {text!r}")
    return (host.strip("[]") or "127.0.0.1", int(port))


_SIZE_KEYS = {"memory", "max_memory", "total_memory", "compile_memory", "max_wasm_stack", "log_bytes", "log_rate",
              "log_burst", "upload_limit", "json_limit", "memory_reservation", "memory_guard_size"}
_DURATION_KEYS = {"timeout", "compile_timeout", "epoch_interval", "shutdown_timeout", "spin_wait",
                  "gateway_idle_timeout", "gateway_body_timeout"}


def _coerce(key: str, value: Any) -> Any:
    try:
        if key in _SIZE_KEYS and isinstance(value, str):
            return parse_size(value)
        if key in _DURATION_KEYS and isinstance(value, str):
            return parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return value


def _section(cls: type, data: dict[str, Any], where: str) -> Any:
    data = dict(data)
    for key, why in _RETIRED.get(where, {}).items():
        if data.pop(key, None) is not None:
            log.warning("config: [%s] %s is ignored: %s", where, key, why)
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown key(s) in [{where}]: {', '.join(sorted(unknown))}")
    return cls(**{k: _coerce(k, v) for k, v in data.items()})


def _flag(value: Any, key: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, not {value!r}")
    return value


def load(args: argparse.Namespace) -> Config:
    """Flags win over the file, the file wins over the defaults."""
    file_data: dict[str, Any] = {}
    if args.config:
        try:
            file_data = tomllib.loads(Path(args.config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {args.config}: {exc}") from None
    daemon = dict(file_data.get("daemon", {}))
    limits = _section(Limits, file_data.get("limits", {}), "limits")
    engine = _section(EngineSettings, file_data.get("engine", {}), "engine")
    unknown = set(file_data) - {"daemon", "limits", "engine"}
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(sorted(unknown))}")

    def pick(name: str) -> Any:
        flag = getattr(args, name, None)
        return flag if flag is not None else daemon.pop(name, None)

    socket = pick("socket")
    state_dir = pick("state_dir")
    listen = pick("listen")
    gateway = pick("gateway")
    cfg = Config(
        socket=Path(socket).absolute() if socket else Path(default_socket_path()),  # as info shows it
        state_dir=Path(state_dir) if state_dir else Path(default_state_dir()),
        log_level=pick("log_level") or "info",
        listen=_hostport(listen, "--listen") if listen else None,
        tls_cert=Path(v) if (v := pick("tls_cert")) else None,
        tls_key=Path(v) if (v := pick("tls_key")) else None,
        token_file=Path(v) if (v := pick("token_file")) else None,
        gateway=("127.0.0.1", 8080) if not gateway else None if gateway == "off" else _hostport(gateway, "--gateway"),
        gateway_explicit=bool(gateway),
        import_images=Path(v) if (v := pick("import_images")) else None,
        import_fetched=_flag(pick("import_fetched"), "import_fetched"),
        limits=limits,
        engine=engine,
    )
    rest = {k: _coerce(k, v) for k, v in daemon.items()}
    known = {"upload_limit", "json_limit", "shutdown_timeout", "gateway_connections", "gateway_idle_timeout",
             "gateway_body_timeout"}
    if set(rest) - known:
        raise ConfigError(f"unknown key(s) in [daemon]: {', '.join(sorted(set(rest) - known))}")
    return replace(cfg, **rest).validate()
