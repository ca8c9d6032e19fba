"""Shared by every benchmark app: what the handlers do, and how they say when they started.

This module runs inside worker and producer subprocesses, including Oban's Python 3.12
venv, so it uses the standard library only. The apps directory is put on PYTHONPATH;
the ``bq_`` prefix keeps these modules from shadowing real packages.

A handler that records writes one line ``<key> <time.monotonic()>`` per job to a file of
its own process (``$BENCH_RECORD_DIR/<pid>.rec``), in one ``write`` to an ``O_APPEND``
descriptor: nothing is buffered, so the file is complete whenever the bench reads it.
``CLOCK_MONOTONIC`` is one clock for every process on a Linux machine, so a producer's
commit time and a handler's start time compare directly.
"""

from __future__ import annotations

import os
import time
from typing import Any

KINDS = ("noop", "rec", "sleep")
_fd: int | None = None


def _record_fd() -> int | None:
    global _fd
    if _fd is None:
        folder = os.environ.get("BENCH_RECORD_DIR")
        if not folder:
            return None
        path = os.path.join(folder, f"{os.getpid()}.rec")
        _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    return _fd


def record(key: Any) -> None:
    """Note that the job ``key`` started now."""
    now = time.monotonic()
    fd = _record_fd()
    if fd is not None:
        os.write(fd, f"{key} {now:.6f}\n".encode())


def sleep_seconds(args: Any) -> float:
    """How long a 'sleep' job sleeps (its ``ms`` argument)."""
    return float(args.get("ms", 0)) / 1000.0
