"""``gateway redrive`` on the test broker: filters, dry run, re-drive counts, ledger, arguments."""

from __future__ import annotations

import argparse
import io
import uuid
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from gateway.broker import EmbeddedBroker
from gateway.cli import main, sample_request
from gateway.demo import read_records
from gateway.outcomes import dlq_headers
from gateway.redrive import (
    DLQ_HEADERS,
    REDRIVES_HEADER,
    DlqRecord,
    RedriveError,
    Selection,
    Summary,
    _ends,
    _partitions,
    matches,
    redrive,
)
from gateway.redrive_cli import Meter, parse_time, report
from gateway.settings import Settings, load

T0 = 1_750_000_000_000  # ms: the DLQ records' timestamps are T0 + i seconds


@pytest.fixture
def settings(broker: EmbeddedBroker, topics: dict[str, str]) -> Settings:
    names = {k: v for k, v in topics.items() if k.endswith("_topic")}
    return load(
        env={},
        kafka_bootstrap=broker.bootstrap,
        topic_partitions=3,
        redrive_ledger_topic=f"led-{uuid.uuid4().hex[:8]}",
        **names,
    )


async def create(settings: Settings, *topics: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, 3, 1) for t in topics])
    finally:
        await admin.close()


async def existing(settings: Settings) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def dead(
    app_id: str,
    n: int,
    reason: str = "http_400",
    *,
    status: int | None = 400,
    redrives: int | None = None,
    source: str = "req",
    own: Sequence[tuple[str, bytes]] = (("trace", b"t-1"),),
) -> dict[str, Any]:
    """A DLQ record as the gateway writes it: original value, key, headers, then its own."""
    headers = list(own)
    if redrives is not None:
        headers.append((REDRIVES_HEADER, str(redrives).encode()))
    headers += dlq_headers(
        reason, http_status=status, attempts=1, detail="x", source=f"{source}/0/{n}"
    )
    doc = sample_request(app_id, n)
    return {
        "value": orjson.dumps(doc),
        "key": f"key-{n}".encode(),
        "headers": headers,
        "request_id": doc["request_id"],
        "timestamp_ms": T0 + n * 1000,
    }


async def dead_letter(settings: Settings, records: list[dict[str, Any]]) -> None:
    """Write ``records`` to the DLQ topic (created here with 3 partitions)."""
    await create(settings, settings.dlq_topic)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i, r in enumerate(records):
            await producer.send(
                settings.dlq_topic,
                r["value"],
                key=r["key"],
                headers=r["headers"],
                partition=i % 3,
                timestamp_ms=r["timestamp_ms"],
            )
        await producer.flush()
    finally:
        await producer.stop()


async def end_total(settings: Settings, topic: str) -> int:
    """Records in ``topic`` now (its high watermarks summed); 0 when it does not exist."""
    if topic not in await existing(settings):
        return 0
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        return sum((await _ends(consumer, await _partitions(consumer, topic))).values())
    finally:
        await consumer.stop()


async def published(settings: Settings, topic: str, count: int) -> list[Any]:
    records = await read_records(settings.kafka_bootstrap, topic, count, timeout_s=20)
    assert len(records) == count
    assert await end_total(settings, topic) == count  # and no more
    return records


# -- pure parts -------------------------------------------------------------


def record(**kw: Any) -> DlqRecord:
    r = dead("a1", 1, **kw)
    return DlqRecord(0, 0, r["timestamp_ms"], r["key"], r["value"], r["headers"])


def test_filters_by_reason_status_app_and_time() -> None:
    rec = record(reason="http_400", status=400)  # app a1, stamped T0 + 1 s
    assert matches(rec, Selection(), "a1")
    assert matches(rec, Selection(reasons=frozenset({"http_400", "5xx"})), "a1")
    assert not matches(rec, Selection(reasons=frozenset({"retries_exhausted"})), "a1")
    assert matches(rec, Selection(http_statuses=frozenset({400})), "a1")
    assert not matches(rec, Selection(http_statuses=frozenset({500})), "a1")
    assert matches(rec, Selection(apps=frozenset({"a1"})), "a1")
    assert not matches(rec, Selection(apps=frozenset({"a2"})), "a1")
    assert not matches(rec, Selection(apps=frozenset({"a1"})), None)
    assert matches(rec, Selection(since_ms=T0 + 1000, until_ms=T0 + 1001), "a1")
    assert not matches(rec, Selection(since_ms=T0 + 1001), "a1")
    assert not matches(rec, Selection(until_ms=T0 + 1000), "a1")  # until is exclusive
    rejected = record(reason="not_json", status=None)
    assert not matches(rejected, Selection(http_statuses=frozenset({400})), None)


def test_republished_headers_drop_the_dlq_ones_and_count_the_redrive() -> None:
    first = record()
    assert first.redrives == 0
    assert first.republished_headers() == [("trace", b"t-1"), (REDRIVES_HEADER, b"1")]
    again = record(redrives=2)
    assert again.redrives == 2
    assert again.republished_headers() == [("trace", b"t-1"), (REDRIVES_HEADER, b"3")]
    assert {"gateway.reason", "gateway.http_status", "gateway.source"} <= DLQ_HEADERS


def test_parse_time_takes_rfc3339_and_times_ago() -> None:
    assert parse_time("2025-06-15T15:06:40Z") == 1_750_000_000_000
    assert parse_time("2025-06-15T17:06:40+02:00") == 1_750_000_000_000
    assert parse_time("2025-06-15T15:06:40") == 1_750_000_000_000  # no offset: UTC
    assert parse_time("90s", now=1000.0) == 910_000
    assert parse_time("2h", now=10_000.0) == 2_800_000
    with pytest.raises(argparse.ArgumentTypeError, match="RFC 3339"):
        parse_time("yesterday")


def test_meter_prints_a_line_every_n_records_when_not_a_terminal() -> None:
    out = io.StringIO()
    meter = Meter(out, every=2)
    sm = Summary(total=4)
    for _ in range(4):
        sm.scanned += 1
        sm.matched += 1
        sm.redriven += 1
        meter(sm)
    assert out.getvalue().splitlines() == [
        "scanned 2 of 4 (50%), matched 2, re-driven 2",
        "scanned 4 of 4 (100%), matched 4, re-driven 4",
    ]


# -- on the broker -----------------------------------------------------------


async def test_redrive_publishes_the_selected_records_unchanged_and_each_once(
    settings: Settings,
) -> None:
    req, high = settings.requests_topic, settings.requests_high_topic
    records = [dead(f"a{n % 2}", n, source=req) for n in range(6)]  # http_400, apps a0/a1
    records += [dead("a0", 6, "retries_exhausted", status=503, source=high)]
    records += [dead("a1", 7, "not_json", status=None, source=req, own=())]
    await dead_letter(settings, records)

    only = Selection(reasons=frozenset({"http_400"}), apps=frozenset({"a1"}))
    first = await redrive(settings, only)
    assert (first.scanned, first.matched, first.redriven) == (8, 3, 3)
    assert (first.already, first.too_many, first.refused) == (0, 0, 0)
    out = await published(settings, req, 3)
    by_id = {r["request_id"]: r for r in records}
    for got in out:
        want = by_id[orjson.loads(got.value)["request_id"]]
        assert got.value == want["value"]  # the bytes, unchanged
        assert got.key == want["key"]
        assert list(got.headers) == [("trace", b"t-1"), (REDRIVES_HEADER, b"1")]
    assert {orjson.loads(r.value)["payload"]["app_id"] for r in out} == {"a1"}

    everything = await redrive(settings, Selection())
    assert (everything.matched, everything.redriven, everything.already) == (8, 5, 3)
    assert everything.by_reason["http_400"] == {
        "matched": 6,
        "selected": 3,
        "redriven": 3,
        "already": 3,
    }
    await published(settings, req, 3 + 4)  # the high-priority one went back to its topic
    (urgent,) = await published(settings, high, 1)
    assert urgent.value == records[6]["value"]

    again = await redrive(settings, Selection())
    assert (again.scanned, again.matched, again.redriven, again.already) == (8, 8, 0, 8)
    assert await end_total(settings, req) == 7
    assert await end_total(settings, high) == 1
    assert "re-driven 0, skipped 8 already re-driven" in report(again, settings, Selection())


async def test_dry_run_shows_what_it_would_do_and_publishes_nothing(settings: Settings) -> None:
    records = [dead(f"a{n % 3}", n, source=settings.requests_topic) for n in range(9)]
    await dead_letter(settings, records)
    sm = await redrive(settings, Selection(), dry_run=True)
    assert (sm.scanned, sm.matched, sm.selected, sm.redriven) == (9, 9, 9, 0)
    assert sm.by_app == {"a0": 3, "a1": 3, "a2": 3}
    assert len(sm.samples) == 9
    assert {s.request_id for s in sm.samples} == {r["request_id"] for r in records}
    # neither the requests topic nor the ledger was even created
    topics = await existing(settings)
    assert settings.requests_topic not in topics
    assert settings.redrive_ledger_topic not in topics
    text = report(sm, settings, Selection())
    assert "dry run: nothing published" in text
    assert "would re-drive 9" in text
    assert records[0]["request_id"] in text
    # and a real run afterwards still re-drives all of them
    assert (await redrive(settings, Selection())).redriven == 9


async def test_records_at_max_redrives_stay_in_the_dlq(settings: Settings) -> None:
    records = [
        dead("a1", 0, redrives=3),
        dead("a1", 1, redrives=2),
        dead("a1", 2, redrives=5),
        dead("a1", 3),
    ]
    await dead_letter(settings, records)
    sm = await redrive(settings, Selection(max_redrives=3))
    assert (sm.matched, sm.redriven, sm.too_many) == (4, 2, 2)
    out = await published(settings, settings.requests_topic, 2)
    counts = {orjson.loads(r.value)["request_id"]: dict(r.headers)[REDRIVES_HEADER] for r in out}
    assert counts == {records[1]["request_id"]: b"3", records[3]["request_id"]: b"1"}
    # a higher bound lets the skipped ones go; the re-driven ones are not sent twice
    more = await redrive(settings, Selection(max_redrives=6))
    assert (more.redriven, more.already, more.too_many) == (2, 2, 0)


async def test_time_range_and_limit(settings: Settings) -> None:
    records = [dead("a1", n) for n in range(10)]  # stamped T0 + n s
    await dead_letter(settings, records)
    window = Selection(since_ms=T0 + 2000, until_ms=T0 + 7000)  # n = 2..6
    sm = await redrive(settings, window, dry_run=True)
    assert sm.selected == 5
    assert {s.timestamp_ms for s in sm.samples} == {T0 + n * 1000 for n in range(2, 7)}
    capped = await redrive(settings, Selection(since_ms=T0 + 2000, until_ms=T0 + 7000, limit=2))
    assert capped.redriven == 2
    rest = await redrive(settings, window)
    assert (rest.redriven, rest.already) == (3, 2)
    await published(settings, settings.requests_topic, 5)


async def test_a_missing_dlq_topic_is_an_error(settings: Settings) -> None:
    with pytest.raises(RedriveError, match=f"topic {settings.dlq_topic} does not exist"):
        await redrive(settings, Selection(), dry_run=True)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--limit", "0"], "argument --limit: '0': expected an integer >= 1"),
        (["--max-redrives", "x"], "argument --max-redrives: 'x': expected an integer >= 1"),
        (["--http-status", "700"], "argument --http-status: '700': expected an HTTP status"),
        (["--since", "yesterday"], "argument --since: 'yesterday': expected an RFC 3339 time"),
        (["--until", "2025-13-01"], "argument --until: '2025-13-01'"),
        (["--reason", " "], "argument --reason: expected a non-empty value"),
        (["--to-topic", "a/b"], "argument --to-topic: 'a/b': not a Kafka topic name"),
        (["--since", "1h", "--until", "2h"], "--since must be before --until"),
        (["--to-topic", "sinch.outbound.dlq"], "--to-topic sinch.outbound.dlq: that is the DLQ"),
    ],
)
def test_bad_arguments_exit_2_naming_the_option(
    argv: list[str],
    needle: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    monkeypatch.setenv("GATEWAY_KAFKA_BOOTSTRAP", "127.0.0.1:1")  # never reached
    try:
        code = main(["redrive", *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code  # type: ignore[assignment]
    assert code == 2
    assert needle in capsys.readouterr().err
