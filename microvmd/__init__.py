"""microvmd: a lightweight hypervisor for WebAssembly micro-VMs."""
from __future__ import annotations

__version__ = "0.1.0"
