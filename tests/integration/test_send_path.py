"""The whole path of one message on a real broker and the simulator."""

from __future__ import annotations

import time

import orjson

from tests.conftest import wait_for
from tests.integration.harness import (
    committed_and_end,
    committed_total,
    publish,
    read_records,
    requests_for,
    running,
    settings_for,
)


async def test_300_requests_over_6_apps_sent_once_with_results_and_commits(
    broker, simulator_factory, topics
):
    sim = await simulator_factory(strict=True, app_rate=50)
    settings = settings_for(broker.bootstrap, sim.port, topics, app_rate=50)
    apps = [f"app-{i}" for i in range(6)]
    docs = requests_for(apps, 300)
    request_ids = {orjson.loads(v)["request_id"] for _, v in docs}
    async with running(settings):
        await publish(broker.bootstrap, settings.requests_topic, docs)
        results = await read_records(broker.bootstrap, settings.results_topic, 300, timeout_s=60)

        offsets: dict[int, tuple[int | None, int]] = {}

        async def all_committed() -> bool:
            # committed while running (the commit task), not only by the shutdown's commit
            offsets.update(await committed_and_end(broker.bootstrap, topic, settings.group_id))
            ends = sum(end for _, end in offsets.values())
            return ends == 300 and all(c == end for c, end in offsets.values())

        topic = settings.requests_topic
        try:
            await wait_for(all_committed, 10, interval=0.2, what="commits up to the end offsets")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: (committed, end) by partition {offsets}") from None
    accepted = await sim.accepted()
    assert sorted(a["correlation_id"] for a in accepted) == sorted(request_ids)
    stats = await sim.stats()
    assert stats["duplicates"]["total"] == 0
    assert stats["rejected_429"]["total"] == 0
    docs_out = [orjson.loads(r.value) for r in results]
    assert len(docs_out) == 300
    assert {d["status"] for d in docs_out} == {"sent"}
    by_id = {a["correlation_id"]: a["message_id"] for a in accepted}
    assert all(d["message_id"] == by_id[d["request_id"]] for d in docs_out)
    total = await committed_total(broker.bootstrap, settings.requests_topic, settings.group_id, 3)
    assert total == 300


async def test_malformed_records_go_to_the_dlq_and_good_ones_are_sent(
    broker, simulator_factory, topics, caplog
):
    caplog.set_level("DEBUG")
    sim = await simulator_factory(app_rate=100)
    settings = settings_for(broker.bootstrap, sim.port, topics, app_rate=100)
    good = requests_for(["a1", "a2"], 40)
    base = orjson.loads(good[0][1])
    bad_docs = [
        b"not json at all",
        b'{"request_id": "x", "payload": {',
        b"\xff\xfe\xfa invalid utf-8",
        orjson.dumps({k: v for k, v in base.items() if k != "request_id"}),
        orjson.dumps(
            {**base, "request_id": "no-app", "payload": {**base["payload"], "app_id": None}}
        ),
        orjson.dumps(
            {
                **base,
                "request_id": "no-recipient",
                "payload": {k: v for k, v in base["payload"].items() if k != "recipient"},
            }
        ),
        orjson.dumps(
            {
                **base,
                "request_id": "no-message",
                "payload": {k: v for k, v in base["payload"].items() if k != "message"},
            }
        ),
        orjson.dumps({**base, "request_id": 12345}),
        orjson.dumps({**base, "request_id": "bad-prio", "priority": "urgent"}),
    ]
    mixed: list[tuple[bytes | None, bytes]] = []
    for i, doc in enumerate(good):
        mixed.append(doc)
        if i < len(bad_docs):
            mixed.append((b"k", bad_docs[i]))
    async with running(settings):
        await publish(broker.bootstrap, settings.requests_topic, mixed)
        dlq = await read_records(broker.bootstrap, settings.dlq_topic, len(bad_docs), 30)
        results = await read_records(broker.bootstrap, settings.results_topic, len(mixed), 30)
    assert sorted(r.value for r in dlq) == sorted(bad_docs)
    reasons = {dict(r.headers)["gateway.reason"].decode() for r in dlq}
    assert reasons >= {"invalid_json", "invalid_utf8", "missing_field", "bad_field"}
    statuses = [orjson.loads(r.value)["status"] for r in results]
    assert statuses.count("rejected") == len(bad_docs)
    assert statuses.count("sent") == len(good)
    assert len(await sim.accepted()) == len(good)
    assert settings.key_secret.reveal() not in caplog.text


async def test_a_400_from_sinch_goes_to_the_dlq_with_the_error_body(
    broker, simulator_factory, topics
):
    sim = await simulator_factory()
    settings = settings_for(broker.bootstrap, sim.port, topics)
    doc = orjson.loads(requests_for(["a1"], 1)[0][1])
    # two message kinds: the envelope is fine, Sinch's validation refuses it
    doc["payload"]["message"]["media_message"] = {"url": "https://example.invalid/x.png"}
    async with running(settings):
        await publish(broker.bootstrap, settings.requests_topic, [(b"a1", orjson.dumps(doc))])
        dlq = await read_records(broker.bootstrap, settings.dlq_topic, 1, 30)
        results = await read_records(broker.bootstrap, settings.results_topic, 1, 30)
    assert [r.value for r in dlq] == [orjson.dumps(doc)]
    headers = dict(dlq[0].headers)
    assert headers["gateway.http_status"] == b"400"
    result = orjson.loads(results[0].value)
    assert result["status"] == "failed"
    assert result["http_status"] == 400
    assert result["error"]["status"] == "INVALID_ARGUMENT"
    assert result["request_id"] == doc["request_id"]


async def test_short_token_lifetime_no_failures_and_one_fetch_per_lifetime(
    broker, simulator_factory, topics
):
    lifetime_s = 2.0
    sim = await simulator_factory(token_lifetime_s=lifetime_s, app_rate=20, strict=True)
    settings = settings_for(broker.bootstrap, sim.port, topics, app_rate=20)
    apps = [f"t{i}" for i in range(6)]
    docs = requests_for(apps, 6 * 20 * 15)  # 15 seconds at 20/s per app
    started = time.monotonic()
    async with running(settings):
        await publish(broker.bootstrap, settings.requests_topic, docs)
        results = await read_records(broker.bootstrap, settings.results_topic, len(docs), 60)
    ran_s = time.monotonic() - started
    statuses = [orjson.loads(r.value)["status"] for r in results]
    assert statuses.count("sent") == len(docs)
    stats = await sim.stats()
    assert stats["unauthorized_401"] == 0
    fetches = stats["token_requests"]
    # No 401: the tokens' lifetimes covered the whole drain (simulator clock), so at least
    # drain / lifetime fetches. Renewed a quarter of a lifetime ahead, by one fetch for all
    # senders: at most one per 3/4 lifetime of running, however long the drain took;
    # a fetch per sender would be several times that.
    drain_s = stats["last_send_time"] - stats["first_send_time"]
    assert drain_s / lifetime_s <= fetches <= ran_s / (0.75 * lifetime_s) + 2, (
        fetches,
        drain_s,
        ran_s,
    )
