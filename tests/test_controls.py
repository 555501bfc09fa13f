"""Operators' controls: state, expiry, one application per replica, the stores."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from gateway.cli import sample_request
from gateway.controls import (
    ControlError,
    Controls,
    DropRule,
    LocalStore,
    Pause,
    RedisStore,
    State,
    StoreUnavailable,
)
from gateway.envelope import Request, decode
from tests.fakes import FakeClock


def request(app_id: str, campaign: str | None = None) -> Request:
    doc = sample_request(app_id, 0)
    if campaign:
        doc["campaign"] = campaign
    return decode(orjson.dumps(doc), max_bytes=100_000)


class Target:
    def __init__(self) -> None:
        self.pauses: list[tuple[str, Pause | None]] = []
        self.rates: list[str] = []
        self.drops: list[DropRule] = []

    def paused(self, app_id: str, pause: Pause | None) -> None:
        self.pauses.append((app_id, pause))

    def rate_changed(self, app_id: str) -> None:
        self.rates.append(app_id)

    def drop(self, rule: DropRule) -> int:
        self.drops.append(rule)
        return 7


def controls(store: Any = None, wall: FakeClock | None = None) -> tuple[Controls, Target]:
    target = Target()
    return Controls(store or LocalStore(), target, wall=wall or FakeClock()), target


async def test_pause_and_resume_reach_the_target_once_each() -> None:
    c, t = controls()
    await c.pause("a1", "ops", "alice")
    await c.refresh()  # nothing new: nothing applied again
    await c.resume("a1", "bob")
    assert [(app, p.reason if p else None) for app, p in t.pauses] == [("a1", "ops"), ("a1", None)]
    assert t.pauses[0][1] is not None
    assert t.pauses[0][1].by == "alice"
    assert c.state.pauses == {}


async def test_a_rate_override_ends_at_its_expiry_and_the_store_forgets_it() -> None:
    wall = FakeClock(1000.0)
    store = LocalStore()
    c, t = controls(store, wall)
    override = await c.set_rate("a1", 5, 60, "alice")
    assert override.until == 1060.0
    assert c.rate_override("a1") == override
    assert t.rates == ["a1"]
    wall.advance(59.9)
    await c.refresh()
    assert c.rate_override("a1") is not None
    wall.advance(0.2)
    await c.refresh()
    assert c.rate_override("a1") is None
    assert t.rates == ["a1", "a1"]  # told again: the previous rate comes back
    assert store.fields == {}


async def test_a_rate_without_for_s_lasts_until_cleared() -> None:
    wall = FakeClock()
    c, _ = controls(wall=wall)
    await c.set_rate("a1", 2.5, None, "alice")
    wall.advance(86400 * 365)
    await c.refresh()
    assert c.rate_override("a1") is not None
    assert await c.clear_rate("a1", "bob") is True
    assert c.rate_override("a1") is None
    assert await c.clear_rate("a1", "bob") is False


@pytest.mark.parametrize(
    ("rate", "for_s", "message"),
    [
        (0, None, "rate"),
        (-1, None, "rate"),
        (math.nan, None, "rate"),
        (math.inf, None, "rate"),
        ("5", None, "rate"),
        (True, None, "rate"),
        (5, 0, "for_s"),
        (5, -3, "for_s"),
        (5, "10", "for_s"),
    ],
)
async def test_bad_rates_are_refused_naming_the_field(rate: Any, for_s: Any, message: str) -> None:
    c, t = controls()
    with pytest.raises(ControlError, match=message):
        await c.set_rate("a1", rate, for_s, "alice")
    assert t.rates == []


async def test_a_drop_needs_an_app_or_a_campaign() -> None:
    c, _ = controls()
    with pytest.raises(ControlError, match="app_id, campaign"):
        await c.drop(None, None, None, "alice")
    with pytest.raises(ControlError, match="campaign"):
        await c.drop(None, "", None, "alice")


async def test_a_one_off_drop_cancels_waiting_requests_once_and_screens_nothing() -> None:
    wall = FakeClock()
    c, t = controls(wall=wall)
    rule, cancelled = await c.drop(None, "spring", None, "alice")
    assert cancelled == 7
    await c.refresh()
    assert t.drops == [rule]  # applied once
    assert c.screen(request("a1", "spring")) is None


async def test_a_drop_rule_with_for_s_screens_arriving_requests_until_it_ends() -> None:
    wall = FakeClock(1000.0)
    c, _ = controls(wall=wall)
    await c.drop("a1", "spring", 30, "alice")
    reason = c.screen(request("a1", "spring"))
    assert reason is not None
    assert "alice" in reason
    assert "campaign spring" in reason
    assert c.screen(request("a2", "spring")) is None  # another app
    assert c.screen(request("a1")) is None  # no campaign
    wall.advance(30.1)
    await c.refresh()
    assert c.screen(request("a1", "spring")) is None


async def test_replicas_sharing_a_store_apply_each_control_and_each_drop_once() -> None:
    store = LocalStore()
    wall = FakeClock()
    one, t1 = controls(store, wall)
    two, t2 = controls(store, wall)
    await one.pause("a1", "ops", "alice")
    await one.set_rate("a1", 3, None, "alice")
    rule, _ = await one.drop("a1", None, None, "alice")
    await two.refresh()
    await two.refresh()
    assert [app for app, p in t2.pauses if p is not None] == ["a1"]
    assert t2.rates == ["a1"]
    assert t2.drops == [rule]
    assert two.rate_override("a1") == one.rate_override("a1")
    wall.advance(31)  # the one-off drop leaves the store; nothing is applied again
    await two.refresh()
    await one.refresh()
    assert t1.drops == [rule]
    assert t2.drops == [rule]
    assert store.fields.keys() == {"pause:a1", "rate:a1"}


def test_unreadable_fields_are_ignored() -> None:
    state, stale = State.parse({"pause:a1": b"not json", "rate:a2": b'{"x": 1}'}, 0.0)
    assert state == State()
    assert stale == []


async def test_the_group_store_in_redis(redis_server: Any) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        key = "test-controls:" + request("x").request_id
        one, _ = controls(RedisStore(client, key))
        two, t2 = controls(RedisStore(client, key))
        assert one.scope == "group"
        await one.pause("a1", "ops", "alice")
        await two.refresh()
        assert two.state.pauses["a1"].reason == "ops"
        assert t2.pauses[0][0] == "a1"
        assert set(await client.hkeys(key)) == {b"pause:a1"}
        await client.delete(key)
    finally:
        await client.aclose()


async def test_an_unreachable_redis_keeps_the_last_state_and_refuses_changes() -> None:
    client = aioredis.Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.2)
    try:
        wall = FakeClock()
        c, t = controls(RedisStore(client, "k"), wall)
        with pytest.raises(StoreUnavailable):
            await c.pause("a1", "ops", "alice")
        await c.refresh()  # logged, not raised
        assert t.pauses == []
    finally:
        await client.aclose()


class FlakyStore(LocalStore):
    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def load(self) -> dict[str, bytes]:
        if self.down:
            raise StoreUnavailable("down")
        return await super().load()


async def test_while_the_store_is_down_the_last_controls_hold_and_expiries_still_end() -> None:
    store, wall = FlakyStore(), FakeClock()
    c, t = controls(store, wall)
    await c.pause("a1", "ops", "alice")
    await c.set_rate("a1", 3, 10, "alice")
    store.down = True
    wall.advance(11)
    await c.refresh()
    assert "a1" in c.state.pauses
    assert c.rate_override("a1") is None
    assert t.rates == ["a1", "a1"]
    assert [p is None for _, p in t.pauses] == [False]
