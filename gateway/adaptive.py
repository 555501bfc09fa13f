"""Adaptive rates: slow down the bucket whose scope Sinch says is over its limit.

A 429 means the real limit is lower than the configured one: a channel limit,
another client of the same project, an app queue that is full. The pattern tells
the scopes apart: 429s from several apps within a second point at the project,
429s from one app point at that app. The bucket of that scope is slowed down
multiplicatively (at most once per ``cooldown_s``, so that a burst of answers to
requests already in flight counts once), and recovers additively once no 429 has
come for ``quiet_s``, up to its configured rate. All senders slow down together
instead of each retrying on its own. A lone 429 is not a pattern (a little arrival
jitter at Sinch can cause one): a scope is cut from its ``confirm``-th 429 within
``window_s`` on.

The cut is twice the share of the scope's sends of the last ``window_s`` that
Sinch refused, and at most ``1 - decrease`` (DCTCP cuts its window by the share
of marked packets): two 429s among 780 sends, arrival jitter at a strict window,
cost half a percent for a few seconds, not 30 %; a cap 15 % or more below the
pace is met by ``decrease``. The cut at the ``confirm``-th 429 counts only the
429s come so far, so a sudden large drop is met from ``cooldown_s`` later on:
with the cap 20 % below the pace (``benchmarks.drain`` mix (c), the gateway told
1,000/s), 515-533 429s and efficiency 0.92-0.93 against the cap, where a fixed
cut to ``decrease`` at the second 429 drew 237-249 and reached 0.85-0.86.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.aio import wait_within
from gateway.lanes import AnyBucket as Bucket

if TYPE_CHECKING:
    from gateway.lanes import Lane


class AdaptiveRates:
    def __init__(
        self,
        project: Bucket,
        clock: Callable[[], float],
        *,
        decrease: float = 0.7,
        step: float = 0.05,
        spread_apps: int = 3,
        window_s: float = 1.0,
        cooldown_s: float = 1.0,
        quiet_s: float = 2.0,
        confirm: int = 2,
    ) -> None:
        self._project = project
        self._clock = clock
        self._decrease = decrease
        self._step = step
        self._spread = spread_apps
        self._window = window_s
        self._cooldown = cooldown_s
        self._quiet = quiet_s
        self._confirm = confirm
        self._refused: dict[Bucket, deque[float]] = {}  # each scope's 429s of the last window
        self._recent: deque[tuple[float, str]] = deque()
        self._last_429: dict[Bucket, float] = {}
        self._last_cut: dict[Bucket, float] = {}

    def scope_of(self, lane: Lane, now: float) -> Bucket:
        recent = self._recent
        recent.append((now, lane.app_id))
        while recent and recent[0][0] < now - self._window:
            recent.popleft()
        apps = {app for _, app in recent}
        return self._project if len(apps) >= self._spread else lane.bucket

    def on_answer(self, lane: Lane, status: int | None) -> None:
        if status != 429:
            return
        now = self._clock()
        bucket = self.scope_of(lane, now)
        self._last_429[bucket] = now
        refused = self._refused.setdefault(bucket, deque())
        refused.append(now)
        while refused[0] < now - self._window:
            refused.popleft()
        if len(refused) < self._confirm:  # a lone 429 is not a pattern
            return
        if now - self._last_cut.get(bucket, float("-inf")) >= self._cooldown:
            self._last_cut[bucket] = now
            # twice the refused share of what the scope sent in the window (the refused
            # were sent too: a send is recorded before its answer comes)
            sent = max(len(refused), bucket.sent_since(now - self._window))
            bucket.slow_down(max(self._decrease, 1.0 - 2.0 * len(refused) / sent))

    def tick(self) -> None:
        """Recover every slowed bucket that has been quiet long enough."""
        now = self._clock()
        for bucket, last in list(self._last_429.items()):
            if now - last < self._quiet:
                continue
            if not bucket.recover(self._step):
                del self._last_429[bucket]
                self._last_cut.pop(bucket, None)
                self._refused.pop(bucket, None)

    async def run(self, stop: asyncio.Event, interval_s: float = 0.5) -> None:
        while not stop.is_set():
            await wait_within(stop.wait(), interval_s)
            self.tick()
