"""Every kind of change, through a real replication connection and in pure code.

The server tests run `ReplicationReader` against a private cluster and read
the events it stored in its journal. The pure tests feed wal2json lines to
`Translator` directly.
"""

from __future__ import annotations

import decimal
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg2
import pytest

from cdc_stream.catalog import (
    AttributeRow,
    Catalog,
    Category,
    TableRow,
    TypeInfo,
    TypeRow,
    build_catalog,
    load_catalog,
)
from cdc_stream.checks import check_database, find_replica_identity_issues
from cdc_stream.config import Settings
from cdc_stream.errors import ConfigError
from cdc_stream.journal import Journal
from cdc_stream.positions import Position, parse_event_id, parse_lsn
from cdc_stream.replication import ReplicationReader
from cdc_stream.translate import Translator

sys.set_int_max_str_digits(0)


def parse_json(text: str | bytes) -> Any:
    return json.loads(text, parse_float=decimal.Decimal)


def frame_data(frame: bytes) -> dict[str, Any]:
    """Return the parsed JSON of an SSE frame's single data line."""
    lines = frame.decode().split("\n")
    data_lines = [line for line in lines if line.startswith("data: ")]
    assert len(data_lines) == 1, frame
    return parse_json(data_lines[0][len("data: ") :])


def execute(dsn: str, *statements: str) -> None:
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


def execute_autocommit(dsn: str, *statements: str) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


class ReaderRun:
    """A `ReplicationReader` on its own slot, storing events in a journal."""

    def __init__(self, dsn: str, directory: Path, **settings: Any) -> None:
        suffix = uuid.uuid4().hex[:10]
        self.settings = Settings(
            database_url=dsn,
            slot_name=f"kinds_{suffix}",
            journal_path=str(directory / f"journal-{suffix}.sqlite3"),
            **settings,
        )
        self.journal = Journal(Path(self.settings.journal_path))
        self.reader = ReplicationReader(self.settings, self.journal)

    def start(self, timeout: float = 30.0) -> None:
        self.reader.start()
        deadline = time.monotonic() + timeout
        while self.reader.status.state != "streaming":
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"reader not streaming after {timeout} s: "
                    f"{self.reader.status.as_dict()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        self.reader.stop()

    def restart(self) -> None:
        """Start a new reader on the same slot and journal."""
        self.reader = ReplicationReader(self.settings, self.journal)
        self.start()

    def events(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until the journal contains `count` events; return them parsed."""
        deadline = time.monotonic() + timeout
        while True:
            stored = self.journal.read_after(Position(0, -1), count + 100)
            if len(stored) >= count or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        events = [frame_data(event.frame) for event in stored]
        assert len(events) == count, (
            f"expected {count} events, got {len(events)}: "
            f"{[(e['type'], e.get('operation'), e.get('table')) for e in events]}"
        )
        return events


@pytest.fixture
def reader_run(database: str, tmp_path: Path) -> Iterator[Any]:
    """Factory of started `ReaderRun` objects on `database`, stopped at teardown."""
    runs: list[ReaderRun] = []

    def start(**settings: Any) -> ReaderRun:
        run = ReaderRun(database, tmp_path, **settings)
        runs.append(run)
        run.start()
        return run

    yield start
    for run in runs:
        run.stop()


def changes(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event for event in events if event["type"] == "database_change"]


# --- UPDATE and DELETE with the replica identity ---------------------------


def test_update_and_delete_carry_old_by_identity(database, reader_run):
    execute(
        database,
        "CREATE TABLE keyed (id int PRIMARY KEY, v text)",
        "CREATE TABLE full_row (id int PRIMARY KEY, v text, n numeric)",
        "ALTER TABLE full_row REPLICA IDENTITY FULL",
        "CREATE TABLE by_index (id int PRIMARY KEY, code text NOT NULL, v text)",
        "CREATE UNIQUE INDEX by_index_code ON by_index (code)",
        "ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_code",
    )
    run = reader_run()

    execute(
        database,
        "INSERT INTO keyed VALUES (1, 'a')",
        "UPDATE keyed SET v = 'b' WHERE id = 1",
        "UPDATE keyed SET id = 2 WHERE id = 1",
        "DELETE FROM keyed WHERE id = 2",
        "INSERT INTO full_row VALUES (1, 'a', 1.50)",
        "UPDATE full_row SET v = 'b' WHERE id = 1",
        "DELETE FROM full_row WHERE id = 1",
        "INSERT INTO by_index VALUES (1, 'c1', 'a')",
        "UPDATE by_index SET code = 'c2' WHERE id = 1",
        "DELETE FROM by_index WHERE id = 1",
    )
    events = run.events(10)

    update, key_change, delete = events[1], events[2], events[3]
    assert update["data"] == {"id": 1, "v": "b"}
    assert update["old"] == {"id": 1}
    assert key_change["data"] == {"id": 2, "v": "b"}
    assert key_change["old"] == {"id": 1}
    assert delete["data"] == {"id": 2}
    assert delete["old"] == {"id": 2}

    full_update, full_delete = events[5], events[6]
    assert full_update["data"] == {"id": 1, "v": "b", "n": decimal.Decimal("1.50")}
    assert full_update["old"] == {"id": 1, "v": "a", "n": decimal.Decimal("1.50")}
    assert full_delete["data"] == {"id": 1, "v": "b", "n": decimal.Decimal("1.50")}

    index_update, index_delete = events[8], events[9]
    assert index_update["old"] == {"code": "c1"}
    assert index_delete["data"] == {"code": "c2"}


def test_insert_has_no_old(database, reader_run):
    execute(database, "CREATE TABLE plain (id int PRIMARY KEY)")
    run = reader_run()

    execute(database, "INSERT INTO plain VALUES (7)")
    (event,) = run.events(1)

    assert event["operation"] == "INSERT"
    assert event["data"] == {"id": 7}
    assert "old" not in event


# --- Tables whose UPDATE and DELETE wal2json drops -------------------------

IDENTITY_DDL = (
    "CREATE TABLE nopk_default (a int, b text)",
    "CREATE TABLE nopk_nothing (a int, b text)",
    "ALTER TABLE nopk_nothing REPLICA IDENTITY NOTHING",
    "CREATE TABLE nopk_full (a int, b text)",
    "ALTER TABLE nopk_full REPLICA IDENTITY FULL",
    "CREATE TABLE with_key (id int PRIMARY KEY)",
    'CREATE TABLE "Odd ""Name""" (a int)',
    "CREATE UNLOGGED TABLE scratch (a int)",
    "CREATE TABLE parted (id int, r text) PARTITION BY LIST (r)",
    "CREATE TABLE parted_a PARTITION OF parted FOR VALUES IN ('a')",
)


def test_replica_identity_issues_found(database):
    execute(database, *IDENTITY_DDL)
    conn = psycopg2.connect(database)
    try:
        catalog = load_catalog(conn)
    finally:
        conn.close()

    findings = find_replica_identity_issues(catalog)

    subjects = [finding.subject for finding in findings]
    assert subjects == [
        'public."Odd ""Name"""',
        "public.nopk_default",
        "public.nopk_nothing",
        "public.parted_a",
    ]
    by_subject = {finding.subject: finding for finding in findings}
    assert "no primary key and REPLICA IDENTITY DEFAULT" in (
        by_subject["public.nopk_default"].message
    )
    assert "REPLICA IDENTITY NOTHING" in by_subject["public.nopk_nothing"].message
    assert by_subject['public."Odd ""Name"""'].fix == (
        'run ALTER TABLE public."Odd ""Name""" REPLICA IDENTITY FULL, '
        "or add a primary key"
    )
    assert {finding.check for finding in findings} == {"replica_identity"}


def test_replica_identity_issues_follow_table_filter(database):
    execute(database, *IDENTITY_DDL)
    settings = Settings(database_url=database, exclude_tables=("public.nopk_*",))

    findings = check_database(database, settings)

    assert [finding.subject for finding in findings] == [
        'public."Odd ""Name"""',
        "public.parted_a",
    ]


def test_dropped_identity_index_is_an_issue(database):
    execute(
        database,
        "CREATE TABLE coded (code text NOT NULL, v text)",
        "CREATE UNIQUE INDEX coded_code ON coded (code)",
        "ALTER TABLE coded REPLICA IDENTITY USING INDEX coded_code",
    )
    assert check_database(database) == []

    execute(database, "DROP INDEX coded_code")
    (finding,) = check_database(database)

    assert finding.subject == "public.coded"
    assert "the index no longer exists" in finding.message


def test_reader_warns_and_wal2json_drops_updates(database, reader_run, caplog):
    execute(database, *IDENTITY_DDL)
    caplog.set_level(logging.WARNING, logger="cdc_stream.checks")
    run = reader_run()

    warnings = [
        record.getMessage()
        for record in caplog.records
        if record.name == "cdc_stream.checks" and record.levelno == logging.WARNING
    ]
    assert any(
        "public.nopk_default" in message
        and "ALTER TABLE public.nopk_default REPLICA IDENTITY FULL" in message
        for message in warnings
    )
    assert any("public.nopk_nothing" in message for message in warnings)
    assert not any("nopk_full" in message for message in warnings)
    assert not any("with_key" in message for message in warnings)

    execute(
        database,
        "INSERT INTO nopk_default VALUES (1, 'x')",
        "UPDATE nopk_default SET b = 'y'",
        "DELETE FROM nopk_default",
        "INSERT INTO nopk_full VALUES (1, 'x')",
        "UPDATE nopk_full SET b = 'y'",
    )
    events = run.events(3)
    assert [(e["table"], e["operation"]) for e in events] == [
        ("nopk_default", "INSERT"),
        ("nopk_full", "INSERT"),
        ("nopk_full", "UPDATE"),
    ]
    assert events[2]["old"] == {"a": 1, "b": "x"}


# --- Unchanged TOASTed columns ----------------------------------------------

# md5 hex does not compress, so 2.5 kB of it is stored out of line.
BIG_VALUE_SQL = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 80) g)"


def test_unchanged_toast_filled_from_full_identity(database, reader_run):
    execute(
        database,
        "CREATE TABLE toast_full (id int PRIMARY KEY, big text, small text)",
        "ALTER TABLE toast_full REPLICA IDENTITY FULL",
    )
    run = reader_run()

    execute(database, f"INSERT INTO toast_full VALUES (1, {BIG_VALUE_SQL}, 's1')")
    execute(database, "UPDATE toast_full SET small = 's2' WHERE id = 1")
    insert, update = run.events(2)

    big = insert["data"]["big"]
    assert len(big) == 2560
    assert update["data"] == {"id": 1, "big": big, "small": "s2"}
    assert update["old"]["big"] == big
    assert "unchanged_toast" not in update


def test_unchanged_toast_listed_without_old_value(database, reader_run):
    execute(
        database,
        "CREATE TABLE toast_keyed (id int PRIMARY KEY, big text, small text)",
    )
    run = reader_run()

    execute(database, f"INSERT INTO toast_keyed VALUES (1, {BIG_VALUE_SQL}, 's1')")
    execute(database, "UPDATE toast_keyed SET small = 's2' WHERE id = 1")
    execute(database, "UPDATE toast_keyed SET big = 'short' WHERE id = 1")
    _, update, toast_update = run.events(3)

    assert update["data"] == {"id": 1, "small": "s2"}
    assert update["unchanged_toast"] == ["big"]
    assert toast_update["data"] == {"id": 1, "big": "short", "small": "s2"}
    assert "unchanged_toast" not in toast_update


def test_dropped_column_not_taken_for_toast(database, reader_run):
    execute(database, "CREATE TABLE shrinking (id int PRIMARY KEY, note text, v int)")
    run = reader_run()

    execute(database, "ALTER TABLE shrinking DROP COLUMN note")
    execute(database, "INSERT INTO shrinking VALUES (1, 1)")
    execute(database, "UPDATE shrinking SET v = 2 WHERE id = 1")
    _, update = run.events(2)

    assert update["data"] == {"id": 1, "v": 2}
    assert "unchanged_toast" not in update


# --- Partitions ----------------------------------------------------------------


def test_partitions_reported_under_root(database, reader_run):
    execute(
        database,
        "CREATE TABLE measurements (id int, region text, v int, "
        "PRIMARY KEY (id, region)) PARTITION BY LIST (region)",
        "CREATE TABLE measurements_eu PARTITION OF measurements FOR VALUES IN ('eu')",
        "CREATE TABLE measurements_us PARTITION OF measurements "
        "FOR VALUES IN ('us') PARTITION BY RANGE (id)",
        "CREATE TABLE measurements_us_low PARTITION OF measurements_us "
        "FOR VALUES FROM (0) TO (100)",
        "CREATE SCHEMA archive",
        "CREATE TABLE archive.measurements_ap PARTITION OF measurements "
        "FOR VALUES IN ('ap')",
    )
    run = reader_run()

    execute(
        database,
        "INSERT INTO measurements VALUES (1, 'eu', 10), (2, 'us', 20), (3, 'ap', 30)",
        "UPDATE measurements SET region = 'us' WHERE id = 1",
    )
    events = run.events(5)

    for event in events:
        assert event["table"] == "measurements"
        assert event["schema"] == "public"
        assert event["channel"] == "measurements_changes"
    assert [e["partition"] for e in events] == [
        "measurements_eu",
        "measurements_us_low",
        "measurements_ap",
        "measurements_eu",
        "measurements_us_low",
    ]
    assert events[2]["partition_schema"] == "archive"
    assert "partition_schema" not in events[0]
    assert [e["operation"] for e in events[3:]] == ["DELETE", "INSERT"]


def test_partition_created_while_streaming(database, reader_run):
    execute(
        database,
        "CREATE TABLE readings (id int, day date) PARTITION BY RANGE (day)",
    )
    run = reader_run()

    execute(
        database,
        "CREATE TABLE readings_2024 PARTITION OF readings "
        "FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
    )
    execute(database, "INSERT INTO readings VALUES (1, '2024-05-01')")
    (event,) = run.events(1)

    assert event["table"] == "readings"
    assert event["partition"] == "readings_2024"
    assert event["data"] == {"id": 1, "day": "2024-05-01"}


def test_partition_filter_uses_root_name(database, reader_run):
    execute(
        database,
        "CREATE TABLE metrics (id int PRIMARY KEY) PARTITION BY RANGE (id)",
        "CREATE TABLE metrics_1 PARTITION OF metrics FOR VALUES FROM (0) TO (10)",
        "CREATE TABLE other (id int PRIMARY KEY)",
    )
    run = reader_run(include_tables=("public.metrics",))

    execute(database, "INSERT INTO other VALUES (1)", "INSERT INTO metrics VALUES (1)")
    (event,) = run.events(1)

    assert event["table"] == "metrics"
    assert event["partition"] == "metrics_1"


# --- TRUNCATE ---------------------------------------------------------------------


def test_truncate_event_per_table(database, reader_run):
    execute(
        database,
        "CREATE TABLE trunc_a (id int PRIMARY KEY)",
        "CREATE TABLE trunc_b (id int PRIMARY KEY)",
        "INSERT INTO trunc_a VALUES (1)",
    )
    run = reader_run()

    execute(database, "TRUNCATE trunc_a, trunc_b")
    events = run.events(2)

    assert sorted(e["table"] for e in events) == ["trunc_a", "trunc_b"]
    for event in events:
        assert event["operation"] == "TRUNCATE"
        assert event["data"] is None
        assert event["channel"] == f"{event['table']}_changes"
        assert "old" not in event
    assert events[0]["lsn"] == events[1]["lsn"]
    assert events[0]["id"] != events[1]["id"]


def test_truncate_of_partitioned_table(database, reader_run):
    execute(
        database,
        "CREATE TABLE tp (id int) PARTITION BY RANGE (id)",
        "CREATE TABLE tp_1 PARTITION OF tp FOR VALUES FROM (0) TO (10)",
        "CREATE TABLE tp_2 PARTITION OF tp FOR VALUES FROM (10) TO (20)",
    )
    run = reader_run()

    execute(database, "TRUNCATE tp")
    events = run.events(3)

    # wal2json names the partitioned table itself and each partition.
    assert [e["table"] for e in events] == ["tp", "tp", "tp"]
    assert sorted(e.get("partition", "") for e in events) == ["", "tp_1", "tp_2"]
    assert {e["operation"] for e in events} == {"TRUNCATE"}


# --- Logical messages ----------------------------------------------------------


def test_logical_messages_with_configured_prefixes(database, reader_run):
    execute(database, "CREATE TABLE msg_t (id int PRIMARY KEY)")
    run = reader_run(message_prefixes=("app", "bin*"))

    execute(
        database,
        "INSERT INTO msg_t VALUES (1)",
        "SELECT pg_logical_emit_message(true, 'app', 'in \"tx\"\nline two')",
        "SELECT pg_logical_emit_message(true, 'ignored', 'not streamed')",
        "INSERT INTO msg_t VALUES (2)",
    )
    execute_autocommit(
        database,
        "SELECT pg_logical_emit_message(false, 'app', 'outside')",
        "INSERT INTO msg_t VALUES (3)",
    )
    events = run.events(5)

    assert [(e["type"], e.get("content")) for e in events] == [
        ("database_change", None),
        ("logical_message", 'in "tx"\nline two'),
        ("database_change", None),
        ("logical_message", "outside"),
        ("database_change", None),
    ]
    in_tx, outside = events[1], events[3]
    assert in_tx["prefix"] == "app"
    assert in_tx["channel"] == "app"
    assert in_tx["transactional"] is True
    assert in_tx["xid"] == events[0]["xid"]
    assert in_tx["lsn"] == events[0]["lsn"]
    assert in_tx["timestamp"] == events[0]["timestamp"]
    assert outside["transactional"] is False
    assert outside["timestamp"] is None
    assert outside["xid"] is None

    positions = [parse_event_id(e["id"]) for e in events]
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions)
    # The ignored message still takes an index in its transaction.
    assert [p.index for p in positions[:3]] == [0, 1, 3]
    assert positions[3] == Position(parse_lsn(outside["lsn"]) - 1, 0)


def test_logical_message_not_utf8(database, reader_run):
    run = reader_run(message_prefixes=("bin",))

    execute(
        database,
        "SELECT pg_logical_emit_message(true, 'bin', '\\x41ff0042'::bytea)",
        "SELECT pg_logical_emit_message(true, 'bin', 'after')",
    )
    binary, after = run.events(2)

    # wal2json cuts the content at the first NUL byte, so B is lost.
    assert binary["content"] == "A\ufffd"
    assert binary["invalid_utf8"] is True
    assert binary["content_hex"] == "41ff"
    assert after["content"] == "after"
    assert "invalid_utf8" not in after


def test_logical_messages_off_by_default(database, reader_run):
    execute(database, "CREATE TABLE quiet (id int PRIMARY KEY)")
    run = reader_run()

    execute(
        database,
        "SELECT pg_logical_emit_message(true, 'app', 'skipped')",
        "INSERT INTO quiet VALUES (1)",
    )
    (event,) = run.events(1)

    assert event["type"] == "database_change"
    assert parse_event_id(event["id"]).index == 1


# --- BEGIN and COMMIT events ------------------------------------------------------


def test_transaction_events_when_configured(database, reader_run):
    execute(database, "CREATE TABLE tx_t (id int PRIMARY KEY)")
    run = reader_run(transaction_events=True)

    execute(database, "INSERT INTO tx_t VALUES (1)", "INSERT INTO tx_t VALUES (2)")
    execute(database, "INSERT INTO tx_t VALUES (3)")
    events = run.events(7)

    kinds = [(e["type"], e.get("operation")) for e in events]
    assert kinds == [
        ("transaction", "BEGIN"),
        ("database_change", "INSERT"),
        ("database_change", "INSERT"),
        ("transaction", "COMMIT"),
        ("transaction", "BEGIN"),
        ("database_change", "INSERT"),
        ("transaction", "COMMIT"),
    ]
    first = events[:4]
    assert len({e["xid"] for e in first}) == 1
    assert len({e["lsn"] for e in first}) == 1
    assert [parse_event_id(e["id"]).index for e in first] == [0, 1, 2, 3]
    assert first[0]["timestamp"] == first[1]["timestamp"]
    assert "channel" not in first[0]


def test_every_change_has_xid_and_commit_lsn(database, reader_run):
    execute(database, "CREATE TABLE xl (id int PRIMARY KEY)")
    run = reader_run()

    conn = psycopg2.connect(database)
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO xl VALUES (1), (2)")
            cur.execute("SELECT txid_current()")
            (xid,) = cur.fetchone()
        conn.commit()
    finally:
        conn.close()
    events = run.events(2)

    for event in events:
        assert event["xid"] == xid
        assert event["lsn"] == event["id"].split(":")[0]
    assert "transaction" not in {e["type"] for e in events}


# --- Catalog refresh ----------------------------------------------------------------


def test_type_created_while_streaming(database, reader_run):
    run = reader_run()

    execute(
        database,
        "CREATE TYPE pair AS (a int, b text)",
        "CREATE TABLE pairs (id int PRIMARY KEY, p pair, ps pair[])",
        "INSERT INTO pairs VALUES (1, ROW(1, 'x y'), ARRAY[ROW(2, NULL)::pair])",
    )
    (first,) = run.events(1)
    execute(database, "ALTER TYPE pair ADD ATTRIBUTE c numeric")
    execute(database, "INSERT INTO pairs VALUES (2, ROW(3, 'z', 1.0))")
    _, second = run.events(2)

    assert first["data"] == {
        "id": 1,
        "p": {"a": 1, "b": "x y"},
        "ps": [{"a": 2, "b": None}],
    }
    assert second["data"]["p"] == {"a": 3, "b": "z", "c": decimal.Decimal("1.0")}
    assert "unconverted" not in first
    assert "unconverted" not in second


def test_value_older_than_catalog_sent_as_text(database, reader_run, caplog):
    execute(
        database,
        "CREATE TYPE pair AS (a int, b text)",
        "CREATE TABLE pairs (id int PRIMARY KEY, p pair)",
    )
    run = reader_run()
    run.stop()

    # The reader reads the catalog after the type changed, so the value
    # written before the change no longer matches it.
    execute(database, "INSERT INTO pairs VALUES (1, ROW(1, 'x'))")
    execute(database, "ALTER TYPE pair ADD ATTRIBUTE c numeric")
    caplog.set_level(logging.WARNING, logger="cdc_stream.values")
    run.restart()
    (event,) = run.events(1)

    assert event["data"] == {"id": 1, "p": "(1,x)"}
    assert event["unconverted"] == ["p"]
    assert any("public.pair" in record.getMessage() for record in caplog.records)
    assert not any("(1,x)" in record.getMessage() for record in caplog.records)


# --- Pure translator: positions, errors, notes -------------------------------------

SETTINGS = Settings(database_url="postgresql://unused")


def begin(xid: int, lsn: str, end: str) -> bytes:
    return orjson.dumps(
        {
            "action": "B",
            "xid": xid,
            "timestamp": "2024-03-18 10:30:00.5+00",
            "lsn": lsn,
            "nextlsn": end,
        }
    )


def commit(xid: int, lsn: str, end: str) -> bytes:
    return begin(xid, lsn, end).replace(b'"action":"B"', b'"action":"C"')


def insert(table: str, lsn: str, columns: list[dict[str, Any]]) -> bytes:
    return orjson.dumps(
        {
            "action": "I",
            "xid": 1,
            "timestamp": "2024-03-18 10:30:00.5+00",
            "lsn": lsn,
            "schema": "public",
            "table": table,
            "columns": columns,
        }
    )


def message(transactional: bool, prefix: str, content: str, lsn: str) -> bytes:
    return orjson.dumps(
        {
            "action": "M",
            "xid": 1 if transactional else None,
            "timestamp": "2024-03-18 10:30:00.5+00" if transactional else None,
            "lsn": lsn,
            "transactional": transactional,
            "prefix": prefix,
            "content": content,
        }
    )


def event_of(translator: Translator, payload: bytes) -> dict[str, Any]:
    output = translator.feed(payload)
    assert output.event is not None
    return frame_data(output.event.frame)


INT_COLUMN = {"name": "id", "typeoid": 23, "value": 1}
BROKEN_LINE = (
    b'{"action":"U","xid":1,"timestamp":"2024-03-18 10:30:00.5+00",'
    b'"lsn":"0/10","schema":"public","table":"orders","columns":'
    b'[{"name":"card","typeoid":25,"value":"4111-SECRET'
)


def test_broken_line_becomes_error_event(caplog):
    translator = Translator(SETTINGS)
    translator.feed(begin(1, "0/100", "0/180"))

    with caplog.at_level(logging.ERROR, logger="cdc_stream.translate"):
        error = event_of(translator, BROKEN_LINE)
    change = event_of(translator, insert("orders", "0/20", [INT_COLUMN]))
    output = translator.feed(commit(1, "0/100", "0/180"))

    assert error["type"] == "decode_error"
    assert error["id"] == "0/100:0"
    assert error["lsn"] == "0/100"
    assert error["table"] == "orders"
    assert error["channel"] == "orders_changes"
    assert error["operation"] == "UPDATE"
    assert error["xid"] == 1
    assert "SECRET" not in error["message"]
    assert change["id"] == "0/100:1"
    assert output.confirm_lsn == parse_lsn("0/180")
    assert translator.decode_errors == 1

    (record,) = [r for r in caplog.records if r.name == "cdc_stream.translate"]
    assert "0/10" in record.getMessage()
    assert "SECRET" not in record.getMessage()


def test_broken_line_outside_transaction():
    translator = Translator(SETTINGS)
    translator.feed(begin(1, "0/100", "0/180"))
    translator.feed(insert("t", "0/20", [INT_COLUMN]))
    translator.feed(commit(1, "0/100", "0/180"))

    broken = b'{"action":"M","xid":null,"timestamp":null,"lsn":"0/200","transac'
    error = event_of(translator, broken)
    garbage = event_of(translator, b"not json at all")

    assert error["id"] == "0/1FF:0"
    assert error["channel"] == ""
    assert garbage["id"] == "0/1FF:1"
    assert translator.last_position == Position(0x1FF, 1)


def test_change_outside_transaction_is_error_event():
    translator = Translator(SETTINGS)

    error = event_of(translator, insert("t", "0/40", [INT_COLUMN]))

    assert error["type"] == "decode_error"
    assert "outside a transaction" in error["message"]
    assert error["id"] == "0/3F:0"


def test_change_with_invalid_lsn_is_error_event():
    translator = Translator(SETTINGS)

    error = event_of(translator, insert("t", "not-an-lsn", [INT_COLUMN]))

    assert error["type"] == "decode_error"
    assert error["id"] == "0/0:0"


def test_message_positions_between_transactions():
    settings = Settings(database_url="postgresql://unused", message_prefixes=("*",))
    translator = Translator(settings)

    translator.feed(begin(1, "0/100", "0/180"))
    first = event_of(translator, insert("t", "0/20", [INT_COLUMN]))
    in_tx = event_of(translator, message(True, "p", "a", "0/60"))
    translator.feed(commit(1, "0/100", "0/180"))
    outside = event_of(translator, message(False, "p", "b", "0/200"))
    translator.feed(begin(2, "0/300", "0/380"))
    second = event_of(translator, insert("t", "0/200", [INT_COLUMN]))

    ids = [first["id"], in_tx["id"], outside["id"], second["id"]]
    assert ids == ["0/100:0", "0/100:1", "0/1FF:0", "0/300:0"]
    assert [parse_event_id(i) for i in ids] == sorted(parse_event_id(i) for i in ids)
    assert in_tx["lsn"] == "0/100"
    assert outside["lsn"] == "0/200"


def test_redelivered_message_is_skipped():
    settings = Settings(database_url="postgresql://unused", message_prefixes=("p",))
    translator = Translator(settings)
    event_of(translator, message(False, "p", "b", "0/200"))

    assert translator.feed(message(False, "p", "b", "0/200")).event is None


def test_transaction_event_positions():
    settings = Settings(database_url="postgresql://unused", transaction_events=True)
    translator = Translator(settings)

    opened = event_of(translator, begin(7, "0/100", "0/180"))
    change = event_of(translator, insert("t", "0/20", [INT_COLUMN]))
    output = translator.feed(commit(7, "0/100", "0/180"))
    assert output.event is not None
    closed = frame_data(output.event.frame)

    assert opened == {
        "type": "transaction",
        "operation": "BEGIN",
        "timestamp": "2024-03-18T10:30:00.500Z",
        "id": "0/100:0",
        "lsn": "0/100",
        "xid": 7,
    }
    assert change["id"] == "0/100:1"
    assert closed["operation"] == "COMMIT"
    assert closed["id"] == "0/100:2"
    assert output.confirm_lsn == parse_lsn("0/180")


def toast_catalog(identity: str) -> Catalog:
    types = [
        TypeRow(23, "pg_catalog", "int4", "b", 0, ",", 0, 0, length=4),
        TypeRow(25, "pg_catalog", "text", "b", 0, ",", 0, 0),
    ]
    attributes = [
        AttributeRow(500, "id", 23, "p"),
        AttributeRow(500, "big", 25, "x"),
        AttributeRow(500, "small", 25, "x"),
    ]
    table = TableRow(500, "public", "docs", "r", identity, "p", False, True, False)
    return build_catalog(types, attributes, [table], {})


def update(columns: list[dict[str, Any]], identity: list[dict[str, Any]]) -> bytes:
    return orjson.dumps(
        {
            "action": "U",
            "xid": 1,
            "timestamp": "2024-03-18 10:30:00.5+00",
            "lsn": "0/20",
            "schema": "public",
            "table": "docs",
            "columns": columns,
            "identity": identity,
        }
    )


def test_unchanged_toast_from_catalog():
    translator = Translator(SETTINGS, catalog=toast_catalog("d"))
    translator.feed(begin(1, "0/100", "0/180"))

    event = event_of(
        translator,
        update(
            [INT_COLUMN, {"name": "small", "typeoid": 25, "value": "s"}],
            [INT_COLUMN],
        ),
    )

    assert event["data"] == {"id": 1, "small": "s"}
    assert event["unchanged_toast"] == ["big"]


def test_unchanged_toast_refreshes_catalog_once():
    loads: list[int] = []

    def load() -> Catalog:
        loads.append(1)
        return toast_catalog("d")

    translator = Translator(SETTINGS, catalog=toast_catalog("d"), load_catalog=load)
    translator.feed(begin(1, "0/100", "0/180"))
    row = update(
        [INT_COLUMN, {"name": "small", "typeoid": 25, "value": "s"}], [INT_COLUMN]
    )

    first = event_of(translator, row)
    second = event_of(translator, row)

    assert first["unchanged_toast"] == ["big"]
    assert second["unchanged_toast"] == ["big"]
    assert loads == [1]


def test_unknown_type_refreshes_catalog():
    mood = TypeInfo(90000, "public.mood", Category.TEXT)
    refreshed = Catalog(types={**Catalog.builtin().types, mood.oid: mood})
    loads: list[int] = []

    def load() -> Catalog:
        loads.append(1)
        return refreshed

    translator = Translator(SETTINGS, load_catalog=load)
    translator.feed(begin(1, "0/100", "0/180"))
    column = {"name": "m", "typeoid": 90000, "value": "happy"}

    event = event_of(translator, insert("t", "0/20", [column]))
    again = event_of(translator, insert("t", "0/30", [{**column, "typeoid": 90001}]))

    assert event["data"] == {"m": "happy"}
    assert "unconverted" not in event
    assert again["data"] == {"m": "happy"}
    assert again["unconverted"] == ["m"]
    # One read for the unknown table, which brings the new type too, and one
    # for the type that is still unknown after it.
    assert len(loads) == 2


def test_fresh_catalog_allows_refresh_again():
    loads: list[int] = []

    def load() -> Catalog:
        loads.append(1)
        return Catalog.builtin()

    translator = Translator(SETTINGS, load_catalog=load)
    translator.feed(begin(1, "0/100", "0/180"))
    row = insert("t", "0/20", [{"name": "m", "typeoid": 90000, "value": "x"}])

    event_of(translator, row)
    event_of(translator, row)
    assert len(loads) == 2
    translator.use_catalog(Catalog.builtin())
    event = event_of(translator, row)

    assert len(loads) == 4
    assert event["unconverted"] == ["m"]


def test_nan_reported_as_ambiguous_null():
    translator = Translator(SETTINGS)
    translator.feed(begin(1, "0/100", "0/180"))
    columns = [
        INT_COLUMN,
        {"name": "price", "typeoid": 1700, "value": None},
        {"name": "ratio", "typeoid": 701, "value": None},
        {"name": "count", "typeoid": 23, "value": None},
    ]

    event = event_of(translator, insert("t", "0/20", columns))

    assert event["data"]["price"] is None
    assert event["ambiguous_nulls"] == ["price", "ratio"]


# --- Through the app ---------------------------------------------------------------


def sse_events(client: Any, count: int) -> list[dict[str, Any]]:
    """Return the next `count` events other than connection and heartbeat."""
    events: list[dict[str, Any]] = []
    while len(events) < count:
        event = parse_json(client.next_event(20).data)
        if event["type"] not in ("connection", "heartbeat"):
            events.append(event)
    return events


def test_app_streams_messages_and_boundaries(
    app_server, sse_stream, database, tmp_path
):
    execute(database, "CREATE TABLE orders (id int PRIMARY KEY)")
    suffix = uuid.uuid4().hex[:10]
    server = app_server(
        {
            "DATABASE_URL": database,
            "CDC_SLOT_NAME": f"app_{suffix}",
            "CDC_JOURNAL_PATH": str(tmp_path / f"journal-{suffix}.sqlite3"),
            "CDC_MESSAGE_PREFIXES": "audit",
            "CDC_TRANSACTION_EVENTS": "true",
        }
    )
    server.wait_until_healthy()
    by_table = sse_stream(server.url("/api/realtime?channels=orders_changes"))
    by_prefix = sse_stream(server.url("/api/realtime?channels=audit"))
    deadline = time.monotonic() + 30
    while True:
        state = httpx.get(server.url("/healthz"), timeout=5, trust_env=False).json()
        if state["replication"]["state"] == "streaming":
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.1)

    execute(
        database,
        "INSERT INTO orders VALUES (1)",
        "SELECT pg_logical_emit_message(true, 'audit', 'order 1 placed')",
    )
    table_events = sse_events(by_table, 3)
    prefix_events = sse_events(by_prefix, 3)

    assert [(e["type"], e.get("operation")) for e in table_events] == [
        ("transaction", "BEGIN"),
        ("database_change", "INSERT"),
        ("transaction", "COMMIT"),
    ]
    assert [(e["type"], e.get("operation")) for e in prefix_events] == [
        ("transaction", "BEGIN"),
        ("logical_message", None),
        ("transaction", "COMMIT"),
    ]
    assert prefix_events[1]["content"] == "order 1 placed"
    assert prefix_events[1]["id"].endswith(":2")


# --- Settings of change kinds ----------------------------------------------------


def test_change_kind_settings_from_toml(tmp_path):
    path = tmp_path / "cdc.toml"
    path.write_text(
        '[messages]\nprefixes = ["audit", "app.*"]\n'
        "[types]\nnumeric_as_string = true\n"
        "[stream]\ntransaction_events = true\n"
    )

    settings = Settings.from_env({"CDC_CONFIG": str(path), "DATABASE_URL": "dbname=x"})

    assert settings.message_prefixes == ("audit", "app.*")
    assert settings.numeric_as_string is True
    assert settings.transaction_events is True
    assert settings.streams_message("app.login")
    assert not settings.streams_message("other")


def test_change_kind_settings_from_environment():
    settings = Settings.from_env(
        {
            "DATABASE_URL": "dbname=x",
            "CDC_MESSAGE_PREFIXES": "audit, app",
            "CDC_NUMERIC_AS_STRING": "1",
            "CDC_TRANSACTION_EVENTS": "false",
        }
    )

    assert settings.message_prefixes == ("audit", "app")
    assert settings.numeric_as_string is True
    assert settings.transaction_events is False


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[messages]\nprefixes = "audit"\n', "messages.prefixes"),
        ('[types]\nnumeric_as_string = "yes"\n', "types.numeric_as_string"),
        ("[stream]\ntransaction_events = 1\n", "stream.transaction_events"),
        ("[types]\nnumerics = true\n", "types.numerics"),
    ],
)
def test_invalid_change_kind_settings_name_key(tmp_path, toml, key):
    path = tmp_path / "cdc.toml"
    path.write_text(toml)

    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"CDC_CONFIG": str(path), "DATABASE_URL": "dbname=x"})

    assert key in str(raised.value)


def test_invalid_boolean_environment_names_key():
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(
            {"DATABASE_URL": "dbname=x", "CDC_TRANSACTION_EVENTS": "maybe"}
        )

    assert "CDC_TRANSACTION_EVENTS" in str(raised.value)


# --- Memory with a transaction of a million rows ----------------------------------

MILLION = 1_000_000
# Peak resident memory allowed to each process of the app. In this test the
# Hypercorn worker peaked at about 56 MiB (2-core development machine), while
# holding the transaction's million events at once would take several hundred
# MiB: each frame is about 150 bytes, plus its Event object and position.
MAX_APP_PEAK_RSS_BYTES = 150 * 1024 * 1024


def peak_rss_bytes(pid: int) -> int:
    """Return a process's peak resident set size (VmHWM) from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB$", status, re.M)
    assert match is not None, status
    return int(match[1]) * 1024


def process_tree(pid: int) -> list[int]:
    """Return `pid` and its descendants; Hypercorn serves from child processes."""
    pids = [pid]
    for parent in pids:
        for task in Path(f"/proc/{parent}/task").iterdir():
            children = (task / "children").read_text().split()
            pids.extend(int(child) for child in children)
    return pids


def test_million_row_transaction_bounded_memory(app_server, database, tmp_path):
    execute(database, "CREATE TABLE big_tx (id int PRIMARY KEY, v text)")
    suffix = uuid.uuid4().hex[:10]
    server = app_server(
        {
            "DATABASE_URL": database,
            "CDC_SLOT_NAME": f"million_{suffix}",
            "CDC_JOURNAL_PATH": str(tmp_path / f"journal-{suffix}.sqlite3"),
        }
    )
    deadline = time.monotonic() + 30
    while True:
        health = httpx.get(server.url("/healthz"), timeout=5, trust_env=False).json()
        if health["replication"]["state"] == "streaming":
            break
        assert time.monotonic() < deadline, health
        time.sleep(0.1)

    seen = bytearray(MILLION + 1)
    received = 0
    with httpx.Client(timeout=httpx.Timeout(120, connect=5), trust_env=False) as client:
        with client.stream("GET", server.url("/api/realtime")) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines).startswith("retry:")

            execute(
                database,
                "INSERT INTO big_tx SELECT g, 'row ' || g "
                f"FROM generate_series(1, {MILLION}) g",
            )
            for line in lines:
                if not line.startswith("data: "):
                    continue
                event = orjson.loads(line[6:])
                if event["type"] != "database_change":
                    assert event["type"] in ("connection", "heartbeat"), event
                    continue
                row_id = event["data"]["id"]
                assert seen[row_id] == 0, f"row {row_id} arrived twice"
                seen[row_id] = 1
                received += 1
                if received == MILLION:
                    break

        peaks = {pid: peak_rss_bytes(pid) for pid in process_tree(server.process.pid)}

    assert received == MILLION
    assert seen.count(1) == MILLION
    assert len(peaks) >= 2, "no Hypercorn worker process found"
    assert max(peaks.values()) < MAX_APP_PEAK_RSS_BYTES, (
        f"peak RSS in MiB by process: "
        f"{ {pid: round(peak / 2**20) for pid, peak in peaks.items()} }"
    )
