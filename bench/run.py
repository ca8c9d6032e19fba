"""``python -m bench``: measure pgqueue against its competitors and the Postgres ceiling.

Every size is an option; ``--quick`` is a small profile (one repetition, a subset of the
figures, about 2-3 minutes) for checking that everything works; the default profile is
the full one (hours on a 2-core machine: procrastinate alone drains ~1k jobs/s). Results
go to bench/results/latest.md and latest.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bench import db, measure, procs
from bench.ceiling import Ceiling
from bench.measure import MeasurementError, Sample
from bench.report import Figure, Report
from bench.systems import ALL, BENCH_DIR, Context, System

FIGURES = ("enqueue", "drain", "latency", "sustained", "backlog", "footprint", "ceiling")
QUICK_FIGURES = ("enqueue", "drain", "latency", "ceiling")
# Each system's best concurrency (or batch size) for no-op drains: a sweep of 10, 100, 300
# and 1000 with 2 processes on 2026-11-28 (pgqueue 1000 ~ 300 > 100; PgQueuer rises to 1000;
# procrastinate and Celery are best at 10; Oban at 1000).
DEFAULT_BEST = "pgqueue=1000,pgqueuer=1000,procrastinate=10,oban=1000,celery=10"
OBAN_VENV = BENCH_DIR / ".venvs" / "oban"
OBAN_REQUIREMENT = "oban>=0.7"
REPO_DIR = BENCH_DIR.parent
PGQUEUE_VENV = BENCH_DIR / ".venvs" / "pgqueue"

# (option, full default, --quick value)
PROFILE: dict[str, tuple[Any, Any]] = {
    "repeat": (3, 1),
    "figures": (",".join(FIGURES), ",".join(QUICK_FIGURES)),
    "enqueue_jobs": (10_000, 500),
    "enqueue_producers": (4, 4),
    "enqueue_jobs_multi": (20_000, 1_000),
    "bulk_jobs": (50_000, 5_000),
    "drain_jobs": ("20000,200000", "1000"),
    "drain_configs": ("1:1,1:best,2:1,2:best", "1:1,1:best,2:best"),
    "latency_jobs": (1_000, 100),
    "latency_rate": (50.0, 50.0),
    "sustained_rate": (2_000.0, 200.0),
    "sustained_seconds": (180.0, 10.0),
    "sustained_processes": (2, 2),
    "sustained_producers": (1, 1),
    "sustained_concurrency": (100, 50),
    "sustained_windows": (6, 2),
    "sustained_sleep_ms": ("10,50", "10,50"),
    "backlog_sizes": ("10000,1000000,5000000", "10000,100000"),
    "backlog_future": (0.2, 0.2),
    "backlog_measure": (6_000, 2_000),
    "backlog_warmup": (1_000, 200),
    "backlog_processes": (2, 2),
    "footprint_jobs": (1_000_000, 20_000),
    "ceiling_clients": ("1,2,4,8", "1,4"),
    "ceiling_batches": ("1,100", "1,100"),
    "ceiling_jobs_batch1": (10_000, 2_000),
    "ceiling_jobs": (200_000, 30_000),
    "insert_clients": ("1,4", "1,4"),
    "insert_rows_single": (10_000, 2_000),
    "insert_rows_bulk": (500_000, 100_000),
}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark pgqueue against PgQueuer, procrastinate, Oban (Python) and"
        " Celery (Redis) on one Postgres, plus the pgbench ceiling.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repetition, a subset")
    p.add_argument("--systems", default=",".join(ALL), help="systems to measure")
    p.add_argument(
        "--admin-dsn",
        default=os.environ.get("BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a database to connect to for CREATE/DROP DATABASE",
    )
    p.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/13",
        help="an EMPTY Redis database for Celery (emptied at the end)",
    )
    p.add_argument("--python312", default="", help="Python >= 3.12 for Oban's venv")
    p.add_argument(
        "--out",
        default=None,
        help="where latest.* go (default bench/results; with --quick bench/results/quick,"
        " which git ignores: quick numbers are not for keeping)",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    p.add_argument(
        "--pgqueue-worker-args",
        default="",
        metavar="ARGS",
        help="extra pgqueue-worker arguments, e.g. '--async-commit' (default: none)",
    )
    p.add_argument(
        "--pgqueue-shared-venv",
        action="store_true",
        help="run pgqueue's workers from the bench's venv, beside the competitors'"
        " packages, instead of from bench/.venvs/pgqueue (pgqueue and its dependencies)",
    )
    p.add_argument(
        "--backlog-refill",
        action="store_true",
        help="backlog figure: a feeder adds as many runnable jobs as the workers finish"
        " (every 0.1 s), so the backlog stays at its size however long the window",
    )
    p.add_argument(
        "--best",
        default=DEFAULT_BEST,
        help="per system, the concurrency of its 'best' setting (see README)",
    )
    for name, (full, _) in PROFILE.items():
        flag = "--" + name.replace("_", "-")
        kind = type(full)
        p.add_argument(flag, type=kind, default=None, help=f"(full: {full})")
    opts = p.parse_args(argv)
    if opts.out is None:
        opts.out = str(BENCH_DIR / "results" / "quick" if opts.quick else BENCH_DIR / "results")
    for name, (full, quick) in PROFILE.items():
        if getattr(opts, name) is None:
            setattr(opts, name, quick if opts.quick else full)
    if opts.sustained_producers < 1:
        p.error("--sustained-producers must be at least 1")
    return opts


# --- environment ---------------------------------------------------------------------------


def find_python312(explicit: str) -> str | None:
    candidates = [explicit] if explicit else []
    candidates += [shutil.which(f"python3.{minor}") or "" for minor in (12, 13)]
    home = Path.home()
    candidates += sorted(glob.glob(str(home / ".pyenv/versions/3.1[2-9]*/bin/python3")))
    for candidate in candidates:
        if not candidate:
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info >= (3, 12))"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if out.stdout.strip() == "True":
                return candidate
    return None


def ensure_oban_venv(explicit_python: str) -> Path | None:
    """bench/.venvs/oban with ``oban`` installed (Oban for Python needs Python 3.12+)."""
    python = OBAN_VENV / "bin" / "python"
    if python.exists():
        ok = subprocess.run([python, "-c", "import oban"], capture_output=True).returncode == 0
        if ok:
            return python
    base = find_python312(explicit_python)
    if base is None:
        return None
    print(f"setting up Oban's venv in {OBAN_VENV} with {base}", flush=True)
    subprocess.run([base, "-m", "venv", "--clear", str(OBAN_VENV)], check=True)
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", OBAN_REQUIREMENT],
        check=True,
    )
    return python


def ensure_pgqueue_venv() -> Path:
    """bench/.venvs/pgqueue: this checkout (editable) and pgqueue's own dependencies only,
    at the versions of the bench's venv, for pgqueue's workers. In the bench's venv they
    would carry the competitors' packages: structlog imports rich when it is installed,
    and PgQueuer brings it (through typer), about 4.5 MiB of a worker's RSS that a
    pgqueue install does not have (``python -m bench.imports_rss``). Installed again only
    when the pins or pyproject.toml changed."""
    import pgqueue

    # The producers, migrations and the ceiling's SQL come from the bench's own pgqueue;
    # the workers must run the same code.
    if REPO_DIR not in Path(pgqueue.__file__).resolve().parents:
        sys.exit(f"the bench's pgqueue ({pgqueue.__file__}) is not this checkout ({REPO_DIR})")
    python = PGQUEUE_VENV / "bin" / "python"
    if not python.exists():
        print(f"setting up pgqueue's venv in {PGQUEUE_VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(PGQUEUE_VENV)], check=True)
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # Pins only: pip refuses a constraint that is a direct reference (name @ url), and
    # pgqueue itself is this checkout.
    pins = "".join(
        line + "\n"
        for line in frozen.splitlines()
        if "==" in line and " @ " not in line and not line.lower().startswith("pgqueue==")
    )
    stamp = pins + (REPO_DIR / "pyproject.toml").read_text()
    stamp_file = PGQUEUE_VENV / "installed.stamp"
    if stamp_file.exists() and stamp_file.read_text() == stamp:
        return python
    constraints = PGQUEUE_VENV / "constraints.txt"
    constraints.write_text(pins)
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "-c", str(constraints), "-e", str(REPO_DIR)],
        check=True,
    )
    stamp_file.write_text(stamp)
    return python


def machine_facts(admin_dsn: str, redis_url: str) -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    facts: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "postgres": db.server_facts(admin_dsn),
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        repo = REPO_DIR
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "pgqueue", "migrations"],
            cwd=repo,
            capture_output=True,
            text=True,
        ).stdout.strip()
        facts["pgqueue_commit"] = head + (" (with uncommitted changes)" if dirty else "")
    with contextlib.suppress(Exception):
        import redis

        facts["redis"] = redis.Redis.from_url(redis_url).info("server")["redis_version"]
    return facts


# --- the run ---------------------------------------------------------------------------


def _note(fig: Any, text: str) -> None:
    """Add a note to a figure once (a figure measured in two blocks gets it once)."""
    if text not in fig.notes:
        fig.notes.append(text)


# Backlogs up to this size are refilled by counting what waits (see backlog_drain).
HOLD_WAITING_MAX = 200_000


class Bench:
    def __init__(
        self, opts: argparse.Namespace, report: Report, systems: list[System], ctx: Context
    ) -> None:
        self.opts = opts
        self.ctx = ctx
        self.report = report
        self.systems = systems
        self.best = {k: int(v) for k, v in (x.split("=") for x in opts.best.split(","))}
        self.log_dir = Path(tempfile.mkdtemp(prefix="pgqueue-bench-"))

    def order(self, rep: int, systems: list[System] | None = None) -> list[System]:
        """The systems, rotated by one for each repetition."""
        pool = systems if systems is not None else self.systems
        k = rep % len(pool) if pool else 0
        return pool[k:] + pool[:k]

    def conc(self, system: System, spec: str) -> int:
        return self.best.get(system.name, 10) if spec == "best" else int(spec)

    def attempt(
        self, fig: Figure, system: System, what: str, fn: Callable[[], Sample]
    ) -> Sample | None:
        t0 = time.monotonic()
        print(f"  {system.name:<14} {what} ...", end="", flush=True)
        try:
            sample = fn()
        except (MeasurementError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
            sample = Sample(None, {"error": f"{type(exc).__name__}: {exc}"})
            traceback.print_exc(file=open(self.log_dir / "errors.log", "a"))  # noqa: SIM115
        except Exception as exc:
            sample = Sample(None, {"error": f"{type(exc).__name__}: {exc}"})
            traceback.print_exc(file=open(self.log_dir / "errors.log", "a"))  # noqa: SIM115
        fig.add(system.name, sample)
        shown = (
            "failed: " + str(sample.extra["error"])
            if "error" in sample.extra
            else (f"{sample.value:,.1f} {fig.unit}" if sample.value is not None else "no value")
        )
        print(f" {shown} ({time.monotonic() - t0:.1f}s)", flush=True)
        return sample

    # --- figures --------------------------------------------------------------------

    def enqueue(self) -> None:
        o = self.opts
        cases = [
            (
                "enqueue_single_1",
                f"enqueue, 1 job/transaction, 1 producer ({o.enqueue_jobs:,} jobs)",
                "single",
                o.enqueue_jobs,
                1,
            ),
            (
                f"enqueue_single_{o.enqueue_producers}",
                f"enqueue, 1 job/transaction, {o.enqueue_producers} producer processes"
                f" ({o.enqueue_jobs_multi:,} jobs)",
                "single",
                o.enqueue_jobs_multi,
                o.enqueue_producers,
            ),
            (
                "enqueue_bulk",
                f"enqueue, bulk API, {o.bulk_jobs:,} jobs in one call",
                "bulk",
                o.bulk_jobs,
                1,
            ),
        ]
        # The raw insert each enqueue figure is held against (issue 5's targets), measured
        # in the same rotation as the queues: measured apart, minutes later, it would
        # compare two different speeds of this shared machine.
        raw: Ceiling | None = None
        pseudo = _Pseudo()
        driver: _PsycopgReference | None = None
        try:
            raw = Ceiling(o.admin_dsn, self.log_dir / "pgbench-enqueue", name="bench_raw_insert")
            raw.work_dir.mkdir(exist_ok=True)
            raw.setup()
            driver = _PsycopgReference(self.ctx, raw.dsn)
        except (FileNotFoundError, psycopg.Error) as exc:
            print(f"(no raw insert reference in the enqueue figures: {exc})", flush=True)
            raw = None
        try:
            for rep in range(o.repeat):
                for key, title, mode, jobs, producers in cases:
                    fig = self.report.figure(key, title, "jobs/s", "higher", "Enqueue")
                    print(f"[{title}, repetition {rep + 1}]", flush=True)
                    references: list[System] = []
                    if raw and driver:
                        references = [pseudo] if mode == "bulk" else [pseudo, driver]
                    for system in self.order(
                        rep, [*self.systems, *references] if references else None
                    ):
                        if system is pseudo:
                            assert raw is not None
                            script = "raw_insert_1000" if mode == "bulk" else "raw_insert_1"
                            self.attempt(
                                fig,
                                pseudo,
                                f"{script} c={producers}",
                                partial(_insert_sample, raw, script, producers, jobs),
                            )
                            continue
                        self.attempt(
                            fig,
                            system,
                            f"{mode} x{producers}",
                            partial(
                                measure.enqueue,
                                system,
                                mode=mode,
                                jobs=jobs,
                                producers=producers,
                                log_dir=self.log_dir,
                                timeout=o.timeout,
                            ),
                        )
                    if raw and rep == 0:
                        fig.notes.append(
                            "Postgres (pgbench): the raw insert this figure is held against,"
                            " measured in the same rotation: "
                            + (
                                "INSERT ... SELECT of 1000 rows per statement"
                                if mode == "bulk"
                                else f"one INSERT per transaction, {producers} client"
                                + ("s" if producers > 1 else "")
                            )
                            + " into a table of pgqueue.jobs' columns, defaults and indexes,"
                            " without its trigger (`pgbench -M prepared`)"
                        )
                        if mode != "bulk":
                            fig.notes.append(
                                "psycopg (raw INSERT), for information: what a synchronous"
                                " producer on psycopg does at best, measured in the same"
                                " rotation by the same producer harness as the queues: per"
                                " job, json.dumps of the args and one prepared `INSERT ..."
                                " RETURNING id` with task and args as parameters (autocommit)"
                                " into that same raw table, no queue library"
                                " (bench/apps/bq_psycopg.py)"
                            )
        finally:
            if raw:
                raw.teardown()
        for system in self.systems:
            system.reset()

    def drain(self) -> None:
        o = self.opts
        configs = [c.split(":") for c in o.drain_configs.split(",")]
        for rep in range(o.repeat):
            for jobs in _ints(o.drain_jobs):
                for procs_text, spec in configs:
                    processes = int(procs_text)
                    key = f"drain_{jobs}_{processes}p_{spec}"
                    title = (
                        f"drain {jobs:,} no-op jobs, {processes} process"
                        f"{'es' if processes > 1 else ''}, "
                        + (
                            "concurrency 1"
                            if spec == "1"
                            else "best setting"
                            if spec == "best"
                            else f"concurrency {spec}"
                        )
                    )
                    fig = self.report.figure(key, title, "jobs/s", "higher", "Drain")
                    print(f"[{title}, repetition {rep + 1}]", flush=True)
                    for system in self.order(rep):
                        conc = self.conc(system, spec)
                        sample = self.attempt(
                            fig,
                            system,
                            f"{processes}p c={conc}",
                            partial(
                                measure.drain,
                                system,
                                jobs=jobs,
                                processes=processes,
                                concurrency=conc,
                                log_dir=self.log_dir,
                                timeout=o.timeout,
                            ),
                        )
                        if sample is not None and "error" not in sample.extra:
                            self._derived(sample, system, jobs, processes, spec)
                        system.reset()

    def _derived(
        self, sample: Sample, system: System, jobs: int, processes: int, spec: str
    ) -> None:
        """Memory and CPU per job, from a drain's samples."""
        setting = f"{processes} process{'es' if processes > 1 else ''}, " + (
            "concurrency 1" if spec == "1" else "best setting" if spec == "best" else spec
        )
        rss = self.report.figure(
            f"rss_{processes}p_{spec}",
            f"worker peak RSS, {setting} (largest process; over every drain size)",
            "MiB",
            "lower",
            "Memory (sampled during the drains)",
        )
        rss.add(
            system.name,
            Sample(
                sample.extra["rss_peak_process_mib"],
                {"tree_mib": sample.extra.get("rss_peak_tree_mib")},
            ),
        )
        for key, what in (
            ("worker_cpu_us_per_job", "the worker processes"),
            ("postgres_cpu_us_per_job", "their Postgres server processes"),
        ):
            value = sample.extra.get(key)
            if value is None:
                continue
            fig = self.report.figure(
                f"cpu_{key}_{jobs}_{processes}p_{spec}",
                f"CPU per job in {what}, drain {jobs:,}, {setting}",
                "\u00b5s",
                "lower",
                "Where the time goes (CPU per job, user + system)",
            )
            fig.add(system.name, Sample(float(value)))

    def latency(self) -> None:
        o = self.opts
        title = f"enqueue→start latency at {o.latency_rate:g} jobs/s, idle workers"
        keys = {"p50_ms": "p50", "p95_ms": "p95", "p99_ms": "p99", "max_ms": "max"}
        figs = {
            k: self.report.figure(f"latency_{v}", f"{title}: {v}", "ms", "lower", "Latency")
            for k, v in keys.items()
        }
        main = figs["p50_ms"]
        main.notes.append(
            f"{o.latency_jobs} jobs, one per transaction; 1 worker process at its best setting;"
            " handler start minus producer commit, both CLOCK_MONOTONIC"
        )
        for rep in range(o.repeat):
            print(f"[{title}, repetition {rep + 1}]", flush=True)
            for system in self.order(rep):
                holder = Figure("tmp", title, "ms", "lower", "Latency")
                sample = self.attempt(
                    holder,
                    system,
                    f"{o.latency_jobs} jobs",
                    partial(
                        measure.latency,
                        system,
                        jobs=o.latency_jobs,
                        rate=o.latency_rate,
                        concurrency=self.conc(system, "best"),
                        log_dir=self.log_dir,
                        timeout=o.timeout,
                    ),
                )
                for k, fig in figs.items():
                    if sample is None:
                        continue
                    if "error" in sample.extra or k not in sample.extra:
                        fig.add(system.name, Sample(None, dict(sample.extra)))
                    else:
                        fig.add(system.name, Sample(float(sample.extra[k]), dict(sample.extra)))
                system.reset()

    def sustained(self) -> None:
        o = self.opts
        title = (
            f"sustained {o.sustained_rate:g} jobs/s of {o.sustained_sleep_ms} ms jobs for"
            f" {o.sustained_seconds:g}s, {o.sustained_processes} processes"
        )
        if o.sustained_producers > 1:
            title += f", {o.sustained_producers} producers"
        p50 = self.report.figure(
            "sustained_p50", f"{title}: latency p50", "ms", "lower", "Sustained load"
        )
        p99 = self.report.figure(
            "sustained_p99", f"{title}: latency p99", "ms", "lower", "Sustained load"
        )
        depth = self.report.figure(
            "sustained_backlog", f"{title}: max backlog", "jobs", "lower", "Sustained load"
        )
        p50.notes.append(
            f"producers: {o.sustained_producers} process(es) at"
            f" {o.sustained_rate / o.sustained_producers:g} jobs/s each, one bulk call per 10 ms"
            " tick with the jobs due;"
            f" concurrency {o.sustained_concurrency} per process; backlog = due jobs not started,"
            " every second; latency from each job's commit (Celery: its publish) to its"
            " handler's start. A system whose producer fell short of the rate (achieved, in"
            " the percentiles table) was measured under that lighter load"
        )
        for rep in range(o.repeat):
            print(f"[{title}, repetition {rep + 1}]", flush=True)
            for system in self.order(rep):
                holder = Figure("tmp", title, "ms", "lower", "Sustained load")
                sample = self.attempt(
                    holder,
                    system,
                    f"{o.sustained_rate:g}/s",
                    partial(
                        measure.sustained,
                        system,
                        rate=o.sustained_rate,
                        seconds=o.sustained_seconds,
                        processes=o.sustained_processes,
                        concurrency=o.sustained_concurrency,
                        sleep_ms=o.sustained_sleep_ms,
                        windows=o.sustained_windows,
                        log_dir=self.log_dir,
                        producers=o.sustained_producers,
                    ),
                )
                if sample is None:
                    continue
                ok = "error" not in sample.extra
                p50.add(
                    system.name,
                    Sample(sample.extra.get("p50_ms") if ok else None, dict(sample.extra)),
                )
                p99.add(
                    system.name,
                    Sample(sample.extra.get("p99_ms") if ok else None, dict(sample.extra)),
                )
                depth.add(
                    system.name,
                    Sample(
                        float(sample.extra.get("backlog_max") or 0) if ok else None,
                        dict(sample.extra),
                    ),
                )
                system.reset()

    def backlog(self) -> None:
        """Sizes run one after another (each seeded once, its repetitions rotating the
        systems): seeding millions of jobs per repetition and size would dominate. A size
        may be given twice (10000,5000000,10000): its figure then pools the repetitions
        of both blocks, which brackets the larger size in time."""
        o = self.opts
        pg = [s for s in self.systems if s.postgres]
        runnable_share = 1.0 - o.backlog_future
        for size in _ints(o.backlog_sizes):
            title = (
                f"drain rate with {size:,} jobs waiting ({o.backlog_future:.0%} scheduled a day"
                f" ahead), jobs {o.backlog_warmup + 1:,}-{o.backlog_warmup + o.backlog_measure:,},"
                f" {o.backlog_processes} processes, best"
                + (", backlog refilled" if o.backlog_refill else "")
            )
            fig = self.report.figure(
                f"backlog_{size}", title, "jobs/s", "higher", "Backlog scaling"
            )
            _note(
                fig,
                "each system's backlog is seeded with one INSERT ... SELECT, vacuumed and"
                " analyzed, then one CHECKPOINT runs before any is measured (and after any"
                " re-seed), so that writing back what was just seeded is not timed; the first"
                f" {o.backlog_warmup:,} jobs each workers' start drains are not timed either"
                " (connecting, preparing statements, the first claims)",
            )
            hold = (
                int(size * runnable_share)
                if o.backlog_refill and size <= HOLD_WAITING_MAX
                else None
            )
            if hold is not None:
                _note(
                    fig,
                    f"while the workers run, a feeder counts the runnable jobs waiting every"
                    f" 0.05 s and inserts what brings them back to {hold:,} (one INSERT ..."
                    " SELECT); the lowest and median counts it found are in latest.json"
                    " (waiting_min, waiting_median). Sizes above 200,000 use the feeder that"
                    " replaces finished jobs instead (counting millions of rows every 0.05 s"
                    " would load the server more than the drain): the two sizes' feeders"
                    " differ",
                )
            elif o.backlog_refill:
                _note(
                    fig,
                    "while the workers run, a feeder inserts as many"
                    " runnable jobs as they have finished (checked every 0.1 s, one INSERT"
                    " ... SELECT each time), so the number waiting stays within a few"
                    " thousand (the jobs in flight and 0.1 s of drain) of the backlog's size"
                    " whatever the window; the feeder's inserts load the same Postgres for"
                    " every size",
                )
            left: dict[str, int] = {}
            print(f"[{title}: seeding]", flush=True)
            for system in pg:
                t0 = time.monotonic()
                system.reset()
                system.seed(size, o.backlog_future)
                system.analyze()
                left[system.name] = int(size * runnable_share)
                print(f"  {system.name:<14} seeded in {time.monotonic() - t0:.1f}s", flush=True)
            t0 = time.monotonic()
            db.checkpoint(o.admin_dsn)
            print(f"  CHECKPOINT took {time.monotonic() - t0:.1f}s", flush=True)
            for rep in range(o.repeat):
                print(f"[{title}, repetition {rep + 1}]", flush=True)
                for system in self.order(rep, pg):
                    if o.backlog_refill:
                        # Put back what the last repetition drained after its feeder
                        # stopped (a backlog with nothing runnable would never be fed).
                        deficit = int(size * runnable_share) - left[system.name]
                        if deficit > 0:
                            system.seed(deficit)
                            left[system.name] += deficit
                    # Re-seed unless the window ends well before the backlog runs dry (a
                    # refilled one does not run dry).
                    elif left[system.name] < o.backlog_warmup + o.backlog_measure * 1.15:
                        system.reset()
                        system.seed(size, o.backlog_future)
                        system.analyze()
                        db.checkpoint(o.admin_dsn)
                        left[system.name] = int(size * runnable_share)
                    consumed = [0]

                    def one(
                        s: System = system,
                        consumed: list[int] = consumed,
                        hold: int | None = hold,
                    ) -> Sample:
                        marker = s.mark()
                        sample, consumed[0] = measure.backlog_drain(
                            s,
                            marker=marker,
                            measure=o.backlog_measure,
                            warmup=o.backlog_warmup,
                            processes=o.backlog_processes,
                            concurrency=self.conc(s, "best"),
                            log_dir=self.log_dir,
                            timeout=o.timeout,
                            refill=o.backlog_refill,
                            hold_waiting=hold,
                        )
                        return sample

                    self.attempt(fig, system, f"{size:,} waiting", one)
                    left[system.name] -= consumed[0]
            for system in pg:
                system.reset()
        sizes = list(dict.fromkeys(_ints(o.backlog_sizes)))
        if len(sizes) > 1:
            first = self.report.figure(f"backlog_{sizes[0]}", "", "", "", "")
            for size in sizes[1:]:
                fig = self.report.figure(f"backlog_{size}", "", "", "", "")
                for system in pg:
                    a, b = (
                        first.summary(system.name, system.name),
                        fig.summary(system.name, system.name),
                    )
                    if a and b:
                        _note(
                            fig,
                            f"{system.title}: {b['median'] / a['median']:.0%} of its rate with"
                            f" {sizes[0]:,} waiting",
                        )

    def footprint(self) -> None:
        o = self.opts
        pg = [s for s in self.systems if s.postgres]
        title = f"table + index size after {o.footprint_jobs:,} jobs passed through"
        size_fig = self.report.figure("footprint", title, "MiB", "lower", "Footprint")
        dead_fig = self.report.figure(
            "footprint_dead",
            f"dead tuples after {o.footprint_jobs:,} jobs",
            "tuples",
            "lower",
            "Footprint",
        )
        rate_fig = self.report.figure(
            "footprint_rate",
            f"drain {o.footprint_jobs:,} jobs, {o.backlog_processes} processes, best",
            "jobs/s",
            "higher",
            "Footprint",
        )
        size_fig.notes.append(
            "measured once per system (a state, not a rate), right after the drain; finished"
            " jobs stay where each system keeps them by default (pgqueue: 24 h retention in"
            " pgqueue.jobs; PgQueuer: deleted, a log row kept; procrastinate: kept; Oban:"
            " kept until its pruner runs)"
        )
        print(f"[{title}]", flush=True)
        for system in pg:

            def one(s: System = system) -> Sample:
                sample = measure.drain(
                    s,
                    jobs=o.footprint_jobs,
                    processes=o.backlog_processes,
                    concurrency=self.conc(s, "best"),
                    log_dir=self.log_dir,
                    timeout=o.timeout,
                )
                time.sleep(2.0)  # let the statistics collector catch up
                tables = s.footprint()
                sample.extra["tables"] = tables
                total = sum(t["total_bytes"] for t in tables.values()) / 2**20
                dead = sum(t["dead_tuples"] for t in tables.values())
                size_fig.add(s.name, Sample(total, {"tables": tables}))
                dead_fig.add(s.name, Sample(float(dead), {}))
                return sample

            self.attempt(rate_fig, system, f"{o.footprint_jobs:,} jobs", one)
            system.reset()

    def ceiling(self) -> None:
        o = self.opts
        work = self.log_dir / "pgbench"
        work.mkdir(exist_ok=True)
        ceiling = Ceiling(o.admin_dsn, work)
        ceiling.setup()
        pseudo = _Pseudo()
        try:
            for rep in range(o.repeat):
                print(f"[pgbench ceiling, repetition {rep + 1}]", flush=True)
                for batch in _ints(o.ceiling_batches):
                    jobs = o.ceiling_jobs_batch1 if batch == 1 else o.ceiling_jobs
                    for key, what in (
                        ("claim", "pgqueue claim_jobs + complete_jobs"),
                        ("leaseclaim", "lease claim, then DELETE (at-least-once minimum)"),
                        ("rawclaim", "raw claim (SKIP LOCKED) + DELETE in one statement"),
                    ):
                        for clients in _ints(o.ceiling_clients):
                            fig = self.report.figure(
                                f"ceiling_{key}_{batch}_{clients}",
                                f"{what}, batch {batch}, {clients} client"
                                + ("s" if clients > 1 else ""),
                                "jobs/s",
                                "higher",
                                "Postgres ceiling (pgbench -M prepared)",
                            )
                            self._ceiling_cpu(
                                fig,
                                self.attempt(
                                    fig,
                                    pseudo,
                                    f"{key} b={batch} c={clients}",
                                    partial(_claim_sample, ceiling, key, batch, clients, jobs),
                                ),
                            )
                for script, title in (
                    (
                        "raw_insert_1",
                        "raw INSERT, 1 row/transaction (pgqueue.jobs' shape, no trigger)",
                    ),
                    ("raw_insert_1000", "raw INSERT ... SELECT, 1000 rows/statement (no trigger)"),
                    ("jobs_insert_1", "INSERT INTO pgqueue.jobs, 1 row/transaction (trigger)"),
                    ("jobs_insert_1000", "INSERT INTO pgqueue.jobs, 1000 rows/statement (trigger)"),
                    ("enqueue_fn_1", "SELECT pgqueue.enqueue(...), 1 job/transaction"),
                ):
                    bulk = script.endswith("1000")
                    for clients in _ints(o.insert_clients):
                        if bulk and clients > 1:
                            continue
                        rows = o.insert_rows_bulk if bulk else o.insert_rows_single
                        fig = self.report.figure(
                            f"ceiling_{script}_{clients}",
                            title + (f", {clients} clients" if clients > 1 else ""),
                            "rows/s",
                            "higher",
                            "Postgres ceiling (pgbench -M prepared)",
                        )
                        self.attempt(
                            fig,
                            pseudo,
                            f"{script} c={clients}",
                            partial(_insert_sample, ceiling, script, clients, rows),
                        )
        finally:
            ceiling.teardown()

    def _ceiling_cpu(self, fig: Figure, sample: Sample | None) -> None:
        """The machine's CPU per job outside pgbench for one claim-script run, as a figure
        of its own beside ``fig`` (the run's jobs/s)."""
        if sample is None or "cpu_us_per_job" not in sample.extra:
            return
        cpu = self.report.figure(
            fig.key.replace("ceiling_", "ceiling_cpu_", 1),
            f"CPU per job outside pgbench: {fig.title}",
            "\u00b5s",
            "lower",
            "Postgres ceiling: CPU per job (machine busy time less pgbench's own)",
        )
        cpu.add(_Pseudo.name, Sample(float(sample.extra["cpu_us_per_job"])))

    # --- targets --------------------------------------------------------------------

    def targets(self) -> None:
        """The issue's targets, as measured in this run (only where both sides ran)."""
        figs = {f.key: f for f in self.report.figures}

        def med(key: str, system: str) -> float | None:
            fig = figs.get(key)
            summary = fig.summary(system) if fig else None
            return summary["median"] if summary else None

        def best_of(
            prefix: str, system: str, among: set[str] | None = None
        ) -> tuple[float, str] | None:
            found = [
                (s["median"], f.title)
                for f in self.report.figures
                if f.key.startswith(prefix)
                and (among is None or f.key in among)
                and (s := f.summary(system))
            ]
            return max(found) if found else None

        lines: list[str] = []
        # Each system's best among the drain figures both have a value for: a setting
        # whose runs failed (or gave no rate) for one of them is left out for both, so
        # one side's best is never held against the other's concurrency 1.
        drains = [f for f in self.report.figures if f.key.startswith("drain_")]
        both = {f.key for f in drains if f.summary("pgqueue") and f.summary("pgqueuer")}
        pgq = best_of("drain_", "pgqueue", both)
        rival = best_of("drain_", "pgqueuer", both)
        own = best_of("drain_", "pgqueue")  # against the ceilings: pgqueue's best of all
        left_out = [
            f.title
            for f in drains
            if f.key not in both and (f.summary("pgqueue") or f.summary("pgqueuer"))
        ]
        if pgq and rival and left_out:
            lines.append(
                "drain figures left out of the next lines, one side having no value: "
                + "; ".join(left_out)
            )
        ceil = best_of("ceiling_claim_100_", "postgres")
        if pgq and rival:
            lines.append(
                f"drain, best configuration of each: pgqueue {pgq[0]:,.0f}/s vs PgQueuer"
                f" {rival[0]:,.0f}/s = \u00d7{pgq[0] / rival[0]:.2f} (target \u00d73)"
            )
        raw = best_of("ceiling_rawclaim_100_", "postgres")
        if own and ceil:
            lines.append(
                f"drain vs pgbench of pgqueue's own batched claim+complete ({ceil[0]:,.0f}/s):"
                f" {own[0] / ceil[0]:.0%} (target 30%)"
            )
        if own and raw:
            lines.append(
                f"drain vs raw batched claim+delete ({raw[0]:,.0f}/s): {own[0] / raw[0]:.0%};"
                f" pgqueue's own statements reach {ceil[0] / raw[0]:.0%} of it"
                if ceil
                else f"drain vs raw batched claim+delete ({raw[0]:,.0f}/s): {own[0] / raw[0]:.0%}"
            )
        # Each client count's rate with the CPU of those same runs (not the best of each).
        lease_runs = [
            (rate["median"], cpu["median"])
            for f in self.report.figures
            if f.key.startswith("ceiling_leaseclaim_100_")
            and (rate := f.summary("postgres"))
            and (cpu_fig := figs.get(f.key.replace("ceiling_", "ceiling_cpu_", 1)))
            and (cpu := cpu_fig.summary("postgres"))
        ]
        if rival and lease_runs:
            need = 3 * rival[0]
            runs = "; ".join(
                f"{rate:,.0f}/s at {cost:.1f} \u00b5s of CPU per job outside pgbench"
                f" ({need * cost / 1e6:.2f} of this machine's {os.cpu_count()} cores at"
                f" {need:,.0f}/s)"
                for rate, cost in sorted(lease_runs)
            )
            lines.append(
                f"\u00d73 PgQueuer's drain would be {need:,.0f} jobs/s; the at-least-once"
                f" minimum (lease claim, then delete, batch 100; pgbench, no worker) ran {runs}"
            )
        bulk, bulk_rival = med("enqueue_bulk", "pgqueue"), med("enqueue_bulk", "pgqueuer")
        # The raw insert measured beside the enqueue figures if there is one, else the
        # ceiling figure's (measured apart).
        raw_bulk = med("enqueue_bulk", "postgres") or med("ceiling_raw_insert_1000_1", "postgres")
        if bulk and bulk_rival:
            lines.append(
                f"bulk enqueue: \u00d7{bulk / bulk_rival:.2f} PgQueuer's bulk API"
                " (target \u00d72.5)"
            )
        if bulk and raw_bulk:
            lines.append(f"bulk enqueue vs raw 1000-row insert: {bulk / raw_bulk:.0%} (target 60%)")
        single, raw_single = (
            med("enqueue_single_1", "pgqueue"),
            med("enqueue_single_1", "postgres") or med("ceiling_raw_insert_1_1", "postgres"),
        )
        driver_single = med("enqueue_single_1", "psycopg")
        if single and raw_single:
            lines.append(
                f"one job per transaction vs raw single-row insert: {single / raw_single:.0%}"
                " (target 80%)"
                + (
                    f"; the same raw insert through psycopg alone, no queue library:"
                    f" {driver_single / raw_single:.0%}"
                    if driver_single
                    else ""
                )
            )
        multi = med(f"enqueue_single_{self.opts.enqueue_producers}", "pgqueue")
        producers = self.opts.enqueue_producers
        raw_multi = med(f"enqueue_single_{producers}", "postgres") or med(
            f"ceiling_raw_insert_1_{producers}", "postgres"
        )
        if multi and raw_multi:
            lines.append(
                f"{self.opts.enqueue_producers} producers, one job per transaction, vs raw"
                f" single-row insert with as many clients: {multi / raw_multi:.0%}"
            )
        p50, p99 = med("latency_p50", "pgqueue"), med("latency_p99", "pgqueue")
        if p50 is not None and p99 is not None:
            others = [
                (s.title, med("latency_p50", s.name), med("latency_p99", s.name))
                for s in self.systems
                if s.name != "pgqueue"
            ]
            shown = ", ".join(f"{t} {a:.2f}/{b:.2f}" for t, a, b in others if a and b)
            lines.append(
                f"latency p50/p99: pgqueue {p50:.2f}/{p99:.2f} ms (target ≤2/≤5, better than"
                f" all); others: {shown}"
            )
        sizes = sorted(set(_ints(self.opts.backlog_sizes)))
        small, large = med(f"backlog_{sizes[0]}", "pgqueue"), med(f"backlog_{sizes[-1]}", "pgqueue")
        if small and large and len(sizes) > 1:
            lines.append(
                f"drain with {sizes[-1]:,} waiting: {large / small:.0%} of the rate with"
                f" {sizes[0]:,} (target ≥ 90%)"
            )
        rss = med("rss_1p_best", "pgqueue")
        if rss:
            rivals = [
                (s.title, v)
                for s in self.systems
                if s.name != "pgqueue"
                if (v := med("rss_1p_best", s.name))
            ]
            if rivals:
                title, lightest = min(rivals, key=lambda x: x[1])
                lines.append(
                    f"worker RSS: pgqueue {rss:.0f} MiB vs lightest competitor ({title})"
                    f" {lightest:.0f} MiB (target ≤)"
                )
        self.report.targets.extend(lines)


def _claim_sample(ceiling: Ceiling, key: str, batch: int, clients: int, jobs: int) -> Sample:
    """One run of a claim script: pgqueue's claim+complete ("claim"), the lease claim and
    delete ("leaseclaim") or the raw claim-and-delete ("rawclaim")."""
    run = (
        ceiling.claim_complete(batch, clients, jobs)
        if key == "claim"
        else ceiling.claim_delete(batch, clients, jobs, lease=key == "leaseclaim")
    )
    return Sample(run.rate, {"cpu_us_per_job": run.cpu_us_per_job})


def _insert_sample(ceiling: Ceiling, script: str, clients: int, rows: int) -> Sample:
    return Sample(ceiling.insert(script, clients, rows))


class _PsycopgReference(System):
    """The raw single insert through psycopg (bench/apps/bq_psycopg.py): what a Python
    producer can do at best on the driver pgqueue uses, for the enqueue figures."""

    name = "psycopg"
    title = "psycopg (raw INSERT)"
    tables = ("bench_raw.jobs",)

    def __init__(self, ctx: Context, dsn: str) -> None:
        super().__init__(ctx)
        self.dsn = dsn

    def install(self) -> None: ...
    def seed_sql(self) -> Any: ...
    def finish_sql(self) -> Any: ...
    def unfinished_sql(self) -> Any: ...
    def pending_sql(self) -> Any: ...
    def waiting_sql(self) -> Any: ...
    def worker(self, processes: int, concurrency: int) -> Any: ...


class _Pseudo(System):
    """The pgbench rows: Postgres itself, not a queue."""

    name = "postgres"
    title = "Postgres (pgbench)"

    def __init__(self) -> None:
        pass

    def install(self) -> None: ...
    def seed_sql(self) -> Any: ...
    def finish_sql(self) -> Any: ...
    def unfinished_sql(self) -> Any: ...
    def pending_sql(self) -> Any: ...
    def waiting_sql(self) -> Any: ...
    def worker(self, processes: int, concurrency: int) -> Any: ...


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    started = time.monotonic()
    names = [n for n in opts.systems.split(",") if n]
    unknown = [n for n in names if n not in ALL]
    if unknown:
        sys.exit(f"unknown systems: {unknown}; known: {list(ALL)}")
    figures = [f for f in opts.figures.split(",") if f]
    bad = [f for f in figures if f not in FIGURES]
    if bad:
        sys.exit(f"unknown figures: {bad}; known: {list(FIGURES)}")
    # Two runs on one server would drop each other's databases (their names are fixed).
    run_lock = db.hold_run_lock(opts.admin_dsn)
    if run_lock is None:
        sys.exit(
            "another `python -m bench` is running against this Postgres server (it uses the"
            " databases bench_*): wait for it to end"
        )
    notes: list[str] = []
    oban_python: Path | None = None
    if "oban" in names:
        try:
            oban_python = ensure_oban_venv(opts.python312)
        except subprocess.CalledProcessError as exc:
            notes.append(f"Oban skipped: its venv could not be set up ({exc})")
        if oban_python is None:
            names.remove("oban")
            notes.append("Oban skipped: no Python >= 3.12 found (give --python312)")
    pgqueue_python: Path | None = None
    if "pgqueue" in names and not opts.pgqueue_shared_venv:
        pgqueue_python = ensure_pgqueue_venv()
    ctx = Context(
        opts.admin_dsn,
        opts.redis_url,
        Path(tempfile.gettempdir()),
        oban_python,
        pgqueue_worker_args=tuple(shlex.split(opts.pgqueue_worker_args)),
        pgqueue_python=pgqueue_python,
    )
    systems = [ALL[n](ctx) for n in names]
    machine = machine_facts(opts.admin_dsn, opts.redis_url)
    command = "python -m bench " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    titles = {s.name: s.title for s in systems} | {
        "postgres": "Postgres (pgbench)",
        "psycopg": _PsycopgReference.title,
    }
    report = Report(
        machine=machine,
        options={k: v for k, v in vars(opts).items()},
        systems=[*names, "postgres", "psycopg"],
        titles=titles,
        versions={},
        notes=notes,
        command=command.strip(),
        started_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
    bench = Bench(opts, report, systems, ctx)
    print(f"logs in {bench.log_dir}", flush=True)
    failed: BaseException | None = None
    with procs.signals_as_exit():
        try:
            for system in systems:
                t0 = time.monotonic()
                system.setup()
                report.versions[system.name] = system.versions()
                print(f"set up {system.name} in {time.monotonic() - t0:.1f}s", flush=True)
            for figure in figures:
                getattr(bench, figure)()
            bench.targets()
        except BaseException as exc:  # report, clean up, re-raise
            failed = exc
            report.notes.append(f"INCOMPLETE RUN: stopped by {type(exc).__name__}: {exc}")
        finally:
            procs.stop_all()
            for system in systems:
                with contextlib.suppress(Exception):
                    system.teardown()
            db.drop_all()
            left = procs.leftovers()
            if left:
                report.notes.append(f"processes left behind (killed): {left}")
            machine["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
            report.seconds = time.monotonic() - started
            report.notes.extend(_standard_notes(opts, systems, bench))
            md, js = report.write(Path(opts.out))
            print(f"wrote {md} and {js} in {report.seconds / 60:.1f} min", flush=True)
            run_lock.close()
    if failed is not None:
        raise failed


def _standard_notes(opts: argparse.Namespace, systems: list[System], bench: Bench) -> list[str]:
    names = {s.name for s in systems}
    notes = []
    if opts.quick:
        notes.append(
            "--quick: sizes this small (runs of a fraction of a second, one repetition) check"
            " that everything starts, measures and stops; they are not numbers to compare."
        )
    notes += [
        "Timing of drains comes from the database: the finish timestamps each system"
        " writes (pgqueue finished_at, PgQueuer pgqueuer_log.created, procrastinate"
        " procrastinate_events 'succeeded', Oban completed_at), from the first finish to the"
        " last, so worker start-up is excluded; every drain is checked complete (all N jobs"
        " finished, none left) in the database. Jobs are seeded with one INSERT ... SELECT"
        " generate_series shaped like each system's own enqueue (its triggers run).",
        "Best settings (concurrency per process): "
        + ", ".join(f"{k}={v}" for k, v in bench.best.items() if k in names)
        + ". Handlers are async no-ops where the system supports them.",
    ]
    if "pgqueue" in names:
        notes.append(
            "pgqueue: `pgqueue-worker --concurrency N [--processes P] --log-level warning"
            + "".join(f" {a}" for a in shlex.split(opts.pgqueue_worker_args))
            + "` (P > 1 runs its supervisor); one job per transaction is `enqueue(conn, ...)`"
            " on an autocommit connection (one statement), bulk is `enqueue_many`. "
            + (
                "Its workers ran from the bench's venv, with every competitor's packages."
                if opts.pgqueue_shared_venv
                else "Its workers run from bench/.venvs/pgqueue: this checkout and its own"
                " dependencies at the bench venv's versions, without the competitors'"
                " packages (in the bench's venv structlog would import rich, which PgQueuer"
                " brings). The competitors run from the bench's venv (Oban from its own),"
                " beside each other's packages. pgqueue's producers, like the others', run"
                " as subprocesses of the bench (bench/apps/bq_produce.py) from the bench's"
                " venv."
            )
        )
    if "pgqueuer" in names:
        notes.append(
            "PgQueuer: asyncpg driver (its fast path), `pgqueuer.run(factory, batch_size=N)`"
            " (the function behind `pgq run`, which crashes with typer 0.29), unbounded"
            " concurrency as by default; 'concurrency 1' is batch_size=1 with"
            " max_concurrent_tasks=2, the least it accepts. One P-process setting = P"
            " separate worker processes. Bulk = `Queries.enqueue` with lists."
        )
    if "procrastinate" in names:
        notes.append(
            "procrastinate: `procrastinate --log-level warning worker --concurrency N` (INFO"
            " logs two lines per job); P processes = P workers. Bulk = `batch_defer_async`."
        )
    if "oban" in names:
        notes.append(
            "Oban for Python: its own Python 3.12 venv (bench/.venvs/oban), `oban start"
            " --queues default:N --log-level WARNING` per process; producers use an Oban"
            " instance in client mode; its `enqueue_many` sends one INSERT per job."
        )
    if "celery" in names:
        notes.append(
            "Celery: Redis broker (reference only, no Postgres), `-P threads -c N` (`-P solo`"
            " for concurrency 1), prefetch multiplier 16, results ignored; each task counts"
            " itself in Redis (one pipelined round trip) so that drains can be timed and"
            " checked. No bulk publish API: 'bulk' publishes one message per job on one"
            " connection. Not in the backlog and footprint figures (no scheduled jobs in the"
            " broker, no table)."
        )
    settings = bench.report.machine.get("postgres", {}).get("settings", {})
    if settings.get("autovacuum") == "off":
        notes.append(
            "autovacuum is OFF on this server (not changed by the bench): dead tuples are"
            " only cleaned by the bench's own VACUUM ANALYZE after each seeding, so the"
            " footprint and long runs show what no autovacuum means."
        )
    notes.append(f"Sizes: {', '.join(f'{k}={v}' for k, v in vars(opts).items() if k in PROFILE)}.")
    return notes


if __name__ == "__main__":
    main()
