from __future__ import annotations

import asyncio

import pytest

from gateway.aio import wait_within


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
