# A Python function (microvm fn deploy counter --python images/functions/counter.py).
# handle(request) gets a dict: method, path, query (the raw query string), headers (lower-case names), body
# (str) and body_bytes (bytes). It returns a dict with status, headers and body (str, bytes, or anything
# JSON can encode), or a plain str. Module state is set once, at deploy: every request starts from a fresh
# copy of it, so `count` is 1 in every answer (deploy with --reuse to share warm instances instead).
import json
from urllib.parse import parse_qs

count = 0


def handle(request):
    global count
    count += 1
    q = parse_qs(request["query"])
    if "fail" in q:
        raise RuntimeError("asked to fail")  # -> 502, the traceback in `microvm fn logs counter`
    name = q.get("name", ["world"])[0]
    return {"status": 200, "headers": {"Content-Type": "application/json"},
            "body": json.dumps({"hello": name, "count": count, "method": request["method"],
                                "path": request["path"], "bytes": len(request["body_bytes"])})}
