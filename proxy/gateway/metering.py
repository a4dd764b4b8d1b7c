"""Settlement: one usage row per request and the quota counter moved, exactly once.

On PostgreSQL both happen in ONE statement: the INSERT of the usage row (unique
request_id, ON CONFLICT DO NOTHING) feeds the counter UPDATE, so a retried
settlement can neither double-charge nor leave a reservation behind. SQLite
(embedded mode) runs the same two steps in one transaction.

Settlements of one member's counter queue behind each other on its row lock
anyway, so on PostgreSQL they are combined: while one member's settlement runs,
the ones that arrive meanwhile wait and then go as ONE statement (all their usage
rows, the counter moved by their sums). A lone request still takes one statement
and waits for nobody; a burst of a member's requests takes a few.
"""
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import date, datetime

from django.db import connection, transaction

from billing.models import UsageRecord
from proxy.gateway.db import Combiner, DatabaseUnavailable, async_postgres, numbered, run_db
from proxy.gateway.observability import SETTLE_STATEMENTS
from tenants import quota

_USAGE = UsageRecord._meta.db_table
_COUNTER = quota.COUNTER
_COLUMNS = (
    "request_id", "team_id", "member_id", "api_key_id", "period_start", "endpoint", "model", "upstream",
    "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "status", "http_status", "stream",
    "started_at", "ttft_ms", "duration_ms",
)
_INSERT = (
    f"INSERT INTO {_USAGE} ({', '.join(_COLUMNS)}) VALUES ({', '.join(['%s'] * len(_COLUMNS))}) "
    "ON CONFLICT (request_id) DO NOTHING"
)
_SETTLE, _SETTLE_TEAM = quota.SETTLE_SQL, quota.TEAM_SETTLE_SQL
_SETTLE_PG = f"WITH ins AS ({_INSERT} RETURNING 1) {_SETTLE} AND EXISTS (SELECT 1 FROM ins)"
_SETTLE_PG_TEAM = (
    f"WITH ins AS ({_INSERT} RETURNING 1), team AS ({_SETTLE_TEAM} AND EXISTS (SELECT 1 FROM ins)) "
    f"{_SETTLE} AND EXISTS (SELECT 1 FROM ins)"
)

# Many requests of one counter: the usage rows come as arrays (one per column, then the
# reserved tokens and charged requests); only the rows actually inserted move the counters.
_TYPES = ("text", "bigint", "bigint", "bigint", "date", "text", "text", "text", "bigint", "bigint", "bigint", "bigint",
          "text", "integer", "boolean", "timestamptz", "double precision", "double precision", "bigint", "integer")
_ROWS = (
    "rows AS (SELECT * FROM unnest(" + ", ".join(f"%s::{t}[]" for t in _TYPES) + f") AS r({', '.join(_COLUMNS)}, "
    "reserved, charged)), "
    f"ins AS (INSERT INTO {_USAGE} ({', '.join(_COLUMNS)}) SELECT {', '.join(_COLUMNS)} FROM rows "
    "ON CONFLICT (request_id) DO NOTHING RETURNING request_id), "
    "d AS (SELECT count(*) AS n, sum(reserved)::bigint AS reserved, sum(charged)::bigint AS charged, "
    "sum(total_tokens)::bigint AS used FROM rows JOIN ins USING (request_id))"
)
_SETTLE_MANY = f"""
UPDATE {_COUNTER}
   SET requests_reserved = requests_reserved - d.n, tokens_reserved = tokens_reserved - d.reserved,
       requests_used = requests_used + d.charged, tokens_used = tokens_used + d.used
  FROM d WHERE id = %s AND d.n > 0"""
_SETTLE_MANY_PG = f"WITH {_ROWS} {_SETTLE_MANY}"
_SETTLE_MANY_PG_TEAM = (
    f"WITH {_ROWS}, team AS (UPDATE {quota.TEAM_COUNTER} "
    "SET tokens_reserved = tokens_reserved - d.reserved, tokens_used = tokens_used + d.used "
    f"FROM d WHERE id = %s AND d.n > 0) {_SETTLE_MANY}"
)


@dataclass(slots=True)
class Usage:
    """What one request used, as the upstream reported it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # Cumulative completion tokens per choice, from continuous usage stats in a stream.
    per_choice: dict[int, int] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def take(self, usage: dict) -> None:
        """Adopt a complete usage object (a non-streamed body or a stream's final usage chunk)."""
        self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        self.completion_tokens = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            self.cached_tokens = int(details.get("cached_tokens") or 0)

    def take_running(self, choice_index: int, usage: dict) -> None:
        """Adopt a chunk's cumulative usage for one choice (continuous_usage_stats)."""
        self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        self.per_choice[choice_index] = int(usage.get("completion_tokens") or 0)
        self.completion_tokens = sum(self.per_choice.values())


@dataclass(slots=True)
class UsageRow:
    request_id: str
    team_id: int
    member_id: int
    api_key_id: int
    period_start: date
    endpoint: str
    model: str
    started_at: datetime
    stream: bool = False
    upstream: str = ""
    status: str = UsageRecord.Status.OK
    http_status: int = 200
    ttft_ms: float | None = None
    duration_ms: float = 0.0

    def values(self, usage: Usage) -> list:
        return [
            self.request_id, self.team_id, self.member_id, self.api_key_id, self.period_start, self.endpoint,
            self.model, self.upstream, usage.prompt_tokens, usage.completion_tokens, usage.total_tokens,
            usage.cached_tokens, self.status, self.http_status, self.stream, self.started_at, self.ttft_ms,
            self.duration_ms,
        ]


def _charged_requests(row: UsageRow, usage: Usage) -> int:
    return quota.charged_requests(status=row.status, total_tokens=usage.total_tokens)


def _postgres_statement(row: UsageRow, usage: Usage, counter_id: int | None, reserved_tokens: int,
                        team_counter_id: int | None) -> tuple[str, list]:
    """The one statement that settles a request on PostgreSQL."""
    values = row.values(usage)
    if counter_id is None:
        return _INSERT, values
    member_args = [reserved_tokens, _charged_requests(row, usage), usage.total_tokens, counter_id]
    if team_counter_id is None:
        return _SETTLE_PG, [*values, *member_args]
    return _SETTLE_PG_TEAM, [*values, reserved_tokens, usage.total_tokens, team_counter_id, *member_args]


_ASYNC = {sql: numbered(sql) for sql in (_INSERT, _SETTLE_PG, _SETTLE_PG_TEAM, _SETTLE_MANY_PG, _SETTLE_MANY_PG_TEAM)}


def _settle(row: UsageRow, usage: Usage, counter_id: int | None, reserved_tokens: int,
            team_counter_id: int | None) -> None:
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql" or counter_id is None:
            SETTLE_STATEMENTS.inc()
            cursor.execute(*_postgres_statement(row, usage, counter_id, reserved_tokens, team_counter_id))
            return
        with transaction.atomic():  # SQLite: no data-modifying CTEs, so two steps in one transaction
            SETTLE_STATEMENTS.inc()
            cursor.execute(_INSERT, row.values(usage))
            if cursor.rowcount == 1:
                SETTLE_STATEMENTS.inc(1 if team_counter_id is None else 2)
                tokens = usage.total_tokens
                cursor.execute(_SETTLE, [reserved_tokens, _charged_requests(row, usage), tokens, counter_id])
                if team_counter_id is not None:
                    cursor.execute(_SETTLE_TEAM, [reserved_tokens, tokens, team_counter_id])


async def _execute(conn, sql: str, args: list) -> None:
    SETTLE_STATEMENTS.inc()
    await conn.execute(_ASYNC[sql], *args)


async def _run_settlement(postgres, sql: str, args: list) -> None:
    try:
        await postgres.run(_execute, sql, args)
    except DatabaseUnavailable:
        # A pooled connection may have died with a PostgreSQL restart. Settling is
        # idempotent (the usage row is unique by request id): once more, on a new one.
        await postgres.run(_execute, sql, args)


def _settle_one(key: tuple[int, int | None], statement: tuple[str, list]) -> Awaitable[None]:
    return _run_settlement(async_postgres(), *statement)


async def _settle_many(key: tuple[int, int | None], statements: list[tuple[str, list]]) -> list[None]:
    """Settle a counter's queued requests in one statement."""
    counter_id, team_counter_id = key
    # Each args list is one request's single statement: its row's values first, and last
    # the member counter's (reserved tokens, charged requests, total tokens, counter id).
    batch = [args for _, args in statements]
    arrays = [[args[i] for args in batch] for i in range(len(_COLUMNS))]
    arrays += [[args[-4] for args in batch], [args[-3] for args in batch]]
    if team_counter_id is None:
        sql, tail = _SETTLE_MANY_PG, [counter_id]
    else:
        sql, tail = _SETTLE_MANY_PG_TEAM, [team_counter_id, counter_id]
    await _run_settlement(async_postgres(), sql, [*arrays, *tail])
    return [None] * len(batch)


# Settlements by (counter id, team counter id).
_settlements = Combiner(_settle_one, _settle_many)


async def settle(row: UsageRow, usage: Usage, counter_id: int | None = None, reserved_tokens: int = 0,
                 team_counter_id: int | None = None) -> None:
    """Write the request's usage row and, if it holds a reservation, release it and charge the real usage."""
    postgres = async_postgres()
    if postgres is None:
        await run_db(_settle, row, usage, counter_id, reserved_tokens, team_counter_id)
        return
    statement = _postgres_statement(row, usage, counter_id, reserved_tokens, team_counter_id)
    if counter_id is None:
        await _run_settlement(postgres, *statement)
    else:
        await _settlements.submit((counter_id, team_counter_id), statement)
