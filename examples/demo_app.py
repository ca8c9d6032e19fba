"""The sample app that `make demo` runs: tasks that succeed, retry, and dead-letter."""

from __future__ import annotations

import asyncio

from pgqueue import Backoff, PermanentError, Registry, current_job

registry = Registry()
QUICK = Backoff(base_seconds=0.2, max_seconds=1.0)


@registry.task(name="demo.greet", queue="demo")
def greet(name: str) -> None:
    """Always succeeds."""


@registry.task(name="demo.fetch", queue="demo", max_attempts=3, backoff=QUICK)
async def fetch(url: str) -> None:
    """Fails on its first attempt (a flaky remote), succeeds on the retry."""
    await asyncio.sleep(0.01)
    if current_job().attempt == 1:
        raise ConnectionError(f"{url}: connection reset (the demo's flaky remote)")


@registry.task(name="demo.charge", queue="demo", max_attempts=3, backoff=QUICK)
def charge(amount: int) -> None:
    """Always fails: after 3 attempts it lands in the dead-letter table."""
    raise RuntimeError(f"payment provider rejected {amount}")


@registry.task(name="demo.parse", queue="demo", max_attempts=5)
def parse(payload: str) -> None:
    """Fails permanently: dead-lettered at once, no retries."""
    raise PermanentError(f"cannot parse {payload!r}")
