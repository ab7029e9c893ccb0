"""Helpers for the client tests: a scripted fake microvmd on a Unix socket, and a `microvm` runner.

(A uniquely named module rather than conftest.py, so `from clifake import ...` cannot pick up another
directory's conftest; conftest.py re-exports the fixtures.)

The fake speaks just enough of docs/api.md for the client's flows. A VM's guest "program" is its
args: "out:TEXT" / "err:TEXT" write a line to stdout / stderr, "sleep:SECONDS" pauses,
"exit:N" exits with code N, "reason:R" stops it by the host with reason R ("out_of_fuel" leaves it
suspended until fuel is added), "hang" runs until it is killed.
Integration tests against the real daemon can reuse `run_cli` with its socket.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from microvmd import contract

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ApiFail(Exception):
    def __init__(self, status, code, message):
        self.status, self.code, self.message = status, code, message


class FakeVM:
    def __init__(self, daemon, spec, image):
        self.daemon = daemon
        self.id = uuid.uuid4().hex + uuid.uuid4().hex[:32]
        self.spec = spec
        self.image = image
        self.state = "created"
        self.exit = None
        self.created = time.time()
        self.started = None
        self.logs: list[tuple[str, bytes]] = []
        self.fuel_event = threading.Event()
        self.killed = threading.Event()

    def obj(self):
        spec = {k: v for k, v in self.spec.items() if k != "start"}
        spec = contract.to_builtins(contract.convert(spec, contract.VmSpec))
        return {
            "id": self.id, "name": self.spec.get("name") or self.id[:12], "image": self.spec["image"],
            "digest": self.image["digest"], "state": self.state, "blocked_in": None,
            "args": self.spec.get("args", []), "env": self.spec.get("env", {}),
            "limits": {"fuel": self.spec.get("fuel"), "memory": self.spec.get("memory") or 1 << 28,
                       "timeout": self.spec.get("timeout")},
            "fuel_consumed": 1234, "fuel_remaining": None, "memory_bytes": 65536, "peak_memory": 65536,
            "created": self.created, "started": self.started, "finished": None, "exit": self.exit,
            "devices": {}, "snapshot_kind": "stopped_only", "spec": spec,
        }

    def start(self):
        self.state = "running"
        self.started = time.time()
        threading.Thread(target=self._run, daemon=True).start()

    def _emit(self, stream, text):
        with self.daemon.cond:
            self.logs.append((stream, (text + "\n").encode()))
            self.daemon.cond.notify_all()

    def _finish(self, code, reason):
        with self.daemon.cond:
            self.state = "exited"
            self.exit = {"code": code, "reason": reason, "fuel_consumed": 1234, "peak_memory": 65536,
                         "wall_time_s": 0.01}
            self.daemon.cond.notify_all()
            if self.spec.get("auto_remove") or self.spec.get("ephemeral"):
                self.daemon.vms.pop(self.id, None)

    def _run(self):
        for step in self.spec.get("args", []):
            kind, _, value = step.partition(":")
            if self.killed.is_set():
                return
            if kind == "out":
                self._emit("stdout", value)
            elif kind == "err":
                self._emit("stderr", value)
            elif kind == "sleep":
                if self.killed.wait(float(value)):
                    return
            elif kind == "exit":
                return self._finish(int(value), "exit")
            elif kind == "reason" and value == "out_of_fuel":
                with self.daemon.cond:
                    self.state = "out_of_fuel"
                    self.daemon.cond.notify_all()
                self.fuel_event.wait()
                if self.killed.is_set():
                    return
                with self.daemon.cond:
                    self.state = "running"
            elif kind == "reason":
                return self._finish(None, value)
            elif kind == "hang":
                self.killed.wait()
                return
        self._finish(0, "exit")

    def kill(self):
        self.killed.set()
        self.fuel_event.set()
        self._finish(None, "killed")


class FakeDaemon:
    def __init__(self, socket_path):
        self.socket_path = socket_path
        self.requests: list[dict] = []
        self.images: dict[str, dict] = {}
        self.vms: dict[str, FakeVM] = {}
        self.snapshots: dict[str, dict] = {}
        self.cond = threading.Condition()
        self.export_blob = os.urandom(300_000)

    # -- helpers -------------------------------------------------------------------------------------
    def find_image(self, ref):
        for img in self.images.values():
            if ref in (img["name"], img["digest"]) or (len(ref) >= 12 and img["digest"][7:].startswith(ref)):
                return img
        raise ApiFail(404, "image_not_found", f"no such image: {ref}")

    def find_vm(self, ref):
        for vm in self.vms.values():
            if ref in (vm.id, vm.spec.get("name")) or vm.id.startswith(ref):
                return vm
        raise ApiFail(404, "vm_not_found", f"no such VM: {ref}")

    def add_image(self, data, name=None):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        img = {"digest": digest, "size": len(data), "created": time.time(), "names": [name] if name else [],
               "entry": "_start", "boot": [], "args": [], "env": {}, "limits": {}, "kind": "wasi",
               "asyncify": False, "imports": [], "exports": [], "mutable_globals": {}, "asyncify_globals": None,
               "source_format": "wasm", "name": name or digest}
        self.images[img["name"]] = img
        return img


def _request_type(method, parts):
    """The contract's type for a JSON request body (the client's answers are checked by the client itself,
    which decodes every answer through the contract's response types)."""
    tail = parts[3] if len(parts) == 4 else None
    if parts[:2] == ["v1", "vms"]:
        if method == "POST" and len(parts) == 2:
            return contract.VmCreate
        return {"fuel": contract.FuelAdd, "snapshots": contract.SnapshotCreate, "migrate": contract.Migrate}.get(tail)
    if parts[:2] == ["v1", "snapshots"] and tail == "restore":
        return contract.Restore
    if parts == ["v1", "disks"] and method == "POST":
        return contract.DiskCreate
    if parts[:2] == ["v1", "images"] and method == "PATCH":
        return contract.ImagePatch
    return None


def _snapshot(name, vm_id):
    return {"name": name, "created": time.time(), "kind": "created", "parent": None,
            "vm": {"id": vm_id, "name": None, "image": None, "digest": "sha256:" + "0" * 64, "state": "created"},
            "memory_bytes": 65536, "chunks": 1, "disks": [], "stats": {"frozen_ms": 0.1},
            "wasmtime": "50.0.1", "engine": "fake"}


def _disk(name, size):
    return {"name": name, "size": size, "allocated": 0, "created": time.time(), "used_by": [], "attachments": []}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    daemon: FakeDaemon

    def log_message(self, *a):
        pass

    def address_string(self):
        return "unix"

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding") == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(n) if n else b""

    def _send(self, status, obj=None, ctype="application/json", raw=None):
        data = raw if raw is not None else (b"" if obj is None else json.dumps(obj).encode())
        self.send_response(status)
        if data or status != 204:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method):
        d = self.daemon
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = self._body()
        rec = {"method": method, "path": url.path, "query": query, "headers": dict(self.headers), "body": body}
        d.requests.append(rec)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        try:
            if body and "json" in (self.headers.get("Content-Type") or ""):
                rec["json"] = json.loads(body)
                typ = _request_type(method, parts)
                if typ is not None:  # the client must send what the real daemon accepts
                    try:
                        contract.decode(body, typ)
                    except contract.ContractError as exc:
                        raise ApiFail(400, exc.code, exc.message) from None
            return self._route(method, parts, query, body, rec.get("json"))
        except ApiFail as e:
            self._send(e.status, {"error": {"code": e.code, "message": e.message}})

    def _route(self, method, parts, query, body, js):
        d = self.daemon
        if parts == ["v1", "info"]:
            return self._send(200, {"version": "9.9.9", "wasmtime_version": "50.0.1", "api_version": "v1",
                                    "state_dir": "/x", "socket": d.socket_path, "vms": {"running": 1},
                                    "images": len(d.images), "uptime_s": 12.5,
                                    "engine": {"fingerprint": "fake", "workers": 2, "epoch_interval_s": 0.01},
                                    "event_loop": {"max_lag_ms": 0.5, "stalls": 0, "threshold_ms": 100.0},
                                    "limits": {"memory": 1 << 28, "max_memory": 1 << 32, "fuel": None,
                                               "timeout": None, "upload": 1 << 28},
                                    "snapshots": {"dirty_tracking": "off"},
                                    "console": {"mode": "auto", "file_descriptors": 0}})
        if parts[:2] == ["v1", "images"]:
            if method == "POST" and len(parts) == 2:
                return self._send(201, d.add_image(body, query.get("name")))
            if method == "GET" and len(parts) == 2:
                return self._send(200, {"images": list(d.images.values())})
            img = d.find_image(parts[2])
            if method == "GET":
                return self._send(200, img)
            if method == "DELETE":
                d.images.pop(img["name"])
                return self._send(204)
        if parts[:2] == ["v1", "vms"]:
            if method == "POST" and len(parts) == 2:
                img = d.find_image(js["image"])
                vm = FakeVM(d, js, img)
                d.vms[vm.id] = vm
                if js.get("start"):
                    vm.start()
                return self._send(201, vm.obj())
            if method == "GET" and len(parts) == 2:
                vms = [v.obj() for v in d.vms.values() if query.get("all") == "true" or v.state != "exited"]
                return self._send(200, {"vms": vms})
            vm = d.find_vm(parts[2])
            if len(parts) == 3:
                if method == "GET":
                    return self._send(200, vm.obj())
                if method == "DELETE":
                    if vm.state in ("running", "paused", "out_of_fuel") and query.get("force") != "true":
                        raise ApiFail(409, "vm_running", f"VM {vm.id} is running")
                    if vm.state != "exited":
                        vm.kill()
                    d.vms.pop(vm.id, None)
                    return self._send(204)
            action = parts[3]
            if action == "start":
                if vm.state != "created":
                    raise ApiFail(409, "invalid_state", f"cannot start a VM in state {vm.state}")
                vm.start()
                if query.get("wait") == "true":  # answers once the VM has ended, as create with wait=true
                    with d.cond:
                        while vm.state not in ("exited", "out_of_fuel"):
                            d.cond.wait(0.05)
                return self._send(200, vm.obj())
            if action == "kill":
                if vm.state == "exited":
                    raise ApiFail(409, "invalid_state", "VM has exited")
                vm.kill()
                return self._send(200, vm.obj())
            if action in ("stop", "pause", "resume"):
                return self._send(200, vm.obj())
            if action == "fuel":
                vm.fuel_event.set()
                return self._send(200, {**vm.obj(), "fuel_remaining": js["amount"]})
            if action == "wait":
                deadline = time.time() + float(query.get("timeout", 60))
                with d.cond:
                    while vm.state not in ("exited", "out_of_fuel") and time.time() < deadline:
                        d.cond.wait(0.05)
                if vm.state == "out_of_fuel":
                    return self._send(200, {"state": "out_of_fuel", "code": None, "reason": "out_of_fuel",
                                            "fuel_consumed": 1234, "peak_memory": 65536, "wall_time_s": None})
                return self._send(200, {"state": vm.state, **vm.exit})
            if action == "logs":
                return self._logs(vm, query)
            if action == "snapshots" and method == "POST":
                name = (js or {}).get("name") or f"{vm.id[:12]}-snap"
                snap = _snapshot(name, vm.id)
                d.snapshots[name] = snap
                return self._send(201, snap)
            if action == "migrate":
                return self._send(200, {"vm": vm.obj(), "to": js["to"], "snapshot": "m", "stats": {
                    "total_ms": 1.0, "chunks_sent": 1, "chunks_total": 1, "capture_ms": 0.1, "downtime_ms": 1.0,
                    "prepare_ms": 0.1, "transfer_ms": 0.1, "restore_ms": 0.1}})
        if parts[:2] == ["v1", "snapshots"]:
            if len(parts) == 2:
                return self._send(200, {"snapshots": list(d.snapshots.values())})
            if parts[2] == "import":
                snap = _snapshot(f"imported-{len(body)}", "0" * 32)
                d.snapshots[snap["name"]] = snap
                return self._send(201, snap)
            snap = d.snapshots.get(parts[2])
            if snap is None:
                raise ApiFail(404, "snapshot_not_found", f"no such snapshot: {parts[2]}")
            if len(parts) == 4 and parts[3] == "export":
                return self._send(200, raw=d.export_blob, ctype="application/octet-stream")
            if len(parts) == 4 and parts[3] == "restore":
                img = next(iter(d.images.values()))
                vm = FakeVM(d, {"image": img["name"], "name": js.get("name"), "args": []}, img)
                d.vms[vm.id] = vm
                return self._send(201, vm.obj())
            if method == "DELETE":
                d.snapshots.pop(parts[2])
                return self._send(204)
            return self._send(200, snap)
        if parts[:2] == ["v1", "disks"]:
            if method == "POST":
                return self._send(201, _disk(js["name"], js["size"]))
            if method == "PUT":
                return self._send(200, _disk(parts[2], len(body)))
            if method == "GET":
                return self._send(200, {"disks": [_disk("d1", 1 << 20)]})
            return self._send(204)
        # functions are tested against the real daemon (tests/integration/test_it_functions.py)
        raise ApiFail(404, "not_found", f"no route {method} /{'/'.join(parts)}")

    def _logs(self, vm, query):
        want = query.get("stream", "all")
        follow = query.get("follow") == "true"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        d = self.daemon
        while True:
            with d.cond:
                while follow and sent == len(vm.logs) and vm.state != "exited":
                    d.cond.wait(0.05)
                chunk = vm.logs[sent:]
                sent = len(vm.logs)
                done = vm.state == "exited" or not follow
            for stream, data in chunk:
                if want in ("all", stream):
                    try:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
                    except OSError:
                        return
            if done and sent == len(vm.logs):
                break
        try:
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_DELETE(self):
        self._handle("DELETE")

    def do_PUT(self):
        self._handle("PUT")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False


@pytest.fixture
def fake_daemon():
    tmp = tempfile.mkdtemp(prefix="mvc-")
    path = os.path.join(tmp, "api.sock")
    daemon = FakeDaemon(path)
    handler = type("BoundHandler", (Handler,), {"daemon": daemon})
    server = _Server(path, handler)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield daemon
    finally:
        for vm in list(daemon.vms.values()):
            vm.killed.set()
            vm.fuel_event.set()
        server.shutdown()
        server.server_close()
        shutil.rmtree(tmp, ignore_errors=True)


def run_cli(*args, socket=None, input=None, env=None, timeout=30, merge_stderr=False, cwd=None):
    """Run `python -m microvmd.cli.main ARGS` (with --socket when given) and return CompletedProcess."""
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("MICROVM_SOCKET", None)
    if env:
        e.update(env)
    argv = [sys.executable, "-m", "microvmd.cli.main"]
    if socket:
        argv += ["--socket", socket]
    return subprocess.run(
        argv + list(args),
        input=input,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        env=e,
        timeout=timeout,
        cwd=cwd or REPO,
    )


@pytest.fixture
def cli(fake_daemon):
    def run(*args, **kw):
        return run_cli(*args, socket=fake_daemon.socket_path, **kw)

    return run
