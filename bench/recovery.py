"""How soon a worker runs jobs again after Postgres comes back from an outage.

``python -m bench.recovery [--outage S] [--trials N]``: starts a throwaway Postgres
cluster (tests/pgcluster.py, never the shared server) and one ``pgqueue-worker``
(``--lease-seconds 3 --poll-interval 0.5``) on it; then, N times, stops the cluster for S
seconds, starts it again, enqueues one job the moment it answers and times how long the
job takes to succeed. Prints each time and the median. Stops the worker and removes the
cluster, whatever happens.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import psycopg

from pgqueue import enqueue, migrate
from tests.conftest import EXECUTIONS_DDL, Daemons, scalar, wait_until
from tests.pgcluster import PgCluster


def _succeeded(dsn: str, job_id: int) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        state = scalar(conn, "SELECT state FROM pgqueue.jobs WHERE id = %s", (job_id,))
    return bool(state == "succeeded")


def measure(outage: float, trials: int) -> list[float]:
    cluster = PgCluster()
    times: list[float] = []
    try:
        cluster.start()
        migrate(cluster.dsn)
        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            conn.execute(EXECUTIONS_DDL)  # type: ignore[arg-type]
        daemons = Daemons(cluster.dsn, Path(tempfile.mkdtemp(prefix="pgqueue-recovery-")))
        try:
            worker = daemons.worker("--lease-seconds", "3", "--poll-interval", "0.5")
            wait_until(lambda: "worker.started" in Daemons.output(worker))
            time.sleep(1)
            for trial in range(trials):
                cluster.stop("fast")
                time.sleep(outage)
                cluster.start()
                back = time.monotonic()
                with psycopg.connect(cluster.dsn, autocommit=True) as conn:
                    job_id = enqueue(conn, "record", {"note": f"after outage {trial}"})
                wait_until(lambda j=job_id: _succeeded(cluster.dsn, j), timeout=90, interval=0.05)
                times.append(time.monotonic() - back)
                print(f"outage {trial + 1}: the job succeeded {times[-1]:.2f} s after", flush=True)
                time.sleep(2)
            if worker.poll() is not None:
                raise SystemExit(f"the worker exited: {Daemons.output(worker)[-2000:]}")
        finally:
            daemons.stop_all()
    finally:
        cluster.destroy()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=40.0, help="seconds down (40)")
    parser.add_argument("--trials", type=int, default=4, help="outages (4)")
    args = parser.parse_args()
    times = measure(args.outage, args.trials)
    print(
        f"{args.outage:g} s outages: {', '.join(f'{t:.2f}' for t in times)} s;"
        f" median {statistics.median(times):.2f} s"
    )


if __name__ == "__main__":
    main()
