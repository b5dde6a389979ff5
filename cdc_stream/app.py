"""The Quart application served by `hypercorn cdc_stream.app:app`."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from quart import Quart, Response, jsonify, request
from quart_cors import cors

from . import envelope, sse
from .config import Settings
from .errors import ConfigError
from .hub import OPERATIONS, EventFilter, Handoff, Hub, Subscriber
from .replication import ReplicationReader

logger = logging.getLogger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # Keeps nginx and similar proxies from buffering the stream.
    "X-Accel-Buffering": "no",
}


class BadRequest(ValueError):
    """A request parameter is invalid; the message names it."""


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

    hub = Hub()
    app.config["CDC_SETTINGS"] = settings
    app.extensions["cdc_hub"] = hub

    @app.before_serving
    async def start_replication() -> None:
        configure_logging()
        handoff = Handoff(hub, asyncio.get_running_loop())
        reader = ReplicationReader(settings, handoff)
        app.extensions["cdc_reader"] = reader
        reader.start()

    @app.after_serving
    async def stop_replication() -> None:
        reader: ReplicationReader = app.extensions["cdc_reader"]
        await asyncio.to_thread(reader.stop)

    @app.errorhandler(BadRequest)
    async def bad_request(error: BadRequest) -> tuple[Response, int]:
        return jsonify({"error": "bad_request", "message": str(error)}), 400

    @app.get("/api/realtime")
    async def realtime() -> Response:
        event_filter = parse_filter(request.args.getlist)
        subscriber = hub.subscribe(event_filter, settings.queue_size)
        body = stream_events(subscriber, hub, settings)
        response = Response(body, status=200, headers=SSE_HEADERS)
        # Quart cuts streamed responses after RESPONSE_TIMEOUT (60 s) by default.
        response.timeout = None
        return response

    @app.get("/healthz")
    async def healthz() -> Response:
        reader: ReplicationReader | None = app.extensions.get("cdc_reader")
        replication = reader.status.as_dict() if reader else {"state": "starting"}
        status = "ok" if replication.get("connected") else "degraded"
        return jsonify(
            {"status": status, "replication": replication, "clients": len(hub)}
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


def parse_filter(getlist: callable) -> EventFilter:  # type: ignore[valid-type]
    """Build a subscriber's filter from `channels`, `tables` and `operations`."""
    channels = _split_values(getlist("channels"))
    tables = _split_values(getlist("tables"))
    operations = frozenset(
        value.upper() for value in _split_values(getlist("operations"))
    )
    unknown = sorted(operations - OPERATIONS)
    if unknown:
        raise BadRequest(
            f"unknown operation {unknown[0]!r} in 'operations': use "
            f"{', '.join(sorted(OPERATIONS))}"
        )
    return EventFilter(channels, tables, operations)


def _split_values(values: list[str]) -> frozenset[str]:
    items: set[str] = set()
    for value in values:
        items.update(item.strip() for item in value.split(",") if item.strip())
    return frozenset(items)


async def stream_events(
    subscriber: Subscriber, hub: Hub, settings: Settings
) -> AsyncIterator[bytes]:
    """Write one client's stream: retry hint, connection event, then events."""
    try:
        details = {"message": "connected", "slot": settings.slot_name}
        yield sse.retry(settings.retry_ms) + envelope.connection_frame(
            details, datetime.now(UTC)
        )
        while True:
            ready = await subscriber.wait(settings.heartbeat_seconds)
            if not ready:
                yield envelope.heartbeat_frame(datetime.now(UTC))
                continue
            if subscriber.overflowed:
                yield envelope.notice_frame(
                    "slow_client",
                    "the client fell too far behind and was disconnected; "
                    "reconnect to continue",
                    datetime.now(UTC),
                    last_event_id=subscriber.last_event_id,
                )
                logger.warning("client %d ended: too far behind", subscriber.id)
                return
            chunk = subscriber.drain()
            if chunk:
                yield chunk
    finally:
        hub.unsubscribe(subscriber)


app = create_app()
