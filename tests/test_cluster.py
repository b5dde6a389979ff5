"""Tests of LocalCluster and the SQL scripts, against real PostgreSQL servers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from psycopg2.extensions import make_dsn, parse_dsn
from psycopg2.extras import LogicalReplicationConnection

from cdc_stream.cluster import (
    POSTGRES_OS_USER,
    ClusterError,
    LocalCluster,
    find_free_port,
)

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
STREAMED_TABLES = ("markets", "orders", "trades", "user_balances")


def _query_one(dsn: str, query: str, parameters: tuple[object, ...] = ()) -> object:
    connection = psycopg2.connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute(query, parameters)
            row = cursor.fetchone()
    finally:
        connection.close()
    assert row is not None
    return row[0]


def _run_script(dsn: str, name: str) -> None:
    connection = psycopg2.connect(dsn)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute((SQL_DIR / name).read_text(encoding="utf-8"))
    finally:
        connection.close()


def _require_local_cluster(pg_cluster: object) -> LocalCluster:
    if not isinstance(pg_cluster, LocalCluster):
        pytest.skip("runs only on the private cluster, not on CDC_TEST_DSN")
    return pg_cluster


@pytest.fixture
def private_cluster() -> Iterator[LocalCluster]:
    """Cluster of one test, initialised but not started."""
    base_dir = Path(tempfile.mkdtemp(prefix="cdc-stream-cluster-test-"))
    if os.geteuid() == 0:
        shutil.chown(base_dir, POSTGRES_OS_USER)

    cluster = LocalCluster(base_dir / "pgdata", find_free_port())
    try:
        cluster.init()
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(base_dir, ignore_errors=True)


def test_session_cluster_listens_on_loopback(pg_cluster: object) -> None:
    cluster = _require_local_cluster(pg_cluster)

    assert cluster.is_running()
    assert _query_one(cluster.dsn(), "SHOW listen_addresses") == "127.0.0.1"
    assert _query_one(cluster.dsn(), "SELECT host(inet_server_addr())") == "127.0.0.1"


def test_wal_level_is_logical(database: str) -> None:
    assert _query_one(database, "SHOW wal_level") == "logical"


def test_wal2json_slot_decodes_insert(database: str) -> None:
    connection = psycopg2.connect(database)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute("CREATE TABLE items (id integer PRIMARY KEY, name text)")
            cursor.execute(
                "SELECT pg_create_logical_replication_slot('items_slot', 'wal2json')"
            )
            cursor.execute("INSERT INTO items VALUES (1, 'first')")
            cursor.execute(
                "SELECT data FROM pg_logical_slot_get_changes("
                "'items_slot', NULL, NULL, 'format-version', '2')"
            )
            messages = [json.loads(row[0]) for row in cursor.fetchall()]
    finally:
        connection.close()

    assert [message["action"] for message in messages] == ["B", "I", "C"]
    insert = messages[1]
    assert insert["schema"] == "public"
    assert insert["table"] == "items"
    assert insert["columns"] == [
        {"name": "id", "type": "integer", "value": 1},
        {"name": "name", "type": "text", "value": "first"},
    ]


def test_drop_database_drops_active_slot(pg_cluster: object) -> None:
    cluster = _require_local_cluster(pg_cluster)
    name = "cdc_test_slot_owner"
    cluster.create_database(name)

    # A walsender streaming the slot keeps it active until it is terminated.
    replication = psycopg2.connect(
        cluster.dsn(name), connection_factory=LogicalReplicationConnection
    )
    try:
        cursor = replication.cursor()
        cursor.create_replication_slot("owned_slot", output_plugin="wal2json")
        cursor.start_replication("owned_slot")
        active = _query_one(
            cluster.dsn(),
            "SELECT active FROM pg_replication_slots WHERE slot_name = %s",
            ("owned_slot",),
        )
        assert active is True

        cluster.drop_database(name)
    finally:
        replication.close()

    slots = _query_one(
        cluster.dsn(),
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
        ("owned_slot",),
    )
    assert slots == 0
    databases = _query_one(
        cluster.dsn(), "SELECT count(*) FROM pg_database WHERE datname = %s", (name,)
    )
    assert databases == 0


def test_demo_schema_loads_twice(database: str) -> None:
    _run_script(database, "demo_schema.sql")
    _run_script(database, "demo_schema.sql")

    for table in STREAMED_TABLES:
        assert _query_one(database, f"SELECT to_regclass('public.{table}')") == table
    identity = _query_one(
        database, "SELECT relreplident FROM pg_class WHERE oid = 'orders'::regclass"
    )
    assert identity == "f"


def test_setup_role_streams_but_cannot_write(pg_cluster: object, database: str) -> None:
    _require_local_cluster(pg_cluster)
    _run_script(database, "demo_schema.sql")
    _run_script(database, "setup_role.sql")
    _run_script(database, "setup_role.sql")

    role_dsn = make_dsn(database, user="cdc_stream")
    connection = psycopg2.connect(role_dsn)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_create_logical_replication_slot('role_slot', 'wal2json')"
            )
            for table in STREAMED_TABLES:
                cursor.execute(f"SELECT count(*) FROM {table}")
                assert cursor.fetchone() == (0,)

            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                cursor.execute("DELETE FROM orders")
    finally:
        connection.close()


def test_restart_keeps_data(private_cluster: LocalCluster) -> None:
    private_cluster.start()
    private_cluster.create_database("kept")
    connection = psycopg2.connect(private_cluster.dsn("kept"))
    with connection, connection.cursor() as cursor:
        cursor.execute("CREATE TABLE kept (id integer)")
        cursor.execute("INSERT INTO kept VALUES (42)")
    connection.close()

    private_cluster.restart()
    assert private_cluster.is_running()
    assert _query_one(private_cluster.dsn("kept"), "SELECT id FROM kept") == 42

    private_cluster.stop("immediate")
    assert not private_cluster.is_running()

    private_cluster.start()
    assert _query_one(private_cluster.dsn("kept"), "SELECT id FROM kept") == 42


def test_init_reuses_existing_cluster(private_cluster: LocalCluster) -> None:
    config_path = private_cluster.data_dir / "postgresql.conf"
    config_before = config_path.read_text(encoding="utf-8")
    control_path = private_cluster.data_dir / "global" / "pg_control"
    control_before = control_path.read_bytes()

    private_cluster.init()

    assert config_path.read_text(encoding="utf-8") == config_before
    assert control_path.read_bytes() == control_before


def test_start_on_busy_port_fails(private_cluster: LocalCluster) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy_port = listener.getsockname()[1]
        private_cluster.port = busy_port

        with pytest.raises(ClusterError, match=f"port {busy_port}"):
            private_cluster.start()
    assert not private_cluster.is_running()


def test_stop_rejects_unknown_mode(private_cluster: LocalCluster) -> None:
    with pytest.raises(ValueError, match="invalid stop mode"):
        private_cluster.stop("abrupt")


def test_dsn_uses_loopback_tcp() -> None:
    cluster = LocalCluster(Path("/nonexistent"), 54321)

    assert parse_dsn(cluster.dsn("app", "reader")) == {
        "host": "127.0.0.1",
        "port": "54321",
        "dbname": "app",
        "user": "reader",
    }
    assert not cluster.is_running()
