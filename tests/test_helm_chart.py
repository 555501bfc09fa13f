"""The Helm chart, checked by Helm's own Go SDK (helm-python-sdk), kubernetes-validate
and promtool, plus the contract between the chart and the gateway it deploys.

Every tool is required: a missing one fails the test with the install command.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.settings import Secret, Settings, _field_kind, load

try:
    import helm_python as helm
except ImportError:  # pragma: no cover - depends on the install
    helm = None

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the install
    yaml = None

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "sinch-gateway"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
DEPLOY_ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
CHART_ALERTS = CHART / "files" / "alerts.yml"
KUBE_VERSION = "1.30.0"  # kubeVersion floor in Chart.yaml is 1.25; 1.30 has schemas shipped
CRD_GROUP = "monitoring.coreos.com/"
# Settings the chart sets itself (ports, secrets as *_FILE, redis_url), not through
# .Values.config: a secret never goes into the ConfigMap.
CHART_MANAGED = {
    "http_host",
    "http_port",
    "webhook_port",
    "key_secret",
    "webhook_secret",
    "webhook_secret_previous",
    "kafka_sasl_password",
    "webhook_secrets",
    "redis_url",
    "admin_token",
}
# What a mounted Secret key holds, by variable (any other: an opaque demo string).
SECRET_FILE_TEXT = {
    "GATEWAY_WEBHOOK_SECRETS_FILE": "app-1=demo-hook-1\napp-2=demo-hook-2\n",
    "GATEWAY_REDIS_URL_FILE": "redis://:demo-password@redis.example.com:6379/0\n",
}
RELEASE = "sg"
NAMESPACE = "messaging"


def tool(name: str) -> str:
    """Path of a command-line tool from the venv or PATH; fail (not skip) when absent."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        extra = " and Debian's prometheus package" if name == "promtool" else ""
        pytest.fail(f"{name} not found: install the dev extra (pip install -e '.[dev]'){extra}")
    return found


def require_libs() -> None:
    if helm is None:
        pytest.fail("helm-python-sdk is not installed: pip install -e '.[dev]'")
    if yaml is None:
        pytest.fail("PyYAML is not installed: pip install -e '.[dev]'")


def full_values() -> dict[str, Any]:
    require_libs()
    return dict(yaml.safe_load(FULL_VALUES.read_text()))


def external_redis_values() -> dict[str, Any]:
    """The default values plus an external Redis whose URL is a key of its own Secret."""
    return {
        "redis": {"external": {"existingSecret": "redis-credentials", "urlKey": "url"}},
        "secrets": {"webhookSecretsKey": "webhook-secrets"},
    }


# default: no Redis (partition share); full: the in-chart Redis; external-redis: a URL.
VALUE_SETS = {"default": lambda: None, "full": full_values, "external-redis": external_redis_values}


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    require_libs()
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any] | None) -> dict[str, str]:
    """Template path → rendered text, as `helm template` (empty files dropped)."""
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return {Path(k).name: v for k, v in out.items() if v.strip()}


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for name, text in rendered.items():
        if name.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str, component: str = "gateway") -> dict[str, Any]:
    """The one ``kind`` of ``component`` (gateway, or limiter: the in-chart Redis)."""
    found = [
        d
        for d in docs
        if d["kind"] == kind and d["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    assert len(found) == 1, f"expected one {kind} of {component}, got {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]], component: str = "gateway") -> dict[str, Any]:
    spec = by_kind(docs, "Deployment", component)["spec"]["template"]["spec"]
    (only,) = spec["containers"]
    return dict(only)


def secret_sources(pod: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Secret name → {key: mounted file name} of the pod's projected ``secrets`` volume."""
    (volume,) = [v for v in pod["volumes"] if v["name"] == "secrets"]
    out: dict[str, dict[str, str]] = {}
    for source in volume["projected"]["sources"]:
        secret = source["secret"]
        out.setdefault(secret["name"], {}).update({i["key"]: i["path"] for i in secret["items"]})
    return out


def settings_fields() -> dict[str, Any]:
    hints = typing.get_type_hints(Settings)
    return {f.name: hints[f.name] for f in dataclasses.fields(Settings)}


# -- Helm: lint, schema ---------------------------------------------------------


@pytest.mark.parametrize("which", sorted(VALUE_SETS))
def test_lint_strict_is_clean(which: str) -> None:
    require_libs()
    report = helm.lint(
        CHART,
        VALUE_SETS[which](),
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{KUBE_VERSION}",
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["total_charts_linted"] == 1
    assert problems == [], problems
    assert report["errors"] == []


def test_lint_reports_a_broken_value() -> None:
    """The lint above can fail: the same call flags a value the schema refuses."""
    require_libs()
    report = helm.lint(CHART, {"replicaCount": "two"}, strict=True)
    assert any("replicaCount" in m["error"] and m["severity"] == 3 for m in report["messages"])


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"replicaCount": "two"}, "/replicaCount"),
        ({"config": {"kafka_bootstrapp": "kafka:9092"}}, "kafka_bootstrapp"),
        ({"config": {"app_rate": 0}}, "/config/app_rate"),
        ({"config": {"region": "asia"}}, "/config/region"),
        ({"config": {"http_port": 9000}}, "http_port"),  # set by the chart (ports.http)
        ({"secrets": {"existingSecret": ""}}, "/secrets/existingSecret"),
        ({"securityContext": {"readOnlyRootFilesystem": False}}, "readOnlyRootFilesystem"),
        ({"ports": {"http": "8080"}}, "/ports/http"),
        # secrets and their URL never go into values or the ConfigMap
        ({"config": {"redis_url": "redis://r:6379/0"}}, "redis_url"),
        ({"config": {"webhook_secrets": {"app-1": ["s"]}}}, "webhook_secrets"),
        ({"redis": {"external": {"url": "redis://r:6379/0"}}}, "url"),
        ({"redis": {"enabled": "yes"}}, "/redis/enabled"),
        ({"redis": {"external": {"urlKey": "a/b"}}}, "/redis/external/urlKey"),
        ({"redis": {"external": {"existingSecret": "Redis_Creds"}}}, "existingSecret"),
        ({"redis": {"maxmemory": "64MiB"}}, "/redis/maxmemory"),
        ({"redis": {"image": {"tag": ""}}}, "/redis/image/tag"),
        ({"redis": {"port": 0}}, "/redis/port"),
        ({"secrets": {"webhookSecretsKey": "hooks/app"}}, "/secrets/webhookSecretsKey"),
        ({"podDisruptionBudget": {"enabled": "no"}}, "/podDisruptionBudget/enabled"),
    ],
)
def test_schema_refuses_wrong_values_at_install(
    chart: Any, values: dict[str, Any], needle: str
) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    assert needle in str(err.value)


def test_schema_config_keys_are_the_gateway_settings(chart: Any) -> None:
    """`config` takes exactly the Settings fields the chart does not manage, with their types."""
    props = chart.schema["properties"]["config"]["properties"]
    fields = settings_fields()
    assert set(props) | CHART_MANAGED == set(fields), (
        "values.schema.json config properties differ from gateway.settings.Settings: "
        f"missing {sorted(set(fields) - CHART_MANAGED - set(props))}, "
        f"unknown {sorted(set(props) - set(fields))}"
    )
    json_types = {
        "str": "string",
        "int": "integer",
        "float": "number",
        "bool": "boolean",
        "Mapping": "object",
    }
    for name, prop in props.items():
        kind, literals, _ = _field_kind(fields[name])
        assert prop["type"] == json_types[kind], name
        if literals is not None:
            assert sorted(prop["enum"]) == sorted(literals), name
    # The chart's defaults are the gateway's, except where a cluster differs from a laptop.
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    for name, value in chart.values["config"].items():
        if name not in {"apps", "kafka_bootstrap"}:
            assert value == defaults[name], f"config.{name} default differs from Settings"


# -- rendering, kubernetes-validate, promtool --------------------------------------


@pytest.mark.parametrize("which", sorted(VALUE_SETS))
def test_rendered_manifests_validate_strictly(chart: Any, which: str, tmp_path: Path) -> None:
    rendered = render(chart, VALUE_SETS[which]())
    docs = manifests(rendered)
    out = tmp_path / "manifests.yaml"
    out.write_text("\n---\n".join(yaml.safe_dump(d) for d in docs))
    proc = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", KUBE_VERSION, str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if doc["apiVersion"].startswith(CRD_GROUP):
            # No schema ships for the Prometheus Operator CRDs: checked below instead.
            assert any(f"Couldn't find schema for kind {kind}" in line for line in lines)
        else:
            assert f"passed for resource {kind.lower()}/{name}" in proc.stdout, proc.stdout
    unexpected = [
        ln for ln in lines if not ln.startswith("INFO") and "monitoring.coreos.com" not in ln
    ]
    assert unexpected == []
    kinds = sorted(d["kind"] for d in docs)
    expected = ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"]
    if which == "full":
        # and the in-chart Redis: a Deployment and a Service
        expected += ["Deployment", "Ingress", "PrometheusRule", "Service", "ServiceMonitor"]
    assert kinds == sorted(expected)


def test_kubernetes_validate_refuses_an_unknown_field(chart: Any, tmp_path: Path) -> None:
    """The strict validation above can fail: a misspelt field is an error."""
    docs = manifests(render(chart, None))
    deployment = by_kind(docs, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFS"] = True
    out = tmp_path / "deployment.yaml"
    out.write_text(yaml.safe_dump(deployment))
    proc = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", KUBE_VERSION, str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert "readOnlyRootFS" in proc.stdout + proc.stderr


def test_prometheus_rule_is_the_deploy_alert_file(chart: Any, tmp_path: Path) -> None:
    """files/alerts.yml is a copy of deploy/prometheus/alerts.yml, rendered unchanged."""
    assert DEPLOY_ALERTS.exists(), f"{DEPLOY_ALERTS} is missing"
    assert CHART_ALERTS.read_text() == DEPLOY_ALERTS.read_text(), (
        "the chart's alerts differ from deploy/prometheus/alerts.yml: "
        "cp deploy/prometheus/alerts.yml helm/sinch-gateway/files/alerts.yml"
    )
    rule = by_kind(manifests(render(chart, full_values())), "PrometheusRule")
    groups = yaml.safe_load(DEPLOY_ALERTS.read_text())["groups"]
    assert rule["spec"]["groups"] == groups
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    proc = subprocess.run(
        [tool("promtool"), "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    alerts = sum(1 for g in groups for r in g["rules"] if "alert" in r)
    assert f"SUCCESS: {sum(len(g['rules']) for g in groups)} rules found" in proc.stdout
    assert alerts > 0


# -- the contract between chart and gateway -----------------------------------------


@pytest.mark.parametrize("which", sorted(VALUE_SETS))
def test_gateway_loads_the_rendered_config(chart: Any, which: str, tmp_path: Path) -> None:
    """The ConfigMap's TOML and the pod's env, given to gateway.settings.load, are accepted."""
    values = VALUE_SETS[which]()
    docs = manifests(render(chart, values))
    toml = tmp_path / "gateway.toml"
    toml.write_text(by_kind(docs, "ConfigMap")["data"]["gateway.toml"])
    env: dict[str, str] = {}
    secrets: dict[str, str] = {}
    for item in container(docs)["env"]:
        name, value = item["name"], item["value"]
        if name == "GATEWAY_CONFIG":
            value = str(toml)
        elif name.endswith("_FILE"):
            secrets[name] = SECRET_FILE_TEXT.get(name, f"demo-{name.lower()}").strip()
            path = tmp_path / Path(value).name
            path.write_text(secrets[name] + "\n")
            value = str(path)
        env[name] = value
    settings = load(env=env)
    merged = chart.merge_values(values)
    assert settings.http_port == merged["ports"]["http"]
    assert settings.webhook_port == merged["ports"].get("webhook")
    assert settings.key_secret == Secret(secrets["GATEWAY_KEY_SECRET_FILE"])
    assert settings.webhook_secret == Secret(secrets["GATEWAY_WEBHOOK_SECRET_FILE"])
    assert settings.kafka_bootstrap == merged["config"]["kafka_bootstrap"]
    grace = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= settings.shutdown_timeout_s + 5
    if which == "default":
        assert settings.redis_url is None  # each replica takes its partitions' share
        assert settings.webhook_secrets == {}
    else:
        assert settings.webhook_secrets == {
            "app-1": (Secret("demo-hook-1"),),
            "app-2": (Secret("demo-hook-2"),),
        }
    if which == "external-redis":
        assert settings.redis_url == Secret(secrets["GATEWAY_REDIS_URL_FILE"])
    if which == "full":
        redis_service = by_kind(docs, "Service", "limiter")["metadata"]["name"]
        assert settings.redis_url == Secret(f"redis://{redis_service}:6380/0")
        assert settings.limiter_max_batch == 16
        assert settings.limiter_batch_horizon_s == 0.2
        settings.require_credentials()
        assert settings.kafka_sasl_password == Secret(secrets["GATEWAY_KAFKA_SASL_PASSWORD_FILE"])
        assert settings.apps["marketing-app"].rate == 100.0
        assert settings.apps["marketing-app"].region == "eu"
        assert settings.channel_rates == {"WHATSAPP": 80.0, "SMS": 30.5}
        assert settings.max_buffered_bytes == 67108864
        assert settings.create_topics is False
        assert settings.region == "eu"


def test_two_replicas_and_a_disruption_budget_by_default(chart: Any) -> None:
    """A voluntary disruption (node drain, cluster upgrade) takes one gateway pod at a
    time, and never the in-chart Redis's pod for the gateway's sake."""
    docs = manifests(render(chart, {"redis": {"enabled": True}}))
    deployment = by_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pdb = by_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in pdb["spec"]
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    redis_pod = by_kind(docs, "Deployment", "limiter")["spec"]["template"]["metadata"]
    assert not selector.items() <= redis_pod["labels"].items()
    # minAvailable, when set, replaces maxUnavailable; disabled, no budget at all.
    pdb = by_kind(manifests(render(chart, full_values())), "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 2
    assert "maxUnavailable" not in pdb["spec"]
    pdb = by_kind(
        manifests(render(chart, {"podDisruptionBudget": {"minAvailable": "50%"}})),
        "PodDisruptionBudget",
    )
    assert pdb["spec"]["minAvailable"] == "50%"
    docs = manifests(render(chart, {"podDisruptionBudget": {"enabled": False}}))
    assert [d for d in docs if d["kind"] == "PodDisruptionBudget"] == []


def redis_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(docs)["env"] if "REDIS" in e["name"]}


def test_without_redis_each_replica_takes_its_partition_share(chart: Any) -> None:
    docs = manifests(render(chart, None))
    assert redis_env(docs) == {}
    assert [
        d for d in docs if d["metadata"]["labels"]["app.kubernetes.io/component"] != "gateway"
    ] == []
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    assert "redis_url" not in {p for items in secret_sources(pod).values() for p in items.values()}
    assert "no Redis: each paces the share" in render(chart, None)["NOTES.txt"]


def test_in_chart_redis_serves_the_gateway(chart: Any, tmp_path: Path) -> None:
    """redis.enabled: one Redis pod without persistence, locked down, replaced (never
    doubled), behind a Service the gateway's GATEWAY_REDIS_URL names."""
    docs = manifests(render(chart, {"redis": {"enabled": True}}))
    deployment = by_kind(docs, "Deployment", "limiter")
    service = by_kind(docs, "Service", "limiter")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    c = container(docs, "limiter")
    assert c["image"] == "redis:7.4-alpine"
    args = c["args"]
    assert args[0] == "redis-server"
    pairs = dict(zip(args[1::2], args[2::2], strict=True))
    assert pairs["--save"] == ""
    assert pairs["--appendonly"] == "no"
    assert pairs["--port"] == "6379"
    assert pairs["--maxmemory"] == "64mb"
    assert c["resources"]["requests"]
    assert c["resources"]["limits"]["memory"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["enableServiceLinks"] is False
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == c["ports"][0]["name"]
    env = redis_env(docs)
    assert env == {"GATEWAY_REDIS_URL": f"redis://{service['metadata']['name']}:{port['port']}/0"}
    settings = load(env={"GATEWAY_REDIS_URL": env["GATEWAY_REDIS_URL"]})
    assert settings.redis_url == Secret(env["GATEWAY_REDIS_URL"])
    assert (
        "share one exact cap through the in-chart Redis"
        in render(chart, {"redis": {"enabled": True}})["NOTES.txt"]
    )


@pytest.mark.parametrize("own_secret", [False, True])
def test_external_redis_url_comes_from_a_secret_file(chart: Any, own_secret: bool) -> None:
    """redis.external.urlKey: the URL (it may hold a password) is a key of the chart's
    Secret or of its own, mounted as a file named by GATEWAY_REDIS_URL_FILE."""
    external = {"urlKey": "redis-url"} | (
        {"existingSecret": "redis-credentials"} if own_secret else {}
    )
    docs = manifests(render(chart, {"redis": {"external": external}}))
    assert [
        d for d in docs if d["metadata"]["labels"]["app.kubernetes.io/component"] != "gateway"
    ] == []
    env = redis_env(docs)
    assert list(env) == ["GATEWAY_REDIS_URL_FILE"]
    path = Path(env["GATEWAY_REDIS_URL_FILE"])
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    sources = secret_sources(pod)
    owner = "redis-credentials" if own_secret else "sinch-gateway"
    assert sources[owner]["redis-url"] == path.name
    assert sorted(sources) == sorted({"sinch-gateway", owner})
    mounts = {m["name"]: m["mountPath"] for m in container(docs)["volumeMounts"]}
    assert mounts["secrets"] == str(path.parent)
    # The URL is nowhere in the rendered manifests, only its Secret's name and key.
    assert "redis://" not in yaml.safe_dump_all(docs)


def test_in_chart_and_external_redis_together_are_refused(chart: Any) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"redis\.enabled and redis\.external\.urlKey"):
        render(chart, {"redis": {"enabled": True, "external": {"urlKey": "redis-url"}}})


def test_grace_period_shorter_than_the_drain_is_refused(chart: Any) -> None:
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        render(chart, {"config": {"shutdown_timeout_s": 40}, "terminationGracePeriodSeconds": 30})
    docs = manifests(
        render(chart, {"config": {"shutdown_timeout_s": 40}, "terminationGracePeriodSeconds": 45})
    )
    assert (
        by_kind(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        == 45
    )


@pytest.mark.parametrize("which", sorted(VALUE_SETS))
def test_deployment_runs_locked_down_with_probes(chart: Any, which: str) -> None:
    docs = manifests(render(chart, VALUE_SETS[which]()))
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["resources"]["requests"]
    assert c["resources"]["limits"]["memory"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]  # noqa: S108 - the pod's /tmp, not ours
    merged = chart.merge_values(VALUE_SETS[which]())
    sources = secret_sources(pod)
    assert merged["secrets"]["existingSecret"] in sources
    mounted = [path for items in sources.values() for path in items.values()]
    assert len(mounted) == len(set(mounted))
    env = {e["name"]: e["value"] for e in c["env"]}
    for var, value in env.items():
        if var.endswith("_FILE"):
            assert Path(value).name in mounted
            assert str(Path(value).parent) in mounts
    assert Path(env["GATEWAY_CONFIG"]).parent.as_posix() in mounts
    known = {f"GATEWAY_{n.upper()}" for n in settings_fields()} | {"GATEWAY_CONFIG"}
    known |= {f"{k}_FILE" for k in known}
    assert set(env) <= known
    # No <SERVICE>_* variables: the release's own Service would give GATEWAY_* ones.
    assert pod["enableServiceLinks"] is False


def service_link_env(service: dict[str, Any], ip: str = "10.0.0.1") -> dict[str, str]:
    """The variables Kubernetes gives a pod for ``service`` when service links are on."""
    prefix = service["metadata"]["name"].upper().replace("-", "_")
    ports = service["spec"]["ports"]
    first = ports[0]
    env = {
        f"{prefix}_SERVICE_HOST": ip,
        f"{prefix}_SERVICE_PORT": str(first["port"]),
        f"{prefix}_PORT": f"{first.get('protocol', 'TCP').lower()}://{ip}:{first['port']}",
    }
    for port in ports:
        proto = port.get("protocol", "TCP")
        base = f"{prefix}_PORT_{port['port']}_{proto}"
        if "name" in port:
            env[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(
                port["port"]
            )
        env[base] = f"{proto.lower()}://{ip}:{port['port']}"
        env[f"{base}_PROTO"] = proto.lower()
        env[f"{base}_PORT"] = str(port["port"])
        env[f"{base}_ADDR"] = ip
    return env


@pytest.mark.parametrize("service_name", [None, "gateway"])
def test_gateway_starts_with_service_links_of_a_release_named_gateway(
    chart: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, service_name: str | None
) -> None:
    """Were service links on (an older chart, or a pod of another chart in the
    namespace), `helm install gateway` gives GATEWAY_SINCH_GATEWAY_* variables, and
    a Service named gateway GATEWAY_PORT=tcp://... (its Redis, gateway-redis,
    GATEWAY_REDIS_PORT=tcp://...): the gateway still starts, quietly."""
    values = full_values()
    values["fullnameOverride"] = service_name or ""
    out = chart.render(values, name="gateway", namespace=NAMESPACE, is_install=True)
    docs = manifests({Path(k).name: v for k, v in out.items() if v.strip()})
    service = by_kind(docs, "Service")
    expected = service_name or "gateway-sinch-gateway"
    assert service["metadata"]["name"] == expected
    redis = by_kind(docs, "Service", "limiter")
    assert redis["metadata"]["name"] == f"{expected}-redis"
    links = {**service_link_env(redis, "10.0.0.2"), **service_link_env(service)}
    assert f"{expected.upper().replace('-', '_')}_PORT" in links
    assert f"{expected.upper().replace('-', '_')}_REDIS_PORT" in links
    assert all(var.startswith("GATEWAY_") for var in links)
    toml = tmp_path / "gateway.toml"
    toml.write_text(by_kind(docs, "ConfigMap")["data"]["gateway.toml"])
    env = {**links, "GATEWAY_CONFIG": str(toml), "GATEWAY_KEY_SECRET": "s"}
    for item in container(docs)["env"]:
        if item["name"] not in ("GATEWAY_CONFIG", "GATEWAY_KEY_SECRET_FILE"):
            env.setdefault(item["name"], item["value"])
    env = {k: v for k, v in env.items() if not k.endswith("_FILE")}
    caplog.set_level("DEBUG", logger="gateway.settings")
    settings = load(env=env, require_credentials=True)
    assert settings.http_port == 8080
    assert settings.webhook_port == 8443
    assert settings.redis_url == Secret(f"redis://{expected}-redis:6380/0")
    assert caplog.records == []


def test_service_monitor_and_ingress_point_at_real_ports(chart: Any) -> None:
    docs = manifests(render(chart, full_values()))
    service = by_kind(docs, "Service")
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"http": 8080, "webhook": 8443}
    monitor = by_kind(docs, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("http", "/metrics")]
    # The alerts find the gateway by its job label; the ServiceMonitor names the job.
    job = service["metadata"]["labels"][monitor["spec"]["jobLabel"]]
    patterns = set(re.findall(r'job=~"([^"]+)"', DEPLOY_ALERTS.read_text()))
    assert patterns
    for pattern in patterns:
        assert re.fullmatch(pattern, job), f"job {job!r} does not match the alerts' {pattern!r}"
    ingress = by_kind(docs, "Ingress")
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["path"] == "/webhooks/sinch"
    assert path["backend"]["service"] == {
        "name": service["metadata"]["name"],
        "port": {"name": "webhook"},
    }
    # Without a webhook port the webhook is served, and routed, on the admin port.
    docs = manifests(render(chart, {"ingress": {"enabled": True, "hosts": ["cb.example.com"]}}))
    (rule,) = by_kind(docs, "Ingress")["spec"]["rules"]
    assert rule["host"] == "cb.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"]["port"] == {"name": "http"}


def test_notes_say_which_secret_to_create(chart: Any) -> None:
    notes = render(chart, None)["NOTES.txt"]
    assert "create secret generic sinch-gateway" in notes
    assert "--from-literal=key-secret=" in notes
    assert "config.project_id and config.key_id are empty" in notes
    notes = render(chart, full_values())["NOTES.txt"]
    assert "https://sinch-callbacks.example.com/webhooks/sinch" in notes
    assert "are empty" not in notes


def test_config_strings_survive_the_toml_rendering(chart: Any, tmp_path: Path) -> None:
    odd = 'we"ird\\user <&> ünï'
    values = {"config": {"kafka_sasl_username": odd, "channel_rates": {"whatsapp": 12.5}}}
    toml = tmp_path / "gateway.toml"
    toml.write_text(by_kind(manifests(render(chart, values)), "ConfigMap")["data"]["gateway.toml"])
    settings = load(env={"GATEWAY_CONFIG": str(toml)})
    assert settings.kafka_sasl_username == odd
    assert settings.channel_rates == {"WHATSAPP": 12.5}


def test_app_version_is_the_gateway_version(chart: Any) -> None:
    from gateway import __version__

    assert chart.metadata["appVersion"] == __version__
