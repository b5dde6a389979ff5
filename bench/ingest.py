"""Ingest: the app end to end against pg_recvlogical, on the same WAL.

200,000 order rows are inserted in 1,000-row transactions after one slot per
run and method was created, so every run decodes the identical WAL range.
Then, three times each, alternating:

* pg_recvlogical streams its slot with the app's wal2json options and session
  settings to /dev/null, and exits at the WAL position where the load ended.
* The app streams its slot under Hypercorn, with its SQLite journal, to one
  SSE client reading over a socket until it has every change event.

Both clocks start when the slot becomes active (polled in
pg_replication_slots every 2 ms), so neither includes process start-up. The
app is started while a placeholder replication connection keeps its slot active,
and the client subscribes before the placeholder lets go. That way every
event reaches the client live, as in production, not from a journal replay.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extras

from cdc_stream.replication import SESSION_OPTIONS, WAL2JSON_OPTIONS

from .harness import (
    AppServer,
    BenchError,
    Workspace,
    children_cpu_seconds,
    connect,
    cpu_seconds,
    python_module,
    read_json_line,
    spawn,
    stop_process,
    wait_slot_taken,
    workspace,
)
from .report import Report, median, rate_text, table
from .workload import bulk_load, create_orders

ROWS = 200_000
BATCH = 1_000
REPEATS = 3
AIM_RATIO = 0.5
RUN_TIMEOUT = 120.0


@dataclass
class Loaded:
    """A database holding the load, and the slots created before it."""

    dsn: str
    dbname: str
    rows: int
    end_lsn: str
    load: dict[str, Any]


@dataclass
class AppRun:
    """One app run: rate, timing and CPU."""

    seconds: float
    first_event_seconds: float
    events: int
    app_cpu: float
    walsender_cpu: float
    client_cpu: float
    slow_clients: int

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def prepare(dsn: str, dbname: str, slots: list[str], rows: int, batch: int) -> Loaded:
    """Create the table and `slots`, then insert the rows."""
    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            create_orders(cur)
            for slot in slots:
                cur.execute(
                    "SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (slot,)
                )
        load = bulk_load(dsn, rows, batch)
        with conn.cursor() as cur:
            cur.execute("SELECT pg_current_wal_insert_lsn()::text")
            (end_lsn,) = cur.fetchone()
    finally:
        conn.close()
    return Loaded(dsn, dbname, load["rows"], end_lsn, load)


def json_volume(loaded: Loaded, slot: str) -> tuple[int, int]:
    """Return messages and bytes of wal2json output for the range, from a peek."""
    options = ", ".join(
        f"'{name}', '{value}'" for name, value in WAL2JSON_OPTIONS.items()
    )
    conn = connect(loaded.dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*), sum(octet_length(data)) FROM "
                f"pg_logical_slot_peek_changes(%s, %s, NULL, {options})",
                (slot, loaded.end_lsn),
            )
            messages, size = cur.fetchone()
    finally:
        conn.close()
    return int(messages), int(size)


def recvlogical_command(
    ws: Workspace, dbname: str, slot: str, end_lsn: str | None = None
) -> list[str]:
    """Return a pg_recvlogical command streaming `slot` to /dev/null like the app."""
    cluster = ws.cluster
    command = [
        str(cluster.bindir / "pg_recvlogical"),
        "--host=127.0.0.1",
        f"--port={cluster.port}",
        "--username=postgres",
        f"--dbname={dbname}",
        f"--slot={slot}",
        "--start",
        "--no-loop",
        "--file=/dev/null",
    ]
    if end_lsn is not None:
        command.append(f"--endpos={end_lsn}")
    for name, value in WAL2JSON_OPTIONS.items():
        command += ["--option", f"{name}={value}"]
    return command


def recvlogical_environment() -> dict[str, str]:
    """Return the environment that gives pg_recvlogical the app's session settings."""
    return {**os.environ, "PGOPTIONS": SESSION_OPTIONS}


@dataclass
class RecvRun:
    """One pg_recvlogical run: time from slot taken to exit, wall time, CPU."""

    seconds: float
    wall_seconds: float
    cpu: float
    walsender_cpu: float


def run_recvlogical(ws: Workspace, loaded: Loaded, slot: str) -> RecvRun:
    """Stream `slot` to /dev/null and time it."""
    command = recvlogical_command(ws, loaded.dbname, slot, loaded.end_lsn)
    cpu_before = children_cpu_seconds()
    started = time.time()
    process = spawn(command, env=recvlogical_environment(), stdout=None)
    try:
        taken_at, walsender = wait_slot_taken(loaded.dsn, slot, None, 30)
        walsender_cpu = _follow_cpu(walsender, process)
        code = process.wait(RUN_TIMEOUT)
    finally:
        stop_process(process)
    ended = time.time()
    if code != 0:
        raise BenchError(f"pg_recvlogical on slot {slot} exited with code {code}")
    return RecvRun(
        seconds=ended - taken_at,
        wall_seconds=ended - started,
        cpu=children_cpu_seconds() - cpu_before,
        walsender_cpu=walsender_cpu,
    )


def _follow_cpu(pid: int, process: subprocess.Popen[bytes]) -> float:
    """Return the last CPU time read from `pid` before `process` exited.

    The walsender exits with its client, so its CPU time is read every 20 ms
    while the client runs; the value can miss up to 20 ms of work.
    """
    deadline = time.monotonic() + RUN_TIMEOUT
    last = 0.0
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            last = cpu_seconds(pid)
        time.sleep(0.02)
    return last


class SlotPlaceholder:
    """A replication connection that keeps a slot active without reading from it."""

    def __init__(self, dsn: str, slot: str) -> None:
        self.dsn = dsn
        self.slot = slot
        self.conn = psycopg2.connect(
            dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection
        )
        self.conn.cursor().start_replication(
            slot_name=slot, decode=False, options=WAL2JSON_OPTIONS
        )
        _, self.pid = wait_slot_taken(dsn, slot, None, 30)

    def release(self) -> None:
        self.conn.close()


def start_gated_app(
    workdir: Path, loaded: Loaded, slot: str, env: dict[str, str] | None = None
) -> tuple[AppServer, SlotPlaceholder]:
    """Start the app on `slot` while a placeholder keeps it active, so the app waits."""
    placeholder = SlotPlaceholder(loaded.dsn, slot)
    app_env = {
        "DATABASE_URL": loaded.dsn,
        "CDC_SLOT_NAME": slot,
        "CDC_JOURNAL_PATH": str(workdir / f"{slot}.sqlite3"),
        **(env or {}),
    }
    app = AppServer(workdir, app_env, slot)
    try:
        app.start()
        app.wait_state(("standby",))
    except BaseException:
        app.stop()
        placeholder.release()
        raise
    return app, placeholder


def run_app(workdir: Path, loaded: Loaded, slot: str) -> AppRun:
    """Stream `slot` through the app to one SSE client until it has every row."""
    app, placeholder = start_gated_app(workdir, loaded, slot)
    client = None
    try:
        client = spawn(
            python_module(
                "bench.sse_clients",
                f"--port={app.port}",
                "--clients=1",
                f"--events={loaded.rows}",
                f"--seconds={RUN_TIMEOUT}",
            )
        )
        ready = read_json_line(client, 30)
        if ready["connected"] != 1:
            raise BenchError(f"SSE client failed to connect: {ready['errors']}")

        worker = app.worker_pid()
        cpu_before = cpu_seconds(worker)
        placeholder.release()
        taken_at, walsender = wait_slot_taken(loaded.dsn, slot, placeholder.pid, 30)
        result = read_json_line(client, RUN_TIMEOUT + 10)
        app_cpu = cpu_seconds(worker) - cpu_before
        walsender_cpu = cpu_seconds(walsender)
    finally:
        if client is not None:
            stop_process(client)
        app.stop()

    if result["changes_total"] != loaded.rows:
        raise BenchError(
            f"app on slot {slot}: client received {result['changes_total']} of "
            f"{loaded.rows} change events (slow_client notices: "
            f"{result['slow_clients']}); log: {app.log_path}"
        )
    return AppRun(
        seconds=result["last_change_at"] - taken_at,
        first_event_seconds=result["first_change_at"] - taken_at,
        events=result["changes_total"],
        app_cpu=app_cpu,
        walsender_cpu=walsender_cpu,
        client_cpu=result["cpu_seconds"],
        slow_clients=result["slow_clients"],
    )


def run(
    ws: Workspace, rows: int = ROWS, batch: int = BATCH, repeats: int = REPEATS
) -> Report:
    report = Report("ingest")
    report.add(
        f"## Ingest: {rows:,} rows in {batch:,}-row transactions, {repeats} runs"
    )
    workdir = ws.scratch("ingest")
    recv_slots = [f"recv_{i}" for i in range(repeats)]
    app_slots = [f"app_{i}" for i in range(repeats)]

    with ws.database("bench_ingest") as dsn:
        loaded = prepare(dsn, "bench_ingest", recv_slots + app_slots, rows, batch)
        load = loaded.load
        load_rate = rate_text(load["rows"] / load["seconds"])
        report.add(
            f"load: {load['seconds']:.1f} s ({load_rate} rows/s); load generator "
            f"CPU {load['cpu_seconds']:.2f} s (INSERT ... SELECT generate_series, "
            "so the server builds the rows)"
        )
        messages, size = json_volume(loaded, recv_slots[0])
        report.add(
            f"wal2json output for the range: {messages:,} messages, "
            f"{size / 1e6:.1f} MB, {size / loaded.rows:.0f} bytes per row"
        )

        recv_runs: list[RecvRun] = []
        app_runs: list[AppRun] = []
        for index in range(repeats):
            recv_runs.append(run_recvlogical(ws, loaded, recv_slots[index]))
            app_runs.append(run_app(workdir, loaded, app_slots[index]))

    summarize(report, loaded.rows, recv_runs, app_runs)
    return report


def summarize(
    report: Report,
    rows: int,
    recv_runs: list[RecvRun],
    app_runs: list[AppRun],
) -> None:
    table_rows = []
    for index, (recv, app) in enumerate(zip(recv_runs, app_runs, strict=True)):
        table_rows.append(
            [
                index + 1,
                f"{recv.seconds:.3f}",
                rate_text(rows / recv.seconds),
                f"{recv.walsender_cpu:.2f} + {recv.cpu:.2f}",
                f"{app.seconds:.3f}",
                rate_text(app.rate),
                f"{app.first_event_seconds:.3f}",
                f"{app.walsender_cpu:.2f} + {app.app_cpu:.2f}",
                f"{app.client_cpu:.2f}",
            ]
        )
    for line in table(
        [
            "run",
            "recvlogical s",
            "recvlogical rows/s",
            "recvlogical CPU s (walsender + client)",
            "app s",
            "app rows/s",
            "app first event s",
            "app CPU s (walsender + app)",
            "SSE client CPU s",
        ],
        table_rows,
    ):
        report.add(line)

    recv_rate = median([rows / run.seconds for run in recv_runs])
    recv_wall_rate = median([rows / run.wall_seconds for run in recv_runs])
    app_rate = median([app.rate for app in app_runs])
    ratio = app_rate / recv_rate
    recv_cost = median(
        [(run.walsender_cpu + run.cpu) / rows * 1e6 for run in recv_runs]
    )
    app_cost = median(
        [(app.walsender_cpu + app.app_cpu) / rows * 1e6 for app in app_runs]
    )
    report.add(
        f"pg_recvlogical including its start-up and connection: "
        f"{rate_text(recv_wall_rate)} rows/s (median)"
    )
    report.add(
        f"CPU per row (median): pg_recvlogical path {recv_cost:.1f} us, app path "
        f"{app_cost:.1f} us, of which the app worker "
        f"{median([app.app_cpu / rows * 1e6 for app in app_runs]):.1f} us"
    )
    report.key(
        f"ingest: app {rate_text(app_rate)} rows/s vs pg_recvlogical "
        f"{rate_text(recv_rate)} rows/s (medians): ratio {ratio:.2f} "
        f"(aim >= {AIM_RATIO}: {'met' if ratio >= AIM_RATIO else 'NOT met'}); "
        f"CPU per row {app_cost:.1f} us vs {recv_cost:.1f} us"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Ingest benchmark.")
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args(argv)
    with workspace() as ws:
        run(ws, args.rows, args.batch, args.repeats)


if __name__ == "__main__":
    main()
