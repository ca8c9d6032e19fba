"""Writes outcomes to the database, batched: whatever finished while the previous batch
was being written goes out in the next one, all kinds in one transaction.

Every write is conditional on the lease token the worker got at claim time; an outcome
whose row did not change was fenced off (its lease was lost) and is reported as such.
A batch that fails on a broken connection is kept and retried with backoff. Such a
failure leaves its outcomes uncertain: the COMMIT may have happened with only its reply
lost, and then the retry is fenced off by the batch's own first write. Before an
uncertain outcome is reported fenced, the job's history is checked for this worker's
entry of that claim (store.recorded_outcomes); if it is there, the outcome was written.
"""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections.abc import Callable
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from pgqueue import store
from pgqueue.log import get_logger
from pgqueue.models import Job, Outcome, OutcomeKind
from pgqueue.worker.abort import run_within
from pgqueue.worker.backoff import (
    CONNECTION_ERRORS,
    ReconnectBackoff,
    Reconnects,
    error_fields,
    retry_event,
)

log: Any = get_logger("pgqueue.completer")


class WriteResult(enum.Enum):
    WRITTEN = "written"
    # The row did not change: the lease was lost (fenced off).
    FENCED = "fenced"
    # The database refused this outcome (not a connection problem); it was dropped so
    # that the job's lease can expire and the reaper retries it.
    FAILED = "failed"


# (outcome, result, the job's state after the write: None unless WRITTEN, the id a dead
# job is stored under when pgqueue.dead_jobs held its own: else None)
OnWritten = Callable[[Outcome, WriteResult, str | None, int | None], None]
_FLUSH_RETRYABLE: tuple[type[BaseException], ...] = (TimeoutError, *CONNECTION_ERRORS)


def _one_per_job(outcomes: list[Outcome]) -> tuple[list[Outcome], list[Outcome]]:
    """Split off every outcome whose job already has one earlier in the list. The writes
    report which job ids changed, so two attempts of one job in one batch (claimed again
    after a claim's commit was undone, while the first run went on) would both be
    reported written, though the older lease was fenced off."""
    if len(outcomes) < 2:
        return outcomes, []
    seen: set[int] = set()
    now: list[Outcome] = []
    later: list[Outcome] = []
    for outcome in outcomes:
        job_id = outcome.job.id
        if job_id in seen:
            later.append(outcome)
        else:
            seen.add(job_id)
            now.append(outcome)
    return now, later


class Completer:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        on_written: OnWritten,
        *,
        worker_id: str,
        reconnect_max_seconds: float,
        reconnects: Reconnects | None = None,
    ) -> None:
        self.pool: AsyncConnectionPool = pool
        self.on_written = on_written
        self.worker_id = worker_id
        # Cut short by a new connection of the pool (reconnects). The shutdown flush has
        # its own (it may back off while the run loop does).
        self.backoff: ReconnectBackoff = ReconnectBackoff(
            reconnect_max_seconds, cut=reconnects.event() if reconnects else None
        )
        self._flush_cut = reconnects.event() if reconnects else None
        self._pending: list[Outcome] = []
        # (id, lease token) of outcomes whose last write attempt failed: it may have
        # committed (see the module docstring). Cleared when the outcome is reported.
        self._uncertain: set[tuple[int, uuid.UUID]] = set()
        self._ready = asyncio.Event()
        # One batch in flight at a time: flush() must wait for the run loop's batch.
        self._writing = asyncio.Lock()
        # The batch being written and reported (run_once, _write_singly): a write may
        # have committed with its reply not read yet, so their rows may no longer show the
        # lease they were claimed with.
        self._batch: list[Outcome] = []

    def submit(self, outcome: Outcome) -> None:
        self._pending.append(outcome)
        self._ready.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def unwritten(self) -> int:
        """Outcomes waiting to be written or being written."""
        return len(self._pending) + len(self._batch)

    def holding(self) -> set[Job]:
        """The attempts whose outcome is waiting here or being written: their rows may stop
        showing their leases at any moment, without the leases being lost."""
        return {o.job for o in self._batch} | {o.job for o in self._pending}

    def uncertain(self, job: Job) -> bool:
        """Whether this attempt's outcome may already be written (a write of it failed
        with its connection): its lease may look lost only because it was."""
        return (job.id, job.lease_token) in self._uncertain

    def _mark_uncertain(self, outcomes: list[Outcome]) -> None:
        self._uncertain.update((o.job.id, o.job.lease_token) for o in outcomes)

    async def run(self) -> None:
        """Write batches until cancelled."""
        while True:
            await self._ready.wait()
            try:
                await self.run_once()
                self.backoff.reset()
            except CONNECTION_ERRORS as exc:
                delay = self.backoff.next_delay()
                log.warning(
                    retry_event("completer", exc), **error_fields(exc), retry_in=round(delay, 2)
                )
                await self.backoff.sleep(delay)
            except Exception:
                # Not a connection problem: some outcome in the batch is refused. Write
                # them one by one so one bad outcome cannot block the others.
                log.exception("completer.batch_failed", outcomes=len(self._pending))
                try:
                    await self._write_singly()
                except CONNECTION_ERRORS as exc:
                    delay = self.backoff.next_delay()
                    log.warning(
                        retry_event("completer", exc),
                        **error_fields(exc),
                        retry_in=round(delay, 2),
                    )
                    await self.backoff.sleep(delay)

    async def _write_singly(self) -> None:
        async with self._writing:
            batch, self._pending = self._pending, []
            self._ready.clear()
            self._batch = batch
            try:
                await self._write_each(batch)
            finally:
                self._batch = []

    async def _write_each(self, batch: list[Outcome]) -> None:
        for index, outcome in enumerate(batch):
            try:
                changed = await self._write([outcome])
            except CONNECTION_ERRORS:
                self._mark_uncertain([outcome])
                self._pending = batch[index:] + self._pending
                self._ready.set()
                raise
            except Exception:
                log.exception(
                    "outcome.failed",
                    job_id=outcome.job.id,
                    task=outcome.job.task,
                    queue=outcome.job.queue,
                    attempt=outcome.job.attempt,
                    outcome=outcome.kind.value,
                )
                self._uncertain.discard((outcome.job.id, outcome.job.lease_token))
                self.on_written(outcome, WriteResult.FAILED, None, None)
                continue
            self._report(outcome, changed)

    def _report(self, outcome: Outcome, changed: store.Changed) -> None:
        self._uncertain.discard((outcome.job.id, outcome.job.lease_token))
        state = changed.get(outcome.job.id)
        result = WriteResult.FENCED if state is None else WriteResult.WRITTEN
        self.on_written(outcome, result, state, changed.renamed.get(outcome.job.id))

    async def run_once(self) -> int:
        """Write what is pending now, in one transaction; returns how many outcomes. A
        second outcome of a job already in the batch waits for the next one (see
        _one_per_job)."""
        async with self._writing:
            batch, self._pending = _one_per_job(self._pending)
            if self._pending:
                self._ready.set()
            else:
                self._ready.clear()
            if not batch:
                return 0
            self._batch = batch
            try:
                changed = await self._write(batch)
            except BaseException:
                # Keep them, in order, ahead of anything submitted meanwhile. Whatever
                # broke the write, it may have committed first.
                self._mark_uncertain(batch)
                self._pending = batch + self._pending
                self._ready.set()
                raise
            finally:
                self._batch = []
        for outcome in batch:
            self._report(outcome, changed)
        return len(batch)

    async def flush(self, timeout: float) -> bool:
        """Write everything pending, retrying on connection errors, for up to ``timeout``
        seconds; True if nothing is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        backoff = ReconnectBackoff(self.backoff.max_seconds, cut=self._flush_cut)
        while self._pending or self._writing.locked():
            try:
                await run_within(self.run_once(), max(0.01, deadline - loop.time()))
            except _FLUSH_RETRYABLE as exc:
                error: BaseException | None = exc
            except Exception:
                # A refused outcome: write the rest one by one (the refused one is dropped
                # and its lease left to expire), as the run loop would.
                log.exception("completer.batch_failed", outcomes=len(self._pending))
                try:
                    await self._write_singly()
                    error = None
                except _FLUSH_RETRYABLE as exc:
                    error = exc
            else:
                error = None
            if error is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    # The run loop's batch, if it holds the lock, is not back in
                    # _pending yet; a timeout's str() is empty.
                    log.error(
                        "completer.flush_failed",
                        pending=len(self._pending) + len(self._batch),
                        error=str(error).strip() or type(error).__name__,
                    )
                    return False
                await backoff.sleep(min(remaining, backoff.next_delay()))
        return True

    async def _write(self, batch: list[Outcome]) -> store.Changed:
        by_kind: dict[OutcomeKind, list[Outcome]] = {}
        for outcome in batch:
            by_kind.setdefault(outcome.kind, []).append(outcome)
        changed = store.Changed()
        async with self.pool.connection() as conn:
            if len(by_kind) == 1:
                # One statement is atomic by itself: no BEGIN and COMMIT round trips.
                ((kind, items),) = by_kind.items()
                changed.add(await self._write_kind(conn, kind, items))
            else:
                async with conn.transaction():
                    for kind, items in by_kind.items():
                        changed.add(await self._write_kind(conn, kind, items))
            doubtful = (
                [
                    o
                    for o in batch
                    if o.job.id not in changed
                    and o.job.attempted_at is not None
                    and (o.job.id, o.job.lease_token) in self._uncertain
                ]
                if self._uncertain
                else []
            )
            if doubtful:
                changed.add(await self._recorded(conn, doubtful))
        return changed

    async def _recorded(self, conn: AsyncConnection[Any], doubtful: list[Outcome]) -> store.Changed:
        """Which fenced, uncertain outcomes an earlier try did write: {id: state}. If
        the database refuses to say (not a connection problem: that retries the batch),
        they are reported fenced, as they were before this check existed."""
        # (_write keeps only outcomes whose claim time is known: the check needs it.)
        claims = [(o.job.id, o.job.attempted_at) for o in doubtful if o.job.attempted_at]
        try:
            return await store.recorded_outcomes(
                conn,
                worker_id=self.worker_id,
                ids=[job_id for job_id, _ in claims],
                started_ats=[started_at for _, started_at in claims],
            )
        except CONNECTION_ERRORS:
            raise
        except Exception:
            log.exception("completer.check_failed", outcomes=len(doubtful))
            return store.Changed()

    @staticmethod
    async def _write_kind(
        conn: AsyncConnection[Any], kind: OutcomeKind, items: list[Outcome]
    ) -> dict[int, str]:
        ids = [o.job.id for o in items]
        tokens = [o.job.lease_token for o in items]
        durations = [o.duration for o in items]
        if kind is OutcomeKind.SUCCEEDED:
            return await store.complete_jobs(conn, ids=ids, tokens=tokens, durations=durations)
        if kind is OutcomeKind.RETRIED:
            return await store.retry_jobs(
                conn,
                ids=ids,
                tokens=tokens,
                delays=[o.delay_seconds for o in items],
                errors=[o.error or {} for o in items],
                durations=durations,
            )
        if kind is OutcomeKind.SNOOZED:
            return await store.snooze_jobs(
                conn,
                ids=ids,
                tokens=tokens,
                delays=[o.delay_seconds for o in items],
                durations=durations,
            )
        if kind is OutcomeKind.RELEASED:
            return await store.release_jobs(conn, ids=ids, tokens=tokens, durations=durations)
        return await store.dead_letter_jobs(
            conn,
            ids=ids,
            tokens=tokens,
            errors=[o.error or {} for o in items],
            reasons=[o.dead_reason or "exhausted" for o in items],
            durations=durations,
        )
