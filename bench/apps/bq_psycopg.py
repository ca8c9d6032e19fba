"""The driver's own ceiling: the raw single-row insert through psycopg, no queue library.

Not a queue: a reference, for information, beside the one-job-per-transaction enqueue
figures. Each call does what a synchronous Python producer on psycopg must do at the
least for one job, one round trip each: encode the args as JSON and run one prepared
``INSERT ... RETURNING id`` with the task and args as parameters in its own (autocommit)
transaction, into the bench's raw table (pgqueue.jobs' columns, defaults and indexes,
without its trigger; the table pgbench's raw insert writes literal values to).
"""

from __future__ import annotations

import json
from typing import Any

import psycopg

INSERT = "INSERT INTO bench_raw.jobs (task, args) VALUES (%s, %s::jsonb) RETURNING id"


class Producer:
    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)

    async def one(self, kind: str, args: dict[str, Any]) -> None:
        self.conn.execute(INSERT, (kind, json.dumps(args)), prepare=True).fetchone()

    async def many(self, kind: str, items: list[dict[str, Any]]) -> None:
        raise NotImplementedError("the psycopg reference has no bulk API")

    async def close(self) -> None:
        self.conn.close()


async def make_producer(dsn: str) -> Producer:
    return Producer(dsn)
