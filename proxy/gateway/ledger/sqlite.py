"""The ledger on SQLite (embedded mode): the same statements, on Django's cursor in a worker thread.

Reservation is the same conditional UPDATE as on PostgreSQL (tenants.quota), one request at a
time; under a team cap the member's and the team's reservations go in one transaction.
SQLite has no data-modifying CTEs, so a settlement is two steps in one transaction: the
usage row's INSERT (ON CONFLICT DO NOTHING), and only if it inserted a row, the counter
UPDATEs. Statements are counted like PostgreSQL's (without BEGIN/COMMIT). A reservation's
row (tenants.quota) is one more INSERT in the reservation's transaction, and a settlement's
DELETE of it one more statement in the settlement's.

With `transaction_mode=IMMEDIATE` (qwenhub.settings) a transaction takes SQLite's write lock
when it begins, and the busy timeout makes concurrent writers wait for it.
"""
from datetime import date

from django.db import connections, transaction
from django.utils import timezone

from proxy.gateway.db import run_db
from proxy.gateway.keys import KeyInfo
from proxy.gateway.ledger.base import Ledger, NoRoom, full_counter, refusal
from proxy.gateway.ledger.records import INSERT_USAGE_SQL, USAGE_COLUMNS, Reservation, Settlement
from proxy.gateway.observability import RESERVE_STATEMENTS, SETTLE_STATEMENTS
from tenants import quota
from tenants.models import QuotaCounter, TeamQuotaCounter
from tenants.periods import period_start_for


_STARTED_AT = USAGE_COLUMNS.index("started_at")
# The settlement's UPDATEs (tenants.quota) in SQLite's spelling; args in the order of their %s.
_SETTLE = quota.settle_sql(released="%s", released_tokens="%s", charged="%s", used="%s", greatest="max",
                           least="min") + " WHERE id = %s"
_TEAM_SETTLE = quota.team_settle_sql(released_tokens="%s", used="%s", greatest="max") + " WHERE id = %s"


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


class SqliteLedger(Ledger):
    """The ledger on a Django SQLite database (`using`: its alias, the default one in embedded mode)."""

    def __init__(self, using: str = "default") -> None:
        self.using = using

    async def reserve(self, *, key: KeyInfo, tokens: int) -> Reservation:
        start = period_start_for(key.team_timezone)
        result = await run_db(self._reserve_or_read, key, start, tokens)
        if isinstance(result, Reservation):
            return result
        raise refusal(key, start, tokens, result)

    def _reserve_or_read(self, key: KeyInfo, start: date, tokens: int) -> Reservation | QuotaCounter | TeamQuotaCounter:
        """The reservation, or the counter that has no room left (in one trip to the worker thread)."""
        result = self._reserve(key, start, tokens)
        return result if isinstance(result, Reservation) else full_counter(key, start, result, self.using)

    def _reserve(self, key: KeyInfo, start: date, tokens: int) -> Reservation | NoRoom:
        member_args = [tokens, key.member_id, start, tokens]
        open_args = quota.open_args(member_id=key.member_id, start=start)
        connection = connections[self.using]
        with connection.cursor() as cursor, transaction.atomic(using=self.using):
            # The member's and the team's reservations and the reservation's row stand or fall together.
            counter_id = _take(cursor, quota.RESERVE_SQL, member_args, quota.OPEN_SQL, open_args)
            if counter_id is None:
                return "member"
            team_id = None
            if key.team_token_cap is not None:
                team_id = _take(cursor, quota.TEAM_RESERVE_SQL, [tokens, key.team_id, start, tokens],
                                quota.TEAM_OPEN_SQL, quota.team_open_args(team_id=key.team_id, start=start))
                if team_id is None:
                    transaction.set_rollback(True, using=self.using)  # the member's reservation goes too
                    return "team"
            RESERVE_STATEMENTS.inc()
            now = connection.ops.adapt_datetimefield_value(timezone.now())
            cursor.execute(quota.RECORD_RESERVATION_SQL, [counter_id, team_id, tokens, now])
            return Reservation(counter_id=counter_id, period_start=start, tokens=tokens, team_counter_id=team_id,
                               reservation_id=cursor.lastrowid)

    async def record(self, settlement: Settlement) -> None:
        await run_db(self._record, settlement)

    def _record(self, s: Settlement) -> None:
        connection = connections[self.using]
        # Stored as the ORM stores it (naive UTC text), so date filters on usage rows compare alike.
        values = list(s.values)
        values[_STARTED_AT] = connection.ops.adapt_datetimefield_value(values[_STARTED_AT])
        with connection.cursor() as cursor:
            if s.counter_id is None:
                SETTLE_STATEMENTS.inc()
                cursor.execute(INSERT_USAGE_SQL, values)
                return
            with transaction.atomic(using=self.using):
                SETTLE_STATEMENTS.inc(2)
                cursor.execute(INSERT_USAGE_SQL, values)
                inserted = cursor.rowcount == 1  # not settled before
                cursor.execute(quota.DELETE_RESERVATION_SQL, [s.reservation_id])
                row = cursor.fetchone()  # None: released already (the sweep), or settled before
                released, released_tokens = (1, row[0]) if row else (0, 0)
                charged, used = (s.charged_requests, s.total_tokens) if inserted else (0, 0)
                if not (inserted or released):
                    return
                SETTLE_STATEMENTS.inc(1 if s.team_counter_id is None else 2)
                cursor.execute(_SETTLE, [released, released_tokens, charged, charged, used, s.counter_id])
                if s.team_counter_id is not None:
                    cursor.execute(_TEAM_SETTLE, [released_tokens, used, s.team_counter_id])

    async def swept(self) -> tuple[int, int]:
        return await run_db(self._swept)

    def _swept(self) -> tuple[int, int]:
        with connections[self.using].cursor() as cursor:
            cursor.execute(quota.SWEPT_SQL)
            requests, tokens = cursor.fetchone()
        return int(requests), int(tokens)

    async def close(self) -> None:
        """Nothing to close: the connections are Django's, one per worker thread."""
