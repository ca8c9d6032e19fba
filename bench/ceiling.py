"""The ceiling: what Postgres itself does on this machine with ``pgbench -M prepared``.

* claim + complete: pgqueue's own ``claim_jobs`` and ``complete_jobs`` statements, taken
  from ``pgqueue.sql.QUERIES`` (so the scripts follow the library), one claim and one
  complete per pgbench transaction, as a worker does (two round trips, autocommit). The
  claim is wrapped so that pgbench can keep the claimed ids and lease tokens
  (``\\gset``) and hand them to the complete: its CTE gains one more CTE around the
  same UPDATE, and the result is aggregated into arrays. Its connections use generic
  plans (``plan_cache_mode = force_generic_plan``), as a worker's do by default.
* raw claim + delete: one statement that locks a batch with SKIP LOCKED and deletes it.
  A physical reference only: a job deleted as it is claimed is lost if its worker dies,
  so no at-least-once queue can work this way.
* lease claim + delete: the least an at-least-once queue must do, on the raw table: one
  statement marks a batch running under a lease (state, token, expiry) and counts the
  attempt, as any queue with a retry limit must; a second deletes it once done. Whatever
  else a queue records per job (its history, finished jobs kept for retention, fenced
  outcomes) comes on top of this.
* CPU per job: for the three claim scripts, the machine's busy CPU time during the run
  (``/proc/stat``: user, nice, system, irq, softirq) less pgbench's own, over the jobs.
  On an otherwise idle machine that is Postgres' work (background processes included).
* raw insert: one row per transaction, and 1000 rows per statement, into a table with
  pgqueue.jobs' columns, defaults and indexes but no trigger; and the same into
  pgqueue.jobs itself, and through ``pgqueue.enqueue()``, to show what the trigger and the
  function cost.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import LiteralString

import psycopg

from bench import db


def pgbench_path() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    for version in ("17", "16", "15", "14", "13"):
        candidate = Path(f"/usr/lib/postgresql/{version}/bin/pgbench")
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError("pgbench not found (install postgresql-client)")


def _params(query: str, names: dict[str, str]) -> str:
    def repl(match: re.Match[str]) -> str:
        return ":" + names[match.group(1)]

    return re.sub(r"%\((\w+)\)s", repl, query)


def _strip_comments(query: str) -> str:
    lines = (line.split("--", 1)[0].rstrip() for line in query.splitlines())
    return "\n".join(line for line in lines if line.strip()).strip()


def claim_complete_script() -> str:
    from pgqueue.sql import QUERIES

    claim = _strip_comments(QUERIES["claim_jobs"]).rstrip(";")
    complete = _strip_comments(QUERIES["complete_jobs"]).rstrip(";")
    # "WITH picked AS MATERIALIZED (...)\nUPDATE ... RETURNING ..." -> the UPDATE becomes
    # a second CTE, so that its rows can be aggregated for \gset.
    head, sep, tail = claim.partition("\nUPDATE ")
    if not sep or not head.lstrip().startswith("WITH "):
        raise RuntimeError("claim_jobs no longer has the shape this script expects")
    claim_script = (
        head
        + ",\nclaimed AS (\nUPDATE "
        + tail
        + "\n)\nSELECT coalesce(array_agg(id), '{}') AS ids,"
        " coalesce(array_agg(lease_token), '{}') AS tokens,"
        " coalesce(array_agg(0.0001::float8), '{}') AS durations FROM claimed"
    )
    names = {
        "queues": "queues",
        "limit": "batch",
        "worker_id": "worker",
        "lease_seconds": "lease",
        "ids": "ids",
        "tokens": "tokens",
        "durations": "durations",
    }
    return (
        " ".join(_params(claim_script, names).split())
        + "\n\\gset\n"
        + " ".join(_params(complete, names).split())
        + ";\n"
    )


# The physical reference: claim with SKIP LOCKED and delete, one statement, one round trip.
RAW_CLAIM_DELETE = (
    "WITH picked AS (SELECT id FROM bench_raw.jobs WHERE queue = 'default'"
    " AND state = 'queued' AND run_at <= now() ORDER BY priority, run_at, id"
    " LIMIT :batch FOR UPDATE SKIP LOCKED)"
    " DELETE FROM bench_raw.jobs AS j USING picked WHERE j.id = picked.id"
    " RETURNING j.id, j.args;\n"
)

# The least an at-least-once queue does per job: claim under a lease, delete when done.
LEASE_CLAIM_DELETE = (
    "WITH picked AS (SELECT id FROM bench_raw.jobs WHERE queue = 'default'"
    " AND state = 'queued' AND run_at <= now() ORDER BY priority, run_at, id"
    " LIMIT :batch FOR UPDATE SKIP LOCKED),"
    " claimed AS (UPDATE bench_raw.jobs AS j SET state = 'running',"
    " attempts = j.attempts + 1, lease_token = gen_random_uuid(),"
    " lease_expires_at = now() + interval '30 seconds'"
    " FROM picked WHERE j.id = picked.id RETURNING j.id, j.args)"
    " SELECT coalesce(array_agg(id), '{}') AS ids FROM claimed\n"
    "\\gset\n"
    "DELETE FROM bench_raw.jobs WHERE id = ANY(:ids::bigint[]);\n"
)


def _busy_seconds() -> float:
    """CPU time the whole machine has spent busy so far (user, nice, system, irq,
    softirq; not steal), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Claimed:
    """One claim-script run: jobs per second, and the machine's CPU per job outside
    pgbench (see the module docstring)."""

    rate: float
    cpu_us_per_job: float


INSERT_SCRIPTS: dict[str, str] = {
    "raw_insert_1": "INSERT INTO bench_raw.jobs (task, args) VALUES ('noop', '{\"n\": 1}');\n",
    "raw_insert_1000": (
        "INSERT INTO bench_raw.jobs (task, args)"
        " SELECT 'noop', jsonb_build_object('n', g) FROM generate_series(1, 1000) AS g;\n"
    ),
    "jobs_insert_1": "INSERT INTO pgqueue.jobs (task, args) VALUES ('noop', '{\"n\": 1}');\n",
    "jobs_insert_1000": (
        "INSERT INTO pgqueue.jobs (task, args)"
        " SELECT 'noop', jsonb_build_object('n', g) FROM generate_series(1, 1000) AS g;\n"
    ),
    "enqueue_fn_1": "SELECT pgqueue.enqueue('noop', '{\"n\": 1}');\n",
}
ROWS_PER_TX = {
    "raw_insert_1": 1,
    "raw_insert_1000": 1000,
    "jobs_insert_1": 1,
    "jobs_insert_1000": 1000,
    "enqueue_fn_1": 1,
}


@dataclass
class Ceiling:
    """A database with pgqueue's schema and the raw table, for pgbench."""

    admin_dsn: str
    work_dir: Path
    name: str = "bench_ceiling"

    def setup(self) -> None:
        from pgqueue.migrate import migrate

        self.dsn = db.create_database(self.admin_dsn, self.name)
        migrate(self.dsn)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA bench_raw")
            conn.execute(
                "CREATE TABLE bench_raw.jobs (LIKE pgqueue.jobs INCLUDING DEFAULTS"
                " INCLUDING IDENTITY INCLUDING CONSTRAINTS INCLUDING INDEXES"
                " INCLUDING STORAGE)"
            )
        (self.work_dir / "claim_complete.sql").write_text(claim_complete_script())
        for key, text in INSERT_SCRIPTS.items():
            (self.work_dir / f"{key}.sql").write_text(text)

    def teardown(self) -> None:
        db.drop_database(self.admin_dsn, self.name)

    def _reset(self, seed: int, raw: bool = False) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("TRUNCATE pgqueue.jobs, bench_raw.jobs RESTART IDENTITY")
            if seed and raw:
                conn.execute(
                    "INSERT INTO bench_raw.jobs (task, args)"
                    " SELECT 'noop', jsonb_build_object('n', g)"
                    " FROM generate_series(1, %s) AS g",
                    (seed,),
                )
            elif seed:
                conn.execute(
                    "INSERT INTO pgqueue.jobs (task, args)"
                    " SELECT 'noop', jsonb_build_object('n', g)"
                    " FROM generate_series(1, %s) AS g",
                    (seed,),
                )
            for table in ("pgqueue.jobs", "bench_raw.jobs"):
                query: LiteralString = "VACUUM ANALYZE " + (
                    "pgqueue.jobs" if table == "pgqueue.jobs" else "bench_raw.jobs"
                )
                conn.execute(query)

    def _pgbench(
        self,
        script: str,
        clients: int,
        transactions: int,
        defines: dict[str, str],
        settings: dict[str, str] | None = None,
    ) -> tuple[float, float]:
        """Transactions per second (without connection time) of one pgbench run, and the
        machine's busy CPU seconds outside pgbench during it. ``settings`` are session
        settings for pgbench's connections (PGOPTIONS)."""
        argv = [
            pgbench_path(),
            "-n",
            "-M",
            "prepared",
            "-c",
            str(clients),
            "-j",
            str(min(clients, 2)),
            "-t",
            str(transactions),
            "-f",
            str(self.work_dir / f"{script}.sql"),
        ]
        for key, value in defines.items():
            argv += ["-D", f"{key}={value}"]
        argv.append(self.dsn)
        busy0, own0 = _busy_seconds(), _children_cpu_seconds()
        env = dict(os.environ)
        if settings:
            options = " ".join(f"-c {k}={v}" for k, v in settings.items())
            env["PGOPTIONS"] = f"{env.get('PGOPTIONS', '')} {options}".strip()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env)
        cpu_seconds = max(0.0, (_busy_seconds() - busy0) - (_children_cpu_seconds() - own0))
        if done.returncode != 0:
            raise RuntimeError(f"pgbench failed: {done.stderr.strip()[-2000:]}")
        match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", done.stdout)
        if match is None:
            raise RuntimeError(f"pgbench output not understood: {done.stdout[-2000:]}")
        failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
        if failed and int(failed.group(1)):
            raise RuntimeError(f"pgbench: {failed.group(1)} failed transactions")
        return float(match.group(1)), cpu_seconds

    def claim_complete(self, batch: int, clients: int, jobs: int) -> Claimed:
        """Jobs per second claimed and completed by ``clients`` at ``batch`` per claim;
        ``jobs`` in all (every transaction finds a full batch; the surplus seeded must be
        what is left unfinished: nothing claimed and lost)."""
        per_client = max(1, jobs // (clients * batch))
        total = per_client * clients * batch
        surplus = batch * clients
        self._reset(total + surplus)
        tps, cpu_seconds = self._pgbench(
            "claim_complete",
            clients,
            per_client,
            {"queues": "{default}", "batch": str(batch), "worker": "pgbench", "lease": "30"},
            # As a worker runs them by default (--no-generic-plans turns it off): with
            # Postgres' own choice (plan_cache_mode = auto) the claim was planned again
            # for every transaction, 0.45 ms per claim of one job instead of 0.28 here.
            {"plan_cache_mode": "force_generic_plan"},
        )
        left = int(
            db.scalar(self.dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state <> 'succeeded'")
        )
        if left != surplus:
            raise RuntimeError(f"claim/complete left {left} jobs unfinished, expected {surplus}")
        return Claimed(tps * batch, cpu_seconds / total * 1e6)

    def claim_delete(self, batch: int, clients: int, jobs: int, *, lease: bool) -> Claimed:
        """Jobs per second of the raw claim-and-delete in one statement (the physical
        reference), or with ``lease`` of the lease claim and the delete that follows it
        (the least an at-least-once queue does)."""
        per_client = max(1, jobs // (clients * batch))
        total = per_client * clients * batch
        surplus = batch * clients
        self._reset(total + surplus, raw=True)
        script = "lease_claim_delete" if lease else "raw_claim_delete"
        # The batch size goes in as a literal, not as a pgbench variable: as a parameter of
        # the prepared statement it hid the LIMIT from a generic plan, and Postgres planned
        # the statement again for every transaction (a lease claim of one job took 0.40
        # ms instead of 0.26). pgqueue's own claim takes its limit as a parameter, as the
        # worker sends it, with the worker's generic plans (claim_complete).
        text = (LEASE_CLAIM_DELETE if lease else RAW_CLAIM_DELETE).replace(":batch", str(batch))
        (self.work_dir / f"{script}_{batch}.sql").write_text(text)
        tps, cpu_seconds = self._pgbench(f"{script}_{batch}", clients, per_client, {})
        left = int(db.scalar(self.dsn, "SELECT count(*) FROM bench_raw.jobs"))
        if left != surplus:
            raise RuntimeError(f"{script} left {left} jobs, expected {surplus}")
        return Claimed(tps * batch, cpu_seconds / total * 1e6)

    def insert(self, script: str, clients: int, rows: int) -> float:
        """Rows per second inserted by ``clients`` running ``script``."""
        per_tx = ROWS_PER_TX[script]
        per_client = max(1, rows // (clients * per_tx))
        self._reset(0)
        tps, _ = self._pgbench(script, clients, per_client, {})
        return tps * per_tx
