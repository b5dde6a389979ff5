"""Exceptions raised by cdc-stream."""

from __future__ import annotations


class CdcStreamError(Exception):
    """Base class of every error raised by cdc-stream."""


class ConfigError(CdcStreamError, ValueError):
    """A configuration value is missing or invalid; the message names the key."""


class SetupError(CdcStreamError):
    """The database is not ready for streaming; the message names what to change."""


class SlotInUseError(SetupError):
    """Another process streams the replication slot."""


class DecodeError(CdcStreamError, ValueError):
    """A wal2json message cannot be parsed."""


class InvalidPositionError(CdcStreamError, ValueError):
    """An event id, LSN or time given as a resume point cannot be parsed."""
