"""Tasks for ``python -m bench.soak``: every outcome a worker writes, in a steady mix."""

from __future__ import annotations

import random

from pgqueue import PermanentError, Registry, Snooze, current_job
from pgqueue.retry import Backoff

registry = Registry()
QUICK_RETRY = Backoff(base_seconds=0.05, max_seconds=0.2)


@registry.task(name="soak.ok")
def ok(n: int) -> int:
    return n * 2


@registry.task(name="soak.async_ok")
async def async_ok(n: int) -> int:
    return n + 1


@registry.task(name="soak.flaky", max_attempts=3, backoff=QUICK_RETRY)
def flaky(n: int) -> None:
    # A failure with a traceback on its first attempt, then success: a retry.
    if current_job().attempt < 2:
        raise RuntimeError(f"flaky {n} " + "x" * 200)


@registry.task(name="soak.snooze")
def snooze(n: int) -> None:
    if current_job().attempt < 2 and random.random() < 0.5:
        raise Snooze(0.05)


@registry.task(name="soak.dead", max_attempts=1)
def dead(n: int) -> None:
    raise PermanentError("dead on purpose")


# One job of each 10 sent is a retry, one a possible snooze; one in 5,000 dies.
MIX = ["soak.ok"] * 6 + ["soak.async_ok"] * 2 + ["soak.flaky", "soak.snooze"]
