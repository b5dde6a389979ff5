"""Turn column values from wal2json into the JSON that `to_jsonb` gives (pure).

Values are chosen by type OID. Numbers arrive as their exact text and are
embedded unchanged with `orjson.Fragment`, so no digit or trailing zero is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import orjson

from .decoding import Column

BOOL = 16
INT8 = 20
INT2 = 21
INT4 = 23
OID = 26
JSON = 114
FLOAT4 = 700
FLOAT8 = 701
NUMERIC = 1700
JSONB = 3802

NUMBER_OIDS = frozenset({INT8, INT2, INT4, OID, FLOAT4, FLOAT8, NUMERIC})

Converter = Callable[[Any], Any]


def _number(value: Any) -> Any:
    # The decoder turned every number into its text; anything else (a string
    # from a domain or an unexpected layout) passes through unchanged.
    if isinstance(value, str):
        return orjson.Fragment(value)
    return value


def _json_text(value: Any) -> Any:
    # A json value keeps the writer's whitespace. Line breaks are outside
    # strings (inside they are escaped), so replacing them keeps the value
    # and keeps the SSE data field on one line.
    if isinstance(value, str):
        return orjson.Fragment(value.replace("\n", " ").replace("\r", " "))
    return value


def _identity(value: Any) -> Any:
    return value


_CONVERTERS: dict[int, Converter] = {oid: _number for oid in NUMBER_OIDS}
_CONVERTERS[JSON] = _json_text
_CONVERTERS[JSONB] = _json_text


def row_to_dict(columns: Iterable[Column]) -> dict[str, Any]:
    """Build a row object from columns, with values as `to_jsonb` writes them."""
    row: dict[str, Any] = {}
    for column in columns:
        value = column.value
        if value is not None:
            value = _CONVERTERS.get(column.type_oid, _identity)(value)
        row[column.name] = value
    return row
