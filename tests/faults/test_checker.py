"""The fault driver's checks catch what they claim to: a database written by hand in a
clean final state passes, and each broken promise planted in it is reported.

No daemons, no faults: rows are written directly, so each check is tested on its own.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from pgqueue import JobSpec, enqueue_many
from tests.faults.app import EXECUTIONS_DDL, TASK_POISON, TASK_WORK
from tests.faults.driver import (
    RESTART_FAST,
    SIGKILL_WORKER,
    TERMINATE_WORKER_CONNS,
    Checker,
    Db,
    Driver,
    Fault,
    Settings,
)

W1, W2, W3, W4, W5 = (f"host:{pid}:aaaaaa" for pid in (101, 102, 103, 104, 105))
Conn = psycopg.Connection[Any]


def entry(attempt: int, worker: str, at: str, outcome: str) -> dict[str, Any]:
    return {"attempt": attempt, "worker": worker, "started_at": at, "outcome": outcome}


def execution(conn: Conn, job_id: int, attempt: int, worker: str, start: float, end: float | None,
              task: str = TASK_WORK) -> None:  # fmt: skip
    """One run of a handler, ``start``/``end`` seconds before now."""
    conn.execute(
        "INSERT INTO public.fault_executions"
        " (exec_id, job_id, attempt, task, pid, worker_id, started_at, ended_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, now() - make_interval(secs => %s),"
        " now() - make_interval(secs => %s))",
        (uuid.uuid4(), job_id, attempt, task, int(worker.split(":")[1]), worker, start, end),
    )


def succeed(conn: Conn, job_id: int, history: list[dict[str, Any]], attempts: int = 1) -> None:
    conn.execute(
        "UPDATE pgqueue.jobs SET state = 'succeeded', attempts = %s, finished_at = now(),"
        " history = %s WHERE id = %s",
        (attempts, Jsonb(history), job_id),
    )


@pytest.fixture
def world(dsn: str) -> Iterator[tuple[Driver, Conn, list[int]]]:
    """Three normal jobs that succeeded once and a poison job dead-lettered after
    three solo runs (its first run beside job 0, whose rescued re-run is explained by
    that crash)."""
    driver = Driver(Settings(verbose=False))
    driver.dsn = dsn
    keys = [f"k{i}" for i in range(4)]
    driver.specs = [JobSpec(TASK_WORK, {"ms": 1}, max_attempts=2, idempotency_key=k)
                    for k in keys[:3]]  # fmt: skip
    driver.specs.append(JobSpec(TASK_POISON, {}, max_attempts=3, idempotency_key=keys[3]))
    driver.poison_keys = {keys[3]}
    driver.sent = len(driver.specs)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in EXECUTIONS_DDL.split(";"):
            if statement.strip():
                conn.execute(statement)
        ids = enqueue_many(conn, driver.specs)
        a, b, c, poison = ids
        t = "2030-01-01T00:00:00+00:00"
        t2 = "2030-01-01T00:00:05+00:00"
        succeed(conn, a, [entry(1, W1, t, "lease_expired"), entry(1, W2, t2, "succeeded")])
        execution(conn, a, 1, W1, 9.0, None)
        execution(conn, a, 1, W2, 5.0, 4.9)
        succeed(conn, b, [entry(1, W2, t, "succeeded")])
        execution(conn, b, 1, W2, 8.0, 7.9)
        succeed(conn, c, [entry(1, W3, t, "succeeded")])
        execution(conn, c, 1, W3, 7.0, 6.9)
        history = [entry(1, W1, t, "lease_expired")] + [
            entry(n, w, t2, "lease_expired") for n, w in ((1, W2), (2, W3), (3, W4))
        ]
        conn.execute(
            "WITH moved AS (DELETE FROM pgqueue.jobs WHERE id = %s RETURNING *)"
            " INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts,"
            " max_attempts, run_at, idempotency_key, created_at, reason, history)"
            " SELECT id, queue, task, args, priority, 3, max_attempts, run_at,"
            " idempotency_key, created_at, 'lease_expired', %s FROM moved",
            (poison, Jsonb(history)),
        )
        for n, (worker, start) in enumerate(((W1, 9.0), (W2, 4.5), (W3, 3.0), (W4, 2.0))):
            execution(conn, poison, max(1, n), worker, start, None, task=TASK_POISON)
        now = time.time()
        crash = Fault("worker_crash", now - 9.0, now - 9.0, "pid 101", frozenset({a, poison}))
        driver.report.faults.append(crash)
        yield driver, conn, ids


def check(driver: Driver) -> list[str]:
    db = Db(driver.dsn)
    try:
        Checker(driver, db).check(recovered=True)
    finally:
        db.close()
    return driver.report.violations


def test_a_clean_run_passes(world: tuple[Driver, Conn, list[int]]) -> None:
    driver, _, _ = world
    assert check(driver) == []
    assert driver.report.duplicates == 1 and driver.report.duplicate_bound == 1


Plant = Callable[[Driver, Conn, list[int]], None]


def lose(d: Driver, conn: Conn, ids: list[int]) -> None:
    conn.execute("DELETE FROM pgqueue.jobs WHERE id = %s", (ids[1],))


def leave_running(d: Driver, conn: Conn, ids: list[int]) -> None:
    conn.execute(
        "UPDATE pgqueue.jobs SET state = 'running', lease_token = gen_random_uuid(),"
        " lease_expires_at = now() WHERE id = %s",
        (ids[1],),
    )


def stale_success(d: Driver, conn: Conn, ids: list[int]) -> None:
    # The worker whose lease expired wrote its success after all.
    conn.execute(
        "UPDATE pgqueue.jobs SET history = history || %s WHERE id = %s",
        (Jsonb([entry(1, W1, "2030-01-01T00:00:00+00:00", "succeeded")]), ids[0]),
    )


def unexplained_rerun(d: Driver, conn: Conn, ids: list[int]) -> None:
    execution(conn, ids[2], 1, W4, 3.0, 2.9)


def counted_crash(d: Driver, conn: Conn, ids: list[int]) -> None:
    # Job 0 lost its lease once (rescued, not counted) but shows a second attempt.
    conn.execute("UPDATE pgqueue.jobs SET attempts = 2 WHERE id = %s", (ids[0],))
    conn.execute("UPDATE pgqueue.jobs SET history = jsonb_set(history, '{1,attempt}', '2')"
                 " WHERE id = %s", (ids[0],))  # fmt: skip
    conn.execute("UPDATE public.fault_executions SET attempt = 2 WHERE job_id = %s"
                 " AND worker_id = %s", (ids[0], W2))  # fmt: skip


def dead_innocent(d: Driver, conn: Conn, ids: list[int]) -> None:
    conn.execute(
        "WITH moved AS (DELETE FROM pgqueue.jobs WHERE id = %s RETURNING *)"
        " INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts,"
        " max_attempts, run_at, idempotency_key, created_at, reason, history)"
        " SELECT id, queue, task, args, priority, 2, max_attempts, run_at, idempotency_key,"
        " created_at, 'lease_expired', '[]' FROM moved",
        (ids[2],),
    )


def poison_with_neighbour(d: Driver, conn: Conn, ids: list[int]) -> None:
    # A rescued (second) poison run in pid 102 while job 1 ran there.
    conn.execute(
        "UPDATE public.fault_executions SET started_at = now() - interval '5 s',"
        " ended_at = now() - interval '4 s' WHERE job_id = %s",
        (ids[1],),
    )


def poison_short_of_attempts(d: Driver, conn: Conn, ids: list[int]) -> None:
    conn.execute("UPDATE pgqueue.dead_jobs SET attempts = 2 WHERE id = %s", (ids[3],))


def success_without_run(d: Driver, conn: Conn, ids: list[int]) -> None:
    conn.execute("UPDATE public.fault_executions SET ended_at = NULL WHERE job_id = %s", (ids[2],))


def two_successes(d: Driver, conn: Conn, ids: list[int]) -> None:
    conn.execute(
        "UPDATE pgqueue.jobs SET history = history || %s WHERE id = %s",
        (Jsonb([entry(1, W3, "2030-01-01T00:00:09+00:00", "succeeded")]), ids[2]),
    )


def too_slow(d: Driver, conn: Conn, ids: list[int]) -> None:
    # Job 2 was hit a minute before it finished.
    at = time.time() - 60.0
    d.report.faults.append(Fault(SIGKILL_WORKER, at, at, "pid 103", frozenset({ids[2]})))


def ran_through(d: Driver, job_id: int, *kinds: str, ago: float = 8.0) -> None:
    """Faults that only cut connections, with ``job_id`` running through each."""
    at = time.time() - ago
    for kind in kinds:
        d.report.faults.append(Fault(kind, at, at + 0.5, "postgres", frozenset({job_id})))


def rerun_through_restart(d: Driver, conn: Conn, ids: list[int]) -> None:
    # Job 2 ran twice, and a Postgres restart happened while it ran; but its lease was
    # never lost (no lease_expired entry): the restart does not explain the rerun.
    ran_through(d, ids[2], RESTART_FAST)
    execution(conn, ids[2], 1, W4, 3.0, 2.9)


def dead_through_restarts(d: Driver, conn: Conn, ids: list[int]) -> None:
    # Job 2 (max_attempts 2) dead-lettered after running through three connection
    # faults, none of which lost its lease.
    ran_through(d, ids[2], RESTART_FAST, RESTART_FAST, TERMINATE_WORKER_CONNS)
    dead_innocent(d, conn, ids)


@pytest.mark.parametrize(
    ("plant", "expected"),
    [
        (rerun_through_restart, "ran more often than the faults"),
        (dead_through_restarts, "a crash was counted against an innocent job"),
        (lose, "jobs lost"),
        (leave_running, "not in a final state"),
        (stale_success, "ended twice"),
        (unexplained_rerun, "ran more often than the faults"),
        (counted_crash, "an attempt was counted against it"),
        (dead_innocent, "a crash was counted against an innocent job"),
        (poison_with_neighbour, "a rescued job must run alone"),
        (poison_short_of_attempts, "poison job"),
        (success_without_run, "by a run that never finished"),
        (two_successes, "not one success at the end"),
        (too_slow, "over the bound"),
    ],
)
def test_each_broken_promise_is_reported(
    world: tuple[Driver, Conn, list[int]], plant: Plant, expected: str
) -> None:
    driver, conn, ids = world
    plant(driver, conn, ids)
    violations = check(driver)
    assert any(expected in v for v in violations), violations


def lost_lease(conn: Conn, job_id: int) -> None:
    """A run of ``job_id`` by W5 whose lease expired (the reaper's entry 6 s ago)."""
    ended = datetime.fromtimestamp(time.time() - 6.0, UTC).isoformat()
    lost = {**entry(1, W5, "2029-12-31T23:59:00+00:00", "lease_expired"), "ended_at": ended}
    conn.execute(
        "UPDATE pgqueue.jobs SET history = %s || history WHERE id = %s", (Jsonb([lost]), job_id)
    )
    execution(conn, job_id, 1, W5, 8.5, None)


def test_a_rerun_after_a_restart_that_lost_the_lease_is_explained(
    world: tuple[Driver, Conn, list[int]],
) -> None:
    # The restart kept job 2's first worker from its heartbeat until the lease expired:
    # the reaper's entry (2 s after the restart) is the evidence, and the rerun (W3's,
    # which succeeded) is allowed.
    driver, conn, ids = world
    ran_through(driver, ids[2], RESTART_FAST)
    lost_lease(conn, ids[2])
    assert check(driver) == []
    assert driver.report.duplicates == 2 and driver.report.duplicate_bound == 2


def test_a_supervisor_stop_is_graceful_only_if_its_children_stopped_cleanly(tmp_path) -> None:
    # Its exit status 1 is excused by a poison crash among its children's final codes,
    # not by a poison crash anywhere in its log (one long before the stop).
    from tests.faults.driver import POISON_EXIT_CODE, _children_stopped_cleanly

    def log(*lines: str) -> Any:
        path = tmp_path / f"s{len(list(tmp_path.iterdir()))}.log"
        path.write_text("\n".join(lines) + "\n")
        return path

    died = f'{{"event": "supervisor.child_died", "exit_code": {POISON_EXIT_CODE}}}'
    assert _children_stopped_cleanly(
        log(f'{{"event": "supervisor.stopped", "exit_codes": [0, {POISON_EXIT_CODE}]}}')
    )
    assert _children_stopped_cleanly(log('{"event": "supervisor.stopped", "exit_codes": [0, -15]}'))
    assert not _children_stopped_cleanly(
        log(died, '{"event": "supervisor.stopped", "exit_codes": [0, 1]}')
    )
    assert not _children_stopped_cleanly(log(died, "pgqueue: aborted"))
    # The driver SIGKILLed a child that was not replaced yet: still a clean stop; the
    # supervisor killing a child that outlived its deadline is not.
    stopped = '{"event": "supervisor.stopped", "exit_codes": [0, -9]}'
    assert _children_stopped_cleanly(log(stopped))
    assert not _children_stopped_cleanly(log('{"event": "supervisor.child_killed"}', stopped))


def test_one_lost_lease_excuses_one_connection_fault(world: tuple[Driver, Conn, list[int]]) -> None:
    # Job 2 ran through two restarts, lost its lease once, and ran three times: one
    # rerun is explained, the other is not.
    driver, conn, ids = world
    ran_through(driver, ids[2], RESTART_FAST, RESTART_FAST)
    lost_lease(conn, ids[2])
    execution(conn, ids[2], 1, "host:106:aaaaaa", 8.4, None)
    violations = check(driver)
    assert any("ran more often than the faults" in v for v in violations), violations
