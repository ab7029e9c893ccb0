"""The compile subprocess (images/compiler.py): module bytes on stdin, wasmtime's serialized module written
to the path given, for an engine made with the daemon's options (so the daemon can map the result).

``python -m microvmd.images.compile_child '<EngineOptions as JSON>' OUT``; exit status 2 with
``invalid module: ...`` on stderr when wasmtime refuses the module, anything else non-zero when the child
failed (out of its memory limit, killed).
"""
from __future__ import annotations

import json
import sys

import wasmtime

from ..engine import wt


def main(argv: list[str]) -> int:
    opts = wt.EngineOptions(**json.loads(argv[1]))
    engine = wt.make_engine(opts)
    data = sys.stdin.buffer.read()
    try:
        module = wasmtime.Module(engine, data)
    except wasmtime.WasmtimeError as exc:
        text = str(exc).strip()
        sys.stderr.write("invalid module: " + (text.splitlines()[0] if text else "refused") + "\n")
        return 2
    with open(argv[2], "wb") as f:
        f.write(module.serialize())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
