"""The journal in Redis Streams, shared by every app server of one slot.

Each event is a stream entry whose id is its position: the commit LSN as the
id's milliseconds part and the change's index as its sequence part, both
unsigned 64-bit in Redis. Redis rejects an XADD whose id is at or below the
stream's last generated id, even after trimming, and the append script skips
such events before adding, so a transaction that the slot delivers again is
stored once. Each batch is appended by one Lua script, which Redis runs
without interleaving other commands.

Keys, all named after the slot (`<prefix>` is `cdc-stream:<slot name>`):

- `<prefix>:events`, a stream with fields `channel`, `schema`, `table`,
  `operation`, `time` (commit time, epoch seconds) and `frame` (SSE bytes);
- `<prefix>:times`, a sorted set with one member per transaction, the commit
  LSN as 20 zero-padded digits, scored by the highest commit time up to that
  transaction, which makes the scores non-decreasing in LSN order;
- `<prefix>:meta`, a hash of journal metadata such as `database`, `slot` and
  `horizon`.

Every Redis error is raised as `JournalUnavailableError`, an `OSError`, so
the replication reader treats an unreachable Redis like a lost database
connection: it drops the stream unconfirmed and reconnects with backoff.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis

from .envelope import Event
from .journal import JournalStats
from .positions import Position

logger = logging.getLogger(__name__)

KEY_PREFIX = "cdc-stream"
MAX_SEQUENCE = (1 << 64) - 1
# A command fails after this many seconds without a reply, so blocking reads
# must wait for less.
SOCKET_TIMEOUT_SECONDS = 10.0
CONNECT_TIMEOUT_SECONDS = 5.0

_T = TypeVar("_T")

# Lua helpers shared by the scripts. `pad` makes decimal strings of up to 20
# digits compare in numeric order as strings, because Lua numbers are doubles
# and lose precision past 2^53.
_LUA_HELPERS = """
local function pad(digits)
  return string.rep('0', 20 - #digits) .. digits
end

local function raise_horizon(meta, lsn, index, moment)
  local current = redis.call('HGET', meta, 'horizon')
  if current then
    local c_lsn, c_index, c_moment = string.match(current, '^(%S+) (%S+) (%S+)$')
    local newer = pad(lsn) > pad(c_lsn)
      or (lsn == c_lsn and tonumber(index) > tonumber(c_index))
    if not newer then
      return 0
    end
    if tonumber(c_moment) > tonumber(moment) then
      moment = c_moment
    end
  end
  redis.call('HSET', meta, 'horizon', lsn .. ' ' .. index .. ' ' .. moment)
  return 1
end
"""

# KEYS: events, times. ARGV: groups of 8 values per event, in position order:
# commit LSN, index, commit time, channel, schema, table, operation, frame.
# Returns the number of events added.
_APPEND_SCRIPT = (
    _LUA_HELPERS
    + """
local top = nil
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      local ms, seq = string.match(info[i + 1], '^(%d+)-(%d+)$')
      top = pad(ms) .. '-' .. pad(seq)
    end
  end
end

-- Scores are passed on as the strings given, because Lua prints numbers with
-- only 14 significant digits.
local max_time, max_text = nil, nil
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
if #last == 2 then
  max_time, max_text = tonumber(last[2]), last[2]
end

local added = 0
for i = 1, #ARGV, 8 do
  local lsn, index = ARGV[i], ARGV[i + 1]
  local key = pad(lsn) .. '-' .. pad(index)
  if top == nil or key > top then
    redis.call('XADD', KEYS[1], lsn .. '-' .. index,
      'channel', ARGV[i + 3], 'schema', ARGV[i + 4], 'table', ARGV[i + 5],
      'operation', ARGV[i + 6], 'time', ARGV[i + 2], 'frame', ARGV[i + 7])
    top = key
    added = added + 1

    local moment, text = tonumber(ARGV[i + 2]), ARGV[i + 2]
    if max_time ~= nil and max_time > moment then
      moment, text = max_time, max_text
    end
    max_time, max_text = moment, text
    redis.call('ZADD', KEYS[2], 'NX', text, pad(lsn))
  end
end
return added
"""
)

# KEYS: meta. ARGV: LSN, index, moment. Returns 1 if the horizon moved.
_RAISE_HORIZON_SCRIPT = (
    _LUA_HELPERS
    + """
return raise_horizon(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
"""
)

# KEYS: events, times, meta. ARGV: LSN and index of the last event to delete,
# and the latest commit time among the deleted events. Deletes the events up
# to that position and the transactions of the time index that have no event
# left, then raises the horizon. Returns the number of events deleted.
_TRIM_SCRIPT = (
    _LUA_HELPERS
    + """
local lsn, index = ARGV[1], ARGV[2]
local deleted = redis.call('XTRIM', KEYS[1], 'MINID', '=',
  lsn .. '-' .. tostring(tonumber(index) + 1))

local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local keep_from = nil
if #first == 1 then
  keep_from = pad(string.match(first[1][1], '^(%d+)-'))
end

-- Scores are non-decreasing in LSN order and ties sort by member, so the
-- members in rank order are in LSN order too.
while true do
  local head = redis.call('ZRANGE', KEYS[2], 0, 99)
  local count = 0
  for _, member in ipairs(head) do
    if keep_from ~= nil and member >= keep_from then
      break
    end
    count = count + 1
  end
  if count > 0 then
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, count - 1)
  end
  if count < 100 then
    break
  end
end

raise_horizon(KEYS[3], lsn, index, ARGV[3])
return deleted
"""
)


class JournalUnavailableError(OSError):
    """A journal command failed: Redis is unreachable or returned an error."""


def describe_redis_url(url: str) -> str:
    """Describe a Redis URL for messages and logs, without credentials."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<invalid Redis URL>"
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port or 6379}{parts.path or '/0'}"


def stream_id(position: Position) -> str:
    """Return the stream entry id of the event at `position`."""
    if position.index < 0:
        raise ValueError(f"position {position} has no event: its index is negative")
    return f"{position.commit_lsn}-{position.index}"


def id_at_or_before(position: Position) -> str:
    """Return the largest stream id at or before `position`.

    The entries after this id are exactly the events after `position`, which
    may be a position between events, such as (LSN, -1).
    """
    if position.index >= 0:
        return f"{position.commit_lsn}-{position.index}"
    if position.commit_lsn > 0:
        return f"{position.commit_lsn - 1}-{MAX_SEQUENCE}"
    return "0-0"


def parse_stream_id(value: bytes | str) -> Position:
    """Return the position of a stream entry id such as `23456-2`."""
    text = value.decode() if isinstance(value, bytes) else value
    lsn, index = text.split("-")
    return Position(int(lsn), int(index))


def _to_event(entry_id: bytes, fields: dict[bytes, bytes]) -> Event:
    return Event(
        position=parse_stream_id(entry_id),
        schema=fields[b"schema"].decode(),
        table=fields[b"table"].decode(),
        channel=fields[b"channel"].decode(),
        operation=fields[b"operation"].decode(),
        frame=fields[b"frame"],
        commit_time=float(fields[b"time"]),
    )


def _append_arguments(events: Iterable[Event]) -> list[str | bytes]:
    arguments: list[str | bytes] = []
    for event in events:
        arguments.extend(
            (
                str(event.position.commit_lsn),
                str(event.position.index),
                repr(float(event.commit_time)),
                event.channel,
                event.schema,
                event.table,
                event.operation,
                event.frame,
            )
        )
    return arguments


class RedisJournal:
    """Journal of one slot in Redis Streams, safe to share between threads.

    Each command takes a connection from redis-py's pool and returns it, so
    threads never share a connection.
    """

    def __init__(
        self, url: str, slot_name: str, client: redis.Redis | None = None
    ) -> None:
        self.path = f"{describe_redis_url(url)} ({KEY_PREFIX}:{slot_name}:*)"
        self.events_key = f"{KEY_PREFIX}:{slot_name}:events"
        self.times_key = f"{KEY_PREFIX}:{slot_name}:times"
        self.meta_key = f"{KEY_PREFIX}:{slot_name}:meta"
        self._client = client or redis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT_SECONDS,
            socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
            health_check_interval=30,
        )
        self._append_script = self._client.register_script(_APPEND_SCRIPT)
        self._raise_horizon_script = self._client.register_script(_RAISE_HORIZON_SCRIPT)
        self._trim_script = self._client.register_script(_TRIM_SCRIPT)

    def _run(
        self, action: str, command: Callable[..., _T], *args: Any, **kwargs: Any
    ) -> _T:
        try:
            return command(*args, **kwargs)
        except redis.RedisError as error:
            raise JournalUnavailableError(
                f"Redis journal at {self.path}: {action} failed: {error}"
            ) from error

    def close(self) -> None:
        """Do nothing: connections go back to the shared pool after each command.

        The replication reader calls this after each connection attempt, while
        other threads may still use the pool.
        """

    def disconnect(self) -> None:
        """Close every pooled connection; for shutdown and tests."""
        self._client.close()

    def append(self, events: Iterable[Event]) -> None:
        """Store events in one script; events at or below the last id are skipped."""
        arguments = _append_arguments(events)
        if not arguments:
            return
        self._run(
            "append",
            self._append_script,
            keys=[self.events_key, self.times_key],
            args=arguments,
        )

    def read_after(
        self, after: Position, limit: int, upto: Position | None = None
    ) -> list[Event]:
        """Return up to `limit` events after `after`, up to `upto` inclusive."""
        start = "(" + id_at_or_before(after)
        end = "+" if upto is None else id_at_or_before(upto)
        entries = self._run(
            "read", self._client.xrange, self.events_key, start, end, count=limit
        )
        return [_to_event(entry_id, fields) for entry_id, fields in entries]

    def read_after_blocking(
        self, after: Position, limit: int, timeout_seconds: float
    ) -> list[Event]:
        """Return events after `after`, waiting up to `timeout_seconds` for one.

        Returns an empty list on timeout. Uses XREAD BLOCK, which returns as soon
        as an entry past `after` is added.
        """
        response = self._run(
            "blocking read",
            self._client.xread,
            {self.events_key: id_at_or_before(after)},
            count=limit,
            block=max(1, int(timeout_seconds * 1000)),
        )
        if not response:
            return []
        _, entries = response[0]
        return [_to_event(entry_id, fields) for entry_id, fields in entries]

    def last_position(self) -> Position | None:
        entries = self._run(
            "read newest event", self._client.xrevrange, self.events_key, count=1
        )
        return parse_stream_id(entries[0][0]) if entries else None

    def first_position(self) -> Position | None:
        entries = self._run(
            "read oldest event", self._client.xrange, self.events_key, count=1
        )
        return parse_stream_id(entries[0][0]) if entries else None

    def position_before_time(self, moment: float) -> Position | None:
        """Return the position just before the first event committed at `moment`.

        Events committed later count too. None means that no event is that recent.
        """
        members = self._run(
            "look up time",
            self._client.zrangebyscore,
            self.times_key,
            moment,
            "+inf",
            start=0,
            num=1,
        )
        if not members:
            return None
        return Position(int(members[0]), -1)

    def get_meta(self, key: str) -> str | None:
        value = self._run("read metadata", self._client.hget, self.meta_key, key)
        return None if value is None else value.decode()

    def set_meta(self, key: str, value: str) -> None:
        self._run("write metadata", self._client.hset, self.meta_key, key, value)

    def horizon(self) -> tuple[Position, float] | None:
        """Return the horizon position and its commit time, or None if unset."""
        value = self.get_meta("horizon")
        if value is None:
            return None
        lsn, index, moment = value.split(" ")
        return Position(int(lsn), int(index)), float(moment)

    def raise_horizon(self, position: Position, moment: float) -> None:
        """Move the horizon forward to `position`, never back.

        The horizon's time never moves back either, so it stays the latest
        commit time of any event that may be missing.
        """
        self._run(
            "raise horizon",
            self._raise_horizon_script,
            keys=[self.meta_key],
            args=[str(position.commit_lsn), str(position.index), repr(moment)],
        )

    def prune(self, max_events: int, max_age_seconds: float, chunk: int = 5000) -> int:
        """Delete events past the retention limits, `chunk` events at a time.

        Like the SQLite journal, each round deletes the oldest events up to
        the last one that is past a limit, and moves the horizon there.
        """
        cutoff = time.time() - max_age_seconds
        deleted = 0
        while True:
            count = self._run("count", self._client.xlen, self.events_key)
            excess = max(0, count - max_events)
            entries = self._run(
                "read oldest events", self._client.xrange, self.events_key, count=chunk
            )
            doomed = [
                (entry_id, float(fields[b"time"]))
                for n, (entry_id, fields) in enumerate(entries)
                if n < excess or float(fields[b"time"]) < cutoff
            ]
            if not doomed:
                return deleted

            last = parse_stream_id(doomed[-1][0])
            latest_time = max(moment for _, moment in doomed)
            deleted += self._run(
                "trim",
                self._trim_script,
                keys=[self.events_key, self.times_key, self.meta_key],
                args=[str(last.commit_lsn), str(last.index), repr(latest_time)],
            )
            if len(doomed) < len(entries) or len(entries) < chunk:
                return deleted

    def stats(self) -> JournalStats:
        """Return the range and size, the size as Redis's MEMORY USAGE estimate."""
        count = self._run("count", self._client.xlen, self.events_key)
        size = 0
        for key in (self.events_key, self.times_key, self.meta_key):
            size += self._run("measure", self._client.memory_usage, key) or 0
        horizon = self.horizon()
        return JournalStats(
            oldest=self.first_position(),
            newest=self.last_position(),
            events=count,
            size_bytes=size,
            horizon=None if horizon is None else horizon[0],
        )
