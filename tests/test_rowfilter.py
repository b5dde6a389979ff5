"""Row filters and column lists against the real app, plus the parser."""

from __future__ import annotations

import decimal

import httpx
import pytest

from cdc_stream.envelope import Event
from cdc_stream.hub import EventFilter, Hub
from cdc_stream.positions import Position
from cdc_stream.rowfilter import (
    FilterError,
    compile_filters,
    parse_condition,
    parse_filters,
)
from cdc_stream.table_columns import Column, Table
from cdc_stream.transform import ParsedEvents, View, dumps_exact, parse_exact
from streaming import change_events, execute, parse_json, query, wait_until
from webtools import create_tables, get, module_app

FLAGS_DDL = """
CREATE TABLE flags (
    id integer PRIMARY KEY,
    active boolean NOT NULL,
    seen_at timestamptz NOT NULL,
    score double precision NOT NULL,
    amount numeric NOT NULL
);
ALTER TABLE flags REPLICA IDENTITY FULL;
"""


def prepare(dsn: str) -> None:
    create_tables(dsn)
    execute(dsn, FLAGS_DDL)


@pytest.fixture(scope="module")
def served(pg_cluster):
    with module_app(pg_cluster, prepare=prepare) as (server, dsn):
        yield server, dsn


def open_filtered(sse_stream, server, **params):
    client = sse_stream(server.url("/api/realtime"), params=params)
    assert client.status_code == 200, client.body
    client.next_event()
    return client


def insert_order(dsn: str, market: str, price: str, quantity: int = 1) -> None:
    execute(
        dsn,
        "INSERT INTO orders (market_id, side, quantity, price) "
        f"VALUES ('{market}', 'buy', {quantity}, {price})",
    )


def test_eq_filter_selects_market(served, sse_stream):
    server, dsn = served
    client = open_filtered(
        sse_stream,
        server,
        channels="orders_changes",
        filter="market_id=eq.test-market-123",
    )

    insert_order(dsn, "other-market", "1")
    insert_order(dsn, "test-market-123", "2")
    ((_, data),) = change_events(client, 1)

    assert data["data"]["market_id"] == "test-market-123"
    assert data["data"]["price"] == decimal.Decimal("2")


def test_numbers_compare_exactly(served, sse_stream):
    server, dsn = served
    client = open_filtered(
        sse_stream,
        server,
        channels="orders_changes",
        filter=["price=gt.20893.15", "market_id=eq.exact"],
    )

    for price in ("20893.1500", "20893.1499", "20893.1501", "100000"):
        insert_order(dsn, "exact", price)
    prices = [str(d["data"]["price"]) for _, d in change_events(client, 2)]

    assert prices == ["20893.1501", "100000.0000"]


def test_operators_on_typed_columns(served, sse_stream):
    server, dsn = served
    cases = {
        "active=eq.true": [1, 3],
        "seen_at=lt.2024-06-01T00:00:00Z": [1],
        "seen_at=lte.2024-06-01T02:00:00+02:00": [1, 2],
        "seen_at=gte.2024-06-01": [2, 3],
        "amount=gt.1e308": [3],
        "score=gt.2": [3],
        "score=lte.-1.5": [2],
        "amount=in.(1.50,99999999999999999999.000000001)": [1, 2],
        "amount=neq.1.5": [2, 3],
        "id=in.(1,3)": [1, 3],
        "id=gt.1": [2, 3],
    }
    watcher = open_filtered(sse_stream, server, channels="flags_changes")

    execute(
        dsn,
        "INSERT INTO flags VALUES "
        "(1, true, '2024-01-01T00:00:00Z', 0, 1.5), "
        "(2, false, '2024-06-01T00:00:00Z', -1.5, 99999999999999999999.000000001), "
        "(3, true, '2024-12-31T23:59:59Z', 2.5, 1e400)",
    )
    first = change_events(watcher, 3)[0][1]

    for text, expected in cases.items():
        replay = get(
            server,
            "/api/replay",
            params={
                "from": first["lsn"],
                "format": "ndjson",
                "channels": "flags_changes",
                "filter": text,
            },
        )
        lines = [parse_json(line) for line in replay.text.splitlines()]
        received = [line["data"]["id"] for line in lines]
        assert received == expected, (text, replay.text)


def test_delete_filtered_on_old_row(served, sse_stream):
    server, dsn = served
    client = open_filtered(
        sse_stream,
        server,
        channels="orders_changes",
        operations="DELETE",
        filter="market_id=eq.delete-me",
    )

    insert_order(dsn, "keep-me", "1")
    insert_order(dsn, "delete-me", "2")
    execute(dsn, "DELETE FROM orders WHERE market_id IN ('keep-me', 'delete-me')")
    ((_, data),) = change_events(client, 1)

    assert data["operation"] == "DELETE"
    assert data["data"]["market_id"] == "delete-me"


def test_columns_keep_exact_numbers(served, sse_stream):
    server, dsn = served
    client = open_filtered(
        sse_stream,
        server,
        channels="flags_changes",
        columns="id,amount",
        filter="id=eq.40",
    )

    execute(
        dsn,
        "INSERT INTO flags VALUES "
        "(40, true, now(), 1, 123456789012345678901234567890.000000000000000001)",
    )
    ((event, data),) = change_events(client, 1)

    assert data["data"] == {
        "id": 40,
        "amount": decimal.Decimal("123456789012345678901234567890.000000000000000001"),
    }
    assert '"amount":123456789012345678901234567890.000000000000000001' in event.data
    assert data["channel"] == "flags_changes"


def test_filter_only_shares_frame(served, sse_stream):
    server, dsn = served
    plain = open_filtered(sse_stream, server, channels="orders_changes")
    filtered = open_filtered(
        sse_stream, server, channels="orders_changes", filter="market_id=eq.same"
    )

    insert_order(dsn, "same", "3.1400")
    ((plain_event, _),) = change_events(plain, 1)
    ((filtered_event, _),) = change_events(filtered, 1)

    assert filtered_event.data == plain_event.data
    assert filtered_event.id == plain_event.id


def test_replay_applies_filter(served, sse_stream):
    server, dsn = served
    watcher = open_filtered(sse_stream, server, channels="orders_changes")
    insert_order(dsn, "before-replay", "1")
    ((first, _),) = change_events(watcher, 1)
    insert_order(dsn, "replay-a", "1")
    insert_order(dsn, "replay-b", "2")
    change_events(watcher, 2)

    replay = get(
        server,
        "/api/replay",
        params={
            "from": first.id,
            "format": "ndjson",
            "channels": "orders_changes",
            "filter": "market_id=eq.replay-b",
            "columns": "market_id",
        },
    )
    resumed = sse_stream(
        server.url("/api/realtime"),
        headers={"Last-Event-ID": first.id},
        params={"channels": "orders_changes", "filter": "market_id=eq.replay-a"},
    )
    ((_, resumed_data),) = change_events(resumed, 1)

    lines = [parse_json(line) for line in replay.text.splitlines()]
    assert replay.status_code == 200
    assert [line["data"] for line in lines] == [{"market_id": "replay-b"}]
    assert resumed_data["data"]["market_id"] == "replay-a"


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"filter": "market_id=eq.x"}, "'market_id'"),
        ({"channels": "orders_changes", "filter": "nope=eq.1"}, "'nope'"),
        ({"channels": "orders_changes", "filter": "market_id"}, "'market_id'"),
        ({"channels": "orders_changes", "filter": "price=gt.abc"}, "'abc'"),
        ({"channels": "orders_changes", "filter": "price=like.1"}, "'like'"),
        ({"channels": "orders_changes", "filter": "id=in.1,2"}, "'id=in.1,2'"),
        ({"channels": "orders_changes", "filter": 'id=in.("1)'}, "quote"),
        ({"channels": "flags_changes", "filter": "active=eq.maybe"}, "'maybe'"),
        ({"channels": "flags_changes", "filter": "seen_at=lt.soon"}, "'soon'"),
        ({"channels": "orders_changes", "columns": "id,ghost"}, "'ghost'"),
        ({"channels": "orders_changes", "columns": ","}, "'columns'"),
        ({"channels": "nowhere", "filter": "id=eq.1"}, "no streamed table"),
    ],
)
def test_invalid_filters_get_400(served, params, named):
    server, _ = served

    response = get(server, "/api/realtime", params=params)

    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"
    assert named in response.json()["message"]


def test_new_column_found_after_refresh(served, sse_stream):
    server, dsn = served
    params = {"channels": "trades_changes", "filter": "venue=eq.XNAS"}
    execute(dsn, "ALTER TABLE trades ADD COLUMN venue text")

    wait_until(
        lambda: (
            get(server, "/api/replay", params={**params, "from": "0/0"}).status_code
            == 200
        ),
        10,
        "the new column to be accepted",
    )
    client = open_filtered(sse_stream, server, **params)
    execute(
        dsn,
        "INSERT INTO trades (order_id, quantity, venue) VALUES (1, 1, 'XLON')",
        "INSERT INTO trades (order_id, quantity, venue) VALUES (2, 1, 'XNAS')",
    )
    ((_, data),) = change_events(client, 1)

    assert data["data"]["venue"] == "XNAS"


def test_injection_attempts_stay_data(served, sse_stream):
    server, dsn = served
    before = query(dsn, "SELECT count(*) FROM orders")[0][0]
    hostile_values = [
        "x'; DROP TABLE orders; --",
        'x"); DELETE FROM orders; --',
        "1 OR 1=1",
        "$$; TRUNCATE orders; $$",
    ]
    clients = [
        open_filtered(
            sse_stream, server, channels="orders_changes", filter=f"market_id=eq.{v}"
        )
        for v in hostile_values
    ]
    hostile_columns = [
        "id;DROP TABLE orders",
        'id" OR 1--',
        "market_id)--",
        "pg_sleep(5)",
    ]
    responses = [
        get(
            server,
            "/api/realtime",
            params={"channels": "orders_changes", "filter": f"{c}=eq.1"},
        )
        for c in hostile_columns
    ]

    insert_order(dsn, "x''; DROP TABLE orders; --", "1")
    ((_, data),) = change_events(clients[0], 1)

    assert data["data"]["market_id"] == "x'; DROP TABLE orders; --"
    for response, column in zip(responses, hostile_columns, strict=True):
        assert response.status_code == 400
        assert repr(column) in response.json()["message"]
    assert query(dsn, "SELECT count(*) FROM orders")[0][0] == before + 1
    assert query(dsn, "SELECT to_regclass('public.orders') IS NOT NULL")[0][0]


def test_oversized_filters_rejected(served):
    server, _ = served
    many = [f"id=eq.{n}" for n in range(17)]
    long_list = "id=in.(" + ",".join(str(n) for n in range(300)) + ")"
    cases = [
        ({"channels": "orders_changes", "filter": many}, "too many filters"),
        ({"channels": "orders_changes", "filter": long_list}, "1 to 256 values"),
        (
            {"channels": "orders_changes", "filter": "market_id=eq." + "x" * 3000},
            "longer than",
        ),
    ]

    for params, message in cases:
        response = get(server, "/api/realtime", params=params)
        assert response.status_code == 400, message
        assert message in response.json()["message"]


def test_oversized_request_line_rejected(served):
    server, _ = served

    response = httpx.get(
        server.url("/api/realtime?filter=id=eq." + "9" * 30_000),
        trust_env=False,
        timeout=10,
    )
    health = get(server, "/healthz")

    assert response.status_code in (400, 413, 414, 431)
    assert health.status_code == 200


def test_parse_quoted_in_list():
    condition = parse_condition('note=in.("a,b","say \\"hi\\"",plain,"")')

    assert condition.operator == "in"
    assert condition.values == ("a,b", 'say "hi"', "plain", "")


def test_parse_value_keeps_dots_and_equals():
    condition = parse_condition("note=eq.a.b=c")

    assert condition.column == "note"
    assert condition.values == ("a.b=c",)


def test_parse_rejects_malformed():
    for text in ("=eq.1", "id=eq", "id", "id=in.()", "id=in.(1"):
        with pytest.raises(FilterError):
            parse_filters([text])


def test_nan_sorts_above_numbers():
    column = Column("amount", "N", "numeric")
    table = Table("public", "t", "t_changes", {"amount": column})

    def matching(text: str) -> list[str]:
        row_filter = compile_filters([parse_condition(text)], [table])
        values = ["NaN", "Infinity", "-Infinity", "1e400"]
        return [v for v in values if row_filter.matches("public", "t", {"amount": v})]

    assert matching("amount=gt.1e999") == ["NaN", "Infinity"]
    assert matching("amount=eq.NaN") == ["NaN"]
    assert matching("amount=lt.0") == ["-Infinity"]
    assert matching("amount=neq.NaN") == ["Infinity", "-Infinity", "1e400"]


def test_exact_json_round_trip():
    text = '{"a":1.500,"b":123456789012345678901234567890,"c":[1e400,-0.0],"d":"x"}'

    assert dumps_exact(parse_exact(text)).decode() == text


def test_views_leave_shared_frames_alone():
    frame = (
        b'id: 0/10:0\ndata: {"type":"database_change","channel":"c",'
        b'"operation":"INSERT","table":"t","data":{"id":1,"secret":2.50}}\n\n'
    )
    event = Event(Position(16, 0), "public", "t", "c", "INSERT", frame, 1.0)
    hub = Hub(Position(0, -1))
    plain = hub.subscribe(EventFilter(), 10)
    other_channel = hub.subscribe(
        EventFilter(), 10, View(ParsedEvents(), hidden={"d": frozenset({"secret"})})
    )
    masked = hub.subscribe(
        EventFilter(), 10, View(ParsedEvents(), hidden={"c": frozenset({"secret"})})
    )

    hub.publish([event])

    assert plain.drain() is frame
    assert other_channel.drain() is frame
    assert masked.drain() == frame.replace(b',"secret":2.50', b"")
