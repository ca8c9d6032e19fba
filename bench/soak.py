"""A worker's memory over a long steady load: does it grow?

``python -m bench.soak [--seconds 600] [--rate 1500]``: migrates a scratch database on
the server of ``--admin-dsn`` (dropped at the end), starts one ``pgqueue-worker``
(concurrency 50, with its embedded reaper pruning after 30 s and its metrics port
scraped as Prometheus would) on ``bench/apps/soak_app.py``, and enqueues ``--rate`` jobs
a second for ``--seconds``: successes (sync and async), retries, snoozes and, one in
5,000, a dead-lettered job. Every 15 s it prints the worker's RSS and the jobs not yet
done; at the end, whether everything ran. Stops the worker, whatever happens.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgqueue import JobSpec, enqueue_many, migrate

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "apps"))
from soak_app import MIX  # noqa: E402

UNFINISHED = "SELECT count(*) FROM pgqueue.jobs WHERE state IN ('queued', 'running')"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def unfinished(conn: psycopg.Connection[tuple[int]]) -> int:
    row = conn.execute(UNFINISHED).fetchone()
    assert row is not None
    return row[0]


def soak(dsn: str, seconds: float, rate: int, port: int) -> list[float]:
    worker = subprocess.Popen(
        [str(Path(sys.executable).with_name("pgqueue-worker")), "--app", "soak_app:registry",
         "--dsn", dsn, "--concurrency", "50", "--reaper", "--reaper-interval", "2",
         "--retention-seconds", "30", "--metrics-port", str(port), "--log-level", "warning"],
        env=dict(os.environ, PYTHONPATH=str(HERE / "apps")),
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    samples: list[float] = []
    try:
        time.sleep(3)
        per_tick = max(1, rate // 10)
        sent = 0
        started = time.monotonic()
        next_sample = 15.0
        with psycopg.connect(dsn, autocommit=True) as conn:
            while (elapsed := time.monotonic() - started) < seconds:
                tick = time.monotonic()
                batch = [
                    JobSpec(MIX[(sent + i) % len(MIX)], {"n": sent + i}) for i in range(per_tick)
                ]
                if sent % 5000 < per_tick:
                    batch.append(JobSpec("soak.dead", {"n": sent}))
                enqueue_many(conn, batch)
                sent += len(batch)
                if elapsed >= next_sample:
                    next_sample += 15.0
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5):
                        pass
                    samples.append(rss_mib(worker.pid))
                    print(
                        f"{elapsed:5.0f} s  enqueued {sent:8d}  not done {unfinished(conn):6d}"
                        f"  worker RSS {samples[-1]:.1f} MiB",
                        flush=True,
                    )
                time.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
            deadline = time.monotonic() + 120
            while unfinished(conn) and time.monotonic() < deadline:
                time.sleep(1)
            left = unfinished(conn)
            dead = conn.execute("SELECT count(*) FROM pgqueue.dead_jobs").fetchone()
        print(
            f"enqueued {sent} ({sent / seconds:.0f} a second); not done {left};"
            f" dead {dead[0] if dead else '?'}"
        )
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited with {worker.returncode}")
    finally:
        with_signal(worker, signal.SIGTERM)
    return samples


def with_signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Stop ``proc`` (and its process group): ``sig``, then SIGKILL after 60 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="load time (600)")
    parser.add_argument("--rate", type=int, default=1500, help="jobs a second (1500)")
    parser.add_argument("--port", type=int, default=19411, help="worker metrics port")
    parser.add_argument(
        "--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a server where this may create and drop a database",
    )  # fmt: skip
    args = parser.parse_args()
    # A SIGTERM or SIGHUP (timeout, a closed terminal) becomes SystemExit, so that the
    # finally blocks stop the worker (in a session of its own) and drop the database.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(143))
    name = f"bench_soak_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        dsn = make_conninfo(args.admin_dsn, dbname=name)
        migrate(dsn)
        samples = soak(dsn, args.seconds, args.rate, args.port)
        if len(samples) >= 4:
            settled = samples[len(samples) // 4]
            print(
                f"worker RSS: first {samples[0]:.1f}, at a quarter {settled:.1f}, last"
                f" {samples[-1]:.1f}, peak {max(samples):.1f} MiB"
            )
    finally:
        with psycopg.connect(args.admin_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


if __name__ == "__main__":
    main()
