"""`cdc-stream demo`: a private PostgreSQL, the app, and a trickle of trades.

The demo starts a `LocalCluster` in a project-local directory, loads the demo
schema, serves the app with Hypercorn, and writes a few exchange changes per
second until SIGINT or SIGTERM. It then stops the load, the app and the
cluster, in that order. Running it again reuses the cluster directory.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import psycopg2
import psycopg2.extensions

from .cluster import ClusterError, LocalCluster, is_port_in_use
from .errors import CdcStreamError

logger = logging.getLogger(__name__)

DEMO_DATABASE = "cdc_demo"
DEMO_SLOT = "cdc_stream_demo"
SCHEMA_FILE = "demo_schema.sql"
APP_STARTUP_TIMEOUT = 30.0
APP_STOP_TIMEOUT = 10.0
STATS_INTERVAL = 30.0

# Seconds between two load transactions, drawn uniformly: about 3 per second.
LOAD_INTERVAL = (0.15, 0.5)

USER_IDS = range(1, 51)
PRICE_QUANTUM = Decimal("0.0001")
STARTING_BALANCES = {
    "USD": Decimal("10000000"),
    "BTC": Decimal("100"),
    "ETH": Decimal("1000"),
    "SOL": Decimal("10000"),
}


class DemoError(CdcStreamError):
    """The demo cannot start. The message names the setting to change."""


@dataclass(frozen=True)
class DemoOptions:
    """Command-line options of `cdc-stream demo`."""

    data_dir: Path
    http_port: int
    pg_port: int


@dataclass
class Market:
    """A demo market and its current price, which drifts as a random walk."""

    id: str
    base: str
    quote: str
    price: Decimal
    tick_size: Decimal

    def drift(self, rng: random.Random) -> Decimal:
        """Move the price by a small random step and return the new price."""
        factor = Decimal(str(math.exp(rng.gauss(0.0, 0.002))))
        self.price = (self.price * factor).quantize(PRICE_QUANTUM)
        return self.price


def demo_markets() -> list[Market]:
    """Return the demo markets with their starting prices."""
    return [
        Market("BTC-USD", "BTC", "USD", Decimal("65000.0000"), Decimal("0.01")),
        Market("ETH-USD", "ETH", "USD", Decimal("3200.0000"), Decimal("0.01")),
        Market("SOL-USD", "SOL", "USD", Decimal("150.0000"), Decimal("0.01")),
        Market("ETH-BTC", "ETH", "BTC", Decimal("0.0492"), Decimal("0.0001")),
    ]


def run_demo(options: DemoOptions) -> int:
    """Run the demo until SIGINT or SIGTERM and return the process exit code."""
    stop = threading.Event()
    sql_dir = find_sql_dir()
    cluster = LocalCluster(options.data_dir / "pgdata", options.pg_port)

    # Callbacks run in reverse order: the load stops first, then the app,
    # then the cluster, also when a step in between fails.
    with ExitStack() as cleanup:
        cleanup.enter_context(_stop_on_signals(stop))
        _require_free_port(options.http_port, "--http-port")
        cleanup.callback(_stop_cluster, cluster)
        start_cluster(cluster)
        prepare_database(cluster, sql_dir)

        journal_path = options.data_dir / "journal.sqlite3"
        app = start_app(cluster, options.http_port, journal_path)
        cleanup.callback(stop_app, app)
        if not wait_for_app(app, options.http_port, stop):
            exit_code = 0 if stop.is_set() else 1
        else:
            env_file = write_env_file(options.data_dir, cluster, journal_path)
            print_banner(cluster, options.http_port, env_file)
            load = LoadGenerator(cluster.dsn(DEMO_DATABASE), demo_markets())
            cleanup.callback(load.close)
            exit_code = load.run(stop, app)
    return exit_code


def find_sql_dir() -> Path:
    """Return the repository's sql/ directory, which contains the demo schema."""
    candidates = [Path(__file__).resolve().parent.parent / "sql", Path.cwd() / "sql"]
    for candidate in candidates:
        if (candidate / SCHEMA_FILE).is_file():
            return candidate

    looked_in = ", ".join(str(candidate) for candidate in candidates)
    raise DemoError(
        f"{SCHEMA_FILE} not found in {looked_in}. Run the demo from a "
        "source checkout of cdc-stream, installed with `make install`"
    )


def start_cluster(cluster: LocalCluster) -> None:
    """Create the demo cluster unless it exists, and start it."""
    cluster.init()

    if not cluster.is_running():
        _require_free_port(cluster.port, "--pg-port")
    cluster.start()


def _require_free_port(port: int, option: str) -> None:
    if is_port_in_use(port):
        raise DemoError(
            f"port {port} on 127.0.0.1 is already in use. Stop the process "
            f"that uses it or pass {option} with a free port"
        )


def _stop_cluster(cluster: LocalCluster) -> None:
    try:
        cluster.stop("fast")
    except ClusterError:
        logger.exception("failed to stop PostgreSQL in %s", cluster.data_dir)


def prepare_database(cluster: LocalCluster, sql_dir: Path) -> None:
    """Create the demo database, load the schema and seed markets and balances."""
    cluster.create_database(DEMO_DATABASE)
    schema = (sql_dir / SCHEMA_FILE).read_text(encoding="utf-8")

    connection = psycopg2.connect(cluster.dsn(DEMO_DATABASE))
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(schema)
            _seed(cursor)
    finally:
        connection.close()
    logger.info("loaded the demo schema into database %s", DEMO_DATABASE)


def _seed(cursor: psycopg2.extensions.cursor) -> None:
    for market in demo_markets():
        cursor.execute(
            "INSERT INTO markets (id, base, quote, tick_size)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
            (market.id, market.base, market.quote, market.tick_size),
        )

    for user_id in USER_IDS:
        for currency, amount in STARTING_BALANCES.items():
            cursor.execute(
                "INSERT INTO user_balances (user_id, currency, balance)"
                " VALUES (%s, %s, %s) ON CONFLICT (user_id, currency) DO NOTHING",
                (user_id, currency, amount),
            )


def start_app(
    cluster: LocalCluster, http_port: int, journal_path: Path
) -> subprocess.Popen[bytes]:
    """Start ``hypercorn cdc_stream.app:app`` on 127.0.0.1:`http_port`."""
    _require_free_port(http_port, "--http-port")

    # Settings inherited from the shell could point the app at another
    # database, so the app gets only the demo's own.
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CDC_", "DATABASE_URL"))
    }
    env["DATABASE_URL"] = cluster.url(DEMO_DATABASE)
    env["CDC_SLOT_NAME"] = DEMO_SLOT
    # The journal stores positions of this cluster only, so it lives beside it.
    env["CDC_JOURNAL_PATH"] = str(journal_path)

    command = [
        sys.executable,
        "-m",
        "hypercorn",
        "cdc_stream.app:app",
        "--bind",
        f"127.0.0.1:{http_port}",
    ]
    # A process group of its own keeps the terminal's Ctrl-C away from
    # Hypercorn, so the demo stops it only after the load has stopped.
    process = subprocess.Popen(
        command, env=env, stdin=subprocess.DEVNULL, process_group=0
    )
    logger.info("started Hypercorn (pid %d) on 127.0.0.1:%d", process.pid, http_port)
    return process


def wait_for_app(
    process: subprocess.Popen[bytes],
    http_port: int,
    stop: threading.Event,
    timeout: float = APP_STARTUP_TIMEOUT,
) -> bool:
    """Wait until GET /healthz returns a response.

    Returns False when `stop` is set, the app exits or `timeout` s pass.
    """
    url = f"http://127.0.0.1:{http_port}/healthz"
    # An empty ProxyHandler keeps proxy variables from redirecting loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout

    while not stop.is_set():
        if process.poll() is not None:
            logger.error("Hypercorn exited with code %d", process.returncode)
            return False

        try:
            with opener.open(url, timeout=2.0):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            pass

        if time.monotonic() > deadline:
            logger.error(
                "timed out after %s s waiting for a response from %s", timeout, url
            )
            return False
        stop.wait(0.2)
    return False


def stop_app(
    process: subprocess.Popen[bytes], timeout: float = APP_STOP_TIMEOUT
) -> None:
    """Stop Hypercorn with SIGTERM, then SIGKILL after `timeout` s."""
    if process.poll() is not None:
        return

    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.warning(
            "Hypercorn still running %s s after SIGTERM, killing it", timeout
        )
        process.kill()
        process.wait()
    logger.info("stopped Hypercorn (pid %d)", process.pid)


def write_env_file(data_dir: Path, cluster: LocalCluster, journal_path: Path) -> Path:
    """Write the settings that point the command line at the demo, for `.`."""
    path = data_dir / "env"
    settings = {
        "DATABASE_URL": cluster.url(DEMO_DATABASE),
        "CDC_SLOT_NAME": DEMO_SLOT,
        "CDC_JOURNAL_PATH": str(journal_path.absolute()),
    }
    path.write_text(
        "".join(f"export {name}='{value}'\n" for name, value in settings.items()),
        encoding="utf-8",
    )
    return path


def print_banner(cluster: LocalCluster, http_port: int, env_file: Path) -> None:
    """Print what to run against the demo."""
    print(
        f"""
cdc-stream demo is running.
  Stream the changes:  curl -N localhost:{http_port}/api/realtime
  Only orders:         curl -N 'localhost:{http_port}/api/realtime?tables=orders'
  Dashboard:           http://127.0.0.1:{http_port}/
  Health:              curl localhost:{http_port}/healthz
  Database:            psql '{cluster.dsn(DEMO_DATABASE)}'
  Command line:        . {env_file} && .venv/bin/cdc-stream status
Press Ctrl-C to stop.
""",
        flush=True,
    )


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    def request_stop(signum: int, frame: object) -> None:
        if stop.is_set():
            return
        logger.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    previous = {
        signum: signal.signal(signum, request_stop)
        # SIGHUP: the terminal that runs the demo was closed.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_Action = Callable[[psycopg2.extensions.cursor], str]


class LoadGenerator:
    """Writer of random exchange activity: orders, fills, cancels, balances."""

    def __init__(
        self, dsn: str, markets: list[Market], rng: random.Random | None = None
    ) -> None:
        self.dsn = dsn
        self.markets = markets
        self.rng = rng or random.Random()
        self.counts: Counter[str] = Counter()
        self._connection: psycopg2.extensions.connection | None = None

        # Each action with its relative weight. Fills and cancels together
        # outweigh new orders, so the number of open orders stays small.
        self._actions: list[tuple[_Action, int]] = [
            (self._new_order, 35),
            (self._fill_order, 25),
            (self._cancel_order, 15),
            (self._update_balance, 15),
            (self._delete_cancelled_order, 10),
        ]

    def run(self, stop: threading.Event, app: subprocess.Popen[bytes]) -> int:
        """Write changes until `stop` is set and return the process exit code."""
        logger.info("writing demo changes to database %s", DEMO_DATABASE)
        last_report = time.monotonic()

        while not stop.is_set():
            if app.poll() is not None:
                logger.error("Hypercorn exited with code %d", app.returncode)
                return 1

            try:
                self.step()
            except psycopg2.OperationalError as error:
                logger.error("database connection failed: %s", _first_line(error))
                return 1

            if time.monotonic() - last_report >= STATS_INTERVAL:
                self._report()
                last_report = time.monotonic()
            stop.wait(self.rng.uniform(*LOAD_INTERVAL))

        self._report()
        return 0

    def step(self) -> str:
        """Run one random action in its own transaction and return its name."""
        actions = [action for action, _ in self._actions]
        weights = [weight for _, weight in self._actions]
        action = self.rng.choices(actions, weights)[0]

        connection = self._connect()
        try:
            with connection, connection.cursor() as cursor:
                name = action(cursor)
        except psycopg2.OperationalError:
            self.close()
            raise
        except psycopg2.Error as error:
            # The SQLSTATE and the primary message name no row values,
            # unlike the error's DETAIL line.
            logger.warning(
                "demo transaction failed (SQLSTATE %s): %s",
                error.pgcode,
                error.diag.message_primary,
            )
            return "failed"

        self.counts[name] += 1
        return name

    def close(self) -> None:
        """Close the database connection."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _connect(self) -> psycopg2.extensions.connection:
        if self._connection is None or self._connection.closed:
            self._connection = psycopg2.connect(self.dsn)
        return self._connection

    def _report(self) -> None:
        total = sum(self.counts.values())
        details = ", ".join(
            f"{name} {count}" for name, count in sorted(self.counts.items())
        )
        logger.info(
            "demo transactions written so far: %d (%s)", total, details or "none"
        )

    def _new_order(self, cursor: psycopg2.extensions.cursor) -> str:
        market = self.rng.choice(self.markets)
        order_type = "limit" if self.rng.random() < 0.8 else "market"
        price = None
        if order_type == "limit":
            spread = Decimal(str(self.rng.uniform(-0.01, 0.01)))
            price = (market.drift(self.rng) * (1 + spread)).quantize(PRICE_QUANTUM)

        cursor.execute(
            "INSERT INTO orders (market_id, user_id, side, quantity, price, type)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (
                market.id,
                self.rng.choice(USER_IDS),
                self.rng.choice(("buy", "sell")),
                self.rng.randint(1, 20),
                price,
                order_type,
            ),
        )
        return "new_order"

    def _fill_order(self, cursor: psycopg2.extensions.cursor) -> str:
        cursor.execute(
            "SELECT id, market_id, user_id, side, quantity, price FROM orders"
            " WHERE status = 'open' ORDER BY id DESC LIMIT 20 FOR UPDATE SKIP LOCKED"
        )
        open_orders = cursor.fetchall()
        if not open_orders:
            return self._new_order(cursor)

        order_id, market_id, user_id, side, quantity, price = self.rng.choice(
            open_orders
        )
        market = next(m for m in self.markets if m.id == market_id)
        if price is None:
            price = market.drift(self.rng)
        counterparty = self.rng.choice([u for u in USER_IDS if u != user_id])
        buyer, seller = (
            (user_id, counterparty) if side == "buy" else (counterparty, user_id)
        )

        cursor.execute(
            "UPDATE orders SET status = 'filled', updated_at = now() WHERE id = %s",
            (order_id,),
        )
        cursor.execute(
            "INSERT INTO trades"
            " (market_id, order_id, buyer_id, seller_id, quantity, price)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (market_id, order_id, buyer, seller, quantity, price),
        )

        cost = price * quantity
        _add_balance(cursor, buyer, market.base, Decimal(quantity))
        _add_balance(cursor, buyer, market.quote, -cost)
        _add_balance(cursor, seller, market.base, -Decimal(quantity))
        _add_balance(cursor, seller, market.quote, cost)
        return "fill_order"

    def _cancel_order(self, cursor: psycopg2.extensions.cursor) -> str:
        cursor.execute(
            "UPDATE orders SET status = 'cancelled', updated_at = now()"
            " WHERE id = (SELECT id FROM orders WHERE status = 'open'"
            " ORDER BY id LIMIT 1 OFFSET %s)",
            (self.rng.randint(0, 5),),
        )
        if cursor.rowcount == 0:
            return self._new_order(cursor)
        return "cancel_order"

    def _update_balance(self, cursor: psycopg2.extensions.cursor) -> str:
        currency = self.rng.choice(list(STARTING_BALANCES))
        amount = STARTING_BALANCES[currency] * Decimal(
            str(self.rng.uniform(-0.01, 0.02))
        )
        _add_balance(
            cursor, self.rng.choice(USER_IDS), currency, amount.quantize(PRICE_QUANTUM)
        )
        return "update_balance"

    def _delete_cancelled_order(self, cursor: psycopg2.extensions.cursor) -> str:
        cursor.execute(
            "DELETE FROM orders WHERE id = (SELECT id FROM orders"
            " WHERE status = 'cancelled' ORDER BY id LIMIT 1)"
        )
        if cursor.rowcount == 0:
            return self._cancel_order(cursor)
        return "delete_cancelled_order"


def _add_balance(
    cursor: psycopg2.extensions.cursor, user_id: int, currency: str, amount: Decimal
) -> None:
    cursor.execute(
        "INSERT INTO user_balances (user_id, currency, balance) VALUES (%s, %s, %s)"
        " ON CONFLICT (user_id, currency) DO UPDATE"
        " SET balance = user_balances.balance + EXCLUDED.balance, updated_at = now()",
        (user_id, currency, amount),
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
