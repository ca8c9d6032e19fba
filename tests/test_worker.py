"""The worker in-process against a real database: execution, retries, dead-letter,
snooze, timeouts, wake-ups, leases and fencing, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any, ClassVar, Literal

import psycopg
import pytest
import structlog
from psycopg import sql

from pgqueue import (
    Backoff,
    ConfigError,
    JobSpec,
    PermanentError,
    Reaper,
    ReaperConfig,
    Registry,
    Snooze,
    Worker,
    WorkerConfig,
    current_job,
    enqueue,
    enqueue_many,
    store,
)
from pgqueue.worker import executor as executor_module
from tests.conftest import DropsNotifications, Outage, wait_until

FAST = Backoff(base_seconds=0.01, max_seconds=0.05)


@asynccontextmanager
async def running_worker(registry: Registry, dsn: str, **config: Any) -> AsyncIterator[Worker]:
    config.setdefault("poll_interval", 0.5)
    worker = Worker(registry, WorkerConfig(dsn=dsn, **config))
    task = asyncio.create_task(worker.run(handle_signals=False))
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


async def wait_for_db(dsn: str, sql: str, params: Any = None, timeout: float = 15.0) -> Any:
    """Poll ``sql`` until its first column is truthy; return it."""
    deadline = time.monotonic() + timeout
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while True:
            row = await (await conn.execute(sql, params)).fetchone()
            if row and row[0]:
                return row[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"not true within {timeout}s: {sql}")
            await asyncio.sleep(0.02)


def sql_enqueue(dsn: str, task: str, args: dict[str, Any] | None = None, **kw: Any) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return enqueue(conn, task, args or {}, **kw)


def fetch(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(coro_fn())


def test_runs_sync_and_async_handlers_with_job_context(dsn):
    registry = Registry()
    seen: list[tuple[str, int, int, str]] = []

    @registry.task(name="sync")
    def sync_handler(x: int) -> None:
        job = current_job()
        seen.append(("sync", x, job.attempt, job.queue))

    @registry.task(name="async", queue="other")
    async def async_handler(x: int) -> None:
        await asyncio.sleep(0)
        seen.append(("async", x, current_job().attempt, current_job().queue))

    a = sql_enqueue(dsn, "sync", {"x": 1})
    b = sql_enqueue(dsn, "async", {"x": 2}, queue="other")

    async def main() -> None:
        async with running_worker(registry, dsn):
            await wait_for_db(
                dsn, "SELECT count(*) = 2 FROM pgqueue.jobs WHERE state = 'succeeded'"
            )

    run(main)
    assert sorted(seen) == [("async", 2, 1, "other"), ("sync", 1, 1, "default")]
    rows = fetch(
        dsn,
        "SELECT id, attempts, lease_token, finished_at IS NOT NULL FROM pgqueue.jobs ORDER BY id",
    )
    assert rows == [(a, 1, None, True), (b, 1, None, True)]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_never_runs_more_than_concurrency_handlers(dsn, kind):
    # Both kinds: a sync handler alone cannot show one slot too many (the thread pool, as
    # large as the concurrency, hides it); async handlers run on the loop, bounded by the
    # worker's own accounting only.
    registry = Registry()
    lock = threading.Lock()
    active = 0
    peak = 0

    def enter() -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)

    def leave() -> None:
        nonlocal active
        with lock:
            active -= 1

    if kind == "sync":

        @registry.task(name="busy")
        def busy() -> None:
            enter()
            time.sleep(0.1)
            leave()

    else:

        @registry.task(name="busy")
        async def busy_async() -> None:
            enter()
            await asyncio.sleep(0.1)
            leave()

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO pgqueue.jobs (task) SELECT 'busy' FROM generate_series(1, 15)")

    async def main() -> None:
        async with running_worker(registry, dsn, concurrency=3):
            await wait_for_db(
                dsn, "SELECT count(*) = 15 FROM pgqueue.jobs WHERE state = 'succeeded'"
            )

    run(main)
    assert peak == 3


def test_claims_in_priority_then_run_at_order(dsn):
    registry = Registry()
    order: list[str] = []

    @registry.task(name="o")
    def o(name: str) -> None:
        order.append(name)

    sql_enqueue(dsn, "o", {"name": "low"}, priority=5)
    sql_enqueue(dsn, "o", {"name": "high-late"}, priority=-1)
    sql_enqueue(dsn, "o", {"name": "mid"}, priority=0)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE pgqueue.jobs SET run_at = run_at - interval '1 minute'"
            " WHERE args->>'name' = 'mid'"
        )
    sql_enqueue(dsn, "o", {"name": "mid-later"}, priority=0)

    async def main() -> None:
        async with running_worker(registry, dsn, concurrency=1):
            await wait_for_db(
                dsn, "SELECT count(*) = 4 FROM pgqueue.jobs WHERE state = 'succeeded'"
            )

    run(main)
    assert order == ["high-late", "mid", "mid-later", "low"]


def test_failures_retry_with_backoff_then_dead_letter_with_full_history(dsn):
    registry = Registry()

    @registry.task(name="boom", max_attempts=3, backoff=Backoff(base_seconds=0.05, jitter=0))
    def boom() -> None:
        raise ValueError(f"boom on attempt {current_job().attempt}")

    job_id = sql_enqueue(dsn, "boom", max_attempts=3)

    async def main() -> None:
        async with running_worker(registry, dsn):
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.dead_jobs")

    run(main)
    assert fetch(dsn, "SELECT count(*) FROM pgqueue.jobs") == [(0,)]
    ((dead_id, attempts, reason, errors),) = fetch(
        dsn, "SELECT id, attempts, reason, errors FROM pgqueue.dead_jobs"
    )
    assert (dead_id, attempts, reason) == (job_id, 3, "exhausted")
    assert [e["attempt"] for e in errors] == [1, 2, 3]
    assert [e["error"] for e in errors] == [f"ValueError: boom on attempt {i}" for i in (1, 2, 3)]
    assert all("Traceback" in e["traceback"] and e["kind"] == "error" for e in errors)


def test_retry_waits_for_its_backoff(dsn):
    registry = Registry()
    runs: list[float] = []

    @registry.task(name="flaky", backoff=Backoff(base_seconds=1.0, jitter=0))
    def flaky() -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise RuntimeError("first time fails")

    sql_enqueue(dsn, "flaky")

    async def main() -> None:
        async with running_worker(registry, dsn):
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded'")

    run(main)
    assert len(runs) == 2
    # The second run is scheduled by run_at on the database: never earlier than the delay.
    assert runs[1] - runs[0] >= 0.95
    ((attempts, errors),) = fetch(dsn, "SELECT attempts, errors FROM pgqueue.jobs")
    assert attempts == 2 and len(errors) == 1


def test_each_retry_waits_twice_as_long_as_the_one_before(dsn):
    # Found by a mutation audit: every retry could wait the first attempt's delay
    # (backoff.delay(1)) and no test noticed; only the Backoff arithmetic was checked.
    registry = Registry()

    @registry.task(name="boom", max_attempts=4, backoff=Backoff(base_seconds=0.3, jitter=0))
    def boom() -> None:
        raise ValueError("boom")

    sql_enqueue(dsn, "boom", max_attempts=4)

    async def main() -> None:
        async with running_worker(registry, dsn):
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.dead_jobs", timeout=30)

    run(main)
    ((history,),) = fetch(dsn, "SELECT history FROM pgqueue.dead_jobs")
    assert [h["attempt"] for h in history] == [1, 2, 3, 4]
    started = [datetime.fromisoformat(h["started_at"]) for h in history]
    ended = [datetime.fromisoformat(h["ended_at"]) for h in history]
    # The retry's run_at is the write's time plus the delay, and the next claim comes no
    # earlier: from one attempt's end to the next one's start is at least the delay.
    gaps = [(started[i + 1] - ended[i]).total_seconds() for i in range(3)]
    assert gaps[0] >= 0.29 and gaps[1] >= 0.59 and gaps[2] >= 1.19, gaps


def test_permanent_error_dead_letters_at_once(dsn):
    registry = Registry()

    @registry.task(name="perm", max_attempts=10)
    def perm() -> None:
        raise PermanentError("bad request, never retry")

    sql_enqueue(dsn, "perm", max_attempts=10)

    async def main() -> None:
        async with running_worker(registry, dsn):
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.dead_jobs")

    run(main)
    ((attempts, reason, errors),) = fetch(
        dsn, "SELECT attempts, reason, errors FROM pgqueue.dead_jobs"
    )
    assert (attempts, reason) == (1, "permanent")
    assert errors[0]["kind"] == "permanent"


def test_snooze_reschedules_without_counting_an_attempt(dsn):
    registry = Registry()
    attempts_seen: list[int] = []

    @registry.task(name="later", max_attempts=1)
    def later() -> None:
        attempts_seen.append(current_job().attempt)
        if len(attempts_seen) < 3:
            raise Snooze(0.05)

    sql_enqueue(dsn, "later", max_attempts=1)

    async def main() -> None:
        async with running_worker(registry, dsn):
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded'")

    run(main)
    # max_attempts=1 and three runs: snoozes did not use up the attempt.
    assert attempts_seen == [1, 1, 1]
    assert fetch(dsn, "SELECT attempts, errors FROM pgqueue.jobs") == [(1, [])]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_timeout_fails_the_attempt(dsn, kind):
    registry = Registry()

    if kind == "sync":

        @registry.task(name="slow", timeout=0.2, max_attempts=1)
        def slow() -> None:
            time.sleep(1.0)

    else:

        @registry.task(name="slow", timeout=0.2, max_attempts=1)
        async def slow_async() -> None:
            await asyncio.sleep(30)

    sql_enqueue(dsn, "slow", max_attempts=1)

    async def main() -> None:
        async with running_worker(registry, dsn):
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.dead_jobs")

    run(main)
    ((errors,),) = fetch(dsn, "SELECT errors FROM pgqueue.dead_jobs")
    assert errors[0]["kind"] == "timeout"
    assert "timed out after 0.2s" in errors[0]["error"]


def test_async_handlers_behind_a_plain_decorator_or_in_an_object_run_and_count(dsn):
    registry = Registry()
    ran: list[str] = []

    def traced(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)  # the coroutine, not awaited here

        return wrapper

    @registry.task(name="wrapped")
    @traced
    async def wrapped(x: int) -> None:
        await asyncio.sleep(0)
        ran.append(f"wrapped {x} {current_job().attempt}")

    @registry.task(name="wrapped.fails", max_attempts=1)
    @traced
    async def wrapped_fails() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom")

    @registry.task(name="wrapped.slow", max_attempts=1, timeout=0.3)
    @traced
    async def wrapped_slow() -> None:
        await asyncio.sleep(30)

    class Handler:
        async def __call__(self, x: int) -> None:
            await asyncio.sleep(0)
            ran.append(f"object {x}")

    registry.task(name="object")(Handler())
    assert registry.get("object").is_async
    for task, args in [("wrapped", {"x": 1}), ("object", {"x": 2})]:
        sql_enqueue(dsn, task, args)
    sql_enqueue(dsn, "wrapped.fails", max_attempts=1)
    sql_enqueue(dsn, "wrapped.slow", max_attempts=1)

    async def main() -> None:
        async with running_worker(registry, dsn):
            await wait_for_db(
                dsn,
                "SELECT (SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded') = 2"
                " AND (SELECT count(*) FROM pgqueue.dead_jobs) = 2",
            )

    run(main)
    assert sorted(ran) == ["object 2", "wrapped 1 1"]
    dead = dict(fetch(dsn, "SELECT task, errors -> 0 FROM pgqueue.dead_jobs"))
    assert dead["wrapped.fails"]["kind"] == "error"
    assert "boom" in dead["wrapped.fails"]["error"]
    assert dead["wrapped.slow"]["kind"] == "timeout"
    assert "timed out after 0.3s" in dead["wrapped.slow"]["error"]


def test_unknown_task_and_bad_args_fail_the_attempt_and_retry(dsn, monkeypatch):
    # The deploy floor (next test) would make the second attempt wait a minute.
    monkeypatch.setattr(executor_module, "DEPLOY_BACKOFF", FAST)
    registry = Registry()

    @registry.task(name="typed", backoff=FAST)
    def typed(a: int) -> None: ...

    sql_enqueue(dsn, "no.such.task", max_attempts=2)
    sql_enqueue(dsn, "typed", {"b": 1}, max_attempts=2)

    async def main() -> Worker:
        async with running_worker(registry, dsn) as worker:
            await wait_for_db(dsn, "SELECT count(*) = 2 FROM pgqueue.dead_jobs")
            return worker

    worker = run(main)
    rows = fetch(dsn, "SELECT task, attempts, errors FROM pgqueue.dead_jobs ORDER BY task")
    assert [(t, a, [e["kind"] for e in errs]) for t, a, errs in rows] == [
        ("no.such.task", 2, ["unknown_task", "unknown_task"]),
        ("typed", 2, ["bad_args", "bad_args"]),
    ]
    assert "args do not fit" in rows[1][2][0]["error"]
    assert worker.running == 0


def test_a_task_the_worker_does_not_know_is_retried_slowly_enough_to_outlive_a_deploy(dsn):
    # A rolling deploy: producers run new code, an old worker serves the queue. Retried by
    # the default backoff (1 s, 2 s) or the task's own short one, a job with 3 attempts was
    # dead-lettered by the old worker within 3 s, before the new workers came up.
    registry = Registry()

    @registry.task(name="typed", backoff=FAST)
    def typed(a: int) -> None: ...

    @registry.task(name="fails", backoff=FAST)
    def fails() -> None:
        raise RuntimeError("boom")

    unknown = sql_enqueue(dsn, "new.task", max_attempts=3)
    misfit = sql_enqueue(dsn, "typed", {"b": 1}, max_attempts=3)
    sql_enqueue(dsn, "fails", max_attempts=3)

    async def main() -> None:
        async with running_worker(registry, dsn):
            # A handler's own failure keeps its task's backoff: dead in moments.
            await wait_for_db(
                dsn,
                "SELECT count(*) = 2 FROM pgqueue.jobs WHERE state = 'queued' AND attempts = 1"
                " AND task <> 'fails' AND (SELECT count(*) = 1 FROM pgqueue.dead_jobs)",
            )

    run(main)
    waits = dict(
        fetch(
            dsn,
            "SELECT id, extract(epoch FROM run_at - now()) FROM pgqueue.jobs WHERE id = ANY(%s)",
            ([unknown, misfit],),
        )
    )
    # DEPLOY_BACKOFF's first delay is 60 s less its jitter, 45 s at the least; a few
    # seconds may have passed since the retry was written.
    assert len(waits) == 2 and all(float(wait) > 35 for wait in waits.values()), waits


def test_handler_exceptions_never_stop_the_worker(dsn):
    registry = Registry()

    @registry.task(name="exit", max_attempts=1)
    def exits() -> None:
        raise SystemExit(3)

    @registry.task(name="interrupt", max_attempts=1)
    async def interrupt() -> None:
        raise KeyboardInterrupt

    @registry.task(name="fine")
    def fine() -> None: ...

    for task in ("exit", "interrupt"):
        sql_enqueue(dsn, task, max_attempts=1)

    async def main() -> None:
        async with running_worker(registry, dsn):
            await wait_for_db(dsn, "SELECT count(*) = 2 FROM pgqueue.dead_jobs")
            sql_enqueue(dsn, "fine")
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded'")

    run(main)


@asynccontextmanager
async def idle_ping_worker(dsn: str) -> AsyncIterator[Worker]:
    """A worker of a no-op `ping` task with a 60 s poll, once idle: its listener listens,
    and it has claimed, and checked for rescued jobs, once."""
    registry = Registry()

    @registry.task(name="ping")
    def ping() -> None: ...

    async with running_worker(registry, dsn, poll_interval=60) as worker:
        await asyncio.wait_for(worker.listener.connected.wait(), 10)
        await checked_for_rescued_jobs(worker)
        yield worker


def seconds_until_an_idle_worker_ran(dsn: str, make_job: Callable[[], object]) -> float:
    """Seconds from ``make_job`` (run in a thread; it makes one `ping` job) to that job's
    success on an idle_ping_worker. Running at all within the 20 s wait proves something
    other than the poll woke the worker."""

    async def main() -> float:
        async with idle_ping_worker(dsn):
            start = time.monotonic()
            await asyncio.to_thread(make_job)
            await wait_for_db(
                dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded'", timeout=20
            )
            return time.monotonic() - start

    elapsed: float = run(main)
    return elapsed


def test_notification_wakes_an_idle_worker_long_before_the_poll(dsn):
    assert seconds_until_an_idle_worker_ran(dsn, lambda: sql_enqueue(dsn, "ping")) < 20


def test_a_worker_says_when_notifications_do_not_reach_it(dsn):
    # Found with a real PgBouncer in transaction mode: a worker connected through it got
    # no notification and said nothing, finding jobs only at its poll.
    proxy = DropsNotifications(dsn)

    async def main() -> tuple[bool | None, bool | None]:
        async with (
            running_worker(Registry(), dsn) as direct,
            running_worker(Registry(), proxy.dsn) as pooled,
        ):
            for listening in (direct, pooled):
                await asyncio.wait_for(listening.listener.connected.wait(), 20)
            return (
                direct.listener.notifications_arrive,
                pooled.listener.notifications_arrive,
            )

    try:
        with structlog.testing.capture_logs() as logs:
            assert run(main) == (True, False)
    finally:
        proxy.close()
    (lost,) = [e for e in logs if e["event"] == "listener.notifications_lost"]
    assert "poll-interval" in lost["hint"]


def test_a_listener_whose_check_the_database_refuses_listens_all_the_same(dsn, monkeypatch):
    # A review of the check: its NOTIFY refused (the server's NOTIFY queue full, which a
    # test cannot reach: injected here into a real connection) kept the listener from
    # ever getting to LISTEN pgqueue_jobs, reconnecting in a loop.
    from psycopg import sql

    from pgqueue.worker import listener as listener_module

    class QueueFull(psycopg.AsyncConnection[Any]):
        async def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
            text = query.as_string(self) if isinstance(query, sql.Composable) else str(query)
            if text.startswith('NOTIFY "pgqueue_check_'):
                raise psycopg.errors.ProgramLimitExceeded("too many notifications")
            return await super().execute(query, *args, **kwargs)

    async def connect(conninfo: str, **kwargs: Any) -> Any:
        # The listener's connection (store.connect_async), of the class above.
        conn = await QueueFull.connect(conninfo, autocommit=True, **kwargs)
        await store.pin_session_async(conn)
        return conn

    monkeypatch.setattr(listener_module.store, "connect_async", connect)

    async def main() -> bool | None:
        async with running_worker(Registry(), dsn) as worker:
            await asyncio.wait_for(worker.listener.connected.wait(), 20)
            return worker.listener.notifications_arrive

    with structlog.testing.capture_logs() as logs:
        assert run(main) is None
    assert [e["event"] for e in logs if e["event"].startswith("listener.")] == [
        "listener.check_failed"
    ]


async def checked_for_rescued_jobs(worker: Worker) -> None:
    """Until the worker has made its check for rescued jobs, and the next is a poll away."""
    loop = asyncio.get_running_loop()
    for _ in range(500):
        if worker._next_rescue_check > loop.time() + 1:
            await asyncio.sleep(0.1)  # done with that run_once: idle
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the worker never checked for rescued jobs")


def make_rescued_job(dsn: str, how: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if how == "requeued":
            # A job whose worker died: the reaper requeues it, rescued, runnable now.
            conn.execute(
                "INSERT INTO pgqueue.jobs (task, state, attempts, lease_token, leased_by,"
                " lease_expires_at, attempted_at)"
                " VALUES ('ping', 'running', 1, gen_random_uuid(), 'gone',"
                "         now() - interval '1 second', now() - interval '1 minute')"
            )
            requeued = store.requeue_expired(
                conn, batch_size=10, backoff_base_seconds=1.0, backoff_max_seconds=1.0
            )
            assert len(requeued) == 1
        elif how == "due later":
            conn.execute(
                "INSERT INTO pgqueue.jobs (task, rescued, run_at)"
                " VALUES ('ping', true, now() + interval '1 second')"
            )
        else:
            # Due since the worker's last check, with no notification saying it is
            # rescued: as one that falls due just after a check made for another reason.
            conn.execute("INSERT INTO pgqueue.jobs (task, rescued) VALUES ('ping', true)")


@pytest.mark.parametrize("how", ["requeued", "due later", "due since the last check"])
def test_an_idle_worker_takes_a_rescued_job_when_it_is_runnable_not_at_its_next_poll(dsn, how):
    # The claim leaves rescued jobs to the check for them, made once per poll interval:
    # one the reaper requeued (its notification named the queue) or one retried with
    # backoff (the worker slept until it fell due, then claimed nothing) waited for the
    # worker's next poll, and so did one that fell due just after a check. Now the
    # reaper's payload, or the due time of a rescued job, or its having fallen due since
    # the last check, brings the check forward.
    assert seconds_until_an_idle_worker_ran(dsn, lambda: make_rescued_job(dsn, how)) < 20


def test_an_idle_worker_does_not_spin_on_a_rescued_job_it_cannot_take(dsn, monkeypatch):
    # A rescued job that fell due since the last check makes the worker check again at
    # once; one its check saw but could not take (locked by another worker's claim)
    # must not make it check again and again: only a job that fell due after the check's
    # now() counts.
    checks: list[float] = []
    real_check = store.rescued_waiting

    async def check(conn: Any, **kw: Any) -> Any:
        checks.append(time.monotonic())
        return await real_check(conn, **kw)

    monkeypatch.setattr(store, "rescued_waiting", check)

    async def main() -> None:
        async with idle_ping_worker(dsn) as worker:
            async with await psycopg.AsyncConnection.connect(dsn) as holder:
                # Due in 2 s, and locked (as by a claim) long before the worker looks.
                await holder.execute(
                    "INSERT INTO pgqueue.jobs (task, rescued, run_at)"
                    " VALUES ('ping', true, now() + interval '2 seconds')"
                )
                await holder.commit()
                await holder.execute("SELECT id FROM pgqueue.jobs FOR UPDATE")
                start = time.monotonic()
                await asyncio.sleep(3.5)
                counted = [t for t in checks if t > start]
                cur = await holder.execute("SELECT state, attempts FROM pgqueue.jobs")
                assert await cur.fetchall() == [("queued", 0)]  # never taken: locked
                await holder.rollback()
            # It checked when the job fell due (the insert's notification told it when),
            # maybe once more, not about once a millisecond.
            assert 1 <= len(counted) <= 5, len(counted)
            assert not worker.failed

    run(main)


def test_a_check_for_rescued_jobs_that_failed_is_made_again_on_the_fetchers_retry(dsn, monkeypatch):
    # The next check's time is set before the check (a notification during it must not be
    # lost); a check that failed (a connection lost) left it a poll interval away, and a
    # rescued job waiting then waited for that poll.
    armed: list[str] = []
    real_check = store.rescued_waiting

    async def check(conn: Any, **kw: Any) -> Any:
        if armed == ["armed"]:
            armed.append("failed")
            raise psycopg.OperationalError("the connection broke (test)")
        return await real_check(conn, **kw)

    monkeypatch.setattr(store, "rescued_waiting", check)

    async def main() -> None:
        async with idle_ping_worker(dsn):
            armed.append("armed")
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                # Waiting since before the worker's last check: the claim leaves it to the
                # next check, which a rescued job's notification asks for, and which fails.
                await conn.execute(
                    "INSERT INTO pgqueue.jobs (task, rescued, run_at)"
                    " VALUES ('ping', true, now() - interval '10 seconds')"
                )
                await conn.execute("SELECT pg_notify('pgqueue_jobs', ' rescued default')")
            await wait_for_db(
                dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded'", timeout=20
            )

    run(main)
    assert armed == ["armed", "failed"]


def test_the_listener_passes_on_rescued_jobs_of_its_queues_and_after_each_reconnect(dsn):
    # A rescued job's notification sent while the listener was away is lost as any
    # other: after a reconnect the worker checks for rescued jobs too, not only claims,
    # and beats for a cancel it may have missed.
    from pgqueue.worker.listener import Listener

    async def main() -> None:
        wake = asyncio.Event()
        told: list[int] = []
        cancels: list[int] = []
        listener = Listener(
            dsn, ["q"], wake, reconnect_max_seconds=0.2, on_rescued=lambda: told.append(1),
            on_cancel=lambda: cancels.append(1), worker_id="w-1",
        )  # fmt: skip
        task = asyncio.create_task(listener.run())
        try:
            await asyncio.wait_for(listener.connected.wait(), 10)
            assert told == [1] and wake.is_set()
            wake.clear()
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                for payload in (" rescued other", " rescued q"):
                    await conn.execute("SELECT pg_notify('pgqueue_jobs', %s)", (payload,))
                # In commit order: the other queue's came first, and was left alone.
                for _ in range(500):
                    if len(told) == 2:
                        break
                    await asyncio.sleep(0.01)
                assert told == [1, 1] and wake.is_set()
                assert listener._conn is not None
                pid = listener._conn.info.backend_pid
                listener.connected.clear()
                await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            await asyncio.wait_for(listener.connected.wait(), 10)
            assert len(told) >= 3
            # A cancel sent while it was away is lost too: the heartbeat beats at once
            # (not after the first connect, when this worker runs nothing yet).
            assert cancels == [1]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    run(main)


def test_a_rescued_jobs_notification_during_the_check_for_them_is_not_lost(dsn, monkeypatch):
    # The next check's time was set after the check's round trip, over the one the
    # notification had just brought forward: the job waited for the next poll.
    told = asyncio.Event()  # the listener passed on a rescued job's notification
    armed: list[bool] = []
    real_check = store.rescued_waiting

    def make_job_the_check_missed() -> None:
        # Committed after the check read the table, due since before its now(): only the
        # notification tells the worker (one that fell due after the check's now() would
        # also come back from seconds_until_due).
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO pgqueue.jobs (task, rescued, run_at)"
                " VALUES ('ping', true, now() - interval '10 seconds')"
            )
            conn.execute("SELECT pg_notify('pgqueue_jobs', ' rescued default')")

    async def check(conn: Any, **kw: Any) -> Any:
        waiting = await real_check(conn, **kw)
        if armed and not armed[1:]:
            armed.append(True)  # once
            # A job is made runnable right after this check read the table; its
            # notification arrives before the check's result is acted on.
            told.clear()
            await asyncio.to_thread(make_job_the_check_missed)
            await asyncio.wait_for(told.wait(), 10)
        return waiting

    monkeypatch.setattr(store, "rescued_waiting", check)

    async def main() -> None:
        async with idle_ping_worker(dsn) as worker:
            passed_on = worker.listener.on_rescued
            assert passed_on is not None

            def on_rescued() -> None:
                passed_on()
                told.set()

            worker.listener.on_rescued = on_rescued
            armed.append(True)
            # Wakes the worker to a check, during which the job is requeued.
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                await conn.execute("SELECT pg_notify('pgqueue_jobs', ' rescued default')")
            await wait_for_db(
                dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded'", timeout=20
            )

    run(main)
    assert len(armed) == 2


def test_a_busy_idle_worker_checks_for_rescued_jobs_on_its_timer_not_before_a_claim(
    dsn, monkeypatch
):
    """The periodic check for rescued jobs (one round trip) runs when it falls due, on the
    worker's own timer, not in front of the claim of a job whose notification woke it."""
    registry = Registry()

    @registry.task(name="ping")
    async def ping() -> None: ...

    calls: list[str] = []
    real_check, real_claim = store.rescued_waiting, store.claim_jobs

    async def check(conn: Any, **kw: Any) -> Any:
        calls.append("check")
        return await real_check(conn, **kw)

    async def claim(conn: Any, **kw: Any) -> Any:
        jobs = await real_claim(conn, **kw)
        calls.append("claimed" if jobs else "claimed none")
        return jobs

    monkeypatch.setattr(store, "rescued_waiting", check)
    monkeypatch.setattr(store, "claim_jobs", claim)

    async def main() -> None:
        async with running_worker(registry, dsn, poll_interval=0.4) as worker:
            await asyncio.wait_for(worker.listener.connected.wait(), 10)
            # A job every 0.15 s: notifications wake the worker more often than its checks
            # fall due (every 0.4 s), so it never waits a whole poll interval.
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                for _ in range(36):
                    await enqueue(conn, "ping")
                    await asyncio.sleep(0.15)
            await wait_for_db(
                dsn, "SELECT count(*) = 36 FROM pgqueue.jobs WHERE state = 'succeeded'"
            )

    run(main)
    checks = [i for i, call in enumerate(calls) if call == "check"]
    assert len(checks) >= 8
    # A check right before the claim that got a job was made on that job's wake-up (every
    # check, when the check waited for the next wake-up). On the timer a job can slip in
    # between only within the check's round trip (about 1 ms of every 150 here).
    in_front = [i for i in checks if i + 1 < len(calls) and calls[i + 1] == "claimed"]
    assert len(in_front) <= len(checks) // 3, calls


def test_a_wake_up_during_a_short_claim_leads_straight_to_the_next_claim(dsn, monkeypatch):
    """After a claim that came back short, the worker asks when the next scheduled job is
    due (a round trip) and waits; a notification that came during the claim makes it
    claim again at once instead."""
    calls: list[str] = []
    workers: list[Worker] = []
    enough = asyncio.Event()
    real_claim, real_due = store.claim_jobs, store.seconds_until_due

    async def claim(conn: Any, **kw: Any) -> Any:
        jobs = await real_claim(conn, **kw)
        if not workers:
            return jobs
        # Every other claim, the wake-up a notification arriving meanwhile would give.
        if calls.count("claim") == calls.count("claim, woken"):
            workers[0]._wake.set()
        # Labelled by the event itself: the listener's own wake-up once it has connected
        # (it may come during the first claim recorded) counts the same.
        calls.append("claim, woken" if workers[0]._wake.is_set() else "claim")
        if calls.count("claim, woken") >= 6:
            enough.set()
        return jobs

    async def due(conn: Any, **kw: Any) -> Any:
        if workers:
            calls.append("due")
        return await real_due(conn, **kw)

    monkeypatch.setattr(store, "claim_jobs", claim)
    monkeypatch.setattr(store, "seconds_until_due", due)

    async def main() -> None:
        async with running_worker(Registry(), dsn, queues=("q",), poll_interval=0.05) as worker:
            # Nothing else wakes the worker from here on: the listener wakes it once when
            # it connects, then only a notification would (none comes, nothing enqueues).
            await asyncio.wait_for(worker.listener.connected.wait(), 10)
            workers.append(worker)
            await asyncio.wait_for(enough.wait(), 10)

    run(main)
    woken = [i for i, call in enumerate(calls) if call == "claim, woken"]
    assert len(woken) >= 6
    after_woken = {calls[i + 1] for i in woken if i + 1 < len(calls)}
    assert after_woken <= {"claim", "claim, woken"}, calls
    # Without a wake-up, the round trip for the next scheduled job comes before the wait.
    plain = [i for i, call in enumerate(calls) if call == "claim" and i + 1 < len(calls)]
    assert plain and {calls[i + 1] for i in plain} == {"due"}, calls


def test_scheduled_job_wakes_the_worker_when_due_without_polling(dsn):
    registry = Registry()

    @registry.task(name="later")
    def later() -> None: ...

    async def main() -> None:
        async with running_worker(registry, dsn, poll_interval=60) as worker:
            await asyncio.wait_for(worker.listener.connected.wait(), 10)
            await asyncio.sleep(0.2)
            await asyncio.to_thread(sql_enqueue, dsn, "later", delay=1.0)
            await wait_for_db(
                dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded'", timeout=20
            )

    run(main)
    ((ok,),) = fetch(dsn, "SELECT attempted_at >= run_at FROM pgqueue.jobs")
    assert ok


def test_heartbeat_keeps_a_long_job_leased_past_its_lease(dsn):
    registry = Registry()

    @registry.task(name="long")
    async def long() -> None:
        await asyncio.sleep(3.5)

    job_id = sql_enqueue(dsn, "long")
    reaper = Reaper(ReaperConfig(dsn=dsn))

    async def main() -> None:
        async with running_worker(registry, dsn, lease_seconds=1.2):
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'running'")
            for _ in range(6):  # 3 s: more than twice the lease
                await asyncio.sleep(0.5)
                result = await asyncio.to_thread(reaper.run_once)
                assert result.requeued == [] and result.dead == []
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded'")

    run(main)
    assert fetch(dsn, "SELECT id, attempts, errors FROM pgqueue.jobs") == [(job_id, 1, [])]


def test_stale_worker_cannot_overwrite_a_newer_attempt(dsn):
    """The job's lease is taken over while the handler runs: its result changes nothing."""
    registry = Registry()
    new_token = uuid.uuid4()

    @registry.task(name="stale")
    def stale() -> None:
        # What a reaper requeue plus another worker's claim would leave behind.
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "UPDATE pgqueue.jobs SET lease_token = %s, leased_by = 'other', attempts = 2"
                " WHERE id = %s",
                (new_token, current_job().id),
            )

    job_id = sql_enqueue(dsn, "stale")

    async def main() -> None:
        async with running_worker(registry, dsn):
            await wait_for_db(dsn, "SELECT attempts = 2 FROM pgqueue.jobs WHERE id = %s", (job_id,))
            await asyncio.sleep(0.5)  # let the stale worker try to record its success

    run(main)
    assert fetch(dsn, "SELECT state, attempts, leased_by, lease_token FROM pgqueue.jobs") == [
        ("running", 2, "other", new_token)
    ]


def test_stop_releases_jobs_that_outlive_the_shutdown_timeout(dsn):
    registry = Registry()
    finished: list[int] = []

    @registry.task(name="quick")
    async def quick() -> None:
        await asyncio.sleep(0.3)
        finished.append(1)

    @registry.task(name="endless")
    async def endless() -> None:
        await asyncio.sleep(60)

    quick_id = sql_enqueue(dsn, "quick")
    endless_id = sql_enqueue(dsn, "endless")

    async def main() -> None:
        async with running_worker(registry, dsn, shutdown_timeout=1.0):
            await wait_for_db(dsn, "SELECT count(*) = 2 FROM pgqueue.jobs WHERE state = 'running'")

    run(main)
    rows = dict(
        (r[0], r[1:])
        for r in fetch(dsn, "SELECT id, state, attempts, lease_token, errors FROM pgqueue.jobs")
    )
    assert rows[quick_id] == ("succeeded", 1, None, [])
    # Released: back in the queue, the attempt not counted, nothing half-written.
    assert rows[endless_id] == ("queued", 0, None, [])
    assert finished == [1]


def test_error_text_that_jsonb_cannot_hold_is_recorded_cleanly(dsn):
    registry = Registry()

    @registry.task(name="nasty", max_attempts=2, backoff=FAST)
    def nasty() -> None:
        raise ValueError("nul \x00 and a lone surrogate \udcff")

    sql_enqueue(dsn, "nasty", max_attempts=2)

    async def main() -> None:
        async with running_worker(registry, dsn):
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.dead_jobs")

    run(main)
    ((errors,),) = fetch(dsn, "SELECT errors FROM pgqueue.dead_jobs")
    assert [e["attempt"] for e in errors] == [1, 2]
    assert errors[0]["error"] == "ValueError: nul \\0 and a lone surrogate \\udcff"


class _NotesRaise(Exception):
    """An exception whose own code raises while its traceback is formatted."""

    @property
    def __notes__(self) -> list[str]:  # type: ignore[override]
        raise SystemExit(4)


class _SnoozeWithoutSeconds(Snooze):
    def __init__(self) -> None:  # does not call Snooze.__init__
        pass


class _SlowToSay(Exception):
    """An exception whose text takes work (a lazy message, an ORM object's repr): records
    the thread each str() of it ran in."""

    said_in: ClassVar[list[str]] = []

    def __str__(self) -> str:
        _SlowToSay.said_in.append(threading.current_thread().name)
        return "slow to say"


def test_a_plain_handlers_exception_is_described_in_its_thread_not_on_the_loop(dsn):
    # Its __str__ and traceback were formatted on the event loop, twice: one that took
    # seconds blocked every other job and the heartbeat (their leases ran out, finished
    # neighbours ran again). A review made one sleep 8 s.
    registry = Registry()

    @registry.task(name="slow_to_say", max_attempts=1)
    def slow_to_say() -> None:
        raise _SlowToSay()

    _SlowToSay.said_in.clear()
    sql_enqueue(dsn, "slow_to_say", max_attempts=1)

    async def main() -> None:
        async with running_worker(registry, dsn, concurrency=2):
            await wait_for_db(dsn, "SELECT count(*) = 1 FROM pgqueue.dead_jobs", timeout=20)

    run(main)
    ((errors,),) = fetch(dsn, "SELECT errors FROM pgqueue.dead_jobs")
    assert errors[0]["error"] == "_SlowToSay: slow to say"
    assert "_SlowToSay: slow to say" in errors[0]["traceback"]
    assert _SlowToSay.said_in and all(n.startswith("pgqueue-job") for n in _SlowToSay.said_in), (
        _SlowToSay.said_in
    )


def test_what_a_handler_raises_always_ends_its_attempt_with_an_outcome(dsn):
    # Each of these left its job running (lease renewed by every beat) for as long as the
    # worker lived, or stopped the worker: a plain handler's StopIteration (asyncio
    # cannot set it on a future), an exception whose traceback cannot be formatted (the
    # SyntaxError a template parser raises with a text offset; a __notes__ that raises
    # SystemExit took the process down), and a Snooze subclass without seconds (counted
    # as pgqueue's own internal error, with the default backoff).
    registry = Registry()

    @registry.task(name="stop_iteration", max_attempts=1)
    def stop_iteration() -> None:
        next(iter([]))

    @registry.task(name="bad_offset", max_attempts=1)
    def bad_offset() -> None:
        raise SyntaxError("unexpected token", ("template.txt", 3, "7", "{{ name }"))

    @registry.task(name="notes_exit", max_attempts=1)
    async def notes_exit() -> None:
        raise _NotesRaise("boom")

    @registry.task(name="bad_snooze", max_attempts=1)
    def bad_snooze() -> None:
        raise _SnoozeWithoutSeconds()

    @registry.task(name="fine")
    def fine() -> None: ...

    tasks = ("stop_iteration", "bad_offset", "notes_exit", "bad_snooze")
    for task in tasks:
        sql_enqueue(dsn, task, max_attempts=1)

    async def main() -> None:
        async with running_worker(registry, dsn, concurrency=1):
            await wait_for_db(dsn, "SELECT count(*) = 4 FROM pgqueue.dead_jobs", timeout=20)
            sql_enqueue(dsn, "fine")
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded'")

    run(main)
    rows = {
        task: (reason, errors[0])
        for task, reason, errors in fetch(dsn, "SELECT task, reason, errors FROM pgqueue.dead_jobs")
    }
    assert {t: (r, e["kind"]) for t, (r, e) in rows.items()} == {
        task: ("exhausted", "error") for task in tasks
    }
    assert rows["stop_iteration"][1]["error"] == ("RuntimeError: the handler raised StopIteration")
    assert "StopIteration" in rows["stop_iteration"][1]["traceback"]
    assert rows["bad_offset"][1]["error"].startswith("SyntaxError: unexpected token")
    assert "could not be formatted" in rows["bad_offset"][1]["traceback"]
    assert "could not be formatted: SystemExit: 4" in rows["notes_exit"][1]["traceback"]
    assert rows["bad_snooze"][1]["error"] == (
        "TypeError: _SnoozeWithoutSeconds.seconds is not set"
        " (a Snooze subclass must call Snooze.__init__)"
    )


def test_a_thread_that_ended_as_its_timeout_did_is_not_said_not_to_have_run(monkeypatch):
    # The timeout's wait can end with the thread done but its future's result not yet
    # delivered to the loop: the record said "it did not run".
    from pgqueue.models import Job
    from pgqueue.worker import executor as executor_module

    ran = threading.Event()

    async def wait_past_the_end(futures: Any, timeout: float | None = None) -> Any:
        await asyncio.to_thread(ran.wait, 10)  # the thread has run the handler
        await asyncio.sleep(0.05)  # and returned
        return set(), set(futures)

    monkeypatch.setattr(executor_module.asyncio, "wait", wait_past_the_end)
    now = datetime.now(UTC)
    job = Job(1, "default", "t", {}, 0, 1, 3, now, now, uuid.uuid4(), now)
    executor = executor_module.Executor(Registry(), "w", threads=1)
    try:
        with pytest.raises(executor_module._TimedOut, match=r"its thread ended just then\)$"):
            asyncio.run(executor._call_in_thread(job, ran.set, {}, 1.0))
        assert executor.abandoned == 0
    finally:
        executor.shutdown()


def deaf_to_its_timeout() -> tuple[Registry, asyncio.Event]:
    """A registry with `stubborn`, an async handler (timeout 0.2 s, one attempt) that
    swallows every cancellation until the event is set, and `fine`, a no-op."""
    registry = Registry()
    let_go = asyncio.Event()

    @registry.task(name="stubborn", timeout=0.2, max_attempts=1)
    async def stubborn() -> None:
        while not let_go.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)

    @registry.task(name="fine")
    def fine() -> None: ...

    return registry, let_go


async def claims_held_back_until_let_go(dsn: str, worker: Worker, let_go: asyncio.Event) -> None:
    """A `fine` job enqueued now waits, and the worker says its claims are held back (its
    /healthz after a lease), until the stubborn handler is let go."""
    fine_id = sql_enqueue(dsn, "fine")
    await asyncio.sleep(1.0)
    assert fetch(dsn, "SELECT state FROM pgqueue.jobs WHERE id = %s", (fine_id,)) == [("queued",)]
    assert worker.slots_held_for() > 0.5
    let_go.set()
    await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded'")
    assert worker.slots_held_for() == 0.0


def test_an_async_handler_that_ignores_its_timeout_is_given_up_on_and_holds_its_slot(dsn):
    # It caught every CancelledError (a retry loop with a bare except): its timeout
    # never ended the attempt, so the job stayed running, its lease renewed by every
    # beat, and never counted an attempt, however often the worker restarted.
    registry, let_go = deaf_to_its_timeout()

    sql_enqueue(dsn, "stubborn", max_attempts=1)

    async def main() -> None:
        async with running_worker(registry, dsn, concurrency=1) as worker:
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.dead_jobs", timeout=10)
            # It runs on in the worker's one slot: nothing else runs meanwhile, and the
            # worker says its claims are held back (its /healthz after a lease).
            assert worker.running == 1
            await claims_held_back_until_let_go(dsn, worker, let_go)

    run(main)
    ((reason, attempts, errors),) = fetch(
        dsn, "SELECT reason, attempts, errors FROM pgqueue.dead_jobs"
    )
    assert (reason, attempts, [e["kind"] for e in errors]) == ("exhausted", 1, ["timeout"])
    assert "had not ended 3s later; it runs on, holding its slot" in errors[0]["error"]


def test_a_handler_given_up_on_does_not_keep_a_rescued_job_waiting(dsn):
    # A rescued job waits until nothing else runs: a handler given up on after its
    # timeout, which may never end, held it (and every other claim) back for good.
    registry, let_go = deaf_to_its_timeout()

    sql_enqueue(dsn, "stubborn", max_attempts=1)

    async def main() -> None:
        async with running_worker(registry, dsn, concurrency=3) as worker:
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.dead_jobs", timeout=10)
            rescued = sql_enqueue(dsn, "fine")
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("UPDATE pgqueue.jobs SET rescued = true WHERE id = %s", (rescued,))
            sql_enqueue(dsn, "fine")
            await wait_for_db(
                dsn, "SELECT count(*) = 2 FROM pgqueue.jobs WHERE state = 'succeeded'"
            )
            assert worker.running == 1  # the stubborn handler, still in its slot
            let_go.set()

    run(main)


def test_a_rescued_job_whose_async_handler_ignores_its_timeout_holds_claims_back(dsn):
    # Running alone, it keeps every other claim back until it ends, whatever the free
    # slots: once given up on, the worker says so (its /healthz after a lease).
    registry, let_go = deaf_to_its_timeout()

    job_id = sql_enqueue(dsn, "stubborn", max_attempts=1)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE pgqueue.jobs SET rescued = true WHERE id = %s", (job_id,))

    async def main() -> None:
        async with running_worker(registry, dsn, concurrency=2) as worker:
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.dead_jobs", timeout=10)
            await claims_held_back_until_let_go(dsn, worker, let_go)

    run(main)


def test_a_handlers_coroutine_closed_after_its_loop_is_gone_closes():
    # A task that swallowed its cancellation is left pending when its loop stops (a
    # drain's), and its coroutine is closed later (GeneratorExit). The executor took that
    # for the handler's failure (an outcome nobody would write) or for a release whose
    # clean-up failed (a warning), at whatever moment garbage collection closed it.
    from pgqueue.models import Job
    from pgqueue.worker.executor import Executor

    registry = Registry()

    @registry.task(name="deaf")
    async def deaf() -> None:
        while True:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.01)

    now = datetime.now(UTC)
    for released in (True, False):
        job = Job(1, "default", "deaf", {}, 0, 1, 3, now, now, uuid.uuid4(), now)
        executor = Executor(registry, "w", threads=1)
        loop = asyncio.new_event_loop()
        try:
            task = loop.create_task(executor.execute(job))
            loop.run_until_complete(asyncio.sleep(0.05))
            if released:
                executor.release(job)
            task.cancel()
            loop.run_until_complete(asyncio.sleep(0.05))
            assert not task.done()
        finally:
            loop.close()
            executor.shutdown()
        coro = task.get_coro()
        assert coro is not None
        with structlog.testing.capture_logs() as logs, pytest.raises(GeneratorExit):
            coro.throw(GeneratorExit)  # what close() does, its result seen
        assert logs == []


def test_a_released_job_whose_clean_up_raises_is_still_released(dsn):
    # Shutdown cancels what outlives the shutdown timeout; a handler whose finally then
    # raised counted a failed attempt (here its only one: dead-lettered) instead of being
    # given back to the queue.
    registry = Registry()

    @registry.task(name="cleanup_raises", max_attempts=1)
    async def cleanup_raises() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            raise RuntimeError("cleanup failed: connection closed")

    job_id = sql_enqueue(dsn, "cleanup_raises", max_attempts=1)

    async def main() -> None:
        async with running_worker(registry, dsn, shutdown_timeout=0.5):
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'running'")

    run(main)
    assert fetch(dsn, "SELECT id, state, attempts FROM pgqueue.jobs") == [(job_id, "queued", 0)]
    assert fetch(dsn, "SELECT count(*) FROM pgqueue.dead_jobs") == [(0,)]


def test_a_timed_out_handler_whose_clean_up_raises_records_a_timeout(dsn):
    registry = Registry()

    @registry.task(name="slow_cleanup", timeout=0.2, max_attempts=1)
    async def slow_cleanup() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            raise RuntimeError("cleanup failed")

    sql_enqueue(dsn, "slow_cleanup", max_attempts=1)

    async def main() -> None:
        async with running_worker(registry, dsn):
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.dead_jobs")

    run(main)
    ((errors,),) = fetch(dsn, "SELECT errors FROM pgqueue.dead_jobs")
    assert errors[0]["kind"] == "timeout"
    assert errors[0]["error"].startswith("timed out after 0.2s")
    assert "RuntimeError: cleanup failed" in errors[0]["error"]


def test_snooze_and_backoff_refuse_delays_beyond_ten_years():
    with pytest.raises(ValueError):
        Snooze(1e12)
    with pytest.raises(ValueError):
        Snooze(-1)
    with pytest.raises(ValueError):
        Backoff(max_seconds=1e300)
    with pytest.raises(ValueError):
        Snooze(timedelta(days=-1))


def test_snooze_takes_a_timedelta_and_refuses_what_is_not_a_number():
    assert Snooze(timedelta(minutes=5)).seconds == 300.0
    assert Snooze(Fraction(1, 4)).seconds == 0.25
    assert Snooze(Decimal("2.5")).seconds == 2.5
    with pytest.raises(ValueError):
        Snooze(Decimal("NaN"))
    for bad in ("60", True, None, [60]):
        with pytest.raises(TypeError, match="Snooze takes seconds"):
            Snooze(bad)  # type: ignore[arg-type]


def test_worker_started_before_migrate_waits_and_then_works(server_dsn):
    name = f"pgqueue_empty_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = psycopg.conninfo.make_conninfo(server_dsn, dbname=name)
    registry = Registry()
    ran: list[int] = []

    @registry.task(name="hello")
    def hello() -> None:
        ran.append(1)

    async def main() -> None:
        async with running_worker(registry, dsn, poll_interval=0.2):
            await asyncio.sleep(1.0)  # the schema is missing: the worker keeps trying
            from pgqueue import migrate

            await asyncio.to_thread(migrate, dsn)
            await asyncio.to_thread(sql_enqueue, dsn, "hello")
            await wait_for_db(
                dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded'", timeout=30
            )

    try:
        run(main)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert ran == [1]


def test_a_worker_on_a_database_behind_this_version_looks_again_at_its_poll(
    server_dsn, monkeypatch
):
    # Claiming nothing until `pgqueue migrate`, it asked again in a busy loop (its check
    # for rescued jobs, never made on that path, stayed due and its wait came to zero):
    # about 1,400 round trips a second, and a core of CPU.
    name = f"pgqueue_behind_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = psycopg.conninfo.make_conninfo(server_dsn, dbname=name)
    migrate_module = sys.modules["pgqueue.migrate"]  # pgqueue.migrate is also a function
    shipped = migrate_module.load_migrations()
    with monkeypatch.context() as m:
        m.setattr(migrate_module, "load_migrations", lambda: shipped[:-1])
        migrate_module.migrate(dsn)
    asked: list[float] = []
    real = store.applied_versions_async

    async def counted(conn: Any) -> Any:
        asked.append(time.monotonic())
        return await real(conn)

    monkeypatch.setattr(store, "applied_versions_async", counted)

    async def main() -> None:
        async with running_worker(Registry(), dsn, poll_interval=0.5) as worker:
            await asyncio.sleep(2.0)
            assert worker._schema.behind

    try:
        run(main)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    # Once at the start (plus the listener's wake-up and the heartbeat), then every 0.5 s.
    assert 2 <= len(asked) <= 10, len(asked)


def test_poll_finds_a_job_whose_notification_was_missed(dsn):
    registry = Registry()

    @registry.task(name="quiet")
    def quiet() -> None: ...

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE pgqueue.jobs DISABLE TRIGGER jobs_notify_inserted")

    async def main() -> None:
        async with running_worker(registry, dsn, poll_interval=0.3) as worker:
            await asyncio.wait_for(worker.listener.connected.wait(), 10)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(sql_enqueue, dsn, "quiet")  # no NOTIFY is sent
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded'")

    run(main)


def test_a_rescued_job_runs_alone_and_is_not_starved_by_a_busy_worker(dsn):
    registry = Registry()
    lock = threading.Lock()
    active: set[str] = set()
    seen_beside_rescued: set[str] = set()

    def track(name: str, seconds: float) -> None:
        with lock:
            active.add(name)
            if "rescued" in active:
                seen_beside_rescued.update(active - {"rescued"})
        time.sleep(seconds)
        with lock:
            active.discard(name)

    @registry.task(name="busy")
    def busy(n: int) -> None:
        track(f"busy{n}", 0.1)

    @registry.task(name="rescued")
    def rescued() -> None:
        track("rescued", 0.5)

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pgqueue.jobs (task, args)"
            " SELECT 'busy', jsonb_build_object('n', g) FROM generate_series(1, 60) g"
        )
        # What the reaper leaves after a crash: queued, runnable, marked rescued.
        conn.execute("INSERT INTO pgqueue.jobs (task, rescued) VALUES ('rescued', true)")

    async def main() -> None:
        async with running_worker(registry, dsn, concurrency=4, poll_interval=0.2):
            await wait_for_db(
                dsn, "SELECT count(*) = 61 FROM pgqueue.jobs WHERE state = 'succeeded'"
            )

    run(main)
    # It ran, and nothing ran beside it in this worker.
    assert seen_beside_rescued == set()
    # Not starved: it ran before the backlog of 60 busy jobs (15 rounds of 0.1 s) was done.
    ((rescued_end, last_busy_end),) = fetch(
        dsn,
        "SELECT (SELECT finished_at FROM pgqueue.jobs WHERE task = 'rescued'),"
        " (SELECT max(finished_at) FROM pgqueue.jobs WHERE task = 'busy')",
    )
    assert rescued_end < last_busy_end


async def until_one_drains_for_a_rescued_job(*workers: Worker) -> Worker:
    """Wait until each of these busy workers made its check for rescued jobs and exactly
    one drains for the one waiting; return one whose turn is later."""
    deadline = time.monotonic() + 10
    while True:
        draining = [w for w in workers if w._rescue_pending]
        later = [w for w in workers if w._rescue_seen]
        if len(draining) == 1 and len(later) == len(workers) - 1:
            return later[0]
        assert time.monotonic() < deadline, [(w._rescue_pending, w._rescue_seen) for w in workers]
        await asyncio.sleep(0.02)


def execute(dsn: str, statement: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)  # type: ignore[call-overload]


def long_jobs_registry(releases: dict[str, threading.Event], *, rescued: bool = True) -> Registry:
    """A registry whose task "long" runs until ``releases[queue]`` is set, and (unless
    told not to) a task "rescued" of queue "shared" that does nothing."""
    registry = Registry()

    @registry.task(name="long")
    def long_job(queue: str) -> None:
        releases[queue].wait(30)

    if rescued:
        registry.task(name="rescued", queue="shared")(lambda: None)
    return registry


def run_releasing(main: Callable[[], Any], releases: dict[str, threading.Event]) -> None:
    """run(main), then let every long job end, whatever happened."""
    try:
        run(main)
    finally:
        for event in releases.values():
            event.set()


@asynccontextmanager
async def two_busy_workers_and_a_rescued_job(
    dsn: str, registry: Registry, **options: Any
) -> AsyncIterator[dict[str, Worker]]:
    """Two workers, of queues "a" and "b", both serving "shared", each busy with a long job
    of its own queue; then a rescued job due in "shared", announced as the reaper does.
    The workers by their own queue."""
    async with (
        running_worker(registry, dsn, queues=("a", "shared"), **options) as wa,
        running_worker(registry, dsn, queues=("b", "shared"), **options) as wb,
    ):
        await asyncio.to_thread(execute, dsn, "INSERT INTO pgqueue.jobs (task, queue, args)"
                                " VALUES ('long', 'a', '{\"queue\": \"a\"}'),"
                                " ('long', 'b', '{\"queue\": \"b\"}')")  # fmt: skip
        await wait_for_db(dsn, "SELECT count(*) = 2 FROM pgqueue.jobs WHERE state = 'running'")
        await wait_for_db(dsn, "SELECT count(*) = 2 FROM pgqueue.workers")
        # What the reaper leaves after a crash (queued, runnable, marked rescued), and says.
        await asyncio.to_thread(execute, dsn, "INSERT INTO pgqueue.jobs (task, queue, rescued)"
                                " VALUES ('rescued', 'shared', true);"
                                " SELECT pg_notify('pgqueue_jobs', ' rescued shared')")  # fmt: skip
        yield {"a": wa, "b": wb}


def test_one_busy_worker_at_a_time_drains_for_a_rescued_job(dsn):
    # Two workers, each busy with a long job of a queue of its own, both serving
    # "shared". A rescued job of "shared" is due: the worker whose turn it is drains for
    # it; the other goes on running "shared" jobs (before, both stopped claiming until a
    # long job ended). Then the rescued job runs alone.
    releases = {"a": threading.Event(), "b": threading.Event()}
    registry = long_jobs_registry(releases, rescued=False)
    lock = threading.Lock()
    active: set[str] = set()
    seen_beside_rescued: set[str] = set()

    @registry.task(name="short", queue="shared")
    def short(n: int) -> None:
        with lock:
            if "rescued" in active:
                seen_beside_rescued.add(f"short{n}")

    @registry.task(name="rescued", queue="shared")
    def rescued() -> None:
        with lock:
            active.add("rescued")
        time.sleep(0.3)
        with lock:
            active.discard("rescued")

    async def main() -> None:
        options: dict[str, Any] = {"concurrency": 4, "poll_interval": 0.2, "lease_seconds": 30}
        async with two_busy_workers_and_a_rescued_job(dsn, registry, **options) as workers:
            await until_one_drains_for_a_rescued_job(*workers.values())
            await asyncio.to_thread(execute, dsn, "INSERT INTO pgqueue.jobs (task, queue, args)"
                                    " SELECT 'short', 'shared', jsonb_build_object('n', g)"
                                    " FROM generate_series(1, 20) AS g")  # fmt: skip
            await wait_for_db(
                dsn,
                "SELECT count(*) = 20 FROM pgqueue.jobs"
                " WHERE task = 'short' AND state = 'succeeded'",
            )
            (rows,) = await asyncio.to_thread(
                fetch, dsn, "SELECT array_agg(state::text) FROM pgqueue.jobs WHERE task <> 'short'"
            )
            assert sorted(rows[0]) == ["queued", "running", "running"]
            for event in releases.values():
                event.set()
            await wait_for_db(
                dsn, "SELECT state = 'succeeded' FROM pgqueue.jobs WHERE task = 'rescued'"
            )

    run_releasing(main, releases)
    assert seen_beside_rescued == set()
    # It ran alone on its worker: no other job of that worker overlapped it.
    overlaps = fetch(
        dsn,
        "SELECT o.id FROM pgqueue.jobs AS r JOIN pgqueue.jobs AS o"
        " ON o.id <> r.id AND o.leased_by IS NULL AND r.task = 'rescued'"
        " AND o.attempted_at < r.finished_at AND o.finished_at > r.attempted_at"
        " AND o.history -> -1 ->> 'worker' = r.history -> -1 ->> 'worker'",
    )
    assert overlaps == []


def test_a_worker_whose_turn_to_drain_has_not_come_takes_the_rescued_job_once_idle(dsn):
    # Two busy workers serve "shared", where a rescued job is due: the one whose turn it
    # is drains, but its long job goes on. The other's long job ends: idle, it takes the
    # rescued job at once, not at its turn (a lease later) or its next poll.
    releases = {"a": threading.Event(), "b": threading.Event()}
    registry = long_jobs_registry(releases)

    async def main() -> None:
        options: dict[str, Any] = {"concurrency": 4, "poll_interval": 60, "lease_seconds": 30}
        async with two_busy_workers_and_a_rescued_job(dsn, registry, **options) as workers:
            # Each made its check: one drains for it, the other's turn is a lease away.
            later = await until_one_drains_for_a_rescued_job(*workers.values())
            (queue,) = [q for q, w in workers.items() if w is later]
            releases[queue].set()
            await wait_for_db(
                dsn, "SELECT state = 'succeeded' FROM pgqueue.jobs WHERE task = 'rescued'"
            )
            (rows,) = await asyncio.to_thread(
                fetch, dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'running'"
            )
            assert rows == (1,)  # the other long job still runs
            for event in releases.values():
                event.set()

    run_releasing(main, releases)


def test_a_busy_worker_drains_for_a_rescued_job_when_its_turn_comes(dsn):
    # Two busy workers serve "shared", where a rescued job is due: one drains at once, the
    # other a lease (2 s) later, though its next poll is a minute away and its long job
    # goes on.
    releases = {"a": threading.Event(), "b": threading.Event()}
    registry = long_jobs_registry(releases)

    async def main() -> None:
        options: dict[str, Any] = {"concurrency": 4, "poll_interval": 60, "lease_seconds": 2}
        async with two_busy_workers_and_a_rescued_job(dsn, registry, **options) as workers:
            later = await until_one_drains_for_a_rescued_job(*workers.values())
            deadline = time.monotonic() + 15
            while not later._rescue_pending:
                assert time.monotonic() < deadline, "its turn came and went"
                await asyncio.sleep(0.05)
            assert all(w._rescue_pending for w in workers.values())  # both drain now
            for event in releases.values():
                event.set()
            await wait_for_db(
                dsn, "SELECT state = 'succeeded' FROM pgqueue.jobs WHERE task = 'rescued'"
            )

    run_releasing(main, releases)


def test_worker_without_prepared_statements_runs_jobs(dsn):
    registry = Registry()

    @registry.task(name="plain")
    def plain() -> None: ...

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO pgqueue.jobs (task) SELECT 'plain' FROM generate_series(1, 30)")

    async def main() -> Worker:
        async with running_worker(registry, dsn, prepared_statements=False) as worker:
            await wait_for_db(
                dsn, "SELECT count(*) = 30 FROM pgqueue.jobs WHERE state = 'succeeded'"
            )
            return worker

    worker = run(main)
    # For PgBouncer in transaction mode: psycopg never prepares on these connections.
    assert worker.pool.kwargs["prepare_threshold"] is None


def test_args_no_python_can_decode_are_dead_lettered_and_spare_their_batch(dsn):
    registry = Registry()
    ran: list[int] = []

    @registry.task(name="t")
    def t(**kwargs: Any) -> None:
        ran.append(1)

    good = sql_enqueue(dsn, "t", {"ok": 1})
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Valid JSON for Postgres, but a 5,000-digit number: Python's decoder refuses it.
        bad = conn.execute(
            "SELECT pgqueue.enqueue('t', ('{\"n\": 1' || repeat('0', 5000) || '}')::jsonb)"
        ).fetchone()[0]

    async def main() -> None:
        async with running_worker(registry, dsn):
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.dead_jobs")
            await wait_for_db(
                dsn, "SELECT state = 'succeeded' FROM pgqueue.jobs WHERE id = %s", (good,)
            )

    run(main)
    ((dead_id, reason, attempts, errors),) = fetch(
        dsn, "SELECT id, reason, attempts, errors FROM pgqueue.dead_jobs"
    )
    assert (dead_id, reason, attempts) == (bad, "permanent", 1)
    assert errors[0]["kind"] == "bad_args" and "cannot be decoded" in errors[0]["error"]
    assert ran == [1]


def test_a_thread_still_running_a_timed_out_handler_is_not_handed_a_new_job(dsn):
    registry = Registry()
    ran: list[str] = []

    @registry.task(name="stuck", timeout=0.2, max_attempts=1)
    def stuck() -> None:
        time.sleep(1.5)  # outlives its timeout: the thread runs on

    @registry.task(name="quick", timeout=0.5, max_attempts=1)
    def quick() -> None:
        ran.append("quick")

    first = sql_enqueue(dsn, "stuck", max_attempts=1)

    async def main() -> None:
        async with running_worker(registry, dsn, concurrency=1):
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.dead_jobs")
            # The only pool thread is still busy: a job claimed now would time out waiting
            # for it without ever running. It must wait for the thread instead.
            await asyncio.to_thread(sql_enqueue, dsn, "quick", max_attempts=1)
            await wait_for_db(
                dsn,
                "SELECT count(*) FROM pgqueue.jobs WHERE task = 'quick' AND state = 'succeeded'",
            )

    run(main)
    assert ran == ["quick"]
    assert fetch(dsn, "SELECT id FROM pgqueue.dead_jobs") == [(first,)]


async def show_on_every_pool_connection(worker: Worker, setting: str) -> list[str]:
    """``SHOW setting`` on each of the worker pool's three connections, held at once."""
    values = []
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(3):
            conn = await stack.enter_async_context(worker.pool.connection())
            show = sql.SQL("SHOW {}").format(sql.Identifier(setting))
            row = await (await conn.execute(show)).fetchone()
            assert row is not None
            values.append(row[0])
    return values


@pytest.mark.parametrize("lease", [1.0, 30.0, 600.0])
def test_the_heartbeat_beats_three_times_a_lease(lease):
    # Found by a mutation audit: a beat once per lease was noticed only by a test of
    # cancel requests. Two beats may fail (a restart, a dead pooled connection) before
    # the lease is at risk.
    assert WorkerConfig(dsn="postgresql://", lease_seconds=lease).heartbeat_interval <= lease / 3


@pytest.mark.parametrize(
    ("config", "mode", "seqscan", "jit"),
    [
        ({}, "force_generic_plan", "off", "off"),
        ({"generic_plans": False}, "auto", "on", "on"),
        ({"prepared_statements": False}, "auto", "on", "on"),
    ],
)
def test_worker_connections_run_generic_plans_unless_told_not_to(dsn, config, mode, seqscan, jit):
    # Generic plans, kept for the connection's life, never scan the jobs table whatever
    # its size when they were made (store.NO_SEQ_SCANS, tests/test_queries.py); JIT is
    # off beside them (store.NO_JIT). The server's default jit is on.
    async def main() -> tuple[list[str], list[str], list[str]]:
        async with running_worker(Registry(), dsn, queues=("q",), **config) as worker:
            await asyncio.wait_for(worker.listener.connected.wait(), 10)
            return (
                await show_on_every_pool_connection(worker, "plan_cache_mode"),
                await show_on_every_pool_connection(worker, "enable_seqscan"),
                await show_on_every_pool_connection(worker, "jit"),
            )

    modes, seqscans, jits = run(main)
    assert set(modes) == {mode}
    assert set(seqscans) == {seqscan}
    assert set(jits) == {jit}


@pytest.mark.parametrize(
    ("config", "setting"),
    [
        ({}, "on"),
        ({"async_commit": True}, "off"),
        ({"async_commit": True, "prepared_statements": False}, "off"),
    ],
)
def test_worker_connections_commit_asynchronously_only_when_asked(dsn, config, setting):
    async def main() -> tuple[set[str], str]:
        async with running_worker(Registry(), dsn, queues=("q",), **config) as worker:
            await asyncio.wait_for(worker.listener.connected.wait(), 10)
            found = set(await show_on_every_pool_connection(worker, "synchronous_commit"))
        # Other sessions (producers here) keep the server's default.
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as other:
            row = await (await other.execute("SHOW synchronous_commit")).fetchone()
            assert row is not None
            return found, row[0]

    found, elsewhere = run(main)
    assert found == {setting}
    assert elsewhere == "on"


def test_a_cancelled_error_from_the_handler_itself_is_a_counted_failure(dsn):
    # Only the worker's own cancel (shutdown) releases a job. A CancelledError the handler
    # raises by itself used to be taken for one: released with its attempt given back, the
    # job ran again at once, without end, and never reached the dead-letter table.
    import concurrent.futures

    registry = Registry()
    runs = {"async": 0, "sync": 0}

    @registry.task(name="inner_cancel", max_attempts=2, backoff=FAST)
    async def inner_cancel() -> None:
        runs["async"] += 1
        sub = asyncio.create_task(asyncio.sleep(10))
        await asyncio.sleep(0)
        sub.cancel()
        await sub

    @registry.task(name="sync_cancel", max_attempts=2, backoff=FAST)
    def sync_cancel() -> None:
        runs["sync"] += 1
        raise concurrent.futures.CancelledError()

    sql_enqueue(dsn, "inner_cancel", max_attempts=2)
    sql_enqueue(dsn, "sync_cancel", max_attempts=2)

    async def main() -> None:
        async with running_worker(registry, dsn):
            await wait_for_db(dsn, "SELECT count(*) = 2 FROM pgqueue.dead_jobs")
            await asyncio.sleep(0.3)  # a looping job would run on meanwhile

    run(main)
    assert runs == {"async": 2, "sync": 2}
    rows = fetch(
        dsn,
        "SELECT task, attempts, reason, errors FROM pgqueue.dead_jobs ORDER BY task",
    )
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("inner_cancel", 2, "exhausted"),
        ("sync_cancel", 2, "exhausted"),
    ]
    for row in rows:
        assert [(e["kind"], e["error"]) for e in row[3]] == [("error", "CancelledError")] * 2
    assert fetch(dsn, "SELECT count(*) FROM pgqueue.jobs") == [(0,)]


def test_an_exception_whose_str_fails_still_gives_the_job_an_outcome(dsn):
    registry = Registry()

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise AttributeError("never set")

    class NotText(Exception):
        def __str__(self) -> Any:
            return 42

    @registry.task(name="unprintable", max_attempts=1)
    async def unprintable() -> None:
        raise Unprintable()

    @registry.task(name="not_text", max_attempts=1)
    def not_text() -> None:
        raise NotText()

    sql_enqueue(dsn, "unprintable", max_attempts=1)
    sql_enqueue(dsn, "not_text", max_attempts=1)

    async def main() -> None:
        async with running_worker(registry, dsn, lease_seconds=3):
            await wait_for_db(dsn, "SELECT count(*) = 2 FROM pgqueue.dead_jobs", timeout=10)

    run(main)
    rows = fetch(dsn, "SELECT task, errors FROM pgqueue.dead_jobs ORDER BY task")
    assert [(task, [e["error"] for e in errors]) for task, errors in rows] == [
        ("not_text", ["NotText: <str() raised TypeError>"]),
        ("unprintable", ["Unprintable: <str() raised AttributeError>"]),
    ]


def test_a_job_claimed_again_while_its_first_run_goes_on_counts_twice(dsn):
    # A claim's commit can be undone while the worker runs the job (a Postgres crash under
    # --async-commit, a failover); the worker may then claim it again. Both runs hold a
    # slot: the worker must not start more handlers than its concurrency.
    registry = Registry()
    live = 0
    peak = 0

    @registry.task(name="slow")
    async def slow(n: int) -> None:
        nonlocal live, peak
        live += 1
        peak = max(peak, live)
        try:
            await asyncio.sleep(2.0)
        finally:
            live -= 1

    first = sql_enqueue(dsn, "slow", {"n": 0})

    async def main() -> None:
        async with running_worker(registry, dsn, concurrency=2, poll_interval=0.2) as worker:
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'running'")
            with psycopg.connect(dsn, autocommit=True) as conn:  # the claim is undone
                conn.execute(
                    "UPDATE pgqueue.jobs SET state = 'queued', attempts = 0, lease_token = NULL,"
                    " lease_expires_at = NULL, leased_by = NULL, attempted_at = NULL"
                    " WHERE id = %s",
                    (first,),
                )
                conn.execute("SELECT pg_notify('pgqueue_jobs', 'default')")
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'running'")
            assert worker.running == 2  # both runs of the job hold a slot
            for n in range(1, 5):
                sql_enqueue(dsn, "slow", {"n": n})
            await wait_for_db(
                dsn,
                "SELECT count(*) = 5 FROM pgqueue.jobs WHERE state = 'succeeded'",
                timeout=20,
            )

    run(main)
    assert peak <= 2


def test_stop_releases_a_job_whose_handler_ignores_its_cancellation(dsn, monkeypatch):
    from pgqueue.worker import daemon

    monkeypatch.setattr(daemon, "CANCEL_GRACE_SECONDS", 0.5)
    registry = Registry()

    @registry.task(name="stubborn")
    async def stubborn() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(60)  # carries on: a handler bug shutdown must survive

    job_id = sql_enqueue(dsn, "stubborn")

    async def main() -> None:
        async with running_worker(registry, dsn, shutdown_timeout=0.2) as worker:
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'running'")
        assert worker.stubborn_handlers == 1

    started = time.monotonic()
    run(main)
    assert time.monotonic() - started < 15
    rows = fetch(dsn, "SELECT id, state, attempts, lease_token FROM pgqueue.jobs")
    assert rows == [(job_id, "queued", 0, None)]


@pytest.mark.parametrize(
    "settings",
    [
        {"lease_seconds": 3e11},
        {"lease_seconds": float("nan")},
        {"lease_seconds": float("inf")},
        {"shutdown_timeout": float("nan")},
        {"poll_interval": float("inf")},
        {"lease_seconds": 10**400},  # math.isfinite raised OverflowError
        # 3e9 passed, and every heartbeat then failed on workers.concurrency (an int).
        {"concurrency": 3_000_000_000},
        {"concurrency": True},
        # A queue name the claim cannot send: every claim failed, for every queue.
        {"queues": ("ok", "\udcff")},
        {"queues": ("a\x00",)},
        # A string would be served as one-letter queues ("e", "m", ...).
        {"queues": "emails"},
        # DSNs that can never connect: the daemons retried them for ever.
        {"dsn": "garbage=="},
        {"dsn": "postgresql://h:notaport/db"},
        {"dsn": "host=h port=99999"},
    ],
)
def test_worker_settings_out_of_range_are_refused(settings):
    # A lease of 3e11 s used to pass: every claim then failed to decode its lease's
    # expiry (past year 9999), and the jobs stayed running for millennia.
    with pytest.raises(ConfigError):
        WorkerConfig(**{"dsn": "postgresql://x", **settings}).validate()


def test_worker_queues_may_be_any_sequence_of_names():
    # Typed tuple[str, ...], a list was refused by a type checker though it worked.
    config = WorkerConfig(dsn="postgresql://x", queues=["emails", "default"]).validate()
    assert config.queues == ("emails", "default")


@pytest.mark.parametrize(
    "settings",
    [
        {"retention_seconds": float("inf")},
        {"retention_seconds": float("nan")},
        {"retention_seconds": 1e13},
        {"interval": float("nan")},
        {"backoff_max_seconds": float("inf")},
        {"interval": 10**400},
        {"batch_size": 10**10},
        {"prune_seconds_per_pass": 0},
        {"prune_seconds_per_pass": float("nan")},
        {"prune_seconds_per_pass": float("inf")},
        {"dsn": "garbage=="},
    ],
)
def test_reaper_settings_out_of_range_are_refused(settings):
    # --retention-seconds inf used to pass, and then every pass failed at its prune step
    # and never got to forgetting dead workers.
    with pytest.raises(ConfigError):
        ReaperConfig(**{"dsn": "postgresql://x", **settings}).validate()


@pytest.mark.parametrize(
    "argv",
    [
        ["reaper", "--once", "--retention-seconds", "inf"],
        ["reaper", "--once", "--retention-seconds", "nan"],
        ["worker", "--app", "tests.apps.sample:registry", "--lease-seconds", "3e11"],
    ],
)
def test_daemon_options_out_of_range_fail_with_one_line(dsn, argv):
    result = subprocess.run(
        [sys.executable, "-m", "pgqueue", *argv, "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ten years" in lines[0], result.stderr


@pytest.mark.parametrize(
    "dsn",
    [
        "host=h port=+5432",
        "host=h port=' 5432 '",
        "host=h1,h2 port=5432,",
        "postgresql://u:p%3Dq@[::1]:5432,h2/db",
        "postgresql://%2Fvar%2Frun%2Fpostgresql/db",
        "service=pgqueue",
        "host=h password=a=b==c",
        "host=/tmp/a@b",  # a Unix socket's directory may hold an '@'
    ],
)
def test_connection_strings_libpq_takes_are_taken(dsn):
    WorkerConfig(dsn=dsn).validate()
    ReaperConfig(dsn=dsn).validate()


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app:100%SECRET@db/app",  # a '%' not percent-encoded
        "postgresql://app:Sup3r@SECRET@db.invalid/app",  # an '@' not percent-encoded
        "postgresql://app:pa/ssSECRET@db/app",  # a '/' not percent-encoded
        "postgresql://app:SECRET@[]/db",
        "host=db password=correct horse SECRET",  # spaces not quoted
        "host=db password='SECRET",
        'host=db password=SEC RET"SECRET',  # quoted parts' ends unknowable
    ],
)
def test_a_bad_connection_string_is_refused_without_quoting_its_password(dsn):
    # Found by a security review: libpq's message quoted the part it could not read (or
    # the whole URI), and a password's rest after an '@' became a host name that every
    # failed connection of a daemon logged, and /healthz served.
    for config in (WorkerConfig(dsn=dsn), ReaperConfig(dsn=dsn)):
        with pytest.raises(ConfigError, match=r"^bad connection string: ") as error:
            config.validate()
        assert "SECRET" not in str(error.value).upper()
        assert "percent-encoded" in str(error.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["worker", "--app", "tests.apps.sample:registry"],
        ["reaper", "--once"],
        ["migrate"],
        ["stats"],
    ],
)
def test_a_connection_string_that_cannot_work_fails_with_one_line(argv):
    result = subprocess.run(
        [sys.executable, "-m", "pgqueue", *argv, "--dsn", "host=127.0.0.1 port=notaport"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad connection string" in lines[0], result.stderr


async def _task_group_whose_child_fails_late() -> None:
    """On Python 3.11 this leaves the task's cancelling() count at 1 (the group cancels
    its parent task after the body ended, and never undoes it once it is done)."""

    async def fail_later() -> None:
        await asyncio.sleep(0.01)
        raise ValueError("child")

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(fail_later())
    except* ValueError:
        pass


def test_a_handler_after_a_task_group_still_fails_and_times_out_as_counted_attempts(dsn):
    # Telling the worker's own cancel by Task.cancelling() took these for a shutdown: the
    # jobs were released, their attempts given back, and they ran again without end.
    registry = Registry()
    runs = {"cancel": 0, "overrun": 0}

    @registry.task(name="group_then_cancel", max_attempts=2, backoff=FAST)
    async def group_then_cancel() -> None:
        runs["cancel"] += 1
        await _task_group_whose_child_fails_late()
        sub = asyncio.create_task(asyncio.sleep(10))
        await asyncio.sleep(0)
        sub.cancel()
        await sub

    @registry.task(name="group_then_overrun", max_attempts=2, backoff=FAST, timeout=0.2)
    async def group_then_overrun() -> None:
        runs["overrun"] += 1
        await _task_group_whose_child_fails_late()
        await asyncio.sleep(5)

    sql_enqueue(dsn, "group_then_cancel", max_attempts=2)
    sql_enqueue(dsn, "group_then_overrun", max_attempts=2)

    async def main() -> None:
        async with running_worker(registry, dsn):
            await wait_for_db(dsn, "SELECT count(*) = 2 FROM pgqueue.dead_jobs")
            await asyncio.sleep(0.3)

    run(main)
    assert runs == {"cancel": 2, "overrun": 2}
    rows = fetch(dsn, "SELECT task, attempts, errors FROM pgqueue.dead_jobs ORDER BY task")
    assert [(t, a, [e["kind"] for e in errors]) for t, a, errors in rows] == [
        ("group_then_cancel", 2, ["error", "error"]),
        ("group_then_overrun", 2, ["timeout", "timeout"]),
    ]


async def claimed_twice(pool: Any, job_id: int) -> tuple[Any, Any]:
    """Two attempts of one job held by worker "w": claimed, the claim undone (as a
    Postgres crash under --async-commit can), claimed again. Returns (stale, fresh)."""
    async with pool.connection() as conn:
        (stale,) = await store.claim_jobs(
            conn, queues=["default"], limit=1, worker_id="w", lease_seconds=30
        )
        await conn.execute(
            "UPDATE pgqueue.jobs SET state = 'queued', lease_token = NULL,"
            " lease_expires_at = NULL, attempts = 0 WHERE id = %s",
            (job_id,),
        )
        (fresh,) = await store.claim_jobs(
            conn, queues=["default"], limit=1, worker_id="w", lease_seconds=30
        )
    return stale, fresh


def test_two_outcomes_of_one_job_in_a_batch_are_reported_each_by_its_own_lease(dsn):
    # A claim's commit undone (a crash under --async-commit, a failover) lets a worker
    # claim a job again while its first run goes on; both runs' outcomes can meet in one
    # batch. The writes say which ids changed, so the stale run's outcome was reported
    # written too (logs and metrics of an outcome that was fenced off).
    from psycopg_pool import AsyncConnectionPool

    from pgqueue.models import Outcome, OutcomeKind
    from pgqueue.worker.completer import Completer, WriteResult

    job_id = sql_enqueue(dsn, "t")

    async def main() -> tuple[uuid.UUID, uuid.UUID, dict[uuid.UUID, WriteResult]]:
        reports: dict[uuid.UUID, WriteResult] = {}
        pool = AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False,
                                   kwargs={"autocommit": True})  # fmt: skip
        await pool.open()
        try:
            stale, fresh = await claimed_twice(pool, job_id)
            completer = Completer(
                pool,
                lambda o, result, state, _dead_id: reports.__setitem__(o.job.lease_token, result),
                worker_id="w",
                reconnect_max_seconds=1.0,
            )
            completer.submit(Outcome(stale, OutcomeKind.SUCCEEDED, 0.01))
            completer.submit(Outcome(fresh, OutcomeKind.SUCCEEDED, 0.01))
            assert await completer.flush(10)
            return stale.lease_token, fresh.lease_token, reports
        finally:
            await pool.close()

    stale, fresh, reports = run(main)
    rows = fetch(dsn, "SELECT state, lease_token FROM pgqueue.jobs WHERE id = %s", (job_id,))
    assert rows == [("succeeded", None)]
    assert reports == {stale: WriteResult.FENCED, fresh: WriteResult.WRITTEN}


def test_a_beat_holding_two_attempts_of_one_job_finds_the_stale_one_lost(dsn):
    # A claim's commit undone (a crash under --async-commit) lets a worker claim a job
    # again while its first run goes on: it then holds two attempts of one job. The beat's
    # result was keyed by job id, so the fresh lease's extension counted for the stale
    # attempt too: its loss went unseen (its handler kept running, not told) until its
    # outcome was fenced off.
    from psycopg_pool import AsyncConnectionPool

    from pgqueue.models import Job
    from pgqueue.worker.heartbeat import Heartbeat

    job_id = sql_enqueue(dsn, "t")

    async def main() -> tuple[Job, Job, list[Job], int]:
        lost: list[Job] = []
        pool = AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False,
                                   kwargs={"autocommit": True})  # fmt: skip
        await pool.open()
        try:
            stale, fresh = await claimed_twice(pool, job_id)

            async def register(_conn: Any) -> None:
                return None

            heartbeat = Heartbeat(
                pool,
                lambda: [stale, fresh],
                lambda _jobs: set(),
                lost.extend,
                register,
                interval=10.0,
                lease_seconds=30.0,
                worker_id="w",
                claiming=asyncio.Lock(),
                refused=lambda: [],
            )
            extended, _ = await heartbeat.run_once()
            return stale, fresh, lost, extended
        finally:
            await pool.close()

    stale, fresh, lost, extended = run(main)
    assert stale.id == fresh.id == job_id and stale.lease_token != fresh.lease_token
    assert extended == 1
    assert lost == [stale]


def test_heartbeat_retries_soon_after_its_connections_die_and_keeps_a_running_lease(dsn):
    # Every pooled connection dies at once (a Postgres restart, terminated backends). The
    # pool hands each dead one out once; a heartbeat waiting a whole interval per failure
    # failed three beats in a row, and the reaper requeued a job that was running fine.
    registry = Registry()
    runs: list[int] = []

    @registry.task(name="long")
    async def long() -> None:
        runs.append(1)
        await asyncio.sleep(6)

    job_id = sql_enqueue(dsn, "long")

    async def main() -> None:
        async with running_worker(registry, dsn, lease_seconds=3, concurrency=1):
            await wait_for_db(dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'running'")
            await asyncio.sleep(0.5)
            fetch(
                dsn,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            reaper = Reaper(ReaperConfig(dsn=dsn))
            try:
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    result = await asyncio.to_thread(reaper.run_once)
                    assert result.requeued == [], "a running job's lease expired"
                    if fetch(dsn, "SELECT state FROM pgqueue.jobs WHERE id = %s", (job_id,)) == [
                        ("succeeded",)
                    ]:
                        break
                    await asyncio.sleep(0.5)
            finally:
                reaper._close()

    run(main)
    assert runs == [1]
    assert fetch(dsn, "SELECT state, attempts FROM pgqueue.jobs") == [("succeeded", 1)]


@contextlib.contextmanager
def row_locked(dsn: str, job_id: int, clause: Literal["FOR UPDATE", "FOR SHARE"]) -> Iterator[None]:
    """Another session holds the job's row locked, in an open transaction."""
    holder = psycopg.connect(dsn)
    try:
        holder.execute(
            sql.SQL("SELECT 1 FROM pgqueue.jobs WHERE id = %s {}").format(sql.SQL(clause)),
            (job_id,),
        )
        yield
    finally:
        holder.rollback()
        holder.close()


async def assert_never_requeued(dsn: str, job_id: int, seconds: float = 4.5) -> None:
    """Reaper passes for ``seconds`` (past a 3 s lease): none may requeue ``job_id``."""
    reaper = Reaper(ReaperConfig(dsn=dsn))
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            result = await asyncio.to_thread(reaper.run_once)
            assert job_id not in result.requeued, "a running job's lease expired"
            await asyncio.sleep(0.5)
    finally:
        reaper._close()


def test_a_row_lock_on_one_job_does_not_hold_back_the_other_leases(dsn):
    # The heartbeat's one UPDATE waited for any locked row: a session holding one job's
    # row (an open SELECT ... FOR UPDATE) kept every lease of the worker from being
    # extended, and past their expiry the reaper requeued jobs that were running fine.
    # The locked job itself keeps its lease too: the heartbeat took it for lost, dropped
    # its result and released it as an orphan, and it ran a second time.
    registry = Registry()
    runs: list[int] = []

    @registry.task(name="long")
    async def long(n: int) -> None:
        runs.append(n)
        await asyncio.sleep(6)

    locked = sql_enqueue(dsn, "long", {"n": 1})
    free = sql_enqueue(dsn, "long", {"n": 2})

    async def main() -> None:
        async with running_worker(registry, dsn, lease_seconds=3, concurrency=2):
            await wait_for_db(dsn, "SELECT count(*) = 2 FROM pgqueue.jobs WHERE state = 'running'")
            with row_locked(dsn, locked, "FOR UPDATE"):
                await assert_never_requeued(dsn, free)
            await wait_for_db(
                dsn,
                "SELECT state = 'succeeded' FROM pgqueue.jobs WHERE id = %s",
                (free,),
                timeout=15,
            )
            await wait_for_db(
                dsn,
                "SELECT state = 'succeeded' FROM pgqueue.jobs WHERE id = %s",
                (locked,),
                timeout=15,
            )

    with structlog.testing.capture_logs() as logs:
        run(main)
    assert fetch(dsn, "SELECT attempts FROM pgqueue.jobs WHERE id = %s", (free,)) == [(1,)]
    ((attempts, history),) = fetch(
        dsn, "SELECT attempts, history FROM pgqueue.jobs WHERE id = %s", (locked,)
    )
    assert attempts == 1
    assert [h["outcome"] for h in history] == ["succeeded"]
    assert sorted(runs) == [1, 2]
    events = {e["event"] for e in logs}
    assert "heartbeat.rows_locked" in events
    assert not events & {"lease.lost", "jobs.orphans_released"}


def test_an_outcome_waiting_for_a_row_lock_does_not_hold_back_the_other_leases(dsn):
    # The completer held a lock the heartbeat shares while its statement waited for a row
    # lock (a session holding a finished job's row: FOR SHARE, or a foreign key's KEY
    # SHARE against a dead-letter move): no lease of the worker was extended, and past
    # their expiry the reaper requeued every job it was running.
    registry = Registry()

    @registry.task(name="short")
    async def short() -> None:
        await asyncio.sleep(0.5)

    @registry.task(name="long")
    async def long() -> None:
        await asyncio.sleep(6)

    finished = sql_enqueue(dsn, "short")
    running = sql_enqueue(dsn, "long")

    async def main() -> None:
        async with running_worker(registry, dsn, lease_seconds=3, concurrency=2):
            await wait_for_db(dsn, "SELECT count(*) = 2 FROM pgqueue.jobs WHERE state = 'running'")
            with row_locked(dsn, finished, "FOR SHARE"):
                # The short job's outcome now waits for that lock.
                await wait_for_db(
                    dsn,
                    "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND query LIKE %s",
                    ("%Marks jobs succeeded%",),
                )
                await assert_never_requeued(dsn, running)
            await wait_for_db(
                dsn,
                "SELECT count(*) = 2 FROM pgqueue.jobs WHERE state = 'succeeded'",
                timeout=15,
            )

    run(main)
    assert fetch(dsn, "SELECT attempts, rescued FROM pgqueue.jobs WHERE id = %s", (running,)) == [
        (1, False)
    ]


def test_the_heartbeat_keeps_the_lease_of_a_job_whose_outcome_is_not_written_yet(dsn, monkeypatch):
    # Found by a mutation audit: a heartbeat that extended only the running jobs' leases
    # left a finished job whose outcome waited to be written unleased: it was released
    # as an orphan (or requeued by the reaper once its lease expired) and ran again.
    registry = Registry()
    runs: list[int] = []

    @registry.task(name="quick")
    async def quick() -> None:
        runs.append(1)

    job_id = sql_enqueue(dsn, "quick")
    real_complete = store.complete_jobs

    async def slow_write(conn: Any, **kw: Any) -> Any:
        await asyncio.sleep(3)  # twice the lease
        return await real_complete(conn, **kw)

    monkeypatch.setattr(store, "complete_jobs", slow_write)

    async def main() -> None:
        async with running_worker(registry, dsn, lease_seconds=1.5):
            await wait_for_db(dsn, "SELECT attempts FROM pgqueue.jobs WHERE id = %s", (job_id,))
            await assert_never_requeued(dsn, job_id, seconds=2.5)
            await wait_for_db(
                dsn, "SELECT state = 'succeeded' FROM pgqueue.jobs WHERE id = %s", (job_id,)
            )

    with structlog.testing.capture_logs() as logs:
        run(main)
    ((attempts, history),) = fetch(
        dsn, "SELECT attempts, history FROM pgqueue.jobs WHERE id = %s", (job_id,)
    )
    assert attempts == 1
    assert [h["outcome"] for h in history] == ["succeeded"]
    assert runs == [1]
    assert not {e["event"] for e in logs} & {"lease.lost", "jobs.orphans_released"}


def test_a_thread_left_by_another_timed_out_job_does_not_hold_back_a_rescued_job(dsn):
    # Isolation waits for the rescued job's own thread; waiting for every thread a
    # timed-out handler left stopped the worker for as long as one stayed blocked.
    registry = Registry()
    unblock = threading.Event()

    @registry.task(name="blocked", timeout=0.3)
    def blocked() -> None:
        unblock.wait(30)

    @registry.task(name="ok")
    def ok() -> None:
        pass

    stuck = sql_enqueue(dsn, "blocked")

    async def main() -> None:
        async with running_worker(registry, dsn, concurrency=4, poll_interval=0.2) as worker:
            await wait_for_db(
                dsn,
                "SELECT state = 'queued' AND attempts = 1 FROM pgqueue.jobs WHERE id = %s",
                (stuck,),
            )  # timed out (retried later), its thread still blocked
            assert worker.executor.abandoned == 1
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("UPDATE pgqueue.jobs SET run_at = now() + interval '1 hour'")
                conn.execute(
                    "INSERT INTO pgqueue.jobs (task, rescued, attempts) VALUES ('ok', true, 1)"
                )
            for _ in range(5):
                sql_enqueue(dsn, "ok")
            try:
                await wait_for_db(
                    dsn,
                    "SELECT count(*) = 6 FROM pgqueue.jobs WHERE task = 'ok'"
                    " AND state = 'succeeded'",
                    timeout=10,
                )
            finally:
                unblock.set()

    run(main)


def test_a_rescued_job_whose_thread_runs_on_after_its_timeout_makes_the_worker_unhealthy(dsn):
    # After a rescued job ran alone, claims wait for its thread to end (it might kill the
    # process): a thread that ran on for good held the worker idle with /healthz 200.
    registry = Registry()
    unblock = threading.Event()

    @registry.task(name="hangs", timeout=0.3, max_attempts=1)
    def hangs() -> None:
        unblock.wait(30)

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pgqueue.jobs (task, rescued, attempts, max_attempts)"
            " VALUES ('hangs', true, 1, 2)"
        )

    async def main() -> None:
        async with running_worker(
            registry, dsn, concurrency=4, lease_seconds=1, poll_interval=0.2
        ) as worker:
            try:
                await wait_for_db(dsn, "SELECT count(*) = 1 FROM pgqueue.dead_jobs")
                sql_enqueue(dsn, "hangs")  # waits: the tail holds every claim back
                deadline = time.monotonic() + 10
                while worker.slots_held_for() <= 1.0:  # the lease
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                healthy, reason = worker.health()
                assert not healthy and "claims held back" in reason, reason
                queued = "SELECT count(*) FROM pgqueue.jobs WHERE state = 'queued'"
                assert fetch(dsn, queued) == [(1,)]
            finally:
                unblock.set()
            await wait_for_db(
                dsn, "SELECT count(*) = 1 FROM pgqueue.jobs WHERE state = 'succeeded'"
            )
            assert worker.slots_held_for() == 0.0
            deadline = time.monotonic() + 10
            while worker.health() != (True, "ok"):  # a late heartbeat may say otherwise
                assert time.monotonic() < deadline, worker.health()
                await asyncio.sleep(0.1)

    run(main)


def test_a_job_due_since_the_last_claim_wakes_the_idle_worker_at_once(dsn):
    # A job falling due between the claim's now() and the next-due query's was in neither:
    # the worker slept until the next poll (3.26 s late at --poll-interval 5 in the report).
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pgqueue.jobs (task, run_at) VALUES ('t', now() - interval '0.5 s')"
        )

    async def main() -> tuple[float, float]:
        worker = Worker(Registry(), WorkerConfig(dsn=dsn, poll_interval=5.0))
        await worker.pool.open(wait=True)
        try:
            loop = asyncio.get_running_loop()
            # The claim went out 1 s ago, before the job fell due: it is due now.
            after_claim = await worker._idle_timeout(loop.time() - 1.0)
            # A claim sent just now saw it (it was due then): not counted again.
            stale = await worker._idle_timeout(loop.time())
            return after_claim, stale
        finally:
            await worker.pool.close()
            worker.executor.shutdown()

    after_claim, stale = run(main)
    assert after_claim < 0.01
    assert stale == 5.0


def test_a_foreign_key_share_lock_on_a_running_job_does_not_stop_its_heartbeat(dsn):
    # A handler (or anything) inserting a row that references pgqueue.jobs(id) holds a KEY
    # SHARE lock on the job until it commits. The heartbeat's lock must not conflict with
    # it (FOR NO KEY UPDATE, as its UPDATE takes), or the lease goes unextended.
    token = uuid.uuid4()
    with psycopg.connect(dsn, autocommit=True) as conn:
        job_id = conn.execute(
            "INSERT INTO pgqueue.jobs (task, state, lease_token, lease_expires_at, leased_by,"
            " attempts) VALUES ('t', 'running', %s, now() + interval '5 seconds', 'w', 1)"
            " RETURNING id",
            (token,),
        ).fetchone()[0]  # type: ignore[index]
        conn.execute("CREATE TABLE public.job_results (job_id bigint REFERENCES pgqueue.jobs (id))")
    holder = psycopg.connect(dsn)
    try:
        holder.execute("INSERT INTO public.job_results VALUES (%s)", (job_id,))

        async def beat() -> tuple[dict[uuid.UUID, bool], set[uuid.UUID]]:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                return await store.heartbeat_leases(
                    conn, ids=[job_id], tokens=[token], lease_seconds=600.0
                )

        assert run(beat) == ({token: False}, set())
    finally:
        holder.rollback()
        holder.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE public.job_results")


@pytest.mark.parametrize(
    "options",
    [
        {"max_attempts": 1.5},
        {"max_attempts": True},
        {"max_attempts": 2**40},
        {"max_attempts": 0},
        {"priority": True},
        {"priority": "5"},
        {"priority": 40000},
        {"timeout": "5"},
        {"timeout": True},
        {"timeout": float("nan")},
        {"timeout": 0},
        {"timeout": timedelta(0)},
        {"timeout": timedelta(seconds=-5)},
        {"backoff": 5},
    ],
)
def test_bad_task_options_are_refused_at_registration(options):
    # Accepted before (or a TypeError), and then every enqueue of the task failed.
    with pytest.raises(ConfigError):
        Registry().task(name="t", **options)


def test_a_task_timeout_may_be_a_timedelta():
    # As Snooze and enqueue's delay take one; it was refused with a ConfigError.
    registry = Registry()

    @registry.task(name="t", timeout=timedelta(minutes=1, milliseconds=500))
    def t() -> None: ...

    @registry.task(timeout=timedelta(seconds=2))
    def bare() -> None: ...

    assert registry.get("t").options.timeout == 60.5
    assert bare.options.timeout == 2.0


@pytest.mark.parametrize("own", [None, "keepalives_idle=60"])
def test_daemon_connections_detect_a_dead_peer_unless_the_dsn_says_otherwise(dsn, own):
    # Without keepalives a connection whose peer vanished without a reset (a network cut)
    # is only noticed when TCP gives up, and an idle LISTEN connection never.
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    base = make_conninfo(dsn, **conninfo_to_dict(own)) if own else dsn
    expected = {
        "keepalives": "1",
        "keepalives_idle": "60" if own else "10",
        "keepalives_interval": "5",
        "keepalives_count": "3",
        "tcp_user_timeout": "30000",
        "connect_timeout": "10",
    }

    # A PGCONNECT_TIMEOUT in the environment is the user's setting, as the DSN's is.
    from pgqueue.config import with_tcp_defaults

    with pytest.MonkeyPatch.context() as env:
        env.setenv("PGCONNECT_TIMEOUT", "3")
        assert "connect_timeout" not in conninfo_to_dict(with_tcp_defaults(base))

    def settings(conninfo: str) -> dict[str, str]:
        given = conninfo_to_dict(conninfo)
        return {k: str(given.get(k)) for k in expected}

    async def main() -> list[dict[str, str]]:
        async with running_worker(Registry(), base) as worker:
            await asyncio.wait_for(worker.listener.connected.wait(), 10)
            async with worker.pool.connection() as conn:
                pooled = conn.info.dsn
            assert worker.listener._conn is not None
            return [settings(pooled), settings(worker.listener._conn.info.dsn)]

    seen = run(main)
    reaper = Reaper(ReaperConfig(dsn=base))
    seen.append(settings(reaper._connection().info.dsn))
    reaper._connection().close()
    assert seen == [expected] * 3


def test_backoff_doubles_from_its_base_stops_at_its_cap_and_jitters_within_bounds():
    # Found by a mutation audit: a linear, uncapped or off-by-one Backoff passed every test.
    plain = Backoff(base_seconds=1, max_seconds=100, jitter=0)
    assert [plain.delay(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 64, 100, 100]
    assert plain.delay(0) == plain.delay(-3) == 1  # attempts below 1 count as the first
    jittered = Backoff(base_seconds=4, max_seconds=3600, jitter=0.25)
    assert jittered.delay(1, rand=lambda: 0.0) == 3.0
    assert jittered.delay(1, rand=lambda: 0.5) == 4.0
    assert 4.0 < jittered.delay(1, rand=lambda: 0.999999) < 5.0
    assert jittered.delay(3, rand=lambda: 0.5) == 16.0


def test_a_stopping_worker_finishes_its_job_and_claims_no_more(dsn):
    # Found by a mutation audit: a worker that went on claiming after the stop signal
    # passed every test but the long fault run.
    registry = Registry()
    started = threading.Event()

    @registry.task(name="slow")
    async def slow() -> None:
        started.set()
        await asyncio.sleep(1.0)

    @registry.task(name="next")
    async def next_job() -> None:
        return None

    running = sql_enqueue(dsn, "slow")
    waiting = sql_enqueue(dsn, "next", priority=1)  # after the slow one

    async def main() -> None:
        worker = Worker(registry, WorkerConfig(dsn=dsn, concurrency=1, poll_interval=0.2))
        task = asyncio.create_task(worker.run(handle_signals=False))
        await asyncio.wait_for(asyncio.to_thread(started.wait), 15)
        worker.stop()
        await asyncio.wait_for(task, 30)

    run(main)
    rows = dict(
        (r[0], r[1:]) for r in fetch(dsn, "SELECT id, state, attempts, history FROM pgqueue.jobs")
    )
    assert rows[running][:2] == ("succeeded", 1)
    assert rows[waiting] == ("queued", 0, [])


def steady_lease(dsn: str) -> WorkerConfig:
    """A 4 s lease beaten every 0.5 s: a lease that expires while the worker runs means
    beats were missed, not that the machine was busy for a moment."""
    return WorkerConfig(
        dsn=dsn, lease_seconds=4, heartbeat_seconds=0.5, shutdown_timeout=10, poll_interval=0.5
    )


def job_with_slow_outcomes(
    dsn: str, monkeypatch: pytest.MonkeyPatch, *, runs: float, writes: float
) -> tuple[Registry, threading.Event, int]:
    """A registry whose one task sets the event returned and runs ``runs`` seconds, its
    job enqueued, and outcomes taking ``writes`` seconds to write (a database answering
    slowly)."""
    registry = Registry()
    started = threading.Event()

    @registry.task(name="slow")
    async def slow() -> None:
        started.set()
        await asyncio.sleep(runs)

    real_complete = store.complete_jobs

    async def slow_write(conn: Any, **kw: Any) -> Any:
        await asyncio.sleep(writes)
        return await real_complete(conn, **kw)

    monkeypatch.setattr(store, "complete_jobs", slow_write)
    return registry, started, sql_enqueue(dsn, "slow")


def test_the_heartbeat_keeps_the_leases_while_the_shutdown_flush_writes_slowly(dsn, monkeypatch):
    # Found by a mutation audit: the heartbeat stopped before the final flush went
    # unnoticed. An outcome written slowly (a database under load) at the stop must keep
    # its lease until written, or the reaper requeues a job that succeeded.
    # Outcomes take 1.5 times the lease to write, during the shutdown flush. The lease
    # is 4 s with a beat every 0.5 s, so that only a missed beat (not a machine too busy
    # to answer for 2 s, as a CI run saw with a 2 s lease) lets it expire.
    registry, started, job_id = job_with_slow_outcomes(dsn, monkeypatch, runs=0.3, writes=6)
    reaper = Reaper(ReaperConfig(dsn=dsn))

    async def main() -> None:
        worker = Worker(registry, steady_lease(dsn))
        task = asyncio.create_task(worker.run(handle_signals=False))
        try:
            await asyncio.wait_for(asyncio.to_thread(started.wait), 15)
            worker.stop()
            while not task.done():
                result = await asyncio.to_thread(reaper.run_once)
                assert job_id not in result.requeued, "lease expired during the shutdown flush"
                await asyncio.sleep(0.3)
        finally:
            worker.stop()
            await asyncio.wait_for(task, 30)
            reaper._close()

    run(main)
    assert fetch(dsn, "SELECT state, attempts FROM pgqueue.jobs WHERE id = %s", (job_id,)) == [
        ("succeeded", 1)
    ]


def test_the_heartbeat_keeps_the_leases_through_a_graceful_shutdown(dsn):
    # Found by a mutation audit: a heartbeat stopped with the claims let the lease of a
    # job finishing within the shutdown timeout expire; the reaper requeued it, its
    # success was fenced off and it ran again elsewhere.
    registry = Registry()
    started = threading.Event()
    runs: list[int] = []

    @registry.task(name="slow")
    async def slow() -> None:
        runs.append(1)
        started.set()
        await asyncio.sleep(6)

    job_id = sql_enqueue(dsn, "slow")
    reaper = Reaper(ReaperConfig(dsn=dsn))

    async def main() -> None:
        worker = Worker(registry, steady_lease(dsn))
        task = asyncio.create_task(worker.run(handle_signals=False))
        try:
            await asyncio.wait_for(asyncio.to_thread(started.wait), 15)
            await asyncio.sleep(0.5)
            worker.stop()
            # Past the lease while the job runs on: reaper passes all along.
            while not task.done():
                result = await asyncio.to_thread(reaper.run_once)
                assert job_id not in result.requeued, "a running job's lease expired"
                await asyncio.sleep(0.3)
        finally:
            worker.stop()
            await asyncio.wait_for(task, 30)
            reaper._close()

    run(main)
    ((state, attempts, history),) = fetch(dsn, "SELECT state, attempts, history FROM pgqueue.jobs")
    assert (state, attempts) == ("succeeded", 1)
    assert [h["outcome"] for h in history] == ["succeeded"]
    assert runs == [1]


def test_a_claim_in_flight_when_the_stop_comes_is_run_not_left_running(dsn, monkeypatch):
    # Found by a mutation audit: a shutdown that cancelled the fetcher without waiting
    # for its claim left the claimed jobs running under a worker that was gone, until
    # their lease expired and the reaper took them for a dead worker's.
    registry = Registry()
    runs: list[int] = []

    @registry.task(name="quick")
    async def quick() -> None:
        runs.append(1)

    job_id = sql_enqueue(dsn, "quick")
    real_claim = store.claim_jobs
    claimed = asyncio.Event()

    async def slow_reply(conn: Any, **kw: Any) -> Any:
        jobs = await real_claim(conn, **kw)
        if jobs:
            claimed.set()
            await asyncio.sleep(0.5)  # the reply still on its way when the stop comes
        return jobs

    monkeypatch.setattr(store, "claim_jobs", slow_reply)

    async def main() -> None:
        worker = Worker(registry, WorkerConfig(dsn=dsn, poll_interval=0.5))
        task = asyncio.create_task(worker.run(handle_signals=False))
        try:
            await asyncio.wait_for(claimed.wait(), 15)
            worker.stop()
        finally:
            worker.stop()
            await asyncio.wait_for(task, 30)

    run(main)
    ((state, attempts, lease),) = fetch(
        dsn, "SELECT state, attempts, lease_token FROM pgqueue.jobs WHERE id = %s", (job_id,)
    )
    # Run within the shutdown's grace, or released; never left running.
    assert (state, attempts, lease, runs) in [("succeeded", 1, None, [1]), ("queued", 0, None, [])]


def test_the_shutdown_flush_writes_an_outcome_that_comes_at_the_stop(dsn, monkeypatch):
    # Found by a mutation audit: a shutdown flush given no time (flush(0)) gave up on
    # an outcome whose write was under way and the job was left running; no test wrote
    # outcomes slowly enough at shutdown to notice.
    registry, started, job_id = job_with_slow_outcomes(dsn, monkeypatch, runs=1.0, writes=0.2)

    async def main() -> None:
        worker = Worker(registry, WorkerConfig(dsn=dsn, shutdown_timeout=10, poll_interval=0.5))
        task = asyncio.create_task(worker.run(handle_signals=False))
        try:
            await asyncio.wait_for(asyncio.to_thread(started.wait), 15)
            worker.stop()
        finally:
            worker.stop()
            await asyncio.wait_for(task, 30)

    run(main)
    assert fetch(
        dsn, "SELECT state, attempts, lease_token FROM pgqueue.jobs WHERE id = %s", (job_id,)
    ) == [("succeeded", 1, None)]


def test_a_failed_shutdown_flush_counts_the_batch_in_flight_and_names_a_timeout():
    # The database unreachable at shutdown: the run loop's batch waits for a connection
    # (holding the write lock), and the flush behind it times out. Its error event must
    # count that batch (it said pending=0) and name the timeout (its str() is empty).
    from psycopg_pool import AsyncConnectionPool

    from pgqueue.models import Job, Outcome, OutcomeKind
    from pgqueue.worker.completer import Completer

    def outcome(job_id: int) -> Outcome:
        now = datetime.now(UTC)
        job = Job(job_id, "default", "t", {}, 0, 1, 3, now, now, uuid.uuid4(), now)
        return Outcome(job, OutcomeKind.SUCCEEDED)

    async def scenario() -> bool:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            "host=127.0.0.1 port=1 user=nobody connect_timeout=1",
            min_size=0, max_size=1, timeout=3, open=False,
        )  # fmt: skip
        await pool.open()
        completer = Completer(pool, lambda *_: None, worker_id="w", reconnect_max_seconds=1.0)
        try:
            completer.submit(outcome(1))
            completer.submit(outcome(2))
            run_loop = asyncio.create_task(completer.run_once())
            await asyncio.sleep(0.1)  # it took the batch and waits for a connection
            flushed = await completer.flush(0.5)
            with contextlib.suppress(Exception):
                await run_loop
            return flushed
        finally:
            await pool.close()

    with structlog.testing.capture_logs() as logs:
        assert asyncio.run(scenario()) is False
    (failed,) = [e for e in logs if e["event"] == "completer.flush_failed"]
    assert failed["pending"] == 2
    assert failed["error"] == "TimeoutError"


def test_a_stop_step_cut_short_is_cancelled_a_second_time_as_psycopg_needs():
    # psycopg, cancelled in a statement, asks the server to cancel it and waits for that
    # (up to 10 s against a database that does not answer); only a second cancellation
    # makes it drop the connection. A stop's steps were cancelled once.
    from pgqueue.worker.abort import finish_within, run_within

    cancellations: list[str] = []

    async def statement_no_one_answers() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancellations.append("first")
            try:
                await asyncio.sleep(60)  # psycopg's cancel request, unanswered too
            except asyncio.CancelledError:
                cancellations.append("second")
                raise

    async def answered() -> str:
        await asyncio.sleep(0.01)
        return "done"

    async def refused() -> None:
        raise psycopg.errors.UndefinedTable("no such table")

    async def scenario() -> None:
        task = asyncio.create_task(statement_no_one_answers())
        assert await finish_within(task, 0.05) is False
        assert task.cancelled() and cancellations == ["first", "second"]
        quick = asyncio.create_task(answered())
        assert await finish_within(quick, 30) is True and quick.result() == "done"
        assert await run_within(answered(), 30) == "done"
        with pytest.raises(TimeoutError):
            await run_within(statement_no_one_answers(), 0.05)
        with pytest.raises(psycopg.errors.UndefinedTable):
            await run_within(refused(), 30)
        # What ends as it is cut short still counts: a row removed, an error raised.
        assert await run_within(answers_as_it_is_cancelled(), 0.05) == "late"
        # A caller cancelled meanwhile passes both cancellations on.
        cancellations.clear()
        inner = asyncio.create_task(statement_no_one_answers())
        caller = asyncio.create_task(finish_within(inner, 30))
        await asyncio.sleep(0.05)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.wait({inner}, timeout=30)
        assert inner.cancelled() and cancellations == ["first", "second"]

    async def answers_as_it_is_cancelled() -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            return "late"
        return "in time"

    asyncio.run(scenario())


def test_a_worker_that_stops_leaves_the_pool_of_another_in_its_loop_alone(dsn):
    # The first version found its pool's background tasks by a prefix of their names:
    # stopping worker "w" cancelled those of worker "w-2" ("pgqueue-worker w-2-worker-0").
    registry = Registry()

    @registry.task(name="t")
    def t() -> None:
        pass

    async def main() -> None:
        workers = [
            Worker(registry, WorkerConfig(dsn=dsn, poll_interval=0.2), worker_id=worker_id)
            for worker_id in ("w", "w-2")
        ]
        runs = [asyncio.create_task(w.run(handle_signals=False)) for w in workers]
        await wait_for_db(dsn, "SELECT count(*) = 2 FROM pgqueue.workers")
        workers[0].stop()
        await asyncio.wait_for(runs[0], 30)
        others = [x for x in asyncio.all_tasks() if x.get_name().startswith("pgqueue-worker w-2-")]
        assert others and not any(x.done() for x in others)
        job_id = await asyncio.to_thread(sql_enqueue, dsn, "t")
        await wait_for_db(
            dsn, "SELECT state = 'succeeded' FROM pgqueue.jobs WHERE id = %s", [job_id]
        )
        workers[1].stop()
        await asyncio.wait_for(runs[1], 30)

    run(main)


def test_a_shutdown_flush_writes_the_good_outcomes_beside_one_the_database_refuses(dsn):
    # Found by a mutation audit: a flush whose batch the database refused could give up
    # instead of writing the outcomes one by one, and every good outcome pending at
    # shutdown was lost with the refused one (their jobs left running till the reaper).
    from psycopg_pool import AsyncConnectionPool

    from pgqueue.models import Job, Outcome, OutcomeKind
    from pgqueue.worker.completer import Completer, WriteResult

    good_token, refused_token = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(dsn, autocommit=True) as conn:
        ((good, refused),) = conn.execute(
            "WITH j AS (INSERT INTO pgqueue.jobs (task, state, attempts, lease_token, leased_by,"
            "   lease_expires_at, attempted_at)"
            " VALUES ('t', 'running', 1, %s, 'w', now() + interval '1 minute', now()),"
            "        ('t', 'running', 1, %s, 'w', now() + interval '1 minute', now())"
            " RETURNING id)"
            " SELECT min(id), max(id) FROM j",
            (good_token, refused_token),
        ).fetchall()
        # The dead-letter table refuses every new row (a constraint of this test's own):
        # the refused job's dead-letter move fails.
        conn.execute(
            "ALTER TABLE pgqueue.dead_jobs ADD CONSTRAINT refuse_all CHECK (false) NOT VALID"
        )

    def outcome(job_id: int, token: uuid.UUID, kind: OutcomeKind) -> Outcome:
        now = datetime.now(UTC)
        job = Job(job_id, "default", "t", {}, 0, 1, 3, now, now, token, now)
        error = {"error": "boom"} if kind is OutcomeKind.DEAD else None
        return Outcome(job, kind, 0.01, error=error, dead_reason="permanent")

    reported: dict[int, WriteResult] = {}

    async def scenario() -> bool:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            dsn, min_size=1, max_size=1, open=False, kwargs={"autocommit": True}
        )
        await pool.open()
        completer = Completer(
            pool,
            lambda o, result, _state, _dead_id: reported.__setitem__(o.job.id, result),
            worker_id="w",
            reconnect_max_seconds=1.0,
        )
        try:
            completer.submit(outcome(refused, refused_token, OutcomeKind.DEAD))
            completer.submit(outcome(good, good_token, OutcomeKind.SUCCEEDED))
            return await completer.flush(10)
        finally:
            await pool.close()

    assert asyncio.run(scenario()) is True
    assert reported == {refused: WriteResult.FAILED, good: WriteResult.WRITTEN}
    states = dict(fetch(dsn, "SELECT id, state::text FROM pgqueue.jobs"))
    assert states == {good: "succeeded", refused: "running"}


def test_tasks_a_handler_starts_are_contained_and_the_containment_undone_politely():
    # A task created in a job's context turns SystemExit into HandlerTaskExit; one
    # cancelled before its first step leaves no "never awaited" warning; tasks outside a
    # job are not wrapped; undoing keeps a factory set since (another worker's, the
    # app's) instead of putting back the one from before.
    import gc
    import warnings

    from pgqueue import HandlerTaskExit
    from pgqueue.context import reset_current, set_current
    from pgqueue.testing import job_context
    from pgqueue.worker.executor import contain_handler_tasks

    async def main() -> None:
        loop = asyncio.get_running_loop()
        undo = contain_handler_tasks(loop)
        token = set_current(job_context())
        try:

            async def child() -> None:
                await asyncio.sleep(1)

            early = asyncio.create_task(child(), name="early")
            early.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await early
            assert early.get_name() == "early"

            async def boom() -> None:
                raise SystemExit(3)

            with pytest.raises(HandlerTaskExit, match="SystemExit: 3 raised in a task"):
                await asyncio.create_task(boom())
        finally:
            reset_current(token)

        async def plain() -> int:
            return 1

        outside = asyncio.create_task(plain())
        assert outside.get_coro().__qualname__.endswith("plain")
        assert await outside == 1

        def mine(loop: Any, coro: Any, **kwargs: Any) -> Any:
            return asyncio.Task(coro, loop=loop, **kwargs)

        loop.set_task_factory(mine)
        undo()
        assert loop.get_task_factory() is mine

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(main())
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)], caught


def test_a_sync_timeout_before_any_thread_took_the_call_frees_its_slot(dsn):
    # The timeout fired while the call still waited for a pool thread: it was counted
    # as a thread running on, and since none ever ran it, the slot was never given back.
    # Enough of those and the worker claimed nothing for good.
    registry = Registry()

    @registry.task(name="tiny_timeout", timeout=0.001, max_attempts=1)
    def tiny_timeout(i: int) -> None:
        time.sleep(0.005)

    @registry.task(name="ok")
    def ok() -> None:
        pass

    with psycopg.connect(dsn, autocommit=True) as conn:
        enqueue_many(conn, [JobSpec("tiny_timeout", {"i": i}) for i in range(400)])

    async def main() -> None:
        async with running_worker(registry, dsn, concurrency=20) as worker:
            # (A thread that returned before the loop saw its timer is a success.)
            await wait_for_db(
                dsn,
                "SELECT (SELECT count(*) FROM pgqueue.dead_jobs) + (SELECT count(*) FROM"
                " pgqueue.jobs WHERE state = 'succeeded') = 400",
                timeout=30,
            )
            await asyncio.sleep(0.5)  # every thread that did start has returned by now
            assert worker.executor.abandoned == 0
            assert worker._free_slots() == 20
            ok_id = sql_enqueue(dsn, "ok")
            await wait_for_db(
                dsn, "SELECT state = 'succeeded' FROM pgqueue.jobs WHERE id = %s", (ok_id,)
            )

    run(main)
    errors = [e for (e,) in fetch(dsn, "SELECT errors->0->>'error' FROM pgqueue.dead_jobs")]
    assert all(e.startswith("timed out after 0.001s") for e in errors), errors[:3]


def test_a_worker_stops_claiming_while_its_outcomes_cannot_be_written(dsn):
    # Another session held one running job's row locked: the batch with its outcome
    # waited on the lock, every later outcome queued behind it, and the fetcher claimed
    # on (38,918 jobs `running` at concurrency 10 in a review), all to run again had the
    # worker died. Past a concurrency's worth of unwritten outcomes it claims nothing.
    registry = Registry()
    started, gate = threading.Event(), threading.Event()

    @registry.task(name="held")
    def held() -> None:
        started.set()
        gate.wait(10)

    @registry.task(name="quick")
    def quick() -> None:
        pass

    held_id = sql_enqueue(dsn, "held")

    async def main() -> None:
        async with running_worker(registry, dsn, concurrency=10):
            assert await asyncio.to_thread(started.wait, 10)
            with psycopg.connect(dsn) as locker:
                locker.execute("SELECT 1 FROM pgqueue.jobs WHERE id = %s FOR UPDATE", (held_id,))
                with psycopg.connect(dsn, autocommit=True) as conn:
                    enqueue_many(conn, [JobSpec("quick", {}) for _ in range(3000)])
                gate.set()
                await asyncio.sleep(3)
                ((running,),) = fetch(
                    dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'running'"
                )
                assert running <= 40, running
                locker.rollback()
            await wait_for_db(
                dsn,
                "SELECT count(*) = 3001 FROM pgqueue.jobs WHERE state = 'succeeded'",
                timeout=60,
            )

    run(main)


def test_permanent_error_and_snooze_raised_in_a_task_group_keep_their_meaning(dsn):
    # A TaskGroup wraps what its tasks raise in an ExceptionGroup: a PermanentError was
    # retried as an error until exhausted, a snooze ended in the dead-letter table.
    registry = Registry()

    async def in_group(exc: BaseException) -> None:
        async def raise_it() -> None:
            raise exc

        async with asyncio.TaskGroup() as group:
            group.create_task(raise_it())

    @registry.task(name="group_permanent", max_attempts=3, backoff=FAST)
    async def group_permanent() -> None:
        await in_group(PermanentError("no use retrying"))

    snooze_calls: list[int] = []

    @registry.task(name="group_snooze", max_attempts=3, backoff=FAST)
    async def group_snooze() -> None:
        snooze_calls.append(current_job().attempt)
        if len(snooze_calls) == 1:
            await in_group(Snooze(0.05))

    permanent = sql_enqueue(dsn, "group_permanent")
    snoozed = sql_enqueue(dsn, "group_snooze")

    async def main() -> None:
        async with running_worker(registry, dsn):
            await wait_for_db(
                dsn,
                "SELECT count(*) = 1 FROM pgqueue.dead_jobs WHERE id = ANY (%s)",
                ([permanent],),
            )
            await wait_for_db(
                dsn, "SELECT state = 'succeeded' FROM pgqueue.jobs WHERE id = %s", (snoozed,)
            )

    run(main)
    ((reason, attempts, kind),) = fetch(
        dsn,
        "SELECT reason, attempts, errors->0->>'kind' FROM pgqueue.dead_jobs WHERE id = %s",
        (permanent,),
    )
    assert (reason, attempts, kind) == ("permanent", 1, "permanent")
    ((history, attempts),) = fetch(
        dsn, "SELECT history, attempts FROM pgqueue.jobs WHERE id = %s", (snoozed,)
    )
    assert [h["outcome"] for h in history] == ["snoozed", "succeeded"]
    assert attempts == 1  # the snooze gave its attempt back


@pytest.mark.parametrize("answer", ["nan", "timedelta", "raises", "string"])
def test_a_custom_backoff_that_answers_badly_gets_the_default_delay(dsn, answer):
    # Its answer made the retry's write fail (the job stayed running until its lease
    # expired, the handler's error never recorded), or its exception replaced the
    # handler's error with pgqueue's own.
    from datetime import timedelta

    class Odd:
        def delay(self, attempt: int) -> Any:
            if answer == "raises":
                raise ZeroDivisionError("odd")
            return {"nan": float("nan"), "timedelta": timedelta(seconds=0.2)}.get(answer, "soon")

    registry = Registry()

    @registry.task(name="fails", max_attempts=2, backoff=Odd())
    def fails() -> None:
        raise RuntimeError("the handler's own")

    job_id = sql_enqueue(dsn, "fails", max_attempts=2)

    async def main() -> None:
        async with running_worker(registry, dsn):
            await wait_for_db(
                dsn,
                "SELECT state = 'queued' AND jsonb_array_length(errors) = 1"
                " FROM pgqueue.jobs WHERE id = %s",
                (job_id,),
            )

    run(main)
    ((error, wait),) = fetch(
        dsn,
        "SELECT errors->0->>'error',"
        " extract(epoch FROM run_at - (history->0->>'ended_at')::timestamptz)::float8"
        " FROM pgqueue.jobs WHERE id = %s",
        (job_id,),
    )
    assert error == "RuntimeError: the handler's own"
    # A timedelta is its seconds; anything else gets the default backoff (1 s +-25%).
    assert 0.1 < wait < 0.5 if answer == "timedelta" else 0.7 < wait < 1.3, wait


def test_generator_handlers_and_a_falsy_backoff_are_refused_at_registration():
    registry = Registry()
    with pytest.raises(ConfigError, match="is a generator function"):

        @registry.task(name="gen")
        def gen() -> Any:
            yield 1

    with pytest.raises(ConfigError, match="is a generator function"):

        @registry.task(name="agen")
        async def agen() -> Any:
            yield 1

    with pytest.raises(ConfigError):
        registry.task(name="zero", backoff=0)  # type: ignore[arg-type]


def test_a_new_connection_cuts_a_backoff_short_once_until_it_is_reset():
    from pgqueue.worker.backoff import ReconnectBackoff, Reconnects

    async def scenario() -> None:
        reconnects = Reconnects()
        backoff = ReconnectBackoff(60, cut=reconnects.event())
        other = reconnects.event()  # every loop has its own event

        async def cut_short() -> bool:
            """Whether a connection made during a 30 s sleep ends it."""
            sleeping = asyncio.create_task(backoff.sleep(30))
            await asyncio.sleep(0.05)
            reconnects.connected()
            await asyncio.sleep(0.2)
            if sleeping.done():
                return True
            sleeping.cancel()
            return False

        # A connection made before the sleep (during the try that failed) does not count.
        reconnects.connected()
        assert other.is_set()
        sleeping = asyncio.create_task(backoff.sleep(30))
        await asyncio.sleep(0.2)
        assert not sleeping.done()
        sleeping.cancel()
        # One made during the sleep ends it, and the delays start over from the first.
        for _ in range(5):
            backoff.next_delay()
        assert await cut_short()
        assert backoff.failures == 0
        # Once until the next reset: a database that takes connections and fails every
        # statement must not be retried at the pace of its connections.
        assert not await cut_short()
        backoff.reset()
        assert await cut_short()
        # A stop ends a sleep whose cut is spent (whoever stops sets the cut too): a
        # fetcher backing off kept a stopping worker waiting for 5 s.
        stop = asyncio.Event()
        stoppable = ReconnectBackoff(60, cut=reconnects.event(), stop=stop)
        stoppable._cut_used = True
        sleeping = asyncio.create_task(stoppable.sleep(30))
        await asyncio.sleep(0.05)
        stop.set()
        assert stoppable.cut is not None
        stoppable.cut.set()
        await asyncio.wait_for(sleeping, 1)
        # Without a cut event, a backoff just sleeps.
        plain = ReconnectBackoff(60)
        sleeping = asyncio.create_task(plain.sleep(30))
        await asyncio.sleep(0.05)
        reconnects.connected()
        await asyncio.sleep(0.2)
        assert not sleeping.done()
        sleeping.cancel()

    run(scenario)


def test_a_stop_ends_the_fetchers_backoff_at_once_when_its_cut_is_spent(dsn):
    # Found by review: once a new connection had cut one backoff short, the fetcher's
    # next backoff ignored the stop, and the worker's stop waited 5 s for it (a failover
    # replacing read-only sessions, a flapping network).
    registry = Registry()

    @registry.task(name="quick")
    async def quick() -> None:
        pass

    proxy = Outage(dsn)

    async def main() -> None:
        worker = Worker(registry, WorkerConfig(dsn=proxy.dsn, poll_interval=0.2))
        task = asyncio.create_task(worker.run(handle_signals=False))
        try:
            await asyncio.to_thread(wait_until, lambda: worker.heartbeat.last_success)
            (fetcher,) = [t for t in asyncio.all_tasks() if t.get_name() == "fetcher"]
            proxy.down()
            await asyncio.to_thread(wait_until, lambda: worker._backoff.failures, interval=0.02)
            # Failing now, and nothing can succeed: its next delay is to be 5-10 s.
            worker._backoff.failures = 12
            worker._backoff._cut_used = True
            await asyncio.to_thread(
                wait_until, lambda: worker._backoff.failures > 12, interval=0.02
            )
            worker.stop()
            await asyncio.wait_for(asyncio.shield(fetcher), 1)
        finally:
            worker.stop()
            await asyncio.wait_for(task, 30)
            proxy.close()

    run(main)


def test_after_an_outage_the_worker_claims_once_its_pool_reconnects(dsn):
    # Measured: after a 40 s outage a job enqueued as Postgres came back started 1.0-4.7
    # s later, the longest waits the fetcher's backoff (up to 10 s), while the pool had a
    # connection again. Here the fetcher's backoff has grown as in a long outage (its
    # next delay 30-60 s): only the pool's new connection can bring its next claim
    # sooner. (After the cut, delays start over from 0.1 s: a pooled connection that
    # broke while idle may fail the first retry.)
    registry = Registry()
    ran = threading.Event()

    @registry.task(name="quick")
    async def quick() -> None:
        ran.set()

    proxy = Outage(dsn)

    async def main() -> None:
        worker = Worker(
            registry,
            WorkerConfig(dsn=proxy.dsn, poll_interval=0.2, reconnect_max_seconds=60),
        )
        task = asyncio.create_task(worker.run(handle_signals=False))
        try:
            await asyncio.to_thread(wait_until, lambda: worker.heartbeat.last_success)
            proxy.down()
            await asyncio.to_thread(wait_until, lambda: worker._backoff.failures, interval=0.02)
            # Failing now, and nothing can succeed (or connect) while the proxy is down:
            # its next delay is to be 30-60 s.
            worker._backoff.failures = 12
            await asyncio.to_thread(
                wait_until, lambda: worker._backoff.failures > 12, interval=0.02
            )
            proxy.up()
            await asyncio.to_thread(sql_enqueue, dsn, "quick")
            assert await asyncio.to_thread(ran.wait, 15), "the fetcher waited out its backoff"
        finally:
            worker.stop()
            await asyncio.wait_for(task, 30)
            proxy.close()

    run(main)
