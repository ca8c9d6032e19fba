"""Reconnect backoff shared by every long-running loop of the daemons."""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout

from pgqueue import metrics

# A write refused because the session is read-only: connected to a standby (a failover
# under way, a multi-host DSN without target_session_attrs=read-write) or started under
# default_transaction_read_only (maintenance; some managed services set it while the disk
# is full). As temporary as a lost connection, and treated the same way; the session is
# replaced (a session may keep the read-only default it started with: one set by ALTER
# DATABASE or ALTER ROLE; a reload or a promotion reaches it), and nothing it was
# writing is taken for refused: a worker's completer had dropped every outcome it wrote
# in such a window, and those jobs ran again once their leases expired.
READ_ONLY_ERRORS: tuple[type[BaseException], ...] = (psycopg.errors.ReadOnlySqlTransaction,)

# Errors that mean "the database is unreachable, the connection broke or cannot write for
# now": loops log them, back off and carry on. Anything else is a bug worth a traceback
# in the logs.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    PoolTimeout,
    OSError,
    *READ_ONLY_ERRORS,
)


# SQLSTATEs that end the session: connection exceptions (class 08) and the server
# shutting down or not accepting connections yet.
_SESSION_ENDING = ("08", "57P01", "57P02", "57P03")


def lost_connection(exc: BaseException, conn: Any = None) -> bool:
    """Whether ``exc`` means the connection is gone, rather than a statement refused on a
    sound one. A serialization failure, a deadlock, a cancelled statement or a lock
    timeout is an OperationalError too; those loops retry just the same, but their log
    event should not send an operator looking for a network fault. Errors raised by the
    client itself (no SQLSTATE: a socket closed, a pool timeout, an OSError) count as
    lost, as does any error on a connection psycopg marks closed or broken."""
    if conn is not None and (conn.closed or conn.broken):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    return not sqlstate or sqlstate.startswith(_SESSION_ENDING)


def error_fields(exc: BaseException) -> dict[str, Any]:
    """The fields a retrying loop logs about ``exc``: its message (its class name when
    the message is empty, as a timeout's is), its class and, from the server, SQLSTATE."""
    fields: dict[str, Any] = {
        "error": str(exc).strip() or type(exc).__name__,
        "error_type": type(exc).__name__,
    }
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate:
        fields["sqlstate"] = sqlstate
    return fields


def count_lost(component: str, exc: BaseException, conn: Any = None) -> bool:
    """Whether ``exc`` means a lost connection (lost_connection); if so, counted in
    pgqueue_db_disconnects_total for ``component``."""
    lost = lost_connection(exc, conn)
    if lost:
        metrics.DB_DISCONNECTS.labels(component).inc()
    return lost


def retry_event(component: str, exc: BaseException, conn: Any = None) -> str:
    """``<component>.disconnected`` for a lost connection (counted: count_lost),
    ``<component>.db_error`` for a statement the server refused on a sound one (both
    are retried with backoff)."""
    if count_lost(component, exc, conn):
        return f"{component}.disconnected"
    return f"{component}.db_error"


class Reconnects:
    """Tells the loops of a worker that its pool has made a new connection: the database
    answers again. Each loop gets an event of its own (``event()``), set at every new
    connection, which its ReconnectBackoff waits on beside the delay. Without it, after
    an outage the worker's claims waited out the fetcher's backoff (up to
    reconnect_max_seconds, 5-10 s by default) while the pool was connected already."""

    def __init__(self) -> None:
        self._events: list[asyncio.Event] = []

    def event(self) -> asyncio.Event:
        event = asyncio.Event()
        self._events.append(event)
        return event

    def connected(self) -> None:
        for event in self._events:
            event.set()


class ReconnectBackoff:
    """Exponential delays with jitter for reconnect attempts; ``reset()`` after success.
    With ``cut`` (an event of Reconnects), ``sleep`` ends early when it is set; with
    ``stop`` too, whenever ``stop`` is set (whoever sets ``stop`` sets ``cut`` as well,
    to wake the sleeper)."""

    def __init__(
        self,
        max_seconds: float,
        first_seconds: float = 0.1,
        *,
        cut: asyncio.Event | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.max_seconds = max_seconds
        self.first_seconds = first_seconds
        self.failures: int = 0
        self.cut = cut
        self.stop = stop
        self._cut_used = False

    def next_delay(self) -> float:
        self.failures += 1
        raw = min(self.max_seconds, self.first_seconds * 2 ** min(self.failures - 1, 20))
        return float(raw * (0.5 + random.random() / 2))

    def reset(self) -> None:
        self.failures = 0
        self._cut_used = False

    async def sleep(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or until ``cut`` is set meanwhile (a new connection:
        the next try goes at once, and the delays start over from the first). Only once
        until the next reset(): a database that takes connections and then fails every
        statement on them must not be retried at the pace of its connections. A cut set
        before this call (a connection made during the try that failed) does not count.
        A stop ends the sleep whether or not the cut is spent."""
        if self.cut is None:
            await asyncio.sleep(delay)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        self.cut.clear()
        while (left := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self.cut.wait()
            if not self.cut.is_set() or (self.stop is not None and self.stop.is_set()):
                return
            if not self._cut_used:
                self._cut_used = True
                self.failures = 0
                return
            self.cut.clear()  # the cut is spent until the next reset(): sleep on
