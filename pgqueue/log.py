"""structlog set-up, to stdout: JSON lines when stdout is not a terminal, readable colour
output on one.

Events are named ``noun.verb`` in the past tense (``job.claimed``, ``lease.lost``) and
carry ``job_id``, ``task``, ``queue`` and ``attempt``; never a job's arguments.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog for a daemon; ``fmt`` is 'json', 'console' or 'auto'."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    use_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    exceptions: Any = (
        structlog.processors.format_exc_info
        if use_json
        else structlog.processors.StackInfoRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
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
    # Libraries' standard-library logging (psycopg's pool: "error connecting in ...")
    # goes the same way, as events named by the message and carrying the logger's name,
    # instead of plain text on stderr.
    handler = _StdlibHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
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
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(numeric, logging.WARNING))


class _StdlibHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        _LineWriter(sys.stdout).msg(line)


# Undefined table, schema, function or column: what a query meets in a database that was
# never migrated, or migrated by an older pgqueue.
_SCHEMA_SQLSTATES = frozenset({"42P01", "3F000", "42883", "42703"})
SCHEMA_HINT = "the pgqueue schema is missing or older than this pgqueue: run `pgqueue migrate`"


def _schema_hint(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """An error logged with its exception that means "not migrated" becomes one line
    that says so (``error`` and ``hint``) instead of a traceback, repeated by every loop
    that retries."""
    exc_info = event.get("exc_info")
    if exc_info is True:
        exc: object = sys.exc_info()[1]
    elif isinstance(exc_info, tuple):
        exc = exc_info[1]
    else:
        exc = exc_info
    if getattr(exc, "sqlstate", None) in _SCHEMA_SQLSTATES and "pgqueue" in str(exc):
        del event["exc_info"]
        event["error"] = str(exc).strip().splitlines()[0]
        event["hint"] = SCHEMA_HINT
    return event


class _LineWriter:
    """Writes each event as one line, in one write. A log line must never stop a daemon:
    if stdout is closed or its reader has gone (a pipe into ``head``, a restarted
    journald), the line is dropped instead of raising into the signal handler or loop
    that logged it. After a broken pipe, stdout is pointed at /dev/null, so that later
    lines and the interpreter's flush at exit (which would turn exit status 0 into 120)
    fail no more."""

    _lock = threading.Lock()

    def __init__(self, file: TextIO) -> None:
        self._file = file

    def msg(self, message: str) -> None:
        with self._lock:
            try:
                self._file.write(message + "\n")
                self._file.flush()
            except BrokenPipeError:
                _to_devnull(self._file)
            except (OSError, ValueError):  # ValueError: the file was closed
                pass

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def _to_devnull(file: TextIO) -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, file.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError):  # no file descriptor (a test's capture): drop lines only
        pass


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
