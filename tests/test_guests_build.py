"""The sample guests in images/ and the guest SDK: committed modules are valid and rebuildable.

Fast tests check the committed ``images/*/*.wasm`` with wasmtime only (no toolchain needed); the
rebuild test runs ``scripts/build-guests --check`` in a temporary copy and skips without clang.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import wasmtime

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"
FETCHED = {d.name for d in IMAGES.iterdir() if (d / "SHA256SUMS").is_file()}  # scripts/fetch-interpreters
NOT_GUESTS = FETCHED | {"functions"}  # images/functions: handler sources for `fn deploy --python/--js`
WASMS = sorted(p for p in IMAGES.glob("*/*.wasm") if p.parent.name not in FETCHED)
SDK_GUESTS = sorted(d.name for d in IMAGES.iterdir() if (d / "Makefile").is_file()
                    and "mvcc" in (d / "Makefile").read_text())
PLAIN_GUESTS = sorted(d.name for d in IMAGES.iterdir() if (d / "Makefile").is_file()
                      and d.name not in SDK_GUESTS)
ASYNCIFY_EXPORTS = {"asyncify_start_unwind", "asyncify_stop_unwind", "asyncify_start_rewind",
                    "asyncify_stop_rewind", "asyncify_get_state"}


@pytest.fixture(scope="module")
def engine() -> wasmtime.Engine:
    return wasmtime.Engine()


def _module(engine: wasmtime.Engine, name: str) -> wasmtime.Module:
    return wasmtime.Module(engine, (IMAGES / name / f"{name}.wasm").read_bytes())


def test_expected_guests_present() -> None:
    assert {"hello", "spin", "grow"} <= set(PLAIN_GUESTS)
    assert {"kv", "echo", "fetch", "counter"} <= set(SDK_GUESTS)
    for d in IMAGES.iterdir():
        if d.is_dir() and d.name not in NOT_GUESTS:
            for f in (f"{d.name}.c", "Makefile", f"{d.name}.wasm"):
                assert (d / f).is_file(), f"images/{d.name}/{f} is missing"


@pytest.mark.parametrize("path", WASMS, ids=[p.parent.name for p in WASMS])
def test_committed_module_validates(engine: wasmtime.Engine, path: Path) -> None:
    wasmtime.Module(engine, path.read_bytes())  # raises on an invalid module


@pytest.mark.parametrize("name", PLAIN_GUESTS)
def test_plain_guest_is_not_an_sdk_guest(engine: wasmtime.Engine, name: str) -> None:
    exports = {e.name for e in _module(engine, name).exports}
    assert "_start" in exports
    assert "microvm_abi_version" not in exports
    assert not any(imp.module.startswith("microvm") for imp in _module(engine, name).imports)


@pytest.mark.parametrize("name", SDK_GUESTS)
def test_sdk_guest_exports(engine: wasmtime.Engine, name: str) -> None:
    mod = _module(engine, name)
    exports = {e.name: e.type for e in mod.exports}
    for want in ("_start", "memory", "microvm_abi_version", "microvm_asyncify_data", "__stack_pointer",
                 *ASYNCIFY_EXPORTS):
        assert want in exports, f"{name}.wasm lacks export {want}"
    sp = exports["__stack_pointer"]
    assert isinstance(sp, wasmtime.GlobalType) and sp.mutable
    assert {imp.module for imp in mod.imports} <= {"wasi_snapshot_preview1", "microvm", "microvm_blk", "microvm_fn",
                                                   "microvm_net"}


@pytest.mark.parametrize("name", SDK_GUESTS)
def test_sdk_guest_abi_version_and_asyncify_header(engine: wasmtime.Engine, name: str) -> None:
    mod = _module(engine, name)
    store = wasmtime.Store(engine)
    store.set_wasi(wasmtime.WasiConfig())
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    linker.define_unknown_imports_as_traps(mod)
    inst = linker.instantiate(store, mod)
    ex = inst.exports(store)
    assert ex["microvm_abi_version"](store) == 1
    for _ in range(2):  # every call (re)initialises the header
        addr = ex["microvm_asyncify_data"](store)
        assert addr % 16 == 0
        cur, end = struct.unpack("<ii", ex["memory"].read(store, addr, addr + 8))
        assert (cur, end) == (addr + 8, addr + 64 * 1024)
        ex["memory"].write(store, b"\0" * 8, addr)


def _run(engine: wasmtime.Engine, name: str, args: list[str], env: dict[str, str],
         tmp_path: Path) -> tuple[int, str]:
    store = wasmtime.Store(engine)
    cfg = wasmtime.WasiConfig()
    cfg.argv = [name, *args]
    cfg.env = list(env.items())
    out = tmp_path / f"{name}.out"
    cfg.stdout_file = str(out)
    store.set_wasi(cfg)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    inst = linker.instantiate(store, _module(engine, name))
    code = 0
    try:
        inst.exports(store)["_start"](store)
    except wasmtime.ExitTrap as e:
        code = e.code
    return code, out.read_text()


def test_hello_runs(engine: wasmtime.Engine, tmp_path: Path) -> None:
    code, out = _run(engine, "hello", ["3", "two words"], {"WHO": "tests"}, tmp_path)
    assert code == 3
    assert out.splitlines() == ["Hello from microvmd!", "arg[1]=3", "arg[2]=two words", "WHO=tests"]
    code, out = _run(engine, "hello", [], {}, tmp_path)
    assert code == 0 and "Hello from microvmd!" in out and "WHO" in out.splitlines()[-1]


def test_spin_checksum_is_deterministic(engine: wasmtime.Engine, tmp_path: Path) -> None:
    def checksum(n: int) -> str:
        code, out = _run(engine, "spin", [str(n)], {}, tmp_path)
        assert code == 0
        last = out.splitlines()[-1]
        assert last.startswith("checksum ")
        return last.split()[1]
    assert checksum(1000) == checksum(1000)
    assert len({checksum(1000), checksum(1001), checksum(0)}) == 3


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_build_guests_check(tmp_path: Path) -> None:
    tools = (os.environ.get("CC", "clang"), os.environ.get("WASM_OPT", "wasm-opt"), "make")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"guest toolchain not installed ({', '.join(missing)} missing; run `make deps` or "
                    "apt-get install clang lld wasi-libc libclang-rt-dev-wasm32 binaryen)")
    before = _tree_digest(IMAGES)
    copy = tmp_path / "repo"
    for sub in ("images", "guest-sdk", "scripts"):
        shutil.copytree(ROOT / sub, copy / sub, symlinks=True)
    proc = subprocess.run([str(copy / "scripts" / "build-guests"), "--check"], cwd=copy,
                          env={**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"build-guests --check failed:\n{proc.stdout}\n{proc.stderr}"
    assert "check passed" in proc.stderr
    assert _tree_digest(IMAGES) == before, "the working tree was modified"
