"""A Flask producer that enqueues inside the request's database transaction.

Like Django's ATOMIC_REQUESTS: each request that touches the database gets one
connection from a pool and one transaction, committed when the view returns a
successful response and rolled back when it fails or raises. The order row and its
confirmation job are written in that transaction, so the job exists if and only if the
order does: a worker never sees a job for an order that was rolled back, and a committed
order never lacks its job.

    PGQUEUE_DSN=postgresql://... flask --app examples.producers.flask_app run
    curl -X POST localhost:5000/orders -H 'content-type: application/json' \\
         -d '{"email": "a@example.com", "sku": "book", "quantity": 1}'
"""

from __future__ import annotations

import os
from typing import Any

import psycopg
from flask import Flask, Response, abort, current_app, g, jsonify, request
from psycopg_pool import ConnectionPool

from examples.producers.tasks import send_confirmation
from pgqueue import enqueue


def db() -> psycopg.Connection[Any]:
    """The request's connection; its transaction spans the whole request."""
    if "db" not in g:
        pool: ConnectionPool = current_app.extensions["pgqueue_pool"]
        g.db = pool.getconn()
    conn: psycopg.Connection[Any] = g.db
    return conn


def create_app(dsn: str | None = None) -> Flask:
    app = Flask(__name__)
    pool = ConnectionPool(dsn or os.environ["PGQUEUE_DSN"], min_size=1, max_size=10, open=True)
    app.extensions["pgqueue_pool"] = pool

    @app.after_request
    def _commit(response: Response) -> Response:
        # Commit before the response leaves: if the commit fails, the client gets a 500,
        # not a 201 for an order that does not exist.
        conn = g.pop("db", None)
        if conn is not None:
            try:
                if response.status_code < 400:
                    conn.commit()
                else:
                    conn.rollback()
            finally:
                pool.putconn(conn)
        return response

    @app.teardown_request
    def _rollback(exc: BaseException | None) -> None:
        # Reached with a connection still out only when the view raised.
        conn = g.pop("db", None)
        if conn is not None:
            conn.rollback()
            pool.putconn(conn)

    @app.post("/orders")
    def create_order() -> tuple[Response, int]:
        body = request.get_json(force=True)
        conn = db()
        row = conn.execute(
            "INSERT INTO shop_orders (email, sku, quantity) VALUES (%s, %s, %s) RETURNING id",
            (body["email"], body["sku"], body["quantity"]),
        ).fetchone()
        assert row is not None
        order_id = row[0]
        # Same connection, same transaction: the job commits or rolls back with the order.
        job_id = enqueue(
            conn, send_confirmation.name, {"order_id": order_id, "email": body["email"]}
        )
        conn.execute(
            "UPDATE shop_orders SET confirmation_job_id = %s WHERE id = %s", (job_id, order_id)
        )
        # Reserve the stock last: when there is not enough, the 409 rolls back the order
        # and its job together.
        reserved = conn.execute(
            "UPDATE shop_stock SET available = available - %s WHERE sku = %s AND available >= %s",
            (body["quantity"], body["sku"], body["quantity"]),
        ).rowcount
        if reserved != 1:
            abort(409, description=f"not enough {body['sku']} in stock")
        return jsonify(order_id=order_id, job_id=job_id), 201

    @app.get("/orders/<int:order_id>")
    def get_order(order_id: int) -> Response:
        conn = db()
        row = conn.execute(
            "SELECT o.id, o.confirmed_at IS NOT NULL, j.state"
            " FROM shop_orders o LEFT JOIN pgqueue.jobs j ON j.id = o.confirmation_job_id"
            " WHERE o.id = %s",
            (order_id,),
        ).fetchone()
        if row is None:
            abort(404)
        return jsonify(order_id=row[0], confirmed=row[1], job_state=row[2])

    return app
