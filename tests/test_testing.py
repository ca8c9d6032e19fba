"""pgqueue.testing: perform runs a handler as a worker would call it; drain runs a real
worker until the queues are empty and reports each attempt from the jobs' history."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgqueue import (
    Backoff,
    ConfigError,
    PayloadTooLarge,
    PermanentError,
    PgQueueError,
    Registry,
    SerializationError,
    Snooze,
    UnknownTask,
    current_job,
    enqueue,
    store,
)
from pgqueue.testing import (
    DrainResult,
    DrainTimeout,
    drain,
    drain_async,
    job_context,
    perform,
    perform_async,
)
from tests.conftest import dead_row, job_row, job_state, scalar

registry = Registry()
SLOW = Backoff(base_seconds=600, max_seconds=600, jitter=0)
# The database of the running test, for handlers that enqueue.
DSN: dict[str, str] = {}


@registry.task(name="t.add")
def add(a: int, b: int) -> dict[str, Any]:
    job = current_job()
    return {"sum": a + b, "task": job.task, "attempt": job.attempt, "queue": job.queue,
            "thread": threading.current_thread().name}  # fmt: skip


@registry.task(name="t.echo", queue="echoes")
def echo(**kwargs: Any) -> dict[str, Any]:
    return kwargs


@registry.task(name="t.async_add")
async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b + current_job().attempt


@registry.task(name="t.flaky", max_attempts=3, backoff=SLOW)
def flaky() -> None:
    raise RuntimeError("flaky went wrong")


@registry.task(name="t.snooze", backoff=SLOW)
def snooze() -> None:
    raise Snooze(600)


@registry.task(name="t.permanent")
def permanent() -> None:
    raise PermanentError("never")


@registry.task(name="t.empty_next")
def empty_next() -> None:
    next(iter([]))


@registry.task(name="t.grouped")
async def grouped(kinds: list[str]) -> None:
    async def raise_(kind: str) -> None:
        if kind == "snooze":
            raise Snooze(len(kinds) * 10)
        if kind == "permanent":
            raise PermanentError("never")
        raise RuntimeError(kind)

    async with asyncio.TaskGroup() as group:
        for kind in kinds:
            group.create_task(raise_(kind))


@registry.task(name="t.deaf", timeout=0.2, max_attempts=1)
async def deaf() -> None:
    while True:  # swallows every cancellation, its timeout's included
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.05)


@registry.task(name="t.forever")
async def forever() -> None:
    await asyncio.sleep(3600)


@registry.task(name="t.fan_out")
def fan_out(n: int) -> None:
    with psycopg.connect(DSN["dsn"], autocommit=True) as conn:
        for i in range(n):
            enqueue(conn, "t.add", {"a": i, "b": 1})


# --- perform ------------------------------------------------------------------------------


def test_perform_runs_a_handler_with_its_job_context_and_returns_its_result():
    assert perform(registry, "t.add", {"a": 2, "b": 3}, attempt=4) == {
        "sum": 5, "task": "t.add", "attempt": 4, "queue": "default",
        "thread": "MainThread",
    }  # fmt: skip
    assert perform(registry, "t.async_add", {"a": 2, "b": 3}) == 6


def test_perform_takes_the_task_itself():
    # As a test holding the Task would write it; it was refused (UnknownTask, naming the
    # Task's repr).
    assert perform(registry, async_add, {"a": 2, "b": 3}, attempt=2) == 7
    assert asyncio.run(perform_async(registry, async_add, {"a": 1, "b": 1})) == 3
    # Looked up by its name: a Task this registry does not hold is unknown to it.
    elsewhere = Registry()

    @elsewhere.task(name="t.not_here")
    def not_here() -> None: ...

    with pytest.raises(UnknownTask, match=r"t\.not_here"):
        perform(registry, not_here)


def test_perform_passes_args_through_json_as_a_worker_receives_them():
    got = perform(registry, "t.echo", {"items": (1, 2), "nested": {"x": 1.5}, "none": None})
    assert got == {"items": [1, 2], "nested": {"x": 1.5}, "none": None}


def test_perform_refuses_what_enqueue_or_a_worker_would(monkeypatch):
    with pytest.raises(UnknownTask):
        perform(registry, "t.missing")
    with pytest.raises(SerializationError):
        perform(registry, "t.echo", {"when": object()})
    with pytest.raises(SerializationError):
        perform(registry, "t.echo", {"x": float("nan")})
    # Before the handler runs, and in the worker's words (its bad_args).
    for args in ({"a": 1}, {"a": 1, "b": 2, "c": 3}):
        with pytest.raises(TypeError, match=r"^args do not fit t\.add\(a: "):
            perform(registry, "t.add", args)
        with pytest.raises(TypeError, match=r"^args do not fit t\.async_add\(a: "):
            asyncio.run(perform_async(registry, "t.async_add", args))
    # A TypeError the handler raises itself is the handler's.
    with pytest.raises(TypeError, match=r"^unsupported operand"):
        perform(registry, "t.add", {"a": 1, "b": "2"})
    monkeypatch.setenv("PGQUEUE_MAX_ARGS_BYTES", "100")
    with pytest.raises(PayloadTooLarge):
        perform(registry, "t.echo", {"x": "y" * 200})


def test_perform_lets_control_signals_reach_the_test():
    with pytest.raises(Snooze):
        perform(registry, "t.snooze")
    with pytest.raises(PermanentError):
        perform(registry, "t.permanent")
    with pytest.raises(RuntimeError, match="flaky went wrong"):
        perform(registry, "t.flaky")


def test_perform_raises_what_a_worker_acts_on_from_a_task_groups_exceptions():
    # A worker snoozes a job whose TaskGroup raised only Snoozes, and dead-letters one
    # with a PermanentError among them; perform raised the ExceptionGroup.
    with pytest.raises(Snooze) as snoozed:
        perform(registry, "t.grouped", {"kinds": ["snooze", "snooze"]})
    assert snoozed.value.seconds == 20
    with pytest.raises(PermanentError):
        perform(registry, "t.grouped", {"kinds": ["snooze", "permanent", "oops"]})
    with pytest.raises(ExceptionGroup):
        perform(registry, "t.grouped", {"kinds": ["snooze", "oops"]})

    async def main() -> None:
        with pytest.raises(Snooze):
            await perform_async(registry, "t.grouped", {"kinds": ["snooze"]})

    asyncio.run(main())


def test_perform_async_runs_sync_handlers_in_a_thread_and_perform_refuses_a_running_loop():
    async def main() -> None:
        result = await perform_async(registry, "t.add", {"a": 1, "b": 1})
        assert result["sum"] == 2 and result["thread"] != "MainThread"
        assert await perform_async(registry, "t.async_add", {"a": 1, "b": 1}, attempt=2) == 4
        with pytest.raises(PgQueueError, match="perform_async"):
            perform(registry, "t.async_add", {"a": 1, "b": 1})
        with pytest.raises(PgQueueError, match="drain_async"):
            drain(registry, "postgresql://unused")

    asyncio.run(main())


def test_perform_raises_what_a_worker_records_for_a_plain_handlers_stop_iteration():
    # A worker records RuntimeError (asyncio cannot carry StopIteration out of a thread);
    # perform raised StopIteration, and perform_async never returned.
    with pytest.raises(RuntimeError, match=r"^the handler raised StopIteration$"):
        perform(registry, "t.empty_next")

    async def main() -> None:
        with pytest.raises(RuntimeError, match=r"^the handler raised StopIteration$"):
            await asyncio.wait_for(perform_async(registry, "t.empty_next"), 10)

    asyncio.run(main())


def test_job_context_has_test_defaults():
    ctx = job_context("x", attempt=2)
    assert (ctx.task, ctx.id, ctx.attempt, ctx.queue, ctx.cancel_requested) == (
        "x", 1, 2, "default", False,
    )  # fmt: skip


# --- drain --------------------------------------------------------------------------------


def test_drain_runs_every_runnable_job_and_reports_each_attempt(conn, dsn):
    DSN["dsn"] = dsn
    ok = [enqueue(conn, "t.add", {"a": i, "b": i}) for i in range(3)]
    failing = enqueue(conn, "t.flaky")
    fanned = enqueue(conn, "t.fan_out", {"n": 2})
    later = enqueue(conn, "t.add", {"a": 0, "b": 0}, delay=3600)
    elsewhere = enqueue(conn, "t.echo", {"x": 1})  # queue "echoes": not drained below

    result = drain(registry, dsn, queues=["default"])

    assert isinstance(result, DrainResult)
    assert all(job_state(conn, j) == "succeeded" for j in [*ok, fanned])
    # The handler's follow-up jobs ran too, in the same drain.
    follow_ups = scalar(
        conn, "SELECT array_agg(state::text) FROM pgqueue.jobs WHERE task = 't.add' AND id > %s",
        (fanned,),
    )  # fmt: skip
    assert sorted(follow_ups) == ["queued", "succeeded", "succeeded"]  # + `later`
    assert job_state(conn, later) == "queued" and job_state(conn, elsewhere) == "queued"
    # The failure is retried later (backoff), not run again now.
    row = job_row(conn, failing)
    assert row is not None and row["state"] == "queued" and row["attempts"] == 1
    assert result.succeeded == 6 and result.retried == 1 and result.dead == 0
    assert [(a.job_id, a.outcome) for a in result.errors] == [(failing, "retried")]
    assert "RuntimeError: flaky went wrong" in (result.errors[0].error or "")
    # Nothing is left running or registered under the drain's worker.
    assert scalar(conn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'running'") == 0
    assert scalar(conn, "SELECT count(*) FROM pgqueue.workers") == 0


def test_drain_with_scheduled_runs_retries_and_scheduled_jobs_to_the_end(conn, dsn):
    failing = enqueue(conn, "t.flaky")
    later = enqueue(conn, "t.add", {"a": 1, "b": 2}, delay=3600)

    result = drain(registry, dsn, with_scheduled=True)

    assert job_state(conn, later) == "succeeded"
    dead = dead_row(conn, failing)
    assert dead is not None and dead["reason"] == "exhausted"
    assert [(a.job_id, a.attempt, a.outcome) for a in result.attempts if a.job_id == failing] == [
        (failing, 1, "retried"), (failing, 2, "retried"), (failing, 3, "dead"),
    ]  # fmt: skip
    assert result.outcomes == {"retried": 2, "dead": 1, "succeeded": 1}


def test_drain_reports_a_job_dead_lettered_under_a_new_id_by_the_id_it_was_enqueued_as(conn, dsn):
    # The dead-letter table held the job's id (an explicit id, a sequence set back): it is
    # stored under a new one (migration 0023); the drain's attempts still name its id.
    failing = enqueue(conn, "t.flaky")
    conn.execute(
        "INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts,"
        " max_attempts, run_at, created_at, reason)"
        " VALUES (%s, 'default', 'older', '{}', 0, 1, 1, now(), now(), 'permanent')",
        (failing,),
    )

    result = drain(registry, dsn, with_scheduled=True)

    ((dead_id, reason),) = conn.execute(
        "SELECT id, reason FROM pgqueue.dead_jobs WHERE original_id = %s", (failing,)
    ).fetchall()
    assert dead_id != failing and reason == "exhausted"
    assert [(a.job_id, a.attempt, a.outcome) for a in result.attempts] == [
        (failing, 1, "retried"), (failing, 2, "retried"), (failing, 3, "dead"),
    ]  # fmt: skip


def test_drain_leaves_paused_queues_and_times_out_on_a_job_that_always_snoozes(conn, dsn):
    paused = enqueue(conn, "t.echo", {"x": 1})
    conn.execute("INSERT INTO pgqueue.queues (name, paused_at) VALUES ('echoes', now())")
    assert drain(registry, dsn, queues=["echoes"], timeout=5).attempts == ()
    assert job_state(conn, paused) == "queued"

    snoozer = enqueue(conn, "t.snooze")
    with pytest.raises(DrainTimeout, match="snoozes every time") as timed_out:
        drain(registry, dsn, with_scheduled=True, timeout=1)
    assert isinstance(timed_out.value, TimeoutError)
    assert timed_out.value.result.snoozed >= 1
    # The worker was stopped: the job is back in the queue, nothing runs, no worker row.
    assert job_state(conn, snoozer) == "queued"
    assert scalar(conn, "SELECT count(*) FROM pgqueue.workers") == 0


def test_drain_returns_though_a_handler_swallows_its_cancellation(conn, dsn):
    # Its worker gives the handler up after its timeout and stops; asyncio.run then
    # waited for the handler's task without end.
    job = enqueue(conn, "t.deaf", {}, max_attempts=1)
    done: list[DrainResult] = []
    runner = threading.Thread(
        target=lambda: done.append(drain(registry, dsn, timeout=30)), daemon=True
    )
    runner.start()
    runner.join(timeout=60)
    assert not runner.is_alive(), "drain did not return"
    assert done[0].outcomes == {"dead": 1}
    assert dead_row(conn, job) is not None


def test_drain_async_runs_on_the_callers_event_loop(conn, dsn):
    job = enqueue(conn, "t.async_add", {"a": 1, "b": 1})

    async def main() -> DrainResult:
        return await drain_async(registry, dsn)

    result = asyncio.run(main())
    assert job_state(conn, job) == "succeeded"
    assert [(a.job_id, a.outcome) for a in result.attempts] == [(job, "succeeded")]


def test_drain_timeout_gives_back_a_job_still_running(conn, dsn):
    job = enqueue(conn, "t.forever")

    with pytest.raises(DrainTimeout, match="1 job") as timed_out:
        drain(registry, dsn, timeout=0.5)

    # Released at once (shutdown_timeout 0), its attempt given back; not waited for.
    row = job_row(conn, job)
    assert row is not None and (row["state"], row["attempts"]) == ("queued", 0)
    assert [a.outcome for a in timed_out.value.result.attempts] == ["released"]
    assert scalar(conn, "SELECT count(*) FROM pgqueue.workers") == 0


def test_with_scheduled_a_job_due_later_still_counts_as_outstanding(conn, dsn):
    # drain_schedule_now, then the worker writes a retry due in 10 minutes, then
    # drain_outstanding: that job must still count, or the drain ends before it is dead
    # (a review reproduced it 1 in 100 drains). The query, on such a job.
    job = enqueue(conn, "t.add", {"a": 1, "b": 1}, delay=600)

    async def outstanding(with_scheduled: bool) -> int:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            return await store.drain_outstanding(
                aconn, queues=["default"], worker_id="w", with_scheduled=with_scheduled
            )

    assert asyncio.run(outstanding(True)) == 1
    assert asyncio.run(outstanding(False)) == 0
    assert job_state(conn, job) == "queued"


def test_drain_schedule_now_wakes_a_rescued_job_as_a_rescued_one(conn, dsn):
    # The worker's claim leaves rescued jobs out; the queue's name woke it to that claim,
    # and the job waited for the poll.
    plain = enqueue(conn, "t.add", {"a": 1, "b": 1}, delay=600)
    rescued = enqueue(conn, "t.add", {"a": 1, "b": 1}, queue="other", delay=600)
    conn.execute("UPDATE pgqueue.jobs SET rescued = true WHERE id = %s", (rescued,))

    async def schedule_now() -> tuple[list[str], set[str]]:
        async with (
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener,
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn,
        ):
            await listener.execute("LISTEN pgqueue_jobs")
            moved = await store.drain_schedule_now(aconn, queues=["default", "other"])
            payloads = set()
            async for note in listener.notifies(timeout=1.0):
                payloads.add(note.payload)
        return moved, payloads

    moved, payloads = asyncio.run(schedule_now())
    assert sorted(moved) == ["default", "other"]
    assert payloads == {"default", " rescued other"}
    assert scalar(conn, "SELECT count(*) FROM pgqueue.jobs WHERE run_at > now()") == 0
    assert job_state(conn, plain) == job_state(conn, rescued) == "queued"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"registry": Registry()}, "registry has no tasks"),
        ({"queues": "default"}, "not the string 'default'"),
        ({"timeout": float("nan")}, "timeout must be"),
        ({"timeout": -1}, "timeout must be"),
    ],
)
def test_drain_refuses_bad_arguments_before_running_anything(conn, dsn, kwargs, message):
    job = enqueue(conn, "t.add", {"a": 1, "b": 1})
    with pytest.raises(ConfigError, match=message):
        drain(**{"registry": registry, "dsn": dsn, **kwargs})
    assert job_state(conn, job) == "queued"


def test_drain_on_a_database_without_the_schema_says_to_migrate(server_dsn):
    name = f"pgqueue_drain_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with pytest.raises(PgQueueError, match="pgqueue migrate"):
            drain(registry, make_conninfo(server_dsn, dbname=name))
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def test_drain_runs_the_registrys_start_and_stop_hooks_around_the_jobs(conn, dsn):
    hooked = Registry()
    seen: list[str] = []

    @hooked.on_startup
    async def open_client() -> None:
        seen.append("open")

    @hooked.on_shutdown
    def close_client() -> None:
        seen.append("close")

    @hooked.task(name="hooked.job")
    def job() -> None:
        seen.append("job")

    enqueue(conn, "hooked.job")
    assert drain(hooked, dsn).succeeded == 1
    assert seen == ["open", "job", "close"]


def test_drain_says_so_when_a_startup_hook_fails(conn, dsn):
    hooked = Registry()

    @hooked.on_startup
    def fail() -> None:
        raise RuntimeError("no client")

    @hooked.task(name="hooked.never")
    def never() -> None:
        raise AssertionError("ran")

    job_id = enqueue(conn, "hooked.never")
    with pytest.raises(PgQueueError, match=r"worker\.startup_failed"):
        drain(hooked, dsn)
    assert job_state(conn, job_id) == "queued"


def test_start_and_stop_hooks_must_be_callable_without_arguments():
    hooked = Registry()

    def takes_one(x: int) -> None: ...

    async def optional(x: int = 0) -> None: ...

    def gen() -> Any:
        yield

    with pytest.raises(ConfigError, match="must take no arguments"):
        hooked.on_startup(takes_one)
    with pytest.raises(ConfigError, match="generator function"):
        hooked.on_shutdown(gen)
    with pytest.raises(ConfigError, match="takes a function"):
        hooked.on_startup("not a function")  # type: ignore[arg-type]
    assert hooked.on_startup(optional) is optional
    first, second = (lambda: None), (lambda: None)
    hooked.on_shutdown(first)
    hooked.on_shutdown(second)
    assert hooked.startup_hooks == (optional,)
    assert hooked.shutdown_hooks == (second, first)


@pytest.mark.parametrize("when", ["startup", "shutdown"])
def test_drain_returns_though_a_plain_hook_blocks(conn, dsn, when):
    # A plain hook ran in the default executor, whose shutdown at the end of drain
    # waits for its threads without end: drain never returned (a review).
    hooked = Registry()
    release = threading.Event()
    ran: list[str] = []

    def block() -> None:
        release.wait(60)

    (hooked.on_startup if when == "startup" else hooked.on_shutdown)(block)

    @hooked.task(name="hooked.quick")
    def quick() -> None:
        ran.append("job")

    enqueue(conn, "hooked.quick")
    try:
        started = time.monotonic()
        if when == "startup":
            with pytest.raises(DrainTimeout):
                drain(hooked, dsn, timeout=1)
        else:
            assert drain(hooked, dsn, timeout=1).succeeded == 1
        assert time.monotonic() - started < 30
    finally:
        release.set()
    assert ran == ([] if when == "startup" else ["job"])
