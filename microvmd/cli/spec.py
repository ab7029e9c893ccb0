"""Pure conversions for the client: command-line VM options -> VM spec, exit object -> exit status.

No I/O and no daemon here, so everything can be unit-tested directly.
"""
from __future__ import annotations

import os

from microvmd.units import parse_count, parse_duration, parse_size

# Exit status of the client (see CLI.md, "Exit status of the client").
EXIT_USAGE = 2
EXIT_CLIENT = 125          # daemon unreachable, or the API refused the request
EXIT_STOPPED_BY_HOST = 137  # the guest was stopped by the host (fuel, timeout, memory, trap, kill)

DEFAULT_PUBLISH_IP = "127.0.0.1"


class UsageError(ValueError):
    """Wrong usage of the client: reported like an argparse error, exit status 2."""


def _port(text: str, what: str, *, allow_zero: bool) -> int:
    try:
        port = int(text)
    except ValueError:
        raise UsageError(f"invalid {what} {text!r}: expected a port number") from None
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise UsageError(f"invalid {what} {text!r}: out of range")
    return port


def parse_env(items: list[str] | None, environ: dict | None = None) -> dict[str, str]:
    """["K=V", "K2=V2", "INHERITED"] -> {"K": "V", ...}. A bare KEY takes the client's value (if set)."""
    env = os.environ if environ is None else environ
    result: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not key:
            raise UsageError(f"invalid --env {item!r}: expected KEY=VALUE")
        if sep:
            result[key] = value
        elif key in env:
            result[key] = env[key]
    return result


def parse_dir(text: str, cwd: str | None = None) -> dict:
    """HOSTDIR[::GUESTDIR][:ro|:rw] -> {"host": abs path, "guest": path, "readonly": bool}.

    Without ::GUESTDIR the guest sees the directory under the path given (for an absolute HOSTDIR:
    the same path as on the host). The host path is always made absolute here, on the client side.
    """
    s = text
    readonly = False
    if s.endswith(":ro"):
        readonly, s = True, s[:-3]
    elif s.endswith(":rw"):
        s = s[:-3]
    host, sep, guest = s.partition("::")
    if not host or (sep and not guest):
        raise UsageError(f"invalid --dir {text!r}: expected HOSTDIR[::GUESTDIR][:ro]")
    if not sep:
        guest = host
    host = os.path.expanduser(host)
    if not os.path.isabs(host):
        host = os.path.join(cwd or os.getcwd(), host)
    host = os.path.normpath(host)
    if os.path.isabs(guest) or guest == ".":
        guest = os.path.normpath(guest) if guest != "." else guest
    return {"host": host, "guest": guest, "readonly": readonly}


def parse_disk(text: str) -> dict:
    """NAME[:ro|:rw|:cow] -> {"name": NAME, "mode": "rw"|"ro"|"cow"}."""
    name, sep, mode = text.rpartition(":")
    if not sep:
        name, mode = text, "rw"
    if mode not in ("rw", "ro", "cow"):
        raise UsageError(f"invalid --disk {text!r}: expected NAME[:ro|:cow]")
    if not name:
        raise UsageError(f"invalid --disk {text!r}: the disk name is empty")
    return {"name": name, "mode": mode}


def parse_publish(text: str) -> dict:
    """[HOSTIP:]HOSTPORT:GUESTPORT (or just GUESTPORT for any free host port) -> publish object.

    HOSTIP defaults to 127.0.0.1; IPv6 addresses may be written in brackets ([::1]:8080:80).
    """
    s = text
    if s.endswith("/tcp"):
        s = s[:-4]
    elif "/" in s.rpartition(":")[2]:
        raise UsageError(f"invalid --publish {text!r}: only TCP ports can be published")
    parts = s.rsplit(":", 2)
    host_ip = DEFAULT_PUBLISH_IP
    if len(parts) == 1:
        host_port_s, guest_port_s = "0", parts[0]
    elif len(parts) == 2:
        host_port_s, guest_port_s = parts
    else:
        host_ip, host_port_s, guest_port_s = parts
        if host_ip.startswith("[") and host_ip.endswith("]"):
            host_ip = host_ip[1:-1]
        if not host_ip:
            raise UsageError(f"invalid --publish {text!r}: empty host IP")
    try:
        host_port = _port(host_port_s, "host port", allow_zero=True)
        guest_port = _port(guest_port_s, "guest port", allow_zero=False)
    except UsageError as e:
        raise UsageError(f"invalid --publish {text!r}: {e}") from None
    return {"host_ip": host_ip, "host_port": host_port, "guest_port": guest_port}


def parse_egress(text: str) -> str:
    """HOST:PORT or CIDR:PORT, checked for shape and passed through as a string."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not (port == "*" or port.isdigit()):
        raise UsageError(f"invalid --allow-egress {text!r}: expected HOST:PORT or CIDR:PORT")
    if port != "*" and not 1 <= int(port) <= 65535:
        raise UsageError(f"invalid --allow-egress {text!r}: port out of range")
    return text


def _convert(fn, value, option: str):
    try:
        return fn(value)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None


def vm_spec_from_args(ns, *, cwd: str | None = None, environ: dict | None = None) -> dict:
    """The VM spec (docs/api.md) for the VM-OPTIONS of `run`/`create` in the argparse namespace ns.

    `start` is true for `run`, except for an attached `run --rm`: its VM is ephemeral (no record, no
    console files, gone when it ends), so the client opens the console first and then starts it and waits
    for it in one request (`POST /v1/vms/{id}/start?wait=true`), which still has the exit status to give.
    """
    command = getattr(ns, "command", "create")
    detach = bool(getattr(ns, "detach", False))
    args = list(getattr(ns, "args", None) or [])  # argparse already dropped a `--` right after IMAGE
    fuel = memory = timeout = None
    if getattr(ns, "fuel", None) is not None:
        fuel = _convert(parse_count, ns.fuel, "--fuel")
    if getattr(ns, "memory", None) is not None:
        memory = _convert(parse_size, ns.memory, "--memory")
        if memory <= 0:
            raise UsageError(f"--memory: invalid size {ns.memory!r}: must be positive")
    if getattr(ns, "timeout", None) is not None:
        timeout = _convert(parse_duration, ns.timeout, "--timeout")
        if timeout <= 0:
            raise UsageError(f"--timeout: invalid duration {ns.timeout!r}: must be positive")
    ephemeral = bool(getattr(ns, "rm", False))
    interactive = bool(getattr(ns, "interactive", False))
    extra: dict = {}
    restart = getattr(ns, "restart", None)
    if restart is not None:
        from microvmd.vmm.restart import RestartPolicy  # only here: it costs enum and dataclasses (~3 ms)

        try:
            extra["restart"] = str(RestartPolicy.parse(restart))
        except ValueError as e:
            raise UsageError(f"--restart: {e}") from None
        if ephemeral and extra["restart"] != "no":
            raise UsageError("--restart cannot be combined with --rm")
    if getattr(ns, "checkpoint_interval", None) is not None:
        every = _convert(parse_duration, ns.checkpoint_interval, "--checkpoint-interval")
        if every < 0.05:
            raise UsageError(f"--checkpoint-interval {ns.checkpoint_interval!r}: at least 50ms")
        extra["checkpoint_interval"] = every
    return {**extra,
        "image": ns.image,
        "name": getattr(ns, "name", None),
        "args": args,
        "env": parse_env(getattr(ns, "env", None), environ),
        "fuel": fuel,
        "memory": memory,
        "timeout": timeout,
        "dirs": [parse_dir(d, cwd) for d in getattr(ns, "dir", None) or []],
        "disks": [parse_disk(d) for d in getattr(ns, "disk", None) or []],
        "publish": [parse_publish(p) for p in getattr(ns, "publish", None) or []],
        "allow_egress": [parse_egress(e) for e in getattr(ns, "allow_egress", None) or []],
        "ephemeral": ephemeral,
        "stdin": interactive,
        "start": command == "run" and (detach or not (ephemeral or interactive)),
    }


def exit_status(exit_obj: dict | None) -> tuple[int, str | None]:
    """Map an exit object from the API to (client exit status, host-stop reason or None).

    reason "exit" -> the guest's WASI exit code (0 when its entry returned normally);
    any other reason (out_of_fuel, timeout, memory_limit, stack_overflow, "trap: ...", killed,
    stopped, daemon_restart) -> 137 and the reason, which the caller prints on stderr.
    """
    if not exit_obj:
        return EXIT_STOPPED_BY_HOST, "unknown"
    reason = exit_obj.get("reason") or "exit"
    if reason == "exit":
        code = exit_obj.get("code")
        if code is None:
            return 0, None
        code = int(code)
        if 0 <= code <= 255:
            return code, None
        return (code & 0xFF) or 1, None
    return EXIT_STOPPED_BY_HOST, str(reason)


def looks_like_file(arg: str) -> bool:
    """True when a run/create IMAGE argument names a module file to upload rather than an image.

    A path ending in .wasm/.wat, or an existing file that is named with a path separator or that
    starts with the wasm magic number. (A file that merely shares an image's name in the current
    directory does not shadow the image.)
    """
    if arg.endswith((".wasm", ".wat")):
        return True
    if not os.path.isfile(arg):
        return False
    if os.sep in arg or (os.altsep and os.altsep in arg):
        return True
    try:
        with open(arg, "rb") as f:
            return f.read(4) == b"\0asm"
    except OSError:
        return False
