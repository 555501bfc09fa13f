from __future__ import annotations

import itertools
import random

import pytest

from gateway.offsets import PartitionTracker, Runs, decode_done, encode_done


def runs_of(values: list[int]) -> list[tuple[int, int]]:
    r = Runs()
    for v in values:
        r.add(v)
    return r.runs()


def test_commits_only_the_contiguous_finished_prefix():
    t = PartitionTracker(0)
    for off in range(10, 20):
        t.add(off)
    assert t.committable() == 10
    t.done(12)
    t.done(11)
    assert t.committable() == 10
    t.done(10)
    assert t.committable() == 13
    for off in range(13, 20):
        t.done(off)
    assert t.committable() == 20
    assert t.pending == 0


def test_random_completion_order_never_passes_an_unfinished_record():
    rng = random.Random(7)
    t = PartitionTracker(0)
    offsets = list(range(1000))
    for off in offsets:
        t.add(off)
    rng.shuffle(offsets)
    finished: set[int] = set()
    for off in offsets:
        t.done(off)
        finished.add(off)
        c = t.committable()
        assert all(o in finished for o in range(c))
        assert c == 1000 or c not in finished


def test_done_map_round_trips():
    done = [105, 106, 110, 400, 1234]
    text = encode_done(100, runs_of(done))
    assert text.startswith("gw1:")
    assert set(decode_done(100, text)) == set(done)
    assert not decode_done(100, "")
    assert not decode_done(100, "garbage")
    assert encode_done(100, []) == ""


@pytest.mark.parametrize("density", [0.02, 0.5, 0.98, 1.0])
def test_done_map_round_trips_runs_and_scattered_offsets(density):
    rng = random.Random(density)
    done = [100 + i for i in range(1, 3000) if rng.random() < density]
    assert set(decode_done(100, encode_done(100, runs_of(done), limit=100_000))) == set(done)


def test_done_map_ignores_offsets_at_or_below_base_and_drops_the_tail_past_the_limit():
    rng = random.Random(7)
    done = [90, 95, 100] + [100 + i for i in range(1, 40_000) if rng.random() < 0.5]
    assert set(decode_done(100, encode_done(100, runs_of(done), limit=100_000))) == set(done[3:])
    text = encode_done(100, runs_of(done), limit=1000)
    assert len(text) <= 1000
    short = set(decode_done(100, text))
    assert short  # a prefix of the finished offsets, not nothing
    assert len(short) < len(done) - 3  # the tail beyond the limit is dropped
    assert short == set(done[3 : 3 + len(short)])


def test_runs_hold_the_same_ints_as_a_set_whatever_the_order():
    rng = random.Random(3)
    values = [v for v in range(2000) if rng.random() < 0.7] + list(range(5000, 9000))
    rng.shuffle(values)
    runs, plain = Runs(), set()
    for v in values + values[:50]:  # adding twice changes nothing
        runs.add(v)
        plain.add(v)
    assert list(runs) == sorted(plain)
    assert len(runs) == len(plain)
    assert all((v in runs) == (v in plain) for v in range(-5, 9100))
    spans = runs.runs()
    assert all(hi < lo2 for (_, hi), (lo2, _) in itertools.pairwise(spans))  # merged
    runs.drop_below(1500)
    assert list(runs) == sorted(v for v in plain if v >= 1500)
    assert len(runs) == len([v for v in plain if v >= 1500])


def test_a_spill_behind_one_held_record_is_one_run_and_commits_at_once_when_it_ends():
    t = PartitionTracker(0)
    for off in range(200_000):
        t.add(off)
    for off in range(5, 200_000):  # a spill, acknowledged in order
        t.done(off)
    assert t.committable() == 0
    assert t.pending == 5
    assert t.finished_beyond() == [(5, 200_000)]  # one run, not 199,995 offsets
    assert set(decode_done(0, encode_done(0, t.finished_beyond()))) == set(range(5, 200_000))
    for off in (3, 1, 0, 4):
        t.done(off)
    assert t.committable() == 2
    t.done(2)
    assert t.committable() == 200_000
    assert t.pending == 0
    assert t.finished_beyond() == []


def test_offsets_never_read_do_not_hold_the_commit():
    t = PartitionTracker(0)
    for off in (0, 1, 2, 5, 6):  # 3 and 4 are not records (say, transaction markers)
        t.add(off)
    for off in (0, 1, 2):
        t.done(off)
    assert t.committable() == 5
    t.done(6)
    assert t.committable() == 5
    assert t.finished_beyond() == [(6, 7)]
    t.done(5)
    assert t.committable() == 7
    assert t.pending == 0
