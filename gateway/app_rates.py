"""Per-app rates from Sinch, and a slow-down while an app's Sinch queue grows.

Sinch sells each app an outbound rate (``rate_limits.outbound`` of the App
resource, 20/s unless more was bought) and accepts sends above it into the
app's MT ingress queue (``queue_stats.outbound_size``, up to 500,000). A
gateway that sends faster than the queue drains gets 200s, not 429s: the
backlog moves from Kafka, where priority and expiry still work, into Sinch's
queue, where they do not. So :class:`AppRates` reads every active app at start
and every ``app_rate_refresh_s``, and:

- picks the rate in force: a configured ``[apps.ID] rate`` wins, then Sinch's
  ``rate_limits.outbound``, then ``app_rate`` as the fallback while Sinch
  cannot be asked (the reason is logged once per app and condition; a rate
  read once is kept through later failures). ``on_rate`` hears every change.
- reports the queue (``on_queue``) and keeps a *factor* in (0, 1] per app
  (``on_factor``): a queue that grows between two reads while the gateway sends
  at the app's rate drains slower than Sinch reports, so the factor drops below
  what the queue really drains (multiplicative decrease, :func:`next_factor`)
  until the backlog is back in Kafka; once the queue is empty again it climbs
  back to 1 (additive increase). An app whose queue is not empty, or that is
  slowed down, is read every ``app_queue_refresh_s`` instead; so is one whose
  first read (made before it sends, its queue empty) found more records waiting
  in its lane (``backlog``) than it sends in ``app_queue_refresh_s``, to learn
  the trend.

An app is read as soon as it becomes active (:meth:`AppRates.note_app`), at
most ``max_concurrent_reads`` reads at a time. Reads use the shared token
source and the app's region; failed reads back off from ``app_queue_refresh_s``
up to ``app_rate_refresh_s`` (or Sinch's retry hint, if longer).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from gateway.aio import cancel_and_wait, wait_within
from gateway.errors import AuthError, SinchError, TransportError
from gateway.settings import Settings
from gateway.sinch import AppInfo
from gateway.tokens import TokenSource

log = logging.getLogger(__name__)

RateSourceKind = Literal["configured", "sinch", "fallback"]
# Failures that say nothing about one app: logged once for the whole project.
_PROJECT_WIDE = frozenset({"auth", "http_401", "http_403"})


class AppReader(Protocol):
    async def get_app(
        self, *, region: str, project_id: str, app_id: str, authorization: str
    ) -> AppInfo: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class DrainPolicy:
    """How the factor follows the queue (see :func:`next_factor`)."""

    #: the factor never goes below this
    min_factor: float = 0.01
    #: one read cuts the factor to no less than this share of it
    floor: float = 0.5
    #: aim at this share of the estimated drain, so that the queue shrinks
    headroom: float = 0.9
    #: and below it by the backlog over this many seconds, so that it empties
    clear_s: float = 30.0
    #: additive increase per second while the queue is empty
    recover_per_s: float = 0.025
    #: a queue of at most this many seconds of the app's rate counts as empty
    empty_s: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.min_factor <= 1:
            raise ValueError("min_factor: expected a fraction in (0, 1]")
        for name in ("floor", "headroom"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a fraction in (0, 1)")
        for name in ("clear_s", "recover_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a number > 0")
        if not self.empty_s >= 0:
            raise ValueError("empty_s: expected a number >= 0")


_DEFAULT_POLICY = DrainPolicy()


def next_factor(
    prev_size: int,
    size: int,
    interval_s: float,
    rate: float,
    factor: float,
    policy: DrainPolicy | None = None,
) -> float:
    """The factor for an app after two reads of its queue, ``interval_s`` apart.

    The gateway sent at about ``rate * factor`` in between, so the queue drained
    at about ``rate * factor - growth``. While the queue is *empty* (at most
    ``empty_s`` seconds of ``rate``, or one message) the factor recovers by
    ``recover_per_s * interval_s`` up to 1, unless it is filling up (then it
    holds). A queue beyond that cuts the factor to ``headroom`` of the estimated
    drain less ``size / clear_s``, so that the backlog shrinks and goes back to
    Kafka; one read cuts to no less than ``floor`` of the factor, never below
    ``min_factor``, and never raises it while a backlog waits.
    """
    if interval_s <= 0 or rate <= 0 or not math.isfinite(interval_s):
        return factor
    policy = policy or _DEFAULT_POLICY
    if size <= max(1.0, rate * policy.empty_s):
        if size > prev_size and size > 1:
            return factor
        return min(1.0, factor + policy.recover_per_s * interval_s)
    growth = (size - prev_size) / interval_s
    drain = max(0.0, rate * factor - growth)
    target = (policy.headroom * drain - size / policy.clear_s) / rate
    return min(factor, max(target, factor * policy.floor, policy.min_factor))


@dataclass(slots=True)
class _App:
    rate: float
    source: RateSourceKind
    sinch_rate: float | None = None
    factor: float = 1.0
    size: int | None = None
    read_at: float | None = None  # the last read that answered
    due: float = -math.inf
    asked: bool = False
    failures: int = 0
    reading: bool = False
    failing: set[str] = field(default_factory=set)  # failures since the last good read


class AppRates:
    """Reads active apps from Sinch and says which rate and factor each should have.

    ``active_apps()`` names the apps the gateway sends for (those it has lanes
    for); :meth:`note_app` adds one at once and reads it promptly. Callbacks run
    in the event loop, never concurrently:

    - ``on_rate(app_id, rate, source)``: the rate in force changed;
    - ``on_factor(app_id, factor)``: the queue factor changed (send at
      ``rate * factor``, see :meth:`effective_rate`);
    - ``on_queue(app_id, size, limit)``: Sinch's queue of the app, every read;
    - ``on_read(app_id, result)``: ``ok`` or the failure (``auth``,
      ``http_<status>``, ``transport``), every read;
    - ``before_read()`` is awaited before each read (e.g. a slot of the project
      bucket, since app reads count toward the project's 800 requests/s).

    With ``app_rates_from_sinch = false`` nothing is read: the rates are the
    configured ones and ``app_rate``, the factor stays 1.
    """

    def __init__(
        self,
        settings: Settings,
        sinch: AppReader,
        tokens: TokenSource,
        *,
        active_apps: Callable[[], Iterable[str]] = tuple,
        on_rate: Callable[[str, float, RateSourceKind], None] | None = None,
        on_factor: Callable[[str, float], None] | None = None,
        on_queue: Callable[[str, int, int | None], None] | None = None,
        on_read: Callable[[str, str], None] | None = None,
        before_read: Callable[[], Awaitable[object]] | None = None,
        backlog: Callable[[str], int] | None = None,
        project_id: str | None = None,
        policy: DrainPolicy | None = None,
        max_concurrent_reads: int = 4,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if max_concurrent_reads < 1:
            raise ValueError("max_concurrent_reads must be >= 1")
        self._settings = settings
        self._sinch = sinch
        self._tokens = tokens
        self._active_apps = active_apps
        self._on_rate = on_rate
        self._on_factor = on_factor
        self._on_queue = on_queue
        self._on_read = on_read
        self._before_read = before_read
        self._backlog = backlog
        self._project_id = project_id or settings.project_id
        self._policy = policy or DrainPolicy()
        self._max_reads = max_concurrent_reads
        self._clock = clock or asyncio.get_running_loop().time
        self._apps: dict[str, _App] = {}
        self._noted: set[str] = set()
        self._logged: set[tuple[str, str]] = set()
        self._reads: asyncio.Semaphore | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._readers: set[asyncio.Task[None]] = set()

    # -- what the rest of the gateway asks ---------------------------------------

    def rate_for(self, app_id: str) -> float:
        """The rate in force for ``app_id`` (for a bucket made now)."""
        return self._state(app_id).rate

    def source_of(self, app_id: str) -> RateSourceKind:
        return self._state(app_id).source

    def factor_of(self, app_id: str) -> float:
        app = self._apps.get(app_id)
        return 1.0 if app is None else app.factor

    def effective_rate(self, app_id: str) -> float:
        """``rate_for(app_id) * factor_of(app_id)``: what the app's bucket should pace."""
        app = self._state(app_id)
        return app.rate * app.factor

    def queue_size(self, app_id: str) -> int | None:
        """Sinch's queue of ``app_id`` at the last read, None when unknown."""
        app = self._apps.get(app_id)
        return None if app is None else app.size

    def note_app(self, app_id: str) -> None:
        """``app_id`` is active from now on: read it soon, not at the next period."""
        if not self._settings.app_rates_from_sinch:
            return
        self._noted.add(app_id)
        app = self._state(app_id)
        if not app.asked and not app.reading:
            app.due = min(app.due, self._clock())
            self._wake.set()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None and self._settings.app_rates_from_sinch:
            self._reads = asyncio.Semaphore(self._max_reads)
            self._task = asyncio.create_task(self._run(), name="app-rates")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait([task, *self._readers])
        self._readers.clear()

    async def __aenter__(self) -> AppRates:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- reading -----------------------------------------------------------------

    async def refresh(self, app_id: str) -> None:
        """Read ``app_id`` now and apply what Sinch says (the loop calls this)."""
        if self._reads is None:
            self._reads = asyncio.Semaphore(self._max_reads)
        app = self._state(app_id)
        app.reading = app.asked = True
        # provisional: whatever goes wrong below, the app is not read again at once
        app.due = self._clock() + self._settings.app_queue_refresh_s
        try:
            async with self._reads:
                if self._before_read is not None:
                    await self._before_read()
                answer = await self._ask(app_id)
        finally:
            app.reading = False
            self._wake.set()
        if isinstance(answer, AppInfo):
            self._apply(app_id, app, answer)
        else:
            self._failed(app_id, app, *answer)

    async def _run(self) -> None:
        s = self._settings
        while True:
            self._wake.clear()
            now = self._clock()
            readable = self._noted.union(self._active_apps())
            for app_id in readable:
                app = self._state(app_id)
                if not app.reading and app.due <= now:
                    task = asyncio.create_task(self.refresh(app_id), name=f"app-read-{app_id}")
                    app.reading = True
                    self._readers.add(task)
                    task.add_done_callback(self._read_done)
            due = [a.due for k, a in self._apps.items() if k in readable and not a.reading]
            # active_apps() is looked at again within app_queue_refresh_s at the latest
            wait = min([s.app_queue_refresh_s, *(d - now for d in due)])
            await wait_within(self._wake.wait(), wait)

    def _read_done(self, task: asyncio.Task[None]) -> None:
        self._readers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("reading an app from Sinch failed", exc_info=task.exception())

    async def _ask(self, app_id: str) -> AppInfo | tuple[str, float | None]:
        """Sinch's App resource, or (failure, Sinch's retry hint)."""
        read = self._sinch.get_app
        region = self._settings.app_region(app_id)
        project_id = self._project_id
        try:
            authorization = await self._tokens.authorization()
            try:
                return await read(
                    region=region, project_id=project_id, app_id=app_id, authorization=authorization
                )
            except SinchError as exc:
                if not exc.token_expired:
                    raise
                authorization = await self._tokens.renew(authorization)
                return await read(
                    region=region, project_id=project_id, app_id=app_id, authorization=authorization
                )
        except AuthError:
            return "auth", None
        except SinchError as exc:
            return f"http_{exc.status}", exc.retry_after_s
        except TransportError as exc:
            return f"transport_{exc.kind}", None

    # -- applying what was read ----------------------------------------------------

    def _apply(self, app_id: str, app: _App, info: AppInfo) -> None:
        s = self._settings
        now = self._clock()
        app.failures = 0
        self._recovered(app_id, app)
        self._report_read(app_id, "ok")
        if info.outbound_rate is not None:
            app.sinch_rate = info.outbound_rate
            self._logged.discard((app_id, "no_rate"))
        else:
            self._warn_once(app_id, "no_rate", "Sinch's app resource has no outbound rate")
        sent_rate = app.rate
        self._set_rate(app_id, app)
        configured = s.apps.get(app_id)
        configured_rate = configured.rate if configured is not None else None
        if configured_rate and app.sinch_rate and configured_rate > app.sinch_rate:
            self._warn_once(
                app_id,
                "above_sinch",
                f"configured rate {configured_rate:.2f}/s is above Sinch's "
                f"{app.sinch_rate:.2f}/s; its messages will wait in Sinch's queue",
            )
        else:
            self._logged.discard((app_id, "above_sinch"))
        size = info.outbound_size
        if size is not None:
            if self._on_queue is not None:
                self._on_queue(app_id, size, info.outbound_limit)
            if app.size is not None and app.read_at is not None:
                factor = next_factor(
                    app.size, size, now - app.read_at, sent_rate, app.factor, self._policy
                )
                self._set_factor(app_id, app, factor)
        # the first read comes before the app's first send, so its queue is empty then:
        # with more records waiting than the app sends before that next read, the next
        # read follows soon and shows the trend (a smaller backlog is gone by then)
        starting = (
            app.read_at is None
            and self._backlog is not None
            and self._backlog(app_id) > app.rate * s.app_queue_refresh_s
        )
        app.size, app.read_at = size, now
        busy = (size or 0) > 0 or app.factor < 1.0 or starting
        app.due = now + (s.app_queue_refresh_s if busy else s.app_rate_refresh_s)

    def _failed(self, app_id: str, app: _App, reason: str, hint: float | None) -> None:
        s = self._settings
        now = self._clock()
        app.failures += 1
        self._report_read(app_id, "transport" if reason.startswith("transport") else reason)
        backoff = min(s.app_rate_refresh_s, s.app_queue_refresh_s * 2 ** min(app.failures - 1, 16))
        app.due = now + max(backoff, hint or 0.0)
        app.failing.add(reason)
        if app.source == "sinch":
            keeping = f"keeping Sinch's last rate {app.rate:.2f}/s"
        elif app.source == "configured":
            keeping = f"keeping the configured rate {app.rate:.2f}/s"
        else:
            keeping = f"using app_rate {app.rate:.2f}/s"
        scope = "" if reason in _PROJECT_WIDE else app_id
        self._warn_once(scope, reason, f"cannot read the app from Sinch ({reason}); {keeping}")

    def _set_rate(self, app_id: str, app: _App) -> None:
        rate, source = self._decide(app_id, app.sinch_rate)
        if (rate, source) == (app.rate, app.source):
            return
        log.info(
            "app %s: rate %.2f/s from %s (was %.2f/s from %s)",
            app_id,
            rate,
            source,
            app.rate,
            app.source,
        )
        app.rate, app.source = rate, source
        if self._on_rate is not None:
            self._on_rate(app_id, rate, source)

    def _set_factor(self, app_id: str, app: _App, factor: float) -> None:
        if factor == app.factor:
            return
        if factor < app.factor and app.factor == 1.0:
            log.info("app %s: Sinch's queue grows (%s waiting): sending slower", app_id, app.size)
        elif factor == 1.0:
            log.info("app %s: Sinch's queue is empty again: sending at the full rate", app_id)
        app.factor = factor
        if self._on_factor is not None:
            self._on_factor(app_id, factor)

    def _decide(self, app_id: str, sinch_rate: float | None) -> tuple[float, RateSourceKind]:
        """The precedence: configured, then Sinch, then ``app_rate``."""
        configured = self._settings.apps.get(app_id)
        if configured is not None and configured.rate:
            return configured.rate, "configured"
        if sinch_rate is not None:
            return sinch_rate, "sinch"
        return self._settings.app_rate, "fallback"

    def _state(self, app_id: str) -> _App:
        app = self._apps.get(app_id)
        if app is None:
            rate, source = self._decide(app_id, None)
            app = self._apps[app_id] = _App(rate=rate, source=source)
        return app

    # -- logging once ------------------------------------------------------------

    def _warn_once(self, scope: str, condition: str, message: str) -> None:
        """Log ``message`` the first time ``condition`` holds for ``scope`` ("" = project)."""
        if (scope, condition) in self._logged:
            return
        self._logged.add((scope, condition))
        if scope:
            log.warning("app %s: %s", scope, message)
        else:
            log.warning("app reads (all apps of the project): %s", message)

    def _recovered(self, app_id: str, app: _App) -> None:
        """A read answered: the failures logged for this app, and the project's, are over."""
        logged = {(app_id, c) for c in app.failing} & self._logged
        if logged:
            log.info("app %s: read from Sinch again", app_id)
            self._logged -= logged
        project = {key for key in self._logged if key[0] == ""}
        if project:
            log.info("app reads: Sinch answers again")
            self._logged -= project
        app.failing.clear()

    def _report_read(self, app_id: str, result: str) -> None:
        if self._on_read is not None:
            self._on_read(app_id, result)
