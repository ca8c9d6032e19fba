"""An app with worker start and stop hooks (Registry.on_startup, on_shutdown), for the
tests' worker processes. Each hook records itself in public.executions (job_id 0, the
process's pid, the note) through its own connection; HOOKS_MODE picks a misbehaving one:
fail_startup, hang_startup, stubborn_startup, fail_shutdown, hang_shutdown,
stubborn_shutdown (stubborn: an async hook that swallows every cancellation)."""

from __future__ import annotations

import asyncio
import os
import threading

import psycopg

from pgqueue import Registry, current_job

registry = Registry()
MODE = os.environ.get("HOOKS_MODE", "")

# What the startup hooks open and the shutdown hooks close, as an app's HTTP client.
client: dict[str, object] = {}


def _record(note: str, job_id: int = 0, attempt: int = 0) -> None:
    with psycopg.connect(os.environ["PGQUEUE_DSN"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO public.executions (job_id, attempt, pid, note) VALUES (%s, %s, %s, %s)",
            (job_id, attempt, os.getpid(), note),
        )


def _unfinished() -> int:
    """Jobs this process ran whose outcome is not written yet, when a stop hook runs."""
    with psycopg.connect(os.environ["PGQUEUE_DSN"], autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM public.executions AS e JOIN pgqueue.jobs AS j"
            " ON j.id = e.job_id WHERE e.pid = %s AND e.note = 'job'"
            " AND j.state <> 'succeeded'",
            (os.getpid(),),
        ).fetchone()
    assert row is not None
    return int(row[0])


async def _swallow_cancels() -> None:
    while True:
        try:
            await asyncio.sleep(0.1)
        except asyncio.CancelledError:
            continue


@registry.on_startup
def open_plain() -> None:
    # A plain hook runs in a thread of its own, not the event loop's.
    client["plain"] = threading.current_thread() is not threading.main_thread()
    _record("startup:plain")


@registry.on_startup
async def open_client() -> None:
    assert "plain" in client, "startup hooks run in the order they were registered"
    if MODE == "fail_startup":
        raise RuntimeError("the payment service is down")
    if MODE == "hang_startup":
        _record("startup:hanging")
        await asyncio.Event().wait()
    if MODE == "stubborn_startup":
        _record("startup:hanging")
        await _swallow_cancels()
    client["session"] = "open"
    _record("startup:async")


@registry.on_shutdown
def close_plain() -> None:
    _record(f"shutdown:plain unfinished={_unfinished()}")
    client.pop("plain")


@registry.on_shutdown
async def close_client() -> None:
    # Registered last, run first: the session goes before what it was built on.
    assert "plain" in client
    if MODE == "fail_shutdown":
        raise RuntimeError("close failed")
    if MODE == "hang_shutdown":
        _record("shutdown:hanging")
        await asyncio.Event().wait()
    if MODE == "stubborn_shutdown":
        _record("shutdown:hanging")
        await _swallow_cancels()
    client.pop("session")
    await asyncio.to_thread(_record, f"shutdown:async unfinished={_unfinished()}")


@registry.task(name="uses_client")
async def uses_client(seconds: float = 0.0) -> None:
    job = current_job()
    if client.get("session") != "open":
        raise RuntimeError("ran before the startup hooks")
    await asyncio.sleep(seconds)
    await asyncio.to_thread(_record, "job", job.id, job.attempt)
