"""Hostile requests get a 4xx, never a 500, and no value or name a client chooses breaks later requests
(issue 13 rows 8, 9 and 14)."""
from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import quote

import pytest
from mvapi import IMAGES, Api, Daemon

DEEP = b"[" * 100_000 + b"]" * 100_000


def raw(api: Api, method: str, path: str, body: bytes | None, ctype: str = "application/json") -> tuple[int, bytes]:
    r = api(method, path, raw=body, headers={"Content-Type": ctype} if body is not None else {})
    return r.status, r.body


@pytest.mark.parametrize("body,want", [
    (b'{"image": "hello", "fuel": 1000000000000000000000000000000000000000}', {400}),
    (b'{"image": "hello", "fuel": 9223372036854775808}', {400}),
    (b'{"image": "hello", "timeout": NaN}', {400}),
    (b'{"image": "hello", "timeout": Infinity}', {400}),
    (b'{"image": "hello", "timeout": 1e400}', {400}),
    (b'{"image": "hello", "timeout": -1}', {400}),
    (DEEP, {400, 413}),
])
def test_out_of_range_values_are_a_400(api: Api, body: bytes, want: set[int]) -> None:
    status, text = raw(api, "POST", "/v1/vms", body)
    assert status in want, text[:300]


def test_deep_msgpack_is_a_400(api: Api) -> None:
    status, _ = raw(api, "POST", "/v1/vms", b"\x91" * 100_000 + b"\x80", "application/msgpack")
    assert status == 400


@pytest.mark.parametrize("query", ["nan", "inf", "-inf", "-1", "1e400", "soon"])
def test_wait_timeout_must_be_finite_and_not_negative(api: Api, query: str) -> None:
    """`?timeout=nan` was a 500 (float NaN to integer); `inf` waited forever."""
    vm = api.create("hello")
    try:
        status, text = raw(api, "POST", f"/v1/vms/{vm['id']}/wait?timeout={query}", b"")
        assert status == 400 and b"invalid_query" in text, text
    finally:
        api.ok("DELETE", f"/v1/vms/{vm['id']}?force=true")


@pytest.mark.parametrize("name", ["x\n", "a\x00b", "abc\u202etxt", "a\u200fb", "a\u2028b", "a\x85b", ".", "..",
                                  "a/b", ""])
def test_unclean_vm_names_are_refused(api: Api, name: str) -> None:
    status, body = api.call("POST", "/v1/vms", {"image": "hello", "name": name})
    assert status == 400 and body["error"]["code"] == "invalid_name", body


@pytest.mark.parametrize("name", ["x\n", "a b", "-x"])
def test_unclean_image_and_disk_names_are_refused(api: Api, name: str) -> None:
    r = api("POST", f"/v1/images?name={quote(name)}", raw=(IMAGES / "hello" / "hello.wasm").read_bytes(),
            headers={"Content-Type": "application/wasm"})
    assert r.status == 400, r.text
    status, body = api.call("POST", "/v1/disks", {"name": name, "size": 65536})
    assert status == 400, body


def test_a_name_cannot_pass_for_another_vms_id(api: Api) -> None:
    """A name that is a prefix of another VM's id is refused; and should a later VM's id start with an
    existing name, the reference is ambiguous (409) rather than silently the named VM."""
    victim = api.create("hello")
    try:
        for n in (4, 8, 13, 32):
            status, body = api.call("POST", "/v1/vms", {"image": "hello", "name": victim["id"][:n]})
            assert status == 400 and body["error"]["code"] == "invalid_name", body
        status, body = api.call("POST", "/v1/vms", {"image": "hello", "name": victim["id"][:12]})
        assert status == 409 and body["error"]["code"] == "name_in_use", body  # its default name
        # a hex-looking name that prefixes nobody is fine, and resolves to its VM
        hexname = next(p for p in ("beef", "cafe", "f00d", "dead") if not any(
            v["id"].startswith(p) for v in api.ok("GET", "/v1/vms?all=true")["vms"]))
        named = api.create("hello", name=hexname)
        try:
            assert api.vm(hexname)["id"] == named["id"]
        finally:
            api.ok("DELETE", f"/v1/vms/{named['id']}")
        assert api.vm(victim["id"][:8])["id"] == victim["id"]
    finally:
        api.ok("DELETE", f"/v1/vms/{victim['id']}")


def test_image_limits_are_validated_like_vm_limits(make_daemon: Callable[..., Daemon]) -> None:
    """An image `limits.memory` of 1 (or above the daemon's maximum) used to be stored and broke every
    later create of the image."""
    d = make_daemon()
    assert d.api.import_image((IMAGES / "hello" / "hello.wasm").read_bytes(), "h").status in (200, 201)
    for limits in ({"memory": 1}, {"memory": 65535}, {"memory": 1 << 50}, {"fuel": 0}, {"fuel": 1 << 63},
                   {"timeout": 0}, {"timeout": -1}):
        status, body = d.api.call("PATCH", "/v1/images/h", {"limits": limits})
        assert status == 400, (limits, body)
    for body in (b'{"limits": {"timeout": NaN}}', b'{"limits": {"timeout": Infinity}}'):
        assert raw(d.api, "PATCH", "/v1/images/h", body)[0] == 400
    vm = d.api.create("h", start=True)
    assert d.api.wait(vm["id"])["code"] == 0  # the image still runs with its defaults
    assert d.api.ok("PATCH", "/v1/images/h", {"limits": {"memory": 1 << 20}})["limits"]["memory"] == 1 << 20
    assert d.api.create("h")["limits"]["memory"] == 1 << 20


@pytest.mark.parametrize("method,path", [("DELETE", "/v1/openapi.json"), ("PUT", "/v1/vms"),
                                         ("PATCH", "/v1/info"), ("POST", "/metrics")])
def test_405_answers_carry_allow(api: Api, method: str, path: str) -> None:
    r = api(method, path)
    assert r.status == 405 and r.headers.get("allow"), (r.status, r.headers)
    assert method not in r.headers["allow"]


def test_no_500_for_a_malformed_body_anywhere(api: Api) -> None:
    vm = api.create("hello")
    try:
        for method, path in (("POST", "/v1/vms"), ("PATCH", "/v1/images/hello"), ("POST", "/v1/disks"),
                             ("POST", f"/v1/vms/{vm['id']}/fuel"), ("POST", f"/v1/vms/{vm['id']}/snapshots"),
                             ("POST", "/v1/snapshots/none/restore"), ("POST", f"/v1/vms/{vm['id']}/migrate"),
                             ("POST", "/v1/snapshots/chunks/missing")):
            for body in (b"{", b"[]", b'"x"', b"null", b"1e999999", DEEP, json.dumps({"\x00": 1}).encode()):
                status, text = raw(api, method, path, body)
                assert 400 <= status < 500, (method, path, body[:20], status, text[:200])
    finally:
        api.ok("DELETE", f"/v1/vms/{vm['id']}")


def test_a_users_mistakes_are_not_logged_as_daemon_errors(make_daemon: Callable[..., Daemon]) -> None:
    """Issue 13 row 4: a wrong image name, VM or snapshot is the client's 4xx, not an ERROR of the daemon."""
    d = make_daemon()
    assert d.cli("run", "nosuchimage").returncode == 125
    assert d.cli("image", "rm", "nosuch").returncode == 125
    assert d.cli("restore", "nosuch").returncode == 125
    assert d.api("POST", "/v1/vms/%0aFORGED-LINE/start").status == 404
    assert d.api("POST", "/v1/vms", {"image": "nosuch\nFORGED-LINE"}).status == 404
    log = d.log()
    assert " ERROR " not in log and " WARNING " not in log, log
    assert not [line for line in log.splitlines() if line.startswith("FORGED")]
