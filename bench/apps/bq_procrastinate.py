"""procrastinate: the app (``procrastinate --app bq_procrastinate.app worker``) and the
producer."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import procrastinate
from bq_common import record, sleep_seconds

app = procrastinate.App(
    connector=procrastinate.PsycopgConnector(conninfo=os.environ.get("BENCH_DSN", ""))
)


@app.task(name="noop")
async def noop(**_: Any) -> None:
    return None


@app.task(name="rec")
async def rec(k: str, **_: Any) -> None:
    record(k)


@app.task(name="sleep")
async def sleep(k: str, ms: int = 0, **_: Any) -> None:
    record(k)
    await asyncio.sleep(sleep_seconds({"ms": ms}))


TASKS: dict[str, Any] = {"noop": noop, "rec": rec, "sleep": sleep}


class Producer:
    async def one(self, kind: str, args: dict[str, Any]) -> None:
        await TASKS[kind].defer_async(**args)

    async def many(self, kind: str, items: list[dict[str, Any]]) -> None:
        await TASKS[kind].batch_defer_async(*items)

    async def close(self) -> None:
        await app.connector.close_async()


async def make_producer(dsn: str) -> Producer:
    await app.connector.open_async()
    return Producer()
