"""Tasks used by the tests' worker processes. Each records its executions in
public.executions through its own connection (PGQUEUE_DSN), so tests can count runs
from the database alone, including runs whose job result was later lost."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import sys
import time
from pathlib import Path

import psycopg
import structlog

from pgqueue import LeaseLost, PermanentError, Registry, Snooze, current_job
from pgqueue.retry import Backoff

registry = Registry()
FAST = Backoff(base_seconds=0.05, max_seconds=0.2)

if _ATEXIT_FILE := os.environ.get("SAMPLE_ATEXIT_FILE"):
    # As an app's error reporter or tracer flushes at exit: whether the hooks ran.
    atexit.register(lambda: Path(_ATEXIT_FILE).write_text("ran"))


def _record(note: str = "") -> None:
    job = current_job()
    # Writable while the test makes the database's new sessions read-only.
    options = "-c default_transaction_read_only=off"
    with psycopg.connect(os.environ["PGQUEUE_DSN"], autocommit=True, options=options) as conn:
        conn.execute(
            "INSERT INTO public.executions (job_id, attempt, pid, note) VALUES (%s, %s, %s, %s)",
            (job.id, job.attempt, os.getpid(), note),
        )


@registry.task(name="record", backoff=FAST)
def record(note: str = "") -> None:
    _record(note)


@registry.task(name="async_record", queue="async", backoff=FAST)
async def async_record(note: str = "") -> None:
    await asyncio.to_thread(_record, note)


@registry.task(name="watch_lease", max_attempts=1, backoff=FAST)
async def watch_lease(seconds: float) -> None:
    """A long handler that stops once its worker finds the lease lost."""
    await asyncio.to_thread(_record, "start")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if current_job().lease_lost:
            await asyncio.to_thread(_record, "lost")
            raise LeaseLost()
        await asyncio.sleep(0.05)
    await asyncio.to_thread(_record, "kept")


@registry.task(name="fork_helper", backoff=FAST)
def fork_helper() -> None:
    """Leaves a daemonic helper process running (multiprocessing's fork), as a handler
    starting a background helper does; the interpreter's exit ends it."""
    import multiprocessing

    multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,), daemon=True).start()
    _record("forked")


@registry.task(name="fork_and_terminate", backoff=FAST)
def fork_and_terminate() -> None:
    """Starts a process with multiprocessing's fork and terminates it, as Pool's exit does:
    the child's SIGTERM must end the child, not reach the worker."""
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
    child.start()
    time.sleep(0.3)
    child.terminate()
    child.join(10)
    _record(f"child exit {child.exitcode}")


def _fork_and_end(how: str) -> int:
    """Forks; the child ends as a plain script's would (``sys.exit``, a return, an
    exception) and the parent returns the child's exit status."""
    pid = os.fork()
    if pid == 0:
        if how == "exit":
            raise SystemExit(3)
        if how == "raise":
            raise ValueError("the child's own error")
        return -1  # "return": the handler returns, back into the worker's code
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@registry.task(name="fork_and_end", max_attempts=1, backoff=FAST)
def fork_and_end(how: str) -> None:
    code = _fork_and_end(how)
    if code == -1:
        return  # the child: its handler returns
    _record(f"child exit {code}")


@registry.task(name="async_fork_and_end", max_attempts=1, backoff=FAST)
async def async_fork_and_end(how: str) -> None:
    code = _fork_and_end(how)
    if code == -1:
        return  # the child: its handler returns
    await asyncio.to_thread(_record, f"child exit {code}")


@registry.task(name="end_the_loop", max_attempts=1, backoff=FAST)
async def end_the_loop(how: str) -> None:
    """Ends the worker's event loop from under it, as a handler can by mistake: a
    SystemExit raised in a loop callback, or the loop stopped."""
    loop = asyncio.get_running_loop()
    if how == "exit":
        loop.call_soon(sys.exit, 4)
    else:
        loop.stop()
    await asyncio.sleep(5)


@registry.task(name="take_sigterm", max_attempts=1, backoff=FAST)
async def take_sigterm(how: str) -> None:
    """Changes how the process handles SIGTERM, as code run in a handler may."""
    loop = asyncio.get_running_loop()
    if how == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elif how == "ignore_hup":
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    elif how == "loop":
        loop.add_signal_handler(signal.SIGTERM, lambda: None)
    elif how == "wakeup_fd":
        signal.set_wakeup_fd(-1)
    else:
        loop.remove_signal_handler(signal.SIGTERM)
    await asyncio.to_thread(_record, how)


@registry.task(name="close_stdout", max_attempts=1, backoff=FAST)
def close_stdout() -> None:
    """Closes sys.stdout, as code done with its own output may."""
    sys.stdout.close()


@registry.task(name="hang_in_thread", timeout=0.3, max_attempts=1, backoff=FAST)
async def hang_in_thread(seconds: float) -> None:
    """Times out inside asyncio.to_thread: the thread stays, holding a default-executor
    thread for ``seconds``."""
    await asyncio.to_thread(time.sleep, seconds)


@registry.task(name="overrun", timeout=0.3, max_attempts=1, backoff=FAST)
def overrun(release: str, seconds: float = 60) -> None:
    """A plain handler that times out at once and runs on until the file ``release``
    exists (or for ``seconds``): its thread holds its slot all that time."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)


@registry.task(name="subtask_exits", max_attempts=1, backoff=FAST)
async def subtask_exits(kind: str) -> None:
    """A task this handler starts raises SystemExit or KeyboardInterrupt, which asyncio
    lets out of the event loop: the worker must fail this attempt, not stop."""

    async def sub() -> None:
        await asyncio.sleep(0.01)
        raise SystemExit(4) if kind == "exit" else KeyboardInterrupt()

    await asyncio.to_thread(_record, "start " + kind)
    await asyncio.gather(asyncio.create_task(sub()))


@registry.task(name="outlive_timeout", timeout=0.3, max_attempts=1, backoff=FAST)
async def outlive_timeout() -> None:
    """Catches its timeout's cancellation and returns later."""
    try:
        await asyncio.sleep(5)
    except asyncio.CancelledError:
        await asyncio.sleep(0.2)
    await asyncio.to_thread(_record, "returned")


@registry.task(name="stubborn", backoff=FAST)
async def stubborn(note: str = "") -> None:
    """Swallows every cancellation: a handler bug the worker's shutdown must survive."""
    await asyncio.to_thread(_record, "start " + note)
    while True:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            continue


@registry.task(name="async_blocking", backoff=FAST)
async def async_blocking(seconds: float) -> None:
    """An async handler blocked in asyncio.to_thread: cancelling it leaves the thread."""
    await asyncio.to_thread(_record, "start")
    await asyncio.to_thread(time.sleep, seconds)


@registry.task(name="block_loop", backoff=FAST)
async def block_loop(seconds: float) -> None:
    """An async handler that blocks the worker's event loop (a handler bug)."""
    time.sleep(seconds)  # noqa: ASYNC251 - the bug this task stands for


@registry.task(name="log_from_handler", backoff=FAST)
async def log_from_handler(note: str = "") -> None:
    """Logs through structlog as an app would, without naming the job."""
    structlog.get_logger("app").info("app.working", note=note)
    await asyncio.to_thread(_sync_log, note)


def _sync_log(note: str) -> None:
    structlog.get_logger("app").info("app.working_in_thread", note=note)


@registry.task(name="stdlib_log_from_handler", backoff=FAST)
def stdlib_log_from_handler(note: str = "") -> None:
    """Logs through the standard library, as most apps and libraries do."""
    logging.getLogger("app.tasks").info("stdlib working on %s", note)


@registry.task(name="sleep", backoff=FAST)
def sleep(seconds: float, note: str = "") -> None:
    _record("start " + note)
    time.sleep(seconds)
    _record("end " + note)


@registry.task(name="wait_for_cancel", backoff=FAST)
def wait_for_cancel(seconds: float, note: str = "") -> None:
    """Runs until its job is cancelled (then fails, which ends a cancelled job) or for
    ``seconds``."""
    _record("start " + note)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if current_job().cancel_requested:
            _record("end " + note)
            raise RuntimeError("cancelled by operator")
        time.sleep(0.05)
    _record("end " + note)


@registry.task(name="time_out_then_crash", timeout=1, backoff=FAST)
def time_out_then_crash() -> None:
    """Times out, then its thread (which runs on) kills the process: a poison job whose
    neighbours must not be started beside that thread."""
    _record("start")
    time.sleep(3)
    os._exit(7)


@registry.task(name="fail", max_attempts=3, backoff=FAST)
def fail() -> None:
    _record()
    raise RuntimeError("this task always fails")


@registry.task(name="crash", max_attempts=2, backoff=FAST)
def crash() -> None:
    _record()
    os._exit(3)


@registry.task(name="snooze_once", backoff=FAST)
def snooze_once() -> None:
    _record()
    job = current_job()
    with psycopg.connect(os.environ["PGQUEUE_DSN"], autocommit=True) as conn:
        runs = conn.execute(
            "SELECT count(*) FROM public.executions WHERE job_id = %s", (job.id,)
        ).fetchone()
    if runs is not None and runs[0] == 1:
        raise Snooze(0.1)


@registry.task(name="permanent", backoff=FAST)
def permanent() -> None:
    raise PermanentError("cannot ever work")
