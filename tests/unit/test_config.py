"""The config loader: retired keys are ignored with a warning, unknown keys are still refused."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from microvmd.config import ConfigError, load
from microvmd.daemon import parse_args


def _load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    cfg = tmp_path / "microvmd.toml"
    cfg.write_text(text)
    return load(parse_args(["--config", str(cfg), "--state-dir", str(tmp_path / "state"),
                            "--socket", str(tmp_path / "s.sock")]))


def test_retired_engine_key_is_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="microvmd.config"):
        cfg = _load(tmp_path, '[engine]\ncache_compiled = false\nspin_wait = "1ms"\n')
    assert cfg.engine.spin_wait == pytest.approx(0.001)
    assert not hasattr(cfg.engine, "cache_compiled")
    assert any("cache_compiled is ignored" in r.getMessage() for r in caplog.records)


def test_unknown_engine_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cache_compiledd"):
        _load(tmp_path, "[engine]\ncache_compiledd = true\n")


def test_gateway_bounds(tmp_path: Path) -> None:
    cfg = _load(tmp_path, '[daemon]\ngateway_connections = 64\ngateway_idle_timeout = "2500ms"\n'
                          'gateway_body_timeout = "5s"\n')
    assert cfg.gateway_connections == 64 and cfg.gateway_idle_timeout == pytest.approx(2.5)
    assert cfg.gateway_body_timeout == 5.0
    default = _load(tmp_path, "")
    assert default.gateway_connections == 0 and default.gateway_idle_timeout == 15.0  # 0: half the reserve
    assert default.gateway_body_timeout == 30.0
    for bad in ("gateway_connections = -1", "gateway_connections = true", 'gateway_idle_timeout = "0s"',
                'gateway_idle_timeout = "2h"', "gateway_body_timeout = 0"):
        with pytest.raises(ConfigError, match=bad.split(" ")[0]):
            _load(tmp_path, f"[daemon]\n{bad}\n")
