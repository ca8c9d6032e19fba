"""Enqueueing in the same transaction as the business data, from the stacks Python teams
use: SQLAlchemy (sync and async, psycopg 3 dialect), Django (psycopg 3 backend), and the
SQL function from drivers pgqueue does not take (asyncpg, psycopg2). The snippets are the
README's ("From an ORM or another driver")."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import textwrap
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pgqueue import JobSpec, Registry, enqueue, enqueue_many
from tests.conftest import ROOT, scalar, wait_until

ORDERS = "CREATE TABLE IF NOT EXISTS public.orders (id serial PRIMARY KEY, note text)"


def counts(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """(orders, jobs) committed."""
    return (
        int(scalar(conn, "SELECT count(*) FROM public.orders")),
        int(scalar(conn, "SELECT count(*) FROM pgqueue.jobs")),
    )


def sqlalchemy_url(dsn: str, driver: str) -> Any:
    from sqlalchemy.engine import URL

    info = conninfo_to_dict(dsn)
    return URL.create(
        driver,
        username=str(info.get("user") or "postgres"),
        host=str(info.get("host") or "127.0.0.1"),
        port=int(info.get("port") or 5432),
        database=str(info["dbname"]),
    )


class Rollback(Exception):
    pass


def test_sqlalchemy_session_enqueues_in_its_transaction(conn, dsn):
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    conn.execute(ORDERS)
    registry = Registry()

    @registry.task(name="orders.confirm")
    def confirm(order_id: int) -> None:
        pass

    engine = create_engine(sqlalchemy_url(dsn, "postgresql+psycopg"))
    try:
        for commit in (False, True):
            with contextlib.suppress(Rollback), Session(engine) as session, session.begin():
                order_id = session.execute(
                    text("INSERT INTO orders (note) VALUES ('o') RETURNING id")
                ).scalar_one()
                raw = session.connection().connection.driver_connection
                enqueue(raw, "orders.confirm", {"order_id": order_id})
                # The pooled connection itself is taken too (its driver_connection).
                confirm.enqueue(session.connection().connection, order_id)
                enqueue_many(raw, [JobSpec("orders.confirm", {"order_id": n}) for n in range(3)])
                # As large a batch as streams under a savepoint.
                enqueue_many(raw, [JobSpec("orders.confirm", {"order_id": n}) for n in range(1500)])
                assert counts(conn) == (0, 0)  # nothing committed yet
                if not commit:
                    raise Rollback
            assert counts(conn) == ((1, 1505) if commit else (0, 0))
    finally:
        engine.dispose()


def test_sqlalchemy_async_session_enqueues_in_its_transaction(conn, dsn):
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

    conn.execute(ORDERS)

    async def main() -> None:
        engine = create_async_engine(sqlalchemy_url(dsn, "postgresql+psycopg_async"))
        sessions = async_sessionmaker(engine, class_=AsyncSession)
        try:
            for commit in (False, True):
                with contextlib.suppress(Rollback):
                    async with sessions() as session, session.begin():
                        await session.execute(text("INSERT INTO orders (note) VALUES ('o')"))
                        adapted = await (await session.connection()).get_raw_connection()
                        await enqueue(adapted.driver_connection, "orders.confirm", {"n": 1})
                        await enqueue(adapted, "orders.confirm", {"n": 2})  # the adapter too
                        await enqueue_many(adapted, ["orders.confirm"])
                        if not commit:
                            raise Rollback
                assert counts(conn) == ((1, 3) if commit else (0, 0))
        finally:
            await engine.dispose()

    asyncio.run(main())


def test_what_is_not_a_psycopg_3_connection_is_refused_saying_what_to_pass(dsn):
    # Found by an integration check: a psycopg2 connection (SQLAlchemy 2.0's default for
    # postgresql://), a Session or None failed deep inside, with "... has no attribute
    # 'pgconn'" or "'Lock' object does not support the context manager protocol".
    import psycopg2
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    engine = create_engine(sqlalchemy_url(dsn, "postgresql+psycopg"))
    old_driver = psycopg2.connect(dsn)
    try:
        with Session(engine) as session:
            for wrong in (old_driver, session, session.connection(), None):
                for call in (
                    lambda c: enqueue(c, "t"),
                    lambda c: enqueue_many(c, ["t"]),
                ):
                    with pytest.raises(TypeError, match="takes a psycopg 3 connection") as e:
                        call(wrong)
                    assert "driver_connection" in str(e.value)
        with pytest.raises(TypeError, match=r"not psycopg2\.extensions\.connection"):
            enqueue(old_driver, "t")
    finally:
        old_driver.close()
        engine.dispose()


def test_django_enqueues_in_its_atomic_block(conn, dsn):
    # In a process of its own: Django's settings are global to the process.
    conn.execute(ORDERS)
    info = conninfo_to_dict(dsn)
    script = textwrap.dedent(
        f"""
        import django
        from django.conf import settings

        settings.configure(DATABASES={{"default": {{
            "ENGINE": "django.db.backends.postgresql", "NAME": {info["dbname"]!r},
            "USER": {str(info.get("user") or "postgres")!r},
            "HOST": {str(info.get("host") or "127.0.0.1")!r},
            "PORT": {str(info.get("port") or 5432)!r},
        }}}})
        django.setup()
        from django.db import connection, transaction

        from pgqueue import enqueue

        class Rollback(Exception):
            pass

        for commit in (False, True):
            try:
                with transaction.atomic():
                    with connection.cursor() as cursor:
                        cursor.execute("INSERT INTO orders (note) VALUES ('o')")
                    enqueue(connection.connection, "orders.confirm", {{"order_id": 1}})
                    if not commit:
                        raise Rollback
            except Rollback:
                pass
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM pgqueue.jobs)"
                )
                print(commit, *cursor.fetchone())
        connection.close()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["False 0 0", "True 1 1"], done.stdout


def test_asyncpg_enqueues_through_the_sql_functions(conn, dsn):
    import asyncpg

    info = conninfo_to_dict(dsn)

    async def main() -> None:
        db = await asyncpg.connect(
            user=info.get("user") or "postgres", host=info.get("host") or "127.0.0.1",
            port=int(info.get("port") or 5432), database=info["dbname"],
        )  # fmt: skip
        try:
            async with db.transaction():
                job_id = await db.fetchval(
                    "SELECT pgqueue.enqueue($1, $2, queue => $3, max_attempts => $4)",
                    "emails.send", json.dumps({"to": "a@b.c"}), "emails", 5,
                )  # fmt: skip
                ids = await db.fetchval(
                    "SELECT pgqueue.enqueue_many($1, $2, $3, $4, $5, $6, $7)",
                    ["emails.send", "emails.send"], [json.dumps({"n": 1}), json.dumps({"n": 2})],
                    ["emails", None], [None, None], [None, None], [None, None], [None, None],
                )  # fmt: skip
            assert isinstance(job_id, int) and len(ids) == 2
        finally:
            await db.close()

    asyncio.run(main())
    rows = conn.execute("SELECT queue, args, max_attempts FROM pgqueue.jobs ORDER BY id").fetchall()
    assert [(r[0], r[1]) for r in rows] == [
        ("emails", {"to": "a@b.c"}), ("emails", {"n": 1}), ("default", {"n": 2})
    ]  # fmt: skip
    assert rows[0][2] == 5


def test_psycopg2_enqueues_through_the_sql_functions(conn, dsn):
    import psycopg2
    from psycopg2.extras import Json

    old_driver = psycopg2.connect(dsn)
    try:
        with old_driver, old_driver.cursor() as cur:  # one transaction, committed
            cur.execute(
                "SELECT pgqueue.enqueue(%s, %s, queue => %s, max_attempts => %s)",
                ("emails.send", Json({"to": "a@b.c"}), "emails", 5),
            )
            cur.execute(
                "SELECT pgqueue.enqueue_many(%s, %s::jsonb[], %s, %s::int[], %s::timestamptz[],"
                " %s::int[], %s::text[])",
                (
                    ["emails.send", "emails.send"], [Json({"n": 1}), Json({"n": 2})],
                    ["emails", "emails"], [None, None], [None, None], [None, None], [None, None],
                ),
            )  # fmt: skip
            (ids,) = cur.fetchone()
        assert len(ids) == 2
    finally:
        old_driver.close()
    assert int(scalar(conn, "SELECT count(*) FROM pgqueue.jobs WHERE queue = 'emails'")) == 3


DJANGO_APP = """
import django
from django.conf import settings

settings.configure(DATABASES={{"default": {{
    "ENGINE": "django.db.backends.postgresql", "NAME": {name!r}, "USER": {user!r},
    "HOST": {host!r}, "PORT": {port!r}, "CONN_MAX_AGE": {max_age!r},
    "OPTIONS": {{"application_name": "djangoapp"}},
}}}})
django.setup()

from django.db import connection

from pgqueue import Backoff, Registry

registry = Registry()


@registry.task(name="dj.query", max_attempts=3, backoff=Backoff(base_seconds=0.01))
def query(n: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT %s", [n])
"""


def django_sessions(conn: psycopg.Connection[Any]) -> int:
    return int(
        scalar(
            conn,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'djangoapp'"
            " AND datname = current_database()",
        )
    )


@pytest.mark.parametrize("max_age", [0, None], ids=["default", "persistent"])
def test_a_django_handlers_connections_are_closed_as_django_closes_a_requests(
    conn, dsn, daemons, tmp_path, max_age
):
    # Django's connections are per thread, and the worker's threads outlive their jobs:
    # they stayed open after each job whatever CONN_MAX_AGE said, and once Postgres
    # dropped them (a restart, a failover, a pooler's recycle) every job their thread ran
    # failed on them until dead-lettered. Found by an app developer's review.
    info = conninfo_to_dict(dsn)
    (tmp_path / "djapp.py").write_text(
        DJANGO_APP.format(
            name=info["dbname"],
            user=str(info.get("user") or "postgres"),
            host=str(info.get("host") or "127.0.0.1"),
            port=str(info.get("port") or 5432),
            max_age=max_age,
        )
    )
    worker = daemons.worker(
        "--concurrency", "2", app="djapp:registry", env={"PYTHONPATH": f"{tmp_path}:{ROOT}"}
    )

    def succeeded(n: int) -> bool:
        return scalar(conn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded'") == n

    try:
        for n in range(6):
            enqueue(conn, "dj.query", {"n": n})
        wait_until(lambda: succeeded(6), timeout=60)
        if max_age == 0:
            # Closed at the end of each job, as at the end of a request.
            wait_until(lambda: django_sessions(conn) == 0, timeout=5)
        else:
            assert django_sessions(conn) >= 1
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'djangoapp'"
        )
        for n in range(6):
            enqueue(conn, "dj.query", {"n": n})
        # A persistent connection Postgres dropped fails the one job that finds it so
        # (Django marks it unusable), and is closed after it: each thread fails at most
        # once, so no job runs out of its 3 attempts.
        wait_until(lambda: succeeded(12), timeout=60)
        assert scalar(conn, "SELECT count(*) FROM pgqueue.dead_jobs") == 0
        failed = scalar(conn, "SELECT sum(jsonb_array_length(errors)) FROM pgqueue.jobs")
        assert failed <= (0 if max_age == 0 else 2), daemons.output(worker)
    finally:
        daemons.stop_all()
