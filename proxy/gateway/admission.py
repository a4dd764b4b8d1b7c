"""Admission: the exact monthly quota, reserved in the database before forwarding.

One conditional UPDATE reserves 1 request and the request's worst case in tokens
(prompt bound + max_tokens × n). Zero rows updated means "over quota", so
concurrent requests can never push a member past a limit, across any number of
gateway processes. A member's requests that arrive while one of theirs is being
reserved are reserved together in the next UPDATE if all of them fit (one by one
in arrival order if not). Settlement (proxy.gateway.metering) later moves the reservation into
`used` with the real token counts.

Near the limit a request is admitted only if its worst case fits in what is
left: a member with 500 tokens left may still send a request with
max_tokens=300 and a short prompt, but not one that could use 4,096.
"""
from dataclasses import dataclass
from datetime import date

from django.db import connection, transaction

from proxy.gateway.db import Combiner, async_postgres, numbered, run_db
from proxy.gateway.errors import ApiError
from proxy.gateway.keys import KeyInfo
from proxy.gateway.observability import RESERVE_STATEMENTS
from tenants import quota
from tenants.models import QuotaCounter, TeamQuotaCounter
from tenants.periods import period_reset_at, period_start_for

_RESERVE_SQL, _RESERVE_MANY_SQL, _RELEASE_SQL = quota.RESERVE_SQL, quota.RESERVE_MANY_SQL, quota.RELEASE_SQL
_OPEN_SQL, _TEAM_RESERVE_SQL, _TEAM_OPEN_SQL = quota.OPEN_SQL, quota.TEAM_RESERVE_SQL, quota.TEAM_OPEN_SQL


@dataclass(slots=True)
class Reservation:
    counter_id: int
    period_start: date
    tokens: int
    team_counter_id: int | None = None


class QuotaExceeded(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(429, message, "insufficient_quota", code="insufficient_quota",
                         headers=[(b"x-should-retry", b"false")])


def _take(cursor, reserve_sql: str, reserve_args: list, open_sql: str, open_args: list) -> int | None:
    """Run a conditional reservation UPDATE, opening the period's row first if it is missing."""
    RESERVE_STATEMENTS.inc()
    cursor.execute(reserve_sql, reserve_args)
    row = cursor.fetchone()
    if row:
        return row[0]
    # No row: either the first request of the period, or no room left.
    # (A concurrent first request may have opened it already: retry either way.)
    RESERVE_STATEMENTS.inc(2)
    cursor.execute(open_sql, open_args)
    cursor.execute(reserve_sql, reserve_args)
    row = cursor.fetchone()
    return row[0] if row else None


def _reserve(key: KeyInfo, start: date, tokens: int) -> tuple[int, int | None] | QuotaCounter | TeamQuotaCounter:
    """Return the reserved counters' ids, or the counter that has no room left."""
    member_args = [tokens, key.member_id, start, tokens]
    with connection.cursor() as cursor:
        if key.team_token_cap is None:
            counter_id = _take(cursor, _RESERVE_SQL, member_args, _OPEN_SQL,
                               quota.open_args(member_id=key.member_id, start=start))
            if counter_id is not None:
                return counter_id, None
        else:
            # The member's and the team's reservations stand or fall together.
            with transaction.atomic():
                counter_id = _take(cursor, _RESERVE_SQL, member_args, _OPEN_SQL,
                                   quota.open_args(member_id=key.member_id, start=start))
                if counter_id is not None:
                    team_id = _take(cursor, _TEAM_RESERVE_SQL, [tokens, key.team_id, start, tokens],
                                    _TEAM_OPEN_SQL, quota.team_open_args(team_id=key.team_id, start=start))
                    if team_id is not None:
                        return counter_id, team_id
                    transaction.set_rollback(True)
            if counter_id is not None:
                return TeamQuotaCounter.objects.get(team_id=key.team_id, period_start=start)
    return QuotaCounter.objects.get(member_id=key.member_id, period_start=start)


_RESERVE_ASYNC, _OPEN_ASYNC = numbered(_RESERVE_SQL), numbered(_OPEN_SQL)
_RESERVE_MANY_ASYNC, _RELEASE_ASYNC = numbered(_RESERVE_MANY_SQL), numbered(_RELEASE_SQL)
_TEAM_RESERVE_ASYNC, _TEAM_OPEN_ASYNC = numbered(_TEAM_RESERVE_SQL), numbered(_TEAM_OPEN_SQL)


class _NoRoom(Exception):
    """Rolls back a member's reservation when the team has no room."""


async def _take_async(conn, reserve_sql: str, reserve_args: list, open_sql: str, open_args: list) -> int | None:
    """_take on an asyncpg connection."""
    RESERVE_STATEMENTS.inc()
    counter_id = await conn.fetchval(reserve_sql, *reserve_args)
    if counter_id is not None:
        return counter_id
    RESERVE_STATEMENTS.inc(2)
    await conn.execute(open_sql, *open_args)
    return await conn.fetchval(reserve_sql, *reserve_args)


async def _reserve_async(conn, key: KeyInfo, start: date, tokens: int) -> tuple[int, int | None] | str:
    """_reserve on PostgreSQL's async pool: the counters' ids, or "member"/"team" for who has no room."""
    member_args = [tokens, key.member_id, start, tokens]
    open_args = quota.open_args(member_id=key.member_id, start=start)
    if key.team_token_cap is None:
        counter_id = await _take_async(conn, _RESERVE_ASYNC, member_args, _OPEN_ASYNC, open_args)
        return (counter_id, None) if counter_id is not None else "member"
    RESERVE_STATEMENTS.inc(2)  # BEGIN, COMMIT/ROLLBACK
    try:
        async with conn.transaction():
            counter_id = await _take_async(conn, _RESERVE_ASYNC, member_args, _OPEN_ASYNC, open_args)
            if counter_id is None:
                return "member"
            team_id = await _take_async(conn, _TEAM_RESERVE_ASYNC, [tokens, key.team_id, start, tokens],
                                        _TEAM_OPEN_ASYNC, quota.team_open_args(team_id=key.team_id, start=start))
            if team_id is None:
                raise _NoRoom  # the member's reservation goes too
            return counter_id, team_id
    except _NoRoom:
        return "team"


def _reserve_one(counter: tuple[int, date], item: tuple[KeyInfo, int]):
    key, tokens = item
    return async_postgres().run(_reserve_async, key, counter[1], tokens)


async def _reserve_many_async(conn, member_id: int, start: date, count: int, tokens: int) -> int | None:
    RESERVE_STATEMENTS.inc()
    return await conn.fetchval(_RESERVE_MANY_ASYNC, count, tokens, member_id, start, count, tokens)


async def _reserve_many(counter: tuple[int, date], items: list[tuple[KeyInfo, int]]) -> list:
    """Reserve a member's queued requests together if they all fit, else one by one in arrival order."""
    member_id, start = counter
    postgres = async_postgres()
    counter_id = await postgres.run(_reserve_many_async, member_id, start, len(items),
                                    sum(tokens for _, tokens in items))
    if counter_id is not None:
        return [(counter_id, None)] * len(items)
    return [await postgres.run(_reserve_async, key, start, tokens) for key, tokens in items]


async def _release_async(conn, counter_id: int, tokens: int) -> None:
    RESERVE_STATEMENTS.inc()
    await conn.execute(_RELEASE_ASYNC, tokens, counter_id)


async def _release_orphan(counter: tuple[int, date], item: tuple[KeyInfo, int], result) -> None:
    """A combined reservation whose request was cancelled while it waited: give it back."""
    if isinstance(result, tuple):
        await async_postgres().run(_release_async, result[0], item[1])


# Reservations of members without a team cap, by (member id, period start).
_reservations = Combiner(_reserve_one, _reserve_many, _release_orphan)


def _full_counter(key: KeyInfo, start: date, verdict: str) -> QuotaCounter | TeamQuotaCounter:
    if verdict == "team":
        return TeamQuotaCounter.objects.get(team_id=key.team_id, period_start=start)
    return QuotaCounter.objects.get(member_id=key.member_id, period_start=start)


async def reserve(key: KeyInfo, tokens: int) -> Reservation:
    """Reserve one request and `tokens` tokens for key's member in the current period, or raise QuotaExceeded."""
    start = period_start_for(key.team_timezone)
    postgres = async_postgres()
    if postgres is not None:
        if key.team_token_cap is None:
            result = await _reservations.submit((key.member_id, start), (key, tokens))
        else:
            result = await postgres.run(_reserve_async, key, start, tokens)
        if isinstance(result, str):
            result = await run_db(_full_counter, key, start, result)
    else:
        result = await run_db(_reserve, key, start, tokens)
    if isinstance(result, tuple):
        return Reservation(counter_id=result[0], team_counter_id=result[1], period_start=start, tokens=tokens)
    counter, tz = result, key.team_timezone
    raise QuotaExceeded(quota.refusal_message(
        team_cap=isinstance(counter, TeamQuotaCounter), need=tokens,
        request_limit=getattr(counter, "request_limit", None), requests_used=getattr(counter, "requests_used", 0),
        requests_reserved=getattr(counter, "requests_reserved", 0), token_limit=counter.token_limit,
        tokens_used=counter.tokens_used, tokens_reserved=counter.tokens_reserved,
        reset=period_reset_at(tz, start).strftime("%Y-%m-%d %H:%M"), tz=tz))
