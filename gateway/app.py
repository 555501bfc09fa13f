"""Composition root: builds every part of the gateway, runs it, shuts it down.

Startup order (:meth:`Gateway.run`, one named step each):
  admin server and webhook (``/healthz`` answers at once, ``/readyz`` says why
  not yet, the webhook answers 503 until it can publish) → topics (if
  ``create_topics``) → Sinch and auth HTTP sessions → token manager and its
  keeper → results producer, events producer (each retried with back-off while
  Kafka is down) → outcomes, delivery, lanes, adaptive rates → operators'
  controls (read once, then followed; the admin API answers from here on) →
  consumer → intake loop, commit loop, adaptive recovery.

Shutdown order (SIGTERM/SIGINT only set the stop event):
  not ready → stop fetching → stop lane workers → let in-flight sends finish
  (within ``shutdown_timeout_s``) → let their outcomes be written (same bound)
  → commit → flush and stop the producer → stop the consumer → close HTTP
  sessions → stop the HTTP servers.
Records still queued in lanes are not committed: the next owner sends them.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
from aiohttp import web
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from gateway import logs
from gateway.adaptive import AdaptiveRates
from gateway.admin import Health, make_admin_app, start_site
from gateway.admin_api import AdminApi, describe_lanes
from gateway.aio import cancel_and_wait, wait_within
from gateway.app_rates import AppRates
from gateway.consumer import Intake
from gateway.controls import Controls, LaneTarget, LocalStore, RedisStore, Store
from gateway.dedupe import GroupSentIds, RecentIds
from gateway.delivery import Delivery
from gateway.envelope import Request
from gateway.lanes import Lane, Lanes
from gateway.limiter import Bucket, acquire
from gateway.metrics import Metrics
from gateway.outcomes import Outcomes
from gateway.producer import Publisher, ensure_topics
from gateway.settings import Settings
from gateway.shared_limiter import SharedBucket, SharedLimiter
from gateway.shares import Demand, Shares
from gateway.sinch import SinchClient
from gateway.tokens import BasicAuth, TokenManager, TokenSource
from gateway.webhooks import WebhookReceiver, nonce_redis

WEBHOOK_PATH = "/webhooks/sinch"
# An app whose share is (nearly) its whole rate, the backlog that drains last, takes the
# project's slots up to SHARE_AHEAD_S ahead of the apps queued there: otherwise it waits
# its turn in the queue that formed before the shares applied, which drains only at the
# cap's few spare slots a second. Going ahead by `a` seconds lets a 1-second window hold up
# to `a x app rate` sends more than the pace; a slow app may go further ahead, as long as
# that stays within half of the project's margin (800/s, 2 %: 0.4 s for an app at 20/s,
# ahead of a queue that 200 apps make 0.25 s long).
WHOLE_RATE = 0.9
SHARE_AHEAD_S = 0.1
SHARE_HEADROOM = 0.99  # shares of the project cap add up to this much of its pace

log = logging.getLogger(__name__)


def _changed(bucket: Bucket | SharedBucket) -> None:
    """Tell a bucket's watcher (metrics, log) that its rate changed."""
    if isinstance(bucket, Bucket):
        if bucket.on_change is not None:
            bucket.on_change(bucket)
    elif bucket.on_change is not None:
        bucket.on_change(bucket)


@dataclass(slots=True)
class _Pipeline:
    """What the send path is made of, once built."""

    outcomes: Outcomes
    delivery: Delivery
    lanes: Lanes
    intake: Intake
    adaptive: AdaptiveRates
    rates: AppRates
    shares: Shares


class Gateway:
    """The service. ``await Gateway(settings).run(stop)`` runs until ``stop`` is set."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        settings.require_credentials()
        self.settings = settings
        logs.protect_secrets(settings)
        for project in settings.projects.values():
            logs.protect(project.key_secret.reveal())
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(
            self.registry,
            max_app_labels=settings.max_app_labels,
            max_campaign_labels=settings.max_campaign_labels,
        )
        self.http_port: int | None = None
        self.webhook_port: int | None = None
        self.started = asyncio.Event()
        self.limiter: SharedLimiter | None = None
        self._group_sent: GroupSentIds | None = None
        self.intake: Intake | None = None
        self.lanes: Lanes | None = None
        self.outcomes: Outcomes | None = None
        self.delivery: Delivery | None = None
        self.tokens: dict[str, TokenSource] = {}  # by project_id
        self._stopping = False
        self.admin_api = AdminApi(settings.admin_token, self.metrics)
        self.controls: Controls | None = None
        self._rates: AppRates | None = None
        self._redis: Any = None  # the client shared with the webhook's nonces, with redis_url

    # -- readiness --------------------------------------------------------

    def _health(self) -> Health:
        def kafka() -> tuple[bool, str]:
            intake = self.intake
            if intake is None or intake.consumer is None:
                return False, "consumer not started (is Kafka reachable?)"
            if not intake.broker_connected():
                return False, f"no connection to any Kafka broker ({self.settings.kafka_bootstrap})"
            return True, "connected"

        def partitions() -> tuple[bool, str]:
            intake = self.intake
            if intake is None or not intake.joined:
                return False, "joining the consumer group"
            if not intake.assigned:
                return True, "in the group, no partition assigned (more replicas than partitions)"
            topic = self.settings.requests_topic
            owned = sorted(tp.partition for tp in intake.trackers if tp.topic == topic)
            return True, f"assigned: {topic} {','.join(map(str, owned)) or '-'}"

        def token() -> tuple[bool, str]:
            if not self.tokens:
                return False, "not started"
            if self.settings.auth_mode == "basic":
                return True, "basic auth"
            invalid = sorted(p for p, t in self.tokens.items() if not t.is_valid())
            if not invalid:
                return True, "valid"
            if len(self.tokens) == 1:
                return False, "no valid token"
            return False, f"no valid token for project {', '.join(invalid)}"

        def sending() -> tuple[bool, str]:
            if self._stopping:
                return False, "shutting down"
            held = self.delivery.held() if self.delivery is not None else None
            if held is not None:
                return False, f"held: Sinch refused ({held}); retrying"
            return True, "sending"

        def outputs() -> tuple[bool, str]:
            if self.outcomes is None:
                return True, "not started"
            return self.outcomes.stuck()

        def progress() -> tuple[bool, str]:
            intake = self.intake
            stalled = intake.stalled() if intake is not None else []
            held = sorted(self.lanes.holds) if self.lanes is not None else []
            if stalled and held:  # an operator's pause holds commits on purpose
                return True, f"partitions {stalled} wait for apps paused by an operator: {held}"
            if stalled:
                return False, (
                    f"partitions {stalled} have not committed for "
                    f"{self.settings.stall_timeout_s:.0f} s while holding records"
                )
            return True, "committing"

        def limiter() -> tuple[bool, str]:
            if self.limiter is None:
                return True, "local buckets (no redis_url)"
            return self.limiter.readiness()

        return Health(
            {
                "limiter": limiter,
                "kafka": kafka,
                "partitions": partitions,
                "token": token,
                "sending": sending,
                "outputs": outputs,
                "progress": progress,
            }
        )

    def _share_project_rate(self, owned: int, total: int) -> None:
        """Several replicas share the project cap in proportion to their partitions."""
        s = self.settings
        if not s.share_project_rate or self.lanes is None or owned == 0:
            return
        if s.redis_url is not None:
            return  # the shared limiter holds the group's exact cap
        buckets = {s.project_id: self.lanes.project_bucket, **self.lanes.project_buckets}
        for project_id, bucket in buckets.items():
            rate = s.project_rate_for(project_id) * owned / total
            if rate != bucket.rate:
                bucket.set_rate(rate)
                _changed(bucket)

    def _on_hold(self, scope: str, reason: str) -> None:
        log.error("Sinch refused the %s (%s): all sending held, retrying", scope, reason)

    # -- run --------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        async with AsyncExitStack() as stack:
            nonces = nonce_redis(s)  # replays refused on every replica, when Redis is set
            self._redis = nonces
            if nonces is not None:
                stack.push_async_callback(nonces.aclose)
                self._group_sent = GroupSentIds(nonces, ttl_s=s.dedupe_ttl_s)
                stack.push_async_callback(self._group_sent.close)
            receiver = WebhookReceiver(
                s, self.metrics, publish_timeout_s=s.webhook_publish_timeout_s, redis=nonces
            )
            health = self._health()
            await self._start_servers(stack, receiver, health)
            if s.create_topics:
                await self._retry_kafka(lambda: ensure_topics(s), stop, "create topics")
                if stop.is_set():
                    return
            sinch_session, auth_session = self._http_sessions(stack)
            self.tokens = self._token_sources(stack, auth_session, stop)
            publisher = await self._start_publisher(stack, stop, linger_ms=25, what="producer")
            events = await self._start_publisher(stack, stop, linger_ms=1, what="events producer")
            if publisher is None or events is None:
                return
            receiver.attach(events)
            await self._start_limiter(stack)
            pipe = self._build_pipeline(self.tokens, publisher, sinch_session, receiver)
            self._bind_metrics(pipe, health)
            await self._start_controls(stack, pipe, stop)
            await pipe.rates.start()
            stack.push_async_callback(pipe.rates.stop)
            await self._retry_kafka(pipe.intake.start, stop, "start consumer")
            if stop.is_set():
                return
            stack.push_async_callback(pipe.intake.stop)
            # Startup objects never die: keep them out of the cyclic GC's way, so that a
            # full collection does not pause the loop (a paused loop bunches sends).
            gc.collect()
            gc.freeze()
            self.started.set()
            log.info("gateway started: project %s, region %s", s.project_id, s.region)
            await self._serve(pipe, stop)
            await publisher.flush()
            log.info("gateway stopped")

    async def _start_servers(
        self, stack: AsyncExitStack, receiver: WebhookReceiver, health: Health
    ) -> None:
        s = self.settings
        admin = make_admin_app(self.registry, health)
        self.admin_api.add_routes(admin)
        if s.webhook_port is None:
            admin.router.add_post(WEBHOOK_PATH, receiver.handle)
        else:
            hooks = web.Application()
            hooks.router.add_post(WEBHOOK_PATH, receiver.handle)
            hooks_runner, self.webhook_port = await start_site(hooks, s.http_host, s.webhook_port)
            stack.push_async_callback(hooks_runner.cleanup)
        admin_runner, self.http_port = await start_site(admin, s.http_host, s.http_port)
        stack.push_async_callback(admin_runner.cleanup)
        log.info("admin server on %s:%d", s.http_host, self.http_port)

    def _http_sessions(
        self, stack: AsyncExitStack
    ) -> tuple[aiohttp.ClientSession, aiohttp.ClientSession]:
        s = self.settings
        timeout = aiohttp.ClientTimeout(total=s.request_timeout_s, connect=s.connect_timeout_s)
        connector = aiohttp.TCPConnector(limit=s.max_in_flight, ttl_dns_cache=300)
        sinch_session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, raise_for_status=False
        )
        stack.push_async_callback(sinch_session.close)
        auth_session = aiohttp.ClientSession(timeout=timeout)
        stack.push_async_callback(auth_session.close)
        return sinch_session, auth_session

    def _token_sources(
        self, stack: AsyncExitStack, session: aiohttp.ClientSession, stop: asyncio.Event
    ) -> dict[str, TokenSource]:
        """One token source per Sinch project (its own key), each kept fresh."""
        s = self.settings
        m = self.metrics
        sources: dict[str, TokenSource] = {}
        for project_id, project in s.all_projects().items():
            if s.auth_mode == "basic":
                sources[project_id] = BasicAuth(project.key_id, project.key_secret)
                continue
            manager = TokenManager(
                session,
                auth_url=s.auth_url,
                key_id=project.key_id,
                key_secret=project.key_secret,
                refresh_margin_s=s.token_refresh_margin_s,
                backoff_base_s=s.backoff_base_s,
                backoff_max_s=s.backoff_max_s,
                on_refresh=lambda result, _exp: m.token_refreshes.labels(result).inc(),
            )
            stack.push_async_callback(manager.close)
            keeper = asyncio.create_task(manager.keep_fresh(stop), name=f"token-{project_id}")
            stack.push_async_callback(cancel_and_wait, [keeper])
            sources[project_id] = manager
        main = sources[s.project_id]
        if isinstance(main, TokenManager):
            m.token_expires_in.set_function(lambda: main.seconds_left() or -1.0)
        return sources

    async def _start_limiter(self, stack: AsyncExitStack) -> None:
        """The group's shared limiter in Redis, when ``redis_url`` is set.

        Entered before the lanes are built, so that it stops after they are closed.
        """
        s = self.settings
        if s.redis_url is None:
            return
        m = self.metrics
        limiter = SharedLimiter(
            s.redis_url.reveal(),
            key_prefix=s.redis_key_prefix,
            max_batch=s.limiter_max_batch,
            batch_horizon_s=s.limiter_batch_horizon_s,
            lookahead_s=s.limiter_lookahead_s,
            timeout_s=s.redis_timeout_s,
            on_roundtrip=m.shared_limiter_roundtrip.observe,
        )
        self.limiter = await stack.enter_async_context(limiter)
        m.shared_limiter_up.set_function(lambda: 1.0 if limiter.healthy() else 0.0)
        m.shared_limiter_slots.set_function(lambda: limiter.slots_drawn)
        m.shared_limiter_roundtrips.set_function(lambda: limiter.roundtrips)
        for kind in ("project", "app", "channel"):
            m.shared_limiter_lost.labels(kind).set_function(partial(limiter.slots_lost, kind))
        m.shared_limiter_failures.set_function(lambda: limiter.failures)

    async def _start_publisher(
        self, stack: AsyncExitStack, stop: asyncio.Event, *, linger_ms: int, what: str
    ) -> Publisher | None:
        publisher = Publisher(self.settings, linger_ms=linger_ms)
        await self._retry_kafka(publisher.start, stop, f"start {what}")
        if stop.is_set():
            return None
        stack.push_async_callback(publisher.stop)
        return publisher

    def _build_pipeline(
        self,
        tokens: dict[str, TokenSource],
        publisher: Publisher,
        sinch_session: aiohttp.ClientSession,
        receiver: WebhookReceiver,
    ) -> _Pipeline:
        s = self.settings
        clock = asyncio.get_running_loop().time
        sent_ids = RecentIds(s.dedupe_size, s.dedupe_ttl_s, clock)
        if self._group_sent is not None:
            sent_ids.on_add = self._group_sent.remember
        intake_ref: list[Intake] = []
        lanes_ref: list[Lanes] = []
        sinch = SinchClient(s, sinch_session)
        rates = self._app_rates(sinch, tokens[s.project_id], lanes_ref)
        outcomes = Outcomes(
            settings=s,
            publisher=publisher,
            metrics=self.metrics,
            sent_ids=sent_ids,
            clock=clock,
            release=lambda ending, finished: intake_ref[0].release(ending, finished),
        )
        delivery = Delivery(
            settings=s,
            sinch=sinch,
            tokens=tokens,
            outcomes=outcomes,
            metrics=self.metrics,
            clock=clock,
            on_hold=self._on_hold,
            on_sent=receiver.record_sent,
        )
        lanes = self._make_lanes(
            delivery,
            rates,
            hand_back=lambda req: intake_ref[0].hand_back(req),
            sending=lambda: intake_ref[0].sending(),
        )
        lanes_ref.append(lanes)
        adaptive = AdaptiveRates(lanes.project_bucket, clock)
        delivery.feedback = adaptive
        intake = Intake(
            settings=s,
            metrics=self.metrics,
            lanes=lanes,
            outcomes=outcomes,
            sent_ids=sent_ids,
            clock=clock,
            on_share=self._share_project_rate,
            group_sent=self._group_sent,
        )
        intake_ref.append(intake)
        self.outcomes, self.delivery, self.lanes, self.intake = outcomes, delivery, lanes, intake
        shares = self._shares(lanes, intake)
        return _Pipeline(outcomes, delivery, lanes, intake, adaptive, rates, shares)

    def _shares(self, lanes: Lanes, intake: Intake) -> Shares:
        """Shares of the project cap among the busy apps, while it binds."""
        # Shares are computed on rates, so that they apply only when the busy apps'
        # rates add up to more than the project's; each becomes a ceiling just under
        # the share, so that the project bucket seldom has to queue the apps (a wait
        # there costs an app bucket its slot)
        main = self.settings.project_id

        def groups() -> list[tuple[float, list[Demand]]]:
            outstanding = intake.spill.outstanding
            by_project: dict[str, list[Demand]] = {}
            for app_id, lane in lanes.lanes.items():
                backlog = lane.depth + outstanding.get(app_id, 0)
                if backlog > 0:
                    rate = lane.bucket.rate * lane.bucket.factor
                    project = lane.project or main
                    by_project.setdefault(project, []).append(Demand(app_id, rate, backlog))
            buckets = {main: lanes.project_bucket, **lanes.project_buckets}
            out = []
            for project, demands in by_project.items():
                bucket = buckets.get(project, lanes.project_bucket)
                out.append((bucket.rate * bucket.factor, demands))
            return out

        def ahead(project_id: str | None, rate: float) -> float:
            project = lanes.project_buckets.get(project_id or main, lanes.project_bucket)
            spare = project.rate * project.factor * project.margin / 2  # sends a second
            return max(SHARE_AHEAD_S, spare / rate) if rate > 0 else SHARE_AHEAD_S

        def apply(shares: dict[str, float]) -> None:
            for app_id, lane in lanes.lanes.items():
                share = shares.get(app_id)
                bucket = lane.bucket
                if isinstance(bucket, Bucket):  # a shared bucket paces the whole group
                    bucket.set_ceiling(None if share is None else share * SHARE_HEADROOM)
                # an app given its whole rate must not wait its turn behind apps queued
                # for the project's slots: its slots are part of the shares. With the
                # group's limiter (no ceilings: each replica sees only its own apps), it
                # draws its project slots itself, and the others share what is left
                rate = bucket.rate * bucket.factor
                whole = share is not None and share >= WHOLE_RATE * rate
                lane.ahead = ahead(lane.project, rate) if whole else 0.0

        return Shares(groups=groups, apply=apply)

    def _app_rates(
        self, sinch: SinchClient, tokens: TokenSource, lanes_ref: list[Lanes]
    ) -> AppRates:
        """Each app's rate as Sinch reports it (a configured rate wins), followed live."""
        m = self.metrics
        follow = self._follow_rate

        def on_rate(app_id: str, _rate: float, source: str) -> None:
            label = m.app_label(app_id)
            for kind in ("configured", "sinch", "fallback"):
                m.app_rate_source.labels(label, kind).set(1.0 if kind == source else 0.0)
            follow(app_id)

        def on_factor(app_id: str, factor: float) -> None:
            m.app_queue_factor.labels(m.app_label(app_id)).set(factor)
            follow(app_id)

        async def project_slot() -> None:  # app reads count toward the project's cap
            if lanes_ref:
                await acquire([lanes_ref[0].project_bucket], asyncio.get_running_loop().time)

        rates = AppRates(
            self.settings,
            sinch,
            tokens,
            # the default project's apps; another project's apps use configured rates
            active_apps=lambda: [
                app_id
                for app_id, lane in (lanes_ref[0].lanes.items() if lanes_ref else ())
                if lane.project in (None, self.settings.project_id)
            ],
            on_rate=on_rate,
            on_factor=on_factor,
            on_queue=lambda app_id, size, _limit: m.sinch_app_queue.labels(m.app_label(app_id)).set(
                size
            ),
            on_read=lambda _app_id, result: m.sinch_app_reads.labels(result).inc(),
            before_read=project_slot,
            backlog=lambda app_id: (
                lane.depth
                if lanes_ref and (lane := lanes_ref[0].lanes.get(app_id)) is not None
                else 0
            ),
        )
        self._rates = rates
        return rates

    def _base_rate(self, app_id: str, project_id: str | None) -> tuple[float, str]:
        """An app's rate without an operator's override, and where it comes from."""
        s = self.settings
        rates = self._rates
        if project_id in (None, s.project_id) and rates is not None:
            return rates.effective_rate(app_id), rates.source_of(app_id)
        configured = s.apps.get(app_id)
        source = "configured" if configured is not None and configured.rate else "fallback"
        return s.app_rate_for(app_id), source

    def _rate_in_force(self, app_id: str, project_id: str | None) -> float:
        """An operator's rate while it is in force, else the configured, Sinch's or app_rate."""
        override = self.controls.rate_override(app_id) if self.controls is not None else None
        return override.rate if override is not None else self._base_rate(app_id, project_id)[0]

    def _follow_rate(self, app_id: str) -> None:
        """Re-pace ``app_id``'s bucket (its rate in force changed)."""
        lane = self.lanes.lanes.get(app_id) if self.lanes is not None else None
        if lane is None:
            return
        rate = self._rate_in_force(app_id, lane.project)
        if rate != lane.bucket.rate:
            lane.bucket.set_rate(rate)
            _changed(lane.bucket)

    async def _start_controls(
        self, stack: AsyncExitStack, pipe: _Pipeline, stop: asyncio.Event
    ) -> None:
        """Operators' controls (pause, rate, drop), group-wide in Redis when it is set.

        Read once before the consumer starts, so that a paused app sends nothing
        after a restart, then followed every ``POLL_S``.
        """
        s = self.settings
        lanes, intake = pipe.lanes, pipe.intake
        store: Store = LocalStore()
        if self._redis is not None:
            store = RedisStore(self._redis, f"{s.redis_key_prefix}controls:{s.group_id}")
        controls = Controls(store, LaneTarget(lanes, self._follow_rate))
        self.controls = controls
        lanes.on_cancel = pipe.outcomes.cancelled
        lanes.screen = controls.screen
        await controls.refresh()
        task = asyncio.create_task(controls.run(stop), name="controls")
        stack.push_async_callback(cancel_and_wait, [task])
        self.metrics.sending_paused.labels("admin").set_function(lambda: len(lanes.holds))
        clock = asyncio.get_running_loop().time

        def describe() -> list[dict[str, Any]]:
            return describe_lanes(
                lanes,
                controls,
                rate_of=self._base_rate,
                spilled=intake.spill.outstanding,
                now=clock(),
                wall=time.time(),
            )

        self.admin_api.attach(controls, describe)

    def _bind_metrics(self, pipe: _Pipeline, health: Health) -> None:
        m = self.metrics
        intake, lanes, outcomes, delivery = pipe.intake, pipe.lanes, pipe.outcomes, pipe.delivery
        clock = asyncio.get_running_loop().time
        m.buffered.set_function(lambda: intake.buffered)
        m.in_flight.set_function(lambda: lanes.in_flight)
        m.ready.set_function(lambda: 1.0 if health.ready() else 0.0)
        m.lane_depth.bind(lambda: [(ln.app_id, ln.depth) for ln in lanes.lanes.values()])

        def held(scope: str) -> float:
            why = delivery.held()
            refused = why is not None and why.startswith("project_refused")
            return 1.0 if why is not None and refused == (scope == "project") else 0.0

        m.sending_paused.labels("auth").set_function(lambda: held("auth"))
        m.sending_paused.labels("project").set_function(lambda: held("project"))
        m.sending_paused.labels("app").set_function(
            lambda: sum(1 for ln in lanes.lanes.values() if ln.paused_until > clock())
        )
        m.outcome_writes_failing.set_function(outcomes.failing)
        m.outcome_oldest_failure.set_function(outcomes.oldest_failure_s)

    async def _serve(self, pipe: _Pipeline, stop: asyncio.Event) -> None:
        """Run the loops until ``stop``; then the ordered shutdown of the module docstring."""
        s = self.settings
        intake, lanes = pipe.intake, pipe.lanes
        async with asyncio.TaskGroup() as tg:
            run_task = tg.create_task(intake.run(), name="intake")
            commit_task = tg.create_task(intake.commit_loop(), name="commits")
            tg.create_task(pipe.adaptive.run(stop), name="adaptive-rates")
            tg.create_task(pipe.shares.run(stop), name="project-shares")
            await stop.wait()
            self._stopping = True
            intake.stop_fetching()
            await run_task
            await lanes.stop_workers()
            deadline = time.monotonic() + s.shutdown_timeout_s
            if not await lanes.wait_in_flight(s.shutdown_timeout_s):
                log.warning("in-flight sends did not finish within %.0f s", s.shutdown_timeout_s)
            await lanes.close()
            if not await pipe.outcomes.settle(None, deadline - time.monotonic()):
                log.warning("some outcomes were not written in time; they are not committed")
            await pipe.outcomes.close()
            if self._group_sent is not None:
                await self._group_sent.flush()  # before the partitions' next owners look
            await commit_task
            await intake.commit()

    def _make_lanes(
        self,
        delivery: Delivery,
        rates: AppRates,
        *,
        hand_back: Callable[[Request], None],
        sending: Callable[[], None],
    ) -> Lanes:
        s = self.settings
        m = self.metrics
        loop_clock = asyncio.get_running_loop().time

        def track(bucket: Bucket | SharedBucket) -> None:
            scope, _, name = bucket.name.partition(":")
            label = m.app_label(name) if scope == "app" else name
            m.rate_configured.labels(scope, label).set(bucket.rate)
            m.rate_effective.labels(scope, label).set(bucket.pace)
            log.info(
                "bucket %s now paces at %.2f/s (configured %.2f/s)",
                bucket.name,
                bucket.pace,
                bucket.rate,
            )

        limiter = self.limiter

        def bucket(name: str, rate: float, burst: float) -> Bucket | SharedBucket:
            b: Bucket | SharedBucket
            if limiter is not None:  # one timeline for the whole group, in Redis
                b = limiter.bucket(name, rate, margin=s.rate_margin, on_change=track)
            else:
                b = Bucket(
                    name,
                    rate,
                    burst=burst,
                    margin=s.rate_margin,
                    clock=loop_clock,
                    on_change=track,
                )
            scope, _, label = name.partition(":")
            label = m.app_label(label) if scope == "app" else label
            m.rate_configured.labels(scope, label).set(b.rate)
            m.rate_effective.labels(scope, label).set(b.pace)
            return b

        project = bucket(f"project:{s.project_id}", s.project_rate, s.project_burst)
        others = {
            pid: bucket(f"project:{pid}", s.project_rate_for(pid), s.project_burst)
            for pid in s.all_projects()
            if pid != s.project_id
        }
        channels = {ch: bucket(f"channel:{ch}", rate, 1.0) for ch, rate in s.channel_rates.items()}

        def app_bucket(app_id: str, project_id: str | None) -> Bucket | SharedBucket:
            if project_id in (None, s.project_id):
                rates.note_app(app_id)  # a new app's rate is read from Sinch at once
            rate = self._rate_in_force(app_id, project_id)
            return bucket(f"app:{app_id}", rate, s.app_burst_for(app_id))

        def expired(req: Request) -> bool:
            return req.expire_at is not None and req.expire_at <= time.time()

        async def send(req: Request, lane: Lane) -> None:
            sending()
            with logs.context(request_id=req.request_id, app_id=req.app_id):
                await delivery.attempt(req, lane)

        return Lanes(
            project_bucket=project,
            project_buckets=others,
            make_app_bucket=app_bucket,
            channel_buckets=channels,
            max_in_flight=s.max_in_flight,
            sender=send,
            clock=loop_clock,
            on_wait=m.limiter_wait.observe,
            expired=expired,
            on_expired=delivery.expire,
            gate=delivery.gate,
            ready=delivery.ready,
            hand_back=hand_back,
        )

    async def _retry_kafka(
        self, start: Callable[[], Awaitable[None]], stop: asyncio.Event, what: str
    ) -> None:
        """Call ``start()`` until it succeeds or ``stop`` is set; back off between tries."""
        attempt = 0
        while not stop.is_set():
            try:
                await start()
                return
            except (KafkaError, OSError) as exc:
                attempt += 1
                delay = min(30.0, 0.5 * 2 ** min(attempt, 6)) * random.uniform(0.5, 1.0)  # noqa: S311
                log.warning("%s failed (%s); retrying in %.1f s", what, exc, delay)
                await wait_within(stop.wait(), delay)
