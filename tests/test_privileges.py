"""Reports of rights beyond what the streaming role needs, on a real server."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg2
import pytest

from cdc_stream.config import Settings
from cdc_stream.privileges import excess_privileges
from streaming import execute

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"


@pytest.fixture
def demo_db(database: str) -> str:
    execute(database, (SQL_DIR / "demo_schema.sql").read_text(encoding="utf-8"))
    return database


@pytest.fixture
def make_role(demo_db: str):
    """Create uniquely named roles; drop them and what they own afterwards."""
    created: list[str] = []

    def create(attributes: str = "", *grants: str) -> str:
        name = f"cdc_priv_{uuid.uuid4().hex[:10]}"
        statements = [f"CREATE ROLE {name} LOGIN REPLICATION {attributes}"]
        statements += [
            f"GRANT USAGE ON SCHEMA public TO {name}",
            f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {name}",
        ]
        statements += [grant.format(role=name) for grant in grants]
        execute(demo_db, *statements)
        created.append(name)
        return name

    yield create

    for name in created:
        execute(
            demo_db,
            f"REASSIGN OWNED BY {name} TO CURRENT_USER",
            f"DROP OWNED BY {name}",
        )
        execute(demo_db, f"DROP ROLE {name}")


def findings_for(dsn: str, role: str, settings: Settings | None = None):
    conn = psycopg2.connect(dsn)
    try:
        return excess_privileges(conn, settings or Settings(database_url=dsn), role)
    finally:
        conn.close()


def test_setup_role_script_is_minimal(demo_db):
    execute(demo_db, (SQL_DIR / "setup_role.sql").read_text(encoding="utf-8"))

    assert findings_for(demo_db, "cdc_stream") == []


def test_least_privilege_role_clean(demo_db, make_role):
    role = make_role()

    assert findings_for(demo_db, role) == []


def test_superuser_reported_alone(demo_db, make_role):
    role = make_role("SUPERUSER")

    (finding,) = findings_for(demo_db, role)

    assert finding.kind == "attribute"
    assert finding.subject == "SUPERUSER"
    assert "sql/setup_role.sql" in finding.fix
    assert f'ALTER ROLE "{role}" NOSUPERUSER;' in finding.fix
    assert "only if another superuser exists" in finding.fix


def test_role_attributes_reported(demo_db, make_role):
    role = make_role("CREATEDB CREATEROLE BYPASSRLS")

    subjects = [f.subject for f in findings_for(demo_db, role)]

    assert subjects == ["CREATEROLE", "CREATEDB", "BYPASSRLS"]


def test_write_privileges_reported(demo_db, make_role):
    role = make_role("", "GRANT INSERT, UPDATE ON orders TO {role}")

    (finding,) = findings_for(demo_db, role)

    assert finding.kind == "table_write"
    assert finding.subject == "public.orders"
    assert "INSERT, UPDATE" in finding.message
    assert finding.fix == (
        f'REVOKE INSERT, UPDATE ON TABLE "public"."orders" FROM "{role}";'
    )


def test_write_on_unstreamed_table_ignored(demo_db, make_role):
    role = make_role("", "GRANT DELETE ON trades TO {role}")
    settings = Settings(database_url=demo_db, exclude_tables=("public.trades",))

    assert findings_for(demo_db, role, settings) == []


def test_ownership_and_schema_create_reported(demo_db, make_role):
    role = make_role(
        "",
        "ALTER TABLE trades OWNER TO {role}",
        "GRANT CREATE ON SCHEMA public TO {role}",
        "GRANT pg_write_server_files TO {role}",
    )

    found = {(f.kind, f.subject) for f in findings_for(demo_db, role)}

    assert found == {
        ("table_owner", "public.trades"),
        ("schema_create", "public"),
        ("membership", "pg_write_server_files"),
    }


def test_database_owner_reported(demo_db, make_role):
    role = make_role()
    dbname = psycopg2.extensions.parse_dsn(demo_db)["dbname"]
    execute(demo_db, f"ALTER DATABASE {dbname} OWNER TO {role}")
    try:
        kinds = [f.kind for f in findings_for(demo_db, role)]
    finally:
        execute(demo_db, f"ALTER DATABASE {dbname} OWNER TO CURRENT_USER")

    assert "database_owner" in kinds
