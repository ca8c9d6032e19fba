"""The named queries, called through ``pgqueue.store`` against a real Postgres.

Times are checked against the database's own clock: a value written as ``now() + x`` by a
statement must lie between ``x`` after a clock reading taken just before the statement
and ``x`` after one taken just after it. No test sleeps or measures durations.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, LiteralString

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from pgqueue import store
from pgqueue.models import Job, JobState
from pgqueue.sql import QUERIES
from tests.conftest import dead_row, job_row, notified_before_sentinel, scalar, wait_until

AsyncConn = psycopg.AsyncConnection[Any]
WORKER = "worker-1"
LEASE = 30.0


# --- helpers ------------------------------------------------------------------------------


def db_clock(conn: psycopg.Connection[Any]) -> datetime:
    """The database's wall clock now (not the transaction start)."""
    value: datetime = scalar(conn, "SELECT clock_timestamp()")
    return value


def make_job(conn: psycopg.Connection[Any], **columns: Any) -> int:
    """Insert one row into pgqueue.jobs, in any state, straight through SQL; returns its id.

    A running job gets a fresh lease token and a lease expiring in 30 s unless given, a
    succeeded or cancelled one a finished_at of now.
    """
    columns.setdefault("task", "t")
    if columns.get("state") == "running":
        columns.setdefault("lease_token", uuid.uuid4())
        columns.setdefault("leased_by", WORKER)
        columns.setdefault("lease_expires_at", db_clock(conn) + timedelta(seconds=LEASE))
        columns.setdefault("attempts", 1)
    if columns.get("state") in ("succeeded", "cancelled"):
        columns.setdefault("finished_at", db_clock(conn))  # jobs_finished_at_check
    values = {k: Jsonb(v) if isinstance(v, dict | list) else v for k, v in columns.items()}
    query = sql.SQL("INSERT INTO pgqueue.jobs ({}) VALUES ({}) RETURNING id").format(
        sql.SQL(", ").join(sql.Identifier(k) for k in values),
        sql.SQL(", ").join(sql.Placeholder(k) for k in values),
    )
    job_id: int = scalar(conn, query, values)
    return job_id


# Outcome writers take each attempt's duration and return {id: state now}.
WRITERS = {
    store.complete_jobs,
    store.retry_jobs,
    store.snooze_jobs,
    store.release_jobs,
    store.dead_letter_jobs,
}


def run_async(dsn: str, fn: Callable[..., Awaitable[Any]], **kwargs: Any) -> Any:
    """Run one async store function on a fresh autocommit AsyncConnection. For outcome
    writers, durations default to 0.01 s each and the result is the set of changed ids."""
    if fn in WRITERS:
        kwargs.setdefault("durations", [0.01] * len(kwargs["ids"]))

    async def go() -> Any:
        aconn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        async with aconn:
            return await fn(aconn, **kwargs)

    result = asyncio.run(go())
    return set(result) if isinstance(result, dict) else result


def claim(dsn: str, queues: list[str], limit: int, **kwargs: Any) -> list[Any]:
    kwargs.setdefault("worker_id", WORKER)
    kwargs.setdefault("lease_seconds", LEASE)
    jobs: list[Any] = run_async(dsn, store.claim_jobs, queues=queues, limit=limit, **kwargs)
    return jobs


ERROR_1 = {"attempt": 1, "kind": "error", "error": "first failure"}
ERROR_2 = {"attempt": 2, "kind": "error", "error": "second failure"}

# Each fenced operation, called with the given ids and tokens and otherwise fixed arguments.
FENCED_OPS: dict[str, Callable[[AsyncConn, list[int], list[uuid.UUID]], Awaitable[Any]]] = {
    "complete_jobs": lambda c, ids, tokens: store.complete_jobs(
        c, ids=ids, tokens=tokens, durations=[0.01] * len(ids)
    ),
    "retry_jobs": lambda c, ids, tokens: store.retry_jobs(
        c,
        ids=ids,
        tokens=tokens,
        delays=[5.0] * len(ids),
        errors=[ERROR_2] * len(ids),
        durations=[0.01] * len(ids),
    ),
    "snooze_jobs": lambda c, ids, tokens: store.snooze_jobs(
        c, ids=ids, tokens=tokens, delays=[5.0] * len(ids), durations=[0.01] * len(ids)
    ),
    "release_jobs": lambda c, ids, tokens: store.release_jobs(
        c, ids=ids, tokens=tokens, durations=[0.01] * len(ids)
    ),
    "dead_letter_jobs": lambda c, ids, tokens: store.dead_letter_jobs(
        c,
        ids=ids,
        tokens=tokens,
        errors=[ERROR_2] * len(ids),
        reasons=["permanent"] * len(ids),
        durations=[0.01] * len(ids),
    ),
    "extend_leases": lambda c, ids, tokens: store.extend_leases(
        c, ids=ids, tokens=tokens, lease_seconds=600.0
    ),
}


def fenced(dsn: str, op: str, ids: list[int], tokens: list[uuid.UUID]) -> set[int]:
    async def go() -> set[int]:
        aconn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        async with aconn:
            return set(await FENCED_OPS[op](aconn, ids, tokens))

    return asyncio.run(go())


# --- claim --------------------------------------------------------------------------------


@pytest.fixture(params=["claim_jobs", "claim_jobs_many"])
def either_claim(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """store.claim_jobs through the named statement, whatever the queues and limit."""
    monkeypatch.setattr(
        store, "CLAIM_EXTRA_LOCKS_MAX", 10**9 if request.param == "claim_jobs" else -1
    )
    return str(request.param)


def test_the_claim_over_several_queues_takes_the_two_step_statement_past_a_few_locks():
    many = store.CLAIM_EXTRA_LOCKS_MAX
    assert store.claim_statement(["a"], 1000) == "claim_jobs"
    assert store.claim_statement([f"q{i}" for i in range(20)], 10) == "claim_jobs"
    assert store.claim_statement(["a", "b"], many) == "claim_jobs"
    assert store.claim_statement(["a", "b"], many + 1) == "claim_jobs_many"
    assert store.claim_statement(["a", "b", "c", "d", "e"], 1000) == "claim_jobs_many"
    assert store.claim_statement([f"q{i}" for i in range(200)], 50) == "claim_jobs_many"


@pytest.mark.parametrize("name", ["claim_jobs", "claim_jobs_many"])
def test_a_claim_beside_one_in_flight_that_holds_the_first_jobs_still_takes_its_limit(
    conn, dsn, name
):
    # The two-step claim's first step cannot tell the rows another claim in flight holds
    # from free ones: q0's 60 urgent jobs, all held, made it take nothing while 200 free
    # due jobs waited in q1 and q2 (a review). A claim short of its limit must mean no
    # free due job is left: the worker then sleeps until its next poll.
    for queue, priority, n in (("q0", 0, 60), ("q1", 1, 100), ("q2", 1, 100)):
        for _ in range(n):
            make_job(conn, queue=queue, priority=priority)
    params = {"queues": ["q0", "q1", "q2"], "limit": 60, "lease_seconds": LEASE}
    with psycopg.connect(dsn) as a, psycopg.connect(dsn, autocommit=True) as b:
        # (claim_jobs_many: claim_jobs would lock 60 of each queue.)
        held = a.execute(QUERIES["claim_jobs_many"], {**params, "worker_id": "A"}).fetchall()
        assert {r[1] for r in held} == {"q0"}
        taken = b.execute(QUERIES[name], {**params, "worker_id": "B"}).fetchall()
        a.rollback()
    # The first 60 free ones by (priority, run_at, id): q1's, enqueued before q2's.
    first_free = conn.execute(
        "SELECT id FROM pgqueue.jobs WHERE queue <> 'q0' ORDER BY priority, run_at, id LIMIT 60"
    ).fetchall()
    assert sorted(r[0] for r in taken) == [r[0] for r in first_free]


def _unlocked_queued(dsn: str) -> int:
    """Queued jobs no other transaction holds a lock on."""
    with psycopg.connect(dsn) as c:
        return len(
            c.execute(
                "SELECT id FROM pgqueue.jobs WHERE state = 'queued' FOR UPDATE SKIP LOCKED"
            ).fetchall()
        )


@pytest.mark.parametrize(("name", "locked"), [("claim_jobs", 30), ("claim_jobs_many", 10)])
def test_a_claim_over_several_queues_locks_only_the_jobs_it_claims_in_two_steps(
    conn, dsn, name, locked
):
    # claim_jobs locks up to its limit in each queue before keeping its limit of them:
    # 30 rows for 10 claimed here, 50,000 for a worker at --concurrency 1000 serving 50
    # queues (a WAL record each). claim_jobs_many locks the 10 it claims.
    for i in range(60):
        make_job(conn, queue=f"q{i % 3}")
    params = {"queues": ["q0", "q1", "q2"], "limit": 10, "worker_id": WORKER}
    with psycopg.connect(dsn) as claimer:
        rows = claimer.execute(QUERIES[name], {**params, "lease_seconds": LEASE}).fetchall()
        assert len(rows) == 10
        # Its transaction is open: the rows it locked are still locked.
        assert _unlocked_queued(dsn) == 60 - locked
        claimer.rollback()


def test_a_two_step_claim_beside_another_in_flight_still_gets_its_share(conn, dsn):
    # Both claims' first steps see the same first jobs of each queue; the second's
    # locking step passes over those the first holds and takes the next of each queue.
    ids = {make_job(conn, queue=f"q{i % 3}") for i in range(30)}
    params = {"queues": ["q0", "q1", "q2"], "limit": 10, "lease_seconds": LEASE}
    with psycopg.connect(dsn) as a, psycopg.connect(dsn, autocommit=True) as b:
        b.execute("SET lock_timeout = '10s'")
        got_a = {r[0] for r in a.execute(QUERIES["claim_jobs_many"], {**params, "worker_id": "A"})}
        got_b = {r[0] for r in b.execute(QUERIES["claim_jobs_many"], {**params, "worker_id": "B"})}
        a.commit()
    assert len(got_a) == 10 and len(got_b) == 10 and got_a.isdisjoint(got_b)
    assert got_a | got_b <= ids


def test_the_two_step_claim_takes_what_the_one_step_claim_takes(conn, dsn):
    # Without other claims in flight: the same jobs, the first by (priority, run_at, id)
    # over all the queues, whatever each queue holds.
    base = db_clock(conn) - timedelta(hours=1)
    for i in range(90):
        make_job(
            conn, queue=f"q{i % 4 if i < 60 else 0}", priority=(i * 7) % 3,
            run_at=base + timedelta(seconds=(i * 13) % 17),
        )  # fmt: skip
    params = {"queues": ["q0", "q1", "q2", "q3", "q9"], "worker_id": WORKER, "lease_seconds": 1}
    for limit in (1, 7, 25, 200):
        taken = {}
        for name in ("claim_jobs", "claim_jobs_many"):
            with psycopg.connect(dsn) as c:
                taken[name] = sorted(
                    r[0] for r in c.execute(QUERIES[name], {**params, "limit": limit})
                )
                c.rollback()
        assert taken["claim_jobs"] == taken["claim_jobs_many"], limit
        assert len(taken["claim_jobs"]) == min(limit, 90)


def test_claim_takes_jobs_in_priority_then_run_at_then_id_order_across_queues(
    conn, dsn, either_claim
):
    base = db_clock(conn) - timedelta(hours=1)
    # (queue, priority, run_at offset in seconds); inserted so that id order disagrees
    # with claim order, with ties on priority and run_at broken by id.
    specs = [
        ("a", 2, 0),
        ("b", 0, 30),
        ("a", 0, 30),
        ("b", 0, 10),
        ("a", -1, 50),
        ("b", 0, 10),
        ("a", 1, 5),
        ("b", -1, 60),
    ]
    rows = []
    for queue, priority, offset in specs:
        job_id = make_job(
            conn, queue=queue, priority=priority, run_at=base + timedelta(seconds=offset)
        )
        rows.append((priority, offset, job_id))
    expected = [job_id for _, _, job_id in sorted(rows)]
    assert expected != sorted(job_id for _, _, job_id in rows)

    claimed_one_by_one = []
    for _ in specs:
        jobs = claim(dsn, ["a", "b"], limit=1)
        assert len(jobs) == 1
        claimed_one_by_one.append(jobs[0].id)

    assert claimed_one_by_one == expected
    assert claim(dsn, ["a", "b"], limit=1) == []


def test_claim_takes_at_most_limit_jobs_across_all_queues(conn, dsn, either_claim):
    ids = [make_job(conn, queue=q) for q in ("a", "b") for _ in range(5)]

    jobs = claim(dsn, ["a", "b"], limit=3)

    assert len(jobs) == 3
    assert scalar(conn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'running'") == 3
    assert scalar(conn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'queued'") == 7
    assert {j.id for j in jobs} <= set(ids)


def test_claim_does_not_take_jobs_whose_run_at_is_in_the_future(conn, dsn, either_claim):
    now = db_clock(conn)
    due = make_job(conn, run_at=now - timedelta(seconds=1))
    future = make_job(conn, run_at=now + timedelta(hours=1))

    jobs = claim(dsn, ["default"], limit=10)

    assert [j.id for j in jobs] == [due]
    future_row = job_row(conn, future)
    assert future_row is not None
    assert future_row["state"] == "queued"
    assert future_row["attempts"] == 0
    assert future_row["lease_token"] is None


def test_claim_takes_only_jobs_of_the_given_queues(conn, dsn, either_claim):
    wanted = {make_job(conn, queue="a"), make_job(conn, queue="b")}
    other = make_job(conn, queue="c")

    jobs = claim(dsn, ["a", "b"], limit=10)

    assert {j.id for j in jobs} == wanted
    assert {j.queue for j in jobs} == {"a", "b"}
    other_row = job_row(conn, other)
    assert other_row is not None
    assert other_row["state"] == "queued"


def test_claim_does_not_take_running_or_finished_jobs(conn, dsn, either_claim):
    make_job(conn, state="running")
    make_job(conn, state="succeeded", finished_at=db_clock(conn))
    make_job(conn, state="cancelled", finished_at=db_clock(conn))

    assert claim(dsn, ["default"], limit=10) == []


def test_claim_marks_running_counts_the_attempt_and_sets_a_lease(conn, dsn, either_claim):
    job_id = make_job(conn, attempts=2, args={"x": 1})
    before = db_clock(conn)

    jobs = claim(dsn, ["default"], limit=1, worker_id="w-42", lease_seconds=45.0)

    after = db_clock(conn)
    assert len(jobs) == 1
    job = jobs[0]
    assert job.id == job_id
    assert job.attempt == 3
    assert job.args == {"x": 1}
    row = job_row(conn, job_id)
    assert row is not None
    assert row["state"] == "running"
    assert row["attempts"] == 3
    assert isinstance(row["lease_token"], uuid.UUID)
    assert row["lease_token"] == job.lease_token
    assert row["leased_by"] == "w-42"
    assert before <= row["attempted_at"] <= after
    assert row["lease_expires_at"] - row["attempted_at"] == timedelta(seconds=45)
    assert job.lease_expires_at == row["lease_expires_at"]


def test_each_claim_gets_a_different_lease_token(conn, dsn, either_claim):
    for _ in range(3):
        make_job(conn)

    jobs = claim(dsn, ["default"], limit=3)

    assert len({j.lease_token for j in jobs}) == 3


def test_concurrent_claimers_never_get_the_same_job(conn, dsn, either_claim):
    ids = {make_job(conn) for _ in range(10)}

    async def go() -> tuple[list[Any], list[Any]]:
        a = await psycopg.AsyncConnection.connect(dsn)
        b = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        async with a, b:
            # A safety net only: without SKIP LOCKED, B would wait on A's row locks.
            await b.execute("SET lock_timeout = '10s'")
            async with a.transaction():
                jobs_a = await store.claim_jobs(
                    a, queues=["default"], limit=5, worker_id="A", lease_seconds=LEASE
                )
                # A has not committed: its five rows are locked and still look queued.
                jobs_b = await store.claim_jobs(
                    b, queues=["default"], limit=10, worker_id="B", lease_seconds=LEASE
                )
            return jobs_a, jobs_b

    jobs_a, jobs_b = asyncio.run(go())

    ids_a = {j.id for j in jobs_a}
    ids_b = {j.id for j in jobs_b}
    assert len(ids_a) == 5
    assert len(ids_b) == 5
    assert ids_a.isdisjoint(ids_b)
    assert ids_a | ids_b == ids
    with conn.cursor() as cur:
        cur.execute("SELECT leased_by, count(*) FROM pgqueue.jobs GROUP BY leased_by")
        assert dict(cur.fetchall()) == {"A": 5, "B": 5}
    assert scalar(conn, "SELECT max(attempts) FROM pgqueue.jobs") == 1


# A claim whose statement has taken its snapshot but not yet locked the job while another
# transaction changes the job and commits. FOR UPDATE re-reads the newest row version and
# rechecks the claim's conditions on it, so the claim must skip the job; its UPDATE matches
# the picked ids alone, so nothing else would stop it. The gap is held open by an advisory
# lock the test's statement waits on, taken after its snapshot, instead of by a sleep.
GATE = 4242
RACES = {
    "none": None,
    "cancelled": "UPDATE pgqueue.jobs SET state = 'cancelled', finished_at = now() WHERE id = %s",
    "rescheduled": "UPDATE pgqueue.jobs SET run_at = now() + interval '1 hour' WHERE id = %s",
    "deleted": "DELETE FROM pgqueue.jobs WHERE id = %s",
    # A rescued job runs alone (claim_rescued_job), any other through claim_jobs.
    "rescued flag flipped": "UPDATE pgqueue.jobs SET rescued = NOT rescued WHERE id = %s",
    "claimed elsewhere": "claim",
}


def wait_at_gate(conn: psycopg.Connection[Any], pid: int) -> None:
    """Until the statement of backend ``pid`` runs (its snapshot taken) and waits at the
    gate (see _gated)."""
    wait_until(
        lambda: (
            scalar(
                conn,
                "SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted"
                " AND locktype = 'advisory'",
                (pid,),
            )
            == 1
        )
    )


def _gated(name: str) -> str:
    query = QUERIES[name]
    plain = "FROM unnest(%(queues)s::text[]) AS q(name)"
    assert plain in query
    gate = (
        "FROM (SELECT u.name FROM unnest(%(queues)s::text[]) AS u(name)"
        f" WHERE pg_advisory_xact_lock_shared({GATE}) IS NOT NULL) AS q(name)"
    )
    return query.replace(plain, gate)


@pytest.mark.parametrize("name", ["claim_jobs", "claim_jobs_many"])
def test_claim_takes_a_job_whose_priority_was_raised_after_its_snapshot(conn, dsn, name):
    # The two-step claim's second step starts at the first job the first step saw: a job
    # given a smaller key meanwhile failed that recheck and was left, the claim short
    # (a review). Its third step takes it, as claim_jobs does.
    first = make_job(conn, queue="q0")
    raised = make_job(conn, queue="q0")
    make_job(conn, queue="q1", priority=3)
    params = {"queues": ["q0", "q1"], "limit": 10, "worker_id": "B", "lease_seconds": LEASE}
    result: dict[str, Any] = {}
    bounded = "-c lock_timeout=20s -c statement_timeout=30s"
    with (
        psycopg.connect(dsn, autocommit=True) as gatekeeper,
        psycopg.connect(dsn, autocommit=True, options=bounded) as claimer,
    ):
        gatekeeper.execute("SELECT pg_advisory_lock(%s)", (GATE,))
        thread = threading.Thread(
            target=lambda: result.update(rows=claimer.execute(_gated(name), params).fetchall())
        )
        thread.start()
        try:
            wait_at_gate(conn, claimer.info.backend_pid)
            conn.execute("UPDATE pgqueue.jobs SET priority = -5 WHERE id = %s", (raised,))
        finally:
            gatekeeper.execute("SELECT pg_advisory_unlock(%s)", (GATE,))
            thread.join(timeout=60)
    assert {row[0] for row in result["rows"]} >= {first, raised}
    assert len(result["rows"]) == 3


def test_claim_rescued_job_takes_one_job_however_many_wait(conn, dsn):
    # Found by a mutation audit: a claim of two rescued jobs at once was noticed only by
    # the random state machine. Each must run alone.
    ids = [make_job(conn, queue=q, rescued=True) for q in ("default", "default", "other")]

    claimed = run_async(
        dsn, store.claim_rescued_job, queues=["default", "other"], worker_id=WORKER,
        lease_seconds=LEASE,
    )  # fmt: skip

    assert claimed is not None and claimed.id == ids[0]
    running = conn.execute("SELECT id FROM pgqueue.jobs WHERE state = 'running'").fetchall()
    assert running == [(ids[0],)]


@pytest.mark.parametrize("race", list(RACES))
@pytest.mark.parametrize("name", ["claim_jobs", "claim_jobs_many", "claim_rescued_job"])
def test_claim_skips_a_job_changed_after_its_snapshot(conn, dsn, name, race):
    job_id = make_job(conn, rescued=(name == "claim_rescued_job"))
    params = {"queues": ["default"], "limit": 10, "worker_id": "B", "lease_seconds": LEASE}
    result: dict[str, Any] = {}
    # Timeouts so that a claim that ever locked the row before the gate fails the test
    # instead of hanging it.
    bounded = "-c lock_timeout=20s -c statement_timeout=30s"
    with (
        psycopg.connect(dsn, autocommit=True) as gatekeeper,
        psycopg.connect(dsn, autocommit=True, options=bounded) as claimer,
        psycopg.connect(dsn, autocommit=True, options=bounded) as racer,
    ):
        claimer_pid = claimer.info.backend_pid
        gatekeeper.execute("SELECT pg_advisory_lock(%s)", (GATE,))

        def run_claim() -> None:
            try:
                result["rows"] = claimer.execute(_gated(name), params).fetchall()
            except BaseException as exc:  # reported by the assertion below
                result["error"] = exc

        thread = threading.Thread(target=run_claim)
        thread.start()
        try:
            wait_at_gate(conn, claimer_pid)
            statement = RACES[race]
            if statement == "claim" and name != "claim_rescued_job":
                assert [j.id for j in claim(dsn, ["default"], limit=10, worker_id="A")] == [job_id]
            elif statement == "claim":
                other = run_async(
                    dsn,
                    store.claim_rescued_job,
                    queues=["default"],
                    worker_id="A",
                    lease_seconds=LEASE,
                )
                assert other is not None and other.id == job_id
            elif statement is not None:
                racer.execute(statement, (job_id,))
            before = job_row(conn, job_id)
        finally:
            gatekeeper.execute("SELECT pg_advisory_unlock(%s)", (GATE,))
            thread.join(timeout=60)
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")
    claimed = [row[0] for row in result["rows"]]
    if race == "none":
        assert claimed == [job_id]  # the gate itself changes nothing
        return
    assert claimed == []
    assert job_row(conn, job_id) == before


# --- fencing ------------------------------------------------------------------------------


@pytest.mark.parametrize("op", sorted(FENCED_OPS))
@pytest.mark.parametrize("wrong", ["random token", "another job's token"])
def test_fenced_operation_with_a_wrong_token_changes_nothing(conn, dsn, op, wrong):
    job_id = make_job(conn, state="running", errors=[ERROR_1])
    other_token = uuid.uuid4()
    make_job(conn, state="running", lease_token=other_token)
    token = uuid.uuid4() if wrong == "random token" else other_token
    before = job_row(conn, job_id)

    changed = fenced(dsn, op, [job_id], [token])

    assert changed == set()
    assert job_row(conn, job_id) == before
    assert scalar(conn, "SELECT count(*) FROM pgqueue.dead_jobs") == 0


@pytest.mark.parametrize("op", sorted(FENCED_OPS))
def test_fenced_operation_with_a_stale_token_after_reclaim_changes_nothing(conn, dsn, op):
    job_id = make_job(conn)
    (first,) = claim(dsn, ["default"], limit=1, worker_id="first")
    # The first lease is lost: the job goes back to the queue and is claimed again.
    conn.execute(
        "UPDATE pgqueue.jobs SET state = 'queued', lease_token = NULL,"
        " lease_expires_at = NULL WHERE id = %s",
        (job_id,),
    )
    (second,) = claim(dsn, ["default"], limit=1, worker_id="second")
    assert second.id == job_id
    assert second.lease_token != first.lease_token
    before = job_row(conn, job_id)

    changed = fenced(dsn, op, [job_id], [first.lease_token])

    assert changed == set()
    after = job_row(conn, job_id)
    assert after == before
    assert after is not None
    assert after["state"] == "running"
    assert after["attempts"] == 2
    assert after["lease_token"] == second.lease_token
    assert after["leased_by"] == "second"
    assert scalar(conn, "SELECT count(*) FROM pgqueue.dead_jobs") == 0
    # The current holder's token still works (the wrong-token result is not vacuous).
    assert fenced(dsn, op, [job_id], [second.lease_token]) == {job_id}


@pytest.mark.parametrize("op", sorted(FENCED_OPS))
def test_fenced_operation_in_a_batch_changes_only_rows_whose_token_matches(conn, dsn, op):
    good_token = uuid.uuid4()
    good = make_job(conn, state="running", lease_token=good_token)
    bad = make_job(conn, state="running")
    bad_before = job_row(conn, bad)

    changed = fenced(dsn, op, [good, bad], [good_token, uuid.uuid4()])

    assert changed == {good}
    assert job_row(conn, bad) == bad_before


# --- outcomes -----------------------------------------------------------------------------


def test_complete_marks_succeeded_sets_finished_at_and_clears_the_lease(conn, dsn):
    make_job(conn)
    (job,) = claim(dsn, ["default"], limit=1)
    before = db_clock(conn)

    changed = run_async(dsn, store.complete_jobs, ids=[job.id], tokens=[job.lease_token])

    after = db_clock(conn)
    assert changed == {job.id}
    row = job_row(conn, job.id)
    assert row is not None
    assert row["state"] == "succeeded"
    assert before <= row["finished_at"] <= after
    assert row["lease_token"] is None
    assert row["lease_expires_at"] is None
    assert row["attempts"] == 1


def test_retry_requeues_after_the_delay_appends_the_error_and_keeps_attempts(conn, dsn):
    token = uuid.uuid4()
    job_id = make_job(conn, state="running", lease_token=token, attempts=2, errors=[ERROR_1])
    before = db_clock(conn)

    changed = run_async(
        dsn, store.retry_jobs, ids=[job_id], tokens=[token], delays=[90.0], errors=[ERROR_2]
    )

    after = db_clock(conn)
    assert changed == {job_id}
    row = job_row(conn, job_id)
    assert row is not None
    assert row["state"] == "queued"
    assert row["attempts"] == 2
    delay = timedelta(seconds=90)
    assert before + delay <= row["run_at"] <= after + delay
    assert row["errors"] == [ERROR_1, ERROR_2]
    assert row["lease_token"] is None
    assert row["lease_expires_at"] is None


def test_snooze_requeues_after_the_delay_and_gives_the_attempt_back(conn, dsn):
    token = uuid.uuid4()
    job_id = make_job(conn, state="running", lease_token=token, attempts=2, errors=[ERROR_1])
    before = db_clock(conn)

    changed = run_async(dsn, store.snooze_jobs, ids=[job_id], tokens=[token], delays=[120.0])

    after = db_clock(conn)
    assert changed == {job_id}
    row = job_row(conn, job_id)
    assert row is not None
    assert row["state"] == "queued"
    assert row["attempts"] == 1
    delay = timedelta(seconds=120)
    assert before + delay <= row["run_at"] <= after + delay
    assert row["errors"] == [ERROR_1]
    assert row["lease_token"] is None
    assert row["lease_expires_at"] is None


def test_snooze_keeps_the_newest_50_snoozes_in_the_history_and_every_other_entry(conn, dsn):
    # A handler that polls by snoozing must not grow its row (rewritten by every
    # snooze) without end: a snooze counts no attempt, so nothing else bounds them.
    def entry(n: int, outcome: str) -> dict[str, Any]:
        return {"attempt": 1, "worker": WORKER, "outcome": outcome, "n": n}

    old = [entry(n, "retried" if n % 4 == 0 else "snoozed") for n in range(120)]
    token = uuid.uuid4()
    job_id = make_job(conn, state="running", lease_token=token, history=old)
    short_token = uuid.uuid4()
    short = make_job(conn, state="running", lease_token=short_token, history=old[:3])

    changed = run_async(
        dsn, store.snooze_jobs, ids=[job_id, short], tokens=[token, short_token],
        delays=[1.0, 1.0],
    )  # fmt: skip

    assert changed == {job_id, short}
    history = scalar(conn, "SELECT history FROM pgqueue.jobs WHERE id = %s", (job_id,))
    *kept, new = history
    snoozes = [e["n"] for e in old if e["outcome"] == "snoozed"]
    assert [e["n"] for e in kept] == sorted(
        [e["n"] for e in old if e["outcome"] == "retried"] + snoozes[-49:]
    )
    # The new entry counts the snoozes dropped (90 - 49), for `pgqueue status`.
    assert new["outcome"] == "snoozed" and "n" not in new
    assert new["snoozes_dropped"] == len(snoozes) - 49
    # The count runs on over the job's life, though the entries that held it go.
    again = history
    for _ in range(60):
        again = scalar(
            conn,
            "SELECT pgqueue.history_with_snooze(%s, pgqueue.history_entry("
            " 1, 'w', now(), 0.1, 'snoozed'))",
            (Jsonb(again),),
        )
    assert sum(e["outcome"] == "snoozed" for e in again) == 50
    assert len(again) == 50 + len(old) - len(snoozes)
    assert max(e.get("snoozes_dropped", 0) for e in again) == len(snoozes) - 49 + 60
    # history is any JSON to the table (a plain INSERT may set it): appended to as before.
    for odd in ({"odd": True}, [1, "x", {"snoozes_dropped": "many"}] * 20):
        appended = scalar(
            conn,
            'SELECT pgqueue.history_with_snooze(%s, \'[{"outcome": "snoozed"}]\')',
            (Jsonb(odd),),
        )
        assert appended == (odd if isinstance(odd, list) else [odd]) + [{"outcome": "snoozed"}]
    # A snoozes_dropped that is not a number is not counted (nor does it fail the snooze).
    odd_counts = [{"outcome": "snoozed", "snoozes_dropped": "many"}] * 60
    trimmed = scalar(
        conn,
        'SELECT pgqueue.history_with_snooze(%s, \'[{"outcome": "snoozed"}]\')',
        (Jsonb(odd_counts),),
    )
    assert trimmed == [*odd_counts[:49], {"outcome": "snoozed", "snoozes_dropped": 11}]
    # Shorter histories are only appended to.
    history = scalar(conn, "SELECT history FROM pgqueue.jobs WHERE id = %s", (short,))
    assert history[:3] == old[:3] and [e["outcome"] for e in history[3:]] == ["snoozed"]


def test_release_requeues_runnable_now_and_gives_the_attempt_back(conn, dsn):
    token = uuid.uuid4()
    job_id = make_job(
        conn,
        state="running",
        lease_token=token,
        attempts=2,
        run_at=db_clock(conn) - timedelta(hours=1),
    )
    before = db_clock(conn)

    changed = run_async(dsn, store.release_jobs, ids=[job_id], tokens=[token])

    after = db_clock(conn)
    assert changed == {job_id}
    row = job_row(conn, job_id)
    assert row is not None
    assert row["state"] == "queued"
    assert row["attempts"] == 1
    assert before <= row["run_at"] <= after
    assert row["lease_token"] is None
    assert row["lease_expires_at"] is None
    # Released jobs are claimable again at once.
    assert [j.id for j in claim(dsn, ["default"], limit=1)] == [job_id]


def test_dead_letter_moves_the_job_to_dead_jobs_with_its_errors_and_reason(conn, dsn):
    token = uuid.uuid4()
    job_id = make_job(
        conn,
        state="running",
        lease_token=token,
        attempts=3,
        max_attempts=5,
        queue="q",
        task="send",
        args={"to": "x"},
        priority=4,
        idempotency_key="key-1",
        errors=[ERROR_1],
    )
    original = job_row(conn, job_id)
    assert original is not None

    changed = run_async(
        dsn,
        store.dead_letter_jobs,
        ids=[job_id],
        tokens=[token],
        errors=[ERROR_2],
        reasons=["permanent"],
    )

    assert changed == {job_id}
    assert job_row(conn, job_id) is None
    dead = dead_row(conn, job_id)
    assert dead is not None
    assert dead["errors"] == [ERROR_1, ERROR_2]
    assert dead["reason"] == "permanent"
    for column in (
        "queue",
        "task",
        "args",
        "priority",
        "attempts",
        "max_attempts",
        "run_at",
        "idempotency_key",
        "created_at",
        "attempted_at",
    ):
        assert dead[column] == original[column], column


def test_dead_letter_that_cannot_insert_the_dead_row_leaves_the_job_in_place(conn, dsn):
    token = uuid.uuid4()
    job_id = make_job(conn, state="running", lease_token=token)
    # The dead-letter table refuses the row (a constraint of this test's own): the insert
    # half of the move must fail, and so must the delete half.
    conn.execute(
        "ALTER TABLE pgqueue.dead_jobs ADD CONSTRAINT refuse_permanent"
        " CHECK (reason <> 'permanent')"
    )
    before = job_row(conn, job_id)

    with pytest.raises(psycopg.errors.CheckViolation):
        run_async(
            dsn,
            store.dead_letter_jobs,
            ids=[job_id],
            tokens=[token],
            errors=[ERROR_2],
            reasons=["permanent"],
        )

    assert job_row(conn, job_id) == before


def insert_dead(conn: psycopg.Connection[Any], dead_id: int, task: str = "older") -> None:
    """A dead job of that id straight through SQL (as an older job of a repeated id)."""
    conn.execute(
        "INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts,"
        " max_attempts, run_at, created_at, reason)"
        " VALUES (%s, 'default', %s, '{}', 0, 1, 1, now(), now(), 'permanent')",
        (dead_id, task),
    )


def set_jobs_sequence(conn: psycopg.Connection[Any], value: int) -> None:
    """Set the jobs sequence so that its next value is ``value`` (a restore that did not
    carry it along)."""
    conn.execute("SELECT setval(pg_get_serial_sequence('pgqueue.jobs', 'id'), %s, false)", (value,))


def test_dead_letter_of_an_id_the_dead_letter_table_holds_stores_it_under_a_new_id(conn, dsn):
    # Ids repeat after an explicit id in an INSERT or a sequence set back. The move failed
    # on the primary key: the job ran again and again, then stayed running for good.
    token = uuid.uuid4()
    job_id = make_job(
        conn, state="running", lease_token=token, task="send", errors=[ERROR_1], attempts=3
    )
    insert_dead(conn, job_id)
    original = job_row(conn, job_id)
    assert original is not None

    async def go() -> store.Changed:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            return await store.dead_letter_jobs(
                aconn, ids=[job_id], tokens=[token], errors=[ERROR_2],
                reasons=["exhausted"], durations=[0.25],
            )  # fmt: skip

    changed = asyncio.run(go())

    assert changed == {job_id: "dead"}
    new_id = changed.renamed[job_id]
    assert new_id > job_id  # the next id of the jobs sequence
    assert job_row(conn, job_id) is None
    older = dead_row(conn, job_id)
    assert older is not None and older["task"] == "older" and older["original_id"] is None
    dead = dead_row(conn, new_id)
    assert dead is not None
    assert dead["original_id"] == job_id
    assert (dead["task"], dead["attempts"], dead["reason"]) == ("send", 3, "exhausted")
    assert dead["errors"] == [ERROR_1, ERROR_2]
    assert dead["history"][-1]["outcome"] == "dead"
    assert dead["history"][-1]["duration"] == 0.25
    # `pgqueue status <its id>` finds it (the one that died last under that id).
    status = store.job_status(conn, job_id=job_id)
    assert status is not None and (status.id, status.original_id) == (new_id, job_id)
    assert status.task == "send" and status.state is JobState.DEAD
    # A job that kept its own id has no original_id.
    plain_token = uuid.uuid4()
    plain = make_job(conn, state="running", lease_token=plain_token)
    plain_changed = run_async(
        dsn, store.dead_letter_jobs, ids=[plain], tokens=[plain_token], errors=[ERROR_2],
        reasons=["exhausted"],
    )  # fmt: skip
    assert plain_changed == {plain}
    plain_dead = dead_row(conn, plain)
    assert plain_dead is not None and plain_dead["original_id"] is None


def test_new_dead_ids_skip_the_ids_either_table_and_the_batch_hold(conn, dsn):
    # The sequence set back below ids both tables hold: the new id for a job whose id the
    # dead-letter table holds must be one neither table holds, nor one the same
    # statement moves. (The function sees the statement's own changes; as Postgres runs
    # it today each row is deleted and inserted before the next is looked at, so 1002 is
    # skipped as a row of pgqueue.jobs too: the batch argument guards other plans.)
    set_jobs_sequence(conn, 1000)
    tokens = [uuid.uuid4() for _ in range(3)]
    clashing = make_job(conn, state="running", lease_token=tokens[0])  # 1000
    for taken in (1000, 1001, 1003):
        insert_dead(conn, taken)
    conn.execute("INSERT INTO pgqueue.jobs (id, task, state) VALUES (1004, 't', 'queued')")
    in_batch = make_job(conn, id=1002, state="running", lease_token=tokens[1])
    also_clashing = make_job(conn, id=1003, state="running", lease_token=tokens[2])
    set_jobs_sequence(conn, 1001)

    async def go() -> store.Changed:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            return await store.dead_letter_jobs(
                aconn, ids=[clashing, in_batch, also_clashing], tokens=tokens,
                errors=[ERROR_2] * 3, reasons=["exhausted"] * 3, durations=[0.01] * 3,
            )  # fmt: skip

    changed = asyncio.run(go())

    assert clashing == 1000
    assert changed == {1000: "dead", 1002: "dead", 1003: "dead"}
    # 1001 (dead), 1002 (moved by this statement), 1003 (dead), 1004 (a job) are skipped;
    # which of the two gets 1005 depends on the order the statement moves them in.
    assert sorted(changed.renamed) == [1000, 1003]
    assert sorted(changed.renamed.values()) == [1005, 1006]
    rows = conn.execute("SELECT id, original_id FROM pgqueue.dead_jobs ORDER BY id").fetchall()
    renamed = sorted((dead_id, job_id) for job_id, dead_id in changed.renamed.items())
    assert rows == [(1000, None), (1001, None), (1002, None), (1003, None), *renamed]


def test_a_new_dead_id_skips_an_id_another_session_is_moving(conn, dsn):
    # Another session's uncommitted move of job X: X is in neither table as this session
    # sees it... except that pgqueue.jobs still shows X until that move commits, so a
    # job renamed meanwhile does not take X (it would wait on X's key and then fail).
    mover_token, clash_token = uuid.uuid4(), uuid.uuid4()
    set_jobs_sequence(conn, 500)
    moving = make_job(conn, state="running", lease_token=mover_token)  # 500
    clashing = make_job(conn, id=400, state="running", lease_token=clash_token)
    insert_dead(conn, clashing)
    set_jobs_sequence(conn, 500)  # the next value is the id being moved

    async def go() -> tuple[store.Changed, store.Changed]:
        mover = await psycopg.AsyncConnection.connect(dsn)
        renamer = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        async with mover, renamer:
            await renamer.execute("SET statement_timeout = '5s'")  # not wait on 500's key
            first = await store.dead_letter_jobs(
                mover, ids=[moving], tokens=[mover_token], errors=[ERROR_2],
                reasons=["exhausted"], durations=[0.01],
            )  # fmt: skip
            second = await store.dead_letter_jobs(
                renamer, ids=[clashing], tokens=[clash_token], errors=[ERROR_2],
                reasons=["exhausted"], durations=[0.01],
            )  # fmt: skip
            await mover.commit()
            return first, second

    first, second = asyncio.run(go())

    assert (moving, dict(first), first.renamed) == (500, {500: "dead"}, {})
    assert second.renamed == {400: 501}
    rows = conn.execute("SELECT id, original_id FROM pgqueue.dead_jobs ORDER BY id").fetchall()
    assert rows == [(400, None), (500, None), (501, 400)]


def test_status_of_a_repeated_id_shows_the_live_job_then_the_last_to_die(conn, dsn):
    # Ids repeat: `pgqueue status ID` shows a job in pgqueue.jobs first, else the dead
    # job that died last under that id, whether it kept the id or was stored under a new
    # one (original_id).
    job_id = make_job(conn, task="older")
    conn.execute(
        "INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts,"
        " max_attempts, run_at, created_at, reason, died_at)"
        " VALUES (%s, 'default', 'first', '{}', 0, 1, 1, now(), now(), 'permanent',"
        "         now() - interval '2 hours'),"
        "        (%s + 1000, 'default', 'second', '{}', 0, 1, 1, now(), now(), 'permanent',"
        "         now() - interval '1 hour')",
        (job_id, job_id),
    )
    conn.execute(
        "UPDATE pgqueue.dead_jobs SET original_id = %s WHERE id = %s + 1000", (job_id, job_id)
    )

    def shown() -> tuple[int, str, int | None]:
        status = store.job_status(conn, job_id=job_id)
        assert status is not None
        return status.id, status.task, status.original_id

    assert shown() == (job_id, "older", None)  # the live job first
    conn.execute("DELETE FROM pgqueue.jobs WHERE id = %s", (job_id,))
    assert shown() == (job_id + 1000, "second", job_id)  # died last, under a new id
    conn.execute("UPDATE pgqueue.dead_jobs SET died_at = now() WHERE id = %s", (job_id,))
    assert shown() == (job_id, "first", None)  # now the one that kept the id died last


# --- heartbeats ---------------------------------------------------------------------------


def test_extend_leases_extends_only_rows_held_under_the_given_tokens(conn, dsn):
    now = db_clock(conn)
    soon = now + timedelta(seconds=5)
    held_token, expired_token = uuid.uuid4(), uuid.uuid4()
    held = make_job(conn, state="running", lease_token=held_token, lease_expires_at=soon)
    # Expired, but not reaped yet: the worker is alive after all, so it is extended too.
    expired = make_job(
        conn,
        state="running",
        lease_token=expired_token,
        lease_expires_at=now - timedelta(seconds=5),
    )
    wrong = make_job(conn, state="running", lease_expires_at=soon)
    not_asked = make_job(conn, state="running", lease_expires_at=soon)
    untouched = {i: job_row(conn, i) for i in (wrong, not_asked)}
    before = db_clock(conn)

    changed = run_async(
        dsn,
        store.extend_leases,
        ids=[held, expired, wrong],
        tokens=[held_token, expired_token, uuid.uuid4()],
        lease_seconds=300.0,
    )

    after = db_clock(conn)
    assert changed == {held, expired}
    lease = timedelta(seconds=300)
    for job_id in (held, expired):
        row = job_row(conn, job_id)
        assert row is not None
        assert before + lease <= row["lease_expires_at"] <= after + lease
        assert row["state"] == "running"
    for job_id, row in untouched.items():
        assert job_row(conn, job_id) == row


def test_a_held_row_another_session_locks_comes_back_busy_not_lost(conn, dsn):
    # Found by a mutation audit: the statement could leave a locked row out of its result
    # altogether, and the heartbeat then took a job another session merely had locked for
    # a lost lease (dropped its result, released it as an orphan, ran it again).
    token, locked_token = uuid.uuid4(), uuid.uuid4()
    held = make_job(conn, state="running", lease_token=token)
    locked = make_job(conn, state="running", lease_token=locked_token)
    taken = make_job(conn, state="running")  # under another token: lost
    before = job_row(conn, locked)
    with psycopg.connect(dsn) as holder:
        holder.execute("SELECT 1 FROM pgqueue.jobs WHERE id = %s FOR UPDATE", (locked,))
        extended, busy = run_async(
            dsn,
            store.heartbeat_leases,
            ids=[held, locked, taken],
            tokens=[token, locked_token, uuid.uuid4()],
            lease_seconds=300.0,
        )
        holder.rollback()
    assert extended == {token: False}  # by lease token (a worker may hold two attempts)
    assert busy == {locked_token}
    assert job_row(conn, locked) == before  # skipped, not waited for


def test_extend_leases_with_no_jobs_returns_an_empty_set(dsn):
    assert run_async(dsn, store.extend_leases, ids=[], tokens=[], lease_seconds=30.0) == set()


# --- seconds_until_due --------------------------------------------------------------------


def test_seconds_until_due_is_the_earliest_future_queued_job_across_queues_and_priorities(
    conn, dsn
):
    t0 = db_clock(conn)

    def at(seconds: float) -> datetime:
        return t0 + timedelta(seconds=seconds)

    make_job(conn, queue="a", priority=0, run_at=at(-60))  # due: not in the future
    make_job(conn, queue="a", priority=0, run_at=at(600))
    make_job(conn, queue="a", priority=5, run_at=at(300))
    make_job(conn, queue="b", priority=-3, run_at=at(400))
    make_job(conn, queue="b", priority=7, run_at=at(90))  # the earliest
    make_job(conn, queue="b", priority=7, run_at=at(200))
    make_job(conn, queue="c", priority=0, run_at=at(10))  # another queue
    make_job(conn, queue="a", state="running", run_at=at(20))  # not queued
    make_job(conn, queue="a", state="succeeded", finished_at=t0, run_at=at(30))

    seconds, rescued_seconds = run_async(dsn, store.seconds_until_due, queues=["a", "b"])

    elapsed = (db_clock(conn) - t0).total_seconds()
    assert seconds is not None
    assert 90 - elapsed <= seconds <= 90
    assert rescued_seconds is None


def test_seconds_until_due_says_when_the_earliest_rescued_job_falls_due(conn, dsn):
    # The claim leaves a rescued job to the worker's check for rescued jobs, made once
    # per poll interval: one retried with backoff waited for that poll after falling due.
    t0 = db_clock(conn)
    make_job(conn, queue="a", run_at=t0 + timedelta(seconds=100))
    make_job(conn, queue="a", priority=3, run_at=t0 + timedelta(seconds=500), rescued=True)
    make_job(conn, queue="a", priority=3, run_at=t0 + timedelta(seconds=300), rescued=True)
    make_job(conn, queue="b", run_at=t0 + timedelta(seconds=50), rescued=True)  # not served

    seconds, rescued_seconds = run_async(dsn, store.seconds_until_due, queues=["a"])

    elapsed = (db_clock(conn) - t0).total_seconds()
    assert seconds is not None and 100 - elapsed <= seconds <= 100
    assert rescued_seconds is not None and 300 - elapsed <= rescued_seconds <= 300


def test_seconds_until_due_is_none_without_a_future_queued_job_in_the_queues(conn, dsn):
    assert run_async(dsn, store.seconds_until_due, queues=["a"]) == (None, None)

    t0 = db_clock(conn)
    make_job(conn, queue="a", run_at=t0 - timedelta(seconds=1))
    make_job(conn, queue="b", run_at=t0 + timedelta(hours=1))
    make_job(conn, queue="a", state="running", run_at=t0 + timedelta(hours=1))

    assert run_async(dsn, store.seconds_until_due, queues=["a"]) == (None, None)


def test_seconds_until_due_counts_a_job_that_fell_due_within_the_lookback(conn, dsn):
    # A job that fell due between the worker's claim and this statement was in neither:
    # the worker slept until the next poll. Within the lookback it comes back as due now
    # (negative); older due jobs, and due rescued ones, stay out (an idle worker would spin).
    t0 = db_clock(conn)
    make_job(conn, queue="a", run_at=t0 - timedelta(seconds=30))  # older than the lookback
    make_job(conn, queue="a", run_at=t0 - timedelta(seconds=1), rescued=True)
    make_job(conn, queue="a", run_at=t0 + timedelta(hours=1))
    due = run_async(dsn, store.seconds_until_due, queues=["a"], lookback_seconds=5.0)
    assert due.seconds is not None and due.seconds > 3000 and due.rescued_seconds is None

    make_job(conn, queue="a", run_at=t0 - timedelta(seconds=1))  # fell due just now
    due = run_async(dsn, store.seconds_until_due, queues=["a"], lookback_seconds=5.0)
    assert due.seconds is not None and -5.0 < due.seconds < 0
    due = run_async(dsn, store.seconds_until_due, queues=["a"], lookback_seconds=0.0)
    assert due.seconds is not None and due.seconds > 3000


def test_seconds_until_due_counts_a_rescued_job_that_fell_due_since_the_last_check(conn, dsn):
    # A rescued job that fell due after the now() of the worker's check for rescued jobs
    # was in neither that check nor (rescued jobs being the check's) the claim: the idle
    # worker waited for its next poll. It comes back as due now (negative
    # rescued_seconds); one the check saw (due before it) stays out, and so does a due job
    # that is not rescued and older than the claim's lookback.
    t0 = db_clock(conn)
    make_job(conn, queue="a", run_at=t0 - timedelta(seconds=30), rescued=True)  # seen
    make_job(conn, queue="a", run_at=t0 - timedelta(seconds=2))  # the claim's to take
    make_job(conn, queue="a", run_at=t0 + timedelta(hours=1))

    def due(rescued_since: datetime | None) -> store.Due:
        return run_async(
            dsn,
            store.seconds_until_due,
            queues=["a"],
            lookback_seconds=0.1,
            rescued_since=rescued_since,
        )

    assert due(t0 - timedelta(seconds=5)) == (pytest.approx(3600, abs=60), None)

    make_job(conn, queue="a", priority=4, run_at=t0 - timedelta(seconds=1), rescued=True)
    seconds, rescued_seconds = due(t0 - timedelta(seconds=5))
    assert rescued_seconds is not None and rescued_seconds < -1
    # The claim does not take it: the next job the claim would take is still an hour away.
    assert seconds == pytest.approx(3600, abs=60)
    # The check saw it (it fell due before the check's now()), or none was made.
    assert due(t0 - timedelta(seconds=0.5)) == (pytest.approx(3600, abs=60), None)
    assert due(None) == (pytest.approx(3600, abs=60), None)


def test_rescued_waiting_says_when_it_looked(conn, dsn):
    before = db_clock(conn)
    make_job(conn, queue="a", rescued=True, run_at=before - timedelta(seconds=1))
    check = run_async(dsn, store.rescued_waiting, queues=["a"])
    assert check.waiting is True and before <= check.checked_at <= db_clock(conn)
    assert run_async(dsn, store.rescued_waiting, queues=["b"]).waiting is False


def test_workers_take_turns_to_drain_for_a_rescued_job(conn, dsn):
    # Three live workers serve queue a (one of them a as well as b), one serves only b,
    # one is stale: only the three take turns, a stagger apart, from when the job fell
    # due, the first chosen by the job's id.
    for worker_id, queues, beat_ago in [
        ("w1", ["a"], 0), ("w2", ["b", "a"], 0), ("w3", ["a"], 0), ("wb", ["b"], 0),
        ("w0-stale", ["a"], 30),
    ]:  # fmt: skip
        conn.execute(
            "INSERT INTO pgqueue.workers (id, host, pid, queues, concurrency,"
            " heartbeat_seconds, version, last_heartbeat_at)"
            " VALUES (%s, 'h', 1, %s, 1, 10, 'v', now() - make_interval(secs => %s))",
            (worker_id, queues, beat_ago),
        )
    waited = 4.0
    job_id = make_job(
        conn, queue="a", rescued=True, run_at=db_clock(conn) - timedelta(seconds=waited)
    )

    def drain_in(worker_id: str, queues: list[str]) -> float | None:
        check = run_async(
            dsn, store.rescued_waiting, queues=queues, worker_id=worker_id, stagger_seconds=10.0
        )
        assert check.waiting is True
        return check.drain_in

    fleet = ["w1", "w2", "w3"]
    turns = {w: round((drain_in(w, ["a"]) + waited) / 10.0) for w in fleet}  # type: ignore[operator]
    first = fleet[job_id % 3]
    assert turns[first] == 0
    assert sorted(turns.values()) == [0, 1, 2]
    assert [turns[w] for w in fleet] == [(i - job_id % 3) % 3 for i in range(3)]
    # The first one's turn came when the job fell due: it drains now.
    assert drain_in(first, ["a"]) == pytest.approx(-waited, abs=1.0)
    # A worker not in the list (not registered yet, or stale) drains at once, as all did.
    assert drain_in("w0-stale", ["a"]) == pytest.approx(-waited, abs=1.0)
    assert drain_in("unknown", ["a"]) == pytest.approx(-waited, abs=1.0)
    # Nothing is due in b.
    assert run_async(
        dsn, store.rescued_waiting, queues=["b"], worker_id="wb", stagger_seconds=10.0
    ) == (False, pytest.approx(db_clock(conn), abs=timedelta(seconds=5)), None)


def test_turns_for_rescued_jobs_in_several_queues_follow_each_queues_own_workers(conn, dsn):
    # The turns are counted once per queue from the workers' queues (a review found the
    # per-job count took 2 s a call with 40 workers serving 1,000 queues): each queue's
    # turns are still its own live workers', in id order, a queue listed twice by one
    # worker counted once.
    fleet = {"w1": ["a", "b"], "w2": ["b"], "w3": ["a", "a", "c"], "w4": ["c", "b"]}
    for worker_id, queues in fleet.items():
        conn.execute(
            "INSERT INTO pgqueue.workers (id, host, pid, queues, concurrency,"
            " heartbeat_seconds, version) VALUES (%s, 'h', 1, %s, 1, 10, 'v')",
            (worker_id, queues),
        )
    waited = 4.0
    due = db_clock(conn) - timedelta(seconds=waited)
    jobs = {q: make_job(conn, queue=q, rescued=True, run_at=due) for q in ("a", "b", "c")}
    for queue, job_id in jobs.items():
        serving = sorted(w for w, queues in fleet.items() if queue in queues)
        for worker_id in [*fleet, "unknown"]:
            check = run_async(
                dsn, store.rescued_waiting, queues=[queue], worker_id=worker_id,
                stagger_seconds=10.0,
            )  # fmt: skip
            assert check.waiting is True
            turn = 0
            if worker_id in serving:
                n = len(serving)
                turn = (serving.index(worker_id) - job_id % n) % n
            assert check.drain_in == pytest.approx(turn * 10.0 - waited, abs=1.0), (
                queue, worker_id,
            )  # fmt: skip


def test_the_rescued_check_counts_each_queues_workers_once_not_once_per_due_job(dsn):
    # Counted in a correlated subquery per due rescued job (a SubPlan over every worker's
    # queues array), the check took 2 s a call with 40 workers serving 1,000 queues after
    # they all died at once (a review); counted in a CTE the generic plan did not keep
    # apart, the grouping ran again for each due job (1.7 s). The worker's generic plan
    # counts in one materialized CTE and has no SubPlan.
    params = {"queues": ["a", "b"], "worker_id": "w1", "stagger_seconds": 10.0}
    nodes = _generic_plan(dsn, "rescued_waiting", params, (store.NO_SEQ_SCANS, store.NO_JIT))
    assert any(n.get("Subplan Name") == "CTE places" for n in nodes), nodes
    assert not [n for n in nodes if n.get("Parent Relationship") == "SubPlan"], nodes


# --- notify trigger -----------------------------------------------------------------------


@contextlib.contextmanager
def listening(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgqueue_jobs")
        yield listener


def test_bulk_insert_notifies_once_per_queue_not_once_per_row(conn, dsn):
    with listening(dsn) as listener:
        with conn.transaction():
            conn.execute("SET LOCAL track_functions = 'pl'")
            conn.execute(
                "INSERT INTO pgqueue.jobs (queue, task)"
                " SELECT CASE WHEN i % 2 = 0 THEN 'q-even' ELSE 'q-odd' END, 't'"
                " FROM generate_series(1, 1000) AS i"
            )
            trigger_calls = scalar(
                conn,
                "SELECT calls FROM pg_stat_xact_user_functions"
                " WHERE schemaname = 'pgqueue' AND funcname = 'notify_inserted'",
            )
        received = notified_before_sentinel(conn, listener)

    assert sorted(received) == ["q-even", "q-odd"]
    # Postgres folds identical notifications within a transaction, so the count above
    # alone would not tell a per-row trigger from a per-statement one; the call count does.
    assert trigger_calls == 1
    assert scalar(conn, "SELECT count(*) FROM pgqueue.jobs") == 1000


def test_inserting_only_finished_jobs_notifies_nothing(conn, dsn):
    with listening(dsn) as listener:
        conn.execute(
            "INSERT INTO pgqueue.jobs (queue, task, state, finished_at)"
            " SELECT 'q-done', 't', 'succeeded', now() FROM generate_series(1, 10)"
        )
        assert notified_before_sentinel(conn, listener) == []


@pytest.mark.parametrize(
    ("value", "notifies"),
    [
        ("off", False), ("OFF", False), (" false ", False), ("no", False), ("0", False),
        ("of", False), ("F", False), ("fals", False), ("n", False), ("\toff\n", False),
        ("on", True), ("True", True), ("yes", True), ("1", True), ("", True),
        ("t", True), ("tru", True), ("Y", True), ("ye", True), (" on\r\n", True),
    ],
)  # fmt: skip
def test_setting_notify_inserts_turns_the_insert_notification_off_and_on(
    conn, dsn, value, notifies
):
    with listening(dsn) as listener:
        conn.execute("SELECT set_config('pgqueue.notify_inserts', %s, false)", (value,))
        conn.execute("INSERT INTO pgqueue.jobs (queue, task) VALUES ('q-set', 't')")
        # Through pgqueue.enqueue and COPY too: they insert into the same table.
        conn.execute("SELECT pgqueue.enqueue('t', '{}', 'q-set')")
        with conn.cursor().copy("COPY pgqueue.jobs (queue, task) FROM STDIN") as copy:
            copy.write_row(("q-set", "t"))
        assert notified_before_sentinel(conn, listener) == (["q-set"] * 3 if notifies else [])
    assert scalar(conn, "SELECT count(*) FROM pgqueue.jobs") == 3
    # The same reading as Postgres' own for a boolean (empty: unset, the default on).
    if value.strip():
        assert scalar(conn, "SELECT %s::boolean", (value,)) is notifies


def test_notify_inserts_off_for_one_transaction_only(conn, dsn):
    with listening(dsn) as listener:
        with conn.transaction():
            conn.execute("SET LOCAL pgqueue.notify_inserts = off")
            conn.execute("INSERT INTO pgqueue.jobs (queue, task) VALUES ('q-quiet', 't')")
        conn.execute("INSERT INTO pgqueue.jobs (queue, task) VALUES ('q-loud', 't')")
        assert notified_before_sentinel(conn, listener) == ["q-loud"]


@pytest.mark.parametrize("notify_inserts", ["on", "off"])
def test_dead_retry_wakes_each_revived_queue_once_whatever_notify_inserts_says(
    conn, dsn, notify_inserts
):
    # retry_dead left the wake-up to the insert trigger: with pgqueue.notify_inserts off
    # (set for enqueues) the revived jobs waited for a poll, unlike run-now's.
    conn.execute(
        "INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts,"
        " max_attempts, run_at, created_at, reason)"
        " SELECT i, CASE WHEN i < 904 THEN 'q-a' ELSE 'q-b' END, 't', '{}', 0, 3, 3,"
        " now(), now(), 'exhausted' FROM generate_series(901, 905) AS i"
    )
    conn.execute("SELECT set_config('pgqueue.notify_inserts', %s, false)", (notify_inserts,))
    with listening(dsn) as listener:
        moved = store.retry_dead(conn, ids=None, queue=None, task=None, limit=10)
        # Postgres sends the trigger's notification and the statement's own once.
        assert sorted(notified_before_sentinel(conn, listener)) == ["q-a", "q-b"]
    assert len(moved) == 5
    assert scalar(conn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'queued'") == 5
    # Nothing revived, nothing sent.
    with listening(dsn) as listener:
        assert store.retry_dead(conn, ids=None, queue=None, task=None, limit=10) == []
        assert notified_before_sentinel(conn, listener) == []


def test_notify_inserts_off_still_refuses_oversized_args(conn):
    conn.execute("SET pgqueue.notify_inserts = off")
    conn.execute("SET pgqueue.max_args_bytes = '100'")
    with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="over the limit"):
        conn.execute(
            "INSERT INTO pgqueue.jobs (task, args) VALUES ('t', jsonb_build_object('s', %s::text))",
            ("x" * 200,),
        )
    assert scalar(conn, "SELECT count(*) FROM pgqueue.jobs") == 0


@pytest.mark.parametrize("value", ["sometimes", "o", "offf", "nope", "2", "of f"])
def test_notify_inserts_with_a_value_that_is_not_on_or_off_refuses_the_insert(conn, value):
    # The values Postgres itself refuses for a boolean: a typo must not silently turn
    # wake-ups off (or on).
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        conn.execute("SELECT %s::boolean", (value,))
    conn.execute("SELECT set_config('pgqueue.notify_inserts', %s, false)", (value,))
    with pytest.raises(psycopg.errors.InvalidParameterValue) as refused:
        conn.execute("INSERT INTO pgqueue.jobs (task) VALUES ('t')")
    assert f"pgqueue.notify_inserts is '{value}', not on or off" in str(refused.value)
    assert refused.value.diag.message_hint == (
        "set pgqueue.notify_inserts to on (the default) or off (or true/false, yes/no, 1/0)"
    )
    conn.execute("RESET pgqueue.notify_inserts")
    assert scalar(conn, "SELECT count(*) FROM pgqueue.jobs") == 0


# --- notifications give way to a filling NOTIFY queue (migration 0014) -------------------


def with_notify_limit(dsn: str, value: str | None) -> str:
    """``dsn`` with pgqueue.notify_max_queue_usage set for the session (None: unset)."""
    if value is None:
        return dsn
    # The server splits options at white space unless a backslash escapes it.
    escaped = re.sub(r"([\\\s])", r"\\\1", value)
    return make_conninfo(dsn, options=f"-c pgqueue.notify_max_queue_usage={escaped}")


def future(conn: psycopg.Connection[Any]) -> datetime:
    return db_clock(conn) + timedelta(hours=1)


def running(conn: psycopg.Connection[Any], queue: str, **columns: Any) -> tuple[int, uuid.UUID]:
    job_id = make_job(conn, queue=queue, state="running", **columns)
    return job_id, job_row(conn, job_id)["lease_token"]  # type: ignore[index]


def rescued_wake(queue: str, rescued: bool) -> list[str]:
    """The payload that wakes workers for a job made runnable: a rescued one has its own."""
    return [" rescued " + queue if rescued else queue]


def wake_by_insert(conn: psycopg.Connection[Any], dsn: str, queue: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as c:
        job_id = scalar(c, "SELECT pgqueue.enqueue('t', '{}', %s)", (queue,))
    assert job_row(conn, job_id)["state"] == "queued"  # type: ignore[index]
    return [queue]


def wake_by_retry(
    conn: psycopg.Connection[Any], dsn: str, queue: str, rescued: bool = False
) -> list[str]:
    job_id, token = running(conn, queue, rescued=rescued)
    changed = run_async(
        dsn, store.retry_jobs, ids=[job_id], tokens=[token], delays=[0.0], errors=[ERROR_1]
    )
    assert changed == {job_id} and job_row(conn, job_id)["state"] == "queued"  # type: ignore[index]
    return rescued_wake(queue, rescued)


def wake_by_snooze(
    conn: psycopg.Connection[Any], dsn: str, queue: str, rescued: bool = False
) -> list[str]:
    job_id, token = running(conn, queue, rescued=rescued)
    assert run_async(dsn, store.snooze_jobs, ids=[job_id], tokens=[token], delays=[0.0]) == {job_id}
    return rescued_wake(queue, rescued)


def wake_by_release(
    conn: psycopg.Connection[Any], dsn: str, queue: str, rescued: bool = False
) -> list[str]:
    job_id, token = running(conn, queue, rescued=rescued)
    assert run_async(dsn, store.release_jobs, ids=[job_id], tokens=[token]) == {job_id}
    return rescued_wake(queue, rescued)


def wake_by_orphan_release(
    conn: psycopg.Connection[Any], dsn: str, queue: str, rescued: bool = False
) -> list[str]:
    job_id, _ = running(conn, queue, rescued=rescued)
    assert run_async(dsn, store.release_orphans, worker_id=WORKER, keep=[]) == {job_id}
    return rescued_wake(queue, rescued)


def wake_by_reaper(conn: psycopg.Connection[Any], dsn: str, queue: str) -> list[str]:
    job_id, _ = running(conn, queue, lease_expires_at=db_clock(conn) - timedelta(seconds=5))
    with psycopg.connect(dsn, autocommit=True) as c:
        rows = store.requeue_expired(
            c, batch_size=10, backoff_base_seconds=0.0, backoff_max_seconds=0.0
        )
    assert [r["id"] for r in rows] == [job_id]
    return rescued_wake(queue, True)  # every job it requeues is rescued


def wake_by_run_now(
    conn: psycopg.Connection[Any], dsn: str, queue: str, rescued: bool = False
) -> list[str]:
    job_id = make_job(conn, queue=queue, run_at=future(conn), rescued=rescued)
    with psycopg.connect(dsn, autocommit=True) as c:
        assert store.run_now(c, job_ids=[job_id]) == {job_id: None}
    return rescued_wake(queue, rescued)


def wake_by_resume(conn: psycopg.Connection[Any], dsn: str, queue: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as c:
        store.pause_queue(c, name=queue)
        assert store.resume_queue(c, name=queue)
    # Rescued jobs may wait in the paused queue too.
    return [queue, *rescued_wake(queue, True)]


def wake_by_drain(conn: psycopg.Connection[Any], dsn: str, queue: str) -> list[str]:
    make_job(conn, queue=queue, run_at=future(conn))
    assert run_async(dsn, store.drain_schedule_now, queues=[queue]) == [queue]
    return [queue]


WAKERS = [
    wake_by_insert,
    wake_by_retry,
    wake_by_snooze,
    wake_by_release,
    wake_by_orphan_release,
    wake_by_reaper,
    wake_by_run_now,
    wake_by_resume,
    wake_by_drain,
]


@pytest.mark.parametrize("wake", WAKERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(("limit", "notifies"), [(None, True), ("0", False)])
def test_every_statement_that_makes_jobs_runnable_notifies_below_the_usage_limit_only(
    conn, dsn, wake, limit, notifies
):
    # Each still does its work and returns its rows when it does not notify: past the
    # limit, jobs are found by the workers' poll instead of failing the statement.
    conn.execute("SET pgqueue.notify_inserts = off")  # the jobs each test sets up
    with listening(dsn) as listener:
        payloads = wake(conn, with_notify_limit(dsn, limit), "q-wake")
        assert sorted(notified_before_sentinel(conn, listener)) == (
            sorted(payloads) if notifies else []
        )


@pytest.mark.parametrize(
    "wake",
    [wake_by_retry, wake_by_snooze, wake_by_release, wake_by_orphan_release, wake_by_run_now],
)
def test_a_rescued_job_made_runnable_wakes_the_workers_to_check_for_rescued_jobs(conn, dsn, wake):
    # The claim leaves rescued jobs to the workers' check for them, made once per poll
    # interval: woken by the queue's name, an idle worker claimed nothing and the
    # rescued job waited for its next poll. ' rescued <queue>' makes it check at once.
    conn.execute("SET pgqueue.notify_inserts = off")
    with listening(dsn) as listener:
        wake(conn, dsn, "q-rescued", rescued=True)
        assert notified_before_sentinel(conn, listener) == [" rescued q-rescued"]


def test_no_named_query_notifies_except_through_pgqueue_wake():
    # A pg_notify of its own would fail the statement once the NOTIFY queue is full.
    assert [name for name, text in QUERIES.items() if "pg_notify" in text] == []
    assert {name for name, text in QUERIES.items() if "pgqueue.wake(" in text} >= {
        "retry_jobs", "snooze_jobs", "release_jobs", "release_orphans", "requeue_expired",
        "run_now", "resume_queue", "drain_schedule_now", "cancel_job",
    }  # fmt: skip


@pytest.mark.parametrize(("limit", "notifies"), [(None, True), ("0", False)])
def test_cancelling_a_running_job_tells_its_worker_and_a_queued_one_tells_no_one(
    conn, dsn, limit, notifies
):
    conn.execute("SET pgqueue.notify_inserts = off")  # the jobs this test sets up
    job_id, _ = running(conn, "q-cancel")
    queued = make_job(conn, queue="q-cancel")
    # A worker id too long for a notification's payload: flagged, its worker not told.
    long_named, _ = running(conn, "q-cancel", leased_by="w" * 8000)
    with listening(dsn) as listener:
        with psycopg.connect(with_notify_limit(dsn, limit), autocommit=True) as c:
            assert store.cancel_job(c, job_id=job_id) == "running"
            assert store.cancel_job(c, job_id=queued) == "cancelled"
            assert store.cancel_job(c, job_id=queued) is None
            assert store.cancel_job(c, job_id=long_named) == "running"
        # No queue name starts with white space: no worker takes it for a wake-up.
        expected = [f" cancel {WORKER}"] if notifies else []
        assert notified_before_sentinel(conn, listener) == expected
    assert job_row(conn, job_id)["cancel_requested_at"] is not None  # type: ignore[index]


# What notify_queue_held's 2,000 notifications fill at least (about ten 8 kB pages).
HELD_USAGE_FLOOR = 6 / 2**20


@contextlib.contextmanager
def notify_queue_held(conn: psycopg.Connection[Any], dsn: str) -> Iterator[None]:
    """A listener left in an open transaction holds every notification sent from here on;
    2,000 of them fill about ten of the NOTIFY queue's 2**20 pages, at least
    HELD_USAGE_FLOOR of it until the block ends."""
    with psycopg.connect(dsn) as stuck:
        stuck.execute("LISTEN pgqueue_jobs")
        stuck.commit()
        stuck.execute("SELECT 1")
        with conn.cursor() as cur:
            for _ in range(2000):
                cur.execute("SELECT pg_notify('pgqueue_jobs', 'filler')")
        assert scalar(conn, "SELECT pg_notification_queue_usage()") >= HELD_USAGE_FLOOR
        try:
            yield
        finally:
            stuck.rollback()


# Not a decimal number: counted as unset (0.5), never an error in a statement.
UNREADABLE_LIMITS = [
    ".", "-1", "abc", "50%", "0,2", "NaN", "Infinity", "1e-400", "1" * 16, "0.5.5", "0x1",
    "1e", "e5", "half",
]  # fmt: skip


def test_the_limit_is_a_decimal_number_and_anything_else_counts_as_unset(conn, dsn):
    # Compared with the queue's real usage, on the trigger's copy and on notify_room().
    with listening(dsn) as listener, notify_queue_held(conn, dsn):
        # The queue is fuller than this while our listener holds it, whatever other test
        # processes add to the server's one queue and take away again meanwhile.
        below = HELD_USAGE_FLOOR / 2
        fuller_than = [
            f"{below:.12f}",
            f" {below:.12f}\n",
            f"+{below:.12f}",
            f"{below:.3e}",
            f"{below * 1e6:.3f}E-6",
            "0",
            "0.",
            ".0",
            "0e0",
        ]
        unset = ["", *UNREADABLE_LIMITS]
        expected = []
        for i, value in enumerate(fuller_than + unset):
            for wake in (wake_by_insert, wake_by_retry):
                queue = f"q{i}-{wake.__name__}"
                wake(conn, with_notify_limit(dsn, value), queue)
                if value in unset:
                    expected.append(queue)
        received = [p for p in notified_before_sentinel(conn, listener) if p != "filler"]
    assert sorted(received) == sorted(expected)


def test_a_session_keeps_the_answer_for_its_second_and_reads_again_for_a_new_limit(conn, dsn):
    # Reading the queue's usage takes a lock global to the server: a session keeps the
    # answer, keyed by the limit it was read under and its transaction's second.
    def keep(seconds_ago: int) -> None:  # as if read then, with room
        producer.execute(
            "SELECT set_config('pgqueue.notify_room_cache',"
            " '0@' || (extract(epoch FROM now())::bigint - %s) || ':t', false)",
            (seconds_ago,),
        )

    def kept() -> str:
        return str(scalar(producer, "SELECT current_setting('pgqueue.notify_room_cache')"))

    def this_second(answer: str) -> str:
        second = scalar(producer, "SELECT extract(epoch FROM now())::bigint")
        return f"0@{second}:{answer}"

    with psycopg.connect(dsn, autocommit=True) as producer, listening(dsn) as listener:
        producer.execute("SET pgqueue.notify_max_queue_usage = '0'")  # no room, if read
        with producer.transaction():
            keep(0)
            producer.execute("SELECT pgqueue.enqueue('t', '{}', 'q-kept')")
            producer.execute("SELECT pgqueue.wake('q-kept-too')")
        # An answer from an earlier second is read again, by the trigger and by wake().
        with producer.transaction():
            keep(1)
            producer.execute("SELECT pgqueue.enqueue('t', '{}', 'q-stale')")
            assert kept() == this_second("f")  # what it read is kept
        with producer.transaction():
            keep(1)
            producer.execute("SELECT pgqueue.wake('q-stale-too')")
            assert kept() == this_second("f")
        # Under another limit, read again at once.
        with producer.transaction():
            keep(0)
            producer.execute("SET LOCAL pgqueue.notify_max_queue_usage = '0.0'")
            producer.execute("SELECT pgqueue.enqueue('t', '{}', 'q-new-limit')")
        assert notified_before_sentinel(conn, listener) == ["q-kept", "q-kept-too"]


def test_the_triggers_copy_of_notify_room_reads_the_limit_as_notify_room_does(conn):
    # The insert trigger carries its own copy (the enqueue's hot path): a later migration
    # that changes one must change the other.
    def source(name: str) -> str:
        return str(scalar(conn, "SELECT prosrc FROM pg_proc WHERE oid = %s::regprocedure", (name,)))

    room, trigger = source("pgqueue.notify_room()"), source("pgqueue.notify_inserted()")
    for part in (
        r"limit_text ~ '([^']*)'",
        r"btrim\(\s*coalesce\(current_setting\('pgqueue.notify_max_queue_usage', true\),"
        r"\s*''\),\s*(E'[^']*')\)",
        r"room_key (?:text )?:= (limit_text \|\| '@' \|\| [^;]*);",
        r"set_config\('pgqueue.notify_room_cache',\s*([^;]*);",
        r"THEN (limit_text::double precision ELSE [0-9.]+) END",
    ):
        in_room, in_trigger = re.findall(part, room), re.findall(part, trigger)
        assert len(in_room) == 1 and in_room == in_trigger, (part, in_room, in_trigger)


def test_an_unreadable_limit_is_named_and_a_readable_or_blank_one_is_not(conn, dsn):
    # The daemons' start-up warning (store.notify_limit_ignored) reads the setting as
    # notify_room() does: what that counts as unset while set is named, nothing else.
    readable = ["0.2", " 0.2\n", "+0.2", "2.5e-1", "200000.000E-6", "0", "0.", ".0", "1"]
    for value in [None, "", " \t", *readable, *UNREADABLE_LIMITS]:
        with psycopg.connect(with_notify_limit(dsn, value), autocommit=True) as session:
            ignored = store.notify_limit_ignored(session)
        assert ignored == ([("this session", value)] if value in UNREADABLE_LIMITS else []), value
    # The named query carries notify_room()'s pattern and trimming.
    room = str(
        scalar(conn, "SELECT prosrc FROM pg_proc WHERE oid = 'pgqueue.notify_room()'::regprocedure")
    )
    for part in (r"~ '([^']*)'", r"(E'[^']*')\)"):
        in_room = set(re.findall(part, room))
        in_query = set(re.findall(part, QUERIES["notify_limit_ignored"]))
        assert len(in_room) == 1 and in_query == in_room, (part, in_room, in_query)


def test_unreadable_limits_set_for_the_database_or_a_role_in_it_are_named(conn, dsn):
    # Producers read the limit in their own sessions: a value set for the database or for
    # their role is named too, even when the checking session overrides it; the
    # checking session's own value only where it is not one of those.
    db = sql.Identifier(conn.info.dbname)
    conn.execute(sql.SQL("ALTER DATABASE {} SET pgqueue.notify_max_queue_usage = 'abc'").format(db))
    conn.execute(
        sql.SQL(
            "ALTER ROLE pgqueue_producer IN DATABASE {} SET pgqueue.notify_max_queue_usage = '5 %'"
        ).format(db)
    )
    conn.execute(
        sql.SQL(
            "ALTER ROLE pgqueue_worker IN DATABASE {} SET pgqueue.notify_max_queue_usage = '0.2'"
        ).format(db)
    )
    name = conn.info.dbname  # pgqueue_t_<hex>: quote_ident leaves it as it is
    expected = [
        (f"ALTER DATABASE {name}", "abc"),
        (f"ALTER ROLE pgqueue_producer IN DATABASE {name}", "5 %"),
    ]
    for session_value, also in ((None, []), ("0.2", []), ("1,5", [("this session", "1,5")])):
        with psycopg.connect(with_notify_limit(dsn, session_value), autocommit=True) as session:
            assert store.notify_limit_ignored(session) == also + expected, session_value
    conn.execute(sql.SQL("ALTER DATABASE {} RESET pgqueue.notify_max_queue_usage").format(db))
    conn.execute(sql.SQL("ALTER ROLE pgqueue_producer IN DATABASE {} RESET ALL").format(db))
    conn.execute(sql.SQL("ALTER ROLE pgqueue_worker IN DATABASE {} RESET ALL").format(db))
    assert store.notify_limit_ignored(conn) == []


def test_a_session_without_standard_conforming_strings_enqueues_and_wakes(conn, dsn):
    # PL/pgSQL reads a function's string literals under the session's setting: a
    # backslash in the limit's pattern made every enqueue fail there.
    legacy = make_conninfo(dsn, options="-c standard_conforming_strings=off")
    with listening(dsn) as listener:
        wake_by_insert(conn, legacy, "q-legacy")
        wake_by_retry(conn, legacy, "q-legacy-retry")
        assert notified_before_sentinel(conn, listener) == ["q-legacy", "q-legacy-retry"]


# --- plan guards --------------------------------------------------------------------------

SEED_SQL = [
    # 20,000 dead jobs across 3 queues (the stats read their queues and counts).
    """
    INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts, max_attempts,
                                   run_at, created_at, reason)
    SELECT 10000000 + i, 'q' || (i % 3), 't', '{}', 0, 3, 3, now(), now(), 'exhausted'
    FROM generate_series(1, 20000) AS i
    """,
    # 20,000 due queued jobs across 3 queues and 2 priorities.
    """
    INSERT INTO pgqueue.jobs (queue, task, priority, run_at)
    SELECT 'q' || (i % 3), 't', CASE WHEN i % 2 = 0 THEN 0 ELSE 10 END,
           now() - interval '1 hour' + i * interval '10 ms'
    FROM generate_series(1, 20000) AS i
    """,
    # 20,000 succeeded jobs, finished over the last ~2.3 days.
    """
    INSERT INTO pgqueue.jobs (queue, task, state, attempts, run_at, attempted_at, finished_at)
    SELECT 'q' || (i % 3), 't', 'succeeded', 1, now() - interval '3 days',
           now() - i * interval '10 s', now() - i * interval '10 s'
    FROM generate_series(1, 20000) AS i
    """,
    # 5,000 future jobs.
    """
    INSERT INTO pgqueue.jobs (queue, task, priority, run_at)
    SELECT 'q' || (i % 3), 't', CASE WHEN i % 2 = 0 THEN 0 ELSE 10 END,
           now() + i * interval '1 s'
    FROM generate_series(1, 5000) AS i
    """,
    # 100 running jobs, 20 of them with an expired lease.
    """
    INSERT INTO pgqueue.jobs (queue, task, state, attempts, lease_token, leased_by,
                              lease_expires_at, attempted_at)
    SELECT 'q' || (i % 3), 't', 'running', 1, gen_random_uuid(), 'w' || (i % 10),
           CASE WHEN i <= 20 THEN now() - interval '1 minute'
                ELSE now() + interval '1 minute' END,
           now() - interval '2 minutes'
    FROM generate_series(1, 100) AS i
    """,
    "ANALYZE pgqueue.jobs",
]


@contextlib.contextmanager
def scratch_database(server_dsn: str, template_db: str, statements: list[str]) -> Iterator[str]:
    """A migrated database of its own (from the template), set up by ``statements``,
    dropped at the end."""
    name = f"pgqueue_plan_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_db)
            )
        )
    try:
        dsn = make_conninfo(server_dsn, dbname=name)
        with psycopg.connect(dsn, autocommit=True) as c:
            for statement in statements:
                c.execute(statement)  # type: ignore[call-overload]
        yield dsn
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="module")
def seeded_dsn(server_dsn: str, template_db: str) -> Iterator[str]:
    """One migrated database for the module, seeded with a realistic mix, analysed."""
    with scratch_database(server_dsn, template_db, SEED_SQL) as dsn:
        yield dsn


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


def explain(dsn: str, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan nodes of a named query with its parameters bound by psycopg."""
    with psycopg.connect(dsn, autocommit=True) as c, c.cursor() as cur:
        cur.execute("EXPLAIN (FORMAT JSON) " + QUERIES[name], params)  # type: ignore[operator]
        row = cur.fetchone()
    assert row is not None
    return list(_plan_nodes(row[0][0]["Plan"]))


def analysed(
    conn: psycopg.Connection[Any], name: str, params: dict[str, Any], *, buffers: bool = False
) -> list[dict[str, Any]]:
    """The plan nodes of a named query as it ran (EXPLAIN ANALYZE, with BUFFERS if asked)."""
    options = "ANALYZE, BUFFERS, FORMAT JSON" if buffers else "ANALYZE, FORMAT JSON"
    with conn.cursor() as cur:
        cur.execute(f"EXPLAIN ({options}) " + QUERIES[name], params)  # type: ignore[arg-type]
        row = cur.fetchone()
    assert row is not None
    return list(_plan_nodes(row[0][0]["Plan"]))


def rows_read(nodes: list[dict[str, Any]]) -> int:
    """Rows the nodes read, kept or filtered out, over all their loops."""
    return sum(
        (n["Actual Rows"] + n.get("Rows Removed by Filter", 0)) * n["Actual Loops"] for n in nodes
    )


def assert_sequence_looked_up_once(nodes: list[dict[str, Any]]) -> None:
    """The plan (EXPLAIN VERBOSE) looks up the jobs id sequence only in an InitPlan."""
    in_output = [n for n in nodes if "pg_get_serial_sequence" in " ".join(n.get("Output", []))]
    assert in_output and all(n.get("Parent Relationship") == "InitPlan" for n in in_output)


def test_bulk_id_reservation_looks_up_the_sequence_once(dsn):
    # reserve_job_ids draws one id per job of a COPY; looking the sequence up (and casting
    # its name to regclass) for each id cost about 8 us per job. The lookup must be an
    # InitPlan, run once, and not part of the per-row expression.
    with psycopg.connect(dsn, autocommit=True) as c, c.cursor() as cur:
        cur.execute(
            "EXPLAIN (VERBOSE, FORMAT JSON) " + QUERIES["reserve_job_ids"],  # type: ignore[operator]
            {"n": 1000},
        )
        row = cur.fetchone()
    assert row is not None
    assert_sequence_looked_up_once(list(_plan_nodes(row[0][0]["Plan"])))


def test_enqueue_many_function_looks_up_the_sequence_once(dsn):
    # The same for the id reservation inside pgqueue.enqueue_many (migration 0008): its
    # nested statement's plan, as auto_explain reports it to the client.
    plans: list[dict[str, Any]] = []
    with psycopg.connect(dsn, autocommit=True) as c:
        c.add_notice_handler(
            lambda d: (
                plans.append(json.loads(d.message_primary.split("\n", 1)[1]))
                if (d.message_primary or "").startswith("duration:")
                else None
            )
        )
        c.execute("LOAD 'auto_explain'")
        for setting, value in [
            ("log_min_duration", "0"),
            ("log_nested_statements", "on"),
            ("log_verbose", "on"),
            ("log_format", "json"),
            ("log_level", "notice"),
        ]:
            c.execute(
                sql.SQL("SET {} = {}").format(
                    sql.Identifier("auto_explain", setting), sql.Literal(value)
                )
            )
        c.execute(
            "SELECT pgqueue.enqueue_many(ARRAY['t'], ARRAY['{}'::jsonb], ARRAY['default'],"
            " ARRAY[0], ARRAY[now()], ARRAY[20], ARRAY[NULL::text])"
        )
    (reservation,) = [p for p in plans if "generate_series" in p["Query Text"]]
    assert_sequence_looked_up_once(list(_plan_nodes(reservation["Plan"])))


def _running_ids_and_tokens(dsn: str, n: int) -> tuple[list[int], list[uuid.UUID]]:
    with psycopg.connect(dsn, autocommit=True) as c:
        rows = c.execute(
            "SELECT id, lease_token FROM pgqueue.jobs WHERE state = 'running' ORDER BY id LIMIT %s",
            (n,),
        ).fetchall()
    return [r[0] for r in rows], [r[1] for r in rows]


def _plan_params(dsn: str, name: str) -> dict[str, Any]:
    queues = ["q0", "q1", "q2"]
    if name in ("claim_jobs", "claim_jobs_many"):
        return {"queues": queues, "limit": 10, "worker_id": WORKER, "lease_seconds": LEASE}
    if name == "claim_rescued_job":
        return {"queues": queues, "worker_id": WORKER, "lease_seconds": LEASE}
    if name == "seconds_until_due":
        since = datetime.now(UTC) - timedelta(seconds=5)
        return {"queues": queues, "lookback_seconds": 0.05, "rescued_since": since}
    if name == "rescued_waiting":
        return {"queues": queues, "worker_id": WORKER, "stagger_seconds": LEASE}
    if name == "queue_stats":
        return {"with_finished": True}
    if name in ("extend_leases", "complete_jobs"):
        ids, tokens = _running_ids_and_tokens(dsn, 5)
        params: dict[str, Any] = {"ids": ids, "tokens": tokens}
        if name == "extend_leases":
            params["lease_seconds"] = LEASE
        else:
            params["durations"] = [0.01] * len(ids)
        return params
    if name == "release_orphans":
        _, tokens = _running_ids_and_tokens(dsn, 5)
        return {"worker_id": WORKER, "keep": tokens}
    if name == "recorded_outcomes":
        ids, _ = _running_ids_and_tokens(dsn, 5)
        now = datetime.now(UTC)
        return {"worker_id": WORKER, "ids": ids, "started_ats": [now] * len(ids)}
    if name == "requeue_expired":
        return {
            "batch_size": 1000, "backoff_base_seconds": 1.0, "backoff_max_seconds": 3600.0,
            "regained_at": datetime.now(UTC), "outage_seconds": 60.0,
        }  # fmt: skip
    if name in ("dead_letter_expired", "dead_letter_candidates"):
        return {
            "batch_size": 1000, "skip": [1, 2, 3], "regained_at": datetime.now(UTC),
            "outage_seconds": 60.0, "only": None,
        }  # fmt: skip
    if name in ("prune_finished", "prune_candidates"):
        return {"retention_seconds": 86400.0, "batch_size": 1000, "skip": [1, 2, 3]}
    if name == "prune_job":
        return {"id": 1, "retention_seconds": 86400.0}
    raise AssertionError(name)


def _seq_scans_on_jobs(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        n
        for n in nodes
        if n["Node Type"] == "Seq Scan"
        # The dead-letter table too: the metrics' queue_stats read it on every scrape.
        and n.get("Relation Name") in ("jobs", "dead_jobs")
        and n.get("Schema", "pgqueue") == "pgqueue"
    ]


@pytest.mark.parametrize(
    "name",
    [
        "claim_jobs",
        "claim_jobs_many",
        "claim_rescued_job",
        "rescued_waiting",
        "seconds_until_due",
        "extend_leases",
        "complete_jobs",
        "recorded_outcomes",
        "release_orphans",
        "requeue_expired",
        "prune_finished",
        "prune_candidates",
        "prune_job",
        "dead_letter_candidates",
        "queue_stats",
    ],
)
def test_hot_query_plan_never_seq_scans_the_jobs_table(seeded_dsn, name):
    nodes = explain(seeded_dsn, name, _plan_params(seeded_dsn, name))

    assert _seq_scans_on_jobs(nodes) == [], nodes


@pytest.mark.parametrize("name", ["claim_jobs", "claim_jobs_many", "seconds_until_due"])
def test_claim_side_query_plan_uses_the_claim_index(seeded_dsn, name):
    nodes = explain(seeded_dsn, name, _plan_params(seeded_dsn, name))

    assert "jobs_claim_idx" in {n.get("Index Name") for n in nodes}, nodes


# The lease-fenced writers as the worker runs them: prepared (psycopg prepares a statement
# after 5 executions) and then planned generically, with statistics taken while no job was
# running (autovacuum may be off or behind; the queue goes from idle to busy in seconds).
# Such a plan once joined the whole running set against every id of the batch (a nested
# loop over jobs_running_idx: quadratic, 8 ms for a batch of 100 among 200 running). The
# statements now fence on the lease token alone (a token is only ever set on a running
# row, by CHECK constraint), which leaves the planner only the primary key.
LEASE_FENCED = {
    "extend_leases": {"lease_seconds": LEASE},
    "complete_jobs": {"durations": "float8"},
    "retry_jobs": {"delays": "float8", "errors": "jsonb", "durations": "float8"},
    "snooze_jobs": {"delays": "float8", "durations": "float8"},
    "release_jobs": {"durations": "float8"},
    "dead_letter_jobs": {"errors": "jsonb", "reasons": "text", "durations": "float8"},
}


@pytest.fixture(scope="module")
def busy_after_idle_dsn(server_dsn: str, template_db: str) -> Iterator[str]:
    """20,000 queued jobs analysed, then 300 of them running (statistics not refreshed)."""
    statements = [
        "INSERT INTO pgqueue.jobs (task) SELECT 't' FROM generate_series(1, 20000)",
        "ANALYZE pgqueue.jobs",
        "UPDATE pgqueue.jobs SET state = 'running', attempts = 1,"
        " lease_token = gen_random_uuid(), leased_by = 'w', attempted_at = now(),"
        " lease_expires_at = now() + interval '1 minute' WHERE id <= 300",
    ]
    with scratch_database(server_dsn, template_db, statements) as dsn:
        yield dsn


def _generic_plan(
    dsn: str, name: str, params: dict[str, Any], settings: Sequence[LiteralString] = ()
) -> list[dict[str, Any]]:
    """The generic plan of a named query, prepared server-side (after ``settings``); its
    parameters are numbered in order of appearance (every one of them carries a cast in
    the query)."""
    order: list[str] = []

    def number(match: Any) -> str:
        if match.group(1) not in order:
            order.append(match.group(1))
        return f"${order.index(match.group(1)) + 1}"

    text = re.sub(r"%\((\w+)\)s", number, QUERIES[name])
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SET plan_cache_mode = force_generic_plan")
        for setting in settings:
            c.execute(setting)
        c.execute("PREPARE fenced AS " + text)  # type: ignore[operator]
        cur = psycopg.ClientCursor(c)
        placeholders = ", ".join(["%s"] * len(order))
        cur.execute(
            "EXPLAIN (FORMAT JSON) EXECUTE fenced(" + placeholders + ")",  # type: ignore[arg-type]
            [params[key] for key in order],
        )
        row = cur.fetchone()
    assert row is not None
    return list(_plan_nodes(row[0][0]["Plan"]))


def _lease_fenced_params(dsn: str, name: str, n: int) -> dict[str, Any]:
    """A lease-fenced writer's parameters, for ``n`` of the running jobs in ``dsn``."""
    ids, tokens = _running_ids_and_tokens(dsn, n)
    params: dict[str, Any] = {"ids": ids, "tokens": tokens}
    for key, kind in LEASE_FENCED[name].items():
        if kind == "float8":
            params[key] = [0.01] * len(ids)
        elif kind == "jsonb":
            params[key] = [Jsonb({"error": "x"})] * len(ids)
        elif kind == "text":
            params[key] = ["exhausted"] * len(ids)
        else:
            params[key] = kind
    return params


# 100,000 dead jobs and 2,000 exhausted rescued jobs whose lease expired, analysed.
DEAD_HEAVY_SQL = [
    """
    INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts, max_attempts,
                                   run_at, created_at, reason)
    SELECT i, 'q', 't', '{}', 0, 3, 3, now(), now(), 'exhausted'
    FROM generate_series(1, 100000) AS i
    """,
    "SELECT setval(pg_get_serial_sequence('pgqueue.jobs', 'id'), 200000)",
    """
    INSERT INTO pgqueue.jobs (task, state, attempts, max_attempts, rescued, lease_token,
                              leased_by, lease_expires_at, attempted_at)
    SELECT 't', 'running', 3, 3, true, gen_random_uuid(), 'w', now() - interval '1 minute',
           now() - interval '2 minutes'
    FROM generate_series(1, 2000)
    """,
    "ANALYZE pgqueue.jobs",
    "ANALYZE pgqueue.dead_jobs",
]


@pytest.mark.parametrize("name", ["dead_letter_expired", "dead_letter_jobs"])
def test_dead_letter_moves_probe_the_dead_letter_table_by_key(server_dsn, template_db, name):
    # Each move asks whether the dead-letter table holds the job's id (migration 0023). A
    # review found the reaper's probe planned as a hashed subplan over the whole table
    # (a sequential scan of 100,000 dead jobs on every batch; the reaper without prepared
    # statements allows sequential scans).
    with scratch_database(server_dsn, template_db, DEAD_HEAVY_SQL) as dsn:
        if name == "dead_letter_jobs":
            params = _lease_fenced_params(dsn, name, 1000)
        else:
            params = {
                "batch_size": 1000, "skip": [], "regained_at": None, "outage_seconds": 0.0,
                "only": None,
            }  # fmt: skip
        nodes = explain(dsn, name, params)

    scans = [n for n in nodes if n.get("Relation Name") == "dead_jobs" and "Scan" in n["Node Type"]]
    assert scans and all(n["Node Type"].startswith("Index") for n in scans), scans


@pytest.mark.parametrize("name", sorted(LEASE_FENCED))
def test_lease_fenced_writers_find_rows_by_primary_key_in_their_generic_plan(
    busy_after_idle_dsn, name
):
    params = _lease_fenced_params(busy_after_idle_dsn, name, 100)

    nodes = _generic_plan(busy_after_idle_dsn, name, params)

    scans = [n for n in nodes if n.get("Relation Name") == "jobs" and "Scan" in n["Node Type"]]
    assert scans, nodes
    assert {n.get("Index Name") for n in scans} == {"jobs_pkey"}, scans


@pytest.fixture(scope="module")
def queued_after_idle_dsn(server_dsn: str, template_db: str) -> Iterator[str]:
    """Statistics taken while nothing was queued, then a burst of 20,000 queued jobs."""
    statements = [
        "INSERT INTO pgqueue.jobs (task, state, finished_at)"
        " SELECT 't', 'succeeded', now() FROM generate_series(1, 2000)",
        "ANALYZE pgqueue.jobs",
        "INSERT INTO pgqueue.jobs (task, queue)"
        " SELECT 't', 'q' || (g % 3) FROM generate_series(1, 20000) AS g",
    ]
    with scratch_database(server_dsn, template_db, statements) as dsn:
        yield dsn


# The claims as the worker runs them (prepared, generic plans: see
# configure_worker_connection) after statistics said the queue was empty: the rows they
# update must be found by primary key. With a state check in the UPDATE's own WHERE, this
# plan scanned every queued job for each picked id.
@pytest.mark.parametrize(
    ("name", "claim_index"),
    [
        ("claim_jobs", "jobs_claim_idx"),
        ("claim_jobs_many", "jobs_claim_idx"),
        ("claim_rescued_job", "jobs_rescued_idx"),
    ],
)
def test_claims_update_picked_rows_by_primary_key_in_their_generic_plan(
    queued_after_idle_dsn, name, claim_index
):
    params: dict[str, Any] = {"queues": ["q0", "q1", "q2"], "worker_id": WORKER}
    params["lease_seconds"] = LEASE
    if name != "claim_rescued_job":
        params["limit"] = 100

    nodes = _generic_plan(queued_after_idle_dsn, name, params)

    scans = [n for n in nodes if n.get("Relation Name") == "jobs" and "Scan" in n["Node Type"]]
    kinds = {(n["Node Type"], n.get("Index Name")) for n in scans}
    assert ("Index Scan", "jobs_pkey") in kinds, scans
    assert kinds <= {("Index Scan", "jobs_pkey"), ("Index Scan", claim_index)}, scans


@pytest.mark.parametrize(
    "name",
    ["claim_jobs", "claim_jobs_many", "claim_rescued_job", "rescued_waiting",
     "seconds_until_due", "extend_leases", "complete_jobs", "recorded_outcomes",
     "release_orphans"],
)  # fmt: skip
def test_worker_statement_generic_plan_never_seq_scans_the_jobs_table(queued_after_idle_dsn, name):
    nodes = _generic_plan(queued_after_idle_dsn, name, _plan_params(queued_after_idle_dsn, name))

    assert _seq_scans_on_jobs(nodes) == [], nodes


# A new deployment: the jobs table was never analysed and holds a few pages when a worker
# (or a reaper) prepares its statements, and their plans are kept while the table grows.
# Left to the planner, the cheapest way to read a few pages is to read them all: the
# heartbeat and every outcome write became a sequential scan of the whole jobs table, kept
# until an ANALYZE (never, with autovacuum off; under a sustained 2,000 jobs/s in `make
# bench`, completions took 12 ms each and job latency doubled). Their connections price
# sequential scans out (store.NO_SEQ_SCANS).
NEW_TABLE_SQL = [
    "ALTER TABLE pgqueue.jobs SET (autovacuum_enabled = off)",
    "INSERT INTO pgqueue.jobs (task, queue)"
    " SELECT 't', 'q' || (g % 3) FROM generate_series(1, 60) AS g",
    "UPDATE pgqueue.jobs SET state = 'running', attempts = 1, lease_token = gen_random_uuid(),"
    " leased_by = 'w', attempted_at = now(), lease_expires_at = now() + interval '1 minute'"
    " WHERE id <= 10",
    "UPDATE pgqueue.jobs SET state = 'succeeded', attempts = 1,"
    " finished_at = now() - interval '2 days' WHERE id > 50",
]


@pytest.fixture(scope="module")
def new_table_dsn(server_dsn: str, template_db: str) -> Iterator[str]:
    """A jobs table of 60 rows (10 running, 10 finished), never analysed."""
    with scratch_database(server_dsn, template_db, NEW_TABLE_SQL) as dsn:
        yield dsn


def _new_table_params(dsn: str, name: str) -> dict[str, Any]:
    if name in LEASE_FENCED:
        return _lease_fenced_params(dsn, name, 5)
    return _plan_params(dsn, name)


LONG_LIVED_PLANS = sorted(
    {"claim_jobs", "claim_jobs_many", "claim_rescued_job", "rescued_waiting",
     "seconds_until_due", "recorded_outcomes", "release_orphans", "requeue_expired",
     "dead_letter_expired", "dead_letter_candidates", "prune_finished", "prune_candidates",
     "prune_job"}
    | set(LEASE_FENCED)
)  # fmt: skip


@pytest.mark.parametrize("name", LONG_LIVED_PLANS)
def test_statement_planned_on_a_new_table_never_seq_scans_it_later(new_table_dsn, name):
    params = _new_table_params(new_table_dsn, name)

    nodes = _generic_plan(new_table_dsn, name, params, [store.NO_SEQ_SCANS])

    assert _seq_scans_on_jobs(nodes) == [], nodes
    if name in LEASE_FENCED:
        scans = [n for n in nodes if n.get("Relation Name") == "jobs" and "Scan" in n["Node Type"]]
        assert {n.get("Index Name") for n in scans} == {"jobs_pkey"}, scans


@pytest.mark.parametrize("name", LONG_LIVED_PLANS)
def test_statement_planned_with_seq_scans_priced_out_makes_none_anywhere(new_table_dsn, name):
    # A sequential scan of any table, the small ones too, costs such a plan over
    # jit_above_cost (rescued_waiting's read of pgqueue.workers did: 0.5 s of JIT for a
    # 0.3 ms query, on every check). store.NO_JIT turns JIT off; this keeps the plans
    # honest without it.
    params = _new_table_params(new_table_dsn, name)

    nodes = _generic_plan(new_table_dsn, name, params, [store.NO_SEQ_SCANS])

    assert [n for n in nodes if n["Node Type"] == "Seq Scan"] == [], nodes
    assert nodes[0]["Total Cost"] < 100_000  # jit_above_cost's default


@pytest.mark.parametrize("name", ["extend_leases", "complete_jobs", "prune_finished"])
def test_a_new_table_does_trap_the_planner_into_seq_scans(new_table_dsn, name):
    # What the test above guards against, shown on its own database: without
    # store.NO_SEQ_SCANS these generic plans read the whole table (Postgres 15's planner).
    params = _new_table_params(new_table_dsn, name)

    nodes = _generic_plan(new_table_dsn, name, params)

    assert _seq_scans_on_jobs(nodes) != [], nodes


@pytest.mark.parametrize(
    "assignment",
    [
        "state = 'queued', lease_expires_at = NULL",  # the token left behind
        "state = 'queued', lease_token = NULL",  # the expiry left behind
        "lease_token = NULL",  # running without a token
    ],
)
def test_lease_columns_are_set_exactly_while_running(conn, assignment):
    # Fencing on (id, lease_token) alone relies on this (migration 0007).
    job_id = make_job(conn, state="running", lease_token=uuid.uuid4())

    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "UPDATE pgqueue.jobs SET " + assignment + " WHERE id = %s",  # type: ignore[operator]
            (job_id,),
        )


@pytest.mark.parametrize("name", ["claim_jobs", "claim_jobs_many", "claim_rescued_job"])
def test_claim_returns_the_job_fields_in_order(conn, name):
    # store builds Job(*row) from a claim's row: the columns must be Job's fields, in order.
    make_job(conn, queue="q0", rescued=name == "claim_rescued_job")
    params = {"queues": ["q0"], "worker_id": WORKER, "lease_seconds": LEASE, "limit": 5}
    with conn.cursor() as cur:
        cur.execute(QUERIES[name], params)  # type: ignore[arg-type]
        assert cur.fetchall()
        columns = [d.name for d in cur.description]

    renamed = {"attempts": "attempt"}
    assert [renamed.get(c, c) for c in columns] == [
        f.name for f in dataclasses.fields(Job) if f.name != "cancel"
    ]


# --- cancellation -------------------------------------------------------------------------


def test_dead_letter_of_a_cancel_requested_job_cancels_it_instead(conn, dsn):
    token = uuid.uuid4()
    job_id = make_job(
        conn, state="running", lease_token=token, attempts=3, max_attempts=3,
        cancel_requested_at=db_clock(conn),
    )  # fmt: skip
    other_token = uuid.uuid4()
    other = make_job(conn, state="running", lease_token=other_token, attempts=3, max_attempts=3)

    async def go() -> dict[int, str]:
        aconn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        async with aconn:
            return await store.dead_letter_jobs(
                aconn,
                ids=[job_id, other],
                tokens=[token, other_token],
                errors=[ERROR_2, ERROR_2],
                reasons=["exhausted", "exhausted"],
                durations=[0.1, 0.1],
            )

    assert asyncio.run(go()) == {job_id: "cancelled", other: "dead"}
    row = job_row(conn, job_id)
    assert row is not None and row["state"] == "cancelled" and row["lease_token"] is None
    assert [h["outcome"] for h in row["history"]] == ["failed"]
    assert dead_row(conn, job_id) is None
    assert dead_row(conn, other) is not None


def test_a_job_at_the_top_attempts_count_does_not_stop_its_queues_claims(conn, dsn):
    # attempts + 1 overflowed: one plain-SQL row with attempts = 2147483647 failed every
    # claim of its queue ("integer out of range"), its healthy neighbours never ran.
    top = make_job(conn, attempts=2147483647, max_attempts=2147483647)
    fine = [make_job(conn) for _ in range(3)]
    claimed = {j.id: j.attempt for j in claim(dsn, ["default"], 10)}
    assert claimed == {top: 2147483647, **dict.fromkeys(fine, 1)}
    rescued = make_job(conn, attempts=2147483647, rescued=True)
    job = run_async(
        dsn, store.claim_rescued_job, queues=["default"], worker_id=WORKER, lease_seconds=LEASE
    )
    assert (job.id, job.attempt) == (rescued, 2147483647)


@pytest.mark.parametrize("outcome", ["retry", "snooze"])
def test_a_cancel_requested_job_that_fails_or_snoozes_keeps_its_run_at(conn, dsn, outcome):
    # Cancelled, it never runs again: a backoff or snooze delay in its run_at put it
    # after its finished_at (the reaper's cancel keeps run_at as it was).
    token = uuid.uuid4()
    job_id = make_job(
        conn, state="running", lease_token=token, attempts=1, max_attempts=5,
        cancel_requested_at=db_clock(conn),
    )  # fmt: skip
    before = job_row(conn, job_id)["run_at"]  # type: ignore[index]

    async def go() -> dict[int, str]:
        aconn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        async with aconn:
            if outcome == "retry":
                return await store.retry_jobs(
                    aconn, ids=[job_id], tokens=[token], delays=[600.0], errors=[ERROR_2],
                    durations=[0.1],
                )  # fmt: skip
            return await store.snooze_jobs(
                aconn, ids=[job_id], tokens=[token], delays=[600.0], durations=[0.1]
            )

    assert asyncio.run(go()) == {job_id: "cancelled"}
    row = job_row(conn, job_id)
    assert row is not None and row["state"] == "cancelled"
    assert row["run_at"] == before and row["run_at"] <= row["finished_at"]


def test_reaper_cancels_an_exhausted_expired_job_whose_cancel_was_requested(conn, dsn):
    from pgqueue import Reaper, ReaperConfig

    past = db_clock(conn) - timedelta(seconds=5)
    job_id = make_job(
        conn, state="running", lease_expires_at=past, attempts=2, max_attempts=2,
        cancel_requested_at=past,
    )  # fmt: skip
    result = Reaper(ReaperConfig(dsn=dsn)).run_once()
    assert (result.requeued, result.dead, result.cancelled) == ([], [], [job_id])
    row = job_row(conn, job_id)
    assert row is not None and row["state"] == "cancelled"
    assert dead_row(conn, job_id) is None


@pytest.mark.parametrize("column", ["run_at", "created_at"])
@pytest.mark.parametrize(
    "value",
    [
        "infinity", "-infinity", "10000-01-01", "0001-01-01 BC",
        # Just outside the range (0001-01-02 to 9999-12-30 UTC), which leaves a day for
        # any session time zone (a mutation audit found neither edge tested).
        "0001-01-01 12:00:00+00", "9999-12-30 00:00:01+00",
    ],
)  # fmt: skip
def test_a_plain_insert_of_a_time_no_worker_can_read_is_refused(conn, column, value):
    # Migrations 0010 (run_at) and 0015 (created_at): Python's datetimes cannot hold
    # these; a claim that picked such a job failed to decode its whole batch.
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            sql.SQL("INSERT INTO pgqueue.jobs (task, {}) VALUES ('t', %s::timestamptz)").format(
                sql.Identifier(column)
            ),
            (value,),
        )


@pytest.mark.parametrize(
    ("op", "ends"),
    [
        ("complete_jobs", "succeeded"),  # a finishing attempt still succeeds
        ("retry_jobs", "cancelled"),
        ("snooze_jobs", "cancelled"),
        ("release_jobs", "cancelled"),
        ("dead_letter_jobs", "cancelled"),
    ],
)
def test_an_outcome_racing_an_operators_cancel_is_still_written(conn, dsn, op, ends):
    # `pgqueue cancel` commits while the outcome's statement waits for the row. The dead
    # letter used to take it in neither of its branches (the UPDATE's snapshot saw no
    # cancel, the DELETE's recheck saw one): the job waited for its lease to expire.
    token = uuid.uuid4()
    job_id = make_job(conn, state="running", lease_token=token, attempts=3, max_attempts=3)
    with psycopg.connect(dsn) as operator:
        cancel = operator.execute(QUERIES["cancel_job"], {"id": job_id}).fetchall()
        assert [tuple(r) for r in cancel] == [(job_id, "running")]
        written: list[set[int]] = []
        writer = threading.Thread(target=lambda: written.append(fenced(dsn, op, [job_id], [token])))
        writer.start()
        try:
            wait_until(
                lambda: (
                    scalar(
                        conn,
                        "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid)"
                        " WHERE NOT granted AND datname = current_database() AND pid <> %s",
                        (operator.info.backend_pid,),
                    )
                    > 0
                )
            )
        finally:
            operator.commit()
            writer.join(30)
    assert written == [{job_id}]
    row = job_row(conn, job_id)
    assert row is not None
    assert (row["state"], row["lease_token"]) == (ends, None)


def test_claim_and_requeue_take_a_job_whose_row_a_foreign_key_holds(conn, dsn):
    # A row being inserted elsewhere that references a job holds a KEY SHARE lock on it
    # until it commits. The claim and the reaper's requeue lock FOR NO KEY UPDATE (what
    # their UPDATE takes anyway), which that lock does not block: with FOR UPDATE they
    # skipped the job for as long as the referencing transaction stayed open.
    queued = make_job(conn, queue="fk")
    expired = make_job(
        conn, state="running", lease_token=uuid.uuid4(), attempts=1,
        lease_expires_at=db_clock(conn) - timedelta(seconds=10),
    )  # fmt: skip
    conn.execute("CREATE TABLE public.job_links (job_id bigint REFERENCES pgqueue.jobs (id))")
    holder = psycopg.connect(dsn)
    try:
        holder.execute("INSERT INTO public.job_links VALUES (%s), (%s)", (queued, expired))
        assert [j.id for j in claim(dsn, ["fk"], 10)] == [queued]
        requeued = conn.execute(
            QUERIES["requeue_expired"],
            {
                "batch_size": 10,
                "backoff_base_seconds": 1.0,
                "backoff_max_seconds": 10.0,
                "regained_at": None,
                "outage_seconds": 0.0,
            },
        ).fetchall()
        assert [r[0] for r in requeued] == [expired]
    finally:
        holder.rollback()
        holder.close()
        conn.execute("DROP TABLE public.job_links")


def test_a_rescued_job_in_a_paused_queue_waits_for_its_resume(conn, dsn):
    # Found by a mutation audit: the rescued claim could ignore pauses and no test saw it.
    job_id = make_job(conn, queue="q", rescued=True)
    store.pause_queue(conn, name="q")
    args = {"queues": ["q"], "worker_id": WORKER, "lease_seconds": LEASE}
    assert run_async(dsn, store.claim_rescued_job, **args) is None
    store.resume_queue(conn, name="q")
    job = run_async(dsn, store.claim_rescued_job, **args)
    assert job is not None and job.id == job_id


def test_the_sql_backoff_doubles_per_attempt_within_its_jitter_and_stops_at_its_cap(conn):
    # Found by a mutation audit: a linear or uncapped backoff_delay passed every test.
    rows = conn.execute(
        "SELECT n, extract(epoch FROM pgqueue.backoff_delay(n, 1, 3600))"
        " FROM generate_series(1, 14) AS n, generate_series(1, 20)"
    ).fetchall()
    for attempt, seconds in rows:
        raw = min(3600.0, 2.0 ** (attempt - 1))
        assert 0.75 * raw - 1e-6 <= float(seconds) <= 1.25 * raw + 1e-6, (attempt, seconds)


def test_every_statement_pgqueue_sends_is_ascii():
    # Comments travel with the statements: one non-ASCII character in a comment made
    # every reaper pass fail on a session whose client encoding is LATIN1 (before
    # pgqueue pinned UTF-8). Kept ASCII, they encode in any client encoding.
    from tests.conftest import ROOT

    files = [*(ROOT / "pgqueue" / "sql").glob("*.sql"), *(ROOT / "migrations").glob("*.sql")]
    assert len(files) > 10
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            assert line.isascii(), f"{path.name}:{number}: {line}"
    assert all(query.isascii() for query in QUERIES.values())


# seconds_until_due runs after every short claim of an idle worker. Its rescued part (a
# rescued job that fell due since the worker's last check) must stay a descent of the
# small jobs_rescued_idx: folded into the per-priority scan, it widened that scan's range
# to the check's lookback (up to the poll interval), over due jobs it then skipped one by
# one, and let the planner OR the two indexes into a bitmap and sort every future job.
SECONDS_UNTIL_DUE_SCANS = {
    (kind, index)
    for kind in ("Index Scan", "Index Only Scan")
    for index in ("jobs_claim_idx", "jobs_rescued_idx")
}


@pytest.mark.parametrize(
    ("fixture", "generic"),
    [("seeded_dsn", False), ("seeded_dsn", True), ("queued_after_idle_dsn", True),
     ("new_table_dsn", True)],
)  # fmt: skip
def test_seconds_until_due_descends_the_claim_and_rescued_indexes_only(request, fixture, generic):
    dsn = request.getfixturevalue(fixture)
    params = _plan_params(dsn, "seconds_until_due")
    settings = [store.NO_SEQ_SCANS] if fixture == "new_table_dsn" else []
    nodes = (
        _generic_plan(dsn, "seconds_until_due", params, settings)
        if generic
        else explain(dsn, "seconds_until_due", params)
    )

    scans = [n for n in nodes if n.get("Relation Name") == "jobs"]
    assert {(n["Node Type"], n.get("Index Name")) for n in scans} <= SECONDS_UNTIL_DUE_SCANS, scans
    assert "jobs_rescued_idx" in {n.get("Index Name") for n in scans}, scans
    assert not [n for n in nodes if n["Node Type"] in ("Sort", "BitmapOr")], nodes


def test_seconds_until_due_reads_a_handful_of_rows_whatever_waits(conn, dsn):
    # It runs after every short claim of an idle worker. Due jobs its claim has not taken
    # yet, older than the claim's lookback (a bulk enqueue whose transaction took longer
    # than that carries its start, just committed), must not be read one by one; nor may
    # every future job be read to find the earliest (a bitmap of two indexes, then a sort:
    # the plan an OR of rescued and not rescued conditions in one scan got).
    conn.execute(
        "INSERT INTO pgqueue.jobs (task, queue, run_at)"
        " SELECT 't', 'a', now() - interval '2 seconds' FROM generate_series(1, 5000)"
    )
    conn.execute(
        "INSERT INTO pgqueue.jobs (task, queue, run_at)"
        " SELECT 't', 'a', now() + g * interval '1 second' FROM generate_series(1, 5000) AS g"
    )
    conn.execute("ANALYZE pgqueue.jobs")
    since = db_clock(conn) - timedelta(seconds=30)
    params = {"queues": ["a"], "lookback_seconds": 0.1, "rescued_since": since}
    nodes = analysed(conn, "seconds_until_due", params)

    on_jobs = [n for n in nodes if n.get("Relation Name") == "jobs"]
    read = rows_read(on_jobs)
    assert on_jobs and read < 50, [
        (n["Node Type"], n.get("Index Name"), n["Actual Rows"]) for n in on_jobs
    ]


@pytest.mark.parametrize("with_finished", [False, True])
def test_the_queue_stats_read_the_jobs_finished_in_the_last_minute_once(conn, with_finished):
    # The metrics' refresh counted the jobs finished in the last minute of each queue,
    # reading every one of them once per queue, for a column no gauge exports: at 10,000
    # jobs/s over 40 queues it took past its 5 s limit and the gauges went missing.
    # `pgqueue stats` (with_finished) still counts them, now in the same single read
    # (it read them once more per queue: 5.9-10 s under load with 20 queues, a review).
    conn.execute(
        "INSERT INTO pgqueue.jobs (task, queue, state, attempts, finished_at)"
        " SELECT 't', 'q' || (g % 4), 'succeeded', 1, now() FROM generate_series(1, 5000) AS g"
    )
    conn.execute(
        "INSERT INTO pgqueue.jobs (task, queue) SELECT 't', 'q1' FROM generate_series(1, 3)"
    )
    conn.execute("ANALYZE pgqueue.jobs")
    nodes = analysed(conn, "queue_stats", {"with_finished": with_finished})
    read = rows_read([n for n in nodes if n.get("Relation Name") == "jobs"])
    # Listing the queues and counting them reads the finished jobs once.
    assert read < 5_100, read
    rows = {r["queue"]: r for r in store.queue_stats(conn, with_finished=with_finished)}
    assert set(rows) == {"q0", "q1", "q2", "q3"}
    assert rows["q1"]["ready"] == 3
    assert rows["q1"]["finished_last_minute"] == (1250 if with_finished else None)


def test_the_gauges_read_each_queued_and_running_job_once(conn):
    # The metrics' refresh counted a queue's ready and its scheduled jobs in two reads of
    # its part of the claim index (run_at follows priority there, so neither count
    # bounds its range), and its running jobs by reading every running job's row once
    # per queue (a review: 172,000 buffers of a 1.2 s count over 10 queues).
    conn.execute(
        "INSERT INTO pgqueue.jobs (task, queue, run_at)"
        " SELECT 't', 'q' || (g % 4), now() + CASE WHEN g % 8 = 0 THEN interval '1 hour'"
        " ELSE interval '0' END FROM generate_series(1, 40000) AS g"
    )
    conn.execute(
        "INSERT INTO pgqueue.jobs (task, queue, state, attempts, lease_token, leased_by,"
        " lease_expires_at, attempted_at)"
        " SELECT 't', 'q' || (g % 4), 'running', 1, gen_random_uuid(), 'w', now() + interval"
        " '1 minute', now() FROM generate_series(1, 400) AS g"
    )
    conn.execute("VACUUM ANALYZE pgqueue.jobs")
    nodes = analysed(conn, "queue_stats", {"with_finished": False}, buffers=True)
    # Running jobs: each row once (the rows the plan read from the table, beside the
    # index-only reads of the claim index).
    on_jobs = [n for n in nodes if n.get("Relation Name") == "jobs"]
    from_heap = rows_read([n for n in on_jobs if n.get("Index Name") != "jobs_claim_idx"])
    assert from_heap <= 400, from_heap
    # Queued jobs: the claim index's pages once, and a few descents to list the queues
    # and their priorities (reading it twice came to about twice its size).
    claim_pages = scalar(conn, "SELECT pg_relation_size('pgqueue.jobs_claim_idx') / 8192")
    claim_read = sum(
        n["Shared Hit Blocks"] + n["Shared Read Blocks"]
        for n in nodes
        if n.get("Index Name") == "jobs_claim_idx"
    )
    assert claim_read < 1.4 * claim_pages, (claim_read, claim_pages)
    rows = {r["queue"]: r for r in store.queue_stats(conn, with_finished=False)}
    assert {q: (r["ready"], r["scheduled"], r["running"]) for q, r in rows.items()} == {
        "q0": (5000, 5000, 100),
        "q1": (10000, 0, 100),
        "q2": (10000, 0, 100),
        "q3": (10000, 0, 100),
    }


# A busy queue between two autoanalyzes (on a big table one comes every tens of thousands
# of changed rows): its statistics were taken while the running jobs' leases were what
# they were then, and the heartbeats have moved every one of them past now() since.
STALE_LEASES_SQL = [
    "INSERT INTO pgqueue.jobs (task, queue) SELECT 't', 'q' || (i % 10)"
    " FROM generate_series(1, 100000) AS i",
    """
    INSERT INTO pgqueue.jobs (task, state, attempts, max_attempts, rescued, lease_token,
                              leased_by, lease_expires_at, attempted_at)
    SELECT 't', 'running', 1 + (i % 2), 2, i % 2 = 1, gen_random_uuid(), 'w' || (i % 20),
           now() - interval '1 minute', now() - interval '2 minutes'
    FROM generate_series(1, 2000) AS i
    """,
    "ANALYZE pgqueue.jobs",
    "UPDATE pgqueue.jobs SET lease_expires_at = now() + interval '1 hour' WHERE state = 'running'",
]


@pytest.mark.parametrize(
    "name", ["requeue_expired", "dead_letter_expired", "dead_letter_candidates"]
)
def test_the_reapers_generic_plans_read_the_running_jobs_not_the_whole_table(
    server_dsn, template_db, name
):
    # The reaper prepares its statements (from their sixth run, planned generically) on a
    # connection without sequential scans. With statistics in which every lease has
    # expired, the generic plan of requeue_expired walked the primary key in id order
    # for its ORDER BY id, filtering every row of the table on every pass (found by a
    # review: 2,000,000 rows removed, about 1 s, each pass until the next ANALYZE).
    # dead_letter_expired had the same shape, but its plan read the running jobs even
    # then (it estimates far fewer rows): its case guards the shape from here on.
    params: dict[str, Any] = {
        "batch_size": 1000, "regained_at": datetime.now(UTC), "outage_seconds": 60.0,
    }  # fmt: skip
    if name == "requeue_expired":
        params |= {"backoff_base_seconds": 1.0, "backoff_max_seconds": 3600.0}
    else:
        params |= {"skip": [1, 2, 3], "only": None}
    with scratch_database(server_dsn, template_db, STALE_LEASES_SQL) as dsn:
        nodes = _generic_plan(dsn, name, params, [store.NO_SEQ_SCANS, store.NO_JIT])
    # Whole-table reads: an index walked with no condition (but the running jobs'
    # partial one), or a sequential scan.
    whole = [
        n for n in nodes
        if (n.get("Index Name", "jobs_running_idx") != "jobs_running_idx"
            and "Index Cond" not in n)
        or (n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "jobs")
    ]  # fmt: skip
    assert whole == [], whole
    assert "jobs_running_idx" in {n.get("Index Name") for n in nodes}, nodes


# Running jobs older than a backlog of queued ones (the claim takes the oldest first).
RUNNING_UNDER_BACKLOG_SQL = [
    """
    INSERT INTO pgqueue.jobs (task, queue, state, attempts, lease_token, leased_by,
                              lease_expires_at, attempted_at)
    SELECT 't', 'q' || (i % 2), 'running', 1, gen_random_uuid(), 'w', now() + interval '1 minute',
           now() FROM generate_series(1, 5000) AS i
    """,
    "INSERT INTO pgqueue.jobs (task, queue) SELECT 't', 'q0' FROM generate_series(1, 100000)",
    "ANALYZE pgqueue.jobs",
]


@pytest.mark.parametrize("queue", [None, "q1"])
def test_listing_running_jobs_reads_the_running_ones_not_the_backlog(
    server_dsn, template_db, queue
):
    # `pgqueue jobs list --state running` walked the primary key from the newest job down
    # past the whole backlog (a review: 2,000,000 rows filtered, 0.56 s).
    with (
        scratch_database(server_dsn, template_db, RUNNING_UNDER_BACKLOG_SQL) as dsn,
        psycopg.connect(dsn, autocommit=True) as c,
    ):
        nodes = analysed(
            c, "list_running_jobs", {"queue": queue, "task": None, "limit": 50, "before": None}
        )
        with c.transaction():
            listed = store.list_jobs(c, state="running", queue=queue, task=None, limit=50)
            # What that read, as this transaction's statistics count it.
            pkey_read = c.execute(
                "SELECT pg_stat_get_xact_tuples_returned('pgqueue.jobs_pkey'::regclass)"
            ).fetchone()
        newest = c.execute(
            "SELECT id FROM pgqueue.jobs WHERE state = 'running'"
            " AND (%(q)s::text IS NULL OR queue = %(q)s) ORDER BY id DESC LIMIT 50",
            {"q": queue},
        ).fetchall()
    read = rows_read([n for n in nodes if n.get("Relation Name") == "jobs"])
    assert read <= 5000, read
    assert pkey_read == (0,), pkey_read
    assert [r["id"] for r in listed] == [r[0] for r in newest]
    assert {r["state"] for r in listed} == {"running"} and all(r["leased_by"] for r in listed)
