"""Migrations: a fresh database gets the schema, a second run is a no-op, concurrent
migrators serialise, an edited migration is refused, and the CLI reports in one line."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgqueue.errors import MigrationError
from pgqueue.migrate import (
    LOCKS_JOBS,
    SAME_SCHEMA_CHECKSUMS,
    Migration,
    load_migrations,
    migrate,
)
from pgqueue.migrate import status as migration_status
from tests.conftest import _admin, run_at_once, scalar

ROOT = Path(__file__).resolve().parent.parent
PGQUEUE = Path(sys.executable).parent / "pgqueue"


@pytest.fixture
def empty_dsn(server_dsn: str) -> Iterator[str]:
    """A brand-new, unmigrated database, dropped afterwards."""
    name = f"pgqueue_empty_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(server_dsn, dbname=name)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def schema_snapshot(dsn: str) -> dict[str, Any]:
    """Everything in schema pgqueue, and the record of applied migrations."""
    with psycopg.connect(dsn, autocommit=True) as c:
        relations = c.execute(
            "SELECT c.relname, c.relkind, c.oid FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'pgqueue' ORDER BY 1"
        ).fetchall()
        functions = c.execute(
            "SELECT p.oid::regprocedure::text, p.oid FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'pgqueue' ORDER BY 1"
        ).fetchall()
        migrations = c.execute(
            "SELECT version, name, checksum, applied_at FROM pgqueue.schema_migrations"
            " ORDER BY version"
        ).fetchall()
    return {"relations": relations, "functions": functions, "migrations": migrations}


def versions(migrations: list[Migration]) -> list[int]:
    return [m.version for m in migrations]


def test_migrating_a_fresh_database_creates_the_schema(empty_dsn):
    applied = migrate(empty_dsn)

    assert versions(applied) == versions(load_migrations())
    assert versions(applied)[0] == 1
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        for table in ("jobs", "dead_jobs", "schema_migrations"):
            assert scalar(c, "SELECT to_regclass(%s)::text", (f"pgqueue.{table}",)) == (
                f"pgqueue.{table}"
            )
        assert scalar(c, "SELECT count(*) FROM pg_proc WHERE oid = 'pgqueue.enqueue'::regproc")
        recorded = c.execute(
            "SELECT version, name, checksum FROM pgqueue.schema_migrations ORDER BY version"
        ).fetchall()
        # The schema works: a job can be enqueued.
        job_id = scalar(c, "SELECT pgqueue.enqueue('t')")
        assert scalar(c, "SELECT state::text FROM pgqueue.jobs WHERE id = %s", (job_id,)) == (
            "queued"
        )
    assert recorded == [(m.version, m.name, m.checksum) for m in load_migrations()]


def test_migrating_an_up_to_date_database_applies_nothing_and_changes_nothing(empty_dsn):
    migrate(empty_dsn)
    before = schema_snapshot(empty_dsn)

    assert migrate(empty_dsn) == []

    assert schema_snapshot(empty_dsn) == before


def test_concurrent_migrators_apply_each_migration_exactly_once(empty_dsn):
    def run(start: threading.Barrier) -> list[Migration]:
        start.wait(timeout=30)
        return migrate(empty_dsn)

    results = run_at_once(run)
    expected = versions(load_migrations())
    assert sorted(versions(results[0]) + versions(results[1])) == expected
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        rows = c.execute("SELECT version FROM pgqueue.schema_migrations ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == expected


def test_an_applied_migration_whose_checksum_changed_is_refused(dsn, conn):
    conn.execute("UPDATE pgqueue.schema_migrations SET checksum = 'x' WHERE version = 1")
    before = schema_snapshot(dsn)

    with pytest.raises(MigrationError, match="0001"):
        migrate(dsn)

    assert schema_snapshot(dsn) == before
    # The refusal released the migration lock: the next migrator is refused too, not stuck.
    with pytest.raises(MigrationError):
        migrate(dsn)


# --- CLI ----------------------------------------------------------------------------------


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PGQUEUE_DSN"}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PGQUEUE), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_migrate_applies_then_says_up_to_date(empty_dsn):
    first = run_cli("migrate", "--dsn", empty_dsn, env=cli_env())

    assert first.returncode == 0, first.stderr
    assert [line for line in first.stdout.splitlines() if line] == [
        f"applied {m.version:04d}_{m.name}" for m in load_migrations()
    ]

    second = run_cli("migrate", "--dsn", empty_dsn, env=cli_env())

    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "pgqueue schema is up to date"
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        assert scalar(c, "SELECT count(*) FROM pgqueue.schema_migrations") == len(load_migrations())


def test_cli_migrate_reads_the_dsn_from_pgqueue_dsn(empty_dsn):
    result = run_cli("migrate", env=cli_env(PGQUEUE_DSN=empty_dsn))

    assert result.returncode == 0, result.stderr
    assert "applied 0001_" in result.stdout


def test_cli_migrate_without_a_dsn_fails_with_one_line_and_no_traceback():
    result = run_cli("migrate", env=cli_env())

    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "PGQUEUE_DSN" in lines[0] or "--dsn" in lines[0]
    assert result.stdout == ""


def migrate_before(dsn: str, version: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Apply the migrations numbered below ``version`` only, as an older pgqueue would;
    ``migrate`` sees every migration again afterwards."""
    earlier = [m for m in load_migrations() if m.version < version]
    with monkeypatch.context() as patch:
        # pgqueue.migrate is also a function: the module comes from sys.modules.
        patch.setattr(sys.modules["pgqueue.migrate"], "load_migrations", lambda: earlier)
        migrate(dsn)


def test_migration_0010_names_jobs_whose_run_at_no_worker_can_read(empty_dsn, monkeypatch):
    migrate_before(empty_dsn, 10, monkeypatch)
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        bad = [
            scalar(c, "INSERT INTO pgqueue.jobs (task, run_at) VALUES ('t', %s) RETURNING id", (v,))
            for v in ("infinity", "-infinity")
        ]
        scalar(c, "INSERT INTO pgqueue.jobs (task) VALUES ('fine') RETURNING id")

    with pytest.raises(MigrationError) as refused:
        migrate(empty_dsn)
    assert f"jobs {{{bad[0]},{bad[1]}}} have a run_at no worker can read" in str(refused.value)

    with psycopg.connect(empty_dsn, autocommit=True) as c:
        c.execute("UPDATE pgqueue.jobs SET run_at = now() WHERE id = ANY (%s)", (bad,))
    assert 10 in versions(migrate(empty_dsn))


def test_migration_0015_names_jobs_whose_created_at_no_worker_can_read(empty_dsn, monkeypatch):
    migrate_before(empty_dsn, 15, monkeypatch)
    insert = "INSERT INTO pgqueue.jobs (task, created_at) VALUES ('t', %s) RETURNING id"
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        bad = [scalar(c, insert, (v,)) for v in ("infinity", "-infinity")]
        scalar(c, "INSERT INTO pgqueue.jobs (task) VALUES ('fine') RETURNING id")
        # One such job already dead-lettered (what the claim's failure led to).
        c.execute(
            "INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts,"
            " max_attempts, run_at, created_at, reason) VALUES"
            " (900, 'default', 't', '{}', 0, 1, 1, now(), 'infinity', 'lease_expired')"
        )

    with pytest.raises(MigrationError) as refused:
        migrate(empty_dsn)
    assert f"jobs {{{bad[0]},{bad[1]}}} have a created_at no worker can read" in str(refused.value)

    with psycopg.connect(empty_dsn, autocommit=True) as c:
        c.execute("UPDATE pgqueue.jobs SET created_at = now() WHERE id = ANY (%s)", (bad,))
    with pytest.raises(MigrationError) as refused:
        migrate(empty_dsn)
    assert "dead_jobs {900} have a created_at no worker can read" in str(refused.value)

    with psycopg.connect(empty_dsn, autocommit=True) as c:
        c.execute("UPDATE pgqueue.dead_jobs SET created_at = now() WHERE id = 900")
    assert 15 in versions(migrate(empty_dsn))
    with (
        psycopg.connect(empty_dsn, autocommit=True) as c,
        pytest.raises(psycopg.errors.CheckViolation),
    ):
        c.execute("UPDATE pgqueue.dead_jobs SET created_at = 'infinity' WHERE id = 900")


def test_migration_0013_names_jobs_whose_queue_no_worker_can_serve(empty_dsn, monkeypatch):
    migrate_before(empty_dsn, 13, monkeypatch)
    insert = "INSERT INTO pgqueue.jobs (task, queue) VALUES ('t', %s) RETURNING id"
    # White space as Python's str.isspace() has it, whatever the locale makes of \s.
    padded = [" mail", "mail\n", "mail\xa0", "\x85mail"]
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        bad = [scalar(c, insert, (q,)) for q in padded]
        fine = scalar(c, insert, ("two words",))

    with pytest.raises(MigrationError) as refused:
        migrate(empty_dsn)
    message = str(refused.value)
    assert f"jobs {{{','.join(map(str, bad))}}} have a queue name with white space" in message
    # The migration's hint reaches the user.
    assert "; hint: give them the queue they were meant for (UPDATE pgqueue.jobs" in message
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        # Refused whole: the constraint is not there, and nothing was changed.
        assert scalar(c, "SELECT max(version) FROM pgqueue.schema_migrations") == 12
        queues = sorted(r[0] for r in c.execute("SELECT queue FROM pgqueue.jobs"))
        assert queues == sorted([*padded, "two words"])
        c.execute("UPDATE pgqueue.jobs SET queue = 'mail' WHERE id = ANY (%s)", (bad,))
    assert 13 in versions(migrate(empty_dsn))

    with psycopg.connect(empty_dsn, autocommit=True) as c:
        for name in (" mail", "mail ", "mail\t", "\nmail", "mail\u3000", "\x1cmail"):
            with pytest.raises(psycopg.errors.CheckViolation, match="jobs_queue_trimmed_check"):
                c.execute(insert, (name,))
        assert scalar(c, "SELECT queue FROM pgqueue.jobs WHERE id = %s", (fine,)) == "two words"
        assert scalar(c, "SELECT count(*) FROM pgqueue.jobs WHERE queue = 'mail'") == len(bad)


def test_migration_0013_gives_up_on_its_lock_instead_of_queueing_everyone(empty_dsn, monkeypatch):
    # Waiting behind an open transaction for its lock, it would make every later statement
    # on pgqueue.jobs wait behind it too: it fails after 5 s instead, and applies later.
    migrate_before(empty_dsn, 13, monkeypatch)
    with psycopg.connect(empty_dsn) as reader:
        reader.execute("SELECT count(*) FROM pgqueue.jobs")  # holds a share lock, open
        began = time.monotonic()
        with pytest.raises(MigrationError, match="0013_queue_name_trimmed failed: it waited") as e:
            migrate(empty_dsn, lock_timeout=0.3)  # its own SET LOCAL wins: 5 s
        assert time.monotonic() - began >= 4.5
        assert "(this migration waits at most 5s whatever --lock-timeout)" in str(e.value)
        # Its own lock went with it: the reader's transaction goes on.
        assert reader.execute("SELECT count(*) FROM pgqueue.jobs").fetchone() == (0,)
    assert 13 in versions(migrate(empty_dsn))


def test_migration_0016_names_jobs_whose_queue_has_a_comma(empty_dsn, monkeypatch):
    migrate_before(empty_dsn, 16, monkeypatch)
    insert = "INSERT INTO pgqueue.jobs (task, queue) VALUES ('t', %s) RETURNING id"
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        bad = scalar(c, insert, ("mail,sms",))
        scalar(c, insert, ("mail",))
    with pytest.raises(MigrationError) as refused:
        migrate(empty_dsn)
    assert f"jobs {{{bad}}} have a queue name with a comma" in str(refused.value)
    assert "; hint: give them the queue they were meant for" in str(refused.value)
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        assert scalar(c, "SELECT max(version) FROM pgqueue.schema_migrations") == 15
        c.execute("UPDATE pgqueue.jobs SET queue = 'mail' WHERE id = %s", (bad,))
    assert 16 in versions(migrate(empty_dsn))
    with (
        psycopg.connect(empty_dsn, autocommit=True) as c,
        pytest.raises(psycopg.errors.CheckViolation, match="jobs_queue_no_comma"),
    ):
        c.execute(insert, ("a,b",))


def test_migration_0025_names_jobs_whose_task_is_white_space_alone(empty_dsn, monkeypatch):
    # jobs_task_check's \s follows the locale and let these through; no registry can hold
    # such a name (Python refuses it), so each job was retried as an unknown task for
    # hours, then dead-lettered.
    migrate_before(empty_dsn, 25, monkeypatch)
    insert = "INSERT INTO pgqueue.jobs (task) VALUES (%s) RETURNING id"
    blank = ["\xa0", "\x1c", "\x85\x1f"]
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        bad = [scalar(c, insert, (t,)) for t in blank]
        fine = [scalar(c, insert, (t,)) for t in (" padded task ", "a\xa0b")]

    with pytest.raises(MigrationError) as refused:
        migrate(empty_dsn)
    message = str(refused.value)
    assert f"jobs {{{','.join(map(str, bad))}}} have a task name of white space alone" in message
    assert "; hint: delete them (DELETE FROM pgqueue.jobs WHERE id = ANY (...))" in message
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        # Refused whole: nothing was changed.
        assert scalar(c, "SELECT max(version) FROM pgqueue.schema_migrations") == 24
        assert scalar(c, "SELECT count(*) FROM pgqueue.jobs") == 5
        c.execute("DELETE FROM pgqueue.jobs WHERE id = ANY (%s)", (bad,))
    assert 25 in versions(migrate(empty_dsn))

    with psycopg.connect(empty_dsn, autocommit=True) as c:
        # (jobs_task_check, older, still refuses what the locale's \s knows.)
        for task in [*blank, "\u3000", "\u2028 \t", "\u205f"]:
            named = "jobs_task_not_blank" if task in blank else "jobs_task_(check|not_blank)"
            with pytest.raises(psycopg.errors.CheckViolation, match=named):
                c.execute(insert, (task,))
            with pytest.raises(psycopg.errors.CheckViolation, match=named):
                c.execute("SELECT pgqueue.enqueue(%s)", (task,))
        # Names Python takes still go in, padded ones and inner white space included.
        assert sorted(r[0] for r in c.execute("SELECT id FROM pgqueue.jobs")) == fine
        scalar(c, insert, (" padded task ",))


def test_migration_0017_dates_finished_jobs_without_finished_at_and_refuses_more(
    empty_dsn, monkeypatch
):
    # The pruner goes by finished_at: a job inserted as succeeded without one stayed
    # for good.
    migrate_before(empty_dsn, 17, monkeypatch)
    insert = "INSERT INTO pgqueue.jobs (task, state) VALUES ('t', %s) RETURNING id"
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        undated = [scalar(c, insert, (state,)) for state in ("succeeded", "cancelled")]
        queued = scalar(c, insert, ("queued",))
    assert {17, 18} <= set(versions(migrate(empty_dsn)))
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        assert scalar(
            c,
            "SELECT convalidated FROM pg_constraint WHERE conname = 'jobs_finished_at_check'",
        )
        dated = c.execute(
            "SELECT id FROM pgqueue.jobs WHERE finished_at > now() - interval '1 minute'"
            " ORDER BY id"
        ).fetchall()
        assert [row[0] for row in dated] == undated
        assert scalar(c, "SELECT finished_at FROM pgqueue.jobs WHERE id = %s", (queued,)) is None
        for state in ("succeeded", "cancelled"):
            with pytest.raises(psycopg.errors.CheckViolation, match="jobs_finished_at_check"):
                c.execute(insert, (state,))
        c.execute(
            "INSERT INTO pgqueue.jobs (task, state, finished_at) VALUES ('t', 'succeeded', now())"
        )


def test_migrations_0019_0020_give_dead_jobs_a_state_that_is_always_dead(empty_dsn, monkeypatch):
    # pgqueue.dead_jobs holds the job's columns: state too, as pgqueue.jobs has it.
    migrate_before(empty_dsn, 19, monkeypatch)
    insert = (
        "INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts,"
        " max_attempts, run_at, created_at, errors, reason)"
        " VALUES (%s, 'q', 't', '{}', 0, 1, 1, now(), now(), '[]', 'exhausted')"
    )
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        c.execute(insert, (1,))  # dead before the column existed
    assert {19, 20} <= set(versions(migrate(empty_dsn)))
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        assert scalar(
            c, "SELECT convalidated FROM pg_constraint WHERE conname = 'dead_jobs_state_check'"
        )
        c.execute(insert, (2,))
        states = c.execute("SELECT id, state FROM pgqueue.dead_jobs ORDER BY id").fetchall()
        assert states == [(1, "dead"), (2, "dead")]
        with pytest.raises(psycopg.errors.CheckViolation, match="dead_jobs_state_check"):
            c.execute("UPDATE pgqueue.dead_jobs SET state = 'queued' WHERE id = 1")


def test_migrate_with_nothing_pending_needs_no_create_privilege(empty_dsn):
    # A deploy step checking an up-to-date schema as a role that cannot CREATE in the
    # database failed with "permission denied for database" (CREATE SCHEMA IF NOT EXISTS
    # checks the privilege even when the schema exists).
    migrate(empty_dsn)
    role = f"pgqueue_reader_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        c.execute(sql.SQL("GRANT USAGE ON SCHEMA pgqueue TO {}").format(sql.Identifier(role)))
        c.execute(
            sql.SQL("GRANT SELECT ON pgqueue.schema_migrations TO {}").format(sql.Identifier(role))
        )
    try:
        assert migrate(make_conninfo(empty_dsn, user=role)) == []
    finally:
        with psycopg.connect(empty_dsn, autocommit=True) as c:
            c.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            c.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


# Statements that lock pgqueue.jobs against enqueues and claims (VALIDATE CONSTRAINT and
# storage parameters take a lock that lets both through; so does CREATE INDEX
# CONCURRENTLY, which no migration can use: they run in a transaction).
_JOBS = r'"?pgqueue"?\s*\.\s*"?jobs"?(?![_a-z0-9"])'
LOCKS_JOBS_STATEMENT = re.compile(
    rf"(ALTER\s+TABLE\s+(IF\s+EXISTS\s+)?(ONLY\s+)?{_JOBS}\s+(?!\s|VALIDATE|SET\s*\()"
    rf"|\bLOCK\s+TABLE\s+[^;]*{_JOBS}"
    rf"|CREATE\s+(UNIQUE\s+)?INDEX\s+(?!CONCURRENTLY)[^;]*\bON\s+(ONLY\s+)?{_JOBS}"
    rf"|(CREATE(\s+OR\s+REPLACE)?|DROP)\s+TRIGGER\s+[^;]*\bON\s+{_JOBS}"
    r'|DROP\s+INDEX\s+(?!CONCURRENTLY)(IF\s+EXISTS\s+)?"?pgqueue"?\s*\.\s*"?jobs_'
    rf"|REFERENCES\s+{_JOBS})",
    re.IGNORECASE,
)


def test_the_migrations_said_to_lock_the_jobs_table_are_those_that_do():
    # A failed migration's message says that enqueues wait behind it (LOCKS_JOBS): a new
    # migration that locks pgqueue.jobs must be added there (and to README, Upgrading).
    locking = {
        m.version
        for m in load_migrations()
        if m.version > 1 and LOCKS_JOBS_STATEMENT.search(re.sub(r"--[^\n]*", "", m.sql))
    }
    assert locking == LOCKS_JOBS


def test_every_migration_gives_up_on_its_lock_after_the_lock_timeout(empty_dsn, monkeypatch):
    # 0013 had its own 5 s limit; 0015 (and 0007, 0010) waited behind an open transaction
    # for as long as it lasted, and every enqueue and claim queued behind them.
    migrate_before(empty_dsn, 15, monkeypatch)
    with psycopg.connect(empty_dsn) as reader:
        reader.execute("SELECT count(*) FROM pgqueue.jobs")  # holds a share lock, open
        with pytest.raises(
            MigrationError, match=r"0015_created_at_range failed: it waited \d+\.\ds for a lock"
        ):
            migrate(empty_dsn, lock_timeout=0.3)
        cli = subprocess.run(
            [str(Path(sys.executable).parent / "pgqueue"), "migrate", "--lock-timeout", "0.3",
             "--dsn", empty_dsn],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert cli.returncode == 1, (cli.stdout, cli.stderr)
        assert re.search(r"0015_created_at_range failed: it waited \d+\.\ds for a lock", cli.stderr)
        assert "run it again once that ends, or allow longer with --lock-timeout" in cli.stderr
        assert "enqueues and claims wait behind it for as long as it waits" in cli.stderr
        # It names the session to end (it said only "an open transaction?").
        assert f"an open transaction? backend pid {reader.info.backend_pid} (idle in" in (
            cli.stderr
        )
        # Its own lock went with it: the reader's transaction goes on.
        assert reader.execute("SELECT count(*) FROM pgqueue.jobs").fetchone() == (0,)
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        assert scalar(c, "SELECT max(version) FROM pgqueue.schema_migrations") == 14
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lock_timeout must be 0 or more seconds"):
            migrate(empty_dsn, lock_timeout=bad)
    assert 15 in versions(migrate(empty_dsn, lock_timeout=0))


def test_a_reader_that_goes_away_does_not_stop_migrate_half_way(empty_dsn):
    # Each migration is printed as it commits: with `| head -1` the second line met a
    # closed pipe, and the BrokenPipeError ended the run after two migrations.
    pgqueue = Path(sys.executable).parent / "pgqueue"
    run = subprocess.run(
        f"'{pgqueue}' migrate --dsn \"$DSN\" | head -1",
        shell=True, env={**os.environ, "DSN": empty_dsn}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert run.stdout.startswith("applied 0001_"), (run.stdout, run.stderr)
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        applied = scalar(c, "SELECT count(*) FROM pgqueue.schema_migrations")
    assert applied == len(load_migrations())


def test_a_migration_that_gave_up_names_only_this_databases_lock_holders(
    dsn, server_dsn, template_db, monkeypatch
):
    # Databases cloned from one template share their tables' oids: a session holding a
    # lock on another clone's pgqueue.jobs was named too (first, being older).
    other = f"pgqueue_t_{uuid.uuid4().hex[:10]}"
    _admin(server_dsn, f'CREATE DATABASE "{other}" TEMPLATE "{template_db}"')
    try:
        everything = load_migrations()
        locks = Migration(9100, "locks_jobs", "LOCK TABLE pgqueue.jobs IN ACCESS EXCLUSIVE MODE;")
        monkeypatch.setattr(
            sys.modules["pgqueue.migrate"], "load_migrations", lambda: [*everything, locks]
        )
        with (
            psycopg.connect(make_conninfo(server_dsn, dbname=other)) as elsewhere,
            psycopg.connect(dsn) as reader,
        ):
            elsewhere.execute("SELECT count(*) FROM pgqueue.jobs")  # open, and older
            reader.execute("SELECT count(*) FROM pgqueue.jobs")
            pids = (reader.info.backend_pid, elsewhere.info.backend_pid)
            with pytest.raises(MigrationError) as refused:
                migrate(dsn, lock_timeout=0.3)
        message = str(refused.value)
        assert f"backend pid {pids[0]} (idle in transaction" in message
        assert f"backend pid {pids[1]} " not in message
    finally:
        _admin(server_dsn, f'DROP DATABASE IF EXISTS "{other}" WITH (FORCE)')


@contextlib.contextmanager
def database_in(server_dsn: str, encoding: str) -> Iterator[str]:
    """A migrated throwaway database of that server encoding (locale C), dropped after."""
    name = f"pgqueue_enc_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL(
                "CREATE DATABASE {} TEMPLATE template0 ENCODING {} LC_CTYPE 'C' LC_COLLATE 'C'"
            ).format(sql.Identifier(name), sql.Literal(encoding))
        )
    try:
        dsn = make_conninfo(server_dsn, dbname=name)
        migrate(dsn)
        yield dsn
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.mark.parametrize(
    ("encoding", "refused", "accepted"),
    [
        # The regex compares bytes in a single-byte encoding: 0x85 is "…" in WIN1252
        # and Cyrillic Ie in WIN866, 0xA0 is Cyrillic a in WIN866. Only ASCII white space.
        ("WIN1252", [" mail", "mail\t", "\x1cmail"], ["loading…", "mail\xa0x"]),
        ("WIN866", [" mail", "mail\n"], ["Москва", "почта"]),
        # LATIN1's bytes 0x85 and 0xA0 are U+0085 and U+00A0: white space to Python.
        ("LATIN1", [" mail", "mail\xa0", "\x85mail"], ["voilà", "Å"]),
    ],
)
def test_migration_0013_in_a_single_byte_encoding_refuses_no_letter(
    server_dsn, encoding, refused, accepted
):
    insert = "INSERT INTO pgqueue.jobs (task, queue) VALUES ('t', %s)"
    with database_in(server_dsn, encoding) as dsn, psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SET client_encoding = 'UTF8'")
        for queue in refused:
            with pytest.raises(psycopg.errors.CheckViolation, match="queue_trimmed"):
                c.execute(insert, (queue,))
        for queue in accepted:
            c.execute(insert, (queue,))
        stored = [r[0] for r in c.execute("SELECT queue FROM pgqueue.jobs ORDER BY id")]
    assert stored == accepted


@pytest.mark.parametrize(
    ("encoding", "bad_bytes"),
    [
        # Any bytes go in; they are checked only on the way out, to a UTF-8 session.
        ("SQL_ASCII", "636166e9"),  # "caf" and a LATIN1 e-acute: not UTF-8
        # 0x81 has no Unicode character in WIN1252.
        ("WIN1252", "78817a"),
    ],
)
def test_a_database_not_in_utf8_refuses_job_text_workers_could_not_read_and_stores_errors(
    server_dsn, encoding, bad_bytes
):
    # Such a row made every claim of its queue fail for good (nothing dead-lettered, every
    # job behind it waiting), and a handler's error text the database could not hold
    # failed the outcome's write (the job ran again, alone, once its lease expired).
    from pgqueue import Backoff, Registry
    from pgqueue.testing import drain

    registry = Registry()

    @registry.task(name="ok", max_attempts=1)
    def ok(note: str) -> None: ...

    @registry.task(name="boom", max_attempts=1, backoff=Backoff(base_seconds=0.01))
    def boom() -> None:
        raise ValueError("no \U0001f389, no \u0436")

    with database_in(server_dsn, encoding) as dsn, psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SET client_encoding = 'UTF8'")  # as a worker's session
        bad = sql.SQL("convert_from({}::bytea, {})").format(
            sql.Literal(bytes.fromhex(bad_bytes)), sql.Literal(encoding)
        )
        for column, value in (
            ("task", sql.SQL("{}").format(bad)),
            ("queue", sql.SQL("{}").format(bad)),
            ("idempotency_key", sql.SQL("{}").format(bad)),
            ("args", sql.SQL("jsonb_build_object('note', {})").format(bad)),
        ):
            insert = sql.SQL("INSERT INTO pgqueue.jobs ({}) VALUES ({})").format(
                sql.SQL("task, args" if column == "task" else f"task, {column}"),
                sql.SQL("{}, '{{}}'").format(value)
                if column == "task"
                else sql.SQL("'ok', {}").format(value),
            )
            with pytest.raises(psycopg.errors.CharacterNotInRepertoire, match="no UTF-8 form"):
                c.execute(insert)
        # An update of those columns too.
        c.execute("INSERT INTO pgqueue.jobs (task, args) VALUES ('ok', '{\"note\": \"x\"}')")
        with pytest.raises(psycopg.errors.CharacterNotInRepertoire, match="no UTF-8 form"):
            c.execute(sql.SQL("UPDATE pgqueue.jobs SET task = {}").format(bad))
        c.execute("DELETE FROM pgqueue.jobs")
        c.execute(
            "INSERT INTO pgqueue.jobs (task, args, max_attempts) VALUES"
            " ('ok', '{\"note\": \"plain\"}', 1), ('boom', '{}', 1)"
        )
        result = drain(registry, dsn, timeout=30)
        assert sorted(result.outcomes.items()) == [("dead", 1), ("succeeded", 1)]
        ((error,),) = c.execute("SELECT errors -> 0 ->> 'error' FROM pgqueue.dead_jobs")
        assert error == "ValueError: no \\U0001f389, no \\u0436"


def test_migration_warnings_reach_the_user_and_a_failure_is_one_line_naming_what_applied(
    empty_dsn, monkeypatch
):
    from click.testing import CliRunner

    from pgqueue.cli import main

    migrate_module = sys.modules["pgqueue.migrate"]
    extra = [
        # 0005's warning has pgqueue's prefix and a hint: the hint was dropped, and the
        # prefix came twice ("pgqueue: warning: pgqueue: ...").
        Migration(
            9001,
            "warns",
            "DO $$ BEGIN RAISE WARNING 'pgqueue: roles not created'"
            " USING HINT = 'have a superuser run it again'; END $$;",
        ),
        Migration(9002, "fine", "CREATE TABLE pgqueue.t9002 (x int);"),
        Migration(9003, "broken", "CREATE TABLE pgqueue.t9003 (x nosuchtype);"),
    ]
    everything = load_migrations()
    monkeypatch.setattr(migrate_module, "load_migrations", lambda: [*everything, *extra])

    result = CliRunner().invoke(main, ["migrate", "--dsn", empty_dsn])

    assert result.exit_code == 1, result.output
    # The warning used to be dropped; the failure ran to several lines (HINT, CONTEXT)
    # and did not say that 9001 and 9002 had been applied.
    assert "pgqueue: warning: roles not created; hint: have a superuser run it again" in (
        result.stderr
    )
    (failure,) = [line for line in result.stderr.splitlines() if "failed" in line]
    assert "9003_broken failed:" in failure and "nosuchtype" in failure
    assert "applied before it:" in failure and "9001_warns, 9002_fine" in failure
    assert len(result.stderr.strip().splitlines()) == 2
    # Each migration is reported as it commits (all were printed at the end, so a run
    # that failed printed none of those it applied).
    applied = [f"{m.version:04d}_{m.name}" for m in [*everything, *extra[:2]]]
    assert result.stdout.splitlines() == [f"applied {name}" for name in applied]
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        assert scalar(c, "SELECT max(version) FROM pgqueue.schema_migrations") == 9002


def test_migrate_warns_when_a_newer_version_migrated_the_database(dsn):
    from click.testing import CliRunner

    from pgqueue.cli import main

    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(
            "INSERT INTO pgqueue.schema_migrations (version, name, checksum)"
            " VALUES (9999, 'from_the_future', 'x')"
        )
    result = CliRunner().invoke(main, ["migrate", "--dsn", dsn])
    # It used to say only "up to date".
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "pgqueue schema is up to date"
    assert "(9999)" in result.stderr and "newer" in result.stderr


def test_migrate_status_lists_pending_then_applied_and_creates_nothing(empty_dsn):
    from click.testing import CliRunner

    from pgqueue.cli import main

    shipped = load_migrations()
    before = CliRunner().invoke(main, ["migrate", "--status", "--dsn", empty_dsn])

    assert before.exit_code == 1, before.output
    lines = before.stdout.splitlines()
    assert lines[0].split() == ["VERSION", "NAME", "STATE", "APPLIED_AT"]
    assert [line.split() for line in lines[1:-1]] == [
        [f"{m.version:04d}", m.name, "pending"] for m in shipped
    ]
    assert lines[-1] == f"{len(shipped)} pending: `pgqueue migrate` applies them"
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        assert scalar(c, "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgqueue'") == 0

    migrate(empty_dsn)
    after = CliRunner().invoke(main, ["migrate", "--status", "--dsn", empty_dsn])

    assert after.exit_code == 0, after.output
    lines = after.stdout.splitlines()
    assert [line.split()[:3] for line in lines[1:-1]] == [
        [f"{m.version:04d}", m.name, "applied"] for m in shipped
    ]
    assert lines[-1] == "pgqueue schema is up to date"


def test_migrate_status_names_changed_newer_and_pending_migrations(empty_dsn):
    from click.testing import CliRunner

    from pgqueue.cli import main

    shipped = load_migrations()
    migrate(empty_dsn)
    first, last = shipped[0], shipped[-1]
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        c.execute(
            "UPDATE pgqueue.schema_migrations SET checksum = 'edited' WHERE version = %s",
            (first.version,),
        )
        c.execute("DELETE FROM pgqueue.schema_migrations WHERE version = %s", (last.version,))
        c.execute(
            "INSERT INTO pgqueue.schema_migrations (version, name, checksum)"
            " VALUES (9999, 'from_the_future', 'x')"
        )
    before = schema_snapshot(empty_dsn)

    result = CliRunner().invoke(main, ["migrate", "--status", "--json", "--dsn", empty_dsn])

    assert result.exit_code == 1, result.output
    states = {row["version"]: row["state"] for row in json.loads(result.stdout)}
    assert states == {
        **{m.version: "applied" for m in shipped},
        first.version: "changed",
        last.version: "pending",
        9999: "newer",
    }
    assert (
        f"migration {first.version:04d}_{first.name} was applied to this database from"
        " another text" in result.stderr
    )
    assert "warning: the database has migrations this pgqueue does not know (9999)" in (
        result.stderr
    )
    assert schema_snapshot(empty_dsn) == before


def test_migrate_status_exits_3_on_a_database_a_newer_pgqueue_migrated(dsn):
    # It exited 0 ("up to date"): a deploy gate on its exit code let a downgrade through.
    from click.testing import CliRunner

    from pgqueue.cli import main

    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(
            "INSERT INTO pgqueue.schema_migrations (version, name, checksum)"
            " VALUES (9999, 'from_the_future', 'x')"
        )
    result = CliRunner().invoke(main, ["migrate", "--status", "--dsn", dsn])
    assert result.exit_code == 3, result.output
    assert "(9999)" in result.stderr


def test_the_status_of_a_changed_migration_says_migrate_will_not_apply_the_pending(dsn):
    from click.testing import CliRunner

    from pgqueue.cli import main

    shipped = load_migrations()
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE pgqueue.schema_migrations SET checksum = 'x' WHERE version = 1")
        c.execute(
            "DELETE FROM pgqueue.schema_migrations WHERE version = %s", (shipped[-1].version,)
        )
    result = CliRunner().invoke(main, ["migrate", "--status", "--dsn", dsn])
    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines()[-1] == "1 pending, which `pgqueue migrate` will not apply"
    assert "development build of pgqueue before 0.1.0" in result.stderr


@pytest.mark.parametrize("version", sorted(SAME_SCHEMA_CHECKSUMS))
def test_a_migration_recorded_with_a_text_differing_in_comments_alone_is_accepted(dsn, version):
    # 0019 and 0023 were edited in comments alone after development builds shipped them:
    # a database those builds migrated was refused for good ("changed"), though its
    # schema is the same.
    shipped = {m.version: m for m in load_migrations()}
    (earlier,) = SAME_SCHEMA_CHECKSUMS[version]
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(
            "UPDATE pgqueue.schema_migrations SET checksum = %s WHERE version = %s",
            (earlier, version),
        )
    states = {s.version: s.state for s in migration_status(dsn)}
    assert states[version] == "applied"
    assert migrate(dsn) == []
    with psycopg.connect(dsn, autocommit=True) as c:
        recorded = scalar(
            c, "SELECT checksum FROM pgqueue.schema_migrations WHERE version = %s", (version,)
        )
    assert recorded == shipped[version].checksum


def _code(text: str) -> list[str]:
    """A migration's text without its comments and trailing blanks."""
    return [line for line in (re.sub(r"--.*", "", x).rstrip() for x in text.splitlines()) if line]


def _committed_texts(version: int, name: str) -> dict[str, str]:
    """Every text git has committed of a migration, by checksum (a source checkout)."""
    if not (ROOT / ".git").exists():
        pytest.skip("no git history")
    path = f"migrations/{version:04d}_{name}.sql"
    revisions = subprocess.run(
        ["git", "log", "--format=%H", "--", path], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    if not revisions:
        pytest.skip("a shallow clone: no history of the migrations")
    return {
        hashlib.sha256(t.encode()).hexdigest(): t
        for t in (
            subprocess.run(
                ["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True
            ).stdout
            for rev in revisions
        )
    }


def test_the_earlier_texts_accepted_differ_in_comments_alone():
    # What SAME_SCHEMA_CHECKSUMS stands for, checked against git's copies of those texts
    # where the history is at hand (a source checkout).
    shipped = {m.version: m for m in load_migrations()}
    for version, checksums in SAME_SCHEMA_CHECKSUMS.items():
        texts = _committed_texts(version, shipped[version].name)
        for checksum in checksums:
            assert _code(texts[checksum]) == _code(shipped[version].sql), version


def test_every_earlier_text_that_differs_in_comments_alone_is_accepted():
    # The converse: a comment edited in a committed migration (tests/migration_checksums.txt
    # updated with it) left the databases migrated from the earlier text refused by
    # `pgqueue migrate` as "changed", unless the earlier checksum is in SAME_SCHEMA_CHECKSUMS
    # (0025's before f841ac3, found by a review).
    for migration in load_migrations():
        for checksum, text in _committed_texts(migration.version, migration.name).items():
            if checksum != migration.checksum and _code(text) == _code(migration.sql):
                assert migration.matches(checksum), (migration.version, checksum)


def test_no_migration_is_edited_once_committed():
    # tests/migration_checksums.txt holds each migration's checksum: a migration that is
    # edited after it shipped leaves every database it was applied to refused by
    # `pgqueue migrate` (its record's checksum differs). A new migration is added to the
    # file with it.
    frozen = dict(
        line.split()
        for line in (ROOT / "tests" / "migration_checksums.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    shipped = {f"{m.version:04d}": m.checksum for m in load_migrations()}
    assert shipped == frozen


def test_migrate_waits_for_another_migrator_whatever_the_statement_timeout_and_says_so(dsn):
    # A role's statement_timeout cancelled the wait for the lock ("canceling statement due
    # to statement timeout", nothing said about another migrator).
    waits: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtext('pgqueue.migrate'))")
        holder = other.info.backend_pid
        waiting = threading.Thread(
            target=lambda: waits.append(
                str(
                    migrate(
                        make_conninfo(dsn, options="-c statement_timeout=200"), on_wait=waits.append
                    )
                )
            )
        )
        waiting.start()
        time.sleep(1.0)
        assert waiting.is_alive()
        other.execute("SELECT pg_advisory_unlock(hashtext('pgqueue.migrate'))")
        waiting.join(timeout=30)
    assert waits == [
        f"another `pgqueue migrate` is running (backend pid {holder}): waiting for it to finish",
        "[]",
    ]


def test_a_migration_is_not_cut_short_by_the_roles_statement_timeout(empty_dsn, monkeypatch):
    # 0025 reads every job: 300,000 of them under a statement_timeout of 10 ms failed with
    # "canceling statement due to statement timeout".
    migrate_before(empty_dsn, 25, monkeypatch)
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        c.execute("SET pgqueue.notify_inserts = off")
        c.execute("INSERT INTO pgqueue.jobs (task) SELECT 't' FROM generate_series(1, 300000)")
    assert 25 in versions(migrate(make_conninfo(empty_dsn, options="-c statement_timeout=10")))


def test_migrate_json_without_status_is_a_usage_error(empty_dsn):
    from click.testing import CliRunner

    from pgqueue.cli import main

    result = CliRunner().invoke(main, ["migrate", "--json", "--dsn", empty_dsn])

    assert result.exit_code == 2
    assert "--json goes with --status" in result.output
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        assert scalar(c, "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgqueue'") == 0


def test_enqueue_into_an_unmigrated_database_says_to_migrate(empty_dsn):
    # psycopg's error (what is missing) stays, with the hint the daemons and CLI give.
    from pgqueue import JobSpec, enqueue, enqueue_many
    from pgqueue.errors import SCHEMA_HINT

    async def enqueue_async() -> None:
        async with await psycopg.AsyncConnection.connect(empty_dsn, autocommit=True) as c:
            await enqueue(c, "t")

    import asyncio

    with psycopg.connect(empty_dsn, autocommit=True) as c:
        with pytest.raises(psycopg.errors.UndefinedTable) as single:
            enqueue(c, "t")
        with pytest.raises(psycopg.errors.InvalidSchemaName) as keyed:
            enqueue(c, "t", idempotency_key="k")
        with pytest.raises(psycopg.Error) as many:
            enqueue_many(c, [JobSpec("t"), JobSpec("u")])
        with pytest.raises(psycopg.Error) as bulk:
            enqueue_many(c, [JobSpec("t")] * 5000)
    with pytest.raises(psycopg.errors.UndefinedTable) as in_async:
        asyncio.run(enqueue_async())
    for raised in (single, keyed, many, bulk, in_async):
        assert getattr(raised.value, "__notes__", []) == [SCHEMA_HINT], raised.value
