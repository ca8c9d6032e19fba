"""Tasks the fault-injection suite's workers run (``--app tests.faults.app:registry``).

Every execution is recorded in ``public.fault_executions`` (job id, attempt, pid, worker,
start, end) through a connection of its own, so the driver can count runs, including the
ones whose result was lost or fenced off, from the database alone. The writes survive
connection loss and Postgres restarts (they retry until the database answers) and are
idempotent (keyed by an id drawn before the first try), so a fault never fails a job nor
records one run twice.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from typing import Any

import psycopg

from pgqueue import Registry, current_job
from pgqueue.retry import Backoff

# Created by the driver; one row per execution of a handler.
EXECUTIONS_DDL = """
CREATE TABLE public.fault_executions (
    exec_id    uuid PRIMARY KEY,
    job_id     bigint NOT NULL,
    attempt    integer NOT NULL,
    task       text NOT NULL,
    pid        integer NOT NULL,
    worker_id  text NOT NULL,
    started_at timestamptz NOT NULL,
    ended_at   timestamptz
);
CREATE INDEX fault_executions_job_idx ON public.fault_executions (job_id);
"""

# The exit status of a process a poison job ended; the driver tells it from other deaths.
POISON_EXIT_CODE = 86
APP_NAME = "pgqueue-faults-app"
# How long a handler keeps trying to record an execution while the database is away.
WRITE_DEADLINE_SECONDS = 120.0

TASK_WORK = "faults.work"
TASK_SLOW = "faults.slow"
TASK_POISON = "faults.poison"
TASK_BLOCK = "faults.block"

registry = Registry()
FAST = Backoff(base_seconds=0.1, max_seconds=1.0)


class _Recorder:
    """One connection per worker process, shared by its handler threads under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None

    def write(self, sql: str, params: tuple[Any, ...]) -> Any:
        """Run ``sql`` until the database answers; returns the first column of the first
        row, if any."""
        deadline = time.monotonic() + WRITE_DEADLINE_SECONDS
        with self._lock:
            while True:
                try:
                    if self._conn is None or self._conn.closed or self._conn.broken:
                        self._conn = psycopg.connect(
                            os.environ["PGQUEUE_DSN"],
                            autocommit=True,
                            application_name=APP_NAME,
                            connect_timeout=3,
                        )
                    cur = self._conn.execute(sql, params)
                    row = cur.fetchone() if cur.description else None
                    return None if row is None else row[0]
                except (psycopg.OperationalError, psycopg.InterfaceError):
                    self._conn = None
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)


_recorder = _Recorder()


def _start() -> uuid.UUID:
    job = current_job()
    exec_id = uuid.uuid4()
    _recorder.write(
        "INSERT INTO public.fault_executions"
        " (exec_id, job_id, attempt, task, pid, worker_id, started_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, to_timestamp(%s)) ON CONFLICT (exec_id) DO NOTHING",
        (exec_id, job.id, job.attempt, job.task, os.getpid(), job.worker_id, time.time()),
    )
    return exec_id


def _end(exec_id: uuid.UUID) -> None:
    _recorder.write(
        "UPDATE public.fault_executions SET ended_at = to_timestamp(%s)"
        " WHERE exec_id = %s AND ended_at IS NULL",
        (time.time(), exec_id),
    )


def _run(ms: int) -> None:
    exec_id = _start()
    time.sleep(ms / 1000.0)
    _end(exec_id)


@registry.task(name=TASK_WORK, max_attempts=3, backoff=FAST)
def work(ms: int) -> None:
    """A normal job: a short sleep between two records."""
    _run(ms)


@registry.task(name=TASK_SLOW, max_attempts=3, backoff=FAST)
def slow(ms: int) -> None:
    """A normal job that runs long enough to be caught mid-run by SIGSTOP or SIGTERM."""
    _run(ms)


@registry.task(name=TASK_POISON, max_attempts=3, backoff=FAST)
def poison() -> None:
    """Ends its worker process on every attempt."""
    _start()
    sys.stdout.flush()
    os._exit(POISON_EXIT_CODE)


@registry.task(name=TASK_BLOCK, max_attempts=2, backoff=FAST)
async def block(seconds: float) -> None:
    """On its first run, blocks its worker's event loop (and so its heartbeat) for
    ``seconds``, past its lease: it is run again elsewhere meanwhile, and this run's
    late result must be fenced off. Later runs return at once."""
    exec_id = _start()
    runs = _recorder.write(
        "SELECT count(*) FROM public.fault_executions WHERE job_id = %s", (current_job().id,)
    )
    if runs == 1:
        time.sleep(seconds)  # noqa: ASYNC251 -- on the event loop, on purpose
    _end(exec_id)
