"""README.md's "A five-minute tour", run as written against a real daemon, so the README and the code cannot
drift apart (issue 14, item 8).

Each command line of the tour's code block runs, in order, in one bash process (so ``id=$(...)`` carries
over), with ``MICROVM_SOCKET`` and ``PATH`` set as the README says. Its exit status must be the one its
comment promises (``exit N``, ``code (N)``; else 0), and every quoted phrase in its comment (``"timeout"``)
must be in its output. Only what cannot be the same on a test machine is replaced: the published port 8000
(a free port), the function gateway's 8080 (a free port), the migration target ``/run/other/microvmd.sock`` (a
second daemon), and ``images/`` paths (the repository's). The CPython and QuickJS lines run only when the
interpreters were fetched (``make run`` fetches and imports them; the tests do not need the network).
"""
from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from mvapi import IMAGES, REPO, Daemon, free_port

# what a comment cannot say: curl's --max-time ends its session (exit 28) after kv's answers
NO_STATUS = ("telnet://",)
EXTRA_OUTPUT = {"telnet://": ["OK", "hello"]}


def tour_lines(readme: str) -> list[str]:
    """The tour's commands: its first ```sh block; a quoted argument may span lines."""
    section = readme.split("## A five-minute tour", 1)[1]
    block = section.split("```sh\n", 1)[1].split("\n```", 1)[0]
    lines: list[str] = []
    pending = ""
    for raw in block.splitlines():
        pending = f"{pending}\n{raw}" if pending else raw
        if _code(pending).count("'") % 2 == 0:  # a single-quoted argument is closed
            if pending.strip():
                lines.append(pending)
            pending = ""
    assert not pending, f"unbalanced quote in the tour: {pending!r}"
    return lines


def _code(line: str) -> str:
    """The line without its trailing comment (a # outside quotes, after a space)."""
    quoted = False
    for i, ch in enumerate(line):
        if ch == "'":
            quoted = not quoted
        elif ch == "#" and not quoted and (i == 0 or line[i - 1] == " "):
            return line[:i].rstrip()
    return line


def _comment(line: str) -> str:
    return line[len(_code(line)):].lstrip(" #")


def expected_status(comment: str) -> int:
    m = re.search(r"\bexit (\d+)\b", comment) or re.search(r"\bcode \((\d+)\)", comment)
    return int(m[1]) if m else 0


def test_the_readme_tour_runs_as_written(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    lines = tour_lines(readme)
    assert any(line.startswith("microvm info") for line in lines) and len(lines) > 20, lines
    gateway = free_port()
    d = make_daemon("--import-images", str(IMAGES), "--gateway", f"127.0.0.1:{gateway}")
    other = make_daemon()
    have_python = (IMAGES / "python" / "python.wasm").exists()
    have_js = (IMAGES / "js" / "js.wasm").exists()
    if have_python:
        # what `make run` (--import-fetched) gives the tour: an image named python. The tour only talks to
        # the REPL, so it is imported as it is (seconds), not rewritten for snapshots (minutes on 2 cores)
        r = d.api("POST", "/v1/images?name=python&no_asyncify=true",
                  raw=(IMAGES / "python" / "python.wasm").read_bytes(), timeout=600)
        assert r.status == 201, r.text
    port = free_port()

    script = ["set +e", f"export MICROVM_SOCKET={d.socket}", f"export PATH={Path(sys.executable).parent}:$PATH"]
    checks: list[tuple[int, str, int | None, list[str]]] = []
    for n, line in enumerate(lines):
        code = _code(line)
        if not code or (not have_python and re.search(r"\bpython\b|\battach py\b", code)):
            continue
        if not have_js and re.search(r"--js\b|\bfn invoke hi\b", code):
            continue
        code = code.replace("unix:///run/other/microvmd.sock", f"unix://{other.socket}")
        code = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        code = code.replace("127.0.0.1:8080", f"127.0.0.1:{gateway}")  # the function gateway
        code = re.sub(r"(?<![\w/])images/", f"{IMAGES}/", code)
        comment = _comment(line)
        status: int | None = expected_status(comment)
        if any(k in code for k in NO_STATUS):
            status = None
        phrases = re.findall(r'"([^"]+)"', comment)
        phrases += next((v for k, v in EXTRA_OUTPUT.items() if k in code), [])
        if status == 0 and "'" not in code:  # each command of a `a; b` line must succeed, not only the last
            code = code.replace("; ", " && ")
        script.append(f"{{ {code}\n}} </dev/null >{tmp_path}/out.{n} 2>&1; echo $? >{tmp_path}/rc.{n}")
        checks.append((n, line, status, phrases))
    subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, timeout=600, check=True)

    failed = []
    for n, line, status, phrases in checks:
        out = (tmp_path / f"out.{n}").read_text(errors="replace")
        rc = int((tmp_path / f"rc.{n}").read_text())
        missing = [p for p in phrases if p not in out]
        if (status is not None and rc != status) or missing:
            failed.append(f"{line}\n  -> exit {rc} (README says {status}), missing {missing}, output:\n{out[-800:]}")
    assert not failed, "\n\n".join(failed)
    # and what the tour did is there: the migrated VM runs on the other daemon, the exported file exists
    assert other.get("kv1")["state"] == "running"
    assert (tmp_path / "s1.mvsnap").stat().st_size > 0
