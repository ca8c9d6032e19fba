"""Helpers for testing an application's tasks.

- ``perform(registry, task, args)`` runs one handler in this process, as a worker would
  call it: the args go through JSON (what enqueue stores and a worker decodes) and
  ``current_job()`` answers inside. No database. Control signals (``Snooze``,
  ``PermanentError``) and errors reach the caller, to assert on.
- ``drain(registry, dsn)`` runs a real ``Worker`` in this process until the registry's
  queues (or the ones given) have no runnable job left and nothing running, then stops it
  gracefully, and returns what happened to each attempt it ran, read back from the jobs'
  history. With ``with_scheduled=True`` jobs due later (scheduled, retries waiting out
  their backoff, snoozed jobs) are made due at once, so a failing job runs to the
  dead-letter table in one call.
- ``job_context(...)`` builds a ``JobContext`` for code that takes one.

``drain_async`` and ``perform_async`` are the same for async tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import math
import os
import uuid
from collections import Counter
from collections.abc import Awaitable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, overload

from pgqueue import store
from pgqueue.config import CANCEL_GRACE_SECONDS, WorkerConfig
from pgqueue.context import JobContext, reset_current, set_current
from pgqueue.enqueue import _dump_args, max_args_bytes
from pgqueue.errors import SCHEMA_HINT, ConfigError, PgQueueError
from pgqueue.migrate import schema_drift
from pgqueue.registry import Registry, Task
from pgqueue.worker import Worker
from pgqueue.worker.executor import call_plain, taken_from_group

__all__ = [
    "Attempt",
    "DrainResult",
    "DrainTimeout",
    "drain",
    "drain_async",
    "job_context",
    "perform",
    "perform_async",
]

# How often drain asks the database whether it is done.
_CHECK_SECONDS = 0.02


def job_context(
    task: str = "test.task",
    *,
    id: int = 1,
    queue: str = "default",
    attempt: int = 1,
    max_attempts: int = 20,
    priority: int = 0,
    created_at: datetime | None = None,
    worker_id: str = "pgqueue.testing",
) -> JobContext:
    """A ``JobContext`` with test defaults."""
    return JobContext(
        id=id,
        task=task,
        queue=queue,
        attempt=attempt,
        max_attempts=max_attempts,
        priority=priority,
        created_at=created_at or datetime.now(UTC),
        worker_id=worker_id,
    )


R = TypeVar("R")


def _prepared(
    registry: Registry,
    task: str | Task[Any, Any],
    args: Mapping[str, Any] | None,
    attempt: int,
    job_id: int,
) -> tuple[Any, dict[str, Any], JobContext]:
    # A Task is looked up by its name: what runs is what this registry holds under it,
    # as in a worker of this registry.
    name = task.name if isinstance(task, Task) else task
    handler = registry.get(name)
    # What a worker would receive: enqueue's checks and encoding, then JSON decoding; and
    # the worker's check of them against the handler's signature (its bad_args).
    decoded = store._DECODER.decode(_dump_args({} if args is None else args, max_args_bytes()))
    handler.check_args(decoded)
    options = handler.options
    ctx = job_context(
        name,
        id=job_id,
        queue=options.queue,
        attempt=attempt,
        max_attempts=options.max_attempts,
        priority=options.priority,
    )
    return handler, decoded, ctx


@overload
def perform(
    registry: Registry,
    task: Task[..., Coroutine[Any, Any, R]],
    args: Mapping[str, Any] | None = None,
    *,
    attempt: int = 1,
    job_id: int = 1,
) -> R: ...


@overload
def perform(
    registry: Registry,
    task: Task[..., Awaitable[R]],
    args: Mapping[str, Any] | None = None,
    *,
    attempt: int = 1,
    job_id: int = 1,
) -> R: ...


@overload
def perform(
    registry: Registry,
    task: Task[..., R],
    args: Mapping[str, Any] | None = None,
    *,
    attempt: int = 1,
    job_id: int = 1,
) -> R: ...


@overload
def perform(
    registry: Registry,
    task: str,
    args: Mapping[str, Any] | None = None,
    *,
    attempt: int = 1,
    job_id: int = 1,
) -> Any: ...


def perform(
    registry: Registry,
    task: str | Task[Any, Any],
    args: Mapping[str, Any] | None = None,
    *,
    attempt: int = 1,
    job_id: int = 1,
) -> Any:
    """Run task ``task``'s handler once, here, and return what it returns. ``task`` is a
    name or a ``Task`` (typed: its handler's return type, awaited for an async one). An
    async handler runs in a new event loop (from a coroutine, use ``perform_async``).
    ``UnknownTask`` for a name the registry lacks; ``SerializationError`` or
    ``PayloadTooLarge`` for args enqueue would refuse; a ``TypeError`` before the handler
    runs when they do not fit its signature, with the message a worker records as that
    attempt's ``bad_args``. The task's
    ``timeout`` is not applied (``drain`` applies it)."""
    handler, decoded, ctx = _prepared(registry, task, args, attempt, job_id)
    token = set_current(ctx)
    try:
        if handler.is_async:
            return _run_here(handler.fn(**decoded), "perform_async")
        result = call_plain(functools.partial(handler.fn, **decoded))
        if inspect.isawaitable(result):
            return _run_here(result, "perform_async")
        return result
    except BaseExceptionGroup as group:
        taken = _as_a_worker_takes_it(group)
        if taken is group:
            raise
        raise taken from group
    finally:
        reset_current(token)


@overload
async def perform_async(
    registry: Registry,
    task: Task[..., Coroutine[Any, Any, R]],
    args: Mapping[str, Any] | None = None,
    *,
    attempt: int = 1,
    job_id: int = 1,
) -> R: ...


@overload
async def perform_async(
    registry: Registry,
    task: Task[..., Awaitable[R]],
    args: Mapping[str, Any] | None = None,
    *,
    attempt: int = 1,
    job_id: int = 1,
) -> R: ...


@overload
async def perform_async(
    registry: Registry,
    task: Task[..., R],
    args: Mapping[str, Any] | None = None,
    *,
    attempt: int = 1,
    job_id: int = 1,
) -> R: ...


@overload
async def perform_async(
    registry: Registry,
    task: str,
    args: Mapping[str, Any] | None = None,
    *,
    attempt: int = 1,
    job_id: int = 1,
) -> Any: ...


async def perform_async(
    registry: Registry,
    task: str | Task[Any, Any],
    args: Mapping[str, Any] | None = None,
    *,
    attempt: int = 1,
    job_id: int = 1,
) -> Any:
    """``perform`` on the running event loop (a sync handler runs in a thread, as in a
    worker)."""
    handler, decoded, ctx = _prepared(registry, task, args, attempt, job_id)
    token = set_current(ctx)
    try:
        if handler.is_async:
            return await handler.fn(**decoded)
        result = await asyncio.to_thread(call_plain, functools.partial(handler.fn, **decoded))
        if inspect.isawaitable(result):
            return await result
        return result
    except BaseExceptionGroup as group:
        taken = _as_a_worker_takes_it(group)
        if taken is group:
            raise
        raise taken from group
    finally:
        reset_current(token)


def _as_a_worker_takes_it(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What a worker acts on when a handler raises an exception group (taken_from_group);
    the group itself where a Snooze in it has no usable seconds (a failure)."""
    with contextlib.suppress(TypeError, ValueError):
        return taken_from_group(group)
    return group


def _run_here(awaitable: Any, instead: str) -> Any:
    """Run ``awaitable`` in a new event loop; ``PgQueueError`` naming the async form
    ``instead`` when this thread runs a loop already."""

    async def wrapped() -> Any:
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_in_a_new_loop(wrapped())
    if inspect.iscoroutine(awaitable):
        awaitable.close()  # never awaited: no "was never awaited" warning
    raise PgQueueError(
        f"an event loop is running in this thread: use `await pgqueue.testing.{instead}(...)`"
    )


# Tasks that ignored their cancellation when a drain's loop closed (see
# _run_in_a_new_loop), kept for the life of the process.
_LEFT_BEHIND: set[asyncio.Task[Any]] = set()


def _run_in_a_new_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """``asyncio.run``, except that the tasks left when ``coro`` ends are waited for
    CANCEL_GRACE_SECONDS after their cancellation, not for ever: a handler that swallows
    its cancellation (given up on by the drain's worker after its timeout, its job's
    outcome written) kept ``drain`` from returning. Such a task is left behind with the
    closed loop, as the worker's process leaves it when it exits."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(coro)
    finally:
        try:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:
                _, pending = loop.run_until_complete(
                    asyncio.wait(left, timeout=CANCEL_GRACE_SECONDS)
                )
                # Kept, never closed: closing one at garbage collection runs its code at
                # whatever moment that comes (inside an ast.parse, CPython 3.11 then
                # fails with "AST constructor recursion depth mismatch").
                _LEFT_BEHIND.update(pending)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


@dataclass(frozen=True)
class Attempt:
    """One attempt a drain ran: the job, its attempt number and how it ended (the
    history's outcome: ``succeeded``, ``retried``, ``dead``, ``snoozed``, ``failed`` for a
    failure that cancelled the job, ``released``; ``orphaned`` or ``lease_expired`` if
    its lease was lost), with the error for a failure."""

    job_id: int
    task: str
    attempt: int
    outcome: str
    error: str | None


@dataclass(frozen=True)
class DrainResult:
    """What ``drain`` ran, in the order the attempts ended."""

    attempts: tuple[Attempt, ...]
    outcomes: Mapping[str, int] = field(default_factory=dict)

    @property
    def succeeded(self) -> int:
        return self.outcomes.get("succeeded", 0)

    @property
    def retried(self) -> int:
        return self.outcomes.get("retried", 0)

    @property
    def dead(self) -> int:
        return self.outcomes.get("dead", 0)

    @property
    def snoozed(self) -> int:
        return self.outcomes.get("snoozed", 0)

    @property
    def errors(self) -> list[Attempt]:
        """The attempts that failed, with their errors."""
        return [a for a in self.attempts if a.error is not None]


class DrainTimeout(TimeoutError):
    """``drain`` ran out of time; ``result`` holds the attempts it ran until then."""

    def __init__(self, message: str, result: DrainResult) -> None:
        super().__init__(message)
        self.result = result


def _checked_drain_args(
    registry: Registry, queues: Sequence[str], timeout: float
) -> tuple[str, ...]:
    if len(registry) == 0:
        raise ConfigError(
            "drain: the registry has no tasks (import the module that registers them):"
            " its worker would take every job of the queues for an unknown task"
        )
    if isinstance(queues, str):
        raise ConfigError(f"drain: queues must be a list of names, not the string {queues!r}")
    if not (isinstance(timeout, int | float) and 0 <= timeout < math.inf):
        raise ConfigError(f"drain: timeout must be a number of seconds >= 0, got {timeout!r}")
    return tuple(queues)


async def _outcomes(dsn: str, queues: Sequence[str], worker_id: str) -> DrainResult:
    async with await store.connect_async(dsn) as conn:
        rows = await store.drain_outcomes(conn, queues=queues, worker_id=worker_id)
    attempts = tuple(
        Attempt(r["id"], r["task"], r["attempt"], r["outcome"], r["error"]) for r in rows
    )
    return DrainResult(attempts, dict(Counter(a.outcome for a in attempts)))


async def drain_async(
    registry: Registry,
    dsn: str,
    *,
    queues: Sequence[str] = (),
    with_scheduled: bool = False,
    concurrency: int = 1,
    timeout: float = 60.0,
) -> DrainResult:
    """``drain`` on the running event loop."""
    names = _checked_drain_args(registry, queues, timeout)
    worker = Worker(
        registry,
        # shutdown_timeout 0: after a timeout, what still runs is released at once (the
        # attempt given back), not waited for.
        WorkerConfig(
            dsn=dsn,
            queues=names,
            concurrency=concurrency,
            poll_interval=0.1,
            shutdown_timeout=0.0,
        ),
        worker_id=f"pgqueue.testing:{os.getpid()}:{uuid.uuid4().hex[:12]}",
        # Its jobs are released at once at the end; the app's stop hooks get the
        # drain's own time.
        stop_hooks_seconds=timeout,
    )
    names = worker.queues
    loop = asyncio.get_running_loop()
    async with await store.connect_async(dsn) as conn:
        # Before the worker starts: its loops would only log and retry.
        applied = await store.applied_versions_async(conn)
        missing = () if applied is None else schema_drift(applied).missing  # None: no grant
        if missing:
            raise PgQueueError(f"drain: {SCHEMA_HINT} (missing: {', '.join(missing)})")
        deadline = loop.time() + timeout
        left = 0
        runner = asyncio.create_task(worker.run(handle_signals=False), name="pgqueue.drain")
        try:
            while not runner.done():
                if with_scheduled:
                    await store.drain_schedule_now(conn, queues=names)
                left = await store.drain_outstanding(
                    conn, queues=names, worker_id=worker.worker_id, with_scheduled=with_scheduled
                )
                if left == 0 or loop.time() >= deadline:
                    break
                await asyncio.sleep(_CHECK_SECONDS)
        finally:
            worker.stop()
            await runner
    if worker.failed:
        raise PgQueueError(
            "drain: the worker failed (see its worker.startup_failed or"
            " worker.component_died event)"
        )
    result = await _outcomes(dsn, names, worker.worker_id)
    if left:
        raise DrainTimeout(
            f"drain: {left} job(s) of {', '.join(names)} still to run after {timeout:g}s"
            + (" (a job that snoozes every time never drains)" if with_scheduled else ""),
            result,
        )
    return result


def drain(
    registry: Registry,
    dsn: str,
    *,
    queues: Sequence[str] = (),
    with_scheduled: bool = False,
    concurrency: int = 1,
    timeout: float = 60.0,
) -> DrainResult:
    """Run the jobs of ``queues`` (default: the registry's) with a real worker in this
    process until none is runnable and none of them runs, one at a time unless
    ``concurrency`` says otherwise; jobs of a paused queue are left alone. Jobs a handler
    enqueues into these queues run in the same drain. ``with_scheduled``: make jobs due
    later due now, again after every attempt (a retry's backoff or a snooze does not hold
    the drain up). After ``timeout`` seconds, ``DrainTimeout`` (a ``TimeoutError``, with
    the attempts run so far): the worker stops at once and gives back what still runs
    (a sync handler's thread cannot be stopped: it runs on, and the interpreter waits
    for it at exit). The registry's start and stop hooks run around the jobs, the stop
    hooks within ``timeout`` seconds more (at least 1). ``ConfigError`` for a registry
    without tasks, queues given as one string or a bad timeout; ``PgQueueError`` when the
    database lacks migrations."""
    result: DrainResult = _run_here(
        drain_async(
            registry,
            dsn,
            queues=queues,
            with_scheduled=with_scheduled,
            concurrency=concurrency,
            timeout=timeout,
        ),
        "drain_async",
    )
    return result
