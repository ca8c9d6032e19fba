"""Bad input and injection: enqueue fuzzed through every path, against a real Postgres.

Paths: the SQL function ``pgqueue.enqueue``, a plain ``INSERT INTO pgqueue.jobs``, and the
Python API (``enqueue``, ``enqueue_many``). Each fuzzed input must either be stored and
come back to the handler as it went in (read back through ``store.claim_jobs``, the call
a worker makes, and once through a real in-process ``Worker``), or be refused with a
clear error — ``pgqueue.ValidationError`` and its subclasses from Python, a data or
constraint error from SQL — with nothing written.

What "as it went in" means, exactly (jsonb normalisation, found by these tests):
- object key order is not kept (jsonb sorts keys); handlers get keyword arguments, so
  order never reaches them;
- a float whose shortest repr has an exponent of 16 or more (|x| >= 1e16, all of which
  are whole numbers) comes back as the *int* with that decimal expansion: 1e16 ->
  10000000000000000, 1.5e300 -> 15 * 10**299 (not ``int(1.5e300)``, which differs in
  the low digits); ``float(value) == x`` still holds;
- -0.0 comes back as 0.0 (jsonb numbers have no negative zero);
- everything else (strings of any script, astral characters, combining marks, RTL
  controls; ints of any size up to Python's 4300-digit conversion limit; other floats;
  nesting; booleans and null) comes back type-exact.
Refused: NUL (U+0000) anywhere in args (jsonb cannot hold it) or in a name; NaN and
infinities; ints of more than 4300 digits (Python's own limit); names that are empty,
blank or too long; args over the size limit.

The bugs these tests found are kept as strict xfails at the end of the fuzz section.
"""

from __future__ import annotations

import asyncio
import decimal
import json
import math
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pgqueue import (
    JobSpec,
    PayloadTooLarge,
    Registry,
    SerializationError,
    ValidationError,
    Worker,
    WorkerConfig,
    current_job,
    enqueue,
    enqueue_many,
    store,
)
from pgqueue.enqueue import max_args_bytes
from pgqueue.models import UndecodableArgs
from tests.conftest import BIN, ROOT, scalar

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- strategies -----------------------------------------------------------------------------

# Characters that tend to break things: RTL and bidi controls, combining marks, astral
# planes, zero-width and odd spaces, quotes, escapes, placeholders, NUL.
SPECIAL = [
    "\u202e", "\u200f", "\u2067", "\u0301", "e\u0301", "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "\U0001f600", "\U0001f469\u200d\U0001f4bb", "\U00010348", "\U0010fffd", "\ufeff", "\u200b",
    "\u3000", "\xa0", "\x85", "\u2028", "\x1c", "\x0b", "\r\n", "\t", " ", "\\", "'", '"',
    "%s", "%(task)s", "$1", "$$", "{}", "\\u0000", "\x00", "\ud7ff", "\ue000", "\uffff",
]  # fmt: skip
CHARS = st.characters(exclude_categories=("Cs",))  # every code point but surrogates
TEXT = st.one_of(
    st.text(CHARS, max_size=30),
    st.lists(st.sampled_from([*SPECIAL, "a", "b", "Z"]), max_size=12).map("".join),
)
NAMES = st.one_of(
    TEXT,
    st.text(CHARS, min_size=120, max_size=140),  # around the queue limit (128)
    st.text(CHARS, min_size=250, max_size=260),  # around the task limit (255)
    st.sampled_from(["", " ", "\t\n", "\u3000", "\xa0", "\x1c", "\u2028 ", "x" * 255, "x" * 256]),
    # Padded at one end, with white space Postgres' \s may not know.
    st.sampled_from([" q", "q\n", "q\xa0", "\x85q", "q\u202f", "\x1fq", "q\u3000", "q\u200b"]),
)
BIG_INTS = st.one_of(
    st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**30, -(10**40)]),
    # 4300 and 4301 digits: either side of Python's int-to-text limit.
    st.sampled_from([4299, 4300]).map(lambda e: 10**e),
)
SPECIAL_FLOATS = st.sampled_from(
    [0.0, -0.0, 1e16, 9999999999999998.0, 1.5e300, 1e308, 5e-324, 1e-5, 0.1, 2.0**53 + 2]
)
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    BIG_INTS,
    st.floats(),  # nan and infinities included
    SPECIAL_FLOATS,
    TEXT,
)
JSON = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(TEXT, children, max_size=5)
    ),
    max_leaves=25,
)


def _nest(depth: int, leaf: Any) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


DEEP = st.builds(_nest, st.integers(1, 300), LEAVES)
LARGE = st.one_of(
    st.integers(0, 4000).map(lambda n: list(range(n))),
    # 10 bytes of UTF-8 per repetition: either side of the 1 MiB limit.
    st.integers(0, 120_000).map(lambda n: "x\u00e9\U0001f600\u202e" * n),
    # Small to send, but over 1 MiB once jsonb spells the numbers out.
    st.integers(0, 4000).map(lambda n: {f"k{i}": 1.5e300 for i in range(n)}),
)
ARGS = st.one_of(
    st.dictionaries(TEXT, JSON, max_size=6),
    st.dictionaries(TEXT, st.one_of(DEEP, LARGE), min_size=1, max_size=2),
)


# --- the oracle -----------------------------------------------------------------------------


def strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings_in(k)
            yield from strings_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings_in(v)


def numbers_in(value: Any) -> Iterator[int | float]:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from numbers_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers_in(v)


def has_nul(value: Any) -> bool:
    return any("\x00" in s for s in strings_in(value))


def has_non_finite(value: Any) -> bool:
    return any(isinstance(n, float) and not math.isfinite(n) for n in numbers_in(value))


def has_huge_int(value: Any) -> bool:
    """Ints Python itself will not turn into text (4300 digits; sys.int_info)."""
    return any(isinstance(n, int) and abs(n) >= 10**4300 for n in numbers_in(value))


def normalised(value: Any) -> Any:
    """What jsonb gives back for ``value``: see the module docstring."""
    if isinstance(value, float):
        if value == 0:
            return 0.0
        if abs(value) >= 1e16:
            return int(decimal.Decimal(repr(value)))
        return value
    if isinstance(value, dict):
        return {k: normalised(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalised(v) for v in value]
    return value


def canon(value: Any) -> Any:
    """A type-exact comparison key: True != 1, 1.0 != 1, 0.0 != -0.0."""
    if isinstance(value, dict):
        return ("dict", sorted((k, canon(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("list", [canon(v) for v in value])
    if isinstance(value, float):
        return ("float", repr(value))
    return (type(value).__name__, value)


def assert_same(got: Any, sent: Any) -> None:
    expected = normalised(sent)
    if canon(got) != canon(expected):  # pragma: no cover - the failure message
        raise AssertionError(f"handler would get {got!r:.300}, sent {sent!r:.300}")


def py_name_ok(value: str, limit: int, *, queue: bool = False) -> bool:
    """The Python API's documented rule for task and queue names (a queue name is not
    padded with white space and has no comma: `--queues` strips the names it is given
    and splits on commas)."""
    if queue and (value != value.strip() or "," in value):
        return False
    return bool(value.strip()) and len(value) <= limit and "\x00" not in value


# --- fixtures -------------------------------------------------------------------------------


class Db:
    """One sync connection for producers and checks, one async connection (on its own
    event loop) for the worker-side claim."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.runner = asyncio.Runner()
        self.aconn = self.runner.run(psycopg.AsyncConnection.connect(dsn, autocommit=True))
        # What the worker's pool does to each of its connections.
        self.runner.run(store.configure_worker_connection(self.aconn))

    def close(self) -> None:
        self.runner.run(self.aconn.close())
        self.runner.close()
        self.conn.close()

    def reset(self) -> None:
        # DELETE, not TRUNCATE: far cheaper on tables this small, once per example.
        self.conn.execute("DELETE FROM pgqueue.jobs")
        self.conn.execute("DELETE FROM pgqueue.dead_jobs")
        self.conn.execute("DELETE FROM pgqueue.queues")

    def count(self) -> int:
        return int(scalar(self.conn, "SELECT count(*) FROM pgqueue.jobs"))

    def claim(self, queue: str) -> list[Any]:
        jobs: list[Any] = self.runner.run(
            store.claim_jobs(
                self.aconn, queues=[queue], limit=100, worker_id="fuzz", lease_seconds=60
            )
        )
        return jobs

    def pg_name_ok(self, value: str, limit: int) -> bool:
        """The schema's CHECK for names (char_length 1..limit, not all \\s), by the server."""
        return bool(
            scalar(
                self.conn,
                "SELECT char_length(%(v)s) BETWEEN 1 AND %(n)s AND %(v)s !~ '^\\s*$'",
                {"v": value, "n": limit},
            )
        )


@pytest.fixture
def db(dsn: str) -> Iterator[Db]:
    d = Db(dsn)
    try:
        yield d
    finally:
        d.close()


SQL_REFUSALS = (psycopg.errors.DataError, psycopg.errors.IntegrityError)


def check_sql_path(db: Db, task: str, queue: str, args: dict[str, Any], sql: str, ascii_: bool):
    """Enqueue through SQL text with the args as JSON text; check the outcome."""
    assume(not has_huge_int(args))  # Python cannot write them as JSON text at all
    db.reset()
    text = json.dumps(args, ensure_ascii=ascii_)  # NaN/Infinity written as JS literals
    # Every reason to refuse this input; the server reports whichever it meets first.
    refusals: list[type[BaseException]] = []
    if "\x00" in task or "\x00" in queue:
        refusals.append(psycopg.DataError)  # psycopg will not send NUL in text: nothing sent
    elif (
        not db.pg_name_ok(task, 255)
        or not db.pg_name_ok(queue, 128)
        # Migration 0013: a queue name is not padded, white space as Python has it;
        # 0016: nor has it a comma; 0025: a task name is not white space alone.
        or queue != queue.strip()
        or not task.strip()
        or "," in queue
    ):
        refusals.append(psycopg.errors.CheckViolation)
    if has_nul(args):
        refusals.append(psycopg.errors.UntranslatableCharacter)  # jsonb cannot hold U+0000
    if has_non_finite(args):
        refusals.append(psycopg.errors.InvalidTextRepresentation)  # NaN is not JSON
    if not refusals:
        # The server measures its own text form of the args (spaces after ':' and ',',
        # numbers spelt out: 1.5e300 is 301 bytes), not the text sent.
        size = scalar(db.conn, "SELECT octet_length(%s::jsonb::text)", (text,))
        if size > max_args_bytes():
            refusals.append(psycopg.errors.ProgramLimitExceeded)
    params = {"task": task, "queue": queue, "args": text}
    if refusals:
        with pytest.raises(psycopg.Error) as info:
            db.conn.execute(sql, params)
        assert isinstance(info.value, tuple(refusals)), (info.value, refusals)
        assert db.count() == 0
        return
    job_id = scalar(db.conn, sql, params)
    (job,) = db.claim(queue)
    assert job.id == job_id
    assert (job.task, job.queue) == (task, queue)
    assert_same(job.args, args)


@FUZZ
@given(task=NAMES, queue=NAMES, args=ARGS, ascii_=st.booleans())
def test_fuzz_sql_function(db, task, queue, args, ascii_):
    check_sql_path(
        db,
        task,
        queue,
        args,
        "SELECT pgqueue.enqueue(%(task)s, %(args)s::jsonb, %(queue)s)",
        ascii_,
    )


@FUZZ
@given(task=NAMES, queue=NAMES, args=ARGS, ascii_=st.booleans())
def test_fuzz_plain_insert(db, task, queue, args, ascii_):
    check_sql_path(
        db,
        task,
        queue,
        args,
        "INSERT INTO pgqueue.jobs (task, queue, args) VALUES (%(task)s, %(queue)s,"
        " %(args)s::jsonb) RETURNING id",
        ascii_,
    )


def server_text_size(db: Db, args: dict[str, Any]) -> int:
    """What the database's size check measures: its own text form of the args (spaces
    after ':' and ',', numbers spelt out: 1.5e300 is 301 bytes)."""
    return scalar(db.conn, "SELECT octet_length(%s::jsonb::text)", (json.dumps(args),))


def py_refusal(db: Db, task: str, queue: str, key: str | None, args: dict[str, Any]) -> type | None:
    if not py_name_ok(task, 255) or not py_name_ok(queue, 128, queue=True):
        return ValidationError
    if key is not None and not (1 <= len(key) <= 255 and "\x00" not in key):
        return ValidationError
    if has_nul(args) or has_non_finite(args) or has_huge_int(args):
        return SerializationError
    # Python measures as the database does, so that it refuses first, sending nothing.
    if server_text_size(db, args) > max_args_bytes():
        return PayloadTooLarge
    return None


def check_refused(db: Db, exc: BaseException, expected: type) -> None:
    assert isinstance(exc, expected), (exc, expected)
    assert str(exc)  # a message, not an empty error
    # Python refuses before a byte is sent: the connection is untouched.
    assert db.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


KEYS = st.one_of(st.none(), TEXT, st.sampled_from(["", "k" * 255, "k" * 256]))


@FUZZ
@given(task=NAMES, queue=NAMES, key=KEYS, args=ARGS)
def test_fuzz_python_enqueue(db, task, queue, key, args):
    db.reset()
    expected = py_refusal(db, task, queue, key, args)
    try:
        job_id = enqueue(db.conn, task, args, queue=queue, idempotency_key=key)
    except ValidationError as exc:
        assert expected is not None, f"refused valid input: {exc}"
        check_refused(db, exc, expected)
        assert db.count() == 0
        return
    assert expected is None, f"accepted input that should be refused ({expected.__name__})"
    (job,) = db.claim(queue)
    assert job.id == job_id
    assert (job.task, job.queue) == (task, queue)
    assert_same(job.args, args)
    if key is not None:
        assert scalar(db.conn, "SELECT idempotency_key FROM pgqueue.jobs") == key


@FUZZ
@given(
    specs=st.lists(
        st.fixed_dictionaries({"task": NAMES, "queue": NAMES, "key": KEYS, "args": ARGS}),
        min_size=1,
        max_size=4,
    )
)
def test_fuzz_python_enqueue_many(db, specs):
    db.reset()
    keys = [s["key"] for s in specs if s["key"] is not None]
    assume(len(keys) == len(set(keys)))  # a repeated key returns its holder: not this test
    refusals = [py_refusal(db, s["task"], s["queue"], s["key"], s["args"]) for s in specs]
    expected = next((r for r in refusals if r is not None), None)
    try:
        ids = enqueue_many(
            db.conn,
            [
                JobSpec(s["task"], s["args"], queue=s["queue"], idempotency_key=s["key"])
                for s in specs
            ],
        )
    except ValidationError as exc:
        assert expected is not None, f"refused a valid batch: {exc}"
        # The first bad item (in order) names the error.
        check_refused(db, exc, expected)
        assert db.count() == 0  # one bad item: none enqueued
        return
    assert expected is None, "accepted a batch with a bad item"
    assert len(ids) == len(set(ids)) == len(specs)
    claimed = {}
    for queue in {s["queue"] for s in specs}:
        claimed.update({j.id: j for j in db.claim(queue)})
    assert set(claimed) == set(ids)
    for job_id, spec in zip(ids, specs, strict=True):
        job = claimed[job_id]
        assert (job.task, job.queue) == (spec["task"], spec["queue"])
        assert_same(job.args, spec["args"])


# --- end to end: a real Worker runs fuzzed jobs ---------------------------------------------

# Inputs every path accepts, built rather than filtered (filtering would discard most).
GOOD_TEXT = TEXT.map(lambda s: s.replace("\x00", ""))
GOOD_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    SPECIAL_FLOATS,
    GOOD_TEXT,
)
GOOD_JSON = st.recursive(
    GOOD_LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(GOOD_TEXT, children, max_size=5)
    ),
    max_leaves=25,
)
GOOD_ARGS = st.dictionaries(
    GOOD_TEXT,
    st.one_of(
        GOOD_JSON,
        st.builds(_nest, st.integers(1, 300), GOOD_LEAVES),
        st.integers(0, 20_000).map(lambda n: "x\u00e9\U0001f600\u202e" * n),
    ),
    max_size=6,
)
GOOD_NAMES = GOOD_TEXT.map(lambda s: s[:100]).filter(lambda n: bool(n.strip()))
# Queue names are not padded with white space (`--queues` strips the names it is given)
# and hold no comma (`--queues` splits on commas; migration 0016).
GOOD_QUEUES = GOOD_NAMES.filter(lambda n: n == n.strip() and "," not in n)


@settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    names=st.lists(GOOD_NAMES, min_size=2, max_size=2, unique=True),
    queue=GOOD_QUEUES,
    payloads=st.lists(
        st.tuples(GOOD_ARGS, st.sampled_from(["py", "sql", "insert"])), min_size=4, max_size=10
    ),
)
def test_worker_hands_fuzzed_args_to_the_handler(db, names, queue, payloads):
    assume(all(db.pg_name_ok(n, 128) for n in [*names, queue]))
    db.reset()
    registry = Registry()
    seen: dict[int, tuple[str, str, dict[str, Any]]] = {}

    def make(name: str) -> Any:
        def handler(**kwargs: Any) -> None:
            job = current_job()
            seen[job.id] = (job.task, job.queue, kwargs)

        return handler

    # Registered names are remembered process-wide (enqueue's defaults): a prefix keeps
    # them from meeting other tests' task names.
    names = [f"fuzz\u00b7{n}" for n in names]
    for name in names:
        registry.task(name=name, queue=queue)(make(name))
    sent: dict[int, tuple[str, dict[str, Any]]] = {}
    for i, (args, path) in enumerate(payloads):
        task = names[i % 2]
        if path == "py":
            job_id = enqueue(db.conn, task, args, queue=queue)
        elif path == "sql":
            job_id = scalar(
                db.conn,
                "SELECT pgqueue.enqueue(%s, %s::jsonb, %s)",
                (task, json.dumps(args), queue),
            )
        else:
            job_id = scalar(
                db.conn,
                "INSERT INTO pgqueue.jobs (task, args, queue) VALUES (%s, %s::jsonb, %s)"
                " RETURNING id",
                (task, json.dumps(args, ensure_ascii=False), queue),
            )
        sent[job_id] = (task, args)

    async def main() -> None:
        worker = Worker(registry, WorkerConfig(dsn=db.dsn, poll_interval=0.2))
        run = asyncio.create_task(worker.run(handle_signals=False))
        try:
            async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as c:
                for _ in range(1000):
                    cur = await c.execute(
                        "SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded'"
                    )
                    row = await cur.fetchone()
                    if row and row[0] == len(sent):
                        break
                    await asyncio.sleep(0.02)
        finally:
            worker.stop()
            await asyncio.wait_for(run, 30)

    asyncio.run(main())
    assert set(seen) == set(sent)
    for job_id, (task, args) in sent.items():
        got_task, got_queue, kwargs = seen[job_id]
        assert (got_task, got_queue) == (task, queue)
        assert_same(kwargs, args)


# --- the normalisations, pinned ---------------------------------------------------------------


def test_jsonb_number_normalisation_is_what_the_docstring_says(db):
    args = {
        "big_float": 1e16,
        "huge_float": 1.5e300,
        "neg_zero": -0.0,
        "tiny": 5e-324,
        "plain": 0.1,
        "whole_float": 2.0,
        "beyond_int64": 2**64 + 1,
        "key_order_z": 1,
        "a": 2,
    }
    enqueue(db.conn, "t", args)
    (job,) = db.claim("default")
    got = job.args
    assert got["big_float"] == 10**16 and type(got["big_float"]) is int
    assert got["huge_float"] == 15 * 10**299 and got["huge_float"] != int(1.5e300)
    assert float(got["huge_float"]) == 1.5e300
    assert got["neg_zero"] == 0.0 and math.copysign(1, got["neg_zero"]) == 1
    assert got["tiny"] == 5e-324 and got["plain"] == 0.1
    assert got["whole_float"] == 2.0 and type(got["whole_float"]) is float
    assert got["beyond_int64"] == 2**64 + 1
    assert list(got) != list(args)  # jsonb orders keys (shortest first)
    assert_same(got, args)


def test_python_only_types_are_converted_not_kept(db):
    """Tuples become lists (JSON has no tuples): documented, not a bug."""
    enqueue(db.conn, "t", {"pair": (1, 2)})
    (job,) = db.claim("default")
    assert job.args == {"pair": [1, 2]}


# --- bugs found (strict xfails: each turns into a failure once fixed, so remove the mark) ---


def test_non_string_keys_are_refused(db):
    for args in ({1: "a"}, {None: 1, "null": 2}, {"nested": {True: 1}}, {1.5: 0}):
        with pytest.raises(SerializationError):
            enqueue(db.conn, "t", args)  # type: ignore[dict-item]
    assert db.count() == 0


def test_python_enqueue_refuses_too_deep_args_cleanly(db):
    with pytest.raises(ValidationError):
        enqueue(db.conn, "t", {"deep": _nest(5000, 1)})
    assert db.count() == 0


@pytest.mark.parametrize("where", ["args", "key", "task", "queue"])
def test_python_enqueue_refuses_lone_surrogates_cleanly(db, where):
    bad = "x\ud800"
    kwargs: dict[str, Any] = {"queue": bad if where == "queue" else "default"}
    if where == "key":
        kwargs["idempotency_key"] = bad
    with pytest.raises(ValidationError):
        enqueue(
            db.conn,
            bad if where == "task" else "t",
            {"a": bad} if where == "args" else {},
            **kwargs,
        )
    assert db.count() == 0


UNDECODABLE = {
    # 14 bytes of valid JSON; jsonb keeps all 5001 digits; Python's json.loads (psycopg's
    # jsonb loader) refuses ints over 4300 digits with ValueError.
    "number_over_4300_digits": '{"n": 1e5000}',
    # A fraction beyond a float's range (Postgres writes it out without an exponent):
    # json.loads alone makes it inf, which json.dumps writes as Infinity, not JSON.
    "fraction_beyond_a_float": '{"n": ' + "9" * 400 + ".5}",
    # Valid JSON Postgres stores; json.loads raises RecursionError.
    "nesting_5000_deep": '{"a": ' + "[" * 5000 + "]" * 5000 + "}",
}


@pytest.mark.parametrize("text", list(UNDECODABLE.values()), ids=list(UNDECODABLE))
def test_sql_args_no_python_worker_can_decode_do_not_strand_their_batch(db, text):
    """JSON that Postgres stores but Python cannot decode (a number of thousands of digits,
    nesting past the recursion limit) must not break the claim of the jobs beside it:
    it arrives as UndecodableArgs, which the executor dead-letters as bad_args."""
    good = enqueue(db.conn, "t", {"ok": 1})
    try:
        db.conn.execute("SELECT pgqueue.enqueue('t', %s::jsonb)", (text,))
    except SQL_REFUSALS:
        assert db.count() == 1
        return
    jobs = {j.id: j for j in db.claim("default")}
    assert len(jobs) == 2
    assert jobs[good].args == {"ok": 1}
    (bad,) = [j for j in jobs.values() if j.id != good]
    assert isinstance(bad.args, UndecodableArgs) and bad.args.error


# --- injection ------------------------------------------------------------------------------

INJECTIONS = [
    "x'); DROP TABLE pgqueue.jobs; --",
    "x'); DROP TABLE pgqueue.dead_jobs; --",
    "'; DELETE FROM pgqueue.jobs; --",
    "' OR '1'='1",
    '"; DROP SCHEMA pgqueue CASCADE; --',
    "$$; DROP TABLE pgqueue.jobs; $$",
    "x$q$); DROP TABLE pgqueue.jobs; --$q$",
    "1; SELECT pg_sleep(30)",
    "x'::text); SELECT pg_terminate_backend(pg_backend_pid()); --",
    "%s; DROP TABLE pgqueue.jobs",
    "%(task)s",
    "\\'; DROP TABLE pgqueue.jobs; --",
    "x\u2019); DROP TABLE pgqueue.jobs; --",
    "E'\\x27'); DROP TABLE pgqueue.jobs; --",
    "x\"); NOTIFY pgqueue_jobs, 'pwned'; --",
]


def schema_intact(conn: psycopg.Connection[Any]) -> None:
    for relation in ("pgqueue.jobs", "pgqueue.dead_jobs", "pgqueue.queues", "pgqueue.workers"):
        assert scalar(conn, "SELECT to_regclass(%s) IS NOT NULL", (relation,)), relation
    assert scalar(conn, "SELECT count(*) FROM pgqueue.jobs WHERE task = 'canary'") == 1


def cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGQUEUE_")}
    env["PGQUEUE_DSN"] = dsn
    return subprocess.run(
        [str(BIN / "pgqueue"), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def as_queue(text: str) -> str:
    """An injection attempt as a queue name: no comma (no worker could serve it), at
    most 128 characters."""
    return text.replace(",", ";")[:128]


def test_injection_through_the_python_api_and_sql_is_stored_literally(db):
    canary = enqueue(db.conn, "canary", {})
    ids: dict[int, str] = {}
    for i, bad in enumerate(INJECTIONS):
        args = {bad: bad, "nested": [bad, {bad: bad}]}
        queue = as_queue(bad)
        ids[enqueue(db.conn, bad, args, queue=queue, idempotency_key=f"{i}:{bad}")] = bad
        ids[enqueue_many(db.conn, [JobSpec(bad, args, queue=queue, idempotency_key=bad)])[0]] = bad
        ids[
            scalar(
                db.conn,
                "SELECT pgqueue.enqueue(%s, %s::jsonb, %s, 0, now(), 20, %s)",
                (bad, json.dumps(args), queue, f"sql:{bad}"),
            )
        ] = bad
        # The same key again returns the holder, whatever the key contains.
        assert enqueue(db.conn, "other", {}, idempotency_key=bad) in ids
        schema_intact(db.conn)
    assert len(ids) == 3 * len(INJECTIONS)
    rows = db.conn.execute(
        "SELECT id, task, queue, args FROM pgqueue.jobs WHERE id <> %s", (canary,)
    ).fetchall()
    assert {r[0] for r in rows} == set(ids)
    for job_id, task, queue, args in rows:
        bad = ids[job_id]
        assert (task, queue) == (bad, as_queue(bad))
        assert args == {bad: bad, "nested": [bad, {bad: bad}]}
    # The worker side reads them back literally too.
    for bad in INJECTIONS:
        jobs = db.claim(as_queue(bad))
        assert {j.task for j in jobs} == {bad}
    schema_intact(db.conn)


def test_injection_through_the_cli_is_used_literally(db):
    canary = enqueue(db.conn, "canary", {})
    bad = "x'); DROP TABLE pgqueue.jobs; --"
    other = "' OR '1'='1"
    target = enqueue(db.conn, bad, {"q": other}, queue=other)
    decoy = enqueue(db.conn, "innocent", {})
    # jobs list: the filters are bound parameters, compared literally.
    out = cli(db.dsn, "jobs", "list", f"--task={bad}", "--json")
    assert out.returncode == 0, out.stderr
    assert [r["id"] for r in json.loads(out.stdout)] == [target]
    out = cli(db.dsn, "jobs", "list", f"--queue={other}", "--json")
    assert out.returncode == 0, out.stderr
    assert [r["id"] for r in json.loads(out.stdout)] == [target]
    out = cli(db.dsn, "jobs", "list", f"--task={other}", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []  # ' OR '1'='1 matched nothing, not everything
    # status prints the name as data.
    out = cli(db.dsn, "status", str(target), "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert (status["task"], status["queue"]) == (bad, other)
    # queue pause / resume: the name is stored as given.
    for name in (bad, other, "$$; DROP TABLE pgqueue.queues; $$"):
        out = cli(db.dsn, "queue", "pause", "--", name)
        assert out.returncode == 0, out.stderr
        assert scalar(
            db.conn, "SELECT paused_at IS NOT NULL FROM pgqueue.queues WHERE name = %s", (name,)
        )
    assert cli(db.dsn, "queue", "resume", "--", other).returncode == 0
    assert scalar(db.conn, "SELECT paused_at FROM pgqueue.queues WHERE name = %s", (other,)) is None
    assert scalar(db.conn, "SELECT count(*) FROM pgqueue.queues") == 3
    # dead list with an injected filter.
    out = cli(db.dsn, "dead", "list", f"--task={bad}", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
    schema_intact(db.conn)
    assert scalar(db.conn, "SELECT count(*) FROM pgqueue.jobs") == 3
    assert {canary, target, decoy} == {
        r[0] for r in db.conn.execute("SELECT id FROM pgqueue.jobs").fetchall()
    }


def test_injected_names_and_args_run_literally_in_a_worker(db):
    """A worker runs a task whose name, queue and args are SQL; the handler gets them as
    data and the schema is intact afterwards."""
    bad = "x'); DROP TABLE pgqueue.jobs; --"
    queue = "q'); DELETE FROM pgqueue.jobs; --"
    registry = Registry()
    seen: list[dict[str, Any]] = []

    @registry.task(name=bad, queue=queue)
    def handler(**kwargs: Any) -> None:
        seen.append(kwargs)

    canary = enqueue(db.conn, "canary", {})
    args = {bad: bad, "sql": "'; TRUNCATE pgqueue.jobs; --"}
    job_id = enqueue(db.conn, bad, args)

    async def main() -> None:
        worker = Worker(registry, WorkerConfig(dsn=db.dsn, poll_interval=0.2))
        run = asyncio.create_task(worker.run(handle_signals=False))
        try:
            async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as c:
                for _ in range(500):
                    cur = await c.execute(
                        "SELECT state = 'succeeded' FROM pgqueue.jobs WHERE id = %s", (job_id,)
                    )
                    row = await cur.fetchone()
                    if row and row[0]:
                        break
                    await asyncio.sleep(0.02)
        finally:
            worker.stop()
            await asyncio.wait_for(run, 30)

    asyncio.run(main())
    assert seen == [args]
    schema_intact(db.conn)
    assert scalar(db.conn, "SELECT queue FROM pgqueue.jobs WHERE id = %s", (job_id,)) == queue
    assert scalar(db.conn, "SELECT count(*) FROM pgqueue.jobs") == 2
    assert canary
