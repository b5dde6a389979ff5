"""Settings: a TOML file named by CDC_CONFIG, overridden by environment variables."""

from __future__ import annotations

import fnmatch
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import psycopg2.extensions

from .authconfig import AUTH_KEYS, AuthSettings, parse_auth, with_environment
from .errors import ConfigError

_SLOT_NAME_RE = re.compile(r"^[a-z0-9_]{1,63}$")
_ORIGIN_RE = re.compile(r"^https?://[^/\s:]+(:[0-9]{1,5})?$")
JOURNAL_BACKENDS = ("sqlite", "redis")

# Each TOML section and the keys it accepts; anything else is rejected, so a
# misspelt key fails loudly instead of being ignored.
_KNOWN_KEYS: dict[str, set[str]] = {
    "database": {"url"},
    "slot": {"name", "create", "recreate"},
    "journal": {
        "backend",
        "url",
        "path",
        "max_events",
        "max_age_seconds",
        "poll_seconds",
    },
    "stream": {
        "heartbeat_seconds",
        "retry_ms",
        "queue_size",
        "transaction_events",
        "stuck_client_seconds",
    },
    "cors": {"origins", "allow_credentials"},
    "tables": {"include", "exclude"},
    "channels": set(),
    "replication": {"status_interval_seconds", "reconnect_max_seconds"},
    "messages": {"prefixes"},
    "types": {"numeric_as_string"},
    "auth": AUTH_KEYS,
    "logging": {"format"},
}
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class Settings:
    """Validated settings of one cdc-stream process."""

    database_url: str
    slot_name: str = "cdc_stream"
    create_slot: bool = True
    recreate_slot: bool = False
    journal_path: str = ""
    journal_max_events: int = 1_000_000
    journal_max_age_seconds: float = 7 * 24 * 3600.0
    journal_poll_seconds: float = 0.1
    # "sqlite" (embedded) or "redis" (distributed). Empty selects "redis" when
    # redis_url is set, else "sqlite".
    journal_backend: str = ""
    redis_url: str = ""
    heartbeat_seconds: float = 30.0
    retry_ms: int = 3000
    queue_size: int = 10_000
    # Seconds a client that overflowed its queue may go on not reading before
    # its connection is closed.
    stuck_client_seconds: float = 30.0
    cors_origins: tuple[str, ...] = ()
    cors_allow_credentials: bool = True
    include_tables: tuple[str, ...] = ()
    exclude_tables: tuple[str, ...] = ()
    channels: Mapping[str, str] = field(default_factory=dict)
    status_interval_seconds: float = 10.0
    reconnect_max_seconds: float = 30.0
    # Prefixes (shell-style patterns) of pg_logical_emit_message messages that
    # are streamed; empty streams none.
    message_prefixes: tuple[str, ...] = ()
    # Send numeric values as JSON strings instead of JSON numbers.
    numeric_as_string: bool = False
    # Send a `transaction` event at each BEGIN and COMMIT.
    transaction_events: bool = False
    auth: AuthSettings = field(default_factory=AuthSettings)
    # "text" or "json" (one JSON object per line).
    log_format: str = "text"

    def __post_init__(self) -> None:
        if not self.database_url:
            raise ConfigError(
                "DATABASE_URL is missing: set it to a libpq connection string, "
                "e.g. postgresql://cdc_stream@127.0.0.1:5432/app"
            )
        _check_database_url(self.database_url)

        if not _SLOT_NAME_RE.match(self.slot_name):
            raise ConfigError(
                f"invalid slot name {self.slot_name!r} (CDC_SLOT_NAME or "
                "[slot] name): use 1 to 63 lowercase letters, digits or underscores"
            )
        if not self.journal_path:
            object.__setattr__(
                self, "journal_path", f".cdc-stream/{self.slot_name}.journal.sqlite3"
            )
        _resolve_journal_backend(self)

        _require_positive("journal.max_events", self.journal_max_events)
        _require_positive("journal.max_age_seconds", self.journal_max_age_seconds)
        _require_positive("journal.poll_seconds", self.journal_poll_seconds)
        _require_positive(
            "stream.heartbeat_seconds (CDC_HEARTBEAT_SECONDS)", self.heartbeat_seconds
        )
        _require_positive("stream.retry_ms", self.retry_ms)
        _require_positive("stream.queue_size", self.queue_size)
        _require_positive("stream.stuck_client_seconds", self.stuck_client_seconds)
        _require_positive(
            "replication.status_interval_seconds", self.status_interval_seconds
        )
        _require_positive(
            "replication.reconnect_max_seconds", self.reconnect_max_seconds
        )
        _check_cors(self.cors_origins, self.cors_allow_credentials)

        if self.log_format not in LOG_FORMATS:
            raise ConfigError(
                f"invalid logging.format {self.log_format!r} (CDC_LOG_FORMAT): "
                f"expected one of {', '.join(LOG_FORMATS)}"
            )

    def streams_table(self, schema: str, table: str) -> bool:
        """Return whether changes of `schema.table` are streamed."""
        name = f"{schema}.{table}"
        if self.include_tables and not _matches_any(name, self.include_tables):
            return False
        return not _matches_any(name, self.exclude_tables)

    def streams_message(self, prefix: str) -> bool:
        """Return whether logical messages with `prefix` are streamed."""
        # A prefix is no table name, so the patterns match the whole prefix.
        return any(
            fnmatch.fnmatchcase(prefix, pattern) for pattern in self.message_prefixes
        )

    def channel_for(self, schema: str, table: str) -> str:
        """Return the channel of a table: configured, else `<table>_changes`."""
        channel = self.channels.get(f"{schema}.{table}")
        if channel is None:
            channel = self.channels.get(table, f"{table}_changes")
        return channel

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from CDC_CONFIG's TOML file and the environment."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}

        config_path = env.get("CDC_CONFIG")
        if config_path:
            values.update(_load_toml(Path(config_path)))

        values.update(_from_environment(env))
        values["auth"] = with_environment(values.get("auth"), env)
        values.setdefault("database_url", "")
        return cls(**values)


def _resolve_journal_backend(settings: Settings) -> None:
    backend = settings.journal_backend
    if not backend:
        backend = "redis" if settings.redis_url else "sqlite"
    if backend not in JOURNAL_BACKENDS:
        raise ConfigError(
            f"invalid journal backend {backend!r} (CDC_JOURNAL_BACKEND or "
            "[journal] backend): use 'sqlite' or 'redis'"
        )
    object.__setattr__(settings, "journal_backend", backend)
    if backend == "redis":
        _check_redis_url(settings.redis_url)


def _check_redis_url(url: str) -> None:
    # The URL may contain a password, so no message repeats it.
    key = "CDC_REDIS_URL or [journal] url"
    if not url:
        raise ConfigError(
            f"the Redis URL ({key}) is missing: set it to the URL of the Redis "
            "server that app servers share, e.g. redis://127.0.0.1:6379/0"
        )
    try:
        parts = urlsplit(url)
        # Reading the port raises ValueError unless it is a number up to 65535.
        _ = parts.port
    except ValueError:
        raise ConfigError(
            f"invalid Redis URL ({key}): the port is not a number from 0 to 65535"
        ) from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"invalid Redis URL ({key}): scheme {parts.scheme!r} is not redis, "
            "rediss or unix. Write e.g. redis://127.0.0.1:6379/0"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"invalid Redis URL ({key}): the host is missing")
    database = parts.path.strip("/")
    if parts.scheme != "unix" and database and not database.isdigit():
        raise ConfigError(
            f"invalid Redis URL ({key}): the path {parts.path!r} is not a "
            "database number such as /0"
        )


def _require_positive(key: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"invalid {key} {value!r}: expected a positive number")


def _check_database_url(url: str) -> None:
    # The parser's own message can quote the string, password included, so it
    # is not repeated.
    try:
        psycopg2.extensions.parse_dsn(url)
    except psycopg2.ProgrammingError:
        raise ConfigError(
            "invalid DATABASE_URL ([database] url): expected a libpq connection "
            "string (host=... dbname=...) or URI (postgresql://user@host/db)"
        ) from None


def _check_cors(origins: tuple[str, ...], allow_credentials: bool) -> None:
    for origin in origins:
        if origin == "*":
            if allow_credentials:
                raise ConfigError(
                    "invalid cors.origins '*' (CDC_CORS_ORIGINS): browsers reject "
                    "a wildcard origin with credentials; list the origins, or set "
                    "[cors] allow_credentials = false"
                )
            continue
        if not _ORIGIN_RE.match(origin):
            raise ConfigError(
                f"invalid cors.origins entry {origin!r} (CDC_CORS_ORIGINS): "
                "expected scheme://host[:port] with no path, e.g. "
                "https://dashboard.example.com"
            )


def _matches_any(name: str, patterns: tuple[str, ...]) -> bool:
    # A pattern without a schema, such as "orders", matches that table in
    # every schema.
    table = name.partition(".")[2]
    return any(
        fnmatch.fnmatchcase(name, pattern)
        if "." in pattern
        else fnmatch.fnmatchcase(table, pattern)
        for pattern in patterns
    )


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(
            f"configuration file {str(path)!r} (CDC_CONFIG) not found"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"invalid TOML in {str(path)!r}: {error}") from None

    for section, content in document.items():
        if section not in _KNOWN_KEYS:
            raise ConfigError(
                f"unknown section [{section}] in {str(path)!r}; "
                f"known sections: {', '.join(sorted(_KNOWN_KEYS))}"
            )
        if not isinstance(content, dict):
            raise ConfigError(f"[{section}] in {str(path)!r} must be a table")
        unknown = set(content) - _KNOWN_KEYS[section]
        if section != "channels" and unknown:
            raise ConfigError(
                f"unknown key {section}.{sorted(unknown)[0]} in {str(path)!r}; "
                f"known keys: {', '.join(sorted(_KNOWN_KEYS[section]))}"
            )
    return _settings_from_document(document)


def _settings_from_document(document: dict[str, Any]) -> dict[str, Any]:
    names = {
        ("database", "url"): "database_url",
        ("slot", "name"): "slot_name",
        ("slot", "create"): "create_slot",
        ("slot", "recreate"): "recreate_slot",
        ("journal", "backend"): "journal_backend",
        ("journal", "url"): "redis_url",
        ("journal", "path"): "journal_path",
        ("journal", "max_events"): "journal_max_events",
        ("journal", "max_age_seconds"): "journal_max_age_seconds",
        ("journal", "poll_seconds"): "journal_poll_seconds",
        ("stream", "heartbeat_seconds"): "heartbeat_seconds",
        ("stream", "retry_ms"): "retry_ms",
        ("stream", "queue_size"): "queue_size",
        ("stream", "stuck_client_seconds"): "stuck_client_seconds",
        ("cors", "origins"): "cors_origins",
        ("cors", "allow_credentials"): "cors_allow_credentials",
        ("tables", "include"): "include_tables",
        ("tables", "exclude"): "exclude_tables",
        ("replication", "status_interval_seconds"): "status_interval_seconds",
        ("replication", "reconnect_max_seconds"): "reconnect_max_seconds",
        ("stream", "transaction_events"): "transaction_events",
        ("messages", "prefixes"): "message_prefixes",
        ("types", "numeric_as_string"): "numeric_as_string",
        ("logging", "format"): "log_format",
    }
    values: dict[str, Any] = {}
    for (section, key), name in names.items():
        if key in document.get(section, {}):
            values[name] = _check_type(f"{section}.{key}", document[section][key])

    channels = document.get("channels", {})
    for table, channel in channels.items():
        if not isinstance(channel, str) or not channel:
            raise ConfigError(
                f"invalid channel {channel!r} for table {table!r} in [channels]: "
                "expected a non-empty string"
            )
    values["channels"] = dict(channels)
    if "auth" in document:
        values["auth"] = parse_auth(document["auth"])
    return values


def _check_type(key: str, value: Any) -> Any:
    if key in ("journal.backend", "journal.url") and not isinstance(value, str):
        raise ConfigError(f"invalid {key}: expected a string")
    if key in ("cors.origins", "tables.include", "tables.exclude", "messages.prefixes"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"invalid {key} {value!r}: expected a list of strings")
        return tuple(value)
    if key in (
        "slot.create",
        "slot.recreate",
        "cors.allow_credentials",
        "stream.transaction_events",
        "types.numeric_as_string",
    ):
        if not isinstance(value, bool):
            raise ConfigError(f"invalid {key} {value!r}: expected true or false")
    return value


def _from_environment(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if env.get("DATABASE_URL"):
        values["database_url"] = env["DATABASE_URL"]
    if env.get("CDC_SLOT_NAME"):
        values["slot_name"] = env["CDC_SLOT_NAME"]
    if env.get("CDC_HEARTBEAT_SECONDS"):
        values["heartbeat_seconds"] = _parse_number(
            "CDC_HEARTBEAT_SECONDS", env["CDC_HEARTBEAT_SECONDS"]
        )
    if env.get("CDC_JOURNAL_PATH"):
        values["journal_path"] = env["CDC_JOURNAL_PATH"]
    if env.get("CDC_JOURNAL_BACKEND"):
        values["journal_backend"] = env["CDC_JOURNAL_BACKEND"]
    if env.get("CDC_REDIS_URL"):
        values["redis_url"] = env["CDC_REDIS_URL"]
    if env.get("CDC_LOG_FORMAT"):
        values["log_format"] = env["CDC_LOG_FORMAT"]
    if "CDC_CORS_ORIGINS" in env:
        origins = [o.strip() for o in env["CDC_CORS_ORIGINS"].split(",")]
        values["cors_origins"] = tuple(o for o in origins if o)
    if "CDC_MESSAGE_PREFIXES" in env:
        prefixes = [p.strip() for p in env["CDC_MESSAGE_PREFIXES"].split(",")]
        values["message_prefixes"] = tuple(p for p in prefixes if p)
    if env.get("CDC_NUMERIC_AS_STRING"):
        values["numeric_as_string"] = _parse_bool(
            "CDC_NUMERIC_AS_STRING", env["CDC_NUMERIC_AS_STRING"]
        )
    if env.get("CDC_TRANSACTION_EVENTS"):
        values["transaction_events"] = _parse_bool(
            "CDC_TRANSACTION_EVENTS", env["CDC_TRANSACTION_EVENTS"]
        )
    return values


def _parse_bool(key: str, text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"invalid {key} {text!r}: expected true or false")


def _parse_number(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(
            f"invalid {key} {text!r}: expected a number of seconds, e.g. 30"
        ) from None
