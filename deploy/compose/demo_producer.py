"""Enqueues a trickle of demo jobs for the Compose stack's `demo` profile, so the
Grafana dashboard has something to show: most succeed, some retry once, a few are
dead-lettered. Runs until stopped (SIGTERM)."""

from __future__ import annotations

import os
import random
import signal
import time

import psycopg

from pgqueue import JobSpec, enqueue_many

# examples/demo_app.py: importing it registers its tasks, whose queue and max_attempts
# become the defaults of these enqueues.
import demo_app  # noqa: F401  # isort: skip

stop = False


def _stop(signum: int, frame: object) -> None:
    global stop
    stop = True


def main() -> None:
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    dsn = os.environ["PGQUEUE_DSN"]
    n = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop:
            specs = [JobSpec("demo.greet", {"name": f"user-{n + i}"}) for i in range(20)]
            specs.append(JobSpec("demo.fetch", {"url": f"https://example.com/{n}"}))
            if random.random() < 0.2:
                specs.append(JobSpec("demo.charge", {"amount": n}))
            if random.random() < 0.1:
                specs.append(JobSpec("demo.parse", {"payload": "{oops"}))
            enqueue_many(conn, specs)
            n += len(specs)
            time.sleep(2)


if __name__ == "__main__":
    main()
