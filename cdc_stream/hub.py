"""In-process fan-out of encoded events to subscribers with bounded queues.

Every method runs on the event loop. `JournalTailer` reads new events from
the journal in order and publishes them, so each process serves exactly the
journal's sequence, whichever process streams the slot.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from . import envelope
from .envelope import Event
from .journal import Appended
from .journals import EventJournal
from .positions import Position
from .resume import resume_id

logger = logging.getLogger(__name__)

OPERATIONS = frozenset({"INSERT", "UPDATE", "DELETE", "TRUNCATE", "MESSAGE"})
# A blocking read of the journal returns empty after this many seconds, which
# bounds how long a stopped tailer keeps a worker thread.
BLOCK_SECONDS = 1.0
# Seconds between reads while the journal fails.
RETRY_SECONDS = 1.0
# Appended batches a tailer keeps to publish from memory. When more arrive
# before it publishes, the oldest are dropped and read from the journal, so
# a tailer that falls behind keeps at most this many batches of frames.
APPENDED_BACKLOG = 4
# The position before every event: where an empty journal's stream starts.
START = Position(0, -1)
# Operation of journal entries that every subscriber receives whatever its
# filter, because their channel is empty.
HISTORY_LOST = "HISTORY_LOST"


@dataclass(frozen=True)
class JournalPage:
    """Events read after a position, and the horizon if history was lost there.

    `horizon` is set when events after the requested position were pruned or
    came before the journal attached to the slot. `events` then start after
    the horizon.
    """

    events: list[Event]
    horizon: Position | None


def read_page(
    journal: EventJournal, after: Position, limit: int, upto: Position | None = None
) -> JournalPage:
    """Read up to `limit` events after `after`, telling whether history was lost.

    Pruning deletes events and raises the horizon in one transaction, so an
    unchanged horizon before and after the read means the events read and
    the horizon agree. Blocks, so call it from a worker thread.
    """
    while True:
        horizon = journal.horizon()
        lost = horizon is not None and after < horizon[0]
        start = horizon[0] if lost and horizon is not None else after
        events = journal.read_after(start, limit, upto)
        if journal.horizon() == horizon:
            return JournalPage(events, start if lost else None)


def position_for_time(journal: EventJournal, moment: float) -> Position | None:
    """Return the position after which events committed at `moment` or later come.

    When events committed at `moment` may have been pruned, the result is
    `START`, before the horizon, so `read_page` reports the loss. None means
    no event is that recent. Blocks, so call it from a worker thread.
    """
    while True:
        horizon = journal.horizon()
        # The horizon's own event was committed at its time and is gone, so a
        # resume from exactly that time has lost history too.
        if horizon is not None and moment <= horizon[1]:
            return START
        found = journal.position_before_time(moment)
        if journal.horizon() == horizon:
            return found


def history_lost_frame(
    requested: str, oldest: Position | None, event_id: str | None = None
) -> bytes:
    """Frame the notice that history after `requested` is no longer held.

    With `event_id`, the frame carries it as its SSE id, so a browser that
    reconnects resumes after the lost range instead of receiving the notice again.
    """
    frame = envelope.notice_frame(
        "history_lost",
        f"history from {requested} is no longer held; events continue from the "
        "oldest one held, so reload your state",
        datetime.now(UTC),
        requested=requested,
        oldest_id=None if oldest is None else oldest.event_id,
    )
    if event_id is None:
        return frame
    return b"id: " + event_id.encode() + b"\n" + frame


@dataclass(frozen=True)
class EventFilter:
    """Selection of the events a subscriber receives; an empty set means all."""

    channels: frozenset[str] = frozenset()
    tables: frozenset[str] = frozenset()
    operations: frozenset[str] = frozenset()

    def matches(self, event: Event) -> bool:
        # Stream notices, such as lost history, have no channel and reach all.
        if not event.channel:
            return True
        if self.channels and event.channel not in self.channels:
            return False
        if self.tables and (
            event.table not in self.tables
            and f"{event.schema}.{event.table}" not in self.tables
        ):
            return False
        return not self.operations or event.operation in self.operations


class Subscriber:
    """One client's pending frames, drained in one write by its writer."""

    _ids = itertools.count(1)

    def __init__(
        self,
        event_filter: EventFilter,
        max_pending: int,
        start: Position,
        transform: Callable[[Event], bytes | None] | None = None,
        on_send: Callable[[float], None] | None = None,
    ) -> None:
        self.id = next(self._ids)
        # Per-subscriber view (row filter, masked columns): returns the frame
        # to send or None to skip. Without one, the shared frame is sent.
        self.transform = transform
        self._on_send = on_send
        self._pending_commit_time = 0.0
        self.start = start
        self.filter = event_filter
        self.max_pending = max_pending
        self.overflowed = False
        # Position of the last event handed to the client, or of its resume
        # point. None until either exists.
        self.delivered: Position | None = None
        # Where the client must resume after an overflow ended its stream.
        self.resume_after: Position | None = None
        self._floor: Position | None = None
        self._frames: deque[bytes] = deque()
        self._positions: deque[Position] = deque()
        self._wakeup = asyncio.Event()
        # The task writing this client's response, and the timer that cancels
        # it when the client stops reading after an overflow.
        self.writer_task: asyncio.Task[object] | None = None
        self.stuck_seconds = 30.0
        self._stuck_timer: asyncio.TimerHandle | None = None

    def offer(self, events: Iterable[Event]) -> None:
        if self.overflowed:
            return
        transform = self.transform
        floor = self._floor
        for event in events:
            if floor is not None and event.position <= floor:
                continue
            if self.filter.matches(event):
                frame = event.frame if transform is None else transform(event)
                if frame is None:
                    continue
                if not self._frames:
                    self._pending_commit_time = event.commit_time
                self._frames.append(frame)
                self._positions.append(event.position)
        if len(self._frames) > self.max_pending:
            # Past the bound, the client is ended with a notice and catches up
            # on reconnect; its queued frames are dropped to free the memory.
            self.overflowed = True
            self.resume_after = self._resume_point()
            self._frames.clear()
            self._positions.clear()
            self._watch_writer()
        if self._frames or self.overflowed:
            self._wakeup.set()

    def skip_through(self, position: Position) -> None:
        """Drop live events at or before `position`, which the client has.

        A client that resumes on a process whose tailer is behind the one it
        came from would otherwise receive those events twice.
        """
        self._floor = position
        while self._positions and self._positions[0] <= position:
            self._positions.popleft()
            self._frames.popleft()

    def _resume_point(self) -> Position:
        if self.delivered is not None:
            return self.delivered
        # Nothing was sent yet, so the client resumes just before the first
        # pending event.
        first = self._positions[0]
        return Position(first.commit_lsn, first.index - 1)

    async def wait(self, timeout: float) -> bool:
        """Wait until frames are pending; return False on timeout."""
        if self._frames or self.overflowed:
            return True
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _watch_writer(self) -> None:
        # A writer that does not get to the overflow notice is blocked on a
        # client that stopped reading; the notice cannot reach that client.
        if self.writer_task is None or self._stuck_timer is not None:
            return
        loop = asyncio.get_running_loop()
        self._stuck_timer = loop.call_later(self.stuck_seconds, self._end_stuck_writer)

    def _end_stuck_writer(self) -> None:
        self._stuck_timer = None
        if self.writer_task is not None and not self.writer_task.done():
            logger.warning(
                "client %d ended: not reading for %.0f s after falling behind",
                self.id,
                self.stuck_seconds,
            )
            self.writer_task.cancel()

    def overflow_seen(self) -> None:
        """Record that the writer handles the overflow, so it is not cancelled."""
        if self._stuck_timer is not None:
            self._stuck_timer.cancel()
            self._stuck_timer = None

    def rebase(self, start: Position) -> None:
        """Drop pending frames and receive live events after `start` again."""
        self.overflow_seen()
        self._frames.clear()
        self._positions.clear()
        self.overflowed = False
        self.resume_after = None
        self.start = start

    def drain(self) -> bytes:
        """Take every pending frame as one chunk."""
        if not self._frames:
            return b""
        chunk = b"".join(self._frames)
        self.delivered = self._positions[-1]
        self._frames.clear()
        self._positions.clear()
        if self._on_send is not None:
            self._on_send(self._pending_commit_time)
        return chunk


class Hub:
    """Fan-out of events to the subscribers of this process."""

    def __init__(self, last_position: Position) -> None:
        self._subscribers: dict[int, Subscriber] = {}
        self.last_position = last_position
        self.events_published = 0
        self.slow_clients_ended = 0
        # Metrics callbacks: each published batch, and the commit time of the
        # oldest frame in each write to a client.
        self.on_publish: Callable[[list[Event]], None] | None = None
        self.on_send: Callable[[float], None] | None = None

    def __len__(self) -> int:
        return len(self._subscribers)

    def subscribe(
        self,
        event_filter: EventFilter,
        max_pending: int,
        transform: Callable[[Event], bytes | None] | None = None,
    ) -> Subscriber:
        """Add a subscriber; it receives events published after `last_position`."""
        subscriber = Subscriber(
            event_filter, max_pending, self.last_position, transform, self.on_send
        )
        self._subscribers[subscriber.id] = subscriber
        logger.info("client %d subscribed (%d connected)", subscriber.id, len(self))
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if self._subscribers.pop(subscriber.id, None) is not None:
            logger.info(
                "client %d unsubscribed (%d connected)", subscriber.id, len(self)
            )

    def publish(self, events: list[Event]) -> None:
        if not events:
            return
        self.events_published += len(events)
        self.last_position = events[-1].position
        if self.on_publish is not None:
            self.on_publish(events)
        for subscriber in list(self._subscribers.values()):
            subscriber.offer(events)


class JournalTailer:
    """Publishes journal events to the hub as they are appended.

    A journal with `read_after_blocking`, such as Redis, is read with blocking
    reads. Other journals are polled every `poll_seconds` and on `wake()`.
    A batch that this process appended is published from memory when it
    follows the hub's last position, and read from the journal otherwise.
    """

    def __init__(
        self,
        journal: EventJournal,
        hub: Hub,
        poll_seconds: float,
        batch_size: int = 1000,
    ) -> None:
        self._journal = journal
        self._hub = hub
        self._poll_seconds = poll_seconds
        self._batch_size = batch_size
        self._wakeup = asyncio.Event()
        self._read_blocking = getattr(journal, "read_after_blocking", None)
        self._failures = 0
        self._appended: deque[Appended] = deque(maxlen=APPENDED_BACKLOG)

    def wake(self, appended: Appended | None = None) -> None:
        """Read the journal now instead of at the next poll; loop thread only.

        `appended` is a batch whose append has committed. It is published
        from memory if it follows the last published position when its turn
        comes, and read from the journal otherwise.
        """
        # A batch larger than a tailer batch is always read from the journal,
        # so keeping its frames would only cost memory.
        if (
            appended is not None
            and self._read_blocking is None
            and len(appended.events) <= self._batch_size
        ):
            self._appended.append(appended)
        self._wakeup.set()

    async def run(self) -> None:
        while True:
            # Cleared before reading, so a wake-up during the read is kept.
            self._wakeup.clear()
            events = self._take_appended()
            if events is not None:
                self._hub.publish(events)
                if self._appended:
                    # Lets the subscribers' writers drain before the next batch.
                    await asyncio.sleep(0)
                    continue
            elif await self._read_and_publish():
                continue

            try:
                await asyncio.wait_for(self._wakeup.wait(), self._poll_seconds)
            except TimeoutError:
                pass

    async def _read_and_publish(self) -> bool:
        """Publish the next events from the journal; return whether more may follow."""
        try:
            events = await self._read()
        except OSError as error:
            self._read_failed(error)
            await asyncio.sleep(RETRY_SECONDS)
            return True
        if self._failures:
            logger.info("journal readable again after %d failures", self._failures)
            self._failures = 0

        self._hub.publish(events)
        if self._read_blocking is not None:
            return True
        # A batch kept in memory may follow the events just read.
        return len(events) == self._batch_size or bool(events and self._appended)

    def _take_appended(self) -> list[Event] | None:
        """Take the next appended batch if it follows the last published position.

        Returns None when the journal must be read instead: the next batch
        kept does not start right after the last published position, or it
        is larger than a tailer batch. Reading such a batch in parts from the
        journal paces it as before, so a client that drains its queue between
        parts is not ended.
        """
        last = self._hub.last_position
        while self._appended:
            appended = self._appended[0]
            if appended.events[-1].position <= last:
                self._appended.popleft()
                continue
            if appended.previous != last or len(appended.events) > self._batch_size:
                return None
            self._appended.popleft()
            return appended.events
        return None

    async def _read(self) -> list[Event]:
        after = self._hub.last_position
        if self._read_blocking is None:
            events = await asyncio.to_thread(
                self._journal.read_after, after, self._batch_size
            )
        else:
            events = await asyncio.to_thread(
                self._read_blocking, after, self._batch_size, BLOCK_SECONDS
            )
        if not events or after == START:
            return events

        horizon = await asyncio.to_thread(self._journal.horizon)
        if horizon is None or horizon[0] <= after:
            return events
        return await self._read_past_horizon(after)

    async def _read_past_horizon(self, after: Position) -> list[Event]:
        # Retention pruned events this process had not published yet, so its
        # subscribers get a notice before the events after the horizon.
        page = await asyncio.to_thread(
            read_page, self._journal, after, self._batch_size
        )
        if page.horizon is None:
            return page.events

        oldest = page.events[0].position if page.events else None
        frame = history_lost_frame(resume_id(after), oldest, resume_id(page.horizon))
        notice = Event(page.horizon, "", "", "", HISTORY_LOST, frame, 0.0)
        logger.error(
            "history lost: events after %s were pruned before this process "
            "published them",
            resume_id(after),
        )
        return [notice, *page.events]

    def _read_failed(self, error: OSError) -> None:
        # Logged once per outage, and the recovery message gives the count.
        self._failures += 1
        if self._failures == 1:
            logger.error(
                "reading the journal failed, retrying every %.0f s: %s",
                RETRY_SECONDS,
                error,
            )
