"""deploy/prometheus, deploy/grafana and deploy/METRICS.md, checked like code.

promtool comes from the Debian package ``prometheus`` (.ci/run installs it); a missing
promtool fails these tests rather than skipping them. The live checks (a real scrape,
a real Prometheus) are in tests/integration/test_prometheus.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.metrics import Metrics
from gateway.simulator.server import make_app
from gateway.simulator.settings import SimulatorSettings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
ALERTS = PROM / "alerts.yml"
ALERTS_TEST = PROM / "alerts_test.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "sinch-gateway.json"
CATALOG = DEPLOY / "METRICS.md"


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} not found on PATH: install the Debian package prometheus "
            "(apt-get install prometheus; .ci/run does it)"
        )
    return found


def run_tool(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        [tool(args[0]), *args[1:]],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )
    out = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, out
    return out


# -- PromQL -------------------------------------------------------------------------

_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
    }
)
_TOKEN = re.compile(
    r"(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?[a-z]*)|(?P<id>[A-Za-z_:][A-Za-z0-9_:]*)"
)


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced by values Prometheus accepts."""
    expr = re.sub(r"\$__(?:rate_)?interval|\$\{__(?:rate_)?interval\}|\$__range", "1m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (functions, keywords, labels and grouping excluded)."""
    expr = grafana_to_promql(expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges and subqueries
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\boffset\s+-?\w+", " ", expr)
    names: set[str] = set()
    for m in _TOKEN.finditer(expr):
        name = m.group("id")
        if name is None or name.lower() in _KEYWORDS:
            continue
        if expr[m.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        names.add(name)
    return names


def test_metric_names_finds_metrics_and_nothing_else() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, app_id) (rate(gateway_x_seconds_bucket"
        '{job=~"$job", status="sent"}[$__rate_interval]))) / on (job) group_left (instance) '
        "clamp_min(sum without (partition) (gateway_y_total offset 5m), 1e-9) > 0.5 "
        'and absent(up{job=~".*sinch-gateway.*"} == 1) unless max_over_time(g_z[5m:1m]) > bool 1'
    )
    assert metric_names(expr) == {"gateway_x_seconds_bucket", "gateway_y_total", "up", "g_z"}


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p["targets"]]


def dashboard_variable_queries() -> list[str]:
    out = []
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert inner is not None, query
            out.append(inner.group(1))
    return out


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert:\s*(\w+)\s*$", ALERTS.read_text(), re.MULTILINE)


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


SYNTHETIC = {"up"}  # made by Prometheus, not exported


def declared_series() -> set[str]:
    """Every series name the gateway's and the simulator's collectors can export."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
    }
    sim_registry = CollectorRegistry()
    make_app(SimulatorSettings(port=0), sim_registry)
    names = set()
    for registry in (Metrics(CollectorRegistry()).registry, sim_registry):
        for family in registry.collect():
            names.add(family.name)
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
    return names


# -- promtool ------------------------------------------------------------------------


def test_promtool_check_config_accepts_prometheus_yml_and_its_rules() -> None:
    out = run_tool("promtool", "check", "config", str(PROM / "prometheus.yml"))
    assert "SUCCESS" in out
    assert f"{len(alert_names())} rules found" in out


def test_promtool_check_rules_accepts_the_alerts() -> None:
    out = run_tool("promtool", "check", "rules", str(ALERTS))
    assert f"SUCCESS: {len(alert_names())} rules found" in out


def test_promtool_test_rules_provokes_every_alert() -> None:
    run_tool("promtool", "test", "rules", ALERTS_TEST.name, cwd=PROM)
    tested = set(re.findall(r"^\s*alertname:\s*(\w+)", ALERTS_TEST.read_text(), re.MULTILINE))
    text = ALERTS_TEST.read_text()
    fired = {
        name
        for name in tested
        if re.search(rf"alertname: {name}\n\s*exp_alerts:\n\s*- exp_labels", text)
    }
    assert sorted(fired) == sorted(alert_names())
    assert len(alert_names()) >= 6


def test_promtool_test_rules_fails_when_an_alert_does_not_fire(tmp_path: Path) -> None:
    """The unit tests above can fail: raise a threshold and the DLQ alert stays silent."""
    rules = ALERTS.read_text()
    assert "> 0.05\n" in rules
    (tmp_path / "alerts.yml").write_text(rules.replace("> 0.05\n", "> 0.5\n", 1))
    shutil.copy(ALERTS_TEST, tmp_path / ALERTS_TEST.name)
    proc = subprocess.run(
        [tool("promtool"), "test", "rules", ALERTS_TEST.name],
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert b"GatewayDLQRateHigh" in proc.stdout + proc.stderr


def test_the_required_alerts_exist() -> None:
    required = {
        "GatewayDLQRateHigh",
        "GatewaySustained429s",
        "GatewayConsumerLagGrowing",
        "GatewayTokenRefreshFailing",
        "GatewayNothingSent",
        "GatewayDown",
    }
    assert required <= set(alert_names())
    assert len(set(alert_names())) == len(alert_names())


def test_new_alerts_watch_outputs_progress_and_the_project() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert "gateway_outcome_writes_failing" in rules["GatewayOutcomeWritesFailing"]["expr"]
    stalled = rules["GatewayPartitionStalled"]["expr"]
    assert "gateway_partition_commit_stalled_seconds" in stalled
    assert "> 300" in stalled  # the default stall_timeout_s, where /readyz turns false
    assert 'scope="project"' in rules["GatewayProjectRefused"]["expr"]
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]


@pytest.mark.parametrize(
    ("alert", "old", "new"),
    [
        # replicas that read the same app report the same queue: a sum fires on app-d's 2 x 6000
        (
            "GatewaySinchQueueGrowing",
            "max by (job, app_id) (gateway_sinch_app",
            "sum by (job, app_id) (gateway_sinch_app",
        ),
        # the spill backlog is spread over partitions: the largest one alone is below the threshold
        (
            "GatewaySpillLagHigh",
            "sum by (job) (gateway_spill_lag)",
            "max by (job) (gateway_spill_lag)",
        ),
        # a replica on local buckets (no redis_url) exports gateway_shared_limiter_up 0 too
        (
            "GatewaySharedLimiterDown",
            "gateway_shared_limiter_up == 0 and gateway_shared_limiter_failures > 0",
            "gateway_shared_limiter_up == 0",
        ),
        # the storm is spread over three replicas: none alone passes 10
        (
            "GatewayRebalanceStorm",
            "sum by (job) (increase(gateway_rebalances_total",
            "max by (job) (increase(gateway_rebalances_total",
        ),
        # assignments are not revocations: the EU job is assigned partitions 3 times a minute
        (
            "GatewayRebalanceStorm",
            'gateway_rebalances_total{event="revoked"}[10m]',
            "gateway_rebalances_total[10m]",
        ),
    ],
)
def test_promtool_test_rules_tells_alerts_from_look_alikes(
    tmp_path: Path, alert: str, old: str, new: str
) -> None:
    rules = ALERTS.read_text()
    assert rules.count(old) == 1
    (tmp_path / "alerts.yml").write_text(rules.replace(old, new))
    shutil.copy(ALERTS_TEST, tmp_path / ALERTS_TEST.name)
    proc = subprocess.run(
        [tool("promtool"), "test", "rules", ALERTS_TEST.name],
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert alert.encode() in proc.stdout + proc.stderr


def test_queue_alerts_watch_sinch_queues_and_the_spill_topic() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    queue = rules["GatewaySinchQueueGrowing"]
    assert queue["expr"].strip() == (
        "max by (job, app_id) (gateway_sinch_app_queue_messages) > 10000"
    )
    assert queue["for"] == "10m"
    assert "priority and expiry" in queue["annotations"]["description"]
    spill = rules["GatewaySpillLagHigh"]
    assert spill["expr"].strip() == "sum by (job) (gateway_spill_lag) > 100000"
    assert spill["for"] == "30m"
    assert spill["labels"]["severity"] == "warning"


def test_replica_alerts_watch_the_shared_limiter_and_revocations() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    down = rules["GatewaySharedLimiterDown"]
    assert down["expr"].strip() == (
        "gateway_shared_limiter_up == 0 and gateway_shared_limiter_failures > 0"
    )
    assert down["for"] == "1m"
    assert down["labels"]["severity"] == "critical"
    assert "limiter check" in down["annotations"]["description"]
    storm = rules["GatewayRebalanceStorm"]
    assert storm["expr"].strip() == (
        'sum by (job) (increase(gateway_rebalances_total{event="revoked"}[10m])) > 10'
    )
    assert storm["for"] == "5m"
    assert storm["labels"]["severity"] == "warning"


# -- Grafana -------------------------------------------------------------------------


def test_dashboard_is_well_formed() -> None:
    doc = dashboard()
    assert doc["uid"] == "sinch-gateway"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        pos = p["gridPos"]
        assert pos["x"] >= 0, p["title"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
    for p in dashboard_panels():
        assert p["targets"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            assert t["datasource"]["uid"] == "${datasource}"
    refs = [t["refId"] for p in dashboard_panels() for t in p["targets"]]
    assert all(refs)


def test_dashboard_has_per_app_variables_used_by_the_app_panels() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert {"datasource", "job", "instance", "app"} <= set(variables)
    app = variables["app"]
    assert app["multi"] is True
    assert app["includeAll"] is True
    assert app["allValue"] == ".*"
    assert "app_id" in app["query"]["query"]
    for expr in dashboard_exprs():
        if "gateway_lane_depth" in expr or 'scope="app"' in expr:
            assert "$app" in expr, expr
    assert sum("$app" in e for e in dashboard_exprs()) >= 6


def test_dashboard_covers_every_gateway_metric() -> None:
    m = Metrics(CollectorRegistry())
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    bases = {re.sub(r"_(?:total|bucket|sum|count)$", "", n) for n in used}
    declared = {family.name for family in m.registry.collect()}
    assert sorted(declared - bases) == []


def test_dashboard_and_rules_name_only_declared_metrics() -> None:
    """Checked without a stack; tests/integration/test_prometheus.py checks a live scrape."""
    declared = declared_series()
    queries = {
        **{f"dashboard: {e}": e for e in dashboard_exprs()},
        **{f"variable: {q}": q for q in dashboard_variable_queries()},
        **{f"alert {r['alert']}: {r['expr']}": r["expr"] for r in alert_rules()},
    }
    unknown = {
        where: sorted(metric_names(q) - declared - SYNTHETIC)
        for where, q in queries.items()
        if metric_names(q) - declared - SYNTHETIC
    }
    assert unknown == {}
    assert all(metric_names(q) for q in queries.values())
    # the comparison can fail: a misspelt metric is caught
    assert metric_names("gateway_outcome_write_failure_total") - declared


def test_dashboard_panels_do_not_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for p in dashboard()["panels"]:
        pos = p["gridPos"]
        for y in range(pos["y"], pos["y"] + pos["h"]):
            for x in range(pos["x"], pos["x"] + pos["w"]):
                assert (x, y) not in taken, f"{p['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = p["title"]


def test_outputs_and_progress_row_shows_the_new_metrics() -> None:
    panels = dashboard()["panels"]
    rows = [i for i, p in enumerate(panels) if p["type"] == "row"]
    start = next(i for i in rows if panels[i]["title"] == "Outputs and progress")
    end = next((i for i in rows if i > start), len(panels))
    exprs = [t["expr"] for p in panels[start + 1 : end] for t in p["targets"]]
    shown = set().union(*(metric_names(e) for e in exprs))
    assert shown == {
        "gateway_outcome_write_failures_total",
        "gateway_outcome_writes_failing",
        "gateway_outcome_oldest_failure_seconds",
        "gateway_partition_commit_stalled_seconds",
        "gateway_sending_paused",
        "gateway_webhook_nonce_cache_entries",
    }
    assert any("by (topic)" in e for e in exprs)
    assert any("by (partition)" in e for e in exprs)
    assert any("project" in e and "gateway_sending_paused" in e for e in exprs)


def row_panels(title: str) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = dashboard()["panels"]
    rows = [i for i, p in enumerate(panels) if p["type"] == "row"]
    start = next(i for i in rows if panels[i]["title"] == title)
    end = next((i for i in rows if i > start), len(panels))
    return panels[start + 1 : end]


def test_isolation_and_sinch_queues_row_shows_spill_and_app_resource_metrics() -> None:
    panels = row_panels("Isolation and Sinch queues")
    by_metric = {name: p for p in panels for t in p["targets"] for name in metric_names(t["expr"])}
    assert set(by_metric) == {
        "gateway_spilled_records_total",
        "gateway_spill_taken_back_records_total",
        "gateway_spill_lag",
        "gateway_sinch_app_queue_messages",
        "gateway_app_queue_factor",
        "gateway_app_rate_source",
        "gateway_sinch_app_reads_total",
    }
    assert len(panels) == 6

    def exprs(metric: str) -> str:
        return " ".join(t["expr"] for t in by_metric[metric]["targets"] if metric in t["expr"])

    spilled = by_metric["gateway_spilled_records_total"]
    assert spilled is by_metric["gateway_spill_taken_back_records_total"]  # one panel
    for metric in ("gateway_spilled_records_total", "gateway_spill_taken_back_records_total"):
        assert re.search(r"topk\(10, sum by \(app_id\) \(rate\(", exprs(metric)), metric
    assert "by (partition)" in exprs("gateway_spill_lag")
    # replicas reading one app report the same queue: max, never sum
    assert re.search(r"topk\(10, max by \(app_id\)", exprs("gateway_sinch_app_queue_messages"))
    assert "min by (app_id)" in exprs("gateway_app_queue_factor")
    assert by_metric["gateway_app_rate_source"]["type"] in {"table", "state-timeline"}
    assert "by (app_id, source)" in exprs("gateway_app_rate_source")
    assert re.search(r"by \(result\) \(rate\(", exprs("gateway_sinch_app_reads_total"))
    for metric in (
        "gateway_spilled_records_total",
        "gateway_sinch_app_queue_messages",
        "gateway_app_queue_factor",
        "gateway_app_rate_source",
    ):
        assert 'app_id=~"$app"' in exprs(metric), metric


def test_replicas_and_rebalances_row_shows_rebalances_and_the_shared_limiter() -> None:
    panels = row_panels("Replicas and rebalances")
    by_metric = {name: p for p in panels for t in p["targets"] for name in metric_names(t["expr"])}
    assert set(by_metric) == {
        "gateway_rebalances_total",
        "gateway_revoke_duration_seconds_bucket",
        "gateway_revoke_handed_back_records_total",
        "gateway_assignment_to_first_send_seconds_bucket",
        "gateway_shared_limiter_up",
        "gateway_shared_limiter_failures",
        "gateway_shared_limiter_roundtrip_seconds_bucket",
        "gateway_shared_limiter_slots_drawn",
        "gateway_shared_limiter_slots_lost",
        "gateway_shared_limiter_roundtrips",
    }
    assert len(panels) == 8
    assert {p["type"] for p in panels} == {"timeseries"}

    def exprs(title: str) -> list[str]:
        return [t["expr"] for p in panels if p["title"] == title for t in p["targets"]]

    # per minute, whatever $__rate_interval is
    assert exprs("Rebalances /min by event") == [
        'sum by (event) (rate(gateway_rebalances_total{job=~"$job", instance=~"$instance"}'
        "[$__rate_interval])) * 60"
    ]
    assert re.search(
        r"sum by \(instance\) \(rate\(.*\)\) \* 60", *exprs("Records handed back /min")
    )
    quantiles = {
        "Revoke duration": ["0.5", "0.99"],
        "Assignment to first send": ["0.99"],
        "Shared limiter round trip": ["0.5", "0.99"],
    }
    for title, qs in quantiles.items():
        found = [
            re.match(r"histogram_quantile\(([\d.]+), sum by \(le\) \(rate\(", e)
            for e in exprs(title)
        ]
        assert [m.group(1) for m in found if m] == qs, title
    # replicas on local buckets export up 0 and never fail: they are left out, not shown down
    (up,) = exprs("Shared limiter up")
    assert up.startswith("min by (instance) (gateway_shared_limiter_up{")
    assert re.search(r"gateway_shared_limiter_failures\{[^}]*\} > 0", up)
    for title in ("Slots drawn, lost and round trips /s", "Shared limiter failures /s"):
        assert all(e.startswith("sum by (instance") for e in exprs(title)), title
        assert all("(rate(" in e for e in exprs(title)), title
    # lost slots by bucket kind: a lost project slot is the group's, a lost app slot the app's
    assert any("by (instance, kind)" in e for e in exprs("Slots drawn, lost and round trips /s"))


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard_dir() -> None:
    sources = list((GRAFANA / "provisioning" / "datasources").glob("*.yml"))
    providers = list((GRAFANA / "provisioning" / "dashboards").glob("*.yml"))
    assert sources
    assert providers
    source = sources[0].read_text()
    assert re.search(r"^\s*type: prometheus$", source, re.MULTILINE)
    assert re.search(r"^\s*url: http://prometheus:9090$", source, re.MULTILINE)
    ds_var = next(v for v in dashboard()["templating"]["list"] if v["name"] == "datasource")
    assert re.search(rf"^\s*uid: {ds_var['current']['value']}$", source, re.MULTILINE)
    provider = providers[0].read_text()
    assert re.search(r"^\s*type: file$", provider, re.MULTILINE)
    assert re.search(r"^\s*path: /var/lib/grafana/dashboards$", provider, re.MULTILINE)


# -- the catalog ---------------------------------------------------------------------


def catalog_rows() -> list[str]:
    return re.findall(r"^\| `([A-Za-z_:][\w:]*)` \|", CATALOG.read_text(), re.MULTILINE)


def exported_names(registry: CollectorRegistry) -> set[str]:
    names = set()
    for family in registry.collect():
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def test_catalog_documents_every_metric_and_alert_exactly_once() -> None:
    rows = catalog_rows()
    duplicates = sorted({r for r in rows if rows.count(r) > 1})
    assert duplicates == []
    sim_registry = CollectorRegistry()
    make_app(SimulatorSettings(port=0), sim_registry)
    exported = exported_names(Metrics(CollectorRegistry()).registry) | exported_names(sim_registry)
    assert sorted(set(rows) - set(alert_names())) == sorted(exported)
    assert set(alert_names()) <= set(rows)
