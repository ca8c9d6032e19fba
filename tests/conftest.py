"""Test fixtures: a real Postgres, a migrated template database, one clone per test.

The server is PGQUEUE_TEST_DSN if set, else 127.0.0.1:5432 if it answers, else a
testcontainers Postgres where a Docker engine answers, else an embedded server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from pgqueue.devdb import LOCAL_DSN, EmbeddedPostgres, reachable
from pgqueue.migrate import migrate

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

EXECUTIONS_DDL = """
CREATE TABLE public.executions (
    id bigserial PRIMARY KEY,
    job_id bigint NOT NULL,
    attempt integer NOT NULL,
    pid integer NOT NULL,
    note text NOT NULL DEFAULT '',
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """A maintenance DSN (database 'postgres') on the server the tests use."""
    explicit = os.environ.get("PGQUEUE_TEST_DSN")
    if explicit:
        yield explicit
        return
    if reachable(LOCAL_DSN):
        yield LOCAL_DSN
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16", driver=None) as container:
            yield container.get_connection_url()
        return
    data_dir = Path(tempfile.mkdtemp(prefix="pgqueue-test-pg-"))
    server = EmbeddedPostgres(data_dir, delete=True)
    try:
        yield server.dsn
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def _admin(server_dsn: str, sql: str) -> None:
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def template_db(server_dsn: str) -> Iterator[str]:
    """A migrated template database, made once per test session."""
    name = f"pgqueue_tpl_{uuid.uuid4().hex[:10]}"
    _admin(server_dsn, f'CREATE DATABASE "{name}"')
    try:
        dsn = make_conninfo(server_dsn, dbname=name)
        migrate(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(EXECUTIONS_DDL)  # type: ignore[arg-type]
        yield name
    finally:
        _admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def dsn(server_dsn: str, template_db: str) -> Iterator[str]:
    """A fresh database cloned from the template, dropped after the test."""
    name = f"pgqueue_t_{uuid.uuid4().hex[:10]}"
    _admin(server_dsn, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    try:
        yield make_conninfo(server_dsn, dbname=name)
    finally:
        _admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


def run_at_once(
    fn: Callable[[threading.Barrier], T], copies: int = 2, timeout: float = 60.0
) -> list[T]:
    """Run ``copies`` calls of ``fn`` in threads and return their results (in the order
    they finished). Each call gets a barrier to wait on once it is ready, so that the
    copies race from the same instant; an exception in any of them fails the test."""
    start = threading.Barrier(copies)
    results: list[T] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            result = fn(start)
            with lock:
                results.append(result)
        except BaseException as exc:  # raised below, not lost in the thread
            with lock:
                failures.append(exc)
            start.abort()  # the other copies stop waiting for this one

    threads = [threading.Thread(target=run) for _ in range(copies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads)
    if failures:
        raise failures[0]
    assert len(results) == copies
    return results


def scalar(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> Any:
    row = conn.execute(sql, params).fetchone()  # type: ignore[arg-type]
    return None if row is None else row[0]


def job_row(conn: psycopg.Connection[Any], job_id: int) -> dict[str, Any] | None:
    """The job's row in pgqueue.jobs, or None."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM pgqueue.jobs WHERE id = %s", (job_id,)).fetchone()


def dead_row(conn: psycopg.Connection[Any], job_id: int) -> dict[str, Any] | None:
    """The job's row in the dead-letter table, or None."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM pgqueue.dead_jobs WHERE id = %s", (job_id,)).fetchone()


def job_state(conn: psycopg.Connection[Any], job_id: int) -> str | None:
    """The job's state in pgqueue.jobs, or None if it is not there."""
    return scalar(conn, "SELECT state::text FROM pgqueue.jobs WHERE id = %s", (job_id,))


def notified_before_sentinel(
    conn: psycopg.Connection[Any], listener: psycopg.Connection[Any]
) -> list[str]:
    """Payloads ``listener`` received on pgqueue_jobs before a sentinel that ``conn`` sends
    now: the sentinel commits after everything ``conn`` committed before, so it arrives
    after all of their notifications."""
    sentinel = f"sentinel-{uuid.uuid4()}"
    conn.execute("SELECT pg_notify('pgqueue_jobs', %s)", (sentinel,))
    payloads = []
    # The timeout is a safety net: the loop ends at the sentinel.
    for notify in listener.notifies(timeout=30):
        assert notify.channel == "pgqueue_jobs"
        if notify.payload == sentinel:
            return payloads
        payloads.append(notify.payload)
    pytest.fail("the sentinel notification never arrived")


class Daemons:
    """Starts pgqueue daemons as subprocesses and guarantees they are gone at teardown."""

    def __init__(self, dsn: str, tmp: Path) -> None:
        self.dsn = dsn
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, command: str, *args: str, env: dict[str, str] | None = None, nohup: bool = False
    ) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{command}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        # TMPDIR: a supervisor killed at teardown leaves its metrics directory behind; in
        # the test's own folder, not in /tmp.
        full_env = {
            **os.environ, "PGQUEUE_DSN": self.dsn, "PYTHONPATH": str(ROOT),
            "TMPDIR": str(self.tmp), **(env or {}),
        }  # fmt: skip
        proc = subprocess.Popen(
            [str(BIN / command), *args],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
            # As `nohup` starts it: SIGHUP ignored (which survives exec).
            preexec_fn=(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if nohup else None,
        )
        proc.log_path = log.name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def worker(
        self,
        *args: str,
        app: str = "tests.apps.sample:registry",
        env: dict[str, str] | None = None,
        nohup: bool = False,
    ) -> subprocess.Popen[bytes]:
        return self.start(
            "pgqueue-worker", "--app", app, "--log-format", "json", *args, env=env, nohup=nohup
        )

    def reaper(self, *args: str) -> subprocess.Popen[bytes]:
        return self.start("pgqueue-reaper", "--log-format", "json", *args)

    @staticmethod
    def output(proc: subprocess.Popen[bytes]) -> str:
        return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]

    def stop_all(self) -> None:
        for proc in self.procs:
            # killpg: the children of a supervisor live in its process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


@pytest.fixture
def daemons(dsn: str, tmp_path: Path) -> Iterator[Daemons]:
    d = Daemons(dsn, tmp_path)
    try:
        yield d
    finally:
        d.stop_all()


def free_ports(count: int) -> list[int]:
    """``count`` distinct local ports free now (all held open at once while they are
    picked: picked one after the other, two could be the same)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


class TcpProxy:
    """A TCP proxy on a free local port in front of Postgres (``dsn`` is the way through
    it). Subclasses decide what passes: ``_up`` (client to server) and ``_down`` (server
    to client), each run in a thread of its own per connection."""

    def __init__(self, dsn: str, **conninfo: Any) -> None:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
        self._upstream = (str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432))
        self._listener = socket.create_server(("127.0.0.1", 0))
        port = self._listener.getsockname()[1]
        self.dsn = make_conninfo(dsn, host="127.0.0.1", port=port, **conninfo)
        self.connections = 0
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                if self._refuse():
                    client.close()
                    continue
                server = socket.create_connection(self._upstream)
                self._sockets += [client, server]
                if self._refuse():  # down() came while it connected: not let through
                    self._drop_connections()
                    continue
                self.connections += 1
                state = self._new_connection()
                for target, ends in ((self._up, (client, server)), (self._down, (server, client))):
                    threading.Thread(target=target, args=(*ends, state), daemon=True).start()

    def _new_connection(self) -> Any:
        """What _up and _down of one connection share."""
        return None

    def _refuse(self) -> bool:
        """Whether to close a new client's connection at once."""
        return False

    def _up(self, client: socket.socket, server: socket.socket, state: Any) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                server.sendall(data)

    def _down(self, server: socket.socket, client: socket.socket, state: Any) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                client.sendall(data)

    def _drop_connections(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._sockets.clear()

    def close(self) -> None:
        self._drop_connections()
        self._listener.close()


class Outage(TcpProxy):
    """A TCP proxy that takes the database away: ``down()`` cuts every connection through
    it and closes new ones at once, until ``up()``."""

    def __init__(self, dsn: str) -> None:
        self.is_down = False
        super().__init__(dsn)

    def down(self) -> None:
        self.is_down = True
        self._drop_connections()

    def up(self) -> None:
        self.is_down = False

    def _refuse(self) -> bool:
        return self.is_down


class LoginThenSilence(TcpProxy):
    """A TCP proxy in front of Postgres that passes each connection's login, then drops
    whatever the client sends (while ``silent``): a PgBouncer whose server has gone away
    after the login, or a server that hangs. ``release`` closes the connections it holds
    and lets new ones through."""

    def __init__(self, dsn: str, *, silent: bool = True) -> None:
        self.silent = silent
        super().__init__(dsn)

    def _new_connection(self) -> threading.Event:
        return threading.Event()  # set once logged in

    def _up(self, client: socket.socket, server: socket.socket, state: Any) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if not (self.silent and state.is_set()):
                    server.sendall(data)

    def _down(self, server: socket.socket, client: socket.socket, state: Any) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                client.sendall(data)
                if b"Z\x00\x00\x00\x05" in data:  # ReadyForQuery: logged in
                    state.set()

    def release(self) -> None:
        self.silent = False
        self._drop_connections()


class DropsNotifications(TcpProxy):
    """A TCP proxy in front of Postgres that passes everything but the notifications
    (NotificationResponse messages) to the client: what a worker connected through a
    pooler in transaction mode sees."""

    def __init__(self, dsn: str) -> None:
        # Plain messages from the first byte on (no SSL or GSS negotiation answers).
        super().__init__(dsn, sslmode="disable", gssencmode="disable")

    def _down(self, server: socket.socket, client: socket.socket, state: Any) -> None:
        buffer = b""
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                buffer += data
                out = b""
                while len(buffer) >= 5:
                    size = 1 + int.from_bytes(buffer[1:5], "big")
                    if len(buffer) < size:
                        break
                    message, buffer = buffer[:size], buffer[size:]
                    if message[:1] != b"A":  # NotificationResponse
                        out += message
                if out:
                    client.sendall(out)
