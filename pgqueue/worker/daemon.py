"""The Worker: wires listener, fetcher, executor, heartbeat and completer on one event
loop, owns the slot count, and runs the graceful shutdown.

Life of a job here: claimed (held, leased) -> running in a slot -> outcome queued ->
outcome written (no longer held). Leases of held jobs are extended by the heartbeat
until their outcome is written, so a slow flush never lets a finished job expire.
Shutdown: stop claiming, wait up to ``shutdown_timeout`` for running jobs, cancel and
release the rest (without counting the attempt), flush outcomes, close connections.
See docs/worker.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from types import FrameType
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from pgqueue import __version__, metrics, store
from pgqueue.config import (
    CANCEL_GRACE_SECONDS,
    CLAIM_WAIT_SECONDS,
    DEREGISTER_TIMEOUT_SECONDS,
    FLUSH_TIMEOUT_SECONDS,
    POOL_CLOSE_TIMEOUT_SECONDS,
    REPEATED_SIGNAL_SECONDS,
    SHUTDOWN_HOOKS_MIN_SECONDS,
    WorkerConfig,
    hangup_ignored,
)
from pgqueue.errors import SCHEMA_HINT, first_line
from pgqueue.log import get_logger, schema_missing
from pgqueue.migrate import SchemaWatch
from pgqueue.models import Job, Outcome, OutcomeKind
from pgqueue.registry import Registry
from pgqueue.worker.abort import finish_within, run_within
from pgqueue.worker.backoff import (
    CONNECTION_ERRORS,
    READ_ONLY_ERRORS,
    ReconnectBackoff,
    Reconnects,
    error_fields,
    retry_event,
)
from pgqueue.worker.completer import Completer, WriteResult
from pgqueue.worker.executor import Executor, contain_handler_tasks, describe
from pgqueue.worker.heartbeat import Heartbeat
from pgqueue.worker.hooks import Hooks
from pgqueue.worker.listener import Listener

log: Any = get_logger("pgqueue.worker")

# Added to the time since a claim was sent when asking for the next due job: the claim's
# now() on the server is later than its sending, but this covers a server that took the
# next statement later than the claim (the two use different pooled connections).
DUE_LOOKBACK_MARGIN = 0.05
# Tokens of refused outcomes the worker remembers (see Worker._refused).
REFUSED_KEPT = 10_000
# How often a supervised worker checks that its supervisor still lives.
PARENT_CHECK_SECONDS = 1.0
# The signals the worker stops on: SIGTERM, SIGINT and SIGHUP (a terminal that hangs up)
# gracefully, SIGQUIT at once.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
# How often the worker checks that its stop signals are still its own (_guard_signals).
SIGNAL_GUARD_SECONDS = 1.0
# Down the exit-now pipe when the worker stopped: the thread ends (signal numbers are
# never 0).
STOPPED_BYTE = b"\x00"


def stop_signals() -> tuple[signal.Signals, ...]:
    """STOP_SIGNALS, less SIGHUP where it is ignored (config.hangup_ignored)."""
    return tuple(sig for sig in STOP_SIGNALS if not (sig is signal.SIGHUP and hangup_ignored()))


# How long the loop gets to carry out an "exit now" signal before the exit-now thread
# does (see Worker._signal_arrived).
EXIT_NOW_SECONDS = 0.5


def make_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


_fork_hook_registered = False


def _forked_child_signals() -> None:
    """In a process forked from the worker (a handler's multiprocessing, on Linux by
    default): the worker's signal set-up is not the child's. asyncio's wake-up fd is a
    socket the child shares with the worker, so a signal sent to the child (a Pool's
    terminate(), say) reached the worker's loop as the worker's own, and stopped it;
    and the child ignored it. The child gets Python's defaults back."""
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
        if not hangup_ignored():
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _reset_signals_after_fork() -> None:
    """Once per process (a fork hook cannot be taken back; it only restores defaults)."""
    global _fork_hook_registered
    if not _fork_hook_registered:
        os.register_at_fork(after_in_child=_forked_child_signals)
        _fork_hook_registered = True


class _WorkerPool(AsyncConnectionPool):
    """The worker's pool: a connection whose session turned out read-only (a standby,
    ``default_transaction_read_only``) is closed rather than returned, so that the pool
    replaces it with a new session, which reads the server's state and settings anew."""

    @contextlib.asynccontextmanager
    async def connection(
        self, timeout: float | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with super().connection(timeout) as conn:
            try:
                yield conn
            except READ_ONLY_ERRORS:
                await conn.close()
                raise


class Worker:
    """Runs jobs from ``config.queues`` (default: the registry's queues) until stopped."""

    def __init__(
        self,
        registry: Registry,
        config: WorkerConfig,
        *,
        worker_id: str | None = None,
        supervised: bool = False,
        parent_pid: int | None = None,
        on_started: Callable[[], object] | None = None,
        stop_hooks_seconds: float | None = None,
    ) -> None:
        self.registry = registry
        # How long the stop hooks get: by default what the jobs leave of the shutdown
        # timeout, at least SHUTDOWN_HOOKS_MIN_SECONDS (pgqueue.testing.drain, which
        # releases the jobs at once, gives them its own time).
        self._stop_hooks_seconds = stop_hooks_seconds
        # Called once the worker's loops run (a supervised child tells its supervisor).
        self._on_started = on_started
        # Run by a --processes supervisor: see _on_signal.
        self.supervised: bool = supervised
        # The supervisor's pid: if it dies (SIGKILL, OOM killer) this worker is orphaned
        # and stops gracefully rather than run on unsupervised (see _watch_parent).
        self.parent_pid = parent_pid
        self.config: WorkerConfig = config.validate()
        config = self.config
        # Deduplicated: the claim scans each queue once per name it is given.
        self.queues: tuple[str, ...] = tuple(dict.fromkeys(config.queues or registry.queues()))
        self.worker_id: str = worker_id or make_worker_id()
        # Each new connection of the pool cuts short the loops' reconnect backoffs.
        self._reconnects = Reconnects()
        self._configure_session = store.worker_connection_configurer(
            generic_plans=config.prepared_statements and config.generic_plans,
            async_commit=config.async_commit,
        )
        self.pool: _WorkerPool = _WorkerPool(
            config.dsn,
            # Fetcher, completer and heartbeat each hold one at times. All three are opened
            # at start: a pool that grows on demand makes the first claims that meet a
            # busy completer wait for a new connection (milliseconds of job latency).
            min_size=3,
            max_size=3,
            open=False,
            timeout=5.0,
            # How long the pool retries one lost connection (after 1, 2, 4, ... s) before
            # it gives up on it; the next request for a connection starts a new try at
            # once. The loops that ask back off on their own, up to the same bound. Set to
            # a year, the pool's doubling delays went on for the whole of an outage, and
            # after it the connections came back as late as the outage had lasted (one of
            # 40 s: 23 s), while leases expired and a shutdown's flush failed.
            reconnect_timeout=config.reconnect_max_seconds,
            configure=self._configure_connection,
            kwargs={
                "autocommit": True,
                **store.application_name("pgqueue-worker"),
                "prepare_threshold": 5 if config.prepared_statements else None,
            },
            # Its own name: its background tasks are named after it (see _shutdown), and
            # psycopg's warnings name it.
            name=f"pgqueue-worker {self.worker_id}",
        )
        self.executor: Executor = Executor(
            registry, self.worker_id, threads=config.concurrency, on_thread_freed=self._thread_freed
        )
        self.executor.on_gave_up = self._on_gave_up
        # Held from sending a claim until its jobs are in _held, so that the heartbeat
        # can tell this worker's orphans (running under its name, not held) from jobs
        # whose claim is still on its way back.
        self._claiming = asyncio.Lock()
        # Keyed by the Job object of each claim (identity hash: a claim makes a new Job),
        # not by id: if a claim's commit is undone (a Postgres crash under --async-commit,
        # a failover) this worker may claim the same job again while its first run goes
        # on; keyed by id, the second would hide the first from the slot count and from
        # shutdown. (Keyed by lease token, each job paid four UUID hashes.)
        self._held: dict[Job, None] = {}
        # Lease tokens of outcomes the database refused (WriteResult.FAILED): their jobs
        # stay running until the lease expires and the reaper takes over, so the heartbeat
        # must not release them as orphans (that would not count an attempt that keeps
        # failing the same way). Refusals are rare; the oldest go past REFUSED_KEPT.
        self._refused: dict[uuid.UUID, None] = {}
        # (id, lease token) of attempts whose lease the heartbeat found lost: keyed by
        # token too, since this worker may claim the same job again meanwhile.
        self._lost: set[tuple[int, uuid.UUID]] = set()
        self._running: dict[Job, asyncio.Task[None]] = {}
        # When each running handler started (monotonic): a release at shutdown records
        # how long it ran, also for one released while it goes on (_release_stubborn).
        self._run_started: dict[Job, float] = {}
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._signals = 0
        self._first_signal_at = 0.0
        # When each stop signal arrived (monotonic; see run and _on_signal).
        self._signal_arrivals: list[float] = []
        # The write end of the pipe that wakes _exit_if_loop_blocked (see run), once.
        self._exit_pipe: int | None = None
        self._schema = SchemaWatch(log, "worker")
        # True when the worker stopped because one of its parts died (exit code 1).
        self.failed: bool = False
        # False when the stop could not write every outcome (exit code 1 too): their
        # jobs stay running until their leases expire, and the reaper requeues them.
        self.flushed: bool = True
        # Async handlers still running when the worker stopped: they ignored their
        # cancellation (see _release_stubborn). The process exits without waiting for them.
        self.stubborn_handlers: int = 0
        # Lease tokens of attempts whose outcome was submitted while their handler still
        # ran (released at shutdown, or given up on after a timeout it ignored): the
        # outcome of the handler's end is dropped, one outcome per attempt.
        self._released_early: set[uuid.UUID] = set()
        # The stop signals run() took (none unless it handles signals): _guard_signals.
        self._stop_signals: tuple[signal.Signals, ...] = ()
        # Whether run() has ended, and whether the loop ended under it (see loop_ended).
        self.run_ended = False
        self._loop_ended = False
        # Jobs running when the event loop ended under the worker (loop_ended): no outcome
        # is written for them; their leases run out and the reaper requeues them.
        self._left_to_lease: set[uuid.UUID] = set()
        # When each async handler that ignored its timeout was given up on (monotonic),
        # while it runs on in its slot; a tuple, replaced whole (read from other threads).
        self._gave_up: dict[Job, float] = {}
        self._gave_up_times: tuple[float, ...] = ()
        self._started = False
        self._started_at = 0.0
        # Whether every startup hook returned: only then do the shutdown hooks run.
        self._hooks_started = False
        self._hooks = Hooks()
        # Rescued-job isolation (see run_once): the job running alone, whether a rescued
        # job waits, and when to look again.
        self._isolated: Job | None = None
        # The isolated job once its handler ended: claims wait while its thread runs on
        # (it timed out), since it might kill the process (_free_slots).
        self._isolation_tail: Job | None = None
        # When that job's handler ended (monotonic): from then on, while its thread
        # runs, the wait holds every claim back.
        self._tail_held_since: float | None = None
        self._rescue_pending = False
        # A rescued job was due at the last check but this busy worker's turn to drain
        # for it had not come: once idle, it looks again at once (and takes it).
        self._rescue_seen = False
        self._next_rescue_check = 0.0
        # The database's now() at the last check for rescued jobs (None: none made yet).
        self._rescued_checked_at: datetime | None = None
        self._database_health = metrics.database_health(config.dsn)
        self.completer: Completer = Completer(
            self.pool,
            self._on_written,
            worker_id=self.worker_id,
            reconnect_max_seconds=config.reconnect_max_seconds,
            reconnects=self._reconnects,
        )
        self.heartbeat: Heartbeat = Heartbeat(
            self.pool,
            lambda: list(self._held),
            self._settling,
            self._on_lost,
            self._register,
            interval=config.heartbeat_interval,
            lease_seconds=config.lease_seconds,
            worker_id=self.worker_id,
            claiming=self._claiming,
            refused=self._refused_tokens,
            reconnects=self._reconnects,
        )
        self.listener: Listener = Listener(
            config.dsn,
            self.queues,
            self._wake,
            reconnect_max_seconds=config.reconnect_max_seconds,
            worker_id=self.worker_id,
            on_cancel=self.heartbeat.beat_soon,
            on_rescued=self._check_rescued_now,
            reconnects=self._reconnects,
        )
        # Set by stop() too: a fetcher backing off stops at once.
        self._retry_now = self._reconnects.event()
        self._backoff = ReconnectBackoff(
            config.reconnect_max_seconds, cut=self._retry_now, stop=self._stopping
        )
        # The per-job events go through a logger bound in run() (after the caller has
        # configured logging): the module-level proxy resolves itself on every call.
        self._log = log

    # --- public ---------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def stopping(self) -> bool:
        """Whether a stop was asked for (safe to read from any thread)."""
        return self._stopping.is_set()

    def stop(self) -> None:
        """Ask for a graceful shutdown; idempotent. Call it on the worker's event loop."""
        self._stopping.set()
        # Wake the fetcher from whichever wait it is in (see _wait_for; a backoff after
        # a lost connection waits on _retry_now).
        self._wake.set()
        self._slot_freed.set()
        self._retry_now.set()

    def heartbeat_silence(self) -> float:
        """Seconds since the last successful heartbeat (or the start). The heartbeat runs
        on the event loop: no beat for a lease means a blocked loop (a handler calling
        blocking code) or a pool that cannot reach the database, and the leases of this
        worker's jobs are expiring. Safe to call from any thread."""
        last_beat = self.heartbeat.last_success or self._started_at
        return time.monotonic() - last_beat

    def slots_held_for(self) -> float:
        """Seconds for which handlers that timed out (or were released at shutdown) and
        still run have held back every claim, 0.0 if they do not: every slot is held by
        one (a plain handler's thread, which Python cannot stop, or an async handler that
        ignored its cancellation), or the rescued job running alone is such a handler, or
        a thread runs on after the rescued job that ran alone ended. Until one of them
        returns the worker runs nothing. Safe to call from any thread."""
        now = time.monotonic()
        held = [0.0]
        given_up = sorted((*self.executor.abandoned_times(), *self._gave_up_times))
        if len(given_up) >= self.config.concurrency:
            # Since the one that took the last free slot.
            held.append(now - given_up[self.config.concurrency - 1])
        tail, since = self._isolation_tail, self._tail_held_since
        if tail is not None and since is not None and self.executor.runs_on(tail):
            held.append(now - since)
        isolated = self._isolated
        if isolated is not None and (gave_up_at := self._gave_up.get(isolated)) is not None:
            # A rescued job's async handler that ignored its timeout: nothing else is
            # claimed beside it until it ends.
            held.append(now - gave_up_at)
        return max(held)

    @property
    def hooks_left_running(self) -> int:
        """Async start or stop hooks that swallowed their cancellation and still run (the
        process exits without waiting for them: cli._run_worker)."""
        return self._hooks.left_running

    def health(self) -> tuple[bool, str]:
        """For /healthz (called from the metrics thread): are the loops alive and does
        the database answer?"""
        if self.failed:
            return False, "a worker component died"
        if not self._started:
            return False, "starting"
        if self._stopping.is_set():
            return False, "stopping"
        held = self.slots_held_for()
        if held > self.config.lease_seconds:
            return False, (
                f"claims held back for {held:.0f}s by handlers that timed out and still"
                " run (a plain handler's thread cannot be stopped; an async one ignored its"
                " cancellation): this worker runs nothing until one returns; restart it"
            )
        silent = self.heartbeat_silence()
        if silent <= self.config.lease_seconds:
            return self._database_health()
        database = self._database_health()
        if not database[0]:
            return database
        return False, (
            f"no heartbeat for {silent:.0f}s (lease {self.config.lease_seconds:g}s): the"
            " event loop is blocked (a handler calling blocking code?), or the heartbeat's"
            " statement waits for a lock on pgqueue.jobs"
        )

    async def run(self, *, handle_signals: bool = True) -> None:
        """Run until ``stop()`` (or SIGTERM/SIGINT/SIGHUP), then shut down gracefully."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        exit_now: threading.Thread | None = None
        if handle_signals:
            # Decided once: a handler that ignores SIGHUP later is no nohup (_guard_signals).
            self._stop_signals = stop_signals()
            for sig in self._stop_signals:
                loop.add_signal_handler(sig, self._on_signal, sig)
                # asyncio's handler runs when the loop next runs: two signals sent seconds
                # apart to a loop a handler blocks reach it together. This one runs when a
                # signal arrives (the main thread runs it between two bytecodes, a blocked
                # loop's too), for _on_signal's window; asyncio still gets every signal by
                # its wake-up fd.
                signal.signal(sig, self._signal_arrived)
            _reset_signals_after_fork()
            # After the handlers (which refuse a loop outside the main thread): nothing
            # is left behind when they fail.
            read_end, self._exit_pipe = os.pipe()
            exit_now = threading.Thread(
                target=self._exit_if_loop_blocked,
                args=(read_end,),
                name="pgqueue-exit-now",
                daemon=True,
            )
            exit_now.start()
        self._log = log.bind()
        uncontain = contain_handler_tasks(loop)
        try:
            await self._run_until_stopped()
        finally:
            self.run_ended = True
            uncontain()
            if exit_now is not None:
                # Stopped: the thread ends, so that the process exits as one with no
                # threads left (see cli._exit_after). Told by a byte, not by the pipe's
                # closing: a process a handler forked holds the write end too.
                write_end, self._exit_pipe = self._exit_pipe, None
                if write_end is not None:
                    with contextlib.suppress(OSError):
                        os.write(write_end, STOPPED_BYTE)
                    os.close(write_end)
                    exit_now.join(1.0)

    async def _run_until_stopped(self) -> None:
        # The app's startup hooks first: a worker whose hook failed claims nothing (and
        # neither connects nor registers). Stopped meanwhile, it stops before starting.
        if self._stopping.is_set() or not await self._hooks.startup(
            self.registry.startup_hooks, self._stopping
        ):
            self.failed = not self._stopping.is_set()
            return
        self._hooks_started = True
        await self.pool.open(wait=False)
        metrics.WORKER_INFO.labels(__version__, ",".join(self.queues)).set(1)
        metrics.count_disconnects_from_zero(*metrics.WORKER_LOOPS)
        log.info(
            "worker.started",
            worker_id=self.worker_id,
            queues=list(self.queues),
            concurrency=self.config.concurrency,
            lease_seconds=self.config.lease_seconds,
            prepared_statements=self.config.prepared_statements,
            generic_plans=self.config.prepared_statements and self.config.generic_plans,
            async_commit=self.config.async_commit,
        )
        services = [
            asyncio.create_task(self.listener.run(), name="listener"),
            asyncio.create_task(self.heartbeat.run(), name="heartbeat"),
            asyncio.create_task(self.completer.run(), name="completer"),
        ]
        if self.parent_pid is not None:
            services.append(asyncio.create_task(self._watch_parent(), name="parent-watch"))
        if self._stop_signals:
            services.append(asyncio.create_task(self._guard_signals(), name="signal-guard"))
        fetcher = asyncio.create_task(self._fetch_loop(), name="fetcher")
        for task in (*services, fetcher):
            task.add_done_callback(self._on_component_done)
        self._started_at = time.monotonic()
        self._started = True
        if self._on_started is not None:
            self._on_started()
        try:
            await self._stopping.wait()
        finally:
            await self._shutdown(fetcher, services)

    async def _guard_signals(self) -> None:
        """Take the stop signals back from a handler that took them: ``signal.signal(
        SIGTERM, SIG_IGN)``, a ``loop.add_signal_handler`` or ``remove_signal_handler`` of
        its own, ``signal.set_wakeup_fd``, in an async handler (a plain one's thread may
        not set them). Without this the worker ignored every SIGTERM from then on, or
        died of one without releasing its jobs, silently, and a supervisor killed it
        after its grace."""
        loop = asyncio.get_running_loop()
        # asyncio's loop learns of every signal through the wake-up fd it set (its
        # self-pipe): a handler's signal.set_wakeup_fd(-1) cut it off from all of them.
        csock = getattr(loop, "_csock", None)
        wakeup_fd = csock.fileno() if csock is not None else None
        while True:
            await asyncio.sleep(SIGNAL_GUARD_SECONDS)
            if wakeup_fd is not None:
                # Read by setting it: put back in the same call.
                found_fd = signal.set_wakeup_fd(wakeup_fd)
                if found_fd != wakeup_fd:
                    log.warning(
                        "worker.signal_taken_back",
                        signal="wakeup_fd",
                        found=found_fd,
                        hint="code in a handler called signal.set_wakeup_fd, which cut the"
                        " worker off from the stop signals it needs for its graceful stop:"
                        " code that needs its own belongs in a subprocess",
                    )
            for sig in self._stop_signals:
                found = signal.getsignal(sig)
                if found == self._signal_arrived:
                    continue
                loop.add_signal_handler(sig, self._on_signal, sig)
                signal.signal(sig, self._signal_arrived)
                log.warning(
                    "worker.signal_taken_back",
                    signal=sig.name,
                    found=getattr(found, "__qualname__", None) or str(found),
                    hint="code in a handler changed how this process handles a stop signal,"
                    " which the worker needs for its graceful stop: code that needs its own"
                    " belongs in a subprocess",
                )

    async def _watch_parent(self) -> None:
        """Stop gracefully once the supervisor is gone. A supervisor that is killed
        outright cannot pass on a stop signal, and its children would otherwise run on
        unsupervised, beside the ones of a restarted supervisor. The parent's death makes
        this process a child of init (or of a subreaper), so the parent pid changes."""
        while not self._stopping.is_set():
            if os.getppid() != self.parent_pid:
                log.error("worker.supervisor_gone", supervisor_pid=self.parent_pid)
                # No supervisor is left to send SIGQUIT: a second SIGTERM/SIGINT now
                # means "exit now", as for a worker run on its own.
                self.supervised = False
                self.stop()
                return
            await asyncio.sleep(PARENT_CHECK_SECONDS)

    def _on_component_done(self, task: asyncio.Task[None]) -> None:
        # Every loop catches its own errors, so a component that ends while the worker
        # is not stopping is a bug: stop (exit code 1) rather than run half-deaf.
        if self._stopping.is_set() or task.cancelled():
            return
        log.error("worker.component_died", component=task.get_name(), error=repr(task.exception()))
        self.failed = True
        self.stop()

    async def run_once(self, limit: int | None = None) -> list[Job]:
        """Claim and start jobs; returns them. Normally up to ``limit`` (default: the free
        slots). A rescued job (its last worker died under it) is claimed alone, once
        nothing else runs here, and nothing is claimed beside it (migration 0003)."""
        free = self._free_slots()
        limit = free if limit is None else min(limit, free)
        if limit <= 0:
            return []
        loop = asyncio.get_running_loop()
        async with self._claiming, self.pool.connection() as conn:
            # A cancel request for a job of this claim may come between the claim's
            # commit and its jobs being held: the beat it brings forward would miss them.
            soon_requests = self.heartbeat.soon_requests
            if not self._schema.settled:
                # Claim nothing while the database lacks a migration this version ships:
                # the statements that record outcomes may fail once the claim committed,
                # and its jobs would run again (checked again before each claim until
                # `pgqueue migrate` has run; worker.schema_behind says so once).
                self._schema.observe(await store.applied_versions_async(conn))
                if self._schema.behind:
                    return []
            if loop.time() >= self._next_rescue_check or (
                self._rescue_seen and not self._draining()
            ):
                # Set before the check: a rescued job's notification arriving while it
                # runs brings the next one forward again (_check_rescued_now).
                self._next_rescue_check = loop.time() + self.config.poll_interval
                try:
                    check = await store.rescued_waiting(
                        conn,
                        queues=self.queues,
                        worker_id=self.worker_id,
                        stagger_seconds=self.config.lease_seconds,
                    )
                except CONNECTION_ERRORS:
                    # Not made: make it on the fetcher's next try, not a poll interval
                    # later (a rescued job waiting would wait for that poll).
                    self._next_rescue_check = 0.0
                    raise
                # Idle, it takes the job now; busy, it drains for it when its turn comes
                # (one worker at a time, a lease apart: rescued_waiting), and looks again
                # then if that is before the next check.
                self._rescue_pending = check.waiting and (
                    not self._draining() or (check.drain_in or 0.0) <= 0.0
                )
                self._rescue_seen = check.waiting and not self._rescue_pending
                if self._rescue_seen and check.drain_in is not None:
                    self._next_rescue_check = min(
                        self._next_rescue_check, loop.time() + check.drain_in
                    )
                self._rescued_checked_at = check.checked_at
            # A stop may have come while this waited for the lock, a connection or the
            # check above: SIGTERM stops claiming.
            if self._stopping.is_set():
                return []
            if self._rescue_pending:
                if self._draining():
                    return []  # drain: the rescued job must run alone
                rescued = await store.claim_rescued_job(
                    conn,
                    queues=self.queues,
                    worker_id=self.worker_id,
                    lease_seconds=self.config.lease_seconds,
                )
                self._rescue_pending = False
                if rescued is not None:
                    self._isolated = rescued
                    log.info(
                        "job.isolated", job_id=rescued.id, task=rescued.task,
                        queue=rescued.queue, attempt=rescued.attempt,
                    )  # fmt: skip
                    self._start(rescued)
                    self._count_claimed([rescued])
                    self._beat_again_if_asked(soon_requests)
                    return [rescued]
            jobs = await store.claim_jobs(
                conn,
                queues=self.queues,
                limit=limit,
                worker_id=self.worker_id,
                lease_seconds=self.config.lease_seconds,
            )
            for job in jobs:
                self._start(job)
            # Counted before any job can end (and before any await: a cancel there
            # must not leave the running gauge short).
            self._count_claimed(jobs)
            if jobs:
                self._beat_again_if_asked(soon_requests)
                # Let the handlers begin before the connection goes back to the pool
                # (job latency; see _fetch_loop).
                await asyncio.sleep(0)
        return jobs

    def _draining(self) -> bool:
        """Whether jobs still run that a rescued job must wait for: not async handlers
        given up on after their timeout (_on_gave_up), which may never end, as threads
        left by timed-out plain handlers do not count either (if one kills the process,
        the rescued job running then is charged that attempt)."""
        return len(self._running) > len(self._gave_up)

    def _check_rescued_now(self) -> None:
        """A rescued job of our queues was made runnable (the listener's notification),
        or the listener reconnected (notifications were lost): make the check for rescued
        jobs on the next claim, not when the poll interval next brings it round (an idle
        worker takes the job at once)."""
        self._next_rescue_check = 0.0

    def _beat_again_if_asked(self, soon_requests: int) -> None:
        """Beat soon once more if a cancel request came while a claim was in flight: the
        job it is for may be one of that claim's, which the beat it brought forward did
        not see held."""
        if self.heartbeat.soon_requests != soon_requests:
            self.heartbeat.beat_soon()

    def _count_claimed(self, jobs: list[Job]) -> None:
        # Per (queue, task) of a claim batch, not per job: metrics are a hot-path cost.
        claimed: dict[tuple[str, str], int] = {}
        for job in jobs:
            key = (job.queue, self._task_label(job))
            claimed[key] = claimed.get(key, 0) + 1
        for (queue, task), count in claimed.items():
            metrics.child(metrics.JOBS_CLAIMED, queue, task).inc(count)
            metrics.child(metrics.JOBS_RUNNING, queue).inc(count)

    # --- fetcher --------------------------------------------------------------------

    def _free_slots(self) -> int:
        if self._isolated is not None:
            return 0
        if self._isolation_tail is not None:
            # The isolated job's handler ended, but its thread may run on (it timed out):
            # if it kills the process, it must take no other job with it. Threads other
            # jobs left do not count: they ran beside other jobs before.
            if self.executor.runs_on(self._isolation_tail):
                return 0
            self._isolation_tail = None
            self._tail_held_since = None
        # Threads still running handlers the worker gave up on (timed out, released)
        # hold pool threads: count them, so a claimed sync job always gets a thread at
        # once and its timeout never starts while it waits for one. Outcomes not written
        # yet past a concurrency's worth (a write waiting on a row another session
        # locked, a database answering slowly) count too: the worker would otherwise go
        # on running jobs whose outcomes pile up, all to run again after a crash.
        unwritten = self.completer.unwritten() - self.config.concurrency
        return (
            self.config.concurrency
            - len(self._running)
            - self.executor.abandoned
            - max(0, unwritten)
        )

    async def _fetch_loop(self) -> None:
        while not self._stopping.is_set():
            free = self._free_slots()
            if free <= 0:
                self._slot_freed.clear()
                await self._wait_for(self._slot_freed, None)
                continue
            self._wake.clear()
            claim_sent = asyncio.get_running_loop().time()
            try:
                jobs = await self.run_once(free)
                self._backoff.reset()
            except CONNECTION_ERRORS as exc:
                delay = self._backoff.next_delay()
                log.warning(
                    retry_event("fetcher", exc), **error_fields(exc), retry_in=round(delay, 2)
                )
                # Until the delay is up, or the pool has a new connection.
                if not self._stopping.is_set():
                    await self._backoff.sleep(delay)
                continue
            except Exception:
                # A claim the database refuses (say, the schema is not migrated yet):
                # say so loudly and keep trying; never die silently.
                delay = self._backoff.next_delay()
                log.exception("fetcher.failed", retry_in=round(delay, 2))
                await self._wait_for(self._stopping, delay)
                continue
            if self._schema.behind:
                # It claims nothing until `pgqueue migrate` has run: look again at the
                # poll or on a notification. Its check for rescued jobs, never made on
                # this path, stayed due, and the wait below came to zero: a busy loop of
                # round trips (about 1,400 a second).
                await self._wait_for(self._wake, self.config.poll_interval)
                continue
            if self._rescue_pending and self._draining():
                # Draining so that a rescued job can run alone: wait for a slot.
                self._slot_freed.clear()
                await self._wait_for(self._slot_freed, self.config.poll_interval)
                continue
            if self._isolated is not None:
                continue
            if len(jobs) == free:
                # Probably more waiting: claim again as soon as a slot frees up. The yield
                # lets the outcomes of jobs that already ended go out first, in one batch
                # (A/B drains of 20,000 no-op jobs: faster with two processes at
                # concurrency 1000, the same at concurrency 1).
                await asyncio.sleep(0)
                continue
            if self._wake.is_set():
                # A notification came while the claim ran: claim again at once. Asking when
                # the next scheduled job is due would put a round trip in front of that
                # claim, which takes every job due by then, scheduled ones too (a busy
                # worker woken by every batch of a producer: about half its claims).
                continue
            timeout = await self._idle_timeout(claim_sent)
            # Wake for run_once's rescued-job check when it falls due, so that it runs
            # while nothing waits: left to the next notification, its round trip came
            # before that job's claim (2 of 500 jobs at 50/s, among the slowest 1%).
            until_check = self._next_rescue_check - asyncio.get_running_loop().time()
            await self._wait_for(self._wake, min(timeout, max(0.0, until_check)))

    async def _idle_timeout(self, claim_sent: float) -> float:
        """Sleep until the next scheduled job is due, or the safety-net poll. A job that
        fell due after the claim sent at ``claim_sent`` (loop time) began counts as due
        now: the claim did not see it, and it is not in the future any more. A rescued
        job due later brings the check for rescued jobs forward to when it falls due, and
        one that fell due after the last check's now() (which did not see it) brings it to
        now."""
        loop = asyncio.get_running_loop()
        try:
            async with self.pool.connection() as conn:
                # Measured once the connection is ours: waiting for one makes the
                # statement's now() later.
                lookback = loop.time() - claim_sent + DUE_LOOKBACK_MARGIN
                seconds, rescued_seconds = await store.seconds_until_due(
                    conn,
                    queues=self.queues,
                    lookback_seconds=lookback,
                    rescued_since=self._rescued_checked_at,
                )
        except Exception:
            return self.config.poll_interval
        if rescued_seconds is not None:
            # The claim will not take it: make the check for rescued jobs when it falls
            # due (a rescued job retried or snoozed), not at the next poll.
            self._next_rescue_check = min(
                self._next_rescue_check, loop.time() + max(0.0, rescued_seconds) + 0.001
            )
        if seconds is None:
            return self.config.poll_interval
        return min(self.config.poll_interval, max(0.0, seconds) + 0.001)

    async def _wait_for(self, event: asyncio.Event, timeout: float | None) -> None:
        """Wait for ``event``, the stop request, or the timeout, whichever comes first.

        ``event`` is one that stop() sets too (_wake, _slot_freed, _stopping), so one
        waiter is enough and its set() wakes this task directly. Waiting on the stop
        event beside it took two tasks under asyncio.wait per wait, and two more loop
        iterations between a notification and the claim."""
        if self._stopping.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()

    # --- jobs -----------------------------------------------------------------------

    def _thread_freed(self) -> None:
        """Called from a pool thread when an abandoned handler finally returns."""
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.call_soon_threadsafe(self._slot_freed.set)

    def _task_label(self, job: Job) -> str:
        # Bounded label values: a task this worker does not know could be any string.
        return job.task if job.task in self.registry else "unknown"

    def _start(self, job: Job) -> None:
        self._held[job] = None
        extra = {"args": job.args} if self.config.log_args else {}
        self._log.info(
            "job.claimed", job_id=job.id, task=job.task, queue=job.queue, attempt=job.attempt,
            **extra,
        )  # fmt: skip
        self._running[job] = asyncio.create_task(self._run_job(job), name=f"job-{job.id}")

    async def _run_job(self, job: Job) -> None:
        started = self._run_started[job] = time.monotonic()
        try:
            outcome = await self.executor.execute(job)
        except asyncio.CancelledError:
            outcome = Outcome(job, OutcomeKind.RELEASED, time.monotonic() - started)
        except GeneratorExit:
            raise  # the task's coroutine is being closed, its loop gone (executor._closing)
        except BaseException as exc:
            # Whatever it was (SystemExit from an exception's own code, say), the attempt
            # gets an outcome: without one the job held its lease, renewed by every beat,
            # for as long as the worker lived.
            fields = {"job_id": job.id, "task": job.task, "queue": job.queue}
            try:
                self._log.exception("job.internal_error", attempt=job.attempt, **fields)
            except BaseException:  # the traceback itself cannot be formatted
                self._log.error(
                    "job.internal_error", attempt=job.attempt, error=describe(exc), **fields
                )
            outcome = self.executor.internal_error(job, started, exc)
        finally:
            self._running.pop(job, None)
            self._run_started.pop(job, None)
            if self._gave_up.pop(job, None) is not None:
                self._gave_up_times = tuple(self._gave_up.values())
                self._log.info(
                    "job.given_up_ended", job_id=job.id, task=job.task, queue=job.queue,
                    attempt=job.attempt, ran=round(time.monotonic() - started, 3),
                )  # fmt: skip
            metrics.child(metrics.JOBS_RUNNING, job.queue).dec()
            if self._isolated is job:
                self._isolated = None
                self._isolation_tail = job
                self._tail_held_since = time.monotonic()
                self._next_rescue_check = 0.0  # more rescued jobs may be waiting
            elif self._rescue_seen and not self._draining():
                # Idle now, with a rescued job waiting for another's turn: take it.
                self._wake.set()
            self._slot_freed.set()
        metrics.child(metrics.JOB_DURATION, job.queue, self._task_label(job)).observe(
            outcome.duration
        )
        if job.lease_token in self._released_early:
            # Released by _release_stubborn, or given up on after its timeout
            # (_on_gave_up): its outcome went out then, one outcome per attempt.
            self._released_early.discard(job.lease_token)
            return
        if (job.id, job.lease_token) in self._lost:
            # Fenced already: the heartbeat found the lease gone. Nothing to write.
            self._lost.discard((job.id, job.lease_token))
            return
        if outcome.kind is OutcomeKind.RELEASED and job.lease_token in self._left_to_lease:
            return  # see loop_ended
        self.completer.submit(outcome)

    def _on_written(
        self, outcome: Outcome, result: WriteResult, state: str | None, dead_id: int | None
    ) -> None:
        # Logs and metrics for an outcome come from here alone, so they cannot disagree.
        job = outcome.job
        self._release_hold(job)
        if result is WriteResult.FAILED:
            # Logged by the completer; the lease now expires and the reaper retries.
            self._refused[job.lease_token] = None
            while len(self._refused) > REFUSED_KEPT:
                del self._refused[next(iter(self._refused))]
            return
        fields = {
            "job_id": job.id,
            "task": job.task,
            "queue": job.queue,
            "attempt": job.attempt,
            "duration": round(outcome.duration, 6),
        }
        error = outcome.error or {}
        if result is WriteResult.FENCED and (job.id, job.lease_token) in self._lost:
            # The heartbeat already reported this lease lost.
            self._lost.discard((job.id, job.lease_token))
            return
        if result is WriteResult.FENCED:
            label = "lease_lost"
            self._log.warning("lease.lost", outcome=outcome.kind.value, **fields)
        elif state == "cancelled":
            # A cancel-requested job: a failed attempt, retried or last, is not retried
            # ("failed"); a snooze or a release ends it too ("cancelled").
            failed = outcome.kind in (OutcomeKind.RETRIED, OutcomeKind.DEAD)
            label = "failed" if failed else "cancelled"
            self._log.warning(
                "job.cancelled",
                outcome=label,
                # How the attempt ended: failed, snoozed or released (never retried).
                attempt_end="failed" if failed else outcome.kind.value,
                error=error.get("error"),
                **fields,
            )
        elif outcome.kind is OutcomeKind.SUCCEEDED:
            label = "succeeded"
            self._log.info("job.succeeded", **fields)
        elif outcome.kind is OutcomeKind.RETRIED:
            label = "retried"
            self._log.warning(
                "job.retried",
                error=error.get("error"),
                kind=error.get("kind"),
                retry_in=round(outcome.delay_seconds, 3),
                **fields,
            )
        elif outcome.kind is OutcomeKind.DEAD:
            label = "dead"
            # dead_id: where pgqueue.dead_jobs held the job's id, the new one it is stored
            # under (migration 0023), which `dead show` and `dead retry` take.
            renamed = {} if dead_id is None else {"dead_id": dead_id}
            self._log.error(
                "job.dead",
                reason=outcome.dead_reason,
                error=error.get("error"),
                **fields,
                **renamed,
            )
        elif outcome.kind is OutcomeKind.SNOOZED:
            label = "snoozed"
            self._log.info("job.snoozed", snooze_seconds=outcome.delay_seconds, **fields)
        else:
            label = "released"
            self._log.info("job.released", **fields)
        metrics.child(metrics.JOBS_COMPLETED, job.queue, self._task_label(job), label).inc()

    def _refused_tokens(self) -> list[uuid.UUID]:
        """Tokens of refused outcomes, for the heartbeat to leave alone (see _refused)."""
        return list(self._refused)

    def _settling(self, jobs: list[Job]) -> set[Job]:
        """Of these attempts, those whose outcome was written, or waits in the completer
        (the heartbeat must not take them for lost leases)."""
        holding = self.completer.holding()
        return {job for job in jobs if job not in self._held or job in holding}

    def _release_hold(self, job: Job) -> None:
        # Only this attempt's hold: the same job may have been claimed again since.
        self._held.pop(job, None)
        # A written outcome may free a slot (see _free_slots).
        self._slot_freed.set()

    def _on_lost(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job not in self._held:
                # Reported already: its outcome was written (or fenced off, and counted
                # as lost there) while the heartbeat was still finishing its beat.
                continue
            if self.completer.uncertain(job):
                # Its outcome's write failed with the connection, perhaps after committing,
                # which would clear the lease too: the completer finds out which, and
                # reports it (written, or lost) when it retries. Held until then.
                continue
            self._release_hold(job)
            # Counted and logged here, once: a running handler's result is then dropped
            # (_run_job), and a result already waiting in the completer will be fenced
            # off quietly (_on_written). The handler can see it (current_job().lease_lost).
            self._lost.add((job.id, job.lease_token))
            job.cancel.lose()
            metrics.child(
                metrics.JOBS_COMPLETED, job.queue, self._task_label(job), "lease_lost"
            ).inc()
            log.warning(
                "lease.lost", job_id=job.id, task=job.task, queue=job.queue, attempt=job.attempt
            )

    async def _register(self, conn: psycopg.AsyncConnection[Any]) -> None:
        # Every beat until the database is known to have this version's migrations.
        if not self._schema.settled:
            self._schema.observe(await store.applied_versions_async(conn))
        if not self._schema.notify_limit_checked:
            self._schema.observe_notify_limit(await store.notify_limit_ignored_async(conn))
        await store.register_worker(
            conn,
            worker_id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=self.queues,
            concurrency=self.config.concurrency,
            running=len(self._running),
            heartbeat_seconds=self.config.heartbeat_interval,
            version=__version__,
        )

    # --- shutdown -------------------------------------------------------------------

    def _signal_arrived(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        arrivals = self._signal_arrivals
        arrivals.append(now)
        # "Exit now" (see _on_signal) is the loop's to carry out, but a handler blocking
        # the loop would hold it back for as long as it blocks: the exit-now thread does
        # it then. A byte down a pipe (a signal handler must not take a lock: the thread
        # it interrupted may hold it).
        exit_now = signum == signal.SIGQUIT or (
            not self.supervised
            and len(arrivals) > 1
            and now - arrivals[0] > REPEATED_SIGNAL_SECONDS
        )
        if exit_now and self._exit_pipe is not None:
            with contextlib.suppress(OSError):
                os.write(self._exit_pipe, bytes([signum]))
            self._exit_pipe = None

    def _exit_if_loop_blocked(self, read_end: int) -> None:
        """Exit at once (status 1) if the loop has not done so EXIT_NOW_SECONDS after an
        "exit now" signal: a handler blocks it (time.sleep, a blocking call in an async
        handler). Logged from a thread of its own, waited for briefly: the blocked main
        thread may hold the log's lock."""
        try:
            data = os.read(read_end, 1)
        except OSError:
            return
        finally:
            os.close(read_end)
        if not data or data == STOPPED_BYTE:
            return
        time.sleep(EXIT_NOW_SECONDS)
        name = signal.Signals(data[0]).name
        logging = threading.Thread(
            target=lambda: log.warning(
                "worker.killed", signal=name, running=len(self._running), loop_blocked=True
            ),
            daemon=True,
        )
        logging.start()
        logging.join(EXIT_NOW_SECONDS)
        os._exit(1)

    def _on_signal(self, sig: signal.Signals) -> None:
        now = time.monotonic()
        self._signals += 1
        arrivals = self._signal_arrivals
        if self._signals == 1:
            self._first_signal_at = arrivals[0] if arrivals else now
        # Under a supervisor a repeated SIGTERM/SIGINT is usually the same stop reaching
        # us twice (systemd's cgroup kill, Ctrl-C to the process group, plus the
        # supervisor's forward); the supervisor sends SIGQUIT for "exit now". Alone, one
        # that came right after the first is that too (`timeout`: the child, then its
        # process group); the latest arrival decides (two copies of one signal that
        # arrive together may run _signal_arrived once).
        latest = max(arrivals, default=now)
        repeated = self._signals > 1 and (
            self.supervised or latest - self._first_signal_at <= REPEATED_SIGNAL_SECONDS
        )
        if sig is signal.SIGQUIT or (self._signals > 1 and not repeated):
            log.warning("worker.killed", signal=sig.name, running=len(self._running))
            os._exit(1)
        if repeated:
            log.info("worker.signal_repeated", signal=sig.name)
            return
        log.info("worker.stopping", signal=sig.name, running=len(self._running))
        self.stop()

    def loop_ended(self, exc: BaseException) -> None:
        """The event loop stopped under the worker, before run() ended: a handler called
        ``loop.stop()``, or raised SystemExit or KeyboardInterrupt in a callback it gave
        the loop (``loop.call_soon(sys.exit, 4)``), which asyncio lets out of the loop.
        asyncio then cancels every task. Taken as their handlers' own failure, that
        cancellation charged each job running beside the culprit an attempt (and
        dead-lettered those on their last one). The jobs are left as a crash leaves them
        instead: their leases run out, and the reaper requeues them without counting the
        attempt and runs each alone (see "Crashes" in the README), so that only a job that
        does it every time is dead-lettered. Outcomes already made are still written.
        Called once the loop has stopped, before asyncio.run's cancellation."""
        self._loop_ended = True
        running = [job for job, task in self._running.items() if not task.done()]
        for job in running:
            self.executor.release(job)  # its cancellation is no failure of its handler
            self._left_to_lease.add(job.lease_token)
        log.error(
            "worker.loop_ended",
            worker_id=self.worker_id,
            error=describe(exc),
            running=len(running),
            job_ids=sorted(job.id for job in running),
            hint="a handler (or a start or stop hook) stopped the event loop (loop.stop())"
            " or raised SystemExit or KeyboardInterrupt in a loop callback; the stop hooks"
            " do not run; the jobs running are left to their"
            " leases: the reaper requeues them, and one that does it every time is"
            " dead-lettered",
            exc_info=exc,
        )

    def _on_gave_up(self, outcome: Outcome) -> None:
        """An async handler caught its timeout's cancellation and went on: its attempt's
        timeout outcome goes out now (retried or dead-lettered, as any timeout), and the
        handler runs on in its slot, counted as running, to whatever end (what it writes
        then is fenced off by its lease token). Without this its job stayed running, its
        lease renewed by every beat, for as long as the handler went on: for ever, for a
        loop that swallows every CancelledError."""
        job = outcome.job
        if job not in self._running or job.lease_token in self._released_early:
            return
        self._log.warning(
            "job.ignored_timeout", job_id=job.id, task=job.task, queue=job.queue,
            attempt=job.attempt,
        )  # fmt: skip
        self._released_early.add(job.lease_token)
        self._gave_up[job] = time.monotonic()
        self._gave_up_times = tuple(self._gave_up.values())
        self.completer.submit(outcome)

    def _release_stubborn(self, stubborn: set[asyncio.Task[None]]) -> None:
        """Release the jobs of handlers that went on after being cancelled (they caught
        the CancelledError): shutdown must not wait for them without end, and their jobs
        go back to the queue like any other released job. Whatever such a handler writes
        later is fenced off by its lease token."""
        for job, task in list(self._running.items()):
            if task not in stubborn or job.lease_token in self._released_early:
                continue  # a handler given up on after its timeout has its outcome
            if job.lease_token in self._left_to_lease:
                continue  # see loop_ended
            self._log.warning(
                "job.ignored_cancel", job_id=job.id, task=job.task, queue=job.queue,
                attempt=job.attempt,
            )  # fmt: skip
            self._running.pop(job, None)
            self._released_early.add(job.lease_token)
            started = self._run_started.get(job)
            ran = 0.0 if started is None else time.monotonic() - started
            self.completer.submit(Outcome(job, OutcomeKind.RELEASED, ran))
        self.stubborn_handlers = len(stubborn)

    async def _configure_connection(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """The pool's configure callback: the session set up, then the loops backing off
        after a lost connection told that the database answers again."""
        await self._configure_session(conn)
        self._reconnects.connected()

    async def _deregister(self) -> None:
        async with self.pool.connection(timeout=DEREGISTER_TIMEOUT_SECONDS) as conn:
            await store.deregister_worker(conn, worker_id=self.worker_id)

    async def _shutdown(
        self, fetcher: asyncio.Task[None], services: list[asyncio.Task[None]]
    ) -> None:
        self.stop()  # also when run() was cancelled rather than stopped
        # The fetcher notices the stop at its next wait; a claim in flight completes, so
        # its jobs get the same grace (or release) as the others instead of being left
        # claimed until their lease expires.
        await finish_within(fetcher, CLAIM_WAIT_SECONDS)
        # The stop hooks get what the jobs leave of the shutdown timeout (see below).
        hooks_until = asyncio.get_running_loop().time() + self.config.shutdown_timeout
        running = list(self._running.values())
        if running:
            _, late = await asyncio.wait(running, timeout=self.config.shutdown_timeout)
            if late:
                log.warning("worker.releasing", jobs=len(late))
                for job, task in list(self._running.items()):
                    if task in late:
                        self.executor.release(job)
                        task.cancel()
                _, stubborn = await asyncio.wait(late, timeout=CANCEL_GRACE_SECONDS)
                if stubborn:
                    self._release_stubborn(stubborn)
        # Outcomes (including releases) go out before the heartbeat stops: until then
        # the leases of jobs with unwritten outcomes must stay alive.
        flushed = self.flushed = await self.completer.flush(FLUSH_TIMEOUT_SECONDS)
        if self._hooks_started and not self._loop_ended:
            # Once every job has ended or been released and the outcomes are written: no
            # outcome depends on what the hooks close any more (a released handler may
            # still run, a plain one's thread or an async one that ignored its
            # cancellation: the README says so). Within what is left of the shutdown
            # timeout, at least SHUTDOWN_HOOKS_MIN_SECONDS (part of STOP_MARGIN_SECONDS).
            hooks_seconds = hooks_until - asyncio.get_running_loop().time()
            if self._stop_hooks_seconds is not None:
                hooks_seconds = self._stop_hooks_seconds
            await self._hooks.shutdown(
                self.registry.shutdown_hooks, max(hooks_seconds, SHUTDOWN_HOOKS_MIN_SECONDS)
            )
        # Every step from here on is cut short when the database does not answer (see
        # abort.py), so that the stop ends within STOP_MARGIN_SECONDS all the same.
        await asyncio.gather(*(finish_within(task, 0) for task in services))
        try:
            await run_within(self._deregister(), DEREGISTER_TIMEOUT_SECONDS)
        except Exception as exc:  # the reaper forgets it after three missed heartbeats
            error = first_line(exc)
            if schema_missing(exc):
                log.warning("worker.deregister_failed", error=error, hint=SCHEMA_HINT)
            else:
                log.warning("worker.deregister_failed", error=error)
        try:
            await self.pool.close(timeout=POOL_CLOSE_TIMEOUT_SECONDS)
        except asyncio.CancelledError:
            # After loop_ended, asyncio cancelled the pool's own tasks too, and its close
            # gathers them; this task's own cancellation came (and went) before.
            if not self._loop_ended:
                raise
        # The pool leaves a background connect that outlasts its close running, for
        # asyncio.run to cancel once and wait on psycopg's cancel of its statement. Its
        # tasks are "<pool name>-worker-<n>" and "<pool name>-scheduler" (psycopg_pool).
        ours = re.compile(re.escape(self.pool.name) + r"-(worker-[0-9]+|scheduler)")
        left = [t for t in asyncio.all_tasks() if ours.fullmatch(t.get_name())]
        await asyncio.gather(*(finish_within(task, 0) for task in left))
        self.executor.shutdown()
        metrics.WORKER_INFO.labels(__version__, ",".join(self.queues)).set(0)
        if flushed:
            log.info("worker.stopped", worker_id=self.worker_id, flushed=True)
        else:
            # Exit code 1: outcomes of this stop (releases included) were not written.
            log.error(
                "worker.stopped",
                worker_id=self.worker_id,
                flushed=False,
                hint="jobs whose outcome was not written stay running until their leases"
                " expire; the reaper then requeues them",
            )
