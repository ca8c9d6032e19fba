"""The Reaper keeps the queue healthy: requeues jobs whose lease expired (with backoff),
dead-letters those with no attempts left, and prunes finished jobs past retention.

Every statement it runs is conditional and uses SKIP LOCKED, so several reapers may run
at once, and a pass interrupted anywhere leaves nothing half-done. It shares only
``store`` with the worker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from types import FrameType
from typing import Any

import psycopg

from pgqueue import metrics, store
from pgqueue.config import REAPER_STOP_SECONDS, ReaperConfig, hangup_ignored
from pgqueue.errors import ConfigError
from pgqueue.log import get_logger
from pgqueue.migrate import SchemaWatch
from pgqueue.worker.backoff import (
    CONNECTION_ERRORS,
    READ_ONLY_ERRORS,
    ReconnectBackoff,
    error_fields,
    retry_event,
)

log: Any = get_logger("pgqueue.reaper")


@dataclass(frozen=True)
class ReapResult:
    requeued: list[int]
    dead: list[int]
    pruned: int
    # Jobs whose lease expired after an operator asked to cancel them: cancelled, not
    # requeued.
    cancelled: list[int] = field(default_factory=list)
    # Finished jobs past their retention were left for the next pass: this one pruned for
    # its prune_seconds_per_pass.
    more_to_prune: bool = False


# Added to two reaper intervals: how long a lease may have been expired before a standby
# embedded reaper reaps too (the leader should have requeued it by then).
STANDBY_SLACK_SECONDS = 5.0
# Added to two reaper intervals: how long the leading session may stay idle (or in one
# statement) before standbys take it for stalled and reap too (pruning included).
STALL_SLACK_SECONDS = 30.0

# How soon the loop notices a stop signal while it waits between passes.
SIGNAL_CHECK_SECONDS = 0.1

# The errors by which the database refuses a dead-letter move or a prune for some of its
# jobs, not for all: a foreign key to pgqueue.jobs that forbids the delete (NO ACTION or
# RESTRICT), a constraint or a trigger of the user's (RAISE). Not a schema missing
# (ProgrammingError) or a connection problem: those fail the pass as before.
REFUSALS: tuple[type[psycopg.Error], ...] = (
    psycopg.IntegrityError,
    psycopg.DataError,
    psycopg.errors.RaiseException,
)
# A job refused so is left out of this reaper's batches for this long, then tried again
# (the foreign key may have been changed meanwhile). At most MAX_REFUSED of them are
# remembered per step (each batch statement filters on that list); those beyond are
# tried, one at a time, every pass.
REFUSED_RETRY_SECONDS = 600.0
MAX_REFUSED = 1000
# Candidates the dead-letter step moves one at a time after a refused batch.
MAX_DEAD_LETTER_SINGLY = 100
# The outage a reaper that never had a good pass assumes (it started in one): long.
UNKNOWN_OUTAGE_SECONDS = 1e9
# foreign_key_violation, and restrict_violation (ON DELETE RESTRICT).
FOREIGN_KEY_STATES = frozenset({"23503", "23001"})
REFUSED_OTHER_HINT = (
    "the database refused these jobs' move or delete (a trigger or a constraint of"
    f" yours?). They are left as they are, and tried again in {REFUSED_RETRY_SECONDS / 60:g}"
    " minutes"
)
REFUSED_HINT = (
    "pgqueue deletes a job's row when it dead-letters or prunes it: a foreign key that"
    " references pgqueue.jobs must be ON DELETE SET NULL or ON DELETE CASCADE. These jobs"
    f" are left as they are, and tried again in {REFUSED_RETRY_SECONDS / 60:g} minutes"
)


class Reaper:
    def __init__(self, config: ReaperConfig) -> None:
        self.config: ReaperConfig = config.validate()
        config = self.config
        self._stop = threading.Event()
        # Set by the signal handler, which must not touch the Event: its lock may be held
        # by the very thread the signal interrupted (inside Event.wait), and waiting for
        # it would hang the reaper. The loop waits in short slices and checks this too.
        self._signal: int | None = None
        self._conn: psycopg.Connection[Any] | None = None
        # A connection still being set up (its session statements), for _cut_short.
        self._connecting: psycopg.Connection[Any] | None = None
        # Held while _conn or _connecting is replaced or closed, and while _cut_short
        # shuts a socket down from another thread: never a file descriptor reused.
        self._conn_lock = threading.Lock()
        # Whether a _watch_stop thread runs (see watching_stops); set to end it at once.
        self._watching = False
        self._stop_watched = threading.Event()
        self.backoff: ReconnectBackoff = ReconnectBackoff(config.reconnect_max_seconds)
        self._looping = False
        self._database_health = metrics.database_health(config.dsn)
        self._schema = SchemaWatch(log, "reaper")
        # An embedded reaper's worker checks the NOTIFY-queue limit's settings itself.
        self._schema.notify_limit_checked = config.leader_only
        # leader_only: whether this connection holds the leadership lock; None until
        # the first pass asked (and again after a reconnect).
        self._leader: bool | None = None
        # The server process that took the lock: another one later, on the same
        # connection, means a pooler (PgBouncer in transaction mode) hands out sessions.
        self._lead_pid: int | None = None
        self._pooled = False
        # A standby reaps when a lease has been expired this long, or the leading
        # session has been quiet this long.
        self._standby_grace = 2 * config.interval + STANDBY_SLACK_SECONDS
        self._stall_seconds = 2 * config.interval + STALL_SLACK_SECONDS
        self._covering: str | None = None
        # While a pass runs: when it last got an answer from the database (monotonic).
        self._progress_at: float | None = None
        # Per step ("dead_letter", "prune"): jobs the database refused, and when
        # (_refusable).
        self._refused: dict[str, dict[int, float]] = {"dead_letter": {}, "prune": {}}
        self._refused_now = 0
        # Whether this reaper had a connection (or tried to) before, and when (the
        # server's clock) it last got one back after that: requeue_expired.
        self._connected_once = False
        self._regained_at: datetime | None = None
        # How long it was without the database then (since _last_good: the end of its
        # last pass, or its connection's start).
        self._outage_seconds = 0.0
        self._last_good: float | None = None

    def health(self) -> tuple[bool, str]:
        """For /healthz (called from the metrics thread): is the loop running and does
        the database answer?"""
        if not self._looping:
            return False, "not running"
        progress_at = self._progress_at
        if progress_at is not None:
            waited = time.monotonic() - progress_at
            if waited > self._stall_seconds:
                return False, (
                    f"a pass has waited {waited:.0f}s for one statement: it waits for a"
                    " lock on a pgqueue table (a migration, a LOCK TABLE, an open"
                    " transaction of an ALTER?), or the database does not answer"
                )
        return self._database_health()

    def stop(self, *, cancel: bool = False) -> None:
        """Finish the current statement and exit the loop; idempotent. ``cancel``: ask
        the server to cancel the statement in flight instead (from another thread; a
        worker stopping with its embedded reaper), which is safe: each statement of a
        pass commits alone or not at all."""
        self._stop.set()
        conn = self._conn
        if cancel and conn is not None and not conn.closed:
            with contextlib.suppress(Exception):
                cancel_safe = getattr(conn, "cancel_safe", None)  # psycopg 3.2+
                if cancel_safe is not None:
                    cancel_safe(timeout=2.0)
                else:
                    conn.cancel()

    def _stopping(self) -> bool:
        return self._signal is not None or self._stop.is_set()

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._stop.wait(min(remaining, SIGNAL_CHECK_SECONDS))

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._leader:
                # The lock went with the old connection's session (the next pass asks
                # for it again).
                log.info("reaper.leadership_lost", pid=os.getpid())
            self._leader = None
            regained = self._connected_once
            try:
                conn = store.connect(
                    self.config.dsn,
                    **store.application_name("pgqueue-reaper"),
                    prepare_threshold=5 if self.config.prepared_statements else None,
                    # Its prepared statements' plans live as long as the connection.
                    no_seq_scans=self.config.prepared_statements,
                    on_connected=self._set_connecting,
                )
                if regained:
                    # Not the first connection: the last one was lost (or none could be
                    # had). Leases that ran out meanwhile say nothing of their workers
                    # (requeue_expired): those registered get three heartbeats from now,
                    # if the outage was longer than one.
                    try:
                        regained_at = store.database_now(conn)
                    except BaseException:
                        conn.close()
                        raise
                    self._regained_at = regained_at
                    self._outage_seconds = (
                        UNKNOWN_OUTAGE_SECONDS
                        if self._last_good is None
                        else time.monotonic() - self._last_good
                    )
            except BaseException:
                self._connected_once = True  # a reaper that starts in an outage waits too
                raise
            finally:
                self._set_connecting(None)
            with self._conn_lock:
                self._conn = conn
            self._connected_once = True
            self._last_good = time.monotonic()
        return self._conn

    def _set_connecting(self, conn: psycopg.Connection[Any] | None) -> None:
        with self._conn_lock:
            self._connecting = conn

    def _batches(self, fetch: Callable[[], list[Any]]) -> Iterator[list[Any]]:
        """Run ``fetch`` batch after batch until a short batch (or stop): a huge backlog
        never becomes one giant transaction. A batch the database refused some jobs of
        (_refusable) is short by those only."""
        while not self._stopping():
            self._refused_now = 0
            rows = fetch()
            self._progress_at = time.monotonic()
            yield rows
            if len(rows) + self._refused_now < self.config.batch_size:
                return

    @property
    def leading(self) -> bool:
        """Whether this reaper reaps every pass: always, unless ``leader_only``."""
        return not self.config.leader_only or self._pooled or bool(self._leader)

    def _lead(self, conn: psycopg.Connection[Any]) -> bool:
        """Hold or take the lead; False: stand by. Under a pooler that hands each
        transaction another session the lock means nothing: reap every pass then."""
        if self._pooled:
            return True
        if self._leader:
            if store.reaper_backend_pid(conn) == self._lead_pid:
                return True
            log.error(
                "reaper.pooled_session",
                pid=os.getpid(),
                reason="this connection's server process changed (PgBouncer in transaction"
                " pooling?): the lead's session lock cannot work there; reaping every pass",
            )
            self._pooled = True
            return True
        leader, self._lead_pid = store.try_reaper_leadership(conn)
        if leader:
            log.info("reaper.leading", pid=os.getpid())
        elif self._leader is None:
            log.info(
                "reaper.standby", pid=os.getpid(), reason="another worker's reaper holds the lead"
            )
        self._leader = leader
        return leader

    def _cover(self, conn: psycopg.Connection[Any]) -> bool:
        """For a standby: reap anyway? The lead only saves repeated work (every statement
        of a pass is safe beside another reaper's): a leader that stopped reaping
        without losing its lock (a frozen process, a stuck statement) must not stall
        recovery or pruning."""
        check = store.standby_check(
            conn, grace_seconds=self._standby_grace, stall_seconds=self._stall_seconds
        )
        why = (
            f"a lease expired over {self._standby_grace:g}s ago is still running"
            if check["overdue"]
            else f"the leading reaper's session has been quiet for over {self._stall_seconds:g}s"
            if check["stalled"]
            else "the leading reaper's session cannot be seen (it just ended, or this role"
            " lacks pg_read_all_stats and the leader connects as another role)"
            if check["stalled"] is None
            else None
        )
        if why is not None and why != self._covering:
            log.warning("reaper.covering", pid=os.getpid(), reason=why + ": reaping too")
        self._covering = why
        return why is not None

    def run_once(self, *, prune_seconds: float | None = None) -> ReapResult:
        """One pass: requeue expired, dead-letter exhausted, prune; batch by batch. With
        ``leader_only``, nothing unless this reaper holds (or takes) the lead, or the
        leader looks stalled (see _cover). Pruning stops after ``prune_seconds``
        (``config.prune_seconds_per_pass`` unless given; ``math.inf``: the whole
        backlog) at the end of a batch, and the result says whether any was left."""
        if prune_seconds is not None and not (
            isinstance(prune_seconds, int | float)
            and not isinstance(prune_seconds, bool)
            and prune_seconds > 0  # NaN is not; math.inf is
        ):
            raise ConfigError(
                f"prune_seconds must be seconds > 0 or math.inf, got {prune_seconds!r}"
            )
        conn = self._connection()
        # Each pass until the database is known to have this version's migrations.
        if not self._schema.settled:
            self._schema.observe(store.applied_versions(conn))
        if not self._schema.notify_limit_checked:
            self._schema.observe_notify_limit(store.notify_limit_ignored(conn))
        if self.config.leader_only and not self._lead(conn) and not self._cover(conn):
            self._last_good = time.monotonic()
            return ReapResult([], [], 0)
        self._progress_at = time.monotonic()
        requeued: list[int] = []
        cancelled: list[int] = []
        dead: list[int] = []
        cfg = self.config
        regained, outage = self._regained_at, self._outage_seconds
        for rows in self._batches(
            lambda: store.requeue_expired(
                conn,
                batch_size=cfg.batch_size,
                backoff_base_seconds=cfg.backoff_base_seconds,
                backoff_max_seconds=cfg.backoff_max_seconds,
                regained_at=regained,
                outage_seconds=outage,
            )
        ):
            for row in rows:
                metrics.LEASES_EXPIRED.labels(row["queue"]).inc()
                was_cancelled = row["state"] == "cancelled"
                (cancelled if was_cancelled else requeued).append(row["id"])
                log.warning(
                    "job.cancelled" if was_cancelled else "reaper.requeued",
                    job_id=row["id"],
                    task=row["task"],
                    queue=row["queue"],
                    # The attempt that was lost, and whether it counts (a first loss,
                    # not run alone, does not: migration 0003).
                    attempt=row["ran_attempt"],
                    counted=row["counted"],
                    worker=row["leased_by"],
                    reason="lease_expired",
                )
        for rows in self._batches(
            lambda: self._refusable(
                "dead_letter",
                lambda skip: store.dead_letter_expired(
                    conn,
                    batch_size=cfg.batch_size,
                    skip=skip,
                    regained_at=regained,
                    outage_seconds=outage,
                ),
                lambda skip: store.dead_letter_candidates(
                    conn,
                    batch_size=min(cfg.batch_size, MAX_DEAD_LETTER_SINGLY),
                    skip=skip,
                    regained_at=regained,
                    outage_seconds=outage,
                ),
                lambda job_id, skip: store.dead_letter_expired(
                    conn,
                    batch_size=1,
                    skip=skip,
                    only=job_id,
                    regained_at=regained,
                    outage_seconds=outage,
                ),
            )
        ):
            for row in rows:
                metrics.LEASES_EXPIRED.labels(row["queue"]).inc()
                # dead_id: where pgqueue.dead_jobs held the job's id, the new one it is
                # stored under (migration 0023).
                renamed = {"dead_id": row["dead_id"]} if row["dead_id"] != row["id"] else {}
                log.error(
                    "job.dead",
                    job_id=row["id"],
                    task=row["task"],
                    queue=row["queue"],
                    attempt=row["attempts"],
                    reason="lease_expired",
                    **renamed,
                )
                dead.append(row["id"])
        pruned = 0
        more_to_prune = False
        until = time.monotonic() + (
            cfg.prune_seconds_per_pass if prune_seconds is None else prune_seconds
        )
        retention = cfg.retention_seconds
        for ids in self._batches(
            lambda: self._refusable(
                "prune",
                lambda skip: store.prune_finished(
                    conn, retention_seconds=retention, batch_size=cfg.batch_size, skip=skip
                ),
                lambda skip: store.prune_candidates(
                    conn, retention_seconds=retention, batch_size=cfg.batch_size, skip=skip
                ),
                lambda job_id, skip: store.prune_job(
                    conn, job_id=job_id, retention_seconds=retention
                ),
            )
        ):
            pruned += len(ids)
            if len(ids) + self._refused_now == cfg.batch_size and time.monotonic() >= until:
                more_to_prune = True
                break
        if pruned:
            metrics.JOBS_PRUNED.inc(pruned)
            log.info("reaper.pruned", jobs=pruned, more=more_to_prune)
        for row in store.delete_stale_workers(conn, regained_at=regained, outage_seconds=outage):
            log.warning("reaper.worker_gone", worker_id=row["id"], host=row["host"], pid=row["pid"])
        self._last_good = time.monotonic()
        return ReapResult(requeued, dead, pruned, cancelled, more_to_prune)

    def _refusable(
        self,
        step: str,
        batch: Callable[[list[int]], list[Any]],
        candidates: Callable[[list[int]], list[int]],
        one: Callable[[int, list[int]], list[Any]],
    ) -> list[Any]:
        """One batch of ``step``, leaving out the jobs the database refused lately. If it
        refuses this batch (REFUSALS), its jobs one at a time: one job referenced by a
        foreign key that forbids its delete failed every batch it was in, and with it
        every later step of the pass, so that nothing was pruned or dead-lettered again,
        and stale workers stayed. The refused ones are logged (reaper.refused) and left
        out for REFUSED_RETRY_SECONDS. ``one(job, skip)`` acts on that job alone (not one
        another session holds locked). Every try (two or more) refused for the same
        reason, not a foreign key's, is the statement's error, not its jobs' (a NOT NULL
        column someone added to pgqueue.dead_jobs, say): it fails the pass as before."""
        refused = self._refused[step]
        cutoff = time.monotonic() - REFUSED_RETRY_SECONDS
        for job_id in [j for j, at in refused.items() if at < cutoff]:
            del refused[job_id]
        skip = list(refused)
        try:
            return batch(skip)
        except REFUSALS as exc:
            error: psycopg.Error = exc
        jobs = candidates(skip)
        rows: list[Any] = []
        refused_now: list[int] = []
        states: set[str | None] = set()
        remembered = 0
        for job_id in jobs:
            if self._stopping():
                break
            try:
                rows.extend(one(job_id, skip))
            except REFUSALS as exc:
                error = exc
                states.add(exc.sqlstate)
                refused_now.append(job_id)
                if len(refused) < MAX_REFUSED:
                    refused[job_id] = time.monotonic()
                    remembered += 1
            self._progress_at = time.monotonic()
        if (
            len(refused_now) > 1
            and not rows
            and len(states) == 1
            and not states & FOREIGN_KEY_STATES
        ):
            for job_id in refused_now:
                refused.pop(job_id, None)
            raise error
        # Only the refusals remembered make the batch full: those beyond MAX_REFUSED
        # would be picked again at once, and the pass would never end.
        self._refused_now = remembered
        if refused_now:
            log.error(
                "reaper.refused",
                step=step,
                jobs=len(refused_now),
                job_ids=refused_now[:20],
                **error_fields(error),
                hint=REFUSED_HINT if states & FOREIGN_KEY_STATES else REFUSED_OTHER_HINT,
            )
        return rows

    def handle_signals(self) -> None:
        """SIGTERM, SIGINT and SIGHUP (unless ignored when it started, as under `nohup`)
        stop this reaper after the statement in flight (the loop, or a pass between two
        batches); one the database has not answered within REAPER_STOP_SECONDS is cut
        short. Main thread only."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if not hangup_ignored():
            signal.signal(signal.SIGHUP, self._on_signal)

    def run(self, *, handle_signals: bool = True) -> None:
        """Pass every ``interval`` seconds until stopped (SIGTERM/SIGINT/SIGHUP)."""
        if handle_signals:
            self.handle_signals()
        metrics.count_disconnects_from_zero("reaper")
        log.info("reaper.started", interval=self.config.interval)
        self._looping = True
        with self.watching_stops():
            self._loop()
        if self._signal is not None:
            log.info("reaper.stopping", signal=signal.Signals(self._signal).name)
        self._looping = False
        self._close()
        log.info("reaper.stopped")

    def _loop(self) -> None:
        while not self._stopping():
            try:
                self._progress_at = time.monotonic()
                try:
                    result = self.run_once()
                finally:
                    self._progress_at = None
                if self.backoff.failures:
                    log.info("reaper.reconnected")
                self.backoff.reset()
                # A pass that left finished jobs to prune is followed by the next at once:
                # its requeue first, then more pruning.
                wait = 0.0 if result.more_to_prune else self.config.interval
            except CONNECTION_ERRORS as exc:
                if self._stopping():
                    # The statement cancelled by stop(cancel=True) (QueryCanceled is an
                    # OperationalError), or a connection lost while stopping anyway.
                    break
                wait = self.backoff.next_delay()
                event = retry_event("reaper", exc, self._conn)
                log.warning(event, **error_fields(exc), retry_in=round(wait, 2))
                if (
                    event == "reaper.disconnected"
                    or isinstance(exc, READ_ONLY_ERRORS)  # a new session may write
                    or not self._conn_idle()
                ):
                    self._close()
                # else a statement refused on a sound connection (a serialization
                # failure, a lock or statement timeout): keep it, and with it the lead.
            except Exception:
                if self._stopping():
                    break
                # The database refused a statement (say, the schema is not migrated yet).
                wait = self.backoff.next_delay()
                log.exception("reaper.failed", retry_in=round(wait, 2))
            self._sleep(wait)

    def _conn_idle(self) -> bool:
        conn = self._conn
        return (
            conn is not None
            and not conn.closed
            and not conn.broken
            and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        )

    def _close(self) -> None:
        with self._conn_lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None

    @contextlib.contextmanager
    def watching_stops(self) -> Iterator[None]:
        """While in this block (run(), or one pass of `pgqueue-reaper --once`), a stop
        gives the statement in flight REAPER_STOP_SECONDS and then cuts it short: a
        database that took it and does not answer (a hung server, a PgBouncer whose
        server is gone) would keep the reaper, and its process, from ever stopping."""
        self._watching = True
        watcher = threading.Thread(target=self._watch_stop, name="reaper-stop", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            self._watching = False
            self._stop_watched.set()
            watcher.join()
            self._stop_watched.clear()

    def _watch_stop(self) -> None:
        while self._watching and not self._stopping():
            self._stop_watched.wait(SIGNAL_CHECK_SECONDS)
        deadline = time.monotonic() + REAPER_STOP_SECONDS
        while self._watching:
            if time.monotonic() >= deadline and self._cut_short():
                return
            self._stop_watched.wait(SIGNAL_CHECK_SECONDS)

    def _cut_short(self) -> bool:
        """Shut down the socket of a connection waiting for a statement's answer: libpq's
        wait ends with a lost connection, which a stopping reaper takes as its end. The
        statement is abandoned, not undone: the server may still complete it, and each
        statement of a pass commits alone or not at all. True if it did."""
        with self._conn_lock:
            conn = self._connecting or self._conn
            if conn is None or conn.closed:
                return False
            if conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.ACTIVE:
                return False
            # A duplicate of the descriptor: shutdown() acts on the socket both share,
            # and closing the duplicate leaves libpq's descriptor to libpq.
            with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fileno())) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        log.warning("reaper.statement_abandoned", waited_seconds=REAPER_STOP_SECONDS)
        return True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a plain assignment: the handler runs on the main thread wherever it was
        # (see _signal); the loop logs the stop.
        if self._signal is None:
            self._signal = signum
