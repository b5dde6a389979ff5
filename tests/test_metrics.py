"""Metrics, readiness and logs of the real app."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg2.extensions import make_dsn, parse_dsn

from cdc_stream import metrics as metrics_module
from cdc_stream import web
from cdc_stream.authconfig import AuthSettings
from cdc_stream.config import Settings
from cdc_stream.logsetup import JsonFormatter, RepeatLimiter
from streaming import change_events, execute, wait_until
from webtools import get, module_app, start_app


@pytest.fixture(scope="module")
def served(pg_cluster):
    with module_app(pg_cluster) as (server, dsn):
        yield server, dsn


def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = get(server, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_count_events_and_clients(served, sse_stream):
    server, dsn = served
    before = scrape(server)
    client = sse_stream(server.url("/api/realtime"))
    client.next_event()
    execute(
        dsn,
        "INSERT INTO orders (market_id, side, quantity, price) "
        "VALUES ('ROWDATA-SECRET-77', 'buy', 1, 1), ('M-2', 'sell', 2, 2)",
        "UPDATE orders SET status = 'filled' WHERE market_id = 'M-2'",
    )
    change_events(client, 3)

    samples = scrape(server)
    inserts = {"table": "public.orders", "operation": "INSERT"}
    updates = {"table": "public.orders", "operation": "UPDATE"}
    key = ("cdc_stream_events_total", tuple(sorted(inserts.items())))

    assert (
        value(samples, "cdc_stream_events_total", **inserts) == before.get(key, 0) + 2
    )
    assert value(samples, "cdc_stream_events_total", **updates) >= 1
    assert value(samples, "cdc_stream_clients") == 1
    assert value(samples, "cdc_stream_commit_to_send_seconds_count") >= 1
    assert value(samples, "cdc_stream_replication_state", state="streaming") == 1
    assert value(samples, "cdc_stream_replication_lag_bytes") >= 0
    assert value(samples, "cdc_stream_replication_lag_seconds") >= 0
    assert value(samples, "cdc_stream_slot_retained_wal_bytes") > 0
    assert value(samples, "cdc_stream_journal_size_bytes") > 0
    assert value(samples, "cdc_stream_journal_events") >= 3
    assert value(samples, "cdc_stream_slow_clients_ended_total") == 0
    assert "ROWDATA-SECRET-77" not in server.output()


def test_readyz_ready_when_streaming(served):
    server, _ = served

    response = get(server, "/readyz")

    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


def test_readyz_reports_replication_failure(app_server, database, tmp_path):
    parameters = parse_dsn(database)
    missing = make_dsn(**{**parameters, "dbname": parameters["dbname"] + "_missing"})
    server = app_server(
        {"DATABASE_URL": missing, "CDC_JOURNAL_PATH": str(tmp_path / "j.sqlite3")}
    )

    wait_until(
        lambda: (
            get(server, "/readyz").status_code == 503
            and "does not exist" in get(server, "/readyz").json()["reason"]
        ),
        20,
        "readiness to report the missing database",
    )
    body = get(server, "/readyz").json()

    assert body["status"] == "unavailable"
    assert body["reason"].startswith("replication is ")
    assert get(server, "/healthz").status_code == 200


async def test_readiness_reports_unreadable_journal():
    def broken() -> None:
        raise OSError("disk gone")

    stream = SimpleNamespace(
        journal=SimpleNamespace(last_position=broken),
        reader=SimpleNamespace(status=SimpleNamespace(state="streaming")),
    )

    problem = await web._readiness_problem(stream)

    assert problem == "journal unreadable: OSError: disk gone"


def test_slow_client_counted(app_server, database, tmp_path):
    execute(database, "CREATE TABLE bulk (id serial PRIMARY KEY, note text)")
    server = start_app(app_server, database, tmp_path, "[stream]\nqueue_size = 50\n")
    # A small receive buffer, set before connecting, keeps the kernel from
    # absorbing megabytes for a client that does not read.
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", server.port))
    stalled.sendall(b"GET /api/realtime HTTP/1.1\r\nHost: cdc\r\n\r\n")
    received = bytearray()
    try:
        wait_until(lambda: value(scrape(server), "cdc_stream_clients") == 1, 10)
        for _ in range(8):
            execute(
                database,
                "INSERT INTO bulk (note) SELECT repeat('x', 1000) "
                "FROM generate_series(1, 1000)",
            )
        time.sleep(1)
        # Reading again lets the blocked write finish, so the server detects the
        # overflow, sends its notice and ends the stream.
        stalled.settimeout(30)
        while chunk := stalled.recv(1 << 20):
            received += chunk
            if received.endswith(b"\r\n0\r\n\r\n"):
                break
    finally:
        stalled.close()

    assert b'"type":"slow_client"' in received
    assert value(scrape(server), "cdc_stream_slow_clients_ended_total") == 1
    assert value(scrape(server), "cdc_stream_clients") == 0


def test_slot_query_cached_and_off_loop(tmp_path, monkeypatch):
    calls: list[str] = []

    def fake_query(self):
        calls.append(threading.current_thread().name)
        return metrics_module.SlotSample(10, 20, True, 0.5)

    monkeypatch.setattr(metrics_module.SlotSampler, "_query", fake_query)
    # Importing the module builds its `app` from the environment.
    monkeypatch.setenv("DATABASE_URL", "dbname=unused")
    monkeypatch.setenv("CDC_JOURNAL_PATH", str(tmp_path / "module.sqlite3"))
    create_app = importlib.import_module("cdc_stream.app").create_app
    # The test client's scope has no loopback server address, so the app runs
    # open to let /metrics respond without a token.
    settings = Settings(
        database_url="dbname=unused",
        journal_path=str(tmp_path / "j.sqlite3"),
        auth=AuthSettings(mode="open"),
    )
    app = create_app(settings)

    async def scrape_twice() -> tuple[list[bytes], str]:
        client = app.test_client()
        bodies = [await (await client.get("/metrics")).get_data() for _ in range(2)]
        return bodies, threading.current_thread().name

    bodies, loop_thread = asyncio.run(scrape_twice())

    assert len(calls) == 1
    assert calls[0] != loop_thread
    assert b"cdc_stream_slot_retained_wal_bytes 20.0" in bodies[1]


def test_json_logs_and_repeat_limit(app_server, database, tmp_path):
    server = start_app(app_server, database, tmp_path, env={"CDC_LOG_FORMAT": "json"})

    for _ in range(20):
        get(server, "/metrics", headers={"X-Forwarded-For": "198.51.100.7"})
    time.sleep(0.5)
    lines = [line for line in server.output().splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    rejected = [e for e in entries if e["logger"] == "cdc_stream.web"]

    assert any(e["logger"] == "cdc_stream.replication" for e in entries)
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert len(rejected) == 5
    assert sum("NO TOKENS CONFIGURED" in e["message"] for e in entries) == 1


def test_repeat_limiter_reports_suppressed():
    limiter = RepeatLimiter(burst=2, window=0.2)
    records = [
        logging.LogRecord("x", logging.WARNING, __file__, 1, "failed: %s", ("a",), None)
        for _ in range(6)
    ]

    passed = [limiter.filter(record) for record in records[:5]]
    time.sleep(0.25)
    later = limiter.filter(records[5])
    entry = json.loads(JsonFormatter().format(records[5]))

    assert passed == [True, True, False, False, False]
    assert later is True
    assert entry["suppressed_repeats"] == 3
    assert entry["message"] == "failed: a [3 repeats suppressed]"


def test_repeat_limiter_passes_new_message():
    limiter = RepeatLimiter(burst=1, window=60)

    def record(text: str) -> logging.LogRecord:
        return logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "replication failed: %s", (text,), None
        )

    first = limiter.filter(record("wal_level is 'replica'"))
    repeat = limiter.filter(record("wal_level is 'replica'"))
    changed = limiter.filter(record("wal2json is not allowed"))

    assert first is True
    assert repeat is False
    assert changed is True
