"""Operators' controls of the lanes: pause an app, override its rate, drop its requests.

The admin API (:mod:`gateway.admin_api`) changes them; :class:`Controls` keeps
them in a :class:`Store` and applies them to this replica through a
:class:`Target`. Without Redis the store is this process's own (``scope``
``local``); with ``redis_url`` it is one hash per consumer group in Redis
(``scope`` ``group``), read every ``poll_s`` by every replica, so a control set
on one replica applies on all of them within a second.

- **pause**: the app's lane takes no request and no slot until resumed; its
  queued requests stay (their offsets are not committed past them).
- **rate**: the app's rate in force until cleared or until ``until`` (wall-clock
  seconds, shared by the replicas); it takes precedence over the configured and
  Sinch's rates, and on expiry the rate they give comes back.
- **drop**: the waiting requests of an app, of a campaign, or of a campaign of one
  app, are cancelled once on each replica when it first sees the rule. A rule
  with ``until`` also cancels the matching requests that reach a lane while it is
  in force (read from the requests topic, or back from the spill topic); one
  without is kept in the store for ``DROP_SEEN_S`` so that every replica sees it,
  and covers nothing read later.

Expiry is wall-clock time (``time.time()``): the only clock replicas share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson

from gateway.aio import wait_within
from gateway.envelope import Request

if TYPE_CHECKING:
    from gateway.lanes import Lanes

log = logging.getLogger(__name__)

Scope = Literal["local", "group"]
DROP_SEEN_S = 30.0  # a one-off drop stays in the store this long, for every replica to see
POLL_S = 0.25


class ControlError(ValueError):
    """A control that cannot be applied (its message names what is wrong)."""


class StoreUnavailable(Exception):
    """The shared store did not answer: the control was not changed."""


@dataclass(frozen=True, slots=True)
class Pause:
    reason: str
    by: str
    at: float


@dataclass(frozen=True, slots=True)
class RateOverride:
    rate: float
    until: float | None  # wall-clock seconds; None: until cleared
    by: str
    at: float


@dataclass(frozen=True, slots=True)
class DropRule:
    id: str
    app_id: str | None
    campaign: str | None
    until: float | None  # wall-clock: cancels arriving requests until then; None: queued only
    by: str
    at: float
    keep_until: float = 0.0  # the store forgets the rule after this

    def matches(self, req: Request) -> bool:
        return (self.app_id is None or req.app_id == self.app_id) and (
            self.campaign is None or req.campaign == self.campaign
        )

    def describe(self) -> str:
        parts = [f"app {self.app_id}"] if self.app_id else []
        if self.campaign:
            parts.append(f"campaign {self.campaign}")
        return " and ".join(parts)


@dataclass(slots=True)
class State:
    """The controls in force: what the store holds, parsed; expired ones left out."""

    pauses: dict[str, Pause] = field(default_factory=dict)
    rates: dict[str, RateOverride] = field(default_factory=dict)
    drops: dict[str, DropRule] = field(default_factory=dict)

    @classmethod
    def parse(cls, fields: dict[str, bytes], now: float) -> tuple[State, list[str]]:
        """The state the store's fields describe at ``now``, and the fields past their expiry."""
        state = cls()
        stale: list[str] = []
        for name, raw in fields.items():
            kind, _, key = name.partition(":")
            try:
                doc = orjson.loads(raw)
                if kind == "pause":
                    state.pauses[key] = Pause(**doc)
                elif kind == "rate":
                    override = RateOverride(**doc)
                    if override.until is not None and override.until <= now:
                        stale.append(name)
                    else:
                        state.rates[key] = override
                elif kind == "drop":
                    rule = DropRule(**doc)
                    if rule.keep_until <= now:
                        stale.append(name)
                    else:
                        state.drops[key] = rule
            except (orjson.JSONDecodeError, TypeError):
                log.warning("control %s in the store is unreadable; ignored", name)
        return state, stale


class Store(Protocol):
    """Where the controls live: field name -> JSON document."""

    scope: Scope

    async def load(self) -> dict[str, bytes]: ...

    async def put(self, name: str, value: bytes) -> None: ...

    async def delete(self, *names: str) -> None: ...


class LocalStore:
    """This process's own controls."""

    scope: Scope = "local"

    def __init__(self) -> None:
        self.fields: dict[str, bytes] = {}

    async def load(self) -> dict[str, bytes]:
        return dict(self.fields)

    async def put(self, name: str, value: bytes) -> None:
        self.fields[name] = value

    async def delete(self, *names: str) -> None:
        for name in names:
            self.fields.pop(name, None)


class RedisStore:
    """The group's controls: one Redis hash per consumer group."""

    scope: Scope = "group"

    def __init__(self, redis: Any, key: str) -> None:
        self._redis = redis
        self.key = key

    async def load(self) -> dict[str, bytes]:
        from redis.exceptions import RedisError

        try:
            raw = await self._redis.hgetall(self.key)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(type(exc).__name__) from exc
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}

    async def put(self, name: str, value: bytes) -> None:
        from redis.exceptions import RedisError

        try:
            await self._redis.hset(self.key, name, value)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(type(exc).__name__) from exc

    async def delete(self, *names: str) -> None:
        from redis.exceptions import RedisError

        try:
            await self._redis.hdel(self.key, *names)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(type(exc).__name__) from exc


class Target(Protocol):
    """What the controls act on: this replica's lanes and buckets."""

    def paused(self, app_id: str, pause: Pause | None) -> None: ...

    def rate_changed(self, app_id: str) -> None: ...

    def drop(self, rule: DropRule) -> int: ...


def _check_app(app_id: str) -> str:
    if not isinstance(app_id, str) or not app_id or len(app_id) > 128:
        raise ControlError("app_id: expected a string of 1 to 128 characters")
    return app_id


def _check_for_s(for_s: float | None) -> float | None:
    if for_s is None:
        return None
    if isinstance(for_s, bool) or not isinstance(for_s, int | float):
        raise ControlError("for_s: expected a number of seconds")
    if not (math.isfinite(for_s) and 0 < for_s <= 30 * 86400):
        raise ControlError("for_s: expected seconds in (0, 2592000]")
    return float(for_s)


class Controls:
    """The controls in force on this replica, kept in step with the store."""

    def __init__(
        self,
        store: Store,
        target: Target,
        *,
        wall: Callable[[], float] = time.time,
        poll_s: float = POLL_S,
    ) -> None:
        self.store = store
        self._target = target
        self._wall = wall
        self._poll_s = poll_s
        self.state = State()
        self._applied: set[str] = set()  # drop rules applied here
        self._active: list[DropRule] = []  # rules that cancel arriving requests
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._store_down = False

    @property
    def scope(self) -> Scope:
        return self.store.scope

    # -- what the rest of the gateway asks -------------------------------------

    def rate_override(self, app_id: str) -> RateOverride | None:
        return self.state.rates.get(app_id)

    def screen(self, req: Request) -> str | None:
        """Why ``req`` is cancelled on arrival (a drop rule in force), or None."""
        if not self._active:
            return None
        now = self._wall()
        for rule in self._active:
            if rule.until is not None and rule.until > now and rule.matches(req):
                return f"dropped by {rule.by} ({rule.describe()})"
        return None

    # -- changes -----------------------------------------------------------------

    async def pause(self, app_id: str, reason: str, by: str) -> Pause:
        pause = Pause(reason=reason or "paused by an operator", by=by, at=self._wall())
        await self._put(f"pause:{_check_app(app_id)}", asdict(pause))
        return pause

    async def resume(self, app_id: str, by: str) -> bool:
        """True if the app was paused."""
        was = _check_app(app_id) in self.state.pauses
        await self._delete(f"pause:{app_id}")
        return was

    async def set_rate(
        self, app_id: str, rate: float, for_s: float | None, by: str
    ) -> RateOverride:
        if isinstance(rate, bool) or not isinstance(rate, int | float):
            raise ControlError("rate: expected a number of requests per second")
        if not (math.isfinite(rate) and 0 < rate <= 100_000):
            raise ControlError("rate: expected requests per second in (0, 100000]")
        for_s = _check_for_s(for_s)
        now = self._wall()
        until = None if for_s is None else now + for_s
        override = RateOverride(rate=float(rate), until=until, by=by, at=now)
        await self._put(f"rate:{_check_app(app_id)}", asdict(override))
        return override

    async def clear_rate(self, app_id: str, by: str) -> bool:
        """True if the app had an override."""
        was = _check_app(app_id) in self.state.rates
        await self._delete(f"rate:{app_id}")
        return was

    async def drop(
        self, app_id: str | None, campaign: str | None, for_s: float | None, by: str
    ) -> tuple[DropRule, int]:
        """Add a drop rule; returns it and how many waiting requests it cancelled here."""
        if app_id is None and campaign is None:
            raise ControlError("give app_id, campaign or both")
        if app_id is not None:
            _check_app(app_id)
        if campaign is not None and (
            not isinstance(campaign, str) or not campaign or len(campaign) > 128
        ):
            raise ControlError("campaign: expected a string of 1 to 128 characters")
        for_s = _check_for_s(for_s)
        now = self._wall()
        until = None if for_s is None else now + for_s
        rule = DropRule(
            id=uuid.uuid4().hex[:12],
            app_id=app_id,
            campaign=campaign,
            until=until,
            by=by,
            at=now,
            keep_until=max(until or 0.0, now + DROP_SEEN_S),
        )
        await self._put(f"drop:{rule.id}", asdict(rule), refresh=False)
        async with self._lock:
            cancelled = self._apply_drop(rule)
        await self.refresh()
        return rule, cancelled

    async def _put(self, name: str, doc: dict[str, Any], *, refresh: bool = True) -> None:
        await self.store.put(name, orjson.dumps(doc))
        if refresh:
            await self.refresh()

    async def _delete(self, name: str) -> None:
        await self.store.delete(name)
        await self.refresh()

    # -- keeping in step -------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the store and apply what changed (expired controls end here too)."""
        async with self._lock:
            try:
                fields = await self.store.load()
            except StoreUnavailable as exc:
                if not self._store_down:
                    log.warning("controls: the store does not answer (%s); keeping the last", exc)
                    self._store_down = True
                fields = None
            if fields is not None:
                if self._store_down:
                    log.info("controls: the store answers again")
                    self._store_down = False
                state, stale = State.parse(fields, self._wall())
                if stale:
                    with contextlib.suppress(StoreUnavailable):
                        await self.store.delete(*stale)
            else:  # the last state known, without what expired since
                state = self._expire(self.state)
            self._apply(state)

    def _expire(self, old: State) -> State:
        now = self._wall()
        rates = {k: v for k, v in old.rates.items() if v.until is None or v.until > now}
        drops = {k: v for k, v in old.drops.items() if v.keep_until > now}
        return State(dict(old.pauses), rates, drops)

    def _apply(self, new: State) -> None:
        old, self.state = self.state, new
        target = self._target
        for app_id in old.pauses.keys() | new.pauses.keys():
            before, after = old.pauses.get(app_id), new.pauses.get(app_id)
            if before != after:
                if after is None:
                    log.info("app %s resumed", app_id)
                else:
                    log.info("app %s paused by %s: %s", app_id, after.by, after.reason)
                target.paused(app_id, after)
        for app_id in old.rates.keys() | new.rates.keys():
            before_r, after_r = old.rates.get(app_id), new.rates.get(app_id)
            if before_r != after_r:
                if after_r is None:
                    log.info("app %s: the operator's rate ended", app_id)
                else:
                    log.info("app %s: rate %.2f/s set by %s", app_id, after_r.rate, after_r.by)
                target.rate_changed(app_id)
        for rule_id, rule in new.drops.items():
            if rule_id not in self._applied:
                self._apply_drop(rule)
        self._applied &= new.drops.keys()
        now = self._wall()
        self._active = [r for r in new.drops.values() if r.until is not None and r.until > now]

    def _apply_drop(self, rule: DropRule) -> int:
        if rule.id in self._applied:
            return 0
        self._applied.add(rule.id)
        n = self._target.drop(rule)
        log.info("drop of %s by %s: %d waiting requests cancelled", rule.describe(), rule.by, n)
        if rule.until is not None and rule.until > self._wall():
            self._active.append(rule)
        return n

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the store every ``poll_s`` until ``stop``."""
        while not stop.is_set():
            await self.refresh()
            await wait_within(stop.wait(), self._poll_s)


class LaneTarget:
    """Applies the controls to this replica's lanes (``follow_rate`` re-paces an app)."""

    def __init__(self, lanes: Lanes, follow_rate: Callable[[str], None]) -> None:
        self._lanes = lanes
        self._follow_rate = follow_rate

    def paused(self, app_id: str, pause: Pause | None) -> None:
        self._lanes.hold(app_id, None if pause is None else pause.reason)

    def rate_changed(self, app_id: str) -> None:
        self._follow_rate(app_id)

    def drop(self, rule: DropRule) -> int:
        return self._lanes.cancel(rule.matches, f"dropped by {rule.by} ({rule.describe()})")
