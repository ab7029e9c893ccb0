"""`microvm`: the command-line client of microvmd.

This module only builds the argument parser; the commands live in microvmd.cli.commands and the
HTTP client in microvmd.cli.client, both imported when a command actually runs. Importing this
module costs next to nothing (no argparse, http.client, json, asyncio, aiohttp, msgpack, wasmtime).
"""
from __future__ import annotations

import sys

PROG = "microvm"



def _add_global_options(p, *, suppress: bool, token_file: bool = True) -> None:
    """--socket/--json/--token-file/--tls-ca, accepted before the command and after it."""
    import argparse

    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    g = p.add_argument_group("global options")
    if suppress:  # the copies accepted after the command are documented once, in `microvm --help`
        add = g.add_argument

        def add_argument(*a, **kw):
            kw["help"] = argparse.SUPPRESS
            return add(*a, **kw)

        g.add_argument = add_argument
    g.add_argument(
        "--socket",
        metavar="PATH|URL",
        default=d(None),
        help="daemon API: a Unix socket path, unix:///path or https://HOST:PORT "
        "(default: $MICROVM_SOCKET, else the per-user default socket)",
    )
    g.add_argument("--json", action="store_true", default=d(False), help="print the API's JSON on stdout")
    if token_file:
        g.add_argument(
            "--token-file",
            metavar="FILE",
            default=d(None),
            help="bearer token for an https:// daemon (default: $MICROVM_TOKEN, $MICROVM_TOKEN_FILE)",
        )
    g.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=d(None),
        help="CA bundle to verify an https:// daemon (default: $MICROVM_TLS_CA, else the system's)",
    )


class _Null:
    """Stands in for the parsers of commands that are not being run (see build_parser(only=...))."""

    def __getattr__(self, name):
        return lambda *a, **kw: self


_NULL = _Null()
# The command words (aliases included); tests/cli checks these against the full parser.
COMMANDS = (
    "info", "version", "image", "run", "create", "start", "stop", "kill", "pause", "resume", "wait", "attach",
    "rm", "remove", "ps", "inspect", "logs", "fuel", "disk", "snapshot", "restore", "migrate", "fn",
    "system",
)
GROUP_COMMANDS = {
    "image": ("import", "ls", "list", "inspect", "rm", "remove"),
    "fuel": ("add",),
    "disk": ("create", "ls", "list", "rm", "remove"),
    "snapshot": ("create", "ls", "list", "inspect", "rm", "remove", "export", "import"),
    "fn": ("deploy", "ls", "list", "inspect", "invoke", "logs", "rm", "remove"),
    "system": ("check", "df", "prune"),
}
_GROUPS = tuple(GROUP_COMMANDS)
_VALUED_GLOBALS = ("--socket", "--token-file", "--tls-ca")


def command_path(argv: list[str]) -> tuple[str, ...]:
    """The command words of argv: ("ps",), ("image", "ls"), or () when there is none."""
    words: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--":
            break
        if arg in _VALUED_GLOBALS:
            skip = True
            continue
        if arg.startswith("-"):
            continue
        words.append(arg)
        if words[0] not in _GROUPS or len(words) == 2:
            break
    return tuple(words)


def build_parser(only: tuple[str, ...] | None = None):
    """The argument parser; with `only` (see command_path) just that command gets its arguments."""
    import argparse

    class Formatter(argparse.RawDescriptionHelpFormatter):
        def __init__(self, prog):
            super().__init__(prog, max_help_position=32)

    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, suppress=True)
    # `migrate --token-file` is the destination's token; the daemon's own goes before the command.
    common_no_token = argparse.ArgumentParser(add_help=False)
    _add_global_options(common_no_token, suppress=True, token_file=False)

    parser = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        description="Manage WebAssembly micro-VMs through the microvmd daemon.",
        epilog="Examples:\n"
        "  microvm run images/hello/hello.wasm\n"
        "  microvm run -d --name web --memory 64MiB --publish 8080:8000 echo\n"
        "  microvm ps -a\n\n"
        "Global options may also follow the command (microvm ps --json).\n"
        "Run 'microvm COMMAND --help' for more about a command.",
        formatter_class=Formatter,
    )
    _add_global_options(parser, suppress=False)
    from microvmd import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")

    # A valid command path: build only that command. Otherwise (a typo, or no command: top-level
    # help) every command gets a bare parser, so that help and "invalid choice" list them all.
    valid = only is not None and bool(only) and only[0] in COMMANDS and (
        only[0] not in GROUP_COMMANDS or (len(only) > 1 and only[1] in GROUP_COMMANDS[only[0]])
    )

    def selected(subs, name, aliases) -> bool:
        if only is None:
            return True
        level = getattr(subs, "_microvm_group", None)
        if level is None:
            want = only[0] if only else None
        else:
            want = only[1] if len(only) > 1 and only[0] == level else None
        return want == name or want in aliases

    def group(subs, name, help, **kw):
        if not selected(subs, name, kw.get("aliases", ())):
            if not valid:
                subs.add_parser(name, help=help, add_help=False, **kw)
            return _NULL, _NULL
        p = subs.add_parser(
            name, help=help, description=help, formatter_class=Formatter, parents=[common], **kw
        )
        gsubs = p.add_subparsers(dest=name.replace("-", "_") + "_command", metavar="COMMAND", title="commands")
        gsubs.required = True
        gsubs._microvm_group = name
        return p, gsubs

    def cmd(subs, name, handler, help, example, **kw):
        if not selected(subs, name, kw.get("aliases", ())):
            # Only the command being run gets a parser: building all of them costs ~10 ms.
            if not valid:
                subs.add_parser(name, help=help, add_help=False, aliases=kw.get("aliases", ()))
            return _NULL
        desc = kw.pop("description", help)
        extra = kw.pop("extra_epilog", "")
        parents = kw.pop("parents", [common])
        p = subs.add_parser(
            name,
            help=help,
            description=desc,
            epilog=extra + "Example:\n  " + "\n  ".join(example if isinstance(example, list) else [example]),
            formatter_class=Formatter,
            parents=parents,
            **kw,
        )
        p.set_defaults(handler=handler, _parser=p)
        return p

    subs = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    subs.required = True

    # --- system ---------------------------------------------------------------------------------------
    cmd(subs, "info", "info", "Show the daemon's version, paths, engine and VM counts.", "microvm info")
    cmd(
        subs, "version", "version", "Show the client's version, and the daemon's when it is reachable.",
        "microvm version",
    )

    _, ssubs = group(subs, "system", "Check, measure and prune the daemon's state directory.")
    p = cmd(
        ssubs, "check", "system_check",
        "Check every image, snapshot (manifest, packs, chunks), disk and VM record, and the links between "
        "them; exit 1 when something is damaged.",
        ["microvm system check", "microvm system check --repair"],
    )
    p.add_argument("--repair", action="store_true",
                   help="move what is damaged aside (under STATE/lost+found/) and say what was done")
    cmd(ssubs, "df", "system_df", "Show the space used by images, snapshots, shared chunks, disks and VMs.",
        "microvm system df")
    p = cmd(ssubs, "prune", "system_prune",
            "Remove ended VMs, images nothing uses and snapshot packs no snapshot references.",
            ["microvm system prune --dry-run", "microvm system prune"])
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")

    # --- images ---------------------------------------------------------------------------------------
    _, isubs = group(subs, "image", "Manage images (compiled WebAssembly modules).")
    p = cmd(
        isubs, "import", "image_import",
        "Import a .wasm (or .wat) module as an image; prints its NAME and sha256 digest.",
        ["microvm image import images/hello/hello.wasm", "microvm image import build/app.wasm --name app"],
        description="Import a .wasm (or .wat) module as an image and print its NAME and sha256 digest.\n"
        "The name defaults to the file name without its extension.",
    )
    p.add_argument("file", metavar="FILE", help="module file (.wasm or .wat)")
    p.add_argument("--name", help="image name (default: the file name without extension)")
    p.add_argument("--entry", help="export to run (default: _start)")
    p.add_argument("--no-asyncify", dest="no_asyncify", action="store_true",
                   help="keep a plain WASI module as it is (default: rewrite it once with Binaryen's Asyncify so "
                        "that it can be snapshotted while it runs)")
    p.add_argument("--arg", dest="default_args", action="append", metavar="ARG",
                   help="default guest argument, used when a VM gives none (repeatable)")
    p.add_argument("--env", dest="default_env", action="append", metavar="K=V",
                   help="default environment variable (repeatable)")
    p.add_argument("--fuel", dest="default_fuel", metavar="N", help="default fuel limit of its VMs")
    p.add_argument("--memory", dest="default_memory", metavar="SIZE", help="default memory limit of its VMs")
    p.add_argument("--timeout", dest="default_timeout", metavar="DURATION", help="default wall-clock limit")
    p = cmd(isubs, "ls", "image_ls", "List images.", "microvm image ls", aliases=["list"])
    p = cmd(isubs, "inspect", "image_inspect", "Show an image as JSON.", "microvm image inspect hello")
    p.add_argument("refs", metavar="NAME", nargs="+", help="image name, sha256:<hex> or digest prefix")
    p = cmd(isubs, "rm", "image_rm", "Remove images.", "microvm image rm hello", aliases=["remove"])
    p.add_argument("refs", metavar="NAME", nargs="+", help="image name, sha256:<hex> or digest prefix")

    # --- VMs ------------------------------------------------------------------------------------------
    def vm_options(p) -> None:
        g = p.add_argument_group("VM options")
        g.add_argument("--name", help="name the VM")
        g.add_argument("-d", "--detach", action="store_true", help="run in the background and print the VM id")
        g.add_argument("--rm", action="store_true",
                       help="ephemeral: no record and no console files; the VM is gone when it ends")
        g.add_argument("-i", "--interactive", action="store_true",
                       help="keep the guest's stdin open; run -i streams yours to it (end of file closes it)")
        g.add_argument(
            "--restart", metavar="POLICY",
            help="no (default), on-failure[:N], always or unless-stopped: restart the VM when it ends "
            "(as docker; a user's stop or kill is not restarted)",
        )
        g.add_argument(
            "--checkpoint-interval", metavar="DURATION",
            help="snapshot the running VM this often (diff snapshots); after a crash of the daemon, "
            "--restart always|unless-stopped resumes it from the last one",
        )
        g.add_argument("--fuel", metavar="N", help="instruction budget in fuel units (10M, 2G accepted)")
        g.add_argument("--memory", metavar="SIZE", help="memory limit (65536, 64KiB, 64MiB, 1GiB)")
        g.add_argument("--timeout", metavar="DURATION", help="wall-clock limit (250ms, 10s, 2m)")
        g.add_argument(
            "-e", "--env", metavar="KEY=VALUE", action="append", default=[],
            help="environment variable (repeatable; a bare KEY copies your value)",
        )
        g.add_argument(
            "--dir", metavar="HOSTDIR[::GUESTDIR][:ro]", action="append", default=[],
            help="WASI preopened directory (repeatable)",
        )
        g.add_argument(
            "--disk", metavar="NAME[:ro|:cow]", action="append", default=[],
            help="virtual disk (repeatable; device order = flag order)",
        )
        g.add_argument(
            "-p", "--publish", metavar="[HOSTIP:]HOSTPORT:GUESTPORT", action="append", default=[],
            help="publish a guest TCP port on the host (repeatable; HOSTIP defaults to 127.0.0.1)",
        )
        g.add_argument(
            "--allow-egress", metavar="HOST:PORT|CIDR:PORT", action="append", default=[],
            help="allow outbound connections to HOST:PORT or CIDR:PORT (repeatable; default deny)",
        )
        p.add_argument("image", metavar="IMAGE|FILE.wasm", help="image name or reference, or a module file to upload")
        p.add_argument("args", metavar="ARGS", nargs=argparse.REMAINDER, help="arguments for the guest")

    p = cmd(
        subs, "run", "run",
        "Create and start a VM; attached, stream its console and exit with the guest's exit code.",
        [
            "microvm run images/hello/hello.wasm world",
            "microvm run --rm --fuel 10M --memory 64MiB --timeout 10s --dir .::/data:ro app -- --verbose",
            "microvm run -d --name web --publish 8080:8000 echo",
            "microvm run -i python",
        ],
        description="Create a VM from IMAGE (or upload FILE.wasm first) and start it.\n\n"
        "Attached (the default) it streams the guest's stdout/stderr and exits with the guest's exit\n"
        "code; if the host stopped the guest (out of fuel, timeout, memory limit, trap, kill) it prints\n"
        "the reason and exits 137. Ctrl-C kills the VM. With -d it prints the VM id and returns.\n"
        "Everything after IMAGE is passed to the guest.",
    )
    vm_options(p)
    p.set_defaults(command="run")
    p = cmd(
        subs, "create", "create", "Create a VM without starting it; prints the VM id.",
        ["microvm create --name job --fuel 1G app input.txt", "microvm start job"],
        description="Create a VM from IMAGE (or upload FILE.wasm first) without starting it, and print\n"
        "its id. Everything after IMAGE is passed to the guest.",
    )
    vm_options(p)
    p.set_defaults(command="create")

    for action, help in (
        ("start", "Start created or stopped VMs."),
        ("stop", "Stop running VMs."),
        ("kill", "Kill running VMs immediately."),
        ("pause", "Pause running VMs."),
        ("resume", "Resume paused VMs."),
    ):
        p = cmd(subs, action, "vm_action", help, f"microvm {action} web")
        p.add_argument("refs", metavar="VM", nargs="+", help="VM id, unique id prefix, or name")
        p.set_defaults(action=action)

    p = cmd(
        subs, "attach", "attach",
        "Attach to a running VM: your stdin to the guest, its console back; exit with the guest's code.",
        ["microvm attach py", "printf 'print(x)\\n' | microvm attach py"],
        description="Stream your standard input to the VM's guest (a VM created with -i; end of file closes\n"
        "the guest's input) and its output from now on back to you, until it exits; then exit with\n"
        "the guest's code (137 if the host stopped it). Ctrl-C kills the VM, as with run.",
    )
    p.add_argument("ref", metavar="VM", help="VM id, unique id prefix, or name")
    p = cmd(
        subs, "wait", "wait",
        "Wait until a VM exits; exit with the guest's exit code (137 if the host stopped it).",
        "microvm wait job; echo $?",
    )
    p.add_argument("ref", metavar="VM", help="VM id, unique id prefix, or name")
    p.add_argument("--timeout", metavar="DURATION", help="give up after this long")
    p = cmd(subs, "rm", "rm", "Remove VMs.", ["microvm rm job", "microvm rm -f web"], aliases=["remove"])
    p.add_argument("-f", "--force", action="store_true", help="remove running VMs too (they are killed)")
    p.add_argument("refs", metavar="VM", nargs="+", help="VM id, unique id prefix, or name")
    p = cmd(subs, "ps", "ps", "List VMs (running ones; all with -a).", ["microvm ps", "microvm ps -aq"])
    p.add_argument("-a", "--all", action="store_true", help="show exited VMs too")
    p.add_argument("-q", "--quiet", action="store_true", help="print only VM ids")
    p = cmd(subs, "inspect", "inspect", "Show VMs as JSON.", "microvm inspect web")
    p.add_argument("refs", metavar="VM", nargs="+", help="VM id, unique id prefix, or name")
    p = cmd(
        subs, "logs", "logs", "Print a VM's console output (follow it with -f).",
        ["microvm logs job", "microvm logs -f web"],
    )
    p.add_argument("-f", "--follow", action="store_true", help="keep streaming until the VM exits")
    p.add_argument(
        "--stream", choices=["all", "stdout", "stderr"], default=None,
        help="only this stream (default: both, guest stderr going to your stderr)",
    )
    p.add_argument("ref", metavar="VM", help="VM id, unique id prefix, or name")

    _, fsubs = group(subs, "fuel", "Manage a VM's fuel (instruction budget).")
    p = cmd(
        fsubs, "add", "fuel_add", "Add fuel to a VM; a VM that ran out of fuel continues.",
        ["microvm fuel add job 1G", "microvm fuel add job 500000"],
    )
    p.add_argument("ref", metavar="VM", help="VM id, unique id prefix, or name")
    p.add_argument("amount", metavar="AMOUNT", help="fuel units (500000, 10M, 2G)")

    # --- disks ----------------------------------------------------------------------------------------
    _, dsubs = group(subs, "disk", "Manage virtual disks.")
    p = cmd(
        dsubs, "create", "disk_create", "Create a virtual disk.",
        ["microvm disk create data --size 64MiB", "microvm disk create seed --size 1GiB --from seed.img"],
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--size", metavar="SIZE", help="disk size (64MiB, 1GiB); default with --from: the file's size")
    p.add_argument("--from", dest="from_file", metavar="FILE", help="initial contents (a raw image file)")
    cmd(dsubs, "ls", "disk_ls", "List virtual disks.", "microvm disk ls", aliases=["list"])
    p = cmd(dsubs, "rm", "disk_rm", "Remove virtual disks.", "microvm disk rm data", aliases=["remove"])
    p.add_argument("refs", metavar="NAME", nargs="+")

    # --- snapshots ------------------------------------------------------------------------------------
    _, ssubs = group(subs, "snapshot", "Manage VM snapshots.")
    p = cmd(
        ssubs, "create", "snapshot_create", "Snapshot a VM; prints the snapshot name.",
        ["microvm snapshot create web --name web-1", "microvm snapshot create web --diff"],
    )
    p.add_argument("ref", metavar="VM", help="VM id, unique id prefix, or name")
    p.add_argument("--name", help="snapshot name (default: chosen by the daemon)")
    p.add_argument("--diff", action="store_true", help="store only what changed since the previous snapshot")
    p = cmd(ssubs, "ls", "snapshot_ls", "List snapshots.", "microvm snapshot ls", aliases=["list"])
    p.add_argument("-a", "--all", action="store_true",
                   help="also the VMs' checkpoints (--checkpoint-interval; each replaces the one before)")
    p = cmd(ssubs, "inspect", "snapshot_inspect", "Show snapshots as JSON.", "microvm snapshot inspect web-1")
    p.add_argument("refs", metavar="SNAP", nargs="+")
    p = cmd(ssubs, "rm", "snapshot_rm", "Remove snapshots.", "microvm snapshot rm web-1", aliases=["remove"])
    p.add_argument("refs", metavar="SNAP", nargs="+")
    p = cmd(
        ssubs, "export", "snapshot_export", "Export a snapshot to a file ('-o -' writes to stdout).",
        "microvm snapshot export web-1 -o web-1.snap",
    )
    p.add_argument("ref", metavar="SNAP")
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="where to write it ('-' for stdout)")
    p = cmd(
        ssubs, "import", "snapshot_import", "Import a snapshot file ('-' reads stdin); prints its name.",
        "microvm snapshot import web-1.snap",
    )
    p.add_argument("file", metavar="FILE")

    p = cmd(
        subs, "restore", "restore", "Create a VM from a snapshot; prints the VM id.",
        ["microvm restore web-1 --name web2 --start",
         "microvm restore imported-1 --start --allow-egress 10.0.0.5:443 --publish 8080:8000"],
    )
    p.add_argument("ref", metavar="SNAP")
    p.add_argument("--name", help="name of the new VM")
    p.add_argument("--start", action="store_true", help="start the VM right away")
    p.add_argument(
        "--allow-egress", metavar="HOST:PORT|CIDR:PORT", action="append", default=None,
        help="outbound rule for the new VM (repeatable); given, it replaces the snapshot's rules. An imported "
             "snapshot gets only the rules given here",
    )
    p.add_argument(
        "-p", "--publish", metavar="[HOSTIP:]HOSTPORT:GUESTPORT", action="append", default=None,
        help="publish a guest TCP port (repeatable); given, it replaces the snapshot's. An imported snapshot "
             "publishes only the ports given here",
    )

    p = cmd(
        subs, "migrate", "migrate", "Move a VM to another microvmd.",
        [
            "microvm migrate web --to unix:///run/other/microvmd.sock",
            "microvm migrate web --to https://host2:7443 --token-file host2.token",
        ],
        parents=[common_no_token],
        description="Move a VM to another microvmd: its memory, its disks' content and its published ports.\n"
                    "Prints the VM's id on the target. Each disk keeps its name there when it is free; if the\n"
                    "target already has a disk of that name, that disk is left as it is, the VM's copy gets\n"
                    "the name NAME.restored-HEX, and a note on stderr says so.",
    )
    p.add_argument("ref", metavar="VM", help="VM id, unique id prefix, or name")
    p.add_argument("--to", required=True, metavar="unix:///PATH|https://HOST:PORT", help="the destination daemon")
    p.add_argument(
        "--token-file", dest="to_token_file", metavar="F", default=None,
        help="bearer token for the destination daemon",
    )
    p.add_argument(
        "--to-ca", dest="to_ca", metavar="PEM", default=None,
        help="CA certificate the source daemon uses to verify an https destination (a path on the daemon's host)",
    )

    # --- functions ------------------------------------------------------------------------------------
    _, nsubs = group(subs, "fn", "Manage functions (serverless handlers behind the HTTP gateway).")
    p = cmd(
        nsubs, "deploy", "fn_deploy", "Deploy (or replace) a function.",
        [
            "microvm fn deploy hello images/wagi/wagi.wasm --route /hello   # curl 127.0.0.1:8080/hello",
            "microvm fn deploy greet --python greet.py --max-concurrency 4",
            "microvm fn deploy hi --js hi.js --route /hi --timeout 2s",
        ],
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("image", metavar="IMAGE", nargs="?", help="image name or reference, or a module file to upload")
    p.add_argument("--python", metavar="FILE.py", help="a Python handler (def handle(request)) instead of an image")
    p.add_argument("--js", metavar="FILE.js",
                   help="a JavaScript handler (function handle(request)) instead of an image")
    p.add_argument("--route", metavar="/PATH", help="gateway route; it serves /PATH and /PATH/... (default: /NAME)")
    p.add_argument("--executor", choices=["wagi", "sdk"],
                   help="how requests reach an image's guest (default wagi: CGI over WASI)")
    p.add_argument("--fuel", metavar="N", help="fuel per invocation")
    p.add_argument("--memory", metavar="SIZE", help="memory limit per invocation")
    p.add_argument("--timeout", metavar="D", help="time limit per invocation")
    p.add_argument("--max-concurrency", metavar="N", type=int, help="concurrent invocations at most")
    p.add_argument("-e", "--env", metavar="K=V", action="append", default=[], help="environment (repeatable)")
    p.add_argument("--reuse", action="store_true",
                   help="keep warm instances between requests (faster; requests then share module state)")
    cmd(nsubs, "ls", "fn_ls", "List functions.", "microvm fn ls", aliases=["list"])
    p = cmd(nsubs, "inspect", "fn_inspect", "Show functions as JSON (route, limits, counters).",
            "microvm fn inspect hello")
    p.add_argument("refs", metavar="NAME", nargs="+")
    p = cmd(
        nsubs, "invoke", "fn_invoke", "Invoke a function and print its response body.",
        [
            "microvm fn invoke hello",
            "microvm fn invoke greet --data '{\"name\": \"ada\"}' -H 'Content-Type: application/json'",
            "microvm fn invoke upload --data @photo.jpg --path /photos",
        ],
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--data", metavar="TEXT|@FILE|-", help="request body: text, @FILE, or - for stdin")
    p.add_argument("--method", metavar="M", help="HTTP method (default: POST with --data, else GET)")
    p.add_argument("--path", metavar="P", default="/", help="request path (default: /)")
    p.add_argument(
        "-H", "--header", metavar="'K: V'", action="append", default=[], help="request header (repeatable)"
    )
    p = cmd(nsubs, "logs", "fn_logs", "Print a function's logs.", "microvm fn logs hello")
    p.add_argument("name", metavar="NAME")
    p = cmd(nsubs, "rm", "fn_rm", "Remove functions.", "microvm fn rm hello", aliases=["remove"])
    p.add_argument("refs", metavar="NAME", nargs="+")

    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ns = build_parser(only=command_path(argv)).parse_args(argv)
    if not hasattr(ns, "handler"):  # command_path guessed differently from argparse: parse for real
        ns = build_parser().parse_args(argv)
    from microvmd.cli.commands import run_command

    return run_command(ns)


if __name__ == "__main__":
    sys.exit(main())
