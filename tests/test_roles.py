"""Least privilege (migration 0005): the pgqueue_producer and pgqueue_worker group roles.

Each test makes LOGIN roles of its own (unique names: roles are cluster-wide and other
test databases may exist at the same time), grants them a group role, connects as them
and checks what they can and cannot do. Every test database has EXECUTE on the pgqueue
functions revoked from PUBLIC (Postgres grants it by default), so the explicit grants of
0005 are shown to be enough on their own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql as pgsql
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from pgqueue import (
    Backoff,
    JobSpec,
    JobState,
    PermanentError,
    Reaper,
    ReaperConfig,
    Registry,
    Snooze,
    Worker,
    WorkerConfig,
    cancel_job,
    enqueue,
    enqueue_many,
    get_job,
    metrics,
    store,
)
from pgqueue.migrate import load_migrations
from tests.conftest import BIN, ROOT, scalar

MIGRATION = ROOT / "migrations" / "0005_roles.sql"
FAST = Backoff(base_seconds=0.01, max_seconds=0.05, jitter=0)
Denied = psycopg.errors.InsufficientPrivilege


def _admin(dsn: str, sql: str, params: Any = None) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(sql, params)  # type: ignore[arg-type]


@pytest.fixture
def strict_db(dsn: str) -> str:
    """The test database without PUBLIC's default EXECUTE on pgqueue's functions."""
    _admin(dsn, "REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgqueue FROM PUBLIC")
    return dsn


@pytest.fixture
def login_as(strict_db: str) -> Iterator[Callable[..., str]]:
    """login_as('pgqueue_producer', ...) -> the DSN of a new LOGIN role in those groups."""
    made: list[str] = []

    def make(*groups: str) -> str:
        name = f"pgq_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(strict_db, autocommit=True) as c:
            c.execute(pgsql.SQL("CREATE ROLE {} LOGIN").format(pgsql.Identifier(name)))
            made.append(name)
            for group in groups:
                c.execute(
                    pgsql.SQL("GRANT {} TO {}").format(
                        pgsql.Identifier(group), pgsql.Identifier(name)
                    )
                )
        return make_conninfo(strict_db, user=name)

    try:
        yield make
    finally:
        with psycopg.connect(strict_db, autocommit=True) as c:
            for name in made:
                ident = pgsql.Identifier(name)
                # Anything a role managed to create (it should not have) goes with it.
                c.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                    (name,),
                )
                c.execute(pgsql.SQL("DROP OWNED BY {}").format(ident))
                c.execute(pgsql.SQL("DROP ROLE IF EXISTS {}").format(ident))


def connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True)


def denied(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> str:
    """Run ``sql`` expecting a permission error; returns the error's message."""
    with pytest.raises(Denied) as info:
        conn.execute(sql, params)  # type: ignore[arg-type]
    return str(info.value)


def table_counts(dsn: str) -> tuple[int, int, int, int]:
    with connect(dsn) as c:
        row = c.execute(
            "SELECT (SELECT count(*) FROM pgqueue.jobs), (SELECT count(*) FROM pgqueue.dead_jobs),"
            " (SELECT count(*) FROM pgqueue.queues), (SELECT count(*) FROM pgqueue.workers)"
        ).fetchone()
    assert row is not None
    return row  # type: ignore[return-value]


# --- the roles themselves -------------------------------------------------------------------


def test_group_roles_exist_without_login_or_powers(strict_db):
    with connect(strict_db) as c:
        rows = c.execute(
            "SELECT rolname, rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls"
            " FROM pg_roles WHERE rolname IN ('pgqueue_producer', 'pgqueue_worker')"
            " ORDER BY rolname"
        ).fetchall()
        assert rows == [
            ("pgqueue_producer", False, False, False, False, False),
            ("pgqueue_worker", False, False, False, False, False),
        ]
        owners = c.execute(
            "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c"
            " WHERE c.relnamespace = 'pgqueue'::regnamespace"
            " UNION SELECT pg_get_userbyid(p.proowner) FROM pg_proc p"
            " WHERE p.pronamespace = 'pgqueue'::regnamespace"
            " UNION SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'pgqueue'"
        ).fetchall()
        assert {o for (o,) in owners}.isdisjoint({"pgqueue_producer", "pgqueue_worker"})
        for role in ("pgqueue_producer", "pgqueue_worker"):
            assert scalar(c, "SELECT has_schema_privilege(%s, 'pgqueue', 'USAGE')", (role,))
            assert not scalar(c, "SELECT has_schema_privilege(%s, 'pgqueue', 'CREATE')", (role,))
            assert not scalar(
                c, "SELECT has_database_privilege(%s, current_database(), 'CREATE')", (role,)
            )


def test_migration_is_idempotent(strict_db):
    acl_sql = (
        "SELECT c.relname, c.relacl::text, (SELECT array_agg(a.attname || ':' || a.attacl::text"
        " ORDER BY a.attnum) FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attacl IS NOT"
        " NULL) FROM pg_class c WHERE c.relnamespace = 'pgqueue'::regnamespace ORDER BY 1"
    )
    with connect(strict_db) as c:
        before = c.execute(acl_sql).fetchall()
        c.execute(MIGRATION.read_bytes())
        c.execute(MIGRATION.read_bytes())
        assert c.execute(acl_sql).fetchall() == before


def _renamed_migration(suffix: str) -> tuple[str, str, str]:
    """0005's text with its two role names replaced by throwaway ones."""
    producer, worker = f"pgq_{suffix}_producer", f"pgq_{suffix}_worker"
    text = MIGRATION.read_text()
    text = text.replace("pgqueue_producer", producer).replace("pgqueue_worker", worker)
    return text, producer, worker


def _role_exists(conn: psycopg.Connection[Any], name: str) -> bool:
    return bool(scalar(conn, "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %s)", (name,)))


def test_concurrent_migrations_create_the_roles_once(strict_db, server_dsn, template_db):
    """Two databases migrating at once (roles are cluster-wide): the second CREATE ROLE
    waits for the first and then finds the role taken; neither migration fails."""
    text, producer, worker = _renamed_migration(f"race{uuid.uuid4().hex[:8]}")
    other = f"pgqueue_t_{uuid.uuid4().hex[:10]}"
    _admin(server_dsn, f'CREATE DATABASE "{other}" TEMPLATE "{template_db}"')
    other_dsn = make_conninfo(server_dsn, dbname=other)
    errors: list[BaseException] = []
    try:
        with connect(strict_db) as first, connect(other_dsn) as second:
            first.execute("BEGIN")
            first.execute(text.encode())  # holds the new roles' catalog rows, uncommitted

            def run_second() -> None:
                try:
                    with second.transaction():
                        second.execute(text.encode())
                except BaseException as exc:  # pragma: no cover - reported below
                    errors.append(exc)

            thread = threading.Thread(target=run_second)
            thread.start()
            # The second migration blocks on the first's uncommitted role.
            deadline = time.monotonic() + 10
            with connect(server_dsn) as watcher:
                while not scalar(
                    watcher,
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                    " AND wait_event_type = 'Lock'",
                    (other,),
                ):
                    assert time.monotonic() < deadline, "the second migration never waited"
                    time.sleep(0.02)
            first.execute("COMMIT")
            thread.join(20)
            assert not thread.is_alive()
            assert errors == []
            assert _role_exists(first, producer)
            assert _role_exists(first, worker)
            for dsn_ in (strict_db, other_dsn):
                with connect(dsn_) as c:
                    assert scalar(
                        c, "SELECT has_table_privilege(%s, 'pgqueue.jobs', 'UPDATE')", (worker,)
                    )
    finally:
        _admin(server_dsn, f'DROP DATABASE IF EXISTS "{other}" WITH (FORCE)')
        with connect(strict_db) as c:
            for role in (producer, worker):
                if _role_exists(c, role):
                    c.execute(f'DROP OWNED BY "{role}"')
                c.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_migration_warns_instead_of_failing_without_createrole(strict_db, login_as):
    """A migrator that may not create roles gets a warning, not a failed migration."""
    text, producer, worker = _renamed_migration(f"nocr{uuid.uuid4().hex[:8]}")
    plain = login_as()
    notices: list[str] = []
    try:
        with connect(plain) as c:
            c.add_notice_handler(lambda d: notices.append(f"{d.severity}: {d.message_primary}"))
            with c.transaction():
                c.execute(text.encode())
            assert not _role_exists(c, producer)
            assert not _role_exists(c, worker)
        assert any(n.startswith("WARNING: pgqueue: cannot create role") for n in notices)
    finally:
        with connect(strict_db) as c:
            for role in (producer, worker):
                if _role_exists(c, role):  # only if the test failed
                    c.execute(f'DROP OWNED BY "{role}"')
                    c.execute(f'DROP ROLE "{role}"')


def test_the_schemas_owner_upgrades_it_without_create_on_the_database(strict_db, login_as):
    # Found by an upgrade review: bootstrapping the migrations' record ran CREATE SCHEMA IF
    # NOT EXISTS, which checks CREATE on the database before it looks for the schema, so
    # the owner of schema pgqueue could not apply a new migration.
    from pgqueue.migrate import migrate

    owner = login_as()
    name = psycopg.conninfo.conninfo_to_dict(owner)["user"]
    try:
        with connect(strict_db) as c:
            c.execute(pgsql.SQL("ALTER SCHEMA pgqueue OWNER TO {}").format(pgsql.Identifier(name)))
            c.execute(
                pgsql.SQL("GRANT ALL ON pgqueue.schema_migrations TO {}").format(
                    pgsql.Identifier(name)
                )
            )
            # Migration 0024 (which creates nothing in a UTF8 database) as if new.
            last = 24
            c.execute("DELETE FROM pgqueue.schema_migrations WHERE version = %s", (last,))
            may_create = c.execute(
                "SELECT has_database_privilege(%s, current_database(), 'CREATE')", (name,)
            ).fetchone()
        assert may_create == (False,)
        applied = migrate(owner)
        assert [m.version for m in applied] == [last]
        with connect(strict_db) as c:
            # Another migrator holds the lock: a role's own lock_timeout does not fail the
            # wait for it with a bare "lock timeout".
            c.execute("SELECT pg_advisory_lock(hashtext('pgqueue.migrate'))")
            waiting = concurrent.futures.ThreadPoolExecutor(1).submit(
                migrate, make_conninfo(owner, options="-c lock_timeout=100")
            )
            time.sleep(0.5)
            assert not waiting.done()
            c.execute("SELECT pg_advisory_unlock(hashtext('pgqueue.migrate'))")
            assert waiting.result(timeout=30) == []
            # Only that wait: its later statements keep the role's lock_timeout (a session
            # setting made them wait behind a lock on the migrations' record for ever).
            c.execute("BEGIN")
            c.execute("LOCK TABLE pgqueue.schema_migrations IN ACCESS EXCLUSIVE MODE")
            blocked = concurrent.futures.ThreadPoolExecutor(1).submit(
                migrate, make_conninfo(owner, options="-c lock_timeout=100")
            )
            try:
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    blocked.result(timeout=30)
            finally:
                c.execute("ROLLBACK")
    finally:
        # Given back, so that dropping the role does not try to drop the schema.
        with connect(strict_db) as c:
            c.execute("ALTER SCHEMA pgqueue OWNER TO CURRENT_USER")


# --- producer -------------------------------------------------------------------------------


def test_producer_can_enqueue_every_way_and_read_status(strict_db, login_as):
    producer = login_as("pgqueue_producer")
    with connect(producer) as c:
        a = scalar(c, "SELECT pgqueue.enqueue('t', '{\"a\": 1}')")
        b = scalar(c, "SELECT pgqueue.enqueue('t', '{}', 'q', 0, now(), 3, 'key-1')")
        assert scalar(c, "SELECT pgqueue.enqueue('t', '{}', 'q', 0, now(), 3, 'key-1')") == b
        many = scalar(
            c,
            "SELECT pgqueue.enqueue_many(ARRAY['t', 't'], ARRAY['{}', '{}']::jsonb[],"
            " ARRAY[NULL, 'q']::text[], ARRAY[0, 1], ARRAY[NULL, NULL]::timestamptz[],"
            " ARRAY[5, 5], ARRAY[NULL, 'key-1'])",
        )
        assert many[1] == b
        d = enqueue(c, "py", {"x": [1, 2]}, queue="q", idempotency_key="key-2")
        # enqueue_many by pgqueue.enqueue_many (keys) and by COPY (no keys, no delays).
        e, f = enqueue_many(c, [JobSpec("py"), JobSpec("py", {"y": 1}, idempotency_key="key-3")])
        copied = enqueue_many(c, [JobSpec("py", {"i": i}, queue="q") for i in range(3)])
        g = scalar(
            c,
            "INSERT INTO pgqueue.jobs (task, args) VALUES ('plain', %s) RETURNING id",
            (Jsonb({"z": True}),),
        )
        # The column list a producer may fill (ids may be given: enqueue_many does).
        h = scalar(
            c,
            "INSERT INTO pgqueue.jobs (task, args, queue, priority, run_at, max_attempts,"
            " idempotency_key) VALUES ('plain', '{}', 'q', 5, now(), 2, 'key-4') RETURNING id",
        )
        ids = [a, b, many[0], d, e, f, g, h, *copied]
        assert len(set(ids)) == len(ids)
        # Status: the Python API and the rows themselves.
        status = store.job_status(c, job_id=d)
        assert status is not None and status.state.value == "queued" and status.queue == "q"
        assert scalar(c, "SELECT count(*) FROM pgqueue.jobs") == len(ids)
        assert scalar(c, "SELECT count(*) FROM pgqueue.dead_jobs") == 0
        assert len(store.list_jobs(c, state=None, queue=None, task=None, limit=100)) == len(ids)
    # The admin CLI's status command works for a producer too.
    result = subprocess.run(
        [str(BIN / "pgqueue"), "status", str(d), "--json"],
        env={"PGQUEUE_DSN": producer, "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert '"state": "queued"' in result.stdout
    # The text form too: it reads pgqueue.queues and pgqueue.workers for the "waiting"
    # line, which a producer may not (no line then, and no error).
    text = subprocess.run(
        [str(BIN / "pgqueue"), "status", str(d)],
        env={"PGQUEUE_DSN": producer, "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert text.returncode == 0, text.stderr
    assert "state" in text.stdout and "waiting" not in text.stdout


def test_producer_reads_dead_jobs(strict_db, login_as):
    with connect(strict_db) as admin:
        admin.execute(
            "INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts,"
            " max_attempts, run_at, created_at, reason) VALUES"
            " (900, 'default', 't', '{}', 0, 3, 3, now(), now(), 'exhausted')"
        )
    with connect(login_as("pgqueue_producer")) as c:
        status = store.job_status(c, job_id=900)
        assert status is not None and status.state.value == "dead"
        assert status.dead_reason == "exhausted"


def test_producer_cannot_change_or_remove_jobs(strict_db, login_as):
    with connect(strict_db) as admin:
        admin.execute(
            "INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts,"
            " max_attempts, run_at, created_at, reason) VALUES"
            " (900, 'default', 't', '{}', 0, 3, 3, now(), now(), 'exhausted')"
        )
    producer = login_as("pgqueue_producer")
    with connect(producer) as c:
        job = enqueue(c, "t", {})
        before = table_counts(strict_db)
        denied(c, "UPDATE pgqueue.jobs SET state = 'succeeded' WHERE id = %s", (job,))
        denied(c, "UPDATE pgqueue.jobs SET args = '{}' WHERE id = %s", (job,))
        denied(c, "DELETE FROM pgqueue.jobs WHERE id = %s", (job,))
        denied(c, "TRUNCATE pgqueue.jobs")
        # Only the producer columns: no job inserted already running, finished or spent.
        for column, value in [
            ("state", "'succeeded'"),
            ("attempts", "5"),
            ("rescued", "true"),
            ("finished_at", "now()"),
            ("history", "'[]'"),
            ("errors", "'[]'"),
            ("cancel_requested_at", "now()"),
            ("created_at", "now()"),
        ]:
            denied(c, f"INSERT INTO pgqueue.jobs (task, {column}) VALUES ('t', {value})")
        denied(
            c,
            "INSERT INTO pgqueue.jobs (task, state, lease_token, lease_expires_at, leased_by)"
            " VALUES ('t', 'running', gen_random_uuid(), now() + interval '1 h', 'me')",
        )
        # Dead jobs: read only.
        denied(c, "DELETE FROM pgqueue.dead_jobs")
        denied(c, "UPDATE pgqueue.dead_jobs SET reason = 'x'")
        denied(
            c,
            "INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts,"
            " max_attempts, run_at, created_at, reason) VALUES"
            " (901, 'default', 't', '{}', 0, 3, 3, now(), now(), 'exhausted')",
        )
        # No worker or admin operations.
        with pytest.raises(Denied):
            asyncio.run(_claim(producer))
        with pytest.raises(Denied):
            store.retry_dead(c, ids=[900], queue=None, task=None, limit=10)
        with pytest.raises(Denied):
            store.purge_dead(c, older_than_seconds=None, queue=None, task=None, limit=10)
        with pytest.raises(Denied):
            store.cancel_job(c, job_id=job)
        with pytest.raises(Denied):
            store.pause_queue(c, name="default")
        denied(c, "SELECT * FROM pgqueue.workers")
        # The record of migrations: read (0011, to name what is missing), never written.
        denied(c, "DELETE FROM pgqueue.schema_migrations")
        denied(
            c,
            "INSERT INTO pgqueue.schema_migrations (version, name, checksum)"
            " VALUES (9999, 'x', 'x')",
        )
        denied(c, "SELECT setval(pg_get_serial_sequence('pgqueue.jobs', 'id'), 1)")
        _cannot_touch_schema(c)
        after = table_counts(strict_db)
    assert after == before


def test_the_producer_role_may_look_jobs_up_but_not_cancel_them(strict_db, login_as):
    producer = login_as("pgqueue_producer")
    worker = login_as("pgqueue_worker")
    with connect(producer) as c:
        job_id = enqueue(c, "t", {})
        assert get_job(c, job_id).state is JobState.QUEUED  # type: ignore[union-attr]
        with pytest.raises(Denied):
            cancel_job(c, job_id)
    with connect(worker) as c:
        assert cancel_job(c, job_id).state is JobState.CANCELLED


def _cannot_touch_schema(c: psycopg.Connection[Any]) -> None:
    for sql in [
        "CREATE TABLE pgqueue.mine (x int)",
        "CREATE VIEW pgqueue.mine AS SELECT 1",
        "CREATE FUNCTION pgqueue.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE INDEX ON pgqueue.jobs (task)",
        "DROP TABLE pgqueue.jobs",
        "DROP TABLE pgqueue.dead_jobs",
        "DROP FUNCTION pgqueue.enqueue(text, jsonb, text, integer, timestamptz, integer, text)",
        "DROP SCHEMA pgqueue CASCADE",
        "ALTER TABLE pgqueue.jobs ADD COLUMN mine int",
        "ALTER TABLE pgqueue.jobs DISABLE TRIGGER jobs_notify_inserted",
        "ALTER TABLE pgqueue.jobs DROP CONSTRAINT jobs_lease_check",
        "ALTER SCHEMA pgqueue RENAME TO mine",
        "CREATE OR REPLACE FUNCTION pgqueue.notify_inserted() RETURNS trigger"
        " LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'",
        "SET ROLE postgres",
    ]:
        denied(c, sql)
    # A GRANT without grant options is only a warning in Postgres: check nothing changed.
    c.execute("GRANT ALL ON pgqueue.jobs, pgqueue.dead_jobs TO PUBLIC")
    c.execute("GRANT CREATE ON SCHEMA pgqueue TO PUBLIC")
    for table in ("pgqueue.jobs", "pgqueue.dead_jobs"):
        for privilege in ("INSERT", "UPDATE", "DELETE", "TRUNCATE"):
            assert not scalar(c, "SELECT has_table_privilege('public', %s, %s)", (table, privilege))
    assert not scalar(c, "SELECT has_schema_privilege('public', 'pgqueue', 'CREATE')")


async def _claim(dsn: str) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
        return await store.claim_jobs(
            c, queues=["default"], limit=10, worker_id="w", lease_seconds=30
        )


# --- worker ---------------------------------------------------------------------------------


async def _wait(dsn: str, sql: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
        while True:
            row = await (await c.execute(sql)).fetchone()  # type: ignore[arg-type]
            if row and row[0]:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not true within {timeout}s: {sql}")
            await asyncio.sleep(0.02)


def test_worker_role_runs_a_worker_end_to_end(strict_db, login_as):
    """A real in-process Worker connected as pgqueue_worker only: claims, completes,
    retries, snoozes, dead-letters (exhausted and permanent), registers and deregisters."""
    worker_dsn = login_as("pgqueue_worker")
    producer_dsn = login_as("pgqueue_producer")
    registry = Registry()
    runs: dict[str, int] = {}

    def count(name: str) -> int:
        runs[name] = runs.get(name, 0) + 1
        return runs[name]

    @registry.task(name="roles.ok", backoff=FAST)
    def ok(n: int) -> None:
        count(f"ok{n}")

    @registry.task(name="roles.flaky", backoff=FAST)
    def flaky() -> None:
        if count("flaky") < 3:
            raise RuntimeError("not yet")

    @registry.task(name="roles.snoozy", backoff=FAST)
    def snoozy() -> None:
        if count("snoozy") == 1:
            raise Snooze(0.05)

    @registry.task(name="roles.hopeless", max_attempts=2, backoff=FAST)
    def hopeless() -> None:
        count("hopeless")
        raise RuntimeError("always")

    @registry.task(name="roles.permanent", backoff=FAST)
    def permanent() -> None:
        raise PermanentError("never")

    with connect(producer_dsn) as p:
        ids = enqueue_many(
            p,
            [JobSpec("roles.ok", {"n": i}) for i in range(5)]
            + [
                JobSpec("roles.flaky"),
                JobSpec("roles.snoozy"),
                JobSpec("roles.hopeless"),
                JobSpec("roles.permanent"),
            ],
        )
    with connect(strict_db) as c:
        # The permanent job's id is one the dead-letter table holds already (an explicit
        # id, a sequence set back): it is stored under a new id (0023's grants).
        c.execute(
            "INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts,"
            " max_attempts, run_at, created_at, reason)"
            " VALUES (%s, 'default', 'roles.older', '{}', 0, 1, 1, now(), now(), 'permanent')",
            (ids[-1],),
        )

    async def main() -> None:
        worker = Worker(registry, WorkerConfig(dsn=worker_dsn, poll_interval=0.2, lease_seconds=5))
        task = asyncio.create_task(worker.run(handle_signals=False))
        try:
            await _wait(
                worker_dsn,
                "SELECT (SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded') = 7"
                " AND (SELECT count(*) FROM pgqueue.dead_jobs) = 3",
            )
            await _wait(worker_dsn, "SELECT count(*) = 1 FROM pgqueue.workers")
        finally:
            worker.stop()
            await asyncio.wait_for(task, 30)
        assert not worker.failed

    asyncio.run(main())
    assert runs["flaky"] == 3 and runs["snoozy"] == 2 and runs["hopeless"] == 2
    with connect(strict_db) as c:
        dead = {
            r[0]: r[1:]
            for r in c.execute("SELECT task, reason, original_id FROM pgqueue.dead_jobs")
        }
        assert dead == {
            "roles.hopeless": ("exhausted", None),
            "roles.permanent": ("permanent", ids[-1]),
            "roles.older": ("permanent", None),
        }
        assert scalar(c, "SELECT count(*) FROM pgqueue.workers") == 0  # deregistered
        assert scalar(c, "SELECT count(*) FROM pgqueue.jobs WHERE lease_token IS NOT NULL") == 0
        assert sorted(
            r[0]
            for r in c.execute(
                "SELECT id FROM pgqueue.jobs UNION ALL SELECT coalesce(original_id, id)"
                " FROM pgqueue.dead_jobs WHERE task <> 'roles.older'"
            ).fetchall()
        ) == sorted(ids)


def test_worker_role_cancels_a_running_job_and_tells_its_worker(strict_db, login_as):
    # cancel_job notifies through pgqueue.wake, which 0014 grants pgqueue_worker.
    worker_dsn = login_as("pgqueue_worker")
    with connect(strict_db) as admin:
        job = scalar(
            admin,
            "INSERT INTO pgqueue.jobs (task, state, attempts, lease_token, leased_by,"
            " lease_expires_at) VALUES ('t', 'running', 1, gen_random_uuid(), 'w-1',"
            " now() + interval '1 minute') RETURNING id",
        )
        admin.execute("LISTEN pgqueue_jobs")
        with connect(worker_dsn) as c:
            assert store.cancel_job(c, job_id=job) == "running"
        assert [n.payload for n in admin.notifies(timeout=5, stop_after=1)] == [" cancel w-1"]


def test_worker_role_runs_the_reaper(strict_db, login_as):
    worker_dsn = login_as("pgqueue_worker")
    with connect(strict_db) as c:
        clock = scalar(c, "SELECT clock_timestamp()")
        past = clock - timedelta(minutes=5)

        def job(**cols: Any) -> int:
            names = ", ".join(cols)
            marks = ", ".join(["%s"] * len(cols))
            return int(
                scalar(
                    c,
                    f"INSERT INTO pgqueue.jobs ({names}) VALUES ({marks}) RETURNING id",
                    list(cols.values()),
                )
            )

        running = {"state": "running", "lease_token": uuid.uuid4(), "leased_by": "gone"}
        expired = job(task="t", lease_expires_at=past, attempts=1, **running)

        def exhausted_job() -> int:
            return job(
                task="t",
                lease_expires_at=past,
                attempts=2,
                max_attempts=2,
                rescued=True,
                **{**running, "lease_token": uuid.uuid4()},
            )

        exhausted = exhausted_job()
        # Its id is one the dead-letter table holds: stored under a new one (0023).
        clashing = exhausted_job()
        c.execute(
            "INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts,"
            " max_attempts, run_at, created_at, reason)"
            " VALUES (%s, 'default', 'older', '{}', 0, 1, 1, now(), now(), 'permanent')",
            (clashing,),
        )
        old = job(task="t", state="succeeded", finished_at=past, attempts=1)
        fresh = job(task="t", state="succeeded", finished_at=clock, attempts=1)
        c.execute(
            "INSERT INTO pgqueue.workers (id, host, pid, queues, concurrency, heartbeat_seconds,"
            " version, last_heartbeat_at) VALUES ('stale', 'h', 1, '{default}', 1, 1, 'x', %s)",
            (past,),
        )
    reaper = Reaper(ReaperConfig(dsn=worker_dsn, retention_seconds=60))
    try:
        result = reaper.run_once()
    finally:
        reaper.stop()
        reaper._close()
    assert result.requeued == [expired]
    assert sorted(result.dead) == [exhausted, clashing]
    assert result.pruned == 1
    with connect(strict_db) as c:
        assert scalar(c, "SELECT state::text FROM pgqueue.jobs WHERE id = %s", (expired,)) == (
            "queued"
        )
        assert scalar(c, "SELECT reason FROM pgqueue.dead_jobs WHERE id = %s", (exhausted,)) == (
            "lease_expired"
        )
        assert (
            scalar(c, "SELECT reason FROM pgqueue.dead_jobs WHERE original_id = %s", (clashing,))
            == "lease_expired"
        )
        assert scalar(c, "SELECT count(*) FROM pgqueue.jobs WHERE id = %s", (old,)) == 0
        assert scalar(c, "SELECT count(*) FROM pgqueue.jobs WHERE id = %s", (fresh,)) == 1
        assert scalar(c, "SELECT count(*) FROM pgqueue.workers") == 0
    # The worker role can also read the operator's view (the reaper's metrics use it).
    with connect(worker_dsn) as c:
        assert {r["queue"] for r in store.queue_stats(c)} == {"default"}
        assert 0 <= store.notify_queue_usage(c) < 1
        # And which migrations are applied (0011), so the daemons can say what is missing.
        assert store.applied_versions(c) == [m.version for m in load_migrations()]
    assert metrics.database_health(worker_dsn)() == (True, "ok")
    # Every worker's /metrics runs the whole stats query as this role (not only reapers):
    # a role that could not would make PgqueueStatsFailing fire for every worker.
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    served = CollectorRegistry()
    served.register(metrics.QueueStatsCollector(worker_dsn, ttl=0.0, reaper=False))
    samples = {
        s.name: s.value
        for f in text_string_to_metric_families(generate_latest(served).decode())
        for s in f.samples
    }
    assert samples["pgqueue_queue_stats_up"] == 1
    assert "pgqueue_workers" in samples and "pgqueue_notify_queue_usage" in samples


def test_a_worker_role_that_may_not_read_the_migrations_skips_the_check(strict_db, login_as):
    worker_dsn = login_as("pgqueue_worker")
    _admin(strict_db, "REVOKE SELECT ON pgqueue.schema_migrations FROM pgqueue_worker")
    try:
        with connect(worker_dsn) as c:
            assert store.applied_versions(c) is None
            assert scalar(c, "SELECT 1") == 1  # the connection is still usable
        assert metrics.database_health(worker_dsn)() == (True, "ok")
    finally:
        _admin(strict_db, "GRANT SELECT ON pgqueue.schema_migrations TO pgqueue_worker")


@pytest.mark.parametrize("revoked", ["INSERT, UPDATE", "SELECT, INSERT, UPDATE"])
def test_a_worker_role_without_the_stats_grants_still_serves_the_gauges(
    strict_db, login_as, revoked
):
    # A role set up before migration 0022 (its DO block not run again): the gauges are
    # counted for this process alone, not lost (stats_up 0 on every endpoint).
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    with connect(strict_db) as admin:
        admin.execute("SELECT pgqueue.enqueue('t')")
    worker_dsn = login_as("pgqueue_worker")
    _admin(strict_db, f"REVOKE {revoked} ON pgqueue.queue_stats_snapshot FROM pgqueue_worker")
    try:
        with connect(worker_dsn) as c:
            stats = store.shared_queue_stats(c, max_age=60.0, timeout_seconds=5.0)
            assert [(r["queue"], r["ready"]) for r in stats.rows] == [("default", 1)]
            assert stats.unshared is not None and "permission denied" in stats.unshared
            assert scalar(c, "SELECT 1") == 1  # the connection is still usable
        served = CollectorRegistry()
        served.register(metrics.QueueStatsCollector(worker_dsn, ttl=0.0, reaper=False))
        samples = {
            (s.name, s.labels.get("queue"), s.labels.get("state")): s.value
            for f in text_string_to_metric_families(generate_latest(served).decode())
            for s in f.samples
        }
        assert samples[("pgqueue_queue_stats_up", None, None)] == 1
        assert samples[("pgqueue_queue_depth", "default", "ready")] == 1
    finally:
        _admin(strict_db, f"GRANT {revoked} ON pgqueue.queue_stats_snapshot TO pgqueue_worker")


def test_worker_role_cannot_alter_the_schema_or_enqueue(strict_db, login_as):
    with connect(strict_db) as admin:
        job = int(scalar(admin, "SELECT pgqueue.enqueue('t')"))
        admin.execute(
            "INSERT INTO pgqueue.dead_jobs (id, queue, task, args, priority, attempts,"
            " max_attempts, run_at, created_at, reason) VALUES"
            " (900, 'default', 't', '{}', 0, 3, 3, now(), now(), 'exhausted')"
        )
    worker_dsn = login_as("pgqueue_worker")
    before = table_counts(strict_db)
    with connect(worker_dsn) as c:
        _cannot_touch_schema(c)
        denied(c, "TRUNCATE pgqueue.jobs")
        denied(c, "TRUNCATE pgqueue.dead_jobs")
        # Enqueueing is the producer's: a worker whose handlers enqueue needs both roles.
        denied(c, "INSERT INTO pgqueue.jobs (task) VALUES ('t')")
        with pytest.raises(Denied):
            enqueue(c, "t", {})
        # The dead-letter table: written only by the move out of jobs.
        denied(c, "UPDATE pgqueue.dead_jobs SET reason = 'x'")
        denied(c, "DELETE FROM pgqueue.dead_jobs")
        with pytest.raises(Denied):
            store.retry_dead(c, ids=[900], queue=None, task=None, limit=10)
        # Queues are paused by operators, not workers.
        with pytest.raises(Denied):
            store.pause_queue(c, name="default")
        # The record of migrations: read (0011, to name what is missing), never written.
        denied(c, "DELETE FROM pgqueue.schema_migrations")
        denied(
            c,
            "INSERT INTO pgqueue.schema_migrations (version, name, checksum)"
            " VALUES (9999, 'x', 'x')",
        )
        assert scalar(c, "SELECT state::text FROM pgqueue.jobs WHERE id = %s", (job,)) == "queued"
    assert table_counts(strict_db) == before


def test_worker_and_producer_roles_together_enqueue_from_a_handler(strict_db, login_as):
    """A login role in both groups runs a worker whose handler enqueues a follow-up job
    on the worker's own DSN."""
    both = login_as("pgqueue_worker", "pgqueue_producer")
    registry = Registry()

    @registry.task(name="roles.parent")
    def parent() -> None:
        with connect(both) as c:
            enqueue(c, "roles.child", {"from": "parent"})

    @registry.task(name="roles.child")
    def child(**kwargs: Any) -> None:
        assert kwargs == {"from": "parent"}

    with connect(both) as c:
        enqueue(c, "roles.parent", {})

    async def main() -> None:
        worker = Worker(registry, WorkerConfig(dsn=both, poll_interval=0.2))
        task = asyncio.create_task(worker.run(handle_signals=False))
        try:
            await _wait(both, "SELECT count(*) = 2 FROM pgqueue.jobs WHERE state = 'succeeded'")
        finally:
            worker.stop()
            await asyncio.wait_for(task, 30)

    asyncio.run(main())


def test_the_admin_commands_each_role_may_run_are_the_readmes(strict_db, login_as):
    # The README's table of admin commands by role; a refused one says where to look.
    import subprocess
    import sys

    with connect(strict_db) as c:
        c.execute("INSERT INTO pgqueue.jobs (task) VALUES ('a'), ('b'), ('c')")
        c.execute(
            "INSERT INTO pgqueue.dead_jobs (id, task, queue, args, priority, attempts,"
            " max_attempts, run_at, created_at, reason, errors, history) VALUES (100, 'd',"
            " 'default', '{}', 0, 1, 1, now(), now(), 'exhausted', '[]', '[]')"
        )
    commands = {
        "jobs list": ("yes", "yes"), "status 1": ("yes", "yes"),
        "dead list": ("yes", "yes"), "dead show 100": ("yes", "yes"),
        "stats": ("no", "yes"), "workers": ("no", "yes"),
        "cancel 2": ("no", "yes"), "run-now 3": ("no", "yes"),
        "dead retry 100": ("no", "no"), "dead purge": ("no", "no"),
        "queue pause q": ("no", "no"), "queue resume q": ("no", "no"),
    }  # fmt: skip
    for column, role in enumerate(("pgqueue_producer", "pgqueue_worker")):
        dsn = login_as(role)
        for command, allowed in commands.items():
            result = subprocess.run(
                [sys.executable, "-m", "pgqueue", *command.split(), "--dsn", dsn],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if allowed[column] == "yes":
                assert result.returncode == 0, (role, command, result.stderr)
            else:
                assert result.returncode == 1, (role, command, result.stderr)
                assert "permission denied" in result.stderr, (role, command, result.stderr)
                assert "Least privilege" in result.stderr, (role, command, result.stderr)
    with connect(strict_db) as c:  # nothing the refused commands touched changed
        assert c.execute("SELECT count(*) FROM pgqueue.dead_jobs").fetchone() == (1,)
        assert c.execute("SELECT count(*) FROM pgqueue.queues").fetchone() == (0,)
