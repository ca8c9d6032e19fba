"""Applies the numbered SQL files of ``migrations/`` in order, each once.

Concurrent migrators serialise on an advisory lock; each file and its record commit
together, so a failure leaves the database at the last good version. An applied file
whose text changed is refused (released migrations are never edited), except for
earlier texts known to differ in comments alone (SAME_SCHEMA_CHECKSUMS).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import psycopg

from pgqueue import store
from pgqueue.errors import SCHEMA_HINT, ConfigError, MigrationError

# How long a migration's statements wait for a lock on pgqueue's tables by default.
DEFAULT_LOCK_TIMEOUT_SECONDS = 5.0
# Migrations that set their own lock timeout (SET LOCAL in the file, which overrides the
# one `migrate` sets): 0013 waits at most 5 s whatever is asked.
OWN_LOCK_TIMEOUT = frozenset({13})
# Migrations that lock pgqueue.jobs (ACCESS EXCLUSIVE; README, Upgrading). Enqueues and
# claims queue behind such a migration while it waits for its locks, not only while it
# holds them: its failure says that a longer wait is a longer stall. 0024 locks it only
# outside UTF8 databases (it creates a trigger there).
LOCKS_JOBS = frozenset({2, 3, 7, 10, 13, 15, 16, 17, 24, 25})
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Checksums of earlier texts of a migration that differ from the shipped one in comments
# alone: a database migrated by a development build of pgqueue that shipped such a text
# (before 0.1.0) has the same schema, and its record is brought up to date. Migrations
# edited in substance before 0.1.0 are not listed: a database they were applied to has
# another schema (README, Upgrading). From 0.1.0 on no migration is edited
# (tests/test_migrate.py checks them against tests/migration_checksums.txt).
SAME_SCHEMA_CHECKSUMS: dict[int, frozenset[str]] = {
    19: frozenset({"31d4a904f7470d2e2ca830c3eecbed2b8c2ff620a564f18d6db3669920fd9227"}),
    23: frozenset({"5638182957e20ab2e72778e6ea2ac4d37069fa89d2bc61e461bc554a928ddd44"}),
    25: frozenset({"7127de725e6a30d0a8e6d4e9b553c48d03f3a17217ca299268077ccef5b0c26b"}),
}


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()

    def matches(self, recorded: str) -> bool:
        """Whether a database that recorded ``recorded`` for this migration has its
        schema: the shipped text's checksum, or an earlier one differing in comments."""
        return recorded == self.checksum or recorded in SAME_SCHEMA_CHECKSUMS.get(
            self.version, frozenset()
        )

    def changed_message(self) -> str:
        return (
            f"migration {self.version:04d}_{self.name} was applied to this database from"
            " another text than this pgqueue ships (its checksum differs: a development"
            " build of pgqueue before 0.1.0 shipped a different version of it, or the file"
            " was edited), so the schema may differ from what this pgqueue expects;"
            " `pgqueue migrate` refuses to go on (README, Upgrading)"
        )


def _migrations_dir() -> Traversable:
    # In a wheel the files live in pgqueue/migrations; in a source checkout (editable
    # install) they are the top-level migrations/ folder next to the package.
    packaged = resources.files("pgqueue") / "migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "migrations"


def load_migrations() -> list[Migration]:
    """All migration files, sorted by version; raises ``MigrationError`` on a bad set."""
    found: list[Migration] = []
    for entry in _migrations_dir().iterdir():
        match = _FILE.match(entry.name)
        if match is None:
            continue
        found.append(Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if not found:
        raise MigrationError("no migration files found")
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions in {versions}")
    return found


def migrate(
    conninfo: str,
    *,
    on_warning: Callable[[str], None] | None = None,
    on_wait: Callable[[str], None] | None = None,
    on_applied: Callable[[Migration], None] | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_SECONDS,
    **kwargs: Any,
) -> list[Migration]:
    """Apply the missing migrations; returns those applied (empty when up to date).
    ``on_warning`` receives the text of each WARNING a migration raises (0005 warns when
    it cannot create the roles), with its hint. ``on_wait`` is told when another
    migrator holds the lock and this one waits for it; ``on_applied`` of each migration
    once it committed (a long run shows its progress). ``lock_timeout``: seconds a
    migration's statements wait for a lock on pgqueue's tables (0: without limit) before
    that migration fails, changing nothing (those applied before it stay applied); while
    one waits, every statement on that table queues behind it. The role's or database's
    statement_timeout does not apply to migrating (a migration reads whole tables)."""
    if not (lock_timeout >= 0 and lock_timeout * 1000 < 2**31):
        raise ConfigError(
            f"lock_timeout must be 0 or more seconds (at most 2147483), not {lock_timeout!r}"
        )
    lock_timeout_ms = 0 if lock_timeout == 0 else max(1, round(lock_timeout * 1000))
    migrations = load_migrations()
    applied_now: list[Migration] = []
    with store.connect(conninfo, **kwargs) as conn:
        if on_warning is not None:
            report = on_warning

            def forward(diag: psycopg.errors.Diagnostic) -> None:
                if diag.severity_nonlocalized == "WARNING" and diag.message_primary:
                    text = diag.message_primary.removeprefix("pgqueue: ")
                    hint = " ".join((diag.message_hint or "").split())
                    report(f"{text}; hint: {hint}" if hint else text)

            conn.add_notice_handler(forward)
        acquired, holder = store.try_lock_migrations(conn)
        if not acquired:
            if on_wait is not None:
                on_wait(
                    "another `pgqueue migrate` is running"
                    + (f" (backend pid {holder})" if holder is not None else "")
                    + ": waiting for it to finish"
                )
            store.lock_migrations(conn)
        try:
            applied = {r["version"]: r["checksum"] for r in store.migration_records(conn)}
            if any(m.version not in applied for m in migrations):
                # Only when there is something to apply: creating the table (even "IF NOT
                # EXISTS") needs CREATE on the database, which a role that only checks
                # an up-to-date schema may lack.
                store.create_migrations_table(conn)
            newer = sorted(set(applied) - {m.version for m in migrations})
            if newer and on_warning is not None:
                # A newer pgqueue migrated this database: this one may not know its schema.
                on_warning(
                    f"the database has migrations this pgqueue does not know"
                    f" ({', '.join(f'{v:04d}' for v in newer)}): it was migrated by a newer"
                    " version; upgrade this one"
                )
            for migration in migrations:
                if migration.version in applied:
                    recorded = applied[migration.version]
                    if not migration.matches(recorded):
                        raise MigrationError(migration.changed_message())
                    if recorded != migration.checksum:
                        store.update_migration_checksum(
                            conn, version=migration.version, checksum=migration.checksum
                        )
                    continue
                began = time.monotonic()
                try:
                    store.run_migration(
                        conn,
                        version=migration.version,
                        name=migration.name,
                        checksum=migration.checksum,
                        sql=migration.sql,
                        lock_timeout_ms=lock_timeout_ms,
                    )
                except psycopg.errors.LockNotAvailable as exc:
                    done = ", ".join(f"{m.version:04d}_{m.name}" for m in applied_now)
                    holders = _lock_holders(conn)
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} failed: it waited"
                        f" {time.monotonic() - began:.1f}s for a lock on pgqueue's tables that"
                        " another session holds (an open transaction?"
                        + (f" {holders}" if holders else "")
                        + ") and changed nothing; run it again once that ends"
                        + (
                            ", or allow longer with --lock-timeout"
                            if migration.version not in OWN_LOCK_TIMEOUT
                            else " (this migration waits at most 5s whatever --lock-timeout)"
                        )
                        + (
                            "; enqueues and claims wait behind it for as long as it waits"
                            if migration.version in LOCKS_JOBS
                            else ""
                        )
                        + (f" (applied before it: {done})" if done else "")
                    ) from exc
                except psycopg.Error as exc:
                    reason = (exc.diag.message_primary or str(exc)).strip().splitlines()
                    # A migration that refuses the data it finds says how to fix it.
                    hint = " ".join((exc.diag.message_hint or "").split())
                    done = ", ".join(f"{m.version:04d}_{m.name}" for m in applied_now)
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} failed:"
                        f" {reason[0] if reason else type(exc).__name__}"
                        + (f"; hint: {hint}" if hint else "")
                        + (f" (applied before it: {done})" if done else "")
                    ) from exc
                applied_now.append(migration)
                if on_applied is not None:
                    on_applied(migration)
        finally:
            with contextlib.suppress(psycopg.Error):
                store.unlock_migrations(conn)
    return applied_now


def _lock_holders(conn: psycopg.Connection[Any]) -> str:
    """The oldest open transactions holding a lock on one of pgqueue's tables, as
    "backend pid 123 (idle in transaction for 40s)", for a migration that gave up
    waiting; empty if none is seen (or they cannot be read)."""
    try:
        rows = store.lock_holders(conn)
    except psycopg.Error:
        return ""
    return ", ".join(
        f"backend pid {r['pid']} ({r['state'] or 'state unknown'} for {r['xact_seconds']:.0f}s)"
        for r in rows
    )


@dataclass(frozen=True)
class MigrationStatus:
    """One migration as `pgqueue migrate --status` shows it."""

    version: int
    name: str
    # "applied"; "pending" (`pgqueue migrate` would apply it); "changed" (applied, but the
    # file this pgqueue ships differs: `pgqueue migrate` refuses to run); "newer" (applied
    # by a newer pgqueue, unknown to this one).
    state: Literal["applied", "pending", "changed", "newer"]
    applied_at: datetime | None


def status(conninfo: str, **kwargs: Any) -> list[MigrationStatus]:
    """Each migration this pgqueue ships and each the database has, in version order.
    Reads only: takes no lock and creates nothing."""
    shipped = {m.version: m for m in load_migrations()}
    with store.connect(conninfo, **kwargs) as conn:
        records = {r["version"]: r for r in store.migration_records(conn)}
    found: list[MigrationStatus] = []
    for version in sorted(shipped.keys() | records.keys()):
        record = records.get(version)
        migration = shipped.get(version)
        if record is None:
            assert migration is not None
            found.append(MigrationStatus(version, migration.name, "pending", None))
        elif migration is None:
            found.append(MigrationStatus(version, record["name"], "newer", record["applied_at"]))
        else:
            same = migration.matches(record["checksum"])
            found.append(
                MigrationStatus(
                    version, migration.name, "applied" if same else "changed", record["applied_at"]
                )
            )
    return found


@dataclass(frozen=True)
class SchemaDrift:
    """How a database's applied migrations differ from the ones this pgqueue ships."""

    # This pgqueue's migrations the database lacks, as "0011_name", in order.
    missing: tuple[str, ...]
    # Applied there, unknown here: a newer pgqueue migrated the database.
    newer: tuple[int, ...]


def schema_drift(applied: Iterable[int]) -> SchemaDrift:
    done = set(applied)
    shipped = load_migrations()
    known = {m.version for m in shipped}
    return SchemaDrift(
        missing=tuple(f"{m.version:04d}_{m.name}" for m in shipped if m.version not in done),
        newer=tuple(sorted(done - known)),
    )


class SchemaWatch:
    """A daemon's view of its database's migrations. Told the applied versions (None: this
    role may not read them), it says once which of this pgqueue's migrations are missing
    (code upgraded, `pgqueue migrate` not run: statements fail until it is), again if
    that changes, and when none is left; and once which newer ones are there. ``settled``
    once nothing more can change: up to date, or the versions cannot be read. Told once
    where pgqueue.notify_max_queue_usage is set but unreadable (for this daemon's
    sessions, this database, or a role in it), it says so."""

    def __init__(self, logger: Any, daemon: str) -> None:
        self._log = logger
        self._daemon = daemon
        self._missing: tuple[str, ...] = ()
        self.settled: bool = False
        self.notify_limit_checked: bool = False

    @property
    def behind(self) -> bool:
        """Whether the database was last seen lacking one of this pgqueue's migrations."""
        return bool(self._missing) and not self.settled

    def observe(self, applied: Iterable[int] | None) -> None:
        if self.settled:
            # Another reader (the fetcher, the heartbeat) settled it while this one's
            # query ran: said already.
            return
        if applied is None:
            self._log.info(
                f"{self._daemon}.schema_unchecked",
                reason="this role may not read pgqueue.schema_migrations (migration 0011)",
            )
            self.settled = True
            return
        drift = schema_drift(applied)
        if drift.missing:
            if drift.missing != self._missing:
                self._log.error(
                    f"{self._daemon}.schema_behind", missing=list(drift.missing), hint=SCHEMA_HINT
                )
                self._missing = drift.missing
            return
        if self._missing:
            self._log.info(f"{self._daemon}.schema_up_to_date")
        if drift.newer:
            self._log.warning(
                f"{self._daemon}.schema_newer",
                newer=list(drift.newer),
                hint="a newer pgqueue migrated this database: upgrade this one",
            )
        self.settled = True

    def observe_notify_limit(self, ignored: list[tuple[str, str]]) -> None:
        """Told where pgqueue.notify_max_queue_usage is set but unreadable
        (store.notify_limit_ignored), says so: such a value silently counts as unset."""
        for source, value in ignored:
            self._log.warning(
                f"{self._daemon}.notify_limit_ignored",
                source=source,
                value=value if len(value) <= 100 else value[:100] + "...",
                hint="pgqueue.notify_max_queue_usage must be a non-negative decimal such as"
                " 0.2 (README, 'The NOTIFY queue'); pgqueue's statements count this one as"
                " unset (0.5)",
            )
        self.notify_limit_checked = True
