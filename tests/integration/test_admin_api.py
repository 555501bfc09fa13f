"""The admin API on the real broker and simulator: pause, live rate, drop, tokens, Redis.

Every figure is measured at the simulator (its accepted log: acceptance times and
correlation ids, which are the request ids) or on the results topic.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import aiohttp
import orjson

from gateway.app import Gateway
from gateway.cli import sample_request
from tests.conftest import Sim, wait_for
from tests.integration.harness import publish, read_records, running, settings_for

TOKEN = "admin-token-for-tests"


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def admin(
    gw: Gateway, method: str, path: str, body: Any = None, token: str | None = TOKEN
) -> tuple[int, dict[str, Any]]:
    headers = {"X-Admin-User": "tester"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    url = f"http://127.0.0.1:{gw.http_port}{path}"
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


def docs_of(app_id: str, count: int, start: int = 0, **extra: Any) -> list[dict[str, Any]]:
    return [sample_request(app_id, start + i) | extra for i in range(count)]


def keyed(docs: list[dict[str, Any]]) -> list[tuple[bytes | None, bytes]]:
    return [(d["payload"]["app_id"].encode(), orjson.dumps(d)) for d in docs]


def committed(gw: Gateway) -> int:
    """Offsets the gateway committed on the requests topic (records count from 0)."""
    assert gw.intake is not None
    topic = gw.settings.requests_topic
    return sum(t.committed or 0 for tp, t in gw.intake.trackers.items() if tp.topic == topic)


async def accepted_of(sim: Sim, app_id: str) -> list[dict[str, Any]]:
    return [a for a in await sim.accepted() if a["app_id"] == app_id]


async def test_pausing_an_app_stops_its_sends_within_one_slot_and_resuming_loses_nothing(
    broker, simulator_factory, topics
):
    sim = await simulator_factory(app_rate=20)
    settings = settings_for(
        broker.bootstrap, sim.port, topics, app_rate=20, admin_token=TOKEN, stall_timeout_s=0.5
    )
    held = docs_of("held", 60)
    async with running(settings) as gw:
        await publish(broker.bootstrap, settings.requests_topic, keyed(held))

        async def some_sent() -> bool:
            return len(await accepted_of(sim, "held")) >= 10

        await wait_for(some_sent, 15, what="the first sends")
        status, answer = await admin(gw, "POST", "/admin/apps/held/pause", {"reason": "ops"})
        paused_at = time.time()
        assert status == 200, answer
        assert answer["scope"] == "local"
        assert answer["reason"] == "ops"
        # another app goes on meanwhile: sending works, and time passes
        free = docs_of("free", 30)
        await publish(broker.bootstrap, settings.requests_topic, keyed(free))

        async def free_sent() -> bool:
            return len(await accepted_of(sim, "free")) == 30

        await wait_for(free_sent, 15, what="the other app's sends")
        sent = await accepted_of(sim, "held")
        # within one slot (1/20 s) of the answer; a send already on the wire may land later
        late = [a for a in sent if ts(a["accepted_time"]) > paused_at + 1 / 20]
        assert len(late) <= 1, late
        assert time.time() - paused_at >= 1.0  # 30 sends at 20/s: long enough to see
        status, view = await admin(gw, "GET", "/admin/lanes")
        lane = next(x for x in view["lanes"] if x["app_id"] == "held")
        assert lane["paused"] is True
        assert lane["paused_why"][0]["by"] == "admin"
        assert lane["paused_why"][0]["who"] == "tester"
        assert lane["queued"]["total"] == 60 - len(sent)
        assert len(sent) < 60
        # its partition commits nothing past its queued records, on purpose: still ready
        status, ready = await admin(gw, "GET", "/readyz", token=None)
        assert status == 200, ready
        assert "paused by an operator: ['held']" in ready["checks"]["progress"]["detail"]
        status, _ = await admin(gw, "POST", "/admin/apps/held/resume")
        assert status == 200

        async def all_sent() -> bool:
            return len(await accepted_of(sim, "held")) >= 60

        await wait_for(all_sent, 15, what="the rest after resuming")
        await wait_for(lambda: committed(gw) == 90, 15, what="every offset committed")
        sent = await accepted_of(sim, "held")
    ids = [a["correlation_id"] for a in sent]
    assert sorted(ids) == sorted(d["request_id"] for d in held)  # each once
    # in order, but for two sends of one burst (app_burst 2), which may reach the
    # simulator the other way round
    order = {d["request_id"]: i for i, d in enumerate(held)}
    assert all(abs(order[rid] - i) <= 1 for i, rid in enumerate(ids)), [order[r] for r in ids]
    assert (await sim.stats())["duplicates"]["total"] == 0


async def test_a_rate_set_live_is_followed_within_one_second_and_ends_on_expiry(
    broker, simulator_factory, topics
):
    sim = await simulator_factory(app_rate=50)
    settings = settings_for(broker.bootstrap, sim.port, topics, app_rate=50, admin_token=TOKEN)
    async with running(settings) as gw:
        await publish(broker.bootstrap, settings.requests_topic, keyed(docs_of("r1", 400)))

        async def started() -> bool:
            return len(await accepted_of(sim, "r1")) >= 20

        await wait_for(started, 15, what="the first sends")
        status, answer = await admin(gw, "PUT", "/admin/apps/r1/rate", {"rate": 10, "for_s": 3})
        set_at = time.time()
        assert status == 200, answer
        status, view = await admin(gw, "GET", "/admin/lanes")
        [lane] = [x for x in view["lanes"] if x["app_id"] == "r1"]
        assert lane["rate"]["source"] == "admin"
        assert lane["rate"]["in_force"] == 10
        assert lane["rate"]["otherwise"]["rate"] == 50

        async def after_expiry() -> bool:
            return any(ts(a["accepted_time"]) > set_at + 5.0 for a in await accepted_of(sim, "r1"))

        await wait_for(after_expiry, 15, what="sends after the override's expiry")
        times = [ts(a["accepted_time"]) for a in await accepted_of(sim, "r1")]
    # from one second after the change to its end (3 s): 10/s
    during = [t for t in times if set_at + 1.0 <= t < set_at + 3.0]
    assert 2 * 10 * 0.85 <= len(during) <= 2 * 10 + 1, len(during)
    # one second after the expiry, the rate read from Sinch again (50/s, paced 2 % under)
    after = [t for t in times if set_at + 4.0 <= t < set_at + 5.0]
    assert len(after) >= 50 * 0.98 * 0.9, len(after)


async def test_dropping_a_campaign_cancels_each_of_its_queued_records_and_sends_none(
    broker, simulator_factory, topics
):
    sim = await simulator_factory(app_rate=10)
    settings = settings_for(broker.bootstrap, sim.port, topics, app_rate=10, admin_token=TOKEN)
    docs: list[dict[str, Any]] = []
    for i in range(30):
        extra = {"campaign": "spring"} if i % 3 else {"campaign": "autumn"}
        docs += docs_of("d1", 1, i, **extra)
    docs += docs_of("d2", 10, campaign="spring")  # another app, same campaign
    spring = {d["request_id"] for d in docs if d["campaign"] == "spring"}
    async with running(settings) as gw:
        await publish(broker.bootstrap, settings.requests_topic, keyed(docs))

        async def started() -> bool:
            return len(await accepted_of(sim, "d1")) >= 3

        await wait_for(started, 15, what="the first sends")
        status, answer = await admin(gw, "POST", "/admin/drop", {"campaign": "spring"})
        assert status == 200, answer
        assert "not covered" in answer["note"]
        results = await read_records(broker.bootstrap, settings.results_topic, len(docs), 20)
        await wait_for(lambda: committed(gw) == len(docs), 15, what="every offset committed")
        accepted = {a["correlation_id"] for a in await sim.accepted()}
    by_id = {}
    for record in results:
        doc = orjson.loads(record.value)
        assert doc["request_id"] not in by_id  # one result each
        by_id[doc["request_id"]] = doc
    assert set(by_id) == {d["request_id"] for d in docs}
    cancelled = {rid for rid, doc in by_id.items() if doc["status"] == "cancelled"}
    assert cancelled <= spring
    assert len(cancelled) == answer["cancelled"]
    assert len(cancelled) >= 15  # 20 + 10 of the campaign, a few sent before the drop
    assert not cancelled & accepted  # none of them was sent
    assert {by_id[rid]["campaign"] for rid in cancelled} == {"spring"}
    others = {rid for rid in by_id if rid not in spring}
    assert all(by_id[rid]["status"] == "sent" for rid in others)
    assert accepted == {rid for rid, doc in by_id.items() if doc["status"] == "sent"}


async def test_the_admin_api_refuses_a_missing_or_wrong_token_and_is_off_without_one(
    broker, simulator, topics
):
    settings = settings_for(broker.bootstrap, simulator.port, topics)
    async with running(settings) as gw:
        status, answer = await admin(gw, "GET", "/admin/lanes")
        assert status == 404
        assert "off" in answer["error"]
        status, _ = await admin(gw, "POST", "/admin/apps/a1/pause", token=None)
        assert status == 404
    topics = topics | {"group_id": topics["group_id"] + "-2"}
    settings = settings_for(broker.bootstrap, simulator.port, topics, admin_token=TOKEN)
    async with running(settings) as gw:
        for token in (None, "wrong", TOKEN + "x", ""):
            status, answer = await admin(gw, "POST", "/admin/apps/a1/pause", token=token)
            assert status == 401, (token, answer)
            assert "unauthorized" in answer["error"]
        assert gw.lanes is not None
        assert gw.lanes.holds == {}  # nothing changed
        status, answer = await admin(gw, "POST", "/admin/apps/a1/pause")
        assert status == 200, answer
        assert gw.lanes.holds == {"a1": "paused by an operator"}


async def test_with_redis_a_control_set_on_one_replica_applies_on_another(
    broker, simulator, topics, redis_server
):
    settings = settings_for(
        broker.bootstrap,
        simulator.port,
        topics,
        admin_token=TOKEN,
        redis_url=redis_server.url,
        redis_key_prefix=f"{topics['group_id']}:limiter:",
    )
    async with running(settings) as one, running(settings) as two:
        status, answer = await admin(one, "POST", "/admin/apps/g1/pause", {"reason": "ops"})
        assert status == 200, answer
        assert answer["scope"] == "group"
        set_at = time.monotonic()
        await wait_for(lambda: two.lanes is not None and "g1" in two.lanes.holds, 1.0, 0.01)
        seen_s = time.monotonic() - set_at
        status, answer = await admin(two, "PUT", "/admin/apps/g1/rate", {"rate": 3})
        assert status == 200, answer
        await wait_for(
            lambda: one.controls is not None and one.controls.rate_override("g1") is not None,
            1.0,
            0.01,
        )
        status, view = await admin(one, "GET", "/admin/lanes")
        [lane] = [x for x in view["lanes"] if x["app_id"] == "g1"]
        assert lane["paused"] is True
        assert lane["rate"]["source"] == "admin"
        status, _ = await admin(two, "POST", "/admin/apps/g1/resume")
        await wait_for(lambda: "g1" not in one.lanes.holds, 1.0, 0.01)  # type: ignore[union-attr]
    assert seen_s < 1.0


async def test_a_drop_rule_with_for_s_cancels_the_campaign_as_it_is_read(
    broker, simulator_factory, topics
):
    sim = await simulator_factory(app_rate=50)
    settings = settings_for(broker.bootstrap, sim.port, topics, app_rate=50, admin_token=TOKEN)
    later = docs_of("e1", 20, campaign="summer") + docs_of("e1", 5, 20)
    summer = {d["request_id"] for d in later if d.get("campaign") == "summer"}
    async with running(settings) as gw:
        status, answer = await admin(
            gw, "POST", "/admin/drop", {"app_id": "e1", "campaign": "summer", "for_s": 60}
        )
        assert status == 200, answer
        assert answer["cancelled"] == 0
        assert "not covered" not in answer["note"]
        await publish(broker.bootstrap, settings.requests_topic, keyed(later))
        results = await read_records(broker.bootstrap, settings.results_topic, len(later), 20)
        await wait_for(lambda: committed(gw) == len(later), 15, what="every offset committed")
        accepted = {a["correlation_id"] for a in await sim.accepted()}
    status_of = {(doc := orjson.loads(r.value))["request_id"]: doc["status"] for r in results}
    assert len(status_of) == len(results) == len(later)
    assert {rid for rid, st in status_of.items() if st == "cancelled"} == summer
    assert accepted == set(status_of) - summer
