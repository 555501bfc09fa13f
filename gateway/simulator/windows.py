"""Exact rate accounting on ``loop.time()``: sliding windows and leaky queues.

Both are O(1) amortised per event: a window is a deque of event times pruned from
the left, a queue is a depth that drains linearly with time.
"""

from __future__ import annotations

from collections import deque


class SlidingWindow:
    """Count of events in the last ``width_s`` seconds, and the largest count seen.

    An event at time ``t`` is inside the window at ``now`` while ``t > now - width_s``.
    ``peak`` is the largest number of events ever inside the window right after an
    arrival, i.e. the maximum over all windows of that width.
    """

    __slots__ = ("_times", "peak", "width_s")

    def __init__(self, width_s: float = 1.0) -> None:
        self._times: deque[float] = deque()
        self.width_s = width_s
        self.peak = 0

    def __len__(self) -> int:
        return len(self._times)

    def count(self, now: float) -> int:
        """Events inside the window ending at ``now`` (prunes older ones)."""
        times = self._times
        horizon = now - self.width_s
        while times and times[0] <= horizon:
            times.popleft()
        return len(times)

    def add(self, now: float) -> int:
        """Record an event at ``now``; return the count including it."""
        times = self._times
        horizon = now - self.width_s
        while times and times[0] <= horizon:
            times.popleft()
        times.append(now)
        n = len(times)
        if n > self.peak:
            self.peak = n
        return n

    def wait_s(self, now: float, limit: int) -> float:
        """Seconds until fewer than ``limit`` events are inside the window."""
        times = self._times
        excess = self.count(now) - limit
        if excess < 0:
            return 0.0
        return times[excess] + self.width_s - now

    def clear(self) -> None:
        self._times.clear()
        self.peak = 0


class LeakyQueue:
    """An ingress queue of ``depth`` messages drained continuously at a rate.

    The rate is passed at each call so that a runtime change applies at once; the
    drain between two calls uses the rate of the later call. ``drained`` counts every
    message (fraction) that ever left, so a message pushed when ``drained + depth``
    was ``x`` has left the queue once ``drained >= x + 1`` (first in, first out).
    """

    __slots__ = ("_last", "depth", "drained")

    def __init__(self, now: float) -> None:
        self.depth = 0.0
        self.drained = 0.0
        self._last = now

    def drain(self, now: float, rate: float) -> float:
        """Drain the queue up to ``now``; return the current depth."""
        elapsed = now - self._last
        if elapsed > 0.0:
            out = elapsed * rate
            if out > self.depth:
                out = self.depth
            self.depth -= out
            self.drained += out
            self._last = now
        return self.depth

    def wait_s(self, now: float, rate: float, capacity: int) -> float:
        """Seconds until one more message fits in a queue of ``capacity``."""
        over = self.drain(now, rate) + 1.0 - capacity
        return over / rate if over > 0.0 else 0.0

    def push(self) -> None:
        """Add one message (call after :meth:`wait_s` returned 0 at the same time)."""
        self.depth += 1.0
