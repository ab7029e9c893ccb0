"""Fixtures for tests/cli: see clifake.py."""
from clifake import cli, fake_daemon  # noqa: F401  (pytest fixtures)
