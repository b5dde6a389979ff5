"""LSNs, change positions and the event ids built from them.

A change's position is the commit LSN of its transaction plus the index of the
change inside that transaction. Logical decoding delivers whole transactions in
commit order, so positions strictly increase in delivery order, while a
change's own LSN does not: transactions interleave in the WAL.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from .errors import InvalidPositionError

_LSN_RE = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
_EVENT_ID_RE = re.compile(r"^([0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}):([0-9]{1,10})$")


def parse_lsn(text: str) -> int:
    """Parse an LSN in PostgreSQL's `X/Y` text form into an integer."""
    match = _LSN_RE.match(text)
    if match is None:
        raise InvalidPositionError(
            f"invalid LSN {text!r}: expected PostgreSQL's X/Y form, e.g. '0/16B3748'"
        )
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    """Format an integer LSN in PostgreSQL's `X/Y` text form."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


class Position(NamedTuple):
    """Place of a change in the stream: commit LSN, then index in the transaction."""

    commit_lsn: int
    index: int

    @property
    def event_id(self) -> str:
        """SSE event id of the change at this position, e.g. `0/16B3748:3`."""
        return f"{format_lsn(self.commit_lsn)}:{self.index}"


def parse_event_id(text: str) -> Position:
    """Parse an event id of the form `<commit LSN>:<index>`."""
    match = _EVENT_ID_RE.match(text)
    if match is None:
        raise InvalidPositionError(
            f"invalid event id {text!r}: expected '<commit LSN>:<index>', "
            "e.g. '0/16B3748:0'"
        )
    return Position(parse_lsn(match.group(1)), int(match.group(2)))
