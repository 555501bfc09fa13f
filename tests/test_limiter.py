from __future__ import annotations

import asyncio
import math
import random

import pytest

from gateway.limiter import LATE_S, ROUNDING_S, TICK_S, Bucket, acquire, hold_window


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def count_sleeps(monkeypatch) -> list[int]:
    """Count the calls of asyncio.sleep from now on (in the one-element list returned)."""
    counted = [0]
    real_sleep = asyncio.sleep

    async def counting_sleep(delay, result=None):
        counted[0] += 1
        return await real_sleep(delay, result)

    monkeypatch.setattr(asyncio, "sleep", counting_sleep)
    return counted


def max_in_window(times: list[float], window: float = 1.0) -> int:
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def test_paced_slots_never_exceed_the_rate_in_any_window_even_after_idle():
    clock = Clock()
    b = Bucket("app:a", 20, burst=1, margin=0.01, clock=clock)
    slots = [b.reserve() for _ in range(100)]
    clock.now = slots[-1] + 5  # idle, then a new burst of demand
    slots += [b.reserve() for _ in range(100)]
    assert max_in_window(slots) <= 20
    steady = slots[1:100]
    rate = (len(steady) - 1) / (steady[-1] - steady[0])
    assert 19.7 <= rate <= 20.0


def test_project_burst_goes_at_once_then_paces():
    clock = Clock()
    b = Bucket("project:p", 800, burst=8, margin=0.01, clock=clock)
    slots = [b.reserve() for _ in range(4000)]
    assert slots[7] == slots[0]  # the burst goes at once
    assert slots[8] > slots[0]
    assert abs(b.pace - 792) < 1e-6


def test_a_caller_held_up_elsewhere_catches_up_within_its_burst():
    clock = Clock()
    b = Bucket("app:a", 20, burst=2, margin=0.02, clock=clock)
    first = b.reserve()
    clock.now = first + 3 * b.interval  # held up in another bucket for two slots
    late = [b.reserve() for _ in range(3)]
    assert late[0] == clock.now
    assert late[1] == clock.now  # one missed slot made up at once
    assert late[2] > late[1]


async def test_acquire_keeps_every_window_under_the_rate_whatever_the_burst():
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    b = Bucket("app:a", 10, burst=5, margin=0.02, clock=loop.time)
    sends = []
    for _ in range(25):
        await acquire([b], loop.time)
        sends.append(loop.time() - t0)
    assert max_in_window(sends) <= 10
    assert sends[4] - sends[0] < 0.05  # the burst went at once


def test_late_callers_do_not_lose_rate():
    clock = Clock()
    b = Bucket("app:a", 50, clock=clock)
    slots = []
    for _ in range(200):
        at = b.reserve()
        clock.now = max(clock.now, at) + 0.0005  # each wake-up 0.5 ms late
        slots.append(at)
    rate = (len(slots) - 1) / (slots[-1] - slots[0])
    assert rate >= 49.4


def test_window_guard_holds_the_rate_plus_one():
    clock = Clock()
    b = Bucket("app:a", 5, clock=clock)
    for _ in range(5):
        assert b.window_delay(clock.now) == 0
        b.record(clock.now)
        clock.now += 0.01
    assert b.window_delay(clock.now) > 0.9


def test_slow_down_and_recover():
    clock = Clock()
    changes = []
    b = Bucket("app:a", 100, clock=clock, on_change=changes.append)
    full = b.pace
    assert b.slow_down(0.5)
    assert abs(b.pace - full / 2) < 1e-9
    while b.recover(0.1):
        pass
    assert abs(b.pace - full) < 1e-9
    assert len(changes) >= 2


class SlowSharedSlot:
    """A shared bucket in last place whose slot comes after a varying wait."""

    def __init__(self, waits: list[float]) -> None:
        self.waits = waits
        self.held = 0

    async def take(self, ahead: float = 0.0) -> None:
        await asyncio.sleep(self.waits.pop(0) if self.waits else 0.0)

    def window_delay(self, now: float, ahead: int = 0) -> float:
        return 0.0

    def record(self, now: float) -> None:
        return None

    def restamp(self, recorded: float, sent: float) -> None:
        return None


async def test_windows_count_the_real_send_time_after_a_wait_for_a_shared_slot():
    # the first sends wait long for their shared slot, the later ones not at all: the app's
    # window must count when they went, not when its check passed
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    app = Bucket("app:a", 10, burst=1, margin=0.02, clock=loop.time)
    shared = SlowSharedSlot([0.12] * 5)
    sends = []
    for _ in range(25):
        await acquire([app, shared], loop.time)
        sends.append(loop.time() - t0)
    assert max_in_window(sends) <= 10, sends


def test_a_caller_may_go_ahead_of_the_queue_and_the_queue_moves_one_slot_later():
    clock = Clock()
    b = Bucket("project:p", 100, burst=1, margin=0.0, clock=clock)
    queued = [b.reserve() for _ in range(10)]  # ten callers queue: 0.00 .. 0.09 s
    assert abs(queued[-1] - clock.now - 0.09) < 1e-9
    ahead = b.reserve(ahead=0.25)
    assert ahead == clock.now  # goes now, not after the ten
    assert abs(b.reserve() - clock.now - 0.11) < 1e-9  # the next in line: one interval later
    assert b.reserve(ahead=0.05) - clock.now > 0.05  # no further ahead than asked


async def test_callers_held_by_a_full_window_wake_at_their_own_turn(monkeypatch):
    loop = asyncio.get_running_loop()
    b = Bucket("project:p", 50, margin=0.0, clock=loop.time)
    start = loop.time()
    for i in range(50):  # a full window whose sends leave it one every 4 ms, from 50 ms on
        b.record(start - 0.95 + i * 0.004)
    sleeps = count_sleeps(monkeypatch)
    sends = await asyncio.gather(*(hold_window([b], loop.time) for _ in range(20)))
    # each held caller sleeps about once, not once per send that goes before it (210 here)
    assert sleeps[0] <= 2 * 20
    assert b.held == 0
    recorded = [start - 0.95 + i * 0.004 for i in range(50)] + sorted(sends)
    assert max_in_window(recorded, 1.0) <= 50


def test_under_uvloop_a_held_send_sleeps_once_and_never_goes_before_its_turn(monkeypatch):
    # uvloop's timers have a millisecond resolution and fire up to ~1.4 ms early: a send
    # woken before its window frees must not need a second sleep, nor go early
    import time

    import uvloop

    clock = time.monotonic

    async def run() -> list[tuple[float, float]]:
        b = Bucket("project:p", 50, margin=0.0, clock=clock)
        start = clock()
        for i in range(50):  # a full window whose sends leave it one every 7 ms, from 50 ms on
            b.record(start - 0.95 + i * 0.007)
        turns = []
        for _ in range(40):
            due = b.window_delay(clock()) + clock()
            turns.append((due, await hold_window([b], clock)))
        return turns

    sleeps = count_sleeps(monkeypatch)
    loop = uvloop.new_event_loop()
    try:
        turns = loop.run_until_complete(run())
    finally:
        loop.close()
    assert all(sent >= due for due, sent in turns), [due - sent for due, sent in turns]
    assert sleeps[0] <= len(turns)


async def test_a_send_exactly_one_window_after_the_one_it_waits_for_is_not_held(monkeypatch):
    """uvloop's clock counts whole milliseconds: a send often comes exactly one window
    (1 + margin / 2) after the rate-th send before it, and the float sum may then say 2e-16 s
    are left."""
    now = [0.116]
    b = Bucket("project", 1, burst=1, margin=0.02, clock=lambda: now[0])
    b.record(0.116)
    now[0] = 1.126
    assert 0 < b.window_delay(now[0]) < 1e-12  # rounding, not time left
    slept: list[float] = []

    async def fake_sleep(delay: float, result: object = None) -> object:
        slept.append(delay)
        now[0] += delay
        return result

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    assert await hold_window([b], lambda: now[0]) == 1.126
    assert slept == []
    now[0] = 1.125  # a millisecond early is held
    assert b.window_delay(now[0]) > 0.0009


def test_a_steady_drain_at_the_cap_is_not_held_by_the_window_guard():
    """Paced sends wake on the TICK_S grid, LATE_S and some loop latency after their slot:
    the guard lets them all through once the start's burst has left the window (a hold is
    one more timer and wake-up of the event loop for the send)."""
    now = [0.0]
    b = Bucket("project", 800, burst=8, margin=0.02, clock=lambda: now[0])
    rng = random.Random(7)
    slots = [b.reserve() for _ in range(8000)]  # a backlog: the lanes queue for their slots
    woken = sorted(math.ceil(at / TICK_S) * TICK_S + LATE_S + rng.uniform(0, 0.002) for at in slots)
    held = []
    for k, at in enumerate(woken):
        if k >= 1600 and b.window_delay(at) > ROUNDING_S:
            held.append(k)
        b.record(at)
    assert held == [], f"{len(held)} of 6400 held"
    # paced at the cap less the margin: the 8,000 slots take 10.2 s
    assert slots[-1] == pytest.approx(7992 / (800 * 0.98))


async def test_a_held_send_wakes_on_the_tick_grid(monkeypatch):
    """A hold ends with the pacing's wake-ups (LATE_S past a TICK_S step), not in a loop
    iteration of its own, and never before the window has room."""
    now = [0.5]
    b = Bucket("project", 1, burst=1, margin=0.02, clock=lambda: now[0])
    b.record(0.1003)  # the window has room again at 1.1103

    async def fake_sleep(delay: float, result: object = None) -> object:
        now[0] += delay
        return result

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    sent = await hold_window([b], lambda: now[0])
    assert sent >= 1.1103 + LATE_S
    steps = (sent - LATE_S) / TICK_S
    assert steps == pytest.approx(round(steps)), sent
    assert sent - LATE_S - 1.1103 < TICK_S
