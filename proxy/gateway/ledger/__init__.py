"""The ledger: a request's quota reservation before it is forwarded, and its settlement after.

This is the request path's whole interface to the quota counters and usage rows:

- ``await reserve(key=..., tokens=...)`` → a ``Reservation``, or raises the quota's 429
  (``QuotaExceeded``) or a 503 when the database is unavailable (``DatabaseUnavailable``);
- ``await settle(row=..., usage=..., reservation=...)`` writes the request's one usage row
  and, with a reservation, releases it and charges the real usage (idempotent by request id);
- ``await swept()`` → what the reservation sweep (tenants.services.reservations) gave back so
  far, for /metrics;
- ``await close()`` closes the process's ledger connections (at shutdown).

The rule itself (worst case, what is charged, the statements) is ``tenants.quota``. The
process's back-end follows Django's default database (``backend()``):

- ``postgres``: asyncpg on the event loop (``pool``), a member's bursts combined (``combiner``);
- ``sqlite``: Django's cursor in a worker thread (embedded mode).

Both implement ``base.Ledger`` and are held to one contract (tests/test_ledger_contract.py);
``records`` holds what they read and write (Usage, UsageRow, Reservation, Settlement).
"""
from django.db import connections

from proxy.gateway.errors import ApiError, QuotaExceeded
from proxy.gateway.keys import KeyInfo
from proxy.gateway.ledger.base import Ledger
from proxy.gateway.ledger.postgres import PostgresLedger
from proxy.gateway.ledger.records import Reservation, Usage, UsageRow
from proxy.gateway.ledger.sqlite import SqliteLedger

__all__ = ["Ledger", "QuotaExceeded", "Reservation", "Usage", "UsageRow", "backend", "close", "reserve", "settle",
           "swept"]

_backend: Ledger | None = None


def backend() -> Ledger:
    """The process's back-end: PostgreSQL when Django's default database is PostgreSQL, else SQLite."""
    global _backend
    if _backend is None:
        _backend = PostgresLedger() if connections["default"].vendor == "postgresql" else SqliteLedger()
    return _backend


async def reserve(*, key: KeyInfo, tokens: int) -> Reservation:
    """Reserve one request and `tokens` tokens for key's member this period, or raise QuotaExceeded."""
    return await backend().reserve(key=key, tokens=tokens)


async def settle(*, row: UsageRow, usage: Usage, reservation: Reservation | None = None) -> None:
    """Write the request's usage row; with a reservation, release it and charge the real usage."""
    await backend().settle(row=row, usage=usage, reservation=reservation)


async def swept() -> tuple[int, int] | None:
    """(requests, tokens) the reservation sweep gave back so far; None if the database is unavailable."""
    try:
        return await backend().swept()
    except ApiError:
        return None


async def close() -> None:
    """Close the process's database connections of the request path (at shutdown, or a loop's end)."""
    global _backend
    if _backend is not None:
        ledger, _backend = _backend, None
        await ledger.close()
