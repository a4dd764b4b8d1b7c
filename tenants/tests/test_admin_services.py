"""The team and member admin pages save through the services: audited, one step, errors on the form."""
import pytest
from django.contrib.admin.models import ADDITION, CHANGE, LogEntry
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from tenants.models import AuditEvent, Member, QuotaCounter, Team
from tenants.services import quota_counter_open, quota_top_up
from tenants.tests.factories import MemberFactory, PublicModelFactory, TeamFactory, UserFactory
from tenants.tests.test_admin import form_data

pytestmark = pytest.mark.django_db


def test_team_page_saves_team_and_members_through_team_update(admin_client, admin_user):
    team = TeamFactory(name="Lab")
    alice = MemberFactory(team=team, user__username="alice", request_quota=100)
    MemberFactory(team=team, user__username="bob", request_quota=100)
    quota_top_up(member=alice, requests=10, reason="deadline")
    url = reverse("admin:tenants_team_change", args=[team.pk])
    data = form_data(admin_client.get(url))
    data["name"] = "The Lab"
    data["members-0-request_quota"] = "250"
    response = admin_client.post(url, data)
    assert response.status_code == 302
    assert QuotaCounter.objects.get(member=alice).request_limit == 260  # carried, top-up kept
    event = AuditEvent.objects.get(kind=AuditEvent.Kind.TEAM_UPDATED)
    assert event.actor == admin_user and event.data["changed"] == {"name": {"old": "Lab", "new": "The Lab"}}
    [member_event] = AuditEvent.objects.filter(kind=AuditEvent.Kind.MEMBER_UPDATED)
    assert (member_event.member, member_event.actor) == (alice, admin_user)
    assert member_event.data["changed"] == {"request_quota": {"old": 100, "new": 250}}
    assert member_event.data["request_limit"] == 260
    assert LogEntry.objects.filter(action_flag=CHANGE, object_id=str(team.pk)).count() == 1


def test_team_page_saved_unchanged_writes_no_audit_event(admin_client):
    team = TeamFactory()
    MemberFactory(team=team)
    url = reverse("admin:tenants_team_change", args=[team.pk])
    assert admin_client.post(url, form_data(admin_client.get(url))).status_code == 302
    assert not AuditEvent.objects.exists()


def test_team_added_in_the_admin_goes_through_team_create(admin_client, admin_user):
    response = admin_client.post(reverse("admin:tenants_team_add"), {
        "slug": "new-lab", "name": "New lab", "timezone": "Asia/Shanghai", "currency": "CNY",
        "monthly_cost": "100.00", "token_cap": "5000",
        "members-TOTAL_FORMS": "0", "members-INITIAL_FORMS": "0",
    })
    assert response.status_code == 302, response.context and response.context["errors"]
    team = Team.objects.get(slug="new-lab")
    assert team.token_cap == 5000
    assert AuditEvent.objects.get(kind=AuditEvent.Kind.TEAM_CREATED).actor == admin_user
    assert LogEntry.objects.get(action_flag=ADDITION).object_id == str(team.pk)


def test_member_page_saves_through_member_update_in_one_step(admin_client, admin_user):
    member = MemberFactory(request_quota=100, token_quota=1000)
    chat = PublicModelFactory(name="chat")
    quota_counter_open(member=member)
    url = reverse("admin:tenants_member_change", args=[member.pk])
    data = form_data(admin_client.get(url))
    data.update({"request_quota": "40", "weight": "2", "allowed_models": [str(chat.pk)]})
    assert admin_client.post(url, data).status_code == 302
    member.refresh_from_db()
    assert (member.request_quota, member.weight, list(member.allowed_models.all())) == (40, 2, [chat])
    assert QuotaCounter.objects.get(member=member).request_limit == 40
    [event] = AuditEvent.objects.filter(kind=AuditEvent.Kind.MEMBER_UPDATED)
    assert event.actor == admin_user
    assert set(event.data["changed"]) == {"request_quota", "weight", "allowed_models"}


def test_member_added_in_the_admin_goes_through_member_create(admin_client, admin_user):
    team, user = TeamFactory(), UserFactory(username="grace")
    response = admin_client.post(reverse("admin:tenants_member_add"), {
        "user": str(user.pk), "team": str(team.pk), "role": "member", "is_active": "on",
        "request_quota": "10", "token_quota": "", "weight": "1",
    })
    assert response.status_code == 302, response.context and response.context["errors"]
    member = Member.objects.get(user=user)
    assert member.request_quota == 10
    assert AuditEvent.objects.get(kind=AuditEvent.Kind.MEMBER_ADDED, member=member).actor == admin_user


def test_a_service_refusal_shows_on_the_form_and_saves_nothing(admin_client, monkeypatch):
    from django.core.exceptions import ValidationError

    from tenants import admin as tenants_admin

    def refuse(**kwargs):
        raise ValidationError({"weight": "Refused by the service.", "__all__": "Also this."})

    monkeypatch.setattr(tenants_admin, "member_update", refuse)
    member = MemberFactory(weight=1)
    url = reverse("admin:tenants_member_change", args=[member.pk])
    data = form_data(admin_client.get(url))
    data["weight"] = "5"
    response = admin_client.post(url, data)
    assert response.status_code == 200
    content = response.content.decode()
    assert "Refused by the service." in content and "Also this." in content
    assert not LogEntry.objects.exists()


def test_teams_and_members_cannot_be_deleted_in_the_admin(admin_client):
    member = MemberFactory()
    assert admin_client.post(reverse("admin:tenants_team_delete", args=[member.team_id]),
                             {"post": "yes"}).status_code == 403
    assert admin_client.post(reverse("admin:tenants_member_delete", args=[member.pk]),
                             {"post": "yes"}).status_code == 403
    assert Member.objects.filter(pk=member.pk).exists()


def test_team_page_queries_do_not_grow_with_members(admin_client):
    team = TeamFactory()
    url = reverse("admin:tenants_team_change", args=[team.pk])

    def count() -> int:
        with CaptureQueriesContext(connection) as queries:
            assert admin_client.get(url).status_code == 200
        return len(queries)

    MemberFactory.create_batch(2, team=team)
    few = count()
    MemberFactory.create_batch(6, team=team)
    assert count() == few


def test_key_label_edited_in_the_admin_goes_through_api_key_update(admin_client, admin_user):
    from tenants.models import ApiKey
    from tenants.tests.factories import ApiKeyFactory

    key = ApiKeyFactory(label="old")
    url = reverse("admin:tenants_apikey_change", args=[key.pk])
    data = form_data(admin_client.get(url))
    data["label"] = "laptop"
    assert admin_client.post(url, data).status_code == 302
    assert ApiKey.objects.get(pk=key.pk).label == "laptop"
    event = AuditEvent.objects.get(kind=AuditEvent.Kind.KEY_UPDATED)
    assert (event.actor, event.member) == (admin_user, key.member)
    assert event.data == {"prefix": key.prefix, "changed": {"label": {"old": "old", "new": "laptop"}}}
    assert key.key_hash.split("$")[1] not in str(event.data)
