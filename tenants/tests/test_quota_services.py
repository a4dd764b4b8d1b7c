"""quota_top_up and quota_reset: this month only, audited, never on unlimited quotas."""
from datetime import date

import pytest

from tenants.models import AuditEvent, QuotaCounter
from tenants.periods import next_period_start, period_start_for
from tenants.services import QUOTA_AMOUNT_INVALID, quota_counter_open, quota_reset, quota_top_up
from tenants.tests.factories import MemberFactory, QuotaCounterFactory, UserFactory

pytestmark = pytest.mark.django_db


def test_top_up_raises_only_this_months_limit_and_audits_actor_and_reason():
    # given a member with a counter last month and one this month
    member = MemberFactory(request_quota=100, token_quota=5000, team__timezone="Asia/Shanghai")
    this_month = period_start_for("Asia/Shanghai")
    last_month = date(this_month.year - (this_month.month == 1), (this_month.month - 2) % 12 + 1, 1)
    old = QuotaCounterFactory(member=member, period_start=last_month, requests_used=100)
    QuotaCounterFactory(member=member, period_start=this_month, requests_used=40)
    actor = UserFactory(username="root")
    # when an admin tops up
    counter = quota_top_up(member=member, requests=50, tokens=1000, actor=actor, reason="paper deadline")
    # then this month's limits move, last month's and the member's quotas do not
    assert (counter.period_start, counter.request_limit, counter.token_limit) == (this_month, 150, 6000)
    assert counter.requests_used == 40
    old.refresh_from_db()
    member.refresh_from_db()
    assert (old.request_limit, old.token_limit) == (100, 5000)
    assert (member.request_quota, member.token_quota) == (100, 5000)
    event = AuditEvent.objects.get(kind=AuditEvent.Kind.QUOTA_TOPPED_UP)
    assert (event.actor, event.reason, event.member, event.subject_id) == (actor, "paper deadline", member, counter.pk)
    assert event.data["requests"] == 50 and event.data["request_limit"] == 150


def test_top_up_opens_this_months_counter_from_the_members_quota():
    member = MemberFactory(request_quota=10, token_quota=None)
    counter = quota_top_up(member=member, requests=5, reason="x")
    assert QuotaCounter.objects.get().pk == counter.pk and counter.request_limit == 15


def test_next_month_starts_again_from_the_members_quota():
    member = MemberFactory(request_quota=10)
    counter = quota_top_up(member=member, requests=5, reason="x")
    following = quota_counter_open(member=member, period_start=next_period_start(counter.period_start))
    assert following.request_limit == 10


@pytest.mark.parametrize("field, kwargs", [("request_quota", {"requests": 10}), ("token_quota", {"tokens": 10})])
def test_top_up_on_an_unlimited_quota_raises_and_writes_nothing(field, kwargs):
    member = MemberFactory(**{field: None})
    with pytest.raises(ValueError, match="unlimited"):
        quota_top_up(member=member, reason="x", **kwargs)
    assert not AuditEvent.objects.exists()


@pytest.mark.parametrize("kwargs", [{}, {"requests": -1}, {"tokens": -5, "requests": 10}, {"requests": 0, "tokens": 0}])
def test_top_up_needs_a_positive_amount(kwargs):
    member = MemberFactory()
    with pytest.raises(ValueError, match=QUOTA_AMOUNT_INVALID):
        quota_top_up(member=member, reason="x", **kwargs)
    assert not QuotaCounter.objects.exists() and not AuditEvent.objects.exists()


def test_reset_gives_a_full_fresh_allowance_and_keeps_usage():
    member = MemberFactory(request_quota=100, token_quota=None)
    QuotaCounterFactory(member=member, request_limit=120, requests_used=118, tokens_used=9999)
    actor = UserFactory()
    counter = quota_reset(member=member, actor=actor, reason="new project")
    assert (counter.requests_used, counter.request_limit) == (118, 218)
    assert (counter.tokens_used, counter.token_limit) == (9999, None)
    event = AuditEvent.objects.get(kind=AuditEvent.Kind.QUOTA_RESET)
    assert (event.actor, event.reason, event.subject_id) == (actor, "new project", counter.pk)


def test_reset_applies_a_quota_changed_mid_month():
    member = MemberFactory(request_quota=100)
    QuotaCounterFactory(member=member, requests_used=30)
    member.request_quota = 500
    member.save(update_fields=["request_quota"])
    assert quota_reset(member=member, reason="raised").request_limit == 530
