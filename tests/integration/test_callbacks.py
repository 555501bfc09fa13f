"""The receive side on a real broker: the simulator's signed callbacks through the webhook."""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import aiohttp
import orjson

from gateway.broker import free_port
from gateway.webhooks import NONCE, SIGNATURE, TIMESTAMP, sign
from tests.integration.harness import publish, read_records, requests_for, running, settings_for

SECRET = "s3cret-webhook"
FINAL = {"DELIVERED", "FAILED"}


def hook_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/webhooks/sinch"


async def test_200_sends_come_back_as_delivery_reports_on_events_and_status(
    broker, simulator_factory, topics
):
    port = free_port()
    sim = await simulator_factory(
        strict=True,
        app_rate=50,
        callback_url=hook_url(port),
        callback_secret=SECRET,
        callback_failed_fraction=0.1,
        callback_delay_s=0.05,
        seed=7,
    )
    settings = settings_for(
        broker.bootstrap, sim.port, topics, app_rate=50, webhook_secret=SECRET, webhook_port=port
    )
    docs = requests_for([f"app-{i}" for i in range(4)], 200)
    async with running(settings) as gateway:
        assert gateway.webhook_port == port
        await publish(broker.bootstrap, settings.requests_topic, docs)
        results = await read_records(broker.bootstrap, settings.results_topic, 200, timeout_s=30)
        events = await read_records(broker.bootstrap, settings.events_topic, 400, timeout_s=20)
        statuses = await read_records(broker.bootstrap, settings.status_topic, 600, timeout_s=20)
        # the webhook port serves the webhook only: /metrics stays on the admin port
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 404
            async with http.get(f"http://127.0.0.1:{gateway.http_port}/metrics") as resp:
                metrics = await resp.text()
    stats = await sim.stats()
    assert stats["callbacks"]["ok"] == 400
    assert stats["callbacks"]["retry"] == 0
    assert 'gateway_webhook_events_total{result="published",trigger="MESSAGE_DELIVERY"} 400.0' in (
        metrics
    )

    # results: 200 sent, one message_id each
    result_docs = [orjson.loads(r.value) for r in results]
    assert len(result_docs) == 200
    assert {d["status"] for d in result_docs} == {"sent"}
    request_of = {d["message_id"]: d["request_id"] for d in result_docs}
    assert len(request_of) == 200

    # events: QUEUED_ON_CHANNEL and one final report per message, joinable by message_id
    assert len(events) == 400
    per_message: dict[str, list[str]] = defaultdict(list)
    for event in events:
        headers = dict(event.headers)
        body = orjson.loads(event.value)
        report = body["message_delivery_report"]
        assert headers["sinch.trigger"] == b"MESSAGE_DELIVERY"
        assert headers["sinch.message_id"].decode() == report["message_id"]
        assert event.key == body["app_id"].encode()
        # the gateway filled the empty correlation_id with the request_id
        assert body["correlation_id"] == request_of[report["message_id"]]
        assert headers["sinch.correlation_id"] == body["correlation_id"].encode()
        per_message[report["message_id"]].append(report["status"])
    assert set(per_message) == set(request_of)
    for states in per_message.values():
        assert len(states) == 2
        assert "QUEUED_ON_CHANNEL" in states
        assert len(FINAL.intersection(states)) == 1
    finals = Counter(s for states in per_message.values() for s in states if s in FINAL)
    assert 0 < finals["FAILED"] < 60, finals  # 10 % of 200 asked for

    # status: "sent" from the send path, then the reports, all keyed by request_id
    assert len(statuses) == 600
    per_request: dict[str, list[str]] = defaultdict(list)
    for record in statuses:
        doc = orjson.loads(record.value)
        assert record.key == doc["request_id"].encode()
        assert request_of[doc["message_id"]] == doc["request_id"]
        per_request[doc["request_id"]].append(doc["status"])
    assert set(per_request) == set(request_of.values())
    for states in per_request.values():
        assert "sent" in states
        assert len(states) == 3
        assert "QUEUED_ON_CHANNEL" in states
        assert len(FINAL.intersection(states)) == 1


async def test_inbound_message_and_forged_callback_on_the_admin_port(
    broker, simulator_factory, topics
):
    port = free_port()
    sim = await simulator_factory(
        callback_url=hook_url(port), callback_secret=SECRET, callback_retries=0
    )
    settings = settings_for(
        broker.bootstrap, sim.port, topics, webhook_secret=SECRET, http_port=port
    )
    async with running(settings) as gateway:
        assert gateway.http_port == port
        assert gateway.webhook_port is None
        answer = await sim.post("/_sim/inbound", {"app_id": "app-in", "text": "hi there"})
        events = await read_records(broker.bootstrap, settings.events_topic, 1, timeout_s=15)

        # a callback signed with another secret is refused and not published
        forged = orjson.dumps({"app_id": "app-in", "message": {"id": "forged"}})
        genuine = orjson.dumps({"app_id": "app-in", "message": {"id": "genuine"}})
        ts = str(int(time.time()))
        async with aiohttp.ClientSession() as http:
            headers = {NONCE: "n-1", TIMESTAMP: ts, SIGNATURE: sign("other", forged, "n-1", ts)}
            async with http.post(hook_url(port), data=forged, headers=headers) as resp:
                assert resp.status == 401
                assert (await resp.json())["error"]["code"] == 401
            headers = {NONCE: "n-2", TIMESTAMP: ts, SIGNATURE: sign(SECRET, genuine, "n-2", ts)}
            async with http.post(hook_url(port), data=genuine, headers=headers) as resp:
                assert resp.status == 200
        # each 200 came after Kafka's ack, a forged record would have too: all are readable now
        everything = await read_records(broker.bootstrap, settings.events_topic, 3, timeout_s=3)

    assert len(events) == 1
    doc = orjson.loads(events[0].value)
    assert doc["message"]["id"] == answer["message_id"]
    assert doc["message"]["contact_message"]["text_message"]["text"] == "hi there"
    assert events[0].key == b"app-in"
    assert dict(events[0].headers) == {
        "sinch.trigger": b"MESSAGE_INBOUND",
        "sinch.message_id": answer["message_id"].encode(),
    }
    ids = sorted(orjson.loads(r.value)["message"]["id"] for r in everything)
    assert ids == sorted([answer["message_id"], "genuine"])
    status_records = await read_records(broker.bootstrap, settings.status_topic, 1, timeout_s=1)
    assert status_records == []  # inbound messages are not delivery progress
