"""End-to-end tests of the daemons: real pgqueue-worker / pgqueue-reaper / pgqueue
subprocesses, real signals, and assertions on what ended up in the database.

Nothing here sleeps and hopes: every wait polls the database (or a process) through
``wait_until`` or ``Popen.wait``. Leases are short (2 s) and the reaper runs every 0.2 s,
so recovery paths finish in seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from typing import Any

import psutil
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from pgqueue import enqueue
from pgqueue.config import REAPER_STOP_SECONDS, REPEATED_SIGNAL_SECONDS, STOP_MARGIN_SECONDS
from tests.conftest import (
    BIN,
    ROOT,
    Daemons,
    LoginThenSilence,
    dead_row,
    job_row,
    job_state,
    notified_before_sentinel,
    scalar,
    wait_until,
)

FAST_REAPER = ("--interval", "0.2", "--backoff-base-seconds", "0.1")

# Backends of the worker processes of the test's database: the pool connections (named
# 'pgqueue-worker') and the LISTEN connection (found by its query: it sets no name).
WORKER_BACKENDS = """
    SELECT pid FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
      AND (application_name = 'pgqueue-worker' OR query = 'LISTEN pgqueue_jobs')
"""
LISTEN_BACKENDS = """
    SELECT pid FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
      AND query = 'LISTEN pgqueue_jobs'
"""
POOL_BACKENDS = """
    SELECT pid FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
      AND application_name = 'pgqueue-worker'
"""


# --- helpers --------------------------------------------------------------------------------


def all_succeeded(conn: psycopg.Connection[Any], ids: list[int]) -> bool:
    done = scalar(
        conn,
        "SELECT count(*) FROM pgqueue.jobs WHERE id = ANY(%s) AND state = 'succeeded'",
        (ids,),
    )
    return bool(done == len(ids))


def executions(conn: psycopg.Connection[Any], job_id: int, note_prefix: str = "") -> int:
    return int(
        scalar(
            conn,
            "SELECT count(*) FROM public.executions WHERE job_id = %s AND note LIKE %s",
            (job_id, note_prefix + "%"),
        )
    )


def pids(conn: psycopg.Connection[Any], sql: str) -> set[int]:
    return {row[0] for row in conn.execute(sql).fetchall()}  # type: ignore[arg-type]


def terminate(conn: psycopg.Connection[Any], backends: str) -> None:
    """End the backends the query finds, and wait (up to 10 s each) until they are gone:
    pg_terminate_backend only sends the signal, and a backend stays in pg_stat_activity
    until it has exited. A CI run on a busy machine saw one still listed after two
    rounds of terminations and reconnects."""
    query = f"SELECT pg_terminate_backend(pid, 10000) FROM ({backends}) AS b"
    conn.execute(query)  # type: ignore[arg-type]


def events(daemons: Daemons, proc: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
    """The JSON log lines a daemon wrote so far."""
    found = []
    for line in daemons.output(proc).splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def logged(daemons: Daemons, proc: subprocess.Popen[bytes], event: str) -> list[dict[str, Any]]:
    return [e for e in events(daemons, proc) if e.get("event") == event]


def started_workers(daemons: Daemons, proc: subprocess.Popen[bytes]) -> set[int]:
    """Pids of the worker processes that logged worker.started into ``proc``'s log."""
    return {int(e["worker_id"].rsplit(":", 2)[1]) for e in logged(daemons, proc, "worker.started")}


def up_children(daemons: Daemons, supervisor: subprocess.Popen[bytes], n: int) -> set[int]:
    """The supervisor's live children if there are ``n`` and all have logged worker.started."""
    now = children(supervisor.pid)
    return now if len(now) == n and now <= started_workers(daemons, supervisor) else set()


def children(pid: int) -> set[int]:
    """Live (non-zombie) child processes of ``pid``."""
    try:
        kids = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return set()
    alive = set()
    for kid in kids:
        try:
            if kid.status() != psutil.STATUS_ZOMBIE:
                alive.add(kid.pid)
        except psutil.NoSuchProcess:
            continue
    return alive


def group_members(pgid: int) -> set[int]:
    """Live processes of process group ``pgid`` (a daemon's, started in a session of its
    own: the processes its handlers forked stay in it)."""
    found = set()
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.add(proc.pid)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return found


def exec_children(pid: int) -> set[int]:
    """Children of ``pid`` that already run the worker's command (past fork and exec: a
    signal sent between the two is taken by the supervisor's handler, copied by fork)."""
    found = set()
    for kid in children(pid):
        with contextlib.suppress(psutil.Error):
            if "pgqueue" in psutil.Process(kid).cmdline():
                found.add(kid)
    return found


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def run_cli(dsn: str, *args: str, command: str = "pgqueue") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGQUEUE_DSN": dsn, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [str(BIN / command), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line_error(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


def make_expired(
    conn: psycopg.Connection[Any], *, attempts: int, max_attempts: int, count: int = 1
) -> list[int]:
    """Insert ``count`` running jobs whose lease expired a minute ago (a dead worker's)."""
    rows = conn.execute(
        """
        INSERT INTO pgqueue.jobs (task, state, attempts, max_attempts, lease_token, leased_by,
                                  lease_expires_at, attempted_at)
        SELECT 'record', 'running', %s, %s, gen_random_uuid(), 'ghost:1:abc',
               now() - interval '1 minute', now() - interval '2 minutes'
        FROM generate_series(1, %s)
        RETURNING id
        """,
        (attempts, max_attempts, count),
    ).fetchall()
    return sorted(r[0] for r in rows)


# --- tests ----------------------------------------------------------------------------------


def test_worker_runs_jobs_enqueued_by_sql_and_python(conn, daemons):
    by_function = scalar(conn, "SELECT pgqueue.enqueue('record', '{\"note\": \"fn\"}')")
    by_insert = scalar(
        conn, "INSERT INTO pgqueue.jobs (task, args) VALUES ('record', '{}') RETURNING id"
    )
    by_python = enqueue(conn, "record", {"note": "py"})
    on_async_queue = enqueue(conn, "async_record", {"note": "async"}, queue="async")
    ids = [by_function, by_insert, by_python, on_async_queue]

    worker = daemons.worker("--lease-seconds", "3", "--poll-interval", "0.5")

    wait_until(lambda: all_succeeded(conn, ids), timeout=20)
    for job_id in ids:
        assert executions(conn, job_id) == 1
        row = job_row(conn, job_id)
        assert row is not None
        assert row["attempts"] == 1
        assert row["errors"] == []
        assert row["lease_token"] is None and row["lease_expires_at"] is None
    assert worker.poll() is None


def test_sigkill_mid_job_is_recovered_after_lease(conn, daemons):
    job_id = enqueue(conn, "sleep", {"seconds": 30, "note": "k"})
    worker_a = daemons.worker("--lease-seconds", "2", "--poll-interval", "0.5")
    wait_until(lambda: executions(conn, job_id, "start") == 1)
    # An idle worker whose poll is far off: the reaper's requeue wakes it to check for
    # rescued jobs at once (a queue-name wake-up did not: the claim leaves rescued jobs
    # to that check, and the job waited for this worker's next poll, a minute away).
    daemons.worker("--lease-seconds", "2", "--poll-interval", "60")
    wait_until(lambda: len(pids(conn, LISTEN_BACKENDS)) == 2)

    os.kill(worker_a.pid, signal.SIGKILL)
    assert worker_a.wait(timeout=10) == -signal.SIGKILL
    assert job_state(conn, job_id) == "running"
    # The next attempt should be short: args is plain jsonb.
    conn.execute(
        "UPDATE pgqueue.jobs SET args = %s WHERE id = %s",
        (Jsonb({"seconds": 0.1, "note": "k"}), job_id),
    )
    daemons.reaper(*FAST_REAPER)

    wait_until(lambda: job_state(conn, job_id) == "succeeded", timeout=30)
    row = job_row(conn, job_id)
    assert row is not None
    # The crash was not counted (the job may have been an innocent neighbour); it then
    # ran alone, as a rescued job, and that attempt counted.
    assert row["attempts"] == 1
    assert row["rescued"] is True
    assert [e["kind"] for e in row["errors"]] == ["lease_expired"]
    assert row["errors"][0]["attempt"] == 1
    assert row["errors"][0]["counted"] is False
    assert executions(conn, job_id, "start") == 2
    assert executions(conn, job_id, "end") == 1


def test_no_job_starts_beside_the_thread_of_a_rescued_job_that_timed_out(conn, daemons):
    # A rescued job runs alone so that, if it kills its worker, no innocent job dies with
    # it. Its sync handler timed out, and isolation ended with the handler's task while
    # its thread ran on: the jobs claimed next were killed with it (and a rescued one
    # among them had that attempt counted).
    poison = scalar(
        conn,
        "INSERT INTO pgqueue.jobs (task, rescued, attempts) VALUES ('time_out_then_crash',"
        " true, 1) RETURNING id",
    )
    neighbours = [enqueue(conn, "sleep", {"seconds": 0.1, "note": f"n{i}"}) for i in range(3)]
    worker = daemons.worker("--concurrency", "4", "--poll-interval", "0.2")

    assert worker.wait(timeout=30) == 7  # the poison job's thread killed it
    isolated = logged(daemons, worker, "job.isolated")
    assert [e["job_id"] for e in isolated] == [poison], isolated
    for job_id in neighbours:
        row = job_row(conn, job_id)
        assert row is not None
        assert (row["state"], row["attempts"]) == ("queued", 0), row
        assert executions(conn, job_id) == 0


def test_sigterm_waits_for_running_job_then_exits_zero(conn, daemons):
    job_id = enqueue(conn, "sleep", {"seconds": 2, "note": "g"})
    worker = daemons.worker("--shutdown-timeout", "10", "--lease-seconds", "3")
    wait_until(lambda: executions(conn, job_id, "start") == 1)

    worker.send_signal(signal.SIGTERM)

    assert worker.wait(timeout=30) == 0, daemons.output(worker)
    # The signal arrived while the job was running, and the job finished in the grace period.
    assert [e["running"] for e in logged(daemons, worker, "worker.stopping")] == [1]
    assert executions(conn, job_id, "end") == 1
    row = job_row(conn, job_id)
    assert row is not None
    assert row["state"] == "succeeded", (row, daemons.output(worker))
    assert row["attempts"] == 1
    assert row["errors"] == []


def test_sigterm_releases_job_that_outlives_shutdown_timeout(conn, daemons):
    job_id = enqueue(conn, "sleep", {"seconds": 20, "note": "r"})
    worker = daemons.worker("--shutdown-timeout", "0.5", "--lease-seconds", "3")
    wait_until(lambda: executions(conn, job_id, "start") == 1)

    worker.send_signal(signal.SIGTERM)

    assert worker.wait(timeout=20) == 0, daemons.output(worker)
    assert executions(conn, job_id, "end") == 0
    row = job_row(conn, job_id)
    assert row is not None
    assert row["state"] == "queued", (row, daemons.output(worker))
    assert row["attempts"] == 0  # a release does not count the attempt
    assert row["errors"] == []
    assert row["lease_token"] is None
    assert row["lease_expires_at"] is None


def test_a_stop_ends_within_its_budget_when_the_database_stops_answering(conn, dsn, daemons):
    # A database that takes statements and never answers (a PgBouncer whose server is
    # gone, a hung server): each step of the stop waiting on one (writing the release,
    # the heartbeat's beat) took psycopg's cancel, up to 10 s more, and removing the
    # worker's row waited without end, past what the supervisor and process managers
    # allow (--shutdown-timeout + STOP_MARGIN_SECONDS), which then kill the worker.
    proxy = LoginThenSilence(dsn, silent=False)
    try:
        job_id = enqueue(conn, "sleep", {"seconds": 60, "note": "s"})
        worker = daemons.worker(
            "--dsn", proxy.dsn, "--shutdown-timeout", "0.5", "--lease-seconds", "3"
        )
        wait_until(lambda: executions(conn, job_id, "start") == 1)
        proxy.silent = True
        time.sleep(1.5)  # the heartbeat (every second) now waits on its statement
        stopped = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.wait(timeout=0.5 + STOP_MARGIN_SECONDS + 15)
        took = time.monotonic() - stopped
        assert took < 0.5 + STOP_MARGIN_SECONDS, (took, daemons.output(worker))
        # Not a clean stop: exit 1 (it exited 0, and said so at info level), so that a
        # process manager shows it.
        assert worker.returncode == 1, daemons.output(worker)
        (stopped_event,) = logged(daemons, worker, "worker.stopped")
        assert (stopped_event["level"], stopped_event["flushed"]) == ("error", False)
        assert logged(daemons, worker, "completer.flush_failed"), daemons.output(worker)
        assert logged(daemons, worker, "worker.deregister_failed"), daemons.output(worker)
        # Nothing was written: the job keeps the lease it had, and the reaper takes it
        # back when that expires, as after a crash.
        row = job_row(conn, job_id)
        assert row is not None
        assert (row["state"], row["attempts"]) == ("running", 1), row
    finally:
        proxy.close()


def test_sigterm_exits_and_releases_a_job_whose_handler_ignores_cancellation(conn, daemons):
    job_id = enqueue(conn, "stubborn", {"note": "s"})
    worker = daemons.worker("--shutdown-timeout", "0.5", "--lease-seconds", "3")
    wait_until(lambda: executions(conn, job_id, "start") == 1)

    worker.send_signal(signal.SIGTERM)

    # Grace 0.5 s, then CANCEL_GRACE_SECONDS (3) for the cancelled handler.
    assert worker.wait(timeout=30) == 0, daemons.output(worker)
    assert "job.ignored_cancel" in daemons.output(worker)
    row = job_row(conn, job_id)
    assert row is not None
    assert (row["state"], row["attempts"], row["lease_token"]) == ("queued", 0, None)
    # The attempt's entry says how long the handler had run when it was released (the
    # grace, then the cancel grace), not 0.
    (entry,) = row["history"]
    assert entry["outcome"] == "released"
    assert entry["duration"] >= 3.5, entry


def test_sigterm_exits_though_a_released_async_handler_left_a_thread(conn, daemons):
    # asyncio.run joins the default executor's threads without a limit: a released
    # handler cancelled in asyncio.to_thread kept the process alive after
    # worker.stopped until the call returned (40 s in the report).
    job_id = enqueue(conn, "async_blocking", {"seconds": 60})
    worker = daemons.worker("--shutdown-timeout", "0.5", "--lease-seconds", "3")
    wait_until(lambda: executions(conn, job_id, "start") == 1)

    worker.send_signal(signal.SIGTERM)

    assert worker.wait(timeout=15) == 0, daemons.output(worker)
    assert logged(daemons, worker, "worker.threads_left")[0]["threads"] == 1
    row = job_row(conn, job_id)
    assert row is not None
    assert (row["state"], row["attempts"], row["lease_token"]) == ("queued", 0, None)


def test_a_second_signal_sent_without_waiting_for_the_first_exits_at_once(conn, daemons):
    # As a person or a test sends it, a moment after the first, without waiting for it
    # to be handled. With a 0.5 s window for the copies of one signal, one sent half a
    # second after the first could be taken for the same stop, and the worker waited
    # out its shutdown timeout.
    job_id = enqueue(conn, "sleep", {"seconds": 20, "note": "half"})
    worker = daemons.worker("--shutdown-timeout", "30")
    wait_until(lambda: executions(conn, job_id, "start") == 1)
    worker.send_signal(signal.SIGTERM)
    time.sleep(REPEATED_SIGNAL_SECONDS + 0.4)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 1, daemons.output(worker)
    assert logged(daemons, worker, "worker.killed")


def test_second_signal_exits_at_once(conn, daemons):
    job_id = enqueue(conn, "sleep", {"seconds": 20, "note": "twice"})
    worker = daemons.worker("--shutdown-timeout", "30", "--lease-seconds", "2")
    wait_until(lambda: executions(conn, job_id, "start") == 1)

    worker.send_signal(signal.SIGTERM)
    # Make sure the first signal was handled before the second one is sent, and that the
    # second does not come right after it (that is the same stop reaching it twice).
    wait_until(lambda: logged(daemons, worker, "worker.stopping"), timeout=10)
    time.sleep(REPEATED_SIGNAL_SECONDS + 0.2)
    worker.send_signal(signal.SIGTERM)

    code = worker.wait(timeout=10)
    assert code not in (0, None)
    assert code > 0  # exited on its own, not killed by the signal's default action
    # Nothing was written: the job still runs under its (soon expired) lease.
    assert job_state(conn, job_id) == "running"
    assert executions(conn, job_id, "end") == 0

    conn.execute(
        "UPDATE pgqueue.jobs SET args = %s WHERE id = %s",
        (Jsonb({"seconds": 0.1, "note": "twice"}), job_id),
    )
    daemons.reaper(*FAST_REAPER)
    daemons.worker("--lease-seconds", "2", "--poll-interval", "0.5")

    wait_until(lambda: job_state(conn, job_id) == "succeeded", timeout=30)
    row = job_row(conn, job_id)
    assert row is not None
    assert row["attempts"] == 1  # the crash was not counted; the rescued run was
    assert [e["kind"] for e in row["errors"]] == ["lease_expired"]
    assert executions(conn, job_id, "start") == 2


@pytest.mark.parametrize("processes", [1, 2])
def test_a_stop_signal_that_arrives_twice_at_once_is_one_graceful_stop(conn, daemons, processes):
    # coreutils' `timeout` signals its child and then the child's process group: the
    # same SIGTERM twice, microseconds apart. A worker took the second for "exit now"
    # (and a supervisor passed SIGQUIT on): its running jobs were left to their leases,
    # to run again alone as rescued jobs.
    job_id = enqueue(conn, "sleep", {"seconds": 1.5, "note": f"twice-{processes}"})
    extra = ("--processes", str(processes)) if processes > 1 else ()
    proc = daemons.worker("--shutdown-timeout", "30", *extra)
    wait_until(lambda: executions(conn, job_id, "start") == 1)

    proc.send_signal(signal.SIGTERM)
    # Handled one by one (two at the same instant may be merged), well inside
    # REPEATED_SIGNAL_SECONDS even if this process stalls for a moment.
    time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)

    assert proc.wait(timeout=30) == 0, daemons.output(proc)
    assert job_state(conn, job_id) == "succeeded"
    assert "worker.killed" not in daemons.output(proc)


def test_a_second_signal_to_a_worker_whose_loop_is_blocked_still_exits_at_once(conn, daemons):
    # The window is measured from when the signals arrive: asyncio runs its handlers
    # when the loop next runs, so two SIGTERMs seconds apart reached a blocked loop
    # together, and the operator's "exit now" was taken for a repeat of the first.
    job_id = enqueue(conn, "block_loop", {"seconds": 6})
    worker = daemons.worker("--shutdown-timeout", "30")
    wait_until(lambda: job_state(conn, job_id) == "running")
    time.sleep(0.5)  # in the handler's blocking sleep

    worker.send_signal(signal.SIGTERM)
    time.sleep(REPEATED_SIGNAL_SECONDS + 1.0)
    worker.send_signal(signal.SIGTERM)

    assert worker.wait(timeout=30) == 1, daemons.output(worker)
    assert logged(daemons, worker, "worker.killed")


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGQUIT])
def test_exit_now_does_not_wait_for_a_handler_blocking_the_loop(conn, daemons, second):
    # The loop carried out "exit now" only once the handler let it run again: a minute
    # later here, as long as the handler blocked.
    job_id = enqueue(conn, "block_loop", {"seconds": 60})
    worker = daemons.worker("--shutdown-timeout", "30")
    wait_until(lambda: job_state(conn, job_id) == "running")
    time.sleep(0.5)  # in the handler's blocking sleep

    if second is signal.SIGTERM:
        worker.send_signal(signal.SIGTERM)
        time.sleep(REPEATED_SIGNAL_SECONDS + 1.0)
    worker.send_signal(second)

    assert worker.wait(timeout=15) == 1, daemons.output(worker)
    (killed,) = logged(daemons, worker, "worker.killed")
    assert (killed["signal"], killed["loop_blocked"]) == (second.name, True)
    assert job_state(conn, job_id) == "running"  # left to its lease, as documented


def test_sighup_stops_a_worker_gracefully(conn, daemons):
    # A terminal that hangs up sends SIGHUP, whose default action killed the worker on
    # the spot: no log line, its jobs left to their leases (to come back as rescued
    # jobs, run alone) and its row in pgqueue.workers left for the reaper.
    done = enqueue(conn, "sleep", {"seconds": 1.5, "note": "hup-done"})
    released = enqueue(conn, "sleep", {"seconds": 60, "note": "hup-released"})
    worker = daemons.worker("--shutdown-timeout", "3", "--concurrency", "2")
    wait_until(lambda: executions(conn, done, "start") + executions(conn, released, "start") == 2)

    worker.send_signal(signal.SIGHUP)

    assert worker.wait(timeout=30) == 0, daemons.output(worker)
    assert logged(daemons, worker, "worker.stopping")[0]["signal"] == "SIGHUP"
    assert job_state(conn, done) == "succeeded"
    row = job_row(conn, released)
    assert row is not None
    assert (row["state"], row["attempts"], row["lease_token"]) == ("queued", 0, None)
    assert scalar(conn, "SELECT count(*) FROM pgqueue.workers") == 0


@pytest.mark.parametrize("task", ["record", "fork_helper"])
def test_a_clean_stop_runs_the_apps_exit_hooks(conn, daemons, tmp_path, task):
    # The thread that carries out "exit now" for a blocked loop ends with the worker: a
    # thread left running makes the process end with os._exit, which skips atexit hooks
    # (an error reporter's or a tracer's flush, multiprocessing's end of its daemonic
    # helpers). A process a handler forked holds the thread's pipe too: told to end by
    # the pipe's closing, the thread never was, and the stop took a second more.
    hooks = tmp_path / "atexit"
    job_id = enqueue(conn, task, {})
    worker = daemons.worker(env={"SAMPLE_ATEXIT_FILE": str(hooks)})
    wait_until(lambda: job_state(conn, job_id) == "succeeded", timeout=20)

    worker.send_signal(signal.SIGTERM)

    assert worker.wait(timeout=20) == 0, daemons.output(worker)
    assert hooks.read_text() == "ran"
    if task == "fork_helper":
        # multiprocessing's exit hook ended the helper.
        wait_until(lambda: not group_members(worker.pid), timeout=10)


@pytest.mark.parametrize(
    ("program", "args"),
    [("pgqueue-worker", ()), ("pgqueue-worker", ("--processes", "2")), ("pgqueue-reaper", ())],
)
def test_under_nohup_sighup_stays_ignored(conn, daemons, program, args):
    # The SIGHUP handlers replaced the ignore `nohup` sets: a daemon started with it
    # stopped when its terminal hung up.
    if program == "pgqueue-worker":
        proc = daemons.worker(*args, nohup=True)
        wait_until(lambda: logged(daemons, proc, "worker.started"), timeout=20)
    else:
        proc = daemons.start(program, "--log-format", "json", "--interval", "0.5", nohup=True)
        wait_until(lambda: logged(daemons, proc, "reaper.started"), timeout=20)
    if args:
        wait_until(lambda: len(started_workers(daemons, proc)) == 2, timeout=30)

    before = children(proc.pid)
    os.killpg(proc.pid, signal.SIGHUP)  # as a terminal's hang-up: the whole group
    time.sleep(1.5)

    assert proc.poll() is None, daemons.output(proc)
    # Nothing stopped: a supervisor's children were not stopped (and replaced) either.
    assert children(proc.pid) == before
    assert not logged(daemons, proc, "worker.stopping"), daemons.output(proc)
    if program == "pgqueue-worker":
        job_id = enqueue(conn, "record", {"note": "after-hup"})
        wait_until(lambda: job_state(conn, job_id) == "succeeded", timeout=20)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, daemons.output(proc)


def test_sighup_stops_a_supervisor_and_its_children_gracefully(conn, daemons):
    job_id = enqueue(conn, "sleep", {"seconds": 60, "note": "hup-supervised"})
    proc = daemons.worker("--shutdown-timeout", "1", "--processes", "2")
    wait_until(lambda: executions(conn, job_id, "start") == 1)

    # As a terminal's hang-up: to the whole process group.
    os.killpg(proc.pid, signal.SIGHUP)

    assert proc.wait(timeout=30) == 0, daemons.output(proc)
    assert "worker.killed" not in daemons.output(proc)
    row = job_row(conn, job_id)
    assert row is not None
    assert (row["state"], row["attempts"], row["lease_token"]) == ("queued", 0, None)
    assert scalar(conn, "SELECT count(*) FROM pgqueue.workers") == 0


def test_sighup_stops_the_reaper(daemons):
    reaper = daemons.reaper("--interval", "0.5")
    wait_until(lambda: logged(daemons, reaper, "reaper.started"))

    reaper.send_signal(signal.SIGHUP)

    assert reaper.wait(timeout=15) == 0, daemons.output(reaper)
    assert logged(daemons, reaper, "reaper.stopping")[0]["signal"] == "SIGHUP"


def test_worker_survives_pg_terminate_backend(conn, daemons):
    worker = daemons.worker("--poll-interval", "0.5", "--lease-seconds", "3")
    first = wait_until(lambda: pids(conn, LISTEN_BACKENDS) and pids(conn, WORKER_BACKENDS))

    for _ in range(2):
        before = pids(conn, WORKER_BACKENDS)
        terminate(conn, WORKER_BACKENDS)
        # Wait until it has connected again: a new LISTEN backend and a new pool backend.
        wait_until(
            lambda b=before: pids(conn, LISTEN_BACKENDS) - b and pids(conn, POOL_BACKENDS) - b
        )
    assert not (pids(conn, WORKER_BACKENDS) & first)

    ids = [enqueue(conn, "record", {"note": f"after-{i}"}) for i in range(20)]

    wait_until(lambda: all_succeeded(conn, ids), timeout=30)
    for job_id in ids:
        assert executions(conn, job_id) == 1
    assert worker.poll() is None
    output = daemons.output(worker)
    assert "listener.disconnected" in output
    assert "listener.reconnected" in output
    assert "Traceback" not in output


def test_a_claim_the_server_refuses_on_a_sound_connection_is_a_db_error(conn, dsn, daemons):
    # A lock timeout is an OperationalError like a lost connection; the worker retries
    # it the same way, but its event must not send an operator after a network fault.
    worker = daemons.worker(
        "--poll-interval", "0.2", env={"PGOPTIONS": "-c lock_timeout=200"}
    )  # fmt: skip
    wait_until(lambda: pids(conn, POOL_BACKENDS))
    with psycopg.connect(dsn) as blocker:
        blocker.execute("LOCK TABLE pgqueue.jobs IN ACCESS EXCLUSIVE MODE")
        wait_until(lambda: any(e["event"] == "fetcher.db_error" for e in events(daemons, worker)))
        blocker.rollback()
    job_id = enqueue(conn, "record", {"note": "after the lock"})
    wait_until(lambda: all_succeeded(conn, [job_id]), timeout=30)
    refused = [e for e in events(daemons, worker) if e["event"] == "fetcher.db_error"]
    assert refused[0]["sqlstate"] == "55P03", refused[0]
    assert refused[0]["error_type"] == "LockNotAvailable"
    assert "fetcher.disconnected" not in daemons.output(worker)
    assert worker.poll() is None


def test_a_handler_sees_its_lease_lost_and_may_stop(conn, daemons):
    # pgqueue.LeaseLost was exported and never raised: a long handler had no way to learn
    # that another worker may be running its job by now.
    worker = daemons.worker("--lease-seconds", "3")
    job_id = enqueue(conn, "watch_lease", {"seconds": 30})
    wait_until(lambda: executions(conn, job_id, "start"))
    token = scalar(conn, "SELECT lease_token FROM pgqueue.jobs WHERE id = %s", (job_id,))
    # As if the reaper had requeued it and another worker claimed it since.
    conn.execute("UPDATE pgqueue.jobs SET lease_token = gen_random_uuid() WHERE id = %s", (job_id,))
    wait_until(lambda: executions(conn, job_id, "lost"), timeout=10)
    assert not executions(conn, job_id, "kept")
    wait_until(lambda: any(e["event"] == "lease.lost" for e in events(daemons, worker)))
    time.sleep(0.5)  # what the handler's raise would have written, had it been written
    mine = [e for e in events(daemons, worker) if e.get("job_id") == job_id]
    assert [e["event"] for e in mine if e["event"] != "job.claimed"] == ["lease.lost"], mine
    row = conn.execute(
        "SELECT state::text, lease_token <> %s, errors FROM pgqueue.jobs WHERE id = %s",
        (token, job_id),
    ).fetchone()
    assert row == ("running", True, []), row  # the other worker's claim is untouched
    assert worker.poll() is None


def test_a_process_a_handler_forks_and_terminates_does_not_stop_the_worker(conn, daemons):
    # The forked child shared asyncio's wake-up socket: its SIGTERM reached the worker's
    # loop as the worker's own (worker.stopping, exit 0 with jobs waiting), and the child
    # ignored it (terminate() then join waited its whole timeout).
    worker = daemons.worker()
    job_id = enqueue(conn, "fork_and_terminate", {})
    wait_until(lambda: executions(conn, job_id, "child exit"), timeout=30)
    assert executions(conn, job_id, "child exit -15") == 1
    after = enqueue(conn, "record", {"note": "after the fork"})
    wait_until(lambda: all_succeeded(conn, [job_id, after]), timeout=30)
    assert worker.poll() is None
    assert "worker.stopping" not in daemons.output(worker)


@pytest.mark.parametrize("task", ["fork_and_end", "async_fork_and_end"])
def test_a_child_a_handler_forks_that_ends_as_a_script_does_is_ended(conn, daemons, task):
    # A child that came back into the worker's code (sys.exit(), a return, an exception
    # of its own) went on as a second worker on the worker's connections and epoll: other
    # jobs were charged "another command is already in progress", the parent's signals
    # never reached its loop again (two SIGTERMs did nothing), and under a sync handler
    # the child sat in the thread pool while the parent waited for it (a review).
    worker = daemons.worker("--lease-seconds", "5", "--shutdown-timeout", "5")
    jobs = {how: enqueue(conn, task, {"how": how}) for how in ("exit", "return", "raise")}
    others = [enqueue(conn, "record", {"note": f"beside {n}"}) for n in range(20)]
    wait_until(lambda: all_succeeded(conn, [*jobs.values(), *others]), timeout=30)
    assert executions(conn, jobs["exit"], "child exit 3") == 1
    assert executions(conn, jobs["return"], "child exit 0") == 1
    assert executions(conn, jobs["raise"], "child exit 1") == 1
    # Each job ran once, and none beside them was charged anything.
    assert scalar(conn, "SELECT count(*) FROM public.executions") == 23
    assert scalar(conn, "SELECT max(attempts) FROM pgqueue.jobs") == 1
    assert scalar(conn, "SELECT count(*) FROM pgqueue.jobs WHERE errors <> '[]'") == 0
    output = daemons.output(worker)
    assert "ValueError: the child's own error" in output
    for event in ("completer.batch_failed", "worker.component_died", "job.retried"):
        assert event not in output, event
    # And the worker's own SIGTERM still stops it gracefully.
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    assert "worker.stopped" in daemons.output(worker)


def test_a_worker_whose_loop_ended_under_it_exits_beside_a_handler_that_ignores_cancels(
    conn, daemons
):
    # asyncio's own teardown would wait without end for a handler that swallows every
    # cancellation; the worker's stop takes its graceful time and no more.
    worker = daemons.worker("--lease-seconds", "2", "--shutdown-timeout", "1")
    stubborn = enqueue(conn, "stubborn", {"note": "beside"})
    wait_until(lambda: executions(conn, stubborn, "start") == 1)
    enqueue(conn, "end_the_loop", {"how": "stop"})
    assert worker.wait(timeout=30) == 1
    logged = [e.get("event") for e in events(daemons, worker)]
    assert "worker.loop_ended" in logged and "worker.stopped" in logged, logged
    assert "job.released" not in logged  # left to its lease, as the others
    assert job_state(conn, stubborn) == "running"


@pytest.mark.parametrize(("how", "status"), [("exit", 4), ("stop", 1)])
def test_a_handler_that_ends_the_event_loop_charges_no_job_beside_it(conn, daemons, how, status):
    # asyncio lets a SystemExit raised in a loop callback (or a loop.stop()) out of the
    # loop, then cancels every task: the jobs running beside the culprit took that for
    # their handlers' failure, and those on their last attempt were dead-lettered as
    # "CancelledError" (a review). They are left as a crash leaves them: the reaper
    # requeues them uncounted, rescued, and each then runs alone.
    worker = daemons.worker("--lease-seconds", "2", "--concurrency", "8")
    beside = [enqueue(conn, "sleep", {"seconds": 3, "note": f"b{n}"}) for n in range(3)]
    wait_until(lambda: all(executions(conn, j, "start") == 1 for j in beside))
    enqueue(conn, "end_the_loop", {"how": how})
    assert worker.wait(timeout=30) == status
    (ended,) = logged(daemons, worker, "worker.loop_ended")
    assert ended["level"] == "error" and ended["running"] == 4, ended
    assert set(beside) <= set(ended["job_ids"])
    assert "worker.stopped" in daemons.output(worker)
    # Nothing was written for them: no failed attempt, no dead job.
    assert scalar(conn, "SELECT count(*) FROM pgqueue.dead_jobs") == 0
    for job_id in beside:
        assert job_state(conn, job_id) == "running"
        assert job_row(conn, job_id)["errors"] == []  # type: ignore[index]
    # Their next runs (each alone, as rescued jobs) should be short: args is plain jsonb.
    conn.execute(
        "UPDATE pgqueue.jobs SET args = %s WHERE id = ANY(%s)",
        (Jsonb({"seconds": 0.05, "note": "again"}), beside),
    )
    daemons.reaper(*FAST_REAPER)
    daemons.worker("--lease-seconds", "2", "--poll-interval", "0.5")
    wait_until(lambda: all_succeeded(conn, beside), timeout=60)
    for job_id in beside:
        row = job_row(conn, job_id)
        assert row is not None and row["attempts"] == 1 and row["rescued"] is True
        assert [(e["kind"], e["counted"]) for e in row["errors"]] == [("lease_expired", False)]


@pytest.mark.parametrize(
    ("how", "sig", "taken_back"),
    [
        ("ignore", signal.SIGTERM, "SIGTERM"),
        ("loop", signal.SIGTERM, "SIGTERM"),
        ("remove", signal.SIGTERM, "SIGTERM"),
        # Not taken for nohup's: that is decided when the worker starts.
        ("ignore_hup", signal.SIGHUP, "SIGHUP"),
        # asyncio learns of every signal through its wake-up fd.
        ("wakeup_fd", signal.SIGTERM, "wakeup_fd"),
    ],
)
def test_a_handler_that_takes_the_stop_signal_does_not_keep_the_worker_from_stopping(
    conn, daemons, how, sig, taken_back
):
    # A handler's signal.signal(SIGTERM, SIG_IGN), loop.add_signal_handler or
    # signal.set_wakeup_fd(-1) made the worker ignore every SIGTERM from then on; its
    # loop.remove_signal_handler made a SIGTERM kill it without releasing its jobs.
    # Nothing was logged (a review).
    worker = daemons.worker()
    job_id = enqueue(conn, "take_sigterm", {"how": how})
    wait_until(lambda: all_succeeded(conn, [job_id]))
    taken = wait_until(lambda: logged(daemons, worker, "worker.signal_taken_back"))
    assert taken[0]["signal"] == taken_back and taken[0]["level"] == "warning", taken
    running = enqueue(conn, "sleep", {"seconds": 1, "note": how})
    wait_until(lambda: executions(conn, running, "start") == 1)
    worker.send_signal(sig)
    assert worker.wait(timeout=30) == 0
    assert "worker.stopped" in daemons.output(worker)
    assert job_state(conn, running) == "succeeded"


def test_a_handler_that_closes_stdout_does_not_silence_the_worker(conn, daemons):
    # Every log line after it was dropped, the worker's stop included (a review).
    worker = daemons.worker()
    closer = enqueue(conn, "close_stdout", {})
    wait_until(lambda: all_succeeded(conn, [closer]))
    after = enqueue(conn, "record", {"note": "after the close"})
    wait_until(lambda: all_succeeded(conn, [after]))
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    logged = {(e.get("event"), e.get("job_id")) for e in events(daemons, worker)}
    assert {("job.succeeded", closer), ("job.succeeded", after), ("worker.stopped", None)} <= logged
    assert daemons.output(worker).count("sys.stdout was closed") == 1


def test_a_worker_reconnects_with_its_default_executor_full_of_stuck_threads(conn, dsn, daemons):
    # psycopg resolves a host name in the loop's default executor, which asyncio.to_thread
    # calls of timed-out handlers had filled: after its connections were cut the worker
    # never got one again.
    by_name = make_conninfo(dsn, host="localhost")
    worker = daemons.worker("--lease-seconds", "5", env={"PGQUEUE_DSN": by_name})
    wait_until(lambda: pids(conn, WORKER_BACKENDS))
    stuck = [enqueue(conn, "hang_in_thread", {"seconds": 60}, max_attempts=1) for _ in range(40)]
    wait_until(
        lambda: (
            scalar(conn, "SELECT count(*) FROM pgqueue.dead_jobs WHERE id = ANY (%s)", (stuck,))
            == len(stuck)
        ),
        timeout=30,
    )
    terminate(conn, WORKER_BACKENDS)
    after = enqueue(conn, "record", {"note": "after the cut"})
    wait_until(lambda: all_succeeded(conn, [after]), timeout=30)
    assert worker.poll() is None


def test_worker_wakes_on_notify_after_listener_reconnect(conn, daemons):
    # A 60 s safety-net poll: within the test's 20 s, only a notification (or the wake-up
    # right after a reconnect) can make the idle worker claim.
    worker = daemons.worker("--poll-interval", "60", "--lease-seconds", "3")
    old = wait_until(lambda: pids(conn, LISTEN_BACKENDS))

    terminate(conn, WORKER_BACKENDS)
    wait_until(lambda: pids(conn, LISTEN_BACKENDS) - old, timeout=20)
    # The first job may still be caught by the post-reconnect wake-up; once it is done the
    # fetcher is idle again, so the second one can only be claimed through its NOTIFY
    # arriving on the new LISTEN connection.
    first = enqueue(conn, "record", {"note": "first"})
    wait_until(lambda: job_state(conn, first) == "succeeded", timeout=20)
    second = enqueue(conn, "record", {"note": "second"})

    wait_until(lambda: job_state(conn, second) == "succeeded", timeout=20)
    assert executions(conn, second) == 1
    assert worker.poll() is None
    assert logged(daemons, worker, "listener.reconnected")


def test_jobs_inserted_without_notification_are_found_by_the_poll(conn, daemons):
    # pgqueue.notify_inserts = off (migration 0009): no notification wakes the worker.
    # A job waiting before it started is found by its first claim; one enqueued while it
    # is idle, by its poll.
    conn.execute("SET pgqueue.notify_inserts = off")
    with psycopg.connect(daemons.dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgqueue_jobs")
        before = enqueue(conn, "record", {"note": "before"})
        daemons.worker("--poll-interval", "0.5")
        wait_until(lambda: job_state(conn, before) == "succeeded", timeout=20)
        wait_until(lambda: pids(conn, LISTEN_BACKENDS))
        idle = enqueue(conn, "record", {"note": "idle"})
        wait_until(lambda: job_state(conn, idle) == "succeeded", timeout=20)
        # No notification woke the worker: the enqueues sent none (a listener of our own
        # heard nothing before the sentinel, which conn sends after both committed).
        assert notified_before_sentinel(conn, listener) == []
    assert executions(conn, before) == executions(conn, idle) == 1


def test_listen_connection_is_named_pgqueue_worker(conn, daemons):
    daemons.worker("--poll-interval", "0.5")
    wait_until(lambda: pids(conn, LISTEN_BACKENDS))
    names = {
        row[0]
        for row in conn.execute(
            "SELECT application_name FROM pg_stat_activity"
            " WHERE datname = current_database() AND query = 'LISTEN pgqueue_jobs'"
        )
    }
    assert names == {"pgqueue-worker"}


@pytest.mark.parametrize("source", ["dsn", "service"])
def test_a_name_the_operator_gives_wins_over_the_daemons_own(conn, daemons, tmp_path, source):
    # The worker's pool and listener, and the reaper, named their connections
    # pgqueue-worker / pgqueue-reaper whatever the DSN, a service file or PGAPPNAME said
    # (deploy/systemd's example set application_name in the DSN, to no effect): a DBA
    # could not tell two apps' workers apart.
    if source == "dsn":
        env = {"PGQUEUE_DSN": make_conninfo(daemons.dsn, application_name="billing-worker")}
    else:
        info = psycopg.conninfo.conninfo_to_dict(daemons.dsn)
        services = tmp_path / "pg_service.conf"
        services.write_text(
            "[billing]\n"
            + "".join(f"{key}={value}\n" for key, value in info.items())
            + "application_name=billing-worker\n"
        )
        env = {"PGSERVICEFILE": str(services), "PGQUEUE_DSN": "service=billing"}
    daemons.worker("--poll-interval", "0.5", env=env)
    daemons.start("pgqueue-reaper", "--log-format", "json", env={"PGAPPNAME": "billing-reaper"})

    def names() -> set[str]:
        rows = conn.execute(
            "SELECT application_name FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return {row[0] for row in rows}

    # The listener, the pool's connections and the reaper's.
    wait_until(lambda: names() == {"billing-worker", "billing-reaper"}, timeout=20)
    wait_until(
        lambda: pids(
            conn,
            "SELECT pid FROM pg_stat_activity WHERE query = 'LISTEN pgqueue_jobs'"
            " AND application_name = 'billing-worker'",
        )
    )
    job = enqueue(conn, "record", {"note": "named"})
    wait_until(lambda: job_state(conn, job) == "succeeded", timeout=20)
    assert names() == {"billing-worker", "billing-reaper"}


def test_the_worker_reads_its_settings_from_the_environment(daemons):
    # deploy/systemd/worker-example.env.example names these as settings; outside the
    # unit's ExecStart (Docker, supervisord, `env $(cat ...)`) they were ignored.
    worker = daemons.start(
        "pgqueue-worker",
        "--log-format",
        "json",
        env={
            "PGQUEUE_APP": "tests.apps.sample:registry",
            "PGQUEUE_QUEUES": "emails,reports",
            "PGQUEUE_CONCURRENCY": "3",
            "PGQUEUE_LEASE_SECONDS": "7",
            "PGQUEUE_SHUTDOWN_TIMEOUT": "4",
            "PGQUEUE_POLL_INTERVAL": "0.5",
        },
    )
    (started,) = wait_until(lambda: logged(daemons, worker, "worker.started"))
    assert started["queues"] == ["emails", "reports"]
    assert (started["concurrency"], started["lease_seconds"]) == (3, 7.0)
    # A flag still wins over the environment.
    flagged = daemons.start(
        "pgqueue-worker", "--log-format", "json", "--concurrency", "5",
        env={"PGQUEUE_APP": "tests.apps.sample:registry", "PGQUEUE_CONCURRENCY": "3"},
    )  # fmt: skip
    (started,) = wait_until(lambda: logged(daemons, flagged, "worker.started"))
    assert started["concurrency"] == 5


@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_pgqueue_queues_is_refused_not_every_queue(dsn, value):
    result = subprocess.run(
        [str(BIN / "pgqueue-worker"), "--app", "tests.apps.sample:registry"],
        env={**os.environ, "PGQUEUE_DSN": dsn, "PGQUEUE_QUEUES": value, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    # Empty: click takes it for unset; blank: it reaches --queues.
    error = one_line_error(result.stderr)
    assert "PGQUEUE_QUEUES is set but empty" in error or "--queues has an empty name" in error


@pytest.mark.parametrize("queues", ["", " ", ",,", "a,,b", "a, "])
def test_a_queue_list_with_an_empty_name_is_refused(dsn, queues):
    # An empty --queues must not mean "every queue": a templated unit whose variable came
    # out empty would serve queues it was never meant to.
    result = run_cli(
        dsn, "--app", "tests.apps.sample:registry", "--queues", queues, command="pgqueue-worker"
    )

    assert result.returncode == 2
    assert "--queues has an empty name" in one_line_error(result.stderr)


@pytest.mark.parametrize(
    ("app", "mentions"),
    [
        ("missing.module:x", "missing.module"),
        ("tests.apps.sample:nothing", "module 'tests.apps.sample' has no attribute 'nothing'"),
        ("tests.apps.sample:FAST", "'tests.apps.sample:FAST' is of type"),
        ("nocolon", "nocolon"),
        # An error inside the app's own imports names where it was raised.
        ("tests.apps.broken_import:registry", "broken_import.py, line 5)"),
        # pgqueue's own refusal of the app's call names the app's line, not pgqueue's.
        ("tests.apps.twice:registry", "twice.py, line 14)"),
        ("tests.apps.empty:registry", "'tests.apps.empty:registry' has no tasks"),
    ],
)
def test_bad_app_exits_nonzero_with_one_line(daemons, app, mentions):
    proc = daemons.worker(app=app)
    code = proc.wait(timeout=30)
    output = daemons.output(proc)
    assert code != 0
    line = one_line_error(output)
    assert mentions in line
    assert line.startswith("pgqueue: ")


def test_processes_supervisor_replaces_dead_child_and_forwards_sigterm(conn, daemons):
    supervisor = daemons.worker(
        "--processes", "2", "--poll-interval", "0.5", "--lease-seconds", "3",
        "--shutdown-timeout", "5",
    )  # fmt: skip
    first = wait_until(lambda: up_children(daemons, supervisor, 2))
    victim = min(first)
    os.kill(victim, signal.SIGKILL)

    def replaced() -> set[int]:
        now = up_children(daemons, supervisor, 2)
        return now if victim not in now else set()

    current = wait_until(replaced)
    assert len(current & first) == 1  # one survivor, one replacement
    assert supervisor.poll() is None
    ids = [enqueue(conn, "record", {"note": f"s{i}"}) for i in range(10)]
    wait_until(lambda: all_succeeded(conn, ids), timeout=30)
    ran_in = pids(conn, "SELECT DISTINCT pid FROM public.executions")
    assert ran_in <= current

    supervisor.send_signal(signal.SIGTERM)

    assert supervisor.wait(timeout=30) == 0, daemons.output(supervisor)
    assert all(gone(pid) for pid in current | first)
    assert children(supervisor.pid) == set()
    assert logged(daemons, supervisor, "supervisor.child_died")


def test_a_child_stopped_on_its_own_is_replaced_and_logged_as_a_warning(conn, daemons):
    # A child stopped by a SIGTERM of its own (an operator's `kill`, a process manager
    # that signalled the wrong pid) exits 0 having released its jobs: that was logged as
    # an error, like a crash. It is still replaced: the supervisor keeps its N children.
    supervisor = daemons.worker("--processes", "2", "--shutdown-timeout", "1")
    first = wait_until(lambda: up_children(daemons, supervisor, 2))
    victim = min(first)
    os.kill(victim, signal.SIGTERM)

    wait_until(lambda: logged(daemons, supervisor, "supervisor.child_died"), timeout=20)
    (event,) = logged(daemons, supervisor, "supervisor.child_died")
    assert (event["exit_code"], event["level"]) == (0, "warning")
    wait_until(lambda: (now := up_children(daemons, supervisor, 2)) and victim not in now)
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0, daemons.output(supervisor)


def supervisor_running_a_job(
    conn: psycopg.Connection[Any], daemons: Daemons, note: str
) -> tuple[subprocess.Popen[bytes], set[int], int]:
    """A supervisor with two children up, one of them running a 2 s job: the supervisor,
    its children's pids and the job's id."""
    supervisor = daemons.worker(
        "--processes", "2", "--poll-interval", "0.5", "--lease-seconds", "3",
        "--shutdown-timeout", "10",
    )  # fmt: skip
    kids = wait_until(lambda: up_children(daemons, supervisor, 2))
    job_id = enqueue(conn, "sleep", {"seconds": 2, "note": note})
    wait_until(lambda: executions(conn, job_id, "start") == 1)
    return supervisor, kids, job_id


def test_sigterm_to_supervisor_process_group_shuts_down_gracefully(conn, daemons):
    # systemd (KillMode=control-group) and Ctrl-C in a terminal signal the whole group:
    # every process gets its own copy. This is the interleaving in which the children
    # handle theirs before the supervisor handles its copy (os.killpg leaves the order
    # to the scheduler; sending the copies one by one makes it deterministic).
    supervisor, kids, job_id = supervisor_running_a_job(conn, daemons, "pg")

    for kid in kids:
        os.kill(kid, signal.SIGTERM)
    wait_until(lambda: len(logged(daemons, supervisor, "worker.stopping")) == 2)
    supervisor.send_signal(signal.SIGTERM)

    code = supervisor.wait(timeout=30)
    assert executions(conn, job_id, "end") == 1
    assert job_state(conn, job_id) == "succeeded"
    assert code == 0


def test_sigterm_while_children_start_exits_zero(conn, daemons):
    supervisor = daemons.worker("--processes", "2", "--shutdown-timeout", "5")
    # Signal it as soon as its children exist, before they are up.
    kids = wait_until(lambda: len(now := children(supervisor.pid)) == 2 and now, interval=0.005)

    supervisor.send_signal(signal.SIGTERM)

    code = supervisor.wait(timeout=30)
    assert all(gone(pid) for pid in kids)
    assert code == 0, daemons.output(supervisor)


def test_ctrl_c_while_children_start_stops_them_without_a_traceback(conn, daemons):
    # Ctrl-C in a terminal sends SIGINT to the whole foreground process group: the
    # supervisor and its children, here still importing the app. A child got it as a
    # KeyboardInterrupt traceback; it now starts with SIGINT blocked, and ends by the
    # supervisor's SIGTERM (or, once running, takes the pending SIGINT as a stop).
    supervisor = daemons.worker(
        "--processes", "2", "--shutdown-timeout", "5", app="tests.apps.slow_import:registry"
    )
    kids = wait_until(lambda: len(now := exec_children(supervisor.pid)) == 2 and now)
    time.sleep(0.5)  # past the interpreter's start, into the app's import

    os.killpg(supervisor.pid, signal.SIGINT)

    code = supervisor.wait(timeout=30)
    output = daemons.output(supervisor)
    assert all(gone(pid) for pid in kids)
    for sign in ("Traceback", "KeyboardInterrupt", "pgqueue: aborted", "child_died"):
        assert sign not in output, output
    assert code == 0, output


def test_a_sigint_a_child_got_while_starting_stops_it_once_it_runs(conn, daemons):
    # A SIGINT sent to one child alone while it imports the app is held until the
    # worker's handlers are in place, then taken as a graceful stop.
    supervisor = daemons.worker(
        "--processes", "2", "--shutdown-timeout", "5", app="tests.apps.slow_import:registry"
    )
    kid = min(wait_until(lambda: len(now := exec_children(supervisor.pid)) == 2 and now))
    time.sleep(0.5)
    os.kill(kid, signal.SIGINT)

    wait_until(lambda: gone(kid), timeout=30)
    output = daemons.output(supervisor)
    assert "Traceback" not in output and "pgqueue: aborted" not in output, output
    assert kid in started_workers(daemons, supervisor), output
    stopped = [
        e for e in logged(daemons, supervisor, "worker.stopped") if f":{kid}:" in e["worker_id"]
    ]
    assert stopped, output
    supervisor.send_signal(signal.SIGTERM)
    supervisor.wait(timeout=30)


def test_what_the_app_starts_at_import_inherits_no_supervisor_state(conn, daemons, tmp_path):
    # A thread or process the app starts while a child imports it must not inherit the
    # child's blocked SIGINT (a Ctrl-C would then miss it for good), the supervisor's
    # environment variables, or the readiness pipe (close_fds=False here).
    reports = tmp_path / "reports"
    reports.mkdir()
    supervisor = daemons.worker(
        "--processes", "2", app="tests.apps.spawn_at_import:registry",
        env={"SPAWN_REPORT_DIR": str(reports)},
    )  # fmt: skip
    wait_until(lambda: len(started_workers(daemons, supervisor)) == 2, timeout=30)
    kids = started_workers(daemons, supervisor)
    sigint = 1 << (signal.SIGINT - 1)
    for kid in kids:
        report = json.loads((reports / f"{kid}.json").read_text())
        assert int(report["thread"]["sigblk"], 16) & sigint == 0, report
        assert int(report["process"]["sigblk"], 16) & sigint == 0, report
        assert report["process"]["env"] == [], report
        assert report["process"]["fds"] == [0, 1, 2, 3], report  # 3: its own listdir
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0, daemons.output(supervisor)


def test_children_finish_their_jobs_and_stop_when_the_supervisor_is_killed(conn, daemons):
    # SIGKILL or the OOM killer gives the supervisor no chance to pass a stop on. Its
    # children must not run on unsupervised (a restarted supervisor would start as many
    # again): each notices it was orphaned and stops as if it had got SIGTERM.
    supervisor, kids, job_id = supervisor_running_a_job(conn, daemons, "orphan")

    supervisor.kill()
    supervisor.wait(timeout=10)

    wait_until(lambda: all(gone(pid) for pid in kids), timeout=30)
    assert executions(conn, job_id, "end") == 1
    assert job_state(conn, job_id) == "succeeded"
    # Stopped gracefully: each deregistered itself rather than wait for the reaper.
    assert pids(conn, "SELECT pid FROM pgqueue.workers") & kids == set()
    assert len(logged(daemons, supervisor, "worker.supervisor_gone")) == 2
    assert len(logged(daemons, supervisor, "worker.stopped")) == 2


@pytest.mark.parametrize("processes", [1, 2])
def test_a_worker_whose_log_reader_is_gone_runs_jobs_and_stops_on_sigterm(conn, daemons, processes):
    # stdout piped into `head`, or a journald restart: the log's reader goes away. A log
    # line that cannot be written must not break the loops or the signal handling.
    stderr = open(daemons.tmp / "stderr.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            str(BIN / "pgqueue-worker"), "--app", "tests.apps.sample:registry",
            "--log-format", "json", "--processes", str(processes),
            "--poll-interval", "0.5", "--shutdown-timeout", "5",
        ],
        env={**os.environ, "PGQUEUE_DSN": daemons.dsn, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=stderr,
        cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    daemons.procs.append(proc)
    assert proc.stdout is not None
    started = 0
    while started < processes:
        line = proc.stdout.readline()
        assert line, "the worker exited before it started"
        started += json.loads(line)["event"] == "worker.started"
    kids = children(proc.pid) if processes > 1 else {proc.pid}
    proc.stdout.close()

    ids = [enqueue(conn, "record", {"note": f"p{i}"}) for i in range(5)]
    wait_until(lambda: all_succeeded(conn, ids), timeout=30)
    proc.send_signal(signal.SIGTERM)

    assert proc.wait(timeout=30) == 0, (daemons.tmp / "stderr.log").read_text()
    assert all(gone(pid) for pid in kids)
    assert "Traceback" not in (daemons.tmp / "stderr.log").read_text()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ((), {"prepared_statements": True, "generic_plans": True, "async_commit": False}),
        (
            ("--async-commit", "--no-generic-plans"),
            {"prepared_statements": True, "generic_plans": False, "async_commit": True},
        ),
        (
            ("--no-prepared-statements",),
            {"prepared_statements": False, "generic_plans": False, "async_commit": False},
        ),
    ],
)
def test_supervisor_passes_connection_flags_to_its_children(daemons, flags, expected):
    supervisor = daemons.worker("--processes", "2", *flags)
    kids = wait_until(lambda: up_children(daemons, supervisor, 2))

    started = logged(daemons, supervisor, "worker.started")
    assert {int(e["worker_id"].rsplit(":", 2)[1]) for e in started} == kids
    for event in started:
        assert {k: event[k] for k in expected} == expected, event


def test_supervisor_passes_concurrency_and_shutdown_timeout_to_its_children(conn, daemons):
    # Found by a mutation audit: children started without --concurrency or
    # --shutdown-timeout ran with the defaults (10 slots; 30 s for a job to finish at
    # stop, past the deadline the supervisor works out from its own timeout).
    supervisor = daemons.worker(
        "--processes", "2", "--concurrency", "1", "--shutdown-timeout", "1",
        "--poll-interval", "0.5",
    )  # fmt: skip
    kids = wait_until(lambda: up_children(daemons, supervisor, 2))
    registered = wait_until(
        lambda: (
            len(rows := conn.execute("SELECT pid, concurrency FROM pgqueue.workers").fetchall())
            == 2
            and rows
        )
    )
    assert sorted(registered) == sorted((pid, 1) for pid in kids)
    job_id = enqueue(conn, "sleep", {"seconds": 30, "note": "long"})
    wait_until(lambda: executions(conn, job_id, "start") == 1)

    stopped_at = time.monotonic()
    supervisor.send_signal(signal.SIGTERM)
    code = supervisor.wait(timeout=60)

    # 1 s for the job, then released: well within 10 s; the 30 s default is not.
    assert time.monotonic() - stopped_at < 10, daemons.output(supervisor)
    assert code == 0, daemons.output(supervisor)
    row = job_row(conn, job_id)
    assert row is not None
    assert (row["state"], row["attempts"], row["lease_token"]) == ("queued", 0, None)
    assert executions(conn, job_id, "end") == 0


def test_reaper_once_requeues_expired_lease_and_dead_letters_exhausted(conn, dsn):
    (retryable,) = make_expired(conn, attempts=1, max_attempts=3)
    (exhausted,) = make_expired(conn, attempts=3, max_attempts=3)
    # Only a job that ran alone (rescued) has its crash counted and can be exhausted.
    conn.execute("UPDATE pgqueue.jobs SET rescued = true WHERE id = %s", (exhausted,))

    result = run_cli(dsn, "--once", "--log-format", "json", command="pgqueue-reaper")

    assert result.returncode == 0, result.stderr
    assert "requeued 1, dead-lettered 1" in result.stdout
    row = job_row(conn, retryable)
    assert row is not None
    assert row["state"] == "queued"
    assert row["attempts"] == 0 and row["rescued"] is True
    assert row["lease_token"] is None and row["lease_expires_at"] is None
    assert [(e["kind"], e["attempt"]) for e in row["errors"]] == [("lease_expired", 1)]
    assert job_row(conn, exhausted) is None
    dead = dead_row(conn, exhausted)
    assert dead is not None
    assert dead["reason"] == "lease_expired"
    assert dead["attempts"] == 3
    assert [e["kind"] for e in dead["errors"]] == ["lease_expired"]


def test_two_reapers_at_once_requeue_each_expired_job_exactly_once(conn, dsn):
    ids = make_expired(conn, attempts=1, max_attempts=5, count=200)
    env = {**os.environ, "PGQUEUE_DSN": dsn, "PYTHONPATH": str(ROOT)}
    reapers = [
        subprocess.Popen(
            [str(BIN / "pgqueue-reaper"), "--once", "--log-format", "json"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [r.communicate(timeout=60)[0] for r in reapers]

    assert [r.returncode for r in reapers] == [0, 0]
    counts = [int(out.split("requeued ")[1].split(",")[0]) for out in outputs]
    assert sum(counts) == 200, outputs
    lengths = conn.execute(
        "SELECT state::text, jsonb_array_length(errors), count(*) FROM pgqueue.jobs"
        " WHERE id = ANY(%s) GROUP BY 1, 2",
        (ids,),
    ).fetchall()
    assert lengths == [("queued", 1, 200)]


def test_reaper_daemon_exits_zero_on_sigterm(conn, daemons):
    (job_id,) = make_expired(conn, attempts=1, max_attempts=3)
    # A long interval: the process must not wait for its next pass to stop.
    reaper = daemons.reaper("--interval", "30")
    wait_until(lambda: job_state(conn, job_id) == "queued", timeout=20)
    wait_until(lambda: logged(daemons, reaper, "reaper.started"))

    reaper.send_signal(signal.SIGTERM)

    assert reaper.wait(timeout=10) == 0, daemons.output(reaper)
    assert logged(daemons, reaper, "reaper.stopped")
    assert "Traceback" not in daemons.output(reaper)


@pytest.mark.parametrize("silent", ["after_start", "from_start"])
def test_reaper_daemon_stops_when_the_database_takes_its_statement_and_never_answers(
    conn, dsn, daemons, silent
):
    # It stopped after its statement in flight; with a database that does not answer (a
    # hung server, a PgBouncer whose server is gone) that statement never ended, nor the
    # process, until the process manager's SIGKILL. From the start, the statement is one
    # of those that set up its session, on a connection not yet its own.
    proxy = LoginThenSilence(dsn, silent=silent == "from_start")
    try:
        reaper = daemons.reaper("--dsn", proxy.dsn, "--interval", "0.2")
        wait_until(lambda: logged(daemons, reaper, "reaper.started"))
        proxy.silent = True
        time.sleep(1.0)  # its pass now waits on its first statement
        reaper.send_signal(signal.SIGTERM)
        assert reaper.wait(timeout=REAPER_STOP_SECONDS + 10) == 0, daemons.output(reaper)
        assert logged(daemons, reaper, "reaper.stopped"), daemons.output(reaper)
        (cut,) = logged(daemons, reaper, "reaper.statement_abandoned")
        assert cut["waited_seconds"] == REAPER_STOP_SECONDS
    finally:
        proxy.close()


def test_a_reaper_pass_run_once_stops_when_the_database_never_answers(dsn, daemons):
    # `pgqueue-reaper --once` (say, from cron) waited for its statement for ever too.
    proxy = LoginThenSilence(dsn, silent=True)
    try:
        reaper = daemons.start("pgqueue-reaper", "--once", "--dsn", proxy.dsn)
        wait_until(lambda: proxy.connections == 1)
        time.sleep(0.5)  # it waits on the statements that set up its session
        reaper.send_signal(signal.SIGTERM)
        # Its pass did not run: exit 1, saying why, rather than a summary.
        assert reaper.wait(timeout=REAPER_STOP_SECONDS + 10) == 1, daemons.output(reaper)
        assert "reaper.statement_abandoned" in daemons.output(reaper)
        assert "requeued" not in daemons.output(reaper)
    finally:
        proxy.close()


def test_status_command(conn, dsn, daemons):
    queued = enqueue(conn, "record", {"note": "q"}, delay=3600)
    dead = enqueue(conn, "fail", max_attempts=3)
    worker = daemons.worker("--poll-interval", "0.5")
    wait_until(lambda: dead_row(conn, dead) is not None, timeout=30)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0

    shown = run_cli(dsn, "status", str(queued))
    assert shown.returncode == 0, shown.stderr
    lines = dict(line.split(None, 1) for line in shown.stdout.splitlines() if "  " in line)
    assert lines["state"].strip() == "queued"
    assert lines["attempts"].strip() == "0/20"
    assert "errors:" not in shown.stdout

    shown = run_cli(dsn, "status", str(dead))
    assert shown.returncode == 0, shown.stderr
    assert "dead (exhausted)" in shown.stdout
    assert "3/3" in shown.stdout
    error_lines = [line for line in shown.stdout.splitlines() if line.startswith("  attempt ")]
    assert [line.split()[1] for line in error_lines] == ["1", "2", "3"]
    assert all("RuntimeError: this task always fails" in line for line in error_lines)

    as_json = run_cli(dsn, "status", str(dead), "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert {"state", "attempts", "errors"} <= data.keys()
    assert data["state"] == "dead"
    assert data["attempts"] == 3
    assert [e["attempt"] for e in data["errors"]] == [1, 2, 3]

    missing = run_cli(dsn, "status", "987654321")
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert "987654321" in one_line_error(missing.stderr)

    unreachable = run_cli("postgresql://postgres@127.0.0.1:1/x", "status", str(queued))
    assert unreachable.returncode != 0
    assert unreachable.stdout == ""
    assert "cannot reach the database" in one_line_error(unreachable.stderr)


def test_poison_job_dead_letters_after_max_attempts(conn, daemons):
    poison = enqueue(conn, "crash", max_attempts=2)
    # Innocent neighbours with a single attempt each, long enough to be running in the
    # same process when the poison job kills it.
    innocents = [
        enqueue(conn, "sleep", {"seconds": 0.5, "note": f"i{i}"}, max_attempts=1) for i in range(6)
    ]
    healthy = [enqueue(conn, "record", {"note": f"h{i}"}) for i in range(5)]
    supervisor = daemons.worker(
        "--processes", "2", "--concurrency", "4", "--lease-seconds", "2",
        "--poll-interval", "0.5", "--shutdown-timeout", "2",
    )  # fmt: skip
    daemons.reaper(*FAST_REAPER)

    wait_until(lambda: dead_row(conn, poison) is not None, timeout=60)
    wait_until(lambda: all_succeeded(conn, healthy + innocents), timeout=60)

    dead = dead_row(conn, poison)
    assert dead is not None
    assert dead["reason"] == "lease_expired"
    assert dead["attempts"] == 2
    # First crash beside its neighbours: not counted. Then it ran alone, twice: counted.
    assert [e["kind"] for e in dead["errors"]] == ["lease_expired"] * 3
    assert [e["counted"] for e in dead["errors"]] == [False, True, True]
    assert job_row(conn, poison) is None
    assert executions(conn, poison) == 3
    # Nothing else was dead-lettered for the poison job's crashes.
    assert scalar(conn, "SELECT count(*) FROM pgqueue.dead_jobs") == 1
    # The supervisor replaced the children the poison job killed.
    assert len(logged(daemons, supervisor, "supervisor.child_died")) >= 2
    assert supervisor.poll() is None


def test_a_child_that_keeps_dying_soon_after_its_start_is_restarted_later_and_later(conn, daemons):
    # The supervisor's restart delay: 1 s, doubled (up to 30 s) while a slot's children
    # die within 10 s of their start, back to 1 s once one lived 10 s.
    supervisor = daemons.worker(
        "--processes", "2", "--concurrency", "1", "--lease-seconds", "60",
        "--poll-interval", "0.2",
    )  # fmt: skip
    wait_until(lambda: len(logged(daemons, supervisor, "worker.started")) == 2, timeout=30)

    def deaths() -> list[dict[str, Any]]:
        return logged(daemons, supervisor, "supervisor.child_died")

    # Each crash job kills the child that claims it, and stays running (a 60 s lease, no
    # reaper): five deaths in a row, spread over the two slots.
    for _ in range(5):
        enqueue(conn, "crash", max_attempts=1)
    wait_until(lambda: len(deaths()) >= 5, timeout=60)
    # Ten seconds after the last restart, every child has lived long enough.
    time.sleep(max(d["restart_in"] for d in deaths()) + 10.5)
    before = len(deaths())
    enqueue(conn, "crash", max_attempts=1)
    wait_until(lambda: len(deaths()) > before, timeout=30)

    by_slot: dict[int, list[dict[str, Any]]] = {}
    for death in deaths():
        by_slot.setdefault(death["slot"], []).append(death)
    for slot_deaths in by_slot.values():
        delay = 1.0
        for death in slot_deaths:
            if death["lived"] >= 10:
                delay = 1.0
            assert death["restart_in"] == delay, (death, slot_deaths)
            delay = min(30.0, delay * 2)
    # A slot died again soon after a restart: doubled.
    assert max(d["restart_in"] for d in deaths()[:before]) >= 2
    assert deaths()[-1]["lived"] >= 10 and deaths()[-1]["restart_in"] == 1.0  # reset
    assert supervisor.poll() is None


def test_supervisor_stopped_while_a_child_crash_loops_exits_nonzero(tmp_path):
    # A child that died and waits for its restart was skipped when the exit codes were
    # gathered, so a supervisor whose children kept crashing exited 0 on SIGTERM.
    import sys
    import textwrap
    import time

    script = tmp_path / "supervise.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from pgqueue.supervisor import Supervisor
            child = [sys.executable, "-c", "import sys; sys.exit(3)"]
            sys.exit(Supervisor(child, 1, 1.0, dsn="postgresql://unused").run())
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        time.sleep(2.5)  # the child has died at least once and waits for its restart
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"supervisor.child_died" in out, out
    assert proc.returncode == 1, out


def test_outcomes_written_while_the_database_is_read_only_wait_for_it_to_be_writable(conn, daemons):
    # A write refused with 25006 (read-only session: a standby during a failover,
    # default_transaction_read_only) was taken for a refused outcome: the completer
    # dropped every outcome of the window, and those jobs ran again once their leases
    # expired. And a session keeps the read-only default it started with: the worker
    # must replace its sessions, not retry on them for ever.
    ids = [enqueue(conn, "sleep", {"seconds": 4, "note": f"r{i}"}) for i in range(3)]
    worker = daemons.worker("--concurrency", "4", "--lease-seconds", "30")
    # All three running (each for 4 s more): their outcomes come in the read-only window.
    wait_until(lambda: all(executions(conn, job_id, "start") == 1 for job_id in ids))
    database = sql.Identifier(conn.info.dbname)
    conn.execute(
        sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(database)
    )
    # The worker's sessions from now on start read-only.
    terminate(conn, WORKER_BACKENDS)

    def refused_read_only() -> bool:
        return any(
            e.get("sqlstate") == "25006" and e["event"] == "completer.db_error"
            for e in events(daemons, worker)
        )

    wait_until(refused_read_only, timeout=30)
    # Writable again for new sessions; the worker's own are not ended this time.
    conn.execute(sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(database))
    wait_until(lambda: all_succeeded(conn, ids), timeout=30)

    for job_id in ids:
        assert executions(conn, job_id, "start") == 1
        row = job_row(conn, job_id)
        assert row is not None and not row["rescued"]
        assert [h["outcome"] for h in row["history"]] == ["succeeded"]
    assert not logged(daemons, worker, "outcome.failed")
    assert worker.poll() is None


# --- start and stop hooks (Registry.on_startup, on_shutdown) ------------------------------

HOOKS_APP = "tests.apps.hooks:registry"


def hook_notes(conn: psycopg.Connection[Any]) -> list[tuple[int, str]]:
    """(pid, note) of every hook and job recorded by tests.apps.hooks, in order."""
    rows = conn.execute("SELECT pid, note FROM public.executions ORDER BY id").fetchall()
    return [(int(pid), str(note)) for pid, note in rows]


def test_start_and_stop_hooks_run_in_each_worker_process_around_its_jobs(conn, daemons):
    supervisor = daemons.worker("--processes", "2", "--concurrency", "2", app=HOOKS_APP)
    pids_up = wait_until(lambda: up_children(daemons, supervisor, 2), timeout=30)
    quick = [enqueue(conn, "uses_client", {}) for _ in range(6)]
    wait_until(lambda: all_succeeded(conn, quick))
    # Running when the stop comes: the stop hooks run only after they have finished and
    # their outcomes are written (each counts the jobs not yet written as finished).
    slow = [enqueue(conn, "uses_client", {"seconds": 1.5}) for _ in range(3)]
    running = "SELECT count(*) FROM pgqueue.jobs WHERE id = ANY(%s) AND state = 'running'"
    wait_until(lambda: scalar(conn, running, (slow,)) == 3)
    with psycopg.connect(daemons.dsn) as holder:
        # Their outcomes' writes wait behind this lock, after the handlers have ended: a
        # stop hook that ran before the outcomes were written would see them unfinished.
        holder.execute("SELECT 1 FROM pgqueue.jobs WHERE id = ANY(%s) FOR UPDATE", (slow,))
        supervisor.send_signal(signal.SIGTERM)
        wait_until(lambda: [note for _, note in hook_notes(conn)].count("job") == 9)
        time.sleep(0.5)
    assert supervisor.wait(timeout=30) == 0
    assert all_succeeded(conn, quick + slow)
    notes = hook_notes(conn)
    assert {pid for pid, _ in notes} == pids_up
    for pid in pids_up:
        own = [note for p, note in notes if p == pid]
        jobs = own.count("job")
        # Startup hooks in the order registered, before any job; stop hooks in reverse,
        # after every job, with nothing left unwritten.
        assert own == [
            "startup:plain",
            "startup:async",
            *["job"] * jobs,
            "shutdown:async unfinished=0",
            "shutdown:plain unfinished=0",
        ], own
    assert sum(note == "job" for _, note in notes) == 9


def test_a_startup_hook_that_fails_stops_the_worker_before_it_claims(conn, daemons):
    job_id = enqueue(conn, "uses_client", {})
    worker = daemons.worker(app=HOOKS_APP, env={"HOOKS_MODE": "fail_startup"})
    assert worker.wait(timeout=30) == 1
    failed = logged(daemons, worker, "worker.startup_failed")
    assert len(failed) == 1, daemons.output(worker)
    assert failed[0]["hook"] == "tests.apps.hooks.open_client"
    (starting,) = logged(daemons, worker, "worker.starting")
    assert starting["hooks"] == ["tests.apps.hooks.open_plain", "tests.apps.hooks.open_client"]
    assert failed[0]["error"] == "RuntimeError: the payment service is down"
    assert "Traceback" in daemons.output(worker)
    assert not logged(daemons, worker, "worker.started")
    # Nothing claimed, nothing registered, no stop hook run (what they close never opened).
    assert job_row(conn, job_id)["state"] == "queued"  # type: ignore[index]
    assert job_row(conn, job_id)["attempts"] == 0  # type: ignore[index]
    assert scalar(conn, "SELECT count(*) FROM pgqueue.workers") == 0
    assert [note for _, note in hook_notes(conn)] == ["startup:plain"]


@pytest.mark.parametrize("mode", ["hang_startup", "stubborn_startup"])
def test_a_worker_stopped_during_a_startup_hook_stops_without_claiming(conn, daemons, mode):
    # stubborn: the hook swallows its cancellation; the process exits without it (it
    # ran on for ever, a review found).
    job_id = enqueue(conn, "uses_client", {})
    worker = daemons.worker(app=HOOKS_APP, env={"HOOKS_MODE": mode})
    wait_until(lambda: "startup:hanging" in [note for _, note in hook_notes(conn)])
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    assert logged(daemons, worker, "worker.startup_interrupted")
    assert job_state(conn, job_id) == "queued"
    assert [note for _, note in hook_notes(conn)] == ["startup:plain", "startup:hanging"]


@pytest.mark.parametrize("mode", ["fail_shutdown", "hang_shutdown", "stubborn_shutdown"])
def test_a_stop_hook_that_fails_or_hangs_does_not_keep_the_worker_from_stopping(
    conn, daemons, mode
):
    # stubborn: the hook swallows its cancellation; the process exits without it (it
    # ran on for ever, a review found).
    worker = daemons.worker("--shutdown-timeout", "1", app=HOOKS_APP, env={"HOOKS_MODE": mode})
    job_id = enqueue(conn, "uses_client", {})
    wait_until(lambda: all_succeeded(conn, [job_id]))
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    notes = [note for _, note in hook_notes(conn)]
    if mode == "fail_shutdown":
        # Logged, and the next hook runs all the same.
        failed = logged(daemons, worker, "worker.shutdown_hook_failed")
        assert [e["hook"] for e in failed] == ["tests.apps.hooks.close_client"], failed
        assert failed[0]["error"] == "RuntimeError: close failed"
        assert notes[-1] == "shutdown:plain unfinished=0"
    else:
        # Given up on within the shutdown timeout; the hooks after it are skipped.
        late = logged(daemons, worker, "worker.shutdown_hook_timeout")
        assert len(late) == 1, daemons.output(worker)
        assert late[0]["hook"] == "tests.apps.hooks.close_client"
        assert late[0]["skipped"] == ["tests.apps.hooks.close_plain"]
        assert notes[-1] == "shutdown:hanging"
    assert "worker.stopped" in daemons.output(worker)
    assert scalar(conn, "SELECT count(*) FROM pgqueue.workers") == 0
