"""The pgqueue exception tree, and the control signals a handler may raise.

Every error pgqueue raises on purpose is a ``PgQueueError``; each class's docstring is
its default message. ``PermanentError`` and ``Snooze`` are not errors of pgqueue's:
handlers raise them to steer what happens to their job.
"""

from __future__ import annotations

import numbers
import re
from datetime import timedelta
from decimal import Decimal
from typing import Any

# The longest delay a retry or snooze may ask for: ten years.
MAX_DELAY_SECONDS = 10 * 365 * 24 * 3600.0


def delay_seconds(value: object, what: str) -> float:
    """The seconds of a delay given as a number or a timedelta (a Decimal too):
    TypeError for what is not a number (a bool, a string, None), ValueError outside
    0..MAX_DELAY_SECONDS (NaN too). ``what`` names the giver in the message."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    elif isinstance(value, Decimal):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{what} takes seconds (a number) or a timedelta, got {type(value).__name__}"
        )
    number: Any = value  # a Real, compared before float() so that 10**400 is refused too
    if not 0 <= number <= MAX_DELAY_SECONDS:
        raise ValueError(f"{what} must be within 0..{MAX_DELAY_SECONDS:g} seconds, got {value!r}")
    return float(number)


# Said wherever a statement fails for want of a migration.
SCHEMA_HINT = "the pgqueue schema is missing or not up to date: run `pgqueue migrate`"


def first_line(exc: BaseException) -> str:
    """An exception's message in one line: a database error's text goes on with the
    statement it failed in, a libpq one with every host it tried. Its type's name when
    the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PgQueueError(Exception):
    """pgqueue error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__class__.__doc__ or "").strip())


class ConfigError(PgQueueError, ValueError):
    """Invalid configuration."""


class ValidationError(PgQueueError, ValueError):
    """Invalid job: nothing was enqueued."""


class SerializationError(ValidationError):
    """Job arguments are not a JSON object of JSON-serialisable values."""


# Raised before anything is sent when over this process's limit. When the database's own
# pgqueue.max_args_bytes is the lower one, its refusal is a failed statement, and has
# aborted the caller's transaction as any failed statement does (README, "Payload size").
class PayloadTooLarge(ValidationError):
    """Job arguments are over the size limit (PGQUEUE_MAX_ARGS_BYTES / pgqueue.max_args_bytes)."""


class UnknownTask(PgQueueError, LookupError):
    """No handler is registered under this task name."""


class MigrationError(PgQueueError):
    """A migration failed; the database was left at the last applied version."""


class AppImportError(ConfigError):
    """The --app module or registry could not be imported."""


class JobNotFound(PgQueueError, LookupError):
    """No job with this id, in pgqueue.jobs or pgqueue.dead_jobs."""


class LeaseLost(PgQueueError):
    """The job's lease expired and was taken over: this worker's result is discarded. A
    handler may raise it to stop once ``current_job().lease_lost`` is True."""


class PermanentError(Exception):
    """Raise from a handler to dead-letter its job now, without further retries."""


class Snooze(Exception):
    """Raise from a handler to run its job again later without counting a failed attempt."""

    def __init__(self, seconds: float | timedelta | Decimal) -> None:
        # A bool or a string is a mistake, said here rather than as a comparison's error.
        self.seconds: float = delay_seconds(seconds, "Snooze")
        super().__init__(f"snoozed for {self.seconds:g}s")


# The name the style guide (and Oban/River users) reach for.
RetryLater = Snooze


class HandlerTaskExit(PgQueueError, RuntimeError):
    """SystemExit or KeyboardInterrupt raised in a task a handler started, in its place:
    asyncio lets those two out of the event loop (the worker would stop at once, with no
    graceful shutdown, leaving every job it runs to the reaper), where the handler that
    awaits the task gets this instead and its attempt fails."""


# What names a pgqueue object in a primary message, in any of the server's languages
# (quotes differ: "pgqueue.jobs", »pgqueue.jobs«, «pgqueue.jobs»), by error code.
_SCHEMA_OBJECTS = {
    "42P01": re.compile(r"(?<![\w$])pgqueue\.\w"),  # relation "pgqueue.jobs" does not exist
    "3F000": re.compile(r"(?<![\w$])pgqueue(?![\w$.])"),  # schema "pgqueue" does not exist
    "42704": re.compile(r"(?<![\w$])pgqueue\.\w"),  # type "pgqueue.job_state" does not exist
    # function pgqueue.enqueue(text) does not exist; not "operator does not exist".
    "42883": re.compile(r"(?<![\w$])pgqueue\.\w+\("),
}


def schema_missing(exc: object) -> bool:
    """Whether a database error means pgqueue's schema, or a table or function of it, is
    not there (a database never migrated, or migrated by an older pgqueue). Judged on
    the primary message alone: the full text quotes the failing query, which names
    pgqueue whatever went wrong."""
    diag = getattr(exc, "diag", None)
    primary = (getattr(diag, "message_primary", None) or "") if diag is not None else ""
    pattern = _SCHEMA_OBJECTS.get(getattr(exc, "sqlstate", None) or "")
    return bool(pattern and pattern.search(primary))
