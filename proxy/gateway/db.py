"""Database access from the async gateway in a worker thread, never a hang.

Key lookups on a cache miss, the routing table and, on SQLite (embedded mode), the
ledger's statements are Django code run in a worker thread (`run_db`). On PostgreSQL the
ledger's statements run on the event loop instead (proxy.gateway.ledger.pool). A broken
connection is dropped and the failing call becomes a 503 (`DatabaseUnavailable`) that the
OpenAI SDK retries.
"""
import logging
from collections.abc import Callable
from typing import TypeVar

from asgiref.sync import sync_to_async
from django.db import DatabaseError, InterfaceError, OperationalError, connection

from proxy.gateway import errors
from proxy.gateway.errors import DatabaseUnavailable  # noqa: F401  (callers catch it by this name too)

log = logging.getLogger("qwenhub.gateway")
T = TypeVar("T")


def _guarded(fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
    try:
        return fn(*args, **kwargs)
    except (OperationalError, InterfaceError) as exc:
        log.warning("database unavailable: %s", exc.__class__.__name__)
        try:
            connection.close()
        except DatabaseError:
            pass
        raise errors.database_unavailable() from exc


async def run_db(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run fn(*args, **kwargs) in a database thread; raise DatabaseUnavailable if it cannot."""
    return await sync_to_async(_guarded, thread_sensitive=False)(fn, args, kwargs)
