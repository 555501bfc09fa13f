"""Recently sent request ids: a bounded LRU with an age limit, and the group's in Redis."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from gateway.aio import cancel_and_wait

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import redis.asyncio as aioredis


class RecentIds:
    """Remembers up to ``size`` ids for at most ``ttl_s`` seconds each."""

    __slots__ = ("_clock", "_ids", "_size", "_ttl", "on_add")

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float]) -> None:
        self._ids: OrderedDict[str, float] = OrderedDict()
        self._size = size
        self._ttl = ttl_s
        self._clock = clock
        self.on_add: Callable[[str], None] | None = None  # e.g. the group's ids in Redis

    def __contains__(self, request_id: str) -> bool:
        at = self._ids.get(request_id)
        if at is None:
            return False
        if self._clock() - at > self._ttl:
            del self._ids[request_id]
            return False
        return True

    def add(self, request_id: str, *, mirror: bool = True) -> None:
        if mirror and self.on_add is not None:
            self.on_add(request_id)
        ids = self._ids
        ids[request_id] = self._clock()
        ids.move_to_end(request_id)
        while len(ids) > self._size:
            ids.popitem(last=False)

    def __len__(self) -> int:
        return len(self._ids)


class GroupSentIds:
    """Request ids sent by any replica of the group, in Redis (when it is configured).

    A replica that takes over a partition re-reads what was finished beyond the
    committed offset; the commit metadata says which records those are, where the
    broker keeps it. Where it does not, the new owner asks here, for the records it
    reads first after an assignment. Writes are batched off the send path; a
    failed write or read costs at most a duplicate, never a loss.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        ttl_s: float,
        prefix: str = "sinch-gateway:sent:",
        flush_s: float = 0.2,
    ) -> None:
        self._redis = redis
        self._ttl = max(1, int(ttl_s))
        self._prefix = prefix
        self._flush_s = flush_s
        self._pending: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self.failures = 0

    def remember(self, request_id: str) -> None:
        self._pending.append(request_id)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush_soon(), name="group-sent-ids")

    async def _flush_soon(self) -> None:
        await asyncio.sleep(self._flush_s)
        await self.flush()

    async def flush(self) -> None:
        ids, self._pending = self._pending, []
        if not ids:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for rid in ids:
                    pipe.set(self._prefix + rid, b"1", ex=self._ttl)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed("remember sent request ids", exc)

    def _failed(self, what: str, exc: BaseException) -> None:
        self.failures += 1
        if self.failures == 1 or self.failures % 100 == 0:
            log.warning("could not %s in Redis (%s); duplicates possible", what, type(exc).__name__)

    async def known(self, request_ids: list[str]) -> set[str]:
        """Which of ``request_ids`` some replica has sent (empty if Redis cannot say)."""
        if not request_ids:
            return set()
        try:
            found = await self._redis.mget([self._prefix + rid for rid in request_ids])
        except (RedisError, OSError) as exc:
            self._failed("ask for sent request ids", exc)
            return set()
        return {rid for rid, hit in zip(request_ids, found, strict=True) if hit is not None}

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
        await self.flush()
