"""Waits with a hard end, for the steps of a stop that must finish although the database
no longer answers.

A task cancelled while psycopg waits for a statement does not end at once: psycopg asks
the server to cancel the statement (over a new connection, up to 5 s) and then waits for
it to end (up to 5 s more; psycopg 3.2 without limit). Cancelled a second time meanwhile,
psycopg lets the cancellation through, the statement given up on: 3.3 closes the
connection, and the pool closes one given back in the middle of a statement (3.2).
``finish_within`` cancels twice,
so a step of a stop ends within its own time plus about ABORT_GRACE_SECONDS, answer or
not; a statement it cut short is as uncertain as one whose connection broke, and every
caller treats it so (the completer keeps such outcomes, leases cover the rest).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from pgqueue.config import ABORT_GRACE_SECONDS

T = TypeVar("T")


async def finish_within(task: asyncio.Future[Any], seconds: float) -> bool:
    """Wait up to ``seconds`` for ``task``; True if it ended by then. Otherwise cancel it,
    and again if it has not ended ABORT_GRACE_SECONDS later; False. A task that swallows
    both cancellations is left running."""
    try:
        if seconds > 0:
            await asyncio.wait({task}, timeout=seconds)
        if task.done():
            return True
        for _ in range(2):
            task.cancel()
            await asyncio.wait({task}, timeout=ABORT_GRACE_SECONDS)
            if task.done():
                break
        return False
    except asyncio.CancelledError:
        # The caller is cancelled: so is the task, twice as well.
        task.cancel()
        asyncio.get_running_loop().call_later(ABORT_GRACE_SECONDS, task.cancel)
        raise
    finally:
        # Its exception is the caller's to read when it ended in time; otherwise it is
        # dropped here rather than reported by asyncio as never retrieved.
        task.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def run_within(coro: Coroutine[Any, Any, T], seconds: float) -> T:
    """Run ``coro`` as a task for up to ``seconds`` (see finish_within); its result or
    exception, even one that came as it was being cut short; TimeoutError if it ended
    cancelled, or not at all."""
    task = asyncio.ensure_future(coro)
    await finish_within(task, seconds)
    if not task.done() or task.cancelled():
        raise TimeoutError
    return task.result()
