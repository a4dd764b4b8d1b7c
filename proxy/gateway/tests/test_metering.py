"""The ledger's PostgreSQL back-end: a member's concurrent settlements are combined, still exact and idempotent."""
import asyncio
from unittest import mock

import pytest
from django.utils import timezone

from billing.models import UsageRecord
from proxy.gateway import ledger
from proxy.gateway.db import DatabaseUnavailable
from proxy.gateway.keys import authenticate, forget_all
from proxy.gateway.ledger import Usage, UsageRow, postgres
from tenants.models import QuotaCounter, TeamQuotaCounter
from tenants.services import api_key_issue, member_add, team_create

pytestmark = pytest.mark.django_db(transaction=True)


def _member(token_cap=None):
    team = team_create(slug="lab", name="Lab")
    if token_cap is not None:
        team.token_cap = token_cap
        team.save(update_fields=["token_cap"])
    member = member_add(team=team, username="ada", token_quota=1_000_000)
    _, raw = api_key_issue(member=member)
    forget_all()
    return member, raw


def _row(key, reservation, i: int, status=UsageRecord.Status.OK) -> UsageRow:
    return UsageRow(request_id=f"req-{i}", team_id=key.team_id, member_id=key.member_id, api_key_id=key.key_id,
                    period_start=reservation.period_start, endpoint="chat", model="m",
                    started_at=timezone.now(), status=status)


class StatementLog:
    """Counts the settlement statements that reach PostgreSQL, by kind."""

    def __init__(self):
        self.sql: list[str] = []
        self.real = postgres._execute

    async def __call__(self, conn, sql, args):
        self.sql.append("many" if sql in (postgres._SETTLE_MANY_PG, postgres._SETTLE_MANY_PG_TEAM) else "one")
        await asyncio.sleep(0.01)  # a slow commit: the others queue meanwhile
        await self.real(conn, sql, args)


def _settle_all(raw: str, n: int, twice: bool = False, statuses=None) -> StatementLog:
    log = StatementLog()

    async def run():
        try:
            key = await authenticate(raw)
            reservations = [await ledger.reserve(key=key, tokens=100) for _ in range(n)]
            jobs = []
            for i, reservation in enumerate(reservations):
                status = statuses[i] if statuses else UsageRecord.Status.OK
                usage = Usage(prompt_tokens=i, completion_tokens=2) if status == "ok" else Usage()
                jobs.append((_row(key, reservation, i, status), usage, reservation))
            with mock.patch.object(postgres, "_execute", log):
                for _ in range(2 if twice else 1):
                    await asyncio.gather(*(
                        ledger.settle(row=row, usage=usage, reservation=r) for row, usage, r in jobs))
            assert not ledger.backend()._settlements.waiting
        finally:
            await ledger.close()

    asyncio.run(run())
    return log


def test_concurrent_settlements_of_a_member_are_combined_and_exact():
    member, raw = _member()
    log = _settle_all(raw, 20)
    assert log.sql[0] == "one" and "many" in log.sql
    assert len(log.sql) < 10  # 20 settlements, a handful of statements
    counter = QuotaCounter.objects.get(member=member)
    assert (counter.requests_used, counter.requests_reserved, counter.tokens_reserved) == (20, 0, 0)
    assert counter.tokens_used == sum(i + 2 for i in range(20))
    rows = UsageRecord.objects.filter(member=member)
    assert sorted(rows.values_list("request_id", flat=True)) == sorted(f"req-{i}" for i in range(20))
    assert all(r.total_tokens == r.prompt_tokens + 2 for r in rows)


def test_combined_settlements_are_idempotent_and_charge_only_answered_requests():
    member, raw = _member()
    statuses = ["ok", "upstream_error"] * 6
    _settle_all(raw, 12, twice=True, statuses=statuses)
    counter = QuotaCounter.objects.get(member=member)
    assert (counter.requests_used, counter.requests_reserved, counter.tokens_reserved) == (6, 0, 0)
    assert counter.tokens_used == sum(i + 2 for i in range(0, 12, 2))
    assert UsageRecord.objects.filter(member=member).count() == 12


def test_combined_settlements_move_the_team_counter_too():
    member, raw = _member(token_cap=10_000_000)
    _settle_all(raw, 16)
    team = TeamQuotaCounter.objects.get(team=member.team)
    counter = QuotaCounter.objects.get(member=member)
    assert team.tokens_reserved == 0 and counter.tokens_reserved == 0
    assert team.tokens_used == counter.tokens_used == sum(i + 2 for i in range(16))


def test_a_failed_combined_statement_fails_every_settlement_in_it_and_each_is_kept_until_it_lands():
    member, raw = _member()
    calls = []

    async def flaky(conn, sql, args):
        calls.append(sql)
        await asyncio.sleep(0.01)
        if sql == postgres._SETTLE_MANY_PG:
            raise DatabaseUnavailable()
        await real(conn, sql, args)

    real = postgres._execute

    async def run():
        try:
            key = await authenticate(raw)
            reservations = [await ledger.reserve(key=key, tokens=100) for _ in range(5)]
            with mock.patch.object(postgres, "_execute", flaky):
                results = await asyncio.gather(*(
                    ledger.settle(row=_row(key, r, i), usage=Usage(prompt_tokens=1, completion_tokens=1), reservation=r)
                    for i, r in enumerate(reservations)), return_exceptions=True)
                assert not ledger.backend()._settlements.waiting
                kept = len(ledger.backend().spool)
            for _ in range(100):  # the database takes them again: the kept ones are written
                if not ledger.backend().spool:
                    break
                await asyncio.sleep(0.05)
            return results, kept
        finally:
            await ledger.close()

    results, kept = asyncio.run(run())
    assert results == [None] * 5 and kept == 4  # the first went alone and landed; the combined four were kept
    assert postgres._SETTLE_MANY_PG in calls
    assert UsageRecord.objects.filter(member=member).count() == 5
    counter = QuotaCounter.objects.get(member=member)
    assert (counter.requests_used, counter.requests_reserved, counter.tokens_reserved) == (5, 0, 0)
