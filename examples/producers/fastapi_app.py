"""A FastAPI producer that enqueues inside the request's database transaction.

Each request borrows an async connection from a pool (a dependency) and the endpoint
opens one transaction for the order row and its confirmation job: both commit before
the endpoint returns, or neither does. An HTTPException raised inside the transaction
(here: not enough stock) rolls back the order and the job together.

    pip install -e '.[examples]'   # in a pgqueue checkout
    PGQUEUE_DSN=postgresql://... uvicorn --factory examples.producers.fastapi_app:create_app
    curl -X POST localhost:8000/orders -H 'content-type: application/json' \\
         -d '{"email": "a@example.com", "sku": "book", "quantity": 1}'
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import psycopg
from fastapi import Depends, FastAPI, HTTPException, Request
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from examples.producers.tasks import send_confirmation
from pgqueue import enqueue


class OrderIn(BaseModel):
    email: str
    sku: str
    quantity: int = Field(gt=0)


class OrderOut(BaseModel):
    order_id: int
    job_id: int


async def connection(request: Request) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """One pooled connection per request."""
    pool: AsyncConnectionPool = request.app.state.pool
    async with pool.connection() as conn:
        yield conn


Connection = Annotated[psycopg.AsyncConnection[Any], Depends(connection)]


def create_app(dsn: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = AsyncConnectionPool(
            dsn or os.environ["PGQUEUE_DSN"], min_size=1, max_size=10, open=False
        )
        await pool.open()
        app.state.pool = pool
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(title="pgqueue FastAPI producer example", lifespan=lifespan)

    @app.post("/orders", status_code=201)
    async def create_order(order: OrderIn, conn: Connection) -> OrderOut:
        # The transaction commits when the block ends, before the response is sent; an
        # exception (HTTPException included) rolls back the order and its job.
        async with conn.transaction():
            cur = await conn.execute(
                "INSERT INTO shop_orders (email, sku, quantity) VALUES (%s, %s, %s) RETURNING id",
                (order.email, order.sku, order.quantity),
            )
            row = await cur.fetchone()
            assert row is not None
            order_id = row[0]
            job_id = await enqueue(
                conn, send_confirmation.name, {"order_id": order_id, "email": order.email}
            )
            await conn.execute(
                "UPDATE shop_orders SET confirmation_job_id = %s WHERE id = %s",
                (job_id, order_id),
            )
            cur = await conn.execute(
                "UPDATE shop_stock SET available = available - %s"
                " WHERE sku = %s AND available >= %s",
                (order.quantity, order.sku, order.quantity),
            )
            if cur.rowcount != 1:
                raise HTTPException(409, f"not enough {order.sku} in stock")
        return OrderOut(order_id=order_id, job_id=job_id)

    @app.get("/orders/{order_id}")
    async def get_order(order_id: int, conn: Connection) -> dict[str, Any]:
        cur = await conn.execute(
            "SELECT o.id, o.confirmed_at IS NOT NULL, j.state"
            " FROM shop_orders o LEFT JOIN pgqueue.jobs j ON j.id = o.confirmation_job_id"
            " WHERE o.id = %s",
            (order_id,),
        )
        row = await cur.fetchone()
        if row is None:
            raise HTTPException(404, "no such order")
        return {"order_id": row[0], "confirmed": row[1], "job_state": row[2]}

    return app
