"""The `tail` command: print a running app's stream, reconnecting as needed.

It reads `/api/realtime` like a browser's EventSource: after a dropped
connection it reconnects with capped exponential backoff and sends
`Last-Event-ID`, so the server resumes after the last event printed. Output
is one readable line per event, or the events' JSON as NDJSON for piping.
"""

from __future__ import annotations

import argparse
import codecs
import logging
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import httpx

from .errors import CdcStreamError
from .transform import dumps_exact, parse_exact

logger = logging.getLogger(__name__)

STREAM_PATH = "/api/realtime"
MIN_DELAY_SECONDS = 0.5
# Heartbeats come every 30 s by default, so a longer silence means the
# connection is dead even if TCP has not noticed.
READ_TIMEOUT_SECONDS = 90.0
SKIPPED_TYPES = frozenset({"heartbeat", "connection"})


class TailError(CdcStreamError):
    """The server rejected the request; retrying would not help."""


@dataclass
class SSEEvent:
    """One server-sent event: its data and, for change events, its id."""

    data: str
    id: str | None = None
    retry: int | None = None


class SSEParser:
    """Incremental parser of an event stream into `SSEEvent` objects."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> Iterator[SSEEvent]:
        self._buffer += self._decoder.decode(chunk)
        *lines, self._buffer = self._buffer.replace("\r\n", "\n").split("\n")
        for line in lines:
            event = self._line(line.rstrip("\r"))
            if event is not None:
                yield event

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        event = None
        if self._data:
            event = SSEEvent("\n".join(self._data), self._id or None, self._retry)
        self._data = []
        self._id = None
        self._retry = None
        return event


@dataclass
class TailOptions:
    """Options of one `tail` run: the request and the output."""

    url: str
    params: dict[str, Any]
    token: str | None
    output_format: str
    max_events: int | None
    reconnect_max_seconds: float
    start: str | None


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add `tail` to the command parser."""
    tail = commands.add_parser(
        "tail",
        help="print a running app's stream, reconnecting with Last-Event-ID",
        description=(
            "Read the live stream of a running app and print each event. After "
            "a dropped connection, reconnect and continue after the last event "
            "printed. The token is read from CDC_TOKEN or --token-file, never "
            "from the command line, which other users can see."
        ),
    )

    tail.add_argument("url", help="app URL, e.g. http://127.0.0.1:8000")
    tail.add_argument("--channels", help="comma-separated channels to read")
    tail.add_argument("--tables", help="comma-separated tables, e.g. public.orders")
    tail.add_argument("--operations", help="comma-separated INSERT, UPDATE, ...")
    tail.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="COLUMN=OP.VALUE",
        help="row filter, e.g. market_id=eq.BTC-USD; repeat to combine with AND",
    )
    tail.add_argument("--columns", help="comma-separated columns to receive")
    tail.add_argument(
        "--from",
        dest="start",
        help="start after this event id, or at this LSN or ISO time",
    )

    tail.add_argument(
        "--format",
        choices=("text", "ndjson"),
        default="text",
        help="text: one readable line per event; ndjson: each event's JSON",
    )
    tail.add_argument(
        "--max-events",
        type=_positive_int,
        help="exit after printing this many events",
    )
    tail.add_argument(
        "--token-file",
        type=Path,
        help="file that contains the access token (default: $CDC_TOKEN)",
    )
    tail.add_argument(
        "--reconnect-max-seconds",
        type=float,
        default=30.0,
        help="maximum delay between reconnection attempts (default: %(default)s)",
    )
    tail.set_defaults(run=run_tail)


def run_tail(args: argparse.Namespace) -> int:
    """Run `cdc-stream tail`; return the exit code."""
    # httpx logs every request at INFO, which would interleave with events.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    options = TailOptions(
        url=stream_url(args.url),
        params=_params(args),
        token=_read_token(args.token_file),
        output_format=args.format,
        max_events=args.max_events,
        reconnect_max_seconds=max(MIN_DELAY_SECONDS, args.reconnect_max_seconds),
        start=args.start,
    )
    try:
        tail(options, sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of a pipe, such as `head`, exited: stop quietly.
        _silence_stdout()
    return 0


def stream_url(url: str) -> str:
    """Return the stream URL of an app URL; a URL with a path is kept."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TailError(f"invalid URL {url!r}: expected e.g. http://127.0.0.1:8000")
    if parts.path in ("", "/"):
        parts = parts._replace(path=STREAM_PATH)
    return urlunsplit(parts)


def tail(options: TailOptions, out: TextIO, err: TextIO) -> None:
    """Print events until `max_events` or until interrupted."""
    printer = Printer(options.output_format, out)
    last_id: str | None = None
    delay = MIN_DELAY_SECONDS
    timeout = httpx.Timeout(READ_TIMEOUT_SECONDS, connect=10.0)

    with httpx.Client(timeout=timeout) as client:
        while True:
            try:
                for event in _read_stream(client, options, last_id, err):
                    if event.id:
                        last_id = event.id
                    if event.retry is not None:
                        delay = max(MIN_DELAY_SECONDS, event.retry / 1000)
                    if printer.print(event) and printer.printed == options.max_events:
                        return
                reason = "stream ended"
            except (httpx.TransportError, _RetryableStatus) as error:
                reason = str(error) or type(error).__name__

            wait = delay * random.uniform(0.5, 1.0)
            print(f"cdc-stream tail: {reason}; reconnecting in {wait:.1f} s", file=err)
            time.sleep(wait)
            delay = min(delay * 2, options.reconnect_max_seconds)


class _RetryableStatus(Exception):
    """The server responded with an error that may pass, such as 503."""


def _read_stream(
    client: httpx.Client, options: TailOptions, last_id: str | None, err: TextIO
) -> Iterator[SSEEvent]:
    headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
    if options.token:
        headers["Authorization"] = f"Bearer {options.token}"
    params = dict(options.params)
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    elif options.start:
        params["from"] = options.start

    with client.stream("GET", options.url, headers=headers, params=params) as response:
        if response.status_code != 200:
            _raise_for_status(response)
        print(f"cdc-stream tail: connected to {options.url}", file=err)
        parser = SSEParser()
        for chunk in response.iter_bytes():
            yield from parser.feed(chunk)


def _raise_for_status(response: httpx.Response) -> None:
    response.read()
    try:
        message = response.json().get("message", response.text)
    except ValueError:
        message = response.text.strip() or response.reason_phrase
    text = f"HTTP {response.status_code}: {message}"
    if response.status_code in (408, 429) or response.status_code >= 500:
        raise _RetryableStatus(text)
    raise TailError(text)


class Printer:
    """Writes events as readable lines or as NDJSON."""

    def __init__(self, output_format: str, out: TextIO) -> None:
        self._format = output_format
        self._out = out
        self.printed = 0

    def print(self, event: SSEEvent) -> bool:
        """Print one event; return False for events that are not printed."""
        try:
            document = parse_exact(event.data)
        except ValueError:
            logger.warning("skipped an event whose data is not JSON")
            return False
        kind = document.get("type") if isinstance(document, dict) else None
        if kind in SKIPPED_TYPES:
            return False

        line = event.data if self._format == "ndjson" else format_event(document)
        self._out.write(line + "\n")
        self._out.flush()
        self.printed += 1
        return True


def format_event(document: dict[str, Any]) -> str:
    """Format one event as a readable line; numbers keep their exact text."""
    kind = document.get("type")
    time_text = document.get("timestamp") or "-"
    if kind == "database_change":
        table = f"{document.get('schema')}.{document.get('table')}"
        row = document.get("data")
        row_text = "-" if row is None else dumps_exact(row).decode()
        return (
            f"{time_text}  {document.get('channel')}  {document.get('operation'):<8} "
            f"{table}  {row_text}"
        )
    details = {k: v for k, v in document.items() if k not in ("type", "timestamp")}
    return f"{time_text}  -- {kind}: {dumps_exact(details).decode()}"


def _params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name in ("channels", "tables", "operations", "columns"):
        value = getattr(args, name)
        if value:
            params[name] = value
    if args.filter:
        params["filter"] = list(args.filter)
    return params


def _read_token(path: Path | None) -> str | None:
    if path is None:
        return os.environ.get("CDC_TOKEN") or None
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError as error:
        raise TailError(
            f"cannot read --token-file {str(path)!r}: {error.strerror}"
        ) from None


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected 1 or more")
    return int(text)


def _silence_stdout() -> None:
    # Python flushes stdout at exit; pointing it at /dev/null avoids a second
    # BrokenPipeError there.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
