"""Looking up and cancelling jobs from an application: ``get_job`` and ``cancel_job``.

Both work in the caller's transaction, on a psycopg 3 connection (sync or async) or an
ORM's wrapper of one, as ``enqueue`` does: a cancel made in a transaction that rolls back
is undone with it.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, overload

import psycopg

from pgqueue import store
from pgqueue.enqueue import _psycopg_connection
from pgqueue.errors import JobNotFound
from pgqueue.models import JobStatus

# Job ids are bigint: anything outside can name no job (and Postgres would refuse it).
_MIN_ID = -(2**63)
_MAX_ID = 2**63 - 1


def _checked_id(job_id: object, caller: str) -> int | None:
    """``job_id`` if it can name a job, None if it is out of bigint's range."""
    if isinstance(job_id, bool) or not isinstance(job_id, int):
        raise TypeError(f"{caller}: a job id is an int, not {type(job_id).__name__}")
    return int(job_id) if _MIN_ID <= job_id <= _MAX_ID else None


@overload
def get_job(
    conn: psycopg.Connection[Any], job_id: int, *, with_args: bool = False
) -> JobStatus | None: ...


@overload
def get_job(
    conn: psycopg.AsyncConnection[Any], job_id: int, *, with_args: bool = False
) -> Coroutine[Any, Any, JobStatus | None]: ...


def get_job(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
    job_id: int,
    *,
    with_args: bool = False,
) -> JobStatus | Coroutine[Any, Any, JobStatus | None] | None:
    """The job ``job_id`` as it is now (``state`` one of ``JobState``: queued, running,
    succeeded, cancelled, or dead for one in the dead-letter table), or None if no job has
    that id (a finished one the reaper has pruned after its retention, too). Its
    ``args`` only if ``with_args`` (they may hold personal data). Any role that may
    read pgqueue's tables may call it (``pgqueue_producer`` included)."""
    conn = _psycopg_connection(conn, "get_job")
    checked = _checked_id(job_id, "get_job")
    if isinstance(conn, psycopg.AsyncConnection):
        return _get_job_async(conn, checked, with_args)
    if checked is None:
        return None
    return store.job_status(conn, job_id=checked, with_args=with_args)


async def _get_job_async(
    conn: psycopg.AsyncConnection[Any], job_id: int | None, with_args: bool
) -> JobStatus | None:
    if job_id is None:
        return None
    return await store.job_status_async(conn, job_id=job_id, with_args=with_args)


@overload
def cancel_job(conn: psycopg.Connection[Any], job_id: int) -> JobStatus: ...


@overload
def cancel_job(
    conn: psycopg.AsyncConnection[Any], job_id: int
) -> Coroutine[Any, Any, JobStatus]: ...


def cancel_job(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], job_id: int
) -> JobStatus | Coroutine[Any, Any, JobStatus]:
    """Cancel the job ``job_id`` in ``conn``'s current transaction, as ``pgqueue cancel``
    does, and return it as it is afterwards.

    A queued job becomes ``cancelled`` (it never runs). A running one stays ``running``
    with ``cancel_requested_at`` set: its handler sees ``current_job().cancel_requested``
    within moments of the commit, and if the attempt fails, snoozes or is released, the
    job becomes ``cancelled`` rather than retried (one that succeeds is ``succeeded``).
    A job already finished (succeeded, cancelled, dead) is returned unchanged. Raises
    ``JobNotFound`` if no job has that id. Needs the ``pgqueue_worker`` role or the
    schema's owner (``pgqueue_producer`` may not update jobs).
    """
    conn = _psycopg_connection(conn, "cancel_job")
    checked = _checked_id(job_id, "cancel_job")
    if isinstance(conn, psycopg.AsyncConnection):
        return _cancel_job_async(conn, checked, job_id)
    if checked is not None:
        store.cancel_job(conn, job_id=checked)
        job = store.job_status(conn, job_id=checked)
        if job is not None:
            return job
    raise JobNotFound(f"no job with id {job_id}")


async def _cancel_job_async(
    conn: psycopg.AsyncConnection[Any], job_id: int | None, given: int
) -> JobStatus:
    if job_id is not None:
        await store.cancel_job_async(conn, job_id=job_id)
        job = await store.job_status_async(conn, job_id=job_id)
        if job is not None:
            return job
    raise JobNotFound(f"no job with id {given}")
