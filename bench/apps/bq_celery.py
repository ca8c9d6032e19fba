"""Celery with the local Redis as broker: the reference point without Postgres.

Celery keeps no record of finished jobs unless a result backend is on (slow), so each
task counts itself in Redis (one pipelined round trip): ``bench:done``, and the first and
last finish times (``time.time()``), which the bench reads to time a drain.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from bq_common import record, sleep_seconds
from celery import Celery

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
QUEUE = "bench"

app = Celery("bq_celery", broker=REDIS_URL)
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_CELERY_PREFETCH", "16")),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
_counter = redis.Redis.from_url(REDIS_URL)


def _count() -> None:
    now = time.time()
    pipe = _counter.pipeline(transaction=False)
    pipe.incr("bench:done")
    pipe.set("bench:first", now, nx=True)
    pipe.set("bench:last", now)
    pipe.execute()


@app.task(name="noop")
def noop(**_: Any) -> None:
    _count()


@app.task(name="rec")
def rec(k: str, **_: Any) -> None:
    record(k)
    _count()


@app.task(name="sleep")
def sleep(k: str, ms: int = 0, **_: Any) -> None:
    record(k)
    time.sleep(sleep_seconds({"ms": ms}))
    _count()


TASKS: dict[str, Any] = {"noop": noop, "rec": rec, "sleep": sleep}


class Producer:
    async def one(self, kind: str, args: dict[str, Any]) -> None:
        TASKS[kind].apply_async(kwargs=args)

    async def many(self, kind: str, items: list[dict[str, Any]]) -> list[float]:
        """Celery has no bulk publish: one message per job, over one connection. Each
        message may run as soon as it is published, so this answers when each was."""
        task = TASKS[kind]
        published = []
        with app.producer_or_acquire() as producer:
            for args in items:
                task.apply_async(kwargs=args, producer=producer)
                published.append(time.monotonic())
        return published

    async def close(self) -> None:
        return None


async def make_producer(dsn: str) -> Producer:
    return Producer()
