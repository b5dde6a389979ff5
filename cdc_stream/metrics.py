"""Prometheus metrics of one process, served as text by `GET /metrics`.

Counters that change per event are updated by hub callbacks. Everything
else is read at scrape time by `StreamCollector`, which the route runs in a
worker thread: the slot's lag and retained WAL come from a query cached for
SLOT_REFRESH_SECONDS, so scrapes never wait on the database more often.
Each process of `hypercorn -w N` has its own registry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg2
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .envelope import Event

logger = logging.getLogger(__name__)

SLOT_REFRESH_SECONDS = 5.0
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0
)  # fmt: skip
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_SLOT_QUERY = """
SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint,
       pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint,
       s.active_pid IS NOT NULL,
       extract(epoch FROM r.flush_lag)::float8
FROM pg_catalog.pg_replication_slots s
LEFT JOIN pg_catalog.pg_stat_replication r ON r.pid = s.active_pid
WHERE s.slot_name = %s
"""


@dataclass(frozen=True)
class SlotSample:
    """One reading of the slot, from the server's point of view."""

    lag_bytes: int | None
    retained_bytes: int | None
    active: bool
    lag_seconds: float | None


class SlotSampler:
    """The slot query, run at most every SLOT_REFRESH_SECONDS."""

    def __init__(self, database_url: str, slot_name: str) -> None:
        self._database_url = database_url
        self._slot_name = slot_name
        self._lock = threading.Lock()
        self._sample: SlotSample | None = None
        self._taken_at = float("-inf")
        self.errors = 0

    def sample(self) -> SlotSample | None:
        """Return the cached reading, refreshed first if old; blocking."""
        with self._lock:
            if time.monotonic() - self._taken_at >= SLOT_REFRESH_SECONDS:
                self._taken_at = time.monotonic()
                self._sample = self._query()
            return self._sample

    def _query(self) -> SlotSample | None:
        try:
            conn = psycopg2.connect(
                self._database_url,
                connect_timeout=3,
                application_name="cdc-stream metrics",
                options="-c statement_timeout=2000",
            )
        except psycopg2.Error as error:
            return self._failed(error)
        try:
            with conn.cursor() as cur:
                cur.execute(_SLOT_QUERY, (self._slot_name,))
                row = cur.fetchone()
        except psycopg2.Error as error:
            return self._failed(error)
        finally:
            conn.close()
        if row is None:
            return None
        lag_bytes, retained, active, lag_seconds = row
        if active and lag_seconds is None:
            # pg_stat_replication clears flush_lag once the slot has caught up.
            lag_seconds = 0.0
        return SlotSample(lag_bytes, retained, bool(active), lag_seconds)

    def _failed(self, error: psycopg2.Error) -> None:
        self.errors += 1
        message = (getattr(error, "pgerror", None) or str(error)).strip()
        logger.warning("slot metrics query failed: %s", message)
        return None


class StreamMetrics:
    """The registry of one app, with the hub callbacks that feed it."""

    def __init__(self, stream: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events = PromCounter(
            "cdc_stream_events",
            "Events published to this process's subscribers.",
            ["table", "operation"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cdc_stream_commit_to_send_seconds",
            "Time from a transaction's commit to the write of its first pending "
            "event to a client; one sample per write.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.slot = SlotSampler(stream.settings.database_url, stream.settings.slot_name)
        self.registry.register(StreamCollector(stream, self.slot))

    def published(self, events: list[Event]) -> None:
        """Count published events by table and operation; hub callback."""
        counts = Counter(
            (f"{event.schema}.{event.table}" if event.table else "", event.operation)
            for event in events
        )
        for (table, operation), count in counts.items():
            self.events.labels(table, operation).inc(count)

    def sent(self, commit_time: float) -> None:
        """Observe the latency of a write to a client; hub callback."""
        if commit_time > 0:
            self.latency.observe(max(0.0, time.time() - commit_time))

    def render(self) -> bytes:
        """Return the metrics in Prometheus text format; may block on the slot query."""
        return generate_latest(self.registry)


class StreamCollector(Collector):
    """Values read at scrape time from the hub, the reader and the journal."""

    def __init__(self, stream: Any, slot: SlotSampler) -> None:
        self._stream = stream
        self._slot = slot

    def describe(self) -> list[Any]:
        # Without it, registering would call collect() and query the slot.
        return []

    def collect(self) -> Iterator[Any]:
        yield from self._hub_metrics()
        yield from self._replication_metrics()
        yield from self._journal_metrics()

    def _hub_metrics(self) -> Iterator[Any]:
        hub = self._stream.hub
        yield GaugeMetricFamily(
            "cdc_stream_clients", "Clients connected to this process.", len(hub)
        )
        yield CounterMetricFamily(
            "cdc_stream_slow_clients_ended",
            "Clients ended because they fell too far behind.",
            getattr(hub, "slow_clients_ended", 0),
        )

    def _replication_metrics(self) -> Iterator[Any]:
        reader = self._stream.reader
        state = reader.status.state if reader is not None else "starting"
        states = GaugeMetricFamily(
            "cdc_stream_replication_state",
            "1 for the replication reader's current state.",
            labels=["state"],
        )
        states.add_metric([state], 1)
        yield states

        sample = self._slot.sample()
        if sample is None:
            return
        if sample.lag_bytes is not None:
            yield GaugeMetricFamily(
                "cdc_stream_replication_lag_bytes",
                "WAL bytes between the server's current position and the slot's "
                "confirmed flush position.",
                sample.lag_bytes,
            )
        if sample.lag_seconds is not None:
            yield GaugeMetricFamily(
                "cdc_stream_replication_lag_seconds",
                "flush_lag of the slot's walsender in pg_stat_replication.",
                sample.lag_seconds,
            )
        if sample.retained_bytes is not None:
            yield GaugeMetricFamily(
                "cdc_stream_slot_retained_wal_bytes",
                "WAL bytes the server keeps for the slot (from its restart_lsn).",
                sample.retained_bytes,
            )

    def _journal_metrics(self) -> Iterator[Any]:
        try:
            stats = self._stream.journal.stats()
        except Exception as error:
            # The SQLite and Redis backends raise their own error types.
            logger.warning("journal metrics failed: %s", error)
            return
        yield GaugeMetricFamily(
            "cdc_stream_journal_size_bytes",
            "Size of the journal's storage.",
            stats.size_bytes,
        )
        yield GaugeMetricFamily(
            "cdc_stream_journal_events", "Events the journal holds.", stats.events
        )
