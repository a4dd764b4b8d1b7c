"""What every back-end of the ledger provides, and what they share: the quota's 429.

A back-end reserves (``reserve``), writes settlements (``record``) and closes its connections
(``close``); ``settle`` turns a request's row, usage and reservation into a ``Settlement``.
When a counter has no room, a back-end reads it (``full_counter``) and raises ``refusal(...)``,
whose text says what is left and when it resets (tenants.quota).
"""
from abc import ABC, abstractmethod
from datetime import date
from typing import Literal

from proxy.gateway import errors
from proxy.gateway.errors import QuotaExceeded
from proxy.gateway.keys import KeyInfo
from proxy.gateway.ledger.records import Reservation, Settlement, Usage, UsageRow
from tenants import quota
from tenants.models import QuotaCounter, TeamQuotaCounter
from tenants.periods import period_reset_at

# Whose counter had no room for a reservation: the member's, or the team's cap.
NoRoom = Literal["member", "team"]


class Ledger(ABC):
    """A back-end of the ledger (proxy.gateway.ledger picks one per process)."""

    @abstractmethod
    async def reserve(self, *, key: KeyInfo, tokens: int) -> Reservation:
        """Reserve one request and `tokens` tokens for key's member this period, or raise QuotaExceeded."""

    async def settle(self, *, row: UsageRow, usage: Usage, reservation: Reservation | None = None) -> None:
        """Write the request's usage row; with a reservation, release it and charge the real usage."""
        await self.record(Settlement.of(row, usage, reservation))

    @abstractmethod
    async def record(self, settlement: Settlement) -> None:
        """Write one settlement exactly once (idempotent by request id)."""

    @abstractmethod
    async def swept(self) -> tuple[int, int]:
        """(requests, tokens) the reservation sweep gave back so far, from the counters (tenants.quota.SWEPT_SQL)."""

    @abstractmethod
    async def close(self) -> None:
        """Close the back-end's connections (at shutdown, or at the end of an event loop)."""


def full_counter(key: KeyInfo, start: date, no_room: NoRoom, using: str) -> QuotaCounter | TeamQuotaCounter:
    """The counter that had no room (ORM, in a database thread)."""
    if no_room == "team":
        return TeamQuotaCounter.objects.using(using).get(team_id=key.team_id, period_start=start)
    return QuotaCounter.objects.using(using).get(member_id=key.member_id, period_start=start)


def refusal(key: KeyInfo, start: date, tokens: int, counter: QuotaCounter | TeamQuotaCounter) -> QuotaExceeded:
    """The 429 for a request of `tokens` tokens that does not fit `counter`."""
    tz = key.team_timezone
    return errors.quota_exceeded(quota.refusal_message(
        team_cap=isinstance(counter, TeamQuotaCounter), need=tokens,
        request_limit=getattr(counter, "request_limit", None), requests_used=getattr(counter, "requests_used", 0),
        requests_reserved=getattr(counter, "requests_reserved", 0), token_limit=counter.token_limit,
        tokens_used=counter.tokens_used, tokens_reserved=counter.tokens_reserved,
        reset=period_reset_at(tz, start).strftime("%Y-%m-%d %H:%M"), tz=tz))
