"""pgqueue: the tasks (``pgqueue-worker --app bq_pgqueue:registry``) and the producer."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from bq_common import record, sleep_seconds

from pgqueue import JobSpec, Registry, enqueue, enqueue_many

registry = Registry()


@registry.task(name="noop")
async def noop(**_: Any) -> None:
    return None


@registry.task(name="rec")
async def rec(k: str, **_: Any) -> None:
    record(k)


@registry.task(name="sleep")
async def sleep(k: str, ms: int = 0, **_: Any) -> None:
    record(k)
    await asyncio.sleep(sleep_seconds({"ms": ms}))


class Producer:
    """One job per transaction is one autocommit statement: the documented sync API."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)

    async def one(self, kind: str, args: dict[str, Any]) -> None:
        enqueue(self.conn, kind, args)

    async def many(self, kind: str, items: list[dict[str, Any]]) -> None:
        enqueue_many(self.conn, [JobSpec(kind, a) for a in items])

    async def close(self) -> None:
        self.conn.close()


async def make_producer(dsn: str) -> Producer:
    return Producer(dsn)
