"""The Reaper against a real Postgres: requeue expired leases, dead-letter exhausted
jobs, prune finished ones; several reapers at once never act twice on a job.

Expired and finished rows are written straight into the table with timestamps relative
to the database's clock, so nothing waits for a lease to run out.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import structlog
from prometheus_client import REGISTRY

from pgqueue import store
from pgqueue.config import ReaperConfig
from pgqueue.errors import ConfigError
from pgqueue.reaper import Reaper, ReapResult
from tests.conftest import (
    BIN,
    ROOT,
    dead_row,
    job_row,
    notified_before_sentinel,
    run_at_once,
    scalar,
    wait_until,
)
from tests.test_queries import db_clock, make_job, run_async


@contextmanager
def reaper(dsn: str, **options: Any) -> Iterator[Reaper]:
    r = Reaper(ReaperConfig(dsn=dsn, **options))
    try:
        yield r
    finally:
        r._close()  # the Reaper keeps its connection between passes


def run_once(dsn: str, **options: Any) -> ReapResult:
    with reaper(dsn, **options) as r:
        return r.run_once()


@pytest.mark.parametrize(
    ("options", "setting"), [({}, "off"), ({"prepared_statements": False}, "on")]
)
def test_reaper_connection_prices_out_seq_scans_while_its_plans_are_kept(dsn, options, setting):
    # Its prepared statements keep the plans they got with the table's size at the time
    # (tests/test_queries.py, new_table_dsn); unprepared ones are planned on every run.
    with reaper(dsn, **options) as r:
        row = r._connection().execute("SHOW enable_seqscan").fetchone()
        jit = r._connection().execute("SHOW jit").fetchone()

    assert row == (setting,)
    # JIT off beside it (store.NO_JIT): the server's default is on.
    assert jit == (setting,)


def expired_job(conn: psycopg.Connection[Any], **columns: Any) -> int:
    columns.setdefault("lease_expires_at", db_clock(conn) - timedelta(seconds=10))
    return make_job(conn, state="running", **columns)


def insert_expired(
    conn: psycopg.Connection[Any], n: int, attempts: int = 1, rescued: bool = True
) -> list[int]:
    rows = conn.execute(
        "INSERT INTO pgqueue.jobs (task, state, attempts, max_attempts, lease_token, leased_by,"
        " lease_expires_at, attempted_at, rescued)"
        " SELECT 't', 'running', %s, 5, gen_random_uuid(), 'gone',"
        "        now() - interval '1 minute', now() - interval '2 minutes', %s"
        " FROM generate_series(1, %s) RETURNING id",
        (attempts, rescued, n),
    ).fetchall()
    return [r[0] for r in rows]


# --- expired leases -----------------------------------------------------------------------


def test_expired_job_with_attempts_left_is_requeued_once_with_backoff(conn, dsn):
    # A rescued job ran alone: its attempt counts (see the isolation tests below).
    job_id = expired_job(conn, attempts=3, max_attempts=5, leased_by="dead-worker", rescued=True)
    before = db_clock(conn)

    result = run_once(dsn, backoff_base_seconds=10.0, backoff_max_seconds=3600.0)

    after = db_clock(conn)
    assert result.requeued == [job_id]
    assert result.dead == []
    row = job_row(conn, job_id)
    assert row is not None
    assert row["state"] == "queued"
    assert row["attempts"] == 3
    assert row["lease_token"] is None
    assert row["lease_expires_at"] is None
    # backoff_delay(3, base 10) = 10 * 2^2 = 40 s, times a jitter in [0.75, 1.25).
    assert before + timedelta(seconds=30) <= row["run_at"] <= after + timedelta(seconds=50)
    assert len(row["errors"]) == 1
    error = row["errors"][0]
    assert error["kind"] == "lease_expired"
    assert error["attempt"] == 3
    assert error["worker"] == "dead-worker"
    assert error["error"]

    # A second pass finds nothing: the job is queued, not running under an expired lease.
    again = run_once(dsn, backoff_base_seconds=10.0)
    assert again.requeued == []
    assert again.dead == []
    assert job_row(conn, job_id) == row


def test_the_reapers_backoff_max_is_a_flag_and_a_base_above_it_is_refused(conn, dsn):
    # --backoff-base-seconds above the fixed 3600 s max was taken and then capped there.
    refused = subprocess.run(
        [str(BIN / "pgqueue-reaper"), "--once", "--backoff-base-seconds", "7200", "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2, refused.stderr
    assert "backoff base (7200s) is above the backoff max (3600s)" in refused.stderr

    job_id = expired_job(conn, attempts=1, max_attempts=5, rescued=True)
    before = db_clock(conn)
    done = subprocess.run(
        [str(BIN / "pgqueue-reaper"), "--once", "--backoff-base-seconds", "7200",
         "--backoff-max-seconds", "86400", "--dsn", dsn],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    row = job_row(conn, job_id)
    assert row is not None and row["state"] == "queued"
    # backoff_delay(1, base 7200) = 7200 s, times a jitter in [0.75, 1.25).
    assert row["run_at"] >= before + timedelta(seconds=5400)


def test_running_job_whose_lease_has_not_expired_is_untouched(conn, dsn):
    job_id = make_job(conn, state="running", lease_expires_at=db_clock(conn) + timedelta(minutes=5))
    before = job_row(conn, job_id)

    result = run_once(dsn)

    assert result == ReapResult(requeued=[], dead=[], pruned=0)
    assert job_row(conn, job_id) == before


def test_running_job_whose_lease_expires_in_a_moment_is_untouched(conn, dsn):
    # Found by a mutation audit: a reaper reaping a second early went unnoticed with
    # only a five-minute lease in the tests. Expiry is exact.
    expires = db_clock(conn) + timedelta(seconds=1)
    job_id = make_job(conn, state="running", lease_expires_at=expires)
    before = job_row(conn, job_id)

    result = run_once(dsn)

    if result.requeued and db_clock(conn) >= expires:
        pytest.skip("the reaper's pass outlasted the lease: nothing to tell")
    assert result == ReapResult(requeued=[], dead=[], pruned=0)
    assert job_row(conn, job_id) == before


def test_job_whose_expired_lease_was_extended_by_a_heartbeat_is_untouched(conn, dsn):
    token = uuid.uuid4()
    job_id = expired_job(conn, lease_token=token)
    # The worker was slow, not dead: its heartbeat lands before the reaper's pass.
    extended = run_async(dsn, store.extend_leases, ids=[job_id], tokens=[token], lease_seconds=60.0)
    assert extended == {job_id}
    before = job_row(conn, job_id)

    result = run_once(dsn)

    assert result.requeued == []
    assert result.dead == []
    after = job_row(conn, job_id)
    assert after == before
    assert after is not None
    assert after["state"] == "running"
    assert after["lease_token"] == token


def test_expired_job_with_no_attempts_left_is_dead_lettered_as_lease_expired(conn, dsn):
    job_id = expired_job(
        conn,
        attempts=3,
        max_attempts=3,
        leased_by="dead-worker",
        errors=[{"kind": "error"}],
        rescued=True,
        args={"order": 42, "note": "é"},
        priority=7,
        queue="billing",
        task="charge",
        idempotency_key="order-42",
    )
    live = expired_job(conn, attempts=1, max_attempts=3, rescued=True)

    result = run_once(dsn)

    assert result.dead == [job_id]
    assert result.requeued == [live]
    assert job_row(conn, job_id) is None
    dead = dead_row(conn, job_id)
    assert dead is not None
    assert dead["reason"] == "lease_expired"
    assert dead["attempts"] == 3
    assert len(dead["errors"]) == 2
    assert dead["errors"][0] == {"kind": "error"}
    assert dead["errors"][1]["kind"] == "lease_expired"
    assert dead["errors"][1]["worker"] == "dead-worker"
    assert dead["errors"][1]["attempt"] == 3
    # The job itself survives the move (a mutation audit found no test of it).
    assert (dead["args"], dead["priority"], dead["queue"], dead["task"]) == (
        {"order": 42, "note": "é"},
        7,
        "billing",
        "charge",
    )
    assert (dead["idempotency_key"], dead["max_attempts"]) == ("order-42", 3)


def test_two_concurrent_reapers_requeue_each_expired_job_exactly_once(conn, dsn):
    ids = insert_expired(conn, 500)

    def reap(start: threading.Barrier) -> ReapResult:
        with reaper(dsn, batch_size=25) as r:
            r._connection()  # connect before the barrier, so both start together
            start.wait(timeout=30)
            return r.run_once()

    results = run_at_once(reap)
    requeued = results[0].requeued + results[1].requeued
    assert len(requeued) == len(set(requeued))
    assert sorted(requeued) == sorted(ids)
    assert scalar(conn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'queued'") == 500
    assert (
        scalar(
            conn,
            "SELECT count(*) FROM pgqueue.jobs"
            " WHERE jsonb_array_length(errors) <> 1 OR attempts <> 1",
        )
        == 0
    )


def test_one_pass_works_through_every_batch(conn, dsn):
    requeue = insert_expired(conn, 35, attempts=1)
    dead = insert_expired(conn, 35, attempts=5)
    conn.execute(
        "INSERT INTO pgqueue.jobs (task, state, finished_at)"
        " SELECT 't', 'succeeded', now() - interval '2 days' FROM generate_series(1, 35)"
    )

    result = run_once(dsn, batch_size=10, retention_seconds=3600.0)

    assert sorted(result.requeued) == sorted(requeue)
    assert sorted(result.dead) == sorted(dead)
    assert result.pruned == 35
    assert scalar(conn, "SELECT count(*) FROM pgqueue.jobs WHERE state <> 'queued'") == 0
    assert scalar(conn, "SELECT count(*) FROM pgqueue.dead_jobs") == 35


# --- pruning ------------------------------------------------------------------------------


def test_prune_deletes_only_finished_jobs_older_than_retention(conn, dsn):
    now = db_clock(conn)
    old = now - timedelta(hours=2)
    recent = now - timedelta(minutes=10)
    pruned = {
        make_job(conn, state="succeeded", finished_at=old),
        make_job(conn, state="cancelled", finished_at=old),
    }
    kept = {
        make_job(conn, state="succeeded", finished_at=recent),
        make_job(conn, state="cancelled", finished_at=recent),
        # Unfinished jobs stay whatever their timestamps say (a finished_at on them is
        # not something the library writes; it makes the state check the only guard).
        make_job(conn, state="queued", run_at=old, created_at=old, finished_at=old),
        make_job(
            conn,
            state="running",
            created_at=old,
            finished_at=old,
            lease_expires_at=now + timedelta(minutes=5),
        ),
    }

    result = run_once(dsn, retention_seconds=3600.0)

    assert result.pruned == 2
    remaining = {r[0] for r in conn.execute("SELECT id FROM pgqueue.jobs").fetchall()}
    assert remaining == kept
    assert remaining.isdisjoint(pruned)
    assert scalar(conn, "SELECT count(*) FROM pgqueue.dead_jobs") == 0


def insert_finished(conn: psycopg.Connection[Any], n: int) -> None:
    conn.execute(
        "INSERT INTO pgqueue.jobs (task, state, finished_at)"
        " SELECT 't', 'succeeded', now() - interval '2 days' FROM generate_series(1, %s)",
        (n,),
    )


def test_a_pass_prunes_for_its_time_and_leaves_the_rest_to_the_next(conn, dsn):
    # A backlog of finished jobs (a retention shortened, a reaper down for days) was
    # pruned to its end before the pass ended: a lease expiring meanwhile waited for all
    # of it. A pass prunes for prune_seconds_per_pass, at least one batch, and says
    # whether it left any; the next pass requeues first.
    insert_finished(conn, 35)
    with reaper(dsn, batch_size=10, prune_seconds_per_pass=1e-6) as r:
        first = r.run_once()
        assert (first.pruned, first.more_to_prune) == (10, True)
        job = expired_job(conn)
        second = r.run_once()
        assert (second.requeued, second.pruned, second.more_to_prune) == ([job], 10, True)
        # Told to, a pass prunes the whole backlog (`pgqueue reaper --once`).
        rest = r.run_once(prune_seconds=math.inf)
        assert (rest.pruned, rest.more_to_prune) == (15, False)
        for bad in (0, -1, math.nan, True, "2"):
            with pytest.raises(ConfigError, match="prune_seconds"):
                r.run_once(prune_seconds=bad)  # type: ignore[arg-type]
    assert scalar(conn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded'") == 0
    # A backlog that ends within a pass's time leaves nothing: the last batch is short.
    insert_finished(conn, 20)
    with reaper(dsn, batch_size=10, prune_seconds_per_pass=60.0) as r:
        assert (r.run_once().pruned, r.run_once().more_to_prune) == (20, False)


def test_the_next_pass_starts_at_once_while_finished_jobs_are_left_to_prune(conn, dsn):
    # Passes that leave pruning to the next do not wait an interval in between: pruning
    # goes on at the rate it had, with a requeue between two passes.
    insert_finished(conn, 60)
    r = Reaper(ReaperConfig(dsn=dsn, interval=30, batch_size=10, prune_seconds_per_pass=1e-6))
    thread = threading.Thread(target=r.run, kwargs={"handle_signals": False})
    thread.start()
    try:
        # Six passes with no wait between them; an interval of 30 s between each would
        # leave 50 jobs for minutes.
        wait_until(lambda: scalar(conn, "SELECT count(*) FROM pgqueue.jobs") == 0, timeout=10)
    finally:
        r.stop(cancel=True)
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_pruning_a_finished_job_frees_its_idempotency_key(conn, dsn):
    holder = make_job(
        conn,
        state="succeeded",
        finished_at=db_clock(conn) - timedelta(days=2),
        idempotency_key="order-17",
    )
    enqueue = "SELECT pgqueue.enqueue('t', idempotency_key => %s)"
    # While retained, the key is held: enqueue returns the holder and inserts nothing.
    assert scalar(conn, enqueue, ("order-17",)) == holder
    assert scalar(conn, "SELECT count(*) FROM pgqueue.jobs") == 1

    result = run_once(dsn, retention_seconds=3600.0)

    assert result.pruned == 1
    new_id = scalar(conn, enqueue, ("order-17",))
    assert new_id != holder
    row = job_row(conn, new_id)
    assert row is not None
    assert row["state"] == "queued"
    assert row["idempotency_key"] == "order-17"
    assert job_row(conn, holder) is None


# --- isolation of rescued jobs (migration 0003) ---------------------------------------------


def test_first_expiry_is_not_counted_and_marks_the_job_to_run_alone(conn, dsn):
    # A job whose worker died under it, beside others: maybe not the culprit.
    job_id = expired_job(conn, attempts=1, max_attempts=1, leased_by="dead-worker")
    before = db_clock(conn)

    result = run_once(dsn, backoff_base_seconds=60.0)

    assert (result.requeued, result.dead) == ([job_id], [])
    row = job_row(conn, job_id)
    assert row is not None
    # Not dead-lettered although attempts == max_attempts: the crash is not counted...
    assert (row["state"], row["attempts"], row["rescued"]) == ("queued", 0, True)
    # ...and it is runnable at once (no backoff), alone.
    assert row["run_at"] <= db_clock(conn) and row["run_at"] >= before
    assert row["errors"][0]["kind"] == "lease_expired"
    assert row["errors"][0]["counted"] is False


def test_expiry_of_a_rescued_job_counts_and_ends_in_the_dead_letter_table(conn, dsn):
    job_id = expired_job(conn, attempts=2, max_attempts=2, rescued=True)

    result = run_once(dsn)

    assert result.dead == [job_id]
    dead = dead_row(conn, job_id)
    assert dead is not None and dead["attempts"] == 2 and dead["reason"] == "lease_expired"
    # Its entry says the loss counted (a mutation audit found no test of it).
    assert dead["errors"][-1]["kind"] == "lease_expired"
    assert dead["errors"][-1]["counted"] is True


def test_a_job_whose_id_the_dead_letter_table_holds_is_dead_lettered_under_a_new_id(conn, dsn):
    # Ids can repeat (an explicit id in an INSERT, a sequence set back): moving such a job
    # to pgqueue.dead_jobs failed on its primary key. It failed the reaper's whole batch
    # on every pass at first; then such jobs were left out, running for good, until an
    # operator retried or purged the older dead job. Now it is stored under a new id.
    taken = expired_job(conn, attempts=3, max_attempts=3, rescued=True)
    conn.execute(
        "INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts,"
        " max_attempts, run_at, created_at, errors, history, reason)"
        " VALUES (%s, 'default', 'older', '{}', 0, 1, 1, now(), now(), '[]', '[]', 'permanent')",
        (taken,),
    )
    innocent = expired_job(conn, attempts=3, max_attempts=3, rescued=True)
    moved = job_row(conn, taken)
    assert moved is not None

    with structlog.testing.capture_logs() as logs:
        result = run_once(dsn)

    assert sorted(result.dead) == [taken, innocent]
    assert job_row(conn, innocent) is None and dead_row(conn, innocent) is not None
    assert job_row(conn, taken) is None
    older = dead_row(conn, taken)
    assert older is not None and older["task"] == "older"  # the older record is untouched
    (dead,) = conn.execute(
        "SELECT id, task, attempts, reason, original_id FROM pgqueue.dead_jobs"
        " WHERE original_id = %s",
        (taken,),
    ).fetchall()
    assert dead[1:] == (moved["task"], 3, "lease_expired", taken)
    assert dead[0] > innocent  # the next id of the jobs sequence
    events = {e["job_id"]: e for e in logs if e["event"] == "job.dead"}
    assert events[taken]["dead_id"] == dead[0]
    assert "dead_id" not in events[innocent]
    assert run_once(dsn).dead == []


def test_a_requeue_wakes_the_workers_of_the_jobs_queue_to_check_for_rescued_jobs(conn, dsn):
    # Without its notification an idle worker found the requeued job only at its next
    # poll (--poll-interval, 5 s by default), adding that to every recovery. A requeued
    # job is rescued, which the claim leaves to the workers' check for rescued jobs: the
    # queue's name woke them to a claim that took nothing, and the job still waited for
    # that check, once per poll. Its own payload makes them check at once.
    expired_job(conn, queue="rescue-me")
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgqueue_jobs")
        assert len(run_once(dsn).requeued) == 1
        assert notified_before_sentinel(conn, listener) == [" rescued rescue-me"]


def test_a_cancelled_jobs_run_at_is_left_as_it_was(conn, dsn):
    # Cancelled when its lease expired: it never runs again, so no backoff is added to
    # its run_at (pgqueue status showed a run_at in the future).
    job_id = expired_job(conn, attempts=2, max_attempts=5, rescued=True)
    conn.execute(
        "UPDATE pgqueue.jobs SET cancel_requested_at = now(), run_at = '2030-01-01T00:00Z'"
        " WHERE id = %s",
        (job_id,),
    )
    assert run_once(dsn, backoff_base_seconds=600).cancelled == [job_id]
    row = job_row(conn, job_id)
    assert row is not None and row["state"] == "cancelled"
    assert row["run_at"] == datetime(2030, 1, 1, tzinfo=UTC)


def test_a_rescued_job_on_its_last_attempt_whose_cancel_was_requested_is_cancelled(conn, dsn):
    # Without the cancel clause in requeue_expired's filter such a job was neither
    # requeued, cancelled nor dead-lettered: it stayed running, its lease expired, for good.
    job_id = expired_job(conn, attempts=3, max_attempts=3, rescued=True)
    conn.execute("UPDATE pgqueue.jobs SET cancel_requested_at = now() WHERE id = %s", (job_id,))

    result = run_once(dsn)

    assert (result.requeued, result.dead, result.cancelled) == ([], [], [job_id])
    row = job_row(conn, job_id)
    assert row is not None and row["state"] == "cancelled"
    assert row["errors"][-1]["kind"] == "lease_expired" and row["errors"][-1]["counted"] is True
    assert dead_row(conn, job_id) is None


def test_sigterm_ends_a_once_pass_between_batches_with_its_summary(conn, dsn):
    # Without its handlers, SIGTERM killed `--once` mid-pass: exit 143, no summary.
    insert_expired(conn, 60_000, rescued=False)
    proc = subprocess.Popen(
        [str(BIN / "pgqueue-reaper"), "--once", "--log-level", "error", "--dsn", dsn],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(
            lambda: scalar(conn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'queued'"),
            timeout=30, interval=0.01,
        )  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, (out, err)
    summary = out.strip().splitlines()[-1]
    requeued = int(summary.split(",")[0].split()[-1])
    assert 0 < requeued < 60_000, out
    assert scalar(conn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'queued'") == requeued


def test_a_reaper_whose_session_is_read_only_replaces_it(conn, dsn, tmp_path):
    # A refused write (25006: a standby during a failover, default_transaction_read_only)
    # was retried on the same session, which keeps the read-only default it started
    # with: the reaper reaped nothing until it was restarted.
    database = psycopg.sql.Identifier(conn.info.dbname)
    conn.execute(
        psycopg.sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(database)
    )
    log = tmp_path / "reaper.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "pgqueue-reaper"), "--interval", "0.2", "--log-format", "json",
             "--dsn", dsn],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: '"sqlstate": "25006"' in log.read_text(), timeout=30)
        conn.execute(
            psycopg.sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(
                database
            )
        )
        job_id = expired_job(conn, attempts=1)
        wait_until(lambda: job_row(conn, job_id)["state"] == "queued", timeout=30)  # type: ignore[index]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0, log.read_text()


def test_reaper_requeued_names_the_lost_attempt_and_whether_it_counted(conn, dsn):
    # It logged the attempts left after the requeue: "attempt": 0 for a job lost in its
    # first attempt, which read like a bug.
    first = expired_job(conn, attempts=1)
    rescued = expired_job(conn, attempts=2, rescued=True, max_attempts=5)
    with structlog.testing.capture_logs() as logs:
        assert sorted(run_once(dsn).requeued) == sorted([first, rescued])
    seen = {
        e["job_id"]: (e["attempt"], e["counted"]) for e in logs if e["event"] == "reaper.requeued"
    }
    assert seen == {first: (1, False), rescued: (2, True)}
    assert job_row(conn, first)["attempts"] == 0  # type: ignore[index]
    assert job_row(conn, rescued)["attempts"] == 2  # type: ignore[index]


# --- reapers embedded in workers (leader_only) ---------------------------------------------


def test_only_the_leader_among_embedded_reapers_reaps_and_another_takes_over(conn, dsn):
    job = expired_job(conn)
    with reaper(dsn, leader_only=True) as first, reaper(dsn, leader_only=True) as second:
        assert first.run_once().requeued == [job]
        assert first.leading
        # The lead is held: the second does nothing, even with work to do.
        again = expired_job(conn)
        assert second.run_once() == ReapResult([], [], 0)
        assert not second.leading
        assert job_row(conn, again)["state"] == "running"  # type: ignore[index]
        # A standalone reaper does not ask for the lead, and reaps anyway.
        assert run_once(dsn).requeued == [again]

        # The leader's connection ends (crash, cut): the lock goes with its session.
        # The server drops that session's locks a moment after the client hangs up; until
        # then the second covers (reaps without the lead), which is not what is tested here.
        gone = first._lead_pid
        first._close()
        held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s"
        wait_until(lambda: not scalar(conn, held, (gone,)))
        third = expired_job(conn)
        assert second.run_once().requeued == [third]
        assert second.leading
        # The old leader, reconnecting, finds the lead taken.
        assert first.run_once() == ReapResult([], [], 0)
        assert not first.leading


def test_a_standby_reaps_when_the_leader_has_left_a_lease_expired_too_long(conn, dsn):
    # A frozen leader (SIGSTOP, a paused VM) keeps its session and its lock: a standby
    # must not wait for it once a lease has been expired for over two passes + slack.
    with reaper(dsn, leader_only=True, interval=1) as leader:
        leader.run_once()
        assert leader.leading
        with reaper(dsn, leader_only=True, interval=1) as standby:
            recent = expired_job(conn, lease_expires_at=db_clock(conn) - timedelta(seconds=2))
            assert standby.run_once() == ReapResult([], [], 0)
            assert job_row(conn, recent)["state"] == "running"  # type: ignore[index]

            overdue = expired_job(conn, lease_expires_at=db_clock(conn) - timedelta(seconds=8))
            assert sorted(standby.run_once().requeued) == sorted([recent, overdue])
            assert not standby.leading


def test_a_standby_prunes_when_the_leading_session_has_been_quiet_too_long(conn, dsn):
    # A frozen leader with no lease to expire still stalled pruning and the forgetting
    # of dead workers: the standby also watches the leading session.
    finished = make_job(conn, state="succeeded")
    conn.execute(
        "UPDATE pgqueue.jobs SET finished_at = now() - interval '2 days' WHERE id = %s",
        (finished,),
    )
    with reaper(dsn, leader_only=True) as leader, reaper(dsn, leader_only=True) as standby:
        leader._lead(leader._connection())  # takes the lead, then does nothing more
        standby._stall_seconds = 0.5  # instead of 2 intervals + 30 s
        assert standby.run_once().pruned == 0  # the leader's session was just active
        time.sleep(1.0)
        assert standby.run_once().pruned == 1
        assert not standby.leading


def test_a_leader_whose_session_changes_under_it_reaps_every_pass(conn, dsn):
    # PgBouncer in transaction pooling mode hands each transaction some server session:
    # the lock means nothing there. (Simulated: the recorded session is another one.)
    with reaper(dsn, leader_only=True) as r:
        r.run_once()
        assert r.leading
        r._lead_pid = -1
        with structlog.testing.capture_logs() as logs:
            job = expired_job(conn)
            assert r.run_once().requeued == [job]
        assert [e["event"] for e in logs if e["event"] == "reaper.pooled_session"] == [
            "reaper.pooled_session"
        ]
        assert r.leading


def test_stop_with_cancel_ends_a_pass_blocked_on_a_lock(conn, dsn):
    # A worker stopping must not wait for its embedded reaper's statement.
    r = Reaper(ReaperConfig(dsn=dsn, interval=0.1, leader_only=True))
    with psycopg.connect(dsn) as blocker:
        blocker.execute("LOCK TABLE pgqueue.workers IN ACCESS EXCLUSIVE MODE")
        with structlog.testing.capture_logs() as logs:
            thread = threading.Thread(target=r.run, kwargs={"handle_signals": False})
            thread.start()
            wait_until(
                lambda: scalar(
                    conn,
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name = 'pgqueue-reaper' AND wait_event_type = 'Lock'",
                )
            )
            r.stop(cancel=True)
            thread.join(timeout=10)
            assert not thread.is_alive()
        blocker.rollback()
    events_ = [e["event"] for e in logs]
    assert "reaper.stopped" in events_, events_
    assert "reaper.failed" not in events_ and "reaper.disconnected" not in events_, events_


def test_the_reaper_passes_every_interval(conn, dsn):
    # Found by a mutation audit: the loop could wait ten intervals between passes and
    # no test noticed; a lease that expired just after a pass waited that much longer.
    r = Reaper(ReaperConfig(dsn=dsn, interval=0.5))
    first_pass = threading.Event()
    real_run_once = r.run_once

    def counted() -> ReapResult:
        result = real_run_once()
        first_pass.set()
        return result

    r.run_once = counted  # type: ignore[method-assign]
    thread = threading.Thread(target=r.run, kwargs={"handle_signals": False})
    thread.start()
    try:
        assert first_pass.wait(timeout=15)
        job = expired_job(conn)
        # The next pass is due 0.5 s after the first; ten intervals would be 5 s.
        wait_until(lambda: job_row(conn, job)["state"] == "queued", timeout=3)  # type: ignore[index]
    finally:
        r.stop(cancel=True)
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_health_says_so_while_a_pass_waits_on_a_lock(conn, dsn):
    # A pass blocked behind a lock on pgqueue.jobs reaps nothing; /healthz said 200.
    r = Reaper(ReaperConfig(dsn=dsn, interval=0.1))
    r._stall_seconds = 1.0  # 2 intervals + 30 s otherwise
    thread = threading.Thread(target=r.run, kwargs={"handle_signals": False})
    thread.start()
    try:
        wait_until(lambda: r.health()[0])
        with psycopg.connect(dsn) as blocker:
            blocker.execute("LOCK TABLE pgqueue.jobs IN ACCESS EXCLUSIVE MODE")
            _, reason = wait_until(lambda: None if (h := r.health())[0] else h)
            assert "a pass has waited" in reason and "lock" in reason, reason
            blocker.rollback()
        wait_until(lambda: r.health()[0])
    finally:
        r.stop(cancel=True)
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_a_worker_with_reaper_requeues_expired_jobs_prunes_and_stops_cleanly(conn, daemons):
    lost = expired_job(conn, task="record", leased_by="gone:1:abc")
    old = make_job(conn, state="succeeded", task="record")
    conn.execute(
        "UPDATE pgqueue.jobs SET finished_at = now() - interval '2 hours' WHERE id = %s", (old,)
    )
    worker = daemons.worker("--reaper", "--reaper-interval", "0.2", "--retention-seconds", "3600")

    wait_until(lambda: job_row(conn, lost)["state"] == "succeeded")  # type: ignore[index]
    wait_until(lambda: job_row(conn, old) is None)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    output = daemons.output(worker)
    for event in ("reaper.leading", "reaper.requeued", "reaper.pruned", "reaper.stopped"):
        assert f'"event": "{event}"' in output, output


def test_embedded_reapers_hand_over_the_lead_when_their_worker_is_killed(conn, daemons):
    first = daemons.worker("--reaper", "--reaper-interval", "0.2")
    wait_until(lambda: '"reaper.leading"' in daemons.output(first))
    second = daemons.worker("--reaper", "--reaper-interval", "0.2")
    wait_until(lambda: '"reaper.standby"' in daemons.output(second))

    first.kill()
    first.wait(timeout=10)
    wait_until(lambda: '"reaper.leading"' in daemons.output(second))
    lost = expired_job(conn, task="record", leased_by="gone:1:abc")
    wait_until(lambda: job_row(conn, lost)["state"] == "succeeded")  # type: ignore[index]


def test_bad_embedded_reaper_settings_are_refused_before_any_child_starts(dsn):
    for flags in (["--retention-seconds", "1e10"], ["--reaper-interval", "nan"]):
        result = subprocess.run(
            [str(BIN / "pgqueue-worker"), "--app", "tests.apps.sample:registry",
             "--processes", "2", "--reaper", *flags],
            env={**os.environ, "PGQUEUE_DSN": dsn, "PYTHONPATH": str(ROOT)},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 2, (flags, result.stdout, result.stderr)
        assert "--reaper-interval/--retention-seconds" in result.stderr, result.stderr
        assert "supervisor.spawned" not in result.stdout


def test_pgqueue_reaper_reads_its_interval_and_retention_from_the_environment(conn, dsn):
    finished = make_job(conn, state="succeeded")
    conn.execute(
        "UPDATE pgqueue.jobs SET finished_at = now() - interval '60 seconds' WHERE id = %s",
        (finished,),
    )
    result = subprocess.run(
        [str(BIN / "pgqueue-reaper"), "--once"],
        env={**os.environ, "PGQUEUE_DSN": dsn, "PGQUEUE_RETENTION_SECONDS": "5",
             "PGQUEUE_REAPER_INTERVAL": "7"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "pruned 1" in result.stdout
    assert job_row(conn, finished) is None


def test_a_statement_refused_on_a_sound_connection_keeps_it_and_the_lead(conn, dsn):
    # A lock timeout (or a serialization failure, a cancelled statement) is an
    # OperationalError on a connection that is fine: log it as what it is and keep the
    # session, whose lock is the lead. Dropping it handed the lead away for a pass.
    r = Reaper(ReaperConfig(dsn=dsn, interval=0.1, leader_only=True))
    thread = threading.Thread(target=r.run, kwargs={"handle_signals": False})
    try:
        r.run_once()
        assert r.leading and r._conn is not None
        session = r._conn.info.backend_pid
        r._conn.execute("SET lock_timeout = '200ms'")
        with structlog.testing.capture_logs() as logs:
            with psycopg.connect(dsn) as blocker:
                blocker.execute("LOCK TABLE pgqueue.workers IN ACCESS EXCLUSIVE MODE")
                thread.start()
                wait_until(lambda: any(e["event"].startswith("reaper.d") for e in logs))
                blocker.rollback()
            job = expired_job(conn)
            wait_until(lambda: job_row(conn, job)["state"] == "queued")  # type: ignore[index]
            r.stop()
            thread.join(timeout=10)
            assert not thread.is_alive()
        events_ = [e["event"] for e in logs]
        assert "reaper.db_error" in events_, events_
        refused = logs[events_.index("reaper.db_error")]
        assert refused["sqlstate"] == "55P03" and refused["error_type"] == "LockNotAvailable"
        assert "reaper.disconnected" not in events_ and "reaper.leadership_lost" not in events_
        assert r._leader and r._lead_pid == session
    finally:
        r.stop(cancel=True)
        if thread.is_alive():
            thread.join(timeout=10)
        r._close()


def test_only_errors_that_end_the_session_are_logged_as_disconnected():
    from psycopg import errors
    from psycopg_pool import PoolTimeout

    from pgqueue.worker.backoff import error_fields, lost_connection, retry_event

    for lost in (
        psycopg.OperationalError("server closed the connection unexpectedly"),
        errors.AdminShutdown("terminating connection due to administrator command"),
        errors.CannotConnectNow("the database system is starting up"),
        errors.ConnectionFailure("x"),
        PoolTimeout("couldn't get a connection after 30.00 sec"),
        ConnectionResetError(),
        psycopg.InterfaceError("the connection is closed"),
    ):
        assert lost_connection(lost), lost
        assert retry_event("fetcher", lost) == "fetcher.disconnected"
    for refused in (
        errors.SerializationFailure("x"),
        errors.DeadlockDetected("x"),
        errors.QueryCanceled("canceling statement due to statement timeout"),
        errors.LockNotAvailable("x"),
    ):
        assert not lost_connection(refused), refused
        assert retry_event("completer", refused) == "completer.db_error"
    assert error_fields(TimeoutError()) == {"error": "TimeoutError", "error_type": "TimeoutError"}
    assert error_fields(errors.SerializationFailure("could not serialize")) == {
        "error": "could not serialize",
        "error_type": "SerializationFailure",
        "sqlstate": "40001",
    }


def test_a_stale_worker_row_another_session_holds_locked_does_not_fail_the_pass(conn, dsn):
    # delete_stale_workers waited on it: under a lock timeout every pass failed at its
    # end and the retries backed off, spreading out the requeues.
    for name in ("locked", "free"):
        conn.execute(
            "INSERT INTO pgqueue.workers (id, host, pid, queues, concurrency,"
            " heartbeat_seconds, version, last_heartbeat_at) VALUES (%s, 'h', 1,"
            " ARRAY['default'], 1, 1, '0', now() - interval '1 hour')",
            (name,),
        )
    job = expired_job(conn)
    with psycopg.connect(dsn) as holder, reaper(dsn) as r:
        holder.execute("SELECT 1 FROM pgqueue.workers WHERE id = 'locked' FOR UPDATE")
        assert r._connection() is not None
        r._conn.execute("SET lock_timeout = '200ms'")  # type: ignore[union-attr]
        with structlog.testing.capture_logs() as logs:
            assert r.run_once().requeued == [job]
        gone = [e["worker_id"] for e in logs if e["event"] == "reaper.worker_gone"]
        assert gone == ["free"]
        holder.rollback()
        with structlog.testing.capture_logs() as logs:
            r.run_once()
        assert [e["worker_id"] for e in logs if e["event"] == "reaper.worker_gone"] == ["locked"]


def test_a_worker_is_forgotten_after_three_missed_heartbeats_not_before(conn, dsn):
    # With two instead of three, a worker two and a half beats late (a slow beat, a
    # short stall) vanished from `pgqueue workers` and the pgqueue_workers gauge.
    for name, seconds_ago in (("late", 25), ("gone", 35)):
        conn.execute(
            "INSERT INTO pgqueue.workers (id, host, pid, queues, concurrency,"
            " heartbeat_seconds, version, last_heartbeat_at) VALUES (%s, 'h', 1,"
            " ARRAY['default'], 1, 10, '0', now() - make_interval(secs => %s))",
            (name, seconds_ago),
        )
    with structlog.testing.capture_logs() as logs:
        run_once(dsn)
    assert [e["worker_id"] for e in logs if e["event"] == "reaper.worker_gone"] == ["gone"]
    assert [r[0] for r in conn.execute("SELECT id FROM pgqueue.workers")] == ["late"]


def test_the_reapers_counters_count_every_expiry_and_every_pruned_job(conn, dsn):
    # Expiries that ended in the dead-letter table were left out of
    # pgqueue_leases_expired_total, and pgqueue_jobs_pruned_total stayed at 0 (a mutation
    # audit found no test of either).
    queues = {kind: f"m-{kind}-{uuid.uuid4().hex[:8]}" for kind in ("requeued", "dead")}
    expired_job(conn, attempts=1, max_attempts=3, queue=queues["requeued"])
    expired_job(conn, attempts=3, max_attempts=3, rescued=True, queue=queues["dead"])
    for _ in range(2):
        make_job(conn, state="succeeded", finished_at=db_clock(conn) - timedelta(days=2))

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    pruned_before = sample("pgqueue_jobs_pruned_total")
    result = run_once(dsn, retention_seconds=3600.0)

    assert (len(result.requeued), len(result.dead), result.pruned) == (1, 1, 2)
    for queue in queues.values():
        assert sample("pgqueue_leases_expired_total", queue=queue) == 1
    assert sample("pgqueue_jobs_pruned_total") == pruned_before + 2


@pytest.mark.parametrize("prepared", [True, False])
def test_a_job_a_foreign_key_keeps_does_not_stop_the_reapers_other_work(
    conn, dsn, monkeypatch, prepared
):
    # A table of the user's references jobs with a plain foreign key (NO ACTION). One
    # referenced job failed each batch it was in: nothing was pruned or dead-lettered
    # again, every later step of the pass (stale workers) was skipped, and a referenced
    # job out of attempts stayed running for good. Found by a review.
    conn.execute("CREATE TABLE public.receipts (job_id bigint REFERENCES pgqueue.jobs (id))")
    now = db_clock(conn)
    finished = [
        make_job(conn, state="succeeded", finished_at=now - timedelta(hours=10 - i))
        for i in range(5)
    ]
    exhausted = insert_expired(conn, 3, attempts=5)
    # The oldest finished job (first in every prune batch), and one dead-letter candidate.
    conn.execute("INSERT INTO public.receipts VALUES (%s), (%s)", (finished[0], exhausted[1]))
    conn.execute(
        "INSERT INTO pgqueue.workers (id, host, pid, queues, concurrency,"
        " heartbeat_seconds, version, last_heartbeat_at) VALUES ('gone', 'h', 1,"
        " ARRAY['default'], 1, 1, '0', now() - interval '1 hour')"
    )
    options = {"retention_seconds": 3600.0, "batch_size": 2, "prepared_statements": prepared}
    with reaper(dsn, **options) as r:
        with structlog.testing.capture_logs() as logs:
            result = r.run_once()
        assert result.pruned == 4
        assert sorted(result.dead) == [exhausted[0], exhausted[2]]
        assert [e["worker_id"] for e in logs if e["event"] == "reaper.worker_gone"] == ["gone"]
        refused = {e["step"]: e for e in logs if e["event"] == "reaper.refused"}
        assert {step: e["job_ids"] for step, e in refused.items()} == {
            "prune": [finished[0]],
            "dead_letter": [exhausted[1]],
        }
        for event in refused.values():
            assert event["sqlstate"] == "23503" and "receipts" in event["error"]
            assert "ON DELETE SET NULL" in event["hint"]
        remaining = conn.execute("SELECT id, state::text FROM pgqueue.jobs ORDER BY id").fetchall()
        assert remaining == sorted([(finished[0], "succeeded"), (exhausted[1], "running")])

        # Left out of the next passes' batches: no error, nothing refused again, and the
        # jobs finished since are pruned as usual.
        later = make_job(conn, state="succeeded", finished_at=now - timedelta(hours=2))
        for _ in range(7):  # past psycopg's prepare threshold: the generic plans too
            with structlog.testing.capture_logs() as logs:
                result = r.run_once()
            assert [e["event"] for e in logs if e["log_level"] == "error"] == []
        assert job_row(conn, later) is None

        # The foreign key fixed: tried again once REFUSED_RETRY_SECONDS have passed.
        conn.execute("ALTER TABLE public.receipts DROP CONSTRAINT receipts_job_id_fkey")
        conn.execute(
            "ALTER TABLE public.receipts ADD FOREIGN KEY (job_id)"
            " REFERENCES pgqueue.jobs (id) ON DELETE SET NULL"
        )
        monkeypatch.setattr("pgqueue.reaper.REFUSED_RETRY_SECONDS", 0.0)
        result = r.run_once()
    assert (result.pruned, result.dead) == (1, [exhausted[1]])
    assert scalar(conn, "SELECT count(*) FROM pgqueue.jobs") == 0
    assert scalar(conn, "SELECT count(*) FROM public.receipts WHERE job_id IS NULL") == 2


def test_after_losing_the_database_the_reaper_waits_for_live_workers_to_beat(conn, dsn):
    # A database outage longer than the lease lets every lease run out. The reaper's first
    # pass once it got the database back requeued every job in flight as rescued, though
    # their workers lived through it and would extend them at their next beat: each then
    # ran alone, and the fleet crawled (found by the on-call review). After an outage
    # longer than a worker's heartbeat interval, that worker's jobs and row now wait for
    # three of its heartbeats.
    def register(name: str, beat: float) -> None:
        conn.execute(
            "INSERT INTO pgqueue.workers (id, host, pid, queues, concurrency,"
            " heartbeat_seconds, version, last_heartbeat_at) VALUES (%s, 'h', 1,"
            " ARRAY['default'], 1, %s, '0', now())",
            (name, beat),
        )

    def cut(r: Reaper) -> None:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'pgqueue-reaper' AND datname = current_database()"
        )
        with pytest.raises(psycopg.OperationalError):
            r.run_once()

    workers = "SELECT array_agg(id ORDER BY id) FROM pgqueue.workers"
    with reaper(dsn) as r:
        assert r.run_once() == ReapResult([], [], 0)  # connected; nothing to do
        register("alive", 0.5)
        register("gone", 0.3)
        register("slow", 600.0)
        # Leases that run out during the outage, but one that ran out before it.
        soon = {"lease_expires_at": db_clock(conn) + timedelta(seconds=0.3)}
        alive = expired_job(conn, leased_by="alive", **soon)
        last_try = expired_job(
            conn, leased_by="alive", rescued=True, attempts=3, max_attempts=3, **soon
        )
        gone = expired_job(conn, leased_by="gone", **soon)
        slow = expired_job(conn, leased_by="slow", **soon)
        unknown = expired_job(conn, leased_by="never-registered", **soon)
        before = expired_job(conn, leased_by="gone")
        r.run_once()  # the last good pass: nothing has run out yet but `before`
        assert job_row(conn, before)["state"] == "queued"  # type: ignore[index]
        before = expired_job(conn, leased_by="gone")  # ran out before the outage too
        time.sleep(0.6)  # the outage: longer than alive's and gone's beats, not slow's
        cut(r)
        first = r.run_once()  # a new connection: the database got back
        # slow's 600 s beat: an outage this short cannot have cost it a beat; `before`'s
        # lease ran out while the reaper still had the database.
        assert (sorted(first.requeued), first.dead) == (sorted([unknown, slow, before]), [])
        # Their rows stay too (gone's is stale by its last beat, taken before the
        # outage): a row deleted would end the wait for that worker's jobs.
        assert scalar(conn, workers) == ["alive", "gone", "slow"]
        # The live worker beats: its leases are extended (extend_leases), as a worker
        # that lived through the outage does at its next beat.
        conn.execute(
            "UPDATE pgqueue.jobs SET lease_expires_at = now() + interval '30 seconds'"
            " WHERE id = ANY(%s)",
            ([alive, last_try],),
        )
        conn.execute("UPDATE pgqueue.workers SET last_heartbeat_at = now() WHERE id = 'alive'")
        time.sleep(1.0)  # three of the gone worker's 0.3 s heartbeats
        later = r.run_once()
        assert (later.requeued, later.dead) == ([gone], [])
        assert scalar(conn, workers) == ["alive", "slow"]

        # A connection cut short and got back at once: nothing waits.
        register("other", 5.0)
        other = expired_job(conn, leased_by="other")
        cut(r)
        assert r.run_once().requeued == [other]
    for job in (alive, last_try):
        row = job_row(conn, job)
        assert row is not None
        assert (row["state"], row["rescued"], row["errors"]) == ("running", job == last_try, [])

    # The first connection of a reaper is no regain: nothing waits.
    fresh = expired_job(conn, leased_by="alive", lease_expires_at=db_clock(conn) - timedelta(1))
    assert run_once(dsn).requeued == [fresh]


def test_refused_batches_never_spin_wait_on_locks_or_blame_the_wrong_job(conn, dsn, monkeypatch):
    # From a review of the first version: refusals beyond MAX_REFUSED made every batch
    # look full, so a pass (and `reaper --once`) never ended; the one-at-a-time delete
    # waited on a row another session held; a dead-letter try for a locked job moved
    # another job, whose refusal was blamed on it.
    conn.execute("CREATE TABLE public.receipts (job_id bigint REFERENCES pgqueue.jobs (id))")
    now = db_clock(conn)
    finished = [
        make_job(conn, state="succeeded", finished_at=now - timedelta(hours=10 - i))
        for i in range(8)
    ]
    conn.execute("INSERT INTO public.receipts SELECT unnest(%s::bigint[])", (finished[:5],))
    referenced, locked, *_ = insert_expired(conn, 3, attempts=5)
    conn.execute("INSERT INTO public.receipts VALUES (%s)", (referenced,))
    with psycopg.connect(dsn) as holder, reaper(dsn, batch_size=2, retention_seconds=60) as r:
        # finished[5] shares a refused batch with finished[4], taken one at a time.
        holder.execute(
            "SELECT 1 FROM pgqueue.jobs WHERE id = ANY(%s) FOR UPDATE", ([finished[5], locked],)
        )
        r._connection().execute("SET lock_timeout = '3s'")
        with structlog.testing.capture_logs() as logs:
            result = r.run_once()  # waits on no lock
        refused = {e["step"]: e["job_ids"] for e in logs if e["event"] == "reaper.refused"}
        assert refused["dead_letter"] == [referenced]
        assert referenced not in result.dead and locked not in result.dead
        assert job_row(conn, finished[5]) is not None  # held: left for the next pass
        holder.rollback()
        r.run_once()
    left = {r[0] for r in conn.execute("SELECT id FROM pgqueue.jobs WHERE state = 'succeeded'")}
    assert left == set(finished[:5])

    # More refused than a reaper remembers: the pass ends all the same, with nothing it
    # could prune left (`reaper --once` prunes with no time limit; the daemon ran its next
    # pass at once whenever one said more was left).
    monkeypatch.setattr("pgqueue.reaper.MAX_REFUSED", 2)
    with reaper(dsn, batch_size=2, retention_seconds=60) as r:
        results: list[ReapResult] = []
        worker = threading.Thread(
            target=lambda: results.append(r.run_once(prune_seconds=math.inf)), daemon=True
        )
        worker.start()
        worker.join(20)
        assert [result.more_to_prune for result in results] == [False]


def test_a_batch_every_job_of_which_is_refused_alike_fails_the_pass(conn, dsn):
    # Not a foreign key: the statement's error (here a NOT NULL column someone added to
    # the dead-letter table), not its jobs'. Logged as refused jobs with a foreign key's
    # hint, it hid what was wrong; it fails the pass, as before.
    insert_expired(conn, 3, attempts=5)
    conn.execute("ALTER TABLE pgqueue.dead_jobs ADD COLUMN extra text NOT NULL")
    try:
        with reaper(dsn) as r, pytest.raises(psycopg.errors.NotNullViolation):
            r.run_once()
    finally:
        conn.execute("ALTER TABLE pgqueue.dead_jobs DROP COLUMN extra")
