from __future__ import annotations

import random

import pytest

from gateway.offsets import PartitionTracker, decode_done, encode_done


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
    text = encode_done(100, done)
    assert text.startswith("gw1:")
    assert decode_done(100, text) == set(done)
    assert decode_done(100, "") == set()
    assert decode_done(100, "garbage") == set()
    assert encode_done(100, []) == ""


@pytest.mark.parametrize("density", [0.02, 0.5, 0.98, 1.0])
def test_done_map_round_trips_runs_and_scattered_offsets(density):
    rng = random.Random(density)
    done = [100 + i for i in range(1, 3000) if rng.random() < density]
    assert decode_done(100, encode_done(100, done, limit=100_000)) == set(done)


def test_done_map_ignores_offsets_at_or_below_base_and_drops_the_tail_past_the_limit():
    rng = random.Random(7)
    done = [90, 95, 100] + [100 + i for i in range(1, 40_000) if rng.random() < 0.5]
    assert decode_done(100, encode_done(100, done, limit=100_000)) == set(done[3:])
    text = encode_done(100, done, limit=1000)
    assert len(text) <= 1000
    short = decode_done(100, text)
    assert short  # a prefix of the finished offsets, not nothing
    assert len(short) < len(done) - 3  # the tail beyond the limit is dropped
    assert short == set(done[3 : 3 + len(short)])
