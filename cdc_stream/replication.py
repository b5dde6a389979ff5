"""The replication reader: one thread streaming the slot and handing on events.

The thread connects with psycopg2's `LogicalReplicationConnection`, pins the
session settings that shape wal2json's output, and streams the slot. Events
are handed to the event loop in batches. The slot's flush LSN is confirmed
only past transactions whose events were all handed on, so a crash re-delivers
from the slot instead of losing changes.

psycopg2 sends the confirmed LSN on its own every `status_interval` seconds
and whenever a server keepalive requests a reply. Once the last transaction is
confirmed, it also advances the confirmed LSN to the WAL end reported by
keepalives, so a slot on idle tables holds no WAL it does not need.
"""

from __future__ import annotations

import logging
import random
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
import psycopg2
import psycopg2.errors
import psycopg2.extras

from . import slot as slot_checks
from . import sse
from .catalog import connect_and_load, load_catalog
from .checks import log_replica_identity_issues
from .config import Settings
from .envelope import Event, format_timestamp
from .errors import SetupError, SlotInUseError
from .journal import Appended, Journal
from .positions import Position, format_lsn, parse_lsn
from .translate import Translator

logger = logging.getLogger(__name__)

# Session settings that change how wal2json prints values; pinned so that the
# output depends on neither the server's nor the role's defaults.
SESSION_OPTIONS = " ".join(
    f"-c {name}={value}"
    for name, value in (
        ("TimeZone", "UTC"),
        ("DateStyle", "ISO,YMD"),
        ("IntervalStyle", "postgres"),
        ("extra_float_digits", "1"),
        ("bytea_output", "hex"),
        ("search_path", "pg_catalog"),
        ("lc_monetary", "C"),
    )
)

WAL2JSON_OPTIONS = {
    "format-version": "2",
    "include-transaction": "1",
    "include-xids": "1",
    "include-timestamp": "1",
    "include-lsn": "1",
    "include-types": "0",
    "include-type-oids": "1",
}

BATCH_SIZE = 1000
POLL_SECONDS = 0.5
MIN_BACKOFF_SECONDS = 0.5
STANDBY_RETRY_SECONDS = 1.0
PRUNE_INTERVAL_SECONDS = 10.0

# Operation of journal entries that every subscriber receives, whatever its
# filter; their channel is empty.
HISTORY_LOST = "HISTORY_LOST"


@dataclass
class ReplicationStatus:
    """State of the reader, read by `/healthz`."""

    state: str = "starting"
    slot: str = ""
    connected: bool = False
    last_error: str | None = None
    confirmed_lsn: int | None = None
    server_wal_end: int | None = None
    last_commit_monotonic: float | None = None
    events_handed_on: int = 0
    decode_errors: int = 0
    attempts: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        lag = None
        if self.server_wal_end is not None and self.confirmed_lsn is not None:
            lag = max(0, self.server_wal_end - self.confirmed_lsn)
        return {
            "state": self.state,
            "connected": self.connected,
            "slot": self.slot,
            "confirmed_lsn": _lsn_text(self.confirmed_lsn),
            "server_wal_end": _lsn_text(self.server_wal_end),
            "lag_bytes": lag,
            "events": self.events_handed_on,
            "decode_errors": self.decode_errors,
            "last_error": self.last_error,
        }


def _lsn_text(lsn: int | None) -> str | None:
    return None if lsn is None else format_lsn(lsn)


class ReplicationReader:
    """Streams one slot in a background thread until stopped."""

    def __init__(
        self,
        settings: Settings,
        journal: Journal,
        on_appended: Callable[[Appended | None], None] = lambda appended: None,
    ) -> None:
        self._settings = settings
        self._journal = journal
        self._on_appended = on_appended
        self._last_prune = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._translator = Translator(
            settings,
            load_catalog=lambda: connect_and_load(settings.database_url),
        )
        self.status = ReplicationStatus(slot=settings.slot_name)
        self._target = slot_checks.describe_target(settings.database_url)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="cdc-replication", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("replication thread did not stop within %.1f s", timeout)
        self.status.state = "stopped"
        self.status.connected = False

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self.status.attempts += 1
            started = time.monotonic()
            try:
                self._connect_and_stream()
            except SlotInUseError as error:
                self._enter_standby(str(error))
                self._stop.wait(STANDBY_RETRY_SECONDS * random.uniform(0.5, 1.5))
                continue
            except psycopg2.errors.ObjectInUse as error:
                self._enter_standby((error.pgerror or str(error)).strip())
                self._stop.wait(STANDBY_RETRY_SECONDS * random.uniform(0.5, 1.5))
                continue
            except (psycopg2.Error, SetupError, OSError) as error:
                self._record_failure(error)
            finally:
                self.status.connected = False
                self._translator.reset_transaction()
                self._journal.close()
            if self._stop.is_set():
                break

            # A stream that ran for a while resets the backoff.
            failures = 0 if time.monotonic() - started > 30 else failures + 1
            delay = self._backoff(failures)
            self.status.state = "retrying"
            logger.info("reconnecting to %s in %.1f s", self._target, delay)
            self._stop.wait(delay)

    def _enter_standby(self, reason: str) -> None:
        # Another process holds the slot: this one serves clients from the
        # journal and takes over when the slot is released.
        if self.status.state != "standby":
            logger.info("standing by: %s", reason)
        self.status.state = "standby"
        self.status.last_error = None

    def _backoff(self, failures: int) -> float:
        cap = self._settings.reconnect_max_seconds
        base = min(cap, MIN_BACKOFF_SECONDS * 2 ** min(failures, 16))
        return base * random.uniform(0.5, 1.0)

    def _record_failure(self, error: BaseException) -> None:
        if isinstance(error, SetupError):
            message = str(error)
        elif isinstance(error, psycopg2.Error):
            message = (error.pgerror or str(error)).strip() or type(error).__name__
            if _is_plugin_error(message):
                message = str(slot_checks.plugin_error(error))
            elif "is active for PID" in message:
                message = (
                    f"replication slot {self._settings.slot_name!r} is in use by "
                    "another process: stop it or set another CDC_SLOT_NAME"
                )
        else:
            message = f"{type(error).__name__}: {error}"
        self.status.last_error = message
        logger.error(
            "replication on slot %s at %s failed: %s",
            self._settings.slot_name,
            self._target,
            message,
        )

    def _connect_and_stream(self) -> None:
        # A standby keeps its state while it checks the slot again, so that
        # /healthz does not flap and the standby message is logged once.
        if self.status.state != "standby":
            self.status.state = "connecting"
        settings = self._settings

        # The checks cast to pg_catalog types by name, so a search_path that
        # puts a schema with a type named like a built-in first must not apply.
        check_conn = psycopg2.connect(
            settings.database_url,
            connect_timeout=10,
            application_name="cdc-stream",
            options="-c search_path=pg_catalog",
        )
        try:
            slot_checks.check_server(check_conn)
            self._check_journal_database(check_conn)
            slot = self._prepare_slot(check_conn)
            catalog = load_catalog(check_conn)
        finally:
            check_conn.close()
        self._translator.use_catalog(catalog)
        log_replica_identity_issues(catalog, settings)

        last = self._journal.last_position()
        horizon = self._journal.horizon()
        self._translator.last_position = max(
            last or Position(0, -1), horizon[0] if horizon else Position(0, -1)
        )

        conn = psycopg2.connect(
            settings.database_url,
            connection_factory=psycopg2.extras.LogicalReplicationConnection,
            connect_timeout=10,
            application_name="cdc-stream",
            options=SESSION_OPTIONS,
        )
        try:
            cur = conn.cursor()
            cur.start_replication(
                slot_name=settings.slot_name,
                decode=False,
                options=WAL2JSON_OPTIONS,
                status_interval=settings.status_interval_seconds,
            )
            self.status.state = "streaming"
            self.status.connected = True
            self.status.last_error = None
            logger.info(
                "streaming slot %s at %s from %s",
                settings.slot_name,
                self._target,
                slot.confirmed_flush_lsn,
            )
            self._stream(cur)
            # Tell the server what was confirmed before closing, so a restart
            # does not re-deliver it; psycopg2 otherwise sends on a timer.
            cur.send_feedback(force=True)
        finally:
            conn.close()

    def _check_journal_database(self, conn: psycopg2.extensions.connection) -> None:
        """Refuse a journal written for another database: its positions differ."""
        with conn.cursor() as cur:
            cur.execute(
                "SELECT system_identifier, current_database() FROM pg_control_system()"
            )
            system_id, dbname = cur.fetchone()
        identity = f"{system_id}/{dbname}"
        recorded = self._journal.get_meta("database")
        if recorded is None:
            self._journal.set_meta("database", identity)
        elif recorded != identity:
            raise SetupError(
                f"journal {str(self._journal.path)!r} belongs to database "
                f"{recorded!r}, not {identity!r} (system identifier/database): "
                "set CDC_JOURNAL_PATH to a journal for this database"
            )

    def _prepare_slot(
        self, conn: psycopg2.extensions.connection
    ) -> slot_checks.SlotInfo:
        """Check the slot, creating it on first start and, if allowed, after loss."""
        settings = self._settings
        name = settings.slot_name
        attached = self._journal.get_meta("slot") == name
        slot = slot_checks.find_slot(conn, name)
        lost = False

        if slot is not None and slot.wal_status == "lost" and settings.recreate_slot:
            logger.error("replication slot %s is invalidated; recreating it", name)
            slot_checks.drop_slot(conn, name)
            slot = None
            lost = True
        if slot is None and attached:
            if not settings.recreate_slot:
                raise SetupError(
                    f"replication slot {name!r} was dropped after this journal "
                    "streamed it, so changes since then are lost. Set [slot] "
                    "recreate = true to create it again and tell clients that "
                    "history was lost"
                )
            lost = True

        slot = slot_checks.check_slot(conn, name, create=settings.create_slot or lost)
        confirmed = parse_lsn(slot.confirmed_flush_lsn or "0/0")
        if not attached:
            self._journal.set_meta("slot", name)
            self._journal.raise_horizon(Position(confirmed, -1), time.time())
        elif lost:
            self._record_history_lost(confirmed)
        return slot

    def _record_history_lost(self, confirmed: int) -> None:
        # No commit record starts one byte before a record boundary, so this
        # position is unique and sorts before every change of the new slot.
        position = Position(confirmed - 1, 0)
        event = {
            "type": "history_lost",
            "message": "the replication slot was recreated; changes committed "
            "before it may be missing, so reload your state",
            "timestamp": format_timestamp(datetime.now(UTC)),
            "id": position.event_id,
        }
        frame = sse.frame(orjson.dumps(event), position.event_id)
        # The horizon stays where it is, so a client resuming from before
        # this event replays the events still held, then this event.
        self._journal.append(
            [Event(position, "", "", "", HISTORY_LOST, frame, time.time())]
        )
        self._on_appended(None)
        logger.error(
            "history lost: slot %s recreated at %s",
            self._settings.slot_name,
            format_lsn(confirmed),
        )

    def _stream(self, cur: psycopg2.extras.ReplicationCursor) -> None:
        batch: list[Event] = []
        pending_confirm: int | None = None

        while not self._stop.is_set():
            message = cur.read_message()
            if message is None:
                if not self._hand_on(batch):
                    return
                batch = []
                if pending_confirm is not None:
                    self._confirm(cur, pending_confirm)
                    pending_confirm = None
                self.status.server_wal_end = cur.wal_end
                self.status.decode_errors = self._translator.decode_errors
                self._maybe_prune()
                select.select([cur], [], [], POLL_SECONDS)
                continue

            # A message that cannot be decoded becomes an error event.
            output = self._translator.feed(message.payload)

            if output.event is not None:
                batch.append(output.event)
            if output.confirm_lsn is not None:
                pending_confirm = output.confirm_lsn
                self.status.last_commit_monotonic = time.monotonic()
            if len(batch) >= BATCH_SIZE:
                if not self._hand_on(batch):
                    return
                batch = []
                if pending_confirm is not None:
                    self._confirm(cur, pending_confirm)
                    pending_confirm = None

    def _hand_on(self, batch: list[Event]) -> bool:
        if not batch:
            return True
        previous = self._journal.append(batch)
        self._on_appended(None if previous is None else Appended(previous, batch))
        self.status.events_handed_on += len(batch)
        return not self._stop.is_set()

    def _maybe_prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < PRUNE_INTERVAL_SECONDS:
            return
        self._last_prune = now
        settings = self._settings
        deleted = self._journal.prune(
            settings.journal_max_events, settings.journal_max_age_seconds
        )
        if deleted:
            logger.info("pruned %d events from the journal", deleted)

    def _confirm(self, cur: psycopg2.extras.ReplicationCursor, lsn: int) -> None:
        cur.send_feedback(flush_lsn=lsn)
        self.status.confirmed_lsn = lsn


def _is_plugin_error(message: str) -> bool:
    return slot_checks.PLUGIN in message and (
        "could not access file" in message or "output plugin" in message
    )
