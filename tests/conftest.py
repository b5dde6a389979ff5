"""Shared fixtures: a private PostgreSQL cluster, databases and app servers.

Set CDC_TEST_DSN to a libpq connection string of an existing server (a
superuser, wal_level=logical, wal2json installed) to run the tests against it
in place of a private cluster started for the session.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import pytest
from psycopg2.extensions import make_dsn, parse_dsn

from cdc_stream import cluster as cluster_module
from cdc_stream.cluster import LocalCluster, find_free_port
from sse_client import SSEClient

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_STARTUP_TIMEOUT = 30.0
APP_STOP_TIMEOUT = 10.0

# Environment variables that configure the app. They are removed from the
# environment that app servers inherit, so each test sets exactly its own.
_APP_ENV_PREFIXES = ("CDC_", "DATABASE_URL")


class ExternalServer:
    """An existing PostgreSQL server named by CDC_TEST_DSN.

    Offers the `dsn()` and `create_database()` methods of `LocalCluster`.
    """

    def __init__(self, base_dsn: str) -> None:
        self._base = parse_dsn(base_dsn)

    def dsn(self, dbname: str = "postgres", user: str | None = None) -> str:
        """Return the connection string of `dbname` on this server."""
        parameters = {**self._base, "dbname": dbname}
        if user is not None:
            parameters["user"] = user
        return make_dsn(**parameters)

    def create_database(self, name: str) -> bool:
        """Create database `name` if it is missing.

        Returns True when this call created it.
        """
        return cluster_module.create_database(self.dsn(), name)

    def drop_database(self, name: str) -> None:
        """Drop database `name` and its replication slots, if it exists."""
        cluster_module.drop_database(self.dsn(), name)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[LocalCluster | ExternalServer]:
    """PostgreSQL server for the session: private unless CDC_TEST_DSN is set."""
    external_dsn = os.environ.get("CDC_TEST_DSN")
    if external_dsn:
        yield ExternalServer(external_dsn)
        return

    # Not pytest's tmp_path, because running as root, the server runs as the
    # postgres OS user, which cannot enter /tmp/pytest-of-root.
    base_dir = Path(tempfile.mkdtemp(prefix="cdc-stream-test-"))
    if os.geteuid() == 0:
        shutil.chown(base_dir, cluster_module.POSTGRES_OS_USER)

    cluster = LocalCluster(base_dir / "pgdata", find_free_port())
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        _stop_cluster(cluster)
        shutil.rmtree(base_dir, ignore_errors=True)


def _stop_cluster(cluster: LocalCluster) -> None:
    try:
        cluster.stop("fast")
    except cluster_module.ClusterError:
        logger.exception("fast stop of %s failed, stopping it immediately", cluster)
        cluster.stop("immediate")


@pytest.fixture
def database(pg_cluster: LocalCluster | ExternalServer) -> Iterator[str]:
    """Fresh database for one test, given as its DSN and dropped afterwards."""
    name = f"cdc_test_{uuid.uuid4().hex[:12]}"
    pg_cluster.create_database(name)
    try:
        yield pg_cluster.dsn(name)
    finally:
        pg_cluster.drop_database(name)


class AppServer:
    """The real app running under Hypercorn in a subprocess."""

    def __init__(
        self, process: subprocess.Popen[bytes], port: int, log_path: Path
    ) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path
        self.base_url = f"http://127.0.0.1:{port}"

    def url(self, path: str = "/") -> str:
        """Return the absolute URL of `path` on this server."""
        return self.base_url + path

    def output(self) -> str:
        """Return everything the server wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def is_running(self) -> bool:
        """Return whether the server process has not exited."""
        return self.process.poll() is None

    def wait_until_answering(self, timeout: float = APP_STARTUP_TIMEOUT) -> None:
        """Wait until GET /healthz gets any HTTP response."""
        self._wait_for_healthz(timeout, require_ok=False)

    def wait_until_healthy(self, timeout: float = APP_STARTUP_TIMEOUT) -> None:
        """Wait until GET /healthz returns 200."""
        self._wait_for_healthz(timeout, require_ok=True)

    def stop(self, timeout: float = APP_STOP_TIMEOUT) -> int:
        """Send SIGTERM, then SIGKILL after `timeout` s, and return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "app server pid %d still running %s s after SIGTERM, killing it",
                    self.process.pid,
                    timeout,
                )
                self.process.kill()
                self.process.wait(timeout)
        return self.process.returncode

    def _wait_for_healthz(self, timeout: float, *, require_ok: bool) -> None:
        deadline = time.monotonic() + timeout
        last_result = "no response"
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AppServerError(
                        f"app server exited with code {self.process.returncode} "
                        f"before /healthz responded",
                        self.output(),
                    )
                try:
                    response = client.get(self.url("/healthz"))
                except httpx.TransportError as error:
                    last_result = repr(error)
                else:
                    if not require_ok or response.status_code == 200:
                        return
                    last_result = f"HTTP {response.status_code}: {response.text}"
                time.sleep(0.1)

        raise AppServerError(
            f"timed out after {timeout} s waiting for /healthz on port {self.port} "
            f"(last result: {last_result})",
            self.output(),
        )


class AppServerError(RuntimeError):
    """The app server failed to start. The message includes its output."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(f"{message}\n--- app server output ---\n{output}")
        self.output = output


AppServerFactory = Callable[..., AppServer]


@pytest.fixture
def app_server(tmp_path: Path) -> Iterator[AppServerFactory]:
    """Factory that starts the app under Hypercorn on a free port.

    Call it with the app's environment, e.g. ``app_server({"DATABASE_URL":
    database})``. It returns once GET /healthz returns a response. Every server it
    started is stopped at teardown. `port` reuses a port, to restart a server
    in place, and `args` are extra Hypercorn options.
    """
    servers: list[AppServer] = []

    def start(
        env: Mapping[str, str],
        *,
        startup_timeout: float = APP_STARTUP_TIMEOUT,
        port: int | None = None,
        args: Sequence[str] = (),
    ) -> AppServer:
        port = port or find_free_port()
        log_path = tmp_path / f"app-{port}.log"
        command = [
            sys.executable,
            "-m",
            "hypercorn",
            "cdc_stream.app:app",
            "--bind",
            f"127.0.0.1:{port}",
            *args,
        ]
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                command,
                # Files the app writes by default, such as its journal, land
                # in the test's own directory.
                cwd=tmp_path,
                env=_app_environment(env),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )

        server = AppServer(process, port, log_path)
        servers.append(server)
        try:
            server.wait_until_answering(startup_timeout)
        except AppServerError:
            server.stop()
            raise
        return server

    yield start

    for server in servers:
        server.stop()


def _app_environment(env: Mapping[str, str]) -> dict[str, str]:
    inherited = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_APP_ENV_PREFIXES)
    }
    return {**inherited, "PYTHONUNBUFFERED": "1", **env}


@pytest.fixture
def sse_stream() -> Iterator[Callable[..., SSEClient]]:
    """Factory of started `SSEClient` objects, all closed at teardown.

    Takes the arguments of `SSEClient`, e.g. ``sse_stream(server.url(
    "/api/realtime"), headers={"Last-Event-ID": event_id})``.
    """
    clients: list[SSEClient] = []

    def open_stream(url: str, **kwargs: object) -> SSEClient:
        client = SSEClient(url, **kwargs)  # type: ignore[arg-type]
        clients.append(client)
        return client.start()

    yield open_stream

    for client in clients:
        client.close()
