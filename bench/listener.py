"""The trigger design's consumer: a LISTEN client counting notifications.

Run as ``python -m bench.listener --dsn DSN --channel NAME``. It writes
``{"ready": true}`` once it listens, then counts notifications. It stops
when none arrived for `--idle-seconds` after at least `--expect` of them
(at least one, without `--expect`), or after `--seconds`. Then it writes
one JSON line with the count, the payload bytes and its own CPU time.
"""

from __future__ import annotations

import argparse
import json
import resource
import select
import sys
import time
from typing import Any

import psycopg2
import psycopg2.extensions

# The trigger of the design that cdc-stream replaces: every row change is
# sent with pg_notify in the same envelope as cdc-stream's events.
TRIGGER_FUNCTION = """
CREATE FUNCTION notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    row_data json;
BEGIN
    IF TG_OP = 'DELETE' THEN
        row_data := row_to_json(OLD);
    ELSE
        row_data := row_to_json(NEW);
    END IF;
    PERFORM pg_notify(
        TG_TABLE_NAME || '_changes',
        json_build_object(
            'type', 'database_change',
            'channel', TG_TABLE_NAME || '_changes',
            'operation', TG_OP,
            'table', TG_TABLE_NAME,
            'data', row_data,
            'timestamp',
            to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
        )::text
    );
    RETURN NULL;
END
$$;
"""


def trigger_statement(table: str) -> str:
    """Return the CREATE TRIGGER that notifies every row change of `table`."""
    return (
        f"CREATE TRIGGER {table}_notify AFTER INSERT OR UPDATE OR DELETE ON {table} "
        "FOR EACH ROW EXECUTE FUNCTION notify_change()"
    )


def listen(dsn: str, channel: str) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'LISTEN "{channel}"')
    return conn


def drain(
    conn: psycopg2.extensions.connection, idle_seconds: float, max_seconds: float
) -> tuple[int, int]:
    """Collect notifications until none came for `idle_seconds`; return count, bytes."""
    count = 0
    size = 0
    deadline = time.monotonic() + max_seconds
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([conn], [], [], 0.05)
        if ready:
            conn.poll()
        if conn.notifies:
            count += len(conn.notifies)
            size += sum(len(notify.payload) for notify in conn.notifies)
            conn.notifies.clear()
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > idle_seconds:
            break
    return count, size


def run(args: argparse.Namespace) -> dict[str, Any]:
    conn = listen(args.dsn, args.channel)
    _emit({"ready": True})
    count = 0
    size = 0
    deadline = time.monotonic() + args.seconds
    try:
        # Wait for the first notification or for the expected count, then
        # stop when the load has gone quiet.
        while time.monotonic() < deadline:
            received, received_bytes = drain(
                conn, args.idle_seconds, deadline - time.monotonic()
            )
            count += received
            size += received_bytes
            if count and count >= args.expect:
                break
    finally:
        conn.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "received": count,
        "payload_bytes": size,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
    }


def _emit(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Count NOTIFY messages on a channel.")
    parser.add_argument("--dsn", required=True, help="libpq connection string")
    parser.add_argument("--channel", required=True, help="channel to LISTEN on")
    parser.add_argument(
        "--expect", type=int, default=0, help="notifications to wait for at least"
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=2.0, help="quiet time that ends the count"
    )
    parser.add_argument("--seconds", type=float, required=True, help="maximum time")
    _emit(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
