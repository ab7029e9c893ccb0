"""Request decoding and response encoding: JSON by default, MessagePack when asked for."""
from __future__ import annotations

import json
from typing import Any

import msgpack
from aiohttp import web

from ..errors import BadRequest, PayloadTooLarge

MSGPACK = "application/msgpack"


def wants_msgpack(request: web.Request) -> bool:
    return MSGPACK in request.headers.get("Accept", "") or (
        request.content_type == MSGPACK and "application/json" not in request.headers.get("Accept", ""))


def respond(request: web.Request, data: Any, status: int = 200) -> web.Response:
    if wants_msgpack(request):
        return web.Response(body=msgpack.packb(data, use_bin_type=True), status=status, content_type=MSGPACK)
    return web.Response(text=json.dumps(data), status=status, content_type="application/json")


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


async def decode(request: web.Request, limit: int) -> dict[str, Any]:
    raw = await read_limited(request, limit)
    if not raw.strip():
        return {}
    try:
        if request.content_type == MSGPACK:
            data = msgpack.unpackb(raw, raw=False)
        else:
            data = json.loads(raw)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise BadRequest(f"request body is not valid {'MessagePack' if request.content_type == MSGPACK else 'JSON'}: "
                         f"{exc}", code="malformed_body") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be an object", code="malformed_body")
    return data
