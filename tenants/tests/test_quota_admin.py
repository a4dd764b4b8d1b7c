"""Admin for quota counters: read-only, with top-up/reset actions that call the services."""
import pytest
from django.contrib.admin.models import CHANGE, LogEntry
from django.urls import reverse

from tenants.models import AuditEvent, QuotaCounter
from tenants.tests.factories import MemberFactory, QuotaCounterFactory

pytestmark = pytest.mark.django_db
CHANGELIST = "admin:tenants_quotacounter_changelist"


def test_quota_counters_are_read_only(admin_client):
    counter = QuotaCounterFactory(request_limit=100)
    assert admin_client.get(reverse("admin:tenants_quotacounter_add")).status_code == 403
    change_url = reverse("admin:tenants_quotacounter_change", args=[counter.pk])
    assert admin_client.get(change_url).status_code == 200
    assert admin_client.post(change_url, {"request_limit": "999"}).status_code == 403
    assert QuotaCounter.objects.get(pk=counter.pk).request_limit == 100


def test_top_up_action_asks_for_amount_and_reason_then_calls_the_service(admin_client, admin_user):
    member = MemberFactory(request_quota=100, token_quota=1000)
    counter = QuotaCounterFactory(member=member, requests_used=100)
    selection = {"action": "top_up", "_selected_action": [counter.pk]}
    # the action first shows a form, and changes nothing
    response = admin_client.post(reverse(CHANGELIST), selection)
    assert response.status_code == 200 and "admin/action_form.html" in [
        t.name for t in response.templates]
    assert str(member) in response.content.decode()
    assert QuotaCounter.objects.get(pk=counter.pk).request_limit == 100
    # an empty form is refused
    response = admin_client.post(reverse(CHANGELIST), {**selection, "apply": "1", "requests": "0", "reason": "x"})
    assert response.status_code == 200 and "positive number" in response.content.decode()
    # then applies it
    response = admin_client.post(reverse(CHANGELIST), {**selection, "apply": "1", "requests": "50", "tokens": "",
                                                       "reason": "paper deadline"})
    assert response.status_code == 302
    counter.refresh_from_db()
    assert (counter.request_limit, counter.token_limit) == (150, 1000)
    event = AuditEvent.objects.get(kind=AuditEvent.Kind.QUOTA_TOPPED_UP)
    assert (event.actor, event.reason) == (admin_user, "paper deadline")
    entry = LogEntry.objects.get(action_flag=CHANGE)
    assert entry.object_id == str(counter.pk) and "paper deadline" in entry.get_change_message()


def test_reset_action(admin_client, admin_user):
    member = MemberFactory(request_quota=100, token_quota=None)
    counter = QuotaCounterFactory(member=member, requests_used=80, request_limit=90)
    response = admin_client.post(reverse(CHANGELIST), {"action": "reset", "_selected_action": [counter.pk],
                                                       "apply": "1", "reason": "new grant"})
    assert response.status_code == 302
    assert QuotaCounter.objects.get(pk=counter.pk).request_limit == 180
    assert AuditEvent.objects.get(kind=AuditEvent.Kind.QUOTA_RESET).actor == admin_user
    assert LogEntry.objects.filter(object_id=str(counter.pk), action_flag=CHANGE).count() == 1


def test_reset_needs_a_reason(admin_client):
    counter = QuotaCounterFactory(requests_used=5)
    response = admin_client.post(reverse(CHANGELIST), {"action": "reset", "_selected_action": [counter.pk],
                                                       "apply": "1", "reason": ""})
    assert response.status_code == 200
    assert not AuditEvent.objects.exists() and not LogEntry.objects.exists()


def test_top_up_of_an_unlimited_quota_reports_the_error_and_changes_nothing(admin_client):
    counter = QuotaCounterFactory(member=MemberFactory(request_quota=None))
    response = admin_client.post(reverse(CHANGELIST), {"action": "top_up", "_selected_action": [counter.pk],
                                                       "apply": "1", "requests": "10", "reason": "r"}, follow=True)
    assert "unlimited" in response.content.decode()
    assert QuotaCounter.objects.get(pk=counter.pk).request_limit is None
    assert not AuditEvent.objects.exists() and not LogEntry.objects.exists()


def test_quota_actions_need_the_change_permission(client, django_user_model):
    from django.contrib.auth.models import Permission

    staff = django_user_model.objects.create_user("viewer", password="pw-for-tests", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_quotacounter"))
    client.force_login(staff)
    counter = QuotaCounterFactory(request_limit=100)
    response = client.post(reverse(CHANGELIST), {"action": "top_up", "_selected_action": [counter.pk],
                                                 "apply": "1", "requests": "10", "reason": "r"})
    assert response.status_code in (200, 302)
    assert QuotaCounter.objects.get(pk=counter.pk).request_limit == 100
    assert not AuditEvent.objects.exists()
