"""The only module that runs named queries: one small typed function per query.

Worker-side functions are async (the daemon runs on asyncio); the reaper, the admin CLI
and the sync producer API use the sync ones. Every state change is conditional on the
lease token its caller holds and reports which rows it changed.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, LiteralString, NamedTuple

import psycopg
from psycopg import pq
from psycopg.abc import Buffer
from psycopg.adapt import Loader
from psycopg.rows import dict_row, tuple_row
from psycopg.types.json import Jsonb, set_json_loads

from pgqueue.errors import SCHEMA_HINT, PayloadTooLarge, PgQueueError, first_line, schema_missing
from pgqueue.models import Job, JobState, JobStatus, UndecodableArgs
from pgqueue.registry import DEFAULT_MAX_ATTEMPTS, DEFAULT_PRIORITY
from pgqueue.sql import QUERIES

Row = dict[str, Any]
AsyncConn = psycopg.AsyncConnection[Any]
SyncConn = psycopg.Connection[Any]


def _finite_float(text: str) -> float:
    """A JSON number with a fraction as a float, refusing one too large for a float.
    Postgres writes jsonb numbers without an exponent, so only a literal of over 300
    digits can overflow: json.loads alone would make it inf, which no handler expects and
    which json.dumps writes as `Infinity` (not JSON)."""
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ValueError(f"a number of {len(text)} characters is out of a float's range")
    return value


# One decoder: json.loads with any keyword builds a new one per call (every claimed job).
_DECODER = json.JSONDecoder(parse_float=_finite_float)


def _lenient_json_loads(data: str | Buffer) -> Any:
    """JSON text, or its bytes as UTF-8 (what json.loads settles on for them too, after
    guessing among UTF-8, 16 and 32 every time); UndecodableArgs where Python cannot."""
    try:
        return _DECODER.decode(data if isinstance(data, str) else str(data, "utf-8"))
    except (ValueError, RecursionError) as exc:
        return UndecodableArgs(f"{type(exc).__name__}: {str(exc)[:200]}")


class _LenientJsonTextLoader(Loader):
    """json and jsonb in text format (every claim's args) through _lenient_json_loads,
    without psycopg's wrapper around a loads function: about 1 us less per claimed job."""

    def load(self, data: Buffer) -> Any:
        return _lenient_json_loads(data)


# What pgqueue's own connections need of their session, whatever the database or role
# sets (ALTER DATABASE/ROLE ... SET, PGOPTIONS): psycopg reads timestamps only in
# DateStyle ISO (another style fails every claimed batch after its commit), and rows must
# come in UTF-8 (a LATIN1 client encoding fails a whole claim on one character it lacks,
# and pgqueue's statements could not be sent in it). The server reports both at connect,
# so a connection that has them costs nothing; one that lacks them, one statement.
_SESSION_FIXES: dict[tuple[bool, bool], LiteralString] = {
    (True, True): "SELECT set_config('DateStyle', 'ISO', false),"
    " set_config('client_encoding', 'UTF8', false)",
    (True, False): "SELECT set_config('DateStyle', 'ISO', false)",
    (False, True): "SELECT set_config('client_encoding', 'UTF8', false)",
}


def client_encoding_is_utf8(conn: SyncConn | AsyncConn) -> bool:
    """Whether the session's client encoding (as the server reported it) is UTF-8, so
    that any text can be sent and read."""
    encoding = conn.pgconn.parameter_status(b"client_encoding") or b""
    return encoding.upper() in (b"UTF8", b"UNICODE")


def storable_errors(
    conn: SyncConn | AsyncConn, errors: Sequence[dict[str, Any]]
) -> Sequence[dict[str, Any]]:
    """Error records as a database of this connection's server encoding can store them:
    unchanged in a UTF8 database; elsewhere each text with every character other than
    ASCII written as its Python escape (``é`` as ``\\xe9``). A handler's error message is any
    text: sent from a UTF-8 session to a WIN1252 or LATIN1 database, a character it lacks
    (SQL_ASCII: any character other than ASCII in jsonb) failed the whole outcome write,
    and the job ran again, alone, once its lease expired, attempt after attempt."""
    encoding = (conn.pgconn.parameter_status(b"server_encoding") or b"UTF8").upper()
    if encoding in (b"UTF8", b"UNICODE"):
        return errors
    return [
        {key: _ascii(value) if isinstance(value, str) else value for key, value in e.items()}
        for e in errors
    ]


def _ascii(text: str) -> str:
    return text if text.isascii() else text.encode("ascii", "backslashreplace").decode("ascii")


def _session_fix(conn: SyncConn | AsyncConn) -> LiteralString | None:
    datestyle = (conn.pgconn.parameter_status(b"DateStyle") or b"").upper()
    key = (not datestyle.startswith(b"ISO"), not client_encoding_is_utf8(conn))
    return _SESSION_FIXES.get(key)


def pin_session(conn: SyncConn) -> None:
    """Give one of pgqueue's own connections the DateStyle and client encoding its
    decoding needs (see _SESSION_FIXES)."""
    fix = _session_fix(conn)
    if fix is not None:
        conn.execute(fix)


async def pin_session_async(conn: AsyncConn) -> None:
    """pin_session for an async connection."""
    fix = _session_fix(conn)
    if fix is not None:
        await conn.execute(fix)


def application_name(default: str) -> dict[str, Any]:
    """The connection kwargs that name a daemon's connections ``default`` unless the
    operator named them (the connection string, a service file, PGAPPNAME): libpq's
    fallback_application_name, which each of those overrides."""
    return {"fallback_application_name": default}


def connect(
    conninfo: str,
    *,
    no_seq_scans: bool = False,
    on_connected: Callable[[SyncConn], object] | None = None,
    **kwargs: Any,
) -> SyncConn:
    """A connection of pgqueue's own (the CLI, the reaper, metrics, migrate): autocommit,
    its session pinned (pin_session), with NO_SEQ_SCANS if asked (a connection whose
    prepared statements live long: the reaper's); closed again if that fails.
    ``on_connected`` gets it before those statements are sent."""
    conn = psycopg.connect(conninfo, autocommit=True, **kwargs)
    try:
        if on_connected is not None:
            on_connected(conn)
        pin_session(conn)
        if no_seq_scans:
            conn.execute(NO_SEQ_SCANS)
            conn.execute(NO_JIT)
    except BaseException:
        conn.close()
        raise
    return conn


async def connect_async(conninfo: str, **kwargs: Any) -> AsyncConn:
    """connect for an async connection (the listener, pgqueue.testing)."""
    conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True, **kwargs)
    try:
        await pin_session_async(conn)
    except BaseException:
        await conn.close()
        raise
    return conn


async def configure_worker_connection(conn: AsyncConn) -> None:
    """JSON that Python cannot decode becomes UndecodableArgs on this connection instead
    of an exception that would strand a whole claimed batch."""
    set_json_loads(_lenient_json_loads, conn)  # binary format too
    conn.adapters.register_loader("json", _LenientJsonTextLoader)
    conn.adapters.register_loader("jsonb", _LenientJsonTextLoader)


# A prepared statement's plan is made once, with the statistics and the table size of that
# moment, and kept for the connection's life, until an ANALYZE invalidates it. A worker
# that starts on a new or nearly empty jobs table (a fresh deployment, a truncated table)
# would plan its heartbeat and outcome writes as a sequential scan joined by hash, the
# cheapest way to read a few pages, and keep that plan while the table grows to millions
# of rows wherever autovacuum is off or behind. With sequential scans priced out, every
# hot statement reaches its rows by index whatever the table's size when it was planned
# (tests/test_queries.py). Session settings: only for connections that may hold them.
NO_SEQ_SCANS: LiteralString = "SET enable_seqscan = off"
# With sequential scans priced out, a plan that must make one anyway (a small table read
# whole, pgqueue.workers say) costs over jit_above_cost, and Postgres JIT-compiles it:
# about 0.5 s for rescued_waiting, a 0.3 ms query. No statement of a worker or a reaper
# gains from JIT; set beside NO_SEQ_SCANS.
NO_JIT: LiteralString = "SET jit = off"


async def configure_prepared_worker_connection(conn: AsyncConn) -> None:
    """As configure_worker_connection, and prepared statements always run their generic
    plan, one that never scans the jobs table (NO_SEQ_SCANS). Left to itself Postgres
    re-plans a prepared claim now and then to compare costs, and a claim's plan takes
    longer to make (about 1 ms) than to run. The claim, poll and lease statements' generic
    plans find rows by index (tests/test_queries.py)."""
    await configure_worker_connection(conn)
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    await conn.execute(NO_SEQ_SCANS)
    await conn.execute(NO_JIT)


def worker_connection_configurer(
    *, generic_plans: bool, async_commit: bool
) -> Callable[[AsyncConn], Awaitable[None]]:
    """The pool's ``configure`` callback for a worker's connections: the session pinned
    (pin_session) and lenient JSON always, generic plans and asynchronous commit as asked
    (both are session settings)."""

    async def configure(conn: AsyncConn) -> None:
        await pin_session_async(conn)
        if generic_plans:
            await configure_prepared_worker_connection(conn)
        else:
            await configure_worker_connection(conn)
        if async_commit:
            # COMMIT returns before the WAL is flushed (the WAL writer flushes within
            # wal_writer_delay); a Postgres crash can lose the newest claims and outcomes,
            # whose jobs then run again. Never a committed enqueue: other connections.
            await conn.execute("SET synchronous_commit = off")

    return configure


def _job_from_tuple(row: tuple[Any, ...]) -> Job:
    # The RETURNING order of claim_jobs and claim_rescued_job: id, queue, task, args,
    # priority, attempts, max_attempts, run_at, created_at, lease_token, lease_expires_at,
    # cancel_requested, attempted_at (Job's fields, in order; tests/test_queries.py checks
    # it).
    return Job(*row)


async def _fetch_tuples_async(
    conn: AsyncConn, name: str, params: dict[str, Any]
) -> list[tuple[Any, ...]]:
    # Plain tuples: a dict per row costs more than the rest of reading it (hot path).
    async with conn.cursor() as cur:
        await cur.execute(QUERIES[name], params)
        return await cur.fetchall()


async def _fetch_async(conn: AsyncConn, name: str, params: dict[str, Any]) -> list[Row]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(QUERIES[name], params)
        return await cur.fetchall()


async def _execute_async(conn: AsyncConn, name: str, params: dict[str, Any]) -> None:
    await conn.execute(QUERIES[name], params)


def _fetch(conn: SyncConn, name: str, params: dict[str, Any]) -> list[Row]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(QUERIES[name], params)
        return cur.fetchall()


# --- worker -----------------------------------------------------------------------------


# How many rows beyond its limit a claim may lock before it takes claim_jobs_many, whose
# steps cost more than locking a few hundred rows (claim_jobs locks up to `limit` in each
# queue): a worker at --concurrency 10 serving 20 queues keeps claim_jobs (the two-step
# claim drained 7% slower there); one at 1000 serving 5 (up to 5,000 rows locked for
# 1,000 claimed) or at 50 serving 200 does not. `python -m bench.many_queues`: 50 queues,
# 2 processes at 1,000, 12,100 -> 15,900 jobs/s and 468 -> 174 MiB of WAL for 150,000
# jobs (CHANGELOG).
CLAIM_EXTRA_LOCKS_MAX = 500


def claim_statement(queues: Sequence[str], limit: int) -> str:
    """The name of the claim a worker serving ``queues`` makes for ``limit`` jobs."""
    return "claim_jobs_many" if (len(queues) - 1) * limit > CLAIM_EXTRA_LOCKS_MAX else "claim_jobs"


async def claim_jobs(
    conn: AsyncConn, *, queues: Sequence[str], limit: int, worker_id: str, lease_seconds: float
) -> list[Job]:
    rows = await _fetch_tuples_async(
        conn,
        claim_statement(queues, limit),
        {
            "queues": list(queues),
            "limit": limit,
            "worker_id": worker_id,
            "lease_seconds": lease_seconds,
        },
    )
    jobs = [_job_from_tuple(r) for r in rows]
    jobs.sort(key=lambda j: (j.priority, j.run_at, j.id))
    return jobs


async def claim_rescued_job(
    conn: AsyncConn, *, queues: Sequence[str], worker_id: str, lease_seconds: float
) -> Job | None:
    rows = await _fetch_tuples_async(
        conn,
        "claim_rescued_job",
        {"queues": list(queues), "worker_id": worker_id, "lease_seconds": lease_seconds},
    )
    return _job_from_tuple(rows[0]) if rows else None


class RescuedCheck(NamedTuple):
    """Whether a rescued job is due in some queues, the seconds until this worker's turn
    to drain for one (<= 0: now; None: none is due), and the database's now() that said
    so (rescued_waiting in worker.sql)."""

    waiting: bool
    checked_at: datetime
    drain_in: float | None = None


async def rescued_waiting(
    conn: AsyncConn,
    *,
    queues: Sequence[str],
    worker_id: str = "",
    stagger_seconds: float = 0.0,
) -> RescuedCheck:
    rows = await _fetch_async(
        conn,
        "rescued_waiting",
        {"queues": list(queues), "worker_id": worker_id, "stagger_seconds": stagger_seconds},
    )
    row = rows[0]
    return RescuedCheck(bool(row["waiting"]), row["checked_at"], row["drain_in"])


class Due(NamedTuple):
    """Seconds until the next queued job of some queues falls due (None: none waits, or
    none that the idle worker should wake for), and until the earliest of them that is
    rescued does, among the next job of each priority, or (negative) since a rescued job
    fell due after the worker's last check for them (seconds_until_due in worker.sql)."""

    seconds: float | None
    rescued_seconds: float | None


async def seconds_until_due(
    conn: AsyncConn,
    *,
    queues: Sequence[str],
    lookback_seconds: float = 0.0,
    rescued_since: datetime | None = None,
) -> Due:
    """``lookback_seconds``: the time since the worker sent its last claim;
    ``rescued_since``: the now() of its last check for rescued jobs (None: none made)."""
    rows = await _fetch_async(
        conn,
        "seconds_until_due",
        {
            "queues": list(queues),
            "lookback_seconds": lookback_seconds,
            "rescued_since": rescued_since,
        },
    )
    if not rows:
        return Due(None, None)
    return Due(rows[0]["seconds"], rows[0]["rescued_seconds"])


def _array(values: Iterable[int | float]) -> str:
    """An array literal of numbers, for a parameter cast to bigint[] or float8[]: their
    text forms need no quoting, and psycopg's list dumper (which checks every element for
    quoting) cost a few microseconds per job on the hot path."""
    return "{" + ",".join(map(str, values)) + "}"


def _uuid_array(values: Iterable[uuid.UUID]) -> str:
    """As _array, for a parameter cast to uuid[]: each UUID as its 32 hex digits, which
    Postgres reads as a uuid too and Python writes in a third of the time of str()."""
    return "{" + ",".join([value.hex for value in values]) + "}"


async def extend_leases(
    conn: AsyncConn, *, ids: Sequence[int], tokens: Sequence[uuid.UUID], lease_seconds: float
) -> dict[int, bool]:
    """Extends the leases still held; returns {id: cancel requested} for those."""
    # By id: for callers that hold one attempt per job (the heartbeat may hold two, and
    # uses heartbeat_leases).
    rows = await _extend_leases(conn, ids=ids, tokens=tokens, lease_seconds=lease_seconds)
    return {r["id"]: r["cancel_requested"] for r in rows if r["extended"]}


async def heartbeat_leases(
    conn: AsyncConn, *, ids: Sequence[int], tokens: Sequence[uuid.UUID], lease_seconds: float
) -> tuple[dict[uuid.UUID, bool], set[uuid.UUID]]:
    """As extend_leases, by lease token (a worker may hold two attempts of one job, see
    the query), and the tokens skipped because another session holds their row locked
    (still held, as far as the statement saw: neither extended nor lost)."""
    rows = await _extend_leases(conn, ids=ids, tokens=tokens, lease_seconds=lease_seconds)
    extended = {r["token"]: r["cancel_requested"] for r in rows if r["extended"]}
    return extended, {r["token"] for r in rows if not r["extended"]}


async def _extend_leases(
    conn: AsyncConn, *, ids: Sequence[int], tokens: Sequence[uuid.UUID], lease_seconds: float
) -> list[Row]:
    return await _fetch_async(
        conn,
        "extend_leases",
        {"ids": _array(ids), "tokens": _uuid_array(tokens), "lease_seconds": lease_seconds},
    )


# The outcome writers return {id: state the job is in now} for the rows they changed; a
# job missing from the result was fenced off (its lease was lost).


async def complete_jobs(
    conn: AsyncConn,
    *,
    ids: Sequence[int],
    tokens: Sequence[uuid.UUID],
    durations: Sequence[float],
) -> dict[int, str]:
    rows = await _fetch_tuples_async(
        conn,
        "complete_jobs",
        {"ids": _array(ids), "tokens": _uuid_array(tokens), "durations": _array(durations)},
    )
    return dict(rows)


async def release_orphans(
    conn: AsyncConn, *, worker_id: str, keep: Sequence[uuid.UUID]
) -> dict[int, str]:
    """Requeues (or cancels) the jobs running under ``worker_id`` whose token is not in
    ``keep``; returns {id: state now}. See the query."""
    rows = await _fetch_tuples_async(
        conn, "release_orphans", {"worker_id": worker_id, "keep": _uuid_array(keep)}
    )
    return dict(rows)


class Changed(dict[int, str]):
    """What outcome writes changed, {id: the state it ended in}, and in ``renamed``
    {id: dead id} the dead-lettered jobs stored under a new id because pgqueue.dead_jobs
    held theirs (migration 0023: dead_letter_jobs and recorded_outcomes fill it)."""

    def __init__(self) -> None:
        super().__init__()
        self.renamed: dict[int, int] = {}

    def add(self, other: dict[int, str]) -> None:
        """Take in another write's changes (and its renamed ids, if it has any)."""
        self.update(other)
        if isinstance(other, Changed):
            self.renamed.update(other.renamed)


def _changed(rows: list[tuple[Any, ...]]) -> Changed:
    """Changed from rows of (id, state, dead id or NULL)."""
    result = Changed()
    for job_id, state, dead_id in rows:
        result[job_id] = state
        if dead_id is not None and dead_id != job_id:
            result.renamed[job_id] = dead_id
    return result


async def recorded_outcomes(
    conn: AsyncConn,
    *,
    worker_id: str,
    ids: Sequence[int],
    started_ats: Sequence[datetime],
) -> Changed:
    """Of these claims (job id, attempted_at), those whose outcome this worker already
    recorded: {id: state} (see the query), with the dead id of one dead-lettered under a
    new id in ``renamed``. For fenced writes that follow a write lost with its
    connection."""
    rows = await _fetch_tuples_async(
        conn,
        "recorded_outcomes",
        {"worker_id": worker_id, "ids": _array(ids), "started_ats": list(started_ats)},
    )
    return _changed(rows)


async def retry_jobs(
    conn: AsyncConn,
    *,
    ids: Sequence[int],
    tokens: Sequence[uuid.UUID],
    delays: Sequence[float],
    errors: Sequence[dict[str, Any]],
    durations: Sequence[float],
) -> dict[int, str]:
    rows = await _fetch_tuples_async(
        conn,
        "retry_jobs",
        {
            "ids": _array(ids),
            "tokens": _uuid_array(tokens),
            "delays": _array(delays),
            "errors": [Jsonb(e) for e in storable_errors(conn, errors)],
            "durations": _array(durations),
        },
    )
    return dict(rows)


async def snooze_jobs(
    conn: AsyncConn,
    *,
    ids: Sequence[int],
    tokens: Sequence[uuid.UUID],
    delays: Sequence[float],
    durations: Sequence[float],
) -> dict[int, str]:
    rows = await _fetch_tuples_async(
        conn,
        "snooze_jobs",
        {
            "ids": _array(ids),
            "tokens": _uuid_array(tokens),
            "delays": _array(delays),
            "durations": _array(durations),
        },
    )
    return dict(rows)


async def release_jobs(
    conn: AsyncConn,
    *,
    ids: Sequence[int],
    tokens: Sequence[uuid.UUID],
    durations: Sequence[float],
) -> dict[int, str]:
    rows = await _fetch_tuples_async(
        conn,
        "release_jobs",
        {"ids": _array(ids), "tokens": _uuid_array(tokens), "durations": _array(durations)},
    )
    return dict(rows)


async def dead_letter_jobs(
    conn: AsyncConn,
    *,
    ids: Sequence[int],
    tokens: Sequence[uuid.UUID],
    errors: Sequence[dict[str, Any]],
    reasons: Sequence[str],
    durations: Sequence[float],
) -> Changed:
    rows = await _fetch_tuples_async(
        conn,
        "dead_letter_jobs",
        {
            "ids": _array(ids),
            "tokens": _uuid_array(tokens),
            "errors": [Jsonb(e) for e in storable_errors(conn, errors)],
            "reasons": list(reasons),
            "durations": _array(durations),
        },
    )
    return _changed(rows)


async def register_worker(
    conn: AsyncConn,
    *,
    worker_id: str,
    host: str,
    pid: int,
    queues: Sequence[str],
    concurrency: int,
    running: int,
    heartbeat_seconds: float,
    version: str,
) -> None:
    await _execute_async(
        conn,
        "register_worker",
        {
            "id": worker_id,
            "host": host,
            "pid": pid,
            "queues": list(queues),
            "concurrency": concurrency,
            "running": running,
            "heartbeat_seconds": heartbeat_seconds,
            "version": version,
        },
    )


async def deregister_worker(conn: AsyncConn, *, worker_id: str) -> None:
    await _execute_async(conn, "deregister_worker", {"id": worker_id})


# --- reaper -----------------------------------------------------------------------------


def requeue_expired(
    conn: SyncConn,
    *,
    batch_size: int,
    backoff_base_seconds: float,
    backoff_max_seconds: float,
    regained_at: datetime | None = None,
    outage_seconds: float = 0.0,
) -> list[Row]:
    return _fetch(
        conn,
        "requeue_expired",
        {
            "batch_size": batch_size,
            "backoff_base_seconds": backoff_base_seconds,
            "backoff_max_seconds": backoff_max_seconds,
            "regained_at": regained_at,
            "outage_seconds": outage_seconds,
        },
    )


def dead_letter_expired(
    conn: SyncConn,
    *,
    batch_size: int,
    skip: Sequence[int] = (),
    regained_at: datetime | None = None,
    outage_seconds: float = 0.0,
    only: int | None = None,
) -> list[Row]:
    params = {"batch_size": batch_size, "skip": list(skip), "only": only}
    params |= {"regained_at": regained_at, "outage_seconds": outage_seconds}
    return _fetch(conn, "dead_letter_expired", params)


def dead_letter_candidates(
    conn: SyncConn,
    *,
    batch_size: int,
    skip: Sequence[int],
    regained_at: datetime | None = None,
    outage_seconds: float = 0.0,
) -> list[int]:
    params = {"batch_size": batch_size, "skip": list(skip)}
    params |= {"regained_at": regained_at, "outage_seconds": outage_seconds}
    return [r["id"] for r in _fetch(conn, "dead_letter_candidates", params)]


def delete_stale_workers(
    conn: SyncConn, *, regained_at: datetime | None = None, outage_seconds: float = 0.0
) -> list[Row]:
    params = {"regained_at": regained_at, "outage_seconds": outage_seconds}
    return _fetch(conn, "delete_stale_workers", params)


def standby_check(conn: SyncConn, *, grace_seconds: float, stall_seconds: float) -> Row:
    """{"overdue": bool, "stalled": bool | None} (see the query)."""
    params = {"grace_seconds": grace_seconds, "stall_seconds": stall_seconds}
    return _fetch(conn, "standby_check", params)[0]


def try_reaper_leadership(conn: SyncConn) -> tuple[bool, int]:
    """Take the embedded reapers' session lock if it is free (see the query); whether it
    did, and the server process that holds it then."""
    row = _fetch(conn, "try_reaper_leadership", {})[0]
    return bool(row["leader"]), int(row["pid"])


def reaper_backend_pid(conn: SyncConn) -> int:
    return int(_fetch(conn, "reaper_backend_pid", {})[0]["pid"])


def database_now(conn: SyncConn) -> datetime:
    now: datetime = _fetch(conn, "database_now", {})[0]["now"]
    return now


def prune_finished(
    conn: SyncConn, *, retention_seconds: float, batch_size: int, skip: Sequence[int] = ()
) -> list[int]:
    params = {"retention_seconds": retention_seconds, "batch_size": batch_size, "skip": list(skip)}
    return [r["id"] for r in _fetch(conn, "prune_finished", params)]


def prune_candidates(
    conn: SyncConn, *, retention_seconds: float, batch_size: int, skip: Sequence[int]
) -> list[int]:
    params = {"retention_seconds": retention_seconds, "batch_size": batch_size, "skip": list(skip)}
    return [r["id"] for r in _fetch(conn, "prune_candidates", params)]


def prune_job(conn: SyncConn, *, job_id: int, retention_seconds: float) -> list[int]:
    params = {"id": job_id, "retention_seconds": retention_seconds}
    return [r["id"] for r in _fetch(conn, "prune_job", params)]


# --- producers ----------------------------------------------------------------------------


def _hint_schema(exc: psycopg.Error) -> None:
    """An enqueue into a database pgqueue's schema is missing from (never migrated, or
    by an older pgqueue) keeps psycopg's error, which says what is missing, and gains the
    hint the daemons and the CLI give."""
    if schema_missing(exc):
        exc.add_note(SCHEMA_HINT)


@contextlib.contextmanager
def _payload_limit() -> Iterator[None]:
    """The database's own args size limit (migration 0004) as pgqueue's error; a missing
    schema hinted."""
    try:
        yield
    except psycopg.errors.ProgramLimitExceeded as exc:
        raise _too_large(exc) from exc
    except psycopg.Error as exc:
        _hint_schema(exc)
        raise


def _single_insert(params: dict[str, Any]) -> tuple[str, Any]:
    """The statement for one job: a direct INSERT unless it has an idempotency key (then
    pgqueue.enqueue, which returns the key holder's id)."""
    if params["idempotency_key"] is not None:
        return QUERIES["enqueue_job"], params
    if (
        params["run_at"] is None
        and params["delay_seconds"] is None
        and params["priority"] == DEFAULT_PRIORITY
        and params["max_attempts"] == DEFAULT_MAX_ATTEMPTS
    ):
        return QUERIES["insert_job_with_defaults"], (
            params["task"],
            params["args"],
            params["queue"],
        )
    return QUERIES["insert_job"], (
        params["task"],
        params["args"],
        params["queue"],
        params["priority"],
        params["run_at"],
        params["delay_seconds"],
        params["max_attempts"],
    )


def _too_large(exc: psycopg.errors.ProgramLimitExceeded) -> PayloadTooLarge:
    return PayloadTooLarge(first_line(exc))


# The producer functions run on the caller's connection: their cursors are psycopg's
# own (server-side binding, %s placeholders) and read tuples, whatever cursor factory
# or row factory that connection has.


# What _check_ours raises: see sql/enqueue.sql.
NOT_OURS = (
    "the database ran another statement than pgqueue's enqueue on this connection (its"
    " result is not pgqueue's): a pooler in transaction mode (PgBouncer) hands psycopg's"
    " prepared statements to other clients' connections, and nothing was enqueued, while"
    " that statement may have written with pgqueue's values: roll the transaction back."
    " Set prepare_threshold=None on producers' connections, or use PgBouncer 1.21+ with"
    " max_prepared_statements (README, PgBouncer)"
)


def _check_ours(cur: psycopg.Cursor[Any] | psycopg.AsyncCursor[Any], column: bytes) -> None:
    """PgQueueError (NOT_OURS) unless the statement that ran named its one result column
    ``column``."""
    result = cur.pgresult
    if result is None or result.nfields != 1 or result.fname(0) != column:
        raise PgQueueError(NOT_OURS)


def _fetch_ours(cur: psycopg.Cursor[Any], column: bytes) -> Any:
    """The first row of the statement ``cur`` ran, once _check_ours has found it ours:
    before the fetch (another statement may return no rows at all), or, in pipeline
    mode, where the result only comes with the fetch, after it."""
    if cur.pgresult is not None:
        _check_ours(cur, column)
        return cur.fetchone()
    try:
        row = cur.fetchone()
    except psycopg.ProgrammingError as exc:
        if exc.sqlstate is None:  # psycopg's own: the statement returned no rows
            _check_ours(cur, column)
        raise
    _check_ours(cur, column)
    return row


async def _fetch_ours_async(cur: psycopg.AsyncCursor[Any], column: bytes) -> Any:
    """_fetch_ours for an async cursor."""
    if cur.pgresult is not None:
        _check_ours(cur, column)
        return await cur.fetchone()
    try:
        row = await cur.fetchone()
    except psycopg.ProgrammingError as exc:
        if exc.sqlstate is None:
            _check_ours(cur, column)
        raise
    _check_ours(cur, column)
    return row


def enqueue_job(conn: SyncConn, params: dict[str, Any]) -> int:
    query, values = _single_insert(params)
    # A try block, not the _payload_limit context manager: one enqueue is a few dozen
    # microseconds of Python, and the generator-based manager cost about 5 of them. The
    # fetch inside it: in pipeline mode, the statement's error comes with it.
    cur = psycopg.Cursor(conn, row_factory=tuple_row)
    try:
        cur.execute(query, values)
        row = _fetch_ours(cur, b"pgqueue_job_id")
    except psycopg.errors.ProgramLimitExceeded as exc:
        raise _too_large(exc) from exc
    except psycopg.Error as exc:
        _hint_schema(exc)
        raise
    assert row is not None
    return int(row[0])


async def enqueue_job_async(conn: AsyncConn, params: dict[str, Any]) -> int:
    query, values = _single_insert(params)
    try:
        cur = await psycopg.AsyncCursor(conn, row_factory=tuple_row).execute(query, values)
        row = await _fetch_ours_async(cur, b"pgqueue_job_id")
    except psycopg.errors.ProgramLimitExceeded as exc:
        raise _too_large(exc) from exc
    except psycopg.Error as exc:
        _hint_schema(exc)
        raise
    assert row is not None
    return int(row[0])


def enqueue_jobs(conn: SyncConn, params: dict[str, Any]) -> list[int]:
    with psycopg.Cursor(conn, row_factory=tuple_row) as cur, _payload_limit():
        cur.execute(QUERIES["enqueue_jobs"], params)
        row = _fetch_ours(cur, b"pgqueue_job_ids")
    assert row is not None
    return [int(i) for i in row[0]]


def _copy_query(defaults: bool) -> str:
    return "copy_jobs_with_defaults" if defaults else "copy_jobs"


def _in_transaction(conn: SyncConn | AsyncConn) -> bool:
    return conn.info.transaction_status != pq.TransactionStatus.IDLE


def copy_jobs(
    conn: SyncConn,
    rows: Iterable[tuple[Any, ...]],
    count: int,
    *,
    checked_first: bool,
    defaults: bool = False,
) -> list[int]:
    """COPY ``count`` rows of (task, args_json, queue, priority, run_at, max_attempts),
    or of (task, args_json, queue) with ``defaults`` (copy_jobs_with_defaults); ids in
    order. Rows that are checked as they are produced (not ``checked_first``) may
    raise half-way: the COPY then fails, inside a savepoint when the caller is in a
    transaction (which goes on), else with nothing of the caller's to keep, and the
    connection is left as it was found."""
    streaming, caller_in_transaction = not checked_first, _in_transaction(conn)
    with psycopg.Cursor(conn, row_factory=tuple_row) as cur, _payload_limit():
        try:
            # In the caller's transaction if there is one (this statement may begin it).
            cur.execute(QUERIES["reserve_job_ids"], {"n": count})
            fetched = _fetch_ours(cur, b"pgqueue_job_ids")
            assert fetched is not None
            ids: list[int] = fetched[0]
            with (
                conn.transaction()
                if streaming and caller_in_transaction
                else contextlib.nullcontext(),
                cur.copy(QUERIES[_copy_query(defaults)]) as copy,
            ):
                for job_id, row in zip(ids, rows, strict=True):
                    copy.write_row((job_id, *row))
        except BaseException:
            if streaming and not caller_in_transaction and _in_transaction(conn):
                conn.rollback()  # the transaction our statements began, nothing else
            raise
    return ids


async def copy_jobs_async(
    conn: AsyncConn,
    rows: Iterable[tuple[Any, ...]],
    count: int,
    *,
    checked_first: bool,
    defaults: bool = False,
) -> list[int]:
    streaming, caller_in_transaction = not checked_first, _in_transaction(conn)
    async with psycopg.AsyncCursor(conn, row_factory=tuple_row) as cur:
        with _payload_limit():
            try:
                await cur.execute(QUERIES["reserve_job_ids"], {"n": count})
                fetched = await _fetch_ours_async(cur, b"pgqueue_job_ids")
                assert fetched is not None
                ids: list[int] = fetched[0]
                async with (
                    conn.transaction()
                    if streaming and caller_in_transaction
                    else contextlib.nullcontext(),
                    cur.copy(QUERIES[_copy_query(defaults)]) as copy,
                ):
                    for job_id, row in zip(ids, rows, strict=True):
                        await copy.write_row((job_id, *row))
            except BaseException:
                if streaming and not caller_in_transaction and _in_transaction(conn):
                    await conn.rollback()
                raise
    return ids


async def enqueue_jobs_async(conn: AsyncConn, params: dict[str, Any]) -> list[int]:
    async with psycopg.AsyncCursor(conn, row_factory=tuple_row) as cur:
        with _payload_limit():
            await cur.execute(QUERIES["enqueue_jobs"], params)
            row = await _fetch_ours_async(cur, b"pgqueue_job_ids")
    assert row is not None
    return [int(i) for i in row[0]]


# --- admin ----------------------------------------------------------------------------------


def job_status(conn: SyncConn, *, job_id: int, with_args: bool = False) -> JobStatus | None:
    """One job from either table; with its args (decoded JSON, UndecodableArgs where
    Python cannot) only if ``with_args``."""
    rows = _fetch(conn, "job_status", {"id": job_id, "with_args": with_args})
    return _job_status(rows[0], with_args) if rows else None


async def job_status_async(
    conn: AsyncConn, *, job_id: int, with_args: bool = False
) -> JobStatus | None:
    rows = await _fetch_async(conn, "job_status", {"id": job_id, "with_args": with_args})
    return _job_status(rows[0], with_args) if rows else None


def _job_status(r: Row, with_args: bool) -> JobStatus:
    return JobStatus(
        id=r["id"],
        queue=r["queue"],
        task=r["task"],
        state=JobState(r["state"]),
        attempts=r["attempts"],
        max_attempts=r["max_attempts"],
        priority=r["priority"],
        run_at=r["run_at"],
        created_at=r["created_at"],
        attempted_at=r["attempted_at"],
        finished_at=r["finished_at"],
        lease_expires_at=r["lease_expires_at"],
        leased_by=r["leased_by"],
        idempotency_key=r["idempotency_key"],
        errors=_json_list(r["errors"]),
        history=_json_list(r["history"]),
        cancel_requested_at=r["cancel_requested_at"],
        dead_reason=r["dead_reason"],
        rescued=r["rescued"],
        args=_lenient_json_loads(r["args"]) if with_args else None,
        original_id=r["original_id"],
    )


def _json_list(value: Any) -> list[Any]:
    """A job's ``errors`` or ``history``: pgqueue writes arrays, but a plain SQL write may
    have left any JSON there, kept as the one entry of the list (not iterated: a string
    became its characters, a number a TypeError); SQL NULL is no entry."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def schema_ready(conn: SyncConn) -> bool:
    rows = _fetch(conn, "schema_ready", {})
    return bool(rows and rows[0]["ready"])


def set_statement_timeout(conn: SyncConn, seconds: float) -> None:
    """From here to the end of the current transaction, a statement running (or waiting
    for a lock) longer than ``seconds`` fails; nothing is left on the session."""
    conn.execute(
        QUERIES["set_statement_timeout"], {"timeout": f"{max(1, round(seconds * 1000))}ms"}
    )


def queue_stats(
    conn: SyncConn, *, timeout_seconds: float | None = None, with_finished: bool = True
) -> list[Row]:
    """The per-queue stats; with ``timeout_seconds``, the query fails past it (a scrape
    must answer, not wait behind a lock on pgqueue.jobs). Its settings are the
    transaction's, which this opens (a savepoint inside the caller's): nothing is left
    on the session, which a PgBouncer in transaction pooling mode would pass on. Without
    ``with_finished``, ``finished_last_minute`` is None (the metrics' gauges: see the
    query)."""
    with conn.transaction():
        if timeout_seconds is not None:
            set_statement_timeout(conn, timeout_seconds)
        conn.execute(QUERIES["disable_jit"])
        return _fetch(conn, "queue_stats", {"with_finished": with_finished})


# The fields of a queue_stats row: a stored snapshot lacking one (written by another
# version of pgqueue) is not used.
_QUEUE_STATS_FIELDS = frozenset(
    ("queue", "ready", "scheduled", "running", "oldest_ready_age_seconds",
     "finished_last_minute", "dead", "paused")
)  # fmt: skip


def _stored_queue_stats(conn: SyncConn, max_age: float) -> tuple[list[Row], float] | None:
    found = _fetch(conn, "recent_queue_stats", {"max_age": max_age})
    if not found:
        return None
    queues = found[0]["queues"]
    if not isinstance(queues, list) or not all(
        isinstance(q, dict) and q.keys() >= _QUEUE_STATS_FIELDS for q in queues
    ):
        return None
    return queues, max(0.0, float(found[0]["age_seconds"]))


class QueueStats(NamedTuple):
    rows: list[Row]
    # Seconds since the rows were counted (by this process or another).
    age: float
    # Why they could not be shared (pgqueue.queue_stats_snapshot missing, or this role
    # lacks its grants): counted here alone. None when shared.
    unshared: str | None


def shared_queue_stats(conn: SyncConn, *, max_age: float, timeout_seconds: float) -> QueueStats:
    """queue_stats' rows without their count of jobs finished in the last minute (the
    metrics' gauges do not use it), counted at most once per ``max_age`` for all the
    processes that ask (migration 0022): the stored counts if younger; otherwise this
    process waits for the right to count (another may be counting: its result is then
    read), counts and stores them. All of it, the wait included, fails past
    ``timeout_seconds`` (a scrape must answer), and so does every later statement of the
    caller's transaction. Without the table or its grants (a database not migrated yet,
    a role not granted 0022's), the rows are counted here and not shared."""
    deadline = time.monotonic() + timeout_seconds
    with conn.transaction():
        set_statement_timeout(conn, timeout_seconds)
        try:
            with conn.transaction():
                stored = _stored_queue_stats(conn, max_age)
                if stored is None:
                    conn.execute(QUERIES["lock_queue_stats"])
                    stored = _stored_queue_stats(conn, max_age)
        except (psycopg.errors.UndefinedTable, psycopg.errors.InsufficientPrivilege) as exc:
            return QueueStats(queue_stats(conn, with_finished=False), 0.0, first_line(exc))
        if stored is not None:
            return QueueStats(*stored, None)
        # The count gets what the wait for the lock left of the timeout, not a timeout of
        # its own: waiting out another process's count, then counting, took twice it.
        set_statement_timeout(conn, max(0.001, deadline - time.monotonic()))
        rows = queue_stats(conn, with_finished=False)
        try:
            with conn.transaction():
                conn.execute(QUERIES["save_queue_stats"], {"queues": Jsonb(rows)})
        except psycopg.errors.InsufficientPrivilege as exc:
            return QueueStats(rows, 0.0, first_line(exc))
        return QueueStats(rows, 0.0, None)


def queue_finished_counts(conn: SyncConn) -> dict[str, tuple[int, int]]:
    """{queue: (succeeded, cancelled)} of the jobs still retained; reads every retained
    finished row (``pgqueue stats``, not the metrics)."""
    return {
        r["queue"]: (r["succeeded"], r["cancelled"])
        for r in _fetch(conn, "queue_finished_counts", {})
    }


def notify_queue_usage(conn: SyncConn) -> float:
    return float(_fetch(conn, "notify_queue_usage", {})[0]["usage"])


def notify_limit_ignored(conn: SyncConn) -> list[tuple[str, str]]:
    """Where pgqueue.notify_max_queue_usage is set but unreadable (it then counts as
    unset): (where, value) for this session and each ALTER DATABASE / ALTER ROLE setting
    that applies in this database; the session's is left out when one of those is its
    source."""
    return _ignored_limits(_fetch(conn, "notify_limit_ignored", {}))


async def notify_limit_ignored_async(conn: AsyncConn) -> list[tuple[str, str]]:
    """As notify_limit_ignored, on a worker's connection."""
    return _ignored_limits(await _fetch_async(conn, "notify_limit_ignored", {}))


def _ignored_limits(rows: list[Row]) -> list[tuple[str, str]]:
    found = [(str(r["source"]), str(r["value"])) for r in rows]
    set_elsewhere = {value for source, value in found if source != "this session"}
    return [(s, v) for s, v in found if s != "this session" or v not in set_elsewhere]


def list_workers(conn: SyncConn) -> list[Row]:
    return _fetch(conn, "list_workers", {})


def list_jobs(
    conn: SyncConn,
    *,
    state: str | None,
    queue: str | None,
    task: str | None,
    limit: int,
    before: int | None = None,
) -> list[Row]:
    params = {"queue": queue, "task": task, "limit": limit, "before": before}
    if state == JobState.RUNNING.value:
        return _fetch(conn, "list_running_jobs", params)
    return _fetch(conn, "list_jobs", params | {"state": state})


def list_dead(
    conn: SyncConn, *, queue: str | None, task: str | None, limit: int, reason: str | None = None
) -> list[Row]:
    return _fetch(
        conn, "list_dead", {"queue": queue, "task": task, "reason": reason, "limit": limit}
    )


def get_dead(conn: SyncConn, *, job_id: int) -> Row | None:
    """One dead job; args Python cannot decode come back as UndecodableArgs."""
    rows = _fetch(conn, "get_dead", {"id": job_id})
    if not rows:
        return None
    row = rows[0]
    row["args"] = _lenient_json_loads(row["args"])
    return row


def dead_ids_by_original(conn: SyncConn, *, ids: Sequence[int]) -> dict[int, list[int]]:
    """{id: the dead ids of the jobs stored under a new id that had it} (migration 0023)."""
    rows = _fetch(conn, "dead_ids_by_original", {"ids": list(ids)})
    return {row["original_id"]: row["dead_ids"] for row in rows}


class RevivedDead(NamedTuple):
    """A dead job `dead retry` picked: see retry_dead_jobs."""

    dead_id: int
    job_id: int | None
    dropped_key: str | None


def retry_dead(
    conn: SyncConn,
    *,
    ids: Sequence[int] | None,
    queue: str | None,
    task: str | None,
    limit: int,
    after_id: int | None = None,
    upto_id: int | None = None,
    reason: str | None = None,
) -> list[int]:
    """The dead ids of the jobs revived (retry_dead_jobs without their new ids)."""
    picked = retry_dead_jobs(
        conn, ids=ids, queue=queue, task=task, limit=limit, after_id=after_id, upto_id=upto_id,
        reason=reason,
    )  # fmt: skip
    return [p.dead_id for p in picked if p.job_id is not None]


def retry_dead_jobs(
    conn: SyncConn,
    *,
    ids: Sequence[int] | None,
    queue: str | None,
    task: str | None,
    limit: int,
    after_id: int | None = None,
    upto_id: int | None = None,
    reason: str | None = None,
) -> list[RevivedDead]:
    """Revives dead jobs; (dead id, id in pgqueue.jobs, key dropped) of each job picked,
    in dead id order. The two ids differ where pgqueue.jobs already held the dead id; the
    job id is None for a job left dead (the sequence's next id was taken too). The key is
    the idempotency key a revived job came back without (another job holds it)."""
    rows = _fetch(
        conn,
        "retry_dead",
        {
            "ids": list(ids) if ids is not None else None,
            "queue": queue,
            "task": task,
            "reason": reason,
            "limit": limit,
            "after_id": after_id,
            "upto_id": upto_id,
        },
    )
    return [RevivedDead(r["id"], r["job_id"], r["dropped_key"]) for r in rows]


def purge_dead(
    conn: SyncConn,
    *,
    older_than_seconds: float | None,
    queue: str | None,
    task: str | None,
    limit: int,
    after_id: int | None = None,
    upto_id: int | None = None,
    reason: str | None = None,
) -> list[int]:
    """Deletes dead jobs for good; returns their ids."""
    rows = _fetch(
        conn,
        "purge_dead",
        {
            "older_than_seconds": older_than_seconds,
            "queue": queue,
            "task": task,
            "reason": reason,
            "limit": limit,
            "after_id": after_id,
            "upto_id": upto_id,
        },
    )
    return [r["id"] for r in rows]


def max_dead_id(conn: SyncConn) -> int | None:
    (row,) = _fetch(conn, "max_dead_id", {})
    top: int | None = row["id"]
    return top


def cancel_job(conn: SyncConn, *, job_id: int) -> str | None:
    """Cancel or flag a job; returns its state afterwards, None if it was neither queued
    nor running."""
    rows = _fetch(conn, "cancel_job", {"id": job_id})
    return rows[0]["state"] if rows else None


async def cancel_job_async(conn: AsyncConn, *, job_id: int) -> str | None:
    rows = await _fetch_async(conn, "cancel_job", {"id": job_id})
    return rows[0]["state"] if rows else None


def count_dead(
    conn: SyncConn,
    *,
    older_than_seconds: float | None,
    queue: str | None,
    task: str | None,
    reason: str | None = None,
) -> int:
    params = {
        "older_than_seconds": older_than_seconds,
        "queue": queue,
        "task": task,
        "reason": reason,
    }
    return int(_fetch(conn, "count_dead", params)[0]["n"])


def run_now(conn: SyncConn, *, job_ids: Sequence[int]) -> dict[int, str | None]:
    """Make these queued jobs due now; returns the ids that were queued, each with its
    queue's name if that queue is paused (None otherwise)."""
    rows = _fetch(conn, "run_now", {"ids": list(job_ids)})
    return {r["id"]: r["queue"] if r["paused"] else None for r in rows}


def pause_queue(conn: SyncConn, *, name: str) -> datetime | None:
    """Pause a queue; None if this paused it, else when it was paused already."""
    (row,) = _fetch(conn, "pause_queue", {"name": name})
    return None if row["newly"] else row["paused_at"]


def resume_queue(conn: SyncConn, *, name: str) -> bool:
    """Resume a paused queue; False if it was not paused."""
    return bool(_fetch(conn, "resume_queue", {"name": name}))


def queue_in_use(conn: SyncConn, *, name: str) -> bool:
    rows = _fetch(conn, "queue_in_use", {"name": name})
    return bool(rows[0]["in_use"])


# --- migrations ---------------------------------------------------------------------------


def try_lock_migrations(conn: SyncConn) -> tuple[bool, int | None]:
    """Take the migrators' lock if it is free: (True, None); else (False, the backend
    pid of the migrator holding it, if it can be seen)."""
    row = conn.execute(QUERIES["try_lock_migrations"]).fetchone()
    assert row is not None
    return bool(row[0]), row[1]


def lock_migrations(conn: SyncConn) -> None:
    conn.execute(QUERIES["lock_migrations"])


def queue_service(conn: SyncConn, *, queue: str) -> Row:
    """Whether ``queue`` is paused, and whether a live worker serves it."""
    (row,) = _fetch(conn, "queue_service", {"queue": queue})
    return row


def lock_holders(conn: SyncConn) -> list[Row]:
    return _fetch(conn, "lock_holders", {})


def update_migration_checksum(conn: SyncConn, *, version: int, checksum: str) -> None:
    conn.execute(QUERIES["update_migration_checksum"], {"version": version, "checksum": checksum})


def unlock_migrations(conn: SyncConn) -> None:
    conn.execute(QUERIES["unlock_migrations"])


def create_migrations_table(conn: SyncConn) -> None:
    conn.execute(QUERIES["create_migrations_table"])


_NEVER_MIGRATED = (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName)


def applied_versions(conn: SyncConn) -> list[int] | None:
    """The applied migrations' versions (autocommit connection): none on a database never
    migrated; None where this role may not read them (a worker role whose grant of 0011
    is missing)."""
    try:
        return [v for (v,) in conn.execute(QUERIES["applied_versions"]).fetchall()]
    except _NEVER_MIGRATED:
        return []
    except psycopg.errors.InsufficientPrivilege:
        return None


def migration_records(conn: SyncConn) -> list[Row]:
    """Every applied migration's version, name, checksum and applied_at (autocommit
    connection); none on a database never migrated."""
    try:
        return _fetch(conn, "migration_records", {})
    except _NEVER_MIGRATED:
        return []


async def applied_versions_async(conn: AsyncConn) -> list[int] | None:
    """As applied_versions, on a worker's connection."""
    try:
        cur = await conn.execute(QUERIES["applied_versions"])
        return [v for (v,) in await cur.fetchall()]
    except _NEVER_MIGRATED:
        return []
    except psycopg.errors.InsufficientPrivilege:
        return None


def run_migration(
    conn: SyncConn,
    *,
    version: int,
    name: str,
    checksum: str,
    sql: str,
    lock_timeout_ms: int = 0,
) -> None:
    """Applies one migration file and records it, in one transaction, its statements
    waiting at most ``lock_timeout_ms`` for each lock (0: without limit)."""
    with conn.transaction():
        conn.execute(
            QUERIES["set_migration_lock_timeout"], {"lock_timeout": f"{int(lock_timeout_ms)}ms"}
        )
        # Migration files ship inside the package; they are the one place where SQL text
        # is not a named query, by design (numbered, reviewed, never edited).
        conn.execute(sql.encode("utf-8"))
        conn.execute(
            QUERIES["record_migration"], {"version": version, "name": name, "checksum": checksum}
        )


# --- pgqueue.testing ----------------------------------------------------------------------


async def drain_outstanding(
    conn: AsyncConn, *, queues: Sequence[str], worker_id: str, with_scheduled: bool
) -> int:
    rows = await _fetch_async(
        conn,
        "drain_outstanding",
        {"queues": list(queues), "worker_id": worker_id, "with_scheduled": with_scheduled},
    )
    return int(rows[0]["n"])


async def drain_schedule_now(conn: AsyncConn, *, queues: Sequence[str]) -> list[str]:
    """The queues in which jobs due later were made due now (each notified)."""
    rows = await _fetch_async(conn, "drain_schedule_now", {"queues": list(queues)})
    return [r["queue"] for r in rows]


async def drain_outcomes(conn: AsyncConn, *, queues: Sequence[str], worker_id: str) -> list[Row]:
    return await _fetch_async(
        conn, "drain_outcomes", {"queues": list(queues), "worker_id": worker_id}
    )
