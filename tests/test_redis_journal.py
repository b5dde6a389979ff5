"""Tests of the Redis Streams journal against a private redis-server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from cdc_stream.config import Settings
from cdc_stream.envelope import Event
from cdc_stream.journal import Journal
from cdc_stream.journals import open_journal
from cdc_stream.positions import Position
from cdc_stream.redis_journal import (
    JournalUnavailableError,
    RedisJournal,
    describe_redis_url,
    id_at_or_before,
)
from redis_server import RedisServer

NOW = 1_700_000_000.0


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def journal(redis_server: RedisServer) -> Iterator[RedisJournal]:
    journal = RedisJournal(redis_server.url, "test_slot")
    yield journal
    journal.disconnect()


def event(
    lsn: int,
    index: int,
    commit_time: float = NOW,
    frame: bytes | None = None,
    table: str = "orders",
) -> Event:
    position = Position(lsn, index)
    return Event(
        position=position,
        schema="public",
        table=table,
        channel=f"{table}_changes",
        operation="INSERT",
        frame=frame or f"id: {position.event_id}\ndata: {{}}\n\n".encode(),
        commit_time=commit_time,
    )


def positions(events: list[Event]) -> list[Position]:
    return [item.position for item in events]


def test_append_then_read_in_order(journal):
    stored = [event(100, 0), event(100, 1), event(250, 0), event(2**40, 7)]

    journal.append(stored)
    read = journal.read_after(Position(0, -1), 100)

    assert read == stored
    assert journal.first_position() == Position(100, 0)
    assert journal.last_position() == Position(2**40, 7)


def test_append_keeps_binary_frames_and_names(journal):
    frame = b'id: 0/64:0\ndata: {"v": "\xc3\xa9\\u0000"}\n\n'
    stored = Event(
        Position(100, 0), 'My "Schema"', "order items", "", "UPDATE", frame, NOW
    )

    journal.append([stored])
    (read,) = journal.read_after(Position(0, -1), 10)

    assert read == stored


def test_empty_journal_reads(journal):
    assert journal.read_after(Position(0, -1), 10) == []
    assert journal.first_position() is None
    assert journal.last_position() is None
    assert journal.horizon() is None
    assert journal.position_before_time(0.0) is None


def test_redelivered_events_are_skipped(journal):
    journal.append([event(100, 0), event(100, 1), event(200, 0)])

    journal.append(
        [
            event(100, 1, frame=b"redelivered"),
            event(200, 0, frame=b"redelivered"),
            event(200, 1),
            event(300, 0),
        ]
    )
    read = journal.read_after(Position(0, -1), 100)

    assert positions(read) == [
        Position(100, 0),
        Position(100, 1),
        Position(200, 0),
        Position(200, 1),
        Position(300, 0),
    ]
    assert b"redelivered" not in [item.frame for item in read]


def test_older_batch_is_skipped_whole(journal):
    journal.append([event(500, 0)])

    journal.append([event(100, 0), event(200, 0), event(500, 0)])

    assert positions(journal.read_after(Position(0, -1), 100)) == [Position(500, 0)]


def test_events_below_trimmed_ids_are_skipped(journal):
    journal.append([event(100, 0), event(200, 0)])
    assert journal.prune(max_events=10, max_age_seconds=1.0) == 2
    assert journal.last_position() is None

    journal.append([event(150, 0), event(200, 0), event(300, 0)])

    assert positions(journal.read_after(Position(0, -1), 100)) == [Position(300, 0)]


def test_concurrent_overlapping_appends_store_one_copy(journal):
    batches = [
        [event(lsn, index) for lsn in range(1000, 1400, 8) for index in range(3)]
        for _ in range(4)
    ]
    barrier = threading.Barrier(len(batches))
    errors: list[BaseException] = []

    def append(batch: list[Event]) -> None:
        barrier.wait()
        try:
            for start in range(0, len(batch), 7):
                journal.append(batch[start : start + 7])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=append, args=(b,)) for b in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    read = journal.read_after(Position(0, -1), 10_000)
    assert errors == []
    assert positions(read) == positions(batches[0])


def test_read_after_is_exclusive(journal):
    journal.append([event(100, 0), event(100, 1), event(200, 0), event(200, 1)])

    after_first = journal.read_after(Position(100, 0), 10)
    from_lsn = journal.read_after(Position(200, -1), 10)
    between = journal.read_after(Position(150, 3), 10)

    assert positions(after_first) == [
        Position(100, 1),
        Position(200, 0),
        Position(200, 1),
    ]
    assert positions(from_lsn) == [Position(200, 0), Position(200, 1)]
    assert positions(between) == [Position(200, 0), Position(200, 1)]
    assert journal.read_after(Position(200, 1), 10) == []


def test_read_after_upto_and_limit(journal):
    journal.append([event(100, 0), event(100, 1), event(200, 0), event(200, 1)])

    upto_event = journal.read_after(Position(0, -1), 10, upto=Position(200, 0))
    upto_lsn = journal.read_after(Position(0, -1), 10, upto=Position(200, -1))
    limited = journal.read_after(Position(100, 0), 2)
    nothing = journal.read_after(Position(0, -1), 10, upto=Position(0, -1))

    assert positions(upto_event) == [
        Position(100, 0),
        Position(100, 1),
        Position(200, 0),
    ]
    assert positions(upto_lsn) == [Position(100, 0), Position(100, 1)]
    assert positions(limited) == [Position(100, 1), Position(200, 0)]
    assert nothing == []


def test_stream_ids_of_positions():
    assert id_at_or_before(Position(100, 2)) == "100-2"
    assert id_at_or_before(Position(100, -1)) == f"99-{2**64 - 1}"
    assert id_at_or_before(Position(0, -1)) == "0-0"


def test_blocking_read_wakes_on_append(journal):
    journal.append([event(100, 0)])
    writer = threading.Timer(0.3, journal.append, args=([event(200, 0)],))

    started = time.monotonic()
    writer.start()
    read = journal.read_after_blocking(Position(100, 0), 10, timeout_seconds=5.0)
    elapsed = time.monotonic() - started
    writer.join()

    assert positions(read) == [Position(200, 0)]
    assert elapsed < 3.0


def test_blocking_read_times_out_empty(journal):
    journal.append([event(100, 0)])

    started = time.monotonic()
    read = journal.read_after_blocking(Position(100, 0), 10, timeout_seconds=0.3)
    elapsed = time.monotonic() - started

    assert read == []
    assert 0.25 <= elapsed < 3.0


def test_blocking_read_returns_held_events_at_once(journal):
    journal.append([event(100, 0), event(200, 0), event(300, 0)])

    read = journal.read_after_blocking(Position(100, -1), 2, timeout_seconds=5.0)

    assert positions(read) == [Position(100, 0), Position(200, 0)]


def test_position_before_time(journal):
    journal.append(
        [
            event(100, 0, NOW),
            event(100, 1, NOW),
            event(200, 0, NOW + 10),
            event(300, 0, NOW + 20),
        ]
    )

    assert journal.position_before_time(NOW - 5) == Position(100, -1)
    assert journal.position_before_time(NOW) == Position(100, -1)
    assert journal.position_before_time(NOW + 0.001) == Position(200, -1)
    assert journal.position_before_time(NOW + 20) == Position(300, -1)
    assert journal.position_before_time(NOW + 21) is None


def test_position_before_time_with_clock_going_back(journal):
    # Commit times may decrease slightly in commit order. The result is the
    # first transaction in commit order that committed at the time or later.
    journal.append(
        [
            event(100, 0, NOW + 0.006),
            event(200, 0, NOW + 0.005),
            event(300, 0, NOW + 0.007),
        ]
    )

    assert journal.position_before_time(NOW + 0.004) == Position(100, -1)
    assert journal.position_before_time(NOW + 0.0055) == Position(100, -1)
    assert journal.position_before_time(NOW + 0.0065) == Position(300, -1)


def test_position_before_time_keeps_microseconds(journal):
    base = 1_712_345_678.123456
    journal.append([event(100, 0, base), event(200, 0, base + 0.000002)])

    assert journal.position_before_time(base + 0.000001) == Position(200, -1)


def test_split_transaction_indexed_once(journal):
    journal.append([event(100, 0, NOW), event(100, 1, NOW)])
    journal.append([event(100, 2, NOW), event(200, 0, NOW + 1)])

    assert journal.position_before_time(NOW) == Position(100, -1)
    assert journal.position_before_time(NOW + 1) == Position(200, -1)


def test_horizon_only_moves_forward(journal):
    assert journal.horizon() is None

    journal.raise_horizon(Position(100, -1), NOW)
    journal.raise_horizon(Position(50, 3), NOW + 5)
    journal.raise_horizon(Position(100, -1), NOW + 5)
    unchanged = journal.horizon()
    journal.raise_horizon(Position(100, 0), NOW + 1)
    raised = journal.horizon()
    journal.raise_horizon(Position(2**63, 2), NOW - 100)
    later = journal.horizon()

    assert unchanged == (Position(100, -1), NOW)
    assert raised == (Position(100, 0), NOW + 1)
    assert later == (Position(2**63, 2), NOW + 1)


def test_prune_by_count_raises_horizon(journal):
    stored = [event(100 * n, 0, NOW + n) for n in range(1, 11)]
    journal.append(stored)

    deleted = journal.prune(max_events=4, max_age_seconds=10**10)

    assert deleted == 6
    assert journal.first_position() == Position(700, 0)
    assert journal.horizon() == (Position(600, 0), NOW + 6)
    assert positions(journal.read_after(Position(0, -1), 100)) == positions(stored[6:])


def test_prune_by_age(journal, redis_server):
    now = time.time()
    journal.append(
        [
            event(100, 0, now - 7200),
            event(100, 1, now - 7200),
            event(200, 0, now - 3700),
            event(300, 0, now - 10),
            event(400, 0, now),
        ]
    )

    deleted = journal.prune(max_events=1000, max_age_seconds=3600)

    assert deleted == 3
    assert journal.first_position() == Position(300, 0)
    horizon = journal.horizon()
    assert horizon is not None
    assert horizon[0] == Position(200, 0)
    assert horizon[1] == pytest.approx(now - 3700)
    times = redis_server.client().zrange(journal.times_key, 0, -1)
    assert [int(member) for member in times] == [300, 400]


def test_prune_in_chunks(journal):
    journal.append([event(10 + n, 0, NOW) for n in range(25)])

    deleted = journal.prune(max_events=5, max_age_seconds=10**10, chunk=4)

    assert deleted == 20
    assert journal.first_position() == Position(30, 0)
    assert journal.horizon() == (Position(29, 0), NOW)


def test_prune_within_limits_deletes_nothing(journal):
    journal.append([event(100, 0, time.time())])

    assert journal.prune(max_events=10, max_age_seconds=3600) == 0
    assert journal.horizon() is None


def test_prune_mid_transaction_keeps_its_time(journal):
    journal.append([event(100, n, NOW) for n in range(4)] + [event(200, 0, NOW + 1)])

    assert journal.prune(max_events=3, max_age_seconds=10**10) == 2

    assert journal.first_position() == Position(100, 2)
    assert journal.position_before_time(NOW) == Position(100, -1)


def test_horizon_not_lowered_by_prune(journal):
    journal.raise_horizon(Position(1000, -1), NOW + 50)
    journal.append([event(1000, 0, NOW), event(2000, 0, NOW)])

    journal.prune(max_events=1, max_age_seconds=10**10)

    assert journal.horizon() == (Position(1000, 0), NOW + 50)


def test_meta_round_trip(journal):
    assert journal.get_meta("database") is None

    journal.set_meta("database", "7301/app")
    journal.set_meta("database", "7302/app")

    assert journal.get_meta("database") == "7302/app"


def test_stats(journal):
    journal.append([event(100, 0), event(200, 0), event(300, 0)])
    journal.prune(max_events=2, max_age_seconds=10**10)

    stats = journal.stats()

    assert stats.events == 2
    assert stats.oldest == Position(200, 0)
    assert stats.newest == Position(300, 0)
    assert stats.horizon == Position(100, 0)
    assert stats.size_bytes > 0


def test_keys_include_slot_name(redis_server, journal):
    other = RedisJournal(redis_server.url, "other_slot")
    journal.append([event(100, 0)])
    other.append([event(50, 0)])

    assert positions(journal.read_after(Position(0, -1), 10)) == [Position(100, 0)]
    assert positions(other.read_after(Position(0, -1), 10)) == [Position(50, 0)]
    assert journal.events_key == "cdc-stream:test_slot:events"
    assert sorted(redis_server.client().keys("cdc-stream:other_slot:*")) == [
        b"cdc-stream:other_slot:events",
        b"cdc-stream:other_slot:times",
    ]
    other.disconnect()


def test_unreachable_redis_raises_os_error(redis_server):
    journal = RedisJournal(
        f"redis://reader:s3cret-word@127.0.0.1:{redis_server.port}/0", "test_slot"
    )
    redis_server.stop()

    with pytest.raises(JournalUnavailableError) as caught:
        journal.append([event(100, 0)])

    assert isinstance(caught.value, OSError)
    assert "s3cret-word" not in str(caught.value)
    assert f"127.0.0.1:{redis_server.port}" in str(caught.value)
    with pytest.raises(OSError):
        journal.read_after(Position(0, -1), 10)
    with pytest.raises(OSError):
        journal.get_meta("database")


def test_journal_recovers_after_restart(redis_server, journal):
    journal.append([event(100, 0)])
    redis_server.stop()
    with pytest.raises(JournalUnavailableError):
        journal.last_position()

    redis_server.start()
    journal.append([event(200, 0)])

    assert positions(journal.read_after(Position(0, -1), 10)) == [Position(200, 0)]


def test_describe_url_hides_credentials():
    assert (
        describe_redis_url("redis://app:pw@cache.internal:6380/2")
        == "redis://cache.internal:6380/2"
    )
    assert describe_redis_url("rediss://:pw@10.1.2.3") == "rediss://10.1.2.3:6379/0"
    assert describe_redis_url("unix:///run/redis.sock?db=1") == "unix:///run/redis.sock"
    assert "pw" not in describe_redis_url("redis://u:pw@host:notaport/0")


def test_open_journal_selects_backend(redis_server, tmp_path):
    redis_settings = Settings(
        database_url="postgresql://app@127.0.0.1/app",
        slot_name="orders_feed",
        journal_backend="redis",
        redis_url=redis_server.url,
    )
    sqlite_settings = Settings(
        database_url="postgresql://app@127.0.0.1/app",
        journal_path=str(tmp_path / "journal.sqlite3"),
    )

    redis_journal = open_journal(redis_settings)
    sqlite_journal = open_journal(sqlite_settings)

    assert isinstance(redis_journal, RedisJournal)
    assert redis_journal.events_key == "cdc-stream:orders_feed:events"
    assert isinstance(sqlite_journal, Journal)
    sqlite_journal.close()
