"""Runs one job: finds its task, calls it, times it, and turns what happened into an Outcome.

``async def`` handlers are awaited on the event loop under ``asyncio.timeout``; plain
functions run in a bounded thread pool. A thread cannot be killed: when a sync handler
overruns its timeout the attempt fails and the worker moves on, but the thread runs on to
its end (its result is discarded). Nothing a handler raises can crash the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import os
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, NoReturn

from pgqueue.config import CANCEL_GRACE_SECONDS
from pgqueue.context import JobContext, reset_current, running_job, set_current
from pgqueue.errors import (
    HandlerTaskExit,
    PermanentError,
    Snooze,
    UnknownTask,
    delay_seconds,
)
from pgqueue.log import get_logger
from pgqueue.models import Job, Outcome, OutcomeKind, UndecodableArgs
from pgqueue.registry import Registry
from pgqueue.retry import Backoff

log: Any = get_logger("pgqueue.worker")

MAX_TRACEBACK_CHARS = 16_000
MAX_ERROR_CHARS = 2_000
_DEFAULT_BACKOFF = Backoff()
# A task this worker does not know, or args its handler does not take, is most often a
# deploy in progress: producers (or workers of another version) already run code this
# worker does not have yet. Such an attempt still counts, but is retried no sooner than
# this backoff says (45-75 s, then 90-150 s, ...), so that a task with few attempts
# outlives a rolling deploy instead of being dead-lettered by the old workers within
# seconds by the task's own backoff (or the default one, for a task they do not know).
DEPLOY_BACKOFF = Backoff(base_seconds=60.0, max_seconds=3600.0)
_DEPLOY_KINDS = frozenset({"unknown_task", "bad_args"})


def clean_text(text: str) -> str:
    """Text safe for jsonb: no NUL, no lone surrogates."""
    return text.replace("\x00", "\\0").encode("utf-8", "backslashreplace").decode("utf-8")


def describe(exc: BaseException) -> str:
    """``Name: text`` for an exception, even one whose ``__str__`` raises or returns
    something that is not a string (the handler's exception must never keep its job from
    getting an outcome)."""
    name = type(exc).__name__
    try:
        text = str(exc)
    except BaseException as broken:
        return f"{name}: <str() raised {type(broken).__name__}>"
    return f"{name}: {text}" if text else name


async def _contained(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        return await coro
    except (SystemExit, KeyboardInterrupt) as exc:
        raise HandlerTaskExit(
            f"{describe(exc)} raised in a task the handler started (it would have stopped"
            " the worker)"
        ) from exc


TaskFactory = Callable[..., "asyncio.Future[Any]"]


def contain_handler_tasks(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Make tasks created while a handler runs (its context has a current job) turn
    SystemExit and KeyboardInterrupt into HandlerTaskExit; returns the undo. Any task
    factory the app set is kept: tasks are still made by it."""
    previous: TaskFactory | None = loop.get_task_factory()

    def factory(
        loop: asyncio.AbstractEventLoop, coro: Any, /, **kwargs: Any
    ) -> asyncio.Future[Any]:
        context = kwargs.get("context")
        job = context.run(running_job) if context is not None else running_job()
        inner = coro if job is not None and inspect.iscoroutine(coro) else None
        if inner is not None:
            coro = _contained(inner)
        if previous is not None:
            task = previous(loop, coro, **kwargs)
        else:
            task = asyncio.Task(coro, loop=loop, **kwargs)
        if inner is not None:
            # A task cancelled before its first step never starts the wrapper, which
            # then never awaits the handler's coroutine: close it, or Python warns that
            # it was never awaited (closing a finished coroutine does nothing).
            task.add_done_callback(lambda _: inner.close())
        return task

    loop.set_task_factory(factory)

    def undo() -> None:
        # Only if it is still ours: another worker on this loop, or the app, may have
        # set its own since (then that one stays).
        if loop.get_task_factory() is factory:
            loop.set_task_factory(previous)

    return undo


def call_plain(call: Callable[[], Any]) -> Any:
    """Call a plain handler, its StopIteration (a next() on an empty iterator) turned into
    RuntimeError, as Python does in a coroutine (PEP 479): asyncio cannot set
    StopIteration on a future (a TypeError in a callback), so the await of a thread that
    raised it never ended, holding the job's slot and lease for as long as the worker
    lived."""
    try:
        return call()
    except StopIteration as exc:
        raise RuntimeError(f"the handler raised {describe(exc)}") from exc


def end_forked_child(exc: BaseException | None) -> NoReturn:
    """In a process a handler forked (``os.fork()``) whose code returned or raised into the
    worker's (a child ended by ``sys.exit``, as one would end a plain script's): end it
    now, as multiprocessing ends its children, with ``os._exit``. Else the child went on as
    a second worker on the worker's connections, its epoll and its pipes (another
    command in progress on them, the worker's signals lost to it), or sat in the thread
    pool's loop for ever while the worker waited for it. Status: the SystemExit's, 0 for
    a return, 1 for another exception (its traceback on stderr)."""
    code = 0
    try:
        if isinstance(exc, SystemExit):
            if isinstance(exc.code, int):
                code = exc.code
            elif exc.code is not None:
                code = 1
                print(exc.code, file=sys.stderr)
        elif exc is not None:
            code = 1
            print(format_traceback(exc), end="", file=sys.stderr)
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except BaseException:
        pass
    finally:
        os._exit(code & 0xFF)


# Where describe_here leaves an exception's text and traceback, in its __dict__.
_DESCRIBED = "_pgqueue_described"


def describe_here(exc: BaseException) -> None:
    """Describe ``exc`` (its text and traceback, for error_record) now, in the thread of
    the plain handler that raised it: formatting runs the exception's own ``__str__``
    and its traceback's, which had run on the event loop (twice), blocking every other
    job's handler and the heartbeat for as long as they took."""
    if isinstance(exc, Snooze):
        return  # not a failure: no error record
    with contextlib.suppress(BaseException):
        vars(exc)[_DESCRIBED] = (describe(exc), format_traceback(exc))


def _described(exc: BaseException) -> tuple[str, str] | None:
    try:
        found = vars(exc).get(_DESCRIBED)
    except BaseException:
        return None
    return found if isinstance(found, tuple) else None


def error_record(
    job: Job, worker_id: str, kind: str, exc: BaseException | None, message: str | None = None
) -> dict[str, Any]:
    """The JSON object stored for one failed attempt."""
    described = None if exc is None else _described(exc)
    if message is None:
        assert exc is not None
        message = described[0] if described is not None else describe(exc)
    record: dict[str, Any] = {
        "attempt": job.attempt,
        "at": datetime.now(UTC).isoformat(),
        "worker": worker_id,
        "kind": kind,
        "error": clean_text(message[:MAX_ERROR_CHARS]),
    }
    if exc is not None and exc.__traceback__ is not None:
        text = described[1] if described is not None else format_traceback(exc)
        record["traceback"] = clean_text(text[-MAX_TRACEBACK_CHARS:])
    return record


def format_traceback(exc: BaseException) -> str:
    """``exc``'s traceback as text, or a line saying why there is none: formatting runs
    the exception's own code (a SyntaxError whose offset is text, a ``__notes__`` that
    raises, even SystemExit), and an attempt must get its outcome whatever that does."""
    try:
        return "".join(traceback.format_exception(exc))
    except BaseException as broken:
        return f"{describe(exc)}\n<its traceback could not be formatted: {describe(broken)}>\n"


class Executor:
    def __init__(
        self,
        registry: Registry,
        worker_id: str,
        threads: int,
        on_thread_freed: Callable[[], None] | None = None,
    ) -> None:
        self.registry = registry
        self.worker_id = worker_id
        # The worker's process: a handler's code that comes back in another one is in a
        # child the handler forked (end_forked_child).
        self._pid = os.getpid()
        self.pool: ThreadPoolExecutor = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="pgqueue-job"
        )
        # Pool threads still running a handler whose job was given up on (timed out,
        # released at shutdown); the worker counts them against its free slots.
        self.abandoned: int = 0
        # The jobs (by lease token) whose abandoned threads run on (see runs_on), and
        # since when (monotonic).
        self._running_on: dict[uuid.UUID, float] = {}
        self._abandon_lock = threading.Lock()
        # Lease tokens of jobs the worker released at shutdown before cancelling their
        # task: only for them is a CancelledError a release, not the handler's failure.
        self._released: set[uuid.UUID] = set()
        self._on_thread_freed = on_thread_freed
        # Called with a timeout outcome for an async handler that went on for
        # CANCEL_GRACE_SECONDS after its timeout cancelled it (it caught the
        # CancelledError): the worker writes that outcome then, and the handler's task
        # holds its slot until it ends (see _await). Set by the worker.
        self.on_gave_up: Callable[[Outcome], None] | None = None

    async def execute(self, job: Job) -> Outcome:
        """Run ``job`` once. Cancellation (shutdown) propagates as ``CancelledError``."""
        started = time.monotonic()
        backoff = _DEFAULT_BACKOFF
        if isinstance(job.args, UndecodableArgs):
            # Stored by SQL, undecodable by any Python worker: retrying cannot help.
            return Outcome(
                job,
                OutcomeKind.DEAD,
                0.0,
                error=error_record(
                    job,
                    self.worker_id,
                    "bad_args",
                    None,
                    f"args cannot be decoded: {job.args.error}",
                ),
                dead_reason="permanent",
            )
        try:
            task = self.registry.get(job.task)
            backoff = task.options.backoff
            try:
                task.check_args(job.args)
            except TypeError as exc:
                raise _BadArgs(str(exc)) from None
            ctx = JobContext(
                id=job.id,
                task=job.task,
                queue=job.queue,
                attempt=job.attempt,
                max_attempts=job.max_attempts,
                priority=job.priority,
                created_at=job.created_at,
                worker_id=self.worker_id,
                _cancel=job.cancel,
            )
            token = set_current(ctx)
            give_up = functools.partial(self._give_up, job, started, backoff)
            try:
                await self._call(job, task.fn, task.is_async, task.options.timeout, give_up)
                if os.getpid() != self._pid:
                    end_forked_child(None)
            except BaseException as exc:
                if os.getpid() != self._pid:
                    end_forked_child(exc)
                if self.released(job) and not isinstance(
                    exc, asyncio.CancelledError | GeneratorExit
                ):
                    # Shutdown cancelled it and its clean-up raised: still a release,
                    # its attempt given back, not a failure counted (or dead-lettered).
                    log.warning(
                        "job.release_cleanup_failed", job_id=job.id, task=job.task,
                        queue=job.queue, attempt=job.attempt, error=describe(exc),
                    )  # fmt: skip
                    raise asyncio.CancelledError from exc
                raise
            finally:
                if not _closing():  # closed outside its task, the token is another context's
                    reset_current(token)
        except asyncio.CancelledError as exc:
            if self.released(job):
                raise  # shutdown: the worker cancelled this job's task (see release)
            # Raised by the handler itself (it awaited a task it cancelled, or a sync
            # handler got a cancelled future's result): a failed attempt like any other,
            # counted, retried, dead-lettered when exhausted. Taken for a shutdown, it was
            # released with its attempt given back and ran again at once, without end.
            # (Task.cancelling() cannot tell: on Python 3.11 a TaskGroup whose child
            # failed after its body ended leaves the count at 1.)
            return self._failed(job, started, backoff, "error", exc)
        except BaseExceptionGroup as group:
            # A TaskGroup (or gather's successor) wraps what its tasks raised: a
            # PermanentError among them dead-letters, Snoozes alone snooze (for the longest
            # asked), anything else fails the attempt.
            try:
                taken = taken_from_group(group)
            except (TypeError, ValueError) as exc:
                return self._failed(job, started, backoff, "error", group, describe(exc))
            if isinstance(taken, PermanentError):
                return Outcome(
                    job,
                    OutcomeKind.DEAD,
                    time.monotonic() - started,
                    error=error_record(job, self.worker_id, "permanent", taken),
                    dead_reason="permanent",
                )
            if isinstance(taken, Snooze):
                return Outcome(
                    job,
                    OutcomeKind.SNOOZED,
                    time.monotonic() - started,
                    delay_seconds=_snooze_seconds(taken),
                )
            return self._failed(job, started, backoff, "error", group)
        except Snooze as snooze:
            try:
                seconds = _snooze_seconds(snooze)
            except (TypeError, ValueError) as exc:
                return self._failed(job, started, backoff, "error", snooze, describe(exc))
            return Outcome(
                job, OutcomeKind.SNOOZED, time.monotonic() - started, delay_seconds=seconds
            )
        except PermanentError as exc:
            return Outcome(
                job,
                OutcomeKind.DEAD,
                time.monotonic() - started,
                error=error_record(job, self.worker_id, "permanent", exc),
                dead_reason="permanent",
            )
        except _TimedOut as exc:
            return self._failed(job, started, backoff, "timeout", None, str(exc))
        except UnknownTask as exc:
            return self._failed(job, started, backoff, "unknown_task", exc, str(exc))
        except _BadArgs as exc:
            return self._failed(job, started, backoff, "bad_args", None, str(exc))
        except GeneratorExit as exc:
            if _closing():
                raise
            return self._failed(job, started, backoff, "error", exc)  # raised by the handler
        except BaseException as exc:
            return self._failed(job, started, backoff, "error", exc)
        return Outcome(job, OutcomeKind.SUCCEEDED, time.monotonic() - started)

    async def _call(
        self,
        job: Job,
        fn: Any,
        is_async: bool,
        timeout: float | None,
        give_up: Callable[[str], None],
    ) -> None:
        args = job.args
        if is_async and timeout is None:
            await fn(**args)
            return
        if is_async:
            await self._await(job, fn(**args), timeout, give_up)
            return
        started = time.monotonic()
        result = await self._call_in_thread(job, fn, args, timeout)
        if inspect.isawaitable(result):
            # A plain callable that returned an awaitable: an async function behind a
            # plain decorator (functools.wraps), say. Awaited here, on the loop, within
            # what is left of the timeout; dropping it would count a job that never ran
            # as succeeded.
            remaining = None if timeout is None else timeout - (time.monotonic() - started)
            await self._await(job, result, remaining, give_up, timeout)

    async def _await(
        self,
        job: Job,
        awaitable: Any,
        timeout: float | None,
        give_up: Callable[[str], None],
        budget: float | None = None,
    ) -> None:
        """Await a handler's awaitable, failing the attempt after ``timeout`` seconds (of
        a whole ``budget``, for the message). One that catches the cancellation and goes
        on for CANCEL_GRACE_SECONDS is given up on (``give_up``): its attempt gets its
        timeout outcome then, while it runs on, holding its slot, to whatever end."""
        if timeout is None:
            await awaitable
            return
        seconds = max(timeout, 0.0)
        given_up = asyncio.get_running_loop().call_later(
            seconds + CANCEL_GRACE_SECONDS,
            give_up,
            f"timed out after {budget or timeout}s (the handler caught the cancellation and"
            f" had not ended {CANCEL_GRACE_SECONDS:g}s later; it runs on, holding its slot)",
        )
        try:
            async with asyncio.timeout(seconds) as scope:
                await awaitable
        except GeneratorExit:
            raise  # see _closing
        except BaseException as exc:
            # An expiry surfaces as CancelledError instead of TimeoutError when the
            # task's cancel count was already off (the 3.11 TaskGroup leftover above),
            # and as whatever the handler's clean-up raised on its cancellation.
            if scope.expired() and not self.released(job):
                after = ""
                if not isinstance(exc, TimeoutError | asyncio.CancelledError):
                    after = f" (its clean-up then raised {describe(exc)})"
                raise _TimedOut(f"timed out after {budget or timeout}s{after}") from None
            raise
        finally:
            given_up.cancel()
        if scope.expired() and not self.released(job):
            # The handler caught the timeout's cancellation and went on to return: its
            # attempt still timed out.
            raise _TimedOut(
                f"timed out after {budget or timeout}s (the handler caught the cancellation"
                " and returned later)"
            )

    async def _call_in_thread(self, job: Job, fn: Any, args: Any, timeout: float | None) -> Any:
        state = _ThreadState(job.lease_token)
        call = functools.partial(
            self._in_thread, state, functools.partial(contextvars.copy_context().run, fn, **args)
        )
        future = asyncio.get_running_loop().run_in_executor(self.pool, call)
        try:
            done, _ = await asyncio.wait({future}, timeout=timeout)
        except asyncio.CancelledError:
            self._abandon(state)
            future.cancel()
            raise
        if not done:
            # The thread runs on; its result is dropped (see the module docstring).
            running = self._abandon(state)
            future.cancel()
            if running:
                raise _TimedOut(f"timed out after {timeout}s (the thread runs on to its end)")
            if state.started:  # it ended as the wait did; its result is not taken
                raise _TimedOut(f"timed out after {timeout}s (its thread ended just then)")
            raise _TimedOut(
                f"timed out after {timeout}s before a thread was free to start it (it did not run)"
            )
        return future.result()

    def _in_thread(self, state: _ThreadState, call: Callable[[], Any]) -> Any:
        with self._abandon_lock:
            if state.skipped:
                return None  # its attempt ended before a thread took it up
            state.started = True
        try:
            close_old_django_connections()
            try:
                result = call_plain(call)
            except BaseException as exc:
                if os.getpid() != self._pid:
                    end_forked_child(exc)
                describe_here(exc)
                raise
            if os.getpid() != self._pid:
                end_forked_child(None)
            return result
        finally:
            close_old_django_connections()
            with self._abandon_lock:
                state.done = True
                freed = state.abandoned
                if freed:
                    self.abandoned -= 1
                    self._running_on.pop(state.lease_token, None)
            if freed and self._on_thread_freed is not None:
                self._on_thread_freed()

    def runs_on(self, job: Job) -> bool:
        """Whether this attempt's handler was given up on (timed out, released) and its
        thread still runs. Safe to call from any thread."""
        with self._abandon_lock:
            return job.lease_token in self._running_on

    def _abandon(self, state: _ThreadState) -> bool:
        """Give up on a call; True if a thread runs it on (counted in ``abandoned``
        until it ends). A call no thread has taken up yet is skipped for good: counted,
        it held a slot that nothing would ever free."""
        with self._abandon_lock:
            if not state.started:
                state.skipped = True
                return False
            if not state.done and not state.abandoned:
                state.abandoned = True
                self.abandoned += 1
                self._running_on[state.lease_token] = time.monotonic()
            return not state.done

    def abandoned_times(self) -> list[float]:
        """When each thread that runs on was abandoned (monotonic). Safe to call from any
        thread."""
        with self._abandon_lock:
            return list(self._running_on.values())

    def _failed(
        self,
        job: Job,
        started: float,
        backoff: Backoff,
        kind: str,
        exc: BaseException | None,
        message: str | None = None,
    ) -> Outcome:
        duration = time.monotonic() - started
        error = error_record(job, self.worker_id, kind, exc, message)
        if job.attempt >= job.max_attempts:
            return Outcome(job, OutcomeKind.DEAD, duration, error=error, dead_reason="exhausted")
        delay = _retry_delay(job, backoff)
        if kind in _DEPLOY_KINDS:
            delay = max(delay, DEPLOY_BACKOFF.delay(job.attempt))
        return Outcome(job, OutcomeKind.RETRIED, duration, delay_seconds=delay, error=error)

    def _give_up(self, job: Job, started: float, backoff: Backoff, message: str) -> None:
        """The timeout outcome of an async handler that ignored its timeout's cancellation,
        handed to the worker (on_gave_up) while the handler runs on. Not at shutdown: a
        released job's handler is the shutdown's to give up on."""
        if self.released(job) or self.on_gave_up is None:
            return
        self.on_gave_up(self._failed(job, started, backoff, "timeout", None, message))

    def release(self, job: Job) -> None:
        """Mark ``job`` released: call just before cancelling its task at shutdown."""
        self._released.add(job.lease_token)

    def released(self, job: Job) -> bool:
        return job.lease_token in self._released

    def internal_error(self, job: Job, started: float, exc: BaseException) -> Outcome:
        """The outcome of an attempt ``execute`` itself failed on (a bug in pgqueue, not
        in the handler): a failed attempt, retried with the default backoff, so that the
        job still gets an outcome instead of holding its lease for as long as the worker
        lives."""
        message = f"pgqueue failed to record this attempt's outcome: {type(exc).__name__}"
        return self._failed(job, started, _DEFAULT_BACKOFF, "internal", None, message)

    def shutdown(self) -> None:
        # Threads still running a handler (released or given up on) are left to finish;
        # the process does not wait for them (and ends with os._exit). With none, the
        # idle threads are waited for (they end at once): left to end by themselves,
        # one could still be there when the process looks for threads it must not wait
        # for, and a clean stop ended with os._exit, which skips the app's atexit hooks.
        self.pool.shutdown(wait=self.abandoned == 0, cancel_futures=True)


def _retry_delay(job: Job, backoff: Any) -> float:
    """The task's backoff for this attempt, in seconds. A backoff object of the user's own
    (anything with ``delay(attempt)``) that raises or answers what is not 0 to ten years
    of seconds (a timedelta is taken as its seconds) gets the default backoff's delay
    instead, said once per attempt as ``job.backoff_failed``: its answer would have made
    the retry's write fail, leaving the job running until its lease expired."""
    try:
        seconds = delay_seconds(backoff.delay(job.attempt), "a backoff's delay()")
    except Exception as exc:
        fallback = _DEFAULT_BACKOFF.delay(job.attempt)
        log.error(
            "job.backoff_failed",
            job_id=job.id, task=job.task, queue=job.queue, attempt=job.attempt,
            error=f"{type(exc).__name__}: {exc}", retry_in=round(fallback, 2),
        )  # fmt: skip
        return fallback
    return seconds


_django_warned = False


def close_old_django_connections() -> None:
    """Django's database connections are per thread, and a worker's threads outlive their
    jobs: a plain handler's connection stayed open after its job (whatever CONN_MAX_AGE
    said), and once it was lost (Postgres restarted, a failover, a pooler's recycle) every
    job its thread ran failed on it until dead-lettered. As Django does around each
    request, and Celery around each task, each plain handler's thread calls
    ``close_old_connections()`` before and after the job: connections that errors made
    unusable, or older than CONN_MAX_AGE (at 0, Django's default, every one), are closed.
    Only where the app imported Django and configured its settings; a failure is logged
    once, never the job's."""
    global _django_warned
    db = sys.modules.get("django.db")
    if db is None:
        return
    try:
        from django.conf import settings  # type: ignore[import-untyped]

        if settings.configured:
            db.close_old_connections()
    except Exception as exc:
        if not _django_warned:
            _django_warned = True
            log.warning("django.close_old_connections_failed", error=describe(exc))


def _closing() -> bool:
    """Whether a GeneratorExit is the coroutine being closed, not one the handler raised:
    a task left pending when its loop stopped (a handler that swallows its cancellation)
    is closed once the loop is gone, and must just close. Caught, it made an outcome that
    nobody would write (or, released, logged that its clean-up failed), and resetting the
    job's context variable failed: the close runs in another context than the task's."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return True
    return False


def _snooze_seconds(snooze: Snooze) -> float:
    """A Snooze's delay, checked again: a subclass that does not call Snooze.__init__ has
    no ``seconds``, or may have set anything there (the handler's error, not pgqueue's)."""
    value = getattr(snooze, "seconds", None)
    what = f"{type(snooze).__name__}.seconds"
    if value is None:
        raise TypeError(f"{what} is not set (a Snooze subclass must call Snooze.__init__)")
    return delay_seconds(value, what)


def taken_from_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What a worker acts on when a handler raises an exception group (a TaskGroup's): a
    PermanentError among its exceptions (the job is dead-lettered), else the Snooze asking
    the longest if it holds nothing else (the job snoozes), else the group (a failure).
    TypeError or ValueError: one of those Snoozes has no usable seconds."""
    leaves = _leaves(group)
    permanent = [e for e in leaves if isinstance(e, PermanentError)]
    if permanent:
        return permanent[0]
    snoozes = [e for e in leaves if isinstance(e, Snooze)]
    if snoozes and len(snoozes) == len(leaves):
        return max(snoozes, key=_snooze_seconds)
    return group


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions of a (nested) exception group."""
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


class _ThreadState:
    __slots__ = ("abandoned", "done", "lease_token", "skipped", "started")

    def __init__(self, lease_token: uuid.UUID) -> None:
        self.lease_token = lease_token
        self.done = False
        self.abandoned = False
        # Whether a pool thread took the call up; ``skipped``: given up on before that,
        # so it never runs (and holds no thread).
        self.started = False
        self.skipped = False


class _BadArgs(Exception):
    pass


class _TimedOut(Exception):
    pass
