"""Functions are not built yet: their routes say so with a 501, the gateway flag is refused at start-up."""
from __future__ import annotations

import subprocess
import sys

from mvapi import REPO, Api


def test_function_routes_answer_501(api: Api) -> None:
    for method, path in (("GET", "/v1/functions"), ("POST", "/v1/functions"), ("POST", "/v1/functions/f/invoke")):
        r = api(method, path, {})
        assert r.status == 501 and r.error["code"] == "not_implemented", (method, path, r.status)
        assert "not part of this microvmd" in r.error["message"]


def test_gateway_flag_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = subprocess.run([sys.executable, "-m", "microvmd.daemon", "--socket", str(tmp_path / "s.sock"),
                        "--state-dir", str(tmp_path / "st"), "--gateway", "127.0.0.1:9"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 2 and "--gateway" in p.stderr
