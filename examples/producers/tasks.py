"""The tasks both producer examples enqueue, and the schema of their little shop.

Run a worker for them with (from the repository root):

    pgqueue-worker --app examples.producers.tasks:registry

The producers import this module too, so the task's queue and max_attempts become the
defaults of their enqueues.
"""

from __future__ import annotations

import os

import psycopg

from pgqueue import Registry, current_job

registry = Registry()

SCHEMA = """
CREATE TABLE IF NOT EXISTS shop_stock (
    sku text PRIMARY KEY,
    available integer NOT NULL CHECK (available >= 0)
);
CREATE TABLE IF NOT EXISTS shop_orders (
    id bigserial PRIMARY KEY,
    email text NOT NULL,
    sku text NOT NULL REFERENCES shop_stock (sku),
    quantity integer NOT NULL CHECK (quantity > 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    confirmation_job_id bigint,
    confirmed_at timestamptz
);
"""


def create_schema(dsn: str, stock: dict[str, int]) -> None:
    """Create the example tables and set the stock (idempotent)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        for sku, available in stock.items():
            conn.execute(
                "INSERT INTO shop_stock (sku, available) VALUES (%s, %s)"
                " ON CONFLICT (sku) DO UPDATE SET available = excluded.available",
                (sku, available),
            )


@registry.task(name="shop.send_confirmation", queue="emails", max_attempts=5)
def send_confirmation(order_id: int, email: str) -> None:
    """Sends the order confirmation (here: marks the order confirmed). The worker runs it
    only for orders whose transaction committed; it is idempotent, since a job may run
    more than once (at-least-once delivery)."""
    job = current_job()
    with psycopg.connect(os.environ["PGQUEUE_DSN"], autocommit=True) as conn:
        conn.execute(
            "UPDATE shop_orders SET confirmed_at = coalesce(confirmed_at, now())"
            " WHERE id = %s AND confirmation_job_id = %s",
            (order_id, job.id),
        )
