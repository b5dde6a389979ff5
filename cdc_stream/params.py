"""Parse and validate the query parameters of the stream and replay routes."""

from __future__ import annotations

from collections.abc import Callable

from .errors import InvalidPositionError
from .hub import OPERATIONS, EventFilter
from .positions import Position
from .resume import ResumePoint, parse_resume_point

REPLAY_DEFAULT_LIMIT = 1000
REPLAY_MAX_LIMIT = 100_000


class BadRequest(ValueError):
    """A request parameter is invalid; the message names it."""


def parse_filter(getlist: Callable[[str], list[str]]) -> EventFilter:
    """Build a subscriber's filter from `channels`, `tables` and `operations`."""
    channels = _split_values(getlist("channels"))
    tables = _split_values(getlist("tables"))
    operations = frozenset(v.upper() for v in _split_values(getlist("operations")))
    unknown = sorted(operations - OPERATIONS)
    if unknown:
        raise BadRequest(
            f"unknown operation {unknown[0]!r} in 'operations': use "
            f"{', '.join(sorted(OPERATIONS))}"
        )
    return EventFilter(channels, tables, operations)


def parse_resume(last_event_id: str | None, start: str | None) -> ResumePoint | None:
    """Choose the resume point; the browser's Last-Event-ID wins over `from`.

    A browser that reconnects keeps the URL, so `from` would replay the same
    range again on every reconnect if it took precedence.
    """
    text = last_event_id or start
    if not text:
        return None
    try:
        return parse_resume_point(text)
    except InvalidPositionError as error:
        source = "Last-Event-ID" if last_event_id else "'from'"
        raise BadRequest(f"{source}: {error}") from None


def parse_upto(text: str | None) -> Position | None:
    if not text:
        return None
    try:
        point = parse_resume_point(text)
    except InvalidPositionError as error:
        raise BadRequest(f"'to': {error}") from None
    if point.after is None:
        raise BadRequest(f"'to': {text!r} must be an event id or an LSN, not a time")
    if point.after.index < 0:
        # An LSN includes every event of the transaction committed there.
        return Position(point.after.commit_lsn, 2**31)
    return point.after


def parse_limit(text: str | None) -> int:
    if not text:
        return REPLAY_DEFAULT_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= REPLAY_MAX_LIMIT:
        raise BadRequest(
            f"invalid limit {text!r}: expected a whole number from 1 to "
            f"{REPLAY_MAX_LIMIT}"
        )
    return int(text)


def _split_values(values: list[str]) -> frozenset[str]:
    items: set[str] = set()
    for value in values:
        items.update(item.strip() for item in value.split(",") if item.strip())
    return frozenset(items)
