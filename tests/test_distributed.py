"""End-to-end tests of distributed mode: app servers sharing a Redis journal.

Each app server runs under Hypercorn in a process group of its own, so that
SIGKILL to the group ends it at once, as when its machine dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import psycopg2
import pytest

from cdc_stream.cluster import find_free_port
from cdc_stream.config import Settings
from cdc_stream.errors import ConfigError
from cdc_stream.positions import parse_event_id, parse_lsn
from redis_server import RedisServer
from sse_client import SSEClient, SSEStreamClosed
from streaming import execute, health, parse_data, query, wait_until

STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# A standby retries the slot about every second, so it must take over well
# within this many seconds of the leader's death.
TAKEOVER_TIMEOUT = 15.0

BURST_DDL = """
CREATE TABLE burst (
    id bigserial PRIMARY KEY,
    txn integer NOT NULL,
    note text NOT NULL
);
"""
BURST_TRANSACTIONS = 300
KILL_AFTER_TRANSACTIONS = 100
# Every tenth transaction inserts 25 rows, the others one. The transaction
# just before the kill is larger than the replication reader's batch of 1000
# events, so it is stored in two appends.
LARGE_TRANSACTION_ROWS = 25
HUGE_TRANSACTION = KILL_AFTER_TRANSACTIONS - 1
HUGE_TRANSACTION_ROWS = 1500


def rows_in_transaction(txn: int) -> int:
    if txn == HUGE_TRANSACTION:
        return HUGE_TRANSACTION_ROWS
    return LARGE_TRANSACTION_ROWS if txn % 10 == 9 else 1


class AppProcess:
    """The app under Hypercorn, in a process group of its own."""

    def __init__(self, env: Mapping[str, str], directory: Path) -> None:
        self.port = find_free_port()
        self.log_path = directory / f"app-{self.port}.log"
        command = [
            sys.executable,
            "-m",
            "hypercorn",
            "cdc_stream.app:app",
            "--bind",
            f"127.0.0.1:{self.port}",
        ]
        inherited = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("CDC_", "DATABASE_URL"))
        }
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                command,
                cwd=directory,
                env={**inherited, "PYTHONUNBUFFERED": "1", **env},
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_until_answering(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"app exited with code {self.process.returncode}:\n" + self.output()
                )
            try:
                httpx.get(self.url("/healthz"), timeout=2, trust_env=False)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(
            f"app on port {self.port} did not respond within {STARTUP_TIMEOUT} s:\n"
            + self.output()
        )

    def kill(self) -> None:
        """Send SIGKILL to the whole process group and wait for the parent."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        """Send SIGTERM to the process group, then SIGKILL if it lingers."""
        if self.process.poll() is not None:
            self.kill()
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def start_app(tmp_path: Path) -> Iterator[Callable[[Mapping[str, str]], AppProcess]]:
    apps: list[AppProcess] = []

    def start(env: Mapping[str, str]) -> AppProcess:
        app = AppProcess(env, tmp_path)
        apps.append(app)
        app.wait_until_answering()
        return app

    yield start

    for app in apps:
        app.stop()


@pytest.fixture
def burst_db(database: str) -> str:
    execute(database, BURST_DDL)
    return database


def distributed_environment(
    database: str, redis_url: str, tmp_path: Path, config: str = ""
) -> dict[str, str]:
    env = {
        "DATABASE_URL": database,
        "CDC_SLOT_NAME": f"cdc_dist_{uuid.uuid4().hex[:10]}",
        "CDC_REDIS_URL": redis_url,
        "CDC_JOURNAL_BACKEND": "redis",
        "CDC_HEARTBEAT_SECONDS": "1",
    }
    if config:
        path = tmp_path / f"cdc-{uuid.uuid4().hex[:8]}.toml"
        path.write_text(config, encoding="utf-8")
        env["CDC_CONFIG"] = str(path)
    return env


def role_of(app: AppProcess) -> str | None:
    try:
        return health(app)["role"]
    except httpx.TransportError:
        return None


def write_burst(dsn: str, progress: list[int]) -> None:
    """Commit the burst transactions one by one, counting them in `progress`."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            for txn in range(BURST_TRANSACTIONS):
                for row in range(rows_in_transaction(txn)):
                    cur.execute(
                        "INSERT INTO burst (txn, note) VALUES (%s, %s)",
                        (txn, f"row {row} of transaction {txn}"),
                    )
                conn.commit()
                progress[0] = txn + 1
                time.sleep(0.005)
    finally:
        conn.close()


def burst_rows(dsn: str) -> list[dict[str, Any]]:
    rows = query(dsn, "SELECT id, txn, note FROM burst ORDER BY id")
    return [{"id": r[0], "txn": r[1], "note": r[2]} for r in rows]


class Collector:
    """Change events of the `burst` table read by one client, in order."""

    def __init__(self, client: SSEClient) -> None:
        self.client = client
        self.ids: list[str] = []
        self.rows: list[dict[str, Any]] = []
        self.ended = False

    def read_until(self, count: int, timeout: float) -> None:
        """Read until `count` rows arrived, the stream ended or `timeout` passed."""
        deadline = time.monotonic() + timeout
        while len(self.rows) < count and not self.ended:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                event = self.client.next_event(min(remaining, 2.0))
            except TimeoutError:
                continue
            except SSEStreamClosed:
                self.ended = True
                return
            data = parse_data(event)
            if data["type"] == "database_change" and data["table"] == "burst":
                assert event.id is not None
                self.ids.append(event.id)
                self.rows.append(data["data"])


def assert_strictly_increasing(event_ids: list[str]) -> None:
    positions = [parse_event_id(event_id) for event_id in event_ids]
    out_of_order = [
        event_ids[n + 1]
        for n in range(len(positions) - 1)
        if positions[n] >= positions[n + 1]
    ]
    assert out_of_order == []


def test_failover_delivers_every_event_once(
    burst_db, redis_server, start_app, sse_stream, tmp_path
):
    env = distributed_environment(burst_db, redis_server.url, tmp_path)
    first = start_app(env)
    wait_until(lambda: role_of(first) == "leader", 20, "the first server to lead")
    second = start_app(env)
    wait_until(lambda: role_of(second) == "standby", 20, "the second to stand by")

    on_first = sse_stream(first.url("/api/realtime"))
    on_second = sse_stream(second.url("/api/realtime"))
    for client in (on_first, on_second):
        assert parse_data(client.next_event())["type"] == "connection"
    survivor = Collector(on_second)
    victim = Collector(on_first)

    progress = [0]
    writer = threading.Thread(target=write_burst, args=(burst_db, progress))
    writer.start()
    wait_until(lambda: progress[0] >= KILL_AFTER_TRANSACTIONS, 30, "the burst to start")
    first.kill()
    killed_at = time.monotonic()
    wait_until(
        lambda: role_of(second) == "leader", TAKEOVER_TIMEOUT, "the standby to lead"
    )
    takeover_seconds = time.monotonic() - killed_at
    writer.join(60)
    assert not writer.is_alive()

    rows = burst_rows(burst_db)
    victim.read_until(len(rows), timeout=10)
    assert victim.ended
    assert victim.ids != []
    resumed = Collector(
        sse_stream(
            second.url("/api/realtime"), headers={"Last-Event-ID": victim.ids[-1]}
        )
    )
    resumed.read_until(len(rows) - len(victim.rows), timeout=30)
    survivor.read_until(len(rows), timeout=30)

    assert takeover_seconds < TAKEOVER_TIMEOUT
    assert len(rows) == sum(map(rows_in_transaction, range(BURST_TRANSACTIONS)))
    assert survivor.rows == rows
    assert_strictly_increasing(survivor.ids)
    assert victim.rows + resumed.rows == rows
    assert_strictly_increasing(victim.ids + resumed.ids)
    stored = redis_server.client().xlen(f"cdc-stream:{env['CDC_SLOT_NAME']}:events")
    assert stored == len(rows)

    # The tailer's blocking read must not hold up a graceful stop.
    stop_started = time.monotonic()
    second.stop()
    assert time.monotonic() - stop_started < 8.0


def slot_confirmed_lsn(dsn: str, slot_name: str) -> int:
    ((lsn,),) = query(
        dsn,
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
        "WHERE slot_name = %s",
        (slot_name,),
    )
    return parse_lsn(lsn)


def current_wal_lsn(dsn: str) -> int:
    ((lsn,),) = query(dsn, "SELECT pg_current_wal_lsn()::text")
    return parse_lsn(lsn)


def insert_row(dsn: str, txn: int) -> None:
    execute(dsn, f"INSERT INTO burst (txn, note) VALUES ({txn}, 'single')")


def test_redis_outage_keeps_streams_open(
    burst_db, redis_server, start_app, sse_stream, tmp_path
):
    config = """
[replication]
status_interval_seconds = 1
reconnect_max_seconds = 1
"""
    env = distributed_environment(burst_db, redis_server.url, tmp_path, config)
    app = start_app(env)
    wait_until(lambda: role_of(app) == "leader", 20, "the server to lead")
    before_outage = Collector(sse_stream(app.url("/api/realtime")))
    insert_row(burst_db, 1)
    before_outage.read_until(1, timeout=10)

    redis_server.stop()
    unconfirmed_from = current_wal_lsn(burst_db)
    insert_row(burst_db, 2)
    wait_until(lambda: health(app)["status"] == "degraded", 20, "/healthz to report it")
    during = health(app)
    during_outage = sse_stream(app.url("/api/realtime"))
    connection = parse_data(during_outage.next_event())
    heartbeat = parse_data(before_outage.client.next_event(5))
    time.sleep(2)
    confirmed_during_outage = slot_confirmed_lsn(burst_db, env["CDC_SLOT_NAME"])

    redis_server.start()
    wait_until(lambda: role_of(app) == "leader", 20, "the server to lead again")
    insert_row(burst_db, 3)
    before_outage.read_until(3, timeout=20)
    opened_during_outage = Collector(during_outage)
    opened_during_outage.read_until(2, timeout=10)
    # The restarted Redis is empty. A client that resumes from the first row
    # still gets the rows that the slot delivered again.
    resumed = Collector(
        sse_stream(
            app.url("/api/realtime"),
            headers={"Last-Event-ID": before_outage.ids[0]},
        )
    )
    resumed.read_until(2, timeout=10)

    assert during["role"] == "none"
    assert "Redis journal at redis://127.0.0.1" in during["replication"]["last_error"]
    assert during_outage.status_code == 200
    assert connection["type"] == "connection"
    assert heartbeat["type"] == "heartbeat"
    assert confirmed_during_outage <= unconfirmed_from
    assert [row["txn"] for row in before_outage.rows] == [1, 2, 3]
    assert [row["txn"] for row in opened_during_outage.rows] == [2, 3]
    assert [row["txn"] for row in resumed.rows] == [2, 3]
    assert health(app)["status"] == "ok"


def test_redis_url_alone_selects_redis():
    settings = Settings.from_env(
        {"DATABASE_URL": "dbname=app", "CDC_REDIS_URL": "redis://cache:6380/2"}
    )

    assert settings.journal_backend == "redis"
    assert settings.redis_url == "redis://cache:6380/2"


def test_backend_defaults_to_sqlite():
    settings = Settings.from_env({"DATABASE_URL": "dbname=app"})

    assert settings.journal_backend == "sqlite"


def test_backend_from_toml(tmp_path):
    path = tmp_path / "cdc.toml"
    path.write_text(
        '[journal]\nbackend = "redis"\nurl = "rediss://cache.internal:6390/1"\n'
    )

    settings = Settings.from_env(
        {"DATABASE_URL": "dbname=app", "CDC_CONFIG": str(path)}
    )

    assert settings.journal_backend == "redis"
    assert settings.redis_url == "rediss://cache.internal:6390/1"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CDC_JOURNAL_BACKEND": "kafka"}, "CDC_JOURNAL_BACKEND or [journal] backend"),
        ({"CDC_JOURNAL_BACKEND": "redis"}, "CDC_REDIS_URL or [journal] url"),
        ({"CDC_REDIS_URL": "http://u:pw@cache:6379/0"}, "scheme 'http'"),
        ({"CDC_REDIS_URL": "redis://u:pw@cache:port/0"}, "port is not a number"),
        ({"CDC_REDIS_URL": "redis://u:pw@cache:6379/db"}, "database number"),
        ({"CDC_REDIS_URL": "redis://u:pw@:6379/0"}, "host is missing"),
    ],
)
def test_invalid_journal_settings(env, expected):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"DATABASE_URL": "dbname=app", **env})

    assert expected in str(caught.value)
    assert "pw" not in str(caught.value)


def test_journal_url_must_be_string(tmp_path):
    path = tmp_path / "cdc.toml"
    path.write_text("[journal]\nurl = 6379\n")

    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"DATABASE_URL": "dbname=app", "CDC_CONFIG": str(path)})

    assert "journal.url" in str(caught.value)
