"""Build events in the envelope dashboards expect, and encode them once (pure).

Every event has `type`, and change events have the six fields of the trigger
design this product replaces (`type`, `channel`, `operation`, `table`, `data`,
`timestamp`), followed by additive fields: `schema`, `id`, `lsn`, `xid` and,
where the replica identity provides it, `old`, then the notes of
`translate.Translator` (`partition`, `unchanged_toast`, ...).

Besides change events, the stream carries `transaction` events (BEGIN and
COMMIT, when configured), `logical_message` events and `decode_error`
events. Each has a position and so an SSE `id:`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from . import sse
from .catalog import Catalog
from .decoding import LogicalMessage, RowChange
from .positions import Position, format_lsn
from .values import RowConverter


@dataclass(slots=True)
class Event:
    """A change event, encoded once and shared by every subscriber.

    Treat it as immutable. It is not frozen, because a frozen dataclass sets
    each field through `object.__setattr__`, which took about 1.5 us more
    per event on Python 3.11 (timeit).
    """

    position: Position
    schema: str
    table: str
    channel: str
    operation: str
    frame: bytes
    commit_time: float = 0.0
    """Commit time of the event's transaction, in seconds since the epoch."""


def format_timestamp(moment: datetime) -> str:
    """Format a time as UTC ISO 8601 with milliseconds and `Z`."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def format_commit_time(text: str) -> str:
    """Convert wal2json's commit time (`2024-03-18 10:30:00.5+00`) to the envelope's."""
    if text.endswith("+00") and len(text) >= 22:
        # Fast path for the UTC session the replication connection pins: keep
        # the date and time, and cut the fraction to milliseconds.
        fraction = text[20:-3] if text[19] == "." else ""
        return f"{text[:10]}T{text[11:19]}.{(fraction + '000')[:3]}Z"
    return format_timestamp(datetime.fromisoformat(text))


def commit_epoch(text: str) -> float:
    """Convert wal2json's commit time to seconds since the epoch."""
    return datetime.fromisoformat(text).timestamp()


def change_event(
    change: RowChange,
    position: Position,
    channel: str,
    commit_time: str,
    xid: int,
    commit_epoch: float = 0.0,
    rows: tuple[dict[str, Any] | None, dict[str, Any] | None] | None = None,
    *,
    schema: str | None = None,
    table: str | None = None,
    details: dict[str, Any] | None = None,
    lsn_text: str | None = None,
) -> Event:
    """Build and encode the event of one row change.

    `rows` contains the new and old row objects; without it they are converted
    with the built-in type catalog. `schema` and `table` override the names
    in `change` (a partition is reported under its root table), and
    `details` contains additive fields such as `partition` or `unchanged_toast`.
    `lsn_text` is the commit LSN of `position` in X/Y form, which a caller
    can format once per transaction.
    """
    if rows is None:
        rows = _convert_with_builtin_types(change)
    new, old = rows
    data = old if change.operation == "DELETE" else new
    schema = change.schema if schema is None else schema
    table = change.table if table is None else table

    if lsn_text is None:
        lsn_text = format_lsn(position.commit_lsn)
    event_id = f"{lsn_text}:{position.index}"
    event: dict[str, Any] = {
        "type": "database_change",
        "channel": channel,
        "operation": change.operation,
        "table": table,
        "data": data,
        "timestamp": commit_time,
        "schema": schema,
        "id": event_id,
        "lsn": lsn_text,
        "xid": xid,
    }
    if old is not None and change.operation != "INSERT":
        event["old"] = old
    if details:
        event.update(details)

    return Event(
        position=position,
        schema=schema,
        table=table,
        channel=channel,
        operation=change.operation,
        frame=sse.frame(orjson.dumps(event), event_id),
        commit_time=commit_epoch,
    )


def _convert_with_builtin_types(
    change: RowChange,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    converter = _builtin_converter()
    new = None if change.columns is None else converter.convert(change.columns)
    old = None if change.identity is None else converter.convert(change.identity)
    return (
        None if new is None else new.values,
        None if old is None else old.values,
    )


@functools.cache
def _builtin_converter() -> RowConverter:
    return RowConverter(Catalog.builtin())


def transaction_event(
    operation: str,
    position: Position,
    commit_time: str,
    xid: int,
    commit_epoch: float = 0.0,
) -> Event:
    """Build the event that marks a transaction's BEGIN or COMMIT."""
    event = {
        "type": "transaction",
        "operation": operation,
        "timestamp": commit_time,
        "id": position.event_id,
        "lsn": format_lsn(position.commit_lsn),
        "xid": xid,
    }
    return _other_event(event, position, operation, "", commit_epoch)


def message_event(
    message: LogicalMessage,
    position: Position,
    commit_time: str | None,
    lsn: int,
    commit_epoch: float = 0.0,
) -> Event:
    """Build the event of a logical message; its channel is the message prefix.

    `lsn` is the commit LSN for a transactional message and the message's own
    LSN otherwise. A non-transactional message has no commit time, so its
    `timestamp` is null; `commit_epoch` orders it in the journal.
    """
    event: dict[str, Any] = {
        "type": "logical_message",
        "channel": message.prefix,
        "prefix": message.prefix,
        "content": message.content,
        "transactional": message.transactional,
        "timestamp": commit_time,
        "id": position.event_id,
        "lsn": format_lsn(lsn),
        "xid": message.xid,
    }
    if message.content_bytes is not None:
        event["invalid_utf8"] = True
        event["content_hex"] = message.content_bytes.hex()
    return _other_event(event, position, "MESSAGE", message.prefix, commit_epoch)


def decode_error_event(
    position: Position,
    message: str,
    *,
    lsn: int,
    commit_time: str | None,
    xid: int | None,
    schema: str | None = None,
    table: str | None = None,
    channel: str = "",
    operation: str | None = None,
    commit_epoch: float = 0.0,
) -> Event:
    """Build the event that reports a wal2json message that cannot be decoded.

    `message` must not contain row data. `schema`, `table` and `operation`
    are given when they could be read from the message.
    """
    event: dict[str, Any] = {
        "type": "decode_error",
        "channel": channel,
        "operation": operation,
        "table": table,
        "message": message,
        "timestamp": commit_time,
        "schema": schema,
        "id": position.event_id,
        "lsn": format_lsn(lsn),
        "xid": xid,
    }
    return Event(
        position=position,
        schema=schema or "",
        table=table or "",
        channel=channel,
        operation=operation or "ERROR",
        frame=sse.frame(orjson.dumps(event), position.event_id),
        commit_time=commit_epoch,
    )


def _other_event(
    event: dict[str, Any],
    position: Position,
    operation: str,
    channel: str,
    commit_epoch: float,
) -> Event:
    return Event(
        position=position,
        schema="",
        table="",
        channel=channel,
        operation=operation,
        frame=sse.frame(orjson.dumps(event), position.event_id),
        commit_time=commit_epoch,
    )


def connection_frame(details: dict[str, Any], now: datetime) -> bytes:
    """Frame the `connection` event that opens every stream (no `id:`)."""
    event = {"type": "connection", "timestamp": format_timestamp(now), **details}
    return sse.frame(orjson.dumps(event))


def heartbeat_frame(now: datetime) -> bytes:
    """Frame a `heartbeat` event (no `id:`, so the client's last id stays put)."""
    return sse.frame(
        orjson.dumps({"type": "heartbeat", "timestamp": format_timestamp(now)})
    )


def notice_frame(kind: str, message: str, now: datetime, **fields: Any) -> bytes:
    """Frame a stream notice, such as a slow client being disconnected."""
    event = {
        "type": kind,
        "message": message,
        "timestamp": format_timestamp(now),
        **fields,
    }
    return sse.frame(orjson.dumps(event))
