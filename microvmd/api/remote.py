"""The remote API: the same routes over TCP with TLS and a bearer token (both required)."""
from __future__ import annotations

import hmac
import logging
import ssl
from typing import Any

from aiohttp import web

from ..config import Config, ConfigError

log = logging.getLogger("microvmd.remote")
TOKEN = web.AppKey("remote_token", str)


def _is_tcp(request: web.Request) -> bool:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return isinstance(peer, tuple)


def token_middleware(token: str) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if _is_tcp(request):
            got = request.headers.get("Authorization", "")
            if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip(), token)):
                peer = request.transport.get_extra_info("peername") if request.transport else None
                log.warning("refused %s %s from %s: missing or wrong bearer token", request.method, request.path, peer)
                return web.json_response({"error": {"code": "unauthorized",
                                                    "message": "a valid bearer token is required"}}, status=401)
        return await handler(request)
    return check


def load_token(cfg: Config) -> str | None:
    if cfg.listen is None or cfg.token_file is None:
        return None
    try:
        token = cfg.token_file.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read --token-file: {exc}") from None
    if len(token) < 16:
        raise ConfigError("the token in --token-file must be at least 16 characters")
    return token


def sites(cfg: Config, runner: web.AppRunner) -> list[web.BaseSite]:
    if cfg.listen is None:
        return []
    assert cfg.tls_cert is not None and cfg.tls_key is not None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate/key: {exc}") from None
    host, port = cfg.listen
    log.info("remote API on https://%s:%d (bearer token required)", host, port)
    return [web.TCPSite(runner, host, port, ssl_context=ctx)]
