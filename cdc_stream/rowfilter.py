"""Row filters such as `filter=market_id=eq.BTC-USD`, evaluated in Python.

A filter is `column=operator.value` with the operators eq, neq, lt, lte, gt,
gte and in (`in.(a,b)`, with double quotes around a value that contains a
comma). Several filters are combined with AND. Filters never reach SQL:
they are checked against the table's columns from the catalog and compared
with each event's row, by the column's type:

- numbers (integer, numeric, float) as exact decimals, with NaN above every
  other number as PostgreSQL sorts it;
- booleans as true or false;
- date, timestamp and timestamptz as times, a time without zone being UTC;
- anything else as text, ordered by code point.

A null value, or a column missing from the row, matches no condition, as in
SQL. DELETE events are filtered on the old row, which holds only the
replica identity columns unless the table has REPLICA IDENTITY FULL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from .table_columns import Column, Table

OPERATORS = ("eq", "neq", "lt", "lte", "gt", "gte", "in")
MAX_FILTERS = 16
MAX_FILTER_LENGTH = 2048
MAX_IN_VALUES = 256
MAX_COLUMNS = 256

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, b: a == b,
    "neq": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
}
_TIME_LIMITS = {
    "infinity": datetime.max.replace(tzinfo=UTC),
    "-infinity": datetime.min.replace(tzinfo=UTC),
}


class FilterError(ValueError):
    """A filter or column list is invalid; the message names it."""


@dataclass(frozen=True)
class Condition:
    """One parsed filter: a column, an operator and its text values."""

    text: str
    column: str
    operator: str
    values: tuple[str, ...]


def parse_filters(texts: Iterable[str]) -> list[Condition]:
    """Parse `filter` parameters; raise FilterError naming the bad one."""
    texts = list(texts)
    if len(texts) > MAX_FILTERS:
        raise FilterError(f"too many filters: {len(texts)}, at most {MAX_FILTERS}")
    return [parse_condition(text) for text in texts]


def parse_condition(text: str) -> Condition:
    """Parse one `column=operator.value` filter."""
    if len(text) > MAX_FILTER_LENGTH:
        raise FilterError(
            f"filter {text[:40]!r}... is longer than {MAX_FILTER_LENGTH} characters"
        )
    column, equals, rest = text.partition("=")
    operator, dot, value = rest.partition(".")
    if not equals or not dot or not column:
        raise FilterError(
            f"invalid filter {text!r}: expected column=operator.value, "
            "e.g. market_id=eq.BTC-USD"
        )
    if operator not in OPERATORS:
        raise FilterError(
            f"invalid operator {operator!r} in filter {text!r}: use "
            f"{', '.join(OPERATORS)}"
        )
    values = _parse_list(text, value) if operator == "in" else (value,)
    return Condition(text, column, operator, values)


def _parse_list(text: str, value: str) -> tuple[str, ...]:
    if len(value) < 2 or value[0] != "(" or value[-1] != ")":
        raise FilterError(
            f"invalid list in filter {text!r}: expected in.(a,b,...), e.g. "
            "status=in.(open,filled)"
        )
    items = _split_items(text, value[1:-1])
    if not items or len(items) > MAX_IN_VALUES:
        raise FilterError(
            f"invalid list in filter {text!r}: expected 1 to {MAX_IN_VALUES} values"
        )
    return tuple(items)


def _split_items(text: str, inner: str) -> list[str]:
    """Split on commas outside double quotes; `\\"` and `\\\\` escape in quotes."""
    items: list[str] = []
    current: list[str] = []
    quoted = False
    was_quoted = False
    position = 0
    while position < len(inner):
        character = inner[position]
        if quoted and character == "\\" and position + 1 < len(inner):
            position += 1
            current.append(inner[position])
        elif character == '"':
            quoted = not quoted
            was_quoted = True
        elif character == "," and not quoted:
            items.append("".join(current))
            current = []
            was_quoted = False
        else:
            current.append(character)
        position += 1
    if quoted:
        raise FilterError(f"unterminated quote in filter {text!r}")
    if current or was_quoted or inner.endswith(","):
        items.append("".join(current))
    return items


def parse_columns(texts: Iterable[str]) -> frozenset[str] | None:
    """Parse `columns` parameters (comma-separated); None when absent."""
    names: set[str] = set()
    given = False
    for text in texts:
        given = True
        names.update(name.strip() for name in text.split(",") if name.strip())
    if not given:
        return None
    if not names:
        raise FilterError("'columns' is empty: name at least one column")
    if len(names) > MAX_COLUMNS:
        raise FilterError(f"too many columns: {len(names)}, at most {MAX_COLUMNS}")
    return frozenset(names)


def check_columns(columns: Iterable[str], tables: list[Table]) -> None:
    """Raise FilterError if a column is missing from one of `tables`."""
    for name in sorted(columns):
        _require_column(name, tables, f"column {name!r} in 'columns'")


def _require_column(name: str, tables: list[Table], what: str) -> None:
    if not tables:
        raise FilterError(
            f"{what} cannot be checked: no streamed table matches the requested "
            "channels and tables"
        )
    for table in tables:
        if name not in table.columns:
            raise FilterError(
                f"{what}: table {table.qualified_name} has no column {name!r}; "
                "name the tables that have it with 'tables' or 'channels'"
            )


@dataclass(frozen=True)
class _Check:
    column: str
    compare: Callable[[Any], bool]


class RowFilter:
    """Conditions compiled for each table of a subscription, combined with AND."""

    def __init__(self, checks: Mapping[tuple[str, str], list[_Check]]) -> None:
        self._checks = checks

    def matches(self, schema: str, table: str, row: Any) -> bool:
        checks = self._checks.get((schema, table))
        if checks is None or not isinstance(row, dict):
            return False
        for check in checks:
            if check.column not in row or not check.compare(row[check.column]):
                return False
        return True


def compile_filters(conditions: list[Condition], tables: list[Table]) -> RowFilter:
    """Check conditions against the tables' columns and compile them.

    Raises FilterError when a column is missing from a table or a value does
    not parse as the column's type.
    """
    for condition in conditions:
        what = f"filter {condition.text!r}"
        _require_column(condition.column, tables, what)
    compiled = {
        (table.schema, table.name): [
            _compile(condition, table.columns[condition.column])
            for condition in conditions
        ]
        for table in tables
    }
    return RowFilter(compiled)


def _compile(condition: Condition, column: Column) -> _Check:
    convert = _CONVERTERS[column.kind]
    wanted = []
    for text in condition.values:
        value = convert(text)
        if value is None:
            raise FilterError(
                f"invalid value {text!r} in filter {condition.text!r}: column "
                f"{column.name!r} is {column.type_name}, so expected a "
                f"{_KIND_NAMES[column.kind]}"
            )
        wanted.append(value)

    if condition.operator == "in":
        choices = frozenset(wanted)

        def compare(raw: Any) -> bool:
            value = convert(raw)
            return value is not None and value in choices

    else:
        operator = _COMPARE[condition.operator]
        target = wanted[0]

        def compare(raw: Any) -> bool:
            value = convert(raw)
            return value is not None and operator(value, target)

    return _Check(column.name, compare)


class _NumberKey:
    """An exact number that sorts NaN above all others and equal to itself."""

    __slots__ = ("value", "nan")

    def __init__(self, value: Decimal) -> None:
        self.nan = value.is_nan()
        self.value = Decimal(0) if self.nan else value

    def _key(self) -> tuple[bool, Decimal]:
        return (self.nan, self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NumberKey) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __lt__(self, other: _NumberKey) -> bool:
        return self._key() < other._key()

    def __le__(self, other: _NumberKey) -> bool:
        return self._key() <= other._key()

    def __gt__(self, other: _NumberKey) -> bool:
        return self._key() > other._key()

    def __ge__(self, other: _NumberKey) -> bool:
        return self._key() >= other._key()


def _number(raw: Any) -> _NumberKey | None:
    text = getattr(raw, "text", raw)
    if isinstance(text, bool) or not isinstance(text, str | int):
        return None
    try:
        return _NumberKey(Decimal(text))
    except (InvalidOperation, ValueError):
        return None


def _boolean(raw: Any) -> bool | None:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        return {"true": True, "false": False}.get(raw.lower())
    return None


def _time(raw: Any) -> datetime | None:
    if not isinstance(raw, str):
        return None
    if raw in _TIME_LIMITS:
        return _TIME_LIMITS[raw]
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        try:
            moment = datetime.combine(date.fromisoformat(raw), datetime.min.time())
        except ValueError:
            return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


def _text(raw: Any) -> str | None:
    if isinstance(raw, str):
        return raw
    text = getattr(raw, "text", None)
    if isinstance(text, str):
        return text
    if isinstance(raw, bool):
        return "true" if raw else "false"
    return None


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "number": _number,
    "boolean": _boolean,
    "time": _time,
    "text": _text,
}
_KIND_NAMES = {
    "number": "number",
    "boolean": "true or false",
    "time": "date or ISO 8601 time",
    "text": "text",
}
