"""Tests of the text-form parsers, value converters and catalog (pure, no server)."""

from __future__ import annotations

import decimal
import json
import sys
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_stream.catalog import (
    AttributeRow,
    Catalog,
    Category,
    Field,
    TableRow,
    TypeInfo,
    TypeRow,
    build_catalog,
    quote_identifier,
)
from cdc_stream.checks import find_replica_identity_issues
from cdc_stream.pgtext import (
    parse_array,
    parse_record,
    split_vector,
    timestamp_to_iso,
    timestamptz_to_iso,
)
from cdc_stream.values import JsonCastError, RowConverter, StaleCatalogError

sys.set_int_max_str_digits(0)


def to_json(value: Any) -> Any:
    """Encode with orjson, as the envelope does, and parse back exactly."""
    return json.loads(orjson.dumps(value), parse_float=decimal.Decimal)


def column(name: str, type_oid: int, value: Any) -> dict[str, Any]:
    return {"name": name, "typeoid": type_oid, "value": value}


# --- Array text ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{}", []),
        ("{1,2,3}", ["1", "2", "3"]),
        ("{{1,NULL},{3,4}}", [["1", None], ["3", "4"]]),
        (
            '{"a,b","c\\"d",NULL,"NULL","","x\\\\y"}',
            ["a,b", 'c"d', None, "NULL", "", "x\\y"],
        ),
        ('{"a\nb"," x","{}"}', ["a\nb", " x", "{}"]),
        ("[0:1]={7,8}", ["7", "8"]),
        ("[2:3][5:5]={{1},{2}}", [["1"], ["2"]]),
        ('{"(1,\\"a\\"\\"b\\")"}', ['(1,"a""b")']),
        ("{{{1}}}", [[["1"]]]),
    ],
)
def test_parse_array(text, expected):
    assert parse_array(text) == expected


def test_parse_array_with_semicolons():
    assert parse_array("{(3,4),(1,2);(7,8),(5,6)}", ";") == [
        "(3,4),(1,2)",
        "(7,8),(5,6)",
    ]


@pytest.mark.parametrize("text", ["", "1,2", "{1,2", "{1,2}}", '{"a}', "{1}x", "[1:2"])
def test_parse_array_rejects_malformed(text):
    with pytest.raises(ValueError):
        parse_array(text)


def render_array(value: list[Any], delimiter: str) -> str:
    """Write an array as PostgreSQL's array_out does."""
    parts = []
    for item in value:
        if isinstance(item, list):
            parts.append(render_array(item, delimiter))
        elif item is None:
            parts.append("NULL")
        elif (
            item == ""
            or item.upper() == "NULL"
            or any(ch in item for ch in f'{delimiter}{{}}"\\')
            or any(ch in " \t\n\r\v\f" for ch in item)
        ):
            parts.append('"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"')
        else:
            parts.append(item)
    return "{" + delimiter.join(parts) + "}"


element_text = st.one_of(
    st.none(),
    st.text(max_size=8),
    st.sampled_from(["NULL", "null", "", " ", '"', "\\", "{", "}", ",", ";", "\u2028"]),
)


def nested_arrays(depth: int) -> st.SearchStrategy[list[Any]]:
    if depth == 1:
        return st.lists(element_text, min_size=1, max_size=4)
    return st.lists(nested_arrays(depth - 1), min_size=1, max_size=3)


@settings(max_examples=300)
@given(
    value=st.integers(1, 3).flatmap(nested_arrays),
    delimiter=st.sampled_from([",", ";"]),
)
def test_parse_array_reads_array_out(value, delimiter):
    assert parse_array(render_array(value, delimiter), delimiter) == value


# --- Record text ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(1,2)", ["1", "2"]),
        ('("a b","x""y","p\\\\q","",,"(1)")', ["a b", 'x"y', "p\\q", "", None, "(1)"]),
        ('(1,"(2,""a,b"")")', ["1", '(2,"a,b")']),
        ("()", [None]),
        ("(,)", [None, None]),
    ],
)
def test_parse_record(text, expected):
    assert parse_record(text) == expected


@pytest.mark.parametrize("text", ["", "1,2", "(1,2", '("a)', "(1)(2)"])
def test_parse_record_rejects_malformed(text):
    with pytest.raises(ValueError):
        parse_record(text)


def render_record(fields: list[str | None]) -> str:
    """Write a record as PostgreSQL's record_out does."""
    parts = []
    for value in fields:
        if value is None:
            parts.append("")
        elif value == "" or any(ch in value for ch in '(),"\\ \t\n\r\v\f'):
            parts.append('"' + value.replace('"', '""').replace("\\", "\\\\") + '"')
        else:
            parts.append(value)
    return "(" + ",".join(parts) + ")"


@settings(max_examples=300)
@given(st.lists(element_text, min_size=1, max_size=6))
def test_parse_record_reads_record_out(fields):
    assert parse_record(render_record(fields)) == fields


def test_split_vector():
    assert split_vector("1 2 30") == ["1", "2", "30"]
    assert split_vector("") == []


# --- Date and time text -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-06-01 12:00:00", "2024-06-01T12:00:00"),
        ("2024-06-01 12:00:00.5", "2024-06-01T12:00:00.5"),
        ("0044-03-15 12:00:00.5 BC", "0044-03-15T12:00:00.5 BC"),
        ("294276-12-31 23:59:59.999999", "294276-12-31T23:59:59.999999"),
        ("infinity", "infinity"),
        ("-infinity", "-infinity"),
    ],
)
def test_timestamp_to_iso(text, expected):
    assert timestamp_to_iso(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-06-01 12:00:00+00", "2024-06-01T12:00:00+00:00"),
        ("2024-06-01 12:00:00.123+00", "2024-06-01T12:00:00.123+00:00"),
        ("0044-03-15 12:00:00+00 BC", "0044-03-15T12:00:00+00:00 BC"),
        ("2024-06-01 17:30:00+05:30", "2024-06-01T17:30:00+05:30"),
        ("2024-06-01 09:00:00-03", "2024-06-01T09:00:00-03:00"),
        ("1900-01-01 00:00:00+00:53:28", "1900-01-01T00:00:00+00:53:28"),
        ("10000-01-01 00:00:00+00", "10000-01-01T00:00:00+00:00"),
        ("infinity", "infinity"),
    ],
)
def test_timestamptz_to_iso(text, expected):
    assert timestamptz_to_iso(text) == expected


# --- Converters with the built-in catalog ---------------------------------------


@pytest.fixture(scope="module")
def builtin() -> RowConverter:
    return RowConverter(Catalog.builtin())


@pytest.mark.parametrize(
    ("type_oid", "raw", "expected_json"),
    [
        (23, "42", b"42"),
        (20, "-9223372036854775808", b"-9223372036854775808"),
        (1700, "1234.5000", b"1234.5000"),
        (1700, "1" + "0" * 5000, b"1" + b"0" * 5000),
        (701, "1e+300", b"1e+300"),
        (700, "1.1", b"1.1"),
        (26, "4000000000", b'"4000000000"'),
        (16, True, b"true"),
        (17, "deadbeef", b'"\\\\xdeadbeef"'),
        (25, 'a"\n\u2028', b'"a\\"\\n\xe2\x80\xa8"'),
        (114, '{"a":\r\n [1, 2.50]}', b'{"a":   [1, 2.50]}'),
        (3802, '{"b": 1.0}', b'{"b": 1.0}'),
        (1082, "0044-03-15 BC", b'"0044-03-15 BC"'),
        (1114, "2024-06-01 12:00:00", b'"2024-06-01T12:00:00"'),
        (1184, "2024-06-01 12:00:00+00", b'"2024-06-01T12:00:00+00:00"'),
        (1083, "24:00:00", b'"24:00:00"'),
        (1186, "-1 days -00:00:01", b'"-1 days -00:00:01"'),
        (1007, "{{1,NULL},{3,4}}", b"[[1,null],[3,4]]"),
        (1231, "{1.50,NaN,Infinity,-Infinity}", b'[1.50,"NaN","Infinity","-Infinity"]'),
        (1022, "{1e+300,-0,NaN}", b'[1e+300,-0,"NaN"]'),
        (1000, "{t,f,NULL}", b"[true,false,null]"),
        (1001, '{"\\\\xdead",NULL}', b'["\\\\xdead",null]'),
        (3807, '{"{\\"k\\": 1}",NULL}', b'[{"k": 1},null]'),
        (1009, '{"a,b","",NULL}', b'["a,b","",null]'),
        (1185, '{"2024-06-01 12:00:00+00"}', b'["2024-06-01T12:00:00+00:00"]'),
        (22, "1 2", b"[1,2]"),
        (30, "1 2", b'["1","2"]'),
    ],
)
def test_builtin_values(builtin, type_oid, raw, expected_json):
    row = builtin.convert([column("c", type_oid, raw)])

    assert orjson.dumps(row.values["c"]) == expected_json


def test_nulls_of_floats_and_numerics_are_ambiguous(builtin):
    row = builtin.convert(
        [
            column("n", 1700, None),
            column("f4", 700, None),
            column("f8", 701, None),
            column("i", 23, None),
            column("t", 25, None),
        ]
    )

    assert row.values == {"n": None, "f4": None, "f8": None, "i": None, "t": None}
    assert row.ambiguous_nulls == ["n", "f4", "f8"]


def test_numeric_as_string():
    converter = RowConverter(Catalog.builtin(), numeric_as_string=True)

    row = converter.convert(
        [
            column("n", 1700, "1234.5000"),
            column("a", 1231, "{1.50,NaN}"),
            column("i", 20, "12"),
        ]
    )

    assert orjson.dumps(row.values) == b'{"n":"1234.5000","a":["1.50","NaN"],"i":12}'


def test_unknown_type_raises_stale_catalog(builtin):
    with pytest.raises(StaleCatalogError) as raised:
        builtin.convert([column("x", 99999, "v")])

    assert raised.value.type_oid == 99999


def test_lenient_conversion_sends_text(builtin):
    row = builtin.convert_leniently(
        [
            column("ok", 23, "1"),
            column("x", 99999, "v"),
            column("bad", 1007, "{1,2"),
            column("n", 1700, None),
        ]
    )

    assert orjson.dumps(row.values) == b'{"ok":1,"x":"v","bad":"{1,2","n":null}'
    assert row.unconverted == ["x", "bad"]
    assert row.ambiguous_nulls == ["n"]


@settings(max_examples=300)
@given(
    st.integers(0, 40).flatmap(
        lambda places: st.decimals(allow_nan=False, allow_infinity=False, places=places)
    )
)
def test_numerics_stay_exact(value):
    text = format(value, "f")
    converter = RowConverter(Catalog.builtin())

    row = converter.convert(
        [column("n", 1700, text), column("a", 1231, "{" + text + "}")]
    )
    encoded = orjson.dumps(row.values)

    assert encoded == b'{"n":' + text.encode() + b',"a":[' + text.encode() + b"]}"
    assert to_json(row.values)["n"] == value


@settings(max_examples=300)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_floats_stay_exact(value):
    text = repr(value)
    converter = RowConverter(Catalog.builtin())

    row = converter.convert([column("f", 701, text)])

    assert float(to_json(row.values)["f"]) == value


@settings(max_examples=300)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(["\r", "\n", "\r\n", "\u2028", "\t", " "]),
            st.text(max_size=5),
        ),
        max_size=10,
    ).map("".join)
)
def test_json_values_stay_on_one_line(text):
    document = {"key": text, "list": [text, 1.50]}
    pretty = json.dumps(document, indent="\r\n  ")
    converter = RowConverter(Catalog.builtin())

    row = converter.convert([column("j", 114, pretty), column("t", 25, text)])
    encoded = orjson.dumps(row.values)

    assert b"\n" not in encoded
    assert b"\r" not in encoded
    assert to_json(row.values)["j"] == to_json(document)
    assert to_json(row.values)["t"] == text


# --- Catalog building -------------------------------------------------------------


def type_row(oid: int, name: str, kind: str = "b", **fields: Any) -> TypeRow:
    values: dict[str, Any] = {
        "oid": oid,
        "schema": "public" if oid >= 16384 else "pg_catalog",
        "name": name,
        "kind": kind,
        "element": 0,
        "delimiter": ",",
        "base_type": 0,
        "relation": 0,
    }
    values.update(fields)
    return TypeRow(**values)


BASE_ROWS = [
    type_row(16, "bool"),
    type_row(23, "int4", length=4),
    type_row(25, "text"),
    type_row(1700, "numeric"),
    type_row(3802, "jsonb"),
    type_row(603, "box", delimiter=";", element=600, length=32),
    type_row(1007, "_int4", element=23, is_array=True),
    type_row(1020, "_box", element=603, is_array=True),
    type_row(600, "point", element=701, length=16),
]


def user_catalog() -> Catalog:
    rows = [
        *BASE_ROWS,
        type_row(20000, "posint", "d", base_type=23),
        type_row(20001, "posint2", "d", base_type=20000),
        type_row(20002, "ints", "d", base_type=1007),
        type_row(20003, "pair", "c", relation=30000),
        type_row(20004, "_pair", element=20003, is_array=True),
        type_row(20005, "flag", "d", base_type=16),
        type_row(20006, "casted", has_json_cast=True),
        type_row(20007, "mood", "e"),
        type_row(20008, "empty", "c", relation=30001),
    ]
    attributes = [
        AttributeRow(30000, "n", 1700),
        AttributeRow(30000, "tags", 1007),
        AttributeRow(30000, "flag", 20005),
        AttributeRow(30000, "doc", 3802),
    ]
    return build_catalog(rows, attributes, [], {})


def test_catalog_resolves_domains_and_composites():
    catalog = user_catalog()

    assert catalog.types[20001].category is Category.NUMBER
    assert catalog.types[20002] == TypeInfo(20002, "public.ints", Category.ARRAY, 23)
    assert catalog.types[20003].fields == (
        Field("n", 1700),
        Field("tags", 1007),
        Field("flag", 20005),
        Field("doc", 3802),
    )
    assert catalog.types[20006].category is Category.JSON_CAST
    assert catalog.types[20007].category is Category.TEXT
    assert catalog.types[600].category is Category.TEXT
    assert catalog.types[1020].delimiter == ";"


def test_builtin_type_with_json_cast_is_text():
    catalog = build_catalog([type_row(790, "money", has_json_cast=True)], [], [], {})

    assert catalog.types[790].category is Category.TEXT


def test_domains_take_base_json_form():
    converter = RowConverter(user_catalog())

    row = converter.convert(
        [
            column("a", 20001, "5"),
            column("b", 20002, "{1,2}"),
            column("c", 20005, "t"),
            column("e", 20008, "()"),
        ]
    )

    assert orjson.dumps(row.values) == b'{"a":5,"b":[1,2],"c":true,"e":{}}'


def test_type_with_json_cast_sent_as_text():
    converter = RowConverter(user_catalog())
    columns = [column("d", 20006, "(x)"), column("i", 23, "1")]

    with pytest.raises(JsonCastError):
        converter.convert(columns)
    row = converter.convert_leniently(columns)

    assert orjson.dumps(row.values) == b'{"d":"(x)","i":1}'
    assert row.unconverted == ["d"]


def test_composites_become_objects():
    converter = RowConverter(user_catalog())
    text = '(1.50,"{1,NULL}",f,"{""k"": [1]}")'

    row = converter.convert(
        [
            column("p", 20003, text),
            column("ps", 20004, '{"(2,{},t,)",NULL}'),
            column("empty", 20003, "(,,,)"),
        ]
    )

    assert orjson.dumps(row.values) == (
        b'{"p":{"n":1.50,"tags":[1,null],"flag":false,"doc":{"k": [1]}},'
        b'"ps":[{"n":2,"tags":[],"flag":true,"doc":null},null],'
        b'"empty":{"n":null,"tags":null,"flag":null,"doc":null}}'
    )


def test_composite_with_other_fields_is_stale():
    converter = RowConverter(user_catalog())

    with pytest.raises(StaleCatalogError) as raised:
        converter.convert([column("p", 20003, "(1,2)")])

    assert raised.value.type_oid == 20003


def test_missing_element_type_fails_on_use():
    catalog = build_catalog(
        [*BASE_ROWS, type_row(20010, "_gone", element=20099, is_array=True)], [], [], {}
    )
    converter = RowConverter(catalog)

    with pytest.raises(StaleCatalogError):
        converter.convert([column("g", 20010, "{a}")])
    assert orjson.dumps(converter.convert([column("i", 1007, "{1}")]).values) == (
        b'{"i":[1]}'
    )


def test_partition_roots_and_toastable_columns():
    tables = [
        TableRow(1, "public", "m", "p", "d", "p", False, True, False),
        TableRow(2, "public", "m_us", "p", "d", "p", True, True, False),
        TableRow(3, "public", "m_us_low", "r", "d", "p", True, True, False),
        TableRow(4, "archive", "m_ap", "r", "d", "p", True, True, False),
        TableRow(5, "public", "lone", "r", "n", "p", False, False, False),
    ]
    attributes = [
        AttributeRow(3, "id", 23, "p"),
        AttributeRow(3, "note", 25, "x"),
        AttributeRow(3, "plain", 25, "p"),
        AttributeRow(3, "n", 1700, "m"),
    ]
    catalog = build_catalog(BASE_ROWS, attributes, tables, {2: 1, 3: 2, 4: 1})

    assert catalog.tables[("public", "m_us_low")].root == ("public", "m")
    assert catalog.tables[("archive", "m_ap")].root == ("public", "m")
    assert catalog.tables[("public", "m")].root is None
    assert catalog.tables[("public", "lone")].root is None
    leaf = catalog.tables[("public", "m_us_low")]
    assert leaf.columns == ("id", "note", "plain", "n")
    assert leaf.toastable == ("note", "n")


def test_replica_identity_issues_pure():
    tables = [
        TableRow(1, "public", "keyed", "r", "d", "p", False, True, False),
        TableRow(2, "public", "nokey", "r", "d", "p", False, False, False),
        TableRow(3, "public", "nothing", "r", "n", "p", False, True, False),
        TableRow(4, "public", "full", "r", "f", "p", False, False, False),
        TableRow(5, "public", "temp", "r", "d", "t", False, False, False),
        TableRow(6, "public", "parent", "p", "d", "p", False, False, False),
        TableRow(7, "public", "gone_index", "r", "i", "p", False, False, False),
    ]
    catalog = build_catalog(BASE_ROWS, [], tables, {})

    findings = find_replica_identity_issues(catalog)

    assert [f.subject for f in findings] == [
        "public.gone_index",
        "public.nokey",
        "public.nothing",
    ]


@pytest.mark.parametrize(
    ("name", "quoted"),
    [("orders", "orders"), ("Orders", '"Orders"'), ('a"b', '"a""b"'), ("a b", '"a b"')],
)
def test_quote_identifier(name, quoted):
    assert quote_identifier(name) == quoted
