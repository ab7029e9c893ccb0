"""Command line -> VM spec (vm_spec_from_args) and exit object -> exit status (exit_status)."""
import argparse
import os

import pytest

from microvmd.cli.main import build_parser
from microvmd.cli.spec import (
    UsageError,
    exit_status,
    looks_like_file,
    parse_dir,
    parse_disk,
    parse_egress,
    parse_publish,
    vm_spec_from_args,
)


def spec(*argv, cwd="/work", environ=None):
    ns = build_parser().parse_args(list(argv))
    return vm_spec_from_args(ns, cwd=cwd, environ=environ or {})


def test_minimal_run_spec():
    assert spec("run", "hello") == {
        "image": "hello", "name": None, "args": [], "env": {}, "fuel": None, "memory": None,
        "timeout": None, "dirs": [], "disks": [], "publish": [], "allow_egress": [],
        "ephemeral": False, "stdin": False, "start": True,
    }


def test_create_does_not_start():
    s = spec("create", "hello")
    assert s["start"] is False and s["ephemeral"] is False


def test_full_spec():
    s = spec(
        "run", "--name", "job", "--fuel", "10M", "--memory", "64MiB", "--timeout", "1m30s",
        "--env", "A=1", "-e", "B=x=y", "--env", "A=2", "--env", "EMPTY=",
        "--dir", "/srv/data", "--dir", "rel::/mnt:ro", "--dir", "/a::/b",
        "--disk", "d1", "--disk", "d2:ro", "--disk", "d3:cow",
        "--publish", "8080:8000", "-p", "0.0.0.0:9000:90", "--publish", "[::1]:81:80",
        "--allow-egress", "example.com:443", "--allow-egress", "10.0.0.0/8:5432",
        "app", "--verbose", "-x", "--name", "inner",
    )
    assert s == {
        "image": "app",
        "name": "job",
        "args": ["--verbose", "-x", "--name", "inner"],
        "env": {"A": "2", "B": "x=y", "EMPTY": ""},
        "fuel": 10_000_000,
        "memory": 64 * 1024 * 1024,
        "timeout": 90.0,
        "dirs": [
            {"host": "/srv/data", "guest": "/srv/data", "readonly": False},
            {"host": "/work/rel", "guest": "/mnt", "readonly": True},
            {"host": "/a", "guest": "/b", "readonly": False},
        ],
        "disks": [{"name": "d1", "mode": "rw"}, {"name": "d2", "mode": "ro"}, {"name": "d3", "mode": "cow"}],
        "publish": [
            {"host_ip": "127.0.0.1", "host_port": 8080, "guest_port": 8000},
            {"host_ip": "0.0.0.0", "host_port": 9000, "guest_port": 90},
            {"host_ip": "::1", "host_port": 81, "guest_port": 80},
        ],
        "allow_egress": ["example.com:443", "10.0.0.0/8:5432"],
        "ephemeral": False,
        "stdin": False,
        "start": True,
    }


def test_guest_args_pass_through():
    assert spec("run", "hello", "--json", "-d", "--rm")["args"] == ["--json", "-d", "--rm"]
    # argparse drops the `--` that separates IMAGE from the guest's arguments, and only that one.
    assert spec("run", "hello", "--", "--x")["args"] == ["--x"]
    assert spec("run", "hello", "--", "--", "x")["args"] == ["--", "x"]
    assert spec("run", "hello", "a", "--", "b")["args"] == ["a", "--", "b"]
    assert spec("run", "--rm", "--", "hello", "-v")["args"] == ["-v"]


def test_options_after_image_belong_to_the_guest():
    s = spec("run", "hello", "--name", "x")
    assert s["name"] is None and s["args"] == ["--name", "x"]


def test_rm_makes_the_vm_ephemeral_and_an_attached_run_starts_it_itself():
    assert spec("run", "--rm", "hello")["ephemeral"] is True
    assert spec("run", "--rm", "hello")["start"] is False  # started with start?wait=true once attached
    assert spec("run", "--rm", "-d", "hello")["start"] is True
    assert spec("create", "--rm", "hello")["ephemeral"] is True
    assert spec("run", "hello")["ephemeral"] is False


def test_i_keeps_stdin_open_and_an_attached_run_starts_the_vm_itself():
    s = spec("run", "-i", "python")
    assert s["stdin"] is True and s["start"] is False  # started with start?wait=true once stdin streams
    assert spec("run", "-d", "-i", "python")["start"] is True
    assert spec("create", "-i", "python")["stdin"] is True


def test_env_bare_key_copies_the_clients_value():
    assert spec("run", "--env", "HOME", "--env", "UNSET", "x", environ={"HOME": "/root"})["env"] == {"HOME": "/root"}


def test_dir_relative_host_is_made_absolute():
    assert parse_dir("data", cwd="/home/u") == {"host": "/home/u/data", "guest": "data", "readonly": False}
    assert parse_dir(".::/app", cwd="/home/u") == {"host": "/home/u", "guest": "/app", "readonly": False}
    assert parse_dir("/x/:ro") == {"host": "/x", "guest": "/x", "readonly": True}
    assert parse_dir("/x::/y:rw") == {"host": "/x", "guest": "/y", "readonly": False}
    assert parse_dir("~/d", cwd="/") ["host"] == os.path.expanduser("~/d")


def test_dir_default_cwd_is_the_process_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_dir("sub")["host"] == str(tmp_path / "sub")


@pytest.mark.parametrize("bad", ["", "::/g", "/h::", ":ro"])
def test_dir_rejects(bad):
    with pytest.raises(UsageError, match="--dir"):
        parse_dir(bad)


@pytest.mark.parametrize("bad", ["", ":ro", "d:rx", "d:"])
def test_disk_rejects(bad):
    with pytest.raises(UsageError, match="--disk"):
        parse_disk(bad)


def test_publish_forms():
    assert parse_publish("80") == {"host_ip": "127.0.0.1", "host_port": 0, "guest_port": 80}
    assert parse_publish("8080:80/tcp") == {"host_ip": "127.0.0.1", "host_port": 8080, "guest_port": 80}
    assert parse_publish("::1:8080:80") == {"host_ip": "::1", "host_port": 8080, "guest_port": 80}


@pytest.mark.parametrize("bad", ["", "x:80", "8080:0", "8080:70000", "70000:80", "8080:80/udp", ":8080:80", "a:b:c:d"])
def test_publish_rejects(bad):
    with pytest.raises(UsageError, match="--publish"):
        parse_publish(bad)


@pytest.mark.parametrize("good", ["example.com:443", "10.0.0.0/8:53", "[2001:db8::]/32:443", "1.2.3.4:*"])
def test_egress_accepts(good):
    assert parse_egress(good) == good


@pytest.mark.parametrize("bad", ["example.com", ":443", "host:http", "host:0", "host:65536"])
def test_egress_rejects(bad):
    with pytest.raises(UsageError, match="--allow-egress"):
        parse_egress(bad)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["run", "--memory", "lots", "x"], "--memory"),
        (["run", "--memory", "0", "x"], "--memory"),
        (["run", "--fuel", "-1", "x"], "--fuel"),
        (["run", "--timeout", "soon", "x"], "--timeout"),
        (["run", "--timeout", "0s", "x"], "--timeout"),
        (["run", "--env", "=v", "x"], "--env"),
    ],
)
def test_bad_values_are_usage_errors(argv, match):
    with pytest.raises(UsageError, match=match):
        spec(*argv)


def test_namespace_without_parser():
    ns = argparse.Namespace(command="create", image="hello", args=["a"], memory="1MiB")
    s = vm_spec_from_args(ns)
    assert s["image"] == "hello" and s["args"] == ["a"] and s["memory"] == 1 << 20 and s["start"] is False


@pytest.mark.parametrize(
    "exit_obj, expected",
    [
        ({"code": 0, "reason": "exit"}, (0, None)),
        ({"code": 3, "reason": "exit"}, (3, None)),
        ({"code": None, "reason": "exit"}, (0, None)),
        ({"code": 255, "reason": "exit"}, (255, None)),
        ({"code": 256, "reason": "exit"}, (1, None)),
        ({"code": 257, "reason": "exit"}, (1, None)),
        ({"code": None, "reason": "out_of_fuel"}, (137, "out_of_fuel")),
        ({"code": None, "reason": "timeout"}, (137, "timeout")),
        ({"code": None, "reason": "memory_limit"}, (137, "memory_limit")),
        ({"code": None, "reason": "stack_overflow"}, (137, "stack_overflow")),
        ({"code": None, "reason": "trap: unreachable"}, (137, "trap: unreachable")),
        ({"code": None, "reason": "killed"}, (137, "killed")),
        ({"code": None, "reason": "stopped"}, (137, "stopped")),
        ({"code": None, "reason": "daemon_restart"}, (137, "daemon_restart")),
        ({"code": 1, "reason": "killed"}, (137, "killed")),
        (None, (137, "unknown")),
    ],
)
def test_exit_status(exit_obj, expected):
    assert exit_status(exit_obj) == expected


def test_looks_like_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_like_file("missing.wasm") and looks_like_file("x.wat")
    assert not looks_like_file("hello")
    (tmp_path / "hello").write_text("#!/bin/sh\n")  # an unrelated file named like an image
    assert not looks_like_file("hello")
    (tmp_path / "mod").write_bytes(b"\0asm\x01\0\0\0")
    assert looks_like_file("mod")
    assert looks_like_file("./hello")
