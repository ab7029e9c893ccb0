"""Module ``microvm_fn``: the request and response of a function instance (``--executor sdk``).

``fn_request(buf, cap)`` gives the guest its HTTP request in linear memory; it suspends until the daemon has
one, which is where a function's snapshot is taken at deploy (docs/functions.md). ``fn_respond(status,
headers, headers_len, body, body_len)`` hands the response back. The wire format of the request is
guest-sdk/ABI.md's: ``METHOD\\0PATH\\0QUERY\\0`` then ``NAME\\0VALUE\\0`` per header, an empty name, then
the body. The guest SDK parses it (``mv_fn_request``).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import wasmtime

from ..engine import wt
from ..engine.hostop import HostOp
from .base import Device, DeviceHost, DevicePart, GuestVm, NoState
from .wasi import EFAULT, EINVAL, guarded

log = logging.getLogger("microvmd.fn")

HOST_MODULE = "microvm_fn"
MAX_RESPONSE = 4 << 20  # bytes of headers + body a guest may answer with
ENOSYS = 52


def encode_request(method: str, path: str, query: str, headers: dict[str, str], body: bytes) -> bytes:
    """The request as ``fn_request`` writes it (names and values never hold NUL: HTTP forbids it)."""
    parts = [method, path, query]
    for k, v in headers.items():
        if k and "\0" not in k and "\0" not in v:
            parts += [k, v]
    # (a header's bytes that are not UTF-8 come from the HTTP parser as surrogates: they go as they came, to a
    # VM and a direct instance alike)
    return "\0".join(parts).encode("utf-8", "surrogateescape") + b"\0\0" + body


class FnPart(DevicePart[NoState]):
    """One instance's request (given by the daemon before it runs) and response (given by the guest)."""

    name = "fn"

    def __init__(self) -> None:
        self.request: bytes | None = None
        self.status: int | None = None
        self.headers = b""
        self.body = b""
        self._waiters: list[HostOp] = []

    def give(self, request: bytes) -> None:
        """The instance's request; a guest already waiting for it is woken."""
        self.request = request
        waiters, self._waiters = self._waiters, []
        for op in waiters:
            op.set_result(None)

    def wait(self, op: HostOp) -> None:
        self._waiters.append(op)

    def to_api(self) -> Any:
        return {"request": self.request is not None, "responded": self.status is not None}

    def close(self) -> None:
        waiters, self._waiters = self._waiters, []
        for op in waiters:
            op.cancel()

    def save(self) -> NoState | None:
        return None  # a snapshot is taken while the guest waits for its request: nothing to keep

    @classmethod
    def load(cls, raw: object) -> NoState:
        return NoState()

    def restore(self, state: NoState) -> None:
        pass


class RequestOp(HostOp):
    name = "fn_request"

    def __init__(self, part: FnPart, buf: int, cap: int) -> None:
        super().__init__()
        self.part, self.buf, self.cap = part, buf, cap

    def finish(self, mem: wt.GuestMemory) -> Sequence[int]:
        return [write_request(self.part, mem, self.buf, self.cap)]


def write_request(part: FnPart, mem: wt.GuestMemory, buf: int, cap: int) -> int:
    """The request's length; written at ``buf`` only if it fits in ``cap`` (else the guest asks again with
    room for it)."""
    data = part.request or b""
    if len(data) <= cap:
        try:
            mem.write(buf, data)
        except wt.MemoryFault:
            return -EFAULT
    return len(data)


class FnDevice(Device):
    """A part for each VM whose image imports ``microvm_fn`` (an SDK function)."""

    name = "fn"

    def __init__(self, images: Any) -> None:
        self.images = images
        self.loop: asyncio.AbstractEventLoop | None = None

    def define(self, linker: wasmtime.Linker) -> None:
        wt.define_host_func(linker, HOST_MODULE, "fn_request", ["i32", "i32"], ["i32"],
                            guarded(self._request, log, "fn_request"), suspends=True)
        wt.define_host_func(linker, HOST_MODULE, "fn_respond", ["i32"] * 5, ["i32"],
                            guarded(self._respond, log, "fn_respond"))

    async def attach(self, hv: DeviceHost, vm: GuestVm) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            img = self.images.resolve(getattr(vm, "digest", ""))
        except Exception:  # noqa: BLE001 - no image, no part: the create fails on its own
            return
        if any(i.startswith(f"{HOST_MODULE}.") for i in img.imports):
            vm.devices.add(FnPart())

    def _request(self, mem: wt.GuestMemory, args: Sequence[int]) -> Any:
        buf, cap = args
        if cap < 0:
            return [-EINVAL]
        vm = wt.current_vm()
        part = vm.devices.get(FnPart) if vm is not None else None
        if part is None:
            return [-ENOSYS]
        if part.request is not None:
            return [write_request(part, mem, buf, cap)]
        op = RequestOp(part, buf, cap)
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._park, part, op)
        vm.block_on(op)
        return op

    @staticmethod
    def _park(part: FnPart, op: HostOp) -> None:
        if part.request is not None:  # given while the call was on its way here
            op.set_result(None)
        elif not op.cancelled:
            part.wait(op)

    def _respond(self, mem: wt.GuestMemory, args: Sequence[int]) -> Any:
        vm = wt.current_vm()
        part = vm.devices.get(FnPart) if vm is not None else None
        if part is None:
            return [-ENOSYS]
        return [take_response(part, mem, args)]


def take_response(part: FnPart, mem: wt.GuestMemory, args: Sequence[int]) -> int:
    """``fn_respond(status, headers, headers_len, body, body_len)``: the response into ``part``; 0 or -errno."""
    status, hptr, hlen, bptr, blen = args
    if not 100 <= status <= 599 or hlen < 0 or blen < 0 or hlen + blen > MAX_RESPONSE:
        return -EINVAL
    try:
        part.headers = mem.read(hptr, hlen) if hlen else b""
        part.body = mem.read(bptr, blen) if blen else b""
    except wt.MemoryFault:
        return -EFAULT
    part.status = status
    return 0
