"""Schemathesis against the OpenAPI document of a live daemon (issue 13 item 9): random requests for every
operation, shaped by the document (valid ones and, in the negative mode, invalid ones), never get a 5xx,
every JSON answer matches the schema the document gives for its status (the Error body for 4xx), and the
daemon serves on after them all.

Schemathesis's pytest plugin does not load under pytest 9, so each operation's strategy is drawn here with
Hypothesis directly, and each case is sent to the daemon through a TCP forwarder to its Unix socket.
"""
from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import schemathesis
from fuzzhelp import FUZZ_EXAMPLES, SLOW_EXAMPLES, UnixForwarder
from hypothesis import HealthCheck, given, settings
from mvapi import Daemon
from schemathesis import GenerationMode

# Streams that follow a VM until it ends are asked without following; waits are asked not to wait.
NO_WAIT = {"follow": "false", "timeout": "0"}


def _operations(daemon: Daemon) -> list[Any]:
    doc = daemon.api.ok("GET", "/v1/openapi.json")
    schema = schemathesis.openapi.from_dict(doc)
    return [op.ok() for op in schema.get_all_operations()]


def _response_schema(doc: dict[str, Any], path: str, method: str, status: int) -> dict[str, Any] | None:
    """The JSON schema the document gives for this answer (with the components, for its $refs), or None."""
    responses = doc["paths"][path][method.lower()]["responses"]
    entry = responses.get(str(status)) or responses.get(f"{str(status)[0]}XX")
    if entry is None:
        return None
    if "$ref" in entry:  # #/components/responses/Error
        entry = doc["components"]["responses"][entry["$ref"].rsplit("/", 1)[1]]
    media = entry.get("content", {}).get("application/json")
    if media is None:
        return None
    return {**media["schema"], "components": doc["components"]}


def _fuzz(daemon: Daemon, fwd: UnixForwarder, examples: int, modes: tuple[GenerationMode, ...]) -> None:
    doc = daemon.api.ok("GET", "/v1/openapi.json")
    ops = _operations(daemon)
    assert len(ops) > 20, [o.label for o in ops]
    failures: list[str] = []
    for op in ops:
        for mode in modes:
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case: Any) -> None:
                if case.query:
                    case.query = {k: NO_WAIT.get(k, v) for k, v in case.query.items()}
                response = case.call(base_url=fwd.url, timeout=60)
                # 501: a part of the API this microvmd documents as not built (the function gateway)
                assert response.status_code < 500 or response.status_code == 501, (
                    case.method, case.formatted_path, case.query, repr(case.body)[:300], response.status_code,
                    response.text[:500])
                if "application/json" in response.headers.get("Content-Type", ""):
                    schema = _response_schema(doc, case.path, case.method, response.status_code)
                    assert schema is not None, ("no documented JSON answer", case.method, case.path,
                                                response.status_code)
                    try:
                        jsonschema.validate(response.json(), schema, cls=jsonschema.Draft202012Validator)
                    except jsonschema.ValidationError as exc:
                        raise AssertionError(("answer does not match its schema", case.method,
                                              case.formatted_path, response.status_code, exc.message[:300],
                                              response.text[:300])) from None

            try:
                run()
            except AssertionError as exc:
                failures.append(str(exc)[:1200])
            except Exception as exc:  # noqa: BLE001 - a strategy Schemathesis cannot build is not our 5xx
                if "Unsatisfiable" not in type(exc).__name__ and "unsatisfiable" not in str(exc).lower():
                    failures.append(f"{op.label} ({mode.value}): {type(exc).__name__}: {str(exc)[:500]}")
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()[-3000:]
    assert daemon.api("GET", "/v1/info").status == 200
    assert not failures, "\n\n".join(failures)


def test_no_request_gets_a_5xx(fuzz_daemon: Daemon, forwarder: UnixForwarder) -> None:
    # (valid requests only: Schemathesis spends about a second per operation building invalid ones)
    _fuzz(fuzz_daemon, forwarder, max(1, FUZZ_EXAMPLES // 5), (GenerationMode.POSITIVE,))


@pytest.mark.slow
def test_no_request_gets_a_5xx_long(fuzz_daemon: Daemon, forwarder: UnixForwarder) -> None:
    _fuzz(fuzz_daemon, forwarder, SLOW_EXAMPLES, (GenerationMode.POSITIVE, GenerationMode.NEGATIVE))
