"""Turn the stream of wal2json messages into events (pure, stateful).

The translator numbers the changes of each transaction to give them
positions. It skips positions it has already produced, because the slot
re-delivers everything after the confirmed LSN when the connection is
re-established. It also reports the LSN that may be confirmed once a
transaction's events have been handed on.

Values are converted with the type catalog (see `catalog`). When a change
names a type or table the catalog lacks, the translator calls `load_catalog`
once for that name and carries on with what it then has. Besides row changes
it produces logical message events (for the configured prefixes),
BEGIN/COMMIT events (when configured) and an error event for each message
that cannot be decoded, so the stream goes on past it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, NamedTuple

from .catalog import Catalog, TableInfo
from .config import Settings
from .decoding import (
    Begin,
    Commit,
    LogicalMessage,
    RawColumn,
    RowChange,
    decode_message,
    line_facts,
)
from .envelope import (
    Event,
    change_event,
    commit_epoch,
    decode_error_event,
    format_commit_time,
    message_event,
    transaction_event,
)
from .errors import DecodeError
from .positions import Position, format_lsn, parse_lsn
from .values import ConvertedRow, RowConverter, StaleCatalogError

logger = logging.getLogger(__name__)

CatalogLoader = Callable[[], Catalog | None]

# Errors a converter raises on text it cannot parse; the row is then sent
# with that column as wal2json wrote it.
_CONVERSION_ERRORS = (ValueError, LookupError, TypeError, AttributeError)

# Refreshes of the catalog for one row before its values are sent leniently.
_MAX_REFRESHES_PER_ROW = 3


class Output(NamedTuple):
    """Result of one wal2json message: an event, an LSN to confirm, or both."""

    event: Event | None
    confirm_lsn: int | None


_NOTHING = Output(None, None)


@dataclass(frozen=True, slots=True)
class _Route:
    """Destination of the changes of one wal2json table."""

    schema: str
    table: str
    channel: str
    streamed: bool
    info: TableInfo | None
    # `partition` (and `partition_schema`) for a partition, else empty.
    details: dict[str, str]


class Translator:
    """Translate wal2json messages in delivery order into events."""

    def __init__(
        self,
        settings: Settings,
        last_position: Position | None = None,
        *,
        catalog: Catalog | None = None,
        load_catalog: CatalogLoader | None = None,
    ) -> None:
        self._settings = settings
        self.last_position = last_position or Position(0, -1)
        self._begin: Begin | None = None
        self._commit_time = ""
        self._commit_epoch = 0.0
        self._commit_lsn_text = ""
        self._index = 0
        self.decode_errors = 0
        self._load_catalog = load_catalog
        self._refreshed_for: set[Hashable] = set()
        self.use_catalog(catalog or Catalog.builtin())

    def use_catalog(self, catalog: Catalog, *, fresh: bool = True) -> None:
        """Convert values with `catalog` from now on, e.g. one read at connect time.

        A `fresh` catalog lets names that a refresh did not find before
        trigger a refresh again.
        """
        if fresh:
            self._refreshed_for.clear()
        self.catalog = catalog
        self._rows = RowConverter(
            catalog, numeric_as_string=self._settings.numeric_as_string
        )
        self._routes: dict[tuple[str, str], _Route] = {}

    def reset_transaction(self) -> None:
        """Forget a transaction cut short by a lost connection."""
        self._begin = None

    def feed(self, payload: bytes) -> Output:
        """Translate one message.

        A message that cannot be decoded becomes a `decode_error` event; it
        never raises DecodeError.
        """
        try:
            record = decode_message(payload)
        except DecodeError as error:
            return self._decode_failed(payload, error)

        if isinstance(record, RowChange):
            return self._change(record)
        if isinstance(record, Begin):
            return self._start_transaction(record)
        if isinstance(record, Commit):
            return self._end_transaction(record)
        return self._message(record)

    def _start_transaction(self, begin: Begin) -> Output:
        self._begin = begin
        self._commit_time = format_commit_time(begin.commit_time)
        self._commit_epoch = commit_epoch(begin.commit_time)
        self._commit_lsn_text = format_lsn(begin.commit_lsn)
        self._index = 0
        if not self._settings.transaction_events:
            return _NOTHING

        position = self._next_position(begin)
        if position <= self.last_position:
            return _NOTHING
        event = transaction_event(
            "BEGIN", position, self._commit_time, begin.xid, self._commit_epoch
        )
        self.last_position = position
        return Output(event, None)

    def _end_transaction(self, commit: Commit) -> Output:
        begin = self._begin
        self._begin = None
        if not self._settings.transaction_events or begin is None:
            return Output(None, commit.end_lsn)

        position = self._next_position(begin)
        if position <= self.last_position:
            return Output(None, commit.end_lsn)
        event = transaction_event(
            "COMMIT", position, self._commit_time, begin.xid, self._commit_epoch
        )
        self.last_position = position
        return Output(event, commit.end_lsn)

    def _next_position(self, begin: Begin) -> Position:
        position = Position(begin.commit_lsn, self._index)
        self._index += 1
        return position

    def _change(self, change: RowChange) -> Output:
        begin = self._begin
        if begin is None:
            error = DecodeError(
                f"{change.operation} on {change.schema}.{change.table} "
                "arrived outside a transaction"
            )
            return self._decode_failed(None, error, change)

        position = self._next_position(begin)
        if position <= self.last_position:
            return _NOTHING
        route = self._route(change.schema, change.table)
        if not route.streamed:
            return _NOTHING

        new = None if change.columns is None else self._convert(change.columns)
        old = None if change.identity is None else self._convert(change.identity)
        details = self._details(change, route, new, old)

        event = change_event(
            change,
            position,
            route.channel,
            self._commit_time,
            begin.xid,
            self._commit_epoch,
            (None if new is None else new.values, None if old is None else old.values),
            schema=route.schema,
            table=route.table,
            details=details,
            lsn_text=self._commit_lsn_text,
        )
        self.last_position = position
        return Output(event, None)

    def _details(
        self,
        change: RowChange,
        route: _Route,
        new: ConvertedRow | None,
        old: ConvertedRow | None,
    ) -> dict[str, Any] | None:
        # Most rows have no details at all, so that case returns first.
        if (
            change.operation != "UPDATE"
            and not route.details
            and not change.invalid_utf8
            and _exact(new)
            and _exact(old)
        ):
            return None

        details: dict[str, Any] = dict(route.details) if route.details else {}

        if change.operation == "UPDATE" and new is not None:
            unchanged = self._fill_unchanged_toast(route, new.values, old)
            if unchanged:
                details["unchanged_toast"] = unchanged

        data = old if change.operation == "DELETE" else new
        if data is not None and data.ambiguous_nulls:
            details["ambiguous_nulls"] = data.ambiguous_nulls
        if change.operation == "UPDATE" and old is not None and old.ambiguous_nulls:
            details["old_ambiguous_nulls"] = old.ambiguous_nulls

        unconverted = _merge(new, old)
        if unconverted:
            details["unconverted"] = unconverted
        if change.invalid_utf8:
            details["invalid_utf8"] = True
        return details or None

    def _fill_unchanged_toast(
        self, route: _Route, values: dict[str, Any], old: ConvertedRow | None
    ) -> list[str] | None:
        # wal2json leaves out a TOASTed column that the UPDATE did not change.
        # The old row has it when the replica identity is FULL; otherwise the
        # event lists it, so that no client takes it for null.
        info = route.info
        if info is None:
            return None
        missing = [name for name in info.toastable if name not in values]
        if not missing:
            return None

        # A column dropped since the catalog was read is missing too, so the
        # catalog is read again once for this set of columns.
        key = ("toast", info.schema, info.name, tuple(missing))
        if self._refresh_catalog(key):
            info = self._route(info.schema, info.name, refresh=False).info
            if info is None:
                return None
            missing = [name for name in info.toastable if name not in values]

        unchanged: list[str] = []
        old_values = old.values if old is not None else {}
        for name in missing:
            if name in old_values:
                values[name] = old_values[name]
            else:
                unchanged.append(name)
        return unchanged

    def _convert(self, columns: list[RawColumn]) -> ConvertedRow:
        for _ in range(_MAX_REFRESHES_PER_ROW):
            try:
                return self._rows.convert(columns)
            except StaleCatalogError as error:
                if not self._refresh_catalog(("type", error.type_oid)):
                    break
            except _CONVERSION_ERRORS:
                break
        return self._rows.convert_leniently(columns)

    def _route(self, schema: str, table: str, *, refresh: bool = True) -> _Route:
        # NOTE: routes are kept until the catalog is read again, so a table
        # attached as a partition after that keeps its own name until the
        # next refresh or reconnection.
        route = self._routes.get((schema, table))
        if route is not None:
            return route

        info = self.catalog.tables.get((schema, table))
        if info is None and refresh and self._refresh_catalog(("table", schema, table)):
            info = self.catalog.tables.get((schema, table))
        route = self._build_route(schema, table, info)
        self._routes[(schema, table)] = route
        return route

    def _build_route(self, schema: str, table: str, info: TableInfo | None) -> _Route:
        details: dict[str, str] = {}
        root_schema, root_table = schema, table
        if info is not None and info.root is not None:
            root_schema, root_table = info.root
            details["partition"] = table
            if root_schema != schema:
                details["partition_schema"] = schema

        settings = self._settings
        return _Route(
            schema=root_schema,
            table=root_table,
            channel=settings.channel_for(root_schema, root_table),
            streamed=settings.streams_table(root_schema, root_table),
            info=info,
            details=details,
        )

    def _refresh_catalog(self, key: Hashable) -> bool:
        """Read the catalog again, once per key; return whether it was read."""
        if self._load_catalog is None or key in self._refreshed_for:
            return False
        self._refreshed_for.add(key)

        catalog = self._load_catalog()
        if catalog is None:
            return False
        self.use_catalog(catalog, fresh=False)
        return True

    def _message(self, message: LogicalMessage) -> Output:
        if message.transactional:
            begin = self._begin
            if begin is None:
                error = DecodeError(
                    "transactional message arrived outside a transaction"
                )
                return self._decode_failed(None, error)
            # Every transactional message takes an index, streamed or not, so
            # positions do not depend on the configured prefixes.
            position = self._next_position(begin)
            lsn = begin.commit_lsn
            commit_time: str | None = self._commit_time
        else:
            # A non-transactional message is decoded outside any transaction,
            # at its own LSN, the end of its WAL record. One byte before it
            # lies inside the record, where no commit record can start, so the
            # position is unique and sorts between the transactions around it.
            position = Position(message.lsn - 1, 0)
            lsn = message.lsn
            commit_time = None

        if position <= self.last_position:
            return _NOTHING
        if not self._settings.streams_message(message.prefix):
            return _NOTHING
        event = message_event(message, position, commit_time, lsn, self._commit_epoch)
        self.last_position = position
        return Output(event, None)

    def _decode_failed(
        self,
        payload: bytes | None,
        error: DecodeError,
        change: RowChange | None = None,
    ) -> Output:
        self.decode_errors += 1
        schema: str | None = None
        table: str | None = None
        message_lsn: int | None = None
        action: str | None = None
        if change is not None:
            schema, table = change.schema, change.table
            message_lsn = _lsn_or_none(change.lsn_text)
        elif payload is not None:
            facts = line_facts(payload)
            schema, table, message_lsn = facts.schema, facts.table, facts.lsn
            action = facts.action

        position, lsn, commit_time, xid = self._error_position(message_lsn)
        logger.error(
            "cannot decode wal2json message at %s: %s",
            format_lsn(message_lsn if message_lsn is not None else lsn),
            error,
        )
        if position <= self.last_position:
            return _NOTHING

        channel = ""
        if schema is not None and table is not None:
            route = self._route(schema, table, refresh=False)
            schema, table, channel = route.schema, route.table, route.channel
        operation = _OPERATIONS.get(action or "")
        if change is not None:
            operation = change.operation

        event = decode_error_event(
            position,
            str(error),
            lsn=lsn,
            commit_time=commit_time,
            xid=xid,
            schema=schema,
            table=table,
            channel=channel,
            operation=operation,
            commit_epoch=self._commit_epoch,
        )
        self.last_position = position
        return Output(event, None)

    def _error_position(
        self, message_lsn: int | None
    ) -> tuple[Position, int, str | None, int | None]:
        begin = self._begin
        if begin is not None:
            position = self._next_position(begin)
            return position, begin.commit_lsn, self._commit_time, begin.xid

        # Outside a transaction only non-transactional messages arrive, so the
        # position follows the rule for them when the LSN could be read.
        last = self.last_position
        if message_lsn is not None and Position(message_lsn - 1, 0) > last:
            return Position(message_lsn - 1, 0), message_lsn, None, None
        return Position(last.commit_lsn, last.index + 1), last.commit_lsn, None, None


_OPERATIONS = {"I": "INSERT", "U": "UPDATE", "D": "DELETE", "T": "TRUNCATE"}


def _lsn_or_none(text: str) -> int | None:
    try:
        return parse_lsn(text)
    except ValueError:
        return None


def _exact(row: ConvertedRow | None) -> bool:
    """Return whether a row is absent or has no inexact values."""
    return row is None or not (row.ambiguous_nulls or row.unconverted)


def _merge(new: ConvertedRow | None, old: ConvertedRow | None) -> list[str] | None:
    names: list[str] = []
    for row in (new, old):
        if row is not None and row.unconverted:
            names.extend(name for name in row.unconverted if name not in names)
    return names or None
