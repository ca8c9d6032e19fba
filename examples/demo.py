"""`make demo`: the whole life of pgqueue in one command.

Uses PGQUEUE_DSN's server if set (in a fresh database it creates and drops), else
starts an embedded Postgres under .pgqueue/. Migrates, enqueues jobs that succeed, retry
and dead-letter, runs a real pgqueue-worker and pgqueue-reaper, waits until every job is
final, prints a summary, stops everything (SIGTERM) and exits 0 only if all went right.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from pgqueue import JobSpec, enqueue, enqueue_many, migrate
from pgqueue.devdb import EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EXPECTED = {"succeeded": 28, "dead": 3}


def main() -> int:
    embedded: EmbeddedPostgres | None = None
    server = os.environ.get("PGQUEUE_DSN")
    if not server:
        print(
            "PGQUEUE_DSN is not set: starting an embedded Postgres in .pgqueue/demo-pg"
            " (set PGQUEUE_DSN to use a server of yours instead)"
        )
        embedded = EmbeddedPostgres(ROOT / ".pgqueue" / "demo-pg")
        server = embedded.dsn
    dbname = f"pgqueue_demo_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{dbname}"')  # type: ignore[arg-type]
    dsn = make_conninfo(server, dbname=dbname)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        return run(dsn, procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')  # type: ignore[arg-type]
        if embedded is not None:
            embedded.stop()


def run(dsn: str, procs: list[subprocess.Popen[bytes]]) -> int:
    applied = migrate(dsn)
    print(f"migrated: {', '.join(f'{m.version:04d}_{m.name}' for m in applied)}")

    with psycopg.connect(dsn) as conn:
        with conn.transaction():
            ids = enqueue_many(
                conn, [JobSpec("demo.greet", {"name": f"user{i}"}, queue="demo") for i in range(20)]
            )
            ids += [
                enqueue(
                    conn,
                    "demo.fetch",
                    {"url": f"https://example.test/{i}"},
                    queue="demo",
                    max_attempts=3,
                )
                for i in range(5)
            ]
            ids += [
                enqueue(conn, "demo.charge", {"amount": 100 * i}, queue="demo", max_attempts=3)
                for i in (1, 2)
            ]
            ids.append(enqueue(conn, "demo.parse", {"payload": "<xml?"}, queue="demo"))
            ids.append(enqueue(conn, "demo.greet", {"name": "later"}, queue="demo", delay=1.0))
            # Same idempotency key twice: one job.
            first = enqueue(conn, "demo.greet", {"name": "once"}, queue="demo", idempotency_key="k")
            again = enqueue(conn, "demo.greet", {"name": "once"}, queue="demo", idempotency_key="k")
            assert first == again
            ids.append(first)
        # A plain SQL insert, as any language could do it.
        conn.execute(
            "INSERT INTO pgqueue.jobs (task, queue, args) VALUES ('demo.greet', 'demo', %s)",
            ('{"name": "from SQL"}',),
        )
        conn.commit()
    print(f"enqueued {len(ids) + 1} jobs (one of them by plain SQL INSERT)")

    env = {**os.environ, "PGQUEUE_DSN": dsn, "PYTHONPATH": str(ROOT / "examples")}
    log_dir = ROOT / ".pgqueue"
    log_dir.mkdir(exist_ok=True)
    worker_log = open(log_dir / "demo-worker.log", "wb")  # noqa: SIM115
    reaper_log = open(log_dir / "demo-reaper.log", "wb")  # noqa: SIM115
    procs.append(
        subprocess.Popen(
            [
                str(BIN / "pgqueue-worker"),
                "--app",
                "demo_app:registry",
                "--concurrency",
                "4",
                "--log-format",
                "json",
            ],
            env=env,
            stdout=worker_log,
            stderr=subprocess.STDOUT,
        )
    )
    procs.append(
        subprocess.Popen(
            [str(BIN / "pgqueue-reaper"), "--interval", "1", "--log-format", "json"],
            env=env,
            stdout=reaper_log,
            stderr=subprocess.STDOUT,
        )
    )
    print("started pgqueue-worker and pgqueue-reaper; logs in .pgqueue/demo-*.log")

    deadline = time.monotonic() + 60
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            counts = dict(
                conn.execute(
                    "SELECT state::text, count(*) FROM pgqueue.jobs GROUP BY state"
                    " UNION ALL SELECT 'dead', count(*) FROM pgqueue.dead_jobs"
                ).fetchall()
            )
            if counts.get("succeeded", 0) + counts.get("dead", 0) >= sum(EXPECTED.values()):
                break
            if time.monotonic() > deadline:
                print(f"timed out waiting for the jobs: {counts}", file=sys.stderr)
                return 1
            time.sleep(0.2)
        retried = conn.execute(
            "SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded'"
            " AND jsonb_array_length(errors) > 0"
        ).fetchone()
        dead = conn.execute(
            "SELECT task, reason, attempts, errors->-1->>'error' FROM pgqueue.dead_jobs ORDER BY id"
        ).fetchall()

    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    codes = [proc.wait(timeout=30) for proc in procs]

    print()
    print(f"{'outcome':<28}{'jobs':>6}")
    print(f"{'succeeded':<28}{counts.get('succeeded', 0):>6}")
    print(f"{'  of which after a retry':<28}{retried[0] if retried else 0:>6}")
    print(f"{'dead-lettered':<28}{counts.get('dead', 0):>6}")
    for task, reason, attempts, error in dead:
        print(f"  {task:<14} {reason:<10} after {attempts} attempt(s): {error}")
    print(f"daemons exited with {codes} after SIGTERM")
    ok = (
        counts.get("succeeded") == EXPECTED["succeeded"]
        and counts.get("dead") == EXPECTED["dead"]
        and (retried[0] if retried else 0) == 5
        and codes == [0, 0]
    )
    print("demo OK" if ok else "demo FAILED")
    if not ok:
        shutil.copyfileobj(open(log_dir / "demo-worker.log"), sys.stderr)  # noqa: SIM115
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
