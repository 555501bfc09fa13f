"""Recently sent request ids: a bounded LRU with an age limit."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class RecentIds:
    """Remembers up to ``size`` ids for at most ``ttl_s`` seconds each."""

    __slots__ = ("_clock", "_ids", "_size", "_ttl")

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float]) -> None:
        self._ids: OrderedDict[str, float] = OrderedDict()
        self._size = size
        self._ttl = ttl_s
        self._clock = clock

    def __contains__(self, request_id: str) -> bool:
        at = self._ids.get(request_id)
        if at is None:
            return False
        if self._clock() - at > self._ttl:
            del self._ids[request_id]
            return False
        return True

    def add(self, request_id: str) -> None:
        ids = self._ids
        ids[request_id] = self._clock()
        ids.move_to_end(request_id)
        while len(ids) > self._size:
            ids.popitem(last=False)

    def __len__(self) -> int:
        return len(self._ids)
