"""gateway/metrics.py: names, bounded labels, the lane-depth collector, and that every
collector is bound to something that updates it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import LabelCap, LaneDepth, Metrics

ROOT = Path(__file__).resolve().parent.parent


def scrape(registry: CollectorRegistry) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name → {sorted labels: value} from the text exposition."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def collectors(m: Metrics) -> dict[str, object]:
    return {
        attr: value
        for attr, value in vars(m).items()
        if isinstance(value, Counter | Gauge | Histogram | LaneDepth)
    }


def test_label_cap_keeps_the_first_values_and_folds_the_rest_into_other() -> None:
    cap = LabelCap(2)
    got = [cap(v) for v in ("a", "b", "c", "a", "d", "b")]
    assert got == ["a", "b", "other", "a", "other", "b"]


def test_app_labels_are_capped_across_metrics() -> None:
    m = Metrics(CollectorRegistry(), max_app_labels=2)
    for app in ("a1", "a2", "a3", "a4"):
        m.outcomes.labels(m.app_label(app), "sent").inc()
    sent = scrape(m.registry)["gateway_requests_finished_total"]
    apps = {dict(labels)["app_id"]: value for labels, value in sent.items()}
    assert apps == {"a1": 1.0, "a2": 1.0, "other": 2.0}


def test_names_follow_prometheus_conventions() -> None:
    m = Metrics(CollectorRegistry())
    found = collectors(m)
    assert len(found) >= 22
    for family in m.registry.collect():
        assert family.name.startswith("gateway_"), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        if family.type == "counter":
            assert not family.name.endswith("_total")  # the client adds the suffix
            assert family.documentation, family.name


def test_fixed_label_children_exist_at_zero_from_the_start() -> None:
    samples = scrape(Metrics(CollectorRegistry()).registry)
    classes = {dict(k)["status_class"] for k in samples["gateway_sinch_responses_total"]}
    assert classes == {"2xx", "4xx", "429", "5xx", "error"}
    assert set(samples["gateway_token_refreshes_total"].values()) == {0.0}
    results = {dict(k)["result"] for k in samples["gateway_token_refreshes_total"]}
    assert results == {"success", "failure"}
    scopes = {dict(k)["scope"] for k in samples["gateway_sending_paused"]}
    assert scopes == {"auth", "project", "app", "admin"}
    actions = {dict(k)["action"] for k in samples["gateway_admin_actions_total"]}
    assert actions == {"pause", "resume", "rate", "rate_clear", "drop"}


def test_lane_depth_reads_the_lanes_at_scrape_time_and_caps_apps() -> None:
    m = Metrics(CollectorRegistry(), max_app_labels=2)
    assert "gateway_lane_depth" not in scrape(m.registry)  # unbound: no samples
    depths = {"a1": 3, "a2": 0, "a3": 5, "a4": 1}
    m.lane_depth.bind(lambda: list(depths.items()))
    first = scrape(m.registry)["gateway_lane_depth"]
    assert {dict(k)["app_id"]: v for k, v in first.items()} == {"a1": 3, "a2": 0, "other": 6}
    depths["a1"] = 0
    second = scrape(m.registry)["gateway_lane_depth"]
    assert {dict(k)["app_id"]: v for k, v in second.items()}["a1"] == 0


def test_two_instances_on_their_own_registries_do_not_clash() -> None:
    a, b = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    a.consumed.inc(3)
    assert scrape(a.registry)["gateway_requests_consumed_total"][()] == 3
    assert scrape(b.registry)["gateway_requests_consumed_total"][()] == 0


def test_every_collector_is_updated_somewhere_in_the_gateway() -> None:
    """A collector declared in metrics.py and never set, observed or bound is a lie."""
    sources = "\n".join(
        p.read_text() for p in (ROOT / "gateway").glob("*.py") if p.name != "metrics.py"
    )
    # called, handed over as a callback (``on_wait=m.limiter_wait.observe``), or a
    # labelled child taken (and then updated)
    update = r"\.(?:inc|dec|set|set_function|observe|bind|labels)\b"
    unbound = [
        attr
        for attr in collectors(Metrics(CollectorRegistry()))
        if not re.search(rf"\b(?:m|_m|metrics)\.{attr}{update}", sources)
    ]
    assert unbound == []


def test_promtool_accepts_a_populated_exposition() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install the Debian package prometheus (.ci/run does)")
    m = Metrics(CollectorRegistry())
    m.consumed.inc()
    m.outcomes.labels("a1", "sent").inc()
    m.retries.labels("429").inc()
    m.dlq.labels("http_400").inc()
    m.limiter_wait.observe(0.02)
    m.e2e.observe(1.5)
    m.sinch_latency.observe(0.1)
    m.rate_configured.labels("app", "a1").set(20)
    m.rate_effective.labels("app", "a1").set(19)
    m.lag.labels("0").set(7)
    m.webhook_events.labels("MESSAGE_DELIVERY", "published").inc()
    m.lane_depth.bind(lambda: [("a1", 2)])
    proc = subprocess.run(
        [promtool, "check", "metrics"],
        input=generate_latest(m.registry),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
