"""A small Server-Sent Events client for tests, built on httpx.

The parser follows the event stream interpretation of the WHATWG HTML
standard, section "Server-sent events". It decodes UTF-8 and drops a leading
BOM, and it accepts lines ending in CRLF, LF or CR. It skips ``:`` comments,
strips one space after a field's colon, joins multi-line ``data`` and
dispatches an event on each empty line.

`SSEClient` is for sync tests: a background thread reads the stream into a
queue. `AsyncSSEClient` is for async tests. Every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import codecs
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import httpx

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_EVENT_TIMEOUT = 10.0


@dataclass
class SSEEvent:
    """One dispatched event, with the comment lines seen since the previous one."""

    data: str
    # Value of this event's `event:` field, or None when it had none.
    event: str | None = None
    # Value of this event's `id:` field, or None when it had none. An `id:`
    # in a block without data changes only `last_event_id`.
    id: str | None = None
    # Latest `retry:` value in milliseconds since the previous event, or None.
    retry: int | None = None
    # The stream's last event id after this event, as a browser stores it.
    last_event_id: str = ""
    comments: list[str] = field(default_factory=list)

    @property
    def type(self) -> str:
        """Event type as a browser dispatches it: `message` when unnamed."""
        return self.event if self.event is not None else "message"


class SSEStreamClosed(Exception):
    """The stream ended, or failed, before the expected event arrived."""


class SSEParser:
    """Incremental parser from response bytes to `SSEEvent` objects."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._at_start = True
        self._last_event_id = ""
        self.comments: list[str] = []
        # Latest `retry:` value in milliseconds: the reconnection time.
        self.retry: int | None = None

        # Fields of the event being read, reset after each dispatch.
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self._comments: list[str] = []

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse `chunk` and return the events it completes."""
        text = self._decoder.decode(chunk)
        if self._at_start and text:
            text = text.removeprefix("\ufeff")
            self._at_start = False

        self._buffer += text
        events: list[SSEEvent] = []
        for line in self._take_lines():
            event = self._process_line(line)
            if event is not None:
                events.append(event)
        return events

    def _take_lines(self) -> list[str]:
        lines: list[str] = []
        start = 0
        position = 0
        buffer = self._buffer
        while position < len(buffer):
            character = buffer[position]
            if character == "\n":
                lines.append(buffer[start:position])
                start = position + 1
            elif character == "\r":
                # A CR at the end of the buffer may be the first half of CRLF.
                if position + 1 == len(buffer):
                    break
                lines.append(buffer[start:position])
                if buffer[position + 1] == "\n":
                    position += 1
                start = position + 1
            position += 1
        self._buffer = buffer[start:]
        return lines

    def _process_line(self, line: str) -> SSEEvent | None:
        if line == "":
            return self._dispatch()

        if line.startswith(":"):
            comment = line[1:]
            self._comments.append(comment)
            self.comments.append(comment)
            return None

        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        self._process_field(name, value)
        return None

    def _process_field(self, name: str, value: str) -> None:
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            # The specification ignores an id that contains NUL.
            if "\0" not in value:
                self._id = value
                self._last_event_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)
                self.retry = self._retry

    def _dispatch(self) -> SSEEvent | None:
        # A block without data lines dispatches nothing, as in a browser. Its
        # id has already updated the last event id, and its comments and
        # retry value are kept for the next event.
        if not self._data:
            self._data = []
            self._event = None
            self._id = None
            return None

        event = SSEEvent(
            data="\n".join(self._data),
            event=self._event,
            id=self._id,
            retry=self._retry,
            last_event_id=self._last_event_id,
            comments=self._comments,
        )
        self._reset_event()
        return event

    def _reset_event(self) -> None:
        self._data = []
        self._event = None
        self._id = None
        self._retry = None
        self._comments = []


@dataclass
class _StreamEnd:
    error: BaseException | None


class _StreamReader:
    """Reader of one SSE response, which reports to callbacks."""

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self.url = url
        self.headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        self.headers.update(headers or {})
        self.params = dict(params or {})
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self.parser = SSEParser()
        self.status_code: int | None = None
        self.response_headers: httpx.Headers | None = None
        self.body = b""

    async def run(
        self,
        on_response: Callable[[], None],
        on_event: Callable[[SSEEvent], None],
    ) -> None:
        # trust_env=False keeps proxy variables from routing test traffic away
        # from the loopback server.
        async with httpx.AsyncClient(timeout=self.timeout, trust_env=False) as client:
            async with client.stream(
                "GET", self.url, headers=self.headers, params=self.params or None
            ) as response:
                self.status_code = response.status_code
                self.response_headers = response.headers
                content_type = response.headers.get("content-type", "")
                if response.status_code != 200 or not content_type.startswith(
                    "text/event-stream"
                ):
                    self.body = await response.aread()
                    on_response()
                    return

                on_response()
                async for chunk in response.aiter_bytes():
                    for event in self.parser.feed(chunk):
                        on_event(event)


class SSEClient:
    """Sync SSE client: a background thread fills a queue of events.

    Use as a context manager, or call `start()` and `close()`.
    """

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
    ) -> None:
        self._reader = _StreamReader(
            url,
            headers=headers,
            params=params,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        self._items: queue.Queue[SSEEvent | _StreamEnd] = queue.Queue()
        self._response_seen = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._end: _StreamEnd | None = None
        self._closing = threading.Event()

    @property
    def status_code(self) -> int | None:
        """HTTP status of the response, once `start()` returned."""
        return self._reader.status_code

    @property
    def headers(self) -> httpx.Headers | None:
        """HTTP headers of the response, once `start()` returned."""
        return self._reader.response_headers

    @property
    def body(self) -> bytes:
        """Whole body of a response that is not an event stream."""
        return self._reader.body

    @property
    def comments(self) -> list[str]:
        """Every comment line read so far, without its leading colon."""
        return list(self._reader.parser.comments)

    def start(self, timeout: float = DEFAULT_EVENT_TIMEOUT) -> SSEClient:
        """Open the stream and wait up to `timeout` s for the response headers."""
        self._thread = threading.Thread(
            target=self._run_thread, name="sse-client", daemon=True
        )
        self._thread.start()

        if not self._response_seen.wait(timeout):
            self.close()
            raise TimeoutError(
                f"timed out after {timeout} s waiting for a response from "
                f"{self._reader.url}"
            )
        if self._reader.status_code is None:
            item = self._items.get_nowait()
            assert isinstance(item, _StreamEnd)
            raise SSEStreamClosed(
                f"request to {self._reader.url} failed: {item.error!r}"
            ) from item.error
        return self

    def next_event(self, timeout: float = DEFAULT_EVENT_TIMEOUT) -> SSEEvent:
        """Return the next event, waiting at most `timeout` s.

        Raises TimeoutError when none arrives in time, and SSEStreamClosed
        when the stream ended before one arrived.
        """
        if self._end is not None:
            raise SSEStreamClosed(f"stream ended: {self._end.error!r}")

        try:
            item = self._items.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"timed out after {timeout} s waiting for an event"
            ) from None

        if isinstance(item, _StreamEnd):
            self._end = item
            raise SSEStreamClosed(f"stream ended: {item.error!r}") from item.error
        return item

    def wait_for(
        self,
        predicate: Callable[[SSEEvent], bool],
        timeout: float = DEFAULT_EVENT_TIMEOUT,
    ) -> SSEEvent:
        """Return the first event matching `predicate` within `timeout` s.

        Events that do not match are consumed and dropped.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"timed out after {timeout} s waiting for a matching event"
                )
            event = self.next_event(remaining)
            if predicate(event):
                return event

    def events(
        self, count: int, timeout: float = DEFAULT_EVENT_TIMEOUT
    ) -> list[SSEEvent]:
        """Return the next `count` events, all within `timeout` s."""
        deadline = time.monotonic() + timeout
        received: list[SSEEvent] = []
        while len(received) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"timed out after {timeout} s with {len(received)} of "
                    f"{count} events"
                )
            received.append(self.next_event(remaining))
        return received

    def close(self, timeout: float = 5.0) -> None:
        """Close the connection and wait up to `timeout` s for the thread."""
        self._closing.set()
        loop = self._loop
        task = self._task
        if loop is not None and task is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:
                pass  # The loop closed after the check: the thread is ending.
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> SSEClient:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run_thread(self) -> None:
        asyncio.run(self._read())

    async def _read(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        error: BaseException | None = None
        try:
            # close() may have run before the task was published above.
            if self._closing.is_set():
                return
            await self._reader.run(self._response_seen.set, self._items.put)
        except asyncio.CancelledError:
            error = None
        except Exception as exc:
            # Reported to the test by the next call of next_event().
            error = exc
        finally:
            self._items.put(_StreamEnd(error))
            self._response_seen.set()


class AsyncSSEClient:
    """Async SSE client for tests that run in an event loop.

    Use with ``async with``, or call `start()` and `close()`.
    """

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
    ) -> None:
        self._reader = _StreamReader(
            url,
            headers=headers,
            params=params,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        self._items: asyncio.Queue[SSEEvent | _StreamEnd] = asyncio.Queue()
        self._response_seen = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._end: _StreamEnd | None = None

    @property
    def status_code(self) -> int | None:
        """HTTP status of the response, once `start()` returned."""
        return self._reader.status_code

    @property
    def headers(self) -> httpx.Headers | None:
        """HTTP headers of the response, once `start()` returned."""
        return self._reader.response_headers

    @property
    def body(self) -> bytes:
        """Whole body of a response that is not an event stream."""
        return self._reader.body

    @property
    def comments(self) -> list[str]:
        """Every comment line read so far, without its leading colon."""
        return list(self._reader.parser.comments)

    async def start(self, timeout: float = DEFAULT_EVENT_TIMEOUT) -> AsyncSSEClient:
        """Open the stream and wait up to `timeout` s for the response headers."""
        self._task = asyncio.create_task(self._read())
        try:
            await asyncio.wait_for(self._response_seen.wait(), timeout)
        except TimeoutError:
            await self.close()
            raise TimeoutError(
                f"timed out after {timeout} s waiting for a response from "
                f"{self._reader.url}"
            ) from None

        if self._reader.status_code is None:
            item = self._items.get_nowait()
            assert isinstance(item, _StreamEnd)
            raise SSEStreamClosed(
                f"request to {self._reader.url} failed: {item.error!r}"
            ) from item.error
        return self

    async def next_event(self, timeout: float = DEFAULT_EVENT_TIMEOUT) -> SSEEvent:
        """Return the next event, waiting at most `timeout` s.

        Raises TimeoutError when none arrives in time, and SSEStreamClosed
        when the stream ended before one arrived.
        """
        if self._end is not None:
            raise SSEStreamClosed(f"stream ended: {self._end.error!r}")

        try:
            item = await asyncio.wait_for(self._items.get(), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"timed out after {timeout} s waiting for an event"
            ) from None

        if isinstance(item, _StreamEnd):
            self._end = item
            raise SSEStreamClosed(f"stream ended: {item.error!r}") from item.error
        return item

    async def wait_for(
        self,
        predicate: Callable[[SSEEvent], bool],
        timeout: float = DEFAULT_EVENT_TIMEOUT,
    ) -> SSEEvent:
        """Return the first event matching `predicate` within `timeout` s.

        Events that do not match are consumed and dropped.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"timed out after {timeout} s waiting for a matching event"
                )
            event = await self.next_event(remaining)
            if predicate(event):
                return event

    async def events(
        self, count: int, timeout: float = DEFAULT_EVENT_TIMEOUT
    ) -> list[SSEEvent]:
        """Return the next `count` events, all within `timeout` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        received: list[SSEEvent] = []
        while len(received) < count:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"timed out after {timeout} s with {len(received)} of "
                    f"{count} events"
                )
            received.append(await self.next_event(remaining))
        return received

    async def close(self, timeout: float = 5.0) -> None:
        """Close the connection and wait up to `timeout` s for the reader."""
        if self._task is None or self._task.done():
            return
        self._task.cancel()
        await asyncio.wait({self._task}, timeout=timeout)

    async def __aenter__(self) -> AsyncSSEClient:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _read(self) -> None:
        error: BaseException | None = None
        try:
            await self._reader.run(self._response_seen.set, self._items.put_nowait)
        except asyncio.CancelledError:
            error = None
            raise
        except Exception as exc:
            # Reported to the test by the next call of next_event().
            error = exc
        finally:
            self._items.put_nowait(_StreamEnd(error))
            self._response_seen.set()
