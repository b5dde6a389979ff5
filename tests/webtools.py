"""Helpers of the access, filter, metrics, dashboard and tail tests."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt

import conftest
from cdc_stream.cluster import find_free_port
from streaming import ORDERS_DDL, app_environment, execute, wait_streaming

BALANCES_DDL = """
CREATE TABLE user_balances (
    user_id bigint NOT NULL,
    currency text NOT NULL,
    balance numeric NOT NULL,
    PRIMARY KEY (user_id, currency)
);
ALTER TABLE user_balances REPLICA IDENTITY FULL;
ALTER TABLE orders REPLICA IDENTITY FULL;
"""
JWT_SECRET = "test-secret-" + "s" * 40


def create_tables(dsn: str) -> None:
    """Create orders, trades and user_balances."""
    execute(dsn, ORDERS_DDL, BALANCES_DDL)


def token_hash(token: str) -> str:
    """Return the `sha256:<hex>` form stored in `[auth] tokens`."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def make_jwt(
    claims: dict[str, Any],
    key: str | bytes = JWT_SECRET,
    algorithm: str = "HS256",
    expires_in: float = 300,
) -> str:
    """Sign a token whose `exp` is `expires_in` seconds from now."""
    payload = {"exp": int(time.time() + expires_in), **claims}
    return jwt.encode(payload, key, algorithm=algorithm)


def write_config(tmp_path: Path, text: str) -> str:
    """Write a TOML configuration file and return its path."""
    path = tmp_path / f"cdc-{time.monotonic_ns()}.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def start_app(
    app_server: Any,
    database: str,
    tmp_path: Path,
    config: str | None = None,
    **options: Any,
) -> Any:
    """Start the app with an optional TOML configuration; wait for streaming."""
    env = app_environment(database, tmp_path, **options.pop("env", {}))
    if config is not None:
        env["CDC_CONFIG"] = write_config(tmp_path, config)
    server = app_server(env, **options)
    wait_streaming(server)
    return server


def get(server: Any, path: str, **kwargs: Any) -> httpx.Response:
    """Send GET `path` to the server, bypassing any proxy settings."""
    return httpx.get(server.url(path), trust_env=False, timeout=10, **kwargs)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextlib.contextmanager
def module_app(
    pg_cluster: Any,
    config: str | None = None,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    prepare: Any = create_tables,
) -> Iterator[tuple[Any, str]]:
    """Start a database and an app shared by the tests of one module.

    Yields the server and the database DSN; both are removed on exit.
    """
    name = f"cdc_web_{uuid.uuid4().hex[:12]}"
    pg_cluster.create_database(name)
    directory = Path(tempfile.mkdtemp(prefix="cdc-web-"))
    port = find_free_port()
    log_path = directory / "app.log"
    process = None
    try:
        dsn = pg_cluster.dsn(name)
        prepare(dsn)
        app_env = app_environment(dsn, directory, **(env or {}))
        if config is not None:
            app_env["CDC_CONFIG"] = write_config(directory, config)
        command = [
            sys.executable, "-m", "hypercorn", "cdc_stream.app:app",
            "--bind", f"127.0.0.1:{port}", *args,
        ]  # fmt: skip
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                command,
                cwd=directory,
                env=conftest._app_environment(app_env),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        server = conftest.AppServer(process, port, log_path)
        server.wait_until_answering()
        wait_streaming(server)
        yield server, dsn
    finally:
        if process is not None:
            conftest.AppServer(process, port, log_path).stop()
        pg_cluster.drop_database(name)
        shutil.rmtree(directory, ignore_errors=True)
