"""Extends the leases of every job this worker holds, in one statement per interval.

A job missing from the statement's result was taken away (its lease expired and the
reaper requeued it, or it was claimed again): the worker is told, so it can log it and
drop the result; the database already refuses that result either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

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
        *,
        interval: float,
        lease_seconds: float,
    ) -> None:
        self.pool = pool
        self.lock = lock
        self.held = held
        self.on_lost = on_lost
        self.interval = interval
        self.lease_seconds = lease_seconds
        self.last_success: float | None = None

    async def run(self) -> None:
        """Beat every interval until cancelled; a failed beat is retried at the next one."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.run_once()
            except CONNECTION_ERRORS as exc:
                log.warning("heartbeat.failed", error=str(exc).strip())
            except Exception:
                log.exception("heartbeat.failed")

    async def run_once(self) -> tuple[int, list[Job]]:
        """Extend all held leases; returns (extended, lost)."""
        # The lock keeps the completer from finishing a job between our snapshot and our
        # statement, which would make a finished job look like a lost lease.
        async with self.lock:
            jobs = self.held()
            if not jobs:
                self.last_success = asyncio.get_running_loop().time()
                return 0, []
            async with self.pool.connection() as conn:
                extended = await store.extend_leases(
                    conn,
                    ids=[j.id for j in jobs],
                    tokens=[j.lease_token for j in jobs],
                    lease_seconds=self.lease_seconds,
                )
            lost = [j for j in jobs if j.id not in extended]
        self.last_success = asyncio.get_running_loop().time()
        if lost:
            self.on_lost(lost)
        return len(extended), lost
