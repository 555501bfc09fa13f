"""A real Prometheus scrapes the gateway and the simulator during an end-to-end run.

One stack per module: the simulator, the gateway on the shared broker, and a
Prometheus (Debian package ``prometheus``; a missing binary fails, not skips) on a
free loopback port with a temporary config and storage, scraping every 0.5 s and
evaluating deploy/prometheus/alerts.yml. Then:

- the sent count Prometheus stored equals the number of messages sent;
- ``promtool check metrics`` accepts both live scrapes;
- every metric named by the dashboard and the rules is in those scrapes;
- every dashboard query and every rule evaluates on that Prometheus.

The test never touches another Prometheus of the machine (the Debian package's
service may hold 9090): it talks only to its own, and stops it by its PID.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from gateway.broker import EmbeddedBroker, free_port, stop_process
from gateway.simulator import cli as sim_cli
from gateway.simulator.settings import SimulatorSettings
from tests.conftest import wait_for
from tests.integration.harness import publish, read_records, requests_for, running, settings_for
from tests.test_observability_assets import (
    ALERTS,
    alert_names,
    dashboard_exprs,
    dashboard_variable_queries,
    grafana_to_promql,
    metric_names,
    run_tool,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

APPS = ["prom-a", "prom-b", "prom-c"]
SENT = 60
BAD = [b"not json", b'{"request_id": "no-payload"}']
# Made by Prometheus itself for every target, not by an exporter.
SYNTHETIC = {"up"}


@dataclass
class Stack:
    http: aiohttp.ClientSession
    prometheus: str
    gateway: str
    simulator: str
    secret: str
    tmp: Path

    async def query(self, promql: str) -> dict[str, Any]:
        async with self.http.get(
            f"{self.prometheus}/api/v1/query", params={"query": promql}
        ) as resp:
            doc: dict[str, Any] = await resp.json()
        assert doc["status"] == "success", (promql, doc)
        return doc

    async def scalar(self, promql: str) -> float | None:
        result = (await self.query(promql))["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    async def text(self, url: str) -> str:
        async with self.http.get(url) as resp:
            assert resp.status == 200
            return await resp.text()


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.fail(
            "prometheus not found on PATH: install the Debian package prometheus "
            "(apt-get install prometheus; .ci/run does it)"
        )
    return found


def prometheus_config(gateway_port: int, sim_port: int) -> str:
    return f"""
global:
  scrape_interval: 500ms
  scrape_timeout: 400ms
  evaluation_interval: 500ms
rule_files:
  - {ALERTS}
scrape_configs:
  - job_name: sinch-gateway
    static_configs:
      - targets: ["127.0.0.1:{gateway_port}"]
  - job_name: sinch-simulator
    static_configs:
      - targets: ["127.0.0.1:{sim_port}"]
"""


def start_prometheus(binary: str, tmp: Path, config: str, port: int) -> subprocess.Popen[bytes]:
    (tmp / "prometheus.yml").write_text(config)
    with (tmp / "prometheus.log").open("wb") as log_file:
        return subprocess.Popen(
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log_file,
            stderr=log_file,
        )


def exit_report(proc: subprocess.Popen[bytes], tmp: Path) -> str:
    return f"prometheus exited ({proc.returncode}): {(tmp / 'prometheus.log').read_text()[-2000:]}"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(
    broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    binary = prometheus_binary()
    tmp = tmp_path_factory.mktemp("prometheus")
    sim_runner, sim_port = await sim_cli.start(SimulatorSettings(port=0, app_rate=100))
    tag = uuid.uuid4().hex[:8]
    topics = {
        name: f"{short}-{tag}"
        for name, short in (
            ("requests_topic", "req"),
            ("results_topic", "res"),
            ("status_topic", "sta"),
            ("dlq_topic", "dlq"),
            ("events_topic", "evt"),
            ("group_id", "grp"),
        )
    }
    settings = settings_for(broker.bootstrap, sim_port, topics, app_rate=100)
    http = aiohttp.ClientSession()
    try:
        async with running(settings) as gateway:
            port = free_port()
            config = prometheus_config(gateway.http_port or 0, sim_port)
            proc = start_prometheus(binary, tmp, config, port)
            s = Stack(
                http,
                f"http://127.0.0.1:{port}",
                f"http://127.0.0.1:{gateway.http_port}",
                f"http://127.0.0.1:{sim_port}",
                settings.key_secret.reveal(),
                tmp,
            )
            try:
                await wait_until_scraping(s, proc, tmp)
                docs = requests_for(APPS, SENT) + [(b"bad", v) for v in BAD]
                await publish(broker.bootstrap, settings.requests_topic, docs)
                results = await read_records(
                    broker.bootstrap, settings.results_topic, len(docs), 30
                )
                statuses = [orjson.loads(r.value)["status"] for r in results]
                assert statuses.count("sent") == SENT
                assert statuses.count("rejected") == len(BAD)
                yield s
            finally:
                await asyncio.to_thread(stop_process, proc)
    finally:
        await http.close()
        await sim_runner.cleanup()


async def wait_until_scraping(s: Stack, proc: subprocess.Popen[bytes], tmp: Path) -> None:
    async def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(exit_report(proc, tmp))
        try:
            return await s.scalar('sum(up{job=~"sinch-.*"})') == 2
        except aiohttp.ClientError:
            return False

    await wait_for(up, 20, what="prometheus to scrape the gateway and the simulator")


async def test_the_prometheus_queried_is_the_tests_own(stack: Stack) -> None:
    async with stack.http.get(f"{stack.prometheus}/api/v1/status/flags") as resp:
        flags = (await resp.json())["data"]
    assert flags["web.listen-address"] == stack.prometheus.removeprefix("http://")
    assert not flags["web.listen-address"].endswith(":9090")
    assert Path(flags["storage.tsdb.path"]).is_relative_to(stack.tmp)
    assert Path(flags["config.file"]).is_relative_to(stack.tmp)


def ci_commands() -> str:
    """The commands of .ci/run, comments left out."""
    script = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    lines = (line.split("#", 1)[0] for line in script.splitlines())
    return "\n".join(line for line in lines if line.strip())


async def test_ci_leaves_the_machines_processes_alone() -> None:
    """.ci/run installs packages; it never stops or kills a process it did not start."""
    commands = ci_commands()
    assert not re.search(r"\b(pkill|killall|kill|systemctl|service)\b", commands), commands
    assert re.search(r"apt-get install .*packages", commands)
    assert "packages+=(prometheus)" in commands
    assert "packages+=(redis-server)" in commands
    assert "9090" not in commands


async def test_prometheus_stores_the_sent_count(stack: Stack) -> None:
    expected = {
        'sum(gateway_requests_finished_total{job="sinch-gateway", status="sent"})': SENT,
        'sum(sinch_sim_accepted_total{job="sinch-simulator"})': SENT,
        'sum(gateway_requests_finished_total{job="sinch-gateway", status="rejected"})': len(BAD),
        'sum(gateway_dlq_records_total{job="sinch-gateway"})': len(BAD),
    }
    last: dict[str, float | None] = {}

    async def stored() -> bool:
        # each target is scraped every 0.5 s; the run may have ended between two scrapes
        last.update({q: await stack.scalar(q) for q in expected})
        return last == expected

    try:
        await wait_for(stored, 15, what="prometheus to store the counts of the run")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last values {last}") from None
    per_app = (
        await stack.query('sum by (app_id) (gateway_requests_finished_total{status="sent"})')
    )["data"]["result"]
    assert {r["metric"]["app_id"]: float(r["value"][1]) for r in per_app} == {
        app: SENT / len(APPS) for app in APPS
    }
    # the gateway's own view agrees, and no secret is in any label
    text = await stack.text(f"{stack.gateway}/metrics")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    gateway_sent = sum(
        s.value
        for s in families["gateway_requests_finished"].samples
        if s.name.endswith("_total") and s.labels["status"] == "sent"
    )
    assert gateway_sent == SENT
    assert stack.secret not in text


async def test_promtool_check_metrics_accepts_the_live_scrapes(stack: Stack) -> None:
    for url in (f"{stack.gateway}/metrics", f"{stack.simulator}/metrics"):
        text = await stack.text(url)
        assert "# TYPE" in text
        await asyncio.to_thread(run_tool, "promtool", "check", "metrics", stdin=text.encode())


def exported(text: str) -> set[str]:
    """Every series name a scrape offers, with the suffixes each type gets."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
    }
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
        names.update(s.name for s in family.samples)
    return names


async def rules(stack: Stack) -> list[dict[str, Any]]:
    async with stack.http.get(f"{stack.prometheus}/api/v1/rules") as resp:
        doc = await resp.json()
    return [r for group in doc["data"]["groups"] for r in group["rules"]]


async def test_dashboard_and_rules_name_only_exported_metrics(stack: Stack) -> None:
    offered = exported(await stack.text(f"{stack.gateway}/metrics")) | exported(
        await stack.text(f"{stack.simulator}/metrics")
    )
    loaded = await rules(stack)
    assert sorted(r["name"] for r in loaded) == sorted(alert_names())
    queries = {
        **{f"dashboard: {e}": e for e in dashboard_exprs()},
        **{f"variable: {q}": q for q in dashboard_variable_queries()},
        **{f"alert {r['name']}: {r['query']}": r["query"] for r in loaded},
    }
    unknown = {
        where: sorted(metric_names(q) - offered - SYNTHETIC)
        for where, q in queries.items()
        if metric_names(q) - offered - SYNTHETIC
    }
    assert unknown == {}
    assert all(metric_names(q) for q in queries.values())
    # the comparison can fail: a misspelt metric is caught
    assert metric_names("rate(gateway_requests_finishd_total[5m])") - offered


async def test_every_dashboard_query_and_rule_evaluates_on_prometheus(stack: Stack) -> None:
    for expr in dashboard_exprs():
        await stack.query(grafana_to_promql(expr))  # asserts "success"
    sel = 'job=~"$job", instance=~"$instance"'
    with_data = [
        f"sum(rate(gateway_requests_consumed_total{{{sel}}}[$__rate_interval]))",
        f'sum by (app_id) (gateway_lane_depth{{{sel}, app_id=~"$app"}})',
        f'sum by (bucket) (gateway_rate_limit_configured{{{sel}, scope="app", bucket=~"$app"}})',
    ]
    for expr in with_data:
        assert expr in dashboard_exprs(), expr
        assert (await stack.query(grafana_to_promql(expr)))["data"]["result"], expr

    loaded: list[dict[str, Any]] = []

    async def all_evaluated() -> bool:
        loaded[:] = await rules(stack)
        # never evaluated: Go's zero time, "0001-01-01T00:00:00Z"
        return bool(loaded) and not any(r["lastEvaluation"].startswith("0001") for r in loaded)

    await wait_for(all_evaluated, 10, what="prometheus to evaluate every rule")
    assert {r["name"]: r["health"] for r in loaded} == dict.fromkeys(alert_names(), "ok")
    firing = [r["name"] for r in loaded if r["state"] == "firing"]
    assert firing == []  # a healthy run raises no alert
