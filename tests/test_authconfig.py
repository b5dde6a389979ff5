"""Parsing of the [auth] settings and the token scrubbing of ASGI scopes."""

from __future__ import annotations

import pytest

from cdc_stream.auth import SCOPE_KEY, is_loopback_request, scrub_scope
from cdc_stream.authconfig import parse_auth, with_environment
from cdc_stream.config import Settings
from cdc_stream.errors import ConfigError

GOOD_HASH = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("section", "named"),
    [
        ({"mode": "sometimes"}, "auth.mode"),
        (
            {"tokens": [{"name": "x", "hash": "abc", "channels": []}]},
            "auth.tokens[0].hash",
        ),
        ({"tokens": [{"name": "x", "hash": GOOD_HASH}]}, "auth.tokens[0].channels"),
        (
            {
                "tokens": [
                    {"name": "x", "hash": GOOD_HASH, "channels": ["a"], "role": 1}
                ]
            },
            "auth.tokens[0].role",
        ),
        ({"tokens": {"name": "x"}}, "auth.tokens"),
        (
            {"masks": [{"channel": "c", "columns": "balance", "claim": "f"}]},
            "auth.masks[0].columns",
        ),
        ({"jwt_secret_file": "/nonexistent/secret"}, "/nonexistent/secret"),
        ({"cookie_name": "bad name;"}, "auth.cookie_name"),
        ({"leeway_seconds": -1}, "auth.leeway_seconds"),
    ],
)
def test_invalid_auth_settings_name_key(section, named):
    with pytest.raises(ConfigError) as raised:
        parse_auth(section)

    assert named in str(raised.value)


def test_short_jwt_secret_rejected():
    with pytest.raises(ConfigError) as raised:
        with_environment(None, {"CDC_JWT_SECRET": "short"})

    assert "CDC_JWT_SECRET" in str(raised.value)


def test_auth_section_read_from_file(tmp_path):
    config = tmp_path / "cdc.toml"
    config.write_text(
        '[auth]\nmode = "required"\n[[auth.tokens]]\nname = "a"\n'
        f'hash = "{GOOD_HASH}"\nchannels = ["*"]\n[logging]\nformat = "json"\n'
    )

    settings = Settings.from_env(
        {"DATABASE_URL": "dbname=x", "CDC_CONFIG": str(config), "CDC_AUTH_MODE": "open"}
    )

    assert settings.auth.mode == "open"
    assert settings.auth.tokens[0].sha256_hex == "a" * 64
    assert settings.log_format == "json"
    assert "jwt_secret=None" in repr(settings.auth)


def test_secret_never_in_repr():
    auth = with_environment(None, {"CDC_JWT_SECRET": "s" * 40})

    assert "s" * 40 not in repr(auth)


def test_scrub_moves_every_token_source():
    scope = {
        "type": "http",
        "query_string": b"a=1&access_token=from-query&b=%2F",
        "headers": [
            (b"authorization", b"Bearer from-header"),
            (b"cookie", b"x=1; cdc_token=from-cookie; y=2"),
            (b"referer", b"http://h/?access_token=from-referer&z=3"),
        ],
    }

    scrub_scope(scope, "cdc_token")

    assert scope["query_string"] == b"a=1&b=%2F"
    assert dict(scope["headers"]) == {
        b"cookie": b"x=1; y=2",
        b"referer": b"http://h/?z=3",
    }
    assert scope[SCOPE_KEY].token == "Bearer from-header"
    assert scope[SCOPE_KEY].source == "header"


def test_scrub_prefers_query_over_cookie():
    scope = {
        "type": "http",
        "query_string": b"access%5Ftoken=q+1",
        "headers": [(b"cookie", b"cdc_token=c")],
    }

    scrub_scope(scope, "cdc_token")

    assert scope["query_string"] == b""
    assert scope[SCOPE_KEY].token == "q 1"
    assert scope[SCOPE_KEY].source == "query"


@pytest.mark.parametrize(
    ("server", "headers", "expected"),
    [
        (("127.0.0.1", 8000), [], True),
        (("::1", 8000), [], True),
        (("127.0.0.2", 8000), [], True),
        (("10.0.0.5", 8000), [], False),
        (("/run/cdc.sock", None), [], False),
        (None, [], False),
        (("127.0.0.1", 8000), [(b"x-forwarded-for", b"203.0.113.1")], False),
        (("127.0.0.1", 8000), [(b"forwarded", b"for=203.0.113.1")], False),
    ],
)
def test_loopback_detection(server, headers, expected):
    scope = {"type": "http", "server": server, "headers": headers}

    assert is_loopback_request(scope) is expected
