"""The route table of the API, composed in one place from the parts the daemon has."""
from __future__ import annotations

from ..devices.blk import BlockDevice
from ..vmm.manager import Hypervisor
from . import disks, functions, server, snapshots, system
from .server import Route


def api_routes(hv: Hypervisor) -> list[Route]:
    """Every route this daemon serves: the core, snapshots, functions, and the disks when the block device is in."""
    table = server.ROUTES + snapshots.ROUTES + functions.ROUTES + system.ROUTES
    if hv.devices.get(BlockDevice) is not None:
        table = table + disks.ROUTES
    return table
