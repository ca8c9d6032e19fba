"""Postgres restarts under running daemons: they reconnect and nothing is lost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgqueue import JobSpec, enqueue, enqueue_many, migrate
from tests.conftest import EXECUTIONS_DDL, Daemons, scalar, wait_until
from tests.pgcluster import PgCluster


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    c = PgCluster()
    try:
        c.start()
        yield c
    finally:
        c.destroy()


# --async-commit: the immediate restart is a crash that may undo the worker's newest
# claims and outcomes; their jobs must run again, and none may be lost.
@pytest.mark.parametrize("worker_flags", [(), ("--async-commit",)], ids=["sync", "async_commit"])
def test_daemons_survive_postgres_restarts_and_lose_nothing(
    cluster: PgCluster, tmp_path: Path, worker_flags: tuple[str, ...]
):
    migrate(cluster.dsn)
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        conn.execute(EXECUTIONS_DDL)  # type: ignore[arg-type]
        enqueue_many(conn, [JobSpec("sleep", {"seconds": 0.05}) for _ in range(60)])
    daemons = Daemons(cluster.dsn, tmp_path)
    try:
        worker = daemons.worker(
            "--lease-seconds", "3", "--concurrency", "4", "--poll-interval", "1", *worker_flags
        )
        reaper = daemons.reaper("--interval", "0.5")

        def succeeded() -> int:
            with psycopg.connect(cluster.dsn, autocommit=True) as conn:
                return int(
                    scalar(conn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded'")
                )

        wait_until(lambda: succeeded() >= 5)
        cluster.restart("fast")
        wait_until(lambda: succeeded() >= 30, timeout=60)
        cluster.restart("immediate")
        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            enqueue_many(conn, [JobSpec("record", {"note": "after"}) for _ in range(40)])
        wait_until(lambda: succeeded() == 100, timeout=90)

        assert worker.poll() is None and reaper.poll() is None
        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            assert scalar(conn, "SELECT count(*) FROM pgqueue.jobs WHERE state <> 'succeeded'") == 0
            assert scalar(conn, "SELECT count(*) FROM pgqueue.dead_jobs") == 0
            # Every job ran; re-runs only where a restart cut a job off mid-flight.
            ran = scalar(conn, "SELECT count(DISTINCT job_id) FROM public.executions")
            assert ran == 100
        # Both noticed the restarts, said so, and carried on.
        assert "listener.disconnected" in Daemons.output(worker)
        assert "reaper.disconnected" in Daemons.output(reaper)
    finally:
        daemons.stop_all()


def test_after_a_long_outage_a_worker_runs_jobs_again_within_seconds(
    cluster: PgCluster, tmp_path: Path
):
    # The worker's pool retried a lost connection after 1, 2, 4, 8, ... s for as long as
    # the worker lived: after an outage its connections came back about as late as the
    # outage had lasted (36 s down: a job enqueued at once started 32 s later; 40 s: 18 s),
    # leases expired meanwhile and a shutdown's flush failed. Now each retry gives up
    # after the loops' reconnect bound (10 s), and the next request starts anew (2-6 s
    # measured here).
    migrate(cluster.dsn)
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        conn.execute(EXECUTIONS_DDL)  # type: ignore[arg-type]
    daemons = Daemons(cluster.dsn, tmp_path)
    try:
        worker = daemons.worker("--lease-seconds", "3", "--poll-interval", "0.5")
        wait_until(lambda: "worker.started" in Daemons.output(worker))
        cluster.stop("fast")
        time.sleep(36)
        cluster.start()
        back = time.monotonic()
        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            job_id = enqueue(conn, "record", {"note": "after"})

            def done() -> bool:
                state = scalar(conn, "SELECT state FROM pgqueue.jobs WHERE id = %s", (job_id,))
                return bool(state == "succeeded")

            wait_until(done, timeout=60, interval=0.1)
        took = time.monotonic() - back
        # The fetcher retries its claim after at most 10 s (its backoff's bound), and
        # some loop asks the pool for a connection at least every 6 s (the heartbeat's
        # 1 s, plus the pool's 5 s wait), whose tries are at most 4 s apart now.
        assert took < 18, took
        assert worker.poll() is None
    finally:
        daemons.stop_all()


def test_jobs_whose_workers_live_through_an_outage_are_not_taken_from_them(
    cluster: PgCluster, tmp_path: Path
):
    # Postgres down for longer than the lease: every lease ran out. The reaper, back
    # first, requeued each job in flight as rescued while its worker still ran it: each
    # ran twice, and then alone (found by the on-call review: a one-minute outage slowed
    # a worker of 8 slots to one job at a time). The reaper now gives the workers it knows
    # three heartbeats to extend their leases once it has the database back.
    migrate(cluster.dsn)
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        conn.execute(EXECUTIONS_DDL)  # type: ignore[arg-type]
        # Each records its start and its end in the database: both while it is up.
        enqueue_many(conn, [JobSpec("sleep", {"seconds": 35}) for _ in range(4)])
    daemons = Daemons(cluster.dsn, tmp_path)
    try:
        worker = daemons.worker("--lease-seconds", "3", "--concurrency", "4")
        reaper = daemons.reaper("--interval", "0.5")

        def count(sql: str) -> int:
            with psycopg.connect(cluster.dsn, autocommit=True) as conn:
                return int(scalar(conn, sql))

        wait_until(lambda: count("SELECT count(*) FROM pgqueue.jobs WHERE state = 'running'") == 4)
        cluster.stop("fast")
        time.sleep(20)  # several leases, and reconnect backoffs that grew
        cluster.start()
        wait_until(
            lambda: count("SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded'") == 4,
            timeout=90,
        )
        assert worker.poll() is None and reaper.poll() is None
        assert "reaper.reconnected" in Daemons.output(reaper)
        assert count("SELECT count(*) FROM pgqueue.jobs WHERE rescued") == 0
        # One run each (a run records its start and its end).
        assert count("SELECT count(*) FROM public.executions WHERE note LIKE 'start%'") == 4
        assert "reaper.requeued" not in Daemons.output(reaper)
    finally:
        daemons.stop_all()
