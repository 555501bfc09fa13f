"""The retry policy: pure decisions, no I/O."""

from __future__ import annotations

import random
from typing import Any

import pytest

from gateway.errors import AuthError, SinchError, TransportError
from gateway.retry import Action, Decision, backoff_s, classify, refuses_project

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"


def answer(code: int, retry_after_s: float | None = None, **error: Any) -> SinchError:
    return SinchError(code, {"code": code, **error}, retry_after_s)


@pytest.mark.parametrize("status", [429, 500, 503, 408])
def test_a_server_hint_is_capped_at_max_delay(status):
    decision = classify(answer(status, 3600.0), max_delay_s=30.0)
    assert (decision.action, decision.retry_after_s) == (Action.RETRY, 30.0)
    assert classify(answer(status, 2.5), max_delay_s=30.0).retry_after_s == 2.5
    assert classify(answer(status), max_delay_s=30.0).retry_after_s is None
    assert classify(answer(status, 3600.0)).retry_after_s == 3600.0  # no cap asked


def test_retriable_reasons_stay_bounded():
    assert classify(answer(429)).reason == "429"
    assert classify(answer(502)).reason == "5xx"
    assert classify(answer(425)).reason == "425"
    assert classify(answer(400)) == Decision(Action.FAIL, "http_400")


@pytest.mark.parametrize(
    ("status", "renewed", "own_region", "own_project", "expected"),
    [
        # the configured route: the app (or the project, or the credentials) is at fault
        (404, False, False, False, Decision(Action.PAUSE_APP, "404")),
        (403, False, False, False, Decision(Action.PAUSE_APP, "403")),
        (401, False, False, False, Decision(Action.RENEW, "401")),
        (401, True, False, False, Decision(Action.PAUSE_AUTH, "401_after_renewal")),
        # the record named its own region: a 404 is that record's fault alone
        (404, False, True, False, Decision(Action.FAIL, "wrong_region")),
        (403, False, True, False, Decision(Action.PAUSE_APP, "403")),
        (401, True, True, False, Decision(Action.PAUSE_AUTH, "401_after_renewal")),
        # the record named its own project: 401 after renewal, 403 and 404 fail it
        (404, False, False, True, Decision(Action.FAIL, "wrong_project")),
        (404, False, True, True, Decision(Action.FAIL, "wrong_project")),
        (403, False, False, True, Decision(Action.FAIL, "wrong_project")),
        (401, False, False, True, Decision(Action.RENEW, "401")),
        (401, True, False, True, Decision(Action.FAIL, "wrong_project")),
        # retriable and plain client errors do not depend on the route
        (429, False, True, True, Decision(Action.RETRY, "429")),
        (400, False, True, True, Decision(Action.FAIL, "http_400")),
    ],
)
def test_refusals_are_scoped_by_who_chose_the_route(
    status, renewed, own_region, own_project, expected
):
    decision = classify(
        answer(status), renewed=renewed, own_region=own_region, own_project=own_project
    )
    assert decision == expected


@pytest.mark.parametrize(
    "error",
    [
        {"status": "PERMISSION_DENIED", "message": "Project p1 is not allowed to send."},
        {"details": [{"@type": ERROR_INFO, "reason": "PROJECT_DISABLED"}]},
    ],
)
def test_a_403_that_refuses_the_project_pauses_the_project(error):
    assert refuses_project(error)
    assert classify(answer(403, **error)) == Decision(Action.PAUSE_PROJECT, "project_refused")
    # the record's own project: that record fails, nothing is held
    assert classify(answer(403, **error), own_project=True).action is Action.FAIL


@pytest.mark.parametrize(
    "error",
    [
        {"status": "PERMISSION_DENIED", "message": "App a1 may not use this channel."},
        {"status": "FAILED_PRECONDITION", "message": "project quota"},
        {"details": [{"@type": ERROR_INFO, "reason": "APP_DISABLED"}]},
        {"details": [{"@type": "type.googleapis.com/google.rpc.Help", "reason": "PROJECT"}]},
        {"details": "PROJECT_DISABLED", "message": 7},
    ],
)
def test_an_app_level_403_pauses_only_the_app(error):
    assert not refuses_project(error)
    assert classify(answer(403, **error)) == Decision(Action.PAUSE_APP, "403")


@pytest.mark.parametrize(
    ("exc", "retry_in_doubt", "expected"),
    [
        (TransportError("connect_error", in_doubt=False), False, ("retry", "connect_error")),
        (TransportError("connect_timeout", in_doubt=False), False, ("retry", "connect_timeout")),
        (TransportError("read_timeout", in_doubt=True), True, ("retry", "in_doubt")),
        (TransportError("read_timeout", in_doubt=True), False, ("fail", "in_doubt")),
        (AuthError("down"), True, ("retry", "auth_unavailable")),
        (AuthError("refused", permanent=True), True, ("pause_auth", "token_refused")),
        (ValueError("bug"), True, ("fail", "ValueError")),
    ],
)
def test_failures_without_an_answer(exc, retry_in_doubt, expected):
    decision = classify(exc, retry_in_doubt=retry_in_doubt, max_delay_s=1.0)
    assert (decision.action.value, decision.reason) == expected
    assert decision.retry_after_s is None


def test_backoff_is_full_jitter_under_a_cap():
    rng = random.Random(7)
    draws = [backoff_s(n, base_s=0.5, cap_s=4.0, rng=rng) for n in range(1, 200)]
    assert all(0 <= d <= 4.0 for d in draws)
    assert max(draws[:1]) <= 0.5
    assert max(draws[10:]) > 2.0  # the ceiling grew to the cap
