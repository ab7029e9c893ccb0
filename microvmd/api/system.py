"""``/v1/system`` routes: check (and repair) the state directory, its space, and pruning (thin: decode,
call the controller, encode)."""
from __future__ import annotations

from aiohttp import web

from .. import contract
from ..control import actions as a
from . import codec
from .server import Route, _bool, apply


async def system_check(request: web.Request) -> web.StreamResponse:
    act = a.CheckSystem(repair=_bool(request, "repair"))
    return codec.reply(request, contract.SystemCheck, await apply(request, act))


async def system_df(request: web.Request) -> web.StreamResponse:
    return codec.reply(request, contract.SystemDf, await apply(request, a.SpaceUsage()))


async def system_prune(request: web.Request) -> web.StreamResponse:
    act = a.Prune(dry_run=_bool(request, "dry_run"))
    return codec.reply(request, contract.SystemPrune, await apply(request, act))


ROUTES: list[Route] = [
    Route("POST", "/v1/system/check", system_check,
          "Check images, snapshots (manifests, packs, chunks), disks and VM records; query: repair=true moves "
          "what is damaged aside", response=contract.SystemCheck, tag="system"),
    Route("GET", "/v1/system/df", system_df, "Space used by images, snapshots, shared chunks, disks and VMs",
          response=contract.SystemDf, tag="system"),
    Route("POST", "/v1/system/prune", system_prune,
          "Remove ended VMs, unused images and unreferenced packs; query: dry_run=true only lists them",
          response=contract.SystemPrune, tag="system"),
]
