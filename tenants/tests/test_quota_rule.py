"""The quota rule (tenants.quota): pure helpers with fixed inputs, and its SQL against the real tables."""
import pytest
from django.db import connection

from billing.models import UsageRecord
from tenants import quota
from tenants.models import Member, QuotaCounter, QuotaReservation, Team, TeamQuotaCounter
from tenants.periods import period_start_for
from tenants.services import quota_counter_open, quota_counters_open_for_team
from tenants.tests.factories import MemberFactory


def test_worst_case_is_the_prompt_bound_plus_the_completion_bound():
    assert quota.reservation_tokens(body_bytes=100, completion_bound=50, max_model_len=32768) == 100 + 64 + 50
    # a prompt can never be longer than the context window
    assert quota.reservation_tokens(body_bytes=10_000, completion_bound=50, max_model_len=1000) == 1000 + 50


@pytest.mark.parametrize(("status", "tokens", "charged"), [
    (UsageRecord.Status.OK, 0, 1),
    (UsageRecord.Status.CLIENT_DISCONNECTED, 0, 1),
    (UsageRecord.Status.UPSTREAM_ERROR, 0, 0),
    (UsageRecord.Status.UPSTREAM_ERROR, 12, 1),  # it used tokens: they and the request count
    (UsageRecord.Status.REJECTED, 0, 0),
])
def test_what_a_finished_request_is_charged(status, tokens, charged):
    assert quota.charged_requests(status=status, total_tokens=tokens) == charged


def test_answered_statuses_are_usage_row_statuses():
    assert quota.ANSWERED_STATUSES == {UsageRecord.Status.OK.value, UsageRecord.Status.CLIENT_DISCONNECTED.value}


def test_refusal_says_which_limit_and_what_is_left():
    common = dict(reset="2026-12-01 00:00", tz="Asia/Shanghai", requests_used=3, requests_reserved=0,
                  tokens_used=900, tokens_reserved=50)
    by_requests = quota.refusal_message(team_cap=False, need=10, request_limit=3, token_limit=None, **common)
    assert by_requests == quota.QUOTA_REQUESTS_EXHAUSTED.format(limit=3, reset=common["reset"], tz=common["tz"])
    by_tokens = quota.refusal_message(team_cap=False, need=100, request_limit=None, token_limit=1000, **common)
    assert "only 50 of your monthly quota of 1000 tokens" in by_tokens
    by_team = quota.refusal_message(team_cap=True, need=100, request_limit=None, token_limit=1000, **common)
    assert "only 50 of your team's monthly cap of 1000 tokens" in by_team


def test_statements_name_the_models_tables():
    assert quota.COUNTER == QuotaCounter._meta.db_table
    assert quota.TEAM_COUNTER == TeamQuotaCounter._meta.db_table
    assert quota.MEMBER == Member._meta.db_table and quota.TEAM == Team._meta.db_table
    assert quota.RESERVATION == QuotaReservation._meta.db_table


@pytest.mark.django_db
def test_a_month_opens_with_the_members_quotas_of_that_instant():
    member = MemberFactory(request_quota=10, token_quota=1000)
    Member.objects.filter(pk=member.pk).update(request_quota=20, token_quota=5000)  # `member` is stale now
    counter = quota_counter_open(member=member)
    assert (counter.request_limit, counter.token_limit) == (20, 5000)
    assert counter.period_start == period_start_for(member.team.timezone)
    # opening again changes nothing (the unique constraint decides, nothing is reset)
    QuotaCounter.objects.filter(pk=counter.pk).update(requests_used=4)
    assert quota_counter_open(member=member).requests_used == 4
    assert QuotaCounter.objects.filter(member=member).count() == 1


@pytest.mark.django_db
def test_a_team_cap_opens_with_the_teams_cap_of_that_instant():
    member = MemberFactory()
    Team.objects.filter(pk=member.team_id).update(token_cap=777)
    start = period_start_for(member.team.timezone)
    with connection.cursor() as cursor:
        cursor.execute(quota.TEAM_OPEN_SQL, quota.team_open_args(team_id=member.team_id, start=start))
        cursor.execute(quota.TEAM_OPEN_SQL, quota.team_open_args(team_id=member.team_id, start=start))
    assert TeamQuotaCounter.objects.get(team_id=member.team_id, period_start=start).token_limit == 777


@pytest.mark.django_db
def test_a_teams_month_opens_for_every_active_member_in_two_statements(django_assert_num_queries):
    first = MemberFactory(request_quota=10, token_quota=100)
    team = first.team
    Team.objects.filter(pk=team.pk).update(token_cap=5000)
    team.refresh_from_db()
    second = MemberFactory(team=team, request_quota=None, token_quota=7)
    gone = MemberFactory(team=team, is_active=False)
    start = period_start_for(team.timezone)
    QuotaCounter.objects.create(member=first, period_start=start, request_limit=99, requests_used=3)  # already open
    with django_assert_num_queries(3):  # members, the team cap, the count
        assert quota_counters_open_for_team(team=team, period_start=start) == 2
    assert QuotaCounter.objects.get(member=first).requests_used == 3  # left as it was
    assert (QuotaCounter.objects.get(member=second).request_limit,
            QuotaCounter.objects.get(member=second).token_limit) == (None, 7)
    assert not QuotaCounter.objects.filter(member=gone).exists()
    assert TeamQuotaCounter.objects.get(team=team, period_start=start).token_limit == 5000
