"""Settings of the `[auth]` section: who may read which channels.

Parsing is pure and raises `ConfigError` naming the key, such as
`auth.tokens[1].hash`. Secrets are never read from the TOML file itself: the
HS256 secret comes from the environment (`CDC_JWT_SECRET`) or from a file,
and static tokens are stored as SHA-256 hashes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .errors import ConfigError

MODES = ("auto", "required", "open")
ALL_CHANNELS = "*"
# HS256 keys shorter than the hash output weaken the signature (RFC 7518,
# section 3.2 requires at least 256 bits).
MIN_SECRET_BYTES = 32

AUTH_KEYS = {
    "mode",
    "tokens",
    "masks",
    "jwt_secret_file",
    "jwt_public_key_file",
    "audience",
    "issuer",
    "channels_claim",
    "cookie_name",
    "leeway_seconds",
}
_TOKEN_KEYS = {"name", "hash", "channels", "claims"}
_MASK_KEYS = {"channel", "columns", "claim"}
_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_COOKIE_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


@dataclass(frozen=True)
class StaticToken:
    """A token from the configuration, stored as the SHA-256 hex digest."""

    name: str
    sha256_hex: str
    channels: frozenset[str]
    claims: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ColumnMask:
    """Columns of a channel hidden from tokens without `claim`."""

    channel: str
    columns: frozenset[str]
    claim: str


@dataclass(frozen=True)
class AuthSettings:
    """Validated `[auth]` settings; see docs/security.md for each key."""

    # auto: loopback requests need no token; required: every request does;
    # open: no request does, on purpose (a warning is still logged).
    mode: str = "auto"
    tokens: tuple[StaticToken, ...] = ()
    masks: tuple[ColumnMask, ...] = ()
    jwt_secret: bytes | None = None
    jwt_public_key: bytes | None = None
    audience: str | None = None
    issuer: str | None = None
    channels_claim: str = "channels"
    cookie_name: str = "cdc_token"
    leeway_seconds: float = 0.0

    @property
    def has_credentials(self) -> bool:
        """Whether any token could be accepted: static tokens or a JWT key."""
        return (
            bool(self.tokens)
            or self.jwt_secret is not None
            or (self.jwt_public_key is not None)
        )

    def __repr__(self) -> str:
        # Keeps the secret out of tracebacks and debug logs.
        secret = "<set>" if self.jwt_secret is not None else None
        return (
            f"AuthSettings(mode={self.mode!r}, tokens={len(self.tokens)}, "
            f"jwt_secret={secret})"
        )


def parse_auth(section: Mapping[str, Any]) -> AuthSettings:
    """Build `AuthSettings` from the `[auth]` table of the TOML file."""
    values: dict[str, Any] = {}
    if "mode" in section:
        values["mode"] = _mode("auth.mode", section["mode"])
    if "tokens" in section:
        values["tokens"] = _tokens(section["tokens"])
    if "masks" in section:
        values["masks"] = _masks(section["masks"])
    if "jwt_secret_file" in section:
        path = _string("auth.jwt_secret_file", section["jwt_secret_file"])
        values["jwt_secret"] = _secret("auth.jwt_secret_file", _read_file(path))
    if "jwt_public_key_file" in section:
        path = _string("auth.jwt_public_key_file", section["jwt_public_key_file"])
        values["jwt_public_key"] = _public_key(_read_file(path), path)
    for key in ("audience", "issuer", "channels_claim", "cookie_name"):
        if key in section:
            values[key] = _string(f"auth.{key}", section[key])
    if "cookie_name" in values and not _COOKIE_NAME_RE.match(values["cookie_name"]):
        raise ConfigError(
            f"invalid auth.cookie_name {values['cookie_name']!r}: use 1 to 64 "
            "letters, digits, '_' or '-'"
        )
    if "leeway_seconds" in section:
        values["leeway_seconds"] = _seconds(
            "auth.leeway_seconds", section["leeway_seconds"]
        )
    return AuthSettings(**values)


def with_environment(auth: AuthSettings | None, env: Mapping[str, str]) -> AuthSettings:
    """Apply CDC_AUTH_MODE and CDC_JWT_SECRET over the file's settings."""
    auth = auth or AuthSettings()
    if env.get("CDC_AUTH_MODE"):
        auth = replace(auth, mode=_mode("CDC_AUTH_MODE", env["CDC_AUTH_MODE"]))
    if env.get("CDC_JWT_SECRET"):
        secret = _secret("CDC_JWT_SECRET", env["CDC_JWT_SECRET"].encode())
        auth = replace(auth, jwt_secret=secret)
    return auth


def _mode(key: str, value: Any) -> str:
    if value not in MODES:
        raise ConfigError(
            f"invalid {key} {value!r}: expected one of {', '.join(MODES)}"
        )
    return str(value)


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"invalid {key} {value!r}: expected a non-empty string")
    return value


def _strings(key: str, value: Any) -> frozenset[str]:
    if not isinstance(value, list) or not all(
        isinstance(item, str) and item for item in value
    ):
        raise ConfigError(
            f"invalid {key} {value!r}: expected a list of non-empty strings"
        )
    return frozenset(value)


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"invalid {key} {value!r}: expected seconds, 0 or more")
    return float(value)


def _tables(key: str, value: Any) -> list[Mapping[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ConfigError(f"invalid {key}: expected an array of tables, e.g. [[{key}]]")
    return value


def _check_keys(key: str, table: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"unknown key {key}.{unknown[0]}; known keys: {', '.join(sorted(known))}"
        )


def _tokens(value: Any) -> tuple[StaticToken, ...]:
    tokens = []
    for number, table in enumerate(_tables("auth.tokens", value)):
        key = f"auth.tokens[{number}]"
        _check_keys(key, table, _TOKEN_KEYS)
        for required in ("name", "hash", "channels"):
            if required not in table:
                raise ConfigError(f"missing {key}.{required}")
        digest = _string(f"{key}.hash", table["hash"]).lower()
        if not _HASH_RE.match(digest):
            raise ConfigError(
                f"invalid {key}.hash: expected 'sha256:' and 64 hex digits, made "
                "with e.g. printf '%s' \"$TOKEN\" | sha256sum"
            )
        tokens.append(
            StaticToken(
                name=_string(f"{key}.name", table["name"]),
                sha256_hex=digest.removeprefix("sha256:"),
                channels=_strings(f"{key}.channels", table["channels"]),
                claims=_strings(f"{key}.claims", table.get("claims", [])),
            )
        )
    return tuple(tokens)


def _masks(value: Any) -> tuple[ColumnMask, ...]:
    masks = []
    for number, table in enumerate(_tables("auth.masks", value)):
        key = f"auth.masks[{number}]"
        _check_keys(key, table, _MASK_KEYS)
        for required in ("channel", "columns", "claim"):
            if required not in table:
                raise ConfigError(f"missing {key}.{required}")
        masks.append(
            ColumnMask(
                channel=_string(f"{key}.channel", table["channel"]),
                columns=_strings(f"{key}.columns", table["columns"]),
                claim=_string(f"{key}.claim", table["claim"]),
            )
        )
    return tuple(masks)


def _read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read {path!r}: {error.strerror}") from None


def _secret(key: str, secret: bytes) -> bytes:
    secret = secret.strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"invalid {key}: the HS256 secret must be at least {MIN_SECRET_BYTES} "
            "bytes, e.g. from python -c 'import secrets; "
            "print(secrets.token_urlsafe(48))'"
        )
    return secret


def _public_key(data: bytes, path: str) -> bytes:
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        key = None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ConfigError(
            f"invalid auth.jwt_public_key_file {path!r}: expected an RSA public "
            "key in PEM form (-----BEGIN PUBLIC KEY-----)"
        )
    return data
