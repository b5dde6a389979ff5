"""End-to-end tests of the live stream: the real app under Hypercorn."""

from __future__ import annotations

import decimal
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg2
import pytest

from streaming import (
    ORDERS_DDL,
    app_environment,
    change_events,
    execute,
    health,
    parse_data,
    wait_streaming,
    wait_until,
)

TIMESTAMP_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
EVENT_ID_RE = re.compile(r"^[0-9A-F]+/[0-9A-F]+:\d+$")


@pytest.fixture
def orders_db(database: str) -> str:
    execute(database, ORDERS_DDL)
    return database


def start_streaming_app(app_server, database: str, tmp_path: Path, **extra: str):
    server = app_server(app_environment(database, tmp_path, **extra))
    wait_streaming(server)
    return server


def commit_with_times(dsn: str, *statements: str) -> tuple[int, datetime, datetime]:
    """Commit statements; return the xid and times just before and after commit."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
            cur.execute("SELECT txid_current()")
            (xid,) = cur.fetchone()
        before = datetime.now(UTC)
        conn.commit()
        after = datetime.now(UTC)
    finally:
        conn.close()
    return xid, before, after


def parse_timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_insert_update_delete_envelopes(app_server, orders_db, sse_stream, tmp_path):
    server = start_streaming_app(app_server, orders_db, tmp_path)
    client = sse_stream(server.url("/api/realtime"))

    first = client.next_event()
    assert first.id is None
    assert first.retry == 3000
    assert parse_data(first)["type"] == "connection"

    xid, before, after = commit_with_times(
        orders_db,
        "INSERT INTO orders (market_id, side, quantity, price) "
        "VALUES ('BTC-USD', 'buy', 3, 20893.1500)",
        "UPDATE orders SET status = 'filled' WHERE id = 1",
        "DELETE FROM orders WHERE id = 1",
    )
    received = change_events(client, 3)

    row = {
        "id": 1,
        "market_id": "BTC-USD",
        "side": "buy",
        "quantity": 3,
        "price": decimal.Decimal("20893.1500"),
        "status": "open",
    }
    expected = [
        ("INSERT", row),
        ("UPDATE", {**row, "status": "filled"}),
        ("DELETE", {"id": 1}),
    ]
    lsns = set()
    for index, ((event, data), (operation, values)) in enumerate(
        zip(received, expected, strict=True)
    ):
        assert data["type"] == "database_change"
        assert data["channel"] == "orders_changes"
        assert data["operation"] == operation
        assert data["table"] == "orders"
        assert data["schema"] == "public"
        assert data["data"] == values
        assert data["xid"] == xid
        assert event.id == data["id"]
        assert event.id == f"{data['lsn']}:{index}"
        assert EVENT_ID_RE.match(event.id)
        assert TIMESTAMP_RE.match(data["timestamp"])
        moment = parse_timestamp(data["timestamp"])
        assert before - timedelta(milliseconds=1) <= moment <= after
        lsns.add(data["lsn"])

    assert len(lsns) == 1
    assert "old" not in received[0][1]
    assert received[1][1]["old"] == {"id": 1}
    assert received[2][1]["old"] == {"id": 1}
    assert str(received[0][1]["data"]["price"]) == "20893.1500"


def test_stream_response_headers(app_server, orders_db, sse_stream, tmp_path):
    server = start_streaming_app(app_server, orders_db, tmp_path)
    client = sse_stream(server.url("/api/realtime"))
    client.next_event()

    assert client.status_code == 200
    assert client.headers["content-type"].startswith("text/event-stream")
    assert client.headers["cache-control"] == "no-cache"
    assert client.headers["x-accel-buffering"] == "no"


def test_heartbeats_at_configured_interval(app_server, orders_db, sse_stream, tmp_path):
    server = start_streaming_app(
        app_server, orders_db, tmp_path, CDC_HEARTBEAT_SECONDS="0.5"
    )
    client = sse_stream(server.url("/api/realtime"))
    client.next_event()
    execute(
        orders_db,
        "INSERT INTO orders (market_id, side, quantity, price) "
        "VALUES ('ETH-USD', 'sell', 1, 1.5)",
    )
    ((change, _),) = change_events(client, 1)

    started = time.monotonic()
    beats = [client.next_event(timeout=3) for _ in range(3)]
    elapsed = time.monotonic() - started

    for beat in beats:
        assert parse_data(beat)["type"] == "heartbeat"
        assert beat.id is None
        assert beat.last_event_id == change.id
        assert TIMESTAMP_RE.match(parse_data(beat)["timestamp"])
    assert elapsed < 3.0


def test_stream_outlives_response_timeout(app_server, orders_db, sse_stream, tmp_path):
    server = start_streaming_app(
        app_server, orders_db, tmp_path, CDC_HEARTBEAT_SECONDS="5"
    )
    client = sse_stream(server.url("/api/realtime"))
    client.next_event()

    # Quart's default RESPONSE_TIMEOUT is 60 s.
    time.sleep(65)
    execute(
        orders_db,
        "INSERT INTO orders (market_id, side, quantity, price) "
        "VALUES ('SOL-USD', 'buy', 7, 99.25)",
    )
    ((_, data),) = change_events(client, 1, timeout=15)

    assert data["data"]["market_id"] == "SOL-USD"


def test_filters_by_channel_table_and_operation(
    app_server, orders_db, sse_stream, tmp_path
):
    server = start_streaming_app(app_server, orders_db, tmp_path)
    by_channel = sse_stream(server.url("/api/realtime?channels=trades_changes"))
    by_table = sse_stream(server.url("/api/realtime?tables=public.orders"))
    by_operation = sse_stream(
        server.url("/api/realtime?operations=delete&operations=update")
    )
    for client in (by_channel, by_table, by_operation):
        client.next_event()

    execute(
        orders_db,
        "INSERT INTO orders (market_id, side, quantity, price) "
        "VALUES ('BTC-USD', 'buy', 1, 1)",
        "INSERT INTO trades (order_id, quantity) VALUES (1, 1)",
        "UPDATE orders SET status = 'filled' WHERE id = 1",
        "DELETE FROM trades WHERE id = 1",
    )

    channel_ops = [
        (d["table"], d["operation"]) for _, d in change_events(by_channel, 2)
    ]
    table_ops = [(d["table"], d["operation"]) for _, d in change_events(by_table, 2)]
    operation_ops = [
        (d["table"], d["operation"]) for _, d in change_events(by_operation, 2)
    ]

    assert channel_ops == [("trades", "INSERT"), ("trades", "DELETE")]
    assert table_ops == [("orders", "INSERT"), ("orders", "UPDATE")]
    assert operation_ops == [("orders", "UPDATE"), ("trades", "DELETE")]


def test_unknown_operation_rejected(app_server, orders_db, tmp_path):
    server = start_streaming_app(app_server, orders_db, tmp_path)

    response = httpx.get(
        server.url("/api/realtime?operations=insert,upsert"), trust_env=False
    )

    assert response.status_code == 400
    assert "'UPSERT'" in response.json()["message"]


def test_cors_preflight_allowed_and_refused(app_server, orders_db, tmp_path):
    server = start_streaming_app(
        app_server,
        orders_db,
        tmp_path,
        CDC_CORS_ORIGINS="https://dash.example.com,http://localhost:3000",
    )
    request_headers = {
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "last-event-id, cache-control",
    }

    allowed = httpx.options(
        server.url("/api/realtime"),
        headers={"Origin": "https://dash.example.com", **request_headers},
        trust_env=False,
    )
    refused = httpx.options(
        server.url("/api/realtime"),
        headers={"Origin": "https://evil.example.net", **request_headers},
        trust_env=False,
    )

    assert allowed.headers["access-control-allow-origin"] == "https://dash.example.com"
    assert allowed.headers["access-control-allow-credentials"] == "true"
    allowed_headers = allowed.headers["access-control-allow-headers"].lower()
    assert "last-event-id" in allowed_headers
    assert "cache-control" in allowed_headers
    assert "access-control-allow-origin" not in refused.headers


def test_dropped_client_frees_subscription(app_server, orders_db, sse_stream, tmp_path):
    server = start_streaming_app(app_server, orders_db, tmp_path)
    client = sse_stream(server.url("/api/realtime"))
    client.next_event()
    wait_until(lambda: health(server)["clients"] == 1, 5, "one client")

    client.close()

    wait_until(lambda: health(server)["clients"] == 0, 5, "the client to be freed")


def test_sigterm_with_open_streams_exits_quickly(
    app_server, orders_db, sse_stream, tmp_path
):
    server = start_streaming_app(app_server, orders_db, tmp_path)
    clients = [sse_stream(server.url("/api/realtime")) for _ in range(3)]
    for client in clients:
        client.next_event()

    started = time.monotonic()
    server.stop(timeout=15)
    elapsed = time.monotonic() - started

    assert not server.is_running()
    assert elapsed < 8.0
    assert "replication thread did not stop" not in server.output()


def test_unknown_table_or_channel_rejected(app_server, orders_db, tmp_path):
    server = start_streaming_app(app_server, orders_db, tmp_path)

    by_table = httpx.get(server.url("/api/realtime?tables=ordres"), trust_env=False)
    by_channel = httpx.get(
        server.url("/api/realtime?channels=orders_changes,order_changes"),
        trust_env=False,
    )

    assert by_table.status_code == 400
    assert "unknown table 'ordres' in 'tables'" in by_table.json()["message"]
    assert by_channel.status_code == 400
    assert "'order_changes'" in by_channel.json()["message"]


def test_table_created_later_accepted(app_server, orders_db, sse_stream, tmp_path):
    server = start_streaming_app(app_server, orders_db, tmp_path)
    client = sse_stream(server.url("/api/realtime?tables=orders"))
    client.next_event()

    execute(orders_db, "CREATE TABLE refunds (id int PRIMARY KEY)")
    # An unknown name rereads the table catalog at most once a second.
    time.sleep(1.1)
    later = sse_stream(server.url("/api/realtime?tables=public.refunds"))
    first = later.next_event()

    assert later.status_code == 200
    assert parse_data(first)["type"] == "connection"
