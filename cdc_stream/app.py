"""The Quart application served by `hypercorn cdc_stream.app:app`."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import sys

from quart import Quart, Response, jsonify, request
from quart_cors import cors

from . import web
from .config import Settings
from .errors import ConfigError
from .hub import (
    Hub,
    JournalTailer,
)
from .journal import Appended
from .journals import open_journal
from .params import BadRequest, parse_filter, parse_limit, parse_resume, parse_upto
from .positions import Position
from .replication import ReplicationReader
from .streams import replay_range, stream_events

logger = logging.getLogger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # Keeps nginx and similar proxies from buffering the stream.
    "X-Accel-Buffering": "no",
}
TAILER_BATCH = 1000
TAILER_RESTART_SECONDS = 1.0


class Stream:
    """State the routes share: settings, journal, hub and replication reader."""

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

        def wake_tailer(appended: Appended | None) -> None:
            loop.call_soon_threadsafe(self.tailer.wake, appended)

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
            # Serving without settings would only return errors, so stop here
            # with the message that names the key to fix.
            print(f"cdc-stream: configuration error: {error}", file=sys.stderr)
            raise SystemExit(2) from None

    try:
        stream = Stream(settings)
    except (OSError, sqlite3.Error) as error:
        if settings.journal_backend == "redis":
            hint = "check CDC_REDIS_URL and that Redis is running"
        else:
            hint = (
                f"{settings.journal_path!r} must be a writable file path; "
                "set CDC_JOURNAL_PATH ([journal] path)"
            )
        print(f"cdc-stream: cannot open the journal: {error}; {hint}", file=sys.stderr)
        raise SystemExit(2) from None
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


app = create_app()
