"""The builder: a VM's machine (store, instance, console) made from its image, by one of two paths.

- ``boot``: a fresh instance, its entry not yet called (``boot_and_run`` also runs its first slice on the
  vCPU worker that built it, so a short guest finishes without another thread hand-off);
- ``restore``: a fresh instance whose memory, globals, tables and fuel are then set from a snapshot.

Both run off the event loop (an I/O thread or a vCPU worker). The builder also keeps the count of console
descriptors: a file-mode console holds two per live VM, and ``auto`` keeps them within half the limit.
"""
from __future__ import annotations

import resource
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import wasmtime

from ..config import Config
from ..devices.console import Console
from ..devices.wasip1 import helper_module
from ..engine import wt
from ..errors import Unprocessable
from ..images.store import Image, ImageStore
from .budget import MemoryBudget
from .machine import Machine, MachineSpec
from .vm import Vm

ABI_VERSION = 1


@dataclass
class RestoreData:
    memory_size: int
    load: Callable[[int, int], None]            # fills guest memory at (address, size)
    clear: Callable[[int, int], None]           # zeroes what the snapshot has as zeros at (address, below)
    globals: dict[str, tuple[str, int | float]]
    unwound: bool
    fuel_consumed: int
    fuel_budget: int | None
    devices: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)  # only the tables the guest changed


class Builder:
    def __init__(self, cfg: Config, engine: wasmtime.Engine, linker: wasmtime.Linker, images: ImageStore) -> None:
        self.cfg = cfg
        self.engine = engine
        self.linker = linker
        self.images = images
        self.memory = MemoryBudget(cfg.limits.total_memory_budget())  # what all guests together may hold
        self._console_fds = 0
        self._console_lock = threading.Lock()
        # images whose microvm_abi_version was checked (a constant of the module: asked once, not at every
        # VM; a function's fresh instance per request paid for the guest call each time)
        self._abi_checked: set[str] = set()
        helper_module(engine)  # (compiled now, not by the first VM that opens a file, on its vCPU worker)

    # ------------------------------------------------------------------ consoles
    def console_mode(self, vm: Vm) -> None:
        """At create, on the loop: file mode (and two descriptors reserved) or the hook for this console."""
        if vm.spec.ephemeral or not isinstance(vm.console, Console):
            return  # in memory: no descriptor
        mode = self.cfg.engine.console
        if mode == "hook":
            return
        with self._console_lock:
            if mode == "auto" and self._console_fds + 2 > resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2:
                return
            self._console_fds += 2
        vm.console.use_files = True

    def free_console(self, vm: Vm) -> bool:
        """After the store is closed: give back a file-mode console's two descriptors (once)."""
        with self._console_lock:
            if not vm.console.use_files:
                return False
            vm.console.use_files = False
            self._console_fds -= 2
        return True

    def console_fds(self) -> int:
        return self._console_fds

    # ------------------------------------------------------------------ the two paths
    def boot(self, vm: Vm, img: Image) -> None:
        """Off the loop: a fresh machine for ``vm``, its entry not yet called."""
        self._instantiate(vm, img)
        vm.sync_from_machine()

    def boot_and_run(self, vm: Vm, img: Image, run_slice: Callable[[Vm], Any]) -> Any:
        """On a vCPU worker: boot, then the first slice (boot errors raise; slice errors are returned)."""
        self.boot(vm, img)
        try:
            return run_slice(vm)
        except Exception as exc:
            return exc

    def restore(self, vm: Vm, img: Image, data: RestoreData) -> None:
        """Off the loop: a fresh machine for ``vm`` holding the snapshot's memory, globals, tables and fuel."""
        machine = self._instantiate(vm, img)
        try:
            machine.restore(data.memory_size, data.load, data.globals, data.unwound, data.fuel_consumed,
                            data.clear, data.tables)
        except (ValueError, wasmtime.WasmtimeError) as exc:
            raise Unprocessable(f"the snapshot does not fit its image: {str(exc).splitlines()[0]}",
                                code="invalid_snapshot") from None
        vm.fuel_budget = data.fuel_budget
        vm.snapshot_kind = "asyncify" if machine.asyncify is not None else "stopped_only"
        vm.sync_from_machine()

    # ------------------------------------------------------------------ shared
    def _instantiate(self, vm: Vm, img: Image) -> Machine:
        lim = self.cfg.limits
        argv0 = vm.image_name if not vm.image_name.startswith("sha256:") else "guest"
        mspec = MachineSpec(
            args=[argv0, *(vm.spec.args or img.args)], env={**img.env, **vm.spec.env},
            dirs=[(x.host, x.guest, x.readonly) for x in vm.spec.dirs], memory_limit=vm.memory_limit,
            table_elements=lim.table_elements, instances=lim.instances, tables=lim.tables,
            memories=lim.memories, stdout=vm.console.writer("stdout"), stderr=vm.console.writer("stderr"),
            entry=img.entry or "", boot=list(img.boot),
            asyncify_globals=tuple(img.asyncify_globals) if img.asyncify_globals else None,  # type: ignore[arg-type]
            tables_fixed=img.tables_fixed is True, budget=self.memory,
        )
        if isinstance(vm.console, Console) and vm.console.use_files:
            mspec.stdout_file, mspec.stderr_file = vm.console.files()
        if img.entry is None:
            mspec.entry = mspec.boot.pop() if mspec.boot else ""
        module, pre = self.images.instance_pre(img)
        wt.set_current_vm(vm)
        try:
            machine = vm.machine = Machine(self.engine, self.linker, module, mspec, pre)
        except wt.InstantiationError as exc:
            msg = str(exc)
            if "memory" in msg and ("limit" in msg or "minimum" in msg or "exceeds" in msg or "resource" in msg):
                raise Unprocessable(f"memory_limit: the module needs more memory than the VM's limit of "
                                    f"{vm.memory_limit} bytes ({msg})", code="memory_limit") from None
            raise Unprocessable(f"instantiation failed: {msg}", code="instantiation_failed") from None
        except wasmtime.WasmtimeError as exc:
            raise Unprocessable(f"cannot set up the VM: {str(exc).splitlines()[0]}", code="vm_setup_failed") from None
        finally:
            wt.set_current_vm(None)
        if img.kind == "sdk" and img.digest not in self._abi_checked \
                and machine.export("microvm_abi_version") is not None:
            try:
                want = machine.call_sync("microvm_abi_version")[0]
            except (RuntimeError, TimeoutError, KeyError) as exc:
                raise Unprocessable(f"the guest's microvm_abi_version failed: {exc}", code="abi_check_failed") from None
            if want > ABI_VERSION:
                raise Unprocessable(f"the guest was built for microvm ABI version {want}; this daemon serves "
                                    f"version {ABI_VERSION}: rebuild it with this SDK or upgrade microvmd",
                                    code="abi_version_unsupported")
            self._abi_checked.add(img.digest)
        return machine
