"""Faults against the real app, PostgreSQL and clients: nothing lost or repeated.

Each test compares the rows that clients received with the rows in the
database, in commit order.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from streaming import (
    BURST_DDL,
    ResumingClient,
    app_environment,
    assert_delivered_once_in_order,
    burst_rows,
    child_pids,
    execute,
    health,
    insert_burst,
    kill_process_tree,
    parse_json,
    position_key,
    private_cluster,
    query,
    rss_bytes,
    wait_streaming,
    wait_until,
    write_config,
)


@pytest.fixture
def burst_db(database: str) -> str:
    execute(database, BURST_DDL)
    return database


def worker_pid(server) -> int:
    """Return the pid of the Hypercorn worker that serves the app."""
    workers = [
        pid
        for pid in child_pids(server.process.pid)
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(workers) == 1
    return workers[0]


def drop_slot_under_app(dsn: str, slot_name: str, timeout: float = 10.0) -> None:
    """End the walsender that streams the slot and drop the slot before the app
    reconnects."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        query(
            dsn,
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE slot_name = %s AND active_pid IS NOT NULL",
            (slot_name,),
        )
        dropped = query(
            dsn,
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s AND NOT active",
            (slot_name,),
        )
        if dropped:
            return
    raise AssertionError(f"could not drop slot {slot_name} within {timeout} s")


def test_app_killed_mid_burst(app_server, burst_db, sse_stream, tmp_path):
    env = app_environment(burst_db, tmp_path)
    server = app_server(env)
    wait_streaming(server)
    client = ResumingClient(sse_stream)
    client.connect(server.base_url)

    # The burst goes on in a thread, so that the app is killed while the rows
    # still arrive, however fast it streams them.
    inserter = threading.Thread(target=insert_burst, args=(burst_db, 40, 500))
    inserter.start()
    assert client.read_rows(3000)
    kill_process_tree(server.process.pid)
    ended = not client.read_until(lambda _: False, timeout=10)
    received_before_kill = len(client.changes)
    inserter.join()
    insert_burst(burst_db, 8, 500, first_batch=40)

    restarted = app_server(env)
    client.connect(restarted.base_url)
    insert_burst(burst_db, 8, 500, first_batch=48)
    client.read_rows(28_000, timeout=60)

    assert ended
    assert received_before_kill < 20_000
    assert client.notices == []
    assert_delivered_once_in_order(client.changes, burst_rows(burst_db))


def test_database_immediate_restart(app_server, sse_stream, tmp_path):
    with private_cluster() as cluster:
        cluster.create_database("app")
        dsn = cluster.dsn("app")
        execute(dsn, BURST_DDL)
        config = write_config(tmp_path, "[replication]\nreconnect_max_seconds = 1\n")
        server = app_server(app_environment(dsn, tmp_path, CDC_CONFIG=config))
        wait_streaming(server)
        client = ResumingClient(sse_stream)
        client.connect(server.base_url)

        insert_burst(dsn, 20, 500)
        assert client.read_rows(2000)
        cluster.stop("immediate")
        cluster.start()
        insert_burst(dsn, 20, 500, first_batch=20)
        client.read_rows(20_000, timeout=60)
        rows = burst_rows(dsn)

    assert client.connections == 1
    assert not client.ended
    assert client.notices == []
    assert_delivered_once_in_order(client.changes, rows)


class RawStream:
    """A raw HTTP/1.0 client of /api/realtime.

    HTTP/1.0 makes the body the plain event stream, ended by closing the
    connection. Frames are split on blank lines, which is enough for the
    app's frames (`id:` and `data:` lines ending in LF) and much faster than
    a general SSE parser, so a reading client keeps up with any burst. A
    stalled client reads nothing after the headers, and its small receive
    buffer makes the server's writes block soon.
    """

    def __init__(self, port: int, *, stalled: bool) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if stalled:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(60)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(
            b"GET /api/realtime HTTP/1.0\r\nHost: 127.0.0.1\r\n"
            b"Accept: text/event-stream\r\n\r\n"
        )
        self.events: list[tuple[str | None, dict]] = []
        self.closed = False
        self._buffer = b""

        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1024)
            assert chunk, "connection closed before the response headers"
            head += chunk
        self.status_line = head.partition(b"\r\n")[0]
        self._feed(head.split(b"\r\n\r\n", 1)[1])
        if not stalled:
            threading.Thread(target=self.read_to_end, daemon=True).start()

    def changes(self) -> list[tuple[str, dict]]:
        """Return the (event id, data) pairs of the `burst` changes read so far."""
        return [
            (event_id, data)
            for event_id, data in list(self.events)
            if event_id is not None and data.get("table") == "burst"
        ]

    def read_to_end(self) -> None:
        """Read and parse everything until the server closes the connection."""
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except OSError:
                break
            if not chunk:
                break
            self._feed(chunk)
        self.closed = True

    def close(self) -> None:
        self.sock.close()

    def _feed(self, chunk: bytes) -> None:
        frames = (self._buffer + chunk).split(b"\n\n")
        self._buffer = frames.pop()
        for frame in frames:
            event_id = None
            data = None
            for line in frame.split(b"\n"):
                if line.startswith(b"id: "):
                    event_id = line[4:].decode()
                elif line.startswith(b"data: "):
                    data = json.loads(line[6:])
            if data is not None:
                self.events.append((event_id, data))


def test_slow_client_ended_fast_one_not(app_server, burst_db, sse_stream, tmp_path):
    config = write_config(tmp_path, "[stream]\nqueue_size = 200\n")
    server = app_server(app_environment(burst_db, tmp_path, CDC_CONFIG=config))
    wait_streaming(server)
    worker = worker_pid(server)
    fast = RawStream(server.port, stalled=False)
    slow = RawStream(server.port, stalled=True)
    wait_until(lambda: health(server)["clients"] == 2, 10, "two clients")

    insert_burst(burst_db, 2, 500, pad=600)
    wait_until(lambda: len(fast.changes()) == 1000, 20, "the first rows")
    memory_before = rss_bytes(worker)
    insert_burst(burst_db, 38, 500, first_batch=2, pad=600)
    wait_until(
        lambda: len(fast.changes()) >= 20_000, 60, "every row at the fast client"
    )
    memory_growth = rss_bytes(worker) - memory_before

    slow.read_to_end()
    slow_changes = slow.changes()
    notice_id, notice = slow.events[-1]
    resumed = ResumingClient(sse_stream)
    resumed.last_id = notice["last_event_id"]
    resumed.connect(server.base_url)
    resumed.read_rows(20_000 - len(slow_changes), timeout=60)
    rows = burst_rows(burst_db)
    frame_bytes = sum(len(row["note"]) for row in rows)

    assert slow.status_line.split()[1] == b"200"
    assert not fast.closed
    assert [data["type"] for _, data in fast.events if "table" not in data] == [
        "connection"
    ]
    assert_delivered_once_in_order(fast.changes(), rows)
    assert notice["type"] == "slow_client"
    assert slow.closed
    assert 0 < len(slow_changes) < 20_000
    assert notice["last_event_id"] == slow_changes[-1][0]
    assert notice_id == notice["last_event_id"]
    assert resumed.notices == []
    assert_delivered_once_in_order(slow_changes + resumed.changes, rows)
    # Queued for the stalled client, the burst's frames would take more than
    # frame_bytes (12 MB). Two runs on a 2-core machine grew by 3.7 and 4.8 MB.
    assert memory_growth < frame_bytes * 3 // 4


def test_slot_dropped_journal_still_served(app_server, burst_db, sse_stream, tmp_path):
    env = app_environment(burst_db, tmp_path, CDC_HEARTBEAT_SECONDS="0.5")
    server = app_server(env)
    wait_streaming(server)
    live = ResumingClient(sse_stream)
    live.connect(server.base_url)
    insert_burst(burst_db, 2, 100)
    assert live.read_rows(200)

    drop_slot_under_app(burst_db, env["CDC_SLOT_NAME"])
    wait_until(
        lambda: "was dropped" in (health(server)["replication"]["last_error"] or ""),
        15,
        "the dropped slot to be reported",
    )
    status = health(server)
    heartbeat = parse_json(live.client.wait_for(lambda e: "heartbeat" in e.data).data)
    first_lsn = live.changes[0][1]["lsn"]
    late = ResumingClient(sse_stream, params={"from": first_lsn})
    late.connect(server.base_url)
    late.read_rows(200, timeout=10)

    assert status["status"] == "degraded"
    assert status["role"] == "none"
    assert env["CDC_SLOT_NAME"] in status["replication"]["last_error"]
    assert "recreate = true" in status["replication"]["last_error"]
    assert heartbeat["type"] == "heartbeat"
    assert late.notices == []
    assert_delivered_once_in_order(late.changes, burst_rows(burst_db))


def test_slot_recreated_tells_every_client(app_server, burst_db, sse_stream, tmp_path):
    config = write_config(tmp_path, "[slot]\nrecreate = true\n")
    env = app_environment(burst_db, tmp_path, CDC_CONFIG=config)
    # A table whose channel the filtered client reads; it gets no changes.
    execute(burst_db, "CREATE TABLE other (id int PRIMARY KEY)")
    server = app_server(env)
    wait_streaming(server)
    everything = ResumingClient(sse_stream)
    everything.connect(server.base_url)
    other_channel = ResumingClient(sse_stream, params={"channels": "other_changes"})
    other_channel.connect(server.base_url)
    insert_burst(burst_db, 2, 100)
    assert everything.read_rows(200)

    drop_slot_under_app(burst_db, env["CDC_SLOT_NAME"])
    everything.read_until(lambda client: client.notices != [], 20)
    other_channel.read_until(lambda client: client.notices != [], 5)
    wait_streaming(server)
    insert_burst(burst_db, 2, 100, first_batch=2)
    everything.read_rows(400)
    rows = burst_rows(burst_db)
    resuming = ResumingClient(sse_stream)
    resuming.last_id = everything.changes[99][0]
    resuming.connect(server.base_url)
    resuming.read_rows(300)

    (lost,) = everything.notices
    assert lost["type"] == "history_lost"
    assert other_channel.notices == [lost]
    assert other_channel.changes == []
    assert_delivered_once_in_order(everything.changes, rows)
    assert resuming.notices == [lost]
    assert_delivered_once_in_order(resuming.changes, rows[100:])
    assert not server.is_running() or health(server)["role"] == "leader"


def invalidate_slot(dsn: str, slot_name: str) -> None:
    """Make PostgreSQL invalidate the inactive slot by removing the WAL it needs."""

    def lost() -> bool:
        execute(dsn, "INSERT INTO burst (batch, seq, note) VALUES (-1, 0, 'wal')")
        query(dsn, "SELECT pg_switch_wal()")
        execute(dsn, "CHECKPOINT")
        ((status,),) = query(
            dsn,
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s",
            (slot_name,),
        )
        return status == "lost"

    wait_until(lost, 30, f"slot {slot_name} to be invalidated")


def test_slot_invalidated_then_recreated(app_server, sse_stream, tmp_path):
    with private_cluster() as cluster:
        cluster.create_database("app")
        dsn = cluster.dsn("app")
        execute(dsn, BURST_DDL)
        with (cluster.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("max_slot_wal_keep_size = '1MB'\n")
        query(dsn, "SELECT pg_reload_conf()")
        wait_until(
            lambda: query(dsn, "SHOW max_slot_wal_keep_size") == [("1MB",)],
            10,
            "the configuration to be reloaded",
        )
        env = app_environment(dsn, tmp_path)
        first = app_server(env)
        wait_streaming(first)
        client = ResumingClient(sse_stream)
        client.connect(first.base_url)
        insert_burst(dsn, 1, 100)
        client.read_rows(100)
        first.stop()
        invalidate_slot(dsn, env["CDC_SLOT_NAME"])

        without_recreate = app_server(env)
        wait_until(
            lambda: (
                "invalidated"
                in (health(without_recreate)["replication"]["last_error"] or "")
            ),
            20,
            "the invalidated slot to be reported",
        )
        error = health(without_recreate)["replication"]["last_error"]
        without_recreate.stop()
        config = write_config(tmp_path, "[slot]\nrecreate = true\n")
        recreated = app_server({**env, "CDC_CONFIG": config})
        wait_streaming(recreated)
        client.connect(recreated.base_url)
        client.read_until(lambda c: c.notices != [], 10)
        insert_burst(dsn, 1, 100, first_batch=1)
        client.read_rows(200)
        rows = burst_rows(dsn)

    assert env["CDC_SLOT_NAME"] in error
    assert "recreate = true" in error
    (notice,) = client.notices
    assert notice["type"] == "history_lost"
    assert position_key(client.changes[99][0]) < position_key(notice["id"])
    assert position_key(notice["id"]) < position_key(client.changes[100][0])
    assert_delivered_once_in_order(
        client.changes, [row for row in rows if row["batch"] != -1]
    )


def test_client_that_never_reads_is_closed(app_server, burst_db, tmp_path):
    config = write_config(
        tmp_path, "[stream]\nqueue_size = 200\nstuck_client_seconds = 2\n"
    )
    server = app_server(app_environment(burst_db, tmp_path, CDC_CONFIG=config))
    wait_streaming(server)
    stuck = RawStream(server.port, stalled=True)
    wait_until(lambda: health(server)["clients"] == 1, 10, "the client")

    insert_burst(burst_db, 40, 500, pad=600)
    wait_until(lambda: health(server)["clients"] == 0, 60, "the stuck client to end")
    stuck.read_to_end()

    assert stuck.closed
    assert "not reading for 2 s after falling behind" in server.output()
    assert health(server)["status"] == "ok"
