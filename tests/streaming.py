"""Helpers shared by the end-to-end tests of the stream."""

from __future__ import annotations

import contextlib
import decimal
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg2

from cdc_stream import cluster as cluster_module
from cdc_stream.cluster import LocalCluster, find_free_port
from sse_client import SSEClient, SSEEvent, SSEStreamClosed

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


# Helpers of the delivery tests: a burst table written by one session, so
# that commit order is row id order, and clients that resume as EventSource
# does.

BURST_DDL = """
CREATE TABLE burst (
    id bigserial PRIMARY KEY,
    batch integer NOT NULL,
    seq integer NOT NULL,
    note text NOT NULL
);
"""

NOTICE_TYPES = frozenset({"history_lost", "slow_client"})


def insert_burst(
    dsn: str, batches: int, rows_per_batch: int, *, first_batch: int = 0, pad: int = 0
) -> None:
    """Insert `batches` transactions of `rows_per_batch` rows into `burst`.

    One session commits them in turn, so commit order is row id order. `pad`
    adds that many characters to each row's note.
    """
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            for batch in range(first_batch, first_batch + batches):
                cur.execute(
                    "INSERT INTO burst (batch, seq, note) "
                    "SELECT %s, g, repeat('x', %s) || g FROM generate_series(1, %s) g",
                    (batch, pad, rows_per_batch),
                )
                conn.commit()
    finally:
        conn.close()


def burst_rows(dsn: str) -> list[dict[str, Any]]:
    """Return every row of `burst` in commit order."""
    rows = query(dsn, "SELECT id, batch, seq, note FROM burst ORDER BY id")
    return [{"id": r[0], "batch": r[1], "seq": r[2], "note": r[3]} for r in rows]


def position_key(event_id: str) -> tuple[int, int]:
    """Return the (commit LSN, index) pair that an event id encodes."""
    lsn, _, index = event_id.partition(":")
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) | int(low, 16), int(index)


@dataclass
class DeliveryReport:
    """How the rows a client received differ from the rows in the database."""

    missing: list[int]
    duplicated: list[int]
    unexpected: list[int]
    misordered: list[int]
    changed: list[int]
    ids_not_increasing: list[str]


def compare_delivery(
    changes: list[tuple[str, dict[str, Any]]],
    rows: list[dict[str, Any]],
    limit: int = 10,
) -> DeliveryReport:
    """Compare received change events with database rows, listing a few of each fault.

    `changes` contains (event id, event data) pairs in the order received and
    `rows` the expected rows in commit order.
    """
    received = [data["data"] for _, data in changes]
    received_ids = [row["id"] for row in received]
    expected_ids = [row["id"] for row in rows]
    counts: dict[int, int] = {}
    for row_id in received_ids:
        counts[row_id] = counts.get(row_id, 0) + 1
    expected_set = set(expected_ids)

    missing = [i for i in expected_ids if i not in counts][:limit]
    duplicated = sorted(i for i, n in counts.items() if n > 1)[:limit]
    unexpected = [i for i in received_ids if i not in expected_set][:limit]
    rank = {row_id: n for n, row_id in enumerate(expected_ids)}
    ranks = [rank[i] for i in received_ids if i in rank]
    misordered = [
        received_ids[n + 1] for n in range(len(ranks) - 1) if ranks[n] >= ranks[n + 1]
    ][:limit]
    by_id = {row["id"]: row for row in rows}
    changed = [
        row["id"] for row in received if row["id"] in by_id and row != by_id[row["id"]]
    ][:limit]
    keys = [position_key(event_id) for event_id, _ in changes]
    not_increasing = [
        changes[n + 1][0] for n in range(len(keys) - 1) if keys[n] >= keys[n + 1]
    ][:limit]
    return DeliveryReport(
        missing, duplicated, unexpected, misordered, changed, not_increasing
    )


def assert_delivered_once_in_order(
    changes: list[tuple[str, dict[str, Any]]], rows: list[dict[str, Any]]
) -> None:
    """Assert the client received exactly `rows`, once each, in commit order."""
    # This module is not rewritten by pytest, so each assert names its values.
    report = compare_delivery(changes, rows)
    assert report.missing == [], f"rows never received: {report.missing}"
    assert report.duplicated == [], f"rows received twice: {report.duplicated}"
    assert report.unexpected == [], f"rows not in the table: {report.unexpected}"
    assert report.misordered == [], f"rows out of order: {report.misordered}"
    assert report.changed == [], f"rows with other values: {report.changed}"
    assert report.ids_not_increasing == [], (
        f"event ids not increasing: {report.ids_not_increasing}"
    )
    assert len(changes) == len(rows), f"{len(changes)} events for {len(rows)} rows"


class ResumingClient:
    """A client of /api/realtime that resumes with Last-Event-ID, as EventSource does.

    `open_stream` is the `sse_stream` fixture. The client records the change
    events of the `burst` table and the stream notices it receives, across
    reconnections.
    """

    def __init__(
        self,
        open_stream: Callable[..., SSEClient],
        params: dict[str, str] | None = None,
    ) -> None:
        self._open_stream = open_stream
        self._params = params or {}
        self.client: SSEClient | None = None
        self.last_id: str | None = None
        self.changes: list[tuple[str, dict[str, Any]]] = []
        self.notices: list[dict[str, Any]] = []
        self.connections = 0
        self.ended = False

    def connect(self, base_url: str) -> None:
        """Open a stream on `base_url`, resuming after the last id seen."""
        if self.client is not None:
            self.client.close()
        headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
        self.client = self._open_stream(
            base_url + "/api/realtime", headers=headers, params=self._params
        )
        assert self.client.status_code == 200
        self.connections += 1
        self.ended = False

    def disconnect(self) -> None:
        """Close the current stream, keeping the last id seen."""
        if self.client is not None:
            self.client.close()
            self.client = None

    def read_until(
        self, done: Callable[[ResumingClient], bool], timeout: float = 30.0
    ) -> bool:
        """Read events until `done(self)` holds; return False if the stream ended.

        Raises AssertionError when neither happens within `timeout` s.
        """
        assert self.client is not None
        deadline = time.monotonic() + timeout
        while not done(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"timed out after {timeout} s with {len(self.changes)} change "
                    f"events; last id {self.last_id}"
                )
            try:
                event = self.client.next_event(remaining)
            except TimeoutError:
                continue
            except SSEStreamClosed:
                self.ended = True
                return False
            self._record(event)
        return True

    def read_rows(self, count: int, timeout: float = 30.0) -> bool:
        """Read until `count` rows were received in all; False if the stream ended."""
        return self.read_until(lambda client: len(client.changes) >= count, timeout)

    def _record(self, event: SSEEvent) -> None:
        if event.id is not None:
            self.last_id = event.id
        data = parse_data(event)
        if data["type"] in NOTICE_TYPES:
            self.notices.append(data)
        elif data["type"] == "database_change" and data["table"] == "burst":
            assert event.id is not None
            self.changes.append((event.id, data))


def child_pids(pid: int) -> list[int]:
    """Return the pids of the children of process `pid` (Linux /proc)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "children").read_text()
        except FileNotFoundError:
            continue
        children.extend(int(item) for item in text.split())
    return children


def kill_process_tree(pid: int, timeout: float = 10.0) -> None:
    """Send SIGKILL to `pid` and all its descendants, and wait until it is gone."""
    pids = [pid]
    index = 0
    while index < len(pids):
        try:
            pids.extend(child_pids(pids[index]))
        except FileNotFoundError:
            pass
        index += 1
    for target in pids:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_until(
        lambda: all(not _is_alive(target) for target in pids),
        timeout,
        f"processes {pids} to exit",
    )


def _is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    # A killed child stays a zombie until its parent reaps it.
    return state != "Z"


def rss_bytes(pid: int) -> int:
    """Return the resident memory of process `pid` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS line for process {pid}")


def socket_owner(pids: list[int], local_port: int) -> int | None:
    """Return which of `pids` has the TCP socket bound to `local_port`, if any."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == local_port:
                inodes.add(fields[9])

    for pid in pids:
        try:
            descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
        except FileNotFoundError:
            continue
        for descriptor in descriptors:
            try:
                target = os.readlink(descriptor)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return pid
    return None


def slot_holder(dsn: str, slot_name: str, pids: list[int]) -> int | None:
    """Return which of `pids` streams the slot, found by its walsender's client port."""
    rows = query(
        dsn,
        "SELECT r.client_port FROM pg_replication_slots s "
        "JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = %s",
        (slot_name,),
    )
    if not rows or rows[0][0] is None:
        return None
    return socket_owner(pids, rows[0][0])


@contextlib.contextmanager
def private_cluster() -> Iterator[LocalCluster]:
    """Start a PostgreSQL cluster of the caller's own, stopped and removed on exit."""
    base_dir = Path(tempfile.mkdtemp(prefix="cdc-stream-own-"))
    if os.geteuid() == 0:
        shutil.chown(base_dir, cluster_module.POSTGRES_OS_USER)
    cluster = LocalCluster(base_dir / "pgdata", find_free_port())
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        if cluster.is_running():
            cluster.stop("immediate")
        shutil.rmtree(base_dir, ignore_errors=True)


def write_config(tmp_path: Path, text: str) -> str:
    """Write a TOML configuration file and return its path, for CDC_CONFIG."""
    path = tmp_path / f"cdc-{uuid.uuid4().hex[:8]}.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def established_connections(pids: list[int], port: int) -> dict[int, int]:
    """Count, for each of `pids`, its established TCP connections on local `port`."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            # State 01 is ESTABLISHED in the kernel's TCP state numbering.
            if local_port == port and fields[3] == "01":
                inodes.add(fields[9])

    counts: dict[int, int] = {}
    for pid in pids:
        counts[pid] = 0
        for descriptor in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(descriptor)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                counts[pid] += 1
    return counts
