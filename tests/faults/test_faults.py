"""The short fault-injection run, in CI: about 2,000 jobs and every fault kind at least
once in about a minute, on a throwaway Postgres of its own (see tests/faults/driver.py;
``make chaos`` runs the long version with the same checks).

Set PGQUEUE_FAULTS_SEED to replay another schedule.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from tests.faults.driver import (
    BLOCK_EVENT_LOOP,
    FAULT_KINDS,
    SIGKILL_WORKER,
    SIGSTOP_WORKER,
    SIGTERM_WORKER,
    WORKER_CRASH,
    Settings,
    run,
)

SHORT = Settings(jobs=2000, duration=40.0, seed=int(os.environ.get("PGQUEUE_FAULTS_SEED", "1")))


@pytest.mark.timeout(420)
def test_short_fault_run_keeps_every_promise(tmp_path: Path) -> None:
    report = run(dataclasses.replace(SHORT, log_dir=tmp_path / "logs"))
    print(report.table())
    assert report.ok, report.table()

    # The run really did what it claims: every fault kind, workers hit mid-job, a
    # stale worker's late result fenced off, a job released by a graceful stop, and
    # every poison job ending its process at least max_attempts times.
    counts = report.fault_counts()
    assert all(counts[kind] >= 1 for kind in FAULT_KINDS), counts
    hit_mid_job = {f.kind for f in report.faults if f.at_risk}
    mid_job = {SIGKILL_WORKER, SIGTERM_WORKER, SIGSTOP_WORKER, BLOCK_EVENT_LOOP}
    assert mid_job <= hit_mid_job, report.table()
    assert report.stale_fenced >= 1, report.table()
    assert report.released >= 1, report.table()
    assert counts[WORKER_CRASH] >= report.poison * SHORT.poison_max_attempts, report.table()
    assert report.lost == 0 and report.completed == report.normal
    assert report.dead == report.dead_poison == report.poison


@pytest.mark.timeout(420)
def test_short_fault_run_with_only_embedded_reapers_keeps_every_promise(tmp_path: Path) -> None:
    # No pgqueue-reaper: every worker runs one (--reaper), one leading at a time. The
    # leader's worker is SIGKILLed, SIGSTOPped and cut off like any other.
    settings = dataclasses.replace(
        SHORT, jobs=1500, reapers=0, embedded_reapers=True, backoff_base=1.0,
        log_dir=tmp_path / "logs",
    )  # fmt: skip
    report = run(settings)
    print(report.table())
    assert report.ok, report.table()
    assert report.lost == 0 and report.completed == report.normal
    assert report.dead == report.dead_poison == report.poison
