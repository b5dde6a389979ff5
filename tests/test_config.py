"""Settings from the TOML file and the environment (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdc_stream.config import Settings
from cdc_stream.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "conf" / "cdc-stream.example.toml"


def test_example_file_loads():
    settings = Settings.from_env({"CDC_CONFIG": str(EXAMPLE)})

    assert settings.slot_name == "cdc_stream"
    assert settings.journal_backend == "sqlite"
    assert settings.journal_max_events == 1_000_000
    assert settings.channel_for("public", "user_balances") == "balance_changes"
    assert settings.channel_for("public", "markets") == "markets_changes"


def test_environment_overrides_file():
    settings = Settings.from_env(
        {
            "CDC_CONFIG": str(EXAMPLE),
            "DATABASE_URL": "dbname=other",
            "CDC_SLOT_NAME": "other_slot",
            "CDC_HEARTBEAT_SECONDS": "2.5",
            "CDC_CORS_ORIGINS": "https://a.example, https://b.example",
        }
    )

    assert settings.database_url == "dbname=other"
    assert settings.slot_name == "other_slot"
    assert settings.heartbeat_seconds == 2.5
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert settings.journal_path == ".cdc-stream/other_slot.journal.sqlite3"


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ("[slot]\nnmae = 'x'\n", "unknown key slot.nmae"),
        ("[strem]\n", "unknown section [strem]"),
        ("[stream]\nheartbeat_seconds = 0\n", "invalid stream.heartbeat_seconds"),
        ("[slot]\ncreate = 'yes'\n", "invalid slot.create 'yes'"),
        ("[tables]\ninclude = 'orders'\n", "invalid tables.include 'orders'"),
        ("[channels]\n'public.orders' = ''\n", "invalid channel ''"),
        ("[stream\n", "invalid TOML"),
    ],
)
def test_invalid_file_names_key(tmp_path, document, expected):
    path = tmp_path / "cdc.toml"
    path.write_text(document, encoding="utf-8")

    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"CDC_CONFIG": str(path), "DATABASE_URL": "dbname=x"})

    assert expected in str(raised.value)


def test_missing_file_named(tmp_path):
    missing = tmp_path / "absent.toml"

    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"CDC_CONFIG": str(missing), "DATABASE_URL": "dbname=x"})

    assert str(missing) in str(raised.value)
    assert "CDC_CONFIG" in str(raised.value)


def test_heartbeat_must_be_number():
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"DATABASE_URL": "dbname=x", "CDC_HEARTBEAT_SECONDS": "soon"})

    assert "CDC_HEARTBEAT_SECONDS" in str(raised.value)
    assert "'soon'" in str(raised.value)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CDC_CORS_ORIGINS": "*"}, "invalid cors.origins '*' (CDC_CORS_ORIGINS)"),
        ({"CDC_CORS_ORIGINS": "dash.example.com"}, "'dash.example.com'"),
        ({"CDC_CORS_ORIGINS": "https://a.example/app"}, "with no path"),
        ({"CDC_HEARTBEAT_SECONDS": "nan"}, "CDC_HEARTBEAT_SECONDS"),
        ({"CDC_HEARTBEAT_SECONDS": "inf"}, "expected a positive number"),
        ({"CDC_HEARTBEAT_SECONDS": "0"}, "CDC_HEARTBEAT_SECONDS"),
    ],
)
def test_invalid_environment_names_variable(env, expected):
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"DATABASE_URL": "dbname=x", **env})

    assert expected in str(raised.value)


def test_invalid_database_url_hides_value():
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"DATABASE_URL": "not a url secret-password"})

    assert "invalid DATABASE_URL" in str(raised.value)
    assert "secret-password" not in str(raised.value)


def test_wildcard_origin_without_credentials():
    settings = Settings(
        database_url="dbname=x", cors_origins=("*",), cors_allow_credentials=False
    )

    assert settings.cors_origins == ("*",)


def test_table_without_schema_matches_every_schema():
    settings = Settings(database_url="dbname=x", include_tables=("items",))

    assert settings.streams_table("public", "items")
    assert settings.streams_table("sales", "items")
    assert not settings.streams_table("public", "orders")


def test_table_selection_patterns():
    settings = Settings(
        database_url="dbname=x",
        include_tables=("public.*", "audit.events"),
        exclude_tables=("public.secret_*",),
    )

    assert settings.streams_table("public", "orders")
    assert settings.streams_table("audit", "events")
    assert not settings.streams_table("audit", "logins")
    assert not settings.streams_table("public", "secret_keys")
