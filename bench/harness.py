"""Processes the benchmarks start: a private cluster, app servers, helpers.

Everything listens on 127.0.0.1 only, on ports found free at start. Every
child process is started in its own session, so that Ctrl-C reaches only
the benchmark runner, which then stops its children by process id.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions

from cdc_stream import cluster as cluster_module
from cdc_stream.cluster import LocalCluster, find_free_port

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
APP_START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# Environment variables that configure the app; the benchmarks set their own.
_APP_ENV_PREFIXES = ("CDC_", "DATABASE_URL")

_children: list[subprocess.Popen[bytes]] = []


class BenchError(RuntimeError):
    """A benchmark failed to set up or run; the message names the step."""


def spawn(
    command: list[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin: int | None = subprocess.DEVNULL,
    stdout: Any = subprocess.PIPE,
    stderr: Any = None,
) -> subprocess.Popen[bytes]:
    """Start a child in its own session and remember it for `stop_children`."""
    process = subprocess.Popen(
        command,
        env=dict(env) if env is not None else None,
        cwd=cwd if cwd is not None else REPO_ROOT,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
    )
    _children.append(process)
    return process


def stop_process(
    process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT
) -> None:
    """Send SIGTERM to the child's process group, then SIGKILL after `timeout` s."""
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("pid %d ignored SIGTERM, killing it", process.pid)
            _signal_group(process, signal.SIGKILL)
            process.wait(timeout)

    # A worker can outlive its master when the master was killed.
    _signal_group(process, signal.SIGKILL)
    if process in _children:
        _children.remove(process)


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    # The group id is the child's pid because it was started in a new session.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def stop_children() -> None:
    """Stop every child still running, newest first."""
    for process in reversed(list(_children)):
        stop_process(process, timeout=5.0)


def raise_open_files_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted`; return the new limit.

    Children inherit the limit, so app servers and clients started later get it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        # Raising the hard limit needs CAP_SYS_RESOURCE; without it the
        # current hard limit stays the ceiling.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def read_json_line(process: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """Read one JSON line from a child's stdout, failing after `timeout` s."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(
                    f"timed out after {timeout} s waiting for output of pid "
                    f"{process.pid} ({' '.join(map(str, process.args))})"
                )
            if not selector.select(remaining):
                continue
            data = os.read(process.stdout.fileno(), 1)
            if not data:
                raise BenchError(
                    f"pid {process.pid} exited with code {process.wait()} "
                    "before writing its result"
                )
            buffer += data
    return json.loads(buffer)


# --- process statistics from /proc -------------------------------------------


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time of process `pid` and its threads."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    # After the command name: utime and stime are fields 14 and 15 of stat(5).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """Return VmRSS and VmHWM (peak RSS) of process `pid`, in KiB."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
    return values


def child_pids(pid: int) -> list[int]:
    """Return the direct children of process `pid`."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as children:
            return [int(child) for child in children.read().split()]
    except FileNotFoundError:
        return []


def process_tree(pid: int) -> list[int]:
    """Return `pid` and all its descendants."""
    pids = [pid]
    for child in child_pids(pid):
        pids.extend(process_tree(child))
    return pids


def tree_cpu_seconds(pids: list[int]) -> float:
    """Return the summed CPU time of `pids`, skipping processes that exited."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += cpu_seconds(pid)
    return total


def own_cpu_seconds() -> float:
    """Return this process's user plus system CPU time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_seconds() -> float:
    """Return the CPU time of this process's children that were waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- the database cluster -----------------------------------------------------


@dataclass
class Workspace:
    """A private cluster plus a scratch directory for journals and logs."""

    base: Path
    cluster: LocalCluster
    databases: list[str] = field(default_factory=list)

    def server_pids(self) -> list[int]:
        """Return the postmaster and its children (backends, walsenders)."""
        pid_file = self.cluster.data_dir / "postmaster.pid"
        postmaster = int(pid_file.read_text(encoding="ascii").split()[0])
        return process_tree(postmaster)

    def server_version(self) -> str:
        return query_one(self.cluster.dsn(), "SHOW server_version")

    def scratch(self, name: str) -> Path:
        """Return a fresh directory for one benchmark's files."""
        path = self.base / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    @contextlib.contextmanager
    def database(self, name: str) -> Iterator[str]:
        """Create database `name` and yield its DSN; drop it with its slots after."""
        self.cluster.drop_database(name)
        self.cluster.create_database(name)
        try:
            yield self.cluster.dsn(name)
        finally:
            self.cluster.drop_database(name)


@contextlib.contextmanager
def workspace(base: Path | None = None) -> Iterator[Workspace]:
    """Start a private PostgreSQL cluster on a free loopback port; remove it after."""
    owned = base is None
    if base is None:
        base = Path(_make_temp_dir())
    cluster = LocalCluster(base / "pgdata", find_free_port())
    try:
        cluster.init()
        cluster.start()
        yield Workspace(base, cluster)
    finally:
        _stop_cluster(cluster)
        if owned:
            shutil.rmtree(base, ignore_errors=True)


def _make_temp_dir() -> str:
    path = tempfile.mkdtemp(prefix="cdc-bench-")
    if os.geteuid() == 0:
        # The server runs as the postgres OS user, which must enter the directory.
        shutil.chown(path, cluster_module.POSTGRES_OS_USER)
    return path


def _stop_cluster(cluster: LocalCluster) -> None:
    try:
        cluster.stop("fast")
    except cluster_module.ClusterError:
        logger.exception("fast stop of %s failed, stopping it immediately", cluster)
        cluster.stop("immediate")


def connect(dsn: str, *, autocommit: bool = True) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(dsn)
    conn.autocommit = autocommit
    return conn


def query_one(dsn: str, statement: str, params: tuple[Any, ...] = ()) -> Any:
    """Run one query in its own connection and return the first column of row one."""
    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            row = cur.fetchone()
    finally:
        conn.close()
    return None if row is None else row[0]


def slot_active_pid(cur: psycopg2.extensions.cursor, slot: str) -> int | None:
    cur.execute(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    )
    row = cur.fetchone()
    return None if row is None else row[0]


def wait_slot_taken(
    dsn: str, slot: str, not_pid: int | None, timeout: float, interval: float = 0.002
) -> tuple[float, int]:
    """Poll until a process other than `not_pid` streams `slot`.

    Returns the wall-clock time (time.time()) when it was first seen, and the
    walsender's pid.
    """
    conn = connect(dsn)
    deadline = time.monotonic() + timeout
    try:
        with conn.cursor() as cur:
            while time.monotonic() < deadline:
                pid = slot_active_pid(cur, slot)
                if pid is not None and pid != not_pid:
                    return time.time(), pid
                time.sleep(interval)
    finally:
        conn.close()
    raise BenchError(f"timed out after {timeout} s waiting for slot {slot} to stream")


# --- the app under Hypercorn ----------------------------------------------------


class AppServer:
    """`hypercorn cdc_stream.app:app` on a free loopback port, in its own session."""

    def __init__(self, workdir: Path, env: Mapping[str, str], name: str) -> None:
        self.workdir = workdir
        self.name = name
        self.port = find_free_port()
        self.log_path = workdir / f"{name}.log"
        self.env = _app_environment(env)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = APP_START_TIMEOUT) -> AppServer:
        if self.process is not None:
            raise BenchError(f"app {self.name} was already started")
        command = [
            sys.executable,
            "-m",
            "hypercorn",
            "cdc_stream.app:app",
            "--bind",
            f"127.0.0.1:{self.port}",
        ]
        with self.log_path.open("ab") as log:
            self.process = spawn(
                command, env=self.env, cwd=self.workdir, stdout=log, stderr=log
            )
        self._wait_answering(timeout)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def __enter__(self) -> AppServer:
        return self if self.process is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def worker_pid(self) -> int:
        """Return the pid of Hypercorn's worker process, which runs the app."""
        assert self.process is not None
        # Hypercorn starts its worker with multiprocessing's spawn method, next
        # to multiprocessing's resource tracker.
        for pid in child_pids(self.process.pid):
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"spawn_main" in cmdline.read():
                    return pid
        raise BenchError(f"app server pid {self.process.pid} has no worker process")

    def pids(self) -> list[int]:
        assert self.process is not None
        return process_tree(self.process.pid)

    def health(self) -> dict[str, Any]:
        status, body = http_get(self.port, "/healthz")
        if status != 200 and not body.startswith(b"{"):
            raise BenchError(f"GET /healthz returned HTTP {status}: {body[:200]!r}")
        return json.loads(body)

    def wait_state(self, states: tuple[str, ...], timeout: float = 30.0) -> None:
        """Wait until the replication state is one of `states`."""
        deadline = time.monotonic() + timeout
        state = "unknown"
        while time.monotonic() < deadline:
            state = self.health()["replication"]["state"]
            if state in states:
                return
            time.sleep(0.05)
        raise BenchError(
            f"app {self.name}: replication state {state!r} after {timeout} s, "
            f"expected one of {states}; log: {self.log_path}"
        )

    def wait_events(self, count: int, timeout: float) -> None:
        """Wait until the replication thread has journaled `count` events."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            seen = self.health()["replication"]["events"]
            if seen >= count:
                return
            time.sleep(0.1)
        raise BenchError(
            f"app {self.name}: {seen} of {count} events journaled after {timeout} s"
        )

    def _wait_answering(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(
                    f"app {self.name} exited with code {self.process.returncode}; "
                    f"log: {self.log_path}"
                )
            with contextlib.suppress(OSError):
                http_get(self.port, "/healthz")
                return
            time.sleep(0.05)
        raise BenchError(f"app {self.name}: GET /healthz timed out after {timeout} s")


def _app_environment(env: Mapping[str, str]) -> dict[str, str]:
    inherited = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_APP_ENV_PREFIXES)
    }
    return {**inherited, "PYTHONUNBUFFERED": "1", **env}


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET `path` from 127.0.0.1:`port` and return status and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def python_module(module: str, *args: str) -> list[str]:
    """Return the command that runs `python -m module args` with this interpreter."""
    return [sys.executable, "-m", module, *args]
