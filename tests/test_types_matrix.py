"""Every column type against `to_jsonb`, through a real replication connection.

Each test creates rows in a database whose settings are hostile to naive
decoding: a non-UTC time zone, DateStyle SQL/DMY, bytea_output escape,
extra_float_digits 0, IntervalStyle iso_8601 and a search_path of odd
schemas that contain types named like built-ins. It streams the rows with
`ReplicationReader` and compares every value of `data` and `old` with what
`to_jsonb` gives for the same row in a UTC session with PostgreSQL's default
output settings.

Numbers are compared as `decimal.Decimal`, so `1e+300` (the shortest form
of a double) equals the 301 digits `to_jsonb` writes for it.
"""

from __future__ import annotations

import decimal
import json
import re
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from psycopg2 import sql
from psycopg2.extensions import parse_dsn

from cdc_stream.catalog import Catalog, load_catalog
from cdc_stream.config import Settings
from cdc_stream.journal import Journal
from cdc_stream.positions import Position
from cdc_stream.replication import ReplicationReader

sys.set_int_max_str_digits(0)

REPO_ROOT = Path(__file__).resolve().parent.parent
TYPES_DOC = REPO_ROOT / "docs" / "types.md"

HOSTILE_SETTINGS = {
    "TimeZone": "America/St_Johns",
    "DateStyle": "SQL, DMY",
    "bytea_output": "escape",
    "extra_float_digits": "0",
    "IntervalStyle": "iso_8601",
    "search_path": 'odd, "Odd Schema", public',
}

# The oracle session: UTC and PostgreSQL's default output settings. Its
# search_path is pg_catalog, as on the replication connection, because the
# reg* types (regclass, regtype, ...) print names relative to it.
ORACLE_OPTIONS = (
    "-c TimeZone=UTC -c DateStyle=ISO,MDY -c IntervalStyle=postgres "
    "-c extra_float_digits=1 -c bytea_output=hex -c search_path=pg_catalog"
)

# Types whose NaN, Infinity and -Infinity wal2json 2.5 writes as null.
SPECIAL_AS_NULL = {"numeric", "float4", "float8"}
SPECIAL_VALUES = {"NaN", "Infinity", "-Infinity"}


def statistic(column: str) -> str:
    """Return SQL that reads a value of extended statistics, which has no input."""
    return f"(SELECT {column} FROM pg_catalog.pg_statistic_ext_data LIMIT 1)"


# Sample values of every type in pg_catalog and information_schema that a
# table column can have: SQL expressions, each cast to the column type.
# An entry may give the column type when the type name alone is not enough.
SAMPLES: dict[str, tuple[str | None, list[str]]] = {
    "aclitem": (None, ["'postgres=arwdDxt/postgres'", "'=r/postgres'"]),
    "bit": ("pg_catalog.bit(3)", ["'101'", "'000'"]),
    "bool": (None, ["true", "false"]),
    "box": (None, ["'(3,4),(1,2)'", "'(1.5,-0),(0,-2)'"]),
    "bpchar": (None, ["'a'", "'ab  '", "''"]),
    "bytea": (None, ["'\\x'", "'\\xdeadbeef00'", "'\\x0a0d22275c'"]),
    "char": (None, ["'a'", "'\"'", "'\\'"]),
    "cid": (None, ["'0'", "'4294967295'"]),
    "cidr": (None, ["'10.0.0.0/8'", "'2001:db8::/32'"]),
    "circle": (None, ["'<(1,2),3>'", "'<(0.5,-1e-300),1e300>'"]),
    "date": (
        None,
        [
            "'2024-02-29'",
            "'0044-03-15 BC'",
            "'infinity'",
            "'-infinity'",
            "'5874897-12-31'",
        ],
    ),
    "datemultirange": (None, ["'{[2024-01-01,2024-02-01), [2024-03-01,)}'", "'{}'"]),
    "daterange": (None, ["'[2024-01-01,2024-02-01)'", "'empty'", "'(,2024-01-01]'"]),
    "float4": (
        None,
        ["'0'", "'1.1'", "'-0'", "'3.4028235e+38'", "'1e-45'"]
        + ["'NaN'", "'Infinity'", "'-Infinity'"],
    ),
    "float8": (
        None,
        [
            "'0'",
            "'0.1'",
            "'0.30000000000000004'",
            "'-0'",
            "'1.7976931348623157e+308'",
            "'5e-324'",
            "'1e300'",
            "'1.5e-7'",
            "'NaN'",
            "'Infinity'",
            "'-Infinity'",
        ],
    ),
    "gtsvector": (None, []),
    "inet": (None, ["'192.168.0.1/24'", "'::1'", "'10.1.2.3'"]),
    "int2": (None, ["'0'", "'-32768'", "'32767'"]),
    "int2vector": (None, ["'1 2 3'", "''"]),
    "int4": (None, ["'0'", "'-2147483648'", "'2147483647'"]),
    "int4multirange": (None, ["'{[1,3), [5,7)}'", "'{}'"]),
    "int4range": (None, ["'[1,10)'", "'empty'", "'(,5]'"]),
    "int8": (None, ["'0'", "'-9223372036854775808'", "'9223372036854775807'"]),
    "int8multirange": (None, ["'{[1,3)}'"]),
    "int8range": (None, ["'[1,9223372036854775806]'"]),
    "interval": (
        None,
        ["'1 year 2 mons 3 days 04:05:06.789'", "'-1 days -00:00:01'"]
        + ["'0'", "'178000000 years'"],
    ),
    "json": (
        None,
        [
            '\'{"a": [1, 2.50, "x\\ny"],\n "b": {"c": null}}\'',
            "'[]'",
            "'\"str\"'",
            "'1e2'",
            "'null'",
            '\'{"a":1,"a":2}\'',
            'E\'  {"ws" :\\t true,\\r\\n "big": 12345678901234567890.5}  \'',
        ],
    ),
    "jsonb": (
        None,
        [
            '\'{"a": [1, 2.50, "x\\ny"], "b": {"c": null}}\'',
            "'[]'",
            "'\"str\"'",
            "'1e2'",
            "'null'",
            '\'{"u": "\\u2028"}\'',
        ],
    ),
    "jsonpath": (None, ["'$.a[*] ? (@ > 1)'", "'strict $.\"key with space\"'"]),
    "line": (None, ["'{1,2,3}'"]),
    "lseg": (None, ["'[(1,2),(3,4)]'"]),
    "macaddr": (None, ["'08:00:2b:01:02:03'"]),
    "macaddr8": (None, ["'08:00:2b:01:02:03:04:05'"]),
    "money": (None, ["'12.34'", "'-1234567.89'", "'0'"]),
    "name": (None, ["'abc'", "'with space'", "'quote\"d'"]),
    "numeric": (
        None,
        [
            "'0'",
            "'1234.5000'",
            "'-0.000001'",
            "'1234567890123456789012345678901234567890'",
            "'123456789012345678901234567890.123456789'",
            "'1e5000'",
            "'1e-1000'",
            "'NaN'",
            "'Infinity'",
            "'-Infinity'",
        ],
    ),
    "nummultirange": (None, ["'{[1.50,2.5], (3,)}'"]),
    "numrange": (None, ["'[1.50,2.5]'", "'(,)'"]),
    "oid": (None, ["'0'", "'4294967295'"]),
    "oidvector": (None, ["'1 2'", "''"]),
    "path": (None, ["'((1,2),(3,4))'", "'[(1,2),(3,4)]'"]),
    "pg_brin_bloom_summary": (None, []),
    "pg_brin_minmax_multi_summary": (None, []),
    "pg_dependencies": (None, [statistic("stxddependencies")]),
    "pg_lsn": (None, ["'16/B374D848'", "'0/0'"]),
    "pg_mcv_list": (None, [statistic("stxdmcv")]),
    "pg_ndistinct": (None, [statistic("stxdndistinct")]),
    "pg_node_tree": (None, ["(SELECT adbin FROM pg_catalog.pg_attrdef LIMIT 1)"]),
    "pg_snapshot": (None, ["'10:20:10,14,15'"]),
    "point": (None, ["'(1,2)'", "'(1.5,-0)'", "'(1e300,5e-324)'"]),
    "polygon": (None, ["'((1,2),(3,4),(5,0))'"]),
    "refcursor": (None, ["'cursor name'"]),
    "regclass": (None, ["'pg_catalog.pg_class'", "'\"Odd Schema\".holder'"]),
    "regcollation": (None, ["'\"C\"'", "'pg_catalog.\"POSIX\"'"]),
    "regconfig": (None, ["'english'"]),
    "regdictionary": (None, ["'simple'"]),
    "regnamespace": (None, ["'public'", "'\"Odd Schema\"'"]),
    "regoper": (None, ["'pg_catalog.||/'"]),
    "regoperator": (None, ["'+(integer,integer)'"]),
    "regproc": (None, ["'pg_catalog.now'", "'pg_catalog.int4in'"]),
    "regprocedure": (None, ["'pg_catalog.abs(integer)'"]),
    "regrole": (None, ["'postgres'"]),
    "regtype": (None, ["'integer'", "'odd.text'", "'\"Odd Schema\".int4[]'"]),
    "text": (
        None,
        [
            "''",
            "'plain'",
            "E'tab\\there'",
            "E'cr\\rlf\\ncrlf\\r\\n'",
            "'quote\"back\\slash'",
            "E'line\\u2028separator\\u2029paragraph'",
            "E'ctl\\x01\\x1f\\x7f'",
            "'NULL'",
            '\'{"not": "json"}\'',
            "'emoji \U0001f600'",
            "',\"value\":1'",
        ],
    ),
    "tid": (None, ["'(0,1)'", "'(4294967295,65535)'"]),
    "time": (None, ["'00:00'", "'24:00:00'", "'12:34:56.789012'"]),
    "timestamp": (
        None,
        [
            "'2024-06-01 12:00:00'",
            "'0044-03-15 12:00:00.5 BC'",
            "'infinity'",
            "'-infinity'",
            "'294276-12-31 23:59:59.999999'",
            "'2000-01-01 00:00:00.000001'",
        ],
    ),
    "timestamptz": (
        None,
        [
            "'2024-06-01 12:00:00+05:30'",
            "'1900-01-01 00:00:00+00'",
            "'0044-03-15 12:00:00+00 BC'",
            "'infinity'",
            "'-infinity'",
            "'2024-12-31 23:59:59.999999-03:30'",
        ],
    ),
    "timetz": (None, ["'12:00:00+05:30'", "'00:00:00-14:59'", "'24:00:00+00'"]),
    "tsmultirange": (None, ["'{[2024-01-01 00:00, 2024-02-01 00:00)}'"]),
    "tsquery": (None, ["'fat & (rat | cat)'", "'''with space'' & !x'"]),
    "tsrange": (None, ["'[2024-01-01 00:00, 2024-02-01 00:00)'"]),
    "tstzmultirange": (None, ["'{[2024-01-01 00:00+00, 2024-02-01 00:00+05)}'"]),
    "tstzrange": (None, ["'[2024-01-01 00:00+00, infinity)'"]),
    "tsvector": (None, ["'a fat cat'", "'''with space'':1A b:2'"]),
    "txid_snapshot": (None, ["'10:20:10,14,15'"]),
    "uuid": (None, ["'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"]),
    "varbit": (None, ["'10101'", "''"]),
    "varchar": (None, ["'x'", "''"]),
    "xid": (None, ["'0'", "'4294967295'"]),
    "xid8": (None, ["'0'", "'18446744073709551615'"]),
    "xml": (None, ["'<a>x &amp; y</a>'", "'text <b/>'"]),
    "cardinal_number": (None, ["'0'", "'42'"]),
    "character_data": (None, ["'x'"]),
    "sql_identifier": (None, ["'ident'"]),
    "time_stamp": (None, ["'2024-06-01 12:00:00.12+00'"]),
    "yes_or_no": (None, ["'YES'"]),
}

# Types a table column can have but no test row can hold, and why. The
# same list is in docs/types.md.
EXCEPTIONS = {
    "gtsvector": "no input function; values exist only inside GiST indexes",
    "pg_brin_bloom_summary": "no input function; values exist only inside BRIN indexes",
    "pg_brin_minmax_multi_summary": (
        "no input function; values exist only inside BRIN indexes"
    ),
}

TYPES_SQL = """
SELECT t.typname
FROM pg_catalog.pg_type t
JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
WHERE n.nspname IN ('pg_catalog', 'information_schema')
  AND t.typtype IN ('b', 'd', 'e', 'r', 'm')
  AND t.typisdefined
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_type e WHERE e.typarray = t.oid)
ORDER BY t.typname
"""

SETUP_SQL = """
CREATE SCHEMA odd;
CREATE SCHEMA "Odd Schema";
CREATE TYPE odd.text AS ENUM ('odd');
CREATE TYPE odd.numeric AS (x pg_catalog.text);
CREATE DOMAIN "Odd Schema".int4 AS pg_catalog.text;
CREATE TABLE "Odd Schema".holder (id pg_catalog.int4 DEFAULT 42);
CREATE TABLE public.stats_source (a pg_catalog.int4, b pg_catalog.int4);
INSERT INTO public.stats_source SELECT g % 10, g % 5
    FROM pg_catalog.generate_series(1, 1000) g;
CREATE STATISTICS public.stats_source_s (ndistinct, dependencies, mcv)
    ON a, b FROM public.stats_source;
ANALYZE public.stats_source;
"""


def parse_exact(text: str | bytes) -> Any:
    return json.loads(text, parse_float=decimal.Decimal)


def parse_tokens(text: str | bytes) -> Any:
    """Parse JSON keeping every number as the text of its token."""
    return json.loads(text, parse_float=str, parse_int=str)


def frame_data(frame: bytes) -> dict[str, Any]:
    (line,) = [line for line in frame.split(b"\n") if line.startswith(b"data: ")]
    return parse_exact(line[len(b"data: ") :])


def frame_tokens(frame: bytes) -> dict[str, Any]:
    (line,) = [line for line in frame.split(b"\n") if line.startswith(b"data: ")]
    return parse_tokens(line[len(b"data: ") :])


def run_sql(dsn: str, statements: str | list[str], options: str | None = None) -> None:
    conn = psycopg2.connect(dsn, options=options) if options else psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            if isinstance(statements, str):
                statements = [statements]
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


def oracle_rows(dsn: str, table: str) -> dict[int, str]:
    """Return `to_jsonb` of every row of `table` by id, as JSON text."""
    conn = psycopg2.connect(dsn, options=ORACLE_OPTIONS)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(f"SELECT id, to_jsonb(t)::text FROM {table} t ORDER BY id")
            return dict(cur.fetchall())
    finally:
        conn.close()


@pytest.fixture
def hostile_db(database: str) -> str:
    """The test database with hostile settings and odd schemas."""
    name = parse_dsn(database)["dbname"]
    run_sql(database, SETUP_SQL)
    conn = psycopg2.connect(database)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for setting, value in HOSTILE_SETTINGS.items():
                # A quoted search_path would be one schema name, so the list
                # is written as SQL.
                quoted = sql.Literal(value)
                if setting == "search_path":
                    quoted = sql.SQL(value)
                cur.execute(
                    sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                        sql.Identifier(name), sql.Identifier(setting), quoted
                    )
                )
    finally:
        conn.close()
    return database


class Stream:
    """A `ReplicationReader` on its own slot, storing events in a journal."""

    def __init__(self, dsn: str, directory: Path, **settings: Any) -> None:
        suffix = uuid.uuid4().hex[:10]
        self.settings = Settings(
            database_url=dsn,
            slot_name=f"matrix_{suffix}",
            journal_path=str(directory / f"journal-{suffix}.sqlite3"),
            **settings,
        )
        self.journal = Journal(Path(self.settings.journal_path))
        self.reader = ReplicationReader(self.settings, self.journal)

    def start(self, timeout: float = 30.0) -> None:
        self.reader.start()
        deadline = time.monotonic() + timeout
        while self.reader.status.state != "streaming":
            assert time.monotonic() < deadline, self.reader.status.as_dict()
            time.sleep(0.05)

    def frames(self, count: int, timeout: float = 60.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            stored = self.journal.read_after(Position(0, -1), count + 100)
            if len(stored) >= count or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(stored) == count, [frame_data(e.frame)["type"] for e in stored]
        return [event.frame for event in stored]


@pytest.fixture
def stream(tmp_path: Path) -> Iterator[Any]:
    streams: list[Stream] = []

    def start(dsn: str, **settings: Any) -> Stream:
        started = Stream(dsn, tmp_path, **settings)
        streams.append(started)
        started.start()
        return started

    yield start
    for started in streams:
        started.reader.stop()


def column_type(name: str) -> str:
    declared, _ = SAMPLES[name]
    if declared is not None:
        return declared
    schema = "information_schema" if name in INFORMATION_SCHEMA_TYPES else "pg_catalog"
    return f"{schema}.{sql_identifier(name)}"


INFORMATION_SCHEMA_TYPES = {
    "cardinal_number",
    "character_data",
    "sql_identifier",
    "time_stamp",
    "yes_or_no",
}


def sql_identifier(name: str) -> str:
    if re.fullmatch(r"[a-z_][a-z0-9_]*", name) and name not in ("char", "bit"):
        return name
    return '"' + name.replace('"', '""') + '"'


def matrix_types() -> list[str]:
    return sorted(name for name, (_, values) in SAMPLES.items() if values)


def types_with_arrays(dsn: str) -> set[str]:
    """Return the sampled types that have an array type."""
    conn = psycopg2.connect(dsn, options=ORACLE_OPTIONS)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(TYPES_SQL.replace("ORDER BY", "AND t.typarray <> 0 ORDER BY"))
            return {name for (name,) in cur.fetchall()}
    finally:
        conn.close()


def matrix_rows(with_arrays: set[str]) -> list[dict[str, str]]:
    """Build rows of SQL expressions: sample i of each type in row i, arrays too."""
    types = matrix_types()
    count = max(len(SAMPLES[name][1]) for name in types)
    rows: list[dict[str, str]] = []
    for index in range(count):
        row = {"id": str(index)}
        for name in types:
            values = SAMPLES[name][1]
            cast = column_type(name)
            value = f"({values[index]})::{cast}" if index < len(values) else "NULL"
            row[f"c_{name}"] = value
            if name in with_arrays:
                row[f"a_{name}"] = array_sample(values, cast, index)
        rows.append(row)
    return rows


def array_sample(values: list[str], cast: str, index: int) -> str:
    elements = [f"({value})::{cast}" for value in values]
    if index == 0:
        return f"ARRAY[{', '.join([*elements, 'NULL'])}]::{cast}[]"
    if index == 1 and len(elements) >= 2:
        return f"ARRAY[[{elements[0]}, {elements[1]}], [{elements[1]}, NULL]]::{cast}[]"
    return "NULL"


def insert_statement(table: str, row: dict[str, str]) -> str:
    columns = ", ".join(row)
    return f"INSERT INTO {table} ({columns}) VALUES ({', '.join(row.values())})"


def compare_rows(
    received: dict[str, Any],
    expected: dict[str, Any],
    column_types: dict[str, str],
    ambiguous_nulls: list[str],
) -> list[str]:
    """Return a line per value that differs; NaN and infinities may be null."""
    problems = []
    if set(received) != set(expected):
        problems.append(f"columns differ: {sorted(set(received) ^ set(expected))}")
    for name, value in expected.items():
        got = received.get(name)
        if column_types.get(name) in SPECIAL_AS_NULL and value in SPECIAL_VALUES:
            if got is not None or name not in ambiguous_nulls:
                problems.append(f"{name}: {value!r} expected as null, got {got!r}")
            continue
        if got != value:
            problems.append(f"{name}: expected {value!r}, got {got!r}")
    for name in ambiguous_nulls:
        if received.get(name) is not None:
            problems.append(f"{name}: listed in ambiguous_nulls but not null")
    return problems


def test_every_type_is_sampled_or_excepted(hostile_db):
    conn = psycopg2.connect(hostile_db, options=ORACLE_OPTIONS)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(TYPES_SQL)
            types = {name for (name,) in cur.fetchall()}
    finally:
        conn.close()

    assert types - set(SAMPLES) == set(), "types without samples"
    assert set(SAMPLES) - types == set(), "samples of unknown types"
    assert {name for name, (_, values) in SAMPLES.items() if not values} == set(
        EXCEPTIONS
    )


def test_types_doc_lists_every_type():
    document = TYPES_DOC.read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", document, re.M))

    assert set(SAMPLES) - documented == set(), "types missing from docs/types.md"
    for name in EXCEPTIONS:
        assert re.search(rf"^\| `{name}` \| exception:", document, re.M), name


def test_builtin_catalog_matches_server(hostile_db):
    conn = psycopg2.connect(hostile_db)
    try:
        catalog = load_catalog(conn)
    finally:
        conn.close()

    for oid, info in Catalog.builtin().types.items():
        assert catalog.types[oid] == info


def matrix_ddl(with_arrays: set[str]) -> str:
    columns = ["id pg_catalog.int4 PRIMARY KEY"]
    for name in matrix_types():
        columns.append(f"c_{name} {column_type(name)}")
        if name in with_arrays:
            columns.append(f"a_{name} {column_type(name)}[]")
    return f"CREATE TABLE public.matrix ({', '.join(columns)})"


def test_every_type_matches_to_jsonb(hostile_db, stream):
    with_arrays = types_with_arrays(hostile_db)
    run_sql(
        hostile_db,
        [matrix_ddl(with_arrays), "ALTER TABLE public.matrix REPLICA IDENTITY FULL"],
    )
    column_types = {f"c_{name}": name for name in matrix_types()}
    rows = matrix_rows(with_arrays)
    reader = stream(hostile_db)

    run_sql(hostile_db, [insert_statement("public.matrix", row) for row in rows])
    oracle = oracle_rows(hostile_db, "public.matrix")
    before = {key: parse_exact(text) for key, text in oracle.items()}
    run_sql(hostile_db, "UPDATE public.matrix SET id = id + 1000")
    run_sql(hostile_db, "DELETE FROM public.matrix")
    events = [frame_data(frame) for frame in reader.frames(3 * len(rows))]

    problems: list[str] = []
    for event in events:
        ambiguous = event.get("ambiguous_nulls", [])
        operation = event["operation"]
        if operation == "INSERT":
            expected = before[event["data"]["id"]]
            problems += compare_rows(event["data"], expected, column_types, ambiguous)
        elif operation == "UPDATE":
            expected = before[event["old"]["id"]]
            old_nulls = event.get("old_ambiguous_nulls", [])
            problems += compare_rows(event["old"], expected, column_types, old_nulls)
            moved = {**expected, "id": expected["id"] + 1000}
            problems += compare_rows(event["data"], moved, column_types, ambiguous)
        else:
            expected = before[event["data"]["id"] - 1000]
            moved = {**expected, "id": expected["id"] + 1000}
            problems += compare_rows(event["data"], moved, column_types, ambiguous)
        assert "unconverted" not in event, event["unconverted"]
        assert "unchanged_toast" not in event, event["unchanged_toast"]

    assert [e["operation"] for e in events] == (
        ["INSERT"] * len(rows) + ["UPDATE"] * len(rows) + ["DELETE"] * len(rows)
    )
    assert problems == []


USER_TYPES_SQL = '''
CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'with space', 'quote"d', 'comma,brace}');
CREATE DOMAIN public.posint AS pg_catalog.int4 CHECK (VALUE > 0);
CREATE DOMAIN public.posint2 AS public.posint;
CREATE DOMAIN public.dnum AS pg_catalog.numeric;
CREATE DOMAIN public.dfloat AS pg_catalog.float8;
CREATE DOMAIN public.dbytea AS pg_catalog.bytea;
CREATE DOMAIN public.djson AS pg_catalog.jsonb;
CREATE DOMAIN public.dbool AS pg_catalog.bool;
CREATE DOMAIN public.dts AS pg_catalog.timestamptz;
CREATE DOMAIN public.darr AS pg_catalog.int4[];
CREATE TYPE public.inner_t AS (x pg_catalog.int4, y pg_catalog.text[]);
CREATE TYPE public.cpx AS (
    r pg_catalog.float8,
    gone pg_catalog.int4,
    n pg_catalog.numeric,
    t pg_catalog.text,
    a pg_catalog.int4[],
    j pg_catalog.json,
    b pg_catalog.bytea,
    ts pg_catalog.timestamptz,
    nested public.inner_t,
    m public.mood,
    d public.posint,
    "Field ""X""" pg_catalog.text
);
ALTER TYPE public.cpx DROP ATTRIBUTE gone;
CREATE DOMAIN public.dcpx AS public.cpx;
CREATE TYPE "Odd Schema"."status ""t""" AS ENUM ('open', 'closed');
CREATE TYPE public."MixedMood" AS ENUM ('x');
CREATE TABLE public.user_types (
    id pg_catalog.int4 PRIMARY KEY,
    mood public.mood,
    moods public.mood[],
    posint public.posint2,
    posints public.posint[],
    dnum public.dnum,
    dfloat public.dfloat,
    dbytea public.dbytea,
    djson public.djson,
    dbool public.dbool,
    dts public.dts,
    darr public.darr,
    cpx public.cpx,
    cpxs public.cpx[],
    dcpx public.dcpx,
    status "Odd Schema"."status ""t""",
    statuses "Odd Schema"."status ""t"""[],
    mixed public."MixedMood",
    odd_text odd.text,
    odd_numeric odd.numeric,
    odd_int4 "Odd Schema".int4,
    bounded pg_catalog.int4[],
    cube pg_catalog.text[],
    "Quoted ""Col""" pg_catalog.text
);
ALTER TABLE public.user_types REPLICA IDENTITY FULL;
'''

USER_ROWS = [
    '''(1, 'with space', ARRAY['sad', NULL, 'quote"d', 'comma,brace}']::public.mood[],
       5, ARRAY[1, NULL]::public.posint[], 'NaN', 'Infinity', '\\xff00',
       '{"k": [1, 2.50]}', true, '2024-06-01 12:00:00+05:30', '{1,2}',
       ROW(1.5, 'NaN', E'a"b,c\\n(d)\\\\', ARRAY[1, NULL], '{"x":\n 1}', '\\x00ff',
           '2024-06-01 12:00:00+00', ROW(7, ARRAY['p q', NULL]), 'ok', 3, 'X'),
       ARRAY[ROW(2, 1, 't', '{}', 'null', NULL, NULL, NULL, NULL, NULL, NULL)
             ::public.cpx, NULL],
       ROW('-0', '1e-5', '', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
       'closed', ARRAY['open', 'closed']::"Odd Schema"."status ""t"""[], 'x', 'odd',
       ROW('in odd'), 'text, not int', '[0:2]={7,8,9}',
       '{{{"a b","c\\"d"},{NULL,"NULL"}},{{"",x},{"{}",","}}}', 'q')''',
    """(2, NULL, '{}', NULL, NULL, '1234.5000', '1e300', NULL, 'null', false,
       'infinity', '{}', ROW(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL), '{}', NULL, NULL, '{}', NULL, NULL, ROW(NULL), NULL,
       '[-2:-1]={1,2}', '{}', NULL)""",
]


def test_user_types_match_to_jsonb(hostile_db, stream):
    run_sql(hostile_db, USER_TYPES_SQL)
    reader = stream(hostile_db)

    inserts = [f"INSERT INTO public.user_types VALUES {row}" for row in USER_ROWS]
    run_sql(hostile_db, inserts)
    before = {
        key: parse_exact(text)
        for key, text in oracle_rows(hostile_db, "public.user_types").items()
    }
    run_sql(hostile_db, "UPDATE public.user_types SET id = id + 1000")
    events = [frame_data(frame) for frame in reader.frames(2 * len(USER_ROWS))]

    problems: list[str] = []
    for event in events:
        if event["operation"] == "INSERT":
            expected = before[event["data"]["id"]]
            problems += compare_rows(event["data"], expected, {}, [])
        else:
            expected = before[event["old"]["id"]]
            problems += compare_rows(event["old"], expected, {}, [])
            moved = {**expected, "id": expected["id"] + 1000}
            problems += compare_rows(event["data"], moved, {}, [])
        assert "unconverted" not in event
        assert "ambiguous_nulls" not in event

    assert problems == []


def test_numeric_as_string_keeps_text(hostile_db, stream):
    run_sql(
        hostile_db,
        [
            "CREATE TABLE public.amounts (id pg_catalog.int4 PRIMARY KEY, "
            "n pg_catalog.numeric, ns pg_catalog.numeric[], f pg_catalog.float8, "
            "i pg_catalog.int8)",
        ],
    )
    reader = stream(hostile_db, numeric_as_string=True)

    run_sql(
        hostile_db,
        "INSERT INTO public.amounts VALUES "
        "(1, 1234.5000, '{1.50,NaN,1e40}', 1e300, 9223372036854775807), "
        "(2, 1e5000, NULL, 0.1, 0)",
    )
    expected = {
        key: parse_tokens(text)
        for key, text in oracle_rows(hostile_db, "public.amounts").items()
    }
    frames = reader.frames(2)

    for frame in frames:
        data = frame_tokens(frame)["data"]
        oracle = expected[int(data["id"])]
        assert data["n"] == oracle["n"]
        assert data["ns"] == oracle["ns"]
        assert decimal.Decimal(data["f"]) == decimal.Decimal(oracle["f"])
        assert data["i"] == oracle["i"]
    first = frame_data(frames[0])["data"]
    assert first["n"] == "1234.5000"
    assert first["ns"] == ["1.50", "NaN", "1" + "0" * 40]
    assert isinstance(first["f"], decimal.Decimal)


def test_type_with_json_cast_is_flagged(hostile_db, stream):
    run_sql(
        hostile_db,
        [
            "CREATE TYPE public.color AS ENUM ('red', 'green')",
            "CREATE FUNCTION public.color_json(public.color) RETURNS pg_catalog.json "
            "LANGUAGE sql IMMUTABLE AS "
            "$$ SELECT pg_catalog.json_build_object('color', $1::pg_catalog.text) $$",
            "CREATE CAST (public.color AS pg_catalog.json) "
            "WITH FUNCTION public.color_json(public.color)",
            "CREATE TABLE public.paint (id pg_catalog.int4 PRIMARY KEY, "
            "c public.color, cs public.color[])",
        ],
    )
    reader = stream(hostile_db)

    run_sql(hostile_db, "INSERT INTO public.paint VALUES (1, 'red', '{green}')")
    (frame,) = reader.frames(1)
    event = frame_data(frame)
    oracle = parse_exact(oracle_rows(hostile_db, "public.paint")[1])

    # to_jsonb calls the cast, which wal2json cannot; the text is sent instead.
    assert oracle["c"] == {"color": "red"}
    assert event["data"] == {"id": 1, "c": "red", "cs": "{green}"}
    assert event["unconverted"] == ["c", "cs"]


def test_catalog_ignores_shadowing_search_path(database):
    run_sql(
        database,
        [
            "CREATE SCHEMA shadow",
            "CREATE TYPE shadow.text AS ENUM ('s')",
            "CREATE TYPE shadow.regproc AS ENUM ('s')",
            "CREATE TYPE shadow.json AS ENUM ('s')",
            "CREATE FUNCTION shadow.array_subscript_handler(pg_catalog.internal) "
            "RETURNS pg_catalog.internal LANGUAGE internal "
            "AS 'array_subscript_handler'",
        ],
    )
    conn = psycopg2.connect(database, options="-c search_path=shadow,pg_catalog")
    try:
        catalog = load_catalog(conn)
    finally:
        conn.close()

    for oid, info in Catalog.builtin().types.items():
        assert catalog.types[oid] == info
