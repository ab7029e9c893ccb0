"""Functions through the real gateway (real HTTP on loopback) and the real API: WAGI (C), JavaScript and
Python handlers; isolation, errors, back-pressure, redeploy under load, restart of the daemon."""
from __future__ import annotations

import http.client
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from mvapi import IMAGES, Api, Daemon, cli

WAGI = IMAGES / "wagi" / "wagi.wasm"
FNSDK = IMAGES / "fnsdk" / "fnsdk.wasm"
JS_WASM = IMAGES / "js" / "js.wasm"          # scripts/fetch-interpreters
PYTHON_WASM = IMAGES / "python" / "python.wasm"
EXAMPLES = IMAGES / "functions"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gateway:
    def __init__(self, port: int) -> None:
        self.port = port

    def __call__(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None, conn: http.client.HTTPConnection | None = None
                 ) -> tuple[int, dict[str, str], bytes]:
        c = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            if conn is None:
                c.close()

    def get_all(self, path: str, header: str) -> tuple[int, bytes, list[str]]:
        """GET ``path``: the status, the body and every value of ``header`` (each line it came on)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read(), r.msg.get_all(header) or []
        finally:
            c.close()


def interpreter(d: Daemon, name: str, path: Path) -> None:
    """Import a fetched interpreter as image ``name`` (once per daemon), with time for its one-time Asyncify
    rewrite: a deploy would import it too, but within the test client's request timeout, which a rewrite on
    a busy machine can outlast (QuickJS about 20 s alone, CPython minutes)."""
    if d.api("GET", f"/v1/images/{name}").status == 200:
        return
    r = d.api("POST", f"/v1/images?name={name}", raw=path.read_bytes(), headers={"Content-Type": "application/wasm"},
              timeout=900)
    assert r.status == 201, r.body


@pytest.fixture(scope="module")
def fnd() -> Iterator[tuple[Daemon, Gateway]]:
    port = free_port()
    with Daemon.fresh("mvd-fn-", "--gateway", f"127.0.0.1:{port}") as d:
        for path, name in ((WAGI, "wagi"), (FNSDK, "fnsdk")):
            r = d.api.import_image(path.read_bytes(), name)
            assert r.status == 201, r.body
        yield d, Gateway(port)


@pytest.fixture
def deploy(fnd: tuple[Daemon, Gateway]) -> Iterator[Callable[..., dict[str, Any]]]:
    api = fnd[0].api
    made: list[str] = []

    def make(name: str, **body: Any) -> dict[str, Any]:
        r = api("POST", "/v1/functions", {"name": name, **body})
        assert r.status == 201, r.body
        made.append(name)
        return r.doc  # type: ignore[no-any-return]

    yield make
    for n in made:
        api("DELETE", f"/v1/functions/{n}")


def direct_ready(d: Daemon, name: str, timeout: float = 60.0) -> dict[str, Any]:
    """The function's stats once its direct instances are made (in the background after a deploy); the
    requests before that run as VMs."""
    end = time.monotonic() + timeout
    while True:
        stats: dict[str, Any] = d.api.ok("GET", f"/v1/functions/{name}")["stats"]
        if stats["direct_state"] != "preparing" or time.monotonic() > end:
            return stats
        time.sleep(0.02)


def test_wagi_function_gets_the_cgi_request(fnd: tuple[Daemon, Gateway], deploy: Callable[..., Any]) -> None:
    _, gw = fnd
    fn = deploy("hello", image="wagi", route="/hello")
    assert fn["executor"] == "wagi" and fn["route"] == "/hello" and fn["url"].endswith("/hello")
    status, headers, body = gw("GET", "/hello?name=ada")
    assert (status, body) == (200, b"hello ada, call 1\n")
    assert headers["content-type"] == "text/plain" and headers["x-calls"] == "1" and headers["x-request-id"]
    status, _, body = gw("GET", "/hello/sub/path?env=1", headers={"X-Test": "yes", "User-Agent": "t/1"})
    env = dict(line.split("=", 1) for line in body.decode().splitlines() if "=" in line)
    assert status == 200
    assert env["REQUEST_METHOD"] == "GET" and env["QUERY_STRING"] == "env=1"
    assert env["SCRIPT_NAME"] == "/hello" and env["PATH_INFO"] == "/sub/path" and env["X_MATCHED_ROUTE"] == "/hello"
    assert env["HTTP_X_TEST"] == "yes" and env["HTTP_USER_AGENT"] == "t/1" and env["GATEWAY_INTERFACE"] == "CGI/1.1"
    assert env["SERVER_PORT"] == str(gw.port)
    status, _, body = gw("POST", "/hello", b"0123456789", {"Content-Type": "application/octet-stream"})
    assert (status, body) == (201, b"got 10 bytes, call 1\n")  # the body on stdin, Status: from the guest


COOKIES_WAT = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "Content-Type: text/plain\\nSet-Cookie: a=1; Path=/\\nSet-Cookie: b=2\\n\\nok")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 68))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""


def test_a_header_given_twice_reaches_the_client_twice(fnd: tuple[Daemon, Gateway],
                                                       deploy: Callable[..., Any]) -> None:
    """Several Set-Cookie lines from a CGI response are several headers, not one joined with commas."""
    from wasmtime import wat2wasm

    d, gw = fnd
    assert d.api.import_image(bytes(wat2wasm(COOKIES_WAT)), "cookies").status == 201
    fn = deploy("cookies", image="cookies", executor="wagi")
    assert fn["url"] == f"http://127.0.0.1:{gw.port}/cookies"
    assert gw.get_all("/cookies", "Set-Cookie") == (200, b"ok", ["a=1; Path=/", "b=2"])


def test_every_request_gets_a_fresh_instance_on_one_keep_alive_connection(
        fnd: tuple[Daemon, Gateway], deploy: Callable[..., Any]) -> None:
    _, gw = fnd
    deploy("fresh", image="wagi")  # no --route: /NAME
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    answers = {gw("GET", f"/fresh?name={i}", conn=conn)[2] for i in range(20)}
    conn.close()
    assert answers == {f"hello {i}, call 1\n".encode() for i in range(20)}


def test_failures_have_their_status_and_an_id_in_the_log(fnd: tuple[Daemon, Gateway],
                                                        deploy: Callable[..., Any]) -> None:
    d, gw = fnd
    deploy("bad", image="wagi", timeout=0.3)
    status, headers, body = gw("GET", "/bad?spin=1")
    assert status == 504 and b"did not answer within 0.3 s" in body
    rid = headers["x-request-id"]
    assert rid in body.decode()
    status, _, body = gw("GET", "/bad?trap=1")
    assert status == 502 and b"trap" in body
    status, _, body = gw("GET", "/bad?nohead=1")
    assert status == 502 and b"not a CGI response" in body
    logs = d.api("GET", "/v1/functions/bad/logs").text
    assert f"request {rid}: 504 timeout" in logs and "502 trap" in logs and "502 bad_response" in logs
    info = d.api.ok("GET", "/v1/functions/bad")
    assert info["stats"]["errors"] == {"timeout": 1, "trap": 1, "bad_response": 1}
    status, _, _ = gw("GET", "/nowhere")
    assert status == 404
    status, _, body = gw("POST", "/bad", b"x" * (2 << 20))
    assert status == 413
    assert gw("GET", "/bad?name=ok")[0] == 200  # and the function still works


SLEEP_WAT = """(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 256) "Content-Type: text/plain\\n\\nslept")
  (func (export "_start")
    ;; one subscription at 0: a clock (tag 0), the monotonic one (id 1 at 16), 30 ms from now (at 24)
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const 30000000))
    (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 96)))
    (i32.store (i32.const 128) (i32.const 256))
    (i32.store (i32.const 132) (i32.const 31))
    (drop (call $w (i32.const 1) (i32.const 128) (i32.const 1) (i32.const 136)))))
"""

LONG_WAT = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "Content-Type: text/plain\\n\\ndone")
  (func (export "_start") (local $i i32)
    ;; 20 million turns: several of the daemon's 10-million fuel slices
    (loop $l
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 20000000))))
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 30))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""


def test_wagi_requests_run_as_direct_instances_and_go_on_as_vms_when_they_must(
        fnd: tuple[Daemon, Gateway], deploy: Callable[..., Any]) -> None:
    """A WAGI request is a direct instance (one store and instance on a vCPU worker, no VM); one that waits, or
    needs more than a quantum or a fuel slice, goes on as an ephemeral VM and gets the same answer."""
    from wasmtime import wat2wasm

    d, gw = fnd
    stats = lambda name: d.api.ok("GET", f"/v1/functions/{name}")["stats"]  # noqa: E731
    deploy("dhello", image="wagi")
    assert direct_ready(d, "dhello")["direct_state"] == "ready"
    for i in range(5):
        assert gw("GET", f"/dhello?name={i}")[::2] == (200, f"hello {i}, call 1\n".encode())
    assert gw("POST", "/dhello", b"x" * 100_000)[::2] == (201, b"got 100000 bytes, call 1\n")
    assert (stats("dhello")["direct"], stats("dhello")["direct_to_vm"]) == (6, 0)
    assert stats("dhello")["fresh_instance_us"]["count"] == 6

    for name, wat in (("sleepy", SLEEP_WAT), ("longloop", LONG_WAT)):
        assert d.api.import_image(bytes(wat2wasm(wat)), name).status == 201
        r = d.api("POST", f"/v1/images?name={name}-plain&no_asyncify=true", raw=bytes(wat2wasm(wat)),
                  headers={"Content-Type": "application/wasm"})
        assert r.status == 201, r.body
    for image, answer in (("sleepy", b"slept"), ("sleepy-plain", b"slept"), ("longloop", b"done"),
                          ("longloop-plain", b"done")):
        deploy(image, image=image, executor="wagi")
        direct_ready(d, image)
        assert gw("GET", f"/{image}")[::2] == (200, answer), image
        assert (stats(image)["direct"], stats(image)["direct_to_vm"]) == (0, 1), image
    # an answer beyond the console cap (limits.log_bytes, 8 MiB) is no answer: 502, the client gets none of it
    big = """(module
      (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 2)
      (data (i32.const 64) "Content-Type: text/plain\\n\\n")
      (func (export "_start") (local $i i32)
        (i32.store (i32.const 0) (i32.const 64)) (i32.store (i32.const 4) (i32.const 65536))
        (loop $l (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $l (i32.lt_u (local.get $i) (i32.const 136))))))"""
    assert d.api.import_image(bytes(wat2wasm(big)), "bigout").status == 201
    deploy("bigout", image="bigout", executor="wagi")
    direct_ready(d, "bigout")
    status, _, body = gw("GET", "/bigout")
    assert status == 502 and b"larger than the console cap" in body and len(body) < 1000
    assert (stats("bigout")["direct"], stats("bigout")["errors"]) == (1, {"bad_response": 1})
    # the function's own fuel is below a slice: its end is the direct instance's, answered as such
    deploy("starved", image="longloop", executor="wagi", fuel=1_000_000)
    direct_ready(d, "starved")
    status, _, body = gw("GET", "/starved")
    assert status == 502 and b"ran out of fuel" in body
    assert (stats("starved")["direct"], stats("starved")["errors"]) == (1, {"out_of_fuel": 1})


def test_the_query_string_stays_raw_and_control_characters_are_refused(
        fnd: tuple[Daemon, Gateway], deploy: Callable[..., Any]) -> None:
    _, gw = fnd
    deploy("rawq", image="wagi")
    status, _, body = gw("GET", "/rawq/a%20b?env=1&p=100%25&x=%00")
    env = dict(line.split("=", 1) for line in body.decode().splitlines() if "=" in line)
    assert status == 200 and env["QUERY_STRING"] == "env=1&p=100%25&x=%00" and env["PATH_INFO"] == "/a b"
    assert gw("GET", "/rawq/x%00y")[0] == 400
    assert gw("GET", "/rawq", headers={"Proxy": "http://evil"})[0] == 200


def test_remove_then_deploy_again_under_load(fnd: tuple[Daemon, Gateway]) -> None:
    d, gw = fnd
    api = d.api
    body = {"name": "again", "image": "fnsdk", "executor": "sdk", "route": "/again"}
    assert api("POST", "/v1/functions", body).status == 201
    stop = threading.Event()
    seen: list[int] = []

    def hammer() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        while not stop.is_set():
            seen.append(gw("GET", "/again", conn=conn)[0])
        conn.close()

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            time.sleep(0.2)
            assert api("DELETE", "/v1/functions/again").status == 204
            assert api("POST", "/v1/functions", body).status == 201
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert set(seen) <= {200, 404}, sorted(set(seen))  # 404 only in the moments it was removed
    assert gw("GET", "/again")[0] == 200  # its snapshot is its own: not dropped by the removed version's
    snaps = [s["name"] for s in api.ok("GET", "/v1/snapshots")["snapshots"] if s["name"].startswith("fn.again.")]
    assert len(snaps) == 1, snaps
    api("DELETE", "/v1/functions/again")


def test_bad_deploys_say_what_to_fix(fnd: tuple[Daemon, Gateway], deploy: Callable[..., Any]) -> None:
    api = fnd[0].api
    deploy("taken", image="wagi", route="/taken")
    cases = [
        ({"name": "x", "image": "nosuchimage"}, 404, "image_not_found"),
        ({"name": "x"}, 400, "invalid_function"),
        ({"name": "x", "image": "wagi", "js": "1"}, 400, "invalid_function"),
        ({"name": "x", "image": "wagi", "route": "no-slash"}, 400, "invalid_route"),
        ({"name": "x", "image": "wagi", "route": "/taken"}, 409, "route_in_use"),
        ({"name": "bad name!", "image": "wagi"}, 400, "invalid_name"),
        ({"name": "x", "image": "wagi", "executor": "sdk"}, 400, "invalid_function"),  # no mv_fn_request
        ({"name": "x", "image": "wagi", "reuse": True}, 400, "invalid_function"),  # CGI: one request per run
        ({"name": "x", "image": "wagi", "max_concurrency": 0}, 400, "invalid_limit"),
    ]
    for body, status, code in cases:
        r = api("POST", "/v1/functions", body)
        assert (r.status, r.code) == (status, code), (body, r.status, r.body)
    assert api("GET", "/v1/functions/x").status == 404
    r = api("DELETE", "/v1/images/wagi")
    assert r.status == 409 and "taken" in r.message  # the image runs a function


def test_the_concurrency_limit_queues_then_answers_503(fnd: tuple[Daemon, Gateway],
                                                      deploy: Callable[..., Any]) -> None:
    _, gw = fnd
    fn = deploy("narrow", image="wagi", max_concurrency=1, timeout=0.5)
    assert fn["limits"]["queue"] == 4
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: gw("GET", "/narrow?spin=1"), range(8)))
    statuses = sorted(s for s, _, _ in results)
    assert statuses.count(504) >= 1 and 503 in statuses, statuses  # 1 running + 4 queued; the rest refused
    refused = next(h for s, h, _ in results if s == 503)
    assert refused["retry-after"] == "1"


def test_redeploy_under_load_fails_no_request(fnd: tuple[Daemon, Gateway], deploy: Callable[..., Any]) -> None:
    d, gw = fnd
    deploy("live", image="wagi", route="/live", env={"V": "1"})
    stop = threading.Event()
    seen: list[int] = []

    def hammer() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        while not stop.is_set():
            seen.append(gw("GET", "/live?name=x", conn=conn)[0])
        conn.close()

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for v in range(2, 6):
            time.sleep(0.2)
            assert d.api("POST", "/v1/functions", {"name": "live", "image": "wagi", "route": "/live",
                                                  "env": {"V": str(v)}}).status == 201
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(seen) > 20 and set(seen) == {200}, sorted(set(seen))
    assert d.api.ok("GET", "/v1/functions/live")["version"] == 5


def test_metrics_count_invocations_and_errors(fnd: tuple[Daemon, Gateway], deploy: Callable[..., Any]) -> None:
    d, gw = fnd
    deploy("counted", image="wagi")
    for q in ("a", "b", "trap=1"):
        gw("GET", f"/counted?{q}")
    text = d.api.metrics()
    assert 'microvmd_function_invocations_total{function="counted"} 3.0' in text
    assert 'microvmd_function_errors_total{function="counted",kind="trap"} 1.0' in text
    assert 'microvmd_function_request_seconds_count{function="counted"} 3.0' in text
    # a function's instances are not VMs a user made: ps leaves them out
    assert all(v["spec"].get("ephemeral") is not True for v in d.api.ok("GET", "/v1/vms")["vms"])


def test_the_cli_deploys_lists_invokes_and_removes(fnd: tuple[Daemon, Gateway]) -> None:
    d, gw = fnd
    mv = lambda *a: cli(d.socket, *a)  # noqa: E731
    r = mv("fn", "deploy", "clihello", "wagi", "--route", "/cli", "--timeout", "5s", "--max-concurrency", "3",
           "-e", "A=1")
    assert r.returncode == 0 and r.stdout.split() == ["clihello", "/cli"], r.stderr
    r = mv("fn", "ls")
    assert r.returncode == 0 and "clihello" in r.stdout and "/cli" in r.stdout and "wagi" in r.stdout
    r = mv("fn", "invoke", "clihello", "--path", "/cli?name=cli")
    assert (r.returncode, r.stdout) == (0, "hello cli, call 1\n"), r.stderr
    r = mv("fn", "invoke", "clihello", "--data", "abc")  # POST, as curl -d
    assert (r.returncode, r.stdout) == (0, "got 3 bytes, call 1\n"), r.stderr
    r = mv("fn", "invoke", "clihello", "--path", "/?trap=1")
    assert r.returncode == 1 and "502" in r.stderr
    r = mv("fn", "logs", "clihello")
    assert r.returncode == 0 and "502 trap" in r.stdout
    r = mv("--json", "fn", "inspect", "clihello")
    assert r.returncode == 0 and '"max_concurrency": 3' in r.stdout and '"A": "1"' in r.stdout
    assert mv("fn", "rm", "clihello").returncode == 0
    assert gw("GET", "/cli")[0] == 404
    r = mv("fn", "invoke", "clihello")
    assert r.returncode == 125 and "no such function" in r.stderr


def test_functions_survive_a_restart(make_daemon: Callable[..., Daemon]) -> None:
    port = free_port()
    d = make_daemon("--gateway", f"127.0.0.1:{port}")
    assert d.api.import_image(WAGI.read_bytes(), "wagi").status == 201
    assert d.api("POST", "/v1/functions", {"name": "kept", "image": "wagi", "route": "/k"}).status == 201
    gw = Gateway(port)
    assert gw("GET", "/k?name=1")[2] == b"hello 1, call 1\n"
    d.stop(signal.SIGTERM)
    d.start()
    assert gw("GET", "/k?name=2")[2] == b"hello 2, call 1\n"
    assert [f["name"] for f in d.api.ok("GET", "/v1/functions")["functions"]] == ["kept"]


def test_sigterm_under_gateway_load_gives_answers_or_503(make_daemon: Callable[..., Daemon]) -> None:
    port = free_port()
    d = make_daemon("--gateway", f"127.0.0.1:{port}")
    assert d.api.import_image(WAGI.read_bytes(), "wagi").status == 201
    assert d.api("POST", "/v1/functions", {"name": "busy", "image": "wagi"}).status == 201
    gw = Gateway(port)
    seen: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                while not stop.is_set():
                    seen.append(gw("GET", "/busy?name=x", conn=conn)[0])
            except (OSError, http.client.HTTPException):
                time.sleep(0.01)  # refused or closed: the daemon is going away
                if d.proc is not None and d.proc.poll() is not None:
                    return

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    d.send_signal(signal.SIGTERM)
    assert d.proc is not None and d.proc.wait(60) == 0
    stop.set()
    for t in threads:
        t.join()
    assert seen and set(seen) <= {200, 503}, sorted(set(seen))


def test_a_small_memory_reservation_limits_direct_instances(make_daemon: Callable[..., Daemon],
                                                           tmp_path: Path) -> None:
    """[engine] memory_reservation caps what a pooled slot's memory can be: a function allowed more runs its
    requests as VMs (the daemon starts; wasmtime would abort on a pool larger than the reservation)."""
    conf = tmp_path / "d.toml"
    conf.write_text('[engine]\nmemory_reservation = "64MiB"\n')
    port = free_port()
    d = make_daemon("--config", str(conf), "--gateway", f"127.0.0.1:{port}")
    assert d.api.import_image(WAGI.read_bytes(), "wagi").status == 201
    gw = Gateway(port)
    for name, memory in (("small", 32 << 20), ("large", None)):
        r = d.api("POST", "/v1/functions", {"name": name, "image": "wagi", "memory": memory})
        assert r.status == 201, r.body
        stats = direct_ready(d, name)
        assert stats["direct_state"] == ("ready" if memory else "off"), name
        assert gw("GET", f"/{name}?name={name}")[::2] == (200, f"hello {name}, call 1\n".encode())
    assert "no direct instances (its memory limit is above" in d.log()


def test_a_taken_gateway_port_is_refused_only_when_asked_for(make_daemon: Callable[..., Daemon]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        d = make_daemon("--gateway", f"127.0.0.1:{port}", start=False)
        d.start(wait=False)
        assert d.proc is not None and d.proc.wait(60) != 0
        assert "cannot serve the function gateway" in d.log()


def test_sdk_function_passes_request_and_response_through_memory(fnd: tuple[Daemon, Gateway],
                                                                 deploy: Callable[..., Any]) -> None:
    d, gw = fnd
    fn = deploy("sdkf", image="fnsdk", executor="sdk", route="/sdk")
    assert fn["executor"] == "sdk" and fn["snapshot"]
    assert direct_ready(d, "sdkf")["direct_state"] == "ready"  # (its snapshot baked into a module, compiled)
    for i in range(2):  # restored per request from the snapshot taken in mv_fn_request: state fresh, init kept
        status, headers, body = gw("POST", f"/sdk/p?i={i}", b"xyz", {"User-Agent": "ua/1"})
        assert (status, body) == (200, f"sdk POST /sdk/p?i={i} 3 bytes, call 1, agent ua/1, table 3\n".encode())
        assert headers["x-sdk"] == "1" and headers["content-type"] == "text/plain"
    status, _, body = gw("GET", "/sdk?trap=1")
    assert status == 502 and b"trap" in body
    status, _, body = gw("GET", "/sdk?silent=1")
    assert status == 502 and b"without mv_fn_respond" in body
    stats = d.api.ok("GET", "/v1/functions/sdkf")["stats"]
    assert stats["fresh_instance_us"]["count"] >= 4
    # each of these was a direct instance resumed from the snapshot, not a VM
    assert (stats["direct"], stats["direct_to_vm"], stats["instances"]) == (4, 0, 0)
    assert stats["restore_us"]["count"] == 4
    # one that waits (usleep: poll_oneoff on a clock) goes on as a VM restored from the same snapshot
    status, _, body = gw("GET", "/sdk?sleep=1")
    assert status == 200 and body.startswith(b"sdk GET /sdk?sleep=1 0 bytes, call 1,") and b"table 3" in body, body
    stats = d.api.ok("GET", "/v1/functions/sdkf")["stats"]
    assert (stats["direct"], stats["direct_to_vm"]) == (4, 1)


# ------------------------------------------------------------------ JavaScript and Python handlers
@pytest.mark.skipif(not JS_WASM.is_file(), reason="run scripts/fetch-interpreters first")
def test_javascript_function(fnd: tuple[Daemon, Gateway], deploy: Callable[..., Any]) -> None:
    d, gw = fnd
    api: Api = d.api
    interpreter(d, "js", JS_WASM)
    fn = deploy("jsf", js=(EXAMPLES / "hello.js").read_text(), route="/js")
    assert fn["executor"] == "js" and fn["snapshot"]
    assert gw("GET", "/js/x")[:3:2] == (200, b"js GET /js/x 1 0")
    status, _, body = gw("POST", "/js", b"abcd")
    assert (status, body) == (200, b"js POST /js 1 4")  # module state fresh again
    stats = direct_ready(d, "jsf")  # an interpreter's instances are VMs restored from its snapshot
    assert (stats["direct_state"], stats["direct"]) == ("off", 0)
    status, _, body = gw("GET", "/js?fail=1")
    assert status == 502 and b"asked to fail" in body
    assert "asked to fail" in api("GET", "/v1/functions/jsf/logs").text
    r = api("DELETE", f"/v1/snapshots/{fn['snapshot']}")
    assert r.status == 409 and r.code == "snapshot_in_use"
    r = api("POST", "/v1/functions", {"name": "jsbad", "js": "function handle( {"})
    assert r.status == 400 and r.code == "handler_failed" and "SyntaxError" in r.message, r.body
    r = api("POST", "/v1/functions", {"name": "jsnone", "js": "let x = 1;"})
    assert r.status == 400 and "no handle(request)" in r.message, r.body


@pytest.mark.skipif(not JS_WASM.is_file(), reason="run scripts/fetch-interpreters first")
def test_reuse_keeps_warm_instances_that_share_state(fnd: tuple[Daemon, Gateway],
                                                     deploy: Callable[..., Any]) -> None:
    d, gw = fnd
    interpreter(d, "js", JS_WASM)
    deploy("jswarm", js=(EXAMPLES / "hello.js").read_text(), route="/warm", reuse=True, timeout=2)
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    counts = [int(gw("GET", "/warm", conn=conn)[2].split()[-2]) for _ in range(5)]
    assert counts == [1, 2, 3, 4, 5]  # one warm instance, its module state shared (as --reuse documents)
    status, _, body = gw("GET", "/warm?fail=1", conn=conn)
    assert status == 502 and b"asked to fail" in body
    assert int(gw("GET", "/warm", conn=conn)[2].split()[-2]) == 7  # a handler error does not end the instance
    conn.close()
    running = [v for v in d.api.ok("GET", "/v1/vms?all=true")["vms"] if v["state"] == "running"]
    assert len(running) == 1  # the warm instance waits for the next request
    deploy("jswarm", js="function handle(r) { while (true) {} }", route="/warm", reuse=True, timeout=0.5)
    assert gw("GET", "/warm")[0] == 504  # redeployed: a new instance; stuck: stopped and answered 504
    assert d.api.ok("GET", "/v1/functions/jswarm")["version"] == 2


@pytest.mark.slow  # the first import rewrites CPython for snapshots: about 4 minutes on 2 cores
@pytest.mark.skipif(not PYTHON_WASM.is_file(), reason="run scripts/fetch-interpreters first")
def test_python_function(fnd: tuple[Daemon, Gateway], deploy: Callable[..., Any]) -> None:
    d, gw = fnd
    interpreter(d, "python", PYTHON_WASM)
    fn = deploy("pyf", python=(EXAMPLES / "counter.py").read_text(), route="/py")
    assert fn["executor"] == "python" and fn["snapshot"]
    for _ in range(2):
        status, _, body = gw("POST", "/py/x?name=ada", b"abc")
        assert status == 200 and b'"count": 1' in body and b'"hello": "ada"' in body and b'"bytes": 3' in body
    status, _, body = gw("GET", "/py?fail=1")
    assert status == 502
    assert "RuntimeError: asked to fail" in d.api("GET", "/v1/functions/pyf/logs").text
    r = d.api("POST", "/v1/functions", {"name": "pybad", "python": "import nosuchmodule\n"})
    assert r.status == 400 and "ModuleNotFoundError" in r.message, r.body
    # a list of values: the header once per value
    deploy("pycookies", python='def handle(r):\n    return {"headers": {"Set-Cookie": ["a=1", "b=2"]}, '
                               '"body": "ok"}\n', route="/pyc")
    assert gw.get_all("/pyc", "Set-Cookie") == (200, b"ok", ["a=1", "b=2"])


def test_examples_are_where_the_docs_say() -> None:
    for f in ("counter.py", "hello.js", "README.md"):
        assert (EXAMPLES / f).is_file()
    assert Path(IMAGES / "wagi" / "wagi.c").is_file()


def test_an_interpreter_image_that_cannot_be_snapshotted_is_refused(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon()
    # an image named like the interpreter but kept as it is (--no-asyncify): its stdin is wasmtime's own
    r = d.api("POST", "/v1/images?name=js&no_asyncify=true", raw=(IMAGES / "hello" / "hello.wasm").read_bytes())
    assert r.status == 201, r.body
    r = d.api("POST", "/v1/functions", {"name": "x", "js": "function handle(r) { return 'hi'; }"})
    assert r.status == 422 and r.code == "runtime_not_snapshottable", r.body
