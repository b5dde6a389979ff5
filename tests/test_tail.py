"""`cdc-stream tail` against the real app."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from streaming import app_environment, execute, parse_json, wait_streaming
from webtools import create_tables, module_app, token_hash, write_config

TOKEN = "tail-token-0123456789abcdef"
AUTH_CONFIG = f"""
[auth]
mode = "required"

[[auth.tokens]]
name = "tail"
hash = "{token_hash(TOKEN)}"
channels = ["orders_changes"]
"""


@pytest.fixture(scope="module")
def served(pg_cluster):
    with module_app(pg_cluster, AUTH_CONFIG) as (server, dsn):
        yield server, dsn


def run_tail(*args: str, token: str | None = TOKEN) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    if token is not None:
        env["CDC_TOKEN"] = token
    return subprocess.Popen(
        [sys.executable, "-m", "cdc_stream.cli", "tail", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_connected(process: subprocess.Popen[str], timeout: float = 15) -> None:
    """Wait for the `connected` line on stderr; the stream is open after it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if "connected to" in line:
            return
        if process.poll() is not None:
            raise AssertionError(f"tail exited: {process.stderr.read()}")
    raise AssertionError("tail did not connect")


def finish(process: subprocess.Popen[str], timeout: float = 30) -> tuple[str, str]:
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, errors = process.communicate()
        raise AssertionError(f"tail did not exit: {output!r} {errors!r}") from None


def insert_orders(dsn: str, *markets: str, price: str = "1") -> None:
    values = ", ".join(f"('{m}', 'buy', 1, {price})" for m in markets)
    execute(
        dsn, f"INSERT INTO orders (market_id, side, quantity, price) VALUES {values}"
    )


def test_tail_prints_filtered_lines(served):
    server, dsn = served
    process = run_tail(
        server.base_url, "--filter", "market_id=in.(TAIL-A,TAIL-C)", "--max-events", "2"
    )
    wait_connected(process)

    insert_orders(dsn, "TAIL-A", "TAIL-B", "TAIL-C", price="20893.1500")
    output, _ = finish(process)
    lines = output.splitlines()

    assert process.returncode == 0
    assert len(lines) == 2
    assert "orders_changes  INSERT   public.orders" in lines[0]
    assert '"market_id":"TAIL-A"' in lines[0]
    assert '"price":20893.1500' in lines[0]
    assert '"market_id":"TAIL-C"' in lines[1]


def test_tail_ndjson_is_exact(served):
    server, dsn = served
    process = run_tail(
        server.base_url,
        "--format",
        "ndjson",
        "--columns",
        "id,price",
        "--filter",
        "market_id=eq.NDJSON",
        "--max-events",
        "1",
    )
    wait_connected(process)

    insert_orders(dsn, "NDJSON", price="12345678.1234")
    output, _ = finish(process)
    (line,) = output.splitlines()
    event = parse_json(line)

    assert event["type"] == "database_change"
    assert set(event["data"]) == {"id", "price"}
    assert str(event["data"]["price"]) == "12345678.1234"


def test_tail_reports_rejection(served):
    server, _ = served

    missing = run_tail(server.base_url, token=None)
    forbidden = run_tail(server.base_url, "--channels", "trades_changes")
    _, missing_errors = finish(missing)
    _, forbidden_errors = finish(forbidden)

    assert missing.returncode == 1
    assert "HTTP 401" in missing_errors
    assert TOKEN not in missing_errors
    assert forbidden.returncode == 1
    assert "HTTP 403" in forbidden_errors
    assert "'trades_changes'" in forbidden_errors


def test_tail_resumes_after_restart(app_server, database, tmp_path):
    create_tables(database)
    config = write_config(tmp_path, "[stream]\nretry_ms = 200\n")
    env = app_environment(database, tmp_path, CDC_CONFIG=config)
    first = app_server(env)
    wait_streaming(first)
    process = run_tail(
        first.base_url,
        "--format",
        "ndjson",
        "--max-events",
        "12",
        "--reconnect-max-seconds",
        "1",
        token=None,
    )
    wait_connected(process)

    insert_orders(database, *(f"R{n}" for n in range(4)))
    time.sleep(1)
    first.stop()
    insert_orders(database, *(f"R{n}" for n in range(4, 8)))
    second = app_server(env, port=first.port)
    wait_streaming(second)
    insert_orders(database, *(f"R{n}" for n in range(8, 12)))
    output, errors = finish(process, timeout=40)
    events = [parse_json(line) for line in output.splitlines()]

    assert process.returncode == 0
    assert [e["data"]["market_id"] for e in events] == [f"R{n}" for n in range(12)]
    assert len({e["id"] for e in events}) == 12
    assert "reconnecting" in errors
