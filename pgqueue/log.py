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
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info
            if use_json
            else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line (message and newline together): processes sharing a log file
        # (a supervisor and its children) never interleave halves of lines.
        logger_factory=lambda *args: _LineWriter(sys.stdout),
        cache_logger_on_first_use=True,
    )


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
