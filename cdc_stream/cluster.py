"""A private, throwaway PostgreSQL cluster on 127.0.0.1 for the demo and tests.

The cluster trusts every local and loopback connection, so it must only ever
hold test or demo data. Running as root, every server command runs as the
``postgres`` OS user, because initdb and postgres reject root.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import make_dsn

from .errors import CdcStreamError

logger = logging.getLogger(__name__)

POSTGRES_OS_USER = "postgres"
SUPERUSER = "postgres"
DEBIAN_BINDIR = Path("/usr/lib/postgresql/15/bin")
STOP_MODES = ("smart", "fast", "immediate")
SERVER_LOG_NAME = "server.log"

# Marks the block that init() appends to postgresql.conf, so that a cluster
# directory is configured once even when init() runs again on it.
_CONFIG_MARKER = "# --- cdc-stream LocalCluster ---"

# Maximum length of a Unix socket path on Linux (sun_path minus its NUL).
_MAX_SOCKET_PATH = 107

# Plugins that Debian's PostgreSQL 15.20 accepts by default in its
# output_plugin_libraries setting, used when the default cannot be read.
_DEFAULT_OUTPUT_PLUGINS = "pgoutput, test_decoding"
_PG_CTL_NOT_RUNNING = 3


class ClusterError(CdcStreamError, RuntimeError):
    """A local cluster could not be created, started or stopped."""


def find_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free when checked.

    Another process may take the port before the caller binds it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_port_in_use(port: int) -> bool:
    """Return whether a process listens on TCP `port` of 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def find_bindir() -> Path:
    """Locate the directory holding initdb, pg_ctl and postgres.

    ``pg_config --bindir`` comes first, then Debian's PostgreSQL 15 directory.
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        )
        if result.returncode == 0 and result.stdout.strip():
            candidates.append(Path(result.stdout.strip()))
    candidates.append(DEBIAN_BINDIR)

    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir

    looked_in = ", ".join(str(path) for path in candidates)
    raise ClusterError(
        f"PostgreSQL server binaries (initdb, pg_ctl) not found in {looked_in}. "
        "Install them with `apt-get install postgresql-15 postgresql-15-wal2json` "
        "(or run `make install`)"
    )


def create_database(admin_dsn: str, name: str) -> bool:
    """Create database `name` if it is missing.

    Returns True when this call created it.
    """
    connection = psycopg2.connect(admin_dsn)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cursor.fetchone() is not None:
                return False

            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        connection.close()

    logger.info("created database %s", name)
    return True


def drop_database(admin_dsn: str, name: str, *, timeout: float = 10.0) -> None:
    """Drop database `name` with its replication slots, ending its sessions.

    Slots are dropped first because PostgreSQL cannot drop a database that
    a logical slot belongs to. Does nothing when the database is missing.
    """
    connection = psycopg2.connect(admin_dsn)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            _drop_slots_of_database(cursor, name, timeout)

            cursor.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)
                )
            )
    finally:
        connection.close()


def _drop_slots_of_database(
    cursor: psycopg2.extensions.cursor, database: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        # Ending the sessions of the database also ends the walsenders that
        # keep its slots active, and an active slot cannot be dropped.
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        )
        cursor.execute(
            "SELECT slot_name, active FROM pg_replication_slots WHERE database = %s",
            (database,),
        )
        slots = cursor.fetchall()
        if not slots:
            return

        for slot_name, active in slots:
            if not active:
                cursor.execute(
                    "SELECT pg_drop_replication_slot(slot_name)"
                    " FROM pg_replication_slots"
                    " WHERE slot_name = %s AND NOT active",
                    (slot_name,),
                )

        if time.monotonic() > deadline:
            names = ", ".join(slot_name for slot_name, _ in slots)
            raise ClusterError(
                f"timed out after {timeout} s dropping replication slots "
                f"{names} of database {database}, which are still active"
            )
        time.sleep(0.1)


class LocalCluster:
    """A PostgreSQL cluster in `data_dir`, listening on 127.0.0.1:`port`.

    The Unix socket is created inside `data_dir`, so the cluster never touches
    the system socket directory.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int,
        *,
        bindir: Path | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port
        self.timeout = timeout
        self._bindir = bindir

    def __repr__(self) -> str:
        return f"LocalCluster(data_dir={str(self.data_dir)!r}, port={self.port})"

    @property
    def bindir(self) -> Path:
        """Directory of the server binaries, located on first use."""
        if self._bindir is None:
            self._bindir = find_bindir()
        return self._bindir

    @property
    def log_path(self) -> Path:
        """Server log file, written by pg_ctl inside the data directory."""
        return self.data_dir / SERVER_LOG_NAME

    def dsn(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        """Return a libpq keyword connection string for `dbname` over TCP."""
        return make_dsn(host="127.0.0.1", port=self.port, dbname=dbname, user=user)

    def url(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        """Return a ``postgresql://`` connection URI for `dbname` over TCP."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def init(self) -> None:
        """Create the cluster unless `data_dir` contains one, then configure it."""
        exists = (self.data_dir / "PG_VERSION").exists()
        if not exists:
            self._prepare_directory()
        self._check_reachable()

        if not exists:
            self._run_initdb()
        self._configure()

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        if self.is_running():
            self._check_running_port()
            logger.info("PostgreSQL in %s is already running", self.data_dir)
            return

        self._check_socket_path()
        if is_port_in_use(self.port):
            raise ClusterError(
                f"cannot start PostgreSQL in {self.data_dir}: port {self.port} "
                "on 127.0.0.1 is already in use by another process. "
                "Choose a free port."
            )

        command = [
            str(self.bindir / "pg_ctl"),
            "start",
            "--wait",
            f"--timeout={int(self.timeout)}",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_path),
            "-o",
            f"-p {self.port}",
        ]
        result = self._run_as_owner(command)
        if result.returncode != 0:
            raise ClusterError(
                f"pg_ctl failed to start PostgreSQL in {self.data_dir} on port "
                f"{self.port} (exit code {result.returncode}):\n"
                f"{result.stdout.strip()}\n{self._log_tail_text()}"
            )
        logger.info(
            "started PostgreSQL in %s on 127.0.0.1:%d", self.data_dir, self.port
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server with pg_ctl's `mode`: smart, fast or immediate."""
        if mode not in STOP_MODES:
            raise ValueError(
                f"invalid stop mode {mode!r}: expected one of {STOP_MODES}"
            )
        if not self.is_running():
            return

        command = [
            str(self.bindir / "pg_ctl"),
            "stop",
            "--wait",
            f"--timeout={int(self.timeout)}",
            "-D",
            str(self.data_dir),
            "-m",
            mode,
        ]
        result = self._run_as_owner(command)
        if result.returncode != 0:
            raise ClusterError(
                f"pg_ctl failed to stop PostgreSQL in {self.data_dir} "
                f"(mode {mode}, exit code {result.returncode}):\n"
                f"{result.stdout.strip()}\n{self._log_tail_text()}"
            )
        logger.info("stopped PostgreSQL in %s (%s)", self.data_dir, mode)

    def restart(self, mode: str = "fast") -> None:
        """Stop the server with `mode`, then start it again on the same port."""
        self.stop(mode)
        self.start()

    def is_running(self) -> bool:
        """Return whether a server runs on `data_dir` (``pg_ctl status``)."""
        if not (self.data_dir / "PG_VERSION").exists():
            return False

        command = [str(self.bindir / "pg_ctl"), "status", "-D", str(self.data_dir)]
        result = self._run_as_owner(command)
        if result.returncode == 0:
            return True
        if result.returncode == _PG_CTL_NOT_RUNNING:
            return False
        raise ClusterError(
            f"pg_ctl status failed for {self.data_dir} "
            f"(exit code {result.returncode}): {result.stdout.strip()}"
        )

    def create_database(self, name: str) -> bool:
        """Create database `name` if it is missing.

        Returns True when this call created it.
        """
        return create_database(self.dsn(), name)

    def drop_database(self, name: str) -> None:
        """Drop database `name` and its replication slots, if it exists."""
        drop_database(self.dsn(), name)

    def log_tail(self, lines: int = 20) -> list[str]:
        """Return the last `lines` lines of the server log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        return text.splitlines()[-lines:]

    def _log_tail_text(self) -> str:
        tail = self.log_tail()
        if not tail:
            return f"(no server log at {self.log_path})"
        return f"last lines of {self.log_path}:\n" + "\n".join(tail)

    def _prepare_directory(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if _running_as_root():
            owner = _postgres_os_user()
            os.chown(self.data_dir, owner.pw_uid, owner.pw_gid)
        self.data_dir.chmod(0o700)

    def _check_reachable(self) -> None:
        if not _running_as_root():
            return

        # The server runs as the postgres OS user, which needs to reach the
        # directory through every parent, so a directory under /root fails.
        result = self._run_as_owner(["test", "-w", str(self.data_dir)])
        if result.returncode != 0:
            raise ClusterError(
                f"data directory {self.data_dir} is not writable by the "
                f"{POSTGRES_OS_USER} OS user. Use a directory under /tmp, or let "
                "that user reach it (chmod o+x on each parent directory)."
            )

    def _run_initdb(self) -> None:
        command = [
            str(self.bindir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ]
        result = self._run_as_owner(command)
        if result.returncode != 0:
            raise ClusterError(
                f"initdb failed for {self.data_dir} "
                f"(exit code {result.returncode}):\n{result.stdout.strip()}"
            )
        logger.info("initialised PostgreSQL cluster in %s", self.data_dir)

    def _configure(self) -> None:
        config_path = self.data_dir / "postgresql.conf"
        if _CONFIG_MARKER in config_path.read_text(encoding="utf-8"):
            return

        with config_path.open("a", encoding="utf-8") as config:
            config.write("\n" + "\n".join(self._config_lines()) + "\n")

        hba_path = self.data_dir / "pg_hba.conf"
        hba_path.write_text(_HBA_CONF, encoding="utf-8")
        if _running_as_root():
            owner = _postgres_os_user()
            os.chown(hba_path, owner.pw_uid, owner.pw_gid)

    def _config_lines(self) -> list[str]:
        lines = [
            _CONFIG_MARKER,
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{_quote_config(str(self.data_dir))}'",
            "wal_level = logical",
            "max_replication_slots = 20",
            "max_wal_senders = 20",
        ]

        # Some builds (Debian's 15.20) accept only the output plugins listed
        # in output_plugin_libraries, while builds without that setting reject
        # it as unknown. ALTER SYSTEM would quote the list as one name, so
        # the line is written here.
        default_plugins = self._output_plugin_libraries_default()
        if default_plugins is not None:
            plugins = [p.strip() for p in default_plugins.split(",") if p.strip()]
            if "wal2json" not in plugins:
                plugins.append("wal2json")
            lines.append(f"output_plugin_libraries = '{', '.join(plugins)}'")
        return lines

    def _output_plugin_libraries_default(self) -> str | None:
        """Return output_plugin_libraries's default, or None if the server lacks it."""
        result = self._run_as_owner(
            [str(self.bindir / "postgres"), "--describe-config"]
        )
        if result.returncode != 0:
            raise ClusterError(
                "postgres --describe-config failed "
                f"(exit code {result.returncode}): {result.stdout.strip()}"
            )

        # Each line is: name, context, group, type, default value, ...
        for line in result.stdout.splitlines():
            fields = line.split("\t")
            if fields[0] == "output_plugin_libraries":
                if len(fields) > 4 and fields[4].strip():
                    return fields[4]
                return _DEFAULT_OUTPUT_PLUGINS
        return None

    def _check_running_port(self) -> None:
        # The fourth line of postmaster.pid is the port the server listens on.
        pid_file = self.data_dir / "postmaster.pid"
        try:
            lines = pid_file.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return
        if len(lines) > 3 and lines[3].strip() != str(self.port):
            raise ClusterError(
                f"PostgreSQL in {self.data_dir} is already running on port "
                f"{lines[3].strip()}, not {self.port}. Stop it first or use that port."
            )

    def _check_socket_path(self) -> None:
        socket_path = self.data_dir / f".s.PGSQL.{self.port}"
        if len(str(socket_path)) > _MAX_SOCKET_PATH:
            raise ClusterError(
                f"data directory path {self.data_dir} is too long for the server's "
                f"Unix socket ({len(str(socket_path))} > {_MAX_SOCKET_PATH} "
                "characters). Use a shorter path."
            )

    def _run_as_owner(self, command: list[str]) -> subprocess.CompletedProcess[str]:
        if _running_as_root():
            owner = _postgres_os_user()
            command = ["runuser", "-u", owner.pw_name, "--", *command]

        # The working directory is "/" because the postgres OS user may not
        # be able to enter the caller's one.
        return subprocess.run(
            command,
            cwd="/",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            check=False,
        )


_HBA_CONF = """\
# TYPE  DATABASE     USER  ADDRESS       METHOD
local   all          all                 trust
local   replication  all                 trust
host    all          all   127.0.0.1/32  trust
host    replication  all   127.0.0.1/32  trust
"""


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _postgres_os_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(POSTGRES_OS_USER)
    except KeyError:
        raise ClusterError(
            f"OS user {POSTGRES_OS_USER!r} not found. PostgreSQL does not run as "
            "root, so install the postgresql-15 package (which creates that user) "
            "or run as a non-root user"
        ) from None


def _quote_config(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "''")
