"""Start-up checks and failures, each against a real server or a real port."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdc_stream import cluster as cluster_module
from cdc_stream.cluster import LocalCluster, find_free_port
from conftest import REPO_ROOT
from streaming import (
    app_environment,
    change_events,
    execute,
    health,
    parse_data,
    wait_streaming,
    wait_until,
)


@pytest.fixture
def spare_cluster() -> Iterator[LocalCluster]:
    """An initialised but stopped cluster of this test's own."""
    base_dir = Path(tempfile.mkdtemp(prefix="cdc-stream-spare-"))
    if os.geteuid() == 0:
        shutil.chown(base_dir, cluster_module.POSTGRES_OS_USER)
    cluster = LocalCluster(base_dir / "pgdata", find_free_port())
    cluster.init()
    try:
        yield cluster
    finally:
        if cluster.is_running():
            cluster.stop("immediate")
        shutil.rmtree(base_dir, ignore_errors=True)


def append_config(cluster: LocalCluster, *lines: str) -> None:
    with (cluster.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
        conf.write("\n".join(lines) + "\n")


def last_error(server) -> str:
    return health(server)["replication"]["last_error"] or ""


def run_app_until_exit(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    inherited = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CDC_", "DATABASE_URL"))
    }
    port = find_free_port()
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "hypercorn",
            "cdc_stream.app:app",
            "--bind",
            f"127.0.0.1:{port}",
        ],
        cwd=REPO_ROOT,
        env={**inherited, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_missing_database_url_stops_with_message():
    result = run_app_until_exit({})

    assert "DATABASE_URL is missing" in result.stderr


def test_invalid_slot_name_stops_with_message(database, tmp_path):
    env = app_environment(database, tmp_path, CDC_SLOT_NAME="Orders-Slot")

    result = run_app_until_exit(env)

    assert "invalid slot name 'Orders-Slot'" in result.stderr
    assert "CDC_SLOT_NAME" in result.stderr


def test_wal_level_replica_reported(app_server, spare_cluster, tmp_path):
    append_config(spare_cluster, "wal_level = replica")
    spare_cluster.start()
    server = app_server(app_environment(spare_cluster.dsn(), tmp_path))

    wait_until(lambda: "wal_level" in last_error(server), 20, "the wal_level error")

    message = last_error(server)
    assert "'replica'" in message
    assert "ALTER SYSTEM SET wal_level = logical" in message
    assert health(server)["status"] == "degraded"


def test_plugin_not_allowed_reported(app_server, spare_cluster, tmp_path):
    append_config(spare_cluster, "output_plugin_libraries = 'pgoutput'")
    spare_cluster.start()
    server = app_server(app_environment(spare_cluster.dsn(), tmp_path))

    wait_until(
        lambda: "output_plugin_libraries" in last_error(server),
        20,
        "the plugin error",
    )

    assert "wal2json" in last_error(server)


def test_role_without_replication_reported(app_server, database, tmp_path):
    execute(database, "CREATE ROLE cdc_reader_norepl LOGIN")
    dsn = database.replace("user=postgres", "user=cdc_reader_norepl")
    server = app_server(app_environment(dsn, tmp_path))
    try:
        wait_until(lambda: "REPLICATION" in last_error(server), 20, "the role error")
        message = last_error(server)
    finally:
        server.stop()
        execute(database, "DROP ROLE cdc_reader_norepl")

    assert "'cdc_reader_norepl'" in message
    assert 'ALTER ROLE "cdc_reader_norepl" WITH REPLICATION' in message


def test_second_reader_of_slot_stands_by(app_server, database, sse_stream, tmp_path):
    execute(database, "CREATE TABLE items (id int PRIMARY KEY)")
    env = app_environment(database, tmp_path)
    first = app_server(env)
    wait_streaming(first)
    second = app_server({**env, "CDC_JOURNAL_PATH": str(tmp_path / "other.sqlite3")})

    wait_until(
        lambda: health(second)["replication"]["state"] == "standby",
        20,
        "the second reader to stand by",
    )

    assert health(second)["role"] == "standby"
    assert health(first)["role"] == "leader"


def test_database_down_then_up(app_server, spare_cluster, sse_stream, tmp_path):
    config = tmp_path / "cdc.toml"
    config.write_text("[replication]\nreconnect_max_seconds = 1\n", encoding="utf-8")
    server = app_server(
        app_environment(spare_cluster.dsn(), tmp_path, CDC_CONFIG=str(config))
    )
    client = sse_stream(server.url("/api/realtime"))

    first = client.next_event()
    wait_until(lambda: last_error(server) != "", 20, "the connection error")

    assert client.status_code == 200
    assert parse_data(first)["type"] == "connection"
    assert health(server)["replication"]["state"] in ("retrying", "connecting")
    assert "password" not in last_error(server).lower()

    spare_cluster.start()
    execute(spare_cluster.dsn(), "CREATE TABLE items (id int PRIMARY KEY)")
    wait_streaming(server, 30)
    execute(spare_cluster.dsn(), "INSERT INTO items VALUES (42)")
    ((_, data),) = change_events(client, 1)

    assert data["data"] == {"id": 42}


def test_unusable_journal_path_stops_with_message(database, tmp_path):
    env = app_environment(database, tmp_path, CDC_JOURNAL_PATH=str(tmp_path))

    result = run_app_until_exit(env)

    assert "cannot open the journal" in result.stderr
    assert "CDC_JOURNAL_PATH" in result.stderr
    assert str(tmp_path) in result.stderr
