"""The HTTP API itself: error statuses and codes, body validation, MessagePack, the OpenAPI document
against the routes the server really registers, and the Prometheus metrics."""
from __future__ import annotations

import re
import socket
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from mvapi import Api, Daemon, request, wasm

HUGE = "900000000000"
MSGPACK = "application/msgpack"


@pytest.fixture
def running(api: Api) -> Any:
    vm = api.create("spin", HUGE, start=True)
    api.wait_state(vm["id"], "running")
    yield vm
    api("POST", f"/v1/vms/{vm['id']}/kill")


# ------------------------------------------------------------------------------------------ transitions
def test_wrong_transitions_are_409_invalid_state(daemon: Daemon, api: Api, running: dict[str, Any]) -> None:
    r = api("POST", f"/v1/vms/{running['id']}/resume")
    assert r.status == 409 and r.error["code"] == "invalid_state", r.text
    r = api("POST", f"/v1/vms/{running['id']}/start")
    assert r.status == 409 and r.error["code"] == "invalid_state", r.text

    created = api.create("hello")
    r = api("POST", f"/v1/vms/{created['id']}/pause")
    assert r.status == 409 and r.error["code"] == "invalid_state", r.text
    r = api("POST", f"/v1/vms/{created['id']}/resume")
    assert r.status == 409 and r.error["code"] == "invalid_state", r.text
    assert api.vm(created["id"])["state"] == "created"  # a refused action changes nothing

    api.ok("POST", f"/v1/vms/{created['id']}/start")
    assert api.wait(created["id"])["code"] == 0
    # (start of an ended VM runs it again, as docker start: tests/integration/test_it_restart.py)
    for action in ("pause", "resume", "stop", "kill"):
        r = api("POST", f"/v1/vms/{created['id']}/{action}")
        assert r.status == 409 and r.error["code"] == "invalid_state", (action, r.text)
    assert api.vm(created["id"])["state"] == "exited"

    c = daemon.cli("resume", running["id"])
    assert c.returncode == 125 and "invalid_state" in c.stderr, c.stderr


def test_unknown_vm_is_404_vm_not_found(api: Api) -> None:
    for method, path in [("GET", "/v1/vms/no-such-vm"), ("DELETE", "/v1/vms/no-such-vm"),
                         ("POST", "/v1/vms/no-such-vm/start"), ("POST", "/v1/vms/no-such-vm/kill"),
                         ("POST", "/v1/vms/no-such-vm/wait"), ("GET", "/v1/vms/no-such-vm/logs")]:
        r = api(method, path)
        assert r.status == 404 and r.error["code"] == "vm_not_found", (method, path, r.text)
        assert "no-such-vm" in r.error["message"]
    r = api("POST", "/v1/vms/no-such-vm/fuel", {"amount": 1})
    assert r.status == 404 and r.error["code"] == "vm_not_found"
    r = api("POST", "/v1/vms", {"image": "no-such-image"})
    assert r.status == 404 and r.error["code"] == "image_not_found", r.text


def test_unknown_route_and_method(api: Api) -> None:
    r = api("GET", "/v1/nothing-here")
    assert r.status == 404 and r.error["code"]
    r = api("PUT", "/v1/vms")
    assert r.status == 405 and r.error["code"]


# ------------------------------------------------------------------------------------------ bodies
def test_malformed_json_is_400(api: Api) -> None:
    for raw in (b"{not json", b'{"image": "hello",}', b"\xff\xfe", b'["hello"]', b'"hello"'):
        r = api("POST", "/v1/vms", raw=raw, headers={"Content-Type": "application/json"})
        assert r.status == 400, (raw, r.status, r.text)
        assert r.error["code"]


def test_unknown_field_is_400_and_named(api: Api) -> None:
    r = api("POST", "/v1/vms", {"image": "hello", "cpus": 4})
    assert r.status == 400 and "cpus" in r.error["message"], r.text
    r = api("POST", "/v1/vms", {"image": "hello", "fuel": "lots"})
    assert r.status == 400 and "fuel" in r.error["message"], r.text
    r = api("POST", "/v1/vms", {"image": "hello", "env": {"A": 1}})
    assert r.status == 400 and "env" in r.error["message"], r.text
    r = api("POST", "/v1/vms", {"args": []})
    assert r.status == 400 and "image" in r.error["message"], r.text
    r = api("POST", "/v1/vms", {"image": "hello", "timeout": -1})
    assert r.status == 400, r.text
    before = len(api.ok("GET", "/v1/vms?all=true")["vms"])
    assert len(api.ok("GET", "/v1/vms?all=true")["vms"]) == before  # nothing was created by the refusals


def test_msgpack_request_and_response(api: Api) -> None:
    body = msgpack.packb({"image": "hello", "args": ["3"], "env": {"WHO": "mp"}, "start": True})
    r = api("POST", "/v1/vms", raw=body, headers={"Content-Type": MSGPACK})
    assert r.status == 201, r.text
    assert r.content_type.startswith(MSGPACK)
    vm = msgpack.unpackb(r.body, raw=False)
    assert vm["env"] == {"WHO": "mp"} and vm["args"] == ["3"]
    assert api.wait(vm["id"])["code"] == 3

    r = api("GET", f"/v1/vms/{vm['id']}", headers={"Accept": MSGPACK})
    assert r.status == 200 and r.content_type.startswith(MSGPACK)
    assert msgpack.unpackb(r.body, raw=False)["id"] == vm["id"]
    r = api("GET", "/v1/vms?all=true", headers={"Accept": MSGPACK})
    assert any(v["id"] == vm["id"] for v in msgpack.unpackb(r.body, raw=False)["vms"])
    # errors too
    r = api("GET", "/v1/vms/nope-nope", headers={"Accept": MSGPACK})
    assert r.status == 404 and r.content_type.startswith(MSGPACK)
    assert msgpack.unpackb(r.body, raw=False)["error"]["code"] == "vm_not_found"
    # msgpack body, JSON answer when asked for
    r = api("POST", "/v1/vms", raw=msgpack.packb({"image": "hello"}),
            headers={"Content-Type": MSGPACK, "Accept": "application/json"})
    assert r.status == 201 and r.content_type.startswith("application/json")
    # malformed msgpack
    r = api("POST", "/v1/vms", raw=b"\xc1\xc1\xc1", headers={"Content-Type": MSGPACK})
    assert r.status == 400, r.text
    r = api("POST", "/v1/vms", raw=msgpack.packb({"image": "hello", "what": 1}), headers={"Content-Type": MSGPACK})
    assert r.status == 400 and "what" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------------------ OpenAPI
def _doc_ops(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops
            if m in ("get", "post", "put", "delete", "patch")}


def _registered_routes(tmp_path: Path) -> tuple[set[tuple[str, str]], dict[str, Any]]:
    """Build the real application exactly as the daemon does and list what its router serves."""
    from microvmd.api import server
    from microvmd.config import load
    from microvmd.daemon import parse_args
    from microvmd.devices import install_devices
    from microvmd.vmm.manager import Hypervisor

    cfg = load(parse_args(["--socket", str(tmp_path / "x.sock"), "--state-dir", str(tmp_path / "state")]))
    hv = Hypervisor(cfg)
    try:
        install_devices(hv)
        from microvmd.api.routes import api_routes
        from microvmd.control.controller import Controller
        from microvmd.snapshot.controller import Snapshots

        routes = api_routes(hv)
        app = server.make_app(Controller(hv, Snapshots(hv)), routes)
        registered = {(r.method, r.resource.canonical) for r in app.router.routes()
                      if r.resource is not None and r.method != "HEAD"}
        table = {(r.method, r.path) for r in routes}
        assert table <= registered
        return registered, server.openapi_document(routes)
    finally:
        hv.sched.close()


def test_openapi_lists_every_registered_route(tmp_path: Path, api: Api) -> None:
    registered, doc = _registered_routes(tmp_path)
    assert doc["openapi"].startswith("3.")
    missing = registered - _doc_ops(doc)
    assert not missing, f"routes served but not in the OpenAPI document: {sorted(missing)}"
    assert not _doc_ops(doc) - registered, "documented routes the server does not serve"

    r = api("GET", "/v1/openapi.json")
    assert r.status == 200 and r.content_type.startswith("application/json")
    live = r.json()
    assert live["openapi"].startswith("3.") and live["info"]["title"]
    missing_live = registered - _doc_ops(live)
    assert not missing_live, f"routes not in the live document: {sorted(missing_live)}"
    for must in [("GET", "/v1/info"), ("POST", "/v1/images"), ("POST", "/v1/vms"), ("GET", "/v1/vms/{ref}"),
                 ("POST", "/v1/vms/{ref}/pause"), ("GET", "/v1/vms/{ref}/logs"), ("GET", "/metrics")]:
        assert must in _doc_ops(live), must
    for path, ops in live["paths"].items():
        for op in ops.values():
            assert op.get("responses"), (path, op)
            for p in re.findall(r"{(\w+)}", path):
                assert any(x["name"] == p and x["in"] == "path" for x in op.get("parameters", [])), (path, p)


# ------------------------------------------------------------------------------------------ metrics
LABELS = r'\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\}'
SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(' + LABELS + r')? (-?[0-9.eE+-]+|NaN|\+Inf|-Inf)$')


def test_metrics_are_prometheus_text(api: Api, running: dict[str, Any]) -> None:
    api.ok("GET", "/v1/info")
    r = api("GET", "/metrics")
    assert r.status == 200 and r.content_type.startswith("text/plain")
    text = r.text
    types: dict[str, str] = {}
    samples: list[tuple[str, str, float]] = []
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
            continue
        if line.startswith("#"):
            assert line.startswith("# HELP "), line
            continue
        m = SAMPLE_RE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        samples.append((m.group(1), m.group(2) or "", float(m.group(3))))
    for name, _, _ in samples:
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"{name} has no # TYPE"

    by_state = {labels: v for name, labels, v in samples if name == "microvmd_vms"}
    for state in ("created", "running", "paused", "out_of_fuel", "exited", "stopped"):
        assert f'{{state="{state}"}}' in by_state, state
    assert by_state['{state="running"}'] >= 1
    assert types["microvmd_vms"] == "gauge"
    assert types.get("microvmd_fuel_consumed_total") == "counter"
    assert any(n == "microvmd_fuel_consumed_total" for n, _, _ in samples)
    assert types.get("microvmd_api_request_seconds") == "histogram"
    buckets = [(lbl, v) for n, lbl, v in samples
               if n == "microvmd_api_request_seconds_bucket" and 'route="/v1/info"' in lbl and 'method="GET"' in lbl]
    assert buckets and 'le="+Inf"' in buckets[-1][0]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and counts[-1] >= 1
    count = [v for n, lbl, v in samples if n == "microvmd_api_request_seconds_count" and 'route="/v1/info"' in lbl]
    assert count == [counts[-1]]
    assert any(n == "microvmd_api_request_seconds_sum" for n, _, _ in samples)


def test_info_counts_vms_by_state(api: Api, running: dict[str, Any]) -> None:
    info = api.ok("GET", "/v1/info")
    assert info["vms"]["running"] >= 1
    assert sum(info["vms"].values()) == len(api.ok("GET", "/v1/vms?all=true")["vms"])
    assert info["images"] == len(api.ok("GET", "/v1/images")["images"])


def test_version_route(api: Api, daemon: Daemon) -> None:
    v = api.ok("GET", "/v1/version")
    assert v["version"] and v["wasmtime_version"]
    c = daemon.cli("version")
    assert c.returncode == 0 and v["version"] in c.stdout and "microvmd" in c.stdout



# ------------------------------------------------------------------------------------------ log streams
def test_log_follower_going_away_is_not_an_error(make_daemon: Any) -> None:
    d = make_daemon()
    assert d.api.import_image(wasm("counter"), "counter").status == 201
    vm = d.api.create("counter", env={"COUNT": "0", "INTERVAL_MS": "20"}, start=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(d.socket))
        s.sendall(f"GET /v1/vms/{vm['id']}/logs?follow=true HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        s.settimeout(10)
        assert b"200" in s.recv(4096)
    finally:
        s.close()
    time.sleep(0.3)  # the guest keeps printing into a stream nobody reads any more
    d.api.ok("POST", f"/v1/vms/{vm['id']}/kill")
    time.sleep(0.2)
    assert request(d.socket, "GET", "/v1/info").status == 200
    log = d.log()
    assert "unhandled error" not in log and "Traceback" not in log, log
