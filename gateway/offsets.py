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
from collections import deque
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


class PartitionTracker:
    """Offsets read from one partition and which of them are finished."""

    __slots__ = (
        "_done",
        "_last",
        "_pending",
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
        self._pending: deque[int] = deque()
        self._done: set[int] = set()
        self._last: int | None = None
        self.committed = committed
        self.committed_meta = ""  # the metadata committed with it
        self.moved_at = 0.0  # clock time the committed offset last moved (the watchdog)
        self.revoked = False
        self.skip: set[int] = set()  # finished before a restart, from commit metadata

    def add(self, offset: int) -> None:
        self._pending.append(offset)
        self._last = offset

    def done(self, offset: int) -> None:
        pending = self._pending
        if pending and pending[0] == offset:
            pending.popleft()
            done = self._done
            while pending and pending[0] in done:
                done.discard(pending.popleft())
        else:
            self._done.add(offset)

    @property
    def next_read(self) -> int | None:
        return None if self._last is None else self._last + 1

    @property
    def pending(self) -> int:
        return len(self._pending)

    def committable(self) -> int | None:
        """The offset to commit now (next record to process), or None if nothing read."""
        if self._pending:
            return self._pending[0]
        return None if self._last is None else self._last + 1

    def finished_beyond(self) -> list[int]:
        """Finished offsets above the committable one (for the commit metadata)."""
        return sorted(self._done)


def encode_done(base: int, done: list[int], limit: int = 4000) -> str:
    """Compact map of finished offsets above ``base``: a zlib'd bitmap, base64.

    ``done`` is in ascending order. Returns "" when there is nothing to record;
    bounded to ``limit`` characters (beyond that the tail is dropped: those records
    are simply sent again).
    """
    lo = bisect.bisect_right(done, base)
    n = len(done) - lo
    while n > 0:
        bits = bitmap(done, base, lo, lo + n)
        text = _META_PREFIX + base64.b85encode(zlib.compress(bits, 6)).decode()
        if len(text) <= limit:
            return text
        n //= 2
    return ""


def bitmap(values: list[int], origin: int, lo: int, hi: int) -> bytes:
    """Bit ``v - origin`` set for every ``v`` of ``values[lo:hi]`` (ascending, distinct).

    Runs of consecutive values are found by galloping and set a byte at a time: what
    is finished beyond a commit is mostly long runs (a spill, a lane that holds a few
    records back), up to a million of them behind a campaign, and the work is then
    per run, not per value. Nothing the size of the range is allocated but the
    bitmap itself.
    """
    bits = bytearray(((values[hi - 1] - origin) >> 3) + 1)
    i = lo
    if 2 * (hi - lo) < values[hi - 1] - origin:  # under half set: too few long runs
        for v in values[lo:hi]:
            r = v - origin
            bits[r >> 3] |= 1 << (r & 7)
        return bytes(bits)
    while i < hi:
        first = values[i]
        start = first - origin
        if i + 1 == hi or values[i + 1] != first + 1:  # alone: the scattered case, kept cheap
            bits[start >> 3] |= 1 << (start & 7)
            i += 1
            continue
        step, j = 1, i  # values[j] == first + (j - i): grow j by doubling, then narrow down
        while j + step < hi and values[j + step] == first + (j + step - i):
            j += step
            step *= 2
        while step > 1:
            step //= 2
            if j + step < hi and values[j + step] == first + (j + step - i):
                j += step
        end = values[j] - origin  # start..end are all set
        while start <= end and start & 7:
            bits[start >> 3] |= 1 << (start & 7)
            start += 1
        full = (end + 1 - start) >> 3
        if full > 0:
            bits[start >> 3 : (start >> 3) + full] = b"\xff" * full
            start += full << 3
        while start <= end:
            bits[start >> 3] |= 1 << (start & 7)
            start += 1
        i = j + 1
    return bytes(bits)


def decode_done(base: int, text: str | None) -> set[int]:
    """The offsets recorded by :func:`encode_done`; an empty set for anything else."""
    if not text or not text.startswith(_META_PREFIX):
        return set()
    try:
        bits = zlib.decompress(base64.b85decode(text[len(_META_PREFIX) :]))
    except (ValueError, zlib.error):
        return set()
    return {
        base + (i << 3) + b
        for i, byte in enumerate(bits)
        if byte
        for b in range(8)
        if byte >> b & 1
    }
