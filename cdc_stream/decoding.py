"""Parse wal2json format-version 2 messages into records (pure, no I/O).

The replication connection asks wal2json for type OIDs instead of type names
(`include-types=0`, `include-type-oids=1`), because wal2json 2.5 writes some
type names unescaped and so produces invalid JSON for them.

Numbers are kept as the exact text wal2json printed: before parsing, every
number in a column's `"value"` position is turned into a JSON string, so that
neither orjson nor Python's int digit limit can round or reject it. The
pattern is safe because `,"value":` cannot occur inside a JSON string, where
every quote is escaped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from .errors import DecodeError
from .positions import parse_lsn

_NUMBER_VALUE_RE = re.compile(rb'(,"value":)(-?[0-9][0-9.eE+-]*)')


@dataclass(frozen=True, slots=True)
class Column:
    """A column value as wal2json sent it: numbers as their exact text."""

    name: str
    type_oid: int
    value: Any


@dataclass(frozen=True, slots=True)
class Begin:
    """Start of a transaction; wal2json sends its commit LSN and time up front."""

    xid: int
    commit_lsn: int
    end_lsn: int
    commit_time: str


@dataclass(frozen=True, slots=True)
class Commit:
    """End of a transaction; `end_lsn` is the position to confirm to the slot."""

    xid: int
    commit_lsn: int
    end_lsn: int
    commit_time: str


@dataclass(frozen=True, slots=True)
class RowChange:
    """An INSERT, UPDATE, DELETE or TRUNCATE of one table."""

    operation: str
    schema: str
    table: str
    lsn: int
    columns: tuple[Column, ...] | None
    identity: tuple[Column, ...] | None


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """A message written with `pg_logical_emit_message`."""

    transactional: bool
    prefix: str
    content: str
    lsn: int
    xid: int | None


Record = Begin | Commit | RowChange | LogicalMessage

_OPERATIONS = {"I": "INSERT", "U": "UPDATE", "D": "DELETE", "T": "TRUNCATE"}


def decode_message(payload: bytes) -> Record:
    """Parse one wal2json format-version 2 message."""
    document = _load(payload)
    try:
        action = document["action"]
        if action in _OPERATIONS:
            return _row_change(action, document)
        if action == "B" or action == "C":
            record_type = Begin if action == "B" else Commit
            return record_type(
                xid=document["xid"],
                commit_lsn=parse_lsn(document["lsn"]),
                end_lsn=parse_lsn(document["nextlsn"]),
                commit_time=document["timestamp"],
            )
        if action == "M":
            return LogicalMessage(
                transactional=document["transactional"],
                prefix=document["prefix"],
                content=document["content"],
                lsn=parse_lsn(document["lsn"]),
                xid=document.get("xid"),
            )
    except (KeyError, TypeError, ValueError) as error:
        raise DecodeError(f"unexpected wal2json message layout: {error!r}") from None
    raise DecodeError(f"unknown wal2json action {action!r}")


def _load(payload: bytes) -> dict[str, Any]:
    quoted = _NUMBER_VALUE_RE.sub(rb'\1"\2"', payload)
    try:
        document = orjson.loads(quoted)
    except orjson.JSONDecodeError as error:
        raise DecodeError(f"invalid JSON from wal2json: {error}") from None
    if not isinstance(document, dict):
        raise DecodeError("invalid wal2json message: expected a JSON object")
    return document


def _row_change(action: str, document: dict[str, Any]) -> RowChange:
    return RowChange(
        operation=_OPERATIONS[action],
        schema=document["schema"],
        table=document["table"],
        lsn=parse_lsn(document["lsn"]),
        columns=_columns(document.get("columns")),
        identity=_columns(document.get("identity")),
    )


def _columns(items: list[dict[str, Any]] | None) -> tuple[Column, ...] | None:
    if items is None:
        return None
    # wal2json prints type OIDs with %d, so OIDs of 2^31 and above arrive negative.
    return tuple(
        Column(item["name"], item["typeoid"] & 0xFFFFFFFF, item["value"])
        for item in items
    )
