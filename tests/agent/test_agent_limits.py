"""KeyedGate: at most N at a time per key, first come first served, and a waiter that gives up leaves no trace."""

from __future__ import annotations

import asyncio

from tessera.agent.limits import KeyedGate


def test_per_key_limit_fifo_and_other_keys_unaffected() -> None:
    async def main() -> None:
        gate = KeyedGate(2)
        order: list[str] = []
        release = {name: asyncio.Event() for name in ("a1", "a2", "a3", "a4", "b1")}

        async def work(key: str, name: str) -> None:
            async with gate.slot(key):
                order.append(name)
                await release[name].wait()

        tasks = {name: asyncio.create_task(work(name[0], name)) for name in ("a1", "a2", "a3", "a4")}
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert order == ["a1", "a2"] and gate.active("a") == 2
        tasks["b1"] = asyncio.create_task(work("b", "b1"))
        await asyncio.sleep(0)
        assert order == ["a1", "a2", "b1"]  # another key is not queued behind "a"
        release["a2"].set()
        await tasks["a2"]
        await asyncio.sleep(0)
        assert order == ["a1", "a2", "b1", "a3"] and gate.active("a") == 2  # handed over in arrival order
        for name in ("a1", "a3", "a4", "b1"):
            release[name].set()
        await asyncio.gather(*tasks.values())
        assert gate.active("a") == 0 and gate.active("b") == 0 and not gate._waiting

    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_cancelled_waiter_frees_its_place() -> None:
    async def main() -> None:
        gate = KeyedGate(1)
        hold = asyncio.Event()
        entered: list[str] = []

        async def work(name: str) -> None:
            async with gate.slot("k"):
                entered.append(name)
                await hold.wait()

        first = asyncio.create_task(work("first"))
        await asyncio.sleep(0)
        waiting = asyncio.create_task(work("cancelled"))
        third = asyncio.create_task(work("third"))
        await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.sleep(0)
        hold.set()
        await asyncio.gather(first, third, waiting, return_exceptions=True)
        assert entered == ["first", "third"]
        assert gate.active("k") == 0 and not gate._waiting

    asyncio.run(asyncio.wait_for(main(), 10))


def test_cancelled_just_as_the_slot_was_handed_over() -> None:
    async def main() -> None:
        gate = KeyedGate(1)
        hold = asyncio.Event()

        async def work() -> None:
            async with gate.slot("k"):
                await hold.wait()

        first = asyncio.create_task(work())
        await asyncio.sleep(0)
        second = asyncio.create_task(work())
        await asyncio.sleep(0)
        hold.set()
        await first  # hands its slot to `second`, which is cancelled before it runs
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        assert gate.active("k") == 0
        async with gate.slot("k"):
            assert gate.active("k") == 1

    asyncio.run(asyncio.wait_for(main(), 10))
