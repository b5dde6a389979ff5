"""Run the benchmarks: ``python -m bench [NAME ...] [--output FILE]``.

Without names, every benchmark runs, in the order listed by ``--help``, on
one private PostgreSQL cluster started for the run on a free loopback port.
Each benchmark creates its own database, app servers and clients, and stops
them when it ends, fails or is interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from . import fanout, idle, ingest, latency, notify, profile, replay
from .harness import (
    BenchError,
    Workspace,
    raise_open_files_limit,
    stop_children,
    workspace,
)
from .machine import describe, other_work, snapshot
from .report import Report

BENCHMARKS: dict[str, Callable[[Workspace], Report]] = {
    "ingest": ingest.run,
    "latency": latency.run,
    "fanout": fanout.run,
    "idle": idle.run,
    "replay": replay.run,
    "notify": notify.run,
    "profile": profile.run,
}
OPEN_FILES = 32_768


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run cdc-stream's benchmarks on a private PostgreSQL cluster.",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run, of: {', '.join(BENCHMARKS)} (default: all)",
    )
    parser.add_argument("--output", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}: use {', '.join(BENCHMARKS)}")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_one(ws: Workspace, name: str, lines: list[str]) -> Report | None:
    """Run one benchmark; return its report, or None if it failed."""
    before = snapshot(ws)
    started = time.monotonic()
    try:
        report = BENCHMARKS[name](ws)
    except (BenchError, OSError, RuntimeError, ValueError, KeyError) as error:
        traceback.print_exc()
        lines.append(f"## {name}: FAILED: {error}")
        print(lines[-1], flush=True)
        stop_children()
        return None
    seconds = time.monotonic() - started
    other = other_work(before, snapshot(ws))
    note = (
        f"{name} took {seconds:.0f} s; processes outside the benchmark used "
        f"{other:.1f} CPU-seconds meanwhile ({100 * other / seconds:.0f} % of one core)"
    )
    print(note, flush=True)
    lines.extend(report.lines)
    lines.append(note)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    names = args.names or list(BENCHMARKS)
    lines: list[str] = []
    reports: list[Report] = []
    failed: list[str] = []
    raise_open_files_limit(OPEN_FILES)

    try:
        with workspace() as ws:
            for line in describe(ws):
                print(line, flush=True)
                lines.append(line)
            for name in names:
                print(flush=True)
                lines.append("")
                report = run_one(ws, name, lines)
                if report is None:
                    failed.append(name)
                else:
                    reports.append(report)
    finally:
        stop_children()

    summary = ["", "## Summary"]
    summary += [line for report in reports for line in report.headline]
    summary += [f"{name}: FAILED" for name in failed]
    for line in summary:
        print(line)
    if args.output is not None:
        args.output.write_text("\n".join(lines + summary) + "\n", encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
