"""Abuse of the real app: connection churn and oversized requests."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from streaming import change_events, execute, health, wait_until
from webtools import get, module_app

CYCLES = 2000
CONCURRENCY = 50
CHURN_SECONDS = 90


@pytest.fixture(scope="module")
def served(pg_cluster):
    with module_app(pg_cluster) as (server, dsn):
        yield server, dsn


async def open_and_close(client: httpx.AsyncClient, url: str, number: int) -> int:
    """Open one stream and drop it in one of three ways; return the status."""
    headers = {"X-Forwarded-For": "192.0.2.1"} if number % 10 == 9 else {}
    async with client.stream("GET", url, headers=headers) as response:
        if number % 3 == 0 and response.status_code == 200:
            await anext(response.aiter_bytes())
        return response.status_code


async def churn(url: str) -> dict[int, int]:
    statuses: dict[int, int] = {}
    limits = httpx.Limits(max_connections=CONCURRENCY)
    deadline = time.monotonic() + CHURN_SECONDS
    async with httpx.AsyncClient(trust_env=False, timeout=10, limits=limits) as client:
        for start in range(0, CYCLES, CONCURRENCY):
            assert time.monotonic() < deadline, f"churn too slow at cycle {start}"
            batch = [
                open_and_close(client, url, number)
                for number in range(start, start + CONCURRENCY)
            ]
            for status in await asyncio.gather(*batch):
                statuses[status] = statuses.get(status, 0) + 1
    return statuses


def test_connect_disconnect_churn_leaves_nothing(served, sse_stream):
    server, dsn = served

    statuses = asyncio.run(churn(server.url("/api/realtime")))
    wait_until(lambda: health(server)["clients"] == 0, 20, "every subscription freed")
    client = sse_stream(server.url("/api/realtime?channels=orders_changes"))
    client.next_event()
    execute(
        dsn,
        "INSERT INTO orders (market_id, side, quantity, price) "
        "VALUES ('AFTER-CHURN', 'buy', 1, 1)",
    )
    ((_, data),) = change_events(client, 1)
    metrics = get(server, "/metrics").text

    assert statuses == {200: CYCLES - CYCLES // 10, 401: CYCLES // 10}
    assert data["data"]["market_id"] == "AFTER-CHURN"
    assert "cdc_stream_clients 1.0" in metrics


def raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request)
        received = b""
        try:
            while chunk := connection.recv(65536):
                received += chunk
                if b"\r\n\r\n" in received:
                    break
        except (ConnectionResetError, TimeoutError):
            pass
    return received


def test_oversized_header_rejected(served):
    server, _ = served
    huge = b"Bearer " + b"x" * 200_000
    request = b"GET /api/realtime HTTP/1.1\r\nHost: cdc\r\nAuthorization: " + huge

    answer = raw_request(server.port, request + b"\r\n\r\n")

    assert answer == b"" or answer.split(b" ")[1] in (b"400", b"413", b"431")
    assert get(server, "/healthz").status_code == 200


def test_many_headers_rejected(served):
    server, _ = served
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"y" * 100) for n in range(2000))
    request = b"GET /api/realtime HTTP/1.1\r\nHost: cdc\r\n" + headers + b"\r\n"

    answer = raw_request(server.port, request)

    assert answer == b"" or answer.split(b" ")[1] in (b"400", b"413", b"431")
    assert get(server, "/healthz").status_code == 200


def test_huge_channel_list_rejected_cleanly(served):
    server, _ = served
    channels = ",".join(f"channel_{n}" for n in range(1000))

    response = get(
        server, "/api/realtime", params={"channels": channels, "filter": "id=eq.1"}
    )

    assert response.status_code == 400
    assert "no streamed table" in response.json()["message"]
