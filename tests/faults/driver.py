"""Fault-injection driver: real ``pgqueue-worker`` and ``pgqueue-reaper`` processes on a
throwaway Postgres cluster, faults injected on a seeded schedule while jobs run, then
checks, from the database, that every promise of DESIGN.md held.

    python -m tests.faults.driver --jobs 2000 --duration 40 --seed 1

What it does:

1. starts its own cluster (tests/pgcluster.py), migrates it, creates
   ``public.fault_executions`` (tests/faults/app.py records every handler run there);
2. starts single-process workers, ``--processes`` supervisors and two reapers, with
   short leases; keeps their number up (replacing the dead) for the whole run;
3. enqueues ``--jobs`` jobs at a steady rate (idempotency keys make a retried batch
   safe): normal ones that sleep a few ms (``max_attempts`` 1 to 3, so a crash wrongly
   counted against one would dead-letter it), a few slow ones, and poison jobs that end
   their worker process on every attempt;
4. meanwhile injects faults on a seeded random schedule: SIGKILL and SIGTERM of worker
   processes (replacements started), SIGSTOP of a worker past its lease then SIGCONT
   (a stale worker), a job that blocks its worker's event loop (and heartbeat) past its
   lease, ``pg_terminate_backend`` of worker (LISTEN included) and reaper
   connections, Postgres restarts (``-m fast`` and ``-m immediate``), a reaper killed
   (two run at once). Before and after each fault it reads which jobs were in flight
   where the fault hit: that tally bounds the duplicate executions. Worker deaths it did
   not cause (poison jobs) are noticed by a monitor thread and tallied the same way;
5. waits for recovery, then checks the database (see ``Checker``) and prints a summary.

``--reapers 0 --embedded-reapers`` runs no pgqueue-reaper: every worker runs the reaper
itself (``pgqueue-worker --reaper``), one leading, and the faults hit the leader's worker
like any other (``terminate_reaper_conns`` cuts the embedded reapers' connections).

Exit status: 0 when no violation was found, 1 otherwise (each is listed). Every process
it started is killed and the cluster destroyed, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, LiteralString

import psycopg

from pgqueue import JobSpec, enqueue_many
from pgqueue.migrate import migrate
from pgqueue.worker.daemon import FLUSH_TIMEOUT_SECONDS
from tests.faults.app import (
    EXECUTIONS_DDL,
    POISON_EXIT_CODE,
    TASK_BLOCK,
    TASK_POISON,
    TASK_SLOW,
    TASK_WORK,
)
from tests.pgcluster import PgCluster

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
APP = "tests.faults.app:registry"
DRIVER_APP_NAME = "pgqueue-faults-driver"
KEY_PREFIX = "faults"

SIGKILL_WORKER = "sigkill_worker"
SIGTERM_WORKER = "sigterm_worker"
SIGSTOP_WORKER = "sigstop_worker"
BLOCK_EVENT_LOOP = "block_event_loop"
TERMINATE_WORKER_CONNS = "terminate_worker_conns"
TERMINATE_REAPER_CONNS = "terminate_reaper_conns"
RESTART_FAST = "restart_fast"
RESTART_IMMEDIATE = "restart_immediate"
KILL_REAPER = "kill_reaper"
# Faults that only cut connections: a job running through one loses a run only if its
# lease expired meanwhile (Checker.hits).
CONNECTION_FAULTS = frozenset({TERMINATE_WORKER_CONNS, TERMINATE_REAPER_CONNS, RESTART_FAST,
                               RESTART_IMMEDIATE})  # fmt: skip
LEASE_LOSS_SLACK = 30.0
# Not injected: a worker process that died without the driver's doing (a poison job).
WORKER_CRASH = "worker_crash"

# One round of the schedule; --repeat N runs N rounds (shuffled together).
ROUND: tuple[str, ...] = (
    SIGKILL_WORKER,
    SIGKILL_WORKER,
    SIGTERM_WORKER,
    SIGSTOP_WORKER,
    BLOCK_EVENT_LOOP,
    TERMINATE_WORKER_CONNS,
    TERMINATE_REAPER_CONNS,
    RESTART_FAST,
    RESTART_IMMEDIATE,
    KILL_REAPER,
)
FAULT_KINDS: tuple[str, ...] = tuple(dict.fromkeys(ROUND))

NORMAL_MS = (5, 50)
SLOW_MS = (300, 1200)
# The job a SIGSTOPped worker is caught running.
STALE_MS = 2000
# Jobs a SIGTERMed worker is caught running: one it finishes within its grace period
# (--shutdown-timeout), one it has to release.
GRACE_MS = 1000
RELEASE_MS = 2500
# The job a SIGKILLed worker is caught running, when the one picked runs nothing.
KILL_MS = 2000

CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)

RUNNING_BY_PID = """
    SELECT split_part(leased_by, ':', 2)::int AS pid, array_agg(id), array_agg(task),
           min(leased_by)
    FROM pgqueue.jobs WHERE state = 'running' GROUP BY 1
"""
RUNNING_IDS = "SELECT id FROM pgqueue.jobs WHERE state = 'running'"


# --- settings and results -------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    jobs: int = 2000
    # Seconds of fault injection; jobs are enqueued at a steady rate over the same time.
    duration: float = 40.0
    seed: int = 1
    # Rounds of the fault schedule (each round holds every kind; SIGKILL twice).
    repeat: int = 1
    # Only these fault kinds (empty: all of them).
    kinds: tuple[str, ...] = ()
    # Poison jobs (None: jobs // 400, between 4 and 12), enqueued in the first 60 %.
    poison: int | None = None
    workers: int = 3
    supervisors: int = 1
    processes: int = 2
    concurrency: int = 8
    reapers: int = 2
    lease_seconds: float = 3.0
    reaper_interval: float = 0.5
    poll_interval: float = 1.0
    backoff_base: float = 0.2
    shutdown_timeout: float = 1.5
    slow_fraction: float = 0.02
    normal_max_attempts: tuple[int, ...] = (1, 2, 3)
    poison_max_attempts: int = 3
    recovery_timeout: float = 120.0
    log_level: str = "info"
    # Workers run with --async-commit (synchronous_commit = off on their connections).
    async_commit: bool = False
    # Workers run with --reaper (a reaper in each worker process, one leading); combine
    # with reapers=0 to run no pgqueue-reaper at all. Embedded reapers requeue with the
    # default backoff base (1 s).
    embedded_reapers: bool = False
    log_dir: Path | None = None
    keep_logs: bool = False
    verbose: bool = True

    @property
    def poison_jobs(self) -> int:
        if self.poison is not None:
            return self.poison
        return max(4, min(12, self.jobs // 400))

    @property
    def enqueue_seconds(self) -> float:
        return self.duration

    @property
    def max_handler_seconds(self) -> float:
        return max(SLOW_MS[1], STALE_MS, RELEASE_MS, KILL_MS) / 1000.0

    @property
    def max_backoff_seconds(self) -> float:
        # pgqueue.backoff_delay: base * 2^(attempt-1), times a jitter factor below 1.25.
        top = max(self.poison_max_attempts, *self.normal_max_attempts)
        return float(self.backoff_base * 2 ** (top - 1) * 1.25)

    def recovery_bound(self) -> tuple[float, str]:
        """Seconds from the last fault to the last job's final state, and why."""
        parts = [
            ("lease", self.lease_seconds),
            ("reaper interval", self.reaper_interval),
            ("backoff", self.max_backoff_seconds),
            # A SIGSTOPped worker may hold the embedded reapers' lead: a standby covers
            # once a lease has been expired for two intervals + 5 s.
            *([("standby grace", 2 * self.reaper_interval + 5.0)] if self.embedded_reapers else []),
            # A busy worker looks for waiting rescued jobs once per poll interval...
            ("poll interval", self.poll_interval),
            # ...then drains its running handlers and runs the rescued job alone. Busy
            # workers take turns to drain, a lease apart: one whose turn was skipped (a
            # stop under way) costs a lease.
            ("drain + solo run", 2 * self.max_handler_seconds),
            ("a skipped drain turn", self.lease_seconds),
            # psycopg_pool retries a failed connect after 1 s, then 2 s.
            ("pool reconnect", 3.0),
            # A shared 2-core machine: replacement processes take ~1 s of CPU to start.
            ("scheduling slack", 2.0),
        ]
        total = sum(v for _, v in parts)
        return total, " + ".join(f"{name} {v:g}" for name, v in parts)


def _children_stopped_cleanly(log_path: Path) -> bool:
    """Whether a supervisor's ``supervisor.stopped`` event lists only codes of a clean
    stop (0, killed by the stop signal), of a poison job's crash, or of the driver's
    SIGKILL of a child not yet replaced (not of the supervisor's own kill of a child
    that outlived its deadline: ``supervisor.child_killed``)."""
    clean = {0, -signal.SIGTERM, -signal.SIGINT, -signal.SIGKILL, POISON_EXIT_CODE}
    codes: list[int] | None = None
    text = log_path.read_text(errors="replace")
    if '"supervisor.child_killed"' in text:
        return False
    for line in text.splitlines():
        if '"supervisor.stopped"' in line:
            with contextlib.suppress(ValueError):
                codes = json.loads(line).get("exit_codes")
    return codes is not None and all(c in clean for c in codes)


@dataclass
class Fault:
    kind: str
    started: float  # wall clock (time.time()), comparable with the database's timestamps
    ended: float
    target: str
    at_risk: frozenset[int]
    detail: str = ""
    # The worker process hit, where there is one (its pgqueue worker id if it held jobs).
    pid: int | None = None
    worker_id: str | None = None


@dataclass
class Report:
    settings: Settings
    enqueued: int = 0
    normal: int = 0
    poison: int = 0
    completed: int = 0
    dead: int = 0
    dead_poison: int = 0
    lost: int = 0
    executions: int = 0
    duplicates: int = 0
    duplicate_bound: int = 0
    rescued: int = 0
    released: int = 0
    stale_fenced: int = 0
    lease_lost_logged: int = 0
    false_lease_lost: int = 0
    # Last fault of the run -> every job final.
    recovery_seconds: float | None = None
    # The slowest job to reach its final state after the last fault that hit it.
    recovery_job_seconds: float | None = None
    recovery_job: int | None = None
    recovery_bound: float = 0.0
    recovery_bound_why: str = ""
    wall_seconds: float = 0.0
    faults: list[Fault] = field(default_factory=list)
    # Per fault kind: extra runs that followed such a fault (the latest one before the
    # run that had the job in flight).
    rerun_by_kind: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    log_dir: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.violations

    def _recovery(self) -> str:
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.1f}"

        return (
            f"{fmt(self.recovery_seconds)} after the last fault (or enqueue), worst job"
            f" {fmt(self.recovery_job_seconds)} after its last fault (job {self.recovery_job})"
            f" (bound {self.recovery_bound:.1f})"
        )

    def fault_counts(self) -> Counter[str]:
        return Counter(f.kind for f in self.faults)

    def table(self) -> str:
        s = self.settings
        rows: list[tuple[str, str]] = [
            ("seed", str(s.seed)),
            ("jobs enqueued", f"{self.enqueued} ({self.normal} normal, {self.poison} poison)"),
            ("completed (succeeded)", str(self.completed)),
            ("dead", f"{self.dead} ({self.dead_poison} poison)"),
            ("lost", str(self.lost)),
            ("executions", str(self.executions)),
            (
                "duplicates",
                f"{self.duplicates} (bound {self.duplicate_bound}: jobs in flight where"
                " a worker died or froze, or a lease was lost)",
            ),
            ("rescued jobs", str(self.rescued)),
            ("released on SIGTERM", str(self.released)),
            (
                "stale completions fenced",
                f"{self.stale_fenced} (lease.lost logged {self.lease_lost_logged},"
                f" {self.false_lease_lost} of them for a lease never lost)",
            ),
            ("recovery seconds", self._recovery()),
            ("recovery bound", self.recovery_bound_why or "n/a"),
            ("wall seconds", f"{self.wall_seconds:.0f}"),
        ]
        counts = self.fault_counts()
        in_flight: Counter[str] = Counter()
        for f in self.faults:
            in_flight[f.kind] += len(f.at_risk)
        lines = ["", "pgqueue fault-injection run", "-" * 64]
        lines += [f"{k:<26}{v}" for k, v in rows]
        lines.append("-" * 64)
        rerun = self.rerun_by_kind
        lines.append(f"{'fault':<26}{'count':>6}{'jobs in flight':>16}{'ran again':>11}")
        for kind in (
            *FAULT_KINDS,
            WORKER_CRASH,
            *(["unexplained"] if rerun["unexplained"] else []),
        ):
            lines.append(
                f"{kind:<26}{counts.get(kind, 0):>6}{in_flight.get(kind, 0):>16}"
                f"{rerun.get(kind, 0):>11}"
            )
        lines.append(
            f"{'total':<26}{sum(counts.values()):>6}{sum(in_flight.values()):>16}"
            f"{sum(rerun.values()):>11}"
        )
        lines.append("-" * 64)
        if self.violations:
            lines.append(f"VIOLATIONS ({len(self.violations)}):")
            lines += [f"  - {v}" for v in self.violations]
        else:
            lines.append("violations: none")
        if self.notes:
            lines.append("notes:")
            lines += [f"  - {n}" for n in self.notes]
        if self.log_dir is not None:
            lines.append(f"logs: {self.log_dir}")
        return "\n".join(lines)


# --- database access that survives the faults ----------------------------------------


class Db:
    """The driver's own connection (one per thread); reconnects, since faults break it."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None

    def connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(
                self.dsn, autocommit=True, application_name=DRIVER_APP_NAME, connect_timeout=3
            )
        return self._conn

    def retrying(self, fn: Callable[[psycopg.Connection[Any]], Any], deadline: float = 60.0) -> Any:
        end = time.monotonic() + deadline
        while True:
            try:
                return fn(self.connection())
            except CONNECTION_ERRORS:
                self.close()
                if time.monotonic() > end:
                    raise
                time.sleep(0.1)

    def rows(
        self, sql: LiteralString, params: Any = None, deadline: float = 60.0
    ) -> list[tuple[Any, ...]]:
        return self.retrying(lambda c: c.execute(sql, params).fetchall(), deadline)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


# --- processes ------------------------------------------------------------------------


@dataclass
class Daemon:
    role: str  # "worker" (one process), "supervisor" (--processes N) or "reaper"
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    started: float
    retiring_since: float | None = None  # SIGTERM sent
    killed: bool = False  # SIGKILL sent by the driver
    exit_code: int | None = None
    children: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.popen.pid


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) for every process (Linux /proc)."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2 :].split()
        table[int(entry.name)] = (int(rest[1]), rest[0])
    return table


def _alive(pid: int) -> bool:
    """Running (or stopped), not a zombie waiting for its parent."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def _live_children(table: dict[int, tuple[int, str]], pid: int) -> set[int]:
    return {p for p, (ppid, state) in table.items() if ppid == pid and state not in "ZX"}


# --- the run --------------------------------------------------------------------------


class Driver:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.rng = random.Random(settings.seed)
        self.report = Report(settings)
        self.cluster: PgCluster | None = None
        self.dsn = ""
        self.log_dir = Path()
        self._own_log_dir = False
        self.lock = threading.RLock()
        self.daemons: list[Daemon] = []
        self.all_daemons: list[Daemon] = []
        self.killed_pids: set[int] = set()
        self.stopped_pids: set[int] = set()
        self.stop_event = threading.Event()
        self.enqueue_done = threading.Event()
        self.threads: list[threading.Thread] = []
        self.specs: list[JobSpec] = []
        # Jobs the fault injector enqueues for itself (the stale worker's job).
        self.extra_specs: list[JobSpec] = []
        # How many of ``specs`` the enqueuer committed (all of them unless it failed).
        self.sent = 0
        self._sigterms = 0
        self.poison_keys: set[str] = set()
        self._seq = 0
        self._t0 = 0.0

    # --- helpers ---

    def say(self, message: str) -> None:
        if self.s.verbose:
            print(f"[{time.monotonic() - self._t0:7.1f}s] {message}", flush=True)

    def violation(self, message: str) -> None:
        with self.lock:
            self.report.violations.append(message)
        self.say(f"VIOLATION: {message}")

    def note(self, message: str) -> None:
        with self.lock:
            self.report.notes.append(message)

    # --- processes ---

    def spawn(self, role: str) -> Daemon:
        with self.lock:
            self._seq += 1
            name = f"{role}-{self._seq}"
        s = self.s
        common = ["--log-format", "json", "--log-level", s.log_level]
        if role == "reaper":
            argv = [
                str(BIN / "pgqueue-reaper"),
                "--interval", str(s.reaper_interval),
                "--backoff-base-seconds", str(s.backoff_base),
                *common,
            ]  # fmt: skip
        else:
            argv = [
                str(BIN / "pgqueue-worker"),
                "--app", APP,
                "--concurrency", str(s.concurrency),
                "--lease-seconds", str(s.lease_seconds),
                "--poll-interval", str(s.poll_interval),
                "--shutdown-timeout", str(s.shutdown_timeout),
                *common,
            ]  # fmt: skip
            if role == "supervisor":
                argv += ["--processes", str(s.processes)]
            if s.async_commit:
                argv.append("--async-commit")
            if s.embedded_reapers:
                argv += ["--reaper", "--reaper-interval", str(s.reaper_interval)]
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("PGQUEUE_") and k != "PROMETHEUS_MULTIPROC_DIR"
        }
        env["PGQUEUE_DSN"] = self.dsn
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                argv,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                start_new_session=True,
            )
        daemon = Daemon(role, name, popen, log_path, time.time())
        with self.lock:
            self.daemons.append(daemon)
            self.all_daemons.append(daemon)
        return daemon

    def leaves(self, *, include_new: bool = True) -> dict[int, Daemon]:
        """Live worker processes (a supervisor's children, or single workers) that the
        driver has not stopped or asked to stop -> the daemon they belong to."""
        now = time.time()
        found: dict[int, Daemon] = {}
        with self.lock:
            for d in self.daemons:
                if d.retiring_since is not None or d.killed or d.exit_code is not None:
                    continue
                if not include_new and now - d.started < 1.5:
                    continue
                if d.role == "worker":
                    found[d.pid] = d
                elif d.role == "supervisor":
                    for child in d.children:
                        found[child] = d
            for pid in self.stopped_pids | self.killed_pids:
                found.pop(pid, None)
        return {pid: d for pid, d in found.items() if _alive(pid)}

    def running_by_pid(self, db: Db) -> dict[int, tuple[set[int], set[str], str]]:
        return {
            int(pid): (set(ids), set(tasks), worker_id)
            for pid, ids, tasks, worker_id in db.rows(RUNNING_BY_PID)
        }

    def running_of(self, db: Db, pids: Iterable[int]) -> set[int]:
        pids = list(pids)
        rows = db.rows(
            "SELECT id FROM pgqueue.jobs WHERE state = 'running'"
            " AND split_part(leased_by, ':', 2) = ANY(%s)",
            ([str(p) for p in pids],),
        )
        return {r[0] for r in rows}

    def monitor(self) -> None:
        """Keeps the daemon counts up, notices deaths the driver did not cause (poison
        jobs) and tallies the jobs those deaths had in flight, checks graceful exits."""
        db = Db(self.dsn)
        wanted = {"worker": self.s.workers, "supervisor": self.s.supervisors}
        wanted["reaper"] = self.s.reapers
        try:
            while not self.stop_event.is_set():
                table = _proc_table()
                crashed: list[tuple[int, str]] = []
                with self.lock:
                    for d in list(self.daemons):
                        code = d.popen.poll()
                        if d.role == "supervisor" and code is None:
                            now_children = _live_children(table, d.pid)
                            if d.retiring_since is None:
                                for gone in d.children - now_children:
                                    if gone not in self.killed_pids:
                                        crashed.append((gone, f"{d.name} child {gone}"))
                            d.children = now_children
                        if code is None:
                            if d.retiring_since is not None:
                                self._check_retiring(d)
                            continue
                        d.exit_code = code
                        self.daemons.remove(d)
                        self._on_exit(d, code, crashed)
                    for role, count in wanted.items():
                        live = [
                            d
                            for d in self.daemons
                            if d.role == role and d.retiring_since is None and not d.killed
                        ]
                        for _ in range(count - len(live)):
                            self.spawn(role)
                for pid, target in crashed:
                    self._tally_crash(db, pid, target)
                self.stop_event.wait(0.1)
        finally:
            db.close()

    def _on_exit(self, d: Daemon, code: int, crashed: list[tuple[int, str]]) -> None:
        if d.retiring_since is not None:
            took = time.time() - d.retiring_since
            graceful = code == 0 or (d.role == "worker" and code == POISON_EXIT_CODE)
            if d.role == "supervisor" and code == 1:
                # Its children's codes (its last event) decide: a poison job may have
                # ended one mid-drain; any other failure is not graceful.
                graceful = _children_stopped_cleanly(d.log_path)
            if not graceful:
                self.violation(
                    f"{d.name} (pid {d.pid}) exited with {code} {took:.1f}s after SIGTERM;"
                    f" a graceful stop exits 0 (log {d.log_path})"
                )
            self.say(f"{d.name} exited {code} {took:.1f}s after SIGTERM")
        elif d.killed:
            pass
        elif d.role == "worker" and code == POISON_EXIT_CODE:
            crashed.append((d.pid, d.name))
        else:
            self.violation(
                f"{d.name} (pid {d.pid}) exited on its own with status {code} (log {d.log_path})"
            )
            if d.role == "worker":
                crashed.append((d.pid, d.name))

    def _check_retiring(self, d: Daemon) -> None:
        assert d.retiring_since is not None
        limit = self.s.shutdown_timeout + FLUSH_TIMEOUT_SECONDS + 10.0
        if time.time() - d.retiring_since > limit:
            self.violation(
                f"{d.name} (pid {d.pid}) still running {limit:.0f}s after SIGTERM"
                f" (shutdown timeout {self.s.shutdown_timeout:g}s); killed"
            )
            d.killed = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(d.pid, signal.SIGKILL)

    def _tally_crash(self, db: Db, pid: int, target: str) -> None:
        # The process is gone: the rows it held stay 'running' under its lease until the
        # reaper takes them (a lease after its last heartbeat), so this read is complete.
        t = time.time()
        at_risk = self.running_of(db, [pid])
        with self.lock:
            self.report.faults.append(Fault(WORKER_CRASH, t, t, target, frozenset(at_risk)))

    # --- jobs ---

    def make_specs(self) -> None:
        s = self.s
        rng = random.Random(s.seed * 7919 + 1)
        poison_at = set(rng.sample(range(max(1, int(s.jobs * 0.6))), s.poison_jobs))
        for i in range(s.jobs):
            key = f"{KEY_PREFIX}-{s.seed}-{i}"
            if i in poison_at:
                spec = JobSpec(
                    TASK_POISON, {}, max_attempts=s.poison_max_attempts, idempotency_key=key
                )
                self.poison_keys.add(key)
            elif rng.random() < s.slow_fraction:
                spec = JobSpec(
                    TASK_SLOW,
                    {"ms": rng.randint(*SLOW_MS)},
                    max_attempts=rng.choice(s.normal_max_attempts),
                    idempotency_key=key,
                )
            else:
                spec = JobSpec(
                    TASK_WORK,
                    {"ms": rng.randint(*NORMAL_MS)},
                    max_attempts=rng.choice(s.normal_max_attempts),
                    idempotency_key=key,
                )
            self.specs.append(spec)

    def enqueuer(self) -> None:
        db = Db(self.dsn)
        sent = 0
        start = time.monotonic()
        try:
            while sent < len(self.specs) and not self.stop_event.is_set():
                elapsed = time.monotonic() - start
                due = min(
                    len(self.specs),
                    math.ceil(len(self.specs) * elapsed / self.s.enqueue_seconds),
                )
                while sent < due:
                    batch = self.specs[sent : min(due, sent + 1000)]
                    # A batch cut off by a fault may or may not have committed: the
                    # idempotency keys make sending it again safe either way.
                    db.retrying(functools.partial(enqueue_many, jobs=batch), deadline=120.0)
                    sent += len(batch)
                    self.sent = sent
                self.stop_event.wait(0.2)
        finally:
            db.close()
            self.say(f"enqueued {sent} jobs")
            self.enqueue_done.set()

    # --- faults ---

    def cost(self, kind: str) -> float:
        """About how long injecting ``kind`` takes (finding a target, waiting out the
        lease of a stopped or blocked worker, sampling after a restart)."""
        stale = self.s.lease_seconds + self.s.reaper_interval + 4.0
        costs = {SIGSTOP_WORKER: stale, BLOCK_EVENT_LOOP: stale, SIGTERM_WORKER: 1.5}
        costs |= {SIGKILL_WORKER: 1.5, RESTART_FAST: 2.0, RESTART_IMMEDIATE: 2.0}
        return costs.get(kind, 0.5)

    def schedule(self) -> list[tuple[float, str]]:
        """(seconds from the start, kind): every kind ``repeat`` times in a seeded order,
        spread so that the last one ends about when the enqueueing does."""
        kinds = [k for k in ROUND if not self.s.kinds or k in self.s.kinds] * self.s.repeat
        self.rng.shuffle(kinds)
        warmup = min(3.0, self.s.duration * 0.1)
        busy = sum(self.cost(kind) for kind in kinds)
        gap = max(0.0, (self.s.duration - warmup - busy) / len(kinds))
        plan = []
        at = warmup
        for kind in kinds:
            at += gap * self.rng.uniform(0.7, 1.3)
            plan.append((at, kind))
            at += self.cost(kind)
        return plan

    def pick_leaf(
        self, db: Db, prefer_task: str | None = None, wait: float = 5.0
    ) -> tuple[int, Daemon] | None:
        """A worker process to hit, mid-job: one running ``prefer_task`` if one does
        within ``wait`` seconds, else one running anything, else any."""
        deadline = time.monotonic() + wait
        while True:
            leaves = self.leaves(include_new=False) or self.leaves()
            running = self.running_by_pid(db)
            busy = sorted(p for p in leaves if p in running)
            preferred = busy
            if prefer_task is not None:
                preferred = [p for p in busy if prefer_task in running[p][1]]
            pool = preferred
            if not pool and time.monotonic() > deadline:
                pool = busy or sorted(leaves)
            if pool:
                pid = self.rng.choice(pool)
                return pid, leaves[pid]
            if not leaves and time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def inject(self, kind: str, db: Db) -> Fault | None:
        t = time.time()
        if kind == SIGKILL_WORKER:
            picked = self.pick_leaf(db)
            if picked is None:
                return None
            before = self.running_of(db, [picked[0]])
            if not before:
                # Its jobs ended since it was picked (short jobs come and go): kill one
                # caught running a job of the driver's own, so the kill hits mid-job (a
                # CI run's two kills both hit idle processes); failing that, one picked
                # afresh (the first may be gone by now).
                picked = self._catch_running(db, "kill", KILL_MS) or self.pick_leaf(db, wait=0)
                if picked is None:
                    return None
                before = self.running_of(db, [picked[0]])
            pid, owner = picked
            with self.lock:
                self.killed_pids.add(pid)
                if owner.role == "worker":
                    owner.killed = True
            t = time.time()
            os.kill(pid, signal.SIGKILL)
            done = time.time()
            time.sleep(0.3)
            after = self.running_of(db, [pid])
            return Fault(kind, t, done, f"{owner.name} pid {pid}", frozenset(before | after))
        if kind == SIGTERM_WORKER:
            return self._sigterm(db)
        if kind == SIGSTOP_WORKER:
            return self._sigstop(db)
        if kind == BLOCK_EVENT_LOOP:
            return self._block(db)
        if kind in (TERMINATE_WORKER_CONNS, TERMINATE_REAPER_CONNS):
            app = "pgqueue-worker" if kind == TERMINATE_WORKER_CONNS else "pgqueue-reaper"
            before = {r[0] for r in db.rows(RUNNING_IDS)} if app == "pgqueue-worker" else set()
            rows = db.rows(
                "SELECT pg_terminate_backend(pid), query = 'LISTEN pgqueue_jobs'"
                " FROM pg_stat_activity WHERE application_name = %s",
                (app,),
            )
            done = time.time()
            killed = sum(1 for ok, _ in rows if ok)
            listen = sum(1 for ok, is_listen in rows if ok and is_listen)
            detail = f"{killed} backends" + (
                f", {listen} LISTEN" if app == "pgqueue-worker" else ""
            )
            if app == "pgqueue-worker":
                time.sleep(0.5)
                before |= {r[0] for r in db.rows(RUNNING_IDS)}
            return Fault(kind, t, done, app, frozenset(before), detail)
        if kind in (RESTART_FAST, RESTART_IMMEDIATE):
            assert self.cluster is not None
            mode = "fast" if kind == RESTART_FAST else "immediate"
            before = {r[0] for r in db.rows(RUNNING_IDS)}
            self.cluster.restart(mode)
            done = time.time()
            # Jobs claimed just before the restart, and those held while the workers'
            # pools reconnect (psycopg_pool backs off 1 s, then 2 s).
            for _ in range(3):
                before |= {r[0] for r in db.rows(RUNNING_IDS)}
                time.sleep(0.5)
            return Fault(kind, t, done, f"postgres -m {mode}", frozenset(before),
                         f"down {done - t:.1f}s")  # fmt: skip
        if kind == KILL_REAPER:
            with self.lock:
                reapers = [d for d in self.daemons if d.role == "reaper" and not d.killed]
                if not reapers:
                    return None
                target = self.rng.choice(reapers)
                target.killed = True
            os.killpg(target.pid, signal.SIGKILL)
            return Fault(kind, t, time.time(), f"{target.name} pid {target.pid}", frozenset())
        raise ValueError(kind)

    def _sigterm(self, db: Db) -> Fault | None:
        # The daemon (single worker or supervisor) of a process running a job of the
        # driver's own: every other time one that outlives the grace period, so that it
        # is released (and runs again elsewhere, its attempt not counted).
        with self.lock:
            self._sigterms += 1
            release = self._sigterms % 2 == 1
        ms = RELEASE_MS if release else GRACE_MS
        picked = self._catch_running(db, "release" if release else "grace", ms)
        picked = picked or self.pick_leaf(db, prefer_task=TASK_SLOW)
        if picked is None:
            return None
        target = picked[1]

        def pids(d: Daemon) -> set[int]:
            return set(d.children) if d.role == "supervisor" else {d.pid}

        before = self.running_of(db, pids(target))
        with self.lock:
            target.retiring_since = t = time.time()
        os.kill(target.pid, signal.SIGTERM)
        done = time.time()
        # And what a claim already on its way when the signal came started (the worker
        # runs on through its grace period, so its rows still show it).
        time.sleep(0.3)
        after = self.running_of(db, pids(target))
        return Fault(
            SIGTERM_WORKER, t, done, f"{target.name} pid {target.pid}", frozenset(before | after)
        )

    def _catch_running(
        self, db: Db, label: str, ms: int, task: str = TASK_SLOW
    ) -> tuple[int, Daemon] | None:
        """Enqueue a job of the driver's own (``task`` for ``ms`` milliseconds) and return
        the worker process that runs it, once it does (None if that takes over 10 s)."""
        with self.lock:
            key = f"{KEY_PREFIX}-{self.s.seed}-{label}-{len(self.extra_specs)}"
            args: dict[str, Any] = {"ms": ms} if task == TASK_SLOW else {"seconds": ms / 1000}
            spec = JobSpec(task, args, max_attempts=2, idempotency_key=key)
            self.extra_specs.append(spec)
        db.retrying(functools.partial(enqueue_many, jobs=[spec]))
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            rows = db.rows(
                "SELECT split_part(leased_by, ':', 2)::int FROM pgqueue.jobs"
                " WHERE idempotency_key = %s AND state = 'running'",
                (key,),
            )
            if rows:
                time.sleep(0.3)  # well into the handler
                leaves = self.leaves()
                pid = rows[0][0]
                return (pid, leaves[pid]) if pid in leaves else None
            time.sleep(0.05)
        return None

    def _sigstop(self, db: Db) -> Fault | None:
        # Caught running a job of its own: that handler finishes after SIGCONT, when its
        # job has run again elsewhere, and its result must be fenced off.
        picked = self._catch_running(db, "stale", STALE_MS)
        picked = picked or self.pick_leaf(db, prefer_task=TASK_SLOW)
        if picked is None:
            return None
        pid, owner = picked
        worker_ids = {row[0] for row in db.rows(
            "SELECT DISTINCT leased_by FROM pgqueue.jobs WHERE state = 'running'"
            " AND split_part(leased_by, ':', 2) = %s", (str(pid),))}  # fmt: skip
        before = self.running_of(db, [pid])
        with self.lock:
            self.stopped_pids.add(pid)
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.time()
        try:
            time.sleep(0.3)
            held = self.running_of(db, [pid])
            at_risk = before | held
            # Frozen: no heartbeat. Wait until the reaper took every job it held...
            limit = self.s.lease_seconds + self.s.reaper_interval + 5.0
            deadline = time.monotonic() + limit
            while held and time.monotonic() < deadline:
                time.sleep(0.2)
                held = self.running_of(db, [pid])
            if held:
                self.violation(
                    f"SIGSTOPped {owner.name} pid {pid}: jobs {sorted(held)} still leased to it"
                    f" {limit:.1f}s later (lease {self.s.lease_seconds:g}s); "
                    + self._lock_report(db, pid)
                )
            # ...and, for a while, until their newer attempts finished, so that the
            # stale worker's late results arrive after those.
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline:
                pending = db.rows(
                    "SELECT count(*) FROM pgqueue.jobs WHERE id = ANY(%s)"
                    " AND state IN ('queued', 'running')",
                    (sorted(at_risk),),
                )[0][0]
                if not pending:
                    break
                time.sleep(0.2)
        finally:
            os.kill(pid, signal.SIGCONT)
            with self.lock:
                self.stopped_pids.discard(pid)
        done = time.time()
        return Fault(
            SIGSTOP_WORKER,
            stopped_at,
            done,
            f"{owner.name} pid {pid}",
            frozenset(at_risk),
            f"stopped {done - stopped_at:.1f}s",
            pid=pid,
            worker_id=min(worker_ids) if worker_ids else None,
        )

    def _block(self, db: Db) -> Fault | None:
        """A job that blocks its worker's event loop past its lease (heartbeat frozen,
        the process otherwise alive): it and its neighbours run again elsewhere, and
        the blocked worker's late results must be fenced off."""
        block_ms = int((self.s.lease_seconds + self.s.reaper_interval + 2.5) * 1000)
        picked = self._catch_running(db, "block", block_ms, task=TASK_BLOCK)
        if picked is None:
            return None
        pid, owner = picked
        started = time.time() - 0.3  # _catch_running saw it running 0.3 s ago
        # The loop is blocked: the process claims nothing more, so this is all it holds.
        rows = db.rows(
            "SELECT id, leased_by FROM pgqueue.jobs WHERE state = 'running'"
            " AND split_part(leased_by, ':', 2) = %s",
            (str(pid),),
        )
        at_risk = {row[0] for row in rows}
        worker_ids = {row[1] for row in rows}
        time.sleep(1.0)
        # Did the block catch the completer between two statements of its transaction?
        # Then the rows it updated stay locked (the reaper skips locked rows) until the
        # loop runs again: the jobs are late, not lost. Worth knowing, not a violation.
        frozen = db.rows(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgqueue-worker'"
            " AND state LIKE 'idle in transaction%' AND now() - state_change > interval '0.5 s'"
        )[0][0]
        time.sleep(max(0.0, block_ms / 1000 - 1.0) + 0.5)
        return Fault(
            BLOCK_EVENT_LOOP,
            started,
            time.time(),
            f"{owner.name} pid {pid}",
            frozenset(at_risk),
            f"loop blocked {block_ms / 1000:g}s"
            + (f", {frozen} transaction(s) frozen open" if frozen else ""),
            pid=pid,
            worker_id=min(worker_ids) if worker_ids else None,
        )

    def _lock_report(self, db: Db, pid: int) -> str:
        rows = db.rows(
            "SELECT a.pid, a.state, a.application_name, left(a.query, 80),"
            " now() - a.xact_start FROM pg_stat_activity AS a"
            " WHERE a.state LIKE 'idle in transaction%'"
        )
        return f"sessions idle in transaction: {rows}"

    def fault_loop(self) -> None:
        db = Db(self.dsn)
        start = time.monotonic()
        try:
            for at, kind in self.schedule():
                wait = at - (time.monotonic() - start)
                if wait > 0 and self.stop_event.wait(wait):
                    return
                try:
                    fault = self.inject(kind, db)
                except Exception as exc:  # report, and go on with the schedule
                    self.violation(f"injecting {kind} failed: {exc!r}")
                    continue
                if fault is None:
                    self.note(f"{kind} skipped: no target")
                    continue
                with self.lock:
                    self.report.faults.append(fault)
                self.say(
                    f"{kind}: {fault.target}, {len(fault.at_risk)} jobs in flight"
                    + (f" ({fault.detail})" if fault.detail else "")
                )
        finally:
            db.close()

    # --- the whole run ---

    def run(self) -> Report:
        self._t0 = time.monotonic()
        s = self.s
        if s.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="pgqueue-faults-"))
            self._own_log_dir = True
        else:
            self.log_dir = s.log_dir
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self.report.log_dir = self.log_dir
        try:
            self._run()
        except BaseException as exc:
            self.violation(f"the driver failed: {exc!r}")
            if not isinstance(exc, Exception):
                raise
        finally:
            self._teardown()
            self.report.wall_seconds = time.monotonic() - self._t0
            if self._own_log_dir and self.report.ok and not s.keep_logs:
                shutil.rmtree(self.log_dir, ignore_errors=True)
                self.report.log_dir = None
        return self.report

    def _run(self) -> None:
        s = self.s
        self.cluster = PgCluster()
        self.cluster.start()
        self.dsn = self.cluster.dsn
        migrate(self.dsn)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for statement in EXECUTIONS_DDL.split(";"):
                if statement.strip():
                    conn.execute(statement)
        self.make_specs()
        self.say(
            f"cluster on port {self.cluster.port}; {s.jobs} jobs ({s.poison_jobs} poison),"
            f" {s.duration:g}s of faults, seed {s.seed}, logs in {self.log_dir}"
        )
        for _ in range(s.reapers):
            self.spawn("reaper")
        for _ in range(s.workers):
            self.spawn("worker")
        for _ in range(s.supervisors):
            self.spawn("supervisor")
        db = Db(self.dsn)
        expected_workers = s.workers + s.supervisors * s.processes
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if db.rows("SELECT count(*) FROM pgqueue.workers")[0][0] >= expected_workers:
                break
            time.sleep(0.1)
        self.say("daemons up")
        for target in (self.monitor, self.enqueuer):
            thread = threading.Thread(
                target=self._guarded, args=(target,), name=target.__name__, daemon=True
            )
            thread.start()
            self.threads.append(thread)
        self.fault_loop()
        self.enqueue_done.wait()
        self.say("faults over; waiting for recovery")
        recovered = self._wait_recovered(db)
        self._check_listeners(db)
        self._check_registry(db)
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=30)
        Checker(self, db).check(recovered)
        db.close()

    def _guarded(self, target: Callable[[], None]) -> None:
        try:
            target()
        except Exception as exc:
            self.violation(f"the driver's {target.__name__} thread failed: {exc!r}")

    def _wait_recovered(self, db: Db) -> bool:
        deadline = time.monotonic() + self.s.recovery_timeout
        while time.monotonic() < deadline:
            pending, total = db.rows(
                "SELECT count(*) FILTER (WHERE state IN ('queued', 'running')), count(*)"
                " FROM pgqueue.jobs"
            )[0]
            dead = db.rows("SELECT count(*) FROM pgqueue.dead_jobs")[0][0]
            if pending == 0 and total + dead >= self.sent + len(self.extra_specs):
                self.say("recovered")
                return True
            time.sleep(0.25)
        self.violation(f"not recovered {self.s.recovery_timeout:g}s after the faults stopped")
        return False

    def _check_registry(self, db: Db) -> None:
        """pgqueue.workers lists exactly the live worker processes: the dead are
        forgotten (three missed heartbeats), the restarted registered."""
        deadline = time.monotonic() + 15.0
        while True:
            leaves = set(self.leaves())
            registered = {
                row[0] for row in db.rows("SELECT pid FROM pgqueue.workers", deadline=10.0)
            }
            if registered == leaves:
                return
            if time.monotonic() > deadline:
                self.violation(
                    f"pgqueue.workers lists pids {sorted(registered - leaves)} that are not"
                    f" running and misses live workers {sorted(leaves - registered)}"
                )
                return
            time.sleep(0.25)

    def _check_listeners(self, db: Db) -> None:
        """Every live worker process LISTENs again (the faults cut those connections)."""
        deadline = time.monotonic() + 15.0
        while True:
            leaves = set(self.leaves())
            listening = db.rows(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN pgqueue_jobs'"
                " AND application_name = 'pgqueue-worker'"
            )[0][0]
            if listening == len(leaves):
                return
            if time.monotonic() > deadline:
                self.violation(
                    f"{len(leaves)} live worker processes but {listening} LISTEN connections"
                )
                return
            time.sleep(0.25)

    def _teardown(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=30)
        with self.lock:
            daemons = list(self.all_daemons)
            stopped = list(self.stopped_pids)
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for d in daemons:
            # killpg: a supervisor's children live in its process group.
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(d.pid, sig)
        for d in daemons:
            with contextlib.suppress(subprocess.TimeoutExpired):
                d.popen.wait(timeout=10)
        if self.cluster is not None:
            self.cluster.destroy()


# --- the checks -----------------------------------------------------------------------


class Checker:
    """Reads the final state of the database and lists every broken promise:

    - inventory: every enqueued job (by idempotency key) is in exactly one of
      pgqueue.jobs and pgqueue.dead_jobs; none queued or running; every normal job
      succeeded; every poison job dead-lettered with attempts == max_attempts, reason
      lease_expired; attempts never above max_attempts;
    - history (fencing): a succeeded job has one 'succeeded' entry, last, for its final
      attempt, written by a run that really finished (fault_executions); no attempt
      (worker + claim time) ended twice; dead jobs never succeeded;
    - duplicates: extra runs of normal jobs, in total and per job, within the number of
      faults the job was in flight at; no attempt counted against a job beyond the
      faults that hit it while it ran alone;
    - poison: every counted attempt ran, and every run after the first ran alone;
    - stale workers (SIGSTOP, blocked loop): their late results changed nothing;
    - logs: no worker component died, supervisors' children died only of poison or the
      driver's SIGKILL;
    - recovery: every job a fault hit, and the whole queue after the last fault,
      reached a final state within the bound of ``Settings.recovery_bound``.
    """

    def __init__(self, driver: Driver, db: Db) -> None:
        self.d = driver
        self.db = db
        self.s = driver.s
        self.r = driver.report
        self._hits: Counter[int] | None = None

    def rows(self, sql: LiteralString, params: Any = None) -> list[tuple[Any, ...]]:
        return self.db.rows(sql, params)

    def violation(self, message: str) -> None:
        self.d.violation(message)

    def note(self, message: str) -> None:
        self.d.note(message)

    def check(self, recovered: bool) -> None:
        self.check_inventory()
        self.check_history()
        self.check_duplicates()
        self.check_poison()
        self.check_stale()
        self.check_logs()
        if recovered:
            self.check_recovery_time()

    def hits(self) -> Counter[int]:
        """How many faults each job was in flight at, where the fault could cost it a
        run: its worker died or was frozen (every job it ran), or, for a fault that only
        cuts connections (a Postgres restart, terminated backends), its lease was lost
        after all (the reaper's lease_expired entry in its history, within the fault's
        reach). A job merely running while Postgres restarted is not excused a rerun, nor
        a counted attempt. Under --async-commit an immediate restart may undo commits
        (a claim, an outcome) without any lease expiring: those keep every job."""
        if self._hits is not None:
            return self._hits
        losses: dict[int, list[float]] = {}
        for job_id, ended in self.rows(
            "SELECT t.id, extract(epoch FROM (e ->> 'ended_at')::timestamptz)::float8"
            " FROM (SELECT id, history FROM pgqueue.jobs"
            "       UNION ALL SELECT id, history FROM pgqueue.dead_jobs) AS t,"
            " jsonb_array_elements(t.history) AS e"
            " WHERE e ->> 'outcome' = 'lease_expired' AND e ? 'ended_at'"
        ):
            losses.setdefault(job_id, []).append(ended)
        # From the fault to the reaper's requeue: the lease, a reaper pass, and the
        # reapers' and workers' own reconnects (backoff), generously: the entry is what
        # tells, and one from a later fault only makes the bound looser.
        reach = self.s.lease_seconds + self.s.reaper_interval + LEASE_LOSS_SLACK
        counts: Counter[int] = Counter()
        for fault in sorted(self.r.faults, key=lambda f: f.started):
            undoes = fault.kind == RESTART_IMMEDIATE and self.s.async_commit
            if fault.kind not in CONNECTION_FAULTS or undoes:
                counts.update(fault.at_risk)
                continue
            for job_id in fault.at_risk:
                # Each lost lease excuses one fault: the first within whose reach it is.
                times = losses.get(job_id, [])
                for t in times:
                    if fault.started - 1.0 <= t <= fault.ended + reach:
                        times.remove(t)
                        counts[job_id] += 1
                        break
        self._hits = counts
        return counts

    def check_inventory(self) -> None:
        r = self.r
        # What the enqueuer committed (all of it, unless it failed: a violation already).
        sent = self.d.specs[: self.d.sent] + self.d.extra_specs
        expected = {str(spec.idempotency_key) for spec in sent}
        live = self.rows(
            "SELECT idempotency_key, id, state::text, task, attempts, max_attempts, rescued"
            " FROM pgqueue.jobs"
        )
        dead = self.rows(
            "SELECT idempotency_key, id, task, attempts, max_attempts, reason"
            " FROM pgqueue.dead_jobs"
        )
        found = Counter([row[0] for row in live] + [row[0] for row in dead])
        # A batch cut off by the enqueuer's failure may have committed anyway.
        found_unsent = {str(spec.idempotency_key) for spec in self.d.specs[self.d.sent :]}
        expected |= found_unsent & found.keys()
        poison = self.d.poison_keys & expected
        r.enqueued, r.poison = len(expected), len(poison)
        r.normal = r.enqueued - r.poison
        missing = expected - found.keys()
        r.lost = len(missing)
        if missing:
            self.violation(f"{len(missing)} jobs lost (in neither table): {sorted(missing)[:20]}")
        twice = [k for k, n in found.items() if n > 1]
        if twice:
            self.violation(f"{len(twice)} jobs in both tables or twice: {twice[:20]}")
        strange = found.keys() - expected
        if strange:
            self.violation(f"{len(strange)} jobs nobody enqueued: {sorted(map(str, strange))[:20]}")
        states = Counter(row[2] for row in live)
        r.completed = states.get("succeeded", 0)
        r.rescued = sum(1 for row in live if row[6])
        r.dead = len(dead)
        r.dead_poison = sum(1 for row in dead if row[0] in poison)
        unfinished = [(row[1], row[2]) for row in live if row[2] in ("queued", "running")]
        if unfinished:
            self.violation(f"{len(unfinished)} jobs not in a final state: {unfinished[:20]}")
        hits = self.hits()
        for key, job_id, state, _task, attempts, max_attempts, _ in live:
            if key in poison:
                self.violation(f"poison job {job_id} is {state}, not dead-lettered")
            elif state != "succeeded" and state not in ("queued", "running"):
                self.violation(f"normal job {job_id} ended {state}")
            if attempts > max_attempts:
                self.violation(f"job {job_id}: attempts {attempts} > max_attempts {max_attempts}")
        for key, job_id, _task, attempts, max_attempts, reason in dead:
            if key in poison:
                if attempts != max_attempts or reason != "lease_expired":
                    self.violation(
                        f"poison job {job_id} dead with attempts {attempts}/{max_attempts},"
                        f" reason {reason} (expected {max_attempts}/{max_attempts},"
                        " lease_expired)"
                    )
                continue
            # A normal job is dead-lettered legitimately only if crashes hit it while it
            # ran alone max_attempts times: in flight at max_attempts + 1 faults.
            why = (
                f"normal job {job_id} dead-lettered ({reason}, attempts"
                f" {attempts}/{max_attempts}), in flight at {hits[job_id]} faults"
            )
            if hits[job_id] >= max_attempts + 1:
                self.note(why + ": every counted attempt was cut by a fault")
            else:
                self.violation(why + ": a crash was counted against an innocent job")
            if attempts > max_attempts:
                self.violation(f"dead job {job_id}: attempts {attempts} > {max_attempts}")

    def check_history(self) -> None:
        """Fencing, from the attempt history: one outcome per attempt, one success per
        job, recorded by a run that really finished."""
        bad = self.rows(
            """
            SELECT j.id, j.history FROM pgqueue.jobs AS j
            WHERE j.state = 'succeeded' AND (
                (SELECT count(*) FROM jsonb_array_elements(j.history) AS e
                 WHERE e->>'outcome' = 'succeeded') <> 1
                OR j.history->-1->>'outcome' IS DISTINCT FROM 'succeeded'
                OR (j.history->-1->>'attempt')::int IS DISTINCT FROM j.attempts)
            """
        )
        for job_id, history in bad[:20]:
            self.violation(f"job {job_id}: history is not one success at the end: {history}")
        if len(bad) > 20:
            self.violation(f"... and {len(bad) - 20} more jobs with such a history")
        dead_success = self.rows(
            "SELECT d.id FROM pgqueue.dead_jobs AS d WHERE EXISTS (SELECT 1 FROM"
            " jsonb_array_elements(d.history) AS e WHERE e->>'outcome' = 'succeeded')"
        )
        if dead_success:
            self.violation(f"dead jobs with a successful attempt: {dead_success[:20]}")
        # An attempt (one claim: worker + claim time) ends once. A stale worker whose
        # write landed after the reaper ended its attempt would show up here twice.
        doubled = self.rows(
            """
            SELECT id, e->>'worker', e->>'started_at', array_agg(e->>'outcome')
            FROM (SELECT id, history FROM pgqueue.jobs
                  UNION ALL SELECT id, history FROM pgqueue.dead_jobs) AS t,
                 jsonb_array_elements(t.history) AS e
            GROUP BY 1, 2, 3 HAVING count(*) > 1
            """
        )
        for row in doubled[:20]:
            self.violation(f"job {row[0]}: attempt by {row[1]} at {row[2]} ended twice: {row[3]}")
        unbacked = self.rows(
            """
            SELECT j.id, s.e FROM pgqueue.jobs AS j,
                LATERAL (SELECT e FROM jsonb_array_elements(j.history) AS e
                         WHERE e->>'outcome' = 'succeeded' LIMIT 1) AS s
            WHERE j.state = 'succeeded' AND NOT EXISTS (
                SELECT 1 FROM public.fault_executions AS x
                WHERE x.job_id = j.id AND x.attempt = (s.e->>'attempt')::int
                  AND x.worker_id = s.e->>'worker' AND x.ended_at IS NOT NULL)
            """
        )
        for job_id, entry in unbacked[:20]:
            self.violation(
                f"job {job_id} recorded as succeeded by a run that never finished: {entry}"
            )
        self.r.released = self.rows(
            "SELECT count(*) FROM pgqueue.jobs AS j, jsonb_array_elements(j.history) AS e"
            " WHERE e->>'outcome' = 'released'"
        )[0][0]

    def check_duplicates(self) -> None:
        """Extra runs of normal jobs, each explained by a fault the job was in flight at."""
        rows = self.rows(
            "SELECT job_id, count(*), min(task) FROM public.fault_executions GROUP BY job_id"
        )
        self.r.executions = sum(n for _, n, _ in rows)
        hits = self.hits()
        extra = {job_id: n - 1 for job_id, n, task in rows if task != TASK_POISON and n > 1}
        self.r.duplicates = sum(extra.values())
        poison_ids = {job_id for job_id, _, task in rows if task == TASK_POISON}
        self.r.duplicate_bound = sum(n for job_id, n in hits.items() if job_id not in poison_ids)
        if self.r.duplicates > self.r.duplicate_bound:
            self.violation(
                f"{self.r.duplicates} duplicate executions, more than the"
                f" {self.r.duplicate_bound} jobs in flight where a worker died or froze, or"
                " a lease was lost"
            )
        starts: dict[int, list[float]] = {}
        for job_id, start in self.rows(
            "SELECT job_id, extract(epoch FROM started_at)::float8 FROM public.fault_executions"
            " WHERE job_id = ANY(%s) ORDER BY started_at",
            (sorted(extra),),
        ):
            starts.setdefault(job_id, []).append(start)
        # Each extra run, put down to the first fault that hit the run before it (a job
        # held by a dead worker is also "in flight" at the next cluster-wide fault).
        hit_at: dict[int, list[tuple[float, str]]] = {}
        for fault in self.r.faults:
            for job_id in fault.at_risk & extra.keys():
                hit_at.setdefault(job_id, []).append((fault.started, fault.kind))
        for job_id, times in starts.items():
            for previous, start in itertools.pairwise(times):
                hits_before = sorted(h for h in hit_at.get(job_id, []) if h[0] <= start)
                # 2 s: a run is recorded a moment after its claim, which a fault may follow.
                cause = [h for h in hits_before if h[0] >= previous - 2.0] or hits_before[-1:]
                self.r.rerun_by_kind[cause[0][1] if cause else "unexplained"] += 1
        unexplained = {j: n for j, n in extra.items() if n > hits[j]}
        if unexplained:
            detail = [
                (j, unexplained[j], hits[j], self._executions(j)) for j in sorted(unexplained)[:5]
            ]
            self.violation(
                f"{len(unexplained)} jobs ran more often than the faults they were in flight"
                f" at explain (job, extra runs, faults, runs): {detail}"
            )
        # A crash counted against a job that was not running alone: attempts beyond the
        # first need as many faults while rescued (the first fault rescues it).
        counted = self.rows(
            "SELECT id, attempts, history FROM pgqueue.jobs"
            " WHERE state = 'succeeded' AND attempts > 1 AND task <> %s",
            (TASK_POISON,),
        )
        for job_id, attempts, history in counted:
            if attempts - 1 > max(0, hits[job_id] - 1):
                self.violation(
                    f"job {job_id} succeeded at attempt {attempts} but was in flight at only"
                    f" {hits[job_id]} faults: an attempt was counted against it; {history}"
                )

    def _executions(self, job_id: int) -> list[tuple[Any, ...]]:
        return self.rows(
            "SELECT attempt, pid, to_char(started_at, 'HH24:MI:SS.MS'),"
            " to_char(ended_at, 'HH24:MI:SS.MS') FROM public.fault_executions"
            " WHERE job_id = %s ORDER BY started_at",
            (job_id,),
        )

    def check_poison(self) -> None:
        """Each poison job ran every counted attempt, and alone after its first run."""
        hits = self.hits()
        rows = self.rows(
            "SELECT d.id, d.max_attempts, (SELECT count(*) FROM public.fault_executions AS x"
            " WHERE x.job_id = d.id) FROM pgqueue.dead_jobs AS d WHERE d.task = %s",
            (TASK_POISON,),
        )
        for job_id, max_attempts, runs in rows:
            if not max_attempts <= runs <= max_attempts + 1 + hits[job_id]:
                self.violation(
                    f"poison job {job_id} ran {runs} times; expected {max_attempts} counted"
                    f" runs plus at most {1 + hits[job_id]} uncounted"
                )
        crowded = self.rows(
            """
            WITH p AS (
                SELECT x.*, row_number() OVER (PARTITION BY x.job_id ORDER BY x.started_at) AS n
                FROM public.fault_executions AS x WHERE x.task = %s)
            SELECT p.job_id, p.pid, array_agg(o.job_id)
            FROM p JOIN public.fault_executions AS o
              ON o.pid = p.pid AND o.job_id <> p.job_id AND o.started_at <= p.started_at
             AND (o.ended_at IS NULL OR o.ended_at > p.started_at)
            WHERE p.n > 1
            GROUP BY 1, 2
            """,
            (TASK_POISON,),
        )
        for job_id, pid, others in crowded:
            self.violation(
                f"rescued poison job {job_id} ran in pid {pid} beside jobs {others}:"
                " a rescued job must run alone"
            )

    def check_stale(self) -> None:
        """Jobs taken from a stale worker (SIGSTOPped, or its event loop blocked): its
        late results changed nothing (its attempt ended once, as lease_expired; the
        success is the newer attempt's). Counts the late results that were fenced off:
        runs by the stale worker that ended after the job's newer attempt succeeded."""
        fenced = 0
        for fault in self.r.faults:
            if fault.kind not in (SIGSTOP_WORKER, BLOCK_EVENT_LOOP) or fault.worker_id is None:
                continue
            stale = fault.worker_id
            rows = self.rows(
                """
                SELECT j.id, j.state::text, j.history,
                       (SELECT max(x.ended_at) FROM public.fault_executions AS x
                        WHERE x.job_id = j.id AND x.worker_id = %s) AS stale_end,
                       j.finished_at
                FROM pgqueue.jobs AS j WHERE j.id = ANY(%s)
                """,
                (stale, sorted(fault.at_risk)),
            )
            for job_id, state, history, stale_end, finished_at in rows:
                mine = [e for e in history if e.get("worker") == stale]
                if not any(e.get("outcome") == "lease_expired" for e in mine):
                    continue  # it finished before the stop took effect
                if any(e.get("outcome") == "succeeded" for e in mine):
                    self.violation(
                        f"job {job_id}: the stale worker {stale} ({fault.kind}) recorded success"
                        f" after its lease was taken: {history}"
                    )
                elif state == "succeeded" and stale_end is not None and stale_end > finished_at:
                    fenced += 1
        self.r.stale_fenced = fenced

    def check_logs(self) -> None:
        """What the daemons said: no component died; supervisors' children died only of
        poison or of the driver's SIGKILL."""
        lease_lost = 0
        lost_jobs: list[tuple[int, int, str]] = []
        for d in self.d.all_daemons:
            try:
                text = d.log_path.read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                if not line.startswith("{") or not any(
                    name in line for name in ("lease.lost", "component_died", "child_died")
                ):
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                name = event.get("event")
                if name == "lease.lost":
                    lease_lost += 1
                    lost_jobs.append((int(event["job_id"]), int(event["attempt"]), d.name))
                elif name == "worker.component_died":
                    self.violation(f"{d.name}: {line}")
                elif name == "supervisor.child_died":
                    code = event.get("exit_code")
                    if code not in (POISON_EXIT_CODE, -signal.SIGKILL):
                        self.violation(f"{d.name}: a child died with status {code}: {line}")
        self.r.lease_lost_logged = lease_lost
        # A lease.lost about an attempt that no one took away (no other attempt with the
        # same number ended in lease_expired) misinforms the operator: the job's outcome
        # was written after all (e.g. a batch whose COMMIT reply a fault cut off, then
        # written again and matching nothing).
        never_lost = self.rows(
            """
            SELECT l.job_id, l.attempt, l.daemon, j.history
            FROM unnest(%s::bigint[], %s::int[], %s::text[]) AS l(job_id, attempt, daemon)
            JOIN pgqueue.jobs AS j ON j.id = l.job_id
            WHERE NOT EXISTS (
                SELECT 1 FROM jsonb_array_elements(j.history) AS e
                WHERE (e->>'attempt')::int = l.attempt AND e->>'outcome' = 'lease_expired')
            """,
            (
                [j for j, _, _ in lost_jobs],
                [a for _, a, _ in lost_jobs],
                [n for _, _, n in lost_jobs],
            ),
        )
        if never_lost:
            self.r.false_lease_lost = len(never_lost)
            self.note(
                f"{len(never_lost)} lease.lost warnings about attempts whose lease was never"
                f" taken (job, attempt, daemon, history): {never_lost[:3]}"
            )

    def check_recovery_time(self) -> None:
        """Recovery: each job a fault hit reached its final state within the bound after
        the last fault that hit it; and everything was final within the bound after the
        last fault of the run."""
        r = self.r
        r.recovery_bound, r.recovery_bound_why = self.s.recovery_bound()
        last_hit: dict[int, float] = {}
        for f in r.faults:
            # A stopped worker's leases run out from the stop; a restart's from its end.
            at = f.started if f.kind in (SIGSTOP_WORKER, BLOCK_EVENT_LOOP) else f.ended
            for job_id in f.at_risk:
                last_hit[job_id] = max(last_hit.get(job_id, at), at)
        finals = self.rows(
            "SELECT id, extract(epoch FROM finished_at)::float8 FROM pgqueue.jobs"
            " WHERE id = ANY(%(ids)s) UNION ALL"
            " SELECT id, extract(epoch FROM died_at)::float8 FROM pgqueue.dead_jobs"
            " WHERE id = ANY(%(ids)s)",
            {"ids": sorted(last_hit)},
        )
        worst: tuple[float, int] | None = None
        for job_id, final in finals:
            if final is not None:
                took = max(0.0, final - last_hit[job_id])
                worst = max(worst or (took, job_id), (took, job_id))
        if worst is not None:
            r.recovery_job_seconds, r.recovery_job = worst
        injected = [
            f.started if f.kind in (SIGSTOP_WORKER, BLOCK_EVENT_LOOP) else f.ended for f in r.faults
        ]
        crash = self.rows(
            "SELECT extract(epoch FROM max(started_at))::float8 FROM public.fault_executions"
            " WHERE task = %s",
            (TASK_POISON,),
        )[0][0]
        last_fault = max([*injected, *([crash] if crash is not None else [])], default=None)
        last_final, last_enqueued = self.rows(
            "SELECT extract(epoch FROM greatest("
            " (SELECT max(finished_at) FROM pgqueue.jobs),"
            " (SELECT max(died_at) FROM pgqueue.dead_jobs)))::float8,"
            " extract(epoch FROM greatest((SELECT max(created_at) FROM pgqueue.jobs),"
            " (SELECT max(created_at) FROM pgqueue.dead_jobs)))::float8"
        )[0]
        # From the last fault, or the last enqueue if that came later (jobs enqueued
        # after the faults simply run; they are not a recovery).
        since = max(x for x in (last_fault, last_enqueued, 0.0) if x is not None)
        if last_final is not None and since:
            r.recovery_seconds = max(0.0, last_final - since)
        for what, took in (
            ("full recovery after the last fault", r.recovery_seconds),
            (f"recovery of job {r.recovery_job} after the last fault that hit it",
             r.recovery_job_seconds),
        ):  # fmt: skip
            if took is not None and took > r.recovery_bound:
                self.violation(
                    f"{what} took {took:.1f}s, over the bound {r.recovery_bound:.1f}s"
                    f" ({r.recovery_bound_why})"
                )


# --- command line ---------------------------------------------------------------------


def run(settings: Settings) -> Report:
    """Run one fault-injection session; never raises for a broken promise (see
    ``Report.violations``)."""
    return Driver(settings).run()


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(
        prog="python -m tests.faults.driver",
        description="Run pgqueue daemons on a throwaway Postgres, inject faults, check"
        " that no job is lost, duplicated beyond what the faults explain, or mis-finished.",
    )
    d = Settings()
    p.add_argument("--jobs", type=int, default=d.jobs, help="jobs to enqueue")
    p.add_argument("--duration", type=float, default=d.duration, help="seconds of faults")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the fault schedule")
    p.add_argument("--repeat", type=int, default=d.repeat, help="rounds of every fault kind")
    p.add_argument(
        "--faults",
        default="",
        metavar="KIND,...",
        help=f"only these fault kinds (default: all): {', '.join(FAULT_KINDS)}",
    )
    p.add_argument("--poison", type=int, default=None, help="poison jobs (default jobs/400)")
    p.add_argument("--workers", type=int, default=d.workers, help="single-process workers")
    p.add_argument("--supervisors", type=int, default=d.supervisors, help="--processes workers")
    p.add_argument("--processes", type=int, default=d.processes, help="processes per supervisor")
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--reapers", type=int, default=d.reapers)
    p.add_argument(
        "--embedded-reapers",
        action="store_true",
        help="workers also run the reaper (--reaper); with --reapers 0, no pgqueue-reaper",
    )
    p.add_argument("--lease-seconds", type=float, default=d.lease_seconds)
    p.add_argument("--reaper-interval", type=float, default=d.reaper_interval)
    p.add_argument("--poll-interval", type=float, default=d.poll_interval)
    p.add_argument("--recovery-timeout", type=float, default=d.recovery_timeout)
    p.add_argument(
        "--async-commit",
        action="store_true",
        help="run the workers with --async-commit (a Postgres crash may undo their newest"
        " claims and outcomes)",
    )
    p.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning"])
    p.add_argument("--log-dir", type=Path, default=None, help="keep the daemons' logs here")
    p.add_argument("--keep-logs", action="store_true", help="keep logs even when all is well")
    p.add_argument("--quiet", action="store_true", help="print the summary only")
    a = p.parse_args(argv)
    unknown = {k for k in a.faults.split(",") if k} - set(FAULT_KINDS)
    if unknown:
        p.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    return Settings(
        jobs=a.jobs,
        duration=a.duration,
        seed=a.seed,
        repeat=a.repeat,
        kinds=tuple(k for k in a.faults.split(",") if k),
        poison=a.poison,
        workers=a.workers,
        supervisors=a.supervisors,
        processes=a.processes,
        concurrency=a.concurrency,
        reapers=a.reapers,
        lease_seconds=a.lease_seconds,
        reaper_interval=a.reaper_interval,
        poll_interval=a.poll_interval,
        recovery_timeout=a.recovery_timeout,
        log_level=a.log_level,
        async_commit=a.async_commit,
        embedded_reapers=a.embedded_reapers,
        # The embedded reaper has no flag for it: pgqueue-reaper's default.
        backoff_base=1.0 if a.embedded_reapers else Settings.backoff_base,
        log_dir=a.log_dir,
        keep_logs=a.keep_logs,
        verbose=not a.quiet,
    )


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    report = run(settings)
    print(report.table(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
