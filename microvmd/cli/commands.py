"""The commands of `microvm`: one `cmd_<handler>(ctx, ns) -> exit status` per command.

Every request goes through ctx.api (an ApiClient). Errors: ClientError (daemon unreachable, API
refused) -> `microvm: <message>` on stderr and 125; UsageError -> argparse-style error and 2.
"""
from __future__ import annotations

import os
import sys
import time

from microvmd import __version__
from microvmd.cli import output
from microvmd.cli.client import (
    ApiClient,
    ApiError,
    ClientError,
    Unreachable,
    q,
    read_token_file,
    resolve_target,
    without_typing_extensions,
)
from microvmd.cli.spec import (
    EXIT_CLIENT,
    UsageError,
    exit_status,
    looks_like_file,
    parse_egress,
    parse_publish,
    vm_spec_from_args,
)
from microvmd.units import format_duration, format_size, parse_count, parse_duration, parse_size

with without_typing_extensions():  # answers are decoded through the contract's models; see client.py
    from microvmd import contract

EXIT_INTERRUPTED = 130
LOG_DRAIN_GRACE = 2.0  # seconds to let console output drain after the VM exited


class Ctx:
    def __init__(self, ns):
        self.ns = ns
        self.json = bool(getattr(ns, "json", False))
        self._api: ApiClient | None = None

    @property
    def api(self) -> ApiClient:
        if self._api is None:
            ns = self.ns
            self._api = ApiClient(
                resolve_target(
                    getattr(ns, "socket", None),
                    token_file=getattr(ns, "token_file", None),
                    cafile=getattr(ns, "tls_ca", None),
                )
            )
        return self._api

    def error(self, message: str) -> None:
        sys.stdout.flush()
        sys.stderr.write(f"microvm: {message}\n")
        sys.stderr.flush()

    def out(self, text: str = "") -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def emit(self, obj) -> None:
        output.print_json(obj)


def run_command(ns) -> int:
    ctx = Ctx(ns)
    handler = globals()["cmd_" + ns.handler]
    try:
        return int(handler(ctx, ns) or 0)
    except UsageError as e:
        ns._parser.error(str(e))  # exits 2
        raise  # unreachable
    except ClientError as e:
        ctx.error(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Our stdout went away (`microvm logs x | head`): stop quietly.
        try:
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141


# --- helpers -------------------------------------------------------------------------------------------

def _background(target, *args, name: str | None = None):
    """Start ``target(*args)`` in a daemon thread that never takes Ctrl-C, SIGTERM or SIGHUP.

    Python runs signal handlers in the main thread only, but the kernel may deliver a process's signal to
    any thread that does not block it: one that landed in a log copier would leave the main thread blocked
    in its request (`run --rm` waiting for a VM that never ends) and Ctrl-C would do nothing. The thread
    is started with those signals blocked (it inherits the mask), so they always reach the main thread."""
    import signal
    import threading

    t = threading.Thread(target=target, args=args, daemon=True, name=name)
    blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        t.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return t


def _items(answer, key: str) -> list:
    """{"vms": [...]} or a bare list -> the list."""
    if isinstance(answer, dict):
        value = answer.get(key)
        return value if isinstance(value, list) else []
    return answer if isinstance(answer, list) else []


def _first(obj: dict, *keys, default=None):
    for k in keys:
        v = obj.get(k)
        if v is not None and v != "":
            return v
    return default


def _each(ctx: Ctx, refs: list[str], fn) -> tuple[int, list]:
    """Apply fn to every ref; an API error is reported and the others still run (exit 125 at the end)."""
    status, results = 0, []
    for ref in refs:
        try:
            results.append((ref, fn(ref)))
        except ApiError as e:
            ctx.error(str(e))
            status = EXIT_CLIENT
    return status, results


def _emit_results(ctx: Ctx, results: list, *, always_json: bool = False, show_ref: bool = True) -> None:
    if ctx.json or always_json:
        objs = [r for _, r in results if r is not None]
        if objs:
            ctx.emit(objs[0] if len(objs) == 1 else objs)
    elif show_ref:
        for ref, _ in results:
            ctx.out(ref)


def _read_file(path: str) -> bytes:
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ClientError(f"cannot read {path}: {e.strerror or e}") from None


def _image_name_from_path(path: str) -> str:
    base = os.path.basename(path)
    stem, ext = os.path.splitext(base)
    return stem if ext in (".wasm", ".wat") and stem else base


def _upload_image(ctx: Ctx, path: str, name: str | None = None, entry: str | None = None,
                  no_asyncify: bool = False) -> dict:
    data = _read_file(path)
    query = {k: v for k, v in (("name", name), ("entry", entry)) if v}
    if no_asyncify:
        query["no_asyncify"] = "true"
    img = ctx.api.post("/v1/images", data, query=query or None, content_type="application/wasm", answer=contract.Image)
    if not isinstance(img, dict) or not img.get("digest"):
        raise ClientError(f"unexpected answer to the image upload: {img!r}")
    return img


def _upload_with_progress(ctx: Ctx, path: str, name: str, entry: str | None, no_asyncify: bool) -> dict:
    """The upload, while the daemon's one-time Asyncify rewrite of a big module (minutes for CPython) is
    shown on stderr: the upload runs in a thread, this one polls GET /v1/images for its ``importing`` entry."""

    box: dict = {}

    def upload() -> None:
        try:
            box["img"] = _upload_image(ctx, path, name, entry, no_asyncify)
        except BaseException as e:  # handed to the main thread
            box["exc"] = e

    t = _background(upload)
    t.join(2.0)  # most imports are done by then: nothing to show
    shown, last_line = False, 0.0
    tty = sys.stderr.isatty()
    while t.is_alive():
        try:
            answer = ctx.api.get("/v1/images", answer=contract.ImageList)
        except ClientError:
            answer = None
        jobs = [j for j in (answer.get("importing") or []) if isinstance(j, dict)] if isinstance(answer, dict) else []
        job = next((j for j in jobs if j.get("name") == name), None)
        if job is not None:
            text = (f"{name}: rewriting for snapshots (Asyncify, once per host): {job.get('elapsed', 0):.0f} s of "
                    f"about {job.get('expected_seconds', 0):.0f} s")
            now = time.monotonic()
            if tty:
                sys.stderr.write(f"\r{text}  ")
                sys.stderr.flush()
                shown = True
            elif now - last_line >= 15:
                sys.stderr.write(text + "\n")
                sys.stderr.flush()
                last_line = now
        t.join(1.0)
    if shown:
        sys.stderr.write("\n")
    if "exc" in box:
        raise box["exc"]
    return box["img"]  # type: ignore[no-any-return]


def resolve_image(ctx: Ctx, arg: str) -> str:
    """IMAGE|FILE.wasm -> an image reference: a file is uploaded (without a name) and its digest used."""
    if looks_like_file(arg):
        return _upload_image(ctx, arg)["digest"]
    return arg


def _convert(fn, value, option: str):
    try:
        return fn(value)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None


def _parse_env(items) -> dict:
    from microvmd.cli.spec import parse_env

    return parse_env(items)


def _binary_writer(stream):
    """(write, flush) for raw bytes on a text stream (sys.stdout / sys.stderr, or a test double)."""
    buf = getattr(stream, "buffer", None)
    if buf is not None:
        def write(data: bytes) -> None:
            buf.write(data)
            buf.flush()
    else:
        def write(data: bytes) -> None:
            stream.write(data.decode("utf-8", "replace"))
            stream.flush()
    return write


def _same_destination(a, b) -> bool:
    """Do two output streams end up in the same file/pipe/terminal (so one merged stream is right)?"""
    try:
        sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (OSError, ValueError, AttributeError):
        return True
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


class LogFollower:
    """Copies a VM's console to our stdout/stderr.

    When stdout and stderr go to the same place (a terminal, `2>&1`) one `stream=all` request keeps the
    guest's interleaving; otherwise stdout and stderr are fetched separately, each to its own side.
    """

    def __init__(self, api: ApiClient, ref: str, *, follow: bool, stream: str | None = None,
                 from_end: bool = False):
        self.api = api
        self.ref = ref
        self.follow = follow
        self.from_end = from_end
        if stream == "stderr":
            plan = [("stderr", sys.stderr)]
        elif stream in ("stdout", "all"):
            plan = [(stream, sys.stdout)]
        elif _same_destination(sys.stdout, sys.stderr):
            plan = [("all", sys.stdout)]
        else:
            plan = [("stdout", sys.stdout), ("stderr", sys.stderr)]
        self.plan = plan
        self.responses: list = []
        self.threads: list = []
        self.errors: list[BaseException] = []

    def open(self) -> None:
        sys.stdout.flush()
        for name, _ in self.plan:
            self.responses.append(
                self.api.request(
                    "GET",
                    f"/v1/vms/{q(self.ref)}/logs",
                    stream=True,
                    query={"follow": "true" if self.follow else None, "stream": name,
                           "from_end": "true" if self.from_end else None},
                )
            )

    def _copy(self, resp, out) -> None:
        write = _binary_writer(out)
        try:
            for chunk in resp.chunks():
                write(chunk)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            if not resp.aborted:
                self.errors.append(e)

    def start(self) -> None:
        """Open the streams and copy each in a background thread."""
        if not self.responses:
            self.open()
        for resp, (_, out) in zip(self.responses, self.plan, strict=True):
            t = _background(self._copy, resp, out)
            self.threads.append(t)

    def run(self) -> None:
        """Copy everything in the foreground (until the end of the logs, or the VM's exit with follow)."""
        self.open()
        try:
            if len(self.responses) == 1 or not self.follow:
                for resp, (_, out) in zip(self.responses, self.plan, strict=True):
                    self._copy(resp, out)
            else:
                self.start()
                while any(t.is_alive() for t in self.threads):
                    for t in self.threads:
                        t.join(0.2)
        finally:
            self.abort()
            self.close()
        self.raise_errors()

    def finish(self, grace: float) -> None:
        """Give the copiers `grace` seconds to reach the end of their streams, then stop them."""
        deadline = time.monotonic() + grace
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.abort()
        for t in self.threads:
            t.join(1.0)

    def abort(self) -> None:
        for resp in self.responses:
            resp.abort()

    def close(self) -> None:
        for resp in self.responses:
            try:
                resp.close()
            except OSError:
                pass

    def raise_errors(self) -> None:
        for e in self.errors:
            if isinstance(e, (ClientError, BrokenPipeError, KeyboardInterrupt)):
                raise e
        if self.errors:
            raise self.errors[0]


class Progress:
    """`label: 12MiB / 40MiB (30%)` on stderr, redrawn in place; silent when stderr is not a terminal."""

    def __init__(self, label: str, total: int | None):
        self.label = label
        self.total = total
        self.done = 0
        self.enabled = sys.stderr.isatty()
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last >= 0.1:
            self._last = now
            self._draw()

    def _draw(self) -> None:
        text = f"{self.label}: {format_size(self.done)}"
        if self.total:
            text += f" / {format_size(self.total)} ({min(100, self.done * 100 // self.total)}%)"
        sys.stderr.write("\r" + text + "\x1b[K")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            self._draw()
            sys.stderr.write("\n")
            sys.stderr.flush()


class _CountingReader:
    def __init__(self, f, progress: Progress):
        self.f = f
        self.progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.progress.update(len(data))
        return data


# --- system --------------------------------------------------------------------------------------------

def cmd_info(ctx: Ctx, ns) -> int:
    info = ctx.api.get("/v1/info", answer=contract.Info)
    if ctx.json or not isinstance(info, dict):
        ctx.emit(info)
        return 0
    vms = info.get("vms") or {}
    vm_text = ", ".join(f"{state} {count}" for state, count in vms.items()) if isinstance(vms, dict) else str(vms)
    rows = [
        ("Daemon version", info.get("version")),
        ("Wasmtime version", info.get("wasmtime_version")),
        ("Socket", info.get("socket") or ctx.api.target),
        ("State dir", info.get("state_dir")),
        ("Uptime", format_duration(info.get("uptime_s"))),
        ("Images", info.get("images")),
        ("VMs", vm_text or "none"),
    ]
    width = max(len(k) for k, _ in rows) + 1
    for k, v in rows:
        ctx.out(f"{(k + ':').ljust(width)} {'-' if v is None else v}")
    engine = info.get("engine")
    if isinstance(engine, dict) and engine:
        ctx.out("Engine:")
        for k, v in engine.items():
            ctx.out(f"  {k}: {v}")
    known = {"version", "wasmtime_version", "socket", "state_dir", "uptime_s", "images", "vms", "engine"}
    for k, v in info.items():
        if k not in known and not isinstance(v, (dict, list)):
            ctx.out(f"{k}: {v}")
    return 0


def cmd_version(ctx: Ctx, ns) -> int:
    client = {"version": __version__, "python": sys.version.split()[0]}
    daemon = None
    problem = None
    try:
        daemon = ctx.api.get("/v1/info", answer=contract.Info)
    except ClientError as e:
        problem = str(e)
    if ctx.json:
        ctx.emit({"client": client, "daemon": daemon})
    else:
        ctx.out(f"Client: microvm {client['version']} (Python {client['python']})")
        if isinstance(daemon, dict):
            extra = f" (wasmtime {daemon['wasmtime_version']})" if daemon.get("wasmtime_version") else ""
            ctx.out(f"Daemon: microvmd {daemon.get('version', '?')}{extra}")
        else:
            ctx.out("Daemon: not reachable")
    if problem:
        ctx.error(problem)
    return 0


# --- images --------------------------------------------------------------------------------------------

def cmd_image_import(ctx: Ctx, ns) -> int:
    name = ns.name or _image_name_from_path(ns.file)
    manifest: dict = {}
    if getattr(ns, "default_args", None):
        manifest["args"] = list(ns.default_args)
    if getattr(ns, "default_env", None):
        manifest["env"] = _parse_env(ns.default_env)
    limits: dict = {}
    if getattr(ns, "default_fuel", None):
        limits["fuel"] = _convert(parse_count, ns.default_fuel, "--fuel")
    if getattr(ns, "default_memory", None):
        limits["memory"] = _convert(parse_size, ns.default_memory, "--memory")
    if getattr(ns, "default_timeout", None):
        limits["timeout"] = _convert(parse_duration, ns.default_timeout, "--timeout")
    if limits:
        manifest["limits"] = limits
    img = _upload_with_progress(ctx, ns.file, name, getattr(ns, "entry", None),
                                no_asyncify=bool(getattr(ns, "no_asyncify", False)))
    if manifest:
        img = ctx.api.request("PATCH", f"/v1/images/{q(img.get('name') or img['digest'])}", manifest,
                              answer=contract.Image)
    if ctx.json:
        ctx.emit(img)
    else:
        ctx.out(f"{img.get('name') or name} {img['digest']}")
    return 0


def cmd_image_ls(ctx: Ctx, ns) -> int:
    answer = ctx.api.get("/v1/images", answer=contract.ImageList)
    if ctx.json:
        ctx.emit(answer)
        return 0
    rows = []
    for img in _items(answer, "images"):
        name = img.get("name")
        if not name or name == img.get("digest"):
            name = "<none>"
        rows.append([name, output.short_digest(img.get("digest")), output.size(img.get("size")),
                     output.ago(img.get("created"))])
    output.table(["NAME", "DIGEST", "SIZE", "CREATED"], rows)
    return 0


def cmd_image_inspect(ctx: Ctx, ns) -> int:
    status, results = _each(ctx, ns.refs, lambda ref: ctx.api.get(f"/v1/images/{q(ref)}", answer=contract.Image))
    _emit_results(ctx, results, always_json=True)
    return status


def cmd_image_rm(ctx: Ctx, ns) -> int:
    status, results = _each(ctx, ns.refs, lambda ref: ctx.api.delete(f"/v1/images/{q(ref)}"))
    _emit_results(ctx, results)
    return status


# --- VMs -----------------------------------------------------------------------------------------------

def _create_vm(ctx: Ctx, ns) -> dict:
    spec = vm_spec_from_args(ns)
    spec["image"] = resolve_image(ctx, ns.image)
    vm = ctx.api.post("/v1/vms", spec, answer=contract.Vm)
    if not isinstance(vm, dict) or not vm.get("id"):
        raise ClientError(f"unexpected answer to the VM creation: {vm!r}")
    return vm


def cmd_create(ctx: Ctx, ns) -> int:
    vm = _create_vm(ctx, ns)
    if ctx.json:
        ctx.emit(vm)
    else:
        ctx.out(vm["id"])
    return 0


def cmd_run(ctx: Ctx, ns) -> int:
    vm_spec_from_args(ns)  # usage errors before anything is uploaded
    if ns.detach:
        return cmd_create(ctx, ns)
    vm = _create_vm(ctx, ns)
    return _attach(ctx, vm["id"], start=ns.rm or ns.interactive, stdin=ns.interactive, ephemeral=ns.rm)


def cmd_attach(ctx: Ctx, ns) -> int:
    vm = ctx.api.get(f"/v1/vms/{q(ns.ref)}", answer=contract.Vm)
    if vm["state"] in ("exited", "stopped"):
        return _report_exit(ctx, vm["id"], vm["exit"])
    return _attach(ctx, vm["id"], start=False, stdin=True, from_end=True)


class _StdinStream:
    """Our standard input as a request body: what is there is sent at once (a line typed, a pipe's
    write), not held back until a block is full."""

    def read(self, n: int) -> bytes:
        try:
            return os.read(sys.stdin.fileno(), n)
        except (OSError, ValueError):
            return b""


def _send_stdin(ctx: Ctx, vm_id: str, required: bool) -> None:
    """In a thread: stream our stdin to the guest until it ends. A VM that takes no input is fine when we
    were not asked for it (attach without -i), else worth a line."""

    def run() -> None:
        try:
            ctx.api.post(f"/v1/vms/{q(vm_id)}/stdin", _StdinStream(), content_type="application/octet-stream",
                         answer=contract.StdinResult)
        except ApiError as e:
            if required or e.code not in ("stdin_closed", "no_stdin"):
                ctx.error(f"cannot send input: {e.message}")
        except ClientError:
            pass  # the VM ended and the daemon closed the stream: nothing left to send it
    _background(run, name="stdin")


def _report_exit(ctx: Ctx, label: str, exit_obj) -> int:
    code, reason = exit_status(exit_obj if isinstance(exit_obj, dict) else None)
    if reason is not None:
        ctx.error(f"VM {label} stopped by host: {reason}")
    return code


def _attach(ctx: Ctx, vm_id: str, *, start: bool, stdin: bool = False, from_end: bool = False,
            ephemeral: bool = False) -> int:
    """Stream the console of a VM (with ``stdin``, our stdin to it too), wait for it, and return the exit
    status for the client.

    With ``start`` the VM (an ephemeral one, which is gone once it ends) is started only once its console
    streams are open, by a request that also waits for its end: no output and no exit status can be missed.
    """
    api = ctx.api
    follower = LogFollower(api, vm_id, follow=True, from_end=from_end)
    restore = _interrupt_on_termination()
    try:
        try:
            follower.start()
            if stdin:
                _send_stdin(ctx, vm_id, required=start)
            if start:
                vm = api.post(f"/v1/vms/{q(vm_id)}/start", query={"wait": "true"}, answer=contract.Vm)
                exit_obj = _exit_of(vm)
            else:
                exit_obj = api.post(f"/v1/vms/{q(vm_id)}/wait", answer=contract.WaitResult)
            follower.finish(LOG_DRAIN_GRACE)
            if ephemeral and isinstance(exit_obj, dict) and exit_obj.get("reason") == "out_of_fuel":
                try:  # parked out of fuel: an ephemeral VM that nobody will add fuel to goes now
                    api.delete(f"/v1/vms/{q(vm_id)}", query={"force": "true"})
                except ClientError:
                    pass
        except KeyboardInterrupt:
            follower.abort()
            sys.stderr.write("\n")
            exit_obj = _kill_after_interrupt(ctx, vm_id)
            if exit_obj is None:
                return EXIT_INTERRUPTED
        for e in follower.errors:
            if isinstance(e, BrokenPipeError):
                raise e
            ctx.error(f"console output may be incomplete: {e}")
        return _report_exit(ctx, vm_id, exit_obj)
    finally:
        restore()
        follower.close()


def _exit_of(vm: dict) -> dict:
    """The exit object of a VM that has ended or run out of fuel, as wait would answer it."""
    if vm.get("exit"):
        return vm["exit"]
    return {"code": None, "reason": vm.get("state")}


def _interrupt_on_termination():
    """While attached, SIGTERM and SIGHUP act like Ctrl-C (the VM is killed, not left behind).

    Returns a function that restores the previous handlers."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue  # e.g. started with nohup: keep ignoring it
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # not the main thread
            pass

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def _kill_after_interrupt(ctx: Ctx, vm_id: str):
    api = ctx.api
    try:
        try:
            vm = api.post(f"/v1/vms/{q(vm_id)}/kill", answer=contract.Vm)
        except ApiError:
            pass  # it has exited already (invalid_state): report its real exit below
        else:
            if vm.get("exit"):
                return vm["exit"]  # (an ephemeral VM is gone once it has ended: nothing to wait for)
        return api.post(f"/v1/vms/{q(vm_id)}/wait", query={"timeout": "5"}, answer=contract.WaitResult)
    except (ClientError, KeyboardInterrupt):
        return None


def cmd_vm_action(ctx: Ctx, ns) -> int:
    status, results = _each(ctx, ns.refs, lambda ref: ctx.api.post(f"/v1/vms/{q(ref)}/{ns.action}", answer=contract.Vm))
    _emit_results(ctx, results)
    return status


def cmd_wait(ctx: Ctx, ns) -> int:
    query = None
    if ns.timeout is not None:
        query = {"timeout": f"{_convert(parse_duration, ns.timeout, '--timeout'):g}"}
    exit_obj = ctx.api.post(f"/v1/vms/{q(ns.ref)}/wait", query=query, answer=contract.WaitResult)
    if ctx.json:
        ctx.emit(exit_obj)
    return _report_exit(ctx, ns.ref, exit_obj)


def cmd_rm(ctx: Ctx, ns) -> int:
    query = {"force": "true"} if ns.force else None
    status, results = _each(ctx, ns.refs, lambda ref: ctx.api.delete(f"/v1/vms/{q(ref)}", query=query))
    _emit_results(ctx, results)
    return status


def _state_text(vm: dict) -> str:
    state = vm.get("state") or "-"
    ex = vm.get("exit")
    if state in ("exited", "stopped") and isinstance(ex, dict):
        reason = ex.get("reason") or "exit"
        detail = ex.get("code", 0) if reason == "exit" else reason
        state = f"{state} ({0 if detail is None else detail})"
        if vm.get("restarting"):
            state += ", restarting"
    return state


def _restart_text(vm: dict) -> str:
    """RESTART column: the policy and, once it has restarted the VM, how often (docker's RestartCount)."""
    policy = vm.get("restart_policy") or "no"
    count = vm.get("restart_count") or 0
    return f"{policy} ({count})" if count else policy


def _uptime(vm: dict) -> str:
    if vm.get("state") in ("running", "paused", "out_of_fuel") and vm.get("started"):
        return output.span(vm.get("started"))
    return "-"


def cmd_ps(ctx: Ctx, ns) -> int:
    answer = ctx.api.get("/v1/vms", query={"all": "true"} if ns.all else None, answer=contract.VmList)
    if ctx.json:
        ctx.emit(answer)
        return 0
    vms = _items(answer, "vms")
    if ns.quiet:
        for vm in vms:
            ctx.out(vm.get("id", ""))
        return 0
    rows = []
    for vm in vms:
        fuel = vm.get("fuel_consumed")
        rows.append([
            output.short_id(vm.get("id")),
            vm.get("name"),
            output.short_image(vm.get("image")),
            _state_text(vm),
            fuel if isinstance(fuel, int) else None,
            output.size(vm.get("memory_bytes")),
            output.ago(vm.get("created")),
            _uptime(vm),
            _restart_text(vm),
        ])
    output.table(["ID", "NAME", "IMAGE", "STATE", "FUEL USED", "MEMORY", "CREATED", "UPTIME", "RESTART"], rows)
    return 0


def cmd_inspect(ctx: Ctx, ns) -> int:
    status, results = _each(ctx, ns.refs, lambda ref: ctx.api.get(f"/v1/vms/{q(ref)}", answer=contract.Vm))
    _emit_results(ctx, results, always_json=True)
    return status


def cmd_logs(ctx: Ctx, ns) -> int:
    LogFollower(ctx.api, ns.ref, follow=ns.follow, stream=ns.stream).run()
    return 0


def cmd_fuel_add(ctx: Ctx, ns) -> int:
    amount = _convert(parse_count, ns.amount, "AMOUNT")
    if amount <= 0:
        raise UsageError(f"AMOUNT: must be positive, got {ns.amount!r}")
    vm = ctx.api.post(f"/v1/vms/{q(ns.ref)}/fuel", {"amount": amount}, answer=contract.Vm)
    if ctx.json:
        ctx.emit(vm)
    elif isinstance(vm, dict):
        ctx.out(
            f"{output.short_id(vm.get('id')) if vm.get('id') else ns.ref}: added {amount} fuel "
            f"(remaining {vm.get('fuel_remaining', '-')}, state {vm.get('state', '-')})"
        )
    else:
        ctx.out(ns.ref)
    return 0


# --- disks ---------------------------------------------------------------------------------------------

def cmd_disk_create(ctx: Ctx, ns) -> int:
    body: dict = {"name": ns.name}
    if ns.size is not None:
        body["size"] = _convert(parse_size, ns.size, "--size")
        if body["size"] <= 0:
            raise UsageError(f"--size: must be positive, got {ns.size!r}")
    elif not ns.from_file:
        raise UsageError("the following arguments are required: --size (or --from FILE)")
    if not ns.from_file:
        disk = ctx.api.post("/v1/disks", body, answer=contract.Disk)
    else:
        # The daemon may be on another host: create the disk, then upload the file's bytes to it.
        try:
            with open(os.path.expanduser(ns.from_file), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                body.setdefault("size", size)
                disk = _disk_create_from(ctx, body, f, size, ns.from_file)
        except OSError as e:
            raise ClientError(f"cannot read {ns.from_file}: {e.strerror or e}") from None
    if ctx.json:
        ctx.emit(disk)
    else:
        ctx.out(disk.get("name", ns.name) if isinstance(disk, dict) else ns.name)
    return 0


def _disk_create_from(ctx: Ctx, body: dict, f, size: int, label: str):
    name = body["name"]
    ctx.api.post("/v1/disks", body, answer=contract.Disk)
    progress = Progress(f"Copying {label}", size)
    try:
        disk = ctx.api.request("PUT", f"/v1/disks/{q(name)}/content", _CountingReader(f, progress),
                               content_type="application/octet-stream", content_length=size, answer=contract.Disk)
    except BaseException:
        try:
            ctx.api.delete(f"/v1/disks/{q(name)}")  # do not leave an empty disk behind
        except ClientError:
            pass
        raise
    progress.finish()
    return disk


def cmd_disk_ls(ctx: Ctx, ns) -> int:
    answer = ctx.api.get("/v1/disks", answer=contract.DiskList)
    if ctx.json:
        ctx.emit(answer)
        return 0
    rows = []
    for d in _items(answer, "disks"):
        used_by = _first(d, "used_by", "vms", "attached_to")
        if isinstance(used_by, list):
            used_by = ",".join(str(x) for x in used_by)
        rows.append([d.get("name"), output.size(d.get("size")), used_by, output.ago(d.get("created"))])
    output.table(["NAME", "SIZE", "USED BY", "CREATED"], rows)
    return 0


def cmd_disk_rm(ctx: Ctx, ns) -> int:
    status, results = _each(ctx, ns.refs, lambda ref: ctx.api.delete(f"/v1/disks/{q(ref)}"))
    _emit_results(ctx, results)
    return status


# --- snapshots -----------------------------------------------------------------------------------------

def cmd_snapshot_create(ctx: Ctx, ns) -> int:
    body: dict = {"diff": bool(ns.diff)}
    if ns.name:
        body["name"] = ns.name
    snap = ctx.api.post(f"/v1/vms/{q(ns.ref)}/snapshots", body, answer=contract.Snapshot)
    if ctx.json:
        ctx.emit(snap)
    else:
        ctx.out(snap.get("name", "") if isinstance(snap, dict) else str(snap))
    return 0


def cmd_snapshot_ls(ctx: Ctx, ns) -> int:
    answer = ctx.api.get("/v1/snapshots", query={"all": "true"} if getattr(ns, "all", False) else None,
                         answer=contract.SnapshotList)
    if ctx.json:
        ctx.emit(answer)
        return 0
    rows = []
    for s in _items(answer, "snapshots"):
        vm = _first(s, "vm_name", "vm", "vm_id")
        if isinstance(vm, dict):
            vm = _first(vm, "name", "id")
        if isinstance(vm, str) and len(vm) >= 32 and all(c in "0123456789abcdef" for c in vm):
            vm = output.short_id(vm)
        kind = _first(s, "kind", "snapshot_kind")
        if s.get("parent") or s.get("diff"):
            kind = f"{kind or 'snapshot'} (diff)"
        size = _first(s, "memory_bytes", "size")
        rows.append([s.get("name"), vm, kind, output.size(size), output.ago(s.get("created"))])
    damaged = _items(answer, "damaged")
    for s in damaged:
        rows.append([s.get("name"), "-", "DAMAGED", "-", "-"])
    output.table(["NAME", "VM", "KIND", "SIZE", "CREATED"], rows)
    for s in damaged:
        ctx.error(f"snapshot {s.get('name')} is damaged: {s.get('reason')} (kept as {s.get('path')}; "
                f"'microvm snapshot rm {s.get('name')}' removes it)")
    return 0


def cmd_snapshot_inspect(ctx: Ctx, ns) -> int:
    status, results = _each(ctx, ns.refs, lambda ref: ctx.api.get(f"/v1/snapshots/{q(ref)}", answer=contract.Snapshot))
    _emit_results(ctx, results, always_json=True)
    return status


def cmd_snapshot_rm(ctx: Ctx, ns) -> int:
    status, results = _each(ctx, ns.refs, lambda ref: ctx.api.delete(f"/v1/snapshots/{q(ref)}"))
    _emit_results(ctx, results)
    return status


def cmd_snapshot_export(ctx: Ctx, ns) -> int:
    to_stdout = ns.output == "-"
    if to_stdout and sys.stdout.isatty():
        raise UsageError("refusing to write a snapshot to a terminal; use -o FILE or redirect stdout")
    resp = ctx.api.request("GET", f"/v1/snapshots/{q(ns.ref)}/export", stream=True)
    tmp = None
    try:
        progress = Progress(f"Exporting {ns.ref}", resp.length)
        if to_stdout:
            write = _binary_writer(sys.stdout)
            for chunk in resp.chunks():
                write(chunk)
                progress.update(len(chunk))
        else:
            target = os.path.abspath(ns.output)
            tmp = f"{target}.part-{os.getpid()}"
            try:
                with open(tmp, "wb") as f:
                    for chunk in resp.chunks():
                        f.write(chunk)
                        progress.update(len(chunk))
                os.replace(tmp, target)
            except OSError as e:
                raise ClientError(f"cannot write {ns.output}: {e.strerror or e}") from None
            tmp = None
        progress.finish()
    finally:
        resp.close()
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    if resp.length is not None and progress.done != resp.length:
        raise ClientError(f"snapshot export cut short: got {progress.done} of {resp.length} bytes")
    if ctx.json:
        ctx.emit({"name": ns.ref, "file": ns.output, "size": progress.done})
    return 0


def cmd_snapshot_import(ctx: Ctx, ns) -> int:
    if ns.file == "-":
        f, size = sys.stdin.buffer, None
    else:
        try:
            f = open(ns.file, "rb")
            size = os.fstat(f.fileno()).st_size
        except OSError as e:
            raise ClientError(f"cannot read {ns.file}: {e.strerror or e}") from None
    progress = Progress(f"Importing {ns.file}", size)
    try:
        snap = ctx.api.post(
            "/v1/snapshots/import",
            _CountingReader(f, progress),
            content_type="application/octet-stream",
            content_length=size,
            answer=contract.Snapshot,
        )
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    progress.finish()
    if ctx.json:
        ctx.emit(snap)
    else:
        ctx.out(snap.get("name", "") if isinstance(snap, dict) else str(snap))
    return 0


def cmd_restore(ctx: Ctx, ns) -> int:
    body: dict = {"start": bool(ns.start)}
    if ns.name:
        body["name"] = ns.name
    if ns.allow_egress is not None:
        body["allow_egress"] = [parse_egress(e) for e in ns.allow_egress]
    if ns.publish is not None:
        body["publish"] = [parse_publish(p) for p in ns.publish]
    vm = ctx.api.post(f"/v1/snapshots/{q(ns.ref)}/restore", body, answer=contract.Vm)
    if ctx.json:
        ctx.emit(vm)
    else:
        ctx.out(vm.get("id", "") if isinstance(vm, dict) else str(vm))
    return 0


def migrate_destination(to: str) -> str:
    """--to value -> unix:///abs/path or https://HOST:PORT (a bare path is taken as a Unix socket)."""
    if to.startswith("unix://"):
        path = to[len("unix://"):]
        if not path.startswith("/"):
            raise UsageError(f"--to {to!r}: expected unix:///absolute/path.sock")
        return to
    if to.startswith("https://"):
        from urllib.parse import urlsplit

        parts = urlsplit(to)
        try:
            _ = parts.port
        except ValueError:
            raise UsageError(f"--to {to!r}: bad port") from None
        if not parts.hostname:
            raise UsageError(f"--to {to!r}: expected https://HOST:PORT")
        return to
    if "://" not in to and (to.startswith(("/", ".")) or to.endswith(".sock")):
        return "unix://" + os.path.abspath(to)
    raise UsageError(f"--to {to!r}: expected unix:///path/to/other.sock or https://HOST:PORT")


def cmd_migrate(ctx: Ctx, ns) -> int:
    body: dict = {"to": migrate_destination(ns.to)}
    if ns.to_token_file:
        body["token"] = read_token_file(ns.to_token_file)
    if getattr(ns, "to_ca", None):
        body["ca_file"] = os.path.abspath(ns.to_ca)
    answer = ctx.api.post(f"/v1/vms/{q(ns.ref)}/migrate", body, answer=contract.MigrateResult)
    if ctx.json:
        ctx.emit(answer)
    else:
        vm = answer.get("vm") if isinstance(answer, dict) else None
        new_id = vm.get("id") if isinstance(vm, dict) else None
        ctx.out(new_id or ns.ref)
        # stdout stays the new id (scripts read it); a disk that could not keep its name is said on stderr
        for d in (answer.get("disks") or []) if isinstance(answer, dict) else []:
            if d.get("renamed"):
                ctx.error(f"note: disk {d['name']} is {d['target_name']} on the target: a disk named "
                          f"{d['name']} already exists there (it was left as it is)")
    return 0


# --- functions -----------------------------------------------------------------------------------------

def cmd_fn_deploy(ctx: Ctx, ns) -> int:
    given = [x for x in (ns.image, ns.python, ns.js) if x]
    if len(given) != 1:
        raise UsageError("give exactly one of IMAGE, --python FILE.py and --js FILE.js")
    body: dict = {"name": ns.name}
    if ns.python or ns.js:
        path = ns.python or ns.js
        try:
            body["python" if ns.python else "js"] = _read_file(path).decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{path}: not UTF-8 text") from None
    else:
        body["image"] = resolve_image(ctx, ns.image)
    if ns.reuse:
        body["reuse"] = True
    if ns.route:
        if not ns.route.startswith("/"):
            raise UsageError(f"--route {ns.route!r}: must start with /")
        body["route"] = ns.route
    if ns.executor:
        body["executor"] = ns.executor
    if ns.fuel is not None:
        body["fuel"] = _convert(parse_count, ns.fuel, "--fuel")
    if ns.memory is not None:
        body["memory"] = _convert(parse_size, ns.memory, "--memory")
    if ns.timeout is not None:
        body["timeout"] = _convert(parse_duration, ns.timeout, "--timeout")
    if ns.max_concurrency is not None:
        if ns.max_concurrency <= 0:
            raise UsageError("--max-concurrency must be positive")
        body["max_concurrency"] = ns.max_concurrency
    if ns.env:
        body["env"] = _parse_env(ns.env)
    fn = _deploy_with_progress(ctx, body, "python" if ns.python else "js" if ns.js else None)
    if ctx.json:
        ctx.emit(fn)
    elif isinstance(fn, dict) and fn.get("route"):
        ctx.out(f"{fn.get('name', ns.name)} {fn['route']}")
    else:
        ctx.out(ns.name)
    return 0


def _deploy_with_progress(ctx: Ctx, body: dict, runtime: str | None) -> dict:
    """The deploy; the first one of a Python or JavaScript function imports the interpreter and rewrites it for
    snapshots (minutes for CPython, once per host): that is shown on stderr while the request runs."""
    if runtime is None:
        return ctx.api.post("/v1/functions", body, answer=contract.Function)

    box: dict = {}

    def deploy() -> None:
        try:
            box["fn"] = ctx.api.post("/v1/functions", body, answer=contract.Function)
        except BaseException as e:  # handed to the main thread
            box["exc"] = e

    t = _background(deploy)
    t.join(2.0)
    shown, last_line = False, 0.0
    tty = sys.stderr.isatty()
    while t.is_alive():
        try:
            answer = ctx.api.get("/v1/images", answer=contract.ImageList)
        except ClientError:
            answer = None
        jobs = [j for j in (answer.get("importing") or []) if isinstance(j, dict)] if isinstance(answer, dict) else []
        job = next((j for j in jobs if j.get("name") == runtime), None)
        text = (f"{body['name']}: preparing the {runtime} interpreter for snapshots (once per host): "
                f"{job.get('elapsed', 0):.0f} s of about {job.get('expected_seconds', 0):.0f} s") if job else \
            f"{body['name']}: starting the handler and taking its snapshot"
        now = time.monotonic()
        if tty:
            sys.stderr.write(f"\r{text}  ")
            sys.stderr.flush()
            shown = True
        elif now - last_line >= 15:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            last_line = now
        t.join(1.0)
    if shown:
        sys.stderr.write("\n")
    if "exc" in box:
        raise box["exc"]
    return box["fn"]  # type: ignore[no-any-return]


def cmd_fn_ls(ctx: Ctx, ns) -> int:
    answer = ctx.api.get("/v1/functions", answer=contract.FunctionList)
    if ctx.json:
        ctx.emit(answer)
        return 0
    rows = []
    for fn in _items(answer, "functions"):
        image = _first(fn, "image", "digest")
        if fn.get("python") and not image:
            image = "(python)"
        rows.append([fn.get("name"), fn.get("route"), fn.get("executor"), output.short_image(image),
                     output.ago(fn.get("created"))])
    output.table(["NAME", "ROUTE", "EXECUTOR", "IMAGE", "CREATED"], rows)
    return 0


def cmd_fn_inspect(ctx: Ctx, ns) -> int:
    status, results = _each(ctx, ns.refs,
                            lambda ref: ctx.api.get(f"/v1/functions/{q(ref)}", answer=contract.Function))
    _emit_results(ctx, results, always_json=True)
    return status


def _invoke_body(data: bytes | None, method: str, path: str, headers: dict) -> dict:
    body: dict = {"method": method, "path": path, "headers": headers}
    if data is not None:
        try:
            body["body"] = data.decode("utf-8")
        except UnicodeDecodeError:
            import base64

            body["body_base64"] = base64.b64encode(data).decode("ascii")
    return body


def cmd_fn_invoke(ctx: Ctx, ns) -> int:
    data = None
    if ns.data is not None:
        if ns.data == "-":
            data = _read_file("-")
        elif ns.data.startswith("@"):
            data = _read_file(ns.data[1:])
        else:
            data = ns.data.encode()
    headers: dict[str, str] = {}
    for h in ns.header:
        k, sep, v = h.partition(":")
        if not sep or not k.strip():
            raise UsageError(f"-H {h!r}: expected 'Name: value'")
        headers[k.strip()] = v.strip()
    method = (ns.method or ("POST" if data is not None else "GET")).upper()
    path = ns.path if ns.path.startswith("/") else "/" + ns.path
    answer = ctx.api.post(f"/v1/functions/{q(ns.name)}/invoke", _invoke_body(data, method, path, headers),
                          answer=contract.InvokeResult)
    if ctx.json:
        ctx.emit(answer)
        status = answer.get("status") if isinstance(answer, dict) else None
        return 1 if isinstance(status, int) and status >= 400 else 0
    write = _binary_writer(sys.stdout)
    if isinstance(answer, dict) and ("body" in answer or "body_base64" in answer or "status" in answer):
        if answer.get("body_base64") is not None:
            import base64

            write(base64.b64decode(answer["body_base64"]))
        elif answer.get("body") is not None:
            b = answer["body"]
            write(b.encode() if isinstance(b, str) else str(b).encode())
        status = answer.get("status")
        if isinstance(status, int) and status >= 400:
            ctx.error(f"function {ns.name} answered HTTP {status}")
            return 1
        return 0
    if isinstance(answer, bytes):
        write(answer)
    elif answer is not None:
        ctx.emit(answer)
    return 0


def cmd_fn_logs(ctx: Ctx, ns) -> int:
    answer = ctx.api.get(f"/v1/functions/{q(ns.name)}/logs")
    if isinstance(answer, bytes):
        _binary_writer(sys.stdout)(answer)
    elif ctx.json:
        ctx.emit(answer)
    elif isinstance(answer, dict) and isinstance(answer.get("logs"), str):
        sys.stdout.write(answer["logs"])
    elif isinstance(answer, dict) and isinstance(answer.get("logs"), list):
        for entry in answer["logs"]:
            ctx.out(entry if isinstance(entry, str) else _log_line(entry))
    elif answer is not None:
        ctx.emit(answer)
    return 0


def _log_line(entry) -> str:
    if not isinstance(entry, dict):
        return str(entry)
    import json

    return json.dumps(entry)


def cmd_fn_rm(ctx: Ctx, ns) -> int:
    status, results = _each(ctx, ns.refs, lambda ref: ctx.api.delete(f"/v1/functions/{q(ref)}"))
    _emit_results(ctx, results)
    return status


__all__ = ["run_command", "Ctx", "LogFollower", "resolve_image", "migrate_destination", "Unreachable"]


# --- system ------------------------------------------------------------------------------------------------

def cmd_system_check(ctx: Ctx, ns) -> int:
    answer = ctx.api.post("/v1/system/check", query={"repair": "true"} if ns.repair else None,
                          answer=contract.SystemCheck)
    if ctx.json:
        ctx.emit(answer)
    else:
        checked = ", ".join(f"{n} {k}" for k, n in answer["checked"].items())
        for p in answer["problems"]:
            ctx.out(f"{p['severity']}: {p['kind']} {p['ref']}: {p['problem']} ({p['path']})")
        for r in answer["repaired"]:
            ctx.out(f"repaired: {r.get('kind') or 'vm'} {r['ref']}: {r['action']}")
        verdict = "clean" if answer["clean"] else f"{answer['errors']} damaged"
        ctx.out(f"{verdict} (checked {checked})")
    return 0 if answer["clean"] or answer["repaired"] else 1


def cmd_system_df(ctx: Ctx, ns) -> int:
    answer = ctx.api.get("/v1/system/df", answer=contract.SystemDf)
    if ctx.json:
        ctx.emit(answer)
        return 0
    rows = []
    for kind in ("images", "snapshots", "shared_chunks", "disks", "vms"):
        part = answer[kind]
        extra = part.get("reclaimable")
        if kind == "shared_chunks":
            extra = None
            note = f"saves {output.size(part.get('saved'))}"
        elif kind == "snapshots":
            note = f"{part.get('packs', 0)} packs, {part.get('chunks', 0)} chunks"
        else:
            note = ""
        rows.append([kind.replace("_", " "), part.get("count"), output.size(part.get("bytes")),
                     output.size(extra) if extra is not None else "-", note])
    rows.append(["total", "", output.size(answer["total"]), "", ""])
    output.table(["TYPE", "COUNT", "SIZE", "RECLAIMABLE", ""], rows)
    return 0


def cmd_system_prune(ctx: Ctx, ns) -> int:
    answer = ctx.api.post("/v1/system/prune", query={"dry_run": "true"} if ns.dry_run else None,
                          answer=contract.SystemPrune)
    if ctx.json:
        ctx.emit(answer)
        return 0
    verb = "would remove" if answer["dry_run"] else "removed"
    for kind in ("vms", "images", "packs"):
        for item in answer[kind]:
            ctx.out(f"{verb} {kind[:-1]} {item}")
    ctx.out(f"{'would free' if answer['dry_run'] else 'freed'} {output.size(answer['freed_bytes'])}")
    return 0
