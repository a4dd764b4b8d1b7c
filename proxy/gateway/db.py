"""Database access from the async gateway, never a hang.

On PostgreSQL the two hot-path statements (reserve, settle) run on the event
loop through a small asyncpg connection pool: no thread hop, server-side
prepared statements. Everything else (key lookups on a cache miss, the routing
table) is ORM code run in a worker thread (`run_db`); so is all of it on SQLite
(embedded mode). A broken connection is dropped and the failing call becomes a
503 that the OpenAI SDK retries.
"""
import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

import asyncpg
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connection

from proxy.gateway.errors import DATABASE_UNAVAILABLE, ApiError

log = logging.getLogger("qwenhub.gateway")
T = TypeVar("T")

# What "PostgreSQL is not there (any more)" looks like to asyncpg: the connection is dropped.
# (A connection whose server went away while it was idle can also fail with InternalClientError.)
CONNECTION_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
                     asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InternalClientError)


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
    """A small pool of asyncpg connections to Django's default database.

    Taking a free connection is a list pop behind a semaphore (no task, no timer),
    which is most of why this is cheaper than a general-purpose pool: the hot path
    runs two short statements per request and nothing else. Statements are
    prepared once per connection (asyncpg's statement cache).
    """

    def __init__(self) -> None:
        db = settings.DATABASES["default"]
        options = dict(db.get("OPTIONS") or {})
        self.connect_kwargs = {
            "host": db.get("HOST") or None, "port": int(db["PORT"]) if db.get("PORT") else None,
            "user": db.get("USER") or None, "password": db.get("PASSWORD") or None, "database": db["NAME"],
            "timeout": options.get("connect_timeout", 3), "ssl": options.get("sslmode"),
            "server_settings": {"application_name": "qwenhub-gateway"},
        }
        self.size = settings.QWENHUB_DB_POOL_SIZE
        self.free: list[asyncpg.Connection] = []
        self._slots: asyncio.Semaphore | None = None

    async def _acquire(self) -> asyncpg.Connection:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        if self._slots.locked():
            try:
                async with asyncio.timeout(settings.QWENHUB_DB_POOL_TIMEOUT):
                    await self._slots.acquire()
            except TimeoutError:
                log.warning("database unavailable: no pooled connection within %ss", settings.QWENHUB_DB_POOL_TIMEOUT)
                raise DatabaseUnavailable() from None
        else:
            await self._slots.acquire()  # returns at once
        while self.free:
            conn = self.free.pop()
            if not conn.is_closed():
                return conn
        try:
            return await asyncpg.connect(**self.connect_kwargs)
        except BaseException as exc:
            self._slots.release()
            if isinstance(exc, CONNECTION_ERRORS):
                log.warning("database unavailable: %s", exc.__class__.__name__)
                raise DatabaseUnavailable() from exc
            raise

    def _release(self, conn: asyncpg.Connection, broken: bool) -> None:
        if broken or conn.is_closed():
            conn.terminate()
        else:
            self.free.append(conn)
        self._slots.release()

    async def run(self, fn, *args):
        """Run `await fn(conn, *args)` on a pooled connection; DatabaseUnavailable if PostgreSQL is not there."""
        conn = await self._acquire()
        broken = True
        try:
            result = await fn(conn, *args)
            broken = False
            return result
        except CONNECTION_ERRORS as exc:
            log.warning("database unavailable: %s", exc.__class__.__name__)
            raise DatabaseUnavailable() from exc
        except asyncpg.PostgresError:
            broken = False  # the statement failed; the connection is fine
            raise
        finally:
            self._release(conn, broken)

    async def close(self) -> None:
        free, self.free = self.free, []
        for conn in free:
            try:
                await asyncio.wait_for(conn.close(), 1)
            except (*CONNECTION_ERRORS, asyncpg.PostgresError):
                conn.terminate()


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


def numbered(sql: str) -> str:
    """The same SQL with asyncpg's placeholders: each `%s` in turn becomes $1, $2, ..."""
    parts = sql.split("%s")
    return "".join(f"{part}${i}" for i, part in enumerate(parts[:-1], 1)) + parts[-1]


class Combiner:
    """One statement at a time per key (a counter row); what arrives meanwhile goes together in the next one.

    Statements on one counter row queue on its row lock in PostgreSQL anyway; combining
    them turns a burst of N into a few statements and leaves the pool's other
    connections free. A lone call never waits: `single(key, item)` runs at once. Calls
    that find their key busy wait, and are then handed together to `many(key, items)`,
    which returns one result per item. An exception fails every call of its statement.
    A result whose caller was cancelled while it waited goes to `orphan(key, item, result)`
    (a reservation nobody will settle must be given back).
    """

    def __init__(self, single, many, orphan=None) -> None:
        self.single, self.many, self.orphan = single, many, orphan
        self.waiting: dict = {}  # key -> [(item, future)] of the calls waiting for the key's statement
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    async def submit(self, key, item):
        queue = self.waiting.get(key)
        if queue is not None:
            future = asyncio.get_running_loop().create_future()
            queue.append((item, future))
            return await future
        self.waiting[key] = []
        try:
            return await self.single(key, item)
        finally:
            if self.waiting[key]:
                task = asyncio.ensure_future(self._drain(key))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                del self.waiting[key]

    async def _drain(self, key) -> None:
        queue = self.waiting[key]
        try:
            while queue:
                batch = queue[:]
                queue.clear()
                try:
                    results = await self.many(key, [item for item, _ in batch])
                except BaseException as exc:
                    cancelled = isinstance(exc, asyncio.CancelledError)
                    for _, future in batch:
                        if not future.done():
                            future.cancel() if cancelled else future.set_exception(exc)
                    if cancelled:
                        raise
                else:
                    for (item, future), result in zip(batch, results, strict=True):
                        if not future.done():
                            future.set_result(result)
                        elif self.orphan is not None:
                            try:
                                await self.orphan(key, item, result)
                            except Exception:  # noqa: BLE001 - the others of the batch are answered already
                                log.exception("could not give back an orphaned result")
        finally:
            del self.waiting[key]
            for _, future in queue:
                future.cancel()
