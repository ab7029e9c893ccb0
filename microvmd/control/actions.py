"""Actions: one frozen type per operation of the API, the only thing a handler hands to the controller.

As Firecracker's ``VmmAction``: the API layer parses HTTP into one of these; ``Controller.apply`` dispatches
it. An action holds decoded, typed values (contract types for bodies); references to VMs, images, disks and
snapshots are the user's strings, resolved by the controller.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from .. import contract
from ..functions.http import FnRequest


class Action:
    """Base of every action."""


# ------------------------------------------------------------------ system
@dataclass(frozen=True)
class GetInfo(Action):
    pass


@dataclass(frozen=True)
class GetVersion(Action):
    pass


@dataclass(frozen=True)
class CheckSystem(Action):
    repair: bool = False


@dataclass(frozen=True)
class SpaceUsage(Action):
    pass


@dataclass(frozen=True)
class Prune(Action):
    dry_run: bool = False


# ------------------------------------------------------------------ images
@dataclass(frozen=True)
class ImportImage(Action):
    data: bytes
    name: str | None = None
    entry: str | None = None
    asyncify: bool = True  # rewrite a plain WASI module with Asyncify, so that it can be snapshotted running
    durable: bool = True  # fsynced before the answer (durable=false: not)
    client: str | None = None  # who asked: one client holds at most its share of the compile pool


@dataclass(frozen=True)
class ListImages(Action):
    pass


@dataclass(frozen=True)
class GetImage(Action):
    ref: str


@dataclass(frozen=True)
class UpdateImage(Action):
    ref: str
    patch: contract.ImagePatch


@dataclass(frozen=True)
class RemoveImage(Action):
    ref: str


# ------------------------------------------------------------------ VMs
@dataclass(frozen=True)
class CreateVm(Action):
    spec: contract.VmSpec
    start: bool = False
    wait: bool = False  # answer once the VM has exited or run out of fuel (needs start)
    durable: bool = True  # its record fsynced before the answer


@dataclass(frozen=True)
class ListVms(Action):
    all: bool = False


@dataclass(frozen=True)
class GetVm(Action):
    ref: str


@dataclass(frozen=True)
class RemoveVm(Action):
    ref: str
    force: bool = False


@dataclass(frozen=True)
class StartVm(Action):
    ref: str
    wait: bool = False


@dataclass(frozen=True)
class StopVm(Action):
    ref: str


@dataclass(frozen=True)
class KillVm(Action):
    ref: str


@dataclass(frozen=True)
class PauseVm(Action):
    ref: str


@dataclass(frozen=True)
class ResumeVm(Action):
    ref: str


@dataclass(frozen=True)
class WaitVm(Action):
    ref: str
    timeout: float | None = None


@dataclass(frozen=True)
class AddFuel(Action):
    ref: str
    amount: int


@dataclass(frozen=True)
class ReadLogs(Action):
    """Answered with a ``LogStream``: the console from its start (or, with ``from_end``, from what is
    written next), to its end (or the VM's, with ``follow``)."""
    ref: str
    streams: tuple[str, ...] = ("stdout", "stderr")
    follow: bool = False
    from_end: bool = False


@dataclass(frozen=True)
class FeedStdin(Action):
    """Stream bytes to the guest's standard input; its end closes the input (the guest reads end of file)."""
    ref: str
    chunks: AsyncIterator[bytes]


# ------------------------------------------------------------------ disks
@dataclass(frozen=True)
class CreateDisk(Action):
    name: str
    size: int
    durable: bool = True  # the image file, its index entry and their directory fsynced before the answer


@dataclass(frozen=True)
class ListDisks(Action):
    pass


@dataclass(frozen=True)
class GetDisk(Action):
    name: str


@dataclass(frozen=True)
class RemoveDisk(Action):
    name: str


@dataclass(frozen=True)
class ReplaceDiskContent(Action):
    name: str
    chunks: AsyncIterator[bytes]
    limit: int
    durable: bool = True  # the content fsynced and renamed durably into place before the answer


@dataclass(frozen=True)
class SetDiskRateLimiter(Action):
    ref: str
    index: int
    rate_limiter: contract.RateLimiterPatch | None


# ------------------------------------------------------------------ snapshots and migration
@dataclass(frozen=True)
class CreateSnapshot(Action):
    ref: str
    name: str | None = None
    diff: bool = False
    durable: bool = True  # pack and manifest fsynced before the answer


@dataclass(frozen=True)
class ListSnapshots(Action):
    all: bool = False  # also the VMs' checkpoints (they are replaced every --checkpoint-interval)


@dataclass(frozen=True)
class GetSnapshot(Action):
    name: str


@dataclass(frozen=True)
class RemoveSnapshot(Action):
    name: str


@dataclass(frozen=True)
class ExportSnapshot(Action):
    """Answered with a ``BlockStream``."""
    name: str


@dataclass(frozen=True)
class ImportSnapshot(Action):
    readexactly: Callable[[int], Awaitable[bytes]]
    durable: bool = True  # false: fsynced just after the answer (a migration's downtime)
    client: str | None = None  # who asked (the compile of the image it carries is theirs)


@dataclass(frozen=True)
class RestoreSnapshot(Action):
    """``allow_egress``/``publish``: the new VM's network grants; None keeps a local snapshot's and gives an
    imported one none."""
    name: str
    new_name: str | None = None
    start: bool = False
    allow_egress: tuple[str, ...] | None = None
    publish: tuple[contract.Publish, ...] | None = None
    keep_disk_names: bool = False  # a disk keeps its name when it is free here (a migration)


@dataclass(frozen=True)
class FindMissingChunks(Action):
    chunks: tuple[bytes, ...]


@dataclass(frozen=True)
class MigrateVm(Action):
    ref: str
    to: str
    token: str | None = None
    ca_file: str | None = None


# ------------------------------------------------------------------ functions
@dataclass(frozen=True)
class DeployFunction(Action):
    spec: contract.FunctionDeploy


@dataclass(frozen=True)
class ListFunctions(Action):
    pass


@dataclass(frozen=True)
class GetFunction(Action):
    name: str


@dataclass(frozen=True)
class RemoveFunction(Action):
    name: str


@dataclass(frozen=True)
class InvokeFunction(Action):
    """Answered with a ``FnResponse``. ``name`` None: the function whose route matches the request's path
    (the gateway); 404 when none does. With ``read_body`` the request's body is read by it once the function
    has admitted the request (it raises a MicrovmError, 408 or 413, when the client cannot deliver it)."""
    name: str | None
    request: FnRequest
    read_body: Callable[[], Awaitable[bytes]] | None = None


@dataclass(frozen=True)
class ReadFunctionLogs(Action):
    name: str


# ------------------------------------------------------------------ streamed results
@dataclass(frozen=True)
class LogStream:
    chunks: AsyncIterator[bytes]


@dataclass(frozen=True)
class BlockStream:
    name: str
    blocks: AsyncIterator[bytes]
