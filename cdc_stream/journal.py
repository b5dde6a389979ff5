"""The journal: an ordered, durable log of encoded events in SQLite.

One process, the slot holder, appends each batch of events before the slot's
flush LSN is confirmed, so a crash re-delivers from the slot and the journal
drops by position what it already holds. Every process, the holder included,
fans events out by tailing the journal, which makes the journal the single
order that clients see, in one process or in `hypercorn -w N`.

The horizon is the newest position whose history may be incomplete: events up
to it were pruned, or came before the journal first attached to the slot. A
client resuming from before the horizon gets a history_lost event.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Concatenate, NamedTuple, ParamSpec, TypeVar

from .envelope import Event
from .positions import Position

logger = logging.getLogger(__name__)

# SQLite integers are signed 64-bit; shifting LSNs by 2^63 keeps their order
# for the whole unsigned range.
_LSN_OFFSET = 1 << 63

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    commit_lsn INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    commit_time REAL NOT NULL,
    channel TEXT NOT NULL,
    schema_name TEXT NOT NULL,
    table_name TEXT NOT NULL,
    operation TEXT NOT NULL,
    frame BLOB NOT NULL,
    PRIMARY KEY (commit_lsn, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_by_time ON events (commit_time);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_COLUMNS = (
    "commit_lsn, idx, commit_time, channel, schema_name, table_name, operation, frame"
)


# The position before every event, which an empty journal's tailers start after.
_START = Position(0, -1)


class Appended(NamedTuple):
    """A committed append: the journal contains `events` right after `previous`.

    No other event lies between `previous` and the first of `events`, so a
    tailer that published up to `previous` can publish `events` from memory.
    """

    previous: Position
    events: list[Event]


@dataclass(frozen=True)
class JournalStats:
    """Range and size of the journal."""

    oldest: Position | None
    newest: Position | None
    events: int
    size_bytes: int
    horizon: Position | None


def _to_row(event: Event) -> tuple[object, ...]:
    return (
        event.position.commit_lsn - _LSN_OFFSET,
        event.position.index,
        event.commit_time,
        event.channel,
        event.schema,
        event.table,
        event.operation,
        event.frame,
    )


def _to_event(row: tuple[object, ...]) -> Event:
    lsn, index, commit_time, channel, schema, table, operation, frame = row
    return Event(
        position=Position(int(lsn) + _LSN_OFFSET, int(index)),  # type: ignore[call-overload]
        schema=str(schema),
        table=str(table),
        channel=str(channel),
        operation=str(operation),
        frame=bytes(frame),  # type: ignore[arg-type]
        commit_time=float(commit_time),  # type: ignore[arg-type]
    )


def _key(position: Position) -> tuple[int, int]:
    return position.commit_lsn - _LSN_OFFSET, position.index


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _storage_errors(
    method: Callable[Concatenate[Journal, _P], _R],
) -> Callable[Concatenate[Journal, _P], _R]:
    """Raise SQLite's operational errors (locked, disk full, I/O) as OSError.

    Journal callers treat OSError as storage that is unavailable for now, so
    the replication reader reconnects without confirming and the tailer
    retries.
    """

    @functools.wraps(method)
    def wrapper(self: Journal, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.OperationalError as error:
            raise OSError(f"journal {str(self.path)!r}: {error}") from error

    return wrapper


class Journal:
    """SQLite journal of one slot; each thread gets its own connection.

    `busy_timeout` is how long, in seconds, a call waits for another
    connection's write lock before it fails with OSError.
    """

    def __init__(self, path: Path, busy_timeout: float = 30.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._connection() as conn:
            conn.executescript(_SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None
            )
            # Takes effect only on a new journal, before its first table and
            # before WAL mode. A 16 KiB page fits about 20 events of 700 bytes,
            # so an append touches fewer pages than with the 4 KiB default.
            conn.execute("PRAGMA page_size=16384")
            conn.execute("PRAGMA journal_mode=WAL")
            # The slot is confirmed once an append returns, so the append
            # must survive a power loss too. FULL syncs the WAL file at each
            # commit, and NORMAL only at checkpoints.
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @_storage_errors
    def append(self, events: Iterable[Event]) -> Position | None:
        """Store events in one transaction; positions already held are skipped.

        Events must be in position order. Returns the newest position stored
        before the append when every event came after it and after the
        horizon, so that the journal now contains exactly these events after
        it. Returns None otherwise, and for no events.
        """
        rows = [_to_row(event) for event in events]
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read under the write lock, so no other writer can come between.
            previous = self._frontier() if rows else None
            conn.executemany(
                f"INSERT OR IGNORE INTO events ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                rows,
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        if previous is None or rows[0][:2] <= _key(previous):
            return None
        return previous

    def _frontier(self) -> Position | None:
        """Return the newest event position, or None if the horizon is newer."""
        last = self.last_position() or _START
        horizon = self.horizon()
        if horizon is not None and horizon[0] > last:
            return None
        return last

    @_storage_errors
    def read_after(
        self, after: Position, limit: int, upto: Position | None = None
    ) -> list[Event]:
        """Return up to `limit` events after `after`, up to `upto` inclusive."""
        query = f"SELECT {_COLUMNS} FROM events WHERE (commit_lsn, idx) > (?, ?)"
        params: list[object] = list(_key(after))
        if upto is not None:
            query += " AND (commit_lsn, idx) <= (?, ?)"
            params.extend(_key(upto))
        query += " ORDER BY commit_lsn, idx LIMIT ?"
        params.append(limit)
        return [_to_event(row) for row in self._connection().execute(query, params)]

    @_storage_errors
    def last_position(self) -> Position | None:
        row = (
            self._connection()
            .execute(
                "SELECT commit_lsn, idx FROM events "
                "ORDER BY commit_lsn DESC, idx DESC LIMIT 1"
            )
            .fetchone()
        )
        return None if row is None else Position(row[0] + _LSN_OFFSET, row[1])

    @_storage_errors
    def first_position(self) -> Position | None:
        row = (
            self._connection()
            .execute(
                "SELECT commit_lsn, idx FROM events ORDER BY commit_lsn, idx LIMIT 1"
            )
            .fetchone()
        )
        return None if row is None else Position(row[0] + _LSN_OFFSET, row[1])

    @_storage_errors
    def position_before_time(self, moment: float) -> Position | None:
        """Return the position just before the first event committed at `moment`.

        Events committed later count too; None means no event is that recent.
        """
        row = (
            self._connection()
            .execute(
                "SELECT commit_lsn, idx FROM events WHERE commit_time >= ? "
                "ORDER BY commit_lsn, idx LIMIT 1",
                (moment,),
            )
            .fetchone()
        )
        if row is None:
            return None
        return Position(row[0] + _LSN_OFFSET, row[1] - 1)

    @_storage_errors
    def get_meta(self, key: str) -> str | None:
        row = (
            self._connection()
            .execute("SELECT value FROM meta WHERE key = ?", (key,))
            .fetchone()
        )
        return None if row is None else str(row[0])

    @_storage_errors
    def set_meta(self, key: str, value: str) -> None:
        self._connection().execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    @_storage_errors
    def horizon(self) -> tuple[Position, float] | None:
        """Return the horizon position and its commit time, or None if unset."""
        value = self.get_meta("horizon")
        if value is None:
            return None
        lsn, index, moment = value.split(" ")
        return Position(int(lsn), int(index)), float(moment)

    @_storage_errors
    def raise_horizon(self, position: Position, moment: float) -> None:
        """Move the horizon forward to `position`; it never moves back."""
        current = self.horizon()
        if current is None or position > current[0]:
            self.set_meta("horizon", f"{position.commit_lsn} {position.index} {moment}")

    @_storage_errors
    def prune(self, max_events: int, max_age_seconds: float, chunk: int = 5000) -> int:
        """Delete events past the retention limits, in short transactions.

        Each transaction deletes the oldest events up to the last one past a
        limit, and raises the horizon to it.
        """
        conn = self._connection()
        deleted = 0
        cutoff = time.time() - max_age_seconds
        while True:
            (count,) = conn.execute("SELECT count(*) FROM events").fetchone()
            excess = max(0, count - max_events)
            rows = conn.execute(
                "SELECT commit_lsn, idx, commit_time FROM events "
                "ORDER BY commit_lsn, idx LIMIT ?",
                (chunk,),
            ).fetchall()
            doomed = [
                row for n, row in enumerate(rows) if n < excess or row[2] < cutoff
            ]
            if not doomed:
                return deleted

            last = doomed[-1]
            conn.execute("BEGIN IMMEDIATE")
            try:
                cursor = conn.execute(
                    "DELETE FROM events WHERE (commit_lsn, idx) <= (?, ?)",
                    (last[0], last[1]),
                )
                self.raise_horizon(Position(last[0] + _LSN_OFFSET, last[1]), last[2])
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            deleted += cursor.rowcount
            if len(doomed) < len(rows):
                return deleted

    @_storage_errors
    def stats(self) -> JournalStats:
        (count,) = self._connection().execute("SELECT count(*) FROM events").fetchone()
        size = sum(
            path.stat().st_size
            for path in (self.path, Path(f"{self.path}-wal"))
            if path.exists()
        )
        horizon = self.horizon()
        return JournalStats(
            oldest=self.first_position(),
            newest=self.last_position(),
            events=count,
            size_bytes=size,
            horizon=None if horizon is None else horizon[0],
        )
