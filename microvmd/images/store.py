"""Content-addressed image store with a compiled-code cache.

Layout under ``<state>/images``::

    blobs/<hex>/original.wasm   the module as imported (WAT converted), or as rewritten with Asyncify at import
                                (images/rewrite.py): <hex> is the digest of the module that runs
    blobs/<hex>/module.wasm     the normalised module (mutable globals exported, start -> export)
    blobs/<hex>/manifest.json   entry, default args/env/limits, kind, imports, exports
    names/<name>                the digest a name points at
    cache/<hex>.<engine>.cwasm  compiled code for this wasmtime version and engine configuration
    rewrites/<key>.wasm|json    Asyncify rewrites (or why there is none) by input digest, Binaryen version
                                and pass arguments

Imports are written into a temporary directory and renamed into place, so a failed import leaves nothing.
All methods that hash, compile or touch files are synchronous and meant to run on an I/O thread.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import wasmtime

from .. import contract
from ..contract import UNSET
from ..durable import sync_dir, sync_tree, write_atomic
from ..errors import BadRequest, Conflict, NotFound, Unprocessable
from . import rewrite, wasmbin
from .compiler import Compiler
from .rewrite import RewriteCache

log = logging.getLogger("microvmd.images")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # whole names only: fullmatch (no final newline)
RESERVED_PREFIX = "__microvm_"
# an image that imports it can open files: it is linked with the daemon's counting WASI calls (devices/files.py)
OPENS_FILES = f"{rewrite.WASI}.path_open"


@dataclass
class Image:
    digest: str  # "sha256:<hex>"
    size: int
    created: float
    names: list[str] = field(default_factory=list)
    entry: str | None = "_start"
    boot: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    kind: str = "wasi"  # "wasi" (plain WASI command), "sdk" (uses microvm devices), "reactor"
    asyncify: bool = False
    imports: list[str] = field(default_factory=list)
    exports: list[str] = field(default_factory=list)
    mutable_globals: dict[str, str] = field(default_factory=dict)  # export name -> value type
    asyncify_globals: list[int] | None = None  # (state, data) global indices of an Asyncify build
    source_format: str = "wasm"
    original_digest: str | None = None   # the module the user imported; ``digest`` is the one that runs
    rewritten_digest: str | None = None  # set when the daemon rewrote it with Asyncify (== digest)
    snapshot_note: str | None = None     # how it became snapshottable, or why it is stopped_only
    # no instruction can change a table (rewrite.tables_fixed), so its VMs keep no record of them; None: not
    # worked out yet (an image imported by an older daemon: importer.analyse_tables_later)
    tables_fixed: bool | None = None

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    @property
    def snapshot_kind(self) -> str:
        return "asyncify" if self.asyncify else "stopped_only"

    def to_api(self) -> dict[str, Any]:
        d = asdict(self)
        d["name"] = self.names[0] if self.names else self.digest
        d["original_digest"] = self.original_digest or self.digest
        d["snapshot_kind"] = self.snapshot_kind
        return d


class ImageStore:
    def __init__(self, root: Path, engine: wasmtime.Engine, linker: wasmtime.Linker, fingerprint: str,
                 upload_limit: int, compiler: Compiler, plain_linker: wasmtime.Linker | None = None) -> None:
        self.root = root
        # modules that cannot open files are linked without the daemon's counting WASI calls (devices/files.py)
        self.plain_linker = plain_linker or linker
        self.engine = engine
        self.compiler = compiler  # big modules compile in a child process (images/compiler.py)
        self.linker = linker
        self.fp = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        self.upload_limit = upload_limit
        self.images: dict[str, Image] = {}  # by hex digest
        self.names: dict[str, str] = {}     # name -> hex digest
        self._modules: dict[str, wasmtime.Module] = {}
        self._pres: dict[str, wasmtime.InstancePre] = {}
        self._lock = threading.Lock()
        self._importing: dict[str, list[Any]] = {}  # hex digest -> [its import lock, imports waiting on it]
        self.compiles = 0  # for tests and metrics: how many times we really compiled
        for sub in ("blobs", "names", "cache", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.rewrites = RewriteCache(root / "rewrites")
        self.importing: dict[str, dict[str, Any]] = {}  # imports waiting for a rewrite (images/importer.py)

    # ------------------------------------------------------------------ loading
    def load(self) -> None:
        shutil.rmtree(self.root / "tmp", ignore_errors=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        for d in (self.root / "blobs").iterdir():
            try:
                data = json.loads((d / "manifest.json").read_text())
                img = Image(**data)
                img.names = []
                self.images[img.hex] = img
            except (OSError, ValueError, TypeError) as exc:
                log.warning("skipping damaged image %s: %s", d.name, exc)
        for f in (self.root / "names").iterdir():
            hexd = f.read_text().strip()
            if hexd in self.images:
                self.names[f.name] = hexd
                self.images[hexd].names.append(f.name)
        log.info("loaded %d images", len(self.images))

    # ------------------------------------------------------------------ import
    def prepare(self, data: bytes, name: str | None) -> tuple[bytes, str, str]:
        """Check the name and size, turn WAT into a binary: (module bytes, source format, hex digest)."""
        if name is not None and not NAME_RE.fullmatch(name):
            raise BadRequest(f"invalid image name {name!r}: use letters, digits, '.', '_', '-' (max 128)",
                             code="invalid_name")
        if len(data) > self.upload_limit:
            raise BadRequest(f"module is {len(data)} bytes, above the upload limit of {self.upload_limit}",
                             code="too_large")
        source_format = "wasm"
        if not data.startswith(b"\0asm"):
            if _looks_like_wat(data):
                try:
                    data = bytes(wasmtime.wat2wasm(data.decode("utf-8")))
                except (UnicodeDecodeError, wasmtime.WasmtimeError) as exc:
                    raise Unprocessable(f"invalid WAT: {_first_line(exc)}", code="invalid_module") from None
                source_format = "wat"
            else:
                raise Unprocessable("not a WebAssembly module: no \\0asm magic and not WAT text",
                                    code="invalid_module")
        return data, source_format, hashlib.sha256(data).hexdigest()

    def find_rewrite_of(self, original_hex: str) -> Image | None:
        """The image this daemon made by rewriting the module with that digest, if it still has it."""
        want = f"sha256:{original_hex}"
        with self._lock:
            return next((i for i in self.images.values()
                         if i.original_digest == want and i.rewritten_digest == i.digest), None)

    def import_bytes(self, data: bytes, name: str | None, entry: str | None = None,
                     meta: dict[str, Any] | None = None, durable: bool = True) -> Image:
        """Import ``data`` as it is. ``meta``: ``original_digest``, ``rewritten_digest``, ``snapshot_note``
        (set by images/importer.py when the module is a rewrite, or why it is not); with ``durable`` its
        files, its directory and its name are on stable storage before this returns."""
        data, source_format, hexd = self.prepare(data, name)
        with self._lock:
            busy = self._importing.setdefault(hexd, [threading.Lock(), 0])
            busy[1] += 1
        try:
            with busy[0]:  # two imports of the same bytes at once (two names): the second finds the first's
                return self._import_one(data, source_format, hexd, name, entry, meta, durable)
        finally:
            with self._lock:
                busy[1] -= 1
                if not busy[1]:
                    del self._importing[hexd]

    def _import_one(self, data: bytes, source_format: str, hexd: str, name: str | None, entry: str | None,
                    meta: dict[str, Any] | None, durable: bool) -> Image:
        with self._lock:
            existing = self.images.get(hexd)
        if existing is not None:
            if entry is not None and entry != existing.entry:
                self.update_manifest(existing.digest, contract.ImagePatch(entry=entry))
            note = (meta or {}).get("snapshot_note")
            if note and not existing.asyncify and note != existing.snapshot_note:
                self.update_note(existing.digest, note)
            if name:
                self._set_name(name, hexd, durable)
            return existing
        try:
            info = wasmbin.parse(data)
            self.compiler.check_size(info.index_space_size("func"))
            normalized, report = wasmbin.normalize(data, prefix=RESERVED_PREFIX)
        except wasmbin.WasmFormatError as exc:
            raise Unprocessable(f"malformed module: {exc}", code="invalid_module") from None
        module = self.compiler.compile(normalized, self._cache_path(hexd))
        try:
            self.linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            self._cache_path(hexd).unlink(missing_ok=True)  # (a compile child may have written it)
            raise Unprocessable(f"module needs imports microvmd does not provide: {_first_line(exc)}",
                                code="unsupported_import") from None
        img = self._describe(hexd, data, info, report, source_format, entry)
        for k, v in (meta or {}).items():
            if k in ("original_digest", "rewritten_digest", "snapshot_note", "source_format"):
                setattr(img, k, v)
        if img.asyncify and img.snapshot_note is None:
            img.snapshot_note = ("rewritten with Asyncify" if rewrite.is_rewritten(info)
                                 else "built with Asyncify (guest-sdk)")
        tmp = Path(tempfile.mkdtemp(dir=self.root / "tmp"))
        try:
            (tmp / "original.wasm").write_bytes(data)
            (tmp / "module.wasm").write_bytes(normalized)
            if img.asyncify:  # only a guest snapshotted after it ran has its tables compared
                img.tables_fixed = rewrite.tables_fixed(tmp / "original.wasm") is True
            (tmp / "manifest.json").write_text(json.dumps(asdict(img) | {"names": []}, indent=1))
            if not self._cache_path(hexd).exists():  # (a compile child wrote it already)
                self._write_cache(hexd, module)
            if durable:
                sync_tree(tmp)
            os.replace(tmp, self.root / "blobs" / hexd)
            if durable:
                sync_dir(self.root / "blobs")
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with self._lock:
            self.images[hexd] = img
            self._modules[hexd] = module
            self.compiles += 1
        if name:
            self._set_name(name, hexd, durable)
        log.info("imported image %s digest=%s kind=%s", name or "-", img.digest, img.kind)
        return img

    def _describe(self, hexd: str, data: bytes, info: wasmbin.ModuleInfo, report: Any,
                  source_format: str, entry: str | None) -> Image:
        exports = [e.name for e in info.exports]
        imports = [f"{i.module}.{i.name}" for i in info.imports]
        sdk = any(i.module.startswith("microvm") and i.module != rewrite.HOST_MODULE for i in info.imports) \
            or "microvm_abi_version" in exports
        boot: list[str] = []
        if report.start:
            boot.append(report.start)
        if entry is None:
            if "_start" in exports:
                entry = "_start"
            elif "_initialize" in exports:
                boot.append("_initialize")
                entry = None
            else:
                entry = None
        if entry is not None and entry not in exports:
            raise Unprocessable(f"entry {entry!r} is not exported by the module", code="invalid_entry")
        if entry is None and not boot:
            raise Unprocessable("module has nothing to run: no _start, no start function and no entry given",
                                code="invalid_entry")
        kind = "sdk" if sdk else ("wasi" if entry == "_start" else "reactor")
        from .asyncify import find_control_globals

        try:
            ctl = find_control_globals(data)
        except wasmbin.WasmFormatError:
            ctl = None
        # an SDK build exports its buffer; a module rewritten at import gets one grown by the daemon
        asyncify = ctl is not None and ("microvm_asyncify_data" in exports or rewrite.is_rewritten(info))
        return Image(
            digest=f"sha256:{hexd}", size=len(data), created=time.time(), entry=entry, boot=boot, kind=kind,
            asyncify=asyncify, asyncify_globals=list(ctl) if asyncify and ctl else None,
            imports=imports, exports=exports,
            mutable_globals={g.name: g.valtype for g in report.globals if g.mutable},
            source_format=source_format,
        )

    def _set_name(self, name: str, hexd: str, durable: bool = True) -> None:
        path = self.root / "names" / name
        write_atomic(path, hexd.encode(), path.with_name(f".{name}.tmp"), durable)
        with self._lock:
            old = self.names.get(name)
            if old and old in self.images and name in self.images[old].names:
                self.images[old].names.remove(name)
            self.names[name] = hexd
            if name not in self.images[hexd].names:
                self.images[hexd].names.append(name)

    # ------------------------------------------------------------------ lookup
    def resolve(self, ref: str) -> Image:
        with self._lock:
            if ref in self.names:
                return self.images[self.names[ref]]
            hexd = ref.removeprefix("sha256:")
            if hexd in self.images:
                return self.images[hexd]
            if len(hexd) >= 12 and re.fullmatch(r"[0-9a-f]+", hexd):
                hits = [h for h in self.images if h.startswith(hexd)]
                if len(hits) == 1:
                    return self.images[hits[0]]
                if len(hits) > 1:
                    raise Conflict(f"image reference {ref!r} is ambiguous", code="ambiguous_ref")
        raise NotFound(f"no such image: {ref}", code="image_not_found")

    def module(self, img: Image) -> wasmtime.Module:
        """The compiled module: from memory, else from the on-disk cache, else compiled (and cached)."""
        with self._lock:
            mod = self._modules.get(img.hex)
        if mod is not None:
            return mod
        cache = self._cache_path(img.hex)
        try:
            mod = wasmtime.Module.deserialize_file(self.engine, str(cache))
        except (wasmtime.WasmtimeError, OSError) as exc:
            log.info("compiling image %s (no usable cache: %s)", img.digest, _first_line(exc))
            cache.unlink(missing_ok=True)
            mod = self.compiler.compile(self.normalized_bytes(img), cache)
            if not cache.exists():
                self._write_cache(img.hex, mod)
            with self._lock:
                self.compiles += 1
        with self._lock:
            self._modules[img.hex] = mod
        return mod

    def instance_pre(self, img: Image) -> tuple[wasmtime.Module, wasmtime.InstancePre]:
        """The module with its imports resolved against the daemon's linker, once per image."""
        mod = self.module(img)
        with self._lock:
            pre = self._pres.get(img.hex)
        if pre is None:
            linker = self.linker if OPENS_FILES in img.imports else self.plain_linker
            pre = linker.instantiate_pre(mod)
            with self._lock:
                self._pres[img.hex] = pre
        return mod, pre

    def normalized_bytes(self, img: Image) -> bytes:
        """The module that runs (``module.wasm``: normalised, as compiled)."""
        return (self.root / "blobs" / img.hex / "module.wasm").read_bytes()

    def module_bytes(self, img: Image) -> bytes:
        return (self.root / "blobs" / img.hex / "original.wasm").read_bytes()

    def _cache_path(self, hexd: str) -> Path:
        return self.root / "cache" / f"{hexd}.{self.fp}.cwasm"

    def _write_cache(self, hexd: str, module: wasmtime.Module) -> None:
        path = self._cache_path(hexd)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(module.serialize())
        os.replace(tmp, path)

    def update_manifest(self, ref: str, patch: contract.ImagePatch) -> Image:
        """Set the image's defaults: entry, args, env, limits {fuel, memory, timeout}. The patch's shape and
        bounds are the contract's (``ImagePatch``); what only the image can say (its exports) is checked
        here. A field left out keeps its value; a limit set to null is removed."""
        img = self.resolve(ref)
        if patch.entry is not UNSET:
            if patch.entry not in img.exports:
                raise BadRequest(f"entry {patch.entry!r} is not an exported function of the image",
                                 code="invalid_entry")
            img.entry = patch.entry
        if patch.args is not UNSET:
            img.args = list(patch.args)
        if patch.env is not UNSET:
            img.env = dict(patch.env)
        if patch.limits is not UNSET:
            lim = contract.to_builtins(patch.limits)  # (fields left out are not in it)
            img.limits = {k: v for k, v in lim.items() if v is not None}
        path = self.root / "blobs" / img.hex / "manifest.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(img) | {"names": []}, indent=1))
        os.replace(tmp, path)
        return img

    def adopt_origin(self, ref: str, original_digest: str | None) -> Image:
        """A rewritten module that came with a snapshot: remember the digest of the module it was made from."""
        img = self.resolve(ref)
        if original_digest and img.original_digest is None and img.digest != original_digest \
                and re.fullmatch(r"sha256:[0-9a-f]{64}", original_digest):
            img.original_digest = original_digest
            img.rewritten_digest = img.digest
            self._write_manifest(img)
        return img

    def record_tables_fixed(self, img: Image) -> None:
        """Work out ``tables_fixed`` for an image that does not have it yet (blocking: an I/O thread)."""
        fixed = rewrite.tables_fixed(self.root / "blobs" / img.hex / "original.wasm") is True
        with self._lock:
            if img.hex not in self.images:
                return  # removed meanwhile
            img.tables_fixed = fixed
            self._write_manifest(img)

    def update_note(self, ref: str, note: str) -> Image:
        img = self.resolve(ref)
        img.snapshot_note = note
        self._write_manifest(img)
        return img

    def _write_manifest(self, img: Image) -> None:
        path = self.root / "blobs" / img.hex / "manifest.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(img) | {"names": []}, indent=1))
        os.replace(tmp, path)

    def remove(self, ref: str) -> Image:
        img = self.resolve(ref)
        with self._lock:
            if ref in self.names and len(img.names) > 1:
                # removing one of several names only untags
                img.names.remove(ref)
                del self.names[ref]
                (self.root / "names" / ref).unlink(missing_ok=True)
                return img
            for n in list(img.names):
                self.names.pop(n, None)
                (self.root / "names" / n).unlink(missing_ok=True)
            self.images.pop(img.hex, None)
            self._modules.pop(img.hex, None)
            self._pres.pop(img.hex, None)
        shutil.rmtree(self.root / "blobs" / img.hex, ignore_errors=True)
        for f in (self.root / "cache").glob(f"{img.hex}.*"):
            f.unlink(missing_ok=True)
        return img

    def list(self) -> list[Image]:
        with self._lock:
            return sorted(self.images.values(), key=lambda i: i.created)


def _looks_like_wat(data: bytes) -> bool:
    head = data[:4096].lstrip()
    while head.startswith(b";;"):
        head = head.split(b"\n", 1)[1].lstrip() if b"\n" in head else b""
    return head.startswith(b"(module") or head.startswith(b"(component")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    if "Caused by:" in lines:
        i = lines.index("Caused by:")
        return "; ".join(lines[:1] + lines[i + 1:i + 3])
    return lines[0]

