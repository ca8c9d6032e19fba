"""The producer side of every figure, for any system: ``python -m bq_produce SYSTEM ...``.

Standard library plus the system's app module (``bq_<system>.make_producer``), so that it
also runs in Oban's venv. It connects, prints ``READY``, waits for a line on stdin (the
bench releases several producers at once), runs, and prints one JSON line: how many jobs,
and the start and end on ``time.monotonic()``.

Modes:
  single   N jobs, one per call of the system's one-job API (one transaction each)
  bulk     N jobs through the system's bulk API, ``--batch`` per call (default: all)
  paced    N jobs, one per call, at ``--rate`` jobs/s; writes ``key commit_time`` lines
  rate     ``--rate`` jobs/s for ``--seconds``, one bulk call per ``--tick`` of the jobs due
           by then; writes ``key commit_time`` lines (the time the bulk call returned, or
           each job's own when the system's ``many`` answers them: Celery's)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import random
import sys
import time
from typing import Any


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bq_produce")
    p.add_argument("system")
    p.add_argument("--mode", choices=["single", "bulk", "paced", "rate"], required=True)
    p.add_argument("--dsn", default=os.environ.get("BENCH_DSN", ""))
    p.add_argument("--kind", default="noop")
    p.add_argument("--n", type=int, default=0)
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("--tick", type=float, default=0.01)
    p.add_argument("--sleep-ms", default="10,50", help="min,max of a 'sleep' job")
    p.add_argument("--prefix", default="p0", help="key prefix, unique per producer")
    p.add_argument("--out", default="", help="file for 'key commit_time' lines")
    p.add_argument(
        "--no-wait", action="store_true", help="no warm-up job and no READY/GO handshake"
    )
    p.add_argument("--warmup-kind", default="noop", help="kind of the warm-up job")
    return p


async def _run(opts: argparse.Namespace) -> dict[str, Any]:
    module = importlib.import_module(f"bq_{opts.system}")
    producer = await module.make_producer(opts.dsn)
    lo, hi = (int(x) for x in opts.sleep_ms.split(","))
    rng = random.Random(hash(opts.prefix))
    commits: list[str] = []

    def job_args(i: int) -> dict[str, Any]:
        if opts.kind == "noop":
            return {"n": i}
        key = f"{opts.prefix}-{i}"
        if opts.kind == "sleep":
            return {"k": key, "ms": rng.randint(lo, hi)}
        return {"k": key}

    if not opts.no_wait:
        # A warm-up job outside the timing (connections, prepared statements, imports);
        # a 'rec' one (key 'warmup-<prefix>') also tells the bench the workers are up.
        if opts.warmup_kind == "noop":
            await producer.one("noop", {"n": -1})
        else:
            await producer.one(opts.warmup_kind, {"k": f"warmup-{opts.prefix}"})
        print("READY", flush=True)
        sys.stdin.readline()
    count = 0
    behind = 0.0
    start = time.monotonic()
    if opts.mode == "single":
        for i in range(opts.n):
            await producer.one(opts.kind, job_args(i))
        count = opts.n
    elif opts.mode == "bulk":
        batch = opts.batch or opts.n
        for first in range(0, opts.n, batch):
            items = [job_args(i) for i in range(first, min(opts.n, first + batch))]
            await producer.many(opts.kind, items)
        count = opts.n
    elif opts.mode == "paced":
        for i in range(opts.n):
            due = start + i / opts.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            args = job_args(i)
            await producer.one(opts.kind, args)
            commits.append(f"{args['k']} {time.monotonic():.6f}")
        count = opts.n
    else:
        end = start + opts.seconds
        while True:
            now = time.monotonic()
            if now >= end:
                break
            due = int((now - start) * opts.rate) + 1
            if due > count:
                items = [job_args(i) for i in range(count, due)]
                stamps = None
                if len(items) == 1:
                    await producer.one(opts.kind, items[0])
                else:
                    # A system without a bulk transaction (Celery publishes one message
                    # at a time) answers when each job was handed over: a job may start
                    # before the call returns, and timing it from the end of the call
                    # gave negative latencies once the producer fell behind.
                    stamps = await producer.many(opts.kind, items)
                committed = time.monotonic()
                commits.extend(
                    f"{a['k']} {t:.6f}"
                    for a, t in zip(items, stamps or [committed] * len(items), strict=True)
                )
                count = due
            behind = max(behind, time.monotonic() - (start + count / opts.rate))
            next_tick = now + opts.tick
            delay = next_tick - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    finished = time.monotonic()
    await producer.close()
    return {
        "count": count,
        "start": start,
        "end": finished,
        "max_behind": behind,
        "commits": commits,
    }


def main() -> None:
    opts = _parser().parse_args()
    result = asyncio.run(_run(opts))
    commits = result.pop("commits")
    if opts.out:
        with open(opts.out, "w", encoding="utf-8") as fh:
            fh.write("\n".join(commits) + ("\n" if commits else ""))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
