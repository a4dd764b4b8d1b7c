"""Database access from the async gateway, never a hang.

On PostgreSQL the two hot-path statements (reserve, settle) run on the event
loop through a small psycopg async connection pool: no thread hop, server-side
prepared statements. Everything else (key lookups on a cache miss, the routing
table) is ORM code run in a worker thread (`run_db`); so is all of it on SQLite
(embedded mode). A broken connection is dropped and the failing call becomes a
503 that the OpenAI SDK retries.
"""
import logging
from collections.abc import Callable
from typing import TypeVar

import psycopg
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connection
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from proxy.errors import DATABASE_UNAVAILABLE, ApiError

log = logging.getLogger("qwenhub.gateway")
T = TypeVar("T")


class DatabaseUnavailable(ApiError):
    def __init__(self) -> None:
        super().__init__(503, DATABASE_UNAVAILABLE, "service_unavailable", code="database_unavailable")


def _guarded(fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
    try:
        return fn(*args, **kwargs)
    except (OperationalError, InterfaceError) as exc:
        log.warning("database unavailable: %s", exc.__class__.__name__)
        try:
            connection.close()
        except DatabaseError:
            pass
        raise DatabaseUnavailable() from exc


async def run_db(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run fn(*args, **kwargs) in a database thread; raise DatabaseUnavailable if it cannot."""
    return await sync_to_async(_guarded, thread_sensitive=False)(fn, args, kwargs)


class AsyncPostgres:
    """A pool of autocommit psycopg connections to Django's default database."""

    def __init__(self) -> None:
        db = settings.DATABASES["default"]
        options = dict(db.get("OPTIONS") or {})
        self.conninfo = make_conninfo(
            dbname=db["NAME"], user=db.get("USER") or None, password=db.get("PASSWORD") or None,
            host=db.get("HOST") or None, port=db.get("PORT") or None,
            connect_timeout=options.get("connect_timeout", 3), application_name="qwenhub-gateway",
        )
        self.pool: AsyncConnectionPool | None = None

    async def _pool(self) -> AsyncConnectionPool:
        if self.pool is None:
            self.pool = AsyncConnectionPool(
                self.conninfo, min_size=1, max_size=settings.QWENHUB_DB_POOL_SIZE, open=False,
                timeout=settings.QWENHUB_DB_POOL_TIMEOUT, kwargs={"autocommit": True},
                name="qwenhub-gateway",
            )
            await self.pool.open(wait=False)
        return self.pool

    async def run(self, fn, *args):
        """Run `await fn(conn, *args)` on a pooled connection; DatabaseUnavailable if PostgreSQL is not there."""
        pool = await self._pool()
        try:
            async with pool.connection() as conn:
                return await fn(conn, *args)
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
            log.warning("database unavailable: %s", exc.__class__.__name__)
            raise DatabaseUnavailable() from exc

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None


_postgres: AsyncPostgres | None = None


def async_postgres() -> AsyncPostgres | None:
    """The process's pool when the database is PostgreSQL, else None (use run_db)."""
    global _postgres
    if _postgres is None and connection.vendor == "postgresql":
        _postgres = AsyncPostgres()
    return _postgres


async def close_async_postgres() -> None:
    global _postgres
    if _postgres is not None:
        await _postgres.close()
        _postgres = None
