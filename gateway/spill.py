"""Spill-over: where an app's records wait when its lane is full.

Each lane holds at most its *read-ahead* in memory: about ``rate x
lane_horizon_s`` records. A normal or low-priority record of an app whose lane
is full goes to the spill topic instead, and so does every later one of that
app while it has records there, so that the app's order is kept. The original
offset counts as finished once the spill write is acknowledged: intake reads
on, and the apps behind the campaign in its partition are not held.

Spilled records of one app go to one spill partition, chosen among the spill
partitions this replica owns (so that the replica that spills is the one that
takes them back) and, where it can, one that no other spilling app uses. A
spill partition is read only while it is *wanted*: while the app whose record
is next in it has room in its lane, or while that app is not known yet (after
an assignment or a restart). One read to its end, with none of the replica's
spilled records on their way to it, gets a short look now and then (intake's
``SPILL_QUIET_S``), for a previous owner's late write. When
the next record belongs to an app whose lane is full, reading stops there
(the consumer seeks back to it) until that lane has drained to half its
read-ahead, and then fills it again in one fetch: none is written twice, and a
lane is refilled in batches rather than one fetch round trip per record.

Apps that share a spill partition must not wait for each other: while another
app with records in the partition wants more, the full app's records met on
the way are taken all the same, up to twice its read-ahead (a lane's read-ahead
is at most its part of half the record budget, so memory stays within the
budget); only past that does reading stop at it.

This module keeps that state; it does no I/O.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence


class SpillState:
    """Which apps have spilled records, where, and which spill partitions are wanted."""

    __slots__ = ("_wants_more", "head", "outstanding", "partition_of", "spilled", "taken")

    def __init__(self, wants_more: Callable[[str], bool]) -> None:
        self._wants_more = wants_more
        self.outstanding: dict[str, int] = {}  # app -> spilled records not taken back yet
        self.partition_of: dict[str, int] = {}  # app -> its spill partition
        self.head: dict[int, str | None] = {}  # spill partition -> app of its next record
        self.spilled = 0
        self.taken = 0

    def spilling(self, app_id: str) -> bool:
        return self.outstanding.get(app_id, 0) > 0

    def choose(self, app_id: str, owned: Sequence[int]) -> int | None:
        """The spill partition for ``app_id``'s next spilled record (None: none owned).

        ``owned`` is in ascending order. An app keeps its partition while it has
        records there; a new one gets a partition no other spilling app uses where
        there is one (hashing picks among the free ones, so a restart tends to pick
        the same).
        """
        current = self.partition_of.get(app_id)
        if current is not None and current in owned:
            return current
        if not owned:
            return None
        used = {p for app, p in self.partition_of.items() if self.spilling(app)}
        free = [p for p in owned if p not in used] or list(owned)
        chosen = free[zlib.crc32(app_id.encode()) % len(free)]
        self.partition_of[app_id] = chosen
        return chosen

    def note_spilled(self, app_id: str) -> None:
        self.outstanding[app_id] = self.outstanding.get(app_id, 0) + 1
        self.spilled += 1

    def note_taken(self, app_id: str, partition: int) -> None:
        """A spilled record of ``app_id`` was read back from ``partition``."""
        left = self.outstanding.get(app_id, 0) - 1
        if left > 0:
            self.outstanding[app_id] = left
        else:
            self.outstanding.pop(app_id, None)
        self.partition_of.setdefault(app_id, partition)
        self.taken += 1

    def blocked(self, partition: int, app_id: str) -> None:
        """Reading ``partition`` stopped at a record of ``app_id``, whose lane is full."""
        self.head[partition] = app_id
        self.partition_of.setdefault(app_id, partition)

    def read_on(self, partition: int) -> None:
        """``partition`` was read past its head: its next app is not known."""
        self.head[partition] = None

    def wanted(self, partition: int, hungry: set[int] | None = None) -> bool:
        """Worth reading: its next app wants more, or another app waiting there does.

        ``hungry`` is :meth:`hungry` when the caller asks for many partitions at once.
        """
        head = self.head.get(partition)
        if head is None or self._wants_more(head):
            return True
        if hungry is not None:
            return partition in hungry
        return self.others_want(partition, head)

    def hungry(self) -> set[int]:
        """The partitions where an app with spilled records waiting wants more."""
        wants_more = self._wants_more
        return {p for app, p in self.partition_of.items() if self.spilling(app) and wants_more(app)}

    def occupied(self) -> set[int]:
        """The partitions where this replica's spilled records wait (written or on their way)."""
        return {p for app, p in self.partition_of.items() if self.spilling(app)}

    def others_want(self, partition: int, app_id: str) -> bool:
        """Another app with spilled records waiting in ``partition`` wants more."""
        wants_more = self._wants_more
        return any(
            p == partition and app != app_id and self.spilling(app) and wants_more(app)
            for app, p in self.partition_of.items()
        )

    def revoked(self, partitions: Iterable[int]) -> None:
        """Spill partitions went to another replica: their apps start afresh here."""
        gone = set(partitions)
        for p in gone:
            self.head.pop(p, None)
        for app, p in list(self.partition_of.items()):
            if p in gone:
                del self.partition_of[app]
                self.outstanding.pop(app, None)
