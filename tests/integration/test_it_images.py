"""Images end to end: import (.wasm and WAT), list, inspect, remove, idempotence, refusal of bad modules
without leftovers, the upload limit, start-function normalisation and the compiled-code cache."""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mvapi import (
    IMAGES,
    WAT_EXIT_7,
    WAT_MISSING_IMPORT,
    WAT_START_ONCE,
    Api,
    Daemon,
    wasm,
    with_custom_section,
)

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def unique_hello() -> bytes:
    """hello.wasm plus a random custom section: behaves like hello, has its own digest."""
    return with_custom_section(wasm("hello"), secrets.token_bytes(16))


def blob_dirs(d: Daemon) -> set[str]:
    return {p.name for p in (d.state_dir / "images" / "blobs").iterdir()}


def image_names(api: Api) -> set[str]:
    return {i["name"] for i in api.ok("GET", "/v1/images")["images"]}


# ------------------------------------------------------------------------------------------ import/ls/rm
def test_import_wasm_then_ls_inspect_rm(daemon: Daemon, tmp_path: Path) -> None:
    f = tmp_path / "mine.wasm"
    f.write_bytes(unique_hello())
    r = daemon.cli("image", "import", str(f), "--name", "it-mine")
    assert r.returncode == 0, r.stderr
    name, digest = r.stdout.split()
    assert name == "it-mine" and DIGEST_RE.match(digest)

    ls = daemon.cli("image", "ls")
    assert ls.returncode == 0 and "it-mine" in ls.stdout
    ls_json = json.loads(daemon.cli("--json", "image", "ls").stdout)
    assert any(i["name"] == "it-mine" and i["digest"] == digest for i in ls_json["images"])

    r = daemon.cli("image", "inspect", "it-mine")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    img = doc[0] if isinstance(doc, list) else doc
    for key in ("name", "digest", "size", "created", "entry", "args", "env", "limits", "kind", "asyncify",
                "imports", "exports"):
        assert key in img, key
    assert img["digest"] == digest and img["size"] == f.stat().st_size
    assert img["kind"] == "wasi" and img["entry"] == "_start" and "_start" in img["exports"]
    # the same image by digest and by a unique 12-hex prefix
    assert daemon.api.ok("GET", f"/v1/images/{digest}")["digest"] == digest
    assert daemon.api.ok("GET", f"/v1/images/{digest[7:19]}")["digest"] == digest

    hexd = digest.split(":")[1]
    assert hexd in blob_dirs(daemon)
    r = daemon.cli("image", "rm", "it-mine")
    assert r.returncode == 0, r.stderr
    assert "it-mine" not in image_names(daemon.api)
    assert hexd not in blob_dirs(daemon)
    assert not list((daemon.state_dir / "images" / "cache").glob(f"{hexd}.*"))
    r = daemon.api("GET", "/v1/images/it-mine")
    assert r.status == 404 and r.error["code"] == "image_not_found"
    r = daemon.cli("image", "inspect", "it-mine")
    assert r.returncode == 125 and "it-mine" in r.stderr


def test_import_wat_text_and_run_it(daemon: Daemon, tmp_path: Path) -> None:
    f = tmp_path / "seven.wat"
    f.write_text(WAT_EXIT_7)
    r = daemon.cli("image", "import", str(f), "--name", "it-seven")
    assert r.returncode == 0, r.stderr
    img = daemon.api.ok("GET", "/v1/images/it-seven")
    assert img.get("source_format", "wat") == "wat"
    assert "wasi_snapshot_preview1.proc_exit" in img["imports"]
    r = daemon.cli("run", "--rm", "it-seven")
    assert r.returncode == 7, (r.stdout, r.stderr)
    # raw API: WAT text in the body works too
    r2 = daemon.api.import_image(WAT_EXIT_7.replace("7", "9").encode(), "it-nine")
    assert r2.status == 201, r2.text
    assert daemon.cli("run", "--rm", "it-nine").returncode == 9


def test_reimport_is_idempotent(daemon: Daemon) -> None:
    api = daemon.api
    data = unique_hello()
    first = api.import_image(data, "it-idem")
    assert first.status == 201, first.text
    blobs = blob_dirs(daemon)
    compiles = api.metric("microvmd_compiles_total")
    again = api.import_image(data, "it-idem")
    assert again.status in (200, 201), again.text
    assert again.json()["digest"] == first.json()["digest"]
    # without a name: the same image again
    anon = api.import_image(data)
    assert anon.json()["digest"] == first.json()["digest"]
    assert blob_dirs(daemon) == blobs
    assert api.metric("microvmd_compiles_total") == compiles
    assert [i["digest"] for i in api.ok("GET", "/v1/images")["images"]].count(first.json()["digest"]) == 1
    api.ok("DELETE", "/v1/images/it-idem")


def test_rm_image_in_use_is_409(daemon: Daemon) -> None:
    api = daemon.api
    r = api.import_image(unique_hello(), "it-used")
    assert r.status == 201, r.text
    vm = api.create("it-used")
    r = api("DELETE", "/v1/images/it-used")
    assert r.status == 409 and r.error["code"] == "image_in_use", r.text
    rc = daemon.cli("image", "rm", "it-used")
    assert rc.returncode == 125 and "image_in_use" in rc.stderr + rc.stdout
    assert "it-used" in image_names(api)
    api.ok("DELETE", f"/v1/vms/{vm['id']}?force=true")
    assert api("DELETE", "/v1/images/it-used").status == 204
    assert "it-used" not in image_names(api)


# ------------------------------------------------------------------------------------------ bad input
BAD_MODULES: dict[str, tuple[Callable[[], bytes], list[str]]] = {
    # case: (bytes, words the error message must contain, any one of them, lower-cased)
    "not_wasm": (lambda: b"#!/bin/sh\necho this is a shell script, not wasm\n", ["not a webassembly"]),
    "png": (lambda: b"\x89PNG\r\n\x1a\n" + os.urandom(200), ["not a webassembly"]),
    "garbage_after_magic": (lambda: b"\0asm\x01\0\0\0" + b"\xff\x13garbage that is no section" * 4,
                            ["malformed", "invalid"]),
    "truncated": (lambda: wasm("hello")[: len(wasm("hello")) // 2], ["malformed", "invalid", "truncat", "end"]),
    "header_only_cut": (lambda: b"\0asm\x01\0", ["malformed", "invalid", "version", "end"]),
    "missing_import": (lambda: WAT_MISSING_IMPORT.encode(), ["nope"]),
    "bad_wat": (lambda: b"(module (func (export \"_start\") (i32.add)))", ["wat", "invalid", "type"]),
}


@pytest.mark.parametrize("case", sorted(BAD_MODULES))
def test_bad_module_is_refused_and_nothing_is_stored(daemon: Daemon, case: str) -> None:
    api = daemon.api
    make, words = BAD_MODULES[case]
    before_names = image_names(api)
    before_blobs = blob_dirs(daemon)
    r = api.import_image(make(), f"it-bad-{case}")
    assert 400 <= r.status < 500, (r.status, r.text)
    err = r.error
    msg = err["message"].lower()
    assert any(w in msg for w in words), err
    if case == "missing_import":
        assert "env" in msg and err["code"] == "unsupported_import", err
    assert image_names(api) == before_names
    assert blob_dirs(daemon) == before_blobs
    assert not list((daemon.state_dir / "images" / "tmp").iterdir())
    assert api("GET", f"/v1/images/it-bad-{case}").status == 404


def test_bad_module_through_the_client(daemon: Daemon, tmp_path: Path) -> None:
    f = tmp_path / "trunc.wasm"
    f.write_bytes(wasm("spin")[:3000])
    r = daemon.cli("image", "import", str(f), "--name", "it-trunc")
    assert r.returncode == 125
    assert "malformed" in r.stderr.lower() or "invalid" in r.stderr.lower(), r.stderr
    r = daemon.cli("run", "--rm", str(f))
    assert r.returncode == 125, r.stderr
    f2 = tmp_path / "nope.wat"
    f2.write_text(WAT_MISSING_IMPORT)
    r = daemon.cli("run", "--rm", str(f2))
    assert r.returncode == 125 and "nope" in r.stderr, r.stderr


def test_upload_above_the_limit_is_413(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    cfg = tmp_path / "microvmd.toml"
    cfg.write_text('[daemon]\nupload_limit = "64KiB"\n')
    d = make_daemon("--config", str(cfg))
    assert d.api.ok("GET", "/v1/info")["limits"]["upload"] == 64 * 1024
    big = wasm("hello")
    assert len(big) > 64 * 1024
    r = d.api.import_image(big, "toobig")
    assert r.status == 413, (r.status, r.text)
    assert r.error["code"] == "payload_too_large"
    assert image_names(d.api) == set()
    assert not blob_dirs(d)
    f = tmp_path / "hello.wasm"
    f.write_bytes(big)
    c = d.cli("image", "import", str(f))
    assert c.returncode == 125 and c.stderr.strip(), c.stderr
    # a body streamed without Content-Length is cut off at the limit too
    r = d.api("POST", "/v1/images?name=chunked", raw=iter([big[i:i + 8192] for i in range(0, len(big), 8192)]),
              headers={"Content-Type": "application/wasm"})
    assert r.status == 413, (r.status, r.text)
    # small modules still fit, and the daemon is fine
    assert d.api.import_image(WAT_EXIT_7.encode(), "small").status == 201
    assert d.cli("run", "--rm", "small").returncode == 7


# ------------------------------------------------------------------------------------------ normalisation
def test_start_function_runs_exactly_once_before_the_entry(daemon: Daemon, tmp_path: Path) -> None:
    f = tmp_path / "start.wat"
    f.write_text(WAT_START_ONCE)
    r = daemon.cli("run", "--rm", str(f))
    assert r.returncode == 42, (r.returncode, r.stderr)  # 2: start never ran, 82: ran twice
    # create (instantiates) and start later: still exactly once
    api = daemon.api
    img = api.import_image(WAT_START_ONCE.encode(), "it-start-once").json()
    assert img["boot"], img  # the start function became a boot step
    vm = api.create("it-start-once")
    api.ok("POST", f"/v1/vms/{vm['id']}/start")
    assert api.wait(vm["id"])["code"] == 42


# ------------------------------------------------------------------------------------------ compiled cache
def test_second_vm_of_an_image_does_not_compile(daemon: Daemon) -> None:
    api = daemon.api
    assert api.import_image(unique_hello(), "it-cache").status == 201
    compiles = api.metric("microvmd_compiles_total")
    for code in ("3", "4"):
        vm = api.create("it-cache", code, start=True)
        assert api.wait(vm["id"])["code"] == int(code)
    assert api.metric("microvmd_compiles_total") == compiles


def test_compiled_cache_survives_a_restart(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon()
    assert d.api.import_image(wasm("hello"), "hello").status == 201
    assert d.api.metric("microvmd_compiles_total") == 1
    cache = list((d.state_dir / "images" / "cache").glob("*.cwasm"))
    assert len(cache) == 1
    assert d.stop(signal.SIGTERM) == 0

    d.start()
    assert d.api.metric("microvmd_compiles_total") == 0
    vm = d.api.create("hello", "5", start=True)
    assert d.api.wait(vm["id"])["code"] == 5
    assert d.api.metric("microvmd_compiles_total") == 0, "the first VM after a restart compiled again"

    # control: without the cache file the same steps do compile (the metric can see it)
    assert d.stop(signal.SIGTERM) == 0
    for f in cache:
        f.unlink()
    d.start()
    vm = d.api.create("hello", "6", start=True)
    assert d.api.wait(vm["id"])["code"] == 6
    assert d.api.metric("microvmd_compiles_total") == 1


def test_a_background_rewrite_is_listed_until_its_name_has_moved(make_daemon: Callable[..., Daemon]) -> None:
    """``GET /v1/images``'s ``importing`` lists a background rewrite (--import-images) until the image's name
    points at the rewritten module: a client that waits for the list to empty finds every sample image
    snapshottable (it emptied while the rewritten module was still being compiled and named)."""
    d = make_daemon("--import-images", str(IMAGES))
    deadline = time.monotonic() + 300
    while d.api.ok("GET", "/v1/images")["importing"]:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    pending = [(name, img["snapshot_note"]) for img in d.api.ok("GET", "/v1/images")["images"]
               for name in img["names"] if "in the background" in (img.get("snapshot_note") or "")]
    assert not pending, pending
