"""Image import with the Asyncify rewrite (on the event loop; the work runs on I/O threads and in a
subprocess).

``import_module`` decides, per module:
- ``asyncify=False`` (``microvm image import --no-asyncify``), or a module that needs no rewrite (it has
  Asyncify already, or no blocking WASI import): imported as it is;
- a module this daemon rewrote before (same input digest): that image, at once;
- otherwise the rewrite (cached per host, images/rewrite.py) and the rewritten module is the image, with
  the input's digest kept as ``original_digest``. A module Binaryen cannot handle is imported as it is,
  ``stopped_only``, with the reason in ``snapshot_note``.

``background=True`` (the daemon's ``--import-images``): when a rewrite has to run, the module is imported
as it is first (usable at once, not snapshottable), and the name moves to the rewritten image when the
rewrite is done.

While a rewrite runs, ``store.importing`` describes it (``GET /v1/images`` lists it under ``importing``),
which is what ``microvm image import`` polls to show progress.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from . import rewrite, wasmbin
from .store import Image, ImageStore

log = logging.getLogger("microvmd.images")

OnIo = Callable[..., Awaitable[Any]]

_running: dict[str, asyncio.Future[rewrite.Result]] = {}  # cache key -> the rewrite in progress
_background: set[asyncio.Task[Any]] = set()


async def import_module(store: ImageStore, data: bytes, name: str | None, entry: str | None, *,
                        on_io: OnIo, asyncify: bool = True, background: bool = False, durable: bool = True) -> Image:
    module, fmt, hexd = await on_io(store.prepare, data, name)
    if not asyncify:
        return await _as_is(store, on_io, durable, module, name, entry, hexd, "imported with --no-asyncify", fmt)
    try:
        info = await on_io(wasmbin.parse, module)
    except wasmbin.WasmFormatError:
        return await _import(store, on_io, durable, module, name, entry)  # (import_bytes says why)
    if rewrite.is_rewritten(info):  # e.g. the module of a snapshot made on another host
        return await _import(store, on_io, durable, module, name, entry, {"source_format": fmt})
    reason = rewrite.skip_reason(info)
    if reason is not None:
        return await _as_is(store, on_io, durable, module, name, entry, hexd, reason, fmt)
    done = store.find_rewrite_of(hexd)
    if done is not None:
        return await _import(store, on_io, durable, await on_io(store.module_bytes, done), name, entry)
    version = await on_io(rewrite.binaryen_version)
    if version is None:
        return await _as_is(store, on_io, durable, module, name, entry, hexd,
                            "not rewritten: Binaryen's wasm-opt is not installed", fmt)
    key = rewrite.RewriteCache.key(hexd, version)
    cached = await on_io(store.rewrites.get, key)
    if cached is not None:
        return await _finish(store, on_io, durable, module, name, entry, hexd, cached, version, fmt)
    if background:
        first = await _as_is(store, on_io, durable, module, name, entry, hexd,
                             "being rewritten with Asyncify in the background; not snapshottable until then", fmt)
        task = asyncio.ensure_future(_rewrite_then_import(store, on_io, durable, module, name, entry, hexd, key,
                                                          version))
        _background.add(task)
        task.add_done_callback(_background.discard)
        return first
    result = await _rewrite(store, on_io, module, name, hexd, key)
    return await _finish(store, on_io, durable, module, name, entry, hexd, result, version, fmt)


async def _import(store: ImageStore, on_io: OnIo, durable: bool, module: bytes, name: str | None,
                  entry: str | None, meta: dict[str, Any] | None = None) -> Image:
    """Every image an import writes goes through here: ``durable`` (the request's; false for the
    benchmarks' throw-away images) says whether its files are fsynced before it counts as imported."""
    img: Image = await on_io(functools.partial(store.import_bytes, durable=durable), module, name, entry, meta)
    return img


async def _as_is(store: ImageStore, on_io: OnIo, durable: bool, module: bytes, name: str | None, entry: str | None,
                 hexd: str, note: str, fmt: str = "wasm") -> Image:
    return await _import(store, on_io, durable, module, name, entry, {"snapshot_note": note, "source_format": fmt})


async def _finish(store: ImageStore, on_io: OnIo, durable: bool, module: bytes, name: str | None,
                  entry: str | None, hexd: str, result: rewrite.Result, version: str, fmt: str = "wasm") -> Image:
    if result.module is None:
        log.warning("image %s (sha256:%s) is imported as it is, stopped_only: %s", name or "-", hexd[:12],
                    result.reason)
        return await _as_is(store, on_io, durable, module, name, entry, hexd, f"stopped_only: {result.reason}", fmt)
    note = f"rewritten with Asyncify by {version}" + (f" in {result.seconds:.1f} s" if result.seconds else "")
    try:
        module_out: bytes = await on_io(rewrite.to_host_imports, result.module)
    except (wasmbin.WasmFormatError, StopIteration) as exc:
        return await _as_is(store, on_io, durable, module, name, entry, hexd,
                            f"stopped_only: the rewritten module is not readable: {exc}", fmt)
    rewritten_hex = await on_io(_sha256, module_out)
    return await _import(store, on_io, durable, module_out, name, entry,
                         {"original_digest": f"sha256:{hexd}", "rewritten_digest": f"sha256:{rewritten_hex}",
                          "snapshot_note": note, "source_format": fmt})


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


async def _rewrite(store: ImageStore, on_io: OnIo, module: bytes, name: str | None, hexd: str,
                   key: str, job: str | None = None) -> rewrite.Result:
    """One rewrite per key at a time: a second import of the same module waits for the first one. ``job``:
    the caller's ``store.importing`` entry, which it removes itself once the rewritten module is imported
    (without one, the entry goes when the rewrite ends)."""
    fut = _running.get(key)
    if fut is not None:
        return await asyncio.shield(fut)
    fut = asyncio.get_running_loop().create_future()
    _running[key] = fut
    owned = job is None
    job = job or uuid.uuid4().hex[:12]
    expected = rewrite.expected_seconds(len(module))
    store.importing[job] = {"id": job, "name": name, "original_digest": f"sha256:{hexd}", "size": len(module),
                            "phase": "asyncify", "started": time.time(), "elapsed": 0.0,
                            "expected_seconds": round(expected)}
    log.info("rewriting %s (sha256:%s, %d bytes) with Asyncify; about %.0f s", name or "-", hexd[:12],
             len(module), expected)

    def progress(elapsed: float) -> None:
        if job in store.importing:
            store.importing[job]["elapsed"] = round(elapsed, 1)

    try:
        result = await rewrite.run_wasm_opt(module, store.rewrites.work, on_io, progress)
        await on_io(store.rewrites.put, key, result)
        fut.set_result(result)
        log.info("rewrite of %s done in %.1f s: %s", name or "-", result.seconds,
                 "ok" if result.module is not None else result.reason)
        return result
    except BaseException as exc:
        fut.set_exception(exc)
        fut.exception()  # (retrieved: waiters see it through their shield)
        raise
    finally:
        _running.pop(key, None)
        if owned:
            store.importing.pop(job, None)
        elif job in store.importing:
            store.importing[job]["phase"] = "import"  # compiling the rewritten module, then the name moves


async def _rewrite_then_import(store: ImageStore, on_io: OnIo, durable: bool, module: bytes, name: str | None,
                               entry: str | None, hexd: str, key: str, version: str) -> None:
    # listed under `importing` until the name has moved to the rewrite: a client that waits for an empty
    # list (bench/_common.py, tests) then finds the image it asked for snapshottable
    job = uuid.uuid4().hex[:12]
    try:
        result = await _rewrite(store, on_io, module, name, hexd, key, job)
        if result.module is None:
            await _import(store, on_io, durable, module, name, entry,
                          {"snapshot_note": f"stopped_only: {result.reason}"})
            await on_io(store.update_note, f"sha256:{hexd}", f"stopped_only: {result.reason}")
            return
        img = await _finish(store, on_io, durable, module, name, entry, hexd, result, version)
        if img.rewritten_digest is not None:  # the module as it was stays for the VMs made from it meanwhile
            await on_io(store.update_note, f"sha256:{hexd}", f"stopped_only: its rewrite is image {img.digest}")
        log.info("image %s is now the rewritten module %s (snapshottable)", name or "-", img.digest[:19])
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a background job has nobody to answer: log it
        log.error("background rewrite of %s failed: %s", name or "-", exc)
    finally:
        store.importing.pop(job, None)


def analyse_tables_later(store: ImageStore, on_io: OnIo) -> None:
    """Images with Asyncify imported by a daemon that did not record ``tables_fixed`` get it worked out once,
    in the background (a Binaryen run of about 2 s for CPython); until then their VMs record their tables."""
    todo = [img for img in store.list() if img.asyncify and img.tables_fixed is None]
    if not todo:
        return

    async def run() -> None:
        for img in todo:
            try:
                await on_io(store.record_tables_fixed, img)
            except OSError as exc:
                log.warning("cannot analyse the tables of image %s: %s", img.digest[:19], exc)

    task = asyncio.ensure_future(run())
    _background.add(task)
    task.add_done_callback(_background.discard)
