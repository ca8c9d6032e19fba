"""structlog set-up, to stdout: JSON lines when stdout is not a terminal, readable colour
output on one.

Events are named ``noun.verb`` in the past tense (``job.claimed``, ``lease.lost``) and
carry ``job_id``, ``task``, ``queue`` and ``attempt``; never a job's arguments.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from pgqueue.context import running_job
from pgqueue.errors import SCHEMA_HINT, first_line
from pgqueue.errors import schema_missing as schema_missing  # re-exported


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog for a daemon; ``fmt`` is 'json', 'console' or 'auto'."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    if sys.stdout is None:  # started with stdout closed (`>&-`): nowhere to log
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    tty = sys.stdout.isatty()
    use_json = fmt == "json" or (fmt == "auto" and not tty)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        # Plain tracebacks: with rich (or better-exceptions) installed, structlog's default
        # prints each frame's locals, a job's args among them (a handler's kwargs).
        else structlog.dev.ConsoleRenderer(
            colors=tty, exception_formatter=structlog.dev.plain_traceback
        )
    )
    exceptions: Any = (
        structlog.processors.format_exc_info
        if use_json
        else structlog.processors.StackInfoRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _job_context,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _schema_hint,
            exceptions,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line (message and newline together): processes sharing a log file
        # (a supervisor and its children) never interleave halves of lines.
        logger_factory=lambda *args: _LineWriter(sys.stdout),
        cache_logger_on_first_use=True,
    )
    # The standard-library logging of the libraries pgqueue runs on (psycopg's pool:
    # "error connecting in ..."; asyncio: "Task exception was never retrieved") goes the
    # same way, as events named by the message and carrying the logger's name, instead of
    # plain text on stderr. Only those loggers here: the root logger is the app's, given
    # this handler only if the app left it without one (adopt_root_logger).
    handler = _StdlibHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                _job_context,
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                exceptions,
                renderer,
            ],
        )
    )
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers = [handler]
        library.propagate = False
        library.setLevel(max(numeric, logging.WARNING))
    global _configured
    _configured = (handler, numeric)


# The stdlib handler and level of the last configure(), for adopt_root_logger.
_configured: tuple[logging.Handler, int] | None = None


def adopt_root_logger() -> bool:
    """Send the standard-library root logger's records (an app's and its handlers'
    ``logging.getLogger(__name__).info(...)``) the daemon's way, with the job's fields
    when logged from a handler, if the app left the root logger unconfigured (no
    handler: Python would print only warnings, bare, on stderr). Called after the app is
    imported; an app that set up logging itself keeps it. Returns whether it adopted."""
    root = logging.getLogger()
    if _configured is None or root.handlers:
        return False
    handler, level = _configured
    root.addHandler(handler)
    root.setLevel(level)
    return True


LIBRARY_LOGGERS = ("psycopg", "asyncio")


class _StdlibHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        _LineWriter(sys.stdout).msg(line)


def _job_context(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """An event logged while a handler runs (a handler's own structlog calls) carries
    the job's id, task, queue and attempt, unless it names them itself. Read from the
    variable current_job() reads, which the worker sets for each job anyway: nothing is
    bound per job, and an event outside a handler costs one lookup."""
    job = running_job()
    if job is not None:
        event.setdefault("job_id", job.id)
        event.setdefault("task", job.task)
        event.setdefault("queue", job.queue)
        event.setdefault("attempt", job.attempt)
    return event


def _schema_hint(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """An error logged with its exception that means "not migrated" becomes one line
    that says so (``error`` and ``hint``) instead of a traceback, repeated by every loop
    that retries. Any other exception keeps its traceback."""
    exc_info = event.get("exc_info")
    if exc_info is True:
        exc: object = sys.exc_info()[1]
    elif isinstance(exc_info, tuple):
        exc = exc_info[1]
    else:
        exc = exc_info
    if schema_missing(exc):
        del event["exc_info"]
        event["error"] = first_line(exc)  # type: ignore[arg-type]
        event["hint"] = SCHEMA_HINT
    return event


# The reader of stdout is gone for good: a closed pipe, a reset socket (journald's).
_GONE = (BrokenPipeError, ConnectionResetError)


class _LineWriter:
    """Writes each event as one line, in one write. A log line must never stop a daemon:
    if stdout cannot take it (closed, full disk, its reader gone: a pipe into ``head``,
    a restarted journald), the line is dropped instead of raising into the signal
    handler or loop that logged it. Once the reader is gone, stdout is pointed at
    /dev/null (said once on stderr), so that later lines and the interpreter's flush at
    exit (which would turn exit status 0 into 120) fail no more. A line logged from a
    signal handler while this thread is in the middle of another is dropped rather than
    wait for a lock its own thread holds."""

    # Re-entrant: a signal handler runs on the thread it interrupted, and must not wait
    # for a lock that thread holds.
    _lock = threading.RLock()
    _writing = False

    # Said once on stderr: a closed stdout was reopened (_reopen).
    _reopened = False

    def __init__(self, file: TextIO) -> None:
        self._file = file
        # The descriptor and the file it is open on (device, inode), for _reopen.
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        try:
            fd = file.fileno()
            self._identity = _identity(fd)
            self._fd = fd
        except (OSError, ValueError, AttributeError):
            pass  # closed already, or no descriptor (a test's capture): never reopened

    def msg(self, message: str) -> None:
        with self._lock:
            if _LineWriter._writing:  # re-entered from a signal handler mid-line
                return
            try:
                _LineWriter._writing = True
                for attempt in range(2):
                    try:
                        self._file.write(message + "\n")
                    except ValueError:
                        if attempt == 0 and self._reopen():
                            continue
                        raise
                    # Not retried: a close between the write and here flushed the line.
                    self._file.flush()
                    break
            except _GONE:
                _to_devnull(self._file)
            except Exception:
                # A closed file that cannot be reopened (ValueError), a full disk, or a
                # re-entrant call into the buffered writer (RuntimeError): the line is
                # dropped.
                pass
            finally:
                _LineWriter._writing = False

    def _reopen(self) -> bool:
        """A handler closed ``sys.stdout``, whose descriptor stays open (Python's own
        stdout does not close it): the lines go on to that descriptor instead of being
        dropped, every one, for as long as the worker lived. Only if the descriptor is
        still open on the same file: one that was closed with it (a file of our own, a
        test's capture) may since have been given to a file or socket of the app's. True
        if reopened."""
        if not getattr(self._file, "closed", False) or self._fd is None:
            return False
        try:
            if _identity(self._fd) != self._identity:
                return False
            self._file = open(  # noqa: SIM115 (lives as long as the writer)
                self._fd,
                "w",
                encoding=getattr(self._file, "encoding", None) or "utf-8",
                errors="backslashreplace",
                closefd=False,
            )
        except (OSError, ValueError):
            return False
        if not _LineWriter._reopened:
            _LineWriter._reopened = True
            with contextlib.suppress(OSError, ValueError, AttributeError):
                print(
                    "pgqueue: sys.stdout was closed (by a handler?): logs go on to its file"
                    " descriptor",
                    file=sys.stderr,
                )
        return True

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def _identity(fd: int) -> tuple[int, int]:
    """The file ``fd`` is open on: (device, inode)."""
    stat = os.fstat(fd)
    return stat.st_dev, stat.st_ino


def _to_devnull(file: TextIO) -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, file.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError):  # no file descriptor (a test's capture): drop lines only
        return
    with contextlib.suppress(OSError, ValueError, AttributeError):
        print("pgqueue: stdout's reader is gone: logs go to /dev/null", file=sys.stderr)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
