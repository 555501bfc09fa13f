"""``gateway.client``: envelopes the decoder and the schema accept, published with the right key."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from gateway import client
from gateway.envelope import Priority, decode
from gateway.settings import Settings

SEND = Draft202012Validator(client.schema("send-request"))
SMS = client.channel_recipient("+46700000001")


def decoded(value: bytes) -> Any:
    assert SEND.is_valid(orjson.loads(value)), list(SEND.iter_errors(orjson.loads(value)))
    return decode(value, max_bytes=Settings().max_message_bytes)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"recipient": client.contact_recipient("01HCONTACT")},
        {"recipient": client.channel_recipient("psid-1", "MESSENGER")},
        {"message": {"media_message": {"url": "https://example.com/a.png"}}},
        {"message": {"template_message": {"omni_template": {"template_id": "t", "version": "1"}}}},
        {"priority": "high"},
        {"priority": "low"},
        {"expire_at": datetime(2030, 1, 1, tzinfo=UTC)},
        {"expire_at": datetime(2030, 1, 1, 2, tzinfo=UTC) + timedelta(hours=1)},
        {"expire_in_s": 300},
        {"campaign": "black-friday", "correlation_id": "order-7"},
        {"project_id": "p-2", "region": "eu"},
        {"request_id": "r" * 256},
        {"payload_extra": {"channel_priority_order": ["SMS"], "message_metadata": "m"}},
    ],
)
def test_built_envelopes_pass_the_decoder_and_the_schema(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {
        "app_id": "app-1",
        "recipient": SMS,
        "message": client.text_message("hi"),
        **kwargs,
    }
    req = decoded(client.envelope(**args))
    assert req.app_id == "app-1"
    assert req.priority is Priority[args.get("priority", "normal").upper()]
    assert req.campaign == args.get("campaign")
    assert (req.project_id, req.region) == (args.get("project_id"), args.get("region"))
    if "expire_at" in args:
        assert req.expire_at == args["expire_at"].timestamp()
    for key, value in args.get("payload_extra", {}).items():
        assert req.payload[key] == value
    if "correlation_id" in args:
        assert req.payload["correlation_id"] == args["correlation_id"]


def test_request_ids_are_new_uuids_and_expire_in_counts_from_now() -> None:
    first = decoded(client.envelope(app_id="a", recipient=SMS, message=client.text_message("x")))
    again = decoded(client.envelope(app_id="a", recipient=SMS, message=client.text_message("x")))
    assert uuid.UUID(first.request_id).version == 4
    assert first.request_id != again.request_id
    before = time.time()
    req = decoded(
        client.envelope(app_id="a", recipient=SMS, message={"text_message": {}}, expire_in_s=60)
    )
    assert req.expire_at is not None
    assert before + 59 <= req.expire_at <= time.time() + 60


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"campaign": ""}, "bad_field: campaign"),
        ({"app_id": ""}, "bad_field: payload.app_id"),
        ({"message": {"unknown": {}}}, "no known message type"),
        ({"expire_at": datetime(2030, 1, 1)}, "time zone"),
        ({"expire_at": datetime(2030, 1, 1, tzinfo=UTC), "expire_in_s": 5}, "not both"),
        ({"payload_extra": {"app_id": "other"}}, "must not set app_id"),
        ({"correlation_id": "c" * 129}, "correlation_id longer than 128"),
        ({"max_bytes": 100}, "too_large"),
        ({"priority": "urgent"}, "priority must be one of"),
    ],
)
def test_what_the_gateway_would_reject_is_refused_with_why(
    kwargs: dict[str, Any], says: str
) -> None:
    args: dict[str, Any] = {"app_id": "a", "recipient": SMS, "message": client.text_message("x")}
    with pytest.raises(ValueError, match=says):
        client.envelope(**(args | kwargs))


def test_recipient_helpers_refuse_empty_ids() -> None:
    with pytest.raises(ValueError, match="identity"):
        client.channel_recipient("")
    with pytest.raises(ValueError, match="contact_id"):
        client.contact_recipient("")


class Recorder:
    """A producer that keeps what it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []

    async def send_and_wait(
        self, topic: str, value: bytes | None = None, key: bytes | None = None
    ) -> Any:
        self.sent.append((topic, value, key))
        return len(self.sent)


async def test_publish_keys_by_app_and_routes_high_priority() -> None:
    producer = Recorder()
    normal = client.envelope(app_id="a1", recipient=SMS, message=client.text_message("x"))
    high = client.envelope(
        app_id="a2", recipient=SMS, message=client.text_message("x"), priority="high"
    )
    assert await client.publish(producer, normal) == 1
    await client.publish(producer, high)
    await client.publish(producer, high, high_topic=None)
    await client.publish(producer, high, topic="t", high_topic="t-high")
    assert producer.sent == [
        (client.REQUESTS_TOPIC, normal, b"a1"),
        (client.REQUESTS_HIGH_TOPIC, high, b"a2"),
        (client.REQUESTS_TOPIC, high, b"a2"),
        ("t-high", high, b"a2"),
    ]
    with pytest.raises(ValueError, match="missing_field"):
        await client.publish(producer, b'{"request_id": "r1"}')
    assert len(producer.sent) == 4  # nothing malformed reaches the topic


def test_the_defaults_are_the_gateways() -> None:
    defaults = Settings()
    assert defaults.requests_topic == client.REQUESTS_TOPIC
    assert defaults.requests_high_topic == client.REQUESTS_HIGH_TOPIC
    assert defaults.max_message_bytes == client.MAX_MESSAGE_BYTES
    with pytest.raises(ValueError, match="one of send-request, result, status"):
        client.schema("nope")
