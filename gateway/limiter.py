"""Paced token buckets that keep every 1-second window under Sinch's caps.

Sinch counts requests in a strict 1-second window. A classic token bucket that
starts full (``aiolimiter.AsyncLimiter(r, 1)``) lets ``2r`` through in its first
second and again after every idle second, and one with a burst of 1 loses rate
to timer lateness because each wait starts from the moment the previous waiter
woke up. These buckets use GCRA (virtual scheduling): each caller *reserves* the
next slot on a theoretical timeline that advances by exactly ``1/rate`` per
request, so late wake-ups never accumulate into lost throughput. ``burst`` is
the tolerance: a caller held up elsewhere (say in the project bucket) may catch
up with up to ``burst - 1`` slots it missed, so that a wait in one bucket does
not cost throughput in another.

Two things keep every window under the cap: the pace is ``rate * (1 - margin)``,
which leaves ``margin`` seconds of every second for arrival jitter, and a window
guard holds a send until the ``rate``-th send before it is ``1 + margin / 2``
seconds old, measured at the moment of sending. The guard is what catches up
bursts, stalls of the event loop and waits in other buckets; the half of the
margin it keeps is the arrival jitter any ``rate`` sends in a row may have. Paced
sends leave its window with ``margin / 2`` seconds to spare (10 ms at the default
2 %), more than the wake-up grid (``TICK_S``) moves them, so in a steady drain it
holds none: a hold is one more timer and wake-up of the event loop for the send.

A request takes a slot from its app bucket first (waiting its turn there), then
from the channel bucket where one is configured, and last from the project
bucket. Each lane has at most one caller waiting on the project bucket, and
reservations are handed out in call order, so when the project cap binds the
busy apps share it round-robin: max-min fair.

Adaptive rate (``slow_down``/``recover``) scales the pace of one bucket between
``min_factor`` and 1 (multiplicative decrease, additive increase).

Several replicas share buckets through Redis (``gateway.shared_limiter``): such a
bucket hands out slots of a timeline that the whole group shares, and ``acquire``
takes them like local ones. When the last bucket is shared (the project), its slot
is taken after every other bucket's wait and guard, and the send follows at once.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

Clock = Callable[[], float]
TICK_S = 0.004  # wake-up granularity of the pacing
# A pacing sleep ends this long after its due time. uvloop's timers (libuv's: a millisecond
# resolution, and a clock read once per loop iteration) fired up to 1.4 ms early in a
# third of the sleeps measured; a send that wakes before its window frees sleeps twice.
LATE_S = 0.0015
# A window guard's delay below this is the rounding of a send exactly one window after the
# one it waits for (uvloop's clock counts whole milliseconds, so that is common): not held.
ROUNDING_S = 1e-6


class SlotSource(Protocol):
    """A bucket whose slots come from a timeline shared with other replicas."""

    async def take(self, ahead: float = 0.0) -> None:
        """Return at the time of the next slot (holding as long as none can be had).

        ``ahead`` > 0: the caller does not queue behind the replica's other callers.
        """

    held: int  # callers held by its window guard now

    def window_delay(self, now: float, ahead: int = 0) -> float: ...

    def record(self, now: float) -> None: ...

    def restamp(self, recorded: float, sent: float) -> None: ...


class AdaptiveFactor:
    """Adaptive rate of a bucket: a factor between ``min_factor`` and 1 on its pace.

    Multiplicative decrease after a 429 in the bucket's scope, additive increase
    back toward the configured rate; a change re-paces the bucket and tells
    ``on_change``. Shared by the local and the Redis-backed buckets.
    """

    factor: float
    min_factor: float
    on_change: Callable[[Any], None] | None
    _sent: deque[float]  # the window guard's last sends, as many as the rate

    def sent_since(self, since: float) -> int:
        """Sends recorded at or after ``since`` (at most the window guard's length)."""
        n = 0
        for at in reversed(self._sent):
            if at < since:
                break
            n += 1
        return n

    def _recompute(self) -> None:
        raise NotImplementedError

    def slow_down(self, factor: float = 0.5) -> bool:
        """Multiplicative decrease after a 429 in this scope. True if it changed."""
        new = max(self.min_factor, self.factor * factor)
        if new == self.factor:
            return False
        self.factor = new
        self._changed()
        return True

    def recover(self, step: float = 0.05) -> bool:
        """Additive increase toward the configured rate. True if it changed."""
        if self.factor >= 1.0:
            return False
        self.factor = min(1.0, self.factor + step)
        self._changed()
        return True

    def _changed(self) -> None:
        self._recompute()
        if self.on_change:
            self.on_change(self)


class Bucket(AdaptiveFactor):
    """One paced bucket (project, app or channel scope)."""

    __slots__ = (
        "_clock",
        "_sent",
        "_tat",
        "burst",
        "ceiling",
        "factor",
        "held",
        "interval",
        "margin",
        "min_factor",
        "name",
        "on_change",
        "rate",
        "tolerance",
        "window",
    )

    def __init__(
        self,
        name: str,
        rate: float,
        *,
        burst: float = 1.0,
        margin: float = 0.01,
        clock: Clock | None = None,
        min_factor: float = 0.05,
        on_change: Callable[[Bucket], None] | None = None,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        if burst < 1:
            raise ValueError("burst must be >= 1")
        self.name = name
        self.rate = rate
        self.burst = burst
        self.margin = margin
        self.window = guard_window(margin)
        self.factor = 1.0
        self.min_factor = min_factor
        self.on_change = on_change
        self._clock = clock or asyncio.get_running_loop().time
        self._tat = 0.0
        # send times of the last `cap` requests: the strict-window guard
        self._sent: deque[float] = deque(maxlen=max(1, int(rate)))
        self.held = 0  # callers its window guard holds now
        self.ceiling: float | None = None
        self.interval = 0.0
        self.tolerance = 0.0
        self._recompute()

    @property
    def pace(self) -> float:
        """Requests per second this bucket hands out now."""
        return 1.0 / self.interval

    def _recompute(self) -> None:
        rate = self.rate * self.factor
        if self.ceiling is not None and self.ceiling < rate:
            rate = self.ceiling
        pace = rate * (1.0 - self.margin)
        self.interval = 1.0 / pace
        self.tolerance = (self.burst - 1.0) * self.interval

    def reserve(self, ahead: float = 0.0) -> float:
        """Take the next slot; return the clock time at which it may be used.

        ``ahead`` (seconds) lets the caller go before callers already queued for up
        to that long: its slot is taken now and theirs move one interval later.
        """
        now = self._clock()
        tat = self._tat
        at = tat - (self.tolerance if self.tolerance > ahead else ahead)
        if at < now:
            at = now
        self._tat = (tat if tat > at else at) + self.interval
        return at

    def window_delay(self, now: float, ahead: int = 0) -> float:
        """Seconds to wait so that no 1-second window holds more than ``rate`` sends.

        Pacing alone keeps to that when the time from slot to send is constant; this
        guard also holds when it is not (a wait in the next bucket, a stalled loop).
        Its window is :attr:`window`, ``1 + margin / 2`` seconds: half the headroom
        for arrival jitter that the pace keeps, so that paced sends pass. ``ahead``:
        callers already held, each of which takes the next send to leave the window
        before this one.
        """
        return window_delay(self._sent, self.window, now, ahead)

    def record(self, now: float) -> None:
        self._sent.append(now)

    def restamp(self, recorded: float, sent: float) -> None:
        """The send recorded at ``recorded`` went at ``sent``: keep its real time."""
        restamp(self._sent, recorded, sent)

    def backlog_s(self) -> float:
        """How far ahead of now the slots are handed out (0 when idle)."""
        return max(0.0, self._tat - self._clock())

    def set_rate(self, rate: float) -> None:
        self.rate = rate
        self._sent = deque(self._sent, maxlen=max(1, int(rate)))
        self._recompute()

    def set_ceiling(self, ceiling: float | None) -> None:
        """Pace at no more than ``ceiling`` per second (its share of a binding project cap)."""
        if ceiling != self.ceiling:
            self.ceiling = ceiling
            self._recompute()


async def acquire(
    buckets: Sequence[Bucket | SlotSource], clock: Clock, *, guard: bool = True, ahead: float = 0.0
) -> float:
    """Wait for a slot in each bucket in turn; return the total time waited.

    The caller sends right after this returns: the send time is recorded in each
    bucket's window guard. A shared bucket in last place is taken after the guard
    of the others (whose sends are recorded just before it), so that nothing stands
    between its slot and the send. With ``guard=False`` (local buckets only) the
    caller runs :func:`hold_window` itself, at the moment it sends. ``ahead`` goes to
    the last bucket's :meth:`Bucket.reserve` (the project's, where apps queue together),
    or to a shared last bucket's ``take``.
    """
    start = clock()
    last = buckets[-1] if buckets else None
    final = None if last is None or isinstance(last, Bucket) else last
    for bucket in buckets:
        if isinstance(bucket, Bucket):
            at = bucket.reserve(ahead if bucket is last else 0.0)
            now = clock()
            if at > now:
                await asyncio.sleep(tick_delay(at, now))
        elif bucket is not final:
            await bucket.take()
    if not guard and final is None:
        return clock() - start
    guarded = [b for b in buckets if b is not final]
    now = await hold_window(guarded, clock)
    if final is not None:
        await final.take(ahead)
        # the send goes now, after the wait for the shared slot: the windows keep its
        # real time (their check, before the wait, counted it at the earlier one)
        sent = clock()
        if sent > now:
            for bucket in guarded:
                bucket.restamp(now, sent)
        now = sent
    return now - start


def guard_window(margin: float) -> float:
    """The window guard's window, seconds: a second and half the margin."""
    return 1.0 + margin / 2


def tick_delay(at: float, now: float) -> float:
    """Seconds from ``now`` to a wake-up on the TICK_S grid, LATE_S past ``at`` or later.

    Sends due within the same few milliseconds share one wake-up of the event loop
    instead of one each: the pacing's sleeps and the window guard's holds alike.
    """
    return math.ceil(at / TICK_S) * TICK_S - now + LATE_S


def window_delay(sent: deque[float], window: float, now: float, ahead: int = 0) -> float:
    """The window guard (``window`` seconds) of a bucket with its last ``maxlen`` sends ``sent``."""
    i = ahead - ((sent.maxlen or 0) - len(sent))  # the send that must leave the window first
    if i < 0:
        return 0.0
    return sent[min(i, len(sent) - 1)] + window - now


def restamp(sent: deque[float], recorded: float, at: float) -> None:
    """Move the send recorded at ``recorded`` (one of the last few) to ``at``."""
    for i in range(len(sent) - 1, max(-1, len(sent) - 16), -1):
        if sent[i] == recorded:
            sent[i] = at
            return


def record_if_clear(buckets: Sequence[Bucket], now: float) -> bool:
    """If no window of ``buckets`` is full at ``now``, record a send in each: True.

    :func:`hold_window` without the wait, for local buckets: most sends find room.
    """
    for b in buckets:
        if window_delay(b._sent, b.window, now) > ROUNDING_S:
            return False
    for b in buckets:
        b._sent.append(now)
    return True


async def hold_window(buckets: Sequence[Bucket | SlotSource], clock: Clock) -> float:
    """Hold until no bucket's window would go over its rate, then record a send now.

    Called right before the request is written, so that the recorded time is the
    send's own: a send that waited behind other work of the event loop is not
    bunched with the next one.
    """
    now = clock()
    while buckets:
        now = clock()
        full = [b for b in buckets if b.window_delay(now) > ROUNDING_S]
        if not full:
            break
        # behind the callers the same windows hold already: each of them takes the next
        # send to leave, so this one wakes at its own turn, not with all of them at the first
        delay = max(b.window_delay(now, b.held) for b in full)
        for b in full:
            b.held += 1
        try:
            await asyncio.sleep(tick_delay(now + delay, now))
        finally:
            for b in full:
                b.held -= 1
    for bucket in buckets:
        bucket.record(now)
    return now
