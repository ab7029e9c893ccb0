"""VM directories made in advance carry an empty record file: a VM's first record is written into it in place
(one write, one fdatasync), later ones atomically; at start-up a directory whose record file is still empty
was never acknowledged and is removed."""
from __future__ import annotations

import json
from pathlib import Path

from microvmd.vmm import registry as r


def test_ready_dirs_hold_empty_files_and_take_the_first_record_in_place(tmp_path: Path) -> None:
    ids = r._make_ready_dirs(tmp_path, 2)
    assert len(ids) == 2
    d = tmp_path / ids[0]
    assert sorted(p.name for p in d.iterdir()) == sorted(r.READY_FILES)
    assert r._is_ready_dir(d)
    ino = (d / "vm.json").stat().st_ino
    assert r._write_records([(d, {"id": ids[0], "n": 1})]) == []
    assert (d / "vm.json").stat().st_ino == ino  # written in place: the same file
    assert not r._is_ready_dir(d)
    assert r._write_records([(d, {"id": ids[0], "n": 2})]) == []  # a later record: whole, by a rename
    assert (d / "vm.json").stat().st_ino != ino
    assert json.loads((d / "vm.json").read_text()) == {"id": ids[0], "n": 2}
    fresh = tmp_path / ("a" * 32)  # not made in advance: the atomic path makes it
    assert r._write_records([(fresh, {"id": "a" * 32})]) == []
    assert json.loads((fresh / "vm.json").read_text()) == {"id": "a" * 32}


def test_load_keeps_records_and_removes_directories_whose_record_is_still_empty(tmp_path: Path) -> None:
    made = r._make_ready_dirs(tmp_path, 3)
    r._write_records([(tmp_path / made[0], {"id": made[0]})])
    store = r.DirRecords(tmp_path)
    try:
        found = store.load()
        assert [rec["id"] for rec, _ in found] == [made[0]]
        assert not (tmp_path / made[1]).exists() and not (tmp_path / made[2]).exists()
        spare = [p for p in tmp_path.iterdir() if p.name != made[0]]
        assert len(spare) == r.READY_DIRS and all(r._is_ready_dir(p) for p in spare)  # fresh ones made
    finally:
        store._persist.shutdown()
        store._ready_pool.shutdown()
