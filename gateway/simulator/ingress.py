"""Per-app MT ingress queues and the pump that releases messages as they leave.

Sinch accepts a send into its app's ingress queue (up to ``queue_size`` messages)
and drains that queue toward the channel at the app's rate; the first delivery
report, QUEUED_ON_CHANNEL, comes when the message leaves the queue. The depth is a
fluid :class:`LeakyQueue`; messages whose delivery reports are wanted also wait in a
FIFO of *tickets* (the queue's ``drained + depth`` when they were pushed) and leave
once ``drained`` has passed their ticket plus one.

:class:`DeparturePump` keeps one timer for all apps: a heap of each non-empty
queue's estimated departure time. Estimates made at an old rate are corrected when
they fire (too early: re-armed) and by :meth:`DeparturePump.rates_changed` (too late).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from gateway.simulator.windows import LeakyQueue

_EPSILON: Final = 1e-9
Release = Callable[[Any], None]


class IngressQueue:
    """One app's ingress queue: its depth and the messages waiting for a report."""

    __slots__ = ("app_id", "leaky", "waiting")

    def __init__(self, app_id: str, now: float) -> None:
        self.app_id = app_id
        self.leaky = LeakyQueue(now)
        self.waiting: deque[tuple[float, Any]] = deque()

    def size(self, now: float, rate: float) -> int:
        """Messages in the queue at ``now``; one partly drained still counts."""
        return math.ceil(self.leaky.drain(now, rate) - _EPSILON)

    def wait_s(self, now: float, rate: float, capacity: int) -> float:
        """Seconds until one more message fits (0 when it fits now)."""
        return self.leaky.wait_s(now, rate, capacity)

    def push(self, item: Any = None) -> bool:
        """Enqueue one message; track ``item`` until it leaves. True if newly non-empty."""
        leaky = self.leaky
        ticket = leaky.drained + leaky.depth + 1.0
        leaky.push()
        if item is None:
            return False
        self.waiting.append((ticket, item))
        return len(self.waiting) == 1

    def leave(self, now: float, rate: float) -> list[Any]:
        """Items whose messages have left the queue by ``now``, oldest first."""
        empty = self.leaky.drain(now, rate) <= _EPSILON
        # An empty queue has let everything out, whatever the rounding of ``drained``.
        drained = math.inf if empty else self.leaky.drained
        waiting = self.waiting
        out = []
        while waiting and waiting[0][0] <= drained + _EPSILON:
            out.append(waiting.popleft()[1])
        return out

    def next_departure(self, now: float, rate: float) -> float | None:
        """Estimated time the oldest tracked message leaves, at ``rate``."""
        if not self.waiting:
            return None
        return now + max(0.0, self.waiting[0][0] - self.leaky.drained) / rate


class DeparturePump:
    """Releases tracked messages of every :class:`IngressQueue` as they leave.

    ``rate_of(app_id)`` is the real drain rate now; ``release(item)`` is called
    (without awaiting) for each message that left. ``start()``/``stop()`` are
    idempotent.
    """

    def __init__(self, rate_of: Callable[[str], float], release: Release) -> None:
        self._rate_of = rate_of
        self._release = release
        self._heap: list[tuple[float, int, IngressQueue]] = []
        self._sequence = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def watch(self, queue: IngressQueue, now: float) -> None:
        """Time ``queue``, which just got its first tracked message."""
        due = queue.next_departure(now, self._rate_of(queue.app_id))
        if due is not None:
            self._arm(due, queue)

    def rates_changed(self, now: float) -> None:
        """Re-estimate every departure after a change of rates."""
        queues = {id(q): q for _, _, q in self._heap}
        self._heap.clear()
        for queue in queues.values():
            self.watch(queue, now)
        self._wake.set()

    def _arm(self, due: float, queue: IngressQueue) -> None:
        heapq.heappush(self._heap, (due, next(self._sequence), queue))
        if self._heap[0][2] is queue:
            self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sim-ingress-departures")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        heap, wake = self._heap, self._wake
        while True:
            wake.clear()
            if not heap:
                await wake.wait()
                continue
            now = loop.time()
            if heap[0][0] > now:
                timer = loop.call_at(heap[0][0], wake.set)
                try:
                    await wake.wait()
                finally:
                    timer.cancel()
                continue
            while heap and heap[0][0] <= now:
                _, _, queue = heapq.heappop(heap)
                self._let_out(queue, now)

    def _let_out(self, queue: IngressQueue, now: float) -> None:
        rate = self._rate_of(queue.app_id)
        for item in queue.leave(now, rate):
            self._release(item)
        due = queue.next_departure(now, rate)
        if due is not None:
            # Not out yet by rounding: look again a millisecond later, not in a busy loop.
            self._arm(max(due, now + 0.001), queue)
