"""Columns of the streamed tables, read from pg_attribute and cached.

Row filters and column lists are checked against these columns, and a
filter's values are compared by the column's type. The query is one fixed
statement with no request input. It runs on a normal psycopg2 connection in
a worker thread, never on the event loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import psycopg2

from .config import Settings

logger = logging.getLogger(__name__)

# Ordinary and partitioned tables; partitions are left out because their
# changes are reported under the root table. A domain's type is its base
# type, one level deep.
_COLUMNS_QUERY = """
SELECT n.nspname, c.relname, a.attname, t.typcategory, t.typname,
       coalesce(a.attnum = ANY (i.indkey), false) AS in_primary_key
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
JOIN pg_catalog.pg_type declared ON declared.oid = a.atttypid
JOIN pg_catalog.pg_type t ON t.oid = CASE
        WHEN declared.typtype = 'd' THEN declared.typbasetype ELSE declared.oid END
LEFT JOIN pg_catalog.pg_index i ON i.indrelid = c.oid AND i.indisprimary
WHERE c.relkind IN ('r', 'p')
  AND NOT c.relispartition
  AND a.attnum > 0
  AND NOT a.attisdropped
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%'
ORDER BY n.nspname, c.relname, a.attnum
"""

CACHE_SECONDS = 30.0
# A lookup of a column the cache lacks reads the catalog again, at most this
# often, so a column added a moment ago is found.
MISS_REFRESH_SECONDS = 1.0


@dataclass(frozen=True)
class Column:
    """A column's name and how its values compare."""

    name: str
    # pg_type.typcategory of the column's type, domains resolved to their base
    # type: N numeric, B boolean, D date and time, S string, and so on.
    category: str
    type_name: str
    in_primary_key: bool = False

    @property
    def kind(self) -> str:
        """Comparison kind: number, boolean, time or text."""
        if self.category == "N" and self.type_name != "money":
            return "number"
        if self.category == "B":
            return "boolean"
        if self.type_name in ("date", "timestamp", "timestamptz"):
            return "time"
        return "text"


@dataclass(frozen=True)
class Table:
    """A streamed table and the channel its events use."""

    schema: str
    name: str
    channel: str
    columns: Mapping[str, Column]

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def key_columns(self) -> list[str]:
        return [c.name for c in self.columns.values() if c.in_primary_key]


class TableColumns:
    """Cache of the streamed tables' columns, refreshed in a worker thread."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._tables: dict[tuple[str, str], Table] = {}
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()

    async def tables(self, *, fresh: bool = False) -> list[Table]:
        """Return the streamed tables, reading the catalog if the cache is old.

        `fresh` reads again when the cache is older than MISS_REFRESH_SECONDS.
        Raises psycopg2.Error when the database cannot be reached.
        """
        max_age = MISS_REFRESH_SECONDS if fresh else CACHE_SECONDS
        if time.monotonic() - self._loaded_at > max_age:
            async with self._lock:
                # Another request may have refreshed it while this one waited.
                if time.monotonic() - self._loaded_at > max_age:
                    self._tables = await asyncio.to_thread(self._load)
                    self._loaded_at = time.monotonic()
        return list(self._tables.values())

    def _load(self) -> dict[tuple[str, str], Table]:
        conn = psycopg2.connect(
            self._settings.database_url,
            connect_timeout=10,
            application_name="cdc-stream catalog",
        )
        try:
            with conn.cursor() as cur:
                cur.execute(_COLUMNS_QUERY)
                rows = cur.fetchall()
        finally:
            conn.close()
        return self._build(rows)

    def _build(self, rows: list[tuple[str, str, str, str, str, bool]]) -> dict:
        columns: dict[tuple[str, str], dict[str, Column]] = {}
        for schema, table, name, category, type_name, in_key in rows:
            if not self._settings.streams_table(schema, table):
                continue
            columns.setdefault((schema, table), {})[name] = Column(
                name, category, type_name, bool(in_key)
            )
        return {
            key: Table(key[0], key[1], self._settings.channel_for(*key), found)
            for key, found in columns.items()
        }
