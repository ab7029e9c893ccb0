"""A guest listener has no host descriptor behind it: it counts against its VM's open_files, not against the
daemon's descriptor budget (10,000 echo VMs listening must not spend a budget that protects the API)."""
from __future__ import annotations

import pytest

from microvmd.devices.files import DescriptorBudget, OpenFiles
from microvmd.devices.wasi import GuestError


def test_guest_only_sockets_count_against_the_vm_not_the_daemon() -> None:
    budget = DescriptorBudget(total=1)
    files = OpenFiles(budget, limit=3)
    for _ in range(2):
        files.take(host=False)
        files.socket_opened(host=False)
    assert budget.used == 0 and files.count() == 2
    files.take()  # a real connection: the daemon's budget
    files.socket_opened()
    assert budget.used == 1
    with pytest.raises(GuestError):
        files.take(host=False)  # the VM's own limit still holds
    files.socket_closed(host=False)
    assert budget.used == 1 and files.count() == 2
    files.close()
    assert budget.used == 0
