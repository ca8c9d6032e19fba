"""What each import adds to a Python process's resident memory (VmRSS), in order.

``python -m bench.imports_rss [MODULE ...]``: imports the modules one after the other and
prints the process's VmRSS and anonymous RSS after each, and what that import added. The
default list is what a pgqueue worker process imports; for a competitor, pass its modules
(e.g. ``asyncio psycopg psycopg_pool procrastinate procrastinate.worker``). An import
shared with an earlier one adds nothing the second time, so the order matters.
"""

from __future__ import annotations

import importlib
import sys

WORKER_MODULES = (
    "asyncio",
    "ssl",
    "psycopg",
    "psycopg_pool",
    "structlog",
    "prometheus_client",
    "click",
    "pgqueue",
    "pgqueue.cli",
    "pgqueue.worker.daemon",
    "pgqueue.supervisor",
)


def _rss_mib() -> dict[str, float]:
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                out[key] = int(value.split()[0]) / 1024
    return out


def main(argv: list[str]) -> None:
    modules = argv or list(WORKER_MODULES)
    before = _rss_mib()
    print(f"{'(interpreter)':32} VmRSS {before['VmRSS']:6.1f} MiB")
    for name in modules:
        importlib.import_module(name)
        now = _rss_mib()
        print(
            f"{name:32} VmRSS {now['VmRSS']:6.1f} MiB  +{now['VmRSS'] - before['VmRSS']:4.1f}"
            f"  (anonymous +{now['RssAnon'] - before['RssAnon']:4.1f})"
        )
        before = now


if __name__ == "__main__":
    main(sys.argv[1:])
