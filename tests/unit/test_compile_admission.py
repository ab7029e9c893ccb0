"""The compile pool's admission (images/compiler.Compiler.slot): ``compile_jobs + compile_queue`` places
for the whole daemon, at most half of them for one client; the daemon's own imports wait instead."""
from __future__ import annotations

import asyncio

import pytest
import wasmtime

from microvmd.images.compiler import CompileBusy, CompileLimits, Compiler


def test_places_for_the_daemon_and_a_share_per_client() -> None:
    async def main() -> None:
        comp = Compiler(None, wasmtime.Engine(), CompileLimits(jobs=1, queue=3))  # type: ignore[arg-type]
        assert comp.places == 4 and comp.share == 2
        release = asyncio.Event()
        held: list[str] = []

        async def hold(client: str | None, wait: bool = False) -> None:
            async with comp.slot(wait, client):
                held.append(str(client))
                await release.wait()

        tasks = [asyncio.create_task(hold("a")) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(CompileBusy, match="this client"):
            async with comp.slot(False, "a"):
                pass
        tasks += [asyncio.create_task(hold("b")) for _ in range(2)]
        await asyncio.sleep(0)
        assert comp.admitted == 4 and comp.by_client == {"a": 2, "b": 2}
        with pytest.raises(CompileBusy, match="imports are being compiled"):
            async with comp.slot(False, "c"):  # a new client, but every place is taken
                pass
        tasks.append(asyncio.create_task(hold(None, wait=True)))  # the daemon's own import waits its turn
        await asyncio.sleep(0)
        assert len(held) == 4 and comp.refused == 2
        release.set()
        await asyncio.gather(*tasks)
        assert len(held) == 5 and comp.admitted == 0 and comp.by_client == {}
        comp.close()

    asyncio.run(main())
