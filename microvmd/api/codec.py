"""Request decoding and response encoding through the contract types: JSON by default, MessagePack when
asked for. Both directions go through ``microvmd.contract``, so the wire can only carry what it declares."""
from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from aiohttp import web

from .. import contract
from ..errors import BadRequest, MicrovmError, PayloadTooLarge

MSGPACK = "application/msgpack"
T = TypeVar("T")


def wants_msgpack(request: web.Request) -> bool:
    return MSGPACK in request.headers.get("Accept", "") or (
        request.content_type == MSGPACK and "application/json" not in request.headers.get("Accept", ""))


def respond(request: web.Request, value: Any, status: int = 200) -> web.Response:
    """Encode a contract value (or the plain data of one) as the client asked."""
    if wants_msgpack(request):
        return web.Response(body=msgspec.msgpack.encode(value), status=status, content_type=MSGPACK)
    return web.Response(body=msgspec.json.encode(value), status=status, content_type="application/json")


def reply(request: web.Request, typ: type[Any], data: Any, status: int = 200) -> web.Response:
    """The controller's answer, held to the response type ``typ``, encoded."""
    if not isinstance(data, typ):
        try:
            data = contract.convert(data, typ)
        except contract.ContractError as exc:  # the daemon broke its own contract: a bug, said plainly
            raise MicrovmError(f"the answer does not fit {typ.__name__}: {exc.message}") from None
    return respond(request, data, status)


def error(request: web.Request, code: str, message: str, status: int) -> web.Response:
    return respond(request, contract.ErrorBody(contract.ErrorDetail(code, message)), status)


async def read_limited(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body of {request.content_length} bytes is above the limit of {limit}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"request body is above the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def decode(request: web.Request, typ: type[T], limit: int) -> T:
    """The body as ``typ``; a 400 naming the field when it does not fit (an empty body is ``{}``)."""
    raw = await read_limited(request, limit)
    try:
        return contract.decode(raw, typ, msgpack=request.content_type == MSGPACK)
    except contract.ContractError as exc:
        raise BadRequest(exc.message, code=exc.code) from None
