"""The `microvm` command-line client (entry point: microvmd.cli.main:main). Keep this file import-free."""
