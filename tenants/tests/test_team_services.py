"""team_update, member_update and member_create: one audited step each, quota carried in the same step."""
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError
from django.db import transaction

from tenants.models import AuditEvent, Member, QuotaCounter
from tenants.services import (
    QUOTA_CHANGE_REASON,
    member_add,
    member_create,
    member_update,
    quota_counter_open,
    quota_top_up,
    team_create,
    team_update,
)
from tenants.tests.factories import PublicModelFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def team():
    return team_create(slug="lab", name="Lab", timezone_name="Asia/Shanghai", monthly_cost="3000")


@pytest.fixture
def member(team):
    return member_add(team=team, username="carol", request_quota=100, token_quota=10_000)


def updates(kind):
    return list(AuditEvent.objects.filter(kind=kind).order_by("pk"))


# --- team_update ---------------------------------------------------------------------------

def test_team_update_records_the_changed_fields_with_old_and_new(team, admin_user):
    team = team_update(team=team, data={"name": "The Lab", "monthly_cost": "2999.50", "currency": "usd",
                                        "slug": "lab", "token_cap": None}, actor=admin_user)
    assert (team.name, team.monthly_cost, team.currency) == ("The Lab", Decimal("2999.50"), "USD")
    [event] = updates(AuditEvent.Kind.TEAM_UPDATED)
    assert (event.team, event.actor, event.subject_id) == (team, admin_user, team.pk)
    assert event.data == {"changed": {"name": {"old": "Lab", "new": "The Lab"},
                                      "monthly_cost": {"old": "3000.00", "new": "2999.50"},
                                      "currency": {"old": "CNY", "new": "USD"}}}


def test_team_update_that_changes_nothing_writes_nothing(team):
    team_update(team=team, data={"name": "Lab", "slug": "lab"})
    assert not updates(AuditEvent.Kind.TEAM_UPDATED)


def test_team_update_refuses_bad_values_and_writes_nothing(team):
    with pytest.raises(ValidationError):
        team_update(team=team, data={"name": "Renamed", "timezone": "Mars/Olympus"})
    team.refresh_from_db()
    assert team.name == "Lab" and not updates(AuditEvent.Kind.TEAM_UPDATED)


def test_team_update_with_members_is_one_transaction(team, member):
    other = member_add(team=team, username="dave", request_quota=5)
    quota_counter_open(member=member)
    with pytest.raises(ValidationError):
        team_update(team=team, data={"name": "Renamed"},
                    members=[(member, {"request_quota": 300}), (other, {"weight": 0})])
    team.refresh_from_db()
    member.refresh_from_db()
    assert (team.name, member.request_quota) == ("Lab", 100)
    assert QuotaCounter.objects.get(member=member).request_limit == 100
    assert not updates(AuditEvent.Kind.TEAM_UPDATED) and not updates(AuditEvent.Kind.MEMBER_UPDATED)

    team_update(team=team, data={"name": "Renamed"}, members=[(member, {"request_quota": 300}), (other, {})])
    assert QuotaCounter.objects.get(member=member).request_limit == 300
    assert len(updates(AuditEvent.Kind.TEAM_UPDATED)) == 1
    assert [e.member for e in updates(AuditEvent.Kind.MEMBER_UPDATED)] == [member]


def test_team_update_refuses_another_teams_member(team):
    stranger = member_add(team=team_create(slug="other", name="Other"), username="eve")
    with pytest.raises(ValidationError):
        team_update(team=team, data={}, members=[(stranger, {"weight": 3})])
    stranger.refresh_from_db()
    assert stranger.weight == 1


# --- member_update -----------------------------------------------------------------------------

def test_member_update_carries_a_changed_quota_into_the_open_month_in_the_same_step(member, admin_user):
    quota_top_up(member=member, requests=50, reason="deadline")
    member = member_update(member=member, data={"request_quota": 200, "weight": 3}, actor=admin_user)
    counter = QuotaCounter.objects.get(member=member)
    assert (member.request_quota, member.weight) == (200, 3)
    assert (counter.request_limit, counter.token_limit) == (250, 10_000)  # the top-up is kept
    [event] = updates(AuditEvent.Kind.MEMBER_UPDATED)
    assert (event.member, event.actor, event.reason) == (member, admin_user, QUOTA_CHANGE_REASON)
    assert event.data == {
        "changed": {"request_quota": {"old": 100, "new": 200}, "weight": {"old": 1, "new": 3}},
        "period": counter.period_start.isoformat(), "request_quota": 200, "token_quota": 10_000,
        "request_limit": 250, "token_limit": 10_000,
    }


def test_member_update_lowered_quota_never_drops_below_used_and_in_flight(member):
    counter = quota_counter_open(member=member)
    QuotaCounter.objects.filter(pk=counter.pk).update(requests_used=40, requests_reserved=2, tokens_used=9_000)
    member_update(member=member, data={"request_quota": 10, "token_quota": 5_000})
    counter.refresh_from_db()
    assert (counter.request_limit, counter.token_limit) == (42, 9_000)


def test_member_update_without_an_open_month_changes_the_member_only(member):
    member_update(member=member, data={"token_quota": None, "requests_per_minute": 60})
    assert not QuotaCounter.objects.exists()
    [event] = updates(AuditEvent.Kind.MEMBER_UPDATED)
    assert event.reason == "" and set(event.data) == {"changed"}
    assert quota_counter_open(member=member).token_limit is None  # the month opens with the new quota


def test_member_update_uses_the_stored_quota_not_the_callers_copy(member):
    """The admin passes its form's instance, already holding the new values."""
    quota_counter_open(member=member)
    member.request_quota = 300
    member_update(member=member, data={"request_quota": 300})
    assert QuotaCounter.objects.get(member=member).request_limit == 300


def test_member_update_allowed_models_are_recorded_by_name(member):
    chat, code = PublicModelFactory(name="chat"), PublicModelFactory(name="code")
    member_update(member=member, data={"allowed_models": [chat, code.pk]})
    assert set(member.allowed_models.values_list("name", flat=True)) == {"chat", "code"}
    member_update(member=member, data={"allowed_models": [code]})
    member_update(member=member, data={"allowed_models": [code]})  # no change, no event
    events = updates(AuditEvent.Kind.MEMBER_UPDATED)
    assert [e.data["changed"]["allowed_models"] for e in events] == [
        {"old": [], "new": ["chat", "code"]}, {"old": ["chat", "code"], "new": ["code"]}]


def test_member_update_refuses_bad_values_and_writes_nothing(member):
    quota_counter_open(member=member)
    for data in ({"request_quota": -1}, {"weight": 0}, {"role": "owner"}):
        with pytest.raises(ValidationError):
            member_update(member=member, data=data)
    member.refresh_from_db()
    assert (member.request_quota, member.weight, member.role) == (100, 1, "member")
    assert QuotaCounter.objects.get(member=member).request_limit == 100
    assert not updates(AuditEvent.Kind.MEMBER_UPDATED)


def test_member_update_refuses_fields_it_does_not_own(member):
    with pytest.raises(TypeError):
        member_update(member=member, data={"team": None})


def test_member_update_is_the_outermost_transaction(member):
    with transaction.atomic(), pytest.raises(RuntimeError):
        member_update(member=member, data={"weight": 2})


# --- member_create -----------------------------------------------------------------------------

def test_member_create_adds_an_existing_user_once(team, admin_user):
    user = UserFactory(username="frank")
    chat = PublicModelFactory(name="chat")
    member = member_create(team=team, user=user, request_quota=7, allowed_models=[chat], actor=admin_user)
    assert (member.request_quota, list(member.allowed_models.all())) == (7, [chat])
    event = AuditEvent.objects.get(kind=AuditEvent.Kind.MEMBER_ADDED, member=member)
    assert event.actor == admin_user
    with pytest.raises(ValidationError):
        member_create(team=team, user=user)
    assert Member.objects.filter(user=user).count() == 1
