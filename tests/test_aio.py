from __future__ import annotations

import asyncio

import pytest

from gateway.aio import cancel_and_wait, wait_within


async def test_a_wait_ends_with_what_it_waits_for_or_its_timeout() -> None:
    event = asyncio.Event()
    assert not await wait_within(event.wait(), 0.01)
    event.set()
    assert await wait_within(event.wait(), 10)
    assert not await wait_within(asyncio.Event().wait(), -1)  # a deadline already past


async def test_a_cancel_that_arrives_as_the_wait_ends_is_not_swallowed() -> None:
    """asyncio.wait_for (Python 3.11) returns normally here: a task's loop then runs on."""
    event = asyncio.Event()
    task = asyncio.create_task(wait_within(event.wait(), 10))
    for _ in range(3):
        await asyncio.sleep(0)  # the task waits
    event.set()  # the shutdown sets the event and cancels the task at once
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancel_and_wait_asks_again_when_a_task_swallows_the_cancel() -> None:
    """A loop whose await swallows one cancel (as redis-py may) ends all the same."""
    swallowed = 0

    async def loop() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # turned into a failed call; the loop goes on

    async def fails() -> None:
        raise RuntimeError("retrieved, not reported")

    looping, failing = asyncio.create_task(loop()), asyncio.create_task(fails())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait([looping, None, failing], every_s=0.01), 5)
    assert swallowed == 1
    assert looping.cancelled()
    assert isinstance(failing.exception(), RuntimeError)
