"""Pure-Python reader/rewriter for the WebAssembly core binary format.

Used by the image pipeline to inspect guest modules and to *normalize* them for
snapshotting: every piece of mutable instance state (mutable globals, memories,
tables) becomes reachable through an export, and the ``start`` function is turned
into an export the daemon calls explicitly at boot.

The parser treats its input as hostile: every length and count is bounds-checked and
malformed input raises :class:`WasmFormatError` naming the problem and byte offset.
Only the sections needed for the metadata are decoded; code, element and data
payloads are walked section-wise and copied verbatim by :func:`normalize`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

__all__ = [
    "Export", "FuncType", "Global", "GlobalExport", "GlobalType", "Import", "MemoryType",
    "ModuleInfo", "NormalizeReport", "Section", "TableType", "TagType", "WasmFormatError",
    "encode_s32", "encode_s64", "encode_u32", "encode_u64", "normalize", "parse", "read_s32",
    "read_s64", "read_u32", "read_u64",
]

MAGIC = b"\x00asm"
VERSION = b"\x01\x00\x00\x00"
KINDS = ("func", "table", "memory", "global", "tag")
SECTION_NAMES = ("custom", "type", "import", "function", "table", "memory", "global", "export",
                 "start", "element", "code", "data", "datacount", "tag")
# Position of each non-custom section id in the required order (tag sits between
# memory and global, datacount between element and code).
_ORDER = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 13: 6, 6: 7, 7: 8, 8: 9, 9: 10, 12: 11, 10: 12, 11: 13}
_SEC_EXPORT, _SEC_START = 7, 8
_NUMTYPES = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128"}
_HEAPTYPES = {0x70: "func", 0x6F: "extern", 0x6E: "any", 0x71: "none", 0x72: "noextern",
              0x73: "nofunc", 0x6D: "eq", 0x6B: "struct", 0x6A: "array", 0x6C: "i31",
              0x69: "exn", 0x74: "noexn"}
_REF_SHORTHAND = {0x70: "funcref", 0x6F: "externref", 0x6E: "anyref", 0x71: "nullref",
                  0x72: "nullexternref", 0x73: "nullfuncref", 0x6D: "eqref", 0x6B: "structref",
                  0x6A: "arrayref", 0x6C: "i31ref", 0x69: "exnref", 0x74: "nullexnref"}
_BINOPS = frozenset({0x6A, 0x6B, 0x6C, 0x7C, 0x7D, 0x7E})  # extended-const add/sub/mul


class WasmFormatError(ValueError):
    """Malformed (or unsupported) WebAssembly binary."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        self.offset = offset
        super().__init__(message if offset is None else f"{message} at offset {offset}")


# --------------------------------------------------------------------------- LEB128

def _read_leb(data: bytes, pos: int, bits: int, signed: bool, end: int | None = None) -> tuple[int, int]:
    limit = len(data) if end is None else min(end, len(data))
    start, result, shift = pos, 0, 0
    max_bytes = (bits + 6) // 7
    while True:
        if pos - start >= max_bytes:
            raise WasmFormatError(f"LEB128 integer too long for {bits} bits", start)
        if pos >= limit:
            raise WasmFormatError("unexpected end of data in LEB128 integer", start)
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    if shift > bits:  # final byte of a maximal encoding: its high bits are padding
        used = bits - (shift - 7)
        if signed:  # padding must replicate the sign bit
            pad, ones = (byte & 0x7F) >> (used - 1), (1 << (8 - used)) - 1
        else:
            pad, ones = (byte & 0x7F) >> used, 0
        if pad not in (0, ones):
            raise WasmFormatError(f"LEB128 integer out of range for {bits} bits", start)
    if signed and result & (1 << (shift - 1)):
        result -= 1 << shift
    return result, pos


def read_u32(data: bytes, pos: int = 0) -> tuple[int, int]:
    """Decode an unsigned 32-bit LEB128 at ``pos``; returns ``(value, next_pos)``."""
    return _read_leb(data, pos, 32, False)


def read_s32(data: bytes, pos: int = 0) -> tuple[int, int]:
    return _read_leb(data, pos, 32, True)


def read_u64(data: bytes, pos: int = 0) -> tuple[int, int]:
    return _read_leb(data, pos, 64, False)


def read_s64(data: bytes, pos: int = 0) -> tuple[int, int]:
    return _read_leb(data, pos, 64, True)


def _encode_leb(value: int, bits: int, signed: bool) -> bytes:
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if not lo <= value <= hi:
        raise ValueError(f"{value} does not fit in {'s' if signed else 'u'}{bits}")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        done = value in (0, -1) and bool(byte & 0x40) == (value == -1) if signed else value == 0
        out.append(byte if done else byte | 0x80)
        if done:
            return bytes(out)


def encode_u32(value: int) -> bytes:
    return _encode_leb(value, 32, False)


def encode_s32(value: int) -> bytes:
    return _encode_leb(value, 32, True)


def encode_u64(value: int) -> bytes:
    return _encode_leb(value, 64, False)


def encode_s64(value: int) -> bytes:
    return _encode_leb(value, 64, True)


# --------------------------------------------------------------------------- data model

@dataclass(frozen=True)
class FuncType:
    params: tuple[str, ...]
    results: tuple[str, ...]


@dataclass(frozen=True)
class TableType:
    elemtype: str
    min: int
    max: int | None
    table64: bool = False


@dataclass(frozen=True)
class MemoryType:
    min: int  # pages
    max: int | None
    memory64: bool = False
    shared: bool = False


@dataclass(frozen=True)
class GlobalType:
    valtype: str
    mutable: bool


@dataclass(frozen=True)
class TagType:
    type_index: int
    signature: FuncType


ExternType: TypeAlias = "FuncType | TableType | MemoryType | GlobalType | TagType"


@dataclass(frozen=True)
class Import:
    module: str
    name: str
    kind: str  # one of KINDS
    type: ExternType  # FuncType for "func" imports


@dataclass(frozen=True)
class Export:
    name: str
    kind: str
    index: int


@dataclass(frozen=True)
class Global:
    """A defined global; ``index`` is in the global index space (after imports)."""

    index: int
    type: GlobalType
    init: bytes  # raw constant expression, including the terminating ``end`` (0x0B)


@dataclass(frozen=True)
class Section:
    id: int
    offset: int  # of the section id byte
    payload_offset: int
    end: int
    custom_name: str | None = None

    @property
    def name(self) -> str:
        return SECTION_NAMES[self.id]


@dataclass(frozen=True)
class ModuleInfo:
    types: tuple[FuncType, ...]
    imports: tuple[Import, ...]
    functions: tuple[int, ...]  # type index of each defined function
    tables: tuple[TableType, ...]  # defined tables
    memories: tuple[MemoryType, ...]  # defined memories
    tags: tuple[TagType, ...]  # defined tags
    globals: tuple[Global, ...]  # defined globals
    exports: tuple[Export, ...]
    start: int | None
    data_count: int | None
    sections: tuple[Section, ...]

    def imported_count(self, kind: str) -> int:
        """Number of imports of ``kind`` ("func", "table", "memory", "global" or "tag")."""
        return sum(1 for i in self.imports if i.kind == kind)

    def defined_count(self, kind: str) -> int:
        return len({"func": self.functions, "table": self.tables, "memory": self.memories,
                    "global": self.globals, "tag": self.tags}[kind])

    def index_space_size(self, kind: str) -> int:
        return self.imported_count(kind) + self.defined_count(kind)


# --------------------------------------------------------------------------- decoding

class _Reader:
    """Cursor over ``data[pos:end]``; every read is bounds-checked against ``end``."""

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data, self.pos, self.end = data, pos, end

    def fail(self, message: str, pos: int | None = None) -> WasmFormatError:
        return WasmFormatError(message, self.pos if pos is None else pos)

    def take(self, n: int) -> bytes:
        if n > self.end - self.pos:
            raise self.fail(f"unexpected end of section: {n} bytes needed, {self.end - self.pos} left")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def byte(self) -> int:
        return self.take(1)[0]

    def leb(self, bits: int = 32, signed: bool = False) -> int:
        value, self.pos = _read_leb(self.data, self.pos, bits, signed, self.end)
        return value

    def count(self, what: str) -> int:
        at, n = self.pos, self.leb()
        if n > self.end - self.pos:  # every entry takes at least one byte
            raise self.fail(f"{what} {n} exceeds the {self.end - self.pos} bytes left", at)
        return n

    def name(self) -> str:
        at = self.pos
        try:
            return self.take(self.count("name length")).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("name is not valid UTF-8", at) from None

    def heaptype(self) -> str:
        at = self.pos
        if self.take(1)[0] in _HEAPTYPES:
            return _HEAPTYPES[self.data[at]]
        self.pos = at
        idx = self.leb(33, signed=True)
        if idx < 0:
            raise self.fail(f"invalid heap type 0x{self.data[at]:02x}", at)
        return str(idx)

    def valtype(self, ref_only: bool = False) -> str:
        at, b = self.pos, self.byte()
        if b in _NUMTYPES and not ref_only:
            return _NUMTYPES[b]
        if b in _REF_SHORTHAND:
            return _REF_SHORTHAND[b]
        if b in (0x63, 0x64):
            return f"(ref {'null ' if b == 0x63 else ''}{self.heaptype()})"
        raise self.fail(f"invalid {'reference' if ref_only else 'value'} type 0x{b:02x}", at)

    def limits(self, allowed_flags: int) -> tuple[int, int | None, int]:
        at, flags = self.pos, self.byte()
        if flags & ~allowed_flags:
            raise self.fail(f"invalid limits flags 0x{flags:02x}", at)
        bits = 64 if flags & 0x04 else 32
        lo = self.leb(bits)
        hi = self.leb(bits) if flags & 0x01 else None
        if hi is not None and hi < lo:
            raise self.fail(f"limits maximum {hi} below minimum {lo}", at)
        if flags & 0x02 and hi is None:
            raise self.fail("shared memory must have a maximum", at)
        return lo, hi, flags

    def tabletype(self) -> TableType:
        elem = self.valtype(ref_only=True)
        lo, hi, flags = self.limits(0x05)
        return TableType(elem, lo, hi, bool(flags & 0x04))

    def memtype(self) -> MemoryType:
        lo, hi, flags = self.limits(0x07)
        return MemoryType(lo, hi, bool(flags & 0x04), bool(flags & 0x02))

    def globaltype(self) -> GlobalType:
        vt, at, mut = self.valtype(), self.pos, self.byte()
        if mut > 1:
            raise self.fail(f"invalid global mutability 0x{mut:02x}", at)
        return GlobalType(vt, bool(mut))

    def typeidx(self, types: tuple[FuncType, ...]) -> int:
        at, idx = self.pos, self.leb()
        if idx >= len(types):
            raise self.fail(f"type index {idx} out of range ({len(types)} types)", at)
        return idx

    def tagtype(self, types: tuple[FuncType, ...]) -> TagType:
        if self.byte() != 0:
            raise self.fail("invalid tag attribute", self.pos - 1)
        idx = self.typeidx(types)
        return TagType(idx, types[idx])

    def const_expr(self) -> bytes:
        """Skip a constant expression and return its raw bytes (including ``end``)."""
        start = self.pos
        while True:
            at, op = self.pos, self.byte()
            if op == 0x0B:
                return self.data[start:self.pos]
            if op in (0x41, 0x42):  # i32.const / i64.const
                self.leb(32 if op == 0x41 else 64, signed=True)
            elif op in (0x43, 0x44):  # f32.const / f64.const
                self.take(4 if op == 0x43 else 8)
            elif op in (0x23, 0xD2):  # global.get / ref.func
                self.leb()
            elif op == 0xD0:  # ref.null
                self.heaptype()
            elif op == 0xFD and self.leb() == 12:  # v128.const
                self.take(16)
            elif op not in _BINOPS:
                raise self.fail(f"unsupported opcode 0x{op:02x} in constant expression", at)


def _split_sections(data: bytes) -> list[Section]:
    if len(data) < 8:
        raise WasmFormatError("module shorter than the 8-byte header", len(data))
    if data[:4] != MAGIC:
        raise WasmFormatError("bad magic number (not a WebAssembly module)", 0)
    if data[4:8] != VERSION:
        kind = "component, not a core module" if data[6:8] == b"\x01\x00" else "unsupported version"
        raise WasmFormatError(f"binary version {data[4:8].hex()}: {kind}", 4)
    sections: list[Section] = []
    pos, last_rank = 8, 0
    while pos < len(data):
        start, sid = pos, data[pos]
        if sid >= len(SECTION_NAMES):
            raise WasmFormatError(f"unknown section id {sid}", start)
        size, pos = _read_leb(data, pos + 1, 32, False)
        if size > len(data) - pos:
            raise WasmFormatError(f"{SECTION_NAMES[sid]} section size {size} runs past the end "
                                  f"of the module ({len(data) - pos} bytes left)", start)
        custom = None
        if sid == 0:
            custom = _Reader(data, pos, pos + size).name()
        else:
            rank = _ORDER[sid]
            if rank <= last_rank:
                raise WasmFormatError(f"{SECTION_NAMES[sid]} section out of order or duplicated", start)
            last_rank = rank
        sections.append(Section(sid, start, pos, pos + size, custom))
        pos += size
    return sections


def parse(data: bytes) -> ModuleInfo:
    """Decode the module-level metadata of a core WebAssembly binary."""
    data = bytes(data)
    sections = _split_sections(data)
    types: tuple[FuncType, ...] = ()
    imports: list[Import] = []
    exports: list[Export] = []
    defined: dict[str, list[Any]] = {kind: [] for kind in KINDS}
    imported = dict.fromkeys(KINDS, 0)
    start: int | None = None
    data_count: int | None = None
    counts: dict[int, tuple[int, int]] = {}  # code/data section id -> (count, offset)

    def space(kind: str) -> int:
        return imported[kind] + len(defined[kind])

    for sec in sections:
        r, sid = _Reader(data, sec.payload_offset, sec.end), sec.id
        if sid == 1:
            parsed: list[FuncType] = []
            for _ in range(r.count("type count")):
                if (form := r.byte()) != 0x60:
                    raise r.fail(f"unsupported type form 0x{form:02x} (only function types)", r.pos - 1)
                params = tuple(r.valtype() for _ in range(r.count("param count")))
                parsed.append(FuncType(params, tuple(r.valtype() for _ in range(r.count("result count")))))
            types = tuple(parsed)
        elif sid == 2:
            for _ in range(r.count("import count")):
                module, name, at, kind = r.name(), r.name(), r.pos, r.byte()
                if kind >= len(KINDS):
                    raise r.fail(f"invalid import kind 0x{kind:02x}", at)
                desc: ExternType = (types[r.typeidx(types)] if kind == 0 else r.tabletype() if kind == 1
                                    else r.memtype() if kind == 2 else r.globaltype() if kind == 3
                                    else r.tagtype(types))
                imports.append(Import(module, name, KINDS[kind], desc))
                imported[KINDS[kind]] += 1
        elif sid == 3:
            defined["func"].extend(r.typeidx(types) for _ in range(r.count("function count")))
        elif sid == 4:
            for _ in range(r.count("table count")):
                init = r.data[r.pos:min(r.pos + 2, r.end)] == b"\x40\x00"  # table with explicit initializer
                r.pos += 2 if init else 0
                defined["table"].append(r.tabletype())
                if init:
                    r.const_expr()
        elif sid == 5:
            defined["memory"].extend(r.memtype() for _ in range(r.count("memory count")))
        elif sid == 13:
            defined["tag"].extend(r.tagtype(types) for _ in range(r.count("tag count")))
        elif sid == 6:
            for _ in range(r.count("global count")):
                gtype = r.globaltype()
                defined["global"].append(Global(space("global"), gtype, r.const_expr()))
        elif sid == 7:
            seen: set[str] = set()
            for _ in range(r.count("export count")):
                at, name = r.pos, r.name()
                if name in seen:
                    raise r.fail(f"duplicate export name {name!r}", at)
                seen.add(name)
                if (kind := r.byte()) >= len(KINDS):
                    raise r.fail(f"invalid export kind 0x{kind:02x}", r.pos - 1)
                at, idx = r.pos, r.leb()
                if idx >= space(KINDS[kind]):
                    raise r.fail(f"export {name!r}: {KINDS[kind]} index {idx} out of range", at)
                exports.append(Export(name, KINDS[kind], idx))
        elif sid == 8:
            if (start := r.leb()) >= space("func"):
                raise r.fail(f"start function index {start} out of range", sec.payload_offset)
        elif sid == 12:
            data_count = r.leb()
        elif sid != 0:  # element (9), code (10), data (11): only the entry count is decoded
            counts[sid] = (r.count(f"{sec.name} count"), sec.payload_offset)
            r.pos = sec.end
        if sid != 0 and r.pos != sec.end:
            raise r.fail(f"{sec.name} section has {sec.end - r.pos} trailing bytes")

    code_count, at = counts.get(10, (0, len(data)))
    if code_count != len(defined["func"]):
        raise WasmFormatError(f"{len(defined['func'])} functions declared but {code_count} bodies", at)
    data_segments, at = counts.get(11, (0, len(data)))
    if data_count is not None and data_segments != data_count:
        raise WasmFormatError(f"data count {data_count} does not match {data_segments} data segments", at)
    return ModuleInfo(types, tuple(imports), tuple(defined["func"]), tuple(defined["table"]),
                      tuple(defined["memory"]), tuple(defined["tag"]), tuple(defined["global"]),
                      tuple(exports), start, data_count, tuple(sections))


# --------------------------------------------------------------------------- normalize

@dataclass(frozen=True)
class GlobalExport:
    index: int  # in the global index space
    name: str
    valtype: str
    mutable: bool


@dataclass(frozen=True)
class NormalizeReport:
    globals: tuple[GlobalExport, ...]  # every mutable defined global
    memories: tuple[str, ...]  # export name of each defined memory, in index order
    tables: tuple[str, ...]  # export name of each defined table, in index order
    start: str | None  # export to call at boot instead of the start section
    changed: bool

    @property
    def global_names(self) -> dict[int, str]:
        return {g.index: g.name for g in self.globals}


def _encode_name(name: str) -> bytes:
    raw = name.encode("utf-8")
    return encode_u32(len(raw)) + raw


def normalize(data: bytes, prefix: str = "__microvm_") -> tuple[bytes, NormalizeReport]:
    """Export all mutable state and replace the start section with an export.

    Only the export section is rewritten (entries appended) and the start section is
    dropped; all other sections are copied byte-for-byte, so no index shifts.
    Normalizing an already normalized module returns identical bytes.
    """
    data = bytes(data)
    info = parse(data)
    export_sec = next((s for s in info.sections if s.id == _SEC_EXPORT), None)
    err_at = export_sec.offset if export_sec else 8
    by_name = {e.name: e for e in info.exports}
    by_item: dict[tuple[str, int], str] = {}
    for e in info.exports:
        by_item.setdefault((e.kind, e.index), e.name)
    added: list[Export] = []

    def claim(name: str, kind: str, index: int) -> None:
        other = by_name.get(name)
        if other is None:
            added.append(Export(name, kind, index))
            by_name[name], by_item[(kind, index)] = added[-1], name
        elif (other.kind, other.index) != (kind, index):
            raise WasmFormatError(f"reserved export name {name!r} already used for "
                                  f"{other.kind} {other.index}", err_at)

    def ensure(kind: str, index: int, name: str) -> str:
        if (kind, index) not in by_item:  # already-exported state keeps its existing name
            claim(name, kind, index)
        return by_item[(kind, index)]

    globals_report = tuple(
        GlobalExport(g.index, ensure("global", g.index, f"{prefix}global_{g.index}"),
                     g.type.valtype, g.type.mutable)
        for g in info.globals if g.type.mutable)
    memories = tuple(ensure("memory", i, f"{prefix}memory_{i}")
                     for i in range(info.imported_count("memory"), info.index_space_size("memory")))
    tables = tuple(ensure("table", i, f"{prefix}table_{i}")
                   for i in range(info.imported_count("table"), info.index_space_size("table")))
    start_name: str | None = f"{prefix}start"
    if info.start is not None:  # always under the fixed name, so re-normalizing can find it
        claim(f"{prefix}start", "func", info.start)
    elif (prev := by_name.get(f"{prefix}start")) is None or prev.kind != "func":
        start_name = None  # (otherwise: already normalized)

    changed = bool(added) or info.start is not None
    report = NormalizeReport(globals_report, memories, tables, start_name, changed)
    if not changed:
        return data, report

    body = b"".join(_encode_name(e.name) + bytes([KINDS.index(e.kind)]) + encode_u32(e.index)
                    for e in added)
    if export_sec is not None:
        _, entries_at = read_u32(data, export_sec.payload_offset)
        body = data[entries_at:export_sec.end] + body
    payload = encode_u32(len(info.exports) + len(added)) + body
    new_export = bytes([_SEC_EXPORT]) + encode_u32(len(payload)) + payload

    # Insert a new export section right after the last section that must precede it.
    insert_at = -1 if export_sec else max(
        (n + 1 for n, s in enumerate(info.sections) if s.id != 0 and _ORDER[s.id] < _ORDER[_SEC_EXPORT]),
        default=0)
    out = [data[:8]]
    for n, sec in enumerate(info.sections):
        if n == insert_at:
            out.append(new_export)
        if sec.id != _SEC_START:
            out.append(new_export if sec.id == _SEC_EXPORT else data[sec.offset:sec.end])
    if insert_at == len(info.sections):
        out.append(new_export)
    return b"".join(out), report


# --------------------------------------------------------------------------- bake

_NUM_VALTYPES = ("i32", "i64", "f32", "f64")


def _const_expr(ty: str, value: int | float) -> bytes:
    """``<ty>.const value; end``."""
    if ty == "i32":
        v = int(value) & 0xFFFFFFFF
        return b"\x41" + encode_s32(v - (1 << 32) if v >= 1 << 31 else v) + b"\x0b"
    if ty == "i64":
        v = int(value) & 0xFFFFFFFFFFFFFFFF
        return b"\x42" + encode_s64(v - (1 << 64) if v >= 1 << 63 else v) + b"\x0b"
    if ty == "f32":
        return b"\x43" + struct.pack("<f", value) + b"\x0b"
    if ty == "f64":
        return b"\x44" + struct.pack("<d", value) + b"\x0b"
    raise ValueError(f"no constant of type {ty}")


def _encode_section(sid: int, payload: bytes) -> bytes:
    return bytes([sid]) + encode_u32(len(payload)) + payload


def bake(data: bytes, pages: int, segments: Sequence[tuple[int, bytes]],
         values: dict[int, tuple[str, int | float]]) -> bytes:
    """A copy of the module whose instances begin where a snapshot of one stands, as Wizer makes of an
    initialised instance: its memory ``pages`` long, holding ``segments`` ((offset, bytes); zeros elsewhere),
    and the defined globals of ``values`` (global index -> (type, value)) starting at those values. The code is
    the module's own, so wasmtime maps the memory from the compiled module's copy-on-write image at each
    instantiation and nothing is copied per instance.

    The module's start function is dropped (it ran before the snapshot). Its own data segments are
    replaced. When it has a data count section (its code may name segments
    in ``memory.init`` and ``data.drop``), they are kept, made passive, ahead of the new ones, so that every
    index its code names is still the same segment. ValueError for what cannot be baked: an imported, 64-bit
    or shared memory, a maximum below ``pages``, an imported or non-numeric global among ``values``, a value of
    the wrong type."""
    data = bytes(data)
    info = parse(data)
    if info.imported_count("memory") or len(info.memories) != 1:
        raise ValueError("only a module that defines its one memory can be baked")
    mem = info.memories[0]
    if mem.memory64 or mem.shared:
        raise ValueError("a 64-bit or shared memory cannot be baked")
    if mem.max is not None and mem.max < pages:
        raise ValueError(f"the memory's maximum ({mem.max} pages) is below the snapshot's {pages}")
    defined = {g.index: g for g in info.globals}
    for idx, (ty, _value) in values.items():
        g = defined.get(idx)
        if g is None:
            raise ValueError(f"global {idx} is not defined by the module")
        if g.type.valtype not in _NUM_VALTYPES or g.type.valtype != ty:
            raise ValueError(f"global {idx} is {g.type.valtype}, not {ty}")
    if not any(sec.id == 10 for sec in info.sections) and segments:
        raise ValueError("a module without code cannot be baked")
    new_active = [b"\x00" + _const_expr("i32", off) + encode_u32(len(chunk)) + chunk for off, chunk in segments]
    kept: list[bytes] = []  # the module's own segments, as passive ones (only with a data count section)
    for sec in info.sections:
        if sec.id != 11 or info.data_count is None:
            continue
        r = _Reader(data, sec.payload_offset, sec.end)
        for _ in range(r.count("data count")):
            at, flag = r.pos, r.leb()
            if flag == 2:
                r.leb()
            if flag in (0, 2):
                r.const_expr()
            elif flag != 1:
                raise r.fail(f"invalid data segment flags {flag}", at)
            body = r.take(r.count("data length"))
            kept.append(b"\x01" + encode_u32(len(body)) + body)
    data_payload = encode_u32(len(kept) + len(new_active)) + b"".join(kept) + b"".join(new_active)
    out = [data[:8]]
    wrote_data = False
    for sec in info.sections:
        if sec.id == 5:
            flags = b"\x01" if mem.max is not None else b"\x00"
            payload = encode_u32(1) + flags + encode_u32(pages) + (encode_u32(mem.max) if mem.max is not None else b"")
            out.append(_encode_section(5, payload))
        elif sec.id == 6:
            r = _Reader(data, sec.payload_offset, sec.end)
            n = r.count("global count")
            parts = [encode_u32(n)]
            idx = info.imported_count("global")
            for _ in range(n):
                start = r.pos
                r.globaltype()
                init_at = r.pos
                r.const_expr()
                parts.append(data[start:init_at] + _const_expr(*values[idx]) if idx in values else data[start:r.pos])
                idx += 1
            out.append(_encode_section(6, b"".join(parts)))
        elif sec.id == 8:
            continue  # the start function ran before the snapshot: its effects are in it
        elif sec.id == 12:
            out.append(_encode_section(12, encode_u32(len(kept) + len(new_active))))
        elif sec.id == 11:
            out.append(_encode_section(11, data_payload))
            wrote_data = True
        else:
            out.append(data[sec.offset:sec.end])
            if sec.id == 10 and not any(s.id == 11 for s in info.sections):
                out.append(_encode_section(11, data_payload))
                wrote_data = True
    if not wrote_data and new_active:
        raise ValueError("the module has no code section to place the data after")
    return b"".join(out)
