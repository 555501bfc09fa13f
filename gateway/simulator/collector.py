"""The simulator's Prometheus metrics: plain counters turned into families at scrape time."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

MAX_APP_LABELS: Final = 100


class SimulatorMetrics(Collector):
    """The simulator's Prometheus metrics, on its own registry.

    The hot path only increments plain ints; they become counter families at scrape
    time, so a send takes no lock. The values are monotonic (``/_sim/reset`` leaves
    them alone).
    """

    def __init__(self, registry: CollectorRegistry, callbacks: Mapping[str, int]) -> None:
        self.registry = registry
        self.requests: dict[tuple[str, int], int] = {}
        self.accepted: dict[str, int] = {}
        self.tokens = 0
        self._callbacks = callbacks
        self._labelled: set[str] = set()
        registry.register(self)

    def request(self, endpoint: str, code: int) -> None:
        key = (endpoint, code)
        self.requests[key] = self.requests.get(key, 0) + 1

    def app_label(self, app_id: str) -> str:
        """``app_id`` for the first 100 apps seen, then ``other``."""
        if app_id in self._labelled:
            return app_id
        if len(self._labelled) < MAX_APP_LABELS:
            self._labelled.add(app_id)
            return app_id
        return "other"

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "sinch_sim_requests", "Requests answered by the simulator.", labels=["endpoint", "code"]
        )
        for (endpoint, code), n in sorted(self.requests.items()):
            requests.add_metric([endpoint, str(code)], n)
        accepted = CounterMetricFamily(
            "sinch_sim_accepted",
            "Sends accepted, by app (100 apps, then other).",
            labels=["app_id"],
        )
        for app_id, n in sorted(self.accepted.items()):
            accepted.add_metric([app_id], n)
        callbacks = CounterMetricFamily(
            "sinch_sim_callbacks", "Callback posts by result.", labels=["result"]
        )
        for result, n in sorted(self._callbacks.items()):
            callbacks.add_metric([result], n)
        yield requests
        yield accepted
        yield CounterMetricFamily(
            "sinch_sim_token_requests", "Calls to /oauth2/token.", value=self.tokens
        )
        yield callbacks
