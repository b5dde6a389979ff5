"""A paced insert load streamed live to SSE clients, measured end to end.

Shared by the latency and fan-out benchmarks: the app streams one database,
SSE client processes subscribe, then a load generator process inserts at a
fixed rate. Every process reports its own CPU time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .harness import (
    AppServer,
    BenchError,
    connect,
    cpu_seconds,
    memory_kib,
    python_module,
    read_json_line,
    slot_active_pid,
    spawn,
    stop_process,
)
from .report import histogram_count, histogram_percentiles, merge_histograms
from .workload import create_orders

TICK_SECONDS = 0.01
DRAIN_SECONDS = 15.0


@dataclass
class LiveResult:
    """Measurements of one paced run."""

    rate: float
    seconds: float
    delivery_seconds: float
    clients: int
    rows: int
    transactions: int
    generator_cpu: float
    generator_behind_ms: float
    delivered: int
    changes_min: int
    changes_max: int
    slow_clients: int
    connect_errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    latency_samples: int
    app_cpu: float
    walsender_cpu: float
    client_cpu: list[float] = field(default_factory=list)
    app_rss_mib: float = 0.0
    app_peak_rss_mib: float = 0.0
    connect_seconds: float = 0.0

    @property
    def delivered_per_second(self) -> float:
        """Events received by all clients, per second from load start to last event."""
        return self.delivered / self.delivery_seconds

    @property
    def every_client_got_every_event(self) -> bool:
        return self.changes_min == self.rows and self.changes_max == self.rows


def prepare_database(dsn: str) -> None:
    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            create_orders(cur)
    finally:
        conn.close()


def start_app(workdir: Path, dsn: str, name: str, **env: str) -> AppServer:
    """Start the app on its own slot and journal, and wait until it streams."""
    app_env = {
        "DATABASE_URL": dsn,
        "CDC_SLOT_NAME": name,
        "CDC_JOURNAL_PATH": str(workdir / f"{name}.sqlite3"),
        **env,
    }
    app = AppServer(workdir, app_env, name).start()
    try:
        app.wait_state(("streaming",))
    except BaseException:
        app.stop()
        raise
    return app


def run_paced(
    app: AppServer,
    dsn: str,
    *,
    rate: float,
    seconds: float,
    clients: int,
    processes: int,
    warmup: float,
) -> LiveResult:
    """Insert `rate` rows/s for `seconds` s while `clients` streams read them."""
    rows_per_tick = rate * TICK_SECONDS
    if rows_per_tick != int(rows_per_tick):
        raise ValueError(f"rate {rate} is not a whole number of rows per tick")
    expected = int(rows_per_tick) * round(seconds / TICK_SECONDS)

    readers = _start_readers(app, clients, processes, expected, seconds, warmup)
    try:
        ready = [read_json_line(reader, 120) for reader in readers]
        worker = app.worker_pid()
        walsender = _walsender_pid(dsn, app.name)
        app_cpu_before = cpu_seconds(worker)
        walsender_cpu_before = cpu_seconds(walsender)

        generator = spawn(
            python_module(
                "bench.workload",
                f"--dsn={dsn}",
                f"--rate={rate}",
                f"--seconds={seconds}",
                f"--tick={TICK_SECONDS}",
            )
        )
        load = read_json_line(generator, seconds + 60)
        generator.wait(10)
        results = [read_json_line(reader, DRAIN_SECONDS + 30) for reader in readers]
        app_cpu = cpu_seconds(worker) - app_cpu_before
        walsender_cpu = cpu_seconds(walsender) - walsender_cpu_before
        memory = memory_kib(worker)
    finally:
        for reader in readers:
            stop_process(reader)

    return _combine(rate, load, ready, results, app_cpu, walsender_cpu, memory, clients)


def _walsender_pid(dsn: str, slot: str) -> int:
    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            pid = slot_active_pid(cur, slot)
    finally:
        conn.close()
    if pid is None:
        raise BenchError(f"slot {slot} has no walsender: the app is not streaming it")
    return pid


def _start_readers(
    app: AppServer,
    clients: int,
    processes: int,
    expected: int,
    seconds: float,
    warmup: float,
) -> list[Any]:
    per_process = math.ceil(clients / processes)
    readers = []
    remaining = clients
    while remaining > 0:
        count = min(per_process, remaining)
        remaining -= count
        readers.append(
            spawn(
                python_module(
                    "bench.sse_clients",
                    f"--port={app.port}",
                    f"--clients={count}",
                    f"--events={expected}",
                    f"--seconds={seconds + warmup + DRAIN_SECONDS + 60}",
                    f"--warmup={warmup}",
                    "--latency",
                )
            )
        )
    return readers


def _combine(
    rate: float,
    load: dict[str, Any],
    ready: list[dict[str, Any]],
    results: list[dict[str, Any]],
    app_cpu: float,
    walsender_cpu: float,
    memory: dict[str, int],
    clients: int,
) -> LiveResult:
    connected = sum(document["connected"] for document in ready)
    if connected != clients:
        errors = [error for document in ready for error in document["errors"]]
        raise BenchError(f"{connected} of {clients} SSE clients connected: {errors}")

    last_event_at = max(result["last_change_at"] or 0.0 for result in results)
    histogram = merge_histograms(result["latency"] for result in results)
    bucket = results[0]["latency_bucket_us"]
    p50, p99, p100 = histogram_percentiles(histogram, bucket, (0.5, 0.99, 1.0))
    return LiveResult(
        rate=rate,
        seconds=load["seconds"],
        delivery_seconds=max(last_event_at - load["started_at"], load["seconds"]),
        clients=clients,
        rows=load["rows"],
        transactions=load["transactions"],
        generator_cpu=load["cpu_seconds"],
        generator_behind_ms=load["max_behind_ms"],
        delivered=sum(result["changes_total"] for result in results),
        changes_min=min(result["changes_min"] for result in results),
        changes_max=max(result["changes_max"] for result in results),
        slow_clients=sum(result["slow_clients"] for result in results),
        connect_errors=sum(result["connect_errors"] for result in results),
        p50_ms=p50,
        p99_ms=p99,
        max_ms=p100,
        latency_samples=histogram_count(histogram),
        app_cpu=app_cpu,
        walsender_cpu=walsender_cpu,
        client_cpu=[result["cpu_seconds_after_ready"] for result in results],
        app_rss_mib=memory.get("VmRSS", 0) / 1024,
        app_peak_rss_mib=memory.get("VmHWM", 0) / 1024,
        connect_seconds=max(document["connect_seconds"] for document in ready),
    )


def wait_quiet(seconds: float = 1.0) -> None:
    """Let the machine settle between runs."""
    time.sleep(seconds)
