"""The webhook receiver on a real aiohttp server and a real Publisher on the test broker."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import random
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from sinch.domains.authentication.sinch_events.v1.authentication_validation import (
    calculate_sinch_event_signature,
    compute_signed_data,
)
from sinch.domains.conversation.sinch_events.v1.conversation_sinch_event import (
    ConversationSinchEvent,
)

from gateway.broker import EmbeddedBroker
from gateway.demo import read_records
from gateway.envelope import DIGEST_PREFIX, correlation_for
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.producer import Publisher, ensure_topics
from gateway.settings import Secret, Settings, load
from gateway.simulator import callbacks as sim_callbacks
from gateway.webhooks import NONCE, SIGNATURE, TIMESTAMP, BoundedTtlMap, WebhookReceiver, sign
from tests.conftest import wait_for

SECRET = "s3cret-current"
PREVIOUS = "s3cret-previous"
PATH = "/webhooks/sinch"
# The public test vector of the Sinch SDKs (Node, Java, .NET authorization helper tests),
# kept byte for byte as published.
VECTOR_FILE = Path(__file__).resolve().parent / "data" / "webhook-signature-vector.json"
VECTOR: dict[str, str] = json.loads(VECTOR_FILE.read_text(encoding="utf-8"))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingPublisher:
    """The real Publisher, and a list of what the receiver handed it."""

    def __init__(self, inner: Publisher) -> None:
        self.inner = inner
        self.sent: list[tuple[str, bytes | None, bytes | None, Any]] = []

    async def send(
        self, topic: str, value: bytes | None, *, key: bytes | None = None, headers: Any = None
    ) -> asyncio.Future[Any]:
        self.sent.append((topic, value, key, headers))
        return await self.inner.send(topic, value, key=key, headers=headers)


def settings_for(bootstrap: str, **kw: Any) -> Settings:
    tag = uuid.uuid4().hex[:8]
    values: dict[str, Any] = {
        "kafka_bootstrap": bootstrap,
        "events_topic": f"evt-{tag}",
        "status_topic": f"sta-{tag}",
        "requests_topic": f"req-{tag}",
        "results_topic": f"res-{tag}",
        "dlq_topic": f"dlq-{tag}",
        "topic_partitions": 1,
        "webhook_secret": SECRET,
    }
    values.update(kw)
    return load(env={}, **values)


def signed(
    body: bytes, *, secret: str = SECRET, nonce: str | None = None, timestamp: int | None = None
) -> dict[str, str]:
    nonce = nonce or secrets.token_hex(13)
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return {
        NONCE: nonce,
        TIMESTAMP: ts,
        SIGNATURE: sign(secret, body, nonce, ts),
        "Content-Type": "application/json",
    }


def report(
    message_id: str,
    status: str,
    *,
    app_id: str = "app-1",
    correlation_id: str = "",
    event_time: str = "2024-01-01T00:00:01.000000Z",
) -> bytes:
    return orjson.dumps(
        {
            "app_id": app_id,
            "accepted_time": "2024-01-01T00:00:00.000000Z",
            "event_time": event_time,
            "project_id": "p-1",
            "message_delivery_report": {
                "message_id": message_id,
                "status": status,
                "conversation_id": "c-1",
                "channel_identity": {"channel": "SMS", "identity": "46700000000", "app_id": app_id},
                "contact_id": "k-1",
                "metadata": "",
                "processing_mode": "CONVERSATION",
            },
            "message_metadata": "",
            "correlation_id": correlation_id,
        }
    )


Env = tuple[Any, WebhookReceiver, CountingPublisher, Settings]
MakeEnv = Callable[..., Awaitable[Env]]


@pytest.fixture
async def make_env(broker: EmbeddedBroker, aiohttp_client: Any) -> AsyncIterator[MakeEnv]:
    publishers: list[Publisher] = []

    async def make(
        *,
        clock: Callable[[], float] = time.time,
        registry: CollectorRegistry | None = None,
        **kw: Any,
    ) -> Env:
        settings = settings_for(broker.bootstrap, **kw)
        await ensure_topics(settings)
        publisher = Publisher(settings)
        await publisher.start()
        publishers.append(publisher)
        metrics = Metrics(registry or CollectorRegistry())
        receiver = WebhookReceiver(settings, metrics, clock=clock)
        counting = CountingPublisher(publisher)
        receiver.attach(counting)  # type: ignore[arg-type]
        app = web.Application()
        app.router.add_post(PATH, receiver.handle)
        client = await aiohttp_client(app)
        return client, receiver, counting, settings

    yield make
    for publisher in publishers:
        await publisher.stop()


async def post(client: Any, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    resp = await client.post(PATH, data=body, headers=headers)
    return resp.status, await resp.json()


# -- signatures -------------------------------------------------------------------


def test_sign_reproduces_the_public_vector() -> None:
    v = VECTOR
    assert v["algorithm"] == "HmacSHA256"
    assert v["signed_data"] == "body + '.' + nonce + '.' + timestamp"
    signed_data = f"{v['body']}.{v['nonce']}.{v['timestamp']}".encode()
    digest = hmac.new(v["secret"].encode(), signed_data, hashlib.sha256).digest()
    assert base64.b64encode(digest).decode() == v["signature"]
    assert sign(v["secret"], v["body"].encode(), v["nonce"], v["timestamp"]) == v["signature"]
    headers = {SIGNATURE: v["signature"], NONCE: v["nonce"], TIMESTAMP: v["timestamp"]}
    assert ConversationSinchEvent(v["secret"]).validate_authentication_header(headers, v["body"])


async def test_public_vector_passes_the_gateway_check_and_is_published_unchanged(
    make_env: MakeEnv, broker: EmbeddedBroker
) -> None:
    v = VECTOR
    client, _, pub, settings = await make_env(
        clock=Clock(int(v["timestamp"]) + 10), webhook_secret=v["secret"]
    )
    body = v["body"].encode()
    headers = {SIGNATURE: v["signature"], NONCE: v["nonce"], TIMESTAMP: v["timestamp"]}
    status, answer = await post(client, body, headers)
    assert (status, answer) == (200, {"status": "ok"})
    records = await read_records(broker.bootstrap, settings.events_topic, 1, timeout_s=10)
    assert [r.value for r in records] == [body]
    assert records[0].key is None  # the contact notification has an empty app_id
    assert dict(records[0].headers)["sinch.trigger"] == b"CONTACT_CREATE"
    # the same bytes with one changed character fail
    tampered = body.replace(b"New Test Contact", b"New Test Contacts")
    status, answer = await post(client, tampered, {**headers, NONCE: v["nonce"] + "x"})
    assert status == 401
    assert len(pub.sent) == 1


def test_simulator_signatures_pass_the_sdk_validator() -> None:
    sdk = ConversationSinchEvent(SECRET)
    for i in range(50):
        body = report(f"m-{i}", "DELIVERED", correlation_id=f"r-{i}")
        headers = sim_callbacks.signature_headers(SECRET, body)
        assert sdk.validate_authentication_header(headers, body)
        assert not ConversationSinchEvent("other").validate_authentication_header(headers, body)
        assert sim_callbacks.sign(SECRET, body, "n", "1") == sign(SECRET, body, "n", "1")


async def test_sdk_computed_signatures_pass_the_gateway(make_env: MakeEnv) -> None:
    client, _, pub, _ = await make_env()
    for i, text in enumerate(["plain", "unicode åäö ✓", "emoji 🚀"]):
        body_text = json.dumps(
            {"app_id": "app-1", "message": {"id": f"in-{i}", "text": text}}, ensure_ascii=False
        )
        nonce, ts = f"01HNONCE{i:018d}", str(int(time.time()))
        signature = calculate_sinch_event_signature(
            compute_signed_data(body_text, nonce, ts), SECRET
        )
        headers = {SIGNATURE: signature, NONCE: nonce, TIMESTAMP: ts}
        assert ConversationSinchEvent(SECRET).validate_authentication_header(headers, body_text)
        status, _ = await post(client, body_text.encode(), headers)
        assert status == 200, text
    assert len(pub.sent) == 3


async def test_previous_secret_accepted_during_rotation(make_env: MakeEnv) -> None:
    client, _, pub, _ = await make_env(webhook_secret_previous=PREVIOUS)
    body = report("m-1", "DELIVERED")
    assert (await post(client, body, signed(body, secret=SECRET)))[0] == 200
    assert (await post(client, body, signed(body, secret=PREVIOUS)))[0] == 200
    assert (await post(client, body, signed(body, secret="s3cret-older")))[0] == 401
    assert len(pub.sent) == 2


# -- secrets per app --------------------------------------------------------------

APP_1_A, APP_1_B, APP_2 = "app-1-webhook-a", "app-1-webhook-b", "app-2-webhook"


def event_of(app_id: str, i: int = 0) -> bytes:
    return orjson.dumps({"app_id": app_id, "message": {"id": f"in-{app_id}-{i}"}})


def events_counted(registry: CollectorRegistry, trigger: str, result: str) -> float:
    value = registry.get_sample_value(
        "gateway_webhook_events_total", {"trigger": trigger, "result": result}
    )
    return value or 0.0


async def test_each_app_is_verified_with_its_own_secrets_then_the_global_ones(
    make_env: MakeEnv, broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    registry = CollectorRegistry()
    client, _, pub, settings = await make_env(
        registry=registry,
        webhook_secret_previous=PREVIOUS,
        # app-1 has two webhooks (or one in rotation), app-2 one
        webhook_secrets={"app-1": [APP_1_A, APP_1_B], "app-2": APP_2},
    )
    cases = [
        # (app, secret, expected)
        ("app-1", APP_1_A, 200),
        ("app-1", APP_1_B, 200),  # the second webhook / the secret being rotated in
        ("app-1", APP_2, 401),  # another app's secret
        ("app-1", "app-1-webhook-c", 401),  # a secret nobody configured
        ("app-2", APP_2, 200),
        ("app-2", APP_1_A, 401),
        ("app-2", APP_1_B, 401),
        ("app-3", SECRET, 200),  # no secrets of its own: the global ones
        ("app-3", PREVIOUS, 200),
        ("app-3", APP_1_A, 401),
        ("app-3", APP_2, 401),
        ("app-1", SECRET, 200),  # the global ones remain the fallback for every app
        ("", SECRET, 200),  # a callback without app_id (contact notifications)
        ("", APP_1_A, 401),
    ]
    accepted = []
    for i, (app_id, secret, expected) in enumerate(cases):
        body = event_of(app_id, i)
        status, answer = await post(client, body, signed(body, secret=secret))
        assert status == expected, (app_id, secret)
        if status == 200:
            accepted.append(body)
        else:
            assert answer["error"]["message"] == "bad signature"
    # an app named in the body cannot borrow another app's secret by lying about itself:
    # the signature covers the body, app_id included
    body = event_of("app-2")
    headers = signed(body, secret=APP_2)
    status, _ = await post(client, event_of("app-1"), headers)
    assert status == 401
    events = await read_records(broker.bootstrap, settings.events_topic, len(accepted), 10)
    assert [e.value for e in events] == accepted
    assert len(pub.sent) == len(accepted)
    assert events_counted(registry, "unknown", "unauthorized") == len(cases) - len(accepted) + 1
    for secret in (SECRET, PREVIOUS, APP_1_A, APP_1_B, APP_2):
        assert secret not in caplog.text
        assert secret not in repr(settings)
        assert secret not in str(settings.webhook_secrets)


async def test_per_app_secrets_alone_enable_the_webhook(make_env: MakeEnv) -> None:
    client, _, pub, _ = await make_env(webhook_secret=None, webhook_secrets={"app-1": APP_1_A})
    body = event_of("app-1")
    assert (await post(client, body, signed(body, secret=APP_1_A)))[0] == 200
    # an app without secrets has none to match: 401, not 503 (the webhook is on)
    body = event_of("app-2")
    assert (await post(client, body, signed(body, secret=APP_1_A)))[0] == 401
    assert (await post(client, body, signed(body, secret=SECRET)))[0] == 401
    # a body that is not JSON names no app: only global secrets, and there are none
    assert (await post(client, b"[1]", signed(b"[1]", secret=APP_1_A)))[0] == 401
    assert len(pub.sent) == 1


def test_webhook_secrets_from_toml_and_from_a_kubernetes_secret_file(tmp_path: Path) -> None:
    toml = tmp_path / "gateway.toml"
    toml.write_text(
        f'[webhook_secrets]\n"app-1" = ["{APP_1_A}", "{APP_1_B}"]\n"app-2" = "{APP_2}"\n'
    )
    settings = load(toml, env={})
    assert {a: [s.reveal() for s in v] for a, v in settings.webhook_secrets.items()} == {
        "app-1": [APP_1_A, APP_1_B],
        "app-2": [APP_2],
    }
    # a mounted secret: one app_id=secret a line; a secret may hold "=" and ","
    mounted = tmp_path / "webhook-secrets"
    mounted.write_text(
        f"# rotated 2026-12-01\napp-1={APP_1_A}\n\n app-1 = {APP_1_B} \napp-2=a=b,c\n"
    )
    env = {"GATEWAY_WEBHOOK_SECRETS_FILE": str(mounted)}
    from_file = load(toml, env=env)  # the variable overrides the file's table
    assert {a: [s.reveal() for s in v] for a, v in from_file.webhook_secrets.items()} == {
        "app-1": [APP_1_A, APP_1_B],
        "app-2": ["a=b,c"],
    }
    assert load(env={"GATEWAY_WEBHOOK_SECRETS": f"app-9={APP_2}"}).webhook_secrets == {
        "app-9": (Secret(APP_2),)
    }


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("app-1=\n", "webhook_secrets.app-1"),
        (f"{APP_1_A}\n", "<line 1>"),
        (f"app-1={APP_1_A}\n={APP_2}\n", "<line 2>"),
    ],
)
def test_a_bad_secrets_file_names_the_key_never_a_secret(
    tmp_path: Path, text: str, named: str
) -> None:
    mounted = tmp_path / "webhook-secrets"
    mounted.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(env={"GATEWAY_WEBHOOK_SECRETS_FILE": str(mounted)})
    message = str(err.value)
    assert "GATEWAY_WEBHOOK_SECRETS" in message
    assert named in message
    assert APP_1_A not in message
    assert APP_2 not in message


def test_a_bad_secrets_table_names_the_app_never_a_secret(tmp_path: Path) -> None:
    toml = tmp_path / "gateway.toml"
    toml.write_text(f'[webhook_secrets]\n"app-1" = ["{APP_1_A}", 7]\n')
    with pytest.raises(ConfigError, match=r"webhook_secrets\.app-1") as err:
        load(toml, env={})
    assert APP_1_A not in str(err.value)
    toml.write_text(f'webhook_secrets = "{APP_1_A}"\n')
    with pytest.raises(ConfigError, match="webhook_secrets") as err:
        load(toml, env={})
    assert APP_1_A not in str(err.value)


# -- rejections -------------------------------------------------------------------


async def test_each_rejection_has_its_status_a_json_error_and_publishes_nothing(
    make_env: MakeEnv, broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # a secret in a debug line would be a leak too
    now = 1_700_000_000
    client, _, pub, settings = await make_env(
        clock=Clock(now), webhook_max_age_s=300.0, webhook_max_body_bytes=4096
    )
    body = report("m-1", "DELIVERED")
    good = signed(body, timestamp=now)
    cases: list[tuple[str, bytes, dict[str, str], int]] = [
        ("forged", body, signed(body, secret="wrong", timestamp=now), 401),
        ("signature of another body", report("m-2", "DELIVERED"), good, 401),
        ("bad base64", body, {**good, SIGNATURE: "not base64 at all"}, 401),
        ("stale", body, signed(body, timestamp=now - 301), 401),
        ("future", body, signed(body, timestamp=now + 301), 401),
        ("timestamp not a number", body, {**good, TIMESTAMP: "17e8"}, 401),
        ("timestamp with underscore", body, signed(body, timestamp=None) | {TIMESTAMP: "1_7"}, 401),
        (
            "too large",
            b"{" + b" " * 4096 + b"}",
            signed(b"{" + b" " * 4096 + b"}", timestamp=now),
            413,
        ),
        ("not JSON", b"hello", signed(b"hello", timestamp=now), 400),
        ("JSON but not an object", b"[1,2]", signed(b"[1,2]", timestamp=now), 400),
        ("empty body", b"", signed(b"", timestamp=now), 400),
    ]
    for header in (SIGNATURE, NONCE, TIMESTAMP):
        cases.append(
            (f"missing {header}", body, {k: v for k, v in good.items() if k != header}, 401)
        )
        cases.append((f"empty {header}", body, {**good, header: ""}, 401))
    for name, data, headers, expected in cases:
        status, answer = await post(client, data, headers)
        assert status == expected, name
        assert answer["error"]["code"] == expected, name
        assert isinstance(answer["error"]["message"], str), name
        assert SECRET not in json.dumps(answer)
    assert pub.sent == []

    # the sentinel: the first and only record of the (one-partition) events topic
    assert (await post(client, body, good))[0] == 200
    status, answer = await post(client, body, good)
    assert (status, answer["error"]["message"]) == (401, "nonce replayed")
    records = await read_records(broker.bootstrap, settings.events_topic, 1, timeout_s=10)
    assert [r.value for r in records] == [body]
    assert len(pub.sent) == 1
    assert SECRET not in caplog.text


async def in_chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    """The body as a chunked upload (no Content-Length)."""
    for i in range(0, len(body), size):
        yield body[i : i + size]


async def test_body_over_the_limit_without_content_length_is_413(make_env: MakeEnv) -> None:
    client, _, pub, _ = await make_env(webhook_max_body_bytes=10_000)
    body = b'{"app_id":"a","pad":"' + b"x" * 20_000 + b'"}'

    resp = await client.post(PATH, data=in_chunks(body, 1000), headers=signed(body))
    assert resp.status == 413
    assert pub.sent == []


async def test_body_of_many_chunks_under_the_limit_is_read_whole(make_env: MakeEnv) -> None:
    client, _, pub, _ = await make_env(webhook_max_body_bytes=1_000_000)
    body = b'{"app_id":"a","message":{"id":"m","pad":"' + b"x" * 900_000 + b'"}}'

    resp = await client.post(PATH, data=in_chunks(body, 65_536), headers=signed(body))
    assert resp.status == 200
    resp = await client.post(PATH, data=body, headers=signed(body))
    assert resp.status == 200
    assert [s[1] for s in pub.sent] == [body, body]


async def test_replay_window_follows_the_clock(make_env: MakeEnv) -> None:
    clock = Clock(1_700_000_000)
    client, _, pub, _ = await make_env(clock=clock, webhook_max_age_s=60.0)
    body = report("m-1", "READ")
    headers = signed(body, timestamp=int(clock.now))
    assert (await post(client, body, headers))[0] == 200
    clock.now += 59
    status, answer = await post(client, body, headers)
    assert (status, answer["error"]["message"]) == (401, "nonce replayed")
    clock.now += 2
    status, answer = await post(client, body, headers)
    assert (status, answer["error"]["message"]) == (401, "timestamp outside the accepted window")
    # a fresh timestamp with the same nonce is still a replay while the nonce is remembered
    again = signed(body, nonce=headers[NONCE], timestamp=int(clock.now))
    assert (await post(client, body, again))[1]["error"]["message"] == "nonce replayed"
    assert len(pub.sent) == 1


async def test_header_bytes_that_are_not_utf8_are_a_401_not_a_500(make_env: MakeEnv) -> None:
    client, _, pub, _ = await make_env()
    body = b'{"app_id":"a"}'
    ts = str(int(time.time()))
    server = client.server
    for nonce_bytes in (b"\xff\xfe", b"caf\xe9", b"\xc3\xa9t\xc3\xa9"):
        nonce = nonce_bytes.decode("utf-8", "surrogateescape")
        signature = sign(SECRET, b"", "", "")  # wrong on purpose for the first two
        if nonce_bytes == b"\xc3\xa9t\xc3\xa9":  # valid UTF-8: signed over its bytes
            signature = sign(SECRET, body, nonce, ts)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"POST "
            + PATH.encode()
            + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + b"Content-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n".encode()
            + NONCE.encode()
            + b": "
            + nonce_bytes
            + b"\r\n"
            + TIMESTAMP.encode()
            + b": "
            + ts.encode()
            + b"\r\n"
            + SIGNATURE.encode()
            + b": "
            + signature.encode()
            + b"\r\n\r\n"
            + body
        )
        await writer.drain()
        status_line = await reader.readline()
        writer.close()
        await writer.wait_closed()
        expected = b"200" if nonce_bytes == b"\xc3\xa9t\xc3\xa9" else b"401"
        assert status_line.split()[1] == expected, nonce_bytes
    assert len(pub.sent) == 1


# -- Kafka ------------------------------------------------------------------------


async def test_not_attached_answers_503(broker: EmbeddedBroker, aiohttp_client: Any) -> None:
    settings = settings_for(broker.bootstrap)
    receiver = WebhookReceiver(settings, Metrics(CollectorRegistry()))
    app = web.Application()
    app.router.add_post(PATH, receiver.handle)
    client = await aiohttp_client(app)
    body = report("m-1", "DELIVERED")
    assert (await post(client, body, signed(body)))[0] == 503


async def test_no_secret_configured_answers_503(
    broker: EmbeddedBroker, aiohttp_client: Any
) -> None:
    settings = settings_for(broker.bootstrap, webhook_secret=None)
    receiver = WebhookReceiver(settings, Metrics(CollectorRegistry()))
    app = web.Application()
    app.router.add_post(PATH, receiver.handle)
    client = await aiohttp_client(app)
    body = report("m-1", "DELIVERED")
    assert (await post(client, body, signed(body)))[0] == 503


async def test_kafka_down_answers_503_and_the_retry_is_accepted(aiohttp_client: Any) -> None:
    own = EmbeddedBroker()
    own.start()
    settings = settings_for(own.bootstrap)
    publisher = Publisher(settings)
    try:
        await ensure_topics(settings)
        await publisher.start()
        await publisher.send_and_wait(settings.events_topic, b"{}")  # metadata known
        receiver = WebhookReceiver(settings, Metrics(CollectorRegistry()), publish_timeout_s=1.0)
        receiver.attach(publisher)
        app = web.Application()
        app.router.add_post(PATH, receiver.handle)
        client = await aiohttp_client(app)
        body = report("m-1", "DELIVERED", correlation_id="r-1")
        headers = signed(body)

        own.stop()  # Kafka goes away
        started = time.monotonic()
        status, answer = await post(client, body, headers)
        assert (status, answer["error"]["code"]) == (503, 503)
        assert time.monotonic() - started < 5

        # Kafka comes back; Sinch retries with the same headers: not taken for a replay
        own = EmbeddedBroker(port=own.port)
        own.start()
        await ensure_topics(settings)

        async def accepted() -> bool:
            return (await post(client, body, headers))[0] == 200

        await wait_for(accepted, 20, interval=0.2, what="the retried callback")
        status, answer = await post(client, body, headers)
        assert (status, answer["error"]["message"]) == (401, "nonce replayed")
        # at least once: the record of the first try may have landed after its 503
        records = await read_records(own.bootstrap, settings.events_topic, 1, timeout_s=10)
        assert records
        assert {r.value for r in records} == {body}
    finally:
        await asyncio.wait_for(publisher.stop(), 60)
        own.stop()


async def test_events_keyed_by_app_with_headers_and_reports_on_the_status_topic(
    make_env: MakeEnv, broker: EmbeddedBroker
) -> None:
    client, receiver, pub, settings = await make_env()
    receiver.record_sent("req-1", "msg-1")
    bodies = [
        # out of order: DELIVERED before QUEUED_ON_CHANNEL
        report("msg-1", "DELIVERED", correlation_id="req-1", event_time="2024-01-01T00:00:02Z"),
        report(
            "msg-1", "QUEUED_ON_CHANNEL", correlation_id="req-1", event_time="2024-01-01T00:00:01Z"
        ),
        # not in the map (another replica sent it): the correlation_id is the request_id
        report("msg-2", "FAILED", correlation_id="req-2"),
        # neither in the map nor correlated: an event, no status record
        report("msg-3", "DELIVERED"),
        # not a delivery status the status topic carries
        report("msg-1", "UNKNOWN_STATUS", correlation_id="req-1"),
        orjson.dumps({"app_id": "app-2", "message": {"id": "in-1", "direction": "TO_APP"}}),
    ]
    for body in bodies:
        assert (await post(client, body, signed(body)))[0] == 200
    events = await read_records(broker.bootstrap, settings.events_topic, 6, timeout_s=10)
    assert [e.value for e in events] == bodies
    assert [e.key for e in events] == [b"app-1"] * 5 + [b"app-2"]
    headers = [dict(e.headers) for e in events]
    assert headers[0] == {
        "sinch.trigger": b"MESSAGE_DELIVERY",
        "sinch.message_id": b"msg-1",
        "sinch.correlation_id": b"req-1",
    }
    assert headers[3] == {"sinch.trigger": b"MESSAGE_DELIVERY", "sinch.message_id": b"msg-3"}
    assert headers[5] == {"sinch.trigger": b"MESSAGE_INBOUND", "sinch.message_id": b"in-1"}

    statuses = await read_records(broker.bootstrap, settings.status_topic, 3, timeout_s=10)
    docs = [orjson.loads(s.value) for s in statuses]
    assert [s.key for s in statuses] == [b"req-1", b"req-1", b"req-2"]
    assert [(d["request_id"], d["message_id"], d["status"], d["matched_by"]) for d in docs] == [
        ("req-1", "msg-1", "DELIVERED", "message_id"),
        ("req-1", "msg-1", "QUEUED_ON_CHANNEL", "message_id"),
        ("req-2", "msg-2", "FAILED", "correlation_id"),
    ]
    assert docs[0]["event_time"] > docs[1]["event_time"]
    assert docs[0]["channel"] == "SMS"
    assert [t for t, *_ in pub.sent].count(settings.status_topic) == 3


async def test_a_digest_correlation_id_is_never_taken_for_a_request_id(
    make_env: MakeEnv, broker: EmbeddedBroker
) -> None:
    registry = CollectorRegistry()
    client, receiver, _, settings = await make_env(registry=registry)
    long_id = "r" * 200
    digest = correlation_for(long_id, None)
    assert digest.startswith(DIGEST_PREFIX)
    receiver.record_sent(long_id, "msg-known")
    bodies = [
        # the map knows the message: the long request_id itself
        report("msg-known", "DELIVERED", correlation_id=digest),
        # the map misses (another replica sent it): no request_id, keyed by message_id
        report("msg-other", "DELIVERED", correlation_id=digest),
        # a digest and no message_id: nothing to key it by
        report("", "FAILED", correlation_id=digest),
        # a producer's own correlation id that merely starts like one is still used
        report("msg-own", "READ", correlation_id="gw:not-hex"),
    ]
    for body in bodies:
        assert (await post(client, body, signed(body)))[0] == 200
    statuses = await read_records(broker.bootstrap, settings.status_topic, 3, timeout_s=10)
    docs = [orjson.loads(s.value) for s in statuses]
    assert [s.key for s in statuses] == [long_id.encode(), b"msg-other", b"gw:not-hex"]
    assert [(d["request_id"], d["message_id"], d["matched_by"]) for d in docs] == [
        (long_id, "msg-known", "message_id"),
        (None, "msg-other", "none"),
        ("gw:not-hex", "msg-own", "correlation_id"),
    ]
    assert events_counted(registry, "MESSAGE_DELIVERY", "unmatched") == 1
    assert events_counted(registry, "MESSAGE_DELIVERY", "published") == 3
    events = await read_records(broker.bootstrap, settings.events_topic, 4, timeout_s=10)
    assert [e.value for e in events] == bodies


async def test_a_report_to_the_replica_that_did_not_send_is_keyed_by_its_request_id(
    make_env: MakeEnv, broker: EmbeddedBroker
) -> None:
    # this receiver's map knows nothing of the sends: another replica made them
    client, _, _, settings = await make_env()
    bodies = [
        report("msg-1", "DELIVERED", correlation_id=correlation_for("req-1", None)),
        report("msg-2", "DELIVERED", correlation_id=correlation_for("req-2", "order-77")),
        report("msg-3", "READ", correlation_id=correlation_for("req-3", "o" * 128)),
    ]
    for body in bodies:
        assert (await post(client, body, signed(body)))[0] == 200
    statuses = await read_records(broker.bootstrap, settings.status_topic, 3, timeout_s=10)
    assert [s.key for s in statuses] == [b"req-1", b"req-2", b"req-3"]
    docs = [orjson.loads(s.value) for s in statuses]
    assert {d["matched_by"] for d in docs} == {"correlation_id"}


# -- random input -----------------------------------------------------------------


def _random_text(rng: random.Random, n: int) -> str:
    alphabet = "abcXYZ019 .:_-+/=\"'{}[],\\\u00e9\u4e2d\U0001f680\x00\x7f"
    return "".join(rng.choice(alphabet) for _ in range(n))


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False, 0, -1, 2**63 - 1, 1.5e300, -0.0])
    if kind == 2:
        return _random_text(rng, rng.randrange(12))
    if kind == 3:
        return rng.choice(["QUEUED_ON_CHANNEL", "DELIVERED", "READ", "FAILED", "x"])
    if kind == 4:
        return rng.randrange(-(10**30), 10**30)
    if kind == 5:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = [
        "app_id",
        "correlation_id",
        "message_delivery_report",
        "message",
        "status",
        "message_id",
        "id",
        "channel_identity",
        "reason",
        "event_time",
        "event",
        _random_text(rng, 5),
    ]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(6))}


def _random_body(rng: random.Random) -> bytes:
    """Random bytes, text, JSON and delivery reports with random fields (stdlib json:
    integers beyond 64 bits included)."""
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(64))
    if kind == 1:
        return _random_text(rng, rng.randrange(64)).encode()
    if kind == 2:  # a delivery report with random fields in it
        doc = orjson.loads(report("m", "DELIVERED", correlation_id="r"))
        inner = doc["message_delivery_report"]
        for key in rng.sample(sorted(inner), 3):
            inner[key] = _random_json(rng)
        for key in rng.sample(sorted(doc), 2):
            doc[key] = _random_json(rng)
        return json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode()
    if kind == 3:
        return json.dumps({"app_id": "a", "x": _random_json(rng)}).encode()
    if kind == 4:
        return json.dumps(_random_json(rng), ensure_ascii=False).encode()
    return b'{"pad":"' + b"x" * rng.randrange(1800, 2400) + b'"}'


async def _raw_post(port: int, head: list[tuple[bytes, bytes]], body: bytes) -> int:
    """POST with header bytes no client library would send; the answer's status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [
        b"POST " + PATH.encode() + b" HTTP/1.1",
        b"Host: 127.0.0.1",
        b"Connection: close",
        b"Content-Length: " + str(len(body)).encode(),
    ]
    lines += [name + b": " + value for name, value in head]
    writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    return int(status_line.split()[1])


async def test_2000_random_bodies_and_headers_never_5xx(make_env: MakeEnv) -> None:
    rng = random.Random(20240607)
    client, receiver, pub, settings = await make_env(webhook_max_body_bytes=2048)
    receiver.record_sent("r", "m")
    now = int(time.time())
    statuses: dict[int, int] = {}
    accepted: list[bytes] = []

    async def one(i: int) -> None:
        body = _random_body(rng)
        mode = rng.random()
        if mode < 0.1:  # raw random header bytes (no CR, LF or NUL: those break the request)
            junk = bytes(b for b in rng.randbytes(40) if b not in b"\r\n\x00")
            head = [
                (NONCE.encode(), junk[:20]),
                (TIMESTAMP.encode(), str(now).encode()),
                (SIGNATURE.encode(), junk[20:]),
            ]
            status = await _raw_post(client.server.port, head, body)
            statuses[status] = statuses.get(status, 0) + 1
            assert status in (400, 401, 413), (body, head)
            return
        if mode < 0.55:  # properly signed: the body decides
            nonce, ts, secret = f"n-{i}", str(now), SECRET
        else:
            nonce = rng.choice([f"n-{i}", _random_text(rng, rng.randrange(1, 30)), "", "n-0"])
            ts = rng.choice(
                [
                    str(now),
                    str(now - 10_000),
                    _random_text(rng, 5),
                    "",
                    str(now + 1),
                    "-1",
                    "99999999999999999999",
                    str(now) + " ",
                ]
            )
            secret = rng.choice([SECRET, SECRET, "wrong"])
        # aiohttp refuses to send some characters in header values; keep the rest
        nonce_ok = nonce.isprintable() and "\x7f" not in nonce
        headers = {
            name: value
            for name, value in ((NONCE, nonce), (TIMESTAMP, ts))
            if mode < 0.55 or (rng.random() < 0.9 and value.isprintable() and "\x7f" not in value)
        }
        sig = sign(secret, body, nonce, ts) if nonce_ok else "x"
        noise = base64.b64encode(rng.randbytes(32)).decode()
        headers[SIGNATURE] = (
            sig if mode < 0.55 else rng.choice([sig, sig, sig, noise, sig[:-2], "", "%%%"])
        )
        if rng.random() < 0.2:
            headers["Content-Type"] = rng.choice(["text/plain", "application/json; charset=latin1"])
        resp = await client.post(PATH, data=body, headers=headers)
        statuses[resp.status] = statuses.get(resp.status, 0) + 1
        assert resp.status in (200, 400, 401, 413), (body, headers, await resp.text())
        answer = await resp.json()
        if resp.status != 200:
            assert answer["error"]["code"] == resp.status
            return
        assert answer == {"status": "ok"}
        assert headers[SIGNATURE] == sig
        assert secret == SECRET
        assert isinstance(json.loads(body), dict)
        accepted.append(body)

    for start in range(0, 2000, 50):
        await asyncio.gather(*(one(i) for i in range(start, start + 50)))
    assert sum(statuses.values()) == 2000
    # the mix reached every answer, and exactly the accepted callbacks were published
    assert {200, 400, 401, 413} <= set(statuses), statuses
    assert statuses[200] > 300, statuses
    events = [value for topic, value, *_ in pub.sent if topic == settings.events_topic]
    assert sorted(events) == sorted(accepted)


# -- the bounded map --------------------------------------------------------------


def test_bounded_ttl_map_expires_caps_and_purges_from_the_front() -> None:
    clock = Clock(0.0)
    m = BoundedTtlMap(3, 10.0, clock)
    m.put("a", "1")
    clock.now = 5
    m.put("b", "2")
    assert (m.get("a"), m.get("b"), len(m)) == ("1", "2", 2)
    clock.now = 10.5  # "a" expired
    assert m.get("a") is None
    m.put("c", "3")
    m.put("d", "4")
    m.put("e", "5")  # over the cap: "b" (the oldest) goes
    assert m.get("b") is None
    assert [m.get(k) for k in "cde"] == ["3", "4", "5"]
    clock.now = 100  # everything expired: the next put leaves only itself
    m.put("f", "6")
    assert len(m) == 1
    m.discard("f")
    m.discard("missing")
    assert len(m) == 0
