"""Buckets shared by every replica through Redis: one cap for the whole group.

The local :class:`~gateway.limiter.Bucket` keeps one process under Sinch's strict
1-second windows. Several replicas each pacing a share of the cap leave it idle
when one runs dry and overshoot it when each believes in its own share, so with
Redis the group keeps one GCRA timeline per bucket (project, channel, app) in
Redis instead:

- A short Lua script reserves ``k`` consecutive slots atomically: the first at
  ``max(now, tat)``, each ``1/pace`` after the one before, ``pace = rate x (1 -
  margin) x factor``; ``tat`` moves past the last. ``now`` is Redis's ``TIME``,
  the only clock every replica shares; a replica maps a slot to its own
  ``loop.time()`` by the reply's ``TIME`` seen from the end of the round trip, so
  the mapping can only make a slot later, never earlier.
- The replica hands its ``k`` slots out in call order. Each send has a virtual
  slot: its own slot or later, ``1/pace`` after the previous send's, within the
  replica's run (its stretch of consecutive slots on the timeline); it goes no
  earlier than that and at most ``grace_s`` after. A late wake-up moves the
  virtual slots after it back instead of bunching sends; what no longer fits in
  the run is lost. The virtual slots of the whole group are thus ``1/pace`` apart
  and every send is within ``grace_s`` (plus the clock mapping's error, at most
  the fastest recent round trip) of one, so no 1-second window holds more than
  ``ceil((1 + grace_s + rtt) x pace)`` sends: at most ``rate`` while ``grace_s +
  rtt <= margin / (1 - margin)``. ``grace_s`` defaults to half the margin, which
  leaves the other half for the mapping and for arrival jitter at Sinch.
- ``k`` covers ``batch_horizon_s`` of the bucket's pace (at most ``max_batch``), so
  a busy bucket costs one round trip per ``k`` sends and a slow one (an app at
  20/s) draws few slots that it could lose when its lane runs dry.
- The rate lives in the bucket's hash: ``set_rate`` on any replica writes it at once,
  and every replica adopts what the script answers at its next draw, so the whole
  group follows. ``factor`` (the adaptive slow-down after 429s) is the caller's own.
  A bucket pushes its configured rate with its first call: the newest
  configuration wins. Shared buckets have no burst: the spacing is the guarantee.

Redis unreachable: ``take()`` holds (nothing is sent, nothing raised), slots
drawn before are dropped (a restarted Redis may hand them out again), ``healthy()``
is False with the reason for ``/readyz``, and a watcher pings with back-off until
Redis answers, then sending resumes by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.aio import cancel_and_wait, wait_within
from gateway.limiter import LATE_S, AdaptiveFactor, guard_window, restamp, window_delay

log = logging.getLogger(__name__)

Clock = Callable[[], float]

# KEYS[1] bucket hash; ARGV rate, margin, factor, n, push rate (0/1), idle ttl ms, ahead us
# (the first slot may go up to that far before the timeline's end: one caller's own slot).
# Returns Redis TIME (us), the bucket's rate, the first slot (us), the spacing (us).
_DRAW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call('HMGET', KEYS[1], 'tat', 'rate')
local rate_s = state[2]
if ARGV[5] == '1' or not rate_s then
  rate_s = ARGV[1]
  redis.call('HSET', KEYS[1], 'rate', rate_s)
end
local pace = tonumber(rate_s) * (1 - tonumber(ARGV[2])) * tonumber(ARGV[3])
local interval = 1000000 / pace
local tat = tonumber(state[1]) or 0
local first = math.max(now, tat - tonumber(ARGV[7]))
local n = tonumber(ARGV[4])
if n > 0 then
  tat = math.max(tat, first) + n * interval
  redis.call('HSET', KEYS[1], 'tat', string.format('%.3f', tat))
end
redis.call('PEXPIRE', KEYS[1], math.ceil(math.max(tat - now, 0) / 1000) + tonumber(ARGV[6]))
return {string.format('%.0f', now), rate_s, string.format('%.3f', first),
        string.format('%.6f', interval)}
"""

_OFFSET_WINDOW_S = 10.0  # clock samples kept: Redis time may slew against ours by a few ppm


class SharedBucket(AdaptiveFactor):
    """One bucket whose timeline is in Redis; made by :meth:`SharedLimiter.bucket`.

    It has the attributes of :class:`~gateway.limiter.Bucket` that lanes, the
    adaptive rates and the metrics use (``name``, ``rate``, ``pace``, ``factor``,
    ``on_change``, ``slow_down``, ``recover``, ``set_rate``, ``backlog_s``), and
    ``take()`` instead of ``reserve()``.
    """

    burst = 1.0

    def __init__(
        self,
        limiter: SharedLimiter,
        name: str,
        rate: float,
        *,
        margin: float,
        grace_s: float,
        min_factor: float,
        on_change: Callable[[SharedBucket], None] | None,
        key: str | None = None,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        if not 0 <= margin < 1:
            raise ValueError("margin must be in [0, 1)")
        self._limiter = limiter
        self._clock = limiter.clock
        self.name = name
        self.key = limiter.key_prefix + (key or name)
        self.rate = rate
        self.margin = margin
        self.window = guard_window(margin)  # this replica's own window guard, seconds
        self.grace_s = grace_s
        self.factor = 1.0
        self.min_factor = min_factor
        self.on_change = on_change
        self.interval = 0.0
        self.drawn = 0  # slots reserved in Redis by this replica
        self.lost = 0  # of those, not taken in time (or dropped while Redis was down)
        self.roundtrips = 0
        # (local time, spacing, end of its run): a run is a stretch of the timeline of
        # consecutive slots all drawn by this replica; its end is a one-item list that
        # grows when the next batch follows on
        self._slots: deque[tuple[float, float, list[float]]] = deque()
        self._run: list[float] | None = None
        self._tat_us = -1.0  # Redis time just past this replica's last drawn slot
        self._next_v = float("-inf")  # the earliest virtual slot of the next send planned
        self._batch = 1_000_000  # capped by batch_size() at the first draw
        self._lost_seen = 0
        self._waiting = 0  # callers waiting for a draw
        self._last_slot = 0.0
        self._push_rate = True
        self._draw_task: asyncio.Task[float] | None = None
        self._sent: deque[float] = deque(maxlen=max(1, int(rate)))
        self.held = 0  # callers its window guard holds now
        self._recompute()

    @property
    def pace(self) -> float:
        return 1.0 / self.interval

    @property
    def kind(self) -> str:
        """What the bucket limits: the part of its name before ``:`` (``project``, ``app``...)."""
        return self.name.partition(":")[0]

    def _recompute(self) -> None:
        self.interval = 1.0 / (self.rate * (1.0 - self.margin) * self.factor)

    def batch_size(self) -> int:
        """The most slots drawn per round trip: ``batch_horizon_s`` of pace, 1 to ``max_batch``."""
        lim = self._limiter
        return max(1, min(lim.max_batch, math.ceil(self.pace * lim.batch_horizon_s)))

    def _next_batch(self) -> int:
        """Slots for the next draw: halved after a batch that lost slots, +1 after one that did not.

        A slot that no caller takes in time is lost to the whole group, so a replica
        whose demand is lower than its batches draw fewer; callers already waiting
        take theirs at once, so they are never fewer than those.
        """
        cap = self.batch_size()
        if self.lost > self._lost_seen:
            self._batch = max(1, self._batch // 2)
        else:
            self._batch = min(cap, self._batch + 1)
        self._lost_seen = self.lost
        return min(cap, max(self._waiting, self._batch))

    async def take(self, ahead: float = 0.0) -> None:
        """Wait for this replica's next slot on the shared timeline; return when it may go.

        ``ahead`` > 0 (an app the project's shares give its whole rate): the caller
        draws one slot of its own from the group's timeline, a round trip per send,
        instead of queueing for this replica's slots behind its other callers.

        Each send has a virtual slot: its drawn slot, or later if it must be, one
        spacing after the one before and never past the last slot of its run (the
        stretch of consecutive slots this replica drew). It goes at its virtual slot
        or within ``grace_s`` after it. A wake-up later than that is lost, except
        for the last send planned, whose virtual slot moves back (and the next with
        it) instead: a lone caller, an app's lane, does not lose a slot to each late
        wake-up. Sends are never bunched; a slot that no longer fits in its run is
        lost. Holds while Redis is unreachable. The caller sends right after it
        returns.
        """
        if ahead > 0:
            await self._take_own(ahead)
            return
        clock = self._clock
        grace = self.grace_s
        slots = self._slots
        limiter = self._limiter
        while True:
            now = clock()
            while slots and slots[0][2][0] + grace < now:
                slots.popleft()
                self.lost += 1
            if not slots:
                await self._draw()
                continue
            at, spacing, run = slots.popleft()
            planned = max(at, self._next_v)
            if planned > run[0]:
                if not slots and run is self._run and limiter.up:
                    # the last slot held: the next batch may follow on and extend the run
                    end = run[0]
                    slots.appendleft((at, spacing, run))
                    await self._draw()
                    if run[0] > end or not slots or slots[0][2] is not run:
                        continue
                    slots.popleft()
                self.lost += 1
                continue
            self._next_v = planned + spacing
            now = await self._sleep_until(planned)
            if now > planned + grace:
                moved = now - grace
                if self._next_v != planned + spacing or moved > run[0]:
                    self.lost += 1
                    continue
                self._next_v = moved + spacing
            if not limiter.up:
                self.lost += 1
                continue
            return

    async def _draw_when_due(self) -> float:
        """Draw the next batch once this replica's last slot is within ``lookahead_s``.

        Callers beyond that wait here, not on the group's timeline: otherwise every
        waiting caller of every replica holds a slot reserved ahead, and the timeline
        runs as far ahead of now as the group's queue is long, which is where a caller
        that must not queue (``take(ahead)``) would have to draw.
        """
        wait = self._last_slot - self._limiter.lookahead_s - self._clock()
        if wait > 0:
            await asyncio.sleep(wait)
        return await self._limiter.draw(self, self._next_batch())

    async def _take_own(self, ahead: float) -> None:
        """One slot drawn for this caller alone; sent at it or within ``grace_s`` after.

        The slot may be up to ``ahead`` (at most ``lookahead_s``) before the end of the
        group's timeline, as :meth:`Bucket.reserve` lets a caller go ahead: the slots
        drawn after it move one spacing later. A 1-second window then holds at most
        ``ceil(rate of such callers x ahead)`` sends more than the spacing gives: one
        for an app at up to 50/s and 20 ms, which a margin of 2 % (the gateway's
        default) leaves room for, with ``grace_s`` at half of it.
        """
        ahead = min(ahead, self._limiter.lookahead_s)
        while True:
            at = await self._limiter.draw(self, 1, own=True, ahead=ahead)
            now = await self._sleep_until(at)
            if now <= at + self.grace_s and self._limiter.up:
                return
            self.lost += 1

    async def _sleep_until(self, at: float) -> float:
        """Sleep until a caller's slot; return the time woken. A cancelled caller loses it."""
        clock = self._clock
        now = clock()
        try:
            while now < at:
                await asyncio.sleep(at - now + LATE_S)
                now = clock()
        except asyncio.CancelledError:
            self.lost += 1
            raise
        return now

    async def _draw(self) -> None:
        self._waiting += 1
        try:
            task = self._draw_task
            if task is None or task.done():
                task = self._draw_task = asyncio.create_task(
                    self._draw_when_due(), name=f"draw-{self.name}"
                )
            # one draw in flight per bucket; a cancelled taker does not cancel it
            await asyncio.shield(task)
        finally:
            self._waiting -= 1

    def _accept(
        self,
        rate: float,
        first_us: float,
        interval_us: float,
        n: int,
        offset: float,
        own: bool = False,
    ) -> float:
        """Take ``n`` slots from ``first_us`` (Redis time), ``offset`` = Redis minus local time.

        Returns the local time of the first. ``own``: one caller's slot, kept out of this
        replica's queue and runs.
        """
        self.drawn += n
        self.roundtrips += 1
        first = first_us / 1e6 - offset
        if n and own:
            self._run = None  # the next batch starts a run of its own
        elif n:
            spacing = interval_us / 1e6
            last = first + (n - 1) * spacing + 1e-6  # the sum of spacings may round above it
            run = self._run
            if run is None or abs(first_us - self._tat_us) > 1.0:
                run = self._run = [last]
            else:
                run[0] = last
            self._tat_us = first_us + n * interval_us
            self._slots.extend((first + i * spacing, spacing, run) for i in range(n))
            self._last_slot = last
        # a rate set here and not yet written wins over the one Redis answered
        if rate != self.rate and not self._push_rate:
            log.info("bucket %s follows the group's rate %.2f/s", self.name, rate)
            self._set_rate_locally(rate)
            if self.on_change is not None:
                self.on_change(self)
        return first

    def _drop_slots(self) -> None:
        self.lost += len(self._slots)
        self._slots.clear()
        self._run = None

    def window_delay(self, now: float, ahead: int = 0) -> float:
        """This replica's own window guard, as in ``Bucket`` (used when not the last bucket)."""
        return window_delay(self._sent, self.window, now, ahead)

    def record(self, now: float) -> None:
        self._sent.append(now)

    def restamp(self, recorded: float, sent: float) -> None:
        restamp(self._sent, recorded, sent)

    def backlog_s(self) -> float:
        """How far ahead of now this replica holds slots (0 when it holds none)."""
        return max(0.0, self._last_slot - self._clock()) if self._slots else 0.0

    def set_rate(self, rate: float) -> None:
        """Change the rate of the whole group's bucket (written to Redis at once)."""
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self._set_rate_locally(rate)
        self._push_rate = True
        self._limiter.push_rate(self)

    def _set_rate_locally(self, rate: float) -> None:
        self.rate = rate
        self._sent = deque(self._sent, maxlen=max(1, int(rate)))
        self._recompute()


class SharedLimiter:
    """One Redis client, the draw script, health and the watcher, for all shared buckets.

    Create it inside the running loop; ``start()`` before the first ``take()``.
    ``on_roundtrip(seconds)`` is called after every successful script call.
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "sinch-gateway:limiter:",
        max_batch: int = 4,
        batch_horizon_s: float = 0.2,
        timeout_s: float = 1.0,
        ping_interval_s: float = 0.5,
        backoff_min_s: float = 0.05,
        backoff_max_s: float = 2.0,
        idle_ttl_s: float = 60.0,
        lookahead_s: float = 0.02,
        clock: Clock | None = None,
        on_roundtrip: Callable[[float], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if batch_horizon_s <= 0:
            raise ValueError("batch_horizon_s must be > 0")
        self.url = url
        self.key_prefix = key_prefix
        self.max_batch = max_batch
        self.batch_horizon_s = batch_horizon_s
        self.lookahead_s = lookahead_s
        self.clock = clock or asyncio.get_running_loop().time
        self.on_roundtrip = on_roundtrip
        self.slots_drawn = 0
        self.roundtrips = 0
        self.failures = 0  # calls that found Redis unreachable
        self._lost_forgotten: dict[str, int] = {}  # slots lost by buckets no longer tracked
        self.reason = "redis not connected yet"
        self._timeout_s = timeout_s
        self._ping_interval_s = ping_interval_s
        self._backoff = (backoff_min_s, backoff_max_s)
        self._idle_ttl_ms = int(idle_ttl_s * 1000)
        self._buckets: list[SharedBucket] = []
        self._offsets: deque[tuple[float, float]] = deque()  # (local time, offset lower bound)
        self._up = asyncio.Event()
        self._went_down = asyncio.Event()
        self._redis: aioredis.Redis | None = None
        self._script: Any = None
        self._watcher: asyncio.Task[None] | None = None
        self._pushes: set[asyncio.Task[float]] = set()
        self._closed = False

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        """Connect (a Redis that is down is not an error: sending holds until it is up)."""
        if self._redis is not None:
            return
        self._redis = aioredis.Redis.from_url(
            self.url,
            socket_timeout=self._timeout_s,
            socket_connect_timeout=self._timeout_s,
            retry=Retry(NoBackoff(), 0),  # back-off is ours, and sending holds meanwhile
            decode_responses=True,
        )
        self._script = self._redis.register_script(_DRAW)
        await self._ping()
        self._watcher = asyncio.create_task(self._watch(), name="shared-limiter-watch")

    async def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        await cancel_and_wait(
            [self._watcher, *self._pushes, *(b._draw_task for b in self._buckets)]
        )
        if self._redis is not None:
            await self._redis.aclose()

    async def __aenter__(self) -> SharedLimiter:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- buckets ----------------------------------------------------------

    def bucket(
        self,
        name: str,
        rate: float,
        *,
        margin: float = 0.01,
        grace_s: float | None = None,
        min_factor: float = 0.05,
        on_change: Callable[[SharedBucket], None] | None = None,
        key: str | None = None,
    ) -> SharedBucket:
        """A bucket named like the local ones (``project:P``, ``app:A``, ``channel:C``).

        Every replica that uses the same ``key`` (the name unless given; the Redis
        key is ``key_prefix + key``) shares its timeline. ``grace_s`` defaults to
        half of ``margin`` (seconds); it must not exceed the margin.
        """
        grace = margin / 2 if grace_s is None else grace_s
        if not 0 <= grace <= margin:
            raise ValueError("grace_s must be in [0, margin]")
        b = SharedBucket(
            self,
            name,
            rate,
            margin=margin,
            grace_s=grace,
            min_factor=min_factor,
            on_change=on_change,
            key=key,
        )
        self._buckets.append(b)
        return b

    def forget(self, bucket: SharedBucket) -> None:
        """Stop tracking a bucket (e.g. the lane of an app is gone)."""
        with contextlib.suppress(ValueError):
            self._buckets.remove(bucket)
            kind = bucket.kind
            self._lost_forgotten[kind] = self._lost_forgotten.get(kind, 0) + bucket.lost

    def slots_lost(self, kind: str) -> int:
        """Slots drawn by buckets of ``kind`` (``project``, ``app``...) no send took in time."""
        lost = self._lost_forgotten.get(kind, 0)
        return lost + sum(b.lost for b in self._buckets if b.kind == kind)

    # -- health -----------------------------------------------------------

    @property
    def up(self) -> bool:
        return self._up.is_set()

    def healthy(self) -> bool:
        return self._up.is_set()

    def readiness(self) -> tuple[bool, str]:
        """A ``/readyz`` check: ``(True, "connected")`` or ``(False, "redis unreachable: ...")``."""
        return (True, "connected") if self._up.is_set() else (False, self.reason)

    def _mark_up(self) -> None:
        if not self._up.is_set():
            log.info("shared limiter: redis reachable; sending resumes")
        self.reason = "connected"
        self._went_down.clear()
        self._up.set()

    def _mark_down(self, exc: BaseException) -> None:
        self.failures += 1
        detail = str(exc) or type(exc).__name__
        # a refusal (an error reply) is not an outage, but sending holds all the same
        unreachable = isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError))
        what = "redis unreachable" if unreachable else "redis refused the limiter's script"
        self.reason = f"{what}: {detail[:200]}"
        if self._up.is_set():
            log.error("shared limiter: %s; sending holds", self.reason)
        self._up.clear()
        self._went_down.set()
        for b in self._buckets:
            b._drop_slots()

    # -- Redis calls ------------------------------------------------------

    async def draw(
        self, bucket: SharedBucket, n: int, *, own: bool = False, ahead: float = 0.0
    ) -> float:
        """Reserve ``n`` slots of ``bucket`` (0: only write its rate); hold until Redis answers.

        Returns the local time of the first slot; ``own``: for one caller, not the queue.
        """
        lo, hi = self._backoff
        delay = lo
        while True:
            await self._up.wait()
            push = bucket._push_rate
            args = (repr(bucket.rate), repr(bucket.margin), repr(bucket.factor), n)
            t0 = self.clock()
            try:
                reply = await self._script(
                    keys=[bucket.key],
                    args=[*args, "1" if push else "0", self._idle_ttl_ms, int(ahead * 1e6)],
                )
            except (RedisError, OSError) as exc:
                self._mark_down(exc)
                # the watcher may find Redis up at once (an error reply): do not spin
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter
                delay = min(hi, delay * 2)
                continue
            t1 = self.clock()
            if push and bucket.rate == float(args[0]):
                bucket._push_rate = False
            self.roundtrips += 1
            self.slots_drawn += n
            if self.on_roundtrip is not None:
                self.on_roundtrip(t1 - t0)
            offset = self._offset(int(reply[0]) / 1e6, t1)
            return bucket._accept(float(reply[1]), float(reply[2]), float(reply[3]), n, offset, own)

    def push_rate(self, bucket: SharedBucket) -> None:
        """Write ``bucket``'s rate to Redis now (in the background, holding while down)."""
        task = asyncio.create_task(self.draw(bucket, 0), name=f"push-rate-{bucket.name}")
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)

    def _offset(self, redis_now: float, local_after: float) -> float:
        """Redis time minus local time, as low as it may be: slots map late, never early.

        Redis read its clock before ``local_after``, so ``redis_now - local_after`` is a
        lower bound of the offset; the highest recent bound is the tightest.
        """
        offsets = self._offsets  # decreasing offsets, oldest first: the highest is first
        offset = redis_now - local_after
        while offsets and offsets[-1][1] <= offset:
            offsets.pop()
        offsets.append((local_after, offset))
        while offsets[0][0] < local_after - _OFFSET_WINDOW_S:
            offsets.popleft()
        return offsets[0][1]

    async def _ping(self) -> bool:
        assert self._redis is not None  # noqa: S101 - start() made it
        try:
            sec, usec = await self._redis.time()
        except (RedisError, OSError) as exc:
            self._mark_down(exc)
            return False
        self._offset(sec + usec / 1e6, self.clock())
        self._mark_up()
        return True

    async def _watch(self) -> None:
        """Ping while up (to notice an outage while idle); reconnect with back-off while down."""
        lo, hi = self._backoff
        delay = lo
        while True:
            if self._up.is_set():
                await wait_within(self._went_down.wait(), self._ping_interval_s)
                if self._up.is_set() and await self._ping():
                    continue
            if await self._ping():
                delay = lo
                continue
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter
            delay = min(hi, delay * 2)
