"""Turn column values from wal2json into the JSON that `to_jsonb` gives (pure).

wal2json 2.5 (format-version 2) writes a column's value in one of four ways,
chosen by the column's declared type OID:

* int2, int4, int8, oid, float4, float8, numeric: the output text as a bare
  JSON number, which the decoder turns back into a string holding that exact
  text; NaN, Infinity and -Infinity become null.
* bool: `true` or `false`.
* bytea: the hex output text without its leading `\\x`.
* every other type, domains included: the output text as a JSON string.

`RowConverter` picks a converter for each OID once, from the type catalog.
The converter turns wal2json's value into the JSON `to_jsonb` writes for the
type. Numbers stay exact because they are embedded with `orjson.Fragment`.
json stays nested JSON, arrays and composites become JSON arrays and objects
with typed elements, and timestamps get `to_jsonb`'s ISO 8601 form. The text
forms parsed are those of the session settings that the replication
connection pins (DateStyle ISO, IntervalStyle postgres, extra_float_digits 1,
bytea_output hex).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import orjson

from . import catalog as types
from .catalog import Catalog, Category, TypeInfo
from .pgtext import (
    parse_array,
    parse_record,
    split_vector,
    timestamp_to_iso,
    timestamptz_to_iso,
)

logger = logging.getLogger(__name__)

Converter = Callable[[Any], Any]

# Types whose NaN, Infinity and -Infinity wal2json writes as null, so a null
# of these types may stand for one of them. Integers have no such values,
# and domains over these types arrive as text, which keeps them.
SPECIAL_AS_NULL_OIDS = frozenset({types.FLOAT4, types.FLOAT8, types.NUMERIC})


class StaleCatalogError(LookupError):
    """A value needs a type the catalog does not contain, or contains differently."""

    def __init__(self, type_oid: int, detail: str) -> None:
        super().__init__(detail)
        self.type_oid = type_oid


class JsonCastError(ValueError):
    """A type has a cast to json, which `to_jsonb` calls and this converter cannot."""


class ConvertedRow(NamedTuple):
    """A row object, with the columns whose values are not exact."""

    values: dict[str, Any]
    # Columns whose null may be NaN, Infinity or -Infinity.
    ambiguous_nulls: list[str] | None = None
    # Columns sent as the text wal2json wrote, because conversion failed.
    unconverted: list[str] | None = None


def _number_text(text: str) -> Any:
    # `to_jsonb` writes NaN and the infinities as strings: their text is the
    # only number text holding an "n".
    if "n" in text or "N" in text:
        return text
    return orjson.Fragment(text)


def _bool_text(text: str) -> bool:
    return text == "t"


def _json_text(text: str) -> Any:
    # A json value keeps its writer's white space. CR and LF can occur only
    # between tokens (inside strings they are escaped), so replacing them
    # with spaces keeps the value and keeps the SSE data field on one line.
    return orjson.Fragment(text.replace("\n", " ").replace("\r", " "))


def _bytea_raw(value: str) -> str:
    return "\\x" + value


def _json_cast_converter(info: TypeInfo) -> Converter:
    def fail(value: Any) -> Any:
        raise JsonCastError(
            f"type {info.name} has a cast to json, which to_jsonb would call"
        )

    return fail


def _failing_converter(error: StaleCatalogError) -> Converter:
    def fail(value: Any) -> Any:
        raise StaleCatalogError(error.type_oid, str(error))

    return fail


def _convert_items(items: list[Any], convert: Converter | None) -> list[Any]:
    converted: list[Any] = []
    for item in items:
        if item is None:
            converted.append(None)
        elif type(item) is list:
            converted.append(_convert_items(item, convert))
        elif convert is None:
            converted.append(item)
        else:
            converted.append(convert(item))
    return converted


class RowConverter:
    """Converters from wal2json column values to `to_jsonb` values, by type OID."""

    def __init__(self, catalog: Catalog, *, numeric_as_string: bool = False) -> None:
        self.catalog = catalog
        self._numeric_as_string = numeric_as_string
        self._text: dict[int, Converter | None] = {}
        self._logged_types: set[int] = set()
        self._columns: dict[int, Converter | None] = {
            oid: self._column_converter(info) for oid, info in catalog.types.items()
        }

    def _column_converter(self, info: TypeInfo) -> Converter | None:
        try:
            return self._build_column_converter(info)
        except StaleCatalogError as error:
            # A type whose element or field type is missing fails when a
            # value of it arrives, so the caller can read the catalog again.
            return _failing_converter(error)

    def convert(self, columns: Iterable[dict[str, Any]]) -> ConvertedRow:
        """Convert wal2json's column list of one row.

        Raises StaleCatalogError for a type the catalog lacks, and ValueError
        or LookupError for text it cannot parse. `convert_leniently` sends
        such values as text instead.
        """
        row: dict[str, Any] = {}
        ambiguous: list[str] | None = None
        converters = self._columns
        for column in columns:
            value = column["value"]
            if value is not None:
                try:
                    converter = converters[column["typeoid"]]
                except KeyError:
                    converter = self._unknown(column["typeoid"])
                if converter is not None:
                    value = converter(value)
            elif column["typeoid"] in SPECIAL_AS_NULL_OIDS:
                if ambiguous is None:
                    ambiguous = []
                ambiguous.append(column["name"])
            row[column["name"]] = value
        return ConvertedRow(row, ambiguous)

    def convert_leniently(self, columns: Iterable[dict[str, Any]]) -> ConvertedRow:
        """Convert like `convert`, sending values that fail as wal2json wrote them."""
        row: dict[str, Any] = {}
        ambiguous: list[str] = []
        unconverted: list[str] = []
        for column in columns:
            name = column["name"]
            try:
                converted = self.convert([column])
            except (ValueError, LookupError, TypeError, AttributeError) as error:
                self._log_unconverted(column, error)
                row[name] = column["value"]
                unconverted.append(name)
                continue
            row[name] = converted.values[name]
            if converted.ambiguous_nulls:
                ambiguous.append(name)
        return ConvertedRow(row, ambiguous or None, unconverted or None)

    def _log_unconverted(self, column: dict[str, Any], error: Exception) -> None:
        # Once per type, because every row of a table would repeat it.
        type_oid = column["typeoid"]
        if type_oid in self._logged_types:
            return
        self._logged_types.add(type_oid)
        logger.warning(
            "values of type OID %d (column %r) are sent as text: %s",
            type_oid,
            column["name"],
            error,
        )

    def _unknown(self, type_oid: int) -> Converter | None:
        # wal2json prints type OIDs with %d, so OIDs of 2^31 and above arrive
        # negative.
        if type_oid < 0 and type_oid & 0xFFFFFFFF in self._columns:
            return self._columns[type_oid & 0xFFFFFFFF]
        raise StaleCatalogError(type_oid, f"type OID {type_oid} is not in the catalog")

    def _build_column_converter(self, info: TypeInfo) -> Converter | None:
        # wal2json's own handling of a few declared types comes first.
        oid = info.oid
        if oid in (types.INT2, types.INT4, types.INT8, types.FLOAT4, types.FLOAT8):
            # The decoder made each number a string of its exact text.
            return orjson.Fragment
        if oid == types.NUMERIC:
            return None if self._numeric_as_string else orjson.Fragment
        if oid in (types.OID, types.BOOL):
            return None
        if oid == types.BYTEA:
            return _bytea_raw
        return self.text_converter(oid)

    def text_converter(self, type_oid: int) -> Converter | None:
        """Return the converter of a type's output text; None means unchanged."""
        if type_oid in self._text:
            return self._text[type_oid]
        info = self.catalog.types.get(type_oid)
        if info is None:
            raise StaleCatalogError(
                type_oid, f"type OID {type_oid} is not in the catalog"
            )
        converter = self._build_text_converter(info)
        self._text[type_oid] = converter
        return converter

    def _build_text_converter(self, info: TypeInfo) -> Converter | None:
        category = info.category
        if category is Category.NUMBER:
            return _number_text
        if category is Category.NUMERIC:
            return None if self._numeric_as_string else _number_text
        if category is Category.BOOL:
            return _bool_text
        if category is Category.TIMESTAMP:
            return timestamp_to_iso
        if category is Category.TIMESTAMPTZ:
            return timestamptz_to_iso
        if category is Category.JSON:
            return _json_text
        if category is Category.ARRAY:
            return self._array_converter(info)
        if category is Category.VECTOR:
            return self._vector_converter(info)
        if category is Category.COMPOSITE:
            return self._composite_converter(info)
        if category is Category.JSON_CAST:
            return _json_cast_converter(info)
        # DATE text in DateStyle ISO is already what `to_jsonb` writes.
        return None

    def _array_converter(self, info: TypeInfo) -> Converter:
        element = self.text_converter(info.element)
        delimiter = info.delimiter

        def convert_array(text: str) -> list[Any]:
            return _convert_items(parse_array(text, delimiter), element)

        return convert_array

    def _vector_converter(self, info: TypeInfo) -> Converter:
        element = self.text_converter(info.element)

        def convert_vector(text: str) -> list[Any]:
            return _convert_items(split_vector(text), element)

        return convert_vector

    def _composite_converter(self, info: TypeInfo) -> Converter:
        fields = [
            (field.name, self.text_converter(field.type_oid)) for field in info.fields
        ]
        type_oid = info.oid
        type_name = info.name

        def convert_composite(text: str) -> dict[str, Any]:
            if not fields:
                return {}
            values = parse_record(text)
            if len(values) != len(fields):
                raise StaleCatalogError(
                    type_oid,
                    f"composite type {type_name} has {len(fields)} fields in the "
                    f"catalog but a value with {len(values)}",
                )
            result: dict[str, Any] = {}
            for (name, convert), value in zip(fields, values, strict=True):
                if value is not None and convert is not None:
                    value = convert(value)
                result[name] = value
            return result

        return convert_composite
