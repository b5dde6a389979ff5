"""The order rows the benchmarks write, and a paced insert load.

Run as ``python -m bench.workload --dsn DSN --rate R --seconds S`` to insert
R rows/s for S seconds: one transaction every `--tick` seconds on an absolute
schedule, each row's `sent_us` set to the wall clock just before its INSERT.
It writes one JSON line with what it did and its own CPU time, so that a
benchmark can show that the load generator was not the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Any

import psycopg2
import psycopg2.extensions

ORDERS_COLUMNS = """
    id bigserial PRIMARY KEY,
    market_id text NOT NULL,
    user_id text NOT NULL,
    side text NOT NULL,
    quantity integer NOT NULL,
    price numeric(10, 4) NOT NULL,
    type text NOT NULL,
    status text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_us bigint
"""

# Rows like those of a trading dashboard; `g` numbers the rows of one INSERT.
_ROW_VALUES = """
    'BTC-USD', 'user-' || (g %% 5000), CASE WHEN g %% 2 = 0 THEN 'buy' ELSE 'sell' END,
    1 + g %% 100, round((20000 + random() * 1000)::numeric, 4), 'limit', 'open'
"""


def create_orders(
    cur: psycopg2.extensions.cursor, table: str = "orders", extra: str = ""
) -> None:
    """Create an orders table; `extra` adds column definitions."""
    columns = ORDERS_COLUMNS + (f", {extra}" if extra else "")
    cur.execute(f"CREATE TABLE {table} ({columns})")


def insert_statement(table: str = "orders") -> str:
    """Return an INSERT of `%(rows)s` generated rows whose sent_us is `%(sent_us)s`."""
    return (
        f"INSERT INTO {table} "
        "(market_id, user_id, side, quantity, price, type, status, sent_us) "
        f"SELECT {_ROW_VALUES}, %(sent_us)s FROM generate_series(1, %(rows)s) g"
    )


def now_us() -> int:
    return int(time.time() * 1_000_000)


def bulk_load(dsn: str, rows: int, batch: int, table: str = "orders") -> dict[str, Any]:
    """Insert `rows` rows in transactions of `batch` rows; return time and CPU."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    statement = insert_statement(table)
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    try:
        with conn.cursor() as cur:
            for _ in range(rows // batch):
                cur.execute(statement, {"rows": batch, "sent_us": now_us()})
    finally:
        conn.close()
    seconds = time.perf_counter() - started
    return {
        "rows": rows // batch * batch,
        "seconds": seconds,
        "cpu_seconds": _cpu_seconds() - cpu_before,
    }


def pace(
    dsn: str, rate: float, seconds: float, tick: float, table: str
) -> dict[str, Any]:
    """Insert `rate` rows/s for `seconds` s, one transaction per `tick` s."""
    ticks = max(1, round(seconds / tick))
    per_tick = rate * tick
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    statement = insert_statement(table)
    rows = 0
    transactions = 0
    max_behind = 0.0
    owed = 0.0
    cpu_before = _cpu_seconds()
    started_at = time.time()
    started = time.perf_counter()
    try:
        with conn.cursor() as cur:
            for index in range(ticks):
                due = started + index * tick
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                else:
                    max_behind = max(max_behind, -delay)

                # Carry fractions over, so that 2.5 rows per tick average 2.5.
                owed += per_tick
                count = int(owed)
                owed -= count
                if count:
                    cur.execute(statement, {"rows": count, "sent_us": now_us()})
                    rows += count
                    transactions += 1
    finally:
        conn.close()
    elapsed = time.perf_counter() - started
    return {
        "rows": rows,
        "transactions": transactions,
        "started_at": started_at,
        "seconds": elapsed,
        "rows_per_second": rows / elapsed,
        "max_behind_ms": max_behind * 1000,
        "cpu_seconds": _cpu_seconds() - cpu_before,
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Insert order rows at a fixed rate.")
    parser.add_argument("--dsn", required=True, help="libpq connection string")
    parser.add_argument("--rate", type=float, required=True, help="rows per second")
    parser.add_argument("--seconds", type=float, required=True, help="duration")
    parser.add_argument(
        "--tick", type=float, default=0.01, help="seconds between transactions"
    )
    parser.add_argument("--table", default="orders", help="table to insert into")
    args = parser.parse_args(argv)
    result = pace(args.dsn, args.rate, args.seconds, args.tick, args.table)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
