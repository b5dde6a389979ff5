"""Unit tests of the SQLite journal and the reads built on it, on a temporary file."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from cdc_stream import sse
from cdc_stream.envelope import Event
from cdc_stream.hub import (
    START,
    EventFilter,
    Hub,
    JournalTailer,
    position_for_time,
    read_page,
)
from cdc_stream.journal import Appended, Journal
from cdc_stream.positions import Position

# An LSN above 2^63, where SQLite's signed integers would wrap without the
# offset the journal applies.
HIGH_LSN = (1 << 63) + 0x10
# Retention by age that keeps every event, whatever its commit time.
NO_AGE_LIMIT = float("inf")


def event(lsn: int, index: int, commit_time: float = 1000.0, table: str = "t") -> Event:
    position = Position(lsn, index)
    data = b'{"table":"%s","id":"%s"}' % (table.encode(), position.event_id.encode())
    return Event(
        position=position,
        schema="public",
        table=table,
        channel=f"{table}_changes",
        operation="INSERT",
        frame=sse.frame(data, position.event_id),
        commit_time=commit_time,
    )


def positions(events: list[Event]) -> list[tuple[int, int]]:
    return [tuple(e.position) for e in events]


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    return Journal(tmp_path / "journal.sqlite3")


def test_append_and_read_in_position_order(journal):
    journal.append([event(0x300, 0), event(0x100, 1), event(0x100, 0)])
    journal.append([event(0x200, 0)])

    read = journal.read_after(START, 10)

    assert positions(read) == [(0x100, 0), (0x100, 1), (0x200, 0), (0x300, 0)]
    assert read[0] == event(0x100, 0)
    assert journal.first_position() == Position(0x100, 0)
    assert journal.last_position() == Position(0x300, 0)


def test_append_skips_positions_already_held(journal):
    journal.append([event(0x100, 0), event(0x100, 1)])
    replacement = Event(Position(0x100, 1), "public", "t", "t_changes", "DELETE", b"x")

    journal.append([replacement, event(0x100, 2)])

    read = journal.read_after(START, 10)
    assert positions(read) == [(0x100, 0), (0x100, 1), (0x100, 2)]
    assert read[1] == event(0x100, 1)
    assert journal.stats().events == 3


def test_read_after_bounds_and_limit(journal):
    journal.append([event(0x100, i) for i in range(5)] + [event(0x200, 0)])

    assert positions(journal.read_after(Position(0x100, 1), 10)) == [
        (0x100, 2),
        (0x100, 3),
        (0x100, 4),
        (0x200, 0),
    ]
    assert positions(journal.read_after(Position(0x100, -1), 2)) == [
        (0x100, 0),
        (0x100, 1),
    ]
    assert positions(journal.read_after(START, 10, Position(0x100, 3))) == [
        (0x100, i) for i in range(4)
    ]
    assert journal.read_after(Position(0x200, 0), 10) == []
    assert journal.read_after(Position(0x100, 4), 10, Position(0x100, 4)) == []


def test_positions_above_signed_range_keep_order(journal):
    journal.append([event(HIGH_LSN, 0), event(0x100, 0), event(HIGH_LSN - 0x20, 7)])

    read = journal.read_after(START, 10)

    assert positions(read) == [(0x100, 0), (HIGH_LSN - 0x20, 7), (HIGH_LSN, 0)]
    assert journal.last_position() == Position(HIGH_LSN, 0)
    assert positions(journal.read_after(Position(HIGH_LSN - 0x20, 7), 10)) == [
        (HIGH_LSN, 0)
    ]


def test_horizon_moves_only_forward(journal):
    assert journal.horizon() is None

    journal.raise_horizon(Position(0x200, -1), 50.0)
    journal.raise_horizon(Position(0x100, 3), 60.0)
    journal.raise_horizon(Position(0x200, -1), 70.0)

    assert journal.horizon() == (Position(0x200, -1), 50.0)

    journal.raise_horizon(Position(0x200, 0), 80.0)

    assert journal.horizon() == (Position(0x200, 0), 80.0)
    assert journal.stats().horizon == Position(0x200, 0)


def test_prune_by_count_keeps_newest(journal):
    journal.append([event(0x100 * (n + 1), 0, 1000.0 + n) for n in range(10)])

    deleted = journal.prune(max_events=4, max_age_seconds=NO_AGE_LIMIT)

    assert deleted == 6
    assert positions(journal.read_after(START, 20)) == [
        (0x100 * n, 0) for n in range(7, 11)
    ]
    assert journal.horizon() == (Position(0x600, 0), 1005.0)
    assert journal.prune(max_events=4, max_age_seconds=NO_AGE_LIMIT) == 0


def test_prune_by_age(journal):
    now = time.time()
    journal.append(
        [
            event(0x100, 0, now - 300),
            event(0x100, 1, now - 300),
            event(0x200, 0, now - 100),
            event(0x300, 0, now - 5),
        ]
    )

    deleted = journal.prune(max_events=100, max_age_seconds=60)

    assert deleted == 3
    assert positions(journal.read_after(START, 10)) == [(0x300, 0)]
    assert journal.horizon() == (Position(0x200, 0), now - 100)


def test_prune_in_chunks_splits_transactions(journal):
    journal.append([event(0x100, i, 1000.0) for i in range(25)])
    journal.append([event(0x200, i, 1001.0) for i in range(5)])

    deleted = journal.prune(max_events=12, max_age_seconds=NO_AGE_LIMIT, chunk=7)

    assert deleted == 18
    assert journal.first_position() == Position(0x100, 18)
    assert journal.horizon() == (Position(0x100, 17), 1000.0)
    assert journal.stats().events == 12


def test_position_before_time(journal):
    journal.append([event(0x100, 0, 10.0), event(0x100, 1, 10.0)])
    journal.append([event(0x200, 0, 20.0), event(0x200, 1, 20.0)])
    journal.append([event(0x300, 0, 30.0)])

    assert journal.position_before_time(5.0) == Position(0x100, -1)
    assert journal.position_before_time(10.0) == Position(0x100, -1)
    assert journal.position_before_time(15.0) == Position(0x200, -1)
    assert journal.position_before_time(30.0) == Position(0x300, -1)
    assert journal.position_before_time(30.5) is None


def test_two_journals_on_one_file(tmp_path):
    writer = Journal(tmp_path / "shared.sqlite3")
    reader = Journal(tmp_path / "shared.sqlite3")
    writer.append([event(0x100, 0)])

    first = reader.read_after(START, 10)
    writer.append([event(0x200, 0)])
    writer.set_meta("slot", "orders")
    second = reader.read_after(START, 10)

    assert positions(first) == [(0x100, 0)]
    assert positions(second) == [(0x100, 0), (0x200, 0)]
    assert reader.get_meta("slot") == "orders"
    assert reader.get_meta("missing") is None


def test_locked_journal_raises_os_error(tmp_path):
    path = tmp_path / "locked.sqlite3"
    journal = Journal(path, busy_timeout=0.2)
    journal.append([event(0x100, 0)])
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(OSError, match="locked"):
            journal.append([event(0x200, 0)])
    finally:
        other.execute("ROLLBACK")
        other.close()

    journal.append([event(0x200, 0)])

    assert journal.last_position() == Position(0x200, 0)


def test_read_page_reports_pruned_history(journal):
    journal.append([event(0x100 * (n + 1), 0, 1000.0 + n) for n in range(6)])
    journal.prune(max_events=3, max_age_seconds=NO_AGE_LIMIT)

    lost = read_page(journal, Position(0x100, 0), 10)
    kept = read_page(journal, Position(0x300, 0), 10)
    bounded = read_page(journal, START, 10, Position(0x200, 0))

    assert lost.horizon == Position(0x300, 0)
    assert positions(lost.events) == [(0x400, 0), (0x500, 0), (0x600, 0)]
    assert kept.horizon is None
    assert positions(kept.events) == [(0x400, 0), (0x500, 0), (0x600, 0)]
    assert bounded.horizon == Position(0x300, 0)
    assert bounded.events == []


class PruneDuringRead(Journal):
    """A journal whose first read_after runs after a concurrent prune committed."""

    pruned = False

    def read_after(self, after, limit, upto=None):
        if not self.pruned:
            self.pruned = True
            self.prune(max_events=2, max_age_seconds=NO_AGE_LIMIT)
        return super().read_after(after, limit, upto)


def test_read_page_sees_prune_between_reads(tmp_path):
    journal = PruneDuringRead(tmp_path / "racing.sqlite3")
    journal.append([event(0x100 * (n + 1), 0, 1000.0 + n) for n in range(5)])

    page = read_page(journal, Position(0x100, 0), 10)

    assert page.horizon == Position(0x300, 0)
    assert positions(page.events) == [(0x400, 0), (0x500, 0)]


def test_position_for_time_at_horizon(journal):
    journal.append([event(0x100, i, 10.0) for i in range(4)])
    journal.append([event(0x200, 0, 20.0)])
    journal.prune(max_events=3, max_age_seconds=NO_AGE_LIMIT)

    assert journal.horizon() == (Position(0x100, 1), 10.0)
    assert position_for_time(journal, 9.0) == START
    assert position_for_time(journal, 10.0) == START
    assert position_for_time(journal, 15.0) == Position(0x200, -1)
    assert position_for_time(journal, 25.0) is None
    assert read_page(journal, START, 10).horizon == Position(0x100, 1)


def test_position_for_time_without_horizon(journal):
    journal.append([event(0x100, 0, 10.0)])

    assert position_for_time(journal, 1.0) == Position(0x100, -1)


async def test_tailer_tells_subscribers_of_pruned_events(journal):
    journal.append([event(0x100, 0, 1000.0)])
    hub = Hub(Position(0x100, 0))
    subscriber = hub.subscribe(EventFilter(tables=frozenset({"other"})), 100)
    journal.append([event(0x100 * (n + 2), 0, 1000.0 + n) for n in range(5)])
    journal.prune(max_events=2, max_age_seconds=NO_AGE_LIMIT)
    tailer = JournalTailer(journal, hub, poll_seconds=0.05)

    task = asyncio.create_task(tailer.run())
    try:
        assert await subscriber.wait(5.0)
        chunk = subscriber.drain()
    finally:
        task.cancel()

    (notice,) = sse_frames(chunk)
    assert notice.startswith(b"id: 0/400:0\ndata: ")
    assert b'"type":"history_lost"' in notice
    assert b'"requested":"0/100:0"' in notice
    assert b'"oldest_id":"0/500:0"' in notice
    assert hub.last_position == Position(0x600, 0)
    assert subscriber.delivered == Position(0x400, 0)


def sse_frames(chunk: bytes) -> list[bytes]:
    return [frame + b"\n\n" for frame in chunk.split(b"\n\n") if frame]


def test_append_returns_previous_position(journal):
    assert journal.append([event(0x100, 0), event(0x100, 1)]) == START
    assert journal.append([event(0x200, 0)]) == Position(0x100, 1)


def test_append_returns_none_unless_contiguous(journal):
    journal.append([event(0x200, 0)])

    assert journal.append([event(0x100, 0), event(0x300, 0)]) is None
    assert journal.append([event(0x200, 0), event(0x400, 0)]) is None
    assert journal.append([]) is None


def test_append_returns_none_below_horizon(journal):
    journal.append([event(0x100, 0)])
    journal.raise_horizon(Position(0x200, -1), 1000.0)

    assert journal.append([event(0x300, 0)]) is None
    assert journal.append([event(0x400, 0)]) == Position(0x300, 0)


async def test_tailer_publishes_appended_batch_from_memory(journal):
    hub = Hub(START)
    tailer = JournalTailer(journal, hub, poll_seconds=60.0)
    published: list[list[Event]] = []
    hub.on_publish = published.append
    batch = [event(0x100, 0), event(0x100, 1)]
    previous = journal.append(batch)
    assert previous is not None

    task = asyncio.create_task(tailer.run())
    try:
        tailer.wake(Appended(previous, batch))
        for _ in range(100):
            if hub.last_position == Position(0x100, 1):
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()

    assert hub.last_position == Position(0x100, 1)
    assert [positions(events) for events in published if events] == [
        [(0x100, 0), (0x100, 1)]
    ]
    assert any(events is batch for events in published)


async def test_tailer_reads_journal_before_later_batch(journal):
    # Another process appended 0x100; the batch kept in memory follows it,
    # so the tailer reads 0x100 from the journal first.
    journal.append([event(0x100, 0)])
    hub = Hub(START)
    tailer = JournalTailer(journal, hub, poll_seconds=60.0)
    published: list[Position] = []
    hub.on_publish = lambda events: published.extend(e.position for e in events)
    batch = [event(0x200, 0), event(0x200, 1)]
    previous = journal.append(batch)
    assert previous == Position(0x100, 0)

    task = asyncio.create_task(tailer.run())
    try:
        tailer.wake(Appended(previous, batch))
        for _ in range(100):
            if hub.last_position == Position(0x200, 1):
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()

    assert published == [Position(0x100, 0), Position(0x200, 0), Position(0x200, 1)]
