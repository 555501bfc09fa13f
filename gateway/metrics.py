"""Every Prometheus collector of the gateway, bound to an injected registry.

Names follow Prometheus conventions: ``gateway_`` prefix, base units,
``_total`` counters, ``_seconds`` histograms. Labels are bounded: app ids pass
through :class:`LabelCap` (the first ``max_app_labels`` distinct ids keep their
name, the rest are counted as ``other``). The catalog with meanings lives in
``deploy/METRICS.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
STATUS_CLASSES = ("2xx", "4xx", "429", "5xx", "error")
ADMIN_ACTIONS = ("pause", "resume", "rate", "rate_clear", "drop")
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class LabelCap:
    """Bound the distinct values of one label; the overflow is ``other``."""

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) < self._limit:
            self._seen.add(value)
            return value
        return "other"


class LaneDepth(Collector):
    """``gateway_lane_depth{app_id}``, read from the lanes at scrape time.

    Lanes come and go with the apps that have traffic, so the depth is not kept
    in a gauge that would have to be updated on every put and get: the source
    yields ``(app_id, depth)`` pairs and apps past the label cap are summed
    into ``other``.
    """

    name = "gateway_lane_depth"
    documentation = "Requests queued in an app's lane (retries included)."

    def __init__(self, app_label: LabelCap) -> None:
        self._app_label = app_label
        self._source: Callable[[], Iterable[tuple[str, int]]] = tuple

    def bind(self, source: Callable[[], Iterable[tuple[str, int]]]) -> None:
        self._source = source

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.name, self.documentation, labels=["app_id"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depths: dict[str, float] = {}
        for app_id, depth in self._source():
            label = self._app_label(app_id)
            depths[label] = depths.get(label, 0.0) + depth
        family = GaugeMetricFamily(self.name, self.documentation, labels=["app_id"])
        for label, total in sorted(depths.items()):
            family.add_metric([label], total)
        yield family


class Metrics:
    """The gateway's collectors. One instance per process (or per test).

    Attribute names are the interface the other modules use; each step below
    creates one group of collectors on the registry.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        max_app_labels: int = 200,
        max_campaign_labels: int = 50,
    ) -> None:
        self.registry = registry
        self.app_label = LabelCap(max_app_labels)
        self.campaign_label = LabelCap(max_campaign_labels)
        self._intake(registry)
        self._limits(registry)
        self._sinch(registry)
        self._outputs(registry)
        self._webhook(registry)
        self._operations(registry)

        # Children of fixed label sets exist from the start at 0, so that rate()
        # and increase() also count the first event of a series.
        for status_class in STATUS_CLASSES:
            self.responses.labels(status_class)
        for result in ("success", "failure"):
            self.token_refreshes.labels(result)
            self.commits.labels(result)
        for event in ("revoked", "assigned"):
            self.rebalances.labels(event)
        for scope in ("auth", "project", "app", "admin"):
            self.sending_paused.labels(scope)
        for action in ADMIN_ACTIONS:
            self.admin_actions.labels(action)

    def _intake(self, r: CollectorRegistry) -> None:
        """Records read from Kafka, and what holds them before a lane."""
        self.consumed = Counter(
            "gateway_requests_consumed", "Records read from the requests topic.", registry=r
        )
        self.spilled = Counter(
            "gateway_spilled_records",
            "Records of an app whose lane was full, written to the spill topic, by app.",
            ["app_id"],
            registry=r,
        )
        self.spill_taken = Counter(
            "gateway_spill_taken_back_records",
            "Spilled records read back into their app's lane, by app.",
            ["app_id"],
            registry=r,
        )
        self.spill_lag = Gauge(
            "gateway_spill_lag",
            "Records waiting in a spill partition this replica owns.",
            ["partition"],
            registry=r,
        )
        self.duplicates = Counter(
            "gateway_duplicates_skipped",
            "Records skipped because their request_id was already sent or is in flight.",
            registry=r,
        )
        self.buffered = Gauge(
            "gateway_buffered_records",
            "Records read from Kafka and not finished yet (the memory budget).",
            registry=r,
        )
        self.paused_partitions = Gauge(
            "gateway_paused_partitions", "Partitions paused for back-pressure.", registry=r
        )
        self.lag = Gauge(
            "gateway_consumer_lag",
            "Records in the partition after the last one read.",
            ["partition"],
            registry=r,
        )

    def _limits(self, r: CollectorRegistry) -> None:
        """Lanes and rate-limit buckets."""
        self.lane_depth = LaneDepth(self.app_label)
        r.register(self.lane_depth)
        self.sinch_app_queue = Gauge(
            "gateway_sinch_app_queue_messages",
            "Messages waiting in the app's ingress queue at Sinch (queue_stats.outbound_size).",
            ["app_id"],
            registry=r,
        )
        self.app_queue_factor = Gauge(
            "gateway_app_queue_factor",
            "Share of the app's rate the gateway sends at while its Sinch queue drains "
            "slower than reported (1: full rate).",
            ["app_id"],
            registry=r,
        )
        self.app_rate_source = Gauge(
            "gateway_app_rate_source",
            "1 for where the app's rate in force comes from: configured, sinch or fallback.",
            ["app_id", "source"],
            registry=r,
        )
        self.sinch_app_reads = Counter(
            "gateway_sinch_app_reads",
            "Reads of the app resource (rates and queue) at Sinch, by result.",
            ["result"],
            registry=r,
        )
        self.limiter_wait = Histogram(
            "gateway_limiter_wait_seconds",
            "Time a request waited for its rate-limit slots.",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.rate_configured = Gauge(
            "gateway_rate_limit_configured",
            "Configured rate of a bucket, requests per second.",
            ["scope", "bucket"],
            registry=r,
        )
        self.rate_effective = Gauge(
            "gateway_rate_limit_effective",
            "Rate a bucket paces at now (after margins and adaptive slow-down), per second.",
            ["scope", "bucket"],
            registry=r,
        )

    def _sinch(self, r: CollectorRegistry) -> None:
        """Calls to the Conversation API: answers, retries, latency."""
        self.responses = Counter(
            "gateway_sinch_responses",
            "Answers from the Conversation API by HTTP status class "
            "(2xx, 4xx, 429, 5xx, or 'error' when there was no answer).",
            ["status_class"],
            registry=r,
        )
        self.retries = Counter(
            "gateway_retries", "Attempts scheduled again, by reason.", ["reason"], registry=r
        )
        self.in_doubt = Counter(
            "gateway_in_doubt",
            "Attempts that may have reached Sinch without an answer (timeouts after sending).",
            registry=r,
        )
        self.in_flight = Gauge(
            "gateway_in_flight_requests",
            "Requests sent to Sinch and not answered yet.",
            registry=r,
        )
        self.sinch_latency = Histogram(
            "gateway_sinch_request_duration_seconds",
            "Duration of one messages:send call.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "gateway_end_to_end_latency_seconds",
            "From the Kafka record timestamp to Sinch's acceptance.",
            buckets=E2E_BUCKETS,
            registry=r,
        )

    def _outputs(self, r: CollectorRegistry) -> None:
        """Endings, the Kafka writes behind them, and the offsets they let commit."""
        self.outcomes = Counter(
            "gateway_requests_finished",
            "Requests that reached a terminal outcome, by app and status "
            "(sent, failed, expired, rejected, cancelled).",
            ["app_id", "status"],
            registry=r,
        )
        self.campaign_outcomes = Counter(
            "gateway_campaign_requests_finished",
            "Requests of a campaign (the envelope's campaign tag) that reached a terminal "
            "outcome, by campaign and status.",
            ["campaign", "status"],
            registry=r,
        )
        self.dlq = Counter(
            "gateway_dlq_records",
            "Records written to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.outcome_write_failures = Counter(
            "gateway_outcome_write_failures",
            "Result, status or DLQ records Kafka refused (each is retried), by topic.",
            ["topic"],
            registry=r,
        )
        self.outcome_writes_failing = Gauge(
            "gateway_outcome_writes_failing",
            "Records whose outputs Kafka refuses now; their partitions commit nothing past them.",
            registry=r,
        )
        self.outcome_oldest_failure = Gauge(
            "gateway_outcome_oldest_failure_seconds",
            "Seconds since the oldest refused output write still being retried first failed.",
            registry=r,
        )
        self.commits = Counter(
            "gateway_offset_commits", "Offset commits, by result.", ["result"], registry=r
        )
        self.shared_limiter_up = Gauge(
            "gateway_shared_limiter_up",
            "1 while the group's limiter in Redis answers (sending holds while it does not).",
            registry=r,
        )
        self.shared_limiter_slots = Gauge(
            "gateway_shared_limiter_slots_drawn",
            "Slots this replica drew from the group's limiter in Redis since it started.",
            registry=r,
        )
        self.shared_limiter_lost = Gauge(
            "gateway_shared_limiter_slots_lost",
            "Slots drawn from the group's limiter that no send of this replica took in time, "
            "by bucket kind (project, app, channel); each is a slot the group did not use.",
            ["kind"],
            registry=r,
        )
        self.shared_limiter_roundtrips = Gauge(
            "gateway_shared_limiter_roundtrips",
            "Calls of the limiter's script in Redis since start (each draws a batch of slots).",
            registry=r,
        )
        self.shared_limiter_failures = Gauge(
            "gateway_shared_limiter_failures",
            "Limiter calls that found Redis unreachable since start.",
            registry=r,
        )
        self.shared_limiter_roundtrip = Histogram(
            "gateway_shared_limiter_roundtrip_seconds",
            "Duration of one call of the limiter's script in Redis.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rebalances = Counter(
            "gateway_rebalances",
            "Partitions revoked from or assigned to this replica, by event (revoked, assigned).",
            ["event"],
            registry=r,
        )
        self.revoke_duration = Histogram(
            "gateway_revoke_duration_seconds",
            "Time a revocation took: hand back, let sends and writes end, commit.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.handed_back = Counter(
            "gateway_revoke_handed_back_records",
            "Records lanes held for revoked partitions, handed back to the next owner unsent.",
            registry=r,
        )
        self.first_send_after_assign = Histogram(
            "gateway_assignment_to_first_send_seconds",
            "From an assignment of requests partitions to the first send after it.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.commit_stalled = Gauge(
            "gateway_partition_commit_stalled_seconds",
            "Seconds the committed offset of a partition has stood still while the partition "
            "holds records (0 when it moves or holds none).",
            ["partition"],
            registry=r,
        )

    def _webhook(self, r: CollectorRegistry) -> None:
        """Signed callbacks from Sinch."""
        self.webhook_events = Counter(
            "gateway_webhook_events",
            "Callbacks received on the webhook, by trigger and result.",
            ["trigger", "result"],
            registry=r,
        )
        self.webhook_nonces = Gauge(
            "gateway_webhook_nonce_cache_entries",
            "Nonces the webhook remembers against replays (at most webhook_nonce_cache_size).",
            registry=r,
        )
        self.webhook_nonce_fallbacks = Counter(
            "gateway_webhook_nonce_fallbacks",
            "Callbacks whose nonce only this replica's cache checked: Redis did not answer.",
            registry=r,
        )

    def _operations(self, r: CollectorRegistry) -> None:
        """Whether the gateway can send at all: token, holds, readiness."""
        self.token_refreshes = Counter(
            "gateway_token_refreshes", "OAuth2 token fetches, by result.", ["result"], registry=r
        )
        self.token_expires_in = Gauge(
            "gateway_token_expires_in_seconds",
            "Seconds until the current OAuth2 access token expires "
            "(-1: none valid; 0 with Basic auth, which has no token).",
            registry=r,
        )
        self.sending_paused = Gauge(
            "gateway_sending_paused",
            "Sending held: scope 'auth' is 1 while Sinch refuses the credentials, "
            "scope 'project' while it refuses the project; "
            "scope 'app' counts the app lanes held after an app-level refusal, "
            "scope 'admin' the apps an operator paused.",
            ["scope"],
            registry=r,
        )
        self.admin_actions = Counter(
            "gateway_admin_actions",
            "Changes made through the admin API on this replica, by action "
            "(pause, resume, rate, rate_clear, drop).",
            ["action"],
            registry=r,
        )
        self.ready = Gauge("gateway_ready", "1 when /readyz answers 200.", registry=r)
