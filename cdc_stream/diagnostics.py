"""Look at a slot and a journal from the command line: status and peek."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg2
import psycopg2.extensions

from .catalog import load_catalog
from .config import Settings
from .envelope import Event
from .errors import DecodeError, SetupError
from .journal import JournalStats
from .journals import EventJournal
from .replication import SESSION_OPTIONS, WAL2JSON_OPTIONS
from .translate import Translator

logger = logging.getLogger(__name__)

# A peek must not pin the server on a huge backlog.
PEEK_TIMEOUT_MS = 60_000


@dataclass(frozen=True)
class SlotStatus:
    """A slot's positions and the WAL it holds, as the server reports them."""

    name: str
    active_pid: int | None
    confirmed_flush_lsn: str | None
    restart_lsn: str | None
    wal_status: str | None
    current_wal_lsn: str
    retained_wal_bytes: int | None
    lag_bytes: int | None


def slot_status(dsn: str, name: str) -> SlotStatus | None:
    """Read the slot's positions and the WAL it retains; None if it is missing."""
    conn = psycopg2.connect(dsn, connect_timeout=10, application_name="cdc-stream")
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT slot_name, active_pid, confirmed_flush_lsn::text, "
                "restart_lsn::text, wal_status, pg_current_wal_lsn()::text, "
                "pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, "
                "pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
                "FROM pg_replication_slots WHERE slot_name = %s",
                (name,),
            )
            row = cur.fetchone()
    finally:
        conn.close()
    return None if row is None else SlotStatus(*row)


def journal_stats(journal: EventJournal) -> JournalStats:
    """Read the journal's range and size, then close it."""
    try:
        return journal.stats()
    finally:
        journal.close()


def peek(settings: Settings, limit: int) -> Iterator[Event]:
    """Yield up to `limit` events the slot has not delivered yet.

    The slot is copied to a temporary slot, which is peeked and dropped when
    the session ends, so the original slot, active or not, is left untouched.
    """
    conn = psycopg2.connect(
        settings.database_url,
        connect_timeout=10,
        application_name="cdc-stream peek",
        options=f"{SESSION_OPTIONS} -c statement_timeout={PEEK_TIMEOUT_MS}",
    )
    try:
        copy_name = f"cdc_peek_{uuid.uuid4().hex[:12]}"
        with conn.cursor() as cur:
            try:
                cur.execute(
                    "SELECT pg_copy_logical_replication_slot(%s, %s, true)",
                    (settings.slot_name, copy_name),
                )
            except psycopg2.errors.UndefinedObject:
                raise SetupError(
                    f"replication slot {settings.slot_name!r} does not exist"
                ) from None
        yield from _peek_copy(conn, copy_name, settings, limit)
    finally:
        conn.close()


def _peek_copy(
    conn: psycopg2.extensions.connection, slot: str, settings: Settings, limit: int
) -> Iterator[Event]:
    options: list[str] = []
    for name, value in WAL2JSON_OPTIONS.items():
        options.extend((name, value))

    translator = Translator(settings, catalog=load_catalog(conn))
    produced = 0
    # A named cursor fetches in pages, so a large transaction is not loaded
    # into this process at once.
    with conn.cursor(name="cdc_peek") as cur:
        cur.itersize = 1000
        placeholders = ", ".join(["%s"] * len(options))
        cur.execute(
            "SELECT lsn, data FROM pg_logical_slot_peek_binary_changes"
            f"(%s, NULL, NULL, {placeholders})",
            (slot, *options),
        )
        for lsn, data in cur:
            try:
                output = translator.feed(bytes(data))
            except DecodeError as error:
                logger.error("cannot decode wal2json message at %s: %s", lsn, error)
                continue
            if output.event is None:
                continue
            yield output.event
            produced += 1
            if produced >= limit:
                return
