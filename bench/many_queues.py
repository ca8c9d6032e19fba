"""Drain over many queues: pgqueue workers serving every queue of a backlog spread over them.

``python -m bench.many_queues [--queues N] [--jobs-per-queue N] [--processes N]
[--concurrency N] [--repeat N]`` enqueues ``queues x jobs-per-queue`` no-op jobs (round
robin over queues ``q0``, ``q1``, ...) into a fresh database, starts one
``pgqueue-worker --queues q0,q1,... --processes P --concurrency C`` from this checkout,
and times the drain from the first job done to the last, with the WAL Postgres wrote
meanwhile (a claim's row locks are WAL records). It prints one line per repetition and
the median. pgqueue only: the competitors' figures are in ``make bench``. The claim over
several queues (claim_jobs_many, in pgqueue/sql/worker.sql) was tuned with it; issue 5's
notes give the figures before and after.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.db import create_database, drop_database
from pgqueue import JobSpec, enqueue_many
from pgqueue.migrate import migrate

ROOT = Path(__file__).resolve().parent.parent
DATABASE = "bench_many_queues"


def _scalar(conn: psycopg.Connection[Any], query: Any, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def drain_once(
    admin_dsn: str, queues: list[str], per_queue: int, processes: int, concurrency: int
) -> tuple[float, float]:
    """Jobs per second and MiB of WAL of one drain."""
    dsn = create_database(admin_dsn, DATABASE)
    try:
        migrate(dsn)
        total = len(queues) * per_queue
        with psycopg.connect(dsn) as conn:
            specs = [JobSpec("noop", {}, queue=queues[i % len(queues)]) for i in range(total)]
            for start in range(0, total, 50_000):
                enqueue_many(conn, specs[start : start + 50_000])
            conn.commit()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE pgqueue.jobs")
            wal_start = _scalar(conn, "SELECT pg_current_wal_lsn()")
            env = {**os.environ, "PYTHONPATH": f"{ROOT / 'bench' / 'apps'}:{ROOT}"}
            worker = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "pgqueue-worker"),
                    "--app", "bq_pgqueue:registry", "--dsn", dsn,
                    "--queues", ",".join(queues), "--processes", str(processes),
                    "--concurrency", str(concurrency), "--log-level", "warning",
                ],
                env=env,
                start_new_session=True,
            )  # fmt: skip
            try:
                done = "SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded'"
                while _scalar(conn, done) == 0:
                    time.sleep(0.01)
                started = time.monotonic()
                while int(_scalar(conn, done)) < total:
                    time.sleep(0.05)
                seconds = time.monotonic() - started
                wal = _scalar(conn, "SELECT pg_current_wal_lsn() - %s::pg_lsn", (wal_start,))
            finally:
                os.killpg(worker.pid, signal.SIGTERM)
                worker.wait(60)
        return total / seconds, float(wal) / 2**20
    finally:
        drop_database(admin_dsn, DATABASE)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--queues", type=int, default=50)
    p.add_argument("--jobs-per-queue", type=int, default=3000)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    o = p.parse_args()
    queues = [f"q{i}" for i in range(o.queues)]
    rates: list[float] = []
    wals: list[float] = []
    for n in range(o.repeat):
        rate, wal = drain_once(o.admin_dsn, queues, o.jobs_per_queue, o.processes, o.concurrency)
        rates.append(rate)
        wals.append(wal)
        print(f"run {n + 1}: {rate:,.0f} jobs/s, {wal:,.1f} MiB of WAL", flush=True)
    print(
        f"{o.queues} queues x {o.jobs_per_queue:,} jobs, {o.processes} processes at"
        f" --concurrency {o.concurrency}: median {statistics.median(rates):,.0f} jobs/s"
        f" ({min(rates):,.0f}-{max(rates):,.0f}), {statistics.median(wals):,.1f} MiB of WAL"
    )


if __name__ == "__main__":
    main()
