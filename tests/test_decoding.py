"""Tests of the wal2json decoder and of event framing (pure, no server)."""

from __future__ import annotations

import decimal
import json
import sys
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_stream.catalog import Catalog
from cdc_stream.decoding import (
    Begin,
    Commit,
    LogicalMessage,
    RowChange,
    decode_message,
    line_facts,
)
from cdc_stream.envelope import change_event
from cdc_stream.errors import DecodeError
from cdc_stream.positions import Position, parse_lsn
from cdc_stream.values import RowConverter

sys.set_int_max_str_digits(0)

HEAD = (
    b'{"action":"I","xid":5,"timestamp":"2024-03-18 10:30:00.5+00","lsn":"0/16B3748",'
)
SCHEMA_TABLE = b'"schema":"public","table":"t",'


def insert_line(columns: bytes) -> bytes:
    return HEAD + SCHEMA_TABLE + b'"columns":[' + columns + b"]}"


def column(name: str, type_oid: int, raw_value: bytes) -> bytes:
    head = orjson.dumps({"name": name, "typeoid": type_oid})[:-1]
    return head + b',"value":' + raw_value + b"}"


def parse_exact(text: str | bytes) -> Any:
    return json.loads(text, parse_float=decimal.Decimal)


# Number tokens as wal2json prints them: numeric keeps scale and every digit
# (1e5000 is 5001 digits, past Python's default int digit limit), float8
# prints the shortest exact form with extra_float_digits=1.
NUMBER_TOKENS = [
    "1234.5000",
    "1.0000",
    "0.000001",
    "-0.5",
    "1234567890123456789012345678901234567890",
    "123456789012345678901234567890.123456789",
    "1" + "0" * 5000,
    "18446744073709551616",
    "9223372036854775807",
    "-9223372036854775808",
    "-0",
    "1e+300",
    "1.7976931348623157e+308",
    "5e-324",
    "0.30000000000000004",
    "1.6777216e+07",
]


@pytest.mark.parametrize("token", NUMBER_TOKENS)
def test_numbers_keep_exact_text(token):
    line = insert_line(column("n", 1700, token.encode()))

    change = decode_message(line)

    assert isinstance(change, RowChange)
    assert change.columns is not None
    assert change.columns[0]["value"] == token


@pytest.mark.parametrize("token", NUMBER_TOKENS)
def test_numbers_reach_event_unchanged(token):
    line = insert_line(column("n", 1700, token.encode()))
    change = decode_message(line)
    assert isinstance(change, RowChange)

    event = change_event(change, Position(1, 0), "t_changes", "t", 5)
    data = event_data(event.frame)

    assert b'"data":{"n":' + token.encode() + b"}" in event.frame
    assert data["data"]["n"] == decimal.Decimal(token)


def event_data(frame: bytes) -> dict[str, Any]:
    lines = frame.split(b"\n")
    assert lines[-2:] == [b"", b""]
    (data_line,) = [line for line in lines if line.startswith(b"data: ")]
    return parse_exact(data_line[len(b"data: ") :])


def test_row_change_fields():
    line = (
        b'{"action":"U","xid":9,"timestamp":"2024-03-18 10:30:00+00",'
        b'"lsn":"0/A2196E8","schema":"Sales Data","table":"Order \\"Lines\\"",'
        b'"columns":[{"name":"id","typeoid":23,"value":1},'
        b'{"name":"ok","typeoid":16,"value":true}],'
        b'"identity":[{"name":"id","typeoid":23,"value":1}]}'
    )

    change = decode_message(line)

    assert change == RowChange(
        operation="UPDATE",
        schema="Sales Data",
        table='Order "Lines"',
        lsn_text="0/A2196E8",
        columns=[
            {"name": "id", "typeoid": 23, "value": "1"},
            {"name": "ok", "typeoid": 16, "value": True},
        ],
        identity=[{"name": "id", "typeoid": 23, "value": "1"}],
    )
    assert change.lsn == parse_lsn("0/A2196E8")


def test_truncate_has_no_columns():
    line = (
        b'{"action":"T","xid":2017,"timestamp":"2024-03-18 10:30:00+00",'
        b'"lsn":"0/A219400","schema":"public","table":"trunc_a"}'
    )

    change = decode_message(line)

    assert isinstance(change, RowChange)
    assert change.operation == "TRUNCATE"
    assert change.columns is None
    assert change.identity is None


def test_begin_and_commit():
    begin_line = (
        b'{"action":"B","xid":2018,"timestamp":"2026-12-04 15:22:47.71623+00",'
        b'"lsn":"0/A219778","nextlsn":"0/A2197A8"}'
    )
    commit_line = begin_line.replace(b'"B"', b'"C"')

    begin = decode_message(begin_line)
    commit = decode_message(commit_line)

    assert begin == Begin(
        xid=2018,
        commit_lsn=parse_lsn("0/A219778"),
        end_lsn=parse_lsn("0/A2197A8"),
        commit_time="2026-12-04 15:22:47.71623+00",
    )
    assert isinstance(commit, Commit)
    assert commit.end_lsn == parse_lsn("0/A2197A8")


def test_messages_both_kinds():
    transactional = (
        b'{"action":"M","xid":2019,"timestamp":"2026-12-04 15:22:47.716903+00",'
        b'"lsn":"0/A2198E0","transactional":true,"prefix":"lab",'
        b'"content":"transactional \\"quoted\\" content"}'
    )
    outside = (
        b'{"action":"M","xid":null,"timestamp":null,"lsn":"0/A219800",'
        b'"transactional":false,"prefix":"lab","content":"autocommit"}'
    )

    first = decode_message(transactional)
    second = decode_message(outside)

    assert first == LogicalMessage(
        transactional=True,
        prefix="lab",
        content='transactional "quoted" content',
        lsn=parse_lsn("0/A2198E0"),
        xid=2019,
    )
    assert isinstance(second, LogicalMessage)
    assert second.transactional is False
    assert second.xid is None
    assert second.content_bytes is None


def test_message_not_utf8():
    line = (
        b'{"action":"M","xid":7,"timestamp":"2024-03-18 10:30:00+00",'
        b'"lsn":"0/300","transactional":true,"prefix":"bin",'
        b'"content":"A\xff\\"\\n\xc3\xa9"}'
    )

    message = decode_message(line)

    assert isinstance(message, LogicalMessage)
    assert message.content == 'A\ufffd"\n\u00e9'
    assert message.content_bytes == b'A\xff"\n\xc3\xa9'


def test_row_not_utf8_flagged():
    line = insert_line(column("t", 25, b'"caf\xe9"'))

    change = decode_message(line)

    assert isinstance(change, RowChange)
    assert change.invalid_utf8 is True
    assert change.columns is not None
    assert change.columns[0]["value"] == "caf\ufffd"


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"[1, 2]",
        b'{"action":"I","columns":[{"name":"card","value":"4111-SECRET',
        b'{"action":"X","xid":1}',
        b'{"action":"I","xid":1,"lsn":"0/1"}',
        b'{"action":"B","xid":1,"timestamp":"t","lsn":"zz","nextlsn":"0/2"}',
    ],
)
def test_invalid_lines_raise_decode_error(line):
    with pytest.raises(DecodeError) as raised:
        decode_message(line)

    assert "SECRET" not in str(raised.value)


def test_line_facts_of_broken_row():
    line = (
        b'{"action":"U","xid":1,"timestamp":"2024-03-18 10:30:00+00",'
        b'"lsn":"0/10","schema":"Sales Data","table":"Order \\"Lines\\"",'
        b'"columns":[{"name":"card","typeoid":25,"value":"4111-SECR'
    )

    facts = line_facts(line)

    assert facts.action == "U"
    assert facts.lsn == 0x10
    assert facts.schema == "Sales Data"
    assert facts.table == 'Order "Lines"'


def test_line_facts_of_truncate_and_garbage():
    truncate = line_facts(
        b'{"action":"T","xid":1,"timestamp":"x","lsn":"1/A0","schema":"s","table":"t"}'
    )
    garbage = line_facts(b"\xff\xfe not a line")

    assert (truncate.action, truncate.lsn, truncate.table) == ("T", 0x1000000A0, "t")
    assert garbage.action is None
    assert garbage.lsn is None
    assert garbage.table is None


def test_negative_type_oid_wraps():
    # wal2json prints OIDs with %d: 4294967295 arrives as -1.
    line = insert_line(column("n", 1700 - 2**32, b"1.50"))
    change = decode_message(line)
    assert isinstance(change, RowChange)
    assert change.columns is not None

    row = RowConverter(Catalog.builtin()).convert(change.columns)

    assert orjson.dumps(row.values) == b'{"n":1.50}'


# --- Properties -----------------------------------------------------------------

# Text with the characters that break naive handling: quotes, backslashes,
# control characters, CR, LF, U+2028 and the marker the decoder looks for.
hostile_text = st.lists(
    st.one_of(
        st.sampled_from(['"', "\\", "\r", "\n", "\t", "\x00", "\x1f", "\u2028"]),
        st.sampled_from([',"value":', ',"value":1', "{", "}", "[", "]", ","]),
        st.characters(codec="utf-8"),
    ),
    max_size=40,
).map("".join)


def decimal_token(value: decimal.Decimal) -> str:
    return format(value, "f")


number_tokens = st.one_of(
    st.integers(0, 30)
    .flatmap(
        lambda places: st.decimals(allow_nan=False, allow_infinity=False, places=places)
    )
    .map(decimal_token),
    st.integers(-(10**60), 10**60).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
)


@settings(max_examples=300)
@given(
    names=st.lists(hostile_text, min_size=1, max_size=5, unique=True),
    texts=st.lists(st.one_of(st.none(), hostile_text), min_size=5, max_size=5),
    numbers=st.lists(number_tokens, min_size=5, max_size=5),
)
def test_decoder_keeps_strings_and_numbers(names, texts, numbers):
    pieces = []
    for i, name in enumerate(names):
        pieces.append(column(name, 25, orjson.dumps(texts[i])))
        pieces.append(column(f"#{i}", 1700, numbers[i].encode()))
    line = insert_line(b",".join(pieces))

    change = decode_message(line)

    assert isinstance(change, RowChange)
    assert change.columns is not None
    values = {c["name"]: c["value"] for c in change.columns}
    for i, name in enumerate(names):
        assert values[name] == texts[i]
        assert values[f"#{i}"] == numbers[i]


@settings(max_examples=300)
@given(text=hostile_text, number=number_tokens)
def test_frame_is_one_line_and_exact(text, number):
    line = insert_line(
        column("text", 25, orjson.dumps(text))
        + b","
        + column("json", 114, orjson.dumps(orjson.dumps({"k": text}).decode()))
        + b","
        + column("n", 1700, number.encode())
    )
    change = decode_message(line)
    assert isinstance(change, RowChange)

    event = change_event(change, Position(1, 0), "t_changes", "t", 5)
    data = event_data(event.frame)["data"]

    assert event.frame.count(b"\n") == 3
    assert b"\r" not in event.frame
    assert data["text"] == text
    assert data["json"] == {"k": text}
    assert data["n"] == parse_exact(number)
