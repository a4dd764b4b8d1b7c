"""The ledger on PostgreSQL: asyncpg on the event loop, a member's bursts combined into few statements.

Reservation: one conditional UPDATE reserves 1 request and the request's worst case in
tokens; no row returned means "over quota" (or no row yet: the month's row is opened and
the UPDATE tried again), so concurrent requests can never push a member past a limit,
across any number of gateway processes. Under a team cap the member's and the team's
reservations go in one transaction. A member's requests that arrive while one of theirs
is being reserved are reserved together in the next UPDATE if all of them fit (one by one
in arrival order if not).

Each reservation is also a row (tenants.quota's reservation rows), written in the
reservation's statement (a data-modifying CTE), so reserving is still one statement.

Settlement: ONE statement — the INSERT of the usage row (unique request_id, ON CONFLICT
DO NOTHING) and the DELETE of the reservation's row feed the counter UPDATEs in a CTE — so
a retried settlement can neither double-charge nor leave a reservation behind, and one
whose reservation the sweep already gave back releases nothing (and charges its usage).
Settlements of one counter that arrive while one runs go together in the next statement
(all their rows; the counters charged for the rows actually inserted and released by the
reservation rows actually deleted).

Every statement sent is counted in RESERVE_STATEMENTS / SETTLE_STATEMENTS (a transaction's
BEGIN and COMMIT too; one combined statement counts once).

A settlement PostgreSQL cannot take (it went away while the request ran: the answer is already
the client's) is kept in this process and written once the database is back (SPOOL_MAX at most,
oldest first, retried with backoff): settling is idempotent, and one written after the sweep
gave its reservation back charges its usage and releases nothing. Only a process that dies
with settlements still spooled loses them (it logs how many at shutdown).
"""
import asyncio
import collections
import logging
from datetime import date

log = logging.getLogger("qwenhub.gateway")
SPOOL_MAX = 10_000
SPOOL_RETRY_S = (0.25, 5.0)  # the first wait, the longest

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
# A reservation's row (tenants.quota's reservation rows) is written by the reservation's own
# statement, a data-modifying CTE: still one statement per reservation.

_RESERVE, _OPEN = numbered(quota.RESERVE_RECORDED_SQL), numbered(quota.OPEN_SQL)
_RESERVE_MEMBER = numbered(quota.RESERVE_SQL)  # under a team cap: the team's statement writes the row
_RESERVE_MANY, _RELEASE = numbered(quota.RESERVE_MANY_RECORDED_SQL), numbered(quota.RELEASE_SQL)
_TEAM_RESERVE, _TEAM_OPEN = numbered(quota.TEAM_RESERVE_RECORDED_SQL), numbered(quota.TEAM_OPEN_SQL)


class _NoRoom(Exception):
    """Rolls back a member's reservation when the team has no room."""


async def _take(conn, reserve_sql: str, reserve_args: list, open_sql: str, open_args: list):
    """Run a conditional reservation statement, opening the period's row first if it is missing: its row, or None."""
    RESERVE_STATEMENTS.inc()
    row = await conn.fetchrow(reserve_sql, *reserve_args)
    if row is not None:
        return row
    # No row: either the first request of the period, or no room left.
    # (A concurrent first request may have opened it already: retry either way.)
    RESERVE_STATEMENTS.inc(2)
    await conn.execute(open_sql, *open_args)
    return await conn.fetchrow(reserve_sql, *reserve_args)


async def _reserve(conn, key: KeyInfo, start: date, tokens: int) -> Reservation | NoRoom:
    """Reserve one request of key's member: the reservation, or whose counter has no room."""
    member_args = [tokens, key.member_id, start, tokens]
    open_args = quota.open_args(member_id=key.member_id, start=start)
    if key.team_token_cap is None:
        row = await _take(conn, _RESERVE, [*member_args, tokens], _OPEN, open_args)
        if row is None:
            return "member"
        counter_id, reservation_id = row
        return Reservation(counter_id=counter_id, period_start=start, tokens=tokens, reservation_id=reservation_id)
    RESERVE_STATEMENTS.inc(2)  # BEGIN, COMMIT/ROLLBACK
    try:
        async with conn.transaction():
            row = await _take(conn, _RESERVE_MEMBER, member_args, _OPEN, open_args)
            if row is None:
                return "member"
            counter_id = row[0]
            team = await _take(conn, _TEAM_RESERVE, [tokens, key.team_id, start, tokens, counter_id, tokens],
                               _TEAM_OPEN, quota.team_open_args(team_id=key.team_id, start=start))
            if team is None:
                raise _NoRoom  # the member's reservation goes too
            team_id, reservation_id = team
            return Reservation(counter_id=counter_id, period_start=start, tokens=tokens, team_counter_id=team_id,
                               reservation_id=reservation_id)
    except _NoRoom:
        return "team"


async def _reserve_many(conn, member_id: int, start: date, tokens: list[int]) -> list:
    """Reserve len(tokens) requests of one member at once: (counter id, reservation id, tokens) each, or []."""
    RESERVE_STATEMENTS.inc()
    count, total = len(tokens), sum(tokens)
    return await conn.fetch(_RESERVE_MANY, count, total, member_id, start, count, total, tokens)


async def _release(conn, reservation_id: int | None, counter_id: int) -> None:
    RESERVE_STATEMENTS.inc()
    await conn.execute(_RELEASE, reservation_id, counter_id)


# --- settlement statements -------------------------------------------------------------------
# The usage row's INSERT, the reservation row's DELETE and the counters' UPDATEs in one
# statement: the counters release what the deleted rows held (nothing if the sweep released
# it first) and are charged only for usage rows actually inserted (a retry charges nothing).

_FREED = "freed AS (SELECT count(*) AS n, COALESCE(sum(tokens), 0)::bigint AS tokens FROM rel)"
_MOVED = "(freed.n > 0 OR d.n > 0)"
_MEMBER_UPDATE = (quota.settle_sql(released="freed.n", released_tokens="freed.tokens", charged="d.charged",
                                   used="d.used") + f" FROM freed, d WHERE {quota.COUNTER}.id = %s AND {_MOVED}")
_TEAM_UPDATE = (quota.team_settle_sql(released_tokens="freed.tokens", used="d.used")
                + f" FROM freed, d WHERE {quota.TEAM_COUNTER}.id = %s AND {_MOVED}")

_ONE = (
    f"WITH ins AS ({INSERT_USAGE_SQL} RETURNING 1), "
    f"rel AS (DELETE FROM {quota.RESERVATION} WHERE id = %s RETURNING tokens), {_FREED}, "
    "d AS (SELECT count(*) AS n, (count(*) * %s)::bigint AS charged, (count(*) * %s)::bigint AS used FROM ins)"
)
_SETTLE_PG = f"{_ONE} {_MEMBER_UPDATE}"
_SETTLE_PG_TEAM = f"{_ONE}, team AS ({_TEAM_UPDATE}) {_MEMBER_UPDATE}"

# Many requests of one counter: the usage rows come as arrays (one per column, then the
# reservation ids and charged requests); only the rows actually inserted are charged.
_TYPES = ("text", "bigint", "bigint", "bigint", "date", "text", "text", "text", "bigint", "bigint", "bigint", "bigint",
          "text", "integer", "boolean", "timestamptz", "double precision", "double precision", "bigint", "integer")
_ROWS = (
    "rows AS (SELECT * FROM unnest(" + ", ".join(f"%s::{t}[]" for t in _TYPES) + f") AS r({', '.join(USAGE_COLUMNS)}, "
    "reservation_id, charged)), "
    f"ins AS (INSERT INTO {USAGE_TABLE} ({', '.join(USAGE_COLUMNS)}) SELECT {', '.join(USAGE_COLUMNS)} FROM rows "
    "ON CONFLICT (request_id) DO NOTHING RETURNING request_id), "
    f"rel AS (DELETE FROM {quota.RESERVATION} WHERE id IN (SELECT reservation_id FROM rows) RETURNING tokens), "
    f"{_FREED}, "
    "d AS (SELECT count(*) AS n, COALESCE(sum(charged), 0)::bigint AS charged, "
    "COALESCE(sum(total_tokens), 0)::bigint AS used "
    # (one row per request id: a settlement submitted twice in one batch is charged once)
    "FROM (SELECT DISTINCT ON (request_id) * FROM rows) AS once JOIN ins USING (request_id))"
)
_SETTLE_MANY_PG = f"WITH {_ROWS} {_MEMBER_UPDATE}"
_SETTLE_MANY_PG_TEAM = f"WITH {_ROWS}, team AS ({_TEAM_UPDATE}) {_MEMBER_UPDATE}"

_ASYNC = {sql: numbered(sql) for sql in (INSERT_USAGE_SQL, _SETTLE_PG, _SETTLE_PG_TEAM, _SETTLE_MANY_PG,
                                         _SETTLE_MANY_PG_TEAM)}


def _statement(s: Settlement) -> tuple[str, list]:
    """The one statement that settles one request."""
    if s.counter_id is None:
        return INSERT_USAGE_SQL, [*s.values]
    released_charged_used = [s.reservation_id, s.charged_requests, s.total_tokens]
    if s.team_counter_id is None:
        return _SETTLE_PG, [*s.values, *released_charged_used, s.counter_id]
    return _SETTLE_PG_TEAM, [*s.values, *released_charged_used, s.team_counter_id, s.counter_id]


def _combined_statement(counter_id: int, team_counter_id: int | None, batch: list[Settlement]) -> tuple[str, list]:
    """The one statement that settles many requests of one counter (and team counter)."""
    arrays = [list(column) for column in zip(*(s.values for s in batch), strict=True)]
    arrays += [[s.reservation_id for s in batch], [s.charged_requests for s in batch]]
    if team_counter_id is None:
        return _SETTLE_MANY_PG, [*arrays, counter_id]
    return _SETTLE_MANY_PG_TEAM, [*arrays, team_counter_id, counter_id]


async def _fetch_swept(conn):
    return await conn.fetchrow(_SWEPT)


_SWEPT = quota.SWEPT_SQL


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
        # Settlements the database could not take, written once it is back (see the module's docstring).
        self.spool: collections.deque[Settlement] = collections.deque()
        self._drainer: asyncio.Task | None = None

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
        rows = await self.pool.run(_reserve_many, member_id, start, [tokens for _, tokens in items])
        if rows:
            # The rows come back in no promised order: any row of the same size is the request's.
            by_size: dict[int, list] = {}
            for counter_id, reservation_id, tokens in rows:
                by_size.setdefault(tokens, []).append((counter_id, reservation_id))
            reservations = []
            for _, tokens in items:
                counter_id, reservation_id = by_size[tokens].pop()
                reservations.append(Reservation(counter_id=counter_id, period_start=start, tokens=tokens,
                                                reservation_id=reservation_id))
            return reservations
        return [await self.pool.run(_reserve, key, start, tokens) for key, tokens in items]

    async def _give_back(self, counter: tuple[int, date], item: tuple[KeyInfo, int], result) -> None:
        """A combined reservation whose request was cancelled while it waited: release it."""
        if isinstance(result, Reservation):
            await self.pool.run(_release, result.reservation_id, result.counter_id)

    async def record(self, settlement: Settlement) -> None:
        try:
            if settlement.counter_id is None:
                await self._run_settlement(*_statement(settlement))
            else:
                await self._settlements.submit((settlement.counter_id, settlement.team_counter_id), settlement)
        except DatabaseUnavailable:
            self._spool(settlement)

    def _spool(self, settlement: Settlement) -> None:
        if len(self.spool) >= SPOOL_MAX:
            lost = self.spool.popleft()
            log.error("usage not recorded (database unavailable, %d settlements waiting) request_id=%s",
                      SPOOL_MAX, lost.values[0])
        self.spool.append(settlement)
        log.warning("usage kept until the database is back (%d waiting) request_id=%s", len(self.spool),
                    settlement.values[0])
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        """Write the spooled settlements, oldest first, waiting longer after each failure."""
        wait = SPOOL_RETRY_S[0]
        while self.spool:
            await asyncio.sleep(wait)
            try:
                while self.spool:
                    await self.pool.run(_execute, *_statement(self.spool[0]))
                    self.spool.popleft()
            except DatabaseUnavailable:
                wait = min(wait * 2, SPOOL_RETRY_S[1])
            else:
                log.warning("the database is back: the usage kept meanwhile is recorded")

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

    async def swept(self) -> tuple[int, int]:
        row = await self.pool.run(_fetch_swept)
        return int(row[0]), int(row[1])

    async def close(self) -> None:
        if self.spool:
            log.error("usage not recorded for %d requests: the database was still unavailable at shutdown "
                      "(their reservations are given back by the sweep)", len(self.spool))
        if self._drainer is not None:
            self._drainer.cancel()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
