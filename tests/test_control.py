"""get_job and cancel_job: an application looks up and cancels jobs in its own transaction,
on sync and async connections, against a real database and a real worker."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from pgqueue import (
    JobNotFound,
    JobState,
    JobStatus,
    Registry,
    cancel_job,
    current_job,
    enqueue,
    get_job,
)
from tests.conftest import job_state, scalar
from tests.test_worker import running_worker, wait_for_db


def test_get_job_shows_a_job_as_it_is_now(conn):
    job_id = enqueue(conn, "t.report", {"user": 7}, queue="reports", priority=3)
    job = get_job(conn, job_id)
    assert isinstance(job, JobStatus)
    assert (job.id, job.task, job.queue, job.priority, job.state) == (
        job_id, "t.report", "reports", 3, JobState.QUEUED,
    )  # fmt: skip
    assert job.attempts == 0 and job.finished_at is None
    # Args only when asked for: they may hold personal data.
    assert job.args is None
    assert get_job(conn, job_id, with_args=True).args == {"user": 7}  # type: ignore[union-attr]
    assert get_job(conn, job_id + 1000) is None
    # Beyond bigint: no job can have it, and nothing is sent.
    assert get_job(conn, 2**63) is None


def test_get_job_finds_a_dead_job_in_the_dead_letter_table(conn):
    conn.execute(
        "INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts,"
        " max_attempts, run_at, created_at, reason) VALUES"
        " (900, 'default', 't', '{}', 0, 3, 3, now(), now(), 'exhausted')"
    )
    job = get_job(conn, 900)
    assert job is not None and job.state is JobState.DEAD and job.dead_reason == "exhausted"


@pytest.mark.parametrize("bad", ["1", 1.0, True, None])
def test_a_job_id_that_is_not_an_int_is_refused(conn, bad):
    with pytest.raises(TypeError, match="a job id is an int"):
        get_job(conn, bad)
    with pytest.raises(TypeError, match="a job id is an int"):
        cancel_job(conn, bad)


def test_cancel_job_cancels_a_queued_job_in_the_callers_transaction(conn):
    kept = enqueue(conn, "t", {})
    with conn.transaction(force_rollback=True):
        assert cancel_job(conn, kept).state is JobState.CANCELLED
    # Rolled back with the transaction.
    assert job_state(conn, kept) == "queued"
    job_id = enqueue(conn, "t", {})
    with conn.transaction():
        job = cancel_job(conn, job_id)
    assert job.state is JobState.CANCELLED
    assert job.finished_at is not None and job.cancel_requested_at is not None
    assert job_state(conn, job_id) == "cancelled"
    # A finished job comes back unchanged; no job at all is an error.
    assert cancel_job(conn, job_id).finished_at == job.finished_at
    with pytest.raises(JobNotFound, match="no job with id 424242"):
        cancel_job(conn, 424242)
    with pytest.raises(JobNotFound):
        cancel_job(conn, -(2**63) - 1)


def test_cancel_job_stops_a_running_job_whose_handler_looks(dsn, conn):
    registry = Registry()

    @registry.task(name="long_export", max_attempts=5)
    async def long_export() -> None:
        for _ in range(1500):  # 30 s
            if current_job().cancel_requested:
                raise RuntimeError("stopped on request")
            await asyncio.sleep(0.02)

    job_id = enqueue(conn, "long_export", {})

    async def main() -> JobStatus:
        async with running_worker(registry, dsn, lease_seconds=60):
            await wait_for_db(dsn, "SELECT state = 'running' FROM pgqueue.jobs")
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
                flagged = await cancel_job(aconn, job_id)
            # Long before the heartbeat (a third of the lease): the worker is told.
            await wait_for_db(
                dsn,
                "SELECT state = 'cancelled' FROM pgqueue.jobs WHERE id = %s",
                (job_id,),
                timeout=5,
            )
            return flagged

    flagged = asyncio.run(main())
    assert flagged.state is JobState.RUNNING and flagged.cancel_requested_at is not None
    # Not retried: the failed attempt of a cancelled job ends it.
    assert scalar(conn, "SELECT attempts FROM pgqueue.jobs WHERE id = %s", (job_id,)) == 1


def test_get_job_and_cancel_job_on_an_async_connection(dsn, conn):
    job_id = enqueue(conn, "t", {"a": 1})

    async def main() -> tuple[Any, Any, Any]:
        async with await psycopg.AsyncConnection.connect(dsn) as aconn:
            before = await get_job(aconn, job_id, with_args=True)
            async with aconn.transaction():
                after = await cancel_job(aconn, job_id)
            missing = await get_job(aconn, 2**63)
            with pytest.raises(JobNotFound):
                await cancel_job(aconn, 424242)
        return before, after, missing

    before, after, missing = asyncio.run(main())
    assert before.state is JobState.QUEUED and before.args == {"a": 1}
    assert after.state is JobState.CANCELLED and missing is None
