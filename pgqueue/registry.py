"""The task registry: task names mapped to handlers and their options.

A ``Registry`` is what ``pgqueue-worker --app module:registry`` loads. Every task also
lands in a process-wide index of options, so that ``enqueue(conn, "name")`` in a
producer that imported the tasks module uses the task's queue, priority and
``max_attempts`` without being handed the registry.
"""

from __future__ import annotations

import inspect
import numbers
import sys
import warnings
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

import psycopg

from pgqueue.errors import ConfigError, UnknownTask
from pgqueue.retry import Backoff

if TYPE_CHECKING:
    from pgqueue.enqueue import JobSpec

P = ParamSpec("P")
R = TypeVar("R")
# A worker start or stop hook: called with no arguments, sync or ``async def``.
Hook = TypeVar("Hook", bound=Callable[[], Any])

MAX_NAME_LENGTH = 255
MAX_QUEUE_LENGTH = 128
DEFAULT_QUEUE = "default"
DEFAULT_MAX_ATTEMPTS = 20
DEFAULT_PRIORITY = 0


# Names already found usable, per (kind, max length): enqueue checks the same few task and
# queue names for every job. Bounded: names are user input.
_checked: dict[tuple[str, int], set[str]] = {}
_CHECKED_MAX = 4096


def check_name(kind: str, value: object, max_length: int) -> str:
    """Return ``value`` if it is a usable task or queue name, else raise ``ConfigError``."""
    known = _checked.get((kind, max_length))
    if known is not None and type(value) is str and value in known:
        return value
    _check_name(kind, value, max_length)
    assert isinstance(value, str)
    if known is None:
        known = _checked.setdefault((kind, max_length), set())
    if len(known) < _CHECKED_MAX:
        known.add(value)
    return value


def _check_name(kind: str, value: object, max_length: int) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{kind} name must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ConfigError(f"{kind} name must not be empty")
    if kind == "queue" and value != value.strip():
        # `pgqueue-worker --queues a, b` strips the names it is given: a padded queue
        # could be enqueued to but never named there.
        raise ConfigError(f"queue name {value!r} starts or ends with white space")
    if kind == "queue" and "," in value:
        # `pgqueue-worker --queues a,b` splits on commas: no worker could name it.
        raise ConfigError(f"queue name {value!r} contains a comma")
    if len(value) > max_length:
        raise ConfigError(f"{kind} name is longer than {max_length} characters")
    if "\x00" in value:
        raise ConfigError(f"{kind} name must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{kind} name is not valid UTF-8 (a lone surrogate)") from None


@dataclass(frozen=True)
class TaskOptions:
    """Per-task defaults for enqueue and execution."""

    queue: str = DEFAULT_QUEUE
    priority: int = DEFAULT_PRIORITY
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    timeout: float | None = None
    backoff: Backoff = field(default_factory=Backoff)

    def __post_init__(self) -> None:
        # Checked as enqueue checks a job's own values, so that a bad default fails at
        # registration, not at every enqueue of the task.
        check_name("queue", self.queue, MAX_QUEUE_LENGTH)
        if not plain_int(self.max_attempts) or not 1 <= self.max_attempts <= 2**31 - 1:
            raise ConfigError(
                f"max_attempts must be an integer in 1..{2**31 - 1}, got {self.max_attempts!r}"
            )
        if self.timeout is not None and not (
            isinstance(self.timeout, numbers.Real)
            and not isinstance(self.timeout, bool)
            and 0 < self.timeout < float("inf")
        ):
            raise ConfigError(
                f"timeout must be a number of seconds > 0 (or a timedelta), got {self.timeout!r}"
            )
        if not plain_int(self.priority) or not -32768 <= self.priority <= 32767:
            raise ConfigError(
                f"priority must be an integer in -32768..32767, got {self.priority!r}"
            )
        if not callable(getattr(self.backoff, "delay", None)):
            raise ConfigError(
                f"backoff must be a pgqueue.Backoff (or have its delay(attempt) method),"
                f" got {self.backoff!r}"
            )


def plain_int(value: object) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _binds_any_kwargs(signature: inspect.Signature) -> bool:
    params = signature.parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        return False
    return all(
        p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        or (p.kind is not p.POSITIONAL_ONLY and p.default is not p.empty)
        for p in params
    )


class Task(Generic[P, R]):
    """A registered handler. Calling it calls the function directly (handy in tests)."""

    def __init__(self, name: str, fn: Callable[P, R], options: TaskOptions) -> None:
        self.name = name
        self.fn = fn
        self.options = options
        # An object whose __call__ is ``async def`` is async too. A plain function that
        # returns an awaitable (an async function behind a plain decorator) runs in a
        # thread, and the worker awaits what it returns.
        self.is_async: bool = is_async_callable(fn)
        self.signature: inspect.Signature = inspect.signature(fn)
        # Whether every JSON object binds (only **kwargs and parameters with defaults that
        # can be passed by keyword): the worker then skips the per-job signature check.
        self.binds_any_kwargs: bool = _binds_any_kwargs(self.signature)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __call__(self, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def check_args(self, args: Mapping[str, Any]) -> None:
        """``TypeError`` when a job's args do not fit the handler's signature as keywords
        (what a worker records as ``bad_args``), before the handler is called: a
        ``TypeError`` the handler itself raises is not taken for one."""
        if self.binds_any_kwargs:
            return
        try:
            self.signature.bind(**args)
        except TypeError as exc:
            raise TypeError(
                f"args do not fit {self.name}{self.signature}: {self._unexpected(args) or exc}"
            ) from None

    def _unexpected(self, args: Mapping[str, Any]) -> str | None:
        """The first arg no parameter takes, said first: ``bind`` names a missing
        parameter before it, and a misspelled name then reads as a missing one."""
        params = self.signature.parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return None
        for key in args:
            if key not in params or params[key].kind is inspect.Parameter.POSITIONAL_ONLY:
                return f"got an unexpected keyword argument {key!r}"
        return None

    def job_args(self, /, *args: P.args, **kwargs: P.kwargs) -> dict[str, Any]:
        """The args of a job whose handler call is ``fn(*args, **kwargs)``: each argument
        under its parameter's name (what the worker passes back as keywords), the
        contents of ``**kwargs`` merged in; defaults are left to the handler. Arguments
        that do not fit the signature raise ``TypeError`` now, not in a worker."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(
                f"{self.name}{self.signature}: {self._unexpected(kwargs) or exc}"
            ) from None
        job_args: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = self.signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                job_args.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError(
                        f"{self.name}: a job cannot carry *{name}: the worker calls the"
                        " handler with keyword arguments only"
                    )
            elif kind is inspect.Parameter.POSITIONAL_ONLY:
                raise TypeError(
                    f"{self.name}: parameter {name!r} is positional-only, which a worker"
                    " (calling with keyword arguments) cannot pass"
                )
            else:
                job_args[name] = value
        return job_args

    def with_options(
        self,
        *,
        queue: str | None = None,
        priority: int | None = None,
        run_at: datetime | None = None,
        delay: float | timedelta | None = None,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
    ) -> TaskCall[P]:
        """This task with enqueue options set: ``send.with_options(delay=60).enqueue(conn,
        to=...)``. Unset ones come from the task's registration."""
        return TaskCall(
            self,
            {
                "queue": queue,
                "priority": priority,
                "run_at": run_at,
                "delay": delay,
                "max_attempts": max_attempts,
                "idempotency_key": idempotency_key,
            },
        )

    @overload
    def enqueue(
        self, conn: psycopg.Connection[Any], /, *args: P.args, **kwargs: P.kwargs
    ) -> int: ...

    @overload
    def enqueue(
        self, conn: psycopg.AsyncConnection[Any], /, *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, int]: ...

    def enqueue(
        self,
        conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> int | Coroutine[Any, Any, int]:
        """Enqueue a job of this task, its args checked against the handler's signature
        (a type checker checks them too): ``send.enqueue(conn, to="a@b.c")``. Returns
        the job's id (an awaitable of it on an ``AsyncConnection``), like
        ``pgqueue.enqueue``; the queue, priority and attempts are this task's own."""
        return TaskCall(self, {}).enqueue(conn, *args, **kwargs)

    def spec(self, /, *args: P.args, **kwargs: P.kwargs) -> JobSpec:
        """A ``JobSpec`` of this task for ``enqueue_many``, args checked as ``enqueue``."""
        return TaskCall(self, {}).spec(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.options.queue}>"


class TaskCall(Generic[P]):
    """A task with enqueue options (``Task.with_options``)."""

    def __init__(self, task: Task[P, Any], options: dict[str, Any]) -> None:
        self.task = task
        task_options = task.options
        # The task's own defaults, not the process-wide index's (another registry may
        # have registered the same name with other options).
        self.options: dict[str, Any] = {
            "queue": task_options.queue,
            "priority": task_options.priority,
            "max_attempts": task_options.max_attempts,
            **{k: v for k, v in options.items() if v is not None},
        }

    @overload
    def enqueue(
        self, conn: psycopg.Connection[Any], /, *args: P.args, **kwargs: P.kwargs
    ) -> int: ...

    @overload
    def enqueue(
        self, conn: psycopg.AsyncConnection[Any], /, *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, int]: ...

    def enqueue(
        self,
        conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> int | Coroutine[Any, Any, int]:
        """As ``Task.enqueue``, with these options."""
        from pgqueue.enqueue import enqueue

        job_args = self.task.job_args(*args, **kwargs)
        return enqueue(conn, self.task.name, job_args, **self.options)

    def spec(self, /, *args: P.args, **kwargs: P.kwargs) -> JobSpec:
        """As ``Task.spec``, with these options."""
        from pgqueue.enqueue import JobSpec

        return JobSpec(self.task.name, self.task.job_args(*args, **kwargs), **self.options)


def _outside_this_module() -> int:
    """The ``stacklevel`` that makes a warning raised in this module's caller point at
    the first frame outside it (the user's decorator line, however the call came in:
    ``@registry.task`` bare goes through ``task`` first)."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
        level += 1
    return level


def hook_name(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of a hook, for logs (its repr if it has no qualname)."""
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(qualname, str):
        return repr(fn)
    return f"{getattr(fn, '__module__', None)}.{qualname}"


def is_async_callable(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` makes a coroutine: an ``async def``, or an object whose
    ``__call__`` is one (task handlers and worker hooks)."""
    return inspect.iscoroutinefunction(fn) or (
        not inspect.isroutine(fn)
        and not inspect.isclass(fn)
        and inspect.iscoroutinefunction(type(fn).__call__)
    )


def _checked_hook(kind: str, fn: Hook) -> Hook:
    if not callable(fn):
        raise ConfigError(f"registry.{kind} takes a function, got {type(fn).__name__}")
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise ConfigError(
            f"{hook_name(fn)!r} is a generator function: a {kind} hook must do its work"
            " when called (return, not yield)"
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: take them as they come
        return fn
    try:
        signature.bind()
    except TypeError:
        raise ConfigError(
            f"{kind} hook {hook_name(fn)!r} must take no arguments: the worker calls it with none"
        ) from None
    return fn


# name -> options of every task registered in this process, for enqueue's defaults.
_known_options: dict[str, TaskOptions] = {}


def known_options(name: str) -> TaskOptions | None:
    """Options of a task registered anywhere in this process, if any."""
    return _known_options.get(name)


class Registry:
    """Task name -> handler. Create one per application and point the worker at it."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task[Any, Any]] = {}
        self._startup_hooks: list[Callable[[], Any]] = []
        self._shutdown_hooks: list[Callable[[], Any]] = []

    @overload
    def task(self, name: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        name: str | None = None,
        *,
        queue: str = DEFAULT_QUEUE,
        priority: int = DEFAULT_PRIORITY,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        timeout: float | timedelta | None = None,
        backoff: Backoff | None = None,
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(
        self,
        name: str | Callable[P, R] | None = None,
        *,
        queue: str = DEFAULT_QUEUE,
        priority: int = DEFAULT_PRIORITY,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        timeout: float | timedelta | None = None,
        backoff: Backoff | None = None,
    ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Register the decorated function (sync or ``async def``) as a task:
        ``@registry.task`` or ``@registry.task(name, queue=..., ...)``.

        ``name`` defaults to ``module.qualname`` (a callable object or a
        ``functools.partial``, which have none, needs it given). Registering a name twice
        raises ``ConfigError``; so do bad options and an empty name.
        """
        if callable(name):
            # The bare decorator: the function came in the place of the name (options
            # given beside it still apply).
            return self.task(
                queue=queue, priority=priority, max_attempts=max_attempts, timeout=timeout,
                backoff=backoff,
            )(name)  # fmt: skip
        options = TaskOptions(
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            # Seconds or a timedelta, as Snooze and enqueue's delay take them.
            timeout=timeout.total_seconds() if isinstance(timeout, timedelta) else timeout,
            backoff=Backoff() if backoff is None else backoff,
        )

        def decorate(fn: Callable[P, R]) -> Task[P, R]:
            if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
                # Calling one runs nothing: the worker would count a job whose body never
                # ran as succeeded.
                raise ConfigError(
                    f"{getattr(fn, '__qualname__', fn)!r} is a generator function: a task"
                    " handler must do its work when called (return, not yield)"
                )
            given = name
            if given is None:
                qualname = getattr(fn, "__qualname__", None)
                if not isinstance(qualname, str):
                    # A callable object or a functools.partial: no name of its own.
                    raise ConfigError(
                        f"{fn!r} has no __qualname__ to name its task after: pass"
                        " name=... to registry.task"
                    )
                module = getattr(fn, "__module__", None)
                given = f"{module}.{qualname}"
                if module == "__main__":
                    # A script run as `python app.py` enqueues `__main__.send`; a worker
                    # started with `--app app:registry` imports it as `app` and knows
                    # `app.send` only: every job is retried as an unknown task, then
                    # dead-lettered.
                    warnings.warn(
                        f"task {given!r} is named after the __main__ module: a worker that"
                        " imports this file as a module (--app) gives it another name, and"
                        " never runs these jobs; pass name=... to registry.task",
                        UserWarning,
                        stacklevel=_outside_this_module(),
                    )
            task_name = check_name("task", given, MAX_NAME_LENGTH)
            if task_name in self._tasks:
                raise ConfigError(f"task {task_name!r} is already registered")
            registered: Task[P, R] = Task(task_name, fn, options)
            unreachable = [
                p.name
                for p in registered.signature.parameters.values()
                if p.kind is p.POSITIONAL_ONLY and p.default is p.empty
            ]
            if unreachable:
                # The worker calls handlers with keyword arguments only: every job of the
                # task would fail (bad_args) until dead-lettered.
                raise ConfigError(
                    f"task {task_name!r}: parameter {unreachable[0]!r} is positional-only"
                    " without a default, which a worker (calling with keyword arguments)"
                    " can never pass"
                )
            self._tasks[task_name] = registered
            _known_options[task_name] = options
            return registered

        return decorate

    def on_startup(self, fn: Hook, /) -> Hook:
        """Register ``fn`` (no arguments; sync or ``async def``) to run in each worker
        process before its first claim, after the ones registered before it: to open
        what handlers share (an HTTP client, a connection pool). A hook that raises
        stops the worker before it claims anything (exit status 1). Returns ``fn``."""
        self._startup_hooks.append(_checked_hook("on_startup", fn))
        return fn

    def on_shutdown(self, fn: Hook, /) -> Hook:
        """Register ``fn`` (no arguments; sync or ``async def``) to run in each worker
        process once its jobs have ended or been released and their outcomes written, in
        the reverse order of registration (as nested ``with`` blocks close), only if every
        startup hook succeeded. Returns ``fn``."""
        self._shutdown_hooks.append(_checked_hook("on_shutdown", fn))
        return fn

    @property
    def startup_hooks(self) -> tuple[Callable[[], Any], ...]:
        """The startup hooks, in the order they run."""
        return tuple(self._startup_hooks)

    @property
    def shutdown_hooks(self) -> tuple[Callable[[], Any], ...]:
        """The shutdown hooks, in the order they run (the reverse of registration)."""
        return tuple(reversed(self._shutdown_hooks))

    def get(self, name: str) -> Task[Any, Any]:
        """The task registered as ``name``; ``UnknownTask`` if there is none."""
        try:
            return self._tasks[name]
        except KeyError:
            raise UnknownTask(f"no task named {name!r} is registered") from None

    def queues(self) -> list[str]:
        """The queues this registry's tasks declare, sorted, always including 'default'."""
        return sorted({DEFAULT_QUEUE, *(t.options.queue for t in self._tasks.values())})

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[Task[Any, Any]]:
        return iter(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)
