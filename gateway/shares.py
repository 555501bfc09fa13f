"""Shares of the project cap when it binds: fair to every app, fastest for the whole backlog.

When the busy apps together may send more than the project's cap, each gets:

1. a floor of 90 % of its max-min fair share, weighted by its own rate (an app
   that bought 100/s weighs five times one at 20/s; no share above an app's
   own rate, the rest shared again among the others: water-filling);
2. then what is left of the cap, to the apps whose backlog takes longest to
   drain at their own rate, each up to its own rate.

When the backlogs would drain together anyway (the longest drain within
``SPREAD`` of the shortest), the project bucket's round robin is left to share
the cap: it is max-min fair and costs no ceilings.

The first rule keeps every app moving; the second makes the backlog as a whole
drain in the least time Sinch allows: the app that would finish last is the one
held back least. :func:`allocate` is the pure rule; :class:`Shares` applies it
to the lanes every ``interval_s`` as a ceiling on each busy app's pace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from gateway.aio import wait_within

FLOOR = 0.9
SPREAD = 1.25  # shares apply when the longest drain is this much over the shortest


@dataclass(frozen=True, slots=True)
class Demand:
    """A busy app: its own rate and its backlog (records waiting, memory and spill)."""

    app_id: str
    rate: float
    backlog: int


def weighted_fair(cap: float, rates: Mapping[str, float]) -> dict[str, float]:
    """Max-min fair shares of ``cap``, weighted by rate, none above its own rate."""
    shares: dict[str, float] = {}
    active = {app: rate for app, rate in rates.items() if rate > 0}
    left = cap
    while active:
        weight = sum(active.values())
        capped = {app: rate for app, rate in active.items() if left * rate / weight >= rate}
        if not capped:
            for app, rate in active.items():
                shares[app] = left * rate / weight
            break
        for app, rate in capped.items():
            shares[app] = rate
            left -= rate
            del active[app]
    return shares


def allocate(cap: float, demands: Iterable[Demand], floor: float = FLOOR) -> dict[str, float]:
    """Each busy app's rate when their rates add up to more than ``cap``.

    Returns ``{}`` when the cap does not bind: every app then sends at its own rate.
    """
    busy = [d for d in demands if d.rate > 0 and d.backlog > 0]
    if sum(d.rate for d in busy) <= cap:
        return {}
    drains = sorted(d.backlog / d.rate for d in busy)
    if drains[-1] <= SPREAD * drains[0]:
        # backlogs that drain together already: the project bucket's round robin
        # (max-min) serves them as well, without ceilings to keep up
        return {}
    fair = weighted_fair(cap, {d.app_id: d.rate for d in busy})
    given = {d.app_id: floor * fair[d.app_id] for d in busy}
    left = cap - sum(given.values())
    for d in sorted(busy, key=lambda d: (-d.backlog / d.rate, d.app_id)):
        if left <= 0:
            break
        extra = min(d.rate - given[d.app_id], left)
        given[d.app_id] += extra
        left -= extra
    return given


class Shares:
    """Applies :func:`allocate` to the lanes' app buckets as a ceiling on their pace.

    ``groups()`` gives, for each Sinch project, its cap and its busy apps' demands.
    """

    def __init__(
        self,
        *,
        groups: Callable[[], Iterable[tuple[float, list[Demand]]]],
        apply: Callable[[dict[str, float]], None],
        interval_s: float = 0.1,
    ) -> None:
        self._groups = groups
        self._apply = apply
        self._interval = interval_s
        self._applied = False  # the last step gave some app a share

    def step(self) -> dict[str, float]:
        shares: dict[str, float] = {}
        for cap, demands in self._groups():
            shares.update(allocate(cap, demands))
        if shares or self._applied:  # no shares after none: every lane is as it was
            self._apply(shares)
        self._applied = bool(shares)
        return shares

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.step()
            await wait_within(stop.wait(), self._interval)
