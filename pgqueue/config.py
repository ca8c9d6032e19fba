"""Worker and reaper settings: frozen dataclasses with named defaults and ``validate()``."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import signal
from dataclasses import dataclass

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgqueue.errors import MAX_DELAY_SECONDS, ConfigError, first_line
from pgqueue.registry import MAX_QUEUE_LENGTH, check_name, plain_int

DEFAULT_CONCURRENCY = 10
DEFAULT_LEASE_SECONDS = 30.0
# 25 s, under the 30 s most platforms give a stop by default (Kubernetes'
# terminationGracePeriodSeconds, Heroku, ECS): at 30 s the release of unfinished jobs
# raced the platform's SIGKILL, and a killed worker's jobs come back as rescued jobs,
# run alone. (The deploy files set 30 s with a 60 s grace.)
DEFAULT_SHUTDOWN_TIMEOUT = 25.0
DEFAULT_POLL_INTERVAL = 5.0
DEFAULT_REAPER_INTERVAL = 5.0
DEFAULT_RETENTION_SECONDS = 24 * 3600.0
DEFAULT_REAPER_BATCH = 1000
# How long one reaper pass prunes before it ends (the next pass then starts at once): a
# huge backlog of finished jobs (retention shortened, a reaper down for days) must not
# hold back the requeue of expired leases for as long as the whole backlog takes.
DEFAULT_PRUNE_SECONDS_PER_PASS = 2.0
DEFAULT_RECONNECT_MAX_SECONDS = 10.0
# How long shutdown waits for a claim in flight, so that its jobs get the same grace (or
# release) as the others rather than waiting out their leases.
CLAIM_WAIT_SECONDS = 5.0
# How long shutdown tries to write outcomes when the database is slow or away; after
# that, leases (and the reaper) take care of the rest.
FLUSH_TIMEOUT_SECONDS = 10.0
# How long shutdown waits for handlers it cancelled to end; one that catches its
# cancellation and goes on is then released all the same (and the process exits without
# it). Kept small: it is part of STOP_MARGIN_SECONDS.
CANCEL_GRACE_SECONDS = 3.0
# How long a stopping worker tries to remove its row from pgqueue.workers (the reaper
# forgets a worker that did not after three missed heartbeats).
DEREGISTER_TIMEOUT_SECONDS = 2.0
# How long a step of a stop that was cut short (a statement the database does not
# answer) may take to end, twice: once for psycopg to ask the server to cancel the
# statement, once more after psycopg is told to drop the connection (worker/abort.py).
ABORT_GRACE_SECONDS = 0.5
# How long closing the connection pool waits for its background connects.
POOL_CLOSE_TIMEOUT_SECONDS = 1.0
# How long a stopped worker waits for calls left in its default executor's threads.
DEFAULT_EXECUTOR_GRACE_SECONDS = 1.0
# The least time a worker's stop hooks (Registry.on_shutdown) get, all together: they get
# what the jobs left of --shutdown-timeout, and this much when the jobs took all of it.
SHUTDOWN_HOOKS_MIN_SECONDS = 1.0
# How long a stopping reaper lets its statement in flight run before it cuts the
# statement's connection (a database that takes a statement and never answers would keep
# it from stopping; the statement is abandoned, and whether the server completes it or
# not, it commits alone or not at all), and how long a stopped worker waits for its
# embedded reaper to end.
REAPER_STOP_SECONDS = 3.0
# The most a worker's stop takes beyond --shutdown-timeout, answered or not (each step
# that waits on the database is cut short at its time, plus up to two ABORT_GRACE_SECONDS):
# CLAIM_WAIT_SECONDS for a claim in flight, CANCEL_GRACE_SECONDS for the handlers it
# cancelled, FLUSH_TIMEOUT_SECONDS writing outcomes, SHUTDOWN_HOOKS_MIN_SECONDS for the
# app's stop hooks when the jobs took the whole shutdown timeout, the background loops'
# end, DEREGISTER_TIMEOUT_SECONDS, POOL_CLOSE_TIMEOUT_SECONDS,
# DEFAULT_EXECUTOR_GRACE_SECONDS (29 s), and room for exiting. The supervisor waits this
# long for its children before killing them, and process managers must allow it (README,
# Upgrading; deploy/); an
# embedded reaper adds REAPER_STOP_MARGIN_SECONDS (supervisor.py). A kill all the same
# costs no job (one whose outcome was not written runs again after its lease), only the
# worker's row, which the reaper removes.
STOP_MARGIN_SECONDS = 30.0
# A stop signal repeated within this many seconds of the first is the same stop reaching
# the process twice (coreutils' `timeout` signals its child and then the child's process
# group; so do some process managers), not an operator asking for "exit now" (which
# aborts the running jobs, leaving them to their leases, and makes them rescued). Those
# two arrive microseconds apart; a person, a script or a test that means a second signal
# leaves more than 0.2 s between them (with 0.5 s, a second SIGTERM sent half a second
# after the first could be taken for the same stop: the first one's handler may run late).
REPEATED_SIGNAL_SECONDS = 0.2


def hangup_ignored() -> bool:
    """Whether this process was started with SIGHUP ignored (`nohup`, or a supervisor
    that was, since an ignored signal stays ignored across exec). Worker, supervisor and
    reaper stop on SIGHUP as on SIGTERM, except then: it stays ignored, as asked."""
    return signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


# Far more than one process can run at once, and within the int column
# pgqueue.workers.concurrency.
MAX_CONCURRENCY = 100_000
MAX_BATCH_SIZE = 1_000_000


def finite_number(value: object) -> bool:
    """A finite int or float, bool excepted (an int too big for a float is not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_dsn(dsn: str | None) -> str:
    """The DSN, if libpq can parse it and its ports are numbers; else ConfigError. A
    daemon would otherwise retry a DSN that can never work, for ever."""
    if not dsn:
        raise ConfigError("no database: pass --dsn or set PGQUEUE_DSN")
    # What goes wrong with a connection string usually comes from a password holding
    # characters a URI reserves, and the part quoted would be a piece of that password:
    # these messages quote nothing of the string (they end up in logs and on screens).
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        # libpq's message up to the first thing it quotes (an unbalanced quote in the
        # string makes the quoted parts' ends unknowable).
        first = re.split("[\"']", first_line(exc), maxsplit=1)[0].rstrip(" :")
        if first == "missing":  # missing "=" after "<text>"
            first = "a word with no '=' after it"
        raise ConfigError(f"bad connection string: {first}{_PASSWORD_HINT}") from None
    for port in str(params.get("port") or "").split(","):
        # As libpq reads a port: strtol (white space and a sign around ASCII digits),
        # then 1..65535; an empty one is the default.
        number = _PORT.fullmatch(port)
        if port.strip() and not (number and 0 < int(number.group(1)) < 65536):
            raise ConfigError(
                f"bad connection string: a port is not a number from 1 to 65535{_PASSWORD_HINT}"
            )
    hosts = str(params.get("host") or "").split(",")
    if any("@" in host and not host.startswith("/") for host in hosts):
        # libpq takes the first '@' of user:pa@ss@host as the end of the password: the
        # rest of it became a host name, which every failed connection then logged. (A
        # directory, a Unix socket's, may hold one.)
        raise ConfigError(f"bad connection string: a host name holds '@'{_PASSWORD_HINT}")
    return dsn


_PASSWORD_HINT = (
    " (nothing of the string is quoted here: it may hold the password; in a URI, a"
    " password's @ : / ? # % and spaces are written percent-encoded, as %40 %3A %2F %3F"
    " %23 %25 %20; in key=value form, a value with spaces is written in single quotes)"
)


# libpq settings the daemons add to a DSN that does not set them itself, so that a
# connection whose peer is gone without a reset (a network cut, a failover that moves an
# IP) fails within about half a minute instead of when TCP gives up (about 15 minutes
# with data in flight; never for an idle LISTEN connection). Ignored on Unix sockets.
TCP_DEFAULTS = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",  # milliseconds
    # A server that takes the TCP connection and never answers the login (psycopg
    # waits 130 s by default).
    "connect_timeout": "10",
}


def with_tcp_defaults(dsn: str) -> str:
    """``dsn`` with TCP_DEFAULTS for the settings it leaves out (its own win, and so does
    a PGCONNECT_TIMEOUT in the environment, which libpq reads only for a DSN without
    connect_timeout)."""
    given = conninfo_to_dict(dsn)
    if os.environ.get("PGCONNECT_TIMEOUT"):
        given["connect_timeout"] = os.environ["PGCONNECT_TIMEOUT"]
    missing = {k: v for k, v in TCP_DEFAULTS.items() if k not in given}
    return make_conninfo(dsn, **missing) if missing else dsn


_PORT = re.compile(r"[ \t\n\r\f\v]*\+?([0-9]+)[ \t\n\r\f\v]*", re.ASCII)


def _count(name: str, value: int, high: int) -> None:
    if not plain_int(value) or not 1 <= value <= high:
        raise ConfigError(f"{name} must be an integer in 1..{high}, got {value!r}")


def _seconds(name: str, value: float, low: float, *, low_open: bool = False) -> None:
    """A duration must be a finite number within low..ten years: it reaches the database
    as an interval added to now(), where inf, nan and centuries fail every statement."""
    if (
        not finite_number(value)
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
    # A tuple or a list of names (not Sequence: a str is one); validate() keeps a tuple.
    queues: tuple[str, ...] | list[str] = ()
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
    # Prepared statements run their generic plan (plan_cache_mode = force_generic_plan),
    # made without sequential scans (enable_seqscan = off: store.NO_SEQ_SCANS); session
    # settings. Off behind PgBouncer in transaction pooling mode, where a session setting
    # would reach other clients' server connections.
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
        """This config if it is usable (else ConfigError), with TCP_DEFAULTS in its DSN."""
        check_dsn(self.dsn)
        _count("concurrency", self.concurrency, MAX_CONCURRENCY)
        _seconds("lease", self.lease_seconds, 1)
        if not 0 < self.heartbeat_interval < self.lease_seconds:
            raise ConfigError("heartbeat interval must be > 0 and shorter than the lease")
        _seconds("shutdown timeout", self.shutdown_timeout, 0)
        _seconds("poll interval", self.poll_interval, 0, low_open=True)
        _seconds("reconnect backoff", self.reconnect_max_seconds, 0, low_open=True)
        if isinstance(self.queues, str):
            # Iterated, a string would be served as one-letter queues.
            raise ConfigError(f"queues must be a list of names, not the string {self.queues!r}")
        for queue in self.queues:
            try:
                check_name("queue", queue, MAX_QUEUE_LENGTH)
            except ConfigError as exc:
                raise ConfigError(f"bad queue name {queue!r}: {exc}") from None
        return dataclasses.replace(self, dsn=with_tcp_defaults(self.dsn), queues=tuple(self.queues))


@dataclass(frozen=True)
class ReaperConfig:
    dsn: str
    interval: float = DEFAULT_REAPER_INTERVAL
    retention_seconds: float = DEFAULT_RETENTION_SECONDS
    batch_size: int = DEFAULT_REAPER_BATCH
    prune_seconds_per_pass: float = DEFAULT_PRUNE_SECONDS_PER_PASS
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 3600.0
    reconnect_max_seconds: float = DEFAULT_RECONNECT_MAX_SECONDS
    prepared_statements: bool = True
    # Reap only while holding the embedded reapers' advisory lock (one at a time): for a
    # reaper run inside each worker (`pgqueue-worker --reaper`).
    leader_only: bool = False

    def validate(self) -> ReaperConfig:
        """This config if it is usable (else ConfigError), with TCP_DEFAULTS in its DSN."""
        check_dsn(self.dsn)
        _seconds("interval", self.interval, 0, low_open=True)
        _seconds("retention", self.retention_seconds, 0)
        _count("batch size", self.batch_size, MAX_BATCH_SIZE)
        _seconds("prune time per pass", self.prune_seconds_per_pass, 0, low_open=True)
        _seconds("backoff base", self.backoff_base_seconds, 0)
        _seconds("backoff max", self.backoff_max_seconds, 0)
        if self.backoff_base_seconds > self.backoff_max_seconds:
            # The delay is min(max, base * 2**n): the base would never show.
            raise ConfigError(
                f"backoff base ({self.backoff_base_seconds:g}s) is above the backoff max"
                f" ({self.backoff_max_seconds:g}s)"
            )
        _seconds("reconnect backoff", self.reconnect_max_seconds, 0, low_open=True)
        return dataclasses.replace(self, dsn=with_tcp_defaults(self.dsn))
