"""The command line: ``pgqueue`` (migrate, status, worker, reaper), ``pgqueue-worker`` and
``pgqueue-reaper``. Thin: parse, build a config, call the library. Errors of pgqueue's
own and an unreachable database become one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import os
import sys
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import click
import psycopg

from pgqueue import __version__, log, store
from pgqueue.config import (
    DEFAULT_CONCURRENCY,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_REAPER_INTERVAL,
    DEFAULT_RETENTION_SECONDS,
    DEFAULT_SHUTDOWN_TIMEOUT,
    ReaperConfig,
    WorkerConfig,
)
from pgqueue.errors import AppImportError, ConfigError, JobNotFound, PgQueueError
from pgqueue.registry import Registry

F = TypeVar("F", bound=Callable[..., Any])

EXIT_ERROR = 1
EXIT_USAGE = 2


def dsn_option(fn: F) -> F:
    return click.option(
        "--dsn",
        envvar="PGQUEUE_DSN",
        metavar="DSN",
        help="Postgres connection string (or set PGQUEUE_DSN).",
    )(fn)


def log_options(fn: F) -> F:
    fn = click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"]),
        default="info",
        show_default=True,
        envvar="PGQUEUE_LOG_LEVEL",
        help="Lowest level logged.",
    )(fn)
    return click.option(
        "--log-format",
        type=click.Choice(["auto", "json", "console"]),
        default="auto",
        show_default=True,
        envvar="PGQUEUE_LOG_FORMAT",
        help="auto: JSON lines unless stderr is a terminal.",
    )(fn)


def _require_dsn(dsn: str | None) -> str:
    if not dsn:
        raise ConfigError("no database: pass --dsn or set PGQUEUE_DSN")
    return dsn


def _fail(message: str, code: int = EXIT_ERROR) -> None:
    click.echo(f"pgqueue: {message}", err=True)
    sys.exit(code)


def _guard(fn: Callable[[], int | None]) -> None:
    """Run a command body: pgqueue errors and connection failures become one line."""
    try:
        code = fn()
    except (ConfigError, AppImportError) as exc:
        _fail(str(exc), EXIT_USAGE)
    except PgQueueError as exc:
        _fail(str(exc))
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _fail(f"cannot reach the database: {first}")
    except psycopg.errors.UndefinedTable:
        _fail("the pgqueue schema is missing: run `pgqueue migrate` first")
    else:
        sys.exit(code or 0)


def load_registry(spec: str) -> Registry:
    """Import ``module:attribute`` and return the Registry it names."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AppImportError(f"--app must look like module:registry, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppImportError(f"cannot import app module {module_name!r}: {exc}") from exc
    except Exception as exc:
        raise AppImportError(
            f"importing app module {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    registry = getattr(module, attr, None)
    if not isinstance(registry, Registry):
        raise AppImportError(f"{spec!r} is not a pgqueue.Registry")
    return registry


def _split_queues(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    queues = tuple(q.strip() for q in value.split(","))
    if any(not q for q in queues):
        raise ConfigError(f"--queues has an empty name: {value!r}")
    return queues


# --- pgqueue ------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pgqueue")
def main() -> None:
    """pgqueue: a Postgres-native background job queue."""


@main.command()
@dsn_option
def migrate(dsn: str | None) -> None:
    """Apply the missing schema migrations (a no-op when up to date; safe to run twice at once)."""
    from pgqueue.migrate import migrate as run_migrate

    def body() -> int:
        applied = run_migrate(_require_dsn(dsn))
        if applied:
            for m in applied:
                click.echo(f"applied {m.version:04d}_{m.name}")
        else:
            click.echo("pgqueue schema is up to date")
        return 0

    _guard(body)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


@main.command()
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@dsn_option
def status(job_id: int, as_json: bool, dsn: str | None) -> None:
    """Show a job's state, attempts, run_at and each attempt's error."""

    def body() -> int:
        with psycopg.connect(_require_dsn(dsn), autocommit=True) as conn:
            job = store.job_status(conn, job_id=job_id)
        if job is None:
            raise JobNotFound(f"no job with id {job_id}")
        if as_json:
            click.echo(json.dumps(_jsonable(dataclasses.asdict(job)), indent=2))
            return 0
        rows = [
            ("job", str(job.id)),
            ("task", job.task),
            ("queue", job.queue),
            ("state", job.state.value + (f" ({job.dead_reason})" if job.dead_reason else "")),
            ("attempts", f"{job.attempts}/{job.max_attempts}"),
            ("priority", str(job.priority)),
            ("run_at", job.run_at.isoformat()),
            ("created_at", job.created_at.isoformat()),
        ]
        if job.attempted_at:
            rows.append(("attempted_at", job.attempted_at.isoformat()))
        if job.finished_at:
            rows.append(
                ("died_at" if job.dead_reason else "finished_at", job.finished_at.isoformat())
            )
        if job.lease_expires_at:
            rows.append(("lease_expires_at", job.lease_expires_at.isoformat()))
            rows.append(("leased_by", job.leased_by or ""))
        if job.idempotency_key:
            rows.append(("idempotency_key", job.idempotency_key))
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            click.echo(f"{key:<{width}}  {value}")
        if job.errors:
            click.echo("errors:")
            for err in job.errors:
                click.echo(
                    f"  attempt {err.get('attempt')}  {err.get('at')}  [{err.get('kind')}]"
                    f"  {err.get('error')}"
                )
        return 0

    _guard(body)


# --- worker -------------------------------------------------------------------------------


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--app", required=True, metavar="MODULE:REGISTRY", help="Where the task Registry lives."
)
@click.option(
    "--queues",
    metavar="A,B",
    help="Comma-separated queues to serve"
    " (default: every queue the registry's tasks use, and 'default').",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=DEFAULT_CONCURRENCY,
    show_default=True,
    help="Jobs run at once per process.",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes under one supervisor.",
)
@click.option(
    "--lease-seconds",
    type=click.FloatRange(min=1),
    default=DEFAULT_LEASE_SECONDS,
    show_default=True,
    help="Lease per claim; heartbeats extend it every third of it.",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=DEFAULT_SHUTDOWN_TIMEOUT,
    show_default=True,
    help="Seconds running jobs get to finish after SIGTERM before they are released.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.01),
    default=DEFAULT_POLL_INTERVAL,
    show_default=True,
    help="Safety-net poll when no notification arrives (seconds).",
)
@dsn_option
@log_options
@click.version_option(__version__, prog_name="pgqueue-worker")
def worker_command(
    app: str,
    queues: str | None,
    concurrency: int,
    processes: int,
    lease_seconds: float,
    shutdown_timeout: float,
    poll_interval: float,
    dsn: str | None,
    log_level: str,
    log_format: str,
) -> None:
    """Run jobs: claim from Postgres, execute, heartbeat, record outcomes.

    SIGTERM or SIGINT stops claiming, waits up to --shutdown-timeout for running jobs,
    returns the rest to the queue and exits 0; a second signal exits at once.
    """
    log.configure(log_level, log_format)

    def body() -> int:
        config = WorkerConfig(
            dsn=_require_dsn(dsn),
            queues=_split_queues(queues),
            concurrency=concurrency,
            lease_seconds=lease_seconds,
            shutdown_timeout=shutdown_timeout,
            poll_interval=poll_interval,
        ).validate()
        registry = load_registry(app)
        if processes > 1:
            from pgqueue.supervisor import Supervisor, child_command

            child_args = [
                "--app", app,
                "--concurrency", str(concurrency),
                "--processes", "1",
                "--lease-seconds", str(lease_seconds),
                "--shutdown-timeout", str(shutdown_timeout),
                "--poll-interval", str(poll_interval),
                "--dsn", config.dsn,
                "--log-level", log_level,
                "--log-format", log_format,
            ]  # fmt: skip
            if queues:
                child_args += ["--queues", queues]
            return Supervisor(child_command(child_args), processes, shutdown_timeout).run()
        from pgqueue.worker import Worker

        worker = Worker(registry, config)
        asyncio.run(worker.run())
        return 1 if worker.failed else 0

    _exit_after(body)


def _exit_after(body: Callable[[], int | None]) -> None:
    """Run a daemon body; exit at once even if a timed-out handler thread still runs."""
    try:
        _guard(body)
    except SystemExit as exit_:
        if threading.active_count() > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exit_.code if isinstance(exit_.code, int) else EXIT_ERROR)
        raise


# --- reaper -------------------------------------------------------------------------------


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--interval",
    type=click.FloatRange(min=0.01),
    default=DEFAULT_REAPER_INTERVAL,
    show_default=True,
    help="Seconds between passes.",
)
@click.option("--once", is_flag=True, help="Run one pass, print what it did, and exit.")
@click.option(
    "--retention-seconds",
    type=click.FloatRange(min=0),
    default=DEFAULT_RETENTION_SECONDS,
    show_default=True,
    help="How long succeeded and cancelled jobs are kept.",
)
@click.option(
    "--backoff-base-seconds",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Backoff base for jobs requeued after their lease expired.",
)
@dsn_option
@log_options
@click.version_option(__version__, prog_name="pgqueue-reaper")
def reaper_command(
    interval: float,
    once: bool,
    retention_seconds: float,
    backoff_base_seconds: float,
    dsn: str | None,
    log_level: str,
    log_format: str,
) -> None:
    """Requeue jobs whose lease expired, dead-letter exhausted ones, prune finished jobs.

    Several reapers may run at once. SIGTERM or SIGINT ends the loop after the current
    statement.
    """
    log.configure(log_level, log_format)
    from pgqueue.reaper import Reaper

    def body() -> int:
        reaper = Reaper(
            ReaperConfig(
                dsn=_require_dsn(dsn),
                interval=interval,
                retention_seconds=retention_seconds,
                backoff_base_seconds=backoff_base_seconds,
            )
        )
        if once:
            result = reaper.run_once()
            click.echo(
                f"requeued {len(result.requeued)}, dead-lettered {len(result.dead)},"
                f" pruned {result.pruned}"
            )
            return 0
        reaper.run()
        return 0

    _exit_after(body)


main.add_command(worker_command, name="worker")
main.add_command(reaper_command, name="reaper")


def worker_main() -> None:
    worker_command(prog_name="pgqueue-worker")


def reaper_main() -> None:
    reaper_command(prog_name="pgqueue-reaper")
