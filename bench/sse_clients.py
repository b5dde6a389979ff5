"""Many SSE clients in one process: asyncio protocols on raw sockets.

Run as ``python -m bench.sse_clients --port P --clients N ...``. The process
opens N streams of ``GET /api/realtime`` on 127.0.0.1 and waits until every
one has received its `connection` event, which means it is subscribed. Then
it writes one JSON line ``{"ready": ...}`` to stdout. It reads until each
client has ``--events`` change events or ``--seconds`` have passed, and
writes one JSON line with the counts, the latency histogram and its own CPU
time.

Latency is the receive time minus the `sent_us` column of the row, which the
load generator sets to its wall clock in microseconds just before the
INSERT. Both clocks are this machine's `time.time()`.

Frames are counted by the bytes they start with, without parsing JSON, so
that one process can follow hundreds of streams at thousands of events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO

CHANGE_MARK = b'data: {"type":"database_change"'
HEARTBEAT_MARK = b'data: {"type":"heartbeat"'
CONNECTION_MARK = b'data: {"type":"connection"'
SLOW_CLIENT_MARK = b'data: {"type":"slow_client"'
SENT_US_RE = re.compile(rb'"sent_us":"?([0-9]+)')
LATENCY_BUCKET_US = 100


class ChunkedDecoder:
    """Incremental decoder of HTTP/1.1 chunked transfer coding."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._remaining = 0
        self._skip = 0
        self.finished = False

    def feed(self, data: bytes) -> bytes:
        """Return the payload bytes contained in `data`."""
        buffer = self._buffer
        buffer += data
        out: list[bytes] = []
        while buffer and not self.finished:
            if self._remaining:
                take = min(self._remaining, len(buffer))
                out.append(bytes(buffer[:take]))
                del buffer[:take]
                self._remaining -= take
                if not self._remaining:
                    self._skip = 2
                continue

            if self._skip:
                skipped = min(self._skip, len(buffer))
                del buffer[:skipped]
                self._skip -= skipped
                continue

            end = buffer.find(b"\r\n")
            if end < 0:
                break
            size = int(bytes(buffer[:end]).split(b";", 1)[0], 16)
            del buffer[: end + 2]
            if size == 0:
                self.finished = True
            self._remaining = size
        return b"".join(out)


class Shared:
    """State shared by the clients of one process."""

    def __init__(self, target_events: int, measure_latency: bool) -> None:
        self.target_events = target_events
        self.measure_latency = measure_latency
        # Rows sent before this time (microseconds) are left out of the latency.
        self.measure_from_us = 0
        self.latency = Counter[int]()
        self.clients_done = 0
        self.all_done = asyncio.Event()
        self.total_clients = 0


class StreamClient(asyncio.Protocol):
    """One SSE stream: counts change events and heartbeats as they arrive."""

    def __init__(
        self, request: bytes, shared: Shared, save: BinaryIO | None = None
    ) -> None:
        self._request = request
        self._shared = shared
        self._save = save
        self._head = bytearray()
        self._headers_done = False
        self._decoder: ChunkedDecoder | None = None
        self._pending = bytearray()
        self.transport: asyncio.Transport | None = None
        self.subscribed = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.changes = 0
        self.heartbeats = 0
        self.slow_client = False
        self.first_change_at: float | None = None
        self.last_change_at: float | None = None
        self.last_id: str | None = None
        self.error: str | None = None
        self._done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if not self._headers_done:
            data = self._read_head(data)
            if not data:
                return
        payload = self._decoder.feed(data) if self._decoder else data
        self._pending += payload
        end = self._pending.rfind(b"\n\n")
        if end < 0:
            return

        block = bytes(self._pending[: end + 2])
        del self._pending[: end + 2]
        self._process(block, now)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(
                ConnectionError(self.error or f"connection closed: {exc}")
            )
        if not self.closed.done():
            self.closed.set_result(None)
        self._finish()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _read_head(self, data: bytes) -> bytes:
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            return b""
        head = bytes(self._head[:end]).decode("latin-1")
        rest = bytes(self._head[end + 4 :])
        self._headers_done = True

        status_line, *header_lines = head.split("\r\n")
        if status_line.split(" ")[1] != "200":
            self.error = f"HTTP status {status_line!r}"
            self.close()
            return b""
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in header_lines)
        }
        if headers.get("transfer-encoding", "").lower() == "chunked":
            self._decoder = ChunkedDecoder()
        return rest

    def _process(self, block: bytes, now: float) -> None:
        if not self.subscribed.done() and CONNECTION_MARK in block:
            self.subscribed.set_result(None)

        count = block.count(CHANGE_MARK)
        if count:
            self._count_changes(block, count, now)
        self.heartbeats += block.count(HEARTBEAT_MARK)
        if SLOW_CLIENT_MARK in block:
            self.slow_client = True

    def _count_changes(self, block: bytes, count: int, now: float) -> None:
        self.changes += count
        if self.first_change_at is None:
            self.first_change_at = now
        self.last_change_at = now
        self.last_id = _last_event_id(block)

        shared = self._shared
        if shared.measure_latency:
            now_us = int(now * 1_000_000)
            start_us = shared.measure_from_us
            latency = shared.latency
            for match in SENT_US_RE.finditer(block):
                sent_us = int(match[1])
                if sent_us >= start_us:
                    latency[(now_us - sent_us) // LATENCY_BUCKET_US] += 1
        if self._save is not None:
            self._save.write(block)
        if shared.target_events and self.changes >= shared.target_events:
            self._finish()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        shared = self._shared
        shared.clients_done += 1
        if shared.clients_done >= shared.total_clients:
            shared.all_done.set()


def _last_event_id(block: bytes) -> str | None:
    start = block.rfind(b"\nid: ") + 1
    if start == 0:
        if not block.startswith(b"id: "):
            return None
    end = block.index(b"\n", start)
    return block[start + 4 : end].decode()


def build_request(port: int, path: str, headers: list[str]) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Accept: text/event-stream",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def open_client(
    port: int, request: bytes, shared: Shared, save: BinaryIO | None
) -> StreamClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        lambda: StreamClient(request, shared, save), "127.0.0.1", port
    )
    await asyncio.wait_for(client.subscribed, 60)
    return client


async def open_all(
    args: argparse.Namespace, shared: Shared, save: BinaryIO | None
) -> tuple[list[StreamClient], list[str]]:
    request = build_request(args.port, args.path, args.header)
    limit = asyncio.Semaphore(args.concurrency)

    async def one() -> StreamClient:
        async with limit:
            return await open_client(args.port, request, shared, save)

    results = await asyncio.gather(
        *(one() for _ in range(args.clients)), return_exceptions=True
    )
    clients = [r for r in results if isinstance(r, StreamClient)]
    errors = [repr(r) for r in results if not isinstance(r, StreamClient)]
    return clients, errors


async def run(args: argparse.Namespace) -> dict[str, Any]:
    shared = Shared(args.events, args.latency)
    save = Path(args.save).open("wb") if args.save else None
    started = time.time()
    clients, errors = await open_all(args, shared, save)
    shared.total_clients = len(clients)
    if not clients:
        shared.all_done.set()
    ready_at = time.time()
    shared.measure_from_us = int((ready_at + args.warmup) * 1_000_000)
    cpu_at_ready = _cpu_seconds()
    emit(
        {
            "ready": True,
            "connected": len(clients),
            "failed": len(errors),
            "errors": errors[:3],
            "started_at": started,
            "ready_at": ready_at,
            "connect_seconds": ready_at - started,
        }
    )

    try:
        await asyncio.wait_for(shared.all_done.wait(), args.seconds)
        timed_out = False
    except TimeoutError:
        timed_out = True
    finished_at = time.time()
    result = summarize(clients, shared, ready_at, finished_at, timed_out)
    result["cpu_seconds_after_ready"] = _cpu_seconds() - cpu_at_ready
    result["connect_errors"] = len(errors)

    for client in clients:
        client.close()
    if save is not None:
        save.close()
    return result


def summarize(
    clients: list[StreamClient],
    shared: Shared,
    ready_at: float,
    finished_at: float,
    timed_out: bool,
) -> dict[str, Any]:
    changes = [client.changes for client in clients]
    firsts = [c.first_change_at for c in clients if c.first_change_at is not None]
    lasts = [c.last_change_at for c in clients if c.last_change_at is not None]
    heartbeats = [client.heartbeats for client in clients]
    return {
        "clients": len(clients),
        "changes_total": sum(changes),
        "changes_min": min(changes, default=0),
        "changes_max": max(changes, default=0),
        "heartbeats_min": min(heartbeats, default=0),
        "heartbeats_total": sum(heartbeats),
        "slow_clients": sum(1 for client in clients if client.slow_client),
        "closed_by_server": sum(1 for client in clients if client.closed.done()),
        "first_change_at": min(firsts, default=None),
        "last_change_at": max(lasts, default=None),
        "ready_at": ready_at,
        "finished_at": finished_at,
        "timed_out": timed_out,
        "last_id": clients[0].last_id if clients else None,
        "latency_bucket_us": LATENCY_BUCKET_US,
        "latency": {str(k): v for k, v in shared.latency.items()},
        "cpu_seconds": _cpu_seconds(),
        "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def emit(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="app port on 127.0.0.1")
    parser.add_argument("--path", default="/api/realtime", help="request path")
    parser.add_argument("--clients", type=int, default=1, help="number of streams")

    parser.add_argument(
        "--concurrency", type=int, default=50, help="connections opened at once"
    )
    parser.add_argument(
        "--header", action="append", default=[], help="extra request header line"
    )
    parser.add_argument(
        "--events",
        type=int,
        default=0,
        help="stop once every client has this many change events (0: no target)",
    )
    parser.add_argument(
        "--seconds", type=float, required=True, help="maximum time after ready"
    )

    parser.add_argument(
        "--latency", action="store_true", help="histogram of receive time - sent_us"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=0.0,
        help="leave out rows sent in the first SECONDS after ready from the latency",
    )
    parser.add_argument("--save", help="file to append every received change frame to")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    emit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
