"""One contract for both back-ends of the ledger: every test runs on PostgreSQL and on SQLite.

The SQLite back-end needs a migrated SQLite database, while the session's Django database is
PostgreSQL (the root conftest insists). So a second database alias, ``embedded``, exists only
while this module runs: a module fixture adds it to Django's connections, pointing at a
temporary SQLite file configured as qwenhub.settings configures the embedded default (WAL,
IMMEDIATE transactions, 20 s busy timeout), and migrates it. The tests declare both aliases
(``databases=[...]``), so pytest-django lets them use both and flushes both after each test.
Settings, the root conftest and the PostgreSQL test database stay as they are.

A test builds its members with the ORM on the back-end's own database (``world.member``)
and calls the back-end through the ``Ledger`` interface: ``PostgresLedger`` on the test
database (asyncpg, so data is committed: ``transaction=True``) and ``SqliteLedger`` on
``embedded``. Both must pass the same assertions.
"""
import asyncio
import itertools
from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace
from unittest import mock

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connections
from django.utils import timezone

from billing.models import UsageRecord
from proxy.gateway import ledger
from proxy.gateway.keys import KeyInfo
from proxy.gateway.ledger import Ledger, QuotaExceeded, Reservation, Usage, UsageRow
from proxy.gateway.ledger.postgres import PostgresLedger
from proxy.gateway.ledger.sqlite import SqliteLedger
from proxy.gateway.observability import RESERVE_STATEMENTS, SETTLE_STATEMENTS
from tenants.models import ApiKey, AuditEvent, Member, QuotaCounter, QuotaReservation, Team, TeamQuotaCounter
from tenants.services.reservations import reservations_sweep

EMBEDDED = "embedded"
pytestmark = pytest.mark.django_db(transaction=True, databases=["default", EMBEDDED])
_names = itertools.count(1)


@pytest.fixture(scope="module", autouse=True)
def embedded_database(django_db_setup, django_db_blocker, tmp_path_factory):
    """A migrated SQLite file under the alias EMBEDDED, for this module only."""
    database = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(tmp_path_factory.mktemp("ledger") / "embedded.sqlite3"),
        "OPTIONS": {"init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                    "transaction_mode": "IMMEDIATE", "timeout": 20},
    }
    configured = connections.configure_settings({**connections.settings, EMBEDDED: database})
    connections.settings[EMBEDDED] = configured[EMBEDDED]
    try:
        with django_db_blocker.unblock():
            call_command("migrate", database=EMBEDDED, verbosity=0, interactive=False)
        yield
    finally:
        connections[EMBEDDED].close()
        del connections.settings[EMBEDDED]


@dataclass
class World:
    """A back-end and its database alias; members are created there."""

    ledger: Ledger
    using: str

    def member(self, *, request_quota=None, token_quota=None, team: Team | None = None, token_cap=None) -> KeyInfo:
        """A member with one key on the back-end's database, as the gateway's key cache describes it."""
        n = next(_names)
        if team is None:
            team = Team.objects.using(self.using).create(slug=f"team-{n}", name=f"Team {n}", token_cap=token_cap)
        user = get_user_model().objects.db_manager(self.using).create(username=f"user-{n}")
        member = Member.objects.using(self.using).create(team=team, user=user, request_quota=request_quota,
                                                         token_quota=token_quota)
        key = ApiKey.objects.using(self.using).create(member=member, prefix=f"qh-{n}", key_hash=f"sha256${n}")
        return KeyInfo(key_id=key.pk, member_id=member.pk, team_id=team.pk, username=user.username,
                       team_timezone=team.timezone, team_token_cap=team.token_cap, usable=True, expires_at=None,
                       request_quota=request_quota, token_quota=token_quota, requests_per_minute=None,
                       tokens_per_minute=None, max_concurrent_requests=None, weight=1, allowed_model_ids=frozenset())

    def team(self, key: KeyInfo) -> Team:
        return Team.objects.using(self.using).get(pk=key.team_id)

    def counter(self, key: KeyInfo) -> QuotaCounter:
        return QuotaCounter.objects.using(self.using).get(member_id=key.member_id)

    def team_counter(self, key: KeyInfo) -> TeamQuotaCounter:
        return TeamQuotaCounter.objects.using(self.using).get(team_id=key.team_id)

    def rows(self, key: KeyInfo):
        return UsageRecord.objects.using(self.using).filter(member_id=key.member_id)

    def run(self, main):
        """Run `await main()` in a new event loop, then close the back-end (its connections belong to the loop)."""
        async def wrapped():
            try:
                return await main()
            finally:
                await self.ledger.close()

        return asyncio.run(wrapped())


@pytest.fixture(params=["postgres", "sqlite"])
def world(request) -> World:
    if request.param == "postgres":
        return World(PostgresLedger(), "default")
    return World(SqliteLedger(using=EMBEDDED), EMBEDDED)


def _row(key: KeyInfo, reservation: Reservation | None, request_id: str, status="ok", http_status=200) -> UsageRow:
    start = reservation.period_start if reservation else timezone.now().date().replace(day=1)
    return UsageRow(request_id=request_id, team_id=key.team_id, member_id=key.member_id, api_key_id=key.key_id,
                    period_start=start, endpoint="chat", model="m", started_at=timezone.now(), status=status,
                    http_status=http_status, duration_ms=12.5)


def _outcomes(results) -> tuple[int, int]:
    """(admitted, refused with the quota's 429); anything else fails the test."""
    unexpected = [r for r in results if not isinstance(r, Reservation | QuotaExceeded)]
    assert not unexpected, unexpected
    return sum(isinstance(r, Reservation) for r in results), sum(isinstance(r, QuotaExceeded) for r in results)


def test_reserve_within_the_token_quota_and_refuse_what_does_not_fit(world):
    key = world.member(token_quota=1000)

    async def main():
        first = await world.ledger.reserve(key=key, tokens=600)
        with pytest.raises(QuotaExceeded) as refused:
            await world.ledger.reserve(key=key, tokens=500)
        last = await world.ledger.reserve(key=key, tokens=400)  # exactly what is left
        return first, refused.value, last

    first, refused, last = world.run(main)
    assert first.tokens == 600 and first.counter_id == last.counter_id and first.team_counter_id is None
    assert refused.status == 429 and refused.code == "insufficient_quota"
    assert "up to 500 tokens but only 400 of your monthly quota of 1000 tokens remain" in refused.message
    counter = world.counter(key)
    assert (counter.token_limit, counter.requests_reserved, counter.tokens_reserved, counter.tokens_used) == (
        1000, 2, 1000, 0)


def test_reserve_within_the_request_quota_and_refuse_over_it(world):
    key = world.member(request_quota=2)

    async def main():
        admitted = [await world.ledger.reserve(key=key, tokens=10) for _ in range(2)]
        with pytest.raises(QuotaExceeded) as refused:
            await world.ledger.reserve(key=key, tokens=10)
        return admitted, refused.value

    admitted, refused = world.run(main)
    assert len(admitted) == 2 and "You have used all 2 requests of your monthly quota" in refused.message
    counter = world.counter(key)
    assert (counter.request_limit, counter.requests_reserved, counter.tokens_reserved) == (2, 2, 20)


def test_team_cap_holds_across_members_and_a_refusal_holds_nothing(world):
    ada = world.member(token_cap=1000)
    bob = world.member(team=world.team(ada))

    async def main():
        first = await world.ledger.reserve(key=ada, tokens=700)
        with pytest.raises(QuotaExceeded) as refused:
            await world.ledger.reserve(key=bob, tokens=400)  # bob has no quota of his own; the team's cap holds
        return first, refused.value

    first, refused = world.run(main)
    assert first.team_counter_id == world.team_counter(ada).pk
    assert "only 300 of your team's monthly cap of 1000 tokens" in refused.message
    team = world.team_counter(ada)
    assert (team.token_limit, team.tokens_reserved) == (1000, 700)
    # bob's reservation went with the team's refusal (and so did his month's row, opened in the same transaction)
    assert not QuotaCounter.objects.using(world.using).filter(member_id=bob.member_id, requests_reserved__gt=0).exists()


def test_settle_charges_the_real_tokens_and_releases_the_rest(world):
    key = world.member(token_quota=10_000, token_cap=50_000)

    async def main():
        answered = await world.ledger.reserve(key=key, tokens=500)
        failed = await world.ledger.reserve(key=key, tokens=300)
        await world.ledger.settle(row=_row(key, answered, "req-ok"), usage=Usage(prompt_tokens=30, completion_tokens=20,
                                                                                 cached_tokens=16),
                                  reservation=answered)
        await world.ledger.settle(row=_row(key, failed, "req-failed", status="upstream_error", http_status=502),
                                  usage=Usage(), reservation=failed)

    world.run(main)
    counter, team = world.counter(key), world.team_counter(key)
    assert (counter.requests_used, counter.tokens_used, counter.requests_reserved, counter.tokens_reserved) == (
        1, 50, 0, 0)  # the failed request used nothing and counts against no quota
    assert (team.tokens_used, team.tokens_reserved) == (50, 0)
    ok = world.rows(key).get(request_id="req-ok")
    assert (ok.prompt_tokens, ok.completion_tokens, ok.total_tokens, ok.cached_tokens) == (30, 20, 50, 16)
    assert (ok.status, ok.http_status, ok.duration_ms, ok.api_key_id) == ("ok", 200, 12.5, key.key_id)
    assert world.rows(key).get(request_id="req-failed").http_status == 502


def test_settling_twice_writes_one_row_and_charges_once(world):
    key = world.member(token_quota=10_000, token_cap=50_000)

    async def main():
        reservation = await world.ledger.reserve(key=key, tokens=500)
        row, usage = _row(key, reservation, "req-1"), Usage(prompt_tokens=30, completion_tokens=20)
        await world.ledger.settle(row=row, usage=usage, reservation=reservation)
        await world.ledger.settle(row=row, usage=usage, reservation=reservation)

    world.run(main)
    assert world.rows(key).count() == 1
    counter, team = world.counter(key), world.team_counter(key)
    assert (counter.requests_used, counter.tokens_used, counter.requests_reserved, counter.tokens_reserved) == (
        1, 50, 0, 0)
    assert (team.tokens_used, team.tokens_reserved) == (50, 0)


def test_a_rejected_request_is_a_row_without_a_reservation(world):
    key = world.member(request_quota=1)

    async def main():
        reservation = await world.ledger.reserve(key=key, tokens=10)
        await world.ledger.settle(row=_row(key, None, "req-refused", status="rejected", http_status=429),
                                  usage=Usage())
        return reservation

    world.run(main)
    row = world.rows(key).get()
    assert (row.request_id, row.status, row.http_status, row.total_tokens) == ("req-refused", "rejected", 429, 0)
    counter = world.counter(key)
    assert (counter.requests_used, counter.requests_reserved, counter.tokens_reserved) == (0, 1, 10)  # untouched


def test_concurrent_reservations_against_one_quota_admit_exactly_what_fits(world):
    tokens_key, requests_key = world.member(token_quota=1000), world.member(request_quota=5)

    async def main():
        by_tokens = await asyncio.gather(*(world.ledger.reserve(key=tokens_key, tokens=100) for _ in range(20)),
                                         return_exceptions=True)
        by_requests = await asyncio.gather(*(world.ledger.reserve(key=requests_key, tokens=1) for _ in range(12)),
                                           return_exceptions=True)
        return by_tokens, by_requests

    by_tokens, by_requests = world.run(main)
    assert _outcomes(by_tokens) == (10, 10)
    assert _outcomes(by_requests) == (5, 7)
    counter = world.counter(tokens_key)
    assert (counter.requests_reserved, counter.tokens_reserved, counter.tokens_used) == (10, 1000, 0)
    assert world.counter(requests_key).requests_reserved == 5


def test_concurrent_settlements_of_one_member_are_exact(world):
    key = world.member(token_quota=100_000, token_cap=1_000_000)

    async def main():
        reservations = await asyncio.gather(*(world.ledger.reserve(key=key, tokens=100) for _ in range(12)))
        await asyncio.gather(*(
            world.ledger.settle(row=_row(key, r, f"req-{i}"), usage=Usage(prompt_tokens=i, completion_tokens=2),
                                reservation=r)
            for i, r in enumerate(reservations)))

    world.run(main)
    counter, team = world.counter(key), world.team_counter(key)
    used = sum(i + 2 for i in range(12))
    assert (counter.requests_used, counter.tokens_used, counter.requests_reserved, counter.tokens_reserved) == (
        12, used, 0, 0)
    assert (team.tokens_used, team.tokens_reserved) == (used, 0)
    assert world.rows(key).count() == 12


def test_the_process_back_end_follows_the_default_database():
    with mock.patch.object(ledger, "_backend", None):
        assert isinstance(ledger.backend(), PostgresLedger)
    with mock.patch.object(ledger, "_backend", None), \
            mock.patch.object(ledger, "connections", {"default": SimpleNamespace(vendor="sqlite")}):
        backend = ledger.backend()
        assert isinstance(backend, SqliteLedger) and backend.using == "default"


def test_a_settled_rows_time_reads_back_and_filters_like_the_orms(world):
    """Dashboards filter usage rows by time: the row's started_at must compare like any ORM-written time."""
    key = world.member()
    row = _row(key, None, "req-time")

    async def main():
        await world.ledger.settle(row=row, usage=Usage(prompt_tokens=1))

    world.run(main)
    rows = world.rows(key)
    assert rows.get().started_at == row.started_at
    assert rows.filter(started_at__gte=row.started_at, started_at__lte=row.started_at).count() == 1
    assert rows.filter(started_at__lt=row.started_at).count() == 0


# --- reservation rows, the sweep, late settlements ----------------------------------------------

def _reservations(world: World, key: KeyInfo):
    return QuotaReservation.objects.using(world.using).filter(counter__member_id=key.member_id)


def _age_reservations(world: World, key: KeyInfo, seconds: float) -> None:
    """Pretend the member's reservations were made `seconds` ago (their requests died since)."""
    _reservations(world, key).update(created_at=timezone.now() - timedelta(seconds=seconds))


def _sweep(world: World) -> list[dict]:
    return reservations_sweep(max_age=60, using=world.using)


def _call(world: World, fn):
    """Run `await fn()` (a ledger call) on its own event loop; the ORM runs between such calls."""
    return world.run(fn)


def test_each_reservation_is_a_row_until_its_settlement(world):
    key = world.member(token_quota=10_000, token_cap=50_000)
    first = _call(world, lambda: world.ledger.reserve(key=key, tokens=500))
    second = _call(world, lambda: world.ledger.reserve(key=key, tokens=300))
    held = list(_reservations(world, key).order_by("pk").values_list("pk", "tokens", "team_counter_id"))
    _call(world, lambda: world.ledger.settle(row=_row(key, first, "req-1"), usage=Usage(prompt_tokens=3),
                                             reservation=first))
    team_counter_id = world.team_counter(key).pk
    assert held == [(first.reservation_id, 500, team_counter_id), (second.reservation_id, 300, team_counter_id)]
    assert list(_reservations(world, key).values_list("pk", flat=True)) == [second.reservation_id]
    counter = world.counter(key)
    assert (counter.requests_reserved, counter.tokens_reserved) == (1, 300)


def test_a_burst_of_reservations_is_one_row_each_and_the_rows_sum_to_the_counter(world):
    key = world.member(token_quota=100_000)

    async def main():
        return await asyncio.gather(*(world.ledger.reserve(key=key, tokens=10 + i % 3) for i in range(15)))

    reservations = world.run(main)
    rows = dict(_reservations(world, key).values_list("pk", "tokens"))
    assert len({r.reservation_id for r in reservations}) == 15 == len(rows)
    assert all(rows[r.reservation_id] == r.tokens for r in reservations)  # each request holds its own row
    counter = world.counter(key)
    assert (counter.requests_reserved, counter.tokens_reserved) == (15, sum(rows.values()))


def test_the_sweep_gives_back_only_stale_reservations_and_counts_them(world):
    dead, alive = world.member(token_quota=1000, token_cap=5000), world.member(token_quota=1000)
    _call(world, lambda: world.ledger.reserve(key=dead, tokens=400))
    _call(world, lambda: world.ledger.reserve(key=dead, tokens=500))
    _age_reservations(world, dead, 120)  # their gateway process died two minutes ago
    live = _call(world, lambda: world.ledger.reserve(key=alive, tokens=300))  # a request still running
    swept, again = _sweep(world), _sweep(world)
    with pytest.raises(QuotaExceeded):
        _call(world, lambda: world.ledger.reserve(key=alive, tokens=800))  # the live reservation holds its room
    _call(world, lambda: world.ledger.reserve(key=dead, tokens=1000))  # the dead ones' room is back
    totals = _call(world, world.ledger.swept)

    counter = world.counter(dead)
    assert [(s["member_id"], s["requests"], s["tokens"]) for s in swept] == [(dead.member_id, 2, 900)]
    assert again == []  # run twice, given back once
    assert (counter.reservations_swept, counter.tokens_swept) == (2, 900)
    assert (counter.requests_reserved, counter.tokens_reserved) == (1, 1000)  # only the new reservation
    assert world.team_counter(dead).tokens_reserved == 1000
    assert world.counter(alive).tokens_reserved == 300 and _reservations(world, alive).get().pk == live.reservation_id
    assert totals == (2, 900)
    event = AuditEvent.objects.using(world.using).get(kind=AuditEvent.Kind.RESERVATIONS_RELEASED)
    assert (event.member_id, event.subject_id, event.data["tokens"]) == (dead.member_id, counter.pk, 900)


def test_a_settlement_after_the_sweep_writes_its_row_and_charges_without_going_negative(world):
    key = world.member(token_quota=10_000, token_cap=50_000)
    late = _call(world, lambda: world.ledger.reserve(key=key, tokens=500))
    _age_reservations(world, key, 120)
    _sweep(world)  # a request slower than the bound: its reservation is given back while it runs
    other = _call(world, lambda: world.ledger.reserve(key=key, tokens=200))  # another request in flight meanwhile
    _call(world, lambda: world.ledger.settle(row=_row(key, late, "req-late"),
                                             usage=Usage(prompt_tokens=30, completion_tokens=20), reservation=late))

    assert world.rows(key).get().request_id == "req-late"
    counter, team = world.counter(key), world.team_counter(key)
    # charged its usage; released nothing (the other request's reservation stays whole)
    assert (counter.requests_used, counter.tokens_used, counter.requests_reserved, counter.tokens_reserved) == (
        1, 50, 1, 200)
    assert (team.tokens_used, team.tokens_reserved) == (50, 200)
    assert list(_reservations(world, key).values_list("pk", flat=True)) == [other.reservation_id]


def test_a_settlement_after_the_months_close_released_everything_does_not_go_negative(world):
    key = world.member(request_quota=1, token_quota=1000)
    late = _call(world, lambda: world.ledger.reserve(key=key, tokens=500))
    # the close gives back what is still reserved (by the counter's columns, not the rows),
    # and the room is taken by a request charged first
    QuotaCounter.objects.using(world.using).filter(member_id=key.member_id).update(
        requests_reserved=0, tokens_reserved=0, requests_used=1)
    _call(world, lambda: world.ledger.settle(row=_row(key, late, "req-late"), usage=Usage(prompt_tokens=7),
                                             reservation=late))

    assert world.rows(key).get().total_tokens == 7  # the usage row is not lost
    counter = world.counter(key)
    # reserved stays at 0, the CHECK on requests_used <= request_limit holds (the row says the rest)
    assert (counter.requests_reserved, counter.tokens_reserved, counter.requests_used, counter.tokens_used) == (
        0, 0, 1, 7)


def test_a_combined_settlement_after_the_sweep_releases_only_what_is_still_held():
    world = World(PostgresLedger(), "default")
    key = world.member(token_quota=100_000)
    swept = _call(world, lambda: world.ledger.reserve(key=key, tokens=100))
    held = _call(world, lambda: world.ledger.reserve(key=key, tokens=50))
    QuotaReservation.objects.filter(pk=swept.reservation_id).update(created_at=timezone.now() - timedelta(hours=1))
    _sweep(world)

    async def main():  # settled together (one combined statement), one of them twice
        await asyncio.gather(*(world.ledger.settle(row=_row(key, r, f"req-{r.reservation_id}"),
                                                  usage=Usage(prompt_tokens=5), reservation=r)
                               for r in [swept, held, held, swept]))

    world.run(main)
    counter = world.counter(key)
    assert world.rows(key).count() == 2
    assert (counter.requests_used, counter.tokens_used, counter.requests_reserved, counter.tokens_reserved) == (
        2, 10, 0, 0)
    assert not _reservations(world, key).exists()


def test_reserving_and_settling_stay_one_statement_each_on_postgres():
    world = World(PostgresLedger(), "default")
    key, capped = world.member(token_quota=1000), world.member(token_cap=1000)

    def statements():
        return RESERVE_STATEMENTS._value.get(), SETTLE_STATEMENTS._value.get()

    async def one_request(k, request_id):
        before = statements()
        reservation = await world.ledger.reserve(key=k, tokens=10)
        reserved = statements()
        await world.ledger.settle(row=_row(k, reservation, request_id), usage=Usage(prompt_tokens=1),
                                  reservation=reservation)
        after = statements()
        return reserved[0] - before[0], after[1] - reserved[1]

    async def main():
        await one_request(key, "req-open")  # the month's first request also opens the counter
        plain = await one_request(key, "req-plain")
        await one_request(capped, "req-capped-open")
        return plain, await one_request(capped, "req-capped")

    plain, capped_counts = world.run(main)
    assert plain == (1, 1)
    assert capped_counts == (4, 1)  # BEGIN, member, team (with the row), COMMIT — as before the rows
    assert not QuotaReservation.objects.exists()


def test_postgres_keeps_what_the_database_cannot_take_and_writes_it_once_it_is_back(monkeypatch, caplog):
    """An answered request whose settlement meets PostgreSQL gone: kept in the process, written once, later."""
    from proxy.gateway.ledger import postgres
    from proxy.gateway.tests.test_db import _kill_gateway_connections

    world = World(PostgresLedger(), "default")
    key = world.member(token_quota=10_000)
    monkeypatch.setattr(postgres, "SPOOL_MAX", 2)
    monkeypatch.setattr(postgres, "SPOOL_RETRY_S", (0.05, 0.2))
    usage = Usage(prompt_tokens=30, completion_tokens=20)

    async def main():
        pool = world.ledger.pool
        reservations = [await world.ledger.reserve(key=key, tokens=100) for _ in range(3)]
        port = pool.connect_kwargs.get("port")
        pool.connect_kwargs["port"] = 1  # nothing listens there: the database is gone
        _kill_gateway_connections()
        for n, reservation in enumerate(reservations):  # none raises: the answers were already given
            await world.ledger.settle(row=_row(key, reservation, f"req-kept-{n}"), usage=usage,
                                      reservation=reservation)
        kept = [s.values[0] for s in world.ledger.spool]
        written_meanwhile = await asyncio.to_thread(lambda: world.rows(key).count())
        await asyncio.sleep(0.3)  # retried meanwhile, in vain
        pool.connect_kwargs["port"] = port
        for _ in range(200):
            if not world.ledger.spool:
                break
            await asyncio.sleep(0.05)
        # a settlement given again (a retry of the same request) changes nothing
        await world.ledger.settle(row=_row(key, reservations[2], "req-kept-2"), usage=usage,
                                  reservation=reservations[2])
        return kept, written_meanwhile

    with caplog.at_level("WARNING", logger="qwenhub.gateway"):
        kept, written_meanwhile = world.run(main)
    assert kept == ["req-kept-1", "req-kept-2"] and written_meanwhile == 0  # at most SPOOL_MAX, the oldest dropped
    assert sorted(world.rows(key).values_list("request_id", flat=True)) == ["req-kept-1", "req-kept-2"]
    counter = world.counter(key)
    # the dropped one's reservation is the sweep's; the two written were charged once and released
    assert (counter.requests_used, counter.tokens_used, counter.requests_reserved) == (2, 100, 1)
    assert QuotaReservation.objects.filter(counter=counter).count() == 1
    log = caplog.text
    assert "usage kept until the database is back (1 waiting) request_id=req-kept-0" in log
    assert "usage not recorded (database unavailable, 2 settlements waiting) request_id=req-kept-0" in log
    assert "the database is back" in log
