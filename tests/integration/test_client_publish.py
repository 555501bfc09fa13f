"""``gateway.client`` on the real broker: what it publishes, the gateway sends."""

from __future__ import annotations

import orjson
from aiokafka import AIOKafkaProducer

from gateway import client
from tests.integration.harness import read_records, running, settings_for


async def test_envelopes_published_by_the_client_are_sent(broker, simulator_factory, topics):
    sim = await simulator_factory()
    settings = settings_for(broker.bootstrap, sim.port, topics)
    sms = client.channel_recipient("+46700000001")
    normal = client.envelope(
        app_id="app-c1", recipient=sms, message=client.text_message("hi"), campaign="spring"
    )
    high = client.envelope(
        app_id="app-c2",
        recipient=client.contact_recipient("contact-1"),
        message=client.text_message("urgent"),
        priority="high",
        expire_in_s=120,
    )
    async with running(settings):
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        await producer.start()
        try:
            for value in (normal, high):
                await client.publish(
                    producer,
                    value,
                    topic=settings.requests_topic,
                    high_topic=settings.requests_high_topic,
                )
        finally:
            await producer.stop()
        results = await read_records(broker.bootstrap, settings.results_topic, 2, timeout_s=30)
    by_id = {orjson.loads(r.value)["request_id"]: orjson.loads(r.value) for r in results}
    ids = {orjson.loads(v)["request_id"]: v for v in (normal, high)}
    assert set(by_id) == set(ids)
    assert {r["status"] for r in by_id.values()} == {"sent"}
    assert by_id[orjson.loads(normal)["request_id"]]["campaign"] == "spring"
    accepted = await sim.accepted()
    assert sorted(a["correlation_id"] for a in accepted) == sorted(ids)
    for topic, value in ((settings.requests_topic, normal), (settings.requests_high_topic, high)):
        [record] = await read_records(broker.bootstrap, topic, 1, timeout_s=10)
        assert (record.key, record.value) == (
            orjson.loads(value)["payload"]["app_id"].encode(),
            value,
        )
