"""The `replay` and `status` commands of `cdc-stream`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

import httpx
import orjson

from . import diagnostics, sse
from .config import Settings
from .envelope import Event
from .errors import CdcStreamError, ConfigError, InvalidPositionError
from .hub import EventFilter
from .journal import Journal
from .journals import EventJournal, open_journal
from .positions import Position, format_lsn
from .resume import parse_resume_point

REPLAY_PAGE = 1000
DEFAULT_PEEK_LIMIT = 100


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add `replay` and `status` to the command parser."""
    replay = commands.add_parser(
        "replay",
        help="print events from the journal, or peek at the slot's undelivered changes",
        description=(
            "Print the events the journal holds after --from, up to --to. With "
            "--peek, print what the slot holds but has not delivered yet, "
            "without consuming it. Reads CDC_CONFIG, CDC_JOURNAL_PATH, "
            "CDC_SLOT_NAME and, for --peek, DATABASE_URL."
        ),
    )
    replay.add_argument(
        "--from",
        dest="start",
        help="event id (0/16B3748:2, exclusive), LSN (0/16B3748) or ISO time",
    )
    replay.add_argument("--to", help="last event id or LSN to print (inclusive)")
    replay.add_argument(
        "--limit", type=_positive, help="print at most this many events"
    )
    replay.add_argument(
        "--peek",
        action="store_true",
        help="show undelivered changes from a temporary copy of the slot",
    )
    replay.add_argument(
        "--format",
        choices=("text", "ndjson"),
        default="text",
        help="text: one summary line per event; ndjson: the events' JSON",
    )
    replay.add_argument("--journal", type=Path, help="journal file to read")
    replay.add_argument("--channels", default="", help="comma-separated channels")
    replay.add_argument("--tables", default="", help="comma-separated tables")
    replay.add_argument(
        "--operations", default="", help="comma-separated INSERT, UPDATE, ..."
    )
    replay.set_defaults(run=run_replay)

    status = commands.add_parser(
        "status",
        help="show the slot's positions, retained WAL and the journal's range",
        description=(
            "Show the replication slot's confirmed and restart LSN, the WAL it "
            "retains, its lag, the journal's range and size and, with --url, "
            "the app's connected clients."
        ),
    )
    status.add_argument("--journal", type=Path, help="journal file to read")
    status.add_argument(
        "--url", help="base URL of a running app, e.g. http://127.0.0.1:8000"
    )
    status.set_defaults(run=run_status)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected 1 or more")
    return int(text)


def load_settings(needs_database: bool) -> Settings:
    """Read settings; journal-only commands run without DATABASE_URL."""
    env = dict(os.environ)
    if not needs_database and not env.get("DATABASE_URL"):
        # The journal's path does not depend on the database; a placeholder
        # satisfies validation and is never connected to.
        env["DATABASE_URL"] = "dbname=unused"
    return Settings.from_env(env)


def _open_journal(args: argparse.Namespace, settings: Settings) -> EventJournal:
    """Open --journal, else the configured journal (SQLite or Redis)."""
    if args.journal is None and settings.journal_backend == "redis":
        return open_journal(settings)
    path = args.journal if args.journal else Path(settings.journal_path)
    if not path.exists():
        raise ConfigError(
            f"journal {str(path)!r} not found: set --journal or CDC_JOURNAL_PATH"
        )
    return Journal(path)


def _filter(args: argparse.Namespace) -> EventFilter:
    def split(text: str) -> frozenset[str]:
        return frozenset(item.strip() for item in text.split(",") if item.strip())

    operations = frozenset(op.upper() for op in split(args.operations))
    return EventFilter(split(args.channels), split(args.tables), operations)


def run_replay(args: argparse.Namespace) -> int:
    settings = load_settings(needs_database=args.peek)
    event_filter = _filter(args)

    if args.peek:
        events: Iterable[Event] = diagnostics.peek(
            settings, args.limit or DEFAULT_PEEK_LIMIT
        )
        events = (event for event in events if event_filter.matches(event))
        print_events(events, args.format, sys.stdout)
        return 0

    if not args.start:
        raise ConfigError("replay needs --from (or --peek)")
    journal = _open_journal(args, settings)
    try:
        events = read_journal(journal, args.start, args.to, args.limit, event_filter)
        count = print_events(events, args.format, sys.stdout)
    finally:
        journal.close()
    print(f"{count} events", file=sys.stderr)
    return 0


def read_journal(
    journal: EventJournal,
    start: str,
    end: str | None,
    limit: int | None,
    event_filter: EventFilter,
) -> Iterable[Event]:
    """Yield journal events after `start`, up to `end`, at most `limit`."""
    point = parse_resume_point(start)
    after = point.after
    if after is None:
        assert point.moment is not None
        after = journal.position_before_time(point.moment)
        if after is None:
            return
    horizon = journal.horizon()
    if horizon is not None and after < horizon[0]:
        oldest = journal.first_position()
        print(
            f"warning: history before {format_lsn(horizon[0].commit_lsn)} is no "
            f"longer held; the oldest event held is "
            f"{oldest.event_id if oldest else 'none'}",
            file=sys.stderr,
        )

    upto = _parse_end(end)
    sent = 0
    total = journal.stats().events
    while limit is None or sent < limit:
        page = journal.read_after(after, REPLAY_PAGE, upto)
        if not page:
            return
        after = page[-1].position
        for event in page:
            if event_filter.matches(event):
                yield event
                sent += 1
                if limit is not None and sent >= limit:
                    return
        if total > 10 * REPLAY_PAGE and sys.stderr.isatty():
            print(f"\r{sent} events", end="", file=sys.stderr, flush=True)


def _parse_end(text: str | None) -> Position | None:
    if text is None:
        return None
    point = parse_resume_point(text)
    if point.after is None:
        raise InvalidPositionError(f"invalid --to {text!r}: use an event id or LSN")
    if point.after.index < 0:
        return Position(point.after.commit_lsn, 2**31)
    return point.after


def print_events(events: Iterable[Event], output: str, stream: TextIO) -> int:
    """Print events as summary lines or NDJSON; return how many were printed."""
    count = 0
    for event in events:
        data = sse.frame_data(event.frame)
        if output == "ndjson":
            stream.write(data.decode() + "\n")
        else:
            # Numbers are parsed as fragments so that they print exactly.
            document = json.loads(
                data, parse_float=orjson.Fragment, parse_int=orjson.Fragment
            )
            row = document.get("data")
            stream.write(
                f"{event.position.event_id:<18} {event.operation:<8} "
                f"{event.schema}.{event.table:<24} "
                f"{orjson.dumps(row).decode() if row is not None else ''}\n"
            )
        count += 1
    return count


def run_status(args: argparse.Namespace) -> int:
    settings = load_settings(needs_database=True)
    slot = diagnostics.slot_status(settings.database_url, settings.slot_name)
    try:
        journal: EventJournal | None = _open_journal(args, settings)
    except ConfigError:
        journal = None
    stats = diagnostics.journal_stats(journal) if journal is not None else None

    lines = [f"slot             {settings.slot_name}"]
    if slot is None:
        lines.append("  state          missing (created when the app starts)")
    else:
        holder = f"held by pid {slot.active_pid}" if slot.active_pid else "idle"
        lines += [
            f"  state          {holder}, wal_status {slot.wal_status}",
            f"  confirmed LSN  {slot.confirmed_flush_lsn}",
            f"  restart LSN    {slot.restart_lsn}",
            f"  server LSN     {slot.current_wal_lsn}",
            f"  WAL retained   {_bytes(slot.retained_wal_bytes)}",
            f"  lag            {_bytes(slot.lag_bytes)}",
        ]

    location = journal.path if journal is not None else settings.journal_path
    lines.append(f"journal          {location}")
    if stats is None:
        lines.append("  state          missing")
    else:
        lines += [
            f"  events         {stats.events}",
            f"  oldest         {stats.oldest.event_id if stats.oldest else '-'}",
            f"  newest         {stats.newest.event_id if stats.newest else '-'}",
            f"  size           {_bytes(stats.size_bytes)}",
        ]

    if args.url:
        lines += _app_lines(args.url)
    print("\n".join(lines))
    return 1 if slot is None else 0


def _app_lines(url: str) -> list[str]:
    try:
        health = httpx.get(url.rstrip("/") + "/healthz", timeout=5).json()
    except (httpx.HTTPError, ValueError) as error:
        raise CdcStreamError(f"cannot read {url}/healthz: {error}") from None
    return [
        f"app              {url}",
        f"  role           {health.get('role')}",
        f"  clients        {health.get('clients')}",
        f"  last event     {health.get('last_event_id')}",
    ]


def _bytes(count: int | None) -> str:
    if count is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024  # type: ignore[assignment]
    return f"{count} B"
