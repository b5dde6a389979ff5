"""The type and table catalog that value conversion and routing depend on.

wal2json names each column's type by OID. How `to_jsonb` writes a value
depends on that type: its JSON category, the element type of an array, the
fields of a composite, the base type of a domain. Partitions are reported
under their root table, and UPDATE changes need a table's column list to
notice unchanged TOASTed values that wal2json leaves out.

The catalog is read from pg_type, pg_attribute, pg_class, pg_index,
pg_inherits and pg_cast when the reader connects (`load_catalog`), and read
again when a change names a type or table it does not contain. Building it
from the rows (`build_catalog`) is pure, so it is testable without a server.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import psycopg2
import psycopg2.extensions

logger = logging.getLogger(__name__)

# OIDs below this are built into PostgreSQL; `to_jsonb` only looks for casts
# to json on types at or above it.
FIRST_NORMAL_OID = 16384

BOOL = 16
BYTEA = 17
INT8 = 20
INT2 = 21
INT2VECTOR = 22
INT4 = 23
TEXT = 25
OID = 26
OIDVECTOR = 30
JSON = 114
FLOAT4 = 700
FLOAT8 = 701
DATE = 1082
TIME = 1083
TIMESTAMP = 1114
TIMESTAMPTZ = 1184
INTERVAL = 1186
TIMETZ = 1266
NUMERIC = 1700
UUID = 2950
JSONB = 3802


class Category(StrEnum):
    """JSON form that `to_jsonb` gives a type's values, after resolving domains."""

    BOOL = "bool"
    # int2, int4, int8, float4 and float8: a JSON number, or a string for
    # NaN and the infinities.
    NUMBER = "number"
    # numeric: like NUMBER, kept apart so it can be sent as a string instead.
    NUMERIC = "numeric"
    DATE = "date"
    TIMESTAMP = "timestamp"
    TIMESTAMPTZ = "timestamptz"
    JSON = "json"
    # Arrays in `{...}` text form.
    ARRAY = "array"
    # int2vector and oidvector: arrays whose text form is space-separated.
    VECTOR = "vector"
    COMPOSITE = "composite"
    # A user-defined type with a cast to json, which `to_jsonb` calls.
    JSON_CAST = "json_cast"
    # Every other type: the output function's text as a JSON string.
    TEXT = "text"


_BUILTIN_CATEGORIES: dict[int, Category] = {
    BOOL: Category.BOOL,
    INT2: Category.NUMBER,
    INT4: Category.NUMBER,
    INT8: Category.NUMBER,
    FLOAT4: Category.NUMBER,
    FLOAT8: Category.NUMBER,
    NUMERIC: Category.NUMERIC,
    DATE: Category.DATE,
    TIMESTAMP: Category.TIMESTAMP,
    TIMESTAMPTZ: Category.TIMESTAMPTZ,
    JSON: Category.JSON,
    JSONB: Category.JSON,
}

_VECTOR_TYPES = frozenset({INT2VECTOR, OIDVECTOR})


@dataclass(frozen=True, slots=True)
class Field:
    """A field of a composite type."""

    name: str
    type_oid: int


@dataclass(frozen=True, slots=True)
class TypeInfo:
    """A type as value conversion needs it, with domains resolved."""

    oid: int
    # Schema-qualified name, for log messages.
    name: str
    category: Category
    # Arrays and vectors: the element type.
    element: int = 0
    # Arrays: the element type's delimiter (`;` for box, `,` for the rest).
    delimiter: str = ","
    # Composites: the fields in order, without dropped attributes.
    fields: tuple[Field, ...] = ()


@dataclass(frozen=True, slots=True)
class TableInfo:
    """A table or partition as routing and UPDATE handling need it."""

    oid: int
    schema: str
    name: str
    # pg_class.relkind: 'r' ordinary table or partition, 'p' partitioned table.
    kind: str
    # pg_class.relreplident: 'd' default, 'n' nothing, 'f' full, 'i' index.
    replica_identity: str
    # pg_class.relpersistence: 'p' permanent, 'u' unlogged, 't' temporary.
    persistence: str
    has_primary_key: bool
    has_identity_index: bool
    # Columns in order, as wal2json lists them: dropped ones left out,
    # generated ones included.
    columns: tuple[str, ...]
    # Columns whose values can be stored out of line (TOASTed).
    toastable: tuple[str, ...] = ()
    # (schema, name) of the partitioned table at the top, for a partition.
    root: tuple[str, str] | None = None
    column_set: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "column_set", frozenset(self.columns))

    @property
    def qualified_name(self) -> str:
        return f"{quote_identifier(self.schema)}.{quote_identifier(self.name)}"


@dataclass(frozen=True)
class Catalog:
    """Types by OID and tables by (schema, name)."""

    types: Mapping[int, TypeInfo]
    tables: Mapping[tuple[str, str], TableInfo] = field(default_factory=dict)

    @classmethod
    def builtin(cls) -> Catalog:
        """Return a catalog of the common built-in types and no tables."""
        return _BUILTIN_CATALOG


@dataclass(frozen=True, slots=True)
class TypeRow:
    """One pg_type row, as `load_catalog` reads it."""

    oid: int
    schema: str
    name: str
    # pg_type.typtype: 'b' base, 'c' composite, 'd' domain, 'e' enum,
    # 'p' pseudo, 'r' range, 'm' multirange.
    kind: str
    element: int
    delimiter: str
    base_type: int
    relation: int
    # Whether the type subscripts like an array (a "true array" to PostgreSQL).
    is_array: bool = False
    has_json_cast: bool = False
    # pg_type.typlen: -1 for variable-length types, which can be TOASTed.
    length: int = -1


@dataclass(frozen=True, slots=True)
class AttributeRow:
    """One pg_attribute row of a relation, in attnum order."""

    relation: int
    name: str
    type_oid: int
    # pg_attribute.attstorage: 'p' (plain) values are never TOASTed.
    storage: str = "x"


@dataclass(frozen=True, slots=True)
class TableRow:
    """One pg_class row of a table or partitioned table."""

    oid: int
    schema: str
    name: str
    kind: str
    replica_identity: str
    persistence: str
    is_partition: bool
    has_primary_key: bool
    has_identity_index: bool


def build_catalog(
    type_rows: Iterable[TypeRow],
    attribute_rows: Iterable[AttributeRow],
    table_rows: Iterable[TableRow],
    inherits: Mapping[int, int],
) -> Catalog:
    """Build a catalog from catalog rows; `inherits` maps a partition to its parent."""
    rows_by_oid = {row.oid: row for row in type_rows}
    attributes: dict[int, list[AttributeRow]] = {}
    for attribute in attribute_rows:
        attributes.setdefault(attribute.relation, []).append(attribute)

    types = {
        oid: _type_info(row, rows_by_oid, attributes)
        for oid, row in rows_by_oid.items()
    }
    tables = _tables(table_rows, attributes, inherits, rows_by_oid)
    return Catalog(types=types, tables=tables)


def _type_info(
    row: TypeRow,
    rows_by_oid: Mapping[int, TypeRow],
    attributes: Mapping[int, list[AttributeRow]],
) -> TypeInfo:
    base = _resolve_domain(row, rows_by_oid)
    name = f"{row.schema}.{row.name}"
    category = _category(base)

    if category is Category.ARRAY:
        element = rows_by_oid.get(base.element)
        delimiter = element.delimiter if element is not None else ","
        return TypeInfo(row.oid, name, category, base.element, delimiter)
    if category is Category.VECTOR:
        return TypeInfo(row.oid, name, category, base.element)
    if category is Category.COMPOSITE:
        fields = tuple(
            Field(attribute.name, attribute.type_oid)
            for attribute in attributes.get(base.relation, ())
        )
        return TypeInfo(row.oid, name, category, fields=fields)
    return TypeInfo(row.oid, name, category)


def _resolve_domain(row: TypeRow, rows_by_oid: Mapping[int, TypeRow]) -> TypeRow:
    seen = {row.oid}
    while row.kind == "d":
        base = rows_by_oid.get(row.base_type)
        if base is None or base.oid in seen:
            break
        seen.add(base.oid)
        row = base
    return row


def _category(row: TypeRow) -> Category:
    # The order follows the checks of `to_jsonb`: the built-in categories,
    # then arrays, then composites, then casts to json on non-built-in types.
    category = _BUILTIN_CATEGORIES.get(row.oid)
    if category is not None:
        return category
    if row.oid in _VECTOR_TYPES:
        return Category.VECTOR
    if row.is_array and row.element:
        return Category.ARRAY
    if row.kind == "c":
        return Category.COMPOSITE
    if row.oid >= FIRST_NORMAL_OID and row.has_json_cast:
        return Category.JSON_CAST
    return Category.TEXT


def _tables(
    table_rows: Iterable[TableRow],
    attributes: Mapping[int, list[AttributeRow]],
    inherits: Mapping[int, int],
    type_rows: Mapping[int, TypeRow],
) -> dict[tuple[str, str], TableInfo]:
    rows = {row.oid: row for row in table_rows}
    tables: dict[tuple[str, str], TableInfo] = {}
    for row in rows.values():
        columns = attributes.get(row.oid, [])
        toastable = tuple(
            column.name
            for column in columns
            if column.storage != "p" and _is_variable_length(column, type_rows)
        )
        tables[(row.schema, row.name)] = TableInfo(
            oid=row.oid,
            schema=row.schema,
            name=row.name,
            kind=row.kind,
            replica_identity=row.replica_identity,
            persistence=row.persistence,
            has_primary_key=row.has_primary_key,
            has_identity_index=row.has_identity_index,
            columns=tuple(column.name for column in columns),
            toastable=toastable,
            root=_partition_root(row, rows, inherits),
        )
    return tables


def _is_variable_length(column: AttributeRow, type_rows: Mapping[int, TypeRow]) -> bool:
    row = type_rows.get(column.type_oid)
    return row is None or row.length == -1


def _partition_root(
    row: TableRow, rows: Mapping[int, TableRow], inherits: Mapping[int, int]
) -> tuple[str, str] | None:
    if not row.is_partition:
        return None

    # Walk up while the table is a partition; partitions can be nested.
    current = row
    seen = {row.oid}
    while current.is_partition:
        parent = rows.get(inherits.get(current.oid, 0))
        if parent is None or parent.oid in seen:
            break
        seen.add(parent.oid)
        current = parent
    if current is row:
        return None
    return (current.schema, current.name)


def quote_identifier(name: str) -> str:
    """Quote an SQL identifier when it is not a plain lowercase name."""
    if name and (name[0].isalpha() or name[0] == "_") and name.islower():
        if all(ch.isalnum() or ch == "_" for ch in name) and name.isascii():
            return name
    return '"' + name.replace('"', '""') + '"'


# Every query names pg_catalog objects with their schema, and the
# connection's search_path is set to pg_catalog, so objects in the user's
# schemas that are named like built-ins change nothing.
_TYPES_SQL = """
SELECT t.oid, n.nspname, t.typname, t.typtype, t.typelem, t.typdelim,
       t.typbasetype, t.typrelid, {is_array} AS is_array,
       EXISTS (
           SELECT 1 FROM pg_catalog.pg_cast c
           WHERE c.castsource = t.oid
             AND c.casttarget = 'pg_catalog.json'::pg_catalog.regtype
             AND c.castmethod = 'f'
       ) AS has_json_cast,
       t.typlen
FROM pg_catalog.pg_type t
JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
"""

# PostgreSQL 14 added typsubscript; before it, a true array was any
# variable-length type with an element type.
_IS_ARRAY_SINCE_14 = (
    "t.typelem <> 0 AND t.typsubscript = "
    "'pg_catalog.array_subscript_handler'::pg_catalog.regproc"
)
_IS_ARRAY_BEFORE_14 = "t.typelem <> 0 AND t.typlen = -1"

_ATTRIBUTES_SQL = """
SELECT a.attrelid, a.attname, a.atttypid, a.attstorage
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
WHERE a.attnum > 0 AND NOT a.attisdropped
  AND c.relkind IN ('r', 'p', 'v', 'm', 'c', 'f')
ORDER BY a.attrelid, a.attnum
"""

_TABLES_SQL = """
SELECT c.oid, n.nspname, c.relname, c.relkind, c.relreplident,
       c.relpersistence, c.relispartition,
       EXISTS (
           SELECT 1 FROM pg_catalog.pg_index i
           WHERE i.indrelid = c.oid AND i.indisprimary
       ) AS has_primary_key,
       EXISTS (
           SELECT 1 FROM pg_catalog.pg_index i
           WHERE i.indrelid = c.oid AND i.indisreplident
       ) AS has_identity_index
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND n.nspname <> 'information_schema'
  AND n.nspname NOT LIKE 'pg\\_%'
"""

_INHERITS_SQL = """
SELECT i.inhrelid, i.inhparent
FROM pg_catalog.pg_inherits i
JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
WHERE c.relispartition
"""


def load_catalog(conn: psycopg2.extensions.connection) -> Catalog:
    """Read the catalog over an open connection, in one read-only snapshot.

    Rolls back any transaction open on `conn` first.
    """
    is_array = (
        _IS_ARRAY_SINCE_14 if conn.server_version >= 140000 else _IS_ARRAY_BEFORE_14
    )
    # Any transaction the caller left open ends here, so that all four
    # queries read one snapshot.
    conn.rollback()
    with conn.cursor() as cur:
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        cur.execute("SET LOCAL search_path = pg_catalog")

        cur.execute(_TYPES_SQL.format(is_array=is_array))
        types = [TypeRow(*row) for row in cur.fetchall()]

        cur.execute(_ATTRIBUTES_SQL)
        attributes = [AttributeRow(*row) for row in cur.fetchall()]

        cur.execute(_TABLES_SQL)
        tables = [TableRow(*row) for row in cur.fetchall()]

        cur.execute(_INHERITS_SQL)
        inherits = dict(cur.fetchall())
    conn.rollback()

    catalog = build_catalog(types, attributes, tables, inherits)
    logger.info(
        "loaded catalog: %d types, %d tables", len(catalog.types), len(catalog.tables)
    )
    return catalog


def connect_and_load(dsn: str) -> Catalog | None:
    """Open a connection, read the catalog and close it; None when that fails.

    Failures are logged, so a reader that refreshes its catalog keeps
    streaming with the catalog it has.
    """
    try:
        conn = psycopg2.connect(
            dsn,
            connect_timeout=10,
            application_name="cdc-stream",
            options="-c search_path=pg_catalog",
        )
    except psycopg2.Error as error:
        logger.error("cannot connect to read the catalog: %s", _error_text(error))
        return None

    try:
        return load_catalog(conn)
    except psycopg2.Error as error:
        logger.error("cannot read the catalog: %s", _error_text(error))
        return None
    finally:
        conn.close()


def _error_text(error: psycopg2.Error) -> str:
    return (error.pgerror or str(error)).strip() or type(error).__name__


def _builtin_catalog() -> Catalog:
    scalars = {
        BOOL: "bool",
        BYTEA: "bytea",
        INT8: "int8",
        INT2: "int2",
        INT4: "int4",
        TEXT: "text",
        OID: "oid",
        JSON: "json",
        FLOAT4: "float4",
        FLOAT8: "float8",
        1042: "bpchar",
        1043: "varchar",
        DATE: "date",
        TIME: "time",
        TIMESTAMP: "timestamp",
        TIMESTAMPTZ: "timestamptz",
        INTERVAL: "interval",
        TIMETZ: "timetz",
        NUMERIC: "numeric",
        UUID: "uuid",
        JSONB: "jsonb",
    }
    arrays = {
        1000: BOOL,
        1001: BYTEA,
        1016: INT8,
        1005: INT2,
        1007: INT4,
        1009: TEXT,
        1028: OID,
        199: JSON,
        1021: FLOAT4,
        1022: FLOAT8,
        1014: 1042,
        1015: 1043,
        1182: DATE,
        1183: TIME,
        1115: TIMESTAMP,
        1185: TIMESTAMPTZ,
        1187: INTERVAL,
        1270: TIMETZ,
        1231: NUMERIC,
        2951: UUID,
        3807: JSONB,
    }
    rows = [
        TypeRow(oid, "pg_catalog", name, "b", 0, ",", 0, 0)
        for oid, name in scalars.items()
    ]
    rows += [
        TypeRow(
            oid, "pg_catalog", "_" + scalars[element], "b", element, ",", 0, 0, True
        )
        for oid, element in arrays.items()
    ]
    rows += [
        TypeRow(INT2VECTOR, "pg_catalog", "int2vector", "b", INT2, ",", 0, 0, True),
        TypeRow(OIDVECTOR, "pg_catalog", "oidvector", "b", OID, ",", 0, 0, True),
    ]
    return build_catalog(rows, [], [], {})


_BUILTIN_CATALOG = _builtin_catalog()
