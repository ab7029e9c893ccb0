"""The API contract: one msgspec type for every request body and every JSON response body of the v1 API.

The daemon decodes requests into these types (JSON and MessagePack alike) and encodes its answers through
them; the OpenAPI document is generated from them; the client decodes the answers with them; VM records and
the spec inside a snapshot manifest are decoded with them too. A rule that a type or a ``Meta`` constraint
can state lives here; the few that cannot (an IP address, a finite timeout) are in ``check_vm_spec`` below,
the one place that runs them (the rate limiter's own rules are the devices', ``devices/ratelimit.py``).

Request types forbid unknown fields (a typo is a 400 naming the field); response types do not, so a client
keeps working against a daemon that has learnt new fields. Fields are declared in the order the daemon has
always sent them: the field order is the key order on the wire and in ``microvm --json`` output.

This module is imported by the client, so it imports nothing heavy: msgspec and the standard library only.
It does without ``from __future__ import annotations`` on purpose: msgspec reads every field's type when a
model is first used, and string annotations would have to be evaluated then (~1.5 ms of a `microvm ps` that
decodes one answer; the annotations built at import cost a fraction of that).
"""

import re
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType, field

__all__ = ["UNSET", "UnsetType"]

T = TypeVar("T")

U63 = 1 << 63
Count = Annotated[int, Meta(ge=0, le=U63 - 1)]
Positive = Annotated[int, Meta(gt=0, le=U63 - 1)]
Seconds = Annotated[float, Meta(gt=0)]
Port = Annotated[int, Meta(ge=1, le=65535)]
HostPort = Annotated[int, Meta(ge=0, le=65535)]
Digest = Annotated[str, Meta(pattern=r"^sha256:[0-9a-f]{64}$")]
# "(?![\s\S])" is the end of the string in Python and in ECMA regexes alike; "$" would let a final "\n" in
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}(?![\s\S])"
Name = Annotated[str, Meta(pattern=NAME_PATTERN)]
# VM names are freer than image or disk names, but never a path, a control character (C0, DEL, C1), a bidi
# mark, embedding, override or isolate, nor a line or paragraph separator: what `ps` prints is what it says
VM_NAME_PATTERN = (r"^(?!\.\.?(?![\s\S]))"
                   r"[^/\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]{1,128}"
                   r"(?![\s\S])")
VmName = Annotated[str, Meta(pattern=VM_NAME_PATTERN)]
VM_NAME_RULE = "1-128 characters without '/', control characters or bidi overrides, and not '.' or '..'"
_VM_NAME = re.compile(VM_NAME_PATTERN)


def valid_vm_name(name: str) -> bool:
    """The rule of ``VmName``, for a name that did not come through a request (a snapshot's, a restore's)."""
    return _VM_NAME.match(name) is not None
RESTART_PATTERN = r"^(no|always|unless-stopped|on-failure(:[0-9]{1,9})?)(?![\s\S])"  # = vmm/restart.py
VmState = Literal["created", "running", "paused", "out_of_fuel", "exited", "stopped"]
DiskMode = Literal["rw", "ro", "cow"]
Number = int | float  # a float field that keeps an integer as the client sent it


class Request(Struct, forbid_unknown_fields=True):
    """A request body. ``error_codes`` maps a top-level field to the error code of a 400 about it
    (default ``invalid_field``): the codes clients already rely on."""

    error_codes: ClassVar[dict[str, str]] = {}
    error_hints: ClassVar[dict[str, str]] = {}  # field -> what a user needs to read instead of a regex


class Response(Struct):
    """A response body; unknown fields are ignored so that an older client reads a newer daemon."""


# ================================================================== rate limiters (Firecracker's buckets)
class Bucket(Request):
    size: Annotated[int, Meta(ge=0, lt=1 << 62, description="tokens; 0 disables the bucket")]
    refill_time: Annotated[int, Meta(ge=0, lt=1 << 62, description="ms from empty to full; 0 disables it")]
    one_time_burst: Annotated[int, Meta(ge=0, lt=1 << 62)] = 0


class RateLimiter(Request):
    """``bandwidth`` counts bytes, ``ops`` counts calls; a missing or null bucket is unlimited."""

    bandwidth: Bucket | None = None
    ops: Bucket | None = None


class RateLimiterPatch(Request):
    """A bucket left out keeps its setting, ``null`` removes it, an object replaces it."""

    bandwidth: Bucket | None | UnsetType = UNSET
    ops: Bucket | None | UnsetType = UNSET


# ================================================================== the VM spec (request, record, snapshot)
class DirSpec(Request):
    host: str  # (an existing absolute directory: the Hypervisor checks it on its host)
    guest: str | None = None  # the host path when left out; absolute, or "." (check_vm_spec)
    readonly: bool = False


class DiskAttach(Request):
    name: str
    mode: DiskMode = "rw"
    rate_limiter: RateLimiter | None = None


class Publish(Request):
    guest_port: Port
    host_port: HostPort = 0
    host_ip: str | None = "127.0.0.1"


class VmSpec(Request):
    """What a user asks a VM to be; stored in its record and in its snapshots as it was accepted."""

    image: Annotated[str, Meta(min_length=1, description="image name, sha256:<hex> or a digest prefix")]
    name: VmName | None = None
    args: list[str] = []
    env: dict[str, str] = {}
    fuel: Positive | None = None
    memory: Annotated[int, Meta(ge=0, le=U63 - 1, description="bytes")] | None = None
    timeout: Annotated[Number, Meta(description="seconds")] | None = None
    dirs: list[DirSpec] = []
    disks: list[DiskAttach] = []
    publish: list[Publish] = []
    allow_egress: list[Annotated[str, Meta(description="HOST:PORT or CIDR:PORT")]] = []
    auto_remove: bool = False
    ephemeral: Annotated[bool, Meta(description="no record and no console files (output kept in memory); "
                                                "the VM is gone when it ends")] = False
    stdin: Annotated[bool, Meta(description="keep the guest's standard input open for POST .../stdin "
                                            "(microvm run -i, attach); otherwise it reads end of file")] = False
    net_rate_limiter: RateLimiter | None = None
    restart: Annotated[str, Meta(pattern=RESTART_PATTERN,
                                 description="no, on-failure[:N], always or unless-stopped (docker's meanings)")] = "no"
    checkpoint_interval: Annotated[float, Meta(ge=0.05, le=86400.0, description="seconds between checkpoints "
                                                "(diff snapshots; a crashed daemon resumes the VM from the last)")] \
        | None = None

    error_codes: ClassVar[dict[str, str]] = {"name": "invalid_name", "fuel": "invalid_limit",
                                             "memory": "invalid_limit", "timeout": "invalid_limit",
                                             "restart": "invalid_restart_policy",
                                             "checkpoint_interval": "invalid_checkpoint_interval"}
    error_hints: ClassVar[dict[str, str]] = {
        "name": "invalid VM name: 1-128 characters without '/', control characters, bidi marks or "
                "overrides, or line separators, and not '.' or '..'",
        "restart": "invalid restart policy: expected no, on-failure[:N], always or unless-stopped"}


class VmSpecView(VmSpec, forbid_unknown_fields=False):
    """A spec in an answer (the VM object): a field this version does not know (a newer daemon's, e.g. the
    target of a migration) is left out rather than refused."""


class VmCreate(VmSpec):
    """``POST /v1/vms``: the spec, and whether to start the VM at once."""

    start: bool = False


class FuelAdd(Request):
    amount: Positive


class ImageLimits(Request):
    fuel: Positive | None | UnsetType = UNSET
    memory: Annotated[int, Meta(ge=65536, le=U63 - 1)] | None | UnsetType = UNSET
    timeout: Annotated[int, Meta(gt=0)] | Annotated[float, Meta(gt=0, description="seconds")] | None \
        | UnsetType = UNSET


class ImagePatch(Request):
    """``PATCH /v1/images/{ref}``: the image's defaults; a field left out keeps its value."""

    entry: str | UnsetType = UNSET
    args: list[str] | UnsetType = UNSET
    env: dict[str, str] | UnsetType = UNSET
    limits: ImageLimits | UnsetType = UNSET


class DiskCreate(Request):
    name: Name
    size: Annotated[int, Meta(ge=0, description="bytes")]
    from_: None = field(default=None, name="from")  # content comes with PUT /v1/disks/{name}/content

    error_codes: ClassVar[dict[str, str]] = {"name": "invalid_name", "size": "invalid_size"}
    error_hints: ClassVar[dict[str, str]] = {
        "name": "invalid disk name: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        "size": "field 'size' must be a non-negative integer (bytes)"}


class DiskPatch(Request):
    rate_limiter: RateLimiterPatch | None


class SnapshotCreate(Request):
    name: str | None = None
    diff: bool = False


class Restore(Request):
    """``POST /v1/snapshots/{name}/restore``. ``allow_egress`` and ``publish`` are the new VM's network
    grants: left out (null), a snapshot this daemon took keeps its VM's grants and an imported one gets none
    (a file is data, never authority: docs/snapshot-format.md); a list replaces them."""

    name: VmName | None = None
    start: bool = False
    allow_egress: list[Annotated[str, Meta(description="HOST:PORT or CIDR:PORT")]] | None = None
    publish: list[Publish] | None = None
    keep_disk_names: Annotated[bool, Meta(description=(
        "each disk keeps its name when no disk of that name exists here (a migration); otherwise, and by "
        "default, a restored disk is a new disk NAME.restored-HEX"))] = False

    error_codes: ClassVar[dict[str, str]] = {"name": "invalid_name"}
    error_hints: ClassVar[dict[str, str]] = {"name": VmSpec.error_hints["name"]}


class ChunksMissing(Request):
    chunks: Annotated[list[Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{64}(?![\s\S])")]], Meta(max_length=1 << 20)]


class Migrate(Request):
    to: Annotated[str, Meta(min_length=1, description="unix:///path/to.sock or https://HOST:PORT")]
    token: str | None = None
    ca_file: Annotated[str, Meta(pattern="^/", description="a CA file on the daemon's host")] | None = None


def check_vm_spec(spec: VmSpec) -> VmSpec:
    """The rules of a VM spec that a type cannot state; raises ContractError naming the field.

    Every decoded spec passes here (``convert``/``decode`` call it), so a request, a record and a
    snapshot's spec are held to the same rules. Limits that depend on the daemon's configuration (the
    memory ceiling, existing names, host directories) are the Hypervisor's to check."""
    _check_publish(spec.publish)
    for d in spec.dirs:
        if not d.guest:
            d.guest = d.host
        elif not d.guest.startswith("/") and d.guest != ".":
            raise ContractError(f"--dir guest path {d.guest!r} must be absolute", "invalid_dir")
    check_env(spec.env, "invalid_env")
    if spec.ephemeral or spec.auto_remove:
        if spec.checkpoint_interval is not None and spec.ephemeral:
            raise ContractError("an ephemeral VM keeps nothing on disk: it cannot have checkpoints",
                                "invalid_checkpoint_interval")
        if spec.restart != "no":
            raise ContractError("a VM removed when it ends (--rm) cannot have a restart policy",
                                "invalid_restart_policy")
        if spec.ephemeral and any(d.mode == "cow" for d in spec.disks):
            raise ContractError("an ephemeral VM keeps nothing on disk: it cannot have a cow disk (use ro, or a "
                                "VM that is not ephemeral)", "invalid_disk")
    if spec.timeout is not None and not 0 < spec.timeout < float("inf"):
        raise ContractError("timeout must be a positive number of seconds", "invalid_limit")
    return spec


def check_env(env: dict[str, str], code: str) -> None:
    """A WASI environment variable's name is not empty and has no '=' (it ends the name) and no NUL."""
    for k in env:
        if not k or "=" in k or "\0" in k:
            raise ContractError(f"invalid environment variable name {k!r}", code)


def _check_publish(publish: list[Publish]) -> None:
    import ipaddress  # here: the client imports this module and never needs it
    for i, p in enumerate(publish):
        if p.host_ip is None:
            p.host_ip = "127.0.0.1"
        try:
            ipaddress.ip_address(p.host_ip)
        except ValueError:
            raise ContractError(f"publish[{i}].host_ip {p.host_ip!r} is not an IP address",
                                "invalid_field") from None


# ================================================================== responses
class ErrorDetail(Response):
    code: str
    message: str


class ErrorBody(Response):
    error: ErrorDetail


class Version(Response):
    version: str
    wasmtime_version: str
    api_version: str


class EngineInfo(Response):
    fingerprint: str
    workers: int
    epoch_interval_s: float


class EventLoopInfo(Response):
    max_lag_ms: float
    stalls: int
    threshold_ms: float


class DaemonLimits(Response):
    memory: int
    max_memory: int
    fuel: int | None
    timeout: Number | None
    upload: int
    total_memory: int = 0  # the budget for all guests' linear memory (limits.total_memory)
    total_memory_used: int = 0  # what they hold now
    open_files: int = 0  # descriptors (WASI files and sockets) one VM may hold (limits.open_files)
    total_open_files: int = 0  # the budget of descriptors for all guests together
    total_open_files_used: int = 0  # what they hold now
    reserved_files: int = 0  # descriptors the daemon keeps for itself (API, stores, logs)
    process_open_files: int = 0  # the process's RLIMIT_NOFILE (soft, raised to the hard limit at start)
    compile_jobs: int = 0  # imports compiled at once
    compile_queue: int = 0  # imports that may wait beyond those (then 503 compile_busy)
    compile_admitted: int = 0  # imports compiling or waiting now
    max_functions: int = 0  # functions one module may have
    log_rate: int = 0  # console bytes a second one VM may write (0: no limit)
    log_burst: int = 0  # ... and at once


class SnapshotsInfo(Response):
    dirty_tracking: str


class ConsoleInfo(Response):
    mode: str
    file_descriptors: int


class Info(Response):
    version: str
    wasmtime_version: str
    api_version: str
    state_dir: str
    socket: str
    vms: dict[str, int]
    images: int
    uptime_s: float
    engine: EngineInfo
    event_loop: EventLoopInfo
    limits: DaemonLimits
    snapshots: SnapshotsInfo
    console: ConsoleInfo


class ImageDefaults(Response):
    fuel: int | UnsetType = UNSET
    memory: int | UnsetType = UNSET
    timeout: Number | UnsetType = UNSET


class Image(Response):
    digest: str
    size: int
    created: float
    names: list[str]
    entry: str | None
    boot: list[str]
    args: list[str]
    env: dict[str, str]
    limits: ImageDefaults
    kind: str  # "wasi", "sdk" or "reactor"
    asyncify: bool
    imports: list[str]
    exports: list[str]
    mutable_globals: dict[str, str]
    asyncify_globals: list[int] | None
    source_format: str
    name: str
    original_digest: Annotated[str, Meta(description="the module as imported; differs from digest when the "
                                                     "daemon rewrote it with Asyncify")] = ""
    rewritten_digest: str | None = None
    snapshot_kind: Annotated[str, Meta(description="asyncify (snapshots while it runs) or stopped_only")] = ""
    snapshot_note: str | None = None
    tables_fixed: Annotated[bool | None, Meta(description="no instruction of the module changes a table, so its "
                                                          "VMs keep no record of them (null: not known yet)")] = None


class StdinResult(Response):
    """``POST /v1/vms/{ref}/stdin``: what the guest was given; its input is closed after it (end of file)."""

    bytes: int


class ImportInProgress(Response):
    """An import whose Asyncify rewrite is still running (``microvm image import`` shows its progress)."""

    id: str
    name: str | None
    original_digest: str
    size: int
    phase: str
    started: float
    elapsed: float
    expected_seconds: int


class ImageList(Response):
    images: list[Image]
    importing: list[ImportInProgress] = []


class ExitRecord(Response):
    code: int | None
    reason: str  # "exit", or why the host stopped the guest: out_of_fuel, timeout, trap: ..., killed, ...
    fuel_consumed: int
    peak_memory: int
    wall_time_s: float


class WaitResult(Response):
    """``POST /v1/vms/{ref}/wait``: the exit record with the state; out_of_fuel has no wall time yet."""

    state: VmState
    code: int | None
    reason: str
    fuel_consumed: int
    peak_memory: int
    wall_time_s: float | None


class VmLimits(Response):
    fuel: int | None
    memory: int
    timeout: Number | None


class BucketState(Response):
    size: int
    refill_time: int
    one_time_burst: int


class RateLimiterState(Response):
    bandwidth: BucketState | None
    ops: BucketState | None


class BlkDisk(Response):
    index: int
    name: str
    mode: str
    size: int
    read_bytes: int
    write_bytes: int
    read_ops: int
    write_ops: int
    flushes: int
    throttled_s: float
    errors: int
    private_bytes: int
    rate_limiter: RateLimiterState | None


class Published(Response):
    host_ip: str
    host_port: int
    guest_port: int


class NetStats(Response):
    connections_in: int
    connections_out: int
    bytes_in: int
    bytes_out: int
    refused: int
    dropped: int
    throttled_s: float


class NetInfo(Response):
    published: list[Published]
    egress: list[str]
    sockets: int
    stats: NetStats
    rate_limiter: RateLimiterState | None


class StdinInfo(Response):
    buffered: int  # bytes given to the guest and not read yet
    eof: bool      # the input is closed (the guest reads end of file once it has read what is buffered)


class WasiInfo(Response):
    """A guest rewritten at import: the daemon serves its blocking WASI calls and its standard input."""

    stdin: StdinInfo


class FilesInfo(Response):
    """The VM's descriptors: WASI files and sockets, counted against ``limits.open_files``."""

    open: int
    files: int
    sockets: int
    limit: int
    refused: int  # opens answered EMFILE (the VM's limit) or ENFILE (the daemon's budget)


class Devices(Response):
    files: FilesInfo | UnsetType = UNSET
    blk: list[BlkDisk] | UnsetType = UNSET
    net: NetInfo | UnsetType = UNSET
    wasi: WasiInfo | UnsetType = UNSET


class ConsoleUse(Response):
    """What the guest has written to its console, and its output rate (limits.log_rate)."""

    written: int  # bytes, both streams (file consoles: as of the last cap check)
    write_errors: int  # writes lost to the host (a full disk)
    rate: int  # bytes a second it may write (0: no limit)
    burst: int  # bytes it may write at once
    holds: int  # times it was held off its vCPU for writing faster
    held_s: float  # seconds held, in all


class Vm(Response):
    id: str
    name: str
    image: str
    digest: str
    state: VmState
    blocked_in: str | None
    args: list[str]
    env: dict[str, str]
    limits: VmLimits
    fuel_consumed: int
    fuel_remaining: int | None
    memory_bytes: int
    peak_memory: int
    created: float
    started: float | None
    finished: float | None
    exit: ExitRecord | None
    devices: Devices
    snapshot_kind: Literal["asyncify", "stopped_only"]
    spec: VmSpecView
    restart_policy: str = "no"
    restart_count: Annotated[int, Meta(description="restarts by the policy since the user last started it")] = 0
    restarting: Annotated[bool, Meta(description="ended, and to be restarted by its policy after a back-off")] \
        = False
    checkpoint: Annotated[str | None, Meta(description="its last checkpoint (a snapshot name)")] = None
    console: ConsoleUse | UnsetType = UNSET


class VmList(Response):
    vms: list[Vm]


class DiskAttachment(Response):
    vm: str
    vm_name: str
    index: int
    mode: str


class Disk(Response):
    name: str
    size: int
    allocated: int
    created: float
    used_by: list[str]
    attachments: list[DiskAttachment]


class DiskList(Response):
    disks: list[Disk]


class SnapshotVm(Response):
    id: str
    name: str | None
    image: str | None
    digest: str
    state: str | None


class SnapshotDisk(Response):
    name: str
    size: int
    mode: str | None


class SnapshotAsks(Response):
    """What a snapshot's VM spec asks for. For an imported snapshot this is what its file asked: a restore
    grants none of its network rules and none of its limits above the daemon's own."""

    allow_egress: list[str]
    publish: list[Published]
    memory: int | None
    fuel: int | None
    timeout: Number | None
    dirs: list[str]


class Snapshot(Response):
    name: str
    created: float
    kind: Literal["created", "unwound"]
    parent: str | None
    vm: SnapshotVm
    memory_bytes: int
    chunks: int
    disks: list[SnapshotDisk]
    stats: dict[str, int | float | str | None]  # frozen_ms, write_ms, new_chunks, new_bytes, ...
    wasmtime: str | None
    engine: str | None
    origin: Literal["local", "import"] = "local"  # "import": it came from a file or another daemon
    asks: SnapshotAsks | None = None


class DamagedSnapshot(Response):
    """A manifest that could not be read at start-up, set aside with its packs kept (``snapshot rm`` removes
    it)."""

    name: str
    reason: str
    path: str


class SnapshotList(Response):
    snapshots: list[Snapshot]
    damaged: list[DamagedSnapshot] = []


class MissingChunks(Response):
    missing: list[str]


class MigrateStats(Response):
    total_ms: float
    chunks_sent: int
    chunks_total: int
    capture_ms: float
    downtime_ms: float
    prepare_ms: float
    transfer_ms: float
    restore_ms: float


class MigratedDisk(Response):
    """A disk of the migrated VM, and the target's disk holding its content (the same name when it was free
    there; else ``NAME.restored-HEX``, with ``renamed`` true and ``reason`` saying why)."""
    name: str
    target_name: str
    renamed: bool
    reason: str | None = None


class MigrateResult(Response):
    vm: Vm
    to: str
    snapshot: str
    stats: MigrateStats
    disks: list[MigratedDisk] = []


# ================================================================== /v1/system
class CheckProblem(Response):
    kind: str      # image, image_name, snapshot, disk, vm
    ref: str
    path: str
    problem: str
    severity: Literal["error", "warning"]  # a warning (a dangling link) does not make the check unclean


class CheckRepair(Response):
    ref: str
    action: str
    kind: str | None = None
    paths: list[str] = []


class SystemCheck(Response):
    """``POST /v1/system/check``: what was checked, what is wrong, and (``repair=true``) what was done."""

    clean: bool
    errors: int
    checked: dict[str, int]
    problems: list[CheckProblem]
    repaired: list[CheckRepair]


class SystemDf(Response):
    """``GET /v1/system/df``: bytes allocated by each part of the state directory."""

    images: dict[str, int]
    snapshots: dict[str, int]
    shared_chunks: dict[str, int]  # chunks more than one snapshot references, and the bytes that saves
    disks: dict[str, int]
    vms: dict[str, int]
    total: int


class SystemPrune(Response):
    """``POST /v1/system/prune``: what was (``dry_run=true``: would be) removed."""

    dry_run: bool
    vms: list[str]
    images: list[str]
    packs: list[str]
    freed_bytes: int


# ================================================================== VM records (vm.json)
class VmRecord(Struct):
    """What survives a daemon restart (``<state>/vms/<id>/vm.json``)."""

    id: str
    spec: VmSpec
    digest: str
    image_name: str
    state: VmState
    created: float
    started: float | None = None
    finished: float | None = None
    exit: ExitRecord | None = None
    fuel_consumed: int = 0
    fuel_budget: int | None = None
    peak_memory: int = 0
    memory_limit: int | None = None
    snapshot_kind: Literal["asyncify", "stopped_only"] = "stopped_only"
    restart_count: int = 0
    user_stopped: bool = False  # stopped or killed by a user: no policy restarts it (unless-stopped: ever)
    suspended_to: str | None = None  # the snapshot a clean daemon stop took of it, resumed at the next start
    checkpoint: str | None = None  # its last checkpoint (--checkpoint-interval), resumed after a crash


# ================================================================== snapshot manifests (docs/snapshot-format.md)
# A manifest is untrusted input (a file anyone could have rewritten with a fresh checksum, an import, a
# migration): every field the daemon reads or shows is typed here, so a manifest whose ``stats`` or ``vm``
# is of the wrong shape is a damaged snapshot, never a 500 at ``snapshot ls``. What a type cannot say (chunk
# lists that match their sizes, global values in their type's range, pack indexes) snapshot/store.py checks
# after. Unknown keys are ignored, as in responses: a newer daemon's manifest still reads.
ChunkRef = list[bytes | int]  # [sha256, crc32] as it travels; + [pack index, offset, length] once stored


class ManifestVm(Struct):
    id: str
    spec: VmSpec
    digest: Digest
    name: str | None = None
    image_name: str | None = None
    original_digest: Digest | None = None
    memory_limit: Annotated[int, Meta(gt=0, le=1 << 32)] | None = None
    fuel_budget: Positive | None = None
    fuel_consumed: Count = 0
    state: VmState | None = None


class ManifestMemory(Struct):
    size: Annotated[int, Meta(ge=0, le=1 << 40)]  # (whole Wasm pages, at most 4 GiB: snapshot/store.py says so)
    chunks: list[ChunkRef | None]


class ManifestTable(Struct):
    size: Annotated[int, Meta(ge=0, le=1 << 24)]
    elems: list[tuple[str, Annotated[int, Meta(ge=0)]] | None]


class ManifestDisk(Struct):
    index: int
    name: str
    size: Annotated[int, Meta(ge=0, le=1 << 40)]
    chunks: list[ChunkRef | None]
    mode: str | None = None


class Manifest(Struct):
    name: Name
    created: float
    kind: Literal["created", "unwound"]
    vm: ManifestVm
    memory: ManifestMemory
    globals: dict[str, tuple[Literal["i32", "i64", "f32", "f64"], int | float]]
    disks: Annotated[list[ManifestDisk], Meta(max_length=64)]
    packs: Annotated[list[Annotated[str, Meta(pattern=r"^[0-9a-f]{32}$")]], Meta(max_length=1 << 16)] = []
    tables: Annotated[dict[str, ManifestTable], Meta(max_length=64)] = {}
    devices: dict[str, dict[str, Any]] = {}
    console: dict[str, Count] = {}
    parent: str | None = None
    stats: dict[str, int | float | str | None] = {}
    wasmtime: str | None = None
    engine: str | None = None
    origin: Literal["local", "import"] | None = None


def check_manifest(data: Any) -> Manifest:
    """A decoded manifest's shape, with its VM spec checked as a request's is; ContractError names the field."""
    m = convert(data, Manifest)
    check_vm_spec(m.vm.spec)
    return m


# ================================================================== functions (docs/functions.md)
ROUTE_PATTERN = r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]{0,255}(?![\s\S])"
RoutePath = Annotated[str, Meta(pattern=ROUTE_PATTERN,
                                description="the gateway path: /NAME serves /NAME and /NAME/...; a final /... "
                                            "says the same")]
FnExecutor = Literal["wagi", "sdk", "python", "js"]
HeaderMap = dict[str, str]


class FunctionDeploy(Request):
    """``POST /v1/functions``: deploy (or replace) a function. Exactly one of ``image``, ``python`` (a
    handler's source) and ``js`` says what runs."""

    name: Name
    image: Annotated[str, Meta(min_length=1, description="image name or digest (wagi or sdk executor)")] | None = None
    python: Annotated[str, Meta(description="Python source defining handle(request)")] | None = None
    js: Annotated[str, Meta(description="JavaScript source defining handle(request)")] | None = None
    route: RoutePath | None = None
    executor: Literal["wagi", "sdk"] | None = None
    env: dict[str, str] = {}
    fuel: Positive | None = None
    memory: Annotated[int, Meta(ge=65536, le=U63 - 1, description="bytes")] | None = None
    timeout: Annotated[float, Meta(gt=0, le=3600, description="seconds per invocation")] | None = None
    max_concurrency: Annotated[int, Meta(ge=1, le=100_000)] | None = None
    reuse: Annotated[bool, Meta(description="keep warm instances between requests (state is shared: "
                                            "docs/functions.md)")] = False

    error_codes: ClassVar[dict[str, str]] = {"name": "invalid_name", "route": "invalid_route",
                                             "fuel": "invalid_limit", "memory": "invalid_limit",
                                             "timeout": "invalid_limit", "max_concurrency": "invalid_limit"}
    error_hints: ClassVar[dict[str, str]] = {
        "name": "invalid function name: 1-128 of A-Z a-z 0-9 _ . -, starting with a letter or digit",
        "route": "invalid route: a path starting with / of at most 256 URL characters"}


class FunctionRecord(Struct, forbid_unknown_fields=False):
    """What survives a daemon restart (``functions/NAME.json`` in the state directory)."""

    name: str
    executor: FnExecutor
    digest: str  # the image that runs (for python and js: the interpreter's)
    image_name: str
    route: str
    created: float
    updated: float
    version: int = 1
    source: str | None = None  # python and js: the handler's source
    snapshot: str | None = None  # python, js and sdk: the pre-initialised snapshot every request restores
    env: dict[str, str] = {}
    fuel: int | None = None
    memory: int | None = None
    timeout: float | None = None
    max_concurrency: int | None = None
    reuse: bool = False


class FunctionStats(Response):
    invocations: int
    errors: dict[str, int]
    active: int  # instances answering a request now
    queued: int  # requests waiting for a slot (or for their body to arrive)
    instances: int  # live instances: active ones and idle ones
    idle_instances: int = 0  # spare fresh instances restored ahead of time, and --reuse warm ones
    last_invoked: float | None = None
    fresh_instance_us: dict[str, float] | None = None  # p50, p99 (and count) of the last 1,000 requests: the
    # time from the request to a fresh instance ready to run (WAGI: a direct instance made, or a VM booted
    # with its first slice; sdk/python/js: a spare restored ahead of time, or a restore when there is none)
    restore_us: dict[str, float] | None = None  # the same for the restores themselves (sdk, python, js)
    # WAGI and SDK: requests answered by a direct instance (docs/functions.md), and those that began as one and
    # went on as an ephemeral VM (they waited, or needed more than one quantum or fuel slice)
    direct: int = 0
    direct_to_vm: int = 0
    # whether its requests start as direct instances: "preparing" (made in the background after a deploy or
    # a restart; requests run as VMs meanwhile), "ready", or "off" (the image or snapshot does not allow them)
    direct_state: Literal["preparing", "ready", "off"] = "preparing"
    # where direct instances run: on native workers, or in Python (the daemon has no native build: slower)
    direct_runner: Literal["native", "python"] = "native"


class FunctionLimits(Response):
    fuel: int | None
    memory: int | None
    timeout: float
    max_concurrency: int
    queue: int


class Function(Response):
    name: str
    route: str
    executor: FnExecutor
    image: str
    digest: str
    version: int
    created: float
    updated: float
    env: dict[str, str]
    limits: FunctionLimits
    reuse: bool
    snapshot: str | None
    url: str | None  # on the gateway, when it is on
    stats: FunctionStats


class FunctionList(Response):
    functions: list[Function]
    gateway: str | None  # HOST:PORT, or null when it is off


class InvokeRequest(Request):
    """``POST /v1/functions/NAME/invoke``: an HTTP request as the function sees it."""

    method: Annotated[str, Meta(pattern=r"^[A-Z]{1,16}(?![\s\S])")] = "GET"
    path: Annotated[str, Meta(pattern=r"^/[^\x00-\x20\x7f]{0,4095}(?![\s\S])",
                              description="path and query string")] = "/"
    headers: HeaderMap = {}
    body: str | None = None
    body_base64: str | None = None

    error_codes: ClassVar[dict[str, str]] = {"method": "invalid_method", "path": "invalid_path"}


class InvokeResult(Response):
    status: int
    headers: HeaderMap
    body: str | None = None
    body_base64: str | None = None  # when the body is not UTF-8
    request_id: str = ""
    duration_ms: float = 0.0


# ================================================================== decoding
class ContractError(ValueError):
    """A body that does not fit its type. ``code`` is the API error code; the message names the field."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _field_of(message: str) -> str | None:
    """The top-level field a msgspec error is about (``at `$.fuel```, ``missing required field `size```)."""
    if "- at `$." in message:
        rest = message.split("- at `$.", 1)[1]
        return rest.split("`", 1)[0].split(".", 1)[0].split("[", 1)[0]
    if "- at `$" not in message and "field `" in message:
        return message.split("field `", 1)[1].split("`", 1)[0]
    return None


def contract_error(exc: msgspec.ValidationError, typ: type[Any], what: str = "request body") -> ContractError:
    message = str(exc)
    if message.startswith("Expected `object`") and "- at `$" not in message:
        return ContractError("request body must be an object", "malformed_body")
    name = _field_of(message) or ""
    codes: dict[str, str] = getattr(typ, "error_codes", {})
    hints: dict[str, str] = getattr(typ, "error_hints", {})
    code = codes.get(name, "invalid_field") if name else "invalid_field"
    if name in hints:
        where = message.rsplit(" - ", 1)[1] if " - at `" in message else f"at `$.{name}`"
        return ContractError(f"{hints[name]} ({where})", code)
    if " matching regex " in message:  # the pattern is in the OpenAPI document; the field's name says enough
        message = message.split(" matching regex ", 1)[0] + " of the documented form" + (
            " - " + message.rsplit(" - ", 1)[1] if " - at `" in message else "")
    return ContractError(f"invalid {what}: {message}", code)


def _checked(value: T) -> T:
    if isinstance(value, VmSpec):
        check_vm_spec(value)
    elif isinstance(value, Restore) and value.publish:
        _check_publish(value.publish)
    elif isinstance(value, ImagePatch):
        if value.env is not UNSET:
            check_env(value.env, "invalid_field")
        if value.limits is not UNSET and isinstance(value.limits.timeout, (int, float)) \
                and value.limits.timeout == float("inf"):
            raise ContractError("limits.timeout must be a finite number of seconds", "invalid_field")
    return value


def convert(data: Any, typ: type[T]) -> T:
    """A value already parsed (a dict from a record or a snapshot manifest) into ``typ``, strictly."""
    try:
        return _checked(msgspec.convert(data, typ))
    except msgspec.ValidationError as exc:
        raise contract_error(exc, typ, typ.__name__) from None


def decode(raw: bytes, typ: type[T], *, msgpack: bool = False) -> T:
    """A JSON (or MessagePack) body into ``typ``; an empty body is ``{}``. Raises ContractError."""
    if not raw.strip():
        raw = b"\x80" if msgpack else b"{}"
    try:
        if msgpack:
            return _checked(msgspec.msgpack.decode(raw, type=typ))
        return _checked(msgspec.json.decode(raw, type=typ))
    except msgspec.ValidationError as exc:
        raise contract_error(exc, typ) from None
    except msgspec.DecodeError as exc:
        kind = "MessagePack" if msgpack else "JSON"
        raise ContractError(f"request body is not valid {kind}: {exc}", "malformed_body") from None


def to_builtins(value: Any) -> Any:
    """A contract value as plain dicts and lists (what ``json.dumps`` would print), UNSET fields left out.
    Also a dataclass (a VM's spec and exit record): the same dict as ``dataclasses.asdict`` in about a
    twentieth of the time (~0.7 against ~13 µs for a plain spec, on every create's answer)."""
    return msgspec.to_builtins(value)
