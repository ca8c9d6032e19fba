"""pgqueue: a Postgres-native background job queue.

Public API: ``Registry`` (and its ``task`` decorator), ``enqueue``, ``enqueue_many``,
``JobSpec``, ``current_job``, ``Worker``, ``Reaper``, the control signals
``PermanentError`` and ``Snooze`` (alias ``RetryLater``), and the error tree.
"""

from __future__ import annotations

__version__ = "0.1.0"

from pgqueue.config import ReaperConfig, WorkerConfig
from pgqueue.context import JobContext, current_job
from pgqueue.enqueue import JobSpec, enqueue, enqueue_many
from pgqueue.errors import (
    AppImportError,
    ConfigError,
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
from pgqueue.models import JobState
from pgqueue.reaper import Reaper
from pgqueue.registry import Registry, Task, TaskCall
from pgqueue.retry import Backoff
from pgqueue.worker import Worker

__all__ = [
    "AppImportError",
    "Backoff",
    "ConfigError",
    "JobContext",
    "JobNotFound",
    "JobSpec",
    "JobState",
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
    "current_job",
    "enqueue",
    "enqueue_many",
    "migrate",
]
