from __future__ import annotations

from gateway.adaptive import AdaptiveRates
from gateway.lanes import Lane
from gateway.limiter import Bucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def setup() -> tuple[Clock, Bucket, dict[str, Lane], AdaptiveRates]:
    clock = Clock()
    project = Bucket("project:p", 800, clock=clock)
    lanes = {a: Lane(a, Bucket(f"app:{a}", 20, clock=clock)) for a in ("a", "b", "c")}
    return clock, project, lanes, AdaptiveRates(project, clock)


def test_429s_from_one_app_slow_that_app_only_and_once_per_cooldown():
    _clock, project, lanes, rates = setup()
    full = lanes["a"].bucket.pace
    for _ in range(10):  # a burst of answers to requests already in flight
        rates.on_answer(lanes["a"], 429)
    assert lanes["a"].bucket.pace < full * 0.8
    assert lanes["a"].bucket.pace > full * 0.6  # cut once, not ten times
    assert lanes["b"].bucket.pace == full
    assert project.factor == 1.0


def test_429s_across_apps_slow_the_project():
    clock, project, lanes, rates = setup()
    for app in ("a", "b", "c", "a"):
        rates.on_answer(lanes[app], 429)
        clock.now += 0.1
    assert project.factor < 1.0


def test_a_lone_429_is_not_a_pattern():
    clock, _project, lanes, rates = setup()
    full = lanes["a"].bucket.pace
    rates.on_answer(lanes["a"], 429)
    clock.now += 1.5
    rates.on_answer(lanes["a"], 429)
    assert lanes["a"].bucket.pace == full


def test_recovery_is_gradual_and_only_after_a_quiet_spell():
    clock, _project, lanes, rates = setup()
    bucket = lanes["a"].bucket
    full = bucket.pace
    rates.on_answer(lanes["a"], 429)
    rates.on_answer(lanes["a"], 429)
    low = bucket.pace
    assert low < full
    clock.now += 1.0
    rates.tick()
    assert bucket.pace == low  # not quiet long enough
    clock.now += 1.5
    rates.tick()
    assert low < bucket.pace < full
    for _ in range(20):
        clock.now += 0.5
        rates.tick()
    assert bucket.pace == full
    rates.on_answer(lanes["a"], 200)
    assert bucket.pace == full


def test_a_cut_is_the_share_of_the_scopes_recent_sends_that_sinch_refused():
    """Two 429s among 780 sends of the last second (arrival jitter at a strict window) cut
    the project by twice their share, half a percent; 2 of an app's 20 by a fifth; a scope
    that sent nothing else is cut by ``decrease``."""
    clock, project, lanes, rates = setup()
    for i in range(780):
        project.record(clock.now - 0.9 + i * 0.9 / 780)
    for app in ("a", "b", "c", "a"):  # the project's from the third app on
        rates.on_answer(lanes[app], 429)
    assert project.factor == 1.0 - 2 * 2 / 780
    app = lanes["b"].bucket
    clock.now += 3.0
    for i in range(20):
        app.record(clock.now - 0.95 + i * 0.045)
    rates.on_answer(lanes["b"], 429)
    rates.on_answer(lanes["b"], 429)
    assert app.factor == 0.8
    rates.on_answer(lanes["c"], 429)
    rates.on_answer(lanes["c"], 429)
    assert lanes["c"].bucket.factor == 0.7
