"""A feeder (POST /v1/vms/{ref}/stdin) whose guest leaves the input buffer full waits for the guest to read,
woken by the read itself (no polling), or by the input's end."""
from __future__ import annotations

import asyncio
import threading

from microvmd.devices.wasip1 import STDIN_LIMIT, StdinBuffer


async def test_a_full_buffer_wakes_its_feeder_when_the_guest_reads() -> None:
    buf = StdinBuffer(open=True)
    assert buf.feed(b"x" * (STDIN_LIMIT + 10)) == STDIN_LIMIT
    room = buf.room()
    await asyncio.sleep(0)
    assert not room.done()  # full: nothing to do until the guest reads
    reader = threading.Thread(target=buf.take, args=(4096,))  # the guest reads on its vCPU worker
    reader.start()
    await asyncio.wait_for(room, 30)
    reader.join()
    assert buf.feed(b"y" * 10_000) == 4096


async def test_closing_the_input_wakes_its_feeder() -> None:
    buf = StdinBuffer(open=True)
    buf.feed(b"x" * STDIN_LIMIT)
    room = buf.room()
    buf.close()  # (the VM ended: its devices close)
    await asyncio.wait_for(room, 30)
    assert buf.room().done()
