"""The `cdc-stream` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import cli_check, cli_journal, tail
from .demo import DemoOptions, run_demo
from .errors import CdcStreamError

DEFAULT_DEMO_DIR = Path(".cdc-demo")
DEFAULT_HTTP_PORT = 8000
DEFAULT_PG_PORT = 54329


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command named in `argv`; return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.command)

    try:
        return args.run(args)
    except CdcStreamError as error:
        print(f"cdc-stream {args.command}: error: {error}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="cdc-stream",
        description="Stream PostgreSQL row changes as Server-Sent Events.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo_command(commands)
    cli_journal.add_commands(commands)
    cli_check.add_command(commands)
    tail.add_command(commands)
    return parser


def _add_demo_command(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="run a local PostgreSQL, the app and a generated load",
        description=(
            "Start a private PostgreSQL cluster on 127.0.0.1, load the demo "
            "schema, serve the app with Hypercorn and write a few changes per "
            "second until Ctrl-C. Running it again reuses the cluster."
        ),
    )
    demo.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DEMO_DIR,
        help="directory for the demo's files; the cluster lives in its pgdata/ "
        "(default: %(default)s)",
    )
    demo.add_argument(
        "--http-port",
        type=_port,
        default=DEFAULT_HTTP_PORT,
        help="TCP port of the app on 127.0.0.1 (default: %(default)s)",
    )
    demo.add_argument(
        "--pg-port",
        type=_port,
        default=DEFAULT_PG_PORT,
        help="TCP port of PostgreSQL on 127.0.0.1 (default: %(default)s)",
    )
    demo.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    options = DemoOptions(
        data_dir=args.data_dir.absolute(),
        http_port=args.http_port,
        pg_port=args.pg_port,
    )
    return run_demo(options)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {port}: expected 1 to 65535")
    return port


def _configure_logging(command: str) -> None:
    # The demo reports its progress; the other commands print their results
    # on stdout and log only warnings and errors.
    logging.basicConfig(
        level=logging.INFO if command == "demo" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


if __name__ == "__main__":
    sys.exit(main())
