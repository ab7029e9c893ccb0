"""Every command against the scripted fake daemon (conftest.py): the requests sent, output, exit status."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from clifake import REPO

WASM = b"\0asm\x01\0\0\0"


@pytest.fixture
def img(fake_daemon):
    return fake_daemon.add_image(WASM, "img")


def reqs(daemon, method=None, prefix=""):
    return [r for r in daemon.requests if (method is None or r["method"] == method) and r["path"].startswith(prefix)]


def only_vm(daemon):
    (vm,) = daemon.vms.values()
    return vm


# --- run ----------------------------------------------------------------------------------------------

def test_run_attached_streams_and_exits_with_the_guest_code(cli, fake_daemon, img):
    r = cli("run", "img", "out:hello", "err:oops", "out:bye", "exit:3")
    assert r.returncode == 3, r.stderr
    assert r.stdout == b"hello\nbye\n"
    assert r.stderr == b"oops\n"
    create = reqs(fake_daemon, "POST", "/v1/vms")[0]
    assert create["path"] == "/v1/vms"
    assert create["headers"]["Content-Type"] == "application/json"
    assert create["json"] == {
        "image": "img", "name": None, "args": ["out:hello", "err:oops", "out:bye", "exit:3"], "env": {},
        "fuel": None, "memory": None, "timeout": None, "dirs": [], "disks": [], "publish": [],
        "allow_egress": [], "ephemeral": False, "stdin": False, "start": True,
    }
    vm_id = only_vm(fake_daemon).id
    logs = reqs(fake_daemon, "GET", f"/v1/vms/{vm_id}/logs")
    assert sorted(r["query"]["stream"] for r in logs) == ["stderr", "stdout"]  # stdout/stderr are separate pipes
    assert all(r["query"]["follow"] == "true" for r in logs)
    assert reqs(fake_daemon, "POST", f"/v1/vms/{vm_id}/wait")
    assert all(r["headers"]["Accept"] == "application/json" for r in fake_daemon.requests)


def test_run_attached_to_one_destination_uses_stream_all(cli, fake_daemon, img):
    r = cli("run", "img", "out:a", "err:b", "out:c", merge_stderr=True)
    assert r.returncode == 0
    assert r.stdout == b"a\nb\nc\n"
    (logs,) = reqs(fake_daemon, "GET", "/v1/vms/")
    assert logs["query"] == {"follow": "true", "stream": "all"}


@pytest.mark.parametrize("reason", ["timeout", "memory_limit", "stack_overflow", "trap: unreachable", "killed"])
def test_run_stopped_by_host_exits_137(cli, fake_daemon, img, reason):
    r = cli("run", "img", "out:partial", f"reason:{reason}")
    assert r.returncode == 137
    assert r.stdout == b"partial\n"
    vm_id = only_vm(fake_daemon).id
    assert r.stderr.decode() == f"microvm: VM {vm_id} stopped by host: {reason}\n"


def test_run_out_of_fuel_returns_although_the_log_stream_stays_open(cli, fake_daemon, img):
    t0 = time.monotonic()
    r = cli("run", "img", "out:before", "reason:out_of_fuel", "out:after")
    assert time.monotonic() - t0 < 10
    assert r.returncode == 137
    assert r.stdout == b"before\n"
    assert r.stderr.decode().endswith("stopped by host: out_of_fuel\n")


def test_run_rm_opens_the_console_then_starts_and_waits_in_one_request(cli, fake_daemon, img):
    r = cli("run", "--rm", "img", "out:x")
    assert r.returncode == 0 and r.stdout == b"x\n"
    vm_reqs = [(q["method"], q["path"].split("/")[-1], q["query"]) for q in reqs(fake_daemon, prefix="/v1/vms")]
    assert vm_reqs[0][0] == "POST" and {p for m, p, _ in vm_reqs[1:-1]} == {"logs"}  # console streams first
    assert vm_reqs[-1][1:] == ("start", {"wait": "true"})
    assert not fake_daemon.vms  # ephemeral: gone when it ended, nothing for the client to remove


def test_run_detached_prints_the_id(cli, fake_daemon, img):
    r = cli("run", "-d", "--name", "bg", "img", "hang")
    assert r.returncode == 0
    vm = only_vm(fake_daemon)
    assert r.stdout.decode() == vm.id + "\n"
    assert vm.spec["start"] is True and vm.spec["ephemeral"] is False
    assert not reqs(fake_daemon, "GET", "/v1/vms/")  # no log streaming
    r = cli("run", "-d", "--rm", "img")
    assert json.loads(reqs(fake_daemon, "POST", "/v1/vms")[-1]["body"])["ephemeral"] is True


def test_run_a_file_uploads_it_first(cli, fake_daemon, tmp_path):
    f = tmp_path / "prog.wasm"
    f.write_bytes(WASM + b"x")
    r = cli("run", str(f), "out:hi")
    assert r.returncode == 0 and r.stdout == b"hi\n"
    upload = reqs(fake_daemon, "POST", "/v1/images")[0]
    assert upload["query"] == {}  # no name
    assert upload["body"] == WASM + b"x"
    assert upload["headers"]["Content-Type"] == "application/wasm"
    digest = json.loads(reqs(fake_daemon, "POST", "/v1/vms")[0]["body"])["image"]
    assert digest.startswith("sha256:") and digest == fake_daemon.images[digest]["digest"]


def test_run_missing_file(cli, fake_daemon):
    r = cli("run", "nope.wasm")
    assert r.returncode == 125
    assert r.stderr.decode() == "microvm: cannot read nope.wasm: No such file or directory\n"
    assert not fake_daemon.requests


def test_run_unknown_image_is_an_api_error(cli, fake_daemon):
    r = cli("run", "ghost")
    assert r.returncode == 125
    assert r.stderr.decode() == "microvm: no such image: ghost (image_not_found)\n"


def test_run_ctrl_c_kills_the_ephemeral_vm(fake_daemon, img):
    # faulthandler: should the client not exit, SIGABRT makes it print every thread's stack (below)
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONFAULTHANDLER="1")
    p = subprocess.Popen(
        [sys.executable, "-m", "microvmd.cli.main", "--socket", fake_daemon.socket_path, "run", "--rm", "img",
         "out:started", "hang"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO,
    )
    try:
        assert p.stdout.readline() == b"started\n"
        for _ in range(100):  # wait until the client is blocked in wait
            if any(r["path"].endswith("/start") for r in fake_daemon.requests):
                break
            time.sleep(0.05)
        # the kernel may hand a process's SIGINT to any thread that does not block it, and Python runs the
        # handler in the main thread only: the log copiers block it, so Ctrl-C always reaches the main thread
        blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        for tid in os.listdir(f"/proc/{p.pid}/task"):
            if int(tid) != p.pid:
                with open(f"/proc/{p.pid}/task/{tid}/status") as f:
                    status = f.read()
                mask = int(status.split("SigBlk:")[1].split()[0], 16)
                assert all(mask & (1 << (sig - 1)) for sig in blocked), (tid, hex(mask))
        p.send_signal(signal.SIGINT)
        try:
            out, err = p.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGABRT)
            out, err = p.communicate(timeout=15)
            requests = [(r["method"], r["path"]) for r in fake_daemon.requests]
            pytest.fail(f"the client did not exit after SIGINT; requests {requests}; its stderr:\n{err.decode()}")
    finally:
        if p.poll() is None:  # never leave the process behind (its Popen warning would fail a later test)
            p.kill()
            p.communicate()
    assert p.returncode == 137, err
    assert err.decode().endswith("stopped by host: killed\n")
    assert fake_daemon.requests[-1]["path"].endswith("/kill")  # its answer has the exit: nothing more to ask
    assert not fake_daemon.vms


# --- create / lifecycle -----------------------------------------------------------------------------

def test_create_prints_the_id_last(cli, fake_daemon, img):
    r = cli("create", "--name", "job", "--memory", "1MiB", "--timeout", "250ms", "img", "a")
    assert r.returncode == 0
    vm = only_vm(fake_daemon)
    assert r.stdout.decode().splitlines()[-1] == vm.id
    assert vm.spec["start"] is False and vm.spec["memory"] == 1 << 20 and vm.spec["timeout"] == 0.25
    r = cli("--json", "create", "img")
    obj = json.loads(r.stdout)
    assert obj["state"] == "created" and len(fake_daemon.vms) == 2


def test_lifecycle_and_wait(cli, fake_daemon, img):
    vm_id = cli("create", "--name", "job", "img", "out:x", "exit:7").stdout.decode().strip()
    r = cli("start", "job")
    assert r.returncode == 0 and r.stdout == b"job\n"
    assert reqs(fake_daemon, "POST", "/v1/vms/job/start")
    r = cli("wait", vm_id[:12])
    assert r.returncode == 7 and r.stderr == b""
    r = cli("--json", "wait", "job")
    assert r.returncode == 7 and json.loads(r.stdout)["code"] == 7
    r = cli("kill", "job")
    assert r.returncode == 125
    assert r.stderr.decode() == "microvm: VM has exited (invalid_state)\n"
    r = cli("logs", "job")
    assert r.returncode == 0 and r.stdout == b"x\n"
    assert [r["query"] for r in reqs(fake_daemon, "GET", "/v1/vms/job/logs")] == [
        {"stream": "stdout"}, {"stream": "stderr"}]


def test_wait_for_a_host_stopped_vm(cli, fake_daemon, img):
    cli("run", "-d", "--name", "f", "img", "reason:out_of_fuel")
    r = cli("wait", "f", "--timeout", "5s")
    assert r.returncode == 137
    assert r.stderr.decode() == "microvm: VM f stopped by host: out_of_fuel\n"
    assert reqs(fake_daemon, "POST", "/v1/vms/f/wait")[-1]["query"] == {"timeout": "5"}
    r = cli("fuel", "add", "f", "1M")
    assert r.returncode == 0
    fuel = reqs(fake_daemon, "POST", "/v1/vms/f/fuel")[-1]
    assert fuel["json"] == {"amount": 1_000_000}
    assert b"added 1000000 fuel" in r.stdout
    r = cli("wait", "f")
    assert r.returncode == 0


def test_actions_on_several_vms(cli, fake_daemon, img):
    cli("create", "--name", "a", "img")
    r = cli("rm", "a", "missing")
    assert r.returncode == 125
    assert r.stdout == b"a\n"
    assert r.stderr.decode() == "microvm: no such VM: missing (vm_not_found)\n"
    cli("run", "-d", "--name", "b", "img", "hang")
    r = cli("rm", "b")
    assert r.returncode == 125 and b"(vm_running)" in r.stderr
    r = cli("rm", "-f", "b")
    assert r.returncode == 0
    assert reqs(fake_daemon, "DELETE", "/v1/vms/b")[-1]["query"] == {"force": "true"}
    for action in ("stop", "pause", "resume"):
        cli("create", "--name", "c", "img") if action == "stop" else None
        assert cli(action, "c").returncode == 0
        assert reqs(fake_daemon, "POST", f"/v1/vms/c/{action}")


def test_ps(cli, fake_daemon, img):
    cli("run", "-d", "--name", "web", "img", "hang")
    cli("run", "--name", "done", "img", "exit:2")
    r = cli("ps")
    lines = r.stdout.decode().splitlines()
    assert lines[0].split() == ["ID", "NAME", "IMAGE", "STATE", "FUEL", "USED", "MEMORY", "CREATED", "UPTIME", "RESTART"]
    assert len(lines) == 2 and " web " in lines[1] and "running" in lines[1] and "64KiB" in lines[1]
    web = next(v for v in fake_daemon.vms.values() if v.spec["name"] == "web")
    assert lines[1].startswith(web.id[:12] + " ")
    assert reqs(fake_daemon, "GET", "/v1/vms")[-1]["query"] == {}
    r = cli("ps", "-a")
    assert "exited (2)" in r.stdout.decode()
    assert reqs(fake_daemon, "GET", "/v1/vms")[-1]["query"] == {"all": "true"}
    r = cli("ps", "-aq")
    assert sorted(r.stdout.decode().split()) == sorted(fake_daemon.vms)
    r = cli("ps", "--json")
    assert [v["name"] for v in json.loads(r.stdout)["vms"]] == ["web"]


def test_inspect(cli, fake_daemon, img):
    cli("create", "--name", "x", "img")
    r = cli("inspect", "x")
    assert json.loads(r.stdout)["name"] == "x"
    r = cli("inspect", "x", "x")
    assert len(json.loads(r.stdout)) == 2


def test_logs_follow(cli, fake_daemon, img):
    cli("run", "-d", "--name", "s", "img", "out:1", "sleep:0.3", "err:2", "out:3")
    r = cli("logs", "-f", "s")
    assert r.returncode == 0
    assert r.stdout == b"1\n3\n" and r.stderr == b"2\n"
    r = cli("logs", "-f", "s", merge_stderr=True)
    assert r.stdout == b"1\n2\n3\n"
    assert reqs(fake_daemon, "GET", "/v1/vms/s/logs")[-1]["query"] == {"follow": "true", "stream": "all"}


# --- images -------------------------------------------------------------------------------------------

def test_image_commands(cli, fake_daemon, tmp_path):
    f = tmp_path / "hello.wasm"
    f.write_bytes(WASM)
    r = cli("image", "import", str(f))
    assert r.returncode == 0
    digest = fake_daemon.images["hello"]["digest"]
    assert r.stdout.decode() == f"hello {digest}\n"
    assert reqs(fake_daemon, "POST", "/v1/images")[-1]["query"] == {"name": "hello"}
    r = cli("image", "import", str(f), "--name", "other", "--json")
    assert json.loads(r.stdout)["name"] == "other"
    r = cli("image", "ls")
    lines = r.stdout.decode().splitlines()
    assert lines[0].split() == ["NAME", "DIGEST", "SIZE", "CREATED"]
    assert lines[1].split()[:3] == ["hello", digest[:19], "8B"]
    r = cli("image", "inspect", "hello")
    assert json.loads(r.stdout)["digest"] == digest
    r = cli("image", "rm", "hello")
    assert r.returncode == 0 and r.stdout == b"hello\n"
    assert reqs(fake_daemon, "DELETE", "/v1/images/hello")


def test_image_ref_is_quoted(cli, fake_daemon, img):
    cli("image", "inspect", img["digest"])
    assert reqs(fake_daemon, "GET", "/v1/images/")[-1]["path"] == f"/v1/images/{img['digest']}"


# --- system -------------------------------------------------------------------------------------------

def test_info_and_version(cli, fake_daemon):
    r = cli("info")
    assert r.returncode == 0 and "Daemon version:   9.9.9" in r.stdout.decode()
    assert json.loads(cli("info", "--json").stdout)["version"] == "9.9.9"
    r = cli("version")
    assert "Daemon: microvmd 9.9.9 (wasmtime 50.0.1)" in r.stdout.decode()
    v = json.loads(cli("--json", "version").stdout)
    assert v["daemon"]["version"] == "9.9.9" and v["client"]["version"]


# --- disks, snapshots, migration, functions ---------------------------------------------------------

def test_disks(cli, fake_daemon, tmp_path):
    r = cli("disk", "create", "data", "--size", "64MiB")
    assert r.returncode == 0 and r.stdout == b"data\n"
    assert reqs(fake_daemon, "POST", "/v1/disks")[-1]["json"] == {"name": "data", "size": 64 << 20}
    seed = tmp_path / "seed.img"
    seed.write_bytes(b"\0" * 4096)
    cli("disk", "create", "seed", "--from", str(seed))
    assert reqs(fake_daemon, "POST", "/v1/disks")[-1]["json"] == {"name": "seed", "size": 4096}
    assert reqs(fake_daemon, "PUT", "/v1/disks/seed/content")[-1]["body"] == b"\0" * 4096
    assert cli("disk", "create", "x").returncode == 2
    assert "1MiB" in cli("disk", "ls").stdout.decode()
    assert cli("disk", "rm", "data").returncode == 0
    assert reqs(fake_daemon, "DELETE", "/v1/disks/data")


def test_snapshots(cli, fake_daemon, img, tmp_path):
    vm_id = cli("create", "--name", "v", "img").stdout.decode().strip()
    r = cli("snapshot", "create", "v", "--name", "s1", "--diff")
    assert r.returncode == 0 and r.stdout == b"s1\n"
    assert reqs(fake_daemon, "POST", "/v1/vms/v/snapshots")[-1]["json"] == {"diff": True, "name": "s1"}
    cli("snapshot", "create", "v")
    assert reqs(fake_daemon, "POST", "/v1/vms/v/snapshots")[-1]["json"] == {"diff": False}
    r = cli("snapshot", "ls")
    assert "s1" in r.stdout.decode() and vm_id[:12] in r.stdout.decode()
    assert json.loads(cli("snapshot", "inspect", "s1").stdout)["name"] == "s1"
    out = tmp_path / "s1.snap"
    r = cli("snapshot", "export", "s1", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == fake_daemon.export_blob
    assert os.listdir(tmp_path) == ["s1.snap"]
    r = cli("snapshot", "export", "s1", "-o", "-")
    assert r.stdout == fake_daemon.export_blob
    r = cli("snapshot", "import", str(out))
    assert r.returncode == 0 and r.stdout.decode() == f"imported-{len(fake_daemon.export_blob)}\n"
    imp = reqs(fake_daemon, "POST", "/v1/snapshots/import")[-1]
    assert imp["body"] == fake_daemon.export_blob
    assert imp["headers"]["Content-Type"] == "application/octet-stream"
    r = cli("restore", "s1", "--name", "v2", "--start")
    assert r.returncode == 0
    assert reqs(fake_daemon, "POST", "/v1/snapshots/s1/restore")[-1]["json"] == {"start": True, "name": "v2"}
    assert r.stdout.decode().strip() in fake_daemon.vms
    assert cli("snapshot", "rm", "s1").returncode == 0
    r = cli("snapshot", "export", "s1", "-o", str(tmp_path / "gone"))
    assert r.returncode == 125 and b"(snapshot_not_found)" in r.stderr
    assert not (tmp_path / "gone").exists()


def test_migrate(cli, fake_daemon, img, tmp_path):
    cli("create", "--name", "v", "img")
    tok = tmp_path / "tok"
    tok.write_text("t0k\n")
    r = cli("migrate", "v", "--to", "https://host2:7443", "--token-file", str(tok))
    assert r.returncode == 0
    assert reqs(fake_daemon, "POST", "/v1/vms/v/migrate")[-1]["json"] == {"to": "https://host2:7443", "token": "t0k"}
    cli("migrate", "v", "--to", "/run/other.sock")
    assert reqs(fake_daemon, "POST", "/v1/vms/v/migrate")[-1]["json"] == {"to": "unix:///run/other.sock"}
    assert cli("migrate", "v", "--to", "ftp://x").returncode == 2


def test_function_requests_and_usage(cli, fake_daemon, img, tmp_path):
    """What `fn deploy` sends, and the client's own usage checks (the fake has no functions: 125; the real
    daemon's answers are tested in tests/integration/test_it_functions.py)."""
    r = cli("fn", "deploy", "hello", "img", "--route", "/hi", "--executor", "wagi", "--fuel", "1M",
            "--memory", "16MiB", "--timeout", "2s", "--max-concurrency", "4", "--env", "A=1")
    assert r.returncode == 125
    assert reqs(fake_daemon, "POST", "/v1/functions")[-1]["json"] == {
        "name": "hello", "image": "img", "route": "/hi", "executor": "wagi", "fuel": 1_000_000,
        "memory": 16 << 20, "timeout": 2.0, "max_concurrency": 4, "env": {"A": "1"},
    }
    py = tmp_path / "h.py"
    py.write_text("def handler(req): return 'hi'\n")
    assert cli("fn", "deploy", "bad").returncode == 2
    assert cli("fn", "deploy", "bad", "img", "--python", str(py)).returncode == 2
    assert cli("fn", "deploy", "bad", "--python", str(py), "--js", str(py)).returncode == 2
    for argv in (("fn", "ls"), ("fn", "invoke", "hello", "--data", "hey"), ("fn", "logs", "hello"),
                 ("fn", "rm", "hello")):
        assert cli(*argv).returncode == 125, argv
