"""Stream PostgreSQL row changes from a wal2json slot as Server-Sent Events."""

from __future__ import annotations

__version__ = "0.1.0"
