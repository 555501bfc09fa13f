"""Shares of the project cap: >= 90 % of the weighted fair share, the rest to the longest drain."""

from __future__ import annotations

import pytest

from gateway.shares import Demand, Shares, allocate, weighted_fair


def test_no_shares_while_the_cap_does_not_bind() -> None:
    assert allocate(800, [Demand("a", 20, 100), Demand("b", 20, 5)]) == {}


def test_weighted_fair_shares_are_in_proportion_to_the_rates() -> None:
    shares = weighted_fair(100, {"big": 100, "small": 20, "tiny": 5})
    assert shares == pytest.approx({"big": 80, "small": 16, "tiny": 4})
    # a cap above the sum: each app its own rate, no more
    assert weighted_fair(1000, {"big": 100, "small": 20}) == {"big": 100, "small": 20}


def test_mix_b_prime_the_hot_app_near_its_rate_and_the_others_above_the_floor() -> None:
    # one app with half of the backlog, every app allowed 100/s, a project of 800/s
    demands = [Demand("hot", 100, 2000)] + [Demand(f"a{i}", 100, 51) for i in range(39)]
    shares = allocate(800, demands)
    assert sum(shares.values()) == pytest.approx(800)
    assert shares["hot"] == pytest.approx(100 * 0.9 * 800 / 4000 + (800 - 0.9 * 800), rel=1e-9)
    assert shares["hot"] >= 98
    for i in range(39):
        assert shares[f"a{i}"] == pytest.approx(18)  # 90 % of the fair 20/s


def test_every_busy_app_keeps_90_percent_of_its_rate_weighted_share() -> None:
    demands = [Demand("bought", 100, 10), Demand("default", 20, 10_000)] + [
        Demand(f"x{i}", 20, 500) for i in range(60)
    ]
    shares = allocate(800, demands)
    fair = weighted_fair(800, {d.app_id: d.rate for d in demands})
    for d in demands:
        assert shares[d.app_id] >= 0.9 * fair[d.app_id] - 1e-9
        assert shares[d.app_id] <= d.rate + 1e-9
    # the longest drain at its own rate (10,000 at 20/s) is served first, up to its rate
    assert shares["default"] == pytest.approx(20)
    assert sum(shares.values()) == pytest.approx(800)


def test_idle_apps_take_nothing() -> None:
    shares = allocate(100, [Demand("a", 80, 10), Demand("b", 80, 0), Demand("c", 80, 30)])
    assert "b" not in shares
    assert sum(shares.values()) == pytest.approx(100)


def test_backlogs_that_drain_together_are_left_to_the_round_robin() -> None:
    assert allocate(800, [Demand(f"a{i}", 20, 40) for i in range(200)]) == {}
    assert allocate(800, [Demand(f"a{i}", 20, 40 + i % 5) for i in range(200)]) == {}


def test_shares_are_applied_when_they_change_and_not_while_none_bind() -> None:
    """Ceilings are set while the cap binds and cleared once when it stops binding; steps
    with no shares after none leave the lanes alone (200 lanes, ten steps a second)."""
    demands: list[Demand] = []
    applied: list[dict[str, float]] = []
    shares = Shares(groups=lambda: [(100.0, demands)], apply=applied.append)
    shares.step()
    assert applied == []
    demands[:] = [Demand("hot", 100.0, 1000), Demand("a", 100.0, 10)]
    shares.step()
    shares.step()
    assert len(applied) == 2
    assert applied[0]["hot"] > applied[0]["a"]
    demands.clear()
    shares.step()
    shares.step()
    assert applied[2:] == [{}]
