"""deploy/docker-compose.yml: it parses, its references resolve, and the gateway and
simulator it configures are configured the way their own parsers accept.

No Docker engine runs here; the checks use the gateway's own settings loader and CLI
parser, so a key the gateway would refuse at startup fails here first.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from gateway.cli import build_parser
from gateway.settings import Settings, load
from gateway.simulator import cli as sim_cli

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the install
    yaml = None

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    if yaml is None:
        pytest.fail("PyYAML is not installed: pip install -e '.[dev]'")
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = compose["services"]
    return found


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    out = []
    for spec in service.get("ports", []):
        host, host_port, container_port = str(spec).rsplit(":", 2)
        out.append((host, int(host_port), int(container_port)))
    return out


def gateway_names(services: dict[str, Any]) -> list[str]:
    """The services that run ``gateway run`` (the replicas)."""
    return sorted(n for n, s in services.items() if s.get("command") == ["run"])


def gateway_settings(services: dict[str, Any], name: str = "gateway") -> Settings:
    """A gateway's settings, as its own loader reads its environment at startup."""
    return load(env=env_of(services[name]))


def simulator_args(services: dict[str, Any]) -> Any:
    command = services["simulator"]["command"]
    argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    return build_parser().parse_args(argv)


def test_expected_services(services: dict[str, Any]) -> None:
    assert {"kafka", "kafka-init", "gateway", "simulator", "prometheus", "grafana"} <= set(services)
    assert {"redis", "gateway-2"} <= set(services)
    assert gateway_names(services) == ["gateway", "gateway-2"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_every_referenced_service_exists(services: dict[str, Any]) -> None:
    for name, service in services.items():
        depends = service.get("depends_on", [])
        for target in depends if isinstance(depends, list) else depends.keys():
            assert target in services, f"{name} depends on unknown service {target}"
            assert target != name
        for key in ("links", "volumes_from"):
            for target in service.get(key, []):
                assert target.split(":")[0] in services, f"{name}.{key}: {target}"
        conditions = service.get("depends_on", {})
        if isinstance(conditions, dict):
            for target, spec in conditions.items():
                if spec.get("condition") == "service_healthy":
                    assert "healthcheck" in services[target], (
                        f"{name} waits for {target} to be healthy; it has no healthcheck"
                    )


def test_mounted_paths_and_build_context_exist(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
        build = service.get("build")
        if build is not None:
            context = DEPLOY / build["context"]
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name


def test_published_ports_stay_on_loopback(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for host, _, _ in published(service):
            assert host == "127.0.0.1", f"{name} publishes on {host}"


@pytest.mark.parametrize("name", ["gateway", "gateway-2"])
def test_gateway_environment_is_exactly_what_the_gateway_reads(
    services: dict[str, Any], name: str
) -> None:
    env = env_of(services[name])
    names = {f.name for f in dataclasses.fields(Settings)}
    known = {f"GATEWAY_{n.upper()}" for n in names} | {"GATEWAY_CONFIG"}
    known |= {f"GATEWAY_{n.upper()}_FILE" for n in names}
    unknown = sorted(set(env) - known)
    assert unknown == [], f"the gateway would refuse these at startup: {unknown}"
    settings = gateway_settings(services, name)
    settings.require_credentials()
    assert settings.webhook_secret is not None
    assert settings.create_topics is False  # kafka-init creates them
    # The demo secrets are obvious demo values, nothing else.
    for var in ("GATEWAY_KEY_SECRET", "GATEWAY_WEBHOOK_SECRET"):
        assert env[var].startswith("demo-")


def test_gateway_reaches_kafka_and_simulator_by_service_name(services: dict[str, Any]) -> None:
    settings = gateway_settings(services)
    kafka_env = services["kafka"]["environment"]
    advertised = kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert f"PLAINTEXT://{settings.kafka_bootstrap}" in advertised
    sim = sim_cli.settings_from_args(simulator_args(services))
    for url in (settings.auth_url, settings.conversation_base(settings.region)):
        parts = urlsplit(url)
        assert parts.hostname == "simulator"
        assert parts.port == sim.port
    assert urlsplit(settings.auth_url).path == "/oauth2/token"
    assert (sim.project_id, sim.key_id, sim.key_secret) == (
        settings.project_id,
        settings.key_id,
        settings.key_secret.reveal(),
    )
    assert sim.host == "0.0.0.0"


def test_simulator_callbacks_reach_the_gateway_webhook(services: dict[str, Any]) -> None:
    settings = gateway_settings(services)
    sim = sim_cli.settings_from_args(simulator_args(services))
    callback = urlsplit(sim.callback_url)
    assert callback.hostname == "gateway"
    assert callback.port == (settings.webhook_port or settings.http_port)
    assert callback.path == "/webhooks/sinch"
    assert settings.webhook_secret is not None
    assert sim.callback_secret == settings.webhook_secret.reveal()


def test_kafka_init_creates_the_gateway_topics(services: dict[str, Any]) -> None:
    init = services["kafka-init"]
    script = "\n".join(init["command"]) if isinstance(init["command"], list) else init["command"]
    created = set(re.search(r"for topic in ([^;]+);", script).group(1).split())  # type: ignore[union-attr]
    settings = gateway_settings(services)
    wanted = {
        settings.requests_topic,
        settings.requests_high_topic,
        settings.results_topic,
        settings.status_topic,
        settings.dlq_topic,
        settings.events_topic,
    }
    assert created == wanted
    # The spill topic, with the partitions the gateway would give it.
    spill = re.search(r"--topic ([\w.-]+) --partitions (\d+)", script)
    assert spill is not None
    assert (spill.group(1), int(spill.group(2))) == (
        settings.spill_topic,
        settings.spill_partitions,
    )
    # The re-drive ledger, compacted: one record per re-driven DLQ record, kept.
    compacted = r"--topic ([\w.-]+) --partitions 1 [^\n]*\n[^\n]*cleanup.policy=compact"
    ledger = re.search(compacted, script)
    assert ledger is not None
    assert ledger.group(1) == settings.redrive_ledger_topic
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in gateway_names(services):
        gateway_waits = services[name]["depends_on"]["kafka-init"]["condition"]
        assert gateway_waits == "service_completed_successfully"


@pytest.mark.parametrize("name", ["gateway", "gateway-2"])
def test_stop_grace_outlasts_the_drain(services: dict[str, Any], name: str) -> None:
    settings = gateway_settings(services, name)
    grace = services[name]["stop_grace_period"]
    seconds = float(grace.rstrip("s")) if isinstance(grace, str) else float(grace)
    assert seconds >= settings.shutdown_timeout_s + 5


def test_replicas_share_one_cap_through_the_redis_service(services: dict[str, Any]) -> None:
    """Both gateways are one consumer group with one project, and draw from one Redis:
    the redis service, without persistence, healthy before they start."""
    redis = services["redis"]
    assert redis["image"].startswith("redis:")
    argv = shlex.split(redis["command"]) if isinstance(redis["command"], str) else redis["command"]
    assert argv[0] == "redis-server"
    options = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert options["--save"] == ""
    assert options["--appendonly"] == "no"
    assert "redis-cli" in redis["healthcheck"]["test"]
    replicas = [gateway_settings(services, name) for name in gateway_names(services)]
    assert len(replicas) == 2
    for name, settings in zip(gateway_names(services), replicas, strict=True):
        assert settings.redis_url is not None, name
        url = urlsplit(settings.redis_url.reveal())
        assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379), name
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    first = replicas[0]
    for other in replicas[1:]:
        assert other.redis_url == first.redis_url
        assert other.redis_key_prefix == first.redis_key_prefix
        assert (other.group_id, other.requests_topic) == (first.group_id, first.requests_topic)
        assert (other.project_id, other.project_rate) == (first.project_id, first.project_rate)
    admin = [port for name in gateway_names(services) for _, port, _ in published(services[name])]
    assert len(admin) == len(set(admin)), f"two gateways publish the same host port: {admin}"


def test_prometheus_scrapes_the_services_of_this_stack(services: dict[str, Any]) -> None:
    prometheus = services["prometheus"]
    config_dir = next(
        v.split(":")[0] for v in prometheus["volumes"] if v.split(":")[1] == "/etc/prometheus"
    )
    config = yaml.safe_load((DEPLOY / config_dir / "prometheus.yml").read_text())
    targets = [
        t
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for t in static["targets"]
    ]
    assert targets
    settings = gateway_settings(services)
    sim = sim_cli.settings_from_args(simulator_args(services))
    ports = {"gateway": settings.http_port, "simulator": sim.port}
    for target in targets:
        host, port = target.rsplit(":", 1)
        assert host in services, f"prometheus scrapes {target}: no such service"
        if host in ports:
            assert int(port) == ports[host], target
    assert "gateway" in {t.rsplit(":", 1)[0] for t in targets}


def test_grafana_gets_provisioning_and_dashboards(services: dict[str, Any]) -> None:
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    provisioning = next(src for src, dst in mounts.items() if dst == "/etc/grafana/provisioning")
    assert (DEPLOY / provisioning / "datasources").is_dir()
    assert (DEPLOY / provisioning / "dashboards").is_dir()
    datasources = " ".join(p.read_text() for p in (DEPLOY / provisioning / "datasources").iterdir())
    assert "http://prometheus:9090" in datasources
    # The dashboard provider reads from a directory this service mounts.
    providers = [
        yaml.safe_load(p.read_text()) for p in (DEPLOY / provisioning / "dashboards").glob("*.y*ml")
    ]
    paths = {prov["options"]["path"] for doc in providers for prov in doc["providers"]}
    assert paths
    for path in paths:
        source = next((src for src, dst in mounts.items() if path.startswith(dst)), None)
        assert source is not None, f"dashboards path {path} is not mounted"
        assert list((DEPLOY / source).glob("*.json")), f"no dashboard JSON in {source}"
