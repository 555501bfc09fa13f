"""Retry policy: what to do with one failed attempt. Pure: no I/O, no clock.

Sinch's guidance (the seed): 429 means a cap was exceeded; 500/503 mean "try
again with exponential back-off". Other 4xx answers will not get better by
retrying: 400 goes to the DLQ at once; 403/404 concern one app (unknown app,
wrong region) and pause that app's lane rather than dead-lettering its backlog
-- unless the record itself chose the region or project that was refused, in
which case only that record is wrong and it fails alone.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import Any

from gateway.errors import AuthError, SinchError, TransportError

RETRIABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"


class Action(enum.Enum):
    RETRY = "retry"  # back off, then try again (taking tokens again)
    RENEW = "renew"  # renew the shared token, then try again at once
    FAIL = "fail"  # terminal: DLQ + "failed" result
    PAUSE_APP = "pause_app"  # this app cannot be sent to: hold its lane
    PAUSE_PROJECT = "pause_project"  # the project is refused: hold every lane of it
    PAUSE_AUTH = "pause_auth"  # credentials refused: hold all sending


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str
    retry_after_s: float | None = None


def refuses_project(error: dict[str, Any]) -> bool:
    """Whether a 403 error object says the *project* (not one app) is refused.

    The rule, kept deliberately narrow so that an ordinary app-level 403 never
    holds a whole project: either a ``google.rpc.ErrorInfo`` detail whose
    ``reason`` mentions the project (e.g. ``PROJECT_DISABLED``), or ``status``
    ``PERMISSION_DENIED`` with a ``message`` that names the project (contains
    the word "project").
    """
    details = error.get("details")
    for detail in details if isinstance(details, list) else ():
        if isinstance(detail, dict) and detail.get("@type") == _ERROR_INFO:
            reason = detail.get("reason")
            if isinstance(reason, str) and "project" in reason.lower():
                return True
    message = error.get("message")
    return (
        error.get("status") == "PERMISSION_DENIED"
        and isinstance(message, str)
        and "project" in message.lower()
    )


def classify(
    exc: Exception,
    *,
    retry_in_doubt: bool = True,
    renewed: bool = False,
    max_delay_s: float | None = None,
    own_region: bool = False,
    own_project: bool = False,
) -> Decision:
    """Map one attempt's exception to an action.

    ``renewed`` says the token was already renewed for this request: a second
    401 means the credentials themselves are refused.

    ``max_delay_s`` caps the server's hint (``Retry-After`` or RetryInfo): the
    decision never asks for a longer wait (pass ``backoff_max_s``).

    ``own_region`` / ``own_project`` say the record named its own region or
    project_id, differing from the configuration. Then a refusal is the
    record's fault, not the app's: a 404 fails it as ``wrong_project`` (when it
    named a project) or ``wrong_region``; a 403, or a 401 after renewal, fails
    it as ``wrong_project`` when it named a project. Nothing is paused for it.

    Without its own route, 404 pauses the app (unknown app or wrong app
    region), 403 pauses the project when :func:`refuses_project` says so and
    the app otherwise.
    """
    if isinstance(exc, SinchError):
        return _classify_answer(
            exc,
            renewed=renewed,
            max_delay_s=max_delay_s,
            own_region=own_region,
            own_project=own_project,
        )
    if isinstance(exc, TransportError):
        if exc.in_doubt and not retry_in_doubt:
            return Decision(Action.FAIL, "in_doubt")
        return Decision(Action.RETRY, exc.kind if not exc.in_doubt else "in_doubt")
    if isinstance(exc, AuthError):
        if exc.permanent:
            return Decision(Action.PAUSE_AUTH, "token_refused")
        return Decision(Action.RETRY, "auth_unavailable")
    return Decision(Action.FAIL, type(exc).__name__)


def _classify_answer(
    exc: SinchError,
    *,
    renewed: bool,
    max_delay_s: float | None,
    own_region: bool,
    own_project: bool,
) -> Decision:
    status = exc.status
    if status in RETRIABLE_STATUS:
        delay = exc.retry_after_s
        if delay is not None and max_delay_s is not None:
            delay = min(delay, max_delay_s)
        reason = "5xx" if status >= 500 else str(status)
        return Decision(Action.RETRY, reason, delay)
    if status == 401:
        if not renewed:
            return Decision(Action.RENEW, "401")
        if own_project:
            return Decision(Action.FAIL, "wrong_project")
        return Decision(Action.PAUSE_AUTH, "401_after_renewal")
    if status == 403:
        if own_project:
            return Decision(Action.FAIL, "wrong_project")
        if refuses_project(exc.error):
            return Decision(Action.PAUSE_PROJECT, "project_refused")
        return Decision(Action.PAUSE_APP, "403")
    if status == 404:
        if own_project:
            return Decision(Action.FAIL, "wrong_project")
        if own_region:
            return Decision(Action.FAIL, "wrong_region")
        return Decision(Action.PAUSE_APP, "404")
    return Decision(Action.FAIL, f"http_{status}")


def backoff_s(
    attempt: int, *, base_s: float, cap_s: float, rng: random.Random | None = None
) -> float:
    """Full-jitter exponential back-off for the ``attempt``-th retry (1-based)."""
    ceiling = min(cap_s, base_s * 2 ** min(attempt - 1, 32))
    return (rng or random).uniform(0, ceiling)
