"""Every pre-flight check of a database, for the `cdc-stream check` command."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

import psycopg2
import psycopg2.extensions

from . import checks, privileges
from . import slot as slot_checks
from .config import Settings
from .errors import SetupError

PASS = "pass"
WARN = "warn"
FAIL = "fail"

# Creating a logical slot waits for running transactions to end.
PLUGIN_PROBE_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one check: `pass`, `warn` or `fail`, and what to change."""

    name: str
    status: str
    detail: str
    fix: str = ""


def run_checks(settings: Settings) -> list[CheckResult]:
    """Run every check against the configured database."""
    try:
        conn = psycopg2.connect(
            settings.database_url,
            connect_timeout=10,
            application_name="cdc-stream check",
            options=f"-c search_path=pg_catalog "
            f"-c statement_timeout={PLUGIN_PROBE_TIMEOUT_MS}",
        )
    except psycopg2.OperationalError as error:
        return [
            CheckResult(
                "connection",
                FAIL,
                str(error).strip(),
                "check DATABASE_URL, that the server is running, and that "
                "pg_hba.conf admits this role",
            )
        ]
    conn.autocommit = True

    target = slot_checks.describe_target(settings.database_url)
    results = [CheckResult("connection", PASS, target)]
    try:
        with conn.cursor() as cur:
            results.append(_setup_check("wal_level", cur, slot_checks.check_wal_level))
            results.append(_plugin_list_check(cur))
            results.append(
                _setup_check(
                    "replication role", cur, slot_checks.check_replication_role
                )
            )
            results.extend(_capacity_checks(cur))
        results.extend(_slot_checks(conn, settings))
    finally:
        conn.close()

    results.extend(_identity_checks(settings))
    results.extend(_privilege_checks(settings))
    return results


def _setup_check(
    name: str,
    cur: psycopg2.extensions.cursor,
    check: Callable[[psycopg2.extensions.cursor], str | None],
) -> CheckResult:
    try:
        value = check(cur)
    except SetupError as error:
        return CheckResult(name, FAIL, str(error).split(":")[0], str(error))
    return CheckResult(name, PASS, str(value))


def _plugin_list_check(cur: psycopg2.extensions.cursor) -> CheckResult:
    result = _setup_check(
        "output_plugin_libraries", cur, slot_checks.check_plugin_allowed
    )
    if result.status == PASS and result.detail == "None":
        return CheckResult(result.name, PASS, "not present on this server")
    if result.status == PASS and result.detail == slot_checks.UNREADABLE_SETTING:
        return CheckResult(
            result.name,
            WARN,
            "not readable by this role; the wal2json plugin check below tests it",
            "grant pg_read_all_settings to read it, or run check as a superuser",
        )
    return result


def _capacity_checks(cur: psycopg2.extensions.cursor) -> list[CheckResult]:
    cur.execute(
        "SELECT current_setting('max_replication_slots')::int, "
        "(SELECT count(*) FROM pg_replication_slots), "
        "current_setting('max_wal_senders')::int, "
        "(SELECT count(*) FROM pg_stat_replication)"
    )
    max_slots, slots, max_senders, senders = cur.fetchone()
    slot_result = CheckResult("replication slots", PASS, f"{slots} of {max_slots} used")
    if slots >= max_slots:
        slot_result = CheckResult(
            "replication slots",
            FAIL,
            f"all {max_slots} in use",
            "raise max_replication_slots and restart, or drop an unused slot",
        )
    sender_result = CheckResult("wal senders", PASS, f"{senders} of {max_senders} used")
    if senders >= max_senders:
        sender_result = CheckResult(
            "wal senders",
            FAIL,
            f"all {max_senders} in use",
            "raise max_wal_senders and restart PostgreSQL",
        )
    return [slot_result, sender_result]


def _slot_checks(
    conn: psycopg2.extensions.connection, settings: Settings
) -> list[CheckResult]:
    name = f"slot {settings.slot_name}"
    slot = slot_checks.find_slot(conn, settings.slot_name)
    if slot is None:
        probe = _probe_plugin(conn)
        state = "missing; created on first start" if settings.create_slot else "missing"
        status = PASS if settings.create_slot else FAIL
        fix = "" if settings.create_slot else "set [slot] create = true"
        return [probe, CheckResult(name, status, state, fix)]

    try:
        slot_checks.check_slot(conn, settings.slot_name, create=False)
    except slot_checks.SlotInUseError:
        # A running cdc-stream streams its slot, which is the normal state.
        return [
            CheckResult(
                name,
                PASS,
                f"streamed by server process {slot.active_pid}, "
                f"confirmed {slot.confirmed_flush_lsn}",
            )
        ]
    except SetupError as error:
        return [CheckResult(name, FAIL, str(error).split(":")[0], str(error))]
    return [
        CheckResult(
            name,
            PASS,
            f"{slot.plugin}, confirmed {slot.confirmed_flush_lsn}, "
            f"wal_status {slot.wal_status}",
        )
    ]


def _probe_plugin(conn: psycopg2.extensions.connection) -> CheckResult:
    """Create and drop a temporary wal2json slot to prove the plugin loads."""
    probe = f"cdc_check_{uuid.uuid4().hex[:12]}"
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_create_logical_replication_slot(%s, %s, true)",
                (probe, slot_checks.PLUGIN),
            )
            cur.execute("SELECT pg_drop_replication_slot(%s)", (probe,))
    except psycopg2.errors.QueryCanceled:
        return CheckResult(
            "wal2json plugin",
            WARN,
            "not verified: creating a test slot waited on a running transaction",
        )
    except psycopg2.Error as error:
        problem = slot_checks.plugin_error(error)
        return CheckResult(
            "wal2json plugin", FAIL, str(problem).split(":")[0], str(problem)
        )
    return CheckResult("wal2json plugin", PASS, "a test slot was created and dropped")


def _identity_checks(settings: Settings) -> list[CheckResult]:
    findings = checks.check_database(settings.database_url, settings)
    if not findings:
        return [CheckResult("replica identity", PASS, "every streamed table")]
    return [
        CheckResult(
            f"{finding.check} {finding.subject}",
            # Both kinds lose or corrupt changes, so the check fails.
            FAIL,
            finding.message,
            finding.fix,
        )
        for finding in findings
    ]


def _privilege_checks(settings: Settings) -> list[CheckResult]:
    excess = privileges.check_database(settings.database_url, settings)
    if not excess:
        return [CheckResult("privileges", PASS, "no rights beyond need")]
    return [
        CheckResult(f"privilege {item.subject}", WARN, item.message, item.fix)
        for item in excess
    ]
