from __future__ import annotations

import orjson
import pytest

from gateway.envelope import (
    MAX_CORRELATION_ID,
    Priority,
    Status,
    correlation_for,
    decode,
    request_id_in,
    result_record,
    surely_not_high,
)
from gateway.errors import InvalidMessage

GOOD = {
    "request_id": "r1",
    "payload": {
        "app_id": "a1",
        "recipient": {
            "identified_by": {"channel_identities": [{"channel": "sms", "identity": "46700"}]}
        },
        "message": {"text_message": {"text": "hi"}},
    },
}


def with_(**changes):
    doc = orjson.loads(orjson.dumps(GOOD))
    for path, value in changes.items():
        target = doc
        *parents, leaf = path.split("__")
        for p in parents:
            target = target[p]
        if value is ...:
            del target[leaf]
        else:
            target[leaf] = value
    return orjson.dumps(doc)


def test_good_envelope_decodes():
    req = decode(orjson.dumps(GOOD), max_bytes=10_000)
    assert (req.request_id, req.app_id, req.channel) == ("r1", "a1", "SMS")
    assert req.priority is Priority.NORMAL
    assert req.campaign is None


def test_campaign_and_version_are_read_and_the_campaign_reaches_the_result():
    req = decode(with_(campaign="black-friday", envelope_version=1), max_bytes=10_000)
    assert req.campaign == "black-friday"
    result = orjson.loads(
        result_record(
            request_id=req.request_id,
            status=Status.CANCELLED,
            app_id=req.app_id,
            attempts=0,
            campaign=req.campaign,
        )
    )
    assert (result["status"], result["campaign"]) == ("cancelled", "black-friday")


# Every kind of record the decoder refuses, with its reason (the JSON Schema tests reuse it).
MALFORMED: list[tuple[bytes | None, str]] = [
    (b"not json", "invalid_json"),
    (b'{"request_id": "r1", "payload": {', "invalid_json"),
    (b"\xff\xfe\x00garbage", "invalid_utf8"),
    (b"[1, 2]", "bad_field"),
    (with_(request_id=...), "missing_field"),
    (with_(request_id=7), "bad_field"),
    (with_(payload__app_id=...), "missing_field"),
    (with_(payload__app_id=["x"]), "bad_field"),
    (with_(payload__recipient=...), "missing_field"),
    (with_(payload__recipient={"identified_by": {}}), "missing_field"),
    (with_(payload__message=...), "missing_field"),
    (with_(payload__message={"unknown_message": {}}), "bad_field"),
    (with_(expire_at="tomorrow"), "bad_field"),
    (with_(expire_at="2030-01-01T00:00:00"), "bad_field"),
    (with_(priority="urgent"), "bad_field"),
    (with_(region="mars"), "bad_field"),
    (with_(region=["eu"]), "bad_field"),  # unhashable: must not escape as TypeError
    (with_(campaign=""), "bad_field"),
    (with_(campaign=12), "bad_field"),
    (with_(campaign="c" * 129), "bad_field"),
    (with_(envelope_version=2), "bad_field"),
    (with_(envelope_version=True), "bad_field"),
    (with_(envelope_version={"v": 1}), "bad_field"),
    (b"x" * 2000, "too_large"),
    (None, "empty"),
]


@pytest.mark.parametrize(("value", "reason"), MALFORMED)
def test_malformed_envelopes_say_why(value, reason):
    with pytest.raises(InvalidMessage) as info:
        decode(value, max_bytes=1000)
    assert info.value.reason == reason


def test_body_fills_gateway_owned_fields_only_when_absent():
    req = decode(with_(priority="high", expire_at="2030-01-01T00:00:00Z"), max_bytes=10_000)
    body = orjson.loads(req.body(now=req.expire_at - 90))
    assert body["correlation_id"] == "r1"
    assert body["queue"] == "HIGH_PRIORITY"
    assert body["ttl"] == "90s"
    own = decode(
        with_(payload__correlation_id="mine", payload__queue="NORMAL_PRIORITY"), max_bytes=10_000
    )
    body = orjson.loads(own.body(now=0))
    assert body["correlation_id"] == "mine|rid:r1"  # its own, readable, and the request
    assert body["queue"] == "NORMAL_PRIORITY"
    assert "ttl" not in body


@pytest.mark.parametrize(("left_s", "ttl"), [(90.7, "90s"), (3.0, "3s"), (2.5, "3s"), (1.0, "3s")])
def test_ttl_from_expire_at_is_never_below_three_seconds(left_s, ttl):
    req = decode(with_(expire_at="2030-01-01T00:00:00Z"), max_bytes=10_000)
    assert req.expire_at is not None
    assert orjson.loads(req.body(now=req.expire_at - left_s))["ttl"] == ttl


@pytest.mark.parametrize(
    ("own", "sent"),
    [("2s", "3s"), ("0.5s", "3s"), (1, "3s"), ("2", "3s"), ("3s", "3s"), ("60s", "60s")],
)
def test_a_producer_ttl_below_three_seconds_is_raised(own, sent):
    req = decode(with_(payload__ttl=own, expire_at="2030-01-01T00:00:00Z"), max_bytes=10_000)
    assert orjson.loads(req.body(now=0))["ttl"] == sent
    assert req.payload["ttl"] == own  # the decoded payload itself is left alone


def test_a_long_request_id_gets_a_short_stable_correlation_id():
    long_id = "r" * 200
    first = orjson.loads(decode(with_(request_id=long_id), max_bytes=10_000).body(now=0))
    again = orjson.loads(decode(with_(request_id=long_id), max_bytes=10_000).body(now=0))
    other = orjson.loads(decode(with_(request_id="s" * 200), max_bytes=10_000).body(now=0))
    assert len(first["correlation_id"]) <= MAX_CORRELATION_ID
    assert first["correlation_id"].startswith("gw:")
    assert first["correlation_id"] == again["correlation_id"] != other["correlation_id"]


@pytest.mark.parametrize(
    ("request_id", "own", "expected"),
    [
        ("r1", None, "r1"),
        ("x" * 128, None, "x" * 128),
        ("r1", "mine", "mine|rid:r1"),
        ("x" * 200, "mine", "mine|" + correlation_for("x" * 200, None)),
        ("r1", "", "r1"),
        ("r" * 100, "o" * 128, "o" * 23 + "|rid:" + "r" * 100),
    ],
)
def test_correlation_for_keeps_what_fits(request_id, own, expected):
    assert correlation_for(request_id, own) == expected
    assert len(correlation_for("x" * 129, None)) <= MAX_CORRELATION_ID
    assert len(correlation_for(request_id, own)) <= MAX_CORRELATION_ID


@pytest.mark.parametrize(
    ("request_id", "own"),
    [("r1", None), ("r1", "mine"), ("r" * 120, "o" * 128), ("x" * 200, None), ("x" * 200, "o")],
)
def test_request_id_in_reads_back_what_correlation_for_made(request_id, own):
    found = request_id_in(correlation_for(request_id, own))
    assert found == (request_id if len(request_id) <= MAX_CORRELATION_ID else None)


def test_own_correlation_id_longer_than_128_is_rejected():
    assert decode(with_(payload__correlation_id="c" * 128), max_bytes=10_000)
    with pytest.raises(InvalidMessage) as info:
        decode(with_(payload__correlation_id="c" * 129), max_bytes=10_000)
    assert info.value.reason == "bad_field"
    assert "correlation_id" in info.value.detail
    with pytest.raises(InvalidMessage):
        decode(with_(payload__correlation_id=12), max_bytes=10_000)


@pytest.mark.parametrize(
    ("value", "app", "expected"),
    [
        (orjson.dumps(GOOD), b"a1", True),
        (with_(priority="low"), b"a1", True),
        (with_(priority="high"), b"a1", False),
        # an escape that spells "high": decoded, never guessed
        (with_(priority="high").replace(b'"high"', b'"\\u0068igh"'), b"a1", False),
        (orjson.dumps(GOOD), b"a2", False),  # another app
        (orjson.dumps(GOOD), b"a", False),  # a prefix of the app's id is not its id
    ],
)
def test_surely_not_high_never_passes_a_high_priority_record(value, app, expected):
    assert surely_not_high(value, app) is expected
    if expected:  # what it lets through decodes to a non-high request of that app
        req = decode(value, max_bytes=10_000)
        assert req.priority is not Priority.HIGH
        assert req.app_id == app.decode()
