"""Data that crosses module boundaries: jobs as read from rows, states, outcomes."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class CancelFlag:
    """Set once an operator asks to cancel a running job; read by its handler from any
    thread. A plain attribute (assignment is atomic): a threading.Event per job cost more
    than the rest of the claim bookkeeping. It also carries whether the worker found the
    job's lease lost (``lose``), so that a job costs no second object."""

    __slots__ = ("_lost", "_set")

    def __init__(self) -> None:
        self._set = False
        self._lost = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def lose(self) -> None:
        self._lost = True

    def lost(self) -> bool:
        return self._lost


class JobState(enum.StrEnum):
    """Mirrors the SQL enum ``pgqueue.job_state``; ``DEAD`` means "in pgqueue.dead_jobs"."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    CANCELLED = "cancelled"
    DEAD = "dead"


class UndecodableArgs(dict[str, Any]):
    """Stands in for a job's args that Python cannot decode (a JSON number of thousands of
    digits or beyond a float's range, nesting deeper than the recursion limit: all
    possible from SQL). The job fails permanently with ``error`` instead of breaking the
    claim of its whole batch."""

    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


# Job and Outcome are made for every job: slotted and not frozen, since a frozen
# dataclass's __init__ costs several times as much (object.__setattr__ per field).
# Treat them as read-only all the same.
@dataclass(slots=True, eq=False)
class Job:
    """A job this worker claimed: what it needs to run it and to fence its writes."""

    id: int
    queue: str
    task: str
    # Out of repr: a Job in a log line or a traceback's locals must not show the args.
    args: dict[str, Any] = field(repr=False)
    priority: int
    attempt: int
    max_attempts: int
    run_at: datetime
    created_at: datetime
    lease_token: uuid.UUID
    lease_expires_at: datetime
    cancel_requested: bool = False
    # When this claim started the attempt (the database's clock): with the worker id it
    # names the attempt's history entry (started_at), even where attempt numbers repeat.
    attempted_at: datetime | None = None
    # Set when an operator asks to cancel the job while it runs (seen by the heartbeat).
    cancel: CancelFlag = field(default_factory=CancelFlag, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.cancel_requested:
            self.cancel.set()


class OutcomeKind(enum.StrEnum):
    SUCCEEDED = "succeeded"
    RETRIED = "retried"
    DEAD = "dead"
    SNOOZED = "snoozed"
    RELEASED = "released"


@dataclass(slots=True, eq=False)
class Outcome:
    """What happened to one attempt; written by the completer, fenced by ``lease_token``."""

    job: Job
    kind: OutcomeKind
    duration: float = 0.0
    delay_seconds: float = 0.0
    error: dict[str, Any] | None = None
    dead_reason: str | None = None


@dataclass(frozen=True)
class JobStatus:
    """A job as ``pgqueue status`` shows it, from either table."""

    id: int
    queue: str
    task: str
    state: JobState
    attempts: int
    max_attempts: int
    priority: int
    run_at: datetime
    created_at: datetime
    attempted_at: datetime | None
    finished_at: datetime | None
    lease_expires_at: datetime | None
    leased_by: str | None
    idempotency_key: str | None
    errors: list[dict[str, Any]]
    history: list[dict[str, Any]]
    cancel_requested_at: datetime | None = None
    dead_reason: str | None = None
    # Only when asked for (`pgqueue status --args`): args may hold personal data.
    args: Any = None
    # The reaper requeued it after its worker vanished: it runs alone, every attempt counts.
    rescued: bool = False
    # A dead job stored under a new id (``id``) because pgqueue.dead_jobs held its own:
    # the id it had (migration 0023). None for every other job.
    original_id: int | None = None
