"""Extends the leases of every job this worker holds, in one statement per interval, and
refreshes the worker's row in pgqueue.workers.

A job missing from the statement's result was taken away (its lease expired and the
reaper requeued it, or it was claimed again): the worker is told, so it can log it and
drop the result; the database already refuses that result either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from pgqueue import store
from pgqueue.log import get_logger
from pgqueue.models import Job
from pgqueue.worker.backoff import CONNECTION_ERRORS

log = get_logger("pgqueue.heartbeat")


class Heartbeat:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        lock: asyncio.Lock,
        held: Callable[[], list[Job]],
        on_lost: Callable[[list[Job]], None],
        register: Callable[[AsyncConnection[Any]], Awaitable[None]],
        *,
        interval: float,
        lease_seconds: float,
    ) -> None:
        self.pool = pool
        self.lock = lock
        self.held = held
        self.on_lost = on_lost
        self.register = register
        self.interval = interval
        self.lease_seconds = lease_seconds
        self.last_success: float | None = None

    async def run(self) -> None:
        """Beat now and every interval until cancelled; a failed beat is retried at the
        next one."""
        while True:
            try:
                await self.run_once()
            except CONNECTION_ERRORS as exc:
                log.warning("heartbeat.failed", error=str(exc).strip())
            except Exception:
                log.exception("heartbeat.failed")
            await asyncio.sleep(self.interval)

    async def run_once(self) -> tuple[int, list[Job]]:
        """Extend all held leases and refresh this worker's row; returns (extended, lost)."""
        lost: list[Job] = []
        extended: dict[int, bool] = {}
        # The lock keeps the completer from finishing a job between our snapshot and our
        # statement, which would make a finished job look like a lost lease.
        async with self.lock, self.pool.connection() as conn:
            jobs = self.held()
            if jobs:
                extended = await store.extend_leases(
                    conn,
                    ids=[j.id for j in jobs],
                    tokens=[j.lease_token for j in jobs],
                    lease_seconds=self.lease_seconds,
                )
                lost = [j for j in jobs if j.id not in extended]
                for job in jobs:
                    if extended.get(job.id):
                        job.cancel.set()
            await self.register(conn)
        self.last_success = asyncio.get_running_loop().time()
        if lost:
            self.on_lost(lost)
        return len(extended), lost
