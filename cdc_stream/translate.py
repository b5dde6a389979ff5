"""Turn the stream of wal2json messages into change events (pure, stateful).

The translator numbers the changes of each transaction to give them positions,
skips positions it has already produced (the slot re-delivers everything after
the confirmed LSN when the connection is re-established), and reports the LSN
that may be confirmed once a transaction's events have been handed on.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from .config import Settings
from .decoding import Begin, Commit, LogicalMessage, RowChange, decode_message
from .envelope import Event, change_event, commit_epoch, format_commit_time
from .errors import DecodeError
from .positions import Position

logger = logging.getLogger(__name__)


class Output(NamedTuple):
    """What one wal2json message produced: an event, an LSN to confirm, or both."""

    event: Event | None
    confirm_lsn: int | None


_NOTHING = Output(None, None)


class Translator:
    """Translate wal2json messages in delivery order into events."""

    def __init__(self, settings: Settings, last_position: Position | None = None):
        self._settings = settings
        self.last_position = last_position or Position(0, -1)
        self._begin: Begin | None = None
        self._commit_time = ""
        self._commit_epoch = 0.0
        self._index = 0
        self.decode_errors = 0

    def reset_transaction(self) -> None:
        """Forget a transaction cut short by a lost connection."""
        self._begin = None

    def feed(self, payload: bytes) -> Output:
        """Translate one message; raise `DecodeError` for one that cannot be parsed."""
        record = decode_message(payload)

        if isinstance(record, RowChange):
            return self._change(record)
        if isinstance(record, Begin):
            self._begin = record
            self._commit_time = format_commit_time(record.commit_time)
            self._commit_epoch = commit_epoch(record.commit_time)
            self._index = 0
            return _NOTHING
        if isinstance(record, Commit):
            self._begin = None
            return Output(None, record.end_lsn)
        if isinstance(record, LogicalMessage):
            # NOTE: logical messages are not streamed yet; only counted.
            logger.debug("logical message with prefix %r skipped", record.prefix)
            return _NOTHING
        raise DecodeError(f"unexpected record {record!r}")

    def _change(self, change: RowChange) -> Output:
        begin = self._begin
        if begin is None:
            raise DecodeError(
                f"{change.operation} on {change.schema}.{change.table} "
                "arrived outside a transaction"
            )

        position = Position(begin.commit_lsn, self._index)
        self._index += 1
        if position <= self.last_position:
            return _NOTHING
        if not self._settings.streams_table(change.schema, change.table):
            return _NOTHING

        channel = self._settings.channel_for(change.schema, change.table)
        event = change_event(
            change, position, channel, self._commit_time, begin.xid, self._commit_epoch
        )
        self.last_position = position
        return Output(event, None)
