"""Configuration: one TOML file plus ``GATEWAY_*`` environment variables.

Every value is parsed once, at startup, into frozen dataclasses. A bad value
raises :class:`ConfigError` naming the key (``GATEWAY_APP_RATE`` or the TOML
key) and what was expected; the CLI turns that into one line and exit code 2.

Secrets (``key_secret``, ``webhook_secret``, ...) are wrapped in :class:`Secret`
so that no repr, log line or exception message can show them. Each can also be
given as a file path with the ``_FILE`` suffix (``GATEWAY_KEY_SECRET_FILE``), as
Kubernetes mounts secrets.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.errors import ConfigError

Region = Literal["us", "eu", "br"]
REGIONS: tuple[Region, ...] = ("us", "eu", "br")
ENV_PREFIX = "GATEWAY_"
DEFAULT_CONVERSATION_URL = "https://{region}.conversation.api.sinch.com"
DEFAULT_AUTH_URL = "https://auth.sinch.com/oauth2/token"


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
class Settings:
    # Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"
    group_id: str = "sinch-gateway"
    client_id: str = "sinch-gateway"
    requests_topic: str = "sinch.outbound.requests"
    results_topic: str = "sinch.outbound.results"
    status_topic: str = "sinch.outbound.status"
    dlq_topic: str = "sinch.outbound.dlq"
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
    apps: Mapping[str, AppSettings] = field(default_factory=dict)
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

    # HTTP server and webhooks
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    webhook_port: int | None = None
    webhook_secret: Secret | None = None
    webhook_secret_previous: Secret | None = None
    webhook_max_age_s: float = 300.0
    webhook_max_body_bytes: int = 1024 * 1024
    webhook_publish_timeout_s: float = 10.0
    status_map_ttl_s: float = 7 * 24 * 3600.0
    status_map_size: int = 200_000

    # Operations
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    max_app_labels: int = 200

    def __post_init__(self) -> None:
        positive = (
            "topic_partitions",
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
            "webhook_max_age_s",
            "webhook_max_body_bytes",
            "webhook_publish_timeout_s",
            "status_map_ttl_s",
            "status_map_size",
            "max_app_labels",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(name, "a number greater than 0", getattr(self, name))
        if not 0 <= self.rate_margin < 0.5:
            raise ConfigError("rate_margin", "a fraction in [0, 0.5)", self.rate_margin)
        if self.token_refresh_margin_s < 0:
            raise ConfigError(
                "token_refresh_margin_s", "a number >= 0", self.token_refresh_margin_s
            )
        for port_name in ("http_port", "webhook_port"):
            port = getattr(self, port_name)
            if port is not None and not 0 <= port <= 65535:
                raise ConfigError(port_name, "a TCP port 0-65535", port)
        if not self.kafka_bootstrap.strip():
            raise ConfigError("kafka_bootstrap", "host:port[,host:port...]", self.kafka_bootstrap)
        for url_name in ("auth_url", "conversation_url"):
            url = getattr(self, url_name)
            if not url.startswith(("http://", "https://")):
                raise ConfigError(url_name, "an http(s) URL", url)
        for app_id, app in self.apps.items():
            if app.rate is not None and app.rate <= 0:
                raise ConfigError(f"apps.{app_id}.rate", "a number greater than 0", app.rate)
            if app.burst is not None and app.burst < 1:
                raise ConfigError(f"apps.{app_id}.burst", "a number >= 1", app.burst)
        for channel, rate in self.channel_rates.items():
            if rate <= 0:
                raise ConfigError(f"channel_rates.{channel}", "a number greater than 0", rate)

    def require_credentials(self) -> None:
        """The service (not the simulator or ``send``) needs a project and a key."""
        for name in ("project_id", "key_id"):
            if not getattr(self, name):
                raise ConfigError(name, "a non-empty value", "")
        if not self.key_secret:
            raise ConfigError("key_secret", "a non-empty value (or GATEWAY_KEY_SECRET_FILE)", "")

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


def _channel_rates_from(key: str, raw: Any) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise ConfigError(key, "a table of CHANNEL = rate", raw)
    return {str(ch).upper(): _coerce(f"{key}.{ch}", v, float) for ch, v in raw.items()}


def _parse_mapping_env(key: str, text: str) -> dict[str, Any]:
    """``GATEWAY_CHANNEL_RATES=SMS=10,WHATSAPP=80`` style values."""
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(key, "comma-separated NAME=VALUE pairs", text)
        out[name.strip()] = value.strip()
    return out


def load(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build :class:`Settings` from a TOML file, then ``GATEWAY_*`` env, then ``overrides``.

    ``path`` defaults to ``GATEWAY_CONFIG`` when set. Unknown TOML keys and unknown
    ``GATEWAY_*`` variables are errors: a typo must not silently fall back to a default.
    """
    env = os.environ if env is None else env
    path = path or env.get(f"{ENV_PREFIX}CONFIG") or None
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with Path(path).open("rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError("GATEWAY_CONFIG", "a readable TOML file", str(path)) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("GATEWAY_CONFIG", f"valid TOML ({exc})", str(path)) from None

    hints = typing.get_type_hints(Settings)
    names = {f.name for f in dataclasses.fields(Settings)}
    values: dict[str, Any] = {}
    for key, raw in data.items():
        if key not in names:
            raise ConfigError(key, "a known setting", "unknown key in the TOML file")
        values[key] = raw

    known_env = {f"{ENV_PREFIX}{n.upper()}" for n in names} | {f"{ENV_PREFIX}CONFIG"}
    known_env |= {f"{ENV_PREFIX}{n.upper()}_FILE" for n in names}
    for var in env:
        if var.startswith(ENV_PREFIX) and var not in known_env:
            raise ConfigError(var, "a known GATEWAY_* variable", "unknown variable")

    for name in names:
        var = f"{ENV_PREFIX}{name.upper()}"
        file_var = f"{var}_FILE"
        if file_var in env:
            try:
                values[name] = Path(env[file_var]).read_text().strip()
            except OSError:
                raise ConfigError(file_var, "a readable file", env[file_var]) from None
            source = file_var
        elif var in env:
            values[name] = env[var]
            source = var
        else:
            continue
        if name == "apps":
            raise ConfigError(source, "per-app settings in the TOML file ([apps.ID])", "env")
        if name == "channel_rates":
            values[name] = _parse_mapping_env(source, env[source] if source == var else "")
    values.update(overrides)

    kwargs: dict[str, Any] = {}
    for name, raw in values.items():
        key = f"{ENV_PREFIX}{name.upper()}" if f"{ENV_PREFIX}{name.upper()}" in env else name
        if name == "apps":
            kwargs[name] = raw if _is_app_map(raw) else _apps_from(key, raw)
        elif name == "channel_rates":
            kwargs[name] = _channel_rates_from(key, raw)
        elif isinstance(raw, Secret):
            kwargs[name] = raw
        else:
            kwargs[name] = _coerce(key, raw, hints[name])
    if kwargs.get("region") is not None and kwargs["region"] not in REGIONS:
        raise ConfigError("region", "one of us, eu, br", kwargs["region"])
    try:
        return Settings(**kwargs)
    except ConfigError as exc:
        env_key = f"{ENV_PREFIX}{exc.key.upper()}"
        if env_key in env:
            raise ConfigError(env_key, exc.expected, exc.got) from None
        raise


def _is_app_map(raw: Any) -> bool:
    return isinstance(raw, Mapping) and all(isinstance(v, AppSettings) for v in raw.values())
