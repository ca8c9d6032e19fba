"""Subprocesses that must never outlive the bench: each starts in a session of its own,
is tracked here, and is stopped (SIGTERM, then SIGKILL to its whole process group) when
the measurement ends, when the bench fails, and at exit.

``RssSampler`` samples the resident memory of every process in a tree (psutil).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

import psutil

_live: dict[int, subprocess.Popen[bytes]] = {}
_signalled: set[int] = set()
_lock = threading.Lock()


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path | None = None,
    log: Path | None = None,
    stdin: bool = False,
    stdout_pipe: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session (so its whole tree can be signalled)."""
    out: int | IO[bytes] = subprocess.DEVNULL
    if stdout_pipe:
        out = subprocess.PIPE
    elif log is not None:
        out = log.open("ab")
    proc = subprocess.Popen(
        list(argv),
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=out,
        stderr=log.open("ab") if log is not None else subprocess.DEVNULL,
        start_new_session=True,
    )
    with _lock:
        _live[proc.pid] = proc
    return proc


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """Send SIGTERM once (a second one means "exit now" to several of these daemons)."""
    with _lock:
        if proc.pid in _signalled:
            return
        _signalled.add(proc.pid)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int | None:
    """SIGTERM the process (a graceful stop) unless done already, wait, then SIGKILL
    whatever is left of its process group. Returns the exit code (None if it had to be
    killed)."""
    code: int | None = None
    if proc.poll() is None:
        terminate(proc)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
    else:
        code = proc.returncode
    pgid = proc.pid  # start_new_session: the group id is the leader's pid
    deadline = time.monotonic() + 5.0
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        code = None
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5.0)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    with _lock:
        _live.pop(proc.pid, None)
        _signalled.discard(proc.pid)
    return code


def stop_all() -> None:
    """Stop every process this bench started and has not stopped yet."""
    with _lock:
        procs = list(_live.values())
    for proc in procs:
        terminate(proc)
    for proc in procs:
        stop(proc, timeout=10.0)


@contextlib.contextmanager
def signals_as_exit() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit while in the block, so that ``finally`` and
    atexit clean-up (processes, databases) runs when the bench is stopped."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def cpu_seconds_of(pids: list[int]) -> float:
    """CPU time (user + system) used so far by these processes (gone ones count 0)."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def leftovers() -> list[int]:
    """Pids of process groups this bench started that still have a member."""
    with _lock:
        return [pid for pid in _live if _group_alive(pid)]


atexit.register(stop_all)


@dataclass
class RssSampler:
    """Samples RSS of each process under ``roots`` every ``interval`` seconds."""

    roots: list[int]
    interval: float = 0.25
    peak_by_pid: dict[int, int] = field(default_factory=dict)
    name_by_pid: dict[int, str] = field(default_factory=dict)
    peak_total: int = 0
    cpu_by_pid: dict[int, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        total = 0
        for root in self.roots:
            try:
                top = psutil.Process(root)
                tree = [top, *top.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in tree:
                try:
                    rss = proc.memory_info().rss
                    times = proc.cpu_times()
                    self.cpu_by_pid[proc.pid] = times.user + times.system
                    if proc.pid not in self.name_by_pid:
                        self.name_by_pid[proc.pid] = " ".join(proc.cmdline()[:4])
                except psutil.Error:
                    continue
                total += rss
                if rss > self.peak_by_pid.get(proc.pid, 0):
                    self.peak_by_pid[proc.pid] = rss
        self.peak_total = max(self.peak_total, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def finish_sample(self) -> None:
        """Take one more sample now (the tree is still up)."""
        self._sample()

    def finish(self) -> None:
        self._sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used by the tree's processes, as last sampled."""
        return sum(self.cpu_by_pid.values())

    def peak_process(self) -> int:
        """The largest peak of any one process of the tree (bytes)."""
        return max(self.peak_by_pid.values(), default=0)
