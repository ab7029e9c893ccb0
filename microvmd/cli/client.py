"""A small blocking HTTP client for the microvmd API (stdlib only: http.client, socket, json).

    api = ApiClient(resolve_target("/run/microvmd/microvmd.sock"))
    api.request("GET", "/v1/vms", query={"all": "true"})      # -> parsed JSON (dict/list), or None for 204
    with api.request("GET", "/v1/vms/x/logs", stream=True) as r:   # -> StreamResponse
        for chunk in r.chunks(): ...

Errors: ApiError(status, code, message) for a 4xx/5xx answer; Unreachable(target, reason) when the
daemon cannot be reached; ConnectionLost (a subclass) when it goes away in the middle of a request.

Transports: UnixTransport (HTTP/1.1 over AF_UNIX, the default) and HttpsTransport (TLS + bearer
token, for a daemon started with --listen). resolve_target() picks one from --socket /
MICROVM_SOCKET / the default path.
"""
from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from microvmd import __version__
from microvmd.cli import minihttp
from microvmd.cli.spec import EXIT_CLIENT, UsageError
from microvmd.units import default_socket_path

CONNECT_TIMEOUT = 10.0
BLOCKSIZE = 1 << 16
HINT = "is the daemon running? start it with 'microvmd' or 'systemctl start microvmd'"


@contextmanager
def without_typing_extensions() -> Iterator[None]:
    """Import msgspec (and the contract, within the block) without typing_extensions: a third of the client's
    start-up (~9 ms of `microvm ps`, with the inspect/ast/dis modules it drags in). msgspec only borrows
    typing_extensions' ``get_type_hints``, ``Required`` and ``NotRequired`` when it is installed, and falls back
    to ``typing``'s own, which are the same on Python 3.11+ for the contract's types (no TypedDict). Hidden only
    while msgspec is first imported, and only if nothing imported it already: a later import gets the real one."""
    if "msgspec" in sys.modules or "typing_extensions" in sys.modules:
        yield
        return
    sys.modules["typing_extensions"] = None  # type: ignore[assignment]  # None makes `import` raise ImportError
    try:
        import msgspec  # noqa: F401

        yield
    finally:
        if "typing_extensions" in sys.modules and sys.modules["typing_extensions"] is None:
            del sys.modules["typing_extensions"]


class ClientError(Exception):
    """An error the client reports on stderr as `microvm: <str(error)>`, with exit status 125."""

    exit_code = EXIT_CLIENT


class Unreachable(ClientError):
    def __init__(self, target: str, reason: str):
        super().__init__(target, reason)
        self.target = target
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot reach microvmd at {self.target}: {self.reason} ({HINT})"


class ConnectionLost(Unreachable):
    def __str__(self) -> str:
        return f"lost the connection to microvmd at {self.target}: {self.reason}"


class ApiError(ClientError):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} ({self.code})"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    hc = sys.modules.get("http.client")
    if isinstance(exc, minihttp.RemoteDisconnected) or (hc and isinstance(exc, hc.RemoteDisconnected)):
        return "the daemon closed the connection without answering"
    if hc and isinstance(exc, hc.IncompleteRead):
        return "the answer was cut short"
    return str(exc) or type(exc).__name__


def _errors() -> tuple[type[BaseException], ...]:
    """What a transport raises for a broken exchange (http.client's only if it was ever loaded)."""
    hc = sys.modules.get("http.client")
    return (OSError, minihttp.HTTPError) + ((hc.HTTPException,) if hc else ())


# --- transports --------------------------------------------------------------------------------------

_SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes including the terminating NUL


def _connect_unix(sock: socket.socket, path: str) -> None:
    """connect() to a Unix socket; a path too long for sun_path goes through /proc/self/fd (Linux)."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX or not os.path.isdir("/proc/self/fd"):
        sock.connect(path)
        return
    directory, name = os.path.split(path)
    dirfd = os.open(directory or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        sock.connect(f"/proc/self/fd/{dirfd}/{name}")
    finally:
        os.close(dirfd)


def _https_connection(host: str, port: int, *, context, timeout, connect_timeout=CONNECT_TIMEOUT):
    """HTTPSConnection with a bounded connect/handshake but no timeout afterwards (for wait/follow)."""
    import http.client

    class _HTTPSConnection(http.client.HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            self.sock.settimeout(timeout)

    return _HTTPSConnection(host, port, context=context, timeout=connect_timeout, blocksize=BLOCKSIZE)


class Transport:
    """Where the daemon is and how to open a connection to it."""

    target = ""  # shown in error messages

    def connection(self, timeout: float | None = None):
        raise NotImplementedError

    def headers(self) -> dict[str, str]:
        return {}


class UnixTransport(Transport):
    def __init__(self, path: str):
        self.path = path
        self.target = path

    def connection(self, timeout: float | None = None):
        return minihttp.UnixConnection(lambda sock: _connect_unix(sock, self.path), timeout,
                                       CONNECT_TIMEOUT, BLOCKSIZE)

    def __repr__(self) -> str:
        return f"UnixTransport({self.path!r})"


class HttpsTransport(Transport):
    def __init__(self, host: str, port: int, token: str | None = None, cafile: str | None = None):
        self.host = host
        self.port = port
        self.token = token
        self.cafile = cafile
        h = f"[{host}]" if ":" in host else host
        self.target = f"https://{h}:{port}"
        self._context: object | None = None

    def connection(self, timeout: float | None = None):
        if self._context is None:
            import ssl

            self._context = ssl.create_default_context(cafile=self.cafile)
        return _https_connection(self.host, self.port, context=self._context, timeout=timeout)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def __repr__(self) -> str:
        return f"HttpsTransport({self.host!r}, {self.port})"


def resolve_socket(option: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """--socket > MICROVM_SOCKET > the default path (microvmd.units.default_socket_path)."""
    env = os.environ if environ is None else environ
    return option or env.get("MICROVM_SOCKET") or default_socket_path(environ=env)


def read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise ClientError(f"cannot read token file {path}: {e.strerror or e}") from None
    if not token:
        raise ClientError(f"token file {path} is empty")
    return token


def resolve_token(token_file: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """--token-file > MICROVM_TOKEN (the token itself) > MICROVM_TOKEN_FILE."""
    env = os.environ if environ is None else environ
    if token_file:
        return read_token_file(token_file)
    if env.get("MICROVM_TOKEN"):
        return env["MICROVM_TOKEN"].strip()
    if env.get("MICROVM_TOKEN_FILE"):
        return read_token_file(env["MICROVM_TOKEN_FILE"])
    return None


def resolve_target(
    option: str | None = None,
    environ: Mapping[str, str] | None = None,
    token_file: str | None = None,
    cafile: str | None = None,
) -> Transport:
    """The transport for --socket VALUE: a path, unix:///path, or https://HOST:PORT."""
    env = os.environ if environ is None else environ
    value = resolve_socket(option, env)
    if value.startswith("unix://"):
        path = value[len("unix://"):]
        if not path:
            raise UsageError(f"invalid socket {value!r}: expected unix:///path/to/microvmd.sock")
        return UnixTransport(path)
    if value.startswith("https://"):
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        try:
            port = parts.port or 443
        except ValueError:
            raise UsageError(f"invalid socket {value!r}: bad port") from None
        if not parts.hostname or parts.path not in ("", "/"):
            raise UsageError(f"invalid socket {value!r}: expected https://HOST:PORT")
        return HttpsTransport(
            parts.hostname,
            port,
            token=resolve_token(token_file, env),
            cafile=cafile or env.get("MICROVM_TLS_CA") or None,
        )
    if "://" in value:
        raise UsageError(f"invalid socket {value!r}: expected a path, unix:///path or https://HOST:PORT")
    return UnixTransport(value)


# --- requests ----------------------------------------------------------------------------------------

def q(ref: str) -> str:
    """Quote one path segment (an id, a name, sha256:<hex>)."""
    from urllib.parse import quote  # here, not at the top: `ps` and `info` need none of urllib (~2 ms)

    return quote(str(ref), safe=":@")


class StreamResponse:
    """A successful answer whose body is read incrementally. Close it (or use `with`)."""

    def __init__(self, conn, resp, target: str):
        self._conn = conn
        self._resp = resp
        self._target = target
        self.status = resp.status
        self.headers = resp.headers
        self.aborted = False
        length = resp.getheader("Content-Length")
        self.length = int(length) if length and length.isdigit() else None

    def read1(self, n: int = BLOCKSIZE) -> bytes:
        """Whatever is available (at most n bytes; b"" at the end)."""
        try:
            return self._resp.read1(n)
        except Exception as e:
            if not isinstance(e, (ValueError, *_errors())):
                raise
            if self.aborted:
                return b""
            raise ConnectionLost(self._target, _reason(e)) from None

    def chunks(self, n: int = BLOCKSIZE):
        while True:
            data = self.read1(n)
            if not data:
                return
            yield data

    def abort(self) -> None:
        """Wake up a reader blocked in another thread and make it see the end of the stream."""
        self.aborted = True
        sock = self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        try:
            self._resp.close()
        finally:
            self._conn.close()

    def __enter__(self) -> StreamResponse:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _api_error(resp, data: bytes) -> ApiError:
    code = f"http_{resp.status}"
    message = ""
    ctype = (resp.getheader("Content-Type") or "").lower()
    if data and ("json" in ctype or data[:1] == b"{"):
        import json

        try:
            body = json.loads(data)
            err = body.get("error") if isinstance(body, dict) else None
            if isinstance(err, dict):
                code = str(err.get("code") or code)
                message = str(err.get("message") or "")
            elif isinstance(err, str):
                message = err
        except ValueError:
            pass
    if not message:
        message = data.decode("utf-8", "replace").strip() if data else ""
        if len(message) > 500 or not message:
            message = f"HTTP {resp.status} {resp.reason}".strip()
    return ApiError(resp.status, code, message)


def _decode(resp, data: bytes, answer: type | None = None):
    """The answer as plain data; with ``answer`` (a type of microvmd.contract) it is decoded through that
    type first, so a field that is missing or of the wrong kind is reported here, not guessed at later."""
    if not data:
        return None
    ctype = (resp.getheader("Content-Type") or "").lower()
    if "json" in ctype:
        import msgspec

        try:
            if answer is None:
                return msgspec.json.decode(data)
            return msgspec.to_builtins(msgspec.json.decode(data, type=answer))
        except msgspec.ValidationError as exc:
            what = getattr(answer, "__name__", answer)
            raise ClientError(f"the daemon's answer does not fit {what}: {exc}") from None
        except msgspec.DecodeError:
            raise ClientError(f"the daemon sent invalid JSON: {data[:200]!r}") from None
    return data


class ApiClient:
    def __init__(self, transport: Transport | str | None = None, timeout: float | None = None):
        if transport is None or isinstance(transport, str):
            transport = resolve_target(transport)
        self.transport = transport
        self.timeout = timeout  # per socket operation after connecting; None: wait forever (wait, follow)

    @property
    def target(self) -> str:
        return self.transport.target

    def request(
        self,
        method: str,
        path: str,
        body=None,
        stream: bool = False,
        *,
        query: dict | None = None,
        content_type: str | None = None,
        content_length: int | None = None,
        headers: dict | None = None,
        answer: type | None = None,
    ):
        """Send one request. body: dict/list (sent as JSON), bytes, or a binary file object.

        Returns the parsed JSON answer (None when empty, raw bytes for a non-JSON answer), or a
        StreamResponse with stream=True. Raises ApiError / Unreachable / ConnectionLost.
        """
        hdrs = {"Accept": "application/json", "User-Agent": f"microvm/{__version__}"}
        hdrs.update(self.transport.headers())
        payload = None
        if body is not None:
            if isinstance(body, (bytes, bytearray, memoryview)):
                payload = bytes(body)
                hdrs["Content-Type"] = content_type or "application/octet-stream"
            elif hasattr(body, "read"):
                payload = body
                hdrs["Content-Type"] = content_type or "application/octet-stream"
                if content_length is not None:
                    hdrs["Content-Length"] = str(content_length)
            else:
                import json

                payload = json.dumps(body).encode()
                hdrs["Content-Type"] = content_type or "application/json"
        elif method in ("POST", "PUT", "PATCH"):
            hdrs["Content-Length"] = "0"
        if headers:
            hdrs.update(headers)
        if query:
            clean = {k: v for k, v in query.items() if v is not None}
            if clean:
                from urllib.parse import urlencode

                path = f"{path}?{urlencode(clean)}"

        conn = self.transport.connection(self.timeout)
        try:
            conn.connect()
        except _errors() as e:
            conn.close()
            raise Unreachable(self.target, _reason(e)) from None
        try:
            try:
                conn.request(method, path, body=payload, headers=hdrs)
            except (BrokenPipeError, ConnectionResetError):
                # The daemon may have answered (and closed) before reading the whole body.
                pass
            resp = conn.getresponse()
            if resp.status >= 400:
                raise _api_error(resp, resp.read())
            if stream:
                result = StreamResponse(conn, resp, self.target)
                conn = None  # now owned by the StreamResponse
                return result
            data = resp.read()
            return _decode(resp, data, answer)
        except _errors() as e:
            raise ConnectionLost(self.target, _reason(e)) from None
        finally:
            if conn is not None:
                conn.close()

    # Small conveniences -----------------------------------------------------------------------------
    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def delete(self, path: str, **kw):
        return self.request("DELETE", path, **kw)
