"""The Quart application served by `hypercorn cdc_stream.app:app`."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from quart import Quart, Response, jsonify, request
from quart_cors import cors

from . import envelope, sse, web
from .config import Settings
from .errors import ConfigError, InvalidPositionError
from .hub import (
    OPERATIONS,
    EventFilter,
    Hub,
    JournalPage,
    JournalTailer,
    Subscriber,
    history_lost_frame,
    position_for_time,
    read_page,
)
from .journals import EventJournal, open_journal
from .positions import Position
from .replication import ReplicationReader
from .resume import ResumePoint, parse_resume_point, resume_id

logger = logging.getLogger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # Keeps nginx and similar proxies from buffering the stream.
    "X-Accel-Buffering": "no",
}
REPLAY_PAGE = 1000
REPLAY_DEFAULT_LIMIT = 1000
REPLAY_MAX_LIMIT = 100_000
TAILER_BATCH = 1000
TAILER_RESTART_SECONDS = 1.0


class BadRequest(ValueError):
    """A request parameter is invalid; the message names it."""


class Stream:
    """What the routes share: settings, journal, hub and replication reader."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.journal = open_journal(settings)
        self.hub = Hub(self.journal.last_position() or Position(0, -1))
        # A subscriber is ended when more than queue_size frames are pending,
        # so one published batch must leave room for a client that keeps up.
        batch_size = max(1, min(TAILER_BATCH, settings.queue_size // 2))
        self.tailer = JournalTailer(
            self.journal, self.hub, settings.journal_poll_seconds, batch_size
        )
        self.reader: ReplicationReader | None = None
        self.tailer_task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def wake_tailer() -> None:
            loop.call_soon_threadsafe(self.tailer.wake)

        self._start_tailer()
        self.reader = ReplicationReader(self.settings, self.journal, wake_tailer)
        self.reader.start()

    def _start_tailer(self) -> None:
        if self._stopping:
            return
        self.tailer_task = asyncio.create_task(self.tailer.run())
        self.tailer_task.add_done_callback(self._tailer_ended)

    def _tailer_ended(self, task: asyncio.Task[None]) -> None:
        # Without the tailer no client of this process gets another event, so
        # an unexpected error restarts it instead of ending it silently.
        if task.cancelled():
            return
        error = task.exception()
        logger.error(
            "journal tailer failed, restarting it in %.0f s: %r",
            TAILER_RESTART_SECONDS,
            error,
            exc_info=error,
        )
        loop = asyncio.get_running_loop()
        loop.call_later(TAILER_RESTART_SECONDS, self._start_tailer)

    async def stop(self) -> None:
        self._stopping = True
        if self.tailer_task is not None:
            self.tailer_task.cancel()
        if self.reader is not None:
            await asyncio.to_thread(self.reader.stop)


def create_app(settings: Settings | None = None) -> Quart:
    """Create the application; settings are read from the environment if omitted."""
    app = Quart(__name__)
    if settings is None:
        try:
            settings = Settings.from_env()
        except ConfigError as error:
            # Serving without settings would only answer errors, so stop here
            # with the message that names the key to fix.
            print(f"cdc-stream: configuration error: {error}", file=sys.stderr)
            raise SystemExit(2) from None

    stream = Stream(settings)
    app.extensions["cdc_stream"] = stream
    access = web.install(app, stream)

    @app.before_serving
    async def start_replication() -> None:
        configure_logging()
        await stream.start()

    @app.after_serving
    async def stop_replication() -> None:
        await stream.stop()

    @app.errorhandler(BadRequest)
    async def bad_request(error: BadRequest) -> tuple[Response, int]:
        return jsonify({"error": "bad_request", "message": str(error)}), 400

    @app.get("/api/realtime")
    async def realtime() -> Response:
        event_filter = parse_filter(request.args.getlist)
        event_filter, view = await access.prepare(event_filter)
        resume = parse_resume(
            request.headers.get("Last-Event-ID"), request.args.get("from")
        )
        subscriber = stream.hub.subscribe(event_filter, settings.queue_size, view)
        body = stream_events(subscriber, stream, resume)
        response = Response(body, status=200, headers=SSE_HEADERS)
        # Quart cuts streamed responses after RESPONSE_TIMEOUT (60 s) by default.
        response.timeout = None
        return response

    @app.get("/api/replay")
    async def replay() -> Response:
        event_filter = parse_filter(request.args.getlist)
        event_filter, view = await access.prepare(event_filter)
        start = request.args.get("from")
        if not start:
            raise BadRequest("missing 'from': give an event id, an LSN or an ISO time")
        resume = parse_resume(None, start)
        upto = parse_upto(request.args.get("to"))
        limit = parse_limit(request.args.get("limit"))
        output = request.args.get("format", "sse")
        if output not in ("sse", "ndjson"):
            raise BadRequest(f"invalid format {output!r}: use 'sse' or 'ndjson'")

        body = replay_range(stream, resume, upto, limit, event_filter, output, view)
        content_type = (
            SSE_HEADERS["Content-Type"]
            if output == "sse"
            else "application/x-ndjson; charset=utf-8"
        )
        response = Response(body, status=200, content_type=content_type)
        response.timeout = None
        return response

    @app.get("/healthz")
    async def healthz() -> Response:
        reader = stream.reader
        replication = reader.status.as_dict() if reader else {"state": "starting"}
        role = "leader" if replication.get("connected") else "standby"
        if replication.get("state") not in ("streaming", "standby"):
            role = "none"
        status = "ok" if role != "none" else "degraded"
        return jsonify(
            {
                "status": status,
                "role": role,
                "replication": replication,
                "clients": len(stream.hub),
                "last_event_id": stream.hub.last_position.event_id
                if stream.hub.last_position.index >= 0
                else None,
            }
        )

    if settings.cors_origins:
        app = cors(
            app,
            allow_origin=list(settings.cors_origins),
            allow_credentials=settings.cors_allow_credentials,
            allow_headers=["Last-Event-ID", "Cache-Control", "Authorization"],
            allow_methods=["GET", "OPTIONS"],
            max_age=600,
        )
    return app


def configure_logging() -> None:
    """Send cdc_stream's INFO logs to stderr unless logging is configured."""
    package_logger = logging.getLogger("cdc_stream")
    if logging.getLogger().handlers or package_logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter(
            "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"
        )
    )
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)


def parse_filter(getlist: Callable[[str], list[str]]) -> EventFilter:
    """Build a subscriber's filter from `channels`, `tables` and `operations`."""
    channels = _split_values(getlist("channels"))
    tables = _split_values(getlist("tables"))
    operations = frozenset(v.upper() for v in _split_values(getlist("operations")))
    unknown = sorted(operations - OPERATIONS)
    if unknown:
        raise BadRequest(
            f"unknown operation {unknown[0]!r} in 'operations': use "
            f"{', '.join(sorted(OPERATIONS))}"
        )
    return EventFilter(channels, tables, operations)


def parse_resume(last_event_id: str | None, start: str | None) -> ResumePoint | None:
    """Choose the resume point; the browser's Last-Event-ID wins over `from`.

    A browser that reconnects keeps the URL, so `from` would replay the same
    range again on every reconnect if it took precedence.
    """
    text = last_event_id or start
    if not text:
        return None
    try:
        return parse_resume_point(text)
    except InvalidPositionError as error:
        source = "Last-Event-ID" if last_event_id else "'from'"
        raise BadRequest(f"{source}: {error}") from None


def parse_upto(text: str | None) -> Position | None:
    if not text:
        return None
    try:
        point = parse_resume_point(text)
    except InvalidPositionError as error:
        raise BadRequest(f"'to': {error}") from None
    if point.after is None:
        raise BadRequest(f"'to': {text!r} must be an event id or an LSN, not a time")
    if point.after.index < 0:
        # An LSN includes every event of the transaction committed there.
        return Position(point.after.commit_lsn, 2**31)
    return point.after


def parse_limit(text: str | None) -> int:
    if not text:
        return REPLAY_DEFAULT_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= REPLAY_MAX_LIMIT:
        raise BadRequest(
            f"invalid limit {text!r}: expected a whole number from 1 to "
            f"{REPLAY_MAX_LIMIT}"
        )
    return int(text)


def _split_values(values: list[str]) -> frozenset[str]:
    items: set[str] = set()
    for value in values:
        items.update(item.strip() for item in value.split(",") if item.strip())
    return frozenset(items)


async def resolve_start(
    journal: EventJournal, resume: ResumePoint, live_start: Position
) -> Position:
    """Return the position after which a resumed stream continues.

    A time before the retained history gives a position before the horizon,
    so the replay reports the loss.
    """
    if resume.after is not None:
        return resume.after
    assert resume.moment is not None
    found = await asyncio.to_thread(position_for_time, journal, resume.moment)
    return found if found is not None else live_start


@dataclass(frozen=True)
class ReplayPage:
    """Frames of one journal page, after a history-lost notice if history is gone."""

    notice: bytes
    frames: list[bytes]
    # Position of the last frame, or None without frames.
    last: Position | None


async def read_range(
    journal: EventJournal,
    event_filter: EventFilter,
    after: Position,
    upto: Position | None,
    limit: int | None = None,
    transform: Callable[[envelope.Event], bytes | None] | None = None,
    requested: str | None = None,
) -> AsyncIterator[ReplayPage]:
    """Yield pages of matching frames from the journal, in order.

    Wherever retention pruned events after the position reached, a page
    starts with a history-lost notice naming `requested` (the first time)
    or that position. `transform` is the subscriber's view, as in
    `Subscriber.offer`.
    """
    sent = 0
    while limit is None or sent < limit:
        page = await asyncio.to_thread(read_page, journal, after, REPLAY_PAGE, upto)
        notice = b""
        if page.horizon is not None:
            notice = await _history_lost(journal, requested or resume_id(after), page)
        requested = None
        if page.events:
            after = page.events[-1].position

        frames, last = _select_frames(page.events, event_filter, transform)
        if limit is not None:
            frames = frames[: limit - sent]
            last = last[: len(frames)]
        sent += len(frames)
        if notice or frames:
            yield ReplayPage(notice, frames, last[-1] if last else None)
        if len(page.events) < REPLAY_PAGE:
            return


def _select_frames(
    events: list[envelope.Event],
    event_filter: EventFilter,
    transform: Callable[[envelope.Event], bytes | None] | None,
) -> tuple[list[bytes], list[Position]]:
    frames: list[bytes] = []
    positions: list[Position] = []
    for event in events:
        if not event_filter.matches(event):
            continue
        frame = event.frame if transform is None else transform(event)
        if frame is not None:
            frames.append(frame)
            positions.append(event.position)
    return frames, positions


async def _history_lost(
    journal: EventJournal, requested: str, page: JournalPage
) -> bytes:
    if page.events:
        oldest: Position | None = page.events[0].position
    else:
        oldest = await asyncio.to_thread(journal.first_position)
    return history_lost_frame(requested, oldest)


async def stream_events(
    subscriber: Subscriber, stream: Stream, resume: ResumePoint | None
) -> AsyncIterator[bytes]:
    """Write one client's stream: retry hint, connection event, replay, then live."""
    settings = stream.settings
    hub = stream.hub
    try:
        details = {"message": "connected", "slot": settings.slot_name}
        yield sse.retry(settings.retry_ms) + envelope.connection_frame(
            details, datetime.now(UTC)
        )

        if resume is not None:
            async for chunk in _replay_to_live(subscriber, stream, resume):
                yield chunk

        while True:
            ready = await subscriber.wait(settings.heartbeat_seconds)
            if not ready:
                yield envelope.heartbeat_frame(datetime.now(UTC))
                continue
            if subscriber.overflowed:
                yield _slow_client_frame(subscriber)
                logger.warning("client %d ended: too far behind", subscriber.id)
                hub.slow_clients_ended += 1
                return
            chunk = subscriber.drain()
            if chunk:
                yield chunk
    finally:
        hub.unsubscribe(subscriber)


async def _replay_to_live(
    subscriber: Subscriber, stream: Stream, resume: ResumePoint
) -> AsyncIterator[bytes]:
    """Replay the journal from the resume point up to where the live queue starts.

    If the live queue overflowed meanwhile, replay again up to the hub's
    newest event.
    """
    resume_at = await resolve_start(stream.journal, resume, subscriber.start)
    subscriber.delivered = resume_at
    # Another process may have sent this client events that this process's
    # tailer has not published yet.
    subscriber.skip_through(resume_at)

    after = resume_at
    requested: str | None = resume.text
    while True:
        pages = read_range(
            stream.journal,
            subscriber.filter,
            after,
            subscriber.start,
            transform=subscriber.transform,
            requested=requested,
        )
        async for page in pages:
            if page.last is not None:
                subscriber.delivered = page.last
            yield page.notice + b"".join(page.frames)
        if not subscriber.overflowed:
            return
        after = max(resume_at, subscriber.start)
        requested = None
        subscriber.rebase(stream.hub.last_position)


def _slow_client_frame(subscriber: Subscriber) -> bytes:
    # The frame carries the resume point as its SSE id, so that a browser
    # resumes there even when it received no event with an id.
    assert subscriber.resume_after is not None
    resume_text = resume_id(subscriber.resume_after)
    frame = envelope.notice_frame(
        "slow_client",
        "the client fell too far behind and was disconnected; "
        "reconnect with Last-Event-ID to continue from the journal",
        datetime.now(UTC),
        last_event_id=resume_text,
    )
    return b"id: " + resume_text.encode() + b"\n" + frame


async def replay_range(
    stream: Stream,
    resume: ResumePoint,
    upto: Position | None,
    limit: int,
    event_filter: EventFilter,
    output: str,
    view: Callable[[envelope.Event], bytes | None] | None = None,
) -> AsyncIterator[bytes]:
    """Write a bounded range of journal events as SSE or NDJSON."""
    after = await resolve_start(stream.journal, resume, stream.hub.last_position)
    pages = read_range(
        stream.journal, event_filter, after, upto, limit, view, requested=resume.text
    )
    async for page in pages:
        if output == "sse":
            yield page.notice + b"".join(page.frames)
            continue
        lines = [sse.frame_data(frame) + b"\n" for frame in page.frames]
        if page.notice:
            lines.insert(0, sse.frame_data(page.notice) + b"\n")
        yield b"".join(lines)


app = create_app()
