"""Per-subscriber views of the stream: row filters, masked and chosen columns.

A subscriber without a view receives the frames every other subscriber
shares. A view only parses an event whose channel it affects, and only
re-encodes one whose columns it changes, so a row filter alone still sends
the shared frame. Numbers keep their exact text through a re-encode: they
are parsed as `JsonNumber` and written back with `orjson.Fragment`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import orjson

from . import sse
from .envelope import Event
from .positions import Position
from .rowfilter import RowFilter

ROW_OPERATIONS = frozenset({"INSERT", "UPDATE", "DELETE"})
ROW_KEYS = ("data", "old")


class JsonNumber:
    """A JSON number kept as its text, so that no digit is lost."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def decimal(self) -> Decimal:
        return Decimal(self.text)

    def __repr__(self) -> str:
        return f"JsonNumber({self.text!r})"


def parse_exact(data: bytes | str) -> Any:
    """Parse JSON with every number as a `JsonNumber`."""
    return json.loads(data, parse_float=JsonNumber, parse_int=JsonNumber)


def dumps_exact(document: Any) -> bytes:
    """Encode JSON parsed by `parse_exact`, with each number's original text."""
    return orjson.dumps(document, default=_fragment)


def _fragment(value: Any) -> orjson.Fragment:
    if isinstance(value, JsonNumber):
        return orjson.Fragment(value.text)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


class ParsedEvents:
    """Recently parsed events, shared by every view of one app.

    The same event is offered to each subscriber in turn, so views parse it
    once. Parsed documents are shared and must not be changed.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._documents: OrderedDict[Position, Any] = OrderedDict()

    def get(self, event: Event) -> Any:
        document = self._documents.get(event.position)
        if document is None:
            document = parse_exact(sse.frame_data(event.frame))
            self._documents[event.position] = document
            if len(self._documents) > self._size:
                self._documents.popitem(last=False)
        return document


class View:
    """A subscriber's transform: returns the frame to send, or None to skip."""

    def __init__(
        self,
        parsed: ParsedEvents,
        rows: RowFilter | None = None,
        hidden: Mapping[str, frozenset[str]] | None = None,
        columns: frozenset[str] | None = None,
    ) -> None:
        self._parsed = parsed
        self._rows = rows
        self._hidden = dict(hidden or {})
        self._columns = columns

    def __call__(self, event: Event) -> bytes | None:
        if event.operation not in ROW_OPERATIONS:
            return event.frame
        hidden = self._hidden.get(event.channel)
        if self._rows is None and hidden is None and self._columns is None:
            return event.frame

        document = self._parsed.get(event)
        if document.get("type") != "database_change":
            return event.frame
        if self._rows is not None and not self._rows.matches(
            event.schema, event.table, document.get("data")
        ):
            return None
        if hidden is None and self._columns is None:
            return event.frame
        return self._reencode(event, document, hidden or frozenset())

    def _reencode(
        self, event: Event, document: dict[str, Any], hidden: frozenset[str]
    ) -> bytes:
        changed = dict(document)
        for key in ROW_KEYS:
            row = document.get(key)
            if isinstance(row, dict):
                changed[key] = {
                    name: value
                    for name, value in row.items()
                    if name not in hidden
                    and (self._columns is None or name in self._columns)
                }
        return sse.frame(dumps_exact(changed), event.position.event_id)
