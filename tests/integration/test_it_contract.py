"""The contract (microvmd/contract.py) against the running daemon: the OpenAPI document generated from it is a
valid OpenAPI 3.1 document with a real schema for every JSON body, and real answers of the daemon match the
schemas the document gives for them."""
from __future__ import annotations

import json
from typing import Any

import jsonschema
import msgpack
import pytest
from mvapi import Api, Daemon
from openapi_spec_validator import validate

from microvmd import contract


@pytest.fixture(scope="module")
def doc(api: Api) -> dict[str, Any]:
    r = api("GET", "/v1/openapi.json")
    assert r.status == 200
    return r.json()  # type: ignore[no-any-return]


def test_openapi_document_is_valid(doc: dict[str, Any]) -> None:
    validate(doc)
    assert doc["openapi"].startswith("3.1")


def _schema(doc: dict[str, Any], method: str, path: str, status: int, part: str = "response") -> dict[str, Any]:
    op = doc["paths"][path][method.lower()]
    media = op["requestBody"]["content"] if part == "request" else op["responses"][str(status)]["content"]
    # resolve $refs against the whole document
    return {**media["application/json"]["schema"], "components": doc["components"]}


def _check(doc: dict[str, Any], method: str, path: str, status: int, body: Any) -> None:
    jsonschema.validate(body, _schema(doc, method, path, status), cls=jsonschema.Draft202012Validator)


def test_every_json_body_has_a_schema_with_properties(doc: dict[str, Any]) -> None:
    comps = doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for media in [*op.get("requestBody", {}).get("content", {}).values(),
                          *(c for code, r in op["responses"].items() if code.startswith("2")
                            for c in r.get("content", {}).values())]:
                schema = media["schema"]
                if "$ref" in schema:
                    assert comps[schema["$ref"].rsplit("/", 1)[1]].get("properties"), (method, path)


def test_live_answers_match_their_schemas(daemon: Daemon, api: Api, doc: dict[str, Any]) -> None:
    _check(doc, "GET", "/v1/info", 200, api.ok("GET", "/v1/info"))
    _check(doc, "GET", "/v1/version", 200, api.ok("GET", "/v1/version"))
    _check(doc, "GET", "/v1/images", 200, api.ok("GET", "/v1/images"))
    _check(doc, "GET", "/v1/images/{ref}", 200, api.ok("GET", "/v1/images/hello"))
    r = api("POST", "/v1/vms?wait=true", {"image": "hello", "args": ["x"], "env": {"WHO": "t"}, "fuel": 10**9,
                                "publish": [{"guest_port": 8000}], "start": True})
    assert r.status == 201, r.text
    vm = r.json()
    _check(doc, "POST", "/v1/vms", 201, vm)
    _check(doc, "GET", "/v1/vms/{ref}", 200, api.ok("GET", f"/v1/vms/{vm['id']}"))
    _check(doc, "GET", "/v1/vms", 200, api.ok("GET", "/v1/vms?all=true"))
    _check(doc, "POST", "/v1/vms/{ref}/wait", 200, api.ok("POST", f"/v1/vms/{vm['id']}/wait"))
    created = api.create("kv")
    snap = api.ok("POST", f"/v1/vms/{created['id']}/snapshots", {"name": "contract-snap"})
    _check(doc, "POST", "/v1/vms/{ref}/snapshots", 201, snap)
    _check(doc, "GET", "/v1/snapshots", 200, api.ok("GET", "/v1/snapshots"))
    restored = api.ok("POST", "/v1/snapshots/contract-snap/restore", {})
    _check(doc, "POST", "/v1/snapshots/{name}/restore", 201, restored)
    _check(doc, "POST", "/v1/snapshots/chunks/missing", 200,
           api.ok("POST", "/v1/snapshots/chunks/missing", {"chunks": ["0" * 64]}))
    if "/v1/disks" in doc["paths"]:
        disk = api.ok("POST", "/v1/disks", {"name": "contract-disk", "size": 65536})
        _check(doc, "POST", "/v1/disks", 201, disk)
        _check(doc, "GET", "/v1/disks", 200, api.ok("GET", "/v1/disks"))
        api.ok("DELETE", "/v1/disks/contract-disk")
    err = api("GET", "/v1/vms/nope-nope")
    jsonschema.validate(err.json(), {**doc["components"]["responses"]["Error"]["content"]["application/json"]
                                     ["schema"], "components": doc["components"]})
    for ref in (restored["id"], created["id"], vm["id"]):
        api.ok("DELETE", f"/v1/vms/{ref}?force=true")
    api.ok("DELETE", "/v1/snapshots/contract-snap")


def test_msgpack_and_json_answers_carry_the_same_fields(api: Api) -> None:
    as_json = api("GET", "/v1/version").json()
    as_msgpack = msgpack.unpackb(api("GET", "/v1/version", headers={"Accept": "application/msgpack"}).body)
    assert as_json == as_msgpack == contract.to_builtins(contract.convert(as_json, contract.Version))


def test_requests_are_checked_by_the_contract_and_name_the_field(api: Api) -> None:
    for body, field, code in ((b'{"image": "hello", "fuel": "lots"}', "fuel", "invalid_limit"),
                              (b'{"image": "hello", "dirs": [{"host": 1}]}', "dirs[0].host", "invalid_field"),
                              (b'{"image": "hello", "publish": [{"guest_port": 0}]}', "publish[0].guest_port",
                               "invalid_field"),
                              (b'{"image": "hello", "colour": 1}', "colour", "invalid_field"),
                              (b'[1]', None, "malformed_body"), (b'{"image": ', None, "malformed_body")):
        r = api("POST", "/v1/vms", raw=body, headers={"Content-Type": "application/json"})
        assert r.status == 400 and r.code == code, (body, r.text)
        if field:
            assert field in r.message, (body, r.message)


def test_vm_records_and_snapshot_specs_decode_through_the_contract() -> None:
    spec = {"image": "hello", "name": "a", "args": [], "env": {}, "fuel": None, "memory": None, "timeout": 5,
            "dirs": [], "disks": [{"name": "d", "mode": "cow", "rate_limiter": None}],
            "publish": [{"guest_port": 80, "host_port": 0, "host_ip": "127.0.0.1"}], "allow_egress": [],
            "auto_remove": False, "ephemeral": False, "stdin": False, "net_rate_limiter": None, "restart": "no",
            "checkpoint_interval": None}
    assert contract.to_builtins(contract.convert(spec, contract.VmSpec)) == spec
    for bad in ({**spec, "publish": [{"guest_port": 80, "host_ip": "not-an-ip"}]}, {**spec, "fuel": -1},
                {**spec, "name": "../x"}, {**spec, "extra": 1}):
        with pytest.raises(contract.ContractError):
            contract.convert(bad, contract.VmSpec)
    assert json.dumps(contract.to_builtins(contract.convert(spec, contract.VmSpec))) == json.dumps(spec)
