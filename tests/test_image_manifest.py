"""An image's manifest sets defaults (entry, args, env, limits) that its VMs use unless they set their own."""
from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from mvapi import IMAGES, Daemon


@pytest.fixture(scope="module")
def d() -> Iterator[Daemon]:
    with Daemon.fresh("mvd-man-") as daemon:
        yield daemon


def test_defaults_apply_and_vm_options_win(d: Daemon) -> None:
    r = d.cli("image", "import", str(IMAGES / "hello" / "hello.wasm"), "--name", "hi", "--arg", "9",
              "--env", "WHO=manifest", "--memory", "2MiB")
    assert r.returncode == 0, r.stderr
    r = d.cli("run", "--rm", "hi")
    assert r.returncode == 9 and "WHO=manifest" in r.stdout, (r.returncode, r.stdout)
    r = d.cli("run", "--rm", "--env", "WHO=vm", "hi", "4")
    assert r.returncode == 4 and "WHO=vm" in r.stdout
    img = json.loads(d.cli("--json", "image", "inspect", "hi").stdout)
    assert img["limits"] == {"memory": 2 * 1024 * 1024} and img["args"] == ["9"]
    vm = d.api.create("hi")
    assert vm["limits"]["memory"] == 2 * 1024 * 1024


def test_fuel_default_from_manifest(d: Daemon) -> None:
    assert d.cli("image", "import", str(IMAGES / "spin" / "spin.wasm"), "--name", "sp", "--fuel", "1000").returncode == 0
    r = d.cli("run", "--rm", "sp", "1000000")
    assert r.returncode == 137 and "out_of_fuel" in r.stderr


def test_bad_manifest_is_refused_and_nothing_changes(d: Daemon) -> None:
    before = d.api.ok("GET", "/v1/images")
    r = d.cli("image", "import", str(IMAGES / "hello" / "hello.wasm"), "--name", "bad", "--entry", "nope")
    assert r.returncode == 125 and "nope" in r.stderr
    assert d.api.ok("GET", "/v1/images") == before
    for body in ({"limits": {"fuel": -1}}, {"args": "x"}, {"entry": "nope"}, {"colour": 1}):
        resp = d.api("PATCH", "/v1/images/hi", body)
        assert resp.status == 400, (body, resp.status)
