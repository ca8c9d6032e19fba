"""pgqueue: a Postgres-native background job queue.

Public API: ``Registry`` (and its ``task`` decorator), ``enqueue``, ``enqueue_many``,
``JobSpec``, ``current_job``, ``get_job`` and ``cancel_job`` (a ``JobStatus``),
``Worker``, ``Reaper``, the control signals
``PermanentError`` and ``Snooze`` (alias ``RetryLater``), and the error tree.

``Worker`` and ``Reaper`` are imported when first used: a process that only enqueues
(a web server, a script) does not load the worker's pool, logging, metrics and their
libraries (tests/test_imports.py).
"""

from __future__ import annotations

import typing as _typing

__version__ = "0.1.0"

from pgqueue.config import ReaperConfig, WorkerConfig
from pgqueue.context import JobContext, current_job
from pgqueue.control import cancel_job, get_job
from pgqueue.enqueue import JobDict, JobItem, JobSpec, enqueue, enqueue_many
from pgqueue.errors import (
    AppImportError,
    ConfigError,
    HandlerTaskExit,
    JobNotFound,
    LeaseLost,
    MigrationError,
    PayloadTooLarge,
    PermanentError,
    PgQueueError,
    RetryLater,
    SerializationError,
    Snooze,
    UnknownTask,
    ValidationError,
)
from pgqueue.migrate import migrate
from pgqueue.models import JobState, JobStatus
from pgqueue.registry import Registry, Task, TaskCall
from pgqueue.retry import Backoff

if _typing.TYPE_CHECKING:
    from pgqueue.reaper import Reaper
    from pgqueue.worker import Worker

# Public names whose modules are imported on first use (see the module's docstring).
_LAZY = {"Reaper": "pgqueue.reaper", "Worker": "pgqueue.worker"}

__all__ = [
    "AppImportError",
    "Backoff",
    "ConfigError",
    "HandlerTaskExit",
    "JobContext",
    "JobDict",
    "JobItem",
    "JobNotFound",
    "JobSpec",
    "JobState",
    "JobStatus",
    "LeaseLost",
    "MigrationError",
    "PayloadTooLarge",
    "PermanentError",
    "PgQueueError",
    "Reaper",
    "ReaperConfig",
    "Registry",
    "RetryLater",
    "SerializationError",
    "Snooze",
    "Task",
    "TaskCall",
    "UnknownTask",
    "ValidationError",
    "Worker",
    "WorkerConfig",
    "__version__",
    "cancel_job",
    "current_job",
    "enqueue",
    "enqueue_many",
    "get_job",
    "migrate",
]


if not _typing.TYPE_CHECKING:
    # Hidden from type checkers: a module __getattr__ typed to return Any made every
    # name, a misspelled import too, pass them (Worker and Reaper are imported above
    # for them).

    def __getattr__(name: str) -> _typing.Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'pgqueue' has no attribute {name!r}")
        from importlib import import_module

        value = getattr(import_module(module), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
