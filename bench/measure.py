"""The measurements: each runs one system once and returns a ``Sample``.

Workers and producers are subprocesses (see procs.py); the bench process only seeds,
polls cheap progress queries, and reads timings that the database (or the handlers'
record files) kept, so its own cost stays out of the numbers as far as possible.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procs
from bench.systems import APPS_DIR, Marker, System, Worker


class MeasurementError(RuntimeError):
    """A run that did not produce a valid number (incomplete drain, timeout...)."""


@dataclass
class Sample:
    value: float | None
    extra: dict[str, Any] = field(default_factory=dict)


# --- helpers ---------------------------------------------------------------------------


@dataclass
class Running:
    worker: Worker
    popen: list[subprocess.Popen[bytes]]
    rss: procs.RssSampler
    started: float


@contextlib.contextmanager
def workers(
    system: System,
    processes: int,
    concurrency: int,
    log_dir: Path,
    *,
    record_dir: Path | None = None,
) -> Iterator[Running]:
    """Run the system's workers for the ``with`` block; stop them (and check that they
    are gone) at its end, whatever happens."""
    worker = system.worker(processes, concurrency)
    env = system.env()
    if record_dir is not None:
        env["BENCH_RECORD_DIR"] = str(record_dir)
    log = log_dir / f"{system.name}-workers.log"
    started = time.monotonic()
    running: list[subprocess.Popen[bytes]] = []
    sampler: procs.RssSampler | None = None
    try:
        for argv in worker.commands:
            running.append(procs.spawn(argv, env=env, cwd=APPS_DIR, log=log))
        sampler = procs.RssSampler([p.pid for p in running]).start()
        yield Running(worker, running, sampler, started)
    finally:
        if sampler is not None:
            sampler.finish()
        for proc in running:
            procs.terminate(proc)
        codes = [procs.stop(proc) for proc in running]
    if any(code not in (0, -15) for code in codes):
        print(
            f"  note: {system.name} workers exited with {codes} (None: killed after the"
            f" grace period); see {log}",
            flush=True,
        )


def _check_alive(run: Running, system: System, log_dir: Path) -> None:
    for proc in run.popen:
        if proc.poll() is not None:
            raise MeasurementError(
                f"{system.name} worker died with exit code {proc.returncode};"
                f" see {log_dir / (system.name + '-workers.log')}"
            )


def _rss(run: Running) -> dict[str, Any]:
    run.rss.finish_sample()
    return {
        "worker_cpu_seconds": run.rss.cpu_seconds(),
        "rss_peak_process_mib": run.rss.peak_process() / 2**20,
        "rss_peak_tree_mib": run.rss.peak_total / 2**20,
        "processes": len(run.rss.peak_by_pid),
    }


@dataclass
class ProducerResult:
    count: int
    start: float
    end: float
    max_behind: float = 0.0


def run_producers(
    system: System,
    producers: int,
    args: list[str],
    log_dir: Path,
    *,
    timeout: float,
    record_dir: Path | None = None,
    out_files: list[Path] | None = None,
    before_go: Any = None,
) -> list[ProducerResult]:
    """Start ``producers`` copies of bq_produce, wait until each is READY (connected and
    warmed up), call ``before_go`` if given, release them at once, collect their results."""
    env = system.env()
    if record_dir is not None:
        env["BENCH_RECORD_DIR"] = str(record_dir)
    log = log_dir / f"{system.name}-producers.log"
    started: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(producers):
            extra = ["--prefix", f"p{i}"]
            if out_files is not None:
                extra += ["--out", str(out_files[i])]
            started.append(
                procs.spawn(
                    [*system.producer_command(), *args, *extra],
                    env=env,
                    cwd=APPS_DIR,
                    log=log,
                    stdin=True,
                    stdout_pipe=True,
                )
            )
        for proc in started:
            line = _read_line(proc, timeout=60.0)
            if line.strip() != "READY":
                raise MeasurementError(f"{system.name} producer did not start: {line!r}; see {log}")
        if before_go is not None:
            before_go()
        for proc in started:
            assert proc.stdin is not None
            proc.stdin.write(b"GO\n")
            proc.stdin.flush()
        results = []
        deadline = time.monotonic() + timeout
        for proc in started:
            line = _read_line(proc, timeout=max(1.0, deadline - time.monotonic()))
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                raise MeasurementError(
                    f"{system.name} producer failed: {line!r}; see {log}"
                ) from None
            results.append(
                ProducerResult(
                    int(data["count"]),
                    float(data["start"]),
                    float(data["end"]),
                    float(data.get("max_behind", 0.0)),
                )
            )
            proc.wait(30)
        return results
    finally:
        for proc in started:
            procs.stop(proc, timeout=5.0)


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """One line of a child's stdout, or a MeasurementError after ``timeout`` seconds."""
    assert proc.stdout is not None
    box: list[bytes] = []
    stream = proc.stdout
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box:
        raise MeasurementError(f"no answer from producer {proc.args!r} within {timeout:.0f}s")
    return box[0].decode(errors="replace")


def read_records(record_dir: Path) -> dict[str, float]:
    """``key -> handler start`` from every worker process's record file (first start
    wins: a job run twice counts from its first start)."""
    starts: dict[str, float] = {}
    for path in record_dir.glob("*.rec"):
        for line in path.read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(" ")
            if key and value:
                starts.setdefault(key, float(value))
    return starts


def read_commits(paths: list[Path]) -> dict[str, float]:
    commits: dict[str, float] = {}
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(" ")
            if key and value:
                commits[key] = float(value)
    return commits


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def _wait(
    cond: Any, *, timeout: float, interval: float, run: Running | None = None, **kw: Any
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if run is not None:
            _check_alive(run, kw["system"], kw["log_dir"])
        time.sleep(interval)
    return bool(cond())


# --- figures ---------------------------------------------------------------------------


def enqueue(
    system: System,
    *,
    mode: str,
    jobs: int,
    producers: int,
    log_dir: Path,
    timeout: float,
) -> Sample:
    """Jobs per second through the one-job API (``single``) or the bulk API (``bulk``),
    from the moment all producers are released to the last one's end."""
    system.reset()
    each = jobs // producers
    results = run_producers(
        system,
        producers,
        ["--mode", mode, "--n", str(each)],
        log_dir,
        timeout=timeout,
    )
    start = min(r.start for r in results)
    end = max(r.end for r in results)
    count = sum(r.count for r in results)
    return Sample(count / (end - start), {"jobs": count, "seconds": end - start})


def wait_idle(run: Running, system: System, log_dir: Path, timeout: float = 30.0) -> None:
    """Wait until the workers have started and gone idle: their CPU time stops growing
    (less than 20 ms in half a second), and at least a second has passed."""
    deadline = time.monotonic() + timeout
    last = -1.0
    while time.monotonic() < deadline:
        _check_alive(run, system, log_dir)
        run.rss.finish_sample()
        now = run.rss.cpu_seconds()
        if time.monotonic() - run.started > 1.0 and 0 <= now - last < 0.02:
            return
        last = now
        time.sleep(0.5)


def drain(
    system: System,
    *,
    jobs: int,
    processes: int,
    concurrency: int,
    log_dir: Path,
    timeout: float,
) -> Sample:
    """Start the workers on an empty queue and let them go idle; then enqueue ``jobs``
    no-op jobs in one transaction, run until all are done, check in the database that
    every job finished, and time them by their finish times. CPU per job of the workers
    and of their Postgres server processes is counted from the idle point on."""
    system.reset()
    system.analyze()
    with workers(system, processes, concurrency, log_dir) as run:
        wait_idle(run, system, log_dir)
        backends = system.backend_pids()
        backend_cpu0 = procs.cpu_seconds_of(backends)
        worker_cpu0 = run.rss.cpu_seconds()
        marker = system.mark()
        system.seed(jobs)
        seeded = time.monotonic()
        ok = _wait(
            lambda: system.drained(marker, jobs),
            timeout=timeout,
            interval=0.25,
            run=run,
            system=system,
            log_dir=log_dir,
        )
        wall = time.monotonic() - seeded
        # The last outcomes may still be in flight: wait until the count is complete.
        _wait(lambda: system.done(marker) >= jobs, timeout=10.0 if ok else 0.1, interval=0.1)
        rss = _rss(run)
        worker_cpu = rss["worker_cpu_seconds"] - worker_cpu0
        backend_cpu = procs.cpu_seconds_of(backends) - backend_cpu0
        label = run.worker.label
    fin = system.finish(marker)
    unfinished = system.unfinished()
    extra: dict[str, Any] = {
        "jobs": jobs,
        "done": fin.count,
        "unfinished": unfinished,
        "wall_seconds_after_enqueue": wall,
        "setting": label,
        "worker_cpu_us_per_job": worker_cpu / jobs * 1e6,
        "postgres_cpu_us_per_job": backend_cpu / jobs * 1e6 if backends else None,
        **rss,
    }
    if fin.count != jobs or unfinished:
        extra["error"] = f"incomplete: {fin.count} of {jobs} done, {unfinished} unfinished" + (
            "" if ok else f" (timeout {timeout:.0f}s)"
        )
    rate = fin.rate()
    if rate is None and "error" not in extra:
        extra["error"] = _NO_RATE
    return Sample(rate, extra)


def latency(
    system: System,
    *,
    jobs: int,
    rate: float,
    concurrency: int,
    log_dir: Path,
    timeout: float,
) -> Sample:
    """Enqueue ``jobs`` one per transaction at ``rate``/s to idle workers; the latency
    of each is its handler's start minus its producer's commit (both CLOCK_MONOTONIC)."""
    system.reset()
    record_dir = Path(tempfile.mkdtemp(prefix=f"rec-{system.name}-", dir=log_dir))
    out = record_dir / "commits.txt"
    try:
        with workers(system, 1, concurrency, log_dir, record_dir=record_dir) as run:

            def ready() -> None:
                if not _wait(
                    lambda: "warmup-p0" in read_records(record_dir),
                    timeout=60.0,
                    interval=0.05,
                    run=run,
                    system=system,
                    log_dir=log_dir,
                ):
                    raise MeasurementError(f"{system.name} workers never ran the warm-up job")
                time.sleep(0.5)  # idle again

            run_producers(
                system,
                1,
                [
                    "--mode",
                    "paced",
                    "--kind",
                    "rec",
                    "--n",
                    str(jobs),
                    "--rate",
                    str(rate),
                    "--warmup-kind",
                    "rec",
                ],
                log_dir,
                timeout=timeout,
                record_dir=record_dir,
                out_files=[out],
                before_go=ready,
            )
            commits = read_commits([out])
            _wait(
                lambda: len(commits.keys() & read_records(record_dir).keys()) >= len(commits),
                timeout=30.0,
                interval=0.1,
            )
            rss = _rss(run)
        starts = read_records(record_dir)
    finally:
        shutil.rmtree(record_dir, ignore_errors=True)
    lat = [(starts[k] - c) * 1000.0 for k, c in commits.items() if k in starts]
    missing = len(commits) - len(lat)
    if not lat:
        return Sample(None, {"error": "no job started"})
    extra: dict[str, Any] = {
        "jobs": len(commits),
        "missing": missing,
        "p50_ms": percentile(lat, 50),
        "p95_ms": percentile(lat, 95),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat),
        "mean_ms": statistics.fmean(lat),
        **rss,
    }
    if missing:
        extra["error"] = f"{missing} jobs never started"
    return Sample(extra["p50_ms"], extra)


def sustained(
    system: System,
    *,
    rate: float,
    seconds: float,
    processes: int,
    concurrency: int,
    sleep_ms: str,
    windows: int,
    log_dir: Path,
    producers: int = 1,
) -> Sample:
    """``producers`` processes at ``rate / producers`` jobs/s each (one bulk call per 10 ms
    tick) of jobs that sleep ``sleep_ms``; latency percentiles per time window and the
    backlog every second."""
    system.reset()
    record_dir = Path(tempfile.mkdtemp(prefix=f"rec-{system.name}-", dir=log_dir))
    outs = [record_dir / f"commits-{i}.txt" for i in range(producers)]
    warmups = {f"warmup-p{i}" for i in range(producers)}
    backlog: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample_backlog() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                backlog.append((time.monotonic(), system.waiting()))
            stop.wait(1.0)

    try:
        with workers(system, processes, concurrency, log_dir, record_dir=record_dir) as run:
            sampler = threading.Thread(target=sample_backlog, daemon=True)

            def ready() -> None:
                if not _wait(
                    lambda: warmups <= read_records(record_dir).keys(),
                    timeout=60.0,
                    interval=0.05,
                    run=run,
                    system=system,
                    log_dir=log_dir,
                ):
                    raise MeasurementError(f"{system.name} workers never ran the warm-up job")
                sampler.start()

            results = run_producers(
                system,
                producers,
                [
                    "--mode",
                    "rate",
                    "--kind",
                    "sleep",
                    "--rate",
                    str(rate / producers),
                    "--seconds",
                    str(seconds),
                    "--sleep-ms",
                    sleep_ms,
                    "--warmup-kind",
                    "rec",
                ],
                log_dir,
                timeout=seconds + 120.0,
                record_dir=record_dir,
                out_files=outs,
                before_go=ready,
            )
            commits = read_commits(outs)
            # Let the backlog drain (bounded): the tail is part of the picture.
            _wait(
                lambda: len(commits.keys() & read_records(record_dir).keys()) >= len(commits),
                timeout=max(30.0, seconds),
                interval=0.5,
            )
            stop.set()
            rss = _rss(run)
        starts = read_records(record_dir)
    finally:
        stop.set()
        shutil.rmtree(record_dir, ignore_errors=True)
    t0 = min(r.start for r in results)
    produced = sum(r.count for r in results)
    per_window: list[dict[str, Any]] = []
    width = seconds / windows
    points = [(c - t0, (starts[k] - c) * 1000.0) for k, c in commits.items() if k in starts]
    for w in range(windows):
        lo, hi = w * width, (w + 1) * width
        lat = [v for t, v in points if lo <= t < hi]
        depth = [n for t, n in backlog if lo <= t - t0 < hi]
        per_window.append(
            {
                "from_s": round(lo, 1),
                "jobs": len(lat),
                "p50_ms": percentile(lat, 50) if lat else None,
                "p99_ms": percentile(lat, 99) if lat else None,
                "backlog_max": max(depth) if depth else None,
            }
        )
    lat_all = [v for _, v in points]
    missing = len(commits) - len(lat_all)
    extra: dict[str, Any] = {
        "target_rate": rate,
        "achieved_rate": produced / seconds,
        "producers": producers,
        "producer_max_behind_s": max(r.max_behind for r in results),
        "missing": missing,
        "windows": per_window,
        "backlog_max": max((n for _, n in backlog), default=None),
        "backlog_end": next((n for t, n in reversed(backlog) if t - t0 <= seconds), None),
        **rss,
    }
    if not lat_all:
        return Sample(None, {**extra, "error": "no job started"})
    extra.update(
        p50_ms=percentile(lat_all, 50),
        p95_ms=percentile(lat_all, 95),
        p99_ms=percentile(lat_all, 99),
        max_ms=max(lat_all),
    )
    if missing:
        extra["error"] = f"{missing} jobs had not started when the run ended"
    return Sample(extra["p99_ms"], extra)


# A drain whose jobs all finished at one timestamp (one flushed batch) has no rate.
_NO_RATE = "no rate: every job finished at the same recorded instant (one batch); drain more jobs"


def backlog_drain(
    system: System,
    *,
    marker: Marker,
    measure: int,
    processes: int,
    concurrency: int,
    log_dir: Path,
    timeout: float,
    warmup: int = 0,
    refill: bool = False,
    hold_waiting: int | None = None,
) -> tuple[Sample, int]:
    """With a seeded backlog in place, run workers until ``warmup + measure`` more jobs
    finished; the rate over the ``measure`` that finished after the first ``warmup`` (the
    workers' start-up: connecting, preparing statements, the first claims). With
    ``refill``, a feeder inserts as many runnable jobs as have finished, every 0.1 s; or,
    with ``hold_waiting`` (a backlog small enough to count often), every 0.05 s as many
    as it takes to bring the runnable jobs waiting back to that number: replacing only
    finished jobs left the ones claimed and in flight (up to a claim per worker process)
    and the drain between two feeds unreplaced, which starves a small backlog. Returns
    the sample and by how many jobs the backlog shrank."""
    fed = [0]
    stop = threading.Event()
    feeder_errors: list[BaseException] = []
    seen_waiting: list[int] = []

    def feed() -> None:
        try:
            while not stop.wait(0.1 if hold_waiting is None else 0.05):
                if hold_waiting is None:
                    missing = system.done(marker) - fed[0]
                else:
                    waiting = system.waiting()
                    seen_waiting.append(waiting)
                    missing = hold_waiting - waiting
                if missing > 0:
                    system.seed(missing)
                    fed[0] += missing
        except BaseException as exc:  # reported in the sample, never swallowed
            feeder_errors.append(exc)

    feeder = threading.Thread(target=feed, name="backlog-feeder", daemon=True)
    with workers(system, processes, concurrency, log_dir) as run:
        if refill:
            feeder.start()
        try:
            ok = _wait(
                lambda: bool(feeder_errors) or system.done(marker) >= warmup + measure,
                timeout=timeout,
                interval=0.25,
                run=run,
                system=system,
                log_dir=log_dir,
            )
        finally:
            stop.set()
            if refill:
                feeder.join()
        rss = _rss(run)
    fin = system.finish(marker, limit=measure, skip=warmup)
    consumed = system.done(marker) - fed[0]
    extra: dict[str, Any] = {
        "measured_jobs": fin.count,
        "warmup_jobs": warmup,
        "fed_jobs": fed[0],
        **rss,
    }
    if seen_waiting:
        # What the feeder found waiting before each top-up (the low points).
        ordered = sorted(seen_waiting)
        extra["waiting_min"] = ordered[0]
        extra["waiting_median"] = ordered[len(ordered) // 2]
    if feeder_errors:
        extra["error"] = f"backlog feeder failed: {feeder_errors[0]!r}"
        return Sample(None, extra), consumed
    if not ok or fin.count < measure:
        extra["error"] = f"only {fin.count} of {measure} done within {timeout:.0f}s"
    rate = fin.rate()
    if rate is None and "error" not in extra:
        extra["error"] = _NO_RATE
    return Sample(rate, extra), consumed
