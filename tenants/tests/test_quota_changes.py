"""A member's quota edited mid-month applies to the open month, keeping its top-ups."""
import pytest
from django.db.models import F

from tenants.models import AuditEvent, QuotaCounter
from tenants.services import (
    quota_counter_apply_quota_change,
    quota_counter_open,
    quota_reset,
    quota_top_up,
)
from tenants.services import member_add, team_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def member():
    team = team_create(slug="q", name="Q", timezone_name="Asia/Shanghai")
    return member_add(team=team, username="carol", request_quota=100, token_quota=10_000)


def _change(member, **quotas):
    old = (member.request_quota, member.token_quota)
    for field, value in quotas.items():
        setattr(member, field, value)
    member.save()
    return quota_counter_apply_quota_change(member=member, old_request_quota=old[0], old_token_quota=old[1])


def test_raised_quota_keeps_this_months_top_up(member):
    quota_top_up(member=member, requests=50, reason="deadline")
    counter = _change(member, request_quota=200)
    assert counter.request_limit == 250 and counter.token_limit == 10_000
    assert AuditEvent.objects.filter(member=member, kind=AuditEvent.Kind.MEMBER_UPDATED).count() == 1


def test_lowered_quota_never_drops_below_used_and_in_flight(member):
    counter = quota_counter_open(member=member)
    QuotaCounter.objects.filter(pk=counter.pk).update(requests_used=40, requests_reserved=2, tokens_used=9_000)
    counter = _change(member, request_quota=10, token_quota=5_000)
    assert (counter.request_limit, counter.token_limit) == (42, 9_000)


def test_unlimited_and_back(member):
    quota_counter_open(member=member)
    assert _change(member, token_quota=None).token_limit is None
    assert _change(member, token_quota=3_000).token_limit == 3_000


def test_no_open_month_nothing_to_do(member):
    assert _change(member, request_quota=5) is None
    assert quota_counter_open(member=member).request_limit == 5  # the month opens with the new quota


def test_reset_counts_requests_in_flight_as_used(member):
    counter = quota_counter_open(member=member)
    QuotaCounter.objects.filter(pk=counter.pk).update(requests_used=100, requests_reserved=3)
    counter = quota_reset(member=member, reason="fresh start")
    assert counter.request_limit == 203
    # when the three in flight settle, a full quota of 100 remains
    QuotaCounter.objects.filter(pk=counter.pk).update(requests_used=F("requests_used") + 3, requests_reserved=0)
    counter.refresh_from_db()
    assert counter.request_limit - counter.requests_used == 100


def test_admin_edit_applies_now(admin_client, admin_user, member):
    quota_top_up(member=member, requests=10, reason="x")
    response = admin_client.post(f"/admin/tenants/member/{member.pk}/change/", {
        "role": "member", "is_active": "on", "request_quota": "300", "token_quota": "10000",
        "requests_per_minute": "", "tokens_per_minute": "", "max_concurrent_requests": "", "weight": "1",
    })
    assert response.status_code == 302, response.content.decode()[:2000]
    counter = QuotaCounter.objects.get(member=member)
    assert counter.request_limit == 310
    event = AuditEvent.objects.get(member=member, kind=AuditEvent.Kind.MEMBER_UPDATED)
    assert event.actor == admin_user
