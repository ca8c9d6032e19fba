"""The current job, readable from inside a handler (sync or async) via ``current_job()``."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from datetime import datetime

from pgqueue.errors import PgQueueError
from pgqueue.models import CancelFlag


@dataclass(frozen=True)
class JobContext:
    """What a handler may know about the job it runs."""

    id: int
    task: str
    queue: str
    attempt: int
    max_attempts: int
    priority: int
    created_at: datetime
    worker_id: str
    _cancel: CancelFlag = field(default_factory=CancelFlag, repr=False, compare=False)

    @property
    def cancel_requested(self) -> bool:
        """True once an operator asked to cancel this job (``pgqueue cancel``). The
        handler decides what to do; a failed attempt of a cancelled job is not retried."""
        return self._cancel.is_set()

    @property
    def lease_lost(self) -> bool:
        """True once this worker found the job's lease lost (it expired, and the reaper may
        have given the job to another worker): whatever this attempt returns or raises is
        discarded. A long handler may look at it between steps and stop, say with
        ``raise LeaseLost()``."""
        return self._cancel.lost()


_current: contextvars.ContextVar[JobContext] = contextvars.ContextVar("pgqueue_job")


def current_job() -> JobContext:
    """The job being run; raises ``PgQueueError`` outside a handler."""
    try:
        return _current.get()
    except LookupError:
        raise PgQueueError("current_job() called outside a pgqueue handler") from None


def running_job() -> JobContext | None:
    """The job being run, or None outside a handler."""
    return _current.get(None)


def set_current(ctx: JobContext) -> contextvars.Token[JobContext]:
    return _current.set(ctx)


def reset_current(token: contextvars.Token[JobContext]) -> None:
    _current.reset(token)
