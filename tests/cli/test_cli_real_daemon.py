"""The client against the real microvmd (a private daemon with the sample images imported).

Skipped when the daemon cannot start here (for example without its dependencies).
"""
import os

import pytest
from clifake import REPO, run_cli
from mvapi import IMAGES, Daemon


@pytest.fixture(scope="module")
def sock():
    try:
        d = Daemon.fresh("mvc-real-", "--import-images", str(IMAGES), env={"PYTHONPATH": REPO})
    except AssertionError as exc:  # the daemon cannot start here
        pytest.skip(str(exc)[-2000:])
    with d:
        yield str(d.socket)


def mv(sock, *args, **kw):
    return run_cli(*args, socket=sock, **kw)


def test_run_hello_exits_with_its_code(sock):
    r = mv(sock, "run", "--rm", "--env", "WHO=cli", "hello", "3", "--flag")
    assert r.returncode == 3, r.stderr
    assert r.stdout.decode().splitlines() == ["Hello from microvmd!", "arg[1]=3", "arg[2]=--flag", "WHO=cli"]


def test_run_out_of_fuel_exits_137(sock):
    r = mv(sock, "run", "--rm", "--fuel", "1M", "spin")
    assert r.returncode == 137
    assert r.stderr.decode().endswith("stopped by host: out_of_fuel\n")


def test_run_timeout_exits_137(sock):
    r = mv(sock, "run", "--rm", "--timeout", "200ms", "spin", "100000000000")
    assert r.returncode == 137
    assert r.stderr.decode().endswith("stopped by host: timeout\n")


def test_file_upload_create_start_wait_logs(sock):
    r = mv(sock, "create", "--name", "cli-hello", os.path.join(REPO, "images", "hello", "hello.wasm"), "x")
    assert r.returncode == 0, r.stderr
    vm_id = r.stdout.decode().splitlines()[-1]
    assert mv(sock, "start", "cli-hello").returncode == 0
    assert mv(sock, "wait", vm_id[:12]).returncode == 0
    assert "arg[1]=x" in mv(sock, "logs", "cli-hello").stdout.decode()
    assert "cli-hello" in mv(sock, "ps", "-a").stdout.decode()
    assert mv(sock, "rm", "cli-hello").returncode == 0


def test_fuel_add_continues(sock):
    r = mv(sock, "run", "-d", "--name", "cli-fuel", "--fuel", "500000", "spin", "10000000")
    assert r.returncode == 0, r.stderr
    assert mv(sock, "wait", "cli-fuel").returncode == 137
    assert mv(sock, "fuel", "add", "cli-fuel", "10G").returncode == 0
    assert mv(sock, "wait", "cli-fuel").returncode == 0
    assert "checksum" in mv(sock, "logs", "cli-fuel").stdout.decode()
    assert mv(sock, "rm", "cli-fuel").returncode == 0


def test_api_error_exits_125(sock):
    r = mv(sock, "inspect", "no-such-vm")
    assert r.returncode == 125
    assert r.stderr.decode().startswith("microvm: ") and r.stderr.decode().rstrip().endswith(")")
