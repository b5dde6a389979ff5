"""The trigger + NOTIFY design against the slot, on the same insert load.

Three measurements:

1. Write throughput: pgbench inserts single-row transactions from 4
   connections for a fixed time, under four designs. The table has no
   capture, or a trigger that calls pg_notify (with a LISTEN client
   consuming), or a slot that the app streams, or a slot that
   pg_recvlogical streams to /dev/null. The last one shows the database's
   own cost of decoding without the app's CPU. Three rounds alternate the
   designs, and each slot run gets a fresh slot.
2. Events lost while the consumer is down: 3 x 1,000 rows, with the LISTEN
   client, or the app, stopped during the middle 1,000. The SSE client
   resumes with Last-Event-ID after the app restarts.
3. Rows over NOTIFY's 8000-byte payload limit: rows with a `note` of
   growing size, inserted one per transaction into both tables.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2

from .harness import (
    AppServer,
    BenchError,
    Workspace,
    children_cpu_seconds,
    connect,
    cpu_seconds,
    python_module,
    query_one,
    read_json_line,
    spawn,
    stop_process,
    wait_slot_taken,
    workspace,
)
from .ingest import recvlogical_command, recvlogical_environment
from .listener import TRIGGER_FUNCTION, drain, listen, trigger_statement
from .report import Report, median, rate_text, table
from .workload import create_orders, insert_statement, now_us

PLAIN = "orders"
NOTIFIED = "orders_notified"
CHANNEL = f"{NOTIFIED}_changes"
PGBENCH_CLIENTS = 4
PGBENCH_THREADS = 2
PGBENCH_SECONDS = 5
ROUNDS = 3
PHASE_ROWS = 1_000
PHASE_BATCH = 10
NOTE_SIZES = (1_000, 4_000, 7_000, 7_500, 7_900, 8_000, 10_000, 100_000, 1_000_000)
NOTIFY_LIMIT = 8000

_PGBENCH_SCRIPT = """\\set uid random(1, 5000)
INSERT INTO {table} (market_id, user_id, side, quantity, price, type, status, sent_us)
VALUES ('BTC-USD', 'user-' || :uid, 'buy', 1 + :uid % 100, 20000.5, 'limit', 'open', 0);
"""


@dataclass
class ThroughputRun:
    """One pgbench run under one capture design."""

    design: str
    inserts_per_second: float
    transactions: int
    pgbench_cpu: float
    consumer_cpu: float
    delivered: int
    drain_seconds: float


class Setup:
    """The benchmark database and its tables; each app run gets a fresh slot.

    A slot created just before a run retains none of the WAL that earlier
    runs wrote, so the app never catches up on old changes during a
    measurement.
    """

    def __init__(self, ws: Workspace, dsn: str, workdir: Path) -> None:
        self.ws = ws
        self.dsn = dsn
        self.dbname = "bench_notify"
        self.workdir = workdir

    def create(self) -> None:
        conn = connect(self.dsn)
        try:
            with conn.cursor() as cur:
                create_orders(cur, PLAIN, "note text")
                create_orders(cur, NOTIFIED, "note text")
                cur.execute(TRIGGER_FUNCTION)
                cur.execute(trigger_statement(NOTIFIED))
        finally:
            conn.close()

    def create_slot(self, name: str) -> None:
        conn = connect(self.dsn)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (name,)
                )
        finally:
            conn.close()

    def drop_slot(self, name: str) -> None:
        conn = connect(self.dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_drop_replication_slot(%s)", (name,))
        finally:
            conn.close()

    def app(self, slot: str, name: str) -> AppServer:
        """Start the app on `slot` with that slot's journal; wait until it streams."""
        env = {
            "DATABASE_URL": self.dsn,
            "CDC_SLOT_NAME": slot,
            "CDC_JOURNAL_PATH": str(self.workdir / f"{slot}.sqlite3"),
        }
        app = AppServer(self.workdir, env, name).start()
        try:
            app.wait_state(("streaming",))
        except BaseException:
            app.stop()
            raise
        return app

    def count(self, table: str) -> int:
        return int(query_one(self.dsn, f"SELECT count(*) FROM {table}"))


# --- 1. write throughput ---------------------------------------------------------


def pgbench(setup: Setup, table: str) -> tuple[float, int, float]:
    """Run the insert script on `table`; return inserts/s, transactions, CPU."""
    script = setup.workdir / f"insert_{table}.sql"
    script.write_text(_PGBENCH_SCRIPT.format(table=table), encoding="utf-8")
    cluster = setup.ws.cluster
    command = [
        str(cluster.bindir / "pgbench"),
        "--no-vacuum",
        f"--client={PGBENCH_CLIENTS}",
        f"--jobs={PGBENCH_THREADS}",
        f"--time={PGBENCH_SECONDS}",
        f"--file={script}",
        "--host=127.0.0.1",
        f"--port={cluster.port}",
        "--username=postgres",
        setup.dbname,
    ]
    # The disk is shared with other work, so commits do not wait for fsync:
    # the runs then compare the CPU each design adds to the write path.
    env = {**os.environ, "PGOPTIONS": "-c synchronous_commit=off"}
    cpu_before = children_cpu_seconds()
    process = spawn(command, env=env)
    try:
        output, _ = process.communicate(timeout=PGBENCH_SECONDS + 60)
    finally:
        stop_process(process)
    cpu = children_cpu_seconds() - cpu_before
    text = output.decode()
    if process.returncode != 0:
        raise BenchError(f"pgbench failed with code {process.returncode}: {text}")

    tps = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", text)
    done = re.search(r"number of transactions actually processed: ([0-9]+)", text)
    if tps is None or done is None:
        raise BenchError(f"pgbench output not understood: {text}")
    return float(tps[1]), int(done[1]), cpu


def run_plain(setup: Setup) -> ThroughputRun:
    tps, transactions, cpu = pgbench(setup, PLAIN)
    return ThroughputRun("no capture", tps, transactions, cpu, 0.0, 0, 0.0)


def run_trigger(setup: Setup) -> ThroughputRun:
    listener = spawn(
        python_module(
            "bench.listener",
            f"--dsn={setup.dsn}",
            f"--channel={CHANNEL}",
            "--idle-seconds=1",
            f"--seconds={PGBENCH_SECONDS + 60}",
        )
    )
    try:
        read_json_line(listener, 30)
        tps, transactions, cpu = pgbench(setup, NOTIFIED)
        ended = time.monotonic()
        result = read_json_line(listener, 70)
        drain_seconds = max(0.0, time.monotonic() - ended - 1.0)
    finally:
        stop_process(listener)
    return ThroughputRun(
        "trigger + pg_notify, LISTEN client",
        tps,
        transactions,
        cpu,
        result["cpu_seconds"],
        result["received"],
        drain_seconds,
    )


def run_slot(setup: Setup, index: int) -> ThroughputRun:
    slot = f"throughput_{index}"
    setup.create_slot(slot)
    with setup.app(slot, slot) as app:
        worker = app.worker_pid()
        app_cpu_before = cpu_seconds(worker)
        events_before = app.health()["replication"]["events"]
        tps, transactions, cpu = pgbench(setup, PLAIN)
        ended = time.monotonic()
        app.wait_events(events_before + transactions, 120)
        drain_seconds = time.monotonic() - ended
        app_cpu = cpu_seconds(worker) - app_cpu_before
        delivered = app.health()["replication"]["events"] - events_before
    setup.drop_slot(slot)
    return ThroughputRun(
        "slot, streamed by the app",
        tps,
        transactions,
        cpu,
        app_cpu,
        delivered,
        drain_seconds,
    )


def run_slot_recvlogical(setup: Setup, index: int) -> ThroughputRun:
    slot = f"recvlogical_{index}"
    setup.create_slot(slot)
    command = recvlogical_command(setup.ws, setup.dbname, slot)
    process = spawn(command, env=recvlogical_environment(), stdout=None)
    try:
        wait_slot_taken(setup.dsn, slot, None, 30)
        tps, transactions, cpu = pgbench(setup, PLAIN)
        consumer_before = children_cpu_seconds()
    finally:
        stop_process(process)
    consumer_cpu = children_cpu_seconds() - consumer_before
    setup.drop_slot(slot)
    return ThroughputRun(
        "slot, read by pg_recvlogical", tps, transactions, cpu, consumer_cpu, 0, 0.0
    )


def measure_throughput(setup: Setup, report: Report) -> None:
    runs: list[ThroughputRun] = []
    for index in range(ROUNDS):
        runs.append(run_plain(setup))
        runs.append(run_trigger(setup))
        runs.append(run_slot(setup, index))
        runs.append(run_slot_recvlogical(setup, index))

    report.add(
        f"### Write throughput: pgbench, {PGBENCH_CLIENTS} connections, "
        f"{PGBENCH_SECONDS} s per run, single-row INSERT transactions, "
        "synchronous_commit = off"
    )
    rows = [
        [
            run.design,
            rate_text(run.inserts_per_second),
            f"{run.delivered:,} of {run.transactions:,}" if run.delivered else "-",
            f"{100 * run.pgbench_cpu / PGBENCH_SECONDS:.0f} %",
            f"{100 * run.consumer_cpu / (PGBENCH_SECONDS + run.drain_seconds):.0f} %",
            f"{run.drain_seconds:.1f}",
        ]
        for run in runs
    ]
    for line in table(
        [
            "design",
            "inserts/s",
            "changes consumed",
            "pgbench CPU",
            "consumer CPU",
            "consumer behind at end, s",
        ],
        rows,
    ):
        report.add(line)

    rates = {
        design: median([r.inserts_per_second for r in runs if r.design == design])
        for design in dict.fromkeys(run.design for run in runs)
    }
    plain, trigger, slot, recvlogical = rates.values()
    report.key(
        f"write throughput (median inserts/s): no capture {rate_text(plain)}, "
        f"trigger {rate_text(trigger)} ({trigger / plain:.2f} of no capture), "
        f"slot + app {rate_text(slot)} ({slot / plain:.2f}), slot + "
        f"pg_recvlogical {rate_text(recvlogical)} ({recvlogical / plain:.2f}); "
        f"trigger / slot + app = {trigger / slot:.2f}"
    )


# --- 2. events lost while the consumer is down ------------------------------------


def insert_phase(dsn: str, table: str, rows: int = PHASE_ROWS) -> None:
    conn = connect(dsn)
    statement = insert_statement(table)
    try:
        with conn.cursor() as cur:
            for _ in range(rows // PHASE_BATCH):
                cur.execute(statement, {"rows": PHASE_BATCH, "sent_us": now_us()})
    finally:
        conn.close()


def notify_loss(setup: Setup) -> tuple[int, int]:
    """Return notifications received and rows written, listener down in phase 2."""
    received = 0
    conn = listen(setup.dsn, CHANNEL)
    insert_phase(setup.dsn, NOTIFIED)
    received += drain(conn, 1.0, 30)[0]
    conn.close()

    insert_phase(setup.dsn, NOTIFIED)

    conn = listen(setup.dsn, CHANNEL)
    insert_phase(setup.dsn, NOTIFIED)
    received += drain(conn, 1.0, 30)[0]
    conn.close()
    return received, 3 * PHASE_ROWS


def sse_client(
    app: AppServer, events: int, save: Path, last_id: str | None = None
) -> Any:
    arguments = [
        f"--port={app.port}",
        "--clients=1",
        f"--events={events}",
        "--seconds=60",
        f"--save={save}",
    ]
    if last_id:
        arguments.append(f"--header=Last-Event-ID: {last_id}")
    client = spawn(python_module("bench.sse_clients", *arguments))
    read_json_line(client, 30)
    return client


def slot_loss(setup: Setup) -> tuple[int, int, int]:
    """Return unique events, duplicates and rows written; the app is down in phase 2."""
    first = setup.workdir / "loss_first.sse"
    second = setup.workdir / "loss_second.sse"
    table_rows_before = setup.count(PLAIN)
    setup.create_slot("loss")

    with setup.app("loss", "loss_1") as app:
        client = sse_client(app, PHASE_ROWS, first)
        try:
            insert_phase(setup.dsn, PLAIN)
            result = read_json_line(client, 60)
        finally:
            stop_process(client)

    insert_phase(setup.dsn, PLAIN)

    with setup.app("loss", "loss_2") as app:
        client = sse_client(app, 2 * PHASE_ROWS, second, result["last_id"])
        try:
            insert_phase(setup.dsn, PLAIN)
            read_json_line(client, 60)
        finally:
            stop_process(client)

    setup.drop_slot("loss")
    row_ids = [event["data"]["id"] for event in read_saved(first) + read_saved(second)]
    written = setup.count(PLAIN) - table_rows_before
    return len(set(row_ids)), len(row_ids) - len(set(row_ids)), written


def read_saved(path: Path) -> list[dict[str, Any]]:
    """Return the change events in a file written by `sse_clients --save`."""
    events = []
    for line in path.read_bytes().split(b"\n"):
        if line.startswith(b'data: {"type":"database_change"'):
            events.append(json.loads(line[6:]))
    return events


def measure_loss(setup: Setup, report: Report) -> None:
    received, written = notify_loss(setup)
    unique, duplicates, slot_written = slot_loss(setup)
    report.add(
        f"### Events lost while the consumer is down ({PHASE_ROWS:,} of "
        f"{3 * PHASE_ROWS:,} rows written while it was down)"
    )
    for line in table(
        ["design", "rows written", "events received", "lost", "duplicates"],
        [
            ["trigger + NOTIFY", written, received, written - received, "-"],
            [
                "slot + app + Last-Event-ID",
                slot_written,
                unique,
                slot_written - unique,
                duplicates,
            ],
        ],
    ):
        report.add(line)
    report.key(
        f"consumer down for {PHASE_ROWS:,} rows: NOTIFY lost {written - received:,} "
        f"of {written:,} events, the slot lost {slot_written - unique:,} "
        f"({duplicates} duplicates)"
    )


# --- 3. payload limit --------------------------------------------------------------


def insert_note(dsn: str, table: str, size: int) -> str | None:
    """Insert one row whose note has `size` characters; return the error, if any."""
    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                f"INSERT INTO {table} (market_id, user_id, side, quantity, price, type,"
                " status, sent_us, note) VALUES ('BTC-USD', 'user-1', 'buy', 1, 1,"
                " 'limit', 'open', 0, repeat('x', %s))",
                (size,),
            )
    except psycopg2.Error as error:
        return (error.pgerror or str(error)).strip().splitlines()[0]
    finally:
        conn.close()
    return None


def measure_payloads(setup: Setup, report: Report) -> None:
    trigger_errors = [insert_note(setup.dsn, NOTIFIED, size) for size in NOTE_SIZES]

    saved = setup.workdir / "payloads.sse"
    setup.create_slot("payloads")
    with setup.app("payloads", "payloads") as app:
        client = sse_client(app, len(NOTE_SIZES), saved)
        try:
            slot_errors = [insert_note(setup.dsn, PLAIN, size) for size in NOTE_SIZES]
            read_json_line(client, 60)
        finally:
            stop_process(client)
    setup.drop_slot("payloads")
    notes = [len(event["data"]["note"]) for event in read_saved(saved)]

    report.add(
        f"### Rows over NOTIFY's {NOTIFY_LIMIT}-byte payload limit (one row per "
        "transaction)"
    )
    rows = []
    for index, size in enumerate(NOTE_SIZES):
        error = trigger_errors[index]
        delivered = notes[index] if index < len(notes) else None
        rows.append(
            [
                f"{size:,}",
                "INSERT failed: " + error if error else "ok",
                "INSERT failed: " + slot_errors[index] if slot_errors[index] else "ok",
                "yes" if delivered == size else f"NO ({delivered})",
            ]
        )
    for line in table(
        ["note bytes", "trigger: write", "slot: write", "slot: event has full note"],
        rows,
    ):
        report.add(line)

    failed = sum(1 for error in trigger_errors if error)
    complete = sum(
        1
        for index, size in enumerate(NOTE_SIZES)
        if index < len(notes) and notes[index] == size
    )
    report.key(
        f"payload limit: with the trigger {failed} of {len(NOTE_SIZES)} INSERTs "
        f"failed (notes from {_smallest_failure(trigger_errors)} bytes); the slot "
        f"delivered {complete} of {len(NOTE_SIZES)} rows complete"
    )


def _smallest_failure(errors: list[str | None]) -> str:
    for size, error in zip(NOTE_SIZES, errors, strict=True):
        if error:
            return f"{size:,}"
    return "none"


def run(ws: Workspace) -> Report:
    report = Report("notify")
    report.add("## Trigger + NOTIFY against the slot")
    workdir = ws.scratch("notify")
    with ws.database("bench_notify") as dsn:
        setup = Setup(ws, dsn, workdir)
        setup.create()
        measure_throughput(setup, report)
        measure_loss(setup, report)
        measure_payloads(setup, report)
    return report


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description="Trigger + NOTIFY benchmark.").parse_args(argv)
    with workspace() as ws:
        run(ws)


if __name__ == "__main__":
    main()
