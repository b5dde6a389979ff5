"""Resume points: where a client asks its stream to start (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from .errors import InvalidPositionError
from .positions import Position, format_lsn, parse_event_id, parse_lsn

_LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")


@dataclass(frozen=True)
class ResumePoint:
    """Start after `after`, or at the first event committed at `moment` or later."""

    text: str
    after: Position | None = None
    moment: float | None = None


def parse_resume_point(text: str) -> ResumePoint:
    """Parse an event id (`0/16B3748:2`), an LSN (`0/16B3748`) or an ISO time."""
    text = text.strip()
    if ":" in text and "/" in text and "T" not in text and " " not in text:
        return ResumePoint(text, after=parse_event_id(text))
    if _LSN_RE.match(text):
        # Every event of a transaction committed at this LSN or later.
        return ResumePoint(text, after=Position(parse_lsn(text), -1))
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidPositionError(
            f"invalid resume point {text!r}: expected an event id such as "
            "'0/16B3748:0', an LSN such as '0/16B3748', or an ISO 8601 time "
            "such as '2024-03-18T10:30:00Z'"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return ResumePoint(text, moment=moment.timestamp())


def resume_id(position: Position) -> str:
    """Return the resume point that continues with the first event after `position`.

    That is the event id of an event's position, and the LSN for the position
    just before a transaction's first event, whose index is -1.
    """
    if position.index < 0:
        return format_lsn(position.commit_lsn)
    return position.event_id
