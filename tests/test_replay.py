"""GET /api/replay against the real app: ranges, limits, filters and formats.

The live stream is the reference for what the journal holds: the same
events, ids and data, which the other tests compare with the database.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from sse_client import SSEParser
from streaming import (
    BURST_DDL,
    app_environment,
    burst_rows,
    change_events,
    execute,
    parse_json,
    wait_streaming,
)

# One transaction each.
WRITES = (
    "INSERT INTO burst (batch, seq, note) "
    "SELECT 0, g, 'first ' || g FROM generate_series(1, 100) g",
    "INSERT INTO other (id, v) SELECT g, 'o' || g FROM generate_series(1, 10) g",
    "UPDATE burst SET note = 'updated' WHERE id <= 5",
    "DELETE FROM burst WHERE id > 95",
    "INSERT INTO burst (batch, seq, note) "
    "SELECT 1, g, 'second ' || g FROM generate_series(1, 50) g",
)
EVENT_COUNT = 100 + 10 + 5 + 5 + 50


@pytest.fixture
def journaled(app_server, database, sse_stream, tmp_path):
    """Start an app, commit WRITES and return it with the live events.

    The live events are (event id, data) pairs of every change event.
    """
    execute(database, BURST_DDL, "CREATE TABLE other (id int PRIMARY KEY, v text)")
    server = app_server(app_environment(database, tmp_path))
    wait_streaming(server)
    client = sse_stream(server.url("/api/realtime"))
    for statement in WRITES:
        execute(database, statement)
    live = [(event.id, data) for event, data in change_events(client, EVENT_COUNT)]
    return server, database, live


def replay(server, **params: str) -> httpx.Response:
    return httpx.get(
        server.url("/api/replay"), params=params, trust_env=False, timeout=10
    )


def ndjson_events(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [parse_json(line) for line in response.text.splitlines()]


def sse_events(response: httpx.Response) -> list[tuple[str | None, dict[str, Any]]]:
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = SSEParser().feed(response.content)
    return [(event.id, parse_json(event.data)) for event in events]


def test_replay_ranges_and_formats(journaled):
    server, database, live = journaled
    ids = [event_id for event_id, _ in live]
    datas = [data for _, data in live]
    first_lsn = datas[0]["lsn"]
    update_lsn = datas[110]["lsn"]

    everything = ndjson_events(
        replay(server, **{"from": first_lsn, "format": "ndjson"})
    )
    after_first = ndjson_events(replay(server, **{"from": ids[0], "format": "ndjson"}))
    as_sse = sse_events(replay(server, **{"from": ids[0], "to": ids[104]}))
    to_lsn = sse_events(replay(server, **{"from": ids[0], "to": update_lsn}))
    limited = sse_events(replay(server, **{"from": ids[0], "limit": "7"}))
    by_time = ndjson_events(
        replay(server, **{"from": "2000-01-01T00:00:00Z", "format": "ndjson"})
    )
    rows = {row["id"]: row for row in burst_rows(database)}

    assert everything == datas
    assert after_first == datas[1:]
    assert [event_id for event_id, _ in as_sse] == ids[1:105]
    assert [data for _, data in as_sse] == datas[1:105]
    assert [event_id for event_id, _ in to_lsn] == ids[1:115]
    assert {data["lsn"] for _, data in to_lsn[-5:]} == {update_lsn}
    assert [event_id for event_id, _ in limited] == ids[1:8]
    assert by_time[0]["type"] == "history_lost"
    assert by_time[0]["oldest_id"] == ids[0]
    assert by_time[1:] == datas
    for data in everything[:5]:
        assert data["data"]["note"] == f"first {data['data']['seq']}"
        assert rows[data["data"]["id"]] == {**data["data"], "note": "updated"}
    for data in everything[-50:]:
        assert rows[data["data"]["id"]] == data["data"]


def test_replay_filters_match_live_filters(journaled):
    server, _, live = journaled
    start = live[0][1]["lsn"]

    other = ndjson_events(
        replay(server, **{"from": start, "format": "ndjson", "tables": "other"})
    )
    by_channel = ndjson_events(
        replay(
            server, **{"from": start, "format": "ndjson", "channels": "other_changes"}
        )
    )
    by_operation = ndjson_events(
        replay(
            server, **{"from": start, "format": "ndjson", "operations": "update,DELETE"}
        )
    )
    qualified = ndjson_events(
        replay(
            server,
            **{
                "from": start,
                "format": "ndjson",
                "tables": "public.burst",
                "operations": "insert",
                "limit": "120",
            },
        )
    )

    assert other == [data for _, data in live if data["table"] == "other"]
    assert by_channel == other
    assert by_operation == [
        data for _, data in live if data["operation"] in ("UPDATE", "DELETE")
    ]
    assert [data["operation"] for data in by_operation] == ["UPDATE"] * 5 + [
        "DELETE"
    ] * 5
    assert (
        qualified
        == [
            data
            for _, data in live
            if data["table"] == "burst" and data["operation"] == "INSERT"
        ][:120]
    )
    assert len(qualified) == 120


def test_replay_rejects_bad_parameters(journaled):
    server, _, live = journaled
    first_id = live[0][0]
    cases = [
        ({}, "missing 'from'"),
        ({"from": "nonsense"}, "'nonsense'"),
        ({"from": first_id, "to": "2024-03-18T10:30:00Z"}, "'to'"),
        ({"from": first_id, "to": "0/1:x"}, "'0/1:x'"),
        ({"from": first_id, "limit": "0"}, "invalid limit '0'"),
        ({"from": first_id, "limit": "ten"}, "invalid limit 'ten'"),
        ({"from": first_id, "limit": "100001"}, "invalid limit '100001'"),
        ({"from": first_id, "format": "xml"}, "invalid format 'xml'"),
        ({"from": first_id, "operations": "merge"}, "'MERGE'"),
    ]

    for params, expected in cases:
        response = replay(server, **params)

        assert response.status_code == 400, params
        assert expected in response.json()["message"], params
