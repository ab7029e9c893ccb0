"""Typed decoding of request bodies; every wrong field gets a 400 that names it."""
from __future__ import annotations

import ipaddress
from typing import Any

from ..devices.ratelimit import LimiterConfig, RateLimitError
from ..errors import BadRequest
from .vm import DirSpec, DiskSpec, PublishSpec, VmSpec


def _type(d: dict[str, Any], key: str, typ: type | tuple[type, ...], default: Any = None, *,
          nullable: bool = True) -> Any:
    v = d.get(key, default)
    if v is None and nullable:
        return None
    if isinstance(v, bool) and typ in (int, (int, float)):
        raise BadRequest(f"field {key!r} must be a number, not a boolean", code="invalid_field")
    if not isinstance(v, typ):
        name = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise BadRequest(f"field {key!r} must be {name}, got {type(v).__name__}", code="invalid_field")
    return v


def _rate_limiter(d: Any) -> dict[str, Any] | None:
    try:
        return LimiterConfig.from_dict(d).to_api()
    except RateLimitError as exc:
        raise BadRequest(str(exc), code="invalid_field") from None


VM_FIELDS = {"image", "name", "args", "env", "fuel", "memory", "timeout", "dirs", "disks", "publish",
             "allow_egress", "auto_remove", "ephemeral", "start", "net_rate_limiter"}


def vm_spec(d: dict[str, Any]) -> tuple[VmSpec, bool]:
    unknown = set(d) - VM_FIELDS
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}", code="invalid_field")
    image = _type(d, "image", str, nullable=False) if "image" in d else None
    if not image:
        raise BadRequest("field 'image' is required (an image name, digest or sha256: reference)",
                         code="invalid_field")
    args = _type(d, "args", list, [])
    if not all(isinstance(a, str) for a in args):
        raise BadRequest("field 'args' must be a list of strings", code="invalid_field")
    env = _type(d, "env", dict, {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise BadRequest("field 'env' must map strings to strings", code="invalid_field")
    dirs = []
    for x in _type(d, "dirs", list, []) or []:
        if not isinstance(x, dict) or not isinstance(x.get("host"), str):
            raise BadRequest("each entry of 'dirs' needs a string 'host'", code="invalid_field")
        dirs.append(DirSpec(host=x["host"], guest=str(x.get("guest") or x["host"]), readonly=bool(x.get("readonly"))))
    disks = []
    for x in _type(d, "disks", list, []) or []:
        if not isinstance(x, dict) or not isinstance(x.get("name"), str):
            raise BadRequest("each entry of 'disks' needs a string 'name'", code="invalid_field")
        mode = x.get("mode", "rw")
        if mode not in ("rw", "ro", "cow"):
            raise BadRequest(f"disk mode must be rw, ro or cow, got {mode!r}", code="invalid_field")
        disks.append(DiskSpec(name=x["name"], mode=mode, rate_limiter=_rate_limiter(x.get("rate_limiter"))))
    publish = []
    for x in _type(d, "publish", list, []) or []:
        if not isinstance(x, dict):
            raise BadRequest("each entry of 'publish' must be an object", code="invalid_field")
        gp, hp = x.get("guest_port"), x.get("host_port", 0)
        ip = x.get("host_ip") or "127.0.0.1"
        if not (isinstance(gp, int) and 0 < gp < 65536 and isinstance(hp, int) and 0 <= hp < 65536):
            raise BadRequest("publish ports must be integers: guest 1-65535, host 0-65535", code="invalid_field")
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise BadRequest(f"publish host_ip {ip!r} is not an IP address", code="invalid_field") from None
        publish.append(PublishSpec(guest_port=gp, host_port=hp, host_ip=ip))
    egress = _type(d, "allow_egress", list, []) or []
    if not all(isinstance(e, str) for e in egress):
        raise BadRequest("field 'allow_egress' must be a list of strings", code="invalid_field")
    spec = VmSpec(
        image=image, name=_type(d, "name", str), args=args, env=env,
        fuel=_type(d, "fuel", int), memory=_type(d, "memory", int), timeout=_type(d, "timeout", (int, float)),
        dirs=dirs, disks=disks, publish=publish, allow_egress=egress,
        auto_remove=bool(_type(d, "auto_remove", bool, False)),
        ephemeral=bool(_type(d, "ephemeral", bool, False)),
        net_rate_limiter=_rate_limiter(d.get("net_rate_limiter")),
    )
    return spec, bool(_type(d, "start", bool, False))
