"""Several Hypercorn workers on one journal: the slot elects the holder.

Each worker process tries to stream the slot; the one that gets it appends
to the journal and the others tail it, taking the slot over when the holder
stops replying to PostgreSQL. Clients of every worker must receive every row
once, in commit order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg2.extensions import parse_dsn

from cdc_stream.cluster import find_free_port
from conftest import AppServer, _app_environment
from streaming import (
    BURST_DDL,
    ResumingClient,
    app_environment,
    assert_delivered_once_in_order,
    burst_rows,
    child_pids,
    established_connections,
    execute,
    insert_burst,
    slot_holder,
    wait_until,
    write_config,
)

# Takeover is bounded by the walsender noticing the lost client, plus the
# standby's retry interval of about a second.
TAKEOVER_SECONDS = 10.0


def worker_pids(server: AppServer) -> list[int]:
    """Return the pids of a Hypercorn server's worker processes."""
    return [
        pid
        for pid in child_pids(server.process.pid)
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


@pytest.fixture
def hypercorn(tmp_path: Path) -> Iterator:
    """Factory that starts `hypercorn -w N cdc_stream.app:app` on a free port."""
    servers: list[AppServer] = []

    def start(env: dict[str, str], workers: int) -> AppServer:
        port = find_free_port()
        log_path = tmp_path / f"app-{port}.log"
        command = [
            sys.executable,
            "-m",
            "hypercorn",
            "-w",
            str(workers),
            "cdc_stream.app:app",
            "--bind",
            f"127.0.0.1:{port}",
        ]
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                command,
                cwd=tmp_path,
                env=_app_environment(env),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        server = AppServer(process, port, log_path)
        servers.append(server)
        server.wait_until_answering()
        wait_until(lambda: len(worker_pids(server)) == workers, 30, "the workers")
        return server

    yield start

    for server in servers:
        if server.is_running():
            for pid in worker_pids(server):
                os.kill(pid, signal.SIGCONT)
        server.stop()


def standby_messages(server: AppServer, pid: int) -> int:
    """Count the lines in which worker `pid` logged that it is on standby."""
    marker = f"[{pid}] [INFO] cdc_stream.replication: standing by"
    return server.output().count(marker)


@pytest.fixture
def burst_db(database: str) -> str:
    execute(database, BURST_DDL)
    return database


def wait_for_holder(dsn: str, slot: str, pids: list[int], but: int = 0) -> int:
    """Wait until one of `pids` other than `but` streams the slot; return it."""
    found: list[int] = []

    def held() -> bool:
        holder = slot_holder(dsn, slot, pids)
        if holder is None or holder == but:
            return False
        found.append(holder)
        return True

    wait_until(held, 30, f"a worker of {pids} to stream slot {slot}")
    return found[-1]


def wait_for_new_connection(pids: list[int], port: int, before: dict[int, int]) -> int:
    """Wait until one of `pids` has one more connection than `before`; return it."""
    grown: list[int] = []

    def one_more() -> bool:
        counts = established_connections(pids, port)
        grown[:] = [pid for pid in pids if counts[pid] > before[pid]]
        return len(grown) == 1

    wait_until(one_more, 10, "the new connection to be accepted")
    return grown[0]


def connect_to_every_worker(
    server: AppServer, sse_stream, max_clients: int = 40
) -> dict[int, list[ResumingClient]]:
    """Open clients one by one until every worker serves one; group them by worker.

    The kernel hands each connection to whichever worker accepts first, so
    the worker of a client is the one whose count of connections grew.
    """
    pids = worker_pids(server)
    clients: dict[int, list[ResumingClient]] = {pid: [] for pid in pids}
    for _ in range(max_clients):
        before = established_connections(pids, server.port)
        client = ResumingClient(sse_stream)
        client.connect(server.base_url)
        worker = wait_for_new_connection(pids, server.port, before)
        clients[worker].append(client)
        if all(clients.values()):
            return clients
    raise AssertionError(f"{max_clients} clients did not reach every worker")


@pytest.mark.parametrize("workers", [2, 4])
def test_hung_holder_replaced(hypercorn, burst_db, sse_stream, tmp_path, workers):
    database = parse_dsn(burst_db)["dbname"]
    # The walsender ends a client that sends no feedback for this long.
    execute(burst_db, f"ALTER DATABASE {database} SET wal_sender_timeout = '2s'")
    env = app_environment(burst_db, tmp_path)
    slot = env["CDC_SLOT_NAME"]
    server = hypercorn(env, workers)
    pids = worker_pids(server)
    holder = wait_for_holder(burst_db, slot, pids)
    by_worker = connect_to_every_worker(server, sse_stream)
    clients = [client for group in by_worker.values() for client in group]

    insert_burst(burst_db, 10, 200)
    for client in clients:
        client.read_rows(2000)
    os.kill(holder, signal.SIGSTOP)
    stopped = time.monotonic()
    writer = threading.Thread(
        target=insert_burst, args=(burst_db, 10, 200), kwargs={"first_batch": 10}
    )
    writer.start()
    new_holder = wait_for_holder(burst_db, slot, pids, but=holder)
    takeover_seconds = time.monotonic() - stopped
    writer.join(30)
    running = [c for pid, group in by_worker.items() if pid != holder for c in group]
    for client in running:
        client.read_rows(4000)
    reconnecting = running[0]
    reconnecting.disconnect()
    insert_burst(burst_db, 5, 200, first_batch=20)
    reconnecting.connect(server.base_url)
    rows_while_hung = [len(client.changes) for client in by_worker[holder]]
    os.kill(holder, signal.SIGCONT)
    for client in clients:
        client.read_rows(5000)
    rows = burst_rows(burst_db)

    assert not writer.is_alive()
    assert new_holder in pids
    assert takeover_seconds < TAKEOVER_SECONDS
    assert rows_while_hung == [2000] * len(by_worker[holder])
    for pid in pids:
        # Once on start-up and once after losing the slot, not on every retry.
        assert standby_messages(server, pid) <= 2, pid
    for client in clients:
        assert client.notices == []
        assert_delivered_once_in_order(client.changes, rows)


@pytest.mark.parametrize("workers", [2, 4])
def test_killed_holder_replaced(hypercorn, burst_db, sse_stream, tmp_path, workers):
    env = app_environment(burst_db, tmp_path)
    slot = env["CDC_SLOT_NAME"]
    first = hypercorn(env, workers)
    holder = wait_for_holder(burst_db, slot, worker_pids(first))
    second = hypercorn(env, workers)
    survivors = worker_pids(second)
    first_clients = connect_to_every_worker(first, sse_stream)
    second_clients = connect_to_every_worker(second, sse_stream)
    orphans = [client for group in first_clients.values() for client in group]
    others = [client for group in second_clients.values() for client in group]

    insert_burst(burst_db, 10, 200)
    for client in orphans + others:
        client.read_rows(2000)
    writer = threading.Thread(
        target=insert_burst, args=(burst_db, 20, 100), kwargs={"first_batch": 10}
    )
    writer.start()
    others[0].read_rows(2500)
    os.kill(holder, signal.SIGKILL)
    killed = time.monotonic()
    new_holder = wait_for_holder(burst_db, slot, survivors)
    takeover_seconds = time.monotonic() - killed
    for client in orphans:
        if client.read_until(lambda c: len(c.changes) >= 4000, 10):
            continue
        client.connect(second.base_url)
    writer.join(30)
    for client in orphans + others:
        client.read_rows(4000)
    rows = burst_rows(burst_db)

    assert not writer.is_alive()
    assert new_holder in survivors
    assert takeover_seconds < TAKEOVER_SECONDS
    for client in others:
        assert client.connections == 1
    for client in orphans + others:
        assert client.notices == []
        assert_delivered_once_in_order(client.changes, rows)


def test_resume_on_worker_behind_client(hypercorn, burst_db, sse_stream, tmp_path):
    # The standby polls the journal once a minute, so it stays behind the
    # holder until it takes the slot over and its own appends wake it.
    config = write_config(tmp_path, "[journal]\npoll_seconds = 60\n")
    env = app_environment(burst_db, tmp_path, CDC_CONFIG=config)
    first = hypercorn(env, 1)
    (holder,) = worker_pids(first)
    wait_for_holder(burst_db, env["CDC_SLOT_NAME"], [holder])
    second = hypercorn(env, 1)
    client = ResumingClient(sse_stream)
    client.connect(first.base_url)

    insert_burst(burst_db, 2, 100)
    client.read_rows(200)
    client.connect(second.base_url)
    os.kill(holder, signal.SIGKILL)
    wait_for_holder(burst_db, env["CDC_SLOT_NAME"], worker_pids(second))
    insert_burst(burst_db, 2, 100, first_batch=2)
    client.read_rows(400)
    rows = burst_rows(burst_db)

    assert client.notices == []
    assert_delivered_once_in_order(client.changes, rows)
