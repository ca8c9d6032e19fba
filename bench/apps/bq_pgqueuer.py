"""PgQueuer: entrypoints, the worker (its Python API ``pgqueuer.run``, as ``pgq run`` would
call it, since ``pgq run`` crashes with typer 0.29) and the producer, on asyncpg.

    python -m bq_pgqueuer --batch-size 10 [--max-concurrent-tasks N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import asyncpg
import pgqueuer
from bq_common import record, sleep_seconds
from pgqueuer import Job, QueueManager
from pgqueuer.db import AsyncpgDriver
from pgqueuer.queries import Queries


def _args(job: Job) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(job.payload) if job.payload else {}
    return loaded


@asynccontextmanager
async def factory() -> AsyncIterator[QueueManager]:
    conn = await asyncpg.connect(os.environ["BENCH_DSN"])
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint("noop")
    async def noop(job: Job) -> None:
        _args(job)

    @qm.entrypoint("rec")
    async def rec(job: Job) -> None:
        record(_args(job)["k"])

    @qm.entrypoint("sleep")
    async def sleep(job: Job) -> None:
        args = _args(job)
        record(args["k"])
        await asyncio.sleep(sleep_seconds(args))

    try:
        yield qm
    finally:
        await conn.close()


class Producer:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.queries = Queries(AsyncpgDriver(conn))

    async def one(self, kind: str, args: dict[str, Any]) -> None:
        await self.queries.enqueue(kind, json.dumps(args).encode())

    async def many(self, kind: str, items: list[dict[str, Any]]) -> None:
        await self.queries.enqueue(
            [kind] * len(items), [json.dumps(a).encode() for a in items], [0] * len(items)
        )

    async def close(self) -> None:
        await self.conn.close()


async def make_producer(dsn: str) -> Producer:
    return Producer(await asyncpg.connect(dsn))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--max-concurrent-tasks", type=int, default=0)
    opts = parser.parse_args()
    asyncio.run(
        pgqueuer.run(
            factory,
            batch_size=opts.batch_size,
            max_concurrent_tasks=opts.max_concurrent_tasks or None,
            dequeue_timeout=timedelta(seconds=30),
        )
    )


if __name__ == "__main__":
    main()
