"""Task.enqueue / Task.with_options / Task.spec: typed enqueue from the handler's own
signature, with the task's own defaults."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgqueue import Registry, enqueue_many
from pgqueue import registry as registry_module
from tests.conftest import scalar

registry = Registry()


@registry.task(name="typed.send", queue="emails", max_attempts=5, priority=3)
def send(to: str, subject: str = "hello", *, urgent: bool = False) -> None: ...


@registry.task(name="typed.anything")
def anything(kind: str, **extra: Any) -> None: ...


@registry.task(name="typed.positional_only")
def positional_only(a: int = 0, /) -> None: ...  # a default: registrable


@registry.task(name="typed.self")
def with_self(self: str) -> None: ...


@registry.task(name="typed.star")
def star(*items: int) -> None: ...


def row(conn: psycopg.Connection[Any], job_id: int) -> dict[str, Any]:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            "SELECT task, args, queue, priority, max_attempts, idempotency_key,"
            " run_at > now() + interval '50 seconds' AS later FROM pgqueue.jobs WHERE id = %s",
            (job_id,),
        )
        found = cur.fetchone()
    assert found is not None
    return found


def test_enqueue_names_each_argument_and_takes_the_tasks_own_options(conn):
    job_id = send.enqueue(conn, "a@b.c", urgent=True)

    assert row(conn, job_id) == {
        "task": "typed.send", "args": {"to": "a@b.c", "urgent": True}, "queue": "emails",
        "priority": 3, "max_attempts": 5, "idempotency_key": None, "later": False,
    }  # fmt: skip


def test_var_keyword_arguments_are_merged_into_the_args(conn):
    job_id = anything.enqueue(conn, "k", color="red", size=2)
    assert row(conn, job_id)["args"] == {"kind": "k", "color": "red", "size": 2}


def test_a_parameter_named_self_binds_like_any_other(conn):
    assert row(conn, with_self.enqueue(conn, self="x"))["args"] == {"self": "x"}
    assert with_self.spec(self="y").args == {"self": "y"}
    assert with_self.job_args("z") == {"self": "z"}
    assert with_self(self="w") is None


def test_with_options_overrides_the_tasks_defaults(conn):
    job_id = send.with_options(delay=60, priority=9, idempotency_key="k-1").enqueue(
        conn, to="x@y.z", subject="later"
    )
    got = row(conn, job_id)
    assert (got["priority"], got["queue"], got["idempotency_key"], got["later"]) == (
        9, "emails", "k-1", True,
    )  # fmt: skip
    again = send.with_options(idempotency_key="k-1").enqueue(conn, to="x@y.z")
    assert again == job_id


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: send.enqueue(c), "missing a required argument: 'to'"),
        (lambda c: send.enqueue(c, "a", "b", True), "too many positional arguments"),
        (lambda c: send.enqueue(c, to="a", cc="b"), "unexpected keyword argument 'cc'"),
        (lambda c: positional_only.enqueue(c, 1), "positional-only"),
        (lambda c: star.enqueue(c, 1, 2), "cannot carry \\*items"),
    ],
)
def test_arguments_that_do_not_fit_raise_type_error_and_enqueue_nothing(conn, call, message):
    with pytest.raises(TypeError, match=message):
        call(conn)
    assert scalar(conn, "SELECT count(*) FROM pgqueue.jobs") == 0


def test_an_async_connection_gets_an_awaitable(dsn):
    async def main() -> int:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            return await send.enqueue(aconn, to="async@b.c")

    job_id = asyncio.run(main())
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert row(conn, job_id)["args"] == {"to": "async@b.c"}


def test_spec_builds_jobs_for_enqueue_many(conn):
    ids = enqueue_many(
        conn, [send.spec(f"{i}@b.c") for i in range(3)] + [send.with_options(priority=0).spec("z")]
    )
    rows = [row(conn, i) for i in ids]
    assert [r["args"]["to"] for r in rows] == ["0@b.c", "1@b.c", "2@b.c", "z"]
    assert [r["priority"] for r in rows] == [3, 3, 3, 0]
    assert {r["queue"] for r in rows} == {"emails"}


def test_a_task_enqueues_with_its_own_options_when_another_registry_reuses_its_name(
    conn, monkeypatch
):
    # The later registration replaces the process-wide defaults: undone after the test.
    monkeypatch.setitem(registry_module._known_options, "typed.send", send.options)
    other = Registry()

    @other.task(name="typed.send", queue="elsewhere", max_attempts=1)
    def impostor(to: str) -> None: ...

    # The process-wide defaults now come from the later registration, but each Task
    # object keeps its own.
    assert row(conn, send.enqueue(conn, to="a"))["queue"] == "emails"
    assert row(conn, impostor.enqueue(conn, to="a"))["queue"] == "elsewhere"


def test_a_type_checker_checks_the_arguments(tmp_path: Path):
    source = textwrap.dedent(
        """
        from typing import Any

        import psycopg
        from pgqueue import JobItem, Registry, enqueue, enqueue_many

        registry = Registry()

        @registry.task(name="t")
        def send(to: str, retries: int = 0) -> None: ...

        def produce(conn: psycopg.Connection[Any], aconn: psycopg.AsyncConnection[Any]) -> None:
            job_id: int = send.enqueue(conn, "a@b.c", retries=2)
            send.with_options(delay=5).enqueue(conn, to="a")
            pending = send.enqueue(aconn, "a")
            reveal_type(pending)  # type: ignore[unused-coroutine]
            send.enqueue(conn, 42)
            send.enqueue(conn, "a", retries="many")

        async def forgot(aconn: psycopg.AsyncConnection[Any]) -> None:
            send.enqueue(aconn, "a")
            enqueue(aconn, "t")

        def many(conn: psycopg.Connection[Any]) -> list[int]:
            items: list[JobItem] = ["t", ("t", {"to": "a"}), {"task": "t"}]
            return enqueue_many(conn, items) + enqueue_many(conn, (send.spec("a") for _ in "ab"))

        from pgqueue import Snoze
        from typing import assert_type
        from pgqueue.testing import perform

        @registry.task(name="u")
        async def upper(s: str) -> str:
            return s.upper()

        assert_type(perform(registry, upper, {"s": "x"}), str)
        assert_type(perform(registry, send, {"to": "x"}), None)
        assert_type(perform(registry, "u", {"s": "x"}), Any)
        enqueue_many(psycopg.connect(""), {"task": "t"})
        """
    )
    (tmp_path / "producer.py").write_text(source)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "producer.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    errors = [line for line in lines if ": error:" in line]
    revealed = [line for line in lines if "note: Revealed" in line]
    assert any("Coroutine[Any, Any, int]" in line for line in revealed), lines
    # The two bad calls (lines 17 and 18 of the snippet); an enqueue on an async
    # connection not awaited (the job would never be sent: 21, 22); a misspelled import
    # (28: the module's lazy __getattr__ made any name pass). Nothing else: the JobItem
    # list and the generator for enqueue_many are fine, and perform of a Task has its
    # handler's return type (awaited for an async one).
    assert [line.split(": error:")[0] for line in errors] == [
        "producer.py:17",
        "producer.py:18",
        "producer.py:21",
        "producer.py:22",
        "producer.py:28",
        "producer.py:39",
    ], lines
    assert all('No overload variant of "enqueue" of "Task"' in line for line in errors[:2])
    assert any("to: str, retries: int = ..." in line for line in lines), lines
    assert all("[unused-coroutine]" in line for line in errors[2:4]), errors
    assert 'Module "pgqueue" has no attribute "Snoze"' in errors[4], errors
    # One mapping is not a list of jobs (it iterates as its keys, each a task name).
    assert "enqueue_many" in errors[5], errors


def test_the_bare_decorator_registers_under_the_functions_own_name(conn):
    # @registry.task without parentheses (as Celery, Dramatiq and RQ users write it)
    # registers the function with the default options; it silently registered nothing.
    local = Registry()

    @local.task
    def plain(n: int) -> int:
        return n * 2

    name = f"{__name__}.{test_the_bare_decorator_registers_under_the_functions_own_name.__name__}"
    name += ".<locals>.plain"
    assert plain.name == name
    assert name in local
    assert plain(4) == 8  # still the function
    # Called with the function and options (not as a decorator), the options apply.
    other = local.task(lambda: None, queue="q", max_attempts=2)  # type: ignore[call-overload]
    assert (other.options.queue, other.options.max_attempts) == ("q", 2)
    job_id = plain.enqueue(conn, n=3)
    assert row(conn, job_id)["task"] == name
    assert row(conn, job_id)["queue"] == "default"


def test_an_empty_or_non_string_task_name_is_refused_at_registration():
    from pgqueue import Backoff, ConfigError

    local = Registry()
    with pytest.raises(ConfigError, match="must not be empty"):
        local.task(name="")(lambda: None)
    with pytest.raises(ConfigError, match="must be a string, got int"):
        local.task(42)(lambda: None)  # type: ignore[call-overload]
    assert len(local) == 0
    # A bad backoff is a ConfigError too (still a ValueError, as before).
    with pytest.raises(ConfigError, match="backoff base"):
        Backoff(base_seconds=-1)
    with pytest.raises(ValueError, match="backoff jitter"):
        Backoff(jitter=2)


def test_a_handler_no_job_could_call_is_refused_at_registration():
    # A worker calls handlers with keyword arguments: a positional-only parameter without
    # a default failed every job of the task (bad_args) until it was dead-lettered.
    from pgqueue import ConfigError

    local = Registry()
    with pytest.raises(ConfigError, match="parameter 'a' is positional-only without a default"):

        @local.task(name="never")
        def never(a: int, /, b: int) -> None: ...

    assert len(local) == 0


def test_a_misspelled_argument_is_named_as_unexpected_not_as_a_missing_one(conn):
    # bind() names a missing parameter first: `subjct` read as a missing `subject`.
    local = Registry()

    @local.task(name="typed.mail")
    def mail(to: str, subject: str) -> None: ...

    with pytest.raises(TypeError, match="unexpected keyword argument 'subjct'"):
        mail.enqueue(conn, to="a", subjct="b")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"args do not fit .*unexpected keyword argument 'subjct'"):
        mail.check_args({"to": "a", "subjct": "b"})
    assert scalar(conn, "SELECT count(*) FROM pgqueue.jobs") == 0


def test_a_callable_without_a_qualname_needs_a_task_name():
    # A callable object or a partial has no __qualname__: registering one without a name
    # raised AttributeError from the decorator.
    import functools

    from pgqueue import ConfigError

    class Handler:
        async def __call__(self, n: int) -> int:
            return n

    local = Registry()
    for fn in (Handler(), functools.partial(max, 1)):
        with pytest.raises(ConfigError, match="pass name="):
            local.task(fn)
    assert len(local) == 0
    assert local.task(name="handler")(Handler()).name == "handler"


def test_a_backoff_never_answers_more_than_a_retry_can_wait():
    # max near ten years times the jitter's up to 1.25 was more than the worker's retry
    # takes: it logged job.backoff_failed and fell back to the default backoff.
    from pgqueue import Backoff
    from pgqueue.errors import MAX_DELAY_SECONDS, delay_seconds

    longest = Backoff(base_seconds=MAX_DELAY_SECONDS, max_seconds=MAX_DELAY_SECONDS)
    assert longest.delay(1, rand=lambda: 0.999) == MAX_DELAY_SECONDS
    assert delay_seconds(longest.delay(30, rand=lambda: 0.999), "delay") == MAX_DELAY_SECONDS
    assert Backoff(base_seconds=8, jitter=0.5).delay(1, rand=lambda: 0.75) == 10.0


def test_a_task_named_after_the_main_module_warns_that_workers_name_it_otherwise():
    # `python app.py` enqueued `__main__.hello`, which a worker started with `--app
    # app:registry` does not know (it registers `app.hello`). Found by a review.
    local = Registry()

    def hello() -> None: ...

    hello.__module__ = "__main__"
    with pytest.warns(
        UserWarning, match=r"'__main__\.test_.*hello' is named after the __main__"
    ) as caught:
        local.task(hello)
    # It points at the user's line, not into pgqueue (both the bare decorator and the
    # call with options go through more than one frame of the registry).
    assert [w.filename for w in caught] == [__file__]
    hello2 = lambda: None  # noqa: E731
    hello2.__module__ = "__main__"
    with pytest.warns(UserWarning) as caught:
        local.task(queue="q")(hello2)
    assert [w.filename for w in caught] == [__file__]

    def named() -> None: ...

    named.__module__ = "__main__"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        local.task(name="named")(named)  # a name given: nothing to warn about
