"""Property tests of every parser a hostile file or request reaches (issue 13 item 9): random and mutated
inputs end in the parser's own error type, never another exception, and never hang (Hypothesis' deadline
is off; a hang fails the run's timeout).

Module parser and rewriter (images/wasmbin.py, images/rewrite.py, images/asyncify.py), snapshot manifests
(snapshot/store.py) and the API's request contract (contract.py). The snapshot stream is fuzzed through
the daemon in test_fuzz_files.py.
"""
from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import msgspec
import pytest
from fuzzhelp import FUZZ_EXAMPLES, SEEDS, SLOW_EXAMPLES, mutated
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microvmd import contract
from microvmd.images import asyncify, rewrite, wasmbin
from microvmd.snapshot.store import FORMAT_VERSION, MANIFEST_MAGIC, SnapshotError, decode_manifest

quick = settings(max_examples=FUZZ_EXAMPLES * 4, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
long = settings(max_examples=SLOW_EXAMPLES * 10, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


modules = st.one_of(st.binary(max_size=256).map(lambda b: b"\0asm\x01\0\0\0" + b), mutated(SEEDS))


def _module_parsers(data: bytes) -> None:
    try:
        info = wasmbin.parse(data)
        wasmbin.normalize(data, prefix="__microvmd_")
        info.index_space_size("func")
    except wasmbin.WasmFormatError:
        pass
    try:
        asyncify.find_control_globals(data)
    except wasmbin.WasmFormatError:
        pass
    try:
        rewrite.to_host_imports(data)
    except (wasmbin.WasmFormatError, StopIteration):  # what images/importer.py catches
        pass


@quick
@given(modules)
def test_module_parsers_raise_only_their_own_error(data: bytes) -> None:
    _module_parsers(data)


@pytest.mark.slow
@long
@given(modules)
def test_module_parsers_raise_only_their_own_error_long(data: bytes) -> None:
    _module_parsers(data)


def _manifest(body: bytes) -> bytes:
    """``body`` framed as a stored manifest with its checksum right, so the decoder reaches its validation."""
    return MANIFEST_MAGIC + struct.pack("<HI", FORMAT_VERSION, len(body)) + body + hashlib.sha256(body).digest()


manifests = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(_manifest),
    st.recursive(st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.text(max_size=20)
                 | st.binary(max_size=20),
                 lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
                 max_leaves=30).map(lambda v: _manifest(msgspec.msgpack.encode(v))),
)


@quick
@given(manifests)
def test_snapshot_manifests_raise_only_snapshot_error(raw: bytes) -> None:
    try:
        decode_manifest(raw, "fuzz", stored=False)
    except SnapshotError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["image", "name", "fuel", "memory", "timeout", "args", "env", "dirs", "disks", "publish",
                         "allow_egress", "restart", "start", "stdin", "host", "guest", "size", "mode", "x"]),
        inner, max_size=8),
    max_leaves=40)
REQUEST_TYPES = [contract.VmCreate, contract.FuelAdd, contract.ImagePatch, contract.DiskCreate, contract.DiskPatch,
                 contract.SnapshotCreate, contract.Restore, contract.Migrate]


def _decode(raw: bytes, typ: type[Any], msgpack: bool) -> None:
    try:
        contract.decode(raw, typ, msgpack=msgpack)
    except contract.ContractError:
        pass


@quick
@given(st.sampled_from(REQUEST_TYPES), json_values)
def test_request_bodies_raise_only_contract_errors(typ: type[Any], value: Any) -> None:
    _decode(json.dumps(value).encode(), typ, False)
    try:
        packed = msgspec.msgpack.encode(value)
    except OverflowError:  # (MessagePack has no integers beyond 64 bits: nothing to send)
        return
    _decode(packed, typ, True)


@quick
@given(st.sampled_from(REQUEST_TYPES), st.binary(max_size=300))
def test_request_bytes_raise_only_contract_errors(typ: type[Any], raw: bytes) -> None:
    _decode(raw, typ, False)
    _decode(raw, typ, True)
