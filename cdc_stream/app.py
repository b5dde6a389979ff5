"""The Quart application served by `hypercorn cdc_stream.app:app`."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from quart import Quart, Response, jsonify, request
from quart_cors import cors

from . import envelope, sse, web
from .config import Settings
from .errors import ConfigError, InvalidPositionError
from .hub import OPERATIONS, EventFilter, Hub, JournalTailer, Subscriber
from .journals import EventJournal, open_journal
from .positions import Position
from .replication import ReplicationReader
from .resume import ResumePoint, parse_resume_point

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


class BadRequest(ValueError):
    """A request parameter is invalid; the message names it."""


class Stream:
    """What the routes share: settings, journal, hub and replication reader."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.journal = open_journal(settings)
        self.hub = Hub(self.journal.last_position() or Position(0, -1))
        self.tailer = JournalTailer(
            self.journal, self.hub, settings.journal_poll_seconds
        )
        self.reader: ReplicationReader | None = None
        self.tailer_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def wake_tailer() -> None:
            loop.call_soon_threadsafe(self.tailer.wake)

        self.tailer_task = asyncio.create_task(self.tailer.run())
        self.reader = ReplicationReader(self.settings, self.journal, wake_tailer)
        self.reader.start()

    async def stop(self) -> None:
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
) -> tuple[Position, bytes]:
    """Return where replay starts, and a history-lost notice if history is gone."""
    horizon = await asyncio.to_thread(journal.horizon)
    after = resume.after
    lost = False

    if after is not None:
        lost = horizon is not None and after < horizon[0]
    else:
        assert resume.moment is not None
        lost = horizon is not None and resume.moment < horizon[1]
        if not lost:
            found = await asyncio.to_thread(journal.position_before_time, resume.moment)
            after = found if found is not None else live_start

    if not lost:
        assert after is not None
        return after, b""

    assert horizon is not None
    oldest = await asyncio.to_thread(journal.first_position)
    notice = envelope.notice_frame(
        "history_lost",
        f"history from {resume.text} is no longer held; events continue from the "
        "oldest one held, so reload your state",
        datetime.now(UTC),
        requested=resume.text,
        oldest_id=oldest.event_id if oldest else None,
    )
    return horizon[0], notice


async def read_range(
    journal: EventJournal,
    event_filter: EventFilter,
    after: Position,
    upto: Position | None,
    limit: int | None = None,
    transform: Callable[[envelope.Event], bytes | None] | None = None,
) -> AsyncIterator[list[bytes]]:
    """Yield pages of matching frames from the journal, in order.

    `transform` is the subscriber's view, as in `Subscriber.offer`.
    """
    sent = 0
    while limit is None or sent < limit:
        events = await asyncio.to_thread(journal.read_after, after, REPLAY_PAGE, upto)
        if not events:
            return
        after = events[-1].position
        matched = [event for event in events if event_filter.matches(event)]
        if transform is None:
            frames = [event.frame for event in matched]
        else:
            frames = [f for f in map(transform, matched) if f is not None]
        if limit is not None:
            frames = frames[: limit - sent]
        sent += len(frames)
        if frames:
            yield frames
        if len(events) < REPLAY_PAGE:
            return


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
            after, notice = await resolve_start(
                stream.journal, resume, subscriber.start
            )
            if notice:
                yield notice
            # Replay up to where the live queue starts; if the queue overflowed
            # meanwhile, replay again up to the hub's newest event.
            while True:
                async for frames in read_range(
                    stream.journal,
                    subscriber.filter,
                    after,
                    subscriber.start,
                    transform=subscriber.transform,
                ):
                    subscriber.last_event_id = _frame_id(frames[-1])
                    yield b"".join(frames)
                if not subscriber.overflowed:
                    break
                after = subscriber.start
                subscriber.rebase(hub.last_position)

        while True:
            ready = await subscriber.wait(settings.heartbeat_seconds)
            if not ready:
                yield envelope.heartbeat_frame(datetime.now(UTC))
                continue
            if subscriber.overflowed:
                yield envelope.notice_frame(
                    "slow_client",
                    "the client fell too far behind and was disconnected; "
                    "reconnect with Last-Event-ID to continue from the journal",
                    datetime.now(UTC),
                    last_event_id=subscriber.last_event_id,
                )
                logger.warning("client %d ended: too far behind", subscriber.id)
                hub.slow_clients_ended += 1
                return
            chunk = subscriber.drain()
            if chunk:
                yield chunk
    finally:
        hub.unsubscribe(subscriber)


def _frame_id(frame: bytes) -> str | None:
    if not frame.startswith(b"id: "):
        return None
    return frame[4 : frame.index(b"\n")].decode()


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
    after, notice = await resolve_start(
        stream.journal, resume, stream.hub.last_position
    )
    if notice:
        yield notice if output == "sse" else sse.frame_data(notice) + b"\n"
    async for frames in read_range(
        stream.journal, event_filter, after, upto, limit, view
    ):
        if output == "sse":
            yield b"".join(frames)
        else:
            yield b"".join(sse.frame_data(frame) + b"\n" for frame in frames)


app = create_app()
