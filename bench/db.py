"""Databases of the bench: each system gets a fresh one (created at start, dropped at the
end even on failure), plus the facts about the server that go into the report."""

from __future__ import annotations

import atexit
import contextlib
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

SETTINGS = (
    "server_version",
    "shared_buffers",
    "work_mem",
    "maintenance_work_mem",
    "effective_cache_size",
    "synchronous_commit",
    "fsync",
    "wal_level",
    "wal_buffers",
    "max_wal_size",
    "checkpoint_timeout",
    "max_connections",
    "autovacuum",
    "autovacuum_naptime",
    "jit",
    "random_page_cost",
    "huge_pages",
)

_created: list[tuple[str, str]] = []


def with_database(dsn: str, name: str) -> str:
    """``dsn`` (a URL) pointing at database ``name``."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def hold_run_lock(admin_dsn: str) -> psycopg.Connection[Any] | None:
    """A session advisory lock that one bench run holds on the server for as long as it
    runs (the returned connection); None if another run holds it. Taken in the database
    `postgres` whatever the admin DSN names: advisory locks are per database."""
    conn = psycopg.connect(make_conninfo(admin_dsn, dbname="postgres"), autocommit=True)
    row = conn.execute("SELECT pg_try_advisory_lock(hashtext('pgqueue.bench.run'))").fetchone()
    if row is None or not row[0]:
        conn.close()
        return None
    return conn


def create_database(admin_dsn: str, name: str) -> str:
    """Drop ``name`` if a failed earlier run left it, create it fresh; returns its DSN."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    _created.append((admin_dsn, name))
    return with_database(admin_dsn, name)


def drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
    with contextlib.suppress(ValueError):
        _created.remove((admin_dsn, name))


def checkpoint(admin_dsn: str) -> None:
    """CHECKPOINT now: the backlog figures are measured on a settled backlog, not while
    Postgres writes back the gigabytes just seeded (a real backlog of that size was
    checkpointed many times while it built up)."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def drop_all() -> None:
    """Drop every database this bench created (idempotent; also runs at exit)."""
    for admin_dsn, name in list(_created):
        with contextlib.suppress(psycopg.Error):
            drop_database(admin_dsn, name)


atexit.register(drop_all)


def server_facts(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT version()").fetchone()
        facts: dict[str, Any] = {"version": row[0] if row else "?"}
        settings: dict[str, str] = {}
        for name in SETTINGS:
            got = conn.execute(
                "SELECT setting, unit FROM pg_settings WHERE name = %s", (name,)
            ).fetchone()
            if got is not None:
                settings[name] = _human(*got)
        facts["settings"] = settings
    return facts


_UNIT_BYTES = {"B": 1, "kB": 1024, "8kB": 8192, "MB": 2**20, "GB": 2**30}


def _human(value: str, unit: str | None) -> str:
    """``16384`` with unit ``8kB`` -> ``128MB``; other units are kept as they are."""
    if unit in _UNIT_BYTES and value.lstrip("-").isdigit() and int(value) >= 0:
        size = int(value) * _UNIT_BYTES[unit]
        for suffix, factor in (("GB", 2**30), ("MB", 2**20), ("kB", 1024)):
            if size >= factor and size % factor == 0:
                return f"{size // factor}{suffix}"
        return f"{size}B"
    return f"{value}{unit or ''}"


def scalar(dsn: str, query: Any, params: Any = None) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
        return row[0] if row else None
