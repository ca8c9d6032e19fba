"""Extends the leases of every job this worker holds, in one statement per interval, and
refreshes the worker's row in pgqueue.workers. A cancel request for one of its jobs
(the listener's notification) brings the next beat forward, which hands the flag to the
handler.

A job missing from the statement's result was taken away (its lease expired and the
reaper requeued it, or it was claimed again): the worker is told, so it can log it and
drop the result; the database already refuses that result either way.

The other way round, a job can run under this worker's name without the worker holding
it: its claim committed but the reply was lost with the connection, or (with
--async-commit) a Postgres crash undid its outcome. Each beat also returns such orphans
to the queue (store.release_orphans), while no claim of this worker is in flight, so
they need not wait for their lease and then run alone as if this worker had died.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from pgqueue import store
from pgqueue.log import get_logger
from pgqueue.models import Job
from pgqueue.worker.backoff import (
    CONNECTION_ERRORS,
    ReconnectBackoff,
    Reconnects,
    count_lost,
    error_fields,
)

log: Any = get_logger("pgqueue.heartbeat")


class Heartbeat:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        held: Callable[[], list[Job]],
        settling: Callable[[list[Job]], set[Job]],
        on_lost: Callable[[list[Job]], None],
        register: Callable[[AsyncConnection[Any]], Awaitable[None]],
        *,
        interval: float,
        lease_seconds: float,
        worker_id: str,
        claiming: asyncio.Lock,
        refused: Callable[[], list[uuid.UUID]],
        reconnects: Reconnects | None = None,
    ) -> None:
        self.pool: AsyncConnectionPool = pool
        self.held = held
        # Of the given attempts, those that no longer need their lease, or may not: no
        # longer held (the outcome was written), or with an outcome waiting to be written
        # or being written (it may have committed). Such a job missing from a beat's
        # result has not lost its lease (if it has, the completer's write is fenced off
        # and says so).
        self.settling = settling
        self.on_lost = on_lost
        self.register = register
        self.interval = interval
        self.lease_seconds = lease_seconds
        self.worker_id = worker_id
        # Held by the fetcher from sending a claim until its jobs are held.
        self.claiming = claiming
        # Tokens of outcomes the database refused: their jobs are left to the reaper.
        self.refused = refused
        # Set when the pool makes a new connection: it cuts a failed beat's backoff short.
        self.reconnected: asyncio.Event | None = reconnects.event() if reconnects else None
        self.last_success: float | None = None
        # Set to beat before the interval is up (a job of this worker was cancelled); an
        # early beat comes at least min_gap after the one before.
        self._soon = asyncio.Event()
        self.min_gap: float = min(1.0, interval / 10)
        # How many times beat_soon was called: a claim in flight when a cancel request
        # came asks for one more beat once its jobs are held (the early beat may have
        # missed them).
        self.soon_requests: int = 0

    def beat_soon(self) -> None:
        """Beat now rather than at the end of the interval (at least ``min_gap`` after
        the last beat; not while failed beats back off): the beat hands a cancel request
        to its handler. Requests that come while a beat runs make one more."""
        self.soon_requests += 1
        self._soon.set()

    async def run(self) -> None:
        """Beat now and every interval (sooner on beat_soon) until cancelled. A failed
        beat is retried soon, with backoff up to the interval: after Postgres restarts
        (or its backends are terminated) every pooled connection is dead, and the pool
        hands each one out once before it finds out. Waiting a whole interval per dead
        connection let three beats fail in a row, and the leases of healthy jobs
        expired."""
        backoff = ReconnectBackoff(self.interval, cut=self.reconnected)
        while True:
            started = time.monotonic()
            try:
                await self.run_once()
                backoff.reset()
            except CONNECTION_ERRORS as exc:
                count_lost("heartbeat", exc)
                log.warning("heartbeat.failed", **error_fields(exc))
                await backoff.sleep(min(self.interval, backoff.next_delay()))
                continue
            except Exception:
                log.exception("heartbeat.failed")
                await asyncio.sleep(min(self.interval, backoff.next_delay()))
                continue
            # After a good beat, a cancel request may bring the next one forward, but
            # not closer than min_gap to this one: notifications (which any session may
            # send) cannot make the worker beat without pause.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._soon.wait()
            self._soon.clear()
            await asyncio.sleep(max(0.0, started + self.min_gap - time.monotonic()))

    async def run_once(self) -> tuple[int, list[Job]]:
        """Extend all held leases and refresh this worker's row; returns (extended, lost)."""
        lost: list[Job] = []
        extended: dict[uuid.UUID, bool] = {}
        busy: list[int] = []
        # Not serialised with the completer: a statement of the completer that waits for
        # a row lock (a session holding a job's row) must not hold back every lease.
        # Instead, a job the completer finished or is finishing meanwhile is not taken
        # for lost (settling).
        async with self.pool.connection() as conn:
            jobs = self.held()
            if jobs:
                extended, locked = await store.heartbeat_leases(
                    conn,
                    ids=[j.id for j in jobs],
                    tokens=[j.lease_token for j in jobs],
                    lease_seconds=self.lease_seconds,
                )
                # Keyed by token, not id: see the query.
                missing = [
                    j for j in jobs if j.lease_token not in extended and j.lease_token not in locked
                ]
                busy = [j.id for j in jobs if j.lease_token in locked]
                if missing:
                    settling = self.settling(missing)
                    lost = [j for j in missing if j not in settling]
                for job in jobs:
                    if extended.get(job.lease_token):
                        job.cancel.set()
            await self.register(conn)
        self.last_success = time.monotonic()
        if busy:
            # Another session holds these rows locked: their leases wait for the next
            # beat (the others were extended).
            log.warning("heartbeat.rows_locked", job_ids=sorted(busy)[:100])
        if lost:
            self.on_lost(lost)
        await self.release_orphans()
        return len(extended), lost

    async def release_orphans(self) -> dict[int, str]:
        """Return the jobs running under this worker's name that it does not hold to the
        queue; {id: state now}. Under the claim lock (no claim in flight, so every job
        this worker claimed is held; a job leaves the held ones only once its outcome is
        written or its lease found lost, so a write in flight cannot look orphaned).
        Waits for a claim in flight to end: the lock serves its waiters first, so a
        fetcher claiming back to back (a backlog) lets this in between two claims. A
        claim stuck on the server must not hold up the heartbeat, whose first duty is to
        extend the leases (done before this): after a short wait this is skipped until
        the next beat."""
        try:
            async with asyncio.timeout(min(1.0, self.interval / 2)):
                await self.claiming.acquire()
        except TimeoutError:
            return {}
        try:
            async with self.pool.connection() as conn:
                keep = [j.lease_token for j in self.held()] + self.refused()
                released = await store.release_orphans(conn, worker_id=self.worker_id, keep=keep)
        finally:
            self.claiming.release()
        if released:
            log.warning(
                "jobs.orphans_released", count=len(released), job_ids=sorted(released)[:100]
            )
        return released
