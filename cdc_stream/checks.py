"""Checks of a database for changes that wal2json would drop or mangle.

wal2json 2.5 drops the UPDATE and DELETE changes of a table without a
replica identity (no primary key and REPLICA IDENTITY DEFAULT, REPLICA
IDENTITY NOTHING, or USING INDEX with the index gone). The server only logs
a WARNING in the walsender, so nothing reaches the client. wal2json also
writes text in the database encoding, which is valid JSON only in UTF8.

`find_replica_identity_issues` works on a loaded catalog and is pure.
`check_database` connects, runs every check and returns structured results
for the `cdc-stream check` command. `log_replica_identity_issues` writes the
WARNING lines that the reader logs when it connects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg2
import psycopg2.extensions

from .catalog import Catalog, TableInfo, load_catalog
from .config import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finding:
    """One problem found by a check, with the statement or step that fixes it."""

    check: str
    # "warning": changes are lost or wrong but streaming works; "error":
    # streaming cannot give correct output.
    severity: str
    # The table, or the database, the finding is about.
    subject: str
    message: str
    fix: str


def find_replica_identity_issues(
    catalog: Catalog, settings: Settings | None = None
) -> list[Finding]:
    """Find streamed tables whose UPDATE and DELETE changes wal2json drops.

    Only permanent ordinary tables and partitions are checked: partitioned
    tables store no rows, and unlogged and temporary tables are not decoded.
    Tables that `settings` does not stream are skipped.
    """
    findings = []
    for table in sorted(catalog.tables.values(), key=lambda t: (t.schema, t.name)):
        if table.kind != "r" or table.persistence != "p":
            continue
        if settings is not None and not _is_streamed(table, settings):
            continue
        reason = _missing_identity_reason(table)
        if reason is not None:
            findings.append(_replica_identity_finding(table, reason))
    return findings


def _is_streamed(table: TableInfo, settings: Settings) -> bool:
    schema, name = table.root if table.root is not None else (table.schema, table.name)
    return settings.streams_table(schema, name)


def _missing_identity_reason(table: TableInfo) -> str | None:
    identity = table.replica_identity
    if identity == "d" and not table.has_primary_key:
        return "has no primary key and REPLICA IDENTITY DEFAULT"
    if identity == "n":
        return "has REPLICA IDENTITY NOTHING"
    if identity == "i" and not table.has_identity_index:
        return "has REPLICA IDENTITY USING INDEX but the index no longer exists"
    return None


def _replica_identity_finding(table: TableInfo, reason: str) -> Finding:
    name = table.qualified_name
    fix = f"ALTER TABLE {name} REPLICA IDENTITY FULL"
    return Finding(
        check="replica_identity",
        severity="warning",
        subject=name,
        message=(
            f"table {name} {reason}: wal2json drops its UPDATE and DELETE "
            "changes without notice"
        ),
        fix=f"run {fix}, or add a primary key",
    )


def log_replica_identity_issues(
    catalog: Catalog, settings: Settings | None = None
) -> list[Finding]:
    """Log a WARNING line per table whose UPDATE and DELETE changes are dropped."""
    findings = find_replica_identity_issues(catalog, settings)
    for finding in findings:
        logger.warning("%s; %s", finding.message, finding.fix)
    return findings


def find_encoding_issue(conn: psycopg2.extensions.connection) -> Finding | None:
    """Report a database encoding other than UTF8."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_catalog.current_database(), pg_catalog.getdatabaseencoding()"
        )
        database, encoding = cur.fetchone()
    conn.rollback()
    if encoding == "UTF8":
        return None
    return Finding(
        check="encoding",
        severity="error",
        subject=database,
        message=(
            f"database {database} uses encoding {encoding}: wal2json writes text "
            "in the database encoding, so values that are not ASCII arrive as "
            "U+FFFD and events carry invalid_utf8"
        ),
        fix="stream a database created with ENCODING 'UTF8'",
    )


def check_database(dsn: str, settings: Settings | None = None) -> list[Finding]:
    """Connect to `dsn`, run every check and return the findings."""
    conn = psycopg2.connect(
        dsn,
        connect_timeout=10,
        application_name="cdc-stream check",
        options="-c search_path=pg_catalog",
    )
    try:
        findings: list[Finding] = []
        encoding = find_encoding_issue(conn)
        if encoding is not None:
            findings.append(encoding)
        findings.extend(find_replica_identity_issues(load_catalog(conn), settings))
        return findings
    finally:
        conn.close()
