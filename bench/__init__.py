"""The pgqueue benchmark suite: pgqueue against PgQueuer, procrastinate, Oban for Python
and Celery (Redis) on one Postgres, plus the pgbench ceiling. Run ``python -m bench``;
see bench/README.md. Never imported by the library or its tests."""
