"""The ledger on PostgreSQL: asyncpg on the event loop, a member's bursts combined into few statements.

Reservation: one conditional UPDATE reserves 1 request and the request's worst case in
tokens; no row returned means "over quota" (or no row yet: the month's row is opened and
the UPDATE tried again), so concurrent requests can never push a member past a limit,
across any number of gateway processes. Under a team cap the member's and the team's
reservations go in one transaction. A member's requests that arrive while one of theirs
is being reserved are reserved together in the next UPDATE if all of them fit (one by one
in arrival order if not).

Settlement: ONE statement — the INSERT of the usage row (unique request_id, ON CONFLICT
DO NOTHING) feeds the counter UPDATEs in a CTE — so a retried settlement can neither
double-charge nor leave a reservation behind. Settlements of one counter that arrive while
one runs go together in the next statement (all their rows, the counters moved by the sums
of the rows actually inserted).

Every statement sent is counted in RESERVE_STATEMENTS / SETTLE_STATEMENTS (a transaction's
BEGIN and COMMIT too; one combined statement counts once).
"""
from datetime import date

from proxy.gateway.db import DatabaseUnavailable, run_db
from proxy.gateway.keys import KeyInfo
from proxy.gateway.ledger.base import Ledger, NoRoom, full_counter, refusal
from proxy.gateway.ledger.combiner import Combiner
from proxy.gateway.ledger.pool import AsyncPostgres, numbered
from proxy.gateway.ledger.records import INSERT_USAGE_SQL, USAGE_COLUMNS, USAGE_TABLE, Reservation, Settlement
from proxy.gateway.observability import RESERVE_STATEMENTS, SETTLE_STATEMENTS
from tenants import quota
from tenants.periods import period_start_for

# --- reservation statements ------------------------------------------------------------------

_RESERVE, _OPEN = numbered(quota.RESERVE_SQL), numbered(quota.OPEN_SQL)
_RESERVE_MANY, _RELEASE = numbered(quota.RESERVE_MANY_SQL), numbered(quota.RELEASE_SQL)
_TEAM_RESERVE, _TEAM_OPEN = numbered(quota.TEAM_RESERVE_SQL), numbered(quota.TEAM_OPEN_SQL)


class _NoRoom(Exception):
    """Rolls back a member's reservation when the team has no room."""


async def _take(conn, reserve_sql: str, reserve_args: list, open_sql: str, open_args: list) -> int | None:
    """Run a conditional reservation UPDATE, opening the period's row first if it is missing."""
    RESERVE_STATEMENTS.inc()
    counter_id = await conn.fetchval(reserve_sql, *reserve_args)
    if counter_id is not None:
        return counter_id
    # No row: either the first request of the period, or no room left.
    # (A concurrent first request may have opened it already: retry either way.)
    RESERVE_STATEMENTS.inc(2)
    await conn.execute(open_sql, *open_args)
    return await conn.fetchval(reserve_sql, *reserve_args)


async def _reserve(conn, key: KeyInfo, start: date, tokens: int) -> Reservation | NoRoom:
    """Reserve one request of key's member: the reservation, or whose counter has no room."""
    member_args = [tokens, key.member_id, start, tokens]
    open_args = quota.open_args(member_id=key.member_id, start=start)
    if key.team_token_cap is None:
        counter_id = await _take(conn, _RESERVE, member_args, _OPEN, open_args)
        if counter_id is None:
            return "member"
        return Reservation(counter_id=counter_id, period_start=start, tokens=tokens)
    RESERVE_STATEMENTS.inc(2)  # BEGIN, COMMIT/ROLLBACK
    try:
        async with conn.transaction():
            counter_id = await _take(conn, _RESERVE, member_args, _OPEN, open_args)
            if counter_id is None:
                return "member"
            team_id = await _take(conn, _TEAM_RESERVE, [tokens, key.team_id, start, tokens],
                                  _TEAM_OPEN, quota.team_open_args(team_id=key.team_id, start=start))
            if team_id is None:
                raise _NoRoom  # the member's reservation goes too
            return Reservation(counter_id=counter_id, period_start=start, tokens=tokens, team_counter_id=team_id)
    except _NoRoom:
        return "team"


async def _reserve_many(conn, member_id: int, start: date, count: int, tokens: int) -> int | None:
    """Reserve `count` requests and `tokens` tokens of one member at once: the counter's id, or None."""
    RESERVE_STATEMENTS.inc()
    return await conn.fetchval(_RESERVE_MANY, count, tokens, member_id, start, count, tokens)


async def _release(conn, counter_id: int, tokens: int) -> None:
    RESERVE_STATEMENTS.inc()
    await conn.execute(_RELEASE, tokens, counter_id)


# --- settlement statements -------------------------------------------------------------------

_SETTLE_PG = f"WITH ins AS ({INSERT_USAGE_SQL} RETURNING 1) {quota.SETTLE_SQL} AND EXISTS (SELECT 1 FROM ins)"
_SETTLE_PG_TEAM = (
    f"WITH ins AS ({INSERT_USAGE_SQL} RETURNING 1), team AS ({quota.TEAM_SETTLE_SQL} AND EXISTS (SELECT 1 FROM ins)) "
    f"{quota.SETTLE_SQL} AND EXISTS (SELECT 1 FROM ins)"
)

# Many requests of one counter: the usage rows come as arrays (one per column, then the
# reserved tokens and charged requests); only the rows actually inserted move the counters.
_TYPES = ("text", "bigint", "bigint", "bigint", "date", "text", "text", "text", "bigint", "bigint", "bigint", "bigint",
          "text", "integer", "boolean", "timestamptz", "double precision", "double precision", "bigint", "integer")
_ROWS = (
    "rows AS (SELECT * FROM unnest(" + ", ".join(f"%s::{t}[]" for t in _TYPES) + f") AS r({', '.join(USAGE_COLUMNS)}, "
    "reserved, charged)), "
    f"ins AS (INSERT INTO {USAGE_TABLE} ({', '.join(USAGE_COLUMNS)}) SELECT {', '.join(USAGE_COLUMNS)} FROM rows "
    "ON CONFLICT (request_id) DO NOTHING RETURNING request_id), "
    "d AS (SELECT count(*) AS n, sum(reserved)::bigint AS reserved, sum(charged)::bigint AS charged, "
    "sum(total_tokens)::bigint AS used FROM rows JOIN ins USING (request_id))"
)
_SETTLE_MANY = f"""
UPDATE {quota.COUNTER}
   SET requests_reserved = requests_reserved - d.n, tokens_reserved = tokens_reserved - d.reserved,
       requests_used = requests_used + d.charged, tokens_used = tokens_used + d.used
  FROM d WHERE id = %s AND d.n > 0"""
_SETTLE_MANY_PG = f"WITH {_ROWS} {_SETTLE_MANY}"
_SETTLE_MANY_PG_TEAM = (
    f"WITH {_ROWS}, team AS (UPDATE {quota.TEAM_COUNTER} "
    "SET tokens_reserved = tokens_reserved - d.reserved, tokens_used = tokens_used + d.used "
    f"FROM d WHERE id = %s AND d.n > 0) {_SETTLE_MANY}"
)

_ASYNC = {sql: numbered(sql) for sql in (INSERT_USAGE_SQL, _SETTLE_PG, _SETTLE_PG_TEAM, _SETTLE_MANY_PG,
                                         _SETTLE_MANY_PG_TEAM)}


def _statement(s: Settlement) -> tuple[str, list]:
    """The one statement that settles one request."""
    if s.counter_id is None:
        return INSERT_USAGE_SQL, [*s.values]
    member_args = [s.reserved_tokens, s.charged_requests, s.total_tokens, s.counter_id]  # quota.SETTLE_SQL's
    if s.team_counter_id is None:
        return _SETTLE_PG, [*s.values, *member_args]
    team_args = [s.reserved_tokens, s.total_tokens, s.team_counter_id]  # quota.TEAM_SETTLE_SQL's
    return _SETTLE_PG_TEAM, [*s.values, *team_args, *member_args]


def _combined_statement(counter_id: int, team_counter_id: int | None, batch: list[Settlement]) -> tuple[str, list]:
    """The one statement that settles many requests of one counter (and team counter)."""
    arrays = [list(column) for column in zip(*(s.values for s in batch), strict=True)]
    arrays += [[s.reserved_tokens for s in batch], [s.charged_requests for s in batch]]
    if team_counter_id is None:
        return _SETTLE_MANY_PG, [*arrays, counter_id]
    return _SETTLE_MANY_PG_TEAM, [*arrays, team_counter_id, counter_id]


async def _execute(conn, sql: str, args: list) -> None:
    SETTLE_STATEMENTS.inc()
    await conn.execute(_ASYNC[sql], *args)


# --- the back-end ----------------------------------------------------------------------------

class PostgresLedger(Ledger):
    """The ledger on Django's default database when it is PostgreSQL."""

    def __init__(self) -> None:
        self._pool: AsyncPostgres | None = None
        # Reservations of members without a team cap, by (member id, period start).
        self._reservations = Combiner(self._reserve_one, self._reserve_batch, self._give_back)
        # Settlements by (counter id, team counter id).
        self._settlements = Combiner(self._settle_one, self._settle_batch)

    @property
    def pool(self) -> AsyncPostgres:
        if self._pool is None:
            self._pool = AsyncPostgres()
        return self._pool

    async def reserve(self, *, key: KeyInfo, tokens: int) -> Reservation:
        start = period_start_for(key.team_timezone)
        if key.team_token_cap is None:
            result = await self._reservations.submit((key.member_id, start), (key, tokens))
        else:
            result = await self.pool.run(_reserve, key, start, tokens)
        if isinstance(result, Reservation):
            return result
        counter = await run_db(full_counter, key, start, result, "default")
        raise refusal(key, start, tokens, counter)

    def _reserve_one(self, counter: tuple[int, date], item: tuple[KeyInfo, int]):
        key, tokens = item
        return self.pool.run(_reserve, key, counter[1], tokens)

    async def _reserve_batch(self, counter: tuple[int, date], items: list[tuple[KeyInfo, int]]) -> list:
        """Reserve a member's queued requests together if they all fit, else one by one in arrival order."""
        member_id, start = counter
        counter_id = await self.pool.run(_reserve_many, member_id, start, len(items),
                                         sum(tokens for _, tokens in items))
        if counter_id is not None:
            return [Reservation(counter_id=counter_id, period_start=start, tokens=tokens) for _, tokens in items]
        return [await self.pool.run(_reserve, key, start, tokens) for key, tokens in items]

    async def _give_back(self, counter: tuple[int, date], item: tuple[KeyInfo, int], result) -> None:
        """A combined reservation whose request was cancelled while it waited: release it."""
        if isinstance(result, Reservation):
            await self.pool.run(_release, result.counter_id, result.tokens)

    async def record(self, settlement: Settlement) -> None:
        if settlement.counter_id is None:
            await self._run_settlement(*_statement(settlement))
        else:
            await self._settlements.submit((settlement.counter_id, settlement.team_counter_id), settlement)

    async def _run_settlement(self, sql: str, args: list) -> None:
        try:
            await self.pool.run(_execute, sql, args)
        except DatabaseUnavailable:
            # A pooled connection may have died with a PostgreSQL restart. Settling is
            # idempotent (the usage row is unique by request id): once more, on a new one.
            await self.pool.run(_execute, sql, args)

    def _settle_one(self, counters: tuple[int, int | None], settlement: Settlement):
        return self._run_settlement(*_statement(settlement))

    async def _settle_batch(self, counters: tuple[int, int | None], batch: list[Settlement]) -> list[None]:
        """Settle a counter's queued requests in one statement."""
        await self._run_settlement(*_combined_statement(*counters, batch))
        return [None] * len(batch)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
