"""Per-app lanes: a queue per app, drained by its own worker at its own rate.

A record of an app at its limit must not hold up the records of other apps that
share its partition, so intake routes every request to its app's lane and
returns at once. Each lane's worker takes the next request (a due retry first,
then high, normal, low priority; arrival order otherwise), waits for its
rate-limit slots and an in-flight permit, and hands it to the sender without
waiting for the answer: lanes never block each other, and one lane can have
``rate x latency`` requests in flight.

Memory is bounded by the intake's record budget, not here: lanes accept what
intake gives them.

A request of a revoked partition is never sent: the worker checks once its
slots are granted and hands it back instead (the partition's next owner sends it).

Operators' controls (:mod:`gateway.controls`): a lane *held* by an operator takes no
request and no slot until it is released; the one its worker holds when the hold
comes goes back to the front of its queue once its slots are granted, so nothing is
sent after the hold and the order is kept. :meth:`Lanes.cancel` takes the queued
requests an operator drops (and the one waiting for its slots), and ``screen``
names the requests that are dropped as they arrive; both end through
``on_cancel``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, cast

from gateway.aio import cancel_and_wait, wait_within
from gateway.envelope import Request
from gateway.limiter import Bucket, acquire, hold_window, record_if_clear
from gateway.offsets import PartitionTracker
from gateway.shared_limiter import SharedBucket

log = logging.getLogger(__name__)

Sender = Callable[[Request, "Lane"], Coroutine[Any, Any, None]]
AnyBucket = Bucket | SharedBucket  # local, or drawn from the group's limiter in Redis
_seq = itertools.count()


class Lane:
    """The queue of one app, with its retries and its pause state."""

    __slots__ = (
        "_queues",
        "_retries",
        "_wakeup",
        "ahead",
        "app_id",
        "bucket",
        "current",
        "current_cancelled",
        "depth",
        "held",
        "in_flight",
        "pause_reason",
        "paused_until",
        "project",
        "worker",
    )

    def __init__(self, app_id: str, bucket: AnyBucket, project: str | None = None) -> None:
        self.app_id = app_id
        self.bucket = bucket
        self.project = project  # the Sinch project of its requests (None: the default one)
        self._queues: tuple[deque[Request], ...] = (deque(), deque(), deque())
        self._retries: list[tuple[float, int, Request]] = []
        self._wakeup: asyncio.Future[None] | None = None
        self.depth = 0
        self.paused_until = 0.0
        self.pause_reason = ""
        self.held: str | None = None  # an operator's hold, and why
        self.current: Request | None = None  # taken by the worker, waiting for its slots
        self.current_cancelled: str | None = None  # dropped meanwhile, and why
        self.in_flight = 0
        # how far ahead of other apps queued for the project's slots it may go (seconds):
        # set while the shares give it its whole rate (the backlog that drains last)
        self.ahead = 0.0
        self.worker: asyncio.Task[None] | None = None

    def put(self, req: Request) -> None:
        self._queues[req.priority].append(req)
        self.depth += 1
        self._wake()

    def put_retry(self, req: Request, due: float) -> None:
        heapq.heappush(self._retries, (due, next(_seq), req))
        self.depth += 1
        self._wake()

    def pause(self, until: float, reason: str) -> None:
        self.paused_until = until
        self.pause_reason = reason

    def hold(self, reason: str | None) -> None:
        """An operator's hold (``None`` releases it): no request leaves the lane meanwhile."""
        self.held = reason
        self._wake()

    def put_front(self, req: Request) -> None:
        """Back at the head of its priority's queue (taken, then held before sending)."""
        self._queues[req.priority].appendleft(req)
        self.depth += 1
        self._wake()

    def queued(self) -> tuple[tuple[int, int, int], int]:
        """Requests waiting: (high, normal, low) and retries."""
        high, normal, low = self._queues
        return (len(high), len(normal), len(low)), len(self._retries)

    def waiting(self) -> list[Request]:
        """Every request waiting in the lane, retries included (a copy)."""
        return [r for q in self._queues for r in q] + [e[2] for e in self._retries]

    def drop(self, keep: Callable[[Request], bool]) -> list[Request]:
        """Remove and return the requests, queued or retrying, for which ``keep`` is False."""
        dropped = self.take_queued(lambda r: not keep(r))
        retried: list[Request] = []
        retries: list[tuple[float, int, Request]] = []
        for entry in self._retries:
            if keep(entry[2]):
                retries.append(entry)
            else:
                retried.append(entry[2])
        heapq.heapify(retries)
        self._retries = retries
        self.depth -= len(retried)
        return dropped + retried

    def take_queued(self, select: Callable[[Request], bool]) -> list[Request]:
        """Remove and return the queued (not retrying) requests ``select`` picks, in order."""
        taken: list[Request] = []
        for q in self._queues:
            kept: list[Request] = []
            for r in q:
                (taken if select(r) else kept).append(r)
            q.clear()
            q.extend(kept)
        self.depth -= len(taken)
        return taken

    def _wake(self) -> None:
        fut = self._wakeup
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def get(self, clock: Callable[[], float]) -> Request:
        """The next request that may go now; waits for one (or for a retry to be due)."""
        while True:
            now = clock()
            timeout: float | None = None
            if self.held is not None:
                pass  # until released: hold() wakes the worker
            elif self.paused_until > now:
                timeout = self.paused_until - now
            else:
                if self._retries:
                    due = self._retries[0][0]
                    if due <= now:
                        self.depth -= 1
                        return heapq.heappop(self._retries)[2]
                    timeout = due - now
                for q in self._queues:
                    if q:
                        self.depth -= 1
                        return q.popleft()
            self._wakeup = asyncio.get_running_loop().create_future()
            try:
                if timeout is None:
                    await self._wakeup
                else:
                    await wait_within(self._wakeup, timeout)
            finally:
                self._wakeup = None


class Lanes:
    """All lanes, their workers, and the shared project bucket and in-flight cap."""

    def __init__(
        self,
        *,
        project_bucket: AnyBucket,
        make_app_bucket: Callable[[str, str | None], AnyBucket],
        channel_buckets: Mapping[str, AnyBucket],
        max_in_flight: int,
        sender: Sender,
        clock: Callable[[], float],
        on_wait: Callable[[float], None] | None = None,
        expired: Callable[[Request], bool] | None = None,
        on_expired: Callable[[Request], None] | None = None,
        gate: Callable[[Request], Awaitable[None]] | None = None,
        ready: Callable[[Request], bool] | None = None,
        project_buckets: Mapping[str, AnyBucket] | None = None,
        hand_back: Callable[[Request], None] | None = None,
    ) -> None:
        self.project_bucket = project_bucket
        # the other Sinch projects' buckets, by project_id (a record's own project_id)
        self.project_buckets: Mapping[str, AnyBucket] = project_buckets or {}
        self._make_app_bucket = make_app_bucket
        self.channel_buckets = channel_buckets
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self.max_in_flight = max_in_flight
        self._sender = sender
        self._clock = clock
        self._on_wait = on_wait
        self._expired = expired
        self._on_expired = on_expired
        self._gate = gate
        self._ready = ready  # True: the gate would let the request through at once
        self._hand_back = hand_back
        self.lanes: dict[str, Lane] = {}
        self.holds: dict[str, str] = {}  # app_id -> an operator's hold, lane or not yet
        # an operator's drop rules: why a request is cancelled on arrival (None: it is not)
        self.screen: Callable[[Request], str | None] | None = None
        self.on_cancel: Callable[[Request, str], None] | None = None
        self._tasks: dict[asyncio.Task[None], PartitionTracker | None] = {}  # send -> read from
        # every bucket but the apps' is local: a lane with a local bucket needs no shared slot
        self._local = all(
            isinstance(b, Bucket)
            for b in (project_bucket, *self.project_buckets.values(), *channel_buckets.values())
        )
        self._closed = False
        self.in_flight = 0

    def lane(self, app_id: str, project: str | None = None) -> Lane:
        """The lane of ``app_id`` (made on first use, in the Sinch project given)."""
        lane = self.lanes.get(app_id)
        if lane is None:
            bucket = self._make_app_bucket(app_id, project)
            lane = self.lanes[app_id] = Lane(app_id, bucket, project)
            lane.held = self.holds.get(app_id)
            lane.worker = asyncio.create_task(self._work(lane), name=f"lane-{app_id}")
        return lane

    def put(self, req: Request) -> None:
        screen = self.screen
        if screen is not None and self.on_cancel is not None:
            reason = screen(req)
            if reason is not None:
                self.on_cancel(req, reason)
                return
        self.lane(req.app_id, req.project_id).put(req)

    def hold(self, app_id: str, reason: str | None) -> None:
        """Hold ``app_id``'s lane (now, or when it is made); ``None`` releases it."""
        if reason is None:
            self.holds.pop(app_id, None)
        else:
            self.holds[app_id] = reason
        lane = self.lanes.get(app_id)
        if lane is not None:
            lane.hold(reason)

    def cancel(self, select: Callable[[Request], bool], reason: str) -> int:
        """End every waiting request ``select`` picks through ``on_cancel``; how many.

        Retries count, and so does a request a worker took and that waits for its
        slots; requests already handed to the sender do not.
        """
        on_cancel = self.on_cancel
        if on_cancel is None:
            return 0
        n = 0
        for lane in self.lanes.values():
            for req in lane.drop(lambda r: not select(r)):
                on_cancel(req, reason)
                n += 1
            current = lane.current
            if current is not None and lane.current_cancelled is None and select(current):
                lane.current_cancelled = reason
                n += 1
        return n

    def project_for(self, req: Request) -> AnyBucket:
        if req.project_id is None:
            return self.project_bucket
        return self.project_buckets.get(req.project_id, self.project_bucket)

    @property
    def depth(self) -> int:
        return sum(lane.depth for lane in self.lanes.values())

    async def _work(self, lane: Lane) -> None:
        clock = self._clock
        channels = self.channel_buckets
        # the loop's own create_task and current_task(loop): asyncio's module functions
        # look the running loop up, a getpid() system call each on Python 3.11
        loop = asyncio.get_running_loop()
        while True:
            req = await lane.get(clock)
            if self._expired is not None and self._expired(req):
                if self._on_expired is not None:
                    self._on_expired(req)
                continue
            lane.current, lane.current_cancelled = req, None
            await self._in_flight.acquire()
            if self._gate is not None and (self._ready is None or not self._ready(req)):
                # e.g. a valid token is at hand: nothing may stand between slot and wire
                await self._gate(req)
            project = self.project_for(req)
            chan = channels.get(req.channel) if req.channel and channels else None
            buckets = (lane.bucket, chan, project) if chan else (lane.bucket, project)
            local = self._local and isinstance(lane.bucket, Bucket)
            waited = await acquire(buckets, clock, guard=not local, ahead=lane.ahead)
            if self._on_wait is not None:
                self._on_wait(waited)
            lane.current = None
            origin = req.origin
            if origin is not None and origin.tracker.revoked:
                self._in_flight.release()
                if self._hand_back is not None:
                    self._hand_back(req)
                continue
            if lane.current_cancelled is not None or lane.held is not None:
                self._in_flight.release()
                if lane.current_cancelled is None:
                    lane.put_front(req)  # held while it waited: nothing goes out after a hold
                elif self.on_cancel is not None:
                    self.on_cancel(req, lane.current_cancelled)
                continue
            self.in_flight += 1
            lane.in_flight += 1
            guarded = cast("tuple[Bucket, ...]", buckets) if local else ()
            task = loop.create_task(self._send(req, lane, guarded, loop))
            self._tasks[task] = origin.tracker if origin is not None else None

    async def _send(
        self,
        req: Request,
        lane: Lane,
        guarded: Sequence[Bucket],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        try:
            # the window guard at the moment of sending, not of the slot
            if guarded and not record_if_clear(guarded, self._clock()):
                await hold_window(guarded, self._clock)
            await self._sender(req, lane)
        except Exception:
            # never lose a request: it goes back to its lane and takes a slot again
            log.exception("sender failed for request_id=%s; retrying it", req.request_id)
            lane.put_retry(req, self._clock() + 1.0)
        finally:
            self.in_flight -= 1
            lane.in_flight -= 1
            self._in_flight.release()
            self._tasks.pop(asyncio.current_task(loop), None)  # type: ignore[arg-type]

    async def stop_workers(self) -> None:
        """Stop taking new requests from the lanes (in-flight sends go on)."""
        await cancel_and_wait([lane.worker for lane in self.lanes.values()])
        for lane in self.lanes.values():
            lane.worker = None

    async def wait_in_flight(
        self, timeout: float, trackers: set[PartitionTracker] | None = None
    ) -> bool:
        """Wait until every started send (of records read from ``trackers``) has finished.

        False on timeout.
        """
        tasks = {t for t, p in self._tasks.items() if trackers is None or p in trackers}
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, timeout))
        return not pending

    async def close(self) -> None:
        await self.stop_workers()
        await cancel_and_wait(list(self._tasks))
