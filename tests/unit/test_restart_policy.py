"""Restart policies: parsing and docker's decisions (microvmd/vmm/restart.py)."""
from __future__ import annotations

import pytest

from microvmd.vmm.restart import MAX_DELAY, RestartPolicy, delay


def test_parse_and_print() -> None:
    assert str(RestartPolicy.parse(None)) == "no"
    assert str(RestartPolicy.parse("on-failure:3")) == "on-failure:3"
    assert RestartPolicy.parse("on-failure").max_retries is None
    for bad in ("sometimes", "on-failure:", "always:2", "on-failure:-1"):
        with pytest.raises(ValueError):
            RestartPolicy.parse(bad)


def test_after_exit() -> None:
    p = RestartPolicy.parse
    assert not p("no").after_exit(True, False, 0)
    assert p("on-failure:2").after_exit(True, False, 1)
    assert not p("on-failure:2").after_exit(True, False, 2)
    assert not p("on-failure").after_exit(False, False, 0)
    assert p("always").after_exit(False, False, 99)
    assert not p("always").after_exit(True, True, 0)
    assert not p("unless-stopped").after_exit(True, True, 0)


def test_at_daemon_start() -> None:
    p = RestartPolicy.parse
    assert p("always").at_daemon_start(False, True, 0)
    assert not p("unless-stopped").at_daemon_start(False, True, 0)
    assert p("unless-stopped").at_daemon_start(False, False, 0)
    assert p("on-failure:1").at_daemon_start(True, False, 0)
    assert not p("on-failure:1").at_daemon_start(False, False, 0)
    assert not p("no").at_daemon_start(True, False, 0)


def test_back_off_doubles_to_a_cap() -> None:
    assert [delay(n) for n in range(4)] == [0.1, 0.2, 0.4, 0.8]
    assert delay(50) == MAX_DELAY
