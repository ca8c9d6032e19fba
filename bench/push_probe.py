"""How much light-load latency a producer-side hand-off ("push") would save: a probe.

``python -m bench.push_probe [--jobs 300] [--rate 50] [--rounds 3]``

Alternates two ways of getting a job from a producer's commit to a handler, on the same
server, each round in a fresh database:

- **pgqueue**: a real ``pgqueue-worker`` (concurrency 1000, idle). The insert trigger
  notifies; the worker claims (one statement and its commit) and starts the handler.
- **push prototype**: a BEFORE INSERT trigger that hands the job to a registered idle
  waiter inside the producer's transaction (marks it running under a lease in the
  waiter's name) and notifies that waiter with the job's id, token, task and args. The
  waiter process starts its "handler" on the notification alone: no claim round trip,
  no second commit.

The prototype is an experiment, not part of pgqueue: its waiter's slots are never given
back, it matches no queue, it has no fencing, no paused queues and no recovery of a
hand-off whose notification is lost, its notification would be refused for args over
8000 bytes, its per-row trigger would slow bulk inserts, and its waiter writes no
outcome and sends no heartbeat (the comparison ends at the handler's start).
docs/worker.md ("Where an idle worker's latency goes") says what a real design needs.
The probe prints each path's enqueue-to-start latency (p50 / p95 / p99; handler start
minus the time the producer's commit returned, CLOCK_MONOTONIC) and the producer's
enqueue time. pgqueue's worker runs from bench/.venvs/pgqueue, as in ``make bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from bench import db, procs
from bench.measure import percentile, read_records
from bench.systems import BENCH_DIR
from pgqueue import enqueue, migrate

# One database per probe process: two probes at once must not drop each other's.
DATABASE = f"pgqueue_push_probe_{os.getpid()}"
WAIT_SECONDS = 30.0
PROTOTYPE_SQL = """
CREATE TABLE pgqueue.probe_waiters (worker text PRIMARY KEY, slots integer NOT NULL);
CREATE FUNCTION pgqueue.probe_hand_off() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    w text;
BEGIN
    IF NEW.state <> 'queued' OR NEW.run_at > now() THEN
        RETURN NEW;
    END IF;
    SELECT worker INTO w FROM pgqueue.probe_waiters
    WHERE slots > 0 LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN NEW;
    END IF;
    UPDATE pgqueue.probe_waiters SET slots = slots - 1 WHERE worker = w;
    NEW.state := 'running';
    NEW.lease_token := gen_random_uuid();
    NEW.leased_by := w;
    NEW.attempts := NEW.attempts + 1;
    NEW.attempted_at := now();
    NEW.lease_expires_at := now() + interval '30 seconds';
    PERFORM pg_notify('pgqueue_push_probe', json_build_object(
        'id', NEW.id, 'token', NEW.lease_token, 'task', NEW.task, 'args', NEW.args)::text);
    RETURN NEW;
END
$$;
CREATE TRIGGER probe_hand_off BEFORE INSERT ON pgqueue.jobs
    FOR EACH ROW EXECUTE FUNCTION pgqueue.probe_hand_off();
"""


def waiter(dsn: str, jobs: int) -> None:
    """The push path's worker: register, then start a handler task per notification, on
    an asyncio loop and an async connection as pgqueue's worker does."""
    sys.path.insert(0, str(BENCH_DIR / "apps"))
    from bq_common import record

    async def handler(job: dict[str, Any]) -> None:
        record(job["args"]["k"])

    async def run() -> None:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        async with conn:
            await conn.execute("LISTEN pgqueue_push_probe")
            await conn.execute("INSERT INTO pgqueue.probe_waiters VALUES ('probe', 1000000)")
            tasks: set[asyncio.Task[None]] = set()
            # A timeout, so that a waiter whose probe died does not wait forever.
            async for note in conn.notifies(stop_after=jobs, timeout=WAIT_SECONDS + jobs):
                task = asyncio.create_task(handler(json.loads(note.payload)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(0)
            await asyncio.gather(*tasks)

    asyncio.run(run())


def produce(dsn: str, jobs: int, rate: float) -> tuple[dict[int, float], list[float]]:
    """One job per transaction at ``rate`` per second; returns {key: commit time} and
    each enqueue's duration."""
    commits: dict[int, float] = {}
    durations: list[float] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        next_at = time.monotonic()
        for k in range(jobs):
            before = time.monotonic()
            enqueue(conn, "rec", {"k": k})
            commits[k] = time.monotonic()
            durations.append(commits[k] - before)
            next_at += 1.0 / rate
            time.sleep(max(0.0, next_at - time.monotonic()))
    return commits, durations


def wait_until(
    check: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    log: Path,
    what: str,
    timeout_seconds: float = WAIT_SECONDS,
) -> None:
    """Poll ``check`` until it holds; fail at once if ``proc`` exits, with its log."""
    deadline = time.monotonic() + timeout_seconds
    while not check():
        if proc.poll() is not None:
            raise SystemExit(f"{what}: it exited with {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}; its log:\n{log.read_text()}")
        time.sleep(0.05)


def one_round(
    admin_dsn: str, worker_bin: Path, path: str, jobs: int, rate: float
) -> tuple[list[float], list[float]]:
    """One path in a fresh database: (enqueue-to-start latencies, enqueue durations)."""
    dsn = db.create_database(admin_dsn, DATABASE)
    work_dir = Path(tempfile.mkdtemp(prefix="pgqueue-push-probe-"))
    record_dir = work_dir / "records"
    record_dir.mkdir()
    log = work_dir / "worker.log"
    env = {**os.environ, "BENCH_RECORD_DIR": str(record_dir), "PYTHONPATH": str(BENCH_DIR / "apps")}
    proc = None
    try:
        migrate(dsn)
        if path == "pgqueue":
            argv = [
                str(worker_bin / "pgqueue-worker"), "--dsn", dsn, "--app", "bq_pgqueue:registry",
                "--concurrency", "1000", "--log-level", "warning",
            ]  # fmt: skip
            ready = (
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query = 'LISTEN pgqueue_jobs'"
            )
        else:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(PROTOTYPE_SQL)
            argv = [
                sys.executable,
                "-m",
                "bench.push_probe",
                "--waiter",
                dsn,
                "--jobs",
                str(jobs + 1),
            ]
            ready = "SELECT count(*) FROM pgqueue.probe_waiters"
        proc = procs.spawn(argv, env=env, cwd=BENCH_DIR.parent, log=log)
        wait_until(lambda: db.scalar(dsn, ready) >= 1, proc, log, f"the {path} worker to listen")
        # A warm-up job, untimed: the first claim, prepared statements, the handler's file.
        with psycopg.connect(dsn, autocommit=True) as conn:
            enqueue(conn, "rec", {"k": -1})
        wait_until(lambda: "-1" in read_records(record_dir), proc, log, f"the {path} warm-up job")
        commits, durations = produce(dsn, jobs, rate)
        wait_until(lambda: len(read_records(record_dir)) > jobs, proc, log, f"{jobs} {path} jobs")
        starts = read_records(record_dir)
        return [starts[str(k)] - commits[k] for k in range(jobs)], durations
    finally:
        if proc is not None:
            procs.stop(proc)
        db.drop_database(admin_dsn, DATABASE)
        shutil.rmtree(work_dir, ignore_errors=True)


def ms(values: list[float], q: int) -> float:
    """The ``q``th percentile of ``values`` (seconds) in milliseconds, as the latency
    figure takes it."""
    return percentile(values, q) * 1000


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.push_probe", description=__doc__)
    p.add_argument("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--jobs", type=int, default=300)
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--waiter", metavar="DSN", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.waiter:
        waiter(opts.waiter, opts.jobs)
        return
    if opts.jobs < 2 or opts.rate <= 0 or opts.rounds < 1:
        p.error("--jobs must be at least 2, --rate above 0, --rounds at least 1")
    from bench.run import ensure_pgqueue_venv

    worker_bin = ensure_pgqueue_venv().parent
    with procs.signals_as_exit():
        try:
            for r in range(opts.rounds):
                for path in ("pgqueue", "push prototype"):
                    lat, enq = one_round(opts.admin_dsn, worker_bin, path, opts.jobs, opts.rate)
                    print(
                        f"round {r + 1} {path:15} enqueue->start p50 {ms(lat, 50):.2f} ms"
                        f"  p95 {ms(lat, 95):.2f}  p99 {ms(lat, 99):.2f}"
                        f"  | enqueue p50 {statistics.median(enq) * 1000:.2f} ms",
                        flush=True,
                    )
        finally:
            procs.stop_all()
            db.drop_all()


if __name__ == "__main__":
    main(sys.argv[1:])
