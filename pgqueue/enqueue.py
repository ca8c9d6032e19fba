"""Enqueue jobs on the caller's connection, so they commit or roll back with its work.

``enqueue`` and ``enqueue_many`` take a sync ``psycopg.Connection`` (and return ids) or
an ``AsyncConnection`` (and return an awaitable). Input is checked before anything is
sent: bad input raises ``ValidationError`` and leaves the caller's transaction intact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from json import encoder as json_encoder
from typing import Any, Required, TypedDict, cast, overload

import psycopg
from psycopg import pq

from pgqueue import store
from pgqueue.config import finite_number
from pgqueue.errors import (
    MAX_DELAY_SECONDS,
    ConfigError,
    PayloadTooLarge,
    SerializationError,
    ValidationError,
)
from pgqueue.registry import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_PRIORITY,
    DEFAULT_QUEUE,
    MAX_NAME_LENGTH,
    MAX_QUEUE_LENGTH,
    TaskOptions,
    check_name,
    known_options,
    plain_int,
)

MAX_IDEMPOTENCY_KEY_LENGTH = 255
# The database's own limit is the setting pgqueue.max_args_bytes (migration 0004). Both
# measure the same thing, the args as Postgres writes them as text (args::text: a space
# after every : and , and numbers written out without exponents), so that args Python
# lets through are not refused by the database, which would abort the caller's
# transaction (_text_size_extra).
DEFAULT_MAX_ARGS_BYTES = 1024 * 1024
# The run_at a worker can read back: Python's datetimes end with the years 1 and 9999,
# and a session's time zone may move a value by a day. Migration 0010 holds the table to
# the same range, for plain SQL inserts too.
EARLIEST_RUN_AT = datetime(1, 1, 2, tzinfo=UTC)
LATEST_RUN_AT = datetime(9999, 12, 30, tzinfo=UTC)


def _getenv(name: str) -> str | None:
    """``os.environ.get(name)``, read per call. Where CPython keeps the environment in a
    dict of bytes (POSIX), that dict is read directly: ``os.environ.get`` of an unset
    variable raises and catches a KeyError inside, about 8,000 machine instructions, a
    twentieth of what one ``enqueue`` costs its caller."""
    data = getattr(os.environ, "_data", None)
    if os.name != "posix" or type(data) is not dict:
        return os.environ.get(name)
    raw = data.get(os.fsencode(name))
    return None if raw is None else os.fsdecode(raw)


def max_args_bytes() -> int:
    """The args size limit in bytes: PGQUEUE_MAX_ARGS_BYTES, else 1 MiB."""
    raw = _getenv("PGQUEUE_MAX_ARGS_BYTES")
    if not raw:
        return DEFAULT_MAX_ARGS_BYTES
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ConfigError(f"PGQUEUE_MAX_ARGS_BYTES must be a positive integer, got {raw!r}")
    return limit


@dataclass(frozen=True, init=False)
class JobSpec:
    """One job for ``enqueue_many``; unset fields take the task's or the global defaults.
    ``args`` None is an empty object, as in ``enqueue``."""

    task: str
    args: Mapping[str, Any] = field(default_factory=dict)
    queue: str | None = None
    priority: int | None = None
    run_at: datetime | None = None
    delay: float | timedelta | None = None
    max_attempts: int | None = None
    idempotency_key: str | None = None

    # Written out (tests/test_enqueue.py checks it against the fields): the generated
    # __init__ of a frozen dataclass sets each field through object.__setattr__, about
    # 3 us per job here against 1 us, a tenth of what a bulk enqueue costs per job.
    def __init__(
        self,
        task: str,
        args: Mapping[str, Any] | None = None,
        queue: str | None = None,
        priority: int | None = None,
        run_at: datetime | None = None,
        delay: float | timedelta | None = None,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        fields = self.__dict__
        fields["task"] = task
        fields["args"] = {} if args is None else args
        fields["queue"] = queue
        fields["priority"] = priority
        fields["run_at"] = run_at
        fields["delay"] = delay
        fields["max_attempts"] = max_attempts
        fields["idempotency_key"] = idempotency_key


# Deeper than this, a worker's JSON decoder may give up (Python's recursion limit is
# 1000 frames; the handler's own code needs some of them too).
MAX_ARGS_DEPTH = 500


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_value(value: Any, depth: int = 0) -> None:
    """Refuse what json.dumps would change silently (non-string keys), what jsonb cannot
    hold (NUL), and nesting a worker could not decode."""
    if depth > MAX_ARGS_DEPTH:
        raise SerializationError(f"args nest deeper than {MAX_ARGS_DEPTH} levels")
    if isinstance(value, str):
        if "\x00" in value:
            raise SerializationError("args must not contain NUL (U+0000) characters")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise SerializationError(
                    f"args keys must be strings, got {type(key).__name__} {key!r}"
                )
            if "\x00" in key:
                raise SerializationError("args must not contain NUL (U+0000) characters")
            _check_value(item, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_value(item, depth + 1)


# One encoder for every job: json.dumps with options builds a new one per call.
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _fast_json_encoder() -> Callable[[Any], str]:
    """``_JSON.encode``, without the per-call set-up. ``JSONEncoder.encode`` builds a new C
    encoder (and a closure) on every call, about 12,000 of the 15,000 machine
    instructions it takes for a small object; this one is built once. It keeps no cycle
    markers: ``_dump_args`` walks every container before encoding and refuses nesting
    deeper than MAX_ARGS_DEPTH, which a cycle always reaches. Falls back to
    ``_JSON.encode`` where the C encoder is missing or gives a different text
    (tests/test_enqueue.py compares the two)."""
    make = getattr(json_encoder, "c_make_encoder", None)
    if make is None:
        return _JSON.encode
    try:
        c_encode = make(
            None,
            _JSON.default,
            json_encoder.encode_basestring,
            None,
            ":",
            ",",
            False,
            False,
            False,
        )
    except TypeError:  # another signature
        return _JSON.encode

    def encode(obj: Any) -> str:
        return "".join(c_encode(obj, 0))

    probe = {"a": [1, -2.5, 'é\x00"', None, True, {"b": 1e300}], "": 2**70}
    try:
        same = encode(probe) == _JSON.encode(probe)
    except Exception:  # any failure means: use the slow path
        same = False
    return encode if same else _JSON.encode


_encode_json = _fast_json_encoder()


# Values _dump_args takes without walking them: everything but containers (a string's
# NUL shows in the JSON text as the escape \u0000, checked there).
_FLAT_TYPES = frozenset({str, int, float, bool, type(None)})


def _dump_args(args: Any, limit: int) -> str:
    if type(args) is not dict:
        if not isinstance(args, Mapping):
            raise SerializationError(
                f"args must be a mapping (a JSON object), got {type(args).__name__}"
            )
        args = dict(args)
    # The common flat object of string keys is not walked; anything else is, whole.
    for key, item in args.items():
        if type(key) is not str or type(item) not in _FLAT_TYPES:
            _check_value(args)
            break
    try:
        text = _encode_json(args)
        # ASCII text is its own UTF-8; anything else is encoded, which also refuses lone
        # surrogates.
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError (lone surrogates) included
        raise SerializationError(f"args are not JSON-serialisable: {exc}") from exc
    if "\\u0000" in text:
        _check_value(args)  # a NUL somewhere, or only a string holding that escape's text
    # The text form is at most twice as long as the compact one, but for floats that
    # Python writes with an exponent (1e+300 is 301 digits there): only then, or near
    # the limit, is it measured.
    if size > limit // 2 or "e+" in text or "e-" in text:
        size += _text_size_extra(args)
        if size > limit:
            raise PayloadTooLarge(
                f"args are {size} bytes (as the database measures them, args::text),"
                f" over the limit of {limit} bytes"
            )
    return text


def _text_size_extra(args: Any) -> int:
    """How many bytes longer Postgres' text form of this JSON value (jsonb::text) is than
    its compact encoding: one space after each ':' and ',', and floats written out in
    full. Strings are escaped alike by both; keys are unique in a dict. Walked with a
    stack of its own, not recursion, so that nesting _check_value allows cannot exhaust
    the caller's; dicts are read through items(), as the encoder reads them."""
    extra = 0
    pending: list[Any] = [args]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            items = list(value.items())
            if items:
                extra += 2 * len(items) - 1
                pending.extend(item for _, item in items)
        elif isinstance(value, list | tuple):
            if value:
                extra += len(value) - 1
                pending.extend(value)
        elif isinstance(value, float):
            text = float.__repr__(value)
            extra += _numeric_text_length(text) - len(text)
    return extra


def _numeric_text_length(text: str) -> int:
    """The length of Postgres' numeric output of a float that Python wrote as ``text``
    (its repr): no exponent, as many decimals as the number has, and no negative zero."""
    mantissa, _, exponent = text.partition("e")
    if not exponent:  # '123.45' is written alike, but for -0.0
        return 3 if text == "-0.0" else len(text)
    # A repr with an exponent has one non-zero digit before its point: d[.ddd]e±XX.
    shift = int(exponent)
    scale = max(len(mantissa.partition(".")[2]) - shift, 0)
    return mantissa.startswith("-") + max(1 + shift, 1) + (1 + scale if scale else 0)


def _priority_and_attempts(
    priority: Any, max_attempts: Any, options: TaskOptions | None
) -> tuple[Any, Any]:
    """The job's priority and max_attempts: its own, else its task's, else the defaults
    (not checked yet)."""
    if priority is None:
        priority = options.priority if options else DEFAULT_PRIORITY
    if max_attempts is None:
        max_attempts = options.max_attempts if options else DEFAULT_MAX_ATTEMPTS
    return priority, max_attempts


def _utc_run_at(run_at: Any) -> datetime:
    """``run_at`` in UTC, or ValidationError. Sent in UTC, the database never has to read
    a UTC offset it cannot parse (seconds and microseconds in it, or more than 15:59)."""
    try:
        aware = isinstance(run_at, datetime) and run_at.utcoffset() is not None
    except (TypeError, ValueError) as exc:  # a tzinfo whose utcoffset() is broken
        raise ValidationError(f"run_at has an unusable time zone: {exc}") from None
    if not aware:
        raise ValidationError("run_at must be a timezone-aware datetime")
    try:
        in_range = EARLIEST_RUN_AT <= run_at <= LATEST_RUN_AT
    except OverflowError:  # its UTC offset takes it past year 1 or 9999
        in_range = False
    if not in_range:
        raise ValidationError(
            f"run_at must lie between {EARLIEST_RUN_AT.date()} and"
            f" {LATEST_RUN_AT.date()} (UTC), got {run_at!r}"
        )
    utc: datetime = run_at.astimezone(UTC)
    return utc


def _prepare(spec: JobSpec, max_bytes: int | None = None) -> dict[str, Any]:
    return _prepare_fields(
        spec.task,
        spec.args,
        spec.queue,
        spec.priority,
        spec.run_at,
        spec.delay,
        spec.max_attempts,
        spec.idempotency_key,
        max_bytes,
    )


def _prepare_fields(
    task: Any,
    args: Any,
    queue: Any,
    priority: Any,
    run_at: Any,
    delay: Any,
    max_attempts: Any,
    key: Any,
    max_bytes: int | None,
) -> dict[str, Any]:
    """Check one job's fields (a JobSpec's, or enqueue's arguments) and resolve its
    defaults: the statement parameters, or ValidationError."""
    try:
        task = check_name("task", task, MAX_NAME_LENGTH)
        options = known_options(task)
        queue = check_name(
            "queue",
            queue if queue is not None else (options.queue if options else DEFAULT_QUEUE),
            MAX_QUEUE_LENGTH,
        )
    except ConfigError as exc:
        raise ValidationError(str(exc)) from None
    priority, max_attempts = _priority_and_attempts(priority, max_attempts, options)
    if type(priority) is not int and not plain_int(priority):
        raise ValidationError(f"priority must be an integer in -32768..32767, got {priority!r}")
    if not -32768 <= priority <= 32767:
        raise ValidationError(f"priority must be an integer in -32768..32767, got {priority!r}")
    if type(max_attempts) is not int and not plain_int(max_attempts):
        raise ValidationError(f"max_attempts must be an integer, got {max_attempts!r}")
    if not 1 <= max_attempts <= 2**31 - 1:
        raise ValidationError(
            f"max_attempts must be an integer in 1..{2**31 - 1}, got {max_attempts}"
        )
    if run_at is not None:
        if delay is not None:
            raise ValidationError("give run_at or delay, not both")
        run_at = _utc_run_at(run_at)
    # None: no delay. Such a job is due at the transaction's now(), as the column's
    # default and COPY make it; a delay counts from the statement (enqueue.sql).
    delay_seconds: float | None = None
    if delay is not None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
        if not finite_number(seconds):
            raise ValidationError(f"delay must be a finite number of seconds, got {delay!r}")
        if not -MAX_DELAY_SECONDS <= seconds <= MAX_DELAY_SECONDS:
            raise ValidationError(
                f"delay must be within ±{MAX_DELAY_SECONDS:.0f} seconds (ten years), got {delay!r}"
            )
        delay_seconds = float(seconds) or None
    if key is not None and (
        not isinstance(key, str)
        or not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH
        or "\x00" in key
        or not _utf8(key)
    ):
        raise ValidationError(
            f"idempotency_key must be a string of 1..{MAX_IDEMPOTENCY_KEY_LENGTH} characters"
            " of valid UTF-8 without NUL"
        )
    return {
        "task": task,
        "args": _dump_args(
            {} if args is None else args,
            max_bytes if max_bytes is not None else max_args_bytes(),
        ),
        "queue": queue,
        "priority": priority,
        "run_at": run_at,
        "delay_seconds": delay_seconds,
        "max_attempts": max_attempts,
        "idempotency_key": key,
    }


# From this many jobs, enqueue_many checks and encodes each job while the COPY streams
# (a bad one ends the COPY inside a savepoint) instead of all of them before sending, so
# that Python and Postgres work at once: 50,000 jobs in one call went from about 42k to
# 50k jobs/s. Below it, the savepoint's two round trips would cost more than that gains.
STREAM_COPY_FROM = 1000


def _copy_rows(specs: Sequence[JobSpec], limit: int, defaults: bool) -> Iterator[tuple[Any, ...]]:
    """COPY rows (task, args JSON, queue, priority, run_at, max_attempts), or only the
    first three with ``defaults`` (see _takes_column_defaults), each checked as it is
    produced. A job that sets nothing but its task, args and queue is resolved as the
    first such job of the same task and queue was (by _prepare), with its own args."""
    resolved: dict[tuple[str, str | None], dict[str, Any]] = {}
    for spec in specs:
        if (
            type(spec.task) is str
            and (spec.queue is None or type(spec.queue) is str)
            and spec.priority is None
            and spec.max_attempts is None
            and spec.run_at is None
            and spec.delay is None
            and spec.idempotency_key is None
        ):
            p = resolved.get((spec.task, spec.queue))
            if p is None:
                p = resolved[(spec.task, spec.queue)] = _prepare(spec, limit)
                args = p["args"]
            else:
                args = _dump_args(spec.args, limit)
        else:
            p = _prepare(spec, limit)
            args = p["args"]
        if defaults:
            yield (p["task"], args, p["queue"])
        else:
            yield (
                p["task"],
                args,
                p["queue"],
                p["priority"],
                p["run_at"] if p["run_at"] is not None else "now",
                p["max_attempts"],
            )


def _psycopg_connection(
    conn: object, caller: str
) -> psycopg.Connection[Any] | psycopg.AsyncConnection[Any]:
    """``conn``, or the psycopg connection a pool or ORM wraps (``driver_connection``: what
    SQLAlchemy's pooled connection and its async adapter hold); otherwise TypeError,
    saying what to pass. Before, another object failed deep inside (``'psycopg2...' has
    no attribute 'pgconn'``, ``'Lock' object does not support the context manager``)."""
    if isinstance(conn, psycopg.Connection | psycopg.AsyncConnection):
        return conn
    inner = getattr(conn, "driver_connection", None)
    if isinstance(inner, psycopg.Connection | psycopg.AsyncConnection):
        return inner
    kind = "None" if conn is None else f"{type(conn).__module__}.{type(conn).__qualname__}"
    raise TypeError(
        f"{caller} takes a psycopg 3 connection (psycopg.Connection or AsyncConnection),"
        f" not {kind}. From SQLAlchemy (a postgresql+psycopg:// URL, not psycopg2), pass"
        " session.connection().connection.driver_connection (async:"
        " (await (await session.connection()).get_raw_connection()).driver_connection);"
        " from Django (psycopg 3 backend), connection.connection inside"
        " transaction.atomic(); from other drivers, call the SQL function pgqueue.enqueue"
        " (README: From an ORM or another driver)"
    )


def _client_encoding(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> str | None:
    """None when the connection's client encoding is UTF-8 (any text can be sent), else
    Python's name for it."""
    return None if store.client_encoding_is_utf8(conn) else conn.info.encoding


def _check_encodable(encoding: str, texts: Iterable[Any]) -> None:
    """SerializationError, before anything is sent, for text the connection's client
    encoding cannot carry (psycopg would raise UnicodeEncodeError half-way, a COPY's
    leaving the caller's transaction aborted), or that Python's codec would send as
    something the server reads differently (_changed_by)."""
    for text in texts:
        if isinstance(text, str):
            try:
                changed = None if text.isascii() else _changed_by(encoding, text)
            except UnicodeEncodeError as exc:
                raise SerializationError(
                    f"{exc.object[exc.start : exc.end]!r} cannot be sent in this connection's"
                    f" client encoding ({encoding}); nothing was enqueued (connect with"
                    " client_encoding=utf8)"
                ) from None
            if changed is not None:
                # The character, not the text: it may be the job's args.
                raise SerializationError(
                    f"{changed!r} would reach the server changed in this connection's client"
                    f" encoding ({encoding}); nothing was enqueued (connect with"
                    " client_encoding=utf8)"
                )


def _changed_by(encoding: str, text: str) -> str | None:
    """The first character of ``text`` that Python's codec for ``encoding`` sends as
    bytes Postgres reads as another text (None if none; UnicodeEncodeError for one it
    cannot send). Its Shift JIS, Shift JIS 2004 and EUC-JP codecs send ``¥`` and ``‾``
    as 0x5C and 0x7E, which the server reads as ``\\`` and ``~`` (a ``¥`` in args became
    a JSON escape; an idempotency key matched another's); its EUC-KR codec sends a
    Hangul syllable outside KS X 1001 as an 8-byte sequence of jamo, which the server
    stores as four characters. Every other codec psycopg maps sends no character other
    than ASCII as bytes below 0x80, nor as longer sequences than the server's table."""
    seen: set[str] = set()
    for char in text:
        if char.isascii() or char in seen:
            continue
        seen.add(char)
        sent = char.encode(encoding)
        if (len(sent) == 1 and sent[0] < 0x80) or (encoding == "euc_kr" and len(sent) > 2):
            return char
    return None


def _encodable_rows(rows: Iterable[tuple[Any, ...]], encoding: str) -> Iterator[tuple[Any, ...]]:
    for row in rows:
        _check_encodable(encoding, row)
        yield row


def _takes_column_defaults(spec: JobSpec) -> bool:
    """Whether the job's priority, max_attempts and run_at are what the columns default
    to (resolved as _prepare resolves them), so that COPY can leave them out."""
    if spec.run_at is not None or type(spec.task) is not str:
        return False
    priority, max_attempts = _priority_and_attempts(
        spec.priority, spec.max_attempts, known_options(spec.task)
    )
    return (
        type(priority) is int
        and priority == DEFAULT_PRIORITY
        and type(max_attempts) is int
        and max_attempts == DEFAULT_MAX_ATTEMPTS
    )


async def _no_ids() -> list[int]:
    return []


def _batch_params(prepared: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "tasks": [p["task"] for p in prepared],
        "args": [p["args"] for p in prepared],
        "queues": [p["queue"] for p in prepared],
        "priorities": [p["priority"] for p in prepared],
        "run_ats": [p["run_at"] for p in prepared],
        "delays": [p["delay_seconds"] for p in prepared],
        "max_attempts": [p["max_attempts"] for p in prepared],
        "idempotency_keys": [p["idempotency_key"] for p in prepared],
    }


@overload
def enqueue(
    conn: psycopg.Connection[Any],
    task: str,
    args: Mapping[str, Any] | None = None,
    *,
    queue: str | None = None,
    priority: int | None = None,
    run_at: datetime | None = None,
    delay: float | timedelta | None = None,
    max_attempts: int | None = None,
    idempotency_key: str | None = None,
) -> int: ...


@overload
def enqueue(
    conn: psycopg.AsyncConnection[Any],
    task: str,
    args: Mapping[str, Any] | None = None,
    *,
    queue: str | None = None,
    priority: int | None = None,
    run_at: datetime | None = None,
    delay: float | timedelta | None = None,
    max_attempts: int | None = None,
    idempotency_key: str | None = None,
) -> Coroutine[Any, Any, int]: ...


def enqueue(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
    task: str,
    args: Mapping[str, Any] | None = None,
    *,
    queue: str | None = None,
    priority: int | None = None,
    run_at: datetime | None = None,
    delay: float | timedelta | None = None,
    max_attempts: int | None = None,
    idempotency_key: str | None = None,
) -> int | Coroutine[Any, Any, int]:
    """Enqueue one job in ``conn``'s current transaction and return its id.

    Defaults come from the task's registration when this process registered it, else
    queue 'default', priority 0, 20 attempts. ``run_at`` (aware datetime) or ``delay``
    (seconds or a timedelta, on the database's clock, from this call rather than from
    the transaction's start) schedule it later. With an ``idempotency_key``
    already held by a retained job, nothing is inserted and that job's id is returned.
    Raises ``ValidationError`` (nothing sent) on bad input, ``TypeError`` for a ``conn``
    that is not a psycopg 3 connection (or an ORM's wrapper of one).
    """
    conn = _psycopg_connection(conn, "enqueue")
    params = _prepare_fields(
        task, args, queue, priority, run_at, delay, max_attempts, idempotency_key, None
    )
    encoding = _client_encoding(conn)
    if encoding is not None:
        _check_encodable(
            encoding, (params["task"], params["args"], params["queue"], params["idempotency_key"])
        )
    if isinstance(conn, psycopg.AsyncConnection):
        return store.enqueue_job_async(conn, params)
    return store.enqueue_job(conn, params)


class JobDict(TypedDict, total=False):
    """One job for ``enqueue_many`` as a mapping: JobSpec's fields, ``task`` required."""

    task: Required[str]
    args: Mapping[str, Any] | None
    queue: str | None
    priority: int | None
    run_at: datetime | None
    delay: float | timedelta | None
    max_attempts: int | None
    idempotency_key: str | None


# What enqueue_many takes for one job (see _spec_from).
JobItem = JobSpec | str | tuple[str] | tuple[str, Mapping[str, Any] | None] | JobDict
_SPEC_FIELDS = frozenset(f.name for f in fields(JobSpec))


def _spec_from(item: object) -> JobSpec:
    """A JobSpec from the other forms enqueue_many takes: a mapping of JobSpec's fields
    (``{"task": ..., "args": ...}``) or a ``(task,)`` / ``(task, args)`` tuple."""
    if isinstance(item, Mapping):
        unknown = sorted(str(key) for key in item if key not in _SPEC_FIELDS)
        if unknown:
            raise ValidationError(
                f"enqueue_many: unknown job field(s) {', '.join(map(repr, unknown))};"
                f" a job takes {', '.join(sorted(_SPEC_FIELDS))} (its args go under"
                " 'args'; enqueue_many takes a list of jobs)"
            )
        if "task" not in item:
            raise ValidationError(
                "enqueue_many: a job given as a mapping needs a 'task' (its args go under"
                " 'args'; enqueue_many takes a list of jobs)"
            )
        return JobSpec(**item)
    if isinstance(item, tuple) and len(item) in (1, 2):
        return JobSpec(*item)
    raise ValidationError(
        "enqueue_many takes JobSpec items (or a task name, a (task, args) tuple, or a"
        f" mapping of JobSpec's fields), got {type(item).__name__}"
    )


@overload
def enqueue_many(
    conn: psycopg.Connection[Any], jobs: Sequence[JobItem] | Iterator[JobItem]
) -> list[int]: ...


@overload
def enqueue_many(
    conn: psycopg.AsyncConnection[Any], jobs: Sequence[JobItem] | Iterator[JobItem]
) -> Coroutine[Any, Any, list[int]]: ...


def enqueue_many(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
    jobs: Sequence[JobItem] | Iterator[JobItem],
) -> list[int] | Coroutine[Any, Any, list[int]]:
    """Enqueue many jobs in one call, a few round trips whatever their number (by COPY:
    the ids, the COPY, its end; a savepoint around large ones); returns their ids in
    input order.

    Each item is a ``JobSpec``, a bare task name, a ``(task, args)`` tuple or a mapping
    of JobSpec's fields (``{"task": "emails.send", "args": {...}, "queue": ...}``). One
    item that fails the checks raises ``ValidationError`` and enqueues none; the caller's
    transaction stays usable (an error from the database itself aborts it, as any failed
    statement does). Batches without idempotency keys or delays go in by COPY; large ones
    are checked while they stream, so that Python and Postgres work at the same time.
    ``conn`` as for ``enqueue``.
    """
    conn = _psycopg_connection(conn, "enqueue_many")
    if isinstance(jobs, str | bytes | Mapping):
        raise ValidationError(
            f"enqueue_many takes a sequence of JobSpec items, got {type(jobs).__name__}"
        )
    items = [JobSpec(task=j) if isinstance(j, str) else j for j in jobs]
    specs = cast(list[JobSpec], items)
    for item in items:
        if not isinstance(item, JobSpec):
            specs = [s if isinstance(s, JobSpec) else _spec_from(s) for s in items]
            break
    if not specs:
        # Nothing to send: no round trip (which would also open a transaction on a
        # connection that is not in autocommit).
        return _no_ids() if isinstance(conn, psycopg.AsyncConnection) else []
    limit = max_args_bytes()
    encoding = _client_encoding(conn)
    # COPY when it can express the batch: no idempotency keys (they need ON CONFLICT) and
    # no delays (they need the database's clock; 'now' below is its transaction time,
    # exactly what the column default gives), and not in pipeline mode (COPY is not
    # allowed there). A delay that is not a number fails in _prepare on either path.
    if (
        specs
        and all(s.idempotency_key is None and not s.delay for s in specs)
        and conn.info.pipeline_status == pq.PipelineStatus.OFF
    ):
        defaults = all(_takes_column_defaults(s) for s in specs)
        rows: Iterable[tuple[Any, ...]] = _copy_rows(specs, limit, defaults)
        if encoding is not None:
            rows = _encodable_rows(rows, encoding)
        checked_first = len(specs) <= STREAM_COPY_FROM
        if checked_first:
            rows = list(rows)
        if isinstance(conn, psycopg.AsyncConnection):
            return store.copy_jobs_async(
                conn, rows, len(specs), checked_first=checked_first, defaults=defaults
            )
        return store.copy_jobs(
            conn, rows, len(specs), checked_first=checked_first, defaults=defaults
        )
    prepared = [_prepare(s, limit) for s in specs]
    if encoding is not None:
        for p in prepared:
            _check_encodable(encoding, (p["task"], p["args"], p["queue"], p["idempotency_key"]))
    params = _batch_params(prepared)
    if isinstance(conn, psycopg.AsyncConnection):
        return store.enqueue_jobs_async(conn, params)
    return store.enqueue_jobs(conn, params)
