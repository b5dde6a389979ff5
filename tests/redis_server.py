"""A private redis-server on a free loopback port, for tests."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from cdc_stream.cluster import find_free_port

STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


class RedisServerError(RuntimeError):
    """redis-server failed to start; the message includes its output."""


class RedisServer:
    """A redis-server without persistence, started and stopped by the test."""

    def __init__(self) -> None:
        self.port = find_free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="cdc-stream-redis-"))
        self.log_path = self.directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """Return a new client of this server."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> RedisServer:
        """Start the server on its port and wait until it replies to PING."""
        if shutil.which("redis-server") is None:
            raise RedisServerError(
                "redis-server not found: run `make install` or apt-get install "
                "redis-server"
            )
        command = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
        ]
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self._wait_until_ready()
        return self

    def stop(self) -> None:
        """Stop the server, which loses its data because it has no persistence."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)

    def remove(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _wait_until_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        client = self.client()
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RedisServerError(
                        f"redis-server exited with code {self.process.returncode}:\n"
                        + self.log_path.read_text(errors="replace")
                    )
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise RedisServerError(
            f"redis-server on port {self.port} did not answer PING within "
            f"{STARTUP_TIMEOUT} s:\n" + self.log_path.read_text(errors="replace")
        )
