"""``microvmd``: start-up, the main loop and graceful shutdown, with signals handled in one place."""
from __future__ import annotations

import argparse
import asyncio
import faulthandler
import gc
import logging
import os
import signal
import socket
import stat
import sys
from pathlib import Path
from typing import Any

import prometheus_client
from aiohttp import web

from . import __version__, systemd
from .config import Config, ConfigError, load
from .errors import MicrovmError
from .logsafe import SafeFormatter

log = logging.getLogger("microvmd")


class _VmFieldFormatter(SafeFormatter):
    def format(self, record: logging.LogRecord) -> str:
        vm = getattr(record, "vm", None)
        if vm:
            record.msg = f"vm={vm} {record.msg}"
        return super().format(record)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="microvmd",
        description="microvmd: a hypervisor for WebAssembly micro-VMs, driven over a Unix-socket HTTP API.",
        epilog="Example: microvmd --socket /tmp/mv.sock --state-dir /tmp/mv-state --import-images images",
    )
    p.add_argument("--socket", help="API socket path (default: /run/microvmd/microvmd.sock for root, "
                                    "$XDG_RUNTIME_DIR/microvmd/microvmd.sock otherwise)")
    p.add_argument("--state-dir", dest="state_dir", help="where images, VMs and snapshots live "
                                                         "(default: /var/lib/microvmd or ~/.local/share/microvmd)")
    p.add_argument("--config", help="TOML configuration file ([daemon], [limits], [engine])")
    p.add_argument("--log-level", dest="log_level", help="debug, info (default), warning, error")
    p.add_argument("--listen", help="also serve the API over TLS on HOST:PORT (needs --tls-cert, --tls-key, "
                                    "--token-file)")
    p.add_argument("--tls-cert", dest="tls_cert")
    p.add_argument("--tls-key", dest="tls_key")
    p.add_argument("--token-file", dest="token_file")
    p.add_argument("--gateway", metavar="HOST:PORT|off",
                   help="the function HTTP gateway (default 127.0.0.1:8080; 'off' disables it)")
    p.add_argument("--import-images", dest="import_images", metavar="DIR",
                   help="at start-up, import every DIR/<name>/<name>.wasm as image <name>, except the fetched "
                        "ones (a DIR/<name> with a SHA256SUMS: python and js, from scripts/fetch-interpreters) "
                        "unless --import-fetched is given")
    p.add_argument("--import-fetched", dest="import_fetched", action="store_true", default=None,
                   help="with --import-images, import the fetched images too (make run does): CPython takes "
                        "about a minute to compile and, once per state dir, minutes to rewrite in the background")
    p.add_argument("--version", action="version", version=f"microvmd {__version__}")
    return p.parse_args(argv)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_VmFieldFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if root.level > logging.DEBUG:  # one line per function instance only when debugging
        logging.getLogger("microvmd.vm.fn").setLevel(logging.WARNING)


def _bind_unix(path: Path) -> socket.socket:
    """Bind the API socket 0660; refuse to steal a live daemon's socket. A socket directory that does not
    exist is made 0750; an existing one keeps its mode (``--socket /tmp/x.sock`` must not take 1777 from
    /tmp), so its owner decides who reaches the socket through it."""
    path.parent.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.parent.mkdir(mode=0o750)
    except FileExistsError:
        pass
    else:
        os.chmod(path.parent, 0o750)  # mkdir's mode went through the umask: make it exactly 0750
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale socket from a daemon that died
        else:
            raise ConfigError(f"another microvmd is already serving {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o660)
    sock.listen(512)
    return sock


def _sample_images(directory: Path, fetched: bool) -> list[Path]:
    """DIR/<name>/<name>.wasm for each image directory; ``fetched``: also those holding a SHA256SUMS, the
    modules scripts/fetch-interpreters downloads (big interpreters no test or quick start should pay for)."""
    return [sub / f"{sub.name}.wasm" for sub in sorted(directory.iterdir())
            if sub.is_dir() and (sub / f"{sub.name}.wasm").is_file() and (fetched or not (sub / "SHA256SUMS").exists())]


async def _import_images(hv: object, directory: Path, fetched: bool) -> None:
    """Import the sample images of DIR (``_sample_images``), compiling them in parallel on I/O threads."""
    from .vmm.manager import Hypervisor

    assert isinstance(hv, Hypervisor)

    async def one(wasm: Path) -> None:
        name = wasm.parent.name
        try:
            data = await hv.sched.on_io(wasm.read_bytes)
            # a long rewrite must not delay start-up; a full compile queue makes the daemon's own imports wait
            img = await hv.import_image(data, name, background=True, wait=True)
            log.info("image %s ready (%s)", name, img.digest[:19])
        except MicrovmError as exc:
            log.error("cannot import %s: %s", wasm, exc.message)

    found = await hv.sched.on_io(_sample_images, directory, fetched)
    await asyncio.gather(*(one(w) for w in found))


def _raise_fd_limit() -> None:
    """Every VM holds a few descriptors (console files, sockets): use the whole hard limit we are allowed."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    log.info("open-file limit %d (about %d VMs with consoles; raise LimitNOFILE for more)",
             max(soft, hard), max(soft, hard) // 3)


# Shutdown budgets (seconds): requests in flight first get DRAIN_GRACE to finish on their own, before the
# guests they may be waiting for are stopped; what is still in flight after that gets CANCEL_AFTER more.
DRAIN_GRACE = 2.0
CANCEL_AFTER = 5.0


async def serve(cfg: Config) -> int:
    from .api import remote
    from .api.gateway import Gateway, GatewayStats
    from .api.routes import api_routes
    from .api.server import make_app
    from .control.controller import Controller
    from .devices import install_devices
    from .functions.service import Functions
    from .snapshot.controller import Snapshots
    from .vmm.manager import Hypervisor

    notifier = systemd.Notifier(unset_env=True)
    _raise_fd_limit()
    # no *_created series next to the API's counter and histogram: they double the scrape and the old
    # hand-written exposition had none (a process-wide switch, hence here and not in api/metrics.py)
    prometheus_client.disable_created_metrics()
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    hv = Hypervisor(cfg)
    install_devices(hv)
    # What is made so far (modules, classes, the engine, the linker and the devices: ~60,000 objects) lives
    # as long as the daemon: out of the cycle collector's sight, a full collection (every few seconds under
    # load) scans only what came later. Each used to stop the event loop for 21-33 ms, the functions' p99
    # tail (docs/benchmarks.md); now 1-2 ms. VMs, images and snapshots come later: their objects, which go
    # away with them, stay collectable.
    gc.freeze()
    await hv.load()
    hv.analyse_images_later()
    if cfg.import_images is not None:
        await _import_images(hv, cfg.import_images, cfg.import_fetched)

    snaps = Snapshots(hv)
    await snaps.startup()
    hv.on_remove.append(lambda vm: snaps.forget(vm.id))
    hv.on_remove.append(snaps.checkpoints.removed)
    functions = Functions(hv, snaps, cfg.gateway)
    if cfg.gateway is not None:  # (no gateway, no gateway series in /metrics)
        functions.gateway_stats = GatewayStats(cfg.gateway_connections or max(16, hv.files.reserve // 2))
    await functions.startup()
    controller = Controller(hv, snaps, functions)
    token = remote.load_token(cfg)
    app = make_app(controller, api_routes(hv), [remote.token_middleware(token)] if token else None)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    inherited = systemd.listen_fds()
    sock = inherited[0] if inherited else _bind_unix(cfg.socket)
    # the inode we bound: at exit the path is removed only if it is still ours (not a successor's socket)
    bound_inode = None if inherited else cfg.socket.stat().st_ino
    sock.setblocking(False)
    sites: list[web.BaseSite] = [web.SockSite(runner, sock)]
    for dev in hv.devices:
        sites.extend(dev.sites(runner))
    sites.extend(remote.sites(cfg, runner))
    for s in sites:
        await s.start()
    gateway: Gateway | None = None
    if cfg.gateway is not None:
        assert functions.gateway_stats is not None
        # the idle timeout is armed when a connection opens and after each answer: a connection still without
        # a whole request head then is closed (a slow-headers client cannot hold one forever)
        gateway = Gateway(controller, functions.gateway_stats, cfg.gateway_body_timeout, cfg.gateway_idle_timeout)
        try:
            await gateway.start(cfg.gateway[0], cfg.gateway[1])
            log.info("function gateway on http://%s:%d", *cfg.gateway)
        except OSError as exc:
            if cfg.gateway_explicit:
                raise ConfigError(f"cannot serve the function gateway on {cfg.gateway[0]}:{cfg.gateway[1]}: "
                                  f"{exc.strerror or exc}") from None
            log.warning("function gateway off: cannot listen on %s:%d (%s); choose a port with --gateway",
                        cfg.gateway[0], cfg.gateway[1], exc.strerror or exc)
            functions.gateway = None
            functions.gateway_stats = None
            gateway = None

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    where = "socket passed by systemd" if inherited else str(cfg.socket)
    log.info("microvmd %s serving on %s (state %s, %d vCPU workers)", __version__, where, cfg.state_dir,
             cfg.workers)
    hv.loop_lag.start()
    hv.heap_trim.start(hv.sched.on_io)
    # VMs that outlive the daemon (docs/operations.md): those suspended by the last clean stop resume from
    # their snapshots; the others whose restart policy wants them running start again from their images
    again = hv.restart_at_start()
    if again:
        log.info("starting %d VMs again by their restart policies", len(again))
    resuming = asyncio.get_running_loop().create_task(snaps.resume_suspended())
    snaps.checkpoints.start()  # --checkpoint-interval (snapshot/checkpoints.py)
    notifier.ready(f"serving on {where}")
    notifier.start_watchdog()

    await stop.wait()
    if not resuming.done():
        resuming.cancel()
    await shutdown(cfg, hv, snaps, app, runner, sites, notifier, bound_inode, gateway, functions)
    log.info("stopped")
    return 0


async def shutdown(cfg: Config, hv: Any, snaps: Any, app: web.Application, runner: web.AppRunner,
                   sites: list[web.BaseSite], notifier: systemd.Notifier, bound_inode: int | None,
                   gateway: Any = None, functions: Any = None) -> None:
    """The one ordered shutdown path (docs/architecture.md, "Shutdown"). Each step relies on the ones before
    it: no request is answered 500 because a pool, the snapshot store or a device closed under it, and
    nothing reaches a component after it has closed."""
    from .api.server import DRAIN

    notifier.stopping("draining API requests")
    await notifier.stop_watchdog()
    await hv.loop_lag.stop()
    await hv.heap_trim.stop()

    # 1. No new connections: the listening sockets close (a client is refused, not answered 5xx); no deploys.
    for site in sites:
        await site.stop()
    if gateway is not None:
        await gateway.stop()
    if functions is not None:
        functions.closing = True

    # 2. Requests in flight finish on their own while everything they use still works; idle keep-alive
    #    connections close now, busy ones after their answer.
    drain = app[DRAIN]
    busy = await drain.drain(runner.server, DRAIN_GRACE)
    if functions is not None:  # function requests in flight finish too (their instances still run)
        busy += await functions.drain(DRAIN_GRACE)
    log.info("shutting down: stopping guests (%d API connections still busy)", busy)

    # 3. Guests stop. create() refuses from here on (503 shutting_down), and requests waiting for a guest
    #    (wait, logs --follow, run with ?wait=true) get their answer.
    notifier.stopping("stopping guests")
    try:
        # VMs whose restart policy keeps them running (always, unless-stopped) are suspended to snapshots
        # first (snaps.suspend_all), the next start resumes them; every other live VM is stopped
        await asyncio.wait_for(hv.stop_guests(snaps.suspend_all), cfg.shutdown_timeout)
    except TimeoutError:
        log.error("guests did not stop within %.0f s", cfg.shutdown_timeout)

    # 4. Requests still in flight get CANCEL_AFTER more seconds (still reading their bodies: a create that
    #    arrives only now is answered 503 shutting_down); then the HTTP server ends and cancels what is left
    #    (aiohttp's own shutdown stops reading at once, so it comes after our drain, not instead of it).
    busy = await drain.drain(runner.server, CANCEL_AFTER)
    if busy:
        log.warning("shutting down: cancelling %d API requests still in flight", busy)
    await runner.cleanup()
    if gateway is not None:  # its requests waited for their guests in step 3: they have their answers
        await gateway.cleanup()
    log.debug("shutdown: HTTP server closed")
    if functions is not None:
        await functions.close()

    # 5. VM records: ephemeral VMs removed, every record written, the persist thread ended.
    await hv.close()
    log.debug("shutdown: VM records written")
    # 6. The snapshot store (its hashing pool and spare files).
    snaps.close()
    log.debug("shutdown: snapshot store closed")
    # 7. Devices (published ports, disks).
    for dev in hv.devices:
        await dev.shutdown()
    log.debug("shutdown: devices closed")
    # 8. vCPU workers, I/O pool and the epoch ticker: nothing is left to use them.
    hv.compiler.close()
    hv.sched.close()
    log.debug("shutdown: workers and pools stopped")
    # 9. The socket path, if it is still the one we bound (systemd owns a socket it passed us).
    if bound_inode is not None:
        try:
            if cfg.socket.stat().st_ino == bound_inode:
                cfg.socket.unlink()
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load(args)
    except ConfigError as exc:
        print(f"microvmd: {exc}", file=sys.stderr)
        return 2
    _setup_logging(cfg.log_level)
    # a crash in native code (wasmtime, a mapping) leaves every thread's Python stack in the log (journald
    # under systemd), not only "segfault" in the kernel's
    faulthandler.enable(all_threads=True)
    run: Any = asyncio.run
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency, but keep the daemon usable
        pass
    try:
        return int(run(serve(cfg)))
    except ConfigError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
