"""The programs that run a Python or JavaScript handler inside the interpreter's guest.

Each is passed to the interpreter on its command line with the handler's source as the next argument. It
defines the handler, then reads the request on standard input: that first read is where the function's
snapshot is taken at deploy (docs/functions.md). A request is one line of JSON on stdin; the driver answers
with one line on stdout, the response as JSON after ``MARK``, and reads the next line. A fresh instance gets
one request then end of file, and ends at once (``os._exit``, ``std.exit``: the interpreter's own shutdown,
which tears down every module, was most of a fresh Python instance's time, and its state is thrown away);
a warm one (``--reuse``) is given request after request. The
handler's own prints go to stderr (the function's log), so they cannot forge a response.
"""
from __future__ import annotations

MARK = "\x1emicrovmd-response:"

PYTHON = r'''
import base64, json, os, sys, traceback
def _load():
    mod = type(sys)("handler")
    mod.__file__ = "handler.py"
    sys.modules["handler"] = mod
    exec(compile(sys.argv[1], "handler.py", "exec"), mod.__dict__)
    h = getattr(mod, "handle", None)
    if not callable(h):
        sys.stderr.write("handler.py defines no handle(request) function\n")
        raise SystemExit(3)
    return h
_handle = _load()
del sys.argv[1:]
_out = sys.stdout
def _serve(raw):
    req = json.loads(raw)
    req["body_bytes"] = base64.b64decode(req.pop("body_base64", ""))
    sys.stdout = sys.stderr  # the handler's prints go to the log
    try:
        res = _handle(req)
        headers = {}
        if isinstance(res, (str, bytes, bytearray)):
            res = {"body": res}
            headers["Content-Type"] = "text/plain; charset=utf-8"
        if not isinstance(res, dict):
            raise TypeError("handle() must return a dict or a str, not %s" % type(res).__name__)
        headers.update({str(k): [str(x) for x in v] if isinstance(v, (list, tuple)) else str(v)
                        for k, v in (res.get("headers") or {}).items()})
        body = res.get("body", b"")
        if body is None:
            body = b""
        elif isinstance(body, str):
            body = body.encode()
        elif not isinstance(body, (bytes, bytearray)):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        out = {"status": int(res.get("status", 200)), "headers": headers,
               "body_base64": base64.b64encode(bytes(body)).decode()}
    except BaseException as exc:
        traceback.print_exc()
        out = {"error": "%s: %s" % (type(exc).__name__, exc)}
    finally:
        sys.stdout = _out
    _out.write("\x1emicrovmd-response:" + json.dumps(out) + "\n")
    _out.flush()
while True:
    _raw = sys.stdin.buffer.readline()  # <- deploy snapshots the function here, at the first one
    if not _raw:
        # the end of the input ends the instance: at once, without the interpreter's shutdown (collecting
        # and tearing down every module took most of a fresh instance's time; its state is thrown away)
        sys.stderr.flush()
        os._exit(0)
    _serve(_raw)
'''

JS = r'''
std.evalScript(scriptArgs[0]);
if (typeof handle !== "function") {
  std.err.puts("the handler defines no handle(request) function\n");
  std.exit(3);
}
scriptArgs.length = 0;
const _log = (...a) => { std.err.puts(a.map(String).join(" ") + "\n"); };
globalThis.print = _log;
globalThis.console = { log: _log, info: _log, warn: _log, error: _log, debug: _log };
function _serve(raw) {
  let res;
  try {
    const req = JSON.parse(raw);
    let r = handle(req);
    let headers = {};
    if (typeof r === "string") { r = { body: r }; headers["Content-Type"] = "text/plain; charset=utf-8"; }
    if (r === null || typeof r !== "object") throw new TypeError("handle() must return an object or a string");
    for (const k in (r.headers || {})) {
      const v = r.headers[k];
      headers[String(k)] = Array.isArray(v) ? v.map(String) : String(v);
    }
    let body = r.body;
    if (body === undefined || body === null) body = "";
    else if (typeof body !== "string") {
      body = JSON.stringify(body);
      if (!("Content-Type" in headers)) headers["Content-Type"] = "application/json";
    }
    res = { status: r.status === undefined ? 200 : Number(r.status), headers: headers, body: body };
  } catch (e) {
    std.err.puts(String(e) + "\n" + ((e && e.stack) || "") + "\n");
    res = { error: String(e) };
  }
  std.out.puts("\x1emicrovmd-response:" + JSON.stringify(res) + "\n");
  std.out.flush();
}
for (;;) {
  const line = std.in.getline();  // <- deploy snapshots the function here, at the first one
  if (line === null) std.exit(0);  // the end of the input ends the instance, without freeing the runtime
  _serve(line);
}
'''


def command(runtime: str, source: str) -> list[str]:
    """The guest's arguments (after argv[0]) for a handler's ``source`` (runtime ``python`` or ``js``)."""
    if runtime == "python":
        return ["-c", PYTHON, source]
    return ["--std", "-e", JS, "--", source]
