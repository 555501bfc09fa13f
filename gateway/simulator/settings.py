"""Simulator configuration: one frozen dataclass, validated on construction.

Runtime changes (``POST /_sim/config``) go through :func:`patch`, which builds a new
validated instance with ``dataclasses.replace``; nothing mutates a settings object.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, cast

Region = Literal["us", "eu", "br"]
REGIONS: Final[frozenset[str]] = frozenset({"us", "eu", "br"})
ProcessingMode = Literal["DISPATCH", "CONVERSATION"]
PROCESSING_MODES: Final[frozenset[str]] = frozenset({"DISPATCH", "CONVERSATION"})

#: Fields that ``POST /_sim/config`` may change while the simulator runs.
TUNABLE: Final[frozenset[str]] = frozenset(
    {
        "error_rate",
        "latency_s",
        "latency_jitter_s",
        "project_rate",
        "app_rate",
        "app_rates",
        "drain_factors",
        "processing_modes",
        "queue_size",
        "project_forbidden",
        "strict",
        "token_lifetime_s",
        "callback_failed_fraction",
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProjectSpec:
    """Another project the simulator serves: its own access key and project cap.

    A key belongs to one project, as on Sinch: a token issued for this key (or the
    key itself over Basic auth) is refused with 403 on any other project.
    """

    key_id: str
    key_secret: str
    rate: float = 800

    def __post_init__(self) -> None:
        for name in ("key_id", "key_secret"):
            value = getattr(self, name)
            _require(isinstance(value, str) and bool(value), name, "must not be empty")
        _positive(self.rate, "rate")


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulatorSettings:
    """Everything the simulator needs; durations are float seconds, rates per second.

    ``project_rate`` and the strict-mode app limit are sliding 1-second windows that
    admit at most ``max(1, floor(rate))`` sends per window. In normal mode (the
    default, as Sinch does it) an app has an ingress queue of ``queue_size`` messages
    drained continuously at its rate times its ``drain_factors`` entry (default 1):
    a factor below 1 makes the queue drain slower than the rate the app reports.
    ``apps=None`` means every app id exists, in ``default_region``. Apps process in
    ``processing_mode`` unless ``processing_modes`` names another for them.
    ``project_forbidden`` answers every send and app read with 403. A send body over
    ``max_request_bytes`` is refused with 400.

    ``project_id`` / ``key_id`` / ``key_secret`` / ``project_rate`` are the default
    project; ``projects`` adds more, by project_id, each with its own key and its
    own 1-second project window at its own ``rate`` (a plain mapping with those
    keys is accepted for a :class:`ProjectSpec`). Apps are shared by every project.
    """

    host: str = "127.0.0.1"
    port: int = 0
    project_id: str = "demo-project"
    key_id: str = "demo-key"
    key_secret: str = "demo-secret"  # noqa: S105 - the simulator's documented demo credential
    token_lifetime_s: float = 3600.0
    project_rate: float = 800
    app_rate: float = 20.0
    app_rates: Mapping[str, float] = field(default_factory=dict)
    drain_factors: Mapping[str, float] = field(default_factory=dict)
    queue_size: int = 500_000
    strict: bool = False
    processing_mode: ProcessingMode = "DISPATCH"
    processing_modes: Mapping[str, ProcessingMode] = field(default_factory=dict)
    project_forbidden: bool = False
    max_request_bytes: int = 1024 * 1024
    apps: Mapping[str, Region] | None = None
    default_region: Region = "us"
    error_rate: float = 0.0
    latency_s: float = 0.0
    latency_jitter_s: float = 0.0
    callback_url: str | None = None
    callback_secret: str | None = None
    callback_failed_fraction: float = 0.0
    callback_delay_s: float = 0.05
    callback_workers: int = 8
    callback_queue_size: int = 10_000
    callback_retries: int = 3
    callback_timeout_s: float = 5.0
    basic_auth_rate: float = 2.0
    accepted_log_size: int = 1_000_000
    seed: int | None = None
    projects: Mapping[str, ProjectSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(bool(self.host), "host", "must not be empty")
        _require(0 <= self.port <= 65535, "port", "must be in 0..65535")
        for name in ("project_id", "key_id", "key_secret"):
            _require(bool(getattr(self, name)), name, "must not be empty")
        _positive(self.token_lifetime_s, "token_lifetime_s")
        _positive(self.project_rate, "project_rate")
        _positive(self.app_rate, "app_rate")
        _positive(self.basic_auth_rate, "basic_auth_rate")
        object.__setattr__(self, "app_rates", dict(self.app_rates))
        for app_id, rate in self.app_rates.items():
            _positive(rate, f"app_rates[{app_id!r}]")
        object.__setattr__(self, "drain_factors", dict(self.drain_factors))
        for app_id, factor in self.drain_factors.items():
            _positive(factor, f"drain_factors[{app_id!r}]")
        _require(_is_int(self.queue_size) and self.queue_size >= 1, "queue_size", "must be >= 1")
        _require(
            _is_int(self.max_request_bytes) and self.max_request_bytes >= 1024,
            "max_request_bytes",
            "must be an integer >= 1024",
        )
        _require(
            self.processing_mode in PROCESSING_MODES,
            "processing_mode",
            "must be DISPATCH or CONVERSATION",
        )
        object.__setattr__(self, "processing_modes", dict(self.processing_modes))
        for app_id, mode in self.processing_modes.items():
            _require(
                mode in PROCESSING_MODES,
                f"processing_modes[{app_id!r}]",
                "must be DISPATCH or CONVERSATION",
            )
        _require(isinstance(self.project_forbidden, bool), "project_forbidden", "must be a boolean")
        _require(self.default_region in REGIONS, "default_region", "must be us, eu or br")
        if self.apps is not None:
            object.__setattr__(self, "apps", dict(self.apps))
            for app_id, region in self.apps.items():
                _require(region in REGIONS, f"apps[{app_id!r}]", "must be us, eu or br")
        _fraction(self.error_rate, "error_rate")
        _fraction(self.callback_failed_fraction, "callback_failed_fraction")
        for name in ("latency_s", "latency_jitter_s", "callback_delay_s"):
            value = getattr(self, name)
            _require(_finite(value) and value >= 0, name, "must be a finite number >= 0")
        _positive(self.callback_timeout_s, "callback_timeout_s")
        _require(self.callback_workers >= 1, "callback_workers", "must be >= 1")
        _require(self.callback_queue_size >= 1, "callback_queue_size", "must be >= 1")
        _require(self.callback_retries >= 0, "callback_retries", "must be >= 0")
        _require(self.accepted_log_size >= 0, "accepted_log_size", "must be >= 0")
        object.__setattr__(self, "projects", _projects(self.projects, self.project_id))
        key_ids = [self.key_id, *(spec.key_id for spec in self.projects.values())]
        _require(len(set(key_ids)) == len(key_ids), "projects", "key_id must differ per project")
        if self.callback_url is not None:
            _require(
                self.callback_url.startswith(("http://", "https://")),
                "callback_url",
                "must be an http(s) URL",
            )

    def project_ids(self) -> list[str]:
        """Every project served: the default one first."""
        return [self.project_id, *self.projects]

    def project_limit(self, project_id: str) -> float:
        """The project cap of ``project_id`` (sends and app reads per second)."""
        spec = self.projects.get(project_id)
        return self.project_rate if spec is None else spec.rate

    def access_keys(self) -> list[tuple[str, str, str]]:
        """``(project_id, key_id, key_secret)`` of every project."""
        own = (self.project_id, self.key_id, self.key_secret)
        return [own, *((pid, p.key_id, p.key_secret) for pid, p in self.projects.items())]

    def app_limit(self, app_id: str) -> float:
        """The rate of ``app_id``: its override or the default ``app_rate``."""
        return self.app_rates.get(app_id, self.app_rate)

    def drain_rate(self, app_id: str) -> float:
        """How fast the ingress queue of ``app_id`` really drains, messages per second."""
        return self.app_limit(app_id) * self.drain_factors.get(app_id, 1.0)

    def processing_mode_of(self, app_id: str) -> ProcessingMode:
        """The processing mode of ``app_id``: its override or ``processing_mode``."""
        return self.processing_modes.get(app_id, self.processing_mode)

    def region_of(self, app_id: str) -> str | None:
        """The region an app lives in, or None when the app does not exist."""
        if self.apps is None:
            return self.default_region
        return self.apps.get(app_id)


def patch(settings: SimulatorSettings, changes: Mapping[str, Any]) -> SimulatorSettings:
    """Return ``settings`` with the tunable ``changes`` applied (validated).

    ``app_rates``, ``drain_factors`` and ``processing_modes`` are merged key by key;
    a ``null`` value removes that app's override. Raises ValueError naming the
    offending field.
    """
    unknown = sorted(set(changes) - TUNABLE)
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a tunable setting")
    updates = dict(changes)
    for name, value in changes.items():
        if name in ("strict", "project_forbidden"):
            _require(isinstance(value, bool), name, "must be a boolean")
        elif name in ("app_rates", "drain_factors"):
            updates[name] = _merge(getattr(settings, name), name, value, _as_number)
        elif name == "processing_modes":
            updates[name] = _merge(settings.processing_modes, name, value, _as_mode)
        elif name == "queue_size":
            _require(_is_int(value), name, "must be an integer")
        else:
            _require(_is_number(value), name, "must be a number")
    return replace(settings, **updates)


def _projects(raw: Mapping[str, Any], default_id: str) -> dict[str, ProjectSpec]:
    _require(isinstance(raw, Mapping), "projects", "must be a mapping of project_id to a project")
    out: dict[str, ProjectSpec] = {}
    for project_id, spec in raw.items():
        where = f"projects[{project_id!r}]"
        _require(isinstance(project_id, str) and bool(project_id), where, "needs a project_id")
        _require(project_id != default_id, where, "is the default project_id")
        if isinstance(spec, ProjectSpec):
            out[project_id] = spec
            continue
        _require(isinstance(spec, Mapping), where, "must be {key_id, key_secret, rate}")
        try:
            out[project_id] = ProjectSpec(**dict(spec))
        except TypeError:
            unknown = sorted(set(spec) - {"key_id", "key_secret", "rate"})
            name = f"{where}.{unknown[0]}" if unknown else where
            raise ValueError(f"{name}: must be {{key_id, key_secret, rate}}") from None
        except ValueError as exc:
            raise ValueError(f"{where}.{exc}") from None
    return out


def _merge(
    current: Mapping[str, Any], name: str, value: object, convert: Callable[[str, object], Any]
) -> dict[str, Any]:
    _require(isinstance(value, dict), name, "must be an object keyed by app_id")
    merged = dict(current)
    for app_id, item in cast(dict[str, object], value).items():
        if item is None:
            merged.pop(app_id, None)
        else:
            merged[app_id] = convert(f"{name}[{app_id!r}]", item)
    return merged


def _as_number(name: str, value: object) -> float:
    _require(_is_number(value), name, "must be a number")
    return float(cast(float, value))


def _as_mode(name: str, value: object) -> str:
    _require(value in PROCESSING_MODES, name, "must be DISPATCH or CONVERSATION")
    return cast(str, value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: object) -> bool:
    return _is_number(value) and math.isfinite(cast(float, value))


def _require(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {problem}")


def _positive(value: float, name: str) -> None:
    _require(_finite(value) and value > 0, name, "must be a finite number > 0")


def _fraction(value: float, name: str) -> None:
    _require(_finite(value) and 0.0 <= value <= 1.0, name, "must be between 0 and 1")
