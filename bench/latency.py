"""Latency: commit to SSE client at 100 and at 2,000 changes/s.

The load generator inserts one transaction every 10 ms (1 row at 100/s, 20
rows at 2,000/s) and writes its wall clock into each row's `sent_us` just
before the INSERT. One SSE client subtracts it from the time the event
arrived, so each sample covers INSERT, commit, decoding, journal, fan-out and
the socket. The first second after the client subscribed is left out.
"""

from __future__ import annotations

import argparse

from .harness import Workspace, workspace
from .live import LiveResult, prepare_database, run_paced, start_app, wait_quiet
from .report import Report, rate_text, table

RATES = (100, 2_000)
SECONDS = 12.0
WARMUP = 1.0


def run(ws: Workspace, seconds: float = SECONDS) -> Report:
    report = Report("latency")
    report.add(f"## Latency: one client, {seconds:.0f} s per rate")
    workdir = ws.scratch("latency")
    results: list[LiveResult] = []

    with ws.database("bench_latency") as dsn:
        prepare_database(dsn)
        with start_app(workdir, dsn, "latency") as app:
            for rate in RATES:
                results.append(
                    run_paced(
                        app,
                        dsn,
                        rate=rate,
                        seconds=seconds,
                        clients=1,
                        processes=1,
                        warmup=WARMUP,
                    )
                )
                wait_quiet()

    rows = [_row(result) for result in results]
    for line in table(
        [
            "changes/s",
            "rows",
            "p50 ms",
            "p99 ms",
            "max ms",
            "samples",
            "all delivered",
            "app CPU %",
            "walsender CPU %",
            "client CPU %",
            "generator CPU %",
            "generator max behind ms",
        ],
        rows,
    ):
        report.add(line)
    for result in results:
        report.key(
            f"latency at {rate_text(result.rate)} changes/s: p50 "
            f"{result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms"
        )
    return report


def _row(result: LiveResult) -> list[object]:
    seconds = result.delivery_seconds
    return [
        rate_text(result.rate),
        result.rows,
        f"{result.p50_ms:.1f}",
        f"{result.p99_ms:.1f}",
        f"{result.max_ms:.1f}",
        result.latency_samples,
        "yes" if result.every_client_got_every_event else "NO",
        f"{100 * result.app_cpu / seconds:.0f}",
        f"{100 * result.walsender_cpu / seconds:.0f}",
        f"{100 * sum(result.client_cpu) / seconds:.0f}",
        f"{100 * result.generator_cpu / result.seconds:.0f}",
        f"{result.generator_behind_ms:.1f}",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Latency benchmark.")
    parser.add_argument("--seconds", type=float, default=SECONDS)
    args = parser.parse_args(argv)
    with workspace() as ws:
        run(ws, args.seconds)


if __name__ == "__main__":
    main()
