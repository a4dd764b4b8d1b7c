"""The PostgreSQL back-end's connections: a small asyncpg pool, cheap when healthy, a clear 503 when not.

The hot path runs two short statements per request (reserve, settle) on the event loop: no
thread hop, server-side prepared statements. A broken connection is dropped and the failing
call becomes a 503 that the OpenAI SDK retries.

A connection the server ended while it sat idle in the pool (PostgreSQL restarted, or an
administrator terminated it) is not used: before a pooled connection is handed out, one that
is closed or has something to read is dropped (an idle connection is sent nothing but the
server's goodbye: an error, then end of file). asyncpg may already have read that goodbye
while ``is_closed()`` is still False (the end of file is not there yet); it then refuses to
send the next statement, and the call runs once more on a new connection, since nothing
reached the server.
"""
import asyncio
import logging
import select

import asyncpg
from django.conf import settings

from proxy.gateway import errors

log = logging.getLogger("qwenhub.gateway")

# What "PostgreSQL is not there (any more)" looks like to asyncpg: the connection is dropped.
# (A connection whose server went away while it was idle can also fail with InternalClientError.)
CONNECTION_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
                     asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InternalClientError)


def numbered(sql: str) -> str:
    """The same SQL with asyncpg's placeholders: each `%s` in turn becomes $1, $2, ..."""
    parts = sql.split("%s")
    return "".join(f"{part}${i}" for i, part in enumerate(parts[:-1], 1)) + parts[-1]


def _has_input(conn: asyncpg.Connection) -> bool:
    """True if an idle connection's socket has something to read (the event loop has not read it yet)."""
    transport = getattr(conn, "_transport", None)  # asyncpg does not expose its transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def _refused_before_sending(exc: BaseException) -> bool:
    """True if asyncpg refused to start a statement: its connection had taken a message while idle.

    asyncpg checks that its protocol is idle before it writes anything; a server error that
    arrived while idle (the goodbye of a terminated connection) leaves it busy for good.
    """
    return isinstance(exc, asyncpg.exceptions.InternalClientError) and str(exc).startswith("cannot switch to state")


class _DeadBeforeUse(Exception):
    """A pooled connection turned out to be dead before the call's statement was sent."""


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

    async def _acquire(self, fresh: bool) -> tuple[asyncpg.Connection, bool]:
        """A connection and whether it came from the pool (else it is new); `fresh` asks for a new one."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        if self._slots.locked():
            try:
                async with asyncio.timeout(settings.QWENHUB_DB_POOL_TIMEOUT):
                    await self._slots.acquire()
            except TimeoutError:
                log.warning("database unavailable: no pooled connection within %ss", settings.QWENHUB_DB_POOL_TIMEOUT)
                raise errors.database_unavailable() from None
        else:
            await self._slots.acquire()  # returns at once
        while self.free and not fresh:
            conn = self.free.pop()
            if not conn.is_closed() and not _has_input(conn):
                return conn, True
            conn.terminate()  # ended by the server while idle
        try:
            return await asyncpg.connect(**self.connect_kwargs), False
        except BaseException as exc:
            self._slots.release()
            if isinstance(exc, CONNECTION_ERRORS):
                log.warning("database unavailable: %s", exc.__class__.__name__)
                raise errors.database_unavailable() from exc
            raise

    def _release(self, conn: asyncpg.Connection, broken: bool) -> None:
        if broken or conn.is_closed():
            conn.terminate()
        else:
            self.free.append(conn)
        self._slots.release()

    async def run(self, fn, *args):
        """Run `await fn(conn, *args)` on a pooled connection; DatabaseUnavailable if PostgreSQL is not there.

        If the pooled connection was dead before fn's statement could be sent, fn runs once more
        on a new connection: fn must be safe to run again after a statement that was not sent
        (the ledger's are: what they sent before changed nothing, opened a month's row, which is
        idempotent, or was in a transaction that the dead connection rolled back).
        """
        try:
            return await self._run(fn, args, fresh=False)
        except _DeadBeforeUse:
            log.info("a pooled database connection was ended while idle; running the call on a new one")
            return await self._run(fn, args, fresh=True)

    async def _run(self, fn, args: tuple, fresh: bool):
        conn, pooled = await self._acquire(fresh)
        broken = True
        try:
            result = await fn(conn, *args)
            broken = False
            return result
        except CONNECTION_ERRORS as exc:
            if pooled and _refused_before_sending(exc):
                raise _DeadBeforeUse from exc
            log.warning("database unavailable: %s", exc.__class__.__name__)
            raise errors.database_unavailable() from exc
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
