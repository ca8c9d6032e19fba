"""One adapter per queue: its database and schema, fast seeding with ``INSERT ... SELECT
generate_series`` (rows shaped exactly as its own enqueue writes them), how to tell that
jobs finished and when (from the database, so the timing costs the workers nothing), its
worker command lines, and its footprint.

Every system uses the queue (or entrypoint) ``default`` and three tasks: ``noop``, ``rec``
(records its start time) and ``sleep`` (records, then sleeps ``ms``); see bench/apps/.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import subprocess
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, LiteralString

import psycopg

from bench import db

BENCH_DIR = Path(__file__).resolve().parent
APPS_DIR = BENCH_DIR / "apps"


@dataclass
class Context:
    """What every adapter needs from the run."""

    admin_dsn: str
    redis_url: str
    work_dir: Path
    oban_python: Path | None = None
    python: str = sys.executable
    # Extra pgqueue-worker arguments (say --async-commit), for a variant run.
    pgqueue_worker_args: tuple[str, ...] = ()
    # pgqueue's own venv for its workers (bench/.venvs/pgqueue); None: the bench's.
    pgqueue_python: Path | None = None

    @property
    def bin_dir(self) -> Path:
        return Path(self.python).parent

    @property
    def pgqueue_bin_dir(self) -> Path:
        return self.pgqueue_python.parent if self.pgqueue_python else self.bin_dir


@dataclass(frozen=True)
class Marker:
    """Where a measurement starts: a time on the database's clock (in the system's own
    timestamp flavour) and the highest id of an append-only table, if the system has one."""

    at: datetime
    base_id: int = 0


@dataclass
class Finish:
    """When jobs finished, as seen in the database."""

    count: int
    first: datetime | None
    last: datetime | None
    at_first: int

    def rate(self) -> float | None:
        """Jobs per second between the first and the last finish (the jobs that finished
        at the very first timestamp, one flushed batch, are not counted)."""
        if self.first is None or self.last is None or self.last <= self.first:
            return None
        return (self.count - self.at_first) / (self.last - self.first).total_seconds()


@dataclass
class Worker:
    """How one system runs with a given setting."""

    label: str
    commands: list[list[str]] = field(default_factory=list)


class System(ABC):
    name: str = ""
    title: str = ""
    postgres: bool = True
    tables: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.db_name = f"bench_{self.name}"
        self.dsn = db.with_database(ctx.admin_dsn, self.db_name)

    # --- set-up ---------------------------------------------------------------------

    def setup(self) -> None:
        """A fresh database with the system's schema."""
        self.dsn = db.create_database(self.ctx.admin_dsn, self.db_name)
        self.install()

    @abstractmethod
    def install(self) -> None: ...

    def teardown(self) -> None:
        db.drop_database(self.ctx.admin_dsn, self.db_name)

    def reset(self) -> None:
        """Empty every table the system writes jobs to."""
        if not self.tables:
            return
        joined = ", ".join(self.tables)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f"TRUNCATE {joined} RESTART IDENTITY CASCADE")

    def analyze(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for table in self.tables:
                conn.execute(f"VACUUM ANALYZE {table}")

    def env(self) -> dict[str, str]:
        import os

        env = dict(os.environ)
        env.update(
            BENCH_DSN=self.dsn,
            BENCH_REDIS_URL=self.ctx.redis_url,
            PYTHONPATH=str(APPS_DIR),
            PYTHONUNBUFFERED="1",
        )
        return env

    @property
    def python(self) -> str:
        return self.ctx.python

    def versions(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for pkg in self.packages:
            try:
                out[pkg] = importlib.metadata.version(pkg)
            except importlib.metadata.PackageNotFoundError:
                out[pkg] = "not installed"
        return out

    # --- seeding --------------------------------------------------------------------

    @abstractmethod
    def seed_sql(self) -> LiteralString:
        """One INSERT with parameters first, count, future_per_mille (of each thousand
        ids, how many are scheduled a day ahead, interleaved with the runnable ones)."""

    def seed(self, n: int, future_fraction: float = 0.0, chunk: int = 1_000_000) -> None:
        per_mille = round(future_fraction * 1000)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for first in range(1, n + 1, chunk):
                count = min(chunk, n - first + 1)
                conn.execute(
                    self.seed_sql(),
                    {"first": first, "last": first + count - 1, "future": per_mille},
                )

    # --- progress -------------------------------------------------------------------

    now_sql: LiteralString = "SELECT clock_timestamp()"
    id_sql: LiteralString | None = None

    def mark(self) -> Marker:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(self.now_sql).fetchone()
            assert row is not None
            base = 0
            if self.id_sql is not None:
                got = conn.execute(self.id_sql).fetchone()
                base = int(got[0]) if got and got[0] is not None else 0
        return Marker(row[0], base)

    @abstractmethod
    def finish_sql(self) -> LiteralString:
        """SELECT the finish time ``t`` of each job that succeeded since %(at)s /
        %(base_id)s."""

    def done(self, marker: Marker) -> int:
        # Assembled from this module's constant SQL only.
        query = "SELECT count(*) FROM (" + self.finish_sql() + ") AS f"  # noqa: S608
        return int(db.scalar(self.dsn, query, {"at": marker.at, "base_id": marker.base_id}))

    def finish(self, marker: Marker, limit: int | None = None, skip: int = 0) -> Finish:
        """First and last finish of the jobs done since ``marker`` (the first ``limit``
        after the first ``skip``, in order of finish)."""
        params = {"at": marker.at, "base_id": marker.base_id, "limit": limit, "skip": skip}
        query = (
            "WITH f AS MATERIALIZED (SELECT t FROM ("  # noqa: S608 - constant SQL only
            + self.finish_sql()
            + ") AS a"
            " ORDER BY t OFFSET %(skip)s LIMIT %(limit)s)"
            " SELECT count(*), min(t), max(t),"
            " count(*) FILTER (WHERE t = (SELECT min(t) FROM f)) FROM f"
        )
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(query, params).fetchone()
        assert row is not None
        return Finish(int(row[0]), row[1], row[2], int(row[3]))

    @abstractmethod
    def unfinished_sql(self) -> LiteralString:
        """SELECT count(*) of jobs not finished (queued, running, failed...)."""

    def unfinished(self) -> int:
        return int(db.scalar(self.dsn, self.unfinished_sql()))

    @abstractmethod
    def pending_sql(self) -> LiteralString:
        """SELECT whether any job is due or running (cheap: EXISTS over an index)."""

    def pending(self) -> bool:
        return bool(db.scalar(self.dsn, self.pending_sql()))

    def drained(self, marker: Marker, expected: int) -> bool:
        """Whether a drain of ``expected`` jobs looks finished (checked exactly after)."""
        return not self.pending()

    @abstractmethod
    def waiting_sql(self) -> LiteralString:
        """SELECT count(*) of jobs due now and not started: the backlog."""

    def waiting(self) -> int:
        return int(db.scalar(self.dsn, self.waiting_sql()))

    def backend_pids(self) -> list[int]:
        """Server processes connected to this system's database (not this one)."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
        return [int(r[0]) for r in rows]

    def footprint(self) -> dict[str, dict[str, int]]:
        """Per table: heap and index bytes, live and dead tuples."""
        out: dict[str, dict[str, int]] = {}
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for table in self.tables:
                row = conn.execute(
                    "SELECT pg_relation_size(c.oid), pg_indexes_size(c.oid),"
                    " pg_total_relation_size(c.oid), coalesce(s.n_live_tup, 0),"
                    " coalesce(s.n_dead_tup, 0)"
                    " FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid"
                    " WHERE c.oid = %s::regclass",
                    (table,),
                ).fetchone()
                if row is None:
                    continue
                out[table] = {
                    "heap_bytes": int(row[0]),
                    "index_bytes": int(row[1]),
                    "total_bytes": int(row[2]),
                    "live_tuples": int(row[3]),
                    "dead_tuples": int(row[4]),
                }
        return out

    # --- workers --------------------------------------------------------------------

    @abstractmethod
    def worker(self, processes: int, concurrency: int) -> Worker:
        """The command lines for ``processes`` worker processes at ``concurrency``."""

    def producer_command(self) -> list[str]:
        return [self.python, "-m", "bq_produce", self.name]


# --- pgqueue ---------------------------------------------------------------------------


class PgQueue(System):
    name = "pgqueue"
    title = "pgqueue"
    tables = ("pgqueue.jobs", "pgqueue.dead_jobs")
    packages = ("pgqueue", "psycopg", "psycopg-binary", "psycopg-pool")

    def install(self) -> None:
        from pgqueue.migrate import migrate

        migrate(self.dsn)

    def seed_sql(self) -> LiteralString:
        return (
            "INSERT INTO pgqueue.jobs (task, args, queue, run_at)"
            " SELECT 'noop', jsonb_build_object('n', g), 'default',"
            " CASE WHEN g %% 1000 < %(future)s THEN now() + interval '1 day' ELSE now() END"
            " FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g"
        )

    def finish_sql(self) -> LiteralString:
        return (
            "SELECT finished_at AS t FROM pgqueue.jobs"
            " WHERE state = 'succeeded' AND finished_at >= %(at)s"
        )

    def unfinished_sql(self) -> LiteralString:
        return "SELECT count(*) FROM pgqueue.jobs WHERE state <> 'succeeded'"

    def pending_sql(self) -> LiteralString:
        return (
            "SELECT EXISTS (SELECT 1 FROM pgqueue.jobs WHERE state = 'queued' AND run_at <= now())"
            " OR EXISTS (SELECT 1 FROM pgqueue.jobs WHERE state = 'running')"
        )

    def waiting_sql(self) -> LiteralString:
        return "SELECT count(*) FROM pgqueue.jobs WHERE state = 'queued' AND run_at <= now()"

    def worker(self, processes: int, concurrency: int) -> Worker:
        cmd = [
            str(self.ctx.pgqueue_bin_dir / "pgqueue-worker"),
            "--app",
            "bq_pgqueue:registry",
            "--dsn",
            self.dsn,
            "--queues",
            "default",
            "--concurrency",
            str(concurrency),
            "--processes",
            str(processes),
            "--log-level",
            "warning",
            "--log-format",
            "json",
            *self.ctx.pgqueue_worker_args,
        ]
        extra = "".join(f" {a}" for a in self.ctx.pgqueue_worker_args)
        return Worker(
            f"--processes {processes} --concurrency {concurrency}{extra}"
            if processes > 1
            else f"--concurrency {concurrency}{extra}",
            [cmd],
        )


# --- PgQueuer --------------------------------------------------------------------------


class PgQueuer(System):
    name = "pgqueuer"
    title = "PgQueuer"
    tables = ("pgqueuer", "pgqueuer_log", "pgqueuer_statistics")
    packages = ("pgqueuer", "asyncpg")

    def install(self) -> None:
        async def run() -> None:
            import asyncpg
            from pgqueuer.db import AsyncpgDriver
            from pgqueuer.queries import Queries

            conn = await asyncpg.connect(self.dsn)
            try:
                await Queries(AsyncpgDriver(conn)).install()
            finally:
                await conn.close()

        asyncio.run(run())

    def seed_sql(self) -> LiteralString:
        # As its enqueue query writes them: the job, and a 'queued' row in the log.
        return (
            "WITH ins AS (INSERT INTO pgqueuer (priority, entrypoint, payload, status,"
            " execute_after)"
            " SELECT 0, 'noop', convert_to('{\"n\": ' || g || '}', 'UTF8'), 'queued',"
            " CASE WHEN g %% 1000 < %(future)s THEN now() + interval '1 day' ELSE now() END"
            " FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g"
            " RETURNING id, entrypoint, priority)"
            " INSERT INTO pgqueuer_log (job_id, status, entrypoint, priority)"
            " SELECT id, 'queued', entrypoint, priority FROM ins"
        )

    id_sql = "SELECT max(id) FROM pgqueuer_log"

    def finish_sql(self) -> LiteralString:
        return (
            "SELECT created AS t FROM pgqueuer_log"
            " WHERE id > %(base_id)s AND status = 'successful' AND created >= %(at)s"
        )

    def unfinished_sql(self) -> LiteralString:
        return "SELECT count(*) FROM pgqueuer"

    def pending_sql(self) -> LiteralString:
        return (
            "SELECT EXISTS (SELECT 1 FROM pgqueuer WHERE status = 'picked')"
            " OR EXISTS (SELECT 1 FROM pgqueuer WHERE status = 'queued' AND execute_after <= now())"
        )

    def waiting_sql(self) -> LiteralString:
        return "SELECT count(*) FROM pgqueuer WHERE status = 'queued' AND execute_after <= now()"

    def worker(self, processes: int, concurrency: int) -> Worker:
        # Its knob is the batch size (jobs per dequeue); concurrency is unbounded by
        # default. "Concurrency 1" is as close as it allows: batch 1, at most 2 at once
        # (max_concurrent_tasks must be at least twice the batch size).
        if concurrency <= 1:
            args = ["--batch-size", "1", "--max-concurrent-tasks", "2"]
            label = "batch_size=1, max_concurrent_tasks=2"
        else:
            args = ["--batch-size", str(concurrency)]
            label = f"batch_size={concurrency}"
        cmd = [self.python, "-m", "bq_pgqueuer", *args]
        return Worker(label, [list(cmd) for _ in range(processes)])


# --- procrastinate ---------------------------------------------------------------------


class Procrastinate(System):
    name = "procrastinate"
    title = "procrastinate"
    tables = ("procrastinate_jobs", "procrastinate_events")
    packages = ("procrastinate", "psycopg")

    def install(self) -> None:
        async def run() -> None:
            import procrastinate

            app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=self.dsn))
            async with app.open_async():
                await app.schema_manager.apply_schema_async()

        asyncio.run(run())

    def reset(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                "TRUNCATE procrastinate_jobs, procrastinate_events,"
                " procrastinate_periodic_defers RESTART IDENTITY CASCADE"
            )
            conn.execute("DELETE FROM procrastinate_workers")

    def seed_sql(self) -> LiteralString:
        # Its row triggers (a NOTIFY and a 'deferred' event per job) run as on defer.
        return (
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, scheduled_at)"
            " SELECT 'default', 'noop', jsonb_build_object('n', g), 'todo',"
            " CASE WHEN g %% 1000 < %(future)s THEN now() + interval '1 day' END"
            " FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g"
        )

    id_sql = "SELECT max(id) FROM procrastinate_events"

    def finish_sql(self) -> LiteralString:
        return (
            "SELECT at AS t FROM procrastinate_events"
            " WHERE id > %(base_id)s AND type = 'succeeded' AND at >= %(at)s"
        )

    def unfinished_sql(self) -> LiteralString:
        return "SELECT count(*) FROM procrastinate_jobs WHERE status <> 'succeeded'"

    def pending_sql(self) -> LiteralString:
        return (
            "SELECT EXISTS (SELECT 1 FROM procrastinate_jobs WHERE status = 'doing')"
            " OR EXISTS (SELECT 1 FROM procrastinate_jobs WHERE status = 'todo'"
            " AND (scheduled_at IS NULL OR scheduled_at <= now()))"
        )

    def waiting_sql(self) -> LiteralString:
        return (
            "SELECT count(*) FROM procrastinate_jobs WHERE status = 'todo'"
            " AND (scheduled_at IS NULL OR scheduled_at <= now())"
        )

    def worker(self, processes: int, concurrency: int) -> Worker:
        cmd = [
            str(self.ctx.bin_dir / "procrastinate"),
            "--app",
            "bq_procrastinate.app",
            "--log-level",
            "warning",
            "worker",
            "--concurrency",
            str(concurrency),
        ]
        return Worker(f"--concurrency {concurrency}", [list(cmd) for _ in range(processes)])


# --- Oban ------------------------------------------------------------------------------


class ObanPy(System):
    name = "oban"
    title = "Oban (Python)"
    tables = ("oban_jobs",)
    packages = ("oban", "psycopg", "psycopg-pool")

    @property
    def python(self) -> str:
        assert self.ctx.oban_python is not None, "the Oban venv is not set up"
        return str(self.ctx.oban_python)

    def _oban(self) -> str:
        return str(Path(self.python).parent / "oban")

    def install(self) -> None:
        subprocess.run(
            [self._oban(), "install", "--dsn", self.dsn],
            check=True,
            capture_output=True,
            cwd=APPS_DIR,
        )

    def versions(self) -> dict[str, str]:
        code = (
            "import importlib.metadata as m, json, sys;"
            f"print(json.dumps({{p: m.version(p) for p in {list(self.packages)!r}}}"
            " | {'python': sys.version.split()[0]}))"
        )
        out = subprocess.run(
            [self.python, "-c", code], check=True, capture_output=True, text=True
        ).stdout
        import json

        loaded: dict[str, str] = json.loads(out)
        return loaded

    now_sql = "SELECT timezone('UTC', clock_timestamp())"

    def seed_sql(self) -> LiteralString:
        return (
            "INSERT INTO oban_jobs (state, queue, worker, args, scheduled_at)"
            " SELECT CASE WHEN g %% 1000 < %(future)s THEN 'scheduled' ELSE 'available' END"
            "::oban_job_state, 'default', 'bq_oban.Noop', jsonb_build_object('n', g),"
            " CASE WHEN g %% 1000 < %(future)s THEN timezone('UTC', now()) + interval '1 day'"
            " ELSE timezone('UTC', now()) END"
            " FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g"
        )

    def finish_sql(self) -> LiteralString:
        return (
            "SELECT completed_at AS t FROM oban_jobs"
            " WHERE state = 'completed' AND completed_at >= %(at)s"
        )

    def unfinished_sql(self) -> LiteralString:
        return "SELECT count(*) FROM oban_jobs WHERE state <> 'completed'"

    def pending_sql(self) -> LiteralString:
        return "SELECT EXISTS (SELECT 1 FROM oban_jobs WHERE state IN ('available', 'executing'))"

    def waiting_sql(self) -> LiteralString:
        return "SELECT count(*) FROM oban_jobs WHERE state = 'available'"

    def worker(self, processes: int, concurrency: int) -> Worker:
        cmd = [
            self._oban(),
            "start",
            "--dsn",
            self.dsn,
            "--queues",
            f"default:{concurrency}",
            "--log-level",
            "WARNING",
        ]
        return Worker(f"--queues default:{concurrency}", [list(cmd) for _ in range(processes)])


# --- Celery ----------------------------------------------------------------------------


class CeleryRedis(System):
    """The broker-based reference: no Postgres; jobs are Redis list entries."""

    name = "celery"
    title = "Celery (Redis)"
    postgres = False
    packages = ("celery", "kombu", "redis")

    def _redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.ctx.redis_url)

    def setup(self) -> None:
        client = self._redis()
        if client.dbsize():
            raise RuntimeError(
                f"Redis database {self.ctx.redis_url} is not empty: pick a free one with"
                " --redis-url (the bench empties it at the end)"
            )
        self.install()

    def install(self) -> None:
        return None

    def teardown(self) -> None:
        self._redis().flushdb()

    def reset(self) -> None:
        self._redis().flushdb()

    def analyze(self) -> None:
        return None

    def seed_sql(self) -> LiteralString:
        raise NotImplementedError

    def seed(self, n: int, future_fraction: float = 0.0, chunk: int = 1_000_000) -> None:
        if future_fraction:
            raise NotImplementedError("Celery has no scheduled jobs in the broker")
        subprocess.run(
            [*self.producer_command(), "--mode", "bulk", "--n", str(n), "--no-wait"],
            env=self.env(),
            check=True,
            cwd=APPS_DIR,
            stdout=subprocess.DEVNULL,
        )

    def drained(self, marker: Marker, expected: int) -> bool:
        return self.done(marker) >= expected

    def mark(self) -> Marker:
        client = self._redis()
        client.delete("bench:done", "bench:first", "bench:last")
        return Marker(datetime.now())

    def finish_sql(self) -> LiteralString:
        raise NotImplementedError

    def done(self, marker: Marker) -> int:
        return int(self._redis().get("bench:done") or 0)

    def finish(self, marker: Marker, limit: int | None = None, skip: int = 0) -> Finish:
        if skip:
            raise NotImplementedError("Celery keeps no finish time per job: nothing to skip")
        client = self._redis()
        count = int(client.get("bench:done") or 0)
        first = client.get("bench:first")
        last = client.get("bench:last")
        return Finish(
            count,
            datetime.fromtimestamp(float(first)) if first else None,
            datetime.fromtimestamp(float(last)) if last else None,
            1 if first else 0,
        )

    def unfinished_sql(self) -> LiteralString:
        raise NotImplementedError

    def unfinished(self) -> int:
        return self.waiting()

    def pending_sql(self) -> LiteralString:
        raise NotImplementedError

    def waiting_sql(self) -> LiteralString:
        raise NotImplementedError

    def waiting(self) -> int:
        return int(self._redis().llen("bench"))

    def footprint(self) -> dict[str, dict[str, int]]:
        return {}

    def backend_pids(self) -> list[int]:
        return []

    def worker(self, processes: int, concurrency: int) -> Worker:
        pool = ["-P", "solo"] if concurrency <= 1 else ["-P", "threads", "-c", str(concurrency)]
        commands = [
            [
                str(self.ctx.bin_dir / "celery"),
                "-A",
                "bq_celery",
                "worker",
                "-Q",
                "bench",
                *pool,
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "WARNING",
                "-n",
                f"bench{i}@%h",
            ]
            for i in range(processes)
        ]
        label = "-P solo" if concurrency <= 1 else f"-P threads -c {concurrency}"
        return Worker(label + ", prefetch multiplier 16", commands)


ALL: dict[str, type[System]] = {
    cls.name: cls for cls in (PgQueue, PgQueuer, Procrastinate, ObanPy, CeleryRedis)
}
