"""Access control, metrics, readiness and the dashboard, added to the app.

`install` wires them into the app that `create_app` builds: it wraps the
ASGI app in `CredentialScrubber`, registers the error handlers and routes,
and hands the hub its metrics callbacks. The stream routes call
`AccessControl.prepare` to authorize a request and build its view.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any

import psycopg2
from quart import Blueprint, Quart, Response, jsonify, request, send_from_directory

from . import logsetup
from .auth import (
    AccessError,
    Authenticator,
    CredentialScrubber,
    Principal,
    authorize_channels,
)
from .config import Settings
from .hub import EventFilter
from .metrics import CONTENT_TYPE, StreamMetrics
from .rowfilter import (
    FilterError,
    check_columns,
    compile_filters,
    parse_columns,
    parse_filters,
)
from .table_columns import Table, TableColumns
from .transform import ParsedEvents, View

logger = logging.getLogger(__name__)

DASHBOARD_DIR = Path(__file__).parent / "dashboard"
READY_TIMEOUT_SECONDS = 5.0
DASHBOARD_HEADERS = {
    # Everything the page loads comes from this server; nothing from outside.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class ServiceUnavailable(Exception):
    """A dependency the request needs, such as the database, is unreachable."""


class AccessControl:
    """Authorizes stream requests and builds each subscriber's view."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.authenticator = Authenticator(settings.auth)
        self.tables = TableColumns(settings)
        self.parsed = ParsedEvents()

    def principal(self) -> Principal:
        """Authenticate the current request; raise AccessError if not allowed."""
        return self.authenticator.authenticate(request.scope)

    async def prepare(
        self, event_filter: EventFilter
    ) -> tuple[EventFilter, View | None]:
        """Authorize the current stream request and build its view.

        Returns the filter narrowed to the channels the token may read, and
        the view, or None when the subscriber can share the encoded frames.
        """
        principal = self.principal()
        await self._check_names(event_filter)
        channels = authorize_channels(principal, event_filter.channels)
        event_filter = dataclasses.replace(event_filter, channels=channels)

        conditions = parse_filters(request.args.getlist("filter"))
        columns = parse_columns(request.args.getlist("columns"))
        hidden = self.hidden_columns(principal)
        rows = None
        if conditions or columns is not None:
            tables = await self._subscription_tables(event_filter, conditions, columns)
            _reject_hidden_filters(conditions, tables, hidden)
            rows = compile_filters(conditions, tables) if conditions else None
            if columns is not None:
                check_columns(columns, tables)

        if rows is None and not hidden and columns is None:
            return event_filter, None
        return event_filter, View(self.parsed, rows, hidden, columns)

    def hidden_columns(self, principal: Principal) -> dict[str, frozenset[str]]:
        """Return, by channel, the masked columns this principal may not see."""
        hidden: dict[str, frozenset[str]] = {}
        for mask in self.settings.auth.masks:
            if not principal.has_claim(mask.claim):
                hidden[mask.channel] = (
                    hidden.get(mask.channel, frozenset()) | mask.columns
                )
        return hidden

    async def streamed_tables(self, *, fresh: bool = False) -> list[Table]:
        """Return the streamed tables; raise ServiceUnavailable without a database."""
        try:
            return await self.tables.tables(fresh=fresh)
        except psycopg2.Error as error:
            logger.warning("cannot read the table catalog: %s", _pg_message(error))
            raise ServiceUnavailable(
                "cannot check columns: the database is unreachable, retry later"
            ) from None

    async def _check_names(self, event_filter: EventFilter) -> None:
        """Reject a `tables` or `channels` value that names nothing streamed.

        While the database is unreachable the names cannot be checked, and
        the request is served, so that clients keep their streams.
        """
        if not event_filter.tables and not event_filter.channels:
            return
        for fresh in (False, True):
            try:
                tables = await self.tables.tables(fresh=fresh)
            except psycopg2.Error:
                return
            unknown = _unknown_names(tables, event_filter, self.settings)
            if not unknown:
                return
        parameter, name = unknown
        raise FilterError(
            f"unknown {parameter[:-1]} {name!r} in '{parameter}': no streamed "
            "table has it; GET /api/channels lists them"
        )

    async def _subscription_tables(
        self, event_filter: EventFilter, conditions: list[Any], columns: Any
    ) -> list[Table]:
        wanted = {c.column for c in conditions} | set(columns or ())
        tables = _select(await self.streamed_tables(), event_filter)
        if not tables or any(name not in t.columns for t in tables for name in wanted):
            # A table or column created a moment ago is not cached yet.
            tables = _select(await self.streamed_tables(fresh=True), event_filter)
        return tables


def _unknown_names(
    tables: list[Table], event_filter: EventFilter, settings: Settings
) -> tuple[str, str] | None:
    table_names = {t.name for t in tables} | {t.qualified_name for t in tables}
    for name in sorted(event_filter.tables):
        if name not in table_names:
            return "tables", name
    channels = {t.channel for t in tables}
    for name in sorted(event_filter.channels):
        if name not in channels and not settings.streams_message(name):
            return "channels", name
    return None


def _select(tables: list[Table], event_filter: EventFilter) -> list[Table]:
    selected = []
    for table in tables:
        if event_filter.channels and table.channel not in event_filter.channels:
            continue
        if event_filter.tables and not (
            table.name in event_filter.tables
            or table.qualified_name in event_filter.tables
        ):
            continue
        selected.append(table)
    return selected


def _reject_hidden_filters(
    conditions: list[Any], tables: list[Table], hidden: dict[str, frozenset[str]]
) -> None:
    # A filter on a masked column would reveal its values by what matches.
    for condition in conditions:
        for table in tables:
            if condition.column in hidden.get(table.channel, frozenset()):
                raise AccessError(
                    403,
                    "forbidden",
                    f"the token may not filter on column {condition.column!r} of "
                    f"channel {table.channel!r}, which is masked for it",
                )


def _pg_message(error: psycopg2.Error) -> str:
    return (getattr(error, "pgerror", None) or str(error)).strip()


def install(app: Quart, stream: Any) -> AccessControl:
    """Add access control, metrics, /readyz and the dashboard to `app`."""
    settings = stream.settings
    access = AccessControl(settings)
    metrics = StreamMetrics(stream)
    app.extensions["cdc_access"] = access
    app.extensions["cdc_metrics"] = metrics

    stream.hub.on_publish = metrics.published
    stream.hub.on_send = metrics.sent
    app.asgi_app = CredentialScrubber(app.asgi_app, settings.auth.cookie_name)  # type: ignore[method-assign]
    _register_error_handlers(app)
    app.register_blueprint(_blueprint(access, stream, metrics))

    @app.before_serving
    async def configure_logs() -> None:
        logsetup.configure(settings.log_format)

    return access


def _register_error_handlers(app: Quart) -> None:
    async def access_error(error: AccessError) -> tuple[Response, int, dict[str, str]]:
        logger.info(
            "%s %s rejected with %d: %s",
            request.method,
            request.path,
            error.status,
            error.message,
        )
        body = {"error": error.code, "message": error.message, **error.details}
        headers = {}
        if error.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="cdc-stream"'
        return jsonify(body), error.status, headers

    async def filter_error(error: FilterError) -> tuple[Response, int]:
        return jsonify({"error": "bad_request", "message": str(error)}), 400

    async def unavailable(error: ServiceUnavailable) -> tuple[Response, int]:
        return jsonify({"error": "unavailable", "message": str(error)}), 503

    app.register_error_handler(AccessError, access_error)
    app.register_error_handler(FilterError, filter_error)
    app.register_error_handler(ServiceUnavailable, unavailable)


def _blueprint(access: AccessControl, stream: Any, metrics: StreamMetrics) -> Blueprint:
    blueprint = Blueprint("cdc_stream_web", __name__)

    @blueprint.get("/")
    async def dashboard() -> Response:
        response = await send_from_directory(DASHBOARD_DIR, "index.html")
        response.headers.update(DASHBOARD_HEADERS)
        return response

    @blueprint.get("/dashboard/<path:name>")
    async def dashboard_file(name: str) -> Response:
        response = await send_from_directory(DASHBOARD_DIR, name)
        response.headers.update(DASHBOARD_HEADERS)
        return response

    @blueprint.get("/api/channels")
    async def channels() -> Response:
        principal = access.principal()
        tables = await access.streamed_tables()
        hidden = access.hidden_columns(principal)
        listed = [
            {
                "channel": table.channel,
                "table": table.qualified_name,
                "key_columns": table.key_columns,
                "hidden_columns": sorted(hidden.get(table.channel, ())),
            }
            for table in tables
            if principal.may_read(table.channel)
        ]
        return jsonify({"principal": principal.name, "channels": listed})

    @blueprint.get("/metrics")
    async def metrics_text() -> Response:
        access.principal()
        body = await asyncio.to_thread(metrics.render)
        return Response(body, status=200, content_type=CONTENT_TYPE)

    @blueprint.get("/readyz")
    async def readyz() -> tuple[Response, int]:
        problem = await _readiness_problem(stream)
        if problem is not None:
            return jsonify({"status": "unavailable", "reason": problem}), 503
        return jsonify({"status": "ready"}), 200

    return blueprint


async def _readiness_problem(stream: Any) -> str | None:
    """Return why the process cannot serve, or None when it can."""
    try:
        await asyncio.wait_for(
            asyncio.to_thread(stream.journal.last_position), READY_TIMEOUT_SECONDS
        )
    except TimeoutError:
        return f"journal did not answer within {READY_TIMEOUT_SECONDS:.0f} s"
    except Exception as error:
        # The SQLite and Redis backends raise their own error types.
        return f"journal unreadable: {type(error).__name__}: {error}"

    reader = stream.reader
    if reader is None:
        return "replication has not started"
    status = reader.status
    if status.state in ("streaming", "standby"):
        return None
    reason = f"replication is {status.state}"
    if status.last_error:
        reason += f": {status.last_error}"
    return reason
