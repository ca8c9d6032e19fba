"""examples/producers: the Flask and FastAPI producers enqueue inside the request's
transaction (a rolled-back request leaves neither the order nor its job), and a real
pgqueue-worker then runs the committed job."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from examples.producers.tasks import create_schema, send_confirmation
from tests.conftest import Daemons, scalar, wait_until

pytest.importorskip("flask", reason="the examples extra is not installed (pip install -e '.[dev]')")
pytest.importorskip("fastapi", reason="the examples extra is not installed")
pytest.importorskip("httpx", reason="the examples extra is not installed")

APP = "examples.producers.tasks:registry"


@pytest.fixture
def shop(dsn: str, conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    create_schema(dsn, {"book": 5, "pen": 1})
    yield conn


def counts(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """(orders, jobs of the confirmation task) in the database."""
    return (
        scalar(conn, "SELECT count(*) FROM shop_orders"),
        scalar(
            conn, "SELECT count(*) FROM pgqueue.jobs WHERE task = %s", (send_confirmation.name,)
        ),
    )


def check_producer(
    post: Callable[[dict[str, Any]], tuple[int, dict[str, Any]]],
    get: Callable[[int], dict[str, Any]],
    conn: psycopg.Connection[Any],
    daemons: Daemons,
) -> None:
    # A committed request: the order and its job, queued on the task's queue.
    status, body = post({"email": "ann@example.com", "sku": "book", "quantity": 2})
    assert status == 201, body
    order_id, job_id = body["order_id"], body["job_id"]
    job = conn.execute(
        "SELECT state, queue, max_attempts, args FROM pgqueue.jobs WHERE id = %s", (job_id,)
    ).fetchone()
    assert job == ("queued", "emails", 5, {"order_id": order_id, "email": "ann@example.com"})
    assert counts(conn) == (1, 1)
    assert scalar(conn, "SELECT available FROM shop_stock WHERE sku = 'book'") == 3

    # Rolled back after the enqueue (not enough stock): neither the order nor the job.
    status, body = post({"email": "bob@example.com", "sku": "pen", "quantity": 2})
    assert status == 409, body
    assert counts(conn) == (1, 1)
    assert scalar(conn, "SELECT available FROM shop_stock WHERE sku = 'pen'") == 1

    # A failing statement (unknown product): nothing either.
    status, _ = post({"email": "cy@example.com", "sku": "no-such-sku", "quantity": 1})
    assert status == 500
    assert counts(conn) == (1, 1)
    assert get(order_id) == {"order_id": order_id, "confirmed": False, "job_state": "queued"}

    # A real worker runs the committed job, and only that one.
    worker = daemons.worker("--queues", "emails", "--poll-interval", "0.2", app=APP)
    # The handler's side effect lands before its job's outcome is written: wait for both.
    wait_until(
        lambda: get(order_id)["job_state"] == "succeeded" or worker.poll() is not None,
        timeout=30,
    )
    assert worker.poll() is None, Daemons.output(worker)
    assert get(order_id) == {"order_id": order_id, "confirmed": True, "job_state": "succeeded"}
    assert counts(conn) == (1, 1)


def test_flask_producer_enqueues_in_the_request_transaction(
    dsn: str, shop: psycopg.Connection[Any], daemons: Daemons
) -> None:
    from examples.producers.flask_app import create_app

    app = create_app(dsn)
    client = app.test_client()

    def post(payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        response = client.post("/orders", json=payload)
        return response.status_code, response.get_json(silent=True) or {}

    def get(order_id: int) -> dict[str, Any]:
        response = client.get(f"/orders/{order_id}")
        assert response.status_code == 200
        body: dict[str, Any] = response.get_json()
        return body

    try:
        check_producer(post, get, shop, daemons)
        # Every request gave its connection back, idle (committed or rolled back).
        stats = app.extensions["pgqueue_pool"].get_stats()
        assert stats["pool_available"] == stats["pool_size"]
    finally:
        app.extensions["pgqueue_pool"].close()


def test_fastapi_producer_enqueues_in_the_request_transaction(
    dsn: str, shop: psycopg.Connection[Any], daemons: Daemons
) -> None:
    from fastapi.testclient import TestClient

    from examples.producers.fastapi_app import create_app

    with TestClient(create_app(dsn), raise_server_exceptions=False) as client:

        def post(payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            response = client.post("/orders", json=payload)
            try:
                return response.status_code, response.json()
            except ValueError:
                return response.status_code, {}

        def get(order_id: int) -> dict[str, Any]:
            response = client.get(f"/orders/{order_id}")
            assert response.status_code == 200
            body: dict[str, Any] = response.json()
            return body

        check_producer(post, get, shop, daemons)
        # Validation happens before any database work.
        assert post({"email": "d@example.com", "sku": "book", "quantity": 0})[0] == 422
        assert counts(shop) == (1, 1)
