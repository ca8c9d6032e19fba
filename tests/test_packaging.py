"""The wheel: built the way deploy/compose/Dockerfile builds it (from only the files the
Dockerfile copies, dependencies as wheels from PyPI), it holds the migrations, the SQL,
py.typed and the three console scripts; installed into a fresh venv with no index (as
the Dockerfile's runtime stage does), it migrates an empty database and runs a job.

Needs PyPI (the build backend and the dependencies): skipped when it is unreachable.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import pgqueue
from tests.conftest import ROOT, _admin, wait_until

pytestmark = pytest.mark.timeout(900)

DOCKERFILE = ROOT / "deploy" / "compose" / "Dockerfile"


def index_url() -> str:
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.index-url"],
            capture_output=True,
            text=True,
        )
        url = out.stdout.strip() if out.returncode == 0 else ""
    return (url or "https://pypi.org/simple").rstrip("/")


@pytest.fixture(scope="module")
def pypi() -> None:
    url = f"{index_url()}/hatchling/"
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            response.read(1)
    except OSError as exc:
        pytest.skip(f"no network access to the package index ({url}: {exc})")


def run(*argv: str | Path, timeout: float = 600, **kwargs: object) -> str:
    result = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,  # type: ignore[arg-type]
    )
    assert result.returncode == 0, f"{argv}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def dockerfile_context_sources() -> list[str]:
    """What the Dockerfile's build stage copies from the build context."""
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        match = re.match(r"^COPY\s+(?!--from)(.+)\s+\S+$", line.strip())
        if match:
            sources += match.group(1).split()
    return sources


@pytest.fixture(scope="module")
def wheelhouse(pypi: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel --wheel-dir` over a context holding only what the Dockerfile copies:
    pgqueue's wheel and its dependencies' wheels."""
    context = tmp_path_factory.mktemp("context")
    sources = dockerfile_context_sources()
    assert {"pyproject.toml", "README.md", "pgqueue/", "migrations/"} <= set(sources)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for source in sources:
        src = ROOT / source
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=ignore)
        else:
            shutil.copy2(src, context / source)
    wheels = tmp_path_factory.mktemp("wheels")
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", wheels, context)
    return wheels


@pytest.fixture(scope="module")
def wheel(wheelhouse: Path) -> Path:
    (found,) = wheelhouse.glob("pgqueue-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with pgqueue installed from the wheelhouse alone (no index)."""
    path = tmp_path_factory.mktemp("venv") / "venv"
    run(sys.executable, "-m", "venv", path)
    run(
        path / "bin" / "python",
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-index",
        "--find-links",
        wheelhouse,
        "pgqueue",
    )
    return path


def test_wheel_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        metadata = zf.read(f"{dist_info}/METADATA").decode()
    assert wheel.name.startswith(f"pgqueue-{pgqueue.__version__}-py3-none-any")
    migrations = {f"pgqueue/migrations/{p.name}" for p in (ROOT / "migrations").glob("*.sql")}
    assert migrations and {n for n in names if n.startswith("pgqueue/migrations/")} == migrations
    sql = {f"pgqueue/sql/{p.name}" for p in (ROOT / "pgqueue" / "sql").glob("*.sql")}
    assert sql and sql <= names
    assert "pgqueue/py.typed" in names
    assert not any(n.startswith(("tests/", "examples/", "deploy/", "bench/")) for n in names)
    assert not any("__pycache__" in n for n in names)
    parser = configparser.ConfigParser()
    parser.read_string(entry_points)
    assert dict(parser["console_scripts"]) == {
        "pgqueue": "pgqueue.cli:run",
        "pgqueue-worker": "pgqueue.cli:worker_main",
        "pgqueue-reaper": "pgqueue.cli:reaper_main",
    }
    assert f"Version: {pgqueue.__version__}" in metadata
    assert "Requires-Python: >=3.11" in metadata
    for dependency in ("psycopg", "psycopg-pool", "click", "structlog", "prometheus-client"):
        assert re.search(rf"^Requires-Dist: {dependency}\b", metadata, re.M | re.I), dependency


def test_installed_commands_report_their_version(venv: Path, tmp_path: Path) -> None:
    bin_ = venv / "bin"
    env = {"PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}", "LANG": "C.UTF-8"}
    version = pgqueue.__version__
    kw = {"cwd": tmp_path, "env": env, "timeout": 60}
    assert run(bin_ / "pgqueue", "--version", **kw).strip() == f"pgqueue, version {version}"
    assert run(bin_ / "python", "-m", "pgqueue", "--version", **kw).strip() == (
        f"pgqueue, version {version}"
    )
    assert version in run(bin_ / "pgqueue-worker", "--version", **kw)
    assert version in run(bin_ / "pgqueue-reaper", "--version", **kw)
    # pgqueue comes from the venv, not from this checkout.
    location = run(bin_ / "python", "-c", "import pgqueue; print(pgqueue.__file__)", **kw)
    assert location.strip().startswith(str(venv))
    typed = run(
        bin_ / "python",
        "-c",
        "import importlib.resources as r; print(r.files('pgqueue').joinpath('py.typed').is_file())",
        **kw,
    )
    assert typed.strip() == "True"


@pytest.fixture
def empty_db(server_dsn: str) -> Iterator[str]:
    """A database with no pgqueue schema at all."""
    name = f"pgqueue_pkg_{uuid.uuid4().hex[:10]}"
    _admin(server_dsn, f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(server_dsn, dbname=name)
    finally:
        _admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


APP = """
    import os

    import psycopg

    from pgqueue import Registry, current_job

    registry = Registry()


    @registry.task(name="pkg.record", queue="pkg")
    def record(word: str) -> None:
        with psycopg.connect(os.environ["PGQUEUE_DSN"], autocommit=True) as conn:
            conn.execute(
                "INSERT INTO pkg_results (job_id, word) VALUES (%s, %s)",
                (current_job().id, word),
            )
"""

ENQUEUE = """
    import os
    import sys

    import psycopg

    import pkg_app  # registers the task: its queue becomes the default
    from pgqueue import enqueue

    with psycopg.connect(os.environ["PGQUEUE_DSN"]) as conn, conn.transaction():
        print(enqueue(conn, "pkg.record", {"word": sys.argv[1]}))
"""


def test_installed_wheel_migrates_and_runs_a_job(venv: Path, empty_db: str, tmp_path: Path) -> None:
    bin_ = venv / "bin"
    env = {
        "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}",
        "LANG": "C.UTF-8",
        "PGQUEUE_DSN": empty_db,
    }
    (tmp_path / "pkg_app.py").write_text(textwrap.dedent(APP))
    (tmp_path / "enqueue_one.py").write_text(textwrap.dedent(ENQUEUE))
    kw = {"cwd": tmp_path, "env": env, "timeout": 120}

    # Every migration shipped in the wheel applies to an empty database, then none.
    out = run(bin_ / "pgqueue", "migrate", "--dsn", empty_db, **kw)
    applied = re.findall(r"^applied (\d{4})_\w+$", out, re.M)
    assert applied == sorted(p.name[:4] for p in (ROOT / "migrations").glob("*.sql"))
    assert "up to date" in run(bin_ / "pgqueue", "migrate", **kw)

    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE pkg_results (job_id bigint PRIMARY KEY, word text NOT NULL)")
        job_id = int(run(bin_ / "python", "enqueue_one.py", "hello", **kw))
        log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(
            [str(bin_ / "pgqueue-worker"), "--app", "pkg_app:registry", "--poll-interval", "0.2"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(
                lambda: (
                    conn.execute(
                        "SELECT word FROM pkg_results WHERE job_id = %s", (job_id,)
                    ).fetchone()
                    or worker.poll() is not None
                ),
                timeout=60,
            )
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=30) == 0, (tmp_path / "worker.log").read_text()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
    status = run(bin_ / "pgqueue", "status", str(job_id), **kw)
    assert re.search(r"^state\s+succeeded$", status, re.M), status
    assert re.search(r"^queue\s+pkg$", status, re.M), status
