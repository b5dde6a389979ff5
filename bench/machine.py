"""The machine, the versions under test, and the CPU used by other work."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass

from .harness import CLOCK_TICKS, REPO_ROOT, Workspace, query_one

PACKAGES = ("quart", "hypercorn", "h11", "orjson", "psycopg2-binary", "py-spy")


def describe(ws: Workspace) -> list[str]:
    """Return lines naming the machine and the versions of what is measured."""
    return [
        f"machine: {_cpu_count()} CPUs ({_cpu_model()}), {_memory_gib():.1f} GiB "
        f"memory, Linux {platform.release()}",
        f"PostgreSQL: {query_one(ws.cluster.dsn(), 'SELECT version()')}",
        f"wal2json: {_debian_version('postgresql-15-wal2json')}",
        f"Python: {sys.version.split()[0]} ({sys.executable})",
        "packages: " + ", ".join(f"{name} {_version(name)}" for name in PACKAGES),
        f"cdc-stream: {_git_revision()}",
        f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
    ]


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def _cpu_model() -> str:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _memory_gib() -> float:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    return 0.0


def _debian_version(package: str) -> str:
    dpkg_query = shutil.which("dpkg-query")
    if dpkg_query is None:
        return "unknown (no dpkg-query)"
    result = subprocess.run(
        [dpkg_query, "-W", "-f=${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not result.stdout:
        return f"unknown ({package} not installed as a Debian package)"
    return f"{result.stdout} (Debian package {package})"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_revision() -> str:
    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        return result.stdout.strip()

    revision = git("rev-parse", "--short", "HEAD") or "unknown revision"
    if git("status", "--porcelain", "--", "cdc_stream"):
        revision += " with uncommitted changes in cdc_stream/"
    return revision


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds used by the whole machine and by the benchmark's processes."""

    machine: float
    ours: float


def snapshot(ws: Workspace) -> CpuSnapshot:
    return CpuSnapshot(_machine_busy_seconds(), _our_cpu_seconds(ws))


def other_work(before: CpuSnapshot, after: CpuSnapshot) -> float:
    """Return CPU seconds that processes outside the benchmark used in between."""
    return max(0.0, (after.machine - before.machine) - (after.ours - before.ours))


def _machine_busy_seconds() -> float:
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: idle and iowait
    # are not busy; guest time is already inside user time.
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / CLOCK_TICKS


def _our_cpu_seconds(ws: Workspace) -> float:
    """Return CPU of this process, its reaped children and the database server.

    The server is not a child of this process (pg_ctl detaches it), so its
    processes are read from /proc, with the CPU of the backends it reaped.
    """
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    try:
        server = ws.server_pids()
    except (FileNotFoundError, ValueError):
        return total
    for pid in server:
        total += _cpu_with_reaped_children(pid)
    return total


def _cpu_with_reaped_children(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # utime, stime, cutime, cstime are fields 14 to 17 of stat(5).
    return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS
