"""Find rights of the streaming role beyond what streaming needs.

The role needs LOGIN, REPLICATION, CONNECT on the database, USAGE on the
schemas and SELECT on the streamed tables, as sql/setup_role.sql grants.
`excess_privileges` lists every further right that would let a stolen
password change data or the server. It checks role attributes, write
privileges and ownership of the streamed tables, ownership of the database,
CREATE on the tables' schemas, and membership in predefined roles that
reach the server's files or programs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg2
import psycopg2.extensions
from psycopg2.extensions import quote_ident

from .config import Settings

logger = logging.getLogger(__name__)

WRITE_PRIVILEGES = ("INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
ROLE_ATTRIBUTES = {
    "rolsuper": ("SUPERUSER", "NOSUPERUSER"),
    "rolcreaterole": ("CREATEROLE", "NOCREATEROLE"),
    "rolcreatedb": ("CREATEDB", "NOCREATEDB"),
    "rolbypassrls": ("BYPASSRLS", "NOBYPASSRLS"),
}
# Predefined roles whose members reach data or the server beyond the tables.
POWERFUL_ROLES = (
    "pg_write_all_data",
    "pg_read_server_files",
    "pg_write_server_files",
    "pg_execute_server_program",
)

_TABLES_QUERY = """
SELECT n.nspname, c.relname, c.oid,
       pg_catalog.pg_has_role(%(role)s, c.relowner, 'USAGE') AS owns
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%%'
ORDER BY n.nspname, c.relname
"""


@dataclass(frozen=True)
class ExcessPrivilege:
    """One right the role has and does not need, with the statement that drops it."""

    # attribute, membership, database_owner, schema_create, table_owner or
    # table_write.
    kind: str
    # The role attribute, role, database, schema or table concerned.
    subject: str
    message: str
    fix: str


def excess_privileges(
    conn: psycopg2.extensions.connection,
    settings: Settings,
    role: str | None = None,
) -> list[ExcessPrivilege]:
    """Return the rights of `role` (default: the connected role) beyond need.

    Tables are those `settings` streams. A superuser gets one finding for
    the attribute, because it bypasses every privilege check below.
    """
    with conn.cursor() as cur:
        if role is None:
            cur.execute("SELECT current_user")
            (role,) = cur.fetchone()
        findings = _attribute_findings(cur, role)
        if any(f.subject == "SUPERUSER" for f in findings):
            return [_superuser_finding(role, cur)]
        findings += _membership_findings(cur, role)
        findings += _database_findings(cur, role)
        tables = _streamed_tables(cur, role, settings)
        findings += _schema_findings(cur, role, sorted({t[0] for t in tables}))
        findings += _table_findings(cur, role, tables)
    return findings


def check_database(dsn: str, settings: Settings) -> list[ExcessPrivilege]:
    """Connect with `dsn` and return the connected role's excess rights."""
    conn = psycopg2.connect(
        dsn, connect_timeout=10, application_name="cdc-stream check"
    )
    try:
        return excess_privileges(conn, settings)
    finally:
        conn.close()


def _attribute_findings(
    cur: psycopg2.extensions.cursor, role: str
) -> list[ExcessPrivilege]:
    columns = ", ".join(ROLE_ATTRIBUTES)
    cur.execute(
        f"SELECT {columns} FROM pg_catalog.pg_roles WHERE rolname = %s", (role,)
    )
    row = cur.fetchone()
    if row is None:
        raise ValueError(f"role {role!r} not found")
    findings = []
    for has_it, (attribute, removal) in zip(row, ROLE_ATTRIBUTES.values(), strict=True):
        if has_it:
            findings.append(
                ExcessPrivilege(
                    "attribute",
                    attribute,
                    f"role {role} has {attribute}, which streaming does not need",
                    f"ALTER ROLE {quote_ident(role, cur)} {removal};",
                )
            )
    return findings


def _superuser_finding(role: str, cur: psycopg2.extensions.cursor) -> ExcessPrivilege:
    # Removing SUPERUSER from a role such as postgres can leave the cluster
    # with no superuser at all, so the fix is a dedicated role first.
    quoted = quote_ident(role, cur)
    return ExcessPrivilege(
        "attribute",
        "SUPERUSER",
        f"role {role} is a superuser, which streaming does not need",
        "stream as a dedicated role such as the one sql/setup_role.sql "
        f"creates; remove the attribute (ALTER ROLE {quoted} NOSUPERUSER;) only "
        "if another superuser exists",
    )


def _membership_findings(
    cur: psycopg2.extensions.cursor, role: str
) -> list[ExcessPrivilege]:
    cur.execute(
        "SELECT b.rolname FROM pg_catalog.pg_roles b "
        "WHERE b.rolname = ANY(%s) AND pg_catalog.pg_has_role(%s, b.oid, 'MEMBER') "
        "ORDER BY b.rolname",
        (list(POWERFUL_ROLES), role),
    )
    return [
        ExcessPrivilege(
            "membership",
            granted,
            f"role {role} is a member of {granted}",
            f"REVOKE {quote_ident(granted, cur)} FROM {quote_ident(role, cur)};",
        )
        for (granted,) in cur.fetchall()
    ]


def _database_findings(
    cur: psycopg2.extensions.cursor, role: str
) -> list[ExcessPrivilege]:
    cur.execute(
        "SELECT d.datname FROM pg_catalog.pg_database d "
        "WHERE d.datname = current_database() "
        "AND pg_catalog.pg_has_role(%s, d.datdba, 'USAGE')",
        (role,),
    )
    row = cur.fetchone()
    if row is None:
        return []
    return [
        ExcessPrivilege(
            "database_owner",
            row[0],
            f"role {role} owns database {row[0]} (or is a member of its owner)",
            f"ALTER DATABASE {quote_ident(row[0], cur)} OWNER TO <an admin role>;",
        )
    ]


def _streamed_tables(
    cur: psycopg2.extensions.cursor, role: str, settings: Settings
) -> list[tuple[str, str, int, bool]]:
    cur.execute(_TABLES_QUERY, {"role": role})
    return [row for row in cur.fetchall() if settings.streams_table(row[0], row[1])]


def _schema_findings(
    cur: psycopg2.extensions.cursor, role: str, schemas: list[str]
) -> list[ExcessPrivilege]:
    findings = []
    for schema in schemas:
        cur.execute(
            "SELECT pg_catalog.has_schema_privilege(%s::name, %s::text, 'CREATE')",
            (role, schema),
        )
        if cur.fetchone()[0]:
            findings.append(
                ExcessPrivilege(
                    "schema_create",
                    schema,
                    f"role {role} may create objects in schema {schema}",
                    f"REVOKE CREATE ON SCHEMA {quote_ident(schema, cur)} "
                    f"FROM {quote_ident(role, cur)};",
                )
            )
    return findings


def _table_findings(
    cur: psycopg2.extensions.cursor,
    role: str,
    tables: list[tuple[str, str, int, bool]],
) -> list[ExcessPrivilege]:
    findings = []
    for schema, table, oid, owns in tables:
        name = f"{quote_ident(schema, cur)}.{quote_ident(table, cur)}"
        if owns:
            findings.append(
                ExcessPrivilege(
                    "table_owner",
                    f"{schema}.{table}",
                    f"role {role} owns table {schema}.{table} (or is a member of "
                    "its owner), so it may change or drop it",
                    f"ALTER TABLE {name} OWNER TO <an admin role>;",
                )
            )
            continue
        granted = _write_privileges(cur, role, oid)
        if granted:
            listed = ", ".join(granted)
            findings.append(
                ExcessPrivilege(
                    "table_write",
                    f"{schema}.{table}",
                    f"role {role} has {listed} on table {schema}.{table}",
                    f"REVOKE {listed} ON TABLE {name} FROM {quote_ident(role, cur)};",
                )
            )
    return findings


def _write_privileges(
    cur: psycopg2.extensions.cursor, role: str, oid: int
) -> list[str]:
    checks = ", ".join(
        f"pg_catalog.has_table_privilege(%(role)s::name, %(oid)s::oid, '{privilege}')"
        for privilege in WRITE_PRIVILEGES
    )
    cur.execute(f"SELECT {checks}", {"role": role, "oid": oid})
    row = cur.fetchone()
    return [p for p, has_it in zip(WRITE_PRIVILEGES, row, strict=True) if has_it]
