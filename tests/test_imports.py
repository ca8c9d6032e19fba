"""What importing pgqueue loads: a process that only enqueues (a web server, a script)
must not pay for the worker's pool, logging, metrics and their libraries."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import psycopg

from tests.conftest import ROOT, job_row

# Loaded by the worker and the daemons, never by a producer.
HEAVY = (
    "click",
    "pgqueue.cli",
    "pgqueue.log",
    "pgqueue.metrics",
    "pgqueue.reaper",
    "pgqueue.worker",
    "prometheus_client",
    "psycopg_pool",
    "structlog",
)


def _run(code: str) -> Any:
    """Run ``code`` in a new interpreter; return the JSON it prints last."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_producer_loads_no_worker_module(dsn: str, conn: psycopg.Connection[Any]) -> None:
    out = _run(
        f"""
        import json, sys
        import psycopg
        import pgqueue
        from pgqueue import (
            Backoff, ConfigError, JobSpec, JobState, PgQueueError, Registry, ReaperConfig,
            WorkerConfig, current_job, enqueue, enqueue_many, migrate,
        )

        registry = Registry()

        @registry.task(name="send", queue="mail")
        def send(to: str) -> None: ...

        with psycopg.connect({dsn!r}, autocommit=True) as conn:
            one = enqueue(conn, "send", {{"to": "a@b.c"}})
            two = send.enqueue(conn, "d@e.f")
            many = enqueue_many(conn, [JobSpec("send", {{"to": "g@h.i"}})])
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        print(json.dumps({{"ids": [one, two, *many], "heavy": heavy}}))
        """
    )
    assert out["heavy"] == []
    rows = [job_row(conn, job_id) for job_id in out["ids"]]
    # By name, enqueue takes the queue of the task registered under it.
    assert [(r["task"], r["queue"], r["args"]) for r in rows if r] == [
        ("send", "mail", {"to": "a@b.c"}),
        ("send", "mail", {"to": "d@e.f"}),
        ("send", "mail", {"to": "g@h.i"}),
    ]


def test_worker_and_reaper_load_on_first_use() -> None:
    out = _run(
        """
        import json, sys
        import pgqueue
        before = "pgqueue.worker" in sys.modules or "pgqueue.reaper" in sys.modules
        from pgqueue import Worker
        from pgqueue.worker.daemon import Worker as DaemonWorker
        from pgqueue.reaper import Reaper as ModuleReaper
        try:
            pgqueue.Nothing
            missing = None
        except AttributeError as exc:
            missing = str(exc)
        namespace = {}
        exec("from pgqueue import *", namespace)
        print(json.dumps({
            "before": before,
            "worker": Worker is DaemonWorker,
            "reaper": pgqueue.Reaper is ModuleReaper,
            "dir": sorted(set(pgqueue.__all__) - set(dir(pgqueue))),
            "star": sorted(set(pgqueue.__all__) - set(namespace)),
            # Submodules of these names are imported by the worker: the attributes must
            # stay the functions.
            "functions": [
                type(pgqueue.migrate).__name__, type(pgqueue.enqueue).__name__
            ],
            "missing": missing,
        }))
        """
    )
    assert out == {
        "before": False,
        "worker": True,
        "reaper": True,
        "dir": [],
        "star": [],
        "functions": ["function", "function"],
        "missing": "module 'pgqueue' has no attribute 'Nothing'",
    }
