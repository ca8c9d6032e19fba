"""Operating pgqueue: Prometheus metrics and /healthz of the worker, the supervisor and the
reaper; the admin CLI (stats, jobs list, status, cancel, dead ..., queue pause/resume,
workers) against a real database; execution history; structured logs.

Daemons and CLI commands run as real subprocesses. Nothing sleeps and hopes: every wait
polls (the database, a process, or an HTTP endpoint) through ``wait_until``. The one
exception is the paused-queue test, which must show that something does *not* happen
and so watches a job stay queued for a short, bounded time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
import structlog
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from pgqueue import (
    JobSpec,
    PermanentError,
    Reaper,
    ReaperConfig,
    Registry,
    Snooze,
    Worker,
    WorkerConfig,
    current_job,
    enqueue,
    enqueue_many,
    migrate,
    store,
)
from pgqueue.errors import SCHEMA_HINT
from pgqueue.log import _LineWriter, schema_missing
from pgqueue.metrics import HEALTH_REUSE_SECONDS
from pgqueue.migrate import load_migrations
from pgqueue.models import Job
from tests.conftest import (
    BIN,
    EXECUTIONS_DDL,
    ROOT,
    Daemons,
    LoginThenSilence,
    dead_row,
    free_port,
    free_ports,
    job_row,
    job_state,
    notified_before_sentinel,
    scalar,
    wait_until,
)
from tests.pgcluster import PgCluster

APP = "tests.apps.sample:registry"
LOCAL = ("--metrics-host", "127.0.0.1")
FAST_REAPER = ("--interval", "0.2", "--backoff-base-seconds", "0.1")
UNREACHABLE_DSN = "postgresql://postgres@127.0.0.1:1/x"


# --- helpers: processes -----------------------------------------------------------------------


def cli(dsn: str | None, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``pgqueue ARGS`` with PGQUEUE_DSN=dsn (unset when None)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGQUEUE_")}
    if dsn is not None:
        env["PGQUEUE_DSN"] = dsn
    return subprocess.run(
        [str(BIN / "pgqueue"), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert result.stderr == "", result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The failed command's stderr, which must be exactly one line and no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pgqueue: "), lines[0]
    return lines[0]


def spawn_split(
    daemons: Daemons, tmp: Path, command: str, *args: str
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """Start a daemon with stdout and stderr in separate files (killed at teardown)."""
    name = f"{command}-{len(daemons.procs)}"
    out, err = tmp / f"{name}.out", tmp / f"{name}.err"
    env = {**os.environ, "PGQUEUE_DSN": daemons.dsn, "PYTHONPATH": str(ROOT)}
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [str(BIN / command), *args],
            env=env,
            stdout=stdout,
            stderr=stderr,
            cwd=ROOT,
            start_new_session=True,
        )
    proc.log_path = str(out)  # type: ignore[attr-defined]
    daemons.procs.append(proc)
    return proc, out, err


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def events(daemons: Daemons, proc: subprocess.Popen[bytes], event: str) -> list[dict[str, Any]]:
    found = []
    for line in Daemons.output(proc).splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == event:
                found.append(entry)
    return found


def terminate(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=30)


# --- helpers: HTTP and metrics -----------------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def http_status(port: int, path: str) -> int | None:
    """The status code, or None while nothing listens on the port."""
    try:
        return http_get(port, path)[0]
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def http_body(port: int, path: str) -> str:
    """The body, or "" while nothing listens on the port."""
    try:
        return http_get(port, path)[1]
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return ""


def wait_listening(port: int) -> None:
    wait_until(lambda: http_status(port, "/metrics") == 200)


def scrape(port: int) -> list[Sample]:
    status, body = http_get(port, "/metrics")
    assert status == 200, body
    return [s for family in text_string_to_metric_families(body) for s in family.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def named(samples: list[Sample], name: str) -> list[Sample]:
    return [s for s in samples if s.name == name]


def test_lost_database_connections_are_counted_by_loop(dsn, daemons):
    # An operator sees connection flaps on the dashboard, not only in the logs.
    port = free_port()
    worker = daemons.worker("--metrics-port", str(port), "--poll-interval", "0.2", *LOCAL)
    wait_listening(port)
    # Each loop's series is there at 0 from the start, so that rate() and the alert see
    # the first loss too (a series born at 1 hides it).
    loops = {"fetcher", "heartbeat", "completer", "listener"}
    wait_until(lambda: len(named(scrape(port), "pgqueue_db_disconnects_total")) == len(loops))
    before = named(scrape(port), "pgqueue_db_disconnects_total")
    assert {s.labels["component"]: s.value for s in before} == dict.fromkeys(loops, 0.0)
    reaper_port = free_port()
    daemons.reaper("--interval", "0.5", "--metrics-port", str(reaper_port), *LOCAL)
    wait_until(lambda: http_status(reaper_port, "/metrics") == 200)
    wait_until(lambda: named(scrape(reaper_port), "pgqueue_db_disconnects_total"))
    assert [
        (s.labels, s.value) for s in named(scrape(reaper_port), "pgqueue_db_disconnects_total")
    ] == [({"component": "reaper"}, 0.0)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        wait_until(
            lambda: scalar(
                conn,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND query = 'LISTEN pgqueue_jobs'",
            )
        )
        conn.execute(
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND application_name = 'pgqueue-worker'"
        )
    wait_until(lambda: total(scrape(port), "pgqueue_db_disconnects_total", component="listener"))
    assert {s.labels["component"] for s in named(scrape(port), "pgqueue_db_disconnects_total")} == (
        loops
    )
    assert worker.poll() is None


# --- helpers: database -------------------------------------------------------------------------


def executions(conn: psycopg.Connection[Any], job_id: int, note_prefix: str = "") -> int:
    return int(
        scalar(
            conn,
            "SELECT count(*) FROM public.executions WHERE job_id = %s AND note LIKE %s",
            (job_id, note_prefix + "%"),
        )
    )


def count(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> int:
    return int(scalar(conn, sql, params))


def insert_job(
    conn: psycopg.Connection[Any],
    *,
    queue: str = "default",
    task: str = "record",
    run_in: float = 0.0,
    max_attempts: int = 20,
) -> int:
    """A queued job whose run_at is ``run_in`` seconds from now (negative: in the past)."""
    return int(
        scalar(
            conn,
            "INSERT INTO pgqueue.jobs (queue, task, run_at, max_attempts)"
            " VALUES (%s, %s, now() + make_interval(secs => %s), %s) RETURNING id",
            (queue, task, run_in, max_attempts),
        )
    )


def make_running(
    conn: psycopg.Connection[Any], job_id: int, *, lease_in: float, worker: str = "gone:1:abc"
) -> uuid.UUID:
    """Claim ``job_id`` by hand for a worker that holds it with a lease ending in
    ``lease_in`` seconds (negative: already expired); returns the lease token."""
    token = uuid.uuid4()
    conn.execute(
        "UPDATE pgqueue.jobs SET state = 'running', attempts = attempts + 1,"
        " lease_token = %s, leased_by = %s, attempted_at = now(),"
        " lease_expires_at = now() + make_interval(secs => %s) WHERE id = %s",
        (token, worker, lease_in, job_id),
    )
    return token


def held_ids(worker: Any) -> set[int]:
    """Ids of the jobs a worker holds."""
    return {job.id for job in worker._held}


def running_task(worker: Any, job_id: int) -> Any:
    """The task running ``job_id`` in a worker."""
    (task,) = (t for job, t in worker._running.items() if job.id == job_id)
    return task


def insert_dead(
    conn: psycopg.Connection[Any],
    *,
    queue: str = "default",
    task: str = "fail",
    died_ago: float = 0.0,
    message: str = "RuntimeError: boom",
) -> int:
    """A dead-letter row as a worker leaves it after three failed attempts."""
    errors = [
        {
            "attempt": n,
            "at": "2024-01-01T00:00:00+00:00",
            "worker": "host:1:abc",
            "kind": "error",
            "error": message,
            "traceback": "Traceback (most recent call last):\n"
            f'  File "app.py", line {n}, in {task}\n{message}\n',
        }
        for n in (1, 2, 3)
    ]
    history = [
        {"attempt": n, "worker": "host:1:abc", "outcome": outcome, "error": message}
        for n, outcome in ((1, "retried"), (2, "retried"), (3, "dead"))
    ]
    return int(
        scalar(
            conn,
            "INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts,"
            " max_attempts, run_at, created_at, attempted_at, errors, history, reason, died_at)"
            " VALUES (nextval(pg_get_serial_sequence('pgqueue.jobs', 'id')), %s, %s, %s, 0, 3,"
            " 3, now(), now() - interval '1 day', now(), %s, %s, 'exhausted',"
            " now() - make_interval(secs => %s)) RETURNING id",
            (queue, task, Jsonb({"n": 1}), Jsonb(errors), Jsonb(history), died_ago),
        )
    )


def listening(conn: psycopg.Connection[Any]) -> int:
    """How many LISTEN connections (one per worker process) this database has."""
    return count(
        conn,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND query = 'LISTEN pgqueue_jobs'",
    )


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of a table printed by the CLI (header in capitals, columns aligned)."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = lines[0]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    names = header.split()
    bounds = [*starts[1:], None]
    return [
        {
            name.lower(): line[start:end].strip()
            for name, start, end in zip(names, starts, bounds, strict=True)
        }
        for line in lines[1:]
    ]


# --- 1. worker metrics ---------------------------------------------------------------------


def test_worker_metrics_count_every_claimed_attempt_and_outcome(conn, daemons):
    port = free_port()
    worker = daemons.worker("--concurrency", "4", "--metrics-port", str(port), *LOCAL)
    wait_listening(port)
    before = scrape(port)
    assert total(before, "pgqueue_jobs_claimed_total") == 0

    records = enqueue_many(conn, [JobSpec("record", {"note": f"m{i}"}) for i in range(5)])
    failing = enqueue_many(conn, [JobSpec("fail", max_attempts=3) for _ in range(2)])
    snoozing = enqueue(conn, "snooze_once")
    permanent = enqueue(conn, "permanent")

    ids = [*records, snoozing]
    dead_ids = [*failing, permanent]
    wait_until(
        lambda: count(
            conn, "SELECT count(*) FROM pgqueue.jobs WHERE id = ANY(%s) AND state = 'succeeded'",
            (ids,),
        ) == len(ids)
        and count(conn, "SELECT count(*) FROM pgqueue.dead_jobs WHERE id = ANY(%s)", (dead_ids,))
        == len(dead_ids),
        timeout=30,
    )  # fmt: skip
    # Outcome counters move once the outcome is written: wait for the last ones.
    # 5 record + 3x2 fail + 2 snooze_once (snoozed, then succeeded) + 1 permanent = 14.
    samples = wait_until(
        lambda: (s := scrape(port)) and total(s, "pgqueue_jobs_completed_total") == 14 and s
    )

    assert total(samples, "pgqueue_jobs_claimed_total") == 14
    assert total(samples, "pgqueue_jobs_claimed_total", task="record") == 5
    assert total(samples, "pgqueue_jobs_claimed_total", task="fail") == 6
    assert total(samples, "pgqueue_jobs_claimed_total", task="snooze_once") == 2
    assert total(samples, "pgqueue_jobs_claimed_total", task="permanent") == 1
    completed = "pgqueue_jobs_completed_total"
    assert total(samples, completed, outcome="succeeded") == 6  # 5 record + snooze_once
    assert total(samples, completed, outcome="retried") == 4  # attempts 1, 2 of each fail
    assert total(samples, completed, outcome="dead") == 3  # 2 exhausted + 1 permanent
    assert total(samples, completed, outcome="snoozed") == 1
    assert total(samples, completed, outcome="dead", task="permanent") == 1
    assert total(samples, completed, outcome="failed") == 0
    assert total(samples, completed, outcome="lease_lost") == 0
    assert total(samples, "pgqueue_job_duration_seconds_count") == 14
    assert total(samples, "pgqueue_job_duration_seconds_count", task="fail") == 6
    assert named(samples, "pgqueue_jobs_running")
    assert total(samples, "pgqueue_jobs_running") == 0
    info = named(samples, "pgqueue_worker_info")
    assert len(info) == 1 and info[0].value == 1
    assert info[0].labels["version"] and "default" in info[0].labels["queues"].split(",")
    assert all("job_id" not in s.labels for s in samples)
    # (component: pgqueue_db_disconnects_total's loop, at 0 from the start.)
    assert all(
        set(s.labels) <= {"queue", "task", "outcome", "le", "version", "queues", "component"}
        for s in samples if s.name.startswith("pgqueue_")
    )  # fmt: skip
    assert worker.poll() is None


def test_worker_serves_the_database_wide_gauges_unless_told_not_to(conn, daemons):
    # Jobs of a queue no worker here serves: only the database knows them.
    insert_job(conn, queue="elsewhere", run_in=-60)
    insert_job(conn, queue="elsewhere", run_in=3600)
    insert_dead(conn, queue="elsewhere")
    port, quiet_port = free_ports(2)
    worker = daemons.worker("--metrics-port", str(port), *LOCAL)
    quiet = daemons.worker("--metrics-port", str(quiet_port), "--no-queue-stats", *LOCAL)
    wait_listening(port)
    wait_listening(quiet_port)

    samples = scrape(port)
    depth = "pgqueue_queue_depth"
    assert total(samples, depth, queue="elsewhere", state="ready") == 1
    assert total(samples, depth, queue="elsewhere", state="scheduled") == 1
    assert total(samples, "pgqueue_queue_oldest_ready_age_seconds", queue="elsewhere") >= 59
    assert total(samples, "pgqueue_dead_jobs", queue="elsewhere") == 1
    assert total(samples, "pgqueue_queue_stats_up") == 1
    assert named(samples, "pgqueue_workers")
    # No reaper runs here: no lease-expiry series, not even at 0, and no reaper_info
    # (what PgqueueReaperMissing counts reapers by).
    assert not named(samples, "pgqueue_leases_expired_total")
    assert not named(samples, "pgqueue_reaper_info")
    # The worker's own metrics are there beside them.
    assert named(samples, "pgqueue_worker_info")

    left_out = scrape(quiet_port)
    assert named(left_out, "pgqueue_worker_info")
    assert not [s for s in left_out if s.name.startswith(("pgqueue_queue_", "pgqueue_dead_"))]
    assert not named(left_out, "pgqueue_workers")
    assert worker.poll() is None and quiet.poll() is None


def test_supervisor_serves_the_database_wide_gauges_once_unless_told_not_to(conn, daemons):
    insert_job(conn, queue="elsewhere", run_in=-60)
    port, quiet_port = free_ports(2)
    supervisor = daemons.worker("--processes", "2", "--metrics-port", str(port), *LOCAL)
    quiet = daemons.worker(
        "--processes", "2", "--metrics-port", str(quiet_port), "--no-queue-stats", *LOCAL
    )
    wait_until(lambda: listening(conn) == 4)
    samples = wait_until(lambda: (s := scrape(port)) and total(s, "pgqueue_worker_info") == 2 and s)
    # One series, the supervisor's own query (the children do not serve these gauges).
    assert [s.value for s in samples if s.name == "pgqueue_queue_depth"
            and s.labels == {"queue": "elsewhere", "state": "ready"}] == [1.0]  # fmt: skip
    assert total(samples, "pgqueue_queue_stats_up") == 1
    assert not named(samples, "pgqueue_leases_expired_total")
    assert not named(samples, "pgqueue_reaper_info")

    left_out = wait_until(
        lambda: (s := scrape(quiet_port)) and total(s, "pgqueue_worker_info") == 2 and s
    )
    assert not [s for s in left_out if s.name.startswith(("pgqueue_queue_", "pgqueue_dead_"))]
    assert supervisor.poll() is None and quiet.poll() is None


# --- 2. reaper metrics -----------------------------------------------------------------------


@pytest.mark.parametrize("daemon", ["reaper", "worker --reaper"])
def test_first_scrape_has_every_queues_lease_expiry_series_at_zero(conn, daemons, daemon):
    # Collected in registration order, the counter went out before the gauges' query
    # made its zero series: the first scrape had none (an expiry before the second
    # scrape then came as a series born at 1, which increase() does not count).
    insert_job(conn, queue="early", run_in=3600)
    port = free_port()
    if daemon == "reaper":
        proc = daemons.reaper("--interval", "0.5", "--metrics-port", str(port), *LOCAL)
    else:
        proc = daemons.worker("--reaper", "--metrics-port", str(port), *LOCAL)
    # /healthz does not collect the metrics: the scrape below is the first.
    wait_until(lambda: http_status(port, "/healthz") == 200, timeout=30)
    samples = scrape(port)
    assert total(samples, "pgqueue_queue_depth", queue="early", state="scheduled") == 1
    zero = [s for s in named(samples, "pgqueue_leases_expired_total")
            if s.labels == {"queue": "early"}]  # fmt: skip
    assert [s.value for s in zero] == [0.0], daemons.output(proc)


def test_reaper_metrics_report_database_wide_queue_gauges(conn, dsn, daemons):
    insert_job(conn, queue="a", run_in=-60)  # ready, waiting for a minute
    insert_job(conn, queue="a", run_in=-5)  # ready
    insert_job(conn, queue="a", run_in=3600)  # scheduled
    make_running(conn, insert_job(conn, queue="b"), lease_in=3600)  # running, lease fine
    expired = insert_job(conn, queue="c", max_attempts=5)
    make_running(conn, expired, lease_in=-10)  # its worker vanished
    insert_dead(conn, queue="a")
    insert_dead(conn, queue="a")
    conn.execute(
        "INSERT INTO pgqueue.workers (id, host, pid, queues, concurrency, heartbeat_seconds,"
        " version) VALUES ('h:1:x', 'h', 1, '{a}', 1, 3600, '0')"
    )
    ok(cli(dsn, "queue", "pause", "b"))

    port = free_port()
    # A long backoff keeps the requeued job scheduled (not ready) while we look.
    reaper = daemons.reaper(
        "--interval", "0.2", "--backoff-base-seconds", "600", "--metrics-port", str(port), *LOCAL
    )
    wait_until(lambda: job_state(conn, expired) == "queued")
    # The lease counter is the reaper's own; it moves right after the requeue commits.
    samples = wait_until(
        lambda: (
            http_status(port, "/metrics") == 200
            and (s := scrape(port))
            and total(s, "pgqueue_leases_expired_total", queue="c") == 1
            and s
        )
    )

    # The database-wide gauges are cached for 10 s from the reaper's start-up (see the
    # report): queue c shows its job running (before the reaper's first pass) or
    # scheduled (after), never both and never ready.
    depth = "pgqueue_queue_depth"
    assert total(samples, depth, queue="a", state="ready") == 2
    assert total(samples, depth, queue="a", state="scheduled") == 1
    assert total(samples, depth, queue="a", state="running") == 0
    assert total(samples, depth, queue="b", state="running") == 1
    assert total(samples, depth, queue="b", state="ready") == 0
    c_depth = sum(
        total(samples, depth, queue="c", state=s) for s in ("ready", "scheduled", "running")
    )
    assert c_depth == 1
    oldest = total(samples, "pgqueue_queue_oldest_ready_age_seconds", queue="a")
    assert 59 <= oldest < 3600
    assert total(samples, "pgqueue_queue_oldest_ready_age_seconds", queue="b") == 0
    assert total(samples, "pgqueue_dead_jobs", queue="a") == 2
    assert total(samples, "pgqueue_dead_jobs", queue="b") == 0
    assert total(samples, "pgqueue_queue_paused", queue="b") == 1
    assert total(samples, "pgqueue_queue_paused", queue="a") == 0
    assert named(samples, "pgqueue_workers") and total(samples, "pgqueue_workers") == 1
    [info] = named(samples, "pgqueue_reaper_info")
    assert info.value == 1 and info.labels["version"]
    assert all("job_id" not in s.labels for s in samples)
    assert reaper.poll() is None


# --- 3. /healthz -------------------------------------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    c = PgCluster()
    try:
        c.start()
        yield c
    finally:
        c.destroy()


def test_healthz_follows_the_database_for_worker_and_reaper(cluster, tmp_path):
    migrate(cluster.dsn)
    with psycopg.connect(cluster.dsn, autocommit=True) as c:
        c.execute(EXECUTIONS_DDL)  # type: ignore[arg-type]
    daemons = Daemons(cluster.dsn, tmp_path)
    try:
        worker_port, reaper_port = free_ports(2)
        worker = daemons.worker("--metrics-port", str(worker_port), *LOCAL)
        reaper = daemons.reaper("--interval", "0.5", "--metrics-port", str(reaper_port), *LOCAL)
        ports = (worker_port, reaper_port)
        for port in ports:
            wait_until(lambda p=port: http_status(p, "/healthz") == 200)
            assert http_get(port, "/healthz")[1].strip() == "ok"
            assert http_status(port, "/nope") == 404

        cluster.stop()
        for port in ports:
            wait_until(lambda p=port: http_status(p, "/healthz") == 503)
            assert "database unreachable" in http_get(port, "/healthz")[1]
            assert http_status(port, "/metrics") == 200  # metrics still served

        cluster.start()
        for port in ports:
            wait_until(lambda p=port: http_status(p, "/healthz") == 200, timeout=30)
        assert worker.poll() is None and reaper.poll() is None
    finally:
        daemons.stop_all()


def test_a_handlers_own_log_events_carry_the_job(conn, daemons):
    # They had no job_id, task, queue or attempt: nothing tied them to a job.
    worker = daemons.worker()
    job_id = enqueue(conn, "log_from_handler", {"note": "n1"})
    wait_until(lambda: job_state(conn, job_id) == "succeeded")
    for event in ("app.working", "app.working_in_thread"):
        (entry,) = events(daemons, worker, event)
        assert (entry["job_id"], entry["task"], entry["queue"], entry["attempt"]) == (
            job_id, "log_from_handler", "default", 1
        ), entry  # fmt: skip
        assert entry["note"] == "n1"
    # The worker's own events outside handlers carry none of it.
    (started,) = events(daemons, worker, "worker.started")
    assert "job_id" not in started


def test_standard_library_logging_from_a_handler_comes_out_as_events_of_the_job(conn, daemons):
    # With the root logger left unconfigured, an app's logging.info() went nowhere (and a
    # warning came out bare on stderr, with no job).
    worker = daemons.worker()
    job_id = enqueue(conn, "stdlib_log_from_handler", {"note": "n2"})
    wait_until(lambda: job_state(conn, job_id) == "succeeded")

    (entry,) = events(daemons, worker, "stdlib working on n2")
    assert (entry["job_id"], entry["task"], entry["attempt"]) == (
        job_id, "stdlib_log_from_handler", 1,
    )  # fmt: skip
    assert (entry["logger"], entry["level"]) == ("app.tasks", "info")


def test_an_app_that_configures_logging_keeps_its_own(conn, daemons):
    worker = daemons.worker(app="tests.apps.own_logging:registry")
    job_id = enqueue(conn, "stdlib_log_from_handler", {"note": "n3"})
    wait_until(lambda: job_state(conn, job_id) == "succeeded")

    output = daemons.output(worker)
    assert "OWN app.tasks stdlib working on n3" in output, output
    assert not events(daemons, worker, "stdlib working on n3")


def test_healthz_answers_within_seconds_when_the_database_takes_connections_but_not_queries(
    conn, daemons
):
    # The database check had no limit once connected: behind a lock on what it reads (or
    # a PgBouncer whose server is gone) every probe hung, holding its thread and a
    # connection, one more per probe, for as long as that lasted.
    port = free_port()
    daemons.worker("--metrics-port", str(port), "--poll-interval", "0.2")
    wait_until(lambda: http_status(port, "/healthz") == 200)
    with psycopg.connect(conn.info.dsn, autocommit=True) as blocker:
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE pgqueue.schema_migrations IN ACCESS EXCLUSIVE MODE")
        time.sleep(HEALTH_REUSE_SECONDS)  # the last answer ("ok") is not served again
        for _ in range(3):
            started = time.monotonic()
            status, body = http_get(port, "/healthz")
            assert status == 503 and "no answer to the health check" in body, body
            assert time.monotonic() - started < 6
        # One check waits behind the lock, however many probes came.
        waiting = conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
            " WHERE c.relname = 'schema_migrations' AND NOT l.granted"
        ).fetchone()
        assert waiting == (1,)
        blocker.execute("ROLLBACK")
    wait_until(lambda: http_status(port, "/healthz") == 200)


def test_the_metrics_port_lets_idle_connections_go_and_caps_how_many_it_holds():
    # Found by a security review: a connection that sent nothing (or half a request) held
    # a thread for ever, and enough of them took the process's threads or descriptors.
    from prometheus_client import CollectorRegistry

    from pgqueue.metrics import MetricsServer

    server = MetricsServer(
        "127.0.0.1", 0, CollectorRegistry(), lambda: (True, "ok"),
        idle_timeout=5.0, max_connections=3, max_per_client=2,
    ).start()  # fmt: skip

    def connect(source: str, timeout: float = 10) -> socket.socket:
        return socket.create_connection(
            ("127.0.0.1", server.port), timeout=timeout, source_address=(source, 0)
        )

    def refused(source: str) -> bool:
        """Closed unanswered at once (not at the idle timeout)."""
        with connect(source, timeout=1) as extra:
            return extra.recv(100) == b""

    held = [connect("127.0.0.1"), connect("127.0.0.1")]
    try:
        held[0].sendall(b"GET /metr")  # a request never finished
        assert refused("127.0.0.1")  # past the cap for one client
        held.append(connect("127.0.0.2"))
        assert refused("127.0.0.3")  # past the cap for all
        # The idle ones are let go after the idle timeout (an answer: 408, or nothing).
        for sock in held:
            assert b"200 OK" not in sock.recv(1000)

        # Their slots are free again: soon after, as the server's thread for each one
        # ends just after it closed the socket (a request in between may still be
        # closed unanswered, seen once in CI).
        def answered() -> bool:
            try:
                return http_get(server.port, "/healthz") == (200, "ok\n")
            except http.client.RemoteDisconnected:
                return False

        wait_until(answered, timeout=5)
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_the_metrics_port_gives_a_request_sent_byte_by_byte_no_more_time():
    # The first limit held for each read: a client sending a byte a second kept its
    # connection (and a slot) for as long as it liked.
    from prometheus_client import CollectorRegistry

    from pgqueue.metrics import MetricsServer

    server = MetricsServer(
        "127.0.0.1", 0, CollectorRegistry(), lambda: (True, "ok"), idle_timeout=1.0
    ).start()
    sent = 0
    try:
        # OSError: a reset, or a broken pipe, once the connection is let go.
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock,
            contextlib.suppress(OSError),
        ):
            for byte in b"GET /healthz HTTP/1.0\r\nX-Slow: " + b"x" * 100:
                sock.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.2)
                sock.setblocking(False)
                try:
                    if sock.recv(1000) is not None:
                        break  # answered (408) or closed
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
        # At a byte every 0.2 s, 1 s allows about 5 (with room for a slow machine).
        assert sent < 40, sent
    finally:
        server.stop()


def test_healthz_probes_in_a_burst_share_one_database_check(dsn, monkeypatch):
    # Found by a security review: every probe opened (and logged in) a database connection
    # of its own, so a client calling /healthz in a loop drove about 60 logins a second.
    from pgqueue import metrics

    connects = 0
    real_connect = store.connect

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal connects
        connects += 1
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(store, "connect", counted)
    monkeypatch.setattr(metrics, "HEALTH_REUSE_SECONDS", 60.0)
    check = metrics.database_health(dsn)
    for _ in range(20):
        assert check() == (True, "ok")
    assert connects == 1
    # Past the reuse window, a probe checks afresh.
    monkeypatch.setattr(metrics, "HEALTH_REUSE_SECONDS", 0.0)
    assert check() == (True, "ok")
    assert connects == 2


@pytest.mark.parametrize("processes", [1, 2])
def test_healthz_is_503_while_a_handler_blocks_the_event_loop(conn, daemons, processes):
    # /healthz said 200 while nothing on the loop ran (no heartbeat): a liveness probe
    # never restarted such a worker while its leases expired. Under --processes the
    # supervisor's /healthz did not see a child's blocked loop at all.
    port = free_port()
    daemons.worker(
        "--metrics-port", str(port), "--lease-seconds", "2", "--processes", str(processes),
        *LOCAL,
    )  # fmt: skip
    wait_until(lambda: http_status(port, "/healthz") == 200)
    job_id = enqueue(conn, "block_loop", {"seconds": 6})

    wait_until(lambda: http_status(port, "/healthz") == 503, timeout=10)
    assert "no heartbeat for" in http_get(port, "/healthz")[1]
    wait_until(lambda: job_state(conn, job_id) == "succeeded", timeout=20)
    wait_until(lambda: http_status(port, "/healthz") == 200, timeout=10)


@pytest.mark.parametrize("processes", [1, 2])
def test_healthz_is_503_while_timed_out_plain_handlers_hold_every_slot(
    conn, daemons, processes, tmp_path
):
    # Python cannot stop a thread: plain handlers that time out and run on keep their
    # slots, and with all of them held the worker ran nothing while /healthz said 200.
    port = free_port()
    daemons.worker(
        "--metrics-port", str(port), "--lease-seconds", "2", "--concurrency", "2",
        "--processes", str(processes), *LOCAL,
    )  # fmt: skip
    wait_until(lambda: http_status(port, "/healthz") == 200)
    release = tmp_path / "release"
    args = {"release": str(release)}
    jobs = [enqueue(conn, "overrun", args, max_attempts=1) for _ in range(2 * processes)]
    wait_until(lambda: all(job_state(conn, j) is None for j in jobs))  # timed out: dead
    queued = enqueue(conn, "record", {"note": "waits"})

    wait_until(lambda: http_status(port, "/healthz") == 503, timeout=20)
    assert "claims held back" in http_get(port, "/healthz")[1]
    assert job_state(conn, queued) == "queued"  # held: nothing runs
    release.touch()  # the handlers return
    wait_until(lambda: job_state(conn, queued) == "succeeded", timeout=20)
    wait_until(lambda: http_status(port, "/healthz") == 200, timeout=10)


def test_supervisor_healthz_names_a_frozen_child_and_a_stopping_one(conn, daemons):
    # A child frozen as a whole (SIGSTOP, C code holding the GIL) could not report its
    # silence, and a stopping child still counted as up: /healthz said 200 for both.
    port = free_port()
    supervisor = daemons.worker(
        "--metrics-port", str(port), "--lease-seconds", "2", "--processes", "2",
        "--shutdown-timeout", "5", *LOCAL,
    )  # fmt: skip
    wait_until(lambda: http_status(port, "/healthz") == 200)
    first, second = sorted(psutil.Process(supervisor.pid).children(), key=lambda p: p.pid)
    first.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: http_status(port, "/healthz") == 503, timeout=10)
        assert "no heartbeat for over a lease" in http_get(port, "/healthz")[1]
    finally:
        first.send_signal(signal.SIGCONT)
    wait_until(lambda: http_status(port, "/healthz") == 200, timeout=10)
    job_id = enqueue(conn, "sleep", {"seconds": 30})
    wait_until(lambda: job_state(conn, job_id) == "running")
    leased_by = scalar(conn, "SELECT leased_by FROM pgqueue.jobs WHERE id = %s", (job_id,))
    holder = next(p for p in (first, second) if p.pid == int(leased_by.split(":")[-2]))
    holder.send_signal(signal.SIGTERM)
    wait_until(lambda: "stopping" in http_get(port, "/healthz")[1], timeout=5)
    assert http_status(port, "/healthz") == 503


def test_unmigrated_database_gives_503_and_a_migrate_hint_until_migrated(server_dsn, tmp_path):
    name = f"pgqueue_unmigrated_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(server_dsn, dbname=name)
    daemons = Daemons(dsn, tmp_path)
    try:
        port = free_port()
        worker = daemons.worker("--metrics-port", str(port), *LOCAL)
        reaper = daemons.reaper("--interval", "0.2")
        # 503 "starting" comes first, until the worker has looked at the schema.
        wait_until(lambda: "schema is missing" in http_body(port, "/healthz"))
        assert http_status(port, "/healthz") == 503
        # The loops' failures say what to do, in one line each, not a traceback.
        for proc, event in ((reaper, "reaper.failed"),):
            failed = wait_until(lambda p=proc, e=event: events(daemons, p, e))  # type: ignore[misc]
            assert all("exception" not in f for f in failed), failed
            assert failed[0]["hint"].endswith("run `pgqueue migrate`"), failed[0]
            assert "does not exist" in failed[0]["error"], failed[0]
        # A worker stopped meanwhile says in one line that it could not deregister.
        second = daemons.worker(*LOCAL)
        wait_until(lambda: events(daemons, second, "worker.schema_behind"))
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
        (deregister,) = events(daemons, second, "worker.deregister_failed")
        assert "\n" not in deregister["error"] and "does not exist" in deregister["error"]
        assert deregister["hint"] == SCHEMA_HINT
        # The admin commands say the same, in one line.
        for args in (("stats",), ("queue", "pause", "q"), ("dead", "retry", "1"), ("status", "1")):
            assert one_line_error(cli(dsn, *args)) == f"pgqueue: {SCHEMA_HINT}", args
        # Both daemons named every migration as missing, once.
        shipped = [f"{m.version:04d}_{m.name}" for m in load_migrations()]
        for proc, daemon in ((worker, "worker"), (reaper, "reaper")):
            (behind,) = events(daemons, proc, f"{daemon}.schema_behind")
            assert behind["missing"] == shipped
        migrate(dsn)
        wait_until(lambda: http_status(port, "/healthz") == 200, timeout=30)
        for proc, daemon in ((worker, "worker"), (reaper, "reaper")):
            wait_until(lambda p=proc, d=daemon: events(daemons, p, f"{d}.schema_up_to_date"))  # type: ignore[misc]
    finally:
        daemons.stop_all()
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_admin_commands_on_a_database_of_another_schema_say_so(server_dsn, monkeypatch):
    """New pgqueue installed, `pgqueue migrate` not run yet: the commands whose statements
    name a column that came later said only `database error: column "original_id" does
    not exist` (a review). They say the schema is behind, and which migrations it lacks;
    on a database a newer pgqueue migrated, that this one is older. Commands that work on
    that schema still do."""
    name = f"pgqueue_older_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(server_dsn, dbname=name)
    try:
        migrate_module = sys.modules["pgqueue.migrate"]  # pgqueue.migrate is also a function
        shipped = load_migrations()
        # Before 0023, which gave the dead-letter table its original_id column.
        older = [m for m in shipped if m.version < 23]
        monkeypatch.setattr(migrate_module, "load_migrations", lambda: older)
        migrate(dsn)
        monkeypatch.undo()
        missing = ", ".join(f"{m.version:04d}_{m.name}" for m in shipped if m.version >= 23)
        with psycopg.connect(dsn, autocommit=True) as c:
            job = scalar(c, "INSERT INTO pgqueue.jobs (task) VALUES ('t') RETURNING id")
        for args in (("dead", "list"), ("status", str(job))):
            line = one_line_error(cli(dsn, *args))
            assert line.startswith(f"pgqueue: {SCHEMA_HINT} ("), (args, line)
            assert "does not exist" in line and line.endswith(f"; not applied: {missing})"), line
        assert cli(dsn, "stats").returncode == 0

        migrate(dsn)
        assert cli(dsn, "dead", "list").returncode == 0
        # A newer pgqueue's schema (a migration this one does not know, a column renamed).
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(
                "INSERT INTO pgqueue.schema_migrations (version, name, checksum)"
                " VALUES (9999, 'from_the_future', 'x')"
            )
            c.execute("ALTER TABLE pgqueue.dead_jobs RENAME COLUMN original_id TO first_id")
        line = one_line_error(cli(dsn, "dead", "list"))
        assert line.startswith("pgqueue: database error: column"), line
        assert line.endswith("(a newer pgqueue migrated this database: 9999; upgrade this one)")
        # Another error of that shape on an up-to-date schema is told as it is.
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("DELETE FROM pgqueue.schema_migrations WHERE version = 9999")
        line = one_line_error(cli(dsn, "dead", "list"))
        assert line.startswith("pgqueue: database error: column") and "migrat" not in line
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_database_behind_this_version_is_named_until_migrated(server_dsn, tmp_path, monkeypatch):
    """Code upgraded, `pgqueue migrate` not run yet: both daemons say once which of their
    migrations the database lacks, /healthz answers 503 naming them, the worker claims
    nothing (a claim committed there, the statements that record its outcome could fail
    and the jobs run again), and both notice the migrate."""
    name = f"pgqueue_behind_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(server_dsn, dbname=name)
    migrate_module = sys.modules["pgqueue.migrate"]  # pgqueue.migrate is also a function
    shipped = load_migrations()
    monkeypatch.setattr(migrate_module, "load_migrations", lambda: shipped[:-1])
    migrate(dsn)
    monkeypatch.undo()
    missing = [f"{m.version:04d}_{m.name}" for m in shipped[-1:]]
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(EXECUTIONS_DDL)  # type: ignore[arg-type]
    daemons = Daemons(dsn, tmp_path)
    try:
        port = free_port()
        worker = daemons.worker("--metrics-port", str(port), "--lease-seconds", "3", *LOCAL)
        reaper = daemons.reaper("--interval", "0.2")
        # 503 "starting" comes first, until the worker has looked at the schema.
        hint = f"lacks migrations {missing[0]}: run `pgqueue migrate`"
        wait_until(lambda: hint in http_body(port, "/healthz"))
        assert http_status(port, "/healthz") == 503
        for proc, daemon in ((worker, "worker"), (reaper, "reaper")):
            (behind,) = wait_until(
                lambda p=proc, d=daemon: events(daemons, p, f"{d}.schema_behind")
            )  # type: ignore[misc]
            assert behind["level"] == "error" and behind["missing"] == missing, behind
            assert behind["hint"] == SCHEMA_HINT
        with psycopg.connect(dsn, autocommit=True) as c:
            job = enqueue(c, "record", {"note": "behind"})
            time.sleep(1.5)
            assert job_state(c, job) == "queued"
            assert scalar(c, "SELECT attempts FROM pgqueue.jobs WHERE id = %s", (job,)) == 0

        assert [m.version for m in migrate(dsn)] == [shipped[-1].version]
        with psycopg.connect(dsn, autocommit=True) as c:
            wait_until(lambda: job_state(c, job) == "succeeded", timeout=30)
        wait_until(lambda: http_status(port, "/healthz") == 200, timeout=30)
        for proc, daemon in ((worker, "worker"), (reaper, "reaper")):
            wait_until(lambda p=proc, d=daemon: events(daemons, p, f"{d}.schema_up_to_date"))  # type: ignore[misc]
            # Said once, not at every beat or pass while behind.
            assert len(events(daemons, proc, f"{daemon}.schema_behind")) == 1
    finally:
        daemons.stop_all()
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_database_migrated_by_a_newer_version_is_named_once(conn, daemons):
    conn.execute(
        "INSERT INTO pgqueue.schema_migrations (version, name, checksum)"
        " VALUES (9999, 'from_the_future', 'x')"
    )
    port = free_port()
    worker = daemons.worker("--metrics-port", str(port), *LOCAL)
    reaper = daemons.reaper("--interval", "0.2")
    for proc, daemon in ((worker, "worker"), (reaper, "reaper")):
        (newer,) = wait_until(lambda p=proc, d=daemon: events(daemons, p, f"{d}.schema_newer"))  # type: ignore[misc]
        assert newer["newer"] == [9999] and "upgrade" in newer["hint"], newer
    # Newer is not behind: ready, and said once: a pass after it requeues an expired job.
    wait_until(lambda: http_status(port, "/healthz") == 200)
    expired = scalar(
        conn,
        "INSERT INTO pgqueue.jobs (task, state, attempts, lease_token, leased_by,"
        " lease_expires_at) VALUES ('record', 'running', 1, gen_random_uuid(), 'gone',"
        " now() - interval '1 minute') RETURNING id",
    )
    wait_until(lambda: events(daemons, reaper, "reaper.requeued"))
    assert events(daemons, reaper, "reaper.requeued")[0]["job_id"] == expired
    assert len(events(daemons, reaper, "reaper.schema_newer")) == 1
    assert events(daemons, worker, "worker.schema_behind") == []
    # The NOTIFY-queue limit is unset here: nothing to say of it.
    assert events(daemons, worker, "worker.notify_limit_ignored") == []
    assert events(daemons, reaper, "reaper.notify_limit_ignored") == []


def test_an_unreadable_notify_limit_is_named_once_at_start(conn, daemons):
    # It counts as unset (0.5) in every statement rather than failing one: the operator
    # who set it hears of it from the daemons, once each.
    conn.execute(
        sql.SQL("ALTER DATABASE {} SET pgqueue.notify_max_queue_usage = '20%'").format(
            sql.Identifier(conn.info.dbname)
        )
    )
    # The worker's embedded reaper leaves it to its worker.
    worker = daemons.worker("--lease-seconds", "3", "--reaper", "--reaper-interval", "0.2", *LOCAL)
    reaper = daemons.reaper("--interval", "0.2")
    for proc, daemon in ((worker, "worker"), (reaper, "reaper")):
        (ignored,) = wait_until(
            lambda p=proc, d=daemon: events(daemons, p, f"{d}.notify_limit_ignored")
        )  # type: ignore[misc]
        assert ignored["level"] == "warning" and ignored["value"] == "20%", ignored
        assert ignored["source"] == f"ALTER DATABASE {conn.info.dbname}", ignored
        assert "0.2" in ignored["hint"] and "(0.5)" in ignored["hint"], ignored
    # Jobs still run; later beats and passes say nothing more.
    job = enqueue(conn, "record", {"note": "limit"})
    wait_until(lambda: job_state(conn, job) == "succeeded")
    beat = scalar(conn, "SELECT last_heartbeat_at FROM pgqueue.workers")
    wait_until(lambda: scalar(conn, "SELECT last_heartbeat_at FROM pgqueue.workers") != beat)
    expired = scalar(
        conn,
        "INSERT INTO pgqueue.jobs (task, state, attempts, lease_token, leased_by,"
        " lease_expires_at) VALUES ('record', 'running', 1, gen_random_uuid(), 'gone',"
        " now() - interval '1 minute') RETURNING id",
    )
    wait_until(
        lambda: (
            [e["job_id"] for p in (worker, reaper) for e in events(daemons, p, "reaper.requeued")]
            == [expired]
        )
    )
    for proc, daemon in ((worker, "worker"), (reaper, "reaper")):
        assert len(events(daemons, proc, f"{daemon}.notify_limit_ignored")) == 1
    assert events(daemons, worker, "reaper.notify_limit_ignored") == []


# --- 4. supervisor ------------------------------------------------------------------------------


def test_supervisor_serves_metrics_summed_over_its_processes(conn, daemons):
    port = free_port()
    supervisor = daemons.worker("--processes", "2", "--metrics-port", str(port), *LOCAL)
    wait_until(lambda: listening(conn) == 2)
    ids = enqueue_many(conn, [JobSpec("record", {"note": f"s{i}"}) for i in range(20)])

    wait_until(
        lambda: count(
            conn, "SELECT count(*) FROM pgqueue.jobs WHERE id = ANY(%s) AND state = 'succeeded'",
            (ids,),
        ) == 20,
        timeout=30,
    )  # fmt: skip
    samples = wait_until(
        lambda: (
            (s := scrape(port))
            and total(s, "pgqueue_jobs_completed_total", outcome="succeeded") == 20
            and s
        )
    )
    assert total(samples, "pgqueue_jobs_claimed_total") == 20
    assert total(samples, "pgqueue_job_duration_seconds_count") == 20
    assert total(samples, "pgqueue_worker_info") == 2
    assert total(samples, "pgqueue_jobs_running") == 0
    assert http_get(port, "/healthz")[0] == 200
    assert supervisor.poll() is None
    assert not events(daemons, supervisor, "supervisor.child_died")

    # A child dies: /healthz says so until it is replaced; the dead child's counters stay
    # in the sum, its live gauges do not.
    children = {c.pid for c in psutil.Process(supervisor.pid).children()}
    assert len(children) == 2
    victim = min(children)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: http_status(port, "/healthz") == 503)
    wait_until(lambda: http_status(port, "/healthz") == 200)
    replaced = {c.pid for c in psutil.Process(supervisor.pid).children()}
    assert victim not in replaced and len(replaced) == 2
    [newcomer] = replaced - children
    # Registered by its first heartbeat, which comes after it set its worker_info.
    wait_until(lambda: count(conn, "SELECT count(*) FROM pgqueue.workers WHERE pid = %s",
                             (newcomer,)))  # fmt: skip
    samples = scrape(port)
    assert total(samples, "pgqueue_worker_info") == 2
    assert total(samples, "pgqueue_jobs_completed_total", outcome="succeeded") == 20
    assert total(samples, "pgqueue_jobs_claimed_total") == 20


def test_supervisor_metrics_dir_is_removed_when_its_port_cannot_be_bound(daemons, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        supervisor = daemons.worker(
            "--processes", "2", "--metrics-port", str(port), *LOCAL, env={"TMPDIR": str(tmp)}
        )
        assert supervisor.wait(timeout=30) == 2
    assert "Address already in use" in daemons.output(supervisor)
    assert list(tmp.iterdir()) == []  # its pgqueue-metrics-* directory was left behind


def test_supervisor_on_sigquit_stops_its_children_at_once_and_cleans_up(conn, daemons, tmp_path):
    # SIGQUIT killed the supervisor outright (exit -3): nothing was forwarded, its
    # metrics directory stayed, and the children stopped only once orphaned, gracefully.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    port = free_port()
    supervisor = daemons.worker(
        "--processes", "2", "--metrics-port", str(port), "--shutdown-timeout", "30", *LOCAL,
        env={"TMPDIR": str(tmp)},
    )  # fmt: skip
    wait_until(lambda: listening(conn) == 2)
    job_id = enqueue(conn, "sleep", {"seconds": 30, "note": "quit"})
    wait_until(lambda: job_state(conn, job_id) == "running")
    wait_until(lambda: http_status(port, "/healthz") == 200)

    supervisor.send_signal(signal.SIGQUIT)

    assert supervisor.wait(timeout=10) == 1, daemons.output(supervisor)
    assert "supervisor.stopping" in daemons.output(supervisor)
    assert list(tmp.iterdir()) == []
    assert job_state(conn, job_id) == "running"  # left to its lease, as documented


def test_workers_with_reaper_export_the_database_gauges_one_child_leading(conn, daemons):
    port = free_port()
    insert_job(conn, queue="gauged")
    expired = insert_job(conn, queue="expiring", max_attempts=5)
    make_running(conn, expired, lease_in=-10)
    supervisor = daemons.worker(
        "--processes", "2", "--reaper", "--reaper-interval", "0.2",
        "--metrics-port", str(port), *LOCAL,
    )  # fmt: skip
    wait_until(lambda: http_status(port, "/healthz") == 200, timeout=30)
    wait_until(lambda: job_state(conn, expired) != "running" or None)

    def expiries() -> dict[str, list[float]]:
        body = http_get(port, "/metrics")[1]
        families = [f for f in text_string_to_metric_families(body)]
        assert [f.name for f in families].count("pgqueue_leases_expired") == 1
        found: dict[str, list[float]] = {}
        for s in (s for f in families for s in f.samples):
            if s.name == "pgqueue_leases_expired_total":
                found.setdefault(s.labels["queue"], []).append(s.value)
        return found

    # Every queue the gauges saw has its series from 0 (one born at 1 hides the first
    # expiry from increase()); a queue a child counted in has the count, once.
    assert wait_until(lambda: expiries().get("expiring") == [1.0] and expiries())["gauged"] == [0.0]

    body = http_get(port, "/metrics")[1]
    depth = [
        s for fam in text_string_to_metric_families(body) for s in fam.samples
        if s.name == "pgqueue_queue_depth" and s.labels == {"queue": "gauged", "state": "ready"}
    ]  # fmt: skip
    assert [s.value for s in depth] == [1.0]
    # Once, from the supervisor, whatever the number of children running a reaper.
    assert [s.value for fam in text_string_to_metric_families(body) for s in fam.samples
            if s.name == "pgqueue_reaper_info"] == [1.0]  # fmt: skip
    wait_until(lambda: events(daemons, supervisor, "reaper.standby"))
    assert len(events(daemons, supervisor, "reaper.leading")) == 1
    assert len(events(daemons, supervisor, "reaper.started")) == 2


def test_supervisor_healthz_is_503_until_every_child_runs_its_worker(conn, daemons):
    # A child counted as up from its spawn made /healthz 200 while it still imported the
    # app (and flap in a crash loop). Each child now says through a pipe when it runs.
    port = free_port()
    supervisor = daemons.worker(
        "--processes", "2", "--metrics-port", str(port), *LOCAL,
        app="tests.apps.slow_import:registry", env={"SLOW_IMPORT_SECONDS": "3"},
    )  # fmt: skip

    def answer() -> tuple[int, str] | None:
        try:
            return http_get(port, "/healthz")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    first = wait_until(answer, timeout=30)

    assert first == (503, "worker processes starting: [0, 1]\n")
    assert not events(daemons, supervisor, "worker.started")
    assert wait_until(lambda: http_status(port, "/healthz") == 200, timeout=30)
    assert len(events(daemons, supervisor, "worker.started")) == 2


def test_supervisor_healthz_names_every_slot_not_yet_running(dsn):
    from pgqueue.supervisor import Supervisor

    # Before (or while) its children are spawned: all of them, not only those spawned.
    assert Supervisor(["true"], 2, 1.0, dsn=dsn).healthy() == (
        False, "worker processes starting: [0, 1]",
    )  # fmt: skip


def test_supervisor_healthz_is_503_while_it_stops(conn, daemons):
    port = free_port()
    supervisor = daemons.worker(
        "--processes", "2", "--metrics-port", str(port), "--shutdown-timeout", "30", *LOCAL
    )
    wait_until(lambda: listening(conn) == 2)
    job_id = enqueue(conn, "sleep", {"seconds": 3, "note": "stop"})
    wait_until(lambda: job_state(conn, job_id) == "running")
    wait_until(lambda: http_status(port, "/healthz") == 200)

    supervisor.send_signal(signal.SIGTERM)

    def stopping() -> tuple[int, str] | None:
        got = http_get(port, "/healthz")
        return got if got is not None and got[0] == 503 else None

    assert wait_until(stopping, timeout=5) == (503, "stopping\n")
    assert supervisor.wait(timeout=30) == 0
    assert job_state(conn, job_id) == "succeeded"


def test_supervisor_children_do_not_bind_a_metrics_port_given_by_environment(conn, daemons):
    port = free_port()
    supervisor = daemons.start(
        "pgqueue-worker", "--app", APP, "--log-format", "json", "--processes", "2",
        env={"PGQUEUE_METRICS_PORT": str(port), "PGQUEUE_METRICS_HOST": "127.0.0.1"},
    )  # fmt: skip
    job_id = enqueue(conn, "record")
    wait_until(
        lambda: (
            job_state(conn, job_id) == "succeeded"
            or events(daemons, supervisor, "supervisor.child_died")
        )
    )
    assert not events(daemons, supervisor, "supervisor.child_died"), Daemons.output(supervisor)
    assert "Traceback" not in Daemons.output(supervisor)


# --- 5. stats, jobs list, cancel ---------------------------------------------------------------


def test_stats_prints_each_queue_with_its_counts_as_table_and_json(conn, dsn):
    assert ok(cli(dsn, "stats")).strip() == "no queues yet"
    insert_job(conn, queue="alpha", run_in=-30)
    insert_job(conn, queue="alpha")
    insert_job(conn, queue="alpha", run_in=600)
    make_running(conn, insert_job(conn, queue="beta"), lease_in=600)
    finished = insert_job(conn, queue="beta")
    conn.execute(
        "UPDATE pgqueue.jobs SET state = 'succeeded', finished_at = now() WHERE id = %s",
        (finished,),
    )
    insert_dead(conn, queue="gamma")
    ok(cli(dsn, "queue", "pause", "gamma"))
    # A queue with only retained finished jobs, long finished: still a queue.
    for state in ("succeeded", "cancelled", "cancelled"):
        conn.execute(
            "UPDATE pgqueue.jobs SET state = %s, finished_at = now() - interval '2 hours'"
            " WHERE id = %s",
            (state, insert_job(conn, queue="delta")),
        )

    rows = {r["queue"]: r for r in parse_table(ok(cli(dsn, "stats")))}
    assert set(rows) == {"alpha", "beta", "gamma", "delta"}
    assert list(rows["alpha"]) == [
        "queue", "ready", "scheduled", "running", "oldest_ready_age_seconds",
        "finished_last_minute", "succeeded", "cancelled", "dead", "paused",
    ]  # fmt: skip
    assert (rows["delta"]["succeeded"], rows["delta"]["cancelled"]) == ("1", "2")
    assert (rows["delta"]["finished_last_minute"], rows["delta"]["ready"]) == ("0", "0")
    assert (rows["beta"]["succeeded"], rows["beta"]["cancelled"]) == ("1", "0")
    assert (rows["alpha"]["ready"], rows["alpha"]["scheduled"], rows["alpha"]["running"]) == (
        "2", "1", "0",
    )  # fmt: skip
    assert float(rows["alpha"]["oldest_ready_age_seconds"]) >= 29
    assert (rows["beta"]["running"], rows["beta"]["finished_last_minute"]) == ("1", "1")
    assert rows["beta"]["oldest_ready_age_seconds"] == ""
    assert (rows["gamma"]["dead"], rows["gamma"]["paused"]) == ("1", "True")
    assert rows["alpha"]["paused"] == "False"

    data = {r["queue"]: r for r in json.loads(ok(cli(dsn, "stats", "--json")))}
    keys = {"queue", "ready", "scheduled", "running", "dead", "paused", "succeeded",
            "cancelled", "oldest_ready_age_seconds", "finished_last_minute"}  # fmt: skip
    assert all(set(r) == keys for r in data.values())
    assert data["alpha"] | {"oldest_ready_age_seconds": None} == {
        "queue": "alpha", "ready": 2, "scheduled": 1, "running": 0, "dead": 0, "paused": False,
        "oldest_ready_age_seconds": None, "finished_last_minute": 0, "succeeded": 0,
        "cancelled": 0,
    }  # fmt: skip
    assert data["delta"] == {
        "queue": "delta", "ready": 0, "scheduled": 0, "running": 0, "dead": 0, "paused": False,
        "oldest_ready_age_seconds": None, "finished_last_minute": 0, "succeeded": 1,
        "cancelled": 2,
    }  # fmt: skip
    assert data["alpha"]["oldest_ready_age_seconds"] >= 29
    assert data["beta"]["running"] == 1 and data["beta"]["finished_last_minute"] == 1
    assert data["beta"]["oldest_ready_age_seconds"] is None
    assert data["gamma"]["dead"] == 1 and data["gamma"]["paused"] is True


def test_stats_lists_a_queue_whose_only_job_runs_and_gives_no_age_to_scheduled_jobs(conn, dsn):
    # A mutation audit found these unguarded: a queue whose only job was running left out
    # of stats (and of the depth gauges); a queue with only jobs due later shown with a
    # negative oldest_ready_age_seconds; a job finished minutes ago counted as finished
    # in the last minute.
    make_running(conn, insert_job(conn, queue="busy"), lease_in=600)
    insert_job(conn, queue="later", run_in=600)
    recent = insert_job(conn, queue="later")
    conn.execute(
        "UPDATE pgqueue.jobs SET state = 'succeeded', finished_at = now() - interval '5 minutes'"
        " WHERE id = %s",
        (recent,),
    )

    data = {r["queue"]: r for r in json.loads(ok(cli(dsn, "stats", "--json")))}

    assert set(data) == {"busy", "later"}
    assert (data["busy"]["running"], data["busy"]["ready"]) == (1, 0)
    assert (data["later"]["scheduled"], data["later"]["ready"]) == (1, 0)
    assert data["later"]["oldest_ready_age_seconds"] is None
    assert (data["later"]["finished_last_minute"], data["later"]["succeeded"]) == (0, 1)


def test_jobs_list_applies_state_queue_task_filters_and_limit(conn, dsn):
    wanted = [insert_job(conn, queue="q", task="t") for _ in range(3)]
    insert_job(conn, queue="q", task="other")
    insert_job(conn, queue="r", task="t")
    make_running(conn, insert_job(conn, queue="q", task="t"), lease_in=600)

    args = ("jobs", "list", "--state", "queued", "--queue", "q", "--task", "t", "--limit", "2")
    # Cut at the limit: stderr says so, stdout stays the listing.
    newest = sorted(wanted, reverse=True)
    cut = (
        "showing the newest 2; more match (--limit N shows up to 10000)"
        f" (--before {newest[1]} shows the next ones)\n"
    )
    rows = json.loads(ok(cli(dsn, *args, "--json")))  # --json: stdout alone, nothing said
    assert [r["id"] for r in rows] == sorted(wanted, reverse=True)[:2]  # newest first
    assert all((r["state"], r["queue"], r["task"]) == ("queued", "q", "t") for r in rows)

    result = cli(dsn, *args)
    assert (result.returncode, result.stderr) == (0, cut)
    table = parse_table(result.stdout)
    assert [int(r["id"]) for r in table] == sorted(wanted, reverse=True)[:2]
    assert all((r["state"], r["queue"], r["task"]) == ("queued", "q", "t") for r in table)
    assert len(parse_table(ok(cli(dsn, *args[:-1], "3")))) == 3  # all fit: nothing said
    # The next page: below the last id shown (keyset paging, as the hint says).
    page = json.loads(ok(cli(dsn, *args, "--before", str(newest[1]), "--json")))
    assert [r["id"] for r in page] == newest[2:]
    running_id = scalar(conn, "SELECT id FROM pgqueue.jobs WHERE state = 'running'")
    below = ("jobs", "list", "--state", "running", "--json", "--before")
    assert json.loads(ok(cli(dsn, *below, str(running_id)))) == []
    assert len(json.loads(ok(cli(dsn, *below, str(running_id + 1))))) == 1
    assert cli(dsn, "jobs", "list", "--before", "0").returncode == 2

    running = json.loads(ok(cli(dsn, "jobs", "list", "--state", "running", "--json")))
    assert [r["task"] for r in running] == ["t"]
    assert len(json.loads(ok(cli(dsn, "jobs", "list", "--json")))) == 6
    assert ok(cli(dsn, "jobs", "list", "--queue", "nowhere")).strip() == "no jobs match"


def test_run_now_makes_waiting_jobs_due_and_wakes_their_queue(conn, dsn):
    overdue = insert_job(conn, queue="q1", run_in=-600)
    backing_off = insert_job(conn, queue="q1", run_in=3600)
    conn.execute("UPDATE pgqueue.jobs SET attempts = 2 WHERE id = %s", (backing_off,))
    scheduled = insert_job(conn, queue="q2", run_in=600)
    untouched = insert_job(conn, queue="q3", run_in=600)
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgqueue_jobs")

        out = ok(cli(dsn, "run-now", str(backing_off), str(scheduled)))

        assert sorted(notified_before_sentinel(conn, listener)) == ["q1", "q2"]
    assert out.splitlines() == [f"job {backing_off} is due now", f"job {scheduled} is due now"]
    due = "SELECT run_at <= now() FROM pgqueue.jobs WHERE id = %s"
    assert scalar(conn, due, (backing_off,)) and scalar(conn, due, (scheduled,))
    assert not scalar(conn, due, (untouched,))
    assert scalar(conn, "SELECT attempts FROM pgqueue.jobs WHERE id = %s", (backing_off,)) == 2
    # A job already due keeps its place (the claim orders by run_at): not moved back.
    before = scalar(conn, "SELECT run_at FROM pgqueue.jobs WHERE id = %s", (overdue,))
    assert ok(cli(dsn, "run-now", str(overdue))).strip() == f"job {overdue} is due now"
    assert scalar(conn, "SELECT run_at FROM pgqueue.jobs WHERE id = %s", (overdue,)) == before
    # In a paused queue: said.
    conn.execute("INSERT INTO pgqueue.queues (name, paused_at) VALUES ('q3', now())")
    assert ok(cli(dsn, "run-now", str(untouched))).strip() == (
        f"job {untouched} is due now (queue q3 is paused: it waits for `queue resume`)"
    )


def test_run_now_leaves_jobs_that_are_not_queued_and_says_why(conn, dsn):
    running = insert_job(conn)
    make_running(conn, running, lease_in=600)
    dead = insert_dead(conn)
    queued = insert_job(conn, run_in=600)
    before = scalar(conn, "SELECT run_at FROM pgqueue.jobs WHERE id = %s", (running,))

    result = cli(dsn, "run-now", str(running), str(dead), "999999", str(queued))

    assert result.returncode == 1
    assert result.stdout.splitlines() == [f"job {queued} is due now"]
    assert result.stderr.splitlines() == [
        f"pgqueue: job {running} left alone: it is running, not queued",
        f"pgqueue: job {dead} left alone: it is dead: `pgqueue dead retry` brings it back",
        "pgqueue: job 999999 left alone: no such job",
    ]
    assert scalar(conn, "SELECT run_at FROM pgqueue.jobs WHERE id = %s", (running,)) == before


@pytest.mark.parametrize(
    "args",
    [
        ("jobs", "list", "--state", "bogus"),
        ("jobs", "list", "--state", "dead"),
        ("jobs", "list", "--limit", "0"),
        ("dead", "purge", "--older-than", "soon"),
        ("dead", "purge", "--older-than", "9999999999999"),  # was a database error, exit 1
        ("dead", "retry", "99999999999999999999"),  # bigint out of range, exit 1
        ("dead", "show", "0"),
        ("status", "-5"),
        ("cancel", "9223372036854775808"),
        ("dead", "retry"),
        ("queue", "pause", " "),
        ("queue", "pause", " cancel w-1"),  # no job can be in it (0013)
        ("queue", "resume", "q\n"),
        # A blank filter matches no job: it was "no jobs match", exit 0.
        ("jobs", "list", "--queue", ""),
        ("jobs", "list", "--task", " "),
        ("dead", "list", "--queue", ""),
        ("dead", "retry", "--all", "--task", ""),
        ("dead", "purge", "--queue", "", "--yes"),
    ],
)
def test_bad_admin_arguments_exit_2_with_one_line(dsn, args):
    result = cli(dsn, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    one_line_error(result)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("status", "abc"), "'abc' is not a job id (a whole number, 1 or more)"),
        (
            ("jobs", "list", "--state", "dead"),
            "Invalid value for '--state': dead jobs are kept in the dead-letter table: use"
            " `pgqueue dead list`",
        ),
        (("run-now", "12", "1.5"), "'1.5' is not a job id (a whole number, 1 or more)"),
        (("dead", "show", "0"), "'0' is not a job id (job ids run from 1 to 9223372036854775807)"),
        (
            ("cancel", "9223372036854775808"),
            "'9223372036854775808' is not a job id (job ids run from 1 to 9223372036854775807)",
        ),
        # Longer than Python reads into an int (4,300 digits): a usage error all the same.
        (
            ("status", "1" * 5000),
            "'11111111111111111111...11111' is not a job id (job ids run from 1 to"
            " 9223372036854775807)",
        ),
        (("status", "+0007"), None),
        (("status", "0" * 5000 + "7"), None),  # zeros count in int()'s limit
        (
            ("status", "--", "-" + "0" * 5000),
            "'-0000000000000000000...00000' is not a job id (job ids run from 1 to"
            " 9223372036854775807)",
        ),
    ],
)
def test_a_job_id_that_is_not_one_is_named_as_such(dsn, args, said):
    # click's IntRange called "abc" "not a valid integer range".
    result = cli(dsn, *args)
    if said is None:  # a job id: looked up
        assert one_line_error(result) == "pgqueue: no job with id 7"
        return
    assert result.returncode == 2
    assert one_line_error(result).endswith(said)


def test_cancel_of_queued_job_cancels_it_and_no_worker_runs_it(conn, dsn, daemons):
    target = enqueue(conn, "record", {"note": "never"})
    marker = enqueue(conn, "record", {"note": "marker"})

    assert ok(cli(dsn, "cancel", str(target))).strip() == f"job {target} cancelled"
    row = job_row(conn, target)
    assert row is not None
    assert row["state"] == "cancelled"
    assert row["finished_at"] is not None and row["cancel_requested_at"] is not None

    daemons.worker()
    wait_until(lambda: job_state(conn, marker) == "succeeded")
    assert job_state(conn, target) == "cancelled"
    assert executions(conn, target) == 0


def test_cancel_of_running_job_flags_it_and_a_finishing_attempt_still_succeeds(conn, dsn, daemons):
    """Cancelling a running job is a request: the handler may see it, nothing kills it,
    and an attempt that succeeds anyway leaves the job succeeded."""
    job_id = enqueue(conn, "sleep", {"seconds": 1.5, "note": "c"})
    daemons.worker("--lease-seconds", "3")
    wait_until(lambda: executions(conn, job_id, "start") == 1)

    out = ok(cli(dsn, "cancel", str(job_id)))
    assert out.strip() == f"job {job_id} is running: cancellation requested"
    row = job_row(conn, job_id)
    assert row is not None
    assert row["state"] == "running" and row["cancel_requested_at"] is not None

    wait_until(lambda: job_state(conn, job_id) == "succeeded")
    assert executions(conn, job_id, "end") == 1
    status = json.loads(ok(cli(dsn, "status", str(job_id), "--json")))
    assert status["cancel_requested_at"] is not None
    assert [h["outcome"] for h in status["history"]] == ["succeeded"]


def test_a_database_with_another_datestyle_and_client_encoding_runs_its_jobs(conn, dsn, daemons):
    # Set for the database (or a role): psycopg cannot read timestamps in DateStyle SQL
    # (every claimed batch failed after its commit, and its jobs were dead-lettered as if
    # their worker had died), and in LATIN1 a claim holding one character LATIN1 lacks
    # failed whole, for good (and the reaper could not send its statements). pgqueue's
    # own connections now pin both.
    conn.execute(
        sql.SQL("ALTER DATABASE {} SET DateStyle = 'SQL, DMY'").format(
            sql.Identifier(conn.info.dbname)
        )
    )
    conn.execute(
        sql.SQL("ALTER DATABASE {} SET client_encoding = 'LATIN1'").format(
            sql.Identifier(conn.info.dbname)
        )
    )
    unknown = enqueue(conn, "nobody.knows", {"city": "\u6771\u4eac \u2026"}, max_attempts=1)
    recorded = [enqueue(conn, "record", {"note": f"ok{i}"}) for i in range(3)]
    worker = daemons.worker(
        "--reaper", "--reaper-interval", "0.5", "--retention-seconds", "0", *LOCAL
    )  # fmt: skip
    wait_until(lambda: all(executions(conn, job_id) == 1 for job_id in recorded), timeout=30)
    wait_until(lambda: scalar(conn, "SELECT count(*) FROM pgqueue.dead_jobs") == 1)
    # The reaper prunes what finished (retention 0): its passes go through.
    wait_until(lambda: scalar(conn, "SELECT count(*) FROM pgqueue.jobs") == 0, timeout=30)
    assert scalar(conn, "SELECT reason FROM pgqueue.dead_jobs WHERE id = %s", (unknown,)) != (
        "lease_expired"
    )
    assert str(unknown) in ok(cli(dsn, "dead", "list"))
    assert '"city"' in ok(cli(dsn, "dead", "show", str(unknown)))
    assert "dead" in ok(cli(dsn, "status", str(unknown)))
    output = Daemons.output(worker)
    assert "Traceback" not in output, output
    assert not events(daemons, worker, "lease.lost")


@pytest.mark.parametrize("kind", ["exit", "interrupt"])
def test_systemexit_in_a_task_a_handler_started_fails_the_attempt_not_the_worker(
    conn, dsn, daemons, kind
):
    # asyncio lets SystemExit and KeyboardInterrupt out of the event loop from any task:
    # raised in a task the handler created, it stopped the worker at once (no graceful
    # shutdown: its other jobs waited for their leases to expire).
    neighbour = enqueue(conn, "sleep", {"seconds": 1.0, "note": "n"})
    worker = daemons.worker("--concurrency", "4", *LOCAL)
    wait_until(lambda: executions(conn, neighbour, "start") == 1)
    job_id = enqueue(conn, "subtask_exits", {"kind": kind}, max_attempts=1)
    wait_until(lambda: scalar(conn, "SELECT count(*) FROM pgqueue.dead_jobs") == 1)
    wait_until(lambda: job_state(conn, neighbour) == "succeeded")
    assert worker.poll() is None, Daemons.output(worker)
    (error,) = scalar(conn, "SELECT errors FROM pgqueue.dead_jobs WHERE id = %s", (job_id,))
    expected = "SystemExit: 4" if kind == "exit" else "KeyboardInterrupt"
    assert error["error"].startswith(f"HandlerTaskExit: {expected} raised in a task"), error
    # And it goes on working.
    after = enqueue(conn, "record", {"note": "after"})
    wait_until(lambda: executions(conn, after) == 1)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, Daemons.output(worker)


def test_an_async_handler_that_swallows_its_timeout_still_times_out(conn, dsn, daemons):
    job_id = enqueue(conn, "outlive_timeout", max_attempts=1)
    daemons.worker(*LOCAL)
    wait_until(lambda: scalar(conn, "SELECT count(*) FROM pgqueue.dead_jobs") == 1)
    assert executions(conn, job_id, "returned") == 1
    (error,) = scalar(conn, "SELECT errors FROM pgqueue.dead_jobs WHERE id = %s", (job_id,))
    assert error["kind"] == "timeout", error
    assert "caught the cancellation" in error["error"]


def test_a_cancel_reaches_the_running_handler_before_the_next_heartbeat(conn, dsn, daemons):
    # --lease-seconds 60: the worker beats every 20 s. Told by a notification, it beats
    # at once, and the handler, which waits for the flag, ends well before that.
    job_id = enqueue(conn, "wait_for_cancel", {"seconds": 60, "note": "prompt"})
    worker = daemons.worker("--lease-seconds", "60")
    wait_until(lambda: executions(conn, job_id, "start") == 1)
    failures = events(daemons, worker, "heartbeat.failed")
    ok(cli(dsn, "cancel", str(job_id)))
    wait_until(lambda: job_state(conn, job_id) == "cancelled", timeout=10)
    assert executions(conn, job_id, "end") == 1
    status = json.loads(ok(cli(dsn, "status", str(job_id), "--json")))
    assert [h["outcome"] for h in status["history"]] == ["failed"]
    assert events(daemons, worker, "heartbeat.failed") == failures


def test_cancel_requested_job_released_at_shutdown_is_cancelled_not_requeued(conn, dsn, daemons):
    job_id = enqueue(conn, "sleep", {"seconds": 60, "note": "r"})
    port = free_port()
    worker = daemons.worker(
        "--shutdown-timeout", "3", "--lease-seconds", "3", "--metrics-port", str(port), *LOCAL
    )  # fmt: skip
    wait_until(lambda: executions(conn, job_id, "start") == 1)
    assert http_get(port, "/healthz")[0] == 200
    assert "cancellation requested" in ok(cli(dsn, "cancel", str(job_id)))

    worker.send_signal(signal.SIGTERM)
    # While it waits for the job (up to --shutdown-timeout), it is not healthy.
    wait_until(lambda: http_status(port, "/healthz") == 503)
    assert http_get(port, "/healthz")[1].strip() == "stopping"
    assert worker.wait(timeout=30) == 0, Daemons.output(worker)

    row = job_row(conn, job_id)
    assert row is not None
    assert row["state"] == "cancelled", row
    assert row["finished_at"] is not None and row["lease_token"] is None
    assert row["attempts"] == 0  # a release does not count the attempt
    assert [h["outcome"] for h in row["history"]] == ["released"]
    cancelled = events(daemons, worker, "job.cancelled")
    assert [(e["job_id"], e["outcome"], e["attempt_end"]) for e in cancelled] == [
        (job_id, "cancelled", "released")
    ]
    assert executions(conn, job_id, "end") == 0


def test_failed_attempt_of_a_cancel_requested_job_is_not_retried(conn, dsn):
    # Two running jobs with attempts left, their cancellation requested through the CLI:
    # one fails (the worker's retry write), one loses its worker (the reaper's requeue).
    failing = insert_job(conn, max_attempts=5)
    token = make_running(conn, failing, lease_in=600)
    vanished = insert_job(conn, max_attempts=5)
    make_running(conn, vanished, lease_in=-5)
    for job_id in (failing, vanished):
        out = ok(cli(dsn, "cancel", str(job_id)))
        assert "cancellation requested" in out

    async def fail_attempt() -> dict[int, str]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            return await store.retry_jobs(
                aconn, ids=[failing], tokens=[token], delays=[0.0],
                errors=[{"attempt": 1, "kind": "error", "error": "RuntimeError: x"}],
                durations=[0.1],
            )  # fmt: skip

    assert asyncio.run(fail_attempt()) == {failing: "cancelled"}
    reaped = subprocess.run(
        [str(BIN / "pgqueue-reaper"), "--once", "--log-format", "json"],
        env={**os.environ, "PGQUEUE_DSN": dsn}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert reaped.returncode == 0, reaped.stderr
    # Reported as cancelled, not as requeued.
    assert "requeued 0, dead-lettered 0, cancelled 1" in reaped.stdout

    for job_id, outcome in ((failing, "failed"), (vanished, "lease_expired")):
        row = job_row(conn, job_id)
        assert row is not None
        assert row["state"] == "cancelled", row
        assert row["finished_at"] is not None and row["lease_token"] is None
        assert [h["outcome"] for h in row["history"]] == [outcome]


def test_cancel_refuses_unknown_and_finished_jobs_with_exit_1(conn, dsn):
    done = insert_job(conn)
    conn.execute(
        "UPDATE pgqueue.jobs SET state = 'succeeded', finished_at = now() WHERE id = %s", (done,)
    )
    dead = insert_dead(conn)

    unknown = cli(dsn, "cancel", "987654321")
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert one_line_error(unknown) == "pgqueue: no job with id 987654321"

    finished = cli(dsn, "cancel", str(done))
    assert finished.returncode == 1 and finished.stdout == ""
    assert one_line_error(finished) == f"pgqueue: job {done} is succeeded: nothing to cancel"
    assert job_state(conn, done) == "succeeded"

    died = cli(dsn, "cancel", str(dead))
    assert died.returncode == 1
    assert one_line_error(died) == f"pgqueue: job {dead} is dead: nothing to cancel"


def test_a_second_cancel_of_a_running_job_keeps_the_time_of_the_first(conn, dsn):
    # cancel_job without its coalesce moved cancel_requested_at (shown by `pgqueue
    # status`) to the time of the latest request.
    job_id = insert_job(conn)
    make_running(conn, job_id, lease_in=600)
    assert "cancellation requested" in ok(cli(dsn, "cancel", str(job_id)))
    first = scalar(conn, "SELECT cancel_requested_at FROM pgqueue.jobs WHERE id = %s", (job_id,))
    assert "cancellation requested" in ok(cli(dsn, "cancel", str(job_id)))
    row = job_row(conn, job_id)
    assert row is not None and row["state"] == "running"
    assert row["cancel_requested_at"] == first


@pytest.mark.parametrize("group", [(), ("jobs",), ("dead",), ("queue",)])
def test_a_command_group_without_its_command_prints_its_help(group):
    result = cli(None, *group)

    # As --help prints it.
    shown = ok(result)
    assert shown == ok(cli(None, *group, "--help"))
    assert shown.startswith("Usage: pgqueue"), shown
    assert "\nCommands:\n" in shown, shown


# --- 6. dead-letter commands ---------------------------------------------------------------


def test_dead_list_and_show_print_jobs_and_tracebacks(conn, dsn):
    assert ok(cli(dsn, "dead", "list")).strip() == "no dead jobs"
    first = insert_dead(conn, task="fail", message="RuntimeError: first", died_ago=60)
    second = insert_dead(conn, queue="other", task="crash", message="ValueError: second")

    rows = parse_table(ok(cli(dsn, "dead", "list")))
    assert [int(r["id"]) for r in rows] == [second, first]  # most recently dead first
    assert rows[1]["last_error"] == "RuntimeError: first"
    assert "original_id" not in rows[0]  # no job here died under a new id
    listed = json.loads(ok(cli(dsn, "dead", "list", "--task", "crash", "--json")))
    assert [(r["id"], r["queue"], r["reason"], r["original_id"]) for r in listed] == [
        (second, "other", "exhausted", None)
    ]
    # Cut at the limit: stderr says how many there are (the runbook's "how many?").
    cut = cli(dsn, "dead", "list", "--limit", "1")
    assert (cut.returncode, cut.stderr) == (
        0,
        "showing the newest 1 of 2 dead jobs (--limit N shows up to 10000)\n",
    )
    assert [int(r["id"]) for r in parse_table(cut.stdout)] == [second]
    assert len(json.loads(ok(cli(dsn, "dead", "list", "--limit", "1", "--json")))) == 1
    assert len(parse_table(ok(cli(dsn, "dead", "list", "--limit", "2")))) == 2

    shown = ok(cli(dsn, "dead", "show", str(first)))
    assert "Traceback (most recent call last)" in shown
    assert shown.count("RuntimeError: first") >= 3
    assert [line.split()[2] for line in shown.splitlines() if line.startswith("--- attempt")] == [
        "1", "2", "3",
    ]  # fmt: skip
    assert '{"n": 1}' in shown
    # A job enqueued without an idempotency key shows no empty line for it.
    assert [line for line in shown.splitlines() if line.startswith("idempotency_key")] == []
    data = json.loads(ok(cli(dsn, "dead", "show", str(first), "--json")))
    assert data["id"] == first and len(data["errors"]) == 3 and data["reason"] == "exhausted"

    missing = cli(dsn, "dead", "show", "987654321")
    assert missing.returncode == 1
    assert "987654321" in one_line_error(missing)


def test_dead_list_retry_and_purge_filter_by_reason(conn, dsn):
    exhausted = insert_dead(conn, task="fail")
    poison = [insert_dead(conn, task="fail") for _ in range(2)]
    permanent = insert_dead(conn, task="fail")
    conn.execute(
        "UPDATE pgqueue.dead_jobs SET reason = 'lease_expired' WHERE id = ANY(%s)", (poison,)
    )
    conn.execute("UPDATE pgqueue.dead_jobs SET reason = 'permanent' WHERE id = %s", (permanent,))

    listed = json.loads(ok(cli(dsn, "dead", "list", "--reason", "lease_expired", "--json")))
    assert sorted(r["id"] for r in listed) == poison
    assert ok(cli(dsn, "dead", "purge", "--reason", "permanent", "--dry-run")) == (
        "would purge 1 dead job(s)\n"
    )
    # Retry all but the jobs that killed their workers; purge those.
    assert ok(cli(dsn, "dead", "retry", "--all", "--reason", "exhausted")) == (
        "retried 1 dead job(s)\n"
    )
    assert dead_row(conn, exhausted) is None and job_row(conn, exhausted) is not None
    assert ok(cli(dsn, "dead", "purge", "--reason", "lease_expired")) == "purged 2 dead job(s)\n"
    assert [r[0] for r in conn.execute("SELECT id FROM pgqueue.dead_jobs")] == [permanent]
    # --reason goes with --all; an unknown reason is a usage error.
    given = cli(dsn, "dead", "retry", str(permanent), "--reason", "permanent")
    assert given.returncode == 2 and "--reason go with --all" in one_line_error(given)
    unknown = cli(dsn, "dead", "list", "--reason", "crashed")
    assert unknown.returncode == 2 and "crashed" in unknown.stderr


def test_dead_retry_moves_jobs_back_to_the_queue_keeping_their_history(conn, dsn):
    one = insert_dead(conn, task="fail")
    more = [insert_dead(conn, task="fail") for _ in range(2)]
    other = insert_dead(conn, task="crash")
    before = dead_row(conn, one)
    assert before is not None

    assert ok(cli(dsn, "dead", "retry", str(one))).strip() == "retried 1 dead job(s)"
    assert dead_row(conn, one) is None
    revived = job_row(conn, one)
    assert revived is not None
    assert (revived["state"], revived["attempts"], revived["max_attempts"]) == ("queued", 0, 3)
    assert revived["errors"] == before["errors"] and revived["history"] == before["history"]
    assert revived["args"] == before["args"] and revived["task"] == "fail"
    assert revived["run_at"] <= scalar(conn, "SELECT now()")

    again = cli(dsn, "dead", "retry", str(one), str(other))
    assert again.returncode == 1
    assert again.stdout == "retried 1 dead job(s)\n"
    assert one_line_error(again) == (
        "pgqueue: not in the dead-letter table, or held locked by another session (a retry or"
        f" purge in progress): [{one}]"
    )
    assert job_state(conn, other) == "queued" and dead_row(conn, other) is None
    other = insert_dead(conn, task="crash")
    assert job_state(conn, one) == "queued"

    assert ok(cli(dsn, "dead", "retry", "--all", "--task", "fail")).strip() == (
        "retried 2 dead job(s)"
    )
    assert all(job_state(conn, i) == "queued" and dead_row(conn, i) is None for i in more)
    assert dead_row(conn, other) is not None and job_row(conn, other) is None

    both = cli(dsn, "dead", "retry", str(other), "--all")
    assert both.returncode == 2
    one_line_error(both)
    assert dead_row(conn, other) is not None


def test_dead_retry_gives_a_job_with_an_idempotency_key_fresh_attempts_too(conn, dsn):
    # The keyed branch of retry_dead was unguarded: with its used attempts kept, a revived
    # keyed job had none left and was dead-lettered again after one more run.
    job_id = insert_dead(conn)
    conn.execute("UPDATE pgqueue.dead_jobs SET idempotency_key = 'k-7' WHERE id = %s", (job_id,))

    assert ok(cli(dsn, "dead", "retry", str(job_id))).strip() == "retried 1 dead job(s)"

    revived = job_row(conn, job_id)
    assert revived is not None
    assert (revived["state"], revived["attempts"], revived["max_attempts"]) == ("queued", 0, 3)
    assert revived["idempotency_key"] == "k-7"


def test_dead_retry_of_dead_jobs_sharing_an_idempotency_key_revives_all_of_them(conn, dsn):
    # A job's death frees its key, so a second job with that key can die too. Reviving
    # both in one batch used to fail the whole batch on the unique key: the oldest keeps
    # the key, the other comes back without it (as when a live job holds it).
    first, second, third = (insert_dead(conn) for _ in range(3))
    held = insert_dead(conn)
    conn.execute(
        "UPDATE pgqueue.dead_jobs SET args = jsonb_build_object('n', id), priority = id % 100,"
        " max_attempts = 1 + id % 7"
    )
    before = dict(
        conn.execute("SELECT id, (args, priority, max_attempts) FROM pgqueue.dead_jobs").fetchall()
    )
    conn.execute(
        "UPDATE pgqueue.dead_jobs SET idempotency_key = 'order-42' WHERE id = ANY (%s)",
        ([first, second, third],),
    )
    conn.execute("UPDATE pgqueue.dead_jobs SET idempotency_key = 'live' WHERE id = %s", (held,))
    live = insert_job(conn)
    conn.execute("UPDATE pgqueue.jobs SET idempotency_key = 'live' WHERE id = %s", (live,))

    result = cli(dsn, "dead", "retry", "--all")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "retried 4 dead job(s)"
    # Each key dropped is said (it was silent: two jobs for one key would run).
    assert result.stderr.splitlines() == [
        f"pgqueue: dead job {job_id} is back without its idempotency key {key!r}:"
        " another job holds it"
        for job_id, key in sorted([(second, "order-42"), (third, "order-42"), (held, "live")])
    ]
    assert count(conn, "SELECT count(*) FROM pgqueue.dead_jobs") == 0
    keys = dict(
        conn.execute(
            "SELECT id, idempotency_key FROM pgqueue.jobs WHERE id = ANY (%s)",
            ([first, second, third, held],),
        ).fetchall()
    )
    assert keys == {first: "order-42", second: None, third: None, held: None}
    assert all(job_state(conn, i) == "queued" for i in (first, second, third, held))
    # Each comes back whole, whichever path its key took (a mutation audit found the
    # keyed path could lose args unseen).
    after = dict(
        conn.execute(
            "SELECT id, (args, priority, max_attempts) FROM pgqueue.jobs WHERE id = ANY (%s)",
            ([first, second, third, held],),
        ).fetchall()
    )
    assert after == before


def test_dead_purge_deletes_older_ones_or_all(conn, dsn):
    old = [insert_dead(conn, died_ago=7200) for _ in range(2)]
    recent = [insert_dead(conn, died_ago=60) for _ in range(3)]
    other = insert_dead(conn, died_ago=7200, queue="other")

    dry = ("dead", "purge", "--older-than", "1h", "--queue", "default", "--dry-run")
    assert ok(cli(dsn, *dry)).strip() == "would purge 2 dead job(s)"
    assert ok(cli(dsn, "dead", "purge", "--dry-run")).strip() == "would purge 6 dead job(s)"
    assert count(conn, "SELECT count(*) FROM pgqueue.dead_jobs") == 6
    assert ok(cli(dsn, "dead", "purge", "--queue", "other")).strip() == "purged 1 dead job(s)"
    assert dead_row(conn, other) is None

    assert ok(cli(dsn, "dead", "purge", "--older-than", "1h")).strip() == "purged 2 dead job(s)"
    assert all(dead_row(conn, i) is None for i in old)
    assert all(dead_row(conn, i) is not None for i in recent)

    assert ok(cli(dsn, "dead", "purge")).strip() == "purged 3 dead job(s)"
    assert count(conn, "SELECT count(*) FROM pgqueue.dead_jobs") == 0
    assert count(conn, "SELECT count(*) FROM pgqueue.jobs") == 0


def at_a_terminal(dsn: str, args: list[str], answer: str) -> tuple[int, str]:
    """Run ``pgqueue ARGS`` with a pseudo-terminal for stdin, stdout and stderr, type
    ``answer`` and Enter at its prompt; its exit code and all it wrote."""
    import pty

    env = {k: v for k, v in os.environ.items() if not k.startswith("PGQUEUE_")}
    env["PGQUEUE_DSN"] = dsn
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [str(BIN / "pgqueue"), *args], stdin=terminal, stdout=terminal, stderr=terminal,
        env=env, cwd=ROOT,
    )  # fmt: skip
    os.close(terminal)
    seen = b""
    try:
        while b"[y/N]" not in seen and b"purged" not in seen:
            chunk = os.read(controller, 1024)
            if not chunk:
                break
            seen += chunk
        if b"[y/N]" in seen:
            os.write(controller, answer.encode() + b"\n")
        code = proc.wait(timeout=60)
        with contextlib.suppress(OSError):  # EIO once the process has gone
            while chunk := os.read(controller, 1024):
                seen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
    return code, seen.decode()


def test_dead_purge_of_everything_at_a_terminal_asks_first(conn, dsn):
    # Typed bare to see what it does, it deleted the whole dead-letter table at once.
    for _ in range(3):
        insert_dead(conn)

    code, out = at_a_terminal(dsn, ["dead", "purge"], "n")
    assert code == 1 and "Delete all 3 dead job(s) for good" in out and "purged nothing" in out
    assert count(conn, "SELECT count(*) FROM pgqueue.dead_jobs") == 3
    code, out = at_a_terminal(dsn, ["dead", "purge"], "y")
    assert code == 0 and "purged 3 dead job(s)" in out, out
    assert count(conn, "SELECT count(*) FROM pgqueue.dead_jobs") == 0
    # --yes, or a filter, does not ask.
    insert_dead(conn, queue="other")
    code, out = at_a_terminal(dsn, ["dead", "purge", "--queue", "other"], "")
    assert code == 0 and "[y/N]" not in out and "purged 1 dead job(s)" in out, out
    insert_dead(conn)
    code, out = at_a_terminal(dsn, ["dead", "purge", "--yes"], "")
    assert code == 0 and "[y/N]" not in out and "purged 1 dead job(s)" in out, out


def test_dead_purge_by_task_deletes_and_counts_only_that_tasks_jobs(conn, dsn):
    # Without the task filter in purge_dead, `dead purge --task crash` deleted every dead
    # job; without it in count_dead, --dry-run counted them all.
    crashed = [insert_dead(conn, task="crash") for _ in range(2)]
    failed = insert_dead(conn, task="fail")

    assert ok(cli(dsn, "dead", "purge", "--task", "crash", "--dry-run")).strip() == (
        "would purge 2 dead job(s)"
    )
    assert ok(cli(dsn, "dead", "purge", "--task", "crash")).strip() == "purged 2 dead job(s)"
    assert all(dead_row(conn, i) is None for i in crashed)
    assert dead_row(conn, failed) is not None


# --- 7. pause and resume ------------------------------------------------------------------------


def test_paused_queue_is_not_claimed_from_until_resumed(conn, dsn, daemons):
    # A long safety-net poll: only the notifications can wake the worker in time.
    daemons.worker("--queues", "q,other", "--poll-interval", "60")
    wait_until(lambda: listening(conn) == 1)
    assert ok(cli(dsn, "queue", "pause", "q")).strip() == "queue q paused"

    held = enqueue(conn, "record", {"note": "held"}, queue="q")
    free = enqueue(conn, "record", {"note": "free"}, queue="other")
    wait_until(lambda: job_state(conn, free) == "succeeded")
    # Absence cannot be awaited: watch the paused job stay queued for a short while.
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        assert job_state(conn, held) == "queued"
        time.sleep(0.1)
    assert executions(conn, held) == 0
    stats = {r["queue"]: r for r in json.loads(ok(cli(dsn, "stats", "--json")))}
    assert stats["q"]["paused"] is True and stats["q"]["ready"] == 1

    assert ok(cli(dsn, "queue", "resume", "q")).strip() == "queue q resumed"
    wait_until(lambda: job_state(conn, held) == "succeeded", timeout=15)
    assert executions(conn, held) == 1


def test_pausing_an_unused_queue_warns_and_resuming_an_unpaused_one_says_so(conn, dsn):
    # Pausing ahead is allowed, but a typo must not look like plain success.
    enqueue(conn, "record", {"note": "waits"}, queue="busy")
    assert ok(cli(dsn, "queue", "pause", "busy")).strip() == "queue busy paused"
    # Paused again: it says so, and keeps the time of the first pause.
    since = conn.execute("SELECT paused_at FROM pgqueue.queues WHERE name = 'busy'").fetchone()
    assert since is not None
    assert ok(cli(dsn, "queue", "pause", "busy")).strip() == (
        f"queue busy was paused already (since {since[0].isoformat()})"
    )

    typo = cli(dsn, "queue", "pause", "bussy")
    assert typo.returncode == 0 and typo.stdout.strip() == "queue bussy paused"
    assert typo.stderr.startswith(
        "pgqueue: warning: no job waits, runs or lies dead in queue bussy"
    )
    assert len(typo.stderr.splitlines()) == 1

    stats = {r["queue"]: r["paused"] for r in json.loads(ok(cli(dsn, "stats", "--json")))}
    assert stats == {"busy": True, "bussy": True}  # a paused queue shows, jobs or not
    assert ok(cli(dsn, "queue", "resume", "bussy")).strip() == "queue bussy resumed"
    assert ok(cli(dsn, "queue", "resume", "bussy")).strip() == "queue bussy was not paused"
    assert ok(cli(dsn, "queue", "resume", "nevr")).strip() == "queue nevr was not paused"
    # Resumed, with nothing in it, the typo is gone from stats (and so from metrics);
    # a name never paused gets no row at all.
    stats = {r["queue"]: r["paused"] for r in json.loads(ok(cli(dsn, "stats", "--json")))}
    assert stats == {"busy": True}
    names = {r[0] for r in conn.execute("SELECT name FROM pgqueue.queues")}
    assert names == {"busy", "bussy"}


def test_pausing_a_queue_whose_jobs_only_run_or_lie_dead_does_not_warn(conn, dsn):
    # queue_in_use without its running or dead-letter clause took such a queue for a
    # typo and printed a warning on stderr.
    make_running(conn, insert_job(conn, queue="running-only"), lease_in=600)
    insert_dead(conn, queue="dead-only")
    for name in ("running-only", "dead-only"):
        assert ok(cli(dsn, "queue", "pause", name)).strip() == f"queue {name} paused"


# --- 8. workers ---------------------------------------------------------------------------------


def test_workers_lists_live_workers_and_forgets_them_when_they_go(conn, dsn, daemons):
    first = daemons.worker("--queues", "default,extra", "--lease-seconds", "1.5")
    second = daemons.worker("--lease-seconds", "1.5", "--concurrency", "3")
    wait_until(lambda: len(json.loads(ok(cli(dsn, "workers", "--json")))) == 2)

    rows = {r["pid"]: r for r in json.loads(ok(cli(dsn, "workers", "--json")))}
    assert set(rows) == {first.pid, second.pid}
    host = socket.gethostname()
    assert all(r["host"] == host and r["id"].startswith(f"{host}:{r['pid']}:")
               for r in rows.values())  # fmt: skip
    assert rows[first.pid]["queues"] == ["default", "extra"]
    assert rows[second.pid]["concurrency"] == 3
    assert all(r["running"] == 0 and r["last_heartbeat_at"] for r in rows.values())
    table = parse_table(ok(cli(dsn, "workers")))
    assert {int(r["pid"]) for r in table} == {first.pid, second.pid}
    assert {r["queues"] for r in table} == {"default,extra", "async,default"}
    assert all(r["last_heartbeat_at"] for r in table)

    assert terminate(first) == 0
    # Deregistered on the way out: gone at once, no reaper needed.
    assert [r["pid"] for r in json.loads(ok(cli(dsn, "workers", "--json")))] == [second.pid]

    os.kill(second.pid, signal.SIGKILL)
    assert second.wait(timeout=10) == -signal.SIGKILL
    assert [r["pid"] for r in json.loads(ok(cli(dsn, "workers", "--json")))] == [second.pid]
    reaper = daemons.reaper(*FAST_REAPER)
    wait_until(lambda: json.loads(ok(cli(dsn, "workers", "--json"))) == [])
    assert ok(cli(dsn, "workers")).strip() == "no live workers"
    gone = wait_until(lambda: events(daemons, reaper, "reaper.worker_gone"))
    assert [e["pid"] for e in gone] == [second.pid]


# --- 9. execution history ---------------------------------------------------------------------


def test_status_says_why_a_queued_job_waits(conn, dsn):
    # A job enqueued (from SQL, say) to a misspelt queue, or to a paused one, showed as
    # plain "queued", for ever.
    def waiting(job_id: int) -> list[str]:
        lines = ok(cli(dsn, "status", str(job_id))).splitlines()
        return [line.split(None, 1)[1] for line in lines if line.startswith("waiting ")]

    misspelt = enqueue(conn, "record", {}, queue="emial")
    assert waiting(misspelt) == [
        "no live worker serves queue 'emial' (`pgqueue workers` lists the live ones and"
        " their queues)"
    ]
    # A worker that stopped beating three of its intervals ago does not count.
    conn.execute(
        "INSERT INTO pgqueue.workers (id, host, pid, queues, concurrency, heartbeat_seconds,"
        " version, last_heartbeat_at) VALUES ('h:1:x', 'h', 1, '{emial}', 1, 10, '0',"
        " now() - interval '31 seconds')"
    )
    assert waiting(misspelt) != []
    conn.execute("UPDATE pgqueue.workers SET last_heartbeat_at = now()")
    assert waiting(misspelt) == []
    ok(cli(dsn, "queue", "pause", "emial"))
    assert waiting(misspelt) == ["queue 'emial' is paused: `pgqueue queue resume emial` resumes it"]
    # Not for a job that is not queued, nor in --json (its fields are the job's).
    assert "waiting" not in ok(cli(dsn, "status", str(misspelt), "--json"))
    dead = insert_dead(conn, queue="emial")
    assert waiting(dead) == []


def test_status_shows_args_only_when_asked(conn, dsn):
    args = {"email": "ada@example.org", "big": 10**20, "name": "Zoë"}
    job_id = enqueue(conn, "record", args)
    dead = insert_dead(conn)

    plain = json.loads(ok(cli(dsn, "status", str(job_id), "--json")))
    assert "args" not in plain
    assert "ada@example.org" not in ok(cli(dsn, "status", str(job_id)))

    shown = json.loads(ok(cli(dsn, "status", str(job_id), "--json", "--args")))
    assert shown["args"] == args
    assert {k: v for k, v in shown.items() if k != "args"} == plain
    human = ok(cli(dsn, "status", str(job_id), "--args")).splitlines()
    [line] = [line for line in human if line.startswith("args ")]
    assert json.loads(line.split(None, 1)[1]) == args and "Zoë" in line
    # A dead job's args come from the dead-letter table.
    dead_args = json.loads(ok(cli(dsn, "status", str(dead), "--json", "--args")))["args"]
    assert dead_args == scalar(conn, "SELECT args FROM pgqueue.dead_jobs WHERE id = %s", (dead,))


# Postgres accepts numbers Python's json refuses (an int over 4300 digits), or makes inf
# of (a fraction beyond a float), which json.dumps would print as Infinity (not JSON).
NUMBERS_PYTHON_CANNOT_DECODE = ["9" * 5000, "9" * 400 + ".5", "-" + "9" * 400 + ".5"]


@pytest.mark.parametrize("number", NUMBERS_PYTHON_CANNOT_DECODE, ids=["int", "float", "-float"])
def test_status_args_that_python_cannot_decode_are_named_not_a_traceback(conn, dsn, number):
    job_id = scalar(
        conn,
        "INSERT INTO pgqueue.jobs (task, args) VALUES ('record', %s::jsonb) RETURNING id",
        ('{"n": ' + number + "}",),
    )

    shown = json.loads(ok(cli(dsn, "status", str(job_id), "--json", "--args")))
    assert shown["args"].startswith("<args Python cannot decode: ValueError"), shown["args"]
    human = ok(cli(dsn, "status", str(job_id), "--args"))
    assert "<args Python cannot decode: ValueError" in human


def test_status_shows_each_attempt_in_the_history(conn, dsn, daemons):
    failing = enqueue(conn, "fail", max_attempts=3)
    fine = enqueue(conn, "record", {"note": "h"})
    worker = daemons.worker()
    wait_until(lambda: dead_row(conn, failing) is not None and job_state(conn, fine) == "succeeded")
    worker_prefix = f"{socket.gethostname()}:{worker.pid}:"

    data = json.loads(ok(cli(dsn, "status", str(failing), "--json")))
    assert data["state"] == "dead" and data["dead_reason"] == "exhausted"
    history = data["history"]
    assert [h["attempt"] for h in history] == [1, 2, 3]
    assert [h["outcome"] for h in history] == ["retried", "retried", "dead"]
    for entry in history:
        assert entry["worker"].startswith(worker_prefix)
        started = datetime.fromisoformat(entry["started_at"])
        ended = datetime.fromisoformat(entry["ended_at"])
        assert started <= ended
        assert entry["duration"] >= 0
        assert entry["error"] == "RuntimeError: this task always fails"

    data = json.loads(ok(cli(dsn, "status", str(fine), "--json")))
    assert data["state"] == "succeeded"
    assert len(data["history"]) == 1
    entry = data["history"][0]
    assert (entry["attempt"], entry["outcome"]) == (1, "succeeded")
    assert entry["worker"].startswith(worker_prefix) and "error" not in entry
    assert entry["started_at"] and entry["ended_at"]

    human = ok(cli(dsn, "status", str(failing)))
    lines = human.splitlines()
    at = lines.index("attempts:")
    table = parse_table("\n".join(line[2:] for line in lines[at + 1 : at + 5]))
    assert [(r["attempt"], r["outcome"]) for r in table] == [
        ("1", "retried"), ("2", "retried"), ("3", "dead"),
    ]  # fmt: skip
    assert all(r["worker"].startswith(worker_prefix) for r in table)
    assert all(r["error"] == "RuntimeError: this task always fails" for r in table)

    shown = ok(cli(dsn, "dead", "show", str(failing)))
    assert shown.count("Traceback (most recent call last)") == 3
    assert "RuntimeError: this task always fails" in shown


def test_a_job_whose_id_the_dead_letter_table_holds_dies_once_under_a_new_id(conn, dsn, daemons):
    # An explicit id in an INSERT, or a sequence set back: the dead-letter table holds
    # the id of a job that now dies. Its move failed on the primary key: the job ran
    # max_attempts + 1 times, then stayed running for good (measured before migration
    # 0023). Now it runs max_attempts times and is stored under a new id.
    older = insert_dead(conn)
    job_id = scalar(
        conn,
        "INSERT INTO pgqueue.jobs (id, task, max_attempts) VALUES (%s, 'fail', 2) RETURNING id",
        (older,),
    )
    worker = daemons.worker()
    wait_until(
        lambda: (
            scalar(conn, "SELECT count(*) FROM pgqueue.dead_jobs WHERE original_id = %s", (job_id,))
            == 1
        )
    )
    assert job_row(conn, job_id) is None
    died = wait_until(lambda: events(daemons, worker, "job.dead"))
    assert terminate(worker) == 0
    # job.dead (an error, shown at every log level) names the dead id, which `dead show`
    # and `dead retry` take.
    (event,) = died
    new_id = event["dead_id"]
    assert (event["job_id"], event["task"], event["attempt"]) == (job_id, "fail", 2)
    dead = dead_row(conn, new_id)
    assert dead is not None and dead["original_id"] == job_id
    assert [(h["attempt"], h["outcome"]) for h in dead["history"]] == [
        (1, "retried"), (2, "dead"),
    ]  # fmt: skip
    older_row = dead_row(conn, older)
    assert older_row is not None and older_row["original_id"] is None  # untouched

    # `status` by the id it was enqueued as shows it, and says where it is.
    data = json.loads(ok(cli(dsn, "status", str(job_id), "--json")))
    assert (data["id"], data["original_id"], data["state"]) == (new_id, job_id, "dead")
    human = dict(
        line.split(None, 1) for line in ok(cli(dsn, "status", str(job_id))).splitlines()[:3]
    )
    assert human["job"] == str(new_id)
    assert human["original_id"] == (
        f"{job_id} (pgqueue.dead_jobs held that id when it died: it is dead job {new_id})"
    )
    shown = ok(cli(dsn, "dead", "show", str(new_id)))
    assert f"original_id     {job_id} (pgqueue.dead_jobs held that id when it died)" in shown
    # The older dead job under that id names the later one that had its id.
    shown_older = ok(cli(dsn, "dead", "show", str(older)))
    assert "original_id" not in shown_older
    assert (
        f"id reused by    dead job(s) {new_id}: later jobs with this id, stored under new ids"
    ) in shown_older
    assert json.loads(ok(cli(dsn, "dead", "show", str(older), "--json")))["id_reused_by"] == [
        new_id
    ]
    # `dead list` names the id each was enqueued as.
    listed = {int(r["id"]): r["original_id"] for r in parse_table(ok(cli(dsn, "dead", "list")))}
    assert listed == {new_id: str(job_id), older: ""}
    as_json = json.loads(ok(cli(dsn, "dead", "list", "--json")))
    assert {r["id"]: r["original_id"] for r in as_json} == {new_id: job_id, older: None}
    # `dead retry` given the id it was enqueued as retries the older dead job that kept
    # that id, and names the dead id of the one that died under a new id.
    died_as = (
        f"a job enqueued as {job_id} died as dead job(s) {new_id} (stored under a new id:"
        f" pgqueue.dead_jobs held {job_id} then)"
    )
    retried = cli(dsn, "dead", "retry", str(job_id))
    assert retried.returncode == 0 and "retried 1" in retried.stdout
    assert f"pgqueue: {died_as}: give its dead id to retry it" in retried.stderr
    missing = cli(dsn, "dead", "show", str(job_id))
    assert missing.returncode != 0
    assert f"no dead job with id {job_id}; {died_as}" in missing.stderr
    again = cli(dsn, "dead", "retry", str(job_id))  # nothing under that id now
    assert again.returncode == 1 and died_as in again.stderr
    both = cli(dsn, "dead", "retry", str(new_id))  # by its dead id: no note
    assert both.returncode == 0 and "retried 1" in both.stdout and both.stderr == ""


def test_status_counts_uncounted_runs_and_says_when_a_job_was_rescued(conn, dsn, daemons):
    snoozed = enqueue(conn, "snooze_once", {})
    vanished = insert_job(conn, queue="nobody", task="t")
    make_running(conn, vanished, lease_in=-1)
    plain = insert_job(conn, queue="nobody", task="t")
    worker = daemons.worker()
    wait_until(lambda: job_state(conn, snoozed) == "succeeded")
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=30)
    reaped = subprocess.run(
        [str(BIN / "pgqueue-reaper"), "--once", "--log-format", "json"],
        env={**os.environ, "PGQUEUE_DSN": dsn}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert reaped.returncode == 0, reaped.stderr

    def shown(job_id: int) -> dict[str, str]:
        lines = ok(cli(dsn, "status", str(job_id))).splitlines()
        if "attempts:" in lines:  # the history's table follows
            lines = lines[: lines.index("attempts:")]
        return dict(line.split(None, 1) for line in lines)

    # The snooze did not count: one attempt, two runs.
    assert shown(snoozed)["attempts"] == "1/20 (2 runs in all; see attempts below)"
    assert "rescued" not in shown(snoozed)
    # The reaper's requeue after its worker vanished did not count either, and says so.
    lost = shown(vanished)
    assert lost["attempts"] == "0/20 (1 run in all; see attempts below)"
    assert lost["rescued"] == "yes: a worker vanished under it; it runs alone, each attempt counts"
    assert json.loads(ok(cli(dsn, "status", str(vanished), "--json")))["rescued"] is True
    assert shown(plain)["attempts"] == "0/20"
    # A job that snoozed more often than its history keeps (the newest 50 snoozes):
    # the dropped ones, which its newest entries count, are runs too. Its snoozes go
    # through the function the worker's snooze statement appends with.
    poller = insert_job(conn, queue="nobody", task="t")
    for _ in range(56):
        conn.execute(
            "UPDATE pgqueue.jobs SET history = pgqueue.history_with_snooze(history,"
            " pgqueue.history_entry(1, 'w', now(), 0.1, 'snoozed')) WHERE id = %s",
            (poller,),
        )
    assert shown(poller)["attempts"] == (
        "0/20 (56 runs in all, 6 earlier snoozes not listed; see attempts below)"
    )
    conn.execute(
        "UPDATE pgqueue.jobs SET history = pgqueue.history_with_snooze(history,"
        " pgqueue.history_entry(1, 'w', now(), 0.1, 'snoozed')) WHERE id = %s",
        (poller,),
    )
    assert "57 runs in all, 7 earlier snoozes" in shown(poller)["attempts"]
    # While running, the current run is counted on both sides.
    make_running(conn, plain, lease_in=600)
    assert shown(plain)["attempts"] == "1/20"


def test_status_says_a_dead_job_was_rescued(conn, dsn):
    # dead_jobs has no rescued column: a job the reaper rescued, then dead-lettered when
    # its lease expired again on its last attempt, must still say so.
    job_id = insert_job(conn, queue="nobody", task="t", max_attempts=1)

    def lose_and_reap() -> None:
        make_running(conn, job_id, lease_in=-1)
        reaped = subprocess.run(
            [str(BIN / "pgqueue-reaper"), "--once", "--log-format", "json"],
            env={**os.environ, "PGQUEUE_DSN": dsn}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert reaped.returncode == 0, reaped.stderr

    lose_and_reap()
    assert job_state(conn, job_id) == "queued"
    lose_and_reap()
    assert dead_row(conn, job_id) is not None

    data = json.loads(ok(cli(dsn, "status", str(job_id), "--json")))
    assert (data["state"], data["rescued"]) == ("dead", True)
    lines = ok(cli(dsn, "status", str(job_id))).splitlines()
    [rescued] = [line.split(None, 1)[1] for line in lines if line.startswith("rescued ")]
    assert rescued == "yes: a worker vanished under it; it then ran alone"
    never = insert_dead(conn)
    assert json.loads(ok(cli(dsn, "status", str(never), "--json")))["rescued"] is False


def test_jobs_list_names_a_worker_only_for_running_jobs(conn, dsn):
    requeued = insert_job(conn, queue="q", task="t")
    make_running(conn, requeued, lease_in=600, worker="host:1:old")
    conn.execute(
        "UPDATE pgqueue.jobs SET state = 'queued', lease_token = NULL, lease_expires_at = NULL"
        " WHERE id = %s",
        (requeued,),
    )
    running = insert_job(conn, queue="q", task="t")
    make_running(conn, running, lease_in=600, worker="host:2:now")

    rows = {r["id"]: r for r in json.loads(ok(cli(dsn, "jobs", "list", "--json")))}
    assert rows[requeued]["leased_by"] is None
    assert rows[running]["leased_by"] == "host:2:now"
    # When the attempt under way began, to find the longest-running (the on-call review).
    assert rows[requeued]["started_at"] is None
    started = scalar(conn, "SELECT attempted_at FROM pgqueue.jobs WHERE id = %s", (running,))
    assert started is not None and rows[running]["started_at"] == started.isoformat()
    [only] = json.loads(ok(cli(dsn, "jobs", "list", "--state", "running", "--json")))
    assert (only["id"], only["started_at"]) == (running, started.isoformat())
    table = {int(r["id"]): r for r in parse_table(ok(cli(dsn, "jobs", "list")))}
    assert table[requeued]["leased_by"] == ""
    assert table[running]["leased_by"] == "host:2:now"


# --- 10. logs -----------------------------------------------------------------------------------


def test_worker_logs_json_lines_without_job_args_unless_asked(conn, daemons, tmp_path):
    fine = enqueue(conn, "record", {"note": "hunter2"})
    # Args that do not fit the handler: the error must not quote them either.
    bad = enqueue(conn, "fail", {"secret": "hunter2"}, max_attempts=2)
    worker, out, err = spawn_split(daemons, tmp_path, "pgqueue-worker", "--app", APP,
                                   "--log-format", "json")  # fmt: skip
    # Its retry waits out the deploy backoff (45 s at the least): made due now.
    wait_until(lambda: scalar(conn, "SELECT attempts FROM pgqueue.jobs WHERE id = %s", (bad,)))
    wait_until(lambda: job_state(conn, bad) == "queued")
    ok(cli(daemons.dsn, "run-now", str(bad)))
    wait_until(lambda: job_state(conn, fine) == "succeeded" and dead_row(conn, bad) is not None)

    def logged(event: str) -> list[dict[str, Any]]:
        return [e for e in json_lines(out.read_text()) if e["event"] == event]

    wait_until(lambda: logged("job.succeeded") and logged("job.dead"))
    assert terminate(worker) == 0
    assert err.read_text() == ""
    lines = json_lines(out.read_text())  # every line is JSON
    assert {
        "worker.started", "job.claimed", "job.succeeded", "job.retried", "job.dead",
        "worker.stopped",
    } <= {e["event"] for e in lines}  # fmt: skip
    [succeeded] = logged("job.succeeded")
    assert {k: succeeded[k] for k in ("job_id", "task", "queue", "attempt")} == {
        "job_id": fine, "task": "record", "queue": "default", "attempt": 1,
    }  # fmt: skip
    assert isinstance(succeeded["duration"], float) and succeeded["level"] == "info"
    [retried] = logged("job.retried")
    assert (retried["job_id"], retried["attempt"], retried["kind"]) == (bad, 1, "bad_args")
    [dead] = logged("job.dead")
    assert (dead["job_id"], dead["attempt"], dead["reason"]) == (bad, 2, "exhausted")
    # Claimed at the default level, with the job's fields and without its args.
    assert sorted((e["job_id"], e["attempt"], e["level"]) for e in logged("job.claimed")) == [
        (fine, 1, "info"), (bad, 1, "info"), (bad, 2, "info"),
    ]  # fmt: skip
    assert {(e["task"], e["queue"]) for e in logged("job.claimed")} == {
        ("record", "default"), ("fail", "default"),
    }  # fmt: skip
    assert "hunter2" not in out.read_text()
    assert all("args" not in e for e in lines)

    shown = enqueue(conn, "record", {"note": "hunter2"})
    verbose, out, err = spawn_split(daemons, tmp_path, "pgqueue-worker", "--app", APP,
                                    "--log-format", "json", "--log-args")  # fmt: skip
    wait_until(lambda: job_state(conn, shown) == "succeeded")
    assert terminate(verbose) == 0
    claimed = [e for e in json_lines(out.read_text()) if e["event"] == "job.claimed"]
    assert [(e["job_id"], e["args"], e["level"]) for e in claimed] == [
        (shown, {"note": "hunter2"}, "info")
    ]
    # Only job.claimed carries them.
    assert [e["event"] for e in json_lines(out.read_text()) if "args" in e] == ["job.claimed"]


def test_console_logs_do_not_show_a_jobs_args_in_tracebacks():
    # With rich installed (common in apps; a dev dependency here so that this runs),
    # structlog's console renderer printed every frame's locals: the Job, its args and
    # the handler's kwargs, in each job.internal_error or completer traceback.
    script = """
import datetime, uuid
import rich  # the case this is about: without it structlog prints plain tracebacks
from pgqueue.log import configure, get_logger
from pgqueue.models import Job
configure("info", "console")
now = datetime.datetime.now(datetime.UTC)
job = Job(7, "default", "t", {"password": "hunter2"}, 0, 1, 3, now, now, uuid.uuid4(), now)
def handler(**kwargs):
    raise ValueError("boom")
try:
    handler(**job.args)
except ValueError:
    get_logger("pgqueue.worker").exception("job.internal_error", job_id=job.id, job=job)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "job.internal_error" in out.stdout and "ValueError: boom" in out.stdout, out
    assert "hunter2" not in out.stdout + out.stderr


def test_library_log_records_are_json_lines_on_stdout_too(daemons, tmp_path):
    # psycopg's pool logs its failed connection attempts through the standard library's
    # logging: they must come out as the same JSON events, not plain text on stderr.
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    worker, out, err = spawn_split(daemons, tmp_path, "pgqueue-worker", "--app", APP,
                                   "--log-format", "json", "--dsn", unreachable)  # fmt: skip

    def pool_events() -> list[dict[str, Any]]:
        return [e for e in json_lines(out.read_text()) if e.get("logger") == "psycopg.pool"]

    [first, *_] = wait_until(pool_events)
    assert terminate(worker) == 0
    assert err.read_text() == ""
    assert first["level"] == "warning" and "error connecting" in first["event"], first
    json_lines(out.read_text())  # every line is JSON


def test_a_line_logged_in_the_middle_of_another_is_dropped_not_deadlocked():
    # What a signal handler that logs does when the signal lands while its thread
    # writes a line: it must neither wait for that thread's lock nor split the line.
    written: list[str] = []

    class Interrupted(io.StringIO):
        def write(self, text: str) -> int:
            written.append(text)
            if len(written) == 1:
                writer.msg("from a signal handler")
            return len(text)

    writer = _LineWriter(Interrupted())
    writer.msg("first")
    writer.msg("second")

    assert written == ["first\n", "second\n"]


def test_a_closed_stdout_is_reopened_only_on_the_file_it_was_open_on(tmp_path):
    # A handler's sys.stdout.close() dropped every later line. Reopening the descriptor
    # fixes that where it stays open (Python's stdout does not close it); where it was
    # closed with the file (a file of pgqueue's own, a test's capture), the next file or
    # socket the app opens takes its number, and must not get the lines (a review found
    # them in an app's file and its Postgres connection).
    kept = tmp_path / "stdout"
    fd = os.open(kept, os.O_WRONLY | os.O_CREAT)
    try:
        stdout_like = open(fd, "w", closefd=False)  # noqa: SIM115
        writer = _LineWriter(stdout_like)
        writer.msg("before")
        stdout_like.close()
        writer.msg("after")
    finally:
        os.close(fd)
    assert kept.read_text() == "before\nafter\n"

    own = open(tmp_path / "own", "w")  # noqa: SIM115
    number = own.fileno()
    writer = _LineWriter(own)
    own.close()
    with open(tmp_path / "apps", "w") as apps:
        assert apps.fileno() == number  # the lowest free number: the one just freed
        writer.msg('{"event": "must not land here"}')
        apps.write("the app's own\n")
    assert (tmp_path / "apps").read_text() == "the app's own\n"


def test_lines_logged_from_many_threads_arrive_whole():
    out = io.StringIO()
    writer = _LineWriter(out)

    def log_lines(n: int) -> None:
        for i in range(500):
            writer.msg(f"thread {n} line {i} " + "x" * 200)

    threads = [threading.Thread(target=log_lines, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    lines = out.getvalue().splitlines()
    assert len(lines) == 8 * 500
    assert all(line.endswith(" " + "x" * 200) for line in lines)
    assert {line.split(" line ")[0] for line in lines} == {f"thread {n}" for n in range(8)}


def test_the_apps_own_logging_set_up_is_left_alone():
    # configure() routes only the libraries' loggers; an app that calls basicConfig when
    # the worker imports it still gets its own INFO lines.
    code = (
        "import logging; from pgqueue import log; log.configure('info', 'json');"
        " logging.basicConfig(level=logging.INFO, format='%(name)s %(message)s');"
        " logging.getLogger('app').info('hello from the app')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr == "app hello from the app\n"


@pytest.mark.parametrize(
    ("sql", "missing"),
    [
        ("SELECT * FROM pgqueue.no_such_table", True),
        ("SELECT pgqueue.no_such_function()", True),
        ("SELECT 'queued'::pgqueue.no_such_type", True),
        # Errors in pgqueue's own queries that a migration would not cure keep their
        # tracebacks: the message quotes the query, but only the primary message counts.
        ("SELECT id FROM pgqueue.jobs WHERE id = gen_random_uuid()", False),
        ("SELECT no_such_column FROM pgqueue.jobs", False),
        ("SELECT pgqueue_no_such_function()", False),
        ("SELECT * FROM pgqueue_other.jobs", False),
        ("CREATE TABLE pgqueue_no_such_schema.t ()", False),
    ],
)
def test_only_a_missing_schema_gets_the_migrate_hint(dsn, sql, missing):
    with psycopg.connect(dsn, autocommit=True) as c, pytest.raises(psycopg.Error) as raised:
        c.execute(sql)

    assert schema_missing(raised.value) is missing, raised.value


class _Diag:
    def __init__(self, primary: str) -> None:
        self.message_primary = primary


class _ServerError(Exception):
    def __init__(self, sqlstate: str, primary: str) -> None:
        super().__init__(primary)
        self.sqlstate = sqlstate
        self.diag = _Diag(primary)


@pytest.mark.parametrize(
    ("sqlstate", "primary", "missing"),
    [
        ("3F000", 'schema "pgqueue" does not exist', True),
        ("3F000", 'schema "pgqueue_other" does not exist', False),
        # A server whose lc_messages is not English words and quotes its messages
        # differently; only the object's name can be relied on.
        ("42P01", "Relation »pgqueue.jobs« existiert nicht", True),
        ("3F000", "Schema »pgqueue« existiert nicht", True),
        ("42883", "Funktion pgqueue.enqueue(text) existiert nicht", True),
        ("42883", "Operator existiert nicht: pgqueue.job_state = uuid", False),
        ("42P01", "Relation »mypgqueue.jobs« existiert nicht", False),
        ("42704", "Typ »pgqueue.job_state« existiert nicht", True),
        ("42704", "Typ »pgqueue_job_state« existiert nicht", False),
    ],
)
def test_the_migrate_hint_does_not_depend_on_the_servers_language(sqlstate, primary, missing):
    assert schema_missing(_ServerError(sqlstate, primary)) is missing


# --- lease-lost accounting ----------------------------------------------------------------


async def handler_finished(worker: Worker, count: int = 1) -> None:
    """Wait until the attempts the worker runs (``count`` of them) have their outcomes
    queued for writing (handlers run in threads)."""
    for _ in range(1000):
        if worker.completer.pending >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the handler did not finish")


def expire_and_requeue(conn: psycopg.Connection[Any], dsn: str, job_id: int) -> None:
    """Expire the job's lease and let a reaper requeue it, as after a long outage."""
    conn.execute(
        "UPDATE pgqueue.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
        (job_id,),
    )
    reaper = Reaper(ReaperConfig(dsn=dsn))
    try:
        assert reaper.run_once().requeued == [job_id]
    finally:
        reaper.stop()
        reaper._close()


@contextlib.asynccontextmanager
async def stepped_worker(registry: Registry, dsn: str) -> AsyncIterator[Worker]:
    """An in-process worker with its pool open and its loops not started: the test
    drives its parts (claim, heartbeat, completer) one step at a time."""
    worker = Worker(registry, WorkerConfig(dsn=dsn, lease_seconds=5, concurrency=1))
    await worker.pool.open(wait=True)
    try:
        yield worker
    finally:
        await worker.pool.close()
        worker.executor.shutdown()


def held_until_released(task: str) -> tuple[Registry, asyncio.Event]:
    """A registry whose async task ``task`` runs until the returned event is set."""
    registry = Registry()
    release = asyncio.Event()

    async def wait_for_release() -> None:
        await release.wait()

    registry.task(name=task)(wait_for_release)
    return registry, release


def test_cancel_requests_bring_the_heartbeat_forward_but_not_without_pause(dsn):
    # Any session may send the notification that calls beat_soon: a flood of them makes
    # an early beat at most every min_gap (a tenth of the interval, at most 1 s).
    registry = Registry()
    registry.task(name="ops_noop")(lambda: None)

    async def scenario() -> int:
        worker = Worker(registry, WorkerConfig(dsn=dsn, lease_seconds=30, concurrency=1))
        heartbeat = worker.heartbeat
        assert (heartbeat.interval, heartbeat.min_gap) == (10.0, 1.0)
        beats = 0
        run_once = heartbeat.run_once

        async def counted() -> tuple[int, list[Job]]:
            nonlocal beats
            beats += 1
            return await run_once()

        heartbeat.run_once = counted  # type: ignore[method-assign]
        await worker.pool.open(wait=True)
        task = asyncio.create_task(heartbeat.run())
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 1.5
            while loop.time() < deadline:
                heartbeat.beat_soon()
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await worker.pool.close()
            worker.executor.shutdown()
        return beats

    # The first beat, then one a second later: not the next regular one (10 s), not one
    # per request (150).
    assert 2 <= asyncio.run(scenario()) <= 3


def test_a_cancel_that_lands_while_its_claim_is_on_the_way_still_reaches_the_handler(
    conn, dsn, monkeypatch
):
    # The cancel commits after the claim did but before the worker holds the job: the
    # beat the notification brings forward finds nothing to flag. The worker beats once
    # more when its jobs are held, not a regular interval later (20 s with a 60 s lease).
    registry = Registry()
    seen: list[float] = []

    @registry.task(name="ops_wait_cancel")
    def wait_cancel() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if current_job().cancel_requested:
                seen.append(time.monotonic())
                raise RuntimeError("cancelled")
            time.sleep(0.02)

    job_id = enqueue(conn, "ops_wait_cancel")
    real_claim = store.claim_jobs

    async def until(check: Callable[[], bool], seconds: float = 5.0) -> bool:
        for _ in range(int(seconds / 0.01)):
            if check():
                return True
            await asyncio.sleep(0.01)
        return check()

    async def claim_then_cancel(aconn: Any, **kwargs: Any) -> list[Job]:
        jobs = await real_claim(aconn, **kwargs)
        if any(j.id == job_id for j in jobs):
            # The worker claims at start, maybe before its listener listens: the cancel's
            # notification would be lost (the suite once saw "no notification").
            await asyncio.wait_for(worker.listener.connected.wait(), 10)
            requests, done = heartbeat.soon_requests, len(beats)
            assert store.cancel_job(conn, job_id=job_id) == "running"
            # Wait for the notification to reach the listener and for the beat it
            # brings forward, which runs while this claim's jobs are not yet held.
            assert await until(lambda: heartbeat.soon_requests > requests), "no notification"
            assert await until(lambda: len(beats) > done), "no early beat"
        return jobs

    worker = Worker(registry, WorkerConfig(dsn=dsn, lease_seconds=60, concurrency=1))
    heartbeat = worker.heartbeat
    beats: list[float] = []
    beat_once = heartbeat.run_once

    async def counted() -> tuple[int, list[Job]]:
        result = await beat_once()
        beats.append(time.monotonic())
        return result

    heartbeat.run_once = counted  # type: ignore[method-assign]
    monkeypatch.setattr(store, "claim_jobs", claim_then_cancel)

    async def scenario() -> str | None:
        run = asyncio.create_task(worker.run(handle_signals=False))
        try:
            await until(lambda: job_state(conn, job_id) == "cancelled", 10.0)
            return job_state(conn, job_id)  # before the stop, which ends the wait too
        finally:
            worker.stop()
            await asyncio.wait_for(run, 30)

    assert asyncio.run(scenario()) == "cancelled"
    assert len(seen) == 1


def test_a_stopped_worker_claims_nothing_even_with_a_claim_under_way(conn, dsn):
    # The stop may come while the fetcher waits for the claim lock, a connection or the
    # rescue check: what it then sends must not claim (SIGTERM stops claiming). A
    # rescued job waiting counts too: it takes the other claim statement.
    registry = Registry()
    registry.task(name="ops_noop")(lambda: None)
    plain = enqueue(conn, "ops_noop")
    rescued = enqueue(conn, "ops_noop")
    conn.execute("UPDATE pgqueue.jobs SET rescued = true WHERE id = %s", (rescued,))

    async def scenario() -> list[int]:
        async with stepped_worker(registry, dsn) as worker:
            worker.stop()
            return [j.id for j in await worker.run_once()]

    assert asyncio.run(scenario()) == []
    assert {job_state(conn, plain), job_state(conn, rescued)} == {"queued"}


def test_a_lost_lease_is_counted_once_when_found_before_the_outcome_is_written(conn, dsn):
    registry = Registry()

    @registry.task(name="ops_noop")
    def noop() -> None:
        pass

    job_id = enqueue(conn, "ops_noop")

    async def scenario() -> None:
        # The worker's own parts, driven one step at a time in the order an outage
        # produces: the attempt ends but its outcome is not written yet (the completer
        # is not running, as when its connection is down), the lease expires and the
        # reaper requeues the job, then the heartbeat runs before the completer does.
        async with stepped_worker(registry, dsn) as worker:
            assert [j.id for j in await worker.run_once()] == [job_id]
            await handler_finished(worker)
            assert worker.completer.pending == 1
            expire_and_requeue(conn, dsn, job_id)
            # Its outcome waits in the completer: the heartbeat leaves it to the write,
            # which is fenced off and reports the lost lease.
            _, lost_jobs = await worker.heartbeat.run_once()
            assert lost_jobs == []
            assert await worker.completer.run_once() == 1  # fenced: nothing written

    runs_with_one_lost_lease(conn, job_id, "ops_noop", scenario)


def test_the_heartbeat_reports_the_lost_lease_of_a_job_still_running(conn, dsn):
    # The other side of leaving pending outcomes to the completer: a handler still
    # running has no outcome there, so only the heartbeat can find its lease gone; its
    # result is then dropped, and the loss counted once.
    registry, release = held_until_released("ops_still_running")
    job_id = enqueue(conn, "ops_still_running")

    async def scenario() -> None:
        async with stepped_worker(registry, dsn) as worker:
            assert [j.id for j in await worker.run_once()] == [job_id]
            expire_and_requeue(conn, dsn, job_id)
            _, lost_jobs = await worker.heartbeat.run_once()
            assert [j.id for j in lost_jobs] == [job_id]
            assert job_id not in held_ids(worker)
            release.set()
            for _ in range(500):
                if not worker._running:
                    break
                await asyncio.sleep(0.01)
            assert worker.completer.pending == 0  # its result is dropped, not written

    runs_with_one_lost_lease(conn, job_id, "ops_still_running", scenario)


def test_a_lost_lease_whose_outcome_is_written_during_the_beat_is_counted_once(conn, dsn):
    # The heartbeat decides which leases are lost, then registers the worker (a round
    # trip) before it reports them. Meanwhile the handler ended and the completer found
    # its write fenced off and reported the loss: the heartbeat counted and logged it a
    # second time, and left an entry in the worker's lost set for good.
    registry, release = held_until_released("ops_lost_twice")
    job_id = enqueue(conn, "ops_lost_twice")

    async def scenario() -> None:
        async with stepped_worker(registry, dsn) as worker:
            completer = asyncio.create_task(worker.completer.run())
            register = worker.heartbeat.register

            async def register_while_the_outcome_is_written(c: Any) -> None:
                release.set()
                for _ in range(500):
                    if not worker._held:
                        break
                    await asyncio.sleep(0.01)
                assert not worker._held, "the completer did not report the outcome"
                await register(c)

            try:
                assert [j.id for j in await worker.run_once()] == [job_id]
                expire_and_requeue(conn, dsn, job_id)
                worker.heartbeat.register = register_while_the_outcome_is_written
                await worker.heartbeat.run_once()
                assert worker._lost == set()
            finally:
                completer.cancel()

    runs_with_one_lost_lease(conn, job_id, "ops_lost_twice", scenario)


class CommitReplyCutter:
    """A TCP proxy in front of Postgres. Armed with a marker, it passes the next client
    message that contains it, lets the server run it to the end (its ReadyForQuery: the
    implicit transaction has committed), then drops that reply and closes both sides. The
    client sees its connection die without knowing that its statement committed. With
    ``before`` set it closes both sides instead of passing the message on; with ``hold``
    set it keeps the committed reply until that event is set, then delivers it."""

    @classmethod
    async def in_front_of(cls, dsn: str) -> tuple[CommitReplyCutter, str]:
        """A started proxy to ``dsn``'s server, and the DSN that goes through it."""
        info = psycopg.conninfo.conninfo_to_dict(dsn)
        proxy = cls(str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432))
        port = await proxy.start()
        return proxy, make_conninfo(dsn, host="127.0.0.1", port=port)

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.marker: bytes | None = None
        # Cut before the server sees the marked message instead (nothing runs).
        self.before = False
        # Delay the committed reply until this is set, instead of cutting it.
        self.hold: asyncio.Event | None = None
        self.cuts = 0
        self.held = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(self.host, self.port)
        cutting = False

        async def upstream() -> None:
            nonlocal cutting
            while data := await client_r.read(65536):
                if self.marker is not None and self.marker in data:
                    self.marker = None
                    if self.before:
                        self.cuts += 1
                        return
                    cutting = True
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            nonlocal cutting
            reply = b""
            while data := await server_r.read(65536):
                if not cutting:
                    client_w.write(data)
                    await client_w.drain()
                    continue
                reply += data
                if reply[-6:-1] != b"Z\x00\x00\x00\x05":  # ReadyForQuery: committed
                    continue
                if self.hold is None:
                    self.cuts += 1
                    break
                self.held += 1
                await self.hold.wait()
                client_w.write(reply)
                await client_w.drain()
                reply, cutting = b"", False
            for writer in (client_w, server_w):
                writer.close()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        self._tasks.update(tasks)
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for writer in (client_w, server_w):
            writer.close()


def noop_job(conn: psycopg.Connection[Any], task: str) -> tuple[Registry, int]:
    """A registry with one no-op task of that name, and one job of it enqueued."""
    registry = Registry()
    registry.task(name=task)(lambda: None)
    return registry, enqueue(conn, task)


def completed(task: str, outcome: str) -> float:
    """pgqueue_jobs_completed_total for a task of the default queue, in this process."""
    labels = {"queue": "default", "task": task, "outcome": outcome}
    return REGISTRY.get_sample_value("pgqueue_jobs_completed_total", labels) or 0.0


@contextlib.asynccontextmanager
async def proxied_worker(
    registry: Registry, dsn: str, concurrency: int = 1
) -> AsyncIterator[tuple[Worker, CommitReplyCutter]]:
    """An in-process worker (its loops not started) whose connections go through a
    CommitReplyCutter."""
    proxy, proxied = await CommitReplyCutter.in_front_of(dsn)
    worker = Worker(registry, WorkerConfig(dsn=proxied, lease_seconds=5, concurrency=concurrency))
    await worker.pool.open(wait=True)
    try:
        yield worker, proxy
    finally:
        await worker.pool.close()
        worker.executor.shutdown()
        await proxy.close()


def runs_with_one_lost_lease(
    conn: psycopg.Connection[Any],
    job_id: int,
    task: str,
    scenario: Callable[[], Coroutine[Any, Any, None]],
) -> None:
    """Run the scenario: the job ends requeued, its lease counted lost exactly once and
    its attempt never counted as succeeded."""
    lost, succeeded = completed(task, "lease_lost"), completed(task, "succeeded")
    asyncio.run(scenario())
    assert job_state(conn, job_id) == "queued"
    assert completed(task, "lease_lost") - lost == 1
    assert completed(task, "succeeded") == succeeded


class _Fails(Exception):
    pass


RETRY_MARK = b"errors = j.errors || jsonb_build_array(r.error)"
DEAD_MARK = b"INSERT INTO pgqueue.dead_jobs"
# (what the handler does, whether a cancel is requested while it runs, a text only that
# outcome's statement sends, the job's state after it, the outcome label, the history's
# last entry, where the row ends up)
CUT_OUTCOMES = [
    ("return", False, b"SET state = 'succeeded'", "succeeded", "succeeded", "succeeded", "jobs"),
    ("raise", False, RETRY_MARK, "queued", "retried", "retried", "jobs"),
    ("permanent", False, DEAD_MARK, None, "dead", "dead", "dead_jobs"),
    # The dead-letter table held the job's id: stored under a new one (migration 0023),
    # found by its original_id.
    ("permanent", False, DEAD_MARK, None, "dead", "dead", "dead_jobs_renamed"),
    ("snooze", False, b"'snoozed')", "queued", "snoozed", "snoozed", "jobs"),
    ("raise", True, RETRY_MARK, "cancelled", "failed", "failed", "jobs"),
    ("permanent", True, DEAD_MARK, "cancelled", "failed", "failed", "jobs"),
    ("snooze", True, b"'snoozed')", "cancelled", "cancelled", "snoozed", "jobs"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("does", "cancel", "marker", "after", "label", "entry", "table"), CUT_OUTCOMES
)
def test_an_outcome_whose_commit_reply_was_lost_is_reported_written_not_lease_lost(
    conn, dsn, does, cancel, marker, after, label, entry, table
):
    registry = Registry()
    task_name = f"ops_cut_{does}" + ("_cancelled" if cancel else "")

    @registry.task(name=task_name)
    def task() -> None:
        if does == "raise":
            raise _Fails("again")
        if does == "permanent":
            raise PermanentError("never")
        if does == "snooze":
            raise Snooze(60)

    job_id = enqueue(conn, task_name)
    if table == "dead_jobs_renamed":
        conn.execute(
            "INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts,"
            " max_attempts, run_at, created_at, reason)"
            " VALUES (%s, 'default', 'older', '{}', 0, 1, 1, now(), now(), 'permanent')",
            (job_id,),
        )

    async def scenario() -> None:
        async with proxied_worker(registry, dsn) as (worker, proxy):
            assert [j.id for j in await worker.run_once()] == [job_id]
            await handler_finished(worker)
            assert worker.completer.pending == 1
            if cancel:
                assert store.cancel_job(conn, job_id=job_id) == "running"  # flagged
            # The outcome commits, and its connection dies before the reply arrives. (The
            # marker is in the statement's text, which psycopg sends with each of its
            # first five runs on a connection; this worker's pool has run none yet.)
            proxy.marker = marker
            with pytest.raises(psycopg.OperationalError):
                await worker.completer.run_once()
            assert proxy.cuts == 1
            assert job_state(conn, job_id) == after
            # The heartbeat finds the lease gone, cleared by the outcome's own write: the
            # outcome waits in the completer, so it is not reported lost, and the job
            # stays held until the completer knows.
            (job,) = (j for j in worker._held if j.id == job_id)
            _, gone = await worker.heartbeat.run_once()
            assert gone == []
            assert job_id in held_ids(worker)
            # The retry is fenced off by the first write; the history shows it landed.
            assert await worker.completer.run_once() == 1
            assert job_id not in held_ids(worker)
            assert not worker.completer.uncertain(job)

    lost_before, written_before = completed(task_name, "lease_lost"), completed(task_name, label)
    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())
    assert completed(task_name, "lease_lost") == lost_before
    assert completed(task_name, label) == written_before + 1
    if table == "dead_jobs_renamed":
        history = scalar(
            conn, "SELECT history FROM pgqueue.dead_jobs WHERE original_id = %s", (job_id,)
        )
        # The check that found the write also found the dead id job.dead names.
        dead_id = scalar(conn, "SELECT id FROM pgqueue.dead_jobs WHERE original_id = %s", (job_id,))
        (event,) = [e for e in logs if e["event"] == "job.dead"]
        assert (event["job_id"], event["dead_id"]) == (job_id, dead_id)
    else:
        history = scalar(
            conn,
            sql.SQL("SELECT history FROM {} WHERE id = %s").format(
                sql.Identifier("pgqueue", table)
            ),
            (job_id,),
        )
    assert [(e["attempt"], e["outcome"]) for e in history] == [(1, entry)]


def mixed_registry(prefix: str) -> Registry:
    """Tasks '<prefix>_ok' (returns) and '<prefix>_fail' (raises: retried)."""
    registry = Registry()
    registry.task(name=f"{prefix}_ok")(lambda: None)

    @registry.task(name=f"{prefix}_fail")
    def fail() -> None:
        raise _Fails("again")

    return registry


@pytest.mark.parametrize("landed", [True, False], ids=["commit-reply-lost", "commit-not-sent"])
def test_a_batch_of_two_kinds_cut_at_its_commit_is_reported_once_as_written(conn, dsn, landed):
    """Outcomes of different kinds go out in one transaction (BEGIN, one statement per
    kind, COMMIT). Its connection dies at the COMMIT: either the COMMIT landed and only its
    reply was lost (the retry is fenced off, and the history shows both were written), or
    it never reached the server (everything rolled back, and the retry writes both).
    Either way each outcome is counted once, as what it was, and no lease is lost."""
    prefix = "ops_mix_landed" if landed else "ops_mix_unsent"
    registry = mixed_registry(prefix)
    ok_id, fail_id = enqueue(conn, f"{prefix}_ok"), enqueue(conn, f"{prefix}_fail")

    async def scenario() -> None:
        async with proxied_worker(registry, dsn, concurrency=2) as (worker, proxy):
            assert {j.id for j in await worker.run_once()} == {ok_id, fail_id}
            await handler_finished(worker, 2)
            proxy.marker, proxy.before = b"COMMIT", not landed
            with pytest.raises(psycopg.OperationalError):
                await worker.completer.run_once()
            assert proxy.cuts == 1
            expected = ("succeeded", "queued") if landed else ("running", "running")
            assert (job_state(conn, ok_id), job_state(conn, fail_id)) == expected
            assert await worker.completer.run_once() == 2
            assert worker._held == {}

    before = {
        (task, outcome): completed(f"{prefix}_{task}", outcome)
        for task in ("ok", "fail")
        for outcome in ("succeeded", "retried", "lease_lost")
    }
    asyncio.run(scenario())
    after = {key: completed(f"{prefix}_{key[0]}", key[1]) - n for key, n in before.items()}
    assert after == {
        ("ok", "succeeded"): 1,
        ("ok", "retried"): 0,
        ("ok", "lease_lost"): 0,
        ("fail", "succeeded"): 0,
        ("fail", "retried"): 1,
        ("fail", "lease_lost"): 0,
    }
    assert (job_state(conn, ok_id), job_state(conn, fail_id)) == ("succeeded", "queued")
    assert history_outcomes(conn, ok_id) == [(1, "succeeded")]
    assert history_outcomes(conn, fail_id) == [(1, "retried")]


def test_a_release_whose_commit_reply_was_lost_is_reported_released_not_lease_lost(conn, dsn):
    """A job handed back at shutdown (released: requeued now, its attempt given back)
    whose write committed and whose reply was lost."""
    registry = Registry()
    started: list[asyncio.Event] = []

    @registry.task(name="ops_cut_release")
    async def task() -> None:
        started[0].set()
        await asyncio.sleep(3600)

    job_id = enqueue(conn, "ops_cut_release")

    async def scenario() -> None:
        async with proxied_worker(registry, dsn) as (worker, proxy):
            started.append(asyncio.Event())
            assert [j.id for j in await worker.run_once()] == [job_id]
            await asyncio.wait_for(started[0].wait(), 10)
            # What shutdown does to a handler it gives up: mark the job released, cancel.
            (job,) = (j for j in worker._held if j.id == job_id)
            worker.executor.release(job)
            running_task(worker, job_id).cancel()
            await handler_finished(worker)
            proxy.marker = b"'released')"  # release_jobs' text
            with pytest.raises(psycopg.OperationalError):
                await worker.completer.run_once()
            assert proxy.cuts == 1
            assert job_state(conn, job_id) == "queued"
            _, gone = await worker.heartbeat.run_once()
            assert gone == []  # its outcome waits in the completer
            assert job_id in held_ids(worker)
            assert await worker.completer.run_once() == 1
            assert job_id not in held_ids(worker)

    lost, released = (
        completed("ops_cut_release", "lease_lost"),
        completed("ops_cut_release", "released"),
    )
    asyncio.run(scenario())
    assert completed("ops_cut_release", "lease_lost") == lost
    assert completed("ops_cut_release", "released") == released + 1
    row = job_row(conn, job_id)
    assert row is not None and (row["state"], row["attempts"]) == ("queued", 0)
    assert history_outcomes(conn, job_id) == [(1, "released")]


def test_a_lost_lease_is_still_reported_when_a_cut_write_had_not_landed(conn, dsn):
    """The other side of the check above: the write died before the server saw it, and
    meanwhile the lease expired and the reaper requeued the job: fenced, lease lost, and
    counted once although both the heartbeat and the completer meet it."""
    registry, job_id = noop_job(conn, "ops_cut_lost")

    async def scenario() -> None:
        async with proxied_worker(registry, dsn) as (worker, proxy):
            assert [j.id for j in await worker.run_once()] == [job_id]
            await handler_finished(worker)
            proxy.marker, proxy.before = b"SET state = 'succeeded'", True
            with pytest.raises(psycopg.OperationalError):
                await worker.completer.run_once()
            assert proxy.cuts == 1
            assert job_state(conn, job_id) == "running"
            expire_and_requeue(conn, dsn, job_id)
            _, gone = await worker.heartbeat.run_once()
            assert gone == []  # left to the completer, whose outcome it is
            assert await worker.completer.run_once() == 1  # fenced, and not recorded
            assert job_id not in held_ids(worker)

    runs_with_one_lost_lease(conn, job_id, "ops_cut_lost", scenario)


def test_a_lost_lease_is_reported_although_an_earlier_claim_had_the_same_attempt(conn, dsn):
    """Attempt numbers repeat (a snooze or a release does not count its attempt): the
    history check must tell this claim's entry from an earlier claim's entry of the same
    worker and attempt, even one with the very same duration."""
    registry = Registry()
    runs: list[int] = []

    @registry.task(name="ops_cut_again")
    def task() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise Snooze(0)

    job_id = enqueue(conn, "ops_cut_again")

    async def scenario() -> None:
        async with proxied_worker(registry, dsn) as (worker, proxy):
            (first,) = await worker.run_once()
            await handler_finished(worker)
            assert await worker.completer.run_once() == 1  # snoozed: attempt not counted
            (second,) = await worker.run_once()
            assert second.attempt == first.attempt == 1
            await handler_finished(worker)
            # The same duration as the snoozed attempt's entry: only the claim tells
            # the two entries apart.
            (outcome,) = worker.completer._pending
            snoozed = scalar(conn, "SELECT history->0 FROM pgqueue.jobs WHERE id = %s", (job_id,))
            assert snoozed["outcome"] == "snoozed" and snoozed["worker"] == worker.worker_id
            worker.completer._pending = [dataclasses.replace(outcome, duration=snoozed["duration"])]
            proxy.marker, proxy.before = b"SET state = 'succeeded'", True
            with pytest.raises(psycopg.OperationalError):
                await worker.completer.run_once()
            expire_and_requeue(conn, dsn, job_id)
            assert await worker.completer.run_once() == 1  # fenced, and not recorded

    runs_with_one_lost_lease(conn, job_id, "ops_cut_again", scenario)


def history_outcomes(conn: psycopg.Connection[Any], job_id: int) -> list[tuple[int, str]]:
    history = scalar(conn, "SELECT history FROM pgqueue.jobs WHERE id = %s", (job_id,))
    return [(e["attempt"], e["outcome"]) for e in history]


def test_a_claim_whose_reply_was_lost_is_released_at_the_next_heartbeat(conn, dsn):
    """The claim commits but its reply is lost: the job runs under this worker's name, and
    the worker does not know it. Its next heartbeat returns it to the queue, uncounted,
    instead of leaving it to expire and then run alone as a rescued job."""
    registry = Registry()
    ran: list[int] = []

    @registry.task(name="ops_orphan")
    def task() -> None:
        ran.append(1)

    job_id = enqueue(conn, "ops_orphan")

    async def scenario() -> None:
        async with proxied_worker(registry, dsn) as (worker, proxy):
            proxy.marker = b"SET state = 'running'"  # claim_jobs' text (first run)
            with pytest.raises(psycopg.OperationalError):
                await worker.run_once()
            assert proxy.cuts == 1
            row = job_row(conn, job_id)
            assert row is not None
            assert (row["state"], row["leased_by"], row["attempts"]) == (
                "running",
                worker.worker_id,
                1,
            )
            assert worker._held == {}
            await worker.heartbeat.run_once()
            row = job_row(conn, job_id)
            assert row is not None
            assert (row["state"], row["attempts"], row["rescued"]) == ("queued", 0, False)
            assert row["lease_token"] is None
            assert history_outcomes(conn, job_id) == [(1, "orphaned")]
            # And it runs normally from there, its first counted attempt.
            assert [(j.id, j.attempt) for j in await worker.run_once()] == [(job_id, 1)]
            await handler_finished(worker)
            assert await worker.completer.run_once() == 1

    asyncio.run(scenario())
    assert ran == [1]
    assert job_state(conn, job_id) == "succeeded"
    assert history_outcomes(conn, job_id) == [(1, "orphaned"), (1, "succeeded")]


def test_a_job_orphaned_twice_in_a_row_is_left_to_the_reaper(conn, dsn):
    """A claim that keeps failing after its commit must not loop uncounted: the second
    time in a row, the orphan waits for its lease and the reaper (which isolates it and
    counts its attempts)."""
    registry, job_id = noop_job(conn, "ops_orphan_twice")

    async def scenario() -> None:
        async with proxied_worker(registry, dsn) as (worker, proxy):
            for _ in range(2):
                proxy.marker = b"SET state = 'running'"
                with pytest.raises(psycopg.OperationalError):
                    await worker.run_once()
                await worker.heartbeat.run_once()
            assert proxy.cuts == 2

    asyncio.run(scenario())
    row = job_row(conn, job_id)
    assert row is not None
    assert (row["state"], row["attempts"]) == ("running", 1)
    assert history_outcomes(conn, job_id) == [(1, "orphaned")]
    expire_and_requeue(conn, dsn, job_id)
    row = job_row(conn, job_id)
    assert row is not None and row["state"] == "queued" and row["rescued"] is True


def test_a_claim_in_flight_is_not_taken_for_an_orphan(conn, dsn):
    """The claim has committed and its reply is on its way when the heartbeat runs: the
    job runs under this worker's name and is not held yet. The heartbeat still extends
    the leases it holds, and leaves the claim's jobs alone."""
    registry, job_id = noop_job(conn, "ops_in_flight")

    async def scenario() -> None:
        async with proxied_worker(registry, dsn) as (worker, proxy):
            proxy.marker, proxy.hold = b"SET state = 'running'", asyncio.Event()
            claim = asyncio.create_task(worker.run_once())
            for _ in range(1000):
                if proxy.held:
                    break
                await asyncio.sleep(0.01)
            assert proxy.held == 1 and job_state(conn, job_id) == "running"
            assert worker._held == {}
            await worker.heartbeat.run_once()
            assert job_state(conn, job_id) == "running"
            proxy.hold.set()
            assert [j.id for j in await claim] == [job_id]
            await handler_finished(worker)
            assert await worker.completer.run_once() == 1

    asyncio.run(scenario())
    assert job_state(conn, job_id) == "succeeded"
    assert history_outcomes(conn, job_id) == [(1, "succeeded")]


def test_the_heartbeat_releases_no_job_it_holds_or_another_worker_runs(conn, dsn):
    registry = Registry()
    release = threading.Event()

    @registry.task(name="ops_busy")
    def task() -> None:
        release.wait(10)

    ids = [enqueue(conn, "ops_busy") for _ in range(3)]

    async def scenario() -> None:
        config = WorkerConfig(dsn=dsn, lease_seconds=5, concurrency=2)
        mine, other = Worker(registry, config), Worker(registry, config)
        await mine.pool.open(wait=True)
        await other.pool.open(wait=True)
        try:
            held = {j.id for j in await mine.run_once()}
            others = {j.id for j in await other.run_once()}
            assert len(held) == 2 and len(others) == 1
            for worker in (mine, other):
                await worker.heartbeat.run_once()
            running = conn.execute(
                "SELECT id, leased_by FROM pgqueue.jobs WHERE state = 'running'"
            ).fetchall()
            assert {r[0] for r in running} == set(ids)
            assert {r[0] for r in running if r[1] == mine.worker_id} == held
        finally:
            release.set()
            for worker in (mine, other):
                await worker.pool.close()
                worker.executor.shutdown()

    asyncio.run(scenario())


def test_the_heartbeat_releases_orphans_while_the_worker_claims_back_to_back(conn, dsn):
    """Draining a backlog, the fetcher claims again the moment a claim ends; the heartbeat
    must still get its turn at the claim lock and release this worker's orphans then,
    not only once the backlog is gone."""
    registry = Registry()

    @registry.task(name="ops_backlog")
    async def task() -> None:
        return None

    enqueue_many(conn, [JobSpec("ops_backlog") for _ in range(60_000)])
    # In a queue this worker does not serve, so that once released it stays queued.
    orphan = enqueue(conn, "ops_backlog", queue="ops_elsewhere")

    async def scenario() -> int:
        config = WorkerConfig(dsn=dsn, lease_seconds=1.5, concurrency=100, queues=["default"])
        worker = Worker(registry, config, worker_id="ops-backlog-worker")
        run = asyncio.create_task(worker.run(handle_signals=False))
        try:
            succeeded = "SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded'"
            await asyncio.to_thread(wait_until, lambda: scalar(conn, succeeded) >= 1000, 15)
            # Now it claims back to back: make a job look claimed by this worker (a claim
            # whose reply was lost), leased for an hour.
            conn.execute(
                "UPDATE pgqueue.jobs SET state = 'running', attempts = 1,"
                " leased_by = 'ops-backlog-worker', lease_token = gen_random_uuid(),"
                " lease_expires_at = now() + interval '1 hour', attempted_at = now()"
                " WHERE id = %s",
                (orphan,),
            )
            await asyncio.to_thread(wait_until, lambda: job_state(conn, orphan) == "queued", 15)
            left: int = scalar(
                conn,
                "SELECT count(*) FROM pgqueue.jobs WHERE queue = 'default'"
                " AND state <> 'succeeded'",
            )
        finally:
            worker.stop()
            await asyncio.wait_for(run, 30)
        return left

    left = asyncio.run(scenario())
    assert job_state(conn, orphan) == "queued"
    assert history_outcomes(conn, orphan) == [(1, "orphaned")]
    assert left > 0, "the orphan was released only after the backlog was gone"


def refuse_success_of(conn: psycopg.Connection[Any], task: str) -> None:
    """Make the database refuse (raise on) marking jobs of ``task`` succeeded."""
    conn.execute(
        sql.SQL(
            """
            CREATE FUNCTION public.refuse_success() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.state = 'succeeded' AND OLD.task = {} THEN
                    RAISE EXCEPTION 'refused for the test';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_success BEFORE UPDATE ON pgqueue.jobs
                FOR EACH ROW EXECUTE FUNCTION public.refuse_success();
            """
        ).format(sql.Literal(task))
    )


def test_a_job_whose_outcome_the_database_refused_is_left_to_the_reaper(conn, dsn):
    """A refused outcome (not a connection problem) is dropped and its lease left to
    expire, so that the reaper counts the attempt: the heartbeat must not release that
    job as an orphan, which would not count it, again and again."""
    refuse_success_of(conn, "ops_refused")
    registry, job_id = noop_job(conn, "ops_refused")

    async def scenario() -> None:
        worker = Worker(registry, WorkerConfig(dsn=dsn, lease_seconds=5, concurrency=1))
        await worker.pool.open(wait=True)
        try:
            await worker.run_once()
            await handler_finished(worker)
            with pytest.raises(psycopg.errors.RaiseException):
                await worker.completer.run_once()
            await worker.completer._write_singly()  # as the run loop does: refused, dropped
            assert worker._held == {}
            await worker.heartbeat.run_once()
        finally:
            await worker.pool.close()
            worker.executor.shutdown()

    asyncio.run(scenario())
    row = job_row(conn, job_id)
    assert row is not None
    assert (row["state"], row["attempts"]) == ("running", 1)
    assert history_outcomes(conn, job_id) == []


# --- 11. unreachable database, bad DSN, busy port -------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("stats",),
        ("jobs", "list"),
        ("status", "1"),
        ("cancel", "1"),
        ("dead", "list"),
        ("dead", "retry", "--all"),
        ("dead", "purge"),
        ("queue", "pause", "q"),
        ("workers", "--json"),
    ],
)
def test_admin_commands_report_an_unreachable_database_in_one_line(args):
    result = cli(None, *args, "--dsn", UNREACHABLE_DSN)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "cannot reach the database" in one_line_error(result)


def test_admin_commands_without_a_dsn_exit_2_with_one_line():
    result = cli(None, "stats")
    assert result.returncode == 2
    assert "PGQUEUE_DSN" in one_line_error(result)


def test_admin_command_with_a_malformed_dsn_exits_with_one_line():
    result = cli(None, "stats", "--dsn", "not a dsn")
    assert result.returncode != 0
    one_line_error(result)


def test_worker_with_a_busy_metrics_port_exits_with_one_line(dsn, daemons):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        worker = daemons.worker("--metrics-port", str(port), *LOCAL)
        code = worker.wait(timeout=30)
    output = Daemons.output(worker)
    assert code != 0
    assert "Traceback" not in output, output


def test_one_refused_outcome_does_not_hold_back_the_others_of_its_batch(conn, dsn):
    """The run loop writes a refused batch again one outcome at a time: the others of the
    batch (of both kinds) are written and counted, the refused one is dropped and its job
    left running for the reaper."""
    refuse_success_of(conn, "ops_refused_one")
    registry = mixed_registry("ops_refused_batch")
    registry.task(name="ops_refused_one")(lambda: None)
    refused = enqueue(conn, "ops_refused_one")
    ok_id = enqueue(conn, "ops_refused_batch_ok")
    fail_id = enqueue(conn, "ops_refused_batch_fail")

    async def scenario() -> None:
        config = WorkerConfig(dsn=dsn, lease_seconds=5, concurrency=3)
        worker = Worker(registry, config)
        await worker.pool.open(wait=True)
        try:
            tokens = {j.id: j.lease_token for j in await worker.run_once()}
            assert set(tokens) == {refused, ok_id, fail_id}
            await handler_finished(worker, 3)
            worker.completer._pending.sort(key=lambda o: o.job.id != refused)  # refused first
            loop = asyncio.create_task(worker.completer.run())
            try:
                for _ in range(1000):
                    if not worker.completer.pending and not worker._held:
                        break
                    await asyncio.sleep(0.01)
            finally:
                loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop
            assert worker._held == {}
            # Kept so that the heartbeat does not take the refused job for an orphan.
            assert list(worker._refused) == [tokens[refused]]
        finally:
            await worker.pool.close()
            worker.executor.shutdown()

    counts = [
        completed("ops_refused_batch_ok", "succeeded"),
        completed("ops_refused_batch_fail", "retried"),
    ]
    asyncio.run(scenario())
    assert [
        completed("ops_refused_batch_ok", "succeeded") - counts[0],
        completed("ops_refused_batch_fail", "retried") - counts[1],
    ] == [1, 1]
    assert (job_state(conn, ok_id), job_state(conn, fail_id)) == ("succeeded", "queued")
    row = job_row(conn, refused)
    assert row is not None and (row["state"], row["attempts"]) == ("running", 1)
    assert history_outcomes(conn, refused) == []


def test_dead_retry_of_an_id_pgqueue_jobs_holds_revives_it_under_a_new_id(conn, dsn):
    # Ids repeat after an explicit id in an INSERT or a sequence reset. The revived job's
    # insert failed on the primary key, and the whole batch with it (`--all` too).
    first, second, third = (insert_dead(conn) for _ in range(3))
    conn.execute("INSERT INTO pgqueue.jobs (id, task) VALUES (%s, 'record')", (second,))

    result = cli(dsn, "dead", "retry", "--all")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "retried 3 dead job(s)"
    (note,) = result.stderr.strip().splitlines()
    renumbered = int(note.split(" is back as job ")[1].split()[0])
    assert note == (
        f"pgqueue: dead job {second} is back as job {renumbered} (pgqueue.jobs holds id {second})"
    )
    assert renumbered > third
    assert scalar(conn, "SELECT count(*) FROM pgqueue.dead_jobs") == 0
    states = dict(conn.execute("SELECT id, state::text FROM pgqueue.jobs").fetchall())
    assert states == {first: "queued", second: "queued", third: "queued", renumbered: "queued"}
    assert scalar(conn, "SELECT task FROM pgqueue.jobs WHERE id = %s", (second,)) == "record"
    assert scalar(conn, "SELECT task FROM pgqueue.jobs WHERE id = %s", (renumbered,)) == "fail"


def test_dead_retry_of_a_job_the_jobs_table_now_refuses_names_it_and_moves_nothing(conn, dsn):
    # A dead job stored before migration 0025 with a task of white space alone failed the
    # bulk move with a bare constraint error naming no job.
    good = insert_dead(conn)
    blank = insert_dead(conn, task="\xa0")

    result = cli(dsn, "dead", "retry", "--all")

    assert result.returncode == 1, result.stderr
    assert result.stdout.strip() == "retried 0 dead job(s)"
    assert f"dead job {blank} cannot go back to pgqueue.jobs: jobs_task_not_blank" in (
        result.stderr
    )
    assert "Delete it with SQL (its row in pgqueue.dead_jobs)" in result.stderr
    assert sorted(r[0] for r in conn.execute("SELECT id FROM pgqueue.dead_jobs")) == [good, blank]
    assert scalar(conn, "SELECT count(*) FROM pgqueue.jobs") == 0
    conn.execute("DELETE FROM pgqueue.dead_jobs WHERE id = %s", (blank,))
    assert cli(dsn, "dead", "retry", "--all").returncode == 0


def test_dead_retry_refused_in_a_later_batch_reports_the_batches_it_revived(conn, dsn):
    # The batches before the refused one are revived: their summary, and the job that
    # came back under a new id, were not printed. The refused job, itself back under a
    # new id, is not named by that id (no table holds it).
    first = [insert_dead(conn) for _ in range(1000)]
    conn.execute("INSERT INTO pgqueue.jobs (id, task) VALUES (%s, 'record')", (first[0],))
    blank = insert_dead(conn, task="\xa0")
    conn.execute("INSERT INTO pgqueue.jobs (id, task) VALUES (%s, 'record')", (blank,))

    result = cli(dsn, "dead", "retry", "--all")

    assert result.returncode == 1, result.stderr
    assert result.stdout.strip() == "retried 1000 dead job(s)"
    assert f"pgqueue: dead job {first[0]} is back as job " in result.stderr
    (refusal,) = [line for line in result.stderr.splitlines() if "cannot go back" in line]
    assert refusal.startswith("pgqueue: a dead job (Failing row contains ("), refusal
    assert "jobs_task_not_blank refuses it" in refusal
    assert scalar(conn, "SELECT count(*) FROM pgqueue.dead_jobs") == 1


def test_dead_retry_leaves_dead_only_a_job_whose_new_id_is_taken_too(conn, dsn):
    # The sequence set back onto the dead ids: the next id is a dead one too. That job
    # stays dead, named with what to do; the rest of the batch is revived.
    first, second, third = (insert_dead(conn) for _ in range(3))
    conn.execute("SELECT setval(pg_get_serial_sequence('pgqueue.jobs', 'id'), %s, false)", (first,))
    taken = enqueue(conn, "record")
    assert taken == first

    result = cli(dsn, "dead", "retry", "--all")

    assert result.returncode == 1, result.stderr
    assert result.stdout.strip() == "retried 2 dead job(s)"
    assert f"pgqueue: left dead: [{first}]:" in result.stderr
    assert "set the sequence past the highest id" in result.stderr
    assert dead_row(conn, first) is not None
    assert job_state(conn, second) == "queued" and job_state(conn, third) == "queued"
    # Explicit ids say the same.
    result = cli(dsn, "dead", "retry", str(first))
    assert result.returncode == 1 and f"left dead: [{first}]" in result.stderr
    assert result.stdout.strip() == "retried 0 dead job(s)"


def test_dead_retry_all_and_purge_walk_the_ids_there_when_they_start_once(conn, dsn):
    # A job `dead retry --all` revives can die again before the command ends; picked up
    # again, it was revived twice and counted twice, and jobs dying faster than a batch
    # kept the loop going without end. The commands now walk the table once, in id
    # order, above the last id handled and up to the highest id there at their start.
    first, second, third, fourth = (insert_dead(conn) for _ in range(4))
    assert store.max_dead_id(conn) == fourth
    walk = store.retry_dead(
        conn, ids=None, queue=None, task=None, limit=100, after_id=first, upto_id=third
    )
    assert sorted(walk) == [second, third]
    assert dead_row(conn, first) is not None and dead_row(conn, fourth) is not None
    assert store.purge_dead(
        conn, older_than_seconds=None, queue=None, task=None, limit=100, after_id=first
    ) == [fourth]  # fmt: skip

    # Deaths stamped in the future (a clock stepped back) are not skipped: ids, not times.
    ahead = insert_dead(conn, died_ago=-3600)
    assert ok(cli(dsn, "dead", "retry", "--all")).strip() == "retried 2 dead job(s)"
    assert dead_row(conn, first) is None and dead_row(conn, ahead) is None
    assert store.max_dead_id(conn) is None
    assert ok(cli(dsn, "dead", "retry", "--all")).strip() == "retried 0 dead job(s)"
    insert_dead(conn)
    assert ok(cli(dsn, "dead", "purge")).strip() == "purged 1 dead job(s)"


NOT_UTF8 = "\udcff"  # the byte 0xff in argv, as Python decodes it (surrogateescape)


@pytest.mark.parametrize(
    "args",
    [
        ("jobs", "list", "--queue", NOT_UTF8),
        ("dead", "list", "--task", NOT_UTF8),
        ("queue", "pause", NOT_UTF8),
        ("queue", "resume", NOT_UTF8),
        ("stats", "--dsn", "dbname=" + NOT_UTF8),
    ],
    ids=["jobs-list", "dead-list", "pause", "resume", "dsn"],
)
def test_an_argument_that_is_not_utf8_is_one_line_not_a_traceback(dsn, args):
    assert one_line_error(cli(dsn, *args)) == (
        "pgqueue: an argument or environment variable is not valid UTF-8 text"
    )


@pytest.mark.parametrize("number", NUMBERS_PYTHON_CANNOT_DECODE, ids=["int", "float", "-float"])
def test_dead_show_of_args_python_cannot_decode_says_so_in_one_piece(conn, dsn, number):
    # Dead-lettered as bad_args by the worker; `dead show` used to end in a traceback.
    job_id = insert_dead(conn)
    conn.execute(
        "UPDATE pgqueue.dead_jobs SET args = %s::jsonb WHERE id = %s",
        ('{"n": ' + number + "}", job_id),
    )

    shown = ok(cli(dsn, "dead", "show", str(job_id)))
    assert "<args Python cannot decode: ValueError" in shown
    data = json.loads(ok(cli(dsn, "dead", "show", str(job_id), "--json")))
    assert data["args"].startswith("<args Python cannot decode: ValueError")


def test_notify_queue_usage_gauge_shows_a_listener_that_does_not_read(conn, dsn):
    # Postgres' NOTIFY queue is one for the server, emptied only as far as its slowest
    # listener has read; full, every transaction that notifies fails (enqueues too).
    from prometheus_client import CollectorRegistry, generate_latest

    from pgqueue.metrics import QueueStatsCollector

    registry = CollectorRegistry()
    registry.register(QueueStatsCollector(dsn, ttl=0.0))

    def usage() -> float:
        body = generate_latest(registry).decode()
        samples = [s for f in text_string_to_metric_families(body) for s in f.samples]
        return total(samples, "pgqueue_notify_queue_usage")

    with psycopg.connect(dsn) as stuck:
        stuck.execute("LISTEN pgqueue_jobs")
        stuck.commit()
        stuck.execute("SELECT 1")  # a transaction left open: it reads no notification
        with conn.cursor() as cur:
            for _ in range(2000):  # about ten 8 kB pages of notifications
                cur.execute("INSERT INTO pgqueue.jobs (task) VALUES ('t')")
        held = usage()
        stuck.rollback()
    # The gauge is the server's: others can only add. 2,000 notifications fill about ten
    # of the queue's 2**20 pages.
    assert 6 / 2**20 <= held < 0.01


def test_metrics_serve_on_an_ipv6_address():
    # --metrics-host :: or ::1 failed: "Address family for hostname not supported".
    import socket
    import urllib.request

    from prometheus_client import CollectorRegistry

    from pgqueue.metrics import MetricsServer

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server = MetricsServer("::1", 0, CollectorRegistry(), lambda: (True, "ok")).start()
    try:
        with urllib.request.urlopen(f"http://[::1]:{server.port}/healthz", timeout=5) as r:
            assert (r.status, r.read()) == (200, b"ok\n")
    finally:
        server.stop()


def test_queue_stats_leave_no_setting_on_the_session(dsn):
    # Every worker's /metrics runs the stats query: behind PgBouncer in transaction
    # pooling mode, a session setting (the statement timeout, jit) would stay on the
    # server connection for whichever client got it next.
    with psycopg.connect(dsn, autocommit=True) as c:
        before = [scalar(c, f"SHOW {name}") for name in ("statement_timeout", "jit")]
        store.queue_stats(c, timeout_seconds=0.5)
        with c.transaction():
            store.queue_stats(c, timeout_seconds=0.5)
        assert [scalar(c, f"SHOW {name}") for name in ("statement_timeout", "jit")] == before
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_queue_stats_give_up_on_a_lock_instead_of_hanging_the_scrape(conn, dsn, monkeypatch):
    # A session holding pgqueue.jobs locked made a scrape wait for as long as it held it,
    # then report stats_up 1: PgqueueStatsFailing could never fire for it.
    from prometheus_client import CollectorRegistry, generate_latest

    from pgqueue import metrics

    monkeypatch.setattr(metrics, "STATS_TIMEOUT_SECONDS", 0.5)
    registry = CollectorRegistry()
    registry.register(metrics.QueueStatsCollector(dsn, ttl=0.0))
    with psycopg.connect(dsn) as blocker:
        blocker.execute("LOCK TABLE pgqueue.jobs IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        body = generate_latest(registry).decode()
        waited = time.monotonic() - started
        blocker.rollback()
    up = [s for f in text_string_to_metric_families(body) for s in f.samples]
    assert total(up, "pgqueue_queue_stats_up") == 0
    assert waited < 5, waited  # the timeout, not the lock's holder, ended it
    # And `pgqueue stats` behind a statement timeout says the database answered.
    # (This scratch database's setting: a role's would reach every session on the server.)
    with psycopg.connect(dsn, autocommit=True) as c, psycopg.connect(dsn) as locker:
        name = sql.Identifier(c.info.dbname)
        locker.execute("LOCK TABLE pgqueue.jobs IN ACCESS EXCLUSIVE MODE")
        c.execute(sql.SQL("ALTER DATABASE {} SET statement_timeout = 1").format(name))
        try:
            result = cli(dsn, "stats")
        finally:
            c.execute(sql.SQL("ALTER DATABASE {} RESET statement_timeout").format(name))
            locker.rollback()
    assert one_line_error(result).startswith("pgqueue: database error: canceling statement")


def test_status_and_dead_show_print_errors_and_history_a_plain_insert_left_odd(conn, dsn):
    # errors and history are any JSON to the table: entries that are not objects crashed
    # both commands with a traceback.
    job_id = scalar(
        conn,
        "INSERT INTO pgqueue.jobs (task, errors, history) VALUES"
        " ('t', '[\"x\", 1]', '[1, {\"attempt\": 2}]') RETURNING id",
    )
    conn.execute(
        "INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts, max_attempts,"
        " run_at, created_at, reason, errors) VALUES"
        " (990001, 'default', 't', '{}', 0, 1, 1, now(), now(), 'exhausted', '{\"odd\": true}')"
    )
    status = cli(dsn, "status", str(job_id))
    assert status.returncode == 0, status.stderr
    assert status.stderr == "" and '"x"' in status.stdout
    shown = cli(dsn, "dead", "show", "990001")
    assert shown.returncode == 0, shown.stderr
    assert '{"odd": true}' in shown.stdout
    # Nor arrays at all: a number or true crashed status, a string printed one entry
    # per character, and 0, false or "" printed none. Each shows as the one entry it is.
    for errors, history in (("3", "true"), ('"abc"', "0"), ("false", '""')):
        odd = scalar(
            conn,
            "INSERT INTO pgqueue.jobs (task, errors, history) VALUES ('t', %s, %s) RETURNING id",
            (errors, history),
        )
        status = cli(dsn, "status", str(odd))
        assert status.returncode == 0 and status.stderr == "", status.stderr
        printed = status.stdout.split("attempts:\n")[-1]
        assert errors in printed and history in printed, status.stdout
        assert "  a  " not in printed and '"a"' not in printed, status.stdout
        as_json = json.loads(ok(cli(dsn, "status", str(odd), "--json")))
        assert (as_json["errors"], as_json["history"]) == (
            [json.loads(errors)],
            [json.loads(history)],
        )


def _depth_ready(collector: Any, queue: str) -> float | None:
    for family in collector.collect():
        for s in family.samples:
            if s.name == "pgqueue_queue_depth" and s.labels == {"queue": queue, "state": "ready"}:
                return float(s.value)
    return None


def _snapshot_taken_at(conn: psycopg.Connection[Any]) -> Any:
    row = conn.execute("SELECT taken_at FROM pgqueue.queue_stats_snapshot").fetchone()
    return None if row is None else row[0]


def test_queue_stats_are_counted_once_per_interval_for_every_process(conn, dsn):
    # Every worker's /metrics serves the database gauges: each process counting for
    # itself cost the database once per process and interval.
    from pgqueue.metrics import QueueStatsCollector

    insert_job(conn, queue="shared")
    first = QueueStatsCollector(dsn, ttl=60.0, reaper=False)
    assert _depth_ready(first, "shared") == 1
    taken = _snapshot_taken_at(conn)
    assert taken is not None

    insert_job(conn, queue="shared")
    # Another process (a collector with nothing cached) takes the stored counts.
    second = QueueStatsCollector(dsn, ttl=60.0, reaper=False)
    assert _depth_ready(second, "shared") == 1
    assert _snapshot_taken_at(conn) == taken
    # Counts older than a collector's ttl are not used: it counts and stores anew.
    fresh = QueueStatsCollector(dsn, ttl=0.0, reaper=False)
    assert _depth_ready(fresh, "shared") == 2
    assert _snapshot_taken_at(conn) > taken


def test_queue_stats_while_another_process_counts_wait_for_its_counts(conn, dsn):
    # One process counts at a time: the others wait for its result rather than count
    # beside it.
    from pgqueue import store

    insert_job(conn, queue="busy")
    with store.connect(dsn) as counting, store.connect(dsn) as reader:
        counting.execute("SELECT pg_advisory_lock(hashtext('pgqueue.queue_stats'))")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(
                store.shared_queue_stats, reader, max_age=10.0, timeout_seconds=5.0
            )
            # The reader's own backend waits for the lock (other tests' databases on the
            # same server may have advisory locks waiting too).
            wait_until(
                lambda: (
                    conn.execute(
                        "SELECT count(*) FROM pg_locks"
                        " WHERE locktype = 'advisory' AND NOT granted AND pid = %s",
                        (reader.info.backend_pid,),
                    ).fetchone()[0]
                    == 1
                )
            )
            # What the counting process stores (a count no query would give) ...
            counting.execute(
                "INSERT INTO pgqueue.queue_stats_snapshot (taken_at, queues) VALUES (now(),"
                " jsonb_build_array(jsonb_build_object('queue', 'busy', 'ready', 42,"
                " 'scheduled', 0, 'running', 0, 'oldest_ready_age_seconds', 1.5,"
                " 'finished_last_minute', 0, 'dead', 0, 'paused', false)))"
            )
            counting.execute("SELECT pg_advisory_unlock(hashtext('pgqueue.queue_stats'))")
            stats = waiting.result(timeout=10)
        # ... is what the waiting one reads.
        assert [(r["queue"], r["ready"]) for r in stats.rows] == [("busy", 42)]
        assert stats.unshared is None and 0.0 <= stats.age < 5.0


def test_queue_stats_refresh_fails_within_its_timeout_also_reading_stored_counts(conn, dsn):
    # The stored counts are fresh, so nothing is counted: the refresh's other reads still
    # fail past the timeout (a scrape must answer; stats_up says they failed).
    from pgqueue import store

    with store.connect(dsn) as reader:
        store.shared_queue_stats(reader, max_age=60.0, timeout_seconds=5.0)
    for table in ("pgqueue.workers", "pgqueue.queue_stats_snapshot"):
        with store.connect(dsn) as blocker, store.connect(dsn) as reader:
            blocker.execute("BEGIN")
            blocker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled), reader.transaction():
                store.shared_queue_stats(reader, max_age=60.0, timeout_seconds=0.5)
                store.list_workers(reader)
            assert time.monotonic() - started < 4, table
            blocker.execute("ROLLBACK")


def test_a_queue_stats_refresh_that_waited_for_another_count_has_only_what_is_left(conn, dsn):
    # Each statement had the whole timeout: waiting out another process's count for
    # nearly all of it, then counting behind a lock, took nearly twice it (a scrape past
    # Prometheus' 10 s timeout loses the whole target).
    from pgqueue import store

    with (
        store.connect(dsn) as counting,
        store.connect(dsn) as blocker,
        store.connect(dsn) as reader,
    ):
        counting.execute("SELECT pg_advisory_lock(hashtext('pgqueue.queue_stats'))")
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE pgqueue.jobs IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            refresh = pool.submit(
                store.shared_queue_stats, reader, max_age=10.0, timeout_seconds=3.0
            )
            time.sleep(2.0)
            # The other process ends without storing counts: this one counts, and its
            # count waits behind the lock on pgqueue.jobs.
            counting.execute("SELECT pg_advisory_unlock(hashtext('pgqueue.queue_stats'))")
            with pytest.raises(psycopg.errors.QueryCanceled):
                refresh.result(timeout=30)
        took = time.monotonic() - started
        blocker.execute("ROLLBACK")
    assert 2.0 <= took < 4.5, took


def test_stored_queue_stats_from_the_future_are_not_used(conn, dsn):
    # A server clock set back would otherwise freeze the gauges until it caught up.
    from pgqueue import store

    insert_job(conn, queue="later")
    with store.connect(dsn) as reader:
        store.shared_queue_stats(reader, max_age=60.0, timeout_seconds=5.0)
        conn.execute("UPDATE pgqueue.queue_stats_snapshot SET taken_at = now() + interval '1 hour'")
        insert_job(conn, queue="later")
        stats = store.shared_queue_stats(reader, max_age=60.0, timeout_seconds=5.0)
    assert [r["ready"] for r in stats.rows if r["queue"] == "later"] == [2]
    assert stats.age == 0.0


def test_queue_stats_without_their_table_are_counted_unshared(conn, dsn):
    # A database not migrated to 0022 yet: the gauges are counted as before, not lost.
    from pgqueue import store
    from pgqueue.metrics import QueueStatsCollector

    insert_job(conn, queue="old")
    conn.execute("DROP TABLE pgqueue.queue_stats_snapshot")
    with store.connect(dsn) as reader:
        stats = store.shared_queue_stats(reader, max_age=60.0, timeout_seconds=5.0)
    assert [r["ready"] for r in stats.rows if r["queue"] == "old"] == [1]
    assert stats.unshared is not None and "queue_stats_snapshot" in stats.unshared
    assert _depth_ready(QueueStatsCollector(dsn, ttl=0.0, reaper=False), "old") == 1


def test_stored_queue_stats_another_version_wrote_differently_are_counted_anew(conn, dsn):
    from pgqueue import store

    insert_job(conn, queue="v")
    conn.execute(
        "INSERT INTO pgqueue.queue_stats_snapshot (taken_at, queues)"
        ' VALUES (now(), \'[{"queue": "v", "depth": 7}]\')'
    )
    with store.connect(dsn) as reader:
        stats = store.shared_queue_stats(reader, max_age=60.0, timeout_seconds=5.0)
    assert stats.age == 0.0
    assert [(r["queue"], r["ready"]) for r in stats.rows] == [("v", 1)]
    stored = conn.execute("SELECT queues FROM pgqueue.queue_stats_snapshot").fetchone()
    assert stored is not None and stored[0][0]["ready"] == 1


def test_a_scrape_answers_when_the_database_takes_the_connection_but_not_its_queries(conn, dsn):
    # The refresh's connect had a timeout and its queries a statement timeout, but not
    # what ran between them (the BEGIN before the timeout was set): behind a PgBouncer
    # whose server was gone, each scrape hung, every later one behind the collector's
    # lock, past Prometheus' timeout (the whole target went missing).
    from prometheus_client import CollectorRegistry, generate_latest

    from pgqueue.metrics import QueueStatsCollector

    insert_job(conn, queue="behind_a_bouncer")
    proxy = LoginThenSilence(dsn)
    registry = CollectorRegistry()
    registry.register(QueueStatsCollector(proxy.dsn, ttl=0.0, reaper=False, wait_seconds=1.0))
    scrapes = concurrent.futures.ThreadPoolExecutor(3)

    def scrape() -> list[Sample]:
        body = generate_latest(registry).decode()
        return [s for f in text_string_to_metric_families(body) for s in f.samples]

    try:
        for _ in range(2):
            started = time.monotonic()
            together = [scrapes.submit(scrape) for _ in range(3)]
            for future in together:
                samples = future.result(timeout=15)
                assert total(samples, "pgqueue_queue_stats_up") == 0
                assert named(samples, "pgqueue_queue_depth") == []
            assert time.monotonic() - started < 4
        # One refresh waits, however many scrapes came.
        assert proxy.connections == 1
        # Once that connection fails, the next scrape counts afresh.
        proxy.release()
        wait_until(lambda: total(scrape(), "pgqueue_queue_stats_up") == 1)
        samples = scrape()
        assert total(samples, "pgqueue_queue_depth", queue="behind_a_bouncer", state="ready") == 1
    finally:
        proxy.close()
        scrapes.shutdown()


def test_queue_stats_gauges_are_dropped_not_frozen_when_their_query_fails(conn, dsn):
    # Frozen gauges kept delta() at 0: a queue falling behind raised no alert while the
    # reaper could not read the stats. pgqueue_queue_stats_up says whether it could.
    from prometheus_client import CollectorRegistry, generate_latest

    from pgqueue.metrics import QueueStatsCollector

    insert_job(conn, queue="watched")
    registry = CollectorRegistry()
    collector = QueueStatsCollector(dsn, ttl=0.0)
    registry.register(collector)

    def samples() -> list[Sample]:
        body = generate_latest(registry).decode()
        return [s for f in text_string_to_metric_families(body) for s in f.samples]

    first = samples()
    assert total(first, "pgqueue_queue_stats_up") == 1
    assert total(first, "pgqueue_queue_depth", queue="watched", state="ready") == 1
    # The queue's lease-expiry series now exists, at 0, in the process registry.
    expired = [
        s.value
        for f in REGISTRY.collect()
        for s in f.samples
        if s.name == "pgqueue_leases_expired_total" and s.labels.get("queue") == "watched"
    ]
    assert expired == [0.0]

    conn.execute("ALTER TABLE pgqueue.dead_jobs RENAME TO dead_jobs_away")
    try:
        failed = samples()
    finally:
        conn.execute("ALTER TABLE pgqueue.dead_jobs_away RENAME TO dead_jobs")
    assert total(failed, "pgqueue_queue_stats_up") == 0
    assert named(failed, "pgqueue_queue_depth") == []
    assert named(failed, "pgqueue_queue_oldest_ready_age_seconds") == []

    again = samples()
    assert total(again, "pgqueue_queue_stats_up") == 1
    assert total(again, "pgqueue_queue_depth", queue="watched", state="ready") == 1


@pytest.mark.parametrize("command", ["retry", "purge"])
def test_ctrl_c_during_a_batched_dead_command_says_what_it_did(conn, dsn, command):
    # Each batch of 1,000 commits on its own. Interrupted, `dead retry --all` and `dead
    # purge` said only "aborted" (exit 1), though batches were done: 28,000 jobs back in
    # the queue, or 20,000 deleted for good, in a review's run.
    conn.execute(
        "INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts,"
        " max_attempts, run_at, created_at, errors, history, reason)"
        " SELECT nextval(pg_get_serial_sequence('pgqueue.jobs', 'id')), 'default', 't',"
        " '{}', 0, 3, 3, now(), now(), '[]', '[]', 'exhausted' FROM generate_series(1, 2500)"
    )
    second_batch = scalar(conn, "SELECT min(id) + 1000 FROM pgqueue.dead_jobs")
    # A trigger makes the second batch's statement sleep (both commands delete their
    # rows from the dead-letter table): Ctrl-C comes while it runs, and the command
    # stops once it has committed, before the third.
    conn.execute(
        "CREATE FUNCTION public.slow() RETURNS trigger LANGUAGE plpgsql AS $$"
        f" BEGIN IF OLD.id = {int(second_batch)} THEN PERFORM pg_sleep(2); END IF;"
        " RETURN OLD; END $$"
    )
    conn.execute(
        "CREATE TRIGGER slow BEFORE DELETE ON pgqueue.dead_jobs"
        " FOR EACH ROW EXECUTE FUNCTION public.slow()"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGQUEUE_")}
    env["PGQUEUE_DSN"] = dsn
    args = ["dead", "retry", "--all"] if command == "retry" else ["dead", "purge", "--yes"]
    proc = subprocess.Popen(
        [str(BIN / "pgqueue"), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: scalar(conn, "SELECT count(*) FROM pgqueue.dead_jobs") == 1500)
        wait_until(
            lambda: scalar(
                conn,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
                " AND application_name = 'pgqueue-cli'"
                " AND datname = current_database()",
            )
        )
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out, err)
    done = "retried" if command == "retry" else "purged"
    assert out.strip() == f"{done} 2000 dead job(s)"
    assert err.startswith("pgqueue: interrupted: 2000 dead job(s) are"), err
    assert "it stopped after the batch in flight" in err
    assert f"run the same command again to {command} the rest" in err
    assert scalar(conn, "SELECT count(*) FROM pgqueue.dead_jobs") == 500
    back = scalar(conn, "SELECT count(*) FROM pgqueue.jobs")
    assert back == (2000 if command == "retry" else 0)


def test_a_scraper_that_goes_away_leaves_no_traceback_in_the_logs(capfd):
    # A scrape that timed out (the client gone before the answer) printed socketserver's
    # BrokenPipeError traceback on stderr amid the JSON log lines (the on-call review).
    import struct

    from prometheus_client import CollectorRegistry

    from pgqueue.metrics import MetricsServer

    def slow_health() -> tuple[bool, str]:
        time.sleep(0.5)
        return True, "ok"

    def broken_health() -> tuple[bool, str]:
        raise RuntimeError("boom")

    for health in (slow_health, broken_health):
        server = MetricsServer("127.0.0.1", 0, CollectorRegistry(), health).start()
        try:
            with structlog.testing.capture_logs() as logs:
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                if health is slow_health:
                    # Gone with a reset before the answer is written.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
                    time.sleep(1.0)
                else:
                    with contextlib.suppress(OSError):
                        sock.recv(1000)
                    sock.close()
                    wait_until(lambda: logs)
        finally:
            server.stop()
        failed = [e for e in logs if e["event"] == "metrics.request_failed"]
        if health is slow_health:
            assert failed == []
        else:
            assert [e["error"] for e in failed] == ["RuntimeError: boom"]
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("command", [("dead", "retry", "--all"), ("dead", "purge", "--yes")])
def test_a_dead_command_whose_queue_filter_names_no_queue_says_check_the_name(conn, dsn, command):
    # "retried 0 dead job(s)", exit 0, for a misspelt queue (the on-call review).
    insert_dead(conn, queue="mail")
    result = cli(dsn, *command, "--queue", "mial")
    assert result.returncode == 0
    assert result.stderr == (
        "pgqueue: warning: no job waits, runs or lies dead in queue mial and no worker"
        " serves it: check the name\n"
    )
    # A queue in use that has no dead job matching: nothing to warn about.
    insert_job(conn, queue="other")
    assert cli(dsn, *command, "--queue", "other").stderr == ""
    assert scalar(conn, "SELECT count(*) FROM pgqueue.dead_jobs") == 1
