"""A stateful property test of a job's life, against a real Postgres.

Hypothesis drives random interleavings of everything that can happen to jobs — enqueue
(SQL function, plain INSERT, Python enqueue and enqueue_many, with and without
idempotency keys), claims and rescued-job claims by several simulated workers, heartbeats,
complete, fail (retry while attempts remain, else dead-letter), permanent failure,
snooze, release, lease expiry, reaper passes, cancel, dead-letter retry, and pruning —
through the same ``pgqueue.store`` functions the worker, reaper and admin CLI call.

The test clock is the rows themselves: a lease "expires" when the test moves
``lease_expires_at`` into the past, a finished job "ages" when ``finished_at`` is moved
back past the reaper's retention, and delayed jobs become due when ``run_at`` is moved
to now. Leases are long (5 minutes) so nothing expires by itself during a run.

A model tracks every job and, per simulated worker, every lease token it was ever
given (stale ones included: the workers keep writing with them). After every step the
whole database is compared with the model:
- each job id is in exactly one place (jobs xor dead_jobs) and none vanishes except a
  finished job pruned by the reaper;
- attempts never exceed max_attempts;
- every row matches the model's state, attempts, lease, flags, args, key, and its
  history (one entry per ended attempt, with that attempt's number and outcome) and
  errors; so no transition skipped a state;
- rows the step was not meant to touch are byte-identical to before the step — in
  particular every write made with a stale token changed nothing (and the write's
  result did not report it);
- running rows have a token and an expiry, other rows have neither.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pgqueue import JobSpec, Reaper, ReaperConfig, enqueue, enqueue_many, store

WORKERS = ("w1", "w2", "w3")
QUEUES = ("a", "b")
QUEUE_SETS = (("a",), ("b",), ("a", "b"))
LEASE = 300.0
RETENTION = 3600.0
KEYS = (None, None, "k1", "k2")
DELAYS = (0.0, 0.0, 3600.0)  # due now, or not within the test
MAX_ATTEMPTS = st.sampled_from([1, 1, 2, 3])  # often 1: exhaustion paths get exercised
TASK = "sm.task"
FINISHED = ("succeeded", "cancelled")


@dataclass
class Model:
    """What the database should hold for one job."""

    id: int
    queue: str
    priority: int
    max_attempts: int
    args: dict[str, Any]
    key: str | None
    where: str = "jobs"  # 'jobs', 'dead', or 'pruned' (gone, legitimately)
    state: str = "queued"
    attempts: int = 0
    token: uuid.UUID | None = None
    leased_by: str | None = None
    rescued: bool = False
    due: bool = True
    cancel_requested: bool = False
    expired: bool = False
    aged: bool = False  # finished_at moved back past the retention
    history: list[tuple[str, int]] = field(default_factory=list)  # (outcome, attempt)
    errors: list[str] = field(default_factory=list)  # kinds
    dead_reason: str | None = None

    def end_attempt(self, outcome: str, error_kind: str | None = None) -> None:
        self.history.append((outcome, self.attempts))
        if error_kind is not None:
            self.errors.append(error_kind)
        self.token = None
        self.expired = False

    def finish(self, state: str) -> None:
        self.state = state
        self.aged = False


@dataclass(frozen=True)
class Held:
    """A lease token a simulated worker was given, with the attempt it was given for."""

    job: int
    token: uuid.UUID
    attempt: int


class Env:
    """Connections shared by every run of the machine in one test."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.runner = asyncio.Runner()
        self.aconn = self.runner.run(psycopg.AsyncConnection.connect(dsn, autocommit=True))
        self.reaper = Reaper(
            ReaperConfig(
                dsn=dsn,
                retention_seconds=RETENTION,
                backoff_base_seconds=0,
                backoff_max_seconds=0,
                batch_size=2,  # exercise the reaper's batch loops
            )
        )

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    def close(self) -> None:
        self.reaper.stop()
        self.reaper._close()
        self.run(self.aconn.close())
        self.runner.close()
        self.conn.close()


ERROR = {"kind": "error", "error": "boom"}


class JobLife(RuleBasedStateMachine):
    env: Env  # set by the test

    def __init__(self) -> None:
        super().__init__()
        for table in ("jobs", "dead_jobs", "queues", "workers"):
            self.env.conn.execute(f"DELETE FROM pgqueue.{table}")
        self.jobs: dict[int, Model] = {}
        self.held: dict[str, list[Held]] = {w: [] for w in WORKERS}
        self.tokens_seen: set[uuid.UUID] = set()
        self.snapshot: dict[tuple[str, int], dict[str, Any]] = {}
        self.touched: set[int] = set()
        self.serial = 0

    # --- helpers ----------------------------------------------------------------------------

    @property
    def conn(self) -> psycopg.Connection[Any]:
        return self.env.conn

    def in_jobs(self) -> list[Model]:
        return [m for m in self.jobs.values() if m.where == "jobs"]

    def key_holder(self, key: str | None) -> Model | None:
        if key is None:
            return None
        return next((m for m in self.in_jobs() if m.key == key), None)

    def is_current(self, h: Held) -> bool:
        m = self.jobs[h.job]
        return m.where == "jobs" and m.state == "running" and m.token == h.token

    def workers_holding(self) -> list[str]:
        return [w for w in WORKERS if self.held[w]]

    def draw_items(self, data: st.DataObject) -> tuple[str, list[Held]]:
        """A worker and some of the tokens it holds: mostly live ones, often stale."""
        worker = data.draw(st.sampled_from(self.workers_holding()), label="worker")
        live = [h for h in self.held[worker] if self.is_current(h)]
        pool = live if live and data.draw(st.booleans(), label="live only") else self.held[worker]
        items = data.draw(
            st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True), label="items"
        )
        return worker, items

    def new_args(self) -> dict[str, Any]:
        self.serial += 1
        return {"n": self.serial, "s": "\u00e9\U0001f600\u202e'; --", "nested": [{"x": None}]}

    def add_job(
        self,
        job_id: int,
        queue: str,
        priority: int,
        max_attempts: int,
        args: dict[str, Any],
        key: str | None,
        delay: float,
    ) -> None:
        assert job_id not in self.jobs, f"id {job_id} reused"
        self.jobs[job_id] = Model(
            id=job_id,
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            args=args,
            key=key,
            due=delay == 0,
        )
        self.touched.add(job_id)

    def order_keys(self, ids: list[int]) -> dict[int, tuple[Any, ...]]:
        rows = self.conn.execute(
            "SELECT id, priority, run_at FROM pgqueue.jobs WHERE id = ANY(%s)", (ids,)
        ).fetchall()
        return {r[0]: (r[1], r[2], r[0]) for r in rows}

    def took_lease(self, worker: str, job: Any) -> None:
        m = self.jobs[job.id]
        assert job.attempt == m.attempts + 1
        assert (job.queue, job.task, job.args) == (m.queue, TASK, m.args)
        assert (job.priority, job.max_attempts) == (m.priority, m.max_attempts)
        assert job.cancel_requested == m.cancel_requested
        assert job.lease_token not in self.tokens_seen, "a lease token was handed out twice"
        self.tokens_seen.add(job.lease_token)
        m.state, m.attempts, m.token, m.leased_by = "running", job.attempt, job.lease_token, worker
        m.expired = False
        self.held[worker].append(Held(job.id, job.lease_token, job.attempt))
        self.touched.add(job.id)

    # --- producers --------------------------------------------------------------------------

    @initialize(
        specs=st.lists(
            st.tuples(st.sampled_from(QUEUES), st.integers(0, 2), MAX_ATTEMPTS),
            min_size=1,
            max_size=6,
        )
    )
    def some_jobs(self, specs):
        """Start with a few due jobs, so that runs get to the interesting parts."""
        for queue, priority, max_attempts in specs:
            args = self.new_args()
            job_id = enqueue(
                self.conn, TASK, args, queue=queue, priority=priority, max_attempts=max_attempts
            )
            self.add_job(job_id, queue, priority, max_attempts, args, None, 0.0)

    @rule(
        queue=st.sampled_from(QUEUES),
        priority=st.integers(0, 2),
        max_attempts=MAX_ATTEMPTS,
        delay=st.sampled_from(DELAYS),
        key=st.sampled_from(KEYS),
        via=st.sampled_from(["sql", "python", "insert"]),
    )
    def enqueue_one(self, queue, priority, max_attempts, delay, key, via):
        args = self.new_args()
        holder = self.key_holder(key)
        if via == "insert" and holder is not None:
            # A plain INSERT has no ON CONFLICT: a held key is an error, nothing written.
            try:
                self.conn.execute(
                    "INSERT INTO pgqueue.jobs (task, args, queue, idempotency_key)"
                    " VALUES (%s, %s, %s, %s)",
                    (TASK, Jsonb(args), queue, key),
                )
            except psycopg.errors.UniqueViolation:
                return
            raise AssertionError("a held idempotency key was inserted twice")
        if via == "sql":
            job_id = self.conn.execute(
                "SELECT pgqueue.enqueue(%s, %s, %s, %s, now() + make_interval(secs => %s), %s, %s)",
                (TASK, Jsonb(args), queue, priority, delay, max_attempts, key),
            ).fetchone()[0]  # type: ignore[index]
        elif via == "python":
            job_id = enqueue(
                self.conn,
                TASK,
                args,
                queue=queue,
                priority=priority,
                delay=delay,
                max_attempts=max_attempts,
                idempotency_key=key,
            )
        else:
            job_id = self.conn.execute(
                "INSERT INTO pgqueue.jobs (task, args, queue, priority, run_at, max_attempts,"
                " idempotency_key) VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s),"
                " %s, %s) RETURNING id",
                (TASK, Jsonb(args), queue, priority, delay, max_attempts, key),
            ).fetchone()[0]  # type: ignore[index]
        if holder is not None:
            assert job_id == holder.id, "a held idempotency key did not return its holder"
            return
        self.add_job(job_id, queue, priority, max_attempts, args, key, delay)

    @rule(
        specs=st.lists(
            st.tuples(
                st.sampled_from(QUEUES),
                st.integers(0, 2),
                MAX_ATTEMPTS,
                st.sampled_from(DELAYS),
                st.sampled_from(KEYS),
            ),
            min_size=1,
            max_size=3,
        )
    )
    def enqueue_batch(self, specs):
        batch = [(self.new_args(), *spec) for spec in specs]
        ids = enqueue_many(
            self.conn,
            [
                JobSpec(TASK, args, queue=q, priority=p, max_attempts=n, delay=d, idempotency_key=k)
                for args, q, p, n, d, k in batch
            ],
        )
        assert len(ids) == len(batch)
        first_with_key: dict[str, int] = {}
        for job_id, (args, queue, priority, max_attempts, delay, key) in zip(
            ids, batch, strict=True
        ):
            holder = self.key_holder(key)
            if holder is not None:
                assert job_id == holder.id, "a held key did not return its holder"
            elif key is not None and key in first_with_key:
                assert job_id == first_with_key[key]
            else:
                self.add_job(job_id, queue, priority, max_attempts, args, key, delay)
            if key is not None:
                first_with_key.setdefault(key, job_id)

    # --- workers ----------------------------------------------------------------------------

    def queued(self, rescued: bool) -> bool:
        return any(m.state == "queued" and m.rescued == rescued for m in self.in_jobs())

    @precondition(lambda self: self.queued(rescued=False))
    @rule(
        worker=st.sampled_from(WORKERS), queues=st.sampled_from(QUEUE_SETS), limit=st.integers(1, 3)
    )
    def claim(self, worker, queues, limit):
        eligible = [
            m.id
            for m in self.in_jobs()
            if m.state == "queued" and not m.rescued and m.due and m.queue in queues
        ]
        keys = self.order_keys(eligible)
        expected = sorted(eligible, key=keys.__getitem__)[:limit]
        jobs = self.env.run(
            store.claim_jobs(
                self.env.aconn, queues=queues, limit=limit, worker_id=worker, lease_seconds=LEASE
            )
        )
        assert sorted(j.id for j in jobs) == sorted(expected)
        for job in jobs:
            self.took_lease(worker, job)

    @precondition(lambda self: self.queued(rescued=True))
    @rule(worker=st.sampled_from(WORKERS), data=st.data())
    def claim_rescued(self, worker, data):
        waiting = {m.queue for m in self.in_jobs() if m.state == "queued" and m.rescued}
        useful = [qs for qs in QUEUE_SETS if waiting & set(qs)]
        pool = useful if data.draw(st.booleans(), label="useful queues") else QUEUE_SETS
        queues = data.draw(st.sampled_from(pool), label="queues")
        eligible = [
            m.id
            for m in self.in_jobs()
            if m.state == "queued" and m.rescued and m.due and m.queue in queues
        ]
        keys = self.order_keys(eligible)
        expected = min(eligible, key=keys.__getitem__) if eligible else None
        job = self.env.run(
            store.claim_rescued_job(
                self.env.aconn, queues=queues, worker_id=worker, lease_seconds=LEASE
            )
        )
        assert (job.id if job else None) == expected
        if job is not None:
            self.took_lease(worker, job)

    @precondition(lambda self: self.workers_holding())
    @rule(data=st.data())
    def heartbeat(self, data):
        worker = data.draw(st.sampled_from(self.workers_holding()), label="worker")
        items = self.held[worker]  # every token it was ever given: stale ones too
        # As the worker's heartbeat reads it: by token, so that a stale token of a job
        # whose current lease this worker also holds is not taken for extended.
        extended, locked = self.env.run(
            store.heartbeat_leases(
                self.env.aconn,
                ids=[h.job for h in items],
                tokens=[h.token for h in items],
                lease_seconds=LEASE,
            )
        )
        current = [h for h in items if self.is_current(h)]
        expected = {h.token: self.jobs[h.job].cancel_requested for h in current}
        assert (extended, locked) == (expected, set())
        for h in current:
            self.jobs[h.job].expired = False  # even an expired lease not yet reaped
            self.touched.add(h.job)

    def write(self, fn: Any, items: list[Held], **extra: Any) -> dict[int, str]:
        result: dict[int, str] = self.env.run(
            fn(
                self.env.aconn,
                ids=[h.job for h in items],
                tokens=[h.token for h in items],
                durations=[0.01] * len(items),
                **{k: [v] * len(items) for k, v in extra.items()},
            )
        )
        return result

    @precondition(lambda self: self.workers_holding())
    @rule(data=st.data())
    def complete(self, data):
        _, items = self.draw_items(data)
        self.complete_items(items)

    def complete_items(self, items: list[Held]) -> None:
        live = [h for h in items if self.is_current(h)]
        result = self.write(store.complete_jobs, items)
        assert result == {h.job: "succeeded" for h in live}
        for h in live:
            m = self.jobs[h.job]
            m.end_attempt("succeeded")
            m.finish("succeeded")
            self.touched.add(m.id)

    def retry(self, items: list[Held], delay: float) -> None:
        live = [h for h in items if self.is_current(h)]
        result = self.write(store.retry_jobs, items, delays=delay, errors=ERROR)
        expected = {}
        for h in live:
            m = self.jobs[h.job]
            if m.cancel_requested:
                m.end_attempt("failed", "error")
                m.finish("cancelled")
            else:
                m.end_attempt("retried", "error")
                m.state, m.due = "queued", delay == 0
            expected[m.id] = m.state
            self.touched.add(m.id)
        assert result == expected

    def dead_letter(self, items: list[Held], reason: str) -> None:
        live = [h for h in items if self.is_current(h)]
        result = self.write(store.dead_letter_jobs, items, errors=ERROR, reasons=reason)
        expected = {}
        for h in live:
            m = self.jobs[h.job]
            if m.cancel_requested:
                # Cancelled instead: it stays in jobs, so `dead retry` cannot revive it.
                m.end_attempt("failed", "error")
                m.finish("cancelled")
                expected[m.id] = "cancelled"
            else:
                m.end_attempt("dead", "error")
                m.where, m.dead_reason = "dead", reason
                expected[m.id] = "dead"
            self.touched.add(m.id)
        assert result == expected

    @precondition(lambda self: self.workers_holding())
    @rule(data=st.data(), delay=st.sampled_from(DELAYS))
    def fail(self, data, delay):
        """The worker's policy: retry while the attempt it ran was not the last, else
        dead-letter as exhausted. It decides from the attempt number it was given."""
        _, items = self.draw_items(data)
        retry = [h for h in items if h.attempt < self.jobs[h.job].max_attempts]
        dead = [h for h in items if h not in retry]
        if retry:
            self.retry(retry, delay)
        if dead:
            self.dead_letter(dead, "exhausted")

    @precondition(lambda self: self.workers_holding())
    @rule(data=st.data())
    def fail_permanently(self, data):
        _, items = self.draw_items(data)
        self.dead_letter(items, "permanent")

    def give_back(self, fn: Any, items: list[Held], outcome: str, delay: float | None) -> None:
        live = [h for h in items if self.is_current(h)]
        extra = {"delays": delay} if delay is not None else {}
        result = self.write(fn, items, **extra)
        expected = {}
        for h in live:
            m = self.jobs[h.job]
            m.end_attempt(outcome)
            m.attempts -= 1  # not a failure: the attempt is given back
            if m.cancel_requested:
                m.finish("cancelled")
            else:
                m.state, m.due = "queued", not delay
            expected[m.id] = m.state
            self.touched.add(m.id)
        assert result == expected

    @precondition(lambda self: self.workers_holding())
    @rule(data=st.data(), delay=st.sampled_from(DELAYS))
    def snooze(self, data, delay):
        _, items = self.draw_items(data)
        self.give_back(store.snooze_jobs, items, "snoozed", delay)

    @precondition(lambda self: self.workers_holding())
    @rule(data=st.data())
    def release(self, data):
        _, items = self.draw_items(data)
        self.give_back(store.release_jobs, items, "released", None)

    def zombies(self) -> list[tuple[str, Held]]:
        """Stale tokens whose job is running again under someone else's (or a newer) lease."""
        return [
            (w, h)
            for w in WORKERS
            for h in self.held[w]
            if not self.is_current(h)
            and self.jobs[h.job].where == "jobs"
            and self.jobs[h.job].state == "running"
        ]

    @precondition(lambda self: self.zombies())
    @rule(
        data=st.data(),
        op=st.sampled_from(["complete", "fail", "dead", "snooze", "release", "heartbeat"]),
    )
    def zombie_writes(self, data, op):
        """A worker whose lease was lost and whose job was claimed again writes anyway:
        nothing may change (the invariant checks the rows) and nothing is reported."""
        _, h = data.draw(st.sampled_from(self.zombies()), label="zombie")
        before = self.row(h.job)
        if op == "complete":
            self.complete_items([h])
        elif op == "fail":
            self.retry([h], 0.0)
        elif op == "dead":
            self.dead_letter([h], "permanent")
        elif op == "snooze":
            self.give_back(store.snooze_jobs, [h], "snoozed", 0.0)
        elif op == "release":
            self.give_back(store.release_jobs, [h], "released", None)
        else:
            result = self.env.run(
                store.extend_leases(
                    self.env.aconn, ids=[h.job], tokens=[h.token], lease_seconds=LEASE
                )
            )
            assert result == {}
        assert self.row(h.job) == before, "a fenced write changed its job's row"

    def row(self, job_id: int) -> dict[str, Any] | None:
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute("SELECT * FROM pgqueue.jobs WHERE id = %s", (job_id,))
            return cur.fetchone()

    # --- the test clock, the reaper, operators ----------------------------------------------

    def live_holders(self) -> list[str]:
        return [w for w in WORKERS if any(self.is_current(h) for h in self.held[w])]

    def kill(self, worker: str) -> None:
        """Every lease the worker holds now expires (it stopped heartbeating)."""
        live = sorted({h.job for h in self.held[worker] if self.is_current(h)})
        self.conn.execute(
            "UPDATE pgqueue.jobs SET lease_expires_at = now() - interval '1 second'"
            " WHERE id = ANY(%s)",
            (live,),
        )
        for job_id in live:
            self.jobs[job_id].expired = True
            self.touched.add(job_id)

    @precondition(lambda self: self.live_holders())
    @rule(data=st.data())
    def worker_dies(self, data):
        self.kill(data.draw(st.sampled_from(self.live_holders()), label="worker"))

    @precondition(lambda self: self.live_holders())
    @rule(data=st.data())
    def worker_dies_and_reaper_runs(self, data):
        """The common sequence, made likelier: a crash, then the reaper's next pass. Often
        the crash of a worker running a rescued job (the poison-job path) or one whose
        cancellation was requested."""
        special = [
            w
            for w in self.live_holders()
            if any(
                self.is_current(h)
                and (self.jobs[h.job].rescued or self.jobs[h.job].cancel_requested)
                for h in self.held[w]
            )
        ]
        pool = special if special and data.draw(st.booleans()) else self.live_holders()
        self.kill(data.draw(st.sampled_from(pool), label="worker"))
        self.reap_now()

    @precondition(lambda self: any(m.state in FINISHED for m in self.in_jobs()))
    @rule(data=st.data())
    def age_finished(self, data):
        done = sorted(m.id for m in self.in_jobs() if m.state in FINISHED)
        job_id = data.draw(st.sampled_from(done), label="job")
        self.conn.execute(
            "UPDATE pgqueue.jobs SET finished_at = now() - make_interval(secs => %s) WHERE id = %s",
            (RETENTION + 60, job_id),
        )
        self.jobs[job_id].aged = True
        self.touched.add(job_id)

    @precondition(lambda self: any(m.state == "queued" and not m.due for m in self.in_jobs()))
    @rule()
    def time_passes(self):
        """Every delayed job becomes due."""
        self.conn.execute(
            "UPDATE pgqueue.jobs SET run_at = now() WHERE state = 'queued' AND run_at > now()"
        )
        for m in self.in_jobs():
            if m.state == "queued" and not m.due:
                m.due = True
                self.touched.add(m.id)

    @precondition(
        lambda self: any(
            (m.state == "running" and m.expired) or (m.state in FINISHED and m.aged)
            for m in self.in_jobs()
        )
    )
    @rule()
    def reap(self):
        self.reap_now()

    def reap_now(self) -> None:
        expired = [m for m in self.in_jobs() if m.state == "running" and m.expired]
        to_dead = [
            m
            for m in expired
            if m.rescued and m.attempts >= m.max_attempts and not m.cancel_requested
        ]
        to_queue = [m for m in expired if m not in to_dead]
        to_prune = [m for m in self.in_jobs() if m.state in FINISHED and m.aged]
        result = self.env.reaper.run_once()
        assert sorted(result.requeued) == sorted(m.id for m in to_queue if not m.cancel_requested)
        assert sorted(result.cancelled) == sorted(m.id for m in to_queue if m.cancel_requested)
        assert sorted(result.dead) == sorted(m.id for m in to_dead)
        assert result.pruned == len(to_prune)
        for m in to_queue:
            m.end_attempt("lease_expired", "lease_expired")
            if not m.rescued:
                m.attempts -= 1  # its worker died beside others: the crash is not counted
            m.rescued = True
            if m.cancel_requested:
                m.finish("cancelled")
            else:
                m.state, m.due = "queued", True  # backoff base 0 in this test
        for m in to_dead:
            m.end_attempt("lease_expired", "lease_expired")
            m.where, m.dead_reason = "dead", "lease_expired"
        for m in to_prune:
            m.where = "pruned"
        self.touched.update(m.id for m in expired + to_prune)

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def cancel(self, data):
        active = sorted(m.id for m in self.in_jobs() if m.state in ("queued", "running"))
        anything = [*sorted(self.jobs), 10**9]  # finished, dead, pruned, never existed
        pool = active if active and data.draw(st.booleans(), label="active") else anything
        job_id = data.draw(st.sampled_from(pool), label="job")
        result = store.cancel_job(self.conn, job_id=job_id)
        m = self.jobs.get(job_id)
        if m is None or m.where != "jobs" or m.state not in ("queued", "running"):
            assert result is None
            return
        if m.state == "queued":
            assert result == "cancelled"
            m.finish("cancelled")
        else:
            assert result == "running"  # flagged; its worker's next write decides
        m.cancel_requested = True
        self.touched.add(job_id)

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def retry_dead(self, data):
        dead = sorted(m.id for m in self.jobs.values() if m.where == "dead")
        job_id = data.draw(st.sampled_from(dead or sorted(self.jobs)), label="job")
        moved = store.retry_dead(self.conn, ids=[job_id], queue=None, task=None, limit=10)
        m = self.jobs[job_id]
        if m.where != "dead":
            assert moved == []
            return
        assert moved == [job_id]
        if self.key_holder(m.key) is not None:
            m.key = None  # taken meanwhile by a new job: dropped, not a failed move
        m.where, m.state, m.attempts, m.rescued, m.due = "jobs", "queued", 0, False, True
        m.cancel_requested, m.dead_reason, m.aged, m.leased_by = False, None, False, None
        self.touched.add(job_id)

    # --- invariants -------------------------------------------------------------------------

    @invariant()
    def database_matches_model(self):
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT *, lease_expires_at < now() AS _expired, run_at <= now() AS _due"
                " FROM pgqueue.jobs"
            )
            rows = {r["id"]: r for r in cur.fetchall()}
            cur.execute("SELECT * FROM pgqueue.dead_jobs")
            dead = {r["id"]: r for r in cur.fetchall()}

        # Exactly one place; nothing lost but what was pruned; nothing unknown.
        assert rows.keys().isdisjoint(dead.keys()), "a job is in jobs and dead_jobs"
        assert set(rows) == {m.id for m in self.jobs.values() if m.where == "jobs"}
        assert set(dead) == {m.id for m in self.jobs.values() if m.where == "dead"}

        for job_id, r in rows.items():
            m = self.jobs[job_id]
            assert r["attempts"] <= r["max_attempts"], "attempts over max_attempts"
            assert r["state"] == m.state, (job_id, r["state"], m.state)
            running = r["state"] == "running"
            assert (
                running == (r["lease_token"] is not None) == (r["lease_expires_at"] is not None)
            ), "lease columns disagree with the state"
            assert r["lease_token"] == m.token
            assert (r["finished_at"] is not None) == (r["state"] in FINISHED)
            assert (r["attempts"], r["max_attempts"]) == (m.attempts, m.max_attempts)
            assert (r["queue"], r["priority"], r["task"]) == (m.queue, m.priority, TASK)
            assert r["args"] == m.args and r["idempotency_key"] == m.key
            assert r["leased_by"] == m.leased_by
            assert r["rescued"] == m.rescued
            assert (r["cancel_requested_at"] is not None) == m.cancel_requested
            if running:
                assert r["_expired"] == m.expired
            if r["state"] == "queued":
                assert r["_due"] == m.due
            assert [(h["outcome"], h["attempt"]) for h in r["history"]] == m.history
            assert [e["kind"] for e in r["errors"]] == m.errors

        for job_id, r in dead.items():
            m = self.jobs[job_id]
            assert r["attempts"] <= r["max_attempts"], "attempts over max_attempts"
            assert 1 <= r["attempts"] == m.attempts, "a dead job that never ran"
            assert r["reason"] == m.dead_reason
            assert (r["queue"], r["priority"], r["task"]) == (m.queue, m.priority, TASK)
            assert r["args"] == m.args and r["idempotency_key"] == m.key
            assert [(h["outcome"], h["attempt"]) for h in r["history"]] == m.history
            assert m.history[-1][0] in ("dead", "lease_expired")
            assert [e["kind"] for e in r["errors"]] == m.errors

        # Rows the last step was not meant to touch did not change at all.
        current: dict[tuple[str, int], dict[str, Any]] = {}
        for job_id, r in rows.items():
            current[("jobs", job_id)] = {k: v for k, v in r.items() if not k.startswith("_")}
        for job_id, r in dead.items():
            current[("dead", job_id)] = r
        for place_id, before in self.snapshot.items():
            if place_id[1] in self.touched:
                continue
            assert current.get(place_id) == before, f"untouched row {place_id} changed"
        self.snapshot = current
        self.touched = set()


def test_job_life_state_machine(dsn):
    env = Env(dsn)
    JobLife.env = env
    try:
        run_state_machine_as_test(
            JobLife,
            settings=settings(max_examples=75, stateful_step_count=50, deadline=None),
        )
    finally:
        env.close()
