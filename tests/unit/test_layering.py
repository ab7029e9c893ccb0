"""The parts of microvmd/ form layers: a part imports only parts of lower layers, so there is no cycle.

Every import counts, lazy ones inside functions too. The layers are the architecture of docs/architecture.md:
a new arrow that points upwards fails here with the file and line that drew it.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "microvmd"

# lowest first; a part may import its own layer's leaves only when listed in SAME_LAYER_OK
LAYERS: list[set[str]] = [
    {"errors", "units", "looplag", "heaptrim", "logsafe", "systemd", "engine", "durable"},
    {"config", "contract"},
    {"images"},
    {"devices"},
    {"vmm"},
    {"snapshot"},
    {"functions"},
    {"control"},
    {"api"},
    {"daemon", "cli"},
]
SAME_LAYER_OK = {("config", "contract")}


def _part(module: str) -> str | None:
    bits = module.split(".")
    return bits[1] if bits[0] == "microvmd" and len(bits) > 1 else None


def _edges() -> list[tuple[str, str, str]]:
    """(from part, to part, file:line) for every import between two parts."""
    found = []
    for f in PACKAGE.rglob("*.py"):
        rel = f.relative_to(PACKAGE.parent).with_suffix("").parts
        pkg = list(rel[:-1])
        here = _part(".".join(rel if f.name != "__init__.py" else rel[:-1]))
        if here is None or here == "__init__":
            continue
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg[: len(pkg) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                there = _part(t)
                if there and there != here and there != "__version__":
                    found.append((here, there, f"{f.relative_to(PACKAGE.parent)}:{node.lineno}"))
    return found


def _layer(part: str) -> int:
    for i, layer in enumerate(LAYERS):
        if part in layer:
            return i
    raise AssertionError(f"microvmd/{part} is in no layer: add it to LAYERS in {__file__}")


def test_every_import_points_down() -> None:
    upward = [f"{where}: {a} -> {b}" for a, b, where in _edges()
              if _layer(b) > _layer(a) or (_layer(b) == _layer(a) and (a, b) not in SAME_LAYER_OK)]
    assert not upward, "imports that point up (or across) the layers:\n" + "\n".join(sorted(upward))


def test_the_edges_are_found() -> None:
    """The scan itself works: the api imports the vmm, lazily or not."""
    assert ("api", "vmm") in {(a, b) for a, b, _ in _edges()}


def test_the_api_reaches_guests_only_through_the_controller() -> None:
    """HTTP handlers decode, apply an action and encode: nothing in api/ imports wasmtime, the engine layer,
    the snapshot store or the image store (the hypervisor type is named only for configuration and metrics)."""
    forbidden = ("wasmtime", "microvmd.engine", "microvmd.snapshot", "microvmd.images", "microvmd.vmm.vm",
                 "microvmd.vmm.machine", "microvmd.vmm.scheduler")
    found = []
    for f in (PACKAGE / "api").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [x.name for x in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = "microvmd." if node.level == 2 else ("microvmd.api." if node.level == 1 else "")
                names = [base + (node.module or "")] + [f"{base}{x.name}" for x in node.names if not node.module]
            else:
                continue
            found += [f"{f.name}:{node.lineno} {n}" for n in names if n.startswith(forbidden)]
    assert not found, "api/ reaches past the controller:\n" + "\n".join(found)
