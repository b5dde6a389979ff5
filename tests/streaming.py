"""Helpers shared by the end-to-end tests of the stream."""

from __future__ import annotations

import decimal
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg2

from sse_client import SSEClient, SSEEvent

# Values past Python's int digit limit must parse in exactness tests.
sys.set_int_max_str_digits(0)

ORDERS_DDL = """
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    market_id text NOT NULL,
    side text NOT NULL,
    quantity integer NOT NULL,
    price numeric(12, 4) NOT NULL,
    status text NOT NULL DEFAULT 'open'
);
CREATE TABLE trades (
    id bigserial PRIMARY KEY,
    order_id bigint NOT NULL,
    quantity integer NOT NULL
);
"""


def parse_json(text: str) -> Any:
    """Parse JSON, keeping decimals exact."""
    return json.loads(text, parse_float=decimal.Decimal)


def parse_data(event: SSEEvent) -> dict[str, Any]:
    """Parse an event's JSON data, keeping decimals exact."""
    return parse_json(event.data)


def app_environment(database: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment of an app with its own slot and journal."""
    suffix = uuid.uuid4().hex[:10]
    env = {
        "DATABASE_URL": database,
        "CDC_SLOT_NAME": f"cdc_test_{suffix}",
        "CDC_JOURNAL_PATH": str(tmp_path / f"journal-{suffix}.sqlite3"),
    }
    env.update(extra)
    return env


def health(server: Any) -> dict[str, Any]:
    """Return the app's /healthz document."""
    response = httpx.get(server.url("/healthz"), timeout=5, trust_env=False)
    return response.json()


def wait_until(
    condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition"
) -> None:
    """Poll `condition` every 0.1 s until it holds; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_streaming(server: Any, timeout: float = 20.0) -> None:
    """Wait until the app streams the slot."""
    wait_until(
        lambda: health(server)["replication"]["state"] == "streaming",
        timeout,
        "replication to start streaming",
    )


def execute(dsn: str, *statements: str) -> None:
    """Run statements in one committed transaction."""
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


def query(dsn: str, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Run one query and return its rows."""
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall()
    finally:
        conn.close()


def change_events(client: SSEClient, count: int, timeout: float = 20.0) -> list[Any]:
    """Return the data of the next `count` change events, skipping the rest."""
    received = []
    deadline = time.monotonic() + timeout
    while len(received) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(
                f"timed out with {len(received)} of {count} change events"
            )
        event = client.next_event(remaining)
        data = parse_data(event)
        if data["type"] == "database_change":
            received.append((event, data))
    return received
