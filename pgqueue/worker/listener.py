"""The LISTEN connection: sets the wake-up event when a job for our queues is enqueued,
calls ``on_rescued`` (and wakes) when a rescued job of our queues is made runnable (it is
claimed only on its own check, which the worker then makes at once), and calls
``on_cancel`` when `pgqueue cancel` flags a job this worker runs (the heartbeat then
beats at once, handing the flag to the handler).

It owns one dedicated connection (LISTEN needs a session), reconnects with backoff when
it breaks, and wakes the fetcher (and has it check for rescued jobs) after every
reconnect, since notifications sent while it was away are lost, and has the heartbeat
beat at once after a reconnect, for a cancel sent meanwhile. It never claims anything
itself.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Collection
from typing import Any

import psycopg
from psycopg import sql

from pgqueue import store
from pgqueue.log import get_logger
from pgqueue.worker.backoff import (
    CONNECTION_ERRORS,
    ReconnectBackoff,
    Reconnects,
    error_fields,
    lost_connection,
    retry_event,
)

CHANNEL = "pgqueue_jobs"
# cancel_job's payload, before the worker's id: no queue name starts with white space.
CANCEL_PREFIX = " cancel "
# The payload for a rescued job made runnable (the reaper's requeue; a retry, snooze or
# release of one; run-now; a queue resumed), before its queue.
RESCUED_PREFIX = " rescued "
log: Any = get_logger("pgqueue.listener")


class Listener:
    def __init__(
        self,
        dsn: str,
        queues: Collection[str],
        wake: asyncio.Event,
        *,
        reconnect_max_seconds: float,
        worker_id: str = "",
        on_cancel: Callable[[], None] | None = None,
        on_rescued: Callable[[], None] | None = None,
        reconnects: Reconnects | None = None,
    ) -> None:
        self.dsn = dsn
        self.queues: frozenset[str] = frozenset(queues)
        self.wake = wake
        self.cancel_payload: str = CANCEL_PREFIX + worker_id
        self.on_cancel = on_cancel
        self.rescued_payloads: frozenset[str] = frozenset(
            RESCUED_PREFIX + queue for queue in self.queues
        )
        self.on_rescued = on_rescued
        # Cut short when the worker's pool makes a new connection (reconnects): the
        # database answers again.
        self.backoff: ReconnectBackoff = ReconnectBackoff(
            reconnect_max_seconds, cut=reconnects.event() if reconnects else None
        )
        self.connected: asyncio.Event = asyncio.Event()
        self._conn: psycopg.AsyncConnection[object] | None = None
        self.check_channel: str = f"pgqueue_check_{secrets.token_hex(6)}"
        # Whether the notification it sent itself on its current connection came back
        # (None: not yet, or not connected).
        self.notifications_arrive: bool | None = None
        # Whether a connection was lost (or never made) since the last one that listened:
        # the next one logs listener.reconnected. (Not the backoff's count of failures,
        # which a new connection of the pool sets back to 0.)
        self._lost = False

    async def run(self) -> None:
        """Listen until cancelled."""
        while True:
            try:
                async with await store.connect_async(
                    self.dsn, **store.application_name("pgqueue-worker")
                ) as conn:
                    self._conn = conn
                    await self._check_notifications(conn)
                    # Last: pg_stat_activity shows the listening connection by this query.
                    await conn.execute("LISTEN pgqueue_jobs")
                    reconnected = self._lost
                    self._lost = False
                    if reconnected:
                        log.info("listener.reconnected")
                    self.backoff.reset()
                    self.connected.set()
                    # Anything enqueued while we were not listening: go and look, for
                    # rescued jobs too.
                    self._look_again()
                    if reconnected and self.on_cancel:
                        # A cancel of a job this worker runs may have been sent meanwhile:
                        # beat now rather than at the next regular beat (a third of the
                        # lease) to hand its flag to the handler.
                        self.on_cancel()
                    async for note in conn.notifies():
                        if note.payload in self.queues and not self.wake.is_set():
                            self.wake.set()
                            # Let the fetcher send its claim before this task goes back
                            # to waiting on the socket (psycopg re-arms the reader and a
                            # timer first): about 0.07 ms of each idle job's latency.
                            await asyncio.sleep(0)
                        elif note.payload in self.rescued_payloads:
                            if self.on_rescued:
                                self.on_rescued()
                            self.wake.set()
                        elif note.payload == self.cancel_payload and self.on_cancel:
                            self.on_cancel()
                raise psycopg.OperationalError("the notification stream ended")
            except Exception as exc:
                self._lost = True
                self.notifications_arrive = None
                self.connected.clear()
                delay = self.backoff.next_delay()
                if isinstance(exc, CONNECTION_ERRORS):
                    log.warning(
                        retry_event("listener", exc),
                        **error_fields(exc),
                        retry_in=round(delay, 2),
                    )
                else:
                    log.exception("listener.failed", retry_in=round(delay, 2))
                self._look_again()
                await self.backoff.sleep(delay)
            finally:
                self._conn = None

    async def _check_notifications(self, conn: psycopg.AsyncConnection[object]) -> None:
        """Once listening, send this connection a notification on a channel of its own
        (no other worker hears it). Postgres delivers a session's own notification with
        the NOTIFY's answer, before it is ready for the next statement: missing, it means
        notifications do not reach this connection (a pooler in transaction mode,
        PgBouncer's default), and this worker would find jobs only at its poll without
        a word; `listener.notifications_lost` says so."""
        came_back: list[psycopg.Notify] = []

        def seen(note: psycopg.Notify) -> None:
            if note.channel == self.check_channel:
                came_back.append(note)

        # A handler, removed before the notifies() loop (psycopg warns when both are
        # used): the notification arrives with the NOTIFY's answer, before that loop.
        conn.add_notify_handler(seen)
        try:
            channel = sql.Identifier(self.check_channel)
            await conn.execute(sql.SQL("LISTEN {}").format(channel))
            await conn.execute(sql.SQL("NOTIFY {}").format(channel))
        except psycopg.Error as exc:
            if lost_connection(exc, conn):
                raise
            # A check the database refuses (its NOTIFY queue full, say) must not keep
            # the listener from listening.
            log.warning("listener.check_failed", **error_fields(exc))
            return
        finally:
            conn.remove_notify_handler(seen)
        self.notifications_arrive = bool(came_back)
        if not came_back:
            log.warning(
                "listener.notifications_lost",
                hint="a notification this worker sent itself did not come back:"
                " notifications do not reach this connection (a pooler in transaction"
                " mode?), so jobs are found only at --poll-interval; connect workers"
                " directly or through session pooling (README, PgBouncer)",
            )

    def _look_again(self) -> None:
        """Notifications sent while no connection listened are lost: wake the fetcher,
        and have it check for rescued jobs too."""
        if self.on_rescued:
            self.on_rescued()
        self.wake.set()
