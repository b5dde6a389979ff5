"""Build events in the envelope dashboards expect, and encode them once (pure).

Every event has `type`, and change events have the six fields of the trigger
design this product replaces (`type`, `channel`, `operation`, `table`, `data`,
`timestamp`), followed by additive fields: `schema`, `id`, `lsn`, `xid` and,
where the replica identity provides it, `old`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from . import sse
from .decoding import RowChange
from .positions import Position, format_lsn
from .values import row_to_dict


@dataclass(frozen=True, slots=True)
class Event:
    """A change event, encoded once and shared by every subscriber."""

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
) -> Event:
    """Build and encode the event of one row change."""
    new = row_to_dict(change.columns) if change.columns is not None else None
    old = row_to_dict(change.identity) if change.identity is not None else None
    data = old if change.operation == "DELETE" else new

    event: dict[str, Any] = {
        "type": "database_change",
        "channel": channel,
        "operation": change.operation,
        "table": change.table,
        "data": data,
        "timestamp": commit_time,
        "schema": change.schema,
        "id": position.event_id,
        "lsn": format_lsn(position.commit_lsn),
        "xid": xid,
    }
    if old is not None and change.operation != "INSERT":
        event["old"] = old

    return Event(
        position=position,
        schema=change.schema,
        table=change.table,
        channel=channel,
        operation=change.operation,
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
