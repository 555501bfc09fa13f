"""Retry policy: what to do with one failed attempt. Pure: no I/O, no clock.

Sinch's guidance (the seed): 429 means a cap was exceeded; 500/503 mean "try
again with exponential back-off". Other 4xx answers will not get better by
retrying: 400 goes to the DLQ at once; 403/404 concern one app (unknown app,
wrong region) and pause that app's lane rather than dead-lettering its backlog.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from gateway.errors import AuthError, SinchError, TransportError

RETRIABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class Action(enum.Enum):
    RETRY = "retry"  # back off, then try again (taking tokens again)
    RENEW = "renew"  # renew the shared token, then try again at once
    FAIL = "fail"  # terminal: DLQ + "failed" result
    PAUSE_APP = "pause_app"  # this app cannot be sent to: hold its lane
    PAUSE_AUTH = "pause_auth"  # credentials refused: hold all sending


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str
    retry_after_s: float | None = None


def classify(exc: Exception, *, retry_in_doubt: bool = True, renewed: bool = False) -> Decision:
    """Map one attempt's exception to an action.

    ``renewed`` says the token was already renewed for this request: a second
    401 means the credentials themselves are refused.
    """
    if isinstance(exc, SinchError):
        status = exc.status
        if status == 429:
            return Decision(Action.RETRY, "429", exc.retry_after_s)
        if status in RETRIABLE_STATUS:
            return Decision(
                Action.RETRY, "5xx" if status >= 500 else str(status), exc.retry_after_s
            )
        if status == 401:
            if renewed:
                return Decision(Action.PAUSE_AUTH, "401_after_renewal")
            return Decision(Action.RENEW, "401")
        if status == 403:
            return Decision(Action.PAUSE_APP, "403")
        if status == 404:
            return Decision(Action.PAUSE_APP, "404")
        return Decision(Action.FAIL, f"http_{status}")
    if isinstance(exc, TransportError):
        if exc.in_doubt and not retry_in_doubt:
            return Decision(Action.FAIL, "in_doubt")
        return Decision(Action.RETRY, exc.kind if not exc.in_doubt else "in_doubt")
    if isinstance(exc, AuthError):
        if exc.permanent:
            return Decision(Action.PAUSE_AUTH, "token_refused")
        return Decision(Action.RETRY, "auth_unavailable")
    return Decision(Action.FAIL, type(exc).__name__)


def backoff_s(
    attempt: int, *, base_s: float, cap_s: float, rng: random.Random | None = None
) -> float:
    """Full-jitter exponential back-off for the ``attempt``-th retry (1-based)."""
    ceiling = min(cap_s, base_s * 2 ** min(attempt - 1, 32))
    return (rng or random).uniform(0, ceiling)
