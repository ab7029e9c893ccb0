"""Functions: deployed handlers, their routes, and one fresh micro-VM per request (docs/functions.md).

A function is a record (``contract.FunctionRecord``, one file per function under ``functions/`` in the
state directory) plus what every request starts from:
- ``wagi``: the image; each request boots a new ephemeral VM with the request as CGI environment and stdin.
- ``python`` / ``js``: a snapshot of the interpreter's guest taken at deploy, once the handler is loaded and
  the guest waits for its request on stdin; each request restores a new ephemeral VM from it.

Requests to one function are bounded by its concurrency limit and a bounded queue (503 with Retry-After
beyond). A redeploy swaps the function at once; requests in flight finish on the version they started with,
whose snapshot is removed when the last of them ends.
"""
from __future__ import annotations

import asyncio
import base64
import bisect
import itertools
import json
import logging
import random
import secrets
import shutil
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import wasmtime

from .. import contract, durable, logsafe
from ..devices import fnio
from ..devices.console import MemoryConsole
from ..devices.wasip1 import STDIN_LIMIT, WasiState
from ..errors import BadRequest, Conflict, MicrovmError, NotFound, ShuttingDown, Unprocessable
from ..images.store import RESERVED_PREFIX
from ..snapshot.controller import Snapshots
from ..vmm.manager import Hypervisor
from ..vmm.state import VmState
from ..vmm.vm import Vm, VmSpec
from . import direct, drivers, wagi
from .http import FnRequest, FnResponse, add_header, error_response

log = logging.getLogger("microvmd.functions")

DEFAULT_TIMEOUT = 30.0  # seconds per request when the function sets none (and the daemon's limits neither)
DEFAULT_CONCURRENCY = 32
QUEUE_PER_SLOT = 4  # requests that may wait for a slot, per slot of the concurrency limit
MAX_BODY = STDIN_LIMIT - 64 * 1024  # a request body reaches the guest through its stdin buffer (with headers)
DEPLOY_TIMEOUT = 120.0  # for the handler to load and wait for its first request
WARM_IDLE = 30.0  # seconds a function keeps idle warm instances (--reuse) and spare fresh ones
SPARES = 2  # fresh instances a function with requests keeps restored ahead of time (snapshot executors)
LOG_CAP = 256 * 1024  # bytes of log kept per function (in memory; the daemon's log has the errors too)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RUNTIMES = {"python": "python", "js": "js"}  # runtime -> the image name of its interpreter


class FunctionLog:
    """The last LOG_CAP bytes of a function's log lines: invocations that failed, and their guests' stderr."""

    def __init__(self) -> None:
        self.lines: deque[str] = deque()
        self.size = 0

    def write(self, line: str) -> None:
        self.lines.append(line)
        self.size += len(line) + 1
        while self.size > LOG_CAP and len(self.lines) > 1:
            self.size -= len(self.lines.popleft()) + 1

    def text(self) -> str:
        return "".join(f"{x}\n" for x in self.lines)


@dataclass
class Version:
    """One deployed version of a function: what its requests start from."""

    rec: contract.FunctionRecord
    in_flight: int = 0
    retired: bool = False  # replaced or removed: its snapshot goes when its last request ends
    # what its direct instances start from (direct.py, a _DirectStart): None before anyone asked, the task
    # making it meanwhile (requests run as VMs until it is done), False when the function cannot have them
    direct: Any = None


@dataclass
class _DirectStart:
    """What a version's direct instances start from (Functions._make_direct_start)."""

    prepared: direct.Prepared
    entry: str
    boot: list[str]
    argv: list[str]
    env: dict[str, str]
    memory: int | None  # SDK: the instance's memory limit (WAGI: per request, from the image)
    rewind: str | None  # SDK: the Asyncify state global of the baked snapshot (the module starts rewinding)
    mono_ns: int  # SDK: the snapshot's monotonic clock, which goes on from there


@dataclass
class Warm:
    """A warm instance of a --reuse function: alive, waiting in its driver for the next request line."""

    vm: Vm
    version: Version
    out: int = 0  # stdout and stderr read so far
    err: int = 0
    idle_since: float = 0.0


@dataclass
class Function:
    """A deployed function: its current version, limits and counters (on the event loop only)."""

    name: str
    current: Version
    slots: asyncio.Semaphore
    log: FunctionLog = field(default_factory=FunctionLog)
    active: int = 0
    queued: int = 0
    invocations: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    last_invoked: float | None = None
    # latency histogram: requests per LATENCY_BUCKETS bucket (the last: above every bound), and their sum
    latency_hits: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    instance_times: deque[float] = field(default_factory=lambda: deque(maxlen=1000))  # s to a fresh instance
    restore_times: deque[float] = field(default_factory=lambda: deque(maxlen=1000))  # s of one restore
    warm: list[Warm] = field(default_factory=list)  # --reuse: idle instances, the most recently used last
    spares: deque[tuple[Vm, Version]] = field(default_factory=deque)  # fresh instances restored ahead of time
    refill: asyncio.Task[None] | None = None
    last_request: float = 0.0
    direct: int = 0  # WAGI and SDK requests answered by a direct instance
    direct_to_vm: int = 0  # ... and those that went on as a VM

    @property
    def latency(self) -> list[int]:
        """Cumulative counts per LATENCY_BUCKETS bound then +Inf, as Prometheus has them."""
        return list(itertools.accumulate(self.latency_hits))

    @property
    def rec(self) -> contract.FunctionRecord:
        return self.current.rec

    @property
    def concurrency(self) -> int:
        return self.rec.max_concurrency or DEFAULT_CONCURRENCY

    @property
    def queue_limit(self) -> int:
        return self.concurrency * QUEUE_PER_SLOT


def gateway_base(host: str, port: int) -> str:
    """The address a client on this host reaches the gateway at: a wildcard bind is reached at loopback, an
    IPv6 address goes in brackets."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def normalise_route(route: str) -> str:
    """"/py/..." and "/py/" mean "/py" (a route serves its own path and everything below it)."""
    if route.endswith("/..."):
        route = route[:-4]
    route = route.rstrip("/")
    return route or "/"


class Functions:
    """The deployed functions of one daemon, and their invocations."""

    def __init__(self, hv: Hypervisor, snapshots: Snapshots, gateway: tuple[str, int] | None) -> None:
        self.hv = hv
        self.snaps = snapshots
        self.gateway = gateway
        self.gateway_stats: Any = None  # api.gateway.GatewayStats, set by the daemon (its connections, /metrics)
        self.dir = hv.cfg.state_dir / "functions"
        self.by_name: dict[str, Function] = {}
        self.routes: dict[str, Function] = {}
        self._deploying: dict[str, asyncio.Lock] = {}  # one deploy or removal of a name at a time
        self._commit = asyncio.Lock()  # the tables and records change under it
        self._retiring: set[asyncio.Task[None]] = set()
        self.closing = False
        # request ids: 48 random bits each, from a generator seeded by the system once (no system call per
        # request; an id says nothing of how many requests came before it)
        self._rids = random.Random(secrets.randbits(128))
        self._reaper_task: asyncio.Task[None] | None = None
        snapshots.protected.append(self._owner_of)
        sched = hv.sched
        self.direct = direct.DirectRunner.for_daemon(hv.engine, hv.opts, hv.cfg.limits, sched.workers,
                                                     sched.epoch_interval, sched.quantum, sched.fuel_slice,
                                                     hv.builder.memory)
        sched.engines.append(self.direct.engine)

    # ------------------------------------------------------------------ start-up and records
    async def startup(self) -> None:
        # (compiles of baked snapshots that a crash interrupted left their files here)
        await self.hv.sched.on_io(shutil.rmtree, self.dir / ".baking", True)
        records = await self.hv.sched.on_io(self._read_records)
        for rec in records:
            fn = Function(rec.name, Version(rec), asyncio.Semaphore(rec.max_concurrency or DEFAULT_CONCURRENCY))
            self.by_name[rec.name] = fn
            self.routes[rec.route] = fn
            self._direct_start(fn.current)
        if records:
            log.info("%d functions deployed: %s", len(records), ", ".join(sorted(self.by_name)))
        self._reaper_task = asyncio.get_running_loop().create_task(self._reaper())

    def _read_records(self) -> list[contract.FunctionRecord]:
        out: list[contract.FunctionRecord] = []
        if not self.dir.is_dir():
            return out
        for f in sorted(self.dir.glob("*.json")):
            try:
                out.append(msgspec.json.decode(f.read_bytes(), type=contract.FunctionRecord))
            except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.error("function record %s cannot be read (%s): the function is not served", f, exc)
        return out

    def _write_record(self, rec: contract.FunctionRecord) -> None:
        self.dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        durable.write_atomic(self.dir / f"{rec.name}.json", msgspec.json.encode(rec))

    def _remove_record(self, name: str) -> None:
        try:
            (self.dir / f"{name}.json").unlink()
        except FileNotFoundError:
            return
        durable.sync_dir(self.dir)

    def _owner_of(self, snapshot: str) -> str | None:
        for fn in self.by_name.values():
            if fn.rec.snapshot == snapshot:
                return fn.name
        return None

    def needing_image(self, digest: str) -> list[str]:
        """Functions that run image ``digest`` (image rm is refused while any does)."""
        return sorted(fn.name for fn in self.by_name.values() if fn.rec.digest == digest)

    # ------------------------------------------------------------------ queries
    def get(self, name: str) -> Function:
        fn = self.by_name.get(name)
        if fn is None:
            raise NotFound(f"no such function: {name}", code="function_not_found")
        return fn

    def ordered(self) -> list[Function]:
        return [self.by_name[n] for n in sorted(self.by_name)]

    def match(self, path: str) -> Function | None:
        """The function whose route is the longest prefix of ``path`` on a segment boundary."""
        probe = path.rstrip("/") or "/"
        while True:
            fn = self.routes.get(probe)
            if fn is not None:
                return fn
            if probe == "/":
                return None
            probe = probe.rsplit("/", 1)[0] or "/"

    def timeout(self, rec: contract.FunctionRecord) -> float:
        return rec.timeout or self.hv.cfg.limits.timeout or DEFAULT_TIMEOUT

    def to_api(self, fn: Function) -> dict[str, Any]:
        rec = fn.rec
        url = None
        if self.gateway is not None:
            url = f"{gateway_base(*self.gateway)}{rec.route}"
        return {
            "name": rec.name, "route": rec.route, "executor": rec.executor, "image": rec.image_name,
            "digest": rec.digest, "version": rec.version, "created": rec.created, "updated": rec.updated,
            "env": rec.env, "reuse": rec.reuse, "snapshot": rec.snapshot, "url": url,
            "limits": {"fuel": rec.fuel, "memory": rec.memory, "timeout": self.timeout(rec),
                       "max_concurrency": fn.concurrency, "queue": fn.queue_limit},
            "stats": {"invocations": fn.invocations, "errors": dict(fn.errors), "active": fn.active,
                      "queued": fn.queued, "instances": fn.active + len(fn.spares) + len(fn.warm),
                      "idle_instances": len(fn.spares) + len(fn.warm), "last_invoked": fn.last_invoked,
                      "fresh_instance_us": _percentiles(fn.instance_times),
                      "restore_us": _percentiles(fn.restore_times), "direct": fn.direct,
                      "direct_to_vm": fn.direct_to_vm, "direct_state": self._direct_state(fn.current),
                      "direct_runner": "native" if self.direct.pool is not None else "python"},
        }

    # ------------------------------------------------------------------ deploy and remove
    async def deploy(self, d: contract.FunctionDeploy) -> Function:
        if self.closing:
            raise ShuttingDown("microvmd is shutting down and deploys no functions")
        given = [k for k in ("image", "python", "js") if getattr(d, k) is not None]
        if len(given) != 1:
            raise BadRequest("give exactly one of image, python (a handler's source) and js", code="invalid_function")
        if d.executor is not None and d.image is None:
            raise BadRequest(f"executor {d.executor!r} is for images; a {given[0]} handler runs on its interpreter",
                             code="invalid_function")
        if d.reuse and d.image is not None:
            raise BadRequest("--reuse is for Python and JavaScript handlers: a WAGI program answers one request per "
                             "run (CGI), and an SDK function one per instance", code="invalid_function")
        for k in d.env:
            if not k or "=" in k or "\0" in k or "\0" in d.env[k]:
                raise BadRequest(f"invalid environment variable name {k!r}", code="invalid_env")
        if d.memory is not None and d.memory > self.hv.cfg.limits.max_memory:
            raise BadRequest(f"memory {d.memory} is above the daemon's maximum of {self.hv.cfg.limits.max_memory}",
                             code="invalid_limit")
        route = normalise_route(d.route or f"/{d.name}")
        owner = self.routes.get(route)
        if owner is not None and owner.name != d.name:
            raise Conflict(f"route {route} is served by function {owner.name}: choose another --route, or remove "
                           f"{owner.name} first", code="route_in_use")
        lock = self._deploying.setdefault(d.name, asyncio.Lock())
        async with lock:  # two deploys of one name: one after the other
            old = self.by_name.get(d.name)
            version = old.rec.version + 1 if old is not None else 1
            now = time.time()
            if d.image is not None and d.executor == "sdk":
                img = await self._settled(d.image)
                if not any(i.startswith(f"{fnio.HOST_MODULE}.fn_request") for i in img.imports):
                    raise BadRequest(f"image {d.image} is no SDK function: it does not import "
                                     f"{fnio.HOST_MODULE}.fn_request (build it with guest-sdk/mvcc and call "
                                     f"mv_fn_request; or deploy it with --executor wagi)", code="invalid_function")
                if not img.asyncify:
                    raise BadRequest(f"image {d.image} cannot be snapshotted while it runs (build it with "
                                     f"guest-sdk/mvcc, Asyncify on)", code="not_snapshottable")
                executor, source = "sdk", None
                snapshot = await self._initialise(d, "sdk", img.digest, version, [], "fn_request")
            elif d.image is not None:
                img = await self._settled(d.image)
                executor, source, snapshot = "wagi", None, None
                if not any(i.startswith("microvm_wasi.") for i in img.imports):
                    log.warning("function %s: image %s reads stdin through wasmtime's own WASI (imported with "
                                "--no-asyncify, or built with the SDK): request bodies do not reach it", d.name,
                                img.digest[:19])
            else:
                executor = "python" if d.python is not None else "js"
                source = d.python if d.python is not None else d.js
                assert source is not None
                img = await self._interpreter(executor)
                snapshot = await self._initialise(d, executor, img.digest, version,
                                                  drivers.command(executor, source), "fd_read")
            async with self._commit:  # the route is checked again where nothing else can take it
                owner = self.routes.get(route)
                if owner is not None and owner.name != d.name:
                    if snapshot is not None:
                        await self._drop_snapshot(snapshot, d.name)
                    raise Conflict(f"route {route} is served by function {owner.name}: choose another --route, or "
                                   f"remove {owner.name} first", code="route_in_use")
                return await self._commit_deploy(d, version, now, img, executor, source, snapshot, route)

    async def _commit_deploy(self, d: contract.FunctionDeploy, version: int, now: float, img: Any, executor: str,
                             source: str | None, snapshot: str | None, route: str) -> Function:
        """The record written, then the tables changed (under the commit lock)."""
        old = self.by_name.get(d.name)  # (what this deploy replaces; None if it was removed meanwhile)
        rec = contract.FunctionRecord(
            name=d.name, executor=executor, digest=img.digest,  # type: ignore[arg-type]
            image_name=img.names[0] if img.names else img.digest, route=route,
            created=old.rec.created if old is not None else now, updated=now, version=version, source=source,
            snapshot=snapshot, env=dict(d.env), fuel=d.fuel, memory=d.memory, timeout=d.timeout,
            max_concurrency=d.max_concurrency, reuse=d.reuse)
        try:
            await self.hv.sched.on_io(self._write_record, rec)
        except BaseException:
            if snapshot is not None:
                await self._drop_snapshot(snapshot, d.name)
            raise
        if old is not None and self.routes.get(old.rec.route) is old:
            del self.routes[old.rec.route]
        fn = old or Function(d.name, Version(rec), asyncio.Semaphore(rec.max_concurrency or DEFAULT_CONCURRENCY))
        if old is not None:
            before = old.concurrency
            self._retire(old.current)
            self._drain_warm(old)
            fn.current = Version(rec)
            if before != fn.concurrency:
                fn.slots = asyncio.Semaphore(fn.concurrency)  # requests holding old slots release those
        self.by_name[d.name] = fn
        self.routes[route] = fn
        self._direct_start(fn.current)  # (made in the background, before the first request if it can)
        log.info("function %s deployed (version %d, %s, route %s)", d.name, version, executor, route)
        fn.log.write(f"{_stamp()} deployed version {version} ({executor}, route {route})")
        return fn

    async def remove(self, name: str) -> None:
        async with self._deploying.setdefault(name, asyncio.Lock()), self._commit:
            await self._remove(name)

    async def _remove(self, name: str) -> None:
        fn = self.get(name)
        await self.hv.sched.on_io(self._remove_record, name)
        self.by_name.pop(name, None)
        if self.routes.get(fn.rec.route) is fn:
            del self.routes[fn.rec.route]
        self._retire(fn.current)
        self._drain_warm(fn)
        log.info("function %s removed", name)

    def _retire(self, v: Version) -> None:
        v.retired = True
        d, v.direct = v.direct, False  # (requests in flight keep what they started with)
        if isinstance(d, asyncio.Task):
            d.cancel()
        if v.in_flight == 0 and v.rec.snapshot is not None:
            task = asyncio.get_running_loop().create_task(self._drop_snapshot(v.rec.snapshot, v.rec.name))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _drop_snapshot(self, snapshot: str, owner: str) -> None:
        try:
            await self.snaps.remove(snapshot, owner=owner)
        except NotFound:
            pass
        except MicrovmError as exc:
            log.warning("function %s: cannot remove its old snapshot %s: %s", owner, snapshot, exc.message)

    async def _settled(self, ref: str) -> Any:
        """Image ``ref``, once a rewrite of it that is still running (an import in the background, as at
        start-up) is done: a function keeps the digest it was deployed with, so it should be the rewritten one
        (which serves stdin, the request body)."""
        img = self.hv.images.resolve(ref)
        end = time.monotonic() + 600
        while any(j.get("original_digest") == img.digest for j in list(self.hv.images.importing.values())) \
                and time.monotonic() < end:
            await asyncio.sleep(0.1)
            img = self.hv.images.resolve(ref)
        return img

    async def _interpreter(self, runtime: str) -> Any:
        """The interpreter's image: the one named ``python``/``js`` in the store, else imported (and rewritten
        for snapshots, once per host: minutes for CPython) from the interpreters that set-up fetched."""
        name = RUNTIMES[runtime]
        try:
            img = self.hv.images.resolve(name)
        except NotFound:
            img = None
        if img is not None:
            if not any(i.startswith("microvm_wasi.fd_read") for i in img.imports):
                raise Unprocessable(f"image {name!r} reads stdin through wasmtime's own WASI (imported with "
                                    f"--no-asyncify, or its rewrite failed): a function's snapshot needs the "
                                    f"rewritten interpreter; import {name}.wasm again without --no-asyncify",
                                    code="runtime_not_snapshottable")
            return img
        for base in filter(None, (self.hv.cfg.import_images, Path(__file__).resolve().parents[2] / "images")):
            wasm = Path(base) / name / f"{name}.wasm"
            if await self.hv.sched.on_io(wasm.is_file):
                log.info("importing the %s interpreter from %s for functions", runtime, wasm)
                data = await self.hv.sched.on_io(wasm.read_bytes)
                return await self.hv.import_image(data, name)
        raise Unprocessable(f"no {runtime} interpreter: import one as image {name!r} (microvm image import "
                            f"{name}.wasm --name {name}), or fetch it with scripts/fetch-interpreters",
                            code="runtime_missing")

    async def _initialise(self, d: contract.FunctionDeploy, runtime: str, digest: str, version: int,
                          args: list[str], waits_in: str) -> str:
        """Start the function's guest, wait until it waits for its first request (blocked in ``waits_in``),
        and snapshot it there."""
        spec = VmSpec(image=digest, args=args, env=dict(d.env), memory=d.memory, stdin=True, ephemeral=True,
                      owner=f"fn:{d.name}", timeout=DEPLOY_TIMEOUT)
        vm = await self.hv.create(spec, start=True, durable=False)
        try:
            end = time.monotonic() + DEPLOY_TIMEOUT
            while vm.blocked_in() != waits_in:
                if vm.state.terminal or vm.state == VmState.OUT_OF_FUEL:
                    err = _tail(_read(vm, "stderr") + _read(vm, "stdout"))
                    why = vm.exit.reason if vm.exit else vm.state.value
                    raise BadRequest(f"the {runtime} handler did not load ({why}): {err or 'no output'}",
                                     code="handler_failed")
                if time.monotonic() > end:
                    raise BadRequest(f"the {runtime} handler did not wait for a request within {DEPLOY_TIMEOUT:.0f} s "
                                     f"of starting: does its module run forever at import?", code="handler_failed")
                ev = vm.changed
                try:
                    await asyncio.wait_for(ev.wait(), 0.05)
                except TimeoutError:
                    pass
            name = _snapshot_name(d.name, version)
            await self.snaps.create(vm, name, diff=False, durable=True)
            return name
        finally:
            if vm.state.live:
                await self.hv.kill(vm)

    # ------------------------------------------------------------------ invoke
    async def invoke(self, fn: Function, req: FnRequest,
                     read_body: Callable[[], Awaitable[bytes]] | None = None) -> FnResponse:
        """Answer one request. ``read_body`` (the gateway's) fills ``req.body`` once the request is admitted:
        a full queue answers 503 without holding the body in memory."""
        rid = self._request_id()
        if self.closing:
            resp = error_response(503, "shutting_down", "microvmd is shutting down", rid)
            resp.headers["Connection"] = "close"
            return resp
        # a request whose body is still to come waits for it as queued (the queue bounds the bodies held
        # in memory), free slots or not
        if fn.slots.locked() or read_body is not None:
            if fn.queued >= fn.queue_limit:
                resp = error_response(503, "overloaded", f"function {fn.name}'s queue is full ({fn.queue_limit} "
                                      f"requests waiting for an instance or for their body; {fn.concurrency} "
                                      f"run at once)", rid)
                resp.headers["Retry-After"] = "1"
                return self._failed(fn, resp, None)
        if read_body is not None:
            fn.queued += 1  # counted as queued while its body arrives: the queue bounds the bodies held too
            try:
                req.body = await read_body()
            except MicrovmError as exc:
                return self._failed(fn, error_response(exc.status, exc.code, exc.message, rid), None)
            finally:
                fn.queued -= 1
        if len(req.body) > MAX_BODY:
            return self._failed(fn, error_response(413, "too_large", f"the request body is above {MAX_BODY} bytes",
                                                   rid), None)
        t0 = time.perf_counter()
        if not fn.slots.locked():  # a free slot: taken at once (wait_for would make a task per request)
            await fn.slots.acquire()
        else:
            fn.queued += 1
            try:  # a request waits for a slot at most its timeout
                await asyncio.wait_for(fn.slots.acquire(), self.timeout(fn.rec))
            except TimeoutError:
                resp = error_response(503, "overloaded", f"function {fn.name} had no free instance slot within "
                                      f"{self.timeout(fn.rec):g} s", rid)
                resp.headers["Retry-After"] = "1"
                return self._failed(fn, resp, None)
            finally:
                fn.queued -= 1
        slots = fn.slots
        if self.by_name.get(fn.name) is not fn:  # removed while this request waited
            slots.release()
            return error_response(404, "function_removed", f"function {fn.name} was removed", rid)
        version = fn.current
        version.in_flight += 1
        fn.active += 1
        fn.invocations += 1
        fn.last_invoked = time.time()
        try:
            resp = await (self._run_warm(fn, version, req, rid) if version.rec.reuse else
                          self._run(fn, version, req, rid))
        except MicrovmError as exc:  # the daemon could not make an instance (its memory budget, shutdown...)
            if exc.status >= 500 or exc.status == 429:
                resp = self._error(fn, rid, 503, exc.code, f"no instance could be made: {exc.message}", b"")
                resp.headers["Retry-After"] = "1"
            else:
                resp = self._error(fn, rid, 500, exc.code, f"no instance could be made: {exc.message}", b"")
        finally:
            fn.active -= 1
            slots.release()
            version.in_flight -= 1
            if version.retired and version.in_flight == 0:
                self._retire(version)
        resp.request_id = rid
        took = time.perf_counter() - t0
        fn.latency_sum += took
        fn.latency_hits[bisect.bisect_left(LATENCY_BUCKETS, took)] += 1
        return self._failed(fn, resp, None) if resp.error else resp

    def _request_id(self) -> str:
        return f"{self._rids.getrandbits(48):012x}"

    def _failed(self, fn: Function, resp: FnResponse, detail: str | None) -> FnResponse:
        kind = resp.error or "error"
        fn.errors[kind] = fn.errors.get(kind, 0) + 1
        return resp

    async def _run(self, fn: Function, version: Version, req: FnRequest, rid: str) -> FnResponse:
        rec = version.rec
        timeout = self.timeout(rec)
        if rec.executor == "wagi":
            resp = await self._run_direct(fn, version, req, rid)
            if resp is not None:
                return resp
            spec = VmSpec(image=rec.digest, args=[], env=wagi.environment(req, rec.env), fuel=rec.fuel,
                          memory=rec.memory, timeout=timeout, ephemeral=True, owner=f"fn:{rec.name}",
                          stdin_data=req.body)
            t0 = time.perf_counter()
            vm = await self.hv.create(spec, start=True, durable=False)  # (its first slice included)
            fn.instance_times.append(time.perf_counter() - t0)
        else:
            assert rec.snapshot is not None
            if rec.executor == "sdk":
                return await self._run_sdk(fn, version, req, rid)
            payload = _payload(rec, req)
            vm = await self._fresh(fn, version)
            part = vm.devices.get(WasiState)
            if part is None:  # (the snapshot is of a rewritten interpreter: it has one)
                await self.hv.remove(vm, force=True)
                return error_response(500, "internal", "the function's snapshot has no standard input", rid)
            part.stdin.replace(payload, True)
            await self.hv.start(vm)
        await self.hv.wait(vm)
        return self._outcome(fn, rec, vm, rid)

    # ------------------------------------------------------------------ direct instances (direct.py)
    def _direct_start(self, version: Version) -> _DirectStart | None:
        """What ``version``'s direct instances start from; None while it is being made (in the background: the
        request runs as a VM meanwhile) or when the function cannot have them."""
        d = version.direct
        if d is None:
            d = version.direct = asyncio.get_running_loop().create_task(self._make_direct_start(version))
        if isinstance(d, asyncio.Task):
            if not d.done():
                return None
            exc = None if d.cancelled() else d.exception()
            if exc is not None:  # (a bug, or a snapshot that cannot be read: the VM path says which)
                log.error("function %s: no direct instances: %s: %s", version.rec.name, type(exc).__name__, exc)
            version.direct = False if d.cancelled() or exc is not None else d.result()
        return version.direct or None

    def _direct_state(self, version: Version) -> str:
        d = version.direct
        if d is None or isinstance(d, asyncio.Task) and not d.done():
            return "preparing"
        return "ready" if self._direct_start(version) is not None else "off"

    async def _make_direct_start(self, version: Version) -> _DirectStart | bool:
        """WAGI: the image pre-linked. SDK: the function's snapshot baked into a copy of its module (memory,
        globals, a rewind into fn_request; direct.baked) and compiled. False when the image imports more
        than direct instances serve, or the snapshot cannot be baked (the VM path serves the function)."""
        rec = version.rec
        hv = self.hv
        if rec.executor not in ("wagi", "sdk"):
            return False  # (an interpreter: its instances are VMs)

        def off(why: str) -> bool:
            log.info("function %s: no direct instances (%s): its requests run as VMs", rec.name, why)
            return False

        if rec.executor == "wagi":
            img = hv.images.resolve(rec.digest)
            if not img.entry:
                return off("its image has no entry")
            if not direct.qualifies(img.imports, img.kind):
                return off(f"its image is a {img.kind} module that imports more than WASI")
            memory = self._wagi_memory(rec, img)
            if self.direct.max_memory is not None and memory > self.direct.max_memory:
                return off(f"its memory limit is above the direct instances' {self.direct.max_memory} bytes "
                           f"([engine] memory_reservation)")
            try:
                prepared = await hv.sched.on_io(lambda: self.direct.load(hv.images.module(img)))
            except wasmtime.WasmtimeError as exc:  # (a module beyond the pooling allocator's limits)
                return off(str(exc).splitlines()[0])
            return _DirectStart(prepared, img.entry, list(img.boot), [_argv0(img), *img.args], dict(img.env), None,
                                None, 0)
        if rec.snapshot is None:
            return off("it has no snapshot")
        snap = await self.snaps.image_of(rec.snapshot)
        img = hv.images.resolve(snap.digest)
        if not img.entry or not img.asyncify_globals:
            return off("its image has no entry or no Asyncify state")
        if not direct.qualifies(img.imports, img.kind):
            return off("its image imports devices of the guest SDK beyond microvm_fn")
        if not snap.unwound or snap.tables_changed:
            return off("its snapshot was not taken inside fn_request" if not snap.unwound else
                       "its snapshot changed the module's tables")
        asked = rec.memory if rec.memory is not None else snap.spec.memory
        memory = asked if asked is not None else img.limits.get("memory", hv.cfg.limits.memory)
        if self.direct.max_memory is not None and memory > self.direct.max_memory:
            return off(f"its memory limit is above the direct instances' {self.direct.max_memory} bytes "
                       f"([engine] memory_reservation)")
        state = img.asyncify_globals[0]
        baking = self.dir / ".baking"

        def make() -> direct.Prepared:
            data = direct.baked(hv.images.normalized_bytes(img), snap.memory_size // 65536, snap.segments,
                                snap.globals, state)
            baking.mkdir(exist_ok=True)
            cache = baking / f"{rec.name}.{rec.version}.{secrets.token_hex(4)}.cwasm"  # (a big module's compile
            try:  # child writes its code here; a small one compiles in this thread)
                return self.direct.load(hv.images.compiler.compile(data, cache))
            finally:
                cache.unlink(missing_ok=True)

        try:
            prepared = await hv.sched.on_io(make)
        except (ValueError, MicrovmError, wasmtime.WasmtimeError) as exc:
            return off(f"its snapshot cannot be baked into its module: {str(exc).splitlines()[0]}")
        return _DirectStart(prepared, img.entry, [], [_argv0(img), *(snap.spec.args or img.args)],
                            {**img.env, **snap.spec.env}, memory, f"{RESERVED_PREFIX}global_{state}", snap.mono_ns)

    async def _run_direct(self, fn: Function, version: Version, req: FnRequest, rid: str) -> FnResponse | None:
        """A WAGI or SDK request as a direct instance (for SDK, of the baked snapshot); None when the function
        has none yet or the request has to go on as a VM (it waited, or needed more than a quantum or a fuel
        slice): the caller runs it as one."""
        start = self._direct_start(version)
        if start is None:
            return None
        rec = version.rec
        hv = self.hv
        lim = hv.cfg.limits
        part = None
        if rec.executor == "wagi":
            img = hv.images.resolve(rec.digest)
            memory = self._wagi_memory(rec, img)
            if self.direct.max_memory is not None and memory > self.direct.max_memory:
                ended = None  # (the image's default memory was raised since: more than a pooled slot holds)
            else:
                fuel = rec.fuel if rec.fuel is not None else img.limits.get("fuel", lim.fuel)
                ended = await self.direct.run_async(
                    hv.sched.on_cpu_pool, start.prepared, start.entry, start.boot, start.argv,
                    {**start.env, **wagi.environment(req, rec.env)}, req.body,
                    direct.limits_for(fuel, memory, self.timeout(rec), lim), lim.log_bytes)
        else:
            part = fnio.FnPart()
            part.request = fnio.encode_request(req.method, req.path, req.query, req.headers, req.body)
            assert start.memory is not None
            ended = await self.direct.run_async(
                hv.sched.on_cpu_pool, start.prepared, start.entry, [], start.argv, start.env, b"",
                direct.limits_for(rec.fuel or lim.fuel, start.memory, self.timeout(rec), lim), lim.log_bytes,
                start.rewind, part, start.mono_ns)
        if ended is None:
            fn.direct_to_vm += 1
            return None
        fn.direct += 1
        fn.instance_times.append(ended.instance_s)
        if part is not None:
            fn.restore_times.append(ended.instance_s)
        if ended.reason == "exit":
            if part is not None:
                return self._sdk_answer(fn, rid, part, ended.code, ended.stderr, ended.stdout)
            return self._wagi_answer(fn, rid, ended.stdout, ended.stdout_truncated, ended.stderr, ended.code)
        if ended.reason == "out_of_fuel":
            return self._error(fn, rid, 502, "out_of_fuel", "the function ran out of fuel", ended.stderr)
        if ended.reason == "timeout":
            return self._error(fn, rid, 504, "timeout", f"the function did not answer within {self.timeout(rec):g} s",
                               ended.stderr)
        reason = ended.reason if ended.reason != "trap" else f"trap: {ended.message}"
        return self._error(fn, rid, 502, ended.reason, f"the function's guest was stopped: {reason}", ended.stderr)

    def _wagi_memory(self, rec: contract.FunctionRecord, img: Any) -> int:
        """A WAGI instance's memory limit: the function's, else its image's default, else the daemon's (as a
        VM's, Hypervisor._admit)."""
        return rec.memory if rec.memory is not None else img.limits.get("memory", self.hv.cfg.limits.memory)

    async def _fresh(self, fn: Function, version: Version) -> Vm:
        """A fresh instance of ``version`` (never run a request), not started: a spare restored ahead of time
        when there is one, else restored now. Spares are topped up again in the background (SPARES of them
        while the function has requests; none once it is idle, see _reaper)."""
        t0 = time.perf_counter()
        vm = None
        while fn.spares:
            cand_vm, cand_version = fn.spares.popleft()
            if cand_version is version and cand_vm.state == VmState.CREATED:
                vm = cand_vm
                break
            self._discard(Warm(cand_vm, cand_version))
        if vm is None:
            vm = await self._restore(version, fn)
        fn.instance_times.append(time.perf_counter() - t0)
        fn.last_request = time.monotonic()
        if fn.refill is None or fn.refill.done():
            fn.refill = asyncio.get_running_loop().create_task(self._refill(fn, version))
        return vm

    async def _restore(self, version: Version, fn: Function | None = None) -> Vm:
        rec = version.rec
        assert rec.snapshot is not None
        timeout = self.timeout(rec)

        def adjust(spec: VmSpec) -> None:
            spec.timeout = timeout
            spec.memory = rec.memory if rec.memory is not None else spec.memory
            spec.owner = f"fn:{rec.name}"

        t0 = time.perf_counter()
        vm = await self.snaps.instance(rec.snapshot, adjust, rec.fuel or self.hv.cfg.limits.fuel)
        if fn is not None:
            fn.restore_times.append(time.perf_counter() - t0)
        return vm

    async def _refill(self, fn: Function, version: Version) -> None:
        try:
            while (len(fn.spares) < SPARES and fn.current is version and not version.retired and not self.closing
                   and time.monotonic() - fn.last_request < WARM_IDLE):
                vm = await self._restore(version, fn)
                if fn.current is not version or version.retired or self.closing or \
                        self.by_name.get(fn.name) is not fn:  # changed while it was restored
                    self._discard(Warm(vm, version))
                    return
                fn.spares.append((vm, version))
        except MicrovmError as exc:  # (the memory budget, the daemon stopping...): requests restore themselves
            log.debug("function %s: no spare instance: %s", fn.name, exc.message)

    def _drop_spares(self, fn: Function) -> None:
        if fn.refill is not None:
            fn.refill.cancel()
        while fn.spares:
            vm, version = fn.spares.popleft()
            self._discard(Warm(vm, version))

    async def _run_warm(self, fn: Function, version: Version, req: FnRequest, rid: str) -> FnResponse:
        """--reuse: the request goes to an idle warm instance of this version (or a new one), as one more line on
        its stdin; its answer is the next response line on its stdout. The instance then waits for the next."""
        rec = version.rec
        assert rec.snapshot is not None
        w = None
        while fn.warm:
            cand = fn.warm.pop()
            if cand.version is version and cand.vm.state == VmState.RUNNING:
                w = cand
                break
            self._discard(cand)
        if w is None:
            def adjust(spec: VmSpec) -> None:
                spec.timeout = None  # it lives on between requests: each request has its own timeout here
                spec.memory = rec.memory if rec.memory is not None else spec.memory
                spec.owner = f"fn:{rec.name}"

            t0 = time.perf_counter()
            vm = await self.snaps.instance(rec.snapshot, adjust, rec.fuel or self.hv.cfg.limits.fuel)
            fn.instance_times.append(time.perf_counter() - t0)
            w = Warm(vm, version)
            await self.hv.start(vm)
        else:
            fn.instance_times.append(0.0)
            fuel = rec.fuel or self.hv.cfg.limits.fuel
            if fuel:
                await self.hv.add_fuel(w.vm, fuel)
        vm = w.vm
        part = vm.devices.get(WasiState)
        if part is None:
            self._discard(w)
            return error_response(500, "internal", "the function's snapshot has no standard input", rid)
        line_in = _payload(rec, req) + b"\n"
        if part.stdin.feed(line_in) < len(line_in):  # the instance's stdin buffer cannot take it whole
            self._discard(w)
            return self._error(fn, rid, 413, "too_large", "the request is too large for a warm instance's input",
                               b"")
        try:
            line = await asyncio.wait_for(self._response_line(w), self.timeout(rec))
        except TimeoutError:
            self._discard(w)
            return self._error(fn, rid, 504, "timeout", f"the function did not answer within {self.timeout(rec):g} s",
                               self._new_stderr(w))
        err = self._new_stderr(w)
        if line is None:  # the instance ended (or ran out of fuel) before it answered
            why = vm.exit.reason if vm.exit else vm.state.value
            self._discard(w)
            kind = why.split(":", 1)[0]
            return self._error(fn, rid, 502, kind if kind != "exit" else "bad_response",
                               f"the function's instance ended before it answered ({why})", err)
        resp = self._interpreted(fn, rid, line, err, None)
        if fn.current is version and not version.retired:
            w.idle_since = time.monotonic()
            fn.warm.append(w)
        else:
            self._discard(w)
        return resp

    async def _response_line(self, w: Warm) -> bytes | None:
        """The next response line on the instance's stdout, or None once it has ended or is out of fuel."""
        vm = w.vm
        mark = drivers.MARK.encode()
        while True:
            ev = vm.changed  # (taken before the look: a change after it is not missed)
            data, end = vm.console.read("stdout", w.out)
            i = data.find(mark)
            j = data.find(b"\n", i) if i >= 0 else -1
            if j >= 0:
                w.out = end - len(data) + j + 1
                return data[:j + 1]
            if vm.state.terminal or vm.state == VmState.OUT_OF_FUEL:
                return None
            await ev.wait()  # set when the guest blocks again (for its next line) or ends

    def _new_stderr(self, w: Warm) -> bytes:
        data, w.err = w.vm.console.read("stderr", w.err)
        return data

    def _discard(self, w: Warm) -> None:
        if w.vm.state.live or w.vm in self.hv.registry:
            task = asyncio.get_running_loop().create_task(self.hv.remove(w.vm, force=True))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def _drain_warm(self, fn: Function, idle_for: float = 0.0) -> None:
        """Stop the warm instances idle for at least ``idle_for`` seconds (all of them with 0), and the spare
        fresh ones when the function has had no request for that long."""
        now = time.monotonic()
        if fn.spares and now - fn.last_request >= idle_for:
            self._drop_spares(fn)
        keep = []
        for w in fn.warm:
            if now - w.idle_since >= idle_for or w.version is not fn.current:
                self._discard(w)
            else:
                keep.append(w)
        fn.warm = keep

    async def _reaper(self) -> None:
        """Scale to zero: warm instances idle for WARM_IDLE seconds are stopped."""
        while True:
            await asyncio.sleep(WARM_IDLE / 4)
            for fn in list(self.by_name.values()):
                if fn.warm or fn.spares:
                    self._drain_warm(fn, WARM_IDLE)

    async def _run_sdk(self, fn: Function, version: Version, req: FnRequest, rid: str) -> FnResponse:
        rec = version.rec
        resp = await self._run_direct(fn, version, req, rid)
        if resp is not None:
            return resp
        vm = await self._fresh(fn, version)
        part = vm.devices.get(fnio.FnPart)
        if part is None:
            await self.hv.remove(vm, force=True)
            return error_response(500, "internal", "the function's snapshot has no request channel", rid)
        part.give(fnio.encode_request(req.method, req.path, req.query, req.headers, req.body))
        await self.hv.start(vm)
        await self.hv.wait(vm)
        return self._outcome(fn, rec, vm, rid)

    def _outcome(self, fn: Function, rec: contract.FunctionRecord, vm: Vm, rid: str) -> FnResponse:
        """The HTTP answer for how the instance ended (it is gone already, or killed here: out of fuel)."""
        err = _read(vm, "stderr")
        if vm.state == VmState.OUT_OF_FUEL:
            self._discard(Warm(vm, fn.current))
            return self._error(fn, rid, 502, "out_of_fuel", "the function ran out of fuel", err)
        assert vm.exit is not None
        reason = vm.exit.reason
        if reason == "timeout":
            return self._error(fn, rid, 504, "timeout", f"the function did not answer within {self.timeout(rec):g} s",
                               err)
        if reason != "exit" and self.hv.closing:  # stopped by the daemon's shutdown, not by its own doing
            return error_response(503, "shutting_down", "microvmd is shutting down", rid)
        if reason != "exit":
            kind = reason.split(":", 1)[0]
            return self._error(fn, rid, 502, kind, f"the function's guest was stopped: {reason}", err)
        if rec.executor == "sdk":
            return self._sdk_answer(fn, rid, vm.devices.get(fnio.FnPart), vm.exit.code, err, _read(vm, "stdout"))
        out = _read(vm, "stdout")
        if rec.executor == "wagi":
            return self._wagi_answer(fn, rid, out, _truncated(vm, "stdout"), err, vm.exit.code)
        if _truncated(vm, "stdout"):
            return self._error(fn, rid, 502, "bad_response", "the response is larger than the console cap", err)
        return self._interpreted(fn, rid, out, err, vm.exit.code)

    def _sdk_answer(self, fn: Function, rid: str, part: fnio.FnPart | None, code: int | None, err: bytes,
                    out: bytes) -> FnResponse:
        """The HTTP answer of an SDK instance that ended by itself: what it gave ``fn_respond``."""
        if part is None or part.status is None:
            return self._error(fn, rid, 502, "bad_response", f"the function ended (exit code {code}) without "
                               f"mv_fn_respond", err)
        self._log_stderr(fn, rid, err + out)
        headers: dict[str, str] = {}
        for line in part.headers.decode("latin-1").split("\n"):
            name, colon, value = line.partition(":")
            if colon and name.strip() and "\r" not in line:
                add_header(headers, name.strip(), value.strip())
        return FnResponse(part.status, headers, part.body)

    def _wagi_answer(self, fn: Function, rid: str, out: bytes, truncated: bool, err: bytes,
                     code: int | None) -> FnResponse:
        """The HTTP answer of a WAGI instance that ended by itself, from its stdout."""
        if truncated:
            return self._error(fn, rid, 502, "bad_response", "the response is larger than the console cap", err)
        try:
            resp = wagi.parse(out)
        except wagi.CgiError as exc:
            return self._error(fn, rid, 502, "bad_response", f"not a CGI response (exit code {code}): {exc}", err)
        self._log_stderr(fn, rid, err)
        return resp

    def _interpreted(self, fn: Function, rid: str, out: bytes, err: bytes, code: int | None) -> FnResponse:
        mark = drivers.MARK.encode()
        i = out.rfind(mark)
        if i < 0:
            return self._error(fn, rid, 502, "bad_response", f"the handler's guest ended (exit code {code}) without "
                               f"a response", err)
        try:
            raw = json.loads(out[i + len(mark):].split(b"\n", 1)[0])
            if not isinstance(raw, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            return self._error(fn, rid, 502, "bad_response", f"the response is not JSON: {exc}", err)
        if "error" in raw:
            return self._error(fn, rid, 502, "handler_error", f"the handler raised {str(raw['error'])[:200]}", err)
        try:
            status = int(raw.get("status", 200))
            if not 100 <= status <= 599:
                raise ValueError(f"status {status}")
            headers: dict[str, str] = {}
            for k, v in (raw.get("headers") or {}).items():  # a list: the header sent once per value
                for one in (v if isinstance(v, list) else [v]):
                    if not any(ch in str(k) + str(one) for ch in "\r\n"):
                        add_header(headers, str(k), str(one))
            if "body_base64" in raw:
                body = base64.b64decode(raw["body_base64"])
            else:
                body = str(raw.get("body") or "").encode()
        except (ValueError, TypeError, AttributeError) as exc:
            return self._error(fn, rid, 502, "bad_response", f"invalid response: {exc}", err)
        self._log_stderr(fn, rid, err)
        return FnResponse(status, headers, body)

    def _error(self, fn: Function, rid: str, status: int, kind: str, message: str, err: bytes) -> FnResponse:
        fn.log.write(f"{_stamp()} request {rid}: {status} {kind}: {logsafe.escape(message)}")
        self._log_stderr(fn, rid, err)
        log.debug("function %s request %s: %d %s: %s", fn.name, rid, status, kind, message)
        return error_response(status, kind, message, rid)

    def _log_stderr(self, fn: Function, rid: str, err: bytes) -> None:
        if err:
            text = err[-4096:].decode("utf-8", "replace").rstrip("\n")
            for line in text.split("\n"):
                fn.log.write(f"{_stamp()} request {rid} stderr: {logsafe.escape(line.rstrip())}"[:2000])

    # ------------------------------------------------------------------ shutdown
    async def drain(self, timeout: float) -> int:
        """At shutdown, after the gateway stopped listening: until no request is running (at most ``timeout``
        seconds), so that requests in flight get their answers before the guests are stopped. Returns how many
        are still running."""
        end = time.monotonic() + timeout
        while (busy := sum(fn.active + fn.queued for fn in self.by_name.values())) and time.monotonic() < end:
            await asyncio.sleep(0.01)
        return busy

    async def close(self) -> None:
        self.closing = True
        if self._reaper_task is not None:
            self._reaper_task.cancel()
        for fn in self.by_name.values():
            self._drain_warm(fn)
            if isinstance(fn.current.direct, asyncio.Task):
                fn.current.direct.cancel()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        await self.direct.aclose()  # (its workers end after what is queued: a quantum at most)


def _argv0(img: Any) -> str:
    """A guest's ``argv[0]``, as the VM builder makes it: the image's first name."""
    return img.names[0] if img.names and not img.names[0].startswith("sha256:") else "guest"


def _payload(rec: contract.FunctionRecord, req: FnRequest) -> bytes:
    """The request as the Python or JavaScript driver reads it: one line of JSON."""
    return json.dumps({
        "method": req.method, "path": req.path, "query": req.query, "headers": req.headers,
        "body": req.body.decode("utf-8", "replace"),
        **({"body_base64": base64.b64encode(req.body).decode()} if rec.executor == "python" else {}),
    }).encode()


def _percentiles(times: deque[float]) -> dict[str, float] | None:
    """p50 and p99 in microseconds of the last requests' fresh instances (None before the first)."""
    if not times:
        return None
    ordered = sorted(times)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6, 1)  # noqa: E731
    return {"p50": pick(0.5), "p99": pick(0.99), "count": len(ordered)}


def _read(vm: Vm, stream: str) -> bytes:
    """All a stream holds (at most the console's cap: see _truncated). Instances are ephemeral: in memory."""
    assert isinstance(vm.console, MemoryConsole)
    return vm.console.output(stream)


def _truncated(vm: Vm, stream: str) -> bool:
    assert isinstance(vm.console, MemoryConsole)
    return vm.console.size(stream) > len(vm.console.output(stream))


def _tail(data: bytes, n: int = 600) -> str:
    text = data.decode("utf-8", "replace").strip()
    return text[-n:].replace("\n", " | ")


_second: list[Any] = [-1, ""]  # the last second _stamp formatted, and how


def _stamp() -> str:
    now = time.time()
    sec = int(now)
    if sec != _second[0]:  # (strftime once a second: a WAGI function logs a stderr line per request)
        _second[:] = [sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))]
    return f"{_second[1]}.{int(now * 1000) % 1000:03d}Z"


def _snapshot_name(name: str, version: int) -> str:
    """fn.NAME.VERSION-RANDOM, within a snapshot name's 128 characters."""
    if len(name) > 100:
        import hashlib

        name = f"{name[:80]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return f"fn.{name}.{version}-{secrets.token_hex(3)}"  # unique: a name removed and deployed again restarts at 1

