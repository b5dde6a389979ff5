"""The replication reader: one thread streaming the slot and handing on events.

The thread connects with psycopg2's `LogicalReplicationConnection`, pins the
session settings that shape wal2json's output, and streams the slot. Events
are handed to the event loop in batches. The slot's flush LSN is confirmed
only past transactions whose events were all handed on, so a crash re-delivers
from the slot instead of losing changes.

psycopg2 sends the confirmed LSN on its own every `status_interval` seconds
and whenever a server keepalive asks for a reply. Once the last transaction is
confirmed, it also advances the confirmed LSN to the WAL end reported by
keepalives, so a slot on idle tables holds no WAL it does not need.
"""

from __future__ import annotations

import logging
import random
import select
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import psycopg2
import psycopg2.errors
import psycopg2.extras

from . import slot as slot_checks
from .config import Settings
from .envelope import Event
from .errors import DecodeError, SetupError
from .positions import format_lsn
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


class EventSink(Protocol):
    def put(self, events: list[Event], stop: threading.Event) -> bool: ...


@dataclass
class ReplicationStatus:
    """What the reader is doing, read by `/healthz`."""

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

    def __init__(self, settings: Settings, sink: EventSink) -> None:
        self._settings = settings
        self._sink = sink
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._translator = Translator(settings)
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
            except (psycopg2.Error, SetupError, OSError) as error:
                self._record_failure(error)
            finally:
                self.status.connected = False
                self._translator.reset_transaction()
            if self._stop.is_set():
                break

            # A stream that ran for a while resets the backoff.
            failures = 0 if time.monotonic() - started > 30 else failures + 1
            delay = self._backoff(failures)
            self.status.state = "retrying"
            logger.info("reconnecting to %s in %.1f s", self._target, delay)
            self._stop.wait(delay)

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
        self.status.state = "connecting"
        settings = self._settings

        check_conn = psycopg2.connect(
            settings.database_url, connect_timeout=10, application_name="cdc-stream"
        )
        try:
            slot_checks.check_server(check_conn)
            slot = slot_checks.check_slot(
                check_conn, settings.slot_name, settings.create_slot
            )
        finally:
            check_conn.close()

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
        finally:
            conn.close()

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
                select.select([cur], [], [], POLL_SECONDS)
                continue

            try:
                output = self._translator.feed(message.payload)
            except DecodeError as error:
                self._decode_failed(message.data_start, error)
                continue

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
        if not self._sink.put(batch, self._stop):
            return False
        self.status.events_handed_on += len(batch)
        return True

    def _confirm(self, cur: psycopg2.extras.ReplicationCursor, lsn: int) -> None:
        cur.send_feedback(flush_lsn=lsn)
        self.status.confirmed_lsn = lsn

    def _decode_failed(self, lsn: int, error: DecodeError) -> None:
        # NOTE: the message is skipped; its contents are not logged because
        # they hold row data.
        self.status.decode_errors += 1
        logger.error("cannot decode wal2json message at %s: %s", format_lsn(lsn), error)


def _is_plugin_error(message: str) -> bool:
    return slot_checks.PLUGIN in message and (
        "could not access file" in message or "output plugin" in message
    )
