"""Start-up checks of the database and the replication slot.

Each failed check raises `SetupError` with what to change. The checks run on a
normal connection before streaming starts, and again on each reconnection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from .errors import SetupError, SlotInUseError

logger = logging.getLogger(__name__)

PLUGIN = "wal2json"

# Return value of `check_plugin_allowed` when the role may not read the setting.
UNREADABLE_SETTING = "<not readable by this role>"


@dataclass(frozen=True)
class SlotInfo:
    """A logical replication slot as `pg_replication_slots` shows it."""

    name: str
    plugin: str
    database: str
    active_pid: int | None
    confirmed_flush_lsn: str | None
    restart_lsn: str | None
    wal_status: str | None


def describe_target(dsn: str) -> str:
    """Describe a DSN for logs as user@host:port/dbname, without the password."""
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "<invalid DATABASE_URL>"
    host = params.get("host", "<default socket>")
    port = params.get("port", "5432")
    return f"{params.get('user', '')}@{host}:{port}/{params.get('dbname', '')}"


def check_server(conn: psycopg2.extensions.connection) -> None:
    """Check wal_level, the plugin allow-list and the role's REPLICATION right."""
    with conn.cursor() as cur:
        check_wal_level(cur)
        check_plugin_allowed(cur)
        check_replication_role(cur)


def check_wal_level(cur: psycopg2.extensions.cursor) -> str:
    """Return wal_level; raise `SetupError` unless it is logical."""
    cur.execute("SELECT current_setting('wal_level')")
    (wal_level,) = cur.fetchone()
    if wal_level != "logical":
        raise SetupError(
            f"wal_level is {wal_level!r} but logical decoding needs 'logical': "
            "run ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL"
        )
    return wal_level


def check_plugin_allowed(cur: psycopg2.extensions.cursor) -> str | None:
    """Return output_plugin_libraries, or None on builds without it.

    Some PostgreSQL builds allow only the output plugins listed in this
    setting. It is a plain string, so it is matched item by item. Only
    superusers and members of pg_read_all_settings may read it. For other
    roles the check is skipped, so a rejection shows up when the slot is used.
    """
    try:
        cur.execute("SELECT current_setting('output_plugin_libraries', true)")
    except psycopg2.errors.InsufficientPrivilege:
        cur.connection.rollback()
        return UNREADABLE_SETTING
    (setting,) = cur.fetchone()
    if setting is None:
        return None
    allowed = [item.strip() for item in setting.split(",")]
    if PLUGIN not in allowed:
        raise SetupError(
            f"output_plugin_libraries is {setting!r} and does not allow "
            f"{PLUGIN}: add the line output_plugin_libraries = "
            f"'{setting}, {PLUGIN}' to postgresql.conf, then reload"
        )
    return setting


def check_replication_role(cur: psycopg2.extensions.cursor) -> str:
    """Return the connected role; raise `SetupError` unless it may replicate."""
    cur.execute(
        "SELECT rolname, rolreplication OR rolsuper FROM pg_roles "
        "WHERE rolname = current_user"
    )
    role, can_replicate = cur.fetchone()
    if not can_replicate:
        raise SetupError(
            f"role {role!r} lacks the REPLICATION attribute: "
            f"run ALTER ROLE {quote_identifier(role)} WITH REPLICATION"
        )
    return role


def find_slot(conn: psycopg2.extensions.connection, name: str) -> SlotInfo | None:
    """Return the slot named `name`, or None when it does not exist."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT slot_name, plugin, database, active_pid, "
            "confirmed_flush_lsn::text, restart_lsn::text, wal_status "
            "FROM pg_replication_slots WHERE slot_name = %s",
            (name,),
        )
        row = cur.fetchone()
    if row is None:
        return None
    return SlotInfo(*row)


def check_slot(
    conn: psycopg2.extensions.connection, name: str, create: bool
) -> SlotInfo:
    """Check the slot can be streamed by this database, creating it if allowed."""
    slot = find_slot(conn, name)
    if slot is None:
        if not create:
            raise SetupError(
                f"replication slot {name!r} does not exist: create it with "
                f"SELECT pg_create_logical_replication_slot('{name}', '{PLUGIN}'), "
                "or set [slot] create = true"
            )
        return create_slot(conn, name)

    database = conn.get_dsn_parameters().get("dbname", "")
    if slot.plugin != PLUGIN:
        raise SetupError(
            f"replication slot {name!r} uses plugin {slot.plugin!r}, not {PLUGIN}: "
            "choose another CDC_SLOT_NAME, or drop that slot if nothing uses it"
        )
    if slot.database != database:
        raise SetupError(
            f"replication slot {name!r} belongs to database {slot.database!r}, "
            f"not {database!r}: choose another CDC_SLOT_NAME"
        )
    if slot.wal_status == "lost":
        raise SetupError(
            f"replication slot {name!r} is invalidated (wal_status = lost): the "
            "WAL it needed was removed, so changes since then are lost. Set "
            "[slot] recreate = true to replace it and tell clients that history "
            "was lost"
        )
    if slot.active_pid is not None:
        raise SlotInUseError(
            f"replication slot {name!r} is in use by server process "
            f"{slot.active_pid}: stop the other reader or set another CDC_SLOT_NAME"
        )
    return slot


def create_slot(conn: psycopg2.extensions.connection, name: str) -> SlotInfo:
    """Create the logical slot with wal2json."""
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_create_logical_replication_slot(%s, %s)", (name, PLUGIN)
            )
        conn.commit()
    except psycopg2.errors.DuplicateObject:
        conn.rollback()
    except psycopg2.Error as error:
        conn.rollback()
        raise plugin_error(error) from None
    logger.info("created replication slot %s with %s", name, PLUGIN)

    slot = find_slot(conn, name)
    if slot is None:
        raise SetupError(f"replication slot {name!r} vanished right after creation")
    return slot


def drop_slot(conn: psycopg2.extensions.connection, name: str) -> None:
    """Drop a replication slot."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_drop_replication_slot(%s)", (name,))
    conn.commit()
    logger.warning("dropped replication slot %s", name)


def plugin_error(error: psycopg2.Error) -> SetupError:
    """Translate a server error about the output plugin into what to change."""
    message = (error.pgerror or str(error)).strip()
    if "could not access file" in message and PLUGIN in message:
        return SetupError(
            f"the {PLUGIN} plugin is not installed on the database server: "
            "install it (Debian: apt-get install postgresql-15-wal2json)"
        )
    if "may not be used as an output plugin" in message:
        return SetupError(
            f"the server does not allow {PLUGIN} as output plugin: add it to "
            "output_plugin_libraries in postgresql.conf, then reload"
        )
    return SetupError(f"cannot use the replication slot: {message}")


def quote_identifier(name: str) -> str:
    """Quote an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'
