"""The JSON Schemas cannot drift from the decoder and from the records the gateway writes.

The send-request schema is checked in both directions: every generated variation
is judged by the decoder and by the schema, and both must give the expected
verdict; the decoder's malformed corpus (``tests/test_envelope.py``) must be
refused by the schema too, except the records that are not a JSON document at
all, which no schema can judge. The few places where the two differ on purpose
are pinned in :data:`STRICTER` and :data:`LOOSER`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from jsonschema import Draft202012Validator
from prometheus_client import CollectorRegistry

from gateway import client
from gateway.envelope import (
    ENVELOPE_VERSIONS,
    MAX_CAMPAIGN,
    MAX_CORRELATION_ID,
    MAX_REQUEST_ID,
    MESSAGE_KINDS,
    REGIONS,
    Status,
    correlation_for,
    decode,
    result_record,
)
from gateway.errors import InvalidMessage
from gateway.metrics import Metrics
from gateway.settings import load
from gateway.webhooks import DELIVERY_STATUSES, WebhookReceiver
from tests.fakes import ScriptedPublisher
from tests.test_envelope import GOOD, MALFORMED
from tests.test_outcomes import RESULTS, STATUS, Harness
from tests.test_webhooks import SECRET, report, signed

ROOT = Path(__file__).resolve().parent.parent
SEND = Draft202012Validator(client.schema("send-request"))
RESULT = Draft202012Validator(client.schema("result"))
STATUS_RECORD = Draft202012Validator(client.schema("status"))
# Reasons of records that are not a JSON document: nothing for a schema to judge.
NOT_A_DOCUMENT = {"empty", "invalid_json", "invalid_utf8", "too_large"}


def decoder_accepts(value: bytes, max_bytes: int = 100_000) -> bool:
    try:
        decode(value, max_bytes=max_bytes)
    except InvalidMessage:
        return False
    return True


def schema_accepts(value: bytes) -> bool:
    return SEND.is_valid(orjson.loads(value))


# The corpus' good envelope with every optional member set.
FULL: dict[str, Any] = {
    **GOOD,
    "envelope_version": 1,
    "priority": "normal",
    "campaign": "c1",
    "project_id": "p1",
    "region": "eu",
    "expire_at": "2030-01-01T00:00:00Z",
    "payload": {**GOOD["payload"], "correlation_id": "mine"},
}


def varied(path: str, new: Any) -> bytes:
    """FULL with the member at ``path`` (dots) set to ``new``, or removed for ``...``."""
    doc = orjson.loads(orjson.dumps(FULL))
    *parents, leaf = path.split(".")
    target = doc
    for p in parents:
        target = target[p]
    if new is ...:
        del target[leaf]
    else:
        target[leaf] = new
    return orjson.dumps(doc)


IDENTITY = {"channel": "SMS", "identity": "46700000001"}
BY_IDENTITY = {"identified_by": {"channel_identities": [IDENTITY]}}

# (member, value, accepted); ``...`` removes the member.
VARIATIONS: list[tuple[str, Any, bool]] = [
    ("request_id", "r", True),
    ("request_id", "x" * MAX_REQUEST_ID, True),
    ("request_id", "\U0001f600" * MAX_REQUEST_ID, True),  # characters, not bytes
    ("request_id", "x" * (MAX_REQUEST_ID + 1), False),
    ("request_id", "", False),
    ("request_id", None, False),
    ("request_id", 7, False),
    ("request_id", ["r"], False),
    ("request_id", ..., False),
    ("envelope_version", ..., True),
    ("envelope_version", 1, True),
    ("envelope_version", 1.0, True),
    ("envelope_version", 0, False),
    ("envelope_version", 2, False),
    ("envelope_version", "1", False),
    ("envelope_version", True, False),
    ("envelope_version", None, False),
    ("envelope_version", [1], False),
    ("envelope_version", {}, False),
    ("project_id", "p-1", True),
    ("project_id", None, True),
    ("project_id", "", False),
    ("project_id", 5, False),
    *[("region", r, True) for r in sorted(REGIONS)],
    ("region", None, True),
    ("region", "EU", False),
    ("region", "mars", False),
    ("region", 1, False),
    ("region", ["eu"], False),
    ("expire_at", "2030-01-01T00:00:00Z", True),
    ("expire_at", "2030-06-30T23:59:59.123456+05:30", True),
    ("expire_at", "2030-01-01T00:00:00.5-00:00", True),
    ("expire_at", None, True),
    ("expire_at", "tomorrow", False),
    ("expire_at", "2030-01-01T00:00:00", False),  # no time zone
    ("expire_at", "2030-01-01", False),
    ("expire_at", "2030-13-01T00:00:00Z", False),
    ("expire_at", "2030-01-01T24:00:00Z", False),
    ("expire_at", "2030-01-01T23:59:60Z", False),
    ("expire_at", "2030-01-01t00:00:00z", False),
    ("expire_at", 1893456000, False),
    *[("priority", p, True) for p in ("high", "normal", "low")],
    ("priority", ..., True),
    ("priority", "HIGH", False),
    ("priority", "urgent", False),
    ("priority", None, False),
    ("priority", 0, False),
    ("campaign", "c", True),
    ("campaign", "c" * MAX_CAMPAIGN, True),
    ("campaign", None, True),
    ("campaign", "", False),
    ("campaign", "c" * (MAX_CAMPAIGN + 1), False),
    ("campaign", 12, False),
    ("campaign", ["c"], False),
    ("unknown_member", {"any": "thing"}, True),  # ignored by the gateway
    ("payload", None, False),
    ("payload", [], False),
    ("payload", "x", False),
    ("payload", ..., False),
    ("payload.app_id", "a", True),
    ("payload.app_id", "", False),
    ("payload.app_id", None, False),
    ("payload.app_id", 5, False),
    ("payload.recipient", {"contact_id": "k-1"}, True),
    ("payload.recipient", {"contact_id": "k-1", "identified_by": "ignored"}, True),
    ("payload.recipient", {"contact_id": "", **BY_IDENTITY}, True),
    ("payload.recipient", {"contact_id": 5, **BY_IDENTITY}, True),
    ("payload.recipient", {"identified_by": {"channel_identities": [IDENTITY, "x"]}}, True),
    ("payload.recipient", {"identified_by": {"channel_identities": [{"identity": ""}]}}, True),
    (
        "payload.recipient",
        {"identified_by": {"channel_identities": [{"identity": "1", "channel": 5}]}},
        True,
    ),
    ("payload.recipient", {"contact_id": ""}, False),
    ("payload.recipient", {"contact_id": 5}, False),
    ("payload.recipient", {}, False),
    ("payload.recipient", {"identified_by": {}}, False),
    ("payload.recipient", {"identified_by": []}, False),
    ("payload.recipient", {"identified_by": {"channel_identities": []}}, False),
    ("payload.recipient", {"identified_by": {"channel_identities": {"0": IDENTITY}}}, False),
    ("payload.recipient", {"identified_by": {"channel_identities": ["x", IDENTITY]}}, False),
    ("payload.recipient", {"identified_by": {"channel_identities": [{"channel": "SMS"}]}}, False),
    ("payload.recipient", {"identified_by": {"channel_identities": [{"identity": 4670}]}}, False),
    ("payload.recipient", "46700000001", False),
    ("payload.recipient", None, False),
    ("payload.recipient", ..., False),
    *[("payload.message", {kind: {}}, True) for kind in sorted(MESSAGE_KINDS)],
    ("payload.message", {"text_message": {"text": "hi"}, "explicit_channel_message": {}}, True),
    ("payload.message", {}, False),
    ("payload.message", [], False),
    ("payload.message", {"unknown_message": {}}, False),
    ("payload.message", None, False),
    ("payload.message", ..., False),
    ("payload.correlation_id", "c" * MAX_CORRELATION_ID, True),
    ("payload.correlation_id", "", True),
    ("payload.correlation_id", None, True),
    ("payload.correlation_id", "c" * (MAX_CORRELATION_ID + 1), False),
    ("payload.correlation_id", 12, False),
    ("payload.ttl", "10s", True),  # Sinch's own fields pass through
]


@pytest.mark.parametrize(("path", "new", "accepted"), VARIATIONS)
def test_the_schema_and_the_decoder_agree_on_each_variation(
    path: str, new: Any, accepted: bool
) -> None:
    value = varied(path, new)
    assert decoder_accepts(value) is accepted, "the decoder"
    assert schema_accepts(value) is accepted, "the schema"


@pytest.mark.parametrize(
    ("value", "reason"), MALFORMED, ids=[f"{i}-{r}" for i, (_, r) in enumerate(MALFORMED)]
)
def test_the_schema_refuses_the_decoders_malformed_corpus(value: bytes | None, reason: str) -> None:
    if reason in NOT_A_DOCUMENT:
        # No value, not JSON, or cut off by size before it is parsed (b"x" * 2000 is not JSON
        # either; a too-large JSON document is one of LOOSER): no document to judge.
        with pytest.raises((orjson.JSONDecodeError, TypeError)):
            orjson.loads(value)  # type: ignore[arg-type]
    else:
        assert value is not None
        assert not schema_accepts(value)


def test_the_corpus_has_every_kind_the_decoder_refuses() -> None:
    reasons = {reason for _, reason in MALFORMED}
    assert reasons == {"bad_field", "missing_field"} | NOT_A_DOCUMENT


# Accepted by the decoder, refused by the schema: ISO 8601 forms that Python's
# datetime.fromisoformat reads but that are not RFC 3339. The schema is the contract.
STRICTER = [
    "2030-01-01 00:00:00Z",
    "20300101T000000Z",
    "2030-01-01T00:00Z",
    "2030-01-01T00:00:00+0530",
    "2030-01-01T00:00:00,5Z",
]
# Accepted by the schema, refused by the decoder: dates no calendar has.
LOOSER = ["2030-02-30T00:00:00Z", "0000-01-01T00:00:00Z"]


@pytest.mark.parametrize("when", STRICTER)
def test_the_schema_is_stricter_than_the_decoder_only_on_non_rfc3339_times(when: str) -> None:
    value = varied("expire_at", when)
    assert decoder_accepts(value)
    assert not schema_accepts(value)


@pytest.mark.parametrize("when", LOOSER)
def test_the_schema_leaves_calendar_dates_to_the_decoder(when: str) -> None:
    value = varied("expire_at", when)
    assert schema_accepts(value)
    assert not decoder_accepts(value)


def test_the_size_limit_is_the_decoders_alone() -> None:
    value = varied("payload.message", {"text_message": {"text": "x" * 2000}})
    assert schema_accepts(value)
    assert decoder_accepts(value, max_bytes=len(value))
    assert not decoder_accepts(value, max_bytes=len(value) - 1)
    assert "max_message_bytes" in client.schema()["description"]


def test_the_schema_names_the_decoders_constants() -> None:
    doc = client.schema()
    props = doc["properties"]
    payload = props["payload"]["properties"]
    assert set(props["region"]["enum"]) == REGIONS | {None}
    assert {props["envelope_version"]["const"]} == ENVELOPE_VERSIONS
    assert props["request_id"]["maxLength"] == MAX_REQUEST_ID
    assert props["campaign"]["maxLength"] == MAX_CAMPAIGN
    assert payload["correlation_id"]["maxLength"] == MAX_CORRELATION_ID
    kinds = {one["required"][0] for one in props["payload"]["properties"]["message"]["anyOf"]}
    assert kinds == MESSAGE_KINDS
    results = client.schema("result")["properties"]
    assert set(results["status"]["enum"]) == {s.value for s in Status}
    statuses = client.schema("status")["properties"]["status"]["enum"]
    assert set(statuses) == DELIVERY_STATUSES | {"sent"}


@pytest.mark.parametrize("name", client.SCHEMAS)
def test_each_schema_is_valid_and_the_repository_copy_is_the_packaged_one(name: str) -> None:
    Draft202012Validator.check_schema(client.schema(name))
    packaged = ROOT / "gateway" / "schemas" / f"{name}.schema.json"
    copy = ROOT / "schemas" / f"{name}.schema.json"
    assert copy.read_bytes() == packaged.read_bytes(), f"cp {packaged} {copy}"


# -- results and status records ---------------------------------------------------


def test_result_records_of_every_status_pass_and_name_every_member() -> None:
    records = [
        result_record(
            request_id="r1",
            status=Status.SENT,
            app_id="a1",
            attempts=1,
            http_status=200,
            message_id="m1",
            accepted_time="2030-01-01T00:00:00Z",
            timings={"queued_s": 0.2, "send_s": 0.05},
            partition=2,
            offset=7,
            campaign="spring",
        ),
        result_record(
            request_id="r1",
            status=Status.FAILED,
            app_id="a1",
            attempts=5,
            http_status=None,
            error={"code": 503},
            partition=0,
            offset=0,
        ),
        result_record(request_id=None, status=Status.REJECTED, app_id=None, attempts=0),
        *[
            result_record(request_id="r2", status=status, app_id="a2", attempts=0, error={})
            for status in Status
        ],
    ]
    required = set(client.schema("result")["required"])
    for value in records:
        doc = orjson.loads(value)
        assert set(doc) == required  # a new member needs its place in the schema
        assert RESULT.is_valid(doc), list(RESULT.iter_errors(doc))
    bad = orjson.loads(records[0])
    for change in ({"status": "queued"}, {"attempts": -1}, {"timings": {"x": "1s"}}):
        assert not RESULT.is_valid({**bad, **change})
    assert not RESULT.is_valid({k: v for k, v in bad.items() if k != "source"})


async def test_the_records_outcomes_write_pass_the_result_and_status_schemas() -> None:
    h = Harness(ScriptedPublisher())
    cases = [
        lambda r: h.outcomes.sent(
            r, message_id="m-1", accepted_time="2030-01-01T00:00:00.000Z", timings={}
        ),
        lambda r: h.outcomes.sent(r, message_id=None, accepted_time=None, timings={"x": 0.1}),
        lambda r: h.outcomes.failed(r, "http_400", http_status=400, error={"code": 400}),
        lambda r: h.outcomes.expired(r),
        lambda r: h.outcomes.cancelled(r, "dropped by ops"),
    ]
    for offset, end in enumerate(cases):
        end(h.request(offset))
    req = h.request(len(cases))
    assert req.origin is not None
    h.outcomes.rejected(req.origin, "bad_field", "priority", request_id=None, app_id=None)
    assert await h.outcomes.settle(None, 5)
    results = [orjson.loads(v or b"") for v, _k, _h in h.publisher.on(RESULTS)]
    statuses = [orjson.loads(v or b"") for v, _k, _h in h.publisher.on(STATUS)]
    assert sorted(r["status"] for r in results) == sorted(
        ["sent", "sent", "failed", "expired", "cancelled", "rejected"]
    )
    assert [s["status"] for s in statuses] == ["sent", "sent"]
    for doc in results:
        assert RESULT.is_valid(doc), list(RESULT.iter_errors(doc))
    for doc in statuses:
        assert STATUS_RECORD.is_valid(doc), list(STATUS_RECORD.iter_errors(doc))
    assert not STATUS_RECORD.is_valid({**statuses[0], "request_id": None})


async def test_the_status_records_of_delivery_reports_pass_the_status_schema(
    aiohttp_client: Any,
) -> None:
    settings = load(env={}, webhook_secret=SECRET)
    receiver = WebhookReceiver(settings, Metrics(CollectorRegistry()))
    publisher = ScriptedPublisher()
    receiver.attach(publisher)  # type: ignore[arg-type]
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    http = await aiohttp_client(app)
    receiver.record_sent("r-by-id", "m-1")
    bodies = [
        report("m-1", "DELIVERED"),  # matched by message_id
        report("m-2", "QUEUED_ON_CHANNEL", correlation_id=correlation_for("r-2", "mine")),
        report("m-3", "FAILED", correlation_id=correlation_for("r" * 200, None)),  # a digest
    ]
    failed = orjson.loads(bodies[2])
    failed["message_delivery_report"]["reason"] = {"code": "RECIPIENT_NOT_REACHABLE"}
    bodies[2] = orjson.dumps(failed)
    for body in bodies:
        resp = await http.post("/hook", data=body, headers=signed(body))
        assert resp.status == 200, await resp.text()
    docs = [orjson.loads(v or b"") for v, _k, _h in publisher.on(settings.status_topic)]
    assert [d["matched_by"] for d in docs] == ["message_id", "correlation_id", "none"]
    assert docs[2]["request_id"] is None
    assert docs[2]["reason"] == {"code": "RECIPIENT_NOT_REACHABLE"}
    for doc in docs:
        assert STATUS_RECORD.is_valid(doc), list(STATUS_RECORD.iter_errors(doc))
    assert not STATUS_RECORD.is_valid({k: v for k, v in docs[0].items() if k != "matched_by"})
    assert not STATUS_RECORD.is_valid({**docs[0], "status": "LOST"})
