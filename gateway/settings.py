"""Configuration: one TOML file plus ``GATEWAY_*`` environment variables.

Every value is parsed once, at startup, into frozen dataclasses. One load
checks everything and raises one :class:`ConfigProblems` listing every missing
or bad key, each with its environment variable (``GATEWAY_APP_RATE (app_rate):
expected ...``); the CLI prints one line per problem and exits with code 2.

Secrets (``key_secret``, ``webhook_secret``, ...) are wrapped in :class:`Secret`
so that no repr, log line or exception message can show them. Every key can also
be given as a file path with the ``_FILE`` suffix (``GATEWAY_KEY_SECRET_FILE``,
``GATEWAY_CHANNEL_RATES_FILE``), as Kubernetes mounts secrets and ConfigMaps; the
file's content is read like the variable's value.

Kubernetes gives every pod variables for each Service of its namespace
(``<SERVICE>_SERVICE_HOST``, ``<SERVICE>_PORT=tcp://10.0.0.1:8080``, ...); a
Service whose name starts with ``gateway`` gives ``GATEWAY_*`` ones. Those are
ignored; any other unknown ``GATEWAY_*`` variable is logged once per load as a
warning (its name, never its value) and ignored, so that a variable left over
from another version does not stop a pod. Unknown TOML keys stay errors.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.errors import ConfigError

Region = Literal["us", "eu", "br"]
REGIONS: tuple[Region, ...] = ("us", "eu", "br")
ENV_PREFIX = "GATEWAY_"
DEFAULT_CONVERSATION_URL = "https://{region}.conversation.api.sinch.com"
DEFAULT_AUTH_URL = "https://auth.sinch.com/oauth2/token"
CREDENTIALS = ("project_id", "key_id", "key_secret")

log = logging.getLogger(__name__)

# The variables Kubernetes sets for a Service (docs: "Discovering services",
# environment variables), by name; names in upper case, dashes as underscores.
_SERVICE_LINK_NAME = re.compile(
    r"[A-Z0-9_]+_SERVICE_(HOST|PORT|PORT_[A-Z0-9_]+)"
    r"|[A-Z0-9_]+_PORT_[0-9]+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?"
)
# <SERVICE>_PORT is also the shape of real settings (GATEWAY_HTTP_PORT): its value
# tells them apart.
_SERVICE_LINK_VALUE = re.compile(r"(tcp|udp|sctp)://[^\s/]+:[0-9]+")


class ConfigProblems(ConfigError):
    """Every problem found by one load; ``problems`` holds them, one line each.

    ``key``, ``expected`` and ``got`` are those of the first problem, so code that
    handles one :class:`ConfigError` keeps working.
    """

    def __init__(self, problems: Iterable[ConfigError]) -> None:
        self.problems = list(problems)
        if not self.problems:
            raise ValueError("ConfigProblems needs at least one problem")
        first = self.problems[0]
        self.key, self.expected, self.got = first.key, first.expected, first.got
        Exception.__init__(self, "\n".join(str(p) for p in self.problems))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class SettingError(ConfigError):
    """One missing or bad setting: ``key`` (the TOML key) and ``var``, its variable.

    ``source`` says where a bad value came from when it was not ``var`` itself
    (the TOML file, or a ``_FILE`` variable).
    """

    def __init__(
        self,
        key: str,
        expected: str,
        got: Any,
        *,
        var: str | None = None,
        source: str | None = None,
        missing: bool = False,
    ) -> None:
        super().__init__(key, expected, got)
        self.var = var
        self.source = source
        self.missing = missing

    def __str__(self) -> str:
        where = self.key if self.source is None else f"{self.key}, from {self.source}"
        name = f"{self.var} ({where})" if self.var else where
        if self.missing:
            return f"{name}: missing ({self.expected})"
        return f"{name}: expected {self.expected}, got {self.got!r}"


def env_var(key: str) -> str:
    """The environment variable of a key: ``apps.a1.rate`` → ``GATEWAY_APPS``."""
    return f"{ENV_PREFIX}{key.split('.', 1)[0].upper()}"


def is_service_link(var: str, value: str) -> bool:
    """True for a variable Kubernetes sets for a Service (not a setting of ours)."""
    if _SERVICE_LINK_NAME.fullmatch(var):
        return True
    return var.endswith("_PORT") and _SERVICE_LINK_VALUE.fullmatch(value.strip()) is not None


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or f-strings."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True, slots=True, kw_only=True)
class AppSettings:
    """Per-app overrides: an app that bought more than 20 msg/s, or lives in eu."""

    rate: float | None = None
    burst: float | None = None
    region: Region | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ProjectSettings:
    """Another Sinch project (``[projects.NAME]``): its own key, region and cap.

    A record selects it by naming its ``project_id``; a Sinch access key belongs to
    one project, so each project has its own token and its own project bucket.
    """

    project_id: str
    key_id: str
    key_secret: Secret
    region: Region | None = None  # default: the top-level region
    rate: float | None = None  # default: project_rate


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    # Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"
    group_id: str = "sinch-gateway"
    client_id: str = "sinch-gateway"
    requests_topic: str = "sinch.outbound.requests"
    # urgent traffic: every record there is high priority, read first, never paused by the budget
    requests_high_topic: str = "sinch.outbound.requests.high"
    # the gateway's own: records of an app whose lane is full, taken back as it makes room
    spill_topic: str = "sinch.outbound.spill"
    spill_partitions: int = 24
    results_topic: str = "sinch.outbound.results"
    status_topic: str = "sinch.outbound.status"
    dlq_topic: str = "sinch.outbound.dlq"
    # ``gateway redrive``'s ledger: one compacted record per DLQ record re-driven
    redrive_ledger_topic: str = "sinch.outbound.dlq.redriven"
    events_topic: str = "sinch.inbound.events"
    create_topics: bool = True
    topic_partitions: int = 6
    topic_replication: int = 1
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: str = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: Secret | None = None
    producer_idempotence: bool = False
    session_timeout_s: float = 10.0
    fetch_max_records: int = 2000
    commit_interval_s: float = 1.0
    # each lane holds about rate x lane_horizon_s records (at least lane_min_read_ahead);
    # the rest of its backlog waits in the spill topic
    lane_horizon_s: float = 30.0
    lane_min_read_ahead: int = 10

    # Sinch
    project_id: str = ""
    key_id: str = ""
    key_secret: Secret = field(default_factory=lambda: Secret(""))
    auth_mode: Literal["oauth", "basic"] = "oauth"
    region: Region = "us"
    auth_url: str = DEFAULT_AUTH_URL
    conversation_url: str = DEFAULT_CONVERSATION_URL
    request_timeout_s: float = 10.0
    connect_timeout_s: float = 3.0
    token_refresh_margin_s: float = 300.0

    # Limits
    project_rate: float = 800.0
    project_burst: float = 8.0
    app_rate: float = 20.0
    app_burst: float = 2.0
    rate_margin: float = 0.02
    # each replica paces the project at project_rate x (its partitions / all partitions)
    share_project_rate: bool = True
    # several replicas draw project, channel and app slots from one limiter in Redis
    # (exact cap for the group); without it, the partition share above
    redis_url: Secret | None = None
    redis_key_prefix: str = "sinch-gateway:limiter:"
    redis_timeout_s: float = 1.0
    limiter_max_batch: int = 4
    limiter_batch_horizon_s: float = 0.2
    # a replica draws its next batch once its last slot is this close: slots are not
    # reserved on the group's timeline for callers further back in its queue
    limiter_lookahead_s: float = 0.02
    apps: Mapping[str, AppSettings] = field(default_factory=dict)
    projects: Mapping[str, ProjectSettings] = field(default_factory=dict)
    # each active app's rate_limits.outbound and queue_stats are read from Sinch at
    # start and every app_rate_refresh_s; an app with a non-empty queue (or slowed
    # down for it) every app_queue_refresh_s (gateway.app_rates)
    app_rates_from_sinch: bool = True
    app_rate_refresh_s: float = 300.0
    app_queue_refresh_s: float = 3.0
    channel_rates: Mapping[str, float] = field(default_factory=dict)
    max_in_flight: int = 512
    max_buffered_records: int = 20_000
    max_buffered_bytes: int = 64 * 1024 * 1024
    max_message_bytes: int = 1024 * 1024

    # Retries
    max_attempts: int = 10
    max_retry_time_s: float = 600.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    retry_in_doubt: bool = True
    dedupe_size: int = 100_000
    dedupe_ttl_s: float = 3600.0
    shutdown_timeout_s: float = 20.0
    # a revocation hands back queued work and waits this long for sends and writes;
    # the consumer's rebalance timeout is set above it
    revoke_timeout_s: float = 5.0
    # a record whose outputs Kafka refuses for this long makes /readyz false
    outcome_stuck_s: float = 30.0
    # the outcome writer gathers endings this long and hands them to the producer at once
    # (0: each as it comes); the commit of a record waits this much longer
    outcome_linger_ms: float = 100.0
    # a partition whose committed offset stands still this long while it holds records
    stall_timeout_s: float = 300.0

    # HTTP server and webhooks
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    webhook_port: int | None = None
    webhook_secret: Secret | None = None
    webhook_secret_previous: Secret | None = None
    # app_id -> the secrets of its webhooks (up to 5 per Sinch app, each its own, and
    # old ones during a rotation); a callback of the app is verified with these, then
    # with webhook_secret(_previous). GATEWAY_WEBHOOK_SECRETS(_FILE): app_id=secret lines.
    webhook_secrets: Mapping[str, tuple[Secret, ...]] = field(default_factory=dict)
    webhook_max_age_s: float = 300.0
    webhook_max_body_bytes: int = 1024 * 1024
    webhook_publish_timeout_s: float = 10.0
    status_map_ttl_s: float = 7 * 24 * 3600.0
    status_map_size: int = 200_000
    # Replay protection: nonces seen within twice webhook_max_age_s, at most this
    # many (about 250 bytes each: 100,000 take ~25 MB of a 512 Mi pod).
    webhook_nonce_cache_size: int = 100_000
    # bearer token of the admin API under /admin/ (unset or empty: the API is off)
    admin_token: Secret | None = None

    # Operations
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    # the event loop of `gateway run`: uvloop when installed (the `fast` extra), else asyncio
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    max_app_labels: int = 200
    max_campaign_labels: int = 50

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigProblems(problems)

    def problems(self) -> list[ConfigError]:
        """Every value out of its range, each naming its key (see :func:`load`)."""
        out: list[ConfigError] = []

        def bad(key: str, expected: str, got: Any) -> None:
            out.append(SettingError(key, expected, got, var=env_var(key)))

        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                bad(name, "a number greater than 0", getattr(self, name))
        if not 0 <= self.rate_margin < 0.5:
            bad("rate_margin", "a fraction in [0, 0.5)", self.rate_margin)
        if self.token_refresh_margin_s < 0:
            bad("token_refresh_margin_s", "a number >= 0", self.token_refresh_margin_s)
        if not 0 <= self.outcome_linger_ms <= 1000:
            bad("outcome_linger_ms", "milliseconds in [0, 1000]", self.outcome_linger_ms)
        if self.region not in REGIONS:
            bad("region", "one of us, eu, br", self.region)
        for port_name in ("http_port", "webhook_port"):
            port = getattr(self, port_name)
            if port is not None and not 0 <= port <= 65535:
                bad(port_name, "a TCP port 0-65535", port)
        if not self.kafka_bootstrap.strip():
            bad("kafka_bootstrap", "host:port[,host:port...]", self.kafka_bootstrap)
        for url_name in ("auth_url", "conversation_url"):
            url = getattr(self, url_name)
            if not url.startswith(("http://", "https://")):
                bad(url_name, "an http(s) URL", url)
        if self.limiter_batch_horizon_s > 1:
            bad(
                "limiter_batch_horizon_s",
                "a number of seconds in (0, 1]",
                self.limiter_batch_horizon_s,
            )
        if self.limiter_lookahead_s > 1:
            bad("limiter_lookahead_s", "a number of seconds in (0, 1]", self.limiter_lookahead_s)
        if self.limiter_max_batch > 256:
            bad("limiter_max_batch", "an integer 1-256", self.limiter_max_batch)
        if not self.redis_key_prefix:
            bad("redis_key_prefix", "a non-empty prefix", self.redis_key_prefix)
        url = self.redis_url.reveal() if self.redis_url is not None else ""
        if url and not url.startswith(("redis://", "rediss://", "unix://")):
            bad("redis_url", "a redis://, rediss:// or unix:// URL", "<not shown>")
        for app_id, app in self.apps.items():
            if app.rate is not None and app.rate <= 0:
                bad(f"apps.{app_id}.rate", "a number greater than 0", app.rate)
            if app.burst is not None and app.burst < 1:
                bad(f"apps.{app_id}.burst", "a number >= 1", app.burst)
        for channel, rate in self.channel_rates.items():
            if rate <= 0:
                bad(f"channel_rates.{channel}", "a number greater than 0", rate)
        return out

    def require_credentials(self) -> None:
        """The service (not the simulator or ``send``) needs a project and a key.

        Raises one :class:`ConfigProblems` naming every one that is missing.
        """
        missing = missing_credentials(
            {"project_id": self.project_id, "key_id": self.key_id, "key_secret": self.key_secret}
        )
        if missing:
            raise ConfigProblems(missing)

    def conversation_base(self, region: str) -> str:
        """The base URL for ``region``; ``{region}`` in the template is filled in."""
        return self.conversation_url.rstrip("/").replace("{region}", region)

    def app_region(self, app_id: str) -> str:
        app = self.apps.get(app_id)
        return (app.region if app and app.region else None) or self.region

    def app_rate_for(self, app_id: str) -> float:
        app = self.apps.get(app_id)
        return app.rate if app and app.rate else self.app_rate

    def app_burst_for(self, app_id: str) -> float:
        app = self.apps.get(app_id)
        return app.burst if app and app.burst else self.app_burst

    def all_projects(self) -> dict[str, ProjectSettings]:
        """Every project by its project_id, the top-level one included."""
        main = ProjectSettings(
            project_id=self.project_id,
            key_id=self.key_id,
            key_secret=self.key_secret,
            region=self.region,
            rate=self.project_rate,
        )
        out = {p.project_id: p for p in self.projects.values()}
        out[self.project_id] = main
        return out

    def project_rate_for(self, project_id: str) -> float:
        project = self.all_projects().get(project_id)
        return project.rate if project is not None and project.rate else self.project_rate


_POSITIVE = (
    "redis_timeout_s",
    "limiter_max_batch",
    "limiter_batch_horizon_s",
    "limiter_lookahead_s",
    "topic_partitions",
    "spill_partitions",
    "lane_horizon_s",
    "lane_min_read_ahead",
    "topic_replication",
    "session_timeout_s",
    "fetch_max_records",
    "commit_interval_s",
    "request_timeout_s",
    "connect_timeout_s",
    "project_rate",
    "project_burst",
    "app_rate",
    "app_burst",
    "max_in_flight",
    "max_buffered_records",
    "max_buffered_bytes",
    "max_message_bytes",
    "max_attempts",
    "max_retry_time_s",
    "backoff_base_s",
    "backoff_max_s",
    "dedupe_size",
    "dedupe_ttl_s",
    "shutdown_timeout_s",
    "revoke_timeout_s",
    "outcome_stuck_s",
    "stall_timeout_s",
    "webhook_max_age_s",
    "webhook_max_body_bytes",
    "webhook_publish_timeout_s",
    "webhook_nonce_cache_size",
    "status_map_ttl_s",
    "status_map_size",
    "max_app_labels",
    "max_campaign_labels",
    "app_rate_refresh_s",
    "app_queue_refresh_s",
)


def missing_credentials(values: Mapping[str, Any]) -> list[ConfigError]:
    """A problem for each of project_id, key_id and key_secret that is empty in ``values``."""
    out: list[ConfigError] = []
    for name in CREDENTIALS:
        if not values.get(name):
            var = env_var(name)
            expected = "a non-empty value"
            if name == "key_secret":
                expected += f", or a file named by {var}_FILE"
            out.append(SettingError(name, expected, "", var=var, missing=True))
    return out


# -- loading ----------------------------------------------------------------


def _field_kind(tp: Any) -> tuple[str, tuple[str, ...] | None, bool]:
    """(scalar kind, allowed literal values or None, optional?) of a field type."""
    optional = False
    literals: tuple[str, ...] | None = None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin is Literal:
        literals = tuple(str(a) for a in typing.get_args(tp))
        return "str", literals, optional
    name = getattr(tp, "__name__", str(tp))
    return name, literals, optional


def _coerce(key: str, raw: Any, tp: Any) -> Any:
    kind, literals, optional = _field_kind(tp)
    if optional and (raw is None or raw == ""):
        return None
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            return int(raw)
        if kind == "float":
            if isinstance(raw, bool):
                raise ValueError(raw)
            return float(raw)
        if kind == "Secret":
            if not isinstance(raw, str):
                raise ValueError("not a string")
            return Secret(raw)
        if kind == "str":
            if not isinstance(raw, str | int | float) or isinstance(raw, bool):
                raise ValueError(raw)
            value = str(raw)
            if literals is not None:
                if value.upper() in literals:
                    value = value.upper()
                elif value.lower() in literals:
                    value = value.lower()
                if value not in literals:
                    raise ValueError(value)
            return value
    except (TypeError, ValueError):
        expected = {"bool": "true or false", "int": "an integer", "float": "a number"}.get(
            kind, "a string"
        )
        if literals is not None:
            expected = "one of " + ", ".join(literals)
        shown = "<secret>" if kind == "Secret" else raw
        raise ConfigError(key, expected, shown) from None
    raise ConfigError(key, f"a supported type ({kind})", raw)


def _apps_from(key: str, raw: Any) -> dict[str, AppSettings]:
    if not isinstance(raw, dict):
        raise ConfigError(key, "a table of app_id = {rate, burst, region}", raw)
    apps: dict[str, AppSettings] = {}
    hints = typing.get_type_hints(AppSettings)
    for app_id, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{key}.{app_id}", "a table {rate, burst, region}", table)
        unknown = set(table) - set(hints)
        if unknown:
            raise ConfigError(f"{key}.{app_id}.{sorted(unknown)[0]}", "rate, burst or region", "?")
        values = {
            name: _coerce(f"{key}.{app_id}.{name}", value, hints[name])
            for name, value in table.items()
        }
        if values.get("region") is not None and values["region"] not in REGIONS:
            raise ConfigError(f"{key}.{app_id}.region", "one of us, eu, br", values["region"])
        apps[str(app_id)] = AppSettings(**values)
    return apps


def _projects_from(key: str, raw: Any) -> dict[str, ProjectSettings]:
    """``[projects.NAME]`` tables; ``key_secret_file`` may stand for ``key_secret``."""
    shape = "a table of NAME = {project_id, key_id, key_secret or key_secret_file, region, rate}"
    if not isinstance(raw, Mapping):
        raise ConfigError(key, shape, raw)
    hints = typing.get_type_hints(ProjectSettings)
    projects: dict[str, ProjectSettings] = {}
    for name, table in raw.items():
        if isinstance(table, ProjectSettings):
            projects[str(name)] = table
            continue
        where = f"{key}.{name}"
        if not isinstance(table, dict):
            raise ConfigError(where, shape, table)
        table = dict(table)
        secret_file = table.pop("key_secret_file", None)
        if secret_file is not None:
            try:
                table["key_secret"] = Path(str(secret_file)).read_text().strip()
            except OSError:
                raise ConfigError(f"{where}.key_secret_file", "a readable file", "?") from None
        unknown = set(table) - set(hints)
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}", "a key of " + shape, "?")
        for required in ("project_id", "key_id", "key_secret"):
            if not table.get(required):
                raise ConfigError(f"{where}.{required}", "a non-empty value", "")
        values = {k: _coerce(f"{where}.{k}", v, hints[k]) for k, v in table.items()}
        if values.get("rate") is not None and values["rate"] <= 0:
            raise ConfigError(f"{where}.rate", "a number greater than 0", values["rate"])
        projects[str(name)] = ProjectSettings(**values)
    return projects


def _channel_rates_from(key: str, raw: Any) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise ConfigError(key, "a table of CHANNEL = rate", raw)
    return {str(ch).upper(): _coerce(f"{key}.{ch}", v, float) for ch, v in raw.items()}


def _webhook_secrets_from(key: str, raw: Any) -> dict[str, tuple[Secret, ...]]:
    """``app_id = secret | [secrets]`` from TOML, or ``app_id=secret`` lines from env.

    Lines split at the first ``=`` only (a secret may hold ``=`` or ``,``); blank and
    ``#`` lines are skipped; an app named twice has both secrets. Errors name the
    app or the line, never a secret.
    """
    pairs: list[tuple[str, Any]] = []
    if isinstance(raw, str):
        for number, line in enumerate(raw.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            app_id, sep, secret = line.partition("=")
            if not sep or not app_id.strip():
                raise ConfigError(key, "lines of app_id=secret", f"<line {number}>")
            pairs.append((app_id.strip(), secret.strip()))
    elif isinstance(raw, Mapping):
        for app_id, value in raw.items():
            values = list(value) if isinstance(value, list | tuple) else [value]
            pairs.extend((str(app_id), v) for v in values)
    else:
        raise ConfigError(key, 'a table of "app_id" = ["secret", ...]', "<secret>")
    out: dict[str, tuple[Secret, ...]] = {}
    for app_id, value in pairs:
        text = value.reveal() if isinstance(value, Secret) else value
        if not isinstance(text, str) or not text:
            raise ConfigError(f"{key}.{app_id}", "non-empty secret strings", "<secret>")
        known = out.get(app_id, ())
        if Secret(text) not in known:
            out[app_id] = (*known, Secret(text))
    return out


def _parse_mapping_env(key: str, text: str) -> dict[str, Any]:
    """``GATEWAY_CHANNEL_RATES=SMS=10,WHATSAPP=80`` style values (a file may use lines)."""
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in re.split(r"[,\n]", text))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(key, "comma-separated NAME=VALUE pairs", text)
        out[name.strip()] = value.strip()
    return out


def _unknown_variables(env: Mapping[str, str], names: Iterable[str]) -> list[str]:
    """``GATEWAY_*`` variables that are neither settings nor Kubernetes service links."""
    known = {f"{ENV_PREFIX}CONFIG"}
    for name in names:
        known |= {env_var(name), f"{env_var(name)}_FILE"}
    return sorted(
        var
        for var, value in env.items()
        if var.startswith(ENV_PREFIX) and var not in known and not is_service_link(var, value)
    )


def _read_env(
    env: Mapping[str, str], name: str, problems: list[ConfigError]
) -> tuple[str, str] | None:
    """(text, the variable it came from) of a key set in the environment, else None."""
    var = env_var(name)
    file_var = f"{var}_FILE"
    if file_var in env:
        try:
            return Path(env[file_var]).read_text().strip(), file_var
        except OSError as exc:
            problems.append(
                SettingError(name, f"a readable file ({exc.strerror})", env[file_var], var=file_var)
            )
            return None
    if var not in env:
        return None
    # A Service named like a setting (gateway-http → GATEWAY_HTTP_PORT=tcp://...)
    # whose link the pod's own env did not override.
    if is_service_link(var, env[var]):
        log.warning("%s looks like a Kubernetes service link, not a setting: ignored", var)
        return None
    return env[var], var


def _read_toml(path: str | os.PathLike[str], problems: list[ConfigError]) -> dict[str, Any]:
    var = f"{ENV_PREFIX}CONFIG"
    try:
        with Path(path).open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        problems.append(
            SettingError("config", f"a readable TOML file ({exc.strerror})", str(path), var=var)
        )
    except tomllib.TOMLDecodeError as exc:
        problems.append(SettingError("config", f"valid TOML ({exc})", str(path), var=var))
    return {}


def _convert(name: str, raw: Any, hint: Any) -> Any:
    if name == "apps":
        return raw if _is_app_map(raw) else _apps_from(name, raw)
    if name == "channel_rates":
        return _channel_rates_from(name, raw)
    if name == "webhook_secrets":
        return _webhook_secrets_from(name, raw)
    if name == "projects":
        return _projects_from(name, raw)
    if isinstance(raw, Secret):
        return raw
    return _coerce(name, raw, hint)


def load(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    require_credentials: bool = False,
    **overrides: Any,
) -> Settings:
    """Build :class:`Settings` from a TOML file, then ``GATEWAY_*`` env, then ``overrides``.

    ``path`` defaults to ``GATEWAY_CONFIG`` when set. Every key is checked, and
    every problem (unknown TOML key, unreadable ``_FILE``, bad value, value out of
    range, and with ``require_credentials`` a missing project_id, key_id or
    key_secret) is reported in one :class:`ConfigProblems`. Unknown ``GATEWAY_*``
    variables are logged and ignored, Kubernetes service links ignored silently.
    """
    env = os.environ if env is None else env
    path = path or env.get(f"{ENV_PREFIX}CONFIG") or None
    problems: list[ConfigError] = []
    data = _read_toml(path, problems) if path is not None else {}

    hints = typing.get_type_hints(Settings)
    names = [f.name for f in dataclasses.fields(Settings)]
    for var in _unknown_variables(env, names):
        log.warning("%s is not a setting of this gateway version: ignored", var)

    values: dict[str, Any] = {}
    sources: dict[str, str | None] = {}
    for key, raw in data.items():
        if key in names:
            values[key], sources[key] = raw, str(path)
        else:
            problems.append(SettingError(key, "a known setting", key, source=str(path)))
    for name in names:
        found = _read_env(env, name, problems)
        if found is None:
            continue
        text, var = found
        # the variable itself is named first; another source is named after the key
        sources[name] = None if var == env_var(name) else var
        try:
            if name in ("apps", "projects"):
                raise ConfigError(name, f"tables in the TOML file ([{name}.NAME])", "env")
            values[name] = _parse_mapping_env(name, text) if name == "channel_rates" else text
        except ConfigError as exc:
            problems.append(_located(exc, sources))
            values.pop(name, None)
    for name, raw in overrides.items():
        values[name], sources[name] = raw, None

    kwargs: dict[str, Any] = {}
    for name, raw in values.items():
        try:
            kwargs[name] = _convert(name, raw, hints[name])
        except ConfigError as exc:
            problems.append(_located(exc, sources))
    try:
        settings: Settings | None = Settings(**kwargs)
    except ConfigProblems as exc:
        settings = None
        problems.extend(_located(p, sources) for p in exc.problems)
    if require_credentials:
        problems.extend(missing_credentials(kwargs))
    if problems or settings is None:
        raise ConfigProblems(problems)
    return settings


def _located(exc: ConfigError, sources: Mapping[str, str | None]) -> SettingError:
    """``exc`` naming the variable of its key, and where the value came from."""
    root = exc.key.split(".", 1)[0]
    return SettingError(exc.key, exc.expected, exc.got, var=env_var(root), source=sources.get(root))


def _is_app_map(raw: Any) -> bool:
    return isinstance(raw, Mapping) and all(isinstance(v, AppSettings) for v in raw.values())
