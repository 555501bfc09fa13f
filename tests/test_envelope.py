from __future__ import annotations

import orjson
import pytest

from gateway.envelope import Priority, decode
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


@pytest.mark.parametrize(
    ("value", "reason"),
    [
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
        (b"x" * 2000, "too_large"),
        (None, "empty"),
    ],
)
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
    assert body["correlation_id"] == "mine"
    assert body["queue"] == "NORMAL_PRIORITY"
    assert "ttl" not in body
