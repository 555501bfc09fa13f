"""asyncio helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
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
