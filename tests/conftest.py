"""Shared test set-up: every test directory can use the real-daemon helpers in tests/integration/mvapi.py.

Every test runs with the VM runtime guard on (microvmd/vmm/runtime.py): a runtime field set other than by
``VmRuntime.apply`` on the event loop raises, in the hypervisors the tests build in-process and in every
daemon they start (the variable is inherited)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["MICROVMD_STRICT_RUNTIME"] = "1"  # (before microvmd is imported: runtime.py reads it then)
sys.path.insert(0, str(Path(__file__).resolve().parent / "integration"))
