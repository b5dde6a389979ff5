"""Access control against the real app: tokens, channels, masks, logs."""

from __future__ import annotations

import decimal
import hashlib
import hmac
import time
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from streaming import change_events, execute, parse_data, wait_until
from webtools import (
    JWT_SECRET,
    bearer,
    get,
    make_jwt,
    module_app,
    start_app,
    token_hash,
)

ORDERS_TOKEN = "orders-reader-token-0123456789"
FINANCE_TOKEN = "finance-token-abcdefghijklmnop"
SUPPORT_TOKEN = "support-token-qrstuvwxyz012345"
AUDIENCE = "cdc-stream-tests"
ISSUER = "https://issuer.example.test"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PRIVATE_PEM = RSA_KEY.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8,
    serialization.NoEncryption(),
)
RSA_PUBLIC_PEM = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def auth_config(public_key_path: Path) -> str:
    return f"""
[auth]
mode = "required"
audience = "{AUDIENCE}"
issuer = "{ISSUER}"
jwt_public_key_file = "{public_key_path}"

[[auth.tokens]]
name = "orders-reader"
hash = "{token_hash(ORDERS_TOKEN)}"
channels = ["orders_changes"]

[[auth.tokens]]
name = "finance"
hash = "{token_hash(FINANCE_TOKEN)}"
channels = ["*"]
claims = ["finance"]

[[auth.tokens]]
name = "support"
hash = "{token_hash(SUPPORT_TOKEN)}"
channels = ["user_balances_changes", "orders_changes"]

[[auth.masks]]
channel = "user_balances_changes"
columns = ["balance"]
claim = "finance"
"""


@pytest.fixture(scope="module")
def secured(pg_cluster, tmp_path_factory):
    key_path = tmp_path_factory.mktemp("keys") / "public.pem"
    key_path.write_bytes(RSA_PUBLIC_PEM)
    with module_app(
        pg_cluster,
        auth_config(key_path),
        env={"CDC_JWT_SECRET": JWT_SECRET},
        args=(
            "--access-logfile",
            "-",
            "--access-logformat",
            "%(R)s %(s)s q=[%(q)s] ref=[%(f)s] auth=[%({authorization}i)s] "
            "cookie=[%({cookie}i)s]",
        ),
    ) as (server, dsn):
        yield server, dsn


def valid_jwt(**claims: object) -> str:
    base = {"aud": AUDIENCE, "iss": ISSUER, "sub": "alice"}
    return make_jwt({**base, **claims})


def realtime(server, **kwargs) -> httpx.Response:
    """Open a stream and return the response once its headers arrive."""
    with httpx.stream(
        "GET", server.url("/api/realtime"), trust_env=False, timeout=10, **kwargs
    ) as response:
        if response.status_code != 200:
            response.read()
        return response


def test_missing_token_rejected_with_json(secured):
    server, _ = secured

    response = realtime(server)

    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["www-authenticate"].startswith("Bearer")
    body = response.json()
    assert body["error"] == "unauthorized"
    assert "Authorization: Bearer" in body["message"]


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (bearer("wrong-token-value"), "invalid token"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "Bearer <token>"),
        ({"Authorization": "Bearer"}, "Bearer <token>"),
        (bearer("x" * 9000), "longer than"),
        (bearer("a.b.c"), "malformed token"),
    ],
)
def test_wrong_tokens_rejected(secured, headers, message):
    server, _ = secured

    response = realtime(server, headers=headers)

    assert response.status_code == 401
    assert message in response.json()["message"]


def test_expired_and_tampered_jwts_rejected(secured):
    server, _ = secured
    expired = make_jwt(
        {"aud": AUDIENCE, "iss": ISSUER, "channels": ["*"]}, expires_in=-60
    )
    good = valid_jwt(channels=["orders_changes"])
    header, payload, signature = good.split(".")
    widened = jwt.utils.base64url_encode(
        jwt.utils.base64url_decode(payload).replace(b"orders_changes", b"*")
    ).decode()
    tampered = f"{header}.{widened}.{signature}"
    cases = {
        "token expired": expired,
        "token signature is invalid": tampered,
        "audience": make_jwt({"aud": "other", "iss": ISSUER}),
        "issuer": make_jwt({"aud": AUDIENCE, "iss": "https://evil.test"}),
        "'exp'": jwt.encode({"aud": AUDIENCE, "iss": ISSUER}, JWT_SECRET),
        "signature": make_jwt(
            {"aud": AUDIENCE, "iss": ISSUER}, key="another-secret-" + "k" * 40
        ),
        "algorithm 'none'": jwt.encode(
            {"aud": AUDIENCE, "iss": ISSUER, "exp": time.time() + 60},
            None,
            algorithm="none",
        ),
    }

    for expected, token in cases.items():
        response = realtime(server, headers=bearer(token))
        assert response.status_code == 401, expected
        assert expected in response.json()["message"]


def test_public_key_as_hmac_secret_rejected(secured):
    server, _ = secured
    # The classic confusion attack: sign HS256 with the RSA public key. The
    # server only accepts HS256 with its own secret, so this must fail.
    header = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}').decode()
    payload = jwt.utils.base64url_encode(
        (
            f'{{"aud":"{AUDIENCE}","iss":"{ISSUER}","exp":{int(time.time()) + 60},'
            '"channels":["*"]}'
        ).encode()
    ).decode()
    signature = jwt.utils.base64url_encode(
        hmac.new(
            RSA_PUBLIC_PEM, f"{header}.{payload}".encode(), hashlib.sha256
        ).digest()
    ).decode()

    response = realtime(server, headers=bearer(f"{header}.{payload}.{signature}"))

    assert response.status_code == 401


def test_token_sources_header_query_cookie(secured, sse_stream):
    server, _ = secured
    url = server.url("/api/realtime")

    by_header = sse_stream(url, headers=bearer(ORDERS_TOKEN))
    by_query = sse_stream(url, params={"access_token": ORDERS_TOKEN})
    by_cookie = sse_stream(url, headers={"Cookie": f"cdc_token={ORDERS_TOKEN}"})

    for client in (by_header, by_query, by_cookie):
        assert client.status_code == 200
        assert parse_data(client.next_event())["type"] == "connection"


def test_token_channels_narrow_stream(secured, sse_stream):
    server, dsn = secured
    client = sse_stream(server.url("/api/realtime"), headers=bearer(ORDERS_TOKEN))
    client.next_event()

    execute(
        dsn,
        "INSERT INTO trades (order_id, quantity) VALUES (7, 1)",
        "INSERT INTO orders (market_id, side, quantity, price) "
        "VALUES ('NARROW-1', 'buy', 1, 1)",
    )
    ((_, data),) = change_events(client, 1)

    assert data["channel"] == "orders_changes"
    assert data["data"]["market_id"] == "NARROW-1"


def test_forbidden_channel_named_in_403(secured):
    server, _ = secured

    response = realtime(
        server,
        headers=bearer(ORDERS_TOKEN),
        params={"channels": "orders_changes,trades_changes"},
    )

    assert response.status_code == 403
    body = response.json()
    assert body["error"] == "forbidden"
    assert "'trades_changes'" in body["message"]
    assert body["channels"] == ["trades_changes"]


def test_jwt_channels_claim(secured, sse_stream):
    server, dsn = secured
    token = valid_jwt(channels=["trades_changes"])

    rejected = realtime(
        server, headers=bearer(token), params={"channels": "orders_changes"}
    )
    client = sse_stream(server.url("/api/realtime"), headers=bearer(token))
    client.next_event()
    execute(
        dsn,
        "INSERT INTO orders (market_id, side, quantity, price) "
        "VALUES ('JWT-1', 'buy', 1, 1)",
        "INSERT INTO trades (order_id, quantity) VALUES (4242, 3)",
    )
    ((_, data),) = change_events(client, 1)

    assert rejected.status_code == 403
    assert data["channel"] == "trades_changes"
    assert data["data"]["order_id"] == 4242


def test_rs256_token_accepted(secured, sse_stream):
    server, _ = secured
    token = make_jwt(
        {"aud": AUDIENCE, "iss": ISSUER, "channels": ["orders_changes"]},
        key=RSA_PRIVATE_PEM,
        algorithm="RS256",
    )

    client = sse_stream(server.url("/api/realtime"), headers=bearer(token))

    assert client.status_code == 200
    assert parse_data(client.next_event())["type"] == "connection"


def test_token_without_channels_claim_gets_403(secured):
    server, _ = secured

    response = realtime(server, headers=bearer(valid_jwt()))

    assert response.status_code == 403
    assert "grants no channel" in response.json()["message"]


def test_masked_column_hidden_without_claim(secured, sse_stream):
    server, dsn = secured
    url = server.url("/api/realtime?channels=user_balances_changes")
    support = sse_stream(url, headers=bearer(SUPPORT_TOKEN))
    finance = sse_stream(url, headers=bearer(FINANCE_TOKEN))
    support.next_event()
    finance.next_event()

    execute(
        dsn,
        "INSERT INTO user_balances VALUES (1, 'USD', 12345678901234567890.123456789)",
        "UPDATE user_balances SET balance = 5 WHERE user_id = 1",
    )
    hidden = [data for _, data in change_events(support, 2)]
    shown = [data for _, data in change_events(finance, 2)]

    assert hidden[0]["data"] == {"user_id": 1, "currency": "USD"}
    assert "balance" not in hidden[1]["data"]
    assert "balance" not in hidden[1]["old"]
    assert shown[0]["data"]["balance"] == decimal.Decimal(
        "12345678901234567890.123456789"
    )
    assert shown[1]["old"]["balance"] == decimal.Decimal(
        "12345678901234567890.123456789"
    )


def test_filter_on_masked_column_forbidden(secured):
    server, _ = secured

    response = realtime(
        server,
        headers=bearer(SUPPORT_TOKEN),
        params={"channels": "user_balances_changes", "filter": "balance=gt.1000"},
    )

    assert response.status_code == 403
    assert "'balance'" in response.json()["message"]


def test_metrics_and_channels_require_token(secured):
    server, _ = secured

    anonymous = get(server, "/metrics")
    allowed = get(server, "/metrics", headers=bearer(ORDERS_TOKEN))
    channels = get(server, "/api/channels", headers=bearer(ORDERS_TOKEN))

    assert anonymous.status_code == 401
    assert allowed.status_code == 200
    assert [c["channel"] for c in channels.json()["channels"]] == ["orders_changes"]


def test_tokens_never_logged(secured, sse_stream):
    server, _ = secured
    secret_query = "query-token-never-logged-4711"
    referer = f"http://127.0.0.1:{server.port}/?access_token={secret_query}&x=1"
    get(server, f"/healthz?access_token={secret_query}&keep=1")
    get(server, f"/healthz?access%5Ftoken={secret_query}")
    get(server, "/healthz", headers={"Referer": referer})
    get(server, "/api/realtime", headers=bearer(ORDERS_TOKEN + "-wrong"))
    client = sse_stream(
        server.url("/api/realtime"),
        headers={
            "Authorization": f"Bearer {FINANCE_TOKEN}",
            "Cookie": f"theme=dark; cdc_token={SUPPORT_TOKEN}",
        },
        params={"access_token": ORDERS_TOKEN},
    )
    client.next_event()
    client.close()

    wait_until(lambda: "keep=1" in server.output(), 10, "the access log line")
    output = server.output()
    assert "GET /healthz?keep=1" in output
    assert "ref=[http://127.0.0.1" in output
    assert "cookie=[theme=dark]" in output
    for secret in (secret_query, ORDERS_TOKEN, FINANCE_TOKEN, SUPPORT_TOKEN):
        assert secret not in output


def test_non_loopback_without_tokens_warns_once(app_server, database, tmp_path):
    socket_path = tmp_path / "app.sock"
    server = start_app(
        app_server, database, tmp_path, args=("--bind", f"unix:{socket_path}")
    )
    transport = httpx.HTTPTransport(uds=str(socket_path))

    with httpx.Client(transport=transport, trust_env=False, timeout=10) as client:
        first = client.get("http://cdc/api/replay?from=0/0")
        second = client.get("http://cdc/metrics")
    loopback = get(server, "/metrics")

    assert first.status_code == 401
    assert "no tokens configured" in first.json()["message"]
    assert second.status_code == 401
    assert loopback.status_code == 200
    assert server.output().count("NO TOKENS CONFIGURED") == 1


def test_open_mode_serves_remote_and_warns(app_server, database, tmp_path):
    socket_path = tmp_path / "app.sock"
    server = start_app(
        app_server,
        database,
        tmp_path,
        env={"CDC_AUTH_MODE": "open"},
        args=("--bind", f"unix:{socket_path}"),
    )
    transport = httpx.HTTPTransport(uds=str(socket_path))

    with httpx.Client(transport=transport, trust_env=False, timeout=10) as client:
        responses = [client.get("http://cdc/metrics") for _ in range(3)]

    assert [r.status_code for r in responses] == [200, 200, 200]
    assert server.output().count("SERVING WITHOUT AUTHENTICATION") == 1


def test_forwarded_request_counts_as_remote(app_server, database, tmp_path):
    server = start_app(app_server, database, tmp_path)

    direct = get(server, "/metrics")
    proxied = get(server, "/metrics", headers={"X-Forwarded-For": "203.0.113.9"})

    assert direct.status_code == 200
    assert proxied.status_code == 401
