"""How a reference finds a VM (issue 13 row 9): id, name, unique id prefix; a name never passes for
another VM's id."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from microvmd.errors import Conflict, NotFound
from microvmd.vmm.registry import VmRegistry, looks_like_id


def registry(*vms: tuple[str, str]) -> VmRegistry:
    reg = VmRegistry(records=None)  # type: ignore[arg-type]  # lookups never touch the record store
    for vm_id, name in vms:
        vm: Any = SimpleNamespace(id=vm_id, name=name)
        reg.add(vm)
    return reg


A = "abcd" + "1" * 28
B = "9f00" + "2" * 28


def test_id_name_and_prefix() -> None:
    reg = registry((A, "web"), (B, B[:12]))
    assert reg.get(A).id == A
    assert reg.get("web").id == A
    assert reg.get("abcd1").id == A
    assert reg.get(B[:12]).id == B  # a default name (the id's first 12) is its own prefix: no ambiguity
    with pytest.raises(NotFound):
        reg.get("abc")  # too short to be a prefix


def test_a_name_that_is_another_vms_id_prefix_is_ambiguous() -> None:
    reg = registry((A, "9f00"), (B, "other"))  # the name "9f00" was free when it was given; B came later
    with pytest.raises(Conflict) as exc:
        reg.get("9f00")
    assert exc.value.code == "ambiguous_ref"
    assert reg.get(B).id == B and reg.get("9f002").id == B


def test_id_prefixed_by() -> None:
    reg = registry((A, "web"))
    assert reg.id_prefixed_by("abcd") is not None and reg.id_prefixed_by(A) is not None
    assert reg.id_prefixed_by("abc") is None and reg.id_prefixed_by("ABCD") is None
    assert reg.id_prefixed_by("abcx") is None and reg.id_prefixed_by("beef") is None
    assert looks_like_id("00ff") and not looks_like_id("web") and not looks_like_id("a" * 33)
