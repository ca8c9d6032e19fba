"""Oban for Python (runs in its own Python 3.12 venv): the workers, resolved by
``oban start`` from the path stored in each job (``bq_oban.Noop``), and the producer."""

from __future__ import annotations

import asyncio
from typing import Any

from bq_common import record, sleep_seconds
from oban import Oban, worker
from psycopg_pool import AsyncConnectionPool


@worker(queue="default")
class Noop:
    async def process(self, job: Any) -> None:
        return None


@worker(queue="default")
class Rec:
    async def process(self, job: Any) -> None:
        record(job.args["k"])


@worker(queue="default")
class Sleep:
    async def process(self, job: Any) -> None:
        record(job.args["k"])
        await asyncio.sleep(sleep_seconds(job.args))


WORKERS: dict[str, Any] = {"noop": Noop, "rec": Rec, "sleep": Sleep}


class Producer:
    def __init__(self, pool: AsyncConnectionPool, oban: Oban) -> None:
        self.pool = pool
        self.oban = oban

    async def one(self, kind: str, args: dict[str, Any]) -> None:
        await self.oban.enqueue(WORKERS[kind].new(args))

    async def many(self, kind: str, items: list[dict[str, Any]]) -> None:
        await self.oban.enqueue_many([WORKERS[kind].new(a) for a in items])

    async def close(self) -> None:
        await self.pool.close()


async def make_producer(dsn: str) -> Producer:
    # Client mode (no queues), as the docs show for an app that only enqueues.
    pool = await Oban.create_pool(dsn, min_size=1, max_size=1)
    return Producer(pool, Oban(pool=pool))
