"""Fan-out: 1,000 concurrent SSE clients at 200 changes/s.

Two client processes hold 500 streams each and count every change event, so
the benchmark checks that every client received every event. The load
generator inserts 2 rows every 10 ms. Reported: delivered events/s, latency
percentiles over all clients' events, and the CPU and memory of the app
worker, of the walsender, of the client processes and of the generator.
"""

from __future__ import annotations

import argparse

from .harness import Workspace, workspace
from .live import LiveResult, prepare_database, run_paced, start_app
from .report import Report, rate_text, table

CLIENTS = 1_000
PROCESSES = 2
RATE = 200
SECONDS = 20.0
WARMUP = 2.0


def run(
    ws: Workspace,
    clients: int = CLIENTS,
    rate: float = RATE,
    seconds: float = SECONDS,
) -> Report:
    report = Report("fanout")
    report.add(
        f"## Fan-out: {clients:,} clients in {PROCESSES} processes, "
        f"{rate:,.0f} changes/s for {seconds:.0f} s"
    )
    workdir = ws.scratch("fanout")
    with ws.database("bench_fanout") as dsn:
        prepare_database(dsn)
        with start_app(workdir, dsn, "fanout") as app:
            result = run_paced(
                app,
                dsn,
                rate=rate,
                seconds=seconds,
                clients=clients,
                processes=PROCESSES,
                warmup=WARMUP,
            )
    describe(report, result)
    return report


def describe(report: Report, result: LiveResult) -> None:
    # Readers, app and walsender work until the last event arrives, which
    # can be after the load generator has finished.
    seconds = result.delivery_seconds
    expected = result.rows * result.clients
    client_cpu = ", ".join(f"{100 * cpu / seconds:.0f} %" for cpu in result.client_cpu)
    generator_cpu = 100 * result.generator_cpu / result.seconds
    for line in table(
        ["measure", "value"],
        [
            [
                "rows inserted",
                f"{result.rows:,} in {result.transactions:,} transactions",
            ],
            ["events delivered", f"{result.delivered:,} of {expected:,}"],
            ["delivered events/s", rate_text(result.delivered_per_second)],
            [
                "last event received",
                f"{result.delivery_seconds - result.seconds:.1f} s after the load",
            ],
            [
                "events per client (min / max)",
                f"{result.changes_min:,} / {result.changes_max:,}",
            ],
            ["slow_client disconnections", result.slow_clients],
            ["connect errors", result.connect_errors],
            ["time to connect all clients", f"{result.connect_seconds:.1f} s"],
            ["latency p50 / p99 / max", _latency(result)],
            ["latency samples", f"{result.latency_samples:,}"],
            ["app worker CPU", f"{100 * result.app_cpu / seconds:.0f} % of one core"],
            ["app worker RSS (end / peak)", _memory(result)],
            ["walsender CPU", f"{100 * result.walsender_cpu / seconds:.0f} %"],
            ["client processes CPU", client_cpu],
            ["load generator CPU", f"{generator_cpu:.0f} %"],
        ],
    ):
        report.add(line)

    every = "yes" if result.every_client_got_every_event else "NO"
    report.key(
        f"fan-out {result.clients:,} clients at {rate_text(result.rate)} changes/s: "
        f"{rate_text(result.delivered_per_second)} events/s delivered, every "
        f"client got every event: {every}, p50 {result.p50_ms:.1f} ms, p99 "
        f"{result.p99_ms:.1f} ms, app CPU {100 * result.app_cpu / seconds:.0f} %"
    )


def _latency(result: LiveResult) -> str:
    return f"{result.p50_ms:.1f} / {result.p99_ms:.1f} / {result.max_ms:.1f} ms"


def _memory(result: LiveResult) -> str:
    return f"{result.app_rss_mib:.0f} / {result.app_peak_rss_mib:.0f} MiB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fan-out benchmark.")
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--rate", type=float, default=RATE)
    parser.add_argument("--seconds", type=float, default=SECONDS)
    args = parser.parse_args(argv)
    with workspace() as ws:
        run(ws, args.clients, args.rate, args.seconds)


if __name__ == "__main__":
    main()
