"""The registry's start and stop hooks (``Registry.on_startup``, ``on_shutdown``), as each
worker process runs them.

An ``async def`` hook runs on the worker's event loop; a plain one in a daemon thread of
its own (not the default executor, whose shutdown waits for its threads without end), so
that the loop stays free to take a stop signal while it runs, and a hook that blocks can
be left behind. A hook's exception is logged with its traceback, never its locals.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import threading
from collections.abc import Callable, Sequence
from typing import Any

from pgqueue.log import get_logger
from pgqueue.registry import hook_name, is_async_callable
from pgqueue.worker.abort import finish_within
from pgqueue.worker.executor import describe

log = get_logger("pgqueue.worker")


def _in_own_thread(fn: Callable[[], Any]) -> asyncio.Future[Any]:
    """Call ``fn`` in a new daemon thread; a future of what it returns or raises."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(result: Any, exc: BaseException | None) -> None:
        if future.done():  # given up on (cancelled) meanwhile
            return
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)

    def target() -> None:
        try:
            result, exc = context.run(fn), None
        except BaseException as raised:
            result, exc = None, raised
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=target, name="pgqueue-hook", daemon=True).start()
    return future


async def call_hook(fn: Callable[[], Any]) -> BaseException | None:
    """Call ``fn`` (awaiting what it returns, if awaitable); what it raised, or None.

    SystemExit and KeyboardInterrupt are returned too: raised out of a task they would end
    the event loop under the worker (Worker.loop_ended) rather than fail one hook.
    """
    try:
        result = fn() if is_async_callable(fn) else await _in_own_thread(fn)
        if inspect.isawaitable(result):
            await result
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        return exc
    return None


def _failure(call: asyncio.Task[BaseException | None]) -> tuple[str, BaseException | None] | None:
    """What went wrong in a hook's ended task: the error's text and the exception (None
    for a hook cancelled by its own doing), or None if it returned."""
    if call.cancelled():
        return "cancelled", None
    exc = call.result()
    return None if exc is None else (describe(exc), exc)


class Hooks:
    """Runs a worker's start and stop hooks, and counts those left running: an async
    hook that swallowed its cancellation (a worker process then exits without waiting
    for it, as for a handler that does: cli._run_worker)."""

    def __init__(self) -> None:
        self.left_running = 0

    async def _give_up(self, call: asyncio.Task[BaseException | None], seconds: float) -> bool:
        """finish_within; a task that outlives its cancellations is counted."""
        if await finish_within(call, seconds):
            return True
        if not call.done():
            self.left_running += 1
        return False

    async def startup(self, hooks: Sequence[Callable[[], Any]], stopping: asyncio.Event) -> bool:
        """Run ``hooks`` in order; True if each returned. False when one raised (logged
        as ``worker.startup_failed``) or a stop came first (the hook running is
        cancelled; a plain one's thread is left to end on its own)."""
        if hooks:
            log.info("worker.starting", hooks=[hook_name(fn) for fn in hooks])
        for fn in hooks:
            name = hook_name(fn)
            call = asyncio.create_task(call_hook(fn), name="pgqueue-startup-hook")
            stop = asyncio.create_task(stopping.wait(), name="pgqueue-startup-stop")
            try:
                await asyncio.wait({call, stop}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                call.cancel()
                raise
            finally:
                stop.cancel()
            if not call.done():
                log.info("worker.startup_interrupted", hook=name)
                await self._give_up(call, 0.0)
                return False
            failure = _failure(call)
            if failure is not None:
                log.error(
                    "worker.startup_failed",
                    hook=name,
                    error=failure[0],
                    hint="the worker claimed nothing and exits with status 1",
                    exc_info=failure[1],
                )
                return False
        return True

    async def shutdown(self, hooks: Sequence[Callable[[], Any]], seconds: float) -> None:
        """Run ``hooks`` in order, all of them within ``seconds``: each one's exception
        is logged (``worker.shutdown_hook_failed``) and the next runs; the one running
        when the time is up is cancelled, and those after it are skipped
        (``worker.shutdown_hook_timeout``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        for index, fn in enumerate(hooks):
            name = hook_name(fn)
            call = asyncio.create_task(call_hook(fn), name="pgqueue-shutdown-hook")
            if not await self._give_up(call, max(deadline - loop.time(), 0.0)):
                log.warning(
                    "worker.shutdown_hook_timeout",
                    hook=name,
                    seconds=round(seconds, 3),
                    skipped=[hook_name(later) for later in hooks[index + 1 :]],
                    hint="the stop hooks all share what is left of --shutdown-timeout once"
                    " the jobs have ended (at least 1 s); a plain hook's thread runs on"
                    " until the process exits",
                )
                return
            failure = _failure(call)
            if failure is not None:
                log.error(
                    "worker.shutdown_hook_failed", hook=name, error=failure[0], exc_info=failure[1]
                )
