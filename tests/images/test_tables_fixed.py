"""rewrite.tables_fixed: Binaryen's instruction counts tell whether a module can change its tables, which
decides whether its VMs record their tables at every instantiation (vmm/machine.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import wasmtime

from microvmd.images import rewrite

pytestmark = pytest.mark.skipif(rewrite.wasm_opt_path() is None, reason="Binaryen's wasm-opt is not installed")

READS_ONLY = """(module
 (type $t (func (result i32)))
 (table $tab 2 funcref)
 (elem (i32.const 0) func $a)
 (func $a (result i32) i32.const 1)
 (func (export "_start") (drop (table.size $tab)) (drop (table.get $tab (i32.const 0)))
   (drop (call_indirect (type $t) (i32.const 0)))))"""


@pytest.mark.parametrize("body,fixed", [
    ("", {True}),
    ("(table.set $tab (i32.const 1) (ref.null func))", {False}),
    ("(drop (table.grow $tab (ref.null func) (i32.const 1)))", {False}),
    # an instruction an older Binaryen cannot read (108 has no table.fill) is "unknown": never "fixed"
    ("(table.fill $tab (i32.const 0) (ref.null func) (i32.const 1))", {False, None}),
])
def test_table_writes_are_seen(tmp_path: Path, body: str, fixed: set[bool | None]) -> None:
    wat = READS_ONLY.replace('(func (export "_start")', f'(func (export "w") {body})\n (func (export "_start")')
    path = tmp_path / "m.wasm"
    path.write_bytes(wasmtime.wat2wasm(wat))
    assert rewrite.tables_fixed(path) in fixed


def test_an_unreadable_module_is_unknown(tmp_path: Path) -> None:
    path = tmp_path / "bad.wasm"
    path.write_bytes(b"\0asm\x01\0\0\0\x0a\xff")
    assert rewrite.tables_fixed(path) is None
