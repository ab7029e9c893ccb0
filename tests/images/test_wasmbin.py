"""Tests for microvmd.images.wasmbin (WebAssembly binary reader / snapshot normalizer)."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
import wasmtime

from microvmd.images import wasmbin as wb
from microvmd.images.wasmbin import WasmFormatError

REPO = Path(__file__).resolve().parents[2]
P = "__microvm_"

MAIN_WAT = """
(module
  (type $cb (func (param i32 i64) (result f32)))
  (import "env" "cb" (func $cb (type $cb)))
  (import "env" "ig" (global $ig (mut i32)))
  (global $counter (mut i32) (i32.const 0))
  (global $k i32 (i32.const 42))
  (global $big (mut i64) (i64.const -7))
  (global (export "exported_mut") (mut f64) (f64.const 1.5))
  (memory 1 4)
  (table 2 funcref)
  (func $init
    (global.set $counter (i32.add (global.get $counter) (i32.const 99)))
    (i32.store (i32.const 16) (i32.const 1234)))
  (func (export "get_counter") (result i32) (global.get $counter))
  (func (export "peek") (result i32) (i32.load (i32.const 16)))
  (start $init))
"""


def wat(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


def instantiate(binary: bytes) -> tuple[wasmtime.Store, dict[str, object]]:
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    module = wasmtime.Module(engine, binary)
    imports: list[wasmtime.AsExtern] = []
    for imp in module.imports:
        if imp.name == "cb":
            sig = wasmtime.FuncType([wasmtime.ValType.i32(), wasmtime.ValType.i64()], [wasmtime.ValType.f32()])
            imports.append(wasmtime.Func(store, sig, lambda a, b: 0.0))
        elif imp.name == "ig":
            gt = wasmtime.GlobalType(wasmtime.ValType.i32(), True)
            imports.append(wasmtime.Global(store, gt, wasmtime.Val.i32(5)))
        else:
            raise AssertionError(f"unexpected import {imp.module}.{imp.name}")
    instance = wasmtime.Instance(store, module, imports)
    return store, dict(instance.exports(store).items())


def assert_only_format_errors(data: bytes) -> None:
    """parse/normalize may succeed or raise WasmFormatError, nothing else."""
    for fn in (wb.parse, wb.normalize):
        try:
            fn(data)
        except WasmFormatError as exc:
            assert "offset" in str(exc)


def validate(binary: bytes) -> None:
    wasmtime.Module.validate(wasmtime.Engine(), binary)


# --------------------------------------------------------------------------- LEB128

@pytest.mark.parametrize(
    ("reader", "encoded", "value"),
    [
        (wb.read_u32, b"\x00", 0),
        (wb.read_u32, b"\xe5\x8e\x26", 624485),
        (wb.read_u32, b"\x80\x00", 0),  # non-canonical but within limits
        (wb.read_u32, b"\xff\xff\xff\xff\x0f", 0xFFFFFFFF),
        (wb.read_s32, b"\x7f", -1),
        (wb.read_s32, b"\x80\x80\x80\x80\x78", -(2**31)),
        (wb.read_s32, b"\xff\xff\xff\xff\x07", 2**31 - 1),
        (wb.read_u64, b"\xff" * 9 + b"\x01", 2**64 - 1),
        (wb.read_s64, b"\x80" * 9 + b"\x7f", -(2**63)),
        (wb.read_s64, b"\xc0\xbb\x78", -123456),
    ],
)
def test_leb_decode(reader, encoded: bytes, value: int) -> None:  # type: ignore[no-untyped-def]
    assert reader(encoded + b"\xaa", 0) == (value, len(encoded))


@pytest.mark.parametrize(
    ("reader", "encoded"),
    [
        (wb.read_u32, b"\xff\xff\xff\xff\x1f"),  # bit 32 set
        (wb.read_u32, b"\x80\x80\x80\x80\x80\x00"),  # 6 bytes
        (wb.read_u32, b"\x80\x80"),  # truncated
        (wb.read_u32, b""),
        (wb.read_s32, b"\x80\x80\x80\x80\x08"),  # +2**31
        (wb.read_s32, b"\xff\xff\xff\xff\x77"),  # bad sign padding
        (wb.read_u64, b"\xff" * 9 + b"\x02"),
        (wb.read_u64, b"\x80" * 10 + b"\x00"),
        (wb.read_s64, b"\x80" * 9 + b"\x01"),
    ],
)
def test_leb_decode_rejects(reader, encoded: bytes) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(WasmFormatError, match="offset 0"):
        reader(encoded, 0)


def test_leb_roundtrip() -> None:
    rng = random.Random(1234)
    cases = [
        (wb.encode_u32, wb.read_u32, 0, 2**32 - 1),
        (wb.encode_s32, wb.read_s32, -(2**31), 2**31 - 1),
        (wb.encode_u64, wb.read_u64, 0, 2**64 - 1),
        (wb.encode_s64, wb.read_s64, -(2**63), 2**63 - 1),
    ]
    for enc, dec, lo, hi in cases:
        values = [lo, hi, 0, 63, 64, -64, -65, 127, 128] + [rng.randint(lo, hi) for _ in range(300)]
        for v in (v for v in values if lo <= v <= hi):
            assert dec(enc(v), 0) == (v, len(enc(v)))
        for bad in (lo - 1, hi + 1):
            with pytest.raises(ValueError):
                enc(bad)
    assert wb.encode_u32(624485) == b"\xe5\x8e\x26"
    assert wb.encode_s32(-1) == b"\x7f"
    assert wb.encode_s32(64) == b"\xc0\x00"


# --------------------------------------------------------------------------- parse

def test_parse_main_module() -> None:
    info = wb.parse(wat(MAIN_WAT))
    sig = wb.FuncType(("i32", "i64"), ("f32",))
    assert info.imports == (
        wb.Import("env", "cb", "func", sig),
        wb.Import("env", "ig", "global", wb.GlobalType("i32", True)),
    )
    assert info.imported_count("func") == 1 and info.defined_count("func") == 3
    assert info.imported_count("global") == 1 and info.defined_count("global") == 4
    assert [(g.index, g.type.valtype, g.type.mutable) for g in info.globals] == [
        (1, "i32", True), (2, "i32", False), (3, "i64", True), (4, "f64", True)]
    assert info.globals[1].init == b"\x41\x2a\x0b"  # i32.const 42; end
    assert info.memories == (wb.MemoryType(1, 4, False, False),)
    assert info.tables == (wb.TableType("funcref", 2, None),)
    assert info.start == 1  # imported cb is func 0
    assert {e.name: (e.kind, e.index) for e in info.exports} == {
        "exported_mut": ("global", 4), "get_counter": ("func", 2), "peek": ("func", 3)}
    assert info.types[0] == sig
    assert info.data_count is None


def test_parse_memory_and_table_flavours() -> None:
    info = wb.parse(wat("""(module
        (import "e" "m" (memory 2 10 shared))
        (memory i64 3)
        (table 1 5 externref)
        (tag $t (param i32)))"""))
    assert info.imports[0].type == wb.MemoryType(2, 10, memory64=False, shared=True)
    assert info.memories == (wb.MemoryType(3, None, memory64=True, shared=False),)
    assert info.tables == (wb.TableType("externref", 1, 5),)
    assert info.tags == (wb.TagType(0, wb.FuncType(("i32",), ())),)


# --------------------------------------------------------------------------- normalize

def test_start_ran_in_original() -> None:
    store, exports = instantiate(wat(MAIN_WAT))
    assert exports["get_counter"](store) == 99  # type: ignore[operator]
    assert exports["peek"](store) == 1234  # type: ignore[operator]


def test_normalize_main_module() -> None:
    original = wat(MAIN_WAT)
    out, report = wb.normalize(original)
    validate(out)
    assert report.changed
    assert report.global_names == {1: f"{P}global_1", 3: f"{P}global_3", 4: "exported_mut"}
    assert [(g.valtype, g.mutable) for g in report.globals] == [("i32", True), ("i64", True), ("f64", True)]
    assert report.memories == (f"{P}memory_0",)
    assert report.tables == (f"{P}table_0",)
    assert report.start == f"{P}start"

    info = wb.parse(out)
    assert info.start is None
    assert all(s.id != 8 for s in info.sections)
    # everything except the export section and the dropped start section is byte-identical
    kept = [(s.id, s.custom_name) for s in wb.parse(original).sections if s.id not in (7, 8)]
    assert [(s.id, s.custom_name) for s in info.sections if s.id != 7] == kept

    store, exports = instantiate(out)
    assert set(exports) >= {f"{P}global_1", f"{P}global_3", "exported_mut", f"{P}memory_0",
                            f"{P}table_0", f"{P}start"}
    assert f"{P}global_2" not in exports  # immutable globals are left alone
    counter = exports[f"{P}global_1"]
    assert isinstance(counter, wasmtime.Global)
    # the start function did not run at instantiation ...
    assert counter.value(store) == 0
    assert exports["peek"](store) == 0  # type: ignore[operator]
    big = exports[f"{P}global_3"]
    assert isinstance(big, wasmtime.Global) and big.value(store) == -7
    mem = exports[f"{P}memory_0"]
    assert isinstance(mem, wasmtime.Memory) and mem.size(store) == 1
    table = exports[f"{P}table_0"]
    assert isinstance(table, wasmtime.Table) and table.size(store) == 2
    # ... and calling the exported start does what the start section did
    exports[f"{P}start"](store)  # type: ignore[operator]
    assert counter.value(store) == 99
    assert exports["get_counter"](store) == 99  # type: ignore[operator]
    assert exports["peek"](store) == 1234  # type: ignore[operator]
    counter.set_value(store, wasmtime.Val.i32(7))
    assert exports["get_counter"](store) == 7  # type: ignore[operator]


def test_normalize_idempotent() -> None:
    once, first = wb.normalize(wat(MAIN_WAT))
    twice, second = wb.normalize(once)
    assert twice == once
    assert not second.changed
    assert second.global_names == first.global_names
    assert (second.memories, second.tables, second.start) == (first.memories, first.tables, first.start)


def test_normalize_without_export_section() -> None:
    src = wat("""(module
        (global (mut i32) (i32.const 5))
        (memory 1)
        (func $s (global.set 0 (i32.const 6)))
        (start $s)
        (data (i32.const 0) "hi"))""")
    assert not any(s.id == 7 for s in wb.parse(src).sections)
    out, report = wb.normalize(src)
    validate(out)
    ids = [s.id for s in wb.parse(out).sections if s.id]
    assert ids == [1, 3, 5, 6, 7, 10, 11]
    assert report.global_names == {0: f"{P}global_0"} and report.start == f"{P}start"
    store, exports = instantiate(out)
    g = exports[f"{P}global_0"]
    assert isinstance(g, wasmtime.Global) and g.value(store) == 5
    exports[f"{P}start"](store)  # type: ignore[operator]
    assert g.value(store) == 6
    assert wb.normalize(out)[0] == out


def test_normalize_export_section_goes_before_trailing_custom_sections() -> None:
    src = wat("(module (memory 1))") + b"\x00\x05\x04name"  # empty custom "name" section
    out, report = wb.normalize(src)
    validate(out)
    assert [s.id for s in wb.parse(out).sections] == [5, 7, 0]
    assert report.memories == (f"{P}memory_0",)


def test_normalize_export_section_first_when_no_earlier_sections() -> None:
    src = wat('(module (func (export "f")))')
    out, report = wb.normalize(src)
    assert out == src and not report.changed
    # a module consisting only of a start section
    src = wat("(module (func $s) (start $s))")
    out, report = wb.normalize(src)
    validate(out)
    assert report.start == f"{P}start"


def test_normalize_noop_module() -> None:
    src = wat('(module (global i32 (i32.const 1)) (memory (export "mem") 1))')
    out, report = wb.normalize(src)
    assert out == src
    assert report == wb.NormalizeReport((), ("mem",), (), None, False)


def test_normalize_skips_imported_state_and_counts_index_space() -> None:
    src = wat("""(module
        (import "e" "g" (global (mut i32)))
        (import "e" "m" (memory 1))
        (import "e" "t" (table 1 funcref))
        (global (mut i32) (i32.const 0))
        (table 3 funcref))""")
    out, report = wb.normalize(src)
    validate(out)
    assert report.global_names == {1: f"{P}global_1"}
    assert report.memories == ()
    assert report.tables == (f"{P}table_1",)


def test_normalize_custom_prefix() -> None:
    out, report = wb.normalize(wat(MAIN_WAT), prefix="snap$")
    validate(out)
    assert report.start == "snap$start" and report.memories == ("snap$memory_0",)


@pytest.mark.parametrize(
    "text",
    [
        f'(module (global (mut i32) (i32.const 0)) (func (export "{P}global_0")))',
        f'(module (memory 1) (global (export "{P}memory_0") i32 (i32.const 0)))',
        f'(module (func $s) (func $t) (export "{P}start" (func $t)) (start $s))',
    ],
)
def test_normalize_reserved_name_collision(text: str) -> None:
    with pytest.raises(WasmFormatError, match="reserved export name"):
        wb.normalize(wat(text))


# --------------------------------------------------------------------------- C modules

def _clang_module(tmp_path: Path) -> bytes:
    if shutil.which("clang") is None:
        pytest.skip("clang not installed")
    src = tmp_path / "guest.c"
    src.write_text("""
        #include <string.h>
        int counter;
        __attribute__((export_name("work"))) int work(int n) {
            volatile char buf[256];
            memset((char *)buf, n, sizeof buf);
            counter += buf[n & 255];
            return counter;
        }
    """)
    out = tmp_path / "guest.wasm"
    cmd = ["clang", "--target=wasm32-wasi", "--sysroot=/usr", "-O2", "-nostartfiles",
           "-Wl,--no-entry", str(src), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"clang cannot build wasm32-wasi modules: {proc.stderr[-500:]}")
    return out.read_bytes()


def test_c_module_stack_pointer(tmp_path: Path) -> None:
    original = _clang_module(tmp_path)
    info = wb.parse(original)
    assert any(s.custom_name == "producers" for s in info.sections)
    out, report = wb.normalize(original)
    validate(out)
    assert report.changed and report.start is None
    (sp_export,) = report.globals
    assert (sp_export.valtype, sp_export.mutable) == ("i32", True)
    assert report.memories == ("memory",)  # already exported by the toolchain

    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    instance = wasmtime.Instance(store, wasmtime.Module(engine, out), [])
    exports = instance.exports(store)
    sp, memory, work = exports[sp_export.name], exports["memory"], exports["work"]
    assert isinstance(sp, wasmtime.Global) and isinstance(memory, wasmtime.Memory)
    value = sp.value(store)
    assert isinstance(value, int)
    assert 1024 <= value <= memory.data_len(store)
    assert value % 16 == 0
    assert work(store, 3) == 3  # type: ignore[operator]
    assert sp.value(store) == value  # the stack is balanced after the call
    assert wb.normalize(out) == (out, wb.NormalizeReport(report.globals, report.memories, (), None, False))


COMMITTED = sorted(REPO.glob("images/*/*.wasm"))


@pytest.mark.parametrize("path", COMMITTED, ids=[p.parent.name for p in COMMITTED])
def test_committed_images_normalize(path: Path) -> None:
    data = path.read_bytes()
    wb.parse(data)
    out, report = wb.normalize(data)
    validate(out)
    assert wb.normalize(out)[0] == out
    assert all(g.mutable for g in report.globals)


# --------------------------------------------------------------------------- hostile input

def test_every_prefix_is_rejected_cleanly() -> None:
    data, _ = wb.normalize(wat(MAIN_WAT))
    for n in range(len(data)):
        assert_only_format_errors(data[:n])
    with pytest.raises(WasmFormatError):
        wb.parse(data[:-1])


def _module(*sections: tuple[int, bytes]) -> bytes:
    return b"\0asm\1\0\0\0" + b"".join(bytes([i]) + wb.encode_u32(len(p)) + p for i, p in sections)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "shorter than"),
        (b"\0asm\1\0\0", "shorter than"),
        (b"\0wasm\1\0\0\0", "bad magic"),
        (b"\0asm\2\0\0\0", "unsupported version"),
        (b"\0asm\x0d\0\1\0", "component"),
        (b"\0asm\1\0\0\0\x01\x80\x80\x80\x80\x80\x00", "too long"),
        (b"\0asm\1\0\0\0\x01\x80\x80\x80\x80\x10", "out of range"),
        (b"\0asm\1\0\0\0\x01\x05\x01\x60", "runs past the end"),
        (b"\0asm\1\0\0\0\x0e\x00", "unknown section id 14"),
        (_module((1, b"\xff\xff\xff\xff\x0f")), "type count 4294967295 exceeds"),
        (_module((1, b"\x01\x60\xff\xff\xff\xff\x0f")), "param count"),
        (_module((1, b"\x01\x5f\x00")), "unsupported type form"),
        (_module((1, b"\x01\x60\x01\x40\x00")), "invalid value type 0x40"),
        (_module((2, b"\x01\x01a\xf0\xff\xff\xff\x0fx")), "name length"),
        (_module((2, b"\x01\x01\xff\x01a\x00\x00")), "UTF-8"),
        (_module((2, b"\x01\x01a\x01b\x00\x00")), "type index 0 out of range"),
        (_module((2, b"\x01\x01a\x01b\x07\x00")), "invalid import kind"),
        (_module((5, b"\x01\x08\x00")), "invalid limits flags"),
        (_module((5, b"\x01\x01\x05\x01")), "maximum 1 below minimum 5"),
        (_module((5, b"\x01\x02\x01")), "shared memory must have a maximum"),
        (_module((6, b"\x01\x7f\x02\x41\x00\x0b")), "mutability"),
        (_module((6, b"\x01\x7f\x00\x41\x00")), "unexpected end"),
        (_module((6, b"\x01\x7f\x00\x10\x00\x0b")), "unsupported opcode 0x10"),
        (_module((5, b"\x01\x00\x01"), (5, b"\x00")), "out of order or duplicated"),
        (_module((6, b"\x00"), (5, b"\x00")), "out of order"),
        (_module((5, b"\x00\x00")), "trailing bytes"),
        (_module((7, b"\x01\x01m\x02\x00")), "memory index 0 out of range"),
        (_module((5, b"\x01\x00\x01"), (7, b"\x02\x01m\x02\x00\x01m\x02\x00")), "duplicate export name"),
        (_module((7, b"\x01\x01m\x09\x00")), "invalid export kind"),
        (_module((8, b"\x00")), "start function index 0 out of range"),
        (_module((1, b"\x01\x60\x00\x00"), (3, b"\x01\x00")), "1 functions declared but 0 bodies"),
        (_module((12, b"\x02")), "data count 2"),
        (_module((0, b"\x05ab")), "name length 5 exceeds the 2 bytes left"),
        (_module((6, b"\x01\x7d\x00\x43\x00\x00")), "unexpected end of section: 4 bytes needed, 2 left"),
    ],
)
def test_malformed_modules(data: bytes, message: str) -> None:
    with pytest.raises(WasmFormatError, match=message) as info:
        wb.parse(data)
    assert "at offset" in str(info.value)
    with pytest.raises(WasmFormatError):
        wb.normalize(data)


def test_error_offsets_point_at_the_problem() -> None:
    data = _module((1, b"\x01\x60\x00\x00"), (5, b"\x01\x09\x00"))
    with pytest.raises(WasmFormatError) as info:
        wb.parse(data)
    assert info.value.offset == data.index(b"\x09")


def test_huge_count_is_rejected_quickly() -> None:
    data = _module((2, b"\xff\xff\xff\xff\x0f" + b"\x00" * 64))
    with pytest.raises(WasmFormatError, match="import count"):
        wb.parse(data)


def _fuzz_seeds(tmp_path: Path) -> list[bytes]:
    seeds = [wat(MAIN_WAT), wb.normalize(wat(MAIN_WAT))[0],
             wat('(module (import "e" "m" (memory 1 2 shared)) (table 1 externref) (tag (param i64))'
                 ' (global (mut v128) (v128.const i64x2 1 2)) (global (mut f32) (f32.const 1))'
                 ' (global funcref (ref.func 0)) (func) (elem declare func 0) (data "x"))')]
    seeds += [p.read_bytes() for p in COMMITTED[:2]]
    if shutil.which("clang"):
        try:
            seeds.append(_clang_module(tmp_path))
        except pytest.skip.Exception:
            pass
    return seeds


def test_fuzz_byte_flips(tmp_path: Path) -> None:
    rng = random.Random(0xC0FFEE)
    engine = wasmtime.Engine()
    for seed in _fuzz_seeds(tmp_path):
        for _ in range(400):
            data = bytearray(seed)
            for _ in range(rng.randint(1, 4)):
                # bias towards the module-level sections at the front
                pos = rng.randrange(min(len(data), 200) if rng.random() < 0.8 else len(data))
                data[pos] = rng.randrange(256)
            mutated = bytes(data)
            try:
                out, _ = wb.normalize(mutated)
            except WasmFormatError:
                continue
            try:
                wasmtime.Module.validate(engine, mutated)
            except wasmtime.WasmtimeError:
                continue
            wasmtime.Module.validate(engine, out)  # normalizing a valid module keeps it valid


def test_fuzz_random_sections() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 24)))
        sid = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 13])
        assert_only_format_errors(_module((sid, body)))
        assert_only_format_errors(b"\0asm\1\0\0\0" + body)


# ----------------------------------------------------------------------------------------------- bake
BAKE_WAT = """(module
  (memory (export "memory") 1 8)
  (global $g (export "g") (mut i32) (i32.const 7))
  (global $h (export "h") (mut i64) (i64.const 1))
  (global $k (export "k") i32 (i32.const 5))
  (data (i32.const 16) "module data")
  (func (export "_start")))
"""


def test_bake_puts_the_snapshot_memory_and_globals_in_the_module() -> None:
    data = bytes(wasmtime.wat2wasm(BAKE_WAT))
    info = wb.parse(data)
    idx = {e.name: e.index for e in info.exports}
    baked = wb.bake(data, 3, [(65536, b"snap" * 10), (100, b"x")],
                         {idx["g"]: ("i32", -2), idx["h"]: ("i64", 1 << 40)})
    store = wasmtime.Store()
    inst = wasmtime.Instance(store, wasmtime.Module(store.engine, baked), [])
    ex = inst.exports(store)
    mem = ex["memory"]
    assert mem.size(store) == 3  # the snapshot's size, its maximum kept
    assert mem.type(store).limits.max == 8
    assert mem.read(store, 65536, 65576) == b"snap" * 10 and mem.read(store, 100, 101) == b"x"
    assert mem.read(store, 16, 27) == b"\0" * 11  # the module's own data is not laid over the snapshot's
    assert (ex["g"].value(store), ex["h"].value(store), ex["k"].value(store)) == (-2, 1 << 40, 5)


def test_bake_keeps_segment_indices_when_code_can_name_them() -> None:
    """With a data count section, memory.init in the code still reads the module's own segment 0."""
    wat = """(module
      (memory (export "memory") 1)
      (data $d "abc")
      (func (export "copy") (memory.init $d (i32.const 200) (i32.const 0) (i32.const 3))))"""
    data = bytes(wasmtime.wat2wasm(wat))
    assert wb.parse(data).data_count == 1
    baked = wb.bake(data, 1, [(0, b"zz")], {})
    assert wb.parse(baked).data_count == 2
    store = wasmtime.Store()
    ex = wasmtime.Instance(store, wasmtime.Module(store.engine, baked), []).exports(store)
    ex["copy"](store)
    assert ex["memory"].read(store, 0, 2) == b"zz" and ex["memory"].read(store, 200, 203) == b"abc"


def test_bake_refuses_what_it_cannot_express() -> None:
    data = bytes(wasmtime.wat2wasm(BAKE_WAT))
    g = next(e.index for e in wb.parse(data).exports if e.name == "g")
    with pytest.raises(ValueError, match="maximum"):
        wb.bake(data, 9, [], {})
    with pytest.raises(ValueError, match="not i64"):
        wb.bake(data, 1, [], {g: ("i64", 1)})
    imported = bytes(wasmtime.wat2wasm('(module (import "e" "m" (memory 1)))'))
    with pytest.raises(ValueError, match="defines its one memory"):
        wb.bake(imported, 1, [], {})


def test_bake_drops_the_start_function() -> None:
    """Its effects are in the snapshot: running it again would undo the snapshot's state."""
    wat = """(module
      (memory (export "memory") 1)
      (func $init (i32.store (i32.const 0) (i32.const 1)))
      (start $init))"""
    baked = wb.bake(bytes(wasmtime.wat2wasm(wat)), 1, [(0, b"\x05")], {})
    assert wb.parse(baked).start is None
    store = wasmtime.Store()
    ex = wasmtime.Instance(store, wasmtime.Module(store.engine, baked), []).exports(store)
    assert ex["memory"].read(store, 0, 1) == b"\x05"
