"""Replay: events/s served from the journal to a client resuming far back.

200,000 rows are inserted in 1,000-row transactions after the app's slot was
created; the app then journals them all. A client connects with a
`Last-Event-ID` of the slot's starting LSN, which is before every event,
and reads until it has all 200,000: three times, one after the other.

The ratio compares that with reading the same journal directly through
`Journal.read_after` in 1,000-event pages in this process, the storage
layer's ceiling for the app's replay path.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cdc_stream.journal import Journal
from cdc_stream.positions import Position, parse_lsn

from .harness import (
    AppServer,
    BenchError,
    Workspace,
    connect,
    cpu_seconds,
    python_module,
    read_json_line,
    spawn,
    stop_process,
    workspace,
)
from .report import Report, median, rate_text, table
from .workload import bulk_load, create_orders

ROWS = 200_000
BATCH = 1_000
REPEATS = 3
PAGE = 1_000
SLOT = "replay"
TIMEOUT = 120.0


def prepare(dsn: str) -> str:
    """Create the table and the app's slot; return the slot's starting LSN."""
    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            create_orders(cur)
            cur.execute(
                "SELECT lsn::text FROM "
                "pg_create_logical_replication_slot(%s, 'wal2json')",
                (SLOT,),
            )
            (start_lsn,) = cur.fetchone()
    finally:
        conn.close()
    return start_lsn


def resume_once(
    app: AppServer, start_lsn: str, rows: int
) -> tuple[float, float, float]:
    """Resume from `start_lsn`; return seconds, app CPU and client CPU."""
    worker = app.worker_pid()
    cpu_before = cpu_seconds(worker)
    client = spawn(
        python_module(
            "bench.sse_clients",
            f"--port={app.port}",
            "--clients=1",
            f"--header=Last-Event-ID: {start_lsn}",
            f"--events={rows}",
            f"--seconds={TIMEOUT}",
        )
    )
    try:
        ready = read_json_line(client, 30)
        result = read_json_line(client, TIMEOUT + 10)
    finally:
        stop_process(client)
    if result["changes_total"] != rows:
        raise BenchError(
            f"resumed client received {result['changes_total']} of {rows} events"
        )
    seconds = result["last_change_at"] - ready["started_at"]
    return seconds, cpu_seconds(worker) - cpu_before, result["cpu_seconds"]


def read_directly(path: Path, start_lsn: str) -> tuple[float, int]:
    """Read the events after `start_lsn` with Journal.read_after.

    Returns the seconds taken and the number of events read.
    """
    journal = Journal(path)
    after = Position(parse_lsn(start_lsn), -1)
    count = 0
    started = time.perf_counter()
    while True:
        events = journal.read_after(after, PAGE)
        if not events:
            break
        count += len(events)
        after = events[-1].position
    seconds = time.perf_counter() - started
    journal.close()
    return seconds, count


def run(ws: Workspace, rows: int = ROWS, repeats: int = REPEATS) -> Report:
    report = Report("replay")
    report.add(f"## Replay: {rows:,} journaled events, resumed {repeats} times")
    workdir = ws.scratch("replay")
    journal_path = workdir / f"{SLOT}.sqlite3"

    with ws.database("bench_replay") as dsn:
        start_lsn = prepare(dsn)
        bulk_load(dsn, rows, BATCH)
        env = {
            "DATABASE_URL": dsn,
            "CDC_SLOT_NAME": SLOT,
            "CDC_JOURNAL_PATH": str(journal_path),
        }
        with AppServer(workdir, env, SLOT) as app:
            app.wait_events(rows, TIMEOUT)
            runs = [resume_once(app, start_lsn, rows) for _ in range(repeats)]
            direct = [read_directly(journal_path, start_lsn) for _ in range(repeats)]

    size = sum(p.stat().st_size for p in workdir.glob(f"{SLOT}.sqlite3*"))
    report.add(f"journal files: {size / 1e6:.0f} MB for {rows:,} events")
    table_rows = [
        [
            index + 1,
            f"{seconds:.3f}",
            rate_text(rows / seconds),
            f"{app_cpu:.2f}",
            f"{client_cpu:.2f}",
            f"{direct_seconds:.3f}",
            rate_text(count / direct_seconds),
        ]
        for index, (
            (seconds, app_cpu, client_cpu),
            (direct_seconds, count),
        ) in enumerate(zip(runs, direct, strict=True))
    ]
    for line in table(
        [
            "run",
            "resume s",
            "resume events/s",
            "app CPU s",
            "client CPU s",
            "direct read s",
            "direct events/s",
        ],
        table_rows,
    ):
        report.add(line)

    served = median([rows / seconds for seconds, _, _ in runs])
    ceiling = median([count / seconds for seconds, count in direct])
    report.key(
        f"replay: {rate_text(served)} events/s to a resuming client (median), "
        f"{served / ceiling:.2f} of a direct Journal.read_after loop "
        f"({rate_text(ceiling)} events/s)"
    )
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Replay benchmark.")
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args(argv)
    with workspace() as ws:
        run(ws, args.rows, args.repeats)


if __name__ == "__main__":
    main()
