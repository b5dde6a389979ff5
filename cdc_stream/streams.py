"""Write one client's stream or replay: journal replay, then live events."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from . import envelope, sse
from .hub import (
    EventFilter,
    JournalPage,
    Subscriber,
    history_lost_frame,
    position_for_time,
    read_page,
)
from .journals import EventJournal
from .positions import Position
from .resume import ResumePoint, resume_id

if TYPE_CHECKING:
    from .app import Stream

logger = logging.getLogger(__name__)

REPLAY_PAGE = 1000


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
    subscriber.writer_task = asyncio.current_task()
    subscriber.stuck_seconds = settings.stuck_client_seconds
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
                subscriber.overflow_seen()
                yield _slow_client_frame(subscriber)
                logger.warning("client %d ended: too far behind", subscriber.id)
                hub.slow_clients_ended += 1
                return
            chunk = subscriber.drain()
            if chunk:
                yield chunk
    finally:
        subscriber.overflow_seen()
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
