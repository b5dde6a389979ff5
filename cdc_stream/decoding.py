"""Parse wal2json format-version 2 messages into records (pure, no I/O).

The replication connection requests type OIDs from wal2json instead of type names
(`include-types=0`, `include-type-oids=1`), because wal2json 2.5 writes some
type names unescaped and so produces invalid JSON for them.

Numbers are kept as the exact text wal2json printed: before parsing, every
number in a column's `"value"` position is turned into a JSON string, so that
neither orjson nor Python's int digit limit can round or reject it. The
pattern is safe because `,"value":` cannot occur inside a JSON string, where
every quote is escaped.

wal2json copies the content of a logical message byte for byte, so content
that is not UTF-8 makes the line invalid JSON. Such a line is parsed again
with the invalid bytes replaced by U+FFFD, and the record says so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from .errors import DecodeError
from .positions import parse_lsn

_NUMBER_VALUE_RE = re.compile(rb',"value":(-?[0-9][0-9.eE+-]*)')

# A column as wal2json writes it: {"name": ..., "typeoid": ..., "value": ...},
# with numbers in "value" as strings of their exact text. The dicts from the
# parser are kept as they are, because building an object per column would
# cost more than the rest of the decoding.
RawColumn = dict[str, Any]


def _quote_number(match: re.Match[bytes]) -> bytes:
    return b',"value":"' + match[1] + b'"'


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


class RowChange(NamedTuple):
    """An INSERT, UPDATE, DELETE or TRUNCATE of one table.

    A named tuple, because one is built per row, and on Python 3.11 a frozen
    dataclass took about three times as long to build (timeit).
    """

    operation: str
    schema: str
    table: str
    # The change's own LSN in X/Y form, parsed only when needed.
    lsn_text: str
    columns: list[RawColumn] | None
    identity: list[RawColumn] | None
    # True when the line held bytes that are not UTF-8, now U+FFFD.
    invalid_utf8: bool = False

    @property
    def lsn(self) -> int:
        return parse_lsn(self.lsn_text)


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """A message written with `pg_logical_emit_message`.

    `lsn` is the end of the message's WAL record. When the content is not
    UTF-8, `content` has U+FFFD in place of the invalid bytes and
    `content_bytes` contains the bytes wal2json sent.
    """

    transactional: bool
    prefix: str
    content: str
    lsn: int
    xid: int | None
    content_bytes: bytes | None = None


Record = Begin | Commit | RowChange | LogicalMessage

_OPERATIONS = {"I": "INSERT", "U": "UPDATE", "D": "DELETE", "T": "TRUNCATE"}


def decode_message(payload: bytes) -> Record:
    """Parse one wal2json format-version 2 message."""
    quoted = _NUMBER_VALUE_RE.sub(_quote_number, payload)
    document, invalid_utf8 = _load(quoted)
    try:
        action = document["action"]
        if action in _OPERATIONS:
            return _row_change(action, document, invalid_utf8)
        if action == "B" or action == "C":
            record_type = Begin if action == "B" else Commit
            return record_type(
                xid=document["xid"],
                commit_lsn=parse_lsn(document["lsn"]),
                end_lsn=parse_lsn(document["nextlsn"]),
                commit_time=document["timestamp"],
            )
        if action == "M":
            return _message(document, quoted if invalid_utf8 else None)
    except (KeyError, TypeError, ValueError) as error:
        raise DecodeError(f"unexpected wal2json message layout: {error!r}") from None
    raise DecodeError(f"unknown wal2json action {action!r}")


def _load(quoted: bytes) -> tuple[dict[str, Any], bool]:
    invalid_utf8 = False
    try:
        document = orjson.loads(quoted)
    except orjson.JSONDecodeError as error:
        if _is_utf8(quoted):
            raise DecodeError(f"invalid JSON from wal2json: {error}") from None
        invalid_utf8 = True
        try:
            document = orjson.loads(quoted.decode("utf-8", "replace"))
        except orjson.JSONDecodeError as second_error:
            raise DecodeError(f"invalid JSON from wal2json: {second_error}") from None

    if not isinstance(document, dict):
        raise DecodeError("invalid wal2json message: expected a JSON object")
    return document, invalid_utf8


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _row_change(action: str, document: dict[str, Any], invalid_utf8: bool) -> RowChange:
    return RowChange(
        operation=_OPERATIONS[action],
        schema=document["schema"],
        table=document["table"],
        lsn_text=document["lsn"],
        columns=document.get("columns"),
        identity=document.get("identity"),
        invalid_utf8=invalid_utf8,
    )


def _message(document: dict[str, Any], raw_line: bytes | None) -> LogicalMessage:
    content_bytes = None
    if raw_line is not None:
        content_bytes = _raw_content(raw_line)
    return LogicalMessage(
        transactional=document["transactional"],
        prefix=document["prefix"],
        content=document["content"],
        lsn=parse_lsn(document["lsn"]),
        xid=document.get("xid"),
        content_bytes=content_bytes,
    )


def _raw_content(raw_line: bytes) -> bytes | None:
    # The standard library parser takes a str with the invalid bytes kept as
    # lone surrogates, and encoding the content back restores those bytes.
    try:
        document = json.loads(raw_line.decode("utf-8", "surrogateescape"))
        return document["content"].encode("utf-8", "surrogateescape")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


@dataclass(frozen=True, slots=True)
class LineFacts:
    """Facts read from the head of a message that cannot be parsed, without row data."""

    action: str | None
    lsn: int | None
    schema: str | None
    table: str | None


_ACTION_RE = re.compile(rb'^\{"action":"([A-Z])"')
_LSN_RE = re.compile(rb'"lsn":"([0-9A-F]{1,8}/[0-9A-F]{1,8})"')
_NAMES_RE = re.compile(rb'"schema":("(?:[^"\\]|\\.)*"),"table":("(?:[^"\\]|\\.)*")[,}]')


def line_facts(payload: bytes) -> LineFacts:
    """Read the action, LSN, schema and table from the head of a wal2json line.

    wal2json writes these before any column, so they can be read from a line
    whose row data is malformed.
    """
    action = _ACTION_RE.match(payload)
    lsn = _LSN_RE.search(payload, 0, 200)
    names = _NAMES_RE.search(payload)
    return LineFacts(
        action=action[1].decode() if action else None,
        lsn=parse_lsn(lsn[1].decode()) if lsn else None,
        schema=_json_string(names[1]) if names else None,
        table=_json_string(names[2]) if names else None,
    )


def _json_string(quoted: bytes) -> str | None:
    try:
        return json.loads(quoted.decode("utf-8", "replace"))
    except ValueError:
        return None
