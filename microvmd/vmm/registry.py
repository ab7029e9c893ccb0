"""The VM registry: which VMs exist, how a reference finds one, and their records on disk.

Lookups and the in-memory table live on the event loop. Records go to a ``RecordStore``: the daemon's is
``DirRecords`` (``state/vms/<id>/vm.json``, written on one persist thread, coalesced and in order: a record
is never overwritten by an older one, and a removed VM's directory is deleted after its last write). An
ephemeral VM is in the table while it exists and never reaches the store.
"""
from __future__ import annotations

import asyncio
import builtins
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from ..durable import sync_dir, write_all, write_atomic
from ..errors import Conflict, MicrovmError, NotFound
from .state import VmState
from .vm import Vm

log = logging.getLogger("microvmd.vmm")

READY_DIRS = 8  # VM directories kept made in advance (with their empty console logs and record file)


def looks_like_id(ref: str) -> bool:
    """Whether ``ref`` could be a VM id or an id prefix (ids are 32 lower-case hex digits)."""
    return len(ref) <= 32 and all(c in "0123456789abcdef" for c in ref)


class RecordNotWritten(MicrovmError):
    """The state dir refused a new VM's record (out of descriptors or space): the create is undone."""

    status = 503
    code = "record_not_written"


class RecordStore(Protocol):
    """Where VM records survive a daemon restart."""

    def load(self) -> list[tuple[dict[str, Any], Path]]: ...   # on an I/O thread, at start-up
    def new_id(self) -> tuple[str, bool]: ...                   # (id, whether its directory exists already)
    def directory(self, vm_id: str) -> Path: ...
    def write_now(self, batch: list[tuple[Path, dict[str, Any]]],
                  durable: bool = True) -> asyncio.Future[list[str]]: ...  # in order;
    #                                                               the ids whose record could not be written
    async def delete(self, vm: Vm) -> None: ...                 # after any write still queued for it
    async def close(self) -> None: ...


READY_FILES = ("stdout.log", "stderr.log", "vm.json")


def _make_ready_dirs(parent: Path, n: int, remove: Callable[[Path], None] = shutil.rmtree) -> list[str]:
    """Off the loop (the ready-dirs thread; at start-up, load's): ``n`` VM directories named by the ids the
    next VMs get, each with its two empty console logs and an empty record file, on stable storage (each
    directory and then their parent synced). Making one costs a millisecond or more on ext4
    (bench/bench_console.py), off the path of the create that uses it; and the VM's first record is then one
    write and one fdatasync into a file that already exists durably, instead of a temporary file, a rename
    and two syncs (_write_records)."""
    ids = []
    for _ in range(n):
        vm_id = uuid.uuid4().hex
        d = parent / vm_id
        try:
            d.mkdir()
            for name in READY_FILES:
                os.close(os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640))
            sync_dir(d)
        except OSError as exc:
            log.warning("cannot prepare a VM directory: %s", exc)
            remove(d)
            break
        ids.append(vm_id)
    if ids:
        try:
            sync_dir(parent)
        except OSError as exc:
            log.warning("cannot prepare a VM directory: %s", exc)
            for vm_id in ids:
                remove(parent / vm_id)
            return []
    return ids


def _is_ready_dir(d: Path) -> bool:
    """A directory made in advance and never used: nothing in it but its empty files."""
    try:
        return all(f.name in READY_FILES and f.stat().st_size == 0 for f in d.iterdir())
    except OSError:
        return False


FIRST_RECORD_MAX = 4096  # a first record written in place is one block (larger ones are written atomically)


def unused(d: Path) -> bool:
    """A VM directory whose record was never written (no ``vm.json``, or the empty one it was made with): its
    create was never answered. (The directories made in advance look like this until a create takes one.)"""
    try:
        return (d / "vm.json").stat().st_size == 0
    except FileNotFoundError:
        return True


def _write_first(path: Path, data: bytes, durable: bool) -> bool:
    """A VM's first record, into the empty ``vm.json`` its ready directory came with: one write (and one
    fdatasync), no rename. A crash before the write leaves it empty, and the directory is removed at start-up
    (the create was never answered: the answer waits for this write). Only a record of at most one block
    (FIRST_RECORD_MAX) goes this way: a crash during the write leaves it empty or whole in practice, and one
    left torn is reported as a damaged record at start-up, like any other. False when the file is not an
    empty one made in advance, or the record is bigger than a block: the caller writes it atomically then."""
    if len(data) > FIRST_RECORD_MAX:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if os.fstat(fd).st_size != 0:
            return False
        write_all(fd, data)
        if durable:
            os.fdatasync(fd)
    finally:
        os.close(fd)
    return True


def _write_records(batch: list[tuple[Path, dict[str, Any]]], durable: bool = True) -> list[str]:
    """A VM's first record goes into the empty file of its ready directory (``_write_first``); every other
    replaces the last whole (temporary file, rename). With ``durable`` it is on stable storage (fdatasync;
    or fsynced with its directory, and a new VM's directory with the directory of all VMs) before the write
    counts as done. Returns the ids whose
    record could not be written (each logged)."""
    failed = []
    for d, rec in batch:
        try:
            data = json.dumps(rec).encode()
            if _write_first(d / "vm.json", data, durable):
                continue
            # the VM's first record in a directory not made in advance (made just now by this write, by its
            # console or for its disk overlays): its entry in vms/ is made durable with it
            new = not (d / "vm.json").exists()
            d.mkdir(parents=True, exist_ok=True)
            write_atomic(d / "vm.json", data, d / "vm.json.tmp", durable)
            if durable and new:
                sync_dir(d.parent)
        except OSError as exc:
            log.error("vm=%s cannot save its record: %s", str(rec.get("id", "?"))[:12], exc)
            failed.append(str(rec.get("id", "?")))
    return failed


class DirRecords:
    """Records as ``<root>/<id>/vm.json``, with a few VM directories made in advance for the next creates."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._persist = ThreadPoolExecutor(1, thread_name_prefix="persist")
        # ready directories are made (and synced) on their own thread: a refill never delays a record write
        self._ready_pool = ThreadPoolExecutor(1, thread_name_prefix="ready-dirs")
        self._ready: list[str] = []  # ids whose directories exist already (see _make_ready_dirs)
        self._refilling = False
        self._closing = False
        # directories that could not be deleted (out of descriptors: rmtree needs one per level), retried
        # before every later write and at close; touched on the persist thread only
        self._leftover: set[Path] = set()

    def load(self) -> list[tuple[dict[str, Any], Path]]:
        found = []
        for d in sorted(self.root.iterdir()):
            rec = d / "vm.json"
            if unused(d):
                # made in advance and never used, or created moments before a crash with its first record
                # never written, so never acknowledged: nothing can be restored
                if not _is_ready_dir(d):
                    log.info("removing %s: a VM directory without a record", d.name)
                self._remove(d)
                continue
            try:
                found.append((json.loads(rec.read_text()), d))
            except (OSError, ValueError) as exc:
                log.warning("skipping damaged VM record %s: %s", d.name, exc)
        self._ready = _make_ready_dirs(self.root, READY_DIRS, self._remove)
        return found

    def new_id(self) -> tuple[str, bool]:
        premade = bool(self._ready)
        vm_id = self._ready.pop() if premade else uuid.uuid4().hex
        self._refill()
        return vm_id, premade

    def directory(self, vm_id: str) -> Path:
        return self.root / vm_id

    def write_now(self, batch: list[tuple[Path, dict[str, Any]]], durable: bool = True) -> asyncio.Future[list[str]]:
        return asyncio.get_running_loop().run_in_executor(self._persist, self._write, batch, durable)

    def _write(self, batch: list[tuple[Path, dict[str, Any]]], durable: bool = True) -> list[str]:
        self._sweep()
        return _write_records(batch, durable)

    async def delete(self, vm: Vm) -> None:
        await asyncio.get_running_loop().run_in_executor(self._persist, self._remove, vm.dir)

    def _remove(self, d: Path) -> None:
        """On the persist thread: delete a VM directory, or remember it to try again (never left behind
        unlisted for the daemon's life because it ran out of descriptors once)."""
        self._sweep()
        shutil.rmtree(d, ignore_errors=True)
        if os.path.lexists(d):
            if d not in self._leftover:
                log.warning("cannot delete VM directory %s yet; will try again", d.name)
            self._leftover.add(d)

    def _remove_later(self, d: Path) -> None:
        """From any thread: ``_remove`` on the persist thread (which keeps what it cannot delete yet)."""
        try:
            self._persist.submit(self._remove, d)
        except RuntimeError:  # shut down: the daemon is stopping (the next start removes it)
            pass

    def _sweep(self) -> None:
        for d in list(self._leftover):
            shutil.rmtree(d, ignore_errors=True)
            if not os.path.lexists(d):
                self._leftover.discard(d)
                log.info("deleted VM directory %s, left over from an earlier failure", d.name)

    def _refill(self) -> None:
        """Keep a few VM directories made in advance; refilled a moment later, after the current create."""
        # topped up after every use (not in batches): at rest there are always READY_DIRS, so the state dir
        # of an idle daemon looks the same whatever ran and was removed before
        if self._refilling or len(self._ready) >= READY_DIRS or self._closing:
            return
        self._refilling = True
        loop = asyncio.get_running_loop()

        def done(fut: asyncio.Future[list[str]]) -> None:
            self._refilling = False
            if not fut.cancelled() and fut.exception() is None:
                made = fut.result()
                if self._closing:  # made while the daemon stopped: not kept (a few empty directories)
                    for vm_id in made:
                        shutil.rmtree(self.root / vm_id, ignore_errors=True)
                    return
                self._ready.extend(made)
                if made and len(self._ready) < READY_DIRS:  # some were taken meanwhile: top up again
                    self._refill()

        def start() -> None:
            if self._closing:
                self._refilling = False
                return
            fut = loop.run_in_executor(self._ready_pool, _make_ready_dirs, self.root,
                                       READY_DIRS - len(self._ready), self._remove_later)
            fut.add_done_callback(done)

        loop.call_later(0.02, start)

    async def close(self) -> None:
        """Remove the directories made in advance and unused; wait for every queued write."""
        self._closing = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._ready_pool.shutdown, True)  # (a refill under way ends first)
        ready, self._ready = self._ready, []
        for vm_id in ready:
            self._persist.submit(self._remove, self.root / vm_id)
        self._persist.submit(self._sweep)
        await loop.run_in_executor(None, self._persist.shutdown, True)


class VmRegistry:
    """Every VM of the daemon by id, with its record kept in a ``RecordStore``.

    ``save`` marks a record for writing; marked records are written together within 50 ms, off the loop.
    """

    def __init__(self, records: RecordStore) -> None:
        self.records = records
        self.vms: dict[str, Vm] = {}
        self._dirty: dict[str, Vm] = {}
        self._flush_handle: asyncio.Handle | None = None

    # ------------------------------------------------------------------ start-up
    def read(self, make: Callable[[dict[str, Any], Path], Vm]) -> builtins.list[Vm]:
        """On an I/O thread at start-up: every record as a VM, as the record left it (a damaged one is
        skipped, logged). The Hypervisor adds them to the table on the loop and settles the ones that were
        live (``Hypervisor.load``)."""
        out = []
        for rec, d in self.records.load():
            try:
                out.append(make(rec, d))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("skipping damaged VM record %s: %s", d.name, exc)
        return out

    # ------------------------------------------------------------------ the table
    def new_id(self, ephemeral: bool) -> tuple[str, Path, bool]:
        """An id, its directory and whether that directory exists already (an ephemeral VM has none)."""
        if ephemeral:
            vm_id = uuid.uuid4().hex
            return vm_id, self.records.directory(vm_id), False
        vm_id, premade = self.records.new_id()
        return vm_id, self.records.directory(vm_id), premade

    def add(self, vm: Vm) -> None:
        self.vms[vm.id] = vm

    def discard(self, vm: Vm) -> None:
        self.vms.pop(vm.id, None)
        self._dirty.pop(vm.id, None)

    def __contains__(self, vm: Vm) -> bool:
        return self.vms.get(vm.id) is vm

    def get(self, ref: str) -> Vm:
        """A VM by id, name or unique id prefix (4+ characters). A reference that is one VM's name and a
        prefix of another's id is ambiguous (409), never silently the named one: a name cannot pass for
        another VM's id."""
        vm = self.vms.get(ref)
        if vm is not None:
            return vm
        by_name = [v for v in self.vms.values() if v.name == ref]
        if len(by_name) == 1:
            if len(ref) >= 4 and looks_like_id(ref) and any(
                    v.id.startswith(ref) and v is not by_name[0] for v in self.vms.values()):
                raise Conflict(f"VM reference {ref!r} is the name of one VM and an id prefix of another: use the "
                               f"full id", code="ambiguous_ref")
            return by_name[0]
        if len(ref) >= 4:
            hits = [v for v in self.vms.values() if v.id.startswith(ref)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise Conflict(f"VM reference {ref!r} is ambiguous", code="ambiguous_ref")
        raise NotFound(f"no such VM: {ref}", code="vm_not_found")

    def list(self, all_: bool) -> list[Vm]:
        vms = sorted(self.vms.values(), key=lambda v: v.created)
        return vms if all_ else [v for v in vms if v.state.live]

    def name_taken(self, name: str) -> bool:
        return any(v.name == name for v in self.vms.values())

    def id_prefixed_by(self, name: str) -> Vm | None:
        """The VM whose id this name would read as (4+ hex characters that prefix its id), if any."""
        if len(name) < 4 or not looks_like_id(name):
            return None
        return next((v for v in self.vms.values() if v.id.startswith(name)), None)

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in VmState}
        for vm in self.vms.values():
            out[vm.state.value] += 1
        return out

    # ------------------------------------------------------------------ records
    def save(self, vm: Vm) -> None:
        """Mark the VM's record for writing (nothing for an ephemeral VM)."""
        if vm.spec.ephemeral:
            return
        self._dirty[vm.id] = vm
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(0.05, self._flush)

    async def save_now(self, vm: Vm, durable: bool = True) -> None:
        """Write the VM's record and return once it is written (the API answers after it). A batched write
        marked before (``save``) is dropped: this record has what it would have (pause wrote it twice)."""
        if not vm.spec.ephemeral:
            if durable:  # (the batched write is durable: a write that is not does not stand in for it)
                self._dirty.pop(vm.id, None)
            await self.records.write_now([(vm.dir, vm.record())], durable)

    async def save_all_now(self, vms: builtins.list[Vm]) -> None:
        """Write these VMs' records in one batch and return once they are written."""
        for vm in vms:
            self._dirty.pop(vm.id, None)
        await self.records.write_now([(vm.dir, vm.record()) for vm in vms if not vm.spec.ephemeral])

    def save_soon(self, vm: Vm, durable: bool = True) -> asyncio.Future[builtins.list[str]] | None:
        """Start writing the record now (awaited later, e.g. while the VM is built): the future's result is
        empty once it is written, else it names the VM (see ``written``)."""
        if vm.spec.ephemeral:
            return None
        if durable:
            self._dirty.pop(vm.id, None)
        return self.records.write_now([(vm.dir, vm.record())], durable)

    @staticmethod
    async def written(vm: Vm, pending: asyncio.Future[builtins.list[str]]) -> None:
        """Await a ``save_soon``; RecordNotWritten when the record could not be written (the VM would not
        survive a restart, so its create must not answer 201)."""
        if await pending:
            raise RecordNotWritten(f"VM {vm.id[:12]}: its record could not be written (see the daemon's log); "
                                   f"the VM was not created")

    def _flush(self) -> asyncio.Future[builtins.list[str]]:
        self._flush_handle = None
        batch = [(vm.dir, vm.record()) for vm in self._dirty.values() if vm.id in self.vms]
        self._dirty.clear()
        return self.records.write_now(batch)

    async def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        await self._flush()

    async def delete(self, vm: Vm) -> None:
        """Remove the VM's files (after any record write still queued for it)."""
        self._dirty.pop(vm.id, None)
        if not vm.spec.ephemeral:
            await self.records.delete(vm)

    async def close(self) -> None:
        await self.flush()
        await self.records.close()
