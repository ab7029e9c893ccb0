"""Shared test set-up: every test directory can use the real-daemon helpers in tests/integration/mvapi.py."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "integration"))
