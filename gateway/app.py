"""Composition root: builds every part of the gateway, runs it, shuts it down.

Startup order:
  admin server and webhook (``/healthz`` answers at once, ``/readyz`` says why
  not yet, the webhook answers 503 until it can publish) → topics (if
  ``create_topics``) → Sinch and auth HTTP sessions → token manager and its
  keeper → results producer, events producer (each retried with back-off while
  Kafka is down) → delivery, lanes, adaptive rates → consumer → intake loop,
  commit loop, adaptive recovery.

Shutdown order (SIGTERM/SIGINT only set the stop event):
  not ready → stop fetching → stop lane workers → let in-flight sends finish
  (within ``shutdown_timeout_s``) → commit → flush and stop the producer →
  stop the consumer → close HTTP sessions → stop the HTTP servers.
Records still queued in lanes are not committed: the next owner sends them.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, suppress

import aiohttp
from aiohttp import web
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from gateway import logs
from gateway.adaptive import AdaptiveRates
from gateway.admin import Health, make_admin_app, start_site
from gateway.consumer import Intake
from gateway.dedupe import RecentIds
from gateway.delivery import Delivery
from gateway.envelope import Request
from gateway.lanes import Lane, Lanes
from gateway.limiter import Bucket
from gateway.metrics import Metrics
from gateway.producer import Publisher, ensure_topics
from gateway.settings import Settings
from gateway.sinch import SinchClient
from gateway.tokens import BasicAuth, TokenManager, TokenSource
from gateway.webhooks import WebhookReceiver

WEBHOOK_PATH = "/webhooks/sinch"

log = logging.getLogger(__name__)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


class Gateway:
    """The service. ``await Gateway(settings).run(stop)`` runs until ``stop`` is set."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        settings.require_credentials()
        self.settings = settings
        logs.protect_secrets(settings)
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry, max_app_labels=settings.max_app_labels)
        self.http_port: int | None = None
        self.webhook_port: int | None = None
        self._background: set[asyncio.Future[None]] = set()
        self.started = asyncio.Event()
        self.intake: Intake | None = None
        self.lanes: Lanes | None = None
        self.tokens: TokenSource | None = None
        self._stopping = False
        self._auth_refused_until = 0.0
        self._auth_reason = ""

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
            if intake is None:
                return False, "not started"
            return True, "assigned" if intake.assigned else "waiting for assignment"

        def token() -> tuple[bool, str]:
            if self.tokens is None:
                return False, "not started"
            if isinstance(self.tokens, BasicAuth):
                return True, "basic auth"
            return (True, "valid") if self.tokens.is_valid() else (False, "no valid token")

        def sending() -> tuple[bool, str]:
            if self._stopping:
                return False, "shutting down"
            if time.monotonic() < self._auth_refused_until:
                return False, f"held: credentials refused ({self._auth_reason})"
            return True, "sending"

        return Health(
            {"kafka": kafka, "partitions": partitions, "token": token, "sending": sending}
        )

    def _share_project_rate(self, owned: int, total: int) -> None:
        """Several replicas share the project cap in proportion to their partitions."""
        s = self.settings
        if not s.share_project_rate or self.lanes is None or owned == 0:
            return
        bucket = self.lanes.project_bucket
        rate = s.project_rate * owned / total
        if rate != bucket.rate:
            bucket.set_rate(rate)
            if bucket.on_change is not None:
                bucket.on_change(bucket)

    def _auth_refused(self, reason: str) -> None:
        if time.monotonic() >= self._auth_refused_until:
            log.error("Sinch refused the credentials (%s): sending held, retrying", reason)
        self._auth_refused_until = time.monotonic() + self.settings.backoff_max_s
        self._auth_reason = reason

    # -- run --------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        clock = loop.time
        m = self.metrics
        async with AsyncExitStack() as stack:
            receiver = WebhookReceiver(s, m, publish_timeout_s=s.webhook_publish_timeout_s)
            health = self._health()
            admin = make_admin_app(self.registry, health)
            if s.webhook_port is None:
                admin.router.add_post(WEBHOOK_PATH, receiver.handle)
            else:
                hooks = web.Application()
                hooks.router.add_post(WEBHOOK_PATH, receiver.handle)
                hooks_runner, self.webhook_port = await start_site(
                    hooks, s.http_host, s.webhook_port
                )
                stack.push_async_callback(hooks_runner.cleanup)
            admin_runner, self.http_port = await start_site(admin, s.http_host, s.http_port)
            stack.push_async_callback(admin_runner.cleanup)
            log.info("admin server on %s:%d", s.http_host, self.http_port)

            if s.create_topics:
                await self._retry_kafka(lambda: ensure_topics(s), stop, "create topics")
                if stop.is_set():
                    return

            timeout = aiohttp.ClientTimeout(total=s.request_timeout_s, connect=s.connect_timeout_s)
            connector = aiohttp.TCPConnector(limit=s.max_in_flight, ttl_dns_cache=300)
            sinch_session = aiohttp.ClientSession(
                connector=connector, timeout=timeout, raise_for_status=False
            )
            stack.push_async_callback(sinch_session.close)
            auth_session = aiohttp.ClientSession(timeout=timeout)
            stack.push_async_callback(auth_session.close)

            tokens: TokenSource
            if s.auth_mode == "basic":
                tokens = BasicAuth(s.key_id, s.key_secret)
            else:
                manager = TokenManager(
                    auth_session,
                    auth_url=s.auth_url,
                    key_id=s.key_id,
                    key_secret=s.key_secret,
                    refresh_margin_s=s.token_refresh_margin_s,
                    backoff_base_s=s.backoff_base_s,
                    backoff_max_s=s.backoff_max_s,
                    on_refresh=lambda result, _exp: m.token_refreshes.labels(result).inc(),
                )
                stack.push_async_callback(manager.close)
                keeper = asyncio.create_task(manager.keep_fresh(stop), name="token-keeper")
                stack.push_async_callback(_cancel, keeper)
                m.token_expires_in.set_function(lambda: manager.seconds_left() or -1.0)
                tokens = manager
            self.tokens = tokens

            publisher = Publisher(s)
            await self._retry_kafka(publisher.start, stop, "start producer")
            if stop.is_set():
                return
            stack.push_async_callback(publisher.stop)
            events_publisher = Publisher(s, linger_ms=1)
            await self._retry_kafka(events_publisher.start, stop, "start events producer")
            if stop.is_set():
                return
            stack.push_async_callback(events_publisher.stop)
            receiver.attach(events_publisher)

            sent_ids = RecentIds(s.dedupe_size, s.dedupe_ttl_s, clock)
            intake_ref: list[Intake] = []

            def finished(req: Request) -> None:
                intake_ref[0].finished(req)

            delivery = Delivery(
                settings=s,
                sinch=SinchClient(s, sinch_session),
                tokens=tokens,
                publisher=publisher,
                metrics=m,
                sent_ids=sent_ids,
                clock=clock,
                on_finished=finished,
                on_auth_refused=self._auth_refused,
                on_sent=receiver.record_sent,
            )
            lanes = self._make_lanes(delivery)
            self.lanes = lanes
            adaptive = AdaptiveRates(lanes.project_bucket, clock)
            delivery.feedback = adaptive
            intake = Intake(
                settings=s,
                metrics=m,
                lanes=lanes,
                delivery=delivery,
                publisher=publisher,
                sent_ids=sent_ids,
                clock=clock,
                on_share=self._share_project_rate,
            )
            intake_ref.append(intake)
            self.intake = intake
            m.buffered.set_function(lambda: intake.buffered)
            m.in_flight.set_function(lambda: lanes.in_flight)
            m.ready.set_function(lambda: 1.0 if health.ready() else 0.0)
            m.lane_depth.bind(lambda: [(ln.app_id, ln.depth) for ln in lanes.lanes.values()])
            m.sending_paused.labels("auth").set_function(
                lambda: 1.0 if time.monotonic() < self._auth_refused_until else 0.0
            )
            m.sending_paused.labels("app").set_function(
                lambda: sum(1 for ln in lanes.lanes.values() if ln.paused_until > clock())
            )

            await self._retry_kafka(intake.start, stop, "start consumer")
            if stop.is_set():
                return
            stack.push_async_callback(intake.stop)
            # Startup objects never die: keep them out of the cyclic GC's way, so that a
            # full collection does not pause the loop (a paused loop bunches sends).
            gc.collect()
            gc.freeze()
            self.started.set()
            log.info("gateway started: project %s, region %s", s.project_id, s.region)

            async with asyncio.TaskGroup() as tg:
                run_task = tg.create_task(intake.run(), name="intake")
                commit_task = tg.create_task(intake.commit_loop(), name="commits")
                tg.create_task(adaptive.run(stop), name="adaptive-rates")
                await stop.wait()
                # the ordered shutdown of the module docstring
                self._stopping = True
                intake.stop_fetching()
                await run_task
                await lanes.stop_workers()
                drained = await lanes.wait_in_flight(s.shutdown_timeout_s)
                if not drained:
                    log.warning(
                        "in-flight sends did not finish within %.0f s", s.shutdown_timeout_s
                    )
                await lanes.close()
                await commit_task
                await intake.commit()
            await publisher.flush()
            log.info("gateway stopped")

    def _make_lanes(self, delivery: Delivery) -> Lanes:
        s = self.settings
        m = self.metrics
        loop_clock = asyncio.get_running_loop().time

        def track(bucket: Bucket) -> None:
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

        def bucket(name: str, rate: float, burst: float) -> Bucket:
            b = Bucket(
                name, rate, burst=burst, margin=s.rate_margin, clock=loop_clock, on_change=track
            )
            scope, _, label = name.partition(":")
            label = m.app_label(label) if scope == "app" else label
            m.rate_configured.labels(scope, label).set(b.rate)
            m.rate_effective.labels(scope, label).set(b.pace)
            return b

        project = bucket(f"project:{s.project_id}", s.project_rate, s.project_burst)
        channels = {ch: bucket(f"channel:{ch}", rate, 1.0) for ch, rate in s.channel_rates.items()}

        def expired(req: Request) -> bool:
            return req.expire_at is not None and req.expire_at <= time.time()

        def on_expired(req: Request) -> None:
            task = asyncio.ensure_future(delivery.expire(req))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        async def send(req: Request, lane: Lane) -> None:
            with logs.context(request_id=req.request_id, app_id=req.app_id):
                await delivery.attempt(req, lane)

        return Lanes(
            project_bucket=project,
            make_app_bucket=lambda app_id: bucket(
                f"app:{app_id}", s.app_rate_for(app_id), s.app_burst_for(app_id)
            ),
            channel_buckets=channels,
            max_in_flight=s.max_in_flight,
            sender=send,
            clock=loop_clock,
            on_wait=m.limiter_wait.observe,
            expired=expired,
            on_expired=on_expired,
            gate=delivery.gate,
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
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
