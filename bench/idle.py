"""Idle connections: 10,000 open streams that receive only heartbeats.

Two client processes open 5,000 streams each, at most 50 connection attempts
at a time per process so that Hypercorn's listen backlog (100 by default)
does not overflow. The app sends a heartbeat every 5 s here (30 s by
default), and the streams stay open for 12 s after the last one connected.
Memory per connection is the growth of the app worker's resident set size
divided by the number of streams.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from .harness import (
    AppServer,
    BenchError,
    Workspace,
    cpu_seconds,
    memory_kib,
    python_module,
    raise_open_files_limit,
    read_json_line,
    spawn,
    stop_process,
    workspace,
)
from .live import prepare_database, start_app
from .report import Report, table

CLIENTS = 10_000
PROCESSES = 2
HEARTBEAT_SECONDS = 5.0
HOLD_SECONDS = 12.0
CONCURRENCY = 50
SETTLE_SECONDS = 2.0


def run(ws: Workspace, clients: int = CLIENTS, hold: float = HOLD_SECONDS) -> Report:
    report = Report("idle")
    limit = raise_open_files_limit(clients + 4_096)
    report.add(
        f"## Idle connections: {clients:,} streams, heartbeat every "
        f"{HEARTBEAT_SECONDS:.0f} s, held {hold:.0f} s (open-files limit {limit:,})"
    )
    if limit < clients + 100:
        raise BenchError(
            f"open-files limit {limit} is too low for {clients} connections: "
            "raise the hard limit (ulimit -Hn) or pass fewer clients"
        )

    workdir = ws.scratch("idle")
    with ws.database("bench_idle") as dsn:
        prepare_database(dsn)
        env = {"CDC_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS)}
        with start_app(workdir, dsn, "idle", **env) as app:
            time.sleep(SETTLE_SECONDS)
            measured = _hold_streams(app, clients, hold)

    _describe(report, clients, hold, measured)
    return report


@dataclass
class IdleMeasure:
    """Memory and CPU of the app worker around the idle streams."""

    ready: list[dict[str, Any]]
    results: list[dict[str, Any]]
    rss_before_kib: int
    rss_connected_kib: int
    rss_end_kib: int
    rss_peak_kib: int
    server_clients: int
    cpu_hold: float

    @property
    def connected(self) -> int:
        return sum(document["connected"] for document in self.ready)

    def per_connection_kib(self, rss_kib: int) -> float:
        return (rss_kib - self.rss_before_kib) / max(self.connected, 1)


def _hold_streams(app: AppServer, clients: int, hold: float) -> IdleMeasure:
    worker = app.worker_pid()
    rss_before = memory_kib(worker)["VmRSS"]
    per_process = clients // PROCESSES
    readers = [
        spawn(
            python_module(
                "bench.sse_clients",
                f"--port={app.port}",
                f"--clients={per_process}",
                f"--concurrency={CONCURRENCY}",
                f"--seconds={hold}",
            )
        )
        for _ in range(PROCESSES)
    ]
    try:
        ready = [read_json_line(reader, 300) for reader in readers]
        rss_connected = memory_kib(worker)["VmRSS"]
        server_clients = app.health()["clients"]
        cpu_before = cpu_seconds(worker)
        results = [read_json_line(reader, hold + 60) for reader in readers]
        cpu_hold = cpu_seconds(worker) - cpu_before
        memory_end = memory_kib(worker)
    finally:
        for reader in readers:
            stop_process(reader)
    return IdleMeasure(
        ready=ready,
        results=results,
        rss_before_kib=rss_before,
        rss_connected_kib=rss_connected,
        rss_end_kib=memory_end["VmRSS"],
        rss_peak_kib=memory_end["VmHWM"],
        server_clients=server_clients,
        cpu_hold=cpu_hold,
    )


def _describe(report: Report, clients: int, hold: float, measured: IdleMeasure) -> None:
    connected = measured.connected
    connect_seconds = max(document["connect_seconds"] for document in measured.ready)
    per_connection = measured.per_connection_kib(measured.rss_connected_kib)
    per_connection_end = measured.per_connection_kib(measured.rss_end_kib)
    heartbeats_min = min(result["heartbeats_min"] for result in measured.results)
    closed = sum(result["closed_by_server"] for result in measured.results)
    client_cpu = sum(result["cpu_seconds_after_ready"] for result in measured.results)
    app_cpu_percent = 100 * measured.cpu_hold / hold

    for line in table(
        ["measure", "value"],
        [
            ["streams open", f"{connected:,} of {clients:,}"],
            ["subscribers seen by /healthz", f"{measured.server_clients:,}"],
            ["time to open all", f"{connect_seconds:.1f} s"],
            ["app RSS before", _mib(measured.rss_before_kib)],
            ["app RSS with all open", _mib(measured.rss_connected_kib)],
            ["app RSS at end", _mib(measured.rss_end_kib)],
            ["app peak RSS", _mib(measured.rss_peak_kib)],
            ["memory per connection", f"{per_connection:.1f} KiB"],
            ["memory per connection at end", f"{per_connection_end:.1f} KiB"],
            ["heartbeats per stream (min)", heartbeats_min],
            ["streams closed by the server", closed],
            ["app CPU while idle", f"{app_cpu_percent:.0f} % of one core"],
            ["client processes CPU", f"{100 * client_cpu / hold:.0f} %"],
        ],
    ):
        report.add(line)

    report.key(
        f"idle: {connected:,} streams, {per_connection:.1f} KiB per connection "
        f"({per_connection_end:.1f} KiB after heartbeats), app CPU "
        f"{app_cpu_percent:.0f} % while idle"
    )


def _mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Idle connections benchmark.")
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--hold", type=float, default=HOLD_SECONDS)
    args = parser.parse_args(argv)
    with workspace() as ws:
        run(ws, args.clients, args.hold)


if __name__ == "__main__":
    main()
