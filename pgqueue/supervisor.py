"""``pgqueue-worker --processes N``: runs N worker processes, passes a stop signal
(SIGTERM, SIGINT, SIGHUP; SIGQUIT) on to them, and replaces a child that dies: after
1 s, doubled up to 30 s while it keeps dying within 10 s of its start (at start-up, or
killed by its first jobs: each new child claims at once), back to 1 s once one has
lived 10 s.

Each child is a full worker (``python -m pgqueue worker ... --processes 1``). With
``--metrics-port`` the supervisor serves the children's metrics summed (prometheus-client
multiprocess mode, one directory of samples per supervisor) and a /healthz that is 200
while every child runs its worker (each says so through a pipe once it does) and the
database answers.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from pgqueue.config import REPEATED_SIGNAL_SECONDS, STOP_MARGIN_SECONDS, hangup_ignored
from pgqueue.log import get_logger
from pgqueue.metrics import (
    DEFAULT_METRICS_HOST,
    MetricsServer,
    QueueStatsCollector,
    database_health,
    supervisor_registry,
)

log: Any = get_logger("pgqueue.supervisor")

# Set in each child's environment: the worker then treats signals as a supervised child.
SUPERVISED_ENV = "PGQUEUE_SUPERVISED"
# The supervisor's pid, so that a child notices when it is orphaned (and stops).
SUPERVISOR_PID_ENV = "PGQUEUE_SUPERVISOR_PID"
# A pipe's write end, passed to each child: it writes one byte once its worker runs, so
# that /healthz counts a child as up only from then (not while it imports the app), then
# one every HEARTBEAT_REPORT_SECONDS saying how its worker is: heartbeat current, silent
# for over a lease (its loop blocked), stopping, or held (plain handlers that timed out
# and still run have held back every claim for over a lease). A child that writes
# nothing for over a lease is frozen as a whole (SIGSTOP, C code holding the GIL): silent
# too.
READY_FD_ENV = "PGQUEUE_READY_FD"
HEARTBEAT_CURRENT = b"1"
HEARTBEAT_SILENT = b"0"
WORKER_STOPPING = b"2"
SLOTS_HELD = b"3"
HEARTBEAT_REPORT_SECONDS = 0.5
RESTART_MIN_SECONDS = 1.0
RESTART_MAX_SECONDS = 30.0
# What a child's embedded reaper may add to its stop: a 2 s cancel, a 3 s wait.
REAPER_STOP_MARGIN_SECONDS = 5.0
# A child that lived at least this long before dying is restarted without delay growth.
HEALTHY_SECONDS = 10.0


@dataclass
class _Child:
    slot: int
    proc: subprocess.Popen[bytes]
    started: float
    # The read end of the child's readiness pipe (its reports), until the child closes it.
    ready_fd: int | None = None
    ready: bool = False
    # What the child last reported (HEARTBEAT_CURRENT, _SILENT, WORKER_STOPPING, SLOTS_HELD)
    # and when (monotonic): see READY_FD_ENV.
    report: bytes = HEARTBEAT_CURRENT
    reported_at: float = 0.0
    restart_delay: float = RESTART_MIN_SECONDS
    restart_at: float | None = None
    exits: list[int] = field(default_factory=list)

    def poll_ready(self) -> None:
        if self.ready_fd is None:
            return
        try:
            data = os.read(self.ready_fd, 4096)
        except BlockingIOError:
            return
        if not data:
            # End of file: the child is gone, or its worker stopped and it is exiting.
            self.close_ready_fd()
            if self.ready:
                self.report = WORKER_STOPPING
            return
        # A byte: the worker runs; the last one says how it is.
        self.ready = True
        self.report = data[-1:]
        self.reported_at = time.monotonic()

    def close_ready_fd(self) -> None:
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None


class Supervisor:
    def __init__(
        self,
        child_argv: Sequence[str],
        processes: int,
        shutdown_timeout: float,
        *,
        dsn: str,
        metrics_host: str | None = None,
        metrics_port: int | None = None,
        reapers: bool = False,
        queue_stats: bool = False,
        lease_seconds: float = 30.0,
    ) -> None:
        self.child_argv: list[str] = list(child_argv)
        # The children's lease: a child that reports nothing for longer is frozen.
        self.lease_seconds = lease_seconds
        # The children run the reaper (--reaper): export the database-wide gauges, and
        # give them the time their reaper takes to stop.
        self.reapers = reapers
        # Serve the database-wide gauges (as the children's reapers do) without reapers.
        self.queue_stats = queue_stats
        self.processes = processes
        self.shutdown_timeout = shutdown_timeout
        self.dsn = dsn
        # One check at a time, however many probes come (metrics.database_health).
        self._database_health = database_health(dsn)
        self.metrics_host = metrics_host
        self.metrics_port = metrics_port
        self.metrics_dir: str | None = None
        self.children: list[_Child] = []
        self._signals: list[int] = []
        self._first_signal_at = 0.0
        # Pids of children the stop signal was passed to.
        self._signalled: set[int] = set()

    def _start(self, slot: int) -> tuple[subprocess.Popen[bytes], int]:
        """A child process for ``slot`` and the read end of its readiness pipe."""
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        try:
            proc = self._spawn(slot, write_end)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        return proc, read_end

    def _restart(self, child: _Child, now: float) -> None:
        child.close_ready_fd()
        child.proc, child.ready_fd = self._start(child.slot)
        child.ready = False
        child.report = HEARTBEAT_CURRENT
        child.reported_at = now
        child.started = now
        child.restart_at = None

    def _spawn(self, slot: int, ready_fd: int) -> subprocess.Popen[bytes]:
        # The DSN goes by environment, not argv: `ps` would show a password.
        env = dict(os.environ, PGQUEUE_WORKER_SLOT=str(slot), PGQUEUE_DSN=self.dsn)
        env[READY_FD_ENV] = str(ready_fd)
        # The supervisor serves the metrics port; a child must not try to bind it too.
        env.pop("PGQUEUE_METRICS_PORT", None)
        env.pop("PGQUEUE_METRICS_HOST", None)
        env[SUPERVISED_ENV] = "1"
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
        if self.metrics_dir:
            env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        # The child starts with SIGINT blocked (a signal mask survives fork and exec),
        # until pgqueue-worker replaces it by a handler that records it, before the app
        # is imported (cli._SupervisedChild). Ctrl-C in a terminal signals the whole
        # process group: a child still starting would end in a KeyboardInterrupt; held,
        # it is taken as a graceful stop once the worker runs. (The supervisor's own
        # stop reaches children as SIGTERM.) Blocked here only for the spawn: a SIGINT
        # meanwhile waits for the unblock below, it is not lost.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            proc = subprocess.Popen(self.child_argv, env=env, pass_fds=(ready_fd,))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        log.info("supervisor.spawned", slot=slot, pid=proc.pid)
        return proc

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if (
            self._signals
            and signum != signal.SIGQUIT
            and now - self._first_signal_at <= REPEATED_SIGNAL_SECONDS
        ):
            return  # the first stop reaching us twice (`timeout`: us, then our group)
        if not self._signals:
            self._first_signal_at = now
        self._signals.append(signum)
        # First signal: a graceful stop, passed on as SIGTERM (a SIGINT reaching a child
        # before its handlers are installed, or after its loop closed, would end it in a
        # KeyboardInterrupt traceback). Any later one, or SIGQUIT, means "now": SIGQUIT,
        # which the children honour at once; they ignore a repeated SIGTERM/SIGINT, since
        # that is usually the first stop arriving twice (cgroup or process-group kill).
        now = len(self._signals) > 1 or signum == signal.SIGQUIT
        forward = signal.SIGQUIT if now else signal.SIGTERM
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.send_signal(forward)
                self._signalled.add(child.proc.pid)

    def healthy(self) -> tuple[bool, str]:
        if self._signals:
            return False, "stopping"
        down = [
            c.slot for c in self.children if c.restart_at is not None or c.proc.poll() is not None
        ]
        if down:
            return False, f"worker processes down: {down}"
        ready = {c.slot for c in self.children if c.ready}
        starting = [slot for slot in range(self.processes) if slot not in ready]
        if starting:
            return False, f"worker processes starting: {starting}"
        stopping = [c.slot for c in self.children if c.report == WORKER_STOPPING]
        if stopping:
            return False, f"worker processes stopping: {stopping}"
        now = time.monotonic()
        database = self._database_health()
        silent = [
            c.slot
            for c in self.children
            if c.report == HEARTBEAT_SILENT
            or (c.ready_fd is not None and now - c.reported_at > self.lease_seconds + 1.0)
        ]
        if silent and database[0]:
            return False, (
                f"worker processes {silent}: no heartbeat for over a lease: the event loop"
                " is blocked (a handler calling blocking code?), the process is frozen, or"
                " the heartbeat's statement waits for a lock on pgqueue.jobs"
            )
        held = [c.slot for c in self.children if c.report == SLOTS_HELD]
        if held:
            return False, (
                f"worker processes {held}: claims held back for over a lease by"
                " handlers that timed out and still run (a plain handler's thread, or an"
                " async one that ignored its cancellation): they run nothing until one"
                " returns; restart them"
            )
        return database

    def run(self) -> int:
        """Supervise until a signal stops the children; returns the exit code."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if not hangup_ignored():
            signal.signal(signal.SIGHUP, self._on_signal)
        signal.signal(signal.SIGQUIT, self._on_signal)
        server: MetricsServer | None = None
        try:
            if self.metrics_port is not None:
                # Removed below even when the port cannot be bound.
                self.metrics_dir = tempfile.mkdtemp(prefix="pgqueue-metrics-")
                stats = None
                if self.reapers or self.queue_stats:
                    stats = QueueStatsCollector(self.dsn, reaper=self.reapers)
                registry = supervisor_registry(self.metrics_dir, stats)
                server = MetricsServer(
                    self.metrics_host or DEFAULT_METRICS_HOST,
                    self.metrics_port,
                    registry,
                    self.healthy,
                ).start()
            return self._supervise()
        finally:
            for child in self.children:
                child.close_ready_fd()
            if server is not None:
                server.stop()
            if self.metrics_dir:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _supervise(self) -> int:
        now = time.monotonic()
        for slot in range(self.processes):
            if self._signals:
                break
            proc, ready_fd = self._start(slot)
            self.children.append(_Child(slot, proc, now, ready_fd))
        log.info("supervisor.started", processes=self.processes, pid=os.getpid())
        while not self._signals:
            now = time.monotonic()
            for child in self.children:
                child.poll_ready()
                code = child.proc.poll()
                if code is not None and child.restart_at is None:
                    lived = now - child.started
                    if lived >= HEALTHY_SECONDS:
                        child.restart_delay = RESTART_MIN_SECONDS
                    child.restart_at = now + child.restart_delay
                    # Exit 0: stopped gracefully by a signal of its own (its jobs
                    # released), not a crash; replaced all the same.
                    (log.warning if code == 0 else log.error)(
                        "supervisor.child_died",
                        slot=child.slot,
                        pid=child.proc.pid,
                        exit_code=code,
                        lived=round(lived, 2),
                        restart_in=round(child.restart_delay, 2),
                    )
                    child.restart_delay = min(RESTART_MAX_SECONDS, child.restart_delay * 2)
                    if self.metrics_dir:
                        # Its live gauges (running jobs, worker info) must stop counting.
                        from prometheus_client import multiprocess

                        multiprocess.mark_process_dead(child.proc.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
                if child.restart_at is not None and now >= child.restart_at and not self._signals:
                    self._restart(child, now)
            time.sleep(0.1)
        return self._wait_children()

    def _wait_children(self) -> int:
        first = signal.Signals(self._signals[0])
        log.info("supervisor.stopping", signal=first.name)
        # To every live child that missed it: one spawned while the signal was being
        # handled. (Only those: a child that got it may have closed its loop already, and
        # a second SIGINT would then end it in a traceback.)
        graceful = len(self._signals) == 1 and first != signal.SIGQUIT
        for child in self.children:
            if child.proc.poll() is None and child.proc.pid not in self._signalled:
                child.proc.send_signal(signal.SIGTERM if graceful else signal.SIGQUIT)
                self._signalled.add(child.proc.pid)
        # Children got the signal in _on_signal. A child may take its grace period plus
        # STOP_MARGIN_SECONDS (an in-flight claim, handlers it cancelled, flushing
        # outcomes, deregistering); killing it sooner could lose those outcomes.
        deadline = (
            time.monotonic()
            + self.shutdown_timeout
            + STOP_MARGIN_SECONDS
            + (REAPER_STOP_MARGIN_SECONDS if self.reapers else 0.0)
        )
        codes: list[int] = []
        for child in self.children:
            if child.restart_at is not None:
                # Dead and not restarted: nothing to wait for, but its death counts (a
                # child crash-looping when the stop came must not make the exit 0).
                if child.proc.returncode is not None:
                    codes.append(child.proc.returncode)
                continue
            remaining = max(0.1, deadline - time.monotonic())
            try:
                codes.append(child.proc.wait(timeout=remaining))
            except subprocess.TimeoutExpired:
                log.error("supervisor.child_killed", slot=child.slot, pid=child.proc.pid)
                child.proc.kill()
                codes.append(child.proc.wait())
        log.info("supervisor.stopped", exit_codes=codes)
        # A child killed by the stop signal itself did not get to install its handlers
        # (still starting) or had already finished (handlers gone): it held no jobs.
        clean = {0, -signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP}
        return 0 if all(c in clean for c in codes) else 1


def child_command(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "pgqueue", "worker", *args]
