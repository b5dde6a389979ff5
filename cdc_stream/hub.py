"""In-process fan-out of encoded events to subscribers with bounded queues.

Every method runs on the event loop. The replication thread hands batches over
with `Handoff`, which blocks that thread while too many batches are pending, so
a slow event loop slows the slot reader instead of growing memory.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from .envelope import Event

logger = logging.getLogger(__name__)

OPERATIONS = frozenset({"INSERT", "UPDATE", "DELETE", "TRUNCATE"})


@dataclass(frozen=True)
class EventFilter:
    """Which events a subscriber receives; an empty set means all."""

    channels: frozenset[str] = frozenset()
    tables: frozenset[str] = frozenset()
    operations: frozenset[str] = frozenset()

    def matches(self, event: Event) -> bool:
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

    def __init__(self, event_filter: EventFilter, max_pending: int) -> None:
        self.id = next(self._ids)
        self.filter = event_filter
        self.max_pending = max_pending
        self.overflowed = False
        self.last_event_id: str | None = None
        self._pending_id: str | None = None
        self._frames: deque[bytes] = deque()
        self._wakeup = asyncio.Event()

    def offer(self, events: Iterable[Event]) -> None:
        if self.overflowed:
            return
        for event in events:
            if self.filter.matches(event):
                self._frames.append(event.frame)
                self._pending_id = event.position.event_id
        if len(self._frames) > self.max_pending:
            # Past the bound, the client is ended with a notice and catches up
            # on reconnect; its queued frames are dropped to free the memory.
            self.overflowed = True
            self._frames.clear()
        if self._frames or self.overflowed:
            self._wakeup.set()

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

    def drain(self) -> bytes:
        """Take every pending frame as one chunk."""
        if not self._frames:
            return b""
        chunk = b"".join(self._frames)
        self._frames.clear()
        self.last_event_id = self._pending_id
        return chunk


class Hub:
    """Fan-out of events to the subscribers of this process."""

    def __init__(self) -> None:
        self._subscribers: dict[int, Subscriber] = {}
        self.events_published = 0

    def __len__(self) -> int:
        return len(self._subscribers)

    def subscribe(self, event_filter: EventFilter, max_pending: int) -> Subscriber:
        subscriber = Subscriber(event_filter, max_pending)
        self._subscribers[subscriber.id] = subscriber
        logger.info("client %d subscribed (%d connected)", subscriber.id, len(self))
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if self._subscribers.pop(subscriber.id, None) is not None:
            logger.info(
                "client %d unsubscribed (%d connected)", subscriber.id, len(self)
            )

    def publish(self, events: list[Event]) -> None:
        self.events_published += len(events)
        for subscriber in list(self._subscribers.values()):
            subscriber.offer(events)


class Handoff:
    """Hands event batches from the replication thread to the event loop."""

    def __init__(
        self, hub: Hub, loop: asyncio.AbstractEventLoop, max_batches: int = 8
    ) -> None:
        self._hub = hub
        self._loop = loop
        self._slots = threading.BoundedSemaphore(max_batches)

    def put(self, events: list[Event], stop: threading.Event) -> bool:
        """Queue a batch for the loop; return False if `stop` was set first."""
        while not self._slots.acquire(timeout=0.5):
            if stop.is_set():
                return False
        try:
            self._loop.call_soon_threadsafe(self._publish, events)
        except RuntimeError:
            # The loop is closed: the process is shutting down.
            self._slots.release()
            return False
        return True

    def _publish(self, events: list[Event]) -> None:
        try:
            self._hub.publish(events)
        finally:
            self._slots.release()
