"""The ledger's PostgreSQL back-end: a member's concurrent reservations are combined, and the quota holds exactly."""
import asyncio
from unittest import mock

import pytest

from proxy.gateway import ledger
from proxy.gateway.keys import authenticate, forget_all
from proxy.gateway.ledger import QuotaExceeded, postgres
from tenants.models import QuotaCounter
from tenants.services import api_key_issue, member_add, team_create

pytestmark = pytest.mark.django_db(transaction=True)


def _reserve_concurrently(n: int, tokens: int, **quota) -> tuple[list, list[str]]:
    team = team_create(slug="lab", name="Lab")
    member = member_add(team=team, username="ada", **quota)
    _, raw = api_key_issue(member=member)
    forget_all()
    statements = []
    real_single, real_many = postgres._reserve, postgres._reserve_many

    async def single(conn, *args):
        statements.append("one")
        await asyncio.sleep(0.01)  # a slow commit: the others queue meanwhile
        return await real_single(conn, *args)

    async def many(conn, *args):
        statements.append("many")
        return await real_many(conn, *args)

    async def run():
        try:
            key = await authenticate(raw)
            with mock.patch.object(postgres, "_reserve", single), mock.patch.object(postgres, "_reserve_many", many):
                results = await asyncio.gather(*(ledger.reserve(key=key, tokens=tokens) for _ in range(n)),
                                               return_exceptions=True)
            assert not ledger.backend()._reservations.waiting
            return results
        finally:
            await ledger.close()

    return asyncio.run(run()), statements


def test_concurrent_reservations_of_a_member_are_combined():
    results, statements = _reserve_concurrently(20, 100, token_quota=1_000_000)
    assert all(r.counter_id == results[0].counter_id and r.tokens == 100 for r in results)
    assert statements[0] == "one" and "many" in statements and len(statements) < 10
    counter = QuotaCounter.objects.get()
    assert (counter.requests_reserved, counter.tokens_reserved) == (20, 2000)


def test_combined_reservations_that_do_not_all_fit_are_admitted_one_by_one_up_to_the_quota():
    results, statements = _reserve_concurrently(20, 100, token_quota=1000)
    admitted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, QuotaExceeded)]
    assert (len(admitted), len(refused)) == (10, 10)
    assert "many" in statements  # tried together first
    counter = QuotaCounter.objects.get()
    assert (counter.requests_reserved, counter.tokens_reserved, counter.tokens_used) == (10, 1000, 0)


def test_request_quota_holds_under_combined_reservations():
    results, _ = _reserve_concurrently(12, 10, request_quota=5)
    assert sum(not isinstance(r, BaseException) for r in results) == 5
    assert QuotaCounter.objects.get().requests_reserved == 5


def test_a_reservation_cancelled_while_it_waits_is_given_back():
    """A request cancelled (server shutting down) while queued behind its member's reservation holds nothing."""
    team = team_create(slug="lab", name="Lab")
    member = member_add(team=team, username="ada", token_quota=1_000_000)
    _, raw = api_key_issue(member=member)
    forget_all()
    real_single = postgres._reserve

    async def slow_single(conn, *args):
        await asyncio.sleep(0.05)
        return await real_single(conn, *args)

    async def run():
        try:
            key = await authenticate(raw)
            with mock.patch.object(postgres, "_reserve", slow_single):
                tasks = [asyncio.ensure_future(ledger.reserve(key=key, tokens=100)) for _ in range(5)]
                await asyncio.sleep(0.01)  # the first runs alone, the other four wait for it
                reservations = ledger.backend()._reservations
                assert [len(queue) for queue in reservations.waiting.values()] == [4]
                tasks[3].cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                while reservations.waiting:
                    await asyncio.sleep(0.01)
            return results
        finally:
            await ledger.close()

    results = asyncio.run(run())
    assert isinstance(results[3], asyncio.CancelledError)
    assert sum(not isinstance(r, BaseException) for r in results) == 4
    counter = QuotaCounter.objects.get()
    assert (counter.requests_reserved, counter.tokens_reserved) == (4, 400)


def test_a_month_opens_with_the_quota_of_that_instant_not_the_key_caches():
    """A quota lowered after the key was cached, before the month's first request, is the month's quota."""
    team = team_create(slug="lab", name="Lab")
    member = member_add(team=team, username="ada", token_quota=1_000_000)
    _, raw = api_key_issue(member=member)
    forget_all()

    async def run():
        try:
            key = await authenticate(raw)  # caches token_quota=1_000_000
            await asyncio.to_thread(lambda: type(member).objects.filter(pk=member.pk).update(token_quota=50))
            with pytest.raises(QuotaExceeded):
                await ledger.reserve(key=key, tokens=100)
        finally:
            await ledger.close()

    asyncio.run(run())
    assert QuotaCounter.objects.get(member=member).token_limit == 50
