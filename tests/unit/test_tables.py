"""Snapshots of function tables a guest changed at run time: capture names each function by the slot that
held it at instantiation; restore rebuilds the table in a fresh instance. Real wasmtime, WAT guests."""
from __future__ import annotations

import pytest
import wasmtime

from microvmd.engine import wt
from microvmd.vmm.machine import Machine, MachineSpec, NotSnapshottable

WAT = """(module
 (type $t (func (result i32)))
 (table $tab (export "tab") 4 10 funcref)
 (table $aux (export "aux") 2 funcref)
 (elem (table $tab) (i32.const 0) func $a $b $c)
 (elem (table $aux) (i32.const 1) func $e)
 (func $a (result i32) i32.const 1)
 (func $b (result i32) i32.const 2)
 (func $c (result i32) i32.const 3)
 (func $d (result i32) i32.const 4)
 (func $e (result i32) i32.const 5)
 (elem declare func $d)
 (func (export "mutate")
   (table.set $tab (i32.const 0) (table.get $tab (i32.const 2)))
   (drop (table.grow $tab (ref.null func) (i32.const 2)))
   (table.set $tab (i32.const 5) (table.get $aux (i32.const 1)))
   (table.set $tab (i32.const 1) (ref.null func)))
 (func (export "declared") (table.set $tab (i32.const 3) (ref.func $d)))
 (func (export "call") (param i32) (result i32) (call_indirect $tab (type $t) (local.get 0)))
 (func (export "_start")))"""


@pytest.fixture(scope="module")
def parts() -> tuple[wasmtime.Engine, wasmtime.Linker, wasmtime.Module]:
    engine = wt.make_engine(wt.EngineOptions())
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    return engine, linker, wasmtime.Module(engine, WAT)


def machine(parts: tuple[wasmtime.Engine, wasmtime.Linker, wasmtime.Module]) -> Machine:
    engine, linker, module = parts
    spec = MachineSpec(args=["t"], env={}, dirs=[], memory_limit=1 << 20, table_elements=100, instances=1,
                       tables=4, memories=1, stdout=lambda b: None, stderr=lambda b: None)
    m = Machine(engine, linker, module, spec)
    m.tables_at_start = m._table_refs()  # as for a guest that can be snapshotted after it ran
    return m


def calls(m: Machine, n: int) -> list[int | str]:
    out: list[int | str] = []
    for i in range(n):
        try:
            out.append(m.call_sync("call", i)[0])
        except RuntimeError as exc:
            out.append("null" if "null" in str(exc) or "uninitialized" in str(exc) else str(exc))
    return out


def test_unchanged_tables_are_not_stored(parts) -> None:  # type: ignore[no-untyped-def]
    m = machine(parts)
    assert m.capture_tables() == {}
    m.close()


def test_changed_table_round_trips_into_a_fresh_instance(parts) -> None:  # type: ignore[no-untyped-def]
    m = machine(parts)
    m.call_sync("mutate")
    before = calls(m, 6)
    assert before == [3, "null", 3, "null", "null", 5]
    tables = m.capture_tables()
    assert set(tables) == {"tab"}  # aux did not change
    assert tables["tab"] == {"size": 6, "elems": [["tab", 2], None, ["tab", 2], None, None, ["aux", 1]]}
    fresh = machine(parts)
    assert calls(fresh, 3) == [1, 2, 3]
    fresh._restore_tables(tables)
    assert calls(fresh, 6) == before
    m.close()
    fresh.close()


def test_a_function_in_no_table_at_instantiation_is_refused(parts) -> None:  # type: ignore[no-untyped-def]
    m = machine(parts)
    m.call_sync("declared")
    with pytest.raises(NotSnapshottable, match="slot 3 .* no table"):
        m.capture_tables()
    m.close()


@pytest.mark.parametrize("tables,message", [
    ({"nope": {"size": 4, "elems": [None] * 4}}, "not exported"),
    ({"tab": {"size": 4, "elems": [["tab", 9], None, None, None]}}, "does not have"),
    ({"tab": {"size": 4, "elems": [["missing", 0], None, None, None]}}, "does not have"),
    ({"tab": {"size": 4, "elems": [["tab", 3], None, None, None]}}, "no function"),
    ({"tab": {"size": 2, "elems": [None, None]}}, "smaller"),
    ({"tab": {"size": 50, "elems": [None] * 50}}, "failed to grow"),  # past the maximum of 10
])
def test_a_bad_table_in_a_snapshot_is_an_error_not_a_crash(parts, tables, message) -> None:  # type: ignore[no-untyped-def]
    m = machine(parts)
    with pytest.raises((ValueError, wasmtime.WasmtimeError), match=message):
        m._restore_tables(tables)
    m.close()


def test_a_module_that_cannot_change_its_tables_keeps_no_record_of_them(parts) -> None:  # type: ignore[no-untyped-def]
    """An image whose code has no table-writing instruction (images/rewrite.py, tables_fixed) skips the
    per-slot read at instantiation; its snapshots hold no tables. A snapshot that does carry tables (made
    from a module that could change them) still restores, and the next capture sees the change."""
    engine, linker, module = parts
    spec = MachineSpec(args=["t"], env={}, dirs=[], memory_limit=1 << 20, table_elements=100, instances=1,
                       tables=4, memories=1, stdout=lambda b: None, stderr=lambda b: None, tables_fixed=True)
    m = Machine(engine, linker, module, spec)
    assert m.tables_at_start is None
    assert m.capture_tables() == {}
    tables = {"tab": {"size": 4, "elems": [["tab", 2], None, ["tab", 2], None]}}
    m.restore(0, lambda a, s: None, {}, False, 0, lambda n: [], tables)
    assert calls(m, 3) == [3, "null", 3]
    assert m.capture_tables() == tables
    m.close()
