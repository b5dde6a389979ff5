"""The `cdc-stream check` command against real databases."""

from __future__ import annotations

from conftest import REPO_ROOT
from streaming import app_environment, execute
from test_cli import run_cli


def result_line(output: str, name: str) -> str:
    for line in output.splitlines():
        if line[6:].startswith(name):
            return line
    raise AssertionError(f"no line for {name!r} in:\n{output}")


def test_check_fails_on_table_without_identity(database, tmp_path):
    execute(database, "CREATE TABLE events_nokey (a int, b text)")
    env = app_environment(database, tmp_path)

    result = run_cli("check", env=env)

    assert result.returncode == 1
    line = result_line(result.stdout, "replica_identity public.events_nokey")
    assert line.startswith("FAIL")
    assert "REPLICA IDENTITY FULL" in result.stdout
    assert result_line(result.stdout, "wal_level").startswith("ok")
    assert result_line(result.stdout, "wal2json plugin").startswith("ok")


def test_check_passes_for_least_privilege_role(database, tmp_path):
    execute(database, (REPO_ROOT / "sql" / "demo_schema.sql").read_text())
    execute(database, (REPO_ROOT / "sql" / "setup_role.sql").read_text())
    streamer = database.replace("user=postgres", "user=cdc_stream")
    env = app_environment(streamer, tmp_path)

    result = run_cli("check", env=env)

    assert result.returncode == 0, result.stdout + result.stderr
    assert result_line(result.stdout, "privileges").startswith("ok")
    assert result_line(result.stdout, "replica identity").startswith("ok")
    assert result_line(result.stdout, "replication role").startswith("ok")
    plugins = result_line(result.stdout, "output_plugin_libraries")
    assert plugins.startswith("WARN")
    assert "not readable by this role" in plugins
    assert result_line(result.stdout, "wal2json plugin").startswith("ok")


def test_check_reports_unreachable_database(tmp_path):
    env = app_environment("host=127.0.0.1 port=1 user=nobody dbname=none", tmp_path)

    result = run_cli("check", env=env)

    assert result.returncode == 1
    assert result_line(result.stdout, "connection").startswith("FAIL")
    assert "pg_hba.conf" in result.stdout


def test_setup_role_fits_any_database(database, tmp_path):
    execute(database, "CREATE TABLE invoices (id int PRIMARY KEY, total numeric)")

    execute(database, (REPO_ROOT / "sql" / "setup_role.sql").read_text())
    streamer = database.replace("user=postgres", "user=cdc_stream")
    result = run_cli("check", env=app_environment(streamer, tmp_path))

    assert result.returncode == 0, result.stdout + result.stderr
    assert result_line(result.stdout, "privileges").startswith("ok")
