"""Profile of the ingest path: py-spy samples the app worker during an ingest run.

The run is the ingest benchmark's app run (200,000 rows in 1,000-row
transactions, one SSE client, journal on). py-spy attaches to Hypercorn's
worker just before the app takes its slot and samples it 100 times a second
until the client has every event.

It runs twice:

* wall clock: every sample of a thread that is not idle. This shows where the
  replication thread spends its time, including SQLite and libpq calls that
  run without the GIL. A thread waiting for the GIL also counts as busy.
* GIL: only samples of the thread holding the GIL (``py-spy --gil``). The
  app's Python code runs on one core at a time, so this is where its CPU
  goes, whichever thread runs it.

Then a third run samples the GIL holder during a short fan-out (1,000
clients at 200 changes/s), where the event loop does most of the work.

Each lists the functions where samples landed (self) and the functions on
the stack (inclusive), as shares of the samples shown.

py-spy is not a dependency of the app: install it with
``.venv/bin/pip install py-spy``.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import fanout
from .harness import (
    BenchError,
    Workspace,
    python_module,
    read_json_line,
    spawn,
    stop_process,
    wait_slot_taken,
    workspace,
)
from .ingest import BATCH, ROWS, RUN_TIMEOUT, prepare, start_gated_app
from .live import LiveResult, prepare_database, run_paced, start_app
from .report import Report

RATE = 100
TOP = 15
FANOUT_SECONDS = 8.0
REPLICATION_THREAD = "cdc-replication"


@dataclass
class Profile:
    """Samples by thread and by function."""

    samples: int = 0
    threads: Counter[str] = field(default_factory=Counter)
    own: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)


def find_py_spy() -> str | None:
    beside_python = Path(sys.executable).with_name("py-spy")
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("py-spy")


def parse_raw(path: Path, thread_name: str | None = None) -> Profile:
    """Aggregate py-spy's raw (collapsed stack) output by thread and function.

    Each line is ``thread (id): name;frame;frame;... count``, outermost frame
    first, each frame ``function (file:line)``. With `thread_name`, only that
    thread's samples count.
    """
    profile = Profile()
    for line in path.read_text(encoding="utf-8").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        thread, *frames = stack.split(";")
        name = _thread_name(thread)
        if thread_name is not None and name != thread_name:
            continue
        profile.samples += count
        profile.threads[name] += count
        functions = [_function(frame) for frame in frames]
        if functions:
            profile.own[functions[-1]] += count
        for function in set(functions):
            profile.inclusive[function] += count
    return profile


def _thread_name(label: str) -> str:
    # "thread (11850): cdc-replication" -> "cdc-replication"
    return label.partition(": ")[2] or label


def _function(frame: str) -> str:
    # "append (cdc_stream/journal.py:123)" -> "append (cdc_stream/journal.py)"
    name, _, location = frame.partition(" (")
    return f"{name} ({location.rsplit(':', 1)[0].rstrip(')')})"


class Sampler:
    """py-spy recording one process's raw stacks until stopped."""

    def __init__(self, pid: int, output: Path, log: Path, gil: bool) -> None:
        py_spy = find_py_spy()
        if py_spy is None:
            raise BenchError(
                "py-spy not found: install it with .venv/bin/pip install py-spy"
            )
        command = [
            py_spy,
            "record",
            f"--pid={pid}",
            f"--rate={RATE}",
            "--format=raw",
            "--threads",
            *(["--gil"] if gil else []),
            f"--duration={int(RUN_TIMEOUT)}",
            f"--output={output}",
        ]
        with log.open("ab") as log_file:
            self.process = spawn(command, stdout=log_file, stderr=log_file)
        self.started = time.monotonic()
        self.seconds = 0.0
        # py-spy needs a moment to attach before the measured work starts.
        time.sleep(1.0)

    def stop(self) -> None:
        """Stop sampling; py-spy writes its output on SIGINT."""
        self.seconds = time.monotonic() - self.started
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        stop_process(self.process)


def record_ingest(ws: Workspace, output: Path, rows: int, gil: bool) -> float:
    """Run the app's ingest under py-spy; return the seconds sampled."""
    workdir = ws.scratch("profile")
    with ws.database("bench_profile") as dsn:
        loaded = prepare(dsn, "bench_profile", ["profile"], rows, BATCH)
        app, placeholder = start_gated_app(workdir, loaded, "profile")
        client = sampler = None
        try:
            client = spawn(
                python_module(
                    "bench.sse_clients",
                    f"--port={app.port}",
                    "--clients=1",
                    f"--events={rows}",
                    f"--seconds={RUN_TIMEOUT}",
                )
            )
            read_json_line(client, 30)
            sampler = Sampler(app.worker_pid(), output, workdir / "py-spy.log", gil)
            placeholder.release()
            taken_at, _ = wait_slot_taken(dsn, "profile", placeholder.pid, 30)
            result = read_json_line(client, RUN_TIMEOUT + 10)
        finally:
            if sampler is not None:
                sampler.stop()
            if client is not None:
                stop_process(client)
            app.stop()
    if result["changes_total"] != rows:
        raise BenchError(f"client received {result['changes_total']} of {rows} events")
    return result["last_change_at"] - taken_at


def record_fanout(ws: Workspace, output: Path) -> tuple[LiveResult, float]:
    """Run a short fan-out under py-spy --gil; return it and the seconds sampled."""
    workdir = ws.scratch("profile-fanout")
    with ws.database("bench_profile_fanout") as dsn:
        prepare_database(dsn)
        with start_app(workdir, dsn, "profile_fanout") as app:
            sampler = Sampler(app.worker_pid(), output, workdir / "py-spy.log", True)
            try:
                result = run_paced(
                    app,
                    dsn,
                    rate=fanout.RATE,
                    seconds=FANOUT_SECONDS,
                    clients=fanout.CLIENTS,
                    processes=fanout.PROCESSES,
                    warmup=1.0,
                )
            finally:
                sampler.stop()
    return result, sampler.seconds


def run(ws: Workspace, rows: int = ROWS) -> Report:
    report = Report("profile")
    report.add(f"## Profile of the app during ingest of {rows:,} rows (py-spy)")
    directory = ws.scratch("profile-output")

    wall_path = directory / "wall.raw"
    seconds = wall_seconds = record_ingest(ws, wall_path, rows, gil=False)
    wall = parse_raw(wall_path)
    report.add("")
    report.add(
        f"### Wall clock, {RATE} samples/s: {seconds:.1f} s "
        f"({rows / seconds:,.0f} rows/s under py-spy)"
    )
    report.add("busy share of the run, by thread:")
    for thread, count in wall.threads.most_common():
        report.add(f"  {100 * count / (seconds * RATE):5.1f} %  {thread}")
    replication = parse_raw(wall_path, REPLICATION_THREAD)
    report.add(f"{REPLICATION_THREAD} thread:")
    add_functions(report, replication)

    gil_path = directory / "gil.raw"
    seconds = record_ingest(ws, gil_path, rows, gil=True)
    gil = parse_raw(gil_path)
    held = gil.samples / (seconds * RATE)
    report.add("")
    report.add(
        f"### GIL holder, {RATE} samples/s: {seconds:.1f} s "
        f"({rows / seconds:,.0f} rows/s under py-spy); the GIL was held in "
        f"{100 * held:.0f} % of the samples"
    )
    report.add("GIL samples by thread:")
    for thread, count in gil.threads.most_common():
        report.add(f"  {100 * count / max(gil.samples, 1):5.1f} %  {thread}")
    add_functions(report, gil)

    fanout_path = directory / "fanout.raw"
    result, sampled = record_fanout(ws, fanout_path)
    fanout_profile = parse_raw(fanout_path)
    fanout_held = fanout_profile.samples / (sampled * RATE)
    report.add("")
    report.add(
        f"### Fan-out, GIL holder: {fanout.CLIENTS:,} clients at "
        f"{fanout.RATE} changes/s for {FANOUT_SECONDS:.0f} s under py-spy; "
        f"p50 {result.p50_ms:.0f} ms, p99 {result.p99_ms:.0f} ms; the GIL was "
        f"held in {100 * fanout_held:.0f} % of the {sampled:.0f} s sampled "
        "(connecting, load and drain)"
    )
    report.add("GIL samples by thread:")
    for thread, count in fanout_profile.threads.most_common():
        report.add(f"  {100 * count / max(fanout_profile.samples, 1):5.1f} %  {thread}")
    add_functions(report, fanout_profile)

    report.key(
        f"profile: replication thread busy "
        f"{100 * replication.samples / (wall_seconds * RATE):.0f} % of the run; "
        f"top self (wall): {_top(replication)}; top self (GIL): {_top(gil)}; "
        f"fan-out top self (GIL): {_top(fanout_profile)}"
    )
    return report


def add_functions(report: Report, profile: Profile) -> None:
    total = max(profile.samples, 1)
    report.add("self:")
    for function, count in profile.own.most_common(TOP):
        report.add(f"  {100 * count / total:5.1f} %  {function}")
    report.add("inclusive:")
    for function, count in profile.inclusive.most_common(TOP + 15):
        report.add(f"  {100 * count / total:5.1f} %  {function}")


def _top(profile: Profile) -> str:
    total = max(profile.samples, 1)
    return ", ".join(
        f"{function.split(' (')[0]} {100 * count / total:.0f} %"
        for function, count in profile.own.most_common(4)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Profile the app during ingest.")
    parser.add_argument("--rows", type=int, default=ROWS)
    args = parser.parse_args(argv)
    with workspace() as ws:
        run(ws, args.rows)


if __name__ == "__main__":
    main()
