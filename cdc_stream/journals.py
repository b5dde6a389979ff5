"""The journal interface shared by the SQLite and Redis backends.

The replication thread appends, prunes and keeps metadata. The app and the
journal tailer read, each call in a worker thread. A backend raises `OSError`
when its storage is unreachable, so the replication reader reconnects with
backoff instead of confirming the slot past what was stored.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from .config import Settings
from .envelope import Event
from .journal import Journal, JournalStats
from .positions import Position
from .redis_journal import RedisJournal


class EventJournal(Protocol):
    """An ordered log of encoded events keyed by position."""

    @property
    def path(self) -> str | os.PathLike[str]:
        """Location of the journal for messages, without credentials."""
        ...

    def append(self, events: Iterable[Event]) -> Position | None:
        """Store events in position order; positions already held are skipped.

        May return the newest position stored before the append when the
        journal now contains exactly these events after it (see
        `journal.Appended`). None means unknown.
        """
        ...

    def read_after(
        self, after: Position, limit: int, upto: Position | None = None
    ) -> list[Event]: ...

    def last_position(self) -> Position | None: ...

    def first_position(self) -> Position | None: ...

    def position_before_time(self, moment: float) -> Position | None: ...

    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...

    def horizon(self) -> tuple[Position, float] | None: ...

    def raise_horizon(self, position: Position, moment: float) -> None: ...

    def prune(
        self, max_events: int, max_age_seconds: float, chunk: int = 5000
    ) -> int: ...

    def stats(self) -> JournalStats: ...

    def close(self) -> None: ...


class BlockingJournal(EventJournal, Protocol):
    """A journal that can wait for new events, so its tailer does not poll."""

    def read_after_blocking(
        self, after: Position, limit: int, timeout_seconds: float
    ) -> list[Event]: ...


def open_journal(settings: Settings) -> EventJournal:
    """Open the journal that `[journal] backend` selects."""
    if settings.journal_backend == "redis":
        return RedisJournal(settings.redis_url, settings.slot_name)
    return Journal(Path(settings.journal_path))
