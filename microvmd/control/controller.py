"""The controller: applies every action of the API (``actions.py``) to the daemon's parts.

It is the one place that reaches into the hypervisor, the snapshot controller, the migration and the
devices on behalf of a client; handlers in ``microvmd/api`` only decode, call ``apply`` and encode.
Results are plain data in the shapes of ``microvmd/contract.py`` (or a stream, for logs and exports).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from .. import __version__, contract
from ..devices import files
from ..devices.blk import BlockDevice
from ..devices.console import MemoryConsole
from ..devices.wasip1 import WasiState
from ..engine import wt
from ..errors import BadRequest, Conflict, MicrovmError
from ..functions.http import FnResponse, error_response
from ..functions.service import Functions
from ..snapshot import dirty
from ..snapshot.controller import Grants, Snapshots
from ..snapshot.migrate import migrate
from ..vmm.manager import Hypervisor
from ..vmm.state import VmState
from ..vmm.vm import PublishSpec, Vm, VmSpec
from . import actions as a
from .system import System

A = TypeVar("A", bound=a.Action)
INLINE_READ = 1 << 16  # console bytes a log reader reads on the event loop (page-cache reads of new output)
Apply = Callable[[Any, Any], Awaitable[Any]]
_HANDLERS: dict[type[a.Action], Apply] = {}


def _applies(kind: type[A]) -> Callable[[Callable[[Controller, A], Awaitable[Any]]],
                                        Callable[[Controller, A], Awaitable[Any]]]:
    def register(fn: Callable[[Controller, A], Awaitable[Any]]) -> Callable[[Controller, A], Awaitable[Any]]:
        _HANDLERS[kind] = fn
        return fn
    return register


class Controller:
    def __init__(self, hv: Hypervisor, snapshots: Snapshots, functions: Functions | None = None) -> None:
        self.hv = hv
        self.snapshots = snapshots
        self.functions = functions or Functions(hv, snapshots, None)
        self.system = System(hv, snapshots)

    async def apply(self, action: a.Action) -> Any:
        """Apply one action; MicrovmError (with its status and code) when it cannot be done."""
        try:
            fn = _HANDLERS[type(action)]
        except KeyError:
            raise MicrovmError(f"no controller for {type(action).__name__}") from None
        return await fn(self, action)

    # ------------------------------------------------------------------ helpers
    def _vm(self, ref: str) -> Vm:
        return self.hv.get(ref)

    def _blk(self) -> BlockDevice:
        dev = self.hv.devices.get(BlockDevice)
        if dev is None:
            raise MicrovmError("this daemon has no block device", code="no_block_device")
        return dev

    # ------------------------------------------------------------------ system
    @_applies(a.GetInfo)
    async def info(self, _: a.GetInfo) -> dict[str, Any]:
        h = self.hv
        cfg = h.cfg
        return {
            "version": __version__, "wasmtime_version": wt.WASMTIME_VERSION, "api_version": "v1",
            "state_dir": str(cfg.state_dir), "socket": str(cfg.socket), "vms": h.counts(),
            "images": len(h.images.images), "uptime_s": round(time.time() - h.started, 3),
            "engine": {"fingerprint": h.opts.fingerprint(), "workers": h.sched.workers,
                       "epoch_interval_s": cfg.engine.epoch_interval},
            "event_loop": h.loop_lag.to_api(),
            "limits": {"memory": cfg.limits.memory, "max_memory": cfg.limits.max_memory,
                       "fuel": cfg.limits.fuel, "timeout": cfg.limits.timeout, "upload": cfg.upload_limit,
                       "total_memory": h.builder.memory.total, "total_memory_used": h.builder.memory.used,
                       "open_files": h.files.per_vm, "total_open_files": h.files.total,
                       "total_open_files_used": h.files.used, "reserved_files": h.files.reserve,
                       "process_open_files": files.process_limit(),
                       "compile_jobs": cfg.limits.compile_jobs, "compile_queue": cfg.limits.compile_queue,
                       "compile_admitted": h.compiler.admitted, "max_functions": cfg.limits.max_functions,
                       "log_rate": cfg.limits.log_rate_budget()[0], "log_burst": cfg.limits.log_rate_budget()[1]},
            "snapshots": {"dirty_tracking": dirty.describe(cfg.engine.dirty_tracking)},
            "console": {"mode": cfg.engine.console, "file_descriptors": h.console_fds()},
        }

    @_applies(a.GetVersion)
    async def version(self, _: a.GetVersion) -> dict[str, Any]:
        return {"version": __version__, "wasmtime_version": wt.WASMTIME_VERSION, "api_version": "v1"}

    @_applies(a.CheckSystem)
    async def check_system(self, act: a.CheckSystem) -> dict[str, Any]:
        return await self.system.check(act.repair)

    @_applies(a.SpaceUsage)
    async def space_usage(self, _: a.SpaceUsage) -> dict[str, Any]:
        return await self.system.df()

    @_applies(a.Prune)
    async def prune(self, act: a.Prune) -> dict[str, Any]:
        return await self.system.prune(act.dry_run)

    # ------------------------------------------------------------------ images
    @_applies(a.ImportImage)
    async def import_image(self, act: a.ImportImage) -> dict[str, Any]:
        if not act.data:
            raise BadRequest("empty body: send the module's bytes", code="empty_body")
        return (await self.hv.import_image(act.data, act.name, act.entry, asyncify=act.asyncify,
                                           durable=act.durable, client=act.client)).to_api()

    @_applies(a.ListImages)
    async def list_images(self, _: a.ListImages) -> dict[str, Any]:
        images = self.hv.images
        return {"images": [i.to_api() for i in images.list()], "importing": list(images.importing.values())}

    @_applies(a.GetImage)
    async def get_image(self, act: a.GetImage) -> dict[str, Any]:
        return self.hv.images.resolve(act.ref).to_api()

    @_applies(a.UpdateImage)
    async def update_image(self, act: a.UpdateImage) -> dict[str, Any]:
        h = self.hv
        lim = act.patch.limits
        if isinstance(lim, contract.ImageLimits) and isinstance(lim.memory, int) \
                and lim.memory > h.cfg.limits.max_memory:
            # held to the rule a VM's own limit is held to: a default no create could use breaks them all
            raise BadRequest(f"limits.memory {lim.memory} is above the daemon's maximum of "
                             f"{h.cfg.limits.max_memory} (limits.max_memory)", code="invalid_limit")
        img = await h.sched.on_io(h.images.update_manifest, act.ref, act.patch)
        return img.to_api()  # type: ignore[no-any-return]

    @_applies(a.RemoveImage)
    async def remove_image(self, act: a.RemoveImage) -> None:
        img = self.hv.images.resolve(act.ref)
        users = self.functions.needing_image(img.digest)
        if users:
            raise Conflict(f"image {act.ref} runs function(s) {', '.join(users)}: remove them first",
                           code="image_in_use")
        await self.hv.remove_image(act.ref, await self.snapshots.needing_image(img.digest))

    # ------------------------------------------------------------------ VMs
    @_applies(a.CreateVm)
    async def create_vm(self, act: a.CreateVm) -> dict[str, Any]:
        if act.wait and not act.start:
            raise BadRequest("wait=true needs start=true", code="invalid_query")
        vm = await self.hv.create(VmSpec.from_contract(act.spec), start=act.start, durable=act.durable)
        if act.wait:  # one round trip for a whole run: the answer carries the exit record
            await self.hv.wait(vm)
        return vm.to_api()

    @_applies(a.ListVms)
    async def list_vms(self, act: a.ListVms) -> dict[str, Any]:
        # a function's instances are its own (fn ls counts them): listed with all=true only
        return {"vms": [v.to_api() for v in self.hv.list(act.all) if act.all or v.spec.owner is None]}

    @_applies(a.GetVm)
    async def get_vm(self, act: a.GetVm) -> dict[str, Any]:
        return self._vm(act.ref).to_api()

    @_applies(a.RemoveVm)
    async def remove_vm(self, act: a.RemoveVm) -> None:
        await self.hv.remove(self._vm(act.ref), act.force)

    @_applies(a.StartVm)
    async def start_vm(self, act: a.StartVm) -> dict[str, Any]:
        vm = await self.hv.start(self._vm(act.ref))
        if act.wait:  # start and wait in one request (as create with wait=true)
            await self.hv.wait(vm)
        return vm.to_api()

    @_applies(a.StopVm)
    async def stop_vm(self, act: a.StopVm) -> dict[str, Any]:
        return (await self.hv.stop(self._vm(act.ref))).to_api()

    @_applies(a.KillVm)
    async def kill_vm(self, act: a.KillVm) -> dict[str, Any]:
        return (await self.hv.kill(self._vm(act.ref))).to_api()

    @_applies(a.PauseVm)
    async def pause_vm(self, act: a.PauseVm) -> dict[str, Any]:
        return (await self.hv.pause(self._vm(act.ref))).to_api()

    @_applies(a.ResumeVm)
    async def resume_vm(self, act: a.ResumeVm) -> dict[str, Any]:
        return (await self.hv.resume(self._vm(act.ref))).to_api()

    @_applies(a.WaitVm)
    async def wait_vm(self, act: a.WaitVm) -> dict[str, Any]:
        return await self.hv.wait(self._vm(act.ref), act.timeout)

    @_applies(a.AddFuel)
    async def add_fuel(self, act: a.AddFuel) -> dict[str, Any]:
        return (await self.hv.add_fuel(self._vm(act.ref), act.amount)).to_api()

    @_applies(a.ReadLogs)
    async def read_logs(self, act: a.ReadLogs) -> a.LogStream:
        vm = self._vm(act.ref)  # resolved now: an unknown VM is a 404 before the answer starts
        start = {s: vm.console.size(s) if act.from_end else 0 for s in act.streams}
        return a.LogStream(self._log_chunks(vm, start, act.follow))

    async def _log_chunks(self, vm: Vm, offsets: dict[str, int], follow: bool) -> AsyncIterator[bytes]:
        if not follow:
            async for data in self._log_rounds(vm, offsets, False):
                yield data
            return
        vm.follow_loop = asyncio.get_running_loop()
        vm.followers += 1
        try:
            async for data in self._log_rounds(vm, offsets, True):
                yield data
        finally:
            vm.followers -= 1

    async def _log_rounds(self, vm: Vm, offsets: dict[str, int], follow: bool) -> AsyncIterator[bytes]:
        h = self.hv
        streams = list(offsets)
        while True:
            ev = vm.changed  # (taken before the look: a change or a poke after it is not missed)
            # a parked out_of_fuel VM writes nothing until fuel is added: the stream ends, like at exit
            ended = vm.state.terminal or vm.state == VmState.OUT_OF_FUEL or vm.id not in h.vms
            wrote = False
            for s in streams:
                # a follower at the end of the output usually finds a line or a few, just written (in the page
                # cache): read here, no thread hop. Not a plain read of a whole log, not during a hole punch.
                inline = follow and not vm.console.trimming
                while True:
                    if isinstance(vm.console, MemoryConsole):  # in memory: a copy under a lock, no file
                        data, offsets[s] = vm.console.read(s, offsets[s])
                    elif inline:
                        data, offsets[s] = vm.console.read(s, offsets[s], INLINE_READ)
                        if len(data) < INLINE_READ:  # all there is: no second look
                            if data:
                                wrote = True
                                yield data
                            break
                        inline = False  # more behind it: the rest on an I/O thread
                    else:
                        data, offsets[s] = await h.sched.on_io(vm.console.read, s, offsets[s])
                    if not data:
                        break
                    wrote = True
                    yield data
            if not follow or ended:
                return
            if not wrote:
                try:
                    await asyncio.wait_for(ev.wait(), 0.05)
                except TimeoutError:
                    pass

    @_applies(a.FeedStdin)
    async def feed_stdin(self, act: a.FeedStdin) -> dict[str, Any]:
        vm = self._vm(act.ref)
        part = vm.devices.get(WasiState)
        if part is None:
            raise Conflict(f"VM {vm.name} cannot take input: its image reads stdin through wasmtime's own WASI "
                           f"(imported with --no-asyncify, or not rewritable); import it without --no-asyncify",
                           code="no_stdin")
        stdin = part.stdin
        if stdin.eof:
            raise Conflict(f"the standard input of VM {vm.name} is closed: create it with stdin open "
                           f"(microvm run -i, or \"stdin\": true)", code="stdin_closed")
        total = 0
        try:
            async for chunk in act.chunks:
                view = memoryview(chunk)
                while view:
                    if stdin.eof or vm.state.terminal:
                        return {"bytes": total}  # closed by another attacher, or the VM ended
                    n = stdin.feed(bytes(view))
                    total += n
                    view = view[n:]
                    if view:  # the guest has not read what it was given: until it reads (or the VM ends)
                        await stdin.room()
        finally:
            if not stdin.eof:
                stdin.close()
        return {"bytes": total}

    # ------------------------------------------------------------------ disks
    @_applies(a.CreateDisk)
    async def create_disk(self, act: a.CreateDisk) -> dict[str, Any]:
        return (await self._blk().create_disk(act.name, act.size, act.durable)).to_api()

    @_applies(a.ListDisks)
    async def list_disks(self, _: a.ListDisks) -> dict[str, Any]:
        return {"disks": [d.to_api() for d in self._blk().list_disks()]}

    @_applies(a.GetDisk)
    async def get_disk(self, act: a.GetDisk) -> dict[str, Any]:
        return self._blk().get_disk(act.name).to_api()

    @_applies(a.RemoveDisk)
    async def remove_disk(self, act: a.RemoveDisk) -> None:
        await self._blk().remove_disk(act.name)

    @_applies(a.ReplaceDiskContent)
    async def replace_disk_content(self, act: a.ReplaceDiskContent) -> dict[str, Any]:
        return (await self._blk().upload(act.name, act.chunks, act.limit, act.durable)).to_api()

    @_applies(a.SetDiskRateLimiter)
    async def set_disk_rate_limiter(self, act: a.SetDiskRateLimiter) -> dict[str, Any]:
        vm = self._vm(act.ref)
        patch = {"rate_limiter": None if act.rate_limiter is None else contract.to_builtins(act.rate_limiter)}
        return self._blk().set_rate_limiter(vm, act.index, patch)

    # ------------------------------------------------------------------ snapshots and migration
    @_applies(a.CreateSnapshot)
    async def create_snapshot(self, act: a.CreateSnapshot) -> dict[str, Any]:
        return await self.snapshots.create(self._vm(act.ref), act.name, act.diff, act.durable)

    @_applies(a.ListSnapshots)
    async def list_snapshots(self, act: a.ListSnapshots) -> dict[str, Any]:
        found, damaged = await self.snapshots.list_all()
        if not act.all:  # a VM's checkpoints are its own, shown by inspect (checkpoint) and by ?all=true
            found = [s for s in found if not s["name"].startswith(f"ckpt-{s['vm']['id'][:12]}-")]
        return {"snapshots": found, "damaged": damaged}

    @_applies(a.GetSnapshot)
    async def get_snapshot(self, act: a.GetSnapshot) -> dict[str, Any]:
        return await self.snapshots.get(act.name)

    @_applies(a.RemoveSnapshot)
    async def remove_snapshot(self, act: a.RemoveSnapshot) -> None:
        await self.snapshots.remove(act.name)

    @_applies(a.ExportSnapshot)
    async def export_snapshot(self, act: a.ExportSnapshot) -> a.BlockStream:
        m, gen = await self.snapshots.export_blocks(act.name)  # checked before the answer starts

        async def blocks() -> AsyncIterator[bytes]:
            sentinel = object()
            while True:  # the generator reads packs: each block is pulled on an I/O thread
                block = await self.hv.sched.on_io(next, gen, sentinel)
                if block is sentinel:
                    return
                yield block
        return a.BlockStream(m["name"], blocks())

    @_applies(a.ImportSnapshot)
    async def import_snapshot(self, act: a.ImportSnapshot) -> dict[str, Any]:
        return await self.snapshots.import_stream(act.readexactly, act.durable, act.client)

    @_applies(a.RestoreSnapshot)
    async def restore_snapshot(self, act: a.RestoreSnapshot) -> dict[str, Any]:
        grants = Grants(None if act.allow_egress is None else list(act.allow_egress),
                        None if act.publish is None else [PublishSpec(p.guest_port, p.host_port,
                                                                      p.host_ip or "127.0.0.1")
                                                          for p in act.publish])
        return (await self.snapshots.restore(act.name, act.new_name, act.start, grants,
                                                   keep_disk_names=act.keep_disk_names)).to_api()

    @_applies(a.FindMissingChunks)
    async def find_missing_chunks(self, act: a.FindMissingChunks) -> dict[str, Any]:
        return {"missing": [h.hex() for h in self.snapshots.missing(list(act.chunks))]}

    @_applies(a.MigrateVm)
    async def migrate_vm(self, act: a.MigrateVm) -> dict[str, Any]:
        return await migrate(self.hv, self.snapshots, self._vm(act.ref), act.to, act.token, act.ca_file)

    # ------------------------------------------------------------------ functions
    @_applies(a.DeployFunction)
    async def deploy_function(self, act: a.DeployFunction) -> dict[str, Any]:
        f = self.functions
        return f.to_api(await f.deploy(act.spec))

    @_applies(a.ListFunctions)
    async def list_functions(self, _: a.ListFunctions) -> dict[str, Any]:
        f = self.functions
        gw = f.gateway
        return {"functions": [f.to_api(fn) for fn in f.ordered()], "gateway": f"{gw[0]}:{gw[1]}" if gw else None}

    @_applies(a.GetFunction)
    async def get_function(self, act: a.GetFunction) -> dict[str, Any]:
        return self.functions.to_api(self.functions.get(act.name))

    @_applies(a.RemoveFunction)
    async def remove_function(self, act: a.RemoveFunction) -> None:
        await self.functions.remove(act.name)

    @_applies(a.InvokeFunction)
    async def invoke_function(self, act: a.InvokeFunction) -> FnResponse:
        f = self.functions
        if act.name is None:
            fn = f.match(act.request.path)
            if fn is None:
                return error_response(404, "no_route", f"no function serves {act.request.path}", "-")
        else:
            fn = f.get(act.name)
        req = act.request
        if act.name is not None and not req.route:  # through the API: the function's own route
            req.route = fn.rec.route
        elif act.name is None:
            req.route = fn.rec.route
        return await f.invoke(fn, req, act.read_body)

    @_applies(a.ReadFunctionLogs)
    async def read_function_logs(self, act: a.ReadFunctionLogs) -> str:
        return self.functions.get(act.name).log.text()
