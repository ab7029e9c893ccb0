"""The `microvm` process: exit statuses, messages, help, and what importing it pulls in."""
import subprocess
import sys

import pytest
from clifake import REPO, run_cli

from microvmd.cli.main import COMMANDS, GROUP_COMMANDS, build_parser, command_path


def test_unreachable_daemon_exits_125():
    r = run_cli("--socket", "/nonexistent", "ps")
    assert r.returncode == 125
    assert r.stdout == b""
    assert r.stderr.decode() == (
        "microvm: cannot reach microvmd at /nonexistent: No such file or directory "
        "(is the daemon running? start it with 'microvmd' or 'systemctl start microvmd')\n"
    )


def test_socket_from_environment():
    r = run_cli("ps", env={"MICROVM_SOCKET": "/nonexistent/env.sock"})
    assert r.returncode == 125
    assert b"cannot reach microvmd at /nonexistent/env.sock:" in r.stderr


def test_socket_option_after_the_command():
    r = run_cli("ps", "--socket", "/nonexistent/after.sock", env={"MICROVM_SOCKET": "/other"})
    assert r.returncode == 125 and b"/nonexistent/after.sock" in r.stderr


def test_unknown_command_exits_2():
    r = run_cli("bogus")
    assert r.returncode == 2
    assert b"invalid choice: 'bogus'" in r.stderr


@pytest.mark.parametrize(
    "argv",
    [[], ["image"], ["image", "bogus"], ["ps", "--bogus"], ["run"], ["fuel", "add", "vm"],
     ["run", "--memory", "lots", "hello"], ["logs"], ["snapshot", "export", "s"], ["--socket", "ftp://x", "ps"]],
)
def test_wrong_usage_exits_2(argv):
    r = run_cli(*argv)
    assert r.returncode == 2, r.stderr
    assert b"usage: microvm" in r.stderr


def test_usage_error_names_the_option():
    r = run_cli("run", "--memory", "lots", "hello")
    assert b"microvm run: error: --memory: invalid size 'lots'" in r.stderr


def all_command_paths():
    paths = []
    for name in COMMANDS:
        if name in GROUP_COMMANDS:
            paths.append([name])
            paths += [[name, sub] for sub in GROUP_COMMANDS[name]]
        else:
            paths.append([name])
    return paths


def test_command_tables_match_the_parser():
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command")
    assert set(subs.choices) == set(COMMANDS)
    for group, names in GROUP_COMMANDS.items():
        gsubs = next(a for a in subs.choices[group]._actions if a.dest.endswith("_command"))
        assert set(gsubs.choices) == set(names)


@pytest.mark.parametrize("path", all_command_paths(), ids=lambda p: " ".join(p))
def test_help_everywhere(path, capsys):
    from microvmd.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(path + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    canonical = [{"list": "ls", "remove": "rm"}.get(w, w) for w in path]
    assert out.startswith("usage: microvm " + " ".join(canonical))
    if path[0] not in GROUP_COMMANDS or len(path) == 2:
        assert "Example:\n  microvm " in out


def test_top_level_help_lists_every_command(capsys):
    from microvmd.cli.main import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("info", "version", "image", "run", "create", "ps", "logs", "fuel", "disk", "snapshot",
                 "restore", "migrate", "fn"):
        assert f"\n    {name} " in out


def test_command_path():
    assert command_path(["ps"]) == ("ps",)
    assert command_path(["--json", "--socket", "/s", "image", "--json", "ls", "-q"]) == ("image", "ls")
    assert command_path(["--socket=/s", "run", "-d", "hello", "x"]) == ("run",)
    assert command_path(["--help"]) == ()


def test_selective_parser_agrees_with_the_full_parser():
    argv = ["--json", "run", "-d", "--name", "n", "--env", "A=1", "hello", "x", "--y"]
    a = vars(build_parser().parse_args(argv))
    b = vars(build_parser(command_path(argv)).parse_args(argv))
    a.pop("_parser"), b.pop("_parser")
    assert a == b


def test_import_stays_light():
    code = (
        "import sys, microvmd.cli.main\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('aiohttp', 'asyncio', 'msgpack', 'wasmtime', 'uvloop', 'http', 'json', 'argparse', 'ssl')]\n"
        "print(heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert r.stdout.strip() == "[]"


def test_running_a_command_stays_light():
    # Even a full command never imports the daemon's dependencies.
    code = (
        "import sys\n"
        "from microvmd.cli.main import main\n"
        "rc = main(['--socket', '/nonexistent', 'ps'])\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'asyncio', 'msgpack', 'wasmtime', 'uvloop')]\n"
        "print(rc, heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert r.stdout.strip() == "125 []"


def test_client_decodes_through_the_contract_without_typing_extensions():
    # `microvm ps` pays for every module it loads (bench_ps): typing_extensions and what it drags in (inspect,
    # ast, dis) are hidden from msgspec while the client loads it, and come back for whoever imports them later.
    code = (
        "import sys\n"
        "import microvmd.cli.commands as c, msgspec\n"
        "print('typing_extensions' in sys.modules, 'inspect' in sys.modules)\n"
        "vm = msgspec.json.decode(b'{\"id\": \"x\", \"image\": \"hello\", \"state\": \"nope\"}', type=c.contract.Vm)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.stdout.strip() == "False False"
    # the models still check the answers
    assert "msgspec.ValidationError: Invalid enum value 'nope' - at `$.state`" in r.stderr
    code = "import microvmd.cli.commands, typing_extensions; print(typing_extensions.get_type_hints is not None)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert r.stdout.strip() == "True"


def test_version_without_daemon():
    r = run_cli("--socket", "/nonexistent", "version")
    assert r.returncode == 0
    assert r.stdout.decode().startswith("Client: microvm ")
    assert b"Daemon: not reachable" in r.stdout
