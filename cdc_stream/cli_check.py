"""The `check` command of `cdc-stream`."""

from __future__ import annotations

import argparse
import os
import sys

from .config import Settings
from .preflight import FAIL, PASS, CheckResult, run_checks

_MARKS = {PASS: "ok", "warn": "WARN", FAIL: "FAIL"}


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add `check` to the command parser."""
    check = commands.add_parser(
        "check",
        help="run every pre-flight check and print what to change",
        description=(
            "Check the database named by DATABASE_URL (and CDC_CONFIG): "
            "wal_level, the wal2json plugin, free replication slots and WAL "
            "senders, the slot, the replica identity of each streamed table, "
            "and the role's privileges. Exits with 1 when a check fails."
        ),
    )
    check.set_defaults(run=run_check)


def run_check(args: argparse.Namespace) -> int:
    settings = Settings.from_env(os.environ)
    results = run_checks(settings)
    print_results(results, sys.stdout)
    return 1 if any(result.status == FAIL for result in results) else 0


def print_results(results: list[CheckResult], stream: object) -> None:
    """Print one row per check, and the fix under each that did not pass."""
    width = max(len(result.name) for result in results)
    for result in results:
        print(
            f"{_MARKS.get(result.status, result.status):<5} "
            f"{result.name:<{width}}  {result.detail}",
            file=stream,  # type: ignore[arg-type]
        )
        if result.status != PASS and result.fix:
            print(f"{'':<5} {'':<{width}}  fix: {result.fix}", file=stream)  # type: ignore[arg-type]
