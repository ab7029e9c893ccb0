"""Live migration: snapshot here, send only the chunks the target lacks, restore there, then remove here.

The source VM stays frozen (not running, fully intact) from its snapshot until the target confirms the
restore; on any failure it is thawed and carries on here, published ports rebound, as if nothing happened.
"""
from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any
from urllib.parse import urlparse

import aiohttp

from ..devices.net import NetState
from ..engine import wt
from ..errors import BadRequest, MicrovmError
from ..vmm.manager import Hypervisor
from ..vmm.state import VmState
from ..vmm.vm import Vm
from . import transfer
from .controller import Snapshots
from .store import CHUNK, PackWriter, encode_manifest, portable

log = logging.getLogger("microvmd.migrate")


class MigrationFailed(MicrovmError):
    status = 502
    code = "migration_failed"


class Peer:
    """Another microvmd, over its Unix socket or its TLS remote API."""

    def __init__(self, to: str, token: str | None, ca_file: str | None = None) -> None:
        u = urlparse(to)
        headers = {"Accept": "application/json"}
        if u.scheme == "unix":
            path = u.path or u.netloc or ""
            if not path:
                raise BadRequest("unix:// destination needs a socket path, e.g. unix:///run/b.sock",
                                 code="invalid_destination")
            self.connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=path)
            self.base = "http://peer"
        elif u.scheme == "https":
            if not token:
                raise BadRequest("an https:// destination needs a bearer token (--token-file)",
                                 code="invalid_destination")
            try:
                ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
            except (OSError, ssl.SSLError) as exc:
                raise BadRequest(f"cannot load the CA file {ca_file}: {exc}", code="invalid_destination") from None
            self.connector = aiohttp.TCPConnector(ssl=ctx)
            self.base = f"https://{u.netloc}"
        else:
            raise BadRequest(f"destination {to!r} must be unix:///path.sock or https://HOST:PORT",
                             code="invalid_destination")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.session = aiohttp.ClientSession(connector=self.connector, headers=headers,
                                             timeout=aiohttp.ClientTimeout(total=300, sock_connect=10))

    async def __aenter__(self) -> Peer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, body: Any = None, data: Any = None) -> Any:
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["json"] = body
        if data is not None:
            kwargs["data"] = data
            kwargs["headers"] = {"Content-Type": "application/octet-stream"}
        async with self.session.request(method, self.base + path, **kwargs) as resp:
            text = await resp.text()
            if resp.status >= 400:
                try:
                    err = json.loads(text)["error"]
                    msg = f"{err['message']} ({err['code']})"
                except (ValueError, KeyError, TypeError):
                    msg = text[:200] or resp.reason or ""
                raise _PeerError(resp.status, msg)
            return json.loads(text) if text else None


def _why(exc: BaseException) -> str:
    """aiohttp says "Cannot connect to host localhost:80 ssl:default [...]" for a Unix socket with no daemon
    behind it: say what the operating system said, and how to start the daemon there."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        return (f"{os_error.strerror or os_error} (is microvmd running there? start it with "
                f"'microvmd --socket PATH' or 'systemctl start microvmd')")
    return str(exc)


def _migrated_disks(captured: list[dict[str, Any]], new: dict[str, Any]) -> list[dict[str, Any]]:
    """Which disk of the target holds each captured disk: the target keeps the name when it is free there;
    when it is not, the user must hear that the VM now uses another disk name (its old name there is some
    other disk)."""
    target = new.get("spec", {}).get("disks") or []
    out = []
    for d in captured:
        i = d["index"]
        got = target[i]["name"] if 0 <= i < len(target) else d["name"]
        renamed = got != d["name"]
        out.append({"name": d["name"], "target_name": got, "renamed": renamed,
                    "reason": (f"the target already has a disk named {d['name']}; the VM's copy is {got} there"
                               if renamed else None)})
    return out


class _PeerError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"target answered {status}: {message}")
        self.status = status


async def migrate(hv: Hypervisor, snaps: Snapshots, vm: Vm, to: str, token: str | None,
                  ca_file: str | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    async with Peer(to, token, ca_file) as peer:
        try:
            await peer.call("GET", "/v1/info")
        except (aiohttp.ClientError, _PeerError, OSError) as exc:
            raise MigrationFailed(f"cannot reach the target {to}: {_why(exc)}; nothing was changed") from None
        name = f"migrate-{vm.id[:12]}-{int(time.time() * 1000)}"
        net = vm.devices.get(NetState)
        async with vm.lock:
            was_running = vm.state == VmState.RUNNING
            # capture (disks go to a local pack, memory stays in the captured copy and is streamed from it)
            async with snaps.write_lock:
                writer = await hv.sched.on_io(PackWriter, snaps.store)
                try:
                    # the VM stays frozen until the target confirms: stream its memory without a copy
                    manifest, memory, _ = await snaps.capture(vm, name, writer, diff=False, thaw=False,
                                                               copy_memory=False)
                    manifest["memory"]["chunks"] = await hv.sched.on_io(snaps.store.digest_refs, memory)
                    disk_pack = await hv.sched.on_io(writer.publish)
                except BaseException:
                    await hv.sched.on_io(writer.abort)
                    if not vm.state.terminal:
                        hv.thaw(vm)
                    raise
                finally:
                    snaps.refill_spares_later()
            released = False
            imported = False
            try:
                if net is not None:
                    await net.release_published()
                    released = True
                view = memoryview(memory)
                sources: dict[bytes, Any] = {}
                for i, r in enumerate(manifest["memory"]["chunks"]):
                    if r is not None and r[0] not in sources:
                        sources[r[0]] = (lambda i=i: view[i * CHUNK:(i + 1) * CHUNK])
                for d in manifest["disks"]:
                    for r in d["chunks"]:
                        if r is not None and r[0] not in sources:
                            sources[r[0]] = (lambda r=r: snaps.store.read_chunk(r, []))
                chunks = sorted(h.hex() for h in sources)
                missing = (await peer.call("POST", "/v1/snapshots/chunks/missing", {"chunks": chunks}))["missing"]
                try:
                    await peer.call("GET", f"/v1/images/{manifest['vm']['digest']}")
                    image = None
                except _PeerError as exc:
                    if exc.status != 404:
                        raise
                    img = hv.images.resolve(manifest["vm"]["digest"])
                    image = await hv.sched.on_io(hv.images.module_bytes, img)
                wanted = [(bytes.fromhex(h), sources[bytes.fromhex(h)]) for h in missing]
                gen = transfer.export_blocks(snaps.store, encode_manifest(portable(manifest)), wanted, image,
                                             wt.WASMTIME_VERSION, hv.opts.fingerprint())

                async def stream() -> AsyncIterator[bytes]:
                    sentinel = object()
                    while True:
                        block = await hv.sched.on_io(next, gen, sentinel)
                        if block is sentinel:
                            return
                        yield block

                t_send = time.perf_counter()
                # the VM is frozen here until the target answers: the target fsyncs just after answering
                await peer.call("POST", "/v1/snapshots/import?durable=false", data=stream())
                imported = True
                t_restore = time.perf_counter()
                # the target trusts no grant a snapshot stream carries: the caller, who holds a socket or a
                # token for both daemons, grants the VM's network rules explicitly
                new = await peer.call("POST", f"/v1/snapshots/{name}/restore",
                                      {"name": vm.name, "start": was_running,
                                       "allow_egress": list(vm.spec.allow_egress),
                                       "publish": [asdict(p) for p in vm.spec.publish],
                                       "keep_disk_names": True})
                t_done = time.perf_counter()
            except BaseException as exc:
                if released and net is not None:
                    try:
                        await net.rebind_published()
                    except OSError as bind_exc:
                        log.error("vm=%s could not rebind its published ports: %s", vm.id[:12], bind_exc)
                hv.thaw(vm)
                if imported:  # do not leave the half-done migration's snapshot at the target
                    try:
                        await peer.call("DELETE", f"/v1/snapshots/{name}")
                    except (aiohttp.ClientError, _PeerError, OSError) as del_exc:
                        log.warning("could not remove snapshot %s at the target: %s", name, del_exc)
                if isinstance(exc, (aiohttp.ClientError, _PeerError, OSError, MicrovmError)):
                    raise MigrationFailed(f"migration to {to} failed: {exc}; the VM keeps running here") from None
                raise
            finally:
                if disk_pack is not None:
                    async with snaps.write_lock:
                        await hv.sched.on_io(snaps.store.collect, {disk_pack})
            hv.end_migrated(vm)
        await hv.remove(vm, force=True)
        try:
            await peer.call("DELETE", f"/v1/snapshots/{name}")  # the target keeps the VM, not the snapshot
        except (aiohttp.ClientError, _PeerError, OSError) as exc:
            log.warning("could not remove the migration snapshot %s at the target: %s", name, exc)
        total_ms = (time.perf_counter() - t0) * 1000
        log.info("vm=%s migrated to %s as %s in %.1f ms (%d of %d chunks sent)", vm.id[:12], to,
                 new.get("id", "?")[:12], total_ms, len(missing), len(chunks))
        moved = _migrated_disks(manifest["disks"], new)
        for d in moved:
            if d["renamed"]:
                log.warning("vm=%s disk %s is %s on %s: %s", vm.id[:12], d["name"], d["target_name"], to,
                            d["reason"])
        return {"vm": new, "to": to, "snapshot": name, "disks": moved,
                "stats": {"total_ms": round(total_ms, 3), "chunks_sent": len(missing), "chunks_total": len(chunks),
                          "capture_ms": manifest["stats"]["frozen_ms"], "downtime_ms": round(total_ms, 3),
                          "prepare_ms": round((t_send - t0) * 1000, 3),
                          "transfer_ms": round((t_restore - t_send) * 1000, 3),
                          "restore_ms": round((t_done - t_restore) * 1000, 3)}}

