"""ApiClient, transports and socket resolution."""
import os

import pytest

from microvmd.cli.client import (
    ApiClient,
    ApiError,
    HttpsTransport,
    UnixTransport,
    Unreachable,
    resolve_socket,
    resolve_target,
    resolve_token,
)
from microvmd.cli.spec import UsageError


def test_socket_resolution_order():
    env = {"MICROVM_SOCKET": "/env.sock", "XDG_RUNTIME_DIR": "/run/user/5"}
    assert resolve_socket("/opt.sock", env) == "/opt.sock"
    assert resolve_socket(None, env) == "/env.sock"
    assert resolve_socket(None, {"MICROVM_SOCKET": ""}).endswith("microvmd.sock")
    if os.getuid() != 0:
        assert resolve_socket(None, {"XDG_RUNTIME_DIR": "/run/user/5"}) == "/run/user/5/microvmd/microvmd.sock"
    else:
        assert resolve_socket(None, {"XDG_RUNTIME_DIR": "/run/user/5"}) == "/run/microvmd/microvmd.sock"


def test_resolve_target_kinds(tmp_path):
    t = resolve_target("/a/b.sock", {})
    assert isinstance(t, UnixTransport) and t.path == "/a/b.sock" and t.target == "/a/b.sock"
    t = resolve_target("unix:///c/d.sock", {})
    assert isinstance(t, UnixTransport) and t.path == "/c/d.sock"
    tok = tmp_path / "tok"
    tok.write_text("s3cret\n")
    t = resolve_target("https://example.com:7443", {}, token_file=str(tok))
    assert isinstance(t, HttpsTransport)
    assert (t.host, t.port, t.target) == ("example.com", 7443, "https://example.com:7443")
    assert t.headers() == {"Authorization": "Bearer s3cret"}
    t = resolve_target(None, {"MICROVM_SOCKET": "https://[::1]:9", "MICROVM_TOKEN": "abc"})
    assert t.host == "::1" and t.target == "https://[::1]:9" and t.headers() == {"Authorization": "Bearer abc"}
    assert resolve_target("https://h", {}).port == 443
    assert UnixTransport("/x").headers() == {}  # no token over the local socket


@pytest.mark.parametrize("bad", ["http://h:1", "ftp://x", "unix://", "https://h:99999", "https://h:1/path"])
def test_resolve_target_rejects(bad):
    with pytest.raises(UsageError):
        resolve_target(bad, {})


def test_token_resolution(tmp_path):
    f = tmp_path / "t"
    f.write_text("from-file")
    assert resolve_token(None, {}) is None
    assert resolve_token(str(f), {"MICROVM_TOKEN": "env"}) == "from-file"
    assert resolve_token(None, {"MICROVM_TOKEN": "env", "MICROVM_TOKEN_FILE": str(f)}) == "env"
    assert resolve_token(None, {"MICROVM_TOKEN_FILE": str(f)}) == "from-file"


def test_unreachable_message(tmp_path):
    api = ApiClient(UnixTransport(str(tmp_path / "nope.sock")))
    with pytest.raises(Unreachable) as e:
        api.request("GET", "/v1/info")
    msg = str(e.value)
    assert msg.startswith(f"cannot reach microvmd at {tmp_path / 'nope.sock'}: No such file or directory")
    assert "start it with 'microvmd' or 'systemctl start microvmd'" in msg
    assert e.value.exit_code == 125


def test_refused_socket(tmp_path):
    import socket

    path = str(tmp_path / "dead.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # bound but nobody listening
    with pytest.raises(Unreachable, match="Connection refused"):
        ApiClient(UnixTransport(path)).request("GET", "/v1/info")


def test_requests_and_errors(fake_daemon):
    api = ApiClient(UnixTransport(fake_daemon.socket_path))
    info = api.request("GET", "/v1/info")
    assert info["version"] == "9.9.9"
    req = fake_daemon.requests[-1]
    assert req["headers"]["Accept"] == "application/json"
    assert req["headers"]["User-Agent"].startswith("microvm/")
    assert "Authorization" not in req["headers"]

    with pytest.raises(ApiError) as e:
        api.request("GET", "/v1/vms/nope")
    assert (e.value.status, e.value.code, e.value.message) == (404, "vm_not_found", "no such VM: nope")
    assert str(e.value) == "no such VM: nope (vm_not_found)"
    assert e.value.exit_code == 125

    img = api.request("POST", "/v1/images", b"\0asm\1\0\0\0", query={"name": "m"}, content_type="application/wasm")
    assert img["name"] == "m"
    req = fake_daemon.requests[-1]
    assert req["query"] == {"name": "m"} and req["headers"]["Content-Type"] == "application/wasm"
    assert req["body"] == b"\0asm\1\0\0\0"

    assert api.request("DELETE", "/v1/images/m") is None  # 204

    fake_daemon.add_image(b"\0asm\1\0\0\0", "logger")
    vm = api.request("POST", "/v1/vms", {"image": "logger", "args": ["out:a log line", "exit:0"], "start": True})
    api.request("POST", f"/v1/vms/{vm['id']}/wait")
    with api.request("GET", f"/v1/vms/{vm['id']}/logs", stream=True) as r:
        assert b"".join(r.chunks()) == b"a log line\n"
    assert api.request("GET", f"/v1/vms/{vm['id']}/logs") == b"a log line\n"  # non-JSON -> bytes


@pytest.fixture
def https_daemon(tmp_path):
    """The fake daemon's handler behind TLS on 127.0.0.1 (needs the openssl command)."""
    import shutil
    import socketserver
    import ssl
    import subprocess
    import threading

    from clifake import FakeDaemon, Handler

    if not shutil.which("openssl"):
        pytest.skip("openssl not available")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))

    class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
        daemon_threads = True
        block_on_close = False

        def get_request(self):
            sock, addr = super().get_request()
            return ctx.wrap_socket(sock, server_side=True), addr

    daemon = FakeDaemon("tcp")
    server = Server(("127.0.0.1", 0), type("H", (Handler,), {"daemon": daemon}))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield daemon, f"https://127.0.0.1:{server.server_address[1]}", str(cert)
    finally:
        server.shutdown()
        server.server_close()


def test_https_transport_sends_the_bearer_token(https_daemon, tmp_path):
    from clifake import run_cli

    daemon, url, cert = https_daemon
    tok = tmp_path / "token"
    tok.write_text("s3cret\n")
    r = run_cli("--socket", url, "--tls-ca", cert, "--token-file", str(tok), "info", "--json")
    assert r.returncode == 0, r.stderr
    assert daemon.requests[-1]["headers"]["Authorization"] == "Bearer s3cret"
    r = run_cli("info", env={"MICROVM_SOCKET": url, "MICROVM_TLS_CA": cert, "MICROVM_TOKEN": "envtok"})
    assert r.returncode == 0, r.stderr
    assert daemon.requests[-1]["headers"]["Authorization"] == "Bearer envtok"
    # Without the CA the certificate is not trusted: reported like any unreachable daemon.
    r = run_cli("--socket", url, "info")
    assert r.returncode == 125
    assert r.stderr.decode().startswith(f"microvm: cannot reach microvmd at {url}: ")
    assert b"CERTIFICATE_VERIFY_FAILED" in r.stderr or b"certificate verify failed" in r.stderr


def test_socket_path_longer_than_sun_path(tmp_path):
    import threading

    from clifake import FakeDaemon, Handler, _Server

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = str(deep / "microvmd.sock")
    assert len(path) > 108
    dirfd = os.open(deep, os.O_RDONLY)
    try:
        server = _Server(f"/proc/self/fd/{dirfd}/microvmd.sock", type("H", (Handler,), {"daemon": FakeDaemon(path)}))
    finally:
        os.close(dirfd)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        assert ApiClient(UnixTransport(path)).request("GET", "/v1/info")["version"] == "9.9.9"
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(Unreachable, match="No such file or directory"):
        ApiClient(UnixTransport(str(tmp_path / ("x" * 120) / "s.sock"))).request("GET", "/v1/info")
