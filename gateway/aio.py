"""asyncio helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Any


async def wait_within(aw: Awaitable[Any], timeout: float) -> bool:
    """Await ``aw`` for at most ``timeout`` seconds; False when the time ran out.

    For the loops of background tasks, in place of ``asyncio.wait_for``: on Python
    3.11 that returns normally when a cancel arrives just as what it waits for ends
    (an event set by the same shutdown), so a loop that expects the cancel runs on
    and its ``stop()`` waits for ever. Here the cancel always propagates.
    """
    try:
        async with asyncio.timeout(max(0.0, timeout)):
            await aw
    except TimeoutError:
        return False
    return True


async def cancel_and_wait(
    tasks: Iterable[asyncio.Future[Any] | None], every_s: float = 0.1
) -> None:
    """Cancel ``tasks`` (None ones are skipped) and wait until every one is done.

    The cancel is asked again every ``every_s`` seconds: a library may swallow one
    (redis-py, when it lands on a reply already read), and the task then goes on with
    its loop; a single cancel would leave the caller waiting for ever. What the tasks
    raised is retrieved, not reported as never retrieved.
    """
    every = {t for t in tasks if t is not None}
    pending = every
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=every_s)
    await asyncio.gather(*every, return_exceptions=True)
