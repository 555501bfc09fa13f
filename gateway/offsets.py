"""Per-partition offset tracking for out-of-order completion.

Records of one partition finish in any order (lanes drain at different rates,
retries come back later). The committable offset is the first record not yet
finished: committing it says "everything before this is done", which is the
at-least-once contract. Finished records beyond it are remembered in the commit
metadata (:func:`encode_done`), so that after a crash or rebalance the next
owner can skip them instead of sending them again.
"""

from __future__ import annotations

import base64
import bisect
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

_META_PREFIX = "gw1:"


@dataclass(slots=True, eq=False)
class Origin:
    """Where one record came from, and what it was: what its outcome needs to end it.

    The tracker is the partition's at the time the record was read: after a
    revocation it is marked revoked, and finishing the record there commits nothing.
    """

    tracker: PartitionTracker
    offset: int
    key: bytes | None = None
    value: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int = 0
    # where the producer wrote it, when that is not where it was read (the spill topic)
    source: str | None = None

    @property
    def partition(self) -> int:
        return self.tracker.partition

    @property
    def topic(self) -> str:
        return self.tracker.topic

    def where(self) -> str:
        """``topic/partition/offset`` of the record as its producer wrote it."""
        return self.source or f"{self.tracker.topic}/{self.tracker.partition}/{self.offset}"

    @property
    def size(self) -> int:
        return len(self.value) if self.value else 0


class Runs:
    """A set of ints kept as sorted, disjoint runs ``[lo, hi)``.

    Offsets come in long runs: what is read of a partition is contiguous, and what
    finishes beyond the commit is mostly whole stretches (a spill of a million
    records behind the few a lane still holds). A run costs the same whatever its
    length, where a set costs some 60 bytes per offset. Adding at the end is O(1);
    elsewhere a bisection and at most one insertion.
    """

    __slots__ = ("_runs", "count")

    def __init__(self) -> None:
        self._runs: list[list[int]] = []
        self.count = 0  # how many ints

    def add(self, x: int) -> None:
        runs = self._runs
        if runs:
            last = runs[-1]
            if last[1] == x:
                last[1] = x + 1
                self.count += 1
                return
            if x > last[1]:
                runs.append([x, x + 1])
                self.count += 1
                return
        i = bisect.bisect_right(runs, x, key=_lo)  # runs[:i] start at or before x
        before = runs[i - 1] if i else None
        if before is not None and before[1] > x:
            return
        self.count += 1
        after = runs[i] if i < len(runs) else None
        if before is not None and before[1] == x:
            if after is not None and after[0] == x + 1:
                before[1] = after[1]
                del runs[i]
            else:
                before[1] = x + 1
        elif after is not None and after[0] == x + 1:
            after[0] = x
        else:
            runs.insert(i, [x, x + 1])

    def add_run(self, lo: int, hi: int) -> None:
        """Add ``lo..hi-1``, all above what is here (decoding a commit's map)."""
        runs = self._runs
        if runs and runs[-1][1] == lo:
            runs[-1][1] = hi
        else:
            runs.append([lo, hi])
        self.count += hi - lo

    def __contains__(self, x: int) -> bool:
        runs = self._runs
        i = bisect.bisect_right(runs, x, key=_lo)
        return i > 0 and runs[i - 1][1] > x

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        for lo, hi in self._runs:
            yield from range(lo, hi)

    def first(self) -> int | None:
        return self._runs[0][0] if self._runs else None

    def first_run_end(self, x: int) -> int | None:
        """The end of the first run if it holds ``x``, else None."""
        runs = self._runs
        if runs and runs[0][0] <= x < runs[0][1]:
            return runs[0][1]
        return None

    def drop_below(self, x: int) -> None:
        """Forget every int below ``x``."""
        runs = self._runs
        k = 0
        while k < len(runs) and runs[k][1] <= x:
            self.count -= runs[k][1] - runs[k][0]
            k += 1
        if k:
            del runs[:k]
        if runs and runs[0][0] < x:
            self.count -= x - runs[0][0]
            runs[0][0] = x

    def runs(self) -> list[tuple[int, int]]:
        return [(lo, hi) for lo, hi in self._runs]


def _lo(run: list[int]) -> int:
    return run[0]


class PartitionTracker:
    """Offsets read from one partition and which of them are finished."""

    __slots__ = (
        "_done",
        "_last",
        "_read",
        "committed",
        "committed_meta",
        "moved_at",
        "partition",
        "revoked",
        "skip",
        "topic",
    )

    def __init__(self, partition: int, committed: int | None = None, topic: str = "") -> None:
        self.partition = partition
        self.topic = topic
        self._read = Runs()  # read, from the first unfinished one on
        self._done = Runs()  # finished, beyond the first unfinished one
        self._last: int | None = None
        self.committed = committed
        self.committed_meta = ""  # the metadata committed with it
        self.moved_at = 0.0  # clock time the committed offset last moved (the watchdog)
        self.revoked = False
        self.skip = Runs()  # finished before a restart, from commit metadata

    def add(self, offset: int) -> None:
        self._read.add(offset)
        self._last = offset

    def done(self, offset: int) -> None:
        read = self._read
        if read.first() != offset:
            self._done.add(offset)
            return
        read.drop_below(offset + 1)
        done = self._done
        while (first := read.first()) is not None and (end := done.first_run_end(first)):
            read.drop_below(end)  # the first unfinished one had finished already
            done.drop_below(end)

    @property
    def next_read(self) -> int | None:
        return None if self._last is None else self._last + 1

    @property
    def pending(self) -> int:
        """Records read and not finished."""
        return self._read.count - self._done.count

    def committable(self) -> int | None:
        """The offset to commit now (next record to process), or None if nothing read."""
        first = self._read.first()
        if first is not None:
            return first
        return None if self._last is None else self._last + 1

    def finished_beyond(self) -> list[tuple[int, int]]:
        """Runs ``[lo, hi)`` of finished offsets above the committable one (commit metadata)."""
        return self._done.runs()


def encode_done(base: int, done: list[tuple[int, int]], limit: int = 4000) -> str:
    """Compact map of finished offsets above ``base``: a zlib'd bitmap, base64.

    ``done`` holds ascending, disjoint runs ``[lo, hi)``. Returns "" when there is
    nothing to record; bounded to ``limit`` characters (beyond that the tail is
    dropped: those records are simply sent again).
    """
    runs = [(max(lo, base + 1), hi) for lo, hi in done if hi > base + 1]
    n = len(runs)
    while n > 0:
        bits = bitmap(runs[:n], base)
        text = _META_PREFIX + base64.b85encode(zlib.compress(bits, 6)).decode()
        if len(text) <= limit:
            return text
        n //= 2
    return ""


def bitmap(runs: list[tuple[int, int]], origin: int) -> bytes:
    """Bit ``v - origin`` set for every ``v`` of the ascending runs ``[lo, hi)``.

    Whole bytes of a run are set at once: a million-offset run costs a slice, not a
    million bit operations.
    """
    bits = bytearray(((runs[-1][1] - 1 - origin) >> 3) + 1)
    for lo, hi in runs:
        start, end = lo - origin, hi - origin  # bits start..end-1
        while start < end and start & 7:
            bits[start >> 3] |= 1 << (start & 7)
            start += 1
        full = (end - start) >> 3
        if full > 0:
            bits[start >> 3 : (start >> 3) + full] = b"\xff" * full
            start += full << 3
        while start < end:
            bits[start >> 3] |= 1 << (start & 7)
            start += 1
    return bytes(bits)


def decode_done(base: int, text: str | None) -> Runs:
    """The offsets recorded by :func:`encode_done`; empty for anything else."""
    runs = Runs()
    if not text or not text.startswith(_META_PREFIX):
        return runs
    try:
        bits = zlib.decompress(base64.b85decode(text[len(_META_PREFIX) :]))
    except (ValueError, zlib.error):
        return runs
    for i, byte in enumerate(bits):
        if byte == 0xFF:
            at = base + (i << 3)
            runs.add_run(at, at + 8)
        elif byte:
            for b in range(8):
                if byte >> b & 1:
                    at = base + (i << 3) + b
                    runs.add_run(at, at + 1)
    return runs
