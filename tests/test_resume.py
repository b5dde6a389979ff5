"""Resuming streams against the real app: by Last-Event-ID, event id, LSN and time.

Each test compares the rows that clients received with the rows in the
database, in commit order.
"""

from __future__ import annotations

import io
import random
import sqlite3
import threading
from datetime import UTC, datetime

import httpx
import psycopg2
import pytest

from streaming import (
    BURST_DDL,
    ResumingClient,
    app_environment,
    assert_delivered_once_in_order,
    burst_rows,
    execute,
    insert_burst,
    query,
    wait_streaming,
    wait_until,
    write_config,
)


@pytest.fixture
def burst_db(database: str) -> str:
    execute(database, BURST_DDL)
    return database


def copy_rows(dsn: str, batch: int, count: int) -> None:
    """Load `count` rows into `burst` with one COPY, in one transaction."""
    lines = "".join(f"{batch}\t{seq}\tcopied {seq}\n" for seq in range(1, count + 1))
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.copy_expert(
                "COPY burst (batch, seq, note) FROM STDIN", io.StringIO(lines)
            )
    finally:
        conn.close()


def journal_events(path: str) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        (count,) = conn.execute("SELECT count(*) FROM events").fetchone()
    finally:
        conn.close()
    return count


def test_random_disconnects_during_burst(app_server, burst_db, sse_stream, tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    server = app_server(app_environment(burst_db, tmp_path))
    wait_streaming(server)
    client = ResumingClient(sse_stream)
    client.connect(server.base_url)

    writer = threading.Thread(target=insert_burst, args=(burst_db, 20, 500))
    writer.start()
    for target in sorted(rng.sample(range(1, 10_000), 12)):
        client.read_rows(target)
        client.disconnect()
        client.connect(server.base_url)
    client.read_rows(10_000)
    writer.join(30)

    assert not writer.is_alive()
    assert client.connections == 13, f"seed {seed}"
    assert client.notices == [], f"seed {seed}"
    assert_delivered_once_in_order(client.changes, burst_rows(burst_db))


def test_copy_resumed_from_middle(app_server, burst_db, sse_stream, tmp_path):
    server = app_server(app_environment(burst_db, tmp_path))
    wait_streaming(server)
    live = ResumingClient(sse_stream)
    live.connect(server.base_url)

    insert_burst(burst_db, 1, 10)
    ((lsn_before_copy,),) = query(burst_db, "SELECT pg_current_wal_lsn()::text")
    time_before_copy = datetime.now(UTC).isoformat()
    copy_rows(burst_db, 1, 10_000)
    insert_burst(burst_db, 1, 10, first_batch=2)
    live.read_rows(10_020)
    rows = burst_rows(burst_db)
    copy_lsn = live.changes[10][1]["lsn"]
    middle_id = live.changes[10 + 4999][0]

    by_id = ResumingClient(sse_stream)
    by_id.last_id = middle_id
    by_id.connect(server.base_url)
    by_id.read_rows(5010)
    by_from_id = ResumingClient(sse_stream, params={"from": middle_id})
    by_from_id.connect(server.base_url)
    by_from_id.read_rows(5010)
    by_commit_lsn = ResumingClient(sse_stream, params={"from": copy_lsn})
    by_commit_lsn.connect(server.base_url)
    by_commit_lsn.read_rows(10_010)
    by_earlier_lsn = ResumingClient(sse_stream, params={"from": lsn_before_copy})
    by_earlier_lsn.connect(server.base_url)
    by_earlier_lsn.read_rows(10_010)
    by_time = ResumingClient(sse_stream, params={"from": time_before_copy})
    by_time.connect(server.base_url)
    by_time.read_rows(10_010)

    assert_delivered_once_in_order(live.changes, rows)
    assert middle_id == f"{copy_lsn}:4999"
    assert {data["lsn"] for _, data in live.changes[10:10_010]} == {copy_lsn}
    assert_delivered_once_in_order(by_id.changes, rows[10 + 5000 :])
    assert_delivered_once_in_order(by_from_id.changes, rows[10 + 5000 :])
    assert_delivered_once_in_order(by_commit_lsn.changes, rows[10:])
    assert_delivered_once_in_order(by_earlier_lsn.changes, rows[10:])
    assert_delivered_once_in_order(by_time.changes, rows[10:])
    for client in (by_id, by_from_id, by_commit_lsn, by_earlier_lsn, by_time):
        assert client.notices == []


def test_resume_older_than_retention(app_server, burst_db, sse_stream, tmp_path):
    config = write_config(tmp_path, "[journal]\nmax_events = 1000\n")
    env = app_environment(burst_db, tmp_path, CDC_CONFIG=config)
    server = app_server(env)
    wait_streaming(server)
    live = ResumingClient(sse_stream)
    live.connect(server.base_url)
    time_before_burst = datetime.now(UTC).isoformat()

    insert_burst(burst_db, 30, 100)
    live.read_rows(3000)
    wait_until(
        lambda: journal_events(env["CDC_JOURNAL_PATH"]) <= 1000,
        25,
        "the journal to be pruned to 1000 events",
    )
    journal_size = journal_events(env["CDC_JOURNAL_PATH"])
    by_id = ResumingClient(sse_stream)
    by_id.last_id = live.changes[0][0]
    by_id.connect(server.base_url)
    by_id.read_rows(1000)
    by_time = ResumingClient(sse_stream, params={"from": time_before_burst})
    by_time.connect(server.base_url)
    by_time.read_rows(1000)
    insert_burst(burst_db, 1, 10, first_batch=30)
    by_id.read_rows(1010)
    rows = burst_rows(burst_db)

    oldest_held = live.changes[2000][0]
    assert journal_size == 1000
    for client in (by_id, by_time):
        (notice,) = client.notices
        assert notice["type"] == "history_lost"
        assert notice["oldest_id"] == oldest_held
        assert_delivered_once_in_order(client.changes[:1000], rows[2000:3000])
    assert by_id.notices[0]["requested"] == live.changes[0][0]
    assert by_time.notices[0]["requested"] == time_before_burst
    assert_delivered_once_in_order(by_id.changes, rows[2000:])


def test_unparseable_resume_point_rejected(app_server, burst_db, tmp_path):
    server = app_server(app_environment(burst_db, tmp_path))
    url = server.url("/api/realtime")
    cases = [
        ({"Last-Event-ID": "not-an-id"}, {}, "Last-Event-ID", "not-an-id"),
        ({}, {"from": "0/16B3748:x"}, "'from'", "0/16B3748:x"),
        ({}, {"from": "yesterday"}, "'from'", "yesterday"),
        ({}, {"from": "0/XYZ"}, "'from'", "0/XYZ"),
        ({"Last-Event-ID": "1/2:3:4"}, {"from": "0/0"}, "Last-Event-ID", "1/2:3:4"),
    ]

    for headers, params, source, value in cases:
        response = httpx.get(
            url, headers=headers, params=params, trust_env=False, timeout=5
        )

        assert response.status_code == 400, value
        body = response.json()
        assert body["error"] == "bad_request"
        assert repr(value) in body["message"]
        assert body["message"].startswith(source)
