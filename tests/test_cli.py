"""The `cdc-stream` replay and status commands against a real server and journal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT
from redis_server import RedisServer
from streaming import (
    ORDERS_DDL,
    app_environment,
    change_events,
    execute,
    query,
    wait_streaming,
)


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    inherited = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CDC_", "DATABASE_URL"))
    }
    return subprocess.run(
        [sys.executable, "-m", "cdc_stream.cli", *args],
        cwd=REPO_ROOT,
        env={**inherited, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def ndjson(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line]


def test_replay_prints_journal_range(app_server, database, sse_stream, tmp_path):
    execute(database, ORDERS_DDL)
    env = app_environment(database, tmp_path)
    server = app_server(env)
    wait_streaming(server)
    client = sse_stream(server.url("/api/realtime"))
    client.next_event()
    for quantity in (1, 2, 3):
        execute(
            database,
            "INSERT INTO orders (market_id, side, quantity, price) "
            f"VALUES ('BTC-USD', 'buy', {quantity}, 10.5000)",
        )
    received = change_events(client, 3)
    first_id = received[0][0].id
    last_id = received[2][0].id

    after_first = run_cli("replay", "--from", first_id, "--format", "ndjson", env=env)
    up_to_last = run_cli(
        "replay",
        "--from",
        first_id,
        "--to",
        last_id,
        "--limit",
        "1",
        "--format",
        "ndjson",
        env=env,
    )
    text = run_cli("replay", "--from", first_id, env=env)

    assert after_first.returncode == 0, after_first.stderr
    assert [e["data"]["quantity"] for e in ndjson(after_first.stdout)] == [2, 3]
    assert [e["id"] for e in ndjson(up_to_last.stdout)] == [received[1][0].id]
    assert "10.5000" in text.stdout
    assert "2 events" in text.stderr


def test_replay_rejects_bad_position(database, tmp_path):
    env = app_environment(database, tmp_path)
    Path(env["CDC_JOURNAL_PATH"]).touch()

    result = run_cli("replay", "--from", "0/XYZ", env=env)

    assert result.returncode == 1
    assert "invalid resume point '0/XYZ'" in result.stderr


def test_peek_leaves_slot_untouched(database, tmp_path):
    execute(database, ORDERS_DDL)
    env = app_environment(database, tmp_path)
    slot = env["CDC_SLOT_NAME"]
    execute(
        database, f"SELECT pg_create_logical_replication_slot('{slot}', 'wal2json')"
    )
    execute(
        database,
        "INSERT INTO orders (market_id, side, quantity, price) "
        "VALUES ('ETH-USD', 'sell', 4, 2.2500)",
        "INSERT INTO orders (market_id, side, quantity, price) "
        "VALUES ('ETH-USD', 'sell', 5, 2.2500)",
    )
    (before,) = query(
        database,
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
        "WHERE slot_name = %s",
        (slot,),
    )

    result = run_cli("replay", "--peek", "--limit", "1", "--format", "ndjson", env=env)
    (after,) = query(
        database,
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
        "WHERE slot_name = %s",
        (slot,),
    )
    leftover = query(
        database,
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name <> %s",
        (slot,),
    )

    assert result.returncode == 0, result.stderr
    events = ndjson(result.stdout)
    assert [e["data"]["quantity"] for e in events] == [4]
    assert after == before
    assert leftover == [(0,)]


def test_status_reports_slot_and_journal(app_server, database, sse_stream, tmp_path):
    execute(database, ORDERS_DDL)
    env = app_environment(database, tmp_path)
    server = app_server(env)
    wait_streaming(server)
    client = sse_stream(server.url("/api/realtime"))
    client.next_event()
    execute(
        database,
        "INSERT INTO orders (market_id, side, quantity, price) "
        "VALUES ('BTC-USD', 'buy', 1, 1)",
    )
    ((event, _),) = change_events(client, 1)

    result = run_cli("status", "--url", server.base_url, env=env)

    assert result.returncode == 0, result.stderr
    assert f"slot             {env['CDC_SLOT_NAME']}" in result.stdout
    assert "held by pid" in result.stdout
    assert f"newest         {event.id}" in result.stdout
    assert "clients        1" in result.stdout
    assert "role           leader" in result.stdout


def test_replay_reads_redis_journal(app_server, database, sse_stream, tmp_path):
    server_process = RedisServer().start()
    try:
        execute(database, ORDERS_DDL)
        env = app_environment(
            database,
            tmp_path,
            CDC_JOURNAL_BACKEND="redis",
            CDC_REDIS_URL=server_process.url,
        )
        server = app_server(env)
        wait_streaming(server)
        client = sse_stream(server.url("/api/realtime"))
        client.next_event()
        execute(
            database,
            "INSERT INTO orders (market_id, side, quantity, price) "
            "VALUES ('BTC-USD', 'buy', 8, 1.2300)",
        )
        ((event, _),) = change_events(client, 1)

        replayed = run_cli("replay", "--from", "0/0", "--format", "ndjson", env=env)
        status = run_cli("status", env=env)
    finally:
        server_process.remove()

    assert replayed.returncode == 0, replayed.stderr
    assert [e["id"] for e in ndjson(replayed.stdout)] == [event.id]
    assert f"newest         {event.id}" in status.stdout
    assert "redis://127.0.0.1" in status.stdout
