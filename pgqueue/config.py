"""Worker and reaper settings: frozen dataclasses with named defaults and ``validate()``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pgqueue.errors import MAX_DELAY_SECONDS, ConfigError

DEFAULT_CONCURRENCY = 10
DEFAULT_LEASE_SECONDS = 30.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_POLL_INTERVAL = 5.0
DEFAULT_REAPER_INTERVAL = 5.0
DEFAULT_RETENTION_SECONDS = 24 * 3600.0
DEFAULT_REAPER_BATCH = 1000
DEFAULT_RECONNECT_MAX_SECONDS = 10.0
# How long shutdown waits for an in-flight claim, and again for writing outcomes when the
# database is slow or away; after that, leases (and the reaper) take care of the rest.
FLUSH_TIMEOUT_SECONDS = 10.0
# How long shutdown waits for handlers it cancelled to end; one that catches its
# cancellation and goes on is then released all the same (and the process exits without
# it). Kept small: the supervisor's deadline and the documented stop grace period allow
# 2 * FLUSH_TIMEOUT_SECONDS + 5 s beyond --shutdown-timeout.
CANCEL_GRACE_SECONDS = 3.0


def _seconds(name: str, value: float, low: float, *, low_open: bool = False) -> None:
    """A duration must be a finite number within low..ten years: it reaches the database
    as an interval added to now(), where inf, nan and centuries fail every statement."""
    if (
        not isinstance(value, int | float)
        or not math.isfinite(value)
        or not (value > low if low_open else value >= low)
        or value > MAX_DELAY_SECONDS
    ):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise ConfigError(
            f"{name} must be a number of seconds {bound} and at most"
            f" {MAX_DELAY_SECONDS:.0f} (ten years), got {value!r}"
        )


@dataclass(frozen=True)
class WorkerConfig:
    dsn: str
    queues: tuple[str, ...] = ()
    concurrency: int = DEFAULT_CONCURRENCY
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    # Heartbeats run every lease_seconds / 3 unless set, so two can be lost in a row.
    heartbeat_seconds: float | None = None
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    # The safety-net poll, for a notification missed while reconnecting.
    poll_interval: float = DEFAULT_POLL_INTERVAL
    reconnect_max_seconds: float = DEFAULT_RECONNECT_MAX_SECONDS
    # Log each job's args with job.claimed (off: args may hold personal data).
    log_args: bool = False
    # Server-side prepared statements (psycopg prepares a query after 5 runs). Off for
    # PgBouncer in transaction pooling mode before 1.21.
    prepared_statements: bool = True
    # Prepared statements run their generic plan (plan_cache_mode = force_generic_plan, a
    # session setting). Off behind PgBouncer in transaction pooling mode, where a session
    # setting would reach other clients' server connections.
    generic_plans: bool = True
    # synchronous_commit = off on the worker's connections: a claim's or an outcome's
    # COMMIT returns before its WAL reaches disk. A Postgres crash can then undo the last
    # fraction of a second of claims and outcomes (those jobs run again); enqueues, made on
    # other connections, are untouched. Off by default (docs/worker.md).
    async_commit: bool = False

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_seconds or self.lease_seconds / 3.0

    def validate(self) -> WorkerConfig:
        if not self.dsn:
            raise ConfigError("no database: pass --dsn or set PGQUEUE_DSN")
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        _seconds("lease", self.lease_seconds, 1)
        if not 0 < self.heartbeat_interval < self.lease_seconds:
            raise ConfigError("heartbeat interval must be > 0 and shorter than the lease")
        _seconds("shutdown timeout", self.shutdown_timeout, 0)
        _seconds("poll interval", self.poll_interval, 0, low_open=True)
        _seconds("reconnect backoff", self.reconnect_max_seconds, 0, low_open=True)
        for queue in self.queues:
            if not queue.strip() or len(queue) > 128:
                raise ConfigError(f"bad queue name {queue!r}")
        return self


@dataclass(frozen=True)
class ReaperConfig:
    dsn: str
    interval: float = DEFAULT_REAPER_INTERVAL
    retention_seconds: float = DEFAULT_RETENTION_SECONDS
    batch_size: int = DEFAULT_REAPER_BATCH
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 3600.0
    reconnect_max_seconds: float = DEFAULT_RECONNECT_MAX_SECONDS
    prepared_statements: bool = True

    def validate(self) -> ReaperConfig:
        if not self.dsn:
            raise ConfigError("no database: pass --dsn or set PGQUEUE_DSN")
        _seconds("interval", self.interval, 0, low_open=True)
        _seconds("retention", self.retention_seconds, 0)
        if self.batch_size < 1:
            raise ConfigError("batch size must be >= 1")
        _seconds("backoff base", self.backoff_base_seconds, 0)
        _seconds("backoff max", self.backoff_max_seconds, 0)
        _seconds("reconnect backoff", self.reconnect_max_seconds, 0, low_open=True)
        return self
