"""The ledger: a request's quota reservation before it is forwarded, and its settlement after.

This is the request path's whole interface to the quota counters and usage rows:

- ``await reserve(key=..., tokens=...)`` → a ``Reservation``, or raises the quota's 429
  (``QuotaExceeded``) or a 503 when the database is unavailable;
- ``await settle(row=..., usage=..., reservation=...)`` writes the request's one usage row
  and, with a reservation, releases it and charges the real usage (idempotent by request id).

The rule itself (worst case, what is charged, the statements) is ``tenants.quota``.
"""
from proxy.gateway.admission import QuotaExceeded, Reservation
from proxy.gateway.admission import reserve as _reserve
from proxy.gateway.db import close_async_postgres
from proxy.gateway.keys import KeyInfo
from proxy.gateway.metering import Usage, UsageRow
from proxy.gateway.metering import settle as _settle

__all__ = ["QuotaExceeded", "Reservation", "Usage", "UsageRow", "close", "reserve", "settle"]


async def reserve(*, key: KeyInfo, tokens: int) -> Reservation:
    """Reserve one request and `tokens` tokens for key's member this period, or raise QuotaExceeded."""
    return await _reserve(key, tokens)


async def settle(*, row: UsageRow, usage: Usage, reservation: Reservation | None = None) -> None:
    """Write the request's usage row; with a reservation, release it and charge the real usage."""
    if reservation is None:
        await _settle(row, usage)
    else:
        await _settle(row, usage, reservation.counter_id, reservation.tokens, reservation.team_counter_id)


async def close() -> None:
    """Close the process's database connections of the request path (at shutdown)."""
    await close_async_postgres()
