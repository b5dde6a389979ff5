"""Log format (`[logging] format = "text"` or `"json"`) and repeat limiting.

`configure` runs when the app starts serving. It sets the format of
cdc_stream's handler and of Hypercorn's error and access log handlers, and
adds `RepeatLimiter` to every one but the access log, whose lines are all
different requests.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

import orjson

REPEAT_BURST = 5
REPEAT_WINDOW_SECONDS = 60.0
_TEXT_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"
_HANDLED_LOGGERS = ("cdc_stream", "hypercorn.error", "hypercorn.access")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, process."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        suppressed = getattr(record, "suppressed_repeats", 0)
        if suppressed:
            entry["suppressed_repeats"] = suppressed
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class RepeatLimiter(logging.Filter):
    """Pass at most `burst` records of one message per window.

    Records are the same when their formatted messages are, so a new error
    logged through the same template is not held back by an older one.

    The first record passed in a later window reports how many were dropped,
    in its message and in the `suppressed_repeats` attribute.
    """

    def __init__(
        self, burst: int = REPEAT_BURST, window: float = REPEAT_WINDOW_SECONDS
    ) -> None:
        super().__init__()
        self._burst = burst
        self._window = window
        self._lock = threading.Lock()
        # (logger, level, message) -> [window start, passed, dropped]
        self._seen: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        now = time.monotonic()
        with self._lock:
            state = self._seen.get(key)
            if state is None or now - state[0] >= self._window:
                dropped = int(state[2]) if state is not None else 0
                self._seen[key] = [now, 1, 0]
                self._forget_old(now)
                if dropped:
                    record.suppressed_repeats = dropped
                    record.msg = f"{record.msg} [{dropped} repeats suppressed]"
                return True
            if state[1] < self._burst:
                state[1] += 1
                return True
            state[2] += 1
            return False

    def _forget_old(self, now: float) -> None:
        if len(self._seen) < 1000:
            return
        for key in [k for k, s in self._seen.items() if now - s[0] >= self._window]:
            del self._seen[key]


def configure(log_format: str) -> None:
    """Apply the format and repeat limiting to the handlers of this process."""
    package = logging.getLogger("cdc_stream")
    if not package.handlers and not logging.getLogger().handlers:
        package.addHandler(logging.StreamHandler())
        package.setLevel(logging.INFO)

    formatter: logging.Formatter = (
        JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT)
    )
    for name in _HANDLED_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            # Hypercorn's own text format is kept unless JSON is asked for.
            if name == "cdc_stream" or log_format == "json":
                handler.setFormatter(formatter)
            if name != "hypercorn.access" and not _has_limiter(handler):
                handler.addFilter(RepeatLimiter())


def _has_limiter(handler: logging.Handler) -> bool:
    return any(isinstance(f, RepeatLimiter) for f in handler.filters)
