"""Reconnect backoff shared by every long-running loop of the daemons."""

from __future__ import annotations

import random

import psycopg
from psycopg_pool import PoolTimeout

# Errors that mean "the database is unreachable or the connection broke": loops log
# them, back off and carry on. Anything else is a bug worth a traceback in the logs.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    PoolTimeout,
    OSError,
)


class ReconnectBackoff:
    """Exponential delays with jitter for reconnect attempts; ``reset()`` after success."""

    def __init__(self, max_seconds: float, first_seconds: float = 0.1) -> None:
        self.max_seconds = max_seconds
        self.first_seconds = first_seconds
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        raw = min(self.max_seconds, self.first_seconds * 2 ** min(self.failures - 1, 20))
        return float(raw * (0.5 + random.random() / 2))

    def reset(self) -> None:
        self.failures = 0
